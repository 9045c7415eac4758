//! The online recalibration's step response, as a plot: `cargo run --release -p
//! tokenfab-sim --example recal_step -- OUT_DIR`.
//!
//! A replica believes the performance model (Llama-3.1-8B on an H100, 64 sequences of
//! 600 + 180 tokens, 700 W). Its telemetry comes from a truth that is 30% slower at 80% of
//! the believed power until 300 s, then 10% faster than believed at the believed power,
//! with 5% noise on every 100 ms reading of throughput and power (a deterministic
//! pseudo-random stream). The counters are fed to `tokenfab_core::recal::Recalibrator`
//! exactly as the agent feeds it. Writes `recal-step.csv` (time, time correction, its
//! uncertainty, model error) and `recal-step.svg`, and prints how long the model error
//! took to fall under 5% after each change.
//!
//! This is synthetic telemetry: it shows how the estimator follows a change, not how a
//! real engine's curve differs from the model.

use plotters::prelude::*;
use std::time::Duration;
use tokenfab_core::perf::ReplicaPerf;
use tokenfab_core::recal::{RecalConfig, Recalibrator};
use tokenfab_core::tuner::Observation;
use tokenfab_core::{AcceleratorId, ModelId, Timestamp};

const STEP_AT_S: f64 = 300.0;
const END_S: f64 = 600.0;

fn main() {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "sim-out/recal-step".into()));
    std::fs::create_dir_all(&out).expect("creating the output folder");
    let belief =
        ReplicaPerf::new(&ModelId::new("llama-3.1-8b"), &AcceleratorId::new("h100-sxm"), 1).expect("in the catalog");
    let steady = belief.steady_state(64, 600, 180, 700.0);
    let mut r = Recalibrator::new(RecalConfig::default());
    let mut o = Observation {
        energy_j: Some(0.0),
        in_flight: 64,
        ..Observation::default()
    };
    let (mut tokens, mut joules) = (0.0_f64, 0.0_f64);
    let mut rng = 0x2545_F491_4F6C_DD1D_u64;
    let mut noise = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        1.0 + 0.05 * ((rng >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
    };
    let mut rows = Vec::new();
    let mut t = 0.0;
    while t < END_S {
        let (slower, power) = if t < STEP_AT_S { (1.3, 0.8) } else { (1.0 / 1.1, 1.0) };
        tokens += steady.output_tokens_per_s / slower * 0.1 * noise();
        joules += steady.power_w * power * 0.1 * noise();
        t += 0.1;
        o.at = Timestamp::ZERO.saturating_add(Duration::from_secs_f64(t));
        o.tokens = tokens as u64;
        o.finished = (tokens / 180.0) as u64;
        o.completion_tokens = o.finished * 180;
        o.prompt_tokens = o.finished * 600;
        o.energy_j = Some(joules);
        if r.observe(&belief, &o, 64, 700.0) {
            let c = r.correction();
            let truth = if t < STEP_AT_S { 1.3 } else { 1.0 / 1.1 };
            rows.push((t, c.time, c.uncertainty, c.model_error.unwrap_or(f64::NAN), truth));
        }
    }
    let mut csv = String::from("t_s,time_correction,uncertainty,model_error,true_time_factor\n");
    for (t, c, u, e, truth) in &rows {
        csv.push_str(&format!("{t:.1},{c:.5},{u:.5},{e:.5},{truth:.5}\n"));
    }
    std::fs::write(out.join("recal-step.csv"), csv).expect("writing the CSV");
    for (from, to, what) in [(0.0, STEP_AT_S, "start"), (STEP_AT_S, END_S, "step")] {
        // From when on the model error stays under 5% until the next change.
        let within: Vec<_> = rows.iter().filter(|r| r.0 > from && r.0 <= to).collect();
        let settled = (0..within.len())
            .find(|&i| within[i..].iter().all(|r| r.3 < 0.05))
            .map(|i| within[i].0 - from);
        match settled {
            Some(s) => println!("after the {what} at {from:.0} s: model error under 5% from {s:.1} s on"),
            None => println!("after the {what} at {from:.0} s: model error does not stay under 5%"),
        }
    }
    let file = out.join("recal-step.svg");
    let root = SVGBackend::new(&file, (900, 420)).into_drawing_area();
    root.fill(&WHITE).expect("drawing");
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Online recalibration: step-time correction after a change of the truth (synthetic telemetry, 5% noise)",
            ("sans-serif", 15),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .right_y_label_area_size(50)
        .build_cartesian_2d(0.0..END_S, 0.0..1.6)
        .expect("drawing")
        .set_secondary_coord(0.0..END_S, 0.0..0.5);
    chart
        .configure_mesh()
        .x_desc("time, s")
        .y_desc("measured / believed step time")
        .draw()
        .expect("drawing");
    chart
        .configure_secondary_axes()
        .y_desc("model error (relative)")
        .draw()
        .expect("drawing");
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    let red = RGBColor(214, 39, 40);
    chart
        .draw_series(LineSeries::new(rows.iter().map(|r| (r.0, r.4)), BLACK.stroke_width(1)))
        .expect("drawing")
        .label("truth")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .draw_series(LineSeries::new(rows.iter().map(|r| (r.0, r.1)), blue.stroke_width(2)))
        .expect("drawing")
        .label("time correction")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue));
    chart
        .draw_secondary_series(LineSeries::new(
            rows.iter().filter(|r| r.3.is_finite()).map(|r| (r.0, r.3.min(0.5))),
            orange.stroke_width(1),
        ))
        .expect("drawing")
        .label("model error (right axis)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], orange));
    chart
        .draw_secondary_series(LineSeries::new(vec![(0.0, 0.05), (END_S, 0.05)], red.stroke_width(1)))
        .expect("drawing")
        .label("5% (right axis)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .expect("drawing");
    root.present().expect("writing the SVG");
    println!("wrote recal-step.csv and recal-step.svg to {}", out.display());
}
