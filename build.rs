//! Compiles `proto/chatcli/v1/chatcli.proto` with protox (pure Rust, no system `protoc`), writes the
//! encoded descriptor set for server reflection, and generates the tonic server and client.
use std::path::PathBuf;

use protox::prost::Message as _;

/// The messages whose `Debug` is written by hand in `src/proto_debug.rs`.
const REDACTED_DEBUG: [&str; 3] = [
    ".chatcli.v1.SendPromptRequest",
    ".chatcli.v1.StreamPromptRequest",
    ".chatcli.v1.SessionMessage",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=src/config/types.rs");
    write_config_docs()?;
    let fds = protox::compile(["chatcli/v1/chatcli.proto"], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("chatcli_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Messages that carry credentials get a hand-written `Debug` that redacts them
        // (src/proto_debug.rs), so a `{:?}` of a request never prints a caller's key.
        .skip_debug(REDACTED_DEBUG)
        // `skip_debug` of a message reaches its nested types too; this enum holds no secret.
        .type_attribute(".chatcli.v1.SessionMessage.Type", "#[derive(Debug)]")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}

/// Extracts, from the typed config, every struct field with its type and its doc
/// comment, for `chatcli config example` (the doc comments are the reference; this keeps the example
/// generated from them instead of written twice).
fn write_config_docs() -> Result<(), Box<dyn std::error::Error>> {
    let src = std::fs::read_to_string("src/config/types.rs")?;
    let mut out = String::from(
        "/// (struct, field, type, doc comment) of every config field, in source order.\npub const FIELDS: &[(&str, &str, &str, &str)] = &[\n",
    );
    let mut current: Option<String> = None;
    let mut doc: Vec<String> = Vec::new();
    let mut skip = false;
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("pub struct ") {
            current = rest.split_whitespace().next().map(String::from);
            doc.clear();
            continue;
        }
        if line.starts_with('}') {
            current = None;
            continue;
        }
        let Some(st) = &current else { continue };
        if let Some(d) = t.strip_prefix("///") {
            doc.push(d.trim().to_string());
            continue;
        }
        if t.starts_with("#[") {
            skip |= t == "#[serde(skip)]";
            continue;
        }
        if let Some(rest) = t.strip_prefix("pub ")
            && let Some((name, ty)) = rest.split_once(':')
            && !skip
        {
            let ty = ty.trim().trim_end_matches(',');
            let text = doc.join("\n");
            out.push_str(&format!(
                "    ({st:?}, {:?}, {ty:?}, {text:?}),\n",
                name.trim()
            ));
        }
        doc.clear();
        skip = false;
    }
    out.push_str("];\n");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("config_docs.rs"), out)?;
    Ok(())
}
