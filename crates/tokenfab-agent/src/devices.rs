//! Devices behind one trait: what the node has, and readings of power and energy.
//!
//! Backends: [`EmulatedDevices`] (the engine emulator's `/emu/devices` endpoint),
//! [`crate::nvml::NvmlDevices`] (NVIDIA GPUs), [`DeclaredDevices`] and [`NoDevices`] (CPU
//! engines with no energy counter).

use std::future::Future;
use std::pin::Pin;
use tokenfab_core::AcceleratorId;
use tokenfab_core::catalog::Catalog;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One device, as registered with the control plane.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub index: u32,
    pub accelerator: AcceleratorId,
    pub uuid: String,
    pub memory_bytes: u64,
    pub power_limit_w: f64,
    pub power_limit_min_w: f64,
    pub power_limit_max_w: f64,
    /// High-bandwidth domain of the device on its super-node.
    pub domain: u32,
    pub emulated: bool,
}

/// A reading of one device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceReading {
    pub index: u32,
    /// Energy counter, joules, monotonic.
    pub energy_j: f64,
    pub power_w: f64,
    pub power_limit_w: f64,
    /// The device's clock, seconds: wall time for real devices, emulated time for emulated ones.
    pub clock_s: f64,
    /// The generated-token counter of the engine the device serves, when the device source
    /// knows it (the engine emulator does; NVML does not).
    pub engine_tokens: Option<u64>,
    /// Share of the last sample period a kernel ran (0 to 1), where the device says.
    pub utilization: Option<f64>,
    /// Temperature, degrees Celsius, where the device says.
    pub temperature_c: Option<f64>,
}

/// A device operation that failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot read devices from {source_name}: {cause}")]
    Read { source_name: String, cause: String },
    #[error("device {index} does not exist on this node")]
    NoSuchDevice { index: u32 },
    #[error("cannot set the power limit of device {index}: {cause}")]
    PowerLimit { index: u32, cause: String },
}

/// The devices of a node.
pub trait DeviceBackend: Send + Sync + 'static {
    /// What the node has (fixed for the agent's life).
    fn devices(&self) -> Vec<DeviceInfo>;
    /// Reads every device.
    fn read(&self) -> BoxFuture<'_, Result<Vec<DeviceReading>, DeviceError>>;
    /// Sets one device's power limit; returns the limit applied.
    fn set_power_limit(&self, index: u32, watts: f64) -> BoxFuture<'_, Result<f64, DeviceError>>;
}

/// A node without accelerators the agent can read (e.g. llama.cpp on CPU).
#[derive(Debug, Default, Clone)]
pub struct NoDevices;

impl DeviceBackend for NoDevices {
    fn devices(&self) -> Vec<DeviceInfo> {
        Vec::new()
    }
    fn read(&self) -> BoxFuture<'_, Result<Vec<DeviceReading>, DeviceError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn set_power_limit(&self, index: u32, _watts: f64) -> BoxFuture<'_, Result<f64, DeviceError>> {
        Box::pin(async move { Err(DeviceError::NoSuchDevice { index }) })
    }
}

/// Devices the agent was told of but cannot read (e.g. a CPU serving llama.cpp, declared
/// with `--accelerator`): they register with their class, so that the replicas have a
/// belief (a profile or the performance model) and the control plane a capacity estimate,
/// but there is no energy counter and no power limit to set (the limit range is one
/// point, so the tuner leaves power alone).
#[derive(Debug, Clone)]
pub struct DeclaredDevices {
    info: Vec<DeviceInfo>,
}

impl DeclaredDevices {
    /// `count` devices of class `accelerator` with `max_power_w` as their (fixed) limit.
    pub fn new(accelerator: &AcceleratorId, count: u32, max_power_w: f64) -> DeclaredDevices {
        DeclaredDevices {
            info: (0..count)
                .map(|index| DeviceInfo {
                    index,
                    accelerator: accelerator.clone(),
                    uuid: format!("declared-{accelerator}-{index}"),
                    memory_bytes: 0,
                    power_limit_w: max_power_w,
                    power_limit_min_w: max_power_w,
                    power_limit_max_w: max_power_w,
                    domain: index,
                    emulated: false,
                })
                .collect(),
        }
    }
}

impl DeviceBackend for DeclaredDevices {
    fn devices(&self) -> Vec<DeviceInfo> {
        self.info.clone()
    }
    fn read(&self) -> BoxFuture<'_, Result<Vec<DeviceReading>, DeviceError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn set_power_limit(&self, index: u32, _watts: f64) -> BoxFuture<'_, Result<f64, DeviceError>> {
        Box::pin(async move { Err(DeviceError::NoSuchDevice { index }) })
    }
}

/// Emulated devices, read from engine emulators. Each emulator hosts the devices of one
/// replica; `engines[i]` = (base URL, node device indices it emulates, in order).
#[derive(Debug, Clone)]
pub struct EmulatedDevices {
    http: reqwest::Client,
    engines: Vec<(String, Vec<u32>)>,
    info: Vec<DeviceInfo>,
}

#[derive(serde::Deserialize)]
struct EmuDevices {
    clock_s: f64,
    /// Output tokens the emulated engine generated (older emulators: absent).
    #[serde(default)]
    completion_tokens: Option<u64>,
    devices: Vec<EmuDevice>,
}

#[derive(serde::Deserialize)]
struct EmuDevice {
    accelerator: String,
    energy_j: f64,
    power_w: f64,
    power_limit_w: f64,
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<EmuDevices, DeviceError> {
    let err = |cause: String| DeviceError::Read {
        source_name: url.to_string(),
        cause,
    };
    let resp = http
        .get(format!("{url}/emu/devices"))
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(err(format!(
            "HTTP {}; is it a tokenfab engine emulator?",
            resp.status()
        )));
    }
    let bytes = resp.bytes().await.map_err(|e| err(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| err(format!("unexpected answer: {e}")))
}

impl EmulatedDevices {
    /// Asks each emulator which devices it emulates; node device indices are assigned
    /// in order, one NVLink domain per `domain_size` devices of the accelerator class.
    pub async fn discover(http: reqwest::Client, engine_urls: &[String]) -> Result<Self, DeviceError> {
        let mut engines = Vec::new();
        let mut info = Vec::new();
        for url in engine_urls {
            let d = fetch(&http, url).await?;
            let mut indices = Vec::new();
            for dev in d.devices {
                let index = info.len() as u32;
                let accelerator = AcceleratorId::new(dev.accelerator);
                let spec = Catalog::builtin().accelerator(&accelerator).ok();
                let domain_size = spec.map_or(1, |s| s.domain_size.max(1));
                info.push(DeviceInfo {
                    index,
                    uuid: format!("emu-{}-{index}", url.trim_start_matches("http://")),
                    memory_bytes: spec.map_or(0, |s| (s.memory_gb * 1e9) as u64),
                    power_limit_w: dev.power_limit_w,
                    power_limit_min_w: spec.map_or(dev.power_limit_w, |s| s.power_limit_min_w),
                    power_limit_max_w: spec.map_or(dev.power_limit_w, |s| s.max_power_w),
                    domain: index / domain_size,
                    emulated: true,
                    accelerator,
                });
                indices.push(index);
            }
            engines.push((url.clone(), indices));
        }
        Ok(EmulatedDevices { http, engines, info })
    }

    /// Node device indices of the engine at `url`.
    pub fn indices_of(&self, url: &str) -> Vec<u32> {
        self.engines
            .iter()
            .find(|(u, _)| u == url)
            .map(|(_, i)| i.clone())
            .unwrap_or_default()
    }
}

impl DeviceBackend for EmulatedDevices {
    fn devices(&self) -> Vec<DeviceInfo> {
        self.info.clone()
    }

    fn read(&self) -> BoxFuture<'_, Result<Vec<DeviceReading>, DeviceError>> {
        Box::pin(async move {
            // Each engine is read on its own: one that does not answer leaves only its
            // own devices without a reading.
            let mut out = Vec::with_capacity(self.info.len());
            let mut failed = None;
            for (url, indices) in &self.engines {
                let d = match fetch(&self.http, url).await {
                    Ok(d) => d,
                    Err(e) => {
                        failed = Some(e);
                        continue;
                    }
                };
                for (dev, &index) in d.devices.iter().zip(indices) {
                    out.push(DeviceReading {
                        index,
                        energy_j: dev.energy_j,
                        power_w: dev.power_w,
                        power_limit_w: dev.power_limit_w,
                        clock_s: d.clock_s,
                        engine_tokens: d.completion_tokens,
                        utilization: None,
                        temperature_c: None,
                    });
                }
            }
            match failed {
                Some(e) if out.is_empty() => Err(e),
                Some(e) => {
                    tracing::warn!(error = %e, "some emulated devices could not be read");
                    Ok(out)
                }
                None => Ok(out),
            }
        })
    }

    fn set_power_limit(&self, index: u32, watts: f64) -> BoxFuture<'_, Result<f64, DeviceError>> {
        Box::pin(async move {
            let (url, _) = self
                .engines
                .iter()
                .find(|(_, i)| i.contains(&index))
                .ok_or(DeviceError::NoSuchDevice { index })?;
            let err = |cause: String| DeviceError::PowerLimit { index, cause };
            let resp = self
                .http
                .post(format!("{url}/emu/power-limit"))
                .body(serde_json::json!({ "watts": watts }).to_string())
                .send()
                .await
                .map_err(|e| err(e.to_string()))?;
            let status = resp.status();
            let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.map_err(|e| err(e.to_string()))?)
                .map_err(|e| err(e.to_string()))?;
            if !status.is_success() {
                return Err(err(body["error"]["message"].as_str().unwrap_or("refused").to_string()));
            }
            body["power_limit_w"]
                .as_f64()
                .ok_or_else(|| err("no power_limit_w in the answer".into()))
        })
    }
}
