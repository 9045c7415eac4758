//! The tenant-facing `BatchService` and the agent-facing `AgentService`: authentication,
//! input parsing, and forwarding to the core loop. No decisions are made here.

use crate::auth::{Auth, Caller};
use crate::convert;
use crate::core_loop::Command;
use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokenfab_core::batch_input::{InputLimits, ParsedInput, parse_batch_input};
use tokenfab_core::control::NewBatch;
use tokenfab_core::durable::RequestMeta;
use tokenfab_core::{BatchId, ModelId, NodeId, RequestRef, TenantId, Timestamp, WorkUnitId};
use tokenfab_proto::v1 as pb;
use tokenfab_proto::v1::agent_service_server::AgentService;
use tokenfab_proto::v1::batch_service_server::BatchService;
use tokenfab_store::{Cursor, ResultKind, RowOutcome, Store};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// What both services share.
pub struct Shared<S> {
    pub tx: mpsc::Sender<Command>,
    pub store: S,
    pub auth: Auth,
    pub limits: InputLimits,
    pub models: BTreeSet<ModelId>,
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
}

impl<S> Shared<S> {
    /// Sends a command to the core loop and waits for its answer.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| convert::stopped())?;
        rx.await.map_err(|_| convert::stopped())
    }
}

pub struct BatchApi<S>(pub Arc<Shared<S>>);
pub struct AgentApi<S>(pub Arc<Shared<S>>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Results per store page when streaming results.
const RESULT_PAGE: usize = 512;
/// Line errors returned inline in CreateBatchResponse.
const INLINE_LINE_ERRORS: usize = 20;

impl<S: Store + Clone> BatchApi<S> {
    async fn submit(
        &self,
        tenant: TenantId,
        options: pb::BatchOptions,
        input: Vec<u8>,
    ) -> Result<pb::CreateBatchResponse, Status> {
        let s = &self.0;
        if options.model.trim().is_empty() {
            return Err(Status::invalid_argument(
                "options.model is required: name the model every request of the batch runs on",
            ));
        }
        let model = ModelId::new(options.model.clone());
        if !s.models.contains(&model) {
            let served: Vec<&str> = s.models.iter().map(ModelId::as_str).collect();
            return Err(Status::not_found(format!(
                "options.model: unknown model '{model}': this cluster serves {}",
                served.join(", ")
            )));
        }
        let limits = s.limits;
        let strict = options.strict;
        let parse_model = model.clone();
        // Parsing a large file is CPU work: keep it off the async workers.
        let parsed: ParsedInput =
            tokio::task::spawn_blocking(move || parse_batch_input(&input, &parse_model, &limits, strict))
                .await
                .map_err(|e| Status::internal(format!("input parser failed: {e}")))?
                .map_err(convert::input_error)?;
        let new = NewBatch {
            tenant,
            model,
            sla_class: Some(options.sla_class),
            completion_window: Some(Duration::from_secs(options.completion_window_seconds)),
            metadata: options.metadata.into_iter().collect(),
            input_bytes: parsed.bytes,
            lines: parsed.lines,
            invalid_lines: parsed.line_errors.len() as u32,
            requests: parsed.requests.iter().map(RequestMeta::from).collect(),
            best_effort_if_late: options.best_effort_if_late,
        };
        let inline: Vec<pb::RequestError> = parsed
            .line_errors
            .iter()
            .take(INLINE_LINE_ERRORS)
            .map(|e| pb::RequestError {
                code: e.code.as_str().into(),
                message: e.message.clone(),
                line: e.line,
            })
            .collect();
        let view = s
            .ask(|reply| Command::Submit {
                new,
                requests: parsed.requests,
                line_errors: parsed.line_errors,
                reply,
            })
            .await?
            .map_err(convert::submit_error)?;
        Ok(pb::CreateBatchResponse {
            batch: Some(convert::batch(&view)),
            line_errors: inline,
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
        self.submit(tenant, options, r.input_jsonl.to_vec())
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
        let limit = self.0.limits.max_file_bytes;
        let mut input = Vec::new();
        while let Some(msg) = stream.message().await? {
            match msg.chunk {
                Some(pb::upload_batch_chunk::Chunk::Data(d)) => {
                    if input.len() as u64 + d.len() as u64 > limit {
                        return Err(Status::resource_exhausted(format!(
                            "the input file is over the limit of {limit} bytes; split it into several batches"
                        )));
                    }
                    input.extend_from_slice(&d);
                }
                Some(pb::upload_batch_chunk::Chunk::Options(_)) => {
                    return Err(Status::invalid_argument(
                        "options may only be sent once, in the first message",
                    ));
                }
                None => {}
            }
        }
        self.submit(tenant, options, input).await.map(Response::new)
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

fn result_record(row: tokenfab_store::ResultRow) -> pb::ResultRecord {
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
        self.0.auth.agent(req.metadata())?;
        let registration = convert::registration(req.into_inner())?;
        self.0.ask(|reply| Command::Register { registration, reply }).await?;
        Ok(Response::new(pb::RegisterResponse {
            lease_ttl_ms: self.0.lease_ttl.as_millis() as u64,
            heartbeat_interval_ms: self.0.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.0.auth.agent(req.metadata())?;
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
        self.0.auth.agent(req.metadata())?;
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
        self.0.auth.agent(req.metadata())?;
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
        }))
    }

    async fn release_work(
        &self,
        req: Request<pb::ReleaseWorkRequest>,
    ) -> Result<Response<pb::ReleaseWorkResponse>, Status> {
        self.0.auth.agent(req.metadata())?;
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
        let doc = self.0.ask(|reply| Command::Sla { reply }).await?;
        Ok(Response::new(convert::sla(&doc)))
    }
}
