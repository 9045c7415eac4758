//! The fault tests' shared parts, for every replicated store backend (etcd, Raft): clients
//! that record what they saw into a [`History`], and the kill-the-leader rounds.

use super::history::{History, Op};
use super::*;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;

pub const TENANT: &str = "acme-token";
pub const AGENT: &str = "agent-secret-of-the-tests";

/// A free port for a replica to listen on, below the kernel's ephemeral range: a replica
/// restarts on its port, and a port of that range may meanwhile be taken as the source port
/// of some outgoing connection (the agent probes the replicas many times a second).
pub fn listen_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32768);
    // Test processes run at once: each starts at a place of its own.
    let span = low.saturating_sub(10_000).max(1);
    let start = 10_000 + (std::process::id() * 97) % span;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 10_000 + (start - 10_000 + n) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

/// The HTTP (metrics and health) port of the replica whose gRPC port is `port`.
pub fn http_port(port: u16) -> u16 {
    static PORTS: std::sync::Mutex<Vec<(u16, u16)>> = std::sync::Mutex::new(Vec::new());
    let mut ports = PORTS.lock().unwrap();
    if let Some((_, h)) = ports.iter().find(|(g, _)| *g == port) {
        return *h;
    }
    let h = listen_port();
    ports.push((port, h));
    h
}

/// A read of batch `id` at `addr`: its completed count, `Ok(None)` if the replica says it
/// does not exist, `Err` if the replica does not answer (not elected, or gone).
pub async fn read(addr: SocketAddr, id: &str) -> Result<Option<u32>, ()> {
    let mut c = tenant_client(addr, TENANT).await;
    let call = c.get_batch(pb::GetBatchRequest { batch_id: id.into() });
    match tokio::time::timeout(Duration::from_millis(500), call).await {
        Ok(Ok(r)) => Ok(Some(counts(&r.into_inner()).completed)),
        Ok(Err(s)) if s.code() == tonic::Code::NotFound => Ok(None),
        _ => Err(()),
    }
}

/// Whether the replica at `addr` serves (lists the tenant's batches within half a second).
pub async fn serves(addr: SocketAddr) -> bool {
    let mut c = tenant_client(addr, TENANT).await;
    let call = c.list_batches(pb::ListBatchesRequest {
        limit: 1,
        before: String::new(),
    });
    matches!(tokio::time::timeout(Duration::from_millis(500), call).await, Ok(Ok(_)))
}

/// Reads every acknowledged batch from every replica that answers, recording each read,
/// until `stop`.
pub fn reader(
    addrs: Vec<SocketAddr>,
    acked: Arc<std::sync::Mutex<Vec<String>>>,
    history: Arc<History>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let ids = acked.lock().unwrap().clone();
            for id in ids {
                for a in &addrs {
                    let invoked = Instant::now();
                    if let Ok(completed) = read(*a, &id).await {
                        history.record(
                            invoked,
                            Op::Read {
                                id: id.clone(),
                                completed,
                            },
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Waits (up to 30 s) until `addr` serves batch `id`, recording that read; `serving` is the
/// replica expected to take over, whose log a timeout shows.
pub async fn read_once_serving(addr: SocketAddr, id: &str, history: &History, serving: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let invoked = Instant::now();
        if let Ok(completed) = read(addr, id).await {
            history.record(
                invoked,
                Op::Read {
                    id: id.to_string(),
                    completed,
                },
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not take over:\n{}",
            serving.name,
            serving.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `p` exits by itself (it must within `within`); its exit status.
pub async fn exits(p: &mut Proc, within: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = p.exited() {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submits a batch to `addr`, recording its acknowledgement.
pub async fn submit(
    addr: SocketAddr,
    prefix: &str,
    n: usize,
    history: &History,
    acked: &std::sync::Mutex<Vec<String>>,
) -> String {
    let invoked = Instant::now();
    let id = create(addr, TENANT, chat_batch(prefix, n, 32)).await;
    history.record(
        invoked,
        Op::Submitted {
            id: id.clone(),
            requests: n as u32,
        },
    );
    acked.lock().unwrap().push(id.clone());
    id
}

/// The batch as `addr` serves it, if it answers.
pub async fn try_get(addr: SocketAddr, id: &str) -> Option<pb::Batch> {
    let mut c = tenant_client(addr, TENANT).await;
    let call = c.get_batch(pb::GetBatchRequest { batch_id: id.into() });
    match tokio::time::timeout(Duration::from_millis(500), call).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => None,
    }
}

/// The batch ids `addr` lists for the tenant.
pub async fn listed(addr: SocketAddr) -> BTreeSet<String> {
    let mut c = tenant_client(addr, TENANT).await;
    let r = c
        .list_batches(pb::ListBatchesRequest {
            limit: 1000,
            before: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    r.batches.into_iter().map(|b| b.id).collect()
}

/// Kills the serving replica of three, round after round, under steady submission and
/// result load, and checks that nothing acknowledged is lost or duplicated (see the
/// failover tests). `spawn(i)` starts replica `i` (again) on `ports[i]`, with its data in
/// `dir`; `timeout` says, for the figures printed, what bounds a takeover.
pub async fn kill_the_leader_rounds(
    dir: &Path,
    ports: [u16; 3],
    names: [&str; 3],
    spawn: &dyn Fn(usize) -> Proc,
    timeout: &str,
) {
    let rounds: usize = std::env::var("TOKENFAB_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
        .collect();
    let mut servers: Vec<Proc> = (0..3).map(spawn).collect();
    // Which one serves (the others wait or follow; their gRPC ports are closed).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut leader = 'found: loop {
        for (i, a) in addrs.iter().enumerate() {
            if serves(*a).await {
                break 'found i;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no replica serves 30 s after the start:\n{}",
            servers.iter().map(|p| p.log()).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let emu_port = listen_port();
    let mut emu = Proc::spawn(
        "emu",
        dir,
        &[
            "engine-emu",
            "--listen",
            &format!("127.0.0.1:{emu_port}"),
            "--time-scale",
            "2",
        ],
        &[],
    );
    wait_tcp(
        format!("127.0.0.1:{emu_port}").parse().unwrap(),
        Duration::from_secs(20),
        &mut [&mut emu],
    );
    let control = addrs
        .iter()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    let agent = Proc::spawn(
        "agent",
        dir,
        &[
            "agent",
            "--control",
            &control,
            "--node",
            "node0",
            "--replica",
            &format!("url=http://127.0.0.1:{emu_port},model=llama-3.1-8b,window=32"),
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    let mut procs_for_logs = vec![agent, emu];
    wait_registered(&procs_for_logs, Duration::from_secs(30)).await;

    let history = Arc::new(History::default());
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reads = reader(addrs.clone(), acked.clone(), history.clone(), stop.clone());
    let mut batches: Vec<(String, usize)> = Vec::new();
    let mut failovers = Vec::new();
    let mut recorded_at_kill = Vec::new();
    for round in 0..rounds {
        // Load: a new batch now, and results being recorded for the earlier ones.
        let n = 200;
        let id = submit(addrs[leader], &format!("r{round}-"), n, &history, &acked).await;
        batches.push((id.clone(), n));
        // Results being recorded: wait until this leader has recorded a few more, so that
        // the kill comes mid-way through the work.
        let total = |addrs: SocketAddr, batches: Vec<String>| async move {
            let mut done = 0;
            for b in &batches {
                done += try_get(addrs, b).await.map_or(0, |b| counts(&b).completed);
            }
            done
        };
        let ids: Vec<String> = batches.iter().map(|(b, _)| b.clone()).collect();
        let before = total(addrs[leader], ids.clone()).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let done = loop {
            let done = total(addrs[leader], ids.clone()).await;
            if done >= before + 5 {
                break done;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {} recorded no new result in 60 s ({done} in all):\n{}\n{}",
                names[leader],
                servers[leader].log(),
                procs_for_logs[0].log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        recorded_at_kill.push((done, batches.iter().map(|(_, n)| *n as u32).sum::<u32>()));

        servers[leader].kill9();
        let killed = Instant::now();
        // One of the two waiting replicas is elected; the read finds which.
        let deadline = killed + Duration::from_secs(30);
        let next = 'found: loop {
            for i in (0..3).filter(|i| *i != leader) {
                if let Some(b) = try_get(addrs[i], &id).await {
                    assert_eq!(b.id, id);
                    break 'found i;
                }
                if let Some(status) = servers[i].exited() {
                    panic!("{} exited ({status}):\n{}", servers[i].name, servers[i].log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "no replica serves 30 s after the kill:\n{}",
                servers.iter().map(|p| p.log()).collect::<Vec<_>>().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let took = killed.elapsed();
        eprintln!("round {round}: {} took over in {took:?}", names[next]);
        failovers.push(took);
        // The killed replica comes back and waits as the follower.
        servers[leader] = spawn(leader);
        leader = next;
    }

    // Every batch completes, on whichever replica serves now, with exactly one result per
    // request.
    let mut all_procs: Vec<Proc> = servers;
    all_procs.append(&mut procs_for_logs);
    for (id, n) in &batches {
        let b = wait_completed(addrs[leader], TENANT, id, Duration::from_secs(120), &all_procs).await;
        assert_eq!(counts(&b).completed as usize, *n, "{b:?}");
        let invoked = Instant::now();
        let results = all_results(addrs[leader], TENANT, id, pb::ResultKind::Output).await;
        history.record(
            invoked,
            Op::Results {
                id: id.clone(),
                custom_ids: results.iter().map(|r| r.custom_id.clone()).collect(),
            },
        );
        let ids: BTreeSet<&str> = results.iter().map(|r| r.custom_id.as_str()).collect();
        assert_eq!(results.len(), *n, "one result per request in {id}");
        assert_eq!(ids.len(), *n, "no duplicate in {id}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reads.await.unwrap();
    let violations = history.check();
    eprintln!(
        "history: {} operations checked, {} violations",
        history.len(),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "the history breaks the single-node model:\n{}",
        violations.join("\n")
    );
    eprintln!("results recorded / requests accepted at each kill: {recorded_at_kill:?}");
    assert!(
        recorded_at_kill.iter().any(|&(done, all)| done > 0 && done < all),
        "no kill came while results were being recorded: {recorded_at_kill:?}"
    );
    let mut sorted = failovers.clone();
    sorted.sort();
    // Nearest-rank percentiles.
    let rank = |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    eprintln!(
        "failover over {} rounds ({timeout}): p50 {:?}, p99 {:?}, max {:?}",
        sorted.len(),
        rank(0.5),
        rank(0.99),
        sorted[sorted.len() - 1]
    );
    assert!(
        sorted[sorted.len() - 1] < Duration::from_secs(10),
        "a failover took {:?}",
        sorted[sorted.len() - 1]
    );
}

/// After a partition: the replica at `addr` (the new leader) lists exactly `acked`, and the
/// clients' history breaks no rule (reads the test never made back are not counted).
pub async fn assert_only_acknowledged(addr: SocketAddr, acked: BTreeSet<String>, history: &History) {
    assert_eq!(listed(addr).await, acked, "only what was acknowledged");
    let violations: Vec<String> = history
        .check()
        .into_iter()
        .filter(|v| !v.contains("never read back"))
        .collect();
    assert!(violations.is_empty(), "{violations:?}");
}
