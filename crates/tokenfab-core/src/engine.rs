//! An iteration-level model of a continuous-batching inference engine.
//!
//! Requests wait, are admitted while the engine has sequence slots and KV-cache room,
//! have their prompt prefilled in chunks under a per-step token budget, then decode one
//! token per step until they reach their output length. Each step costs what
//! [`ReplicaPerf::step`] says. This is how vLLM-style engines schedule (decode first,
//! then prefill chunks, as with chunked prefill); the emulator runs it in real time and
//! the simulator on a virtual clock.
//!
//! Cost per step does not grow with the batch: decoding sequences are kept as sums
//! (count, total context) and a map from the step at which each finishes, so a step
//! touches only the sequences that prefill or finish in it.

use crate::perf::{ReplicaPerf, StepCost, StepShape};
use crate::time::{Timestamp, secs};
use std::collections::{BTreeMap, VecDeque};

/// Scheduler settings of the engine (vLLM's names in brackets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// Most sequences running at once [`max_num_seqs`, default 256].
    pub max_num_seqs: u32,
    /// Most tokens computed in one step [`max_num_batched_tokens`].
    pub max_batched_tokens: u32,
    /// Power limit per device, watts.
    pub power_limit_w: f64,
    /// Share of the KV cache that keeps prompt prefixes after their requests finish
    /// [automatic prefix caching, on by default in vLLM V1]; 0 turns the cache off.
    pub prefix_cache_share: f64,
}

/// A prompt prefix a request shares with others (see
/// [`crate::batch_input::shared_prefix`]): its key and its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub key: u64,
    pub tokens: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 256,
            max_batched_tokens: 8192,
            power_limit_w: f64::MAX,
            prefix_cache_share: 0.2,
        }
    }
}

/// A request the engine cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error(
        "the request needs {needed} tokens of KV cache (prompt {prompt} + max output {output}) but the engine holds {capacity}; shorten the prompt or max_tokens"
    )]
    TooLong {
        prompt: u32,
        output: u32,
        needed: u64,
        capacity: u64,
    },
    #[error("a request must ask for at least one output token")]
    NoOutput,
}

/// A finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub id: u64,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub arrived: Timestamp,
    pub first_token: Timestamp,
    pub finished: Timestamp,
}

#[derive(Debug, Clone, Copy)]
struct Seq {
    id: u64,
    prompt: u32,
    output: u32,
    prefilled: u32,
    arrived: Timestamp,
    prefix: Option<Prefix>,
}

#[derive(Debug, Clone, Copy)]
struct Decoding {
    id: u64,
    prompt: u32,
    output: u32,
    arrived: Timestamp,
    first_token: Timestamp,
}

#[derive(Debug, Clone)]
struct Step {
    started: Timestamp,
    ends: Timestamp,
    cost: StepCost,
    /// (index in `prefilling`, tokens) of the prefill chunks in this step.
    chunks: Vec<(usize, u32)>,
}

/// Running totals of an engine.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub steps: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub finished: u64,
    /// Seconds the devices spent computing steps.
    pub busy_s: f64,
    /// Requests with a shared prefix admitted, those whose prefix was cached, and the
    /// prompt tokens the cache saved from prefill.
    pub prefix_lookups: u64,
    pub prefix_hits: u64,
    pub cached_prompt_tokens: u64,
}

/// Prefixes kept after their prefill, least recently used first out.
#[derive(Debug, Clone, Default)]
struct PrefixCache {
    /// key -> (tokens, last use).
    entries: BTreeMap<u64, (u32, u64)>,
    /// last use -> key.
    by_use: BTreeMap<u64, u64>,
    tokens: u64,
    tick: u64,
}

impl PrefixCache {
    fn hit(&mut self, key: u64) -> bool {
        let Some(e) = self.entries.get_mut(&key) else {
            return false;
        };
        self.by_use.remove(&e.1);
        self.tick += 1;
        e.1 = self.tick;
        self.by_use.insert(self.tick, key);
        true
    }

    fn insert(&mut self, p: Prefix, capacity: u64) {
        if u64::from(p.tokens) > capacity || self.hit(p.key) {
            return;
        }
        while self.tokens + u64::from(p.tokens) > capacity {
            let Some((_, old)) = self.by_use.pop_first() else { break };
            if let Some((t, _)) = self.entries.remove(&old) {
                self.tokens -= u64::from(t);
            }
        }
        self.tick += 1;
        self.entries.insert(p.key, (p.tokens, self.tick));
        self.by_use.insert(self.tick, p.key);
        self.tokens += u64::from(p.tokens);
    }
}

/// One engine replica. Drive it with [`submit`](EngineModel::submit),
/// [`poll_timeout`](EngineModel::poll_timeout) / [`handle_timeout`](EngineModel::handle_timeout)
/// and collect results with [`poll_finished`](EngineModel::poll_finished).
#[derive(Debug, Clone)]
pub struct EngineModel {
    perf: ReplicaPerf,
    config: EngineConfig,
    waiting: VecDeque<Seq>,
    prefilling: VecDeque<Seq>,
    /// Decoding sequences by the step index in which they produce their last token.
    decoding: BTreeMap<u64, Vec<Decoding>>,
    decode_count: u32,
    /// Sum of the context (prompt + generated) of decoding sequences.
    decode_context: u64,
    /// KV-cache tokens reserved by admitted sequences (prompt + max output each).
    kv_reserved: u64,
    step: Option<Step>,
    /// While nothing can change until a sequence finishes (no prefill running, nothing
    /// admissible), the pure-decode steps after `step` up to and including the one that
    /// finishes something, computed ahead so that a driver wakes only when output is due.
    ahead: VecDeque<Step>,
    /// Plan steps ahead (off only in tests, to check that planning changes nothing).
    plan: bool,
    step_index: u64,
    /// Energy of all devices up to `energy_at`.
    energy_j: f64,
    energy_at: Timestamp,
    finished: VecDeque<Finished>,
    stats: EngineStats,
    prefixes: PrefixCache,
}

impl EngineModel {
    pub fn new(perf: ReplicaPerf, config: EngineConfig, now: Timestamp) -> Self {
        EngineModel {
            perf,
            config,
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            decoding: BTreeMap::new(),
            decode_count: 0,
            decode_context: 0,
            kv_reserved: 0,
            step: None,
            ahead: VecDeque::new(),
            plan: true,
            step_index: 0,
            energy_j: 0.0,
            energy_at: now,
            finished: VecDeque::new(),
            stats: EngineStats::default(),
            prefixes: PrefixCache::default(),
        }
    }

    pub fn perf(&self) -> &ReplicaPerf {
        &self.perf
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Requests admitted or waiting, not yet finished.
    pub fn in_flight(&self) -> usize {
        self.waiting.len() + self.prefilling.len() + self.decode_count as usize
    }

    /// Sequences admitted (prefilling or decoding).
    pub fn running(&self) -> usize {
        self.prefilling.len() + self.decode_count as usize
    }

    /// A new request arrives. `prompt_tokens` and `max_output_tokens` are what the engine
    /// will compute; the request finishes after exactly `max_output_tokens` tokens.
    pub fn submit(
        &mut self,
        now: Timestamp,
        id: u64,
        prompt_tokens: u32,
        max_output_tokens: u32,
    ) -> Result<(), EngineError> {
        self.submit_with_prefix(now, id, prompt_tokens, max_output_tokens, None)
    }

    /// [`submit`](EngineModel::submit) for a request whose prompt starts with `prefix`:
    /// if the engine's prefix cache holds it when the request is admitted, its tokens are
    /// not prefilled again (they are still read as context, and still count as prompt
    /// tokens of the request). A prefix enters the cache once a request has prefilled it.
    pub fn submit_with_prefix(
        &mut self,
        now: Timestamp,
        id: u64,
        prompt_tokens: u32,
        max_output_tokens: u32,
        prefix: Option<Prefix>,
    ) -> Result<(), EngineError> {
        if max_output_tokens == 0 {
            return Err(EngineError::NoOutput);
        }
        let prompt = prompt_tokens.max(1);
        let needed = u64::from(prompt) + u64::from(max_output_tokens);
        let capacity = self.perf.kv_capacity_tokens();
        if needed > capacity {
            return Err(EngineError::TooLong {
                prompt,
                output: max_output_tokens,
                needed,
                capacity,
            });
        }
        // Steps planned ahead assumed no arrival: bring the engine to `now` and plan again
        // from the next step, which admits this request.
        self.handle_timeout(now);
        self.ahead.clear();
        self.waiting.push_back(Seq {
            id,
            prompt,
            output: max_output_tokens,
            prefilled: 0,
            arrived: now,
            prefix: prefix.filter(|p| p.tokens > 0 && self.config.prefix_cache_share > 0.0),
        });
        if self.step.is_none() {
            self.start_step(now);
            self.plan_ahead();
        }
        Ok(())
    }

    /// Changes the power limit at `now`; it applies from the next step.
    pub fn set_power_limit(&mut self, now: Timestamp, watts: f64) {
        self.handle_timeout(now);
        self.ahead.clear();
        self.config.power_limit_w = watts.clamp(self.perf.min_power_w(), self.perf.max_power_w());
    }

    pub fn power_limit_w(&self) -> f64 {
        self.config.power_limit_w.min(self.perf.max_power_w())
    }

    /// When the engine next has something to do that a driver can observe: the end of
    /// the current step, or, while only decoding goes on, of the step in which the next
    /// sequence finishes. Steps in between are computed by [`EngineModel::handle_timeout`]
    /// all the same, so the result is exactly that of waking at every step.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.ahead.back().or(self.step.as_ref()).map(|s| s.ends)
    }

    /// Ends every step that is over by `now` and starts the next. Call it before reading
    /// [`energy_j`](EngineModel::energy_j), [`power_w`](EngineModel::power_w) or
    /// [`stats`](EngineModel::stats) at `now`.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        while let Some(ends) = self.step.as_ref().map(|s| s.ends).filter(|&t| t <= now) {
            self.end_step();
            match self.ahead.pop_front() {
                Some(next) => self.step = Some(next),
                None => {
                    self.start_step(ends);
                    self.plan_ahead();
                }
            }
        }
    }

    /// If the current step only decodes and nothing waits that could be admitted, the
    /// steps until the next finish are all alike (every sequence adds one token of
    /// context per step): computes them now.
    fn plan_ahead(&mut self) {
        let Some(step) = self.step.as_ref().filter(|_| self.plan) else {
            return;
        };
        if !step.chunks.is_empty() || !self.prefilling.is_empty() {
            return;
        }
        let Some((&finish, _)) = self.decoding.first_key_value() else {
            return;
        };
        let n = self.decode_count;
        let mut ends = step.ends;
        for j in 1..=finish.saturating_sub(self.step_index) {
            let context = self.decode_context + j * u64::from(n);
            let shape = StepShape {
                seqs: n,
                tokens: n,
                kv_read_tokens: context,
                attended_tokens: context,
                routed_tokens: n,
            };
            let cost = self.perf.step(&shape, self.config.power_limit_w);
            let next = Step {
                started: ends,
                ends: ends.saturating_add(secs(cost.seconds)),
                cost,
                chunks: Vec::new(),
            };
            ends = next.ends;
            self.ahead.push_back(next);
        }
    }

    pub fn poll_finished(&mut self) -> Option<Finished> {
        self.finished.pop_front()
    }

    /// Energy drawn by all the replica's devices since creation, joules, at `now`
    /// (interpolated inside a step; idle power between steps).
    pub fn energy_j(&self, now: Timestamp) -> f64 {
        let devices = f64::from(self.perf.devices());
        match &self.step {
            Some(s) => {
                let into = now.since(s.started).as_secs_f64().min(s.cost.seconds);
                self.energy_j + s.cost.power_w * devices * into
            }
            None => self.energy_j + self.perf.idle_power_w() * devices * now.since(self.energy_at).as_secs_f64(),
        }
    }

    /// Power per device at `now`.
    pub fn power_w(&self) -> f64 {
        self.step.as_ref().map_or(self.perf.idle_power_w(), |s| s.cost.power_w)
    }

    fn start_step(&mut self, now: Timestamp) {
        // Idle time since the last step ended.
        self.energy_j +=
            self.perf.idle_power_w() * f64::from(self.perf.devices()) * now.since(self.energy_at).as_secs_f64();
        self.energy_at = now;
        self.admit();
        let mut budget = self.config.max_batched_tokens.saturating_sub(self.decode_count);
        let mut shape = StepShape {
            seqs: self.decode_count,
            tokens: self.decode_count,
            kv_read_tokens: self.decode_context,
            attended_tokens: self.decode_context,
            routed_tokens: self.decode_count,
        };
        let mut chunks = Vec::new();
        for (i, s) in self.prefilling.iter().enumerate() {
            if budget == 0 {
                break;
            }
            let chunk = (s.prompt - s.prefilled).min(budget);
            budget -= chunk;
            chunks.push((i, chunk));
            shape.seqs += 1;
            shape.tokens += chunk;
            shape.routed_tokens += chunk;
            shape.kv_read_tokens += u64::from(s.prefilled + chunk);
            shape.attended_tokens +=
                u64::from(chunk) * u64::from(s.prefilled) + u64::from(chunk) * u64::from(chunk) / 2;
        }
        if shape.seqs == 0 {
            self.step = None;
            return;
        }
        let cost = self.perf.step(&shape, self.config.power_limit_w);
        self.step = Some(Step {
            started: now,
            ends: now.saturating_add(secs(cost.seconds)),
            cost,
            chunks,
        });
    }

    /// Moves waiting requests into the running set while slots and KV cache allow.
    fn admit(&mut self) {
        let capacity = self.perf.kv_capacity_tokens();
        let mut i = 0;
        while let Some(s) = self.waiting.get(i) {
            let need = u64::from(s.prompt) + u64::from(s.output);
            if self.running() as u32 >= self.config.max_num_seqs || self.kv_reserved + need > capacity {
                break;
            }
            // A request whose prefix another one is prefilling now waits until it is cached
            // rather than prefill it again (SGLang's in-batch prefix caching does this).
            if let Some(p) = s.prefix
                && self
                    .prefilling
                    .iter()
                    .any(|q| q.prefix.is_some_and(|qp| qp.key == p.key))
            {
                i += 1;
                continue;
            }
            self.kv_reserved += need;
            let mut s = self.waiting.remove(i).expect("index checked");
            if let Some(p) = s.prefix {
                self.stats.prefix_lookups += 1;
                if self.prefixes.hit(p.key) {
                    // At least the prompt's last token is computed (it samples the first
                    // output token).
                    s.prefilled = p.tokens.min(s.prompt - 1);
                    s.prefix = None;
                    self.stats.prefix_hits += 1;
                    self.stats.cached_prompt_tokens += u64::from(s.prefilled);
                }
            }
            self.prefilling.push_back(s);
        }
    }

    fn end_step(&mut self) {
        let step = self.step.take().expect("a step is running");
        let now = step.ends;
        let k = self.step_index;
        self.step_index += 1;
        self.stats.steps += 1;
        self.stats.busy_s += step.cost.seconds;
        self.energy_j += step.cost.energy_j * f64::from(self.perf.devices());
        self.energy_at = now;

        // Every decoding sequence produced one token.
        self.decode_context += u64::from(self.decode_count);
        self.stats.completion_tokens += u64::from(self.decode_count);
        if let Some(done) = self.decoding.remove(&k) {
            for d in done {
                self.decode_count -= 1;
                self.decode_context -= u64::from(d.prompt) + u64::from(d.output);
                self.retire(d.id, d.prompt, d.output, d.arrived, d.first_token, now);
            }
        }
        // Prefill chunks advanced; a completed prefill samples the first token.
        let mut completed = Vec::new();
        let cache_capacity = (self.perf.kv_capacity_tokens() as f64 * self.config.prefix_cache_share) as u64;
        for &(i, chunk) in &step.chunks {
            let s = &mut self.prefilling[i];
            s.prefilled += chunk;
            self.stats.prompt_tokens += u64::from(chunk);
            // Its prefix is computed: cached for the requests after it.
            if let Some(p) = s.prefix
                && s.prefilled >= p.tokens.min(s.prompt)
            {
                self.prefixes.insert(p, cache_capacity);
                s.prefix = None;
            }
            if s.prefilled == s.prompt {
                completed.push(i);
            }
        }
        for &i in completed.iter().rev() {
            let s = self.prefilling.remove(i).expect("index from this step");
            self.stats.completion_tokens += 1;
            if s.output == 1 {
                self.retire(s.id, s.prompt, 1, s.arrived, now, now);
            } else {
                // It decodes in steps k+1 ..= k + (output - 1).
                self.decode_count += 1;
                self.decode_context += u64::from(s.prompt) + 1;
                self.decoding
                    .entry(k + u64::from(s.output) - 1)
                    .or_default()
                    .push(Decoding {
                        id: s.id,
                        prompt: s.prompt,
                        output: s.output,
                        arrived: s.arrived,
                        first_token: now,
                    });
            }
        }
    }

    fn retire(
        &mut self,
        id: u64,
        prompt: u32,
        output: u32,
        arrived: Timestamp,
        first_token: Timestamp,
        now: Timestamp,
    ) {
        self.kv_reserved -= u64::from(prompt) + u64::from(output);
        self.stats.finished += 1;
        self.finished.push_back(Finished {
            id,
            prompt_tokens: prompt,
            completion_tokens: output,
            arrived,
            first_token,
            finished: now,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AcceleratorId, ModelId};
    use proptest::prelude::*;

    fn engine(config: EngineConfig) -> EngineModel {
        let perf = ReplicaPerf::new(&ModelId::from("llama-3.1-8b"), &AcceleratorId::from("h100-sxm"), 1).unwrap();
        EngineModel::new(perf, config, Timestamp::ZERO)
    }

    fn run_to_end(e: &mut EngineModel) -> Vec<Finished> {
        let mut out = Vec::new();
        while let Some(t) = e.poll_timeout() {
            e.handle_timeout(t);
            out.extend(std::iter::from_fn(|| e.poll_finished()));
        }
        out
    }

    #[test]
    fn a_cached_prefix_is_not_prefilled_again() {
        let prefix = Prefix { key: 7, tokens: 3000 };
        // Request 1 prefills the prefix; request 2, sent after it, finds it cached.
        let run = |share: f64| {
            let mut e = engine(EngineConfig {
                prefix_cache_share: share,
                ..EngineConfig::default()
            });
            e.submit_with_prefix(Timestamp::ZERO, 1, 3200, 4, Some(prefix)).unwrap();
            let first = run_to_end(&mut e);
            let t = first[0].finished;
            let e0 = e.energy_j(t);
            e.submit_with_prefix(t, 2, 3200, 4, Some(prefix)).unwrap();
            let second = run_to_end(&mut e);
            let took = second[0].first_token.since(t);
            (
                e.stats(),
                took,
                e.energy_j(second[0].finished) - e0,
                second[0].prompt_tokens,
            )
        };
        let (on, fast, cheap, billed) = run(0.2);
        let (off, slow, dear, _) = run(0.0);
        assert_eq!(
            (on.prefix_lookups, on.prefix_hits, on.cached_prompt_tokens),
            (2, 1, 3000)
        );
        assert_eq!((off.prefix_lookups, off.prefix_hits), (0, 0));
        assert_eq!(billed, 3200, "cached tokens are still the request's prompt");
        assert_eq!(
            on.prompt_tokens + 3000,
            off.prompt_tokens,
            "3,000 fewer tokens prefilled"
        );
        assert!(
            fast < slow && cheap < dear,
            "{fast:?} vs {slow:?}, {cheap} J vs {dear} J"
        );
        // Sent together, the second waits for the first to prefill the prefix, then finds
        // it cached.
        let mut e = engine(EngineConfig::default());
        e.submit_with_prefix(Timestamp::ZERO, 1, 3200, 4, Some(prefix)).unwrap();
        e.submit_with_prefix(Timestamp::ZERO, 2, 3200, 4, Some(prefix)).unwrap();
        assert_eq!(run_to_end(&mut e).len(), 2);
        assert_eq!((e.stats().prefix_lookups, e.stats().prefix_hits), (2, 1));
        // A different prefix misses; a prefix larger than the cache is never kept.
        let mut e = engine(EngineConfig::default());
        let huge = Prefix {
            key: 9,
            tokens: (e.perf().kv_capacity_tokens() / 4) as u32,
        };
        for (id, p) in [(1, prefix), (2, Prefix { key: 8, ..prefix }), (3, huge), (4, huge)] {
            e.submit_with_prefix(Timestamp::ZERO, id, p.tokens + 10, 2, Some(p))
                .unwrap();
            run_to_end(&mut e);
        }
        assert_eq!((e.stats().prefix_lookups, e.stats().prefix_hits), (4, 0));
    }

    #[test]
    fn the_prefix_cache_evicts_the_least_recently_used() {
        let mut c = PrefixCache::default();
        let p = |key| Prefix { key, tokens: 100 };
        c.insert(p(1), 250);
        c.insert(p(2), 250);
        assert!(c.hit(1), "1 is now the most recently used");
        c.insert(p(3), 250);
        assert!(c.hit(1) && c.hit(3) && !c.hit(2));
        assert_eq!(c.tokens, 200);
    }

    #[test]
    fn one_request_takes_prefill_plus_one_step_per_token() {
        let mut e = engine(EngineConfig::default());
        e.submit(Timestamp::ZERO, 7, 100, 10).unwrap();
        let done = run_to_end(&mut e);
        assert_eq!(done.len(), 1);
        let f = done[0];
        assert_eq!((f.id, f.prompt_tokens, f.completion_tokens), (7, 100, 10));
        assert_eq!(
            e.stats().steps,
            10,
            "one prefill step (which samples token 1) + 9 decode steps"
        );
        assert!(f.first_token > f.arrived && f.finished > f.first_token);
        // Decode at batch 1 on an H100 is memory-bound: ~16 GB / (3.35 TB/s x 0.71) = 6.8 ms.
        let itl = (f.finished.since(f.first_token).as_secs_f64()) / 9.0;
        assert!((0.006..0.008).contains(&itl), "{itl}");
    }

    #[test]
    fn batching_raises_throughput() {
        let tokens_per_s = |n: u64| {
            let mut e = engine(EngineConfig::default());
            for id in 0..n {
                e.submit(Timestamp::ZERO, id, 200, 100).unwrap();
            }
            let done = run_to_end(&mut e);
            assert_eq!(done.len() as u64, n);
            let end = done.iter().map(|f| f.finished).max().unwrap();
            (n * 100) as f64 / end.as_secs_f64()
        };
        let (one, many) = (tokens_per_s(1), tokens_per_s(128));
        assert!(many > 20.0 * one, "{one} vs {many}");
    }

    #[test]
    fn slots_and_kv_cache_bound_admission() {
        let mut e = engine(EngineConfig {
            max_num_seqs: 4,
            ..EngineConfig::default()
        });
        for id in 0..10 {
            e.submit(Timestamp::ZERO, id, 10, 5).unwrap();
        }
        // The first request started a step alone; the rest join when the next step starts.
        assert_eq!(e.running(), 1);
        let first_end = e.poll_timeout().unwrap();
        e.handle_timeout(first_end);
        assert_eq!(e.running(), 4, "max_num_seqs caps the running set");
        assert_eq!(e.in_flight(), 10);
        let cap = e.perf().kv_capacity_tokens();
        let err = e.submit(Timestamp::ZERO, 99, cap as u32, 10).unwrap_err();
        assert!(err.to_string().contains("shorten the prompt or max_tokens"), "{err}");
        assert_eq!(e.submit(Timestamp::ZERO, 98, 1, 0), Err(EngineError::NoOutput));
        assert_eq!(run_to_end(&mut e).len(), 10);
    }

    #[test]
    fn energy_is_power_integrated_over_time_including_idle() {
        let mut e = engine(EngineConfig::default());
        e.submit(Timestamp::ZERO, 1, 50, 20).unwrap();
        let done = run_to_end(&mut e);
        let end = done[0].finished;
        let busy = e.energy_j(end);
        assert!(busy > 0.0);
        let later = end.saturating_add(std::time::Duration::from_secs(2));
        let idle = e.energy_j(later) - busy;
        assert!((idle - 2.0 * 70.0).abs() < 1e-6, "{idle}");
        // Step ends are rounded to whole microseconds.
        assert!((e.stats().busy_s - end.as_secs_f64()).abs() < 1e-6 * e.stats().steps as f64);
    }

    proptest! {
        /// Planning steps ahead gives exactly what waking at every step gives: the same
        /// finishes at the same times and the same energy, with arrivals landing inside
        /// planned runs.
        #[test]
        fn planning_ahead_changes_nothing(reqs in proptest::collection::vec((0u64..3_000_000, 1u32..2000, 1u32..300), 1..60), seqs in 1u32..48) {
            let config = EngineConfig { max_num_seqs: seqs, ..EngineConfig::default() };
            let mut reqs = reqs;
            reqs.sort_by_key(|r| r.0);
            let drive = |plan: bool| {
                let mut e = engine(config);
                e.plan = plan;
                let mut out = Vec::new();
                let mut wakes = 0u32;
                let mut next = 0;
                loop {
                    let arrival = reqs.get(next).map(|r| Timestamp::from_micros(r.0));
                    let t = match (e.poll_timeout(), arrival) {
                        (Some(a), Some(b)) => a.min(b),
                        (a, b) => match a.or(b) { Some(t) => t, None => break },
                    };
                    e.handle_timeout(t);
                    wakes += 1;
                    while reqs.get(next).is_some_and(|r| Timestamp::from_micros(r.0) == t) {
                        let (_, p, o) = reqs[next];
                        e.submit(t, next as u64, p, o).unwrap();
                        next += 1;
                    }
                    out.extend(std::iter::from_fn(|| e.poll_finished()));
                }
                let end = out.iter().map(|f| f.finished).max().unwrap();
                (out, e.energy_j(end), e.stats(), wakes)
            };
            let (planned, energy_p, stats_p, wakes_p) = drive(true);
            let (stepped, energy_s, stats_s, wakes_s) = drive(false);
            prop_assert_eq!(planned, stepped);
            prop_assert!((energy_p - energy_s).abs() <= 1e-9 * energy_s.max(1.0));
            prop_assert_eq!(stats_p.steps, stats_s.steps);
            prop_assert!(wakes_p <= wakes_s);
        }

        /// Whatever arrives: every request finishes exactly once with the tokens it asked
        /// for, token counters add up, and time never runs backwards.
        #[test]
        fn conservation(reqs in proptest::collection::vec((0u64..2_000_000, 1u32..3000, 1u32..400), 1..80), seqs in 1u32..64, budget in 64u32..4096) {
            let mut e = engine(EngineConfig { max_num_seqs: seqs, max_batched_tokens: budget, ..EngineConfig::default() });
            let mut arrivals = reqs.clone();
            arrivals.sort_by_key(|r| r.0);
            let mut done = Vec::new();
            for (id, &(at, p, o)) in arrivals.iter().enumerate() {
                let t = Timestamp::from_micros(at);
                e.handle_timeout(t);
                done.extend(std::iter::from_fn(|| e.poll_finished()));
                e.submit(t, id as u64, p, o).unwrap();
            }
            done.extend(run_to_end(&mut e));
            prop_assert_eq!(done.len(), arrivals.len());
            let mut ids: Vec<u64> = done.iter().map(|f| f.id).collect();
            ids.sort_unstable();
            prop_assert_eq!(ids, (0..arrivals.len() as u64).collect::<Vec<_>>());
            for f in &done {
                let (_, p, o) = arrivals[f.id as usize];
                prop_assert_eq!((f.prompt_tokens, f.completion_tokens), (p, o));
                prop_assert!(f.arrived <= f.first_token && f.first_token <= f.finished);
            }
            let s = e.stats();
            prop_assert_eq!(s.completion_tokens, arrivals.iter().map(|r| u64::from(r.2)).sum::<u64>());
            prop_assert_eq!(s.prompt_tokens, arrivals.iter().map(|r| u64::from(r.1)).sum::<u64>());
            prop_assert_eq!(e.in_flight(), 0);
            prop_assert_eq!(e.kv_reserved, 0);
        }
    }
}
