//! The figures, drawn with plotters into an in-memory RGB buffer and encoded
//! as PNG. Text goes through ab_glyph with the bundled DejaVu Sans, so no
//! fontconfig or freetype is needed on the machine.
use std::sync::OnceLock;

use plotters::coord::ranged1d::SegmentedCoord;
use plotters::coord::types::RangedCoordi32;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

use nlora_train::analysis::CapacityPoint;
use nlora_train::monitor::MonitorRecord;

use crate::collision::{Cell, CollisionMap};
use crate::error::{ReportError, Result};

/// DejaVu Sans 2.37 (Debian fonts-dejavu-core); licence in assets/.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Figure sizes in pixels (width, height).
pub const HEATMAP_SIZE: (u32, u32) = (640, 500);
pub const CURVES_SIZE: (u32, u32) = (720, 460);
pub const COLLISION_SIZE: (u32, u32) = (720, 780);
pub const NUCLEAR_SIZE: (u32, u32) = (1000, 380);
pub const SCATTER_SIZE: (u32, u32) = (820, 560);
pub const ABLATION_SIZE: (u32, u32) = (680, 460);

/// Cells per side of a collision map at most; larger dW are max-pooled.
pub const COLLISION_MAX_CELLS: usize = 576;

/// Fig. 2's colours.
pub const GREY: RGBColor = RGBColor(200, 200, 200);
pub const GREEN: RGBColor = RGBColor(44, 160, 44);
pub const BLUE: RGBColor = RGBColor(31, 119, 180);
pub const RED: RGBColor = RGBColor(214, 39, 40);

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(ReportError::Plot {
            figure: "font".into(),
            message: "the bundled DejaVu Sans did not parse".into(),
        })
    }
}

/// Draws with `draw` on a white `size` canvas and returns the PNG bytes.
fn render(
    figure: &str,
    size: (u32, u32),
    draw: impl FnOnce(&Area) -> DrawResult,
) -> Result<Vec<u8>> {
    register_font()?;
    let plot_err = |message: String| ReportError::Plot {
        figure: figure.to_string(),
        message,
    };
    let mut rgb = vec![255u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
        draw(&root).map_err(|e| plot_err(e.to_string()))?;
        root.present().map_err(|e| plot_err(e.to_string()))?;
    }
    encode_png(&rgb, size).map_err(|e| plot_err(format!("PNG encoding: {e}")))
}

/// PNG of an RGB buffer as an 8-bit palette image: the 256 most frequent
/// colours, any other (anti-aliased text edges) drawn as its nearest one.
/// About half the size of 24-bit RGB for the noisy collision maps, with no
/// visible change.
fn encode_png(rgb: &[u8], (w, h): (u32, u32)) -> std::result::Result<Vec<u8>, png::EncodingError> {
    use std::collections::HashMap;
    let mut counts: HashMap<[u8; 3], usize> = HashMap::new();
    for px in rgb.chunks_exact(3) {
        *counts.entry([px[0], px[1], px[2]]).or_default() += 1;
    }
    let mut by_count: Vec<([u8; 3], usize)> = counts.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let palette: Vec<[u8; 3]> = by_count.iter().take(256).map(|(c, _)| *c).collect();
    let dist = |a: &[u8; 3], b: &[u8; 3]| {
        (0..3)
            .map(|k| (a[k] as i32 - b[k] as i32).pow(2))
            .sum::<i32>()
    };
    let index: HashMap<[u8; 3], u8> = by_count
        .iter()
        .map(|(c, _)| {
            let k = (0..palette.len())
                .min_by_key(|&k| dist(c, &palette[k]))
                .unwrap_or(0);
            (*c, k as u8)
        })
        .collect();
    let indices: Vec<u8> = rgb
        .chunks_exact(3)
        .map(|px| index[&[px[0], px[1], px[2]]])
        .collect();
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(palette.concat());
    enc.set_compression(png::Compression::High);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&indices)?;
    writer.finish()?;
    Ok(out)
}

fn font(size: u32) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size).into_font())
}

fn centered(size: u32) -> TextStyle<'static> {
    font(size).pos(Pos::new(HPos::Center, VPos::Center))
}

/// A colour per method, the paper's where it has one (N-LoRA red, O-LoRA blue).
pub fn method_color(method: &str) -> RGBColor {
    match method {
        "nlora" => RED,
        "olora" => BLUE,
        "inclora" => GREEN,
        "seqlora" => RGBColor(127, 127, 127),
        "olora+nlora" => RGBColor(148, 103, 189),
        "sa" => RGBColor(255, 127, 14),
        "sb" => RGBColor(140, 86, 75),
        "sab" => RGBColor(227, 119, 194),
        "ns" => RGBColor(23, 190, 207),
        "pertask" => RGBColor(188, 189, 34),
        _ => RGBColor(60, 60, 60),
    }
}

fn lerp(a: RGBColor, b: RGBColor, t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let f = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * t).round() as u8;
    RGBColor(f(a.0, b.0), f(a.1, b.1), f(a.2, b.2))
}

/// Accuracy 0 -> pale yellow, 0.5 -> teal, 1 -> dark blue (ColorBrewer YlGnBu).
fn accuracy_color(v: f64) -> RGBColor {
    if v < 0.5 {
        lerp(RGBColor(255, 255, 217), RGBColor(65, 182, 196), v * 2.0)
    } else {
        lerp(RGBColor(65, 182, 196), RGBColor(8, 29, 88), (v - 0.5) * 2.0)
    }
}

/// Distinct line colours for tasks (Tableau 10, no yellow).
fn task_color(k: usize) -> RGBColor {
    const C: [RGBColor; 9] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(23, 190, 207),
    ];
    C[k % C.len()]
}

/// A segmented axis of `n` categories: plotters' integer ranges are
/// inclusive, so 0..n-1 (and at least two, as a one-value range is empty).
fn categories(n: usize) -> SegmentedCoord<RangedCoordi32> {
    (0..n.max(2) as i32 - 1).into_segmented()
}

/// Forgetting, low -> green, middle -> yellow, high -> red.
fn forgetting_color(t: f64) -> RGBColor {
    if t < 0.5 {
        lerp(RGBColor(26, 150, 65), RGBColor(240, 200, 40), t * 2.0)
    } else {
        lerp(
            RGBColor(240, 200, 40),
            RGBColor(215, 25, 28),
            (t - 0.5) * 2.0,
        )
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The accuracy matrix as a heatmap: row = after task i, column = on task j.
pub fn accuracy_heatmap(title: &str, tasks: &[String], matrix: &[Vec<f64>]) -> Result<Vec<u8>> {
    render("accuracy heatmap", HEATMAP_SIZE, |root| {
        let (w, h) = root.dim_in_pixel();
        root.draw(&Text::new(
            title.to_string(),
            (w as i32 / 2, 22),
            centered(20),
        ))?;
        let rows = matrix.len().max(1);
        let cols = tasks.len().max(1);
        let (left, top, bottom, right) = (150i32, 56i32, 70i32, 24i32);
        let cell = ((w as i32 - left - right) / cols as i32)
            .min((h as i32 - top - bottom) / rows as i32)
            .max(4);
        let x0 = left + (w as i32 - left - right - cell * cols as i32) / 2;
        for (i, row) in matrix.iter().enumerate() {
            let label = if matrix.len() == tasks.len() {
                format!("after {}", truncate(&tasks[i], 12))
            } else {
                "after all tasks".into()
            };
            let y = top + i as i32 * cell;
            root.draw(&Text::new(
                label,
                (x0 - 8, y + cell / 2),
                font(15).pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
            for (j, &v) in row.iter().enumerate() {
                let x = x0 + j as i32 * cell;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    accuracy_color(v).filled(),
                ))?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    WHITE.stroke_width(1),
                ))?;
                let ink = if v > 0.55 { WHITE } else { BLACK };
                root.draw(&Text::new(
                    format!("{:.1}", v * 100.0),
                    (x + cell / 2, y + cell / 2),
                    centered(16).color(&ink),
                ))?;
            }
        }
        let y_axis = top + rows as i32 * cell;
        for (j, t) in tasks.iter().enumerate() {
            root.draw(&Text::new(
                truncate(t, 12),
                (x0 + j as i32 * cell + cell / 2, y_axis + 14),
                centered(15),
            ))?;
        }
        root.draw(&Text::new(
            "accuracy (%) on task",
            (x0 + cols as i32 * cell / 2, y_axis + 42),
            centered(15),
        ))?;
        Ok(())
    })
}

/// Per task, its accuracy after each stage of the sequence: solid from the
/// stage that trains it on (so forgetting is the drop), dashed before.
pub fn accuracy_curves(title: &str, tasks: &[String], matrix: &[Vec<f64>]) -> Result<Vec<u8>> {
    render("accuracy curves", CURVES_SIZE, |root| {
        let stages = matrix.len();
        let sequential = stages == tasks.len();
        let mut chart = ChartBuilder::on(root)
            .caption(title, font(20))
            .margin(14)
            .x_label_area_size(52)
            .y_label_area_size(64)
            .build_cartesian_2d(categories(stages), 0f64..100.0)?;
        let stage_label = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(k) if sequential => tasks
                .get(*k as usize)
                .map(|t| truncate(t, 12))
                .unwrap_or_default(),
            SegmentValue::CenterOf(_) => "all tasks".into(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .x_labels(stages.max(1))
            .x_label_formatter(&stage_label)
            .y_labels(6)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(font(14))
            .axis_desc_style(font(15))
            .x_desc("after training on")
            .y_desc("accuracy (%)")
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        for (j, task) in tasks.iter().enumerate() {
            let color = task_color(j);
            let point = |k: usize| (SegmentValue::CenterOf(k as i32), matrix[k][j] * 100.0);
            let learned = if sequential { j } else { 0 };
            if learned > 0 {
                chart.draw_series(DashedLineSeries::new(
                    (0..=learned).map(point),
                    6,
                    4,
                    color.mix(0.6).stroke_width(1),
                ))?;
            }
            chart
                .draw_series(LineSeries::new(
                    (learned..stages).map(point),
                    color.stroke_width(3),
                ))?
                .label(truncate(task, 14))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(3))
                });
            chart
                .draw_series((learned..stages).map(|k| Circle::new(point(k), 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(font(14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .draw()?;
        Ok(())
    })
}

/// Fig. 2: grey = near zero in both, green = task i only, blue = task j
/// only, red = both (a collision).
pub fn collision_map(title: &str, names: (&str, &str), map: &CollisionMap) -> Result<Vec<u8>> {
    render("collision map", COLLISION_SIZE, |root| {
        let (w, _) = root.dim_in_pixel();
        let mut lines = title.lines();
        root.draw(&Text::new(
            lines.next().unwrap_or_default().to_string(),
            (w as i32 / 2, 20),
            centered(18),
        ))?;
        if let Some(second) = lines.next() {
            root.draw(&Text::new(
                second.to_string(),
                (w as i32 / 2, 44),
                centered(16),
            ))?;
        }
        let area = 576i32;
        let cell = (area / map.map_rows.max(map.map_cols) as i32).max(1);
        let (pw, ph) = (cell * map.map_cols as i32, cell * map.map_rows as i32);
        let x0 = 90 + (area - pw) / 2;
        let y0 = 70;
        for r in 0..map.map_rows {
            for c in 0..map.map_cols {
                let color = match map.cells[r * map.map_cols + c] {
                    Cell::Neither => GREY,
                    Cell::OnlyI => GREEN,
                    Cell::OnlyJ => BLUE,
                    Cell::Both => RED,
                };
                let (x, y) = (x0 + c as i32 * cell, y0 + r as i32 * cell);
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    color.filled(),
                ))?;
            }
        }
        root.draw(&Rectangle::new(
            [(x0 - 1, y0 - 1), (x0 + pw, y0 + ph)],
            BLACK.stroke_width(1),
        ))?;
        // Axis ends in dW's own indices.
        let small = font(13);
        root.draw(&Text::new(
            "0",
            (x0, y0 + ph + 6),
            small.pos(Pos::new(HPos::Left, VPos::Top)),
        ))?;
        root.draw(&Text::new(
            format!("{}", map.cols),
            (x0 + pw, y0 + ph + 6),
            small.pos(Pos::new(HPos::Right, VPos::Top)),
        ))?;
        root.draw(&Text::new(
            "input feature (dW column)",
            (x0 + pw / 2, y0 + ph + 16),
            centered(15),
        ))?;
        root.draw(&Text::new(
            "0",
            (x0 - 6, y0),
            small.pos(Pos::new(HPos::Right, VPos::Top)),
        ))?;
        root.draw(&Text::new(
            format!("{}", map.rows),
            (x0 - 6, y0 + ph),
            small.pos(Pos::new(HPos::Right, VPos::Bottom)),
        ))?;
        root.draw(&Text::new(
            "output feature (dW row)",
            (x0 - 40, y0 + ph / 2),
            centered(15).transform(FontTransform::Rotate270),
        ))?;
        // Legend.
        let ly = y0 + ph + 50;
        let entries = [
            (GREY, "near zero".to_string()),
            (GREEN, format!("{} only", truncate(names.0, 12))),
            (BLUE, format!("{} only", truncate(names.1, 12))),
            (RED, "both (collision)".to_string()),
        ];
        let mut x = 40;
        for (color, label) in entries {
            root.draw(&Rectangle::new(
                [(x, ly - 8), (x + 16, ly + 8)],
                color.filled(),
            ))?;
            root.draw(&Text::new(
                label.clone(),
                (x + 22, ly),
                font(14).pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
            x += 22 + 14 * label.chars().count() as i32 * 6 / 10 + 28;
        }
        Ok(())
    })
}

/// Fig. 3: the nuclear norm of the first task's dW at each site, with the
/// mean over sites dashed; `y_max` is shared by every run's figure.
pub fn nuclear_norms(
    title: &str,
    sites: &[String],
    values: &[f64],
    y_max: f64,
    color: RGBColor,
) -> Result<Vec<u8>> {
    render("nuclear norms", NUCLEAR_SIZE, |root| {
        let n = values.len().max(1);
        let mean = values.iter().sum::<f64>() / n as f64;
        let mut chart = ChartBuilder::on(root)
            .caption(title, font(19))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(categories(n), 0f64..y_max)?;
        let site_label = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(k) => sites
                .get(*k as usize)
                .map(|s| crate::runs::short_site(s))
                .unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n.min(20))
            .x_label_formatter(&site_label)
            .y_labels(6)
            .label_style(font(13))
            .axis_desc_style(font(15))
            .x_desc("adapter site (layer.module)")
            .y_desc("nuclear norm of dW")
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        chart.draw_series(values.iter().enumerate().map(|(k, &v)| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(k as i32), 0.0),
                    (SegmentValue::Exact(k as i32 + 1), v),
                ],
                color.mix(0.85).filled(),
            );
            bar.set_margin(0, 0, 1, 1);
            bar
        }))?;
        chart
            .draw_series(DashedLineSeries::new(
                [(SegmentValue::Exact(0), mean), (SegmentValue::Last, mean)],
                10,
                6,
                BLACK.stroke_width(2),
            ))?
            .label(format!("mean over sites = {mean:.3}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], BLACK.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(font(14))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(160, 160, 160))
            .draw()?;
        Ok(())
    })
}

/// One point of Fig. 5.
#[derive(Debug, Clone)]
pub struct SparsityPoint {
    pub label: String,
    pub method: String,
    pub gsr: f64,
    pub acr: f64,
    pub forgetting: f64,
}

/// Fig. 5: GSR (x) against ACR (y), one point per run, coloured by forgetting.
pub fn gsr_acr_scatter(title: &str, points: &[SparsityPoint]) -> Result<Vec<u8>> {
    render("GSR vs ACR", SCATTER_SIZE, |root| {
        let (w, _) = root.dim_in_pixel();
        let (plot, bar) = root.split_horizontally(w - 120);
        let span = |f: &dyn Fn(&SparsityPoint) -> f64| {
            let lo = points.iter().map(f).fold(f64::INFINITY, f64::min);
            let hi = points.iter().map(f).fold(f64::NEG_INFINITY, f64::max);
            let pad = ((hi - lo) * 0.25).max(0.03);
            ((lo - pad).max(0.0), (hi + pad).min(1.0))
        };
        let (x_lo, x_hi) = span(&|p| p.gsr);
        let (y_lo, y_hi) = span(&|p| p.acr);
        let f_lo = points
            .iter()
            .map(|p| p.forgetting)
            .fold(f64::INFINITY, f64::min);
        let f_hi = points
            .iter()
            .map(|p| p.forgetting)
            .fold(f64::NEG_INFINITY, f64::max);
        let f_t = |f: f64| {
            if f_hi > f_lo {
                (f - f_lo) / (f_hi - f_lo)
            } else {
                0.5
            }
        };
        let mut chart = ChartBuilder::on(&plot)
            .caption(title, font(19))
            .margin(14)
            .x_label_area_size(52)
            .y_label_area_size(64)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
        chart
            .configure_mesh()
            .label_style(font(14))
            .axis_desc_style(font(15))
            .x_desc("GSR, generalized sparsity (mean over sites and tasks; lower = sparser)")
            .y_desc("ACR, average collision rate")
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        // Labels of points that (nearly) coincide are stacked, not overprinted.
        let mut placed: Vec<(f64, f64)> = Vec::new();
        for p in points {
            let near = |q: &(f64, f64)| {
                ((q.0 - p.gsr) / (x_hi - x_lo)).abs() < 0.12
                    && ((q.1 - p.acr) / (y_hi - y_lo)).abs() < 0.05
            };
            let stack = placed.iter().filter(|q| near(q)).count() as i32;
            placed.push((p.gsr, p.acr));
            let c = forgetting_color(f_t(p.forgetting));
            chart.draw_series(std::iter::once(Circle::new((p.gsr, p.acr), 9, c.filled())))?;
            chart.draw_series(std::iter::once(Circle::new(
                (p.gsr, p.acr),
                9,
                method_color(&p.method).stroke_width(2),
            )))?;
            chart.draw_series(std::iter::once(
                EmptyElement::at((p.gsr, p.acr))
                    + Text::new(
                        format!(
                            "{} (F {:.1}%)",
                            truncate(&p.label, 22),
                            p.forgetting * 100.0
                        ),
                        (13, -10 + 17 * stack),
                        font(13).pos(Pos::new(HPos::Left, VPos::Center)),
                    ),
            ))?;
        }
        // Colour bar for forgetting.
        let (_, bh) = bar.dim_in_pixel();
        let (top, bottom) = (70i32, bh as i32 - 90);
        bar.draw(&Text::new("forgetting", (50, top - 28), centered(14)))?;
        let steps = 60;
        for s in 0..steps {
            let t = 1.0 - s as f64 / steps as f64;
            let y = top + (bottom - top) * s / steps;
            let y1 = top + (bottom - top) * (s + 1) / steps;
            bar.draw(&Rectangle::new(
                [(20, y), (44, y1 + 1)],
                forgetting_color(t).filled(),
            ))?;
        }
        bar.draw(&Rectangle::new(
            [(20, top), (44, bottom)],
            BLACK.stroke_width(1),
        ))?;
        let ends = [(top, f_hi), (bottom, f_lo)];
        for (y, v) in ends {
            bar.draw(&Text::new(
                format!("{:.1}%", v * 100.0),
                (50, y),
                font(13).pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
        }
        Ok(())
    })
}

/// One bar of Fig. 6.
#[derive(Debug, Clone)]
pub struct AblationBar {
    pub label: String,
    pub method: String,
    pub average_accuracy: f64,
    pub runs: usize,
}

/// Fig. 6: average accuracy of the sparsity ablations (NS, SA, SB, SAB, Ours).
pub fn ablation_bars(title: &str, bars: &[AblationBar]) -> Result<Vec<u8>> {
    render("ablation", ABLATION_SIZE, |root| {
        let n = bars.len().max(1);
        let top = bars
            .iter()
            .map(|b| b.average_accuracy * 100.0)
            .fold(0.0, f64::max);
        let y_max = (top * 1.18).max(1.0);
        let mut chart = ChartBuilder::on(root)
            .caption(title, font(19))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(categories(n), 0f64..y_max)?;
        let label = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(k) => bars
                .get(*k as usize)
                .map(|b| b.label.clone())
                .unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&label)
            .y_labels(6)
            .label_style(font(14))
            .axis_desc_style(font(15))
            .y_desc("average accuracy (%)")
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        chart.draw_series(bars.iter().enumerate().map(|(k, b)| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(k as i32), 0.0),
                    (
                        SegmentValue::Exact(k as i32 + 1),
                        b.average_accuracy * 100.0,
                    ),
                ],
                method_color(&b.method).filled(),
            );
            bar.set_margin(0, 0, 18, 18);
            bar
        }))?;
        chart.draw_series(bars.iter().enumerate().map(|(k, b)| {
            Text::new(
                format!("{:.1}", b.average_accuracy * 100.0),
                (
                    SegmentValue::CenterOf(k as i32),
                    b.average_accuracy * 100.0 + y_max * 0.035,
                ),
                centered(15),
            )
        }))?;
        Ok(())
    })
}

/// How a legend entry's swatch is drawn.
#[derive(Clone, Copy)]
enum Swatch {
    Line,
    Dashed,
    /// A line over its (paler) band.
    Band,
}

/// A legend laid out in rows above a plot (so it never hides data): entries
/// flow left to right from `(x0, y0)` and wrap before `width`; returns the
/// y below the last row.
fn legend_rows(
    area: &Area,
    entries: &[(RGBColor, String, Swatch)],
    (x0, y0): (i32, i32),
    width: i32,
) -> std::result::Result<i32, Box<dyn std::error::Error>> {
    let style = font(13);
    let row_h = 20;
    let (mut x, mut y) = (x0, y0);
    for (color, label, swatch) in entries {
        let (tw, _) = area.estimate_text_size(label, &style)?;
        let item = 28 + tw as i32 + 22;
        if x > x0 && x + item > x0 + width {
            x = x0;
            y += row_h;
        }
        match swatch {
            Swatch::Line => {
                area.draw(&PathElement::new(
                    vec![(x, y), (x + 22, y)],
                    color.stroke_width(2),
                ))?;
            }
            Swatch::Dashed => {
                for k in 0..3 {
                    area.draw(&PathElement::new(
                        vec![(x + 8 * k, y), (x + 8 * k + 5, y)],
                        color.stroke_width(2),
                    ))?;
                }
            }
            Swatch::Band => {
                area.draw(&Rectangle::new(
                    [(x, y - 6), (x + 22, y + 6)],
                    color.mix(0.18).filled(),
                ))?;
                area.draw(&PathElement::new(
                    vec![(x, y), (x + 22, y)],
                    color.stroke_width(2),
                ))?;
            }
        }
        area.draw(&Text::new(
            label.clone(),
            (x + 28, y),
            style.pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
        x += item;
    }
    Ok(y + row_h / 2)
}

/// The monitor figure with a lambda panel (auto lambda) and without.
pub const MONITOR_SIZE: (u32, u32) = (960, 660);
pub const MONITOR_SIZE_FIXED_LAMBDA: (u32, u32) = (960, 420);
pub const CAPACITY_SIZE: (u32, u32) = (1040, 470);

/// One value of a monitor reading (the density, or the CR when there is one).
type Reading = dyn Fn(&MonitorRecord) -> Option<f64>;

/// The size of [`monitor`]'s figure: with a lambda panel when there is a
/// lambda trajectory.
pub fn monitor_size(lambda: &[(f64, f64)]) -> (u32, u32) {
    if lambda.is_empty() {
        MONITOR_SIZE_FIXED_LAMBDA
    } else {
        MONITOR_SIZE
    }
}

/// One task of the monitor figure: its readings, steps counted within the task.
#[derive(Debug, Clone)]
pub struct MonitorTrace {
    pub task: String,
    pub readings: Vec<MonitorRecord>,
}

/// Where each task starts on the run's step axis, and the axis' end: a task
/// spans its last reading's step (the monitor always reads the last step);
/// a task without readings gets the longest other task's span.
pub fn monitor_offsets(stages: &[MonitorTrace]) -> (Vec<usize>, usize) {
    let spans: Vec<Option<usize>> = stages
        .iter()
        .map(|s| s.readings.iter().map(|r| r.step).max())
        .collect();
    let fallback = spans.iter().flatten().copied().max().unwrap_or(1).max(1);
    let mut offsets = Vec::with_capacity(stages.len());
    let mut at = 0;
    for span in &spans {
        offsets.push(at);
        at += span.unwrap_or(fallback).max(1);
    }
    (offsets, at.max(1))
}

/// The live monitor over the whole run: top, the current task's density with
/// its 95 % band and its collision rate with the earlier tasks (and the target
/// density, dashed, with auto lambda); bottom, lambda on a log axis when
/// `lambda` holds (step, lambda) on the run's step axis.
pub fn monitor(
    title: &str,
    stages: &[MonitorTrace],
    target: Option<f64>,
    lambda: &[(f64, f64)],
) -> Result<Vec<u8>> {
    let has_lambda = !lambda.is_empty();
    render("monitor", monitor_size(lambda), |root| {
        let (offsets, total) = monitor_offsets(stages);
        let total = total as f64;
        let xy = |s: usize, r: &MonitorRecord| (offsets[s] + r.step) as f64;
        let few = stages.iter().map(|s| s.readings.len()).sum::<usize>() <= 80;
        let top = stages
            .iter()
            .flat_map(|s| &s.readings)
            .map(|r| (r.density + r.half_width_95).max(r.collision_rate.unwrap_or(0.0)))
            .chain(target)
            .fold(0.0, f64::max);
        // Headroom for the task names along the top.
        let y_max = (top * 1.15).clamp(0.02, 1.15);
        let (w, h) = root.dim_in_pixel();
        let (upper, lower) = root.split_vertically(if has_lambda { h * 60 / 100 } else { h });
        upper.draw(&Text::new(
            title.to_string(),
            (w as i32 / 2, 16),
            centered(19),
        ))?;
        let mut entries = vec![
            (
                BLUE,
                "density of the current task (band: 95 %)".to_string(),
                Swatch::Band,
            ),
            (
                RED,
                "CR with the earlier tasks (band: 95 %)".to_string(),
                Swatch::Band,
            ),
        ];
        if let Some(t) = target {
            entries.push((BLACK, format!("target density {t}"), Swatch::Dashed));
        }
        let legend_end = legend_rows(&upper, &entries, (84, 42), w as i32 - 110)?;
        let x_desc = "optimizer step (the tasks one after another)";
        let mut chart = ChartBuilder::on(&upper.margin(legend_end as u32 + 4, 0, 0, 0))
            .margin(12)
            .margin_right(24)
            .x_label_area_size(if has_lambda { 28 } else { 50 })
            .y_label_area_size(72)
            .build_cartesian_2d(0f64..total, 0f64..y_max)?;
        let mut mesh = chart.configure_mesh();
        mesh.x_labels(10)
            .y_labels(6)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .label_style(font(13))
            .axis_desc_style(font(15))
            .y_desc("fraction of positions")
            .light_line_style(RGBColor(235, 235, 235));
        if !has_lambda {
            mesh.x_desc(x_desc);
        }
        mesh.draw()?;
        for &x in offsets.iter().skip(1) {
            chart.draw_series(DashedLineSeries::new(
                [(x as f64, 0.0), (x as f64, y_max)],
                6,
                4,
                RGBColor(70, 70, 70).stroke_width(2),
            ))?;
        }
        let band = |lo: &Reading, s: usize| -> Vec<(f64, f64)> {
            let rs = &stages[s].readings;
            let mut pts: Vec<(f64, f64)> = rs
                .iter()
                .filter_map(|r| lo(r).map(|v| (xy(s, r), (v + r.half_width_95).min(1.0))))
                .collect();
            pts.extend(
                rs.iter()
                    .rev()
                    .filter_map(|r| lo(r).map(|v| (xy(s, r), (v - r.half_width_95).max(0.0)))),
            );
            pts
        };
        let series: [(RGBColor, &Reading); 2] =
            [(BLUE, &|r| Some(r.density)), (RED, &|r| r.collision_rate)];
        for (color, value) in series {
            for (s, stage) in stages.iter().enumerate() {
                let pts: Vec<(f64, f64)> = stage
                    .readings
                    .iter()
                    .filter_map(|r| value(r).map(|v| (xy(s, r), v)))
                    .collect();
                if pts.is_empty() {
                    continue;
                }
                let b = band(value, s);
                if pts.len() >= 2 {
                    chart
                        .draw_series(std::iter::once(Polygon::new(b, color.mix(0.18).filled())))?;
                } else {
                    // One reading: the band as an error bar.
                    chart.draw_series(std::iter::once(PathElement::new(
                        vec![b[0], b[1]],
                        color.mix(0.5).stroke_width(2),
                    )))?;
                }
                chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
                if few {
                    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
                }
            }
        }
        if let Some(t) = target {
            chart.draw_series(DashedLineSeries::new(
                [(0.0, t), (total, t)],
                10,
                6,
                BLACK.stroke_width(2),
            ))?;
        }
        for (s, stage) in stages.iter().enumerate() {
            let end = offsets.get(s + 1).map_or(total, |&o| o as f64);
            let mid = (offsets[s] as f64 + end) / 2.0;
            chart.draw_series(std::iter::once(Text::new(
                format!("{} {}", s + 1, truncate(&stage.task, 14)),
                (mid, y_max),
                font(13).pos(Pos::new(HPos::Center, VPos::Top)),
            )))?;
        }

        if !has_lambda {
            return Ok(());
        }
        let lo = lambda.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = lambda.iter().map(|p| p.1).fold(0.0, f64::max);
        let (lo, hi) = if hi > lo * 1.5 {
            (lo / 1.3, hi * 1.3)
        } else {
            (lo / 2.0, hi * 2.0)
        };
        let mut chart = ChartBuilder::on(&lower)
            .margin(12)
            .margin_right(24)
            .x_label_area_size(50)
            .y_label_area_size(72)
            .build_cartesian_2d(
                0f64..total,
                (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
            )?;
        chart
            .configure_mesh()
            .x_labels(10)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .label_style(font(13))
            .axis_desc_style(font(15))
            .x_desc(x_desc)
            .y_desc("λ after each reading (log)")
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        for &x in offsets.iter().skip(1) {
            chart.draw_series(DashedLineSeries::new(
                [(x as f64, lo), (x as f64, hi)],
                6,
                4,
                RGBColor(70, 70, 70).stroke_width(2),
            ))?;
        }
        // lambda holds from a reading until the next one: a step line.
        let mut path = Vec::with_capacity(2 * lambda.len());
        for (k, &(x, l)) in lambda.iter().enumerate() {
            if k > 0 {
                path.push((x, lambda[k - 1].1));
            }
            path.push((x, l));
        }
        let purple = RGBColor(148, 103, 189);
        chart.draw_series(LineSeries::new(path, purple.stroke_width(2)))?;
        if lambda.len() <= 80 {
            chart.draw_series(lambda.iter().map(|&p| Circle::new(p, 3, purple.filled())))?;
        }
        Ok(())
    })
}

/// Ticks of a log axis over [lo, hi]: the powers of ten when it spans two
/// decades or more, else five geometrically spaced values rounded to two
/// significant digits (plotters' own log ticks leave a narrow range with one
/// label or none).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (a, b) = (lo.log10(), hi.log10());
    if b - a >= 2.0 {
        return (a.ceil() as i32..=b.floor() as i32)
            .map(|e| 10f64.powi(e))
            .collect();
    }
    let round2 = |v: f64| {
        let e = 10f64.powi(v.log10().floor() as i32 - 1);
        (v / e).round() * e
    };
    let mut ticks: Vec<f64> = (1..=5)
        .map(|k| round2(10f64.powf(a + (b - a) * k as f64 / 6.0)))
        .collect();
    ticks.dedup();
    ticks
}

/// One run of the capacity figure: where it stands after its `tasks` tasks
/// and the forecast points (more_tasks = N).
#[derive(Debug, Clone)]
pub struct CapacityCurve {
    pub label: String,
    pub tasks: usize,
    /// Measured mean CR over the run's pairs (None with one task).
    pub measured_acr: Option<f64>,
    pub used_fraction: f64,
    pub forecast: Vec<CapacityPoint>,
}

/// Expected ACR (left) and used fraction of positions (right) against the
/// total number of tasks, log x: solid Theorem 2 (independent supports),
/// dashed scaled by the run's measured independence ratio.
pub fn capacity(title: &str, curves: &[CapacityCurve]) -> Result<Vec<u8>> {
    render("capacity", CAPACITY_SIZE, |root| {
        let (w, _) = root.dim_in_pixel();
        root.draw(&Text::new(
            title.to_string(),
            (w as i32 / 2, 16),
            centered(19),
        ))?;
        let grey = RGBColor(90, 90, 90);
        let mut entries: Vec<(RGBColor, String, Swatch)> = curves
            .iter()
            .enumerate()
            .map(|(k, c)| (task_color(k), truncate(&c.label, 28), Swatch::Line))
            .collect();
        entries.push((
            grey,
            "Theorem 2: new pairs independent".into(),
            Swatch::Line,
        ));
        entries.push((
            grey,
            "scaled by measured / independent".into(),
            Swatch::Dashed,
        ));
        let legend_end = legend_rows(root, &entries, (80, 42), w as i32 - 100)?;
        let body = root.margin(legend_end as u32 + 4, 0, 0, 0);
        let (left, right) = body.split_horizontally(w * 56 / 100);
        // Ticks where the points are: each run's task count and its horizons.
        let mut ticks: Vec<f64> = curves
            .iter()
            .flat_map(|c| {
                std::iter::once(c.tasks)
                    .chain(c.forecast.iter().map(move |p| c.tasks + p.more_tasks))
            })
            .map(|t| t as f64)
            .collect();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        let x_lo = ticks.first().copied().unwrap_or(1.0).max(1.0);
        let x_hi = ticks.last().copied().unwrap_or(2.0).max(x_lo + 1.0);
        let (x_lo, x_hi) = (x_lo * 0.85, x_hi * 1.15);
        let acr_top = curves
            .iter()
            .flat_map(|c| {
                c.forecast
                    .iter()
                    .flat_map(|p| [p.expected_acr, p.expected_acr_observed_ratio])
                    .chain(c.measured_acr)
            })
            .fold(0.0, f64::max);
        let acr_max = (acr_top * 1.1).clamp(1e-6, 1.0);
        let acr_label = move |v: &f64| {
            if acr_max >= 0.05 {
                format!("{v:.2}")
            } else {
                format!("{v:.1e}")
            }
        };
        let x_label = |v: &f64| format!("{v:.0}");
        let mut acr = ChartBuilder::on(&left)
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(
                (x_lo..x_hi).log_scale().with_key_points(ticks.clone()),
                0f64..acr_max,
            )?;
        acr.configure_mesh()
            .y_labels(6)
            .x_label_formatter(&x_label)
            .y_label_formatter(&acr_label)
            .label_style(font(13))
            .axis_desc_style(font(15))
            .x_desc("total number of tasks (log scale)")
            .y_desc("expected ACR")
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        let mut used = ChartBuilder::on(&right)
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(
                (x_lo..x_hi).log_scale().with_key_points(ticks.clone()),
                0f64..1.0,
            )?;
        used.configure_mesh()
            .y_labels(6)
            .x_label_formatter(&x_label)
            .label_style(font(13))
            .axis_desc_style(font(15))
            .x_desc("total number of tasks (log scale)")
            .y_desc("expected used fraction of positions")
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        for (k, c) in curves.iter().enumerate() {
            let color = task_color(k);
            let t = c.tasks as f64;
            let at = |p: &CapacityPoint| (c.tasks + p.more_tasks) as f64;
            // N = 0 is the run as measured; with one task there is no CR yet.
            let start: Vec<(f64, f64)> = c.measured_acr.map(|m| (t, m)).into_iter().collect();
            let independent: Vec<(f64, f64)> = start
                .iter()
                .copied()
                .chain(c.forecast.iter().map(|p| (at(p), p.expected_acr)))
                .collect();
            let observed: Vec<(f64, f64)> = start
                .iter()
                .copied()
                .chain(
                    c.forecast
                        .iter()
                        .map(|p| (at(p), p.expected_acr_observed_ratio)),
                )
                .collect();
            acr.draw_series(LineSeries::new(independent.clone(), color.stroke_width(2)))?;
            acr.draw_series(DashedLineSeries::new(
                observed.clone(),
                6,
                4,
                color.stroke_width(2),
            ))?;
            acr.draw_series(
                independent
                    .iter()
                    .chain(&observed)
                    .map(|&p| Circle::new(p, 3, color.filled())),
            )?;
            let fill: Vec<(f64, f64)> = std::iter::once((t, c.used_fraction))
                .chain(c.forecast.iter().map(|p| (at(p), p.expected_used_fraction)))
                .collect();
            used.draw_series(LineSeries::new(fill.clone(), color.stroke_width(2)))?;
            used.draw_series(fill.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        Ok(())
    })
}
