//! The accept loop of the main listener: one connection task per client, HTTP/1 and HTTP/2 on the
//! same port, each request authenticated and then dispatched by content type to the gRPC routes or
//! the HTTP router. Shutdown stops accepting, sends GOAWAY and waits for in-flight calls up to the
//! grace period, then aborts what is left.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use super::{AppState, Prepared};
use crate::telemetry::GrpcMetricsLayer;

type GrpcService = BoxCloneSyncService<Request<Incoming>, Response<Body>, Infallible>;

/// Every gRPC method path this server knows, so that metrics label anything else `unknown` instead of
/// letting unauthenticated callers mint new series.
fn known_methods() -> Vec<String> {
    use prost::Message as _;
    let mut out = Vec::new();
    for set in [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(fds) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in fds.file {
            for svc in &file.service {
                for m in &svc.method {
                    out.push(format!("/{}.{}/{}", file.package(), svc.name(), m.name()));
                }
            }
        }
    }
    for v in ["v1", "v1alpha"] {
        out.push(format!(
            "/grpc.reflection.{v}.ServerReflection/ServerReflectionInfo"
        ));
    }
    out
}

/// The gRPC side: metrics outermost (so refused calls are counted too), then auth, then the routes.
fn grpc_service(state: &AppState, routes: tonic::service::Routes) -> GrpcService {
    let router = routes.into_axum_router();
    let authorized = tower::service_fn(move |mut req: Request<Incoming>| {
        let router = router.clone();
        async move {
            if !authorize(&mut req) {
                return Ok::<_, Infallible>(unauthenticated(true));
            }
            router.oneshot(req).await
        }
    });
    match &state.metrics {
        Some(m) => {
            let layered = tower::ServiceBuilder::new()
                .layer(GrpcMetricsLayer::new(m.clone()).with_known_methods(known_methods()))
                .service(authorized);
            BoxCloneSyncService::new(ServiceExt::<Request<Incoming>>::map_response(
                layered,
                |r| r.map(Body::new),
            ))
        }
        None => BoxCloneSyncService::new(authorized),
    }
}

/// Resolves the caller with the request's snapshot and puts the principal into the extensions;
/// `false` when the call must be refused (the reason goes to the log only).
fn authorize(req: &mut Request<Incoming>) -> bool {
    let Some(prepared) = req.extensions().get::<Arc<Prepared>>().cloned() else {
        return false;
    };
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match prepared.auth.authenticate(authorization) {
        Ok(p) => {
            req.extensions_mut().insert(p);
            true
        }
        Err(_) if crate::auth::is_exempt(req.uri().path()) => true,
        Err(e) => {
            let peer = req
                .extensions()
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_string())
                .unwrap_or_default();
            tracing::warn!(peer = %peer, path = req.uri().path(), reason = %e, "authentication failed");
            false
        }
    }
}

/// Accepts until `shutdown`, then drains.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    routes: tonic::service::Routes,
    http: Router,
    shutdown: CancellationToken,
    on_drain: impl Future<Output = ()>,
    grace: Duration,
) {
    let grpc = grpc_service(&state, routes);
    let max_streams = state.prepared().config.server.max_concurrent_streams;
    let local = listener.local_addr().ok();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let grpc = grpc.clone();
                let http = http.clone();
                let svc = tower::service_fn(move |req: Request<Incoming>| {
                    dispatch(state.clone(), grpc.clone(), http.clone(), local, remote, req)
                });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder.http2().max_concurrent_streams(max_streams);
                let conn = builder
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                    .into_owned();
                let watched = graceful.watch(conn);
                conns.spawn(async move {
                    if let Err(e) = watched.await {
                        tracing::debug!(peer = %remote, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    tracing::info!(in_flight_connections = conns.len(), grace = ?grace, "draining");
    on_drain.await;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            left = conns.len(),
            "grace period over; closing the remaining connections"
        );
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn dispatch(
    state: Arc<AppState>,
    grpc: GrpcService,
    http: Router,
    local: Option<SocketAddr>,
    remote: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let ext = req.extensions_mut();
    ext.insert(tonic::transport::server::TcpConnectInfo {
        local_addr: local,
        remote_addr: Some(remote),
    });
    ext.insert(axum::extract::ConnectInfo(remote));
    ext.insert(state.prepared());
    if is_grpc {
        grpc.oneshot(req).await
    } else if authorize(&mut req) {
        http.oneshot(req).await
    } else {
        Ok(unauthenticated(false))
    }
}

fn unauthenticated(is_grpc: bool) -> Response<Body> {
    let mut resp = if is_grpc {
        let mut r = Response::new(Body::empty());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", header::HeaderValue::from_static("16"));
        h.insert(
            "grpc-message",
            header::HeaderValue::from_static("authentication failed"),
        );
        r
    } else {
        let mut r = Response::new(Body::from(
            r#"{"error":{"message":"authentication failed","type":"authentication_error","code":"unauthenticated"}}"#,
        ));
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        h.insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        r
    };
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_methods_cover_every_service() {
        let m = super::known_methods();
        assert!(m.contains(&"/chatcli.v1.ChatCLIService/StreamPrompt".to_string()));
        assert!(m.contains(&"/grpc.health.v1.Health/Check".to_string()));
        assert_eq!(
            m.iter()
                .filter(|x| x.starts_with("/chatcli.v1.ChatCLIService/"))
                .count(),
            27
        );
    }
}
