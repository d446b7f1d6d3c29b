//! The matrix as a markdown table (shaped like the seed's, with more columns) and as JSON
//! lines (one object per case, every run included).

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
    let mut head = vec!["method", "level", "channels", "link"];
    head.extend(COLUMNS.iter().map(|c| c.0));
    let mut s = format!("| {} |\n", head.join(" | "));
    s.push_str(&format!("|{}\n", ["---|"; 4].concat() + &["---:|"; COLUMNS.len()].concat()));
    for r in results.iter().filter(|r| r.status != Status::Skipped) {
        let c = &r.case;
        let mut row = vec![c.method.to_string(), c.level.to_string(), c.channels.to_string(), c.link.to_string()];
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
    if !meta.skipped.is_empty() {
        s.push('\n');
        for (what, why) in &meta.skipped {
            s.push_str(&format!("Skipped {what}: {why}\n"));
        }
    }
    s
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
        let case = |m, ch| Case { method: m, level: if m.compresses() { 1 } else { 0 }, channels: ch, link: Link::Unlimited };
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
