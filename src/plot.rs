//! SVG charts of the benchmarks (plotters' SVG backend: no system
//! libraries, no fonts to load; text is left to the SVG viewer).

use std::error::Error;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use shadow_mmu_vmm::probe::SUMMARY_QUANTILES;
use shadow_mmu_vmm::{LatencySummary, ProgressTrace};

/// Colours of the series, in order.
const COLOURS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// The series of `points` (label, guest bytes, value), one per label, in
/// order of first appearance, each sorted by guest size.
fn series(points: &[(String, u64, u64)]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (label, bytes, ns) in points {
        let p = (*bytes as f64 / f64::from(1u32 << 20), *ns as f64 / 1e6);
        match out.iter_mut().find(|(l, _)| l == label) {
            Some((_, v)) => v.push(p),
            None => out.push((label.clone(), vec![p])),
        }
    }
    for (_, v) in &mut out {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// `get-dirty-log.svg`: get-dirty-log time (ms) against guest size (MiB),
/// one line per backend and design. `points`: (label, guest bytes, ns).
pub fn dirty_log_vs_size(dir: &Path, points: &[(String, u64, u64)]) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let path = dir.join("get-dirty-log.svg");
    let data = series(points);
    let max_x = data.iter().flat_map(|(_, v)| v.iter().map(|p| p.0)).fold(1.0, f64::max);
    let max_y = data.iter().flat_map(|(_, v)| v.iter().map(|p| p.1)).fold(1e-3, f64::max);
    let root = SVGBackend::new(&path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Harvest time with vCPUs write-faulting", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..max_x * 1.05, 0.0..max_y * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("guest memory (MiB)")
        .y_desc("harvest (ms): get_dirty_log, + clear_dirty_log for KVM's manual protect")
        .draw()?;
    for (i, (label, v)) in data.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(v.iter().copied(), c.stroke_width(2)))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(v.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(vec![path])
}

/// `fault-latency.svg`: the vCPUs' write-fault latency during harvests, as a
/// percentile spectrum (x: the percentile on a log scale of `1 - q`, y: the
/// latency on a log scale), one line per design; the max is the last point.
pub fn fault_latency(
    dir: &Path,
    hists: &[(String, &LatencySummary)],
    guest_bytes: u64,
) -> Result<PathBuf, Box<dyn Error>> {
    let path = dir.join("fault-latency.svg");
    let x_of = |q: f64| -(1.0 - q).log10();
    let x_max = x_of(SUMMARY_QUANTILES[SUMMARY_QUANTILES.len() - 1]) + 0.5;
    let y_max = hists.iter().map(|(_, h)| h.max_ns()).max().unwrap_or(1).max(10) as f64 / 1e3 * 2.0;
    let y_min = hists.iter().map(|(_, h)| h.quantile_ns(0.5)).min().unwrap_or(1).max(1) as f64 / 1e3 / 2.0;
    let root = SVGBackend::new(&path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "vCPU write-fault latency, during harvests and outside them ({} MiB guest)",
        guest_bytes >> 20
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (us)")
        .x_labels(6)
        .x_label_formatter(&|x| format!("{}", 100.0 * (1.0 - 10f64.powf(-x))))
        .draw()?;
    for (i, (label, h)) in hists.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let mut pts: Vec<(f64, f64)> =
            SUMMARY_QUANTILES.iter().map(|&q| (x_of(q), h.quantile_ns(q).max(1) as f64 / 1e3)).collect();
        pts.push((x_max, h.max_ns().max(1) as f64 / 1e3));
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
            .label(format!("{label} ({} faults)", h.count()))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(path)
}

/// `guest-progress.svg`: each run's guest progress (million accesses per
/// second, from the samples) over time, its harvest windows shaded in its
/// colour: where a harvest stops the guest, its line drops to zero there.
pub fn guest_progress(dir: &Path, runs: &[(String, &ProgressTrace)]) -> Result<PathBuf, Box<dyn Error>> {
    let path = dir.join("guest-progress.svg");
    let rate = |t: &ProgressTrace| -> Vec<(f64, f64)> {
        t.samples
            .windows(2)
            .map(|w| {
                let dt = (w[1].0 - w[0].0).max(1) as f64;
                (w[1].0 as f64 / 1e6, (w[1].1 - w[0].1) as f64 / dt * 1e3)
            })
            .collect()
    };
    let rates: Vec<Vec<(f64, f64)>> = runs.iter().map(|(_, t)| rate(t)).collect();
    let x_max = rates.iter().flatten().map(|p| p.0).fold(1.0, f64::max);
    let y_max = rates.iter().flatten().map(|p| p.1).fold(0.1, f64::max) * 1.1;
    let root = SVGBackend::new(&path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Guest progress, harvest windows shaded", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart.configure_mesh().x_desc("ms since the vCPUs started").y_desc("M accesses/s (all vCPUs)").draw()?;
    for (i, ((label, t), pts)) in runs.iter().zip(&rates).enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        chart.draw_series(t.windows.iter().map(|w| {
            Rectangle::new(
                [(w.begin_ns as f64 / 1e6, 0.0), (w.end_ns as f64 / 1e6, y_max)],
                c.mix(0.2).filled(),
            )
        }))?;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(1)))?
            .label(format!(
                "{label}: {}",
                t.fraction().map_or("no window".into(), |f| format!("{f:.3} of outside during harvests"))
            ))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(path)
}

/// `migration-rounds.svg`: MiB sent in each pre-copy round (the last one
/// is the stop-and-copy's), one line per migration, with each round's
/// harvest time in the legend's total.
pub fn migration_rounds(
    dir: &Path,
    runs: &[(String, impl std::borrow::Borrow<shadow_mmu_migrate::stats::MigrationStats>)],
) -> Result<PathBuf, Box<dyn Error>> {
    let path = dir.join("migration-rounds.svg");
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let max_x = runs.iter().map(|(_, s)| s.borrow().rounds.len()).max().unwrap_or(1).max(2) as f64;
    let max_y = runs
        .iter()
        .flat_map(|(_, s)| s.borrow().rounds.iter().map(|r| mib(r.bytes_sent)))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(&path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Live migration: bytes sent per pre-copy round", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(-0.2..max_x - 0.8, (0.001..max_y * 2.0).log_scale())?;
    chart.configure_mesh().x_desc("round (0: bulk copy; last: stop-and-copy)").y_desc("MiB sent").draw()?;
    for (i, (label, s)) in runs.iter().enumerate() {
        let s = s.borrow();
        let c = COLOURS[i % COLOURS.len()];
        let pts: Vec<(f64, f64)> =
            s.rounds.iter().map(|r| (f64::from(r.round), mib(r.bytes_sent).max(0.001))).collect();
        let harvest_ms: f64 = s.rounds.iter().map(|r| r.harvest_ns as f64 / 1e6).sum();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
            .label(format!(
                "{label}: {:.0} ms, downtime {}, harvests {harvest_ms:.1} ms",
                s.total_time_ms,
                shadow_mmu_migrate::stats::measured_ms(s.downtime_ms)
            ))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(path)
}
