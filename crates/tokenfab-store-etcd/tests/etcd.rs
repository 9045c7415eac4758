//! The etcd backend against a real etcd (Debian's `etcd-server`, which the test command
//! installs), started by each test on loopback ports of its own and stopped at its end
//! ([`tokenfab_store_etcd::testing::Etcd`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tokenfab_core::control::{ControlConfig, ControlCore};
use tokenfab_core::{RequestRef, Timestamp};
use tokenfab_store::{Store, conformance};
use tokenfab_store_etcd::testing::Etcd;
use tokenfab_store_etcd::{EtcdOptions, EtcdStore};

async fn etcd() -> Option<Etcd> {
    Etcd::start().await
}

fn options(etcd: &Etcd, name: &str) -> EtcdOptions {
    let mut o = EtcdOptions::new(vec![etcd.url.clone()], "/tokenfab/test", name);
    o.lease_ttl_s = 2;
    // Small parts, so that the tests' files and commits span several.
    o.part_bytes = 512;
    o
}

async fn open(opts: EtcdOptions, dir: &Path) -> EtcdStore {
    EtcdStore::open(opts, dir, Box::new(|_| {})).await.expect("opened")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_passes_the_conformance_suite() {
    let Some(etcd) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let opts = options(&etcd, "cp-0");
    conformance::check(|| {
        // The suite opens synchronously; the store's open talks to etcd.
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(open(opts.clone(), &path)))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_is_elected_when_the_leader_stops_and_serves_everything_it_committed() {
    let Some(etcd) = etcd().await else { return };
    let dirs = tempfile::tempdir().unwrap();
    let a = open(options(&etcd, "cp-a"), &dirs.path().join("a")).await;
    let mut core = ControlCore::new(ControlConfig::default());
    let t = Timestamp::from_millis(1_700_000_000_000);
    let mut ids = Vec::new();
    for (i, lines) in [3usize, 40, 1].into_iter().enumerate() {
        let (id, set) = conformance::submit(&a, &mut core, &format!("tenant{i}"), lines, t);
        a.apply(set).await.expect("committed");
        ids.push(id);
    }
    let want = a.load().await.unwrap();
    let body = |s: &EtcdStore, batch, index| {
        let s = s.clone();
        async move {
            s.bodies(vec![RequestRef { batch, index }]).await.unwrap()[0]
                .clone()
                .expect("a body")
                .body
        }
    };
    let want_body = body(&a, ids[1], 39).await;

    // B waits while A holds the election.
    let b_dir = dirs.path().join("b");
    let waited = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let b = tokio::spawn({
        let (opts, waited) = (options(&etcd, "cp-b"), waited.clone());
        async move {
            EtcdStore::open(
                opts,
                &b_dir,
                Box::new(move |leader| waited.lock().unwrap().push(leader.to_string())),
            )
            .await
            .expect("opened")
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!b.is_finished(), "B was elected while A held the lease");
    assert_eq!(waited.lock().unwrap().first().map(String::as_str), Some("cp-a"));

    // A stops (its lease is no longer renewed): B is elected within the lease's life.
    let stopped = Instant::now();
    drop(a);
    let b = tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .expect("B elected")
        .unwrap();
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?} with a 2 s lease");
    let got = b.load().await.unwrap();
    assert_eq!(got, want, "B serves what A committed");
    assert_eq!(body(&b, ids[1], 39).await, want_body);
    assert_eq!(b.next_seq().await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_commit() {
    let Some(etcd) = etcd().await else { return };
    let dirs = tempfile::tempdir().unwrap();
    let a = open(options(&etcd, "cp-a"), &dirs.path().join("a")).await;
    let mut core_a = ControlCore::new(ControlConfig::default());
    let t = Timestamp::from_millis(1_700_000_000_000);
    let (_, set) = conformance::submit(&a, &mut core_a, "acme", 2, t);
    a.apply(set).await.unwrap();

    // A's lease ends as if A had hung past its life (the lease revoked from outside), and
    // B is elected.
    let mut c = etcd_client::Client::connect([etcd.url.as_str()], None).await.unwrap();
    let leader = c.get("/tokenfab/test/leader", None).await.unwrap();
    let lease = leader.kvs()[0].lease();
    c.lease_revoke(lease).await.unwrap();
    let b = open(options(&etcd, "cp-b"), &dirs.path().join("b")).await;

    // A, not yet aware, tries to commit: refused, and A learns it is deposed.
    let (_, late) = conformance::submit(&a, &mut core_a, "acme", 5, t);
    let err = a.apply(late).await.unwrap_err();
    assert!(err.to_string().contains("no longer the elected one"), "{err}");
    let why = tokio::time::timeout(Duration::from_secs(5), a.deposed())
        .await
        .expect("deposed");
    assert!(!why.is_empty());

    // B commits (with ids from the same core, standing in for B's core rebuilt from the
    // store); the log holds B's commit and not A's refused one.
    let (_, set) = conformance::submit(&b, &mut core_a, "other", 1, t);
    b.apply(set).await.unwrap();
    let mut tenants: BTreeMap<String, usize> = BTreeMap::new();
    for batch in b.load().await.unwrap().batches {
        *tenants.entry(batch.batch.meta.tenant.to_string()).or_default() += batch.batch.requests.len();
    }
    assert_eq!(tenants, BTreeMap::from([("acme".into(), 2), ("other".into(), 1)]));
    drop(b);
    drop(a);
}
