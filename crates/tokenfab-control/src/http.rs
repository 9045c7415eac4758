//! The control plane's HTTP listener: `/metrics` (Prometheus), `/v1/sla` and
//! `/v1/sla/llm-d` (the published throughput SLA), `/v1/tuning` (replicas and
//! placement), and `/healthz`.
//!
//! None of them reaches the core loop: metrics are read from their registry, and the
//! documents from the views the loop refreshes at most once a second while somebody asks
//! for them, so no rate of scrapes can slow the scheduler. With a token configured, every
//! endpoint but `/healthz` requires `Authorization: Bearer <token>`.

use crate::core_loop::{ViewBoard, Views};
use crate::health::Health;
use crate::metrics::Metrics;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub views: Arc<ViewBoard>,
    pub health: Arc<Health>,
    /// Digest of the token the endpoints require, if any.
    pub token: Option<[u8; 32]>,
}

pub fn router(state: HttpState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/v1/sla", axum::routing::get(sla))
        .route("/v1/sla/llm-d", axum::routing::get(sla_llmd))
        .route("/v1/tuning", axum::routing::get(tuning))
        .route("/healthz", axum::routing::get(healthz))
        // Ready to take traffic: the same answer as /healthz on a serving control plane. A
        // replicated one's waiting replicas answer it 503 (see `standby`).
        .route("/readyz", axum::routing::get(healthz))
        .with_state(state)
}

/// What a waiting replica of a replicated control plane serves on its HTTP port until it
/// is elected: `/healthz` 200 (the process is alive: a liveness probe must not restart it)
/// and `/readyz` 503 (it takes no traffic: only the elected replica listens for it).
pub fn standby_router(leader: Arc<std::sync::Mutex<String>>) -> axum::Router {
    let doc = move || {
        let leader = leader.lock().map(|l| l.clone()).unwrap_or_default();
        let problem = if leader.is_empty() {
            "waiting to be elected".to_string()
        } else {
            format!("waiting to be elected; replica {leader} serves")
        };
        serde_json::json!({ "status": "standby", "problems": [problem] })
    };
    let ready = doc.clone();
    axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(move || {
                let d = doc();
                async move { axum::Json(d) }
            }),
        )
        .route(
            "/readyz",
            axum::routing::get(move || {
                let d = ready();
                async move { (StatusCode::SERVICE_UNAVAILABLE, axum::Json(d)) }
            }),
        )
}

/// The refusal of a request without the configured token, if it lacks it.
fn refusal(state: &HttpState, headers: &HeaderMap) -> Option<Response> {
    let want = state.token.as_ref()?;
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    match given {
        Some(t) if tokenfab_identity::same(want, &tokenfab_identity::digest(t)) => None,
        Some(_) => Some(
            (
                StatusCode::UNAUTHORIZED,
                "the bearer token is not this endpoint's token\n",
            )
                .into_response(),
        ),
        None => Some(
            (
                StatusCode::UNAUTHORIZED,
                [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                "this endpoint requires `Authorization: Bearer <token>` (the control plane's --http-token-file)\n",
            )
                .into_response(),
        ),
    }
}

async fn views(state: &HttpState) -> Views {
    state.views.fresh().await
}

async fn metrics(axum::extract::State(state): axum::extract::State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&state, &headers) {
        return r;
    }
    state.metrics.respond(&headers)
}

async fn sla(axum::extract::State(state): axum::extract::State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&state, &headers) {
        return r;
    }
    axum::Json(views(&state).await.sla.as_ref().clone()).into_response()
}

async fn sla_llmd(axum::extract::State(state): axum::extract::State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&state, &headers) {
        return r;
    }
    axum::Json(tokenfab_core::llmd::benchmark_reports(&views(&state).await.sla)).into_response()
}

async fn tuning(axum::extract::State(state): axum::extract::State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&state, &headers) {
        return r;
    }
    axum::Json(views(&state).await.tuning.as_ref().clone()).into_response()
}

/// 200 while the store works (`ok`, or `degraded` when new batches are refused for lack
/// of disk space); 503 while the store is being reopened after a failure.
async fn healthz(axum::extract::State(state): axum::extract::State<HttpState>) -> Response {
    let doc = state.health.doc();
    let code = if doc.store_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(doc)).into_response()
}

/// Serves `app` over TLS on `listener` until `stop` fires: the HTTP listener's
/// counterpart of `axum::serve`, one task per connection.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            // A client that never finishes its handshake does not hold a task forever.
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTP listener: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}
