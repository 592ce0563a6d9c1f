//! StackSpot AI agents: a client-credentials token from the realm's token endpoint (cached until
//! 60 s before it expires, renewed once when the agent answers 401), then the agent chat call
//! `POST {base_url}/v1/agent/{agent_id}/chat`, whose answer streams as SSE `{"message": delta}`
//! events. The agent takes one text prompt, so the conversation is rendered as text. The "model"
//! of a StackSpot provider is the agent id.
//!
//! A caller may bring its own StackSpot account (`provider_config` keys `client_id`, `client_key`,
//! `realm`, `agent_id`; URL keys `base_url`, `realm_url`, `token_url` through the SSRF guard). Its
//! token is cached in the request-scoped provider only, never in the server's cache. The
//! client-credential rule is every kind's ([`ClientCredentials::caller_url`]): a URL only with the
//! caller's own account (or a forwarded `oauth:`/`token:` access token), so the server's
//! credentials or tokens are never sent to a URL a caller chose.
//!
//! StackSpot is not a [`super::wire::WireFormat`]: its credential is an OAuth client-credentials
//! account exchanged for cached tokens at a second endpoint (renewed once on a 401), a caller may
//! replace three URLs (chat, realm, token endpoint) and the agent, and it has no model list. It
//! shares the HTTP plumbing of [`super::http`] and the rule above.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::error::{ErrorClass, LlmError};
use super::http::{self, HttpOptions};
use super::{
    ChatRequest, ClientCredentials, Delta, DeltaStream, KeyScheme, Message, Provider,
    ProviderContext, ProviderKind, Usage,
};
use crate::config::{ProviderConfig, Secret};

/// The agent inference API.
pub const DEFAULT_BASE_URL: &str = "https://genai-inference-app.stackspot.com";
/// The identity server; the token endpoint is `{this}/{realm}/oidc/oauth/token`.
pub const DEFAULT_IDM_URL: &str = "https://idm.stackspot.com";
/// The realm when the config names none (as in the existing ChatCLI).
pub const DEFAULT_REALM: &str = "zup";
/// A cached token is renewed this long before it expires, so no call starts with a token about to
/// lapse.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// The `provider_config` keys a caller may set.
const CONFIG_KEYS: &[&str] = &[
    "client_id",
    "client_key",
    "realm",
    "agent_id",
    "base_url",
    "realm_url",
    "token_url",
];
/// The `provider_config` keys that name a caller's host.
const URL_KEYS: &[&str] = &["base_url", "realm_url", "token_url"];
/// StackSpot's rate-limit error code (its 429s carry no `Retry-After`).
const RATE_LIMIT_CODE: &str = "INFERENCE_3008_CHAT_RATE_LIMIT_EXCEEDED";

/// The server's own account, kept so request-scoped copies can fill in what a caller left out.
#[derive(Clone)]
struct Account {
    client_id: String,
    client_key: Secret,
    realm: String,
    /// The configured token endpoint, when the operator set one (it then ignores the realm).
    token_url: Option<String>,
    /// The client for the operator's token endpoint and inference API.
    client: reqwest::Client,
}

impl Account {
    fn token_url_for(&self, realm: &str) -> String {
        self.token_url
            .clone()
            .unwrap_or_else(|| token_url_in(DEFAULT_IDM_URL, realm))
    }
}

fn token_url_in(idm: &str, realm: &str) -> String {
    format!("{}/{realm}/oidc/oauth/token", idm.trim_end_matches('/'))
}

/// Where the chat call's bearer token comes from.
enum Auth {
    /// Client credentials, exchanged for tokens and cached (boxed: far larger than a token).
    Tokens(Box<TokenSource>),
    /// A token the caller forwarded (`client_api_key` with `oauth:` or `token:`); never renewed.
    Fixed(Secret),
}

impl Auth {
    async fn token(&self) -> Result<Secret, LlmError> {
        match self {
            Auth::Tokens(t) => t.get().await,
            Auth::Fixed(s) => Ok(s.clone()),
        }
    }
}

struct TokenSource {
    provider: String,
    client: reqwest::Client,
    token_url: String,
    client_id: String,
    client_key: Secret,
    timeouts: http::Timeouts,
    /// Held across a fetch, so concurrent calls wait for one token instead of each fetching one.
    cache: tokio::sync::Mutex<Option<CachedToken>>,
}

struct CachedToken {
    token: Secret,
    renew_at: Instant,
}

impl TokenSource {
    async fn get(&self) -> Result<Secret, LlmError> {
        let mut slot = self.cache.lock().await;
        if let Some(c) = slot.as_ref()
            && Instant::now() < c.renew_at
        {
            return Ok(c.token.clone());
        }
        let (token, lifetime) = self.fetch().await?;
        *slot = Some(CachedToken {
            token: token.clone(),
            renew_at: Instant::now() + lifetime.saturating_sub(REFRESH_MARGIN),
        });
        Ok(token)
    }

    /// Forgets `stale` (the agent refused it); a token fetched meanwhile by another call stays.
    async fn invalidate(&self, stale: &Secret) {
        let mut slot = self.cache.lock().await;
        if slot
            .as_ref()
            .is_some_and(|c| c.token.expose() == stale.expose())
        {
            *slot = None;
        }
    }

    async fn fetch(&self) -> Result<(Secret, Duration), LlmError> {
        let body = format!(
            "grant_type=client_credentials&client_id={}&client_secret={}",
            form_encode(&self.client_id),
            form_encode(self.client_key.expose())
        );
        let rb = self
            .client
            .post(&self.token_url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body);
        let resp = http::send(&self.provider, &self.timeouts, rb, parse_token_error)
            .await
            .map_err(|e| match e {
                LlmError::Upstream(mut u) => {
                    u.message = if u.message.is_empty() {
                        "token endpoint refused the client credentials".into()
                    } else {
                        format!("token endpoint: {}", u.message)
                    };
                    LlmError::Upstream(u)
                }
                other => other,
            })?;
        let v: Value = resp
            .json()
            .await
            .map_err(|e| http::transport_error(&self.provider, &e))?;
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                LlmError::upstream(
                    &self.provider,
                    ErrorClass::Malformed,
                    "the token endpoint answered without an access_token",
                )
            })?;
        // Without a lifetime the token is used for this call only.
        let lifetime = v.get("expires_in").and_then(number).unwrap_or(0);
        Ok((Secret::new(token), Duration::from_secs(lifetime)))
    }
}

/// A configured StackSpot agent (or a request-scoped copy with a caller's account).
pub struct StackSpotProvider {
    name: String,
    /// The default agent, also this provider's default model.
    agent_id: String,
    /// In a request-scoped copy whose caller named its own agent: the server's agent id. The
    /// request's model was resolved against the server's provider, so that name means "the
    /// default", which is now the caller's agent.
    replaced_default: Option<String>,
    /// Without a trailing slash.
    base_url: String,
    chat_client: reqwest::Client,
    /// The operator's extra headers; empty for a caller-supplied URL.
    headers: HeaderMap,
    auth: Arc<Auth>,
    account: Account,
    timeouts: http::Timeouts,
    ctx: ProviderContext,
}

impl std::fmt::Debug for StackSpotProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackSpotProvider")
            .field("name", &self.name)
            .field("agent_id", &self.agent_id)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// Builds the provider from its config. `client_id`, `client_key` and `agent_id` (or `model`) are
/// required; the error lists every missing one.
pub fn build(cfg: &ProviderConfig, ctx: &ProviderContext) -> Result<Arc<dyn Provider>, LlmError> {
    Ok(Arc::new(StackSpotProvider::new(cfg, ctx)?))
}

impl StackSpotProvider {
    /// See [`build`].
    pub fn new(cfg: &ProviderConfig, ctx: &ProviderContext) -> Result<Self, LlmError> {
        let bad = |why: String| {
            LlmError::InvalidRequest(format!("stackspot provider `{}`: {why}", cfg.name))
        };
        let client_id = non_empty(cfg.client_id.as_deref());
        let client_key = cfg
            .client_key
            .clone()
            .filter(|k| !k.expose().trim().is_empty());
        let agent_id = non_empty(cfg.agent_id.as_deref()).or(non_empty(cfg.model.as_deref()));
        let mut missing = Vec::new();
        if client_id.is_none() {
            missing.push("client_id");
        }
        if client_key.is_none() {
            missing.push("client_key (or client_key_file)");
        }
        if agent_id.is_none() {
            missing.push("agent_id");
        }
        let (Some(client_id), Some(client_key), Some(agent_id)) = (client_id, client_key, agent_id)
        else {
            return Err(bad(format!("missing {}", missing.join(", "))));
        };
        let realm = non_empty(cfg.realm.as_deref()).unwrap_or(DEFAULT_REALM);
        check_segment("realm", realm).map_err(bad)?;
        check_segment("agent_id", agent_id).map_err(bad)?;
        let base_url =
            config_url("base_url", cfg.base_url.as_deref(), DEFAULT_BASE_URL).map_err(bad)?;
        let token_url = match non_empty(cfg.token_url.as_deref()) {
            Some(u) => Some(config_url("token_url", Some(u), "").map_err(bad)?),
            None => None,
        };
        let client = http::client(&HttpOptions::default())?;
        let account = Account {
            client_id: client_id.to_string(),
            client_key,
            realm: realm.to_string(),
            token_url,
            client: client.clone(),
        };
        let auth = Auth::Tokens(Box::new(TokenSource {
            provider: cfg.name.clone(),
            client: client.clone(),
            token_url: account.token_url_for(realm),
            client_id: account.client_id.clone(),
            client_key: account.client_key.clone(),
            timeouts: http::Timeouts::of(cfg),
            cache: tokio::sync::Mutex::new(None),
        }));
        Ok(Self {
            name: cfg.name.clone(),
            agent_id: agent_id.to_string(),
            replaced_default: None,
            base_url,
            chat_client: client,
            headers: http::header_map(&cfg.headers).map_err(bad)?,
            auth: Arc::new(auth),
            account,
            timeouts: http::Timeouts::of(cfg),
            ctx: ctx.clone(),
        })
    }

    fn agent_for(&self, model: &str) -> Result<String, LlmError> {
        let model = model.trim();
        let agent = if model.is_empty() || self.replaced_default.as_deref() == Some(model) {
            &self.agent_id
        } else {
            model
        };
        check_segment("the agent id (model)", agent).map_err(|why| {
            LlmError::InvalidRequest(format!("stackspot provider `{}`: {why}", self.name))
        })?;
        Ok(agent.to_string())
    }

    async fn scoped(&self, creds: &ClientCredentials) -> Result<Self, LlmError> {
        let bad = |why: &str| {
            LlmError::InvalidRequest(format!("stackspot provider `{}`: {why}", self.name))
        };
        let get = |k: &str| non_empty(creds.config.get(k).map(String::as_str));
        // A forwarded `oauth:`/`token:` key is a ready access token; a plain key is the client
        // key (so `--client-id X --llm-key SECRET` works).
        let (fixed_token, forwarded_key) = match &creds.key {
            Some(k) if k.scheme == KeyScheme::ApiKey => (None, Some(k.secret.clone())),
            Some(k) => (Some(k.secret.clone()), None),
            None => (None, None),
        };
        let client_key = get("client_key").map(Secret::new).or(forwarded_key);
        let own = match (get("client_id"), client_key) {
            (Some(id), Some(key)) => Some((id.to_string(), key)),
            (None, None) => None,
            (Some(_), None) => return Err(bad("provider_config has client_id but no client_key")),
            (None, Some(_)) => return Err(bad("a client key was given without client_id")),
        };
        let realm = get("realm");
        if let Some(r) = realm {
            check_segment("realm", r).map_err(|why| bad(&why))?;
        }
        let agent = get("agent_id");
        if let Some(a) = agent {
            check_segment("agent_id", a).map_err(|why| bad(&why))?;
        }
        // The client-credential rule: a caller's URL only with the caller's own account or token.
        creds.caller_url(
            &self.name,
            CONFIG_KEYS,
            URL_KEYS,
            own.is_some() || fixed_token.is_some(),
        )?;
        let (token_url, realm_url, base_url) =
            (get("token_url"), get("realm_url"), get("base_url"));

        let (chat_client, base, headers) = match base_url {
            Some(u) => {
                let (client, url) = self.ctx.ssrf.guarded_client(u).await?;
                (client, normalized_base(url), HeaderMap::new())
            }
            None => (
                self.chat_client.clone(),
                self.base_url.clone(),
                self.headers.clone(),
            ),
        };

        let auth = if let Some(token) = fixed_token {
            Arc::new(Auth::Fixed(token))
        } else if own.is_none() && realm.is_none() {
            // The server's account at the server's endpoint: its cache holds exactly the tokens
            // this copy would fetch.
            self.auth.clone()
        } else {
            let realm = realm.unwrap_or(&self.account.realm);
            let (client, token_endpoint) = match (token_url, realm_url) {
                (Some(u), _) => {
                    let (c, url) = self.ctx.ssrf.guarded_client(u).await?;
                    (c, url.to_string())
                }
                (None, Some(u)) => {
                    let (c, url) = self.ctx.ssrf.guarded_client(u).await?;
                    (c, token_url_in(&normalized_base(url), realm))
                }
                (None, None) => (
                    self.account.client.clone(),
                    self.account.token_url_for(realm),
                ),
            };
            let (client_id, client_key) = own.unwrap_or_else(|| {
                (
                    self.account.client_id.clone(),
                    self.account.client_key.clone(),
                )
            });
            Arc::new(Auth::Tokens(Box::new(TokenSource {
                provider: self.name.clone(),
                client,
                token_url: token_endpoint,
                client_id,
                client_key,
                timeouts: self.timeouts,
                cache: tokio::sync::Mutex::new(None),
            })))
        };

        let (agent_id, replaced_default) = match agent {
            Some(a) if a != self.agent_id => (a.to_string(), Some(self.agent_id.clone())),
            _ => (self.agent_id.clone(), self.replaced_default.clone()),
        };
        Ok(Self {
            name: self.name.clone(),
            agent_id,
            replaced_default,
            base_url: base,
            chat_client,
            headers,
            auth,
            account: self.account.clone(),
            timeouts: self.timeouts,
            ctx: self.ctx.clone(),
        })
    }
}

impl Provider for StackSpotProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::StackSpot
    }

    fn default_model(&self) -> &str {
        &self.agent_id
    }

    fn stream(&self, request: &ChatRequest) -> DeltaStream {
        let name = self.name.clone();
        let agent = match self.agent_for(&request.model) {
            Ok(a) => a,
            Err(e) => return Box::pin(futures::stream::once(async move { Err(e) })),
        };
        let call = ChatCall {
            provider: name.clone(),
            client: self.chat_client.clone(),
            url: format!("{}/v1/agent/{agent}/chat", self.base_url),
            headers: self.headers.clone(),
            body: json!({
                "user_prompt": render_prompt(&request.messages),
                "streaming": true,
                "stackspot_knowledge": false,
                "return_ks_in_response": true,
            }),
            auth: self.auth.clone(),
            timeouts: self.timeouts,
        };
        Box::pin(async_stream::stream! {
            let resp = match call.send().await {
                Ok(r) => r,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            if is_json(&resp) {
                // A non-streamed answer: one object with the whole message.
                let parsed = match resp.bytes().await {
                    Ok(b) => serde_json::from_slice::<Value>(&b).map_err(|e| {
                        LlmError::upstream(&name, ErrorClass::Malformed, format!("invalid JSON answer: {e}"))
                    }),
                    Err(e) => Err(http::transport_error(&name, &e)),
                };
                let deltas = parsed.and_then(|v| {
                    if v.get("message").is_some_and(Value::is_string) {
                        read_event(&name, &v)
                    } else {
                        Err(LlmError::upstream(&name, ErrorClass::Malformed, "the answer has no message"))
                    }
                });
                match deltas {
                    Ok(ds) => {
                        for d in ds {
                            yield Ok(d);
                        }
                    }
                    Err(e) => yield Err(e),
                }
                return;
            }
            // The response lives inside this stream: dropping the stream closes the connection.
            let mut events = Box::pin(http::sse_events(&name, resp));
            let mut seen = false;
            while let Some(ev) = events.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                };
                let data = ev.data.trim();
                if data == "[DONE]" {
                    http::read_rest_in_background(events);
                    return;
                }
                if data.is_empty() {
                    continue;
                }
                if ev.event == "error" {
                    yield Err(LlmError::upstream(&name, ErrorClass::Server, data));
                    return;
                }
                seen = true;
                let deltas = serde_json::from_str::<Value>(data)
                    .map_err(|e| LlmError::upstream(&name, ErrorClass::Malformed, format!("invalid JSON event: {e}")))
                    .and_then(|v| read_event(&name, &v));
                match deltas {
                    Ok(ds) => {
                        for d in ds {
                            yield Ok(d);
                        }
                    }
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                }
            }
            // StackSpot ends a complete answer by closing the stream (a broken connection is a
            // transport error above); a stream with no event at all is not an answer.
            if !seen {
                yield Err(LlmError::upstream(&name, ErrorClass::Malformed, "the answer stream ended without any event"));
            }
        })
    }

    fn with_client_credentials<'a>(
        &'a self,
        creds: &'a ClientCredentials,
    ) -> BoxFuture<'a, Result<Arc<dyn Provider>, LlmError>> {
        Box::pin(async move { Ok(Arc::new(self.scoped(creds).await?) as Arc<dyn Provider>) })
    }
}

/// One agent chat call, owned by the answer stream.
struct ChatCall {
    provider: String,
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    body: Value,
    auth: Arc<Auth>,
    timeouts: http::Timeouts,
}

impl ChatCall {
    /// Sends the call; a 401 with a cached token renews the token once and sends again.
    async fn send(&self) -> Result<reqwest::Response, LlmError> {
        let token = self.auth.token().await?;
        match self.send_with(&token).await {
            Err(LlmError::Upstream(u)) if u.status == Some(401) => match self.auth.as_ref() {
                Auth::Tokens(source) => {
                    source.invalidate(&token).await;
                    let fresh = source.get().await?;
                    self.send_with(&fresh).await
                }
                Auth::Fixed(_) => Err(LlmError::Upstream(u)),
            },
            other => other,
        }
    }

    async fn send_with(&self, token: &Secret) -> Result<reqwest::Response, LlmError> {
        let rb = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .bearer_auth(token.expose())
            .header(
                reqwest::header::ACCEPT,
                "text/event-stream, application/json",
            )
            .json(&self.body);
        http::send(&self.provider, &self.timeouts, rb, parse_error).await
    }
}

/// The conversation as the agent's one text prompt: with history, one `role: content` line per
/// turn and the prompt last as `user: …`; without, the prompt as it is.
fn render_prompt(messages: &[Message]) -> String {
    match messages.split_last() {
        None => String::new(),
        Some((last, [])) => last.content.clone(),
        Some((last, history)) => {
            let mut text = String::new();
            for m in history.iter().chain(std::iter::once(last)) {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&m.role);
                text.push_str(": ");
                text.push_str(&m.content);
            }
            text
        }
    }
}

/// One answer event (or a whole answer): `message` is text; `stop_reason` and `tokens` end it.
fn read_event(provider: &str, v: &Value) -> Result<Vec<Delta>, LlmError> {
    let Some(obj) = v.as_object() else {
        return Err(LlmError::upstream(
            provider,
            ErrorClass::Malformed,
            "an answer event is not a JSON object",
        ));
    };
    if let Some(err) = obj.get("error").filter(|e| !e.is_null()) {
        let text = match err {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        return Err(LlmError::upstream(provider, ErrorClass::Server, text));
    }
    let mut deltas = Vec::new();
    if let Some(text) = obj
        .get("message")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        deltas.push(Delta::Text(text.to_string()));
    }
    if let Some(usage) = obj.get("tokens").and_then(usage_of) {
        deltas.push(Delta::Usage(usage));
    }
    if let Some(reason) = obj
        .get("stop_reason")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
    {
        deltas.push(Delta::Finish(reason.to_string()));
    }
    Ok(deltas)
}

/// StackSpot's token counts: `{input, output}` on streams, `{user, enrichment, output}` on whole
/// answers; numbers or numeric strings.
fn usage_of(tokens: &Value) -> Option<Usage> {
    let get = |k: &str| tokens.get(k).and_then(number);
    let prompt = get("input").or_else(|| match (get("user"), get("enrichment")) {
        (None, None) => None,
        (u, e) => Some(u.unwrap_or(0) + e.unwrap_or(0)),
    });
    let completion = get("output");
    if prompt.is_none() && completion.is_none() {
        return None;
    }
    Some(Usage {
        prompt_tokens: prompt.unwrap_or(0),
        completion_tokens: completion.unwrap_or(0),
    })
}

fn number(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// StackSpot's error body `{"type", "code", "details"}` (or `message`/`detail`): its rate-limit
/// code is a rate limit whatever the status; otherwise the status decides.
fn parse_error(status: u16, body: &str) -> Option<(ErrorClass, String)> {
    let v: Value = serde_json::from_str(body).ok()?;
    let text = ["details", "message", "detail", "error"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))?;
    let code = v.get("code").and_then(Value::as_str).unwrap_or("");
    let class = if code == RATE_LIMIT_CODE {
        ErrorClass::RateLimit
    } else {
        ErrorClass::from_status(status)
    };
    let text = if code.is_empty() {
        text.to_string()
    } else {
        format!("{code}: {text}")
    };
    Some((class, text))
}

/// The token endpoint's OAuth error `{"error", "error_description"}`: rejected client credentials
/// are an auth failure whatever the status (some servers answer 400).
fn parse_token_error(status: u16, body: &str) -> Option<(ErrorClass, String)> {
    let v: Value = serde_json::from_str(body).ok()?;
    let code = v.get("error").and_then(Value::as_str)?;
    let class = match code {
        "invalid_client" | "unauthorized_client" | "invalid_grant" => ErrorClass::Auth,
        _ => ErrorClass::from_status(status),
    };
    let text = match v.get("error_description").and_then(Value::as_str) {
        Some(d) => format!("{code}: {d}"),
        None => code.to_string(),
    };
    Some((class, text))
}

fn is_json(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

/// `application/x-www-form-urlencoded` for one value.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Realm and agent id go into URL paths: letters, digits, `-`, `_` and `.` only (no `..`), so a
/// caller cannot steer the request elsewhere on the host.
fn check_segment(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} may only contain letters, digits, '-', '_' and '.'"
        ))
    }
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

/// A URL from the operator's config, checked for form only (the operator is trusted).
fn config_url(what: &str, raw: Option<&str>, default: &str) -> Result<String, String> {
    let raw = non_empty(raw).unwrap_or(default);
    let url =
        reqwest::Url::parse(raw).map_err(|e| format!("{what} `{raw}` is not a valid URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{what} `{raw}` must be http or https"));
    }
    Ok(normalized_base(url))
}

/// The URL without query, fragment or trailing slash.
fn normalized_base(mut url: reqwest::Url) -> String {
    url.set_query(None);
    url.set_fragment(None);
    url.as_str().trim_end_matches('/').to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::llm::ssrf::SsrfPolicy;
    use crate::llm::{ClientKey, collect};
    use crate::testing::stackspot::StackSpotFormat;
    use crate::testing::{FakeUpstream, Recorded, Reply, Step};

    const TOKEN_PATH: &str = "/zup/oidc/oauth/token";

    fn ctx() -> ProviderContext {
        ProviderContext {
            ssrf: Arc::new(SsrfPolicy::default()),
        }
    }

    fn cfg(fake: &FakeUpstream) -> ProviderConfig {
        ProviderConfig {
            name: "stackspot".into(),
            kind: "stackspot".into(),
            base_url: Some(fake.base_url()),
            token_url: Some(format!("{}{TOKEN_PATH}", fake.base_url())),
            client_id: Some("server-id".into()),
            client_key: Some(Secret::new("server-secret")),
            agent_id: Some("AGENT1".into()),
            ..Default::default()
        }
    }

    async fn start() -> (FakeUpstream, StackSpotFormat, Arc<dyn Provider>) {
        let format = StackSpotFormat::new();
        let fake = FakeUpstream::start(format.clone()).await.unwrap();
        let p = build(&cfg(&fake), &ctx()).unwrap();
        (fake, format, p)
    }

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    fn hi() -> ChatRequest {
        ChatRequest::new(vec![msg("user", "hi")], "")
    }

    fn chats(fake: &FakeUpstream) -> Vec<Recorded> {
        fake.requests()
            .into_iter()
            .filter(|r| r.path.ends_with("/chat"))
            .collect()
    }

    fn token_requests(fake: &FakeUpstream) -> Vec<Recorded> {
        fake.requests()
            .into_iter()
            .filter(|r| r.path.ends_with("/oidc/oauth/token"))
            .collect()
    }

    #[tokio::test]
    async fn a_stream_read_to_its_end_leaves_its_connection_for_the_next_call() {
        let (fake, _, p) = start().await;
        fake.assert_two_answers_share_a_connection("/chat", || p.stream(&hi()))
            .await;
    }

    fn class_of(e: &LlmError) -> ErrorClass {
        e.as_upstream().map(|u| u.class).expect("an upstream error")
    }

    #[tokio::test]
    async fn streams_text_usage_and_finish() {
        let (fake, _, p) = start().await;
        fake.push(Reply::text("hello there world"));
        let items: Vec<Delta> = p.stream(&hi()).map(Result::unwrap).collect().await;
        assert_eq!(
            items,
            vec![
                Delta::Text("hello".into()),
                Delta::Text(" there".into()),
                Delta::Text(" world".into()),
                Delta::Usage(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 3
                }),
                Delta::Finish("stop".into()),
            ]
        );
    }

    #[tokio::test]
    async fn request_has_the_agent_shape() {
        let (fake, _, p) = start().await;
        let r = ChatRequest::new(
            vec![
                msg("system", "be brief"),
                msg("user", "what is rust?"),
                msg("assistant", "a language"),
                msg("user", "who made it?"),
            ],
            "",
        );
        collect(p.stream(&r)).await.unwrap();
        let tok = &token_requests(&fake)[0];
        assert_eq!(tok.path, TOKEN_PATH);
        assert_eq!(
            tok.header("content-type").as_deref(),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(
            std::str::from_utf8(&tok.body).unwrap(),
            "grant_type=client_credentials&client_id=server-id&client_secret=server-secret"
        );
        let chat = &chats(&fake)[0];
        assert_eq!(chat.method, ::http::Method::POST);
        assert_eq!(chat.path, "/v1/agent/AGENT1/chat");
        assert_eq!(
            chat.header("authorization").as_deref(),
            Some("Bearer tok-1")
        );
        let body = chat.json();
        assert_eq!(body["streaming"], true);
        assert_eq!(body["stackspot_knowledge"], false);
        assert_eq!(body["return_ks_in_response"], true);
        assert_eq!(
            body["user_prompt"],
            "system: be brief\nuser: what is rust?\nassistant: a language\nuser: who made it?"
        );
        // A lone prompt goes as it is; a model names another agent.
        collect(p.stream(&ChatRequest::new(vec![msg("user", "hi")], "AGENT2")))
            .await
            .unwrap();
        let chat = &chats(&fake)[1];
        assert_eq!(chat.path, "/v1/agent/AGENT2/chat");
        assert_eq!(chat.json()["user_prompt"], "hi");
        assert_eq!(p.default_model(), "AGENT1");
    }

    #[tokio::test]
    async fn a_token_is_fetched_once_and_reused() {
        let (fake, format, p) = start().await;
        collect(p.stream(&hi())).await.unwrap();
        collect(p.stream(&hi())).await.unwrap();
        assert_eq!(format.issued(), 1);
        let auths: Vec<_> = chats(&fake)
            .iter()
            .map(|r| r.header("authorization").unwrap())
            .collect();
        assert_eq!(auths, ["Bearer tok-1", "Bearer tok-1"]);
    }

    #[tokio::test]
    async fn a_token_near_expiry_is_renewed() {
        let (fake, format, p) = start().await;
        // 30 s is inside the 60 s renewal margin: every call needs a new token.
        format.set_expires_in(30);
        collect(p.stream(&hi())).await.unwrap();
        collect(p.stream(&hi())).await.unwrap();
        assert_eq!(format.issued(), 2);
        assert_eq!(
            chats(&fake)[1].header("authorization").as_deref(),
            Some("Bearer tok-2")
        );
    }

    #[tokio::test]
    async fn a_401_renews_the_token_once_and_retries() {
        let (fake, format, p) = start().await;
        fake.push(Reply::error(401, r#"{"message":"token expired"}"#));
        let (text, _) = collect(p.stream(&hi())).await.unwrap();
        assert_eq!(text, "hello from the fake");
        assert_eq!(format.issued(), 2);
        let auths: Vec<_> = chats(&fake)
            .iter()
            .map(|r| r.header("authorization").unwrap())
            .collect();
        assert_eq!(auths, ["Bearer tok-1", "Bearer tok-2"]);

        // Refused twice: the second 401 is the answer, no third attempt.
        fake.push(Reply::error(401, r#"{"message":"no"}"#));
        fake.push(Reply::error(401, r#"{"message":"still no"}"#));
        let err = collect(p.stream(&hi())).await.unwrap_err();
        assert_eq!(class_of(&err), ErrorClass::Auth);
        assert_eq!(chats(&fake).len(), 4);
        assert_eq!(format.issued(), 3);
    }

    #[tokio::test]
    async fn refused_client_credentials_are_auth() {
        let (fake, format, p) = start().await;
        format.refuse_tokens(401);
        let err = collect(p.stream(&hi())).await.unwrap_err();
        let u = err.as_upstream().unwrap();
        assert_eq!(u.class, ErrorClass::Auth);
        assert!(u.message.starts_with("token endpoint"), "{}", u.message);
        assert!(!u.message.contains("server-secret"));
        assert!(chats(&fake).is_empty());
    }

    #[tokio::test]
    async fn upstream_errors_are_classified() {
        let (fake, _, p) = start().await;
        fake.push(Reply::error(
            429,
            r#"{"type":"TooManyRequests","code":"INFERENCE_3008_CHAT_RATE_LIMIT_EXCEEDED","details":"Maximum number of requests reached."}"#,
        ));
        let err = collect(p.stream(&hi())).await.unwrap_err();
        assert_eq!(class_of(&err), ErrorClass::RateLimit);
        assert!(err.to_string().contains("INFERENCE_3008"), "{err}");
        fake.push(Reply::error(500, r#"{"message":"boom"}"#));
        let err = collect(p.stream(&hi())).await.unwrap_err();
        assert_eq!(class_of(&err), ErrorClass::Server);
        fake.push(Reply::error(404, r#"{"message":"agent not found"}"#));
        let err = collect(p.stream(&hi())).await.unwrap_err();
        assert_eq!(class_of(&err), ErrorClass::ModelNotFound);
    }

    #[tokio::test]
    async fn first_delta_arrives_before_the_upstream_continues() {
        let (fake, _, p) = start().await;
        fake.push(Reply::steps(vec![
            Step::Text("first".into()),
            Step::AwaitRelease,
            Step::Text(" second".into()),
        ]));
        let mut s = p.stream(&hi());
        assert_eq!(
            s.next().await.unwrap().unwrap(),
            Delta::Text("first".into())
        );
        fake.release();
        assert_eq!(
            s.next().await.unwrap().unwrap(),
            Delta::Text(" second".into())
        );
    }

    #[tokio::test]
    async fn dropping_the_stream_cancels_the_upstream_request() {
        let (fake, _, p) = start().await;
        fake.push(Reply::steps(vec![
            Step::Text("first".into()),
            Step::AwaitRelease,
        ]));
        let mut s = p.stream(&hi());
        assert!(s.next().await.unwrap().is_ok());
        drop(s);
        assert!(fake.wait_cancelled(1, Duration::from_secs(10)).await);
    }

    #[tokio::test]
    async fn odd_streams() {
        let (fake, _, p) = start().await;
        // A `[DONE]` line ends the answer.
        fake.push(Reply::Raw {
            content_type: "text/event-stream".into(),
            body: "data: {\"message\": \"ab\"}\n\ndata: {\"message\": \"cd\"}\n\ndata: [DONE]\n\n"
                .into(),
        });
        assert_eq!(collect(p.stream(&hi())).await.unwrap().0, "abcd");
        // A whole JSON answer.
        fake.push(Reply::Raw {
            content_type: "application/json".into(),
            body: r#"{"message":"whole","stop_reason":"stop","tokens":{"user":4,"enrichment":1,"output":"2"}}"#.into(),
        });
        let (text, usage) = collect(p.stream(&hi())).await.unwrap();
        assert_eq!(text, "whole");
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 2
            })
        );
        // Garbage, a dropped connection, an empty stream.
        fake.push(Reply::steps(vec![
            Step::Text("ok".into()),
            Step::Raw("data: not json\n\n".into()),
        ]));
        let err = collect(p.stream(&hi())).await.unwrap_err();
        assert_eq!(class_of(&err), ErrorClass::Malformed);
        fake.push(Reply::steps(vec![Step::Text("ok".into()), Step::Drop]));
        let err = collect(p.stream(&hi())).await.unwrap_err();
        assert_eq!(class_of(&err), ErrorClass::Transport);
        fake.push(Reply::Raw {
            content_type: "text/event-stream".into(),
            body: String::new(),
        });
        let err = collect(p.stream(&hi())).await.unwrap_err();
        assert_eq!(class_of(&err), ErrorClass::Malformed);
        fake.push(Reply::Raw {
            content_type: "application/json".into(),
            body: r#"{"nothing":"here"}"#.into(),
        });
        let err = collect(p.stream(&hi())).await.unwrap_err();
        assert_eq!(class_of(&err), ErrorClass::Malformed);
    }

    #[test]
    fn missing_config_lists_every_missing_field() {
        let err = build(
            &ProviderConfig {
                name: "ss".into(),
                kind: "stackspot".into(),
                ..Default::default()
            },
            &ctx(),
        )
        .unwrap_err();
        let LlmError::InvalidRequest(m) = err else {
            panic!("{err:?}")
        };
        assert!(m.contains("`ss`"), "{m}");
        for field in ["client_id", "client_key", "agent_id"] {
            assert!(m.contains(field), "{m}");
        }
        let only_agent = build(
            &ProviderConfig {
                name: "ss".into(),
                client_id: Some("id".into()),
                client_key: Some(Secret::new("k")),
                ..Default::default()
            },
            &ctx(),
        )
        .unwrap_err();
        assert!(
            only_agent.to_string().contains("missing agent_id"),
            "{only_agent}"
        );
        let bad_realm = build(
            &ProviderConfig {
                name: "ss".into(),
                client_id: Some("id".into()),
                client_key: Some(Secret::new("k")),
                agent_id: Some("A".into()),
                realm: Some("../x".into()),
                ..Default::default()
            },
            &ctx(),
        )
        .unwrap_err();
        assert!(bad_realm.to_string().contains("realm"), "{bad_realm}");
    }

    #[tokio::test]
    async fn a_callers_account_gets_its_own_token() {
        let (fake, format, p) = start().await;
        collect(p.stream(&hi())).await.unwrap(); // the server's tok-1
        let creds = ClientCredentials::from_request(
            "",
            vec![
                ("client_id".to_string(), "caller id".to_string()),
                ("client_key".to_string(), "caller&secret".to_string()),
                ("agent_id".to_string(), "CALLERAGENT".to_string()),
            ],
        )
        .unwrap();
        let scoped = p.with_client_credentials(&creds).await.unwrap();
        assert_eq!(scoped.default_model(), "CALLERAGENT");
        // The registry resolved the server's default model; it means the caller's agent here.
        collect(scoped.stream(&ChatRequest::new(vec![msg("user", "hi")], "AGENT1")))
            .await
            .unwrap();
        let toks = token_requests(&fake);
        assert_eq!(toks.len(), 2);
        assert_eq!(
            std::str::from_utf8(&toks[1].body).unwrap(),
            "grant_type=client_credentials&client_id=caller+id&client_secret=caller%26secret"
        );
        let chat = chats(&fake).pop().unwrap();
        assert_eq!(chat.path, "/v1/agent/CALLERAGENT/chat");
        assert_eq!(
            chat.header("authorization").as_deref(),
            Some("Bearer tok-2")
        );
        // The server's cache still holds its own token; the caller's never entered it.
        collect(p.stream(&hi())).await.unwrap();
        assert_eq!(format.issued(), 2);
        assert_eq!(
            chats(&fake)
                .pop()
                .unwrap()
                .header("authorization")
                .as_deref(),
            Some("Bearer tok-1")
        );
    }

    #[tokio::test]
    async fn a_forwarded_token_is_used_as_is() {
        let (fake, format, p) = start().await;
        let creds = ClientCredentials {
            key: ClientKey::parse("oauth:caller-token"),
            config: Default::default(),
        };
        let scoped = p.with_client_credentials(&creds).await.unwrap();
        collect(scoped.stream(&hi())).await.unwrap();
        assert_eq!(format.issued(), 0);
        assert_eq!(
            chats(&fake)[0].header("authorization").as_deref(),
            Some("Bearer caller-token")
        );
    }

    #[tokio::test]
    async fn caller_config_is_checked() {
        let (fake, _, p) = start().await;
        let refused = |pairs: &[(&str, &str)]| {
            ClientCredentials::from_request(
                "",
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<Vec<_>>(),
            )
            .unwrap()
        };
        for creds in [
            // Half an account.
            refused(&[("client_id", "x")]),
            // The server's credentials never go to a caller's URL.
            refused(&[("token_url", "https://example.com/token")]),
            refused(&[("base_url", "https://example.com")]),
            // Path segments.
            refused(&[("agent_id", "../admin")]),
            refused(&[("realm", "a/b")]),
            // The SSRF guard.
            refused(&[
                ("client_id", "x"),
                ("client_key", "y"),
                ("realm_url", "http://10.0.0.1"),
            ]),
        ] {
            let err = p.with_client_credentials(&creds).await.unwrap_err();
            assert!(matches!(err, LlmError::InvalidRequest(_)), "{err:?}");
            assert!(!err.to_string().contains("server-secret"));
        }
        assert!(fake.requests().is_empty());
    }

    #[test]
    fn form_encoding_escapes_reserved_bytes() {
        assert_eq!(form_encode("a b&c=d+é"), "a+b%26c%3Dd%2B%C3%A9");
        assert_eq!(form_encode("Az09-._*"), "Az09-._*");
    }
}
