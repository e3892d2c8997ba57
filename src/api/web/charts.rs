//! Charts drawn on the server as SVG (plotters, its SVG backend only): the pages need no
//! JavaScript and no external assets. Byte figures are scaled to one binary unit chosen
//! from the largest value (B, KiB, MiB, GiB, TiB), which labels the y axis; the x axis is
//! the day of the month. Every day is one marker (`<circle>`) per series, so a chart of a
//! 30-day month has 30 of them per series.

use plotters::prelude::*;

use crate::domain::Error;

/// One line of a chart: its name, colour and one value per day.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: RGBColor,
    pub values: &'a [i64],
}

/// Blue and orange, told apart by people with the common colour blindnesses.
pub const BLUE: RGBColor = RGBColor(31, 119, 180);
pub const ORANGE: RGBColor = RGBColor(230, 120, 20);

/// The binary unit that shows `max` bytes with at most four digits before the point.
pub fn byte_unit(max: i64) -> (&'static str, f64) {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut i = 0;
    let mut scale = 1f64;
    while i + 1 < UNITS.len() && (max as f64) / scale >= 1024.0 {
        scale *= 1024.0;
        i += 1;
    }
    (UNITS[i], scale)
}

/// A line chart of daily byte figures, as an SVG document.
pub fn daily_bytes(title: &str, series: &[Series<'_>]) -> Result<String, Error> {
    let days = series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let (unit, scale) = byte_unit(max);
    let top = (max as f64 / scale * 1.1).max(1.0);
    let mut svg = String::new();
    draw(&mut svg, title, unit, days, top, scale, series)
        .map_err(|e| Error::Internal(format!("drawing a chart: {e}")))?;
    Ok(svg)
}

fn draw(
    svg: &mut String,
    title: &str,
    unit: &str,
    days: usize,
    top: f64,
    scale: f64,
    series: &[Series<'_>],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, (720, 300)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.5f64..days as f64 + 0.5, 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("day of month (UTC)")
        .y_desc(unit)
        .x_labels(days.min(16))
        .x_label_formatter(&|d| format!("{d:.0}"))
        .y_label_formatter(&|v| {
            if top >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for s in series {
        let points: Vec<(f64, f64)> = s
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64 + 1.0, *v as f64 / scale))
            .collect();
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
        )?;
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// A tiny line of daily totals for a table cell: one `<circle>` per day, no axes.
pub fn sparkline(values: &[i64]) -> Result<String, Error> {
    let mut svg = String::new();
    let days = values.len().max(1);
    let max = values.iter().copied().max().unwrap_or(0).max(1) as f64;
    (|| -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::with_string(&mut svg, (120, 28)).into_drawing_area();
        let mut chart = ChartBuilder::on(&root)
            .margin(3)
            .build_cartesian_2d(0.5f64..days as f64 + 0.5, 0f64..max * 1.05)?;
        let points: Vec<(f64, f64)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64 + 1.0, *v as f64))
            .collect();
        chart.draw_series(LineSeries::new(
            points.iter().copied(),
            BLUE.stroke_width(1),
        ))?;
        chart.draw_series(
            points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 1, BLUE.filled())),
        )?;
        root.present()?;
        Ok(())
    })()
    .map_err(|e| Error::Internal(format!("drawing a sparkline: {e}")))?;
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_keep_four_digits_at_most() {
        assert_eq!(byte_unit(0).0, "B");
        assert_eq!(byte_unit(1023).0, "B");
        assert_eq!(byte_unit(1024).0, "KiB");
        assert_eq!(byte_unit(3 << 30).0, "GiB");
        assert_eq!(byte_unit(i64::MAX).0, "TiB");
    }

    #[test]
    fn one_marker_per_day_and_series() {
        let a: Vec<i64> = (0..30).map(|d| d * (1 << 30)).collect();
        let b = vec![0; 30];
        let svg = daily_bytes(
            "stored",
            &[
                Series {
                    name: "egress",
                    color: BLUE,
                    values: &a,
                },
                Series {
                    name: "ingress",
                    color: ORANGE,
                    values: &b,
                },
            ],
        )
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..60]);
        assert_eq!(svg.matches("<circle").count(), 60);
        assert!(svg.contains("GiB"), "the y axis names the unit");
        assert!(svg.contains("day of month (UTC)"));
        assert_eq!(sparkline(&a).unwrap().matches("<circle").count(), 30);
    }
}
