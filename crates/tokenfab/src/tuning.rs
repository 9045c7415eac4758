//! `tokenfab tuning`: what each replica's tuner does, and placement's decisions.

use anyhow::Context;
use clap::Args;
use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use tokenfab_core::control::{PlanView, TuningDoc};

#[derive(Args, Debug)]
pub struct TuningArgs {
    /// The control plane's HTTP address (its --metrics-listen), which serves GET /v1/tuning.
    #[arg(long, env = "TOKENFAB_SLA_URL", default_value = "http://127.0.0.1:9464")]
    url: String,
    /// Print the JSON document instead of a table.
    #[arg(long)]
    json: bool,
    /// The token the control plane's HTTP endpoints require, if it set one.
    #[arg(long, env = "TOKENFAB_HTTP_TOKEN", hide_env_values = true)]
    http_token: Option<tokenfab_identity::Secret>,
}

pub async fn run(a: TuningArgs) -> anyhow::Result<()> {
    let url = format!("{}/v1/tuning", a.url.trim_end_matches('/'));
    let text = crate::sla::get_text(&url, a.http_token.as_ref().map(tokenfab_identity::Secret::expose)).await?;
    if a.json {
        println!("{text}");
        return Ok(());
    }
    let doc: TuningDoc =
        serde_json::from_str(&text).with_context(|| format!("{url} did not answer a tuning document"))?;
    if doc.replicas.is_empty() {
        println!("no replica registered");
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "node / replica",
        "model @ accelerator",
        "active",
        "tuner",
        "window",
        "power limit",
        "owed tok/s",
        "measured tok/s",
        "objective",
        "belief (correction)",
        "last decision",
    ]);
    for r in &doc.replicas {
        let objective = if r.objective_value > 0.0 {
            format!("{:.3} {}", r.objective_value, r.objective)
        } else {
            "-".into()
        };
        let decision = match &r.advice {
            Some(a) => format!(
                "advice: window {}, {:.0} W ({:.3} vs {:.3} now)",
                a.window, a.power_limit_w, a.predicted_objective, a.current_objective
            ),
            None => format!("{}{}", if r.converged { "(converged) " } else { "" }, r.reason),
        };
        t.add_row([
            Cell::new(format!("{} / {}", r.node, r.replica)),
            Cell::new(format!("{} @ {}", r.model, r.accelerator)),
            Cell::new(match (r.active, r.placement_active) {
                (true, true) => "yes",
                (true, false) => "yes (placement would park)",
                (false, _) => "parked",
            }),
            Cell::new(&r.tuner_mode),
            Cell::new(r.window).set_alignment(CellAlignment::Right),
            Cell::new(r.power_limit_w.map_or("-".into(), |p| format!("{p:.0} W"))).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.0}", r.owed_tokens_per_s)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.0}", r.measured_tokens_per_s)).set_alignment(CellAlignment::Right),
            Cell::new(objective),
            Cell::new(belief_text(r)),
            Cell::new(decision),
        ]);
    }
    println!("{t}");
    let f = doc.fragmentation;
    println!(
        "devices: {} registered, {} free, {} stranded (free but unusable by any served model)",
        f.devices, f.free, f.stranded
    );
    if let Some(plan) = &doc.plan {
        println!("{}", plan_text(plan));
    }
    Ok(())
}

/// A replica's belief and how its measurements correct it, e.g. `model: step time x1.28
/// ± 3%, power x0.91; error 2.1%`.
fn belief_text(r: &tokenfab_core::control::ReplicaView) -> String {
    let Some(c) = &r.calibration else {
        return "-".into();
    };
    if c.samples == 0 {
        return format!(
            "{}: not measured yet (± {:.0}% assumed)",
            r.belief,
            c.uncertainty * 100.0
        );
    }
    let power = if c.power_samples > 0 {
        format!(", power x{:.2}", c.power)
    } else {
        String::new()
    };
    let error = c
        .model_error
        .map_or(String::new(), |e| format!("; error {:.1}%", e * 100.0));
    format!(
        "{}: step time x{:.2} ± {:.0}%{power}{error}",
        r.belief,
        c.time,
        c.uncertainty * 100.0
    )
}

/// Placement's advice in words.
fn plan_text(p: &PlanView) -> String {
    let mut out = String::from("placement's advice for the measured demand:");
    for d in &p.demand {
        out.push_str(&format!(
            "\n  {}: needs {:.0} output tok/s (requests of ~{} prompt + {} output tokens); the planned replicas give {:.0} tok/s{}",
            d.model,
            d.tokens_per_s,
            d.prompt_tokens,
            d.output_tokens,
            d.planned_tokens_per_s,
            if d.unmet_tokens_per_s > 0.0 {
                format!(", {:.0} tok/s no free device group can cover", d.unmet_tokens_per_s)
            } else {
                String::new()
            }
        ));
    }
    if p.start.is_empty() && p.stop.is_empty() {
        out.push_str(&format!("\n  keep the {} replicas that run", p.replicas_now));
    } else {
        out.push_str(&format!(
            "\n  {} replicas instead of {} (stranded devices {} -> {}):",
            p.replicas_planned, p.replicas_now, p.fragmentation_now.stranded, p.fragmentation_planned.stranded
        ));
        for (verb, list) in [("start", &p.start), ("stop", &p.stop)] {
            for r in list {
                out.push_str(&format!(
                    "\n    {verb} {} on {} devices {:?}",
                    r.model, r.node, r.devices
                ));
            }
        }
        out.push_str("\n  (agents start engines from their own configuration: change it there to follow)");
    }
    out
}
