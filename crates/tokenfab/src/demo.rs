//! `tokenfab demo`: a whole cluster in one process on emulated GPUs.

use crate::Connection;
use crate::serve::{self, DeviceKind};
use crate::tenant::{self, ClusterEnergy};
use anyhow::{Context, bail};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;
use tokenfab_control::{ServerConfig, TenantToken};
use tokenfab_core::batch_input::InputLimits;
use tokenfab_core::control::ControlConfig;
use tokenfab_engine_emu::Emulator;
use tokenfab_proto::v1 as pb;
use tokenfab_store::RedbStore;
use tokio::sync::watch;

/// The sample batch shipped with tokenfab: 10,000 chat requests (see
/// `examples/batches/make_demo_batch.py`).
const SAMPLE: &str = include_str!("../../../examples/batches/demo-10k.jsonl");

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Nodes (each one super-node with its own agent).
    #[arg(long, default_value_t = 2)]
    nodes: u32,
    /// Emulated GPUs per node.
    #[arg(long, default_value_t = 8)]
    gpus_per_node: u32,
    /// Accelerator class of the emulated GPUs.
    #[arg(long, default_value = "h100-sxm")]
    accelerator: String,
    /// Model to serve (one replica per `--tp` GPUs).
    #[arg(long, default_value = "llama-3.1-8b")]
    model: String,
    /// GPUs per replica (tensor parallel).
    #[arg(long, default_value_t = 1)]
    tp: u32,
    /// Requests in flight per replica (the continuous batch size).
    #[arg(long, default_value_t = 128)]
    window: u32,
    /// Emulated seconds per wall second; 1 runs in real time.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Submit only the first N requests of the sample batch.
    #[arg(long)]
    requests: Option<usize>,
    /// Submit this JSONL file instead of the shipped sample.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Keep durable state here (default: a temporary directory, removed at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    if a.nodes == 0 || a.gpus_per_node == 0 || a.tp == 0 || !a.gpus_per_node.is_multiple_of(a.tp) {
        bail!(
            "--gpus-per-node ({}) must be a positive multiple of --tp ({}), and --nodes positive",
            a.gpus_per_node,
            a.tp
        );
    }
    let input = match &a.input {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read --input {}", p.display()))?,
        None => SAMPLE.to_string(),
    };
    let input = match a.requests {
        Some(n) => input.lines().take(n).collect::<Vec<_>>().join("\n"),
        None => input,
    };
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let (data_dir, _cleanup) = match &a.data_dir {
        Some(d) => (d.clone(), None),
        None => {
            let d = std::env::temp_dir().join(format!("tokenfab-demo-{unique}"));
            (d.clone(), Some(TempDir(d)))
        }
    };
    let tenant_token = format!("demo-tenant-{unique}");
    let agent_token = format!("demo-agent-{unique}");

    // Control plane.
    let server = tokenfab_control::start(
        ServerConfig {
            record: None,
            listen: "127.0.0.1:0".parse()?,
            metrics_listen: None,
            openai_listen: None,
            tenants: vec![TenantToken::new("demo", &tenant_token)],
            agent_secret: agent_token.clone().into(),
            admin_token: None,
            http_token: None,
            control: ControlConfig::default(),
            limits: InputLimits::default(),
            transport: tokenfab_control::Transport::default(),
            tls: None,
        },
        RedbStore::open(&data_dir)?,
    )
    .await?;
    let control = format!("http://{}", server.addr);

    // Emulated GPUs: one engine emulator per replica; one agent per node.
    // Agents stop first: their last act is a closing device reading from the emulators.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (emu_stop_tx, emu_stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut emulators: Vec<Emulator> = Vec::new();
    let mut agents = Vec::new();
    let replicas_per_node = a.gpus_per_node / a.tp;
    for n in 0..a.nodes {
        let mut replicas = Vec::new();
        for r in 0..replicas_per_node {
            let config = serve::emu_config(&a.model, &a.accelerator, a.tp, a.time_scale, a.window.max(256));
            let emu = Emulator::start(config)?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            tokio::spawn(tokenfab_engine_emu::serve(
                listener,
                emu.clone(),
                stopped(emu_stop_rx.clone()),
            ));
            emulators.push(emu);
            replicas.push(crate::parse::ReplicaArg {
                url,
                model: a.model.clone(),
                id: Some(format!("r{r}")),
                engine_model: None,
                window: Some(a.window),
                max_concurrency: Some(a.window.max(256)),
            });
        }
        let (opts, devices) = serve::agent_setup(serve::AgentSetup {
            control: control.clone(),
            agent_token: agent_token.clone().into(),
            node: format!("node-{n}"),
            super_node: Some(format!("supernode-{n}")),
            replicas,
            devices: DeviceKind::Emulated,
            accelerator: None,
            profiles: Default::default(),
            request_timeout: Duration::from_secs(600),
            tuning: serve::TuningArgs::default(),
            tls: None,
        })
        .await?;
        agents.push(tokio::spawn(tokenfab_agent::run(
            opts,
            devices,
            stopped(stop_rx.clone()),
        )));
    }
    eprintln!(
        "tokenfab demo: control plane {control}; {} node(s) x {} emulated {} ({} replica(s) of {} at window {}, {}x time)",
        a.nodes,
        a.gpus_per_node,
        a.accelerator,
        a.nodes * replicas_per_node,
        a.model,
        a.window,
        a.time_scale
    );

    // Submit and follow, as a tenant would.
    let mut client = tenant::connect(&Connection {
        control: control.clone(),
        token: tenant_token.into(),
        tls_ca: None,
    })
    .await?;
    let options = pb::BatchOptions {
        model: a.model.clone(),
        ..Default::default()
    };
    let created = tenant::create(&mut client, options, input.into_bytes())
        .await
        .map_err(tenant::rpc)?;
    tenant::print_created(&created);
    let id = created.batch.map(|b| b.id).context("no batch in the answer")?;
    let last = tenant::watch(&mut client, &id, a.time_scale).await?;

    let mut joules = 0.0;
    let mut devices = 0;
    for e in &emulators {
        if let Some(s) = e.snapshot().await {
            joules += s.energy_j;
            devices += s.devices as usize;
        }
    }
    tenant::print_summary(&last, a.time_scale, Some(&ClusterEnergy { joules, devices }));

    let _ = stop_tx.send(true);
    for agent in agents {
        let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    }
    let _ = emu_stop_tx.send(true);
    server.shutdown().await?;
    if !tenant::is_final(&last) || last.request_counts.is_some_and(|c| c.failed > 0) {
        bail!("the demo batch did not complete cleanly");
    }
    Ok(())
}
