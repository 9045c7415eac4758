//! Carrying out placement: the engine Deployments follow the layout that placement plans
//! for the discovered nodes (how many replicas of which model, on which accelerator class,
//! at which tensor-parallel degree, in which super-node), with rate limits and hysteresis
//! so that the layout never flaps.
//!
//! An engine Deployment is one model on one accelerator class at one tensor-parallel
//! degree, pinned to one super-node or not, told by its labels `tokenfab.io/model`,
//! `tokenfab.io/accelerator`, `tokenfab.io/tensor-parallel` and `tokenfab.io/super-node`.
//! The Helm chart renders one per model and pool; when placement wants a kind that no
//! Deployment runs (another pool, another tensor-parallel degree, a super-node), the
//! operator creates it from the model's chart-rendered Deployment ([`crate::derive`]), and
//! deletes such a derived Deployment once it has been at zero replicas, unwanted, for
//! `scale_down_after`. It never deletes a Deployment it did not create.
//!
//! Super-nodes: on nodes labelled with a super-node (`tokenfab.io/super-node`, or GPU
//! feature discovery's NVLink clique `nvidia.com/gpu.clique`), an engine is pinned to the
//! super-node placement chose; elsewhere an engine runs anywhere on its class, and
//! Kubernetes picks the nodes.
//!
//! The rules ([`decide`]):
//! - a Deployment changes at most once per `min_interval`, by at most `max_step` replicas
//!   (a new one starts at no more than `max_step`);
//! - it grows as soon as placement wants more, but shrinks only after placement has wanted
//!   fewer for `scale_down_after`: moving a model to a cheaper pool (or to another
//!   tensor-parallel degree) starts the new replicas first and stops the old ones later
//!   (make before break), and a dip in demand does not stop replicas that the next minute
//!   needs again.

use k8s_openapi::api::apps::v1::Deployment;
use std::collections::BTreeMap;
use tokenfab_core::placement::{NodeSpec, Placed};
use tokenfab_core::{ModelId, NodeId};

pub const MODEL: &str = "tokenfab.io/model";
pub const ACCELERATOR: &str = "tokenfab.io/accelerator";
pub const TENSOR_PARALLEL: &str = "tokenfab.io/tensor-parallel";
/// The super-node an engine is pinned to (absent: not pinned).
pub const SUPER_NODE: &str = "tokenfab.io/super-node";
/// On a Deployment the operator created: the Deployment it was made from.
pub const DERIVED_FROM: &str = "tokenfab.io/derived-from";

/// A super-node: the node label that names it, and its value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pool {
    pub label: String,
    pub value: String,
}

/// What an engine Deployment runs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub model: String,
    pub accelerator: String,
    pub tp: u32,
    /// The super-node it is pinned to.
    pub super_node: Option<Pool>,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {} (TP {})", self.model, self.accelerator, self.tp)?;
        if let Some(p) = &self.super_node {
            write!(f, " in super-node {}", p.value)?;
        }
        Ok(())
    }
}

/// An engine Deployment and its replica count.
#[derive(Debug, Clone, PartialEq)]
pub struct Engine {
    pub name: String,
    pub key: Key,
    pub replicas: u32,
    /// The operator made it (from this Deployment), so it may delete it.
    pub derived_from: Option<String>,
}

/// The engine `d` is, if it carries tokenfab's labels.
pub fn engine_of(d: &Deployment) -> Option<Engine> {
    let labels = d.metadata.labels.as_ref()?;
    let annotations = d.metadata.annotations.clone().unwrap_or_default();
    Some(Engine {
        name: d.metadata.name.clone()?,
        key: Key {
            model: labels.get(MODEL)?.clone(),
            accelerator: labels.get(ACCELERATOR)?.clone(),
            tp: labels.get(TENSOR_PARALLEL).and_then(|t| t.parse().ok()).unwrap_or(1),
            // The label holds the value; the annotation, which node label it came from.
            super_node: labels.get(SUPER_NODE).map(|v| Pool {
                label: annotations
                    .get(SUPER_NODE_LABEL)
                    .cloned()
                    .unwrap_or_else(|| SUPER_NODE.to_string()),
                value: v.clone(),
            }),
        },
        replicas: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0) as u32,
        derived_from: labels.get(DERIVED_FROM).cloned(),
    })
}

/// On a pinned Deployment: the node label its super-node is named by.
pub const SUPER_NODE_LABEL: &str = "tokenfab.io/super-node-label";

/// The running replicas as placement sees them: each engine's replicas on free aligned
/// device groups of nodes of its class (and its super-node, if pinned), in node order.
/// (Kubernetes, not tokenfab, chose the nodes; placement needs the count per class and
/// super-node, which this keeps.)
pub fn current_placement(engines: &[Engine], nodes: &[NodeSpec], pools: &BTreeMap<String, Pool>) -> Vec<Placed> {
    let mut taken: BTreeMap<&NodeId, Vec<u32>> = BTreeMap::new();
    let mut out = Vec::new();
    for e in engines {
        let mut left = e.replicas;
        let on = |n: &&NodeSpec| {
            n.accelerator.as_str() == e.key.accelerator
                && e.key
                    .super_node
                    .as_ref()
                    .is_none_or(|p| pools.get(n.node.as_str()).is_some_and(|q| q.value == p.value))
        };
        for n in nodes.iter().filter(on) {
            for domain in &n.domains {
                for group in domain.chunks(e.key.tp.max(1) as usize) {
                    if left == 0 || group.len() != e.key.tp.max(1) as usize {
                        continue;
                    }
                    let used = taken.entry(&n.node).or_default();
                    if group.iter().any(|d| used.contains(d)) {
                        continue;
                    }
                    used.extend_from_slice(group);
                    out.push(Placed {
                        model: ModelId::new(e.key.model.clone()),
                        node: n.node.clone(),
                        devices: group.to_vec(),
                    });
                    left -= 1;
                }
            }
        }
    }
    out
}

/// Replicas per engine kind in placement's layout (pinned to the super-node of the node
/// placement chose, where that node is in a labelled one).
pub fn desired(replicas: &[Placed], nodes: &[NodeSpec], pools: &BTreeMap<String, Pool>) -> BTreeMap<Key, u32> {
    let class: BTreeMap<&NodeId, &str> = nodes.iter().map(|n| (&n.node, n.accelerator.as_str())).collect();
    let mut out = BTreeMap::new();
    for p in replicas {
        if let Some(a) = class.get(&p.node) {
            *out.entry(Key {
                model: p.model.to_string(),
                accelerator: a.to_string(),
                tp: p.devices.len() as u32,
                super_node: pools.get(p.node.as_str()).cloned(),
            })
            .or_insert(0) += 1;
        }
    }
    out
}

/// Placement's settings in the operator: the layout minimizes dollars per output token,
/// each node at its own device-hour price (the catalog's indicative prices, or what its
/// `tokenfab.io/usd-per-device-hour` label says), plus energy at the default price and
/// PUE; a running replica moves only when that saves more than placement's move cost.
pub fn plan_config() -> tokenfab_core::placement::PlanConfig {
    tokenfab_core::placement::PlanConfig {
        objective: tokenfab_core::objective::Objective::TokensPerDollar {
            usd_per_device_hour: 0.0,
            usd_per_kwh: tokenfab_core::usage::DEFAULT_USD_PER_KWH,
            pue: tokenfab_core::usage::DEFAULT_PUE,
        },
        ..Default::default()
    }
}

/// Rate limits and hysteresis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Seconds between two changes of one Deployment.
    pub min_interval_s: u64,
    /// Seconds placement must keep wanting fewer replicas before a Deployment shrinks.
    pub scale_down_after_s: u64,
    /// Most replicas one change adds or removes.
    pub max_step: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_interval_s: 300,
            scale_down_after_s: 600,
            max_step: 2,
        }
    }
}

/// What [`decide`] remembers between rounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Memory {
    last_change: BTreeMap<String, u64>,
    /// Since when placement has wanted fewer replicas of a Deployment.
    lower_since: BTreeMap<String, u64>,
    /// Since when a derived Deployment has been at zero replicas and unwanted.
    idle_since: BTreeMap<String, u64>,
}

impl Memory {
    /// A Deployment was created at `now_s` (its next change waits `min_interval`).
    pub fn created(&mut self, name: &str, now_s: u64) {
        self.last_change.insert(name.to_string(), now_s);
    }

    /// A Deployment is gone: forget it.
    pub fn deleted(&mut self, name: &str) {
        self.last_change.remove(name);
        self.lower_since.remove(name);
        self.idle_since.remove(name);
    }
}

/// One Deployment to scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub deployment: String,
    pub from: u32,
    pub to: u32,
    pub why: String,
}

/// A round's outcome.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    pub changes: Vec<Change>,
    /// Deployments placement wants changed that wait (and why).
    pub held: Vec<(String, String)>,
    /// Engine kinds placement wants that no Deployment runs, and the replicas to start
    /// one with (placement's count, at most `max_step`).
    pub missing: Vec<(Key, u32)>,
    /// Derived Deployments at zero replicas that placement has not wanted for
    /// `scale_down_after`: delete them.
    pub delete: Vec<String>,
}

/// The changes to make at `now_s` (seconds), given the engines, placement's `desired`
/// counts, and what earlier rounds did (`memory`, updated as if the changes were made).
pub fn decide(
    engines: &[Engine],
    desired: &BTreeMap<Key, u32>,
    now_s: u64,
    memory: &mut Memory,
    policy: &Policy,
) -> Decision {
    let mut d = Decision::default();
    let mut claimed: BTreeMap<&Key, ()> = BTreeMap::new();
    for e in engines {
        // A second Deployment of the same kind gets nothing (the first one carries it).
        let want = if claimed.insert(&e.key, ()).is_none() {
            desired.get(&e.key).copied().unwrap_or(0)
        } else {
            0
        };
        let since_change = memory
            .last_change
            .get(&e.name)
            .map_or(u64::MAX, |t| now_s.saturating_sub(*t));
        let step = policy.max_step.max(1);
        if want == e.replicas {
            memory.lower_since.remove(&e.name);
            if want == 0 && e.derived_from.is_some() {
                let since = *memory.idle_since.entry(e.name.clone()).or_insert(now_s);
                if now_s.saturating_sub(since) >= policy.scale_down_after_s {
                    d.delete.push(e.name.clone());
                }
            } else {
                memory.idle_since.remove(&e.name);
            }
            continue;
        }
        memory.idle_since.remove(&e.name);
        if want > e.replicas {
            memory.lower_since.remove(&e.name);
            if since_change < policy.min_interval_s {
                d.held.push((
                    e.name.clone(),
                    format!(
                        "placement wants {want} replicas (has {}); changed {since_change} s ago, next change in {} s",
                        e.replicas,
                        policy.min_interval_s - since_change
                    ),
                ));
                continue;
            }
            let to = want.min(e.replicas + step);
            d.changes.push(Change {
                deployment: e.name.clone(),
                from: e.replicas,
                to,
                why: format!("placement wants {want} replicas of {}", e.key),
            });
            memory.last_change.insert(e.name.clone(), now_s);
            continue;
        }
        let since = *memory.lower_since.entry(e.name.clone()).or_insert(now_s);
        let lower_for = now_s.saturating_sub(since);
        if lower_for < policy.scale_down_after_s || since_change < policy.min_interval_s {
            let wait = (policy.scale_down_after_s.saturating_sub(lower_for))
                .max(policy.min_interval_s.saturating_sub(since_change));
            d.held.push((
                e.name.clone(),
                format!(
                    "placement wants {want} replicas (has {}) for {lower_for} s; shrinks in {wait} s if it still does",
                    e.replicas
                ),
            ));
            continue;
        }
        let to = want.max(e.replicas.saturating_sub(step));
        d.changes.push(Change {
            deployment: e.name.clone(),
            from: e.replicas,
            to,
            why: format!("placement has wanted {want} replicas of {} for {lower_for} s", e.key),
        });
        memory.last_change.insert(e.name.clone(), now_s);
        memory.lower_since.remove(&e.name);
    }
    for (k, n) in desired {
        if *n > 0 && !engines.iter().any(|e| &e.key == k) {
            d.missing.push((k.clone(), (*n).min(policy.max_step.max(1))));
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(model: &str, acc: &str, tp: u32) -> Key {
        Key {
            model: model.into(),
            accelerator: acc.into(),
            tp,
            super_node: None,
        }
    }

    fn engine(name: &str, k: Key, replicas: u32) -> Engine {
        Engine {
            name: name.into(),
            key: k,
            replicas,
            derived_from: None,
        }
    }

    fn pool(v: &str) -> Pool {
        Pool {
            label: "nvidia.com/gpu.clique".into(),
            value: v.into(),
        }
    }

    const P: Policy = Policy {
        min_interval_s: 300,
        scale_down_after_s: 600,
        max_step: 2,
    };

    #[test]
    fn scales_up_in_steps_no_faster_than_the_interval() {
        let mut m = Memory::default();
        let mut e = vec![engine("llama-h100", key("llama", "h100-sxm", 1), 1)];
        let want = BTreeMap::from([(key("llama", "h100-sxm", 1), 6)]);
        let d = decide(&e, &want, 0, &mut m, &P);
        assert_eq!((d.changes[0].from, d.changes[0].to), (1, 3));
        e[0].replicas = 3;
        let d = decide(&e, &want, 100, &mut m, &P);
        assert!(
            d.changes.is_empty() && d.held[0].1.contains("next change in 200 s"),
            "{d:?}"
        );
        let d = decide(&e, &want, 300, &mut m, &P);
        assert_eq!((d.changes[0].from, d.changes[0].to), (3, 5));
    }

    #[test]
    fn scales_down_only_after_the_lower_count_held_and_a_dip_does_not() {
        let mut m = Memory::default();
        let e = vec![engine("llama-h100", key("llama", "h100-sxm", 1), 4)];
        let low = BTreeMap::from([(key("llama", "h100-sxm", 1), 1)]);
        let back = BTreeMap::from([(key("llama", "h100-sxm", 1), 4)]);
        assert!(decide(&e, &low, 0, &mut m, &P).changes.is_empty());
        assert!(decide(&e, &low, 300, &mut m, &P).changes.is_empty());
        // Demand came back before the hold ended: nothing changes, and the clock restarts.
        assert!(decide(&e, &back, 400, &mut m, &P).changes.is_empty());
        assert!(decide(&e, &low, 500, &mut m, &P).changes.is_empty());
        assert!(decide(&e, &low, 1000, &mut m, &P).changes.is_empty(), "500 s low only");
        let d = decide(&e, &low, 1100, &mut m, &P);
        assert_eq!((d.changes[0].from, d.changes[0].to), (4, 2));
    }

    #[test]
    fn moving_a_model_to_a_cheaper_pool_starts_the_new_replicas_before_stopping_the_old() {
        let mut m = Memory::default();
        let mut e = vec![
            engine("llama-h100", key("llama", "h100-sxm", 1), 2),
            engine("llama-l40s", key("llama", "l40s", 1), 0),
        ];
        let want = BTreeMap::from([(key("llama", "l40s", 1), 2)]);
        let d = decide(&e, &want, 0, &mut m, &P);
        assert_eq!(d.changes.len(), 1, "{d:?}");
        assert_eq!((d.changes[0].deployment.as_str(), d.changes[0].to), ("llama-l40s", 2));
        assert_eq!(d.held[0].0, "llama-h100");
        e[1].replicas = 2;
        let d = decide(&e, &want, 600, &mut m, &P);
        assert_eq!(
            (d.changes[0].deployment.as_str(), d.changes[0].from, d.changes[0].to),
            ("llama-h100", 2, 0)
        );
    }

    #[test]
    fn a_kind_without_a_deployment_is_reported_missing() {
        let mut m = Memory::default();
        let want = BTreeMap::from([(key("qwen", "h100-sxm", 2), 1)]);
        let d = decide(&[], &want, 0, &mut m, &P);
        assert_eq!(d.missing, vec![(key("qwen", "h100-sxm", 2), 1)]);
        let many = BTreeMap::from([(key("qwen", "h100-sxm", 2), 7)]);
        let d = decide(&[], &many, 0, &mut m, &P);
        assert_eq!(
            d.missing,
            vec![(key("qwen", "h100-sxm", 2), 2)],
            "a new one starts at max_step"
        );
    }

    #[test]
    fn a_derived_deployment_is_deleted_only_after_it_sat_idle_and_a_chart_one_never() {
        let mut m = Memory::default();
        let mut derived = engine("llama-tp2", key("llama", "h100-sxm", 2), 0);
        derived.derived_from = Some("llama".into());
        let e = vec![engine("llama", key("llama", "h100-sxm", 1), 0), derived.clone()];
        let none = BTreeMap::new();
        assert!(decide(&e, &none, 0, &mut m, &P).delete.is_empty());
        assert!(decide(&e, &none, 599, &mut m, &P).delete.is_empty());
        // Wanted again meanwhile (and, say, its scale-up was refused): the idle clock restarts.
        let again = BTreeMap::from([(key("llama", "h100-sxm", 2), 1)]);
        assert_eq!(decide(&e, &again, 300, &mut m, &P).changes.len(), 1);
        assert!(
            decide(&e, &none, 600, &mut m, &P).delete.is_empty(),
            "idle since 600 only"
        );
        assert!(decide(&e, &none, 1199, &mut m, &P).delete.is_empty());
        assert_eq!(
            decide(&e, &none, 1200, &mut m, &P).delete,
            vec!["llama-tp2".to_string()]
        );
        let mut running = derived;
        running.replicas = 1;
        let mut m = Memory::default();
        let d = decide(&[running], &none, 10_000, &mut m, &P);
        assert!(
            d.delete.is_empty(),
            "a derived Deployment with replicas is scaled down first: {d:?}"
        );
    }

    #[test]
    fn a_change_of_tensor_parallelism_is_a_new_kind_made_before_the_old_one_is_broken() {
        let mut m = Memory::default();
        let e = vec![engine("llama", key("llama", "h100-sxm", 1), 2)];
        let want = BTreeMap::from([(key("llama", "h100-sxm", 2), 2)]);
        let d = decide(&e, &want, 0, &mut m, &P);
        assert_eq!(d.missing, vec![(key("llama", "h100-sxm", 2), 2)]);
        assert!(d.changes.is_empty() && d.held[0].0 == "llama", "{d:?}");
    }

    #[test]
    fn engines_on_super_nodes_are_pinned_where_placement_put_them() {
        let nodes = vec![
            NodeSpec::uniform("a1", "h100-sxm", 8, 8, 2.0),
            NodeSpec::uniform("b1", "h100-sxm", 8, 8, 2.0),
            NodeSpec::uniform("c1", "h100-sxm", 8, 8, 2.0),
        ];
        let pools = BTreeMap::from([("a1".to_string(), pool("rack-a")), ("b1".to_string(), pool("rack-b"))]);
        let placed = |node: &str| Placed {
            model: ModelId::new("llama"),
            node: NodeId::new(node.to_string()),
            devices: vec![0],
        };
        let want = desired(&[placed("a1"), placed("a1"), placed("c1")], &nodes, &pools);
        let mut pinned = key("llama", "h100-sxm", 1);
        pinned.super_node = Some(pool("rack-a"));
        assert_eq!(
            want,
            BTreeMap::from([(key("llama", "h100-sxm", 1), 1), (pinned.clone(), 2)]),
            "c1 is in no super-node: its replica is not pinned"
        );
        // A pinned engine is counted on its own super-node's nodes only.
        let mut on_b = pinned;
        on_b.super_node = Some(pool("rack-b"));
        let now = current_placement(&[engine("llama-rack-b", on_b, 2)], &nodes, &pools);
        assert_eq!(now.len(), 2);
        assert!(now.iter().all(|p| p.node.as_str() == "b1"), "{now:?}");
    }

    #[test]
    fn placement_on_discovered_nodes_moves_a_model_to_the_cheaper_class() {
        // One H100 node whose device-hours have become dear (8 $/h) and one L40S node; a
        // small demand for an 8B model, which the L40S now serves at a lower cost per
        // token: placement's layout moves it there.
        let nodes = vec![
            NodeSpec::uniform("h", "h100-sxm", 8, 8, 8.0),
            NodeSpec::uniform("l", "l40s", 4, 1, 0.8),
        ];
        let engines = vec![
            engine("llama-h100", key("llama-3.1-8b", "h100-sxm", 1), 1),
            engine("llama-l40s", key("llama-3.1-8b", "l40s", 1), 0),
        ];
        let current = current_placement(&engines, &nodes, &BTreeMap::new());
        assert_eq!(current.len(), 1);
        let demand = [tokenfab_core::placement::Demand {
            model: ModelId::new("llama-3.1-8b"),
            tokens_per_s: 200.0,
            shape: (512, 256),
        }];
        let plan = tokenfab_core::placement::plan(&nodes, &demand, &current, &plan_config());
        let want = desired(&plan.replicas, &nodes, &BTreeMap::new());
        assert_eq!(want.get(&key("llama-3.1-8b", "l40s", 1)), Some(&1), "{want:?} {plan:?}");
        assert_eq!(want.get(&key("llama-3.1-8b", "h100-sxm", 1)), None, "{want:?}");
    }
}
