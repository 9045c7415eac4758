//! Whole operator rounds: nodes discovered, placement planned on the control plane's
//! demand, and the engine Deployments changed through the Kubernetes API.
//!
//! No API server can run where tokenfab is tested (no kube-apiserver, kind, k3s or envtest
//! binary, no container engine), so the API is kube's client over tower-test's mock
//! service, answered request by request in the API's own format; the control plane is a
//! real HTTP server on loopback serving `/v1/tuning` and `/v1/sla` as `tokenfab server`
//! does (its demand written here, not measured).

use http::{Request, Response};
use k8s_openapi::api::core::v1::Node;
use kube::client::Body;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use std::time::Duration;
use tokenfab_kube::api::Retry;
use tokenfab_kube::operator::{self, Mode, Options};
use tokenfab_kube::reconcile::{Memory, Policy};
use tower_test::mock;

mod api_mock;
use api_mock::{Handle, answer};

const NS: &str = "tokenfab";
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/tokenfab/deployments";
const SLA: &str = "/apis/tokenfab.io/v1/namespaces/tokenfab/throughputslas/tokenfab";

/// A control plane whose `/v1/tuning` asks for `tokens_per_s` of llama-3.1-8b and whose
/// `/v1/sla` is not ready yet.
async fn control_plane(tokens_per_s: f64) -> String {
    let tuning = serde_json::json!({
        "replicas": [],
        "fragmentation": {"devices": 0, "free": 0, "stranded": 0},
        "plan": {
            "demand": [{"model": "llama-3.1-8b", "tokens_per_s": tokens_per_s, "prompt_tokens": 512,
                        "output_tokens": 256, "planned_tokens_per_s": 0.0, "unmet_tokens_per_s": 0.0}],
            "replicas_now": 1, "replicas_planned": 1, "start": [], "stop": [],
            "fragmentation_now": {"devices": 0, "free": 0, "stranded": 0},
            "fragmentation_planned": {"devices": 0, "free": 0, "stranded": 0}
        }
    });
    let app = axum::Router::new()
        .route(
            "/v1/tuning",
            axum::routing::get(move || async move { axum::Json(tuning) }),
        )
        .route(
            "/v1/sla",
            axum::routing::get(|| async { (http::StatusCode::SERVICE_UNAVAILABLE, "no SLA yet") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn node(name: &str, product: &str, gpus: u32, labels: &[(&str, &str)]) -> Node {
    let mut l = serde_json::json!({"nvidia.com/gpu.product": product, "nvidia.com/gpu.count": gpus.to_string()});
    for (k, v) in labels {
        l[*k] = serde_json::json!(v);
    }
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": l},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap()
}

/// An H100 node whose device-hours have become dear (8 $/h).
fn dear_h100() -> Node {
    node(
        "gpu-h100-a",
        "NVIDIA-H100-80GB-HBM3",
        8,
        &[("tokenfab.io/usd-per-device-hour", "8")],
    )
}

/// A mock API server and a client talking to it.
fn api() -> (kube::Client, Handle) {
    let (svc, h) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(svc, NS), h)
}

fn nodes(list: Vec<Node>) -> Store<Node> {
    let (reader, mut writer) = reflector::store();
    for n in list {
        writer.apply_watcher_event(&watcher::Event::Apply(n));
    }
    reader
}

/// The chart's engine Deployment of llama-3.1-8b on H100s, as the API server lists it.
fn chart_engine(replicas: i32) -> serde_json::Value {
    let labels = serde_json::json!({
        "app.kubernetes.io/name": "tokenfab", "app.kubernetes.io/instance": "tf",
        "app.kubernetes.io/component": "engine", "app.kubernetes.io/managed-by": "Helm",
        "tokenfab.io/engine": "llama", "tokenfab.io/deployment": "tf-vllm-llama",
        "tokenfab.io/model": "llama-3.1-8b", "tokenfab.io/accelerator": "h100-sxm",
        "tokenfab.io/tensor-parallel": "1"});
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "tf-vllm-llama", "namespace": NS, "uid": "0b7d3c52-1e7f-4f0a-8d7e-3c1b2a9f6e40",
                     "resourceVersion": "700", "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "tokenfab", "app.kubernetes.io/instance": "tf",
                                         "app.kubernetes.io/component": "engine", "tokenfab.io/deployment": "tf-vllm-llama"}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{
                    "name": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                    "args": ["--model=meta-llama/Llama-3.1-8B-Instruct", "--tensor-parallel-size=1"],
                    "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
            }
        }
    })
}

fn list(items: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({"apiVersion": "apps/v1", "kind": "DeploymentList", "metadata": {"resourceVersion": "900"}, "items": items})
}

fn not_found() -> serde_json::Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": "throughputslas.tokenfab.io \"tokenfab\" not found", "reason": "NotFound", "code": 404})
}

/// The requests that publish the SLA (the control plane's is not ready: the object is
/// created and its status says so).
async fn sla_calls(h: &mut Handle) {
    answer(h, "GET", SLA, 404, not_found()).await;
    answer(h, "GET", SLA, 404, not_found()).await;
    let obj = serde_json::json!({"apiVersion": "tokenfab.io/v1", "kind": "ThroughputSLA",
        "metadata": {"name": "tokenfab", "namespace": NS, "resourceVersion": "1"},
        "spec": {"controlPlaneUrl": "http://x", "refreshSeconds": 30}});
    answer(
        h,
        "POST",
        "/apis/tokenfab.io/v1/namespaces/tokenfab/throughputslas",
        201,
        obj.clone(),
    )
    .await;
    let status = answer(h, "PATCH", &format!("{SLA}/status"), 200, obj).await;
    assert_eq!(status["status"]["conditions"][0]["status"], "False", "{status}");
}

fn options(control_url: String) -> Options {
    Options {
        namespace: NS.into(),
        control_url,
        http_token: None,
        mode: Mode::Active,
        interval: Duration::from_secs(30),
        policy: Policy {
            min_interval_s: 300,
            scale_down_after_s: 600,
            max_step: 2,
        },
        agent_selector: "app.kubernetes.io/component=agent".into(),
        engine_selector: String::new(),
        follow_drain: false,
        create_engines: true,
        sla_name: "tokenfab".into(),
        retry: Retry {
            attempts: 3,
            backoff: Duration::from_millis(10),
        },
    }
}

#[tokio::test]
async fn a_model_moves_to_a_cheaper_pool_that_had_no_deployment_make_before_break() {
    let url = control_plane(200.0).await;
    let (client, mut h) = api();
    // H100 device-hours have become dear here; an L40S node is cheap.
    let store = nodes(vec![
        dear_h100(),
        node(
            "gpu-l40s-a",
            "NVIDIA-L40S",
            4,
            &[("tokenfab.io/usd-per-device-hour", "0.5")],
        ),
    ]);
    let opts = options(url);
    let mut memory = Memory::default();

    // Round 1: the L40S kind has no Deployment; the operator makes one from the chart's.
    let round = {
        let (client, store, opts) = (client.clone(), store.clone(), opts.clone());
        tokio::spawn(async move {
            let r = operator::round(&client, &store, &opts, &mut memory, 1_000).await;
            (r, memory)
        })
    };
    answer(&mut h, "GET", DEPLOYMENTS, 200, list(vec![chart_engine(1)])).await;
    let created = answer(&mut h, "POST", DEPLOYMENTS, 201, serde_json::json!({})).await;
    assert_eq!(created["metadata"]["name"], "tf-vllm-llama-l40s-tp1");
    assert_eq!(created["metadata"]["labels"]["tokenfab.io/accelerator"], "l40s");
    assert_eq!(created["spec"]["replicas"], 1);
    let terms = &created["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    assert_eq!(
        terms[1]["matchExpressions"][0]["values"],
        serde_json::json!(["NVIDIA-L40S"])
    );
    sla_calls(&mut h).await;
    let (r, mut memory) = round.await.unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.created, ["tf-vllm-llama-l40s-tp1"]);
    assert!(
        r.scaled.is_empty(),
        "the H100 replica keeps serving until the new one has"
    );
    let decision = r.decision.unwrap();
    assert_eq!(decision.held[0].0, "tf-vllm-llama", "{decision:?}");

    // Round 2, scale_down_after later: the new replica runs; the H100 one is stopped.
    let mut derived = created.clone();
    derived["metadata"]["uid"] = "1f0e".into();
    derived["metadata"]["resourceVersion"] = "901".into();
    let round = {
        let (client, store, opts) = (client.clone(), store.clone(), opts.clone());
        tokio::spawn(async move { operator::round(&client, &store, &opts, &mut memory, 1_600).await })
    };
    answer(&mut h, "GET", DEPLOYMENTS, 200, list(vec![chart_engine(1), derived])).await;
    answer(
        &mut h,
        "GET",
        &format!("{DEPLOYMENTS}/tf-vllm-llama"),
        200,
        chart_engine(1),
    )
    .await;
    let put = answer(
        &mut h,
        "PUT",
        &format!("{DEPLOYMENTS}/tf-vllm-llama"),
        200,
        chart_engine(0),
    )
    .await;
    assert_eq!(put["spec"]["replicas"], 0);
    sla_calls(&mut h).await;
    let r = round.await.unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.scaled, ["tf-vllm-llama"]);
    assert!(r.created.is_empty() && r.deleted.is_empty());
}

#[tokio::test]
async fn on_a_super_node_the_engine_is_pinned_to_it_and_advisory_mode_changes_nothing() {
    let url = control_plane(200.0).await;
    let (client, mut h) = api();
    let store = nodes(vec![node(
        "gpu-h100-a",
        "NVIDIA-H100-80GB-HBM3",
        8,
        &[("nvidia.com/gpu.clique", "nvl-clique-7")],
    )]);
    let mut opts = options(url);

    opts.mode = Mode::Advisory;
    let round = {
        let (client, store, opts) = (client.clone(), store.clone(), opts.clone());
        tokio::spawn(async move { operator::round(&client, &store, &opts, &mut Memory::default(), 1_000).await })
    };
    answer(&mut h, "GET", DEPLOYMENTS, 200, list(vec![chart_engine(1)])).await;
    // No POST: the next request is already the SLA's.
    sla_calls(&mut h).await;
    let r = round.await.unwrap();
    assert!(r.created.is_empty() && r.errors.is_empty(), "{r:?}");
    assert_eq!(
        r.decision.unwrap().missing[0]
            .0
            .super_node
            .as_ref()
            .map(|p| p.value.as_str()),
        Some("nvl-clique-7")
    );

    opts.mode = Mode::Active;
    let round =
        tokio::spawn(async move { operator::round(&client, &store, &opts, &mut Memory::default(), 1_000).await });
    answer(&mut h, "GET", DEPLOYMENTS, 200, list(vec![chart_engine(1)])).await;
    let created = answer(&mut h, "POST", DEPLOYMENTS, 201, serde_json::json!({})).await;
    assert_eq!(created["metadata"]["name"], "tf-vllm-llama-h100-sxm-tp1-nvl-clique-7");
    assert_eq!(created["metadata"]["labels"]["tokenfab.io/super-node"], "nvl-clique-7");
    let terms = created["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .as_array()
        .unwrap()
        .clone();
    for t in &terms {
        assert!(
            t["matchExpressions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["key"] == "nvidia.com/gpu.clique" && e["values"][0] == "nvl-clique-7"),
            "{t}"
        );
    }
    sla_calls(&mut h).await;
    let r = round.await.unwrap();
    assert_eq!(r.created.len(), 1, "{r:?}");
}

#[tokio::test]
async fn a_forbidden_create_is_reported_with_the_permission_to_grant() {
    let url = control_plane(200.0).await;
    let (client, mut h) = api();
    let store = nodes(vec![dear_h100(), node("gpu-l40s-a", "NVIDIA-L40S", 4, &[])]);
    let opts = options(url);
    let round =
        tokio::spawn(async move { operator::round(&client, &store, &opts, &mut Memory::default(), 1_000).await });
    answer(&mut h, "GET", DEPLOYMENTS, 200, list(vec![chart_engine(1)])).await;
    answer(
        &mut h,
        "POST",
        DEPLOYMENTS,
        403,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Forbidden", "code": 403,
            "message": "deployments.apps is forbidden: User \"system:serviceaccount:tokenfab:tf-operator\" cannot create resource \"deployments\" in API group \"apps\" in the namespace \"tokenfab\""}),
    )
    .await;
    sla_calls(&mut h).await;
    let r = round.await.unwrap();
    assert!(r.created.is_empty());
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(
        r.errors[0].contains("may not create deployment tf-vllm-llama-l40s-tp1") && r.errors[0].contains("Grant it"),
        "{}",
        r.errors[0]
    );
}
