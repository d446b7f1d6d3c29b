//! The source side: connect, handshake, pre-copy rounds, switchover, report.
//!
//! Threads: the caller's thread plans rounds and talks on the control channel; a reader
//! thread forwards control messages; per data channel one socket writer and
//! `pipeline_depth` compression workers (see `channel.rs`), all pulling batches from one
//! shared queue so a slow channel never holds the others back.
//!
//! Round k: collect the dirty set, cut it into batches of ≤ 128 pages in address order, wait
//! until every batch is queued to a socket, then queue `Sync{k}` on every channel and wait
//! for the destination's `RoundDone{k}`. The source never writes guest memory, so any failure
//! leaves it untouched; a workload paused for the switchover is resumed on failure.

use super::channel::{self, Batch, Failure, Outstanding, ToSocket, WorkerContext};
use super::auto::{AutoSelector, Encoders, LinkMeter};
use super::policy::{AutoConfig, Candidate};
use super::ratelimit::RateLimiter;
use super::stats::{cpu_percent, mbps, Counters, CpuMeter, DestinationReport, Event, MigrationReport, MigrationStatus, Progress, ProgressSink, RoundStats};
use super::converge::Throttler;
use super::postcopy::UrgentServer;
use super::link::{is_timeout, secs, ControlLink};
use super::{MigrationError, Side, SourceConfig, SourceWorkload};
use crate::codec::{self, CodecInfo, CodecSpec, MAX_BATCH_PAGES};
use crate::dirty::{DirtyPages, DirtyTracker};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::transport::{self, Stream};
use crate::wire::{self, Capabilities, Control, Features, Hello, MethodCode, Role, SessionId, VersionRange, WireError};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "source_setup.rs"]
mod setup;
use setup::*;

const TICK: Duration = Duration::from_millis(100);

fn wire_err(channel: &str) -> impl FnOnce(WireError) -> MigrationError + '_ {
    move |source| MigrationError::Wire { channel: channel.to_string(), cause: source }
}


/// Expected switchover downtime: `fixed` (what the switchover costs whatever is left, see
/// [`SwitchoverModel`]) plus sending `remaining` guest bytes at `raw_rate` guest bytes per
/// second — the test against `--downtime-limit`. The rate is guest bytes moved per second, so
/// compression counts — zstd at ratio 3 over a 1 Gbit/s link moves ~375 MB/s of guest memory,
/// not 125 (an estimate from wire bytes per second, as QEMU's, would be pessimistic by the
/// ratio and keep iterating rounds whose remainder already fits).
pub(crate) fn switchover_estimate(fixed: Duration, remaining: f64, raw_rate: f64) -> Duration {
    fixed + Duration::from_secs_f64(if raw_rate > 0.0 { remaining / raw_rate } else { 0.0 })
}

/// What one pre-copy round measured, for [`SwitchoverModel::observe`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RoundTiming {
    /// Guest bytes the round sent.
    pub bytes: f64,
    /// The whole round: first batch queued to the destination's `RoundDone`, seconds.
    pub secs: f64,
    /// The part of it after every batch was queued to a socket (the drain of the channels'
    /// queues, the `Sync` round trip, the destination's work), seconds.
    pub tail: f64,
    /// Wire bytes the round put on the sockets, and how many of them only during `tail`.
    pub wire: u64,
    pub wire_in_tail: u64,
    /// Collecting the dirty log after the round (the switchover does it once more), seconds.
    pub collect: f64,
    /// Guest bytes per second in the slowest [`RATE_WINDOW`] of the round (None: the round
    /// was shorter).
    pub slowest_window: Option<f64>,
}

/// The short windows whose slowest rate bounds the estimate's rate (see [`SwitchoverModel`]).
pub(crate) const RATE_WINDOW: Duration = Duration::from_millis(50);

/// Guest bytes per second over consecutive [`RATE_WINDOW`]s of a round: the slowest one.
struct RateWindows {
    start: Instant,
    bytes: u64,
    slowest: Option<f64>,
}

impl RateWindows {
    fn new(bytes: u64) -> Self {
        RateWindows { start: Instant::now(), bytes, slowest: None }
    }
    /// `bytes`: guest bytes handed to the channels so far.
    fn sample(&mut self, bytes: u64) {
        let dt = self.start.elapsed();
        if dt >= RATE_WINDOW {
            let rate = bytes.saturating_sub(self.bytes) as f64 / dt.as_secs_f64();
            self.slowest = Some(self.slowest.map_or(rate, |s| s.min(rate)));
            *self = RateWindows { start: Instant::now(), bytes, slowest: self.slowest };
        }
    }
}

/// The switchover's fixed cost, measured live on every pre-copy round.
///
/// A round is modelled as `overhead + bytes / rate`. Its overhead is the time after every
/// batch was queued to a socket (`tail`) less the time the bytes still unwritten then needed
/// at the round's wire rate: what remains is the `Sync` round trip and the destination's
/// per-round work, which the switchover pays again (its `Finish` and `Done`). The guest rate
/// is the round's bytes over the round's time less that overhead (at most half the round is
/// taken out), so a small round's rate is not made slow by its fixed part. The fixed cost of
/// a switchover is the last dirty-log collection's time plus the largest overhead of the last
/// [`SwitchoverModel::WINDOW`] rounds — that maximum is the margin for their spread on a
/// loaded machine. The remaining pages are expected at the round's rate or, if slower, at the
/// slowest [`RATE_WINDOW`] of this round and the one before: the switchover is itself a short
/// stretch, and on a loaded machine (or with the source's digest competing for its CPU) short
/// stretches run well below a round's average. Not in it: pausing the workload and the size of its device state (unknown
/// before the pause; both small for this project's workloads, a few KiB of state), and the
/// memory digests of verification, which `--downtime-limit` does not bound (see
/// `MigrationReport::switchover_ms`).
#[derive(Clone, Debug, Default)]
pub(crate) struct SwitchoverModel {
    /// Per-round overheads, seconds, newest last (at most `WINDOW`).
    overheads: std::collections::VecDeque<f64>,
    /// The slowest short-window rate of the round before.
    slowest_before: Option<f64>,
}

/// The model's view after a round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RoundModel {
    /// Guest bytes per second, the round's overhead taken out.
    pub rate: f64,
    /// What the switchover estimate uses: `rate`, or the slowest short window of this round
    /// and the one before if slower.
    pub switch_rate: f64,
    /// This round's overhead, seconds.
    pub overhead: f64,
    /// The switchover's fixed cost predicted now.
    pub fixed: Duration,
}

impl SwitchoverModel {
    /// Rounds whose largest overhead counts.
    pub const WINDOW: usize = 3;

    pub fn observe(&mut self, t: &RoundTiming) -> RoundModel {
        let secs = t.secs.max(1e-6);
        let wire_rate = t.wire as f64 / secs;
        let drain = if wire_rate > 0.0 { t.wire_in_tail as f64 / wire_rate } else { 0.0 };
        let overhead = (t.tail - drain).clamp(0.0, secs / 2.0);
        if self.overheads.len() == Self::WINDOW {
            self.overheads.pop_front();
        }
        self.overheads.push_back(overhead);
        let worst = self.overheads.iter().copied().fold(0.0, f64::max);
        let rate = t.bytes / (secs - overhead);
        let switch_rate = [t.slowest_window, self.slowest_before].into_iter().flatten().fold(rate, f64::min);
        if t.slowest_window.is_some() {
            self.slowest_before = t.slowest_window;
        }
        RoundModel { rate, switch_rate, overhead, fixed: Duration::from_secs_f64(t.collect.max(0.0) + worst) }
    }
}

/// `auto`'s candidates: those of `auto` that the destination decodes (method and level, as
/// its Welcome announced) and that open here, with their codec specs and the method code their
/// packets carry. `none` is always one: raw packets, labelled `none` when the destination
/// decodes it and else with the first method it decodes (a raw packet needs no decoder).
/// With [`AutoConfig::hardware_candidates`], every other method the destination decodes whose
/// codec opens on an accelerator here ([`crate::codec::Codec::hardware`]: qatzip with a QAT
/// device) is added at its default level; without a device it stays out unless named.
/// Returns the candidates, specs, codes, and the code for sync packets.
pub(crate) fn auto_candidates(auto: &AutoConfig, caps: &Capabilities, local: &CodecSpec) -> (Vec<Candidate>, Vec<CodecSpec>, Vec<MethodCode>, MethodCode) {
    let none = Candidate::none();
    let label = if caps.methods.iter().any(|m| m.code == none.method.code()) { none.method.code() } else { caps.methods.first().map_or(none.method.code(), |m| m.code) };
    let (mut cands, mut specs, mut codes) = (vec![none], vec![CodecSpec { qatzip: local.qatzip.clone(), ..CodecSpec::new(none.method) }], vec![label]);
    for &c in &auto.candidates {
        if !c.compresses() || cands.contains(&c) {
            continue;
        }
        let level = c.level;
        if !caps.methods.iter().any(|m| m.code == c.method.code() && (m.min_level..=m.max_level).contains(&level)) {
            continue;
        }
        let Ok(mut spec) = CodecSpec::with_level(c.method, level) else { continue };
        spec.qatzip = local.qatzip.clone();
        if codec::open(&spec).is_err() {
            continue;
        }
        cands.push(c);
        specs.push(spec);
        codes.push(c.method.code());
    }
    if auto.hardware_candidates {
        for m in crate::codec::Method::all() {
            if !m.compresses() || cands.iter().any(|c| c.method == m) || !caps.methods.iter().any(|x| x.code == m.code()) {
                continue;
            }
            let spec = CodecSpec { qatzip: local.qatzip.clone(), ..CodecSpec::new(m) };
            if codec::open(&spec).is_ok_and(|c| c.hardware()) {
                cands.push(Candidate::new(m, spec.level));
                specs.push(spec);
                codes.push(m.code());
            }
        }
    }
    (cands, specs, codes, label)
}

/// Migrate `memory` to the destination listening at `addr`.
///
/// `tracker` reports dirty pages per round; `workload` is paused for the switchover and
/// resumed if the migration fails afterwards. Progress goes to `progress` ~10×/s, and
/// [`Event`]s: `Status(Setup)` first, round and status events as they happen, and exactly one
/// final `Status` (`Completed`, `Failed` or `Cancelled`) before this returns.
pub fn run_source(
    addr: &str,
    memory: &GuestMemory,
    tracker: &mut dyn DirtyTracker,
    workload: &mut dyn SourceWorkload,
    config: &SourceConfig,
    progress: &dyn ProgressSink,
) -> Result<MigrationReport, MigrationError> {
    progress.event(&Event::Status(MigrationStatus::Setup));
    let result = source_session(addr, memory, tracker, workload, config, progress);
    let end = match &result {
        Ok(_) => MigrationStatus::Completed,
        Err(MigrationError::Cancelled { .. }) => MigrationStatus::Cancelled,
        Err(_) => MigrationStatus::Failed,
    };
    progress.event(&Event::Status(end));
    result
}

fn source_session(
    addr: &str,
    memory: &GuestMemory,
    tracker: &mut dyn DirtyTracker,
    workload: &mut dyn SourceWorkload,
    config: &SourceConfig,
    progress: &dyn ProgressSink,
) -> Result<MigrationReport, MigrationError> {
    check_config(config)?;
    let cpu = CpuMeter::start();
    let t0 = Instant::now();
    let (info, depth) = probe_codec(config, progress)?;
    let mut session = open_session(addr, memory, config)?;
    tracker.start(memory)?;
    let setup_time = t0.elapsed();
    let transport = session.control.describe();
    let shared = Shared::new(memory, tracker.guest_may_write(), config, &session.capabilities, depth);
    // Postcopy's urgent channel: requested pages skip the queue of background batches.
    let (urgent_tx, urgent_rx) = crossbeam_channel::unbounded::<Batch>();
    let urgent_outstanding = Arc::new(Outstanding::default());
    let urgent = session.urgent.is_some().then(|| Arc::new(UrgentServer::new(memory, urgent_tx, urgent_outstanding.clone())));
    let sock_err = |e: std::io::Error| MigrationError::Other(format!("control socket: {e}"));
    let stall = config.stall_timeout;
    let link = ControlLink::new(session.control.try_clone().map_err(sock_err)?, stall, session.version).map_err(sock_err)?;
    link.spawn_keepalive(stall).map_err(|e| MigrationError::Other(format!("spawn: {e}")))?;
    let watch = Arc::new(Watch {
        data: session.data.iter().chain(session.urgent.iter()).map(|s| s.try_clone()).collect::<Result<_, _>>().map_err(sock_err)?,
        peer_end: Mutex::new(None),
        committed: AtomicBool::new(false),
        done: AtomicBool::new(false),
    });
    let ctl_rx = spawn_control_reader(&session.control, session.version, urgent.clone(), watch.clone(), stall)?;
    let result = std::thread::scope(|scope| {
        spawn_watchdog(scope, &watch, &shared.failure, config, t0)?;
        let Channels { work_tx, to_sockets, mut writers } = spawn_channels(scope, config, &shared, std::mem::take(&mut session.data), depth)?;
        match session.urgent.take() {
            Some(sock) => writers.push(spawn_urgent(scope, config, &shared, sock, urgent_rx, urgent_outstanding)?),
            None => drop(urgent_rx),
        }
        let mut run = SourceRun::new(memory, config, &shared, (work_tx, to_sockets), &ctl_rx, (&link, &watch), progress, t0, urgent);
        let outcome = run.migrate(tracker, workload);
        run.finish(workload, outcome, writers)
    });
    tracker.stop();
    session.control.close_notify();
    link.shutdown();
    let _ = session.control.shutdown(std::net::Shutdown::Both);
    let (run, dest) = result?;
    Ok(completed_report(ReportInputs { config, info, depth, tracker: tracker.name(), memory, setup_time, transport, cpu: cpu.read(), shared: &shared, run, dest }))
}

fn check_config(config: &SourceConfig) -> Result<(), MigrationError> {
    if config.channels == 0 || config.channels > 256 {
        return Err(MigrationError::Config(format!("--multifd-channels must be 1..=256, got {}", config.channels)));
    }
    if let Some(ac) = &config.auto_converge {
        ac.validate().map_err(MigrationError::Config)?;
    }
    Ok(())
}

/// Open one codec now so configuration errors surface before anything is sent (each worker
/// opens its own later); its info, its note as an event, and the pipeline depth.
fn probe_codec(config: &SourceConfig, progress: &dyn ProgressSink) -> Result<(CodecInfo, usize), MigrationError> {
    let probe = codec::open(&config.codec).map_err(|source| MigrationError::Codec { channel: "setup".into(), cause: source })?;
    let info = probe.info();
    if let Some(note) = &info.note {
        progress.event(&Event::CodecNote { method: info.method.to_string(), note: note.clone() });
    }
    let depth = config.pipeline_depth.unwrap_or_else(|| probe.preferred_pipeline_depth()).clamp(1, 64);
    Ok((info, depth))
}


/// What the rounds and the switchover measured.
struct RunSummary {
    total_time: Duration,
    downtime: Duration,
    expected_downtime: Duration,
    /// The fixed part of `expected_downtime` (see [`SwitchoverModel`]).
    expected_fixed: Duration,
    /// How much later the final state went out for the source's memory digest (see
    /// [`SourceRun::last_round`]).
    digest_wait: Duration,
    rounds: u32,
    pages_per_round: Vec<u64>,
    throttle_pct_per_round: Vec<u8>,
    mechanisms: Vec<String>,
    throttle_note: Option<String>,
    peak_rss: u64,
    /// Set when the migration finished in postcopy.
    postcopy: Option<PostcopySummary>,
}

/// How pre-copy ended (when it did not give up).
enum Precopy {
    /// The dirty rest fits the downtime limit: the expected downtime, and its fixed part.
    Fits { estimate: Duration, fixed: Duration },
    /// Switch to postcopy, because of this.
    Postcopy(String),
}

/// What postcopy measured on the source.
struct PostcopySummary {
    reason: String,
    /// From the switchover (guest paused here) to the destination's Done.
    duration: Duration,
    pages_requested: u64,
    pages_pushed: u64,
}

struct SourceRun<'a> {
    memory: &'a GuestMemory,
    config: &'a SourceConfig,
    work_tx: Option<Sender<Batch>>,
    to_sockets: Vec<Sender<ToSocket>>,
    ctl_rx: &'a ControlRx,
    /// The control connection's write half (keepalives, frames in the agreed version).
    control: &'a ControlLink,
    watch: &'a Watch,
    counters: &'a Counters,
    failure: &'a Failure,
    outstanding: &'a Outstanding,
    progress: &'a dyn ProgressSink,
    t0: Instant,
    bytes_total: u64,
    round: u32,
    last_tick: Instant,
    /// This round's short-window rates.
    windows: RateWindows,
    peak_rss: u64,
    /// Auto-converge state (None without --auto-converge).
    throttler: Option<Throttler>,
    /// The throttle in effect during each round.
    throttle_per_round: Vec<u8>,
    /// The workload's throttle is above 0 and must be removed at the end.
    throttled: bool,
    /// Why auto-converge could not throttle, if it could not.
    throttle_unsupported: Option<String>,
    /// Postcopy's urgent channel (with --postcopy).
    urgent: Option<Arc<UrgentServer>>,
    /// Set at the postcopy switchover: (guest paused, destination running).
    postcopy: Option<(Instant, Option<Instant>)>,
}

impl<'a> SourceRun<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        memory: &'a GuestMemory,
        config: &'a SourceConfig,
        shared: &'a Shared,
        (work_tx, to_sockets): (Option<Sender<Batch>>, Vec<Sender<ToSocket>>),
        ctl_rx: &'a ControlRx,
        (control, watch): (&'a ControlLink, &'a Watch),
        progress: &'a dyn ProgressSink,
        t0: Instant,
        urgent: Option<Arc<UrgentServer>>,
    ) -> Self {
        SourceRun {
            memory,
            config,
            work_tx,
            to_sockets,
            ctl_rx,
            control,
            watch,
            counters: &shared.counters,
            failure: &shared.failure,
            outstanding: &shared.outstanding,
            progress,
            t0,
            bytes_total: 0,
            round: 0,
            last_tick: Instant::now(),
            windows: RateWindows::new(0),
            peak_rss: 0,
            throttler: config.auto_converge.map(Throttler::new),
            throttle_per_round: Vec::new(),
            throttled: false,
            throttle_unsupported: None,
            urgent,
            postcopy: None,
        }
    }

    /// After `migrate`, success or failure: unthrottle, tell the destination why it failed,
    /// stop the channels.
    fn finish(
        mut self,
        workload: &mut dyn SourceWorkload,
        mut outcome: Result<(RunSummary, DestinationReport), MigrationError>,
        writers: Vec<std::thread::ScopedJoinHandle<'_, Stream>>,
    ) -> Result<(RunSummary, DestinationReport), MigrationError> {
        // Success or failure: the workload (stopped, or running here) is not left throttled.
        // (After success the source is stopped for good, so a failure to unthrottle it is moot.)
        if let (Err(te), Err(e)) = (self.unthrottle(workload), &outcome) {
            outcome = Err(match e {
                // (keeps its meaning: the source stays paused)
                MigrationError::OutcomeUnknown(m) => MigrationError::OutcomeUnknown(format!("{m}; {te}")),
                e => MigrationError::Other(format!("{e}; {te}")),
            });
        }
        if let Err(e) = &outcome {
            self.failure.set(e.to_string());
            // Tell the destination why; it prints the same reason. Not after the commit point
            // (the destination may already run the guest, and nothing can take that back), nor
            // to a destination that ended it itself. Then close every channel at once.
            match e {
                MigrationError::OutcomeUnknown(_) | MigrationError::PeerAborted(_) | MigrationError::Cancelled { by: Side::Destination } => {}
                MigrationError::Cancelled { by: Side::Source } => self.control.send_last(&Control::Cancel { by: Side::Source.to_string() }),
                e => self.control.send_last(&Control::Abort { reason: e.to_string() }),
            }
            self.watch.teardown();
        }
        self.watch.done.store(true, Ordering::SeqCst);
        self.work_tx = None;
        self.to_sockets.clear();
        // Let the urgent worker finish (its socket is shut down with the others below).
        if let Some(u) = self.urgent.take() {
            u.close();
        }
        for w in writers {
            if let Ok(sock) = w.join() {
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
        }
        outcome
    }

    fn migrate(&mut self, tracker: &mut dyn DirtyTracker, workload: &mut dyn SourceWorkload) -> Result<(RunSummary, DestinationReport), MigrationError> {
        let mut dirty = DirtyPages::for_memory(self.memory);
        let mut pages_per_round = Vec::new();
        let (expected_downtime, expected_fixed) = match self.precopy(tracker, workload, &mut dirty, &mut pages_per_round)? {
            Precopy::Fits { estimate, fixed } => (estimate, fixed),
            Precopy::Postcopy(why) => return self.postcopy(tracker, workload, dirty, pages_per_round, why),
        };
        // Switchover: pause, send the last dirty set and the device state.
        self.progress.event(&Event::Status(MigrationStatus::PreSwitchover));
        let paused_at = Instant::now();
        let (dest, digest_wait) = self.switchover(tracker, workload, &mut dirty, &mut pages_per_round)?;
        let downtime = paused_at.elapsed();
        self.tick(true);
        self.progress.finish();
        let summary = RunSummary {
            total_time: self.t0.elapsed(),
            downtime,
            expected_downtime,
            expected_fixed,
            digest_wait,
            rounds: self.round + 1,
            pages_per_round,
            throttle_pct_per_round: std::mem::take(&mut self.throttle_per_round),
            mechanisms: self.mechanisms(),
            throttle_note: self.throttle_unsupported.clone(),
            peak_rss: self.peak_rss,
            postcopy: None,
        };
        Ok((summary, dest))
    }

    /// Pre-copy rounds until the dirty rest fits the downtime limit (its expected downtime),
    /// or postcopy takes over, or give up.
    fn precopy(&mut self, tracker: &mut dyn DirtyTracker, workload: &mut dyn SourceWorkload, dirty: &mut DirtyPages, pages_per_round: &mut Vec<u64>) -> Result<Precopy, MigrationError> {
        tracker.collect(dirty)?;
        self.progress.event(&Event::Status(MigrationStatus::Active));
        let mut model = SwitchoverModel::default();
        loop {
            let started = Instant::now();
            let wire_before = self.counters.wire();
            self.throttle_per_round.push(self.throttler.as_ref().map_or(0, |t| t.pct()));
            self.progress.event(&Event::RoundStarted { round: self.round, pages: dirty.count() });
            self.windows = RateWindows::new(self.counters.raw_bytes());
            let pages = self.send_round(dirty)?;
            let (queued, wire_queued) = (Instant::now(), self.counters.wire());
            self.wait_round_done()?;
            pages_per_round.push(pages);
            let (secs, tail) = (started.elapsed().as_secs_f64().max(1e-6), queued.elapsed().as_secs_f64());
            let wire_bytes = self.counters.wire() - wire_before;
            dirty.clear();
            let collect_started = Instant::now();
            tracker.collect(dirty)?;
            // Guest (raw) bytes moved per second in this round, compression and free zero
            // pages included — not wire bytes per second — and the switchover's fixed cost.
            let m = model.observe(&RoundTiming {
                bytes: pages as f64 * PAGE_SIZE as f64,
                secs,
                tail,
                wire: wire_bytes,
                wire_in_tail: wire_before + wire_bytes - wire_queued,
                collect: collect_started.elapsed().as_secs_f64(),
                slowest_window: self.windows.slowest,
            });
            let rate = m.switch_rate;
            let remaining = dirty.count() as f64 * PAGE_SIZE as f64;
            let estimate = switchover_estimate(m.fixed, remaining, rate);
            self.progress.event(&Event::RoundFinished(RoundStats {
                round: self.round,
                pages,
                wire_bytes,
                seconds: secs,
                raw_bytes_per_s: m.rate,
                switchover_bytes_per_s: rate,
                wire_bytes_per_s: wire_bytes as f64 / secs,
                dirty_pages: dirty.count(),
                expected_downtime_ms: estimate.as_secs_f64() * 1000.0,
                overhead_ms: m.overhead * 1000.0,
                fixed_ms: m.fixed.as_secs_f64() * 1000.0,
            }));
            if estimate <= self.config.downtime_limit {
                return Ok(Precopy::Fits { estimate, fixed: m.fixed });
            }
            self.auto_converge(workload, dirty.count() * PAGE_SIZE as u64, self.counters.wire() - wire_before)?;
            let rounds_done = self.round + 1;
            let out_of_time = rounds_done >= self.config.max_rounds || self.t0.elapsed() >= self.config.timeout;
            if let Some(why) = self.postcopy_reason(rounds_done, out_of_time, pages, dirty.count(), rate, m.fixed) {
                return Ok(Precopy::Postcopy(why));
            }
            if out_of_time {
                return Err(self.not_converged(rounds_done, remaining, rate, estimate, m.fixed));
            }
            self.round += 1;
        }
    }

    fn not_converged(&self, rounds_done: u32, remaining: f64, rate: f64, estimate: Duration, fixed: Duration) -> MigrationError {
        let limit = self.config.downtime_limit;
        let fixed_note = if fixed >= limit { "; its fixed part alone exceeds the limit (the sync round trip and the dirty-log collection, measured on the rounds: raise --downtime-limit)" } else { "" };
        let hint = match (&self.throttler, &self.throttle_unsupported) {
            (_, Some(why)) => format!("--auto-converge could not throttle the workload ({why})"),
            (Some(t), None) => format!("auto-converge throttled the workload to {}% (a higher --cpu-throttle-initial or --cpu-throttle-increment gets there in fewer rounds, or raise --max-rounds)", t.pct()),
            (None, None) => "raise --downtime-limit, --max-rounds or --timeout, lower the guest's dirty rate, or use --auto-converge".into(),
        };
        MigrationError::NotConverged(format!(
            "after {rounds_done} rounds and {:.1} s, {:.1} MiB are still dirty; at the measured {:.1} MB/s the switchover needs {:.0} ms ({:.0} ms fixed + {:.0} ms for the pages), over the downtime limit of {} ms{fixed_note}; {hint}; the source keeps running",
            self.t0.elapsed().as_secs_f64(),
            remaining / (1 << 20) as f64,
            rate / 1e6,
            estimate.as_secs_f64() * 1000.0,
            fixed.as_secs_f64() * 1000.0,
            (estimate - fixed.min(estimate)).as_secs_f64() * 1000.0,
            limit.as_millis()
        ))
    }

    /// Pause the workload, send the last dirty set and the device state (Finish), wait for
    /// Done. On failure before the commit point the workload is resumed here; after it, only
    /// the destination's own Abort allows that.
    fn switchover(&mut self, tracker: &mut dyn DirtyTracker, workload: &mut dyn SourceWorkload, dirty: &mut DirtyPages, pages_per_round: &mut Vec<u64>) -> Result<(DestinationReport, Duration), MigrationError> {
        let state = workload.pause().map_err(|source| MigrationError::Workload { what: "pause", cause: source })?;
        self.progress.event(&Event::Status(MigrationStatus::Device));
        // Set once Finish is on the wire: the commit point (see the protocol doc in wire/).
        let mut committed = false;
        match self.last_round(tracker, dirty, pages_per_round, &state, &mut committed) {
            Ok(d) => Ok(d),
            // Past the commit point only the destination's own Abort (sent before it resumes
            // anything) proves the guest does not run there; anything else — Done lost or
            // garbled, the link gone, a timeout — leaves the outcome unknown, and resuming here
            // could make two running copies. Stay paused and say so.
            Err(e) if committed && !matches!(e, MigrationError::PeerAborted(_) | MigrationError::Cancelled { by: Side::Destination }) => {
                Err(MigrationError::OutcomeUnknown(e.to_string()))
            }
            Err(e) => {
                // The source continues at full speed.
                if let Err(te) = self.unthrottle(workload) {
                    return Err(MigrationError::Other(format!("{e}; {te}")));
                }
                if let Err(re) = workload.resume_after_failure() {
                    return Err(MigrationError::Other(format!("{e}; resuming the source also failed: {re}")));
                }
                Err(e)
            }
        }
    }

    /// The final round (the guest is paused), Finish, and the destination's Done; with the
    /// destination's report, how much later `Finish` went out because of the source's memory
    /// digest: the digest runs while the last pages are sent, and `Finish` (which carries it)
    /// waits for it; the wait counts from when the last pages were queued or, if later, when
    /// the destination said it has them all (its `RoundDone`), since until then the switchover
    /// was waiting for the pages anyway. It is verification's share of the downtime on this
    /// side (the destination's hashing is its `verify_ms`).
    fn last_round(&mut self, tracker: &mut dyn DirtyTracker, dirty: &mut DirtyPages, pages_per_round: &mut Vec<u64>, state: &[u8], committed: &mut bool) -> Result<(DestinationReport, Duration), MigrationError> {
        tracker.collect(dirty)?;
        self.round += 1;
        self.progress.event(&Event::RoundStarted { round: self.round, pages: dirty.count() });
        let memory = self.memory;
        let verify = self.config.verify;
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let (pages, digest, digest_wait) = std::thread::scope(|s| {
            // The guest is paused: hash its memory while the last round travels.
            s.spawn(move || {
                let _ = done_tx.send(verify.then(|| memory.digest()));
            });
            let pages = self.send_round(dirty);
            let queued = Instant::now();
            // While the digest runs, note when the destination has every page of this round.
            let mut pages_in: Option<Instant> = None;
            let mut ctl: Result<(), MigrationError> = Ok(());
            let digest = loop {
                if ctl.is_err() {
                    break done_rx.recv().expect("digest thread");
                }
                crossbeam_channel::select! {
                    recv(done_rx) -> d => break d.expect("digest thread"),
                    recv(self.ctl_rx) -> m => match m {
                        Ok(Ok((Control::RoundDone { round, .. }, _))) if round == self.round => pages_in = Some(Instant::now()),
                        Ok(m) => ctl = self.unexpected(m),
                        Err(_) => ctl = Err(MigrationError::Other("control channel reader stopped".into())),
                    },
                }
            };
            // (Pages not all in when the digest was ready: it delayed nothing.)
            let digest_wait = pages_in.filter(|_| verify).map_or(Duration::ZERO, |t| t.max(queued).elapsed());
            (pages.and_then(|p| ctl.map(|()| p)), digest, digest_wait)
        });
        pages_per_round.push(pages?);
        self.throttle_per_round.push(self.throttler.as_ref().map_or(0, |t| t.pct()));
        let digest = digest.map(|d| format!("{d:032x}"));
        // A Finish that could not be written whole cannot have been accepted (the frame's
        // CRC covers all of it), so a write error here is still a plain failure.
        self.control.send(&Control::Finish { round: self.round, digest }, state).map_err(wire_err("control channel"))?;
        *committed = true;
        self.watch.committed.store(true, Ordering::SeqCst);
        Ok((self.wait_done()?, digest_wait))
    }

    /// Whether to switch to postcopy after a round that did not converge, and why.
    ///
    /// With `--postcopy`: after `--postcopy-after-rounds` rounds; when rounds or time run out;
    /// or when pre-copy is projected not to converge in the rounds and time left — unless
    /// auto-converge can still raise the throttle (it gets its chance first).
    fn postcopy_reason(&self, rounds_done: u32, out_of_time: bool, sent: u64, remaining: u64, rate: f64, fixed: Duration) -> Option<String> {
        let pc = self.config.postcopy?;
        if pc.after_rounds.is_some_and(|n| rounds_done >= n) {
            return Some(format!("--postcopy-after-rounds {}", rounds_done));
        }
        if out_of_time {
            return Some("pre-copy ran out of rounds or time".into());
        }
        if let (Some(t), None) = (&self.throttler, &self.throttle_unsupported) {
            if t.pct() < self.config.auto_converge.map_or(0, |a| a.max) {
                return None;
            }
        }
        // Each round leaves `f` times the dirty pages of the one before.
        let f = remaining as f64 / sent.max(1) as f64;
        // What the pages may take once the switchover's fixed cost is paid.
        let limit_bytes = self.config.downtime_limit.saturating_sub(fixed).as_secs_f64() * rate;
        let remaining_bytes = remaining as f64 * PAGE_SIZE as f64;
        if f >= 0.9 {
            return Some(format!("pre-copy does not converge (each round leaves {:.0}% of the pages of the one before)", f * 100.0));
        }
        if limit_bytes <= 0.0 {
            return Some(format!("the switchover's fixed cost ({:.0} ms) alone exceeds the downtime limit", fixed.as_secs_f64() * 1000.0));
        }
        let rounds_needed = ((limit_bytes / remaining_bytes).ln() / f.ln()).ceil().max(0.0);
        let time_needed = remaining_bytes / rate.max(1.0) / (1.0 - f);
        let time_left = self.config.timeout.saturating_sub(self.t0.elapsed()).as_secs_f64();
        let rounds_left = self.config.max_rounds.saturating_sub(rounds_done) as f64;
        if rounds_needed > rounds_left || time_needed > time_left {
            return Some(format!("projected pre-copy: {rounds_needed:.0} more rounds, {time_needed:.1} s, over what is left ({rounds_left:.0} rounds, {time_left:.1} s)"));
        }
        None
    }

    /// Switch to postcopy: stop the guest for good, tell the destination which pages are
    /// still dirty (it discards them and starts the guest), serve the pages it faults on over
    /// the urgent channel and push the rest in the background over all channels. Any failure
    /// from here on is a postcopy failure: the source never resumes.
    fn postcopy(
        &mut self,
        tracker: &mut dyn DirtyTracker,
        workload: &mut dyn SourceWorkload,
        mut dirty: DirtyPages,
        mut pages_per_round: Vec<u64>,
        why: String,
    ) -> Result<(RunSummary, DestinationReport), MigrationError> {
        let paused_at = Instant::now();
        let state = workload.pause().map_err(|source| MigrationError::Workload { what: "pause", cause: source })?;
        if let Err(e) = tracker.collect(&mut dirty) {
            // Nothing was sent yet: the source continues.
            if let Err(re) = workload.resume_after_failure() {
                return Err(MigrationError::Other(format!("{e}; resuming the source also failed: {re}")));
            }
            return Err(e.into());
        }
        self.round += 1;
        let mut discard: Vec<(u16, u32, u32)> = Vec::new();
        for (rid, bitmap) in dirty.regions().iter().enumerate() {
            for p in bitmap.iter_set() {
                match discard.last_mut() {
                    Some((r, first, n)) if *r == rid as u16 && *first + *n == p as u32 => *n += 1,
                    _ => discard.push((rid as u16, p as u32, 1)),
                }
            }
        }
        let urgent = self.urgent.clone().expect("postcopy connects an urgent channel");
        urgent.activate(self.round);
        self.postcopy = Some((paused_at, None));
        let pc_err = |e: MigrationError| match e {
            MigrationError::Postcopy(_) => e,
            e => MigrationError::Postcopy(format!("{e} (switched to postcopy because {why})")),
        };
        self.control.send(&Control::Postcopy { round: self.round, discard }, &state).map_err(|e| pc_err(wire_err("control channel")(e)))?;
        // Past this the destination may run the guest: a cancel no longer applies.
        self.watch.committed.store(true, Ordering::SeqCst);
        // The destination registers, discards and starts the guest before any background page
        // is sent, so no page of this round can land before its discard.
        while self.postcopy.is_some_and(|(_, running)| running.is_none()) {
            let m = self.next_control().map_err(pc_err)?;
            self.unexpected(Ok(m)).map_err(pc_err)?;
        }
        self.progress.event(&Event::Status(MigrationStatus::PostcopyActive));
        self.progress.event(&Event::RoundStarted { round: self.round, pages: dirty.count() });
        let pushed = self.send_round(&dirty).map_err(pc_err)?;
        pages_per_round.push(pushed);
        self.throttle_per_round.push(self.throttler.as_ref().map_or(0, |t| t.pct()));
        let dest = self.wait_done().map_err(pc_err)?;
        let (paused_at, running) = self.postcopy.expect("set above");
        self.tick(true);
        self.progress.finish();
        let mut mechanisms = self.mechanisms();
        mechanisms.push("postcopy".into());
        let summary = RunSummary {
            total_time: self.t0.elapsed(),
            downtime: running.map_or(Duration::ZERO, |r| r - paused_at),
            expected_downtime: Duration::ZERO,
            expected_fixed: Duration::ZERO,
            digest_wait: Duration::ZERO,
            rounds: self.round + 1,
            pages_per_round,
            throttle_pct_per_round: std::mem::take(&mut self.throttle_per_round),
            mechanisms,
            throttle_note: self.throttle_unsupported.clone(),
            peak_rss: self.peak_rss,
            postcopy: Some(PostcopySummary {
                reason: why,
                duration: paused_at.elapsed(),
                pages_requested: urgent.pages.load(std::sync::atomic::Ordering::Relaxed),
                pages_pushed: pushed,
            }),
        };
        Ok((summary, dest))
    }

    /// Auto-converge after a round that did not converge: raise the throttle per QEMU's rule.
    fn auto_converge(&mut self, workload: &mut dyn SourceWorkload, dirtied: u64, transferred: u64) -> Result<(), MigrationError> {
        if self.throttle_unsupported.is_some() {
            return Ok(());
        }
        let Some(pct) = self.throttler.as_mut().and_then(|t| t.after_round(dirtied, transferred)) else { return Ok(()) };
        match workload.set_throttle(pct) {
            Ok(true) => {
                self.throttled = true;
                Ok(())
            }
            Ok(false) => {
                self.throttle_unsupported = Some("this workload does not support throttling".into());
                Ok(())
            }
            Err(cause) => Err(MigrationError::Workload { what: "throttle", cause }),
        }
    }

    /// Back to full speed (after success, failure or giving up); failures only noted.
    fn unthrottle(&mut self, workload: &mut dyn SourceWorkload) -> Result<(), String> {
        if std::mem::take(&mut self.throttled) {
            workload.set_throttle(0).map_err(|e| format!("removing the auto-converge throttle failed: {e}"))?;
        }
        Ok(())
    }

    fn mechanisms(&self) -> Vec<String> {
        let mut m = vec!["pre-copy".to_string()];
        if self.throttle_per_round.iter().chain(self.throttler.as_ref().map(|t| t.pct()).iter()).any(|&p| p > 0) {
            m.push("auto-converge".into());
        }
        m
    }

    /// Queue every dirty page as batches, then a sync on every channel. Returns pages sent.
    fn send_round(&mut self, dirty: &DirtyPages) -> Result<u64, MigrationError> {
        let work_tx = self.work_tx.as_ref().expect("work queue open").clone();
        let mut pages_sent = 0u64;
        self.bytes_total += dirty.count() * PAGE_SIZE as u64;
        for (rid, bitmap) in dirty.regions().iter().enumerate() {
            let mut pages = Vec::with_capacity(MAX_BATCH_PAGES);
            let mut emit = |pages: Vec<u32>, this: &mut Self| -> Result<(), MigrationError> {
                pages_sent += pages.len() as u64;
                this.outstanding.add();
                if work_tx.send(Batch { region: rid as u16, round: this.round, pages }).is_err() {
                    this.outstanding.done();
                }
                this.poll()
            };
            let urgent = self.urgent.clone().filter(|_| self.postcopy.is_some());
            let served = urgent.as_ref().map(|u| &u.served[rid]);
            for p in bitmap.iter_set() {
                if served.is_some_and(|s| s.get(p)) {
                    continue; // already sent on the urgent channel
                }
                pages.push(p as u32);
                if pages.len() == MAX_BATCH_PAGES {
                    emit(std::mem::replace(&mut pages, Vec::with_capacity(MAX_BATCH_PAGES)), self)?;
                }
            }
            if !pages.is_empty() {
                emit(pages, self)?;
            }
        }
        self.outstanding.wait_zero(self.failure);
        self.check_failure()?;
        for tx in &self.to_sockets {
            let _ = tx.send(ToSocket::Sync { round: self.round });
        }
        Ok(pages_sent)
    }

    /// The first reason to stop, most telling first: what the destination said (or that the
    /// control link died), our cancel, --timeout, a channel's failure.
    fn check_failure(&self) -> Result<(), MigrationError> {
        if let Some(end) = self.watch.peer_end.lock().unwrap().clone() {
            return Err(end.into_error_stall(self.config.stall_timeout));
        }
        let committed = self.watch.committed.load(Ordering::SeqCst);
        if !committed && self.config.cancel.is_cancelled() {
            return Err(MigrationError::Cancelled { by: Side::Source });
        }
        if self.t0.elapsed() >= self.config.timeout {
            return Err(MigrationError::TimedOut(format!(
                "timed out after {} (--timeout) in round {}; the source keeps running",
                secs(self.config.timeout),
                self.round
            )));
        }
        match self.failure.take() {
            Some(msg) if self.failure.stalled() => Err(MigrationError::Stalled(msg)),
            Some(msg) => Err(MigrationError::Other(msg)),
            None => Ok(()),
        }
    }

    /// Between batches: surface failures and aborts from the destination, update progress.
    fn poll(&mut self) -> Result<(), MigrationError> {
        self.windows.sample(self.counters.raw_bytes());
        self.check_failure()?;
        if let Ok(msg) = self.ctl_rx.try_recv() {
            self.unexpected(msg)?;
        }
        self.tick(false);
        Ok(())
    }

    fn tick(&mut self, force: bool) {
        if force || self.last_tick.elapsed() >= TICK {
            self.last_tick = Instant::now();
            self.peak_rss = self.peak_rss.max(super::stats::rss_anon_bytes());
            self.progress.update(&Progress {
                round: self.round,
                bytes_done: self.counters.raw_bytes(),
                bytes_total: self.bytes_total,
                wire_bytes: self.counters.wire(),
                elapsed: self.t0.elapsed(),
            });
        }
    }

    /// A control message outside the expected sequence.
    fn unexpected(&mut self, msg: Result<(Control, Vec<u8>), WireError>) -> Result<(), MigrationError> {
        match msg {
            Ok((Control::Abort { reason }, _)) => Err(MigrationError::PeerAborted(reason)),
            Ok((Control::PostcopyRunning, _)) if self.postcopy.is_some_and(|(_, r)| r.is_none()) => {
                if let Some((_, running)) = &mut self.postcopy {
                    *running = Some(Instant::now());
                }
                Ok(())
            }
            Ok((Control::Cancel { .. }, _)) => Err(MigrationError::Cancelled { by: Side::Destination }),
            Ok((Control::RoundDone { .. }, _)) | Ok((Control::Keepalive, _)) => Ok(()),
            Ok((other, _)) => Err(MigrationError::Wire { channel: "control channel".into(), cause: WireError::malformed("control message", format!("unexpected {other:?}")) }),
            Err(e) => Err(PeerEnd::link(&e).into_error_stall(self.config.stall_timeout)),
        }
    }

    fn next_control(&mut self) -> Result<(Control, Vec<u8>), MigrationError> {
        loop {
            // Messages that arrived come first: a Done followed by the destination closing the
            // link is a success, not a dead link.
            match self.ctl_rx.try_recv() {
                Ok(Ok((Control::Keepalive, _))) => continue,
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) => return Err(self.unexpected(Err(e)).unwrap_err()),
                Err(_) => {}
            }
            if self.postcopy.is_some() && self.t0.elapsed() >= self.config.timeout {
                return Err(MigrationError::Postcopy(format!("timed out after {:?}", self.config.timeout)));
            }
            self.check_failure()?;
            match self.ctl_rx.recv_timeout(TICK) {
                Ok(Ok((Control::Keepalive, _))) => {}
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) => return Err(self.unexpected(Err(e)).unwrap_err()),
                Err(RecvTimeoutError::Timeout) => self.tick(false),
                Err(RecvTimeoutError::Disconnected) => return Err(MigrationError::Other("control channel reader stopped".into())),
            }
        }
    }

    fn wait_round_done(&mut self) -> Result<(), MigrationError> {
        loop {
            match self.next_control()? {
                (Control::RoundDone { round, .. }, _) if round == self.round => return Ok(()),
                (Control::RoundDone { round, .. }, _) => {
                    return Err(MigrationError::Wire {
                        channel: "control channel".into(),
                        cause: WireError::malformed("RoundDone", format!("for round {round} while in round {}", self.round)),
                    })
                }
                m => self.unexpected(Ok(m))?,
            }
        }
    }

    fn wait_done(&mut self) -> Result<DestinationReport, MigrationError> {
        loop {
            match self.next_control()? {
                (Control::Done { report }, _) => return Ok(report),
                m => self.unexpected(Ok(m))?,
            }
        }
    }
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
