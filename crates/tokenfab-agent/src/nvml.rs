//! NVIDIA GPUs through NVML: devices, memory, NVLink topology, power draw, the
//! total-energy counter, utilisation, temperature, and power limits.
//!
//! NVML (`libnvidia-ml.so.1`, part of the driver) is loaded when the backend opens, not
//! linked: the agent builds and runs on machines without a driver, where opening fails
//! with a message that says so and what to use instead.
//!
//! [`NvmlDevices`] turns what a [`GpuSource`] reads into the agent's device model; the
//! real source is [`Nvml`]. Tests give it a fake source (no GPU is needed to test the
//! conversion, the topology or the power-limit rules).

use crate::devices::{BoxFuture, DeviceBackend, DeviceError, DeviceInfo, DeviceReading};
use std::sync::Arc;
use tokenfab_core::AcceleratorId;

/// What a GPU says about itself once.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuStatic {
    pub name: String,
    pub uuid: String,
    pub memory_bytes: u64,
    /// PCI bus id (`00000000:18:00.0`), to match NVLink peers.
    pub pci_bus_id: String,
    /// PCI bus ids at the other end of each active NVLink.
    pub nvlink_peers: Vec<String>,
    /// Power limit range and current limit, milliwatts.
    pub power_limit_min_mw: u32,
    pub power_limit_max_mw: u32,
    pub power_limit_mw: u32,
}

/// A reading of one GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuReading {
    /// Energy since the driver loaded, millijoules.
    pub energy_mj: u64,
    pub power_mw: u32,
    pub power_limit_mw: u32,
    /// Percent of the last sample period a kernel ran, if readable.
    pub utilization_pct: Option<u32>,
    pub temperature_c: Option<u32>,
}

/// A source of GPU facts: NVML, or a fake in tests. Calls may block (NVML does).
pub trait GpuSource: Send + Sync + 'static {
    fn count(&self) -> Result<u32, String>;
    fn describe(&self, index: u32) -> Result<GpuStatic, String>;
    fn read(&self, index: u32) -> Result<GpuReading, String>;
    fn set_power_limit_mw(&self, index: u32, milliwatts: u32) -> Result<(), String>;
    /// The driver's version, for the log.
    fn driver(&self) -> String;
}

/// NVLink domains: GPUs joined by active NVLinks (directly or through others) share one;
/// a GPU without NVLink is its own. Numbered by their lowest GPU index.
fn domains(gpus: &[GpuStatic]) -> Vec<u32> {
    let mut parent: Vec<usize> = (0..gpus.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let norm = |s: &str| s.trim().to_ascii_lowercase();
    for (i, g) in gpus.iter().enumerate() {
        for peer in &g.nvlink_peers {
            // A peer that is not one of these GPUs is an NVSwitch: the GPUs behind the same
            // switch are joined through it.
            let j = gpus.iter().position(|o| norm(&o.pci_bus_id) == norm(peer));
            let targets: Vec<usize> = match j {
                Some(j) => vec![j],
                None => gpus
                    .iter()
                    .enumerate()
                    .filter(|(k, o)| *k != i && o.nvlink_peers.iter().any(|p| norm(p) == norm(peer)))
                    .map(|(k, _)| k)
                    .collect(),
            };
            for j in targets {
                let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                if a != b {
                    parent[a.max(b)] = a.min(b);
                }
            }
        }
    }
    (0..gpus.len()).map(|i| root(&mut parent, i) as u32).collect()
}

/// A node's NVIDIA GPUs.
pub struct NvmlDevices {
    source: Arc<dyn GpuSource>,
    info: Vec<DeviceInfo>,
}

impl std::fmt::Debug for NvmlDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlDevices").field("info", &self.info).finish()
    }
}

impl NvmlDevices {
    /// Opens NVML and describes every GPU. `accelerator`, when given, is the catalog class
    /// of all of them (needed for products the catalog does not name).
    pub fn open(accelerator: Option<&AcceleratorId>) -> Result<NvmlDevices, DeviceError> {
        let nvml = Nvml::open()?;
        NvmlDevices::with_source(Arc::new(nvml), accelerator)
    }

    /// Describes the GPUs `source` has.
    pub fn with_source(
        source: Arc<dyn GpuSource>,
        accelerator: Option<&AcceleratorId>,
    ) -> Result<NvmlDevices, DeviceError> {
        let read_err = |cause: String| DeviceError::Read {
            source_name: "NVML".into(),
            cause,
        };
        let count = source.count().map_err(read_err)?;
        if count == 0 {
            return Err(read_err(format!(
                "the driver ({}) reports no GPU on this node (check `nvidia-smi`, and that the agent's container or service can see /dev/nvidia*)",
                source.driver()
            )));
        }
        let gpus = (0..count)
            .map(|i| source.describe(i).map_err(|e| read_err(format!("GPU {i}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let domain = domains(&gpus);
        let info = gpus
            .iter()
            .zip(domain)
            .enumerate()
            .map(|(i, (g, domain))| {
                let class = match accelerator {
                    Some(a) => a.clone(),
                    None => AcceleratorId::new(tokenfab_core::catalog::nvidia_class(&g.name).ok_or_else(|| {
                        read_err(format!(
                            "GPU {i} is a '{}', which tokenfab's catalog does not name: give --accelerator CLASS (e.g. h100-sxm, h200-sxm, a100-sxm-80g, l40s) to say which class to model it as",
                            g.name
                        ))
                    })?),
                };
                Ok(DeviceInfo {
                    index: i as u32,
                    accelerator: class,
                    uuid: g.uuid.clone(),
                    memory_bytes: g.memory_bytes,
                    power_limit_w: f64::from(g.power_limit_mw) / 1e3,
                    power_limit_min_w: f64::from(g.power_limit_min_mw) / 1e3,
                    power_limit_max_w: f64::from(g.power_limit_max_mw) / 1e3,
                    domain,
                    emulated: false,
                })
            })
            .collect::<Result<Vec<_>, DeviceError>>()?;
        tracing::info!(gpus = info.len(), driver = %source.driver(), "NVML: devices found");
        Ok(NvmlDevices { source, info })
    }

    /// Reads every GPU now (blocking).
    pub fn read_now(&self) -> Result<Vec<(DeviceReading, GpuReading)>, DeviceError> {
        let clock_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.info
            .iter()
            .map(|d| {
                let r = self.source.read(d.index).map_err(|cause| DeviceError::Read {
                    source_name: format!("NVML (GPU {})", d.index),
                    cause,
                })?;
                Ok((
                    DeviceReading {
                        index: d.index,
                        energy_j: r.energy_mj as f64 / 1e3,
                        power_w: f64::from(r.power_mw) / 1e3,
                        power_limit_w: f64::from(r.power_limit_mw) / 1e3,
                        clock_s,
                        engine_tokens: None,
                        utilization: r.utilization_pct.map(|p| f64::from(p) / 100.0),
                        temperature_c: r.temperature_c.map(f64::from),
                    },
                    r,
                ))
            })
            .collect()
    }
}

impl DeviceBackend for NvmlDevices {
    fn devices(&self) -> Vec<DeviceInfo> {
        self.info.clone()
    }

    fn read(&self) -> BoxFuture<'_, Result<Vec<DeviceReading>, DeviceError>> {
        Box::pin(async move {
            // NVML calls block for up to milliseconds each: off the async threads.
            let me = NvmlDevices {
                source: self.source.clone(),
                info: self.info.clone(),
            };
            tokio::task::spawn_blocking(move || me.read_now())
                .await
                .map_err(|e| DeviceError::Read {
                    source_name: "NVML".into(),
                    cause: e.to_string(),
                })?
                .map(|r| r.into_iter().map(|(d, _)| d).collect())
        })
    }

    fn set_power_limit(&self, index: u32, watts: f64) -> BoxFuture<'_, Result<f64, DeviceError>> {
        Box::pin(async move {
            let d = self
                .info
                .iter()
                .find(|d| d.index == index)
                .ok_or(DeviceError::NoSuchDevice { index })?;
            let w = watts.clamp(d.power_limit_min_w, d.power_limit_max_w);
            let mw = (w * 1e3).round() as u32;
            let source = self.source.clone();
            tokio::task::spawn_blocking(move || source.set_power_limit_mw(index, mw))
                .await
                .map_err(|e| DeviceError::PowerLimit {
                    index,
                    cause: e.to_string(),
                })?
                .map_err(|cause| DeviceError::PowerLimit { index, cause })?;
            Ok(f64::from(mw) / 1e3)
        })
    }
}

/// The real source: NVML, loaded from the driver at run time.
pub struct Nvml {
    nvml: nvml_wrapper::Nvml,
}

impl Nvml {
    /// Loads and initialises NVML, or says why it cannot and what to do.
    pub fn open() -> Result<Nvml, DeviceError> {
        use nvml_wrapper::error::NvmlError;
        nvml_wrapper::Nvml::init().map(|nvml| Nvml { nvml }).map_err(|e| {
            let hint = match &e {
                NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => {
                    "the NVIDIA driver's NVML library (libnvidia-ml.so.1) is not on this machine or not visible to the agent. On a GPU node, install the NVIDIA driver (in Kubernetes: run the agent with the NVIDIA runtime class, or mount the driver). Without NVIDIA GPUs, use --devices emulated (tokenfab engine emulators) or --devices none"
                }
                NvmlError::DriverNotLoaded => {
                    "the NVIDIA kernel driver is not loaded (`nvidia-smi` will say the same): load it, or use --devices none"
                }
                NvmlError::NoPermission => {
                    "NVML refused access: run the agent as a user allowed to open /dev/nvidia* (in a container: with the NVIDIA runtime)"
                }
                _ => "see `nvidia-smi` for the driver's state",
            };
            DeviceError::Read {
                source_name: "NVML".into(),
                cause: format!("{e}. {hint}"),
            }
        })
    }
}

impl GpuSource for Nvml {
    fn count(&self) -> Result<u32, String> {
        self.nvml.device_count().map_err(|e| e.to_string())
    }

    fn describe(&self, index: u32) -> Result<GpuStatic, String> {
        let d = self.nvml.device_by_index(index).map_err(|e| e.to_string())?;
        let s = |e: nvml_wrapper::error::NvmlError| e.to_string();
        let limits = d.power_management_limit_constraints().map_err(s)?;
        let mut nvlink_peers = Vec::new();
        // NVML_NVLINK_MAX_LINKS (nvml.h) is 18.
        for link in 0..18 {
            let l = d.link_wrapper_for(link);
            // Links that do not exist answer with an error: the end of the list.
            match l.is_active() {
                Ok(true) => {
                    if let Ok(pci) = l.remote_pci_info() {
                        nvlink_peers.push(pci.bus_id);
                    }
                }
                Ok(false) => {}
                Err(_) => break,
            }
        }
        Ok(GpuStatic {
            name: d.name().map_err(s)?,
            uuid: d.uuid().map_err(s)?,
            memory_bytes: d.memory_info().map_err(s)?.total,
            pci_bus_id: d.pci_info().map_err(s)?.bus_id,
            nvlink_peers,
            power_limit_min_mw: limits.min_limit,
            power_limit_max_mw: limits.max_limit,
            power_limit_mw: d.power_management_limit().map_err(s)?,
        })
    }

    fn read(&self, index: u32) -> Result<GpuReading, String> {
        let d = self.nvml.device_by_index(index).map_err(|e| e.to_string())?;
        let s = |e: nvml_wrapper::error::NvmlError| e.to_string();
        Ok(GpuReading {
            energy_mj: d.total_energy_consumption().map_err(s)?,
            power_mw: d.power_usage().map_err(s)?,
            power_limit_mw: d.enforced_power_limit().map_err(s)?,
            utilization_pct: d.utilization_rates().ok().map(|u| u.gpu),
            temperature_c: d
                .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                .ok(),
        })
    }

    fn set_power_limit_mw(&self, index: u32, milliwatts: u32) -> Result<(), String> {
        let mut d = self.nvml.device_by_index(index).map_err(|e| e.to_string())?;
        d.set_power_management_limit(milliwatts).map_err(|e| match e {
            nvml_wrapper::error::NvmlError::NoPermission => {
                "NVML refused (setting power limits needs root, or the agent's user allowed to by the administrator); run the agent with --no-power-tuning to leave limits alone".to_string()
            }
            other => other.to_string(),
        })
    }

    fn driver(&self) -> String {
        self.nvml
            .sys_driver_version()
            .unwrap_or_else(|e| format!("unknown version: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A fake node: GPUs with fixed descriptions and counters that advance on each read.
    struct Fake {
        gpus: Vec<GpuStatic>,
        energy_mj: Mutex<Vec<u64>>,
        limits_mw: Mutex<Vec<u32>>,
        refuse_limits: bool,
    }

    fn h100(i: u32, peers: &[&str]) -> GpuStatic {
        GpuStatic {
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: format!("GPU-{i:04}"),
            memory_bytes: 85_520_809_984,
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + i),
            nvlink_peers: peers.iter().map(|p| p.to_string()).collect(),
            power_limit_min_mw: 200_000,
            power_limit_max_mw: 700_000,
            power_limit_mw: 700_000,
        }
    }

    impl Fake {
        fn new(gpus: Vec<GpuStatic>) -> Fake {
            let n = gpus.len();
            Fake {
                limits_mw: Mutex::new(gpus.iter().map(|g| g.power_limit_mw).collect()),
                gpus,
                energy_mj: Mutex::new(vec![5_000_000; n]),
                refuse_limits: false,
            }
        }
    }

    impl GpuSource for Fake {
        fn count(&self) -> Result<u32, String> {
            Ok(self.gpus.len() as u32)
        }
        fn describe(&self, index: u32) -> Result<GpuStatic, String> {
            self.gpus
                .get(index as usize)
                .cloned()
                .ok_or_else(|| "no such GPU".into())
        }
        fn read(&self, index: u32) -> Result<GpuReading, String> {
            let mut e = self.energy_mj.lock().unwrap();
            e[index as usize] += 350_000;
            Ok(GpuReading {
                energy_mj: e[index as usize],
                power_mw: 350_250,
                power_limit_mw: self.limits_mw.lock().unwrap()[index as usize],
                utilization_pct: Some(97),
                temperature_c: Some(61),
            })
        }
        fn set_power_limit_mw(&self, index: u32, milliwatts: u32) -> Result<(), String> {
            if self.refuse_limits {
                return Err("Insufficient Permissions".into());
            }
            self.limits_mw.lock().unwrap()[index as usize] = milliwatts;
            Ok(())
        }
        fn driver(&self) -> String {
            "fake 580.00".into()
        }
    }

    #[test]
    fn nvlink_peers_and_switches_make_domains() {
        // GPUs 0 and 1 linked directly; 2 and 3 each to the same NVSwitch; 4 alone.
        let mut g = vec![
            h100(0, &["00000000:19:00.0"]),
            h100(1, &["00000000:18:00.0"]),
            h100(2, &["00000000:A0:00.0"]),
            h100(3, &["00000000:a0:00.0"]),
            h100(4, &[]),
        ];
        assert_eq!(domains(&g), vec![0, 0, 2, 2, 4]);
        g[4].nvlink_peers.push("00000000:1A:00.0".into()); // to GPU 2's bus id
        assert_eq!(domains(&g), vec![0, 0, 2, 2, 2]);
    }

    #[tokio::test]
    async fn readings_are_converted_to_joules_and_watts() {
        let fake = Arc::new(Fake::new(vec![
            h100(0, &["00000000:19:00.0"]),
            h100(1, &["00000000:18:00.0"]),
        ]));
        let d = NvmlDevices::with_source(fake, None).unwrap();
        let info = d.devices();
        assert_eq!(info.len(), 2);
        assert_eq!(info[0].accelerator, AcceleratorId::new("h100-sxm"));
        assert_eq!((info[0].domain, info[1].domain), (0, 0));
        assert_eq!(
            (
                info[0].power_limit_min_w,
                info[0].power_limit_max_w,
                info[0].power_limit_w
            ),
            (200.0, 700.0, 700.0)
        );
        assert!(!info[0].emulated);
        let a = d.read().await.unwrap();
        let b = d.read().await.unwrap();
        assert_eq!(a[0].power_w, 350.25);
        assert_eq!(a[0].energy_j, 5_350.0);
        assert_eq!(b[0].energy_j - a[0].energy_j, 350.0);
        assert_eq!(a[1].engine_tokens, None);
    }

    #[tokio::test]
    async fn power_limits_are_clamped_to_the_device_range_and_refusals_say_why() {
        let fake = Arc::new(Fake::new(vec![h100(0, &[])]));
        let d = NvmlDevices::with_source(fake.clone(), None).unwrap();
        assert_eq!(d.set_power_limit(0, 150.0).await.unwrap(), 200.0);
        assert_eq!(fake.limits_mw.lock().unwrap()[0], 200_000);
        assert_eq!(d.set_power_limit(0, 452.4).await.unwrap(), 452.4);
        assert!(matches!(
            d.set_power_limit(3, 300.0).await,
            Err(DeviceError::NoSuchDevice { index: 3 })
        ));
        let mut refusing = Fake::new(vec![h100(0, &[])]);
        refusing.refuse_limits = true;
        let d = NvmlDevices::with_source(Arc::new(refusing), None).unwrap();
        let e = d.set_power_limit(0, 300.0).await.unwrap_err().to_string();
        assert!(e.contains("device 0") && e.contains("Insufficient Permissions"), "{e}");
    }

    #[test]
    fn an_unknown_product_needs_an_accelerator_class_and_no_gpu_is_an_error() {
        let mut g = h100(0, &[]);
        g.name = "NVIDIA GeForce RTX 4090".into();
        let e = NvmlDevices::with_source(Arc::new(Fake::new(vec![g.clone()])), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("RTX 4090") && e.contains("--accelerator"), "{e}");
        let d = NvmlDevices::with_source(Arc::new(Fake::new(vec![g])), Some(&AcceleratorId::new("l40s"))).unwrap();
        assert_eq!(d.devices()[0].accelerator, AcceleratorId::new("l40s"));
        let e = NvmlDevices::with_source(Arc::new(Fake::new(Vec::new())), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no GPU") && e.contains("nvidia-smi"), "{e}");
    }

    #[test]
    fn without_a_driver_opening_says_so_and_what_to_use() {
        // This machine has no NVIDIA driver; on a GPU machine NVML opens and this checks
        // nothing.
        match Nvml::open() {
            Ok(_) => eprintln!("NVML opened: a driver is present"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("NVML") && e.contains("--devices"), "{e}");
            }
        }
    }
}
