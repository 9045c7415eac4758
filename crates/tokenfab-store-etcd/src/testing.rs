//! A real etcd on loopback for tests (this crate's and the end-to-end failover tests):
//! Debian's `etcd-server` binary, on ports of its own, with its data in a temporary
//! directory, killed when dropped. Without an `etcd` binary, [`Etcd::start`] says so and
//! returns `None`, unless `TOKENFAB_REQUIRE_ETCD=1` (the test command sets it), where it
//! panics.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd.
pub struct Etcd {
    child: Child,
    /// Its client URL.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Option<Etcd> {
        let Some(bin) = binary() else {
            assert!(
                std::env::var("TOKENFAB_REQUIRE_ETCD").as_deref() != Ok("1"),
                "TOKENFAB_REQUIRE_ETCD=1 but no etcd binary: install Debian's etcd-server (scripts/setup-test-deps.sh does)"
            );
            eprintln!("no etcd binary on PATH (Debian: apt-get install etcd-server): the etcd tests are skipped");
            return None;
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(bin)
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
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
}
