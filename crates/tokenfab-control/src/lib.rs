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
mod health;
mod http;
mod metrics;
pub mod openai;
mod services;

pub use auth::{Auth, TenantToken};
pub use health::HealthDoc;
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
    /// Flight recorder: the folder every input of the core is written to, and the most
    /// bytes kept there (see [`tokenfab_record`]). `None`: nothing recorded.
    pub record: Option<(std::path::PathBuf, u64)>,
    /// gRPC address (tenants and agents).
    pub listen: SocketAddr,
    /// HTTP address for `/metrics`; `None` to serve no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// HTTP address for the OpenAI-compatible Files and Batches API; `None`: not served.
    pub openai_listen: Option<SocketAddr>,
    pub tenants: Vec<TenantToken>,
    /// The cluster's agent secret: every node's token derives from it (see
    /// [`tokenfab_identity`]).
    pub agent_secret: tokenfab_identity::Secret,
    /// The digest of the operator's token, which may read any tenant's usage. `None`: no
    /// operator access.
    pub admin_token: Option<[u8; 32]>,
    /// The digest of a token the HTTP endpoints (`/metrics`, `/v1/sla`, `/v1/tuning`)
    /// require as `Authorization: Bearer`; `None`: open (`/healthz` always is).
    pub http_token: Option<[u8; 32]>,
    pub control: ControlConfig,
    pub limits: InputLimits,
    pub transport: Transport,
    /// TLS on both listeners; `None`: plain text (loopback and trials only).
    pub tls: Option<ServerTls>,
}

/// TLS files of a control plane (PEM).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// With it, agents must present a certificate signed by this CA that names their node
    /// (a DNS subject alternative name equal to the node name), besides their node token.
    pub agent_ca: Option<std::path::PathBuf>,
}

/// Limits of the gRPC transport and of the work one call may start.
#[derive(Debug, Clone)]
pub struct Transport {
    /// Uploads received and parsed at once, in all and per tenant.
    pub max_uploads: u32,
    pub max_uploads_per_tenant: u32,
    /// Concurrent HTTP/2 streams (calls) per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keep-alive pings, and how long to wait for their answer before closing a
    /// dead connection.
    pub keepalive_interval: std::time::Duration,
    pub keepalive_timeout: std::time::Duration,
    /// The longest any call may take (a long upload included).
    pub request_timeout: std::time::Duration,
    /// Largest inline `CreateBatch` message; larger files go up with `UploadBatch`.
    pub max_inline_bytes: usize,
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            max_uploads: 8,
            max_uploads_per_tenant: 2,
            max_concurrent_streams: 256,
            keepalive_interval: std::time::Duration::from_secs(20),
            keepalive_timeout: std::time::Duration::from_secs(20),
            request_timeout: std::time::Duration::from_secs(15 * 60),
            max_inline_bytes: 32 << 20,
        }
    }
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
    /// The OpenAI-compatible API's address actually bound.
    pub openai_addr: Option<SocketAddr>,
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

/// Tokens must be unique: a shared one would make two tenants one, or a tenant an
/// operator. (Emptiness is checked where the tokens are read: only digests arrive here.)
fn check_tokens(config: &ServerConfig) -> Result<(), ServerError> {
    if config.agent_secret.expose().trim().len() < 16 {
        return Err(ServerError::Config(
            "the agent secret must be at least 16 characters (--agent-token-file, or TOKENFAB_AGENT_TOKEN): node tokens derive from it".into(),
        ));
    }
    let agent = tokenfab_identity::digest(config.agent_secret.expose());
    let mut seen = std::collections::BTreeMap::new();
    for t in &config.tenants {
        if t.name.trim().is_empty() {
            return Err(ServerError::Config(
                "a tenant has an empty name; write NAME=TOKEN".into(),
            ));
        }
        if t.digest == agent {
            return Err(ServerError::Config(format!(
                "tenant '{}' uses the agent secret as its token; tenant and agent tokens must differ",
                t.name
            )));
        }
        if let Some(other) = seen.insert(t.digest, t.name.as_str()) {
            return Err(ServerError::Config(format!(
                "tenants '{other}' and '{}' share a token; tokens must be unique",
                t.name
            )));
        }
    }
    if let Some(admin) = &config.admin_token {
        if admin == &agent {
            return Err(ServerError::Config(
                "the admin token equals the agent secret; they must differ".into(),
            ));
        }
        if let Some(name) = seen.get(admin) {
            return Err(ServerError::Config(format!(
                "the admin token equals tenant '{name}'s token; they must differ"
            )));
        }
    }
    Ok(())
}

/// Recovers state from `store`, binds, and serves in the background.
/// A waiting replica's HTTP listener on `listen` (see [`http::standby_router`]), with TLS
/// as the server would have it, until `stop` fires; the port is free again once the
/// returned task ends.
pub async fn standby(
    listen: SocketAddr,
    tls: Option<&ServerTls>,
    leader: Arc<std::sync::Mutex<String>>,
    stop: oneshot::Receiver<()>,
) -> Result<tokio::task::JoinHandle<()>, ServerError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|cause| ServerError::Bind { addr: listen, cause })?;
    let app = http::standby_router(leader);
    Ok(match tls {
        None => tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop.await;
                })
                .await;
        }),
        Some(t) => {
            let tls =
                tokenfab_identity::tls::http_server(&t.cert, &t.key).map_err(|e| ServerError::Config(e.to_string()))?;
            tokio::spawn(http::serve_tls(listener, app, tls, stop))
        }
    })
}

pub async fn start<S: Store + Clone>(config: ServerConfig, store: S) -> Result<Server, ServerError> {
    check_tokens(&config)?;
    let auth = Auth::new(&config.tenants, config.agent_secret.expose())
        .map_err(|e| ServerError::Config(e.to_string()))?
        .with_admin(config.admin_token)
        .with_node_certificates(config.tls.as_ref().is_some_and(|t| t.agent_ca.is_some()));
    let grpc_tls = match &config.tls {
        Some(t) => Some(
            tokenfab_identity::tls::grpc_server(&t.cert, &t.key, t.agent_ca.as_deref())
                .map_err(|e| ServerError::Config(e.to_string()))?,
        ),
        None => None,
    };
    let http_tls: Option<Arc<tokio_rustls::rustls::ServerConfig>> = match &config.tls {
        Some(t) => {
            Some(tokenfab_identity::tls::http_server(&t.cert, &t.key).map_err(|e| ServerError::Config(e.to_string()))?)
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(health::Health::new());
    let (tx, rx) = mpsc::channel(16_384);
    let recorder = match &config.record {
        Some((dir, max_bytes)) => {
            let r = tokenfab_record::Recorder::open(dir, *max_bytes).map_err(|e| ServerError::Config(e.to_string()))?;
            tracing::info!(dir = %dir.display(), max_bytes, "flight recorder on: every input of the core is written there (replay: tokenfab sim replay DIR)");
            Some(r)
        }
        None => None,
    };
    let (core_loop, views) = core_loop::CoreLoop::recover(
        store.clone(),
        config.control.clone(),
        metrics.clone(),
        health.clone(),
        tx.downgrade(),
        recorder,
    )
    .await?;
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
    let openai_listener = match config.openai_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|cause| ServerError::Bind { addr: a, cause })?,
        ),
        None => None,
    };
    let openai_addr = openai_listener.as_ref().and_then(|l| l.local_addr().ok());

    let catalog = tokenfab_core::catalog::Catalog::builtin();
    let contexts = config
        .control
        .models
        .iter()
        .filter_map(|m| catalog.model(m).ok().map(|shape| (m.clone(), shape.max_context)))
        .collect();
    let t = &config.transport;
    let shared = Arc::new(services::Shared {
        tx,
        store,
        auth,
        limits: config.limits,
        models: config.control.models.iter().cloned().collect::<BTreeSet<_>>(),
        contexts,
        lease_ttl: config.control.lease_ttl,
        heartbeat_interval: config.control.heartbeat_interval,
        uploads: services::UploadGate::new(t.max_uploads, t.max_uploads_per_tenant),
        metrics: metrics.clone(),
        min_free_bytes: config.control.min_free_bytes,
        views: views.clone(),
    });
    // Message sizes follow the configured limits: an inline batch up to
    // `max_inline_bytes` (plus its options), upload pieces as large, a lease reply within
    // its byte budget plus one request of the largest line.
    let inline = t.max_inline_bytes.saturating_add(1 << 20);
    let lease_reply = (config.control.lease_max_bytes as usize)
        .saturating_add(config.limits.max_line_bytes)
        .saturating_add(1 << 20);
    let batch = BatchServiceServer::new(services::BatchApi(shared.clone()))
        .max_decoding_message_size(inline)
        .max_encoding_message_size(64 << 20);
    let sla = tokenfab_proto::v1::sla_service_server::SlaServiceServer::new(services::SlaApi(shared.clone()));
    let admin = tokenfab_proto::v1::admin_service_server::AdminServiceServer::new(services::AdminApi(shared.clone()));
    let openai_app = openai::router(shared.clone());
    let agent = AgentServiceServer::new(services::AgentApi(shared))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(lease_reply);
    let (health_reporter, grpc_health) = tonic_health::server::health_reporter();
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

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = grpc_tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| ServerError::Config(format!("TLS: {e}")))?;
    }
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let http_token = config.http_token;
    let openai_tls = http_tls.clone();
    let transport = config.transport.clone();
    let task = tokio::spawn(async move {
        let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
        if let Some(l) = metrics_listener {
            let app = http::router(http::HttpState {
                metrics: metrics.clone(),
                views,
                health,
                token: http_token,
            });
            match http_tls {
                None => {
                    tokio::spawn(async move {
                        let _ = axum::serve(l, app)
                            .with_graceful_shutdown(async {
                                let _ = metrics_stopped.await;
                            })
                            .await;
                    });
                }
                Some(tls) => {
                    tokio::spawn(http::serve_tls(l, app, tls, metrics_stopped));
                }
            }
        }
        let (stop_openai, openai_stopped) = oneshot::channel::<()>();
        if let Some(l) = openai_listener {
            match &openai_tls {
                None => {
                    tokio::spawn(async move {
                        let _ = axum::serve(l, openai_app)
                            .with_graceful_shutdown(async {
                                let _ = openai_stopped.await;
                            })
                            .await;
                    });
                }
                Some(tls) => {
                    tokio::spawn(http::serve_tls(l, openai_app, tls.clone(), openai_stopped));
                }
            }
        }
        let core = tokio::spawn(core_loop.run(rx));
        let grpc = builder
            .max_concurrent_streams(Some(transport.max_concurrent_streams))
            .http2_keepalive_interval(Some(transport.keepalive_interval))
            .http2_keepalive_timeout(Some(transport.keepalive_timeout))
            .timeout(transport.request_timeout)
            .add_service(grpc_health)
            .add_service(reflection)
            .add_service(batch)
            .add_service(sla)
            .add_service(admin)
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
        let _ = stop_openai.send(());
        result
    });
    Ok(Server {
        addr,
        metrics_addr,
        openai_addr,
        shutdown: Some(shutdown_tx),
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tenants: &[(&str, &str)], agent: &str) -> ServerConfig {
        ServerConfig {
            record: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            openai_listen: None,
            tenants: tenants.iter().map(|(n, t)| TenantToken::new(*n, t)).collect(),
            agent_secret: agent.into(),
            admin_token: None,
            http_token: None,
            control: ControlConfig::default(),
            limits: InputLimits::default(),
            transport: Transport::default(),
            tls: None,
        }
    }

    #[test]
    fn unsafe_token_setups_are_refused_at_startup() {
        let err = |c: ServerConfig| check_tokens(&c).unwrap_err().to_string();
        let secret = "agent-secret-of-16+";
        assert!(check_tokens(&config(&[("a", "x"), ("b", "y")], secret)).is_ok());
        assert!(err(config(&[("a", "x")], " ")).contains("at least 16 characters"));
        assert!(err(config(&[("a", "x"), ("b", "x")], secret)).contains("tenants 'a' and 'b' share a token"));
        assert!(err(config(&[("a", secret)], secret)).contains("tenant and agent tokens must differ"));
        assert!(err(config(&[("", "x")], secret)).contains("empty name"));
        let mut c = config(&[("a", "x")], secret);
        c.admin_token = Some(tokenfab_identity::digest("x"));
        assert!(err(c).contains("the admin token equals tenant 'a's token"));
    }
}
