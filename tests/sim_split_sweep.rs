//! A sweep split into parts, as a Kubernetes Indexed Job runs it (the chart's `sweep`
//! Job: one configuration per index, JOB_COMPLETION_INDEX set by Kubernetes, then a
//! gathering step), gives the same sweep.json as the sweep run whole.

mod common;

use common::*;
use std::process::Command;

fn tokenfab(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut c = Command::new(bin());
    c.args(args).env_remove("JOB_COMPLETION_INDEX");
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "tokenfab {args:?} failed:\n{text}");
    text
}

#[test]
fn a_sweep_run_one_configuration_per_index_then_gathered_equals_the_whole_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("s.yaml");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../simulations/single-h100-node.yaml"
    ))
    .unwrap();
    let short: String = text
        .lines()
        .map(|l| if l.starts_with("duration:") { "duration: 10m" } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&scenario, short).unwrap();
    let s = scenario.to_str().unwrap();
    let vary = ["--vary", "policies.window=64,256", "--vary", "pools[0].nodes=1,2"];
    let parts = dir.path().join("parts");
    let whole = dir.path().join("whole");
    // Indexes out of order, as a Job's pods finish.
    for i in ["3", "0", "2", "1"] {
        let mut args = vec!["sim", "sweep", s];
        args.extend(vary);
        args.extend(["--out", parts.to_str().unwrap()]);
        let out = tokenfab(&args, &[("JOB_COMPLETION_INDEX", i)]);
        assert!(out.contains(&format!("configuration {i} of 4")), "{out}");
    }
    let gathered = tokenfab(&["sim", "gather", parts.to_str().unwrap()], &[]);
    assert!(
        gathered.contains("cheapest configuration meeting the SLA"),
        "{gathered}"
    );
    let mut args = vec!["sim", "sweep", s];
    args.extend(vary);
    args.extend(["--out", whole.to_str().unwrap()]);
    tokenfab(&args, &[]);
    let read = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("sweep.json")).unwrap()).unwrap()
    };
    assert_eq!(read(&parts), read(&whole));
    assert_eq!(read(&parts)["rows"].as_array().unwrap().len(), 4);
}
