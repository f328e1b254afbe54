//! Charts as SVG, drawn by plotters' SVG backend from a [`Chart`]'s data: lines with markers
//! for measurements, dashed lines for references (a timeout, the ideal).

use plotters::prelude::*;

use crate::LabError;
use crate::report::Chart;

const WIDTH: u32 = 760;
const HEIGHT: u32 = 380;

/// Colour-blind-safe (Okabe–Ito) colours for the measured series, grey for references.
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];
const REFERENCE: [RGBColor; 2] = [RGBColor(110, 110, 110), RGBColor(170, 60, 60)];

fn err(e: impl std::fmt::Display) -> LabError {
    LabError::Chart(e.to_string())
}

/// The axes' ranges: every finite point, the y axis from zero when nothing is negative.
fn bounds(chart: &Chart) -> (f64, f64, f64, f64) {
    let pts = || {
        chart
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, 0.0f64, f64::MIN);
    for (x, y) in pts() {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if x0 == x1 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    (x0, x1, y0, y0 + (y1 - y0) * 1.12)
}

/// The chart as a standalone `<svg>` element.
pub fn svg(chart: &Chart) -> Result<String, LabError> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (x0, x1, y0, y1) = bounds(chart);
        let mut c = ChartBuilder::on(&root)
            .caption(&chart.title, ("sans-serif", 16))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc(chart.x_label.as_str())
            .y_desc(chart.y_label.as_str())
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(err)?;
        let (mut measured, mut references) = (0, 0);
        for s in &chart.series {
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            if s.reference {
                let color = REFERENCE[references % REFERENCE.len()];
                references += 1;
                c.draw_series(DashedLineSeries::new(points, 6, 4, color.stroke_width(1)))
                    .map_err(err)?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            } else {
                let color = PALETTE[measured % PALETTE.len()];
                measured += 1;
                c.draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(3))
                    .map_err(err)?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
            }
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Series;

    #[test]
    fn a_chart_is_one_svg_with_its_title_legend_and_lines() {
        let chart = Chart {
            title: "Page time".into(),
            x_label: "round trip (ms)".into(),
            y_label: "time (ms)".into(),
            series: vec![
                Series::new("composite", vec![(0.0, 3.0), (20.0, 24.0), (80.0, 85.0)]),
                Series::new("sequential", vec![(0.0, 4.0), (20.0, 85.0), (80.0, 330.0)]),
                Series::reference("timeout", vec![(0.0, 100.0), (80.0, 100.0)]),
                Series::new("empty", vec![(f64::NAN, 1.0)]),
            ],
        };
        let svg = svg(&chart).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert_eq!(svg.matches("<svg").count(), 1);
        for text in [
            "Page time",
            "composite",
            "sequential",
            "timeout",
            "round trip (ms)",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        // Nothing loaded from elsewhere.
        assert!(!svg.contains("href"));
    }

    #[test]
    fn bounds_hold_every_point_and_start_at_zero() {
        let chart = Chart {
            title: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            series: vec![Series::new("a", vec![(5.0, 10.0), (7.0, 20.0)])],
        };
        let (x0, x1, y0, y1) = bounds(&chart);
        assert_eq!((x0, x1, y0), (5.0, 7.0, 0.0));
        assert!(y1 > 20.0);
    }
}
