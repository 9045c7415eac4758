//! Leader loss on the etcd backend, with real processes on loopback: a real etcd (Debian's
//! `etcd-server`), three `tokenfab server --store etcd` replicas sharing one prefix, an
//! agent given every replica's URL, and an engine emulator. Round after round, under steady
//! submission and result load, the elected replica is killed with SIGKILL; one of the
//! others is elected, applies the log it has not seen, and serves; the killed one is restarted and
//! waits as the follower. Every batch accepted before or during the rounds completes with
//! exactly one result per request, read from whichever replica then serves; none is lost
//! or duplicated. The time from the kill until the new leader answers a read is printed
//! per round, with its median and maximum.
//!
//! Every operation the clients saw (submissions and their acknowledgements, reads of each
//! batch from whichever replica answers, the results at the end) goes into a history that
//! `common::history` checks: no acknowledged write lost, no result recorded twice, no stale
//! read. The checker is shown to catch a lost write planted in the etcd backend
//! (`TOKENFAB_FAULT_ACK_BEFORE_REPLICATION`), and each of its rules on made-up histories.
//!
//! Rounds: 3 in the test command; `TOKENFAB_FAILOVER_ROUNDS=20` for a benchmark-style run.

mod common;

use common::failover::*;
use common::history::{History, Op};
use common::netns::Netns;
use common::*;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenfab_store_etcd::testing::Etcd;

fn replica(dir: &Path, etcd: &str, name: &str, port: u16) -> Proc {
    replica_with(dir, etcd, name, port, &[])
}

fn replica_with(dir: &Path, etcd: &str, name: &str, port: u16, envs: &[(&str, &str)]) -> Proc {
    let data = dir.join(format!("data-{name}"));
    Proc::spawn(
        &format!("server-{name}"),
        dir,
        &[
            "server",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
            "--store",
            "etcd",
            "--etcd-endpoints",
            etcd,
            "--etcd-prefix",
            "/tokenfab/e2e",
            "--replica-name",
            name,
            "--etcd-lease-ttl",
            "1s",
            "--tenant",
            &format!("acme={TENANT}"),
            "--lease-ttl",
            "2s",
            "--heartbeat-interval",
            "250ms",
            "--metrics-listen",
            &format!("127.0.0.1:{}", http_port(port)),
        ],
        &[&[("TOKENFAB_AGENT_TOKEN", AGENT)], envs].concat(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_elected_replica_loses_no_batch_and_no_result() {
    let Some(etcd) = Etcd::start().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ports = [listen_port(), listen_port(), listen_port()];
    let names = ["cp-a", "cp-b", "cp-c"];
    let spawn = |i: usize| replica(dir.path(), &etcd.url, names[i], ports[i]);
    kill_the_leader_rounds(dir.path(), ports, names, &spawn, "etcd lease 1 s").await;
}

/// Two replicas on `etcd`: `a` elected and listening, `b` waiting.
struct Pair {
    dir: tempfile::TempDir,
    ports: [u16; 2],
    addrs: Vec<SocketAddr>,
    a: Proc,
    b: Proc,
}

async fn pair(etcd: &Etcd, envs: &[(&str, &str)]) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let ports = [listen_port(), listen_port()];
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
        .collect();
    let mut a = replica_with(dir.path(), &etcd.url, "cp-a", ports[0], envs);
    wait_tcp(addrs[0], Duration::from_secs(30), &mut [&mut a]);
    let b = replica_with(dir.path(), &etcd.url, "cp-b", ports[1], envs);
    Pair {
        dir,
        ports,
        addrs,
        a,
        b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_accepts_no_write_once_another_is_elected() {
    let Some(etcd) = Etcd::start().await else { return };
    let Pair {
        dir: _dir,
        ports,
        addrs,
        mut a,
        b,
    } = pair(&etcd, &[]).await;
    let x = create(addrs[0], TENANT, chat_batch("x", 3, 8)).await;
    // B waits: alive for a liveness probe, not ready for traffic; A is ready.
    let probe = |port: u16, path: &'static str| async move {
        let url = format!("http://127.0.0.1:{}{path}", http_port(port));
        for _ in 0..200 {
            if let Ok(r) = reqwest::get(&url).await {
                return (r.status().as_u16(), r.text().await.unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nothing answers {url}");
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = probe(ports[1], "/healthz").await;
        assert!(code == 200 && body.contains("standby"), "{code} {body}");
        if body.contains("replica cp-a serves") {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(probe(ports[1], "/readyz").await.0, 503);
    assert_eq!(probe(ports[0], "/readyz").await.0, 200);

    // A is paused (SIGSTOP) past its lease; B is elected and serves, and takes a write.
    a.signal("STOP");
    let deadline = Instant::now() + Duration::from_secs(30);
    while try_get(addrs[1], &x).await.is_none() {
        assert!(Instant::now() < deadline, "B did not take over:\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let y = create(addrs[1], TENANT, chat_batch("y", 3, 8)).await;

    // A resumes, still listening, and is sent a write at once: it must not acknowledge it.
    a.signal("CONT");
    let mut c = tenant_client(addrs[0], TENANT).await;
    let z = tokio::time::timeout(Duration::from_secs(10), c.create_batch(chat_batch("z", 3, 8))).await;
    if let Ok(Ok(r)) = z {
        panic!(
            "the paused leader acknowledged a write after another replica was elected: {:?}\n{}",
            r.into_inner().batch,
            a.log()
        );
    }
    // It stops by itself, saying why.
    let status = exits(&mut a, Duration::from_secs(15), "the deposed replica still runs").await;
    assert!(!status.success(), "{status}");
    assert!(
        a.log().contains("lost the election") || a.log().contains("no longer the elected one"),
        "{}",
        a.log()
    );
    // B holds what was acknowledged (X by A, Y by B), and nothing else.
    assert_eq!(listed(addrs[1]).await, BTreeSet::from([x, y]));
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_checker_catches_a_leader_that_acknowledges_before_replicating() {
    // The planted bug: the etcd backend acknowledges a commit once the leader's own store
    // has it and writes it to etcd a second later. The leader is killed in that second.
    let Some(etcd) = Etcd::start().await else { return };
    let planted = [("TOKENFAB_FAULT_ACK_BEFORE_REPLICATION", "1")];
    let Pair {
        dir: _dir,
        addrs,
        mut a,
        b,
        ..
    } = pair(&etcd, &planted).await;
    let history = Arc::new(History::default());
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let id = submit(addrs[0], "lost-", 3, &history, &acked).await;
    a.kill9();
    // Read it from the new leader.
    read_once_serving(addrs[1], &id, &history, &b).await;
    let violations = history.check();
    assert!(
        violations.iter().any(|v| v.contains("a lost write")),
        "the checker missed the planted lost write: {violations:?}"
    );
}

#[test]
fn the_history_checker_flags_each_rule_on_made_up_histories() {
    use common::history::{Event, check};
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let ev = |invoked: u64, returned: u64, op: Op| Event {
        invoked: at(invoked),
        returned: at(returned),
        op,
    };
    let sub = |id: &str| Op::Submitted {
        id: id.into(),
        requests: 3,
    };
    let rd = |id: &str, c: Option<u32>| Op::Read {
        id: id.into(),
        completed: c,
    };
    let res = |id: &str, ids: &[&str]| Op::Results {
        id: id.into(),
        custom_ids: ids.iter().map(|s| s.to_string()).collect(),
    };
    let good = vec![
        ev(0, 10, sub("b")),
        ev(5, 6, rd("b", None)), // began before the acknowledgement: allowed
        ev(20, 21, rd("b", Some(1))),
        ev(30, 31, rd("b", Some(3))),
        ev(40, 41, res("b", &["x", "y", "z"])),
    ];
    assert_eq!(check(&good), Vec::<String>::new());
    let flags = |history: &[Event], rule: &str| {
        let found = check(history);
        assert!(found.iter().any(|v| v.contains(rule)), "{rule}: {found:?}");
    };

    let mut lost = good.clone();
    lost.push(ev(50, 51, rd("b", None)));
    flags(&lost, "a lost write");

    let mut stale = good.clone();
    stale.push(ev(35, 36, rd("b", Some(1))));
    flags(&stale, "a stale read");
    // Overlapping reads may return in either order.
    let mut overlapping = good.clone();
    overlapping.push(ev(29, 32, rd("b", Some(2))));
    assert_eq!(check(&overlapping), Vec::<String>::new());

    let mut twice = good.clone();
    twice[4] = ev(40, 41, res("b", &["x", "y", "z", "z"]));
    flags(&twice, "recorded twice");

    let mut over = good.clone();
    over.push(ev(60, 61, rd("b", Some(4))));
    flags(&over, "counted twice");

    let missing = good[..4].to_vec();
    flags(&missing, "never read back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_commits_nothing_and_its_clients_are_refused() {
    let Some(net) = Netns::create() else { return };
    let Some(etcd) = Etcd::start_also_on(&net.peer_root_ip).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A in its namespace: clients reach it on the client link, it reaches etcd on the other.
    let a_addr: SocketAddr = format!("{}:{}", net.client_ip, listen_port()).parse().unwrap();
    let data_a = dir.path().join("data-a");
    let a_listen = a_addr.to_string();
    let mut a = Proc::spawn_in(
        "server-cp-a",
        dir.path(),
        &["ip", "netns", "exec", &net.name],
        &[
            "server",
            "--listen",
            &a_listen,
            "--data-dir",
            data_a.to_str().unwrap(),
            "--store",
            "etcd",
            "--etcd-endpoints",
            &etcd.urls[1],
            "--etcd-prefix",
            "/tokenfab/e2e",
            "--replica-name",
            "cp-a",
            "--etcd-lease-ttl",
            "1s",
            "--tenant",
            &format!("acme={TENANT}"),
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    wait_tcp(a_addr, Duration::from_secs(30), &mut [&mut a]);
    let b_port = listen_port();
    let b_addr: SocketAddr = format!("127.0.0.1:{b_port}").parse().unwrap();
    let b = replica(dir.path(), &etcd.url, "cp-b", b_port);
    let history = History::default();
    let acked = std::sync::Mutex::new(Vec::new());
    let x = submit(a_addr, "x", 3, &history, &acked).await;

    // The partition: A loses etcd (and B's side), its clients still reach it.
    net.cut_peer_link();
    let cut = Instant::now();
    let mut c = tenant_client(a_addr, TENANT).await;
    let y = tokio::time::timeout(Duration::from_secs(20), c.create_batch(chat_batch("y", 3, 8))).await;
    if let Ok(Ok(r)) = y {
        panic!(
            "the cut-off leader acknowledged a write: {:?}\n{}",
            r.into_inner().batch,
            a.log()
        );
    }
    eprintln!(
        "a write sent to the cut-off leader was refused after {:?}",
        cut.elapsed()
    );
    // B is elected on the majority side (etcd's) and serves what A acknowledged.
    read_once_serving(b_addr, &x, &history, &b).await;
    eprintln!("B serves {:?} after the cut", cut.elapsed());
    // A stops by itself.
    exits(&mut a, Duration::from_secs(30), "the cut-off replica still runs").await;
    assert!(a.log().contains("lost the election"), "{}", a.log());
    assert_only_acknowledged(b_addr, BTreeSet::from([x.clone()]), &history).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_listed_and_the_elected_replica_steps_down_when_asked() {
    let Some(etcd) = Etcd::start().await else { return };
    let Pair {
        dir: _dir,
        addrs,
        mut a,
        b,
        ..
    } = pair(&etcd, &[]).await;
    let x = create(addrs[0], TENANT, chat_batch("x", 3, 8)).await;
    let members = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = run_cli(
                &[
                    "admin",
                    "members",
                    "--etcd-endpoints",
                    &etcd.url,
                    "--etcd-prefix",
                    "/tokenfab/e2e",
                ],
                &[],
            );
            if out == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "admin members printed:\n{out}\nwanted:\n{want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    members("cp-a\telected (serves)\ncp-b\twaiting\n");

    let asked = Instant::now();
    let out = run_cli(
        &[
            "admin",
            "members",
            "--etcd-endpoints",
            &etcd.url,
            "--etcd-prefix",
            "/tokenfab/e2e",
            "--step-down",
        ],
        &[],
    );
    assert!(out.starts_with("asked cp-a to step down"), "{out}");
    exits(&mut a, Duration::from_secs(15), "cp-a did not step down").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    assert!(a.log().contains("asked to step down"), "{}", a.log());
    while read(addrs[1], &x).await.is_err() {
        assert!(Instant::now() < deadline, "cp-b did not take over:\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("cp-b serves {:?} after the step-down was asked", asked.elapsed());
    members("cp-b\telected (serves)\n");
    // The tenant CLI, given both replicas, uses the elected one (cp-a is gone).
    let control = format!("http://{},http://{}", addrs[0], addrs[1]);
    let out = run_cli(
        &["batches", "get", &x, "--control", &control],
        &[("TOKENFAB_TOKEN", TENANT)],
    );
    assert!(out.contains(&x), "{out}");
}
