//! The operator's own health, served on `--health-listen`: `/healthz` (rounds keep
//! finishing) and `/readyz` (the node watch has listed the nodes once), for Kubernetes'
//! liveness and readiness probes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long the first node list may take before the operator counts as stuck.
pub const FIRST_LIST_GRACE: Duration = Duration::from_secs(300);

/// What the probes read.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    interval: Duration,
    last_round: Mutex<Option<Instant>>,
    ready: AtomicBool,
}

impl Health {
    pub fn new(interval: Duration) -> Health {
        Health {
            started: Instant::now(),
            interval,
            last_round: Mutex::new(None),
            ready: AtomicBool::new(false),
        }
    }

    /// The node watch has its first list: rounds can run.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// A round finished.
    pub fn round_done(&self) {
        *self.last_round.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    fn alive(&self) -> Result<String, String> {
        let last = *self.last_round.lock().unwrap_or_else(|p| p.into_inner());
        liveness(self.started.elapsed(), last.map(|t| t.elapsed()), self.interval)
    }
}

/// Whether an operator started `since_start` ago, whose last round finished
/// `since_round` ago (`None`: none yet), runs rounds every `interval` as it should: a round
/// may take up to two intervals more, plus a minute of API retries.
pub fn liveness(since_start: Duration, since_round: Option<Duration>, interval: Duration) -> Result<String, String> {
    let allowed = interval * 3 + Duration::from_secs(60);
    match since_round {
        Some(d) if d <= allowed => Ok(format!("ok: last round {} s ago\n", d.as_secs())),
        Some(d) => Err(format!(
            "no round finished for {} s (a round is due every {} s): the operator is stuck; see its log\n",
            d.as_secs(),
            interval.as_secs()
        )),
        None if since_start <= FIRST_LIST_GRACE + allowed => Ok("ok: starting\n".into()),
        None => Err(format!(
            "no round in {} s since start: the first node list never came (is the Kubernetes API reachable, and may the operator list nodes?)\n",
            since_start.as_secs()
        )),
    }
}

/// `/healthz` and `/readyz`.
pub fn router(health: Arc<Health>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .with_state(health)
}

async fn healthz(axum::extract::State(h): axum::extract::State<Arc<Health>>) -> Response {
    match h.alive() {
        Ok(text) => text.into_response(),
        Err(text) => (StatusCode::SERVICE_UNAVAILABLE, text).into_response(),
    }
}

async fn readyz(axum::extract::State(h): axum::extract::State<Arc<Health>>) -> Response {
    if h.ready.load(Ordering::Relaxed) {
        "ready: the nodes are listed and rounds run\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first node list from the Kubernetes API\n",
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_that_stop_finishing_and_a_first_list_that_never_comes_are_unhealthy() {
        let s = Duration::from_secs;
        let every = s(30);
        assert!(liveness(s(10), None, every).is_ok(), "starting");
        assert!(liveness(s(100), Some(s(30)), every).is_ok());
        assert!(liveness(s(1000), Some(s(150)), every).is_ok(), "3 intervals + 60 s");
        let stuck = liveness(s(1000), Some(s(151)), every).unwrap_err();
        assert!(stuck.contains("no round finished for 151 s"), "{stuck}");
        let never = liveness(s(451), None, every).unwrap_err();
        assert!(never.contains("first node list never came"), "{never}");
    }
}
