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

pub use report::Report;
pub use scenario::{Scenario, ScenarioError};
pub use sim::Simulation;

use std::path::Path;
use tokenfab_core::Timestamp;

/// Runs `scenario` with `seed`, reading trace files relative to `base`. `progress` is
/// called from time to time with the simulated time reached.
pub fn run(
    scenario: &Scenario,
    base: &Path,
    seed: u64,
    progress: impl FnMut(Timestamp),
) -> Result<Report, ScenarioError> {
    let mut sim = sim::Simulation::new(scenario, base, seed)?;
    sim.collector.set_seed(seed);
    Ok(sim.run(progress))
}
