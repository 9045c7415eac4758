//! # tokenfab-kube: tokenfab's Kubernetes operator
//!
//! - [`discovery`]: GPU nodes and their topology from NVIDIA GPU feature discovery labels,
//!   fed to placement;
//! - [`reconcile`]: the engine Deployments follow placement's layout (scale up, scale
//!   down, move a model to a cheaper pool, change tensor parallelism, pin to a super-node) with rate limits and hysteresis; advisory mode
//!   only reports the changes;
//! - [`derive`]: the engine Deployments placement wants that the chart did not render
//!   (another pool, tensor-parallel degree or super-node), made from the model's template;
//! - [`drain`]: cordoned nodes' agents stop leasing, finish their work, and the node is
//!   marked drained;
//! - [`crd`]: the `ThroughputSLA` custom resource, kept with status conditions;
//! - [`api`]: Kubernetes calls with retries on conflicts and transient failures, and
//!   clear errors for missing permissions;
//! - [`health`]: `/healthz` and `/readyz` for the operator's own probes.
//!
//! The decisions are pure functions (tested without a cluster); [`operator`] runs them
//! against the API. No Kubernetes API server can run where tokenfab is tested, so the API
//! side is tested against kube's mock service with responses in the API's own format.

pub mod api;
pub mod crd;
pub mod derive;
pub mod discovery;
pub mod drain;
pub mod health;
pub mod operator;
pub mod reconcile;
