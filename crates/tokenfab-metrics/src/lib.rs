//! # tokenfab-metrics: serving a Prometheus registry
//!
//! The control plane, the agent and the engine emulator each keep a
//! [`prometheus_client`] registry. This crate serves one on `/metrics` in the format the
//! scraper asks for:
//!
//! - **OpenMetrics 1.0** when the `Accept` header names `application/openmetrics-text`,
//!   which Prometheus itself sends;
//! - otherwise **the classic text format 0.0.4** (`text/plain`), which `curl`, `promtool
//!   check metrics` and older scrapers read. In it a counter's `# HELP` and `# TYPE` name
//!   the sample itself (`x_total`), where OpenMetrics names the family (`x`); served as
//!   OpenMetrics to a classic reader, every counter would lack its help text.

use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;

/// Advances a counter to a running total kept elsewhere that only grows (a core's
/// statistics, a tenant's metered usage): by the rise, never down.
pub fn advance(c: &Counter, total: u64) {
    c.inc_by(total.saturating_sub(c.get()));
}

/// [`advance`] for a float counter (joules, dollars).
pub fn advance_f64(c: &Counter<f64, AtomicU64>, total: f64) {
    let rise = total - c.get();
    if rise > 0.0 {
        c.inc_by(rise);
    }
}

/// `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the classic Prometheus text format.
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request's `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// The registry's metrics as the `/metrics` response to a request with `headers`.
pub fn respond(registry: &Registry, headers: &HeaderMap) -> Response {
    let mut text = String::new();
    if encode(&mut text, registry).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics failed\n").into_response();
    }
    if wants_openmetrics(headers) {
        ([(CONTENT_TYPE, OPENMETRICS)], text).into_response()
    } else {
        ([(CONTENT_TYPE, CLASSIC)], classic(&text)).into_response()
    }
}

/// Rewrites an OpenMetrics text exposition into the classic text format: a counter
/// family's `# HELP` and `# TYPE` take its sample's name (`x` becomes `x_total`), `# UNIT`
/// lines and the closing `# EOF` go, the `unknown` type is called `untyped`, and a
/// counter's `_created` samples and any exemplar are dropped (the classic format has
/// neither).
pub fn classic(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if counters.contains(name) {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            let tail = if line.starts_with("# TYPE ") && tail == "unknown" {
                "untyped"
            } else {
                tail
            };
            out.push_str(&line[..7]);
            out.push_str(&name);
            out.push(' ');
            out.push_str(tail);
            out.push('\n');
            continue;
        }
        let sample_name = line.split(['{', ' ']).next().unwrap_or("");
        if let Some(family) = sample_name.strip_suffix("_created")
            && counters.contains(family)
        {
            continue;
        }
        // An exemplar follows ` # ` after the value.
        let sample = match line.find(" # ") {
            Some(i) if !line.starts_with('#') => &line[..i],
            _ => line,
        };
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Unit;

    fn registry() -> Registry {
        let mut r = Registry::with_prefix("t");
        let c: Counter = Counter::default();
        c.inc_by(3);
        r.register("requests", "Requests served", c);
        let g: Gauge = Gauge::default();
        g.set(7);
        r.register("in_flight", "Requests in flight", g);
        let h = Histogram::new([0.5, 1.0]);
        h.observe(0.7);
        r.register_with_unit("latency", "Latency", Unit::Seconds, h);
        r
    }

    #[test]
    fn counters_get_their_help_under_the_sample_name_in_the_classic_format() {
        let mut om = String::new();
        encode(&mut om, &registry()).unwrap();
        assert!(om.contains("# TYPE t_requests counter\n"), "{om}");
        let text = classic(&om);
        assert_eq!(
            text,
            "# HELP t_requests_total Requests served.\n\
             # TYPE t_requests_total counter\n\
             t_requests_total 3\n\
             # HELP t_in_flight Requests in flight.\n\
             # TYPE t_in_flight gauge\n\
             t_in_flight 7\n\
             # HELP t_latency_seconds Latency.\n\
             # TYPE t_latency_seconds histogram\n\
             t_latency_seconds_sum 0.7\n\
             t_latency_seconds_count 1\n\
             t_latency_seconds_bucket{le=\"0.5\"} 0\n\
             t_latency_seconds_bucket{le=\"1.0\"} 1\n\
             t_latency_seconds_bucket{le=\"+Inf\"} 1\n"
        );
    }

    #[test]
    fn the_format_follows_the_accept_header() {
        let mut h = HeaderMap::new();
        assert!(!wants_openmetrics(&h));
        h.insert(
            ACCEPT,
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
                .parse()
                .unwrap(),
        );
        assert!(wants_openmetrics(&h));
        let r = respond(&registry(), &h);
        assert_eq!(r.headers()[CONTENT_TYPE], OPENMETRICS);
        let r = respond(&registry(), &HeaderMap::new());
        assert_eq!(r.headers()[CONTENT_TYPE], CLASSIC);
    }
}
