//! GPU nodes and their topology, from the labels NVIDIA's GPU operator (GPU feature
//! discovery) puts on nodes, turned into what placement plans on.
//!
//! - `nvidia.com/gpu.product` (e.g. `NVIDIA-H100-80GB-HBM3`): the catalog class, via
//!   [`tokenfab_core::catalog::nvidia_class`]; `tokenfab.io/accelerator` overrides it
//!   (for products the catalog does not name).
//! - `nvidia.com/gpu.count`: GPUs on the node.
//! - the super-node (NVLink domain system) the node belongs to: `tokenfab.io/super-node`,
//!   else `nvidia.com/gpu.clique` (GPU feature discovery's NVLink clique, on multi-node
//!   NVLink systems), else the node itself;
//! - `tokenfab.io/usd-per-device-hour`: the node's device-hour price for placement (default:
//!   the catalog's indicative price of its class).

use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeMap;
use tokenfab_core::catalog::Catalog;
use tokenfab_core::placement::NodeSpec;

pub const PRODUCT: &str = "nvidia.com/gpu.product";
pub const COUNT: &str = "nvidia.com/gpu.count";
pub const CLIQUE: &str = "nvidia.com/gpu.clique";
pub const SUPER_NODE: &str = "tokenfab.io/super-node";
pub const ACCELERATOR: &str = "tokenfab.io/accelerator";
/// The node's own device-hour price, where it differs from the catalog's indicative one.
pub const PRICE: &str = "tokenfab.io/usd-per-device-hour";

/// A node with NVIDIA GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuNode {
    pub name: String,
    pub product: String,
    /// The catalog class, when known.
    pub accelerator: Option<String>,
    pub gpus: u32,
    pub super_node: String,
    /// The label that named the super-node (`tokenfab.io/super-node` or
    /// `nvidia.com/gpu.clique`); `None` when the node is its own.
    pub super_node_label: Option<&'static str>,
    /// Not cordoned.
    pub schedulable: bool,
    /// Its `Ready` condition is true.
    pub ready: bool,
    /// Its device-hour price, if its labels say.
    pub usd_per_device_hour: Option<f64>,
}

/// The GPU node `node` is, if it has GPUs (a `nvidia.com/gpu.count` above zero).
pub fn discover(node: &Node) -> Option<GpuNode> {
    let name = node.metadata.name.clone()?;
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let gpus: u32 = labels.get(COUNT)?.parse().ok().filter(|&n| n > 0)?;
    let product = labels.get(PRODUCT).cloned().unwrap_or_default();
    let accelerator = labels
        .get(ACCELERATOR)
        .cloned()
        .or_else(|| tokenfab_core::catalog::nvidia_class(&product).map(String::from));
    let (super_node, super_node_label) = match (labels.get(SUPER_NODE), labels.get(CLIQUE)) {
        (Some(s), _) => (s.clone(), Some(SUPER_NODE)),
        (None, Some(c)) => (c.clone(), Some(CLIQUE)),
        (None, None) => (name.clone(), None),
    };
    let spec = node.spec.clone().unwrap_or_default();
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    Some(GpuNode {
        name,
        product,
        accelerator,
        gpus,
        super_node,
        super_node_label,
        schedulable: !spec.unschedulable.unwrap_or(false),
        ready,
        usd_per_device_hour: labels
            .get(PRICE)
            .and_then(|p| p.parse().ok())
            .filter(|p: &f64| *p >= 0.0),
    })
}

/// The labelled super-node of each node in one (engines placed there are pinned to it).
pub fn pools(nodes: &[GpuNode]) -> BTreeMap<String, crate::reconcile::Pool> {
    nodes
        .iter()
        .filter_map(|n| {
            n.super_node_label.map(|label| {
                (
                    n.name.clone(),
                    crate::reconcile::Pool {
                        label: label.to_string(),
                        value: n.super_node.clone(),
                    },
                )
            })
        })
        .collect()
}

/// What placement may use: ready, schedulable nodes of a class in `catalog`, their GPUs in
/// the class's high-bandwidth domains, at its indicative price. The rest are returned with
/// the reason they were left out.
pub fn node_specs(nodes: &[GpuNode], catalog: &Catalog) -> (Vec<NodeSpec>, BTreeMap<String, String>) {
    let mut specs = Vec::new();
    let mut left_out = BTreeMap::new();
    for n in nodes {
        let why = if !n.ready {
            Some("not Ready".to_string())
        } else if !n.schedulable {
            Some("cordoned".to_string())
        } else {
            match &n.accelerator {
                None => Some(format!(
                    "GPU product '{}' is not in tokenfab's catalog: label the node {ACCELERATOR}=CLASS",
                    n.product
                )),
                Some(a) => match catalog.accelerator(&tokenfab_core::AcceleratorId::new(a)) {
                    Err(e) => Some(e.to_string()),
                    Ok(class) => {
                        specs.push(NodeSpec::uniform(
                            &n.name,
                            a,
                            n.gpus,
                            class.domain_size,
                            n.usd_per_device_hour.unwrap_or(class.price_usd_per_hour),
                        ));
                        None
                    }
                },
            }
        };
        if let Some(w) = why {
            left_out.insert(n.name.clone(), w);
        }
    }
    (specs, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes as a real API server lists them (a recorded NodeList, trimmed).
    fn recorded() -> Vec<Node> {
        let list: k8s_openapi::List<Node> =
            serde_json::from_str(include_str!("../tests/fixtures/nodes.json")).expect("fixture is a NodeList");
        list.items
    }

    #[test]
    fn gpu_nodes_are_found_with_their_class_count_and_super_node() {
        let found: Vec<GpuNode> = recorded().iter().filter_map(discover).collect();
        let names: Vec<&str> = found.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["gpu-h100-a", "gpu-h100-b", "gpu-l40s-a", "gpu-rtx"]);
        let h = &found[0];
        assert_eq!(
            (
                h.accelerator.as_deref(),
                h.gpus,
                h.super_node.as_str(),
                h.ready,
                h.schedulable
            ),
            (Some("h100-sxm"), 8, "nvl-clique-7", true, true)
        );
        assert!(!found[1].schedulable, "gpu-h100-b is cordoned");
        assert_eq!(h.super_node_label, Some(CLIQUE));
        assert_eq!(found[2].super_node, "gpu-l40s-a");
        assert_eq!(found[2].super_node_label, None);
        let pools = pools(&found);
        assert_eq!(pools.keys().collect::<Vec<_>>(), ["gpu-h100-a"], "{pools:?}");
        assert_eq!(found[3].accelerator, None);
    }

    #[test]
    fn placement_gets_ready_schedulable_catalogued_nodes_and_the_rest_say_why() {
        let found: Vec<GpuNode> = recorded().iter().filter_map(discover).collect();
        let (specs, left_out) = node_specs(&found, Catalog::builtin());
        let names: Vec<&str> = specs.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(names, ["gpu-h100-a", "gpu-l40s-a"]);
        assert_eq!(specs[0].domains, vec![(0..8).collect::<Vec<u32>>()]);
        assert_eq!(specs[1].domains.len(), 4, "L40S: one GPU per domain");
        assert_eq!(specs[0].usd_per_device_hour, 2.0, "the catalog's indicative H100 price");
        assert_eq!(
            specs[1].usd_per_device_hour, 0.5,
            "the node's own label (the catalog says 0.65)"
        );
        assert_eq!(left_out["gpu-h100-b"], "cordoned");
        assert!(left_out["gpu-rtx"].contains("tokenfab.io/accelerator"), "{left_out:?}");
    }
}
