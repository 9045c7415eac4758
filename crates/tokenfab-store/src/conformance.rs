//! The conformance suite every [`Store`] backend must pass.
//!
//! Call [`check`] from a backend's tests with a function that opens the backend over the
//! same durable location each time (a fresh, empty location for the first call). The
//! suite drives a real [`ControlCore`] and replays what it persists, so backends are
//! tested with exactly the operations the control plane emits.

use crate::{BatchInputs, Cursor, ResultKind, RowOutcome, Store, WriteSet};
use std::collections::BTreeMap;
use std::time::Duration;
use tokenfab_core::RequestRef;
use tokenfab_core::batch::BatchStatus;
use tokenfab_core::batch_input::{InputLimits, parse_batch_input};
use tokenfab_core::control::{
    Action, ControlConfig, ControlCore, NewBatch, NodeDevice, NodeRegistration, ReplicaReport, ReportedOutcome,
    ReportedResult,
};
use tokenfab_core::durable::{DurableOp, Outcome, RequestMeta};
use tokenfab_core::protocol::{ControlInput, ControlReply, InputSeq, Persisted};
use tokenfab_core::usage::Usage;
use tokenfab_core::{AcceleratorId, ModelId, NodeId, ReplicaId, SuperNodeId, TenantId, Timestamp};

fn line(id: &str) -> String {
    format!(
        r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":"hi {id}"}}],"max_tokens":8}}}}"#
    )
}

/// Collects what the core asks to persist since the last call, with the inputs.
fn write_set(core: &mut ControlCore, inputs: &mut BTreeMap<u64, BatchInputs>) -> WriteSet {
    let mut set = WriteSet::default();
    while let Some(a) = core.poll_action() {
        if let Action::Persist(op) = a {
            if let DurableOp::CreateBatch { meta, .. } = &op {
                set.inputs.extend(inputs.remove(&meta.id.0));
            }
            set.ops.push(op);
        }
    }
    set
}

/// Commits what the core asks to persist, as a shell does, and returns the mark that
/// opens the answers waiting for it.
async fn commit<S: Store>(store: &S, core: &mut ControlCore, inputs: &mut BTreeMap<u64, BatchInputs>) -> Persisted {
    store.apply(write_set(core, inputs)).await.unwrap();
    core.advance(core.handled())
}

/// Runs the suite. `open` must return a store over the same durable state on every
/// call (the suite drops and reopens it to check durability); the state must start empty.
pub async fn check<S: Store>(open: impl Fn() -> S) {
    let store = open();
    assert!(store.load().await.unwrap().batches.is_empty(), "a new store is empty");

    // A batch of 5 lines, 2 of them invalid, its input file staged on the store.
    let model = ModelId::from("llama-3.1-8b");
    let text = format!("{}\nnot json\n{}\n{}\n{}\n", line("a"), line("b"), line("c"), line("a"));
    let parsed = parse_batch_input(text.as_bytes(), &model, &InputLimits::default(), false).unwrap();
    let staged = store.stage().unwrap();
    std::fs::write(staged.path(), &text).unwrap();
    // A staged file that never becomes a batch is removed when dropped.
    let abandoned = store.stage().unwrap();
    std::fs::write(abandoned.path(), "x").unwrap();
    let abandoned_path = abandoned.path().to_path_buf();
    drop(abandoned);
    assert!(!abandoned_path.exists());
    assert_eq!((parsed.requests.len(), parsed.line_errors.len()), (3, 2));
    let t0 = Timestamp::from_millis(1_700_000_000_000);
    let mut core = ControlCore::new(ControlConfig::default());
    let tenant = TenantId::from("acme");
    let ControlReply::Submitted(submitted) = core.handle(
        t0,
        ControlInput::Submit(NewBatch {
            completion_window: Some(Duration::from_secs(600)),
            metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
            ..NewBatch::from_parsed(tenant.clone(), model.clone(), &parsed)
        }),
    ) else {
        unreachable!("a submission is answered as one")
    };
    // The shell stages the batch's input by its id before the commit, as the live one does.
    let id = submitted.peek().as_ref().unwrap().meta.id;
    let mut inputs = BTreeMap::from([(
        id.0,
        BatchInputs {
            batch: id,
            file: staged,
            requests: parsed.requests.clone().into(),
            line_errors: parsed.line_errors.clone(),
        },
    )]);
    let persisted = commit(&store, &mut core, &mut inputs).await;
    let view = submitted.release(persisted).expect("committed").unwrap();
    assert_eq!(view.meta.id, id);

    // Reopened, the batch is there with its requests, and nothing has a result.
    drop(store);
    let store = open();
    let loaded = store.load().await.unwrap().batches;
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].batch.meta, view.meta);
    assert_eq!(loaded[0].batch.life.status(), BatchStatus::Queued);
    assert_eq!(
        loaded[0].batch.requests,
        parsed.requests.iter().map(RequestMeta::from).collect::<Vec<_>>()
    );
    assert_eq!(
        loaded[0].batch.requests.iter().map(|r| r.line).collect::<Vec<_>>(),
        [1, 3, 4]
    );
    assert!(loaded[0].batch.results.is_empty());
    // Bodies are read when leased, in the order asked, exactly as in the file.
    let refs = [2u32, 0, 7].map(|index| RequestRef { batch: id, index });
    let bodies = store.bodies(refs.to_vec()).await.unwrap();
    assert_eq!(bodies.len(), 3);
    for (b, r) in bodies
        .iter()
        .zip(&[parsed.requests[2].clone(), parsed.requests[0].clone()])
    {
        let b = b.as_ref().expect("a queued request has its body");
        assert_eq!(&b.body[..], r.body(text.as_bytes()));
        assert_eq!(b.custom_id, r.custom_id);
        assert_eq!(b.endpoint, parsed.endpoint);
    }
    assert!(bodies[2].is_none(), "no request 7");

    // Two results: one success, one engine error (HTTP 400).
    let node = NodeId::from("n1");
    core.register(
        t0,
        NodeRegistration {
            node: node.clone(),
            super_node: SuperNodeId::from("s"),
            devices: vec![NodeDevice {
                index: 0,
                accelerator: AcceleratorId::from("h100-sxm"),
                domain: 0,
            }],
            replicas: vec![],
            usd_per_device_hour: None,
        },
    );
    let grant = core.lease(t0, &node, &model, 2).unwrap().unwrap();
    let response = |status: u16| {
        ReportedOutcome::Final(Outcome::Response {
            status_code: status,
            body: format!("{{\"s\":{status}}}").into_bytes(),
            request_id: "r".into(),
        })
    };
    let usage = Usage {
        prompt_tokens: 4,
        completion_tokens: 8,
        joules: 2.5,
        device_seconds: 0.1,
        cost_usd: 0.0,
    };
    let reports = vec![
        ReportedResult {
            unit: grant.unit,
            req: grant.items[0].req,
            outcome: response(200),
            usage,
            latency: std::time::Duration::ZERO,
        },
        ReportedResult {
            unit: grant.unit,
            req: grant.items[1].req,
            outcome: response(400),
            usage,
            latency: std::time::Duration::ZERO,
        },
    ];
    let ControlReply::Reported(reported) = core.handle(
        t0,
        ControlInput::Report {
            node: node.clone(),
            results: reports,
        },
    ) else {
        unreachable!("a report is answered as one")
    };
    let persisted = commit(&store, &mut core, &mut inputs).await;
    assert_eq!(reported.release(persisted).expect("committed").unwrap().recorded, 2);

    let out = store
        .results(id, ResultKind::Output, Cursor::default(), 100)
        .await
        .unwrap();
    assert_eq!(out.rows.len(), 1);
    assert_eq!((out.rows[0].line, out.rows[0].custom_id.as_str()), (1, "a"));
    assert_eq!(out.rows[0].usage.completion_tokens, 8);
    assert!(out.next.is_none());
    let errs = store
        .results(id, ResultKind::Errors, Cursor::default(), 100)
        .await
        .unwrap();
    let lines: Vec<(u32, bool)> = errs
        .rows
        .iter()
        .map(|r| (r.line, matches!(r.outcome, RowOutcome::Invalid(_))))
        .collect();
    assert_eq!(
        lines,
        [(2, true), (3, false), (5, true)],
        "errors in line order: invalid lines and the HTTP 400"
    );
    // Paging returns the same rows one at a time.
    let mut paged = Vec::new();
    let mut cursor = Some(Cursor::default());
    while let Some(c) = cursor {
        let page = store.results(id, ResultKind::Errors, c, 1).await.unwrap();
        paged.extend(page.rows.iter().map(|r| r.line));
        cursor = page.next;
        assert!(paged.len() <= 3, "paging terminates");
    }
    assert_eq!(paged, [2, 3, 5]);

    // Reopen mid-batch: results survive and the remaining request is still open.
    drop(store);
    let store = open();
    let loaded = store.load().await.unwrap().batches;
    let mut results = loaded[0].batch.results.clone();
    results.sort_by_key(|r| r.index);
    assert_eq!(
        results.iter().map(|r| (r.index, r.succeeded)).collect::<Vec<_>>(),
        [(0, true), (1, false)]
    );
    assert_eq!(
        results[0].usage,
        Usage {
            cost_usd: results[0].usage.cost_usd,
            ..usage
        },
        "usage survives"
    );
    let ReportedOutcome::Final(stored) = response(200) else {
        unreachable!()
    };
    assert_eq!(results[0].stored_bytes, stored.stored_bytes());
    let mut recovered = ControlCore::recover(
        ControlConfig::default(),
        loaded.into_iter().map(|l| l.batch).collect(),
        t0,
    );
    recovered.register(
        t0,
        NodeRegistration {
            node: node.clone(),
            super_node: SuperNodeId::from("s"),
            devices: vec![],
            replicas: vec![],
            usd_per_device_hour: None,
        },
    );
    let g = recovered.lease(t0, &node, &model, 10).unwrap().unwrap();
    assert_eq!(g.items.iter().map(|i| i.req.index).collect::<Vec<_>>(), [2]);
    let ControlReply::Reported(reported) = recovered.handle(
        t0,
        ControlInput::Report {
            node: node.clone(),
            results: vec![ReportedResult {
                unit: g.unit,
                req: g.items[0].req,
                outcome: response(200),
                usage,
                latency: std::time::Duration::ZERO,
            }],
        },
    ) else {
        unreachable!("a report is answered as one")
    };
    assert_eq!(
        recovered.batch(&tenant, id).unwrap().life.status(),
        BatchStatus::Completed
    );
    let before = recovered.handled();
    let early = reported.release(recovered.advance(InputSeq(before.0 - 1)));
    let reported = early.expect_err("an answer does not open before its writes are committed");
    let persisted = commit(&store, &mut recovered, &mut inputs).await;
    assert_eq!(reported.release(persisted).expect("committed").unwrap().recorded, 1);

    // A final batch loads with its totals and without its requests; its input is gone.
    drop(store);
    let store = open();
    let loaded = store.load().await.unwrap().batches;
    assert_eq!(loaded[0].batch.life.status(), BatchStatus::Completed);
    let totals = loaded[0].batch.totals.expect("final batches store totals");
    assert_eq!((totals.completed, totals.failed), (2, 1));
    assert!(totals.result_bytes > 0);
    assert!(loaded[0].batch.requests.is_empty());
    assert_eq!(
        store.bodies(vec![RequestRef { batch: id, index: 0 }]).await.unwrap(),
        [None],
        "a finished batch's input is deleted"
    );
    let out = store
        .results(id, ResultKind::Output, Cursor::default(), 100)
        .await
        .unwrap();
    assert_eq!(
        out.rows.iter().map(|r| r.custom_id.as_str()).collect::<Vec<_>>(),
        ["a", "c"]
    );

    // Idle energy the agent reports is charged to the tenant that used the devices, and
    // the latest charge per tenant and hour survives a restart.
    assert!(store.idle_shares().await.unwrap().is_empty());
    let replica = |idle_j: f64| ReplicaReport {
        replica: ReplicaId::from("r0"),
        idle_j,
        ..ReplicaReport::default()
    };
    // Charges are written by the core's timer, which a shell runs when it is due.
    recovered.heartbeat(t0, &node, &[], vec![replica(100.0)]).unwrap();
    recovered.handle_timeout(t0);
    store.apply(write_set(&mut recovered, &mut inputs)).await.unwrap();
    let later = t0.saturating_add(Duration::from_secs(10));
    recovered.heartbeat(later, &node, &[], vec![replica(160.0)]).unwrap();
    recovered.handle_timeout(later);
    store.apply(write_set(&mut recovered, &mut inputs)).await.unwrap();
    let charged = recovered.tenant_usage(&tenant, Timestamp::ZERO);
    assert!((charged.idle_joules - 160.0).abs() < 1e-9, "{charged:?}");
    drop(store);
    let store = open();
    let rows = store.idle_shares().await.unwrap();
    assert_eq!(rows.len(), 1, "one tenant, one hour: {rows:?}");
    assert_eq!((&rows[0].0, rows[0].2), (&tenant, 160.0));
    let mut restarted = ControlCore::recover(
        ControlConfig::default(),
        store
            .load()
            .await
            .unwrap()
            .batches
            .into_iter()
            .map(|l| l.batch)
            .collect(),
        later,
    );
    restarted.restore_idle(rows);
    let after = restarted.tenant_usage(&tenant, Timestamp::ZERO);
    assert_eq!(
        (after.idle_joules, after.idle_cost_usd),
        (charged.idle_joules, charged.idle_cost_usd)
    );
    assert_eq!(restarted.tenant_totals()[&tenant].idle_joules, charged.idle_joules);

    // The batch is deleted (its tenant asks): everything it held goes, its usage stays
    // in the tenant's history.
    let used = restarted.tenant_usage(&tenant, Timestamp::ZERO);
    let ControlReply::BatchDeleted(deleted) = restarted.handle(
        later,
        ControlInput::DeleteBatch {
            tenant: tenant.clone(),
            batch: id,
        },
    ) else {
        unreachable!("a deletion is answered as one")
    };
    let persisted = commit(&store, &mut restarted, &mut inputs).await;
    deleted.release(persisted).expect("committed").unwrap();
    drop(store);
    let store = open();
    assert!(
        store.load().await.unwrap().batches.is_empty(),
        "the batch record is gone"
    );
    for kind in [ResultKind::Output, ResultKind::Errors] {
        let page = store.results(id, kind, Cursor::default(), 100).await.unwrap();
        assert!(page.rows.is_empty(), "{kind:?} rows are gone");
    }
    // Its id is never given out again.
    let loaded = store.load().await.unwrap();
    assert!(loaded.next_batch > id.0, "{} after deleting {id}", loaded.next_batch);
    let mut after_delete = ControlCore::recover(ControlConfig::default(), vec![], later);
    after_delete.set_next_batch(loaded.next_batch);
    after_delete.restore_idle(store.idle_shares().await.unwrap());
    after_delete.restore_history(store.history().await.unwrap());
    assert_eq!(after_delete.tenant_usage(&tenant, Timestamp::ZERO), used);
    let again = parse_batch_input(line("z").as_bytes(), &model, &InputLimits::default(), false).unwrap();
    let ControlReply::Submitted(fresh) = after_delete.handle(
        later,
        ControlInput::Submit(NewBatch::from_parsed(tenant.clone(), model.clone(), &again)),
    ) else {
        unreachable!("a submission is answered as one")
    };
    let fresh = fresh.peek().clone().unwrap();
    assert!(fresh.meta.id > id, "a deleted batch's id is not reused");

    // An uploaded file: its content staged, then kept with its record; deleted, both go.
    let content = format!("{}\n", line("f"));
    let staged = store.stage().unwrap();
    std::fs::write(staged.path(), &content).unwrap();
    let ControlReply::FileAdded(added) = after_delete.handle(
        later,
        ControlInput::AddFile {
            tenant: tenant.clone(),
            filename: "q.jsonl".into(),
            bytes: content.len() as u64,
            purpose: "batch".into(),
        },
    ) else {
        unreachable!("an upload is answered as one")
    };
    let id_of_file = added.peek().as_ref().unwrap().id;
    let mut set = write_set(&mut after_delete, &mut inputs);
    set.files.push((id_of_file, staged));
    store.apply(set).await.unwrap();
    let meta = added
        .release(after_delete.advance(after_delete.handled()))
        .expect("committed")
        .unwrap();
    drop(store);
    let store = open();
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.files, std::slice::from_ref(&meta));
    assert!(loaded.next_file > meta.id.0);
    let path = store.file_path(meta.id).expect("the content is kept");
    assert_eq!(std::fs::read_to_string(path).unwrap(), content);
    let ControlReply::FileDeleted(gone) = after_delete.handle(
        later,
        ControlInput::DeleteFile {
            tenant: tenant.clone(),
            file: meta.id,
        },
    ) else {
        unreachable!("a file deletion is answered as one")
    };
    let persisted = commit(&store, &mut after_delete, &mut inputs).await;
    gone.release(persisted).expect("committed").unwrap();
    drop(store);
    let store = open();
    assert!(store.load().await.unwrap().files.is_empty());
    assert!(
        store.file_path(meta.id).is_none(),
        "the content is deleted with the record"
    );
}

/// A new batch of `lines` requests (tenant `tenant`) submitted to `core` at `t`, as the
/// WriteSet a shell commits, its input staged on `store`: for replicated backends' own
/// tests (replication, fencing) beyond this suite.
pub fn submit<S: Store>(
    store: &S,
    core: &mut ControlCore,
    tenant: &str,
    lines: usize,
    t: Timestamp,
) -> (tokenfab_core::BatchId, WriteSet) {
    let model = ModelId::from("llama-3.1-8b");
    let text: String = (0..lines).map(|i| line(&format!("{tenant}-{i}")) + "\n").collect();
    let parsed = parse_batch_input(text.as_bytes(), &model, &InputLimits::default(), false).unwrap();
    let staged = store.stage().unwrap();
    std::fs::write(staged.path(), &text).unwrap();
    let ControlReply::Submitted(submitted) = core.handle(
        t,
        ControlInput::Submit(NewBatch::from_parsed(TenantId::from(tenant), model, &parsed)),
    ) else {
        unreachable!("a submission is answered as one")
    };
    let id = submitted.peek().as_ref().expect("accepted").meta.id;
    let mut inputs = BTreeMap::from([(
        id.0,
        BatchInputs {
            batch: id,
            file: staged,
            requests: parsed.requests.into(),
            line_errors: parsed.line_errors,
        },
    )]);
    let set = write_set(core, &mut inputs);
    core.advance(core.handled());
    (id, set)
}
