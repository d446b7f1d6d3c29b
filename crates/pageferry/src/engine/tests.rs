//! In-process migrations over loopback TCP: both endpoints in this process, each on a thread.

use super::*;
use crate::codec::{conformance, Method};
use crate::dirty::{StaticTracker, UffdTracker};
use crate::memory::{GuestMemory, MemoryRegion, MmapRegion, PAGE_SIZE};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

fn named(name: &str) -> Method {
    name.parse().unwrap()
}

/// Memory with text, random, zero and sparse pages in two regions.
pub(crate) fn test_memory(pages: [u64; 2]) -> GuestMemory {
    let a = MmapRegion::anonymous("ram0", pages[0] * PAGE_SIZE as u64).unwrap();
    let b = MmapRegion::anonymous("ram1", pages[1] * PAGE_SIZE as u64).unwrap();
    for (i, r) in [&a, &b].into_iter().enumerate() {
        let len = r.len() as usize;
        let mem = unsafe { std::slice::from_raw_parts_mut(r.host_ptr(), len) };
        let text = conformance::sample_text(len, i as u64 + 1);
        let rand = conformance::sample_random(len, i as u64 + 7);
        for (p, page) in mem.chunks_mut(PAGE_SIZE).enumerate() {
            match p % 10 {
                0..=5 => page.copy_from_slice(&text[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]),
                6 => page.copy_from_slice(&rand[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]),
                7 => page[17] = p as u8 | 1, // sparse, non-zero
                _ => {}                     // zero
            }
        }
        // A long run of random pages: whole batches that must fall back to raw.
        let start = len / 2;
        let end = (start + 256 * PAGE_SIZE).min(len);
        mem[start..end].copy_from_slice(&rand[start..end]);
    }
    GuestMemory::new(vec![Arc::new(a), Arc::new(b)]).unwrap()
}

fn empty_like(m: &GuestMemory) -> GuestMemory {
    GuestMemory::new(m.regions().iter().map(|r| Arc::new(MmapRegion::anonymous(r.name(), r.len()).unwrap()) as Arc<dyn MemoryRegion>).collect()).unwrap()
}

pub(crate) fn migrate(
    src: &GuestMemory,
    dst: &GuestMemory,
    tracker: &mut dyn crate::dirty::DirtyTracker,
    workload: &mut dyn SourceWorkload,
    config: SourceConfig,
) -> (Result<MigrationReport, MigrationError>, Result<DestinationReport, MigrationError>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dcfg = DestinationConfig { codec: config.codec.clone(), ..Default::default() };
    std::thread::scope(|s| {
        let d = s.spawn(|| run_destination(&listener, dst, &mut NoWorkload, &dcfg));
        let r = run_source(&addr, src, tracker, workload, &config, &NoProgress);
        (r, d.join().unwrap())
    })
}

#[test]
fn every_method_migrates_static_memory_byte_identical() {
    let src = test_memory([3000, 700]);
    for method in [named("none"), named("zlib"), named("zstd")] {
        for channels in [1, 3] {
            let dst = empty_like(&src);
            let cfg = SourceConfig { channels, codec: crate::codec::CodecSpec::new(method), ..Default::default() };
            let (r, d) = migrate(&src, &dst, &mut StaticTracker::new(), &mut NoWorkload, cfg);
            let r = r.unwrap_or_else(|e| panic!("{method} x{channels}: {e}"));
            d.unwrap();
            assert_eq!(src.digest(), dst.digest(), "{method} x{channels}");
            assert!(r.verified);
            assert_eq!(r.rounds, 2, "round 0 plus an empty final round");
            assert_eq!(r.normal_pages + r.zero_pages, src.total_pages());
            assert!(r.zero_pages >= src.total_pages() / 8, "zero pages detected: {}", r.zero_pages);
            if method == named("none") {
                assert_eq!(r.raw_fallback_pages, 0, "none: raw is not a fallback");
            } else {
                assert!(r.raw_fallback_pages >= 256, "{method}: random run sent raw ({})", r.raw_fallback_pages);
            }
            if method != named("none") {
                assert!(r.ratio > 1.5, "{method}: ratio {}", r.ratio);
            }
        }
    }
}

/// Writes pages of the source while the migration runs; paused at switchover.
struct Writer {
    mem: GuestMemory,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(mem: GuestMemory, pages_per_ms: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (m, s, w) = (mem.clone(), stop.clone(), writes.clone());
        let thread = std::thread::spawn(move || {
            let mut x: u64 = 88172645463325252;
            while !s.load(Ordering::Relaxed) {
                for _ in 0..pages_per_ms {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let r = &m.regions()[(x % 2) as usize];
                    let page = (x >> 8) % r.pages();
                    let n = w.fetch_add(1, Ordering::Relaxed);
                    unsafe {
                        let p = r.host_ptr().add(page as usize * PAGE_SIZE) as *mut u64;
                        for i in 0..(PAGE_SIZE / 8) {
                            p.add(i).write_volatile(n ^ i as u64);
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        Self { mem, stop, writes, thread: Some(thread) }
    }
}

impl SourceWorkload for Writer {
    fn pause(&mut self) -> Result<Vec<u8>, WorkloadError> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        let _ = &self.mem;
        Ok(self.writes.load(Ordering::SeqCst).to_le_bytes().to_vec())
    }
    fn resume_after_failure(&mut self) -> Result<(), WorkloadError> {
        Ok(())
    }
}

#[test]
fn concurrent_writer_destination_equals_source_at_switchover() {
    if let Err(e) = UffdTracker::probe() {
        eprintln!("skipping: {e}");
        return;
    }
    for method in [named("none"), named("zlib"), named("zstd")] {
        let src = test_memory([8192, 1024]);
        let dst = empty_like(&src);
        let mut tracker = UffdTracker::new();
        // The writer must start after tracking starts; tracking starts in run_source before
        // round 0 reads memory, and writes before it are covered by round 0 anyway.
        let mut writer = Writer::start(src.clone(), 20);
        let cfg = SourceConfig {
            channels: 2,
            codec: crate::codec::CodecSpec::new(method),
            downtime_limit: std::time::Duration::from_millis(50),
            max_bandwidth: Some(200_000_000),
            ..Default::default()
        };
        let (r, d) = migrate(&src, &dst, &mut tracker, &mut writer, cfg);
        let r = r.unwrap_or_else(|e| panic!("{method}: {e}"));
        d.unwrap();
        assert!(writer.writes.load(Ordering::SeqCst) > 0);
        assert!(r.verified);
        assert_eq!(src.digest(), dst.digest(), "{method}: destination differs from the paused source");
        assert!(r.rounds >= 2);
    }
}

/// Counts the switchover calls a source workload receives.
#[derive(Default)]
struct CountingWorkload {
    pauses: u32,
    resumes: u32,
}

impl SourceWorkload for CountingWorkload {
    fn pause(&mut self) -> Result<Vec<u8>, WorkloadError> {
        self.pauses += 1;
        Ok(b"device state".to_vec())
    }
    fn resume_after_failure(&mut self) -> Result<(), WorkloadError> {
        self.resumes += 1;
        Ok(())
    }
}

/// A destination workload that cannot start (e.g. the device state does not load).
struct RefusingResume;

impl DestinationWorkload for RefusingResume {
    fn resume(&mut self, _device_state: &[u8]) -> Result<(), WorkloadError> {
        Err("device state rejected".into())
    }
}

#[test]
fn destination_abort_leaves_source_memory_untouched_and_resumes_the_source() {
    let src = test_memory([512, 64]);
    let before = src.digest();
    let dst = empty_like(&src);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let method = named("zstd");
    let dcfg = DestinationConfig { codec: crate::codec::CodecSpec::new(method), ..Default::default() };
    let scfg = SourceConfig { channels: 2, codec: crate::codec::CodecSpec::new(method), ..Default::default() };
    let mut workload = CountingWorkload::default();
    let (r, d) = std::thread::scope(|s| {
        let d = s.spawn(|| run_destination(&listener, &dst, &mut RefusingResume, &dcfg));
        let r = run_source(&addr, &src, &mut StaticTracker::new(), &mut workload, &scfg, &NoProgress);
        (r, d.join().unwrap())
    });
    let de = d.unwrap_err();
    assert!(matches!(de, MigrationError::Workload { what: "resume", .. }), "{de}");
    let se = r.unwrap_err();
    assert!(matches!(se, MigrationError::PeerAborted(_)), "{se:?}");
    assert!(se.to_string().contains("device state rejected"), "{se}");
    // The destination received everything (it failed only at the very end) ...
    assert_eq!(src.digest(), dst.digest());
    // ... and the source is exactly as before, and running again.
    assert_eq!(src.digest(), before, "the source's memory changed");
    assert_eq!((workload.pauses, workload.resumes), (1, 1), "paused once for the switchover, resumed once after the failure");
}

#[test]
fn destination_dying_mid_round_leaves_source_untouched_and_never_paused() {
    // A destination that takes the handshake, reads a little of round 0, then aborts.
    let src = test_memory([2048, 64]);
    let before = src.digest();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let evil = std::thread::spawn(move || {
        let mut socks = Vec::new();
        for _ in 0..3 {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
            let hello = crate::wire::read_frame(&mut s).unwrap().msg;
            assert!(matches!(hello, crate::wire::Control::Hello(_)));
            let capabilities = crate::wire::Capabilities { methods: vec![crate::codec::Method::default().caps()], ..Default::default() };
            let welcome = crate::wire::Control::Welcome { version: crate::wire::PROTOCOL_VERSION, fresh_destination: false, capabilities };
            crate::wire::write_frame(&mut s, crate::wire::PROTOCOL_VERSION, &welcome, &[]).unwrap();
            socks.push(s);
        }
        let mut buf = vec![0u8; 64 << 10];
        std::io::Read::read_exact(&mut socks[1], &mut buf).unwrap();
        crate::wire::write_frame(&mut socks[0], crate::wire::PROTOCOL_VERSION, &crate::wire::Control::Abort { reason: "disk full".into() }, &[]).unwrap();
        // Hang up on everything.
    });
    let mut workload = CountingWorkload::default();
    let scfg = SourceConfig { channels: 2, ..Default::default() };
    let e = run_source(&addr, &src, &mut StaticTracker::new(), &mut workload, &scfg, &NoProgress).unwrap_err();
    evil.join().unwrap();
    // Either the Abort or the broken sockets, whichever the source saw first.
    let msg = e.to_string();
    assert!(msg.contains("disk full") || msg.contains("did the destination die"), "{msg}");
    assert_eq!(src.digest(), before, "the source's memory changed");
    assert_eq!((workload.pauses, workload.resumes), (0, 0), "the source was paused before the switchover");
}

/// Reports every page dirty every round: a guest rewriting all its memory between looks.
struct AllDirty;

impl crate::dirty::DirtyTracker for AllDirty {
    fn start(&mut self, _memory: &GuestMemory) -> Result<(), crate::dirty::DirtyError> {
        Ok(())
    }
    fn collect(&mut self, into: &mut crate::dirty::DirtyPages) -> Result<(), crate::dirty::DirtyError> {
        for i in 0..into.regions().len() {
            into.region_mut(i).set_all();
        }
        Ok(())
    }
    fn guest_may_write(&self) -> bool {
        true
    }
    fn name(&self) -> &'static str {
        "all-dirty"
    }
}

/// The writer, counting switchover calls.
struct CountedWriter {
    writer: Writer,
    pauses: u32,
    resumes: u32,
}

impl SourceWorkload for CountedWriter {
    fn pause(&mut self) -> Result<Vec<u8>, WorkloadError> {
        self.pauses += 1;
        self.writer.pause()
    }
    fn resume_after_failure(&mut self) -> Result<(), WorkloadError> {
        self.resumes += 1;
        Ok(())
    }
}

#[test]
fn destination_timeout_aborts_the_migration_and_tells_the_source() {
    // 2.4 MB at a 400 kB/s cap takes ~6 s; the destination allows 1 s from its handshake.
    let src = test_memory([512, 64]);
    let before = src.digest();
    let dst = empty_like(&src);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let method = named("none");
    let dcfg = DestinationConfig { codec: crate::codec::CodecSpec::new(method), timeout: Some(std::time::Duration::from_secs(1)), ..Default::default() };
    let scfg = SourceConfig { channels: 2, codec: crate::codec::CodecSpec::new(method), max_bandwidth: Some(400_000), ..Default::default() };
    let mut workload = CountingWorkload::default();
    let t0 = std::time::Instant::now();
    let (r, d) = std::thread::scope(|s| {
        let d = s.spawn(|| run_destination(&listener, &dst, &mut NoWorkload, &dcfg));
        let r = run_source(&addr, &src, &mut StaticTracker::new(), &mut workload, &scfg, &NoProgress);
        (r, d.join().unwrap())
    });
    // Generous: proves the timeout ended it, not the ~6 s transfer or a 30 s stall timeout.
    assert!(t0.elapsed() < std::time::Duration::from_secs(5), "took {:?}", t0.elapsed());
    let de = d.unwrap_err();
    assert!(matches!(de, MigrationError::TimedOut(_)), "{de:?}");
    assert!(de.to_string().contains("timed out after 1 s (the destination's --timeout) in round 0"), "{de}");
    let se = r.unwrap_err();
    assert!(matches!(se, MigrationError::PeerAborted(_)), "{se:?}");
    assert!(se.to_string().contains("the destination's --timeout"), "the source hears why: {se}");
    assert_eq!(src.digest(), before, "the source's memory changed");
    assert_eq!((workload.pauses, workload.resumes), (0, 0), "never paused: no switchover happened");
}

#[test]
fn max_rounds_exceeded_is_not_converged_and_the_guest_keeps_running() {
    // The guest dirties all of its memory every round; the bandwidth cap makes each round
    // take at least wire bytes / cap (≥ 60 ms here; the limiter cannot overshoot), far over
    // the 5 ms downtime limit, so no round may ever end the pre-copy phase.
    let src = test_memory([64, 16]);
    let dst = empty_like(&src);
    let mut workload = CountedWriter { writer: Writer::start(src.clone(), 20), pauses: 0, resumes: 0 };
    let cfg = SourceConfig {
        channels: 2,
        codec: crate::codec::CodecSpec::new(named("none")),
        downtime_limit: std::time::Duration::from_millis(5),
        max_rounds: 3,
        max_bandwidth: Some(4_000_000),
        ..Default::default()
    };
    let (r, d) = migrate(&src, &dst, &mut AllDirty, &mut workload, cfg);
    let e = r.unwrap_err();
    assert!(matches!(e, MigrationError::NotConverged(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("did not converge") && msg.contains("after 3 rounds") && msg.contains("--max-rounds"), "{msg}");
    assert!(msg.contains("the source keeps running"), "{msg}");
    let de = d.unwrap_err().to_string();
    assert!(de.contains("peer aborted") && de.contains("after 3 rounds"), "the destination prints the same reason: {de}");
    assert_eq!((workload.pauses, workload.resumes), (0, 0), "the guest was paused without a switchover");
    let thread = workload.writer.thread.as_ref().expect("writer never stopped");
    assert!(!thread.is_finished(), "the guest stopped running");
    // Still running: it keeps writing after the failure (waiting for the scheduler, not a clock
    // threshold: the writer has all the time it needs).
    let before = workload.writer.writes.load(Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while workload.writer.writes.load(Ordering::SeqCst) <= before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(workload.writer.writes.load(Ordering::SeqCst) > before, "the guest stopped writing");
    workload.writer.pause().unwrap();
}

#[test]
fn copying_paths_used_to_measure_zero_copy_migrate_identically() {
    let src = test_memory([1500, 300]);
    for method in [named("none"), named("zstd"), named("zlib")] {
        let dst = empty_like(&src);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let codec = crate::codec::CodecSpec::new(method);
        let dcfg = DestinationConfig { codec: codec.clone(), zero_copy: false, ..Default::default() };
        let cfg = SourceConfig { codec, zero_copy: false, ..Default::default() };
        let (r, d) = std::thread::scope(|s| {
            let d = s.spawn(|| run_destination(&listener, &dst, &mut NoWorkload, &dcfg));
            (run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &cfg, &NoProgress), d.join().unwrap())
        });
        assert!(r.unwrap_or_else(|e| panic!("{method}: {e}")).verified);
        d.unwrap();
        assert_eq!(src.digest(), dst.digest(), "{method}");
    }
}

/// A source workload that records the throttle the engine asks for and can refuse it.
#[derive(Default)]
struct ThrottleRecorder {
    calls: Vec<u8>,
    now: Arc<std::sync::atomic::AtomicU8>,
    pauses: u32,
    resumes: u32,
}

impl SourceWorkload for ThrottleRecorder {
    fn pause(&mut self) -> Result<Vec<u8>, WorkloadError> {
        self.pauses += 1;
        Ok(Vec::new())
    }
    fn resume_after_failure(&mut self) -> Result<(), WorkloadError> {
        self.resumes += 1;
        Ok(())
    }
    fn set_throttle(&mut self, pct: u8) -> Result<bool, WorkloadError> {
        self.calls.push(pct);
        self.now.store(pct, Ordering::SeqCst);
        Ok(true)
    }
}

/// A guest whose dirtying follows the throttle: every round it dirties the first
/// `(100 - throttle)`% of region 0 — all of it unthrottled.
struct ThrottledDirt(Arc<std::sync::atomic::AtomicU8>, bool);

impl crate::dirty::DirtyTracker for ThrottledDirt {
    fn start(&mut self, _memory: &GuestMemory) -> Result<(), crate::dirty::DirtyError> {
        Ok(())
    }
    fn collect(&mut self, into: &mut crate::dirty::DirtyPages) -> Result<(), crate::dirty::DirtyError> {
        if !std::mem::replace(&mut self.1, true) {
            for i in 0..into.regions().len() {
                into.region_mut(i).set_all();
            }
            return Ok(());
        }
        let r = into.region_mut(0);
        let pages = r.pages() * (100 - self.0.load(Ordering::SeqCst) as u64) / 100;
        r.set_range(0, pages);
        Ok(())
    }
    fn guest_may_write(&self) -> bool {
        true
    }
    fn name(&self) -> &'static str {
        "throttled-dirt"
    }
}

fn capped(max_rounds: u32, auto_converge: Option<AutoConverge>) -> SourceConfig {
    SourceConfig {
        channels: 2,
        codec: crate::codec::CodecSpec::new(named("none")),
        // Region 0 (256 pages, 1 MiB) takes ≥ 100 ms per round at this cap: only a round of a
        // few pages fits the downtime limit. (At 90% throttle a round is 25 pages, 20 of them
        // non-zero: ≥ 6.2 ms of pacing after the limiter's 2 ms slack, so 8 ms sometimes fit
        // there; 5 ms never does, while the 2-page rounds at 99% take ~1 ms.)
        downtime_limit: std::time::Duration::from_millis(5),
        max_bandwidth: Some(10_000_000),
        max_rounds,
        auto_converge,
        ..Default::default()
    }
}

#[test]
fn auto_converge_raises_the_throttle_per_qemus_rule_until_it_converges_then_removes_it() {
    let src = test_memory([256, 16]);
    let dst = empty_like(&src);
    let mut w = ThrottleRecorder::default();
    let mut tracker = ThrottledDirt(w.now.clone(), false);
    let ac = AutoConverge { initial: 40, increment: 25, max: 99, trigger_threshold: 50 };
    let (r, d) = migrate(&src, &dst, &mut tracker, &mut w, capped(30, Some(ac)));
    let r = r.unwrap();
    d.unwrap();
    assert_eq!(r.mechanisms, ["pre-copy", "auto-converge"]);
    // Round 0 (everything) and round 1 (all of region 0 dirty) are "high"; the second raises
    // the throttle to 40, rounds 2 (60% dirty) and 3 to 65, 4 and 5 to 90, 6 and 7 to 99,
    // where 1% of region 0 (2 pages) fits the limit.
    assert_eq!(w.calls, [40, 65, 90, 99, 0], "throttle requests, then removal after success");
    assert_eq!(r.throttle_pct_per_round.len() as u32, r.rounds);
    assert_eq!(&r.throttle_pct_per_round[..4], [0, 0, 40, 40]);
    assert_eq!(*r.throttle_pct_per_round.last().unwrap(), 99);
    assert!(r.render().contains("throttle per round:"), "{}", r.render());
    assert_eq!(src.digest(), dst.digest());
}

#[test]
fn without_auto_converge_the_same_guest_never_converges_and_is_never_throttled() {
    let src = test_memory([256, 16]);
    let dst = empty_like(&src);
    let mut w = ThrottleRecorder::default();
    let mut tracker = ThrottledDirt(w.now.clone(), false);
    let (r, _d) = migrate(&src, &dst, &mut tracker, &mut w, capped(4, None));
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("did not converge") && msg.contains("--auto-converge"), "{msg}");
    assert!(w.calls.is_empty());
}

#[test]
fn a_failed_auto_converged_migration_leaves_the_source_running_at_full_speed() {
    let src = test_memory([256, 16]);
    let dst = empty_like(&src);
    let mut w = ThrottleRecorder::default();
    // Round counts so the throttle is up (20 after round 1, 30 after round 3) when the
    // migration gives up after round 4.
    let (r, _d) = migrate(&src, &dst, &mut AllDirty, &mut w, capped(5, Some(AutoConverge::default())));
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("throttled the workload to 30%"), "{msg}");
    assert_eq!(w.calls, [20, 30, 0], "the throttle is removed after the failure");
    assert_eq!((w.pauses, w.resumes), (0, 0));
}

#[test]
fn a_workload_that_cannot_be_throttled_is_reported_not_pretended() {
    let src = test_memory([256, 16]);
    let dst = empty_like(&src);
    let mut w = CountingWorkload::default();
    let (r, _d) = migrate(&src, &dst, &mut AllDirty, &mut w, capped(4, Some(AutoConverge::default())));
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("could not throttle the workload") && msg.contains("does not support throttling"), "{msg}");
}

/// Reports every page first, then the scripted page counts (pages 0..n of region 0), then
/// pages 0..`then` in every later collection (none when 0): a guest whose dirty set shrinks
/// round by round, exactly. Every collection after the first takes `delay` (a slow dirty log).
struct ScriptedTracker {
    script: std::collections::VecDeque<u64>,
    then: u64,
    delay: std::time::Duration,
    started: bool,
}

impl ScriptedTracker {
    fn new(script: impl Into<std::collections::VecDeque<u64>>) -> Self {
        Self { script: script.into(), then: 0, delay: std::time::Duration::ZERO, started: false }
    }
}

impl crate::dirty::DirtyTracker for ScriptedTracker {
    fn start(&mut self, _memory: &GuestMemory) -> Result<(), crate::dirty::DirtyError> {
        self.started = true;
        Ok(())
    }
    fn collect(&mut self, into: &mut crate::dirty::DirtyPages) -> Result<(), crate::dirty::DirtyError> {
        if !std::mem::replace(&mut self.started, false) {
            std::thread::sleep(self.delay);
            let n = self.script.pop_front().unwrap_or(self.then);
            if n > 0 {
                into.region_mut(0).set_range(0, n);
            }
            return Ok(());
        }
        for i in 0..into.regions().len() {
            into.region_mut(i).set_all();
        }
        Ok(())
    }
    fn guest_may_write(&self) -> bool {
        false
    }
    fn name(&self) -> &'static str {
        "scripted"
    }
}

#[test]
fn switchover_counts_compression_the_first_round_that_fits_is_the_last() {
    // 24 MiB of text (zstd ratio ~3+) over a 16 MB/s cap: the engine moves ~50 MB/s of guest
    // memory. A 4 MiB remainder (~80 ms at the guest rate, ~260 ms at the wire rate) fits the
    // 150 ms limit only when the estimate counts compression; 16 MiB (~330 ms) fits neither.
    let pages = 6144u64;
    let region = MmapRegion::anonymous("ram0", pages * PAGE_SIZE as u64).unwrap();
    let text = conformance::sample_text(region.len() as usize, 5);
    unsafe { std::slice::from_raw_parts_mut(region.host_ptr(), region.len() as usize) }.copy_from_slice(&text[..region.len() as usize]);
    let src = GuestMemory::single(region).unwrap();
    let limit = std::time::Duration::from_millis(150);
    let mib = (1 << 20) / PAGE_SIZE as u64;
    let dst = empty_like(&src);
    let mut tracker = ScriptedTracker::new([16 * mib, 4 * mib, 2 * mib]);
    let cfg = SourceConfig {
        codec: crate::codec::CodecSpec::new(named("zstd")),
        max_bandwidth: Some(16_000_000),
        downtime_limit: limit,
        ..Default::default()
    };
    let (r, d) = migrate(&src, &dst, &mut tracker, &mut NoWorkload, cfg);
    let r = r.unwrap();
    d.unwrap();
    assert!(r.ratio > 2.5, "ratio {}", r.ratio);
    // Round 0, the 16 MiB round (did not fit), then the switchover with 4 MiB: the 2 MiB
    // round the scripted guest would have had next was never needed.
    assert_eq!(r.pages_per_round, vec![pages, 16 * mib, 4 * mib], "{}", r.render());
    assert!(r.expected_downtime_ms <= limit.as_millis() as f64, "{}", r.render());
    // The wire-rate estimate of the same remainder would not have fit.
    let wire_estimate_ms = (4 * mib * PAGE_SIZE as u64) as f64 / 16e6 * 1000.0;
    assert!(wire_estimate_ms > limit.as_millis() as f64);
    // Measured: pause to the destination running, digest check included.
    assert!(r.downtime_ms <= limit.as_millis() as f64, "downtime {:.1} ms over the {} ms limit\n{}", r.downtime_ms, limit.as_millis(), r.render());
    assert_eq!(src.digest(), dst.digest());
}

/// A destination workload that reads every page of its memory in a scrambled order as soon
/// as it is resumed: in postcopy it faults on the pages still on the source.
#[derive(Default)]
struct Toucher {
    memory: Option<GuestMemory>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl DestinationWorkload for Toucher {
    fn resume(&mut self, _device_state: &[u8]) -> Result<(), WorkloadError> {
        let m = self.memory.clone().unwrap();
        self.thread = Some(std::thread::spawn(move || {
            let mut sum = 0u64;
            for r in m.regions() {
                let n = r.pages();
                for k in 0..n {
                    let p = (k * 7919) % n; // 7919 is prime: every page once
                    sum = sum.wrapping_add(unsafe { r.host_ptr().add(p as usize * PAGE_SIZE + 17).read_volatile() } as u64);
                }
            }
            sum
        }));
        Ok(())
    }
}

fn postcopy_pair(
    src: &GuestMemory,
    dst: &GuestMemory,
    tracker: &mut dyn crate::dirty::DirtyTracker,
    workload: &mut dyn SourceWorkload,
    dworkload: &mut dyn DestinationWorkload,
    config: SourceConfig,
) -> (Result<MigrationReport, MigrationError>, Result<DestinationReport, MigrationError>) {
    postcopy_pair_tls(src, dst, tracker, workload, dworkload, config, None)
}

fn postcopy_pair_tls(
    src: &GuestMemory,
    dst: &GuestMemory,
    tracker: &mut dyn crate::dirty::DirtyTracker,
    workload: &mut dyn SourceWorkload,
    dworkload: &mut dyn DestinationWorkload,
    config: SourceConfig,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> (Result<MigrationReport, MigrationError>, Result<DestinationReport, MigrationError>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dcfg = DestinationConfig { codec: config.codec.clone(), require_verify: false, tls, ..Default::default() };
    std::thread::scope(|s| {
        let d = s.spawn(|| run_destination(&listener, dst, dworkload, &dcfg));
        let r = run_source(&addr, src, tracker, workload, &config, &NoProgress);
        (r, d.join().unwrap())
    })
}

#[test]
fn postcopy_places_every_page_once_and_the_destination_ends_equal() {
    if let Err(e) = UffdTracker::probe() {
        eprintln!("skipping: {e}");
        return;
    }
    // zstd also over TLS: the urgent page requests and their answers run through the TLS
    // record layer while the background push shares the data channels.
    let (srv, cli) = super::tests_tls::loopback_pki();
    for (method, tls) in [(named("none"), None), (named("zstd"), None), (named("zstd"), Some((srv, cli)))] {
        let src = test_memory([8192, 1024]);
        let dst = empty_like(&src);
        let mut tracker = UffdTracker::new();
        let mut writer = Writer::start(src.clone(), 20);
        let mut toucher = Toucher { memory: Some(dst.clone()), thread: None };
        let cfg = SourceConfig {
            codec: crate::codec::CodecSpec::new(method),
            downtime_limit: std::time::Duration::from_millis(1),
            // Slow enough that the toucher faults before the background push is through.
            max_bandwidth: Some(20_000_000),
            postcopy: Some(PostcopyConfig { after_rounds: Some(2) }),
            tls: tls.as_ref().map(|t| t.1.clone()),
            ..Default::default()
        };
        let (r, d) = postcopy_pair_tls(&src, &dst, &mut tracker, &mut writer, &mut toucher, cfg, tls.map(|t| t.0));
        let r = r.unwrap_or_else(|e| panic!("{method}: {e}"));
        let d = d.unwrap();
        toucher.thread.take().unwrap().join().unwrap();
        assert_eq!(r.mechanisms, ["pre-copy", "postcopy"]);
        // At most two pre-copy rounds (the projection may switch earlier), then postcopy's.
        assert!((2..=3).contains(&r.rounds), "{}", r.rounds);
        assert_eq!(r.pages_per_round.len() as u32, r.rounds);
        assert!(r.postcopy_reason.is_some());
        let pc = d.postcopy.unwrap();
        assert!(pc.discarded_pages > 0, "{pc:?}");
        assert!(r.postcopy_pages_requested + r.postcopy_pages_pushed >= pc.discarded_pages, "{r:?}");
        assert_eq!(r.postcopy_pages_requested, pc.pages_requested);
        assert!(!r.verified && !d.verified);
        // The source is paused for good and the destination only read: equal memory.
        assert_eq!(src.digest(), dst.digest(), "{method}: destination differs from the paused source");
    }
}

#[test]
fn a_failure_after_the_postcopy_switchover_never_resumes_the_source() {
    if let Err(e) = UffdTracker::probe() {
        eprintln!("skipping: {e}");
        return;
    }
    let src = test_memory([512, 64]);
    let dst = empty_like(&src);
    let mut w = CountingWorkload::default();
    let cfg = SourceConfig { codec: crate::codec::CodecSpec::new(named("none")), postcopy: Some(PostcopyConfig { after_rounds: Some(1) }), downtime_limit: std::time::Duration::ZERO, ..Default::default() };
    let (r, d) = postcopy_pair(&src, &dst, &mut AllDirty, &mut w, &mut RefusingResume, cfg);
    let e = r.unwrap_err();
    assert!(matches!(e, MigrationError::Postcopy(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("postcopy failed after the switchover") && msg.contains("device state rejected"), "{msg}");
    assert_eq!((w.pauses, w.resumes), (1, 0), "paused once, never resumed");
    let de = d.unwrap_err();
    assert!(matches!(de, MigrationError::Postcopy(_)), "{de:?}");
}

#[test]
fn a_destination_requiring_digests_refuses_a_postcopy_source() {
    let src = test_memory([64, 16]);
    let dst = empty_like(&src);
    let cfg = SourceConfig { codec: crate::codec::CodecSpec::new(named("none")), postcopy: Some(PostcopyConfig::default()), ..Default::default() };
    // Refused in the handshake; the destination waits on for the right source until its
    // accept timeout, then names the refusal.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dcfg = DestinationConfig { codec: cfg.codec.clone(), accept_timeout: std::time::Duration::from_secs(1), ..Default::default() };
    let (r, d) = std::thread::scope(|s| {
        let d = s.spawn(|| run_destination(&listener, &dst, &mut NoWorkload, &dcfg));
        (run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &cfg, &NoProgress), d.join().unwrap())
    });
    let (se, de) = (r.unwrap_err().to_string(), d.unwrap_err().to_string());
    assert!(se.contains("postcopy") && se.contains("--no-verify"), "{se}");
    let reason = se.strip_prefix("handshake refused: ").unwrap_or_else(|| panic!("{se}"));
    assert!(de.contains("no source accepted within 1s: refused 1 connection(s)") && de.ends_with(reason), "{de}");
}

/// `n` pages of compressible text in one region.
fn text_memory(pages: u64) -> GuestMemory {
    let region = MmapRegion::anonymous("ram0", pages * PAGE_SIZE as u64).unwrap();
    let text = conformance::sample_text(region.len() as usize, 9);
    unsafe { std::slice::from_raw_parts_mut(region.host_ptr(), region.len() as usize) }.copy_from_slice(&text[..region.len() as usize]);
    GuestMemory::single(region).unwrap()
}

/// Lowers the rate limiter's cap once the migration has moved `after` guest bytes.
struct CapChanger {
    limiter: Arc<ratelimit::RateLimiter>,
    after: u64,
    to: u64,
}

impl ProgressSink for CapChanger {
    fn update(&self, p: &Progress) {
        if p.bytes_done >= self.after && self.limiter.rate() != self.to {
            self.limiter.set_rate(self.to);
        }
    }
}

#[test]
fn auto_changes_its_choice_when_the_link_slows_down_mid_migration() {
    // Compression is planned with a tenth of a core, so at 100 MB/s sending raw is faster;
    // at 4 MB/s compressing text (ratio ~4) is. The test lowers the cap after 8 MiB.
    let src = text_memory(8192);
    let dst = empty_like(&src);
    let limiter = Arc::new(ratelimit::RateLimiter::new(100_000_000));
    let auto = policy::AutoConfig { candidates: vec!["zstd:1".parse().unwrap()], max_cpu: Some(0.1), ..Default::default() };
    let cfg = SourceConfig { auto: Some(auto), limiter: Some(limiter.clone()), ..Default::default() };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let changer = CapChanger { limiter: limiter.clone(), after: 8 << 20, to: 4_000_000 };
    let (r, d) = std::thread::scope(|s| {
        let d = s.spawn(|| run_destination(&listener, &dst, &mut NoWorkload, &DestinationConfig::default()));
        let r = run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &cfg, &changer);
        (r, d.join().unwrap())
    });
    let r = r.unwrap();
    d.unwrap();
    assert_eq!(src.digest(), dst.digest());
    assert_eq!(limiter.rate(), 4_000_000, "the cap was changed during the migration");
    let a = r.auto.clone().expect("auto report");
    assert_eq!(r.method, "auto");
    // It starts with none and keeps it on the fast link, then compresses on the slow one.
    let log: Vec<&str> = a.switch_log.iter().map(|(_, c, _)| c.as_str()).collect();
    assert_eq!(log.last(), Some(&"zstd:1"), "never switched to zstd after the cap dropped: {log:?}\n{}", r.render());
    assert!(a.share_of("none") > 0.1 && a.share_of("zstd:1") > 0.1, "{}", a.summary());
    assert!(r.render().contains("auto batches:"), "{}", r.render());
}

#[test]
fn auto_pairs_its_probes_with_the_compressing_current_candidate() {
    // A slow link: auto compresses, and its probes of the other compressor are paired (the
    // worker compresses the same batch with the current candidate too, and throws that away).
    // The pages arrive intact whichever candidate carried them.
    let src = text_memory(8192);
    let dst = empty_like(&src);
    let limiter = Arc::new(ratelimit::RateLimiter::new(20_000_000));
    let auto = policy::AutoConfig { candidates: vec!["zstd:1".parse().unwrap(), "zlib:1".parse().unwrap()], ..Default::default() };
    let cfg = SourceConfig { auto: Some(auto), limiter: Some(limiter), ..Default::default() };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (r, d) = std::thread::scope(|s| {
        let d = s.spawn(|| run_destination(&listener, &dst, &mut NoWorkload, &DestinationConfig::default()));
        let r = run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &cfg, &NoProgress);
        (r, d.join().unwrap())
    });
    let r = r.unwrap();
    d.unwrap();
    assert_eq!(src.digest(), dst.digest());
    let a = r.auto.expect("auto report");
    assert!(a.share_of("none") < 0.2, "{}", a.summary());
    let paired: u64 = a.shares.iter().map(|s| s.paired).sum();
    assert!(paired > 0, "no paired probe: {a:?}");
    assert!(a.shares.iter().all(|s| s.paired <= s.probes), "{a:?}");
}

#[test]
fn auto_keeps_measuring_a_compressor_out_of_the_race_on_slices_of_raw_batches() {
    // Loopback, and compression allowed a hundredth of a core: zstd:3's worker stage alone
    // loses to none by far, so after the first decision it is only sampled (a slice of a
    // batch that goes raw, compressed and thrown away). The pages arrive intact.
    let src = text_memory(32768);
    let dst = empty_like(&src);
    let auto = policy::AutoConfig {
        candidates: vec!["zstd:3".parse().unwrap()],
        max_cpu: Some(0.01),
        window_batches: 16,
        probe_gap: 4,
        max_probe_gap: 8,
        // The probes' CPU budget scales with the cores: here it would stop them all.
        probe_cpu_share: 100.0,
        ..Default::default()
    };
    let cfg = SourceConfig { auto: Some(auto), ..Default::default() };
    let (r, d) = migrate(&src, &dst, &mut StaticTracker::new(), &mut NoWorkload, cfg);
    let r = r.unwrap();
    d.unwrap();
    assert_eq!(src.digest(), dst.digest());
    let a = r.auto.expect("auto report");
    let z = a.shares.iter().find(|s| s.candidate == "zstd:3").expect("zstd:3 is a candidate");
    // Whole probes only until the first decision with a link measurement, then samples.
    assert!(z.sampled >= 3 && z.batches * 2 < z.sampled, "{a:?}");
    assert_eq!(z.batches, z.probes, "{a:?}");
    assert_eq!(a.switches, 0, "{a:?}");
}

#[test]
fn auto_against_a_destination_restricted_to_one_method_uses_only_that_method() {
    let src = test_memory([2048, 256]);
    let dst = empty_like(&src);
    let cfg = SourceConfig { auto: Some(policy::AutoConfig::default()), ..Default::default() };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dcfg = DestinationConfig { codec: crate::codec::CodecSpec::new(named("zlib")), only: true, ..Default::default() };
    let (r, d) = std::thread::scope(|s| {
        let d = s.spawn(|| run_destination(&listener, &dst, &mut NoWorkload, &dcfg));
        let r = run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &cfg, &NoProgress);
        (r, d.join().unwrap())
    });
    let r = r.unwrap();
    d.unwrap();
    assert_eq!(src.digest(), dst.digest());
    let a = r.auto.expect("auto report");
    let names: Vec<&str> = a.shares.iter().map(|s| s.candidate.as_str()).collect();
    assert_eq!(names, ["none", "zlib:1"], "candidates against a zlib-only destination");
    assert!(a.shares[1].batches > 0, "{}", a.summary());
}

/// Keeps the source's round statistics.
#[derive(Default)]
struct Rounds(std::sync::Mutex<Vec<RoundStats>>);

impl ProgressSink for Rounds {
    fn update(&self, _p: &Progress) {}
    fn event(&self, e: &Event) {
        if let Event::RoundFinished(r) = e {
            self.0.lock().unwrap().push(r.clone());
        }
    }
}

#[test]
fn a_dirtying_migration_expects_a_measured_fixed_switchover_cost_and_reports_the_digests_apart() {
    if let Err(e) = UffdTracker::probe() {
        eprintln!("skipping: {e}");
        return;
    }
    let src = test_memory([8192, 1024]);
    let dst = empty_like(&src);
    let mut tracker = UffdTracker::new();
    let mut writer = Writer::start(src.clone(), 20);
    let limit = std::time::Duration::from_millis(100);
    let cfg = SourceConfig { codec: crate::codec::CodecSpec::new(named("zstd")), downtime_limit: limit, max_bandwidth: Some(200_000_000), ..Default::default() };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let rounds = Rounds::default();
    let (r, d) = std::thread::scope(|s| {
        let d = s.spawn(|| run_destination(&listener, &dst, &mut NoWorkload, &DestinationConfig::default()));
        (run_source(&addr, &src, &mut tracker, &mut writer, &cfg, &rounds), d.join().unwrap())
    });
    let r = r.unwrap();
    d.unwrap();
    assert!(writer.writes.load(Ordering::SeqCst) > 0);
    let rounds = rounds.0.into_inner().unwrap();
    assert_eq!(rounds.len() as u32, r.rounds - 1, "one RoundFinished per pre-copy round");
    for k in &rounds {
        // Every round's estimate has a fixed part (at least the dirty-log collection), which
        // holds at least this round's overhead, and the pages' part on top.
        assert!(k.fixed_ms > 0.0 && k.fixed_ms >= k.overhead_ms && k.overhead_ms >= 0.0, "{k:?}");
        assert!(k.expected_downtime_ms >= k.fixed_ms, "{k:?}");
    }
    // The switchover was decided on the last round's estimate, fixed part included.
    let last = rounds.last().unwrap();
    assert_eq!((r.expected_downtime_ms, r.expected_fixed_ms), (last.expected_downtime_ms, last.fixed_ms));
    assert!(r.expected_fixed_ms > 0.0 && r.expected_downtime_ms >= r.expected_fixed_ms, "{}", r.render());
    assert!(r.expected_downtime_ms <= limit.as_secs_f64() * 1000.0, "{}", r.render());
    assert!(rounds[..rounds.len() - 1].iter().all(|k| k.expected_downtime_ms > limit.as_secs_f64() * 1000.0), "switched at the first round that fit");
    // The downtime splits into the switchover and the two digests of verification.
    assert!(r.verified);
    assert!(r.digest_wait_ms >= 0.0 && r.verify_ms > 0.0);
    assert!((r.switchover_ms + r.digest_wait_ms + r.verify_ms - r.downtime_ms).abs() < 0.01, "{}", r.render());
    assert!(r.render().contains("switchover:"), "{}", r.render());
    assert_eq!(src.digest(), dst.digest());
}

#[test]
fn a_switchover_whose_fixed_cost_alone_exceeds_the_limit_does_not_converge_and_says_so() {
    // One dirty page is nothing to send, but collecting the dirty log (which the switchover
    // does again with the guest paused) takes 30 ms: a 20 ms limit cannot be met, and the
    // estimate knows it instead of switching over.
    let src = test_memory([64, 16]);
    let dst = empty_like(&src);
    let mut w = CountingWorkload::default();
    let cfg = SourceConfig { downtime_limit: std::time::Duration::from_millis(20), max_rounds: 3, ..Default::default() };
    // Every collection of the dirty log after the first takes 30 ms and finds one page dirty.
    let mut slow = ScriptedTracker { then: 1, delay: std::time::Duration::from_millis(30), ..ScriptedTracker::new([]) };
    let (r, _d) = migrate(&src, &dst, &mut slow, &mut w, cfg);
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("did not converge") && msg.contains("fixed part alone exceeds the limit"), "{msg}");
    assert_eq!(w.pauses, 0, "never paused: the source keeps running");
}
