//! The benchmark's plot: latency against tokens generated, and tokens/s with pipelining on and off.
//! SVG with the `plot` feature (on by default): plotters' own estimate lays the text out and whatever
//! shows the file draws it, so no font is needed. PNG with the `plot-png` feature (off by default): a
//! rasteriser and a font shipped in the binary.

use std::path::Path;

#[cfg(feature = "plot")]
use anyhow::Context as _;
#[cfg(feature = "plot")]
use plotters::coord::Shift;
#[cfg(feature = "plot")]
use plotters::prelude::*;

use crate::bench::Results;

/// The PNG plots' font, shipped with usine (DejaVu Sans Mono, Bitstream Vera licence: see
/// `assets/DejaVuSansMono.LICENSE`), so that a plot needs nothing from the system.
#[cfg(feature = "plot-png")]
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

#[cfg(feature = "plot")]
const SIZE: (u32, u32) = (1000, 420);

/// Checks, before the benchmark runs, that this build can draw the format `path` names.
pub(crate) fn check(path: &Path) -> anyhow::Result<()> {
    let (format, feature, built) = match extension(path).as_deref() {
        Some("svg") => ("SVG", "plot", cfg!(feature = "plot")),
        Some("png") => ("PNG", "plot-png", cfg!(feature = "plot-png")),
        _ => anyhow::bail!("cannot plot to {}: the file name must end in .svg or .png", path.display()),
    };
    anyhow::ensure!(
        built,
        "cannot plot to {}: {format} plots need the `{feature}` feature, which this usine was built without \
         (build it with `--features {feature}`)",
        path.display()
    );
    Ok(())
}

fn extension(path: &Path) -> Option<String> {
    path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase)
}

/// Without the `plot` feature there is nothing to draw with: the same error as [`check`].
#[cfg(not(feature = "plot"))]
pub(crate) fn draw(_results: &Results, path: &Path) -> anyhow::Result<()> {
    check(path)
}

#[cfg(feature = "plot")]
pub(crate) fn draw(results: &Results, path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !results.max_tokens.is_empty() || results.pipeline.is_some(),
        "nothing to plot: the plot shows the `max-tokens` and `pipeline` suites"
    );
    check(path)?;
    #[cfg(feature = "plot-png")]
    register_font()?;
    match extension(path).as_deref() {
        #[cfg(feature = "plot-png")]
        Some("png") => render(results, &BitMapBackend::new(path, SIZE).into_drawing_area()),
        _ => render(results, &SVGBackend::new(path, SIZE).into_drawing_area()),
    }
    .with_context(|| format!("drawing {}", path.display()))
}

/// Gives the backends their font: text is laid out with it (and drawn with it in a PNG).
#[cfg(feature = "plot-png")]
fn register_font() -> anyhow::Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the shipped font does not read as TrueType"))
}

#[cfg(feature = "plot")]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_this_build_cannot_draw_is_refused_naming_the_feature() {
        let png = check(Path::new("bench.png"));
        assert_eq!(png.is_ok(), cfg!(feature = "plot-png"));
        if let Err(error) = png {
            assert!(error.to_string().contains("the `plot-png` feature"), "{error}");
        }
        let svg = check(Path::new("bench.SVG"));
        assert_eq!(svg.is_ok(), cfg!(feature = "plot"));
        if let Err(error) = svg {
            assert!(error.to_string().contains("the `plot` feature"), "{error}");
        }
        let other = check(Path::new("bench.pdf")).expect_err("not a format");
        assert!(other.to_string().contains("must end in .svg or .png"), "{other}");
    }
}
