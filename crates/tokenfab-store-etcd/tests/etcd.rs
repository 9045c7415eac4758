//! The etcd backend against a real etcd (Debian's `etcd-server`, which the test command
//! installs), started by each test on loopback ports of its own and stopped at its end.
//! Without an `etcd` binary the tests say so and pass, unless `TOKENFAB_REQUIRE_ETCD=1`
//! (set by the test command), where its absence fails them.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokenfab_core::control::{ControlConfig, ControlCore};
use tokenfab_core::{RequestRef, Timestamp};
use tokenfab_store::{Store, conformance};
use tokenfab_store_etcd::{EtcdOptions, EtcdStore};

/// A real etcd on loopback, killed when dropped.
struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn etcd_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TOKENFAB_ETCD") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    })
}

/// Starts etcd, or returns `None` (after saying why) where there is none and none is required.
async fn etcd() -> Option<Etcd> {
    let Some(bin) = etcd_binary() else {
        assert!(
            std::env::var("TOKENFAB_REQUIRE_ETCD").as_deref() != Ok("1"),
            "TOKENFAB_REQUIRE_ETCD=1 but no etcd binary: install Debian's etcd-server (scripts/setup-test-deps.sh does)"
        );
        eprintln!("no etcd binary on PATH (Debian: apt-get install etcd-server): the etcd tests are skipped");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new(bin)
        .args(["--name", "t", "--data-dir"])
        .arg(dir.path().join("etcd"))
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting etcd");
    let e = Etcd {
        child,
        url: url.clone(),
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = etcd_client::Client::connect([url.as_str()], None).await
            && c.get("probe", None).await.is_ok()
        {
            return Some(e);
        }
        assert!(Instant::now() < deadline, "etcd did not start on {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
            EtcdStore::open(opts, &b_dir, Box::new(move |leader| waited.lock().unwrap().push(leader.to_string())))
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
    let why = tokio::time::timeout(Duration::from_secs(5), a.deposed()).await.expect("deposed");
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
