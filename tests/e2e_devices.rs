//! The agent's NVML device backend on a machine without an NVIDIA driver (this project's
//! CI machines have none; no GPU can be mocked at the driver level here): `tokenfab agent
//! --devices nvml` and `tokenfab devices` must stop with a message that says what is
//! missing and what to use instead, and never panic. On a machine with a driver, NVML
//! opens and this test says so and checks nothing; tests/gpu/check-nvml.sh is the check
//! for such machines.

mod common;

use common::*;
use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(args)
        .env("TOKENFAB_AGENT_TOKEN", "agent-secret-of-the-tests")
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn without_an_nvidia_driver_the_nvml_backend_says_what_is_missing_and_what_to_use() {
    let (code, out) = run(&["devices", "--samples", "1"]);
    if code == Some(0) {
        eprintln!("SKIPPED: this machine has an NVIDIA driver; NVML opened:\n{out}");
        return;
    }
    for (what, (code, out)) in [
        ("tokenfab devices", (code, out)),
        (
            "tokenfab agent --devices nvml",
            run(&[
                "agent",
                "--node",
                "n1",
                "--devices",
                "nvml",
                "--replica",
                "url=http://127.0.0.1:9,model=llama-3.1-8b",
            ]),
        ),
    ] {
        assert_eq!(code, Some(1), "{what} should fail cleanly:\n{out}");
        assert!(!out.contains("panicked"), "{what} panicked:\n{out}");
        assert!(
            out.contains("libnvidia-ml.so.1") && out.contains("NVIDIA driver"),
            "{what} should name what is missing:\n{out}"
        );
        assert!(
            out.contains("--devices emulated") && out.contains("--devices none"),
            "{what} should say what to use instead:\n{out}"
        );
    }
    // gpus= without NVML devices is refused before anything starts.
    let (code, out) = run(&[
        "agent",
        "--node",
        "n1",
        "--devices",
        "none",
        "--replica",
        "url=http://127.0.0.1:9,model=llama-3.1-8b,gpus=0-1",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("gpus=") && out.contains("--devices nvml"), "{out}");
}
