//! Upgrades of stores written by older tokenfab versions, run when a store opens.
//!
//! Version 1 kept every request body in an `inputs` table; version 2 keeps them in one
//! input file per unfinished batch and only their location in the `requests` table, and
//! adds each batch's endpoint and result bytes.

use crate::StoreError;
use crate::redb_store::{
    BATCHES, BatchRecord, LINE_ERRORS, META, REQUESTS, RESULTS, SCHEMA_VERSION, StoredResult, decode, encode,
    input_path, io,
};
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use tokenfab_core::batch::Lifecycle;
use tokenfab_core::batch_input::{Endpoint, ParsedRequest};
use tokenfab_core::durable::{BatchMeta, BatchTotals};
use tokenfab_core::usage::Usage;
use tokenfab_core::{BatchId, ModelId, TenantId, Timestamp};

const V1_INPUTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("inputs");

#[derive(Deserialize)]
struct V1Meta {
    id: BatchId,
    tenant: TenantId,
    model: ModelId,
    sla_class: String,
    completion_window: Duration,
    deadline: Timestamp,
    metadata: BTreeMap<String, String>,
    input_bytes: u64,
    lines: u32,
    invalid_lines: u32,
    requests: u32,
}

#[derive(Deserialize)]
struct V1Totals {
    completed: u32,
    failed: u32,
    usage: Usage,
}

#[derive(Deserialize)]
struct V1Record {
    meta: V1Meta,
    life: Lifecycle,
    totals: Option<V1Totals>,
}

#[derive(Deserialize)]
struct V1Request {
    line: u32,
    custom_id: String,
    endpoint: Endpoint,
    body: String,
    prompt_tokens_estimate: u32,
    max_tokens: Option<u32>,
}

/// Moves the bodies of unfinished batches into input files (one body per line) and
/// rewrites every batch record and request in the version 2 encoding, in one transaction.
pub(crate) fn v1_to_v2(db: &Database, dir: &Path) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(io)?;
    txn.set_durability(Durability::Immediate).map_err(io)?;
    {
        let mut batches = txn.open_table(BATCHES).map_err(io)?;
        let inputs = txn.open_table(V1_INPUTS).map_err(io)?;
        let mut requests = txn.open_table(REQUESTS).map_err(io)?;
        let mut results = txn.open_table(RESULTS).map_err(io)?;
        let line_errors = txn.open_table(LINE_ERRORS).map_err(io)?;
        let mut records = Vec::new();
        for e in batches.iter().map_err(io)? {
            let (_, v) = e.map_err(io)?;
            records.push(decode::<V1Record>(v.value(), "version 1 batch record")?);
        }
        for old in records {
            let id = old.meta.id.0;
            let live = !old.life.status().is_terminal();
            let mut file = if live {
                Some(std::fs::File::create(input_path(dir, id)).map_err(io)?)
            } else {
                None
            };
            let (mut offset, mut endpoint) = (0u64, None);
            let mut mismatched = Vec::new();
            for e in inputs.range((id, 0)..=(id, u32::MAX)).map_err(io)? {
                let (k, v) = e.map_err(io)?;
                let r: V1Request = decode(v.value(), "version 1 request")?;
                if *endpoint.get_or_insert(r.endpoint) != r.endpoint && live {
                    mismatched.push((k.value().1, r.endpoint));
                }
                let body_len = u32::try_from(r.body.len()).unwrap_or(u32::MAX);
                if let Some(f) = file.as_mut() {
                    f.write_all(r.body.as_bytes()).map_err(io)?;
                    f.write_all(b"\n").map_err(io)?;
                }
                let new = ParsedRequest {
                    line: r.line,
                    custom_id: r.custom_id,
                    body_offset: if live { offset } else { 0 },
                    body_len: if live { body_len } else { 0 },
                    prompt_tokens_estimate: r.prompt_tokens_estimate,
                    max_tokens: r.max_tokens,
                };
                offset += r.body.len() as u64 + 1;
                requests.insert(k.value(), encode(&new)?.as_slice()).map_err(io)?;
            }
            if let Some(f) = file {
                f.sync_all().map_err(io)?;
            }
            // Version 1 let a batch mix endpoints; version 2 gives a batch one. Unfinished
            // requests of another endpoint than the batch's first end with an error
            // rather than be sent to the wrong one.
            for (index, e) in &mismatched {
                if results.get((id, *index)).map_err(io)?.is_none() {
                    let ended = StoredResult {
                        outcome: tokenfab_core::durable::Outcome::Error {
                            code: "endpoint_mismatch".into(),
                            message: format!(
                                "this request targets {} but its batch's first request another endpoint; since tokenfab 0.2 a batch targets one endpoint: submit it again in a batch of its own",
                                e.path()
                            ),
                        },
                        usage: Usage::default(),
                    };
                    results.insert((id, *index), encode(&ended)?.as_slice()).map_err(io)?;
                }
            }
            let mut result_bytes = 0;
            for e in results.range((id, 0)..=(id, u32::MAX)).map_err(io)? {
                let (_, v) = e.map_err(io)?;
                result_bytes += decode::<StoredResult>(v.value(), "result")?.outcome.stored_bytes();
            }
            let mut line_error_bytes = 0;
            for e in line_errors.range((id, 0)..=(id, u32::MAX)).map_err(io)? {
                let (_, v) = e.map_err(io)?;
                line_error_bytes +=
                    decode::<tokenfab_core::batch_input::LineError>(v.value(), "line error")?.stored_bytes();
            }
            let m = old.meta;
            let record = BatchRecord {
                meta: BatchMeta {
                    id: m.id,
                    tenant: m.tenant,
                    model: m.model,
                    sla_class: m.sla_class,
                    completion_window: m.completion_window,
                    deadline: m.deadline,
                    metadata: m.metadata,
                    endpoint: endpoint.unwrap_or_default(),
                    input_bytes: m.input_bytes,
                    line_error_bytes,
                    input_file: None,
                    lines: m.lines,
                    invalid_lines: m.invalid_lines,
                    requests: m.requests,
                },
                life: old.life,
                totals: old.totals.map(|t| BatchTotals {
                    completed: t.completed,
                    failed: t.failed,
                    usage: t.usage,
                    result_bytes,
                }),
            };
            batches.insert(id, encode(&record)?.as_slice()).map_err(io)?;
        }
    }
    txn.delete_table(V1_INPUTS).map_err(io)?;
    {
        let mut meta = txn.open_table(META).map_err(io)?;
        meta.insert("schema", SCHEMA_VERSION).map_err(io)?;
    }
    std::fs::File::open(dir.join("inputs"))
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    txn.commit().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cursor, RedbStore, ResultKind, Store};
    use serde::Serialize;
    use tokenfab_core::RequestRef;
    use tokenfab_core::durable::Outcome;

    #[derive(Serialize)]
    struct V1MetaOut<'a> {
        id: BatchId,
        tenant: &'a str,
        model: &'a str,
        sla_class: &'a str,
        completion_window: Duration,
        deadline: Timestamp,
        metadata: BTreeMap<String, String>,
        input_bytes: u64,
        lines: u32,
        invalid_lines: u32,
        requests: u32,
    }

    #[derive(Serialize)]
    struct V1RecordOut<'a> {
        meta: V1MetaOut<'a>,
        life: Lifecycle,
        totals: Option<(u32, u32, Usage)>,
    }

    #[derive(Serialize)]
    struct V1RequestOut<'a> {
        line: u32,
        custom_id: &'a str,
        endpoint: Endpoint,
        body: &'a str,
        prompt_tokens_estimate: u32,
        max_tokens: Option<u32>,
    }

    /// A store written by version 1 (bodies in a table) opens with its queued batch's
    /// bodies in an input file and its finished batch's results intact.
    #[tokio::test]
    async fn a_version_1_store_is_upgraded_without_losing_work() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join("tokenfab.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert("schema", 1u64).unwrap();
                let mut batches = txn.open_table(BATCHES).unwrap();
                let mut inputs = txn.open_table(V1_INPUTS).unwrap();
                let mut results = txn.open_table(RESULTS).unwrap();
                let t = Timestamp::from_millis(1_700_000_000_000);
                for (id, done) in [(1u64, true), (2, false)] {
                    let mut life = Lifecycle::new(BatchId(id), t);
                    life.queue(t).unwrap();
                    if done {
                        life.start(t).unwrap();
                        life.finalize(t).unwrap();
                        life.complete(t).unwrap();
                    }
                    let rec = V1RecordOut {
                        meta: V1MetaOut {
                            id: BatchId(id),
                            tenant: "acme",
                            model: "llama-3.1-8b",
                            sla_class: "standard",
                            completion_window: Duration::from_secs(3600),
                            deadline: t,
                            metadata: BTreeMap::new(),
                            input_bytes: 100,
                            lines: 2,
                            invalid_lines: 0,
                            requests: 2,
                        },
                        life,
                        totals: done.then_some((2, 0, Usage::default())),
                    };
                    batches
                        .insert(id, postcard::to_allocvec(&rec).unwrap().as_slice())
                        .unwrap();
                    for i in 0..2u32 {
                        let body = format!(r#"{{"messages":[{{"role":"user","content":"q{id}.{i}"}}]}}"#);
                        let r = V1RequestOut {
                            line: i + 1,
                            custom_id: &format!("c{i}"),
                            endpoint: Endpoint::Completions,
                            body: &body,
                            prompt_tokens_estimate: 10,
                            max_tokens: Some(8),
                        };
                        inputs
                            .insert((id, i), postcard::to_allocvec(&r).unwrap().as_slice())
                            .unwrap();
                    }
                    if done {
                        let res = StoredResult {
                            outcome: Outcome::Response {
                                status_code: 200,
                                body: b"{}".to_vec(),
                                request_id: "x".into(),
                            },
                            usage: Usage::default(),
                        };
                        results.insert((id, 0), encode(&res).unwrap().as_slice()).unwrap();
                    }
                }
            }
            txn.commit().unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        let loaded = store.load().await.unwrap().batches;
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[1].batch.meta.endpoint, Endpoint::Completions);
        assert_eq!(loaded[1].batch.requests.len(), 2);
        let bodies = store
            .bodies(vec![
                RequestRef {
                    batch: BatchId(2),
                    index: 1,
                },
                RequestRef {
                    batch: BatchId(1),
                    index: 0,
                },
            ])
            .await
            .unwrap();
        let b = bodies[0].as_ref().expect("the queued batch keeps its bodies");
        assert_eq!(&b.body[..], br#"{"messages":[{"role":"user","content":"q2.1"}]}"#);
        assert_eq!(b.custom_id, "c1");
        assert!(bodies[1].is_none(), "a finished batch's bodies are not needed");
        let out = store
            .results(BatchId(1), ResultKind::Output, Cursor::default(), 10)
            .await
            .unwrap();
        assert_eq!(out.rows[0].custom_id, "c0");
        assert_eq!(loaded[0].batch.totals.unwrap().result_bytes, 3 + 64);
    }
}
