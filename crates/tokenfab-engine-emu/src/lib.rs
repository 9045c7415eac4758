//! An OpenAI-compatible inference engine that computes nothing and takes exactly as long
//! as the performance model says.
//!
//! It serves `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health` and
//! Prometheus `/metrics` like vLLM, SGLang, TGI and llama.cpp do, so tokenfab's agent
//! drives it with the same client code. Requests run on [`EngineModel`], the
//! iteration-level continuous-batching model of `tokenfab-core`, in real time scaled by
//! `time_scale` (10 = ten emulated seconds per wall second). Responses carry exact
//! `usage` counts; text is deterministic filler.
//!
//! Emulated devices: `GET /emu/devices` returns each device's energy counter (joules),
//! power and power limit, and the emulated clock; `POST /emu/power-limit` sets the power
//! limit (`{"watts": 400}`), as NVML would on a real GPU.
//!
//! Tokenization: the emulator counts one prompt token per 4 bytes of text (rounded up),
//! plus 4 per chat message and 2 per chat request for the template. It produces exactly
//! `max_tokens` (or `max_completion_tokens`) output tokens, as a real engine does with
//! `ignore_eos`; without either field it produces `default_max_tokens`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenfab_core::engine::{EngineConfig, EngineError, EngineModel, EngineStats, Finished};
use tokenfab_core::perf::ReplicaPerf;
use tokenfab_core::{AcceleratorId, ModelId, Timestamp};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How to emulate one engine replica.
#[derive(Debug, Clone)]
pub struct EmuConfig {
    /// Model in tokenfab's catalog (sets the performance model).
    pub model: ModelId,
    /// Name clients must use in `model` (defaults to the catalog name).
    pub served_name: String,
    pub accelerator: AcceleratorId,
    pub tensor_parallel: u32,
    pub engine: EngineConfig,
    /// Emulated seconds per wall-clock second.
    pub time_scale: f64,
    /// Output tokens when a request sets no `max_tokens`.
    pub default_max_tokens: u32,
}

impl EmuConfig {
    pub fn new(model: &str, accelerator: &str, tensor_parallel: u32) -> Self {
        EmuConfig {
            model: ModelId::from(model),
            served_name: model.to_string(),
            accelerator: AcceleratorId::from(accelerator),
            tensor_parallel,
            engine: EngineConfig::default(),
            time_scale: 1.0,
            default_max_tokens: 256,
        }
    }
}

/// An emulator that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EmuError {
    #[error(transparent)]
    Catalog(#[from] tokenfab_core::catalog::CatalogError),
    #[error("time scale must be a positive number, got {0}")]
    TimeScale(f64),
}

/// The emulated clock: emulated time runs `scale` times faster than wall time.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    scale: f64,
}

impl Clock {
    fn now(&self) -> Timestamp {
        Timestamp::from_secs_f64(self.start.elapsed().as_secs_f64() * self.scale)
    }
    fn wall(&self, t: Timestamp) -> Instant {
        self.start + Duration::from_secs_f64(t.as_secs_f64() / self.scale)
    }
}

/// A reading of the emulated devices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Emulated seconds since the emulator started.
    pub clock_s: f64,
    /// Energy of all devices together, joules.
    pub energy_j: f64,
    /// Power of one device, watts.
    pub power_w: f64,
    pub power_limit_w: f64,
    pub devices: u32,
    pub running: usize,
    pub waiting: usize,
    pub stats: EngineStats,
}

enum Cmd {
    Submit {
        prompt: u32,
        output: u32,
        prefix: Option<tokenfab_core::engine::Prefix>,
        reply: oneshot::Sender<Result<Finished, EngineError>>,
    },
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
    SetPowerLimit {
        watts: f64,
        reply: oneshot::Sender<f64>,
    },
}

#[derive(Default)]
struct Metrics {
    registry: Registry,
    requests: Counter,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    energy: Counter<f64, AtomicU64>,
    power: Gauge<f64, AtomicU64>,
    power_limit: Gauge<f64, AtomicU64>,
    running: Gauge,
    waiting: Gauge,
    last_energy: Mutex<f64>,
    prefix_queries: Counter,
    prefix_hits: Counter,
    cached_prompt_tokens: Counter,
    /// Engine totals already counted (lookups, hits, cached tokens).
    last_prefix: Mutex<(u64, u64, u64)>,
}

impl Metrics {
    fn new() -> Self {
        let mut m = Metrics::default();
        let r = &mut m.registry;
        r.register("tokenfab_emu_requests", "Requests answered", m.requests.clone());
        r.register(
            "tokenfab_emu_prompt_tokens",
            "Prompt tokens processed",
            m.prompt_tokens.clone(),
        );
        r.register(
            "tokenfab_emu_completion_tokens",
            "Completion tokens generated",
            m.completion_tokens.clone(),
        );
        r.register(
            "tokenfab_emu_energy_joules",
            "Emulated device energy, all devices",
            m.energy.clone(),
        );
        r.register("tokenfab_emu_power_watts", "Emulated power per device", m.power.clone());
        r.register(
            "tokenfab_emu_power_limit_watts",
            "Power limit per device",
            m.power_limit.clone(),
        );
        r.register(
            "tokenfab_emu_running",
            "Sequences in the running batch",
            m.running.clone(),
        );
        r.register("tokenfab_emu_waiting", "Requests waiting for a slot", m.waiting.clone());
        r.register(
            "tokenfab_emu_prefix_cache_queries",
            "Requests with a shared prompt prefix (every message but the last) admitted",
            m.prefix_queries.clone(),
        );
        r.register(
            "tokenfab_emu_prefix_cache_hits",
            "Requests whose prefix the prefix cache held",
            m.prefix_hits.clone(),
        );
        r.register(
            "tokenfab_emu_prefix_cache_tokens",
            "Prompt tokens the prefix cache saved from prefill",
            m.cached_prompt_tokens.clone(),
        );
        m
    }
}

struct Shared {
    config: EmuConfig,
    tx: mpsc::Sender<Cmd>,
    metrics: Metrics,
    next_id: AtomicU64,
}

/// A running emulator. Cheap to clone; the engine stops when the last clone is dropped.
#[derive(Clone)]
pub struct Emulator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator").field("config", &self.shared.config).finish()
    }
}

impl Emulator {
    /// Starts the engine task on the current tokio runtime.
    pub fn start(config: EmuConfig) -> Result<Emulator, EmuError> {
        if !(config.time_scale.is_finite() && config.time_scale > 0.0) {
            return Err(EmuError::TimeScale(config.time_scale));
        }
        let perf = ReplicaPerf::new(&config.model, &config.accelerator, config.tensor_parallel)?;
        let clock = Clock {
            start: Instant::now(),
            scale: config.time_scale,
        };
        let model = EngineModel::new(perf, config.engine, clock.now());
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(run_engine(model, rx, clock));
        Ok(Emulator {
            shared: Arc::new(Shared {
                config,
                tx,
                metrics: Metrics::new(),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    pub fn config(&self) -> &EmuConfig {
        &self.shared.config
    }

    /// Reads the emulated devices.
    pub async fn snapshot(&self) -> Option<Snapshot> {
        let (reply, rx) = oneshot::channel();
        self.shared.tx.send(Cmd::Snapshot { reply }).await.ok()?;
        rx.await.ok()
    }

    /// Sets the power limit of every device; returns the limit applied (clamped to the
    /// device's range).
    pub async fn set_power_limit(&self, watts: f64) -> Option<f64> {
        let (reply, rx) = oneshot::channel();
        self.shared.tx.send(Cmd::SetPowerLimit { watts, reply }).await.ok()?;
        rx.await.ok()
    }

    /// The HTTP API.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .route("/emu/devices", get(devices))
            .route("/emu/power-limit", post(power_limit))
            .with_state(self.clone())
    }
}

/// Serves `emulator` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    emulator: Emulator,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // TCP_NODELAY: responses are small; do not let them wait for delayed ACKs.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, emulator.router())
        .with_graceful_shutdown(shutdown)
        .await
}

async fn run_engine(mut model: EngineModel, mut rx: mpsc::Receiver<Cmd>, clock: Clock) {
    let mut waiters: HashMap<u64, oneshot::Sender<Result<Finished, EngineError>>> = HashMap::new();
    let mut next = 0u64;
    loop {
        let wake = model.poll_timeout().map(|t| clock.wall(t));
        let cmd = tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(cmd) => Some(cmd),
                None => break,
            },
            _ = sleep_until(wake) => None,
        };
        let now = clock.now();
        model.handle_timeout(now);
        let mut cmds: Vec<Cmd> = cmd.into_iter().collect();
        while let Ok(c) = rx.try_recv() {
            cmds.push(c);
        }
        for c in cmds {
            match c {
                Cmd::Submit {
                    prompt,
                    output,
                    prefix,
                    reply,
                } => {
                    next += 1;
                    match model.submit_with_prefix(now, next, prompt, output, prefix) {
                        Ok(()) => {
                            waiters.insert(next, reply);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Cmd::Snapshot { reply } => {
                    let _ = reply.send(Snapshot {
                        clock_s: now.as_secs_f64(),
                        energy_j: model.energy_j(now),
                        power_w: model.power_w(),
                        power_limit_w: model.power_limit_w(),
                        devices: model.perf().devices(),
                        running: model.running(),
                        waiting: model.in_flight() - model.running(),
                        stats: model.stats(),
                    });
                }
                Cmd::SetPowerLimit { watts, reply } => {
                    model.set_power_limit(now, watts);
                    let _ = reply.send(model.power_limit_w());
                }
            }
        }
        while let Some(f) = model.poll_finished() {
            if let Some(w) = waiters.remove(&f.id) {
                let _ = w.send(Ok(f));
            }
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

// ---- HTTP ------------------------------------------------------------------------------

/// An OpenAI-style error response.
fn error(status: StatusCode, kind: &str, message: impl Into<String>, param: Option<&str>) -> Response {
    let body = json!({"error": {"message": message.into(), "type": kind, "param": param, "code": status.as_u16()}});
    (status, Json(body)).into_response()
}

fn bad_request(message: impl Into<String>, param: Option<&str>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message, param)
}

#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stream: Option<bool>,
    n: Option<u32>,
}

#[derive(Deserialize)]
struct ChatMessage {
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Value,
    max_tokens: Option<u32>,
    stream: Option<bool>,
    n: Option<u32>,
}

fn text_tokens(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(4)).unwrap_or(u32::MAX)
}

/// Text bytes of a message `content` (a string, or an array of `{"type":"text","text":..}` parts).
fn content_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| p.get("text").and_then(Value::as_str).map_or(0, str::len))
            .sum(),
        _ => 0,
    }
}

/// Prompt tokens of a completions `prompt`: text, a list of texts, or a list of token ids.
fn prompt_tokens(v: &Value) -> Option<u32> {
    match v {
        Value::String(s) => Some(text_tokens(s.len())),
        Value::Array(items) if items.iter().all(Value::is_u64) => Some(items.len() as u32),
        Value::Array(items) if items.iter().all(Value::is_string) => {
            Some(items.iter().map(|s| text_tokens(s.as_str().map_or(0, str::len))).sum())
        }
        _ => None,
    }
}

const WORDS: [&str; 16] = [
    "the", "token", "factory", "runs", "every", "batch", "exactly", "once", "and", "keeps", "its", "books", "on",
    "joules", "per", "token",
];

/// A seed for the filler text from the request body (FNV-1a).
fn seed_of(body: &[u8]) -> u64 {
    body.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn filler(tokens: u32, seed: u64) -> String {
    let mut s = String::with_capacity(tokens as usize * 6);
    for i in 0..tokens as u64 {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[((seed + i) % WORDS.len() as u64) as usize]);
    }
    s
}

impl Emulator {
    #[allow(clippy::result_large_err)] // an axum Response is the natural error of a handler step
    fn check_common(&self, model: Option<&str>, stream: Option<bool>, n: Option<u32>) -> Result<(), Response> {
        let served = &self.shared.config.served_name;
        if let Some(m) = model.filter(|m| *m != served) {
            return Err(error(
                StatusCode::NOT_FOUND,
                "NotFoundError",
                format!("The model `{m}` does not exist. This engine serves `{served}`."),
                Some("model"),
            ));
        }
        if stream == Some(true) {
            return Err(bad_request(
                "stream=true is not supported by the tokenfab engine emulator",
                Some("stream"),
            ));
        }
        if n.is_some_and(|n| n != 1) {
            return Err(bad_request("only n=1 is supported", Some("n")));
        }
        Ok(())
    }

    async fn run(
        &self,
        prompt: u32,
        output: u32,
        prefix: Option<tokenfab_core::engine::Prefix>,
    ) -> Result<Finished, Response> {
        let (reply, rx) = oneshot::channel();
        let unavailable = || {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the engine is shutting down",
                None,
            )
        };
        self.shared
            .tx
            .send(Cmd::Submit {
                prompt,
                output,
                prefix,
                reply,
            })
            .await
            .map_err(|_| unavailable())?;
        match rx.await.map_err(|_| unavailable())? {
            Ok(f) => {
                let m = &self.shared.metrics;
                m.requests.inc();
                m.prompt_tokens.inc_by(u64::from(f.prompt_tokens));
                m.completion_tokens.inc_by(u64::from(f.completion_tokens));
                Ok(f)
            }
            Err(e @ EngineError::NoOutput) => Err(bad_request(e.to_string(), Some("max_tokens"))),
            Err(e @ EngineError::TooLong { .. }) => Err(bad_request(e.to_string(), None)),
        }
    }

    fn output_tokens(&self, asked: Option<u32>) -> u32 {
        asked.unwrap_or(self.shared.config.default_max_tokens)
    }
}

#[allow(clippy::result_large_err)] // an axum Response is the natural error of a handler step
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("the request body is not valid: {e}"), None))
}

fn usage(f: &Finished) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn chat_completions(State(emu): State<Emulator>, body: axum::body::Bytes) -> Response {
    let req: ChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if let Err(e) = emu.check_common(req.model.as_deref(), req.stream, req.n) {
        return e;
    }
    if req.messages.is_empty() {
        return bad_request("messages must not be empty", Some("messages"));
    }
    let per_message: Vec<u32> = req
        .messages
        .iter()
        .map(|m| 4 + text_tokens(content_bytes(&m.content)))
        .collect();
    let prompt: u32 = 2 + per_message.iter().sum::<u32>();
    // Every message but the last is a prefix other requests may share; the engine's
    // prefix cache skips its prefill when it holds it (as vLLM's automatic prefix caching
    // does).
    let prefix = std::str::from_utf8(&body)
        .ok()
        .and_then(tokenfab_core::batch_input::shared_prefix)
        .map(|(key, _)| tokenfab_core::engine::Prefix {
            key,
            tokens: 2 + per_message[..per_message.len() - 1].iter().sum::<u32>(),
        });
    let output = emu.output_tokens(req.max_completion_tokens.or(req.max_tokens));
    let id = emu.shared.next_id.fetch_add(1, Ordering::Relaxed);
    match emu.run(prompt, output, prefix).await {
        Ok(f) => Json(json!({
            "id": format!("chatcmpl-emu-{id}"),
            "object": "chat.completion",
            "created": unix_now(),
            "model": emu.shared.config.served_name,
            "choices": [{
                "index": 0,
                // The text depends on the request only, as a greedy-decoding engine's does:
                // the same request gets the same answer.
                "message": {"role": "assistant", "content": filler(f.completion_tokens, seed_of(&body))},
                "finish_reason": "length",
            }],
            "usage": usage(&f),
        }))
        .into_response(),
        Err(e) => e,
    }
}

async fn completions(State(emu): State<Emulator>, body: axum::body::Bytes) -> Response {
    let req: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if let Err(e) = emu.check_common(req.model.as_deref(), req.stream, req.n) {
        return e;
    }
    let Some(prompt) = prompt_tokens(&req.prompt) else {
        return bad_request(
            "prompt must be a string, a list of strings or a list of token ids",
            Some("prompt"),
        );
    };
    let output = emu.output_tokens(req.max_tokens);
    let id = emu.shared.next_id.fetch_add(1, Ordering::Relaxed);
    match emu.run(prompt, output, None).await {
        Ok(f) => Json(json!({
            "id": format!("cmpl-emu-{id}"),
            "object": "text_completion",
            "created": unix_now(),
            "model": emu.shared.config.served_name,
            "choices": [{"index": 0, "text": filler(f.completion_tokens, seed_of(&body)), "finish_reason": "length"}],
            "usage": usage(&f),
        }))
        .into_response(),
        Err(e) => e,
    }
}

async fn models(State(emu): State<Emulator>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{"id": emu.shared.config.served_name, "object": "model", "owned_by": "tokenfab-engine-emu"}],
    }))
    .into_response()
}

async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn devices(State(emu): State<Emulator>) -> Response {
    let Some(s) = emu.snapshot().await else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the engine is shutting down",
            None,
        );
    };
    let per_device = s.energy_j / f64::from(s.devices);
    let devices: Vec<Value> = (0..s.devices)
        .map(|i| {
            json!({
                "index": i,
                "accelerator": emu.shared.config.accelerator.as_str(),
                "energy_j": per_device,
                "power_w": s.power_w,
                "power_limit_w": s.power_limit_w,
            })
        })
        .collect();
    Json(json!({
        "clock_s": s.clock_s,
        "completion_tokens": s.stats.completion_tokens,
        "time_scale": emu.shared.config.time_scale,
        "running": s.running,
        "waiting": s.waiting,
        "busy_s": s.stats.busy_s,
        "devices": devices,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct PowerLimit {
    watts: f64,
}

async fn power_limit(State(emu): State<Emulator>, body: axum::body::Bytes) -> Response {
    let req: PowerLimit = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if !(req.watts.is_finite() && req.watts > 0.0) {
        return bad_request("watts must be a positive number", Some("watts"));
    }
    match emu.set_power_limit(req.watts).await {
        Some(w) => Json(json!({"power_limit_w": w})).into_response(),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the engine is shutting down",
            None,
        ),
    }
}

async fn metrics(State(emu): State<Emulator>, headers: axum::http::HeaderMap) -> Response {
    let m = &emu.shared.metrics;
    if let Some(s) = emu.snapshot().await {
        let mut last = m.last_energy.lock().unwrap_or_else(|p| p.into_inner());
        m.energy.inc_by((s.energy_j - *last).max(0.0));
        *last = s.energy_j;
        m.power.set(s.power_w);
        m.power_limit.set(s.power_limit_w);
        m.running.set(s.running as i64);
        m.waiting.set(s.waiting as i64);
        let mut last = m.last_prefix.lock().unwrap_or_else(|p| p.into_inner());
        let now = (
            s.stats.prefix_lookups,
            s.stats.prefix_hits,
            s.stats.cached_prompt_tokens,
        );
        m.prefix_queries.inc_by(now.0.saturating_sub(last.0));
        m.prefix_hits.inc_by(now.1.saturating_sub(last.1));
        m.cached_prompt_tokens.inc_by(now.2.saturating_sub(last.2));
        *last = now;
    }
    tokenfab_metrics::respond(&m.registry, &headers)
}
