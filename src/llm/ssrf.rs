//! The SSRF guard for URLs a client supplies (`provider_config.base_url` and friends).
//! (stub: being written)

/// The policy.
#[derive(Debug, Default)]
pub struct SsrfPolicy {}
