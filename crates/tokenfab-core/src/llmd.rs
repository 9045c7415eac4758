//! The published throughput SLA as llm-d Benchmark Reports (schema v0.2.1, from the
//! `llm-d/llm-d-benchmark` repository), so that tokenfab's measurements can be compared
//! with llm-d and inference-perf runs.
//!
//! An llm-d report describes one serving stack with one aggregate of results, so a
//! `ThroughputSLA` document becomes one report per pool (model × accelerator class), all
//! sharing the document's time as `run.eid`. Where the fields map, they are filled from
//! the same measurement:
//!
//! | llm-d field | from |
//! |---|---|
//! | `run.time` | the window the figures cover (`coveredSeconds` before `generatedAtUnixMs`) |
//! | `scenario.stack[0]` | the pool's replicas, devices per replica (devices / replicas, as tensor parallelism) |
//! | `requests.total`, `input_length`, `output_length` | successful results in the window and their mean token counts |
//! | `latency.request_latency` | request latency (dispatch to the engine's full answer; not streamed, so no TTFT or ITL) |
//! | `throughput.*_rate` | tokens and requests over the covered seconds |
//!
//! What llm-d has no field for (committed throughput, tokens per joule, cost, batch
//! completion times and attainment per SLA class) goes, with explicit units, under
//! `results.observability.tokenfab_usage` and `results.observability.tokenfab_throughput_sla`
//! (the pool's part of the native document), which the schema leaves open. Fields
//! tokenfab does not measure are left out rather than filled with zeros: failed requests
//! (the meter counts successes), streaming latencies, the engine's name and version
//! (`unknown`: registrations do not carry them yet).

use crate::sla::{Percentiles, SlaPool, ThroughputSla};
use serde_json::{Value, json};

/// The llm-d Benchmark Report schema version written.
pub const VERSION: &str = "0.2.1";

/// One llm-d Benchmark Report per pool of `doc`.
pub fn benchmark_reports(doc: &ThroughputSla) -> Vec<Value> {
    doc.pools.iter().map(|pool| report(doc, pool)).collect()
}

fn report(doc: &ThroughputSla, pool: &SlaPool) -> Value {
    let end_ms = doc.metadata.generated_at_unix_ms;
    let covered = doc.metadata.covered_seconds;
    let start_ms = end_ms.saturating_sub((covered * 1e3).round() as u64);
    let label = format!("{}@{}", pool.model, pool.accelerator);
    let mut run = json!({
        "uid": format!("tokenfab-sla-{end_ms}-{}-{}", pool.model, pool.accelerator),
        "eid": format!("tokenfab-sla-{end_ms}"),
        "time": {
            "start": crate::time::rfc3339_ms(start_ms),
            "end": crate::time::rfc3339_ms(end_ms),
            "duration": format!("PT{covered:.3}S"),
        },
        "description": format!(
            "tokenfab ThroughputSLA over {:.0} s (data for {covered:.0} s) for {label}: live tenant batch traffic, not a synthetic benchmark; requests counts successful results only; request latency is from dispatch to the engine to its full, non-streamed answer",
            doc.metadata.window_seconds
        ),
        "keywords": ["tokenfab", "throughput-sla", "batch", "non-streaming"],
    });
    if covered <= 0.0 {
        // Nothing measured yet: no time span to state.
        run.as_object_mut().expect("an object").remove("time");
    }
    let mut scenario = serde_json::Map::new();
    if let Some(per_replica) = pool.devices.checked_div(pool.replicas) {
        let per_replica = per_replica.max(1);
        scenario.insert(
            "stack".into(),
            json!([{
                "metadata": {
                    "label": label,
                    "cfg_id": format!("{}/tp{per_replica}", label),
                    "description": format!("every registered replica of {} on {}", pool.model, pool.accelerator),
                },
                "standardized": {
                    "kind": "inference_engine",
                    "tool": "unknown",
                    "tool_version": "unknown",
                    "role": "replica",
                    "replicas": pool.replicas,
                    "model": {"name": pool.model},
                    "accelerator": {
                        "model": pool.accelerator,
                        "count": per_replica,
                        "parallelism": {"tp": per_replica},
                    },
                },
                "native": {"config": {"devices": pool.devices, "replicas": pool.replicas}},
            }]),
        );
    }
    let requests = pool.requests as f64;
    let per_s = |x: f64| if covered > 0.0 { x / covered } else { 0.0 };
    if pool.requests > 0 {
        scenario.insert(
            "load".into(),
            json!({
                "metadata": {"description": "tenant batches submitted to tokenfab during the window"},
                "standardized": {
                    "tool": "tokenfab",
                    "tool_version": env!("CARGO_PKG_VERSION"),
                    "source": "unknown",
                    "input_seq_len": {"distribution": "other", "value": pool.prompt_tokens as f64 / requests},
                },
                "native": {"config": {"slaWindowSeconds": doc.metadata.window_seconds}},
            }),
        );
    }
    let mut aggregate = json!({
        "requests": {"total": pool.requests},
        "throughput": {
            "output_token_rate": stat("tokens/s", per_s(pool.output_tokens as f64)),
            "input_token_rate": stat("tokens/s", per_s(pool.prompt_tokens as f64)),
            "total_token_rate": stat("tokens/s", per_s((pool.output_tokens + pool.prompt_tokens) as f64)),
            "request_rate": stat("queries/s", per_s(requests)),
        },
    });
    if pool.requests > 0 {
        aggregate["requests"]["input_length"] = stat("count", pool.prompt_tokens as f64 / requests);
        aggregate["requests"]["output_length"] = stat("count", pool.output_tokens as f64 / requests);
        aggregate["latency"] = json!({"request_latency": percentiles("s", &pool.request_latency_seconds)});
    }
    let mine = ThroughputSla {
        pools: vec![pool.clone()],
        classes: doc.classes.iter().filter(|c| c.model == pool.model).cloned().collect(),
        ..doc.clone()
    };
    json!({
        "version": VERSION,
        "run": run,
        "scenario": scenario,
        "results": {
            "request_performance": {"aggregate": aggregate},
            "observability": {
                "tokenfab_usage": {
                    "committed_output_tokens_per_second": pool.committed_output_tokens_per_second,
                    "output_tokens_per_joule": pool.output_tokens_per_joule,
                    "cost_per_million_output_tokens_usd": pool.cost_per_million_output_tokens_usd,
                    "units": {
                        "committed_output_tokens_per_second": "tokens/s",
                        "output_tokens_per_joule": "tokens/J",
                        "cost_per_million_output_tokens_usd": "USD per 1e6 output tokens",
                    },
                    "idle_energy_included": false,
                    "method": doc.method.energy,
                },
                "tokenfab_throughput_sla": serde_json::to_value(&mine).expect("plain data serializes"),
            },
        },
    })
}

/// An llm-d `Statistics` with only a mean.
fn stat(units: &str, mean: f64) -> Value {
    json!({"units": units, "mean": mean})
}

fn percentiles(units: &str, p: &Percentiles) -> Value {
    json!({"units": units, "mean": p.mean, "p50": p.p50, "p90": p.p90, "p99": p.p99})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sla::{SlaClassEntry, SlaMetadata, SlaMethod};

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(crate::time::rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(crate::time::rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(crate::time::rfc3339_ms(1_795_694_399_123), "2026-11-26T11:59:59.123Z");
    }

    fn doc() -> ThroughputSla {
        let pool = |model: &str, requests| SlaPool {
            model: model.into(),
            accelerator: "h100-sxm".into(),
            devices: 8,
            replicas: 2,
            committed_output_tokens_per_second: 5000.0,
            measured_output_tokens_per_second: 2000.0,
            requests,
            output_tokens: requests * 250,
            prompt_tokens: requests * 500,
            output_tokens_per_joule: 4.0,
            cost_per_million_output_tokens_usd: 0.9,
            request_latency_seconds: Percentiles {
                mean: 6.0,
                p50: 5.0,
                p90: 9.0,
                p99: 12.0,
            },
        };
        ThroughputSla {
            api_version: crate::sla::API_VERSION.into(),
            kind: crate::sla::KIND.into(),
            metadata: SlaMetadata {
                generated_at_unix_ms: 1_795_694_400_000,
                window_seconds: 3600.0,
                covered_seconds: 3630.0,
            },
            method: SlaMethod::default(),
            pools: vec![pool("llama-3.1-70b", 0), pool("llama-3.1-8b", 1000)],
            classes: vec![SlaClassEntry {
                model: "llama-3.1-8b".into(),
                class: "standard".into(),
                committed: true,
                batches: 4,
                on_time: 4,
                attainment: 1.0,
                completion_seconds: Percentiles::default(),
            }],
        }
    }

    #[test]
    fn one_report_per_pool_with_the_pools_figures() {
        let reports = benchmark_reports(&doc());
        assert_eq!(reports.len(), 2);
        let r = &reports[1];
        assert_eq!(r["version"], "0.2.1");
        assert_eq!(r["run"]["time"]["end"], "2026-11-26T12:00:00.000Z");
        assert_eq!(r["run"]["time"]["start"], "2026-11-26T10:59:30.000Z");
        let engine = &r["scenario"]["stack"][0]["standardized"];
        assert_eq!(
            (engine["replicas"].as_u64(), engine["accelerator"]["count"].as_u64()),
            (Some(2), Some(4))
        );
        let agg = &r["results"]["request_performance"]["aggregate"];
        assert_eq!(agg["requests"]["total"], 1000);
        assert_eq!(agg["requests"]["output_length"]["mean"], 250.0);
        assert_eq!(agg["latency"]["request_latency"]["p99"], 12.0);
        let rate = agg["throughput"]["output_token_rate"]["mean"].as_f64().unwrap();
        assert!((rate - 250_000.0 / 3630.0).abs() < 1e-9);
        let native = &r["results"]["observability"]["tokenfab_throughput_sla"];
        assert_eq!(native["pools"].as_array().unwrap().len(), 1);
        assert_eq!(native["classes"][0]["class"], "standard");
        // A pool without results states no latency or lengths (no zeros for the unmeasured).
        let empty = &reports[0]["results"]["request_performance"]["aggregate"];
        assert!(empty.get("latency").is_none() && empty["requests"].get("input_length").is_none());
        assert!(reports[0]["scenario"].get("load").is_none());
        assert!(
            reports[0]["results"]["observability"]["tokenfab_throughput_sla"]["classes"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }
}
