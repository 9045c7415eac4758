//! A network namespace the test makes itself, with two veth links to the root namespace:
//! one for clients, one to the rest of the system (etcd, or the other replicas), so that a
//! test can cut the second and keep the first (a partition with the clients on the cut-off
//! side). Removed when dropped.

pub struct Netns {
    pub name: String,
    /// Where clients reach the process in the namespace (its end of the first link).
    pub client_ip: String,
    /// The root side of the second link, and the namespace's side.
    pub peer_root_ip: String,
    pub peer_ns_ip: String,
    client_link: String,
    peer_link: String,
}

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    /// `None` (after saying why) where namespaces cannot be made (not root, no `ip`),
    /// unless `TOKENFAB_REQUIRE_NETNS=1` (set by the test command where they can).
    pub fn create() -> Option<Netns> {
        let id = std::process::id() % 100_000;
        let subnet = std::process::id() % 250;
        let n = Netns {
            name: format!("tf-part-{id}"),
            client_ip: format!("10.231.{subnet}.2"),
            peer_root_ip: format!("10.232.{subnet}.1"),
            peer_ns_ip: format!("10.232.{subnet}.2"),
            client_link: format!("tfc{id}"),
            peer_link: format!("tfe{id}"),
        };
        if !ip(&["netns", "add", &n.name]) {
            assert!(
                std::env::var("TOKENFAB_REQUIRE_NETNS").as_deref() != Ok("1"),
                "TOKENFAB_REQUIRE_NETNS=1 but `ip netns add` failed"
            );
            eprintln!("cannot create a network namespace (needs root and iproute2): the partition test is skipped");
            return None;
        }
        let ns = n.name.clone();
        let exec = |args: &[&str]| ip(&[&["netns", "exec", &ns, "ip"], args].concat());
        let (c0, c1, e1) = (n.client_link.clone(), format!("tfc{id}p"), format!("tfe{id}p"));
        let ok = ip(&["link", "add", &c0, "type", "veth", "peer", "name", &c1])
            && ip(&["link", "set", &c1, "netns", &ns])
            && ip(&["addr", "add", &format!("10.231.{subnet}.1/24"), "dev", &c0])
            && ip(&["link", "set", &c0, "up"])
            && exec(&["addr", "add", &format!("{}/24", n.client_ip), "dev", &c1])
            && exec(&["link", "set", &c1, "up"])
            && ip(&["link", "add", &n.peer_link, "type", "veth", "peer", "name", &e1])
            && ip(&["link", "set", &e1, "netns", &ns])
            && ip(&["addr", "add", &format!("{}/24", n.peer_root_ip), "dev", &n.peer_link])
            && ip(&["link", "set", &n.peer_link, "up"])
            && exec(&["addr", "add", &format!("{}/24", n.peer_ns_ip), "dev", &e1])
            && exec(&["link", "set", &e1, "up"])
            && exec(&["link", "set", "lo", "up"]);
        if !ok {
            assert!(
                std::env::var("TOKENFAB_REQUIRE_NETNS").as_deref() != Ok("1"),
                "TOKENFAB_REQUIRE_NETNS=1 but setting up the links of namespace {ns} failed"
            );
            eprintln!(
                "cannot link a network namespace here (veth pairs need CAP_NET_ADMIN): the partition test is skipped"
            );
            return None; // dropping `n` removes what was made
        }
        Some(n)
    }

    /// Cuts the namespace's second link (to etcd, or to the other replicas).
    pub fn cut_peer_link(&self) {
        assert!(
            ip(&["link", "set", &self.peer_link, "down"]),
            "cannot cut {}",
            self.peer_link
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        ip(&["link", "del", &self.client_link]);
        ip(&["link", "del", &self.peer_link]);
        ip(&["netns", "del", &self.name]);
    }
}
