//! A real etcd on loopback for tests (this crate's and the end-to-end failover tests):
//! Debian's `etcd-server` binary, on ports of its own, with its data in a temporary
//! directory, killed when dropped. Without an `etcd` binary, [`Etcd::start`] says so and
//! returns `None`, unless `TOKENFAB_REQUIRE_ETCD=1` (the test command sets it), where it
//! panics.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd: one member, or a cluster of several on loopback.
pub struct Etcd {
    children: Vec<Child>,
    /// The first member's client URL.
    pub url: String,
    /// Every member's client URL (and, with `start_also_on`, the extra one last).
    pub urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TOKENFAB_ETCD") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    })
}

impl Etcd {
    /// Starts a one-member etcd and waits until it answers.
    pub async fn start() -> Option<Etcd> {
        Etcd::cluster(1).await
    }

    /// Starts an etcd cluster of `members` on loopback and waits until it answers.
    pub async fn cluster(members: usize) -> Option<Etcd> {
        Etcd::cluster_also_on(members, None).await
    }

    /// A one-member etcd that also listens for clients on `ip` (an address of this
    /// network namespace, e.g. one end of a veth pair a test made); `urls[1]` is that URL.
    pub async fn start_also_on(ip: &str) -> Option<Etcd> {
        Etcd::cluster_also_on(1, Some(ip)).await
    }

    async fn cluster_also_on(members: usize, also: Option<&str>) -> Option<Etcd> {
        let Some(bin) = binary() else {
            assert!(
                std::env::var("TOKENFAB_REQUIRE_ETCD").as_deref() != Ok("1"),
                "TOKENFAB_REQUIRE_ETCD=1 but no etcd binary: install Debian's etcd-server (scripts/setup-test-deps.sh does)"
            );
            eprintln!("no etcd binary on PATH (Debian: apt-get install etcd-server): the etcd tests are skipped");
            return None;
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
        let mut urls: Vec<String> = ports.iter().map(|(c, _)| format!("http://127.0.0.1:{c}")).collect();
        let peers: Vec<String> = ports.iter().map(|(_, p)| format!("http://127.0.0.1:{p}")).collect();
        let initial: Vec<String> = peers.iter().enumerate().map(|(i, p)| format!("m{i}={p}")).collect();
        let mut children = Vec::new();
        let extra = also.map(|ip| format!("http://{ip}:{}", ports[0].0));
        for i in 0..members {
            let listen = match (&extra, i) {
                (Some(e), 0) => format!("{},{e}", urls[0]),
                _ => urls[i].clone(),
            };
            children.push(
                Command::new(&bin)
                    .args(["--name", &format!("m{i}"), "--data-dir"])
                    .arg(dir.path().join(format!("m{i}")))
                    .args(["--listen-client-urls", &listen, "--advertise-client-urls", &urls[i]])
                    .args([
                        "--listen-peer-urls",
                        &peers[i],
                        "--initial-advertise-peer-urls",
                        &peers[i],
                    ])
                    .args([
                        "--initial-cluster",
                        &initial.join(","),
                        "--initial-cluster-state",
                        "new",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("starting etcd"),
            );
        }
        let probe = urls.clone();
        urls.extend(extra);
        let e = Etcd {
            children,
            url: urls[0].clone(),
            urls,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A write answers once the members have elected a leader.
            if let Ok(mut c) = etcd_client::Client::connect(&probe, None).await
                && c.put("probe", "1", None).await.is_ok()
            {
                return Some(e);
            }
            assert!(Instant::now() < deadline, "etcd did not start on {}", probe.join(","));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
