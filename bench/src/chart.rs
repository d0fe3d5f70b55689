//! The SVG chart of workload runs (plotters): for each run, a column with the
//! flush-batch commit latency over time (the slowest commit of every quarter
//! second) and the file size against the live data over time, both with the
//! compaction intervals shaded. Runs side by side share the latency scale,
//! so a blocking compaction's stall stands out.

use crate::workload::Run;
use crate::{mib, ms, BoxError};
use plotters::prelude::*;
use std::path::Path;

/// Width of a commit-latency bucket, in seconds.
const BUCKET: f64 = 0.25;

/// Shading of the compaction intervals.
const COMPACTING: RGBAColor = RGBAColor(230, 90, 60, 0.18);

/// The slowest commit of each bucket: (bucket start, latency in ms).
fn latency_series(run: &Run) -> Vec<(f64, f64)> {
    let buckets = (run.load.as_secs_f64() / BUCKET).ceil() as usize + 1;
    let mut max = vec![None::<f64>; buckets];
    for c in &run.commits {
        let i = ((c.t / BUCKET) as usize).min(buckets - 1);
        let latency = ms(c.latency);
        max[i] = Some(max[i].map_or(latency, |m: f64| m.max(latency)));
    }
    max.into_iter()
        .enumerate()
        .filter_map(|(i, m)| m.map(|m| (i as f64 * BUCKET, m)))
        .collect()
}

/// The compaction intervals, in seconds since the load started.
fn intervals(run: &Run) -> Vec<(f64, f64)> {
    run.compactions
        .iter()
        .map(|c| (c.t, c.t + c.report.duration.as_secs_f64()))
        .collect()
}

/// Draws the chart of `runs` (one column each) to `path`.
pub fn write(path: &Path, runs: &[Run]) -> Result<(), BoxError> {
    if runs.is_empty() {
        return Ok(());
    }
    let columns = runs.len();
    let width = u32::try_from(700 * columns).unwrap_or(1400);
    let root = SVGBackend::new(path, (width, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((2, columns));
    let series: Vec<_> = runs.iter().map(latency_series).collect();
    let t_max = runs
        .iter()
        .map(|r| r.load.as_secs_f64())
        .fold(1.0, f64::max);
    let latency_max = series.iter().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let size_max = runs
        .iter()
        .flat_map(|r| r.sizes.iter())
        .map(|s| mib(s.file_size))
        .fold(1.0, f64::max)
        * 1.1;

    for (column, run) in runs.iter().enumerate() {
        let shaded = intervals(run);

        let mut latency = ChartBuilder::on(&areas[column])
            .caption(
                format!(
                    "flush-batch commit latency, slowest per {BUCKET} s ({} compaction)",
                    run.name()
                ),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..t_max, 0.0..latency_max)?;
        latency
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc("seconds")
            .y_desc("ms")
            .draw()?;
        latency
            .draw_series(
                shaded.iter().map(|&(a, b)| {
                    Rectangle::new([(a, 0.0), (b, latency_max)], COMPACTING.filled())
                }),
            )?
            .label("compaction running")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], COMPACTING.filled()));
        latency
            .draw_series(LineSeries::new(series[column].iter().copied(), &BLUE))?
            .label("slowest commit")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLUE));
        latency
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;

        let mut size = ChartBuilder::on(&areas[columns + column])
            .caption(
                format!("file size and live data ({} compaction)", run.name()),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..t_max, 0.0..size_max)?;
        size.configure_mesh()
            .light_line_style(WHITE)
            .x_desc("seconds")
            .y_desc("MiB")
            .draw()?;
        size.draw_series(
            shaded
                .iter()
                .map(|&(a, b)| Rectangle::new([(a, 0.0), (b, size_max)], COMPACTING.filled())),
        )?;
        size.draw_series(LineSeries::new(
            run.sizes.iter().map(|s| (s.t, mib(s.file_size))),
            &RED,
        ))?
        .label("file size")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], RED));
        size.draw_series(LineSeries::new(
            run.sizes.iter().map(|s| (s.t, mib(s.space_used))),
            &GREEN,
        ))?
        .label("live data")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], GREEN));
        size.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
