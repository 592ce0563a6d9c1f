//! The daemon: one listener for gRPC and HTTP (dispatched by content type), the metrics listener,
//! the reload of the config and the TLS material ([`reload`]: file watcher, SIGHUP, admin
//! commands), and the lifecycle (ready, watchdog, drain on shutdown). [`run`] takes listeners the
//! caller bound, so tests start the server on port 0.

pub mod audit;
pub mod error;
pub mod events;
pub mod forwarded;
mod grpc;
mod grpc_aiops;
mod grpc_catalog;
mod grpc_hub;
mod grpc_watcher;
pub mod healthcheck;
mod http;
mod listener;
mod metrics_http;
mod ping_flood;
pub mod pipeline;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod reload;
mod state;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
pub use state::{
    AppState, InFlight, InFlightGuard, PrepareError, Prepared, Transport, check_exposure, preflight,
};

/// The sockets the server serves, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC + HTTP.
    pub main: TcpListener,
    /// Prometheus metrics, `/healthz`, `/readyz`; `None` when metrics are off.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses of `config`: the main port, and the metrics port unless it is 0.
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        let main_addr = SocketAddr::new(config.server.bind_address, config.server.port);
        // Under systemd socket activation (`LISTEN_FDS`, see `systemd/chatcli.socket`) the first
        // passed socket is the main listener, so restarts lose no connection attempt.
        let activated = listenfd::ListenFd::from_env()
            .take_tcp_listener(0)
            .map_err(|source| ServerError::Io {
                what: "taking the socket passed by systemd (LISTEN_FDS)".into(),
                source,
            })?;
        let main = match activated {
            Some(std_listener) => {
                let adopt = |l: std::net::TcpListener| {
                    l.set_nonblocking(true)?;
                    TcpListener::from_std(l)
                };
                tracing::info!("using the listening socket passed by systemd (LISTEN_FDS)");
                adopt(std_listener).map_err(|source| ServerError::Io {
                    what: "adopting the socket passed by systemd".into(),
                    source,
                })?
            }
            None => TcpListener::bind(main_addr)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: main_addr,
                    source,
                })?,
        };
        let metrics = match config.metrics.port {
            0 => None,
            port => {
                let addr = SocketAddr::new(config.metrics.bind_address, port);
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ServerError::Bind { addr, source })?,
                )
            }
        };
        Ok(Self { main, metrics })
    }
}

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Some other I/O failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Parts of the config could not be prepared (e.g. a provider without its key), or the
    /// listener would serve a non-loopback address without authentication.
    #[error("configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// A file the server writes (the audit log) cannot be created or opened; the message names
    /// the setting, the path and the reason.
    #[error("{0}")]
    CannotCreate(String),
    /// The metrics registry could not be built.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// How the server can reload itself: the sources its config came from (files are re-read; the
/// environment and flags are those of the start) and the hook that changes the log level.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Reload from these sources on file changes, SIGHUP and the admin commands; `None` = no reload.
    pub reload: Option<crate::config::Sources>,
    /// Sets the log filter of the running process.
    pub set_log_level: Option<reload::LevelSetter>,
    /// The audit log of the config, already opened by the caller (the daemon opens it before
    /// binding its ports); `None` opens it at start.
    pub audit: Option<audit::AuditLog>,
}

/// Serves until `shutdown` is cancelled, then stops accepting, reports NOT_SERVING, lets in-flight
/// calls finish for up to `server.shutdown_grace` (as configured when the drain starts), and
/// returns. Refuses to start ([`ServerError::Config`]) when the main listener is not on a loopback
/// address and no authentication is configured ([`check_exposure`]).
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    run_with(listeners, config, shutdown, RunOptions::default()).await
}

/// [`run`], reloading the config from `options.reload` when files change, on SIGHUP and on the
/// admin commands.
pub async fn run_with(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
    options: RunOptions,
) -> Result<(), ServerError> {
    let main_addr = local_addr(&listeners.main)?;
    let metrics_addr = listeners.metrics.as_ref().map(local_addr).transpose()?;
    let state = Arc::new(AppState::new(
        config,
        metrics_addr.is_some(),
        options.audit,
    )?);
    check_exposure(main_addr, &state.prepared()).map_err(|e| ServerError::Config(vec![e]))?;
    state.mcp.apply(&state.prepared().mcp_servers);
    state.watcher.apply(&state.prepared().config.watcher);
    check_state_backend(&state).await?;
    if let Some(sources) = options.reload {
        let _ = state.reloader.set(reload::Reloader::new(
            &state,
            sources,
            options.set_log_level.clone(),
            main_addr,
        ));
    }
    // After the reloader is set: one watcher for the config files and the TLS material.
    let _watch = reload::watch(&state);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let grpc_routes = grpc::routes(&state, health_service);
    health_reporter
        .set_serving::<crate::proto::chat_cli_service_server::ChatCliServiceServer<grpc::ChatCliGrpc>>()
        .await;

    // The metrics listener outlives the drain, so /readyz can say "draining" and in-flight calls can
    // still be scraped; it stops once the main listener is done.
    let metrics_stop = CancellationToken::new();
    let metrics_task = match (listeners.metrics, &state.metrics) {
        (Some(l), Some(_)) => Some(tokio::spawn(metrics_http::serve(
            l,
            state.clone(),
            metrics_stop.clone(),
        ))),
        _ => None,
    };

    match metrics_addr {
        Some(m) => {
            tracing::info!(grpc_http = %main_addr, metrics = %m, "listening on {main_addr} (gRPC + HTTP), metrics on {m}")
        }
        None => {
            tracing::info!(grpc_http = %main_addr, "listening on {main_addr} (gRPC + HTTP), metrics off")
        }
    }
    state.set_listening(true);
    let checks = {
        let state = state.clone();
        tokio::spawn(async move { state.check_providers().await })
    };
    crate::systemd::ready(&format!("serving on {main_addr}"));
    let watchdog = crate::systemd::watchdog_interval().map(|every| {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => crate::systemd::watchdog(),
                }
            }
        })
    });

    let on_drain = {
        let state = state.clone();
        let reporter = health_reporter.clone();
        async move {
            crate::systemd::stopping();
            state.set_draining();
            state.hub.drain();
            reporter
                .set_not_serving::<crate::proto::chat_cli_service_server::ChatCliServiceServer<grpc::ChatCliGrpc>>()
                .await;
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
    };
    let http = http::api(state.clone());
    let pipeline = pipeline::Pipeline::new(state.clone(), grpc_routes, http);
    let sighup = reload::on_sighup(state.clone());
    let housekeeping = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tick.tick().await;
                state.rate_limits.housekeeping();
            }
        })
    };
    let hub_housekeeping = start_hub(&state).await;
    let state_probe = state
        .shared
        .is_some()
        .then(|| tokio::spawn(probe_state_backend(state.clone(), health_reporter.clone())));
    listener::serve(listeners.main, state.clone(), pipeline, shutdown, on_drain).await;
    state.catalog.shutdown();
    state.mcp.shutdown(std::time::Duration::from_secs(5)).await;
    state.watcher.stop();
    housekeeping.abort();
    if let Some(p) = state_probe {
        p.abort();
    }
    if let Some(h) = hub_housekeeping {
        h.abort();
    }
    sighup.abort();

    if let Some(w) = watchdog {
        w.abort();
    }
    checks.abort();
    metrics_stop.cancel();
    if let Some(audit) = &state.audit {
        audit.close().await;
    }
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// With the Redis backend: one `PING` at start. When `[state] required` is set, a Redis that cannot
/// be reached or refuses the credentials stops the start as a config error (exit 78); otherwise
/// the failure is logged and the server starts, with sessions unavailable and rate limits as
/// `on_unavailable` says, until Redis answers.
async fn check_state_backend(state: &AppState) -> Result<(), ServerError> {
    let Some(shared) = &state.shared else {
        return Ok(());
    };
    match shared.ping().await {
        Ok(()) => {
            tracing::info!("state backend: redis (reachable)");
            Ok(())
        }
        Err(e) if shared.required() => Err(ServerError::Config(vec![format!(
            "state.redis: {e} (state.required is set, so the server does not start without it)"
        )])),
        Err(e) => {
            tracing::warn!(
                "state backend: {e}; starting anyway (state.required is not set): session calls answer UNAVAILABLE until Redis answers"
            );
            Ok(())
        }
    }
}

/// Pings the Redis state backend once a second, so that its gauge and readiness follow it without
/// traffic and the connection is re-established (with the connection's own backoff) while idle.
/// With `[state] required`, `grpc.health.v1` follows it too (until the drain, which owns it then).
async fn probe_state_backend(state: Arc<AppState>, reporter: tonic_health::server::HealthReporter) {
    let Some(shared) = state.shared.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = true;
    loop {
        tick.tick().await;
        let up = shared.ping().await.is_ok();
        if shared.required() && up != serving && !state.is_draining() {
            serving = up;
            let status = match up {
                true => tonic_health::ServingStatus::Serving,
                false => tonic_health::ServingStatus::NotServing,
            };
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status("chatcli.v1.ChatCLIService", status)
                .await;
        }
    }
}

/// Opens the conversation hub's store when its database exists (a failure is logged; hub calls
/// then answer `UNAVAILABLE` and retry opening it) and starts its housekeeping (retention, store
/// size), when the hub is on.
async fn start_hub(state: &Arc<AppState>) -> Option<tokio::task::JoinHandle<()>> {
    if !state.hub.enabled() {
        tracing::info!("conversation hub disabled");
        return None;
    }
    if let Err(e) = state.hub.open_existing().await {
        tracing::error!("{e}");
    }
    let reader = state.clone();
    Some(
        state
            .hub
            .spawn_housekeeping(std::time::Duration::from_secs(60), move || {
                reader.prepared().config.hub.retention_days
            }),
    )
}

fn local_addr(l: &TcpListener) -> Result<SocketAddr, ServerError> {
    l.local_addr().map_err(|source| ServerError::Io {
        what: "reading the listen address".into(),
        source,
    })
}
