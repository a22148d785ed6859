//! The benchmark's plot: latency against tokens generated, and tokens/s with pipelining on and off.
//! SVG needs nothing; PNG draws its text with a TrueType font found on the system.

use std::path::Path;

use anyhow::Context as _;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::bench::Results;

/// Where PNG text fonts are looked for, most common first.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

const SIZE: (u32, u32) = (1000, 420);

pub(crate) fn draw(results: &Results, path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !results.max_tokens.is_empty() || results.pipeline.is_some(),
        "nothing to plot: the plot shows the `max-tokens` and `pipeline` suites"
    );
    let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("svg") => render(results, &SVGBackend::new(path, SIZE).into_drawing_area()),
        Some("png") => {
            register_font()?;
            let area = BitMapBackend::new(path, SIZE).into_drawing_area();
            render(results, &area)
        }
        _ => anyhow::bail!("cannot plot to {}: the file name must end in .svg or .png", path.display()),
    }
    .with_context(|| format!("drawing {}", path.display()))
}

/// Gives the bitmap backend a font (it has none of its own).
fn register_font() -> anyhow::Result<()> {
    let path = FONTS.iter().find(|path| Path::new(path).is_file()).context(
        "a PNG plot needs a TrueType font and none was found (on Debian: `apt install fonts-dejavu-core`); an SVG plot needs none",
    )?;
    let bytes = std::fs::read(path).with_context(|| format!("reading the font {path}"))?;
    // The backend keeps fonts for the life of the process; this one is read once per run.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("the font {path} does not read as TrueType"))
}

fn render<DB: DrawingBackend>(results: &Results, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let error = |error: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{error}");
    root.fill(&WHITE).map_err(error)?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    if !results.max_tokens.is_empty() {
        let points: Vec<(f64, f64)> =
            results.max_tokens.iter().map(|row| (f64::from(row.tokens), row.total_seconds)).collect();
        let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.1;
        let max_y = points.iter().map(|p| p.1).fold(0.1, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&left)
            .caption(format!("{}: latency against tokens", results.model), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..max_x, 0.0..max_y)
            .map_err(error)?;
        chart.configure_mesh().x_desc("tokens generated").y_desc("latency (s)").draw().map_err(error)?;
        chart.draw_series(LineSeries::new(points.clone(), &BLUE)).map_err(error)?;
        chart.draw_series(points.iter().map(|&point| Circle::new(point, 4, BLUE.filled()))).map_err(error)?;
    }
    if let Some(pipeline) = &results.pipeline {
        let bars = [("on", pipeline.on_tokens_per_second), ("off", pipeline.off_tokens_per_second)];
        let max_y = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(&right)
            .caption(format!("pipelining: {:.2}× faster", pipeline.speedup), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..2.0, 0.0..max_y)
            .map_err(error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(3)
            .x_label_formatter(&|x: &f64| {
                if (0.0..1.0).contains(x) {
                    "on".to_owned()
                } else if (1.0..2.0).contains(x) {
                    "off".to_owned()
                } else {
                    String::new()
                }
            })
            .y_desc("tokens/s")
            .draw()
            .map_err(error)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(index, &(_, rate))| {
                let x = index as f64;
                let color = if index == 0 { GREEN } else { RED };
                Rectangle::new([(x + 0.2, 0.0), (x + 0.8, rate)], color.filled())
            }))
            .map_err(error)?;
    }
    root.present().map_err(error)?;
    Ok(())
}
