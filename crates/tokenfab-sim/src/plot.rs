//! SVG plots of a report and of a sweep.

use crate::report::Report;
use plotters::prelude::*;
use std::path::Path;

/// A plot that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {file}: {cause}")]
pub struct PlotError {
    file: String,
    cause: String,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn fail(file: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError {
        file: file.display().to_string(),
        cause: e.to_string(),
    }
}

type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Axes from 0 to `x_max` and `y_max` with a title and labels, on a white area.
fn axes<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    file: &Path,
    title: &str,
    (x_label, y_label): (&str, &str),
    (x_max, y_max): (f64, f64),
) -> Result<Chart<'a, 'b>, PlotError> {
    root.fill(&WHITE).map_err(|e| fail(file, e))?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| fail(file, e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| fail(file, e))?;
    Ok(chart)
}

/// A line chart of one series per name.
fn lines(
    file: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), PlotError> {
    let root = SVGBackend::new(file, (900, 480)).into_drawing_area();
    let x_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let y_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.05;
    let mut chart = axes(&root, file, title, (x_label, y_label), (x_max, y_max))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| fail(file, e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(file, e))?;
    }
    root.present().map_err(|e| fail(file, e))
}

/// Hours when a run is long, else minutes or seconds.
fn time_axis(seconds: f64) -> (f64, &'static str) {
    if seconds > 4.0 * 3600.0 {
        (3600.0, "simulated time (h)")
    } else if seconds > 600.0 {
        (60.0, "simulated time (min)")
    } else {
        (1.0, "simulated time (s)")
    }
}

/// `throughput.svg`, `power.svg` and `completion.svg` of one run.
pub fn report_plots(r: &Report, dir: &Path) -> Result<Vec<String>, PlotError> {
    let (unit, x_label) = time_axis(r.simulated_s);
    let per_pool = |f: &dyn Fn(&crate::report::SeriesPoint) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        r.pools
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    r.series
                        .iter()
                        .filter(|s| s.pool == p.name)
                        .map(|s| (s.t_s / unit, f(s)))
                        .collect(),
                )
            })
            .collect()
    };
    let throughput = dir.join("throughput.svg");
    lines(
        &throughput,
        &format!("{}: output tokens/s", r.scenario),
        x_label,
        "output tokens/s",
        &per_pool(&|s| s.output_tokens_per_s),
    )?;
    let power = dir.join("power.svg");
    lines(
        &power,
        &format!("{}: power (idle included)", r.scenario),
        x_label,
        "kW",
        &per_pool(&|s| s.power_w / 1000.0),
    )?;
    // Completion time distribution as a CDF (from the run's histogram).
    let (cunit, clabel) = match r.batches.completion_s.max {
        m if m > 7200.0 => (3600.0, "batch completion time (h)"),
        m if m > 120.0 => (60.0, "batch completion time (min)"),
        _ => (1.0, "batch completion time (s)"),
    };
    let cdf: Vec<(f64, f64)> = r
        .completion_cdf
        .iter()
        .map(|&(t, share)| (t / cunit, share * 100.0))
        .collect();
    let completion = dir.join("completion.svg");
    lines(
        &completion,
        &format!("{}: batch completion times (CDF)", r.scenario),
        clabel,
        "% of batches",
        &[("all batches".into(), cdf)],
    )?;
    Ok(vec![
        "throughput.svg".into(),
        "power.svg".into(),
        "completion.svg".into(),
    ])
}

/// A sweep's cost against one varied parameter; configurations that miss the SLA are
/// drawn as hollow circles.
pub fn sweep_plot(file: &Path, x_label: &str, points: &[(f64, f64, bool)]) -> Result<(), PlotError> {
    let root = SVGBackend::new(file, (900, 480)).into_drawing_area();
    let x_max = points.iter().map(|p| p.0).fold(0.0f64, f64::max) * 1.1 + 1e-9;
    let y_max = points.iter().map(|p| p.1).fold(0.0f64, f64::max) * 1.15 + 1e-9;
    let mut chart = axes(
        &root,
        file,
        "cost per million output tokens (filled: meets the SLA)",
        (x_label, "$ per 1M output tokens"),
        (x_max, y_max),
    )?;
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart
        .draw_series(LineSeries::new(
            sorted.iter().map(|p| (p.0, p.1)),
            COLORS[0].stroke_width(1),
        ))
        .map_err(|e| fail(file, e))?;
    chart
        .draw_series(sorted.iter().map(|&(x, y, ok)| {
            Circle::new(
                (x, y),
                6,
                if ok {
                    COLORS[0].filled()
                } else {
                    COLORS[3].stroke_width(2)
                },
            )
        }))
        .map_err(|e| fail(file, e))?;
    root.present().map_err(|e| fail(file, e))
}

/// The operating curve (see [`crate::curve`]): tokens/J and inter-token latency against
/// the batch size, log-scaled, at full power and at the tuner's power limit, with the
/// tuner's point and vLLM's default window marked.
pub fn curve_plot(c: &crate::curve::Curve, file: &Path) -> Result<(), PlotError> {
    let root = SVGBackend::new(file, (1000, 820)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(file, e))?;
    let title = format!(
        "{} on {} (TP {}), {} prompt + {} output tokens per request",
        c.model, c.accelerator, c.tensor_parallel, c.prompt_tokens, c.output_tokens
    );
    let root = root.titled(&title, ("sans-serif", 20)).map_err(|e| fail(file, e))?;
    let (top, bottom) = root.split_vertically(400);
    let x_max = c.points.iter().map(|p| f64::from(p.batch)).fold(1.0, f64::max);
    let tuned = format!("power limit {:.0} W (tuner's)", c.tuner_power_limit_w);
    let full = format!("full power ({:.0} W)", c.max_power_w);
    let panels: [(&DrawingArea<SVGBackend, plotters::coord::Shift>, &str, bool); 2] = [
        (&top, "output tokens per joule", true),
        (&bottom, "inter-token latency (ms)", false),
    ];
    for (area, y_label, energy) in panels {
        let value = |p: &crate::curve::CurvePoint, tuned: bool| match (energy, tuned) {
            (true, false) => p.tokens_per_joule_full_power,
            (true, true) => p.tokens_per_joule_tuned_power,
            (false, false) => p.inter_token_ms_full_power,
            (false, true) => p.inter_token_ms_tuned_power,
        };
        let y_max = c
            .points
            .iter()
            .flat_map(|p| [value(p, false), value(p, true)])
            .fold(0.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((1.0..x_max).log_scale(), 0.0..y_max.max(1e-9))
            .map_err(|e| fail(file, e))?;
        chart
            .configure_mesh()
            .x_desc("batch size (sequences in flight, log scale)")
            .y_desc(y_label)
            .draw()
            .map_err(|e| fail(file, e))?;
        for (i, (name, is_tuned)) in [(&full, false), (&tuned, true)].into_iter().enumerate() {
            let color = COLORS[i];
            chart
                .draw_series(LineSeries::new(
                    c.points.iter().map(|p| (f64::from(p.batch), value(p, is_tuned))),
                    color.stroke_width(2),
                ))
                .map_err(|e| fail(file, e))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        let at = |w: u32, is_tuned: bool| {
            c.points
                .iter()
                .min_by_key(|p| p.batch.abs_diff(w))
                .map(|p| (f64::from(p.batch), value(p, is_tuned)))
        };
        if let Some(p) = at(c.tuner_window.min(c.kv_batch_limit), true) {
            let label = if c.tuner_window > c.kv_batch_limit {
                format!(
                    "tuner: window {} ({} run, the KV cache's limit), {:.0} W",
                    c.tuner_window, c.kv_batch_limit, c.tuner_power_limit_w
                )
            } else {
                format!("tuner: window {}, {:.0} W", c.tuner_window, c.tuner_power_limit_w)
            };
            chart
                .draw_series([Circle::new(p, 8, COLORS[3].filled())])
                .map_err(|e| fail(file, e))?
                .label(label)
                .legend(|(x, y)| Circle::new((x + 9, y), 5, COLORS[3].filled()));
        }
        if let Some(p) = at(256, false) {
            chart
                .draw_series([TriangleMarker::new(p, 8, COLORS[2].filled())])
                .map_err(|e| fail(file, e))?
                .label("vLLM default: 256 sequences, full power")
                .legend(|(x, y)| TriangleMarker::new((x + 9, y), 5, COLORS[2].filled()));
        }
        chart
            .configure_series_labels()
            .position(if energy {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperLeft
            })
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(file, e))?;
    }
    root.present().map_err(|e| fail(file, e))
}
