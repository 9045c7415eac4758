//! The agent's energy books: when the devices are read (on a schedule while working,
//! paused while every replica rests, once more to close a rest before work starts again),
//! and how each reading is shared among the requests that finished since the last one, or
//! booked as idle energy.

use super::*;

/// Where the device readings stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sampler {
    /// Work goes on: the devices are read every sample interval.
    Working,
    /// Every replica is idle, so all energy until work starts again is idle energy, read
    /// in one go when it does (or now and then during a long rest).
    Resting,
    /// A reading is on its way, asked for at `started`; `books` says what it closes.
    Reading { started: Timestamp, books: Books },
}

/// What a reading on its way closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Books {
    /// Work since the last reading: shared among the requests that finished.
    Work,
    /// A rest, taken as work starts again: idle energy; work waits for it.
    RestEnded,
    /// Part of a long rest, which goes on: idle energy.
    RestGoesOn,
}

impl Sampler {
    pub(super) fn reading(&self) -> bool {
        matches!(self, Sampler::Reading { .. })
    }

    /// The reading on its way books idle energy.
    fn closes_rest(&self) -> bool {
        matches!(
            self,
            Sampler::Reading {
                books: Books::RestEnded | Books::RestGoesOn,
                ..
            }
        )
    }

    /// Where readings stand once the one on its way is in (or given up). A reading that
    /// comes in after it was given up changes nothing (a rest goes on).
    fn after_reading(&self) -> Sampler {
        match self {
            Sampler::Reading {
                books: Books::RestGoesOn,
                ..
            } => Sampler::Resting,
            Sampler::Reading { .. } => Sampler::Working,
            other => *other,
        }
    }
}

impl AgentCore {
    /// When the device readings next need the agent: the give-up time of a reading on its
    /// way, the next reading of a long rest, or the next scheduled one.
    pub(super) fn sampler_deadline(&self) -> Timestamp {
        match self.sampler {
            Sampler::Reading { started, .. } => started.saturating_add(self.config.sample_interval * SAMPLE_GIVE_UP),
            Sampler::Resting => self.rest_sample_at,
            Sampler::Working => self.sample_at,
        }
    }

    /// The readings' part of [`AgentCore::handle_timeout`].
    pub(super) fn sampler_timeout(&mut self, now: Timestamp) {
        if let Sampler::Reading { started, .. } = self.sampler
            && now >= started.saturating_add(self.config.sample_interval * SAMPLE_GIVE_UP)
        {
            // The reading is overdue (a device or emulator hangs): finished requests go
            // out without their energy share rather than wait; the next good reading's
            // difference covers the gap, so no energy is lost from the books.
            let closed_rest = self.sampler.closes_rest();
            self.sampler = self.sampler.after_reading();
            if closed_rest {
                // The reading that should have closed a rest never came: what the devices
                // drew during the rest is unknown and must not be charged to the work that
                // starts now, so the next reading starts a new baseline instead.
                for r in &mut self.replicas {
                    r.last_reading = None;
                }
            }
            for r in &mut self.replicas {
                attribute(r, None, now, &mut self.ready);
            }
            if self.closing == Closing::Reading {
                self.closing = Closing::Read;
            }
        }
        // Idle, with a first reading taken (the baseline a rest is measured from).
        let idle = self
            .replicas
            .iter()
            .all(|r| r.in_flight == 0 && r.finished.is_empty() && r.last_reading.is_some());
        if self.sample_at <= now && self.sampler == Sampler::Working && idle {
            self.sampler = Sampler::Resting;
            self.rest_sample_at = if self.config.idle_sample_interval.is_zero() {
                Timestamp::MAX
            } else {
                now.saturating_add(self.config.idle_sample_interval)
            };
        }
        if self.sampler == Sampler::Resting && self.rest_sample_at <= now {
            // A long rest: book what the idle devices drew so far, and rest on.
            self.rest_sample_at = now.saturating_add(self.config.idle_sample_interval);
            self.sampler = Sampler::Reading {
                started: now,
                books: Books::RestGoesOn,
            };
            self.actions.push_back(AgentAction::SampleDevices);
        }
        if self.sample_at <= now && self.sampler == Sampler::Working {
            self.sampler = Sampler::Reading {
                started: now,
                books: Books::Work,
            };
            self.sample_at = now.saturating_add(self.config.sample_interval);
            self.actions.push_back(AgentAction::SampleDevices);
        }
    }

    /// Reads the devices now, whatever the schedule (e.g. to close the books at the end):
    /// emits [`AgentAction::SampleDevices`] unless a reading is already on its way.
    pub fn sample_now(&mut self, now: Timestamp) {
        let books = match self.sampler {
            Sampler::Reading { .. } => return,
            Sampler::Resting => Books::RestEnded,
            Sampler::Working => Books::Work,
        };
        self.sampler = Sampler::Reading { started: now, books };
        self.sample_at = now.saturating_add(self.config.sample_interval);
        self.actions.push_back(AgentAction::SampleDevices);
    }

    /// Whether a rest holds work back: work is about to start after a rest, so the
    /// devices are read first, to close the rest, and work is dispatched once the reading
    /// is in (or given up), so that no busy energy is booked as idle.
    pub(super) fn rest_holds_work(&mut self, now: Timestamp) -> bool {
        if self.sampler == Sampler::Resting {
            self.sample_now(now);
        }
        self.sampler.closes_rest()
    }

    /// Device readings, one per replica in spec order; `None` where the replica has no
    /// energy counter (its requests are charged no energy or device time).
    pub fn device_sample(&mut self, now: Timestamp, readings: Vec<Option<EnergyReading>>) {
        let closing_rest = self.sampler.closes_rest();
        self.sampler = self.sampler.after_reading();
        let tokens: Vec<Option<u64>> = readings.iter().map(|r| r.and_then(|r| r.tokens)).collect();
        for (r, reading) in self.replicas.iter_mut().zip(readings) {
            if r.first_reading.is_none() {
                r.first_reading = reading;
            }
            if closing_rest {
                book_idle(r, reading);
            } else {
                attribute(r, reading, now, &mut self.ready);
            }
        }
        if self.closing == Closing::Reading {
            self.closing = Closing::Read;
        }
        if !closing_rest {
            self.tune(now, &tokens);
        }
        self.pump(now);
    }

    /// Per replica, what its devices' energy counters rose by from the first reading to
    /// the last one (`None` without readings). With nothing in flight it equals the
    /// replica's attributed plus idle energy: the books account for every joule measured.
    pub fn measured_energy_j(&self) -> Vec<Option<f64>> {
        self.replicas
            .iter()
            .map(|r| match (r.first_reading, r.last_reading) {
                (Some(a), Some(b)) => Some(b.energy_j - a.energy_j),
                _ => None,
            })
            .collect()
    }
}

/// Books the energy since the last reading as idle (a rest, during which nothing ran).
fn book_idle(r: &mut Replica, reading: Option<EnergyReading>) {
    if let (Some(new), Some(old)) = (reading, r.last_reading) {
        r.stats.idle_j += (new.energy_j - old.energy_j).max(0.0);
    }
    r.stats.idle_j += r.carried_j;
    r.carried_j = 0.0;
    r.carried_device_s = 0.0;
    if reading.is_some() {
        r.last_reading = reading;
    }
}

/// Shares the energy and device time since the last reading among the requests that
/// finished since then (see the module docs).
pub(super) fn attribute(
    r: &mut Replica,
    reading: Option<EnergyReading>,
    now: Timestamp,
    ready: &mut VecDeque<(ReportedResult, WorkUnitId, Timestamp)>,
) {
    let (joules, device_s) = match (reading, r.last_reading) {
        (Some(new), Some(old)) => (
            (new.energy_j - old.energy_j).max(0.0),
            (new.clock_s - old.clock_s).max(0.0) * f64::from(r.spec.devices),
        ),
        _ => (0.0, 0.0),
    };
    if reading.is_some() {
        r.last_reading = reading;
    }
    if r.finished.is_empty() {
        if r.in_flight > 0 {
            r.carried_j += joules;
            r.carried_device_s += device_s;
        } else {
            r.stats.idle_j += joules + r.carried_j;
            r.carried_j = 0.0;
            r.carried_device_s = 0.0;
        }
        return;
    }
    let pool_j = joules + r.carried_j;
    let pool_s = device_s + r.carried_device_s;
    r.carried_j = 0.0;
    r.carried_device_s = 0.0;
    r.stats.attributed_j += pool_j;
    let weights: Vec<f64> = r.finished.iter().map(|(res, _)| res.usage.tokens() as f64).collect();
    let total: f64 = weights.iter().sum();
    let n = r.finished.len() as f64;
    for ((mut res, unit), w) in r.finished.drain(..).zip(weights) {
        let share = if total > 0.0 { w / total } else { 1.0 / n };
        res.usage.joules = pool_j * share;
        res.usage.device_seconds = pool_s * share;
        ready.push_back((res, unit, now));
    }
}
