//! The numbers of one run and their summary over repetitions.

use pageferry::engine::MigrationReport;
use serde::Serialize;

const GIB: f64 = (1u64 << 30) as f64;

/// CPU-seconds per GiB of `bytes`.
pub fn cpu_s_per_gib(cpu_s: f64, bytes: u64) -> f64 {
    if bytes > 0 {
        cpu_s / (bytes as f64 / GIB)
    } else {
        0.0
    }
}

pub use pageferry::engine::stats::mbps;

/// Reads one field of [`Metrics`].
pub type Getter = fn(&Metrics) -> f64;

/// One run's numbers, all derived from the source's report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Migration time (s), handshake to destination running.
    pub time_s: f64,
    /// Guest memory moved per second (all rounds, zero pages included), Mbps.
    pub raw_mbps: f64,
    /// Bytes on the data channels per second, Mbps.
    pub wire_mbps: f64,
    /// Source / destination process CPU over their wall time, like `top` (100 = one core);
    /// the engine measures both (getrusage of each process over its part of the migration).
    pub send_cpu_pct: f64,
    pub recv_cpu_pct: f64,
    /// Source / destination CPU-seconds per GiB of guest memory moved.
    pub send_cpu_s_per_gib: f64,
    pub recv_cpu_s_per_gib: f64,
    /// Raw bytes / wire bytes.
    pub ratio: f64,
    pub rounds: f64,
    pub downtime_ms: f64,
}

impl Metrics {
    pub fn from_report(r: &MigrationReport) -> Self {
        Self {
            time_s: r.total_time_s,
            raw_mbps: mbps(r.raw_bytes, r.total_time_s),
            wire_mbps: mbps(r.wire_bytes, r.total_time_s),
            send_cpu_pct: r.send_cpu_pct,
            recv_cpu_pct: r.recv_cpu_pct,
            send_cpu_s_per_gib: cpu_s_per_gib(r.send_cpu_s, r.raw_bytes),
            recv_cpu_s_per_gib: cpu_s_per_gib(r.recv_cpu_s, r.raw_bytes),
            ratio: r.ratio,
            rounds: r.rounds as f64,
            downtime_ms: r.downtime_ms,
        }
    }

    /// (name, getter) of every field, in table order.
    pub const FIELDS: [(&'static str, Getter); 10] = [
        ("time_s", |m| m.time_s),
        ("raw_mbps", |m| m.raw_mbps),
        ("wire_mbps", |m| m.wire_mbps),
        ("send_cpu_pct", |m| m.send_cpu_pct),
        ("recv_cpu_pct", |m| m.recv_cpu_pct),
        ("send_cpu_s_per_gib", |m| m.send_cpu_s_per_gib),
        ("recv_cpu_s_per_gib", |m| m.recv_cpu_s_per_gib),
        ("ratio", |m| m.ratio),
        ("rounds", |m| m.rounds),
        ("downtime_ms", |m| m.downtime_ms),
    ];

    fn from_fn(mut f: impl FnMut(Getter) -> f64) -> Self {
        let [t, r, w, sp, rp, sg, rg, ra, ro, d] = Self::FIELDS.map(|(_, g)| f(g));
        Self {
            time_s: t,
            raw_mbps: r,
            wire_mbps: w,
            send_cpu_pct: sp,
            recv_cpu_pct: rp,
            send_cpu_s_per_gib: sg,
            recv_cpu_s_per_gib: rg,
            ratio: ra,
            rounds: ro,
            downtime_ms: d,
        }
    }
}

/// Median of values (mean of the middle two for an even count); NaN for none.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Median, minimum and maximum of every field over the runs of a case (each field on its
/// own: the median time and the median CPU may come from different runs).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub median: Metrics,
    pub min: Metrics,
    pub max: Metrics,
}

impl Summary {
    /// None for no runs.
    pub fn of(runs: &[Metrics]) -> Option<Self> {
        if runs.is_empty() {
            return None;
        }
        let col = |g: Getter| runs.iter().map(g).collect::<Vec<f64>>();
        Some(Self {
            median: Metrics::from_fn(|g| median(&col(g))),
            min: Metrics::from_fn(|g| col(g).into_iter().fold(f64::INFINITY, f64::min)),
            max: Metrics::from_fn(|g| col(g).into_iter().fold(f64::NEG_INFINITY, f64::max)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn cpu_and_rates() {
        assert_eq!(cpu_s_per_gib(2.0, 512 << 20), 4.0);
        assert_eq!(cpu_s_per_gib(2.0, 0), 0.0);
        assert_eq!(mbps(125_000_000, 1.0), 1000.0);
        assert_eq!(mbps(1, 0.0), 0.0);
    }

    #[test]
    fn from_report() {
        let r = MigrationReport {
            total_time_s: 8.0,
            raw_bytes: 1 << 30,
            wire_bytes: (1 << 30) / 4,
            ratio: 4.0,
            send_cpu_s: 4.0,
            send_cpu_pct: 50.0,
            recv_cpu_s: 2.0,
            recv_cpu_pct: 25.0,
            rounds: 2,
            downtime_ms: 12.5,
            ..Default::default()
        };
        let m = Metrics::from_report(&r);
        assert_eq!(m.time_s, 8.0);
        assert!((m.raw_mbps - 1073.741824).abs() < 1e-6);
        assert!((m.wire_mbps - 268.435456).abs() < 1e-6);
        assert_eq!((m.send_cpu_pct, m.recv_cpu_pct), (50.0, 25.0));
        assert_eq!((m.send_cpu_s_per_gib, m.recv_cpu_s_per_gib), (4.0, 2.0));
        assert_eq!((m.ratio, m.rounds, m.downtime_ms), (4.0, 2.0, 12.5));
    }

    #[test]
    fn summary_per_field() {
        let a = Metrics { time_s: 3.0, send_cpu_pct: 10.0, ..Default::default() };
        let b = Metrics { time_s: 1.0, send_cpu_pct: 30.0, ..Default::default() };
        let c = Metrics { time_s: 2.0, send_cpu_pct: 20.0, ..Default::default() };
        let s = Summary::of(&[a, b, c]).unwrap();
        assert_eq!((s.median.time_s, s.min.time_s, s.max.time_s), (2.0, 1.0, 3.0));
        assert_eq!((s.median.send_cpu_pct, s.min.send_cpu_pct, s.max.send_cpu_pct), (20.0, 10.0, 30.0));
        assert!(Summary::of(&[]).is_none());
        let one = Summary::of(&[a]).unwrap();
        assert_eq!((one.median, one.min, one.max), (a, a, a));
    }
}
