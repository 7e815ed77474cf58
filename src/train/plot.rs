//! PNG charts: the loss curve of a run and generic line / grouped-bar charts (e.g. the
//! share of tokens each expert receives, per layer).
//!
//! The font is compiled in (assets/DejaVuSans.ttf) so charts render identically on
//! machines without any fonts installed.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::metrics::{self, Record};
use crate::{Error, Result};

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
/// Distinguishable colours, in the order series are drawn.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Title, axis labels and pixel size of a chart.
#[derive(Clone, Debug)]
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub size: (u32, u32),
}

/// One line of a line chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One group of bars: a value per category (e.g. one layer's share per expert).
#[derive(Clone, Debug, PartialEq)]
pub struct BarGroup {
    pub name: String,
    pub values: Vec<f64>,
}

/// Draws `loss.png`: train and validation LM loss from a metrics file.
pub fn plot_loss(metrics_path: &Path, out: &Path) -> Result<()> {
    let records = metrics::read(metrics_path)?;
    // The LM loss on both sides, so the curves compare (the trained total adds the aux losses).
    let mut train = Series { name: "train LM loss".into(), points: Vec::new() };
    let mut val = Series { name: "val loss".into(), points: Vec::new() };
    for r in records {
        match r {
            Record::Train(t) => train.points.push((t.step as f64, f64::from(t.lm_loss))),
            Record::Eval(e) => val.points.push((e.step as f64, f64::from(e.val_loss))),
        }
    }
    let chart = Chart { title: "Loss", x_label: "step", y_label: "loss (nats/token)", size: (900, 560) };
    line_chart(out, &chart, &[train, val])
}

/// A line chart of `series` (empty series are skipped; series with few points get markers).
pub fn line_chart(out: &Path, chart: &Chart, series: &[Series]) -> Result<()> {
    let finite = || series.iter().flat_map(|s| &s.points).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (x0, x1) = bounds(finite().map(|p| p.0)).ok_or_else(|| Error::Invalid(format!("{}: no finite points to plot", out.display())))?;
    let (y0, y1) = bounds(finite().map(|p| p.1)).expect("x bounds exist, so y bounds do");
    let pad = (y1 - y0) * 0.05;
    draw(out, || {
        let root = BitMapBackend::new(out, chart.size).into_drawing_area();
        let mut c = frame(&root, chart, x0..x1, (y0 - pad)..(y1 + pad))?;
        c.configure_mesh()
            .x_desc(chart.x_label)
            .y_desc(chart.y_label)
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 17))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for (i, s) in series.iter().enumerate().filter(|(_, s)| !s.points.is_empty()) {
            let color = PALETTE[i % PALETTE.len()];
            let points: Vec<(f64, f64)> = s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
            c.draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
            if points.len() <= 60 {
                c.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            }
        }
        legend(&mut c, 16)?;
        root.present()?;
        Ok(())
    })
}

/// A grouped bar chart: for each category on the x axis, one bar per group side by side.
pub fn bar_chart(out: &Path, chart: &Chart, categories: &[String], groups: &[BarGroup]) -> Result<()> {
    if categories.is_empty() || groups.is_empty() {
        return Err(Error::Invalid(format!("{}: a bar chart needs categories and groups", out.display())));
    }
    if let Some(g) = groups.iter().find(|g| g.values.len() != categories.len()) {
        return Err(Error::Invalid(format!(
            "{}: group `{}` has {} values for {} categories",
            out.display(),
            g.name,
            g.values.len(),
            categories.len()
        )));
    }
    let top = groups.iter().flat_map(|g| &g.values).copied().filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.1 } else { 1.0 };
    let n = categories.len();
    let width = 0.8 / groups.len() as f64;
    draw(out, || {
        let root = BitMapBackend::new(out, chart.size).into_drawing_area();
        let mut c = frame(&root, chart, -0.5f64..(n as f64 - 0.5), 0f64..top)?;
        let label = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
                categories[i as usize].clone()
            } else {
                String::new()
            }
        };
        c.configure_mesh()
            .x_desc(chart.x_label)
            .y_desc(chart.y_label)
            .x_labels(n)
            .x_label_formatter(&label)
            .disable_x_mesh()
            .light_line_style(WHITE.mix(0.0))
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 17))
            .draw()?;
        for (gi, g) in groups.iter().enumerate() {
            let color = PALETTE[gi % PALETTE.len()];
            let left = |ci: usize| ci as f64 - 0.4 + gi as f64 * width;
            c.draw_series(
                g.values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(ci, &v)| Rectangle::new([(left(ci), 0.0), (left(ci) + width * 0.92, v)], color.filled())),
            )?
            .label(g.name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        }
        if groups.len() > 1 {
            legend(&mut c, 15)?;
        }
        root.present()?;
        Ok(())
    })
}

type PlotResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;
type Frame<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The frame every chart shares: white canvas, title, margins and label areas.
fn frame<'a, 'b>(root: &'a DrawingArea<BitMapBackend<'b>, Shift>, chart: &Chart, x: std::ops::Range<f64>, y: std::ops::Range<f64>) -> PlotResult<Frame<'a, 'b>> {
    root.fill(&WHITE)?;
    Ok(ChartBuilder::on(root).caption(chart.title, (FAMILY, 26)).margin(16).x_label_area_size(44).y_label_area_size(64).build_cartesian_2d(x, y)?)
}

/// The legend box in the upper right corner.
fn legend<'a, 'b: 'a>(c: &mut Frame<'a, 'b>, font_size: u32) -> PlotResult<()> {
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, font_size))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Registers the embedded font once, runs `body`, and turns plotting errors into ours.
fn draw(out: &Path, body: impl FnOnce() -> std::result::Result<(), Box<dyn std::error::Error>>) -> Result<()> {
    static FONT_OK: OnceLock<bool> = OnceLock::new();
    if !*FONT_OK.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok()) {
        return Err(Error::Invalid("the embedded font assets/DejaVuSans.ttf could not be loaded".into()));
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    body().map_err(|e| Error::Invalid(format!("{}: cannot draw chart: {e}", out.display())))
}

/// An axis tick: whole numbers (steps) without a decimal point, others with at most four
/// decimals (tick positions like 0.6000000000000001 come from float steps).
fn tick(x: &f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else {
        let s = format!("{x:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// (min, max) of `values`, widened when they are all equal so the axis has a range.
fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        None
    } else if lo == hi {
        Some((lo - 0.5, hi + 0.5))
    } else {
        Some((lo, hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::metrics::{EvalRecord, MetricsWriter, TrainRecord};

    /// Width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
        (be(16), be(20))
    }

    fn out_dir(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("motley-plot-{}-{name}", std::process::id()))
    }

    #[test]
    fn loss_png_from_metrics() {
        let dir = out_dir("loss");
        std::fs::create_dir_all(&dir).unwrap();
        let metrics = dir.join("metrics.jsonl");
        let mut w = MetricsWriter::create(&metrics).unwrap();
        for step in 1..=300u64 {
            let loss = 2.0 + 4.2 * (-(step as f32) / 60.0).exp() + 0.05 * ((step * 7919 % 13) as f32 / 13.0);
            w.train(&TrainRecord { step, loss, lm_loss: loss, ..Default::default() }).unwrap();
            if step % 50 == 0 {
                w.eval(&EvalRecord { step, val_loss: loss + 0.15, ..Default::default() }).unwrap();
            }
        }
        let png = dir.join("loss.png");
        plot_loss(&metrics, &png).unwrap();
        assert_eq!(png_size(&png), (900, 560));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bar_chart_of_expert_shares() {
        let dir = out_dir("bars");
        let png = dir.join("routing.png");
        let categories: Vec<String> = (0..8).map(|i| format!("e{i}")).collect();
        let groups: Vec<BarGroup> = (0..4)
            .map(|l| BarGroup { name: format!("layer {l}"), values: (0..8).map(|e| (8 - e + l) as f64 / 60.0).collect() })
            .collect();
        let chart = Chart { title: "Token share per expert", x_label: "expert", y_label: "share of tokens", size: (800, 450) };
        bar_chart(&png, &chart, &categories, &groups).unwrap();
        assert_eq!(png_size(&png), (800, 450));
        let short = [BarGroup { name: "layer 0".into(), values: vec![1.0] }];
        assert!(bar_chart(&png, &chart, &categories, &short).unwrap_err().to_string().contains("layer 0"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_metrics_is_an_error() {
        let dir = out_dir("empty");
        std::fs::create_dir_all(&dir).unwrap();
        let metrics = dir.join("metrics.jsonl");
        std::fs::write(&metrics, "").unwrap();
        let e = plot_loss(&metrics, &dir.join("loss.png")).unwrap_err().to_string();
        assert!(e.contains("no finite points"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
