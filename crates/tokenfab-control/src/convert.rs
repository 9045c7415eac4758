//! Conversions between the wire types and the core's types, and the one place where
//! core errors become gRPC statuses.

use tokenfab_core::batch::BatchStatus;
use tokenfab_core::batch_input::InputError;
use tokenfab_core::control::{
    BatchError, BatchView, NodeDevice, NodeRegistration, NodeReplica, ReportedOutcome, ReportedResult, SubmitError,
    UnknownNode,
};
use tokenfab_core::durable::Outcome;
use tokenfab_core::usage::Usage;
use tokenfab_core::{
    AcceleratorId, BatchId, ModelId, NodeId, ReplicaId, RequestRef, SuperNodeId, Timestamp, WorkUnitId,
};
use tokenfab_proto::v1 as pb;
use tonic::Status;

pub fn unix_ms(t: Option<Timestamp>) -> i64 {
    t.map_or(0, |t| t.as_millis() as i64)
}

pub fn status(s: BatchStatus) -> pb::BatchStatus {
    match s {
        BatchStatus::Validating => pb::BatchStatus::Validating,
        BatchStatus::Queued => pb::BatchStatus::Queued,
        BatchStatus::InProgress => pb::BatchStatus::InProgress,
        BatchStatus::Finalizing => pb::BatchStatus::Finalizing,
        BatchStatus::Completed => pb::BatchStatus::Completed,
        BatchStatus::Failed => pb::BatchStatus::Failed,
        BatchStatus::Expired => pb::BatchStatus::Expired,
        BatchStatus::Cancelling => pb::BatchStatus::Cancelling,
        BatchStatus::Cancelled => pb::BatchStatus::Cancelled,
    }
}

pub fn usage(u: &Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        joules: u.joules,
        device_seconds: u.device_seconds,
        cost_usd: u.cost_usd,
    }
}

pub fn usage_from(u: Option<&pb::Usage>) -> Usage {
    u.map_or_else(Usage::default, |u| Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        joules: u.joules,
        device_seconds: u.device_seconds,
        cost_usd: u.cost_usd,
    })
}

pub fn batch(v: &BatchView) -> pb::Batch {
    let l = &v.life;
    pb::Batch {
        id: v.meta.id.to_string(),
        tenant: v.meta.tenant.to_string(),
        model: v.meta.model.to_string(),
        status: status(l.status()) as i32,
        sla_class: v.meta.sla_class.clone(),
        completion_window_seconds: v.meta.completion_window.as_secs(),
        metadata: v.meta.metadata.clone().into_iter().collect(),
        request_counts: Some(pb::RequestCounts {
            total: v.counts.total,
            completed: v.counts.completed,
            failed: v.counts.failed,
            invalid: v.counts.invalid,
        }),
        usage: Some(usage(&v.usage)),
        created_at_unix_ms: unix_ms(Some(l.created_at)),
        deadline_unix_ms: unix_ms(Some(v.meta.deadline)),
        in_progress_at_unix_ms: unix_ms(l.in_progress_at),
        finalizing_at_unix_ms: unix_ms(l.finalizing_at),
        completed_at_unix_ms: unix_ms(l.completed_at),
        failed_at_unix_ms: unix_ms(l.failed_at),
        expired_at_unix_ms: unix_ms(l.expired_at),
        cancelling_at_unix_ms: unix_ms(l.cancelling_at),
        cancelled_at_unix_ms: unix_ms(l.cancelled_at),
        failure_reason: l.failure_reason.clone().unwrap_or_default(),
        input_bytes: v.meta.input_bytes,
    }
}

/// Replica telemetry of a heartbeat. Values an agent cannot have measured (negative or
/// not finite) are dropped as zero.
pub fn replica_reports(t: pb::Telemetry) -> Vec<tokenfab_core::control::ReplicaReport> {
    use tokenfab_core::control::{ReplicaReport, TuningReport};
    use tokenfab_core::tuner::{Advice, TunerMode};
    let num = |j: f64| if j.is_finite() && j >= 0.0 { j } else { 0.0 };
    t.replicas
        .into_iter()
        .map(|r| {
            let mode = r.tuner_mode.parse().unwrap_or(TunerMode::Off);
            let advice = (r.advised_window > 0).then(|| Advice {
                window: r.advised_window,
                power_limit_w: num(r.advised_power_limit_w),
                predicted_objective: num(r.advised_objective_value),
                predicted_tokens_per_s: 0.0,
                current_objective: num(r.current_objective_value),
                current_tokens_per_s: 0.0,
            });
            let tuning = (mode != TunerMode::Off).then(|| TuningReport {
                mode,
                objective: r.objective.chars().take(64).collect::<String>().into(),
                objective_value: num(r.objective_value),
                measured_tokens_per_s: num(r.measured_output_tokens_per_second),
                owed_tokens_per_s: num(r.owed_output_tokens_per_second),
                holding: r.holding,
                moves: r.tuner_moves,
                reason: r.tuner_reason.chars().take(512).collect::<String>().into(),
                advice,
            });
            ReplicaReport {
                replica: tokenfab_core::ReplicaId::new(r.replica_id),
                window: r.window,
                in_flight: r.in_flight,
                attributed_j: num(r.attributed_joules),
                idle_j: num(r.idle_joules),
                power_limit_w: (r.power_limit_w > 0.0 && r.power_limit_w.is_finite()).then_some(r.power_limit_w),
                tuning,
                calibration: r.recalibration.as_ref().and_then(recalibration),
                unreachable: r.engine_unreachable,
            }
        })
        .collect()
}

/// A replica's recalibration as an agent reported it; factors an agent cannot have
/// measured (not positive, not finite) drop it.
fn recalibration(r: &pb::Recalibration) -> Option<tokenfab_core::recal::Correction> {
    let factor = |x: f64| x.is_finite() && x > 0.0;
    let known = |x: f64| (x.is_finite() && x >= 0.0).then_some(x);
    (factor(r.time_factor) && factor(r.power_factor) && r.uncertainty.is_finite() && r.uncertainty >= 0.0).then(|| {
        tokenfab_core::recal::Correction {
            time: r.time_factor,
            power: r.power_factor,
            uncertainty: r.uncertainty,
            samples: r.samples,
            power_samples: r.power_samples,
            model_error: known(r.model_error),
            energy_error: known(r.energy_error),
        }
    })
}

pub fn batch_id(s: &str) -> Result<BatchId, Status> {
    s.parse()
        .map_err(|e: tokenfab_core::ids::BadBatchId| Status::invalid_argument(format!("batch_id: {e}")))
}

pub fn input_error(e: InputError) -> Status {
    match e {
        InputError::TooLarge { .. } | InputError::TooManyRequests { .. } => Status::resource_exhausted(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

pub fn submit_error(e: SubmitError) -> Status {
    match e {
        SubmitError::UnknownModel { .. } => Status::not_found(format!("options.model: {e}")),
        SubmitError::UnknownFile(_) => Status::not_found(format!("input_file_id: {e}")),
        SubmitError::UnknownSlaClass { .. } => Status::invalid_argument(format!("options.sla_class: {e}")),
        SubmitError::WindowTooLong { .. } => {
            Status::invalid_argument(format!("options.completion_window_seconds: {e}"))
        }
        SubmitError::NoRequests => Status::invalid_argument(e.to_string()),
        SubmitError::Metadata(_) => Status::invalid_argument(format!("options.{e}")),
        SubmitError::TooManyBatches { .. }
        | SubmitError::TokenQuota { .. }
        | SubmitError::TooManyQueued { .. }
        | SubmitError::StoredBytes { .. }
        | SubmitError::StorageLow { .. } => Status::resource_exhausted(e.to_string()),
        SubmitError::Late { earliest, .. } => {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(earliest.as_micros());
            let mut status = Status::resource_exhausted(format!(
                "options.completion_window_seconds: {e} (earliest completion {})",
                humantime::format_rfc3339_seconds(at)
            ));
            if let Ok(v) = (earliest.as_micros() / 1000).to_string().parse() {
                status.metadata_mut().insert("tokenfab-earliest-completion-unix-ms", v);
            }
            status
        }
        SubmitError::NoRoomInClass { .. } => Status::resource_exhausted(format!("options.sla_class: {e}")),
    }
}

pub fn batch_error(e: BatchError) -> Status {
    match e {
        BatchError::NotFound(_) => Status::not_found(e.to_string()),
        BatchError::Transition(_) | BatchError::NotFinished(..) => Status::failed_precondition(e.to_string()),
    }
}

pub fn unknown_node(e: UnknownNode) -> Status {
    Status::not_found(e.to_string())
}

/// The core loop did not answer: the commit the call depended on failed (the store is
/// being reopened), or the control plane is shutting down.
pub fn stopped() -> Status {
    Status::unavailable(
        "the control plane could not complete the call (its durable store failed and is being reopened, or it is shutting down); nothing of it was acknowledged: retry",
    )
}

pub fn registration(r: pb::RegisterRequest) -> Result<NodeRegistration, Status> {
    if r.node.trim().is_empty() {
        return Err(Status::invalid_argument("node: a node name is required"));
    }
    Ok(NodeRegistration {
        node: NodeId::new(r.node),
        super_node: SuperNodeId::new(r.super_node),
        devices: r
            .devices
            .into_iter()
            .map(|d| NodeDevice {
                index: d.index,
                accelerator: AcceleratorId::new(d.accelerator),
                domain: d.domain,
            })
            .collect(),
        replicas: r
            .replicas
            .into_iter()
            .map(|p| NodeReplica {
                replica: ReplicaId::new(p.replica_id),
                model: ModelId::new(p.model),
                devices: p.device_indices,
                max_concurrency: p.max_concurrency,
                window: p.window,
            })
            .collect(),
        // The wire registration carries no price: the catalog's applies.
        usd_per_device_hour: None,
    })
}

pub fn reported(results: Vec<pb::WorkResult>) -> Result<Vec<ReportedResult>, Status> {
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let outcome = match r.outcome {
                Some(pb::work_result::Outcome::Response(resp)) => ReportedOutcome::Final(Outcome::Response {
                    status_code: u16::try_from(resp.status_code).unwrap_or(u16::MAX),
                    body: resp.body.to_vec(),
                    request_id: resp.request_id,
                }),
                Some(pb::work_result::Outcome::RetryableError(e)) => ReportedOutcome::Retryable {
                    code: e.code,
                    message: e.message,
                },
                None => {
                    return Err(Status::invalid_argument(format!("results[{i}]: outcome is required")));
                }
            };
            if let Some(u) = &r.usage {
                for (name, v) in [("joules", u.joules), ("device_seconds", u.device_seconds)] {
                    if !v.is_finite() || v < 0.0 {
                        return Err(Status::invalid_argument(format!(
                            "results[{i}].usage.{name} is {v}; it must be a finite number >= 0"
                        )));
                    }
                }
            }
            Ok(ReportedResult {
                unit: WorkUnitId(r.unit_id),
                req: RequestRef {
                    batch: BatchId(r.batch),
                    index: r.index,
                },
                outcome,
                usage: usage_from(r.usage.as_ref()),
                latency: std::time::Duration::from_micros(r.latency_us),
            })
        })
        .collect()
}

/// The SLA document on the wire.
pub fn sla(d: &tokenfab_core::sla::ThroughputSla) -> pb::ThroughputSla {
    let pct = |p: &tokenfab_core::sla::Percentiles| pb::Percentiles {
        mean: p.mean,
        p50: p.p50,
        p90: p.p90,
        p99: p.p99,
    };
    let m = &d.method;
    pb::ThroughputSla {
        api_version: d.api_version.clone(),
        kind: d.kind.clone(),
        metadata: Some(pb::SlaMetadata {
            generated_at_unix_ms: d.metadata.generated_at_unix_ms,
            window_seconds: d.metadata.window_seconds,
            covered_seconds: d.metadata.covered_seconds,
        }),
        method: Some(pb::SlaMethod {
            specification: m.specification.clone(),
            tokens: m.tokens.clone(),
            throughput: m.throughput.clone(),
            percentiles: m.percentiles.clone(),
            energy: m.energy.clone(),
            cost: m.cost.clone(),
            commitment: m.commitment.clone(),
            durability: m.durability.clone(),
        }),
        pools: d
            .pools
            .iter()
            .map(|p| pb::SlaPool {
                model: p.model.clone(),
                accelerator: p.accelerator.clone(),
                devices: p.devices,
                replicas: p.replicas,
                committed_output_tokens_per_second: p.committed_output_tokens_per_second,
                measured_output_tokens_per_second: p.measured_output_tokens_per_second,
                requests: p.requests,
                output_tokens: p.output_tokens,
                prompt_tokens: p.prompt_tokens,
                output_tokens_per_joule: p.output_tokens_per_joule,
                cost_per_million_output_tokens_usd: p.cost_per_million_output_tokens_usd,
                request_latency_seconds: Some(pct(&p.request_latency_seconds)),
            })
            .collect(),
        classes: d
            .classes
            .iter()
            .map(|c| pb::SlaClass {
                model: c.model.clone(),
                class: c.class.clone(),
                committed: c.committed,
                batches: c.batches,
                on_time: c.on_time,
                attainment: c.attainment,
                completion_seconds: Some(pct(&c.completion_seconds)),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_energy_must_be_a_finite_non_negative_number() {
        let result = |joules: f64| pb::WorkResult {
            outcome: Some(pb::work_result::Outcome::Response(pb::EngineResponse::default())),
            usage: Some(pb::Usage {
                joules,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(reported(vec![result(1.5)]).is_ok());
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            let e = reported(vec![result(0.0), result(bad)]).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message().starts_with("results[1].usage.joules is "),
                "{}",
                e.message()
            );
        }
        let e = reported(vec![pb::WorkResult::default()]).unwrap_err();
        assert_eq!(e.message(), "results[0]: outcome is required");
    }
}
