//! Operator use cases: the status report (what `GET /status` and the interactive `/status`
//! command show) and the reload of the configuration (`POST /admin/reload`, the `/reload`
//! command), which only admins may ask for.
//!
//! The reloader belongs to the server; the core reaches it through [`Reload`], so the core never
//! depends on the server.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use super::{Error, Gateway};
use crate::auth::{Principal, Role};
use crate::llm::fallback::CooldownInfo;

/// What the configuration reloader answers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigStatus {
    /// Incremented by every reload that changed something (1 at start).
    pub generation: u64,
    /// SHA-256 of the config files and every file they point to, as last loaded.
    pub config_hash: String,
    /// The problems of the last failed reload, when the last attempt failed.
    pub last_error: Option<String>,
    /// Settings changed on disk that take effect only after a restart.
    pub restart_needed: Vec<String>,
}

/// How a reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// A new generation is serving.
    Applied(u64),
    /// Nothing changed on disk.
    Unchanged(u64),
}

impl Reloaded {
    /// The generation serving now.
    pub fn generation(self) -> u64 {
        match self {
            Reloaded::Applied(g) | Reloaded::Unchanged(g) => g,
        }
    }
}

/// The future of [`Reload::reload`].
pub type ReloadFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Reloaded, Vec<String>>> + Send + 'a>>;

/// The server's configuration reloader, as the core sees it.
pub trait Reload: Send + Sync {
    /// Its state.
    fn status(&self) -> ConfigStatus;
    /// Re-reads the configuration now; `trigger` names who asked, for the log. The problems of a
    /// refused configuration, one each.
    fn reload<'a>(&'a self, trigger: &'a str) -> ReloadFuture<'a>;
}

/// Reloads the configuration for `who` (admins only); `reloader` is `None` when the server was
/// not started from config files.
pub async fn reload(
    who: &Principal,
    reloader: Option<&dyn Reload>,
    trigger: &str,
) -> Result<Reloaded, Error> {
    if who.role != Role::Admin {
        return Err(Error::PermissionDenied("reload is for admins".into()));
    }
    let reloader = reloader.ok_or(Error::ReloadUnavailable)?;
    reloader
        .reload(trigger)
        .await
        .map_err(|problems| Error::ReloadFailed { problems })
}

/// How one provider is doing.
#[derive(Debug, Clone)]
pub struct ProviderStatus {
    /// Its name.
    pub name: String,
    /// Its kind (`openai`, `anthropic`, …).
    pub kind: &'static str,
    /// Its default model.
    pub default_model: String,
    /// Its cooldown, when the fallback chain skips it for now.
    pub cooldown: Option<CooldownInfo>,
    /// Why its start-up check failed, when it did.
    pub unready: Option<String>,
}

impl ProviderStatus {
    /// `cooling_down`, `unready` or `ok`.
    pub fn state(&self) -> &'static str {
        match (&self.cooldown, &self.unready) {
            (Some(_), _) => "cooling_down",
            (None, Some(_)) => "unready",
            (None, None) => "ok",
        }
    }
}

/// The providers' side of the status: defaults, the fallback chain, every provider's state and
/// the cooldowns running, with the reloader's state.
#[derive(Debug, Clone)]
pub struct StatusReport {
    /// The default provider, when there is one.
    pub default_provider: Option<String>,
    /// The default model.
    pub default_model: String,
    /// The fallback chain (empty without one).
    pub fallback: Vec<String>,
    /// Every configured provider, in the registry's order.
    pub providers: Vec<ProviderStatus>,
    /// Every cooldown running now (per provider or per model).
    pub cooldowns: Vec<CooldownInfo>,
    /// The reloader's state, when the server was started from config files.
    pub config: Option<ConfigStatus>,
}

impl Gateway<'_> {
    /// The status report; `unready` holds the providers whose start-up check failed.
    pub fn status(
        &self,
        unready: &BTreeMap<String, String>,
        reloader: Option<&dyn Reload>,
    ) -> StatusReport {
        let reg = self.registry;
        let cooldowns = self.cooldowns.snapshot();
        let providers = reg
            .providers()
            .iter()
            .map(|p| {
                let name = p.name();
                ProviderStatus {
                    name: name.to_string(),
                    kind: p.kind().as_str(),
                    default_model: p.default_model().to_string(),
                    cooldown: cooldowns
                        .iter()
                        .find(|c| c.provider.eq_ignore_ascii_case(name))
                        .cloned(),
                    unready: unready.get(name).cloned(),
                }
            })
            .collect();
        StatusReport {
            default_provider: reg.default_provider().map(|p| p.name().to_string()),
            default_model: reg.default_model(),
            fallback: reg.fallback().chain.clone(),
            providers,
            cooldowns,
            config: reloader.map(Reload::status),
        }
    }
}
