//! What the control core shows without changing anything: tenants' usage, batch views and
//! lists, the SLA document, the fleet and placement's plan, the tuning view. Every function
//! here takes `&self` (a read never changes a decision; see `tests::reads_at_any_moment_change_no_decision`).

use super::*;

impl ControlCore {
    /// Every tenant's usage over all its batches (for metering metrics; equal to
    /// [`ControlCore::tenant_usage`] from the beginning).
    pub fn tenant_totals(&self) -> &BTreeMap<TenantId, TenantUsage> {
        &self.tenant_totals
    }

    /// What `tenant`'s batches created at or after `since` used: the sum over those
    /// batches of their recorded results (token accounting), and the idle energy charged
    /// to the tenant in the hours from `since`'s hour on.
    pub fn tenant_usage(&self, tenant: &TenantId, since: Timestamp) -> TenantUsage {
        let mut u = TenantUsage::default();
        for (_, id) in self
            .by_tenant
            .range((tenant.clone(), BatchId(0))..=(tenant.clone(), BatchId(u64::MAX)))
        {
            let b = &self.batches[id];
            if b.life.created_at < since {
                continue;
            }
            u.batches += 1;
            u.requests_completed += u64::from(b.completed);
            u.requests_failed += u64::from(b.failed);
            u.usage += b.usage;
        }
        // Deleted batches count by the day they were created.
        if let Some(days) = self.history.get(tenant) {
            for h in days.range(day_of(since)..).map(|(_, h)| h) {
                u.batches += h.batches;
                u.requests_completed += h.requests_completed;
                u.requests_failed += h.requests_failed;
                u.usage += h.usage;
            }
        }
        if let Some(hours) = self.tenant_idle.get(tenant) {
            for share in hours.range(hour_of(since)..).map(|(_, s)| s) {
                u.idle_joules += share.joules;
                u.idle_cost_usd += share.cost_usd;
            }
        }
        u
    }

    /// The throughput SLA as measured now over the SLA window (see [`crate::sla`]).
    pub fn sla_document(&self, now: Timestamp) -> crate::sla::ThroughputSla {
        use crate::sla::{SlaClassEntry, SlaPool};
        let measured = self.sla.pools(now);
        let covered = self.sla.covered_s(now);
        // Every (model, accelerator) with capacity or with results in the window.
        let mut keys: BTreeSet<(ModelId, AcceleratorId)> = measured
            .iter()
            .map(|p| (p.model.clone(), p.accelerator.clone()))
            .collect();
        for n in self.nodes.values() {
            for s in n.serving.iter().filter(|s| s.perf.is_some()) {
                keys.insert((s.model.clone(), n.accelerator.clone()));
            }
        }
        let pools = keys
            .into_iter()
            .map(|(model, accelerator)| {
                let m = measured
                    .iter()
                    .find(|p| p.model == model && p.accelerator == accelerator);
                let (requests, usage, latency) = m.map_or((0, Usage::default(), Default::default()), |p| {
                    (p.requests, p.usage, p.latency_s)
                });
                // Capacity at the window's mean request shape (a 512/256 reference before any).
                let prompt = usage.prompt_tokens.checked_div(requests).map_or(512, |p| p as u32);
                let output = usage
                    .completion_tokens
                    .checked_div(requests)
                    .map_or(256, |o| o.max(1) as u32);
                let (mut devices, mut replicas, mut capacity) = (0u32, 0u32, 0.0);
                for n in self.nodes.values().filter(|n| n.accelerator == accelerator) {
                    // A replica whose engine does not answer commits nothing.
                    for s in n.serving.iter().filter(|s| s.model == model && !s.unreachable()) {
                        let Some(perf) = &s.perf else { continue };
                        replicas += 1;
                        devices += perf.devices();
                        capacity += perf.capacity(s.window, (prompt, output));
                    }
                }
                let out = usage.completion_tokens as f64;
                SlaPool {
                    model: model.to_string(),
                    accelerator: accelerator.to_string(),
                    devices,
                    replicas,
                    committed_output_tokens_per_second: capacity * self.config.admission_headroom,
                    measured_output_tokens_per_second: if covered > 0.0 { out / covered } else { 0.0 },
                    requests,
                    output_tokens: usage.completion_tokens,
                    prompt_tokens: usage.prompt_tokens,
                    output_tokens_per_joule: if usage.joules > 0.0 { out / usage.joules } else { 0.0 },
                    cost_per_million_output_tokens_usd: if out > 0.0 { usage.cost_usd / out * 1e6 } else { 0.0 },
                    request_latency_seconds: latency,
                }
            })
            .collect();
        let classes = self
            .sla
            .classes(now)
            .into_iter()
            .map(|c| SlaClassEntry {
                committed: self.class_of(&c.class).1,
                attainment: if c.batches > 0 {
                    c.on_time as f64 / c.batches as f64
                } else {
                    1.0
                },
                model: c.model.to_string(),
                class: c.class,
                batches: c.batches,
                on_time: c.on_time,
                completion_seconds: c.completion_s,
            })
            .collect();
        crate::sla::ThroughputSla {
            api_version: crate::sla::API_VERSION.into(),
            kind: crate::sla::KIND.into(),
            metadata: crate::sla::SlaMetadata {
                generated_at_unix_ms: now.as_micros() / 1000,
                window_seconds: self.sla.window().as_secs_f64(),
                covered_seconds: covered,
            },
            method: crate::sla::SlaMethod::default(),
            pools,
            classes,
        }
    }

    /// One batch of `tenant`.
    pub fn batch(&self, tenant: &TenantId, id: BatchId) -> Result<BatchView, BatchError> {
        self.owned(tenant, id).map(Batch::view)
    }

    /// Any batch, whoever owns it (for the shell's own use, never for tenant queries).
    pub fn view(&self, id: BatchId) -> Option<BatchView> {
        self.batches.get(&id).map(Batch::view)
    }

    /// `tenant`'s batches, newest first, older than `before` if given.
    pub fn list(&self, tenant: &TenantId, before: Option<BatchId>, limit: usize) -> (Vec<BatchView>, bool) {
        let upper = before.unwrap_or(BatchId(u64::MAX));
        let mut it = self
            .by_tenant
            .range((tenant.clone(), BatchId(0))..(tenant.clone(), upper))
            .rev()
            .map(|(_, id)| self.batches[id].view());
        let page: Vec<BatchView> = it.by_ref().take(limit).collect();
        let more = it.next().is_some();
        (page, more)
    }

    /// The registered fleet as placement sees it: nodes with their high-bandwidth domains,
    /// the replicas on them, and the models served.
    pub fn fleet(
        &self,
    ) -> (
        Vec<crate::placement::NodeSpec>,
        Vec<crate::placement::Placed>,
        Vec<ModelId>,
    ) {
        use crate::placement::{NodeSpec, Placed};
        let mut nodes = Vec::new();
        let mut placed = Vec::new();
        let mut models: BTreeSet<ModelId> = BTreeSet::new();
        for (id, n) in &self.nodes {
            let mut domains: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
            for d in &n.registration.devices {
                domains.entry(d.domain).or_default().push(d.index);
            }
            nodes.push(NodeSpec {
                node: id.clone(),
                accelerator: n.accelerator.clone(),
                domains: domains
                    .into_values()
                    .map(|mut v| {
                        v.sort_unstable();
                        v
                    })
                    .collect(),
                usd_per_device_hour: n.pricing.usd_per_device_hour,
            });
            for r in &n.registration.replicas {
                models.insert(r.model.clone());
                placed.push(Placed {
                    model: r.model.clone(),
                    node: id.clone(),
                    devices: r.devices.clone(),
                });
            }
        }
        (nodes, placed, models.into_iter().collect())
    }

    /// How fragmented the free devices of the registered nodes are, for the models this
    /// cluster serves (see [`crate::placement::fragmentation`]).
    pub fn fragmentation(&self) -> crate::placement::Fragmentation {
        let (nodes, placed, models) = self.fleet();
        crate::placement::fragmentation(&nodes, &placed, &models)
    }

    /// The replica layout placement would choose for the demand it last measured (see
    /// [`crate::placement::plan`]), next to the one the agents run. Advice only: agents
    /// start their engines from their own configuration, so carrying the plan out means
    /// starting and stopping the replicas it names there. `None` while placement is off
    /// or has measured no demand yet.
    pub fn placement_plan(&self) -> Option<PlanView> {
        use crate::placement::Demand;
        if self.demand.is_empty() {
            return None;
        }
        let (_, _, models) = self.fleet();
        let demands: Vec<Demand> = models
            .iter()
            .map(|m| {
                let (tokens_per_s, shape) = self.demand.get(m).copied().unwrap_or((0.0, REFERENCE_SHAPE));
                Demand {
                    model: m.clone(),
                    tokens_per_s,
                    shape,
                }
            })
            .collect();
        Some(self.plan_for(&demands))
    }

    /// The replica layout placement would choose on the registered fleet for `demands`.
    pub fn plan_for(&self, demands: &[crate::placement::Demand]) -> PlanView {
        use crate::placement::{PlanConfig, plan};
        let (nodes, placed, models) = self.fleet();
        let config = PlanConfig {
            objective: self.config.placement_objective,
            margin: self.config.activation.margin,
            ..PlanConfig::default()
        };
        let p = plan(&nodes, demands, &placed, &config);
        let view = |r: &crate::placement::Placed| PlacedView {
            model: r.model.to_string(),
            node: r.node.to_string(),
            devices: r.devices.clone(),
        };
        PlanView {
            demand: demands
                .iter()
                .map(|d| DemandView {
                    model: d.model.to_string(),
                    tokens_per_s: d.tokens_per_s,
                    prompt_tokens: d.shape.0,
                    output_tokens: d.shape.1,
                    planned_tokens_per_s: p.capacity.get(&d.model).copied().unwrap_or(0.0),
                    unmet_tokens_per_s: p.unmet.get(&d.model).copied().unwrap_or(0.0),
                })
                .collect(),
            replicas_now: placed.len() as u32,
            replicas_planned: p.replicas.len() as u32,
            start: p.started.iter().map(view).collect(),
            stop: p.stopped.iter().map(view).collect(),
            fragmentation_now: crate::placement::fragmentation(&nodes, &placed, &models),
            fragmentation_planned: p.fragmentation,
        }
    }

    /// The tuning document (see [`TuningDoc`]).
    pub fn tuning_doc(&self) -> TuningDoc {
        TuningDoc {
            replicas: self.replicas_view(),
            fragmentation: self.fragmentation(),
            plan: self.placement_plan(),
        }
    }

    /// Every registered replica with its directive and what its agent last reported.
    pub fn replicas_view(&self) -> Vec<ReplicaView> {
        let nodes: Vec<NodeId> = self.nodes.keys().cloned().collect();
        let mut out = Vec::new();
        for id in nodes {
            let directives = self.directives(&id);
            let n = &self.nodes[&id];
            for (s, d) in n.serving.iter().zip(directives) {
                let report = s.report.as_ref();
                let tuning = report.and_then(|r| r.tuning.as_ref());
                out.push(ReplicaView {
                    node: id.to_string(),
                    replica: s.replica.to_string(),
                    model: s.model.to_string(),
                    accelerator: n.accelerator.to_string(),
                    devices: s.perf.as_ref().map_or(0, |p| p.devices()),
                    active: s.active,
                    placement_active: s.advised_active,
                    window: s.window,
                    power_limit_w: report.and_then(|r| r.power_limit_w),
                    owed_tokens_per_s: d.owed_tokens_per_s,
                    tuner_mode: tuning.map_or("off", |t| crate::policy::Choice::name(t.mode)).into(),
                    objective: tuning.map(|t| t.objective.to_string()).unwrap_or_default(),
                    objective_value: tuning.map_or(0.0, |t| t.objective_value),
                    measured_tokens_per_s: tuning.map_or(0.0, |t| t.measured_tokens_per_s),
                    converged: tuning.is_some_and(|t| t.holding),
                    tuner_moves: tuning.map_or(0, |t| t.moves),
                    reason: tuning.map(|t| t.reason.to_string()).unwrap_or_default(),
                    advice: tuning.and_then(|t| t.advice.as_ref()).map(|a| AdviceView {
                        window: a.window,
                        power_limit_w: a.power_limit_w,
                        predicted_objective: a.predicted_objective,
                        current_objective: a.current_objective,
                    }),
                    belief: s.perf.as_ref().map_or(String::new(), |p| match p.profile() {
                        Some(c) => format!("profile ({})", c.source.name()),
                        None => "model".into(),
                    }),
                    calibration: s.perf.as_ref().map(|_| s.calibration),
                });
            }
        }
        out
    }
}
