//! `tokenfab server`, `tokenfab agent`, `tokenfab engine-emu`: the long-running roles.

use crate::parse;
use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokenfab_agent::devices::{DeviceBackend, EmulatedDevices, NoDevices};
use tokenfab_agent::{AgentOptions, ReplicaConfig};
use tokenfab_control::{ServerConfig, TenantToken};
use tokenfab_core::agent::AgentConfig;
use tokenfab_core::agent::Routing;
use tokenfab_core::batch_input::InputLimits;
use tokenfab_core::catalog::Catalog;
use tokenfab_core::control::{ControlConfig, PlacementMode, QueueOrder, Quota, SlaClass};
use tokenfab_core::engine::EngineConfig;
use tokenfab_core::policy::{ClassPolicy, ObjectiveKind, Policies, PolicyError, Prices};
use tokenfab_core::tuner::TunerMode;
use tokenfab_core::{ModelId, NodeId, ReplicaId, SuperNodeId};
use tokenfab_engine_emu::{EmuConfig, Emulator};
use tokenfab_identity::Secret;
use tokenfab_store::RedbStore;

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// gRPC address for tenants and agents.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// HTTP address for Prometheus `/metrics` (off when not given).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// HTTP address for the OpenAI-compatible Files and Batches API (off when not given):
    /// point OpenAI SDKs at http://ADDR/v1 with a tenant token as the API key.
    #[arg(long)]
    openai_listen: Option<SocketAddr>,
    /// Directory for durable state (created if missing). Restarting on the same
    /// directory loses nothing that was acknowledged.
    #[arg(long, default_value = "tokenfab-data")]
    data_dir: PathBuf,
    /// Where commits are made durable. `embedded`: the data directory alone (one
    /// replica). `etcd`: a log in etcd (--etcd-endpoints) shared by several replicas with
    /// the same --etcd-prefix; one is elected and serves, the others wait, and a new one
    /// takes over within --etcd-lease-ttl when it stops; each keeps its copy in
    /// --data-dir. (Needs a tokenfab built with `--features etcd`.) `raft`: the replicas
    /// named by --raft-peers replicate among themselves (3 or 5 of them; a majority must
    /// run); the leader serves, the others follow, and a new leader serves within about
    /// a second of the leader's loss. (Needs `--features raft`.)
    #[arg(long, value_enum, default_value_t = StoreKind::Embedded)]
    store: StoreKind,
    /// etcd's client URLs, comma-separated (with --store etcd).
    #[arg(long, value_delimiter = ',', env = "TOKENFAB_ETCD_ENDPOINTS")]
    etcd_endpoints: Vec<String>,
    /// The key prefix of this control plane in etcd (with --store etcd): replicas sharing
    /// it are one control plane.
    #[arg(long, default_value = "/tokenfab")]
    etcd_prefix: String,
    /// This replica's name, unique among the replicas (with --store etcd or raft);
    /// default: the host name ($HOSTNAME, a pod's name in a StatefulSet).
    #[arg(long, env = "TOKENFAB_REPLICA_NAME")]
    replica_name: Option<String>,
    /// How long the elected replica's etcd lease lasts without renewal (with --store
    /// etcd): a replica that stops is replaced after at most this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    etcd_lease_ttl: Duration,
    /// This replica's Raft id (with --store raft): its key in --raft-peers. Default: from
    /// the host name's ordinal (a StatefulSet pod `NAME-0` is 1, `NAME-1` is 2, ...).
    #[arg(long, env = "TOKENFAB_RAFT_ID")]
    raft_id: Option<u64>,
    /// Every replica of the Raft group, this one included, as ID=URL of its peer port,
    /// comma-separated (with --store raft): `1=http://cp-0:7400,2=http://cp-1:7400,3=...`.
    /// Every replica must be given the same list.
    #[arg(long, env = "TOKENFAB_RAFT_PEERS")]
    raft_peers: Option<String>,
    /// Where this replica's peer port listens (with --store raft). Default: every address,
    /// on the port of its own URL in --raft-peers.
    #[arg(long)]
    raft_listen: Option<std::net::SocketAddr>,
    /// Compact the Raft log after this many applied entries (with --store raft): the log
    /// on disk and in memory stays bounded; a follower that needs compacted entries
    /// installs a snapshot of the leader's store instead. 1,000 entries behind the
    /// compaction point are kept for followers a little behind. Default: 10,000 (the Raft
    /// store's own default).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    raft_compact_every: Option<u64>,
    #[command(flatten)]
    raft_tls: RaftTlsArgs,
    /// A tenant and its bearer token, NAME=TOKEN (repeatable). Handy for trials; tokens on
    /// a command line are visible to every user of the machine (`ps`): use
    /// --tenants-file in production.
    #[arg(long = "tenant", value_parser = parse::tenant_token)]
    tenants: Vec<(String, Secret)>,
    /// A TOML file of tenants: `[[tenants]]` tables with `name`, and `token_sha256` (the
    /// SHA-256 of the token, from `tokenfab admin hash-token`) or `token`; optionally
    /// `weight` (share of best-effort capacity relative to other tenants, default 1),
    /// `retention` (how long finished batches are kept, e.g. "7d"), and limits
    /// `max_active_batches`, `max_queued_requests`, `max_stored_bytes`,
    /// `output_tokens_per_hour` (the --tenant-* defaults otherwise).
    #[arg(long)]
    tenants_file: Option<PathBuf>,
    /// The cluster's agent secret (at least 16 characters): each node's token derives
    /// from it (`tokenfab admin node-token NAME`), so a node can act only as itself.
    /// Prefer --agent-token-file.
    #[arg(long, env = "TOKENFAB_AGENT_TOKEN", hide_env_values = true)]
    agent_token: Option<Secret>,
    /// A file whose first line is the cluster's agent secret.
    #[arg(long, env = "TOKENFAB_AGENT_TOKEN_FILE")]
    agent_token_file: Option<PathBuf>,
    /// The operator's token: with it, `tokenfab usage --tenant NAME` reads any tenant's
    /// usage. Not set: no operator access. Prefer --admin-token-file.
    #[arg(long, env = "TOKENFAB_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<Secret>,
    /// A file whose first line is the operator's token.
    #[arg(long, env = "TOKENFAB_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// A file whose first line is the token the HTTP endpoints (/metrics, /v1/sla,
    /// /v1/tuning) then require as `Authorization: Bearer`; /healthz stays open. Not set:
    /// they are open to anyone who can reach --metrics-listen.
    #[arg(long, env = "TOKENFAB_HTTP_TOKEN_FILE")]
    http_token_file: Option<PathBuf>,
    /// Models batches may use (comma-separated; default: every model in the catalog).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// An engine profile (repeatable; docs/engine-profiles.md, e.g. from `tokenfab
    /// calibrate`): the curve admission and the rates owed to deadlines believe for
    /// replicas of its model, accelerator and tensor-parallel degree, instead of the
    /// performance model (each replica's belief is then corrected online from what its
    /// agent measures).
    #[arg(long = "profile", value_name = "FILE")]
    profiles: Vec<PathBuf>,
    /// Largest input file (e.g. 200MiB).
    #[arg(long, default_value = "200MiB", value_parser = parse::bytes)]
    max_file_bytes: u64,
    /// Most requests (non-blank lines) in one batch.
    #[arg(long, default_value_t = 100_000)]
    max_requests_per_batch: usize,
    /// Largest request line.
    #[arg(long, default_value = "1MiB", value_parser = parse::bytes)]
    max_line_bytes: u64,
    /// Deepest JSON nesting in a request body.
    #[arg(long, default_value_t = tokenfab_core::batch_input::DEFAULT_MAX_JSON_DEPTH)]
    max_json_depth: u32,
    /// Uploads (batch input files) received and parsed at once; more are refused with
    /// RESOURCE_EXHAUSTED and a retry hint.
    #[arg(long, default_value_t = 8)]
    max_uploads: u32,
    /// Uploads one tenant may have in progress at once.
    #[arg(long, default_value_t = 2)]
    max_uploads_per_tenant: u32,
    /// Default limit on each tenant's unfinished batches.
    #[arg(long, default_value_t = Quota::SERVER_DEFAULT.max_active_batches.unwrap_or(u32::MAX))]
    tenant_max_active_batches: u32,
    /// Default limit on each tenant's requests waiting for a result.
    #[arg(long, default_value_t = Quota::SERVER_DEFAULT.max_queued_requests.unwrap_or(u64::MAX))]
    tenant_max_queued_requests: u64,
    /// Default limit on what each tenant's batches hold in the store (inputs of unfinished
    /// batches, results of every batch not yet deleted).
    #[arg(long, default_value = "50GiB", value_parser = parse::bytes)]
    tenant_max_stored_bytes: u64,
    /// How long finished batches (their results and errors) are kept before they are
    /// deleted; their usage is kept. Per tenant: `retention` in the tenants file.
    #[arg(long, default_value = "30d", value_parser = parse::duration)]
    retention: Duration,
    /// New batches are refused while the data directory has less free space than this
    /// (running work keeps recording its results in it).
    #[arg(long, default_value = "1GiB", value_parser = parse::bytes)]
    min_free_space: u64,
    /// Request-body data one lease may carry (a lease reply must fit a gRPC message).
    #[arg(long, default_value = "16MiB", value_parser = parse::bytes)]
    lease_max_bytes: u64,
    #[command(flatten)]
    record: RecordArgs,
    /// Concurrent calls per client connection.
    #[arg(long, default_value_t = 256)]
    max_concurrent_streams: u32,
    /// The longest any call may take (a large upload included).
    #[arg(long, default_value = "15m", value_parser = parse::duration)]
    call_timeout: Duration,
    /// TLS certificate chain (PEM) for both listeners; with --tls-key, everything the
    /// control plane serves is encrypted.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate (PEM) of agents' client certificates: agents must then present a
    /// certificate signed by it that names their node (a DNS subject alternative name
    /// equal to --node), besides their node token (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    agent_ca: Option<PathBuf>,
    /// Electricity price, $/kWh, for cost accounting.
    #[arg(long, default_value_t = tokenfab_core::usage::DEFAULT_USD_PER_KWH)]
    usd_per_kwh: f64,
    /// Site power usage effectiveness (facility energy / IT energy).
    #[arg(long, default_value_t = tokenfab_core::usage::DEFAULT_PUE)]
    pue: f64,
    #[command(flatten)]
    policies: ControlPolicyArgs,
}

/// The control plane's policies (see `tokenfab_core::policy::Policies`: a scenario's
/// `policies:` section sets the same things, with the same defaults).
#[derive(Args, Debug, Clone)]
pub struct ControlPolicyArgs {
    /// How long a lease lives without a heartbeat from its agent.
    #[arg(long, value_parser = parse::duration, default_value = parse::shown(|p| p.lease_ttl))]
    lease_ttl: Duration,
    /// How often agents heartbeat.
    #[arg(long, value_parser = parse::duration, default_value = parse::shown(|p| p.heartbeat_interval))]
    heartbeat_interval: Duration,
    /// Tries per request before it fails with retries_exhausted.
    #[arg(long, default_value_t = Policies::default().max_attempts)]
    max_attempts: u32,
    /// Accept every batch, even those whose completion window the cluster cannot meet
    /// (by default such batches of committed SLA classes are refused with the earliest
    /// completion time that could be promised).
    #[arg(long)]
    no_admission: bool,
    /// Share of the estimated capacity admission control counts on, in (0, 1].
    #[arg(long, default_value_t = Policies::default().admission_headroom)]
    admission_headroom: f64,
    /// An SLA class (repeatable), highest priority first: `NAME` for a committed class
    /// (admission-checked, its deadlines kept), `NAME:best-effort` for one that is never
    /// refused and runs only when no higher class waits. Work of a class is served before
    /// that of every class after it. Default: `standard` then `best-effort:best-effort`.
    #[arg(long = "sla-class", value_parser = parse::sla_class)]
    sla_classes: Vec<SlaClass>,
    /// The SLA class of batches that name none (default: `standard` if listed, else the
    /// first class).
    #[arg(long)]
    default_sla_class: Option<String>,
    /// Order of committed work within a class: earliest deadline first, or least slack
    /// first (the batch whose pending work must start soonest).
    #[arg(long, value_parser = parse::choice::<QueueOrder>(), default_value_t = Policies::default().queue_order)]
    queue_order: QueueOrder,
    /// Placement: `active` keeps only the fewest, cheapest replicas that cover the rate
    /// deadlines and arrivals need (with a 25% margin) taking work and parks the others
    /// (they idle); `advisory` shows what it would park, and the replica layout it would
    /// choose, in `tokenfab tuning` without parking anything; `off`: every replica takes
    /// work, no advice. Parking saves energy only where parked devices are powered down or
    /// released; see docs/tuning.md.
    #[arg(long, value_parser = parse::choice::<PlacementMode>(), default_value_t = Policies::default().placement.mode)]
    placement: PlacementMode,
    /// A replica is parked only after it has been surplus this long.
    #[arg(long, value_parser = parse::duration, default_value = parse::shown(|p| p.placement.park_after))]
    park_after: Duration,
}

impl ControlPolicyArgs {
    /// Sets the control plane's part of `p` from these flags.
    pub fn apply(&self, p: &mut Policies) {
        p.lease_ttl = self.lease_ttl;
        p.heartbeat_interval = self.heartbeat_interval;
        p.max_attempts = self.max_attempts;
        p.admission = !self.no_admission;
        p.admission_headroom = self.admission_headroom;
        if !self.sla_classes.is_empty() {
            p.sla_classes = self.sla_classes.iter().map(ClassPolicy::from).collect();
        }
        p.default_sla_class.clone_from(&self.default_sla_class);
        p.queue_order = self.queue_order;
        p.placement.mode = self.placement;
        p.placement.park_after = self.park_after;
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    tenants: Vec<TenantEntry>,
}

/// A `[[tenants]]` table of the tenants file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    /// The token, or (better) its SHA-256 digest in hex.
    token: Option<String>,
    token_sha256: Option<String>,
    /// Share of spare (best-effort) capacity relative to other tenants; default 1.
    weight: Option<f64>,
    /// How long this tenant's finished batches are kept, e.g. "7d".
    retention: Option<String>,
    /// Quota: unfinished batches at once.
    max_active_batches: Option<u32>,
    /// Quota: output tokens (as asked by `max_tokens`) submitted over any hour.
    output_tokens_per_hour: Option<u64>,
    /// Quota: requests waiting for a result.
    max_queued_requests: Option<u64>,
    /// Quota: bytes held in the store, e.g. "10GiB" or a number.
    max_stored_bytes: Option<toml::Value>,
}

pub async fn server(a: ServerArgs) -> anyhow::Result<()> {
    let mut tenants = Vec::new();
    for (name, token) in &a.tenants {
        if token.expose().trim().is_empty() {
            bail!("--tenant {name}=: tenant '{name}' has an empty token; give every tenant a secret token");
        }
        tenants.push(TenantToken::new(name.clone(), token.expose()));
    }
    let mut weights = std::collections::BTreeMap::new();
    let mut quotas = std::collections::BTreeMap::new();
    let mut retention = std::collections::BTreeMap::new();
    if let Some(path) = &a.tenants_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read --tenants-file {}", path.display()))?;
        let file: TenantsFile =
            toml::from_str(&text).with_context(|| format!("--tenants-file {} is not valid", path.display()))?;
        for t in file.tenants {
            if let Some(w) = t.weight {
                if !(w.is_finite() && w > 0.0) {
                    bail!(
                        "--tenants-file {}: tenant '{}': weight {w} must be a number above 0 (1 is the default share)",
                        path.display(),
                        t.name
                    );
                }
                weights.insert(tokenfab_core::TenantId::new(t.name.clone()), w);
            }
            let where_ = || format!("--tenants-file {}: tenant '{}'", path.display(), t.name);
            let max_stored_bytes = match &t.max_stored_bytes {
                None => None,
                Some(toml::Value::Integer(n)) if *n >= 0 => Some(*n as u64),
                Some(toml::Value::String(s)) => {
                    Some(parse::bytes(s).map_err(|e| anyhow::anyhow!("{}: max_stored_bytes: {e}", where_()))?)
                }
                Some(other) => bail!(
                    "{}: max_stored_bytes = {other:?} is not a size; write e.g. \"10GiB\"",
                    where_()
                ),
            };
            let quota = Quota {
                max_active_batches: t.max_active_batches,
                output_tokens_per_hour: t.output_tokens_per_hour,
                max_queued_requests: t.max_queued_requests,
                max_stored_bytes,
            };
            if quota != Quota::default() {
                quotas.insert(tokenfab_core::TenantId::new(t.name.clone()), quota);
            }
            if let Some(r) = &t.retention {
                let d = parse::duration(r).map_err(|e| anyhow::anyhow!("{}: retention: {e}", where_()))?;
                retention.insert(tokenfab_core::TenantId::new(t.name.clone()), d);
            }
            let token = match (&t.token, &t.token_sha256) {
                (Some(_), Some(_)) => bail!("{}: give token or token_sha256, not both", where_()),
                (None, Some(h)) => TenantToken::hashed(
                    t.name.clone(),
                    tokenfab_identity::parse_digest(h)
                        .map_err(|e| anyhow::anyhow!("{}: token_sha256: {e}", where_()))?,
                ),
                (Some(tok), None) if !tok.trim().is_empty() => TenantToken::new(t.name.clone(), tok),
                _ => bail!(
                    "{}: no token; add token_sha256 = \"...\" (the SHA-256 of the tenant's token: `tokenfab admin hash-token`)",
                    where_()
                ),
            };
            tenants.push(token);
        }
    }
    let agent_secret = match (&a.agent_token, &a.agent_token_file) {
        (_, Some(f)) => parse::secret_file(f, "agent secret")?,
        (Some(t), None) => t.expose().trim().to_string(),
        (None, None) => bail!(
            "the cluster's agent secret is required: --agent-token-file FILE (or TOKENFAB_AGENT_TOKEN); agents derive their node tokens from it"
        ),
    };
    let admin_token = match (&a.admin_token, &a.admin_token_file) {
        (_, Some(f)) => Some(parse::secret_file(f, "admin token")?),
        (Some(t), None) if !t.expose().trim().is_empty() => Some(t.expose().trim().to_string()),
        (Some(_), None) => bail!("the admin token is empty; give it a secret value or leave --admin-token out"),
        (None, None) => None,
    };
    let http_token = match &a.http_token_file {
        Some(f) => Some(tokenfab_identity::digest(&parse::secret_file(f, "HTTP token")?)),
        None => None,
    };
    if tenants.is_empty() {
        bail!("no tenant configured: add --tenant NAME=TOKEN or --tenants-file FILE, or nobody can submit batches");
    }
    let catalog = Catalog::builtin();
    let models = if a.models.is_empty() {
        catalog.model_ids().into_iter().collect()
    } else {
        let mut set = std::collections::BTreeSet::new();
        for m in a.models {
            let id = ModelId::new(m);
            catalog.model(&id).map_err(|e| anyhow::anyhow!("--models: {e}"))?;
            set.insert(id);
        }
        set
    };
    let mut policies = Policies::default();
    a.policies.apply(&mut policies);
    policies
        .check()
        .map_err(|e| anyhow::anyhow!("{}", policy_flag_error(&e)))?;
    let config = ServerConfig {
        record: a.record.folder(),
        listen: a.listen,
        metrics_listen: a.metrics_listen,
        openai_listen: a.openai_listen,
        tenants,
        agent_secret: agent_secret.into(),
        admin_token: admin_token.as_deref().map(tokenfab_identity::digest),
        http_token,
        control: ControlConfig {
            models,
            usd_per_kwh: a.usd_per_kwh,
            pue: a.pue,
            tenant_weights: weights,
            tenant_quotas: quotas,
            default_quota: Quota {
                max_active_batches: Some(a.tenant_max_active_batches),
                output_tokens_per_hour: None,
                max_queued_requests: Some(a.tenant_max_queued_requests),
                max_stored_bytes: Some(a.tenant_max_stored_bytes),
            },
            retention: Some(a.retention),
            tenant_retention: retention,
            min_free_bytes: a.min_free_space,
            lease_max_bytes: a.lease_max_bytes,
            profiles: read_profiles(&a.profiles)?,
            ..policies.control_config()
        },
        limits: InputLimits {
            max_file_bytes: a.max_file_bytes,
            max_requests: a.max_requests_per_batch,
            max_line_bytes: usize::try_from(a.max_line_bytes).unwrap_or(usize::MAX),
            max_json_depth: a.max_json_depth,
        },
        tls: match (a.tls_cert, a.tls_key) {
            (Some(cert), Some(key)) => Some(tokenfab_control::ServerTls {
                cert,
                key,
                agent_ca: a.agent_ca,
            }),
            _ => None,
        },
        transport: tokenfab_control::Transport {
            max_uploads: a.max_uploads,
            max_uploads_per_tenant: a.max_uploads_per_tenant,
            max_concurrent_streams: a.max_concurrent_streams,
            request_timeout: a.call_timeout,
            ..tokenfab_control::Transport::default()
        },
    };
    match a.store {
        StoreKind::Embedded => {
            let store = RedbStore::open(&a.data_dir)?;
            run_server(config, store, &a.data_dir, std::future::pending()).await
        }
        StoreKind::Etcd => {
            #[cfg(feature = "etcd")]
            {
                if a.etcd_endpoints.is_empty() {
                    bail!("--store etcd needs --etcd-endpoints URL[,URL...] (etcd's client URLs)");
                }
                let name = match a.replica_name.or_else(|| std::env::var("HOSTNAME").ok()) {
                    Some(n) if !n.is_empty() => n,
                    _ => bail!("--store etcd needs --replica-name NAME (unique among the replicas)"),
                };
                let mut opts = tokenfab_store_etcd::EtcdOptions::new(a.etcd_endpoints, &a.etcd_prefix, &name);
                opts.lease_ttl_s = i64::try_from(a.etcd_lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX);
                eprintln!(
                    "replica {name}: joining the election at {}/leader on {}",
                    opts.prefix,
                    opts.endpoints.join(",")
                );
                let store = standby_while(&config, |leader| {
                    tokenfab_store_etcd::EtcdStore::open(
                        opts,
                        &a.data_dir,
                        Box::new(move |l| {
                            leader(l);
                            eprintln!("waiting: replica {l} is the elected one; this one takes over when it stops")
                        }),
                    )
                })
                .await?;
                eprintln!(
                    "replica {name}: elected; the log is applied up to entry {}",
                    store.next_seq().await - 1
                );
                let deposed = {
                    let s = store.clone();
                    async move { s.deposed().await }
                };
                run_server(config, store, &a.data_dir, deposed).await
            }
            #[cfg(not(feature = "etcd"))]
            {
                let _ = (a.etcd_endpoints, a.etcd_prefix, a.replica_name, a.etcd_lease_ttl);
                bail!(
                    "--store etcd: this tokenfab was built without the etcd backend; build it with `cargo build --release --features etcd` (which needs protoc: apt-get install protobuf-compiler)"
                )
            }
        }
        StoreKind::Raft => {
            #[cfg(feature = "raft")]
            {
                let mut opts = raft_options(a.raft_id, a.raft_peers.as_deref(), a.raft_listen, a.replica_name)?;
                if let Some(every) = a.raft_compact_every {
                    opts.compact_every = every;
                }
                opts.tls = a.raft_tls.load()?;
                opts.keep_entries = opts.keep_entries.min(opts.compact_every);
                let name = opts.name.clone();
                eprintln!(
                    "replica {name} (Raft id {}): joining the group {} (peer port {})",
                    opts.id,
                    a.raft_peers.unwrap_or_default(),
                    opts.listen
                );
                let store = standby_while(&config, |leader| {
                    tokenfab_store_raft::RaftStore::open(
                        opts,
                        &a.data_dir,
                        Box::new(move |id, l| {
                            leader(l);
                            if id == 0 {
                                eprintln!(
                                    "following: no leader yet (an election is under way, or a majority is not up)"
                                );
                            } else {
                                eprintln!("following: replica {l} leads; this one follows and may lead when it stops");
                            }
                        }),
                    )
                })
                .await?;
                eprintln!(
                    "replica {name}: leads; the log is applied up to entry {}",
                    store.status().applied
                );
                let deposed = {
                    let s = store.clone();
                    async move { s.deposed().await }
                };
                run_server(config, store, &a.data_dir, deposed).await
            }
            #[cfg(not(feature = "raft"))]
            {
                let _ = (a.raft_id, a.raft_peers, a.raft_listen, a.raft_compact_every);
                let _ = a.raft_tls;
                bail!(
                    "--store raft: this tokenfab was built without the Raft backend; build it with `cargo build --release --features raft` (which needs protoc: apt-get install protobuf-compiler)"
                )
            }
        }
    }
}

/// While `open` waits for this replica to lead, the HTTP port answers probes: alive
/// (/healthz, naming the leader that `open` reports), not ready (/readyz), so that
/// Kubernetes neither restarts it nor sends it traffic.
#[cfg(any(feature = "etcd", feature = "raft"))]
async fn standby_while<S, F>(
    config: &ServerConfig,
    open: impl FnOnce(Box<dyn Fn(&str) + Send + Sync>) -> F,
) -> anyhow::Result<S>
where
    F: std::future::Future<Output = Result<S, tokenfab_store::StoreError>>,
{
    let leader = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (stop_standby, standby_stopped) = tokio::sync::oneshot::channel();
    let standby = match config.metrics_listen {
        Some(addr) => {
            Some(tokenfab_control::standby(addr, config.tls.as_ref(), leader.clone(), standby_stopped).await?)
        }
        None => None,
    };
    let store = open(Box::new(move |l| {
        if let Ok(mut g) = leader.lock() {
            *g = l.to_string();
        }
    }))
    .await?;
    let _ = stop_standby.send(());
    if let Some(task) = standby {
        let _ = task.await;
    }
    Ok(store)
}

/// Mutual TLS on the Raft peer port (`server --store raft` and `admin members
/// --raft-peers`): all three files, or none.
#[derive(Args, Debug, Clone, Default)]
pub struct RaftTlsArgs {
    /// A certificate (PEM) the peers' CA signed, for the Raft peer port: with
    /// --raft-tls-key and --raft-tls-ca, replicas speak mutual TLS to each other (and
    /// `admin members` to them), and every --raft-peers URL is https://.
    #[arg(long, requires_all = ["raft_tls_key", "raft_tls_ca"])]
    pub raft_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires_all = ["raft_tls_cert", "raft_tls_ca"])]
    pub raft_tls_key: Option<PathBuf>,
    /// The CA certificate (PEM) that signs every replica's peer certificate: peers
    /// without one are refused.
    #[arg(long, requires_all = ["raft_tls_cert", "raft_tls_key"])]
    pub raft_tls_ca: Option<PathBuf>,
}

#[cfg(feature = "raft")]
impl RaftTlsArgs {
    /// The files read (clap requires all three together).
    pub(crate) fn load(self) -> anyhow::Result<Option<tokenfab_store_raft::PeerTls>> {
        match (self.raft_tls_cert, self.raft_tls_key, self.raft_tls_ca) {
            (Some(c), Some(k), Some(a)) => Ok(Some(
                tokenfab_store_raft::PeerTls::from_files(&c, &k, &a)
                    .map_err(|e| anyhow::anyhow!("--raft-tls-*: {e}"))?,
            )),
            _ => Ok(None),
        }
    }
}

/// The Raft options from the server's flags; errors say which flag to give.
#[cfg(feature = "raft")]
pub(crate) fn raft_options(
    id: Option<u64>,
    peers: Option<&str>,
    listen: Option<std::net::SocketAddr>,
    name: Option<String>,
) -> anyhow::Result<tokenfab_store_raft::RaftOptions> {
    let Some(peers) = peers else {
        bail!("--store raft needs --raft-peers ID=URL[,ID=URL...] (every replica's peer port, this one included)")
    };
    let peers =
        tokenfab_store_raft::RaftOptions::parse_peers(peers).map_err(|e| anyhow::anyhow!("--raft-peers: {e}"))?;
    let host = std::env::var("HOSTNAME").ok();
    let id = match id {
        Some(id) => id,
        None => host
            .as_deref()
            .and_then(|h| h.rsplit_once('-'))
            .and_then(|(_, n)| n.parse::<u64>().ok())
            .map(|n| n + 1)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--store raft needs --raft-id N (this replica's key in --raft-peers); it is taken from a host name ending in -ORDINAL only"
                )
            })?,
    };
    let name = name
        .or(host)
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("replica-{id}"));
    let mut opts = tokenfab_store_raft::RaftOptions::new(id, &name, peers)?;
    if let Some(l) = listen {
        opts.listen = l;
    }
    Ok(opts)
}

/// Serves until a signal, or until `deposed` says this replica may no longer commit (it
/// then exits with an error: its supervisor restarts it, and it waits for the election).
async fn run_server<S: tokenfab_store::Store + Clone>(
    config: ServerConfig,
    store: S,
    data_dir: &std::path::Path,
    deposed: impl std::future::Future<Output = String>,
) -> anyhow::Result<()> {
    let server = tokenfab_control::start(config, store).await?;
    eprintln!(
        "tokenfab control plane listening on {} (data in {})",
        server.addr,
        data_dir.display()
    );
    if let Some(m) = server.metrics_addr {
        eprintln!("metrics on http://{m}/metrics");
    }
    if let Some(o) = server.openai_addr {
        eprintln!("OpenAI-compatible Files and Batches API on http://{o}/v1");
    }
    tokio::select! {
        r = async { server.wait().await } => r?,
        _ = crate::shutdown_signal() => {
            eprintln!("stopping");
            return Ok(());
        }
        why = deposed => bail!("{why}; stopping (this replica may no longer commit)"),
    }
    Ok(())
}

/// Reads `--profile` files; an error names the file and the field.
pub fn read_profiles(paths: &[PathBuf]) -> anyhow::Result<tokenfab_core::profile::Profiles> {
    let mut list = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).with_context(|| format!("--profile {}: cannot read it", p.display()))?;
        list.push(
            tokenfab_core::profile::EngineProfile::from_toml(&text)
                .with_context(|| format!("--profile {}", p.display()))?,
        );
    }
    tokenfab_core::profile::Profiles::new(&list).context("--profile")
}

/// Where the control plane's commits are made durable.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// The data directory's embedded store (one replica).
    Embedded,
    /// A log in etcd shared by the replicas, each with its copy in its data directory.
    Etcd,
    /// A Raft group of the replicas themselves, each with its copy in its data directory.
    Raft,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    /// Read devices from each replica's engine emulator (`/emu/devices`).
    Emulated,
    /// No readable devices (e.g. llama.cpp on CPU): no energy is measured.
    None,
    /// NVIDIA GPUs, read through NVML (loaded from the driver at run time): power draw,
    /// the energy counter, power limits (set by the tuner where permitted), NVLink
    /// domains, utilisation and temperature. Each --replica names its GPUs with `gpus=`
    /// (default: the GPUs divided evenly among the replicas, in order).
    Nvml,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Control plane gRPC URL; for a replicated control plane (`server --store etcd`),
    /// every replica's URL, comma-separated: the agent talks to whichever is elected.
    #[arg(long, env = "TOKENFAB_CONTROL", default_value = "http://127.0.0.1:7443")]
    control: String,
    /// This node's token (`tfn1.…`, from `tokenfab admin node-token NAME`), or the
    /// cluster's agent secret, from which the agent derives its node's token (the secret
    /// never leaves the agent; a node holding it could act as any node: give production
    /// nodes only their token). Prefer --agent-token-file.
    #[arg(long, env = "TOKENFAB_AGENT_TOKEN", hide_env_values = true)]
    agent_token: Option<Secret>,
    /// A file whose first line is this node's token (or the cluster's agent secret).
    #[arg(long, env = "TOKENFAB_AGENT_TOKEN_FILE")]
    agent_token_file: Option<PathBuf>,
    /// With an https:// --control URL: the CA certificate (PEM) that signed the control
    /// plane's certificate (default: the bundled public roots).
    #[arg(long, env = "TOKENFAB_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This node's client certificate (PEM), naming the node (a DNS subject alternative
    /// name equal to --node), for control planes that require mutual TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// This node's name (unique in the cluster).
    #[arg(long)]
    node: String,
    /// The super-node (NVLink domain system) this node belongs to; defaults to the node name.
    #[arg(long)]
    super_node: Option<String>,
    /// An engine replica to drive (repeatable):
    /// url=URL,model=MODEL[,id=ID][,engine-model=NAME][,window=N][,max=N][,gpus=LIST].
    /// `window` is the number of requests kept in flight (the batch size); default 64.
    /// `gpus` (with --devices nvml): the GPUs the replica runs on, as NVML numbers them
    /// (`nvidia-smi`, `tokenfab devices`), e.g. `gpus=0-3` or `gpus=0:2`.
    #[arg(long = "replica", required = true, value_parser = parse::replica)]
    replicas: Vec<parse::ReplicaArg>,
    /// Where device power and energy come from.
    #[arg(long, value_enum, default_value_t = DeviceKind::Emulated)]
    devices: DeviceKind,
    /// With `--devices none`: the accelerator class (from the catalog, e.g. edge-cpu) each
    /// replica runs on. It registers one such device per replica, so that the replicas
    /// have a belief (a profile given with --profile, or the performance model) and the
    /// control plane a capacity estimate; nothing is read from them. With `--devices
    /// nvml`: the class to model the GPUs as, for products the catalog does not name
    /// (e.g. an H100 PCIe).
    #[arg(long, requires = "devices")]
    accelerator: Option<String>,
    /// An engine profile (repeatable; docs/engine-profiles.md, e.g. from `tokenfab
    /// calibrate`): the curve the tuner believes for replicas of its model, accelerator and
    /// tensor-parallel degree, instead of the performance model.
    #[arg(long = "profile", value_name = "FILE")]
    profiles: Vec<PathBuf>,
    /// Longest an engine call may take before it is retried elsewhere.
    #[arg(long, default_value = "10m", value_parser = parse::duration)]
    request_timeout: Duration,
    /// HTTP address for this agent's Prometheus `/metrics` (its replicas' requests, tokens,
    /// latency and energy, its devices' power and energy counters, failed calls to the
    /// control plane), `/healthz` (alive) and `/readyz` (registered with the control
    /// plane). Off when not given.
    #[arg(long, env = "TOKENFAB_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// How often each replica's engine is probed (`GET /v1/models`). An engine that does
    /// not answer (stopped, or, in Kubernetes, no engine pod on this node behind a
    /// node-local Service) takes no work and does not count as capacity until it answers
    /// again. `0s`: no probes.
    #[arg(long, default_value = "5s", value_parser = parse::duration)]
    engine_probe_interval: Duration,
    #[command(flatten)]
    tuning: TuningArgs,
    #[command(flatten)]
    record: RecordArgs,
}

/// The flight recorder's flags, the same for the server and the agent.
#[derive(Args, Debug, Clone)]
pub struct RecordArgs {
    /// Flight recorder: write every input this process's core receives into this folder
    /// (control-*.jsonl or agent-NODE-*.jsonl, one file per run of the core), to replay it
    /// with `tokenfab sim replay DIR` (which checks that the same code decides the same)
    /// or to reproduce an incident. Off by default.
    #[arg(long, value_name = "DIR")]
    record: Option<PathBuf>,
    /// The most this process's recordings may take in the folder: the oldest runs are
    /// deleted whole to stay under it, and a run that alone reaches it stops being recorded.
    #[arg(long, default_value = "1GiB", value_parser = parse::bytes, requires = "record")]
    record_max_bytes: u64,
}

impl RecordArgs {
    /// The folder and its bound, when recording.
    fn folder(&self) -> Option<(PathBuf, u64)> {
        self.record.clone().map(|dir| (dir, self.record_max_bytes))
    }
}

/// How the agent tunes its replicas.
#[derive(Args, Debug, Clone)]
pub struct TuningArgs {
    /// The batch-size and power tuner: `active` moves each replica's window (and the power
    /// limit, where the devices allow) toward the objective while keeping the throughput
    /// deadlines need; `advisory` only shows what the performance model recommends (in
    /// telemetry: `tokenfab tuning`); `off` leaves windows and power as configured.
    #[arg(long, value_parser = parse::choice::<TunerMode>(), default_value_t = Policies::default().tuner.mode)]
    pub tuner: TunerMode,
    /// What the tuner maximizes. Without an energy counter (`--devices none`), tokens per
    /// joule falls back to tokens per second (a constant-power proxy).
    #[arg(long, value_parser = parse::choice::<ObjectiveKind>(), default_value_t = Policies::default().tuner.objective)]
    pub tuner_objective: ObjectiveKind,
    /// Leave power limits alone (tune the window only).
    #[arg(long)]
    pub no_power_tuning: bool,
    /// Price of one device-hour for the tokens-per-dollar objective (default: the
    /// catalog's indicative price of the devices' class).
    #[arg(long)]
    pub usd_per_device_hour: Option<f64>,
    /// Electricity price and PUE for the tokens-per-dollar objective.
    #[arg(long, default_value_t = tokenfab_core::usage::DEFAULT_USD_PER_KWH)]
    pub usd_per_kwh: f64,
    #[arg(long, default_value_t = tokenfab_core::usage::DEFAULT_PUE)]
    pub pue: f64,
    /// Shortest measurement epoch of the tuner (each point is measured at least this long).
    #[arg(long, value_parser = parse::duration, default_value = parse::shown(|p| p.tuner.epoch))]
    pub tuner_epoch: Duration,
    /// How the agent picks the replica for the next request: `prefix-affinity` (least
    /// loaded, but requests sharing a prompt prefix of 64 tokens or more go to the replica
    /// whose prefix cache holds it, unless it is a quarter of its window busier than the
    /// least loaded), `least-loaded` (the most free room relative to its window) or
    /// `round-robin` (each replica in turn).
    #[arg(long, value_parser = parse::choice::<Routing>(), default_value_t = Policies::default().routing)]
    pub routing: Routing,
}

impl TuningArgs {
    /// Sets the agent's part of `p` from these flags.
    pub fn apply(&self, p: &mut Policies) {
        p.tuner.mode = self.tuner;
        p.tuner.objective = self.tuner_objective;
        p.tuner.power = !self.no_power_tuning;
        p.tuner.epoch = self.tuner_epoch;
        p.routing = self.routing;
    }

    /// The agent core's settings; `accelerator` (of the node's devices) sets the default
    /// device-hour price.
    pub fn config(&self, accelerator: Option<&tokenfab_core::AcceleratorId>) -> AgentConfig {
        let mut p = Policies::default();
        self.apply(&mut p);
        p.agent_config(Prices::new(
            self.usd_per_device_hour,
            accelerator,
            self.usd_per_kwh,
            self.pue,
        ))
    }
}

impl Default for TuningArgs {
    /// The flags' defaults (an agent started with none of them).
    fn default() -> Self {
        let p = Policies::default();
        TuningArgs {
            tuner: p.tuner.mode,
            tuner_objective: p.tuner.objective,
            no_power_tuning: !p.tuner.power,
            usd_per_device_hour: None,
            usd_per_kwh: tokenfab_core::usage::DEFAULT_USD_PER_KWH,
            pue: tokenfab_core::usage::DEFAULT_PUE,
            tuner_epoch: p.tuner.epoch,
            routing: p.routing,
        }
    }
}

/// Default ceiling of a replica's window (vLLM's default max_num_seqs).
pub const DEFAULT_MAX_CONCURRENCY: u32 = 256;

/// What an agent is started with.
pub struct AgentSetup {
    pub control: String,
    pub agent_token: tokenfab_identity::Secret,
    pub node: String,
    pub super_node: Option<String>,
    pub replicas: Vec<parse::ReplicaArg>,
    pub devices: DeviceKind,
    /// With `DeviceKind::None`: the declared accelerator class of the replicas' devices.
    pub accelerator: Option<String>,
    pub profiles: tokenfab_core::profile::Profiles,
    pub request_timeout: Duration,
    pub tuning: TuningArgs,
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// The GPUs of each replica: those its `gpus=` names, or (when no replica names any) the
/// node's `count` GPUs divided evenly among the replicas, in order.
fn assign_gpus(given: &[Option<Vec<u32>>], count: u32) -> anyhow::Result<Vec<Vec<u32>>> {
    let n = given.len() as u32;
    if given.iter().all(Option::is_none) {
        if n == 0 || !count.is_multiple_of(n) {
            bail!(
                "--devices nvml: the node has {count} GPU(s), which do not divide evenly among {n} replica(s); give each --replica its GPUs with gpus= (e.g. gpus=0-3)"
            );
        }
        let per = count / n;
        return Ok((0..n).map(|r| (r * per..(r + 1) * per).collect()).collect());
    }
    let mut used = std::collections::BTreeMap::new();
    given
        .iter()
        .enumerate()
        .map(|(r, g)| {
            let Some(g) = g else {
                bail!("--replica {r} has no gpus= while others do: give every replica its GPUs");
            };
            for &i in g {
                if i >= count {
                    bail!(
                        "--replica {r}: gpus= names GPU {i}, but the node has GPUs 0 to {}",
                        count.saturating_sub(1)
                    );
                }
                if let Some(other) = used.insert(i, r) {
                    bail!("GPU {i} is given to two replicas ({other} and {r}): each GPU serves one replica");
                }
            }
            Ok(g.clone())
        })
        .collect()
}

/// Builds agent options and the device backend from replica arguments.
pub async fn agent_setup(setup: AgentSetup) -> anyhow::Result<(AgentOptions, Arc<dyn DeviceBackend>)> {
    let AgentSetup {
        control,
        agent_token,
        node,
        super_node,
        replicas,
        devices,
        accelerator,
        profiles,
        request_timeout,
        tuning,
        tls,
    } = setup;
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    let (backend, indices): (Arc<dyn DeviceBackend>, Vec<Vec<u32>>) = match devices {
        DeviceKind::Emulated => {
            let emu = EmulatedDevices::discover(
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(2))
                    .build()
                    .context("building the HTTP client for device reads")?,
                &urls,
            )
            .await
            .context(
                "discovering emulated devices (use --devices none for engines that are not tokenfab engine emulators)",
            )?;
            let idx = urls.iter().map(|u| emu.indices_of(u)).collect();
            (Arc::new(emu), idx)
        }
        DeviceKind::None => match &accelerator {
            Some(name) => {
                let id = tokenfab_core::AcceleratorId::new(name);
                let class = tokenfab_core::catalog::Catalog::builtin()
                    .accelerator(&id)
                    .with_context(|| format!("--accelerator {name}"))?;
                let backend = tokenfab_agent::devices::DeclaredDevices::new(&id, urls.len() as u32, class.max_power_w);
                (Arc::new(backend), (0..urls.len() as u32).map(|i| vec![i]).collect())
            }
            None => (Arc::new(NoDevices), vec![Vec::new(); urls.len()]),
        },
        DeviceKind::Nvml => {
            let class = match &accelerator {
                Some(name) => {
                    let id = tokenfab_core::AcceleratorId::new(name);
                    tokenfab_core::catalog::Catalog::builtin()
                        .accelerator(&id)
                        .with_context(|| format!("--accelerator {name}"))?;
                    Some(id)
                }
                None => None,
            };
            let nvml = tokenfab_agent::nvml::NvmlDevices::open(class.as_ref()).context("--devices nvml")?;
            let gpus: Vec<Option<Vec<u32>>> = replicas.iter().map(|r| r.gpus.clone()).collect();
            let idx = assign_gpus(&gpus, nvml.devices().len() as u32)?;
            (Arc::new(nvml), idx)
        }
    };
    if accelerator.is_some() && devices == DeviceKind::Emulated {
        bail!("--accelerator declares the class of --devices none or nvml; emulated devices say their own class");
    }
    if devices != DeviceKind::Nvml && replicas.iter().any(|r| r.gpus.is_some()) {
        bail!("gpus= in --replica names NVIDIA GPUs: it needs --devices nvml");
    }
    let replicas = replicas
        .into_iter()
        .zip(indices)
        .enumerate()
        .map(|(i, (r, devices))| {
            let max = r.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY).max(1);
            ReplicaConfig {
                id: ReplicaId::new(r.id.unwrap_or_else(|| format!("r{i}"))),
                engine_model: r.engine_model.unwrap_or_else(|| r.model.clone()),
                model: ModelId::new(r.model),
                engine_url: r.url,
                devices,
                window: r.window.unwrap_or(Policies::default().window).min(max),
                max_concurrency: max,
            }
        })
        .collect();
    let opts = AgentOptions {
        control_url: control,
        agent_token,
        super_node: SuperNodeId::new(super_node.unwrap_or_else(|| node.clone())),
        node: NodeId::new(node),
        replicas,
        core: AgentConfig {
            profiles,
            ..tuning.config(backend.devices().first().map(|d| &d.accelerator))
        },
        request_timeout,
        tls,
        record: None,
        metrics_listen: None,
        engine_probe_interval: None,
    };
    Ok((opts, backend))
}

pub async fn agent(a: AgentArgs) -> anyhow::Result<()> {
    let agent_token: Secret = match (&a.agent_token, &a.agent_token_file) {
        (_, Some(f)) => parse::secret_file(f, "node token")?.into(),
        (Some(t), None) if !t.expose().trim().is_empty() => t.clone(),
        _ => bail!(
            "a node token is required: --agent-token-file FILE (from `tokenfab admin node-token {}`), or TOKENFAB_AGENT_TOKEN",
            a.node
        ),
    };
    let tls = if a.control.starts_with("https://") {
        let identity = a.tls_cert.as_deref().zip(a.tls_key.as_deref());
        Some(tokenfab_identity::tls::grpc_client(a.tls_ca.as_deref(), identity)?)
    } else {
        if a.tls_ca.is_some() || a.tls_cert.is_some() {
            bail!(
                "--tls-ca/--tls-cert are given but --control {} is not https://",
                a.control
            );
        }
        None
    };
    let record = a.record.folder();
    let (mut opts, devices) = agent_setup(AgentSetup {
        control: a.control,
        agent_token,
        tls,
        node: a.node,
        super_node: a.super_node,
        replicas: a.replicas,
        devices: a.devices,
        accelerator: a.accelerator,
        profiles: read_profiles(&a.profiles)?,
        request_timeout: a.request_timeout,
        tuning: a.tuning,
    })
    .await?;
    opts.record = record;
    opts.metrics_listen = a.metrics_listen;
    opts.engine_probe_interval = (!a.engine_probe_interval.is_zero()).then_some(a.engine_probe_interval);
    eprintln!(
        "tokenfab agent {} driving {} replica(s), {} device(s), control plane {}",
        opts.node,
        opts.replicas.len(),
        devices.devices().len(),
        opts.control_url
    );
    tokenfab_agent::run(opts, devices, crate::shutdown_signal()).await?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct EmuArgs {
    /// HTTP address to serve the OpenAI-compatible API on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Model from the catalog (sets the performance model).
    #[arg(long, default_value = "llama-3.1-8b")]
    model: String,
    /// Name clients use for the model (default: the catalog name).
    #[arg(long)]
    served_name: Option<String>,
    /// Accelerator class from the catalog.
    #[arg(long, default_value = "h100-sxm")]
    accelerator: String,
    /// Devices the replica spans (tensor parallel).
    #[arg(long, default_value_t = 1)]
    tp: u32,
    /// Emulated seconds per wall-clock second (10 runs ten times faster than real).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Most sequences in the running batch (vLLM's max_num_seqs).
    #[arg(long, default_value_t = 256)]
    max_num_seqs: u32,
    /// Most tokens computed per step (vLLM's max_num_batched_tokens).
    #[arg(long, default_value_t = 8192)]
    max_batched_tokens: u32,
    /// Output tokens for requests that set no max_tokens.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: u32,
}

pub fn emu_config(model: &str, accelerator: &str, tp: u32, time_scale: f64, max_num_seqs: u32) -> EmuConfig {
    let mut c = EmuConfig::new(model, accelerator, tp);
    c.time_scale = time_scale;
    c.engine = EngineConfig {
        max_num_seqs,
        ..EngineConfig::default()
    };
    c
}

pub async fn engine_emu(a: EmuArgs) -> anyhow::Result<()> {
    let mut config = emu_config(&a.model, &a.accelerator, a.tp, a.time_scale, a.max_num_seqs);
    config.engine.max_batched_tokens = a.max_batched_tokens;
    config.default_max_tokens = a.default_max_tokens;
    if let Some(n) = a.served_name {
        config.served_name = n;
    }
    let emu = Emulator::start(config)?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    eprintln!(
        "tokenfab engine emulator: {} on {} x {} at {}x time, serving http://{}",
        a.model,
        a.tp,
        a.accelerator,
        a.time_scale,
        listener.local_addr()?
    );
    tokenfab_engine_emu::serve(listener, emu, crate::shutdown_signal()).await?;
    Ok(())
}

/// A policy out of range, named by its flag.
fn policy_flag_error(e: &PolicyError) -> String {
    let flag = match e.field {
        "sla_classes" => "--sla-class / --default-sla-class".to_string(),
        f => format!("--{}", f.replace(['_', '.'], "-")),
    };
    format!("{flag}: {}", e.message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use tokenfab_core::policy::Choice;

    #[test]
    fn gpus_are_divided_evenly_or_as_each_replica_says() {
        assert_eq!(
            assign_gpus(&[None, None], 8).unwrap(),
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
        );
        assert!(
            assign_gpus(&[None, None, None], 8)
                .unwrap_err()
                .to_string()
                .contains("do not divide evenly")
        );
        assert_eq!(
            assign_gpus(&[Some(vec![0, 1]), Some(vec![3])], 4).unwrap(),
            vec![vec![0, 1], vec![3]]
        );
        let e = assign_gpus(&[Some(vec![0, 1]), Some(vec![1])], 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPU 1 is given to two replicas"), "{e}");
        let e = assign_gpus(&[Some(vec![7])], 4).unwrap_err().to_string();
        assert!(e.contains("GPUs 0 to 3"), "{e}");
        let e = assign_gpus(&[Some(vec![0]), None], 4).unwrap_err().to_string();
        assert!(e.contains("has no gpus="), "{e}");
    }

    /// A scenario with the given `policies:` section (empty: none).
    fn scenario(policies: &str) -> tokenfab_sim::Scenario {
        let yaml = format!(
            r#"
name: t
description: policies
duration: 1h
pools: [{{name: p, accelerator: h100-sxm, nodes: 1, devices_per_node: 1}}]
deployments: [{{pool: p, model: llama-3.1-8b}}]
workload:
  tenants: [{{name: a, model: llama-3.1-8b, arrivals: {{kind: poisson, batches_per_hour: 1}}, completion_window: 1h}}]
{policies}
"#
        );
        tokenfab_sim::Scenario::parse(&yaml, "t.yaml").unwrap()
    }

    /// The policies of a control plane and an agent started with `server` and `agent`
    /// flags.
    fn live(server: &[&str], agent: &[&str]) -> Policies {
        let mut p = Policies::default();
        let cli = crate::Cli::try_parse_from([&["tokenfab", "server"], server].concat()).unwrap();
        let crate::Command::Server(s) = cli.command else {
            unreachable!()
        };
        s.policies.apply(&mut p);
        let base = [
            "tokenfab",
            "agent",
            "--node",
            "n",
            "--replica",
            "url=http://127.0.0.1:1,model=llama-3.1-8b",
        ];
        let cli = crate::Cli::try_parse_from([&base[..], agent].concat()).unwrap();
        let crate::Command::Agent(a) = cli.command else {
            unreachable!()
        };
        a.tuning.apply(&mut p);
        p
    }

    #[test]
    fn an_empty_command_line_and_an_empty_scenario_configure_the_same_cores() {
        let live = live(&[], &[]);
        let simulated = scenario("").policies;
        assert_eq!(live, simulated);
        assert_eq!(live, Policies::default());
        assert_eq!(scenario("policies: {}").policies, live);
        // And the agent cores they configure (the control core's configuration is
        // derived by the same function from equal policies).
        let prices = Prices::new(None, Some(&tokenfab_core::AcceleratorId::new("h100-sxm")), 0.1, 1.2);
        assert_eq!(live.agent_config(prices), simulated.agent_config(prices));
        assert_eq!(TuningArgs::default().config(None), AgentConfig::default());
    }

    /// Every value a live flag accepts, set through a scenario, configures the cores the
    /// same way: the simulator can express every mode the live system has.
    #[test]
    fn the_simulator_can_express_every_live_mode() {
        fn names<T: Choice>() -> Vec<&'static str> {
            T::CHOICES.iter().map(|(n, _)| *n).collect()
        }
        let command = <crate::Cli as clap::CommandFactory>::command();
        let flag_values = |sub: &str, flag: &str| -> Vec<String> {
            let sub = command.find_subcommand(sub).unwrap();
            let arg = sub.get_arguments().find(|a| a.get_long() == Some(flag)).unwrap();
            arg.get_possible_values()
                .iter()
                .map(|v| v.get_name().to_string())
                .collect()
        };
        // (flag's subcommand, flag, scenario policies with VALUE, names the core knows)
        let cases = [
            (
                "server",
                "placement",
                "{placement: {mode: VALUE}}",
                names::<PlacementMode>(),
            ),
            ("server", "queue-order", "{queue_order: VALUE}", names::<QueueOrder>()),
            ("agent", "tuner", "{tuner: {mode: VALUE}}", names::<TunerMode>()),
            (
                "agent",
                "tuner-objective",
                "{tuner: {objective: VALUE}}",
                names::<ObjectiveKind>(),
            ),
            ("agent", "routing", "{routing: VALUE}", names::<Routing>()),
        ];
        for (sub, flag, yaml, core) in cases {
            let values = flag_values(sub, flag);
            assert_eq!(values, core, "--{flag} offers the core's values");
            for v in &values {
                let arg = format!("--{flag}={v}");
                let live = if sub == "server" {
                    live(&[&arg], &[])
                } else {
                    live(&[], &[&arg])
                };
                // Scenarios write snake_case; both spellings are accepted.
                for spelling in [v.clone(), v.replace('-', "_")] {
                    let simulated = scenario(&format!("policies: {}", yaml.replace("VALUE", &spelling))).policies;
                    assert_eq!(simulated, live, "--{flag} {v} vs policies {yaml} with {spelling}");
                }
            }
        }
    }

    #[test]
    fn a_policy_out_of_range_names_its_flag() {
        let p = live(&["--admission-headroom", "1.5"], &[]);
        let e = p.check().unwrap_err();
        assert_eq!(
            policy_flag_error(&e),
            "--admission-headroom: is 1.5; it must be in (0, 1]"
        );
        let p = live(&["--lease-ttl", "1s"], &[]);
        assert!(policy_flag_error(&p.check().unwrap_err()).starts_with("--lease-ttl: 1s is too short"));
    }
}
