//! # tokenfab-core: the sans-IO brain
//!
//! Every decision tokenfab makes lives here, in deterministic code that takes
//! `(now, event)` and returns actions: batch input validation, the batch lifecycle,
//! work-unit leasing and exactly-once result recording, the agent's dispatch loop, the
//! performance and energy model, and the iteration-level engine model. The control plane
//! and the agent are thin async shells around this crate; the simulator drives the same
//! code on a virtual clock.
//!
//! Invariants (enforced by `clippy.toml` and a test on `Cargo.toml`):
//! - no async runtime, no network, no disk, no clock: time is an input ([`Timestamp`]);
//! - no `HashMap` iteration: ordered maps and sorted vectors only, so runs replay exactly.

pub mod admission;
pub mod agent;
pub mod batch;
pub mod batch_input;
pub mod catalog;
pub mod control;
pub mod durable;
pub mod engine;
pub mod ids;
pub mod llmd;
pub mod objective;
pub mod perf;
pub mod placement;
pub mod policy;
pub mod profile;
pub mod protocol;
pub mod recal;
pub mod sla;
pub mod time;
pub mod tuner;
pub mod usage;

pub use ids::*;
pub use time::Timestamp;
