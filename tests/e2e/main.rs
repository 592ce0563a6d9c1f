//! End-to-end tests of chatcli, linked into one test binary: the server started in-process on port 0
//! and driven by real gRPC and HTTP clients, the real `chatcli` binary (exit codes, `config show`,
//! the listening line, SIGTERM drain), and a Python gRPC peer generated from our proto.
#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: a failed unwrap is a failed test

mod aiops;
mod binary;
mod catalog;
mod client;
mod client_credentials;
mod config_tables;
mod crash;
mod error_classes;
mod fault_table;
mod first_hour;
mod grpc;
mod held_streams;
mod hostile;
mod http;
mod http_api;
mod hub;
mod interactive;
mod mcp;
mod providers;
mod python;
mod redis;
mod reload;
mod security;
mod sessions;
mod support;
mod tls;
mod upstream_faults;
mod watcher;
