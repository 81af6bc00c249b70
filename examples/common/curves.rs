//! Training curves as an SVG image: loss per epoch (train and evaluation) on the left, and
//! accuracy per epoch on the right when there is one.

use std::path::Path;

use kiln::train::EpochReport;
use plotters::prelude::*;

/// Draws `reports` into an SVG file at `path`.
pub fn save_curves(path: &Path, title: &str, reports: &[EpochReport]) -> Result<(), String> {
    let root = SVGBackend::new(path, (960, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(480);
    let epochs = reports.len().max(1) as f32;
    let x = |r: &EpochReport| (r.epoch + 1) as f32;
    let losses: Vec<f32> = reports
        .iter()
        .flat_map(|r| [Some(r.train_loss), r.eval_loss])
        .flatten()
        .filter(|v| v.is_finite())
        .collect();
    let top = losses.iter().fold(0f32, |m, &v| m.max(v)).max(1e-6) * 1.05;
    let mut chart = ChartBuilder::on(&left)
        .caption("loss", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(1f32..epochs.max(2.0), 0f32..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(
            reports.iter().map(|r| (x(r), r.train_loss)),
            &BLUE,
        ))
        .map_err(|e| e.to_string())?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    let eval: Vec<(f32, f32)> = reports
        .iter()
        .filter_map(|r| r.eval_loss.map(|l| (x(r), l)))
        .collect();
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval, &RED))
            .map_err(|e| e.to_string())?
            .label("eval")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&right)
        .caption("accuracy (%)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(1f32..epochs.max(2.0), 0f32..100f32)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .draw()
        .map_err(|e| e.to_string())?;
    for (series, color, label) in [
        (
            reports
                .iter()
                .filter_map(|r| r.train_accuracy.map(|a| (x(r), 100.0 * a)))
                .collect::<Vec<_>>(),
            BLUE,
            "train",
        ),
        (
            reports
                .iter()
                .filter_map(|r| r.eval_accuracy.map(|a| (x(r), 100.0 * a)))
                .collect(),
            RED,
            "eval",
        ),
    ] {
        if !series.is_empty() {
            chart
                .draw_series(LineSeries::new(series, &color))
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
