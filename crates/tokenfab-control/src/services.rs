//! The tenant-facing `BatchService` and the agent-facing `AgentService`: authentication,
//! input parsing, and forwarding to the core loop. No decisions are made here.

use crate::auth::{Auth, Caller};
use crate::convert;
use crate::core_loop::{Command, Inputs};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokenfab_core::batch_input::{Endpoint, InputLimits, InputParser, ParsedInput};
use tokenfab_core::control::{NewBatch, SubmitError};
use tokenfab_core::{BatchId, ModelId, NodeId, RequestRef, TenantId, Timestamp, WorkUnitId};
use tokenfab_proto::v1 as pb;
use tokenfab_proto::v1::agent_service_server::AgentService;
use tokenfab_proto::v1::batch_service_server::BatchService;
use tokenfab_store::{Cursor, ResultKind, RowOutcome, StagedInput, Store};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// What both services share.
pub struct Shared<S> {
    pub tx: mpsc::Sender<Command>,
    pub store: S,
    pub auth: Auth,
    pub limits: InputLimits,
    pub models: BTreeSet<ModelId>,
    /// Each model's context length, for checking `max_tokens`.
    pub contexts: BTreeMap<ModelId, u32>,
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub uploads: UploadGate,
    pub metrics: Arc<crate::Metrics>,
    /// New batches are refused while the store has less free space.
    pub min_free_bytes: u64,
    pub views: Arc<crate::core_loop::ViewBoard>,
}

impl<S: Store> Shared<S> {
    /// Sends a command to the core loop and waits for its answer; refused while the store
    /// says this replica may not answer (a replicated store's leader without its lease).
    pub(crate) async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        // A lease that lapsed for a moment (a follower slow to answer a heartbeat) is
        // usually renewed within a heartbeat or two: wait up to a second for it before
        // refusing.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Err(why) = self.store.may_serve() {
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "{why}; retry (clients given every replica's URL move to the one that serves)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| convert::stopped())?;
        rx.await.map_err(|_| convert::stopped())
    }
}

/// Bounds the uploads received and parsed at once, in all and per tenant: each holds a
/// file being written and, while it is parsed, one line and the requests' locations in
/// memory. One tenant's uploads cannot take every slot.
pub struct UploadGate {
    max: u32,
    per_tenant: u32,
    active: std::sync::Mutex<(u32, HashMap<TenantId, u32>)>,
}

/// A place in the [`UploadGate`], given back when dropped.
pub struct UploadSlot<'a> {
    gate: &'a UploadGate,
    tenant: TenantId,
}

impl UploadGate {
    pub fn new(max: u32, per_tenant: u32) -> Self {
        UploadGate {
            max: max.max(1),
            per_tenant: per_tenant.max(1),
            active: std::sync::Mutex::new((0, HashMap::new())),
        }
    }

    fn enter(&self, tenant: &TenantId) -> Result<UploadSlot<'_>, Status> {
        let mut a = self
            .active
            .lock()
            .map_err(|_| Status::internal("upload gate poisoned"))?;
        let mine = a.1.get(tenant).copied().unwrap_or(0);
        if mine >= self.per_tenant {
            return Err(retry_later(format!(
                "tenant '{tenant}' has {mine} uploads in progress, the most one tenant may have at once; retry when one has finished"
            )));
        }
        if a.0 >= self.max {
            return Err(retry_later(format!(
                "the control plane is receiving {} uploads, the most it takes at once; retry in a few seconds",
                a.0
            )));
        }
        a.0 += 1;
        *a.1.entry(tenant.clone()).or_default() += 1;
        Ok(UploadSlot {
            gate: self,
            tenant: tenant.clone(),
        })
    }

    fn in_progress(&self) -> u32 {
        self.active.lock().map(|a| a.0).unwrap_or(0)
    }
}

impl Drop for UploadSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut a) = self.gate.active.lock() {
            a.0 = a.0.saturating_sub(1);
            if let Some(n) = a.1.get_mut(&self.tenant) {
                *n -= 1;
                if *n == 0 {
                    a.1.remove(&self.tenant);
                }
            }
        }
    }
}

/// RESOURCE_EXHAUSTED with a hint of when to retry (`retry-after-ms` metadata).
fn retry_later(message: String) -> Status {
    let mut s = Status::resource_exhausted(message);
    if let Ok(v) = "2000".parse() {
        s.metadata_mut().insert("retry-after-ms", v);
    }
    s
}

pub struct BatchApi<S>(pub Arc<Shared<S>>);
pub struct AgentApi<S>(pub Arc<Shared<S>>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Results per store page when streaming results.
const RESULT_PAGE: usize = 512;
/// Line errors returned inline in CreateBatchResponse.
const INLINE_LINE_ERRORS: usize = 20;
/// Pieces of the input file read at once while parsing it.
const PARSE_CHUNK: usize = 1 << 20;
/// Free space is checked again after this much of an upload.
const SPACE_CHECK_EVERY: u64 = 64 << 20;

/// Pieces of an uploaded file as they arrive.
pub(crate) type ByteStream<'a> = Pin<Box<dyn Stream<Item = Result<prost::bytes::Bytes, Status>> + Send + 'a>>;

/// Where a batch's input (or an uploaded file) comes from.
pub(crate) enum Source<'a> {
    Inline(prost::bytes::Bytes),
    Stream(ByteStream<'a>),
    /// A file already in the store (an uploaded file a batch is created from).
    Stored(std::path::PathBuf),
}

/// A batch accepted (durable), and its first invalid lines.
pub(crate) struct Submitted {
    pub view: tokenfab_core::control::BatchView,
    pub line_errors: Vec<pb::RequestError>,
}

impl<S: Store + Clone> Shared<S> {
    /// Takes an upload slot for `tenant` (refusing when all are taken) while `work` runs.
    pub(crate) async fn with_upload_slot<T>(
        &self,
        tenant: &TenantId,
        work: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let slot = match self.uploads.enter(tenant) {
            Ok(slot) => slot,
            Err(e) => {
                self.metrics.uploads_refused.inc();
                return Err(e);
            }
        };
        self.metrics
            .uploads_in_progress
            .set(i64::from(self.uploads.in_progress()));
        let result = work.await;
        drop(slot);
        self.metrics
            .uploads_in_progress
            .set(i64::from(self.uploads.in_progress()));
        result
    }

    /// Refuses new data while the disk is nearly full.
    pub(crate) fn check_space(&self) -> Result<(), Status> {
        match self.store.free_bytes() {
            Some(free) if free < self.min_free_bytes => Err(convert::submit_error(SubmitError::StorageLow {
                free: tokenfab_core::usage::human_bytes(free),
                min: tokenfab_core::usage::human_bytes(self.min_free_bytes),
            })),
            _ => Ok(()),
        }
    }

    /// Writes `source` into the store's staging area as it arrives (at most
    /// `max_file_bytes`), durably; its size in bytes.
    pub(crate) async fn stage(&self, source: Source<'_>) -> Result<(StagedInput, u64), Status> {
        self.check_space()?;
        let staged = self.store.stage().map_err(|e| Status::unavailable(e.to_string()))?;
        let write_err = |e: std::io::Error| {
            Status::unavailable(format!("the control plane cannot store the file: {e}; retry later"))
        };
        let limit = self.limits.max_file_bytes;
        let too_large =
            |bytes: u64| convert::input_error(tokenfab_core::batch_input::InputError::TooLarge { bytes, limit });
        if let Source::Stored(from) = &source {
            // A hard link shares the content without copying it; across filesystems, a copy.
            if std::fs::hard_link(from, staged.path()).is_err() {
                tokio::fs::copy(from, staged.path()).await.map_err(write_err)?;
            }
            let bytes = tokio::fs::metadata(staged.path()).await.map_err(write_err)?.len();
            if bytes > limit {
                return Err(too_large(bytes));
            }
            return Ok((staged, bytes));
        }
        let mut file = tokio::fs::File::create(staged.path()).await.map_err(write_err)?;
        let mut written = 0u64;
        let mut next_check = SPACE_CHECK_EVERY;
        match source {
            Source::Inline(data) => {
                if data.len() as u64 > limit {
                    return Err(too_large(data.len() as u64));
                }
                file.write_all(&data).await.map_err(write_err)?;
                written = data.len() as u64;
            }
            Source::Stream(mut stream) => {
                while let Some(piece) = stream.next().await {
                    let d = piece?;
                    written += d.len() as u64;
                    if written > limit {
                        return Err(too_large(written));
                    }
                    file.write_all(&d).await.map_err(write_err)?;
                    if written >= next_check {
                        next_check += SPACE_CHECK_EVERY;
                        self.check_space()?;
                    }
                }
            }
            Source::Stored(_) => unreachable!("handled above"),
        }
        // Durable before anything that names it can be.
        file.sync_all().await.map_err(write_err)?;
        Ok((staged, written))
    }

    /// Checks the options, stages the input file, parses it from there, and submits the
    /// batch; answers once it is durable.
    pub(crate) async fn submit_batch(
        &self,
        tenant: TenantId,
        options: pb::BatchOptions,
        source: Source<'_>,
        input_file: Option<tokenfab_core::FileId>,
    ) -> Result<Submitted, Status> {
        if options.model.trim().is_empty() {
            return Err(Status::invalid_argument(
                "options.model is required: name the model every request of the batch runs on",
            ));
        }
        let model = ModelId::new(options.model.clone());
        tokenfab_core::control::check_model(&self.models, &model).map_err(crate::convert::submit_error)?;
        let endpoint = match options.endpoint.trim() {
            "" => None,
            e => Some(Endpoint::from_path(e).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "options.endpoint: '{e}' is not an endpoint batches can target: use /v1/chat/completions or /v1/completions"
                ))
            })?),
        };
        tokenfab_core::control::check_metadata(&options.metadata)
            .map_err(|e| Status::invalid_argument(format!("options.{e}")))?;
        let slot_tenant = tenant.clone();
        self.with_upload_slot(&slot_tenant, async move {
            let (staged, written) = self.stage(source).await?;
            self.parse_and_submit(tenant, options, model, endpoint, staged, written, input_file)
                .await
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn parse_and_submit(
        &self,
        tenant: TenantId,
        options: pb::BatchOptions,
        model: ModelId,
        endpoint: Option<Endpoint>,
        staged: StagedInput,
        written: u64,
        input_file: Option<tokenfab_core::FileId>,
    ) -> Result<Submitted, Status> {
        let limits = self.limits;
        let strict = options.strict;
        let max_context = self.contexts.get(&model).copied();
        let path = staged.path().to_path_buf();
        let parse_model = model.clone();
        // Parsing is CPU work: off the async workers, one piece of the file at a time.
        // The file stays open: leases read bodies through it until the batch's commit.
        let (parsed, reader): (ParsedInput, std::fs::File) = tokio::task::spawn_blocking(move || {
            let mut parser = InputParser::new(parse_model, limits, strict)
                .endpoint(endpoint)
                .max_context(max_context);
            let mut f = std::fs::File::open(&path)
                .map_err(|e| Err(Status::unavailable(format!("cannot read the staged input file: {e}"))))?;
            let mut buf = vec![0u8; PARSE_CHUNK];
            loop {
                let n = std::io::Read::read(&mut f, &mut buf)
                    .map_err(|e| Err(Status::unavailable(format!("cannot read the staged input file: {e}"))))?;
                if n == 0 {
                    break;
                }
                parser.feed(&buf[..n]).map_err(Ok)?;
            }
            Ok((parser.finish().map_err(Ok)?, f))
        })
        .await
        .map_err(|e| Status::internal(format!("input parser failed: {e}")))?
        .map_err(|e: Result<tokenfab_core::batch_input::InputError, Status>| match e {
            Ok(input) => convert::input_error(input),
            Err(status) => status,
        })?;
        debug_assert_eq!(parsed.bytes, written);
        let new = NewBatch {
            sla_class: Some(options.sla_class),
            completion_window: Some(Duration::from_secs(options.completion_window_seconds)),
            metadata: options.metadata.into_iter().collect(),
            input_file,
            best_effort_if_late: options.best_effort_if_late,
            ..NewBatch::from_parsed(tenant, model, &parsed)
        };
        let line_errors: Vec<pb::RequestError> = parsed
            .line_errors
            .iter()
            .take(INLINE_LINE_ERRORS)
            .map(|e| pb::RequestError {
                code: e.code.as_str().into(),
                message: e.message.clone(),
                line: e.line,
            })
            .collect();
        let inputs = Inputs {
            file: staged,
            reader: Arc::new(reader),
            requests: Arc::new(parsed.requests),
            line_errors: parsed.line_errors,
        };
        let view = self
            .ask(|reply| Command::Submit { new, inputs, reply })
            .await?
            .map_err(convert::submit_error)?;
        Ok(Submitted { view, line_errors })
    }
}

impl<S: Store + Clone> BatchApi<S> {
    async fn submit(
        &self,
        tenant: TenantId,
        options: pb::BatchOptions,
        source: Source<'_>,
    ) -> Result<pb::CreateBatchResponse, Status> {
        let s = self.0.submit_batch(tenant, options, source, None).await?;
        Ok(pb::CreateBatchResponse {
            batch: Some(convert::batch(&s.view)),
            line_errors: s.line_errors,
        })
    }
}

#[tonic::async_trait]
impl<S: Store + Clone> BatchService for BatchApi<S> {
    async fn create_batch(
        &self,
        req: Request<pb::CreateBatchRequest>,
    ) -> Result<Response<pb::CreateBatchResponse>, Status> {
        let tenant = self.0.auth.tenant(req.metadata())?;
        let r = req.into_inner();
        let options = r
            .options
            .ok_or_else(|| Status::invalid_argument("options is required (at least options.model)"))?;
        self.submit(tenant, options, Source::Inline(r.input_jsonl))
            .await
            .map(Response::new)
    }

    async fn upload_batch(
        &self,
        req: Request<Streaming<pb::UploadBatchChunk>>,
    ) -> Result<Response<pb::CreateBatchResponse>, Status> {
        let tenant = self.0.auth.tenant(req.metadata())?;
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the upload is empty: send options first, then the file"))?;
        let Some(pb::upload_batch_chunk::Chunk::Options(options)) = first.chunk else {
            return Err(Status::invalid_argument(
                "the first message of an upload must carry options",
            ));
        };
        let pieces = stream.filter_map(|msg| match msg {
            Ok(pb::UploadBatchChunk {
                chunk: Some(pb::upload_batch_chunk::Chunk::Data(d)),
            }) => Some(Ok(d)),
            Ok(pb::UploadBatchChunk {
                chunk: Some(pb::upload_batch_chunk::Chunk::Options(_)),
            }) => Some(Err(Status::invalid_argument(
                "options may only be sent once, in the first message",
            ))),
            Ok(pb::UploadBatchChunk { chunk: None }) => None,
            Err(e) => Some(Err(e)),
        });
        self.submit(tenant, options, Source::Stream(Box::pin(pieces)))
            .await
            .map(Response::new)
    }

    async fn get_batch(&self, req: Request<pb::GetBatchRequest>) -> Result<Response<pb::Batch>, Status> {
        let tenant = self.0.auth.tenant(req.metadata())?;
        let id = convert::batch_id(&req.get_ref().batch_id)?;
        let view = self
            .0
            .ask(|reply| crate::core_loop::Command::Get { tenant, id, reply })
            .await?
            .map_err(convert::batch_error)?;
        Ok(Response::new(convert::batch(&view)))
    }

    async fn get_usage(&self, req: Request<pb::GetUsageRequest>) -> Result<Response<pb::TenantUsage>, Status> {
        let caller = self.0.auth.tenant_or_operator(req.metadata())?;
        let asked = req.get_ref().tenant.trim().to_string();
        let tenant = match caller {
            Caller::Tenant(me) if asked.is_empty() || asked == me.as_str() => me,
            Caller::Tenant(me) => {
                return Err(Status::permission_denied(format!(
                    "tenant: '{me}' may read only its own usage; another tenant's usage needs the operator's admin token"
                )));
            }
            Caller::Operator if asked.is_empty() => {
                return Err(Status::invalid_argument(
                    "tenant: with the admin token, name the tenant whose usage to read",
                ));
            }
            Caller::Operator => {
                let known = self.0.auth.tenant_names();
                if !known.iter().any(|t| t.as_str() == asked) {
                    let names: Vec<&str> = known.iter().map(TenantId::as_str).collect();
                    return Err(Status::not_found(format!(
                        "tenant: no tenant named '{asked}'; the configured tenants are {}",
                        names.join(", ")
                    )));
                }
                TenantId::new(asked)
            }
        };
        let since_ms = req.get_ref().since_unix_ms;
        if since_ms < 0 {
            return Err(Status::invalid_argument(format!(
                "since_unix_ms: {since_ms} is before 1970; use 0 to count every batch"
            )));
        }
        let since = Timestamp::from_micros((since_ms as u64).saturating_mul(1000));
        let name = tenant.to_string();
        let u = self
            .0
            .ask(|reply| crate::core_loop::Command::Usage { tenant, since, reply })
            .await?;
        Ok(Response::new(pb::TenantUsage {
            tenant: name,
            since_unix_ms: since_ms,
            batches: u.batches,
            requests_completed: u.requests_completed,
            requests_failed: u.requests_failed,
            usage: Some(convert::usage(&u.usage)),
            idle_joules: u.idle_joules,
            idle_cost_usd: u.idle_cost_usd,
        }))
    }

    async fn list_batches(
        &self,
        req: Request<pb::ListBatchesRequest>,
    ) -> Result<Response<pb::ListBatchesResponse>, Status> {
        let tenant = self.0.auth.tenant(req.metadata())?;
        let r = req.into_inner();
        let before = if r.before.is_empty() {
            None
        } else {
            Some(convert::batch_id(&r.before)?)
        };
        let limit = if r.limit == 0 { 100 } else { r.limit.min(1000) as usize };
        let (views, has_more) = self
            .0
            .ask(|reply| Command::List {
                tenant,
                before,
                limit,
                reply,
            })
            .await?;
        Ok(Response::new(pb::ListBatchesResponse {
            batches: views.iter().map(convert::batch).collect(),
            has_more,
        }))
    }

    async fn cancel_batch(&self, req: Request<pb::CancelBatchRequest>) -> Result<Response<pb::Batch>, Status> {
        let tenant = self.0.auth.tenant(req.metadata())?;
        let id = convert::batch_id(&req.get_ref().batch_id)?;
        let view = self
            .0
            .ask(|reply| Command::Cancel { tenant, id, reply })
            .await?
            .map_err(convert::batch_error)?;
        Ok(Response::new(convert::batch(&view)))
    }

    async fn delete_batch(
        &self,
        req: Request<pb::DeleteBatchRequest>,
    ) -> Result<Response<pb::DeleteBatchResponse>, Status> {
        let tenant = self.0.auth.tenant(req.metadata())?;
        let id = convert::batch_id(&req.get_ref().batch_id)?;
        self.0
            .ask(|reply| Command::Delete { tenant, id, reply })
            .await?
            .map_err(convert::batch_error)?;
        Ok(Response::new(pb::DeleteBatchResponse {}))
    }

    type WatchBatchStream = BoxStream<pb::Batch>;

    async fn watch_batch(
        &self,
        req: Request<pb::WatchBatchRequest>,
    ) -> Result<Response<Self::WatchBatchStream>, Status> {
        let tenant = self.0.auth.tenant(req.metadata())?;
        let r = req.into_inner();
        let id = convert::batch_id(&r.batch_id)?;
        let interval = Duration::from_millis(if r.min_interval_ms == 0 {
            200
        } else {
            u64::from(r.min_interval_ms)
        });
        let mut rx = self
            .0
            .ask(|reply| Command::Watch { tenant, id, reply })
            .await?
            .map_err(convert::batch_error)?;
        let (tx, out) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let view = rx.borrow_and_update().clone();
                let done = view.life.status().is_terminal();
                if tx.send(Ok(convert::batch(&view))).await.is_err() || done {
                    return;
                }
                tokio::time::sleep(interval).await;
                if rx.changed().await.is_err() {
                    // The batch reached its final status: send it, then end.
                    let last = rx.borrow().clone();
                    let _ = tx.send(Ok(convert::batch(&last))).await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    type StreamResultsStream = BoxStream<pb::ResultRecord>;

    async fn stream_results(
        &self,
        req: Request<pb::StreamResultsRequest>,
    ) -> Result<Response<Self::StreamResultsStream>, Status> {
        let tenant = self.0.auth.tenant(req.metadata())?;
        let r = req.into_inner();
        let id = convert::batch_id(&r.batch_id)?;
        let kind = match pb::ResultKind::try_from(r.kind).unwrap_or(pb::ResultKind::Unspecified) {
            pb::ResultKind::Errors => ResultKind::Errors,
            _ => ResultKind::Output,
        };
        // Ownership check through the core (another tenant's batch is NOT_FOUND).
        self.0
            .ask(|reply| Command::Get { tenant, id, reply })
            .await?
            .map_err(convert::batch_error)?;
        let store = self.0.store.clone();
        let (tx, out) = mpsc::channel(RESULT_PAGE);
        tokio::spawn(async move {
            let mut cursor = Some(Cursor::default());
            while let Some(c) = cursor {
                let page = match store.results(id, kind, c, RESULT_PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                        return;
                    }
                };
                for row in page.rows {
                    if tx.send(Ok(result_record(row))).await.is_err() {
                        return;
                    }
                }
                cursor = page.next;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}

pub(crate) fn result_record(row: tokenfab_store::ResultRow) -> pb::ResultRecord {
    use tokenfab_core::durable::Outcome;
    let outcome = match row.outcome {
        RowOutcome::Recorded(Outcome::Response {
            status_code,
            body,
            request_id,
        }) => pb::result_record::Outcome::Response(pb::EngineResponse {
            status_code: u32::from(status_code),
            body: body.into(),
            request_id,
        }),
        RowOutcome::Recorded(Outcome::Error { code, message }) => pb::result_record::Outcome::Error(pb::RequestError {
            code,
            message,
            line: row.line,
        }),
        RowOutcome::Invalid(e) => pb::result_record::Outcome::Error(pb::RequestError {
            code: e.code.as_str().into(),
            message: e.message,
            line: e.line,
        }),
    };
    pb::ResultRecord {
        line: row.line,
        custom_id: row.custom_id,
        outcome: Some(outcome),
        usage: Some(convert::usage(&row.usage)),
    }
}

#[tonic::async_trait]
impl<S: Store + Clone> AgentService for AgentApi<S> {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        self.0.auth.node_call(&req, &req.get_ref().node)?;
        let registration = convert::registration(req.into_inner())?;
        self.0.ask(|reply| Command::Register { registration, reply }).await?;
        Ok(Response::new(pb::RegisterResponse {
            lease_ttl_ms: self.0.lease_ttl.as_millis() as u64,
            heartbeat_interval_ms: self.0.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.0.auth.node_call(&req, &req.get_ref().node)?;
        let r = req.into_inner();
        let node = NodeId::new(r.node);
        let held = r.held_units.into_iter().map(WorkUnitId).collect();
        let replicas = convert::replica_reports(r.telemetry.unwrap_or_default());
        let reply = self
            .0
            .ask(|reply| Command::Heartbeat {
                node,
                held,
                replicas,
                reply,
            })
            .await?;
        Ok(Response::new(match reply {
            Ok(h) => pb::HeartbeatResponse {
                reregister: false,
                unknown_units: h.unknown_units.into_iter().map(|u| u.0).collect(),
                directives: h
                    .directives
                    .into_iter()
                    .map(|d| pb::ReplicaDirective {
                        replica_id: d.replica.to_string(),
                        owed_output_tokens_per_second: d.owed_tokens_per_s,
                        active: d.active,
                    })
                    .collect(),
            },
            Err(_) => pb::HeartbeatResponse {
                reregister: true,
                unknown_units: vec![],
                directives: vec![],
            },
        }))
    }

    async fn lease_work(&self, req: Request<pb::LeaseWorkRequest>) -> Result<Response<pb::LeaseWorkResponse>, Status> {
        self.0.auth.node_call(&req, &req.get_ref().node)?;
        let r = req.into_inner();
        let (node, model, max) = (NodeId::new(r.node), ModelId::new(r.model), r.max_requests.min(10_000));
        let wait = Duration::from_millis(u64::from(r.wait_ms.min(30_000)));
        let unit = self
            .0
            .ask(|reply| Command::Lease {
                node,
                model,
                max,
                wait,
                reply,
            })
            .await?
            .map_err(convert::unknown_node)?;
        Ok(Response::new(pb::LeaseWorkResponse {
            units: unit.into_iter().collect(),
        }))
    }

    async fn report_results(
        &self,
        req: Request<pb::ReportResultsRequest>,
    ) -> Result<Response<pb::ReportResultsResponse>, Status> {
        self.0.auth.node_call(&req, &req.get_ref().node)?;
        let r = req.into_inner();
        let node = NodeId::new(r.node);
        let results = convert::reported(r.results)?;
        let s = self
            .0
            .ask(|reply| Command::Report { node, results, reply })
            .await?
            .map_err(convert::unknown_node)?;
        Ok(Response::new(pb::ReportResultsResponse {
            recorded: s.recorded,
            duplicates: s.duplicates,
            unknown: s.unknown,
            requeued: s.requeued,
            not_leased: s.not_leased,
        }))
    }

    async fn release_work(
        &self,
        req: Request<pb::ReleaseWorkRequest>,
    ) -> Result<Response<pb::ReleaseWorkResponse>, Status> {
        self.0.auth.node_call(&req, &req.get_ref().node)?;
        let r = req.into_inner();
        if r.batches.len() != r.indices.len() {
            return Err(Status::invalid_argument(
                "batches and indices must have the same length",
            ));
        }
        let items = r
            .batches
            .iter()
            .zip(&r.indices)
            .map(|(&b, &i)| RequestRef {
                batch: BatchId(b),
                index: i,
            })
            .collect();
        let (node, unit) = (NodeId::new(r.node), WorkUnitId(r.unit_id));
        let released = self
            .0
            .ask(|reply| Command::Release {
                node,
                unit,
                items,
                reply,
            })
            .await?
            .map_err(convert::unknown_node)?;
        Ok(Response::new(pb::ReleaseWorkResponse { released }))
    }
}

/// The tenant-facing `SlaService`: the published throughput SLA.
pub struct SlaApi<S>(pub Arc<Shared<S>>);

#[tonic::async_trait]
impl<S: Store + Clone> tokenfab_proto::v1::sla_service_server::SlaService for SlaApi<S> {
    async fn get_sla(&self, req: Request<pb::GetSlaRequest>) -> Result<Response<pb::ThroughputSla>, Status> {
        self.0.auth.tenant(req.metadata())?;
        let views = self.0.views.fresh().await;
        Ok(Response::new(convert::sla(&views.sla)))
    }
}

/// The operator's `AdminService`.
pub struct AdminApi<S>(pub Arc<Shared<S>>);

/// Pieces of a backup stream sent to the caller at once.
const BACKUP_PIECE: usize = 1 << 20;

/// Writes the backup stream into gRPC messages of [`BACKUP_PIECE`] bytes (from a
/// blocking thread: it waits while the caller is slower than the store).
struct ChunkWriter {
    tx: mpsc::Sender<Result<pb::BackupChunk, Status>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(BACKUP_PIECE));
        self.tx
            .blocking_send(Ok(pb::BackupChunk { data: data.into() }))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the caller hung up"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= BACKUP_PIECE {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

#[tonic::async_trait]
impl<S: Store + Clone> tokenfab_proto::v1::admin_service_server::AdminService for AdminApi<S> {
    type BackupStream = BoxStream<pb::BackupChunk>;

    async fn backup(&self, req: Request<pb::BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        self.0.auth.operator(req.metadata())?;
        let (tx, out) = mpsc::channel(4);
        let writer = ChunkWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(BACKUP_PIECE),
        };
        let store = self.0.store.clone();
        tokio::spawn(async move {
            match store.backup(Box::new(writer)).await {
                Ok(s) => tracing::info!(batches = s.batches, results = s.results, bytes = s.bytes, "backup sent"),
                Err(e) => {
                    tracing::error!(error = %e, "backup failed");
                    let _ = tx
                        .send(Err(Status::unavailable(format!("the backup failed: {e}"))))
                        .await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}
