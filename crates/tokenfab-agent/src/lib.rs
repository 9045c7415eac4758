//! # tokenfab-agent: the node agent
//!
//! A thin async shell around [`AgentCore`]: it performs the core's actions (register,
//! lease, call engines, report, heartbeat, sample devices) as tasks and feeds their
//! outcomes back. Every decision (what to lease, which replica gets a request, when to
//! report, how energy is attributed) is the core's.

pub mod devices;
pub mod engine_client;
pub mod metrics;
pub mod nvml;

use devices::{DeviceBackend, DeviceReading};
use engine_client::EngineClient;
use metrics::{AgentMetrics, Call};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokenfab_core::agent::{AgentAction, AgentConfig, AgentCore, EnergyReading, EngineReply, ReplicaSpec};
use tokenfab_core::control::{HeartbeatReply, LeaseGrant, LeasedItem, ReportedOutcome, ReportedResult};
use tokenfab_core::durable::Outcome;
use tokenfab_core::protocol::{AgentInput, CallFailure, ReplicaIndex};
use tokenfab_core::usage::Usage;
use tokenfab_core::{BatchId, ModelId, NodeId, ReplicaId, RequestRef, SuperNodeId, Timestamp, WorkUnitId};
use tokenfab_proto::v1 as pb;
use tokenfab_proto::v1::agent_service_client::AgentServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// One engine replica this agent drives.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaConfig {
    pub id: ReplicaId,
    /// tokenfab's model name (what batches ask for).
    pub model: ModelId,
    /// The name the engine serves the model under (`model` in requests to it).
    pub engine_model: String,
    /// Base URL, e.g. `http://127.0.0.1:8000`.
    pub engine_url: String,
    /// Node device indices the replica occupies.
    pub devices: Vec<u32>,
    pub window: u32,
    pub max_concurrency: u32,
}

/// How to run an agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Control plane gRPC URL, e.g. `http://127.0.0.1:7443`.
    pub control_url: String,
    /// This node's token (`tfn1.…`, from `tokenfab admin node-token`), or the cluster's
    /// agent secret, from which the agent derives its node's token (the secret itself
    /// never leaves the agent).
    pub agent_token: tokenfab_identity::Secret,
    pub node: NodeId,
    pub super_node: SuperNodeId,
    pub replicas: Vec<ReplicaConfig>,
    pub core: AgentConfig,
    /// Longest an engine call may take.
    pub request_timeout: Duration,
    /// TLS to the control plane (an `https://` URL), with this node's client certificate
    /// where the control plane asks for one.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Flight recorder: the folder every input of the agent core is written to, and the
    /// most bytes this node's recordings may take there. `None`: nothing recorded.
    pub record: Option<(std::path::PathBuf, u64)>,
    /// HTTP address for the agent's `/metrics`, `/healthz` and `/readyz`; `None`: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How often each replica's engine is probed (`GET /v1/models`); an engine that does
    /// not answer takes no work and does not count as capacity until it does. `None`: no
    /// probes (every engine is taken to answer).
    pub engine_probe_interval: Option<Duration>,
}

/// The power range of the devices `indices` as the backend describes them, if it can set
/// power limits (the same for all of them: a replica spans one accelerator class).
fn power_range(devices: &[devices::DeviceInfo], indices: &[u32]) -> Option<tokenfab_core::agent::PowerRange> {
    let mine: Vec<&devices::DeviceInfo> = devices.iter().filter(|d| indices.contains(&d.index)).collect();
    let first = mine.first()?;
    (first.power_limit_max_w > first.power_limit_min_w && mine.len() == indices.len()).then_some(
        tokenfab_core::agent::PowerRange {
            min_w: first.power_limit_min_w,
            max_w: first.power_limit_max_w,
            current_w: first.power_limit_w,
        },
    )
}

/// An agent that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("control plane URL '{url}' is not valid: {cause}")]
    ControlUrl { url: String, cause: String },
    #[error("the agent token is not valid ASCII metadata")]
    Token,
    #[error("no replica configured: give at least one --replica")]
    NoReplicas,
    #[error("TLS to the control plane: {0}")]
    Tls(String),
    #[error("{0}")]
    Record(String),
    #[error("cannot serve metrics on {addr}: {cause} (choose another --metrics-listen address, or free the port)")]
    Metrics { addr: std::net::SocketAddr, cause: String },
}

type Client = AgentServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// What came back from an action performed in a task.
enum Event {
    Registered(Result<Duration, Status>),
    Leased(ModelId, Result<Option<pb::WorkUnit>, Status>),
    EngineDone {
        replica: usize,
        unit: WorkUnitId,
        req: RequestRef,
        reply: EngineReply,
    },
    Reported(Result<(), Status>),
    Heartbeat(Result<pb::HeartbeatResponse, Status>),
    Sampled(Result<Vec<DeviceReading>, String>),
    PowerSet {
        replica: usize,
        result: Result<f64, String>,
    },
    /// A replica's engine started or stopped answering probes.
    Probe {
        replica: usize,
        reachable: bool,
    },
}

fn now() -> Timestamp {
    Timestamp::from_micros(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64),
    )
}

fn failure(s: &Status) -> CallFailure {
    if s.code() == Code::NotFound {
        CallFailure::UnknownNode
    } else {
        CallFailure::Unavailable
    }
}

/// Keeps the replicas of a replicated control plane that accept connections (only the
/// elected one listens) in the agent's channel, checking every quarter second, so calls go
/// to the leader and follow a new one. Ends when the channel is gone.
async fn follow_leader(
    endpoints: Vec<tonic::transport::Endpoint>,
    changes: tokio::sync::mpsc::Sender<tonic::transport::channel::Change<usize, tonic::transport::Endpoint>>,
) {
    use tonic::transport::channel::Change;
    let mut present = vec![false; endpoints.len()];
    loop {
        for (i, e) in endpoints.iter().enumerate() {
            let uri = e.uri();
            let port = uri
                .port_u16()
                .unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            let host = uri
                .host()
                .unwrap_or("localhost")
                .trim_start_matches('[')
                .trim_end_matches(']');
            let up = matches!(
                tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect((host, port))).await,
                Ok(Ok(_))
            );
            let change = match (up, present[i]) {
                (true, false) => Change::Insert(i, e.clone()),
                (false, true) => Change::Remove(i),
                _ => continue,
            };
            present[i] = up;
            if changes.send(change).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs the agent until `shutdown` completes and its in-flight work is reported.
pub async fn run(
    opts: AgentOptions,
    devices: Arc<dyn DeviceBackend>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    if opts.replicas.is_empty() {
        return Err(AgentError::NoReplicas);
    }
    // Several URLs (comma-separated): the replicas of a replicated control plane, of
    // which only the elected one listens; calls go to whichever answers, so the agent
    // follows a new leader by itself.
    let mut endpoints = Vec::new();
    for url in opts.control_url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let mut endpoint = Channel::from_shared(url.to_string()).map_err(|e| AgentError::ControlUrl {
            url: url.to_string(),
            cause: e.to_string(),
        })?;
        if let Some(tls) = &opts.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| AgentError::Tls(e.to_string()))?;
        }
        endpoints.push(
            endpoint
                .connect_timeout(Duration::from_secs(5))
                // A call that hangs (half-open connection, stuck server) fails instead of
                // blocking the agent's lease, report or heartbeat loop forever.
                .timeout(Duration::from_secs(30))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .keep_alive_while_idle(true)
                .tcp_nodelay(true),
        );
    }
    let channel = match endpoints.len() {
        0 => {
            return Err(AgentError::ControlUrl {
                url: opts.control_url.clone(),
                cause: "no URL given".into(),
            });
        }
        1 => endpoints.remove(0).connect_lazy(),
        _ => {
            let (channel, changes) = Channel::balance_channel::<usize>(endpoints.len());
            tokio::spawn(follow_leader(endpoints, changes));
            channel
        }
    };
    let given = opts.agent_token.expose().trim();
    let node_token = if tokenfab_identity::is_node_token(given) {
        given.to_string()
    } else {
        tokenfab_identity::node_token(given, opts.node.as_str())
    };
    let token = format!("Bearer {node_token}").parse().map_err(|_| AgentError::Token)?;
    let client: Client = AgentServiceClient::with_interceptor(channel, Bearer(token))
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let engines = EngineClient::new(opts.request_timeout);
    let infos = devices.devices();
    let specs: Vec<ReplicaSpec> = opts
        .replicas
        .iter()
        .map(|r| ReplicaSpec {
            id: r.id.clone(),
            model: r.model.clone(),
            devices: r.devices.len() as u32,
            window: r.window,
            max_concurrency: r.max_concurrency,
            power: power_range(&infos, &r.devices),
            accelerator: infos
                .iter()
                .find(|d| r.devices.first() == Some(&d.index))
                .map(|d| d.accelerator.clone()),
        })
        .collect();
    let metrics = Arc::new(AgentMetrics::new(
        &opts
            .replicas
            .iter()
            .map(|r| (r.id.to_string(), r.model.to_string()))
            .collect::<Vec<_>>(),
    ));
    if let Some(addr) = opts.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::Metrics {
                addr,
                cause: e.to_string(),
            })?;
        let local = listener.local_addr().unwrap_or(addr);
        tracing::info!(addr = %local, "agent metrics on http://{local}/metrics");
        let app = metrics::router(metrics.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the agent's metrics listener stopped");
            }
        });
    }
    let started = now();
    let recorder = match &opts.record {
        Some((dir, max_bytes)) => {
            let mut r = tokenfab_record::Recorder::open_agent(dir, *max_bytes, opts.node.as_str())
                .map_err(|e| AgentError::Record(e.to_string()))?;
            r.start_agent(started, opts.node.as_str(), &opts.core, &specs);
            tracing::info!(dir = %dir.display(), "flight recorder on: every input of the agent core is written there (replay: tokenfab sim replay DIR)");
            Some(r)
        }
        None => None,
    };
    let mut shell = Shell {
        core: AgentCore::new(opts.core.clone(), specs, started),
        recorder,
        opts: Arc::new(opts),
        client,
        engines,
        devices,
        bodies: HashMap::new(),
        last_readings: Vec::new(),
        metrics,
        first_energy: Vec::new(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    if let Some(every) = shell.opts.engine_probe_interval {
        let urls: Vec<String> = shell.opts.replicas.iter().map(|r| r.engine_url.clone()).collect();
        tokio::spawn(probe_engines(shell.engines.http().clone(), urls, every, tx.clone()));
    }
    tokio::pin!(shutdown);
    let mut stopping = false;
    loop {
        shell.perform(&tx);
        if stopping && shell.core.is_drained() {
            tracing::info!("agent drained; exiting");
            shell.log_books();
            return Ok(());
        }
        let wake = shell.core.poll_timeout();
        tokio::select! {
            ev = rx.recv() => {
                if let Some(ev) = ev {
                    shell.on_event(ev);
                }
            }
            _ = sleep_until_unix(wake) => shell.input(now(), AgentInput::Timeout),
            _ = &mut shutdown, if !stopping => {
                tracing::info!("shutting down: releasing queued work, finishing running requests");
                stopping = true;
                shell.input(now(), AgentInput::Shutdown);
            }
        }
    }
}

/// Probes every engine each `every` (`GET /v1/models`, 2 s at most): any HTTP answer
/// below 500 counts as reachable. Sends what changed.
async fn probe_engines(
    http: reqwest::Client,
    urls: Vec<String>,
    every: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
) {
    let mut last: Vec<Option<bool>> = vec![None; urls.len()];
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (replica, url) in urls.iter().enumerate() {
            let reachable = http
                .get(format!("{url}/v1/models"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() < 500);
            if last[replica] != Some(reachable) {
                last[replica] = Some(reachable);
                if tx.send(Event::Probe { replica, reachable }).is_err() {
                    return;
                }
            }
        }
    }
}

async fn sleep_until_unix(t: Option<Timestamp>) {
    match t {
        Some(t) => tokio::time::sleep(Duration::from_micros(t.as_micros().saturating_sub(now().as_micros()))).await,
        None => std::future::pending().await,
    }
}

struct Shell {
    core: AgentCore,
    recorder: Option<tokenfab_record::Recorder>,
    opts: Arc<AgentOptions>,
    client: Client,
    engines: EngineClient,
    devices: Arc<dyn DeviceBackend>,
    /// Bodies of leased requests, until dispatched.
    bodies: HashMap<RequestRef, pb::WorkItem>,
    last_readings: Vec<DeviceReading>,
    metrics: Arc<AgentMetrics>,
    /// Each device's energy counter at its first reading (metrics count from there).
    first_energy: Vec<(u32, f64)>,
}

impl Shell {
    /// Hands one input to the core (recording it first when the recorder is on).
    fn input(&mut self, t: Timestamp, input: AgentInput) {
        if let Some(r) = self.recorder.as_mut() {
            r.agent_input(t, &input);
        }
        self.core.handle(t, input);
    }

    fn perform(&mut self, tx: &tokio::sync::mpsc::UnboundedSender<Event>) {
        let actions: Vec<AgentAction> = std::iter::from_fn(|| self.core.poll_action()).collect();
        if let Some(r) = self.recorder.as_mut() {
            r.agent_actions(&actions);
            r.flush();
        }
        for action in actions {
            let tx = tx.clone();
            match action {
                AgentAction::Register => {
                    self.metrics.set_registered(false);
                    let mut client = self.client.clone();
                    let req = self.registration();
                    tokio::spawn(async move {
                        let r = client
                            .register(req)
                            .await
                            .map(|r| Duration::from_millis(r.into_inner().heartbeat_interval_ms));
                        let _ = tx.send(Event::Registered(r));
                    });
                }
                AgentAction::Lease { model, max, wait } => {
                    let mut client = self.client.clone();
                    let req = pb::LeaseWorkRequest {
                        node: self.opts.node.to_string(),
                        model: model.to_string(),
                        max_requests: max,
                        // Below the channel's 30 s call timeout.
                        wait_ms: wait.as_millis().min(20_000) as u32,
                    };
                    tokio::spawn(async move {
                        let r = client
                            .lease_work(req)
                            .await
                            .map(|r| r.into_inner().units.into_iter().next());
                        let _ = tx.send(Event::Leased(model, r));
                    });
                }
                AgentAction::Dispatch { replica, unit, item } => self.dispatch(replica, unit, item, tx),
                AgentAction::Report(results) => {
                    let mut client = self.client.clone();
                    let wire: Vec<pb::WorkResult> = results.iter().map(work_result).collect();
                    // The core keeps the results until the call is answered.
                    drop(results);
                    let node = self.opts.node.to_string();
                    tokio::spawn(async move {
                        let req = pb::ReportResultsRequest { node, results: wire };
                        let r = client.report_results(req).await.map(|r| {
                            let r = r.into_inner();
                            if r.not_leased > 0 {
                                tracing::info!(
                                    results = r.not_leased,
                                    "results of work whose lease this node no longer held were not recorded (the lease expired, or the control plane restarted); the work runs again elsewhere"
                                );
                            }
                        });
                        let _ = tx.send(Event::Reported(r));
                    });
                }
                AgentAction::Heartbeat { held } => {
                    let mut client = self.client.clone();
                    let req = pb::HeartbeatRequest {
                        node: self.opts.node.to_string(),
                        telemetry: Some(self.telemetry()),
                        held_units: held.iter().map(|u| u.0).collect(),
                    };
                    tokio::spawn(async move {
                        let _ = tx.send(Event::Heartbeat(client.heartbeat(req).await.map(|r| r.into_inner())));
                    });
                }
                AgentAction::SampleDevices => {
                    let devices = self.devices.clone();
                    tokio::spawn(async move {
                        let _ = tx.send(Event::Sampled(devices.read().await.map_err(|e| e.to_string())));
                    });
                }
                AgentAction::SetPowerLimit { replica, watts } => {
                    let devices = self.devices.clone();
                    let indices = self.opts.replicas[replica].devices.clone();
                    tokio::spawn(async move {
                        let mut applied = f64::MAX;
                        let mut result = Ok(0.0);
                        for i in indices {
                            match devices.set_power_limit(i, watts).await {
                                Ok(w) => applied = applied.min(w),
                                Err(e) => {
                                    result = Err(e.to_string());
                                    break;
                                }
                            }
                        }
                        let result = result.map(|_| applied);
                        let _ = tx.send(Event::PowerSet { replica, result });
                    });
                }
                AgentAction::Tuned {
                    replica,
                    window,
                    power_limit_w,
                    reason,
                } => {
                    tracing::info!(
                        replica = %self.opts.replicas[replica].id,
                        window,
                        power_limit_w = power_limit_w.map_or(String::from("unchanged"), |w| format!("{w:.0}")),
                        "tuner: {reason}"
                    );
                }
                AgentAction::Release { unit, items } => {
                    for r in &items {
                        self.bodies.remove(r);
                    }
                    let mut client = self.client.clone();
                    let req = pb::ReleaseWorkRequest {
                        node: self.opts.node.to_string(),
                        unit_id: unit.0,
                        batches: items.iter().map(|r| r.batch.0).collect(),
                        indices: items.iter().map(|r| r.index).collect(),
                    };
                    tokio::spawn(async move {
                        if let Err(e) = client.release_work(req).await {
                            tracing::warn!(error = %e, "releasing work failed; its lease will expire instead");
                        }
                    });
                }
            }
        }
    }

    fn dispatch(
        &mut self,
        replica: usize,
        unit: WorkUnitId,
        item: LeasedItem,
        tx: tokio::sync::mpsc::UnboundedSender<Event>,
    ) {
        let req = item.req;
        let Some(work) = self.bodies.remove(&req) else {
            // Cannot happen: every leased item arrives with its body.
            let reply = EngineReply::Unreachable {
                code: "agent_lost_body".into(),
                message: "the agent lost the request body".into(),
            };
            let _ = tx.send(Event::EngineDone {
                replica,
                unit,
                req,
                reply,
            });
            return;
        };
        let engines = self.engines.clone();
        let metrics = self.metrics.clone();
        let cfg = &self.opts.replicas[replica];
        let (url, model) = (cfg.engine_url.clone(), cfg.engine_model.clone());
        tokio::spawn(async move {
            let request_id = format!("req_{}_{}_{}", req.batch.0, req.index, item.attempt);
            let started = std::time::Instant::now();
            let reply = engines.call(&url, &work.url, &work.body, &model, request_id).await;
            metrics.engine_call(replica, started.elapsed().as_secs_f64());
            let _ = tx.send(Event::EngineDone {
                replica,
                unit,
                req,
                reply,
            });
        });
    }

    fn on_event(&mut self, ev: Event) {
        let t = now();
        match ev {
            Event::Registered(Ok(hb)) => {
                tracing::info!(node = %self.opts.node, "registered with the control plane");
                self.metrics.set_registered(true);
                self.input(t, AgentInput::Registered { heartbeat_interval: hb });
            }
            Event::Registered(Err(e)) => {
                tracing::warn!(error = %e.message(), code = ?e.code(), "registration failed; retrying");
                self.metrics.call_failed(Call::Register);
                self.input(t, AgentInput::RegisterFailed);
            }
            Event::Leased(model, Ok(unit)) => {
                let grant = unit.map(|u| {
                    let items = u
                        .items
                        .into_iter()
                        .map(|w| {
                            let req = RequestRef {
                                batch: BatchId(w.batch),
                                index: w.index,
                            };
                            let attempt = w.attempt;
                            let prefix = std::str::from_utf8(&w.body)
                                .ok()
                                .and_then(tokenfab_core::batch_input::shared_prefix)
                                .map(|(key, _)| key);
                            self.bodies.insert(req, w);
                            LeasedItem { req, attempt, prefix }
                        })
                        .collect();
                    LeaseGrant {
                        unit: WorkUnitId(u.unit_id),
                        expires_at: Timestamp::from_millis(u.expires_at_unix_ms.max(0) as u64),
                        items,
                    }
                });
                self.input(
                    t,
                    AgentInput::Leased {
                        model,
                        result: Ok(grant),
                    },
                );
            }
            Event::Leased(model, Err(e)) => {
                tracing::warn!(error = %e.message(), code = ?e.code(), "leasing work failed; retrying");
                self.metrics.call_failed(Call::Lease);
                self.input(
                    t,
                    AgentInput::Leased {
                        model,
                        result: Err(failure(&e)),
                    },
                );
            }
            Event::EngineDone {
                replica,
                unit,
                req,
                reply,
            } => self.input(
                t,
                AgentInput::EngineDone {
                    replica: ReplicaIndex(replica),
                    unit,
                    req,
                    reply,
                },
            ),
            Event::Reported(Ok(())) => self.input(t, AgentInput::ReportAcked),
            Event::Reported(Err(e)) => {
                tracing::warn!(error = %e.message(), "report failed; results kept and sent again");
                self.metrics.call_failed(Call::Report);
                self.input(t, AgentInput::ReportFailed(failure(&e)));
            }
            Event::Probe { replica, reachable } => {
                let id = &self.opts.replicas[replica].id;
                if reachable {
                    tracing::info!(replica = %id, "its engine answers: it takes work and counts as capacity");
                } else {
                    tracing::warn!(
                        replica = %id, engine = %self.opts.replicas[replica].engine_url,
                        "its engine does not answer (stopped, or no engine pod on this node): it takes no work and does not count as capacity until it does"
                    );
                }
                self.metrics.set_reachable(replica, reachable);
                self.input(
                    t,
                    AgentInput::EngineProbe {
                        replica: ReplicaIndex(replica),
                        reachable,
                    },
                );
            }
            Event::PowerSet { replica, result } => {
                if let Err(e) = &result {
                    tracing::warn!(replica = %self.opts.replicas[replica].id, error = %e, "setting the power limit failed");
                }
                self.input(
                    t,
                    AgentInput::PowerLimitSet {
                        replica: ReplicaIndex(replica),
                        result,
                    },
                );
            }
            Event::Heartbeat(r) => {
                if r.is_err() {
                    self.metrics.call_failed(Call::Heartbeat);
                }
                let reply = match r {
                    Ok(h) if h.reregister => Err(CallFailure::UnknownNode),
                    Ok(h) => Ok(HeartbeatReply {
                        unknown_units: h.unknown_units.into_iter().map(WorkUnitId).collect(),
                        directives: h
                            .directives
                            .into_iter()
                            .map(|d| tokenfab_core::control::ReplicaDirective {
                                replica: ReplicaId::new(d.replica_id),
                                owed_tokens_per_s: d.owed_output_tokens_per_second,
                                active: d.active,
                            })
                            .collect(),
                    }),
                    Err(e) => Err(failure(&e)),
                };
                self.input(t, AgentInput::HeartbeatDone(reply));
            }
            Event::Sampled(r) => {
                let readings = match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading devices failed");
                        self.metrics.device_read_failed();
                        Vec::new()
                    }
                };
                self.metrics.observe_devices(&readings, &mut self.first_energy);
                let per_replica = self
                    .opts
                    .replicas
                    .iter()
                    .map(|rep| {
                        let mine: Vec<EnergyReading> = readings
                            .iter()
                            .filter(|d| rep.devices.contains(&d.index))
                            .map(|d| EnergyReading {
                                energy_j: d.energy_j,
                                clock_s: d.clock_s,
                                tokens: d.engine_tokens,
                            })
                            .collect();
                        EnergyReading::of_devices(rep.devices.len(), &mine)
                    })
                    .collect();
                if !readings.is_empty() {
                    self.last_readings = readings;
                }
                self.input(t, AgentInput::DeviceSample(per_replica));
            }
        }
    }

    /// Logs, per replica, what its devices' energy counters measured over the agent's
    /// life and how the books split it (a line operators can reconcile against).
    fn log_books(&self) {
        for ((spec, s), measured) in self.core.replicas().zip(self.core.measured_energy_j()) {
            let Some(measured) = measured else { continue };
            tracing::info!(
                replica = %spec.id,
                measured_j = measured,
                attributed_j = s.attributed_j,
                idle_j = s.idle_j,
                "books closed: the device energy counters rose by measured_j between the first and last readings"
            );
        }
    }

    fn registration(&self) -> pb::RegisterRequest {
        pb::RegisterRequest {
            node: self.opts.node.to_string(),
            super_node: self.opts.super_node.to_string(),
            devices: self
                .devices
                .devices()
                .into_iter()
                .map(|d| pb::Device {
                    index: d.index,
                    accelerator: d.accelerator.to_string(),
                    uuid: d.uuid,
                    memory_bytes: d.memory_bytes,
                    power_limit_w: d.power_limit_w,
                    power_limit_min_w: d.power_limit_min_w,
                    power_limit_max_w: d.power_limit_max_w,
                    domain: d.domain,
                    emulated: d.emulated,
                })
                .collect(),
            replicas: self
                .opts
                .replicas
                .iter()
                .map(|r| pb::Replica {
                    replica_id: r.id.to_string(),
                    model: r.model.to_string(),
                    device_indices: r.devices.clone(),
                    engine_url: r.engine_url.clone(),
                    max_concurrency: r.max_concurrency,
                    window: r.window,
                })
                .collect(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// What the heartbeat carries; the agent's own metrics are refreshed from the same
    /// figures.
    fn telemetry(&self) -> pb::Telemetry {
        let reports = self.core.telemetry();
        self.metrics.observe_replicas(
            self.core
                .replicas()
                .map(|(_, s)| s)
                .zip(reports.iter().map(|r| r.power_limit_w)),
        );
        pb::Telemetry {
            devices: self
                .last_readings
                .iter()
                .map(|d| pb::DeviceTelemetry {
                    index: d.index,
                    power_w: d.power_w,
                    energy_j: d.energy_j,
                    power_limit_w: d.power_limit_w,
                    utilization: d.utilization.unwrap_or(0.0),
                })
                .collect(),
            replicas: self
                .core
                .replicas()
                .zip(reports)
                .map(|((spec, s), report)| {
                    let tuning = report.tuning.unwrap_or_default();
                    let advice = tuning.advice.as_ref();
                    pb::ReplicaTelemetry {
                        replica_id: spec.id.to_string(),
                        window: s.window,
                        in_flight: s.in_flight,
                        requests_done: s.requests_done,
                        prompt_tokens: s.prompt_tokens,
                        completion_tokens: s.completion_tokens,
                        errors: s.errors,
                        mean_latency_ms: s.latency_sum_s * 1e3 / ((s.requests_done + s.errors).max(1) as f64),
                        attributed_joules: s.attributed_j,
                        idle_joules: s.idle_j,
                        power_limit_w: report.power_limit_w.unwrap_or(0.0),
                        tuner_mode: tokenfab_core::policy::Choice::name(tuning.mode).into(),
                        objective: tuning.objective.into_owned(),
                        objective_value: tuning.objective_value,
                        measured_output_tokens_per_second: tuning.measured_tokens_per_s,
                        owed_output_tokens_per_second: tuning.owed_tokens_per_s,
                        holding: tuning.holding,
                        tuner_moves: tuning.moves,
                        tuner_reason: tuning.reason.into_owned(),
                        advised_window: advice.map_or(0, |a| a.window),
                        advised_power_limit_w: advice.map_or(0.0, |a| a.power_limit_w),
                        advised_objective_value: advice.map_or(0.0, |a| a.predicted_objective),
                        current_objective_value: advice.map_or(0.0, |a| a.current_objective),
                        engine_unreachable: report.unreachable,
                        recalibration: report.calibration.map(|c| pb::Recalibration {
                            time_factor: c.time,
                            power_factor: c.power,
                            uncertainty: c.uncertainty,
                            samples: c.samples,
                            power_samples: c.power_samples,
                            model_error: c.model_error.unwrap_or(-1.0),
                            energy_error: c.energy_error.unwrap_or(-1.0),
                        }),
                    }
                })
                .collect(),
        }
    }
}

fn usage(u: &Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        joules: u.joules,
        device_seconds: u.device_seconds,
        cost_usd: 0.0,
    }
}

fn work_result(r: &ReportedResult) -> pb::WorkResult {
    let outcome = match &r.outcome {
        ReportedOutcome::Final(Outcome::Response {
            status_code,
            body,
            request_id,
        }) => pb::work_result::Outcome::Response(pb::EngineResponse {
            status_code: u32::from(*status_code),
            body: body.clone().into(),
            request_id: request_id.clone(),
        }),
        // The agent core only reports engine responses or retryable failures; a final
        // error is decided by the control plane, never by an agent.
        ReportedOutcome::Final(Outcome::Error { code, message }) | ReportedOutcome::Retryable { code, message } => {
            pb::work_result::Outcome::RetryableError(pb::RequestError {
                code: code.clone(),
                message: message.clone(),
                line: 0,
            })
        }
    };
    pb::WorkResult {
        unit_id: r.unit.0,
        batch: r.req.batch.0,
        index: r.req.index,
        outcome: Some(outcome),
        usage: Some(usage(&r.usage)),
        latency_us: r.latency.as_micros().min(u128::from(u64::MAX)) as u64,
    }
}
