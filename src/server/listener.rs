//! The accept loop of the main listener: one task per connection (the TLS handshake happens there,
//! never in the loop), HTTP/1 and HTTP/2 on the same port, every request through the
//! [`Pipeline`]. Shutdown stops accepting, sends GOAWAY and waits for in-flight calls up to the
//! grace period (`server.shutdown_grace` of the config serving when the drain starts, so a reload
//! changes it), then aborts what is left.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::AppState;
use super::pipeline::{ConnInfo, Pipeline};
use super::tls::PeerCertificates;

/// Accepts until `shutdown`, then drains.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    pipeline: Pipeline,
    shutdown: CancellationToken,
    on_drain: impl Future<Output = ()>,
) {
    let limits = {
        let server = &state.prepared().config.server;
        ConnLimits {
            max_streams: server.max_concurrent_streams,
            header_timeout: server.header_read_timeout,
            max_header_bytes: server.max_header_bytes,
            max_pending_resets: server.max_pending_reset_streams,
        }
    };
    let handshake_timeout = state.prepared().config.server.tls_handshake_timeout;
    let per_client = Arc::new(PerClient::new(
        state.prepared().config.server.max_connections_per_client,
    ));
    let proxy_protocol = state.prepared().config.server.proxy_protocol;
    let local = listener.local_addr().ok();
    // Cancelled once the listener is closed: every connection then finishes its calls and closes.
    let drain = CancellationToken::new();
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
                let Some(slot) = per_client.acquire(remote.ip()) else {
                    tracing::debug!(peer = %remote, "too many connections from this address; closed");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let pipeline = pipeline.clone();
                let tls = state.tls.clone();
                let drain = drain.clone();
                conns.spawn(async move {
                    let _slot = slot;
                    let mut stream = stream;
                    let Ok(proxied) = super::proxy_protocol::on_accept(&mut stream, remote, proxy_protocol).await else {
                        return;
                    };
                    let mut info = ConnInfo {
                        local,
                        remote,
                        proxied,
                        peer_certs: None,
                        client_identity: None,
                        anonymous_key: Default::default(),
                    };
                    match tls {
                        None => serve_conn(stream, info, pipeline, limits, drain).await,
                        Some(acceptor) => {
                            let tls_stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(peer = %remote, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(peer = %remote, "TLS handshake timed out");
                                    return;
                                }
                            };
                            if let Some(chain) = tls_stream.get_ref().1.peer_certificates() {
                                let chain: Vec<_> = chain.iter().map(|c| c.clone().into_owned()).collect();
                                info.client_identity = chain.first().and_then(super::tls::peer_identity);
                                info.peer_certs = Some(PeerCertificates(Arc::new(chain)));
                            }
                            serve_conn(tls_stream, info, pipeline, limits, drain).await
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    let grace = state.prepared().config.server.shutdown_grace;
    tracing::info!(in_flight_connections = conns.len(), grace = ?grace, "draining");
    on_drain.await;
    drain.cancel();
    let drained = tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} })
        .await
        .is_ok();
    if !drained {
        tracing::warn!(
            left = conns.len(),
            "grace period over; closing the remaining connections"
        );
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// Per-connection settings from `[server]`, read once when the listener starts (they need a
/// restart).
#[derive(Clone, Copy)]
struct ConnLimits {
    max_streams: u32,
    header_timeout: Duration,
    /// HTTP/1: the read buffer (a head over it is answered 431); HTTP/2: the header list.
    max_header_bytes: u32,
    /// HTTP/2: streams reset by the client before they are accepted; over it, GOAWAY.
    max_pending_resets: u32,
}

/// The connections each client address holds, against `server.max_connections_per_client`.
struct PerClient {
    limit: u32,
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// One open connection of an address; dropping it frees the place.
struct ClientSlot {
    owner: Option<(Arc<PerClient>, IpAddr)>,
}

impl PerClient {
    fn new(limit: u32) -> Self {
        Self {
            limit,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one more connection from `ip`, or `None` when it holds `limit` already.
    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        if self.limit == 0 {
            return Some(ClientSlot { owner: None });
        }
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            owner: Some((self.clone(), ip)),
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Some((owner, ip)) = self.owner.take() {
            let mut open = owner.open.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = open.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&ip);
                }
            }
        }
    }
}

async fn serve_conn<S>(
    stream: S,
    info: ConnInfo,
    pipeline: Pipeline,
    limits: ConnLimits,
    drain: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let remote = info.remote;
    let info = Arc::new(info);
    // Cancelled by the drain, or by the ping-flood guard for this connection alone: either way the
    // connection sends GOAWAY.
    let shut = drain.child_token();
    let stream = super::ping_flood::PingGuard::new(stream, shut.clone());
    let svc =
        tower::service_fn(move |req: Request<Incoming>| pipeline.clone().handle(info.clone(), req));
    let mut builder = auto::Builder::new(SpawnBoxed);
    builder
        .http2()
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(limits.max_header_bytes)
        .max_pending_accept_reset_streams(usize::try_from(limits.max_pending_resets).ok());
    // hyper's smallest read buffer is 8 KiB (it panics below that).
    builder.http1().max_buf_size(
        usize::try_from(limits.max_header_bytes)
            .unwrap_or(usize::MAX)
            .max(8192),
    );
    if !limits.header_timeout.is_zero() {
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
    }
    let conn = builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
        .into_owned();
    if let Err(e) = Draining::new(conn, shut, |c| c.graceful_shutdown()).await {
        tracing::debug!(peer = %remote, error = %e, "connection ended with an error");
    }
}

/// A connection that starts its graceful shutdown (HTTP/1: close once the call in flight is
/// answered; HTTP/2: GOAWAY) on its first poll after `drain` is cancelled.
///
/// hyper-util's `graceful::Watcher` does the same but polls a watch channel at every poll of the
/// connection, i.e. at every read and write: about 600 instructions per proxied call
/// (bench/HISTORY.md, step 28). Here the cancellation future is polled only to register the task's
/// waker (again only if the waker changes); every other poll reads the token's flag.
struct Draining<C, F> {
    conn: Pin<Box<C>>,
    /// Starts the connection's graceful shutdown.
    shut_down: F,
    drain: CancellationToken,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker the cancellation future holds.
    registered: Option<Waker>,
    shutting_down: bool,
}

impl<C, F: FnMut(Pin<&mut C>)> Draining<C, F> {
    fn new(conn: C, drain: CancellationToken, shut_down: F) -> Self {
        Draining {
            conn: Box::pin(conn),
            shut_down,
            cancelled: Box::pin(drain.clone().cancelled_owned()),
            drain,
            registered: None,
            shutting_down: false,
        }
    }
}

impl<C: Future, F: FnMut(Pin<&mut C>) + Unpin> Future for Draining<C, F> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if !this.shutting_down {
            let current = this
                .registered
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()));
            let cancelled = match current {
                true => this.drain.is_cancelled(),
                false => {
                    this.registered = Some(cx.waker().clone());
                    this.cancelled.as_mut().poll(cx).is_ready()
                }
            };
            if cancelled {
                this.shutting_down = true;
                (this.shut_down)(this.conn.as_mut());
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

/// The executor of a connection's HTTP/2 streams: each stream's task is boxed before it is spawned.
/// A stream's future holds the whole call (pipeline and handler, several KiB), and tokio moves a
/// spawned future by value on its way into the task and again at each change of the task's stage:
/// about 4k instructions of `memcpy` per gRPC call (bench/HISTORY.md, step 29). Boxed, what moves is
/// a pointer. HTTP/1 calls are not spawned, so they do not pay for the box.
#[derive(Debug, Clone, Copy)]
struct SpawnBoxed;

impl<F> hyper::rt::Executor<F> for SpawnBoxed
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Box::pin(fut));
    }
}
