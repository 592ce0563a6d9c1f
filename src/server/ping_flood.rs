//! The HTTP/2 ping-flood guard: a connection's byte stream is read as HTTP/2 frames (only when it
//! starts with the HTTP/2 preface; HTTP/1 and anything else pass through untouched) and its PING
//! frames counted: a client that sends more than [`MAX_PINGS_PER_SECOND`] in a second, and no
//! other frame between them, has its connection ended. Any other frame starts the count again,
//! so the pings gRPC clients send to size their flow-control window (each after a DATA frame,
//! with WINDOW_UPDATEs between them) never count as a flood. The guard
//! cancels the connection's token, so the connection sends GOAWAY as it does when draining, stops
//! reading the client's frames and, after [`FLOOD_GRACE`] for the GOAWAY to go out, ends.
//!
//! hyper's HTTP/2 layer answers each PING with a pong and, while a pong is unsent, reads no more,
//! so a flood costs no memory; but it never ends the connection, and every ping costs a pong.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// PING frames a client may send in one second; a keep-alive needs one every few seconds.
pub const MAX_PINGS_PER_SECOND: u32 = 50;

/// How long a flooding connection has, after its GOAWAY is queued, before it is closed.
pub const FLOOD_GRACE: Duration = Duration::from_millis(500);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// What the guard knows of the stream so far.
enum Mode {
    /// Matching the HTTP/2 preface; this many bytes of it matched.
    Preface(usize),
    /// Not HTTP/2: passed through.
    Plain,
    /// HTTP/2 frames: the frame header read so far, and payload bytes left to skip.
    Frames {
        head: [u8; 9],
        have: usize,
        skip: usize,
    },
    /// Flooded: nothing more is read; the connection ends when `closing` fires.
    Flooded,
}

/// A connection's I/O with the ping-flood guard on its read side.
pub struct PingGuard<S> {
    inner: S,
    mode: Mode,
    window: Instant,
    pings: u32,
    flood: CancellationToken,
    closing: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> PingGuard<S> {
    /// `inner`, guarded; `flood` is cancelled when the client floods.
    pub fn new(inner: S, flood: CancellationToken) -> Self {
        Self {
            inner,
            mode: Mode::Preface(0),
            window: Instant::now(),
            pings: 0,
            flood,
            closing: None,
        }
    }

    /// Reads `bytes` (new bytes of the stream) as the mode says; `true` when the client flooded.
    fn scan(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match &mut self.mode {
                Mode::Plain | Mode::Flooded => return false,
                Mode::Preface(matched) => {
                    let n = bytes.len().min(PREFACE.len() - *matched);
                    if bytes[..n] != PREFACE[*matched..*matched + n] {
                        self.mode = Mode::Plain;
                        return false;
                    }
                    *matched += n;
                    bytes = &bytes[n..];
                    if *matched == PREFACE.len() {
                        self.mode = Mode::Frames {
                            head: [0; 9],
                            have: 0,
                            skip: 0,
                        };
                    }
                }
                Mode::Frames { head, have, skip } => {
                    if *skip > 0 {
                        let n = bytes.len().min(*skip);
                        *skip -= n;
                        bytes = &bytes[n..];
                        continue;
                    }
                    let n = bytes.len().min(9 - *have);
                    head[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have < 9 {
                        continue;
                    }
                    *have = 0;
                    *skip = usize::from(head[0]) << 16
                        | usize::from(head[1]) << 8
                        | usize::from(head[2]);
                    if head[3] != PING {
                        self.pings = 0;
                    } else if head[4] & ACK == 0 {
                        let now = Instant::now();
                        if now.duration_since(self.window) >= Duration::from_secs(1) {
                            self.window = now;
                            self.pings = 0;
                        }
                        self.pings += 1;
                        if self.pings > MAX_PINGS_PER_SECOND {
                            return true;
                        }
                    }
                }
            }
        }
        false
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PingGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(closing) = &mut this.closing {
            // Flooded: nothing more is read; the end of the stream once the grace is over.
            return closing.as_mut().poll(cx).map(|()| Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(this.mode, Mode::Plain) || !matches!(polled, Poll::Ready(Ok(()))) {
            return polled;
        }
        if this.scan(&buf.filled()[before..]) {
            tracing::warn!(
                pings = this.pings,
                "HTTP/2 ping flood: the connection is closed with GOAWAY"
            );
            this.mode = Mode::Flooded;
            this.flood.cancel();
            this.closing = Some(Box::pin(tokio::time::sleep(FLOOD_GRACE)));
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PingGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        out.extend_from_slice(payload);
        out
    }

    fn guard() -> PingGuard<tokio::io::Empty> {
        PingGuard::new(tokio::io::empty(), CancellationToken::new())
    }

    #[tokio::test]
    async fn pings_over_the_limit_are_a_flood_byte_by_byte_or_at_once() {
        let mut stream = PREFACE.to_vec();
        stream.extend(frame(0x4, 0, &[]));
        stream.extend(frame(0x0, 0, &[7; 300]));
        for _ in 0..MAX_PINGS_PER_SECOND {
            stream.extend(frame(PING, 0, &[0; 8]));
            stream.extend(frame(PING, ACK, &[0; 8]));
        }
        let mut whole = guard();
        assert!(!whole.scan(&stream), "pings at the limit are no flood");
        let mut bytewise = guard();
        assert!(stream.iter().all(|b| !bytewise.scan(&[*b])));
        let one_more = frame(PING, 0, &[0; 8]);
        assert!(whole.scan(&one_more));
        assert!(bytewise.scan(&one_more));
    }

    #[tokio::test]
    async fn another_frame_between_pings_starts_the_count_again() {
        let mut g = guard();
        let mut stream = PREFACE.to_vec();
        for _ in 0..10 {
            for _ in 0..MAX_PINGS_PER_SECOND {
                stream.extend(frame(PING, 0, &[0; 8]));
            }
            stream.extend(frame(0x8, 0, &[0, 0, 1, 0]));
        }
        assert!(!g.scan(&stream));
    }

    #[tokio::test]
    async fn http1_passes_through_unread() {
        let mut g = guard();
        let mut pings = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        for _ in 0..=MAX_PINGS_PER_SECOND {
            pings.extend(frame(PING, 0, &[0; 8]));
        }
        assert!(!g.scan(&pings));
        assert!(matches!(g.mode, Mode::Plain));
    }
}
