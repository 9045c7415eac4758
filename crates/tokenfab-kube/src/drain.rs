//! Following cordon and drain.
//!
//! When a GPU node is cordoned (`kubectl cordon` or `kubectl drain`), the operator labels
//! it `tokenfab.io/drain=cordoned`. The chart's agent DaemonSet does not run on nodes with
//! that label (its `agent.drainLabel`), so Kubernetes stops the node's agent pod with SIGTERM, on which the agent
//! stops leasing, finishes its in-flight requests and reports their results before it
//! exits (within the pod's termination grace period). Once no agent pod is left on the
//! node, the operator marks it drained (annotation `tokenfab.io/drained=true`). When the
//! node is uncordoned, both go and the agent comes back. A `tokenfab.io/drain` label with
//! any other value is an operator's own: it drains the node just the same, and the
//! operator never removes it.

use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeSet;

pub const DRAINING: &str = "tokenfab.io/drain";
pub const DRAINED: &str = "tokenfab.io/drained";
/// The value of the drain label when the operator set it (because of a cordon).
pub const BY_CORDON: &str = "cordoned";

/// A change to a node's drain marks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Cordoned: label it so that its agent stops.
    MarkDraining(String),
    /// Its agent is gone: annotate it drained.
    MarkDrained(String),
    /// Uncordoned: remove both marks.
    Restore(String),
}

impl Action {
    /// The merge patch that makes the change.
    pub fn patch(&self) -> serde_json::Value {
        match self {
            Action::MarkDraining(_) => serde_json::json!({"metadata": {"labels": {DRAINING: BY_CORDON}}}),
            Action::MarkDrained(_) => serde_json::json!({"metadata": {"annotations": {DRAINED: "true"}}}),
            Action::Restore(_) => {
                serde_json::json!({"metadata": {"labels": {DRAINING: null}, "annotations": {DRAINED: null}}})
            }
        }
    }

    pub fn node(&self) -> &str {
        match self {
            Action::MarkDraining(n) | Action::MarkDrained(n) | Action::Restore(n) => n,
        }
    }
}

/// The changes for `nodes`, given the nodes where an agent pod still runs. Only GPU nodes
/// (a `nvidia.com/gpu.count` label) and nodes carrying the drain marks are looked at:
/// cordoning a CPU node or a control-plane node is none of tokenfab's business.
pub fn actions(nodes: &[Node], agents_on: &BTreeSet<String>) -> Vec<Action> {
    let mut out = Vec::new();
    for n in nodes {
        let Some(name) = n.metadata.name.clone() else { continue };
        let marked = n.metadata.labels.as_ref().is_some_and(|l| l.contains_key(DRAINING))
            || n.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(DRAINED));
        if crate::discovery::discover(n).is_none() && !marked {
            continue;
        }
        let cordoned = n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
        // The DaemonSet leaves nodes with the label, whatever its value; only the value the
        // operator sets is the operator's to remove.
        let label = n.metadata.labels.as_ref().and_then(|l| l.get(DRAINING));
        let draining = label.is_some();
        let ours = label.is_some_and(|v| v == BY_CORDON);
        let drained = n
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.get(DRAINED).is_some_and(|v| v == "true"));
        match (cordoned, draining) {
            (true, false) => out.push(Action::MarkDraining(name)),
            (true, true) if !drained && !agents_on.contains(&name) => out.push(Action::MarkDrained(name)),
            (false, true) if ours => out.push(Action::Restore(name)),
            (false, true) if !drained && !agents_on.contains(&name) => out.push(Action::MarkDrained(name)),
            (false, false) if drained => out.push(Action::Restore(name)),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cordoned: bool, draining: bool, drained: bool) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        let mut labels = std::collections::BTreeMap::from([(crate::discovery::COUNT.to_string(), "8".to_string())]);
        if draining {
            labels.insert(DRAINING.to_string(), BY_CORDON.to_string());
        }
        n.metadata.labels = Some(labels);
        if drained {
            n.metadata.annotations = Some([(DRAINED.to_string(), "true".to_string())].into());
        }
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(cordoned),
            ..Default::default()
        });
        n
    }

    #[test]
    fn cordon_drains_the_agent_then_marks_the_node_drained_and_uncordon_restores() {
        let agents: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        // a: just cordoned; b: draining, its agent still finishing; c: draining, agent gone;
        // d: drained already; e: uncordoned while draining; f: serving; g: drained by an
        // operator's own label (not cordoned), agent gone.
        let mut g = node("g", false, false, false);
        g.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(DRAINING.to_string(), "maintenance".to_string());
        // A cordoned CPU node (no GPU labels): left alone.
        let mut cpu = node("cpu", true, false, false);
        cpu.metadata.labels = None;
        let nodes = [
            node("a", true, false, false),
            node("b", true, true, false),
            node("c", true, true, false),
            node("d", true, true, true),
            node("e", false, true, true),
            node("f", false, false, false),
            g,
            cpu,
        ];
        assert_eq!(
            actions(&nodes, &agents),
            vec![
                Action::MarkDraining("a".into()),
                Action::MarkDrained("c".into()),
                Action::Restore("e".into()),
                Action::MarkDrained("g".into()),
            ]
        );
        assert_eq!(
            Action::Restore("e".into()).patch(),
            serde_json::json!({"metadata": {"labels": {DRAINING: null}, "annotations": {DRAINED: null}}})
        );
    }
}
