//! The source's setup around its control thread (split from `source.rs`, which drives the
//! rounds): connecting and shaking hands on every channel, the channel and urgent threads,
//! the control reader, the watchdog that tears every channel down at the first failure, and
//! the one constructor of the final report.

use super::*;
pub(super) fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, MigrationError> {
    let err = |source| MigrationError::Connect { addr: addr.to_string(), cause: source };
    let deadline = Instant::now() + timeout;
    loop {
        let addrs: Vec<_> = addr.to_socket_addrs().map_err(err)?.collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "address resolved to nothing");
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_secs(5)) {
                Ok(s) => {
                    s.set_nodelay(true).ok();
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        if last.kind() != std::io::ErrorKind::ConnectionRefused || Instant::now() >= deadline {
            return Err(err(last));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the destination's Welcome said.
pub(super) struct Welcome {
    pub(super) version: u16,
    pub(super) capabilities: Capabilities,
}

/// Send `hello` and read the destination's answer; checks that the agreed version is one
/// the source offered.
/// The reply must come within `stall` (the stall timeout, plus time for the destination to
/// reserve memory on the control channel).
pub(super) fn handshake(sock: &mut Stream, hello: Hello, name: &str, stall: Duration, tls_name: &str) -> Result<Welcome, MigrationError> {
    sock.set_read_timeout(Some(stall)).ok();
    sock.set_write_timeout(Some(stall)).ok();
    let offered = hello.versions;
    let tls = sock.is_tls();
    // Errors here in the operator's terms: a TLS alert from the destination (it refused our
    // certificate), a TLS destination answering a plaintext source, a closed connection.
    let tls_err = |e: WireError| match e {
        WireError::Io(io) if io.get_ref().is_some_and(|i| i.is::<rustls::Error>()) => {
            Err(MigrationError::Refused(format!("{name}: {}", transport::explain(&io, "destination", tls_name, stall))))
        }
        WireError::BadMagic { found } if !tls && found & 0xffff == 0x0315 => Err(MigrationError::Refused(format!(
            "{name}: the destination answered with a TLS alert: it requires TLS (use --tls-creds DIR or --tls-psk FILE)"
        ))),
        e => Ok(e),
    };
    wire::write_frame(sock, offered.max, &Control::Hello(hello), &[]).map_err(|e| match tls_err(e) {
        Err(m) => m,
        Ok(e) => MigrationError::Wire { channel: name.into(), cause: e },
    })?;
    let reply = match wire::read_frame(sock) {
        Ok(r) => Ok(r),
        Err(e) => match tls_err(e) {
            Err(m) => return Err(m),
            Ok(e) => Err(e),
        },
    };
    let reply = reply.map_err(|e| match e {
        WireError::Closed(_) => MigrationError::Refused(format!(
            "the destination closed the {name} during the handshake (its own output says why: {}a pageferry speaking only protocol version 1 does that too; this source speaks {offered})",
            if tls { "" } else { "does it require TLS? then use --tls-creds DIR or --tls-psk FILE; " }
        )),
        e if is_timeout(&e) => {
            MigrationError::Stalled(format!("no handshake reply from the destination on the {name} for {} (is it busy with another migration?)", secs(stall)))
        }
        e => MigrationError::Wire { channel: name.into(), cause: e },
    })?;
    sock.set_read_timeout(None).ok();
    match reply.msg {
        Control::Welcome { version, capabilities, .. } if offered.contains(version) && reply.version == version => Ok(Welcome { version, capabilities }),
        Control::Welcome { version, .. } => Err(MigrationError::Refused(format!(
            "protocol version mismatch: the destination chose version {version}, this source speaks {offered}"
        ))),
        Control::Refuse { reason } | Control::Abort { reason } => Err(MigrationError::Refused(reason)),
        other => Err(MigrationError::Wire { channel: name.into(), cause: WireError::malformed("handshake reply", format!("{other:?}")) }),
    }
}
/// Check the destination's capabilities against what this source will send; on a mismatch
/// tell the destination (Abort) and fail with the reason.
pub(super) fn check_capabilities(sock: &mut Stream, welcome: &Welcome, config: &SourceConfig, wants: &Features) -> Result<(), MigrationError> {
    let m = config.codec.method;
    let checked = if wants.auto {
        let missing = welcome.capabilities.features.missing(wants);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("the destination does not support {} (a pageferry too old for --multifd-compression auto?)", missing.join(", ")))
        }
    } else {
        welcome.capabilities.check(m.code(), m.name(), config.codec.level, wants)
    };
    if let Err(reason) = checked {
        let _ = wire::write_frame(sock, welcome.version, &Control::Abort { reason: reason.clone() }, &[]);
        return Err(MigrationError::Refused(reason));
    }
    Ok(())
}
/// The connections of one migration after their handshakes.
pub(super) struct Session {
    pub(super) control: Stream,
    pub(super) data: Vec<Stream>,
    /// Postcopy's urgent channel (with --postcopy).
    pub(super) urgent: Option<Stream>,
    /// The protocol version agreed in the handshake.
    pub(super) version: u16,
    /// What the destination decodes (auto chooses among it).
    pub(super) capabilities: Capabilities,
}

/// Connect the control channel and every data channel and shake hands on each.
pub(super) fn open_session(addr: &str, memory: &GuestMemory, config: &SourceConfig) -> Result<Session, MigrationError> {
    let session = SessionId::random();
    // TLS wraps the whole connection (the Hello travels inside it); `tls` says so.
    // signed_levels: this build reads negative levels in the Welcome.
    let wants = Features { postcopy: config.postcopy.is_some(), auto: config.auto.is_some(), tls: config.tls.is_some(), signed_levels: true };
    let tls_name = config.tls.as_ref().and_then(|t| t.server_name.clone()).unwrap_or_else(|| transport::host_of(addr).to_string());
    // Connect, then the TLS handshake when configured (its own deadline).
    let open = |what: &str| -> Result<Stream, MigrationError> {
        let tcp = connect(addr, config.connect_timeout)?;
        match &config.tls {
            None => Ok(Stream::Plain(tcp)),
            Some(tls) => transport::client_handshake(tcp, tls, addr, config.stall_timeout.max(Duration::from_secs(5)))
                .map_err(|e| MigrationError::Refused(format!("{what}: {e}"))),
        }
    };
    let hello = |role, channel| Hello {
        versions: VersionRange::SUPPORTED,
        session,
        role,
        channel,
        channels: config.channels as u16,
        method: config.codec.method.code(),
        level: config.codec.level,
        regions: memory.layout(),
        wants,
        verify: config.verify,
    };
    let mut control = open("control channel")?;
    let stall = config.stall_timeout;
    // The destination reserves the guest's memory before it answers (fallocate on tmpfs
    // zeroes it, ~1 GB/s): allow a second per GiB on top of the stall timeout.
    let reserve = Duration::from_secs(memory.total_bytes() >> 30);
    let welcome = handshake(&mut control, hello(Role::Control, 0), "control channel", stall + reserve, &tls_name)?;
    check_capabilities(&mut control, &welcome, config, &wants)?;
    let version = welcome.version;
    let mut data = Vec::with_capacity(config.channels);
    for i in 0..config.channels {
        if config.cancel.is_cancelled() {
            return Err(MigrationError::Cancelled { by: Side::Source });
        }
        let name = format!("channel {i}");
        let mut s = open(&name)?;
        let w = handshake(&mut s, hello(Role::Data, i as u16), &name, stall, &tls_name)?;
        if w.version != version {
            let e = WireError::malformed("handshake reply", format!("version {} on {name}, {version} on the control channel", w.version));
            return Err(MigrationError::Wire { channel: name, cause: e });
        }
        // Every write on a data channel is bounded by the stall timeout (the writer names it).
        s.set_write_timeout(Some(stall)).ok();
        data.push(s);
    }
    // Postcopy's urgent channel: requested pages skip the queue of background batches.
    let urgent = match config.postcopy {
        Some(_) => {
            let mut s = open("urgent channel")?;
            let w = handshake(&mut s, hello(Role::Urgent, 0), "urgent channel", stall, &tls_name)?;
            if w.version != version {
                let e = WireError::malformed("handshake reply", format!("version {} on the urgent channel, {version} on the control channel", w.version));
                return Err(MigrationError::Wire { channel: "urgent channel".into(), cause: e });
            }
            Some(s)
        }
        None => None,
    };
    Ok(Session { control, data, urgent, version, capabilities: welcome.capabilities })
}

pub(super) type ControlRx = Receiver<Result<(Control, Vec<u8>), WireError>>;

/// The control reader: page requests (postcopy's return path) go straight to the urgent
/// channel's worker; everything else (of the session's version) to the control thread.
pub(super) fn spawn_control_reader(control: &Stream, version: u16, serve: Option<Arc<UrgentServer>>, watch: Arc<Watch>, stall: Duration) -> Result<ControlRx, MigrationError> {
    // The destination sends keepalives: control silent for the stall timeout is a failure.
    control.set_read_timeout(Some(stall)).ok();
    let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
    let mut reader_sock = control.try_clone().map_err(|e| MigrationError::Other(format!("control socket: {e}")))?;
    std::thread::Builder::new()
        .name("pf-src-control".into())
        .spawn(move || loop {
            let r = match (wire::read_frame_at(&mut reader_sock, version), &serve) {
                (Ok((Control::PageRequest { region, pages }, _)), Some(u)) => match u.request(region, pages) {
                    Ok(()) => continue,
                    Err(e) => Err(WireError::malformed("page request", e)),
                },
                (r, _) => r,
            };
            let stop = r.is_err();
            // The destination ended it (or the link did): noted at once, so a source blocked on
            // a data socket acts on it now rather than after its own timeout.
            if let Some(end) = PeerEnd::of(&r) {
                watch.peer_end.lock().unwrap().get_or_insert(end);
            }
            if ctl_tx.send(r).is_err() || stop {
                break;
            }
        })
        .map_err(|e| MigrationError::Other(format!("spawn: {e}")))?;
    Ok(ctl_rx)
}
/// How the destination (or the control link) ended the migration, as seen by the control
/// reader thread.
#[derive(Clone, Debug)]
pub(super) enum PeerEnd {
    Aborted(String),
    Cancelled,
    /// The control link failed (message, whether it was the stall timeout, whether the
    /// link broke rather than carried garbage).
    Link(String, bool, bool),
}

impl PeerEnd {
    pub(super) fn of(r: &Result<(Control, Vec<u8>), WireError>) -> Option<Self> {
        match r {
            Ok((Control::Abort { reason }, _)) => Some(PeerEnd::Aborted(reason.clone())),
            Ok((Control::Cancel { .. }, _)) => Some(PeerEnd::Cancelled),
            Ok(_) => None,
            Err(e) => Some(PeerEnd::link(e)),
        }
    }

    pub(super) fn link(e: &WireError) -> Self {
        PeerEnd::Link(e.to_string(), is_timeout(e), matches!(e, WireError::Closed(_) | WireError::Io(_)))
    }

    pub(super) fn into_error_stall(self, stall: Duration) -> MigrationError {
        match self {
            PeerEnd::Aborted(reason) => MigrationError::PeerAborted(reason),
            PeerEnd::Cancelled => MigrationError::Cancelled { by: Side::Destination },
            PeerEnd::Link(_, true, _) if stall > Duration::ZERO => {
                MigrationError::Stalled(format!("no control message from the destination for {} (--stall-timeout)", secs(stall)))
            }
            PeerEnd::Link(_, true, _) => MigrationError::Stalled("no control message from the destination within the stall timeout (--stall-timeout)".into()),
            // Typed as the link failure it is (the CLI's exit status classes it as network).
            PeerEnd::Link(m, false, true) => MigrationError::Wire {
                channel: "control channel".into(),
                cause: WireError::Io(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, format!("{m} (did the destination die?)"))),
            },
            PeerEnd::Link(m, false, false) => MigrationError::Other(format!("protocol error on control channel: {m}")),
        }
    }
}

/// Shared by the control thread, the control reader and the watchdog.
pub(super) struct Watch {
    /// Clones of the data sockets, to close them all at once.
    pub(super) data: Vec<Stream>,
    pub(super) peer_end: Mutex<Option<PeerEnd>>,
    /// Finish is on the wire: from here on only the destination decides.
    pub(super) committed: AtomicBool,
    pub(super) done: AtomicBool,
}

impl Watch {
    /// Close every data channel now (both ways): blocked writers fail at once, the
    /// destination's readers see the end immediately.
    pub(super) fn teardown(&self) {
        for s in &self.data {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The watchdog: the first failure anywhere — a channel, the destination's Abort or Cancel,
/// our cancel, --timeout — closes every data channel at once, which unblocks whoever waits on
/// them; the control thread then says why on the control channel.
pub(super) fn spawn_watchdog<'scope>(scope: &'scope std::thread::Scope<'scope, '_>, watch: &Arc<Watch>, failure: &Arc<Failure>, config: &SourceConfig, t0: Instant) -> Result<(), MigrationError> {
    let (watch, failure, cancel, timeout) = (watch.clone(), failure.clone(), config.cancel.clone(), config.timeout);
    std::thread::Builder::new()
        .name("pf-src-watch".into())
        .spawn_scoped(scope, move || {
            while !watch.done.load(Ordering::SeqCst) {
                let committed = watch.committed.load(Ordering::SeqCst);
                let peer = watch.peer_end.lock().unwrap().is_some();
                if failure.is_set() || peer || (!committed && (cancel.is_cancelled() || t0.elapsed() >= timeout)) {
                    failure.set("the migration was torn down".into());
                    watch.teardown();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .map_err(|e| MigrationError::Other(format!("spawn: {e}")))?;
    Ok(())
}

/// `--multifd-compression auto`: one selector for all workers over the candidates both sides
/// can use, each candidate's codec spec and packet method code, the code of raw/sync packets.
pub(super) struct Auto {
    pub(super) selector: Arc<AutoSelector>,
    pub(super) specs: Vec<CodecSpec>,
    pub(super) codes: Vec<MethodCode>,
    pub(super) label: MethodCode,
}

/// State shared by the control thread and the channel threads.
pub(super) struct Shared {
    pub(super) counters: Arc<Counters>,
    pub(super) failure: Arc<Failure>,
    pub(super) outstanding: Arc<Outstanding>,
    pub(super) limiter: Option<Arc<RateLimiter>>,
    pub(super) ctx: Arc<WorkerContext>,
    /// The writers measure the link for auto.
    pub(super) meter: Arc<LinkMeter>,
    pub(super) auto: Option<Auto>,
}

impl Shared {
    pub(super) fn new(memory: &GuestMemory, live: bool, config: &SourceConfig, caps: &Capabilities, depth: usize) -> Self {
        let counters = Arc::new(Counters::default());
        let failure = Arc::new(Failure::default());
        let outstanding = Arc::new(Outstanding::default());
        let limiter = config.limiter.clone().or_else(|| config.max_bandwidth.map(|b| Arc::new(RateLimiter::new(b))));
        let ctx = Arc::new(WorkerContext {
            memory: memory.clone(),
            live,
            zero_copy: config.zero_copy,
            counters: counters.clone(),
            outstanding: outstanding.clone(),
            failure: failure.clone(),
        });
        let meter = Arc::new(LinkMeter::default());
        let auto = config.auto.as_ref().map(|a| {
            let (cands, specs, codes, label) = auto_candidates(a, caps, &config.codec);
            let selector = Arc::new(AutoSelector::new(&cands, a.clone(), config.channels * depth, config.channels, meter.clone(), limiter.clone()));
            Auto { selector, specs, codes, label }
        });
        Self { counters, failure, outstanding, limiter, ctx, meter, auto }
    }
    /// The method code of sync packets (and raw ones under auto).
    pub(super) fn sync_code(&self, config: &SourceConfig) -> MethodCode {
        self.auto.as_ref().map_or(config.codec.method.code(), |a| a.label)
    }
}

/// The running channels: the shared batch queue, each channel's socket queue, its writer.
pub(super) struct Channels<'scope> {
    pub(super) work_tx: Option<Sender<Batch>>,
    pub(super) to_sockets: Vec<Sender<ToSocket>>,
    pub(super) writers: Vec<std::thread::ScopedJoinHandle<'scope, Stream>>,
}

/// Per data channel `depth` compression workers and one socket writer.
pub(super) fn spawn_channels<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    config: &SourceConfig,
    shared: &Shared,
    data: Vec<Stream>,
    depth: usize,
) -> Result<Channels<'scope>, MigrationError> {
    let (work_tx, work_rx) = crossbeam_channel::bounded::<Batch>(2 * config.channels * depth);
    let mut ch = Channels { work_tx: Some(work_tx), to_sockets: Vec::new(), writers: Vec::new() };
    let spawn_err = |e: std::io::Error| MigrationError::Other(format!("spawn: {e}"));
    for (i, sock) in data.into_iter().enumerate() {
        let (tx, rx) = crossbeam_channel::bounded::<ToSocket>(2);
        for w in 0..depth {
            let coder = match &shared.auto {
                Some(a) => channel::Coder::Auto { selector: a.selector.clone(), encoders: Encoders::new(a.specs.clone(), a.codes.clone()) },
                None => {
                    let codec = codec::open(&config.codec).map_err(|source| MigrationError::Codec { channel: format!("channel {i}"), cause: source })?;
                    channel::Coder::Fixed(codec, config.codec.method.code())
                }
            };
            let (ctx, work_rx, tx) = (shared.ctx.clone(), work_rx.clone(), tx.clone());
            std::thread::Builder::new().name(format!("pf-c{i}-w{w}")).spawn_scoped(scope, move || channel::run_worker(ctx, coder, work_rx, tx)).map_err(spawn_err)?;
        }
        let (counters, failure, limiter) = (shared.counters.clone(), shared.failure.clone(), shared.limiter.clone());
        let method = shared.sync_code(config);
        let meter = shared.auto.is_some().then(|| shared.meter.clone());
        let writer = move || channel::run_writer(format!("channel {i}"), sock, method, rx, limiter, counters, failure, meter);
        ch.writers.push(std::thread::Builder::new().name(format!("pf-c{i}-tx")).spawn_scoped(scope, writer).map_err(spawn_err)?);
        ch.to_sockets.push(tx);
    }
    Ok(ch)
}

/// Postcopy's urgent channel: one worker and a writer outside the bandwidth cap (requested
/// pages are few and must not queue behind the background push in the limiter).
pub(super) fn spawn_urgent<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    config: &SourceConfig,
    shared: &Shared,
    sock: Stream,
    urgent_rx: Receiver<Batch>,
    urgent_outstanding: Arc<Outstanding>,
) -> Result<std::thread::ScopedJoinHandle<'scope, Stream>, MigrationError> {
    let spawn_err = |e: std::io::Error| MigrationError::Other(format!("spawn: {e}"));
    let (tx, rx) = crossbeam_channel::bounded::<ToSocket>(2);
    let codec = codec::open(&config.codec).map_err(|source| MigrationError::Codec { channel: "urgent channel".into(), cause: source })?;
    // (Under auto: the configured method; its raw packets under the session's label.)
    let code = if config.codec.method.compresses() { config.codec.method.code() } else { shared.sync_code(config) };
    let coder = channel::Coder::Fixed(codec, code);
    let uctx = Arc::new(WorkerContext { outstanding: urgent_outstanding, ..WorkerContext::clone(&shared.ctx) });
    std::thread::Builder::new().name("pf-urgent-w".into()).spawn_scoped(scope, move || channel::run_worker(uctx, coder, urgent_rx, tx)).map_err(spawn_err)?;
    let (counters, failure) = (shared.counters.clone(), shared.failure.clone());
    let method = shared.sync_code(config);
    let writer = move || channel::run_writer("urgent channel".into(), sock, method, rx, None, counters, failure, None);
    std::thread::Builder::new().name("pf-urgent-tx".into()).spawn_scoped(scope, writer).map_err(spawn_err)
}

/// Everything the source's report is made of.
pub(super) struct ReportInputs<'a> {
    pub(super) config: &'a SourceConfig,
    pub(super) info: CodecInfo,
    pub(super) depth: usize,
    pub(super) tracker: &'a str,
    pub(super) memory: &'a GuestMemory,
    pub(super) setup_time: Duration,
    /// "plain TCP" or the TLS version and cipher suite.
    pub(super) transport: String,
    /// (cpu seconds, wall seconds) of the whole migration.
    pub(super) cpu: (f64, f64),
    pub(super) shared: &'a Shared,
    pub(super) run: RunSummary,
    pub(super) dest: DestinationReport,
}

/// The report of a completed migration: the one place it is built.
pub(super) fn completed_report(i: ReportInputs) -> MigrationReport {
    let c = &i.shared.counters;
    let (raw_bytes, wire_bytes) = (c.raw_bytes(), c.wire());
    let total = i.run.total_time.as_secs_f64();
    let (cpu_s, wall_s) = i.cpu;
    MigrationReport {
        status: "completed".into(),
        method: if i.shared.auto.is_some() { "auto".into() } else { i.info.method.name().into() },
        level: if i.shared.auto.is_some() { 0 } else { i.info.level },
        auto: i.shared.auto.as_ref().map(|a| a.selector.report()),
        provider: i.info.provider,
        channels: i.config.channels,
        pipeline_depth: i.depth,
        transport: i.transport,
        dirty_tracker: i.tracker.into(),
        memory_bytes: i.memory.total_bytes(),
        total_time_s: total,
        setup_time_s: i.setup_time.as_secs_f64(),
        downtime_ms: i.run.downtime.as_secs_f64() * 1000.0,
        switchover_ms: ((i.run.downtime.saturating_sub(i.run.digest_wait)).as_secs_f64() * 1000.0 - i.dest.verify_ms).max(0.0),
        expected_downtime_ms: i.run.expected_downtime.as_secs_f64() * 1000.0,
        expected_fixed_ms: i.run.expected_fixed.as_secs_f64() * 1000.0,
        digest_wait_ms: i.run.digest_wait.as_secs_f64() * 1000.0,
        verify_ms: i.dest.verify_ms,
        rounds: i.run.rounds,
        pages_per_round: i.run.pages_per_round,
        mechanisms: i.run.mechanisms,
        throttle_pct_per_round: i.run.throttle_pct_per_round,
        throttle_note: i.run.throttle_note,
        raw_bytes,
        wire_bytes,
        ratio: if wire_bytes > 0 { raw_bytes as f64 / wire_bytes as f64 } else { 0.0 },
        normal_pages: c.normal_pages.load(std::sync::atomic::Ordering::Relaxed),
        zero_pages: c.zero_pages.load(std::sync::atomic::Ordering::Relaxed),
        raw_fallback_pages: c.raw_pages.load(std::sync::atomic::Ordering::Relaxed),
        raw_mbps: mbps(raw_bytes, total),
        wire_mbps: mbps(wire_bytes, total),
        max_bandwidth: i.shared.limiter.as_ref().map(|l| l.rate()),
        send_cpu_s: cpu_s,
        send_cpu_pct: cpu_percent(cpu_s, wall_s),
        recv_cpu_s: i.dest.cpu_s,
        recv_cpu_pct: cpu_percent(i.dest.cpu_s, i.dest.wall_s),
        verified: i.dest.verified,
        verified_by: None,
        recv_provider: i.dest.provider,
        send_peak_rss_anon_bytes: i.run.peak_rss,
        recv_peak_rss_anon_bytes: i.dest.peak_rss_anon_bytes,
        postcopy_reason: i.run.postcopy.as_ref().map(|p| p.reason.clone()),
        postcopy_ms: i.run.postcopy.as_ref().map_or(0.0, |p| p.duration.as_secs_f64() * 1000.0),
        postcopy_pages_requested: i.run.postcopy.as_ref().map_or(0, |p| p.pages_requested),
        postcopy_pages_pushed: i.run.postcopy.as_ref().map_or(0, |p| p.pages_pushed),
        postcopy: i.run.postcopy.map(|_| i.dest.postcopy.unwrap_or_default()),
    }
}
