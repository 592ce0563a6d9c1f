//! The one HTTP provider: [`HttpProvider`] over a [`WireFormat`]. The provider owns what every
//! HTTP kind shares: the HTTP clients (the lean pooled client for the configured upstream, reqwest
//! for a proxied or caller-chosen one), the headers a call sends (built once per upstream, not per
//! call), the timeouts, the SSRF pin of a caller's URL, the client-credential rule
//! ([`ClientCredentials::caller_url`]), the scrubbing of the key from upstream messages, and
//! model listing. A wire format (`openai`, `anthropic`, `gemini`, `ollama`) owns only its format:
//! the chat URL, the request body, the auth headers of a key, the reading of an answer into
//! deltas, the error bodies, and where its model list is.
//!
//! The per-call path is generic over the format: no trait object, and the same work the OpenAI
//! provider did when it was written by hand (one boxed stream per call, which sends the call and
//! reads its answer; headers cloned from a map built once; the chat URL parsed once).

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, InvalidHeaderValue};

use super::error::{ErrorClass, LlmError};
use super::http::{self, Answer, ModelListing, Timeouts};
use super::lean::{Lean, LeanBody};
use super::ssrf::SsrfPolicy;
use super::{
    ChatRequest, ClientCredentials, ClientKey, Delta, DeltaStream, KeyScheme, Provider,
    ProviderContext, ProviderKind,
};
use crate::config::Secret;

/// What one wire format owns; [`HttpProvider`] does the rest.
pub trait WireFormat: Clone + Send + Sync + 'static {
    /// The kind it serves.
    const KIND: ProviderKind;
    /// The `provider_config` keys that name a caller's base URL, in order of precedence; they are
    /// the only keys the format accepts.
    const URL_KEYS: &'static [&'static str] = &["base_url"];
    /// Where the format lists its upstream's models.
    const MODELS: ModelListing;

    /// The chat call's URL below `base` (no trailing slash) for `model`; an error says why the
    /// model cannot be asked for.
    fn chat_url(&self, base: &str, model: &str) -> Result<String, String>;
    /// Whether [`Self::chat_url`] is the same for every model (then it is parsed once per
    /// upstream, not per call).
    fn fixed_chat_url(&self) -> bool {
        true
    }
    /// The headers the format sends to any host, before the operator's (a version, a preset's
    /// identification, `Accept` for a streamed or whole answer).
    fn format_headers(&self, stream: bool) -> HeaderMap;
    /// Sets the headers that authenticate `key` into `headers`, removing those of the other
    /// schemes. `Err` when a value cannot be sent in a header.
    fn authenticate(
        &self,
        key: &ClientKey,
        headers: &mut HeaderMap,
    ) -> Result<(), InvalidHeaderValue>;
    /// The request body for `req`, asking for `model`.
    fn body(&self, req: &ChatRequest, model: &str) -> Vec<u8>;
    /// Reads a non-2xx answer's body into a class and message; `None` = by the HTTP status.
    fn parse_error(status: u16, body: &str) -> Option<(ErrorClass, String)>;
    /// The deltas of the call `pending` (its 2xx answer from [`Pending::answer`], read as it
    /// arrives), for provider `name`.
    fn deltas(
        name: String,
        pending: Pending,
    ) -> impl Stream<Item = Result<Delta, LlmError>> + Send + 'static;
    /// Checks at start-up that `provider` can serve.
    fn check_ready(provider: &HttpProvider<Self>) -> BoxFuture<'_, Result<(), String>> {
        let _ = provider;
        Box::pin(async { Ok(()) })
    }
}

/// What a wire format's config yields, for [`HttpProvider::new`] (no `Debug`: it holds the key
/// and the operator's headers).
pub struct Parts<W> {
    /// The provider's name.
    pub name: String,
    /// The default model.
    pub model: String,
    /// The format, with its settings.
    pub format: W,
    /// The operator's base URL, checked to be an http(s) URL.
    pub base_url: String,
    /// The server's key, if the kind takes one.
    pub key: Option<Secret>,
    /// The operator's extra headers.
    pub headers: HeaderMap,
    /// The provider's timeouts.
    pub timeouts: Timeouts,
}

/// Where a provider's calls go and with what.
#[derive(Clone)]
struct Upstream {
    /// Without a trailing slash.
    base_url: String,
    /// The chat URL when the format's is fixed, parsed once.
    chat: Option<(reqwest::Url, ::http::Uri)>,
    client: reqwest::Client,
    /// The lean client for the operator's own upstream; `None` when an environment proxy is set,
    /// for URLs with credentials in them (reqwest turns those into a Basic header), and for a
    /// caller's URL (pinned in `client`).
    lean: Option<Lean>,
    /// The operator's extra headers; empty for a caller's URL.
    operator: HeaderMap,
    /// The key calls authenticate with: the server's, or the caller's.
    key: Option<ClientKey>,
    /// What a call sends, built once: for a whole answer, and for a streamed one.
    sent: [HeaderMap; 2],
}

/// A provider speaking one HTTP wire format (the server's, or a request-scoped copy with a
/// caller's credentials).
#[derive(Clone)]
pub struct HttpProvider<W> {
    name: String,
    model: String,
    format: W,
    up: Upstream,
    timeouts: Timeouts,
    ssrf: Arc<SsrfPolicy>,
}

impl<W> std::fmt::Debug for HttpProvider<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hand-written so that no credential (key, extra headers) can ever reach a log line.
        f.debug_struct("HttpProvider")
            .field("name", &self.name)
            .field("model", &self.model)
            .field("base_url", &self.up.base_url)
            .field("has_key", &self.up.key.is_some())
            .field("headers", &self.up.operator.keys().collect::<Vec<_>>())
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl<W: WireFormat> HttpProvider<W> {
    /// The provider of `parts`, calling the operator's upstream.
    pub fn new(parts: Parts<W>, ctx: &ProviderContext) -> Result<Self, LlmError> {
        let key = parts
            .key
            .filter(|k| !k.expose().trim().is_empty())
            .map(|k| ClientKey {
                scheme: KeyScheme::ApiKey,
                secret: Secret::new(k.expose().trim()),
            });
        let base_url = parts.base_url.trim().trim_end_matches('/').to_string();
        let mut up = Upstream {
            chat: None,
            base_url,
            client: http::client(&http::HttpOptions::default())?,
            lean: None,
            operator: parts.headers,
            key,
            sent: Default::default(),
        };
        up.prepare(&parts.name, &parts.format, true)?;
        Ok(Self {
            name: parts.name,
            model: parts.model,
            format: parts.format,
            up,
            timeouts: parts.timeouts,
            ssrf: ctx.ssrf.clone(),
        })
    }

    /// The format and its settings.
    #[cfg(test)]
    pub fn format(&self) -> &W {
        &self.format
    }

    /// The base URL calls go to (without a trailing slash).
    pub fn base_url(&self) -> &str {
        &self.up.base_url
    }

    /// The call for `request`, on the client that carries it.
    fn call(&self, request: &ChatRequest) -> Result<Call, LlmError> {
        let model = match request.model.trim().is_empty() {
            true => self.model.as_str(),
            false => request.model.as_str(),
        };
        let headers = self.up.sent[usize::from(request.stream)].clone();
        let body = self.format.body(request, model);
        let bad_url =
            |what: String| LlmError::InvalidRequest(format!("provider `{}`: {what}", self.name));
        if let Some((url, uri)) = &self.up.chat {
            return Ok(match &self.up.lean {
                Some(lean) => Call::Lean(lean.clone(), http::lean_json_post(uri, headers, body)),
                None => Call::Reqwest(self.up.client.post(url.clone()).headers(headers).body(body)),
            });
        }
        // A chat URL that names the model: built and parsed per call, for the client that sends it.
        let text = self
            .format
            .chat_url(&self.up.base_url, model)
            .map_err(bad_url)?;
        let invalid =
            |e: &dyn std::fmt::Display| bad_url(format!("the chat URL is not valid: {e}"));
        Ok(match &self.up.lean {
            Some(lean) => {
                let uri = text.parse::<::http::Uri>().map_err(|e| invalid(&e))?;
                Call::Lean(lean.clone(), http::lean_json_post(&uri, headers, body))
            }
            None => {
                let url = reqwest::Url::parse(&text).map_err(|e| invalid(&e))?;
                Call::Reqwest(self.up.client.post(url).headers(headers).body(body))
            }
        })
    }

    /// The headers of a model list request: the call's, without a body's content type.
    fn listing_headers(&self) -> HeaderMap {
        let mut headers = self.up.sent[0].clone();
        headers.remove(CONTENT_TYPE);
        headers.insert(
            reqwest::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        );
        headers
    }

    fn scrubbed(&self) -> impl Fn(LlmError) -> LlmError + '_ {
        move |e| scrub(e, self.up.key.as_ref().map(|k| &k.secret))
    }
}

impl Upstream {
    /// Checks and parses the fixed chat URL, picks the lean client (for the operator's own
    /// upstream only) and builds the headers a call sends.
    fn prepare<W: WireFormat>(
        &mut self,
        name: &str,
        format: &W,
        operators: bool,
    ) -> Result<(), LlmError> {
        let invalid = |e: &dyn std::fmt::Display| {
            LlmError::InvalidRequest(format!(
                "provider `{name}`: base_url `{}` is not a valid URL: {e}",
                self.base_url
            ))
        };
        self.chat = None;
        self.lean = None;
        if format.fixed_chat_url() {
            let text = format
                .chat_url(&self.base_url, "")
                .map_err(|e| invalid(&e))?;
            let url = reqwest::Url::parse(&text).map_err(|e| invalid(&e))?;
            let uri = url
                .as_str()
                .parse::<::http::Uri>()
                .map_err(|e| invalid(&e))?;
            self.chat = Some((url, uri));
        }
        if operators {
            let base = reqwest::Url::parse(&self.base_url).map_err(|e| invalid(&e))?;
            if base.username().is_empty() && base.password().is_none() {
                let origin = base
                    .as_str()
                    .parse::<::http::Uri>()
                    .map_err(|e| invalid(&e))?;
                self.lean = super::lean::for_origin(&origin)?;
            }
        }
        self.sent_headers(name, format)
    }

    /// The format's headers, the operator's, the key's and the JSON headers, per kind of call.
    fn sent_headers<W: WireFormat>(&mut self, name: &str, format: &W) -> Result<(), LlmError> {
        let mut sent: [HeaderMap; 2] = Default::default();
        for (stream, headers) in [false, true].into_iter().zip(sent.iter_mut()) {
            let mut h = format.format_headers(stream);
            for (k, v) in &self.operator {
                h.insert(k.clone(), v.clone());
            }
            if let Some(key) = &self.key {
                format.authenticate(key, &mut h).map_err(|_| {
                    // Never echo the value: it is a credential.
                    LlmError::InvalidRequest(format!(
                        "provider `{name}`: the key contains characters that cannot be sent \
                         in an HTTP header"
                    ))
                })?;
            }
            *headers = http::json_headers(h);
        }
        self.sent = sent;
        Ok(())
    }
}

/// A request ready to send, on the client that carries it. Built once per call and moved straight
/// into the call's stream, so its size costs nothing a box would save.
#[allow(clippy::large_enum_variant)] // reason: moved once into the call's stream; boxing would add an allocation per call
enum Call {
    Reqwest(reqwest::RequestBuilder),
    Lean(Lean, ::http::Request<LeanBody>),
}

impl Call {
    async fn send(
        self,
        name: &str,
        timeouts: &Timeouts,
        parse_error: http::ErrorParser,
    ) -> Result<Answer, LlmError> {
        match self {
            Call::Reqwest(rb) => http::send(name, timeouts, rb, parse_error)
                .await
                .map(Answer::Reqwest),
            Call::Lean(lean, req) => http::send_lean(name, timeouts, &lean, req, parse_error).await,
        }
    }
}

/// A chat call built and not yet sent, handed to [`WireFormat::deltas`] so that the answer's one
/// stream both sends and reads it.
pub struct Pending {
    call: Result<Call, LlmError>,
    timeouts: Timeouts,
    parse_error: http::ErrorParser,
}

impl Pending {
    /// Sends the call under the provider's timeouts: its 2xx answer, or the classified failure.
    pub async fn answer(self, name: &str) -> Result<Answer, LlmError> {
        self.call?
            .send(name, &self.timeouts, self.parse_error)
            .await
    }
}

/// Removes the key from an upstream message that quotes it (OpenAI echoes part of a wrong key).
fn scrub(err: LlmError, key: Option<&Secret>) -> LlmError {
    match (
        err,
        key.map(|k| k.expose().trim()).filter(|k| !k.is_empty()),
    ) {
        (LlmError::Upstream(mut u), Some(k)) if u.message.contains(k) => {
            u.message = u.message.replace(k, crate::config::values::REDACTED);
            LlmError::Upstream(u)
        }
        (other, _) => other,
    }
}

/// Builds a provider of format `W` from `parts` (for the formats' `build`).
pub fn provider<W: WireFormat>(
    parts: Parts<W>,
    ctx: &ProviderContext,
) -> Result<Arc<dyn Provider>, LlmError> {
    Ok(Arc::new(HttpProvider::new(parts, ctx)?))
}

impl<W: WireFormat> Provider for HttpProvider<W> {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ProviderKind {
        W::KIND
    }

    fn default_model(&self) -> &str {
        &self.model
    }

    fn stream(&self, request: &ChatRequest) -> DeltaStream {
        let pending = Pending {
            call: self.call(request),
            timeouts: self.timeouts,
            parse_error: W::parse_error,
        };
        let key = self.up.key.as_ref().map(|k| k.secret.clone());
        let deltas = W::deltas(self.name.clone(), pending);
        Box::pin(deltas.map(move |item| item.map_err(|e| scrub(e, key.as_ref()))))
    }

    /// `GET` the format's model list with the server's credentials, page by page.
    fn discover_models(&self) -> BoxFuture<'_, Result<Vec<String>, LlmError>> {
        Box::pin(async move {
            http::model_pages(
                &self.name,
                &self.up.client,
                &self.timeouts,
                &self.listing_headers(),
                &self.up.base_url,
                &W::MODELS,
            )
            .await
            .map_err(self.scrubbed())
        })
    }

    /// The client-credential rule ([`ClientCredentials::caller_url`]): a caller's URL (after the
    /// SSRF guard, without the operator's headers) only with the caller's key; the caller's key
    /// alone goes to the operator's upstream.
    fn with_client_credentials<'a>(
        &'a self,
        creds: &'a ClientCredentials,
    ) -> BoxFuture<'a, Result<Arc<dyn Provider>, LlmError>> {
        Box::pin(async move {
            let key = creds.nonempty_key(&self.name)?;
            let url = creds.caller_url(&self.name, W::URL_KEYS, W::URL_KEYS, key.is_some())?;
            let mut scoped = self.clone();
            if let Some(key) = key {
                scoped.up.key = Some(key.clone());
            }
            match url {
                Some(url) => {
                    let (client, mut url) = self.ssrf.guarded_client(url).await?;
                    url.set_query(None);
                    url.set_fragment(None);
                    scoped.up.base_url = url.as_str().trim_end_matches('/').to_string();
                    scoped.up.client = client;
                    scoped.up.operator = HeaderMap::new();
                    scoped.up.prepare(&self.name, &self.format, false)?;
                }
                None => scoped.up.sent_headers(&self.name, &self.format)?,
            }
            Ok(Arc::new(scoped) as Arc<dyn Provider>)
        })
    }

    fn check_ready(&self) -> BoxFuture<'_, Result<(), String>> {
        W::check_ready(self)
    }
}
