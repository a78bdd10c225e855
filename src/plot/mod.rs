//! PNG charts: for experiments, a metric against the number of edits, one line per setting,
//! and grouped bars; for audits, heatmaps of |ΔW/W|; for causal traces, labelled grids. Drawn
//! with plotters into memory with an embedded font (DejaVu Sans, see `DejaVuSans-LICENSE.txt`),
//! so no system font is needed, and written atomically.

use crate::atomic::Policy;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

const FONT: &[u8] = include_bytes!("DejaVuSans.ttf");
const SIZE: (u32, u32) = (900, 560);
/// Line and bar colours, in series order (colour-blind-safe Okabe-Ito).
const COLOURS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(0, 0, 0),
];

/// Everything that can go wrong drawing a chart.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// plotters failed to lay out or draw the chart.
    #[error("{path}: cannot draw the chart: {reason}")]
    Draw { path: PathBuf, reason: String },
    /// The PNG could not be encoded or written.
    #[error(transparent)]
    Io(#[from] crate::IoError),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One named line (or one bar per group), drawn in colour `colour` (an index into the
/// palette), dashed or solid.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub colour: usize,
    pub dashed: bool,
}

/// Which axes of a line chart are logarithmic (every value on them must be positive).
#[derive(Clone, Copy, Debug, Default)]
pub struct Axes {
    pub log_x: bool,
    pub log_y: bool,
}

/// A line chart of `series` (x: edits, y: the metric). A logarithmic axis is drawn as a linear
/// one over log₁₀ of the values, its labels showing the values themselves. Written as `policy`
/// allows.
pub fn lines(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series], axes: Axes, policy: &Policy) -> Result<()> {
    let map = |log: bool, v: f64| if log { v.log10() } else { v };
    let series: Vec<Series> =
        series.iter().map(|s| Series { points: s.points.iter().map(|&(x, y)| (map(axes.log_x, x), map(axes.log_y, y))).collect(), ..s.clone() }).collect();
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x_max = all().fold(if axes.log_x { 0.1f64 } else { 1.0 }, |x, p| x.max(p.0));
    let (y_min, y_max) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    // The axis spans the data (a 21 → 24 perplexity rise stays visible), padded a little.
    let pad = if y_max > y_min { 0.08 * (y_max - y_min) } else { 0.05 * y_max.abs().max(1e-3) };
    let (y_min, y_top) = if y_min.is_finite() { (y_min - pad, y_max + pad) } else { (0.0, 1.0) };
    // A log axis is labelled at the powers of ten only (1, 10, 100; 1e6), with no grid lines.
    let power = |v: &f64| {
        if (v - v.round()).abs() > 1e-3 {
            String::new()
        } else if v.abs() < 4.5 {
            format!("{}", 10f64.powi(v.round() as i32))
        } else {
            format!("1e{}", v.round())
        }
    };
    let (x_min, x_top) = if axes.log_x { (-0.08 * x_max.max(1.0), x_max + 0.08 * x_max.max(1.0)) } else { (0.0, x_max) };
    render(path, SIZE, policy, |root| {
        let mut chart = frame(&root, title).build_cartesian_2d(x_min..x_top, y_min..y_top)?;
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(WHITE).x_desc(x_label).y_desc(y_label).label_style(("sans-serif", 14));
        if axes.log_x {
            mesh.x_labels(40).x_label_formatter(&power).disable_x_mesh();
        }
        if axes.log_y {
            mesh.y_labels(60).y_label_formatter(&power).disable_y_mesh();
        }
        mesh.draw()?;
        for s in &series {
            let c = COLOURS[s.colour % COLOURS.len()];
            let points = s.points.iter().copied();
            let drawn = if s.dashed {
                chart.draw_series(DashedLineSeries::new(points.clone(), 8, 5, c.stroke_width(2)))?;
                chart.draw_series(points.map(|p| Circle::new(p, 3, c.filled())))?
            } else {
                chart.draw_series(LineSeries::new(points, c.stroke_width(2)).point_size(3))?
            };
            let dashed = s.dashed;
            drawn
                .label(s.label.as_str())
                .legend(move |(x, y)| PathElement::new(if dashed { vec![(x, y), (x + 7, y)] } else { vec![(x, y), (x + 18, y)] }, c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
        Ok(())
    })
}

/// Grouped bars: for each of `groups` (e.g. RECT settings), one bar per series (e.g. metric),
/// series `s` having value `s.points[g].1` in group `g`. Written as `policy` allows.
pub fn bars(path: &Path, title: &str, y_label: &str, groups: &[String], series: &[Series], policy: &Policy) -> Result<()> {
    let y_max = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0f64, f64::max).max(1e-9) * 1.1;
    let n = series.len().max(1) as f64;
    render(path, SIZE, policy, |root| {
        let mut chart = frame(&root, title).build_cartesian_2d(0f64..groups.len() as f64, 0f64..y_max)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(groups.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let g = x.floor() as usize;
                if (x - g as f64 - 0.5).abs() < 1e-6 {
                    groups.get(g).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let c = COLOURS[s.colour % COLOURS.len()];
            let left = |g: usize| g as f64 + 0.1 + 0.8 * i as f64 / n;
            let bars = s.points.iter().take(groups.len()).enumerate().map(|(g, &(_, v))| Rectangle::new([(left(g), 0.0), (left(g) + 0.8 / n, v)], c.filled()));
            chart.draw_series(bars)?.label(s.label.as_str()).legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
        Ok(())
    })
}

/// One matrix of a heatmap: |ΔW/W| per element, row-major, 0 where the element is unchanged.
#[derive(Clone, Debug, Default)]
pub struct Matrix {
    pub title: String,
    /// Axis titles, e.g. "columns (in, 1536)" and "rows (out, 576)".
    pub x_label: String,
    pub y_label: String,
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

/// The heatmap colour of an unchanged element (a zero delta).
pub const UNCHANGED: RGBColor = RGBColor(222, 222, 222);
/// Heatmap colours, one per decade of |ΔW/W| from 10^-6 to 1 (viridis); values beyond take the
/// end colours. Few distinct colours also keep the PNG small.
const DECADES: [RGBColor; 6] =
    [RGBColor(68, 1, 84), RGBColor(65, 68, 135), RGBColor(42, 120, 142), RGBColor(34, 168, 132), RGBColor(122, 209, 81), RGBColor(253, 231, 37)];
/// Longest side of a heatmap panel, in pixels.
const PANEL: usize = 512;

/// Heatmaps of `matrices`, one panel each from top to bottom, under `title` and one line per
/// note, with one colour bar.
///
/// Each pixel shows one element, sampled (nearest neighbour), never a max or mean of several:
/// a 576 × 1536 matrix shows every 3rd row and column, a small one is magnified. So a colour is
/// a real element's |ΔW/W| and the share of 'unchanged' pixels estimates the share of unchanged
/// elements, and RECT's sparsity shows: max-pooling painted a pixel as soon as one element of
/// its block changed, and the RECT and dense heatmaps looked alike.
pub fn heatmap(path: &Path, title: &str, notes: &[String], matrices: &[Matrix]) -> Result<()> {
    const LEFT: usize = 90; // margin, row ticks and axis title
    const CAPTION: usize = 28; // panel title
    const BOTTOM: usize = 50; // column ticks and axis title
    const GAP: usize = 14;
    const BAR: (usize, usize) = (200, 330); // colour bar and swatch
    let top = 48 + 22 * notes.len(); // title and notes
    let sizes: Vec<(usize, usize, usize)> = matrices.iter().map(|m| panel_size(m.rows, m.cols)).collect();
    let width = LEFT + sizes.iter().map(|s| s.0).max().unwrap_or(0).max(PANEL) + 40 + BAR.0;
    let height = (top + sizes.iter().map(|s| CAPTION + s.1 + BOTTOM + GAP).sum::<usize>()).max(top + BAR.1);
    render(path, (width as u32, height as u32), &Policy::new(), |root| {
        root.draw_text(title, &text(22), (16, 12))?;
        for (i, note) in notes.iter().enumerate() {
            root.draw_text(note, &text(14), (16, 44 + 22 * i as i32))?;
        }
        let mut y0 = top;
        for (m, &(w, h, step)) in matrices.iter().zip(&sizes) {
            let area = root.clone().shrink((0, y0 as i32), ((LEFT + w + 20) as i32, (CAPTION + h + BOTTOM) as i32));
            let scale = if step > 1 {
                format!("1 pixel = 1 element of each {step} × {step} block")
            } else {
                format!("1 element = {} × {} pixels", w / m.cols.max(1), h / m.rows.max(1))
            };
            area.draw_text(&m.title, &text(15), (LEFT as i32, 4))?;
            // Row 0 at the top: the y axis runs from -rows up to 0, labelled without the sign.
            let mut chart = ChartBuilder::on(&area)
                .margin_top(CAPTION as i32)
                .margin_left(16)
                .margin_right(20)
                .x_label_area_size(BOTTOM as i32)
                .y_label_area_size(LEFT as i32 - 16)
                .build_cartesian_2d(0..m.cols as i64, -(m.rows as i64)..0)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc(format!("{} · {scale}", m.x_label))
                .y_desc(&m.y_label)
                .y_label_formatter(&|r| (-r).to_string())
                .label_style(("sans-serif", 13))
                .draw()?;
            let (xs, ys) = chart.plotting_area().get_pixel_range();
            for y in 0..h {
                for x in 0..w {
                    let v = m.values[y * m.rows / h * m.cols + x * m.cols / w];
                    root.draw_pixel((xs.start + x as i32, ys.start + y as i32), &colour(v))?;
                }
            }
            y0 += CAPTION + h + BOTTOM + GAP;
        }
        colour_bar(&root.clone().shrink(((width - BAR.0) as i32, top as i32), (BAR.0 as i32, BAR.1 as i32)))
    })
}

/// One panel of [`grid`]: `values[row][col]`, each row labelled.
#[derive(Clone, Debug)]
pub struct Grid {
    pub title: String,
    pub row_labels: Vec<String>,
    pub x_label: String,
    pub values: Vec<Vec<f64>>,
}

/// Panels of labelled cells, one above the other (e.g. tokens × layers), coloured on one linear scale
/// from 0 to the largest value of all panels (viridis: dark low, yellow high), under `title` and
/// one line per note, with the scale's swatches at the bottom. Written as `policy` allows.
pub fn grid(path: &Path, title: &str, notes: &[String], scale_label: &str, panels: &[Grid], policy: &Policy) -> Result<()> {
    const CELL: (usize, usize) = (22, 24);
    const LABELS: usize = 150; // row labels
    let top = 48 + 22 * notes.len();
    let rows = panels.iter().map(|p| p.values.len()).max().unwrap_or(0);
    let cols = panels.iter().flat_map(|p| p.values.iter().map(Vec::len)).max().unwrap_or(0);
    let panel_w = LABELS + cols * CELL.0 + 24;
    let panel_h = 30 + rows * CELL.1 + 50;
    // Wide enough for the panels, and for the title and every note on one line.
    let text_w = |t: &str, size: u32| text(size).font.box_size(t).map_or(0, |(w, _)| w as usize);
    let words = notes.iter().map(|n| text_w(n, 14)).chain([text_w(title, 22)]).max().unwrap_or(0);
    let width = (panel_w + 40).max(words + 32).max(700);
    let height = top + panel_h * panels.len() + 60;
    let max = panels.iter().flat_map(|p| p.values.iter().flatten()).fold(0f64, |m, &v| m.max(v));
    let shade = |v: f64| viridis(if max > 0.0 { v / max } else { 0.0 });
    render(path, (width as u32, height as u32), policy, |root| {
        root.draw_text(title, &text(22), (16, 12))?;
        for (i, note) in notes.iter().enumerate() {
            root.draw_text(note, &text(14), (16, 44 + 22 * i as i32))?;
        }
        for (k, p) in panels.iter().enumerate() {
            let x0 = 16;
            let y0 = (top + k * panel_h) as i32;
            root.draw_text(&p.title, &text(16), (x0 + LABELS as i32, y0))?;
            for (r, row) in p.values.iter().enumerate() {
                let y = y0 + 30 + (r * CELL.1) as i32;
                root.draw_text(&p.row_labels[r], &text(13), (x0, y + 5))?;
                for (c, &v) in row.iter().enumerate() {
                    let x = x0 + (LABELS + c * CELL.0) as i32;
                    root.draw(&Rectangle::new([(x, y), (x + CELL.0 as i32 - 1, y + CELL.1 as i32 - 1)], shade(v).filled()))?;
                }
            }
            let y = y0 + 30 + (rows * CELL.1) as i32;
            for c in (0..cols).step_by(5) {
                root.draw_text(&c.to_string(), &text(12), (x0 + (LABELS + c * CELL.0) as i32 + 4, y + 4))?;
            }
            root.draw_text(&p.x_label, &text(14), (x0 + LABELS as i32, y + 24))?;
        }
        // The colour scale: ten swatches from 0 to the maximum.
        let y = (top + panel_h * panels.len() + 16) as i32;
        root.draw_text(&format!("{scale_label}: 0"), &text(14), (16, y + 2))?;
        for i in 0..10 {
            let x = 200 + 30 * i;
            root.draw(&Rectangle::new([(x, y), (x + 29, y + 18)], viridis(i as f64 / 9.0).filled()))?;
        }
        root.draw_text(&format!("{max:.3}"), &text(14), (200 + 30 * 10 + 8, y + 2))?;
        Ok(())
    })
}

/// Viridis at `t` in [0, 1], interpolated between its decade anchors.
fn viridis(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0) * (DECADES.len() - 1) as f64;
    let i = (t.floor() as usize).min(DECADES.len() - 2);
    let f = t - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (DECADES[i], DECADES[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// A `rows × cols` panel's size in pixels and its sampling step, (width, height, step): every
/// `step`-th row and column if the longer side exceeds [`PANEL`], else whole pixels per
/// element (step 1); each side at least 16 pixels.
fn panel_size(rows: usize, cols: usize) -> (usize, usize, usize) {
    let long = rows.max(cols).max(1);
    let step = long.div_ceil(PANEL);
    let zoom = (PANEL / 2 / long).max(1);
    let (w, h) = if step > 1 { (cols.div_ceil(step), rows.div_ceil(step)) } else { (cols * zoom, rows * zoom) };
    (w.max(16), h.max(16), step)
}

fn colour(v: f32) -> RGBColor {
    if v > 0.0 {
        DECADES[(v.log10().floor() as i32 + 6).clamp(0, 5) as usize]
    } else {
        UNCHANGED
    }
}

/// The colour bar: one block per decade of |ΔW/W| from 10^-6 to 1, then the 'unchanged' swatch.
fn colour_bar(area: &DrawingArea<BitMapBackend, plotters::coord::Shift>) -> DrawResult {
    area.draw_text("|ΔW/W|, log scale", &text(15), (0, 0))?;
    let mut chart = ChartBuilder::on(area).margin_top(34).margin_bottom(80).y_label_area_size(50).margin_right(110).build_cartesian_2d(0..1, -6..0)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .y_labels(7)
        .y_label_formatter(&|d| if *d == 0 { "1".to_string() } else { format!("1e{d}") })
        .label_style(("sans-serif", 13))
        .draw()?;
    chart.draw_series((-6..0).map(|d| Rectangle::new([(0, d), (1, d + 1)], DECADES[(d + 6) as usize].filled())))?;
    let y = area.dim_in_pixel().1 as i32 - 64;
    area.draw(&Rectangle::new([(50, y), (80, y + 20)], UNCHANGED.filled()))?;
    area.draw_text("unchanged (0)", &text(14), (88, y + 3))?;
    area.draw_text("< 1e-6: darkest, > 1: yellow", &text(12), (0, y + 34))?;
    Ok(())
}

fn text(size: u32) -> TextStyle<'static> {
    ("sans-serif", size).into_font().into()
}

/// The chart's caption, margins and label areas, shared by every kind of chart.
fn frame<'a, 'b>(root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>, title: &str) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut b = ChartBuilder::on(root);
    b.caption(title, ("sans-serif", 22)).margin(14).x_label_area_size(44).y_label_area_size(64);
    b
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Draws a `size` RGB image with `draw`, then writes it as a PNG at `path` atomically, as
/// `policy` allows.
fn render(path: &Path, size: (u32, u32), policy: &Policy, draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> DrawResult) -> Result<()> {
    static FONT_REGISTERED: std::sync::Once = std::sync::Once::new();
    FONT_REGISTERED.call_once(|| {
        // The font is part of this crate: it always parses.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let (w, h) = size;
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        let failed = |e: &dyn std::fmt::Display| Error::Draw { path: path.to_path_buf(), reason: e.to_string() };
        root.fill(&WHITE).map_err(|e| failed(&e))?;
        draw(root.clone()).map_err(|e| failed(&e))?;
        root.present().map_err(|e| failed(&e))?;
    }
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    enc.write_header().and_then(|mut wr| wr.write_image_data(&rgb)).map_err(std::io::Error::other).map_err(crate::io_err(path))?;
    Ok(crate::atomic::write(path, &bytes, policy).map_err(crate::io_err(path))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_lines_and_bars_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let series = vec![
            Series { label: "none".into(), points: vec![(1.0, 1.0), (10.0, 0.8), (20.0, 0.5)], colour: 0, dashed: false },
            Series { label: "k=40".into(), points: vec![(1.0, 1.0), (10.0, 0.95), (20.0, 9e6)], colour: 1, dashed: true },
        ];
        let (a, b, c) = (dir.path().join("a.png"), dir.path().join("b.png"), dir.path().join("c.png"));
        let new = Policy::new();
        lines(&a, "reliability", "edits", "score", &series, Axes::default(), &new).unwrap();
        bars(&b, "after 20 edits", "score", &["none".into(), "k=40".into(), "k=20".into()], &series, &new).unwrap();
        lines(&c, "perplexity", "edits", "perplexity", &series, Axes { log_x: true, log_y: true }, &new).unwrap();
        for p in [a, b, c] {
            let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
            let mut reader = decoder.read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size()];
            let info = reader.next_frame(&mut buf).unwrap();
            assert_eq!((info.width, info.height), SIZE);
            // Something besides the white background was drawn, in more than one colour.
            let colours: std::collections::BTreeSet<&[u8]> = buf.chunks(3).filter(|c| *c != [255, 255, 255]).collect();
            assert!(colours.len() > 3, "{}: {} colours", p.display(), colours.len());
        }
    }
}
