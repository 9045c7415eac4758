//! `tokenfab demo` end to end (the real binary, emulated GPUs in its own process): it runs
//! the batch held at its starting point and again with the tuner active, shows the
//! tuner's moves, what they bought and the published SLA.

mod common;

use std::process::Command;

/// The two figures (start, tuned) of a row of the comparison table.
fn row(out: &str, name: &str) -> (f64, f64) {
    let table = &out[out.find("What the tuner bought").expect("the comparison")..];
    let line = table
        .lines()
        .find(|l| l.contains(name))
        .unwrap_or_else(|| panic!("no row '{name}' in:\n{out}"));
    let cells: Vec<f64> = line
        .split('┆')
        .skip(1)
        .take(2)
        .map(|c| {
            c.trim_matches(|c: char| c.is_whitespace() || c == '│')
                .trim_end_matches(" s")
                .parse()
                .unwrap_or_else(|e| panic!("{line}: {e}"))
        })
        .collect();
    (cells[0], cells[1])
}

#[test]
fn the_demo_shows_the_tuner_moving_what_it_bought_and_the_sla() {
    let out = Command::new(common::bin())
        .args([
            "demo",
            "--nodes",
            "1",
            "--gpus-per-node",
            "2",
            "--requests",
            "1000",
            "--time-scale",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The moves as they happen, with their reasons.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("tuner: ") && l.contains(" -> window ")),
        "{stderr}"
    );
    // Both runs publish their SLA.
    assert_eq!(stdout.matches("ThroughputSLA over the last").count(), 2, "{stdout}");
    // What the tuner bought: on the model's emulated devices, more tokens per joule than
    // the starting point (its objective), paid for in throughput.
    assert!(stdout.contains("What the tuner bought"), "{stdout}");
    let (start, tuned) = row(&stdout, "output tokens/J (attributed)");
    assert!(tuned > start * 1.1, "{start} -> {tuned}\n{stdout}");
    let (start_tps, tuned_tps) = row(&stdout, "output tokens/s");
    assert!(start_tps > 0.0 && tuned_tps > 0.0, "{stdout}");
    assert!(stdout.contains("window 128 at full power"), "{stdout}");
}
