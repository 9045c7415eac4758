//! TLS on every listener and mutual TLS for agents, with real processes and certificates
//! made for the test (rcgen): a private CA, a control-plane certificate for 127.0.0.1, and
//! one certificate per node naming it.
//!
//! - A tenant (the CLI) and an agent reach the control plane over TLS; a batch completes.
//! - An agent must present a certificate that names its node: a call for node `n2` with
//!   `n1`'s certificate (even with `n2`'s valid token) is refused, and so is one without
//!   a certificate. Plain-text clients cannot talk to the TLS port.
//! - The HTTP listener serves TLS too, and its endpoints require the HTTP token.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokenfab_proto::v1 as pb;
use tokenfab_proto::v1::agent_service_client::AgentServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const TENANT: &str = "acme-token";
const AGENT: &str = "agent-secret-of-the-tests";
const HTTP_TOKEN: &str = "metrics-reader-token";

struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    n1: (PathBuf, PathBuf),
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tokenfab test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |cn: &str, names: Vec<SanType>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.subject_alt_names = names;
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let server = leaf("control plane", vec![SanType::IpAddress("127.0.0.1".parse().unwrap())]);
    let n1 = leaf("n1", vec![SanType::DnsName("n1".try_into().unwrap())]);
    Pki {
        ca: write(dir, "ca.pem", &ca.pem()),
        server: (write(dir, "server.pem", &server.0), write(dir, "server.key", &server.1)),
        n1: (write(dir, "n1.pem", &n1.0), write(dir, "n1.key", &n1.1)),
    }
}

async fn agent_call(url: &str, pki: &Pki, cert: bool, node: &str) -> Result<(), tonic::Status> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).unwrap()));
    if cert {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&pki.n1.0).unwrap(),
            std::fs::read(&pki.n1.1).unwrap(),
        ));
    }
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {}", tokenfab_identity::node_token(AGENT, node))
        .parse()
        .unwrap();
    let mut c = AgentServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", token.clone());
        Ok(r)
    });
    c.register(pb::RegisterRequest {
        node: node.into(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

fn curl(args: &[&str]) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is needed by this test (Debian package curl)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let body = format!("{body}{}", String::from_utf8_lossy(&out.stderr));
    (body, code.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_speaks_tls_and_agents_prove_their_node_with_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let token_file = write(dir.path(), "http-token", HTTP_TOKEN);
    let metrics = format!("127.0.0.1:{}", free_port());
    let (server, addr) = start_server(
        dir.path(),
        &[
            "--tenant",
            &format!("acme={TENANT}"),
            "--metrics-listen",
            &metrics,
            "--http-token-file",
            token_file.to_str().unwrap(),
            "--tls-cert",
            pki.server.0.to_str().unwrap(),
            "--tls-key",
            pki.server.1.to_str().unwrap(),
            "--agent-ca",
            pki.ca.to_str().unwrap(),
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    let url = format!("https://127.0.0.1:{}", addr.port());
    let (emu, engine) = spawn_emu(dir.path(), "emu", 10.0);
    let agent = Proc::spawn(
        "agent-n1",
        dir.path(),
        &[
            "agent",
            "--control",
            &url,
            "--node",
            "n1",
            "--tls-ca",
            pki.ca.to_str().unwrap(),
            "--tls-cert",
            pki.n1.0.to_str().unwrap(),
            "--tls-key",
            pki.n1.1.to_str().unwrap(),
            "--replica",
            &format!("url={engine},model=llama-3.1-8b,window=8"),
        ],
        &[("TOKENFAB_AGENT_TOKEN", AGENT)],
    );
    let procs = [server, emu, agent];
    wait_registered(&procs, Duration::from_secs(30)).await;

    // A tenant submits over TLS with the CLI and the batch runs to completion.
    let input = write(
        dir.path(),
        "batch.jsonl",
        &(0..6)
            .map(|i| chat_line(&format!("t{i}"), 8))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let env = [
        ("TOKENFAB_TOKEN", TENANT),
        ("TOKENFAB_TLS_CA", pki.ca.to_str().unwrap()),
    ];
    let out = run_cli(
        &[
            "submit",
            input.to_str().unwrap(),
            "--model",
            "llama-3.1-8b",
            "--control",
            &url,
        ],
        &env,
    );
    let id = out.split_whitespace().next().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = run_cli(&["batches", "get", &id, "--control", &url], &env);
        if shown.contains("6 lines: 6 completed, 0 failed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{shown}\n{}\n{}",
            procs[0].log(),
            procs[2].log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // n1's certificate does not make anyone n2, even with n2's valid node token.
    let e = agent_call(&url, &pki, true, "n2").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("the client certificate does not name node 'n2'"),
        "{}",
        e.message()
    );
    let e = agent_call(&url, &pki, false, "n1").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("requires agents to present a client certificate"),
        "{}",
        e.message()
    );
    agent_call(&url, &pki, true, "n1")
        .await
        .expect("n1 with its certificate and token");

    // Plain text does not get through.
    let plain = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let e = tokenfab_proto::v1::batch_service_client::BatchServiceClient::new(plain)
        .list_batches(pb::ListBatchesRequest::default())
        .await
        .unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);

    // The HTTP listener: TLS, and the token for everything but /healthz.
    let base = format!("https://{metrics}");
    let ca = pki.ca.to_str().unwrap();
    let (body, code) = curl(&["--cacert", ca, &format!("{base}/metrics")]);
    assert_eq!(code, "401", "{body}");
    let (body, code) = curl(&[
        "--cacert",
        ca,
        "-H",
        &format!("Authorization: Bearer {HTTP_TOKEN}"),
        &format!("{base}/metrics"),
    ]);
    assert_eq!(code, "200");
    assert!(body.contains("tokenfab_control_results_recorded_total"), "{body}");
    let (body, code) = curl(&["--cacert", ca, &format!("{base}/healthz")]);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    let (_, code) = curl(&[&format!("http://{metrics}/healthz")]);
    assert_ne!(code, "200", "plain HTTP is not served");
}
