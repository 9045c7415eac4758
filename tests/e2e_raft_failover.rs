//! Leader loss on the Raft backend, with real processes on loopback: three `tokenfab
//! server --store raft` replicas that replicate among themselves over their peer ports, an
//! agent given every replica's URL, and an engine emulator.
//!
//! - Round after round, under steady submission and result load, the leader is killed
//!   with SIGKILL; another is elected, and serves once it has applied every entry
//!   committed before its term; the killed one is restarted and follows. Every batch
//!   accepted before or during the rounds completes with exactly one result per request;
//!   the clients' history is checked against the single-node model (`common::history`,
//!   shown on the etcd backend to catch a planted lost write).
//! - A paused leader (SIGSTOP until another is elected, then SIGCONT) acknowledges no
//!   write and exits.
//! - A follower stopped while the others commit, restarted behind the leader's compacted
//!   log, catches up by installing a snapshot of the leader's store and then serves
//!   everything when it is elected.
//! - `admin members` lists the group, and `--transfer-to` moves the leadership.
//! - An OpenAI SDK client given every replica's URL (tests/openai_failover_client.py)
//!   creates a batch on the leader, the leader is killed, and the client follows the batch
//!   to its results through the new leader, unchanged.
//! - A partition made with a network namespace: the leader, cut off from the two others
//!   while its clients still reach it, acknowledges no write and exits; the majority side
//!   elects a leader that serves what was acknowledged.
//!
//! Rounds: 3 in the test command; `TOKENFAB_FAILOVER_ROUNDS=20` for a benchmark-style run.

mod common;

use common::failover::*;
use common::history::History;
use common::netns::Netns;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Three replicas' ports: (gRPC, peer) each.
struct Group {
    dir: tempfile::TempDir,
    grpc: [u16; 3],
    peer: [u16; 3],
    /// More flags for every replica.
    extra: Vec<&'static str>,
}

impl Group {
    fn new() -> Self {
        Group {
            dir: tempfile::tempdir().unwrap(),
            grpc: [listen_port(), listen_port(), listen_port()],
            peer: [listen_port(), listen_port(), listen_port()],
            extra: Vec::new(),
        }
    }

    fn peers(&self) -> String {
        (0..3)
            .map(|i| format!("{}=http://127.0.0.1:{}", i + 1, self.peer[i]))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn addr(&self, i: usize) -> SocketAddr {
        format!("127.0.0.1:{}", self.grpc[i]).parse().unwrap()
    }

    fn spawn(&self, i: usize) -> Proc {
        replica(self.dir.path(), i, self.grpc[i], &self.peers(), &self.extra)
    }

    /// Which replica serves now (waits up to 30 s for one).
    async fn leader(&self, servers: &[Proc]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for i in 0..3 {
                if serves(self.addr(i)).await {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no replica serves:\n{}",
                servers.iter().map(|p| p.log()).collect::<Vec<_>>().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn name(i: usize) -> String {
    format!("cp-{i}")
}

fn replica(dir: &Path, i: usize, port: u16, peers: &str, extra: &[&str]) -> Proc {
    replica_in(dir, i, &[], &format!("127.0.0.1:{port}"), peers, extra)
}

/// Replica `i` (Raft id `i + 1`) run through `wrapper` (`ip netns exec NS`, or nothing),
/// its gRPC port on `listen`, its peer port on its own URL in `peers`.
fn replica_in(dir: &Path, i: usize, wrapper: &[&str], listen: &str, peers: &str, extra: &[&str]) -> Proc {
    let data = dir.join(format!("data-{i}"));
    let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let metrics = format!("{}:{}", listen.rsplit_once(':').unwrap().0, http_port(port));
    let raft_listen = peers
        .split(',')
        .nth(i)
        .and_then(|p| p.split_once("http://"))
        .map(|(_, a)| a)
        .unwrap();
    let id = (i + 1).to_string();
    let tenant = format!("acme={TENANT}");
    let data = data.to_str().unwrap();
    let name = name(i);
    let mut args = vec![
        "server",
        "--listen",
        listen,
        "--data-dir",
        data,
        "--store",
        "raft",
        "--raft-id",
        &id,
        "--raft-peers",
        peers,
        "--raft-listen",
        raft_listen,
        "--replica-name",
        &name,
        "--tenant",
        &tenant,
        "--lease-ttl",
        "2s",
        "--heartbeat-interval",
        "250ms",
        "--metrics-listen",
        &metrics,
    ];
    args.extend_from_slice(extra);
    Proc::spawn_in(
        &format!("server-{name}"),
        dir,
        wrapper,
        &args,
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_batch_and_no_result() {
    let g = Group::new();
    let names = ["cp-0", "cp-1", "cp-2"];
    let spawn = |i: usize| g.spawn(i);
    kill_the_leader_rounds(g.dir.path(), g.grpc, names, &spawn, "Raft election timeout 0.5 to 1 s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_accepts_no_write_once_another_is_elected() {
    let g = Group::new();
    let mut servers: Vec<Proc> = (0..3).map(|i| g.spawn(i)).collect();
    let l = g.leader(&servers).await;
    let x = create(g.addr(l), TENANT, chat_batch("x", 3, 8)).await;

    // The followers answer a liveness probe, not a readiness one, and name the leader.
    for f in (0..3).filter(|&f| f != l) {
        let url = format!("http://127.0.0.1:{}", http_port(g.grpc[f]));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let body = match reqwest::get(format!("{url}/healthz")).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if body.contains(&format!("replica {} (", l + 1)) {
                break;
            }
            assert!(Instant::now() < deadline, "{url}/healthz: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            reqwest::get(format!("{url}/readyz")).await.unwrap().status().as_u16(),
            503
        );
    }

    // The leader is paused (SIGSTOP); another is elected and serves, and takes a write.
    servers[l].signal("STOP");
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(30);
    let next = 'found: loop {
        for i in (0..3).filter(|&i| i != l) {
            if try_get(g.addr(i), &x).await.is_some() {
                break 'found i;
            }
        }
        assert!(Instant::now() < deadline, "no follower took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "{} serves {:?} after the leader was paused",
        name(next),
        stopped.elapsed()
    );
    let y = create(g.addr(next), TENANT, chat_batch("y", 3, 8)).await;

    // The old leader resumes, still listening, and is sent a write at once: it must not
    // acknowledge it.
    servers[l].signal("CONT");
    let mut c = tenant_client(g.addr(l), TENANT).await;
    let z = tokio::time::timeout(Duration::from_secs(10), c.create_batch(chat_batch("z", 3, 8))).await;
    if let Ok(Ok(r)) = z {
        panic!(
            "the paused leader acknowledged a write after another was elected: {:?}\n{}",
            r.into_inner().batch,
            servers[l].log()
        );
    }
    // It stops by itself, saying why.
    let status = exits(
        &mut servers[l],
        Duration::from_secs(15),
        "the deposed leader still runs",
    )
    .await;
    assert!(!status.success(), "{status}");
    assert!(servers[l].log().contains("no longer leads"), "{}", servers[l].log());
    // The new leader holds what was acknowledged (X by the old, Y by the new), nothing else.
    assert_eq!(listed(g.addr(next)).await, BTreeSet::from([x, y]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_restarted_far_behind_catches_up_by_snapshot_and_serves_everything() {
    // The log is compacted every 10 entries: the follower's missing entries are gone by the
    // time it restarts.
    let mut g = Group::new();
    g.extra = vec!["--raft-compact-every", "10"];
    let mut servers: Vec<Proc> = (0..3).map(|i| g.spawn(i)).collect();
    let l = g.leader(&servers).await;
    let behind = (l + 1) % 3;
    servers[behind].kill9();
    // The two others commit on: 30 batches of 50 requests with their input files.
    let mut ids = BTreeSet::new();
    for n in 0..30 {
        ids.insert(create(g.addr(l), TENANT, chat_batch(&format!("b{n}-"), 50, 8)).await);
    }
    let peers: BTreeMap<u64, String> = tokenfab_store_raft::RaftOptions::parse_peers(&g.peers()).unwrap();
    let leader_commit = tokenfab_store_raft::members(&peers, None)
        .await
        .into_iter()
        .find_map(|(id, _, s)| s.ok().filter(|_| id == l as u64 + 1))
        .expect("the leader answers")
        .commit;

    // The follower restarts; the entries it missed were compacted away, so it installs a
    // snapshot of the leader's store, then follows the log.
    let restarted = Instant::now();
    servers[behind] = g.spawn(behind);
    let deadline = restarted + Duration::from_secs(30);
    let caught_up = loop {
        let row = tokenfab_store_raft::members(&peers, None)
            .await
            .into_iter()
            .find(|(id, _, _)| *id == behind as u64 + 1);
        if let Some((_, _, Ok(s))) = row
            && s.applied >= leader_commit
        {
            assert!(s.snapshots_installed >= 1, "it caught up without a snapshot: {s:?}");
            break restarted.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{} did not catch up:\n{}",
            name(behind),
            servers[behind].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "{} caught up by snapshot to the leader's {leader_commit} entries {caught_up:?} after its restart",
        name(behind)
    );

    // With the leader and the third replica gone, it cannot lead alone (no majority); with
    // the leader gone, the restarted follower or the third one leads, and serves every batch.
    servers[l].kill9();
    let next = g.leader(&servers).await;
    assert_ne!(next, l);
    assert_eq!(listed(g.addr(next)).await, ids);
    // Make the restarted follower the one that serves, if it is not already.
    if next != behind {
        servers[next].kill9();
        servers[l] = g.spawn(l);
        let now = g.leader(&servers).await;
        assert!(now == behind || now == l, "{now}");
        assert_eq!(listed(g.addr(now)).await, ids);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_replica_joins_and_a_follower_leaves_with_admin_members() {
    let g = Group::new();
    let mut servers: Vec<Proc> = (0..3).map(|i| g.spawn(i)).collect();
    let l = g.leader(&servers).await;
    let x = create(g.addr(l), TENANT, chat_batch("x", 3, 8)).await;
    // Replica 4 starts with every member and itself, then the group adds it.
    let (grpc4, peer4) = (listen_port(), listen_port());
    let url4 = format!("http://127.0.0.1:{peer4}");
    let all = format!("{},4={url4}", g.peers());
    let mut fourth = replica(g.dir.path(), 3, grpc4, &all, &[]);
    let out = run_cli(
        &[
            "admin",
            "members",
            "--raft-peers",
            &g.peers(),
            "--add",
            &format!("4={url4}"),
        ],
        &[],
    );
    assert!(
        out.contains(&format!("replica {} (the leader) added 4", l + 1)),
        "{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = run_cli(&["admin", "members", "--raft-peers", &all], &[]);
        let row = out
            .lines()
            .find(|r| r.split_whitespace().next() == Some("4"))
            .unwrap_or_default();
        if row.contains("follower") && !row.contains(" 0 ") {
            break;
        }
        assert!(Instant::now() < deadline, "4 does not follow:\n{out}\n{}", fourth.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Adding a member twice, or a malformed one, is refused with the reason.
    let twice = std::process::Command::new(bin())
        .args(["admin", "members", "--raft-peers", &all, "--add", &format!("4={url4}")])
        .output()
        .unwrap();
    assert!(!twice.status.success());
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains("already a member"),
        "{twice:?}"
    );

    // A follower of the first three leaves: it stops by itself; the group of three (the
    // leader, the other, 4) goes on, and without the old leader elects 4 or the other.
    let gone = (0..3).find(|&i| i != l).unwrap();
    let out = run_cli(
        &[
            "admin",
            "members",
            "--raft-peers",
            &all,
            "--remove",
            &(gone + 1).to_string(),
        ],
        &[],
    );
    assert!(out.contains(&format!("removed {}", gone + 1)), "{out}");
    exits(
        &mut servers[gone],
        Duration::from_secs(15),
        "the removed replica still runs",
    )
    .await;
    assert!(
        servers[gone].log().contains("was removed from the group"),
        "{}",
        servers[gone].log()
    );
    servers[l].kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    let addrs: Vec<SocketAddr> = (0..3)
        .filter(|&i| i != l && i != gone)
        .map(|i| g.addr(i))
        .chain([format!("127.0.0.1:{grpc4}").parse().unwrap()])
        .collect();
    let serving = 'found: loop {
        for a in &addrs {
            if serves(*a).await {
                break 'found *a;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader among the three left:\n{}",
            fourth.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(listed(serving).await, BTreeSet::from([x]));
    fourth.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_listed_and_leadership_moves_when_asked() {
    let g = Group::new();
    let mut servers: Vec<Proc> = (0..3).map(|i| g.spawn(i)).collect();
    let l = g.leader(&servers).await;
    let x = create(g.addr(l), TENANT, chat_batch("x", 3, 8)).await;
    let peers = g.peers();
    let members = || run_cli(&["admin", "members", "--raft-peers", &peers], &[]);
    let out = members();
    for i in 0..3 {
        let row = out
            .lines()
            .find(|r| r.split_whitespace().nth(1) == Some(name(i).as_str()))
            .unwrap_or_else(|| panic!("no row for {}:\n{out}", name(i)));
        let want = if i == l { "leader" } else { "follower" };
        assert!(row.contains(want), "{}: {row}\n{out}", name(i));
    }

    // The SLA document's method names the store and what a commit waits for.
    let sla: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{}/v1/sla", http_port(g.grpc[l])))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let durability = sla["method"]["durability"].as_str().unwrap_or_default();
    assert!(
        durability.starts_with("raft:") && durability.contains(&name(l)),
        "{durability}"
    );
    // So do /healthz and the metrics.
    let health = reqwest::get(format!("http://127.0.0.1:{}/healthz", http_port(g.grpc[l])))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(health.contains("\"backend\":\"raft\""), "{health}");

    let to = (l + 1) % 3;
    let asked = Instant::now();
    let out = run_cli(
        &[
            "admin",
            "members",
            "--raft-peers",
            &peers,
            "--transfer-to",
            &(to + 1).to_string(),
        ],
        &[],
    );
    assert!(
        out.starts_with(&format!("asked replica {} to hand leadership to {}", l + 1, to + 1)),
        "{out}"
    );
    let deadline = asked + Duration::from_secs(15);
    while read(g.addr(to), &x).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{} did not take over:\n{}",
            name(to),
            servers[to].log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("{} serves {:?} after the transfer was asked", name(to), asked.elapsed());
    // The old leader stops serving and exits (its supervisor would restart it to follow).
    exits(&mut servers[l], Duration::from_secs(15), "the old leader still runs").await;
    // The tenant CLI, given every replica, uses the one that serves.
    let control = (0..3)
        .map(|i| format!("http://{}", g.addr(i)))
        .collect::<Vec<_>>()
        .join(",");
    let out = run_cli(
        &["batches", "get", &x, "--control", &control],
        &[("TOKENFAB_TOKEN", TENANT)],
    );
    assert!(out.contains(&x), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_majority_commits_nothing_and_its_clients_are_refused() {
    let Some(net) = Netns::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (grpc, peer) = (
        [listen_port(), listen_port(), listen_port()],
        [listen_port(), listen_port(), listen_port()],
    );
    // Replica 0 in the namespace: clients reach it on the client link, the two others on
    // the peer link, whose root end their peer ports listen on.
    let hosts = [
        net.peer_ns_ip.clone(),
        net.peer_root_ip.clone(),
        net.peer_root_ip.clone(),
    ];
    let peers = (0..3)
        .map(|i| format!("{}=http://{}:{}", i + 1, hosts[i], peer[i]))
        .collect::<Vec<_>>()
        .join(",");
    let addrs: Vec<SocketAddr> = [
        format!("{}:{}", net.client_ip, grpc[0]),
        format!("127.0.0.1:{}", grpc[1]),
        format!("127.0.0.1:{}", grpc[2]),
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    let spawn = |i: usize| {
        let wrapper: Vec<&str> = if i == 0 {
            vec!["ip", "netns", "exec", &net.name]
        } else {
            vec![]
        };
        replica_in(dir.path(), i, &wrapper, &addrs[i].to_string(), &peers, &[])
    };
    let mut servers: Vec<Proc> = (0..3).map(spawn).collect();
    let leader = |servers: &[Proc]| {
        let (addrs, logs) = (
            addrs.clone(),
            servers.iter().map(|p| p.log()).collect::<Vec<_>>().join("\n"),
        );
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                for (i, a) in addrs.iter().enumerate() {
                    if serves(*a).await {
                        return i;
                    }
                }
                assert!(Instant::now() < deadline, "no replica serves:\n{logs}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Replica 0 must lead: hand it the leadership if another won the first election (that
    // one exits, and comes back as a follower).
    let first = leader(&servers).await;
    if first != 0 {
        run_cli(&["admin", "members", "--raft-peers", &peers, "--transfer-to", "1"], &[]);
        exits(
            &mut servers[first],
            Duration::from_secs(15),
            "the old leader still runs",
        )
        .await;
        servers[first] = spawn(first);
        assert_eq!(leader(&servers).await, 0, "replica 0 did not take the leadership");
    }
    let history = History::default();
    let acked = std::sync::Mutex::new(Vec::new());
    let x = submit(addrs[0], "x", 3, &history, &acked).await;

    // The partition: the leader loses the two others; its clients still reach it.
    net.cut_peer_link();
    let cut = Instant::now();
    // Its lease runs out: it stops answering reads, before the majority side can elect
    // another leader (so no read it answers can be older than a write another acknowledged).
    let deadline = cut + Duration::from_secs(10);
    while read(addrs[0], &x).await.is_ok() {
        assert!(Instant::now() < deadline, "the cut-off leader still answers reads");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped_reads = cut.elapsed();
    eprintln!("the cut-off leader stopped answering reads {stopped_reads:?} after the cut");
    let mut c = tenant_client(addrs[0], TENANT).await;
    let y = tokio::time::timeout(Duration::from_secs(20), c.create_batch(chat_batch("y", 3, 8))).await;
    if let Ok(Ok(r)) = y {
        panic!(
            "the cut-off leader acknowledged a write: {:?}\n{}",
            r.into_inner().batch,
            servers[0].log()
        );
    }
    eprintln!(
        "a write sent to the cut-off leader was refused after {:?}",
        cut.elapsed()
    );
    // It stops by itself, saying why.
    exits(
        &mut servers[0],
        Duration::from_secs(30),
        "the cut-off leader still runs",
    )
    .await;
    assert!(servers[0].log().contains("no longer leads"), "{}", servers[0].log());
    // The majority side elects a leader that serves what was acknowledged, and only that.
    let deadline = Instant::now() + Duration::from_secs(30);
    let next = 'found: loop {
        for (i, a) in addrs.iter().enumerate().skip(1) {
            if serves(*a).await {
                break 'found i;
            }
        }
        assert!(Instant::now() < deadline, "the majority side elected no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    read_once_serving(addrs[next], &x, &history, &servers[next]).await;
    let took_over = cut.elapsed();
    eprintln!("{} serves {took_over:?} after the cut", name(next));
    assert!(
        stopped_reads < took_over,
        "the old leader answered reads until {stopped_reads:?}, the new one served at {took_over:?}"
    );
    assert_only_acknowledged(addrs[next], BTreeSet::from([x]), &history).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_sdk_client_given_every_replica_follows_the_new_leader() {
    let Some(python) = python_with(&["openai", "httpx2"]) else {
        return;
    };
    let g = Group::new();
    let openai: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", listen_port())).collect();
    let spawn = |i: usize| replica(g.dir.path(), i, g.grpc[i], &g.peers(), &["--openai-listen", &openai[i]]);
    let mut servers: Vec<Proc> = (0..3).map(spawn).collect();
    let l = g.leader(&servers).await;
    let control = (0..3)
        .map(|i| format!("http://{}", g.addr(i)))
        .collect::<Vec<_>>()
        .join(",");
    let (emu, engine) = spawn_emu(g.dir.path(), "emu", 10.0);
    let agent = spawn_agent(g.dir.path(), "n1", &control, &engine, 8, AGENT);
    let others = [agent, emu];
    wait_registered(&others, Duration::from_secs(30)).await;

    // The SDK client is given every replica's URL (tests/openai_failover_client.py).
    let urls = openai
        .iter()
        .map(|a| format!("http://{a}/v1"))
        .collect::<Vec<_>>()
        .join(",");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/openai_failover_client.py");
    let mut child = std::process::Command::new(&python)
        .arg(script)
        .env("TOKENFAB_OPENAI_URLS", &urls)
        .env("TOKENFAB_TOKEN", TENANT)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut created = String::new();
    tokio::task::block_in_place(|| std::io::BufRead::read_line(&mut stdout, &mut created)).unwrap();
    assert!(created.starts_with("created batch_"), "{created:?}");

    // The batch was created on the leader; the leader dies; the client goes on, unchanged.
    servers[l].kill9();
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    drop(stdin);
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(
        out.status.success(),
        "the client failed:\n{rest}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        servers.iter().map(|p| p.log()).collect::<Vec<_>>().join("\n")
    );
    let seen: serde_json::Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(seen["results"], 60, "{seen}");
    assert!(seen["moves"].as_u64().unwrap() >= 1, "{seen}");
    eprintln!("the OpenAI SDK client followed the new leader: {seen}");
}
