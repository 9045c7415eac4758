//! Calls to the Kubernetes API with the retries each failure deserves, and errors that
//! say what to do:
//! - 409 Conflict (the object changed since it was read): read it again and retry;
//! - 429, 5xx and transport failures (timeouts, a restarting API server): retry with
//!   backoff, a few times;
//! - 403 Forbidden: no retry; the error names the permission the service account lacks.

use crate::crd::{ThroughputSLA, ThroughputSlaSpec, ThroughputSlaStatus};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::future::Future;
use std::time::Duration;

/// A call that failed for good.
#[derive(Debug, thiserror::Error)]
pub enum ApiFailure {
    #[error(
        "the operator may not {what}: {message}. Grant it to the operator's service account (the Helm chart's Role <release>-operator and ClusterRole <release>-<namespace>-operator do, with operator.enabled)"
    )]
    Forbidden { what: String, message: String },
    #[error("{what}: not found ({message})")]
    NotFound { what: String, message: String },
    #[error("{what}: gave up after {attempts} attempts: {last}")]
    GaveUp { what: String, attempts: u32, last: String },
}

/// How many times, and how long between, transient failures are retried.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 5,
            backoff: Duration::from_millis(500),
        }
    }
}

/// Runs `call` (which reads what it needs afresh each time) until it succeeds, retrying
/// conflicts and transient failures.
pub async fn with_retries<T, F, Fut>(what: &str, retry: Retry, mut call: F) -> Result<T, ApiFailure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut backoff = retry.backoff;
    let mut last = String::new();
    for attempt in 1..=retry.attempts.max(1) {
        match call().await {
            Ok(v) => return Ok(v),
            Err(kube::Error::Api(s)) if s.code == 403 => {
                return Err(ApiFailure::Forbidden {
                    what: what.into(),
                    message: s.message.clone(),
                });
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                return Err(ApiFailure::NotFound {
                    what: what.into(),
                    message: s.message.clone(),
                });
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tracing::info!(
                    what,
                    attempt,
                    "conflict: the object changed since it was read; reading it again"
                );
                last = s.message.clone();
                // A conflict is answered by reading again at once.
                continue;
            }
            Err(kube::Error::Api(s)) if s.code < 500 && s.code != 429 => {
                return Err(ApiFailure::GaveUp {
                    what: what.into(),
                    attempts: attempt,
                    last: format!("{} ({}): {}", s.reason, s.code, s.message),
                });
            }
            Err(e) => {
                tracing::warn!(what, attempt, error = %e, retry_in = ?backoff, "Kubernetes API call failed; retrying");
                last = e.to_string();
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    Err(ApiFailure::GaveUp {
        what: what.into(),
        attempts: retry.attempts,
        last,
    })
}

/// Sets Deployment `name`'s replica count (read, change, replace: a concurrent change is
/// a conflict, answered by reading again).
pub async fn scale(api: &Api<Deployment>, name: &str, replicas: u32, retry: Retry) -> Result<(), ApiFailure> {
    with_retries(&format!("scale deployment {name}"), retry, || async {
        let mut d = api.get(name).await?;
        let spec = d.spec.get_or_insert_with(Default::default);
        if spec.replicas == Some(replicas as i32) {
            return Ok(());
        }
        spec.replicas = Some(replicas as i32);
        api.replace(name, &PostParams::default(), &d).await.map(|_| ())
    })
    .await
}

/// Creates engine Deployment `d` (one of the same name already there counts as done: an
/// earlier round made it, and the next round reads it).
pub async fn create_deployment(api: &Api<Deployment>, d: &Deployment, retry: Retry) -> Result<(), ApiFailure> {
    let name = d.metadata.name.clone().unwrap_or_default();
    with_retries(&format!("create deployment {name}"), retry, || async {
        match api.create(&PostParams::default(), d).await {
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            other => other.map(|_| ()),
        }
    })
    .await
}

/// Deletes Deployment `name` (already gone counts as done).
pub async fn delete_deployment(api: &Api<Deployment>, name: &str, retry: Retry) -> Result<(), ApiFailure> {
    match with_retries(&format!("delete deployment {name}"), retry, || async {
        api.delete(name, &Default::default()).await.map(|_| ())
    })
    .await
    {
        Err(ApiFailure::NotFound { .. }) => Ok(()),
        other => other,
    }
}

/// Applies a drain mark to a node (a merge patch: it cannot conflict).
pub async fn mark_node(api: &Api<Node>, action: &crate::drain::Action, retry: Retry) -> Result<(), ApiFailure> {
    let patch = action.patch();
    with_retries(&format!("patch node {}", action.node()), retry, || async {
        api.patch(action.node(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
    })
    .await
}

/// Writes the status of ThroughputSLA `name`, creating the object first if it is missing.
pub async fn publish(
    api: &Api<ThroughputSLA>,
    name: &str,
    spec: &ThroughputSlaSpec,
    status: &ThroughputSlaStatus,
    retry: Retry,
) -> Result<(), ApiFailure> {
    let exists = with_retries(&format!("read throughputsla {name}"), retry, || api.get_opt(name)).await?;
    if let Some(o) = &exists
        && &o.spec != spec
    {
        // The operator was started with another control plane URL or interval.
        let patch = serde_json::json!({ "spec": spec });
        with_retries(&format!("update throughputsla {name}"), retry, || async {
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
        })
        .await?;
    }
    if exists.is_none() {
        let obj = ThroughputSLA::new(name, spec.clone());
        with_retries(&format!("create throughputsla {name}"), retry, || async {
            match api.create(&PostParams::default(), &obj).await {
                // Somebody else created it meanwhile: fine.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                other => other.map(|_| ()),
            }
        })
        .await?;
    }
    let patch = serde_json::json!({ "status": status });
    with_retries(&format!("update the status of throughputsla {name}"), retry, || async {
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
    })
    .await
}
