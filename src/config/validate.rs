//! Validation of a typed config: every problem is collected (with its key and origin) so an operator
//! fixes them all in one pass. Settings that parse but have no effect yet are warnings.

use std::collections::HashSet;
use std::path::Path;

use figment::Figment;

use super::ProviderKind;
use super::types::Config;
use super::{Problem, origin};

/// Every problem of `config`.
pub fn validate(config: &Config, figment: &Figment) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut bad =
        |key: &str, message: String| out.push(Problem::new(key, &origin(figment, key), &message));

    let s = &config.server;
    if s.max_recv_msg_size == 0 {
        bad("server.max_recv_msg_size", "must be greater than 0".into());
    }
    if s.max_send_msg_size == 0 {
        bad("server.max_send_msg_size", "must be greater than 0".into());
    }
    if s.max_concurrent_streams == 0 {
        bad(
            "server.max_concurrent_streams",
            "must be greater than 0".into(),
        );
    }
    if config.metrics.port != 0
        && config.metrics.port == s.port
        && (config.metrics.bind_address == s.bind_address
            || config.metrics.bind_address.is_unspecified()
            || s.bind_address.is_unspecified())
    {
        bad(
            "metrics.port",
            format!(
                "is the same port as server.port ({}); pick another or 0 to turn metrics off",
                s.port
            ),
        );
    }
    if let Err(errors) = super::TrustedProxies::parse(&s.trusted_proxies) {
        // The origin is the list's: from the environment it is one comma-separated value.
        for e in errors {
            let why = e.strip_prefix("server.trusted_proxies.").unwrap_or(&e);
            bad("server.trusted_proxies", format!("entry {why}"));
        }
    }
    if config.hub.tail_buffer == 0 {
        bad("hub.tail_buffer", "must be greater than 0".into());
    }
    if config.limits.hub_max_content_bytes == 0 {
        bad(
            "limits.hub_max_content_bytes",
            "must be greater than 0".into(),
        );
    }
    if config.limits.hub_max_field_bytes == 0 {
        bad(
            "limits.hub_max_field_bytes",
            "must be greater than 0".into(),
        );
    }
    for (key, message) in state_problems(&config.state) {
        bad(key, message);
    }
    let tls = &s.tls;
    if !matches!(tls.min_version.as_str(), "1.2" | "1.3") {
        bad(
            "server.tls.min_version",
            format!("`{}` is not \"1.2\" or \"1.3\"", tls.min_version),
        );
    }
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        let (key, missing) = match tls.cert_file {
            Some(_) => ("server.tls.cert_file", "server.tls.key_file (--tls-key)"),
            None => ("server.tls.key_file", "server.tls.cert_file (--tls-cert)"),
        };
        bad(key, format!("is set but {missing} is not; TLS needs both"));
    }
    if tls.client_ca_file.is_some() && tls.cert_file.is_none() {
        bad(
            "server.tls.client_ca_file",
            "needs server.tls.cert_file and key_file: client certificates are only asked for over TLS".into(),
        );
    }
    let auth = &config.auth;
    let any_auth = !config.auth_methods().is_empty();
    if !any_auth && !s.bind_address.is_loopback() && !s.allow_no_auth {
        bad(
            "server.bind_address",
            format!(
                "{} is not a loopback address and no authentication is configured; set a token (--token), JWT keys or a client CA, or pass --allow-no-auth (CHATCLI_ALLOW_NO_AUTH=true) to serve everyone",
                s.bind_address
            ),
        );
    }
    if (auth.jwt.issuer.is_some() || !auth.jwt.audience.is_empty())
        && auth.jwt.secret.is_none()
        && auth.jwt.public_key_file.is_none()
        && auth.jwt.jwks_file.is_none()
    {
        bad(
            "auth.jwt",
            "issuer/audience are set but no JWT key (secret, public_key_file or jwks_file) is"
                .into(),
        );
    }
    if let Some(t) = &config.auth.token
        && t.expose().trim().is_empty()
    {
        bad("auth.token", "is empty".into());
    }
    if let Err(e) = super::log_filter(&config.log.level) {
        bad(
            "log.level",
            format!("`{}` is not a valid filter: {e}", config.log.level),
        );
    }
    if config.log.max_size_mb == 0 {
        bad("log.max_size_mb", "must be greater than 0".into());
    }
    let l = &config.limits;
    if !(l.rate_limit_rps > 0.0 && l.rate_limit_rps.is_finite()) {
        bad("limits.rate_limit_rps", "must be a positive number".into());
    }
    if l.rate_limit_burst == 0 {
        bad("limits.rate_limit_burst", "must be greater than 0".into());
    }
    if l.max_prompt_bytes == 0 {
        bad("limits.max_prompt_bytes", "must be greater than 0".into());
    }

    let llm = &config.llm;
    let mut names = HashSet::new();
    for (i, p) in llm.providers.iter().enumerate() {
        let key = |k: &str| format!("llm.providers.{i}.{k}");
        if p.name.trim().is_empty() {
            bad(&key("name"), "is required".into());
        } else if !names.insert(p.name.to_ascii_lowercase()) {
            bad(
                &key("name"),
                format!("`{}` is used by another provider", p.name),
            );
        }
        match ProviderKind::parse(&p.kind) {
            Some(kind) => {
                if p.delay.is_some() && kind != ProviderKind::Echo {
                    bad(&key("delay"), "is only for the echo provider".into());
                }
                if p.discover_models && !kind.discovers_models() {
                    bad(
                        &key("discover_models"),
                        format!(
                            "`{}` upstreams have no model list (openai and its presets, \
                             anthropic, gemini and ollama do)",
                            p.kind
                        ),
                    );
                }
            }
            None => bad(
                &key("kind"),
                format!(
                    "`{}` is not one of: {}",
                    p.kind,
                    ProviderKind::NAMES.join(", ")
                ),
            ),
        }
    }
    for (i, p) in llm.providers.iter().enumerate() {
        if p.models.iter().any(|m| m.trim().is_empty()) {
            bad(
                &format!("llm.providers.{i}.models"),
                "has an empty model name".into(),
            );
        }
        if p.discover_models && p.models_refresh.is_zero() {
            bad(
                &format!("llm.providers.{i}.models_refresh"),
                "must be longer than 0s".into(),
            );
        }
    }
    let known = |n: &str| llm.providers.iter().any(|p| p.name.eq_ignore_ascii_case(n));
    if let Some(d) = &llm.default
        && !known(d)
    {
        bad("llm.default", format!("`{d}` is not a configured provider"));
    }
    for f in &llm.fallback {
        if !known(f) {
            bad(
                "llm.fallback",
                format!("`{f}` is not a configured provider"),
            );
        }
    }
    if llm.fallback_cooldown_base > llm.fallback_cooldown_max {
        bad(
            "llm.fallback_cooldown_base",
            "is longer than llm.fallback_cooldown_max".into(),
        );
    }
    let cat = &config.catalog;
    if cat.exec_timeout.is_zero() || cat.exec_timeout > std::time::Duration::from_secs(15 * 60) {
        bad(
            "catalog.exec_timeout",
            "must be longer than 0s and at most 15m".into(),
        );
    }
    if cat.max_output_bytes == 0 {
        bad("catalog.max_output_bytes", "must be greater than 0".into());
    }
    if !(1..=64).contains(&cat.mcp_max_rounds) {
        bad("catalog.mcp_max_rounds", "must be between 1 and 64".into());
    }
    for name in &cat.env_allow {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            bad(
                "catalog.env_allow",
                format!("`{name}` is not an environment variable name"),
            );
        }
    }
    out
}

/// The problems of `[state]` and `[state.redis]`, by key.
fn state_problems(state: &super::StateConfig) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let r = &state.redis;
    let urls: Vec<&str> = r
        .url
        .as_deref()
        .map(|u| {
            u.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect()
        })
        .unwrap_or_default();
    for u in &urls {
        let scheme_ok = u.starts_with("redis://") || u.starts_with("rediss://");
        let parsed = redis::IntoConnectionInfo::into_connection_info(*u);
        if !scheme_ok || parsed.is_err() {
            // The URL may carry a password: name the problem, never echo the value.
            out.push((
                "state.redis.url",
                "is not a redis:// or rediss:// URL (e.g. redis://127.0.0.1:6379/0)".to_string(),
            ));
            break;
        }
    }
    let sentinel = !r.sentinels.is_empty() || r.master_name.is_some();
    if state.backend == super::StateBackend::Redis && urls.is_empty() && !sentinel {
        out.push((
            "state.redis.url",
            "must be set when state.backend = \"redis\"".to_string(),
        ));
    }
    if !r.sentinels.is_empty() && r.master_name.is_none() {
        out.push((
            "state.redis.master_name",
            "must be set when state.redis.sentinels is".to_string(),
        ));
    }
    if r.master_name.is_some() && r.sentinels.is_empty() {
        out.push((
            "state.redis.sentinels",
            "must list the sentinels (host:port) when state.redis.master_name is set".to_string(),
        ));
    }
    if sentinel && urls.len() > 1 {
        out.push((
            "state.redis.sentinels",
            "cannot be combined with a cluster (several URLs in state.redis.url)".to_string(),
        ));
    }
    for (i, s) in r.sentinels.iter().enumerate() {
        let ok = s
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            out.push((
                "state.redis.sentinels",
                format!("entry {i}: `{s}` is not host:port"),
            ));
        }
    }
    if r.connect_timeout.is_zero() {
        out.push((
            "state.redis.connect_timeout",
            "must be greater than 0".into(),
        ));
    }
    if r.response_timeout.is_zero() {
        out.push((
            "state.redis.response_timeout",
            "must be greater than 0".into(),
        ));
    }
    if r.key_prefix
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        out.push((
            "state.redis.key_prefix",
            "may not contain whitespace or control characters".into(),
        ));
    }
    out
}

/// Static tokens shorter than this many characters are warned about: 32 characters of base64 are
/// 24 random bytes, of hex 16. Only warned: deployments that already use shorter ones keep working.
pub const MIN_TOKEN_CHARS: usize = 32;

/// A warning for each static token shorter than [`MIN_TOKEN_CHARS`]: the shared token (`auth.token`,
/// or the file of `auth.token_file`, which the loader has read into it by now) and each named
/// token given as a `file` (read here, relative names in `creds`; a file that cannot be read is
/// reported as a problem when the token table is built). A named token given as `sha256` cannot
/// be measured. The warnings never contain the tokens.
pub fn short_token_warnings(config: &Config, creds: Option<&Path>) -> Vec<String> {
    let auth = &config.auth;
    let mut w = Vec::new();
    let mut check = |setting: String, token: &str| {
        let len = token.chars().count();
        if len < MIN_TOKEN_CHARS {
            w.push(format!(
                "{setting}: the token is {len} characters long; a static token shorter than \
                 {MIN_TOKEN_CHARS} characters is easier to guess (make one with \
                 `head -c 32 /dev/urandom | base64`)"
            ));
        }
    };
    if let Some(token) = &auth.token {
        let setting = match auth.token_file {
            Some(_) => "auth.token_file",
            None => "auth.token",
        };
        check(setting.to_string(), token.expose());
    }
    for (i, t) in auth.tokens.iter().enumerate() {
        let Some(file) = &t.file else { continue };
        let path = super::credential_path(file, creds);
        if let Ok(token) = super::read_credential(&path) {
            check(format!("auth.tokens.{i}.file ({:?})", t.name), &token);
        }
    }
    w
}

/// Settings that are accepted but have no effect (in this build, or as combined).
pub fn warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if config.server.proxy_protocol && config.server.trusted_proxies.is_empty() {
        w.push(
            "server.proxy_protocol is on but server.trusted_proxies is empty: every connection \
             must start with a PROXY header, and the address it carries is never used"
                .to_string(),
        );
    }
    w
}
