use super::energy::attribute;
use super::*;

const T0: Timestamp = Timestamp::from_micros(1_000_000);

fn spec(id: &str, window: u32) -> ReplicaSpec {
    ReplicaSpec {
        id: ReplicaId::from(id),
        model: ModelId::from("m"),
        devices: 2,
        window,
        max_concurrency: 64,
        power: None,
        accelerator: None,
    }
}

fn drain(core: &mut AgentCore) -> Vec<AgentAction> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

/// The dispatches among the core's actions: (replica, unit, item).
fn dispatches(core: &mut AgentCore) -> Vec<(usize, WorkUnitId, LeasedItem)> {
    drain(core)
        .into_iter()
        .filter_map(|a| match a {
            AgentAction::Dispatch { replica, unit, item } => Some((replica, unit, item)),
            _ => None,
        })
        .collect()
}

/// Requests given back among `actions`.
fn released(actions: &[AgentAction]) -> usize {
    actions
        .iter()
        .map(|a| match a {
            AgentAction::Release { items, .. } => items.len(),
            _ => 0,
        })
        .sum()
}

fn grant(unit: u64, n: u32) -> LeaseGrant {
    LeaseGrant {
        unit: WorkUnitId(unit),
        expires_at: T0,
        items: (0..n)
            .map(|i| LeasedItem {
                req: RequestRef {
                    batch: crate::BatchId(1),
                    index: i,
                },
                attempt: 1,
                prefix: None,
            })
            .collect(),
    }
}

fn answered(tokens: u64) -> EngineReply {
    EngineReply::Answered {
        status_code: 200,
        body: b"{}".to_vec(),
        request_id: "x".into(),
        prompt_tokens: tokens,
        completion_tokens: tokens,
    }
}

fn started(window: u32) -> AgentCore {
    let mut core = AgentCore::new(AgentConfig::default(), vec![spec("r0", window), spec("r1", window)], T0);
    assert_eq!(drain(&mut core), [AgentAction::Register, AgentAction::SampleDevices]);
    core.registered(T0, Duration::from_secs(1));
    core
}

#[test]
fn leases_fill_the_windows_and_dispatch_spreads_load() {
    let mut core = started(4);
    // Free slots 8 + prefetch 8.
    assert_eq!(
        drain(&mut core),
        [AgentAction::Lease {
            model: ModelId::from("m"),
            max: 16,
            wait: AgentConfig::default().lease_wait,
        }]
    );
    core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(1, 16))));
    let actions = drain(&mut core);
    let per_replica = |i| {
        actions
            .iter()
            .filter(|a| matches!(a, AgentAction::Dispatch { replica, .. } if *replica == i))
            .count()
    };
    assert_eq!((per_replica(0), per_replica(1)), (4, 4), "{actions:?}");
    assert!(
        !actions.iter().any(|a| matches!(a, AgentAction::Lease { .. })),
        "8 queued: enough"
    );
    assert_eq!(core.held_units(), [WorkUnitId(1)]);
}

/// Requests sharing a prefix stay with the replica that took the first of them; the
/// other replica takes the next request that is not tied elsewhere, or the oldest when
/// all are. Plain least-loaded routing spreads them.
#[test]
fn requests_sharing_a_prefix_stay_on_one_replica() {
    let prefixes = [Some(1), Some(1), Some(1), Some(2), None];
    let routed = |routing: Routing| -> Vec<(usize, Option<u64>)> {
        let config = AgentConfig {
            routing,
            ..AgentConfig::default()
        };
        let mut core = AgentCore::new(config, vec![spec("r0", 4), spec("r1", 4)], T0);
        drain(&mut core);
        core.registered(T0, Duration::from_secs(1));
        drain(&mut core);
        let mut g = grant(1, prefixes.len() as u32);
        for (item, p) in g.items.iter_mut().zip(prefixes) {
            item.prefix = p;
        }
        core.lease_done(T0, &ModelId::from("m"), Ok(Some(g)));
        drain(&mut core)
            .into_iter()
            .filter_map(|a| match a {
                AgentAction::Dispatch { replica, item, .. } => Some((replica, item.prefix)),
                _ => None,
            })
            .collect()
    };
    // Prefix 1 goes to r0 with its first request; r1 skips it for prefix 2, then for
    // the request without a prefix.
    assert_eq!(
        routed(Routing::PrefixAffinity),
        [(0, Some(1)), (1, Some(2)), (0, Some(1)), (1, None), (0, Some(1))]
    );
    assert_eq!(
        routed(Routing::LeastLoaded),
        [(0, Some(1)), (1, Some(1)), (0, Some(1)), (1, Some(2)), (0, None)]
    );
    // All tied to a busy replica: the idle one takes the oldest rather than idle.
    let config = AgentConfig {
        routing: Routing::PrefixAffinity,
        ..AgentConfig::default()
    };
    let mut core = AgentCore::new(config, vec![spec("r0", 1), spec("r1", 1)], T0);
    drain(&mut core);
    core.registered(T0, Duration::from_secs(1));
    drain(&mut core);
    let mut g = grant(1, 2);
    for item in &mut g.items {
        item.prefix = Some(5);
    }
    core.lease_done(T0, &ModelId::from("m"), Ok(Some(g)));
    let replicas: Vec<usize> = drain(&mut core)
        .into_iter()
        .filter_map(|a| match a {
            AgentAction::Dispatch { replica, .. } => Some(replica),
            _ => None,
        })
        .collect();
    assert_eq!(replicas, [0, 1]);
}

#[test]
fn results_wait_for_their_energy_share_then_are_reported_and_acked() {
    let mut core = started(4);
    drain(&mut core);
    core.device_sample(
        T0,
        vec![
            Some(EnergyReading {
                energy_j: 100.0,
                clock_s: 10.0,
                tokens: None,
            }),
            None,
        ],
    );
    core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(1, 2))));
    let dispatched = dispatches(&mut core);
    assert_eq!(dispatched.len(), 2, "one on each replica");
    let t1 = T0.saturating_add(Duration::from_millis(50));
    for &(replica, unit, item) in &dispatched {
        core.engine_done(
            t1,
            replica,
            unit,
            item.req,
            answered(if replica == 0 { 30 } else { 10 }),
        );
    }
    assert!(
        drain(&mut core).iter().all(|a| !matches!(a, AgentAction::Report(_))),
        "no report before the energy share"
    );
    let t2 = T0.saturating_add(Duration::from_millis(100));
    core.handle_timeout(t2);
    assert!(drain(&mut core).contains(&AgentAction::SampleDevices));
    core.device_sample(
        t2,
        vec![
            Some(EnergyReading {
                energy_j: 160.0,
                clock_s: 10.5,
                tokens: None,
            }),
            None,
        ],
    );
    core.handle_timeout(t2.saturating_add(Duration::from_millis(20)));
    let report = drain(&mut core)
        .into_iter()
        .find_map(|a| match a {
            AgentAction::Report(r) => Some(r),
            _ => None,
        })
        .expect("report due");
    assert_eq!(report.len(), 2);
    let on_r0 = report.iter().find(|r| r.usage.prompt_tokens == 30).unwrap();
    assert_eq!(
        on_r0.latency,
        Duration::from_millis(50),
        "dispatched at T0, answered 50 ms later"
    );
    assert_eq!(on_r0.usage.joules, 60.0, "the whole 60 J delta of replica 0");
    assert_eq!(on_r0.usage.device_seconds, 1.0, "0.5 s x 2 devices");
    let on_r1 = report.iter().find(|r| r.usage.prompt_tokens == 10).unwrap();
    assert_eq!(on_r1.usage.joules, 0.0, "replica 1 has no energy counter");
    assert_eq!(core.held_units(), [WorkUnitId(1)], "held until acknowledged");
    core.report_acked(t2);
    assert!(core.held_units().is_empty());
}

#[test]
fn energy_is_shared_by_tokens_and_idle_energy_is_not_charged() {
    let mut r = Replica::new(spec("r", 4), 0, &AgentConfig::default(), T0);
    r.in_flight = 1;
    r.last_reading = Some(EnergyReading {
        energy_j: 0.0,
        clock_s: 0.0,
        tokens: None,
    });
    let mut ready = VecDeque::new();
    let result = |tokens| ReportedResult {
        unit: WorkUnitId(1),
        req: RequestRef::default(),
        outcome: ReportedOutcome::Retryable {
            code: String::new(),
            message: String::new(),
        },
        usage: Usage {
            prompt_tokens: tokens,
            ..Usage::default()
        },
        latency: Duration::ZERO,
    };
    // Interval 1: work running, nothing finished: carried.
    attribute(
        &mut r,
        Some(EnergyReading {
            energy_j: 40.0,
            clock_s: 1.0,
            tokens: None,
        }),
        T0,
        &mut ready,
    );
    assert!(ready.is_empty());
    // Interval 2: two finish, 1:3 tokens, sharing 40 + 60 J.
    r.finished = vec![(result(10), WorkUnitId(1)), (result(30), WorkUnitId(1))];
    attribute(
        &mut r,
        Some(EnergyReading {
            energy_j: 100.0,
            clock_s: 2.0,
            tokens: None,
        }),
        T0,
        &mut ready,
    );
    let j: Vec<f64> = ready.iter().map(|(r, _, _)| r.usage.joules).collect();
    assert_eq!(j, [25.0, 75.0]);
    // Interval 3: nothing in flight: idle.
    r.in_flight = 0;
    attribute(
        &mut r,
        Some(EnergyReading {
            energy_j: 130.0,
            clock_s: 3.0,
            tokens: None,
        }),
        T0,
        &mut ready,
    );
    assert_eq!((r.stats.attributed_j, r.stats.idle_j), (100.0, 30.0));
}

#[test]
fn a_failing_replica_is_rested_and_its_request_retried() {
    let mut core = started(1);
    drain(&mut core);
    core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(1, 4))));
    let first = dispatches(&mut core).into_iter().next().unwrap();
    let reply = EngineReply::Unreachable {
        code: "connect_failed".into(),
        message: "connection refused".into(),
    };
    core.engine_done(T0, first.0, first.1, first.2.req, reply);
    let actions = drain(&mut core);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, AgentAction::Dispatch { replica, .. } if *replica == first.0)),
        "no new work for the failed replica while it rests: {actions:?}"
    );
    let (_, stats) = core.replicas().nth(first.0).unwrap();
    assert_eq!(stats.errors, 1);
    // After the 500 ms rest the replica gets work again.
    let rested = T0.saturating_add(Duration::from_millis(500));
    assert!(core.poll_timeout().unwrap() <= rested);
    core.handle_timeout(rested);
    let actions = drain(&mut core);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, AgentAction::Dispatch { replica, .. } if *replica == first.0)),
        "{actions:?}"
    );
}

#[test]
fn an_unknown_node_registers_again_and_keeps_its_results() {
    let mut core = started(1);
    drain(&mut core);
    core.lease_done(T0, &ModelId::from("m"), Err(CallFailure::UnknownNode));
    assert!(drain(&mut core).contains(&AgentAction::Register));
    let results = vec![ReportedResult {
        unit: WorkUnitId(3),
        req: RequestRef::default(),
        outcome: ReportedOutcome::Final(Outcome::Error {
            code: "c".into(),
            message: "m".into(),
        }),
        usage: Usage::default(),
        latency: Duration::ZERO,
    }];
    core.reporting = Some(Report {
        results: std::sync::Arc::new(results),
        units: vec![WorkUnitId(3)],
    });
    core.report_failed(T0, CallFailure::UnknownNode);
    assert_eq!(core.ready.len(), 1, "kept for the next report");
}

#[test]
fn an_idle_agent_sleeps_until_its_next_real_deadline() {
    let mut core = started(4);
    drain(&mut core);
    core.lease_done(T0, &ModelId::from("m"), Ok(None));
    core.device_sample(T0, vec![None, None]);
    drain(&mut core);
    // Nothing to do now: the next wake-up is the next sample, heartbeat or lease retry.
    let next = core.poll_timeout().unwrap();
    assert!(next > T0, "{next} must be in the future");
    assert_eq!(next, T0.saturating_add(Duration::from_millis(100)));
    // A heartbeat in flight does not make the agent spin either.
    let t = T0.saturating_add(Duration::from_secs(1));
    core.handle_timeout(t);
    assert!(
        drain(&mut core)
            .iter()
            .any(|a| matches!(a, AgentAction::Heartbeat { .. }))
    );
    assert!(core.poll_timeout().unwrap() > t);
}

/// A device reading of `j` joules at `s` seconds.
fn reading(j: f64, s: f64) -> Option<EnergyReading> {
    Some(EnergyReading {
        energy_j: j,
        clock_s: s,
        tokens: None,
    })
}

/// An agent with nothing to do, resting since 100 ms after its baseline reading (at 0 J).
fn resting() -> (AgentCore, Timestamp) {
    let mut core = started(4);
    drain(&mut core);
    core.lease_done(T0, &ModelId::from("m"), Ok(None));
    // The baseline reading; then nothing runs, so the next due sample is skipped.
    core.device_sample(T0, vec![reading(0.0, 0.0), reading(0.0, 0.0)]);
    drain(&mut core);
    let t1 = T0.saturating_add(Duration::from_millis(100));
    core.handle_timeout(t1);
    assert!(!drain(&mut core).contains(&AgentAction::SampleDevices), "resting");
    (core, t1)
}

#[test]
fn an_idle_agent_rests_its_devices_and_books_the_rest_as_idle_energy() {
    let (mut core, _) = resting();
    let next = core.poll_timeout().unwrap();
    assert!(
        next >= T0.saturating_add(Duration::from_secs(1)),
        "rests until the heartbeat: {next}"
    );
    // Work arrives after 60 s: the devices are read first, and only then is the
    // request dispatched; the 60 s of energy since the baseline is idle, charged to
    // no request.
    let t2 = T0.saturating_add(Duration::from_secs(60));
    core.lease_done(t2, &ModelId::from("m"), Ok(Some(grant(1, 1))));
    let first = drain(&mut core);
    assert!(first.contains(&AgentAction::SampleDevices), "{first:?}");
    assert!(
        !first.iter().any(|a| matches!(a, AgentAction::Dispatch { .. })),
        "no dispatch before the reading: {first:?}"
    );
    core.device_sample(t2, vec![reading(4200.0, 60.0), reading(4200.0, 60.0)]);
    assert!(
        drain(&mut core)
            .iter()
            .any(|a| matches!(a, AgentAction::Dispatch { .. }))
    );
    let idle: f64 = core.replicas().map(|(_, s)| s.idle_j).sum();
    let attributed: f64 = core.replicas().map(|(_, s)| s.attributed_j).sum();
    assert_eq!((idle, attributed), (8400.0, 0.0));
}

#[test]
fn a_rest_whose_closing_reading_never_comes_is_charged_to_nobody() {
    let (mut core, _) = resting();
    // An hour of rest, then work; the closing reading hangs and is given up.
    let t = T0.saturating_add(Duration::from_secs(3600));
    core.lease_done(t, &ModelId::from("m"), Ok(Some(grant(1, 1))));
    let first = drain(&mut core);
    assert!(first.contains(&AgentAction::SampleDevices), "{first:?}");
    assert!(
        !first.iter().any(|a| matches!(a, AgentAction::Dispatch { .. })),
        "{first:?}"
    );
    let late = t.saturating_add(Duration::from_millis(300));
    core.handle_timeout(late);
    let (replica, unit, item) = dispatches(&mut core)
        .into_iter()
        .next()
        .expect("dispatched once the reading is given up");
    // The request runs 2 s; the next good reading sees the whole hour plus those 2 s.
    let done = late.saturating_add(Duration::from_secs(2));
    core.engine_done(done, replica, unit, item.req, answered(5));
    core.handle_timeout(done);
    drain(&mut core);
    core.device_sample(
        done,
        vec![reading(360_000.0 + 1_400.0, 3602.3), reading(360_000.0, 3602.3)],
    );
    let attributed: f64 = core.replicas().map(|(_, s)| s.attributed_j).sum();
    assert_eq!(attributed, 0.0, "the unknown hour is not charged to the request");
}

#[test]
fn an_overdue_device_sample_does_not_hold_results_back() {
    let mut core = started(4);
    drain(&mut core);
    core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(1, 1))));
    let (replica, unit, item) = dispatches(&mut core).into_iter().next().unwrap();
    core.engine_done(T0, replica, unit, item.req, answered(5));
    // The sample asked for at T0 never comes back.
    let late = T0.saturating_add(Duration::from_millis(300));
    assert!(core.poll_timeout().unwrap() <= late);
    core.handle_timeout(late);
    core.handle_timeout(late.saturating_add(Duration::from_millis(20)));
    let reported = drain(&mut core)
        .into_iter()
        .any(|a| matches!(a, AgentAction::Report(r) if r.len() == 1));
    assert!(reported, "the finished request is reported without its energy share");
}

#[test]
fn queued_work_of_units_the_control_plane_forgot_is_dropped() {
    let mut core = started(1);
    drain(&mut core);
    core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(7, 5))));
    let dispatched = drain(&mut core)
        .iter()
        .filter(|a| matches!(a, AgentAction::Dispatch { .. }))
        .count();
    assert_eq!(dispatched, 2, "one per replica");
    core.heartbeat_done(
        T0,
        Ok(HeartbeatReply {
            directives: vec![],
            unknown_units: vec![WorkUnitId(7)],
        }),
    );
    assert_eq!(
        core.held_units(),
        [WorkUnitId(7)],
        "still held until the two running requests are reported"
    );
    assert!(
        core.models.iter().all(|m| m.queue.is_empty()),
        "the three queued requests are dropped"
    );
}

#[test]
fn shutdown_releases_queued_work_and_drains() {
    let mut core = started(1);
    drain(&mut core);
    core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(1, 5))));
    let dispatched = dispatches(&mut core);
    core.shutdown(T0);
    let released = released(&drain(&mut core));
    assert_eq!(released, 3);
    assert!(!core.is_drained());
    for (replica, unit, item) in dispatched {
        core.engine_done(T0, replica, unit, item.req, answered(1));
    }
    core.device_sample(T0, vec![None, None]);
    let report = drain(&mut core)
        .into_iter()
        .any(|a| matches!(a, AgentAction::Report(_)));
    assert!(report, "shutdown reports at once");
    core.report_acked(T0);
    assert!(core.held_units().is_empty());
    // Then the books close: a last device reading, then a last heartbeat carrying it.
    assert_eq!(drain(&mut core), [AgentAction::SampleDevices]);
    assert!(!core.is_drained());
    let reading = |j| {
        Some(EnergyReading {
            energy_j: j,
            clock_s: 1.0,
            tokens: None,
        })
    };
    core.device_sample(T0, vec![reading(50.0), reading(70.0)]);
    assert_eq!(drain(&mut core), [AgentAction::Heartbeat { held: vec![] }]);
    assert!(!core.is_drained(), "waits for the last heartbeat");
    core.heartbeat_done(T0, Err(CallFailure::Unavailable));
    assert!(core.is_drained(), "a failed last heartbeat does not hold the agent");
}

#[test]
fn idle_devices_are_read_now_and_then_and_booked_as_idle() {
    let mut core = started(4);
    drain(&mut core);
    let reading = |j| {
        Some(EnergyReading {
            energy_j: j,
            clock_s: 0.0,
            tokens: None,
        })
    };
    core.device_sample(T0, vec![reading(0.0), reading(0.0)]);
    // Nothing runs: at the next sample time the agent rests instead of sampling.
    let t1 = T0.saturating_add(Duration::from_millis(100));
    core.handle_timeout(t1);
    assert!(!drain(&mut core).contains(&AgentAction::SampleDevices));
    // ... until the idle sample interval has passed.
    let t2 = t1.saturating_add(AgentConfig::default().idle_sample_interval);
    assert_eq!(core.poll_timeout().map(|t| t <= t2), Some(true));
    core.handle_timeout(t2);
    assert!(drain(&mut core).contains(&AgentAction::SampleDevices));
    core.device_sample(t2, vec![reading(350.0), reading(360.0)]);
    let idle: Vec<f64> = core.telemetry().iter().map(|r| r.idle_j).collect();
    assert_eq!(idle, [350.0, 360.0], "the whole rest so far is idle energy");
    assert!(core.telemetry().iter().all(|r| r.attributed_j == 0.0));
}

#[test]
fn a_replica_reads_only_when_every_device_answers() {
    let device = |j: f64| EnergyReading {
        energy_j: j,
        clock_s: 5.0,
        tokens: Some(7),
    };
    let whole = EnergyReading::of_devices(2, &[device(10.0), device(32.0)]).expect("both answered");
    assert_eq!((whole.energy_j, whole.clock_s, whole.tokens), (42.0, 5.0, Some(7)));
    assert_eq!(
        EnergyReading::of_devices(2, &[device(10.0)]),
        None,
        "one device missing"
    );
    assert_eq!(EnergyReading::of_devices(0, &[]), None, "no devices, no reading");
}

#[test]
fn a_late_reading_does_not_end_a_rest() {
    let (mut core, t1) = resting();
    // A reading the core had given up on comes in late (the shell does not cancel device
    // reads): it is booked, and the rest goes on.
    core.device_sample(t1, vec![reading(10.0, 0.1), reading(10.0, 0.1)]);
    drain(&mut core);
    let t2 = T0.saturating_add(Duration::from_secs(60));
    core.lease_done(t2, &ModelId::from("m"), Ok(Some(grant(1, 1))));
    let first = drain(&mut core);
    assert!(
        first.contains(&AgentAction::SampleDevices) && !first.iter().any(|a| matches!(a, AgentAction::Dispatch { .. })),
        "work after the rest still waits for the reading that closes it: {first:?}"
    );
}

/// A replica whose engine does not answer probes takes no work: its share goes to the
/// other replica, it leases nothing for it, and the heartbeat says so. With no replica of
/// the model answering, queued work goes back to the control plane.
#[test]
fn a_replica_whose_engine_does_not_answer_takes_no_work() {
    let mut core = started(4);
    drain(&mut core);
    core.engine_probe(T0, 1, false);
    core.lease_done(T0, &ModelId::from("m"), Ok(Some(grant(1, 6))));
    let sent = dispatches(&mut core);
    assert_eq!(sent.len(), 4, "only r0's window");
    assert!(sent.iter().all(|(r, _, _)| *r == 0), "{sent:?}");
    let t = core.telemetry();
    assert!(!t[0].unreachable && t[1].unreachable, "{t:?}");
    // r0's engine stops answering too: the two queued requests go back.
    core.engine_probe(T0, 0, false);
    let released = released(&drain(&mut core));
    assert_eq!(released, 2);
    // r1 answers again: it leases and takes work.
    core.engine_probe(T0, 1, true);
    assert!(
        drain(&mut core).iter().any(|a| matches!(a, AgentAction::Lease { .. })),
        "a replica that answers again leases"
    );
    assert!(!core.telemetry()[1].unreachable);
}
