//! Coalescing of deltas for callers that prefer fewer, larger messages. Deltas are only ever merged
//! whole (so a chunk can never split a UTF-8 character), only while more text is already waiting
//! (so nothing is held back to fill a chunk), and the first text delta always goes out alone.

use futures::{FutureExt, StreamExt};

use super::{Delta, DeltaStream};

/// Merges text deltas that are already available, up to about `target` bytes per chunk.
pub fn coalesce(mut upstream: DeltaStream, target: usize) -> DeltaStream {
    Box::pin(async_stream::stream! {
        let mut first = true;
        let mut pending: Option<Result<Delta, super::LlmError>> = None;
        loop {
            let item = match pending.take() {
                Some(i) => i,
                None => match upstream.next().await {
                    Some(i) => i,
                    None => break,
                },
            };
            let mut text = match item {
                Ok(Delta::Text(t)) => t,
                other => {
                    yield other;
                    continue;
                }
            };
            if !first {
                // Take what is ready now, without waiting.
                while text.len() < target {
                    match upstream.next().now_or_never() {
                        Some(Some(Ok(Delta::Text(t)))) => text.push_str(&t),
                        Some(Some(other)) => {
                            pending = Some(other);
                            break;
                        }
                        Some(None) => break,
                        None => break,
                    }
                }
            }
            first = false;
            yield Ok(Delta::Text(text));
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn texts(items: Vec<Result<Delta, super::super::LlmError>>) -> Vec<String> {
        items
            .into_iter()
            .filter_map(|i| match i {
                Ok(Delta::Text(t)) => Some(t),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn first_delta_alone_then_ready_text_merged() {
        let src: Vec<Result<Delta, _>> = ["a", "b", "c"]
            .iter()
            .map(|s| Ok(Delta::Text(s.to_string())))
            .collect();
        let out: Vec<_> = coalesce(Box::pin(futures::stream::iter(src)), 200)
            .collect()
            .await;
        assert_eq!(texts(out), vec!["a", "bc"]);
    }

    #[tokio::test]
    async fn never_waits_to_fill_a_chunk() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut out = coalesce(
            Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
            200,
        );
        tx.send(Ok(Delta::Text("one".into()))).unwrap();
        assert!(matches!(out.next().await, Some(Ok(Delta::Text(t))) if t == "one"));
        tx.send(Ok(Delta::Text(" two".into()))).unwrap();
        // Nothing else is waiting: " two" must come out now, not wait for more.
        assert!(matches!(out.next().await, Some(Ok(Delta::Text(t))) if t == " two"));
        tx.send(Ok(Delta::Usage(Default::default()))).unwrap();
        drop(tx);
        assert!(matches!(out.next().await, Some(Ok(Delta::Usage(_)))));
        assert!(out.next().await.is_none());
    }

    proptest! {
        /// CJK and emoji text with no spaces, cut into deltas at any char boundary, comes out as
        /// valid UTF-8 strings whose concatenation is the input, each chunk a concatenation of whole deltas.
        #[test]
        fn chunks_are_whole_deltas(s in "[\u{4e00}-\u{4e20}\u{1F600}-\u{1F610}a-c]{0,300}", cuts in proptest::collection::vec(1usize..7, 0..80)) {
            let chars: Vec<char> = s.chars().collect();
            let mut deltas = Vec::new();
            let mut i = 0;
            for c in cuts.iter().cycle().take(chars.len()) {
                if i >= chars.len() { break; }
                let j = (i + c).min(chars.len());
                deltas.push(chars[i..j].iter().collect::<String>());
                i = j;
            }
            if i < chars.len() { deltas.push(chars[i..].iter().collect()); }
            let src: Vec<Result<Delta, super::super::LlmError>> = deltas.iter().cloned().map(|d| Ok(Delta::Text(d))).collect();
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let out = rt.block_on(coalesce(Box::pin(futures::stream::iter(src)), 16).collect::<Vec<_>>());
            let out = texts(out);
            prop_assert_eq!(out.concat(), s);
            if let Some(first) = deltas.first() { prop_assert_eq!(&out[0], first); }
        }
    }
}
