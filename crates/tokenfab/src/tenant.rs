//! The tenant CLI: `submit`, `batches`, `results`, and the progress bar and summary
//! table they share with `demo`.

use crate::{Connection, parse};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use tokenfab_proto::v1 as pb;
use tokenfab_proto::v1::batch_service_client::BatchServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Client = BatchServiceClient<InterceptedService<Channel, Bearer>>;

/// Connects to the control plane as a tenant.
pub async fn connect(conn: &Connection) -> anyhow::Result<Client> {
    let urls: Vec<&str> = conn
        .control
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        bail!("--control is empty: give the control plane's gRPC URL");
    }
    // Several URLs: the replicas of a replicated control plane, of which only the elected
    // one listens. The first that accepts the connection is it.
    let mut failures = Vec::new();
    let mut channel = None;
    for url in &urls {
        let mut endpoint =
            Channel::from_shared(url.to_string()).with_context(|| format!("--control {url} is not a valid URL"))?;
        if url.starts_with("https://") {
            let tls = tokenfab_identity::tls::grpc_client(conn.tls_ca.as_deref(), None)?;
            endpoint = endpoint
                .tls_config(tls)
                .context("TLS for the control plane connection")?;
        } else if conn.tls_ca.is_some() {
            bail!("--tls-ca is given but --control {url} is not https://");
        }
        match endpoint.connect_timeout(Duration::from_secs(5)).connect().await {
            Ok(c) => {
                channel = Some(c);
                break;
            }
            Err(e) => failures.push(format!("{url}: {e}")),
        }
    }
    let Some(channel) = channel else {
        bail!(
            "cannot reach the control plane ({}); is `tokenfab server` running there?",
            failures.join("; ")
        );
    };
    let token = format!("Bearer {}", conn.token.expose())
        .parse()
        .context("the token is not valid ASCII")?;
    Ok(BatchServiceClient::with_interceptor(channel, Bearer(token))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// A gRPC error as the user should read it.
pub fn rpc(s: Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    conn: Connection,
    /// The input file: OpenAI Batch JSONL, one request per line.
    file: PathBuf,
    /// Model every request runs on.
    #[arg(long)]
    model: String,
    /// Completion window: the batch must finish within this time (e.g. 24h, 90m).
    #[arg(long, default_value = "24h", value_parser = parse::duration)]
    window: Duration,
    /// SLA class (default: the server's default class).
    #[arg(long, default_value = "")]
    sla_class: String,
    /// Refuse the whole batch if any line is invalid (default: invalid lines fail alone).
    #[arg(long)]
    strict: bool,
    /// If the cluster cannot promise the completion window (it refuses such batches and
    /// says when it could finish), accept the batch as best-effort instead.
    #[arg(long)]
    best_effort_if_late: bool,
    /// Label stored with the batch, KEY=VALUE (repeatable).
    #[arg(long = "meta", value_parser = parse::key_value)]
    metadata: Vec<(String, String)>,
    /// Show a progress bar until the batch ends, then a summary.
    #[arg(long)]
    watch: bool,
}

/// Files above this go up as a stream of chunks.
const INLINE_MAX: usize = 1 << 20;

pub async fn create(
    client: &mut Client,
    options: pb::BatchOptions,
    input: Vec<u8>,
) -> Result<pb::CreateBatchResponse, Status> {
    if input.len() <= INLINE_MAX {
        return client
            .create_batch(pb::CreateBatchRequest {
                options: Some(options),
                input_jsonl: input.into(),
            })
            .await
            .map(|r| r.into_inner());
    }
    let mut chunks = vec![pb::UploadBatchChunk {
        chunk: Some(pb::upload_batch_chunk::Chunk::Options(options)),
    }];
    chunks.extend(input.chunks(INLINE_MAX).map(|c| pb::UploadBatchChunk {
        chunk: Some(pb::upload_batch_chunk::Chunk::Data(c.to_vec().into())),
    }));
    client
        .upload_batch(tokio_stream_iter(chunks))
        .await
        .map(|r| r.into_inner())
}

fn tokio_stream_iter<T: Send + 'static>(
    items: Vec<T>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> + Send + 'static {
    tonic::codegen::tokio_stream::iter(items)
}

pub fn print_created(resp: &pb::CreateBatchResponse) {
    let Some(b) = &resp.batch else { return };
    let c = b.request_counts.unwrap_or_default();
    println!(
        "{}  {}  {} requests ({} invalid lines)",
        b.id,
        status_name(b.status),
        c.total - c.invalid,
        c.invalid
    );
    for e in &resp.line_errors {
        println!("  {}: {}", e.code, e.message);
    }
    if c.invalid as usize > resp.line_errors.len() {
        println!(
            "  ... {} more; see `tokenfab results {} --errors FILE`",
            c.invalid as usize - resp.line_errors.len(),
            b.id
        );
    }
}

pub async fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    let input = std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let mut client = connect(&a.conn).await?;
    let options = pb::BatchOptions {
        model: a.model,
        completion_window_seconds: a.window.as_secs(),
        sla_class: a.sla_class,
        metadata: a.metadata.into_iter().collect(),
        strict: a.strict,
        best_effort_if_late: a.best_effort_if_late,
        endpoint: String::new(),
    };
    let resp = create(&mut client, options, input).await.map_err(rpc)?;
    print_created(&resp);
    if a.watch {
        let id = resp.batch.map(|b| b.id).unwrap_or_default();
        let last = watch(&mut client, &id, 1.0).await?;
        print_summary(&last, 1.0, None);
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum BatchesCommand {
    /// List your batches, newest first.
    List {
        #[command(flatten)]
        conn: Connection,
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show one batch.
    Get {
        #[command(flatten)]
        conn: Connection,
        id: String,
    },
    /// Cancel a batch (running requests finish; the rest end as batch_cancelled).
    Cancel {
        #[command(flatten)]
        conn: Connection,
        id: String,
    },
    /// Show a progress bar until the batch ends, then a summary.
    Watch {
        #[command(flatten)]
        conn: Connection,
        id: String,
    },
    /// Delete a finished batch now: its results and errors go (its usage stays in
    /// `tokenfab usage`). Finished batches are deleted anyway when the cluster's
    /// retention ends; an unfinished batch must be cancelled first.
    Delete {
        #[command(flatten)]
        conn: Connection,
        id: String,
    },
}

pub async fn batches(c: BatchesCommand) -> anyhow::Result<()> {
    match c {
        BatchesCommand::List { conn, limit } => {
            let mut client = connect(&conn).await?;
            let r = client
                .list_batches(pb::ListBatchesRequest {
                    limit,
                    before: String::new(),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED).set_header([
                "ID",
                "STATUS",
                "MODEL",
                "DONE",
                "INVALID",
                "OUTPUT TOKENS",
                "CREATED",
            ]);
            for b in &r.batches {
                let c = b.request_counts.unwrap_or_default();
                t.add_row([
                    Cell::new(&b.id),
                    Cell::new(status_name(b.status)),
                    Cell::new(&b.model),
                    Cell::new(format!("{}/{}", c.completed + c.failed, c.total - c.invalid))
                        .set_alignment(CellAlignment::Right),
                    Cell::new(c.invalid).set_alignment(CellAlignment::Right),
                    Cell::new(b.usage.map_or(0, |u| u.completion_tokens)).set_alignment(CellAlignment::Right),
                    Cell::new(when(b.created_at_unix_ms)),
                ]);
            }
            println!("{t}");
            if r.has_more {
                println!("(more: raise --limit)");
            }
        }
        BatchesCommand::Get { conn, id } => {
            let mut client = connect(&conn).await?;
            let b = client
                .get_batch(pb::GetBatchRequest { batch_id: id })
                .await
                .map_err(rpc)?
                .into_inner();
            print_batch(&b);
        }
        BatchesCommand::Cancel { conn, id } => {
            let mut client = connect(&conn).await?;
            let b = client
                .cancel_batch(pb::CancelBatchRequest { batch_id: id })
                .await
                .map_err(rpc)?
                .into_inner();
            println!("{}  {}", b.id, status_name(b.status));
        }
        BatchesCommand::Delete { conn, id } => {
            let mut client = connect(&conn).await?;
            client
                .delete_batch(pb::DeleteBatchRequest { batch_id: id.clone() })
                .await
                .map_err(rpc)?;
            println!("{id}  deleted");
        }
        BatchesCommand::Watch { conn, id } => {
            let mut client = connect(&conn).await?;
            let last = watch(&mut client, &id, 1.0).await?;
            print_summary(&last, 1.0, None);
        }
    }
    Ok(())
}

pub fn status_name(s: i32) -> &'static str {
    match pb::BatchStatus::try_from(s).unwrap_or(pb::BatchStatus::Unspecified) {
        pb::BatchStatus::Unspecified => "unknown",
        pb::BatchStatus::Validating => "validating",
        pb::BatchStatus::Queued => "queued",
        pb::BatchStatus::InProgress => "in_progress",
        pb::BatchStatus::Finalizing => "finalizing",
        pb::BatchStatus::Completed => "completed",
        pb::BatchStatus::Failed => "failed",
        pb::BatchStatus::Expired => "expired",
        pb::BatchStatus::Cancelling => "cancelling",
        pb::BatchStatus::Cancelled => "cancelled",
    }
}

fn when(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(unix_ms as u64)).to_string()
}

fn print_batch(b: &pb::Batch) {
    let c = b.request_counts.unwrap_or_default();
    let u = b.usage.unwrap_or_default();
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    let rows: Vec<(&str, String)> = vec![
        ("id", b.id.clone()),
        ("status", status_name(b.status).to_string()),
        ("model", b.model.clone()),
        ("sla class", b.sla_class.clone()),
        (
            "requests",
            format!(
                "{} lines: {} completed, {} failed, {} invalid",
                c.total, c.completed, c.failed, c.invalid
            ),
        ),
        (
            "tokens",
            format!("{} prompt, {} completion", u.prompt_tokens, u.completion_tokens),
        ),
        ("energy", format!("{:.1} J", u.joules)),
        ("cost", format!("${:.6}", u.cost_usd)),
        ("created", when(b.created_at_unix_ms)),
        ("deadline", when(b.deadline_unix_ms)),
        ("in progress", when(b.in_progress_at_unix_ms)),
        (
            "ended",
            when(
                b.completed_at_unix_ms
                    .max(b.failed_at_unix_ms)
                    .max(b.expired_at_unix_ms)
                    .max(b.cancelled_at_unix_ms),
            ),
        ),
    ];
    for (k, v) in rows {
        t.add_row([Cell::new(k), Cell::new(v)]);
    }
    if !b.failure_reason.is_empty() {
        t.add_row([Cell::new("failure"), Cell::new(&b.failure_reason)]);
    }
    println!("{t}");
}

pub fn is_final(b: &pb::Batch) -> bool {
    matches!(
        pb::BatchStatus::try_from(b.status),
        Ok(pb::BatchStatus::Completed
            | pb::BatchStatus::Failed
            | pb::BatchStatus::Expired
            | pb::BatchStatus::Cancelled)
    )
}

/// Follows a batch with a progress bar until it ends; returns its final state.
/// `time_scale` converts wall time to emulated time for the tokens/s shown.
pub async fn watch(client: &mut Client, id: &str, time_scale: f64) -> anyhow::Result<pb::Batch> {
    watch_with(client, id, time_scale, None).await
}

/// [`watch`], printing each line that comes on `lines` above the progress bar.
pub async fn watch_with(
    client: &mut Client,
    id: &str,
    time_scale: f64,
    mut lines: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
) -> anyhow::Result<pb::Batch> {
    let mut stream = client
        .watch_batch(pb::WatchBatchRequest {
            batch_id: id.to_string(),
            min_interval_ms: 200,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:<34} [{bar:36}] {pos}/{len} ({percent}%) {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let started = std::time::Instant::now();
    let mut last = None;
    loop {
        let message = match &mut lines {
            Some(rx) => tokio::select! {
                m = stream.message() => m,
                line = rx.recv() => {
                    match line {
                        // A hidden bar (output not a terminal) would drop the line.
                        Some(line) if bar.is_hidden() => eprintln!("{line}"),
                        Some(line) => bar.println(line),
                        None => lines = None,
                    }
                    continue;
                }
            },
            None => stream.message().await,
        };
        let Some(b) = message.map_err(rpc)? else { break };
        let c = b.request_counts.unwrap_or_default();
        bar.set_length(u64::from(c.total - c.invalid));
        bar.set_position(u64::from(c.completed + c.failed));
        let tokens = b.usage.map_or(0, |u| u.completion_tokens) as f64;
        let rate = tokens / (started.elapsed().as_secs_f64() * time_scale).max(1e-9);
        bar.set_message(format!("{} {} {:.0} out tok/s", b.id, status_name(b.status), rate));
        let done = is_final(&b);
        last = Some(b);
        if done {
            break;
        }
    }
    bar.finish();
    last.context("the control plane ended the watch without sending the batch")
}

/// Measured device energy of the whole cluster over the run, to print beside the
/// energy attributed to the batch.
pub struct ClusterEnergy {
    pub joules: f64,
    pub devices: usize,
}

/// Seconds from a batch's creation to its end, in emulated seconds when `time_scale` is
/// not 1.
pub fn run_seconds(b: &pb::Batch, time_scale: f64) -> f64 {
    let ended = b
        .completed_at_unix_ms
        .max(b.expired_at_unix_ms)
        .max(b.cancelled_at_unix_ms)
        .max(b.failed_at_unix_ms);
    (ended - b.created_at_unix_ms).max(0) as f64 / 1000.0 * time_scale
}

/// The summary table of a finished batch. Times are shown in emulated seconds when
/// `time_scale` is not 1.
pub fn print_summary(b: &pb::Batch, time_scale: f64, cluster: Option<&ClusterEnergy>) {
    let c = b.request_counts.unwrap_or_default();
    let u = b.usage.unwrap_or_default();
    let run_s = run_seconds(b, time_scale);
    let wall_s = run_s / time_scale;
    let out = u.completion_tokens as f64;
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["", "value"]);
    let mut row = |k: &str, v: String| {
        t.add_row([Cell::new(k), Cell::new(v).set_alignment(CellAlignment::Right)]);
    };
    row("batch", format!("{} ({})", b.id, status_name(b.status)));
    row(
        "requests",
        format!(
            "{} completed, {} failed, {} invalid of {}",
            c.completed, c.failed, c.invalid, c.total
        ),
    );
    row("prompt tokens", group(u.prompt_tokens));
    row("completion tokens", group(u.completion_tokens));
    if (time_scale - 1.0).abs() > f64::EPSILON {
        row(
            "completion time",
            format!("{run_s:.1} s emulated ({wall_s:.1} s wall at {time_scale}x)"),
        );
    } else {
        row("completion time", format!("{run_s:.1} s"));
    }
    row("output tokens/s", format!("{:.0}", out / run_s.max(1e-9)));
    if u.joules > 0.0 {
        row("energy (attributed)", format!("{:.1} kJ", u.joules / 1000.0));
        row("output tokens/J", format!("{:.2}", out / u.joules));
    } else {
        row("energy (attributed)", "not measured (no energy counter)".into());
    }
    if let Some(e) = cluster {
        row(
            "energy (all devices)",
            format!("{:.1} kJ on {} devices, idle included", e.joules / 1000.0, e.devices),
        );
    }
    row("cost", format!("${:.4}", u.cost_usd));
    if out > 0.0 {
        row("cost per 1M output tokens", format!("${:.4}", u.cost_usd / out * 1e6));
    }
    println!("{t}");
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[derive(Args, Debug)]
pub struct ResultsArgs {
    #[command(flatten)]
    conn: Connection,
    /// Batch id.
    id: String,
    /// Write the output (successful responses) here instead of to standard output.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Also write the errors (invalid lines, failed requests) to this file.
    #[arg(long)]
    errors: Option<PathBuf>,
}

/// One line of the OpenAI Batch output (or error) file.
pub fn output_line(batch: &str, r: &pb::ResultRecord) -> serde_json::Value {
    tokenfab_control::openai::output_line(batch, r)
}

async fn download(client: &mut Client, id: &str, kind: pb::ResultKind, out: &mut dyn Write) -> anyhow::Result<u64> {
    let mut s = client
        .stream_results(pb::StreamResultsRequest {
            batch_id: id.to_string(),
            kind: kind as i32,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let mut n = 0;
    while let Some(r) = s.message().await.map_err(rpc)? {
        serde_json::to_writer(&mut *out, &output_line(id, &r))?;
        out.write_all(b"\n")?;
        n += 1;
    }
    out.flush()?;
    Ok(n)
}

pub async fn results(a: ResultsArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.conn).await?;
    let b = client
        .get_batch(pb::GetBatchRequest { batch_id: a.id.clone() })
        .await
        .map_err(rpc)?
        .into_inner();
    if !is_final(&b) {
        eprintln!(
            "note: {} is {}; these are the results recorded so far",
            b.id,
            status_name(b.status)
        );
    }
    let n = match &a.output {
        Some(p) => {
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
            );
            download(&mut client, &a.id, pb::ResultKind::Output, &mut f).await?
        }
        None => {
            download(
                &mut client,
                &a.id,
                pb::ResultKind::Output,
                &mut std::io::stdout().lock(),
            )
            .await?
        }
    };
    eprintln!("{n} results");
    if let Some(p) = &a.errors {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        );
        let e = download(&mut client, &a.id, pb::ResultKind::Errors, &mut f).await?;
        eprintln!("{e} errors written to {}", p.display());
    } else if b.request_counts.is_some_and(|c| c.failed + c.invalid > 0) {
        eprintln!("this batch has errors: add --errors FILE to download them");
    }
    if a.output.is_none() && n == 0 && !is_final(&b) {
        bail!("no results yet");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(group(0), "0");
        assert_eq!(group(1234567), "1,234,567");
        assert_eq!(group(100), "100");
    }

    #[test]
    fn output_lines_follow_the_openai_batch_format() {
        let r = pb::ResultRecord {
            line: 7,
            custom_id: "c".into(),
            outcome: Some(pb::result_record::Outcome::Response(pb::EngineResponse {
                status_code: 200,
                body: br#"{"usage":{"completion_tokens":3}}"#.to_vec().into(),
                request_id: "req_1_6_1".into(),
            })),
            usage: None,
        };
        let v = output_line("batch_00000001", &r);
        assert_eq!(v["id"], "batch_00000001_req_000007");
        assert_eq!(v["response"]["body"]["usage"]["completion_tokens"], 3);
        assert_eq!(v["error"], serde_json::Value::Null);
    }
}

/// `tokenfab usage`.
#[derive(Args, Debug)]
pub struct UsageArgs {
    #[command(flatten)]
    conn: Connection,
    /// Count batches created within this long before now (e.g. 24h, 7d); default: all.
    #[arg(long, value_parser = parse::duration)]
    since: Option<Duration>,
    /// Another tenant's usage (operators: pass the control plane's admin token as
    /// --token / TOKENFAB_TOKEN). Default: your own.
    #[arg(long)]
    tenant: Option<String>,
}

pub async fn usage(a: UsageArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.conn).await?;
    let since_unix_ms = match a.since {
        None => 0,
        Some(d) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .context("the system clock is before 1970")?;
            now.saturating_sub(d).as_millis() as i64
        }
    };
    let u = client
        .get_usage(pb::GetUsageRequest {
            since_unix_ms,
            tenant: a.tenant.unwrap_or_default(),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let usage = u.usage.unwrap_or_default();
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    let window = match a.since {
        None => "all batches".to_string(),
        Some(d) => format!("batches created in the last {}", humantime::format_duration(d)),
    };
    let per_million = if usage.completion_tokens > 0 {
        format!("${:.4}", usage.cost_usd / usage.completion_tokens as f64 * 1e6)
    } else {
        "-".into()
    };
    for (k, v) in [
        ("tenant", u.tenant.clone()),
        ("counted", window),
        ("batches", group(u.batches)),
        ("requests completed", group(u.requests_completed)),
        ("requests failed", group(u.requests_failed)),
        ("prompt tokens", group(usage.prompt_tokens)),
        ("completion tokens", group(usage.completion_tokens)),
        ("energy (attributed)", format!("{:.1} kJ", usage.joules / 1e3)),
        (
            "idle energy share",
            format!("{:.1} kJ (${:.4})", u.idle_joules / 1e3, u.idle_cost_usd),
        ),
        (
            "device time",
            format!("{:.1} device-hours", usage.device_seconds / 3600.0),
        ),
        ("cost", format!("${:.4}", usage.cost_usd)),
        ("cost per 1M output tokens", per_million),
    ] {
        t.add_row([Cell::new(k), Cell::new(v).set_alignment(CellAlignment::Right)]);
    }
    println!("{t}");
    Ok(())
}
