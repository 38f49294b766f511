//! PNG plots of a bench run (plotters, bitmap backend, a system TrueType font via ab_glyph).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use plotters::prelude::*;

use super::{mbf, percentile, Mode, RunResult};

macro_rules! t {
    ($e:expr) => {
        $e.map_err(|e| anyhow!("plotting: {e:?}"))?
    };
}

fn find_font() -> Option<PathBuf> {
    let preferred = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    ];
    if let Some(p) = preferred.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return Some(p);
    }
    fn walk(d: &Path, depth: usize) -> Option<PathBuf> {
        if depth > 4 {
            return None;
        }
        for e in std::fs::read_dir(d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(f) = walk(&p, depth + 1) {
                    return Some(f);
                }
            } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("ttf")) {
                return Some(p);
            }
        }
        None
    }
    walk(Path::new("/usr/share/fonts"), 0)
}

fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let p = find_font().ok_or("no TrueType font under /usr/share/fonts")?;
        let bytes: &'static [u8] = Box::leak(
            std::fs::read(&p)
                .map_err(|e| e.to_string())?
                .into_boxed_slice(),
        );
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable font", p.display()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn label(r: &RunResult) -> String {
    match r.spec.granularity {
        Some(g) => format!("{} (g={g})", r.spec.mode.name()),
        None => r.spec.mode.name().to_string(),
    }
}

type Series = Vec<(String, Vec<(f64, f64)>)>;

fn line_chart(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    xdesc: &str,
    ydesc: &str,
    series: &Series,
    log_x: bool,
) -> anyhow::Result<()> {
    let pts = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
    for (x, y) in pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y1 = y1.max(*y);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    let mut b = ChartBuilder::on(area);
    b.caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(75);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            t!(chart
                .configure_mesh()
                .x_desc(xdesc)
                .y_desc(ydesc)
                .label_style(("sans-serif", 14))
                .draw());
            for (i, (name, p)) in series.iter().enumerate() {
                let c = Palette99::pick(i).to_rgba();
                let p: Vec<(f64, f64)> = p
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect();
                t!(chart.draw_series(LineSeries::new(p.clone(), c.stroke_width(2))))
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                    });
                t!(chart.draw_series(p.iter().map(|&(x, y)| Circle::new((x, y), 3, c.filled()))));
            }
            t!(chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .label_font(("sans-serif", 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw());
        }};
    }
    if log_x {
        draw!(t!(b.build_cartesian_2d(
            (x0 * 0.8..x1 * 1.25).log_scale(),
            0f64..y1
        )));
    } else {
        draw!(t!(b.build_cartesian_2d(x0..x1, 0f64..y1)));
    }
    Ok(())
}

fn cdf(v: &[f64]) -> Vec<(f64, f64)> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len() as f64;
    s.iter()
        .enumerate()
        .map(|(i, &x)| (x, (i + 1) as f64 / n))
        .collect()
}

/// Writes every plot; returns the file names.
pub(super) fn all(out: &Path, results: &[RunResult], max_t: usize) -> anyhow::Result<Vec<String>> {
    register_font().context("plot font")?;
    let mut files = Vec::new();
    let at_max: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.spec.tenants == max_t && r.skipped.is_none() && r.spec.same_as.is_none())
        .collect();

    // Memory over time per mode.
    let series: Series = at_max
        .iter()
        .map(|r| {
            (
                label(r),
                r.samples
                    .iter()
                    .map(|s| (s.t_s, mbf(s.total().pss as f64)))
                    .collect(),
            )
        })
        .collect();
    let p = out.join("memory_over_time.png");
    {
        let root = BitMapBackend::new(&p, (1200, 700)).into_drawing_area();
        t!(root.fill(&WHITE));
        line_chart(
            &root,
            &format!("PSS of all processes of the mode, {max_t} tenant(s)"),
            "seconds since the first request",
            "PSS (MB)",
            &series,
            false,
        )?;
        t!(root.present());
    }
    files.push("memory_over_time.png".to_string());

    // Instances over time.
    let series: Series = at_max
        .iter()
        .filter(|r| r.spec.mode.uses_functions())
        .map(|r| {
            (
                label(r),
                r.samples
                    .iter()
                    .map(|s| (s.t_s, s.workers() as f64))
                    .collect(),
            )
        })
        .collect();
    if !series.is_empty() {
        let p = out.join("instances_over_time.png");
        let root = BitMapBackend::new(&p, (1200, 700)).into_drawing_area();
        t!(root.fill(&WHITE));
        line_chart(
            &root,
            &format!("expert function instances alive, {max_t} tenant(s)"),
            "seconds since the first request",
            "instances",
            &series,
            false,
        )?;
        t!(root.present());
        files.push("instances_over_time.png".to_string());
    }

    // Granularity trade-off.
    let mut sweep: Vec<&RunResult> = at_max
        .iter()
        .copied()
        .filter(|r| r.spec.mode == Mode::FaasmoeShared)
        .collect();
    sweep.sort_by_key(|r| r.spec.granularity);
    if !sweep.is_empty() {
        let p = out.join("granularity.png");
        let root = BitMapBackend::new(&p, (1400, 600)).into_drawing_area();
        t!(root.fill(&WHITE));
        let areas = root.split_evenly((1, 2));
        let pts = |f: &dyn Fn(&RunResult) -> f64| -> Vec<(f64, f64)> {
            sweep
                .iter()
                .map(|r| (r.spec.granularity.unwrap_or(1) as f64, f(r)))
                .collect()
        };
        let inv: Series = vec![("faasmoe-shared".into(), pts(&|r| r.summary().inv_per_token))];
        line_chart(
            &areas[0],
            "function invocations per generated token",
            "experts per function (log)",
            "invocations / token",
            &inv,
            true,
        )?;
        let mem: Series = vec![
            ("PSS mean".into(), pts(&|r| mbf(r.summary().pss_mean))),
            ("PSS peak".into(), pts(&|r| mbf(r.summary().pss_peak))),
        ];
        line_chart(
            &areas[1],
            &format!("memory, {max_t} tenant(s)"),
            "experts per function (log)",
            "MB",
            &mem,
            true,
        )?;
        t!(root.present());
        files.push("granularity.png".to_string());
    }

    // Latency CDFs.
    let p = out.join("latency_cdf.png");
    {
        let root = BitMapBackend::new(&p, (1400, 600)).into_drawing_area();
        t!(root.fill(&WHITE));
        let areas = root.split_evenly((1, 2));
        let ttft: Series = at_max
            .iter()
            .map(|r| (label(r), cdf(&r.summary().ttft)))
            .collect();
        let tpot: Series = at_max
            .iter()
            .map(|r| (label(r), cdf(&r.summary().tpot)))
            .collect();
        line_chart(
            &areas[0],
            &format!("TTFT CDF, {max_t} tenant(s)"),
            "TTFT (ms)",
            "fraction of requests",
            &ttft,
            false,
        )?;
        line_chart(
            &areas[1],
            &format!("TPOT CDF, {max_t} tenant(s)"),
            "TPOT (ms)",
            "fraction of requests",
            &tpot,
            false,
        )?;
        t!(root.present());
    }
    files.push("latency_cdf.png".to_string());
    files.extend(capacity(out, &at_max, max_t)?);
    files.extend(phases(out, results)?);
    Ok(files)
}

/// `capacity.png`: the closed-loop sweep of every mode that ran one — output tokens/s and
/// TPOT p50 against concurrent sequences. None when no run has a sweep.
fn capacity(out: &Path, at_max: &[&RunResult], max_t: usize) -> anyhow::Result<Option<String>> {
    let swept: Vec<&&RunResult> = at_max.iter().filter(|r| !r.sweep.is_empty()).collect();
    if swept.is_empty() {
        return Ok(None);
    }
    let pts = |r: &RunResult, f: &dyn Fn(&super::phases::PhaseStats) -> f64| -> Vec<(f64, f64)> {
        r.sweep
            .iter()
            .filter_map(|p| p.concurrency.map(|c| (c as f64, f(&p.stats()))))
            .collect()
    };
    let tok_s: Series = swept
        .iter()
        .map(|r| (label(r), pts(r, &|s| s.tok_s)))
        .collect();
    let tpot: Series = swept
        .iter()
        .map(|r| (label(r), pts(r, &|s| percentile(&s.tpot, 50.0))))
        .collect();
    let p = out.join("capacity.png");
    let root = BitMapBackend::new(&p, (1400, 600)).into_drawing_area();
    t!(root.fill(&WHITE));
    let areas = root.split_evenly((1, 2));
    line_chart(
        &areas[0],
        &format!("throughput vs concurrency, {max_t} tenant(s)"),
        "concurrent sequences (log)",
        "output tokens / s",
        &tok_s,
        true,
    )?;
    line_chart(
        &areas[1],
        &format!("TPOT p50 vs concurrency, {max_t} tenant(s)"),
        "concurrent sequences (log)",
        "TPOT p50 (ms)",
        &tpot,
        true,
    )?;
    t!(root.present());
    Ok(Some("capacity.png".to_string()))
}

/// `phases.png`: per mode against the tenant count — CPU-seconds per output token, TTFT p50
/// and TPOT p50; the cold phase in the top row, the warm phase below, one colour per mode in
/// both. The sweep's extra granularities (one tenant count each) are left to
/// `granularity.png` unless no mode ran at more than one tenant count. None when no run has a
/// warm phase.
fn phases(out: &Path, results: &[RunResult]) -> anyhow::Result<Option<String>> {
    use super::phases::{cold_phase, Phase, PhaseStats};
    let runs: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.skipped.is_none() && r.warm.is_some())
        .collect();
    if runs.is_empty() {
        return Ok(None);
    }
    let mut keys: Vec<String> = Vec::new();
    for r in &runs {
        let k = label(r);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let counts = |k: &String| runs.iter().filter(|r| &label(r) == k).count();
    if keys.iter().any(|k| counts(k) > 1) {
        keys.retain(|k| counts(k) > 1);
    }
    let series = |phase: &dyn Fn(&RunResult) -> Phase, f: &dyn Fn(&PhaseStats) -> f64| -> Series {
        keys.iter()
            .map(|k| {
                let mut p: Vec<(f64, f64)> = runs
                    .iter()
                    .filter(|r| &label(r) == k)
                    .map(|r| (r.spec.tenants as f64, f(&phase(r).stats())))
                    .collect();
                p.sort_by(|a, b| a.0.total_cmp(&b.0));
                (k.clone(), p)
            })
            .collect()
    };
    let cold = |r: &RunResult| cold_phase(r);
    let warm = |r: &RunResult| r.warm.clone().unwrap_or_default();
    type Figure<'f> = (&'f str, &'f str, &'f dyn Fn(&PhaseStats) -> f64);
    type Row<'f> = (&'f str, &'f dyn Fn(&RunResult) -> Phase);
    let figures: [Figure; 3] = [
        ("CPU-seconds per output token", "CPU-s / token", &|s| {
            s.cpu_s_per_token
        }),
        ("TTFT p50", "TTFT p50 (ms)", &|s| percentile(&s.ttft, 50.0)),
        ("TPOT p50", "TPOT p50 (ms)", &|s| percentile(&s.tpot, 50.0)),
    ];
    let p = out.join("phases.png");
    let root = BitMapBackend::new(&p, (2100, 1200)).into_drawing_area();
    t!(root.fill(&WHITE));
    let areas = root.split_evenly((2, 3));
    let rows: [Row; 2] = [("cold", &cold), ("warm", &warm)];
    for (row, (name, phase)) in rows.iter().enumerate() {
        for (col, (title, ydesc, f)) in figures.iter().enumerate() {
            line_chart(
                &areas[row * 3 + col],
                &format!("{title}, {name} phase"),
                "tenants",
                ydesc,
                &series(*phase, *f),
                false,
            )?;
        }
    }
    t!(root.present());
    Ok(Some("phases.png".to_string()))
}
