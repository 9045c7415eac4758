//! Simulator speed, single-threaded: `cargo bench -p tokenfab-sim --bench speed`.
//!
//! Runs the shipped 64-device scenario (`simulations/mixed-fleet-diurnal.yaml`, 24 h),
//! an online-style trace of one-request batches on 64 replicas
//! (`simulations/online-one-request-batches.yaml`, about 1,000,000 requests) and the
//! 1,024-device day (`simulations/large-fleet-day.yaml`) on one thread and prints, for
//! each, simulated requests and device-hours per wall second, events per second and the
//! process's peak resident memory so far (the peak of all runs up to that row). `--quick`
//! runs only the first; `--only NAME` runs the scenario whose file name contains NAME.
//! Profile with e.g. `perf record -g target/release/tokenfab sim SCENARIO --no-plots`.

use std::path::Path;
use std::time::Instant;

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../simulations");
    let mut scenarios = vec!["mixed-fleet-diurnal.yaml"];
    if !quick {
        scenarios.push("online-one-request-batches.yaml");
        scenarios.push("large-fleet-day.yaml");
    }
    if let Some(only) = only {
        scenarios = [
            "mixed-fleet-diurnal.yaml",
            "online-one-request-batches.yaml",
            "large-fleet-day.yaml",
        ]
        .into_iter()
        .filter(|s| s.contains(only.as_str()))
        .collect();
    }
    println!(
        "{:<26} {:>8} {:>10} {:>12} {:>9} {:>14} {:>15} {:>13} {:>9}",
        "scenario", "devices", "sim hours", "requests", "wall s", "requests/s", "device-h/s", "events/s", "peak MiB"
    );
    for name in scenarios {
        let (s, base) = tokenfab_sim::Scenario::load(&root.join(name)).unwrap_or_else(|e| panic!("{e}"));
        let devices: u32 = s.pools.iter().map(|p| p.nodes * p.devices_per_node).sum();
        let t = Instant::now();
        // Batch records streamed to disk, as `tokenfab sim` does.
        let records = tokenfab_sim::BatchRecords::Csv(std::env::temp_dir().join("tokenfab-speed-batches.csv"));
        let r = tokenfab_sim::run_with(&s, &base, s.seed, &records, |_| {}).unwrap_or_else(|e| panic!("{e}"));
        let wall = t.elapsed().as_secs_f64();
        let device_hours = f64::from(devices) * r.simulated_s / 3600.0;
        println!(
            "{:<26} {:>8} {:>10.1} {:>12} {:>9.2} {:>14.0} {:>15.1} {:>13.0} {:>9.0}",
            s.name,
            devices,
            r.simulated_s / 3600.0,
            r.requests.arrived,
            wall,
            r.requests.arrived as f64 / wall,
            device_hours / wall,
            r.events as f64 / wall,
            peak_rss_mib().unwrap_or(f64::NAN)
        );
    }
}
