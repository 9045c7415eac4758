//! # tokenfab-control: the control plane
//!
//! A thin async shell around [`tokenfab_core::control::ControlCore`]: a tonic server for
//! tenants (`BatchService`) and agents (`AgentService`), gRPC health and reflection, a
//! Prometheus `/metrics` endpoint, and durable state through any [`Store`].
//!
//! Data flow: RPC handler -> [`core_loop`] (the only owner of the core) -> group commit
//! to the store -> reply. A batch is acknowledged only after the commit that holds it;
//! a result is acknowledged to its agent only after the commit that records it.

pub mod auth;
mod convert;
mod core_loop;
mod metrics;
mod services;

pub use auth::{Auth, TenantToken};
pub use metrics::Metrics;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use tokenfab_core::batch_input::InputLimits;
use tokenfab_core::control::ControlConfig;
use tokenfab_proto::v1::agent_service_server::AgentServiceServer;
use tokenfab_proto::v1::batch_service_server::BatchServiceServer;
use tokenfab_store::{Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How to run a control plane.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// gRPC address (tenants and agents).
    pub listen: SocketAddr,
    /// HTTP address for `/metrics`; `None` to serve no metrics.
    pub metrics_listen: Option<SocketAddr>,
    pub tenants: Vec<TenantToken>,
    pub agent_token: String,
    /// The operator's token: may read any tenant's usage. `None`: no operator access.
    pub admin_token: Option<String>,
    pub control: ControlConfig,
    pub limits: InputLimits,
}

/// A control plane that cannot start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {cause}; is another server using the port?")]
    Bind { addr: SocketAddr, cause: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("configuration: {0}")]
    Config(String),
}

/// A running control plane.
pub struct Server {
    /// The gRPC address actually bound (useful with port 0).
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

impl Server {
    /// Stops accepting calls, lets running ones finish, and waits.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.map_err(|e| ServerError::Config(e.to_string()))?
    }

    /// Waits until the server stops by itself (a store failure).
    pub async fn wait(self) -> Result<(), ServerError> {
        let Server { task, shutdown, .. } = self;
        let r = task.await.map_err(|e| ServerError::Config(e.to_string()))?;
        drop(shutdown);
        r
    }
}

/// Tokens must be non-empty and unique: an empty token would let anyone in, a shared one
/// would make two tenants one.
fn check_tokens(config: &ServerConfig) -> Result<(), ServerError> {
    if config.agent_token.trim().is_empty() {
        return Err(ServerError::Config(
            "an agent token is required (--agent-token or TOKENFAB_AGENT_TOKEN)".into(),
        ));
    }
    let mut seen = std::collections::BTreeMap::new();
    for t in &config.tenants {
        if t.name.trim().is_empty() {
            return Err(ServerError::Config(
                "a tenant has an empty name; write NAME=TOKEN".into(),
            ));
        }
        if t.token.trim().is_empty() {
            return Err(ServerError::Config(format!(
                "tenant '{}' has an empty token; give every tenant a secret token",
                t.name
            )));
        }
        if t.token == config.agent_token {
            return Err(ServerError::Config(format!(
                "tenant '{}' uses the agent token; tenant and agent tokens must differ",
                t.name
            )));
        }
        if let Some(other) = seen.insert(t.token.as_str(), t.name.as_str()) {
            return Err(ServerError::Config(format!(
                "tenants '{other}' and '{}' share a token; tokens must be unique",
                t.name
            )));
        }
    }
    if let Some(admin) = &config.admin_token {
        if admin.trim().is_empty() {
            return Err(ServerError::Config(
                "the admin token is empty; give it a secret value or leave --admin-token out".into(),
            ));
        }
        if admin == &config.agent_token {
            return Err(ServerError::Config(
                "the admin token equals the agent token; they must differ".into(),
            ));
        }
        if let Some(name) = seen.get(admin.as_str()) {
            return Err(ServerError::Config(format!(
                "the admin token equals tenant '{name}'s token; they must differ"
            )));
        }
    }
    Ok(())
}

/// Recovers state from `store`, binds, and serves in the background.
pub async fn start<S: Store + Clone>(config: ServerConfig, store: S) -> Result<Server, ServerError> {
    check_tokens(&config)?;
    let metrics = Arc::new(Metrics::new());
    let core_loop = core_loop::CoreLoop::recover(store.clone(), config.control.clone(), metrics.clone()).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|cause| ServerError::Bind {
            addr: config.listen,
            cause,
        })?;
    let addr = listener.local_addr().map_err(|cause| ServerError::Bind {
        addr: config.listen,
        cause,
    })?;
    let metrics_listener = match config.metrics_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|cause| ServerError::Bind { addr: a, cause })?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

    let (tx, rx) = mpsc::channel(16_384);
    let sla_tx = tx.clone();
    let shared = Arc::new(services::Shared {
        tx,
        store,
        auth: Auth::new(&config.tenants, &config.agent_token).with_admin(config.admin_token.as_deref()),
        limits: config.limits,
        models: config.control.models.iter().cloned().collect::<BTreeSet<_>>(),
        lease_ttl: config.control.lease_ttl,
        heartbeat_interval: config.control.heartbeat_interval,
    });
    let max_message = (config.limits.max_file_bytes as usize)
        .saturating_add(1 << 20)
        .min(256 << 20);
    let batch = BatchServiceServer::new(services::BatchApi(shared.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(64 << 20);
    let sla = tokenfab_proto::v1::sla_service_server::SlaServiceServer::new(services::SlaApi(shared.clone()));
    let agent = AgentServiceServer::new(services::AgentApi(shared))
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BatchServiceServer<services::BatchApi<S>>>()
        .await;
    health_reporter
        .set_serving::<AgentServiceServer<services::AgentApi<S>>>()
        .await;
    health_reporter
        .set_serving::<tokenfab_proto::v1::sla_service_server::SlaServiceServer<services::SlaApi<S>>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tokenfab_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Config(format!("reflection: {e}")))?;

    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
        if let Some(l) = metrics_listener {
            let m = metrics.clone();
            let llmd_tx = sla_tx.clone();
            let tuning_tx = sla_tx.clone();
            let app = axum::Router::new()
                .route("/metrics", axum::routing::get(move || async move { m.encode() }))
                .route(
                    "/v1/sla",
                    axum::routing::get(move || {
                        let tx = sla_tx.clone();
                        async move { sla_json(tx, false).await }
                    }),
                )
                .route(
                    "/v1/sla/llm-d",
                    axum::routing::get(move || {
                        let tx = llmd_tx.clone();
                        async move { sla_json(tx, true).await }
                    }),
                )
                .route(
                    "/v1/tuning",
                    axum::routing::get(move || {
                        let tx = tuning_tx.clone();
                        async move { tuning_json(tx).await }
                    }),
                );
            tokio::spawn(async move {
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(async {
                        let _ = metrics_stopped.await;
                    })
                    .await;
            });
        }
        let core = tokio::spawn(core_loop.run(rx));
        let grpc = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(batch)
            .add_service(sla)
            .add_service(agent)
            // TCP_NODELAY: without it, small replies (leases) wait for the peer's delayed
            // ACK (40 ms on Linux), which capped end-to-end throughput.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = shutdown_rx.await;
                },
            );
        tokio::pin!(grpc);
        tokio::pin!(core);
        let result = tokio::select! {
            r = &mut grpc => r.map_err(ServerError::from),
            r = &mut core => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "durable store failed; stopping so that a restart recovers from durable state");
                    Err(ServerError::Store(e))
                }
                Err(e) => Err(ServerError::Config(format!("core loop panicked: {e}"))),
            },
        };
        let _ = stop_metrics.send(());
        result
    });
    Ok(Server {
        addr,
        metrics_addr,
        shutdown: Some(shutdown_tx),
        task,
    })
}

/// Asks the core loop for a document (`command` carries the reply channel) and answers it
/// as JSON after `shape`, or 503 while the control plane stops.
async fn ask_json<T, U: serde::Serialize>(
    tx: mpsc::Sender<core_loop::Command>,
    command: impl FnOnce(oneshot::Sender<T>) -> core_loop::Command,
    shape: impl FnOnce(T) -> U,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (reply, rx) = oneshot::channel();
    if tx.send(command(reply)).await.is_ok()
        && let Ok(doc) = rx.await
    {
        return axum::Json(shape(doc)).into_response();
    }
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "the control plane is stopping",
    )
        .into_response()
}

/// `GET /v1/sla`: the throughput SLA document (tokenfab.io/v1 ThroughputSLA) as JSON;
/// `GET /v1/sla/llm-d` (`llmd`): the same measurement as a JSON array of llm-d Benchmark
/// Reports (v0.2.1), one per pool.
async fn sla_json(tx: mpsc::Sender<core_loop::Command>, llmd: bool) -> axum::response::Response {
    if llmd {
        ask_json(
            tx,
            |reply| core_loop::Command::Sla { reply },
            |doc| tokenfab_core::llmd::benchmark_reports(&doc),
        )
        .await
    } else {
        ask_json(tx, |reply| core_loop::Command::Sla { reply }, |doc| doc).await
    }
}

/// `GET /v1/tuning`: every replica's knobs, directive and tuner state, fragmentation and
/// placement's advice, as JSON (see [`tokenfab_core::control::TuningDoc`]).
async fn tuning_json(tx: mpsc::Sender<core_loop::Command>) -> axum::response::Response {
    ask_json(tx, |reply| core_loop::Command::Tuning { reply }, |doc| doc).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tenants: &[(&str, &str)], agent: &str) -> ServerConfig {
        ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            tenants: tenants
                .iter()
                .map(|(n, t)| TenantToken {
                    name: n.to_string(),
                    token: t.to_string(),
                })
                .collect(),
            agent_token: agent.into(),
            admin_token: None,
            control: ControlConfig::default(),
            limits: InputLimits::default(),
        }
    }

    #[test]
    fn unsafe_token_setups_are_refused_at_startup() {
        let err = |c: ServerConfig| check_tokens(&c).unwrap_err().to_string();
        assert!(check_tokens(&config(&[("a", "x"), ("b", "y")], "z")).is_ok());
        assert!(err(config(&[("a", "x")], " ")).contains("an agent token is required"));
        assert!(err(config(&[("a", "")], "z")).contains("tenant 'a' has an empty token"));
        assert!(err(config(&[("a", "x"), ("b", "x")], "z")).contains("tenants 'a' and 'b' share a token"));
        assert!(err(config(&[("a", "z")], "z")).contains("tenant and agent tokens must differ"));
        assert!(err(config(&[("", "x")], "z")).contains("empty name"));
    }
}
