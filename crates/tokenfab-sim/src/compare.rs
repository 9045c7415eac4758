//! Comparisons: one scenario under the static configurations people run today, under
//! tokenfab's tuner, and under a hindsight oracle, on the same workload (same seed).
//!
//! - `vllm-default`: every replica runs vLLM's default of up to 256 sequences at full
//!   power, requests spread round-robin: what a deployment gets without tuning.
//! - `static-wN`: every replica at window N (64, 128, 256, 512) and full power, least-loaded
//!   routing: the configurations operators pick by hand.
//! - `hindsight-static`: the best of a grid of static settings chosen in hindsight: every
//!   window of the grid times every power limit from the device minimum to its maximum
//!   (as a share of the maximum, never below the minimum, as the oracle reads it), each run over the whole scenario; the one with the
//!   most tokens/J among those with the highest SLA attainment any reached. This is the
//!   best a careful operator could set by hand once, knowing the workload. Its grid
//!   (`static_grid`, default 7 windows x 5 power limits; `full_grid` for every window and
//!   power limit the tuner can reach) is in the comparison's JSON with every point's
//!   figures.
//! - `hindsight-static-at-tuner`: the same grid, its best point among those that keep at
//!   least the tuner's SLA attainment while refusing no larger share of requests than
//!   the tuner: the hindsight-best hand setting *at equal attainment*. (The plain
//!   `hindsight-static` row may reach its tokens/J by refusing work the tuner serves.)
//!   Absent when no grid point qualifies.
//! - The *best static* baseline is the best (same rule) of all static variants above.
//! - `tuner`: the scenario with `policies.tuner.mode: active` (objective tokens/J): each
//!   replica's window and power limit are tuned online from measurements, on beliefs
//!   corrected online (`policies.recalibration`).
//! - `tuner-no-recal`: the same, with the recalibration off (the beliefs stay what the
//!   scenario gives; the tuner's own throughput calibration still runs).
//! - `tuner+placement`: the tuner, and the control plane's placement keeps active only
//!   the replicas that the deadlines and the arrival rate need (`policies.placement.mode:
//!   active`); parked replicas idle (the simulator does not power them off or stop
//!   billing them).
//! - `oracle`: the run is cut into phases; in each, every static configuration of a grid
//!   (windows x power limits down to the device minimum) is tried from the same state, and
//!   the one that draws the least energy for the work is kept (work left undone is charged
//!   at the best energy per token seen in the phase), among those that miss no deadline in
//!   the phase and from which the rest of the run, played flat out, misses no more
//!   deadlines than it would from the phase's start. It knows the whole workload in
//!   hindsight, which no online tuner does; being greedy phase by phase, it is not a
//!   global optimum.
//!
//! Every variant runs the scenario's own workload and cluster with one seed, so the
//! figures differ only by policy. Tokens/J is output tokens over all the devices' energy,
//! idle included. A variant that finishes later is billed, and draws idle power, for
//! longer; the *common end* figures count every variant's devices until the latest
//! variant finished, since a fleet stays up whether or not its work is done.

use crate::report::Report;
use crate::scenario::{Scenario, ScenarioError};
use crate::sim::Simulation;
use serde::Serialize;
use std::path::Path;
use tokenfab_core::Timestamp;
use tokenfab_core::agent::Routing;
use tokenfab_core::control::PlacementMode;
use tokenfab_core::policy::ObjectiveKind;
use tokenfab_core::tuner::TunerMode;

/// A static configuration: window and power limit as a fraction of the device maximum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StaticConfig {
    pub window: u32,
    pub power_fraction: f64,
}

/// Settings of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareOptions {
    /// Phases the oracle cuts the run into.
    pub oracle_phases: u32,
    /// The static configurations the oracle chooses from in each phase (a power fraction
    /// of 0 is the device's minimum limit).
    pub oracle_grid: Vec<StaticConfig>,
    /// Skip the oracle (it costs about one run per grid point).
    pub oracle: bool,
    /// The static settings the hindsight-best static row chooses from; empty: no such row.
    pub static_grid: Vec<StaticConfig>,
    /// Threads.
    pub jobs: usize,
}

impl Default for CompareOptions {
    fn default() -> Self {
        let mut grid = Vec::new();
        // Up to the tuner's largest window (1,024).
        for window in [64, 128, 256, 512, 1024] {
            // 0 is the device's minimum power limit (29% of the maximum on an H100).
            for power_fraction in [1.0, 0.75, 0.55, 0.4, 0.0] {
                grid.push(StaticConfig { window, power_fraction });
            }
        }
        let mut static_grid = Vec::new();
        for window in [16, 32, 64, 128, 256, 512, 1024] {
            for power_fraction in [1.0, 0.75, 0.5, 0.25, 0.0] {
                static_grid.push(StaticConfig { window, power_fraction });
            }
        }
        CompareOptions {
            oracle_phases: 8,
            oracle_grid: grid,
            oracle: true,
            static_grid,
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl CompareOptions {
    /// Every window and power limit the tuner can reach (its default grid: windows from 1
    /// to 1,024 about 1.5x apart, power limits in steps of a tenth of the maximum down to
    /// the minimum, as shares of the range), for both the hindsight-best static row and
    /// the oracle.
    pub fn full_grid(mut self) -> Self {
        let t = tokenfab_core::tuner::TunerConfig::default();
        let windows = tokenfab_core::tuner::window_grid(1, 1024, t.window_step);
        let mut powers = vec![1.0];
        let mut f: f64 = 1.0;
        while f - t.power_step > 1e-9 {
            f -= t.power_step;
            powers.push((f * 100.0).round() / 100.0);
        }
        powers.push(0.0);
        let grid: Vec<StaticConfig> = windows
            .iter()
            .flat_map(|&window| {
                powers
                    .iter()
                    .map(move |&power_fraction| StaticConfig { window, power_fraction })
            })
            .collect();
        self.static_grid = grid.clone();
        self.oracle_grid = grid;
        self
    }
}

/// What one variant measured.
#[derive(Debug, Clone, Serialize)]
pub struct CompareRow {
    pub variant: String,
    pub description: String,
    /// Output tokens over all devices' energy, idle included.
    pub output_tokens_per_joule: f64,
    /// Output tokens over the energy attributed to requests (serving only, no idle).
    pub serving_tokens_per_joule: f64,
    pub energy_j: f64,
    pub cost_per_million_output_tokens_usd: f64,
    pub sla_attainment: f64,
    pub refused_share: f64,
    pub completion_p99_s: f64,
    pub output_tokens: u64,
    /// Seconds the devices were billed for (until the last batch ended).
    pub billed_s: f64,
    /// Tokens/J and cost per 1M output tokens as if every variant's devices were kept
    /// (idle, billed) until the latest variant finished: a variant that stretches work
    /// out is not flattered by a shorter bill than one that finishes early.
    pub horizon_tokens_per_joule: f64,
    pub horizon_cost_per_million_output_tokens_usd: f64,
    #[serde(skip)]
    idle_power_w: f64,
    #[serde(skip)]
    device_usd: f64,
    #[serde(skip)]
    energy_usd: f64,
    /// For the oracle: the configuration it chose in each phase.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<StaticConfig>,
}

/// A whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub scenario: String,
    pub seed: u64,
    pub rows: Vec<CompareRow>,
    /// Every point of the hindsight-best static row's grid (`static-grid-wN-pP`, P the
    /// power limit as a percentage of each pool's maximum, at least its minimum).
    pub static_grid: Vec<CompareRow>,
    /// The best static baseline: highest tokens/J among the static variants with the
    /// highest SLA attainment any of them reached.
    pub best_static: Option<String>,
    /// The tuner's tokens/J relative to the best static baseline and to the oracle
    /// (1.25 = 25% more).
    pub tuner_vs_best_static: Option<f64>,
    pub tuner_vs_oracle: Option<f64>,
    /// The tuner's tokens/J relative to `hindsight-static-at-tuner` (the best static
    /// setting that keeps the tuner's attainment and refuses no more).
    pub tuner_vs_static_at_equal_attainment: Option<f64>,
}

fn row(variant: &str, description: &str, r: &Report) -> CompareRow {
    let refused = r.requests.refused_share();
    CompareRow {
        variant: variant.into(),
        description: description.into(),
        output_tokens_per_joule: r.output_tokens_per_joule,
        serving_tokens_per_joule: if r.energy_attributed_j > 0.0 {
            r.requests.completion_tokens as f64 / r.energy_attributed_j
        } else {
            0.0
        },
        energy_j: r.energy_j,
        cost_per_million_output_tokens_usd: r.cost.per_million_output_tokens_usd,
        sla_attainment: r.batches.sla_attainment,
        refused_share: refused,
        completion_p99_s: r.batches.completion_s.p99,
        output_tokens: r.requests.completion_tokens,
        billed_s: r.simulated_s,
        horizon_tokens_per_joule: r.output_tokens_per_joule,
        horizon_cost_per_million_output_tokens_usd: r.cost.per_million_output_tokens_usd,
        idle_power_w: r.idle_power_w,
        device_usd: r.cost.device_usd,
        energy_usd: r.cost.energy_usd,
        phases: Vec::new(),
    }
}

/// The scenario with every deployment at a static window, full power, tuner off.
fn static_variant(s: &Scenario, window: u32, routing: Routing) -> Scenario {
    let mut s = s.clone();
    s.policies.tuner.mode = TunerMode::Off;
    s.policies.routing = routing;
    for p in &mut s.pools {
        p.power_limit_w = None;
    }
    for d in &mut s.deployments {
        d.window = Some(window);
        d.max_num_seqs = Some(window.max(256));
    }
    s
}

/// The scenario with every deployment at window `c.window` and every pool's power limit at
/// `c.power_fraction` as the oracle reads it ([`crate::sim::static_power_w`]), tuner off,
/// least-loaded routing.
fn static_at(s: &Scenario, c: StaticConfig) -> Scenario {
    let mut s = static_variant(s, c.window, Routing::LeastLoaded);
    let catalog = tokenfab_core::catalog::Catalog::builtin();
    for p in &mut s.pools {
        if let Ok(a) = catalog.accelerator(&tokenfab_core::AcceleratorId::new(p.accelerator.clone())) {
            p.power_limit_w = Some(crate::sim::static_power_w(
                a.power_limit_min_w,
                a.max_power_w,
                c.power_fraction,
            ));
        }
    }
    s
}

/// Runs the comparison. `progress` is told the name of each variant as it finishes.
pub fn compare(
    scenario: &Scenario,
    base: &Path,
    seed: u64,
    options: &CompareOptions,
    progress: impl Fn(&str) + Sync,
) -> Result<Comparison, ScenarioError> {
    let mut variants: Vec<(String, String, Scenario)> = vec![(
        "vllm-default".into(),
        "window 256 (vLLM's default max_num_seqs), full power, round-robin".into(),
        static_variant(scenario, 256, Routing::RoundRobin),
    )];
    for w in [64, 128, 256, 512] {
        variants.push((
            format!("static-w{w}"),
            format!("window {w}, full power, least-loaded"),
            static_variant(scenario, w, Routing::LeastLoaded),
        ));
    }
    let mut tuned = scenario.clone();
    tuned.policies.tuner.mode = TunerMode::Active;
    tuned.policies.tuner.objective = ObjectiveKind::TokensPerJoule;
    for p in &mut tuned.pools {
        p.power_limit_w = None;
    }
    let mut placed = tuned.clone();
    placed.policies.placement.mode = PlacementMode::Active;
    let mut unrecalibrated = tuned.clone();
    unrecalibrated.policies.recalibration.enabled = false;
    variants.push((
        "tuner".into(),
        "tokenfab's tuner: window and power limit per replica, online, for tokens/J within the deadlines, on recalibrated beliefs".into(),
        tuned,
    ));
    variants.push((
        "tuner-no-recal".into(),
        "the tuner on the beliefs as given (no online recalibration)".into(),
        unrecalibrated,
    ));
    variants.push((
        "tuner+placement".into(),
        "the tuner, and the control plane keeps only the replicas the deadlines and arrivals need active".into(),
        placed,
    ));
    let results = crate::sweep::parallel(&variants, options.jobs, |(name, description, s)| {
        let r = crate::run_totals(s, base, seed).map(|r| row(name, description, &r));
        progress(name);
        r
    });
    let mut rows = Vec::new();
    for r in results {
        rows.push(r?);
    }
    let grid_names: Vec<(String, Scenario)> = options
        .static_grid
        .iter()
        .map(|&c| {
            (
                format!("static-grid-w{}-p{:.0}", c.window, c.power_fraction * 100.0),
                static_at(scenario, c),
            )
        })
        .collect();
    let mut static_grid = Vec::new();
    for r in crate::sweep::parallel(&grid_names, options.jobs, |(name, s)| {
        let r = crate::run_totals(s, base, seed).map(|r| row(name, "a static window and power limit", &r));
        progress(name);
        r
    }) {
        static_grid.push(r?);
    }
    let grid_top = static_grid.iter().map(|r| r.sla_attainment).fold(0.0, f64::max);
    let n = options.static_grid.len();
    rows.extend(best_of_grid(
        &static_grid,
        &options.static_grid,
        "hindsight-static",
        |r| r.sla_attainment >= grid_top,
        |c, point| {
            format!(
                "the best of {n} static settings in hindsight: window {}, power limit at {:.0}% of each pool's maximum (at least its minimum) ({point})",
                c.window,
                c.power_fraction * 100.0,
            )
        },
    ));
    if let Some(tuner) = rows.iter().find(|r| r.variant == "tuner").cloned() {
        rows.extend(best_of_grid(
            &static_grid,
            &options.static_grid,
            "hindsight-static-at-tuner",
            |r| r.sla_attainment >= tuner.sla_attainment && r.refused_share <= tuner.refused_share + 1e-12,
            |c, point| {
                format!(
                    "the best of the {n} static settings that keep the tuner's SLA attainment ({:.2}%) refusing no more ({:.2}%): window {}, power limit at {:.0}% ({point})",
                    tuner.sla_attainment * 100.0,
                    tuner.refused_share * 100.0,
                    c.window,
                    c.power_fraction * 100.0,
                )
            },
        ));
    }
    if options.oracle {
        let r = oracle(scenario, base, seed, options)?;
        progress("oracle");
        rows.push(r);
    }
    let horizon = rows.iter().map(|r| r.billed_s).fold(0.0, f64::max);
    for r in &mut rows {
        let extra = (horizon - r.billed_s).max(0.0);
        let energy = r.energy_j + r.idle_power_w * extra;
        if energy > 0.0 {
            r.horizon_tokens_per_joule = r.output_tokens as f64 / energy;
        }
        if r.billed_s > 0.0 && r.output_tokens > 0 && r.energy_j > 0.0 {
            let usd = r.device_usd * horizon / r.billed_s + r.energy_usd * energy / r.energy_j;
            r.horizon_cost_per_million_output_tokens_usd = usd / r.output_tokens as f64 * 1e6;
        }
    }
    let statics: Vec<&CompareRow> = rows
        .iter()
        .filter(|r| r.variant.starts_with("static-") || r.variant == "vllm-default" || r.variant == "hindsight-static")
        .collect();
    let top = statics.iter().map(|r| r.sla_attainment).fold(0.0, f64::max);
    let best_static = statics
        .iter()
        .filter(|r| r.sla_attainment >= top)
        .max_by(|a, b| a.output_tokens_per_joule.total_cmp(&b.output_tokens_per_joule))
        .map(|r| r.variant.clone());
    let tpj = |name: &str| {
        rows.iter()
            .find(|r| r.variant == name)
            .map(|r| r.output_tokens_per_joule)
    };
    let tuner = tpj("tuner");
    Ok(Comparison {
        tuner_vs_static_at_equal_attainment: tpj("hindsight-static-at-tuner").zip(tuner).map(|(b, t)| t / b),
        scenario: scenario.name.clone(),
        seed,
        tuner_vs_best_static: best_static.as_deref().and_then(tpj).zip(tuner).map(|(b, t)| t / b),
        tuner_vs_oracle: tpj("oracle").zip(tuner).map(|(o, t)| t / o),
        best_static,
        rows,
        static_grid,
    })
}

/// The grid point with the most tokens/J among those `keep` accepts, as row `variant`
/// described by `describe(setting, grid point's name)`.
fn best_of_grid(
    grid: &[CompareRow],
    settings: &[StaticConfig],
    variant: &str,
    keep: impl Fn(&CompareRow) -> bool,
    describe: impl Fn(StaticConfig, &str) -> String,
) -> Option<CompareRow> {
    let (i, best) = grid
        .iter()
        .enumerate()
        .filter(|(_, r)| keep(r))
        .max_by(|a, b| a.1.output_tokens_per_joule.total_cmp(&b.1.output_tokens_per_joule))?;
    let c = settings[i];
    let mut r = best.clone();
    r.variant = variant.into();
    r.description = describe(c, &best.variant);
    r.phases = vec![c];
    Some(r)
}

/// The hindsight oracle (see the module docs).
fn oracle(scenario: &Scenario, base: &Path, seed: u64, options: &CompareOptions) -> Result<CompareRow, ScenarioError> {
    let mut s = static_variant(scenario, 256, Routing::LeastLoaded);
    let max_window = options.oracle_grid.iter().map(|c| c.window).max().unwrap_or(256);
    for d in &mut s.deployments {
        d.max_num_seqs = Some(max_window.max(256));
    }
    let mut sim = Simulation::new(&s, base, seed)?;
    // The forks copy the simulation: no batch records to copy with it.
    sim.collector.discard_records();
    let phases = options.oracle_phases.max(1);
    let phase = s.duration / phases;
    let mut chosen = Vec::new();
    let mut over = false;
    for p in 0..phases {
        if over {
            break;
        }
        // The last phase runs to the end of the run.
        let until = if p + 1 == phases {
            Timestamp::MAX
        } else {
            Timestamp::ZERO.saturating_add(phase * (p + 1))
        };
        let start_energy = sim.energy_j();
        let (start_tokens, _, start_missed) = sim.progress();
        let tried = crate::sweep::parallel(&options.oracle_grid, options.jobs, |c| {
            let mut fork = sim.clone();
            fork.set_static(c.window, c.power_fraction);
            let done = fork.run_until(until, &mut |_| {});
            let energy = fork.energy_j() - start_energy;
            let (tokens, _, missed) = fork.progress();
            // Admission's rule: the capacity counted on is derated by its headroom.
            let headroom = s.policies.admission_headroom;
            let feasible = fork
                .backlog(max_window)
                .iter()
                .all(|&(need, have)| need <= tokenfab_core::admission::derated(have, headroom));
            (
                fork,
                done,
                energy,
                tokens - start_tokens,
                missed - start_missed,
                feasible,
            )
        });
        // The least energy for the work, among forks that missed the fewest deadlines and
        // left a backlog that full speed can still finish in time.
        let fewest = tried.iter().map(|t| t.4).min().unwrap_or(0);
        let best_jpt = tried
            .iter()
            .filter(|t| t.3 > 0)
            .map(|t| t.2 / t.3 as f64)
            .fold(f64::INFINITY, f64::min);
        let total_tokens = tried.iter().map(|t| t.3).max().unwrap_or(0);
        let score = |t: &(Simulation, bool, f64, u64, usize, bool)| {
            let left = total_tokens.saturating_sub(t.3) as f64;
            t.2 + if best_jpt.is_finite() { left * best_jpt } else { 0.0 }
        };
        // In hindsight: a choice is safe if finishing the rest of the run flat out from
        // where it leaves things misses no more deadlines than doing so from the phase's
        // start. Candidates are checked best first, so usually one or two are run on.
        let flat_out = |from: &Simulation| {
            let mut rest = from.clone();
            rest.set_static(max_window, 1.0);
            rest.run_until(Timestamp::MAX, &mut |_| {});
            rest.progress().2
        };
        let unavoidable = if p + 1 < phases { flat_out(&sim) } else { 0 };
        let mut order: Vec<usize> = (0..tried.len()).filter(|&i| tried[i].4 == fewest).collect();
        order.sort_by(|&a, &b| score(&tried[a]).total_cmp(&score(&tried[b])));
        let safe = |i: usize| p + 1 == phases || tried[i].1 || flat_out(&tried[i].0) <= unavoidable;
        let pick = order
            .iter()
            .copied()
            .find(|&i| safe(i))
            .or(order.first().copied())
            .unwrap_or(0);
        chosen.push(options.oracle_grid[pick]);
        let (fork, done, ..) = tried.into_iter().nth(pick).expect("picked from these");
        sim = fork;
        over = done;
    }
    let report = sim.finish(|_| {});
    let mut r = row(
        "oracle",
        "hindsight: per phase, the static window and power limit that drew least energy while keeping every deadline",
        &report,
    );
    r.phases = chosen;
    Ok(r)
}

/// How long a comparison will take, roughly, in runs of the scenario.
pub fn cost_in_runs(options: &CompareOptions) -> f64 {
    let statics = 8.0 + options.static_grid.len() as f64;
    let oracle = if options.oracle {
        // The grid, plus about two flat-out checks of the rest per phase.
        options.oracle_grid.len() as f64 + f64::from(options.oracle_phases)
    } else {
        0.0
    };
    statics + oracle
}
