//! The frontier plot: accuracy against a cost (ReLU count, or estimated PI bytes or latency; log
//! scale), as SVG and PNG.

use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// A labelled point of the plot.
pub struct PlotPoint {
    /// The cost on the x axis.
    pub cost: f64,
    pub accuracy: f64,
    pub label: String,
}

/// Where Debian's fonts-dejavu-core puts the font labels are measured and drawn with.
const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = std::fs::read(FONT_PATH)
            .with_context(|| format!("the PNG plot needs {FONT_PATH} (Debian: fonts-dejavu-core)"))
            .and_then(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| anyhow::anyhow!("{FONT_PATH} is not a usable font"))
            });
    });
    result
}

/// Points of another method drawn beside the frontier (`pareto --reference`).
pub struct Reference<'a> {
    pub name: &'a str,
    pub points: &'a [PlotPoint],
}

/// The x axis: its description and how its tick values are written.
pub struct Axis<'a> {
    pub desc: &'a str,
    pub format: &'a dyn Fn(f64) -> String,
}

/// Where a point that costs nothing (every ReLU culled) sits on the log axis: half the cheapest
/// point that costs something, so the axis spans the real points' decades and no more (a floor
/// of `f64::MIN_POSITIVE` gave plotters 600 decades of ticks to lay out, which never ended).
fn zero_cost_at(points: &[PlotPoint], original: &PlotPoint) -> f64 {
    let cheapest = points
        .iter()
        .chain(std::iter::once(original))
        .map(|p| p.cost)
        .filter(|&c| c > 0.0 && c.is_finite())
        .fold(f64::INFINITY, f64::min);
    if cheapest.is_finite() {
        cheapest / 2.0
    } else {
        1.0
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    axis: &Axis,
    original: &PlotPoint,
    points: &[PlotPoint],
    reference: Option<&Reference>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let others: &[PlotPoint] = reference.map(|r| r.points).unwrap_or(&[]);
    let all = points.iter().chain(others).chain(std::iter::once(original));
    let x = |p: &PlotPoint| p.cost.max(zero_cost_at(points, original));
    let min_r = all.clone().map(x).fold(f64::INFINITY, f64::min);
    let max_r = all.clone().map(x).fold(f64::NEG_INFINITY, f64::max);
    let min_a = all.clone().map(|p| p.accuracy).fold(f64::INFINITY, f64::min);
    let max_a = all.map(|p| p.accuracy).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((max_a - min_a) * 0.08).max(0.005);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(
            ((min_r / 1.6)..(max_r * 1.6)).log_scale(),
            (100.0 * (min_a - pad))..(100.0 * (max_a + pad)),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc(format!("{} (log scale)", axis.desc))
        .y_desc("test accuracy (%)")
        .x_label_formatter(&|v| (axis.format)(*v))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let series: Vec<(f64, f64)> = points.iter().map(|p| (x(p), 100.0 * p.accuracy)).collect();
    chart
        .draw_series(LineSeries::new(series.clone(), &BLUE))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .label("relucompile")
        .legend(|(x, y)| Circle::new((x + 10, y), 4, BLUE.filled()));
    if let Some(r) = reference {
        let black = RGBColor(40, 40, 40);
        chart
            .draw_series(r.points.iter().map(|p| {
                EmptyElement::at((x(p), 100.0 * p.accuracy))
                    + Cross::new((0, 0), 5, black.stroke_width(2))
                    + Text::new(p.label.clone(), (6, 4), ("sans-serif", 11))
            }))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(r.name)
            .legend(move |(x, y)| Cross::new((x + 10, y), 5, black.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    chart
        .draw_series(points.iter().map(|p| {
            let at = (x(p), 100.0 * p.accuracy);
            EmptyElement::at(at)
                + Circle::new((0, 0), 4, BLUE.filled())
                + Text::new(p.label.clone(), (6, -14), ("sans-serif", 11))
        }))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let at = (x(original), 100.0 * original.accuracy);
    chart
        .draw_series(std::iter::once(
            EmptyElement::at(at)
                + TriangleMarker::new((0, 0), 7, RED.filled())
                + Text::new(original.label.clone(), (-60, 10), ("sans-serif", 12)),
        ))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

/// Write `stem.svg` and `stem.png`.
pub fn frontier_plot(
    stem: &Path,
    title: &str,
    axis: &Axis,
    original: &PlotPoint,
    points: &[PlotPoint],
    reference: Option<&Reference>,
) -> Result<()> {
    register_font()?;
    let svg = stem.with_extension("svg");
    let area = SVGBackend::new(&svg, (960, 600)).into_drawing_area();
    draw(area, title, axis, original, points, reference)
        .with_context(|| format!("drawing {}", svg.display()))?;
    let png = stem.with_extension("png");
    let area = BitMapBackend::new(&png, (960, 600)).into_drawing_area();
    draw(area, title, axis, original, points, reference)
        .with_context(|| format!("drawing {}", png.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(cost: f64, accuracy: f64) -> PlotPoint {
        PlotPoint { cost, accuracy, label: format!("{cost}") }
    }

    #[test]
    fn a_point_without_relus_sits_half_a_step_below_the_cheapest() {
        let points = [point(0.0, 0.1), point(4000.0, 0.5), point(9000.0, 0.8)];
        let original = point(20000.0, 0.9);
        assert_eq!(zero_cost_at(&points, &original), 2000.0);
        assert_eq!(zero_cost_at(&[point(0.0, 0.1)], &point(0.0, 0.2)), 1.0);
    }

    #[test]
    fn a_frontier_with_a_zero_cost_point_is_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let format = |v: f64| format!("{v:.0}");
        let axis = Axis { desc: "ReLUs", format: &format };
        let points = [point(0.0, 0.1), point(4000.0, 0.5), point(9000.0, 0.8)];
        let f = dir.path().join("f");
        frontier_plot(&f, "t", &axis, &point(20000.0, 0.9), &points, None).unwrap();
        assert!(dir.path().join("f.svg").metadata().unwrap().len() > 1000);
        assert!(dir.path().join("f.png").metadata().unwrap().len() > 1000);
    }
}
