//! `tokenfab`: one binary for every role. See `tokenfab --help`.

mod admin;
mod calibrate;
mod demo;
mod devices;
mod parse;
mod serve;
mod sim;
mod sla;
mod tenant;
mod tuning;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// tokenfab: a token-factory cluster scheduler for batch LLM inference.
///
/// Tenants submit batches of OpenAI-format requests (the OpenAI Batch JSONL format);
/// the control plane leases them to agents, which run them on inference engines (vLLM,
/// SGLang, TGI, llama.cpp, or tokenfab's emulator) and report results exactly once, with
/// tokens, joules and cost per batch.
///
/// Start here: `tokenfab demo` runs a whole cluster in one process on emulated GPUs.
#[derive(Parser)]
#[command(name = "tokenfab", version, propagate_version = true)]
struct Cli {
    /// Log filter (tracing-subscriber syntax), e.g. `info`, `debug`, `tokenfab_control=debug`.
    #[arg(long, global = true, env = "TOKENFAB_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole cluster in this process on emulated GPUs and submit a sample batch.
    ///
    /// Starts an embedded control plane, emulated super-nodes (default 2 nodes x 8 H100)
    /// with one engine emulator per GPU and one agent per node, submits the 10,000-request
    /// sample batch shipped with tokenfab, shows progress, and prints a summary. Needs no
    /// GPU and no external service.
    Demo(demo::DemoArgs),
    /// Run a control plane (gRPC for tenants and agents, Prometheus metrics).
    Server(Box<serve::ServerArgs>),
    /// Run a node agent that drives engine replicas for a control plane.
    Agent(serve::AgentArgs),
    /// Run an OpenAI-compatible engine emulator driven by the performance model.
    EngineEmu(serve::EmuArgs),
    /// Submit a batch file (OpenAI Batch JSONL) and print its id.
    Submit(tenant::SubmitArgs),
    /// List, show, cancel, watch or delete batches.
    #[command(subcommand)]
    Batches(tenant::BatchesCommand),
    /// Operator tasks: issue node tokens, hash tenant tokens, back up, restore, verify
    /// and compact a control plane's store.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Download a batch's results (OpenAI Batch output JSONL) and errors.
    Results(tenant::ResultsArgs),
    /// Your metered usage: batches, requests, tokens, energy, device time and cost.
    Usage(tenant::UsageArgs),
    /// The published throughput SLA: committed and measured throughput per model and
    /// accelerator, tokens/J, cost, and batch completion times per SLA class.
    Sla(sla::SlaArgs),
    /// What each replica's batch-size and power tuner does: window, power limit, the rate
    /// it owes to deadlines, what it measured, why it last moved (or, in advisory mode,
    /// what the performance model recommends); free and stranded devices, and placement's
    /// advice on the replica layout.
    Tuning(tuning::TuningArgs),
    /// Simulate a cluster and workload with tokenfab's own scheduling code, or sweep
    /// configurations to find the cheapest one that meets the SLA.
    ///
    /// `tokenfab sim SCENARIO.yaml [--seed N] [--out DIR]` runs one scenario;
    /// `tokenfab sim sweep SCENARIO.yaml --vary pools[0].nodes=1,2,4` runs many;
    /// `tokenfab sim compare SCENARIO.yaml` measures the tuner against static
    /// configurations and a hindsight oracle; `tokenfab sim curve` draws a model's
    /// tokens/J and latency against batch size.
    Sim(sim::SimArgs),
    /// Measure a live OpenAI-compatible engine (llama-server, vLLM, ...) over a grid of
    /// requests in flight and prompt lengths, and write its engine profile (decode step
    /// time against batch and context, prefill cost per token) with a fit report: how well
    /// the profile predicts what was measured. The simulator and the tuner can then believe
    /// the measured curve instead of the performance model (docs/engine-profiles.md).
    Calibrate(calibrate::CalibrateArgs),
    /// Read this node's NVIDIA GPUs through NVML, as `tokenfab agent --devices nvml` would:
    /// devices, memory, NVLink domains, power limits, then a few readings of power, the
    /// energy counter, utilisation and temperature. Changes nothing on the GPUs.
    Devices(devices::DevicesArgs),
}

/// Where the control plane is and who the tenant is.
#[derive(Args, Clone, Debug)]
pub struct Connection {
    /// Control plane gRPC URL; for a replicated control plane (`server --store etcd`),
    /// every replica's URL, comma-separated: the command uses the one that is elected
    /// (only it listens).
    #[arg(long, env = "TOKENFAB_CONTROL", default_value = "http://127.0.0.1:7443")]
    pub control: String,
    /// Tenant bearer token (issued by the operator).
    #[arg(long, env = "TOKENFAB_TOKEN", hide_env_values = true)]
    pub token: tokenfab_identity::Secret,
    /// With an https:// control plane URL: the CA certificate (PEM) that signed the
    /// control plane's certificate (default: the bundled public roots).
    #[arg(long, env = "TOKENFAB_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("warning: bad --log filter '{filter}' ({e}); using 'warn'");
        tracing_subscriber::EnvFilter::new("warn")
    });
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Demo(a) => demo::run(a).await,
            Command::Server(a) => serve::server(*a).await,
            Command::Admin(c) => admin::run(c).await,
            Command::Agent(a) => serve::agent(a).await,
            Command::EngineEmu(a) => serve::engine_emu(a).await,
            Command::Submit(a) => tenant::submit(a).await,
            Command::Batches(c) => tenant::batches(c).await,
            Command::Results(a) => tenant::results(a).await,
            Command::Usage(a) => tenant::usage(a).await,
            Command::Sla(a) => sla::run(a).await,
            Command::Tuning(a) => tuning::run(a).await,
            Command::Sim(a) => sim::run(a).await,
            Command::Calibrate(a) => calibrate::run(a).await,
            Command::Devices(a) => devices::run(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// A path argument's display for messages.
pub fn shown(p: &std::path::Path) -> String {
    PathBuf::from(p).display().to_string()
}
