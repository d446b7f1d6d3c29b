//! Counters, CPU accounting and the final reports (the analogue of QEMU's `info migrate`).

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Live counters shared by the channel threads of one side.
#[derive(Default, Debug)]
pub struct Counters {
    /// Non-zero pages sent (compressed or raw).
    pub normal_pages: AtomicU64,
    /// Zero pages (sent as offsets only).
    pub zero_pages: AtomicU64,
    /// Normal pages sent raw because a compressor could not shrink their batch.
    pub raw_pages: AtomicU64,
    /// Bytes on the data channels (headers, offsets, payloads, CRCs).
    pub wire_bytes: AtomicU64,
    /// Data packets sent or received.
    pub packets: AtomicU64,
}

impl Counters {
    /// Add `n` to counter `c`.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
    /// Pages handled (normal + zero).
    pub fn pages(&self) -> u64 {
        self.normal_pages.load(Relaxed) + self.zero_pages.load(Relaxed)
    }
    /// Guest bytes those pages hold.
    pub fn raw_bytes(&self) -> u64 {
        self.pages() * crate::memory::PAGE_SIZE as u64
    }
    /// Bytes on the data channels.
    pub fn wire(&self) -> u64 {
        self.wire_bytes.load(Relaxed)
    }
}

/// CPU time (user + system) this process has used so far.
pub fn process_cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time this thread has used so far (nanosecond resolution, unlike `getrusage`).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills the struct we pass; this clock exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU-seconds and wall time of a stretch of work, like `top`'s CPU% (100% = one core).
#[derive(Clone, Copy, Debug)]
pub struct CpuMeter {
    cpu0: Duration,
    wall0: std::time::Instant,
}

impl Default for CpuMeter {
    fn default() -> Self {
        Self::start()
    }
}

impl CpuMeter {
    /// Start measuring now.
    pub fn start() -> Self {
        Self { cpu0: process_cpu_time(), wall0: std::time::Instant::now() }
    }
    /// (cpu seconds, wall seconds) since start.
    pub fn read(&self) -> (f64, f64) {
        ((process_cpu_time() - self.cpu0).as_secs_f64(), self.wall0.elapsed().as_secs_f64())
    }
}

/// Anonymous resident memory of this process (heap, buffers, stacks; not file mappings such
/// as an image's pages), from /proc/self/status; 0 where unavailable.
pub fn rss_anon_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("RssAnon:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kib| kib * 1024)
}

/// cpu / wall as a percentage of one core.
pub fn cpu_percent(cpu_s: f64, wall_s: f64) -> f64 {
    if wall_s > 0.0 {
        100.0 * cpu_s / wall_s
    } else {
        0.0
    }
}

/// Megabits per second.
pub fn mbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 * 8.0 / secs / 1e6
    } else {
        0.0
    }
}

/// What the destination reports back at the end (inside `Control::Done`): a wire type.
pub use crate::wire::DestinationReport;

/// The source's final report.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MigrationReport {
    /// "completed" (failures are errors, not reports).
    pub status: String,
    /// Compression method.
    pub method: String,
    /// Its level.
    pub level: i32,
    /// What compressed on the source ("libzstd 1.5.7", "isa-l (system)", "qat (hardware)", ...).
    pub provider: String,
    /// Data channels.
    pub channels: usize,
    /// Batches in flight to each channel's compressor.
    pub pipeline_depth: usize,
    /// "plain TCP", or the TLS version and cipher suite every channel negotiated.
    #[serde(default)]
    pub transport: String,
    /// The dirty tracker's name.
    pub dirty_tracker: String,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// From the call to the destination's Done, seconds.
    pub total_time_s: f64,
    /// Connecting, handshake and channel setup, seconds.
    pub setup_time_s: f64,
    /// Workload paused on the source → destination reports it running (includes verification
    /// when `verify` is on: `digest_wait_ms` and `verify_ms`).
    pub downtime_ms: f64,
    /// The switchover downtime, what `--downtime-limit` bounds: `downtime_ms` less the memory
    /// digests of verification (`digest_wait_ms` + `verify_ms`); equal to it with `--no-verify`.
    #[serde(default)]
    pub switchover_ms: f64,
    /// What the switchover test predicted for the switchover downtime: its fixed cost
    /// (`expected_fixed_ms`) plus the last round's dirty bytes at the guest bytes per second of
    /// the round before (compression included), or of its slowest 50 ms if slower.
    #[serde(default)]
    pub expected_downtime_ms: f64,
    /// The fixed part of `expected_downtime_ms`, measured on the pre-copy rounds: the last
    /// dirty-log collection plus the largest per-round overhead (sync round trip, the
    /// destination's per-round work) of the last three rounds.
    #[serde(default)]
    pub expected_fixed_ms: f64,
    /// How much later the source sent its final state because it was still hashing its memory
    /// for verification (the hash runs while the last pages travel; this is the part of it
    /// after they were all queued and at the destination), ms.
    #[serde(default)]
    pub digest_wait_ms: f64,
    /// Time the destination spent hashing memory for verification, ms.
    pub verify_ms: f64,
    /// Rounds, the final one included.
    pub rounds: u32,
    /// Pages sent in each round.
    pub pages_per_round: Vec<u64>,
    /// What ran: "pre-copy", then "auto-converge" when the workload was throttled.
    #[serde(default)]
    pub mechanisms: Vec<String>,
    /// The auto-converge throttle (percent) in effect during each round.
    #[serde(default)]
    pub throttle_pct_per_round: Vec<u8>,
    /// Why auto-converge could not throttle, when it was asked to and could not.
    #[serde(default)]
    pub throttle_note: Option<String>,
    /// Why the engine switched to postcopy (None: it did not).
    #[serde(default)]
    pub postcopy_reason: Option<String>,
    /// Postcopy: guest paused on the source to every page placed on the destination.
    #[serde(default)]
    pub postcopy_ms: f64,
    /// Postcopy: pages the destination faulted on and asked for (urgent channel).
    #[serde(default)]
    pub postcopy_pages_requested: u64,
    /// Postcopy: pages pushed in the background over the data channels.
    #[serde(default)]
    pub postcopy_pages_pushed: u64,
    /// Postcopy: the destination's counters and fault latencies.
    #[serde(default)]
    pub postcopy: Option<crate::wire::PostcopyStats>,
    /// Guest bytes sent (pages x 4096, zero pages included).
    pub raw_bytes: u64,
    /// Bytes on the data channels.
    pub wire_bytes: u64,
    /// raw_bytes / wire_bytes.
    pub ratio: f64,
    /// Non-zero pages sent.
    pub normal_pages: u64,
    /// Zero pages (offsets only).
    pub zero_pages: u64,
    /// Pages of batches a compressor could not shrink, sent raw instead (0 with method none,
    /// whose pages are all normal pages).
    pub raw_fallback_pages: u64,
    /// Guest bytes per second over the whole migration, Mbit/s.
    pub raw_mbps: f64,
    /// Wire bytes per second, Mbit/s.
    pub wire_mbps: f64,
    /// The bandwidth cap, bytes/s, if any.
    pub max_bandwidth: Option<u64>,
    /// Source process CPU time, seconds.
    pub send_cpu_s: f64,
    /// Source CPU time / wall time, percent (like `top`).
    pub send_cpu_pct: f64,
    /// Destination process CPU time, seconds.
    pub recv_cpu_s: f64,
    /// Destination CPU time / wall time, percent.
    pub recv_cpu_pct: f64,
    /// True when the in-band memory digests were compared and matched.
    pub verified: bool,
    /// How the result was checked when it was not by the in-band digests (`verified` false):
    /// e.g. a caller that compared the memory itself afterwards. Shown on the `verified:` line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_by: Option<String>,
    /// What decompressed on the destination.
    pub recv_provider: String,
    /// Peak anonymous memory (heap, buffers) of the source and destination processes.
    pub send_peak_rss_anon_bytes: u64,
    /// Peak anonymous RSS of the destination process.
    pub recv_peak_rss_anon_bytes: u64,
    /// `--multifd-compression auto`: what it chose, how often, and why.
    #[serde(default)]
    pub auto: Option<super::policy::AutoReport>,
}

impl MigrationReport {
    /// Human-readable, one item a line, like QEMU's `info migrate`.
    pub fn render(&self) -> String {
        let gib = self.memory_bytes as f64 / (1u64 << 30) as f64;
        let per_gib = |cpu: f64| if gib > 0.0 { cpu / gib } else { 0.0 };
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<22} {v}\n"));
        line("status:", self.status.clone());
        line("method:", format!("{} level {} ({}; destination: {})", self.method, self.level, self.provider, self.recv_provider));
        if let Some(a) = &self.auto {
            line("auto batches:", format!("{} ({} decisions, {} switches, {} cores)", a.summary(), a.decisions, a.switches, a.cores));
            line("auto last reason:", a.last_reason.clone());
        }
        line("channels:", format!("{} (pipeline depth {})", self.channels, self.pipeline_depth));
        line("transport:", self.transport.clone());
        line("dirty tracking:", self.dirty_tracker.clone());
        line("memory:", format!("{} bytes ({:.2} GiB)", self.memory_bytes, gib));
        line("total time:", format!("{:.3} s", self.total_time_s));
        line("setup time:", format!("{:.1} ms", self.setup_time_s * 1000.0));
        line("downtime:", if self.verified {
            format!(
                "{:.1} ms (of which memory digests {:.1} ms: {:.1} ms waiting for the source's, {:.1} ms the destination's)",
                self.downtime_ms,
                self.digest_wait_ms + self.verify_ms,
                self.digest_wait_ms,
                self.verify_ms
            )
        } else {
            format!("{:.1} ms", self.downtime_ms)
        });
        line("mechanisms:", self.mechanisms.join(" + "));
        if self.postcopy_reason.is_none() {
            line("switchover:", format!("{:.1} ms (downtime less the digests: what --downtime-limit bounds)", self.switchover_ms));
            line(
                "expected downtime:",
                format!(
                    "{:.1} ms ({:.1} ms fixed, measured per round, + the last dirty pages at the guest bytes/s of the round before or of its slowest 50 ms)",
                    self.expected_downtime_ms, self.expected_fixed_ms
                ),
            );
        }
        line("rounds:", format!("{} (pages per round: {:?})", self.rounds, self.pages_per_round));
        if self.throttle_pct_per_round.iter().any(|&p| p > 0) {
            line("throttle per round:", format!("{:?} %", self.throttle_pct_per_round));
        }
        if let Some(n) = &self.throttle_note {
            line("auto-converge:", n.clone());
        }
        if let Some(why) = &self.postcopy_reason {
            line("postcopy:", format!("{:.1} ms after switchover (because {why})", self.postcopy_ms));
            line("postcopy pages:", format!("requested {} (urgent channel), pushed {} (background)", self.postcopy_pages_requested, self.postcopy_pages_pushed));
            if let Some(p) = &self.postcopy {
                line("fault latency:", format!("p50 {:.0} us, p99 {:.0} us, max {:.0} us ({} faults; fault read to page placed)", p.fault_latency_p50_us, p.fault_latency_p99_us, p.fault_latency_max_us, p.faults));
            }
        }
        line("raw bytes:", format!("{}", self.raw_bytes));
        line("wire bytes:", format!("{}", self.wire_bytes));
        line("ratio:", format!("{:.2}", self.ratio));
        line("pages:", format!("normal {}, zero {}, raw-fallback {}", self.normal_pages, self.zero_pages, self.raw_fallback_pages));
        line("throughput:", format!("raw {:.0} Mbps, wire {:.0} Mbps{}", self.raw_mbps, self.wire_mbps,
            self.max_bandwidth.map(|b| format!(" (cap {:.0} Mbps)", b as f64 * 8.0 / 1e6)).unwrap_or_default()));
        line("send cpu:", format!("{:.2} s ({:.0}%, {:.2} CPU-s/GiB)", self.send_cpu_s, self.send_cpu_pct, per_gib(self.send_cpu_s)));
        line("recv cpu:", format!("{:.2} s ({:.0}%, {:.2} CPU-s/GiB)", self.recv_cpu_s, self.recv_cpu_pct, per_gib(self.recv_cpu_s)));
        line("process memory:", format!("send {:.1} MiB, recv {:.1} MiB (peak anonymous RSS)",
            self.send_peak_rss_anon_bytes as f64 / (1 << 20) as f64, self.recv_peak_rss_anon_bytes as f64 / (1 << 20) as f64));
        line("verified:", match (&self.verified_by, self.verified) {
            (_, true) => "yes (memory digests match)".into(),
            (_, false) if self.postcopy_reason.is_some() => "not possible in postcopy (the destination runs before all memory has arrived)".into(),
            (Some(how), false) => how.clone(),
            (None, false) => "not checked in-band (--no-verify)".into(),
        });
        s
    }
}

/// A snapshot for progress displays.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// The round being sent.
    pub round: u32,
    /// Raw bytes sent so far (all rounds).
    pub bytes_done: u64,
    /// Raw bytes known to need sending (all rounds so far).
    pub bytes_total: u64,
    /// Wire bytes so far.
    pub wire_bytes: u64,
    /// Since the migration started.
    pub elapsed: Duration,
}

/// Something the operator should hear about that is not an error (the library never prints;
/// the binary shows these, a VMM logs them).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The destination dropped a connection that is not part of the migration (another
    /// session, not a pageferry peer, garbage); the migration goes on.
    ConnectionDropped {
        /// The peer's address.
        peer: String,
        /// Why it was dropped.
        reason: String,
    },
    /// The destination refused a connection: one that failed authentication (its TLS
    /// handshake: a plaintext peer, wrong CA, expired certificate, wrong pre-shared key,
    /// outside `--tls-authz`, TLS below 1.3; or channel binding), or a source whose control
    /// Hello it refused (compression method, memory layout, verification policy, postcopy not
    /// possible, channel count, protocol version, announced sizes, no room for the memory;
    /// that source was sent the same reason). Nothing it sent reached memory; the destination
    /// keeps waiting for the right source until its accept timeout.
    ConnectionRefused {
        /// The peer's address.
        peer: String,
        /// Why it was refused.
        reason: String,
    },
    /// A codec's note on its setup, e.g. qatzip's `auto` provider fell back to `cpu`, and why.
    /// Once per side and migration.
    CodecNote {
        /// The method the note is about.
        method: String,
        /// The note.
        note: String,
    },
    /// The migration entered a new state (QEMU's `MIGRATION` event), on the source (its
    /// progress sink) or the destination (`DestinationConfig::events`). Every run emits `setup`
    /// first and exactly one of `completed`, `failed`, `cancelled` last.
    Status(MigrationStatus),
    /// A round starts sending `pages` pages (round 0: all of memory; QEMU's `MIGRATION_PASS`
    /// counts the same passes from 1).
    RoundStarted {
        /// Round number (0 = the first).
        round: u32,
        /// Pages to send in it.
        pages: u64,
    },
    /// A pre-copy round's pages all arrived at the destination.
    RoundFinished(RoundStats),
}

impl Event {
    /// True for the notes an operator should read (dropped or refused connections, codec notes); false
    /// for the lifecycle events (status, rounds) that machine interfaces consume.
    pub fn is_note(&self) -> bool {
        matches!(self, Event::ConnectionDropped { .. } | Event::ConnectionRefused { .. } | Event::CodecNote { .. })
    }
}

/// States of a migration, named and ordered as QEMU's `MIGRATION` event statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum MigrationStatus {
    /// Validating, connecting, handshaking, opening channels.
    Setup,
    /// Pre-copy rounds: the guest runs while its memory is sent.
    Active,
    /// The rest fits the downtime limit: about to pause the workload.
    PreSwitchover,
    /// The workload is paused: the last dirty pages and the device state are being sent.
    Device,
    /// Post-copy: the destination runs the guest and pulls missing pages.
    PostcopyActive,
    /// The destination took over.
    Completed,
    /// Ended with an error; the source keeps running (unless the outcome is unknown).
    Failed,
    /// Cancelled by either side; the source keeps running.
    Cancelled,
}

impl MigrationStatus {
    /// QEMU's name: `setup`, `active`, `pre-switchover`, `device`, `postcopy-active`,
    /// `completed`, `failed`, `cancelled`.
    pub fn name(self) -> &'static str {
        match self {
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelled => "cancelled",
        }
    }
}

/// One finished pre-copy round, as [`Event::RoundFinished`] reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    /// Round number (0 = the first, which sends all memory).
    pub round: u32,
    /// Pages sent in the round (zero pages included).
    pub pages: u64,
    /// Wire bytes the round took.
    pub wire_bytes: u64,
    /// How long the round took, seconds.
    pub seconds: f64,
    /// Guest bytes moved per second in the round (compression and zero pages count), its
    /// fixed overhead (`overhead_ms`) taken out.
    pub raw_bytes_per_s: f64,
    /// The guest bytes per second `expected_downtime_ms` uses for the dirty pages:
    /// `raw_bytes_per_s`, or the slowest 50 ms window of this round and the one before if
    /// slower (the switchover is a short stretch itself).
    #[serde(default)]
    pub switchover_bytes_per_s: f64,
    /// Wire bytes per second in the round.
    pub wire_bytes_per_s: f64,
    /// Pages the guest dirtied meanwhile: the next round's work.
    pub dirty_pages: u64,
    /// Downtime if the source switched over now (`fixed_ms` + the dirty pages at this round's
    /// rate), milliseconds.
    pub expected_downtime_ms: f64,
    /// This round's fixed overhead: its time after every batch was queued less the time the
    /// bytes still unwritten then needed, milliseconds (taken out of `raw_bytes_per_s`).
    #[serde(default)]
    pub overhead_ms: f64,
    /// The switchover's fixed cost predicted after this round (in `expected_downtime_ms`): the
    /// dirty-log collection plus the largest overhead of the last three rounds, milliseconds.
    #[serde(default)]
    pub fixed_ms: f64,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::ConnectionDropped { peer, reason } => write!(f, "dropping connection from {peer}: {reason}"),
            Event::ConnectionRefused { peer, reason } => write!(f, "refused connection from {peer}: {reason}"),
            Event::CodecNote { note, .. } => f.write_str(note),
            Event::Status(s) => write!(f, "migration status: {}", s.name()),
            Event::RoundStarted { round, pages } => write!(f, "round {round}: sending {pages} pages"),
            Event::RoundFinished(r) => write!(
                f,
                "round {}: {} pages in {:.3} s ({:.0} MB/s raw), {} dirtied meanwhile",
                r.round,
                r.pages,
                r.seconds,
                r.raw_bytes_per_s / 1e6,
                r.dirty_pages
            ),
        }
    }
}

/// Receives progress from the source's control thread (about ten times a second), and events
/// from either side.
pub trait ProgressSink: Send + Sync {
    /// A progress snapshot (about ten times a second, from the source).
    fn update(&self, p: &Progress);
    /// The migration ended (either way); a display may clear itself.
    fn finish(&self) {}
    /// An [`Event`]; ignored unless implemented.
    fn event(&self, _e: &Event) {}
}

/// Where a destination sends its [`Event`]s (`DestinationConfig::events`); discards them by
/// default.
#[derive(Clone)]
pub struct EventSink(pub std::sync::Arc<dyn ProgressSink>);

impl EventSink {
    /// Events go to `sink`'s [`ProgressSink::event`].
    pub fn new(sink: impl ProgressSink + 'static) -> Self {
        EventSink(std::sync::Arc::new(sink))
    }
    /// Send `e`.
    pub fn emit(&self, e: Event) {
        self.0.event(&e)
    }
}

impl Default for EventSink {
    fn default() -> Self {
        Self::new(NoProgress)
    }
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

/// Discards progress.
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn update(&self, _p: &Progress) {}
}

#[cfg(test)]
mod render_tests {
    use super::MigrationReport;

    /// The report says each thing once: a result checked outside the engine is reported on the
    /// `verified:` line, not as a status; without either check it says so.
    #[test]
    fn verification_is_reported_once() {
        let mut r = MigrationReport { status: "completed".into(), ..Default::default() };
        let text = r.render();
        assert!(text.contains("verified:              not checked in-band (--no-verify)"), "{text}");
        r.verified_by = Some("yes, by the caller".into());
        let text = r.render();
        assert_eq!(text.matches("verified").count(), 1, "{text}");
        assert!(text.contains("verified:              yes, by the caller"), "{text}");
        assert!(text.contains("status:                completed\n"), "{text}");
        r.verified = true;
        assert!(r.render().contains("verified:              yes (memory digests match)"));
    }
}
