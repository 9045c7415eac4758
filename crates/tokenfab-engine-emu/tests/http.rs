//! The emulator over real HTTP on loopback.

use serde_json::{Value, json};
use std::time::Instant;
use tokenfab_engine_emu::{EmuConfig, Emulator};

async fn start(time_scale: f64) -> (String, Emulator) {
    let mut config = EmuConfig::new("llama-3.1-8b", "h100-sxm", 1);
    config.time_scale = time_scale;
    let emu = Emulator::start(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(tokenfab_engine_emu::serve(
        listener,
        emu.clone(),
        std::future::pending(),
    ));
    (url, emu)
}

async fn post(url: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_slice(&r.bytes().await.unwrap()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_report_exact_usage() {
    let (url, _emu) = start(1000.0).await;
    let (status, body) = post(
        &url,
        "/v1/chat/completions",
        json!({"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "x".repeat(40)}], "max_tokens": 12}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // 40 bytes -> 10 tokens, + 4 for the message + 2 for the template.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 16, "completion_tokens": 12, "total_tokens": 28})
    );
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .split(' ')
            .count(),
        12
    );

    let (status, body) = post(&url, "/v1/completions", json!({"prompt": [1, 2, 3], "max_tokens": 5})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(body["usage"]["completion_tokens"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_look_like_openai_errors() {
    let (url, _emu) = start(1000.0).await;
    let (s, b) = post(
        &url,
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(
        b["error"]["message"],
        "The model `gpt-4o` does not exist. This engine serves `llama-3.1-8b`."
    );
    let (s, b) = post(&url, "/v1/chat/completions", json!({"messages": []})).await;
    assert_eq!((s, b["error"]["param"].as_str()), (400, Some("messages")));
    let (s, b) = post(&url, "/v1/chat/completions", json!({"messages": "hi"})).await;
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("the request body is not valid"),
        "{b}"
    );
    let (s, b) = post(&url, "/v1/completions", json!({"prompt": "x", "max_tokens": 2_000_000})).await;
    assert_eq!(s, 400);
    assert!(b["error"]["message"].as_str().unwrap().contains("KV cache"), "{b}");
}

/// One request alone takes prefill plus one decode step per token, at the model's
/// ~6.8 ms per step on an H100: 64 tokens ~ 0.44 emulated s. At time scale 10 that is
/// ~44 ms of wall time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_follows_the_performance_model_at_the_time_scale() {
    let (url, emu) = start(10.0).await;
    let t = Instant::now();
    let (s, _) = post(&url, "/v1/completions", json!({"prompt": "hello", "max_tokens": 64})).await;
    let wall = t.elapsed().as_secs_f64();
    assert_eq!(s, 200);
    assert!((0.035..0.25).contains(&wall), "wall {wall}s");
    let snap = emu.snapshot().await.unwrap();
    assert!(
        (0.40..0.50).contains(&snap.stats.busy_s),
        "busy {}s emulated",
        snap.stats.busy_s
    );
    assert_eq!(snap.stats.completion_tokens, 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_expose_energy_and_accept_power_limits() {
    let (url, _emu) = start(100.0).await;
    let client = reqwest::Client::new();
    let read = || async {
        let b = client
            .get(format!("{url}/emu/devices"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        serde_json::from_slice::<Value>(&b).unwrap()
    };
    let before = read().await;
    post(&url, "/v1/completions", json!({"prompt": "x", "max_tokens": 32})).await;
    let after = read().await;
    let e0 = before["devices"][0]["energy_j"].as_f64().unwrap();
    let e1 = after["devices"][0]["energy_j"].as_f64().unwrap();
    assert!(e1 > e0, "{e0} -> {e1}");
    assert!(after["clock_s"].as_f64().unwrap() > before["clock_s"].as_f64().unwrap());
    assert_eq!(after["devices"][0]["power_limit_w"], 700.0);

    let (s, b) = post(&url, "/emu/power-limit", json!({"watts": 350})).await;
    assert_eq!((s, b["power_limit_w"].as_f64()), (200, Some(350.0)));
    let (s, b) = post(&url, "/emu/power-limit", json!({"watts": 50})).await;
    assert_eq!(
        (s, b["power_limit_w"].as_f64()),
        (200, Some(200.0)),
        "clamped to the device minimum"
    );
    let (s, _) = post(&url, "/emu/power-limit", json!({"watts": -1})).await;
    assert_eq!(s, 400);

    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("tokenfab_emu_requests_total 1"), "{metrics}");
    assert!(metrics.contains("tokenfab_emu_power_limit_watts 200"), "{metrics}");
    let models = client
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(models.contains("\"id\":\"llama-3.1-8b\""), "{models}");
}
