//! Hostile-input tests, second half: handshakes against the real source and destination
//! (refusals, versions, limits) and what follows them; the helpers live in `tests_hostile.rs`.

use super::*;

// ---- handshakes with the real source ----

fn refused_reason(e: &MigrationError) -> &str {
    match e {
        MigrationError::Refused(r) => r,
        other => panic!("expected Refused, got {other:?}: {other}"),
    }
}

/// The accept timeout of a destination that only wrong sources reach.
const SHORT_ACCEPT: Duration = Duration::from_secs(1);

/// A destination that refused `n` sources and accepted none ends at its accept timeout with
/// the last refusal, `reason` (what that source was told).
fn expect_gave_up(de: &MigrationError, n: usize, reason: &str) {
    let msg = refused_reason(de);
    let head = format!("no source accepted within {SHORT_ACCEPT:?}: refused {n} connection(s), the last from 127.0.0.1:");
    assert!(msg.starts_with(&head), "'{msg}' does not start with '{head}'");
    assert!(msg.ends_with(&format!(": {reason}")), "'{msg}' does not end with the last refusal '{reason}'");
}

/// A destination like [`spawn_destination`]'s (changed by `tweak`) that records its events.
fn recording_destination(memory: &GuestMemory, method: Method, tweak: impl FnOnce(&mut DestinationConfig)) -> (String, Receiver<DestResult>, Arc<Events>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let events = Arc::new(Events::default());
    let mut config = DestinationConfig { events: EventSink(events.clone()), ..dest_config(method) };
    tweak(&mut config);
    (addr, spawn_destination_with(listener, memory.clone(), Recorder::default(), config), events)
}

/// The refusals a destination reported, once it has reported `n` (a test failure if it does
/// not within the watchdog).
fn refusals(events: &Events, n: usize) -> Vec<String> {
    let until = std::time::Instant::now() + WATCHDOG;
    loop {
        let got: Vec<String> = events
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::ConnectionRefused { reason, .. } => Some(reason.clone()),
                _ => None,
            })
            .collect();
        if got.len() >= n || std::time::Instant::now() > until {
            assert_eq!(got.len(), n, "refusals reported: {got:?}");
            return got;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// After wrong sources were refused with `reasons` (what each was told): the destination
/// reported each, wrote nothing, kept listening, and the right source (`scfg`, memory of
/// [`LAYOUT`]) now migrates byte-identical to the same listener.
fn the_right_source_follows(addr: &str, dest: &Receiver<DestResult>, events: &Events, dst: &GuestMemory, reasons: &[&str], scfg: SourceConfig) {
    assert_eq!(refusals(events, reasons.len()), reasons, "each refusal is reported with the reason its source got");
    assert!(dest.try_recv().is_err(), "the destination ended after a refused source");
    Model::canary().check(dst, &[]);
    let src = super::tests::test_memory([64, 16]);
    let r = run_source(addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &scfg, &NoProgress);
    let r = r.unwrap_or_else(|e| panic!("the right source, after a refused one: {e}"));
    let d = await_destination(dest).unwrap_or_else(|e| panic!("the destination, after a refused source: {e}"));
    assert_eq!(r.verified, scfg.verify);
    assert_eq!(d.verified, scfg.verify);
    assert_eq!(src.digest(), dst.digest(), "destination differs from the right source");
}

#[test]
fn method_mismatch_is_refused_with_the_same_reason_on_both_sides() {
    // Only wrong sources come: the destination ends at its accept timeout, naming the last.
    let src = super::tests::test_memory([64, 16]);
    let dst = memory_filled(&LAYOUT, CANARY);
    let (addr, dest, _) = recording_destination(&dst, named("zlib"), |c| c.accept_timeout = SHORT_ACCEPT);
    let se = run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &source_config(named("zstd"), 2), &NoProgress).unwrap_err();
    let reason = refused_reason(&se).to_string();
    assert!(reason.contains("compression method mismatch") && reason.contains("zstd") && reason.contains("zlib"), "{reason}");
    expect_gave_up(&await_destination(&dest).unwrap_err(), 1, &reason);
    Model::canary().check(&dst, &[]);
}

#[test]
fn a_wrong_method_source_is_refused_and_the_right_one_then_migrates() {
    let dst = memory_filled(&LAYOUT, CANARY);
    let (addr, dest, events) = recording_destination(&dst, named("zlib"), |_| {});
    let src = super::tests::test_memory([64, 16]);
    let se = run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &source_config(named("zstd"), 2), &NoProgress).unwrap_err();
    let reason = refused_reason(&se).to_string();
    assert!(reason.contains("compression method mismatch"), "{reason}");
    the_right_source_follows(&addr, &dest, &events, &dst, &[&reason], source_config(named("zlib"), 2));
}

#[test]
fn layout_mismatch_is_refused_with_the_same_reason_on_both_sides() {
    // Two wrong sources (a method, then a layout): both counted, the last one named.
    let dst = memory_filled(&LAYOUT, CANARY);
    let (addr, dest, _) = recording_destination(&dst, named("none"), |c| c.accept_timeout = SHORT_ACCEPT);
    let other = super::tests::test_memory([64, 16]);
    run_source(&addr, &other, &mut StaticTracker::new(), &mut NoWorkload, &source_config(named("zstd"), 1), &NoProgress).unwrap_err();
    let src = super::tests::test_memory([64, 17]);
    let se = run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &source_config(named("none"), 1), &NoProgress).unwrap_err();
    let reason = refused_reason(&se).to_string();
    assert!(reason.contains("memory layout mismatch"), "{reason}");
    assert!(reason.contains(&format!("ram1: {} bytes", 17 * PAGE_SIZE)) && reason.contains(&format!("ram1: {} bytes", 16 * PAGE_SIZE)), "{reason}");
    expect_gave_up(&await_destination(&dest).unwrap_err(), 2, &reason);
    Model::canary().check(&dst, &[]);
}

#[test]
fn a_source_of_another_layout_is_refused_and_the_right_one_then_migrates() {
    let dst = memory_filled(&LAYOUT, CANARY);
    let (addr, dest, events) = recording_destination(&dst, named("none"), |_| {});
    let src = super::tests::test_memory([64, 17]);
    let se = run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &source_config(named("none"), 2), &NoProgress).unwrap_err();
    let reason = refused_reason(&se).to_string();
    assert!(reason.contains("memory layout mismatch"), "{reason}");
    the_right_source_follows(&addr, &dest, &events, &dst, &[&reason], source_config(named("none"), 2));
}

/// Send a control Hello offering `versions` to `addr`; the destination's answer and the
/// version of its frame.
fn send_hello_with_versions(addr: &str, versions: VersionRange) -> (Control, u16) {
    let mut ctl = connect(addr);
    let mut h = match hello(SessionId::random(), Role::Control, 0, 1, named("none"), memory_filled(&LAYOUT, 0).layout()) {
        Control::Hello(h) => h,
        _ => unreachable!(),
    };
    h.versions = versions;
    wire::write_frame(&mut ctl, versions.max, &Control::Hello(h), &[]).unwrap();
    let reply = wire::read_frame(&mut ctl).unwrap();
    (reply.msg, reply.version)
}

/// A destination (that gives up after [`SHORT_ACCEPT`]) answering a control Hello offering
/// `versions`: its answer, the version of its frame, and its result.
fn hello_with_versions(versions: VersionRange) -> (Control, u16, Receiver<DestResult>) {
    let dst = memory_filled(&LAYOUT, CANARY);
    let (addr, dest, _) = recording_destination(&dst, named("none"), |c| c.accept_timeout = SHORT_ACCEPT);
    let (msg, version) = send_hello_with_versions(&addr, versions);
    (msg, version, dest)
}

/// The Refuse in `reply` names every needle, and the destination ends with it as the last
/// (and only) refusal at its accept timeout.
fn expect_refused(reply: Control, dest: &Receiver<DestResult>, needles: &[&str]) {
    let reason = match reply {
        Control::Refuse { reason } => reason,
        other => panic!("expected Refuse, got {other:?}"),
    };
    for n in needles {
        assert!(reason.contains(n), "'{reason}' does not mention '{n}'");
    }
    expect_gave_up(&await_destination(dest).unwrap_err(), 1, &reason);
}

#[test]
fn protocol_version_mismatch_is_refused() {
    // A Hello of a later version range with nothing in common, parsed and refused naming both.
    let (reply, _, dest) = hello_with_versions(VersionRange { min: 98, max: 99 });
    expect_refused(reply, &dest, &["protocol version mismatch", "source speaks versions 98..=99", &format!("destination speaks version {PROTOCOL_VERSION}")]);
}

#[test]
fn a_source_two_versions_behind_is_refused_naming_both() {
    // N-2 against this build's N = 2 (its Hello frame is of version 0: refused unparsed).
    let (reply, _, dest) = hello_with_versions(VersionRange { min: 0, max: 0 });
    expect_refused(reply, &dest, &["protocol version mismatch: source speaks version 0, destination speaks version 2"]);
}

#[test]
fn sources_of_versions_we_cannot_speak_are_refused_and_the_right_one_then_migrates() {
    // One refused unparsed (a version-0 frame), one parsed (98..=99): the listener stays.
    let dst = memory_filled(&LAYOUT, CANARY);
    let (addr, dest, events) = recording_destination(&dst, named("none"), |_| {});
    let mut reasons = Vec::new();
    for versions in [VersionRange { min: 0, max: 0 }, VersionRange { min: 98, max: 99 }] {
        match send_hello_with_versions(&addr, versions).0 {
            Control::Refuse { reason } => {
                assert!(reason.contains("protocol version mismatch"), "{reason}");
                // Reported in order: wait for this one before the next peer connects.
                reasons.push(reason);
                refusals(&events, reasons.len());
            }
            other => panic!("expected Refuse, got {other:?}"),
        }
    }
    let reasons: Vec<&str> = reasons.iter().map(String::as_str).collect();
    the_right_source_follows(&addr, &dest, &events, &dst, &reasons, source_config(named("none"), 2));
}

#[test]
fn a_newer_source_is_answered_in_the_highest_common_version() {
    // A build of version N+1 speaks N..=N+1; this destination (N) agrees on N, says so in the
    // frame header and the Welcome, and announces what it decodes.
    let (reply, frame_version, _dest) = hello_with_versions(VersionRange { min: PROTOCOL_VERSION, max: PROTOCOL_VERSION + 1 });
    assert_eq!(frame_version, PROTOCOL_VERSION);
    match reply {
        Control::Welcome { version, capabilities, .. } => {
            assert_eq!(version, PROTOCOL_VERSION);
            assert_eq!(capabilities.methods, vec![named("none").caps()]);
            // Postcopy is offered (the memory is checked when a source asks for it).
            assert_eq!(capabilities.features, wire::Features { postcopy: true, auto: true, ..wire::Features::default() });
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
}

#[test]
fn a_version_1_source_gets_a_refusal_it_can_read() {
    // Version 1's Hello: the same frame layout, a version-1 header, a body v2 cannot parse.
    let dst = memory_filled(&LAYOUT, CANARY);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dest = spawn_destination_with(listener, dst.clone(), Recorder::default(), DestinationConfig { accept_timeout: SHORT_ACCEPT, ..dest_config(named("none")) });
    let body = br#"{"type":"hello","version":1,"session":"0123456789abcdef0123456789abcdef","role":"control","channel":0,"channels":1,"method":"none","level":0,"regions":[["ram0",262144],["ram1",65536]]}"#;
    let mut frame = Vec::new();
    frame.extend_from_slice(b"PFCT");
    frame.extend_from_slice(&1u16.to_le_bytes());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&0u32.to_le_bytes());
    frame.extend_from_slice(body);
    let crc = crc32c::crc32c(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    let mut ctl = connect(&addr);
    ctl.write_all(&frame).unwrap();
    // What a v1 peer reads: magic, any version, JSON {"type":"refuse","reason":...}, CRC.
    let mut hdr = [0u8; 14];
    std::io::Read::read_exact(&mut ctl, &mut hdr).unwrap();
    assert_eq!(&hdr[0..4], b"PFCT");
    let body_len = u32::from_le_bytes(hdr[6..10].try_into().unwrap()) as usize;
    let mut body = vec![0u8; body_len + 4];
    std::io::Read::read_exact(&mut ctl, &mut body).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body[..body_len]).unwrap();
    assert_eq!(v["type"], "refuse");
    let reason = v["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("source speaks version 1, destination speaks version 2"), "{reason}");
    expect_gave_up(&await_destination(&dest).unwrap_err(), 1, &reason);
}

/// Relay connections to `upstream`; before relaying the second one (the first data channel,
/// i.e. after the control handshake), make three stray connections to the destination: a data
/// channel 0 of another session, a control channel of another session, and a non-pageferry
/// peer. Each must be dropped without a Welcome. Returns the address to connect to and the
/// strays' fates.
fn proxy_with_strays(upstream: String, connections: usize, layout: Vec<(String, u64)>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fates = Arc::new(Mutex::new(Vec::new()));
    let f = fates.clone();
    std::thread::spawn(move || {
        for i in 0..connections {
            let Ok((down, _)) = listener.accept() else { return };
            if i == 1 {
                let stray = SessionId::random();
                let hellos = [
                    wire_bytes(&hello(stray, Role::Data, 0, 1, named("zstd"), layout.clone())),
                    wire_bytes(&hello(stray, Role::Control, 0, 1, named("zstd"), layout.clone())),
                    b"GET / HTTP/1.1\r\nHost: pageferry\r\n\r\n".to_vec(),
                ];
                for bytes in hellos {
                    let mut s = connect(&upstream);
                    s.write_all(&bytes).unwrap();
                    let fate = match wire::read_frame_at(&mut s, PROTOCOL_VERSION) {
                        Ok((m, _)) => format!("answered {m:?}"),
                        Err(e) => format!("dropped: {e}"),
                    };
                    f.lock().unwrap().push(fate);
                }
            }
            let up = connect(&upstream);
            down.set_nodelay(true).unwrap();
            relay(down, up);
        }
    });
    (addr, fates)
}

fn wire_bytes(msg: &Control) -> Vec<u8> {
    let mut v = Vec::new();
    wire::write_frame(&mut v, PROTOCOL_VERSION, msg, &[]).unwrap();
    v
}

fn relay(a: TcpStream, b: TcpStream) {
    for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
        from.set_read_timeout(None).unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    }
}

#[test]
fn stray_connections_during_setup_are_dropped() {
    let src = super::tests::test_memory([300, 50]);
    let dst = memory_filled(&[300, 50], CANARY);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest_addr = listener.local_addr().unwrap().to_string();
    let dest = spawn_destination(listener, dst.clone(), named("zstd"), Recorder::default());
    let channels = 2;
    let (addr, fates) = proxy_with_strays(dest_addr, 1 + channels, src.layout());
    let r = run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &source_config(named("zstd"), channels), &NoProgress);
    let r = r.unwrap_or_else(|e| panic!("source: {e}"));
    await_destination(&dest).unwrap_or_else(|e| panic!("destination: {e}"));
    assert!(r.verified);
    assert_eq!(src.digest(), dst.digest(), "destination differs from the source");
    let fates = fates.lock().unwrap().clone();
    assert_eq!(fates.len(), 3, "{fates:?}");
    for f in &fates {
        // Closed, or reset when the destination hung up on unread bytes.
        assert!(f.starts_with("dropped"), "a stray connection was not dropped: {f}");
    }
}

#[test]
fn unreachable_destination_is_a_connect_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let src = super::tests::test_memory([64, 16]);
    let cfg = SourceConfig { connect_timeout: Duration::from_millis(200), ..source_config(named("none"), 1) };
    let before = src.digest();
    let e = run_source(&format!("127.0.0.1:{port}"), &src, &mut StaticTracker::new(), &mut NoWorkload, &cfg, &NoProgress).unwrap_err();
    assert!(matches!(e, MigrationError::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains(&format!("cannot connect to 127.0.0.1:{port}")), "{e}");
    assert_eq!(src.digest(), before);
}

/// A source that connects its control channel but never its data channels: the destination
/// gives up after its accept timeout instead of waiting forever.
#[test]
fn missing_data_channels_time_out() {
    let memory = memory_filled(&LAYOUT, CANARY);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let config = DestinationConfig { codec: CodecSpec::new(named("none")), accept_timeout: Duration::from_millis(500), stall_timeout: IO, ..Default::default() };
    let m = memory.clone();
    std::thread::spawn(move || {
        let _ = tx.send(run_destination(&listener, &m, &mut NoWorkload, &config));
    });
    let mut ctl = connect(&addr);
    wire::write_frame(&mut ctl, PROTOCOL_VERSION, &hello(SessionId::random(), Role::Control, 0, 2, named("none"), memory.layout()), &[]).unwrap();
    expect_welcome(&mut ctl);
    let e = await_destination(&rx).unwrap_err().to_string();
    assert!(e.contains("timed out") && e.contains("0 of 2 data channels"), "{e}");
}

// ---- verification agreement and announced sizes ----

#[test]
fn unverified_source_is_refused_unless_the_destination_agrees() {
    let src = super::tests::test_memory([64, 16]);
    let scfg = SourceConfig { verify: false, ..source_config(named("zstd"), 2) };
    // The default destination requires the digest: refused, the same reason on both sides
    // (the destination's at its accept timeout, when no other source came).
    let dst = memory_filled(&LAYOUT, CANARY);
    let (addr, dest, _) = recording_destination(&dst, named("zstd"), |c| c.accept_timeout = SHORT_ACCEPT);
    let se = run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &scfg, &NoProgress).unwrap_err();
    assert!(se.to_string().contains("--no-verify"), "{se}");
    expect_gave_up(&await_destination(&dest).unwrap_err(), 1, refused_reason(&se));
    Model::canary().check(&dst, &[]);
    // A destination that agreed to skip it: completes, and says it was not verified.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dcfg = DestinationConfig { codec: CodecSpec::new(named("zstd")), require_verify: false, accept_timeout: IO, ..Default::default() };
    let (r, d) = std::thread::scope(|s| {
        let d = s.spawn(|| run_destination(&listener, &dst, &mut NoWorkload, &dcfg));
        (run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &scfg, &NoProgress), d.join().unwrap())
    });
    assert!(!r.unwrap().verified);
    assert!(!d.unwrap().verified);
    assert_eq!(src.digest(), dst.digest());
}

#[test]
fn an_unverified_source_is_refused_and_a_verifying_one_then_migrates() {
    let dst = memory_filled(&LAYOUT, CANARY);
    let (addr, dest, events) = recording_destination(&dst, named("zstd"), |_| {});
    let src = super::tests::test_memory([64, 16]);
    let scfg = SourceConfig { verify: false, ..source_config(named("zstd"), 2) };
    let se = run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &scfg, &NoProgress).unwrap_err();
    let reason = refused_reason(&se).to_string();
    assert!(reason.contains("--no-verify"), "{reason}");
    the_right_source_follows(&addr, &dest, &events, &dst, &[&reason], source_config(named("zstd"), 2));
}

#[test]
fn finish_without_digest_after_announcing_verification_fails() {
    let mut ev = Evil::start(named("none"), 1);
    let s = ev.sync(0, 0);
    ev.send(0, &s);
    ev.expect_round_done(0);
    ev.finish(0, None, b"state");
    ev.expect_failure(&["no memory digest", "announced verification"]);
}

#[test]
fn oversized_announcements_are_refused_before_anything_is_allocated() {
    let many: Vec<(String, u64)> = (0..=wire::MAX_REGIONS).map(|i| (format!("r{i}"), 4096)).collect();
    let cases: Vec<(Vec<(String, u64)>, &str)> = vec![
        (many, "memory regions"),
        (vec![("ram0".into(), 1 << 62)], "2^32 pages"),
        (vec![("ram0".into(), (16u64 << 40) + 4096)], "2^32 pages"),
        (vec![("ram0".into(), 4095)], "multiple of"),
        (vec![("ram0".into(), 1 << 40), ("ram1".into(), 1 << 40)], "at most"),
        (vec![("x".repeat(300), 4096)], "region name"),
    ];
    for (regions, needle) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let provided = std::sync::atomic::AtomicBool::new(false);
        let dcfg = DestinationConfig { accept_timeout: SHORT_ACCEPT, max_memory: Some(1 << 40), ..Default::default() };
        let (reason, de) = std::thread::scope(|s| {
            let d = s.spawn(|| {
                let mut provide = |_: &[(String, u64)]| -> Result<GuestMemory, String> {
                    provided.store(true, std::sync::atomic::Ordering::SeqCst);
                    Err("must not be called".into())
                };
                run_destination_with(&listener, &mut provide, &mut NoWorkload, &dcfg)
            });
            let mut ctl = connect(&addr);
            wire::write_frame(&mut ctl, PROTOCOL_VERSION, &hello(SessionId::random(), Role::Control, 0, 1, named("none"), regions), &[]).unwrap();
            let reason = match wire::read_frame(&mut ctl).unwrap().msg {
                Control::Refuse { reason } => reason,
                other => panic!("expected Refuse, got {other:?}"),
            };
            assert!(reason.contains(needle), "'{reason}' does not mention '{needle}'");
            (reason, d.join().unwrap())
        });
        expect_gave_up(&de.err().expect("the destination refused the only source"), 1, &reason);
        assert!(!provided.load(std::sync::atomic::Ordering::SeqCst), "memory was provided for a refused announcement ({needle})");
    }
}

/// A region that counts the live ones it belongs to.
struct Counted(MmapRegion, Arc<std::sync::atomic::AtomicUsize>);

impl Counted {
    fn new(name: &str, len: u64, live: &Arc<std::sync::atomic::AtomicUsize>) -> Arc<dyn MemoryRegion> {
        live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Arc::new(Counted(MmapRegion::anonymous(name, len).unwrap(), live.clone()))
    }
}

// SAFETY: delegates to an MmapRegion, which upholds the contract.
unsafe impl MemoryRegion for Counted {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn host_ptr(&self) -> *mut u8 {
        self.0.host_ptr()
    }
    fn is_fresh_zeroed(&self) -> bool {
        self.0.is_fresh_zeroed()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Run `run_destination_with(provide)` on a scoped thread while `sources` runs against its
/// address; the destination's result (with the memory it returned) and the sources'.
fn with_provider<T: Send>(
    config: DestinationConfig,
    provide: &mut (dyn FnMut(&[(String, u64)]) -> Result<GuestMemory, String> + Send),
    sources: impl FnOnce(&str) -> T + Send,
) -> (Result<(DestinationReport, GuestMemory), MigrationError>, T) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::scope(|s| {
        let d = s.spawn(move || run_destination_with(&listener, provide, &mut NoWorkload, &config));
        let t = sources(&addr);
        (d.join().unwrap(), t)
    })
}

#[test]
fn a_handshake_refused_after_provide_drops_that_memory_before_the_next_source_is_served() {
    // The provider makes memory of LAYOUT whatever the source announces (a destination of a
    // fixed size): a source of another layout is refused after provide (layout mismatch).
    // That memory must be gone before provide is called for the next source, which migrates.
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut calls = Vec::new();
    let mut provide = |regions: &[(String, u64)]| -> Result<GuestMemory, String> {
        calls.push((regions.to_vec(), live.load(std::sync::atomic::Ordering::SeqCst)));
        let made = LAYOUT.iter().enumerate().map(|(i, &n)| Counted::new(&format!("ram{i}"), n * PAGE_SIZE as u64, &live)).collect();
        Ok(GuestMemory::new(made).unwrap())
    };
    let src = super::tests::test_memory([64, 16]);
    let config = DestinationConfig { accept_timeout: IO, stall_timeout: IO, ..Default::default() };
    let (d, (wrong, right)) = with_provider(config, &mut provide, |addr| {
        let other = super::tests::test_memory([64, 17]);
        let wrong = run_source(addr, &other, &mut StaticTracker::new(), &mut NoWorkload, &source_config(named("none"), 1), &NoProgress);
        (wrong, run_source(addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &source_config(named("zstd"), 2), &NoProgress))
    });
    let we = wrong.unwrap_err();
    assert!(refused_reason(&we).contains("memory layout mismatch"), "{we}");
    assert!(right.unwrap_or_else(|e| panic!("the right source: {e}")).verified);
    let (report, memory) = d.unwrap_or_else(|e| panic!("the destination: {e}"));
    assert!(report.verified);
    assert_eq!(memory.digest(), src.digest());
    let live_at: Vec<usize> = calls.iter().map(|c| c.1).collect();
    assert_eq!(live_at, [0, 0], "regions alive when provide was called (the refused source's must be dropped first)");
    assert_eq!(calls[1].0, src.layout(), "the second call is for the right source");
    drop(memory);
    assert_eq!(live.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn a_provider_refusal_keeps_the_listener_and_a_smaller_source_then_migrates() {
    // A provider without room for the first source (as `recv` on a full file system) refuses
    // it naming both sizes; the source is told, and the next, smaller one migrates.
    let room = LAYOUT.iter().sum::<u64>() * PAGE_SIZE as u64;
    let mut provide = |regions: &[(String, u64)]| -> Result<GuestMemory, String> {
        let need: u64 = regions.iter().map(|r| r.1).sum();
        if need > room {
            return Err(format!("/images/guest.img: needs {need} bytes, the file system has {room} bytes free"));
        }
        Ok(GuestMemory::new(regions.iter().map(|(n, l)| Arc::new(MmapRegion::anonymous(n, *l).unwrap()) as Arc<dyn MemoryRegion>).collect()).unwrap())
    };
    let src = super::tests::test_memory([64, 16]);
    let events = Arc::new(Events::default());
    let config = DestinationConfig { accept_timeout: IO, stall_timeout: IO, events: EventSink(events.clone()), ..Default::default() };
    let (d, (big, right)) = with_provider(config, &mut provide, |addr| {
        let big = super::tests::test_memory([64, 64]);
        let r = run_source(addr, &big, &mut StaticTracker::new(), &mut NoWorkload, &source_config(named("zstd"), 2), &NoProgress);
        (r, run_source(addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &source_config(named("zstd"), 2), &NoProgress))
    });
    let be = big.unwrap_err();
    let reason = refused_reason(&be).to_string();
    assert_eq!(reason, format!("/images/guest.img: needs {} bytes, the file system has {room} bytes free", 128 * PAGE_SIZE));
    assert_eq!(refusals(&events, 1), [reason]);
    right.unwrap_or_else(|e| panic!("the smaller source: {e}"));
    let (_, memory) = d.unwrap_or_else(|e| panic!("the destination: {e}"));
    assert_eq!(memory.digest(), src.digest());
}

#[test]
fn a_handshake_frame_over_the_limit_is_dropped_unread() {
    // A frame header announcing a 37 MB Hello: dropped without reading (or allocating) the
    // body; the real source that follows still migrates.
    let src = super::tests::test_memory([64, 16]);
    let dst = memory_filled(&LAYOUT, CANARY);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dest = spawn_destination(listener, dst.clone(), named("none"), Recorder::default());
    let mut evil = connect(&addr);
    let mut hdr = Vec::new();
    hdr.extend_from_slice(b"PFCT");
    hdr.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hdr.extend_from_slice(&(37u32 << 20).to_le_bytes());
    hdr.extend_from_slice(&0u32.to_le_bytes());
    evil.write_all(&hdr).unwrap();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut evil, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the destination answered an oversized handshake");
    let r = run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &source_config(named("none"), 2), &NoProgress);
    r.unwrap();
    await_destination(&dest).unwrap();
    assert_eq!(src.digest(), dst.digest());
}

/// Collects events.
#[derive(Default)]
struct Events(Mutex<Vec<Event>>);

impl ProgressSink for Events {
    fn update(&self, _p: &Progress) {}
    fn event(&self, e: &Event) {
        self.0.lock().unwrap().push(e.clone());
    }
}

#[test]
fn dropped_connections_and_codec_notes_are_events_not_prints() {
    // A non-pageferry peer connects first; the destination drops it, says so through its
    // events sink, and goes on to complete the migration. The qatzip `auto` fallback note
    // reaches both sides' sinks.
    let (src, dst) = (crate::engine::tests::test_memory([64, 16]), memory_filled(&LAYOUT, CANARY));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut spec = CodecSpec::new(named("qatzip"));
    spec.qatzip.lib_path = Some("/nonexistent/libqatzip.so.3".into());
    let events = Arc::new(Events::default());
    let sink = EventSink(events.clone());
    let config = DestinationConfig { codec: spec.clone(), accept_timeout: IO, stall_timeout: IO, events: sink, ..Default::default() };
    let dest = std::thread::spawn(move || run_destination(&listener, &dst, &mut NoWorkload, &config));
    let mut junk = connect(&addr);
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let source_events = Events::default();
    let scfg = SourceConfig { codec: spec, ..source_config(named("qatzip"), 1) };
    run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &scfg, &source_events).unwrap();
    dest.join().unwrap().unwrap();
    let got = events.0.lock().unwrap().clone();
    assert!(
        got.iter().any(|e| matches!(e, Event::ConnectionDropped { reason, .. } if reason.contains("bad magic"))),
        "{got:?}"
    );
    let note = |list: &[Event]| list.iter().any(|e| matches!(e, Event::CodecNote { method, note } if method == "qatzip" && note.contains("using the cpu provider")));
    assert!(note(&got), "{got:?}");
    let src_events = source_events.0.lock().unwrap().clone();
    assert!(note(&src_events), "{src_events:?}");
    assert!(got.iter().chain(src_events.iter()).all(|e| !e.to_string().is_empty()));
}

#[test]
fn idle_and_dripping_connections_at_the_cap_never_keep_the_right_source_waiting() {
    // A cap of 4 pending handshakes and a handshake deadline far beyond the accept timeout:
    // if the right source queued behind the idle connections (as when the cap left newer
    // connections in the backlog), the accept timeout would end the destination first.
    let (src, dst) = (crate::engine::tests::test_memory([64, 16]), memory_filled(&LAYOUT, CANARY));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let events = Arc::new(Events::default());
    let config = DestinationConfig {
        accept_timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(120),
        max_pending_handshakes: 4,
        events: EventSink(events.clone()),
        ..Default::default()
    };
    let dest = std::thread::spawn(move || run_destination(&listener, &dst, &mut NoWorkload, &config));
    // One peer drips the first bytes of a Hello, six stay silent; all connect first.
    let mut drip = connect(&addr);
    let hello_bytes = wire_bytes(&hello(SessionId::random(), Role::Control, 0, 1, named("none"), LAYOUT.iter().enumerate().map(|(i, p)| (format!("ram{i}"), p * PAGE_SIZE as u64)).collect()));
    drip.write_all(&hello_bytes[..3]).unwrap();
    let idle: Vec<TcpStream> = (0..6).map(|_| connect(&addr)).collect();
    let r = run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &source_config(named("none"), 2), &NoProgress);
    assert!(r.expect("the right source migrates").verified);
    dest.join().unwrap().expect("the destination completes");
    let got = events.0.lock().unwrap().clone();
    let evicted = got.iter().filter(|e| matches!(e, Event::ConnectionDropped { reason, .. } if reason.contains("evicted"))).count();
    // 7 hostile connections against a cap of 4, then the source's control channel: at least
    // 4 made room; the rest are closed once the session is complete. All are reported.
    assert!(evicted >= 4, "{got:?}");
    let reported = got.iter().filter(|e| matches!(e, Event::ConnectionDropped { .. })).count();
    assert_eq!(reported, 7, "{got:?}");
    let drip_addr = drip.local_addr().unwrap().to_string();
    assert!(got.iter().any(|e| matches!(e, Event::ConnectionDropped { peer, .. } if *peer == drip_addr)), "the dripping peer, the oldest, is reported: {got:?}");
    drop(idle);
}

// ---- postcopy ----

/// A hand-speaking source that announced postcopy (and no digest), with its urgent channel,
/// against a destination that accepts unverified migrations.
fn evil_postcopy(method: Method) -> (Evil, TcpStream) {
    let memory = memory_filled(&LAYOUT, CANARY);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let recorder = Recorder::default();
    let (tx, dest) = crossbeam_channel::bounded(1);
    let config = DestinationConfig { codec: CodecSpec::new(method), accept_timeout: IO, stall_timeout: IO, require_verify: false, ..Default::default() };
    {
        let (memory, recorder) = (memory.clone(), recorder.clone());
        std::thread::spawn(move || {
            let mut w = recorder;
            let _ = tx.send(run_destination(&listener, &memory, &mut w, &config));
        });
    }
    let session = SessionId::random();
    let hello_pc = |role, channel| match hello(session, role, channel, 1, method, memory.layout()) {
        Control::Hello(h) => Control::Hello(Hello { wants: wire::Features { postcopy: true, ..Default::default() }, verify: false, ..h }),
        _ => unreachable!(),
    };
    let mut ctl = connect(&addr);
    wire::write_frame(&mut ctl, PROTOCOL_VERSION, &hello_pc(Role::Control, 0), &[]).unwrap();
    expect_welcome(&mut ctl);
    let mut data = connect(&addr);
    wire::write_frame(&mut data, PROTOCOL_VERSION, &hello_pc(Role::Data, 0), &[]).unwrap();
    expect_welcome(&mut data);
    let mut urgent = connect(&addr);
    wire::write_frame(&mut urgent, PROTOCOL_VERSION, &hello_pc(Role::Urgent, 0), &[]).unwrap();
    expect_welcome(&mut urgent);
    let codec = codec::open(&CodecSpec::new(method)).unwrap();
    (Evil { ctl, data: vec![data, urgent.try_clone().unwrap()], nums: vec![0; 2], method, codec, dest, recorder, memory }, urgent)
}

#[test]
fn urgent_pages_before_the_postcopy_switchover_are_rejected() {
    // Channel 1 of this Evil is the urgent channel.
    let (mut ev, _urgent) = evil_postcopy(named("none"));
    let pkt = ev.pages(1, 0, 0, &[0], &[], &page(7));
    ev.send(1, &pkt);
    let (_, mem) = ev.expect_failure(&["urgent packet", "outside postcopy"]);
    Model::canary().check(&mem, &[]);
}

#[test]
fn a_postcopy_switchover_the_hello_did_not_announce_is_rejected() {
    // A source that announced a verified pre-copy migration (which a verifying destination
    // accepts) must not switch to postcopy, which completes without a digest: the destination
    // refuses, resumes nothing and places nothing. (Found while writing the `destination` fuzz target.)
    let mut ev = Evil::start(named("none"), 1);
    let s = ev.sync(0, 0);
    ev.send(0, &s);
    ev.expect_round_done(0);
    wire::write_frame(&mut ev.ctl, PROTOCOL_VERSION, &Control::Postcopy { round: 1, discard: vec![] }, b"").unwrap();
    let (_, mem) = ev.expect_failure(&["Postcopy", "did not announce postcopy"]);
    Model::canary().check(&mem, &[]);
}

#[test]
fn a_postcopy_switchover_out_of_order_or_outside_memory_is_rejected() {
    // Postcopy must follow the last complete round.
    let (mut ev, _u) = evil_postcopy(named("none"));
    wire::write_frame(&mut ev.ctl, PROTOCOL_VERSION, &Control::Postcopy { round: 3, discard: vec![] }, b"").unwrap();
    let (_, mem) = ev.expect_failure(&["Postcopy", "for round 3"]);
    Model::canary().check(&mem, &[]);
    // A discard range outside the region is refused before anything is dropped.
    let (mut ev, _u) = evil_postcopy(named("none"));
    let s = ev.sync(0, 0);
    ev.send(0, &s);
    ev.expect_round_done(0);
    wire::write_frame(&mut ev.ctl, PROTOCOL_VERSION, &Control::Postcopy { round: 1, discard: vec![(0, 0, 1), (0, u32::MAX, 2)] }, b"").unwrap();
    let (e, mem) = ev.expect_failure(&["postcopy failed after the switchover", "outside region 0"]);
    assert!(!e.contains("panicked"));
    Model::canary().check(&mem, &[]);
}

/// zstd's fast levels cross the handshake: this source (it reads signed levels) migrates at
/// level -5 to a zstd-only destination; the destination announces -20..=19 to a Hello with
/// `signed_levels` and bounds an unsigned parser can read (0..=19) to one without (a build
/// from before levels were signed).
#[test]
fn fast_zstd_levels_cross_the_handshake() {
    let src = super::tests::test_memory([64, 16]);
    let dst = memory_filled(&LAYOUT, CANARY);
    let cfg = SourceConfig {
        codec: CodecSpec::with_level(named("zstd"), -5).unwrap(),
        ..source_config(named("zstd"), 2)
    };
    let (r, d) = migrate_with(&src, &dst, cfg, named("zstd"));
    let report = r.unwrap();
    d.unwrap();
    assert_eq!((report.method.as_str(), report.level), ("zstd", -5));
    for signed in [false, true] {
        let dst = memory_filled(&LAYOUT, CANARY);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let _dest = spawn_destination(listener, dst.clone(), named("zstd"), Recorder::default());
        let mut ctl = connect(&addr);
        let Control::Hello(mut h) = hello(
            SessionId::random(),
            Role::Control,
            0,
            1,
            named("zstd"),
            dst.layout(),
        ) else {
            unreachable!()
        };
        h.wants.signed_levels = signed;
        wire::write_frame(&mut ctl, PROTOCOL_VERSION, &Control::Hello(h), &[]).unwrap();
        match wire::read_frame(&mut ctl).unwrap().msg {
            Control::Welcome { capabilities, .. } => {
                let zstd = &capabilities.methods[0];
                assert_eq!(
                    (zstd.min_level, zstd.max_level),
                    if signed { (-20, 19) } else { (0, 19) },
                    "signed_levels {signed}"
                );
                assert_eq!(capabilities.features.signed_levels, signed);
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
    }
}
