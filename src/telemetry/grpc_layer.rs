//! A tower layer that records `chatcli_grpc_requests_total`, `_request_duration_seconds` and
//! `_in_flight_requests` for every gRPC call passing through it.
//!
//! A call's status is in the response headers for trailers-only responses and otherwise in the
//! trailers at the end of the body, so the response body is wrapped and the call is recorded when
//! the body ends, or when the body or the response future is dropped: a `CallRecorder` does the
//! recording in its `Drop`, which makes it happen exactly once on every path.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tonic::Code;
use tower::{Layer, Service};

use super::Metrics;
use super::metrics::GrpcSeries;

/// The `method` label of calls to paths outside [`GrpcMetricsLayer::with_known_methods`].
pub const UNKNOWN_METHOD: &str = "unknown";

/// The Go (grpc-go `codes.Code.String()`) name of `code`, the `code` label value.
pub const fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Wraps a gRPC service (tonic `Routes`, an axum `Router` of gRPC routes) to record call metrics.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
    known_methods: Option<Arc<HashSet<String>>>,
}

impl GrpcMetricsLayer {
    /// Records every call under its request path.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            known_methods: None,
        }
    }

    /// Records calls to paths outside `methods` (full paths such as
    /// `/chatcli.v1.ChatCLIService/SendPrompt`) under [`UNKNOWN_METHOD`], so that clients probing
    /// random paths cannot create unbounded series.
    #[must_use]
    pub fn with_known_methods<I, M>(mut self, methods: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        self.known_methods = Some(Arc::new(methods.into_iter().map(Into::into).collect()));
        self
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`GrpcMetricsLayer`].
#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    layer: GrpcMetricsLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcMetricsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let method = match &self.layer.known_methods {
            Some(known) if !known.contains(path) => UNKNOWN_METHOD,
            _ => path,
        };
        let series = self.layer.metrics.grpc(method);
        let recorder = CallRecorder::start(Arc::clone(&self.layer.metrics), series);
        ResponseFuture {
            inner: Box::pin(self.inner.call(request)),
            recorder: Some(recorder),
        }
    }
}

/// The future of [`GrpcMetricsService`]; dropping it before the response counts `Canceled`.
pub struct ResponseFuture<F> {
    inner: Pin<Box<F>>,
    recorder: Option<CallRecorder>,
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<MetricsBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let result = ready!(this.inner.as_mut().poll(cx));
        let mut recorder = this.recorder.take();
        match result {
            Ok(response) => {
                if let Some(recorder) = &mut recorder {
                    recorder.code = status_of(response.headers());
                }
                Poll::Ready(Ok(response.map(|body| MetricsBody {
                    inner: Box::pin(body),
                    recorder,
                })))
            }
            Err(error) => {
                if let Some(recorder) = &mut recorder {
                    recorder.ended = true;
                }
                Poll::Ready(Err(error))
            }
        }
    }
}

/// A response body that records its call when it ends or is dropped.
pub struct MetricsBody<B: Body> {
    inner: Pin<Box<B>>,
    recorder: Option<CallRecorder>,
}

impl<B: Body> MetricsBody<B> {
    fn finish(&mut self, trailers: Option<&HeaderMap>) {
        if let Some(mut recorder) = self.recorder.take() {
            if recorder.code.is_none() {
                recorder.code = trailers.and_then(status_of);
            }
            recorder.ended = true;
        }
    }
}

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = ready!(this.inner.as_mut().poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.finish(Some(trailers));
                }
            }
            // A body error resets the stream: the server failed, the client did not cancel.
            Some(Err(_)) | None => this.finish(None),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body> Drop for MetricsBody<B> {
    fn drop(&mut self) {
        // hyper need not poll a body that reports its end (a trailers-only response): that is a
        // complete response, not a cancellation.
        if let Some(recorder) = &mut self.recorder
            && self.inner.is_end_stream()
        {
            recorder.ended = true;
        }
    }
}

/// Records one call exactly once, when dropped.
struct CallRecorder {
    metrics: Arc<Metrics>,
    series: Arc<GrpcSeries>,
    start: Instant,
    code: Option<Code>,
    /// The response completed (or failed) without a cancellation.
    ended: bool,
}

impl CallRecorder {
    fn start(metrics: Arc<Metrics>, series: Arc<GrpcSeries>) -> Self {
        metrics.grpc_call_started(&series);
        Self {
            metrics,
            series,
            start: Instant::now(),
            code: None,
            ended: false,
        }
    }
}

impl Drop for CallRecorder {
    fn drop(&mut self) {
        let code = match self.code {
            Some(code) => code,
            None if self.ended => Code::Unknown,
            None => Code::Cancelled,
        };
        self.metrics
            .grpc_call_finished(&self.series, code_name(code), self.start.elapsed());
    }
}

/// gRPC's status header (or trailer), as a constant: looking it up by `&str` parses the name on
/// every call.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The `grpc-status` in `headers`; an unparsable value is `Unknown`.
fn status_of(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get(&GRPC_STATUS)?;
    Some(code_of(value).unwrap_or(Code::Unknown))
}

/// A `grpc-status` value as a code, when it is a number.
pub fn code_of(value: &HeaderValue) -> Option<Code> {
    let n = value.to_str().ok()?.trim().parse::<i32>().ok()?;
    Some(Code::from_i32(n))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Empty, StreamBody};
    use tower::{ServiceExt, service_fn};

    type TestBody = BoxBody<Bytes, Infallible>;

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new().unwrap())
    }

    fn request(path: &str) -> Request<Empty<Bytes>> {
        Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .body(Empty::new())
            .unwrap()
    }

    fn trailers(code: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert("grpc-status", code.parse().unwrap());
        map
    }

    /// Two data frames then trailers with `grpc-status: 0`.
    fn streaming_body() -> TestBody {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"one"))),
            Ok(Frame::data(Bytes::from_static(b"two"))),
            Ok(Frame::trailers(trailers("0"))),
        ];
        BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)))
    }

    /// Answers per path: /x/A trailers-only NotFound, /x/B and /x/C a stream ending in OK,
    /// /x/D a body that ends without any status, /x/E an error, /x/G an empty body without status.
    async fn handler(req: Request<Empty<Bytes>>) -> Result<Response<TestBody>, &'static str> {
        match req.uri().path() {
            "/x/A" => Ok(Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "5")
                .body(BodyExt::boxed(Empty::new()))
                .unwrap()),
            "/x/B" | "/x/C" => Ok(Response::new(streaming_body())),
            "/x/D" => Ok(Response::new(BodyExt::boxed(http_body_util::Full::new(
                Bytes::from_static(b"data"),
            )))),
            "/x/E" => Err("inner failure"),
            "/x/G" => Ok(Response::new(BodyExt::boxed(Empty::new()))),
            _ => Ok(Response::builder()
                .header("grpc-status", "12")
                .body(BodyExt::boxed(Empty::new()))
                .unwrap()),
        }
    }

    fn counter(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        find(m, name, labels).map(|metric| {
            let c = metric.get_counter().get_value();
            let g = metric.get_gauge().get_value();
            c + g
        })
    }

    fn histogram_count(m: &Metrics, method: &str) -> u64 {
        find(
            m,
            "chatcli_grpc_request_duration_seconds",
            &[("method", method)],
        )
        .map_or(0, |metric| metric.get_histogram().get_sample_count())
    }

    fn find(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<prometheus::proto::Metric> {
        let families = m.registry().gather();
        let family = families.into_iter().find(|f| f.name() == name)?;
        family
            .get_metric()
            .iter()
            .find(|metric| {
                labels.iter().all(|(k, v)| {
                    metric
                        .get_label()
                        .iter()
                        .any(|pair| pair.name() == *k && pair.value() == *v)
                })
            })
            .cloned()
    }

    fn requests(m: &Metrics, method: &str, code: &str) -> Option<f64> {
        counter(
            m,
            "chatcli_grpc_requests_total",
            &[("method", method), ("code", code)],
        )
    }

    fn in_flight(m: &Metrics, method: &str) -> Option<f64> {
        counter(m, "chatcli_grpc_in_flight_requests", &[("method", method)])
    }

    #[tokio::test]
    async fn trailers_only_status_comes_from_headers() {
        let m = metrics();
        let svc = GrpcMetricsLayer::new(Arc::clone(&m)).layer(service_fn(handler));
        let response = svc.oneshot(request("/x/A")).await.unwrap();
        assert_eq!(
            in_flight(&m, "/x/A"),
            Some(1.0),
            "counted until the body ends"
        );
        let collected = response.into_body().collect().await.unwrap();
        assert!(collected.trailers().is_none());
        assert_eq!(requests(&m, "/x/A", "NotFound"), Some(1.0));
        assert_eq!(in_flight(&m, "/x/A"), Some(0.0));
        assert_eq!(histogram_count(&m, "/x/A"), 1);
        let text = m.render();
        assert!(
            text.contains(r#"chatcli_grpc_requests_total{code="NotFound",method="/x/A"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn trailers_only_body_dropped_unpolled_keeps_header_status() {
        let m = metrics();
        let svc = GrpcMetricsLayer::new(Arc::clone(&m)).layer(service_fn(handler));
        let response = svc.oneshot(request("/x/A")).await.unwrap();
        drop(response);
        assert_eq!(requests(&m, "/x/A", "NotFound"), Some(1.0));
        assert_eq!(in_flight(&m, "/x/A"), Some(0.0));
    }

    #[tokio::test]
    async fn streaming_status_comes_from_trailers_and_data_passes_through() {
        let m = metrics();
        let svc = GrpcMetricsLayer::new(Arc::clone(&m)).layer(service_fn(handler));
        let response = svc.oneshot(request("/x/B")).await.unwrap();
        let mut body = response.into_body();
        assert!(!body.is_end_stream());
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "one");
        assert_eq!(in_flight(&m, "/x/B"), Some(1.0), "still streaming");
        assert_eq!(
            requests(&m, "/x/B", "OK"),
            None,
            "not recorded before the end"
        );
        let rest = body.collect().await.unwrap();
        assert_eq!(
            rest.trailers().unwrap().get("grpc-status").unwrap(),
            "0",
            "trailers are forwarded"
        );
        assert_eq!(rest.to_bytes(), "two");
        assert_eq!(requests(&m, "/x/B", "OK"), Some(1.0));
        assert_eq!(in_flight(&m, "/x/B"), Some(0.0));
        assert_eq!(histogram_count(&m, "/x/B"), 1);
    }

    #[tokio::test]
    async fn body_dropped_early_is_canceled() {
        let m = metrics();
        let svc = GrpcMetricsLayer::new(Arc::clone(&m)).layer(service_fn(handler));
        let response = svc.oneshot(request("/x/C")).await.unwrap();
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(requests(&m, "/x/C", "Canceled"), Some(1.0));
        assert_eq!(requests(&m, "/x/C", "OK"), None);
        assert_eq!(in_flight(&m, "/x/C"), Some(0.0));
        assert_eq!(histogram_count(&m, "/x/C"), 1);
    }

    #[tokio::test]
    async fn body_without_status_is_unknown() {
        let m = metrics();
        let svc = GrpcMetricsLayer::new(Arc::clone(&m)).layer(service_fn(handler));
        let response = svc.oneshot(request("/x/D")).await.unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(requests(&m, "/x/D", "Unknown"), Some(1.0));
        assert_eq!(in_flight(&m, "/x/D"), Some(0.0));
        assert_eq!(histogram_count(&m, "/x/D"), 1);
    }

    #[tokio::test]
    async fn finished_body_dropped_unpolled_is_not_canceled() {
        let m = metrics();
        let svc = GrpcMetricsLayer::new(Arc::clone(&m)).layer(service_fn(handler));
        let response = svc.oneshot(request("/x/G")).await.unwrap();
        assert!(response.body().is_end_stream());
        drop(response);
        assert_eq!(requests(&m, "/x/G", "Unknown"), Some(1.0));
        assert_eq!(requests(&m, "/x/G", "Canceled"), None);
    }

    #[tokio::test]
    async fn inner_error_is_unknown() {
        let m = metrics();
        let svc = GrpcMetricsLayer::new(Arc::clone(&m)).layer(service_fn(handler));
        assert!(svc.oneshot(request("/x/E")).await.is_err());
        assert_eq!(requests(&m, "/x/E", "Unknown"), Some(1.0));
        assert_eq!(in_flight(&m, "/x/E"), Some(0.0));
        assert_eq!(histogram_count(&m, "/x/E"), 1);
    }

    #[tokio::test]
    async fn future_dropped_before_response_is_canceled() {
        let m = metrics();
        let never = service_fn(|_req: Request<Empty<Bytes>>| {
            std::future::pending::<Result<Response<TestBody>, Infallible>>()
        });
        let svc = GrpcMetricsLayer::new(Arc::clone(&m)).layer(never);
        let call = svc.oneshot(request("/x/F"));
        assert!(
            tokio::time::timeout(Duration::from_millis(20), call)
                .await
                .is_err()
        );
        assert_eq!(requests(&m, "/x/F", "Canceled"), Some(1.0));
        assert_eq!(in_flight(&m, "/x/F"), Some(0.0));
    }

    #[tokio::test]
    async fn unknown_paths_collapse_when_methods_are_known() {
        let m = metrics();
        let svc = GrpcMetricsLayer::new(Arc::clone(&m))
            .with_known_methods(["/x/A"])
            .layer(service_fn(handler));
        for path in ["/x/A", "/random/1", "/random/2"] {
            let response = svc.clone().oneshot(request(path)).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(requests(&m, "/x/A", "NotFound"), Some(1.0));
        assert_eq!(requests(&m, UNKNOWN_METHOD, "Unimplemented"), Some(2.0));
        assert!(!m.render().contains("/random/"));
    }

    #[test]
    fn status_parsing_and_names() {
        assert_eq!(status_of(&trailers("0")), Some(Code::Ok));
        assert_eq!(status_of(&trailers("16")), Some(Code::Unauthenticated));
        assert_eq!(status_of(&trailers("99")), Some(Code::Unknown));
        assert_eq!(status_of(&trailers("x")), Some(Code::Unknown));
        assert_eq!(status_of(&HeaderMap::new()), None);
        let names: Vec<&str> = (0..=16).map(|i| code_name(Code::from_i32(i))).collect();
        assert_eq!(
            names,
            [
                "OK",
                "Canceled",
                "Unknown",
                "InvalidArgument",
                "DeadlineExceeded",
                "NotFound",
                "AlreadyExists",
                "PermissionDenied",
                "ResourceExhausted",
                "FailedPrecondition",
                "Aborted",
                "OutOfRange",
                "Unimplemented",
                "Internal",
                "Unavailable",
                "DataLoss",
                "Unauthenticated",
            ]
        );
    }

    /// A real tonic service behind `Routes`: a unary Check ends in trailers with OK, an unknown
    /// method of a known service is a trailers-only Unimplemented.
    #[tokio::test]
    async fn tonic_routes_through_the_layer() {
        let m = metrics();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let routes = tonic::service::Routes::new(health);
        let svc = GrpcMetricsLayer::new(Arc::clone(&m)).layer(routes);

        let check = Request::builder()
            .method("POST")
            .uri("http://localhost/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            // An empty HealthCheckRequest: uncompressed flag, zero length.
            .body(tonic::body::Body::new(http_body_util::Full::new(
                Bytes::from_static(&[0, 0, 0, 0, 0]),
            )))
            .unwrap();
        let response = svc.clone().oneshot(check).await.unwrap();
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(
            collected.trailers().unwrap().get("grpc-status").unwrap(),
            "0"
        );
        assert_eq!(
            requests(&m, "/grpc.health.v1.Health/Check", "OK"),
            Some(1.0)
        );

        let missing = Request::builder()
            .method("POST")
            .uri("http://localhost/grpc.health.v1.Health/Nope")
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::empty())
            .unwrap();
        let response = svc.oneshot(missing).await.unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(
            requests(&m, "/grpc.health.v1.Health/Nope", "Unimplemented"),
            Some(1.0)
        );
        assert_eq!(in_flight(&m, "/grpc.health.v1.Health/Check"), Some(0.0));
    }

    /// The layer fits both ways of serving the routes.
    #[allow(dead_code)] // reason: compile-time check only
    fn wiring_compiles(metrics: Arc<Metrics>, routes: tonic::service::Routes) {
        let layer = GrpcMetricsLayer::new(metrics);
        let _axum: axum::Router = routes.clone().into_axum_router().layer(layer.clone());
        let _tonic = tonic::transport::Server::builder()
            .layer(layer)
            .add_routes(routes);
    }
}
