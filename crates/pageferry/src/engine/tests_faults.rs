//! Fault injection between a real source and a real destination (both in this process) through
//! [`FaultProxy`]: links killed, dropped, stalled, bits flipped, around the switchover too. Each
//! case asserts the contract: both sides fail within the stall timeout plus a second, naming
//! the cause; the source's memory is untouched and its guest running again; the destination
//! neither completed nor resumed; an immediate retry to a fresh destination succeeds
//! byte-identical. At the switchover: never two running copies, never zero without
//! "outcome unknown". A fixed sample runs in CI; `random_faults_many_trials` (ignored) runs
//! many trials at random points.

use super::fault_proxy::{Action, At, Dir, Fault, FaultProxy};
use super::*;
use crate::codec::{CodecSpec, Method};
use crate::dirty::{DirtyError, DirtyPages, DirtyTracker};
use crate::memory::{GuestMemory, MemoryRegion, MmapRegion, PAGE_SIZE};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn named(name: &str) -> Method {
    Method::by_name(name).unwrap()
}

/// The stall timeout the tests run with.
const STALL: Duration = Duration::from_secs(2);
/// Detection bound: a silent link within STALL + 1 s; anything a peer can see sooner.
const BOUND: Duration = Duration::from_secs(3);
/// Beyond this a side is hung and the test fails.
const WATCHDOG: Duration = Duration::from_secs(30);

/// A guest writing its small "work" region (region 1) until paused.
struct Guest {
    running: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    pauses: u32,
    resumes: u32,
}

impl Guest {
    fn start(mem: &GuestMemory) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let idle = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let work = mem.region(1).unwrap().clone();
        let (r, i, w, s) = (running.clone(), idle.clone(), writes.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if !r.load(Ordering::SeqCst) {
                    i.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                i.store(false, Ordering::SeqCst);
                let n = w.fetch_add(1, Ordering::SeqCst);
                let page = n % work.pages();
                // SAFETY: a page inside the region.
                unsafe {
                    let p = work.host_ptr().add(page as usize * PAGE_SIZE) as *mut u64;
                    for k in 0..PAGE_SIZE / 8 {
                        p.add(k).write_volatile(n ^ k as u64);
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        Self { running, idle, writes, stop, pauses: 0, resumes: 0 }
    }

    /// Still writing? Waits up to 1 s for its next write: a running writer writes every
    /// 0.2 ms, but on a loaded machine (load 7 on 2 cores) it was once not scheduled for the
    /// 30 ms this used to wait, and a running guest read as paused. A paused one never writes.
    fn is_running(&self) -> bool {
        let before = self.writes.load(Ordering::SeqCst);
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
            if self.writes.load(Ordering::SeqCst) > before {
                return true;
            }
        }
        false
    }

    fn pause_now(&self) {
        self.running.store(false, Ordering::SeqCst);
        while !self.idle.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl SourceWorkload for Guest {
    fn pause(&mut self) -> Result<Vec<u8>, WorkloadError> {
        self.pauses += 1;
        self.pause_now();
        Ok(self.writes.load(Ordering::SeqCst).to_le_bytes().to_vec())
    }
    fn resume_after_failure(&mut self) -> Result<(), WorkloadError> {
        self.resumes += 1;
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Everything once, then the guest's work region every round (all it writes).
struct WorkTracker {
    first: bool,
}

impl DirtyTracker for WorkTracker {
    fn start(&mut self, _memory: &GuestMemory) -> Result<(), DirtyError> {
        self.first = true;
        Ok(())
    }
    fn collect(&mut self, into: &mut DirtyPages) -> Result<(), DirtyError> {
        if std::mem::take(&mut self.first) {
            for i in 0..into.regions().len() {
                into.region_mut(i).set_all();
            }
        } else {
            into.region_mut(1).set_all();
        }
        Ok(())
    }
    fn guest_may_write(&self) -> bool {
        true
    }
    fn name(&self) -> &'static str {
        "work-region"
    }
}

/// Records whether (and when) the destination resumed.
#[derive(Clone, Default)]
struct Resumed(Arc<Mutex<Option<Instant>>>);

impl DestinationWorkload for Resumed {
    fn resume(&mut self, _device_state: &[u8]) -> Result<(), WorkloadError> {
        *self.0.lock().unwrap() = Some(Instant::now());
        Ok(())
    }
}

fn fresh_like(m: &GuestMemory) -> GuestMemory {
    GuestMemory::new(m.regions().iter().map(|r| Arc::new(MmapRegion::anonymous(r.name(), r.len()).unwrap()) as Arc<dyn MemoryRegion>).collect()).unwrap()
}

fn static_digest(m: &GuestMemory) -> u128 {
    GuestMemory::new(vec![m.region(0).unwrap().clone()]).unwrap().digest()
}

fn source_config(method: Method) -> SourceConfig {
    SourceConfig {
        channels: 2,
        codec: CodecSpec::new(method),
        stall_timeout: STALL,
        connect_timeout: Duration::from_secs(5),
        downtime_limit: Duration::from_millis(50),
        ..Default::default()
    }
}

fn dest_config(method: Method) -> DestinationConfig {
    DestinationConfig { codec: CodecSpec::new(method), stall_timeout: STALL, accept_timeout: Duration::from_secs(10), ..Default::default() }
}

struct Outcome {
    src: Result<MigrationReport, MigrationError>,
    dst: Result<DestinationReport, MigrationError>,
    /// Time from the fault to each side's return.
    src_after: Option<Duration>,
    dst_after: Option<Duration>,
    dst_resumed: bool,
}

impl Outcome {
    fn show(&self) -> String {
        let e = |r: Result<String, String>| match r {
            Ok(s) => format!("ok ({s})"),
            Err(e) => format!("error: {e}"),
        };
        format!(
            "source {} after {:?}; destination {} after {:?}; destination resumed: {}",
            e(self.src.as_ref().map(|_| "completed".into()).map_err(|e| e.to_string())),
            self.src_after,
            e(self.dst.as_ref().map(|_| "completed".into()).map_err(|e| e.to_string())),
            self.dst_after,
            self.dst_resumed
        )
    }
}

type During = Box<dyn FnOnce(Arc<FaultProxy>) + Send>;

/// Migrate `src` through a proxy with `faults` (`during` may act on the proxy meanwhile); each
/// side on its own thread, a hang of either fails the test.
fn run_through(src: &GuestMemory, guest: Guest, method: Method, faults: Vec<Fault>, during: Option<During>) -> (Outcome, Guest) {
    let dst = fresh_like(src);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Arc::new(FaultProxy::start(&listener.local_addr().unwrap().to_string(), faults));
    let resumed = Resumed::default();
    let (dtx, drx) = crossbeam_channel::bounded(1);
    {
        let (mut w, dst, dcfg) = (resumed.clone(), dst.clone(), dest_config(method));
        std::thread::spawn(move || {
            let r = run_destination(&listener, &dst, &mut w, &dcfg);
            let _ = dtx.send((r, Instant::now()));
        });
    }
    if let Some(f) = during {
        let p = proxy.clone();
        std::thread::spawn(move || f(p));
    }
    let (stx, srx) = crossbeam_channel::bounded(1);
    {
        let (src, addr, scfg, mut guest) = (src.clone(), proxy.addr.clone(), source_config(method), guest);
        std::thread::spawn(move || {
            let r = run_source(&addr, &src, &mut WorkTracker { first: true }, &mut guest, &scfg, &NoProgress);
            let _ = stx.send((r, Instant::now(), guest));
        });
    }
    let (src_res, src_end, guest) = srx.recv_timeout(WATCHDOG).unwrap_or_else(|_| panic!("the source hung for {WATCHDOG:?}"));
    let (dst_res, dst_end) = drx.recv_timeout(WATCHDOG).unwrap_or_else(|_| panic!("the destination hung for {WATCHDOG:?}"));
    let fired = proxy.fired_at();
    let after = |end: Instant| fired.map(|f| end.saturating_duration_since(f));
    let dst_resumed = resumed.0.lock().unwrap().is_some();
    (Outcome { src: src_res, dst: dst_res, src_after: after(src_end), dst_after: after(dst_end), dst_resumed }, guest)
}

/// The source and destination memories and a running guest.
fn setup() -> (GuestMemory, Guest) {
    let src = super::tests::test_memory([2048, 32]);
    let guest = Guest::start(&src);
    (src, guest)
}

/// The failure contract for a fault before the commit point.
fn assert_failed_safely(case: &str, o: &Outcome, guest: &Guest, before: u128, src: &GuestMemory, src_needles: &[&str], dst_needles: &[&str]) {
    let show = o.show();
    let se = o.src.as_ref().err().unwrap_or_else(|| panic!("{case}: the source reported success: {show}")).to_string();
    let de = o.dst.as_ref().err().unwrap_or_else(|| panic!("{case}: the destination reported success: {show}")).to_string();
    for n in src_needles {
        assert!(se.contains(n), "{case}: source error does not name '{n}': {show}");
    }
    for n in dst_needles {
        assert!(de.contains(n), "{case}: destination error does not name '{n}': {show}");
    }
    assert!(o.src_after.is_some(), "{case}: the fault never fired: {show}");
    for (side, t) in [("source", o.src_after), ("destination", o.dst_after)] {
        let t = t.unwrap();
        assert!(t <= BOUND, "{case}: the {side} took {t:?} to fail (bound {BOUND:?}): {show}");
    }
    assert!(!o.dst_resumed, "{case}: the destination resumed a failed migration: {show}");
    assert!(!matches!(o.src, Err(MigrationError::OutcomeUnknown(_))), "{case}: outcome unknown before the commit point: {show}");
    assert_eq!(static_digest(src), before, "{case}: the source's memory changed");
    assert!(guest.is_running(), "{case}: the source's guest is not running after the failure: {show}");
    eprintln!("{case}: {show}");
}

/// An immediate retry to a fresh destination, without faults: completes, byte-identical.
fn assert_retry_succeeds(case: &str, src: &GuestMemory, guest: Guest, method: Method) -> Guest {
    let dst = fresh_like(src);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dcfg = dest_config(method);
    let mut guest = guest;
    let (r, d) = std::thread::scope(|s| {
        let d = s.spawn(|| run_destination(&listener, &dst, &mut NoWorkload, &dcfg));
        (run_source(&addr, src, &mut WorkTracker { first: true }, &mut guest, &source_config(method), &NoProgress), d.join().unwrap())
    });
    let both = format!("source: {:?}; destination: {:?}", r.as_ref().err().map(|e| e.to_string()), d.as_ref().err().map(|e| e.to_string()));
    let r = r.unwrap_or_else(|e| panic!("{case}: the retry failed: {e} ({both})"));
    d.unwrap_or_else(|e| panic!("{case}: the retry's destination failed: {e} ({both})"));
    assert!(r.verified);
    // The guest is paused after a completed migration: both memories are final.
    assert_eq!(src.digest(), dst.digest(), "{case}: the retry's destination differs");
    guest.resume_after_failure().unwrap(); // let it run again for the next case
    guest
}

fn up(conn: usize, at: u64, action: Action) -> Fault {
    Fault { conn, dir: Dir::Up, at: At::Byte(at), action }
}

fn frame(dir: Dir, ty: &'static str, nth: usize, action: Action) -> Fault {
    Fault { conn: 0, dir, at: At::Frame(ty, nth), action }
}

/// One case: the fault, what each side's error must name.
struct Case {
    name: &'static str,
    faults: Vec<Fault>,
    src: &'static [&'static str],
    dst: &'static [&'static str],
}

/// Offsets are past the handshake (a Hello frame is ~250 bytes) and inside round 0.
fn cases() -> Vec<Case> {
    vec![
        Case { name: "kill the destination (all links die)", faults: vec![up(1, 200_000, Action::KillAll)], src: &[], dst: &[] },
        Case { name: "drop data channel 1", faults: vec![up(2, 150_000, Action::Drop)], src: &[], dst: &["channel 1"] },
        Case { name: "drop the control channel", faults: vec![frame(Dir::Down, "round_done", 0, Action::Drop)], src: &["control"], dst: &["control"] },
        Case { name: "flip a bit in a data packet payload", faults: vec![up(1, 100_000, Action::Flip(3))], src: &["CRC32C"], dst: &["CRC32C", "channel 0"] },
        Case { name: "flip a bit in a control message (RoundDone)", faults: vec![frame(Dir::Down, "round_done", 0, Action::Flip(1))], src: &["control channel"], dst: &["control channel"] },
        Case { name: "stall data channel 0", faults: vec![up(1, 120_000, Action::Stall)], src: &[], dst: &["channel 0", "for 2 s"] },
        Case { name: "stall the control channel", faults: vec![frame(Dir::Down, "round_done", 0, Action::Stall)], src: &["control", "for 2 s"], dst: &[] },
    ]
}

#[test]
fn faults_before_the_commit_point_fail_promptly_and_safely() {
    let (src, mut guest) = setup();
    let before = static_digest(&src);
    for (i, case) in cases().into_iter().enumerate() {
        let method = if i % 2 == 0 { named("none") } else { named("zstd") };
        let name = format!("{} ({method})", case.name);
        let (o, g) = run_through(&src, guest, method, case.faults, None);
        assert_failed_safely(&name, &o, &g, before, &src, case.src, case.dst);
        guest = assert_retry_succeeds(&name, &src, g, method);
    }
}

/// Bytes of the handshake frame data channel `channel` sends (the first packet follows it).
fn data_hello_len(src: &GuestMemory, method: Method, channel: u16) -> u64 {
    let cfg = source_config(method);
    let h = crate::wire::Hello {
        versions: crate::wire::VersionRange::SUPPORTED,
        session: crate::wire::SessionId(0),
        role: crate::wire::Role::Data,
        channel,
        channels: cfg.channels as u16,
        method: method.code(),
        level: cfg.codec.level,
        regions: src.layout(),
        // What this source's data Hellos say (see `source_setup::open_session`).
        wants: crate::wire::Features { signed_levels: true, ..Default::default() },
        verify: cfg.verify,
    };
    let mut v = Vec::new();
    crate::wire::write_frame(&mut v, crate::wire::VersionRange::SUPPORTED.max, &crate::wire::Control::Hello(h), &[]).unwrap();
    v.len() as u64
}

#[test]
fn flipped_bits_in_packet_headers_are_detected() {
    let (src, mut guest) = setup();
    let before = static_digest(&src);
    // Each byte of the first packet's header on channel 0: magic, kind, flags, method, region,
    // counts, round, packet number, payload length.
    for (i, byte) in [0u64, 4, 5, 6, 8, 10, 12, 16, 20, 28].into_iter().enumerate() {
        let method = if i % 2 == 0 { named("none") } else { named("zstd") };
        let at = data_hello_len(&src, method, 0) + byte;
        let name = format!("flip a bit in packet header byte {byte} ({method})");
        let (o, g) = run_through(&src, guest, method, vec![up(1, at, Action::Flip(0))], None);
        assert_failed_safely(&name, &o, &g, before, &src, &[], &["channel 0"]);
        guest = g;
    }
    assert_retry_succeeds("header flips", &src, guest, named("zstd"));
}

#[test]
fn stalling_every_link_is_detected_on_both_sides() {
    let (src, guest) = setup();
    let before = static_digest(&src);
    // Data channels mid-round, and control at the destination's first keepalive.
    let faults = vec![up(1, 150_000, Action::Stall), up(2, 150_000, Action::Stall), frame(Dir::Down, "keepalive", 0, Action::Stall)];
    let (o, g) = run_through(&src, guest, named("none"), faults, None);
    assert_failed_safely("stall all links", &o, &g, before, &src, &["for 2 s"], &["for 2 s"]);
    assert_retry_succeeds("stall all links", &src, g, named("none"));
}

/// What the switchover may end in: the destination ran and the source stays paused (with
/// "outcome unknown" unless it learned of the success), or the destination did not run and
/// the source runs again (or, if it cannot know, stays paused saying so). Never both.
fn assert_switchover_safe(case: &str, o: &Outcome, guest: &Guest) {
    let show = o.show();
    let src_running = guest.is_running();
    assert!(!(o.dst_resumed && src_running), "{case}: TWO RUNNING COPIES: {show}");
    match (&o.src, o.dst_resumed) {
        (Ok(_), true) => {}
        (Ok(_), false) => panic!("{case}: the source reported success but the destination did not resume: {show}"),
        (Err(MigrationError::OutcomeUnknown(m)), _) => {
            assert!(!src_running, "{case}: outcome unknown but the source resumed: {show}");
            assert!(m.len() > 0);
        }
        (Err(_), true) => panic!("{case}: the destination runs but the source reported a plain failure: {show}"),
        (Err(_), false) => assert!(src_running, "{case}: failed before the commit point but the source did not resume: {show}"),
    }
    if !o.dst_resumed {
        assert!(o.dst.is_err(), "{case}: the destination reported success without resuming: {show}");
    }
    for (side, t) in [("source", o.src_after), ("destination", o.dst_after)] {
        if let Some(t) = t {
            assert!(t <= BOUND, "{case}: the {side} took {t:?} after the fault (bound {BOUND:?}): {show}");
        }
    }
    eprintln!("{case}: {show}");
}

#[test]
fn faults_at_the_switchover_never_leave_two_running_copies() {
    let (src, mut guest) = setup();
    let cases: Vec<(&str, Fault, bool)> = vec![
        // (name, fault, the destination runs afterwards)
        ("flip a bit in Finish", frame(Dir::Up, "finish", 0, Action::Flip(2)), false),
        ("drop the link at Finish", frame(Dir::Up, "finish", 0, Action::Drop), false),
        ("stall the link at Finish", frame(Dir::Up, "finish", 0, Action::Stall), false),
        ("flip a bit in Done", frame(Dir::Down, "done", 0, Action::Flip(2)), true),
        ("drop Done", frame(Dir::Down, "done", 0, Action::Drop), true),
        ("stall the link at Done", frame(Dir::Down, "done", 0, Action::Stall), true),
    ];
    for (i, (name, fault, dst_runs)) in cases.into_iter().enumerate() {
        let method = if i % 2 == 0 { named("none") } else { named("zstd") };
        let name = format!("{name} ({method})");
        let (o, g) = run_through(&src, guest, method, vec![fault], None);
        assert_switchover_safe(&name, &o, &g);
        assert_eq!(o.dst_resumed, dst_runs, "{name}: {}", o.show());
        if !o.dst_resumed && o.src.is_err() && !matches!(o.src, Err(MigrationError::OutcomeUnknown(_))) {
            assert!(g.is_running());
        }
        // An operator who learned the destination did not run resumes the source.
        let mut g = g;
        if !g.is_running() && !o.dst_resumed {
            g.resume_after_failure().unwrap();
        } else if !g.is_running() {
            g.resume_after_failure().unwrap(); // (test only: a fresh start for the next case)
        }
        guest = assert_retry_succeeds(&name, &src, g, method);
    }
}

#[test]
fn a_second_source_is_turned_away_promptly_while_the_first_completes() {
    let (src, mut guest) = setup();
    let dst = fresh_like(&src);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dcfg = dest_config(named("zstd"));
    // The first source is held to ~8 MB/s so it is still running when the second arrives.
    let slow = SourceConfig { max_bandwidth: Some(8_000_000), ..source_config(named("zstd")) };
    std::thread::scope(|s| {
        let d = s.spawn(|| run_destination(&listener, &dst, &mut NoWorkload, &dcfg));
        let first = s.spawn(|| run_source(&addr, &src, &mut WorkTracker { first: true }, &mut guest, &slow, &NoProgress));
        std::thread::sleep(Duration::from_millis(300));
        let other = super::tests::test_memory([64, 16]);
        let t = Instant::now();
        let e = run_source(&addr, &other, &mut crate::dirty::StaticTracker::new(), &mut NoWorkload, &source_config(named("zstd")), &NoProgress).unwrap_err();
        let took = t.elapsed();
        eprintln!("second source: {e} after {took:?}");
        assert!(took <= BOUND, "the second source waited {took:?}");
        first.join().unwrap().unwrap();
        d.join().unwrap().unwrap();
    });
    assert_eq!(src.digest(), dst.digest());
}

/// Many trials at random points for every kind of fault and method (long: run with
/// --ignored; `PAGEFERRY_FAULT_TRIALS`, default 200). Prints the matrix of docs/RELIABILITY.md.
#[test]
#[ignore]
fn random_faults_many_trials() {
    let trials: usize = std::env::var("PAGEFERRY_FAULT_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let (src, mut guest) = setup();
    let before = static_digest(&src);
    // (kind, method) -> (trials, failed safely, completed before the fault fired, switchover
    // outcomes: destination ran / neither ran, slowest detection)
    let mut stats: std::collections::BTreeMap<(String, String), (usize, usize, usize, usize, usize, Duration)> = Default::default();
    let methods = [named("none"), named("zlib"), named("zstd"), named("qatzip")];
    for t in 0..trials {
        let method = methods[t % methods.len()];
        let at = rand::random::<u64>() % 1_000_000 + 300;
        let conn = 1 + rand::random::<u64>() as usize % 2;
        let (kind, fault) = match rand::random::<u32>() % 7 {
            0 => ("kill all links", up(conn, at, Action::KillAll)),
            1 => ("drop a data channel", up(conn, at, Action::Drop)),
            2 => ("flip a bit (data)", up(conn, at, Action::Flip((at % 8) as u8))),
            3 => ("stall a data channel", up(conn, at, Action::Stall)),
            4 => {
                let (d, ty) = [(Dir::Down, "round_done"), (Dir::Up, "keepalive"), (Dir::Down, "keepalive")][(at % 3) as usize];
                ("flip a bit (control)", frame(d, ty, 0, Action::Flip((at % 8) as u8)))
            }
            5 => ("drop/stall control", frame(Dir::Down, "round_done", 0, [Action::Drop, Action::Stall][(at % 2) as usize].clone())),
            _ => {
                let (d, ty) = [(Dir::Up, "finish"), (Dir::Down, "done")][(at % 2) as usize];
                ("switchover frame", frame(d, ty, 0, [Action::Flip((at % 8) as u8), Action::Drop, Action::Stall][(at / 2 % 3) as usize].clone()))
            }
        };
        let name = format!("trial {t}: {kind} at {at} on conn {conn} ({method})");
        let (o, g) = run_through(&src, guest, method, vec![fault], None);
        let mut g = g;
        let e = stats.entry((kind.to_string(), method.to_string())).or_default();
        e.0 += 1;
        if o.src_after.is_none() {
            // The stream ended before the fault's offset: a plain successful migration.
            assert!(o.src.is_ok() && o.dst.is_ok(), "{name}: {}", o.show());
            e.2 += 1;
        } else if kind == "switchover frame" || o.dst_resumed || matches!(o.src, Err(MigrationError::OutcomeUnknown(_))) {
            assert_switchover_safe(&name, &o, &g);
            if o.dst_resumed {
                e.3 += 1;
            } else {
                e.4 += 1;
            }
        } else {
            assert_failed_safely(&name, &o, &g, before, &src, &[], &[]);
            e.1 += 1;
        }
        e.5 = e.5.max(o.src_after.unwrap_or_default().max(o.dst_after.unwrap_or_default()));
        if !g.is_running() {
            g.resume_after_failure().unwrap();
        }
        guest = assert_retry_succeeds(&name, &src, g, method);
    }
    println!("| fault | method | trials | failed safely, both sides | fault after completion | switchover: destination runs, source paused | switchover: neither runs (source says unknown) or source resumed | slowest detection |");
    println!("|---|---|---|---|---|---|---|---|");
    for ((k, m), (n, safe, late, dran, neither, worst)) in stats {
        println!("| {k} | {m} | {n} | {safe} | {late} | {dran} | {neither} | {:.2} s |", worst.as_secs_f64());
    }
    println!("every trial: no two running copies, source memory unchanged, retry to a fresh destination byte-identical ({trials} retries)");
}

/// Keeps the lifecycle statuses a side reports.
#[derive(Clone, Default)]
struct Statuses(Arc<Mutex<Vec<MigrationStatus>>>);

impl ProgressSink for Statuses {
    fn update(&self, _p: &Progress) {}
    fn event(&self, e: &Event) {
        if let Event::Status(s) = e {
            self.0.lock().unwrap().push(*s);
        }
    }
}

impl Statuses {
    /// Setup first, exactly one final status, and it is `last`.
    fn assert_ends(&self, side: &str, last: MigrationStatus) {
        let got = self.0.lock().unwrap().clone();
        let finals = got.iter().filter(|s| matches!(s, MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled)).count();
        assert!(got.first() == Some(&MigrationStatus::Setup) && got.last() == Some(&last) && finals == 1, "{side}: {got:?}");
    }
}

#[test]
fn cancel_on_either_side_ends_both_within_a_second() {
    let (src, mut guest) = setup();
    let before = static_digest(&src);
    for side in [Side::Source, Side::Destination] {
        let dst = fresh_like(&src);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        // Slow enough (~2 MB/s) to be mid-round when cancelled.
        let scfg = SourceConfig { max_bandwidth: Some(2_000_000), ..source_config(named("zstd")) };
        let (src_statuses, dst_statuses) = (Statuses::default(), Statuses::default());
        let dcfg = DestinationConfig { events: EventSink::new(dst_statuses.clone()), ..dest_config(named("zstd")) };
        let token = match side {
            Side::Source => scfg.cancel.clone(),
            Side::Destination => dcfg.cancel.clone(),
        };
        let resumed = Resumed::default();
        let mut w = resumed.clone();
        let (r, d, cancelled_at, src_end, dst_end) = std::thread::scope(|s| {
            let d = s.spawn(|| {
                let r = run_destination(&listener, &dst, &mut w, &dcfg);
                (r, Instant::now())
            });
            let c = s.spawn(move || {
                std::thread::sleep(Duration::from_millis(400));
                token.cancel();
                Instant::now()
            });
            let r = run_source(&addr, &src, &mut WorkTracker { first: true }, &mut guest, &scfg, &src_statuses);
            let src_end = Instant::now();
            let (d, dst_end) = d.join().unwrap();
            (r, d, c.join().unwrap(), src_end, dst_end)
        });
        let (se, de) = (r.unwrap_err(), d.unwrap_err());
        eprintln!("cancel on the {side}: source: {se} after {:?}; destination: {de} after {:?}", src_end - cancelled_at, dst_end - cancelled_at);
        for e in [&se, &de] {
            assert!(matches!(e, MigrationError::Cancelled { by } if *by == side), "{e:?}");
            assert_eq!(e.to_string(), format!("cancelled by the {side}"));
        }
        for t in [src_end - cancelled_at, dst_end - cancelled_at] {
            assert!(t <= Duration::from_secs(1), "cancel took {t:?}");
        }
        // Both sides' lifecycle ends in `cancelled` (not `failed`), whoever cancelled.
        src_statuses.assert_ends("source", MigrationStatus::Cancelled);
        dst_statuses.assert_ends("destination", MigrationStatus::Cancelled);
        assert!(resumed.0.lock().unwrap().is_none());
        assert_eq!(static_digest(&src), before);
        assert!(guest.is_running());
    }
    assert_retry_succeeds("after cancels", &src, guest, named("zstd"));
}

/// Seed corpora for the fuzz targets (fuzz/), cut from what a real migration sends: every
/// control message, real packet headers with their offsets, payloads of each codec.
/// `PAGEFERRY_FUZZ_CORPUS=fuzz/corpus cargo test ... write_fuzz_seed_corpora -- --ignored`
#[test]
#[ignore]
fn write_fuzz_seed_corpora() {
    use crate::codec::{self, conformance};
    use crate::wire::{self, Control, PacketHeader, PacketKind};
    let root = std::path::PathBuf::from(std::env::var("PAGEFERRY_FUZZ_CORPUS").unwrap_or_else(|_| "fuzz/corpus".into()));
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let d = root.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    let src = super::tests::test_memory([256, 32]);
    let h = crate::wire::Hello {
        versions: crate::wire::VersionRange::SUPPORTED,
        session: crate::wire::SessionId::random(),
        role: crate::wire::Role::Control,
        channel: 0,
        channels: 2,
        method: named("zstd").code(),
        level: 1,
        regions: src.layout(),
        wants: Default::default(),
        verify: true,
    };
    let msgs = [
        (Control::Hello(h), vec![]),
        (Control::Welcome { version: crate::wire::PROTOCOL_VERSION, fresh_destination: true, capabilities: Default::default() }, vec![]),
        (Control::Refuse { reason: "compression method mismatch".into() }, vec![]),
        (Control::RoundDone { round: 3, pages: 4242 }, vec![]),
        (Control::Finish { round: 4, digest: Some(format!("{:032x}", src.digest())) }, b"device state".to_vec()),
        (Control::Done { report: DestinationReport::default() }, vec![]),
        (Control::Abort { reason: "disk full".into() }, vec![]),
        (Control::Cancel { by: "source".into() }, vec![]),
        (Control::Keepalive, vec![]),
    ];
    for (i, (m, blob)) in msgs.iter().enumerate() {
        let mut v = Vec::new();
        wire::write_frame(&mut v, crate::wire::PROTOCOL_VERSION, m, blob).unwrap();
        put("control_frame", &format!("msg{i}"), &v);
    }
    let bytes = |r: usize| unsafe { std::slice::from_raw_parts(src.region(r).unwrap().host_ptr(), src.region(r).unwrap().len() as usize) };
    for (name, method) in [("decode_zlib", named("zlib")), ("decode_zstd", named("zstd")), ("decode_qatzip", named("qatzip"))] {
        let mut spec = CodecSpec::new(method);
        spec.qatzip.provider = crate::codec::qatzip::Provider::Cpu;
        let mut c = codec::open(&spec).unwrap();
        let text = conformance::sample_text(128 * PAGE_SIZE, 3);
        for (i, input) in [&bytes(0)[..128 * PAGE_SIZE], &text[..], &text[..PAGE_SIZE], &bytes(1)[..8 * PAGE_SIZE]].into_iter().enumerate() {
            let mut out = vec![0u8; c.max_compressed_len(input.len()).max(input.len())];
            if let Ok(Some(n)) = c.compress(input, &mut out) {
                let pages = (input.len() / PAGE_SIZE - 1) as u8;
                put(name, &format!("seed{i}"), &[&[pages][..], &out[..n]].concat());
            }
        }
    }
    // Packet headers: region pages (u16, minus one) then header and offsets.
    let pages_hdr = PacketHeader { kind: PacketKind::Pages, raw: false, method: named("zstd").code(), region: 0, normal: 3, zero: 1, round: 0, packet_num: 7, payload_len: 900 };
    let offs: Vec<u8> = [1u32, 2, 3, 9].iter().flat_map(|p| p.to_le_bytes()).collect();
    put("packet_header", "pages", &[&255u16.to_le_bytes()[..], &pages_hdr.encode(), &offs].concat());
    put("packet_header", "sync", &[&255u16.to_le_bytes()[..], &PacketHeader::sync(named("zstd").code(), 2, 5).encode()].concat());
}

#[test]
fn a_delay_under_the_stall_timeout_is_not_a_failure() {
    // Channel 0 holds its bytes 1.5 s mid-round (under the 2 s stall timeout) while channel 1
    // runs ahead: the data arrives reordered across channels, the migration completes, exact.
    // (Success is verified in-band: the digests of both memories were compared.)
    let (src, mut guest) = setup();
    for method in [named("none"), named("zstd")] {
        let (o, g) = run_through(&src, guest, method, vec![up(1, 100_000, Action::Delay(Duration::from_millis(1500)))], None);
        assert!(o.src.is_ok() && o.dst.is_ok(), "{method}: {}", o.show());
        assert!(o.src.as_ref().unwrap().verified);
        assert!(o.src_after.is_some(), "the delay never happened");
        assert!(o.dst_resumed);
        guest = g;
        guest.resume_after_failure().unwrap();
    }
}
