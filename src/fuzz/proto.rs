//! Hostile gRPC messages through the server's decode path: tonic's request [`Streaming`] (the
//! 5-byte frame header, the message-size limit, gzip) with the prost codec, as the generated
//! service code decodes every request. Properties: no panic, a frame over the limit is refused
//! from its header, before its body is buffered (tonic answers `OUT_OF_RANGE` there), a decoded message re-encodes to at most about
//! its input's size, and messages round-trip.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, CompressionEncoding, Streaming};

use crate::proto::{ChatMessage, MessageMeta, SessionDataV2, SessionMessage, StreamPromptRequest};

/// The limit the fuzzed decoder enforces (the server's is `server.max_recv_msg_size`).
const LIMIT: usize = 64 * 1024;

/// One gRPC frame: compressed flag, big-endian length, payload.
fn frame(compressed: bool, declared_len: u32, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(u8::from(compressed));
    b.put_u32(declared_len);
    b.put_slice(payload);
    b.freeze()
}

/// Every message of a request body decoded as `T`, up to the first error.
fn decode_all<T>(rt: &tokio::runtime::Runtime, body: Bytes) -> Result<Vec<T>, tonic::Status>
where
    T: Message + Default + Send + 'static,
{
    let mut codec = tonic_prost::ProstCodec::<T, T>::default();
    let body = http_body_util::Full::new(body);
    let mut stream = Streaming::new_request(
        codec.decoder(),
        body,
        Some(CompressionEncoding::Gzip),
        Some(LIMIT),
    );
    rt.block_on(async move {
        let mut out = Vec::new();
        while let Some(m) = stream.message().await? {
            out.push(m);
        }
        Ok(out)
    })
}

/// A decoded message is no bigger re-encoded than twice its payload (a negative `int32` written
/// as a 5-byte varint re-encodes as 10 bytes; nothing else grows), and decodes back to itself.
fn assert_bounded_and_stable<T: Message + Default + PartialEq + std::fmt::Debug>(payload: &[u8]) {
    if let Ok(m) = T::decode(payload) {
        let again = m.encode_to_vec();
        assert!(
            again.len() <= 2 * payload.len() + 16,
            "{} bytes from {}",
            again.len(),
            payload.len()
        );
        assert_eq!(T::decode(again.as_slice()).unwrap(), m);
    }
}

fn fuzz_payload(rt: &tokio::runtime::Runtime, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap();
    let body = frame(false, len, payload);
    let _ = decode_all::<StreamPromptRequest>(rt, body.clone());
    let _ = decode_all::<SessionMessage>(rt, body.clone());
    let _ = decode_all::<SessionDataV2>(rt, body);
    let _ = decode_all::<StreamPromptRequest>(rt, frame(true, len, payload));
    assert_bounded_and_stable::<StreamPromptRequest>(payload);
    assert_bounded_and_stable::<SessionMessage>(payload);
    assert_bounded_and_stable::<SessionDataV2>(payload);
}

fn chat_message() -> impl Strategy<Value = ChatMessage> {
    (
        "[a-z]{0,10}",
        ".{0,40}",
        proptest::option::of((any::<bool>(), any::<i32>(), "[a-z]{0,6}")),
    )
        .prop_map(|(role, content, meta)| ChatMessage {
            role,
            content,
            meta: meta.map(|(is_summary, summary_of, mode)| MessageMeta {
                is_summary,
                summary_of,
                mode,
            }),
        })
}

fn stream_prompt_request() -> impl Strategy<Value = StreamPromptRequest> {
    (
        ".{0,80}",
        proptest::collection::vec(chat_message(), 0..4),
        any::<i32>(),
        "[a-z]{0,10}",
        proptest::collection::hash_map("[a-z_]{1,8}", ".{0,10}", 0..3),
    )
        .prop_map(|(prompt, history, max_tokens, model, provider_config)| {
            StreamPromptRequest {
                prompt,
                history,
                max_tokens,
                model,
                provider_config,
                ..StreamPromptRequest::default()
            }
        })
}

proptest! {
    #![proptest_config(super::config(128))]

    #[test]
    fn random_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let rt = super::runtime();
        fuzz_payload(&rt, &payload);
    }

    #[test]
    fn mutated_messages_never_panic(
        request in stream_prompt_request(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let rt = super::runtime();
        let mut payload = request.encode_to_vec();
        for (at, byte) in edits {
            if !payload.is_empty() {
                let i = at % payload.len();
                payload[i] = byte;
            }
        }
        payload.truncate(cut % (payload.len() + 1));
        fuzz_payload(&rt, &payload);
    }

    #[test]
    fn random_request_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let rt = super::runtime();
        let _ = decode_all::<StreamPromptRequest>(&rt, Bytes::from(body));
    }

    #[test]
    fn frames_over_the_limit_are_refused_from_their_header(
        declared in (LIMIT as u32 + 1)..=u32::MAX,
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        compressed in any::<bool>(),
    ) {
        let rt = super::runtime();
        let err = decode_all::<StreamPromptRequest>(&rt, frame(compressed, declared, &payload)).unwrap_err();
        prop_assert_eq!(err.code(), Code::OutOfRange);
    }

    #[test]
    fn requests_round_trip_through_the_decode_path(requests in proptest::collection::vec(stream_prompt_request(), 1..4)) {
        let rt = super::runtime();
        let mut body = BytesMut::new();
        for r in &requests {
            let bytes = r.encode_to_vec();
            body.put_slice(&frame(false, u32::try_from(bytes.len()).unwrap(), &bytes));
        }
        let decoded = decode_all::<StreamPromptRequest>(&rt, body.freeze()).unwrap();
        prop_assert_eq!(decoded, requests);
    }
}

/// Corpus: each file is a message payload (framed here), run through every decoder.
#[test]
fn proto_corpus() {
    let rt = super::runtime();
    for (_name, payload) in super::corpus("proto") {
        fuzz_payload(&rt, &payload);
    }
}
