//! Engine Deployments the operator creates: when placement wants a kind of engine that no
//! Deployment runs (the model on another accelerator class, at another tensor-parallel
//! degree, or pinned to a super-node), the operator makes one from the model's template, a
//! Deployment of the same model that it did not create itself (the Helm chart renders one
//! per model and pool; the first by name is the template).
//!
//! What changes from the template:
//! - name `<template>-<class>-tp<N>[-<super-node>]` (a DNS label, at most 52 characters:
//!   longer ones are cut and end in a hash of the whole name);
//! - labels `tokenfab.io/model`, `tokenfab.io/accelerator`, `tokenfab.io/tensor-parallel`,
//!   `tokenfab.io/super-node`, `tokenfab.io/deployment` (its own name) and
//!   `tokenfab.io/derived-from` (the template), on the Deployment and its pods, and
//!   `app.kubernetes.io/managed-by: tokenfab-operator` (Helm does not manage it);
//! - the selector: the template's, with `tokenfab.io/deployment` set to the new name (the
//!   template's selector must hold that label, so that no two Deployments select the same
//!   pods);
//! - the node affinity, replaced: nodes of the class (labelled `tokenfab.io/accelerator`,
//!   or unlabelled with a GPU product the class is discovered from), in the super-node if
//!   pinned. The template's other affinities, node selector and tolerations stay;
//! - the engine container (the one with an `nvidia.com/gpu` limit, else the first): its
//!   GPU limit (and request, if any) is the tensor-parallel degree, and its
//!   `--tensor-parallel-size` (or `-tp`) argument too;
//! - an owner reference to the template, so that deleting the template (`helm uninstall`)
//!   deletes what was made from it.
//!
//! Everything else (image, arguments, probes, volumes, the `tokenfab.io/engine` label that
//! the node-local Service and the agent's replica follow) is the template's.

use crate::reconcile::{ACCELERATOR, DERIVED_FROM, Key, MODEL, SUPER_NODE, SUPER_NODE_LABEL, TENSOR_PARALLEL};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use std::collections::BTreeMap;

/// The label that tells one engine Deployment's pods from another's (in every engine
/// Deployment's selector).
pub const DEPLOYMENT_LABEL: &str = "tokenfab.io/deployment";
/// The GPU resource of NVIDIA's device plugin.
pub const GPU: &str = "nvidia.com/gpu";
/// The longest name of a derived Deployment (its ReplicaSets and pods add suffixes).
pub const MAX_NAME: usize = 52;

/// Why a Deployment cannot be made from a template.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DeriveError {
    #[error("template Deployment {0}: it has no {1} (read it from the API server, which fills it in)")]
    Incomplete(String, &'static str),
    #[error(
        "template Deployment {0}: its selector does not hold the label {DEPLOYMENT_LABEL}, so a Deployment made from it would select its pods too; add the label to its selector and pod template (the Helm chart's engines have it)"
    )]
    SelectorWithoutDeploymentLabel(String),
    #[error("template Deployment {0}: its pod template has no container")]
    NoContainer(String),
    #[error(
        "template Deployment {template}: placement wants tensor parallelism {tp}, but its container '{container}' has no --tensor-parallel-size (or -tp) argument to change; give it one (vLLM takes --tensor-parallel-size=N)"
    )]
    NoTensorParallelArg {
        template: String,
        container: String,
        tp: u32,
    },
}

/// The name of the Deployment of `key` made from `template`.
pub fn name(template: &str, key: &Key) -> String {
    let mut raw = format!("{template}-{}-tp{}", key.accelerator, key.tp);
    if let Some(p) = &key.super_node {
        raw.push('-');
        raw.push_str(&p.value);
    }
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && (out.is_empty() || out.ends_with('-'))) {
            out.push(c);
        }
    }
    let out = out.trim_end_matches('-').to_string();
    if out.len() <= MAX_NAME {
        return out;
    }
    // FNV-1a of the whole name keeps two long names that share a prefix apart.
    let hash = raw
        .bytes()
        .fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    format!("{}-{hash:08x}", out[..MAX_NAME - 9].trim_end_matches('-'))
}

/// The template for `model`: the first (by name) of `deployments` that runs it and that
/// the operator did not make.
pub fn template_for<'a>(model: &str, deployments: &'a [Deployment]) -> Option<&'a Deployment> {
    deployments
        .iter()
        .filter(|d| {
            let labels = d.metadata.labels.as_ref();
            labels.and_then(|l| l.get(MODEL)).is_some_and(|m| m == model)
                && labels.is_none_or(|l| !l.contains_key(DERIVED_FROM))
        })
        .min_by(|a, b| a.metadata.name.cmp(&b.metadata.name))
}

/// The GPU products (`nvidia.com/gpu.product`) of the discovered nodes of class `class`
/// that carry no `tokenfab.io/accelerator` label (the class is derived from the product).
pub fn products_of(nodes: &[crate::discovery::GpuNode], class: &str) -> Vec<String> {
    let mut out: Vec<String> = nodes
        .iter()
        .filter(|n| {
            n.accelerator.as_deref() == Some(class)
                && !n.product.is_empty()
                && tokenfab_core::catalog::nvidia_class(&n.product) == Some(class)
        })
        .map(|n| n.product.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn requirement(key: &str, operator: &str, values: Option<Vec<String>>) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: key.to_string(),
        operator: operator.to_string(),
        values,
    }
}

/// Nodes of `key`'s class (in its super-node, if pinned): those labelled with the class,
/// or unlabelled ones with one of `products`.
pub fn node_affinity(key: &Key, products: &[String]) -> NodeAffinity {
    let pin: Vec<NodeSelectorRequirement> = key
        .super_node
        .iter()
        .map(|p| requirement(&p.label, "In", Some(vec![p.value.clone()])))
        .collect();
    let mut labelled = vec![requirement(
        crate::discovery::ACCELERATOR,
        "In",
        Some(vec![key.accelerator.clone()]),
    )];
    labelled.extend(pin.iter().cloned());
    let mut terms = vec![NodeSelectorTerm {
        match_expressions: Some(labelled),
        match_fields: None,
    }];
    if !products.is_empty() {
        let mut by_product = vec![
            requirement(crate::discovery::PRODUCT, "In", Some(products.to_vec())),
            requirement(crate::discovery::ACCELERATOR, "DoesNotExist", None),
        ];
        by_product.extend(pin);
        terms.push(NodeSelectorTerm {
            match_expressions: Some(by_product),
            match_fields: None,
        });
    }
    NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
            node_selector_terms: terms,
        }),
        preferred_during_scheduling_ignored_during_execution: None,
    }
}

/// Sets the tensor-parallel argument in `args`; false if there is none.
fn set_tp_arg(args: &mut [String], tp: u32) -> bool {
    for i in 0..args.len() {
        for flag in ["--tensor-parallel-size", "-tp"] {
            if args[i] == flag && i + 1 < args.len() {
                args[i + 1] = tp.to_string();
                return true;
            }
            if args[i].starts_with(&format!("{flag}=")) {
                args[i] = format!("{flag}={tp}");
                return true;
            }
        }
    }
    false
}

fn set_labels(labels: &mut BTreeMap<String, String>, key: &Key, name: &str, template: &str) {
    labels.insert(MODEL.into(), key.model.clone());
    labels.insert(ACCELERATOR.into(), key.accelerator.clone());
    labels.insert(TENSOR_PARALLEL.into(), key.tp.to_string());
    match &key.super_node {
        Some(p) => labels.insert(SUPER_NODE.into(), p.value.clone()),
        None => labels.remove(SUPER_NODE),
    };
    labels.insert(DEPLOYMENT_LABEL.into(), name.to_string());
    labels.insert(DERIVED_FROM.into(), template.to_string());
    labels.insert("app.kubernetes.io/managed-by".into(), "tokenfab-operator".into());
}

/// The Deployment of `key` at `replicas`, made from `template` (as read from the API
/// server), for nodes of the class with GPU `products`.
pub fn derive(template: &Deployment, key: &Key, replicas: u32, products: &[String]) -> Result<Deployment, DeriveError> {
    let tname = template
        .metadata
        .name
        .clone()
        .ok_or_else(|| DeriveError::Incomplete("?".into(), "name"))?;
    let uid = template
        .metadata
        .uid
        .clone()
        .ok_or_else(|| DeriveError::Incomplete(tname.clone(), "uid"))?;
    let mut spec = template
        .spec
        .clone()
        .ok_or_else(|| DeriveError::Incomplete(tname.clone(), "spec"))?;
    let name = name(&tname, key);

    let selector = spec.selector.match_labels.get_or_insert_with(Default::default);
    if !selector.contains_key(DEPLOYMENT_LABEL) {
        return Err(DeriveError::SelectorWithoutDeploymentLabel(tname));
    }
    selector.insert(DEPLOYMENT_LABEL.into(), name.clone());
    spec.replicas = Some(replicas as i32);

    let pod_meta = spec.template.metadata.get_or_insert_with(Default::default);
    set_labels(pod_meta.labels.get_or_insert_with(Default::default), key, &name, &tname);
    let pod = spec
        .template
        .spec
        .as_mut()
        .ok_or_else(|| DeriveError::Incomplete(tname.clone(), "pod template spec"))?;
    pod.affinity.get_or_insert_with(Default::default).node_affinity = Some(node_affinity(key, products));

    let engine = pod
        .containers
        .iter()
        .position(|c| {
            c.resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .is_some_and(|l| l.contains_key(GPU))
        })
        .unwrap_or(0);
    let container = pod
        .containers
        .get_mut(engine)
        .ok_or_else(|| DeriveError::NoContainer(tname.clone()))?;
    let template_tp: u32 = template
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(TENSOR_PARALLEL))
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let changed = container.args.as_mut().is_some_and(|a| set_tp_arg(a, key.tp))
        || container.command.as_mut().is_some_and(|a| set_tp_arg(a, key.tp));
    if !changed && key.tp != template_tp {
        return Err(DeriveError::NoTensorParallelArg {
            template: tname,
            container: container.name.clone(),
            tp: key.tp,
        });
    }
    let resources = container.resources.get_or_insert_with(Default::default);
    resources
        .limits
        .get_or_insert_with(Default::default)
        .insert(GPU.into(), Quantity(key.tp.to_string()));
    if let Some(requests) = resources.requests.as_mut()
        && requests.contains_key(GPU)
    {
        requests.insert(GPU.into(), Quantity(key.tp.to_string()));
    }

    let mut labels = template.metadata.labels.clone().unwrap_or_default();
    set_labels(&mut labels, key, &name, &tname);
    let annotations = key
        .super_node
        .as_ref()
        .map(|p| BTreeMap::from([(SUPER_NODE_LABEL.to_string(), p.label.clone())]));
    Ok(Deployment {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: template.metadata.namespace.clone(),
            labels: Some(labels),
            annotations,
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: tname,
                uid,
                controller: Some(false),
                block_owner_deletion: Some(false),
            }]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{Pool, engine_of};

    /// The chart's engine Deployment as the API server returns it (recorded from
    /// `helm template` output with the server's fields added).
    fn template() -> Deployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "tf-vllm-llama", "namespace": "tokenfab", "uid": "4c1f6a8e-0d2b-4f57-9a64-7b0c6f3d2e11",
                "resourceVersion": "812", "generation": 3,
                "annotations": {"meta.helm.sh/release-name": "tf", "deployment.kubernetes.io/revision": "2"},
                "labels": {"app.kubernetes.io/name": "tokenfab", "app.kubernetes.io/instance": "tf",
                           "app.kubernetes.io/component": "engine", "app.kubernetes.io/managed-by": "Helm",
                           "tokenfab.io/engine": "llama", "tokenfab.io/deployment": "tf-vllm-llama",
                           "tokenfab.io/model": "llama-3.1-8b", "tokenfab.io/accelerator": "h100-sxm",
                           "tokenfab.io/tensor-parallel": "1"}
            },
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app.kubernetes.io/name": "tokenfab", "app.kubernetes.io/instance": "tf",
                                             "app.kubernetes.io/component": "engine", "tokenfab.io/deployment": "tf-vllm-llama"}},
                "template": {
                    "metadata": {"labels": {"app.kubernetes.io/name": "tokenfab", "app.kubernetes.io/instance": "tf",
                                            "app.kubernetes.io/component": "engine", "tokenfab.io/engine": "llama",
                                            "tokenfab.io/deployment": "tf-vllm-llama", "tokenfab.io/model": "llama-3.1-8b",
                                            "tokenfab.io/accelerator": "h100-sxm", "tokenfab.io/tensor-parallel": "1"}},
                    "spec": {
                        "nodeSelector": {"nvidia.com/gpu.present": "true"},
                        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]}]}}},
                        "containers": [{
                            "name": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                            "args": ["--model=meta-llama/Llama-3.1-8B-Instruct", "--tensor-parallel-size=1", "--port=8000"],
                            "resources": {"limits": {"nvidia.com/gpu": "1", "memory": "64Gi"}, "requests": {"cpu": "4"}}
                        }]
                    }
                }
            },
            "status": {"replicas": 1, "readyReplicas": 1}
        }))
        .expect("a Deployment")
    }

    fn key(acc: &str, tp: u32, pool: Option<Pool>) -> Key {
        Key {
            model: "llama-3.1-8b".into(),
            accelerator: acc.into(),
            tp,
            super_node: pool,
        }
    }

    #[test]
    fn names_are_dns_labels_of_bounded_length_that_stay_apart() {
        assert_eq!(name("tf-vllm-llama", &key("l40s", 2, None)), "tf-vllm-llama-l40s-tp2");
        let pool = |v: &str| {
            Some(Pool {
                label: "nvidia.com/gpu.clique".into(),
                value: v.into(),
            })
        };
        let a = name(
            "a-release-with-a-long-name-vllm-llama",
            &key("h100-sxm", 8, pool("7F3C1A2B.Clique_1")),
        );
        let b = name(
            "a-release-with-a-long-name-vllm-llama",
            &key("h100-sxm", 8, pool("7F3C1A2B.Clique_2")),
        );
        assert!(a.len() <= MAX_NAME && b.len() <= MAX_NAME, "{a} {b}");
        assert_ne!(a, b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !a.ends_with('-'),
            "{a}"
        );
    }

    #[test]
    fn a_derived_deployment_runs_the_new_kind_and_keeps_the_rest_of_the_template() {
        let products = vec!["NVIDIA-L40S".to_string()];
        let d = derive(&template(), &key("l40s", 2, None), 1, &products).expect("derived");
        assert_eq!(d.metadata.name.as_deref(), Some("tf-vllm-llama-l40s-tp2"));
        assert_eq!(d.metadata.resource_version, None, "a new object");
        assert_eq!(d.metadata.annotations, None, "Helm's annotations are not copied");
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.name.as_str(), owner.uid.as_str()),
            ("tf-vllm-llama", "4c1f6a8e-0d2b-4f57-9a64-7b0c6f3d2e11")
        );
        let labels = d.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "tokenfab-operator");
        assert_eq!(
            labels["tokenfab.io/engine"], "llama",
            "the Service and the agent still find it"
        );
        let e = engine_of(&d).expect("an engine");
        assert_eq!(e.key, key("l40s", 2, None));
        assert_eq!(e.replicas, 1);
        assert_eq!(e.derived_from.as_deref(), Some("tf-vllm-llama"));

        let spec = d.spec.as_ref().unwrap();
        let selector = spec.selector.match_labels.as_ref().unwrap();
        assert_eq!(selector[DEPLOYMENT_LABEL], "tf-vllm-llama-l40s-tp2");
        let pod_labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        for (k, v) in selector {
            assert_eq!(pod_labels.get(k), Some(v), "the selector selects its own pods ({k})");
        }
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(
            pod.node_selector.as_ref().unwrap()["nvidia.com/gpu.present"],
            "true",
            "kept"
        );
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_ref().unwrap(),
            &[
                "--model=meta-llama/Llama-3.1-8B-Instruct",
                "--tensor-parallel-size=2",
                "--port=8000"
            ]
        );
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits[GPU].0, "2");
        assert_eq!(limits["memory"].0, "64Gi");
        let terms = &pod
            .affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()
            .node_selector_terms;
        let json = serde_json::to_value(terms).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"matchExpressions": [{"key": "tokenfab.io/accelerator", "operator": "In", "values": ["l40s"]}]},
                {"matchExpressions": [
                    {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-L40S"]},
                    {"key": "tokenfab.io/accelerator", "operator": "DoesNotExist"}]}
            ]),
            "the H100 product affinity is gone"
        );
    }

    #[test]
    fn a_pinned_deployment_asks_for_its_super_node_in_every_term() {
        let pool = Pool {
            label: "nvidia.com/gpu.clique".into(),
            value: "nvl-clique-7".into(),
        };
        let d = derive(
            &template(),
            &key("h100-sxm", 1, Some(pool.clone())),
            2,
            &["NVIDIA-H100-80GB-HBM3".to_string()],
        )
        .unwrap();
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let terms = serde_json::to_value(pod.affinity.as_ref().unwrap().node_affinity.as_ref().unwrap()).unwrap();
        let terms = terms["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(terms.len(), 2);
        for t in &terms {
            assert!(
                t["matchExpressions"].as_array().unwrap().contains(
                    &serde_json::json!({"key": "nvidia.com/gpu.clique", "operator": "In", "values": ["nvl-clique-7"]})
                ),
                "{t}"
            );
        }
        // Read back, it is the same kind (the annotation keeps which label names the pool).
        assert_eq!(engine_of(&d).unwrap().key, key("h100-sxm", 1, Some(pool)));
    }

    #[test]
    fn templates_that_cannot_be_derived_from_say_why() {
        let mut t = template();
        t.spec
            .as_mut()
            .unwrap()
            .selector
            .match_labels
            .as_mut()
            .unwrap()
            .remove(DEPLOYMENT_LABEL);
        let e = derive(&t, &key("l40s", 1, None), 1, &[]).unwrap_err();
        assert!(e.to_string().contains("add the label to its selector"), "{e}");

        let mut t = template();
        t.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0].args = Some(vec!["--model=x".into()]);
        let e = derive(&t, &key("h100-sxm", 4, None), 1, &[]).unwrap_err();
        assert!(e.to_string().contains("--tensor-parallel-size"), "{e}");
        // The same degree needs no argument.
        assert!(derive(&t, &key("l40s", 1, None), 1, &[]).is_ok());

        let mut t = template();
        t.metadata.uid = None;
        assert_eq!(
            derive(&t, &key("l40s", 1, None), 1, &[]).unwrap_err(),
            DeriveError::Incomplete("tf-vllm-llama".into(), "uid")
        );
    }

    #[test]
    fn the_template_is_a_chart_deployment_of_the_model_never_a_derived_one() {
        let t = template();
        let derived = derive(&t, &key("l40s", 1, None), 1, &[]).unwrap();
        let mut other = t.clone();
        other.metadata.name = Some("tf-vllm-llama-b".into());
        let all = vec![derived, other, t];
        assert_eq!(
            template_for("llama-3.1-8b", &all).and_then(|d| d.metadata.name.as_deref()),
            Some("tf-vllm-llama")
        );
        assert!(template_for("qwen", &all).is_none());
    }

    #[test]
    fn the_space_separated_tp_argument_is_changed_too() {
        let mut args = vec!["serve".to_string(), "-tp".into(), "1".into()];
        assert!(set_tp_arg(&mut args, 4));
        assert_eq!(args, ["serve", "-tp", "4"]);
        let mut args = vec!["--tensor-parallel-size".to_string(), "2".into()];
        assert!(set_tp_arg(&mut args, 8));
        assert_eq!(args[1], "8");
        assert!(!set_tp_arg(&mut ["--model=x".to_string()], 2));
    }
}
