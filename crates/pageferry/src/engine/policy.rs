//! `--multifd-compression auto`: which method and level each batch is sent with.
//!
//! Compression pays only when the link is the bottleneck. The policy models one batch of raw
//! (non-zero) bytes `B` sent with candidate `c` as a two-stage pipeline — the compression
//! workers, then the link — and predicts its time per raw byte as
//!
//! ```text
//! t(c)    = pipeline( 1 / (cpu_rate(c) × cores),      ratio(c) / link_rate )
//! t(none) = pipeline( 1 / (cpu_rate(none) × workers),  1 / link_rate )
//! ```
//!
//! where `pipeline(a, b)` is the slower stage's time, a little more when the stages are close
//! ([`pipeline`]); `cpu_rate(c)` is raw bytes one worker turns into packets per second with `c` —
//! measured by the engine as the worker's whole time on a batch (zero-page scan, gathering,
//! the codec, checksums, and the time it waited for a core on a shared machine), but not the
//! time it waited for the link (a full socket queue, buffers not yet back from the writer) —
//! `none` included, whose stage is the scan and checksums; `ratio(c)` is wire bytes per
//! raw byte actually sent (batches that did not shrink count as raw, as they are sent);
//! `cores` is the CPU the source may use for compression (`--max-cpu`, at most one per
//! worker; none's stage runs on every worker); and
//! `link_rate` is wire bytes per second the data channels moved, extrapolated to writers
//! that are busy all the time (a writer is busy while it waits for the rate limiter or for
//! the socket, idle while it waits for work), and never above a configured cap.
//!
//! Zero pages cost the scan only, whatever the candidate: a window of mostly zero pages moves
//! few raw bytes and says nothing about compression. (An earlier version derived a "share of
//! the cores the workers really got" from such windows — raw bytes moved over what the codec
//! calls promised — and on a half-zero image concluded the CPU was ten times slower than it
//! was, flapping between none and the compressors at 1 Gbit/s.)
//!
//! A link sample slower than the estimate by more than half is believed once such samples
//! lasted [`AutoConfig::link_drop_s`] (a second), unless the cap changed (then at once): on
//! loopback, a destination that gets no CPU for a moment (another process took the cores)
//! fills the sockets like a slow link would, and auto used to switch to zstd there — doubling
//! the destination's CPU work when CPU was what it lacked (3.9–4.3 s against none's 1.4–1.9 s
//! in 2 of 6 runs of 1 GiB).
//!
//! Every window (64 batches or one second) the policy takes the link sample, folds the
//! window's per-candidate measurements into moving estimates, and picks the candidate with the
//! least predicted time — switching only when that beats the current one by more than the
//! hysteresis margin, so noise does not make it flap. Candidates other than the current one
//! are measured by probes: now and then one batch is compressed with another candidate (and
//! sent like that — every packet names its method), at most a small share of the CPU. A
//! candidate predicted much slower than the current one (by [`AutoConfig::backoff_above`])
//! is probed half as often after each such window, down to once per
//! [`AutoConfig::max_probe_gap`] batches — at once when its worker stage alone is that much
//! slower, since then no ratio can make it win; one that comes close again, or a link rate
//! that moved by half or more, brings every candidate back to [`AutoConfig::probe_gap`]. On a
//! link faster than any compressor (loopback), probes are then a fraction of a percent of the
//! batches instead of a few percent of the CPU. And while `none` carries the migration, a
//! compressor at the longest gap is probed on a slice ([`SAMPLE_BYTES`] of a batch that goes
//! raw, compressed and thrown away): an eighth of a whole probe on the source and nothing on
//! the destination, which on loopback shares the cores. Its ratio on 64 KiB is a little worse
//! than on a whole batch; that only matters once it is back in the race, measured whole again.
//!
//! Probes are paired while the current candidate compresses: the worker compresses the probe's
//! batch with the current candidate too (thrown away), so the two are compared on the same
//! bytes — the ratio of their wire bytes and the difference of their codec CPU times — and a
//! candidate's prediction is the current one's measurements adjusted by that. Unpaired, one
//! probe measures mostly which batch it drew: on the silesia-like image a batch's ratio is
//! anything from 1.5 to 10, while candidates differ by 5–10% on one batch (auto then switched
//! 10 times in a 4-second migration at 1 Gbit/s). After a switch, the candidates that may
//! compete are paired a few times at once.
//!
//! A candidate's CPU rate measured while it carried the migration (its "loaded" rate) is what
//! the policy uses for it afterwards, for [`AutoConfig::loaded_ttl_s`] or until the link
//! moves: probes and pairs measure codecs one batch at a time, under the load the current
//! candidate makes, and miss what running everything with a slower codec costs once the
//! workers compete for the cores (with the destination decoding on the same machine, over
//! loopback). So a candidate that looked better on paper and was not is tried once.
//!
//! Zero pages cost nothing whatever the method, and a batch that does not shrink is sent raw
//! by the channel worker, so neither needs a decision here.
//!
//! The type is plain state driven by the engine (times are passed in), so the unit tests below
//! drive it with synthetic measurements.

use crate::codec::Method;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A method at a level (zstd's fast levels are negative); `none` has level 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Candidate {
    /// The method.
    pub method: Method,
    /// Its level.
    pub level: i32,
}

impl Candidate {
    /// Method `none` (no compression).
    pub fn none() -> Candidate {
        Candidate { method: Method::default(), level: 0 }
    }

    /// `method` at `level` (level 0 for `none`).
    pub fn new(method: Method, level: i32) -> Self {
        Self { method, level: if method.compresses() { level } else { 0 } }
    }
    /// False for `none`.
    pub fn compresses(&self) -> bool {
        self.method.compresses()
    }
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.compresses() {
            write!(f, "{}:{}", self.method, self.level)
        } else {
            f.write_str("none")
        }
    }
}

impl FromStr for Candidate {
    type Err = String;
    /// `none`, `zstd:-1`, `zlib:1`, or a bare method at its default level.
    fn from_str(s: &str) -> Result<Self, String> {
        let (m, l) = match s.split_once(':') {
            Some((m, l)) => (m, Some(l)),
            None => (s, None),
        };
        let method: Method = m.trim().parse().map_err(|e: crate::codec::CodecError| e.to_string())?;
        let level = match l {
            Some(l) => l.trim().parse::<i32>().map_err(|_| format!("bad level in '{s}' (expected e.g. zstd:-1)"))?,
            None => method.default_level() as i32,
        };
        Ok(Candidate::new(method, level))
    }
}

/// What `auto` chooses among, and how it measures. Defaults suit the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoConfig {
    /// Candidates the source offers (the engine keeps those the destination decodes; `none`
    /// is always one).
    pub candidates: Vec<Candidate>,
    /// Cores the compression workers may use together \[`--max-cpu`\]; `None`: one per worker
    /// (the channels × pipeline depth). The policy plans with it (the `cores` of the model),
    /// and the engine enforces it: when it is below the workers, at most ⌈max_cpu⌉ codec calls
    /// run at once, the other workers waiting for a slot (raw batches need none). A fraction
    /// is planned as such and enforced as the next whole number.
    pub max_cpu: Option<f64>,
    /// Decide after this many batches ...
    pub window_batches: u32,
    /// ... or this many seconds, whichever comes first (with at least a few batches).
    pub window_s: f64,
    /// Switch only when the best candidate's predicted time beats the current one's by this
    /// share.
    pub hysteresis: f64,
    /// Largest share of the available CPU spent on probes.
    pub probe_cpu_share: f64,
    /// Batches between two probes of one candidate (once every candidate was measured) ...
    pub probe_gap: u32,
    /// ... doubled after each window in which it was predicted slower than the current one
    /// by this factor ...
    pub backoff_above: f64,
    /// ... up to this many batches.
    pub max_probe_gap: u32,
    /// A CPU rate measured while a candidate carried the migration counts this many seconds
    /// after it stopped doing so (probes and pairs measure codecs one batch at a time, and
    /// miss what running everything on one costs: the destination decoding it on a shared
    /// machine, every worker competing for the cores).
    pub loaded_ttl_s: f64,
    /// A link rate below the estimate by more than half, with the cap unchanged, is believed
    /// once it lasted this many seconds (a new cap, or a faster link, at once).
    pub link_drop_s: f64,
    /// Add compressing methods that run on an accelerator here (qatzip with a QAT device),
    /// when the destination decodes them. The CLI sets it off when `--auto-candidates`
    /// names the candidates.
    pub hardware_candidates: bool,
}

impl Default for AutoConfig {
    fn default() -> Self {
        Self {
            candidates: default_candidates(),
            max_cpu: None,
            window_batches: 64,
            window_s: 1.0,
            hysteresis: 0.07,
            probe_cpu_share: 0.03,
            probe_gap: 16,
            backoff_above: 1.3,
            max_probe_gap: 1024,
            loaded_ttl_s: 20.0,
            link_drop_s: 1.0,
            hardware_candidates: true,
        }
    }
}

/// The candidates on the speed/ratio frontier of this build's codecs, by measurement
/// (`pageferry bench codecs --size 256M --methods zstd,zlib --levels=-10,-5,-3,-1,1,2,3`,
/// silesia-like, MB/s per core and ratio on this project's 2-core VM, docs/BENCHMARKS.md):
/// zstd -10 547/1.83, -5 433/2.10, -3 439/2.26, -1 361/2.45, 1 342/3.06, 3 257/3.34;
/// zlib:1 479/2.83 with ISA-L, ~200/2.8 with libdeflate.
///
/// With ISA-L (the `isal` feature): none, zlib:1, zstd:1, zstd:3 — zlib:1 is faster than
/// every fast zstd level down to -5 at a better ratio, so those add only probes; below it
/// (zstd:-10) nothing beats none on a link that fast with the cores a source has to spare.
/// Without ISA-L: none, zstd:-3, zstd:1, zstd:3 — libdeflate's level 1 is slower than zstd:1
/// at a lower ratio, and zstd:-3 takes zlib:1's place.
pub fn default_candidates() -> Vec<Candidate> {
    let list: &[&str] = if crate::codec::deflate_backend_name(1) == "libdeflate" { &["none", "zstd:-3", "zstd:1", "zstd:3"] } else { &["none", "zlib:1", "zstd:1", "zstd:3"] };
    list.iter().map(|c| c.parse().expect("registered methods")).collect()
}

/// Seconds per raw byte of the two-stage pipeline (workers, then link) whose stages take `a`
/// and `b`: the slower stage's, and somewhat more when the two are close — batches differ
/// (one compresses 2:1, the next 8:1), the queue between the stages holds a few batches, so
/// a balanced pipeline stalls now one stage, now the other. `(a^k + b^k)^(1/k)` with k = 8
/// adds 9% when the stages are equal and under 1% once one is 1.4 times the other. (With
/// the plain maximum, zstd:3 at 1 Gbit/s on this project's 2-core machine looked link bound
/// by 6% and ran CPU bound.)
pub fn pipeline(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m <= 0.0 || !m.is_finite() {
        return m;
    }
    m * ((a / m).powi(8) + (b / m).powi(8)).powf(1.0 / 8.0)
}

/// What the data channels' writers did during one window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkSample {
    /// Wire bytes written by all writers.
    pub wire_bytes: u64,
    /// Seconds the writers were busy (waiting for the limiter or the socket, writing), summed.
    pub busy_s: f64,
    /// Number of writers (data channels).
    pub writers: usize,
    /// Length of the window, seconds.
    pub wall_s: f64,
    /// A configured cap on wire bytes per second (the rate limiter's current rate).
    pub cap: Option<f64>,
}

impl LinkSample {
    /// Wire bytes per second the writers would move if they were busy all the time; `None`
    /// when the window moved nothing.
    pub fn rate(&self) -> Option<f64> {
        if self.wire_bytes == 0 || self.wall_s <= 0.0 || self.writers == 0 {
            return None;
        }
        let achieved = self.wire_bytes as f64 / self.wall_s;
        let busy = (self.busy_s / (self.wall_s * self.writers as f64)).clamp(0.05, 1.0);
        let r = achieved / busy;
        Some(match self.cap {
            Some(c) => r.min(c),
            None => r,
        })
    }
}

/// One batch's plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// Index into [`Policy::candidates`].
    pub index: usize,
    /// The candidate to compress the batch with.
    pub candidate: Candidate,
    /// Sent with a non-current candidate to measure it.
    pub probe: bool,
    /// A probe of a compressing candidate while the current one compresses too: the worker
    /// also compresses the batch with this one (the current candidate, by index) and throws
    /// the result away, so both are measured on the same bytes ([`Policy::record_pair`]).
    pub shadow: Option<usize>,
    /// Measure this candidate (by index) on a slice of the batch ([`SAMPLE_BYTES`], the
    /// output thrown away) while the batch itself goes with the current candidate, `none`:
    /// how a compressor out of the race is kept measured at a fraction of a whole probe's
    /// cost ([`Policy::record_sample`]).
    pub sample: Option<usize>,
}

/// Raw bytes a sampled probe compresses (16 pages).
pub const SAMPLE_BYTES: usize = 64 << 10;

/// Moving estimates for one candidate.
#[derive(Clone, Copy, Debug, Default)]
struct Estimate {
    /// Raw bytes per second of one worker (its whole time on a batch but the link waits).
    cpu_rate: Option<f64>,
    /// Wire bytes per raw byte.
    ratio: Option<f64>,
    /// `cpu_rate` measured while this candidate carried the migration (every worker on it,
    /// the destination decoding it), and when (seconds on the policy's clock). Probes run
    /// one batch at a time under whatever load the current candidate makes, so they tell how
    /// fast a codec is, not how fast it is once everything runs on it.
    loaded: Option<(f64, f64)>,
}

/// Paired measurements of one candidate against the current one on the same batches
/// (sums, decayed to the last [`PAIR_HORIZON`] raw bytes): the ratio of their wire bytes
/// and the difference of their codec times. Batches differ far more from each other than
/// candidates do on one batch (the silesia-like image changes content every 512 KiB, ratios
/// 1.5 to 10), so unpaired probes, one batch each, compare mostly which batch they drew.
#[derive(Clone, Copy, Debug, Default)]
struct Pair {
    raw: f64,
    wire: f64,
    wire_cur: f64,
    secs: f64,
    secs_cur: f64,
}

/// Raw bytes of paired samples a [`Pair`] remembers.
const PAIR_HORIZON: f64 = (16u64 << 20) as f64;
/// Raw bytes paired at once after a switch (four 512 KiB batches).
const PAIR_FIRST: f64 = (2u64 << 20) as f64;

/// Measurements of the current window, per candidate.
#[derive(Clone, Copy, Debug, Default)]
struct Acc {
    raw: u64,
    wire: u64,
    secs: f64,
}

/// Batches and bytes sent with one candidate (the report's shares).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AutoShare {
    /// The candidate ("zstd-1", "none", ...).
    pub candidate: String,
    /// Batches sent with it.
    pub batches: u64,
    /// Of which probes.
    pub probes: u64,
    /// Of those, probes compared with the current candidate on the same bytes (paired).
    #[serde(default)]
    pub paired: u64,
    /// Sampled probes: a slice of a batch another candidate sent, compressed with this one
    /// to measure it (not counted in `batches`).
    #[serde(default)]
    pub sampled: u64,
    /// Raw (non-zero) bytes these batches carried.
    pub raw_bytes: u64,
    /// Wire bytes of their payloads.
    pub wire_bytes: u64,
}

/// What `auto` did, for the migration report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AutoReport {
    /// Cores the policy planned with.
    pub cores: f64,
    /// What each candidate sent.
    pub shares: Vec<AutoShare>,
    /// Decisions taken (one per window).
    pub decisions: u64,
    /// Decisions that changed the current candidate.
    pub switches: u64,
    /// Why the last decision chose what it chose.
    pub last_reason: String,
    /// Every switch: (seconds since start, candidate, reason).
    pub switch_log: Vec<(f64, String, String)>,
}

impl AutoReport {
    /// Shares of batches in percent, largest first: `zstd:1 81%, none 19%`.
    pub fn summary(&self) -> String {
        let total: u64 = self.shares.iter().map(|s| s.batches).sum::<u64>().max(1);
        let mut v: Vec<&AutoShare> = self.shares.iter().filter(|s| s.batches > 0).collect();
        v.sort_by(|a, b| b.batches.cmp(&a.batches));
        v.iter().map(|s| format!("{} {:.0}%", s.candidate, 100.0 * s.batches as f64 / total as f64)).collect::<Vec<_>>().join(", ")
    }
    /// Share of batches (0..1) sent with `candidate` (as displayed, e.g. "none", "zstd:1").
    pub fn share_of(&self, candidate: &str) -> f64 {
        let total: u64 = self.shares.iter().map(|s| s.batches).sum();
        if total == 0 {
            return 0.0;
        }
        self.shares.iter().filter(|s| s.candidate == candidate).map(|s| s.batches).sum::<u64>() as f64 / total as f64
    }
}

/// The per-window chooser (see the module documentation).
pub struct Policy {
    cands: Vec<Candidate>,
    est: Vec<Estimate>,
    win: Vec<Acc>,
    cores: f64,
    /// The workers: none's stage (scan, checksums) runs on all of them, `--max-cpu` or not.
    workers: f64,
    cfg: AutoConfig,
    current: usize,
    /// Wire bytes per second of all channels together.
    link: Option<f64>,
    start: f64,
    win_start: f64,
    win_batches: u32,
    since_probe: u32,
    /// Batches chosen so far (the probe schedule counts these).
    batches: u64,
    /// Per candidate: batches between its probes, and the batch count of its next probe.
    gap: Vec<u32>,
    due: Vec<u64>,
    probe_secs: f64,
    /// Per candidate: paired against the current one (reset when the current one changes).
    pairs: Vec<Pair>,
    /// The cap of the last link sample.
    cap: Option<f64>,
    /// Start of the first window of a link drop not yet believed.
    drop_since: Option<f64>,
    report: AutoReport,
}

impl Policy {
    /// `candidates` are what both sides support (`none` is added when missing); `workers` the
    /// compression workers, which bound the cores; `now` seconds on the caller's clock.
    pub fn new(candidates: &[Candidate], cfg: AutoConfig, workers: usize, now: f64) -> Self {
        let mut cands = vec![Candidate::none()];
        for c in candidates {
            if !cands.contains(c) {
                cands.push(*c);
            }
        }
        let cores = cfg.max_cpu.unwrap_or(workers as f64).min(workers.max(1) as f64).max(0.01);
        // Start with none until the first window (every candidate probed once, a dozen batches)
        // has measured the link: on a slow link that costs those few batches' compression; on
        // a fast one compressing them would cost more (measured on this project's bench).
        let current = 0;
        let n = cands.len();
        let cfg = AutoConfig { probe_gap: cfg.probe_gap.max(1), ..cfg };
        let gap = vec![cfg.probe_gap; n];
        let shares = cands.iter().map(|c| AutoShare { candidate: c.to_string(), ..Default::default() }).collect();
        Self {
            cands,
            est: vec![Estimate::default(); n],
            win: vec![Acc::default(); n],
            cores,
            workers: workers.max(1) as f64,
            cfg,
            current,
            link: None,
            start: now,
            win_start: now,
            win_batches: 0,
            since_probe: 0,
            batches: 0,
            gap,
            due: vec![0; n],
            probe_secs: 0.0,
            pairs: vec![Pair::default(); n],
            cap: None,
            drop_since: None,
            report: AutoReport { cores, shares, ..Default::default() },
        }
    }

    /// The candidates, in the order [`Choice::index`] counts.
    pub fn candidates(&self) -> &[Candidate] {
        &self.cands
    }
    /// The candidate batches use now.
    pub fn current(&self) -> Candidate {
        self.cands[self.current]
    }
    /// The link rate estimate, wire bytes per second.
    pub fn link_rate(&self) -> Option<f64> {
        self.link
    }

    /// The candidate for the next batch: the current one, or now and then a probe.
    pub fn choose(&mut self, now: f64) -> Choice {
        self.win_batches += 1;
        self.since_probe += 1;
        self.batches += 1;
        if let Some(i) = self.probe_target(now) {
            self.since_probe = 0;
            if !self.current().compresses() && self.cands[i].compresses() && self.gap[i] >= self.max_gap() {
                // Out of the race while none carries the migration: a slice is enough to see
                // whether that changed (a slower link brings it back to whole probes anyway).
                return Choice { index: self.current, candidate: self.current(), probe: false, shadow: None, sample: Some(i) };
            }
            let shadow = (self.cands[i].compresses() && self.current().compresses()).then_some(self.current);
            return Choice { index: i, candidate: self.cands[i], probe: true, shadow, sample: None };
        }
        Choice { index: self.current, candidate: self.cands[self.current], probe: false, shadow: None, sample: None }
    }

    fn probe_target(&mut self, now: f64) -> Option<usize> {
        let n = self.cands.len();
        // Not yet measured: probe at once (every other batch), so the first decision has
        // every candidate's numbers.
        if let Some(i) = (1..n).find(|&i| i != self.current && !self.measured(i)) {
            return (self.since_probe >= 2).then_some(i);
        }
        // A compressing current one: the other compressors, with few pairs with it yet, are
        // paired at once (every other batch, a few times after each switch) — those backed
        // off too, whose estimates may come from one unpaired probe under other conditions.
        if self.current().compresses() {
            if let Some(i) = (1..n).find(|&i| i != self.current && self.pairs[i].raw < PAIR_FIRST) {
                return (self.since_probe >= 2).then(|| {
                    self.due[i] = self.batches + self.gap[i] as u64;
                    i
                });
            }
        }
        // Candidates other than the current one whose turn has come (the earliest first),
        // one probe per `probe_gap` batches at most, within the CPU budget.
        if n < 2 || self.since_probe < self.cfg.probe_gap {
            return None;
        }
        let i = (0..n).filter(|&i| i != self.current && self.due[i] <= self.batches).min_by_key(|&i| self.due[i])?;
        let budget = self.cfg.probe_cpu_share * self.cores * (now - self.start) + 0.01;
        if self.probe_secs > budget {
            return None;
        }
        self.due[i] = self.batches + self.gap[i] as u64;
        Some(i)
    }

    fn max_gap(&self) -> u32 {
        self.cfg.max_probe_gap.max(self.cfg.probe_gap)
    }

    /// Batches between probes of each candidate, after a decision: doubled for those predicted
    /// slower than the current one by [`AutoConfig::backoff_above`], reset for the others;
    /// all reset when the link rate moved by half or more (`link_moved`) — but for those out
    /// of the race by their worker stage when it got faster (`link_faster`), which only
    /// widens their gap.
    ///
    /// A compressor whose worker stage alone is slower than the current prediction by that
    /// factor goes to [`AutoConfig::max_probe_gap`] at once: no ratio can make it win, only a
    /// slower link (which resets every gap) or a faster CPU. On loopback that is every
    /// compressor from the first decision on, and their probes — each a batch compressed on
    /// the source and decompressed on the destination, the two sharing the cores — drop from
    /// ~14 to ~6 per GiB.
    fn schedule_probes(&mut self, link_moved: bool, link_faster: bool) {
        let t_cur = self.predict(self.current);
        let max_gap = self.max_gap();
        for i in 0..self.cands.len() {
            let beyond = |t: f64| t_cur.is_some_and(|c| t > c * self.cfg.backoff_above);
            let far = self.predict(i).is_some_and(beyond);
            let cpu_out = i != self.current && self.cands[i].compresses() && self.estimate(i).1.is_some_and(|r| beyond(1.0 / (r * self.cores)));
            let gap = match (link_moved && !(cpu_out && link_faster), cpu_out, far) {
                (true, _, _) => self.cfg.probe_gap,
                (false, true, _) => max_gap,
                (false, false, true) => (self.gap[i] * 2).min(max_gap),
                (false, false, false) => self.cfg.probe_gap,
            };
            if gap < self.gap[i] {
                // Coming back: probe soon.
                self.due[i] = self.due[i].min(self.batches + gap as u64);
            } else if cpu_out && gap > self.gap[i] {
                // Out of the race: not even the probe the old gap had planned.
                self.due[i] = self.due[i].max(self.batches + gap as u64);
            }
            self.gap[i] = gap;
        }
    }

    /// A batch of `raw` non-zero bytes was encoded with `choice` into `wire` payload bytes
    /// (`raw` when it went raw) in `secs` of one worker's time (all of it but the waits for
    /// the link: see the module documentation).
    pub fn record(&mut self, choice: &Choice, raw: u64, wire: u64, secs: f64) {
        let a = &mut self.win[choice.index];
        a.raw += raw;
        a.wire += wire;
        a.secs += secs;
        if choice.probe {
            self.probe_secs += secs;
            if raw == 0 {
                self.probe_again(choice.index);
            }
        }
        let s = &mut self.report.shares[choice.index];
        s.batches += 1;
        s.probes += choice.probe as u64;
        s.raw_bytes += raw;
        s.wire_bytes += wire;
    }

    /// A probe planned with `choice.shadow` compressed its `raw` bytes into `wire` bytes in
    /// `secs` of codec time, and the current candidate (the shadow, thrown away) into
    /// `wire_cur` in `secs_cur`. Call it besides [`Policy::record`] for the same batch.
    /// Ignored when the current candidate changed since the choice.
    pub fn record_pair(&mut self, choice: &Choice, raw: u64, wire: u64, wire_cur: u64, secs: f64, secs_cur: f64) {
        self.probe_secs += secs_cur;
        if choice.shadow != Some(self.current) || raw == 0 || wire_cur == 0 {
            return;
        }
        self.report.shares[choice.index].paired += 1;
        let p = &mut self.pairs[choice.index];
        let raw = raw as f64;
        if p.raw + raw > PAIR_HORIZON {
            let keep = (PAIR_HORIZON - raw).max(0.0) / p.raw;
            *p = Pair { raw: p.raw * keep, wire: p.wire * keep, wire_cur: p.wire_cur * keep, secs: p.secs * keep, secs_cur: p.secs_cur * keep };
        }
        p.raw += raw;
        p.wire += wire as f64;
        p.wire_cur += wire_cur as f64;
        p.secs += secs;
        p.secs_cur += secs_cur;
    }

    /// A probe of candidate `i` (whole or sampled) drew zero pages only and measured nothing:
    /// the next batch probes it again.
    fn probe_again(&mut self, i: usize) {
        self.since_probe = self.cfg.probe_gap.max(2);
        self.due[i] = self.batches;
    }

    /// A sampled probe ([`Choice::sample`]) compressed `raw` bytes of a batch with candidate
    /// `i` into `wire` bytes in `secs` of codec time. The batch itself is recorded as usual.
    pub fn record_sample(&mut self, i: usize, raw: u64, wire: u64, secs: f64) {
        self.probe_secs += secs;
        if raw == 0 {
            self.probe_again(i);
            return;
        }
        // The worker's whole time with `i` on these bytes: its codec time plus what the current
        // candidate's worker spends per byte besides the codec (scan, checksums).
        let cur = self.est[self.current];
        let besides = cur.loaded.map(|l| l.0).or(cur.cpu_rate).map_or(0.0, |r| raw as f64 / r);
        let a = &mut self.win[i];
        a.raw += raw;
        a.wire += wire;
        a.secs += secs + besides;
        self.report.shares[i].sampled += 1;
    }

    /// Candidate `i`'s wire bytes per raw byte and one worker's raw bytes per second, as far
    /// as known: the current candidate's own; another's from pairs with the current one when
    /// there are any, its loaded CPU rate when it carried the migration lately; else from
    /// its probes.
    fn estimate(&self, i: usize) -> (Option<f64>, Option<f64>) {
        let e = self.est[i];
        if i == self.current {
            return (e.ratio, e.loaded.map(|l| l.0).or(e.cpu_rate));
        }
        let cur = self.est[self.current];
        let cur_rate = cur.loaded.map(|l| l.0).or(cur.cpu_rate);
        let p = self.pairs[i];
        let paired = p.raw > 0.0 && p.wire_cur > 0.0;
        let ratio = match (paired, cur.ratio) {
            (true, Some(q)) => Some((q * p.wire / p.wire_cur).min(1.0)),
            _ => e.ratio,
        };
        let rate = match (e.loaded, paired, cur_rate) {
            (Some((r, _)), _, _) => Some(r),
            (None, true, Some(rc)) => {
                // The current one's whole time per byte, plus the codec time the candidate
                // needs more (or less) on the same bytes, stretched as much as the current
                // one's whole time is longer than its codec time (a worker that gets half a
                // core needs twice its codec time).
                let s_cur = 1.0 / rc;
                let stretch = if p.secs_cur > 0.0 { (s_cur / (p.secs_cur / p.raw)).clamp(1.0, 4.0) } else { 1.0 };
                let s = s_cur + stretch * (p.secs - p.secs_cur) / p.raw;
                Some(1.0 / s.max(0.1 * s_cur))
            }
            _ => e.cpu_rate,
        };
        (ratio, rate)
    }

    /// Has candidate `i` a measurement (an estimate, or a sample in this window)?
    fn measured(&self, i: usize) -> bool {
        self.est[i].ratio.is_some() || self.win[i].raw > 0
    }

    /// True when the window is over and [`Policy::decide`] should run. The first window ends
    /// once every candidate has been measured (and a few batches went out).
    pub fn window_due(&self, now: f64) -> bool {
        let first_done = self.report.decisions == 0 && self.win_batches >= 12 && (0..self.cands.len()).all(|i| self.measured(i) || i == 0);
        first_done || self.win_batches >= self.cfg.window_batches || (self.win_batches >= 4 && now - self.win_start >= self.cfg.window_s)
    }

    /// Predicted seconds per raw byte with candidate `i`, if it has been measured.
    fn predict(&self, i: usize) -> Option<f64> {
        let link = self.link?;
        let (ratio, rate) = self.estimate(i);
        if !self.cands[i].compresses() {
            // Sends every batch raw; its worker stage (scan, checksums) counts when measured.
            return Some(pipeline(rate.map_or(0.0, |r| 1.0 / (r * self.workers)), 1.0 / link));
        }
        Some(pipeline(1.0 / (rate? * self.cores), ratio? / link))
    }

    /// End the window: fold in its measurements and the link sample, maybe switch. Returns
    /// the candidate to use from now on.
    pub fn decide(&mut self, now: f64, link: LinkSample) -> Candidate {
        for (i, a) in self.win.iter_mut().enumerate() {
            if a.raw == 0 {
                continue;
            }
            let e = &mut self.est[i];
            // Weight by the bytes measured: a whole window counts more than one probe.
            let w = (a.raw as f64 / (16u64 << 20) as f64).clamp(0.25, 0.75);
            let ratio = a.wire as f64 / a.raw as f64;
            e.ratio = Some(e.ratio.map_or(ratio, |r| r + w * (ratio - r)));
            if a.secs > 0.0 {
                let rate = a.raw as f64 / a.secs;
                e.cpu_rate = Some(e.cpu_rate.map_or(rate, |r| r + w * (rate - r)));
                if i == self.current {
                    e.loaded = Some((e.loaded.map_or(rate, |(r, _)| r + w * (rate - r)), now));
                }
            }
            *a = Acc::default();
        }
        // Loaded rates of other candidates age: the machine's load moves too.
        for (i, e) in self.est.iter_mut().enumerate() {
            if i != self.current && e.loaded.is_some_and(|(_, at)| now - at > self.cfg.loaded_ttl_s) {
                e.loaded = None;
            }
        }
        let (mut link_moved, mut link_faster) = (false, false);
        let cap_changed = link.cap != self.cap;
        self.cap = link.cap;
        if let Some(r) = link.rate() {
            match self.link {
                // Within half: smoothed.
                Some(l) if r < 1.5 * l && r > l / 1.5 => {
                    self.link = Some(0.5 * (l + r));
                    self.drop_since = None;
                }
                // Slower by more than half, the cap unchanged: believed once it lasted
                // `link_drop_s` (a destination that got no CPU for a moment on a shared
                // machine looks like a slow link, and compressing then makes it worse).
                Some(l) if r < l && !cap_changed => {
                    let since = *self.drop_since.get_or_insert(self.win_start);
                    if now - since >= self.cfg.link_drop_s {
                        (self.link, self.drop_since, link_moved) = (Some(r), None, true);
                    }
                }
                // Faster by more than half, or a new cap: taken at once.
                _ => {
                    link_moved = self.link.is_some();
                    link_faster = !cap_changed && self.link.is_some_and(|l| r > l);
                    (self.link, self.drop_since) = (Some(r), None);
                }
            }
        }
        if link_moved {
            // Another link, another balance between the stages: measure again.
            let cur = self.current;
            self.est.iter_mut().enumerate().filter(|&(i, _)| i != cur).for_each(|(_, e)| e.loaded = None);
        }
        self.win_start = now;
        self.win_batches = 0;
        self.report.decisions += 1;

        let Some(link) = self.link else {
            self.report.last_reason = "no link measurement yet".into();
            return self.current();
        };
        let mut ranked: Vec<(usize, f64)> = (0..self.cands.len()).filter_map(|i| self.predict(i).map(|t| (i, t))).collect();
        ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
        let Some(&(best, t_best)) = ranked.first() else {
            return self.current();
        };
        let t_cur = self.predict(self.current);
        let switch = best != self.current && t_cur.is_none_or(|t| t_best < t * (1.0 - self.cfg.hysteresis));
        let gib = (1u64 << 30) as f64;
        let describe = |i: usize, t: f64| {
            let how = match (i == self.current, self.est[i].loaded.is_some(), self.pairs[i].raw > 0.0) {
                (true, _, _) => "",
                (false, true, _) => ", loaded",
                (false, false, true) => ", paired",
                _ => "",
            };
            match self.estimate(i) {
                (Some(q), Some(r)) => format!("{} {:.2} s/GiB ({:.0} MB/s per core, ratio {:.2}{how})", self.cands[i], t * gib, r / 1e6, 1.0 / q),
                _ => format!("{} {:.2} s/GiB", self.cands[i], t * gib),
            }
        };
        let mut reason = format!(
            "link {:.0} MB/s, {} cores: {}",
            link / 1e6,
            self.cores,
            ranked.iter().take(3).map(|&(i, t)| describe(i, t)).collect::<Vec<_>>().join("; ")
        );
        if switch {
            reason.push_str(&format!("; switched from {}", self.current()));
            // Pairs compare with the current candidate: keep what they said as the plain
            // estimates, and pair again with the new one.
            for i in 0..self.cands.len() {
                if i != self.current && self.pairs[i].raw > 0.0 {
                    let (ratio, rate) = self.estimate(i);
                    let e = &mut self.est[i];
                    (e.ratio, e.cpu_rate) = (ratio.or(e.ratio), rate.or(e.cpu_rate));
                }
            }
            self.pairs.iter_mut().for_each(|p| *p = Pair::default());
            self.current = best;
            self.report.switches += 1;
            self.report.switch_log.push((now - self.start, self.current().to_string(), reason.clone()));
        } else if best != self.current {
            reason.push_str(&format!("; kept {} (within the {:.0}% margin)", self.current(), self.cfg.hysteresis * 100.0));
        }
        self.report.last_reason = reason;
        self.schedule_probes(link_moved, link_faster);
        self.current()
    }

    /// What the policy did so far.
    pub fn report(&self) -> AutoReport {
        self.report.clone()
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
