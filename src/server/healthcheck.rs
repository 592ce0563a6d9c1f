//! `chatcli healthcheck`: a `grpc.health.v1` probe of a running server, for container HEALTHCHECKs
//! and scripts. Exit 0 when the server answers SERVING, 1 otherwise, with one line saying why.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::cli::HealthcheckArgs;

/// Probes the server; `Ok` when it is SERVING, else the reason.
pub async fn probe(args: &HealthcheckArgs) -> Result<(), String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scheme = if args.tls { "https" } else { "http" };
    let uri = format!("{scheme}://{}", args.addr);
    let timeout = Duration::from_secs(args.timeout.max(1));
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| format!("bad address {}: {e}", args.addr))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if args.tls {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &args.ca_cert {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("cannot read --ca-cert {}: {e}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS setup failed: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.addr))?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| format!("health check failed: {} ({:?})", s.message(), s.code()))?;
    match ServingStatus::try_from(resp.into_inner().status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!(
            "server at {} is {}",
            args.addr,
            other.as_str_name()
        )),
        Err(_) => Err(format!(
            "server at {} answered an unknown status",
            args.addr
        )),
    }
}
