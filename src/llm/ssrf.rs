//! The SSRF guard for URLs a client supplies (`provider_config.base_url` and friends): a client must
//! not be able to make the gateway call into the network it runs in. URLs from the server's own
//! config are trusted and never pass through here.
//!
//! What is refused: every scheme but `https` (and `http` when the operator sets
//! `CHATCLI_ALLOW_HTTP_PROVIDERS=true`); known cloud-metadata host names (refused before any DNS
//! lookup); host names that do not resolve (a refusal, not a pass); and any URL whose host is, or
//! resolves to even one address that is, not a public unicast address: IPv4 `0/8`, loopback
//! `127/8`, private `10/8` `172.16/12` `192.168/16`, link-local `169.254/16`, CGNAT `100.64/10`,
//! IETF `192.0.0/24`, benchmarking `198.18/15`, documentation nets (refused: no provider lives
//! there), multicast, reserved `240/4` and broadcast; IPv6 `::`, `::1`, unique-local `fc00::/7`,
//! link-local, site-local, multicast, documentation, `2001::/23` (Teredo, ORCHID, benchmarking) and
//! everything outside `2000::/3`. IPv6 forms that carry an IPv4 address (mapped `::ffff:a.b.c.d`,
//! compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged by that IPv4 address,
//! so `::ffff:8.8.8.8` passes and `::ffff:127.0.0.1` does not. The operator's allowlist (host
//! names, `*.` wildcards, CIDRs, single addresses) lets e.g. a team's Ollama box on a private
//! address through; cloud-metadata names and addresses stay refused even then.
//!
//! Why the connection is pinned: checking a name and then letting the HTTP client resolve it again
//! leaves a window in which the name's DNS answer can change to an internal address (DNS
//! rebinding). [`SsrfPolicy::guarded_client`] therefore hands the addresses it checked to the
//! client (`HttpOptions.pin`), which connects to those and never looks the name up itself; the
//! client follows no redirects, since a redirect target was never checked.

use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use reqwest::Url;

use super::error::LlmError;
use super::http::{self, HttpOptions};

/// Longest wait for a DNS answer; the system resolver can otherwise retry for a long time.
const DNS_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest URL text shown in an error (a client may send anything).
const SHOWN_MAX_CHARS: usize = 200;

/// Host names of cloud metadata services, refused without a DNS lookup: GCE
/// (`metadata.google.internal`, and its short name `metadata`), EC2 (`instance-data`), Tencent
/// Cloud, Rancher. Azure's IMDS has no name (only 169.254.169.254). Any other name that resolves
/// to a metadata address is caught by the address check.
const METADATA_HOSTS: &[&str] = &[
    "metadata.google.internal",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.tencentyun.com",
    "rancher-metadata",
];

/// Metadata and credential endpoints, refused even when the allowlist covers them: the shared IMDS
/// address (AWS, GCP, Azure, OCI, OpenStack…), AWS ECS task credentials, EKS Pod Identity, Alibaba,
/// Azure WireServer, Oracle Cloud Classic, and the AWS and GCP IPv6 metadata addresses.
const METADATA_ADDRS: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x23)),
    IpAddr::V6(Ipv6Addr::new(0xfd20, 0x00ce, 0, 0, 0, 0, 0, 0x254)),
];

/// Which client-supplied URLs the gateway may call. The default allows https to public addresses
/// only.
#[derive(Debug, Clone, Default)]
pub struct SsrfPolicy {
    allow_http: bool,
    /// Lower-case names without a trailing dot; `*.suffix` matches any name below `suffix`.
    allow_hosts: Vec<String>,
    allow_nets: Vec<IpNet>,
}

impl SsrfPolicy {
    /// A policy; `allow` entries are host names (exact, case-insensitive, optional `*.` wildcard
    /// prefix matching names below the suffix, not the suffix itself) or CIDRs / single IPs
    /// (`10.1.0.0/16`, `192.168.1.20`, `fd12::/16`, `[fd12::1]`). The error names the bad entry.
    pub fn new(allow_http: bool, allow: &[String]) -> Result<Self, String> {
        let mut policy = Self {
            allow_http,
            ..Self::default()
        };
        for raw in allow {
            let entry = raw.trim();
            let bad = |why: &str| format!("invalid SSRF allowlist entry `{raw}`: {why}");
            let unbracketed = entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .unwrap_or(entry);
            let net = unbracketed
                .parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| unbracketed.parse::<IpAddr>().map(IpNet::from));
            if let Ok(net) = net {
                if let Some(ip) = METADATA_ADDRS.iter().find(|ip| net == IpNet::from(**ip)) {
                    return Err(bad(&format!(
                        "{ip} is a cloud metadata address and cannot be allowed"
                    )));
                }
                policy.allow_nets.push(net);
                continue;
            }
            let host = host_pattern(entry).map_err(bad)?;
            if METADATA_HOSTS.contains(&host.as_str()) {
                return Err(bad("a cloud metadata host name cannot be allowed"));
            }
            policy.allow_hosts.push(host);
        }
        Ok(policy)
    }

    /// Checks the scheme and, for IP literals, the address (for names: the metadata names);
    /// returns the parsed URL. Names are resolved and checked by [`Self::resolve_checked`].
    pub fn check_url(&self, url: &str) -> Result<Url, LlmError> {
        let parsed = Url::parse(url.trim())
            .map_err(|e| refused(&shown_raw(url), format!("not a valid URL ({e})")))?;
        self.check_parsed(&parsed)?;
        Ok(parsed)
    }

    /// Resolves the host, checks every resolved address (one refused address refuses the URL, since
    /// the client may connect to any of them) and returns the addresses. A name that does not
    /// resolve is refused.
    pub async fn resolve_checked(&self, url: &Url) -> Result<Vec<SocketAddr>, LlmError> {
        self.check_parsed(url)?;
        let shown = shown(url);
        let port = url
            .port_or_known_default()
            .ok_or_else(|| refused(&shown, "the URL has no port"))?;
        let name = match url_host(url) {
            // Literal addresses were checked by `check_parsed`.
            Some(UrlHost::Ip(ip)) => return Ok(vec![SocketAddr::new(ip, port)]),
            Some(UrlHost::Name(d)) => d,
            None => return Err(refused(&shown, "the URL has no host")),
        };
        let found = tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((name, port)))
            .await
            .map_err(|_| {
                refused(
                    &shown,
                    format!(
                        "cannot resolve host {name}: no answer within {}s",
                        DNS_TIMEOUT.as_secs()
                    ),
                )
            })?
            .map_err(|e| refused(&shown, format!("cannot resolve host {name}: {e}")))?;
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for a in found {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        if addrs.is_empty() {
            return Err(refused(
                &shown,
                format!("cannot resolve host {name}: no addresses"),
            ));
        }
        let name_allowed = self.host_allowed(name);
        for a in &addrs {
            let ip = a.ip();
            let reason = if name_allowed {
                metadata_reason(ip)
            } else {
                self.is_refused_ip(ip)
            };
            if let Some(reason) = reason {
                return Err(refused(
                    &shown,
                    format!("{name} resolves to {ip}, {reason}"),
                ));
            }
        }
        Ok(addrs)
    }

    /// [`Self::check_url`] + [`Self::resolve_checked`] + a client that connects to the checked
    /// addresses only. Use the client for this URL's host only: another host would be looked up
    /// without a check.
    pub async fn guarded_client(&self, url: &str) -> Result<(reqwest::Client, Url), LlmError> {
        let parsed = self.check_url(url)?;
        let addrs = self.resolve_checked(&parsed).await?;
        let client = pinned_client(&parsed, addrs)?;
        Ok((client, parsed))
    }

    /// Whether an address is refused under this policy: `Some(reason)` ("a loopback address", …)
    /// when it is. Cloud-metadata addresses are refused even when the allowlist covers them.
    pub fn is_refused_ip(&self, ip: IpAddr) -> Option<&'static str> {
        if let Some(reason) = metadata_reason(ip) {
            return Some(reason);
        }
        let judged = judged_ip(ip);
        if self
            .allow_nets
            .iter()
            .any(|n| n.contains(&ip) || n.contains(&judged))
        {
            return None;
        }
        ip_reason(ip)
    }

    fn check_parsed(&self, url: &Url) -> Result<(), LlmError> {
        let shown = shown(url);
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(refused(
                    &shown,
                    "http is not allowed (set CHATCLI_ALLOW_HTTP_PROVIDERS=true)",
                ));
            }
            other => {
                let allowed = if self.allow_http {
                    "https or http"
                } else {
                    "https"
                };
                return Err(refused(
                    &shown,
                    format!("scheme `{other}` is not allowed (only {allowed})"),
                ));
            }
        }
        match url_host(url) {
            None => Err(refused(&shown, "the URL has no host")),
            Some(UrlHost::Name(d)) => {
                let name = normalize_host(d);
                if METADATA_HOSTS.contains(&name.as_str()) {
                    return Err(refused(
                        &shown,
                        format!("{d} is a cloud metadata host name"),
                    ));
                }
                Ok(())
            }
            Some(UrlHost::Ip(ip)) => self.check_literal(&shown, ip),
        }
    }

    fn check_literal(&self, shown: &str, ip: IpAddr) -> Result<(), LlmError> {
        match self.is_refused_ip(ip) {
            Some(reason) => Err(refused(shown, format!("{ip} is {reason}"))),
            None => Ok(()),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.allow_hosts
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(suffix) => host
                    .strip_suffix(suffix)
                    .is_some_and(|below| below.len() > 1 && below.ends_with('.')),
                None => host == *pattern,
            })
    }
}

/// A client for `url` whose host name is pinned to `addrs` (a literal address needs no pin: the
/// client connects to it as written).
fn pinned_client(url: &Url, addrs: Vec<SocketAddr>) -> Result<reqwest::Client, LlmError> {
    let pin = match url_host(url) {
        Some(UrlHost::Name(d)) => Some((d.to_string(), addrs)),
        _ => None,
    };
    http::client(&HttpOptions {
        pin,
        ..HttpOptions::default()
    })
}

/// A URL's host: an address literal or a name (reqwest does not re-export `url::Host`).
enum UrlHost<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

fn url_host(url: &Url) -> Option<UrlHost<'_>> {
    let host = url.host_str().filter(|h| !h.is_empty())?;
    // The URL parser has already turned every IPv4 spelling (`0x7f.1`, `2130706433`, …) into
    // dotted decimal and bracketed IPv6, so a host that does not parse as an address is a name.
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(match literal.parse::<IpAddr>() {
        Ok(ip) => UrlHost::Ip(ip),
        Err(_) => UrlHost::Name(host),
    })
}

fn refused(shown: &str, why: impl Display) -> LlmError {
    LlmError::InvalidRequest(format!("refused URL {shown}: {why}"))
}

/// The URL as shown in errors: scheme, host, port and (for http/https) path; never the user info
/// (passwords), the query (keys) or the fragment. Other schemes may carry anything in their path,
/// so it is left out.
fn shown(url: &Url) -> String {
    let Some(host) = url.host_str() else {
        return format!("{}:…", url.scheme());
    };
    let mut s = format!("{}://{host}", url.scheme());
    if let Some(port) = url.port() {
        s.push_str(&format!(":{port}"));
    }
    if matches!(url.scheme(), "http" | "https") {
        s.push_str(url.path());
    }
    clip(&s)
}

/// Best-effort [`shown`] for text that is not a URL: cut at `?`/`#` and drop everything up to the
/// last `@` after the scheme, so a password in malformed input is not echoed either.
fn shown_raw(raw: &str) -> String {
    let raw = raw.trim();
    let raw = raw.split(['?', '#']).next().unwrap_or_default();
    let (scheme, rest) = match raw.find("://") {
        Some(i) => raw.split_at(i + 3),
        None => ("", raw),
    };
    let rest = rest.rsplit('@').next().unwrap_or_default();
    clip(&format!("{scheme}{rest}"))
}

fn clip(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(SHOWN_MAX_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > SHOWN_MAX_CHARS {
        out.push('…');
    }
    out
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Validates an allowlist host name (`*.` prefix allowed) and returns it normalized.
fn host_pattern(entry: &str) -> Result<String, &'static str> {
    if entry.is_empty() {
        return Err("empty entry");
    }
    let name = normalize_host(entry);
    let (wildcard, base) = match name.strip_prefix("*.") {
        Some(base) => (true, base),
        None => (false, name.as_str()),
    };
    if base.is_empty() || base.len() > 253 {
        return Err("not a host name, CIDR or IP address");
    }
    for label in base.split('.') {
        let ok_chars = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if label.is_empty() || label.len() > 63 || !ok_chars {
            return Err(
                "not a host name, CIDR or IP address (write internationalized names as xn--)",
            );
        }
    }
    Ok(if wildcard {
        format!("*.{base}")
    } else {
        base.to_string()
    })
}

fn metadata_reason(ip: IpAddr) -> Option<&'static str> {
    let judged = judged_ip(ip);
    METADATA_ADDRS
        .iter()
        .any(|m| *m == ip || *m == judged)
        .then_some("a cloud metadata address")
}

/// The address a connection to `ip` really reaches when it carries an IPv4 address (mapped,
/// compatible, NAT64 well-known prefix, 6to4); otherwise `ip` itself.
fn judged_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if !v6.is_unspecified() && !v6.is_loopback() => {
            embedded_v4(v6).map_or(ip, IpAddr::V4)
        }
        _ => ip,
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match v6.segments() {
        // IPv4-mapped ::ffff:a.b.c.d and IPv4-compatible ::a.b.c.d (deprecated, still routed by
        // some stacks).
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => Some(tail),
        // NAT64 well-known prefix (RFC 6052): the gateway forwards to the embedded address.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        // 6to4 (RFC 3056): the relay forwards to the embedded address.
        [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        _ => None,
    }
}

/// Why an address is not a public unicast address, ignoring any allowlist.
fn ip_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => v4_reason(v4),
            None => v6_reason(v6),
        },
    }
}

fn v4_reason(v4: Ipv4Addr) -> Option<&'static str> {
    let o = v4.octets();
    let reason = if o[0] == 0 {
        "an unspecified (\"this network\") address"
    } else if v4.is_loopback() {
        "a loopback address"
    } else if v4.is_private() {
        "a private address"
    } else if v4.is_link_local() {
        "a link-local address"
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        "a carrier-grade NAT (shared) address"
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        "an IETF protocol-assignment address"
    } else if v4.is_documentation() {
        "a documentation address"
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        "a benchmarking address"
    } else if v4.is_broadcast() {
        "the broadcast address"
    } else if v4.is_multicast() {
        "a multicast address"
    } else if o[0] >= 240 {
        "a reserved address"
    } else {
        return None;
    };
    Some(reason)
}

fn v6_reason(v6: Ipv6Addr) -> Option<&'static str> {
    let s = v6.segments();
    let reason = if s[0] & 0xff00 == 0xff00 {
        "a multicast address"
    } else if s[0] & 0xffc0 == 0xfe80 {
        "a link-local address"
    } else if s[0] & 0xffc0 == 0xfec0 {
        "a site-local address"
    } else if s[0] & 0xfe00 == 0xfc00 {
        "a unique-local address"
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        "a local-use NAT64 address"
    } else if s[0] == 0x100 && s[1] == 0 && s[2] == 0 && s[3] == 0 {
        "a discard-only address"
    } else if s[0] & 0xe000 != 0x2000 {
        "outside the IPv6 global unicast range 2000::/3"
    } else if s[0] == 0x2001 && s[1] < 0x200 {
        "an IETF protocol-assignment address (Teredo, ORCHID, benchmarking)"
    } else if (s[0] == 0x2001 && s[1] == 0xdb8) || (s[0] == 0x3fff && s[1] < 0x1000) {
        "a documentation address"
    } else {
        return None;
    };
    Some(reason)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn policy(allow_http: bool, allow: &[&str]) -> SsrfPolicy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        SsrfPolicy::new(allow_http, &allow).unwrap()
    }

    fn message(e: LlmError) -> String {
        match e {
            LlmError::InvalidRequest(m) => m,
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    /// `None` = allowed by `check_url`; `Some(text)` = refused with `text` in the message.
    const TABLE: &[(&str, Option<&str>)] = &[
        (
            "http://169.254.169.254/",
            Some("169.254.169.254 is a cloud metadata address"),
        ),
        (
            "http://169.254.169.254/latest/meta-data/",
            Some("cloud metadata"),
        ),
        ("http://[::ffff:169.254.169.254]/", Some("cloud metadata")),
        ("http://[fd00:ec2::254]/", Some("cloud metadata")),
        ("http://[fd20:ce::254]/", Some("cloud metadata")),
        ("https://100.100.100.200/", Some("cloud metadata")),
        ("https://168.63.129.16/", Some("cloud metadata")),
        (
            "http://[::ffff:127.0.0.1]/",
            Some("::ffff:127.0.0.1 is a loopback address"),
        ),
        ("https://[::127.0.0.1]/", Some("a loopback address")),
        (
            "https://127.0.0.1:11434/",
            Some("127.0.0.1 is a loopback address"),
        ),
        ("https://127.8.9.10/", Some("a loopback address")),
        (
            "https://2130706433/",
            Some("127.0.0.1 is a loopback address"),
        ),
        ("https://0x7f.1/", Some("127.0.0.1 is a loopback address")),
        ("https://[::1]:8080/", Some("::1 is a loopback address")),
        ("https://0.0.0.0/", Some("unspecified")),
        ("https://[::]/", Some("the unspecified address")),
        ("https://10.0.0.1", Some("10.0.0.1 is a private address")),
        ("https://172.16.5.4", Some("a private address")),
        ("https://172.31.255.255", Some("a private address")),
        ("https://172.32.0.1", None),
        ("https://192.168.1.1", Some("a private address")),
        ("https://169.254.1.1", Some("a link-local address")),
        (
            "https://100.64.0.1",
            Some("100.64.0.1 is a carrier-grade NAT (shared) address"),
        ),
        ("https://100.127.255.255", Some("carrier-grade NAT")),
        ("https://100.128.0.1", None),
        ("https://192.0.0.8", Some("IETF protocol-assignment")),
        ("https://192.0.2.1", Some("a documentation address")),
        ("https://203.0.113.9", Some("a documentation address")),
        ("https://198.18.0.1", Some("a benchmarking address")),
        ("https://198.19.255.1", Some("a benchmarking address")),
        ("https://224.0.0.1", Some("a multicast address")),
        ("https://240.0.0.1", Some("a reserved address")),
        ("https://255.255.255.255", Some("the broadcast address")),
        (
            "https://[fd00::1]",
            Some("fd00::1 is a unique-local address"),
        ),
        ("https://[fc00::1]", Some("a unique-local address")),
        ("https://[fe80::1]/", Some("a link-local address")),
        ("https://[fec0::1]/", Some("a site-local address")),
        ("https://[ff02::1]/", Some("a multicast address")),
        ("https://[100::1]/", Some("a discard-only address")),
        (
            "https://[64:ff9b:1::a00:1]/",
            Some("a local-use NAT64 address"),
        ),
        ("https://[64:ff9b::a00:1]/", Some("a private address")),
        ("https://[64:ff9b::808:808]/", None),
        ("https://[2002:7f00:1::]/", Some("a loopback address")),
        ("https://[2002:808:808::1]/", None),
        ("https://[2001::1]/", Some("IETF protocol-assignment")),
        ("https://[2001:db8::1]/", Some("a documentation address")),
        ("https://[3fff::1]/", Some("a documentation address")),
        (
            "https://[4000::1]/",
            Some("outside the IPv6 global unicast range"),
        ),
        ("https://[2001:4860:4860::8888]/", None),
        ("https://8.8.8.8", None),
        ("https://8.8.8.8:8443/v1/chat", None),
        ("https://[::ffff:8.8.8.8]/", None),
        ("https://[::8.8.8.8]/", None),
        (
            "https://metadata.google.internal/",
            Some("metadata.google.internal is a cloud metadata host name"),
        ),
        (
            "https://METADATA.Google.Internal./computeMetadata/v1/",
            Some("cloud metadata host name"),
        ),
        ("https://metadata/", Some("cloud metadata host name")),
        (
            "https://instance-data/latest/",
            Some("cloud metadata host name"),
        ),
        ("https://api.example.com/v1", None),
        ("ftp://x", Some("scheme `ftp` is not allowed")),
        ("file:///etc/passwd", Some("scheme `file` is not allowed")),
        (
            "gopher://8.8.8.8:70/",
            Some("scheme `gopher` is not allowed"),
        ),
        ("data:text/plain,hi", Some("scheme `data` is not allowed")),
        ("not a url", Some("not a valid URL")),
        ("https://exa mple.com/", Some("not a valid URL")),
        ("https://", Some("not a valid URL")),
        ("", Some("not a valid URL")),
    ];

    #[test]
    fn check_url_follows_the_table() {
        // http allowed here so that the address checks, not the scheme, decide.
        let p = policy(true, &[]);
        for (url, want) in TABLE {
            match (p.check_url(url), want) {
                (Ok(_), None) => {}
                (Ok(u), Some(why)) => panic!("{url} was allowed ({u}); expected refusal: {why}"),
                (Err(e), None) => panic!("{url} was refused: {e}"),
                (Err(e), Some(why)) => {
                    let m = message(e);
                    assert!(m.starts_with("refused URL "), "{url}: {m}");
                    assert!(m.contains(why), "{url}: `{m}` does not say `{why}`");
                }
            }
        }
    }

    #[test]
    fn http_is_refused_unless_allowed() {
        let strict = SsrfPolicy::default();
        let m = message(strict.check_url("http://8.8.8.8").unwrap_err());
        assert_eq!(
            m,
            "refused URL http://8.8.8.8/: http is not allowed (set CHATCLI_ALLOW_HTTP_PROVIDERS=true)"
        );
        assert!(strict.check_url("https://8.8.8.8").is_ok());
        let m = message(strict.check_url("ftp://x").unwrap_err());
        assert!(m.contains("(only https)"), "{m}");
        let lax = policy(true, &[]);
        let url = lax.check_url("http://8.8.8.8:8080/v1").unwrap();
        assert_eq!(url.as_str(), "http://8.8.8.8:8080/v1");
    }

    #[test]
    fn allowlisted_private_addresses_pass() {
        let p = policy(
            false,
            &["10.1.0.0/16", "192.168.7.9", "[fd12::1]", "169.254.0.0/16"],
        );
        assert!(p.check_url("https://10.1.2.3:11434").is_ok());
        assert!(p.check_url("https://[::ffff:10.1.2.3]/").is_ok());
        assert!(p.check_url("https://192.168.7.9/").is_ok());
        assert!(p.check_url("https://[fd12::1]/").is_ok());
        assert!(p.check_url("https://169.254.1.1/").is_ok());
        let m = message(p.check_url("https://10.2.0.1").unwrap_err());
        assert!(m.contains("10.2.0.1 is a private address"), "{m}");
        assert!(p.check_url("https://192.168.7.10/").is_err());
        assert!(p.check_url("https://[fd12::2]/").is_err());
        // The allowlist never opens a metadata address, even inside an allowed range.
        let m = message(p.check_url("https://169.254.169.254/").unwrap_err());
        assert!(m.contains("cloud metadata"), "{m}");
        assert!(p.is_refused_ip("10.1.200.1".parse().unwrap()).is_none());
        assert_eq!(
            SsrfPolicy::default().is_refused_ip("10.1.200.1".parse().unwrap()),
            Some("a private address")
        );
    }

    #[test]
    fn host_entries_match_names_and_wildcards() {
        let p = policy(
            false,
            &["Ollama.Team.Example.", "*.corp.example", "localhost"],
        );
        assert!(p.host_allowed("ollama.team.example"));
        assert!(p.host_allowed("ollama.team.example."));
        assert!(!p.host_allowed("x.ollama.team.example"));
        assert!(p.host_allowed("a.corp.example"));
        assert!(p.host_allowed("B.A.CORP.EXAMPLE"));
        assert!(!p.host_allowed("corp.example"));
        assert!(!p.host_allowed("evilcorp.example"));
        assert!(!p.host_allowed("corp.example.evil"));
        assert!(p.host_allowed("localhost"));
        assert!(!SsrfPolicy::default().host_allowed("localhost"));
    }

    #[test]
    fn bad_allowlist_entries_are_named() {
        for entry in [
            "10.0.0.0/33",
            "exa mple.com",
            "*.",
            "",
            "   ",
            "http://x",
            "a..b",
            "*",
            "169.254.169.254",
            "[fd00:ec2::254]",
            "metadata.google.internal",
        ] {
            let err = SsrfPolicy::new(false, &[entry.to_string()]).unwrap_err();
            assert!(
                err.contains(&format!("`{entry}`")),
                "{entry:?}: error does not name the entry: {err}"
            );
        }
    }

    #[test]
    fn refusals_never_show_user_info_or_query() {
        let p = SsrfPolicy::default();
        let m = message(
            p.check_url("https://alice:s3cr3t@10.0.0.1/v1?key=k3y#frag")
                .unwrap_err(),
        );
        assert_eq!(
            m,
            "refused URL https://10.0.0.1/v1: 10.0.0.1 is a private address"
        );
        let m = message(
            p.check_url("http://alice:s3cr3t@8.8.8.8/?key=k3y")
                .unwrap_err(),
        );
        assert!(
            !m.contains("s3cr3t") && !m.contains("alice") && !m.contains("k3y"),
            "{m}"
        );
        // Malformed input is not echoed with its password or query either.
        for raw in [
            "https://alice:s3cr3t@exa mple.com/?key=k3y",
            "https://alice:s3/cr3t@[::1/?key=k3y",
        ] {
            let m = message(p.check_url(raw).unwrap_err());
            assert!(m.contains("not a valid URL"), "{m}");
            assert!(
                !m.contains("s3cr3t") && !m.contains("cr3t") && !m.contains("k3y"),
                "{m}"
            );
        }
        // Parses as an opaque URL of scheme `alice`: refused for its scheme, its path not shown.
        let m = message(p.check_url("alice:s3cr3t@host?key=k3y").unwrap_err());
        assert_eq!(
            m,
            "refused URL alice:…: scheme `alice` is not allowed (only https)"
        );
        let m = message(p.check_url("ftp://bob:s3cr3t@x/s3cr3t").unwrap_err());
        assert_eq!(
            m,
            "refused URL ftp://x: scheme `ftp` is not allowed (only https)"
        );
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_are_refused() {
        let p = SsrfPolicy::default();
        // The name itself is not on any list: only the resolved address refuses it.
        let url = p.check_url("https://localhost:1234").unwrap();
        let m = message(p.resolve_checked(&url).await.unwrap_err());
        assert!(
            m.starts_with("refused URL https://localhost:1234/: localhost resolves to "),
            "{m}"
        );
        assert!(m.contains("a loopback address"), "{m}");
        assert!(p.guarded_client("https://localhost:1234").await.is_err());
    }

    #[tokio::test]
    async fn allowlisted_names_resolve_to_their_addresses() {
        let p = policy(false, &["localhost"]);
        let url = p.check_url("https://localhost:1234/v1").unwrap();
        let addrs = p.resolve_checked(&url).await.unwrap();
        assert!(!addrs.is_empty());
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 1234),
            "{addrs:?}"
        );
    }

    #[tokio::test]
    async fn unresolvable_names_are_refused() {
        // `.invalid` never resolves (RFC 6761); offline the lookup fails the same way.
        let p = SsrfPolicy::default();
        let url = p
            .check_url("https://no-such-host.invalid/v1?key=k3y")
            .unwrap();
        let m = message(p.resolve_checked(&url).await.unwrap_err());
        assert!(
            m.starts_with(
                "refused URL https://no-such-host.invalid/v1: cannot resolve host no-such-host.invalid"
            ),
            "{m}"
        );
    }

    #[tokio::test]
    async fn metadata_names_are_refused_without_dns() {
        let p = SsrfPolicy::default();
        let url = Url::parse("https://metadata.google.internal/computeMetadata/v1/").unwrap();
        // resolve_checked re-checks the URL it is given, so no lookup happens.
        let m = message(p.resolve_checked(&url).await.unwrap_err());
        assert!(
            m.contains("metadata.google.internal is a cloud metadata host name"),
            "{m}"
        );
    }

    /// Accepts one connection, reads the request head, answers 204 and returns the head.
    async fn answer_one(listener: &TcpListener) -> String {
        let (mut sock, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("no connection arrived")
            .unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed before sending a request");
            head.extend_from_slice(&buf[..n]);
        }
        sock.write_all(
            b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        String::from_utf8_lossy(&head).into_owned()
    }

    #[tokio::test]
    async fn guarded_client_connects_to_an_allowlisted_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = policy(true, &["127.0.0.1"]);
        let (client, url) = p
            .guarded_client(&format!("http://127.0.0.1:{port}/api/tags"))
            .await
            .unwrap();
        let request = tokio::spawn(async move { client.get(url).send().await });
        let head = answer_one(&listener).await;
        assert!(head.starts_with("GET /api/tags HTTP/1.1\r\n"), "{head}");
        assert_eq!(request.await.unwrap().unwrap().status().as_u16(), 204);
    }

    #[tokio::test]
    async fn guarded_client_connects_to_an_allowlisted_name() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = policy(true, &["localhost"]);
        let (client, url) = p
            .guarded_client(&format!("http://localhost:{port}/"))
            .await
            .unwrap();
        let request = tokio::spawn(async move { client.get(url).send().await });
        answer_one(&listener).await;
        assert_eq!(request.await.unwrap().unwrap().status().as_u16(), 204);
    }

    #[tokio::test]
    async fn refused_urls_send_no_packet() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = policy(true, &[]);
        for url in [
            format!("http://127.0.0.1:{port}/"),
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            format!("http://localhost:{port}/"),
        ] {
            let m = message(p.guarded_client(&url).await.unwrap_err());
            assert!(m.contains("loopback"), "{url}: {m}");
        }
        // Nothing connected: the refusal came before any connection attempt.
        let nothing = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(nothing.is_err(), "a refused URL reached the listener");
    }

    #[tokio::test]
    async fn pinned_client_never_looks_the_name_up() {
        // `.invalid` cannot resolve, so reaching the listener proves the client used the pinned
        // address and did no lookup of its own.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let url = Url::parse(&format!("http://pinned.invalid:{}/v1", addr.port())).unwrap();
        let client = pinned_client(&url, vec![addr]).unwrap();
        let request = tokio::spawn(async move { client.get(url).send().await });
        let head = answer_one(&listener).await.to_ascii_lowercase();
        assert!(
            head.contains(&format!("host: pinned.invalid:{}", addr.port())),
            "{head}"
        );
        assert_eq!(request.await.unwrap().unwrap().status().as_u16(), 204);
    }

    #[test]
    fn embedded_ipv4_forms_are_judged_by_the_ipv4_address() {
        let p = SsrfPolicy::default();
        for (ip, refused) in [
            ("::ffff:8.8.8.8", false),
            ("::ffff:127.0.0.1", true),
            ("::ffff:10.0.0.1", true),
            ("64:ff9b::8.8.8.8", false),
            ("64:ff9b::192.168.0.1", true),
            ("2002:0808:0808::", false),
            ("2002:0a00:0001::", true),
            ("::1", true),
            ("::", true),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(p.is_refused_ip(ip).is_some(), refused, "{ip}");
        }
    }
}
