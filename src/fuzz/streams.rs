//! The upstream stream parsers every wire format reads through: SSE
//! ([`crate::llm::http::sse_events`]: OpenAI-compatible, Anthropic, Gemini, StackSpot) and NDJSON
//! ([`crate::llm::http::ndjson_lines`]: Ollama), fed as a response body cut into arbitrary chunks.

use futures::StreamExt;
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::llm::http::{SseEvent, ndjson_lines, sse_events};

/// Inputs above this size are not generated (the property is per byte, not per size).
const MAX_INPUT: usize = 4096;

/// A response whose body arrives as `bytes` cut at `cuts` (offsets, taken modulo the length).
fn response(bytes: &[u8], cuts: &[usize]) -> reqwest::Response {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| c % (bytes.len() + 1))
        .chain([0, bytes.len()])
        .collect();
    points.sort_unstable();
    points.dedup();
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = points
        .windows(2)
        .map(|w| Ok(bytes::Bytes::copy_from_slice(&bytes[w[0]..w[1]])))
        .collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    reqwest::Response::from(http::Response::new(body))
}

/// Every item the SSE parser yields for `bytes` (errors as their message).
fn parse_sse(
    rt: &tokio::runtime::Runtime,
    bytes: &[u8],
    cuts: &[usize],
) -> Vec<Result<SseEvent, String>> {
    let events = sse_events("fuzz", response(bytes, cuts));
    rt.block_on(events.map(|r| r.map_err(|e| e.to_string())).collect())
}

fn parse_ndjson(
    rt: &tokio::runtime::Runtime,
    bytes: &[u8],
    cuts: &[usize],
) -> Vec<Result<Value, String>> {
    let lines = ndjson_lines("fuzz", response(bytes, cuts));
    rt.block_on(lines.map(|r| r.map_err(|e| e.to_string())).collect())
}

/// The bytes of `events` as an upstream writes them: `event:` when named, one `data:` line per
/// line of data, a blank line after each event.
fn encode_sse(events: &[(Option<String>, Vec<String>)]) -> Vec<u8> {
    let mut out = String::new();
    for (name, lines) in events {
        if let Some(n) = name {
            out.push_str(&format!("event: {n}\n"));
        }
        for l in lines {
            out.push_str(&format!("data: {l}\n"));
        }
        out.push('\n');
    }
    out.into_bytes()
}

/// What the parser must yield for `events`.
fn expected_sse(events: &[(Option<String>, Vec<String>)]) -> Vec<Result<SseEvent, String>> {
    events
        .iter()
        .map(|(name, lines)| {
            Ok(SseEvent {
                event: name.clone().map_or("message".into(), Into::into),
                data: lines.join("\n"),
            })
        })
        .collect()
}

/// Bounded output: the events of `input` never carry more text than the input has bytes.
fn assert_sse_bounded(input: &[u8], out: &[Result<SseEvent, String>]) {
    let produced: usize = out
        .iter()
        .map(|r| match r {
            Ok(e) => e.data.len(),
            Err(_) => 0,
        })
        .sum();
    assert!(
        produced <= input.len(),
        "{produced} bytes of data out of {} in",
        input.len()
    );
    assert!(
        out.len() <= input.len() / 6 + 1,
        "{} events out of {} bytes",
        out.len(),
        input.len()
    );
}

/// Bounded output: at most one item per line (plus the unterminated last one).
fn assert_ndjson_bounded(input: &[u8], out: &[Result<Value, String>]) {
    let lines = input.iter().filter(|b| **b == b'\n').count() + 1;
    assert!(
        out.len() <= lines,
        "{} items out of {lines} lines",
        out.len()
    );
}

fn sse_event() -> impl Strategy<Value = (Option<String>, Vec<String>)> {
    (
        proptest::option::of("[a-z_]{1,12}"),
        proptest::collection::vec("[^\r\n]{0,24}", 1..4),
    )
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[^\u{0}]{0,16}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(super::config(64))]

    #[test]
    fn sse_arbitrary_bytes_never_panic_and_stay_bounded(
        bytes in proptest::collection::vec(any::<u8>(), 0..MAX_INPUT),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let rt = super::runtime();
        let out = parse_sse(&rt, &bytes, &cuts);
        assert_sse_bounded(&bytes, &out);
    }

    #[test]
    fn sse_text_like_bytes_never_panic_and_stay_bounded(
        text in "((event|data|id|retry|:)[: ]?[a-z \\[\\]{}\"]{0,12}(\r\n|\n|\r)){0,40}",
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let rt = super::runtime();
        let out = parse_sse(&rt, text.as_bytes(), &cuts);
        assert_sse_bounded(text.as_bytes(), &out);
    }

    #[test]
    fn sse_events_round_trip_whatever_the_chunking(
        events in proptest::collection::vec(sse_event(), 0..8),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let rt = super::runtime();
        let bytes = encode_sse(&events);
        prop_assert_eq!(parse_sse(&rt, &bytes, &cuts), expected_sse(&events));
    }

    #[test]
    fn ndjson_arbitrary_bytes_never_panic_and_stay_bounded(
        bytes in proptest::collection::vec(any::<u8>(), 0..MAX_INPUT),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let rt = super::runtime();
        let out = parse_ndjson(&rt, &bytes, &cuts);
        assert_ndjson_bounded(&bytes, &out);
    }

    #[test]
    fn ndjson_lines_round_trip_whatever_the_chunking(
        values in proptest::collection::vec(json_value(), 0..8),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
        final_newline in any::<bool>(),
    ) {
        let rt = super::runtime();
        let mut text = values.iter().map(Value::to_string).collect::<Vec<_>>().join("\n");
        if final_newline && !values.is_empty() {
            text.push('\n');
        }
        let out = parse_ndjson(&rt, text.as_bytes(), &cuts);
        prop_assert_eq!(out, values.into_iter().map(Ok).collect::<Vec<_>>());
    }
}

/// The corpus, whole and cut into one-byte chunks (the worst case of a slow upstream), through
/// both parsers: no panic, bounded output, and the same items whatever the chunking.
#[test]
fn stream_corpus() {
    let rt = super::runtime();
    for (name, bytes) in super::corpus("streams") {
        let every_byte: Vec<usize> = (0..bytes.len()).collect();
        let whole = parse_sse(&rt, &bytes, &[]);
        assert_sse_bounded(&bytes, &whole);
        assert_eq!(
            whole,
            parse_sse(&rt, &bytes, &every_byte),
            "{name}: SSE depends on chunking"
        );
        let whole = parse_ndjson(&rt, &bytes, &[]);
        assert_ndjson_bounded(&bytes, &whole);
        assert_eq!(
            whole,
            parse_ndjson(&rt, &bytes, &every_byte),
            "{name}: NDJSON depends on chunking"
        );
    }
}
