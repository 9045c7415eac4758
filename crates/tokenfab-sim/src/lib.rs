//! # tokenfab-sim: the discrete-event simulator
//!
//! Capacity planners describe a cluster, its models, a workload and policies in a
//! scenario file; the simulator runs tokenfab's own decision code on a virtual clock:
//! [`tokenfab_core::control::ControlCore`] (admission, queue, leasing, results),
//! [`tokenfab_core::agent::AgentCore`] (one per node: leasing, windows, attribution) and
//! [`tokenfab_core::engine::EngineModel`] (one per replica: iteration-level continuous
//! batching on the calibrated performance and energy model). There is no simplified
//! scheduler here: what the simulator decides is what the live system would decide.

pub mod scenario;

pub use scenario::{Scenario, ScenarioError};
