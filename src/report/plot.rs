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

/// The x axis: its description and how its tick values are written.
pub struct Axis<'a> {
    pub desc: &'a str,
    pub format: &'a dyn Fn(f64) -> String,
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    axis: &Axis,
    original: &PlotPoint,
    points: &[PlotPoint],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let all = points.iter().chain(std::iter::once(original));
    let x = |p: &PlotPoint| p.cost.max(f64::MIN_POSITIVE);
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
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
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
) -> Result<()> {
    register_font()?;
    let svg = stem.with_extension("svg");
    draw(SVGBackend::new(&svg, (960, 600)).into_drawing_area(), title, axis, original, points)
        .with_context(|| format!("drawing {}", svg.display()))?;
    let png = stem.with_extension("png");
    draw(BitMapBackend::new(&png, (960, 600)).into_drawing_area(), title, axis, original, points)
        .with_context(|| format!("drawing {}", png.display()))?;
    Ok(())
}
