//! Loss curves as an SVG line chart.
//!
//! One chart serves a single run (train and eval loss) and an ablation (one train-loss
//! curve per variant). It is drawn with plotters' SVG backend and no font feature:
//! plotters then sizes text with a built-in estimate (about 0.45 em per character) and
//! the SVG backend writes every label as a `<text>` element that the viewer renders in
//! its own sans-serif font. So titles, axis descriptions, tick labels and the legend are
//! all present without font files at build or run time; only their layout is
//! approximate.

use std::path::Path;

use plotters::prelude::*;

/// One labelled curve of (step, loss) points.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Colors that stay distinguishable for common color-vision deficiencies (Okabe–Ito),
/// reused in order when there are more series.
const COLORS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(240, 228, 66),
];

const SIZE: (u32, u32) = (960, 600);

/// Writes an SVG chart of `series` to `path`, x = step and y = loss, with a legend.
/// Non-finite points (a diverged step's NaN loss) are left out; a series left with no
/// points is not drawn. It is an error when nothing at all is left to draw.
pub fn loss_plot(path: &Path, title: &str, series: &[Series]) -> Result<(), String> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| (s.label.as_str(), s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect()))
        .filter(|(_, points): &(&str, Vec<(f64, f64)>)| !points.is_empty())
        .collect();
    let all = curves.iter().flat_map(|(_, points)| points.iter());
    let (x_range, y_range) = match bounds(all) {
        Some(bounds) => bounds,
        None => return Err(format!("loss plot {}: no finite points to draw", path.display())),
    };
    draw(path, title, &curves, x_range, y_range).map_err(|e| format!("loss plot {}: {e}", path.display()))
}

type Range = std::ops::Range<f64>;

fn draw(
    path: &Path,
    title: &str,
    curves: &[(&str, Vec<(f64, f64)>)],
    x_range: Range,
    y_range: Range,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x_range, y_range)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style(("sans-serif", 16))
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .axis_desc_style(("sans-serif", 18))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (i, (label, points)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Tick labels without float noise or a trailing `.0`: `500`, not `500.0`.
fn tick(v: &f64) -> String {
    format!("{}", (v * 1e9).round() / 1e9)
}

/// The axis ranges: the data's extent, y padded by 5%, each widened when it is a point.
fn bounds<'a>(points: impl Iterator<Item = &'a (f64, f64)>) -> Option<(Range, Range)> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return None;
    }
    if x0 == x1 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    let pad = if y1 > y0 { 0.05 * (y1 - y0) } else { 0.1 * y0.abs().max(1.0) };
    Some((x0..x1, y0 - pad..y1 + pad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(label: &str, f: impl Fn(f64) -> f64) -> Series {
        Series { label: label.into(), points: (0..50).map(|i| (i as f64 * 10.0, f(i as f64))).collect() }
    }

    #[test]
    fn writes_one_line_and_legend_entry_per_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        let series = [
            curve("train", |i| 5.0 / (1.0 + i)),
            curve("eval", |i| 5.5 / (1.0 + i)),
            Series { label: "1+elu".into(), points: vec![(0.0, 4.0), (100.0, f64::NAN), (200.0, 2.0)] },
        ];
        loss_plot(&path, "tiny_lm on copy", &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        // Each series is a polyline in its color for the curve and one for its legend sample.
        for color in ["#0072B2", "#D55E00", "#009E73"] {
            assert_eq!(svg.matches(&format!("<polyline fill=\"none\" opacity=\"1\" stroke=\"{color}\"")).count(), 2);
        }
        for text in ["tiny_lm on copy", "train", "eval", "1+elu", "step", "loss"] {
            assert!(svg.contains(&format!(">\n{text}\n<")) || svg.contains(&format!(">{text}<")), "no label {text}");
        }
    }

    #[test]
    fn a_single_point_still_plots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.svg");
        loss_plot(&path, "one", &[Series { label: "train".into(), points: vec![(5.0, 2.0)] }]).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("<polyline"));
        assert_eq!(bounds([(5.0, 2.0)].iter()), Some((4.0..6.0, 1.8..2.2)));
        assert_eq!(
            (tick(&500.0), tick(&0.30000000000000004), tick(&-1.5)),
            ("500".into(), "0.3".into(), "-1.5".into())
        );
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.svg");
        let empty = Series { label: "nan".into(), points: vec![(1.0, f64::NAN)] };
        assert!(loss_plot(&path, "t", &[empty]).unwrap_err().contains("no finite points"));
        assert!(loss_plot(&path, "t", &[]).is_err());
        let missing_dir = dir.path().join("no/such/dir/x.svg");
        let err = loss_plot(&missing_dir, "t", &[curve("a", |i| i)]).unwrap_err();
        assert!(err.contains("x.svg"), "{err}");
    }
}
