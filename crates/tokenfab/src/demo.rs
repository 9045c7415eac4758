//! `tokenfab demo`: a whole cluster in one process on emulated GPUs.

use crate::serve::{self, DeviceKind};
use crate::tenant::{self, ClusterEnergy};
use crate::{Connection, parse};
use anyhow::{Context, bail};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;
use tokenfab_control::{ServerConfig, TenantToken};
use tokenfab_core::batch_input::InputLimits;
use tokenfab_core::control::{ControlConfig, ReplicaView, TuningDoc};
use tokenfab_core::policy::Choice;
use tokenfab_core::tuner::TunerMode;
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
    /// Requests in flight per replica (the continuous batch size) to start from; the tuner
    /// moves it (up to 1024) unless `--tuner off`.
    #[arg(long, default_value_t = 128)]
    window: u32,
    /// The batch-size and power tuner: `active` (the default here) moves each replica's
    /// window and power limit toward the most output tokens per joule that still meets the
    /// batch's deadline, and the demo shows its moves as they happen; `advisory` only
    /// reports what it would do; `off` keeps the starting window at full power.
    #[arg(long, value_parser = parse::choice::<TunerMode>(), default_value_t = TunerMode::Active)]
    tuner: TunerMode,
    /// Completion window of the demo batch (its deadline: the tuner spends whatever
    /// throughput the deadline does not need on saving energy).
    #[arg(long, value_parser = parse::duration, default_value = "24h")]
    completion_window: Duration,
    /// Emulated seconds per wall second; 1 runs in real time.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Submit only the first N requests of the sample batch.
    #[arg(long)]
    requests: Option<usize>,
    /// Submit this JSONL file instead of the shipped sample.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Skip the first run (the starting configuration held, tuner off) that the tuner's
    /// result is compared against; the demo then takes about half as long.
    #[arg(long)]
    no_baseline: bool,
    /// Keep durable state here, in one folder per run (default: a temporary directory,
    /// removed at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// The engines' sequence limit (and so the largest window) when the tuner runs.
const TUNED_MAX_CONCURRENCY: u32 = 1024;

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
    if a.tuner != TunerMode::Active || a.no_baseline {
        let run = run_cluster(&a, a.tuner, &input).await?;
        if a.tuner == TunerMode::Advisory {
            println!(
                "{}",
                tuned_points(
                    run.tuning.as_ref(),
                    "what the tuner advises (advisory mode: nothing moved)"
                )
            );
        }
        return run.finish();
    }
    eprintln!("tokenfab demo, run 1 of 2: the starting configuration held (tuner off), for comparison");
    let fixed = run_cluster(&a, TunerMode::Off, &input).await?;
    eprintln!("\ntokenfab demo, run 2 of 2: the same batch on a fresh cluster with the tuner active");
    let tuned = run_cluster(&a, TunerMode::Active, &input).await?;
    println!("{}", comparison(&a, &fixed, &tuned));
    fixed.finish()?;
    tuned.finish()
}

/// What one run of the demo cluster ended with.
struct Run {
    batch: pb::Batch,
    cluster: ClusterEnergy,
    tuning: Option<TuningDoc>,
}

impl Run {
    fn finish(&self) -> anyhow::Result<()> {
        if !tenant::is_final(&self.batch) || self.batch.request_counts.is_some_and(|c| c.failed > 0) {
            bail!("the demo batch did not complete cleanly");
        }
        Ok(())
    }
}

/// Starts a control plane, emulated GPUs and agents with `tuner`, runs `input` through
/// them as one batch, prints its summary and the published SLA, and stops them.
async fn run_cluster(a: &DemoArgs, tuner: TunerMode, input: &str) -> anyhow::Result<Run> {
    let replicas_per_node = a.gpus_per_node / a.tp;
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let (data_dir, _cleanup) = match &a.data_dir {
        // One store per run (the comparison runs twice).
        Some(d) => (d.join(format!("tuner-{}", tuner.name())), None),
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
            // The HTTP listener serves /v1/tuning and /v1/sla, which the demo shows.
            metrics_listen: Some("127.0.0.1:0".parse()?),
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
    let http = format!(
        "http://{}",
        server.metrics_addr.context("the control plane has no HTTP listener")?
    );
    // The engines' sequence limit: what the fixed run had, or room for every window the
    // tuner may choose.
    let max_concurrency = if tuner == TunerMode::Off {
        a.window.max(256)
    } else {
        a.window.max(TUNED_MAX_CONCURRENCY)
    };

    // Emulated GPUs: one engine emulator per replica; one agent per node.
    // Agents stop first: their last act is a closing device reading from the emulators.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (emu_stop_tx, emu_stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut emulators: Vec<Emulator> = Vec::new();
    let mut agents = Vec::new();
    for n in 0..a.nodes {
        let mut replicas = Vec::new();
        for r in 0..replicas_per_node {
            let config = serve::emu_config(&a.model, &a.accelerator, a.tp, a.time_scale, max_concurrency);
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
                max_concurrency: Some(max_concurrency),
                gpus: None,
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
            tuning: serve::TuningArgs {
                tuner,
                ..serve::TuningArgs::default()
            },
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
        "tokenfab demo: control plane {control} (HTTP {http}); {} node(s) x {} emulated {} ({} replica(s) of {} starting at window {} at full power, {}x time; tuner {})",
        a.nodes,
        a.gpus_per_node,
        a.accelerator,
        a.nodes * replicas_per_node,
        a.model,
        a.window,
        a.time_scale,
        tuner.name()
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
        completion_window_seconds: a.completion_window.as_secs(),
        ..Default::default()
    };
    let created = tenant::create(&mut client, options, input.as_bytes().to_vec())
        .await
        .map_err(tenant::rpc)?;
    tenant::print_created(&created);
    let id = created.batch.map(|b| b.id).context("no batch in the answer")?;
    // The tuner's moves, as they happen, above the progress bar.
    let (lines_tx, lines_rx) = tokio::sync::mpsc::unbounded_channel();
    let follow = tokio::spawn(follow_tuner(http.clone(), lines_tx));
    let last = tenant::watch_with(
        &mut client,
        &id,
        a.time_scale,
        (tuner == TunerMode::Active).then_some(lines_rx),
    )
    .await;
    follow.abort();
    let last = last?;
    let tuning = tuning_doc(&http).await.ok();

    let mut joules = 0.0;
    let mut devices = 0;
    for e in &emulators {
        if let Some(s) = e.snapshot().await {
            joules += s.energy_j;
            devices += s.devices as usize;
        }
    }
    let cluster = ClusterEnergy { joules, devices };
    tenant::print_summary(&last, a.time_scale, Some(&cluster));
    // The throughput SLA the control plane publishes from what it measured.
    match crate::sla::get_text(&format!("{http}/v1/sla"), None).await {
        Ok(text) => match serde_json::from_str::<tokenfab_core::sla::ThroughputSla>(&text) {
            Ok(doc) => println!(
                "The throughput SLA this control plane publishes (GET /v1/sla; `tokenfab sla`):\n{}",
                crate::sla::render(&doc)
            ),
            Err(e) => eprintln!("/v1/sla answered something that is not a ThroughputSLA document: {e}"),
        },
        Err(e) => eprintln!("cannot read the SLA: {e:#}"),
    }

    let _ = stop_tx.send(true);
    for agent in agents {
        let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    }
    let _ = emu_stop_tx.send(true);
    server.shutdown().await?;
    Ok(Run {
        batch: last,
        cluster,
        tuning,
    })
}

async fn tuning_doc(http: &str) -> anyhow::Result<TuningDoc> {
    let text = crate::sla::get_text(&format!("{http}/v1/tuning"), None).await?;
    serde_json::from_str(&text).context("/v1/tuning did not answer a tuning document")
}

/// One replica's point: window and power limit.
fn point(r: &ReplicaView) -> String {
    match r.power_limit_w {
        Some(p) => format!("window {} at {p:.0} W", r.window),
        None => format!("window {}", r.window),
    }
}

/// Polls `/v1/tuning` and sends a line for each move (replicas making the same move
/// together share one line).
async fn follow_tuner(http: String, lines: tokio::sync::mpsc::UnboundedSender<String>) {
    let mut last: std::collections::BTreeMap<(String, String), ReplicaView> = Default::default();
    let started = std::time::Instant::now();
    while !lines.is_closed() {
        if let Ok(doc) = tuning_doc(&http).await {
            // (from, to) -> (replicas, one of their reasons)
            let mut moves: std::collections::BTreeMap<(String, String), (usize, String)> = Default::default();
            for r in &doc.replicas {
                let key = (r.node.clone(), r.replica.clone());
                let before = last.get(&key).map_or(0, |p| p.tuner_moves);
                if r.tuner_moves > before {
                    let from = last.get(&key).map_or_else(|| "the start".to_string(), point);
                    let m = moves.entry((from, point(r))).or_insert_with(|| (0, r.reason.clone()));
                    m.0 += 1;
                }
                last.insert(key, r.clone());
            }
            for ((from, to), (n, why)) in moves {
                let (who, why) = if n == 1 {
                    ("1 replica".to_string(), why)
                } else {
                    (format!("{n} replicas"), format!("e.g. {why}"))
                };
                let _ = lines.send(format!(
                    "[{:>5.1} s] tuner: {who}: {from} -> {to}; {why}",
                    started.elapsed().as_secs_f64()
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The replicas' points in `doc`, in a few words.
fn tuned_points(doc: Option<&TuningDoc>, what: &str) -> String {
    let Some(doc) = doc else {
        return format!("{what}: unknown (/v1/tuning did not answer)");
    };
    let mut points: std::collections::BTreeMap<String, usize> = Default::default();
    for r in &doc.replicas {
        let p = match (&r.advice, r.tuner_mode.as_str()) {
            (Some(advice), "advisory") => format!("window {} at {:.0} W", advice.window, advice.power_limit_w),
            _ => point(r),
        };
        *points.entry(p).or_default() += 1;
    }
    let list: Vec<String> = points.into_iter().map(|(p, n)| format!("{n} x {p}")).collect();
    format!("{what}: {}", list.join(", "))
}

/// The two runs side by side: what the tuner bought over the configuration it started
/// from, on the same batch and the same emulated cluster.
fn comparison(a: &DemoArgs, fixed: &Run, tuned: &Run) -> String {
    let figures = |r: &Run| {
        let u = r.batch.usage.unwrap_or_default();
        let out = u.completion_tokens as f64;
        let run_s = tenant::run_seconds(&r.batch, a.time_scale);
        (
            run_s,
            out / run_s.max(1e-9),
            out / u.joules.max(1e-9),
            out / r.cluster.joules.max(1e-9),
            u.cost_usd / out.max(1.0) * 1e6,
        )
    };
    let (f_s, f_tps, f_tpj, f_all, f_cost) = figures(fixed);
    let (t_s, t_tps, t_tpj, t_all, t_cost) = figures(tuned);
    let change = |x: f64, y: f64| format!("{:+.1}%", (y / x - 1.0) * 100.0);
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED).set_header([
        "the same batch, measured",
        "held at the start",
        "tuner active",
        "change",
    ]);
    let moves: u64 = tuned
        .tuning
        .as_ref()
        .map_or(0, |d| d.replicas.iter().map(|r| r.tuner_moves).sum());
    t.add_row(vec![
        "configuration".to_string(),
        format!("window {} at full power", a.window),
        tuned_points(tuned.tuning.as_ref(), "ended at"),
        format!("{moves} moves"),
    ]);
    t.add_row(vec![
        "completion time".to_string(),
        format!("{f_s:.1} s"),
        format!("{t_s:.1} s"),
        change(f_s, t_s),
    ]);
    t.add_row(vec![
        "output tokens/s".to_string(),
        format!("{f_tps:.0}"),
        format!("{t_tps:.0}"),
        change(f_tps, t_tps),
    ]);
    t.add_row(vec![
        "output tokens/J (attributed)".to_string(),
        format!("{f_tpj:.2}"),
        format!("{t_tpj:.2}"),
        change(f_tpj, t_tpj),
    ]);
    t.add_row(vec![
        "output tokens/J (all devices, idle included)".to_string(),
        format!("{f_all:.2}"),
        format!("{t_all:.2}"),
        change(f_all, t_all),
    ]);
    t.add_row(vec![
        "$ per 1M output tokens".to_string(),
        format!("{f_cost:.4}"),
        format!("{t_cost:.4}"),
        change(f_cost, t_cost),
    ]);
    format!(
        "\nWhat the tuner bought ({} deadline; it trades throughput the deadline does not need for energy):\n{t}\nBoth runs are on emulated devices, which follow tokenfab's own performance model: this shows the tuner doing what that model says pays, not that real GPUs behave so (see docs/engine-profiles.md to calibrate a real engine). Cost counts device-hours at the catalog's indicative price plus electricity, so a slower, more frugal point can cost more per token.",
        tokenfab_core::time::human(a.completion_window)
    )
}
