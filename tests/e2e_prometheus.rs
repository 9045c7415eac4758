//! Prometheus done by the book, end to end with real processes on loopback: a control
//! plane, an agent and an engine emulator, scraped by a real Prometheus (Debian's
//! `prometheus` package) that also evaluates tokenfab's alert rules.
//!
//! It checks that:
//! - each of the three `/metrics` expositions passes `promtool check metrics` (help text on
//!   every family, counters named `_total`, ...);
//! - Prometheus scrapes all three and the values it stores are the batch's true figures
//!   (results recorded, engine calls, the tenant's output tokens, which the control plane
//!   and the agent count independently);
//! - the alert rules in `deploy/prometheus/` pass `promtool check rules` and their unit
//!   tests (`promtool test rules`), and Prometheus evaluates every one of them against the
//!   live metrics without error;
//! - every query of the Grafana dashboard in `deploy/grafana/` names metrics the control
//!   plane or the agent expose, and Prometheus accepts it.
//!
//! `scripts/setup-test-deps.sh` installs Prometheus with apt-get and sets
//! TOKENFAB_REQUIRE_PROMETHEUS=1, so in CI this test cannot skip. Run alone without
//! Prometheus installed, it says it skipped and why.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TENANT: &str = "acme-token-for-prometheus";
const AGENT: &str = "agent-secret-of-the-tests";
/// Enough work at window 4 on an emulated H100 at 2x time (about 20 s) for the control
/// plane's online recalibration to report its model error (two 5 s intervals), so that
/// every series the dashboard shows exists.
const REQUESTS: usize = 300;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `prometheus` and `promtool`, or `None` (skip) when they are not installed and not
/// required.
fn prometheus_tools() -> Option<(PathBuf, PathBuf)> {
    let find = |name: &str| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    };
    match (find("prometheus"), find("promtool")) {
        (Some(p), Some(t)) => Some((p, t)),
        other => {
            assert!(
                std::env::var("TOKENFAB_REQUIRE_PROMETHEUS").as_deref() != Ok("1"),
                "TOKENFAB_REQUIRE_PROMETHEUS=1 but prometheus or promtool is not on PATH ({other:?}); run scripts/setup-test-deps.sh (apt-get install prometheus)"
            );
            eprintln!("SKIPPED: prometheus and promtool are not installed (scripts/setup-test-deps.sh installs them)");
            None
        }
    }
}

/// A Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    log: PathBuf,
    url: String,
}

impl Prometheus {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `promtool ARGS` (optionally with `stdin`), returning its exit status and output.
fn promtool(tool: &Path, args: &[&str], stdin: Option<&str>, dir: &Path) -> (bool, String) {
    let mut child = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
    if let Some(text) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// An instant query; returns each series' labels and value.
async fn query(prom: &str, q: &str) -> Result<Vec<(serde_json::Value, f64)>, String> {
    let url =
        reqwest::Url::parse_with_params(&format!("{prom}/api/v1/query"), &[("query", q)]).map_err(|e| e.to_string())?;
    let resp = reqwest::get(url).await.map_err(|e| e.to_string())?;
    let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    if v["status"] != "success" {
        return Err(format!("{q}: {v}"));
    }
    Ok(v["data"]["result"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    let value = r["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
                    (r["metric"].clone(), value)
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Waits until `q` returns one series whose value satisfies `ok`; returns the value.
async fn wait_value(prom: &Prometheus, q: &str, within: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + within;
    let mut last: Result<Vec<(serde_json::Value, f64)>, String> = Err(String::from("not queried yet"));
    loop {
        if let Ok(rs) = &last
            && let [(_, v)] = rs.as_slice()
            && ok(*v)
        {
            return *v;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus: `{q}` gave {last:?} after {within:?}\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        last = query(&prom.url, q).await;
    }
}

/// The metric names a PromQL expression uses: words starting with `tokenfab_`, with a
/// histogram's `_bucket`, `_sum` or `_count` taken back to its family.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("tokenfab_"))
        .map(String::from)
        .collect()
}

/// Names of `expr` that no exposition in `families` (the `# TYPE` names of the classic
/// format, where counters already carry `_total`) defines.
fn unknown_names(expr: &str, families: &BTreeSet<String>) -> Vec<String> {
    metric_names(expr)
        .into_iter()
        .filter(|n| {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s).filter(|f| families.contains(*f)))
                .unwrap_or(n);
            !families.contains(family)
        })
        .collect()
}

fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

#[test]
fn the_dashboard_check_catches_a_misnamed_metric() {
    let fams: BTreeSet<String> = [
        "tokenfab_control_results_recorded_total",
        "tokenfab_agent_engine_request_duration_seconds",
    ]
    .map(String::from)
    .into();
    assert!(unknown_names("sum(rate(tokenfab_control_results_recorded_total[5m]))", &fams).is_empty());
    assert!(
        unknown_names(
            "histogram_quantile(0.9, sum by (le) (rate(tokenfab_agent_engine_request_duration_seconds_bucket[5m])))",
            &fams
        )
        .is_empty()
    );
    // The OpenMetrics family name without `_total` is not what Prometheus stores.
    assert_eq!(
        unknown_names("rate(tokenfab_control_results_recorded[5m])", &fams),
        vec!["tokenfab_control_results_recorded".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_control_plane_agent_and_engine_and_the_rules_and_dashboard_hold() {
    let Some((prometheus_bin, promtool_bin)) = prometheus_tools() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rules_dir = repo().join("deploy/prometheus");

    // The alert rules: lint and unit tests.
    let (ok, out) = promtool(
        &promtool_bin,
        &["check", "rules", "tokenfab-rules.yaml"],
        None,
        &rules_dir,
    );
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(
        &promtool_bin,
        &["test", "rules", "tokenfab-rules.test.yaml"],
        None,
        &rules_dir,
    );
    assert!(ok && out.contains("SUCCESS"), "promtool test rules:\n{out}");

    // A control plane, an engine emulator (an emulated H100 at 2x time) and an agent,
    // each serving /metrics.
    let http_port = free_port();
    let agent_port = free_port();
    let http = format!("127.0.0.1:{http_port}");
    let (mut server, addr) = start_server(
        dir.path(),
        &["--tenant", &format!("acme={TENANT}"), "--metrics-listen", &http],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    wait_tcp(http.parse().unwrap(), Duration::from_secs(20), &mut [&mut server]);
    let (emu, engine) = spawn_emu(dir.path(), "emu", 2.0);
    let control = format!("http://{addr}");
    let agent_http = format!("127.0.0.1:{agent_port}");
    let mut agent = Proc::spawn(
        "agent-n1",
        dir.path(),
        &[
            "agent",
            "--control",
            &control,
            "--node",
            "n1",
            "--replica",
            &format!("url={engine},model=llama-3.1-8b,window=4"),
            "--metrics-listen",
            &agent_http,
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    wait_tcp(agent_http.parse().unwrap(), Duration::from_secs(20), &mut [&mut agent]);
    let procs = [server, emu, agent];
    wait_registered(&procs, Duration::from_secs(20)).await;
    assert!(
        http_text(&format!("http://{agent_http}/readyz"))
            .await
            .starts_with("ready"),
        "the agent's /readyz"
    );

    // A real Prometheus scraping all three every second, with the alert rules loaded.
    let prom_port = free_port();
    let config = dir.path().join("prometheus.yml");
    let emu_target = engine.trim_start_matches("http://");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n\
             \x20 - job_name: tokenfab-server\n    static_configs:\n      - targets: ['{http}']\n\
             \x20 - job_name: tokenfab-agent\n    static_configs:\n      - targets: ['{agent_http}']\n\
             \x20 - job_name: tokenfab-engine-emu\n    static_configs:\n      - targets: ['{emu_target}']\n",
            rules = rules_dir.join("tokenfab-rules.yaml").display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("prometheus.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(&prometheus_bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", prometheus_bin.display()));
    let prom = Prometheus {
        child,
        log,
        url: format!("http://127.0.0.1:{prom_port}"),
    };

    // Every target is up.
    for job in ["tokenfab-server", "tokenfab-agent", "tokenfab-engine-emu"] {
        wait_value(&prom, &format!("up{{job=\"{job}\"}}"), Duration::from_secs(30), |v| {
            v == 1.0
        })
        .await;
    }

    // A batch runs to completion.
    let id = create(addr, TENANT, chat_batch("prom", REQUESTS, 64)).await;
    let done = wait_completed(addr, TENANT, &id, Duration::from_secs(120), &procs).await;
    assert_eq!(counts(&done).completed as usize, REQUESTS, "{done:?}");
    let tokens: u64 = done.usage.as_ref().map_or(0, |u| u.completion_tokens);
    assert!(tokens > 0, "{done:?}");

    // What Prometheus stored is the batch's true figures, counted by the control plane
    // and by the agent independently.
    let n = REQUESTS as f64;
    let within = Duration::from_secs(30);
    wait_value(&prom, "tokenfab_control_results_recorded_total", within, |v| v == n).await;
    wait_value(&prom, "sum(tokenfab_agent_replica_requests_total)", within, |v| v == n).await;
    wait_value(&prom, "tokenfab_control_batches_submitted_total", within, |v| v == 1.0).await;
    let t = tokens as f64;
    wait_value(
        &prom,
        "tokenfab_control_tenant_output_tokens_total{tenant=\"acme\"}",
        within,
        |v| v == t,
    )
    .await;
    wait_value(&prom, "sum(tokenfab_agent_replica_output_tokens_total)", within, |v| {
        v == t
    })
    .await;
    wait_value(&prom, "sum(tokenfab_emu_completion_tokens_total)", within, |v| v >= t).await;
    // The devices' energy and the engine latency histogram.
    wait_value(&prom, "sum(tokenfab_agent_device_energy_joules_total)", within, |v| {
        v > 0.0
    })
    .await;
    let p50 = wait_value(
        &prom,
        "histogram_quantile(0.5, sum by (le) (tokenfab_agent_engine_request_duration_seconds_bucket))",
        within,
        f64::is_finite,
    )
    .await;
    assert!(p50 > 0.0, "median engine call {p50} s");

    // Every alert rule is loaded and was evaluated against the live metrics without error.
    let in_file = std::fs::read_to_string(rules_dir.join("tokenfab-rules.yaml"))
        .unwrap()
        .matches("- alert:")
        .count();
    assert!(in_file >= 10, "{in_file} alert rules");
    let deadline = Instant::now() + within;
    loop {
        let rules: serde_json::Value = reqwest::get(format!("{}/api/v1/rules", prom.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let all: Vec<&serde_json::Value> = rules["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .collect();
        assert_eq!(all.len(), in_file, "{rules}");
        let bad: Vec<String> = all
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if bad.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "rules not evaluated cleanly: {bad:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Nothing is wrong in this cluster: no alert fires.
    let firing = query(&prom.url, "ALERTS{alertstate=\"firing\"}").await.unwrap();
    assert!(firing.is_empty(), "alerts firing on a healthy cluster: {firing:?}");

    // Each exposition, as a plain scraper (curl, promtool) gets it, passes promtool.
    let mut known = BTreeSet::new();
    for (what, url) in [
        ("control plane", format!("http://{http}/metrics")),
        ("agent", format!("http://{agent_http}/metrics")),
        ("engine emulator", format!("{engine}/metrics")),
    ] {
        let text = http_text(&url).await;
        let (ok, out) = promtool(&promtool_bin, &["check", "metrics"], Some(&text), dir.path());
        assert!(
            ok && out.trim().is_empty(),
            "promtool check metrics on the {what}'s {url}:\n{out}\n--- exposition:\n{text}"
        );
        if what != "engine emulator" {
            known.extend(families(&text));
        }
    }

    // The Grafana dashboard: every query names metrics that exist, and Prometheus runs it.
    // (A labelled family appears in an exposition once it has a series.)
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/tokenfab-dashboard.json")).unwrap())
            .expect("deploy/grafana/tokenfab-dashboard.json is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    for e in &exprs {
        let unknown = unknown_names(e, &known);
        assert!(
            unknown.is_empty(),
            "dashboard query `{e}` names unknown metrics {unknown:?}"
        );
        assert!(
            !metric_names(e).is_empty(),
            "dashboard query `{e}` names no tokenfab metric"
        );
        if let Err(err) = query(&prom.url, e).await {
            panic!("Prometheus refused the dashboard query `{e}`: {err}");
        }
    }
}
