//! PNG bar chart of each contender's rate relative to `direct`, drawn with plotters'
//! bitmap backend and ab_glyph text from a Debian font file (no fontconfig needed).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::contenders::Contender;
use super::report::CHART_BARS;
use super::summary::stat;
use super::Results;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers DejaVu Sans as plotters' sans-serif once per process.
fn register_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (fonts-dejavu-core)"))?;
        // plotters keeps a &'static reference to the font for the process's lifetime.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT} is not a usable font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// (median, min, max) of one contender's rate, relative to the group's base.
type Bar = Option<(f64, f64, f64)>;

pub fn draw(r: &Results, path: &Path) -> Result<()> {
    register_font()?;
    let groups: Vec<_> = CHART_BARS
        .iter()
        .filter(|(w, _, _)| r.meta.workloads.contains(w))
        .collect();
    let has_direct = r.meta.contenders.contains(&Contender::Direct);
    let series: Vec<(Contender, Vec<Bar>)> = r
        .meta
        .contenders
        .iter()
        .map(|&who| {
            let bars = groups
                .iter()
                .map(|&&(w, metric, _)| {
                    let base = if has_direct {
                        stat(r, Contender::Direct, w, metric).map(|s| s.median)
                    } else {
                        r.meta
                            .contenders
                            .iter()
                            .filter_map(|&c| stat(r, c, w, metric).map(|s| s.median))
                            .reduce(f64::max)
                    }
                    .filter(|b| *b > 0.0)?;
                    let s = stat(r, who, w, metric)?;
                    Some((s.median / base, s.min / base, s.max / base))
                })
                .collect();
            (who, bars)
        })
        .collect();
    let ymax = series
        .iter()
        .flat_map(|(_, bars)| bars.iter().flatten().map(|b| b.2))
        .fold(1.0_f64, f64::max)
        * 1.35; // headroom for the legend box

    let root = BitMapBackend::new(path, (1280, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = if has_direct {
        format!(
            "Rate relative to direct (median, whiskers min–max), {}",
            r.meta.date
        )
    } else {
        format!("Rate relative to the fastest contender, {}", r.meta.date)
    };
    let n = groups.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n, 0.0..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ratio to direct")
        .label_style(("sans-serif", 15))
        .draw()?;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, 1.0), (n, 1.0)],
        BLACK.stroke_width(1),
    )))?;

    let width = 0.8 / series.len().max(1) as f64;
    for (i, (who, bars)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let x0 = |g: usize| g as f64 + 0.1 + i as f64 * width;
        chart
            .draw_series(bars.iter().enumerate().filter_map(|(g, b)| {
                b.map(|(med, _, _)| {
                    Rectangle::new([(x0(g), 0.0), (x0(g) + width * 0.9, med)], color.filled())
                })
            }))?
            .label(who.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
        chart.draw_series(bars.iter().enumerate().filter_map(|(g, b)| {
            b.filter(|(_, lo, hi)| hi > lo).map(|(med, lo, hi)| {
                ErrorBar::new_vertical(x0(g) + width * 0.45, lo, med, hi, BLACK.filled(), 6)
            })
        }))?;
    }
    let label_style = ("sans-serif", 16)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    chart.draw_series(groups.iter().enumerate().map(|(g, &&(_, _, name))| {
        EmptyElement::at((g as f64 + 0.5, 0.0)) + Text::new(name, (0, 10), label_style.clone())
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present().context("write the PNG")?;
    Ok(())
}
