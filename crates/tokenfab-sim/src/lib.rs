//! # tokenfab-sim: the discrete-event simulator
//!
//! Capacity planners describe a cluster, its models, a workload and policies in a
//! scenario file; the simulator runs tokenfab's own decision code on a virtual clock:
//! [`tokenfab_core::control::ControlCore`] (admission, queue, leasing, results),
//! [`tokenfab_core::agent::AgentCore`] (one per node: leasing, windows, attribution) and
//! [`tokenfab_core::engine::EngineModel`] (one per replica: iteration-level continuous
//! batching on the calibrated performance and energy model). There is no simplified
//! scheduler here: what the simulator decides is what the live system would decide.

pub mod compare;
pub mod curve;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod sim;
pub mod sweep;
pub mod workload;

pub use report::{BatchRecords, Report};
pub use scenario::{Scenario, ScenarioError};
pub use sim::Simulation;

use std::path::Path;
use tokenfab_core::Timestamp;

/// Runs `scenario` with `seed`, reading trace files relative to `base`. `progress` is
/// called from time to time with the simulated time reached. The report keeps every
/// batch's record ([`BatchRecords::Keep`]); long runs stream them with [`run_with`].
pub fn run(
    scenario: &Scenario,
    base: &Path,
    seed: u64,
    progress: impl FnMut(Timestamp),
) -> Result<Report, ScenarioError> {
    Ok(sim::Simulation::new(scenario, base, seed)?.run(progress))
}

/// [`run`] without the batch records (the report's totals and percentiles are all there):
/// what sweeps and comparisons need.
pub(crate) fn run_totals(scenario: &Scenario, base: &Path, seed: u64) -> Result<Report, ScenarioError> {
    let mut sim = sim::Simulation::new(scenario, base, seed)?;
    sim.collector.discard_records();
    Ok(sim.run(|_| {}))
}

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("cannot write the batch records to {path}: {message}")]
    Records { path: String, message: String },
}

/// [`run`], with the batch records going `records`: streamed to a CSV file as batches
/// end, the simulator's memory does not grow with the batches that end.
pub fn run_with(
    scenario: &Scenario,
    base: &Path,
    seed: u64,
    records: &BatchRecords,
    progress: impl FnMut(Timestamp),
) -> Result<Report, RunError> {
    let mut sim = sim::Simulation::new(scenario, base, seed)?;
    let path = |r: &BatchRecords| match r {
        BatchRecords::Csv(p) => p.display().to_string(),
        _ => String::new(),
    };
    sim.collector.set_records(records).map_err(|e| RunError::Records {
        path: path(records),
        message: e.to_string(),
    })?;
    let report = sim.run(progress);
    if let Some(e) = &report.records_error {
        return Err(RunError::Records {
            path: path(records),
            message: e.clone(),
        });
    }
    Ok(report)
}
