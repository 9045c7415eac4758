//! The operator against the Kubernetes API's failures. No API server can run where
//! tokenfab is tested (no kube-apiserver, kind, k3s or envtest binary, no container
//! engine), so these tests use kube's client over tower-test's mock service: each test
//! plays the API server's side, request by request, answering with bodies in the API's
//! own format (Status objects for errors, watch events as JSON lines).

use http::{Request, Response};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::client::Body;
use std::time::Duration;
use tokenfab_kube::api::{self, ApiFailure, Retry};
use tokenfab_kube::crd::{ThroughputSLA, ThroughputSlaSpec, ThroughputSlaStatus};
use tower_test::mock;

mod api_mock;
use api_mock::{Handle, answer};

fn client() -> (kube::Client, Handle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(svc, "tokenfab"), handle)
}

const FAST: Retry = Retry {
    attempts: 4,
    backoff: Duration::from_millis(10),
};

/// A Status object as the API server sends with an error.
fn status(code: u16, reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code
    })
}

fn deployment(rv: &str, replicas: i32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "vllm-llama-h100", "namespace": "tokenfab", "resourceVersion": rv,
                     "labels": {"tokenfab.io/model": "llama-3.1-8b", "tokenfab.io/accelerator": "h100-sxm"}},
        "spec": {"replicas": replicas,
                 "selector": {"matchLabels": {"app": "vllm"}},
                 "template": {"metadata": {"labels": {"app": "vllm"}},
                              "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0"}]}}}
    })
}

const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/tokenfab/deployments/vllm-llama-h100";

#[tokio::test]
async fn a_conflict_is_answered_by_reading_again_and_retrying() {
    let (client, mut h) = client();
    let api: Api<Deployment> = Api::namespaced(client, "tokenfab");
    let task = tokio::spawn(async move { api::scale(&api, "vllm-llama-h100", 3, FAST).await });
    answer(&mut h, "GET", DEPLOYMENT, 200, deployment("100", 1)).await;
    let first = answer(
        &mut h,
        "PUT",
        DEPLOYMENT,
        409,
        status(
            409,
            "Conflict",
            "Operation cannot be fulfilled on deployments.apps \"vllm-llama-h100\": the object has been modified; please apply your changes to the latest version and try again",
        ),
    )
    .await;
    assert_eq!(first["spec"]["replicas"], 3);
    assert_eq!(first["metadata"]["resourceVersion"], "100");
    answer(&mut h, "GET", DEPLOYMENT, 200, deployment("101", 1)).await;
    let second = answer(&mut h, "PUT", DEPLOYMENT, 200, deployment("102", 3)).await;
    assert_eq!(
        second["metadata"]["resourceVersion"], "101",
        "written over what was read again"
    );
    assert_eq!(second["spec"]["replicas"], 3);
    task.await.unwrap().expect("scaled after the conflict");
}

#[tokio::test]
async fn forbidden_is_not_retried_and_names_the_permission() {
    let (client, mut h) = client();
    let api: Api<Deployment> = Api::namespaced(client, "tokenfab");
    let task = tokio::spawn(async move { api::scale(&api, "vllm-llama-h100", 3, FAST).await });
    answer(&mut h, "GET", DEPLOYMENT, 200, deployment("100", 1)).await;
    answer(
        &mut h,
        "PUT",
        DEPLOYMENT,
        403,
        status(
            403,
            "Forbidden",
            "deployments.apps \"vllm-llama-h100\" is forbidden: User \"system:serviceaccount:tokenfab:tokenfab-operator\" cannot update resource \"deployments\" in API group \"apps\" in the namespace \"tokenfab\"",
        ),
    )
    .await;
    let e = task.await.unwrap().unwrap_err();
    assert!(matches!(e, ApiFailure::Forbidden { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("scale deployment vllm-llama-h100")
            && msg.contains("cannot update")
            && msg.contains("service account"),
        "{msg}"
    );
    // No retry: the client made no further request.
    assert!(h.next_request().await.is_none());
}

#[tokio::test]
async fn timeouts_and_unavailable_servers_are_retried_then_given_up_with_the_cause() {
    let (client, mut h) = client();
    let api: Api<Deployment> = Api::namespaced(client.clone(), "tokenfab");
    let task = tokio::spawn(async move { api::scale(&api, "vllm-llama-h100", 2, FAST).await });
    // A transport timeout, then a 503 from a restarting API server, then success.
    let (_, send) = h.next_request().await.unwrap();
    send.send_error(std::io::Error::new(std::io::ErrorKind::TimedOut, "operation timed out"));
    answer(
        &mut h,
        "GET",
        DEPLOYMENT,
        503,
        status(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        ),
    )
    .await;
    answer(&mut h, "GET", DEPLOYMENT, 200, deployment("7", 1)).await;
    answer(&mut h, "PUT", DEPLOYMENT, 200, deployment("8", 2)).await;
    task.await.unwrap().expect("scaled after two transient failures");

    // Always timing out: it gives up after its attempts and says why.
    let api: Api<Deployment> = Api::namespaced(client, "tokenfab");
    let task = tokio::spawn(async move { api::scale(&api, "vllm-llama-h100", 2, FAST).await });
    for _ in 0..FAST.attempts {
        let (_, send) = h.next_request().await.unwrap();
        send.send_error(std::io::Error::new(std::io::ErrorKind::TimedOut, "operation timed out"));
    }
    let e = task.await.unwrap().unwrap_err().to_string();
    assert!(e.contains("gave up after 4 attempts") && e.contains("timed out"), "{e}");
}

#[tokio::test]
async fn the_sla_object_is_created_when_missing_and_its_status_written() {
    let (client, mut h) = client();
    let api: Api<ThroughputSLA> = Api::namespaced(client, "tokenfab");
    let spec = ThroughputSlaSpec {
        control_plane_url: "http://tokenfab-server:9090".into(),
        refresh_seconds: 30,
    };
    let status = ThroughputSlaStatus {
        document: None,
        conditions: tokenfab_kube::crd::conditions(&Err("connection refused".into()), &[], "2026-12-02T00:00:00Z"),
    };
    let task = tokio::spawn(async move { api::publish(&api, "tokenfab", &spec, &status, FAST).await });
    let path = "/apis/tokenfab.io/v1/namespaces/tokenfab/throughputslas/tokenfab";
    answer(&mut h, "GET", path, 404, status_404()).await;
    let created = answer(
        &mut h,
        "POST",
        "/apis/tokenfab.io/v1/namespaces/tokenfab/throughputslas",
        201,
        serde_json::json!({"apiVersion": "tokenfab.io/v1", "kind": "ThroughputSLA",
                           "metadata": {"name": "tokenfab", "namespace": "tokenfab", "resourceVersion": "1"},
                           "spec": {"controlPlaneUrl": "http://tokenfab-server:9090", "refreshSeconds": 30}}),
    )
    .await;
    assert_eq!(created["spec"]["controlPlaneUrl"], "http://tokenfab-server:9090");
    let patched = answer(
        &mut h,
        "PATCH",
        &format!("{path}/status"),
        200,
        serde_json::json!({"apiVersion": "tokenfab.io/v1", "kind": "ThroughputSLA",
                           "metadata": {"name": "tokenfab", "namespace": "tokenfab", "resourceVersion": "2"},
                           "spec": {"controlPlaneUrl": "http://tokenfab-server:9090", "refreshSeconds": 30}}),
    )
    .await;
    let conditions = &patched["status"]["conditions"];
    assert_eq!(conditions[0]["type"], "Available");
    assert_eq!(conditions[0]["status"], "False");
    assert_eq!(conditions[0]["message"], "connection refused");
    task.await.unwrap().expect("published");
}

#[tokio::test]
async fn an_object_made_for_another_control_plane_gets_the_new_spec_then_the_status() {
    let (client, mut h) = client();
    let api: Api<ThroughputSLA> = Api::namespaced(client, "tokenfab");
    let spec = ThroughputSlaSpec {
        control_plane_url: "http://tokenfab.tokenfab.svc:9464".into(),
        refresh_seconds: 30,
    };
    let status = ThroughputSlaStatus::default();
    let task = tokio::spawn(async move { api::publish(&api, "tokenfab", &spec, &status, FAST).await });
    let path = "/apis/tokenfab.io/v1/namespaces/tokenfab/throughputslas/tokenfab";
    let old = serde_json::json!({"apiVersion": "tokenfab.io/v1", "kind": "ThroughputSLA",
        "metadata": {"name": "tokenfab", "namespace": "tokenfab", "resourceVersion": "5"},
        "spec": {"controlPlaneUrl": "http://old:9464", "refreshSeconds": 60}});
    answer(&mut h, "GET", path, 200, old.clone()).await;
    let patch = answer(&mut h, "PATCH", path, 200, old.clone()).await;
    assert_eq!(patch["spec"]["controlPlaneUrl"], "http://tokenfab.tokenfab.svc:9464");
    assert_eq!(patch["spec"]["refreshSeconds"], 30);
    answer(&mut h, "PATCH", &format!("{path}/status"), 200, old).await;
    task.await.unwrap().expect("published");
}

fn status_404() -> serde_json::Value {
    status(404, "NotFound", "throughputslas.tokenfab.io \"tokenfab\" not found")
}

fn node_list(rv: &str, names: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": rv},
        "items": names.iter().map(|n| serde_json::json!({
            "metadata": {"name": n, "resourceVersion": rv,
                         "labels": {"nvidia.com/gpu.count": "8", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
        })).collect::<Vec<_>>()
    })
}

#[tokio::test]
async fn a_watch_that_ends_in_410_gone_lists_again_and_the_nodes_stay_current() {
    let (client, mut h) = client();
    let (store, task) = tokenfab_kube::operator::watch_nodes(client);
    // The first list.
    let (req, send) = h.next_request().await.unwrap();
    assert_eq!(req.uri().path(), "/api/v1/nodes");
    assert!(!req.uri().query().unwrap_or("").contains("watch=true"), "{}", req.uri());
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(&node_list("500", &["gpu-a"])).unwrap()))
            .unwrap(),
    );
    // The watch from there: the server says the resource version is too old.
    let (req, send) = h.next_request().await.unwrap();
    assert!(req.uri().query().unwrap_or("").contains("watch=true"), "{}", req.uri());
    let gone =
        serde_json::json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version: 500 (812)")});
    send.send_response(
        Response::builder()
            .body(Body::from(format!("{gone}\n").into_bytes()))
            .unwrap(),
    );
    // The operator lists again (a node joined meanwhile) and watches from there.
    let (req, send) = tokio::time::timeout(Duration::from_secs(30), h.next_request())
        .await
        .expect("a new list after 410 Gone")
        .unwrap();
    assert!(!req.uri().query().unwrap_or("").contains("watch=true"), "{}", req.uri());
    send.send_response(
        Response::builder()
            .body(Body::from(
                serde_json::to_vec(&node_list("812", &["gpu-a", "gpu-b"])).unwrap(),
            ))
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut names: Vec<String> = store
            .state()
            .iter()
            .filter_map(|n: &std::sync::Arc<Node>| n.metadata.name.clone())
            .collect();
        names.sort();
        if names == ["gpu-a", "gpu-b"] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "store: {names:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}
