//! The server's Prometheus metrics (the existing ChatCLI's names, listed in docs/protocol.md): one private `Registry` per [`Metrics`], so
//! several servers can run in one process, holding the gRPC, LLM, session and server-info series
//! plus the process collector, rendered in the Prometheus text format.
//!
//! `Metrics` is cheap to clone (every field is reference-counted inside `prometheus`); the gRPC
//! layer and most callers share it as `Arc<Metrics>`. With metrics off, callers hold no `Metrics`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

const GRPC_DURATION_BUCKETS: &[f64] =
    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const LLM_DURATION_BUCKETS: &[f64] = &[0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];

/// Buckets of `chatcli_llm_time_to_first_token_seconds`.
const TTFT_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];

/// Outcome of one provider call, the `status` label of `chatcli_llm_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlmStatus {
    /// The provider answered.
    Success,
    /// The call failed (also count it with [`LlmSeries::error`]).
    Error,
}

impl LlmStatus {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Error => "error",
        }
    }
}

/// The `error_type` label of `chatcli_llm_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlmErrorType {
    /// HTTP 429 or a provider quota error.
    RateLimit,
    /// The call exceeded its deadline.
    Timeout,
    /// HTTP 401/403 or a rejected credential.
    AuthError,
    /// HTTP 5xx.
    ServerError,
    /// The caller went away.
    Canceled,
    /// Anything else.
    Unknown,
}

impl LlmErrorType {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RateLimit => "rate_limit",
            Self::Timeout => "timeout",
            Self::AuthError => "auth_error",
            Self::ServerError => "server_error",
            Self::Canceled => "canceled",
            Self::Unknown => "unknown",
        }
    }
}

/// The `operation` label of `chatcli_session_operations_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionOperation {
    /// SaveSession.
    Save,
    /// LoadSession.
    Load,
    /// ListSessions.
    List,
    /// DeleteSession.
    Delete,
}

impl SessionOperation {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Save => "save",
            Self::Load => "load",
            Self::List => "list",
            Self::Delete => "delete",
        }
    }
}

/// All metric handles of one server, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    start: Instant,
    grpc_requests: IntCounterVec,
    grpc_duration: HistogramVec,
    grpc_in_flight: IntGaugeVec,
    grpc_messages_sent: IntCounterVec,
    grpc_messages_received: IntCounterVec,
    llm_requests: IntCounterVec,
    llm_duration: HistogramVec,
    llm_errors: IntCounterVec,
    llm_tokens: IntCounterVec,
    llm_ttft: HistogramVec,
    llm_fallback: IntCounterVec,
    session_active: IntGauge,
    session_operations: IntCounterVec,
    errors: IntCounterVec,
    aiops_parse_failures: IntCounterVec,
    server_info: IntGaugeVec,
    uptime: Gauge,
    llm_series: Arc<SeriesCache<LlmSeries>>,
    grpc_series: Arc<SeriesCache<GrpcSeries>>,
}

/// Label sets whose series handles are kept (see [`SeriesCache`]); past this many, handles are
/// looked up on every call again, as without the cache.
const SERIES_CACHE_MAX: usize = 1024;

/// Series handles kept per label set. Looking a series up (`with_label_values`) hashes every label
/// and takes the vector's lock, on every call; a call looks its label set up here once instead.
/// The handles themselves are made on first use, so a cached label set adds no zero series.
pub(crate) struct SeriesCache<V> {
    /// How many label sets are kept, and the sets by first and second label.
    inner: RwLock<(usize, LabelMap<LabelMap<Arc<V>>>)>,
}

/// A map by label value, hashed with foldhash: with the standard hasher the cache was no faster
/// than prometheus's own lookups (bench/HISTORY.md, step 22). Flooding it is bounded by
/// [`SERIES_CACHE_MAX`].
type LabelMap<V> = HashMap<String, V, foldhash::fast::RandomState>;

impl<V> Default for SeriesCache<V> {
    fn default() -> Self {
        Self {
            inner: RwLock::new((0, LabelMap::default())),
        }
    }
}

impl<V> SeriesCache<V> {
    /// The kept handles of `(a, b)`, else new ones from `make`, kept while there is room.
    pub(crate) fn get(&self, a: &str, b: &str, make: impl FnOnce() -> V) -> Arc<V> {
        let kept = |map: &LabelMap<LabelMap<Arc<V>>>| map.get(a).and_then(|m| m.get(b)).cloned();
        if let Some(v) = kept(&self.inner.read().unwrap_or_else(PoisonError::into_inner).1) {
            return v;
        }
        let mut guard = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = kept(&guard.1) {
            return v;
        }
        let made = Arc::new(make());
        let (len, map) = &mut *guard;
        if *len < SERIES_CACHE_MAX {
            *len += 1;
            map.entry(a.to_owned())
                .or_default()
                .insert(b.to_owned(), made.clone());
        }
        made
    }
}

/// The LLM series of one provider and model ([`Metrics::llm`]).
pub struct LlmSeries {
    provider: String,
    model: String,
    requests: IntCounterVec,
    duration: HistogramVec,
    errors: IntCounterVec,
    tokens: IntCounterVec,
    ttft: HistogramVec,
    success: OnceLock<IntCounter>,
    duration_of: OnceLock<Histogram>,
    prompt_tokens: OnceLock<IntCounter>,
    completion_tokens: OnceLock<IntCounter>,
    ttft_of: OnceLock<Histogram>,
}

impl fmt::Debug for LlmSeries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmSeries")
            .field("provider", &self.provider)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl LlmSeries {
    fn labels<'a>(&'a self, last: &'a str) -> [&'a str; 3] {
        [&self.provider, &self.model, last]
    }

    /// Records one finished provider call and its duration.
    pub fn request(&self, status: LlmStatus, elapsed: Duration) {
        match status {
            LlmStatus::Success => self
                .success
                .get_or_init(|| {
                    self.requests
                        .with_label_values(&self.labels(status.as_str()))
                })
                .inc(),
            LlmStatus::Error => self
                .requests
                .with_label_values(&self.labels(status.as_str()))
                .inc(),
        }
        self.duration_of
            .get_or_init(|| {
                self.duration
                    .with_label_values(&[&self.provider, &self.model])
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one failed provider call by its kind.
    pub fn error(&self, error_type: LlmErrorType) {
        self.errors
            .with_label_values(&self.labels(error_type.as_str()))
            .inc();
    }

    /// Adds `count` tokens of `token_type` (e.g. `prompt`, `completion`).
    pub fn tokens(&self, token_type: &str, count: u64) {
        let kept = match token_type {
            "prompt" => &self.prompt_tokens,
            "completion" => &self.completion_tokens,
            other => {
                self.tokens
                    .with_label_values(&self.labels(other))
                    .inc_by(count);
                return;
            }
        };
        kept.get_or_init(|| self.tokens.with_label_values(&self.labels(token_type)))
            .inc_by(count);
    }

    /// Observes the time to the first delta of a provider call.
    pub fn ttft(&self, elapsed: Duration) {
        self.ttft_of
            .get_or_init(|| self.ttft.with_label_values(&[&self.provider, &self.model]))
            .observe(elapsed.as_secs_f64());
    }
}

/// The gRPC series of one method ([`Metrics::grpc`]).
pub(crate) struct GrpcSeries {
    method: String,
    in_flight: OnceLock<IntGauge>,
    ok: OnceLock<IntCounter>,
    duration: OnceLock<Histogram>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// The `Content-Type` of [`Metrics::render`]'s output.
    pub const CONTENT_TYPE: &'static str = prometheus::TEXT_FORMAT;

    /// Creates the metrics in a new registry, with the process collector where supported.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let metrics = Self {
            grpc_requests: counter_vec(
                &registry,
                "chatcli_grpc_requests_total",
                "Total gRPC calls, by full method and gRPC status code.",
                &["method", "code"],
            )?,
            grpc_duration: histogram_vec(
                &registry,
                "chatcli_grpc_request_duration_seconds",
                "Duration of gRPC calls from request to the end of the response, in seconds.",
                &["method"],
                GRPC_DURATION_BUCKETS,
            )?,
            grpc_in_flight: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "chatcli_grpc_in_flight_requests",
                        "gRPC calls currently being served.",
                    ),
                    &["method"],
                )?,
            )?,
            grpc_messages_sent: counter_vec(
                &registry,
                "chatcli_grpc_stream_messages_sent_total",
                "Stream messages sent by the server.",
                &["method"],
            )?,
            grpc_messages_received: counter_vec(
                &registry,
                "chatcli_grpc_stream_messages_received_total",
                "Stream messages received by the server.",
                &["method"],
            )?,
            llm_requests: counter_vec(
                &registry,
                "chatcli_llm_requests_total",
                "Total LLM provider calls, by status (success or error).",
                &["provider", "model", "status"],
            )?,
            llm_duration: histogram_vec(
                &registry,
                "chatcli_llm_request_duration_seconds",
                "Duration of LLM provider calls, in seconds.",
                &["provider", "model"],
                LLM_DURATION_BUCKETS,
            )?,
            llm_errors: counter_vec(
                &registry,
                "chatcli_llm_errors_total",
                "Failed LLM provider calls, by error type.",
                &["provider", "model", "error_type"],
            )?,
            llm_tokens: counter_vec(
                &registry,
                "chatcli_llm_tokens_used_total",
                "Tokens used by LLM provider calls, by token type.",
                &["provider", "model", "type"],
            )?,
            llm_ttft: histogram_vec(
                &registry,
                "chatcli_llm_time_to_first_token_seconds",
                "Time from sending a provider call to its first answer delta, in seconds.",
                &["provider", "model"],
                TTFT_BUCKETS,
            )?,
            llm_fallback: counter_vec(
                &registry,
                "chatcli_llm_fallback_total",
                "Calls handed from one provider of the fallback chain to the next, by reason.",
                &["from", "to", "reason"],
            )?,
            session_active: register(
                &registry,
                IntGauge::new(
                    "chatcli_session_active_total",
                    "Open InteractiveSession streams.",
                )?,
            )?,
            session_operations: counter_vec(
                &registry,
                "chatcli_session_operations_total",
                "Session store operations, by operation (save, load, list, delete).",
                &["operation"],
            )?,
            errors: counter_vec(
                &registry,
                "chatcli_errors_total",
                "Errors answered on either transport, by stable error code (docs/errors.md).",
                &["code"],
            )?,
            aiops_parse_failures: counter_vec(
                &registry,
                "chatcli_aiops_parse_failures_total",
                "AnalyzeIssue and AgenticStep answers that were not the JSON asked for, after one \
                 retry, by RPC.",
                &["rpc"],
            )?,
            server_info: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "chatcli_server_info",
                        "Server version and default provider and model; always 1.",
                    ),
                    &["version", "provider", "model"],
                )?,
            )?,
            uptime: register(
                &registry,
                Gauge::new(
                    "chatcli_server_uptime_seconds",
                    "Seconds since the server started.",
                )?,
            )?,
            start: Instant::now(),
            registry,
            llm_series: Default::default(),
            grpc_series: Default::default(),
        };
        metrics.register_process_collector();
        Ok(metrics)
    }

    #[cfg(target_os = "linux")]
    fn register_process_collector(&self) {
        let collector = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(e) = self.registry.register(Box::new(collector)) {
            tracing::debug!(error = %e, "process metrics unavailable");
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn register_process_collector(&self) {}

    /// The registry, for scraping or for registering further collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// All metrics in the Prometheus text format 0.0.4, uptime refreshed first.
    pub fn render(&self) -> String {
        self.uptime.set(self.start.elapsed().as_secs_f64());
        let families = self.registry.gather();
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Counts one message sent on the stream of `method` (a full gRPC path).
    pub fn stream_message_sent(&self, method: &str) {
        self.stream_messages_sent(method).inc();
    }

    /// The counter of messages sent on the streams of `method`, for a stream that sends many: one
    /// lookup instead of one per message. Take it when the first message goes out, so a stream
    /// that sends none adds no zero series.
    pub fn stream_messages_sent(&self, method: &str) -> IntCounter {
        self.grpc_messages_sent.with_label_values(&[method])
    }

    /// Counts one message received on the stream of `method` (a full gRPC path).
    pub fn stream_message_received(&self, method: &str) {
        self.grpc_messages_received
            .with_label_values(&[method])
            .inc();
    }

    /// The LLM series of `provider` and `model`, to record a call with.
    pub fn llm(&self, provider: &str, model: &str) -> Arc<LlmSeries> {
        self.llm_series.get(provider, model, || LlmSeries {
            provider: provider.to_owned(),
            model: model.to_owned(),
            requests: self.llm_requests.clone(),
            duration: self.llm_duration.clone(),
            errors: self.llm_errors.clone(),
            tokens: self.llm_tokens.clone(),
            ttft: self.llm_ttft.clone(),
            success: OnceLock::new(),
            duration_of: OnceLock::new(),
            prompt_tokens: OnceLock::new(),
            completion_tokens: OnceLock::new(),
            ttft_of: OnceLock::new(),
        })
    }

    /// Counts one hand-over in the fallback chain.
    pub fn record_fallback(&self, from: &str, to: &str, reason: &str) {
        self.llm_fallback
            .with_label_values(&[from, to, reason])
            .inc();
    }

    /// Counts an open InteractiveSession stream until the returned guard is dropped.
    pub fn session_started(&self) -> ActiveSession {
        self.session_active.inc();
        ActiveSession {
            gauge: self.session_active.clone(),
        }
    }

    /// Counts one session store operation.
    pub fn session_operation(&self, operation: SessionOperation) {
        self.session_operations
            .with_label_values(&[operation.as_str()])
            .inc();
    }

    /// Counts an error answered with the stable error code `code`.
    pub fn error_answered(&self, code: &str) {
        self.errors.with_label_values(&[code]).inc();
    }

    /// Counts an AIOps answer (`rpc`: `AnalyzeIssue` or `AgenticStep`) that stayed unparsable
    /// after its retry.
    pub fn aiops_parse_failure(&self, rpc: &str) {
        self.aiops_parse_failures.with_label_values(&[rpc]).inc();
    }

    /// Replaces the single `chatcli_server_info` series.
    pub fn set_server_info(&self, version: &str, provider: &str, model: &str) {
        self.server_info.reset();
        self.server_info
            .with_label_values(&[version, provider, model])
            .set(1);
    }

    /// The gRPC series of `method` (a full path, or `unknown`).
    pub(crate) fn grpc(&self, method: &str) -> Arc<GrpcSeries> {
        self.grpc_series.get(method, "", || GrpcSeries {
            method: method.to_owned(),
            in_flight: OnceLock::new(),
            ok: OnceLock::new(),
            duration: OnceLock::new(),
        })
    }

    pub(crate) fn grpc_call_started(&self, series: &GrpcSeries) {
        series
            .in_flight
            .get_or_init(|| self.grpc_in_flight.with_label_values(&[&series.method]))
            .inc();
    }

    pub(crate) fn grpc_call_finished(&self, series: &GrpcSeries, code: &str, elapsed: Duration) {
        let method = series.method.as_str();
        match code {
            "OK" => series
                .ok
                .get_or_init(|| self.grpc_requests.with_label_values(&[method, code]))
                .inc(),
            _ => self.grpc_requests.with_label_values(&[method, code]).inc(),
        }
        series
            .duration
            .get_or_init(|| self.grpc_duration.with_label_values(&[method]))
            .observe(elapsed.as_secs_f64());
        series
            .in_flight
            .get_or_init(|| self.grpc_in_flight.with_label_values(&[method]))
            .dec();
    }
}

/// Keeps `chatcli_session_active_total` incremented while alive.
#[must_use = "the session stops being counted when the guard is dropped"]
#[derive(Debug)]
pub struct ActiveSession {
    gauge: IntGauge,
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> Result<C, prometheus::Error> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> Result<HistogramVec, prometheus::Error> {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(registry, HistogramVec::new(opts, labels)?)
}

// ---- Conversation hub ---------------------------------------------------------------------------

/// The conversation hub's series, registered in a server's registry by [`HubMetrics::register`].
#[derive(Clone, Debug)]
pub struct HubMetrics {
    /// `chatcli_hub_events_appended_total`: events stored by `AppendEvent` (an idempotent retry
    /// that stored nothing new is not counted).
    pub events_appended: IntCounter,
    /// `chatcli_hub_subscribers`: open `SubscribeConversation` streams.
    pub subscribers: IntGauge,
    /// `chatcli_hub_store_bytes`: size of the hub's store (database and write-ahead log).
    pub store_bytes: IntGauge,
}

impl HubMetrics {
    /// Registers the hub's series in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        Ok(Self {
            events_appended: register(
                registry,
                IntCounter::new(
                    "chatcli_hub_events_appended_total",
                    "Conversation hub events stored",
                )?,
            )?,
            subscribers: register(
                registry,
                IntGauge::new(
                    "chatcli_hub_subscribers",
                    "Open conversation hub subscriptions",
                )?,
            )?,
            store_bytes: register(
                registry,
                IntGauge::new(
                    "chatcli_hub_store_bytes",
                    "Size of the conversation hub store in bytes",
                )?,
            )?,
        })
    }
}

// The Kubernetes watcher's metrics, registered by the watcher itself on the server's registry.

/// `chatcli_watcher_*`: collection time, alerts raised, pods ready and desired, targets.
#[derive(Debug, Clone)]
pub struct WatcherMetrics {
    /// `chatcli_watcher_collection_duration_seconds{target}`.
    pub collection_duration: HistogramVec,
    /// `chatcli_watcher_collection_errors_total{target}`.
    pub collection_errors: IntCounterVec,
    /// `chatcli_watcher_alerts_total{target,severity,type}`: alerts raised (once per condition).
    pub alerts: IntCounterVec,
    /// `chatcli_watcher_pods_ready{namespace,deployment}`.
    pub pods_ready: prometheus::IntGaugeVec,
    /// `chatcli_watcher_pods_desired{namespace,deployment}`.
    pub pods_desired: prometheus::IntGaugeVec,
    /// `chatcli_watcher_targets_monitored`.
    pub targets: prometheus::IntGauge,
}

impl WatcherMetrics {
    /// Registers the watcher's metrics on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge_vec = |name: &str, help: &str| {
            register(
                registry,
                prometheus::IntGaugeVec::new(Opts::new(name, help), &["namespace", "deployment"])?,
            )
        };
        Ok(Self {
            collection_duration: histogram_vec(
                registry,
                "chatcli_watcher_collection_duration_seconds",
                "Time to collect one target.",
                &["target"],
                &[0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0],
            )?,
            collection_errors: counter_vec(
                registry,
                "chatcli_watcher_collection_errors_total",
                "Collections of a target that could not read the API.",
                &["target"],
            )?,
            alerts: counter_vec(
                registry,
                "chatcli_watcher_alerts_total",
                "Alerts raised, once per condition while it lasts.",
                &["target", "severity", "type"],
            )?,
            pods_ready: gauge_vec("chatcli_watcher_pods_ready", "Ready pods of a target.")?,
            pods_desired: gauge_vec("chatcli_watcher_pods_desired", "Desired pods of a target.")?,
            targets: register(
                registry,
                prometheus::IntGauge::new(
                    "chatcli_watcher_targets_monitored",
                    "Targets the watcher collects.",
                )?,
            )?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The value of the sample line `series` (name with labels, as rendered) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
    }

    const ALL_NAMES: &[(&str, &str)] = &[
        ("chatcli_grpc_requests_total", "counter"),
        ("chatcli_grpc_request_duration_seconds", "histogram"),
        ("chatcli_grpc_in_flight_requests", "gauge"),
        ("chatcli_grpc_stream_messages_sent_total", "counter"),
        ("chatcli_grpc_stream_messages_received_total", "counter"),
        ("chatcli_llm_requests_total", "counter"),
        ("chatcli_llm_request_duration_seconds", "histogram"),
        ("chatcli_llm_errors_total", "counter"),
        ("chatcli_llm_tokens_used_total", "counter"),
        ("chatcli_session_active_total", "gauge"),
        ("chatcli_session_operations_total", "counter"),
        ("chatcli_errors_total", "counter"),
        ("chatcli_server_info", "gauge"),
        ("chatcli_server_uptime_seconds", "gauge"),
    ];

    #[test]
    fn render_lists_every_metric_with_help_and_type() {
        let m = Metrics::new().unwrap();
        m.grpc_call_started(&m.grpc("/x/A"));
        m.grpc_call_finished(&m.grpc("/x/A"), "OK", Duration::from_millis(20));
        m.stream_message_sent("/x/A");
        m.stream_message_received("/x/A");
        m.llm("openai", "gpt")
            .request(LlmStatus::Success, Duration::from_secs(3));
        m.llm("openai", "gpt").error(LlmErrorType::RateLimit);
        m.llm("openai", "gpt").tokens("prompt", 7);
        let session = m.session_started();
        m.session_operation(SessionOperation::Save);
        m.error_answered("upstream_rate_limited");
        m.set_server_info("1.2.3", "openai", "gpt");
        std::thread::sleep(Duration::from_millis(20));
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                r#"chatcli_errors_total{code="upstream_rate_limited"}"#
            ),
            Some(1.0)
        );
        for (name, kind) in ALL_NAMES {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "no TYPE for {name}"
            );
        }
        assert_eq!(
            sample(
                &text,
                r#"chatcli_grpc_requests_total{code="OK",method="/x/A"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"chatcli_grpc_in_flight_requests{method="/x/A"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"chatcli_grpc_request_duration_seconds_bucket{method="/x/A",le="0.05"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"chatcli_grpc_request_duration_seconds_bucket{method="/x/A",le="0.01"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"chatcli_llm_requests_total{model="gpt",provider="openai",status="success"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"chatcli_llm_errors_total{error_type="rate_limit",model="gpt",provider="openai"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"chatcli_llm_tokens_used_total{model="gpt",provider="openai",type="prompt"}"#
            ),
            Some(7.0)
        );
        assert_eq!(sample(&text, "chatcli_session_active_total"), Some(1.0));
        assert_eq!(
            sample(
                &text,
                r#"chatcli_session_operations_total{operation="save"}"#
            ),
            Some(1.0)
        );
        let uptime = sample(&text, "chatcli_server_uptime_seconds").unwrap();
        assert!(uptime > 0.0, "uptime {uptime}");
        drop(session);
        assert_eq!(
            sample(&m.render(), "chatcli_session_active_total"),
            Some(0.0)
        );
    }

    #[test]
    fn buckets_match_the_protocol() {
        let m = Metrics::new().unwrap();
        m.grpc_call_finished(&m.grpc("/x/A"), "OK", Duration::ZERO);
        m.llm("p", "m").request(LlmStatus::Error, Duration::ZERO);
        let bounds = |name: &str| -> Vec<f64> {
            let families = m.registry().gather();
            let family = families.iter().find(|f| f.name() == name).unwrap();
            family.get_metric()[0]
                .get_histogram()
                .get_bucket()
                .iter()
                .map(|b| b.upper_bound())
                .collect()
        };
        assert_eq!(
            bounds("chatcli_grpc_request_duration_seconds"),
            GRPC_DURATION_BUCKETS
        );
        assert_eq!(
            bounds("chatcli_llm_request_duration_seconds"),
            [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0]
        );
    }

    #[test]
    fn two_instances_do_not_share_series() {
        let a = Metrics::new().unwrap();
        let b = Metrics::new().unwrap();
        a.session_operation(SessionOperation::Delete);
        assert!(a.render().contains(r#"operation="delete""#));
        assert!(!b.render().contains(r#"operation="delete""#));
    }

    #[test]
    fn server_info_keeps_exactly_one_series() {
        let m = Metrics::new().unwrap();
        m.set_server_info("1.0.0", "openai", "gpt-4o");
        m.set_server_info("1.0.1", "claudeai", "sonnet");
        let text = m.render();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("chatcli_server_info{"))
            .collect();
        assert_eq!(
            series,
            [r#"chatcli_server_info{model="sonnet",provider="claudeai",version="1.0.1"} 1"#]
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_collector_is_registered() {
        let text = Metrics::new().unwrap().render();
        assert!(text.contains("process_cpu_seconds_total"), "{text}");
    }

    #[test]
    fn clones_share_series() {
        let m = Metrics::new().unwrap();
        m.clone().session_operation(SessionOperation::List);
        assert_eq!(
            sample(
                &m.render(),
                r#"chatcli_session_operations_total{operation="list"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn kept_series_count_like_fresh_ones_and_add_no_zero_series() {
        let m = Metrics::new().unwrap();
        let s = m.llm("p", "m");
        assert!(Arc::ptr_eq(&s, &m.llm("p", "m")), "the label set is kept");
        assert!(!Arc::ptr_eq(&s, &m.llm("p", "m2")));
        s.request(LlmStatus::Success, Duration::from_secs(1));
        m.llm("p", "m")
            .request(LlmStatus::Success, Duration::from_secs(1));
        m.clone().llm("p", "m").tokens("prompt", 5);
        s.tokens("prompt", 2);
        s.ttft(Duration::from_millis(30));
        let text = m.render();
        let p = r#"model="m",provider="p""#;
        assert_eq!(
            sample(
                &text,
                &format!(r#"chatcli_llm_requests_total{{{p},status="success"}}"#)
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!(r#"chatcli_llm_tokens_used_total{{{p},type="prompt"}}"#)
            ),
            Some(7.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!(r#"chatcli_llm_request_duration_seconds_count{{{p}}}"#)
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!(r#"chatcli_llm_time_to_first_token_seconds_count{{{p}}}"#)
            ),
            Some(1.0)
        );
        // Nothing that did not happen: no error, completion-token or other model's series.
        for absent in [r#"status="error""#, r#"type="completion""#, r#"model="m2""#] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }

        let g = m.grpc("/x/A");
        assert!(Arc::ptr_eq(&g, &m.grpc("/x/A")));
        m.grpc_call_started(&g);
        assert_eq!(
            sample(
                &m.render(),
                r#"chatcli_grpc_in_flight_requests{method="/x/A"}"#
            ),
            Some(1.0)
        );
        m.grpc_call_finished(&g, "NotFound", Duration::ZERO);
        let text = m.render();
        assert_eq!(
            sample(&text, r#"chatcli_grpc_in_flight_requests{method="/x/A"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"chatcli_grpc_requests_total{code="NotFound",method="/x/A"}"#
            ),
            Some(1.0)
        );
        assert!(!text.contains(r#"code="OK""#), "{text}");
    }

    #[test]
    fn label_sets_past_the_cache_bound_are_still_counted() {
        let m = Metrics::new().unwrap();
        let n = SERIES_CACHE_MAX + 5;
        for i in 0..n {
            m.llm("p", &format!("m{i}"))
                .request(LlmStatus::Success, Duration::ZERO);
        }
        let last = format!("m{}", n - 1);
        assert!(
            !Arc::ptr_eq(&m.llm("p", &last), &m.llm("p", &last)),
            "not kept"
        );
        m.llm("p", &last)
            .request(LlmStatus::Success, Duration::ZERO);
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                &format!(
                    r#"chatcli_llm_requests_total{{model="{last}",provider="p",status="success"}}"#
                )
            ),
            Some(2.0)
        );
        let kept = m.llm_series.inner.read().unwrap().0;
        assert_eq!(kept, SERIES_CACHE_MAX);
    }
}
