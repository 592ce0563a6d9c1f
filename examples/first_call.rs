//! A first call to a running chatcli server with a real gRPC client (tonic):
//! `cargo run --example first_call -- [ADDRESS] [PROMPT]`, default `http://127.0.0.1:50051`.
//! Prints the server info, then streams the answer to stdout as it arrives.

#![allow(clippy::print_stdout, reason = "an example client prints its answer")]

use std::io::Write as _;

use chatcli::proto::chat_cli_service_client::ChatCliServiceClient;
use chatcli::proto::{GetServerInfoRequest, StreamPromptRequest};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "hello from the first call".into());
    let mut client = ChatCliServiceClient::connect(addr.clone()).await?;

    let info = client
        .get_server_info(GetServerInfoRequest {})
        .await?
        .into_inner();
    eprintln!(
        "Connected to chatcli server at {addr} (version: {}, provider: {}, model: {}, providers: {:?})",
        info.version, info.provider, info.model, info.available_providers
    );

    let mut stream = client
        .stream_prompt(StreamPromptRequest {
            prompt,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = std::io::stdout();
    while let Some(msg) = stream.message().await? {
        write!(out, "{}", msg.chunk)?;
        out.flush()?;
        if msg.done {
            writeln!(out)?;
            eprintln!("(answered by {} / {})", msg.provider, msg.model);
            break;
        }
    }
    Ok(())
}
