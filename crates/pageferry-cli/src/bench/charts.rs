//! SVG charts of the matrix (plotters, SVG backend only), per link:
//! * `time-<link>.svg`: migration time by channel count, one line per method;
//! * `cpu-<link>.svg`: CPU-seconds per GiB by channel count, one colour per method, the
//!   source solid with dots, the destination dashed with triangles;
//! * `time-by-link-<N>ch.svg` (with two links or more): migration time by link at N
//!   channels, one line per method — where `auto` sits against the fixed methods.
//!
//! Points are medians over the runs of a case; cases that failed or were skipped are absent.

use super::link::Link;
use super::matrix::{CaseResult, Status};
use super::BenchMethod;
use super::metrics::Getter;
use anyhow::{anyhow, Result};
use pageferry::codec::Method;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// One line of a chart.
pub(super) struct Series {
    pub label: String,
    pub color: RGBColor,
    pub dashed: bool,
    /// Mark each point (a dot, or a triangle when dashed); off for reference lines.
    pub markers: bool,
    /// (index of the channel count, value).
    pub points: Vec<(f64, f64)>,
}

fn method_color(m: BenchMethod, nth_level: usize) -> RGBColor {
    // One color per method, in registry order (none grey, zlib blue, zstd green, qatzip red).
    const PALETTE: [RGBColor; 6] =
        [RGBColor(110, 110, 110), RGBColor(31, 119, 180), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(255, 127, 14)];
    // auto: near-black, apart from every method.
    let base = match m {
        BenchMethod::Fixed(m) => PALETTE[Method::all().position(|x| x == m).unwrap_or(0) % PALETTE.len()],
        BenchMethod::Auto => RGBColor(20, 20, 20),
    };
    if nth_level == 0 {
        base
    } else {
        // Further levels of one method: a darker shade each.
        let f = 1.0 / (1.0 + 0.45 * nth_level as f64);
        RGBColor((base.0 as f64 * f) as u8, (base.1 as f64 * f) as u8, (base.2 as f64 * f) as u8)
    }
}

/// Write every chart into `dir`; returns the files written.
pub fn write_all(results: &[CaseResult], dir: &Path) -> Result<Vec<PathBuf>> {
    let ok: Vec<&CaseResult> = results.iter().filter(|r| r.status == Status::Ok && !r.runs.is_empty()).collect();
    let mut links: Vec<&Link> = Vec::new();
    for r in &ok {
        if !links.contains(&&r.case.link) {
            links.push(&r.case.link);
        }
    }
    let mut written = Vec::new();
    for &link in &links {
        let on_link: Vec<&CaseResult> = ok.iter().copied().filter(|r| r.case.link == *link).collect();
        let mut channels: Vec<usize> = on_link.iter().map(|r| r.case.channels).collect();
        channels.sort_unstable();
        channels.dedup();
        let mut keys: Vec<(BenchMethod, i32, bool)> = Vec::new();
        for r in &on_link {
            if !keys.contains(&(r.case.method, r.case.level, r.case.tls)) {
                keys.push((r.case.method, r.case.level, r.case.tls));
            }
        }
        let several_levels = |m: BenchMethod| keys.iter().filter(|k| k.0 == m && !k.2).count() > 1 || keys.iter().filter(|k| k.0 == m && k.2).count() > 1;
        let series_of = |get: Getter, side: &str, dashed: bool| -> Vec<Series> {
            keys.iter()
                .map(|&(m, l, tls)| {
                    let nth = keys.iter().filter(|k| k.0 == m).position(|k| (k.1, k.2) == (l, tls)).unwrap_or(0);
                    let mut label = if several_levels(m) { format!("{m} {l}") } else { m.to_string() };
                    if tls {
                        label.push_str(" TLS");
                    }
                    if !side.is_empty() {
                        label.push_str(side);
                    }
                    let mut points: Vec<(f64, f64)> = on_link
                        .iter()
                        .filter(|r| (r.case.method, r.case.level, r.case.tls) == (m, l, tls))
                        .filter_map(|r| {
                            let x = channels.iter().position(|&c| c == r.case.channels)? as f64;
                            Some((x, get(&r.summary()?.median)))
                        })
                        .collect();
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    Series { label, color: method_color(m, nth), dashed, markers: true, points }
                })
                .collect()
        };
        let labels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();

        let p = dir.join(format!("time-{}.svg", link.slug()));
        line_chart(&p, &format!("Migration time, link {link}"), "channels", "time (s)", &labels, &series_of(|m| m.time_s, "", false))?;
        written.push(p);

        let mut cpu = series_of(|m| m.send_cpu_s_per_gib, " send", false);
        cpu.extend(series_of(|m| m.recv_cpu_s_per_gib, " recv", true));
        let p = dir.join(format!("cpu-{}.svg", link.slug()));
        line_chart(&p, &format!("CPU-seconds per GiB, link {link}"), "channels", "CPU-s per GiB", &labels, &cpu)?;
        written.push(p);
    }
    if links.len() >= 2 {
        written.extend(time_by_link(&ok, &links, dir)?);
    }
    Ok(written)
}

/// Migration time by link (in the matrix's link order), one chart per channel count.
fn time_by_link(ok: &[&CaseResult], links: &[&Link], dir: &Path) -> Result<Vec<PathBuf>> {
    let mut channels: Vec<usize> = ok.iter().map(|r| r.case.channels).collect();
    channels.sort_unstable();
    channels.dedup();
    let mut written = Vec::new();
    for ch in channels {
        let at: Vec<&CaseResult> = ok.iter().copied().filter(|r| r.case.channels == ch).collect();
        let mut keys: Vec<(BenchMethod, i32)> = Vec::new();
        for r in &at {
            if !keys.contains(&(r.case.method, r.case.level)) {
                keys.push((r.case.method, r.case.level));
            }
        }
        let series: Vec<Series> = keys
            .iter()
            .map(|&(m, l)| {
                let nth = keys.iter().filter(|k| k.0 == m).position(|k| k.1 == l).unwrap_or(0);
                let label = if keys.iter().filter(|k| k.0 == m).count() > 1 { format!("{m} {l}") } else { m.to_string() };
                let points = links
                    .iter()
                    .enumerate()
                    .filter_map(|(x, link)| {
                        let r = at.iter().find(|r| r.case.link == **link && (r.case.method, r.case.level) == (m, l))?;
                        Some((x as f64, r.summary()?.median.time_s))
                    })
                    .collect();
                Series { label, color: method_color(m, nth), dashed: false, markers: true, points }
            })
            .collect();
        let labels: Vec<String> = links.iter().map(|l| l.to_string()).collect();
        let p = dir.join(format!("time-by-link-{ch}ch.svg"));
        line_chart(&p, &format!("Migration time by link, {ch} channels"), "link", "time (s)", &labels, &series)?;
        written.push(p);
    }
    Ok(written)
}

/// A line chart over evenly spaced channel counts (`x_labels`), legend in the upper right.
pub(super) fn line_chart(path: &Path, title: &str, x_desc: &str, y_desc: &str, x_labels: &[String], series: &[Series]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("chart {}: {e}", path.display());
    let y_max = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    // Headroom above the highest point for the legend box: about 16 px a series plus its
    // frame, out of a plotting area about 395 px high.
    let legend_frac = (series.len() as f64 * 16.0 + 24.0) / 395.0;
    let y_top = if y_max > 0.0 { y_max / (1.0 - legend_frac - 0.05).max(0.3) } else { 1.0 };
    let n = x_labels.len().max(1) as f64;
    let root = SVGBackend::new(path, (820, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.4f64..(n - 0.6), 0f64..y_top)
        .map_err(|e| err(&e))?;
    let fmt_x = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < x_labels.len() {
            x_labels[i as usize].clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .x_labels(x_labels.len())
        .x_label_formatter(&fmt_x)
        .disable_x_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(|e| err(&e))?;
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        let color = s.color;
        let style = color.stroke_width(2);
        let anno = if s.dashed {
            chart.draw_series(DashedLineSeries::new(s.points.iter().copied(), 8, 5, style)).map_err(|e| err(&e))?
        } else {
            chart.draw_series(LineSeries::new(s.points.iter().copied(), style)).map_err(|e| err(&e))?
        };
        let dashed = s.dashed;
        anno.label(s.label.clone()).legend(move |(x, y)| {
            // Relative to (x, y): two short strokes for dashed, one long one otherwise.
            let (a, b) = if dashed { (vec![(0, 0), (7, 0)], vec![(12, 0), (19, 0)]) } else { (vec![(0, 0), (19, 0)], vec![(0, 0), (19, 0)]) };
            EmptyElement::at((x, y)) + PathElement::new(a, color.stroke_width(2)) + PathElement::new(b, color.stroke_width(2))
        });
        if !s.markers {
        } else if s.dashed {
            chart
                .draw_series(s.points.iter().map(|&p| TriangleMarker::new(p, 5, color.filled())))
                .map_err(|e| err(&e))?;
        } else {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(|e| err(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matrix::{Case, RunRecord};
    use crate::bench::metrics::Metrics;
    use pageferry::engine::MigrationReport;

    #[test]
    fn writes_svg_per_link() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |t: f64| {
            let report = MigrationReport { total_time_s: t, raw_bytes: 1 << 30, wire_bytes: 1 << 29, send_cpu_s: t, recv_cpu_s: t / 2.0, ..Default::default() };
            RunRecord { metrics: Metrics::from_report(&report), verified: true, file_check: "match".into(), wall_s: t, report }
        };
        let mut results = Vec::new();
        for (m, l) in [("none", 0), ("zstd", 1), ("zstd", 3)].map(|(n, l)| (n.parse::<Method>().unwrap(), l)) {
            for ch in [1, 2, 4] {
                results.push(CaseResult {
                    case: Case { method: m.into(), level: l, channels: ch, link: Link::Cap { bytes_per_s: 125_000_000, text: "1gbit".into() }, tls: false },
                    status: Status::Ok,
                    reason: None,
                    runs: vec![rec(10.0 / ch as f64)],
                });
            }
        }
        let files = write_all(&results, dir.path()).unwrap();
        let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["time-cap-1gbit.svg", "cpu-cap-1gbit.svg"]);
        for f in &files {
            let s = std::fs::read_to_string(f).unwrap();
            assert!(s.starts_with("<svg"), "{}", &s[..40.min(s.len())]);
            assert!(s.contains("zstd 3"));
        }
        assert!(std::fs::read_to_string(&files[1]).unwrap().contains("none recv"));
    }

    #[test]
    fn time_by_link_with_auto() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |t: f64| {
            let report = MigrationReport { total_time_s: t, raw_bytes: 1 << 30, wire_bytes: 1 << 29, ..Default::default() };
            RunRecord { metrics: Metrics::from_report(&report), verified: true, file_check: "match".into(), wall_s: t, report }
        };
        let links = [Link::Cap { bytes_per_s: 12_500_000, text: "100mbit".into() }, Link::Unlimited];
        let mut results = Vec::new();
        for link in &links {
            for m in [BenchMethod::Auto, "none".parse::<Method>().unwrap().into(), "zstd".parse::<Method>().unwrap().into()] {
                results.push(CaseResult { case: Case { method: m, level: 0, channels: 2, link: link.clone(), tls: false }, status: Status::Ok, reason: None, runs: vec![rec(3.0)] });
            }
        }
        let files = write_all(&results, dir.path()).unwrap();
        let by_link = files.iter().find(|p| p.ends_with("time-by-link-2ch.svg")).expect("time-by-link chart");
        let s = std::fs::read_to_string(by_link).unwrap();
        assert!(s.contains("auto") && s.contains("cap:100mbit") && s.contains("unlimited"));
    }
}
