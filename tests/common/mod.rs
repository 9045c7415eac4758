//! Helpers for end-to-end tests: real `tokenfab` processes on loopback, killed when the
//! test ends (pass or fail), with their logs kept for failure messages.

#![allow(dead_code)]

pub mod failover;
pub mod history;
pub mod netns;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;
use tokenfab_proto::v1::batch_service_client::BatchServiceClient;
use tonic::transport::Channel;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tokenfab")
}

/// A free loopback port (bound then released; fine on loopback for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process that is killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        Proc::spawn_in(name, dir, &[], args, envs)
    }

    /// `tokenfab ARGS` run through `wrapper` (e.g. `ip netns exec NS`), when not empty.
    pub fn spawn_in(name: &str, dir: &Path, wrapper: &[&str], args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            None => Command::new(bin()),
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin());
                c
            }
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        cmd.env("TOKENFAB_LOG", "info");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.into(),
            child,
            log,
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    /// SIGTERM (a graceful stop), then waits up to `within` for the process to exit.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?} of SIGTERM:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_tcp(addr: SocketAddr, within: Duration, procs: &mut [&mut Proc]) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        for p in procs.iter_mut() {
            if let Some(status) = p.exited() {
                panic!("{} exited ({status}) before listening on {addr}:\n{}", p.name, p.log());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listening on {addr} after {within:?}");
}

/// Starts a control plane on a free loopback port with its state in `dir/data`, the
/// tenants and flags in `args` and the environment in `envs` (the agent token), and waits
/// until it listens. Returns the process and its gRPC address.
pub fn start_server(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> (Proc, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let data = dir.join("data");
    let listen = addr.to_string();
    let mut all = vec!["server", "--listen", &listen, "--data-dir", data.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut server = Proc::spawn("server", dir, &all, envs);
    wait_tcp(addr, Duration::from_secs(20), &mut [&mut server]);
    (server, addr)
}

pub async fn tenant_client(
    addr: SocketAddr,
    token: &str,
) -> BatchServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor + Clone>,
> {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    BatchServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", value.clone());
        Ok(req)
    })
    .max_decoding_message_size(64 << 20)
}

/// Polls batch `id` (as the tenant with `token`) until it is final and asserts that it
/// completed; panics after `within` with its counts and the logs of `procs`.
pub async fn wait_completed(addr: SocketAddr, token: &str, id: &str, within: Duration, procs: &[Proc]) -> pb::Batch {
    let mut client = tenant_client(addr, token).await;
    let deadline = Instant::now() + within;
    loop {
        // UNAVAILABLE: a replica that may not answer now (a leader renewing its lease);
        // clients retry.
        let b = match client.get_batch(pb::GetBatchRequest { batch_id: id.into() }).await {
            Ok(b) => b.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(s) => panic!("batch {id}: {s}"),
        };
        if is_final(&b) {
            assert_eq!(b.status, pb::BatchStatus::Completed as i32, "{b:?}");
            return b;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| format!("--- {}\n{}", p.name, p.log())).collect();
            panic!(
                "batch {id} not done after {within:?}: {:?}\n{}",
                b.request_counts,
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn counts(b: &pb::Batch) -> pb::RequestCounts {
    b.request_counts.unwrap_or_default()
}

pub fn chat_line(id: &str, max_tokens: u32) -> String {
    format!(
        r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"llama-3.1-8b","messages":[{{"role":"user","content":"request {id}"}}],"max_tokens":{max_tokens}}}}}"#
    )
}

/// A batch of `n` chat requests (`PREFIX0`, `PREFIX1`, ...) asking `max_tokens` each, on
/// llama-3.1-8b with the server's defaults.
pub fn chat_batch(prefix: &str, n: usize, max_tokens: u32) -> pb::CreateBatchRequest {
    pb::CreateBatchRequest {
        options: Some(pb::BatchOptions {
            model: "llama-3.1-8b".into(),
            ..Default::default()
        }),
        input_jsonl: (0..n)
            .map(|i| chat_line(&format!("{prefix}{i}"), max_tokens))
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes()
            .into(),
    }
}

/// Creates a batch as `token`'s tenant; its id.
pub async fn create(addr: SocketAddr, token: &str, req: pb::CreateBatchRequest) -> String {
    tenant_client(addr, token)
        .await
        .create_batch(req)
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .id
}

/// Every result of a batch of one kind, as `StreamResults` sends them.
pub async fn all_results(addr: SocketAddr, token: &str, id: &str, kind: pb::ResultKind) -> Vec<pb::ResultRecord> {
    let mut c = tenant_client(addr, token).await;
    // UNAVAILABLE (a replica renewing its lease) is retried for up to 10 s, as a client does.
    let deadline = Instant::now() + Duration::from_secs(10);
    'again: loop {
        let request = pb::StreamResultsRequest {
            batch_id: id.into(),
            kind: kind as i32,
        };
        let mut s = match c.stream_results(request).await {
            Ok(s) => s.into_inner(),
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => panic!("results of {id}: {e}"),
        };
        let mut out = Vec::new();
        loop {
            match s.message().await {
                Ok(Some(r)) => out.push(r),
                Ok(None) => return out,
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'again;
                }
                Err(e) => panic!("results of {id}: {e}"),
            }
        }
    }
}

/// Runs `tokenfab ARGS` to completion; returns stdout, panicking with stderr on failure.
pub fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "tokenfab {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// True once a batch can no longer change.
pub fn is_final(b: &pb::Batch) -> bool {
    matches!(
        pb::BatchStatus::try_from(b.status),
        Ok(pb::BatchStatus::Completed
            | pb::BatchStatus::Failed
            | pb::BatchStatus::Expired
            | pb::BatchStatus::Cancelled)
    )
}

/// The value of an unlabelled metric in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
}

/// A metric from a Prometheus endpoint; panics with the exposition if it is missing.
pub async fn fetch_metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    metric_value(&text, name).unwrap_or_else(|| panic!("no {name} at {url}:\n{text}"))
}

/// An engine emulator of llama-3.1-8b on an H100 at `time_scale`, on a free loopback port,
/// ready to serve; returns it and its base URL.
pub fn spawn_emu(dir: &Path, name: &str, time_scale: f64) -> (Proc, String) {
    let port = free_port();
    let mut emu = Proc::spawn(
        name,
        dir,
        &[
            "engine-emu",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--time-scale",
            &time_scale.to_string(),
        ],
        &[],
    );
    wait_tcp(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(20),
        &mut [&mut emu],
    );
    (emu, format!("http://127.0.0.1:{port}"))
}

/// An agent for node `node` driving one llama-3.1-8b replica at `engine` with `window`.
pub fn spawn_agent(dir: &Path, node: &str, control: &str, engine: &str, window: u32, agent_token: &str) -> Proc {
    Proc::spawn(
        &format!("agent-{node}"),
        dir,
        &[
            "agent",
            "--control",
            control,
            "--node",
            node,
            "--replica",
            &format!("url={engine},model=llama-3.1-8b,window={window}"),
        ],
        &[("TOKENFAB_AGENT_TOKEN", agent_token)],
    )
}

/// Waits until every agent among `procs` has logged its registration.
pub async fn wait_registered(procs: &[Proc], within: Duration) {
    let deadline = Instant::now() + within;
    while !procs
        .iter()
        .filter(|p| p.name.starts_with("agent"))
        .all(|p| p.log().contains("registered"))
    {
        let logs: Vec<String> = procs.iter().map(|p| format!("--- {}\n{}", p.name, p.log())).collect();
        assert!(
            Instant::now() < deadline,
            "agents did not register:\n{}",
            logs.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The energy counter of every device an engine emulator emulates, summed, joules.
pub async fn emu_energy_j(engine: &str) -> f64 {
    let text = http_text(&format!("{engine}/emu/devices")).await;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("{engine}/emu/devices: {text}"))
        .iter()
        .map(|d| d["energy_j"].as_f64().unwrap())
        .sum()
}

/// The body of `GET url`, panicking with the error if the request fails.
pub async fn http_text(url: &str) -> String {
    let resp = reqwest::get(url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"))
}

/// The test command's Python (`TOKENFAB_PYTHON`, else `python3`) if it imports `modules`;
/// without them the test is skipped (saying so), unless the test command's setup ran
/// (`TOKENFAB_REQUIRE_LLAMA` set), where that is a failure.
pub fn python_with(modules: &[&str]) -> Option<String> {
    let python = std::env::var("TOKENFAB_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {}", modules.join(", "))])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var("TOKENFAB_REQUIRE_LLAMA").is_err(),
        "{python} lacks {modules:?}: run scripts/setup-test-deps.sh"
    );
    eprintln!("SKIPPED: {python} lacks {modules:?} (scripts/setup-test-deps.sh installs them)");
    None
}
