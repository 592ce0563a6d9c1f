//! The test MCP server over stdio (`chatcli::testing::mcp`), for the integration tests that start
//! it as a child process: `mcp_fake` serves MCP on stdin/stdout until stdin closes.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    chatcli::testing::mcp::serve_stdio().await;
}
