//! `tokenfab devices`: what the agent's device backend reads on this node, to check a GPU
//! node before starting an agent on it (and the script tests/gpu/check-nvml.sh).

use anyhow::Context;
use clap::Args;
use std::time::Duration;
use tokenfab_agent::devices::DeviceBackend;
use tokenfab_agent::nvml::NvmlDevices;

#[derive(Args, Debug)]
pub struct DevicesArgs {
    /// The catalog class to model the GPUs as, for products the catalog does not name.
    #[arg(long)]
    accelerator: Option<String>,
    /// Readings to take (power, energy counter, utilisation, temperature), one per --interval.
    #[arg(long, default_value_t = 3)]
    samples: u32,
    /// Time between readings; the energy counter's rise over it gives the mean power.
    #[arg(long, default_value = "1s", value_parser = crate::parse::duration)]
    interval: Duration,
    /// Print JSON (one object: devices, then readings) instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: DevicesArgs) -> anyhow::Result<()> {
    let class = a.accelerator.as_deref().map(tokenfab_core::AcceleratorId::new);
    if let Some(c) = &class {
        tokenfab_core::catalog::Catalog::builtin()
            .accelerator(c)
            .with_context(|| format!("--accelerator {c}"))?;
    }
    let nvml = tokio::task::spawn_blocking(move || NvmlDevices::open(class.as_ref()))
        .await?
        .context("reading NVIDIA GPUs through NVML")?;
    let info = nvml.devices();
    if !a.json {
        println!("{} GPU(s):", info.len());
        for d in &info {
            println!(
                "  GPU {}: {} ({}), {:.1} GiB, NVLink domain {}, power limit {:.0} W (range {:.0}-{:.0} W)",
                d.index,
                d.accelerator,
                d.uuid,
                d.memory_bytes as f64 / f64::from(1u32 << 30),
                d.domain,
                d.power_limit_w,
                d.power_limit_min_w,
                d.power_limit_max_w
            );
        }
    }
    let nvml = std::sync::Arc::new(nvml);
    let mut samples = Vec::new();
    let mut previous: Option<Vec<(f64, std::time::Instant)>> = None;
    for s in 0..a.samples {
        if s > 0 {
            tokio::time::sleep(a.interval).await;
        }
        let n = nvml.clone();
        let readings = tokio::task::spawn_blocking(move || n.read_now()).await??;
        let at = std::time::Instant::now();
        for (i, (d, raw)) in readings.iter().enumerate() {
            let mean_w = previous
                .as_ref()
                .map(|p| (d.energy_j - p[i].0) / at.duration_since(p[i].1).as_secs_f64());
            if !a.json {
                println!(
                    "  sample {s} GPU {}: power {:.1} W, energy counter {:.3} J{}, limit {:.0} W, utilisation {}, temperature {}",
                    d.index,
                    d.power_w,
                    d.energy_j,
                    mean_w.map_or(String::new(), |w| format!(" (mean {w:.1} W since the last sample)")),
                    d.power_limit_w,
                    raw.utilization_pct.map_or("n/a".into(), |u| format!("{u}%")),
                    raw.temperature_c.map_or("n/a".into(), |t| format!("{t} C")),
                );
            }
            samples.push(serde_json::json!({
                "sample": s,
                "index": d.index,
                "power_w": d.power_w,
                "energy_j": d.energy_j,
                "mean_power_w_since_last": mean_w,
                "power_limit_w": d.power_limit_w,
                "utilization_pct": raw.utilization_pct,
                "temperature_c": raw.temperature_c,
            }));
        }
        previous = Some(readings.iter().map(|(d, _)| (d.energy_j, at)).collect());
    }
    if a.json {
        let devices: Vec<serde_json::Value> = info
            .iter()
            .map(|d| {
                serde_json::json!({
                    "index": d.index,
                    "accelerator": d.accelerator.to_string(),
                    "uuid": d.uuid,
                    "memory_bytes": d.memory_bytes,
                    "nvlink_domain": d.domain,
                    "power_limit_w": d.power_limit_w,
                    "power_limit_min_w": d.power_limit_min_w,
                    "power_limit_max_w": d.power_limit_max_w,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"devices": devices, "readings": samples}))?
        );
    }
    Ok(())
}
