//! Batch arrivals, generated lazily: a batch's requests are drawn only when it arrives,
//! so a day-long run on a large fleet never holds the whole workload in memory.
//!
//! Every tenant has its own random stream, seeded from the scenario seed and the
//! tenant's position, so a tenant's batches do not change when another tenant is added
//! or when the cluster (and so the order of events) changes.

use crate::scenario::{Arrivals, Dist, Scenario, ScenarioError, TraceFormat};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, LogNormal};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;
use std::time::Duration;
use tokenfab_core::Timestamp;

/// One request: prompt and output tokens, and the prompt prefix it shares with other
/// requests (its tokens are part of `prompt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestShape {
    pub prompt: u32,
    pub output: u32,
    pub prefix: Option<tokenfab_core::engine::Prefix>,
}

/// A batch arriving.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchArrival {
    pub at: Timestamp,
    pub tenant: usize,
    pub requests: Vec<RequestShape>,
}

#[derive(Clone)]
enum Source {
    Poisson {
        per_s: f64,
    },
    Diurnal {
        mean_per_s: f64,
        amplitude: f64,
        peak_hour: f64,
    },
    /// Pre-grouped trace batches (arrival, requests), in time order.
    Trace {
        batches: Vec<(Timestamp, Vec<RequestShape>)>,
        next: usize,
    },
}

#[derive(Clone)]
struct Stream {
    rng: ChaCha8Rng,
    source: Source,
    batch_size: Dist,
    prompt: Dist,
    output: Dist,
    tenant: usize,
    shared_prefix: Option<crate::scenario::SharedPrefix>,
    batches: u64,
}

/// All tenants' arrivals, merged in time order.
#[derive(Clone)]
pub struct Workload {
    streams: Vec<Stream>,
    /// (next arrival, tenant) of every tenant that has one before `end`.
    next: BinaryHeap<Reverse<(Timestamp, usize)>>,
    end: Timestamp,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("tenants", &self.streams.len())
            .finish()
    }
}

fn draw(d: &Dist, rng: &mut ChaCha8Rng) -> u32 {
    match *d {
        Dist::Fixed { value } => value,
        Dist::Uniform { min, max } => rng.random_range(min..=max),
        Dist::Lognormal { mean, sigma, min, max } => {
            // The mean of a log-normal is exp(mu + sigma^2 / 2).
            let mu = mean.ln() - sigma * sigma / 2.0;
            let x: f64 = LogNormal::new(mu, sigma).map_or(mean, |l| l.sample(rng));
            (x.round() as u32).clamp(min, max)
        }
    }
}

fn exp(rate_per_s: f64, rng: &mut ChaCha8Rng) -> f64 {
    Exp::new(rate_per_s).map_or(f64::INFINITY, |e| e.sample(rng))
}

impl Stream {
    /// The next arrival strictly after `after`.
    fn next_after(&mut self, after: Timestamp) -> Option<Timestamp> {
        match &mut self.source {
            Source::Poisson { per_s } => Some(Timestamp::from_secs_f64(
                after.as_secs_f64() + exp(*per_s, &mut self.rng),
            )),
            Source::Diurnal {
                mean_per_s,
                amplitude,
                peak_hour,
            } => {
                // Thinning: candidates at the peak rate, kept with probability rate(t) / peak.
                let peak = *mean_per_s * (1.0 + *amplitude);
                let mut t = after.as_secs_f64();
                loop {
                    t += exp(peak, &mut self.rng);
                    let hour = (t / 3600.0) % 24.0;
                    let phase = (hour - *peak_hour) / 24.0 * std::f64::consts::TAU;
                    let rate = *mean_per_s * (1.0 + *amplitude * phase.cos());
                    if self.rng.random::<f64>() * peak <= rate {
                        return Some(Timestamp::from_secs_f64(t));
                    }
                }
            }
            Source::Trace { batches, next } => batches.get(*next).map(|b| b.0),
        }
    }

    fn batch(&mut self) -> Vec<RequestShape> {
        let mut shapes = if let Source::Trace { batches, next } = &mut self.source {
            let b = std::mem::take(&mut batches[*next].1);
            *next += 1;
            b
        } else {
            let n = draw(&self.batch_size, &mut self.rng);
            (0..n)
                .map(|_| RequestShape {
                    prompt: draw(&self.prompt, &mut self.rng),
                    output: draw(&self.output, &mut self.rng),
                    prefix: None,
                })
                .collect()
        };
        self.batches += 1;
        if let Some(sp) = &self.shared_prefix
            && sp.tokens > 0
        {
            for (j, s) in shapes.iter_mut().enumerate() {
                let group = if sp.requests == 0 {
                    0
                } else {
                    j as u64 / u64::from(sp.requests)
                };
                s.prompt = s.prompt.saturating_add(sp.tokens);
                s.prefix = Some(tokenfab_core::engine::Prefix {
                    key: mix((self.tenant as u64) << 48 ^ self.batches << 24 ^ group),
                    tokens: sp.tokens,
                });
            }
        }
        shapes
    }
}

/// SplitMix64's finalizer: distinct inputs give well-spread prefix keys.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Workload {
    /// The workload of `scenario` with `seed`; trace files are read relative to `base`.
    pub fn new(scenario: &Scenario, base: &Path, seed: u64) -> Result<Workload, ScenarioError> {
        let end = Timestamp::ZERO.saturating_add(scenario.duration);
        let mut streams = Vec::new();
        let mut next = BinaryHeap::new();
        for (i, t) in scenario.workload.tenants.iter().enumerate() {
            // Seeds differ per tenant; the +1 keeps tenant 0 of seed 0 off the all-zero seed.
            let rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64 + 1));
            let source = match &t.arrivals {
                Arrivals::Poisson { batches_per_hour } => Source::Poisson {
                    per_s: batches_per_hour / 3600.0,
                },
                Arrivals::Diurnal {
                    mean_batches_per_hour,
                    peak_to_trough,
                    peak_hour,
                } => Source::Diurnal {
                    mean_per_s: mean_batches_per_hour / 3600.0,
                    amplitude: (peak_to_trough - 1.0) / (peak_to_trough + 1.0),
                    peak_hour: *peak_hour,
                },
                Arrivals::Trace {
                    file,
                    format,
                    batch_every,
                    time_scale,
                } => {
                    let path = base.join(file);
                    let requests = read_trace(&path, *format).map_err(|message| ScenarioError {
                        file: path.display().to_string(),
                        path: format!("workload.tenants[{i}].arrivals.file"),
                        message,
                    })?;
                    let every = batch_every.unwrap_or(Duration::from_secs(60));
                    Source::Trace {
                        batches: group(requests, *time_scale, every, end),
                        next: 0,
                    }
                }
            };
            let mut stream = Stream {
                rng,
                source,
                batch_size: t.batch_size.clone(),
                prompt: t.prompt_tokens.clone(),
                output: t.output_tokens.clone(),
                tenant: i,
                shared_prefix: t.shared_prefix.clone(),
                batches: 0,
            };
            let first = stream.next_after(Timestamp::ZERO);
            if let Some(at) = first.filter(|&at| at < end) {
                next.push(Reverse((at, i)));
            }
            streams.push(stream);
        }
        Ok(Workload { streams, next, end })
    }

    /// When the next batch arrives.
    pub fn peek(&self) -> Option<Timestamp> {
        self.next.peek().map(|Reverse((t, _))| *t)
    }

    /// The next batch, drawing its requests now.
    pub fn pop(&mut self) -> Option<BatchArrival> {
        let Reverse((at, tenant)) = self.next.pop()?;
        let s = &mut self.streams[tenant];
        let requests = s.batch();
        if let Some(n) = s.next_after(at).filter(|&n| n < self.end) {
            self.next.push(Reverse((n, tenant)));
        }
        Some(BatchArrival { at, tenant, requests })
    }
}

/// Groups trace requests (trace seconds, shape) into one batch per `every` of scaled
/// time, each arriving at the end of its window; requests at or after `end` are dropped.
fn group(
    mut requests: Vec<(f64, RequestShape)>,
    scale: f64,
    every: Duration,
    end: Timestamp,
) -> Vec<(Timestamp, Vec<RequestShape>)> {
    requests.sort_by(|a, b| a.0.total_cmp(&b.0));
    let t0 = requests.first().map_or(0.0, |r| r.0);
    let every_s = every.as_secs_f64();
    let mut out: Vec<(Timestamp, Vec<RequestShape>)> = Vec::new();
    for (t, shape) in requests {
        let scaled = (t - t0) * scale;
        if Timestamp::from_secs_f64(scaled) >= end {
            break;
        }
        let window = (scaled / every_s).floor();
        let at = Timestamp::from_secs_f64((window + 1.0) * every_s);
        match out.last_mut() {
            Some((last, reqs)) if *last == at => reqs.push(shape),
            _ => out.push((at, vec![shape])),
        }
    }
    out
}

fn read_trace(path: &Path, format: TraceFormat) -> Result<Vec<(f64, RequestShape)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the trace: {e}"))?;
    match format {
        TraceFormat::Azure => parse_azure(&text),
        TraceFormat::Jsonl => parse_jsonl(&text),
    }
}

/// The Azure LLM inference trace: `TIMESTAMP,ContextTokens,GeneratedTokens` with
/// timestamps like `2023-11-16 18:15:46.6805900` (or plain seconds).
pub fn parse_azure(text: &str) -> Result<Vec<(f64, RequestShape)>, String> {
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, h)| h.trim()).unwrap_or("");
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let find = |name: &str| cols.iter().position(|c| c.eq_ignore_ascii_case(name));
    let (Some(ti), Some(ci), Some(gi)) = (find("TIMESTAMP"), find("ContextTokens"), find("GeneratedTokens")) else {
        return Err(format!(
            "line 1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens, found '{header}'"
        ));
    };
    let mut out = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let field = |k: usize| {
            f.get(k)
                .copied()
                .ok_or_else(|| format!("line {}: expected {} fields, found {}", i + 1, cols.len(), f.len()))
        };
        let t = parse_time(field(ti)?).ok_or_else(|| format!("line {}: '{}' is not a timestamp", i + 1, f[ti]))?;
        let num = |k: usize| -> Result<u32, String> {
            let v = field(k)?;
            v.parse::<u32>()
                .map_err(|_| format!("line {}: '{v}' is not a token count", i + 1))
        };
        out.push((
            t,
            RequestShape {
                prompt: num(ci)?.max(1),
                output: num(gi)?.max(1),
                prefix: None,
            },
        ));
    }
    if out.is_empty() {
        return Err("the trace has no request".into());
    }
    Ok(out)
}

/// Seconds of a `YYYY-MM-DD HH:MM:SS[.fraction]` timestamp (UTC), or of a plain number.
fn parse_time(s: &str) -> Option<f64> {
    if let Ok(x) = s.parse::<f64>() {
        return Some(x);
    }
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.trim_end_matches('Z').split(':');
    let (h, min, sec) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from civil (proleptic Gregorian), Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// tokenfab's trace JSONL: `{"t_s": 12.5, "prompt_tokens": 300, "output_tokens": 120}` per line.
pub fn parse_jsonl(text: &str) -> Result<Vec<(f64, RequestShape)>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        t_s: f64,
        prompt_tokens: u32,
        output_tokens: u32,
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line).map_err(|e| {
            format!(
                "line {}: {e}; expected {{\"t_s\": 12.5, \"prompt_tokens\": 300, \"output_tokens\": 120}}",
                i + 1
            )
        })?;
        if !l.t_s.is_finite() || l.t_s < 0.0 {
            return Err(format!("line {}: t_s must be a time >= 0", i + 1));
        }
        out.push((
            l.t_s,
            RequestShape {
                prompt: l.prompt_tokens.max(1),
                output: l.output_tokens.max(1),
                prefix: None,
            },
        ));
    }
    if out.is_empty() {
        return Err("the trace has no request".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(arrivals: &str, duration: &str) -> Scenario {
        let text = format!(
            "name: t\ndescription: d\nduration: {duration}\npools: [{{name: p, accelerator: h100-sxm, nodes: 1, devices_per_node: 8}}]\ndeployments: [{{pool: p, model: llama-3.1-8b}}]\nworkload:\n  tenants:\n    - {{name: a, model: llama-3.1-8b, completion_window: 1h, arrivals: {arrivals}, batch_size: {{kind: fixed, value: 3}}}}\n"
        );
        Scenario::parse(&text, "t.yaml").unwrap()
    }

    fn all(mut w: Workload) -> Vec<BatchArrival> {
        std::iter::from_fn(|| w.pop()).collect()
    }

    #[test]
    fn poisson_arrivals_have_the_asked_rate_and_repeat_with_the_seed() {
        let s = scenario("{kind: poisson, batches_per_hour: 3600}", "10h");
        let a = all(Workload::new(&s, Path::new("."), 7).unwrap());
        let rate = a.len() as f64 / 36_000.0;
        assert!((0.97..1.03).contains(&rate), "{rate} batches/s");
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at), "time order");
        assert!(a.iter().all(|b| b.requests.len() == 3));
        let again = all(Workload::new(&s, Path::new("."), 7).unwrap());
        assert_eq!(a, again, "same seed, same workload");
        let other = all(Workload::new(&s, Path::new("."), 8).unwrap());
        assert_ne!(a, other);
    }

    #[test]
    fn diurnal_arrivals_peak_at_the_peak_hour() {
        let s = scenario(
            "{kind: diurnal, mean_batches_per_hour: 600, peak_to_trough: 4, peak_hour: 14}",
            "1d",
        );
        let a = all(Workload::new(&s, Path::new("."), 1).unwrap());
        let per_hour = |h: u64| a.iter().filter(|b| b.at.as_micros() / 3_600_000_000 == h).count() as f64;
        let ratio = per_hour(14) / per_hour(2);
        assert!((3.0..5.3).contains(&ratio), "peak/trough {ratio}");
        let mean = a.len() as f64 / 24.0;
        assert!((570.0..630.0).contains(&mean), "{mean} per hour");
    }

    #[test]
    fn lognormal_draws_have_the_asked_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let d = Dist::Lognormal {
            mean: 300.0,
            sigma: 0.7,
            min: 1,
            max: 1_000_000,
        };
        let n = 200_000;
        let mean = (0..n).map(|_| f64::from(draw(&d, &mut rng))).sum::<f64>() / n as f64;
        assert!((mean / 300.0 - 1.0).abs() < 0.02, "{mean}");
    }

    #[test]
    fn azure_traces_parse_and_group_into_batches() {
        let csv = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.0000000,396,109\n2023-11-16 18:17:01.5000000,879,0\n";
        let r = parse_azure(csv).unwrap();
        assert_eq!(r.len(), 3);
        assert!((r[1].0 - r[0].0 - 3.31941).abs() < 1e-4);
        assert_eq!(
            r[2].1,
            RequestShape {
                prompt: 879,
                output: 1,
                prefix: None
            },
            "zero outputs count as one token"
        );
        let g = group(r, 1.0, Duration::from_secs(60), Timestamp::from_secs_f64(1e9));
        assert_eq!(
            g.iter()
                .map(|(t, b)| (t.as_micros() / 1_000_000, b.len()))
                .collect::<Vec<_>>(),
            [(60, 2), (120, 1)]
        );
        let e = parse_azure("time,a,b\n1,2,3").unwrap_err();
        assert!(
            e.starts_with("line 1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens"),
            "{e}"
        );
        let e = parse_azure("TIMESTAMP,ContextTokens,GeneratedTokens\nsoon,1,2").unwrap_err();
        assert_eq!(e, "line 2: 'soon' is not a timestamp");
    }

    #[test]
    fn jsonl_traces_parse_with_line_numbers_in_errors() {
        let r = parse_jsonl("{\"t_s\": 0, \"prompt_tokens\": 5, \"output_tokens\": 7}\n\n{\"t_s\": 2.5, \"prompt_tokens\": 1, \"output_tokens\": 2}\n").unwrap();
        assert_eq!(r.len(), 2);
        let e = parse_jsonl("{\"t_s\": 0}\n").unwrap_err();
        assert!(e.starts_with("line 1: missing field `prompt_tokens`"), "{e}");
    }
}
