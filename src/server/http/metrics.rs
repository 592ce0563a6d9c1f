//! `chatcli_http_requests_total{route,status}` and `chatcli_http_request_duration_seconds{route}`,
//! registered beside the gRPC series. `route` is the route template (`/v1/chat/completions`),
//! `unmatched` for paths without a route, so callers cannot mint series. A call is counted when its
//! response body ends (or the client goes away), so a stream's duration is the whole stream.
//! Calls refused by authentication or the rate limit are counted too (see `HttpApi::serve`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http_body::Frame;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use crate::telemetry::metrics::SeriesCache;

const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The HTTP series.
#[derive(Clone)]
pub(super) struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    /// The handles of each (route, status), looked up once per call instead of twice in the vectors.
    series: Arc<SeriesCache<HttpSeries>>,
}

/// The series one call under a route with a status counts in.
struct HttpSeries {
    requests: IntCounter,
    duration: Histogram,
}

impl HttpMetrics {
    /// Creates the series in `registry`.
    pub(super) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "chatcli_http_requests_total",
                "Total HTTP requests on the main listener, by route template and HTTP status.",
            ),
            &["route", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "chatcli_http_request_duration_seconds",
                "Duration of HTTP requests from request to the end of the response body, in seconds.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self {
            requests,
            duration,
            series: Arc::default(),
        })
    }
}

impl HttpMetrics {
    /// Counts the call under `route` and the response's status when its body ends.
    pub(super) fn track(&self, route: &'static str, started: Instant, resp: Response) -> Response {
        let status = resp.status();
        let series = self.series.get(route, status.as_str(), || HttpSeries {
            requests: self.requests.with_label_values(&[route, status.as_str()]),
            duration: self.duration.with_label_values(&[route]),
        });
        let record = Record { series, started };
        resp.map(|inner| {
            Body::new(Tracked {
                inner,
                record: Some(record),
            })
        })
    }
}

struct Record {
    series: Arc<HttpSeries>,
    started: Instant,
}

impl Drop for Record {
    fn drop(&mut self) {
        self.series.requests.inc();
        self.series
            .duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// A response body that records its call when it ends or is dropped.
struct Tracked {
    inner: Body,
    record: Option<Record>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if !matches!(polled, Some(Ok(_))) {
            this.record.take();
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
