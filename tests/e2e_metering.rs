//! Per-tenant energy metering, end to end with real processes on loopback: one control
//! plane with two tenants and an operator token, two agents, each driving one engine
//! emulator (an emulated H100 at 20x time). Every joule the devices drew while the agents
//! ran is charged to a tenant: the energy attributed to their results plus their share of
//! idle energy adds up to what the devices' energy counters measured between each agent's
//! first and last reading (which each agent logs when it stops, and which the test
//! brackets with its own reads of the counters before the agents start and after they
//! stop).

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokenfab_proto::v1 as pb;

const ACME: &str = "acme-token";
const GLOBEX: &str = "globex-token";
const ADMIN: &str = "operator-token";
const AGENT: &str = "agent-secret-of-the-tests";

fn batch(prefix: &str, n: usize, max_tokens: u32) -> Vec<u8> {
    (0..n)
        .map(|i| chat_line(&format!("{prefix}-{i:05}"), max_tokens))
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

async fn submit(addr: SocketAddr, token: &str, prefix: &str, n: usize, max_tokens: u32) -> String {
    let mut client = tenant_client(addr, token).await;
    client
        .create_batch(pb::CreateBatchRequest {
            options: Some(pb::BatchOptions {
                model: "llama-3.1-8b".into(),
                completion_window_seconds: 3600,
                ..Default::default()
            }),
            input_jsonl: batch(prefix, n, max_tokens).into(),
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap()
        .id
}

async fn usage(addr: SocketAddr, token: &str, tenant: &str) -> Result<pb::TenantUsage, tonic::Status> {
    let mut client = tenant_client(addr, token).await;
    client
        .get_usage(pb::GetUsageRequest {
            since_unix_ms: 0,
            tenant: tenant.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_charged_every_joule_the_devices_drew_idle_share_included() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = start_server(
        dir.path(),
        &[
            "--tenant",
            &format!("acme={ACME}"),
            "--tenant",
            &format!("globex={GLOBEX}"),
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT), ("TOKENFAB_ADMIN_TOKEN", ADMIN)],
    );
    let (emu0, url0) = spawn_emu(dir.path(), "emu0", 20.0);
    let (emu1, url1) = spawn_emu(dir.path(), "emu1", 20.0);
    // acme runs three times as much as globex. The work is queued before the agents start,
    // so that they are busy from their first reading: idle energy before any tenant has
    // used the cluster is the operator's, charged to nobody.
    let mut ids = Vec::new();
    for (token, prefix, n) in [(ACME, "a1", 300), (GLOBEX, "g1", 200), (ACME, "a2", 300)] {
        ids.push((token, submit(addr, token, prefix, n, 200).await));
    }
    // The devices' energy counters just before the agents start.
    let before = emu_energy_j(&url0).await + emu_energy_j(&url1).await;
    let control = format!("http://{addr}");
    let agent0 = spawn_agent(dir.path(), "node0", &control, &url0, 64, AGENT);
    let agent1 = spawn_agent(dir.path(), "node1", &control, &url1, 64, AGENT);
    let mut procs = [emu0, emu1, agent0, agent1];
    wait_registered(&procs, Duration::from_secs(30)).await;
    for (token, id) in &ids {
        wait_completed(addr, token, id, Duration::from_secs(120), &procs).await;
    }
    // Let the cluster idle for a while (120 emulated seconds at 20x): the agents read
    // their idle devices every 5 s and report the idle energy in their heartbeats.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // A graceful stop: each agent takes a last reading and sends it in a last heartbeat.
    for p in procs.iter_mut().filter(|p| p.name.starts_with("agent")) {
        let status = p.terminate(Duration::from_secs(30));
        assert!(status.success(), "{} exited with {status}:\n{}", p.name, p.log());
    }
    let after = emu_energy_j(&url0).await + emu_energy_j(&url1).await;
    let bracket = after - before;
    // What each agent's devices measured between its first and last reading.
    let measured: f64 = procs
        .iter()
        .filter(|p| p.name.starts_with("agent"))
        .map(|p| {
            let log = p.log();
            let line = log
                .lines()
                .find(|l| l.contains("books closed"))
                .unwrap_or_else(|| panic!("{} logged no closed books:\n{log}", p.name));
            let value = line
                .split("measured_j=")
                .nth(1)
                .and_then(|v| v.split_whitespace().next());
            value
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{line}"))
        })
        .sum();
    // The agents read the same counters inside the test's bracket: a little less (the
    // moments before their first and after their last reading are outside their books).
    assert!(
        measured <= bracket && measured > 0.97 * bracket,
        "agents measured {measured:.1} J, the counters rose {bracket:.1} J from before the agents started to after they stopped"
    );

    let acme = usage(addr, ADMIN, "acme").await.unwrap();
    let globex = usage(addr, ADMIN, "globex").await.unwrap();
    let charged = |u: &pb::TenantUsage| u.usage.unwrap().joules + u.idle_joules;
    let total = charged(&acme) + charged(&globex);
    let idle = acme.idle_joules + globex.idle_joules;
    eprintln!(
        "devices drew {measured:.0} J between the agents' first and last readings ({bracket:.0} J from before the agents started to after they stopped); tenants were charged {total:.0} J ({:.0} J attributed + {idle:.0} J idle share); difference {:+.4}%",
        total - idle,
        (total / measured - 1.0) * 100.0
    );
    assert!(
        (total / measured - 1.0).abs() < 1e-3,
        "tenants were charged {total:.1} J but the devices drew {measured:.1} J"
    );
    assert!(
        idle > 0.1 * measured,
        "the idle minutes are a real share of the energy: {idle:.0} of {measured:.0} J"
    );
    // Idle energy follows attributed energy: acme used three times globex's devices.
    let ratio = acme.idle_joules / globex.idle_joules;
    let used = acme.usage.unwrap().joules / globex.usage.unwrap().joules;
    assert!(
        (ratio / used - 1.0).abs() < 0.05,
        "idle share ratio {ratio:.2}, use ratio {used:.2}"
    );
    assert!(acme.idle_cost_usd > 0.0);

    // Who may read whose usage.
    let own = usage(addr, GLOBEX, "").await.unwrap();
    assert_eq!((own.tenant.as_str(), own.idle_joules), ("globex", globex.idle_joules));
    let denied = usage(addr, GLOBEX, "acme").await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");
    assert!(denied.message().contains("admin token"), "{}", denied.message());
    let unnamed = usage(addr, ADMIN, "").await.unwrap_err();
    assert_eq!(unnamed.code(), tonic::Code::InvalidArgument, "{unnamed}");
    let unknown = usage(addr, ADMIN, "initech").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown}");
    assert!(unknown.message().contains("acme, globex"), "{}", unknown.message());
    let out = run_cli(
        &["usage", "--tenant", "globex"],
        &[
            ("TOKENFAB_CONTROL", &format!("http://{addr}")),
            ("TOKENFAB_TOKEN", ADMIN),
        ],
    );
    assert!(out.contains("globex") && out.contains("idle energy share"), "{out}");
}
