//! The matrix as a markdown table (shaped like the seed's, with more columns) and as JSON
//! lines (one object per case, every run included).

use super::BenchMethod;
use super::matrix::{CaseResult, Status};
use super::metrics::{Getter, Summary};
use anyhow::Result;
use serde_json::json;

/// What the results were measured on, for the markdown header.
pub struct Meta {
    pub date_utc: String,
    pub cores: usize,
    pub cpu_model: String,
    pub command: String,
    pub image: String,
    pub image_bytes: u64,
    pub reps: usize,
    pub skipped: Vec<(String, String)>,
}

impl Meta {
    pub fn new(image: &str, image_bytes: u64, reps: usize, skipped: &[(String, String)]) -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| "unknown CPU".into());
        Self {
            date_utc: utc_date_time(std::time::SystemTime::now()),
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            image: image.to_string(),
            image_bytes,
            reps,
            skipped: skipped.to_vec(),
        }
    }

    pub fn header_markdown(&self) -> String {
        format!(
            "# pageferry bench results\n\n- date: {} UTC\n- machine: {} cores ({})\n- command: `{}`\n- image: {} ({} bytes)\n- runs per case: {}{}\n",
            self.date_utc,
            self.cores,
            self.cpu_model,
            self.command,
            self.image,
            self.image_bytes,
            self.reps,
            if self.reps > 1 { " (cells: median (min–max))" } else { "" }
        )
    }
}

/// "YYYY-MM-DD HH:MM" in UTC, without a date library.
pub fn utc_date_time(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (proleptic Gregorian), days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", rem / 3600, rem / 60 % 60)
}

/// Table columns after the case's own (method, level, channels, link): header, field, decimals.
const COLUMNS: [(&str, Getter, usize); 10] = [
    ("time (s)", |m| m.time_s, 2),
    ("raw Mbps", |m| m.raw_mbps, 0),
    ("wire Mbps", |m| m.wire_mbps, 0),
    ("send cpu%", |m| m.send_cpu_pct, 0),
    ("recv cpu%", |m| m.recv_cpu_pct, 0),
    ("send CPU-s/GiB", |m| m.send_cpu_s_per_gib, 2),
    ("recv CPU-s/GiB", |m| m.recv_cpu_s_per_gib, 2),
    ("ratio", |m| m.ratio, 2),
    ("rounds", |m| m.rounds, 0),
    ("downtime (ms)", |m| m.downtime_ms, 1),
];

fn num(v: f64, decimals: usize) -> String {
    // Small values keep one decimal (9.5% CPU, as in the seed's table; a median of 1.5 rounds).
    if decimals == 0 && v.fract() != 0.0 && v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.decimals$}")
    }
}

/// The cell of one column: median, with (min–max) when there are several runs.
fn cell(s: &Summary, runs: usize, get: Getter, decimals: usize) -> String {
    let m = num(get(&s.median), decimals);
    if runs > 1 {
        format!("{m} ({}–{})", num(get(&s.min), decimals), num(get(&s.max), decimals))
    } else {
        m
    }
}

/// The markdown table: one row per case that ran (failed ones say why), then the skipped
/// methods and links.
pub fn markdown(results: &[CaseResult], meta: &Meta) -> String {
    // The transport column appears when some case ran over TLS.
    let show_tls = results.iter().any(|r| r.case.tls);
    let mut head = vec!["method", "level", "channels", "link"];
    if show_tls {
        head.push("transport");
    }
    head.extend(COLUMNS.iter().map(|c| c.0));
    let mut s = format!("| {} |\n", head.join(" | "));
    s.push_str(&format!("|{}\n", ["---|"; 4].concat() + if show_tls { "---|" } else { "" } + &["---:|"; COLUMNS.len()].concat()));
    for r in results.iter().filter(|r| r.status != Status::Skipped) {
        let c = &r.case;
        let mut row = vec![c.method.to_string(), c.level.to_string(), c.channels.to_string(), c.link.to_string()];
        if show_tls {
            row.push(if c.tls { "TLS 1.3" } else { "TCP" }.to_string());
        }
        match (&r.status, r.summary()) {
            (Status::Ok, Some(sum)) => row.extend(COLUMNS.iter().map(|(_, g, d)| cell(&sum, r.runs.len(), *g, *d))),
            _ => {
                let why = r.reason.clone().unwrap_or_else(|| "failed".into()).replace('|', "/");
                row.push(format!("FAILED: {why}"));
                row.extend(vec!["—".to_string(); COLUMNS.len() - 1]);
            }
        }
        s.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    s.push_str(&auto_versus_fixed(results));
    if !meta.skipped.is_empty() {
        s.push('\n');
        for (what, why) in &meta.skipped {
            s.push_str(&format!("Skipped {what}: {why}\n"));
        }
    }
    s
}

/// For every (link, channels) with an `auto` case: its median time against the best fixed
/// method's and `none`'s, and the shares of batches auto sent with each candidate (from its
/// median run). Empty without auto cases.
pub fn auto_versus_fixed(results: &[CaseResult]) -> String {
    let ok = |r: &&CaseResult| r.status == Status::Ok && !r.runs.is_empty();
    let mut s = String::new();
    for a in results.iter().filter(ok).filter(|r| r.case.method == BenchMethod::Auto) {
        let Some(t_auto) = a.summary().map(|x| x.median.time_s) else { continue };
        let same = |r: &&CaseResult| r.case.link == a.case.link && r.case.channels == a.case.channels;
        let fixed: Vec<(String, f64)> = results
            .iter()
            .filter(ok)
            .filter(same)
            .filter(|r| r.case.method != BenchMethod::Auto)
            .filter_map(|r| Some((format!("{} {}", r.case.method, r.case.level), r.summary()?.median.time_s)))
            .collect();
        let best = fixed.iter().min_by(|x, y| x.1.total_cmp(&y.1));
        let none_case = results.iter().filter(ok).filter(same).find(|r| r.case.method == BenchMethod::Fixed(pageferry::codec::Method::default()));
        let none = none_case.and_then(|r| r.summary()).map(|x| x.median.time_s);
        let by_round = none_case.and_then(|n| ratio_by_round(a, n));
        // The run whose time is the median (or nearest to it).
        let run = a.runs.iter().min_by(|x, y| (x.metrics.time_s - t_auto).abs().total_cmp(&(y.metrics.time_s - t_auto).abs()));
        let shares = run.and_then(|r| r.report.auto.as_ref()).map(|x| x.summary()).unwrap_or_default();
        if s.is_empty() {
            s.push_str("\n**auto against the fixed methods** (median times; auto/best ≤ 1.10 and auto/none ≤ 1.00 are the targets; \"by round\": the median of auto/none within each round of runs, which ran side by side):\n\n");
            s.push_str("| link | channels | auto (s) | best fixed | best (s) | auto/best | none (s) | auto/none | auto/none by round | auto's batches |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---|\n");
        }
        let dash = || "—".to_string();
        s.push_str(&format!(
            "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} |\n",
            a.case.link,
            a.case.channels,
            t_auto,
            best.map_or_else(dash, |b| b.0.clone()),
            best.map_or_else(dash, |b| format!("{:.2}", b.1)),
            best.map_or_else(dash, |b| format!("{:.2}", t_auto / b.1)),
            none.map_or_else(dash, |n| format!("{n:.2}")),
            none.map_or_else(dash, |n| format!("{:.2}", t_auto / n)),
            by_round.map_or_else(dash, |r| format!("{r:.2}")),
            shares
        ));
    }
    s
}

/// The median over rounds of `a`'s time divided by `b`'s in the same round (the bench runs
/// every case of a link once per round, side by side: see `matrix::schedule`), when both ran
/// every round (at least two). On a machine whose load drifts this compares like with like,
/// where the ratio of two medians may pair a quiet run with a busy one.
pub fn ratio_by_round(a: &CaseResult, b: &CaseResult) -> Option<f64> {
    if a.runs.len() < 2 || a.runs.len() != b.runs.len() {
        return None;
    }
    let mut r: Vec<f64> = a.runs.iter().zip(&b.runs).map(|(x, y)| x.metrics.time_s / y.metrics.time_s).collect();
    r.sort_by(f64::total_cmp);
    let n = r.len();
    Some(if n % 2 == 1 { r[n / 2] } else { 0.5 * (r[n / 2 - 1] + r[n / 2]) })
}

/// One JSON object per case: the case, status, verification, median/min/max of every metric
/// and every run (its metrics, checks and the source's full report).
pub fn case_json(r: &CaseResult) -> Result<serde_json::Value> {
    let c = &r.case;
    let sum = r.summary();
    Ok(json!({
        "method": c.method.name(),
        "level": c.level,
        "channels": c.channels,
        "link": c.link.name(),
        "tls": c.tls,
        "link_bytes_per_s": c.link.rate(),
        "status": r.status,
        "reason": r.reason,
        "reps": r.runs.len(),
        "verified": r.verified(),
        "median": sum.map(|s| s.median),
        "min": sum.map(|s| s.min),
        "max": sum.map(|s| s.max),
        "runs": serde_json::to_value(&r.runs)?,
    }))
}

pub fn json_lines(results: &[CaseResult]) -> Result<String> {
    let mut s = String::new();
    for r in results {
        s.push_str(&serde_json::to_string(&case_json(r)?)?);
        s.push('\n');
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::link::Link;
    use crate::bench::matrix::{Case, RunRecord};
    use crate::bench::metrics::Metrics;
    use crate::bench::BenchMethod;
    use pageferry::codec::Method;

    fn named(name: &str) -> Method {
        name.parse().unwrap()
    }
    use pageferry::engine::MigrationReport;

    fn run(time: f64) -> RunRecord {
        let report = MigrationReport { total_time_s: time, raw_bytes: 1 << 30, wire_bytes: 1 << 28, ratio: 4.0, verified: true, rounds: 1, ..Default::default() };
        RunRecord { metrics: Metrics::from_report(&report), verified: true, file_check: "match".into(), wall_s: time + 1.0, report }
    }

    fn results() -> Vec<CaseResult> {
        let case = |m, ch| Case { method: BenchMethod::Fixed(m), level: if m.compresses() { 1 } else { 0 }, channels: ch, link: Link::Unlimited, tls: false };
        vec![
            CaseResult { case: case(named("none"), 2), status: Status::Ok, reason: None, runs: vec![run(2.0), run(4.0), run(3.0)] },
            CaseResult { case: case(named("zstd"), 2), status: Status::Failed, reason: Some("source failed: boom".into()), runs: vec![] },
            CaseResult { case: case(named("qatzip"), 2), status: Status::Skipped, reason: Some("no device".into()), runs: vec![] },
        ]
    }

    fn meta() -> Meta {
        Meta::new("test", 1 << 30, 3, &[("method qatzip level 1".into(), "no device".into())])
    }

    #[test]
    fn table_shape() {
        let t = markdown(&results(), &meta());
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(rows.len(), 4, "{t}");
        let cols = |l: &str| l.matches('|').count() - 1;
        assert!(rows.iter().all(|r| cols(r) == 14), "{t}");
        assert!(rows[0].starts_with("| method | level | channels | link | time (s) | raw Mbps | wire Mbps | send cpu% | recv cpu% | send CPU-s/GiB"));
        assert!(rows[2].contains("| none | 0 | 2 | unlimited | 3.00 (2.00–4.00) |"), "{}", rows[2]);
        assert!(rows[3].contains("FAILED: source failed: boom"), "{}", rows[3]);
        assert!(t.contains("Skipped method qatzip level 1: no device"));
    }

    #[test]
    fn auto_is_compared_with_the_best_fixed_method_and_none() {
        let link = Link::Cap { bytes_per_s: 125_000_000, text: "1gbit".into() };
        let case = |m: BenchMethod, l| Case { method: m, level: l, channels: 2, link: link.clone(), tls: false };
        let mut auto_run = run(5.0);
        auto_run.report.auto = Some(pageferry::engine::policy::AutoReport {
            shares: vec![
                pageferry::engine::policy::AutoShare { candidate: "zstd:1".into(), batches: 90, ..Default::default() },
                pageferry::engine::policy::AutoShare { candidate: "none".into(), batches: 10, ..Default::default() },
            ],
            ..Default::default()
        });
        let rs = vec![
            CaseResult { case: case(BenchMethod::Auto, 0), status: Status::Ok, reason: None, runs: vec![auto_run] },
            CaseResult { case: case(named("none").into(), 0), status: Status::Ok, reason: None, runs: vec![run(8.5)] },
            CaseResult { case: case(named("zstd").into(), 1), status: Status::Ok, reason: None, runs: vec![run(4.7)] },
            CaseResult { case: case(named("zlib").into(), 1), status: Status::Ok, reason: None, runs: vec![run(4.6)] },
        ];
        let t = auto_versus_fixed(&rs);
        let row = t.lines().find(|l| l.starts_with("| cap:1gbit")).unwrap_or_else(|| panic!("{t}"));
        assert_eq!(row, "| cap:1gbit | 2 | 5.00 | zlib 1 | 4.60 | 1.09 | 8.50 | 0.59 | — | zstd:1 90%, none 10% |");
        assert_eq!(auto_versus_fixed(&rs[1..]), "");
    }

    /// Round by round: a quiet round and a busy one each compare auto with the none run
    /// beside it, where the ratio of the medians pairs runs from different rounds.
    #[test]
    fn auto_over_none_by_round_is_the_median_of_the_ratios_within_each_round() {
        let case = |m: BenchMethod| Case { method: m, level: 0, channels: 2, link: Link::Unlimited, tls: false };
        let runs = |ts: &[f64]| ts.iter().map(|&t| run(t)).collect::<Vec<_>>();
        let auto = CaseResult { case: case(BenchMethod::Auto), status: Status::Ok, reason: None, runs: runs(&[1.0, 2.0, 1.1]) };
        let none = CaseResult { case: case(named("none").into()), status: Status::Ok, reason: None, runs: runs(&[1.1, 2.1, 1.0]) };
        let r = ratio_by_round(&auto, &none).unwrap();
        assert!((r - 2.0 / 2.1).abs() < 1e-9, "{r}");
        let t = auto_versus_fixed(&[auto.clone(), none.clone()]);
        let row = t.lines().find(|l| l.starts_with("| unlimited")).unwrap_or_else(|| panic!("{t}"));
        assert!(row.contains("| 1.10 | 1.00 | 0.95 |"), "{row}");
        // Not every round ran both, or a single round: no paired figure.
        let short = CaseResult { runs: runs(&[1.0, 2.0]), ..none.clone() };
        assert_eq!(ratio_by_round(&auto, &short), None);
        let one = |c: &CaseResult| CaseResult { runs: c.runs[..1].to_vec(), ..c.clone() };
        assert_eq!(ratio_by_round(&one(&auto), &one(&none)), None);
    }

    #[test]
    fn json_shape() {
        let j = json_lines(&results()).unwrap();
        let objs: Vec<serde_json::Value> = j.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(objs.len(), 3);
        let o = &objs[0];
        assert_eq!(o["method"], "none");
        assert_eq!(o["status"], "ok");
        assert_eq!(o["verified"], true);
        assert_eq!(o["reps"], 3);
        assert_eq!(o["median"]["time_s"], 3.0);
        assert_eq!(o["min"]["time_s"], 2.0);
        assert_eq!(o["max"]["time_s"], 4.0);
        assert_eq!(o["runs"].as_array().unwrap().len(), 3);
        assert_eq!(o["runs"][0]["report"]["ratio"], 4.0);
        assert_eq!(o["runs"][0]["file_check"], "match");
        for f in Metrics::FIELDS {
            assert!(o["median"][f.0].is_number(), "{}", f.0);
        }
        assert_eq!(objs[1]["status"], "failed");
        assert_eq!(objs[1]["verified"], false);
        assert!(objs[1]["median"].is_null());
        assert_eq!(objs[2]["status"], "skipped");
    }

    #[test]
    fn dates() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400 + 3_661); // 2000-02-29
        assert_eq!(utc_date_time(t), "2000-02-29 01:01");
        assert_eq!(utc_date_time(std::time::UNIX_EPOCH), "1970-01-01 00:00");
    }
}
