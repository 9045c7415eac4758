//! Playing the Kubernetes API server's side over tower-test's mock service, request by
//! request (no API server can run where tokenfab is tested).

#![allow(dead_code)]

use http::{Request, Response};
use kube::client::Body;
use std::time::Duration;
use tower_test::mock;

pub type Handle = mock::Handle<Request<Body>, Response<Body>>;

/// Takes the next request, checks its method and path, answers, and returns its JSON body.
pub async fn answer(
    h: &mut Handle,
    method: &str,
    path: &str,
    status: u16,
    body: serde_json::Value,
) -> serde_json::Value {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), h.next_request())
        .await
        .unwrap_or_else(|_| panic!("no {method} {path} came"))
        .expect("the client is gone");
    assert_eq!(
        (req.method().as_str(), req.uri().path()),
        (method, path),
        "unexpected request {}",
        req.uri()
    );
    let bytes = req.into_body().collect_bytes().await.unwrap();
    send.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
}
