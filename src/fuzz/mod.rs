//! Property-based fuzzing of the parsers that read untrusted bytes: the config (TOML files,
//! drop-ins, environment), the SSE and NDJSON streams of upstreams, the `authorization` header and
//! JWTs, session files and protobuf messages. Each property runs on generated inputs and on the
//! checked-in corpus (`src/fuzz/corpus/<target>/*`), every time the tests run.
//!
//! Properties: no panic; bounded input gives bounded output (a parser never yields more than its
//! input can describe); round-trips where an encoder exists. The number of generated cases is
//! small by default (the test command stays fast); `PROPTEST_CASES` raises it, and
//! `bench/fuzz.sh` runs the suite in a loop for a number of minutes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: test code; a failed unwrap is a failed test

mod auth;
mod config;
mod proto;
mod sessions;
mod streams;

use std::path::PathBuf;

use proptest::test_runner::Config;

/// The proptest settings of a target: `default_cases` generated cases unless `PROPTEST_CASES`
/// says otherwise; no regression files are written into the source tree (failing inputs worth
/// keeping go into the corpus instead).
pub(crate) fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// The corpus files of `target`, sorted by name, with their bytes. Panics when the folder is
/// missing or empty, so a renamed folder cannot silently turn a corpus run into a no-op.
pub(crate) fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/fuzz/corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
}

/// A single-threaded runtime for the async parsers.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
