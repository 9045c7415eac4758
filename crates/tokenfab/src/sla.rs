//! `tokenfab sla`: the published throughput SLA as a table.

use anyhow::Context;
use clap::Args;
use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use tokenfab_core::sla::ThroughputSla;

#[derive(Args, Debug)]
pub struct SlaArgs {
    /// The control plane's HTTP address (its --metrics-listen), which serves GET /v1/sla.
    #[arg(long, env = "TOKENFAB_SLA_URL", default_value = "http://127.0.0.1:9464")]
    url: String,
    /// Print the document as JSON (tokenfab.io/v1 ThroughputSLA) instead of tables.
    #[arg(long)]
    json: bool,
    /// Print the measurement as llm-d Benchmark Reports (schema v0.2.1, a JSON array with
    /// one report per model and accelerator), to compare with llm-d and inference-perf runs.
    #[arg(long, conflicts_with = "json")]
    llm_d: bool,
    /// The token the control plane's HTTP endpoints require, if it set one
    /// (--http-token-file there).
    #[arg(long, env = "TOKENFAB_HTTP_TOKEN", hide_env_values = true)]
    http_token: Option<tokenfab_identity::Secret>,
}

/// GETs `url` from the control plane's HTTP listener (with `token` as a bearer token when
/// given); the body, or an error saying what failed and what to check.
pub(crate) async fn get_text(url: &str, token: Option<&str>) -> anyhow::Result<String> {
    if url.starts_with("https://") {
        anyhow::bail!(
            "{url}: this command reads the HTTP endpoints over plain http only; over TLS use e.g. `curl --cacert CA.pem -H 'Authorization: Bearer TOKEN' {url}`"
        );
    }
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t.trim());
    }
    let resp = req.send().await.with_context(|| {
        format!("cannot reach {url}; is the control plane running with --metrics-listen at that address?")
    })?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}: {text}");
    }
    Ok(text)
}

pub async fn run(a: SlaArgs) -> anyhow::Result<()> {
    let url = format!("{}/v1/sla", a.url.trim_end_matches('/'));
    let text = get_text(&url, a.http_token.as_ref().map(tokenfab_identity::Secret::expose)).await?;
    if a.json {
        println!("{text}");
        return Ok(());
    }
    let doc: ThroughputSla =
        serde_json::from_str(&text).with_context(|| format!("{url} did not answer a ThroughputSLA document"))?;
    if a.llm_d {
        let reports = tokenfab_core::llmd::benchmark_reports(&doc);
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    println!("{}", render(&doc));
    Ok(())
}

/// The tables `tokenfab sla` prints for `doc`.
pub fn render(doc: &ThroughputSla) -> String {
    let mut out = format!(
        "{} {} over the last {:.0} s (data for {:.0} s)\n",
        doc.api_version, doc.kind, doc.metadata.window_seconds, doc.metadata.covered_seconds
    );
    let mut pools = Table::new();
    pools.load_preset(UTF8_FULL_CONDENSED).set_header([
        "model",
        "accelerator",
        "devices",
        "committed tok/s",
        "measured tok/s",
        "tok/J",
        "$ / 1M out",
        "latency p50 / p99",
    ]);
    for p in &doc.pools {
        pools.add_row([
            Cell::new(&p.model),
            Cell::new(&p.accelerator),
            Cell::new(p.devices).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.0}", p.committed_output_tokens_per_second)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.0}", p.measured_output_tokens_per_second)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.2}", p.output_tokens_per_joule)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.4}", p.cost_per_million_output_tokens_usd)).set_alignment(CellAlignment::Right),
            Cell::new(format!(
                "{:.2} s / {:.2} s",
                p.request_latency_seconds.p50, p.request_latency_seconds.p99
            )),
        ]);
    }
    out.push_str(&format!("{pools}\n"));
    let mut classes = Table::new();
    classes.load_preset(UTF8_FULL_CONDENSED).set_header([
        "model",
        "SLA class",
        "committed",
        "batches",
        "on time",
        "completion p50 / p90 / p99",
    ]);
    for c in &doc.classes {
        classes.add_row([
            Cell::new(&c.model),
            Cell::new(&c.class),
            Cell::new(if c.committed { "yes" } else { "best-effort" }),
            Cell::new(c.batches).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.2}%", c.attainment * 100.0)).set_alignment(CellAlignment::Right),
            Cell::new(format!(
                "{:.0} s / {:.0} s / {:.0} s",
                c.completion_seconds.p50, c.completion_seconds.p90, c.completion_seconds.p99
            )),
        ]);
    }
    if doc.classes.is_empty() {
        out.push_str("no batch ended in the window yet");
    } else {
        out.push_str(&classes.to_string());
    }
    out
}
