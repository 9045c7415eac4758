//! The `tokenfab-operator` binary as a real process, pointed at a Kubernetes API that does
//! not answer (no API server can run here): its health endpoints say it is starting and
//! not ready, it says in its log what it waits for, and SIGTERM (how Kubernetes stops a
//! pod) stops it at once.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get(url: &str) -> Option<(u16, String)> {
    let r = reqwest::get(url).await.ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.ok()?))
}

#[tokio::test]
async fn with_an_unreachable_api_it_is_alive_but_not_ready_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let api = free_port();
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{api}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n    namespace: tokenfab\ncurrent-context: c\nusers:\n- name: u\n  user:\n    token: t\n"
        ),
    )
    .unwrap();
    let health = free_port();
    let log = dir.path().join("operator.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenfab-operator"))
        .args([
            "run",
            "--control-url",
            "http://127.0.0.1:9",
            "--health-listen",
            &format!("127.0.0.1:{health}"),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("TOKENFAB_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{health}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let alive = loop {
        if let Some(r) = get(&format!("{base}/healthz")).await {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no /healthz:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(alive, (200, "ok: starting\n".to_string()));
    let (code, text) = get(&format!("{base}/readyz")).await.unwrap();
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("waiting for the first node list"), "{text}");

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("watching nodes failed"), "it says why it waits:\n{text}");
}
