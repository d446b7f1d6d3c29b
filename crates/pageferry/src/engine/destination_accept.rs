//! The destination's front door (split from `destination.rs`, which receives the rounds):
//! what it announces, the checks on a source's Hello and region table, and the accept loop
//! that runs every connection's TLS and pageferry handshakes concurrently, with a deadline and
//! a cap, until the control channel and every data channel of one session have arrived.

use super::*;

/// What this destination announces in its Welcome: `recv --multifd-compression M` decodes
/// only M (at any of its levels); postcopy (whether the memory a source offers can take it is
/// checked when it asks: a refusal says why).
pub(super) fn capabilities(config: &DestinationConfig) -> Capabilities {
    let methods = if config.only { vec![config.codec.method.caps()] } else { Method::all().map(Method::caps).collect() };
    Capabilities { methods, features: Features { postcopy: true, auto: true, tls: config.tls.is_some(), signed_levels: true } }
}

/// The decoder for a compressed packet of method `code` (one of `accepted`), opened at its
/// first packet with the destination's local options (`spec`: qatzip provider and library).
pub(super) fn decoder<'c>(
    codecs: &'c mut [Option<Box<dyn Codec>>],
    accepted: &[Method],
    spec: &CodecSpec,
    code: MethodCode,
    channel: impl Fn() -> String,
) -> Result<&'c mut dyn Codec, PacketError> {
    let i = accepted.iter().position(|m| m.code() == code).ok_or_else(|| WireError::malformed("packet", format!("method {}", method_name(code))))?;
    let method = accepted[i];
    if !method.compresses() {
        return Err(WireError::malformed("packet", "compressed payload with method none").into());
    }
    if codecs[i].is_none() {
        let spec = CodecSpec { method, level: method.default_level(), qatzip: spec.qatzip.clone() };
        codecs[i] = Some(codec::open(&spec).map_err(|cause| PacketError::Other(MigrationError::Codec { channel: channel(), cause }))?);
    }
    Ok(codecs[i].as_deref_mut().expect("opened above"))
}

/// A method code's name for messages.
pub(super) fn method_name(code: MethodCode) -> String {
    Method::from_code(code).map_or_else(|| format!("unknown {code}"), |m| m.name().to_string())
}

/// The protocol version to speak with a peer offering `versions`; Err is the refusal.
pub(super) fn negotiate(versions: VersionRange) -> Result<u16, String> {
    VersionRange::SUPPORTED
        .negotiate(versions)
        .ok_or_else(|| format!("protocol version mismatch: source speaks {versions}, destination speaks {}", VersionRange::SUPPORTED))
}

/// Check a control Hello and get the memory it will fill and the version to speak; Err is
/// the refusal both sides print.
pub(super) fn check_hello(h: &Hello, provide: &mut ProvideMemory, config: &DestinationConfig) -> Result<(GuestMemory, u16), String> {
    let version = negotiate(h.versions)?;
    let caps = capabilities(config);
    if h.wants.auto {
        // The source picks per packet among what the Welcome announces; each packet's method
        // is checked as it arrives.
        let missing = caps.features.missing(&h.wants);
        if !missing.is_empty() {
            return Err(format!("the destination does not support {}", missing.join(", ")));
        }
    } else {
        if config.only && h.method != config.codec.method.code() {
            return Err(format!("compression method mismatch: source uses {}, destination expects {}", method_name(h.method), config.codec.method));
        }
        caps.check(h.method, &method_name(h.method), h.level, &h.wants)?;
    }
    if h.channels == 0 || h.channels > 256 {
        return Err(format!("bad channel count {}", h.channels));
    }
    if !h.verify && config.require_verify {
        return Err("the source skips the end-to-end memory digest (--no-verify) but this destination requires it; pass --no-verify to the destination too to accept an unverified migration".into());
    }
    if h.wants.postcopy && config.require_verify {
        return Err("the source may switch to postcopy, which cannot compare memory digests (the guest runs here before all memory has arrived); pass --no-verify to the destination to accept that".into());
    }
    check_layout(&h.regions, config.max_memory)?;
    let memory = provide(&h.regions)?;
    if h.wants.postcopy {
        crate::engine::postcopy::probe(&memory, config.postcopy_kernel_faults).map_err(|why| format!("postcopy is not possible on this destination: {why}"))?;
    }
    let ours = memory.layout();
    if h.regions != ours {
        let show = |v: &[(String, u64)]| v.iter().map(|(n, l)| format!("{n}: {l} bytes")).collect::<Vec<_>>().join(", ");
        return Err(format!("memory layout mismatch: source has [{}], destination has [{}]", show(&h.regions), show(&ours)));
    }
    Ok((memory, version))
}

/// Check a data channel's Hello of the session (of `channels` channels, version `version`;
/// `taken(i)`: channel i is connected already); its channel index, or the refusal.
pub(super) fn check_data_hello(hello: &Hello, version: u16, channels: usize, taken: impl Fn(usize) -> bool) -> Result<usize, String> {
    let idx = hello.channel as usize;
    if hello.role != Role::Data || idx >= channels || taken(idx) {
        return Err(format!("unexpected or duplicate {:?} connection for channel {idx}", hello.role));
    }
    if !hello.versions.contains(version) {
        return Err(format!("protocol version mismatch: channel {idx} speaks {}, the session runs version {version}", hello.versions));
    }
    Ok(idx)
}

/// Announced sizes against the protocol's and this destination's limits, before anything is
/// allocated for them.
pub(super) fn check_layout(regions: &[(String, u64)], max_memory: Option<u64>) -> Result<(), String> {
    if regions.is_empty() || regions.len() > wire::MAX_REGIONS {
        return Err(format!("the source announced {} memory regions; 1 to {} are accepted", regions.len(), wire::MAX_REGIONS));
    }
    let mut total = 0u64;
    for (name, len) in regions {
        if name.len() > wire::MAX_REGION_NAME {
            return Err(format!("region name of {} bytes exceeds {}", name.len(), wire::MAX_REGION_NAME));
        }
        if *len == 0 || len % PAGE_SIZE as u64 != 0 {
            return Err(format!("region '{name}': length {len} is not a non-zero multiple of {PAGE_SIZE}"));
        }
        // Page offsets are u32 on the wire.
        if len / PAGE_SIZE as u64 > u32::MAX as u64 + 1 {
            return Err(format!("region '{name}': {len} bytes exceeds the protocol's limit of 2^32 pages (16 TiB)"));
        }
        total = total.checked_add(*len).ok_or_else(|| "announced memory size overflows".to_string())?;
    }
    if let Some(max) = max_memory {
        if total > max {
            return Err(format!("the source announced {total} bytes of memory; this destination accepts at most {max}"));
        }
    }
    Ok(())
}

/// Refusals are written in this build's version: the frame and body of Refuse are the same
/// in every version, so any peer reads them.
/// A control write that failed: a stall (the source took nothing for the stall timeout) or
/// another error.
pub(super) fn ctl_write_err(e: WireError, config: &DestinationConfig) -> MigrationError {
    if crate::engine::link::is_timeout(&e) {
        return MigrationError::Stalled(format!("the source read nothing on the control channel for {} (--stall-timeout)", crate::engine::link::secs(config.stall_timeout)));
    }
    MigrationError::Wire { channel: "control channel".into(), cause: e }
}

pub(super) fn refuse(sock: &mut Stream, reason: &str) {
    let _ = wire::write_frame(sock, PROTOCOL_VERSION, &Control::Refuse { reason: reason.to_string() }, &[]);
}

/// A connection that is not (or no longer) part of the session: told to the events sink.
pub(super) fn dropped(config: &DestinationConfig, peer: SocketAddr, reason: String) {
    config.events.emit(Note::ConnectionDropped { peer: peer.to_string(), reason });
}

/// A peer refused: by authentication (TLS handshake, credentials, channel binding) or by
/// the checks on its control Hello (method, layout, verification policy, postcopy, version,
/// limits, no room for the memory). The listener keeps waiting for the right source.
pub(super) fn refused(config: &DestinationConfig, peer: SocketAddr, reason: String) {
    config.events.emit(Note::ConnectionRefused { peer: peer.to_string(), reason });
}

/// The Welcome to a connection whose Hello is `hello`: negative levels only to a source that
/// reads them (see [`Features::signed_levels`]).
pub(super) fn welcome(sock: &mut Stream, version: u16, fresh: bool, config: &DestinationConfig, hello: &Hello) -> Result<(), WireError> {
    let caps = capabilities(config);
    let capabilities = if hello.wants.signed_levels { caps } else { caps.for_unsigned_peer() };
    wire::write_frame(sock, version, &Control::Welcome { version, fresh_destination: fresh, capabilities }, &[])
}

/// The connections of one session.
pub(super) struct Session {
    pub(super) control: Stream,
    pub(super) data: Vec<Stream>,
    /// Postcopy's urgent channel (when the source wants postcopy).
    pub(super) urgent: Option<Stream>,
    pub(super) hello: Hello,
    pub(super) memory: GuestMemory,
    /// The protocol version agreed on.
    pub(super) version: u16,
    /// When the control channel's handshake was accepted: the destination's `timeout` counts
    /// from here.
    pub(super) accepted: Instant,
}

/// A connection that completed its TLS handshake (when configured) and sent a Hello.
pub(super) struct Arrival {
    pub(super) sock: Stream,
    pub(super) peer: SocketAddr,
    pub(super) hello: Hello,
    pub(super) identity: PeerIdentity,
}

/// Why a connection was dropped during its handshakes.
pub(super) enum Dropped {
    /// Refused by TLS (credentials, version, a plaintext peer): reported, and the destination
    /// keeps listening.
    Refused(String),
    /// Silent, garbage, not a pageferry peer: reported, and the destination keeps listening.
    Reason(String),
    /// A Hello of a protocol version we cannot parse (already refused on the connection):
    /// reported as a refusal when no session has started (as a refused control Hello is),
    /// as a dropped connection otherwise; either way the destination keeps listening.
    Version(String),
}

/// Run one accepted connection's handshakes (TLS, then pageferry's Hello) within `timeout`.
pub(super) fn handshake_one(sock: TcpStream, tls: Option<&Arc<rustls::ServerConfig>>, timeout: Duration) -> Result<(Stream, Hello), Dropped> {
    let started = Instant::now();
    sock.set_nonblocking(false).ok();
    sock.set_nodelay(true).ok();
    let mut sock = match tls {
        None => Stream::Plain(sock),
        Some(cfg) => transport::server_handshake(sock, cfg, timeout).map_err(|e| Dropped::Refused(e.to_string()))?,
    };
    // A real source speaks at once; a silent connection is dropped at the deadline.
    let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
    sock.set_read_timeout(Some(left)).ok();
    sock.set_write_timeout(Some(timeout)).ok();
    match wire::read_frame_limited(&mut sock, wire::MAX_HANDSHAKE_BODY) {
        Ok(Frame { msg: Control::Hello(h), .. }) => Ok((sock, h)),
        Err(WireError::Version { peer, .. }) => {
            // A peer of a version whose Hello we cannot parse (1): tell it why.
            let reason = format!("protocol version mismatch: source speaks {peer}, destination speaks {}", VersionRange::SUPPORTED);
            refuse(&mut sock, &reason);
            Err(Dropped::Version(reason))
        }
        Ok(Frame { msg: other, .. }) => Err(Dropped::Reason(format!("expected a handshake, got {other:?}"))),
        Err(WireError::BadMagic { found }) if tls.is_none() && found & 0xffff == 0x0316 => {
            Err(Dropped::Refused("a TLS client connected, but this destination has no TLS credentials (--tls-creds DIR or --tls-psk FILE)".into()))
        }
        Err(WireError::Io(e)) if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) => Err(Dropped::Refused(transport::explain(&e, "source", "", timeout))),
        Err(WireError::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Err(Dropped::Reason(format!("no handshake within {timeout:?}")))
        }
        Err(e) => Err(Dropped::Reason(e.to_string())),
    }
}

/// Connections in their handshakes, oldest first, each with its peer and a clone of its
/// socket so the accept loop can end it.
#[derive(Default)]
pub(super) struct InHandshake {
    list: Mutex<std::collections::VecDeque<(u64, SocketAddr, TcpStream)>>,
}

impl InHandshake {
    /// Make room under `cap`: end the oldest handshakes and return their peers. A right
    /// source completes its handshake in milliseconds; only silent or dripping peers stay
    /// long enough to be the oldest.
    fn make_room(&self, cap: usize) -> Vec<SocketAddr> {
        let mut l = self.list.lock().unwrap();
        let mut ended = Vec::new();
        while l.len() >= cap.max(1) {
            let (_, peer, oldest) = l.pop_front().expect("non-empty");
            let _ = oldest.shutdown(std::net::Shutdown::Both);
            ended.push(peer);
        }
        ended
    }
    fn add(&self, id: u64, peer: SocketAddr, sock: TcpStream) {
        self.list.lock().unwrap().push_back((id, peer, sock));
    }
    /// The handshake `id` ended: `report` it, under the lock, so that after
    /// [`close_all`](Self::close_all) every result is either reported or closed; nothing
    /// when it had been ended from the accept loop (and reported there) first.
    fn finish(&self, id: u64, report: impl FnOnce()) {
        let mut l = self.list.lock().unwrap();
        if let Some(at) = l.iter().position(|(i, _, _)| *i == id) {
            l.remove(at);
            report();
        }
    }
    /// End every handshake still in progress; their peers.
    fn close_all(&self) -> Vec<SocketAddr> {
        self.list.lock().unwrap().drain(..).map(|(_, peer, s)| {
            let _ = s.shutdown(std::net::Shutdown::Both);
            peer
        }).collect()
    }
}

/// Accept the control channel and all data channels of one session.
///
/// Every accepted connection gets its own thread for the TLS and pageferry handshakes, with
/// a deadline ([`DestinationConfig::handshake_timeout`]) and a cap on how many may be pending
/// at once: a new connection at the cap ends the oldest pending handshake, so silent or
/// dripping (slowloris) peers that connected first never keep the right source waiting for
/// their deadline. A silent, slow, evicted, plaintext or wrongly-credentialed peer is reported
/// (an [`Event`](crate::engine::Event) on [`DestinationConfig::events`]) and dropped while
/// the listener keeps waiting for the right source until the accept timeout. So is a source
/// whose control Hello is refused (wrong method, layout, verification policy, postcopy not
/// possible, bad channel count, a version we cannot speak, sizes over the limits, no room for
/// the memory): it gets a Refuse frame naming why, and the memory `provide` made for it (if
/// any) is dropped before the next connection is served. When nobody was accepted by the
/// accept timeout, the last refusal is the outcome. Data (and urgent) channels must come
/// from the same authenticated identity as the control channel.
pub(super) fn accept_session(listener: &TcpListener, provide: &mut ProvideMemory, config: &DestinationConfig) -> Result<Session, MigrationError> {
    listener.set_nonblocking(true).map_err(|e| MigrationError::Other(format!("listener: {e}")))?;
    let deadline = Instant::now() + config.accept_timeout;
    let (tx, rx) = crossbeam_channel::unbounded::<Result<Arrival, (SocketAddr, Dropped)>>();
    let pending = Arc::new(InHandshake::default());
    let mut next_id = 0u64;
    let mut control: Option<(Stream, Hello, GuestMemory, PeerIdentity)> = None;
    let mut accepted = Instant::now();
    let mut version = PROTOCOL_VERSION;
    let mut data: Vec<Option<Stream>> = Vec::new();
    let mut urgent: Option<Stream> = None;
    let mut fresh = false;
    // Peers refused so far (authentication or a refused control Hello): how many, and the
    // last one and why; the outcome when nobody is accepted before the accept timeout.
    let mut last_refusal: Option<(usize, SocketAddr, String)> = None;
    fn note_refusal(last: &mut Option<(usize, SocketAddr, String)>, peer: SocketAddr, why: &str) {
        let n = last.as_ref().map_or(0, |r| r.0) + 1;
        *last = Some((n, peer, why.to_string()));
    }
    loop {
        if config.cancel.is_cancelled() {
            return Err(MigrationError::Cancelled { by: Side::Destination });
        }
        let want_urgent = control.as_ref().is_some_and(|(_, h, _, _)| h.wants.postcopy);
        if control.is_some() && data.iter().all(|d| d.is_some()) && (!want_urgent || urgent.is_some()) {
            let (control, hello, memory, _) = control.take().unwrap();
            for peer in pending.close_all() {
                dropped(config, peer, "still in its handshake when the session was complete".into());
            }
            // Handshakes that ended meanwhile, not read yet: reported as well.
            for r in rx.try_iter() {
                match r {
                    Ok(a) => dropped(config, a.peer, "stray connection: it arrived when the session was complete".into()),
                    Err((peer, Dropped::Refused(msg))) => refused(config, peer, msg),
                    Err((peer, Dropped::Reason(msg) | Dropped::Version(msg))) => dropped(config, peer, msg),
                }
            }
            return Ok(Session { control, data: data.into_iter().map(|d| d.unwrap()).collect(), urgent, hello, memory, version, accepted });
        }
        if Instant::now() >= deadline {
            // Nobody got in, but someone tried and was refused: that is the outcome.
            if let (None, Some((n, peer, why))) = (&control, &last_refusal) {
                return Err(MigrationError::Refused(format!(
                    "no source accepted within {:?}: refused {n} connection(s), the last from {peer}: {why}",
                    config.accept_timeout
                )));
            }
            return Err(MigrationError::Other(format!(
                "timed out after {:?} waiting for the source ({} of {} data channels connected)",
                config.accept_timeout,
                data.iter().filter(|d| d.is_some()).count(),
                data.len()
            )));
        }
        // At the cap, a new connection ends the oldest pending handshake. (At most 64 per
        // pass, so a flood of connections cannot starve the arrivals below.)
        for _ in 0..64 {
            match listener.accept() {
                Ok((sock, peer)) => {
                    let Ok(handle) = sock.try_clone() else {
                        dropped(config, peer, "cannot track its handshake (out of file descriptors?)".into());
                        continue;
                    };
                    let cap = config.max_pending_handshakes.max(1);
                    for old in pending.make_room(cap) {
                        dropped(config, old, format!("evicted: the oldest of {cap} pending handshakes when another connection arrived"));
                    }
                    let id = next_id;
                    next_id += 1;
                    pending.add(id, peer, handle);
                    let (tx, list, tls, timeout) = (tx.clone(), pending.clone(), config.tls.clone(), config.handshake_timeout);
                    let spawned = std::thread::Builder::new().name("pf-dst-accept".into()).spawn(move || {
                        let r = handshake_one(sock, tls.as_ref(), timeout);
                        list.finish(id, || {
                            let _ = tx.send(match r {
                                Ok((sock, hello)) => Ok(Arrival { identity: sock.peer_identity(), sock, peer, hello }),
                                Err(why) => Err((peer, why)),
                            });
                        });
                    });
                    if let Err(e) = spawned {
                        pending.finish(id, || {});
                        dropped(config, peer, format!("cannot start its handshake: {e}"));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(MigrationError::Other(format!("accept: {e}"))),
            }
        }
        let Arrival { mut sock, peer, hello, identity } = match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(Ok(a)) => a,
            Ok(Err((peer, Dropped::Refused(msg)))) => {
                note_refusal(&mut last_refusal, peer, &msg);
                refused(config, peer, msg);
                continue;
            }
            Ok(Err((peer, Dropped::Version(msg)))) if control.is_none() => {
                // Already refused on its connection; the right source may still come.
                note_refusal(&mut last_refusal, peer, &msg);
                refused(config, peer, msg);
                continue;
            }
            Ok(Err((peer, Dropped::Reason(msg) | Dropped::Version(msg)))) => {
                dropped(config, peer, msg);
                continue;
            }
            Err(_) => continue,
        };
        let session = control.as_ref().map(|(_, h, _, _)| h.session);
        if let (Some(s), Some((_, _, _, control_identity))) = (session, &control) {
            if s == hello.session && identity != *control_identity {
                // Channel binding: a session's channels all come from one authenticated peer.
                let reason = format!(
                    "{:?} channel {} is authenticated as {}, the control channel as {}",
                    hello.role,
                    hello.channel,
                    identity.describe(),
                    control_identity.describe()
                );
                note_refusal(&mut last_refusal, peer, &reason);
                refused(config, peer, reason.clone());
                refuse(&mut sock, &reason);
                continue;
            }
        }
        match (hello.role, session) {
            (Role::Control, None) => {
                let memory = match check_hello(&hello, provide, config) {
                    Ok((m, v)) => {
                        version = v;
                        m
                    }
                    Err(reason) => {
                        // The wrong source is told why (it ends with that reason); the
                        // memory `provide` made for it is dropped here, before anyone else
                        // is served, and the listener waits on for the right source.
                        note_refusal(&mut last_refusal, peer, &reason);
                        refused(config, peer, reason.clone());
                        refuse(&mut sock, &reason);
                        continue;
                    }
                };
                fresh = memory.regions().iter().all(|r| r.is_fresh_zeroed());
                sock.set_read_timeout(None).ok();
                sock.set_write_timeout(None).ok();
                welcome(&mut sock, version, fresh, config, &hello).map_err(|source| MigrationError::Wire { channel: "control channel".into(), cause: source })?;
                data = (0..hello.channels).map(|_| None).collect();
                control = Some((sock, hello, memory, identity));
                accepted = Instant::now();
            }
            (Role::Urgent, Some(s)) if s == hello.session => {
                if !want_urgent || urgent.is_some() || !hello.versions.contains(version) {
                    refuse(&mut sock, "unexpected or duplicate urgent connection");
                    continue;
                }
                sock.set_read_timeout(None).ok();
                sock.set_write_timeout(None).ok();
                if let Err(e) = welcome(&mut sock, version, fresh, config, &hello) {
                    dropped(config, peer, format!("urgent channel: {e}"));
                    continue;
                }
                urgent = Some(sock);
            }
            (_, Some(s)) if s == hello.session => {
                let idx = match check_data_hello(&hello, version, data.len(), |i| data[i].is_some()) {
                    Ok(idx) => idx,
                    Err(reason) => {
                        refuse(&mut sock, &reason);
                        continue;
                    }
                };
                sock.set_read_timeout(None).ok();
                sock.set_write_timeout(None).ok();
                if let Err(e) = welcome(&mut sock, version, fresh, config, &hello) {
                    dropped(config, peer, format!("channel {idx}: {e}"));
                    continue;
                }
                data[idx] = Some(sock);
            }
            (_, current) => {
                // Not our session (or data before control): drop without an answer.
                let ours = current.map(|s: SessionId| s.to_string()).unwrap_or_else(|| "(no control channel yet)".into());
                dropped(config, peer, format!("stray connection: session {} is not {ours}", hello.session));
            }
        }
    }
}
