//! `tokenfab-operator`: tokenfab's Kubernetes operator (see the crate docs), and the
//! ThroughputSLA CustomResourceDefinition it keeps.

use clap::{Parser, Subcommand};
use std::time::Duration;
use tokenfab_kube::operator::{Mode, Options};
use tokenfab_kube::reconcile::Policy;

/// A default of the rate limits, from [`Policy::default`] (the one place they are set).
fn policy_secs(s: u64) -> humantime::Duration {
    Duration::from_secs(s).into()
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "tokenfab's Kubernetes operator: discovers GPU nodes, carries out placement's layout with the engine Deployments (replicas, pool, tensor parallelism, super-node), follows cordon and drain, and publishes the ThroughputSLA custom resource"
)]
struct Cli {
    /// Log filter (tracing-subscriber syntax).
    #[arg(long, env = "TOKENFAB_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator in the cluster (in-cluster config, or the kubeconfig outside one).
    Run(Box<RunArgs>),
    /// Print the ThroughputSLA CustomResourceDefinition (YAML).
    Crd,
    /// Print the engine Deployment the operator would create for a kind placement wants,
    /// made from a template Deployment (YAML, e.g. from `helm template` or `kubectl get -o
    /// yaml`), to review it or check it against your cluster's policies.
    Derive(DeriveArgs),
}

#[derive(clap::Args, Debug)]
struct DeriveArgs {
    /// The template Deployment (YAML or JSON); `-` reads standard input.
    #[arg(long)]
    from: std::path::PathBuf,
    /// The accelerator class of the new Deployment (tokenfab's catalog, e.g. l40s).
    #[arg(long)]
    accelerator: String,
    /// Its tensor-parallel degree (GPUs per pod).
    #[arg(long, default_value_t = 1)]
    tp: u32,
    /// Its replicas.
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Pin it to a super-node: LABEL=VALUE, e.g. nvidia.com/gpu.clique=7f3c.1.
    #[arg(long)]
    super_node: Option<String>,
    /// GPU products (nvidia.com/gpu.product) of the class's nodes that have no
    /// tokenfab.io/accelerator label; repeat for several.
    #[arg(long)]
    gpu_product: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Namespace of tokenfab's engine Deployments, agent pods and ThroughputSLA.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The control plane's HTTP address (its --metrics-listen).
    #[arg(long, env = "TOKENFAB_SLA_URL")]
    control_url: String,
    /// A file whose first line is the token the control plane's HTTP endpoints require.
    #[arg(long, env = "TOKENFAB_HTTP_TOKEN_FILE")]
    http_token_file: Option<std::path::PathBuf>,
    /// `active` scales engine Deployments to placement's layout; `advisory` only logs
    /// the changes it would make.
    #[arg(long, value_enum, default_value_t = Mode::Advisory)]
    mode: Mode,
    /// Time between rounds.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Shortest time between two changes of one Deployment.
    #[arg(long, default_value_t = policy_secs(Policy::default().min_interval_s))]
    min_interval: humantime::Duration,
    /// How long placement must keep wanting fewer replicas before a Deployment shrinks.
    #[arg(long, default_value_t = policy_secs(Policy::default().scale_down_after_s))]
    scale_down_after: humantime::Duration,
    /// Most replicas one change adds or removes.
    #[arg(long, default_value_t = Policy::default().max_step)]
    max_step: u32,
    /// Label selector of the agent pods.
    #[arg(long, default_value = "app.kubernetes.io/component=agent")]
    agent_selector: String,
    /// Label selector narrowing the engine Deployments to this installation's (besides
    /// the `tokenfab.io/model` label), e.g. `app.kubernetes.io/instance=RELEASE`; empty:
    /// every Deployment with that label in the namespace.
    #[arg(long, default_value = "")]
    engine_selector: String,
    /// Leave cordoned nodes alone (do not stop their agents).
    #[arg(long)]
    no_drain: bool,
    /// Create the engine Deployments placement wants that none runs (the model on another
    /// accelerator class, tensor-parallel degree or super-node), each made from the model's
    /// chart-rendered Deployment, and delete those it made once they sat at 0 replicas for
    /// --scale-down-after. Without it such wants are only logged. Needs permission to
    /// create, update and delete Deployments in the namespace.
    #[arg(long)]
    create_engines: bool,
    /// Name of the ThroughputSLA object to keep.
    #[arg(long, default_value = "tokenfab")]
    sla_name: String,
    /// HTTP address for the operator's `/healthz` (rounds keep finishing) and `/readyz`
    /// (the nodes are listed), for Kubernetes probes. Off when not given.
    #[arg(long)]
    health_listen: Option<std::net::SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Crd => {
            print!("{}", tokenfab_kube::crd::crd_yaml());
            Ok(())
        }
        Command::Derive(a) => derive(a),
        Command::Run(args) => {
            let RunArgs {
                namespace,
                control_url,
                http_token_file,
                mode,
                interval,
                min_interval,
                scale_down_after,
                max_step,
                agent_selector,
                engine_selector,
                no_drain,
                create_engines,
                sla_name,
                health_listen,
            } = *args;
            if control_url.starts_with("https://") {
                anyhow::bail!(
                    "--control-url {control_url}: the operator reads the control plane over plain HTTP only (no TLS client yet); give its in-cluster http:// address"
                );
            }
            if interval < Duration::from_secs(1) {
                anyhow::bail!("--interval {interval:?}: give at least 1s between rounds");
            }
            let http_token = match http_token_file {
                Some(f) => Some(
                    std::fs::read_to_string(&f)
                        .map_err(|e| anyhow::anyhow!("--http-token-file {}: {e}", f.display()))?
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            let opts = Options {
                namespace,
                control_url,
                http_token,
                mode,
                interval,
                policy: Policy {
                    min_interval_s: min_interval.as_secs(),
                    scale_down_after_s: scale_down_after.as_secs(),
                    max_step,
                },
                agent_selector,
                engine_selector,
                follow_drain: !no_drain,
                create_engines,
                sla_name,
                retry: Default::default(),
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async move {
                    let client = kube::Client::try_default().await.map_err(|e| {
                        anyhow::anyhow!(
                            "cannot reach the Kubernetes API ({e}): run in a pod with a service account, or set KUBECONFIG"
                        )
                    })?;
                    let health = std::sync::Arc::new(tokenfab_kube::health::Health::new(opts.interval));
                    if let Some(addr) = health_listen {
                        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                            anyhow::anyhow!("--health-listen {addr}: {e} (choose another address, or free the port)")
                        })?;
                        let app = tokenfab_kube::health::router(health.clone());
                        tokio::spawn(async move {
                            if let Err(e) = axum::serve(listener, app).await {
                                tracing::error!(error = %e, "the health listener stopped");
                            }
                        });
                    }
                    tokenfab_kube::operator::run(client, opts, health, async {
                        // Kubernetes stops a pod with SIGTERM; a terminal with Ctrl-C.
                        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("installing a SIGTERM handler");
                        tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        }
                        tracing::info!("stopping");
                    })
                    .await
                })
        }
    }
}

fn derive(a: DeriveArgs) -> anyhow::Result<()> {
    use tokenfab_kube::reconcile::{Key, MODEL, Pool};
    let text = if a.from.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&a.from).map_err(|e| anyhow::anyhow!("--from {}: {e}", a.from.display()))?
    };
    let mut template: k8s_openapi::api::apps::v1::Deployment = serde_yaml_ng::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--from {}: not a Deployment: {e}", a.from.display()))?;
    if template.metadata.uid.is_none() {
        eprintln!(
            "note: the template has no uid (it was not read from an API server); the owner reference shows a placeholder"
        );
        template.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
    }
    let model = template
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MODEL))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("--from {}: the Deployment has no {MODEL} label", a.from.display()))?;
    if a.tp == 0 {
        anyhow::bail!("--tp 0: give at least 1 GPU per pod");
    }
    let super_node = match a.super_node {
        None => None,
        Some(s) => {
            let (label, value) = s.split_once('=').ok_or_else(|| {
                anyhow::anyhow!("--super-node {s}: give LABEL=VALUE, e.g. nvidia.com/gpu.clique=7f3c.1")
            })?;
            Some(Pool {
                label: label.into(),
                value: value.into(),
            })
        }
    };
    let key = Key {
        model,
        accelerator: a.accelerator,
        tp: a.tp,
        super_node,
    };
    let d = tokenfab_kube::derive::derive(&template, &key, a.replicas, &a.gpu_product)?;
    let mut v = serde_json::to_value(&d)?;
    // k8s-openapi leaves apiVersion and kind to its own serializer; make sure they show.
    v["apiVersion"] = "apps/v1".into();
    v["kind"] = "Deployment".into();
    print!("{}", serde_yaml_ng::to_string(&v)?);
    Ok(())
}
