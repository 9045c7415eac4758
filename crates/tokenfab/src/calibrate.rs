//! `tokenfab calibrate`: measure a live OpenAI-compatible engine and write its engine
//! profile (docs/engine-profiles.md) and a fit report.
//!
//! For each point of a grid (requests in flight x prompt length, one output length), a
//! closed loop of clients keeps that many streaming completions running. Each streamed
//! token is timed as it arrives. After a warm-up, for the measurement time:
//! - the decode step time is the median gap between two tokens of one stream (steps that
//!   also prefilled a new request are longer; the median leaves them out);
//! - the throughput is the tokens that arrived per second;
//! - at the fewest requests in flight, the time to the first token against the prompt
//!   length gives the prefill cost per prompt token (the slope of a least-squares line;
//!   with one prompt length, that time less one decode step, per token).
//!
//! The profile's table is the decode step time against batch (the requests in flight) and
//! context (prompt plus half the output), with the prefill cost per token. The fit report
//! then predicts each point's throughput from the profile, as the simulator and the tuner
//! will (`ReplicaPerf::steady_state`), and gives the residual: how well the profile
//! describes what was measured. Energy is not measured here (no device counter is read):
//! the profile has no power figures and says so.

use anyhow::{Context, bail};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokenfab_core::profile::{EngineProfile, PROFILE_FORMAT, ProfileSource, Provenance};
use tokenfab_core::{AcceleratorId, ModelId};

#[derive(Args, Debug, Clone)]
pub struct CalibrateArgs {
    /// The engine's OpenAI-compatible base URL (it serves /v1/completions with streaming).
    #[arg(long)]
    pub url: String,
    /// The model name the engine serves (the `model` field of requests).
    #[arg(long)]
    pub served_model: String,
    /// The catalog model the profile describes (e.g. smollm2-135m).
    #[arg(long)]
    pub model: String,
    /// The catalog accelerator class it runs on (e.g. edge-cpu, h100-sxm).
    #[arg(long)]
    pub accelerator: String,
    /// Devices the engine spans.
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel: u32,
    /// Requests kept in flight at each grid point (the batch the engine runs).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub concurrency: Vec<u32>,
    /// Prompt lengths of the grid, in tokens (about: the engine's tokenizer decides; the
    /// profile records what it counted).
    #[arg(long, value_delimiter = ',', default_value = "16,128")]
    pub prompt_tokens: Vec<u32>,
    /// Mean output tokens of a request (each asks for 0.5x to 1.5x of it, spread evenly;
    /// the engine is asked to ignore end-of-sequence).
    #[arg(long, default_value_t = 64)]
    pub output_tokens: u32,
    /// Warm-up at each grid point before measuring, counted from when every request in
    /// flight has streamed its first token.
    #[arg(long, value_parser = crate::parse::duration, default_value = "1s")]
    pub warmup: Duration,
    /// Measurement time at each grid point.
    #[arg(long, value_parser = crate::parse::duration, default_value = "8s")]
    pub measure: Duration,
    /// The serving engine and its version, recorded in the profile (default: what the
    /// engine's /props or /version says, if it says).
    #[arg(long)]
    pub engine: Option<String>,
    /// The hardware, recorded in the profile (default: this machine's CPU model and core
    /// count from /proc/cpuinfo).
    #[arg(long)]
    pub hardware: Option<String>,
    /// Bearer token the engine requires, if any.
    #[arg(long, env = "TOKENFAB_ENGINE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Where the profile goes.
    #[arg(long, default_value = "profile.toml")]
    pub out: PathBuf,
    /// Where the fit report (JSON) goes (default: beside the profile, `<name>-fit.json`).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// What one grid point measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PointMeasure {
    pub concurrency: u32,
    /// Prompt tokens asked for, and the mean the engine counted.
    pub prompt_tokens_asked: u32,
    pub prompt_tokens: f64,
    pub output_tokens: u32,
    /// Median and mean gap between two tokens of one stream, seconds.
    pub step_s_median: f64,
    pub step_s_mean: f64,
    /// Output tokens per second over the measurement time.
    pub tokens_per_s: f64,
    /// Mean time to the first token, seconds.
    pub ttft_s: f64,
    /// Requests finished during the measurement, and token gaps measured.
    pub requests: u64,
    pub gaps: u64,
}

/// The fit report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FitReport {
    pub profile: String,
    pub url: String,
    pub points: Vec<FitPoint>,
    pub prefill_s_per_token: f64,
    /// Largest and mean absolute residual of throughput.
    pub max_abs_residual: f64,
    pub mean_abs_residual: f64,
    /// What was not measured.
    pub not_measured: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FitPoint {
    #[serde(flatten)]
    pub measured: PointMeasure,
    /// Throughput the profile predicts at this point, and (predicted - measured) /
    /// measured.
    pub predicted_tokens_per_s: f64,
    pub residual: f64,
}

pub async fn run(a: CalibrateArgs) -> anyhow::Result<()> {
    let (profile, report) = calibrate(&a).await?;
    let text = profile.to_toml();
    EngineProfile::from_toml(&text).context("the measured profile does not read back (a bug)")?;
    std::fs::write(&a.out, &text).with_context(|| format!("writing {}", a.out.display()))?;
    let report_path = a.report.clone().unwrap_or_else(|| {
        let stem = a.out.file_stem().and_then(|s| s.to_str()).unwrap_or("profile");
        a.out.with_file_name(format!("{stem}-fit.json"))
    });
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", report_path.display()))?;
    println!("{}", report_table(&report));
    println!(
        "wrote the profile to {} and the fit report to {}",
        a.out.display(),
        report_path.display()
    );
    Ok(())
}

/// Runs the grid and builds the profile and its fit report.
pub async fn calibrate(a: &CalibrateArgs) -> anyhow::Result<(EngineProfile, FitReport)> {
    let catalog = tokenfab_core::catalog::Catalog::builtin();
    let (model, accelerator) = (ModelId::new(&a.model), AcceleratorId::new(&a.accelerator));
    catalog.model(&model).context("--model")?;
    let acc = catalog.accelerator(&accelerator).context("--accelerator")?;
    let perf = tokenfab_core::perf::ReplicaPerf::new(&model, &accelerator, a.tensor_parallel.max(1))
        .context("--model on --accelerator")?;
    let mut concurrency = a.concurrency.clone();
    concurrency.sort_unstable();
    concurrency.dedup();
    let mut prompts = a.prompt_tokens.clone();
    prompts.sort_unstable();
    prompts.dedup();
    if concurrency.is_empty() || concurrency[0] == 0 {
        bail!("--concurrency: give request counts of at least 1, e.g. 1,2,4,8");
    }
    if prompts.is_empty() || prompts[0] == 0 {
        bail!("--prompt-tokens: give prompt lengths of at least 1 token, e.g. 32,256");
    }
    if a.output_tokens < 16 {
        bail!(
            "--output-tokens: {} is too few to time decode steps; give 16 or more",
            a.output_tokens
        );
    }
    if a.measure < Duration::from_millis(500) {
        bail!("--measure: give at least 500ms per point");
    }
    let base = a.url.trim_end_matches('/').to_string();
    // A fresh connection per request: some engines (llama-server) close idle keep-alive
    // connections, and a reused one fails mid-grid.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .pool_max_idle_per_host(0)
        .build()
        .context("building the HTTP client")?;
    // One request first: a wrong URL or model name is reported before the grid starts.
    let probe = Stream::run(&http, &base, a, 0, 8, 8, None).await.with_context(|| {
        format!(
            "the engine at {base} did not stream a completion of model '{}' (check --url and --served-model)",
            a.served_model
        )
    })?;
    if probe.token_times.is_empty() {
        bail!("the engine at {base} answered without streaming any token");
    }
    let points_total = (concurrency.len() * prompts.len()) as u64;
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(points_total);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} points, {elapsed} {msg}")
                .expect("a valid template"),
        );
        b
    };
    let mut measured = Vec::new();
    let mut seq = 1u64;
    for &p in &prompts {
        for &c in &concurrency {
            bar.set_message(format!("{c} in flight, prompt {p}"));
            let m = measure_point(&http, &base, a, c, p, &mut seq).await?;
            bar.println(format!(
                "{c:>4} in flight, prompt {:>5.0}: {:>8.1} tokens/s, step {:.2} ms (median), first token {:.0} ms",
                m.prompt_tokens,
                m.tokens_per_s,
                m.step_s_median * 1e3,
                m.ttft_s * 1e3
            ));
            measured.push(m);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    // Prefill: time to first token at one request in flight against prompt length.
    let singles: Vec<&PointMeasure> = measured.iter().filter(|m| m.concurrency == concurrency[0]).collect();
    let prefill_s_per_token = prefill_slope(&singles);

    // The table: contexts from the prompts the engine counted.
    let mut contexts: Vec<u32> = Vec::new();
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for &p in &prompts {
        let of_p: Vec<&PointMeasure> = measured.iter().filter(|m| m.prompt_tokens_asked == p).collect();
        let prompt = of_p.iter().map(|m| m.prompt_tokens).sum::<f64>() / of_p.len() as f64;
        let context = (prompt + f64::from(a.output_tokens) / 2.0).round() as u32;
        if contexts.last().is_some_and(|&c| c >= context) {
            // Two prompt lengths the tokenizer counted alike: keep the first.
            continue;
        }
        contexts.push(context);
        rows.push(
            concurrency
                .iter()
                .map(|&c| {
                    of_p.iter()
                        .find(|m| m.concurrency == c)
                        .map_or(-1.0, |m| if m.step_s_median > 0.0 { m.step_s_median } else { -1.0 })
                })
                .collect(),
        );
    }
    let engine = match &a.engine {
        Some(e) => e.clone(),
        None => engine_version(&http, &base).await,
    };
    let hardware = a.hardware.clone().unwrap_or_else(cpu_description);
    let profile = EngineProfile {
        format: PROFILE_FORMAT,
        model: a.model.clone(),
        accelerator: a.accelerator.clone(),
        tensor_parallel: a.tensor_parallel.max(1),
        batches: concurrency.clone(),
        contexts,
        power_limits_w: vec![acc.max_power_w],
        step_s: vec![rows],
        power_w: None,
        prefill_s_per_token: Some(prefill_s_per_token),
        provenance: Provenance {
            source: ProfileSource::Measured,
            tool: format!("tokenfab calibrate {}", env!("CARGO_PKG_VERSION")),
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            engine,
            hardware,
            notes: format!(
                "{} via {}: {} s per point after {} s warm-up, {} output tokens; power and energy not measured \
                 (no device counter read), power limit not varied",
                a.served_model,
                base,
                a.measure.as_secs_f64(),
                a.warmup.as_secs_f64(),
                a.output_tokens
            ),
        },
    };
    profile.check().context("the measured profile is not valid")?;

    // The fit: each point's throughput as the profile predicts it.
    let profiles = tokenfab_core::profile::Profiles::new(std::slice::from_ref(&profile))?;
    let believed = tokenfab_core::perf::ReplicaPerf::believed(&model, &accelerator, perf.devices(), &profiles)?;
    let points: Vec<FitPoint> = measured
        .into_iter()
        .map(|m| {
            let predicted = believed
                .steady_state(
                    m.concurrency,
                    m.prompt_tokens.round() as u32,
                    m.output_tokens,
                    acc.max_power_w,
                )
                .output_tokens_per_s;
            let residual = if m.tokens_per_s > 0.0 {
                predicted / m.tokens_per_s - 1.0
            } else {
                f64::NAN
            };
            FitPoint {
                measured: m,
                predicted_tokens_per_s: predicted,
                residual,
            }
        })
        .collect();
    let residuals: Vec<f64> = points
        .iter()
        .map(|p| p.residual.abs())
        .filter(|r| r.is_finite())
        .collect();
    let report = FitReport {
        profile: a.out.display().to_string(),
        url: base,
        prefill_s_per_token,
        max_abs_residual: residuals.iter().copied().fold(0.0, f64::max),
        mean_abs_residual: residuals.iter().sum::<f64>() / residuals.len().max(1) as f64,
        points,
        not_measured: vec![
            "device power and energy (no energy counter was read)".into(),
            "power limits (not varied)".into(),
            format!("output lengths other than {}", a.output_tokens),
            "prefix-cache and mixture-of-experts terms".into(),
        ],
    };
    Ok((profile, report))
}

/// Least-squares slope of time to first token against prompt tokens (seconds per prompt
/// token); with one prompt length, its time to first token less one decode step, per
/// token.
fn prefill_slope(points: &[&PointMeasure]) -> f64 {
    let n = points.len() as f64;
    if points.len() >= 2 {
        let mx = points.iter().map(|m| m.prompt_tokens).sum::<f64>() / n;
        let my = points.iter().map(|m| m.ttft_s).sum::<f64>() / n;
        let sxx: f64 = points.iter().map(|m| (m.prompt_tokens - mx).powi(2)).sum();
        let sxy: f64 = points.iter().map(|m| (m.prompt_tokens - mx) * (m.ttft_s - my)).sum();
        if sxx > 0.0 && sxy > 0.0 {
            return sxy / sxx;
        }
    }
    points.first().map_or(0.0, |m| {
        (m.ttft_s - m.step_s_median).max(0.0) / m.prompt_tokens.max(1.0)
    })
}

/// Keeps `concurrency` streams running with prompts of about `prompt` tokens, and measures
/// (see the module docs).
async fn measure_point(
    http: &reqwest::Client,
    base: &str,
    a: &CalibrateArgs,
    concurrency: u32,
    prompt: u32,
    seq: &mut u64,
) -> anyhow::Result<PointMeasure> {
    // The measurement starts `warmup` after every client's first request streams its first
    // token (every request in flight has been prefilled once), and lasts `measure`.
    let decoding = Arc::new(AtomicU32::new(0));
    let window: Arc<OnceLock<(Instant, Instant)>> = Arc::new(OnceLock::new());
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..concurrency {
        let (http, base, a) = (http.clone(), base.to_string(), a.clone());
        let (decoding, window) = (decoding.clone(), window.clone());
        let first = *seq + u64::from(client) * 1_000_000;
        tasks.spawn(async move {
            let mut done = Vec::new();
            let mut n = first;
            let mut signal = Some(decoding);
            let mut failures = 0;
            while window.get().is_none_or(|(_, until)| Instant::now() < *until) {
                // Output lengths spread over 0.5x to 1.5x the asked length (the same mean),
                // so that the clients' requests do not start and end in step: an engine
                // in steady state prefills one request now and then, not all at once.
                let output = spread(a.output_tokens, n);
                n += 1;
                match Stream::run(&http, &base, &a, n - 1, prompt, output, signal.clone()).await {
                    Ok(s) => {
                        signal = None;
                        done.push(s);
                    }
                    // A request that fails now and then (a connection reset) is tried
                    // again; a fourth failure at this point ends the calibration.
                    Err(e) if failures < 3 => {
                        failures += 1;
                        eprintln!("a request failed ({e:#}); trying again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e.context("the fourth failed request at this grid point")),
                }
            }
            anyhow::Ok(done)
        });
    }
    *seq += u64::from(concurrency) * 1_000_000;
    let started = Instant::now();
    while decoding.load(Ordering::SeqCst) < concurrency {
        if started.elapsed() > Duration::from_secs(300) {
            tasks.abort_all();
            bail!(
                "at {concurrency} in flight with {prompt}-token prompts, not every request streamed a token within 5 minutes"
            );
        }
        if tasks.try_join_next().is_some_and(|r| !matches!(r, Ok(Ok(_)))) {
            tasks.abort_all();
            bail!("a client failed at {concurrency} in flight with {prompt}-token prompts");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let from = Instant::now() + a.warmup;
    let until = from + a.measure;
    window.set((from, until)).expect("set once");
    let mut streams = Vec::new();
    while let Some(r) = tasks.join_next().await {
        streams.extend(r.context("a client task failed")??);
    }
    let mut gaps = Vec::new();
    let mut tokens = 0u64;
    let (mut ttft_sum, mut ttft_n, mut prompt_sum, mut requests) = (0.0, 0u64, 0.0, 0u64);
    for s in &streams {
        tokens += s.token_times.iter().filter(|t| **t >= from && **t < until).count() as u64;
        for w in s.token_times.windows(2) {
            if w[0] >= from && w[1] < until {
                gaps.push(w[1].duration_since(w[0]).as_secs_f64());
            }
        }
        if s.sent >= from
            && s.sent < until
            && let Some(first) = s.token_times.first()
        {
            ttft_sum += first.duration_since(s.sent).as_secs_f64();
            ttft_n += 1;
        }
        if s.done >= from && s.done < until {
            requests += 1;
        }
        prompt_sum += s.prompt_tokens as f64;
    }
    if gaps.is_empty() || tokens == 0 {
        bail!(
            "at {concurrency} in flight with {prompt}-token prompts, no token arrived during the {} s measurement; \
             give a longer --measure",
            a.measure.as_secs_f64()
        );
    }
    gaps.sort_by(f64::total_cmp);
    let median = gaps[gaps.len() / 2];
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    Ok(PointMeasure {
        concurrency,
        prompt_tokens_asked: prompt,
        prompt_tokens: prompt_sum / streams.len().max(1) as f64,
        output_tokens: a.output_tokens,
        step_s_median: median,
        step_s_mean: mean,
        tokens_per_s: tokens as f64 / a.measure.as_secs_f64(),
        ttft_s: if ttft_n > 0 { ttft_sum / ttft_n as f64 } else { f64::NAN },
        requests,
        gaps: gaps.len() as u64,
    })
}

/// Request `n`'s output length: `mean` spread evenly over 0.5x to 1.5x by a hash of `n`.
fn spread(mean: u32, n: u64) -> u32 {
    let u = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as f64 / f64::from(1u32 << 24);
    ((f64::from(mean) * (0.5 + u)).round() as u32).max(1)
}

/// One streamed completion, timed.
struct Stream {
    sent: Instant,
    token_times: Vec<Instant>,
    done: Instant,
    prompt_tokens: u64,
}

impl Stream {
    async fn run(
        http: &reqwest::Client,
        base: &str,
        a: &CalibrateArgs,
        n: u64,
        prompt: u32,
        output: u32,
        first_token: Option<Arc<AtomicU32>>,
    ) -> anyhow::Result<Stream> {
        let mut first_token = first_token;
        // A prefix of its own keeps the engine's prefix cache from skipping the prefill.
        let mut text = format!("r{n}");
        for _ in 1..prompt {
            text.push_str(" hello");
        }
        let body = serde_json::json!({
            "model": a.served_model,
            "prompt": text,
            "max_tokens": output,
            "stream": true,
            "stream_options": {"include_usage": true},
            "ignore_eos": true,
            "temperature": 0.0,
        });
        let mut req = http
            .post(format!("{base}/v1/completions"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(k) = &a.api_key {
            req = req.bearer_auth(k);
        }
        let sent = Instant::now();
        let mut resp = req
            .send()
            .await
            .with_context(|| format!("POST {base}/v1/completions"))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            bail!(
                "the engine answered {status}: {}",
                text.chars().take(300).collect::<String>()
            );
        }
        let mut buf = Vec::new();
        let mut token_times = Vec::new();
        let mut prompt_tokens = 0;
        while let Some(chunk) = resp.chunk().await.context("reading the stream")? {
            let at = Instant::now();
            buf.extend_from_slice(chunk.as_ref());
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..end + 2).collect();
                for line in String::from_utf8_lossy(&event).lines() {
                    let Some(data) = line.strip_prefix("data:") else {
                        continue;
                    };
                    let data = data.trim();
                    if data == "[DONE]" || data.is_empty() {
                        continue;
                    }
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                        continue;
                    };
                    // A chunk that carries text carries a token (the last one may also
                    // carry the finish reason).
                    let text = v["choices"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|c| c["text"].as_str().is_some_and(|t| !t.is_empty())));
                    if text {
                        token_times.push(at);
                        if let Some(c) = first_token.take() {
                            c.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    if let Some(p) = v["usage"]["prompt_tokens"].as_u64() {
                        prompt_tokens = p;
                    }
                }
            }
        }
        Ok(Stream {
            sent,
            token_times,
            done: Instant::now(),
            prompt_tokens,
        })
    }
}

/// What the engine says it is: llama.cpp's /props `build_info`, or "unknown".
async fn engine_version(http: &reqwest::Client, base: &str) -> String {
    if let Ok(r) = http
        .get(format!("{base}/props"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        && let Ok(text) = r.text().await
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        && let Some(b) = v["build_info"].as_str()
    {
        return format!("llama.cpp {b}");
    }
    "unknown (give --engine)".into()
}

/// This machine's CPU, e.g. "AMD EPYC 7B13, 2 cores".
fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = info
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .map_or("unknown CPU", str::trim)
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{name}, {cores} cores")
}

/// The fit report as a table.
pub fn report_table(r: &FitReport) -> String {
    use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "in flight",
        "prompt",
        "step (median)",
        "measured tok/s",
        "profile tok/s",
        "residual",
    ]);
    let right = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
    for p in &r.points {
        let m = &p.measured;
        t.add_row([
            right(m.concurrency.to_string()),
            right(format!("{:.0}", m.prompt_tokens)),
            right(format!("{:.2} ms", m.step_s_median * 1e3)),
            right(format!("{:.1}", m.tokens_per_s)),
            right(format!("{:.1}", p.predicted_tokens_per_s)),
            right(format!("{:+.1}%", p.residual * 100.0)),
        ]);
    }
    format!(
        "{t}\nprefill: {:.3} ms per prompt token; throughput residual: mean {:.1}%, max {:.1}%\nnot measured: {}",
        r.prefill_s_per_token * 1e3,
        r.mean_abs_residual * 100.0,
        r.max_abs_residual * 100.0,
        r.not_measured.join("; ")
    )
}
