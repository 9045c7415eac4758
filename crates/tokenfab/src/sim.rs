//! `tokenfab sim`: the discrete-event simulator for capacity planners.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
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
}

pub async fn run(a: SimArgs) -> anyhow::Result<()> {
    // The simulator is CPU-bound and synchronous: keep it off the async workers.
    tokio::task::spawn_blocking(move || match a.command {
        Some(SimCommand::Sweep(s)) => sweep(s),
        None => single(a.scenario.expect("clap requires it"), a.seed, a.out, !a.no_plots),
    })
    .await
    .context("the simulation thread failed")?
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

fn single(path: PathBuf, seed: Option<u64>, out: Option<PathBuf>, plots: bool) -> anyhow::Result<()> {
    let (scenario, base) = Scenario::load(&path)?;
    let seed = seed.unwrap_or(scenario.seed);
    let out = out.unwrap_or_else(|| Path::new("sim-out").join(&scenario.name));
    let expected = scenario.duration.as_secs_f64();
    let started = Instant::now();
    let mut progress: Option<ProgressBar> = None;
    let report = tokenfab_sim::run(&scenario, &base, seed, |t| {
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
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["", "simulated"]);
    for (k, v) in report.summary() {
        t.add_row([Cell::new(k), Cell::new(v)]);
    }
    println!("{t}");
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
    let configs = sweep::expand(&text, &file, &a.varies)?;
    let name = configs[0].1.name.clone();
    let seed = a.seed.unwrap_or(configs[0].1.seed);
    let jobs = a
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let out = a
        .out
        .unwrap_or_else(|| Path::new("sim-out").join(format!("{name}-sweep")));
    eprintln!("{} configurations of {name} on {jobs} threads", configs.len());
    let progress = bar(
        configs.len() as u64,
        "{spinner} sweeping [{bar:40}] {pos}/{len} configurations {elapsed_precise} eta {eta}",
    );
    let started = Instant::now();
    let result = sweep::run(configs, &base, seed, jobs, a.sla, &|done, _| {
        progress.set_position(done as u64)
    })?;
    progress.finish_and_clear();
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
