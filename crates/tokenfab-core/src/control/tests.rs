use super::*;
use proptest::prelude::*;

const T0: Timestamp = Timestamp::from_micros(1_000_000);

fn tenant(name: &str) -> TenantId {
    TenantId::from(name)
}
fn node(name: &str) -> NodeId {
    NodeId::from(name)
}
fn model() -> ModelId {
    ModelId::from("llama-3.1-8b")
}

fn new_batch(who: &str, n: u32) -> NewBatch {
    NewBatch {
        tenant: tenant(who),
        model: model(),
        sla_class: None,
        completion_window: Some(Duration::from_secs(3600)),
        metadata: BTreeMap::new(),
        endpoint: crate::batch_input::Endpoint::ChatCompletions,
        input_bytes: 100,
        line_error_bytes: 0,
        input_file: None,
        lines: n + 1,
        invalid_lines: 1,
        requests: (0..n)
            .map(|i| RequestMeta {
                line: i + 1,
                prompt_tokens_estimate: 10,
                max_tokens: Some(16),
                body_bytes: 40,
            })
            .collect(),
        best_effort_if_late: false,
    }
}

fn registration(name: &str) -> NodeRegistration {
    NodeRegistration {
        node: node(name),
        super_node: SuperNodeId::from("sn0"),
        devices: vec![NodeDevice {
            index: 0,
            accelerator: AcceleratorId::from("h100-sxm"),
            domain: 0,
        }],
        replicas: vec![],
        usd_per_device_hour: None,
    }
}

fn ok(unit: WorkUnitId, req: RequestRef) -> ReportedResult {
    ReportedResult {
        unit,
        req,
        outcome: ReportedOutcome::Final(Outcome::Response {
            status_code: 200,
            body: b"{}".to_vec(),
            request_id: String::new(),
        }),
        usage: Usage {
            prompt_tokens: 3,
            completion_tokens: 5,
            joules: 36.0,
            device_seconds: 0.5,
            cost_usd: 99.0,
        },
        latency: Duration::ZERO,
    }
}

/// The next time of each kind of timer (the periodic refresh runs every second once
/// a node is known, so tests look at the timer they mean).
#[derive(Debug, Default, PartialEq)]
struct Timers {
    lease: Option<Timestamp>,
    deadline: Option<Timestamp>,
    wait: Option<Timestamp>,
    retention: Option<Timestamp>,
    refresh: Option<Timestamp>,
}

impl Timers {
    fn without_refresh(self) -> Timers {
        Timers { refresh: None, ..self }
    }
}

fn timers(core: &ControlCore) -> Timers {
    Timers {
        lease: core.units.first_expiring().map(|(t, _)| t),
        deadline: core.deadlines.first().map(|&(t, _)| t),
        wait: core.waits.next_end(),
        retention: core.retained.first().map(|&(t, _)| t),
        refresh: core.refresh_due(),
    }
}

fn drain(core: &mut ControlCore) -> Vec<Action> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

/// Applies persisted operations the way a store would.
fn replay(store: &mut BTreeMap<BatchId, RecoveredBatch>, actions: &[Action]) {
    for a in actions {
        match a {
            Action::Persist(DurableOp::CreateBatch { meta, life, requests }) => {
                store.insert(
                    meta.id,
                    RecoveredBatch {
                        meta: meta.clone(),
                        life: life.clone(),
                        totals: None,
                        requests: requests.clone(),
                        results: vec![],
                    },
                );
            }
            Action::Persist(DurableOp::UpdateBatch { id, life, totals }) => {
                let b = store.get_mut(id).unwrap();
                b.life = life.clone();
                if totals.is_some() {
                    b.totals = *totals;
                }
            }
            Action::Persist(DurableOp::RecordResults(rs)) => {
                for r in rs {
                    store
                        .get_mut(&r.req.batch)
                        .unwrap()
                        .results
                        .push(crate::durable::RecoveredResult {
                            index: r.req.index,
                            succeeded: r.outcome.is_success(),
                            usage: r.usage,
                            stored_bytes: r.outcome.stored_bytes(),
                        });
                }
            }
            Action::Persist(DurableOp::DeleteBatch { id }) => {
                store.remove(id);
            }
            Action::Persist(
                DurableOp::TenantIdle { .. }
                | DurableOp::DropInputs { .. }
                | DurableOp::TenantHistory { .. }
                | DurableOp::CreateFile { .. }
                | DurableOp::DeleteFile { .. },
            )
            | Action::BatchChanged(_)
            | Action::LeaseReady { .. } => {}
        }
    }
}

fn recorded(actions: &[Action]) -> Vec<RequestRef> {
    actions
        .iter()
        .flat_map(|a| match a {
            Action::Persist(DurableOp::RecordResults(rs)) => rs.iter().map(|r| r.req).collect(),
            _ => vec![],
        })
        .collect()
}

#[test]
fn a_batch_runs_to_completion_with_usage_and_cost() {
    let mut core = ControlCore::new(ControlConfig::default());
    let view = core.submit(T0, new_batch("acme", 3)).unwrap();
    assert_eq!(view.life.status(), BatchStatus::Queued);
    assert_eq!(
        view.counts,
        Counts {
            total: 4,
            completed: 0,
            failed: 0,
            invalid: 1
        }
    );
    let actions = drain(&mut core);
    assert!(matches!(&actions[0], Action::Persist(DurableOp::CreateBatch { requests, .. }) if requests.len() == 3));

    core.register(T0, registration("n1"));
    let grant = core.lease(T0, &node("n1"), &model(), 2).unwrap().unwrap();
    assert_eq!(grant.items.len(), 2);
    assert_eq!(grant.expires_at, T0.saturating_add(Duration::from_secs(10)));
    assert_eq!(
        core.batch(&tenant("acme"), view.meta.id).unwrap().life.status(),
        BatchStatus::InProgress
    );
    let rest = core.lease(T0, &node("n1"), &model(), 10).unwrap().unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(core.lease(T0, &node("n1"), &model(), 10).unwrap(), None, "nothing left");

    let results: Vec<_> = grant
        .items
        .iter()
        .chain(&rest.items)
        .map(|i| ok(if i.req.index < 2 { grant.unit } else { rest.unit }, i.req))
        .collect();
    let s = core.report(T0, &node("n1"), results).unwrap();
    assert_eq!(
        s,
        ReportSummary {
            recorded: 3,
            ..Default::default()
        }
    );
    let done = core.batch(&tenant("acme"), view.meta.id).unwrap();
    assert_eq!(done.life.status(), BatchStatus::Completed);
    assert_eq!(done.counts.completed, 3);
    assert_eq!(done.usage.completion_tokens, 15);
    // Cost is computed by the core from the H100 price, not taken from the agent:
    // 0.5 device-s at 2 $/h + 36 J at 0.10 $/kWh and PUE 1.2, per request.
    let per_request = 0.5 * 2.0 / 3600.0 + 36.0 * 1.2 * 0.10 / 3.6e6;
    assert!(
        (done.usage.cost_usd - 3.0 * per_request).abs() < 1e-12,
        "{}",
        done.usage.cost_usd
    );
    assert_eq!(
        timers(&core).without_refresh(),
        Timers::default(),
        "no lease and no live batch left"
    );
}

#[test]
fn duplicates_are_dropped_and_expired_leases_are_leased_again() {
    let mut core = ControlCore::new(ControlConfig::default());
    let id = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
    core.register(T0, registration("a"));
    core.register(T0, registration("b"));
    let first = core.lease(T0, &node("a"), &model(), 10).unwrap().unwrap();
    assert_eq!(timers(&core).lease, Some(first.expires_at));
    // Agent a goes silent; its lease expires and b gets the work.
    let later = first.expires_at;
    core.handle_timeout(later);
    assert_eq!(core.stats().leases_expired, 1);
    let second = core.lease(later, &node("b"), &model(), 10).unwrap().unwrap();
    assert_eq!(second.items.iter().map(|i| i.attempt).collect::<Vec<_>>(), [2, 2]);
    // a comes back late with one result: its lease is gone, so it is not recorded
    // (b holds the lease now); b reports both.
    let s1 = core
        .report(later, &node("a"), vec![ok(first.unit, first.items[0].req)])
        .unwrap();
    assert_eq!((s1.recorded, s1.not_leased), (0, 1));
    let s2 = core
        .report(
            later,
            &node("b"),
            second.items.iter().map(|i| ok(second.unit, i.req)).collect(),
        )
        .unwrap();
    assert_eq!((s2.recorded, s2.duplicates), (2, 0));
    let again = core
        .report(later, &node("b"), vec![ok(second.unit, second.items[1].req)])
        .unwrap();
    assert_eq!(again.duplicates, 1);
    assert_eq!(core.batch(&tenant("acme"), id).unwrap().counts.completed, 2);
    let reqs = recorded(&drain(&mut core));
    assert_eq!(reqs.len(), 2);
}

#[test]
fn waiting_leases_get_work_as_it_arrives_first_come_first_served() {
    let mut core = ControlCore::new(ControlConfig::default());
    core.register(T0, registration("a"));
    core.register(T0, registration("b"));
    let until = T0.saturating_add(Duration::from_secs(5));
    // Nothing queued: both wait, a first.
    for (n, ticket) in [("a", 1), ("b", 2)] {
        let answer = core.lease_or_wait(T0, &node(n), &model(), 3, until, ticket).unwrap();
        assert_eq!(answer, LeaseAnswer::Waiting);
    }
    assert_eq!(timers(&core).wait, Some(until));
    drain(&mut core);
    // Five requests arrive: a gets 3, b the other 2, at once.
    let t = T0.saturating_add(Duration::from_secs(1));
    core.submit(t, new_batch("acme", 5)).unwrap();
    let ready: Vec<(u64, NodeId, usize)> = drain(&mut core)
        .into_iter()
        .filter_map(|a| match a {
            Action::LeaseReady {
                ticket, node, grant, ..
            } => Some((ticket, node, grant.unwrap().items.len())),
            _ => None,
        })
        .collect();
    assert_eq!(ready, [(1, node("a"), 3), (2, node("b"), 2)]);
    // A wait with nothing arriving ends empty at its deadline, and not before.
    assert_eq!(
        core.lease_or_wait(t, &node("a"), &model(), 3, until, 3).unwrap(),
        LeaseAnswer::Waiting
    );
    core.handle_timeout(T0.saturating_add(Duration::from_millis(4999)));
    assert!(!drain(&mut core).iter().any(|a| matches!(a, Action::LeaseReady { .. })));
    core.handle_timeout(until);
    let ended: Vec<_> = drain(&mut core)
        .into_iter()
        .filter(|a| {
            matches!(
                a,
                Action::LeaseReady {
                    ticket: 3,
                    grant: None,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(ended.len(), 1);
    // No time to wait: an empty answer at once; unknown nodes are refused.
    assert_eq!(
        core.lease_or_wait(until, &node("a"), &model(), 3, until, 4).unwrap(),
        LeaseAnswer::Empty
    );
    assert!(core.lease_or_wait(until, &node("zz"), &model(), 3, until, 5).is_err());
}

#[test]
fn heartbeats_keep_leases_alive() {
    let mut core = ControlCore::new(ControlConfig::default());
    core.submit(T0, new_batch("acme", 1)).unwrap();
    core.register(T0, registration("a"));
    let g = core.lease(T0, &node("a"), &model(), 1).unwrap().unwrap();
    let t = T0.saturating_add(Duration::from_secs(8));
    let reply = core
        .heartbeat(t, &node("a"), &[g.unit, WorkUnitId(999)], vec![])
        .unwrap();
    assert_eq!(reply.unknown_units, [WorkUnitId(999)]);
    core.handle_timeout(T0.saturating_add(Duration::from_secs(12)));
    assert_eq!(core.stats().leases_expired, 0);
    assert_eq!(timers(&core).lease, Some(t.saturating_add(Duration::from_secs(10))));
    assert_eq!(
        core.heartbeat(t, &node("zz"), &[], vec![]).unwrap_err().to_string(),
        "node 'zz' is not registered (the control plane may have restarted); register again"
    );
}

#[test]
fn retryable_errors_requeue_until_attempts_run_out() {
    let mut core = ControlCore::new(ControlConfig {
        max_attempts: 2,
        ..ControlConfig::default()
    });
    let id = core.submit(T0, new_batch("acme", 1)).unwrap().meta.id;
    core.register(T0, registration("a"));
    let retry = |unit, req| ReportedResult {
        unit,
        req,
        outcome: ReportedOutcome::Retryable {
            code: "engine_unavailable".into(),
            message: "connection refused".into(),
        },
        usage: Usage::default(),
        latency: Duration::ZERO,
    };
    let g = core.lease(T0, &node("a"), &model(), 1).unwrap().unwrap();
    assert_eq!(
        core.report(T0, &node("a"), vec![retry(g.unit, g.items[0].req)])
            .unwrap()
            .requeued,
        1
    );
    let g = core.lease(T0, &node("a"), &model(), 1).unwrap().unwrap();
    assert_eq!(g.items[0].attempt, 2);
    assert_eq!(
        core.report(T0, &node("a"), vec![retry(g.unit, g.items[0].req)])
            .unwrap()
            .recorded,
        1
    );
    let v = core.batch(&tenant("acme"), id).unwrap();
    assert_eq!((v.life.status(), v.counts.failed), (BatchStatus::Completed, 1));
    let actions = drain(&mut core);
    let failure = actions.iter().find_map(|a| match a {
        Action::Persist(DurableOp::RecordResults(r)) => Some(r[0].outcome.clone()),
        _ => None,
    });
    assert_eq!(
        failure,
        Some(Outcome::Error {
            code: "retries_exhausted".into(),
            message: "no answer after 2 attempts; last error (engine_unavailable): connection refused".into()
        })
    );
}

#[test]
fn tenants_see_only_their_own_batches() {
    let mut core = ControlCore::new(ControlConfig::default());
    let id = core.submit(T0, new_batch("acme", 1)).unwrap().meta.id;
    assert_eq!(core.batch(&tenant("evil"), id), Err(BatchError::NotFound(id)));
    assert_eq!(
        core.cancel(T0, &tenant("evil"), id).unwrap_err().to_string(),
        "batch batch_00000001 not found for this tenant"
    );
    assert_eq!(core.list(&tenant("evil"), None, 10).0.len(), 0);
    assert_eq!(core.list(&tenant("acme"), None, 10).0.len(), 1);
    assert_eq!(
        core.batch(&tenant("acme"), id).unwrap().life.status(),
        BatchStatus::Queued,
        "untouched"
    );
}

#[test]
fn listing_pages_newest_first() {
    let mut core = ControlCore::new(ControlConfig::default());
    let ids: Vec<_> = (0..5)
        .map(|_| core.submit(T0, new_batch("acme", 1)).unwrap().meta.id)
        .collect();
    core.submit(T0, new_batch("other", 1)).unwrap();
    let (page, more) = core.list(&tenant("acme"), None, 2);
    assert_eq!(page.iter().map(|v| v.meta.id).collect::<Vec<_>>(), [ids[4], ids[3]]);
    assert!(more);
    let (page, more) = core.list(&tenant("acme"), Some(ids[3]), 10);
    assert_eq!(
        page.iter().map(|v| v.meta.id).collect::<Vec<_>>(),
        [ids[2], ids[1], ids[0]]
    );
    assert!(!more);
}

#[test]
fn submissions_are_checked() {
    let mut core = ControlCore::new(ControlConfig::default());
    let mut b = new_batch("acme", 1);
    b.model = ModelId::from("gpt-9");
    let e = core.submit(T0, b).unwrap_err().to_string();
    assert!(e.starts_with("unknown model 'gpt-9': this cluster serves "), "{e}");
    assert!(e.contains("llama-3.1-8b"), "{e}");
    let mut b = new_batch("acme", 1);
    b.sla_class = Some("gold".into());
    assert_eq!(
        core.submit(T0, b).unwrap_err().to_string(),
        "unknown SLA class 'gold': choose one of standard, best-effort"
    );
    let mut b = new_batch("acme", 1);
    b.completion_window = Some(Duration::from_secs(30 * 24 * 3600));
    assert!(
        core.submit(T0, b)
            .unwrap_err()
            .to_string()
            .contains("the most this cluster accepts is 604800 s")
    );
    assert!(drain(&mut core).is_empty(), "refused batches change nothing");
}

#[test]
fn cancel_ends_pending_work_and_waits_for_leased_work() {
    let mut core = ControlCore::new(ControlConfig::default());
    let id = core.submit(T0, new_batch("acme", 3)).unwrap().meta.id;
    core.register(T0, registration("a"));
    let g = core.lease(T0, &node("a"), &model(), 1).unwrap().unwrap();
    let v = core.cancel(T0, &tenant("acme"), id).unwrap();
    assert_eq!((v.life.status(), v.counts.failed), (BatchStatus::Cancelling, 2));
    assert_eq!(core.lease(T0, &node("a"), &model(), 10).unwrap(), None);
    core.report(T0, &node("a"), vec![ok(g.unit, g.items[0].req)]).unwrap();
    let v = core.batch(&tenant("acme"), id).unwrap();
    assert_eq!(
        (v.life.status(), v.counts.completed, v.counts.failed),
        (BatchStatus::Cancelled, 1, 2)
    );
    let e = core.cancel(T0, &tenant("acme"), id).unwrap_err();
    assert_eq!(
        e.to_string(),
        "batch_00000001 is cancelled; it cannot become cancelling"
    );
}

#[test]
fn the_deadline_expires_what_is_left() {
    let mut core = ControlCore::new(ControlConfig::default());
    let id = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
    core.register(T0, registration("a"));
    let g = core.lease(T0, &node("a"), &model(), 1).unwrap().unwrap();
    core.report(T0, &node("a"), vec![ok(g.unit, g.items[0].req)]).unwrap();
    let deadline = T0.saturating_add(Duration::from_secs(3600));
    assert_eq!(timers(&core).deadline, Some(deadline));
    core.handle_timeout(deadline);
    let v = core.batch(&tenant("acme"), id).unwrap();
    assert_eq!(
        (v.life.status(), v.counts.completed, v.counts.failed),
        (BatchStatus::Expired, 1, 1)
    );
}

#[test]
fn classes_are_served_in_priority_order_and_committed_work_by_slack() {
    let config = ControlConfig {
        sla_classes: vec![
            SlaClass::committed("premium"),
            SlaClass::committed("standard"),
            SlaClass::best_effort("best-effort"),
        ],
        admission: false,
        ..ControlConfig::default()
    };
    let mut core = ControlCore::new(config.clone());
    core.register(T0, gpu_node("a"));
    let submit = |core: &mut ControlCore, class: &str, n: u32, window_s: u64, tokens: u32| {
        let mut b = long_batch(n, window_s);
        b.sla_class = Some(class.into());
        for r in &mut b.requests {
            r.max_tokens = Some(tokens);
        }
        core.submit(T0, b).unwrap().meta.id
    };
    let be = submit(&mut core, "best-effort", 2, 600, 100);
    let standard = submit(&mut core, "standard", 2, 600, 100);
    let premium = submit(&mut core, "premium", 2, 7200, 100);
    let g = core.lease(T0, &node("a"), &model(), 6).unwrap().unwrap();
    let order: Vec<_> = g.items.iter().map(|i| i.req.batch).collect();
    assert_eq!(
        order,
        [premium, premium, standard, standard, be, be],
        "premium first even with a later deadline; best-effort last"
    );

    // Within a class: a big batch due a little later has less slack than a small one
    // due first, so it starts first; by deadline it would wait.
    for (order, expected_first) in [(QueueOrder::Slack, 1usize), (QueueOrder::Deadline, 0)] {
        let mut core = ControlCore::new(ControlConfig {
            queue_order: order,
            ..config.clone()
        });
        core.register(T0, gpu_node("a"));
        let small_soon = submit(&mut core, "standard", 10, 3600, 100);
        let big_later = submit(&mut core, "standard", 1000, 3700, 4000);
        let g = core.lease(T0, &node("a"), &model(), 1).unwrap().unwrap();
        assert_eq!(
            g.items[0].req.batch,
            [small_soon, big_later][expected_first],
            "{order:?}"
        );
    }
}

#[test]
fn class_lists_are_checked() {
    let ok = SlaClass::defaults();
    assert_eq!(SlaClass::check(&ok, "standard"), Ok(()));
    let e = SlaClass::check(&[SlaClass::best_effort("be"), SlaClass::committed("gold")], "gold").unwrap_err();
    assert!(e.contains("comes after a best-effort class"), "{e}");
    let e = SlaClass::check(&ok, "gold").unwrap_err();
    assert!(
        e.contains("'gold' is not one of the classes (standard, best-effort)"),
        "{e}"
    );
    let e = SlaClass::check(&[SlaClass::committed("a"), SlaClass::committed("a")], "a").unwrap_err();
    assert!(e.contains("listed twice"), "{e}");
}

#[test]
fn earliest_deadline_is_leased_first() {
    let mut core = ControlCore::new(ControlConfig::default());
    let mut late = new_batch("acme", 2);
    late.completion_window = Some(Duration::from_secs(7200));
    let late = core.submit(T0, late).unwrap().meta.id;
    let soon = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
    core.register(T0, registration("a"));
    let g = core.lease(T0, &node("a"), &model(), 3).unwrap().unwrap();
    let order: Vec<_> = g.items.iter().map(|i| i.req.batch).collect();
    assert_eq!(order, [soon, soon, late]);
}

fn gpu_node(name: &str) -> NodeRegistration {
    let mut r = registration(name);
    r.replicas.push(NodeReplica {
        replica: crate::ids::ReplicaId::from("r0"),
        model: model(),
        devices: vec![0],
        max_concurrency: 256,
        window: 64,
    });
    r
}

fn long_batch(n: u32, window_s: u64) -> NewBatch {
    let mut b = new_batch("acme", n);
    for r in &mut b.requests {
        r.max_tokens = Some(1000);
    }
    b.completion_window = Some(Duration::from_secs(window_s));
    b
}

/// Active placement: with little work one replica takes it and the others are parked;
/// a tight deadline activates them all at once; once that work is gone they are parked
/// again, but only after `park_after` (and once the arrival rate placement keeps up
/// with has fallen). The plan advises stopping the surplus replicas; advisory
/// placement only reports.
#[test]
fn placement_parks_surplus_replicas_and_wakes_them_for_a_tight_deadline() {
    let park_after = Duration::from_secs(60);
    let config = |mode| ControlConfig {
        admission: false,
        placement: mode,
        activation: crate::placement::ActivationConfig {
            park_after,
            ..crate::placement::ActivationConfig::default()
        },
        ..ControlConfig::default()
    };
    let at = |s: u64| T0.saturating_add(Duration::from_secs(s));
    let active = |core: &mut ControlCore, s: u64| -> (Vec<bool>, Vec<bool>) {
        // The agents heartbeat (a silent node would be forgotten).
        for n in ["a", "b", "c", "d"] {
            core.heartbeat(at(s), &node(n), &[], vec![]).unwrap();
        }
        core.handle_timeout(at(s));
        let view = core.replicas_view();
        (
            view.iter().map(|r| r.active).collect(),
            view.iter().map(|r| r.placement_active).collect(),
        )
    };
    let one = [true, false, false, false];
    for mode in [PlacementMode::Active, PlacementMode::Advisory] {
        let mut core = ControlCore::new(config(mode));
        for n in ["a", "b", "c", "d"] {
            core.register(T0, gpu_node(n));
        }
        // 100 requests x 1,000 tokens in 4 h: about 9 tokens/s, one replica's trickle.
        core.submit(T0, long_batch(100, 4 * 3600)).unwrap();
        let (on, advised) = active(&mut core, 2);
        assert_eq!(advised, one, "{mode:?}");
        match mode {
            PlacementMode::Active => assert_eq!(on, one, "active placement enforces"),
            _ => assert_eq!(on, [true; 4], "advisory placement changes nothing"),
        }
        let plan = core.tuning_doc().plan.expect("placement measured demand");
        assert_eq!(plan.replicas_now, 4);
        assert_eq!((plan.replicas_planned, plan.stop.len()), (1, 3), "{plan:?}");
        // A parked replica owes nothing.
        let reply = core.heartbeat(at(2), &node("b"), &[], vec![]).unwrap();
        let d = &reply.directives[0];
        assert_eq!(d.active, mode != PlacementMode::Active, "{d:?}");
        if !d.active {
            assert_eq!(d.owed_tokens_per_s, 0.0);
        }

        // 20,000 requests x 1,000 tokens due in 30 min need every replica, at once.
        let big = core.submit(at(10), long_batch(20_000, 1800)).unwrap().meta.id;
        assert_eq!(active(&mut core, 12), (vec![true; 4], vec![true; 4]), "{mode:?}");
        core.cancel(at(20), &tenant("acme"), big).unwrap();
        // The arrival rate of the last 15 minutes still asks for them ...
        assert_eq!(active(&mut core, 600).1, [true; 4], "{mode:?}");
        // ... then they are surplus, but parked only after park_after ...
        let quiet = 20 + 900 + 1;
        assert_eq!(active(&mut core, quiet).1, [true; 4], "{mode:?}");
        assert_eq!(
            active(&mut core, quiet + park_after.as_secs() - 5).1,
            [true; 4],
            "{mode:?}"
        );
        // ... and then they are.
        let (on, advised) = active(&mut core, quiet + park_after.as_secs() + 1);
        assert_eq!(advised, one, "{mode:?}");
        assert_eq!(on, if mode == PlacementMode::Active { one } else { [true; 4] });
    }
}

#[test]
fn admission_refuses_what_cannot_finish_in_time_and_names_the_earliest_completion() {
    let mut core = ControlCore::new(ControlConfig::default());
    core.register(T0, gpu_node("a"));
    // 10,000 requests x 1,000 output tokens on one H100 take far more than 10 minutes.
    let e = core.submit(T0, long_batch(10_000, 600)).unwrap_err();
    let SubmitError::Late { earliest, .. } = &e else {
        panic!("{e}")
    };
    assert!(*earliest > T0.saturating_add(Duration::from_secs(600)), "{e}");
    assert!(
        e.to_string().contains("earliest completion that can be promised is in"),
        "{e}"
    );
    // Asking for the time it named is admitted.
    let window = earliest.since(T0).as_secs() + 1;
    let first = core.submit(T0, long_batch(10_000, window)).unwrap();
    // The same again now has the first one ahead of it: refused, with a later time.
    let e2 = core.submit(T0, long_batch(10_000, window)).unwrap_err();
    let SubmitError::Late { earliest: later, .. } = e2 else {
        panic!("{e2}")
    };
    assert!(later > *earliest);
    // Accepted as best-effort when the tenant asks for it.
    let mut b = long_batch(10_000, window);
    b.best_effort_if_late = true;
    let be = core.submit(T0, b).unwrap();
    assert_eq!(be.meta.sla_class, "best-effort");
    // Small batches with room still get in, and best-effort work is never refused.
    core.submit(T0, long_batch(10, 3 * window)).unwrap();
    let mut b = long_batch(10_000, 60);
    b.sla_class = Some("best-effort".into());
    core.submit(T0, b).unwrap();
    // Without capacity information (no replica registered for the model) or with
    // admission off, nothing is refused.
    let mut open = ControlCore::new(ControlConfig::default());
    open.register(T0, registration("cpu"));
    open.submit(T0, long_batch(10_000, 60)).unwrap();
    let mut off = ControlCore::new(ControlConfig {
        admission: false,
        ..ControlConfig::default()
    });
    off.register(T0, gpu_node("a"));
    off.submit(T0, long_batch(10_000, 60)).unwrap();
    assert_eq!(first.meta.sla_class, "standard");
}

#[test]
fn committed_work_is_leased_before_best_effort_work() {
    let mut core = ControlCore::new(ControlConfig::default());
    let mut be = new_batch("acme", 2);
    be.sla_class = Some("best-effort".into());
    be.completion_window = Some(Duration::from_secs(60));
    let be = core.submit(T0, be).unwrap().meta.id;
    let committed = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
    core.register(T0, registration("a"));
    let g = core.lease(T0, &node("a"), &model(), 3).unwrap().unwrap();
    let order: Vec<_> = g.items.iter().map(|i| i.req.batch).collect();
    assert_eq!(
        order,
        [committed, committed, be],
        "best-effort waits despite its earlier deadline"
    );
}

#[test]
fn best_effort_capacity_is_shared_by_tenant_weight() {
    let mut core = ControlCore::new(ControlConfig {
        tenant_weights: [(tenant("big"), 2.0), (tenant("small"), 1.0)].into_iter().collect(),
        ..ControlConfig::default()
    });
    core.register(T0, registration("a"));
    let be = |who: &str| {
        let mut b = new_batch(who, 3000);
        b.sla_class = Some("best-effort".into());
        b
    };
    let big = core.submit(T0, be("big")).unwrap().meta.id;
    let small = core.submit(T0, be("small")).unwrap().meta.id;
    let mut count = BTreeMap::new();
    for _ in 0..30 {
        let g = core.lease(T0, &node("a"), &model(), 60).unwrap().unwrap();
        for i in g.items {
            *count.entry(i.req.batch).or_insert(0u32) += 1;
        }
    }
    let (b, s) = (count[&big], count[&small]);
    assert_eq!(b + s, 1800);
    assert!((f64::from(b) / f64::from(s) - 2.0).abs() < 0.05, "{b} : {s}");
    // A tenant arriving now starts level with the others, not with a head start.
    let late = core.submit(T0, be("late")).unwrap().meta.id;
    let g = core.lease(T0, &node("a"), &model(), 48).unwrap().unwrap();
    let late_n = g.items.iter().filter(|i| i.req.batch == late).count();
    assert!(late_n <= 24, "{late_n} of 48 went to the newcomer");
    // Committed work still comes first.
    let committed = core.submit(T0, new_batch("small", 5)).unwrap().meta.id;
    let g = core.lease(T0, &node("a"), &model(), 5).unwrap().unwrap();
    assert!(g.items.iter().all(|i| i.req.batch == committed));
}

#[test]
fn quotas_bound_unfinished_batches_and_tokens_per_hour() {
    let quota = Quota {
        max_active_batches: Some(2),
        output_tokens_per_hour: Some(1000),
        ..Quota::default()
    };
    let mut core = ControlCore::new(ControlConfig {
        tenant_quotas: [(tenant("acme"), quota)].into_iter().collect(),
        ..ControlConfig::default()
    });
    // Two batches of 20 x 16 tokens; a third is one too many.
    core.submit(T0, new_batch("acme", 20)).unwrap();
    let second = core.submit(T0, new_batch("acme", 20)).unwrap().meta.id;
    let e = core.submit(T0, new_batch("acme", 20)).unwrap_err();
    assert!(matches!(e, SubmitError::TooManyBatches { active: 2, .. }), "{e}");
    // Other tenants have no quota.
    core.submit(T0, new_batch("other", 20)).unwrap();
    // With one cancelled, 640 of 1000 tokens were asked for this hour: 400 more are too many.
    core.cancel(T0, &tenant("acme"), second).unwrap();
    let e = core.submit(T0, new_batch("acme", 25)).unwrap_err();
    let SubmitError::TokenQuota { used, asked, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!((*used, *asked), (640, 400));
    assert!(e.to_string().contains("retry in 1h"), "{e}");
    // A restart does not reset the hour's count.
    let mut store = BTreeMap::new();
    replay(&mut store, &drain(&mut core));
    let config = ControlConfig {
        tenant_quotas: [(tenant("acme"), quota)].into_iter().collect(),
        ..ControlConfig::default()
    };
    let mut recovered = ControlCore::recover(config, store.into_values().collect(), T0);
    let again = recovered.submit(T0, new_batch("acme", 25)).unwrap_err();
    assert!(matches!(again, SubmitError::TokenQuota { used: 640, .. }), "{again}");
    // An hour later the first submissions have aged out.
    let later = T0.saturating_add(Duration::from_secs(3600));
    core.submit(later, new_batch("acme", 25)).unwrap();
}

#[test]
fn the_sla_document_reports_what_was_delivered_over_the_window() {
    let mut core = ControlCore::new(ControlConfig::default());
    core.register(T0, gpu_node("a"));
    let id = core.submit(T0, new_batch("acme", 4)).unwrap().meta.id;
    let g = core.lease(T0, &node("a"), &model(), 4).unwrap().unwrap();
    let t = T0.saturating_add(Duration::from_secs(10));
    let results = g
        .items
        .iter()
        .map(|i| ReportedResult {
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: 16,
                joules: 8.0,
                device_seconds: 0.5,
                cost_usd: 0.0,
            },
            latency: Duration::from_millis(200 * u64::from(i.req.index + 1)),
            ..ok(g.unit, i.req)
        })
        .collect();
    core.report(t, &node("a"), results).unwrap();
    assert_eq!(
        core.batch(&tenant("acme"), id).unwrap().life.status(),
        BatchStatus::Completed
    );
    let doc = core.sla_document(t);
    assert_eq!(
        (doc.api_version.as_str(), doc.kind.as_str()),
        ("tokenfab.io/v1", "ThroughputSLA")
    );
    assert_eq!(doc.metadata.window_seconds, 3600.0);
    let p = &doc.pools[0];
    assert_eq!((p.model.as_str(), p.accelerator.as_str()), ("llama-3.1-8b", "h100-sxm"));
    assert_eq!((p.devices, p.replicas, p.requests, p.output_tokens), (1, 1, 4, 64));
    assert!((p.output_tokens_per_joule - 2.0).abs() < 1e-12, "64 tokens / 32 J");
    assert!(p.committed_output_tokens_per_second > 0.0);
    assert!(
        (p.request_latency_seconds.p50 - 0.4).abs() < 0.001,
        "{:?}",
        p.request_latency_seconds
    );
    let c = &doc.classes[0];
    assert_eq!(
        (c.class.as_str(), c.committed, c.batches, c.on_time),
        ("standard", true, 1, 1)
    );
    assert_eq!(c.completion_seconds.p99, 10.0);
    // The document is JSON with the field names of docs/throughput-sla.schema.json.
    let json = serde_json::to_value(&doc).unwrap();
    assert!(json["pools"][0]["measuredOutputTokensPerSecond"].is_number());
    assert!(json["classes"][0]["completionSeconds"]["p99"].is_number());
}

#[test]
fn tenant_totals_match_usage_by_batch_and_survive_recovery() {
    let mut core = ControlCore::new(ControlConfig::default());
    core.register(T0, registration("a"));
    let mut ops = Vec::new();
    for who in ["acme", "acme", "zeta"] {
        core.submit(T0, new_batch(who, 3)).unwrap();
    }
    let g = core.lease(T0, &node("a"), &model(), 5).unwrap().unwrap();
    let results = g.items.iter().map(|i| ok(g.unit, i.req)).collect();
    core.report(T0, &node("a"), results).unwrap();
    ops.extend(drain(&mut core));
    for who in ["acme", "zeta"] {
        assert_eq!(
            core.tenant_totals()[&tenant(who)],
            core.tenant_usage(&tenant(who), Timestamp::ZERO)
        );
    }
    assert_eq!(core.tenant_totals()[&tenant("acme")].requests_completed, 5);
    // After a restart the totals are rebuilt from what was made durable.
    let mut store = BTreeMap::new();
    replay(&mut store, &ops);
    let recovered = ControlCore::recover(ControlConfig::default(), store.into_values().collect(), T0);
    assert_eq!(recovered.tenant_totals(), core.tenant_totals());
}

#[test]
fn a_node_that_registers_again_gets_no_work_on_its_old_waiting_call() {
    let mut core = ControlCore::new(ControlConfig::default());
    core.register(T0, registration("a"));
    let until = T0.saturating_add(Duration::from_secs(5));
    assert_eq!(
        core.lease_or_wait(T0, &node("a"), &model(), 4, until, 1).unwrap(),
        LeaseAnswer::Waiting
    );
    core.register(T0, registration("a"));
    core.submit(T0, new_batch("acme", 4)).unwrap();
    let ready: Vec<_> = drain(&mut core)
        .into_iter()
        .filter_map(|a| match a {
            Action::LeaseReady { ticket, grant, .. } => Some((ticket, grant.is_some())),
            _ => None,
        })
        .collect();
    assert_eq!(
        ready,
        [(1, false)],
        "the old call ends empty and nothing more is sent to it"
    );
    assert_eq!(
        timers(&core).deadline,
        Some(T0.saturating_add(Duration::from_secs(3600)))
    );
}

#[test]
fn work_going_back_on_the_queue_is_refunded_to_its_tenant() {
    let mut core = ControlCore::new(ControlConfig::default());
    core.register(T0, registration("a"));
    let be = |who: &str, n| {
        let mut b = new_batch(who, n);
        b.sla_class = Some("best-effort".into());
        b
    };
    core.submit(T0, be("big", 100)).unwrap();
    core.submit(T0, be("small", 4)).unwrap();
    // A lease takes all of small's work and part of big's; big still waits.
    let g = core.lease(T0, &node("a"), &model(), 50).unwrap().unwrap();
    let vt_big = core.tenant_vt[&tenant("big")];
    assert_eq!(core.tenant_vt[&tenant("small")], 4.0 * 16.0);
    // small's requests come back (a release): its charge is refunded in full, and it is
    // not raised to the busy tenant's level as a newcomer would be.
    let small: Vec<RequestRef> = g
        .items
        .iter()
        .map(|i| i.req)
        .filter(|r| core.batches[&r.batch].meta.tenant == tenant("small"))
        .collect();
    core.release(T0, &node("a"), g.unit, &small).unwrap();
    assert_eq!(core.tenant_vt[&tenant("small")], 0.0);
    assert_eq!(core.tenant_vt[&tenant("big")], vt_big);
}

/// Issue 11: a node could record a result for a request that was never leased to it
/// (a forged result in another tenant's batch came back in that tenant's download).
#[test]
fn only_the_node_holding_the_lease_records_a_result() {
    let mut core = ControlCore::new(ControlConfig::default());
    let victim = core.submit(T0, new_batch("victim", 3)).unwrap().meta.id;
    core.register(T0, registration("honest"));
    core.register(T0, registration("evil"));
    let grant = core.lease(T0, &node("honest"), &model(), 1).unwrap().unwrap();
    drain(&mut core);
    let leased = grant.items[0].req;
    let queued = RequestRef {
        batch: victim,
        index: 2,
    };
    // A result for queued work nobody holds, for another node's lease (under its own
    // unit or the other's), and for a request that does not exist.
    let forged = vec![
        ok(WorkUnitId(999), queued),
        ok(grant.unit, leased),
        ok(WorkUnitId(999), leased),
        ok(
            grant.unit,
            RequestRef {
                batch: victim,
                index: 7,
            },
        ),
    ];
    let s = core.report(T0, &node("evil"), forged).unwrap();
    assert_eq!((s.recorded, s.not_leased, s.unknown), (0, 3, 1));
    assert!(recorded(&drain(&mut core)).is_empty(), "nothing reaches the store");
    assert_eq!(core.stats().results_not_leased, 3);
    // The honest node's result is recorded, once.
    let s = core.report(T0, &node("honest"), vec![ok(grant.unit, leased)]).unwrap();
    assert_eq!(s.recorded, 1);
    assert_eq!(recorded(&drain(&mut core)), [leased]);
    assert_eq!(core.batch(&tenant("victim"), victim).unwrap().counts.completed, 1);
}

/// Issue 11: all bodies of a lease went into one reply, which could exceed the gRPC
/// message limit.
#[test]
fn uploaded_files_belong_to_their_tenant_count_toward_its_limits_and_follow_its_retention() {
    let day = Duration::from_secs(24 * 3600);
    let mut core = ControlCore::new(ControlConfig {
        retention: Some(30 * day),
        tenant_retention: [(tenant("brief"), day)].into_iter().collect(),
        default_quota: Quota {
            max_stored_bytes: Some(1_000),
            ..Quota::default()
        },
        ..ControlConfig::default()
    });
    let f = core
        .add_file(T0, &tenant("acme"), "a.jsonl".into(), 600, "batch".into())
        .unwrap();
    assert_eq!(f.id.to_string(), "file-00000001");
    assert!(matches!(
        drain(&mut core)[..],
        [Action::Persist(DurableOp::CreateFile { ref meta })] if meta == &f
    ));
    assert_eq!(core.file(&tenant("evil"), f.id), Err(FileError::NotFound(f.id)));
    assert_eq!(core.list_files(&tenant("evil"), None, 10, false).0.len(), 0);
    assert_eq!(core.delete_file(&tenant("evil"), f.id), Err(FileError::NotFound(f.id)));
    // Files count toward the tenant's stored bytes.
    let e = core
        .add_file(T0, &tenant("acme"), "b.jsonl".into(), 500, "batch".into())
        .unwrap_err();
    assert!(
        e.to_string().starts_with("tenant 'acme' may keep 1000 B in the store"),
        "{e}"
    );
    // A batch may be made only from the tenant's own file.
    let mut b = new_batch("evil", 1);
    b.input_file = Some(f.id);
    assert_eq!(core.submit(T0, b).unwrap_err(), SubmitError::UnknownFile(f.id));
    let mut b = new_batch("acme", 1);
    b.input_file = Some(f.id);
    assert_eq!(core.submit(T0, b).unwrap().meta.input_file, Some(f.id));
    // Retention: per tenant, from the upload.
    let g = core
        .add_file(T0, &tenant("brief"), "c.jsonl".into(), 10, "batch".into())
        .unwrap();
    assert_eq!(core.file_expiry(&g), Some(T0.saturating_add(day)));
    assert_eq!(core.file_expiry(&f), Some(T0.saturating_add(30 * day)));
    drain(&mut core);
    core.handle_timeout(T0.saturating_add(day));
    assert!(drain(&mut core).contains(&Action::Persist(DurableOp::DeleteFile { id: g.id })));
    assert!(core.file(&tenant("brief"), g.id).is_err());
    assert!(core.file(&tenant("acme"), f.id).is_ok());
    // Ids are never reused, even after a restart.
    let mut again = ControlCore::new(ControlConfig::default());
    again.restore_files([f.clone()], 3);
    let h = again
        .add_file(T0, &tenant("acme"), "d".into(), 1, "batch".into())
        .unwrap();
    assert_eq!(h.id.0, 3);
}

#[test]
fn requests_whose_input_cannot_be_read_end_as_input_lost() {
    let mut core = ControlCore::new(ControlConfig::default());
    let id = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
    core.register(T0, registration("a"));
    let g = core.lease(T0, &node("a"), &model(), 2).unwrap().unwrap();
    drain(&mut core);
    core.inputs_lost(T0, g.unit, &[g.items[0].req]);
    let actions = drain(&mut core);
    let lost: Vec<&Outcome> = actions
        .iter()
        .flat_map(|a| match a {
            Action::Persist(DurableOp::RecordResults(rs)) => rs.iter().map(|r| &r.outcome).collect(),
            _ => vec![],
        })
        .collect();
    assert!(
        matches!(lost[..], [Outcome::Error { code, .. }] if code == "input_lost"),
        "{lost:?}"
    );
    // The other request is still leased and completes; the batch ends with both.
    core.report(T0, &node("a"), vec![ok(g.unit, g.items[1].req)]).unwrap();
    let b = core.batch(&tenant("acme"), id).unwrap();
    assert_eq!(
        (b.counts.completed, b.counts.failed, b.life.status()),
        (1, 1, BatchStatus::Completed)
    );
}

#[test]
fn leases_are_bounded_in_bytes_and_always_carry_one_request() {
    let mut core = ControlCore::new(ControlConfig {
        lease_max_bytes: 10_000,
        ..ControlConfig::default()
    });
    let mut big = new_batch("acme", 30);
    for r in &mut big.requests {
        r.body_bytes = 1_000_000;
    }
    let mut small = new_batch("acme", 30);
    for r in &mut small.requests {
        r.body_bytes = 2_000;
    }
    core.submit(T0, big).unwrap();
    core.register(T0, registration("a"));
    for _ in 0..3 {
        let g = core.lease(T0, &node("a"), &model(), 256).unwrap().unwrap();
        assert_eq!(g.items.len(), 1, "one request over the budget still goes alone");
    }
    let id = core
        .submit(T0.saturating_add(Duration::from_secs(1)), small)
        .unwrap()
        .meta
        .id;
    let mut leased = 0;
    while leased < 30 {
        let g = core.lease(T0, &node("a"), &model(), 256).unwrap().unwrap();
        if g.items[0].req.batch != id {
            continue;
        }
        let bytes = g.items.len() as u64 * (2_000 + LEASED_ITEM_OVERHEAD_BYTES);
        assert!(bytes <= 10_000, "{} items", g.items.len());
        assert_eq!(g.items.len().min(30 - leased), 3.min(30 - leased));
        leased += g.items.len();
    }
}

#[test]
fn oversized_metadata_is_refused_with_nothing_committed() {
    let mut core = ControlCore::new(ControlConfig::default());
    let cases: [(BTreeMap<String, String>, &str); 3] = [
        (
            (0..17).map(|i| (format!("k{i}"), "v".into())).collect(),
            "metadata: more than 16 key-value pairs; keep at most 16 (as in the OpenAI Batch API)",
        ),
        (
            [("k".repeat(65), "v".into())].into_iter().collect(),
            "is 65 characters, over the limit of 64",
        ),
        (
            [("note".into(), "x".repeat(100 << 20))].into_iter().collect(),
            "metadata: the value of 'note' is 104857600 characters, over the limit of 512",
        ),
    ];
    for (metadata, message) in cases {
        let mut b = new_batch("acme", 1);
        b.metadata = metadata;
        let e = core.submit(T0, b).unwrap_err();
        assert!(e.to_string().contains(message), "{e}");
        assert!(drain(&mut core).is_empty(), "nothing to persist");
    }
    assert_eq!(core.list(&tenant("acme"), None, 10).0.len(), 0);
    let mut b = new_batch("acme", 1);
    b.metadata = (0..16).map(|i| (format!("k{i}"), "é".repeat(512))).collect();
    assert!(core.submit(T0, b).is_ok(), "16 pairs of 512 characters are allowed");
}

#[test]
fn default_limits_bound_queued_requests_and_stored_bytes() {
    let mut core = ControlCore::new(ControlConfig {
        default_quota: Quota {
            max_queued_requests: Some(25),
            max_stored_bytes: Some(1_000),
            ..Quota::default()
        },
        // One tenant gets more room.
        tenant_quotas: [(
            tenant("big"),
            Quota {
                max_queued_requests: Some(100),
                ..Quota::default()
            },
        )]
        .into_iter()
        .collect(),
        ..ControlConfig::default()
    });
    core.submit(T0, new_batch("acme", 20)).unwrap();
    let e = core.submit(T0, new_batch("acme", 10)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "tenant 'acme' may have 25 requests waiting; it has 20 and this batch adds 10; submit it when more of them have finished"
    );
    core.submit(T0, new_batch("big", 60)).unwrap();
    // Stored bytes: inputs of unfinished batches (100 bytes each here).
    let mut other = ControlCore::new(ControlConfig {
        default_quota: Quota {
            max_stored_bytes: Some(250),
            ..Quota::default()
        },
        ..ControlConfig::default()
    });
    other.submit(T0, new_batch("acme", 1)).unwrap();
    other.submit(T0, new_batch("acme", 1)).unwrap();
    let e = other.submit(T0, new_batch("acme", 1)).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("tenant 'acme' may keep 250 B in the store; its batches hold 200 B and this one adds 100 B"),
        "{e}"
    );
    assert!(
        drain(&mut core)
            .iter()
            .all(|a| !matches!(a, Action::Persist(DurableOp::CreateBatch { meta, .. }) if meta.requests == 10))
    );
}

#[test]
fn finished_batches_are_deleted_when_their_retention_ends_and_their_usage_is_kept() {
    let retention = Duration::from_secs(3600);
    let mut core = ControlCore::new(ControlConfig {
        retention: Some(retention),
        ..ControlConfig::default()
    });
    core.register(T0, registration("a"));
    let id = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
    let g = core.lease(T0, &node("a"), &model(), 10).unwrap().unwrap();
    core.report(T0, &node("a"), g.items.iter().map(|i| ok(g.unit, i.req)).collect())
        .unwrap();
    let actions = drain(&mut core);
    assert!(
        actions.contains(&Action::Persist(DurableOp::DropInputs { id })),
        "a finished batch's inputs can go at once"
    );
    let before = core.tenant_usage(&tenant("acme"), Timestamp::ZERO);
    assert_eq!(timers(&core).retention, Some(T0.saturating_add(retention)));
    core.handle_timeout(T0.saturating_add(retention));
    let actions = drain(&mut core);
    assert!(actions.contains(&Action::Persist(DurableOp::DeleteBatch { id })));
    assert_eq!(core.batch(&tenant("acme"), id), Err(BatchError::NotFound(id)));
    assert_eq!(core.list(&tenant("acme"), None, 10).0.len(), 0);
    let after = core.tenant_usage(&tenant("acme"), Timestamp::ZERO);
    assert_eq!(after, before, "usage outlives the batch");
    // And survives a restart, through the history rows.
    let rows: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Persist(DurableOp::TenantHistory { tenant, day, history }) => {
                Some((tenant.clone(), *day, *history))
            }
            _ => None,
        })
        .collect();
    let mut again = ControlCore::recover(ControlConfig::default(), vec![], T0);
    again.restore_history(rows);
    assert_eq!(again.tenant_usage(&tenant("acme"), Timestamp::ZERO), after);
    assert_eq!(again.tenant_totals()[&tenant("acme")].batches, 1);

    // A tenant deletes a finished batch itself; an unfinished one must be cancelled first.
    let live = core.submit(T0, new_batch("acme", 1)).unwrap().meta.id;
    assert_eq!(
        core.delete_batch(&tenant("acme"), live).unwrap_err().to_string(),
        "batch_00000002 is queued: only a finished batch can be deleted; cancel it first"
    );
    assert_eq!(
        core.delete_batch(&tenant("evil"), live),
        Err(BatchError::NotFound(live))
    );
    core.cancel(T0, &tenant("acme"), live).unwrap();
    core.delete_batch(&tenant("acme"), live).unwrap();
    assert!(drain(&mut core).contains(&Action::Persist(DurableOp::DeleteBatch { id: live })));
}

#[test]
fn a_nearly_full_disk_refuses_new_batches_but_records_running_work() {
    let mut core = ControlCore::new(ControlConfig {
        min_free_bytes: 1 << 20,
        ..ControlConfig::default()
    });
    core.register(T0, registration("a"));
    let id = core.submit(T0, new_batch("acme", 2)).unwrap().meta.id;
    let g = core.lease(T0, &node("a"), &model(), 10).unwrap().unwrap();
    core.set_free_bytes(Some(1000));
    assert!(core.storage_low());
    let e = core.submit(T0, new_batch("acme", 1)).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("the control plane's disk is nearly full (1000 B free, 1.0 MiB are kept"),
        "{e}"
    );
    let s = core
        .report(T0, &node("a"), g.items.iter().map(|i| ok(g.unit, i.req)).collect())
        .unwrap();
    assert_eq!(s.recorded, 2);
    assert_eq!(
        core.batch(&tenant("acme"), id).unwrap().life.status(),
        BatchStatus::Completed
    );
    core.set_free_bytes(Some(2 << 20));
    assert!(
        core.submit(T0, new_batch("acme", 1)).is_ok(),
        "accepted again once space is freed"
    );
}

#[test]
fn recovery_loses_nothing_and_forgets_leases() {
    let mut core = ControlCore::new(ControlConfig::default());
    let id = core.submit(T0, new_batch("acme", 3)).unwrap().meta.id;
    core.register(T0, registration("a"));
    let g = core.lease(T0, &node("a"), &model(), 3).unwrap().unwrap();
    core.report(T0, &node("a"), vec![ok(g.unit, g.items[1].req)]).unwrap();
    // Replay the persisted operations the way a store would.
    let mut store: BTreeMap<BatchId, RecoveredBatch> = BTreeMap::new();
    replay(&mut store, &drain(&mut core));
    let mut core = ControlCore::recover(ControlConfig::default(), store.into_values().collect(), T0);
    let v = core.batch(&tenant("acme"), id).unwrap();
    assert_eq!((v.life.status(), v.counts.completed), (BatchStatus::InProgress, 1));
    core.register(T0, registration("a"));
    let g2 = core.lease(T0, &node("a"), &model(), 10).unwrap().unwrap();
    assert_eq!(g2.items.iter().map(|i| i.req.index).collect::<Vec<_>>(), [0, 2]);
    assert!(
        g2.unit != g.unit || g2.unit == WorkUnitId(1),
        "unit ids restart; results are keyed by request"
    );
    assert_eq!(
        core.submit(T0, new_batch("acme", 1)).unwrap().meta.id,
        BatchId(2),
        "ids continue"
    );
}

#[derive(Debug, Clone)]
enum Step {
    Lease { node: u8, max: u8 },
    ReportSome { node: u8, take: u8, retryable: bool },
    ReportStale { node: u8 },
    Heartbeat { node: u8 },
    Advance { secs: u8 },
    Reregister { node: u8 },
    Release { node: u8, take: u8 },
    Restart,
    Cancel,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..3, 1u8..20).prop_map(|(node, max)| Step::Lease { node, max }),
        (0u8..3, 1u8..20, prop::bool::weighted(0.2))
            .prop_map(|(node, take, retryable)| { Step::ReportSome { node, take, retryable } }),
        (0u8..3).prop_map(|node| Step::ReportStale { node }),
        (0u8..3).prop_map(|node| Step::Heartbeat { node }),
        (1u8..15).prop_map(|secs| Step::Advance { secs }),
        (0u8..3).prop_map(|node| Step::Reregister { node }),
        (0u8..3, 1u8..10).prop_map(|(node, take)| Step::Release { node, take }),
        Just(Step::Restart),
        Just(Step::Cancel),
    ]
}

#[test]
fn the_periodic_refresh_is_a_timer_not_a_side_effect_of_reads() {
    let mut core = ControlCore::new(ControlConfig::default());
    assert_eq!(core.poll_timeout(), None, "nothing to do without nodes");
    core.register(T0, gpu_node("a"));
    core.submit(T0, long_batch(100, 600)).unwrap();
    assert_eq!(core.required_rate(&model()), 0.0, "not computed yet");
    assert!(core.poll_timeout().is_some_and(|t| t <= T0), "due at once");
    // Reads compute nothing.
    let _ = (core.tuning_doc(), core.sla_document(T0), core.replicas_view());
    assert_eq!(core.required_rate(&model()), 0.0);
    core.handle_timeout(T0);
    let rate = core.required_rate(&model());
    assert!(rate > 0.0);
    assert_eq!(timers(&core).refresh, Some(T0.saturating_add(REQUIRED_EVERY)));
    assert!(core.poll_timeout() <= timers(&core).refresh);
}

/// One step of the read-invariance test.
#[derive(Debug, Clone)]
enum Tick {
    Submit { n: u8, window_s: u16 },
    LeaseAndReport { node: u8, max: u8 },
    Heartbeat { node: u8, window: u16 },
    Advance { ms: u16 },
    Read,
}

fn tick() -> impl Strategy<Value = Tick> {
    prop_oneof![
        (1u8..30, 60u16..3600).prop_map(|(n, window_s)| Tick::Submit { n, window_s }),
        (0u8..2, 1u8..40).prop_map(|(node, max)| Tick::LeaseAndReport { node, max }),
        (0u8..2, 1u16..512).prop_map(|(node, window)| Tick::Heartbeat { node, window }),
        (1u16..5000).prop_map(|ms| Tick::Advance { ms }),
        Just(Tick::Read),
    ]
}

/// Runs `ticks` on a fresh core (placement advisory, so the periodic refresh decides
/// things), doing every `Read` only if `reads`; everything it decided, in order.
fn decisions(ticks: &[Tick], reads: bool) -> Vec<String> {
    let mut core = ControlCore::new(ControlConfig {
        placement: PlacementMode::Advisory,
        ..ControlConfig::default()
    });
    let nodes = [node("a"), node("b")];
    for n in &nodes {
        core.register(T0, gpu_node(n.as_str()));
    }
    let mut now = T0;
    let mut out = Vec::new();
    for t in ticks {
        match t {
            Tick::Submit { n, window_s } => {
                let r = core.submit(now, long_batch(u32::from(*n), u64::from(*window_s)));
                out.push(format!("{:?}", r.map(|v| v.meta.id)));
            }
            Tick::LeaseAndReport { node, max } => {
                let nd = &nodes[*node as usize];
                match core.lease(now, nd, &model(), u32::from(*max)) {
                    Ok(Some(g)) => {
                        let results = g.items.iter().map(|i| ok(g.unit, i.req)).collect();
                        out.push(format!("{:?}", core.report(now, nd, results)));
                    }
                    Ok(None) => {}
                    // Silent long enough to be forgotten: the agent registers again.
                    Err(e) => {
                        out.push(format!("{e:?}"));
                        core.register(now, gpu_node(nd.as_str()));
                    }
                }
            }
            Tick::Heartbeat { node, window } => {
                let report = ReplicaReport {
                    replica: crate::ids::ReplicaId::from("r0"),
                    window: u32::from(*window),
                    ..ReplicaReport::default()
                };
                out.push(format!(
                    "{:?}",
                    core.heartbeat(now, &nodes[*node as usize], &[], vec![report])
                ));
            }
            Tick::Advance { ms } => {
                now = now.saturating_add(Duration::from_millis(u64::from(*ms)));
                core.handle_timeout(now);
            }
            Tick::Read if reads => {
                let _ = core.sla_document(now);
                let _ = core.tuning_doc();
                let _ = core.tenant_usage(&tenant("acme"), Timestamp::ZERO);
                let _ = core.list(&tenant("acme"), None, 10);
            }
            Tick::Read => {}
        }
        out.extend(drain(&mut core).iter().map(|a| format!("{a:?}")));
        out.push(format!("timeout {:?}", core.poll_timeout()));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Reads (the SLA document, the tuning view a metrics scrape or `GET /v1/tuning`
    /// asks for, usage, listings) at any moment change no decision: the same inputs
    /// give the same actions, replies and timers with and without them.
    #[test]
    fn reads_at_any_moment_change_no_decision(ticks in proptest::collection::vec(tick(), 1..80)) {
        prop_assert_eq!(decisions(&ticks, false), decisions(&ticks, true));
    }
}

/// What an agent does when the control plane no longer knows its node (it was silent long
/// enough to be forgotten): registers again, and gives up the work it held (its leases
/// expired before the node was forgotten).
fn rejoin(core: &mut ControlCore, now: Timestamp, nd: &NodeId, held: &mut Vec<LeaseGrant>) {
    held.clear();
    core.register(now, registration(nd.as_str()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Whatever agents do (lease, report, re-report stale results, die, come back, fall
    /// silent until their node is forgotten) and whenever a tenant cancels: every request
    /// ends with exactly one recorded result, and the batch's counts agree with what was
    /// persisted.
    #[test]
    fn every_request_gets_exactly_one_result(steps in proptest::collection::vec(step(), 1..120), n in 1u32..60) {
        let mut core = ControlCore::new(ControlConfig::default());
        let id = core.submit(T0, new_batch("acme", n)).unwrap().meta.id;
        let nodes = ["a", "b", "c"].map(node);
        for nd in &nodes { core.register(T0, registration(nd.as_str())); }
        let mut now = T0;
        let mut held: Vec<Vec<LeaseGrant>> = vec![vec![]; 3];
        let mut old: Vec<(WorkUnitId, RequestRef)> = vec![];
        let mut persisted: Vec<RequestRef> = vec![];
        let mut store: BTreeMap<BatchId, RecoveredBatch> = BTreeMap::new();
        let mut cancelled = false;
        let run = |core: &mut ControlCore, persisted: &mut Vec<RequestRef>, store: &mut BTreeMap<BatchId, RecoveredBatch>| {
            let actions = drain(core);
            replay(store, &actions);
            persisted.extend(recorded(&actions));
        };
        run(&mut core, &mut persisted, &mut store);
        for s in steps.into_iter().chain((0..40).map(|_| Step::Advance { secs: 15 })) {
            match s {
                Step::Lease { node, max } => {
                    match core.lease(now, &nodes[node as usize], &model(), u32::from(max)) {
                        Ok(Some(g)) => held[node as usize].push(g),
                        Ok(None) => {}
                        Err(_) => rejoin(&mut core, now, &nodes[node as usize], &mut held[node as usize]),
                    }
                }
                Step::ReportSome { node, take, retryable } => {
                    let mut results = vec![];
                    for g in held[node as usize].iter_mut() {
                        while let Some(item) = g.items.pop() {
                            old.push((g.unit, item.req));
                            results.push(if retryable {
                                ReportedResult { outcome: ReportedOutcome::Retryable { code: "x".into(), message: "y".into() }, ..ok(g.unit, item.req) }
                            } else { ok(g.unit, item.req) });
                            if results.len() >= take as usize { break; }
                        }
                    }
                    if core.report(now, &nodes[node as usize], results.clone()).is_err() {
                        // Results are kept and sent again once registered.
                        rejoin(&mut core, now, &nodes[node as usize], &mut held[node as usize]);
                        core.report(now, &nodes[node as usize], results).unwrap();
                    }
                }
                Step::ReportStale { node } => {
                    let results: Vec<ReportedResult> = old.iter().rev().take(5).map(|&(u, r)| ok(u, r)).collect();
                    if core.report(now, &nodes[node as usize], results.clone()).is_err() {
                        rejoin(&mut core, now, &nodes[node as usize], &mut held[node as usize]);
                        core.report(now, &nodes[node as usize], results).unwrap();
                    }
                }
                Step::Heartbeat { node } => {
                    let units: Vec<_> = held[node as usize].iter().map(|g| g.unit).collect();
                    if core.heartbeat(now, &nodes[node as usize], &units, vec![]).is_err() {
                        rejoin(&mut core, now, &nodes[node as usize], &mut held[node as usize]);
                    }
                }
                Step::Advance { secs } => {
                    now = now.saturating_add(Duration::from_secs(u64::from(secs)));
                    // Agents that still hold work heartbeat only sometimes; at the end
                    // everyone reports what it holds so the batch can finish.
                    for (i, nd) in nodes.iter().enumerate() {
                        let results: Vec<_> = held[i].iter_mut().flat_map(|g| { let u = g.unit; g.items.drain(..).map(move |it| ok(u, it.req)) }).collect();
                        if secs == 15 && !results.is_empty() && core.report(now, nd, results.clone()).is_err() {
                            rejoin(&mut core, now, nd, &mut held[i]);
                            core.report(now, nd, results).unwrap();
                        }
                    }
                    core.handle_timeout(now);
                    if secs == 15 {
                        for (i, nd) in nodes.iter().enumerate() {
                            let grant = match core.lease(now, nd, &model(), 100) {
                                Ok(g) => g,
                                Err(_) => {
                                    rejoin(&mut core, now, nd, &mut held[i]);
                                    core.lease(now, nd, &model(), 100).unwrap()
                                }
                            };
                            if let Some(g) = grant {
                                let results = g.items.iter().map(|it| ok(g.unit, it.req)).collect();
                                core.report(now, nd, results).unwrap();
                            }
                        }
                    }
                }
                Step::Reregister { node } => {
                    held[node as usize].clear();
                    core.register(now, registration(nodes[node as usize].as_str()));
                }
                Step::Cancel => {
                    if !cancelled { cancelled = core.cancel(now, &tenant("acme"), id).is_ok(); }
                }
                Step::Release { node, take } => {
                    // The agent gives back queued items of its oldest unit.
                    if let Some(g) = held[node as usize].first_mut() {
                        let n = (take as usize).min(g.items.len());
                        let items: Vec<RequestRef> = g.items.drain(..n).map(|i| i.req).collect();
                        if core.release(now, &nodes[node as usize], g.unit, &items).is_err() {
                            rejoin(&mut core, now, &nodes[node as usize], &mut held[node as usize]);
                        }
                    }
                }
                Step::Restart => {
                    // The control plane dies and comes back from what it persisted;
                    // agents keep what they held and register again.
                    core = ControlCore::recover(ControlConfig::default(), store.values().cloned().collect(), now);
                    for nd in &nodes { core.register(now, registration(nd.as_str())); }
                }
            }
            run(&mut core, &mut persisted, &mut store);
        }
        let v = core.batch(&tenant("acme"), id).unwrap();
        prop_assert!(v.life.status().is_terminal(), "{:?}", v.life.status());
        let mut sorted = persisted.clone();
        sorted.sort();
        sorted.dedup();
        prop_assert_eq!(sorted.len(), persisted.len(), "a request was recorded twice");
        prop_assert_eq!(persisted.len() as u32, n, "every request has a result");
        prop_assert_eq!(v.counts.completed + v.counts.failed, n);
    }
}

#[test]
fn a_durable_answer_opens_only_once_its_writes_are_committed() {
    use crate::protocol::{ControlInput, ControlReply};
    let t = Timestamp::from_micros(1_000_000);
    let mut core = ControlCore::new(ControlConfig::default());
    let submit = |n: u32| ControlInput::Submit(new_batch("acme", n));
    let ControlReply::Submitted(first) = core.handle(t, submit(1)) else {
        panic!("a submission is answered as one")
    };
    // The shell takes the first input's writes and commits them...
    let writes: Vec<Action> = std::iter::from_fn(|| core.poll_action()).collect();
    assert!(
        writes
            .iter()
            .any(|a| matches!(a, Action::Persist(DurableOp::CreateBatch { .. })))
    );
    let after_first = core.handled();
    // ...while a second input arrives, whose writes are not committed yet.
    let ControlReply::Submitted(second) = core.handle(t, submit(2)) else {
        panic!("a submission is answered as one")
    };
    assert!(second.needs() > first.needs());
    let persisted = core.advance(after_first);
    let second = second
        .release(persisted)
        .expect_err("an answer whose writes are not committed stays closed");
    let view = first.release(persisted).expect("its writes are committed").unwrap();
    assert_eq!(view.meta.requests, 1);
    let view = second
        .release(core.advance(core.handled()))
        .expect("now committed")
        .unwrap();
    assert_eq!(view.meta.requests, 2);
    // A mark never goes back.
    assert_eq!(core.advance(after_first).through(), core.handled());
}

/// What admission answered before it kept a book: every unfinished committed batch's
/// service time recomputed at the capacity now, and the full check.
fn admission_from_scratch(core: &ControlCore, now: Timestamp, b: &NewBatch) -> bool {
    let (output, prompt) = token_totals(&b.requests);
    let Some(service_s) = core.service_s(&b.model, b.requests.len(), output, prompt) else {
        return true;
    };
    let committed: Vec<crate::admission::Work> = core
        .deadlines
        .iter()
        .map(|(_, id)| &core.batches[id])
        .filter(|x| x.meta.model == b.model && x.committed)
        .filter_map(|x| {
            let total = x.meta.requests.max(1);
            let s = core.service_s(&x.meta.model, total as usize, x.output_tokens, x.prompt_tokens)?;
            Some(crate::admission::Work {
                rank: x.rank,
                deadline: x.meta.deadline,
                service_s: s * f64::from(total - x.done()) / f64::from(total),
            })
        })
        .collect();
    let new = crate::admission::Work {
        rank: 0,
        deadline: now.saturating_add(b.completion_window.unwrap()),
        service_s,
    };
    crate::admission::check(now, &committed, new, core.config.admission_headroom) == crate::admission::Verdict::Admit
}

/// Admission keeps each admitted batch's service time between capacity changes and skips
/// the full check when everything fits before the earliest deadline; its answers are the
/// full check's, through submissions, finished work, window moves and recalibration.
#[test]
fn admissions_bookkeeping_answers_as_the_full_check_does() {
    let mut core = ControlCore::new(ControlConfig::default());
    core.register(T0, gpu_node("a"));
    let mut now = T0;
    let mut rng = 7u64;
    let mut next = |m: u64| {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (rng >> 33) % m
    };
    let (mut admitted, mut refused) = (0, 0);
    for step in 0..400u32 {
        now = now.saturating_add(Duration::from_secs(next(20)));
        // Its agent heartbeats (a silent node would be forgotten).
        core.heartbeat(now, &node("a"), &[], vec![]).unwrap();
        core.handle_timeout(now);
        // Between refreshes: a capacity change must reach the next answer at once.
        if step % 10 == 5 {
            let calibration = crate::recal::Correction {
                time: 1.0 + next(100) as f64 / 100.0,
                ..crate::recal::Correction::prior(0.05)
            };
            let report = ReplicaReport {
                replica: crate::ids::ReplicaId::from("r0"),
                window: [16, 64, 256][next(3) as usize],
                calibration: Some(calibration),
                ..ReplicaReport::default()
            };
            core.heartbeat(now, &node("a"), &[], vec![report]).unwrap();
        }
        let b = long_batch(1 + next(400) as u32, 60 + next(3000));
        let expected = admission_from_scratch(&core, now, &b);
        let got = core.submit(now, b);
        assert_eq!(got.is_ok(), expected, "step {step}: {got:?}");
        if got.is_ok() {
            admitted += 1;
        } else {
            refused += 1;
        }
        // Work gets done.
        if step % 7 == 0
            && let Ok(Some(g)) = core.lease(now, &node("a"), &model(), 1 + next(200) as u32)
        {
            let results = g.items.iter().map(|i| ok(g.unit, i.req)).collect();
            core.report(now, &node("a"), results).unwrap();
        }
    }
    assert!(admitted > 20 && refused > 20, "{admitted} admitted, {refused} refused");
}

/// Admission counts on the corrected belief: a replica measured twice as slow as believed
/// has half the capacity to promise.
#[test]
fn admission_counts_on_the_recalibrated_capacity() {
    let mut core = ControlCore::new(ControlConfig::default());
    core.register(T0, gpu_node("a"));
    let e = core.submit(T0, long_batch(10_000, 600)).unwrap_err();
    let SubmitError::Late { earliest, .. } = e else {
        panic!("{e}")
    };
    let promised = earliest.since(T0).as_secs_f64();
    let mut slow = ControlCore::new(ControlConfig::default());
    slow.register(T0, gpu_node("a"));
    let report = ReplicaReport {
        replica: crate::ids::ReplicaId::from("r0"),
        window: 64,
        calibration: Some(crate::recal::Correction {
            time: 2.0,
            ..crate::recal::Correction::prior(0.0)
        }),
        ..ReplicaReport::default()
    };
    slow.heartbeat(T0, &node("a"), &[], vec![report]).unwrap();
    let e = slow.submit(T0, long_batch(10_000, 600)).unwrap_err();
    let SubmitError::Late { earliest, .. } = e else {
        panic!("{e}")
    };
    // The prior counts 10% slower than believed until the replica has measured itself.
    let ratio = earliest.since(T0).as_secs_f64() / promised;
    assert!((ratio - 2.0 / 1.1).abs() < 0.02, "{ratio}");
}

/// A node whose agent falls silent (stopped, drained, lost) is forgotten after three lease
/// lifetimes: its capacity no longer admits work; heartbeating again asks it to register,
/// and once it has, its capacity counts again.
#[test]
fn a_silent_node_is_forgotten_and_its_capacity_no_longer_admits_work() {
    let mut core = ControlCore::new(ControlConfig::default());
    core.register(T0, gpu_node("a"));
    core.register(T0, gpu_node("b"));
    let at = |s: u64| T0.saturating_add(Duration::from_secs(s));
    // Two H100 replicas: a batch that needs both to finish in time is admitted.
    let two = core.capacity(&model(), 500, 1000).unwrap();
    // "b" keeps heartbeating; "a" stops.
    for s in (5..=40).step_by(5) {
        core.heartbeat(at(s), &node("b"), &[], vec![]).unwrap();
        core.handle_timeout(at(s));
    }
    assert_eq!(core.nodes().count(), 1, "a is forgotten after 30 s of silence");
    assert_eq!(core.stats().nodes_forgotten, 1);
    let one = core.capacity(&model(), 500, 1000).unwrap();
    assert!((one - two / 2.0).abs() < 1e-6 * two, "{one} vs {two}");
    assert!(core.tuning_doc().replicas.iter().all(|r| r.node == "b"));
    // Its agent comes back: told to register, then counted again.
    assert!(core.heartbeat(at(41), &node("a"), &[], vec![]).is_err());
    core.register(at(41), gpu_node("a"));
    core.handle_timeout(at(45));
    let back = core.capacity(&model(), 500, 1000).unwrap();
    assert!((back - two).abs() < 1e-6 * two, "{back} vs {two}");
    // Heartbeating within the silence keeps a node: nothing else was forgotten.
    assert_eq!(core.stats().nodes_forgotten, 1);
}

/// A replica whose agent reports its engine unreachable does not count as capacity until
/// it is reported reachable again.
#[test]
fn an_unreachable_engine_is_not_capacity() {
    let mut core = ControlCore::new(ControlConfig::default());
    core.register(T0, gpu_node("a"));
    core.register(T0, gpu_node("b"));
    let two = core.capacity(&model(), 500, 1000).unwrap();
    let report = |unreachable| ReplicaReport {
        replica: crate::ids::ReplicaId::from("r0"),
        unreachable,
        ..ReplicaReport::default()
    };
    core.heartbeat(T0, &node("b"), &[], vec![report(true)]).unwrap();
    let one = core.capacity(&model(), 500, 1000).unwrap();
    assert!((one - two / 2.0).abs() < 1e-6 * two, "{one} vs {two}");
    core.heartbeat(T0, &node("b"), &[], vec![report(false)]).unwrap();
    let back = core.capacity(&model(), 500, 1000).unwrap();
    assert!((back - two).abs() < 1e-6 * two, "{back} vs {two}");
}
