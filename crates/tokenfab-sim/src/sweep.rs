//! Sweeps: one scenario run over combinations of field values, in parallel, answering
//! "which is the cheapest configuration that meets the SLA?".

use crate::scenario::{Scenario, ScenarioError};
use serde::Serialize;
use serde_yaml_ng::Value;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One field to vary: `pools[0].nodes=1,2,4,8`.
#[derive(Debug, Clone, PartialEq)]
pub struct Vary {
    pub path: String,
    pub values: Vec<String>,
}

impl std::str::FromStr for Vary {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, values) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}' is not PATH=V1,V2,...; e.g. pools[0].nodes=1,2,4"))?;
        let values: Vec<String> = values
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if path.trim().is_empty() || values.is_empty() {
            return Err(format!(
                "'{s}' needs a field path and at least one value, e.g. pools[0].nodes=1,2,4"
            ));
        }
        Ok(Vary {
            path: path.trim().to_string(),
            values,
        })
    }
}

/// One configuration of a sweep and what it measured.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct SweepRow {
    /// (path, value) of every varied field.
    pub params: Vec<(String, String)>,
    pub devices: u32,
    pub output_tokens_per_s: f64,
    pub output_tokens_per_joule: f64,
    pub cost_usd: f64,
    pub cost_per_million_output_tokens_usd: f64,
    pub sla_attainment: f64,
    /// Share of submitted requests (admitted or not) refused (admission control).
    pub refused_share: f64,
    pub completion_p99_s: f64,
    pub utilization: f64,
    pub meets_sla: bool,
}

/// A whole sweep, or (with `point`) one configuration of one.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Sweep {
    pub scenario: String,
    pub seed: u64,
    /// Attainment a configuration needs to count as meeting the SLA.
    pub sla_target: f64,
    pub rows: Vec<SweepRow>,
    /// Index in `rows` of the cheapest configuration meeting the SLA.
    pub cheapest_meeting_sla: Option<usize>,
    /// For one configuration of a sweep split into parts (e.g. the indexes of a
    /// Kubernetes Indexed Job): its index and how many configurations there are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<Point>,
}

/// Which configuration of a split sweep a part holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Point {
    pub index: usize,
    pub of: usize,
    /// What the sweep is (its scenario text, varied fields, seed and SLA target, hashed):
    /// parts of different sweeps never gather into one.
    #[serde(default)]
    pub sweep: String,
}

/// The fingerprint of a sweep, for [`Point::sweep`]: the scenario text, the `--vary`
/// lists, the seed and the SLA target, hashed (FNV-1a, 64 bits).
pub fn fingerprint(text: &str, varies: &[Vary], seed: u64, sla_target: f64) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(text.as_bytes());
    for v in varies {
        eat(v.path.as_bytes());
        eat(b"=");
        eat(v.values.join(",").as_bytes());
        eat(b"\n");
    }
    eat(&seed.to_le_bytes());
    eat(&sla_target.to_le_bytes());
    format!("{h:016x}")
}

/// Why parts of a split sweep do not make one sweep.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GatherError {
    #[error("no parts to gather")]
    Empty,
    #[error("a part is not one configuration of a split sweep (it has no `point`): {0}")]
    NotAPart(String),
    #[error("parts of different sweeps: {0}")]
    Mixed(String),
    #[error("{missing} of {of} configurations have no result yet (indexes {list})")]
    Missing { missing: usize, of: usize, list: String },
}

/// The index of the cheapest row meeting the SLA (the same workload runs in every
/// configuration, so total cost compares them).
fn cheapest(rows: &[SweepRow]) -> Option<usize> {
    rows.iter()
        .enumerate()
        .filter(|(_, r)| r.meets_sla)
        .min_by(|a, b| a.1.cost_usd.total_cmp(&b.1.cost_usd))
        .map(|(i, _)| i)
}

/// One sweep from its parts (each one configuration, from `run` on a one-configuration
/// slice with its [`Point`]): in index order, with the cheapest configuration chosen
/// again. Every index must be there, once.
pub fn gather(mut parts: Vec<Sweep>) -> Result<Sweep, GatherError> {
    let first = parts.first().ok_or(GatherError::Empty)?.clone();
    let Some(p0) = first.point.clone() else {
        return Err(GatherError::NotAPart(first.scenario));
    };
    for p in &parts {
        let Some(pt) = &p.point else {
            return Err(GatherError::NotAPart(p.scenario.clone()));
        };
        if p.scenario != first.scenario
            || p.seed != first.seed
            || p.sla_target != first.sla_target
            || pt.of != p0.of
            || pt.sweep != p0.sweep
        {
            return Err(GatherError::Mixed(format!(
                "{} (seed {}, SLA {}, {} configurations, sweep {}) and {} (seed {}, SLA {}, {} configurations, sweep {}); the sweep fingerprint covers the scenario text and the --vary lists: remove the other sweep's point-*.json files",
                first.scenario,
                first.seed,
                first.sla_target,
                p0.of,
                p0.sweep,
                p.scenario,
                p.seed,
                p.sla_target,
                pt.of,
                pt.sweep
            )));
        }
    }
    parts.sort_by_key(|p| p.point.as_ref().map(|pt| pt.index));
    parts.dedup_by_key(|p| p.point.as_ref().map(|pt| pt.index));
    let have: std::collections::BTreeSet<usize> = parts
        .iter()
        .filter_map(|p| p.point.as_ref().map(|pt| pt.index))
        .collect();
    let missing: Vec<String> = (0..p0.of)
        .filter(|i| !have.contains(i))
        .map(|i| i.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(GatherError::Missing {
            missing: missing.len(),
            of: p0.of,
            list: missing.join(", "),
        });
    }
    let rows: Vec<SweepRow> = parts.into_iter().flat_map(|p| p.rows).collect();
    Ok(Sweep {
        scenario: first.scenario,
        seed: first.seed,
        sla_target: first.sla_target,
        cheapest_meeting_sla: cheapest(&rows),
        rows,
        point: None,
    })
}

fn segments(path: &str) -> Result<Vec<Result<String, usize>>, String> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        if !name.is_empty() {
            out.push(Ok(name.to_string()));
        }
        for idx in rest.split('[').filter(|x| !x.is_empty()) {
            let i = idx
                .trim_end_matches(']')
                .parse::<usize>()
                .map_err(|_| format!("'{path}': '{idx}' is not an index"))?;
            out.push(Err(i));
        }
    }
    Ok(out)
}

fn set(doc: &mut Value, path: &str, value: &str) -> Result<(), String> {
    let mut at = doc;
    for seg in segments(path)? {
        at = match seg {
            Ok(key) => {
                if at.is_null() {
                    // An absent section (e.g. `policies`) is created.
                    *at = Value::Mapping(Default::default());
                }
                let Value::Mapping(m) = at else {
                    return Err(format!("'{path}': '{key}' is not under a mapping"));
                };
                m.entry(Value::String(key.clone())).or_insert(Value::Null)
            }
            Err(i) => {
                let Value::Sequence(s) = at else {
                    return Err(format!("'{path}': [{i}] is not under a list"));
                };
                let n = s.len();
                s.get_mut(i)
                    .ok_or_else(|| format!("'{path}': index {i} is out of range (the list has {n} entries)"))?
            }
        };
    }
    *at = serde_yaml_ng::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok(())
}

/// The parameter values of one configuration, as (path, value) pairs.
pub type Params = Vec<(String, String)>;

/// Every combination of `varies` applied to the scenario text, checked.
pub fn expand(text: &str, file: &str, varies: &[Vary]) -> Result<Vec<(Params, Scenario)>, ScenarioError> {
    let base: Value = serde_yaml_ng::from_str(text).map_err(|e| ScenarioError {
        file: file.into(),
        path: ".".into(),
        message: e.to_string(),
    })?;
    for (i, v) in varies.iter().enumerate() {
        if varies[..i].iter().any(|o| o.path == v.path) {
            return Err(ScenarioError {
                file: file.into(),
                path: v.path.clone(),
                message: "this field is varied twice: give all its values in one --vary".into(),
            });
        }
    }
    let mut combos: Vec<Vec<(String, String)>> = vec![vec![]];
    for v in varies {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                v.values
                    .iter()
                    .map(move |val| [c.clone(), vec![(v.path.clone(), val.clone())]].concat())
            })
            .collect();
    }
    combos
        .into_iter()
        .map(|params| {
            let mut doc = base.clone();
            for (path, value) in &params {
                set(&mut doc, path, value).map_err(|message| ScenarioError {
                    file: file.into(),
                    path: path.clone(),
                    message,
                })?;
            }
            let text = serde_yaml_ng::to_string(&doc).expect("a YAML value serializes");
            let label: Vec<String> = params.iter().map(|(p, v)| format!("{p}={v}")).collect();
            let scenario = Scenario::parse(&text, &format!("{file} with {}", label.join(" ")))?;
            Ok((params, scenario))
        })
        .collect()
}

/// `f` of every item, on up to `jobs` threads, in the items' order.
pub fn parallel<T: Sync, R: Send>(items: &[T], jobs: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let n = items.len();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, n.max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let r = f(&items[i]);
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.expect("every item ran"))
        .collect()
}

/// Runs every configuration on `jobs` threads; `done` is called after each one.
pub fn run(
    configs: Vec<(Params, Scenario)>,
    base: &Path,
    seed: u64,
    jobs: usize,
    sla_target: f64,
    done: &(dyn Fn(usize, usize) + Sync),
) -> Result<Sweep, ScenarioError> {
    let name = configs.first().map(|c| c.1.name.clone()).unwrap_or_default();
    let n = configs.len();
    let finished = AtomicUsize::new(0);
    let results = parallel(&configs, jobs, |(_, scenario)| {
        let r = crate::run_totals(scenario, base, seed);
        done(finished.fetch_add(1, Ordering::Relaxed) + 1, n);
        r
    });
    let mut rows = Vec::with_capacity(n);
    for ((params, scenario), r) in configs.into_iter().zip(results) {
        let r = r?;
        let devices = scenario.pools.iter().map(|p| p.nodes * p.devices_per_node).sum();
        rows.push(SweepRow {
            params,
            devices,
            output_tokens_per_s: r.output_tokens_per_s,
            output_tokens_per_joule: r.output_tokens_per_joule,
            cost_usd: r.cost.total_usd,
            cost_per_million_output_tokens_usd: r.cost.per_million_output_tokens_usd,
            sla_attainment: r.batches.sla_attainment,
            refused_share: r.requests.refused_share(),
            completion_p99_s: r.batches.completion_s.p99,
            utilization: r.utilization,
            meets_sla: r.batches.sla_attainment >= sla_target && r.requests.refused == 0,
        });
    }
    Ok(Sweep {
        scenario: name,
        seed,
        sla_target,
        cheapest_meeting_sla: cheapest(&rows),
        rows,
        point: None,
    })
}

impl Sweep {
    /// `sweep.json` and `sweep.csv` in `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("sweep.json"),
            serde_json::to_string_pretty(self).expect("serializes") + "\n",
        )?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("sweep.csv"))?);
        let names: Vec<&str> = self
            .rows
            .first()
            .map(|r| r.params.iter().map(|p| p.0.as_str()).collect())
            .unwrap_or_default();
        writeln!(
            f,
            "{}{}devices,output_tokens_per_s,output_tokens_per_joule,cost_usd,cost_per_million_output_tokens_usd,sla_attainment,refused_share,completion_p99_s,utilization,meets_sla",
            names.join(","),
            if names.is_empty() { "" } else { "," }
        )?;
        for r in &self.rows {
            let vals: Vec<&str> = r.params.iter().map(|p| p.1.as_str()).collect();
            writeln!(
                f,
                "{}{}{},{:.1},{:.4},{:.4},{:.6},{:.6},{:.6},{:.2},{:.4},{}",
                vals.join(","),
                if vals.is_empty() { "" } else { "," },
                r.devices,
                r.output_tokens_per_s,
                r.output_tokens_per_joule,
                r.cost_usd,
                r.cost_per_million_output_tokens_usd,
                r.sla_attainment,
                r.refused_share,
                r.completion_p99_s,
                r.utilization,
                r.meets_sla
            )?;
        }
        f.flush()
    }

    /// The answer in one line.
    pub fn answer(&self) -> String {
        match self.cheapest_meeting_sla {
            Some(i) => {
                let r = &self.rows[i];
                let p: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!(
                    "cheapest configuration meeting the SLA ({:.2}% of batches on time): {} ({} devices) at ${:.2} in all, ${:.4} per 1M output tokens, {:.2}% on time",
                    self.sla_target * 100.0,
                    p.join(" "),
                    r.devices,
                    r.cost_usd,
                    r.cost_per_million_output_tokens_usd,
                    r.sla_attainment * 100.0
                )
            }
            None => format!(
                "no configuration meets the SLA ({:.2}% of batches on time); try larger or more pools, or a longer completion window",
                self.sla_target * 100.0
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(index: usize, of: usize, cost: f64, meets: bool) -> Sweep {
        Sweep {
            scenario: "s".into(),
            seed: 1,
            sla_target: 0.999,
            rows: vec![SweepRow {
                params: vec![("pools[0].nodes".into(), index.to_string())],
                devices: 8,
                output_tokens_per_s: 1.0,
                output_tokens_per_joule: 1.0,
                cost_usd: cost,
                cost_per_million_output_tokens_usd: cost,
                sla_attainment: 1.0,
                refused_share: 0.0,
                completion_p99_s: 1.0,
                utilization: 0.5,
                meets_sla: meets,
            }],
            cheapest_meeting_sla: meets.then_some(0),
            point: Some(Point {
                index,
                of,
                sweep: "f".into(),
            }),
        }
    }

    #[test]
    fn parts_gather_in_index_order_and_missing_or_mixed_parts_are_named() {
        let g = gather(vec![
            part(2, 3, 5.0, true),
            part(0, 3, 9.0, true),
            part(1, 3, 1.0, false),
        ])
        .unwrap();
        let order: Vec<&str> = g.rows.iter().map(|r| r.params[0].1.as_str()).collect();
        assert_eq!(order, ["0", "1", "2"]);
        assert_eq!(
            g.cheapest_meeting_sla,
            Some(2),
            "the cheapest that meets the SLA, not the cheapest"
        );
        assert_eq!(g.point, None);
        // A part written twice (a retried pod) counts once.
        assert_eq!(
            gather(vec![
                part(0, 2, 1.0, true),
                part(1, 2, 1.0, true),
                part(1, 2, 1.0, true)
            ])
            .unwrap()
            .rows
            .len(),
            2
        );
        assert_eq!(
            gather(vec![part(0, 4, 1.0, true), part(2, 4, 1.0, true)]),
            Err(GatherError::Missing {
                missing: 2,
                of: 4,
                list: "1, 3".into()
            })
        );
        let mut other = part(1, 2, 1.0, true);
        other.seed = 7;
        assert!(matches!(
            gather(vec![part(0, 2, 1.0, true), other]),
            Err(GatherError::Mixed(_))
        ));
        // Same name, seed, SLA and size, but another sweep (other varied fields).
        let mut other = part(1, 2, 1.0, true);
        other.point.as_mut().unwrap().sweep = "g".into();
        assert!(matches!(
            gather(vec![part(0, 2, 1.0, true), other]),
            Err(GatherError::Mixed(_))
        ));
        let mut whole = part(0, 1, 1.0, true);
        whole.point = None;
        assert!(matches!(gather(vec![whole]), Err(GatherError::NotAPart(_))));
        assert_eq!(gather(Vec::new()), Err(GatherError::Empty));
    }

    const BASE: &str = "name: s\ndescription: d\nduration: 1h\npools: [{name: p, accelerator: h100-sxm, nodes: 1, devices_per_node: 8}]\ndeployments: [{pool: p, model: llama-3.1-8b}]\nworkload:\n  tenants: [{name: a, model: llama-3.1-8b, completion_window: 1h, arrivals: {kind: poisson, batches_per_hour: 1}}]\n";

    #[test]
    fn varies_expand_to_every_combination() {
        let v: Vec<Vary> = vec![
            "pools[0].nodes=1,2".parse().unwrap(),
            "policies.window=32,64,128".parse().unwrap(),
        ];
        let c = expand(BASE, "s.yaml", &v).unwrap();
        assert_eq!(c.len(), 6);
        assert_eq!(c[5].1.pools[0].nodes, 2);
        assert_eq!(c[5].1.policies.window, 128);
        assert_eq!(
            c[0].0,
            [
                ("pools[0].nodes".to_string(), "1".to_string()),
                ("policies.window".to_string(), "32".to_string())
            ]
        );
    }

    #[test]
    fn bad_varies_say_what_is_wrong() {
        assert!("nodes".parse::<Vary>().unwrap_err().contains("is not PATH=V1,V2"));
        let e = expand(BASE, "s.yaml", &["pools[3].nodes=1".parse().unwrap()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "s.yaml: pools[3].nodes: 'pools[3].nodes': index 3 is out of range (the list has 1 entries)"
        );
        let e = expand(BASE, "s.yaml", &["pools[0].nodes=0".parse().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("s.yaml with pools[0].nodes=0: pools[0].nodes: must be at least 1"),
            "{e}"
        );
        let e = expand(BASE, "s.yaml", &["pools[0].accelerator=tpu".parse().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown accelerator 'tpu'"), "{e}");
    }
}
