//! The operator's loop: every `interval`, discover the GPU nodes, plan the layout for the
//! control plane's demand, scale the engine Deployments toward it (or, in advisory mode,
//! log what it would change), follow cordons, and publish the ThroughputSLA.

use crate::api::{self, Retry};
use crate::crd::{ThroughputSLA, ThroughputSlaSpec, ThroughputSlaStatus};
use crate::{derive, discovery, drain, reconcile};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::BTreeSet;
use std::time::Duration;
use tokenfab_core::control::TuningDoc;
use tokenfab_core::placement::Demand;
use tokenfab_core::sla::ThroughputSla as SlaDocument;
use tokenfab_core::{ModelId, catalog::Catalog};

/// Carry out placement, or only say what would change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Advisory,
    Active,
}

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Namespace of the engine Deployments, the agent pods and the ThroughputSLA.
    pub namespace: String,
    /// The control plane's HTTP address (`/v1/tuning`, `/v1/sla`).
    pub control_url: String,
    pub http_token: Option<String>,
    pub mode: Mode,
    pub interval: Duration,
    pub policy: reconcile::Policy,
    /// Label selector of the agent pods (drain follows them).
    pub agent_selector: String,
    /// Label selector narrowing the engine Deployments to this installation's (added to
    /// `tokenfab.io/model`), e.g. `app.kubernetes.io/instance=RELEASE`; empty: every
    /// Deployment with the label in the namespace.
    pub engine_selector: String,
    pub follow_drain: bool,
    /// Create engine Deployments for kinds placement wants that none runs (from the model's
    /// template, [`crate::derive`]), and delete those it made once idle; false: report them.
    pub create_engines: bool,
    /// Name of the ThroughputSLA object to keep.
    pub sla_name: String,
    pub retry: Retry,
}

/// What one round did.
#[derive(Debug, Default)]
pub struct Round {
    pub gpu_nodes: usize,
    pub decision: Option<reconcile::Decision>,
    pub scaled: Vec<String>,
    pub created: Vec<String>,
    pub deleted: Vec<String>,
    pub drain: Vec<drain::Action>,
    pub published: bool,
    pub errors: Vec<String>,
}

/// Nodes as a reflector keeps them from a watch: relisted on 410 Gone (an expired
/// resource version) and on any watch error, with backoff; errors are logged.
pub fn watch_nodes(client: kube::Client) -> (Store<Node>, tokio::task::JoinHandle<()>) {
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(Api::<Node>::all(client), watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let task = tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::warn!(error = %e, "watching nodes failed; listing them again");
            }
        }
    });
    (reader, task)
}

async fn get_json<T: serde::de::DeserializeOwned>(opts: &Options, path: &str) -> Result<T, String> {
    let url = format!("{}{path}", opts.control_url.trim_end_matches('/'));
    let mut req = reqwest::Client::new().get(&url).timeout(Duration::from_secs(10));
    if let Some(t) = &opts.http_token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| format!("GET {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {url}: {}", resp.status()));
    }
    resp.json().await.map_err(|e| format!("GET {url}: {e}"))
}

/// One round.
pub async fn round(
    client: &kube::Client,
    nodes: &Store<Node>,
    opts: &Options,
    memory: &mut reconcile::Memory,
    now_s: u64,
) -> Round {
    let mut r = Round::default();
    let all_nodes: Vec<Node> = nodes.state().iter().map(|n| (**n).clone()).collect();
    let gpu: Vec<discovery::GpuNode> = all_nodes.iter().filter_map(discovery::discover).collect();
    r.gpu_nodes = gpu.len();
    let (specs, left_out) = discovery::node_specs(&gpu, Catalog::builtin());
    for (node, why) in &left_out {
        tracing::debug!(node, why, "GPU node left out of placement");
    }

    // Placement, carried out.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &opts.namespace);
    let selector = if opts.engine_selector.is_empty() {
        reconcile::MODEL.to_string()
    } else {
        format!("{},{}", reconcile::MODEL, opts.engine_selector)
    };
    let engine_list = ListParams::default().labels(&selector);
    let engines = api::with_retries("list engine deployments", opts.retry, || deployments.list(&engine_list)).await;
    let tuning: Result<TuningDoc, String> = get_json(opts, "/v1/tuning").await;
    match (engines, tuning) {
        (Ok(list), Ok(doc)) => {
            let mut engines: Vec<reconcile::Engine> = Vec::new();
            for d in &list.items {
                match reconcile::engine_of(d) {
                    Some(e) => {
                        if let Some(first) = engines.iter().find(|o| o.key == e.key) {
                            tracing::warn!(
                                deployment = %e.name, first = %first.name,
                                "two engine Deployments run {}; only the first is scaled, this one is scaled to 0", e.key
                            );
                        }
                        engines.push(e);
                    }
                    None => tracing::warn!(
                        deployment = d.metadata.name.as_deref().unwrap_or("?"),
                        "an engine Deployment without a {} label is left alone: label it with its accelerator class",
                        reconcile::ACCELERATOR
                    ),
                }
            }
            match doc.plan {
                None => tracing::info!("the control plane has no placement demand yet; engines left as they are"),
                Some(plan) => {
                    let demand: Vec<Demand> = plan
                        .demand
                        .iter()
                        .map(|d| Demand {
                            model: ModelId::new(d.model.clone()),
                            tokens_per_s: d.tokens_per_s,
                            shape: (d.prompt_tokens, d.output_tokens.max(1)),
                        })
                        .collect();
                    let pools = discovery::pools(&gpu);
                    let current = reconcile::current_placement(&engines, &specs, &pools);
                    let layout = tokenfab_core::placement::plan(&specs, &demand, &current, &reconcile::plan_config());
                    let want = reconcile::desired(&layout.replicas, &specs, &pools);
                    let decision = reconcile::decide(&engines, &want, now_s, memory, &opts.policy);
                    for c in &decision.changes {
                        match opts.mode {
                            Mode::Advisory => tracing::info!(
                                deployment = %c.deployment, from = c.from, to = c.to,
                                "advisory: would scale ({})", c.why
                            ),
                            Mode::Active => match api::scale(&deployments, &c.deployment, c.to, opts.retry).await {
                                Ok(()) => {
                                    tracing::info!(deployment = %c.deployment, from = c.from, to = c.to, "scaled ({})", c.why);
                                    r.scaled.push(c.deployment.clone());
                                }
                                Err(e) => r.errors.push(e.to_string()),
                            },
                        }
                    }
                    for (k, n) in &decision.missing {
                        let Some(template) = derive::template_for(&k.model, &list.items) else {
                            tracing::warn!(
                                "placement wants {n} replica(s) of {k}, but no engine Deployment runs the model: add one to the chart's engines"
                            );
                            continue;
                        };
                        let made = match derive::derive(template, k, *n, &derive::products_of(&gpu, &k.accelerator)) {
                            Ok(d) => d,
                            Err(e) => {
                                r.errors.push(format!("placement wants {n} replica(s) of {k}: {e}"));
                                continue;
                            }
                        };
                        let name = made.metadata.name.clone().unwrap_or_default();
                        match (opts.mode, opts.create_engines) {
                            (_, false) => tracing::warn!(
                                deployment = %name,
                                "placement wants {n} replica(s) of {k}, which no engine Deployment runs: add it to the chart's engines, or let the operator create it (operator.createEngines, --create-engines)"
                            ),
                            (Mode::Advisory, true) => tracing::info!(
                                deployment = %name, replicas = n, "advisory: would create a Deployment for {k}"
                            ),
                            (Mode::Active, true) => match api::create_deployment(&deployments, &made, opts.retry).await
                            {
                                Ok(()) => {
                                    tracing::info!(deployment = %name, replicas = n, "created for {k}");
                                    memory.created(&name, now_s);
                                    r.created.push(name);
                                }
                                Err(e) => r.errors.push(e.to_string()),
                            },
                        }
                    }
                    for name in &decision.delete {
                        match (opts.mode, opts.create_engines) {
                            (_, false) => {}
                            (Mode::Advisory, true) => {
                                tracing::info!(deployment = %name, "advisory: would delete (idle at 0 replicas)")
                            }
                            (Mode::Active, true) => {
                                match api::delete_deployment(&deployments, name, opts.retry).await {
                                    Ok(()) => {
                                        tracing::info!(deployment = %name, "deleted (idle at 0 replicas, and placement has not wanted it)");
                                        memory.deleted(name);
                                        r.deleted.push(name.clone());
                                    }
                                    Err(e) => r.errors.push(e.to_string()),
                                }
                            }
                        }
                    }
                    r.decision = Some(decision);
                }
            }
        }
        (Err(e), _) => r.errors.push(e.to_string()),
        (_, Err(e)) => r.errors.push(format!("reading placement demand: {e}")),
    }

    // Cordon and drain.
    if opts.follow_drain {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &opts.namespace);
        let agent_list = ListParams::default().labels(&opts.agent_selector);
        match api::with_retries("list agent pods", opts.retry, || pods.list(&agent_list)).await {
            Ok(list) => {
                let on: BTreeSet<String> = list
                    .items
                    .iter()
                    .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
                    .collect();
                let node_api: Api<Node> = Api::all(client.clone());
                for a in drain::actions(&all_nodes, &on) {
                    match api::mark_node(&node_api, &a, opts.retry).await {
                        Ok(()) => {
                            tracing::info!(node = a.node(), action = ?a, "drain");
                            r.drain.push(a);
                        }
                        Err(e) => r.errors.push(e.to_string()),
                    }
                }
            }
            Err(e) => r.errors.push(e.to_string()),
        }
    }

    // The published SLA.
    let fetched: Result<SlaDocument, String> = get_json(opts, "/v1/sla").await;
    let slas: Api<ThroughputSLA> = Api::namespaced(client.clone(), &opts.namespace);
    let previous = slas
        .get_opt(&opts.sla_name)
        .await
        .ok()
        .flatten()
        .and_then(|o| o.status)
        .map(|s| s.conditions)
        .unwrap_or_default();
    let now = tokenfab_core::time::rfc3339(now_s);
    let status = ThroughputSlaStatus {
        conditions: crate::crd::conditions(&fetched, &previous, &now),
        document: fetched.ok(),
    };
    let spec = ThroughputSlaSpec {
        control_plane_url: opts.control_url.clone(),
        refresh_seconds: opts.interval.as_secs().max(1) as u32,
    };
    match api::publish(&slas, &opts.sla_name, &spec, &status, opts.retry).await {
        Ok(()) => r.published = true,
        Err(e) => r.errors.push(e.to_string()),
    }
    for e in &r.errors {
        tracing::error!("{e}");
    }
    r
}

/// Runs rounds until `shutdown`, telling `health` how they go.
pub async fn run(
    client: kube::Client,
    opts: Options,
    health: std::sync::Arc<crate::health::Health>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (nodes, watch) = watch_nodes(client.clone());
    tokio::pin!(shutdown);
    let started = std::time::Instant::now();
    let every = Duration::from_secs(30);
    let mut nag = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            r = nodes.wait_until_ready() => {
                r.map_err(|e| anyhow::anyhow!("the node watch stopped before its first list: {e}"))?;
                break;
            }
            _ = nag.tick() => tracing::warn!(
                waited_s = started.elapsed().as_secs(),
                "still waiting for the first node list from the Kubernetes API (is it reachable, and may the operator list nodes?)"
            ),
            _ = &mut shutdown => return Ok(()),
        }
    }
    health.set_ready();
    let mut memory = reconcile::Memory::default();
    loop {
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let r = round(&client, &nodes, &opts, &mut memory, now_s).await;
        health.round_done();
        tracing::info!(
            gpu_nodes = r.gpu_nodes,
            scaled = r.scaled.len(),
            created = r.created.len(),
            deleted = r.deleted.len(),
            drain_changes = r.drain.len(),
            published = r.published,
            errors = r.errors.len(),
            "round done"
        );
        tokio::select! {
            _ = tokio::time::sleep(opts.interval) => {}
            _ = &mut shutdown => break,
        }
    }
    watch.abort();
    Ok(())
}
