//! `tokenfab sim`: the discrete-event simulator for capacity planners.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokenfab_sim::compare::Comparison;
use tokenfab_sim::sweep::{self, Vary};
use tokenfab_sim::{Scenario, plot};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SimArgs {
    #[command(subcommand)]
    command: Option<SimCommand>,
    /// Scenario file (YAML): cluster, models, workload, policies, duration.
    /// See simulations/README.md.
    #[arg(required = true)]
    scenario: Option<PathBuf>,
    /// Seed for every random draw (default: the scenario's).
    #[arg(long)]
    seed: Option<u64>,
    /// Directory for report.json, series.csv, batches.csv and the plots
    /// (default: sim-out/<scenario name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not draw the SVG plots.
    #[arg(long)]
    no_plots: bool,
}

#[derive(Subcommand, Debug)]
enum SimCommand {
    /// Run a scenario over combinations of values and find the cheapest configuration
    /// that meets the SLA.
    Sweep(SweepArgs),
    /// Gather a sweep that ran in parts (`tokenfab sim sweep --point N`, one per machine or
    /// per index of a Kubernetes Indexed Job) into one table, sweep.json and sweep.csv.
    Gather(GatherArgs),
    /// Compare, on one scenario and workload: static configurations people run today
    /// (vLLM's default of 256 sequences at full power, fixed windows), tokenfab's tuner,
    /// and a hindsight oracle that picks the best static window and power limit per phase.
    /// Prints tokens/J, cost per 1M tokens and SLA attainment of each.
    Compare(CompareArgs),
    /// Draw one model's operating curve on one accelerator from the performance model:
    /// output tokens/J and inter-token latency against batch size, at full power and at
    /// the tuner's power limit, with the point the tuner settles on (run in the simulator
    /// on one saturated replica) and vLLM's default marked. Writes curve.svg, curve.csv
    /// and curve.json.
    Curve(CurveArgs),
    /// Write the performance model's engine profile of one model on one accelerator: its
    /// predicted decode step time and per-device power against batch, context length and
    /// power limit, in the engine-profile format (docs/engine-profiles.md). This is the
    /// prior that a measured profile of a real engine replaces.
    Profile(ProfileArgs),
    /// Replay a flight recording (`tokenfab server --record DIR`) through fresh control
    /// cores of this build and check that they decide exactly as the recorded ones did:
    /// the same replies and the same actions in the same order. Reports the first
    /// divergence of each run and exits with status 1 if there is one.
    Replay(ReplayArgs),
}

#[derive(Args, Debug)]
struct ReplayArgs {
    /// The recording folder (or one control-*.jsonl file of it).
    dir: PathBuf,
}

/// One replica of a model on an accelerator class, from the built-in catalog.
#[derive(Args, Debug)]
struct ReplicaArgs {
    /// Model (from the built-in catalog).
    #[arg(long, default_value = "llama-3.1-8b")]
    model: String,
    /// Accelerator class (from the built-in catalog).
    #[arg(long, default_value = "h100-sxm")]
    accelerator: String,
    /// Devices per replica.
    #[arg(long, default_value_t = 1)]
    tensor_parallel: u32,
}

#[derive(Args, Debug)]
struct CurveArgs {
    #[command(flatten)]
    replica: ReplicaArgs,
    /// Prompt and output tokens of every request.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: u32,
    #[arg(long, default_value_t = 256)]
    output_tokens: u32,
    /// Directory for curve.svg, curve.csv and curve.json (default: sim-out/curve-MODEL-ACCELERATOR).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ProfileArgs {
    #[command(flatten)]
    replica: ReplicaArgs,
    /// Decode batch sizes of the table.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,128,256,512,1024")]
    batches: Vec<u32>,
    /// Context lengths (tokens per sequence) of the table.
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048,8192")]
    contexts: Vec<u32>,
    /// Power limits of the table, as fractions from the device's minimum limit (0) to its
    /// maximum (1).
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    power_fractions: Vec<f64>,
    /// A truth that differs from the model, for a scenario's `profiles.truth`: steps take
    /// this many times as long as the model predicts (1.3 = an engine 30% slower).
    #[arg(long, value_name = "FACTOR")]
    slower: Option<f64>,
    /// A truth whose energy per token falls with the batch like a memory-bound engine's,
    /// toward the floor the model predicts at this batch, instead of the model's shape
    /// (power follows, within each power limit).
    #[arg(long, value_name = "BATCH")]
    energy_floor_batch: Option<u32>,
    /// Write the profile (TOML) here instead of to standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Scenario file (YAML).
    scenario: PathBuf,
    #[arg(long)]
    seed: Option<u64>,
    /// Phases the oracle cuts the run into (it tries each configuration of its grid in each).
    #[arg(long, default_value_t = 8)]
    oracle_phases: u32,
    /// Leave the oracle out (it costs about 25 runs of the scenario with the default grid).
    #[arg(long)]
    no_oracle: bool,
    /// The hindsight-best static row and the oracle choose from every window and power
    /// limit the tuner can reach (18 windows x 11 power limits: about 200 runs each)
    /// instead of the default grids (7 x 5 static settings, 5 x 5 for the oracle).
    #[arg(long)]
    full_grid: bool,
    /// Leave out the hindsight-best static row (its grid costs one run per setting).
    #[arg(long)]
    no_static_grid: bool,
    /// Directory for compare.json and compare.csv (default: sim-out/<name>-compare).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Runs at once (default: the number of CPU cores).
    #[arg(long)]
    jobs: Option<usize>,
}

#[derive(Args, Debug)]
struct SweepArgs {
    /// Scenario file (YAML).
    scenario: PathBuf,
    /// A field and the values to try, PATH=V1,V2,... (repeatable; every combination runs),
    /// e.g. --vary pools[0].nodes=1,2,4 --vary policies.window=64,128.
    #[arg(long = "vary", required = true)]
    varies: Vec<Vary>,
    /// Share of batches that must finish by their deadline for a configuration to meet
    /// the SLA.
    #[arg(long, default_value_t = 0.999)]
    sla: f64,
    #[arg(long)]
    seed: Option<u64>,
    /// Directory for sweep.json, sweep.csv and sweep.svg (default: sim-out/<name>-sweep).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Configurations run at once (default: the number of CPU cores).
    #[arg(long)]
    jobs: Option<usize>,
    /// Run only configuration N (from 0, in the order the combinations are listed) and
    /// write it to OUT/point-N.json, for a sweep split over machines: e.g. one index of a
    /// Kubernetes Indexed Job each (which sets JOB_COMPLETION_INDEX), then `tokenfab sim
    /// gather OUT` makes the table.
    #[arg(long, env = "JOB_COMPLETION_INDEX")]
    point: Option<usize>,
}

#[derive(Args, Debug)]
struct GatherArgs {
    /// The folder the parts were written to (`tokenfab sim sweep --point N --out DIR`).
    dir: PathBuf,
    /// Wait up to this long for every part to arrive (e.g. while the other indexes of a
    /// Kubernetes Job still run); without it, missing parts are an error at once.
    #[arg(long, value_parser = crate::parse::duration)]
    wait: Option<Duration>,
}

pub async fn run(a: SimArgs) -> anyhow::Result<()> {
    // The simulator is CPU-bound and synchronous: keep it off the async workers.
    tokio::task::spawn_blocking(move || match a.command {
        Some(SimCommand::Sweep(s)) => sweep(s),
        Some(SimCommand::Gather(g)) => gather(g),
        Some(SimCommand::Compare(c)) => compare(c),
        Some(SimCommand::Curve(c)) => curve(c),
        Some(SimCommand::Profile(p)) => profile(p),
        Some(SimCommand::Replay(r)) => replay(r),
        None => single(a.scenario.expect("clap requires it"), a.seed, a.out, !a.no_plots),
    })
    .await
    .context("the simulation thread failed")?
}

fn replay(a: ReplayArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(vec!["run (segment)", "core", "inputs", "actions", "result"]);
    let segments = tokenfab_record::replay(&a.dir, |s| {
        let name = s
            .file
            .file_name()
            .map_or_else(|| s.file.display().to_string(), |n| n.to_string_lossy().into());
        let verdict = match (&s.divergence, s.cut_short) {
            (Some(d), _) => format!("DIVERGES at line {}", d.line),
            (None, true) => "identical (ends mid-line: the process was killed)".to_string(),
            (None, false) => "identical".to_string(),
        };
        eprintln!("replayed {name}: {verdict}");
        table.add_row(vec![
            Cell::new(name),
            Cell::new(&s.core),
            Cell::new(s.inputs).set_alignment(CellAlignment::Right),
            Cell::new(s.actions).set_alignment(CellAlignment::Right),
            Cell::new(verdict),
        ]);
    })?;
    println!("{table}");
    let diverged: Vec<_> = segments.iter().filter_map(|s| s.divergence.as_ref()).collect();
    let inputs: u64 = segments.iter().map(|s| s.inputs).sum();
    println!(
        "{} run(s), {inputs} inputs replayed in {:.1} s",
        segments.len(),
        started.elapsed().as_secs_f64()
    );
    if diverged.is_empty() {
        println!("every run replays to identical replies and actions");
        return Ok(());
    }
    for d in &diverged {
        println!("{d}");
    }
    bail!(
        "{} of {} run(s) diverge: this build decides differently from the one that recorded",
        diverged.len(),
        segments.len()
    )
}

fn profile(a: ProfileArgs) -> anyhow::Result<()> {
    use tokenfab_core::profile::EngineProfile;
    let text = model_profile(&a)?.to_toml();
    // Checked on the way out, as any reader will check it.
    EngineProfile::from_toml(&text)?;
    match &a.out {
        Some(path) => {
            std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote the model's profile of {} on {} ({} batches x {} contexts x {} power limits) to {}",
                a.replica.model,
                a.replica.accelerator,
                a.batches.len(),
                a.contexts.len(),
                a.power_fractions.len(),
                path.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(())
}

fn model_profile(a: &ProfileArgs) -> anyhow::Result<tokenfab_core::profile::EngineProfile> {
    use tokenfab_core::perf::ReplicaPerf;
    let perf = ReplicaPerf::new(
        &tokenfab_core::ModelId::new(&a.replica.model),
        &tokenfab_core::AcceleratorId::new(&a.replica.accelerator),
        a.replica.tensor_parallel.max(1),
    )?;
    if let Some(f) = a.power_fractions.iter().find(|f| !(0.0..=1.0).contains(*f)) {
        anyhow::bail!("--power-fractions: {f} is outside 0 (the device's minimum limit) to 1 (its maximum)");
    }
    let (lo, hi) = (perf.min_power_w(), perf.max_power_w());
    let mut powers: Vec<f64> = a.power_fractions.iter().map(|f| lo + (hi - lo) * f).collect();
    powers.sort_by(f64::total_cmp);
    powers.dedup();
    let today = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let profile = tokenfab_core::profile::EngineProfile::from_model(
        &perf,
        &a.replica.model,
        &a.replica.accelerator,
        &a.batches,
        &a.contexts,
        &powers,
        &today,
    )
    .map_err(|e| anyhow::anyhow!("{e} (check --batches, --contexts and --power-fractions)"))?;
    let profile = match a.slower {
        Some(f) if !(f.is_finite() && f > 0.0) => {
            anyhow::bail!("--slower: {f} is not a positive factor (1.3 = steps take 30% longer)")
        }
        Some(f) => profile.slower(f),
        None => profile,
    };
    let profile = match a.energy_floor_batch {
        Some(0) => anyhow::bail!("--energy-floor-batch: give a batch of at least 1"),
        Some(b) => profile.energy_floor(b, perf.idle_power_w())?,
        None => profile,
    };
    Ok(profile)
}

fn curve(a: CurveArgs) -> anyhow::Result<()> {
    use tokenfab_sim::curve::{self, CurveSpec};
    let spec = CurveSpec {
        model: a.replica.model,
        accelerator: a.replica.accelerator,
        tensor_parallel: a.replica.tensor_parallel.max(1),
        prompt_tokens: a.prompt_tokens.max(1),
        output_tokens: a.output_tokens.max(1),
    };
    let out = a
        .out
        .unwrap_or_else(|| Path::new("sim-out").join(format!("curve-{}-{}", spec.model, spec.accelerator)));
    let c = curve::curve(&spec)?;
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "batch",
        "tok/J full power",
        "ms/token full power",
        format!("tok/J at {:.0} W", c.tuner_power_limit_w).as_str(),
        format!("ms/token at {:.0} W", c.tuner_power_limit_w).as_str(),
    ]);
    let mut csv = String::from(
        "batch,tokens_per_joule_full_power,inter_token_ms_full_power,tokens_per_s_full_power,tokens_per_joule_tuned_power,inter_token_ms_tuned_power,tokens_per_s_tuned_power\n",
    );
    for p in &c.points {
        csv.push_str(&format!(
            "{},{:.5},{:.4},{:.2},{:.5},{:.4},{:.2}\n",
            p.batch,
            p.tokens_per_joule_full_power,
            p.inter_token_ms_full_power,
            p.tokens_per_s_full_power,
            p.tokens_per_joule_tuned_power,
            p.inter_token_ms_tuned_power,
            p.tokens_per_s_tuned_power
        ));
        let tuner = p.batch == c.tuner_window.min(c.kv_batch_limit);
        if p.batch.is_power_of_two() || tuner || p.batch == c.kv_batch_limit {
            t.add_row([
                Cell::new(match (tuner, p.batch == c.kv_batch_limit) {
                    (true, _) => format!("{} (tuner)", p.batch),
                    (false, true) => format!("{} (KV cache full)", p.batch),
                    _ => p.batch.to_string(),
                }),
                Cell::new(format!("{:.2}", p.tokens_per_joule_full_power)).set_alignment(CellAlignment::Right),
                Cell::new(format!("{:.1}", p.inter_token_ms_full_power)).set_alignment(CellAlignment::Right),
                Cell::new(format!("{:.2}", p.tokens_per_joule_tuned_power)).set_alignment(CellAlignment::Right),
                Cell::new(format!("{:.1}", p.inter_token_ms_tuned_power)).set_alignment(CellAlignment::Right),
            ]);
        }
    }
    println!(
        "{} on {} (TP {}), {} prompt + {} output tokens per request; KV cache fits {} sequences",
        c.model, c.accelerator, c.tensor_parallel, c.prompt_tokens, c.output_tokens, c.kv_batch_limit
    );
    println!("{t}");
    println!(
        "the tuner settled on window {} at {:.0} W after {:.0} simulated s, measuring {:.2} output tokens/J there",
        c.tuner_window, c.tuner_power_limit_w, c.tuner_settled_s, c.tuner_measured_tokens_per_joule
    );
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("curve.csv"), csv).with_context(|| format!("writing {}", out.display()))?;
    std::fs::write(out.join("curve.json"), serde_json::to_string_pretty(&c)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    plot::curve_plot(&c, &out.join("curve.svg"))?;
    eprintln!("wrote curve.svg, curve.csv, curve.json to {}", out.display());
    Ok(())
}

fn compare(a: CompareArgs) -> anyhow::Result<()> {
    use tokenfab_sim::compare::{self, CompareOptions};
    let (scenario, base) = Scenario::load(&a.scenario)?;
    let seed = a.seed.unwrap_or(scenario.seed);
    let mut options = CompareOptions {
        oracle_phases: a.oracle_phases.max(1),
        oracle: !a.no_oracle,
        ..CompareOptions::default()
    };
    if a.full_grid {
        options = options.full_grid();
    }
    if a.no_static_grid {
        options.static_grid.clear();
    }
    if let Some(j) = a.jobs {
        options.jobs = j.max(1);
    }
    let out = a
        .out
        .unwrap_or_else(|| Path::new("sim-out").join(format!("{}-compare", scenario.name)));
    let variants = 8 + options.static_grid.len() as u64 + u64::from(options.oracle);
    eprintln!(
        "comparing {} policies on {} (about {:.0} runs of the scenario on {} thread(s))",
        variants,
        scenario.name,
        compare::cost_in_runs(&options),
        options.jobs
    );
    let b = bar(
        variants,
        "{spinner} [{bar:30}] {pos}/{len} variants {elapsed_precise} {msg}",
    );
    b.enable_steady_tick(Duration::from_millis(200));
    let started = Instant::now();
    let c = compare::compare(&scenario, &base, seed, &options, |name| {
        b.inc(1);
        b.set_message(format!("{name} done"));
    })?;
    b.finish_and_clear();
    println!("{}: {}", scenario.name, scenario.description);
    println!("{}", compare_table(&c));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("compare.json"), serde_json::to_string_pretty(&c)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    let mut csv = String::from(
        "variant,output_tokens_per_joule,serving_tokens_per_joule,energy_j,cost_per_million_output_tokens_usd,billed_s,horizon_tokens_per_joule,horizon_cost_per_million_output_tokens_usd,sla_attainment,refused_share,completion_p99_s,output_tokens\n",
    );
    for r in &c.rows {
        csv.push_str(&format!(
            "{},{:.5},{:.5},{:.1},{:.6},{:.1},{:.5},{:.6},{:.6},{:.6},{:.1},{}\n",
            r.variant,
            r.output_tokens_per_joule,
            r.serving_tokens_per_joule,
            r.energy_j,
            r.cost_per_million_output_tokens_usd,
            r.billed_s,
            r.horizon_tokens_per_joule,
            r.horizon_cost_per_million_output_tokens_usd,
            r.sla_attainment,
            r.refused_share,
            r.completion_p99_s,
            r.output_tokens
        ));
    }
    std::fs::write(out.join("compare.csv"), csv)?;
    for name in ["hindsight-static", "hindsight-static-at-tuner"] {
        if let Some(h) = c.rows.iter().find(|r| r.variant == name) {
            println!("{name}: {}", h.description);
        }
    }
    if let Some(o) = c.rows.iter().find(|r| r.variant == "oracle") {
        let phases: Vec<String> = o
            .phases
            .iter()
            .map(|p| format!("{}@{:.0}%", p.window, p.power_fraction * 100.0))
            .collect();
        println!("oracle's choice per phase (window@power): {}", phases.join(" "));
    }
    eprintln!(
        "wrote compare.json, compare.csv to {} ({:.1} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The comparison as a table for a terminal.
fn compare_table(c: &Comparison) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "variant",
        "tok/J (all energy)",
        "tok/J (serving)",
        "$ / 1M out",
        "billed",
        "tok/J (common end)",
        "$ / 1M (common end)",
        "on time",
        "refused",
        "p99 done",
        "output tokens",
    ]);
    for r in &c.rows {
        let mark = if c.best_static.as_deref() == Some(r.variant.as_str()) {
            " (best static)"
        } else {
            ""
        };
        t.add_row([
            Cell::new(format!("{}{mark}", r.variant)),
            Cell::new(format!("{:.3}", r.output_tokens_per_joule)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.3}", r.serving_tokens_per_joule)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.4}", r.cost_per_million_output_tokens_usd)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.2} h", r.billed_s / 3600.0)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.3}", r.horizon_tokens_per_joule)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.4}", r.horizon_cost_per_million_output_tokens_usd))
                .set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.2}%", r.sla_attainment * 100.0)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.2}%", r.refused_share * 100.0)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.0} s", r.completion_p99_s)).set_alignment(CellAlignment::Right),
            Cell::new(r.output_tokens).set_alignment(CellAlignment::Right),
        ]);
    }
    let mut out = t.to_string();
    out.push_str("\n(common end: every variant's devices counted, idle and billed, until the latest variant finished)");
    if let Some(v) = c.tuner_vs_best_static {
        out.push_str(&format!(
            "\ntuner vs best static ({}): {:+.1}% tokens/J",
            c.best_static.as_deref().unwrap_or("-"),
            (v - 1.0) * 100.0
        ));
    }
    if let Some(v) = c.tuner_vs_static_at_equal_attainment {
        out.push_str(&format!(
            "\ntuner vs the best static setting at its attainment (hindsight-static-at-tuner): {:+.1}% tokens/J",
            (v - 1.0) * 100.0
        ));
    }
    if let Some(v) = c.tuner_vs_oracle {
        out.push_str(&format!("\ntuner vs oracle: {:.1}% of its tokens/J", v * 100.0));
    }
    out
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    b
}

/// The table `tokenfab sim SCENARIO` prints.
fn summary_table(report: &tokenfab_sim::report::Report) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["", "simulated"]);
    for (k, v) in report.summary() {
        t.add_row([Cell::new(k), Cell::new(v)]);
    }
    t.to_string()
}

fn single(path: PathBuf, seed: Option<u64>, out: Option<PathBuf>, plots: bool) -> anyhow::Result<()> {
    let (scenario, base) = Scenario::load(&path)?;
    let seed = seed.unwrap_or(scenario.seed);
    let out = out.unwrap_or_else(|| Path::new("sim-out").join(&scenario.name));
    let expected = scenario.duration.as_secs_f64();
    let started = Instant::now();
    let mut progress: Option<ProgressBar> = None;
    // Batch records go to batches.csv as batches end (memory stays flat on long runs).
    let records = tokenfab_sim::BatchRecords::Csv(out.join("batches.csv"));
    let report = tokenfab_sim::run_with(&scenario, &base, seed, &records, |t| {
        // Only runs longer than a second get a bar.
        if progress.is_none() && started.elapsed() > Duration::from_secs(1) {
            let b = bar(
                expected.ceil() as u64,
                "{spinner} simulating [{bar:40}] {pos}/{len} simulated s {elapsed_precise} eta {eta}",
            );
            progress = Some(b);
        }
        if let Some(b) = &progress {
            b.set_position((t.as_secs_f64() as u64).min(expected as u64));
        }
    })?;
    if let Some(b) = progress {
        b.finish_and_clear();
    }
    let wall = started.elapsed().as_secs_f64();
    println!("{}: {}", scenario.name, scenario.description);
    println!("{}", summary_table(&report));
    report
        .write(&out)
        .with_context(|| format!("cannot write the report to {}", out.display()))?;
    let mut files = vec!["report.json", "sla.json", "series.csv", "batches.csv"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    if plots {
        files.extend(plot::report_plots(&report, &out)?);
    }
    println!("wrote {} to {}", files.join(", "), out.display());
    println!(
        "simulated {:.0} s in {wall:.2} s of wall time: {:.0} requests and {:.2} device-hours per wall second ({} events)",
        report.simulated_s,
        report.requests.arrived as f64 / wall,
        report.pools.iter().map(|p| f64::from(p.devices)).sum::<f64>() * report.simulated_s / 3600.0 / wall,
        report.events
    );
    Ok(())
}

fn sweep(a: SweepArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&a.sla) {
        bail!(
            "--sla is a share of batches, between 0 and 1 (e.g. 0.999), not {}",
            a.sla
        );
    }
    let text = std::fs::read_to_string(&a.scenario).with_context(|| format!("cannot read {}", a.scenario.display()))?;
    let file = a.scenario.display().to_string();
    let base = a.scenario.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut configs = sweep::expand(&text, &file, &a.varies)?;
    let name = configs[0].1.name.clone();
    let point = match a.point {
        Some(i) if i >= configs.len() => bail!(
            "--point {i}: this sweep has {} configurations, numbered 0 to {}",
            configs.len(),
            configs.len() - 1
        ),
        Some(i) => {
            let of = configs.len();
            configs = vec![configs.swap_remove(i)];
            let seed = a.seed.unwrap_or(configs[0].1.seed);
            Some(sweep::Point {
                index: i,
                of,
                sweep: sweep::fingerprint(&text, &a.varies, seed, a.sla),
            })
        }
        None => None,
    };
    let seed = a.seed.unwrap_or(configs[0].1.seed);
    let jobs = a
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let out = a
        .out
        .unwrap_or_else(|| Path::new("sim-out").join(format!("{name}-sweep")));
    if point.is_some() {
        // Made before the simulation, so that a folder the part cannot be written to is
        // known at once, and the gathering step finds the folder early.
        std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    }
    eprintln!("{} configurations of {name} on {jobs} threads", configs.len());
    let progress = bar(
        configs.len() as u64,
        "{spinner} sweeping [{bar:40}] {pos}/{len} configurations {elapsed_precise} eta {eta}",
    );
    let started = Instant::now();
    let mut result = sweep::run(configs, &base, seed, jobs, a.sla, &|done, _| {
        progress.set_position(done as u64)
    })?;
    progress.finish_and_clear();
    if let Some(p) = point {
        let (index, of) = (p.index, p.of);
        result.point = Some(p);
        // Written whole, then renamed: the gathering step never reads half a part.
        let file = out.join(format!("point-{index:05}.json"));
        let partial = out.join(format!(".point-{index:05}.json.partial"));
        std::fs::write(&partial, serde_json::to_string_pretty(&result)? + "\n")
            .with_context(|| format!("cannot write {}", partial.display()))?;
        std::fs::rename(&partial, &file).with_context(|| format!("cannot write {}", file.display()))?;
        let r = &result.rows[0];
        let params: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "configuration {} of {} ({}): ${:.4} per 1M output tokens, {:.2}% on time, {} the SLA; wrote {} ({:.1} s)",
            index,
            of,
            params.join(" "),
            r.cost_per_million_output_tokens_usd,
            r.sla_attainment * 100.0,
            if r.meets_sla { "meets" } else { "misses" },
            file.display(),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    print_sweep(&result);
    result
        .write(&out)
        .with_context(|| format!("cannot write to {}", out.display()))?;
    let mut files = "sweep.json, sweep.csv".to_string();
    if let Some(first) = a.varies.first() {
        let points: Vec<(f64, f64, bool)> = result
            .rows
            .iter()
            .filter_map(|r| {
                r.params
                    .iter()
                    .find(|p| p.0 == first.path)
                    .and_then(|p| p.1.parse::<f64>().ok())
                    .map(|x| (x, r.cost_per_million_output_tokens_usd, r.meets_sla))
            })
            .collect();
        if points.len() == result.rows.len() && a.varies.len() == 1 {
            plot::sweep_plot(&out.join("sweep.svg"), &first.path, &points)?;
            files.push_str(", sweep.svg");
        }
    }
    println!(
        "wrote {files} to {} ({:.1} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Gathers the parts of a split sweep in `a.dir` into one. With `--wait`, a folder not
/// made yet, parts not written yet and parts that cannot be read yet are waited for.
fn gather(a: GatherArgs) -> anyhow::Result<()> {
    let deadline = a.wait.map(|w| Instant::now() + w);
    let waiting = || deadline.is_some_and(|d| Instant::now() < d);
    let pause = || {
        let left = deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(Instant::now()));
        std::thread::sleep(left.min(Duration::from_secs(5)));
    };
    let mut said = String::new();
    let mut say = |what: String| {
        // Said once per change, not at every look.
        if what != said {
            eprintln!("waiting: {what}");
            said = what;
        }
    };
    loop {
        let entries = match std::fs::read_dir(&a.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && waiting() => {
                say(format!("{} does not exist yet", a.dir.display()));
                pause();
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", a.dir.display())),
        };
        let mut parts = Vec::new();
        let mut unreadable = None;
        for e in entries {
            let path = e?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with("point-") && name.ends_with(".json") {
                let read = std::fs::read_to_string(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|text| serde_json::from_str::<sweep::Sweep>(&text).map_err(anyhow::Error::from));
                match read {
                    Ok(part) => parts.push(part),
                    Err(e) => {
                        unreadable = Some(format!(
                            "{} is not a part of a sweep (tokenfab sim sweep --point N): {e}",
                            path.display()
                        ));
                    }
                }
            }
        }
        if let Some(why) = unreadable {
            if waiting() {
                say(why);
                pause();
                continue;
            }
            bail!(why);
        }
        match sweep::gather(parts) {
            Ok(result) => {
                print_sweep(&result);
                result
                    .write(&a.dir)
                    .with_context(|| format!("cannot write to {}", a.dir.display()))?;
                println!("wrote sweep.json, sweep.csv to {}", a.dir.display());
                return Ok(());
            }
            Err(e @ (sweep::GatherError::Missing { .. } | sweep::GatherError::Empty)) if waiting() => {
                say(e.to_string());
                pause();
            }
            Err(e) => bail!("{}: {e}", a.dir.display()),
        }
    }
}

/// The sweep's table and its answer, on stdout.
fn print_sweep(result: &sweep::Sweep) {
    let mut t = Table::new();
    let mut header: Vec<String> = result
        .rows
        .first()
        .map(|r| r.params.iter().map(|p| p.0.clone()).collect())
        .unwrap_or_default();
    header.extend(
        [
            "devices",
            "output tok/s",
            "tok/J",
            "$ / 1M out",
            "total $",
            "on time",
            "refused",
            "p99 done",
            "SLA",
        ]
        .map(String::from),
    );
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    for (i, r) in result.rows.iter().enumerate() {
        let mut cells: Vec<Cell> = r.params.iter().map(|p| Cell::new(&p.1)).collect();
        let mark = if Some(i) == result.cheapest_meeting_sla {
            "cheapest"
        } else if r.meets_sla {
            "yes"
        } else {
            "no"
        };
        for v in [
            r.devices.to_string(),
            format!("{:.0}", r.output_tokens_per_s),
            format!("{:.2}", r.output_tokens_per_joule),
            format!("{:.4}", r.cost_per_million_output_tokens_usd),
            format!("{:.2}", r.cost_usd),
            format!("{:.2}%", r.sla_attainment * 100.0),
            format!("{:.2}%", r.refused_share * 100.0),
            format!("{:.0} s", r.completion_p99_s),
            mark.to_string(),
        ] {
            cells.push(Cell::new(v).set_alignment(CellAlignment::Right));
        }
        t.add_row(cells);
    }
    println!("{t}");
    println!("{}", result.answer());
}

#[cfg(test)]
mod tests {
    //! Snapshots of what `tokenfab sim` and `tokenfab sla` print, so that a change to the
    //! simulator's results or to the tables' layout shows up as a reviewed diff
    //! (`UPDATE_EXPECT=1 cargo test -p tokenfab` rewrites them).
    use super::*;

    #[test]
    fn the_model_profile_reads_back_and_bad_options_are_named() {
        use tokenfab_core::profile::{EngineProfile, ProfileSource};
        let mut a = ProfileArgs {
            replica: ReplicaArgs {
                model: "llama-3.1-8b".into(),
                accelerator: "h100-sxm".into(),
                tensor_parallel: 1,
            },
            batches: vec![1, 64, 512],
            contexts: vec![512, 4096],
            power_fractions: vec![1.0, 0.0],
            slower: None,
            energy_floor_batch: None,
            out: None,
        };
        let back = EngineProfile::from_toml(&model_profile(&a).unwrap().to_toml()).unwrap();
        assert_eq!(back.power_limits_w, [200.0, 700.0], "the H100's limits, ascending");
        assert_eq!(back.provenance.source, ProfileSource::Model);
        assert!(back.decode_step(512, 4096, 700.0).seconds > back.decode_step(1, 512, 700.0).seconds);
        a.power_fractions = vec![1.5];
        let e = model_profile(&a).unwrap_err().to_string();
        assert!(e.contains("--power-fractions: 1.5 is outside"), "{e}");
        a.power_fractions = vec![1.0];
        a.batches = vec![64, 8];
        let e = model_profile(&a).unwrap_err().to_string();
        assert!(e.contains("batches[1]") && e.contains("ascending"), "{e}");
        a.batches = vec![1, 64, 512];
        a.slower = Some(1.3);
        a.energy_floor_batch = Some(64);
        let truth = model_profile(&a).unwrap();
        assert!((truth.step_s[0][0][2] / back.step_s[1][0][2] - 1.3).abs() < 1e-9);
        assert!(truth.provenance.notes.contains("x1.3") && truth.provenance.notes.contains("floor"));
        a.slower = Some(-1.0);
        assert!(model_profile(&a).unwrap_err().to_string().contains("--slower"));
        a.slower = None;
        a.batches = vec![8];
        a.replica.accelerator = "no-such-chip".into();
        assert!(model_profile(&a).is_err());
    }
    use expect_test::expect;

    /// Twenty simulated minutes of one 2-GPU node with a committed and a best-effort
    /// tenant: small enough for a debug build, busy enough for every row to mean something.
    const SCENARIO: &str = r#"
name: snapshot
description: "A small node for the output snapshots"
duration: 20m
seed: 7
pools:
  - {name: h100, accelerator: h100-sxm, nodes: 1, devices_per_node: 2}
deployments:
  - {pool: h100, model: llama-3.1-8b, tensor_parallel: 1, window: 64}
workload:
  tenants:
    - name: support
      model: llama-3.1-8b
      arrivals: {kind: poisson, batches_per_hour: 12}
      batch_size: {kind: uniform, min: 50, max: 150}
      completion_window: 30m
    - name: eval
      model: llama-3.1-8b
      arrivals: {kind: poisson, batches_per_hour: 6}
      batch_size: {kind: fixed, value: 100}
      completion_window: 1h
      sla_class: best-effort
"#;

    fn report() -> tokenfab_sim::report::Report {
        let scenario = Scenario::parse(SCENARIO, "snapshot.yaml").unwrap();
        tokenfab_sim::run(&scenario, Path::new("."), scenario.seed, |_| {}).unwrap()
    }

    #[test]
    fn the_simulators_summary_and_the_sla_tables_are_as_reviewed() {
        let report = report();
        expect![[r#"
            ┌───────────────────────────┬──────────────────────────────────────────────────────────────────────────────────────────────────────────────────┐
            │                           ┆ simulated                                                                                                        │
            ╞═══════════════════════════╪══════════════════════════════════════════════════════════════════════════════════════════════════════════════════╡
            │ scenario                  ┆ snapshot (seed 7)                                                                                                │
            │ simulated                 ┆ 20.0 min of arrivals, the last batch ended at 19.3 min, devices billed for 20.0 min                              │
            │ requests                  ┆ 621 arrived, 621 completed, 0 failed, 0 refused                                                                  │
            │ batches                   ┆ 6 arrived; 6 completed                                                                                           │
            │ output tokens             ┆ 159634 (133/s)                                                                                                   │
            │ batch completion time     ┆ p50 9.8 s, p90 11.9 s, p99 11.9 s, max 11.9 s                                                                    │
            │ SLA attainment            ┆ 100.00% of batches by their deadline                                                                             │
            │   class best-effort       ┆ 3 batches, 100.00% on time, p99 11.9 s                                                                           │
            │   class standard          ┆ 3 batches, 100.00% on time, p99 10.0 s                                                                           │
            │ device utilization        ┆ 4.4%                                                                                                             │
            │ energy                    ┆ 0.1 kWh (0.0 kWh attributed to requests, idle power 0.1 kW)                                                      │
            │ output tokens/J           ┆ 0.74                                                                                                             │
            │ cost                      ┆ $1.34 (devices $1.33, energy $0.01)                                                                              │
            │ cost per 1M output tokens ┆ $8.3973                                                                                                          │
            │   pool h100               ┆ 2 x h100-sxm: 4.4% busy, 0.1 kWh, 159634 output tokens                                                           │
            │ free devices              ┆ 0 of 2 serve no replica; 0 of them stranded (no served model fits them)                                          │
            │ placement advice          ┆ for the busiest hour (llama-3.1-8b 44 tok/s): 1 replicas instead of 2 (start 0, stop 1; stranded devices 0 -> 0) │
            └───────────────────────────┴──────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘"#]].assert_eq(&summary_table(&report));
        let sla = report.sla.as_ref().expect("the run has an SLA document");
        expect![[r#"
            tokenfab.io/v1 ThroughputSLA over the last 2400 s (data for 895 s)
            ┌──────────────┬─────────────┬─────────┬─────────────────┬────────────────┬───────┬────────────┬───────────────────┐
            │ model        ┆ accelerator ┆ devices ┆ committed tok/s ┆ measured tok/s ┆ tok/J ┆ $ / 1M out ┆ latency p50 / p99 │
            ╞══════════════╪═════════════╪═════════╪═════════════════╪════════════════╪═══════╪════════════╪═══════════════════╡
            │ llama-3.1-8b ┆ h100-sxm    ┆       2 ┆            8019 ┆            178 ┆  2.94 ┆     0.3799 ┆ 2.49 s / 9.77 s   │
            └──────────────┴─────────────┴─────────┴─────────────────┴────────────────┴───────┴────────────┴───────────────────┘
            ┌──────────────┬─────────────┬─────────────┬─────────┬─────────┬────────────────────────────┐
            │ model        ┆ SLA class   ┆ committed   ┆ batches ┆ on time ┆ completion p50 / p90 / p99 │
            ╞══════════════╪═════════════╪═════════════╪═════════╪═════════╪════════════════════════════╡
            │ llama-3.1-8b ┆ best-effort ┆ best-effort ┆       3 ┆ 100.00% ┆ 12 s / 12 s / 12 s         │
            │ llama-3.1-8b ┆ standard    ┆ yes         ┆       3 ┆ 100.00% ┆ 9 s / 10 s / 10 s          │
            └──────────────┴─────────────┴─────────────┴─────────┴─────────┴────────────────────────────┘"#]].assert_eq(&crate::sla::render(sla));
    }
}
