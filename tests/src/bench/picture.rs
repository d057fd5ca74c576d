//! The run as a picture: each figure against its baseline, so a reader sees at a glance where
//! the filter costs and where it wins. One row per figure that has a baseline: the ratio of
//! the medians as a dot (green where the target holds, red where it does not, grey where it
//! has none), the rounds' spread (10th–90th percentile of the figure's rounds, over the
//! baseline's median) as a bar through it, and a line at 1×, where the two are equal.
use std::path::Path;

use plotters::{
    coord::ranged1d::{IntoSegmentedCoord as _, SegmentValue},
    prelude::*,
};

use super::{Figure, Report};

/// What a row shows: the figure's id, ratio and spread, and whether its target holds.
struct Row {
    label: String,
    ratio: f64,
    spread: [f64; 2],
    met: Option<bool>,
}

impl Row {
    fn of(figure: &Figure) -> Option<Row> {
        let (value, baseline) = (figure.value.as_ref()?, figure.baseline.as_ref()?);
        let base = baseline.median;
        (base > 0.0).then(|| Row {
            label: figure.id.to_owned(),
            ratio: value.median / base,
            spread: [value.spread[0] / base, value.spread[1] / base],
            met: figure.met,
        })
    }
}

/// Draws `report` as an SVG file at `path`.
///
/// # Errors
/// When the file cannot be written.
pub fn draw(report: &Report, path: &Path) -> Result<(), String> {
    // Bottom to top, so that the first figure is drawn at the top.
    let rows: Vec<Row> = report.figures.iter().rev().filter_map(Row::of).collect();
    if rows.is_empty() {
        return Err("no figure with a baseline to draw".to_owned());
    }
    let widest = rows.iter().map(|r| r.spread[1].max(r.ratio)).fold(1.0, f64::max);
    let x_max = (widest * 1.1).max(1.5);
    let height = 120 + 30 * u32::try_from(rows.len()).unwrap_or(u32::MAX / 64);
    let root = SVGBackend::new(path, (760, height)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<std::io::Error>| format!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(err)?;
    let caption = format!(
        "Each figure over its baseline (median; bar: the rounds' 10th-90th percentile) — {}, Linux {}",
        report.machine.cpu, report.machine.kernel
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..x_max, (0..rows.len()).into_segmented())
        .map_err(err)?;
    let label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => rows.get(*i).map_or(String::new(), |r| r.label.clone()),
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE)
        .x_desc("figure / baseline (green: target met; red: not met)")
        .y_label_formatter(&label)
        .y_labels(rows.len())
        .draw()
        .map_err(err)?;
    let at = SegmentValue::CenterOf;
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Last)],
            BLACK.stroke_width(1),
        )))
        .map_err(err)?;
    for (i, row) in rows.iter().enumerate() {
        let colour = match row.met {
            Some(true) => RGBColor(0x1a, 0x9e, 0x4a),
            Some(false) => RGBColor(0xd0, 0x2c, 0x2c),
            None => RGBColor(0x80, 0x80, 0x80),
        };
        let bar = PathElement::new(vec![(row.spread[0], at(i)), (row.spread[1], at(i))], colour.stroke_width(2));
        let dot = Circle::new((row.ratio, at(i)), 5, colour.filled());
        let value = Text::new(
            format!("{:.2}×", row.ratio),
            (row.spread[1].max(row.ratio) + x_max / 80.0, at(i)),
            ("sans-serif", 12),
        );
        chart.draw_series(std::iter::once(bar)).map_err(err)?;
        chart.draw_series(std::iter::once(dot)).map_err(err)?;
        chart.draw_series(std::iter::once(value)).map_err(err)?;
    }
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Measured;

    #[test]
    fn draws_each_figure_with_a_baseline_and_leaves_the_others_out() {
        let figure = |id, value: Vec<f64>, baseline: Vec<f64>| {
            Figure::new(id, "x", "µs", "≤ 1.05×")
                .measured(Measured::of(value), Some(("b".into(), Measured::of(baseline))))
        };
        let report = Report::new(
            false,
            vec![
                figure("P1", vec![1.0, 1.1, 1.2], vec![1.0]).judged(true),
                figure("P8c", vec![0.9, 0.95], vec![1.0]).judged(false),
                Figure::new("P7", "rss", "MiB", "≤ 64 MiB").measured(Measured::of(vec![32.0]), None),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.svg");
        draw(&report, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        for shown in ["P1", "P8c", "1.10×", "0.95×"] {
            assert!(texts.contains(&shown), "{shown} missing");
        }
        assert!(!texts.contains(&"P7"), "a figure without a baseline has no ratio to show");
        assert!(draw(&Report::new(false, vec![]), &path).is_err());
    }
}
