//! The catalog: accelerators, models and the calibration of the performance model.
//!
//! The built-in catalog is `data/catalog.toml`, compiled into the binary; every figure
//! there names its source. Deployments may load their own catalog text (the shell reads
//! the file; the core only parses text).

use crate::ids::{AcceleratorId, ModelId};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// One accelerator class.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Accelerator {
    pub name: String,
    pub bf16_tflops: f64,
    pub memory_gb: f64,
    pub memory_tb_s: f64,
    pub max_power_w: f64,
    pub power_limit_min_w: f64,
    pub idle_power_w: f64,
    /// Device-to-device bandwidth inside the high-bandwidth domain, GB/s per direction.
    pub link_gb_s: f64,
    /// Devices in one high-bandwidth (NVLink) domain on a standard node.
    pub domain_size: u32,
    /// Indicative price per device-hour in US dollars.
    pub price_usd_per_hour: f64,
    pub src: String,
    /// True when the model's constants were fitted to measurements on this class.
    pub calibrated: bool,
}

/// The shape of one model: what the performance model needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    pub src: String,
    /// Total parameters, billions.
    pub params_b: f64,
    /// Parameters used per token (mixture-of-experts); absent for dense models.
    #[serde(default)]
    pub active_params_b: Option<f64>,
    #[serde(default)]
    pub experts: Option<u32>,
    #[serde(default)]
    pub experts_per_token: Option<u32>,
    pub layers: u32,
    pub hidden: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    /// KV-cache bytes per token in BF16, summed over layers.
    pub kv_bytes_per_token: u64,
    pub weights_gb: f64,
    pub max_context: u32,
}

impl ModelShape {
    pub fn is_moe(&self) -> bool {
        self.experts.is_some() && self.active_params_b.is_some()
    }
}

/// Constants of the step-time and power model; see the comments in `data/catalog.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub bandwidth_efficiency: f64,
    pub flop_efficiency: f64,
    pub per_sequence_overhead_us: f64,
    pub per_step_overhead_us: f64,
    pub allreduce_latency_us: f64,
    pub memory_phase_power_w: f64,
    pub compute_phase_power_w: f64,
    pub other_phase_power_w: f64,
    pub tensor_parallel_power_factor: f64,
    pub memory_clock_independent_share: f64,
    pub voltage_floor: f64,
    pub min_clock_fraction: f64,
    pub memory_usable_fraction: f64,
    pub fit_mean_prompt_tokens: u32,
}

/// Accelerators, models and calibration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub accelerators: BTreeMap<String, Accelerator>,
    pub models: BTreeMap<String, ModelShape>,
    pub calibration: Calibration,
}

/// A catalog lookup or parse that failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CatalogError {
    #[error("unknown model '{name}': the catalog knows {known}")]
    UnknownModel { name: String, known: String },
    #[error("unknown accelerator '{name}': the catalog knows {known}")]
    UnknownAccelerator { name: String, known: String },
    #[error("catalog is not valid: {0}")]
    Parse(String),
    #[error(
        "model '{model}' does not fit on {devices} x {accelerator}: weights need {weights_gb:.1} GB \
         per device but {usable_gb:.1} GB is usable; use more devices per replica"
    )]
    DoesNotFit {
        model: String,
        accelerator: String,
        devices: u32,
        weights_gb: f64,
        usable_gb: f64,
    },
}

const BUILTIN: &str = include_str!("../data/catalog.toml");

/// The catalog class of an NVIDIA product name as NVML (`NVIDIA H100 80GB HBM3`) or GPU
/// feature discovery's `nvidia.com/gpu.product` label (`NVIDIA-H100-80GB-HBM3`) gives it, where tokenfab's
/// catalog has one. PCIe and NVL variants run at other power and clocks than the SXM parts
/// the catalog describes, so they are not guessed: give `--accelerator` for them.
pub fn nvidia_class(product: &str) -> Option<&'static str> {
    let p = product.to_ascii_uppercase();
    let variant = p.contains("PCIE") || p.contains("NVL");
    if p.contains("H200") && !variant {
        Some("h200-sxm")
    } else if p.contains("H100") && !variant {
        Some("h100-sxm")
    } else if p.contains("A100") && p.contains("SXM") && p.contains("80GB") {
        Some("a100-sxm-80g")
    } else if p.contains("L40S") {
        Some("l40s")
    } else {
        None
    }
}

impl Catalog {
    /// The catalog compiled into tokenfab (`data/catalog.toml`).
    pub fn builtin() -> &'static Catalog {
        static CATALOG: OnceLock<Catalog> = OnceLock::new();
        CATALOG.get_or_init(|| Catalog::parse(BUILTIN).expect("built-in catalog parses (tested)"))
    }

    /// Parses catalog text in the format of `data/catalog.toml`.
    pub fn parse(text: &str) -> Result<Catalog, CatalogError> {
        toml::from_str(text).map_err(|e| CatalogError::Parse(e.to_string()))
    }

    pub fn model(&self, id: &ModelId) -> Result<&ModelShape, CatalogError> {
        self.models.get(id.as_str()).ok_or_else(|| CatalogError::UnknownModel {
            name: id.to_string(),
            known: join_keys(&self.models),
        })
    }

    pub fn accelerator(&self, id: &AcceleratorId) -> Result<&Accelerator, CatalogError> {
        self.accelerators
            .get(id.as_str())
            .ok_or_else(|| CatalogError::UnknownAccelerator {
                name: id.to_string(),
                known: join_keys(&self.accelerators),
            })
    }

    /// Model names, sorted.
    pub fn model_ids(&self) -> Vec<ModelId> {
        self.models.keys().map(|k| ModelId::new(k.clone())).collect()
    }
}

fn join_keys<V>(m: &BTreeMap<String, V>) -> String {
    m.keys().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_names_map_to_catalog_classes_and_variants_are_not_guessed() {
        assert_eq!(nvidia_class("NVIDIA H100 80GB HBM3"), Some("h100-sxm"));
        assert_eq!(nvidia_class("NVIDIA H200"), Some("h200-sxm"));
        assert_eq!(nvidia_class("NVIDIA A100-SXM4-80GB"), Some("a100-sxm-80g"));
        assert_eq!(nvidia_class("NVIDIA L40S"), Some("l40s"));
        assert_eq!(nvidia_class("NVIDIA H100 PCIe"), None);
        assert_eq!(nvidia_class("NVIDIA H100 NVL"), None);
        assert_eq!(nvidia_class("NVIDIA GeForce RTX 4090"), None);
        assert_eq!(nvidia_class("NVIDIA-H100-80GB-HBM3"), Some("h100-sxm"));
        assert_eq!(nvidia_class("NVIDIA-H100-PCIe"), None);
    }

    #[test]
    fn builtin_catalog_parses_and_has_required_entries() {
        let c = Catalog::builtin();
        for a in [
            "h100-sxm",
            "h200-sxm",
            "a100-sxm-80g",
            "l40s",
            "ascend-910b",
            "ascend-910c",
            "cloudmatrix-384",
            "edge-cpu",
        ] {
            let acc = c.accelerator(&AcceleratorId::from(a)).unwrap();
            assert!(acc.bf16_tflops > 0.0 && acc.memory_tb_s > 0.0 && !acc.src.is_empty());
            assert!(acc.idle_power_w < acc.max_power_w);
            assert!(acc.power_limit_min_w < acc.max_power_w, "{a}");
        }
        // The classes from outside NVIDIA's line are marked uncalibrated, and the
        // super-node class is one high-bandwidth domain of 384 devices.
        for a in ["ascend-910b", "ascend-910c", "cloudmatrix-384", "edge-cpu"] {
            assert!(!c.accelerator(&AcceleratorId::from(a)).unwrap().calibrated, "{a}");
        }
        assert_eq!(
            c.accelerator(&AcceleratorId::from("cloudmatrix-384"))
                .unwrap()
                .domain_size,
            384
        );
        for m in ["llama-3.1-8b", "llama-3.1-70b"] {
            let shape = c.model(&ModelId::from(m)).unwrap();
            assert_eq!(
                shape.kv_bytes_per_token,
                2 * u64::from(shape.layers) * u64::from(shape.kv_heads) * u64::from(shape.head_dim) * 2,
                "{m}: kv bytes per token must follow from the shape"
            );
        }
    }

    #[test]
    fn unknown_names_list_what_is_known() {
        let c = Catalog::builtin();
        let e = c.model(&ModelId::from("gpt-9")).unwrap_err().to_string();
        assert!(e.contains("gpt-9") && e.contains("llama-3.1-8b"), "{e}");
        let e = c.accelerator(&AcceleratorId::from("tpu")).unwrap_err().to_string();
        assert!(e.contains("tpu") && e.contains("h100-sxm"), "{e}");
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let e = Catalog::parse("[calibration]\nbogus = 1").unwrap_err().to_string();
        assert!(e.contains("catalog is not valid"), "{e}");
    }
}
