//! Observability of the daemon: the global `tracing` subscriber and its rotated log file
//! ([`logging`]), the Prometheus metrics, with the existing ChatCLI's names ([`metrics`]) and the tower layer that
//! records the per-call gRPC metrics ([`grpc_layer`]).

pub mod grpc_layer;
pub mod logging;
pub mod metrics;

pub use grpc_layer::{
    GrpcMetricsLayer, GrpcMetricsService, MetricsBody, ResponseFuture, UNKNOWN_METHOD, code_name,
};
pub use logging::{LogFormat, LogGuard, LogSettings, LoggingError, init_logging};
pub use metrics::{
    ActiveSession, HubMetrics, LlmErrorType, LlmSeries, LlmStatus, Metrics, SessionOperation,
    WatcherMetrics,
};
