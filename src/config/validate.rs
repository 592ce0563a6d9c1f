//! Validation of a typed config: every problem is collected (with its key and origin) so an operator
//! fixes them all in one pass. Settings that parse but have no effect yet are warnings.

use std::collections::HashSet;

use figment::Figment;

use super::types::{Config, LimitsConfig};
use super::{Problem, origin};
use crate::llm::ProviderKind;

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
    for key in ["server.tls.cert_file", "server.tls.client_ca_file"] {
        let set = match key {
            "server.tls.cert_file" => tls.cert_file.is_some(),
            _ => tls.client_ca_file.is_some(),
        };
        if set {
            bad(
                key,
                "TLS and mTLS serving are not in this build yet (issue #6); unset it to serve plaintext".into(),
            );
        }
    }
    let jwt = &config.auth.jwt;
    if jwt.secret.is_some() || jwt.issuer.is_some() || !jwt.audience.is_empty() {
        bad(
            "auth.jwt",
            "JWT authentication is not in this build yet (issue #6); refusing to start without the protection asked for".into(),
        );
    }
    if let Some(t) = &config.auth.token
        && t.expose().trim().is_empty()
    {
        bad("auth.token", "is empty".into());
    }
    if let Err(e) = crate::telemetry::validate_level(&config.log.level) {
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
    out
}

/// Settings that are accepted (for compatibility) but have no effect in this build yet.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    let mut later = |what: &str, issue: &str| {
        w.push(format!("{what} has no effect yet: it waits for {issue}"));
    };
    let l = &config.limits;
    let d = LimitsConfig::default();
    if l.rate_limit_rps != d.rate_limit_rps || l.rate_limit_burst != d.rate_limit_burst {
        later(
            "limits.rate_limit_*",
            "issue #6 (per-principal rate limits)",
        );
    }
    if config.audit.path.is_some() {
        later("audit.path", "issue #6 (audit log)");
    }
    if config.server.allow_no_auth {
        later("server.allow_no_auth", "issue #6 (auth)");
    }
    if config.watcher.deployment.is_some() || config.watcher.config_file.is_some() {
        later(
            "the Kubernetes watcher (watcher.*)",
            "the watcher capability (not scheduled yet)",
        );
    }
    if config.catalog.mcp_config.is_some() {
        later(
            "catalog.mcp_config",
            "the catalog capability (not scheduled yet)",
        );
    }
    w
}
