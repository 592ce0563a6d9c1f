//! Who the client is when the TCP peer is a proxy: `server.trusted_proxies` names the proxies
//! (addresses or CIDRs) whose word on the client's address is taken, and [`client_of`] reads that
//! word from the PROXY protocol header of the connection and from `Forwarded: for=` (RFC 7239) or
//! `X-Forwarded-For`, on HTTP and in gRPC metadata alike (both are HTTP headers).
//!
//! The rule, for every request: start at the TCP peer. While the current hop is a trusted proxy,
//! step to the address it names: first the source of the PROXY protocol header, then the
//! forwarding header's entries from right to left (each proxy appends the address of its own
//! peer). The first address that is not a trusted proxy is the client; when every entry is
//! trusted, the left-most one is. An entry that is not an address (`unknown`, an obfuscated
//! `_name`, garbage) ends the walk at the hop before it. Headers from a peer that is not trusted
//! are never read, so a caller cannot choose its own address by sending them.
//!
//! A proxy appends to the header it writes and passes the other one through as the caller sent
//! it. So when a request carries both headers and they name different clients, one of them was
//! written by the caller and there is no telling which: neither is believed, and the client is
//! the last trusted hop (the proxy). Legitimate callers do not send both; one that does gets the
//! proxy's address, which is shared with nobody who behaves.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName};

const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

pub use crate::config::TrustedProxies;

/// The client of a request: its address, its port when known, and whether a trusted proxy named
/// it (rather than it being the TCP peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    /// The client's IP address (IPv4-mapped IPv6 shown as IPv4).
    pub ip: IpAddr,
    /// Its port, when the hop that named it said (the TCP peer's, the PROXY header's, a
    /// `Forwarded: for="192.0.2.7:4711"`).
    pub port: Option<u16>,
    /// A trusted proxy named it: it is not the TCP peer.
    pub forwarded: bool,
}

impl ClientAddr {
    /// The TCP peer as the client.
    pub fn peer(peer: SocketAddr) -> Self {
        Self {
            ip: peer.ip().to_canonical(),
            port: Some(peer.port()),
            forwarded: false,
        }
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => SocketAddr::new(self.ip, port).fmt(f),
            None => self.ip.fmt(f),
        }
    }
}

/// The client of a request from `peer`, given the source address of the connection's PROXY
/// protocol header (`proxied`) and the request's headers; see the module docs for the rule.
pub fn client_of(
    trusted: &TrustedProxies,
    peer: SocketAddr,
    proxied: Option<SocketAddr>,
    headers: &HeaderMap,
) -> ClientAddr {
    let mut client = ClientAddr::peer(peer);
    if trusted.is_empty() || !trusted.contains(client.ip) {
        return client;
    }
    if let Some(source) = proxied {
        client = ClientAddr {
            forwarded: true,
            ..ClientAddr::peer(source)
        };
        if !trusted.contains(client.ip) {
            return client;
        }
    }
    let by_forwarded = headers
        .contains_key(&FORWARDED)
        .then(|| walk(trusted, client, forwarded_for(headers)));
    let by_xff = headers
        .contains_key(&X_FORWARDED_FOR)
        .then(|| walk(trusted, client, x_forwarded_for(headers)));
    match (by_forwarded, by_xff) {
        (Some(a), Some(b)) if a.ip != b.ip => client,
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => client,
    }
}

/// Walks `entries` (left to right as sent) from the right, starting at the trusted hop `from`.
fn walk(trusted: &TrustedProxies, from: ClientAddr, entries: Vec<Option<Node>>) -> ClientAddr {
    let mut client = from;
    for entry in entries.into_iter().rev() {
        let Some(node) = entry else { break };
        client = ClientAddr {
            ip: node.ip.to_canonical(),
            port: node.port,
            forwarded: true,
        };
        if !trusted.contains(client.ip) {
            break;
        }
    }
    client
}

/// One hop's address as a forwarding header names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Node {
    ip: IpAddr,
    port: Option<u16>,
}

/// Every value of `name`, in order, as one comma-separated list.
fn joined(headers: &HeaderMap, name: &HeaderName) -> String {
    let mut out = String::new();
    for v in headers.get_all(name) {
        if !out.is_empty() {
            out.push(',');
        }
        // A value that is not ASCII text is kept as one entry that is not an address.
        out.push_str(v.to_str().unwrap_or("?"));
    }
    out
}

/// The entries of `X-Forwarded-For`: each an address, optionally with a port.
fn x_forwarded_for(headers: &HeaderMap) -> Vec<Option<Node>> {
    joined(headers, &X_FORWARDED_FOR)
        .split(',')
        .map(|e| node(e.trim()))
        .collect()
}

/// The `for=` of each element of `Forwarded` (RFC 7239 §4); an element without one gives `None`.
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<Node>> {
    split_unquoted(&joined(headers, &FORWARDED), ',')
        .into_iter()
        .map(|element| {
            split_unquoted(element, ';').into_iter().find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| node(&unquote(value.trim())))
            })?
        })
        .collect()
}

/// `text` split on `sep` outside double-quoted strings (which may hold `\"`).
fn split_unquoted(text: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// A token or a quoted-string (RFC 7230 §3.2.6) as its text.
fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// An address as forwarding headers write it: `192.0.2.7`, `192.0.2.7:4711`, `[2001:db8::1]`,
/// `[2001:db8::1]:4711`, or a bare `2001:db8::1`. Anything else (`unknown`, `_hidden`) is `None`.
fn node(text: &str) -> Option<Node> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(Node { ip, port: None });
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let ip = ip.parse::<IpAddr>().ok().filter(IpAddr::is_ipv6)?;
        let port = match after {
            "" => None,
            // An obfuscated port (`:_abc`) leaves the port unknown.
            p => Some(p.strip_prefix(':')?.parse::<u16>().ok()),
        };
        return Some(Node {
            ip,
            port: port.flatten(),
        });
    }
    let (ip, port) = text.rsplit_once(':')?;
    let ip = ip.parse::<IpAddr>().ok().filter(IpAddr::is_ipv4)?;
    Some(Node {
        ip,
        port: port.parse::<u16>().ok(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn trusted(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, value.parse().unwrap());
        }
        h
    }

    const PEER: &str = "10.0.0.1:40000";

    fn client(t: &TrustedProxies, pairs: &[(&'static str, &str)]) -> String {
        client_of(t, PEER.parse().unwrap(), None, &headers(pairs)).to_string()
    }

    #[test]
    fn entries_are_addresses_or_cidrs() {
        let t = trusted(&["10.0.0.0/8", "192.0.2.7", " 2001:db8::/32 ", "192.0.2.9/24"]);
        assert!(t.contains("10.200.1.1".parse().unwrap()));
        assert!(t.contains("192.0.2.7".parse().unwrap()));
        assert!(!t.contains("192.0.3.7".parse().unwrap()));
        assert!(t.contains("2001:db8:5::1".parse().unwrap()));
        // A host part in a CIDR is ignored; IPv4-mapped IPv6 counts as IPv4.
        assert!(t.contains("192.0.2.200".parse().unwrap()));
        assert!(t.contains("::ffff:10.1.2.3".parse().unwrap()));
        let errors =
            TrustedProxies::parse(&["10.0.0.0/8".into(), "ten".into(), "1.2.3.4/33".into()])
                .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("server.trusted_proxies.1: `ten`"),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("server.trusted_proxies.2:"),
            "{errors:?}"
        );
        assert!(TrustedProxies::parse(&[]).unwrap().is_empty());
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client_whatever_the_headers_say() {
        let spoof = [
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
        ];
        assert_eq!(client(&TrustedProxies::default(), &spoof), PEER);
        // A peer that is not trusted is the client too.
        assert_eq!(client(&trusted(&["192.0.2.0/24"]), &spoof), PEER);
        let c = client_of(
            &trusted(&["192.0.2.0/24"]),
            PEER.parse().unwrap(),
            Some("203.0.113.5:1".parse().unwrap()),
            &HeaderMap::new(),
        );
        assert_eq!(c, ClientAddr::peer(PEER.parse().unwrap()));
        assert!(!c.forwarded);
    }

    #[test]
    fn x_forwarded_for_gives_the_right_most_address_that_is_not_a_trusted_proxy() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            client(&t, &[("x-forwarded-for", "203.0.113.9")]),
            "203.0.113.9"
        );
        // The left-most entry is whatever the caller sent: only the right-most untrusted counts.
        assert_eq!(
            client(&t, &[("x-forwarded-for", "1.2.3.4, 203.0.113.9, 10.0.0.7")]),
            "203.0.113.9"
        );
        // Several header lines are one list, in order.
        assert_eq!(
            client(
                &t,
                &[
                    ("x-forwarded-for", "1.2.3.4"),
                    ("x-forwarded-for", "203.0.113.9,10.0.0.7")
                ]
            ),
            "203.0.113.9"
        );
        // Every entry trusted: the left-most.
        assert_eq!(
            client(&t, &[("x-forwarded-for", "10.0.0.9, 10.0.0.7")]),
            "10.0.0.9"
        );
        // An entry that is not an address ends the walk at the last trusted hop.
        assert_eq!(
            client(&t, &[("x-forwarded-for", "203.0.113.9, unknown")]),
            PEER
        );
        assert_eq!(
            client(&t, &[("x-forwarded-for", "203.0.113.9, garbage, 10.0.0.7")]),
            "10.0.0.7"
        );
        assert_eq!(client(&t, &[("x-forwarded-for", "")]), PEER);
        // Ports and IPv6 forms.
        assert_eq!(
            client(&t, &[("x-forwarded-for", "203.0.113.9:5555")]),
            "203.0.113.9:5555"
        );
        assert_eq!(
            client(&t, &[("x-forwarded-for", "2001:db8::1")]),
            "2001:db8::1"
        );
        assert_eq!(
            client(&t, &[("x-forwarded-for", "[2001:db8::1]:443")]),
            "[2001:db8::1]:443"
        );
        assert_eq!(
            client(&t, &[("x-forwarded-for", "::ffff:203.0.113.9")]),
            "203.0.113.9"
        );
        let c = client_of(
            &t,
            PEER.parse().unwrap(),
            None,
            &headers(&[("x-forwarded-for", "203.0.113.9")]),
        );
        assert!(c.forwarded);
        assert_eq!(c.port, None);
    }

    #[test]
    fn forwarded_for_is_read_per_rfc_7239() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            client(&t, &[("forwarded", "for=203.0.113.9")]),
            "203.0.113.9"
        );
        assert_eq!(
            client(
                &t,
                &[(
                    "forwarded",
                    r#"for=1.2.3.4, For="[2001:db8:cafe::17]:4711";proto=https;by=10.0.0.7, for=10.0.0.8"#
                )]
            ),
            "[2001:db8:cafe::17]:4711"
        );
        assert_eq!(
            client(
                &t,
                &[("forwarded", r#"proto=http;for="203.0.113.9:80";host="a,b""#)]
            ),
            "203.0.113.9:80"
        );
        // Obfuscated, unknown, or no `for`: the walk ends at the last trusted hop.
        for value in [
            "for=_hidden",
            "for=unknown",
            "proto=https",
            r#"for="[2001:db8::1"#,
            "for=203.0.113.9:notaport",
        ] {
            let got = client(&t, &[("forwarded", value)]);
            assert!(got == PEER || got == "203.0.113.9", "{value}: {got}");
        }
        assert_eq!(client(&t, &[("forwarded", "for=unknown")]), PEER);
        assert_eq!(
            client(&t, &[("forwarded", r#"for="[2001:db8::1]:_port""#)]),
            "2001:db8::1"
        );
    }

    #[test]
    fn two_headers_that_disagree_are_both_ignored() {
        let t = trusted(&["10.0.0.0/8"]);
        // A proxy that writes X-Forwarded-For passes a caller's own Forwarded through.
        assert_eq!(
            client(
                &t,
                &[
                    ("x-forwarded-for", "203.0.113.9"),
                    ("forwarded", "for=198.51.100.1")
                ]
            ),
            PEER
        );
        // A proxy that writes both says the same in each.
        assert_eq!(
            client(
                &t,
                &[
                    ("x-forwarded-for", "1.1.1.1, 203.0.113.9"),
                    ("forwarded", "for=203.0.113.9")
                ]
            ),
            "203.0.113.9"
        );
    }

    #[test]
    fn the_proxy_protocol_source_is_one_more_hop() {
        let t = trusted(&["10.0.0.0/8"]);
        let peer: SocketAddr = PEER.parse().unwrap();
        let spoof = headers(&[("x-forwarded-for", "1.2.3.4")]);
        // A load balancer in front names the client: headers the client sent are not read.
        let c = client_of(&t, peer, Some("203.0.113.9:5000".parse().unwrap()), &spoof);
        assert_eq!(c.to_string(), "203.0.113.9:5000");
        assert!(c.forwarded);
        // It names a trusted proxy (an ingress behind it): that one's header is read.
        let c = client_of(&t, peer, Some("10.9.9.9:5000".parse().unwrap()), &spoof);
        assert_eq!(c.to_string(), "1.2.3.4");
    }

    #[test]
    fn splitting_respects_quotes() {
        assert_eq!(split_unquoted(r#"a="x,y",b"#, ','), vec![r#"a="x,y""#, "b"]);
        assert_eq!(
            split_unquoted(r#"a="x\",y",b"#, ','),
            vec![r#"a="x\",y""#, "b"]
        );
        assert_eq!(unquote(r#""a\"b""#), r#"a"b"#);
        assert_eq!(unquote("plain"), "plain");
    }
}
