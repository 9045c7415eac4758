//! The fleet as the control core sees it: node registration and heartbeats, the rate each
//! model owes (from its batches' deadlines), placement's activation of replicas and the
//! directives that carry it to the agents, and the idle energy shared among tenants. The
//! periodic part runs on the refresh timer (`refresh_due` / `refresh`).

use super::*;

impl ControlCore {
    /// [`ControlCore::register`] before waiting leases are served.
    pub(super) fn register_inner(&mut self, now: Timestamp, reg: NodeRegistration) {
        // Lease calls the node made before (re)registering belong to a process that is
        // gone or starting over: they end empty rather than take work.
        self.end_waits_of(&reg.node);
        let accelerator = reg.devices.first().map(|d| d.accelerator.clone());
        let usd_per_device_hour = reg
            .usd_per_device_hour
            .filter(|p| p.is_finite() && *p >= 0.0)
            .or_else(|| accelerator.and_then(|a| Catalog::builtin().accelerator(&a).ok().map(|a| a.price_usd_per_hour)))
            .unwrap_or(0.0);
        let pricing = Pricing {
            usd_per_device_hour,
            usd_per_kwh: self.config.usd_per_kwh,
            pue: self.config.pue,
        };
        let node = reg.node.clone();
        let prior = crate::recal::Correction::prior(self.config.belief_prior_error);
        let serving = reg
            .replicas
            .iter()
            .map(|r| {
                let accelerator = r
                    .devices
                    .first()
                    .and_then(|first| reg.devices.iter().find(|d| d.index == *first))
                    .map(|d| &d.accelerator);
                let tp = r.devices.len() as u32;
                let perf = accelerator
                    .and_then(|a| crate::perf::ReplicaPerf::believed(&r.model, a, tp, &self.config.profiles).ok());
                let window = if r.window > 0 { r.window } else { r.max_concurrency };
                let window = window.max(1);
                Serving {
                    replica: r.replica.clone(),
                    key: std::sync::Arc::new((node.clone(), r.replica.clone())),
                    model: r.model.clone(),
                    cap: perf.as_ref().map(|p| believed_capacity(p, window, &prior)),
                    calibration: prior,
                    cap_time: prior.conservative_time(),
                    perf,
                    window,
                    active: true,
                    advised_active: true,
                    report: None,
                }
            })
            .collect();
        self.capacity_version += 1;
        let old = self.nodes.insert(
            node.clone(),
            Node {
                accelerator: reg
                    .devices
                    .first()
                    .map_or_else(|| AcceleratorId::new("unknown"), |d| d.accelerator.clone()),
                registration: reg,
                serving,
                pricing,
                last_seen: now,
                idle_seen: BTreeMap::new(),
            },
        );
        if old.is_some() {
            for unit in self.units.of_node(&node) {
                self.drop_unit(now, unit, "its agent registered again (it restarted)");
            }
        }
    }

    /// Keeps a node alive, extends the leases of the units it still holds, and takes its
    /// replicas' telemetry.
    ///
    /// Idle energy (drawn while nothing ran) is shared among the tenants in proportion to
    /// the device energy attributed to their results over the SLA window, so that the
    /// tenants' energy adds up to what the devices drew while they used the cluster. Idle
    /// energy reported when no tenant had results in the window is charged to nobody
    /// ([`ControlCore::idle_unallocated_j`]): an idle cluster is the operator's cost.
    pub fn heartbeat(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        held: &[WorkUnitId],
        replicas: Vec<ReplicaReport>,
    ) -> Result<HeartbeatReply, UnknownNode> {
        let n = self.nodes.get_mut(node).ok_or_else(|| UnknownNode(node.clone()))?;
        n.last_seen = now;
        let mut idle = 0.0;
        for r in replicas.iter().filter(|r| r.idle_j.is_finite() && r.idle_j >= 0.0) {
            let seen = match n.idle_seen.get_mut(&r.replica) {
                Some(seen) => std::mem::replace(seen, r.idle_j),
                None => {
                    n.idle_seen.insert(r.replica.clone(), r.idle_j);
                    0.0
                }
            };
            // A counter that went back means the agent restarted and counts from zero.
            idle += if r.idle_j >= seen { r.idle_j - seen } else { r.idle_j };
        }
        // The agent's windows now (its tuner may have moved them) and its replicas'
        // recalibration: capacity is estimated at them.
        let mut capacity_moved = false;
        for r in replicas {
            if let Some(s) = n.serving.iter_mut().find(|s| s.replica == r.replica) {
                let calibration = r.calibration.unwrap_or(s.calibration);
                if (r.window > 0 && r.window != s.window) || calibration != s.calibration {
                    if r.window > 0 && r.window != s.window {
                        s.window = r.window;
                        capacity_moved = true;
                    }
                    s.calibration = calibration;
                    s.cap = if r.unreachable {
                        None
                    } else {
                        s.perf.as_ref().map(|p| believed_capacity(p, s.window, &calibration))
                    };
                    let time = calibration.conservative_time();
                    if (time / s.cap_time - 1.0).abs() > CAP_TIME_STEP {
                        s.cap_time = time;
                        capacity_moved = true;
                    }
                }
                if r.unreachable != s.unreachable() {
                    // Its engine stopped (or started) answering: it leaves (or rejoins) the
                    // capacity admission and the rates owed count on.
                    capacity_moved = true;
                    s.cap = if r.unreachable {
                        None
                    } else {
                        s.perf.as_ref().map(|p| believed_capacity(p, s.window, &s.calibration))
                    };
                }
                s.report = Some(r);
            }
        }
        if capacity_moved {
            self.capacity_version += 1;
        }
        if idle > 0.0 {
            self.share_idle(now, idle);
        }
        let directives = self.directives(node);
        let mut reply = HeartbeatReply::default();
        let expires_at = now.saturating_add(self.config.lease_ttl);
        for &u in held {
            if !self.units.renew(u, node, expires_at) {
                reply.unknown_units.push(u);
            }
        }
        reply.directives = directives;
        Ok(reply)
    }

    /// Output tokens per second `model` must produce from `now` on for every unfinished
    /// batch of it to finish by its deadline, keeping `1 - deadline_share` of each batch's
    /// remaining time in reserve: over the batches in deadline order (all classes), the largest of the
    /// remaining output tokens up to and including a batch divided by the time to its
    /// deadline. Recomputed at most every second.
    pub fn required_rate(&self, model: &ModelId) -> f64 {
        self.required.get(model).copied().unwrap_or(0.0)
    }

    /// When the periodic refresh (required rates, placement) is next due: at once once a
    /// node is known, then every [`REQUIRED_EVERY`].
    pub(super) fn refresh_due(&self) -> Option<Timestamp> {
        if self.nodes.is_empty() {
            return None;
        }
        Some(
            self.required_at
                .map_or(Timestamp::ZERO, |t| t.saturating_add(REQUIRED_EVERY)),
        )
    }

    /// When idle-energy charges are next written ([`IDLE_PERSIST_INTERVAL`] after the
    /// last write, while some are waiting).
    pub(super) fn idle_persist_due(&self) -> Option<Timestamp> {
        (!self.idle_dirty.is_empty()).then(|| self.idle_persisted_at.saturating_add(IDLE_PERSIST_INTERVAL))
    }

    /// Forgets the nodes not heard from (no heartbeat, lease or report) for
    /// [`NODE_SILENCE_LEASES`] lease lifetimes (an agent stopped, drained, or lost with its
    /// node): their replicas stop counting as capacity for admission, the rates owed and
    /// placement, and their waiting lease calls end empty. Their leases have expired by
    /// then (a lease lives one lifetime without a heartbeat); a node that comes back is
    /// told to register again.
    fn forget_silent_nodes(&mut self, now: Timestamp) {
        let silence = self.config.lease_ttl.saturating_mul(NODE_SILENCE_LEASES);
        if silence.is_zero() {
            return;
        }
        let gone: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| now.since(n.last_seen) > silence)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.nodes.remove(&id);
            self.end_waits_of(&id);
            self.stats.nodes_forgotten += 1;
            self.capacity_version += 1;
        }
    }

    /// Recomputes the required rates, runs placement's activation and totals the active
    /// capacity: a timer, every [`REQUIRED_EVERY`] (see [`ControlCore::poll_timeout`]).
    pub(super) fn refresh(&mut self, now: Timestamp) {
        self.required_at = Some(now);
        self.forget_silent_nodes(now);
        // Admission's running sums shrink to the work left now.
        let models: Vec<ModelId> = self.books.keys().cloned().collect();
        for m in &models {
            let stale = self.books[m].version != self.capacity_version;
            self.recount_book(m, stale);
        }
        // Per model: cumulative output tokens owed in deadline order, the rate that needs,
        // and the prompt and output tokens and requests of the unfinished work.
        let mut per_model: BTreeMap<&ModelId, (f64, f64, Work)> = BTreeMap::new();
        let share = self.config.deadline_share.clamp(0.05, 1.0);
        for (deadline, id) in &self.deadlines {
            let b = &self.batches[id];
            let total = f64::from(b.meta.requests.max(1));
            let left = f64::from(b.meta.requests.saturating_sub(b.done()));
            let (c, r, w) = per_model.entry(&b.meta.model).or_default();
            *c += b.output_tokens as f64 * left / total;
            let time = (deadline.since(now).as_secs_f64() * share).max(1.0);
            *r = r.max(*c / time);
            w.0 += b.prompt_tokens as f64 * left / total;
            w.1 += b.output_tokens as f64 * left / total;
            w.2 += left;
        }
        let rate: BTreeMap<ModelId, f64> = per_model.iter().map(|(m, (_, r, _))| ((*m).clone(), *r)).collect();
        let work: BTreeMap<ModelId, Work> = per_model.into_iter().map(|(m, (_, _, w))| (m.clone(), w)).collect();
        self.required = rate;
        if self.config.placement != PlacementMode::Off {
            self.place(now, &work);
        }
        {
            let mut capacity: BTreeMap<ModelId, ActiveCapacity> = BTreeMap::new();
            for s in self.nodes.values().flat_map(|n| &n.serving).filter(|s| s.active) {
                let c = capacity.entry(s.model.clone()).or_default();
                match s.cap {
                    Some(cap) => {
                        c.known += cap;
                        c.known_replicas += 1;
                    }
                    None => c.unknown_replicas += 1,
                }
            }
            self.capacity = capacity;
        }
    }

    /// Placement's activation: which replicas take work now.
    pub(super) fn place(&mut self, now: Timestamp, work: &BTreeMap<ModelId, (f64, f64, f64)>) {
        use crate::placement::{Candidate, operating_point};
        let mut candidates = Vec::new();
        let objective = self.config.placement_objective;
        for (node_id, n) in &self.nodes {
            for s in &n.serving {
                let Some(perf) = &s.perf else { continue };
                let shape = match work.get(&s.model) {
                    Some(&(p, o, r)) if r > 0.0 => ((p / r).round() as u32, (o / r).round().max(1.0) as u32),
                    _ => REFERENCE_SHAPE,
                };
                let point = (perf.devices(), length_bucket(shape.0), length_bucket(shape.1));
                let known = self
                    .operating
                    .get(&s.model)
                    .and_then(|a| a.get(&n.accelerator))
                    .and_then(|p| p.get(&point))
                    .copied();
                let (tokens_per_s, cost_per_token) = match known {
                    Some(x) => x,
                    None => {
                        let cached: usize = self
                            .operating
                            .values()
                            .flat_map(|a| a.values())
                            .map(BTreeMap::len)
                            .sum();
                        if cached > 4096 {
                            self.operating.clear();
                        }
                        let (t, c, _) = operating_point(perf, shape, objective, n.pricing.usd_per_device_hour, 1024);
                        self.operating
                            .entry(s.model.clone())
                            .or_default()
                            .entry(n.accelerator.clone())
                            .or_default()
                            .insert(point, (t, c));
                        (t, c)
                    }
                };
                candidates.push(Candidate {
                    key: s.key.clone(),
                    model: &s.model,
                    tokens_per_s,
                    cost_per_token,
                    node: node_id,
                });
            }
        }
        while self
            .arrivals
            .front()
            .is_some_and(|(t, _, _)| now.since(*t) > ARRIVAL_WINDOW)
        {
            self.arrivals.pop_front();
        }
        // Keep up with what arrives as well as with what is due.
        let mut need = self.required.clone();
        let mut arriving: BTreeMap<&ModelId, f64> = BTreeMap::new();
        for (_, model, tokens) in &self.arrivals {
            *arriving.entry(model).or_default() += tokens;
        }
        for (model, tokens) in arriving {
            let r = need.entry(model.clone()).or_default();
            *r = r.max(tokens / ARRIVAL_WINDOW.as_secs_f64());
        }
        self.activation.update(now, &candidates, &need, &self.config.activation);
        self.demand = need
            .iter()
            .map(|(m, &r)| {
                let shape = match work.get(m) {
                    Some(&(p, o, n)) if n > 0.0 => ((p / n).round() as u32, (o / n).round().max(1.0) as u32),
                    _ => REFERENCE_SHAPE,
                };
                (m.clone(), (r, shape))
            })
            .collect();
        let enforce = self.config.placement == PlacementMode::Active;
        for n in self.nodes.values_mut() {
            for s in n.serving.iter_mut().filter(|s| s.perf.is_some()) {
                let on = self.activation.is_active(&s.key);
                s.advised_active = on;
                if enforce {
                    s.active = on;
                }
            }
        }
    }

    /// What each replica of `node` should do: its share of its model's required rate, in
    /// proportion to its capacity among the model's active replicas.
    pub(super) fn directives(&self, node: &NodeId) -> Vec<ReplicaDirective> {
        let Some(n) = self.nodes.get(node) else {
            return Vec::new();
        };
        let mine: Vec<(crate::ids::ReplicaId, ModelId, bool, Option<f64>)> = n
            .serving
            .iter()
            .map(|s| (s.replica.clone(), s.model.clone(), s.active, s.cap))
            .collect();
        let mut out = Vec::with_capacity(mine.len());
        for (replica, model, active, cap) in mine {
            let required = self.required_rate(&model);
            // A replica without a performance model counts as the mean of those with one
            // (or 1 if none has).
            let c = self.capacity.get(&model).copied().unwrap_or_default();
            let mean = if c.known_replicas > 0 {
                c.known / f64::from(c.known_replicas)
            } else {
                1.0
            };
            let total = c.known + mean * f64::from(c.unknown_replicas);
            let own = cap.unwrap_or(mean);
            let owed = if active && total > 0.0 {
                required * own / total
            } else {
                0.0
            };
            out.push(ReplicaDirective {
                replica,
                owed_tokens_per_s: owed,
                active,
            });
        }
        out
    }

    /// Shares `idle` joules among tenants by their attributed energy over the SLA window.
    pub(super) fn share_idle(&mut self, now: Timestamp, idle: f64) {
        let shares = self.sla.tenant_energy_in_window(now);
        let total: f64 = shares.iter().map(|(_, j)| j).sum();
        if total <= 0.0 {
            self.idle_unallocated_j += idle;
            return;
        }
        let hour = hour_of(now);
        let per_joule = Pricing::energy_only(self.config.usd_per_kwh, self.config.pue).energy_usd(1.0);
        for (tenant, j) in shares {
            let joules = idle * j / total;
            let share = self
                .tenant_idle
                .entry(tenant.clone())
                .or_default()
                .entry(hour)
                .or_default();
            share.joules += joules;
            share.cost_usd += joules * per_joule;
            let t = self.tenant_totals.entry(tenant.clone()).or_default();
            t.idle_joules += joules;
            t.idle_cost_usd += joules * per_joule;
            self.idle_dirty.insert((tenant, hour));
        }
    }

    /// Persists changed idle charges, at most every [`IDLE_PERSIST_INTERVAL`] unless
    /// `force`.
    pub(super) fn persist_idle(&mut self, now: Timestamp, force: bool) {
        if self.idle_dirty.is_empty() || (!force && now.since(self.idle_persisted_at) < IDLE_PERSIST_INTERVAL) {
            return;
        }
        self.idle_persisted_at = now;
        for (tenant, hour) in std::mem::take(&mut self.idle_dirty) {
            let share = self.tenant_idle[&tenant][&hour];
            self.actions.push_back(Action::Persist(DurableOp::TenantIdle {
                tenant,
                hour,
                joules: share.joules,
                cost_usd: share.cost_usd,
            }));
        }
    }

    /// Idle energy charged to nobody since this control plane started (reported while no
    /// tenant had results in the SLA window), joules.
    pub fn idle_unallocated_j(&self) -> f64 {
        self.idle_unallocated_j
    }

    /// Restores the idle charges read back from the store at startup: (tenant, hour,
    /// joules, cost).
    pub fn restore_idle(&mut self, rows: impl IntoIterator<Item = (TenantId, Timestamp, f64, f64)>) {
        for (tenant, hour, joules, cost_usd) in rows {
            let share = self
                .tenant_idle
                .entry(tenant.clone())
                .or_default()
                .entry(hour)
                .or_default();
            *share = IdleShare { joules, cost_usd };
        }
        for (tenant, hours) in &self.tenant_idle {
            let t = self.tenant_totals.entry(tenant.clone()).or_default();
            t.idle_joules = hours.values().map(|s| s.joules).sum();
            t.idle_cost_usd = hours.values().map(|s| s.cost_usd).sum();
        }
    }
}

/// Output tokens/s a replica is counted on for at `window`: its belief's capacity, divided
/// by its measured time correction raised by that correction's uncertainty (so that
/// admission counts on less while the correction is uncertain; see [`crate::recal`]).
/// How far a replica's recalibration must move before admission recomputes the service
/// times of the batches it has admitted (relative).
const CAP_TIME_STEP: f64 = 0.01;

fn believed_capacity(perf: &crate::perf::ReplicaPerf, window: u32, c: &crate::recal::Correction) -> f64 {
    perf.capacity(window, REFERENCE_SHAPE) / c.conservative_time()
}
