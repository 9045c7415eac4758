//! The Raft backend with real replicas in one process: each has its own data directory
//! and its own peer port on loopback, and they talk over real gRPC streams.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokenfab_core::control::{ControlConfig, ControlCore};
use tokenfab_core::{BatchId, RequestRef, Timestamp};
use tokenfab_store::{Store, conformance};
use tokenfab_store_raft::{RaftOptions, RaftStore};
use tokio::task::JoinHandle;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

struct Group {
    peers: BTreeMap<u64, String>,
    dirs: tempfile::TempDir,
    /// (compact_every, keep_entries), when not the defaults.
    compact: Option<(u64, u64)>,
    /// Mutual TLS on the peer ports.
    tls: Option<tokenfab_store_raft::PeerTls>,
}

impl Group {
    fn new(n: u64) -> Self {
        Group {
            peers: (1..=n)
                .map(|id| (id, format!("http://127.0.0.1:{}", free_port())))
                .collect(),
            dirs: tempfile::tempdir().unwrap(),
            compact: None,
            tls: None,
        }
    }

    /// The same group over mutual TLS: https:// peer URLs, every replica with a
    /// certificate from `ca` (for 127.0.0.1).
    fn with_tls(mut self, tls: tokenfab_store_raft::PeerTls) -> Self {
        for url in self.peers.values_mut() {
            *url = url.replace("http://", "https://");
        }
        self.tls = Some(tls);
        self
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.dirs.path().join(format!("r{id}"))
    }

    fn options(&self, id: u64) -> RaftOptions {
        let mut o = RaftOptions::new(id, &format!("r{id}"), self.peers.clone()).unwrap();
        o.listen = self.peers[&id]
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .parse()
            .unwrap();
        o.tls = self.tls.clone();
        // Small parts, so that the tests' files and commits span several entries.
        o.part_bytes = 512;
        if let Some((every, keep)) = self.compact {
            (o.compact_every, o.keep_entries) = (every, keep);
        }
        o
    }

    /// Starts replica `id`; the task ends when it leads.
    fn start(&self, id: u64) -> JoinHandle<RaftStore> {
        let (opts, dir) = (self.options(id), self.dir(id));
        tokio::spawn(async move { RaftStore::open(opts, &dir, Box::new(|_, _| {})).await.expect("opened") })
    }
}

/// Waits until one of `tasks` ends (its replica leads); returns its index and store.
async fn first_leader(tasks: &mut Vec<(u64, JoinHandle<RaftStore>)>, within: Duration) -> (u64, RaftStore) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(i) = tasks.iter().position(|(_, t)| t.is_finished()) {
            let (id, t) = tasks.remove(i);
            return (id, t.await.unwrap());
        }
        assert!(Instant::now() < deadline, "no replica led within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn body(s: &RaftStore, batch: BatchId, index: u32) -> String {
    let got = s.bodies(vec![RequestRef { batch, index }]).await.unwrap();
    String::from_utf8_lossy(&got[0].clone().expect("a body").body).to_string()
}

fn t0() -> Timestamp {
    Timestamp::from_millis(1_700_000_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_replica_group_passes_the_conformance_suite() {
    let g = Group::new(1);
    let (opts, dir): (RaftOptions, &Path) = (g.options(1), &g.dir(1));
    conformance::check(|| {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(RaftStore::open(opts.clone(), dir, Box::new(|_, _| {})))
                .expect("opened")
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_one_leader_and_another_takes_over_with_everything_committed() {
    let g = Group::new(3);
    let mut pending: Vec<_> = (1..=3).map(|id| (id, g.start(id))).collect();
    let (first_id, first) = first_leader(&mut pending, Duration::from_secs(10)).await;
    let s = first.status();
    assert_eq!(
        (s.leader, s.role, s.voters.clone()),
        (first_id, "leader", vec![1, 2, 3])
    );

    // Commits with input files of several parts each (512-byte parts).
    let mut core = ControlCore::new(ControlConfig::default());
    let mut ids = Vec::new();
    for (i, lines) in [3usize, 40, 1].into_iter().enumerate() {
        let (id, set) = conformance::submit(&first, &mut core, &format!("tenant{i}"), lines, t0());
        first.apply(set).await.expect("committed");
        ids.push(id);
    }
    let want = first.load().await.unwrap();
    let want_body = body(&first, ids[1], 39).await;

    // The others follow and do not lead while the first one runs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(pending.iter().all(|(_, t)| !t.is_finished()), "a second replica led");

    // The leader stops: another leads within a few election timeouts, with every commit.
    let stopped = Instant::now();
    drop(first);
    let (second_id, second) = first_leader(&mut pending, Duration::from_secs(10)).await;
    let took = stopped.elapsed();
    assert_ne!(second_id, first_id);
    assert!(took < Duration::from_secs(4), "a new leader served after {took:?}");
    assert_eq!(
        second.load().await.unwrap(),
        want,
        "the new leader serves what the old one committed"
    );
    assert_eq!(body(&second, ids[1], 39).await, want_body);
    let info = second.describe();
    assert_eq!((info.backend, info.replica), ("raft", Some(format!("r{second_id}"))));

    // It commits on with the remaining majority (2 of 3); the first comes back as a
    // follower, applies what it missed from the log, and leads after the second stops.
    let (late, set) = conformance::submit(&second, &mut core, "late", 7, t0());
    second.apply(set).await.expect("committed by 2 of 3");
    pending.push((first_id, g.start(first_id)));
    let want = second.load().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    drop(second);
    let (third_id, third) = first_leader(&mut pending, Duration::from_secs(10)).await;
    assert_ne!(third_id, second_id);
    assert_eq!(third.load().await.unwrap(), want);
    assert_eq!(body(&third, late, 6).await.len(), body(&third, late, 0).await.len());
    for (_, t) in pending {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_a_majority_acknowledges_nothing_and_steps_down() {
    let g = Group::new(3);
    let mut pending: Vec<_> = (1..=3).map(|id| (id, g.start(id))).collect();
    let (_, leader) = first_leader(&mut pending, Duration::from_secs(10)).await;
    let mut core = ControlCore::new(ControlConfig::default());
    let (_, set) = conformance::submit(&leader, &mut core, "acme", 2, t0());
    leader.apply(set).await.expect("committed");

    // Both followers stop: the leader's next commit cannot reach a majority. It is not
    // acknowledged; the leader steps down (check-quorum) and says so.
    for (_, t) in pending {
        t.abort();
    }
    let (_, set) = conformance::submit(&leader, &mut core, "acme", 3, t0());
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), leader.apply(set))
        .await
        .expect("answered")
        .unwrap_err();
    assert!(err.to_string().contains("no longer leads"), "{err}");
    let why = tokio::time::timeout(Duration::from_secs(5), leader.deposed())
        .await
        .expect("deposed");
    assert!(why.contains("no longer leads"), "{why}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stepped down after {:?}",
        started.elapsed()
    );

    // And it commits nothing more.
    let (_, set) = conformance::submit(&leader, &mut core, "acme", 1, t0());
    let err = leader.apply(set).await.unwrap_err();
    assert!(err.to_string().contains("does not lead"), "{err}");
}

#[test]
fn peers_are_parsed_with_errors_that_say_what_to_write() {
    let p = RaftOptions::parse_peers("1=http://a:7400, 2=http://b:7400").unwrap();
    assert_eq!(p[&2], "http://b:7400");
    for (bad, says) in [
        ("", "no peers"),
        ("1:http://a:1", "want ID=URL"),
        ("0=http://a:1", "from 1"),
        ("1=a:1", "http://"),
        ("1=http://a:1,1=http://b:1", "twice"),
    ] {
        let e = RaftOptions::parse_peers(bad).unwrap_err();
        assert!(e.contains(says), "{bad:?}: {e}");
    }
    let e = RaftOptions::new(3, "r3", p.clone()).unwrap_err().to_string();
    assert!(e.contains("not among the peers"), "{e}");
    let o = RaftOptions::new(1, "r1", p).unwrap();
    assert_eq!(o.listen.port(), 7400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_compacted_log_catches_up_by_snapshot() {
    let mut g = Group::new(3);
    g.compact = Some((5, 2));
    let mut pending: Vec<_> = (1..=3).map(|id| (id, g.start(id))).collect();
    let (leader_id, leader) = first_leader(&mut pending, Duration::from_secs(10)).await;
    let mut core = ControlCore::new(ControlConfig::default());
    let (first, set) = conformance::submit(&leader, &mut core, "early", 4, t0());
    leader.apply(set).await.unwrap();

    // One follower stops; the leader and the other commit 30 more batches (their inputs
    // spread over several entries each), and compact their logs.
    let (behind, task) = pending.remove(0);
    task.abort();
    let _ = task.await;
    let mut ids = vec![first];
    for i in 0..30 {
        let (id, set) = conformance::submit(&leader, &mut core, &format!("t{i}"), 3, t0());
        leader.apply(set).await.unwrap();
        ids.push(id);
    }
    let s = leader.status();
    assert!(s.first_index > 10, "the leader's log was not compacted: {s:?}");

    // The follower comes back: the entries it needs are gone, so it installs a snapshot.
    pending.push((behind, g.start(behind)));
    let deadline = Instant::now() + Duration::from_secs(20);
    let caught = loop {
        let row = tokenfab_store_raft::members(&g.peers, None)
            .await
            .into_iter()
            .find(|(id, _, _)| *id == behind);
        if let Some((_, _, Ok(st))) = &row
            && st.snapshots_installed >= 1
            && st.applied >= leader.status().applied
        {
            break st.clone();
        }
        assert!(Instant::now() < deadline, "replica {behind} did not catch up: {row:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("replica {behind} caught up by snapshot: {caught:?}");

    // Leadership moves to it: it serves everything, and commits on.
    let want = leader.load().await.unwrap();
    let led = tokenfab_store_raft::transfer_leader(&g.peers, behind, None)
        .await
        .unwrap();
    assert_eq!(led, leader_id);
    let i = pending.iter().position(|(id, _)| *id == behind).unwrap();
    let (_, task) = pending.remove(i);
    let now = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("it leads")
        .unwrap();
    assert_eq!(now.load().await.unwrap(), want);
    assert_eq!(body(&now, ids[0], 3).await, body(&leader, ids[0], 3).await);
    let (_, set) = conformance::submit(&now, &mut core, "after", 2, t0());
    now.apply(set).await.expect("the new leader commits");
    for (_, t) in pending {
        t.abort();
    }
}

/// A CA and a certificate it signs for 127.0.0.1, as PeerTls (the same certificate serves
/// every replica of a test group).
fn peer_tls(cn: &str) -> tokenfab_store_raft::PeerTls {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let cert = p.signed_by(&key, &issuer).unwrap();
    tokenfab_store_raft::PeerTls::from_pem(&cert.pem(), &key.serialize_pem(), &ca.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mutual_tls_the_group_replicates_and_refuses_peers_without_a_certificate_of_its_ca() {
    let tls = peer_tls("tokenfab peers");
    let g = Group::new(3).with_tls(tls.clone());
    let mut pending: Vec<_> = (1..=3).map(|id| (id, g.start(id))).collect();
    let (_, leader) = first_leader(&mut pending, Duration::from_secs(10)).await;
    let mut core = ControlCore::new(ControlConfig::default());
    let (id, set) = conformance::submit(&leader, &mut core, "acme", 20, t0());
    leader.apply(set).await.expect("committed over TLS");
    let want = leader.load().await.unwrap();

    // With the group's certificate every member answers; without one, or with one from
    // another CA, none does.
    let rows = tokenfab_store_raft::members(&g.peers, Some(&tls)).await;
    assert!(rows.iter().all(|(_, _, s)| s.is_ok()), "{rows:?}");
    for other in [None, Some(peer_tls("another CA"))] {
        let rows = tokenfab_store_raft::members(&g.peers, other.as_ref()).await;
        assert!(rows.iter().all(|(_, _, s)| s.is_err()), "{rows:?}");
    }
    // Plain http:// URLs with TLS (or the reverse) are refused before anything starts.
    let mut mixed = g.options(1);
    mixed.peers.insert(2, "http://127.0.0.1:1".into());
    let e = RaftStore::open(mixed, &g.dir(9), Box::new(|_, _| {}))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("give every peer as https://"), "{e}");

    let want_body = body(&leader, id, 19).await;
    drop(leader);
    let (_, next) = first_leader(&mut pending, Duration::from_secs(10)).await;
    assert_eq!(next.load().await.unwrap(), want);
    assert_eq!(body(&next, id, 19).await, want_body);
    for (_, t) in pending {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_is_added_and_another_removed_at_run_time_and_the_new_group_elects_a_leader() {
    let mut g = Group::new(4);
    // Replicas 1 to 3 are the group; 4 joins later (it starts with the whole list, itself
    // included, and follows once the group adds it).
    let three: BTreeMap<u64, String> = g
        .peers
        .iter()
        .filter(|(id, _)| **id <= 3)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let all = g.peers.clone();
    g.peers = three.clone();
    let mut pending: Vec<_> = (1..=3).map(|id| (id, g.start(id))).collect();
    let (leader_id, leader) = first_leader(&mut pending, Duration::from_secs(10)).await;
    let mut core = ControlCore::new(ControlConfig::default());
    let (id, set) = conformance::submit(&leader, &mut core, "before", 5, t0());
    leader.apply(set).await.unwrap();

    g.peers = all.clone();
    pending.push((4, g.start(4)));
    let led = tokenfab_store_raft::change_members(&three, Ok((4, all[&4].clone())), None)
        .await
        .expect("4 added");
    assert_eq!(led, leader_id);
    voters_become(&leader, &[1, 2, 3, 4]).await;
    let (_, set) = conformance::submit(&leader, &mut core, "after-add", 3, t0());
    leader.apply(set).await.expect("committed by 3 of 4");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = tokenfab_store_raft::members(&all, None).await;
        let four = rows
            .iter()
            .find(|(i, _, _)| *i == 4)
            .and_then(|(_, _, s)| s.as_ref().ok());
        if four.is_some_and(|s| s.applied >= leader.status().applied && s.voters == vec![1, 2, 3, 4]) {
            break;
        }
        assert!(Instant::now() < deadline, "4 did not catch up: {rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A follower of the first three is removed: it stops; the group is {leader, other, 4}.
    let gone = (1..=3).find(|i| *i != leader_id).unwrap();
    tokenfab_store_raft::change_members(&all, Err(gone), None)
        .await
        .expect("removed");
    let left: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|i| *i != gone).collect();
    voters_become(&leader, &left).await;
    let i = pending.iter().position(|(id, _)| *id == gone).unwrap();
    let (_, t) = pending.remove(i);
    t.abort();

    // The leader stops: the two left (the other original and 4) are a majority of three
    // and elect one of them, which serves everything.
    let want = leader.load().await.unwrap();
    let want_body = body(&leader, id, 4).await;
    drop(leader);
    let (next_id, next) = first_leader(&mut pending, Duration::from_secs(10)).await;
    assert!(next_id != leader_id && next_id != gone, "{next_id}");
    assert_eq!(next.load().await.unwrap(), want);
    assert_eq!(body(&next, id, 4).await, want_body);
    assert_eq!(next.status().voters.len(), 3);
    for (_, t) in pending {
        t.abort();
    }
}

/// Waits (up to 5 s) until `s` reports `voters`.
async fn voters_become(s: &RaftStore, voters: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.status().voters != voters {
        assert!(
            Instant::now() < deadline,
            "voters {:?}, not {voters:?}",
            s.status().voters
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_started_from_a_restored_backup_brings_new_members_the_restored_state() {
    // A control plane's state, backed up as `tokenfab admin backup` does.
    let old = Group::new(1);
    let mut pending = vec![(1, old.start(1))];
    let (_, leader) = first_leader(&mut pending, Duration::from_secs(10)).await;
    let mut core = ControlCore::new(ControlConfig::default());
    let (id, set) = conformance::submit(&leader, &mut core, "acme", 12, t0());
    leader.apply(set).await.unwrap();
    let want = leader.load().await.unwrap();
    let want_body = body(&leader, id, 11).await;
    let mut backup = Vec::new();
    leader.local().backup(&mut backup).unwrap();
    drop(leader);

    // Restored (as `tokenfab admin restore` does) into replica 1 of a new group, which
    // starts as a group of one; replica 2 starts empty and is added.
    let mut g = Group::new(2);
    tokenfab_store::backup::restore(backup.as_slice(), &g.dir(1)).unwrap();
    let both = g.peers.clone();
    g.peers = both
        .iter()
        .filter(|(i, _)| **i == 1)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let mut pending = vec![(1, g.start(1))];
    let (_, one) = first_leader(&mut pending, Duration::from_secs(10)).await;
    assert_eq!(one.load().await.unwrap(), want, "the restored group serves the backup");
    g.peers = both.clone();
    pending.push((2, g.start(2)));
    let alone: BTreeMap<u64, String> = both
        .iter()
        .filter(|(i, _)| **i == 1)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    tokenfab_store_raft::change_members(&alone, Ok((2, both[&2].clone())), None)
        .await
        .expect("2 added");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = tokenfab_store_raft::members(&both, None).await;
        let two = rows
            .iter()
            .find(|(i, _, _)| *i == 2)
            .and_then(|(_, _, s)| s.as_ref().ok());
        if two.is_some_and(|s| s.snapshots_installed >= 1 && s.applied >= one.status().applied) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "2 did not install the restored state: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Leadership moves to the replica that joined empty: it serves the restored state.
    tokenfab_store_raft::transfer_leader(&both, 2, None).await.unwrap();
    let (two_id, two) = first_leader(&mut pending, Duration::from_secs(10)).await;
    assert_eq!(two_id, 2);
    assert_eq!(two.load().await.unwrap(), want);
    assert_eq!(body(&two, id, 11).await, want_body);
    drop(one);
    for (_, t) in pending {
        t.abort();
    }
}
