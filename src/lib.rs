//! chatcli: an LLM gateway daemon speaking the ChatCLI gRPC protocol (`chatcli server`), its client
//! (`chatcli connect`) and its configuration tooling (`chatcli config check|show`).
//!
//! `src/main.rs` only wires this library: parse the command line, load the config, start tracing,
//! bind the listeners and call [`server::run`].

pub mod alloc;
pub mod auth;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod config;
pub mod exit;
#[cfg(test)]
mod fuzz;
pub mod gateway;
pub mod hub;
pub mod llm;
pub mod mcp;
mod proto_debug;
pub mod server;
pub mod sessions;
pub mod state;
pub mod systemd;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod watcher;

/// Types and service traits generated from `proto/chatcli/v1/chatcli.proto`.
#[allow(clippy::all, missing_docs)] // reason: generated code
pub mod proto {
    tonic::include_proto!("chatcli.v1");
    /// The encoded `FileDescriptorSet` of the proto, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("chatcli_descriptor");
}

/// The version reported by `--version`, `Health` and `GetServerInfo`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
