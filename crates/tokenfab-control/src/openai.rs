//! The OpenAI-compatible Files and Batches REST API, on its own listener
//! (`--openai-listen`), so that existing batch clients and the official SDKs work
//! unchanged (`base_url = http://HOST:PORT/v1`).
//!
//! It is a second door to the same rooms: every call goes through the same shared
//! service code as gRPC (`Shared::submit_batch`, the core loop's commands, the store's
//! result pages), so no batch logic is written twice. What differs from OpenAI's API is in
//! docs/openai-api.md; the surface is described by docs/openai-batch-api.yaml (OpenAPI 3),
//! which a test checks against this router and schemathesis checks every response against.

use crate::convert;
use crate::core_loop::Command;
use crate::services::{Shared, Source};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokenfab_core::batch::BatchStatus;
use tokenfab_core::control::BatchView;
use tokenfab_core::durable::FileMeta;
use tokenfab_core::{BatchId, FileId, TenantId, Timestamp};
use tokenfab_proto::v1 as pb;
use tokenfab_store::{Cursor, ResultKind, Store};
use tokio_stream::StreamExt;
use tonic::Status;

/// Result rows read from the store at once while a result file streams.
const PAGE: usize = 512;
/// Lines looked at to find the batch's model in an input file.
const MODEL_PEEK_LINES: usize = 64;

type Api<S> = State<Arc<Shared<S>>>;

/// The routes, each path as docs/openai-batch-api.yaml names it.
pub const ROUTES: [(&str, &str); 9] = [
    ("post", "/v1/files"),
    ("get", "/v1/files"),
    ("get", "/v1/files/{file_id}"),
    ("delete", "/v1/files/{file_id}"),
    ("get", "/v1/files/{file_id}/content"),
    ("post", "/v1/batches"),
    ("get", "/v1/batches"),
    ("get", "/v1/batches/{batch_id}"),
    ("post", "/v1/batches/{batch_id}/cancel"),
];

pub fn router<S: Store + Clone>(shared: Arc<Shared<S>>) -> axum::Router {
    use axum::routing::{get, post};
    // An upload may be as large as the largest input file, plus the form's framing.
    let upload_limit = usize::try_from(shared.limits.max_file_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(1 << 20);
    axum::Router::new()
        .route(
            "/v1/files",
            post(upload_file::<S>)
                .layer(DefaultBodyLimit::max(upload_limit))
                .get(list_files::<S>),
        )
        .route("/v1/files/{file_id}", get(get_file::<S>).delete(delete_file::<S>))
        .route("/v1/files/{file_id}/content", get(file_content::<S>))
        .route("/v1/batches", post(create_batch::<S>).get(list_batches::<S>))
        .route("/v1/batches/{batch_id}", get(get_batch::<S>))
        .route("/v1/batches/{batch_id}/cancel", post(cancel_batch::<S>))
        .fallback(not_found)
        .with_state(shared)
}

// ---- errors ----------------------------------------------------------------------------

/// An error as OpenAI's API reports one: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            code: None,
        }
    }

    fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        use tonic::Code;
        let (status, kind, code) = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", None),
            Code::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "invalid_request_error", None),
            Code::FailedPrecondition | Code::AlreadyExists => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("limit_reached")),
            Code::Unavailable | Code::Aborted => (StatusCode::SERVICE_UNAVAILABLE, "server_error", None),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        ApiError {
            status,
            kind,
            message: s.message().to_string(),
            param: None,
            code,
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found(
        "no such route: this server implements the OpenAI Files and Batches API (/v1/files, /v1/batches); see docs/openai-api.md",
    )
}

/// The tenant a request's `Authorization: Bearer` token names.
fn tenant<S>(shared: &Shared<S>, headers: &HeaderMap) -> Result<TenantId, ApiError> {
    let md = tonic::metadata::MetadataMap::from_headers(headers.clone());
    Ok(shared.auth.tenant(&md)?)
}

// ---- ids and objects -------------------------------------------------------------------

/// A file id: an uploaded file, or the output or error file of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileRef {
    Upload(FileId),
    Output(BatchId),
    Errors(BatchId),
}

impl FileRef {
    fn parse(s: &str) -> Result<FileRef, ApiError> {
        if let Ok(id) = s.parse::<FileId>() {
            return Ok(FileRef::Upload(id));
        }
        let batch = |rest: &str| rest.parse::<BatchId>().ok();
        let found = s.strip_prefix("file-").and_then(|rest| {
            if let Some(b) = rest.strip_suffix("-output").and_then(batch) {
                Some(FileRef::Output(b))
            } else {
                rest.strip_suffix("-errors").and_then(batch).map(FileRef::Errors)
            }
        });
        found.ok_or_else(|| {
            ApiError::not_found(format!(
                "no file '{s}': file ids look like file-00000042 (uploaded) or file-batch_00000042-output / -errors (results)"
            ))
        })
    }

    fn output(batch: BatchId) -> String {
        format!("file-{batch}-output")
    }

    fn errors(batch: BatchId) -> String {
        format!("file-{batch}-errors")
    }
}

fn secs(t: Timestamp) -> i64 {
    (t.as_micros() / 1_000_000) as i64
}

fn file_object(meta: &FileMeta, expires: Option<Timestamp>) -> Value {
    json!({
        "id": meta.id.to_string(),
        "object": "file",
        "bytes": meta.bytes,
        "created_at": secs(meta.created_at),
        "expires_at": expires.map(secs),
        "filename": meta.filename,
        "purpose": meta.purpose,
        "status": "processed",
    })
}

/// A batch as OpenAI's API shows one; tokenfab's own figures (energy, cost, its status
/// names) under `x_tokenfab`.
fn batch_object(v: &BatchView) -> Value {
    let m = &v.meta;
    let life = &v.life;
    let status = life.status();
    let openai_status = match status {
        BatchStatus::Validating => "validating",
        // Accepted and waiting in the queue: OpenAI shows such a batch in progress.
        BatchStatus::Queued | BatchStatus::InProgress => "in_progress",
        BatchStatus::Finalizing => "finalizing",
        BatchStatus::Completed => "completed",
        BatchStatus::Failed => "failed",
        BatchStatus::Expired => "expired",
        BatchStatus::Cancelling => "cancelling",
        BatchStatus::Cancelled => "cancelled",
    };
    let failed = v.counts.failed + v.counts.invalid;
    let done = status.is_terminal();
    let at = |t: Option<Timestamp>| t.map(secs);
    let u = v.usage;
    json!({
        "id": m.id.to_string(),
        "object": "batch",
        "endpoint": m.endpoint.path(),
        "model": m.model.as_str(),
        "errors": null,
        "input_file_id": m.input_file.map(|f| f.to_string()).unwrap_or_default(),
        "completion_window": tokenfab_core::time::human(m.completion_window),
        "status": openai_status,
        "output_file_id": (done && v.counts.completed > 0).then(|| FileRef::output(m.id)),
        "error_file_id": (done && failed > 0).then(|| FileRef::errors(m.id)),
        "created_at": secs(life.created_at),
        "in_progress_at": at(life.in_progress_at.or(life.queued_at)),
        "expires_at": secs(m.deadline),
        "finalizing_at": at(life.finalizing_at),
        "completed_at": at(life.completed_at),
        "failed_at": at(life.failed_at),
        "expired_at": at(life.expired_at),
        "cancelling_at": at(life.cancelling_at),
        "cancelled_at": at(life.cancelled_at),
        "request_counts": {"total": m.lines, "completed": v.counts.completed, "failed": failed},
        "metadata": m.metadata,
        "usage": {
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens,
        },
        "x_tokenfab": {
            "status": status.as_str(),
            "sla_class": m.sla_class,
            "invalid_lines": v.counts.invalid,
            "joules": u.joules,
            "device_seconds": u.device_seconds,
            "cost_usd": u.cost_usd,
        },
    })
}

/// One line of an OpenAI Batch output (or error) file.
pub fn output_line(batch: &str, r: &pb::ResultRecord) -> Value {
    let id = format!("{batch}_req_{:06}", r.line);
    match &r.outcome {
        Some(pb::result_record::Outcome::Response(resp)) => {
            let body: Value = serde_json::from_slice(&resp.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&resp.body).into_owned()));
            json!({
                "id": id, "custom_id": r.custom_id, "line": r.line,
                "response": {"status_code": resp.status_code, "request_id": resp.request_id, "body": body},
                "error": null,
            })
        }
        Some(pb::result_record::Outcome::Error(e)) => json!({
            "id": id, "custom_id": r.custom_id, "line": r.line, "response": null,
            "error": {"code": e.code, "message": e.message},
        }),
        None => json!({"id": id, "custom_id": r.custom_id, "line": r.line, "response": null, "error": null}),
    }
}

// ---- files -----------------------------------------------------------------------------

async fn upload_file<S: Store + Clone>(
    State(s): Api<S>,
    headers: HeaderMap,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let tenant = tenant(&s, &headers)?;
    let mut form = form.map_err(|e| {
        ApiError::invalid(
            "file",
            format!(
                "{}: upload the file as multipart/form-data with fields file and purpose",
                e.body_text()
            ),
        )
    })?;
    let mut purpose: Option<String> = None;
    let mut staged = None;
    let form_err = |e: axum::extract::multipart::MultipartError| {
        ApiError::invalid("file", format!("the multipart form cannot be read: {e}"))
    };
    let slot_tenant = tenant.clone();
    s.with_upload_slot(&slot_tenant, async {
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| Status::invalid_argument(form_err(e).message))?
        {
            match field.name() {
                Some("purpose") => {
                    purpose = Some(
                        field
                            .text()
                            .await
                            .map_err(|e| Status::invalid_argument(format!("purpose: {e}")))?,
                    );
                }
                Some("file") => {
                    let name = field
                        .file_name()
                        .unwrap_or("upload.jsonl")
                        .chars()
                        .take(255)
                        .collect::<String>();
                    let pieces = field
                        .map(|p| p.map_err(|e| Status::invalid_argument(format!("file: the upload broke off: {e}"))));
                    staged = Some((name, s.stage(Source::Stream(Box::pin(pieces))).await?));
                }
                _ => {}
            }
        }
        Ok(())
    })
    .await
    .map_err(|e: Status| {
        let param = if e.code() == tonic::Code::InvalidArgument {
            Some("file")
        } else {
            None
        };
        let mut a = ApiError::from(e);
        a.param = param;
        a
    })?;
    let purpose = purpose.ok_or_else(|| {
        ApiError::invalid(
            "purpose",
            "purpose is required: upload batch input files with purpose=batch",
        )
    })?;
    if purpose != "batch" {
        return Err(ApiError::invalid(
            "purpose",
            format!("purpose '{purpose}' is not supported here: this server takes batch input files (purpose=batch)"),
        ));
    }
    let (filename, (content, bytes)) =
        staged.ok_or_else(|| ApiError::invalid("file", "file is required: the JSONL batch input file"))?;
    let meta = s
        .ask(|reply| Command::AddFile {
            tenant: tenant.clone(),
            filename,
            purpose,
            content,
            bytes,
            reply,
        })
        .await?
        .map_err(convert::submit_error)?;
    let (meta, expires) = s
        .ask(|reply| Command::GetFile {
            tenant,
            id: meta.id,
            reply,
        })
        .await?
        .map_err(|e| ApiError::not_found(e.to_string()))?;
    Ok(axum::Json(file_object(&meta, expires)).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<i64>,
    order: Option<String>,
    purpose: Option<String>,
}

async fn list_files<S: Store + Clone>(
    State(s): Api<S>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let (tenant, q, limit) = list_request(&s, &headers, q, 10_000, 10_000)?;
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(o) => return Err(ApiError::invalid("order", format!("order '{o}' is not asc or desc"))),
    };
    let after = match q.after.as_deref() {
        None | Some("") => None,
        Some(a) => Some(a.parse::<FileId>().map_err(|()| {
            ApiError::invalid(
                "after",
                format!("after '{a}' is not an uploaded file's id (file-00000042)"),
            )
        })?),
    };
    let (files, more) = if q.purpose.as_deref().is_none_or(|p| p == "batch") {
        s.ask(|reply| Command::ListFiles {
            tenant,
            after,
            limit,
            ascending,
            reply,
        })
        .await?
    } else {
        (Vec::new(), false)
    };
    let data: Vec<Value> = files.iter().map(|(f, e)| file_object(f, *e)).collect();
    Ok(axum::Json(list(data, more)).into_response())
}

fn list(data: Vec<Value>, more: bool) -> Value {
    let first = data.first().and_then(|d| d["id"].as_str().map(str::to_string));
    let last = data.last().and_then(|d| d["id"].as_str().map(str::to_string));
    json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more})
}

/// The caller, its query and the page size of a list call.
fn list_request<S>(
    s: &Shared<S>,
    headers: &HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
    default: usize,
    max: usize,
) -> Result<(TenantId, ListQuery, usize), ApiError> {
    let tenant = tenant(s, headers)?;
    let Query(q) = q.map_err(|e| ApiError::invalid("limit", e.body_text()))?;
    let limit = check_limit(q.limit, default, max)?;
    Ok((tenant, q, limit))
}

fn check_limit(asked: Option<i64>, default: usize, max: usize) -> Result<usize, ApiError> {
    match asked {
        None => Ok(default),
        Some(n) if n >= 1 && n as u64 <= max as u64 => Ok(n as usize),
        Some(n) => Err(ApiError::invalid(
            "limit",
            format!("limit {n} is out of range: 1 to {max}"),
        )),
    }
}

/// A batch of the tenant's (NOT_FOUND for another tenant's).
async fn owned_batch<S: Store + Clone>(s: &Shared<S>, tenant: TenantId, id: BatchId) -> Result<BatchView, ApiError> {
    Ok(s.ask(|reply| Command::Get { tenant, id, reply })
        .await?
        .map_err(convert::batch_error)?)
}

async fn get_file<S: Store + Clone>(
    State(s): Api<S>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = tenant(&s, &headers)?;
    let obj = match FileRef::parse(&id)? {
        FileRef::Upload(f) => {
            let (meta, expires) = s
                .ask(|reply| Command::GetFile { tenant, id: f, reply })
                .await?
                .map_err(|e| ApiError::not_found(e.to_string()))?;
            file_object(&meta, expires)
        }
        r @ (FileRef::Output(b) | FileRef::Errors(b)) => {
            let view = owned_batch(&s, tenant, b).await?;
            let kind = if matches!(r, FileRef::Output(_)) {
                ResultKind::Output
            } else {
                ResultKind::Errors
            };
            let mut bytes = 0u64;
            for_each_line(&s.store, b, kind, |line| {
                bytes += line.len() as u64;
                true
            })
            .await?;
            json!({
                "id": id,
                "object": "file",
                "bytes": bytes,
                "created_at": secs(view.life.ended_at().unwrap_or(view.life.created_at)),
                "expires_at": null,
                "filename": format!("{b}_{}.jsonl", if kind == ResultKind::Output { "output" } else { "errors" }),
                "purpose": "batch_output",
                "status": "processed",
            })
        }
    };
    Ok(axum::Json(obj).into_response())
}

/// Calls `f` with each line (newline included) of a batch's output or error file, in
/// order, until it returns false.
async fn for_each_line<S: Store>(
    store: &S,
    batch: BatchId,
    kind: ResultKind,
    mut f: impl FnMut(Vec<u8>) -> bool,
) -> Result<(), ApiError> {
    let name = batch.to_string();
    let mut cursor = Some(Cursor::default());
    while let Some(c) = cursor {
        let page = store
            .results(batch, kind, c, PAGE)
            .await
            .map_err(|e| ApiError::from(Status::unavailable(e.to_string())))?;
        for row in page.rows {
            let mut line =
                serde_json::to_vec(&output_line(&name, &crate::services::result_record(row))).unwrap_or_default();
            line.push(b'\n');
            if !f(line) {
                return Ok(());
            }
        }
        cursor = page.next;
    }
    Ok(())
}

async fn file_content<S: Store + Clone>(
    State(s): Api<S>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = tenant(&s, &headers)?;
    let jsonl = [(header::CONTENT_TYPE, "application/jsonl")];
    match FileRef::parse(&id)? {
        FileRef::Upload(f) => {
            s.ask(|reply| Command::GetFile { tenant, id: f, reply })
                .await?
                .map_err(|e| ApiError::not_found(e.to_string()))?;
            let path = s
                .store
                .file_path(f)
                .ok_or_else(|| ApiError::not_found(format!("file {f} was deleted")))?;
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|_| ApiError::not_found(format!("file {f} was deleted")))?;
            let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
            Ok((jsonl, body).into_response())
        }
        r @ (FileRef::Output(b) | FileRef::Errors(b)) => {
            owned_batch(&s, tenant, b).await?;
            let kind = if matches!(r, FileRef::Output(_)) {
                ResultKind::Output
            } else {
                ResultKind::Errors
            };
            // Streamed page by page: a large result file never sits in memory whole.
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
            let store = s.store.clone();
            tokio::spawn(async move {
                let name = b.to_string();
                let mut cursor = Some(Cursor::default());
                while let Some(c) = cursor {
                    let page = match store.results(b, kind, c, PAGE).await {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                            return;
                        }
                    };
                    let mut chunk = Vec::new();
                    for row in page.rows {
                        let line = output_line(&name, &crate::services::result_record(row));
                        if serde_json::to_writer(&mut chunk, &line).is_ok() {
                            chunk.push(b'\n');
                        }
                    }
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                    cursor = page.next;
                }
            });
            let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
            Ok((jsonl, body).into_response())
        }
    }
}

async fn delete_file<S: Store + Clone>(
    State(s): Api<S>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = tenant(&s, &headers)?;
    match FileRef::parse(&id)? {
        FileRef::Upload(f) => {
            s.ask(|reply| Command::DeleteFile { tenant, id: f, reply })
                .await?
                .map_err(|e| ApiError::not_found(e.to_string()))?;
        }
        FileRef::Output(b) | FileRef::Errors(b) => {
            owned_batch(&s, tenant, b).await?;
            return Err(ApiError::invalid(
                "file_id",
                format!(
                    "{id} holds {b}'s results, which go with the batch: delete the batch (tokenfab batches delete {b}), or they go when its retention ends"
                ),
            ));
        }
    }
    Ok(axum::Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
}

// ---- batches ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct CreateBatch {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    metadata: Option<Value>,
    /// tokenfab's options beyond OpenAI's.
    x_tokenfab: Option<TokenfabOptions>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TokenfabOptions {
    sla_class: Option<String>,
    best_effort_if_late: Option<bool>,
    strict: Option<bool>,
}

/// The model a batch runs on: the first `body.model` its input names (a batch runs one
/// model; lines naming another are refused one by one by the parser).
fn peek_model(path: &std::path::Path) -> Result<String, ApiError> {
    use std::io::BufRead;
    #[derive(Deserialize)]
    struct Line {
        body: Option<Body>,
    }
    #[derive(Deserialize)]
    struct Body {
        model: Option<String>,
    }
    let file = std::fs::File::open(path).map_err(|e| ApiError::from(Status::unavailable(e.to_string())))?;
    let reader = std::io::BufReader::new(file);
    for line in reader.split(b'\n').take(MODEL_PEEK_LINES) {
        let Ok(line) = line else { break };
        if line.len() > 4 << 20 {
            continue;
        }
        if let Ok(Line {
            body: Some(Body { model: Some(m) }),
        }) = serde_json::from_slice::<Line>(&line)
        {
            return Ok(m);
        }
    }
    Err(ApiError::invalid(
        "input_file_id",
        "the input file's requests name no model (body.model): a tokenfab batch runs one model, named by its requests",
    ))
}

async fn create_batch<S: Store + Clone>(
    State(s): Api<S>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let tenant = tenant(&s, &headers)?;
    let req: CreateBatch = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("body", format!("the request body is not a valid batch request: {e}")))?;
    let file_id = req.input_file_id.filter(|f| !f.is_empty()).ok_or_else(|| {
        ApiError::invalid(
            "input_file_id",
            "input_file_id is required: upload the JSONL file with POST /v1/files first",
        )
    })?;
    let file = match FileRef::parse(&file_id).map_err(|e| e.with_param("input_file_id"))? {
        FileRef::Upload(f) => f,
        _ => {
            return Err(ApiError::invalid(
                "input_file_id",
                format!("{file_id} is a batch's result file, not an uploaded input file"),
            ));
        }
    };
    let endpoint = req.endpoint.ok_or_else(|| {
        ApiError::invalid(
            "endpoint",
            "endpoint is required: /v1/chat/completions or /v1/completions",
        )
    })?;
    if tokenfab_core::batch_input::Endpoint::from_path(&endpoint).is_none() {
        return Err(ApiError::invalid(
            "endpoint",
            format!("endpoint '{endpoint}' is not supported here: use /v1/chat/completions or /v1/completions"),
        ));
    }
    let window = req.completion_window.ok_or_else(|| {
        ApiError::invalid(
            "completion_window",
            "completion_window is required, e.g. 24h (any duration: 1h, 4h, 7d)",
        )
    })?;
    let window: Duration = humantime::parse_duration(&window).map_err(|e| {
        ApiError::invalid(
            "completion_window",
            format!("completion_window '{window}' is not a duration ({e}); write e.g. 24h, 4h or 90m"),
        )
    })?;
    let metadata: std::collections::HashMap<String, String> = match req.metadata {
        None | Some(Value::Null) => Default::default(),
        Some(Value::Object(m)) => m
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(v) => Ok((k, v)),
                other => Err(ApiError::invalid(
                    "metadata",
                    format!("metadata '{k}' is {other}: values must be strings"),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::invalid("metadata", "metadata must be an object of strings")),
    };
    let x = req.x_tokenfab.unwrap_or_default();
    let (_, _) = s
        .ask(|reply| Command::GetFile {
            tenant: tenant.clone(),
            id: file,
            reply,
        })
        .await?
        .map_err(|e| ApiError::not_found(e.to_string()).with_param("input_file_id"))?;
    let path = s
        .store
        .file_path(file)
        .ok_or_else(|| ApiError::not_found(format!("file {file} was deleted")).with_param("input_file_id"))?;
    let model = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || peek_model(&path))
            .await
            .map_err(|e| ApiError::from(Status::internal(e.to_string())))??
    };
    let options = pb::BatchOptions {
        model,
        completion_window_seconds: window.as_secs().max(1),
        sla_class: x.sla_class.unwrap_or_default(),
        metadata,
        strict: x.strict.unwrap_or(false),
        best_effort_if_late: x.best_effort_if_late.unwrap_or(false),
        endpoint,
    };
    let submitted = s
        .submit_batch(tenant, options, Source::Stored(path), Some(file))
        .await
        .map_err(|e| {
            let param = match e.message().split(':').next() {
                Some("options.model") => "input_file_id",
                Some("options.completion_window_seconds") => "completion_window",
                Some("options.metadata") => "metadata",
                Some("options.sla_class") => "x_tokenfab",
                _ => "input_file_id",
            };
            ApiError::from(e).with_param(param)
        })?;
    Ok(axum::Json(batch_object(&submitted.view)).into_response())
}

fn batch_id(id: &str) -> Result<BatchId, ApiError> {
    id.parse::<BatchId>()
        .map_err(|e| ApiError::not_found(format!("no batch '{id}': {e}")))
}

async fn get_batch<S: Store + Clone>(
    State(s): Api<S>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = tenant(&s, &headers)?;
    let view = owned_batch(&s, tenant, batch_id(&id)?).await?;
    Ok(axum::Json(batch_object(&view)).into_response())
}

async fn cancel_batch<S: Store + Clone>(
    State(s): Api<S>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = tenant(&s, &headers)?;
    let id = batch_id(&id)?;
    let view = s
        .ask(|reply| Command::Cancel { tenant, id, reply })
        .await?
        .map_err(convert::batch_error)?;
    Ok(axum::Json(batch_object(&view)).into_response())
}

async fn list_batches<S: Store + Clone>(
    State(s): Api<S>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let (tenant, q, limit) = list_request(&s, &headers, q, 20, 100)?;
    let before = match q.after.as_deref() {
        None | Some("") => None,
        Some(a) => Some(
            a.parse::<BatchId>()
                .map_err(|e| ApiError::invalid("after", format!("after: {e}")))?,
        ),
    };
    let (views, more) = s
        .ask(|reply| Command::List {
            tenant,
            before,
            limit,
            reply,
        })
        .await?;
    Ok(axum::Json(list(views.iter().map(batch_object).collect(), more)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_ids_name_uploads_and_result_files() {
        assert_eq!(FileRef::parse("file-00000042").unwrap(), FileRef::Upload(FileId(42)));
        assert_eq!(
            FileRef::parse(&FileRef::output(BatchId(7))).unwrap(),
            FileRef::Output(BatchId(7))
        );
        assert_eq!(
            FileRef::parse(&FileRef::errors(BatchId(7))).unwrap(),
            FileRef::Errors(BatchId(7))
        );
        for bad in ["file-", "file-abc", "batch_00000001", "file-batch_00000001-both", ""] {
            assert!(FileRef::parse(bad).is_err(), "{bad}");
        }
    }

    /// The OpenAPI document describes exactly the routes this router serves.
    #[test]
    fn the_openapi_document_lists_every_route_and_only_those() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openai-batch-api.yaml"))
            .expect("docs/openai-batch-api.yaml");
        let doc: serde_json::Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, ops) in paths {
            for method in ops.as_object().unwrap().keys().filter(|m| *m != "parameters") {
                documented.push((method.clone(), path.clone()));
            }
        }
        documented.sort();
        let mut served: Vec<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        served.sort();
        assert_eq!(documented, served);
    }
}
