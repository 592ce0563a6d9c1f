//! The PROXY protocol (HAProxy's; version 2 binary and version 1 text) on the main listener. With
//! `server.proxy_protocol = true` every accepted connection must start with a PROXY header, which
//! the connection's own task reads before TLS and HTTP, within [`HEADER_TIMEOUT`]; a connection
//! without a valid one is closed. The header's source address travels with the connection and
//! names the client only when the TCP peer is in `server.trusted_proxies`
//! ([`super::forwarded::client_of`]).
//!
//! Exactly the header's bytes are read, never more, so what follows (a TLS ClientHello, an HTTP
//! request) is left in the socket for the next layer: a version 2 header says its length in its
//! first 16 bytes, and a version 1 line (at most 107 bytes) is read up to its line feed. Parsing
//! is `ppp`'s.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest wait for the whole header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The first bytes of a version 1 header.
const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest version 1 header, CRLF included (the specification's limit).
const V1_MAX: usize = 107;
/// The fixed part of a version 2 header: signature, version and command, family and protocol,
/// length.
const V2_FIXED: usize = 16;

/// Why a connection was closed before anything else was read from it.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// Nothing, or not a whole header, within the timeout.
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    /// The connection failed or ended inside the header.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
    /// The connection does not start with a PROXY protocol header.
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    /// It starts like one, but the header is not valid.
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(String),
}

/// The accept loop's step: when `enabled`, the source address of the PROXY header at the start of
/// `stream` ([`read_header`] within [`HEADER_TIMEOUT`]); `Err` when the connection must be closed
/// (logged here, at debug level like a failed TLS handshake: anyone can open a connection).
pub async fn on_accept<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
    enabled: bool,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if !enabled {
        return Ok(None);
    }
    read_header(stream, HEADER_TIMEOUT).await.inspect_err(|e| {
        tracing::debug!(peer = %peer, error = %e, "connection closed: no valid PROXY protocol header");
    })
}

/// Reads the PROXY header at the start of `stream`, within `timeout`, and returns the source
/// address it carries: `None` for a header that carries none (version 2 `LOCAL`, as a load
/// balancer's own health checks send; `UNSPEC` or UNIX addresses; version 1 `UNKNOWN`).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    tokio::time::timeout(timeout, read(stream))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut start = [0u8; 6];
    stream.read_exact(&mut start).await?;
    if start == V1_PREFIX {
        return read_v1(stream, &start).await;
    }
    if ppp::v2::PROTOCOL_PREFIX.starts_with(&start) {
        return read_v2(stream, &start).await;
    }
    Err(ProxyHeaderError::Missing)
}

/// The rest of a version 1 line, byte by byte up to its line feed (the line is short and arrives
/// at once; reading more could swallow the bytes of the next layer).
async fn read_v1<S: AsyncRead + Unpin>(
    stream: &mut S,
    start: &[u8],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut line = start.to_vec();
    while line.last() != Some(&b'\n') {
        if line.len() >= V1_MAX {
            return Err(ProxyHeaderError::Invalid(format!(
                "version 1 header longer than {V1_MAX} bytes"
            )));
        }
        line.push(stream.read_u8().await?);
    }
    let text = std::str::from_utf8(&line)
        .map_err(|_| ProxyHeaderError::Invalid("version 1 header is not text".into()))?;
    let header =
        ppp::v1::Header::try_from(text).map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    })
}

/// The rest of a version 2 header: its fixed part, then exactly the length it announces.
async fn read_v2<S: AsyncRead + Unpin>(
    stream: &mut S,
    start: &[u8],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = vec![0u8; V2_FIXED];
    buf[..start.len()].copy_from_slice(start);
    stream.read_exact(&mut buf[start.len()..]).await?;
    let length = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    buf.resize(V2_FIXED + length, 0);
    stream.read_exact(&mut buf[V2_FIXED..]).await?;
    let header = ppp::v2::Header::try_from(buf.as_slice())
        .map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
    if header.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    const NEXT: &[u8] = b"\x16\x03\x01 the ClientHello that follows";

    /// A version 2 header: version/command byte, family/protocol byte, then the address block.
    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut h = SIG.to_vec();
        h.push(command);
        h.push(family);
        h.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        h.extend_from_slice(block);
        h
    }

    fn ipv4_block(src: [u8; 4], src_port: u16) -> Vec<u8> {
        let mut b = src.to_vec();
        b.extend_from_slice(&[127, 0, 0, 1]);
        b.extend_from_slice(&src_port.to_be_bytes());
        b.extend_from_slice(&50051u16.to_be_bytes());
        b
    }

    /// Reads the header from `bytes` followed by [`NEXT`]; checks that [`NEXT`] is left unread.
    async fn parse(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
        let mut input = bytes.to_vec();
        input.extend_from_slice(NEXT);
        let mut reader = input.as_slice();
        let result = read_header(&mut reader, Duration::from_secs(5)).await;
        if result.is_ok() {
            assert_eq!(reader, NEXT, "the bytes after the header were consumed");
        }
        result
    }

    #[tokio::test]
    async fn version_2_gives_the_source_and_reads_nothing_more() {
        let got = parse(&v2(0x21, 0x11, &ipv4_block([198, 51, 100, 20], 4242))).await;
        assert_eq!(got.unwrap(), Some("198.51.100.20:4242".parse().unwrap()));

        let mut block = "2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec();
        block.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        block.extend_from_slice(&[0x1f, 0x90, 0xc3, 0x53]);
        let got = parse(&v2(0x21, 0x21, &block)).await;
        assert_eq!(got.unwrap(), Some("[2001:db8::7]:8080".parse().unwrap()));

        // TLVs after the addresses (here a NOOP and an authority) are read and skipped.
        let mut block = ipv4_block([203, 0, 113, 1], 1);
        block.extend_from_slice(&[0x04, 0x00, 0x02, 0xaa, 0xbb]);
        block.extend_from_slice(&[0x02, 0x00, 0x03, b'a', b'.', b'b']);
        let got = parse(&v2(0x21, 0x11, &block)).await;
        assert_eq!(got.unwrap(), Some("203.0.113.1:1".parse().unwrap()));
    }

    #[tokio::test]
    async fn version_2_without_an_address_gives_none() {
        // LOCAL (a load balancer's health check), with or without an address block.
        assert_eq!(parse(&v2(0x20, 0x00, &[])).await.unwrap(), None);
        let block = ipv4_block([198, 51, 100, 20], 4242);
        assert_eq!(parse(&v2(0x20, 0x11, &block)).await.unwrap(), None);
        // PROXY with UNSPEC, or with UNIX addresses.
        assert_eq!(parse(&v2(0x21, 0x00, &[])).await.unwrap(), None);
        assert_eq!(parse(&v2(0x21, 0x31, &[0u8; 216])).await.unwrap(), None);
    }

    #[tokio::test]
    async fn version_1_gives_the_source_and_reads_nothing_more() {
        let got = parse(b"PROXY TCP4 198.51.100.21 127.0.0.1 5555 50051\r\n").await;
        assert_eq!(got.unwrap(), Some("198.51.100.21:5555".parse().unwrap()));
        let got = parse(b"PROXY TCP6 2001:db8::9 ::1 6666 50051\r\n").await;
        assert_eq!(got.unwrap(), Some("[2001:db8::9]:6666".parse().unwrap()));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").await.unwrap(), None);
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
                .await
                .unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn malformed_headers_are_refused() {
        let block = ipv4_block([198, 51, 100, 20], 4242);
        for (what, bytes) in [
            ("version 3", v2(0x31, 0x11, &block)),
            ("unknown command", v2(0x2f, 0x11, &block)),
            ("unknown family", v2(0x21, 0x41, &block)),
            ("unknown protocol", v2(0x21, 0x13, &block)),
            (
                "length shorter than the IPv4 block",
                v2(0x21, 0x11, &block[..8]),
            ),
            ("length shorter than the IPv6 block", v2(0x21, 0x21, &block)),
        ] {
            let got = parse(&bytes).await;
            assert!(
                matches!(got, Err(ProxyHeaderError::Invalid(_))),
                "{what}: {got:?}"
            );
        }
        for (what, line) in [
            (
                "bad address",
                &b"PROXY TCP4 198.51.100.300 127.0.0.1 1 2\r\n"[..],
            ),
            ("bad port", b"PROXY TCP4 198.51.100.3 127.0.0.1 70000 2\r\n"),
            (
                "unknown protocol",
                b"PROXY UDP4 198.51.100.3 127.0.0.1 1 2\r\n",
            ),
            ("no CR", b"PROXY TCP4 198.51.100.3 127.0.0.1 1 2\n"),
            ("not text", b"PROXY TCP4 \xff\xfe 127.0.0.1 1 2\r\n"),
        ] {
            let got = parse(line).await;
            assert!(
                matches!(got, Err(ProxyHeaderError::Invalid(_))),
                "{what}: {got:?}"
            );
        }
        // A line that never ends is cut at the specification's limit.
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        let got = parse(&long).await;
        assert!(matches!(got, Err(ProxyHeaderError::Invalid(_))), "{got:?}");
    }

    #[tokio::test]
    async fn connections_that_do_not_start_with_a_header_are_refused() {
        for bytes in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"proxy TCP4 198.51.100.3 127.0.0.1 1 2\r\n",
        ] {
            let got = read_header(&mut &bytes[..], Duration::from_secs(5)).await;
            assert!(matches!(got, Err(ProxyHeaderError::Missing)), "{got:?}");
        }
    }

    #[tokio::test]
    async fn truncated_headers_are_refused() {
        let full = v2(0x21, 0x11, &ipv4_block([198, 51, 100, 20], 4242));
        for cut in [0, 3, 6, 12, 15, 16, 20, full.len() - 1] {
            let got = read_header(&mut &full[..cut], Duration::from_secs(5)).await;
            assert!(
                matches!(got, Err(ProxyHeaderError::Io(_))),
                "cut at {cut}: {got:?}"
            );
        }
        let line = b"PROXY TCP4 198.51.100.21 127.0.0.1 5555 50051\r";
        let got = read_header(&mut &line[..], Duration::from_secs(5)).await;
        assert!(matches!(got, Err(ProxyHeaderError::Io(_))), "{got:?}");
    }

    #[tokio::test]
    async fn a_header_that_does_not_come_in_time_is_refused() {
        let (mut client, mut server) = tokio::io::duplex(64);
        // Half a header, then nothing while the connection stays open.
        client.write_all(&SIG[..8]).await.unwrap();
        let got = read_header(&mut server, Duration::from_millis(50)).await;
        assert!(matches!(got, Err(ProxyHeaderError::Timeout(_))), "{got:?}");
        drop(client);
    }
}
