//! The destination side: accept and check the channels, write pages in place, enforce the
//! round order, verify, resume.
//!
//! Every data channel has a reader thread that validates each packet completely — header,
//! offsets against the region, sizes, CRC32C — and writes pages straight into guest memory:
//! raw contiguous payloads are read from the socket into place, compressed contiguous ones are
//! decompressed into place (no copy of those pages at all); only scattered batches go
//! through one batch-sized buffer. A reader that reaches the end of round k waits at a gate
//! until every channel has; only then may anyone apply round k+1, so a late stale copy can
//! never overwrite a newer page.

use super::stats::{Counters, CpuMeter, DestinationReport, Event as Note};
use super::{DestinationConfig, DestinationWorkload, MigrationError};
use crate::codec::{self, Codec, Method, MAX_BATCH_BYTES};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::wire::{
    self, decode_offsets, page_runs, Capabilities, Control, Features, Frame, Hello, MethodCode, PacketCrc, PacketHeader, PacketKind, Role, SessionId,
    VersionRange, WireError, PACKET_HEADER_LEN, PROTOCOL_VERSION,
};
use crossbeam_channel::Sender;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Provides the destination's memory once the source's region table is known.
pub type ProvideMemory<'a> = dyn FnMut(&[(String, u64)]) -> Result<GuestMemory, String> + 'a;

/// What this destination announces in its Welcome: `recv --multifd-compression M` decodes
/// only M (at any of its levels); no optional feature yet.
fn capabilities(config: &DestinationConfig) -> Capabilities {
    Capabilities { methods: vec![config.codec.method.caps()], features: Features::default() }
}

/// A method code's name for messages.
fn method_name(code: MethodCode) -> String {
    Method::from_code(code).map_or_else(|| format!("unknown {code}"), |m| m.name().to_string())
}

/// The protocol version to speak with a peer offering `versions`; Err is the refusal.
fn negotiate(versions: VersionRange) -> Result<u16, String> {
    VersionRange::SUPPORTED
        .negotiate(versions)
        .ok_or_else(|| format!("protocol version mismatch: source speaks {versions}, destination speaks {}", VersionRange::SUPPORTED))
}

/// Check a control Hello and get the memory it will fill and the version to speak; Err is
/// the refusal both sides print.
fn check_hello(h: &Hello, provide: &mut ProvideMemory, config: &DestinationConfig) -> Result<(GuestMemory, u16), String> {
    let version = negotiate(h.versions)?;
    if h.method != config.codec.method.code() {
        return Err(format!("compression method mismatch: source uses {}, destination expects {}", method_name(h.method), config.codec.method));
    }
    let caps = capabilities(config);
    caps.check(h.method, &method_name(h.method), h.level, &h.wants)?;
    if h.channels == 0 || h.channels > 256 {
        return Err(format!("bad channel count {}", h.channels));
    }
    if !h.verify && config.require_verify {
        return Err("the source skips the end-to-end memory digest (--no-verify) but this destination requires it; pass --no-verify to the destination too to accept an unverified migration".into());
    }
    check_layout(&h.regions, config.max_memory)?;
    let memory = provide(&h.regions)?;
    let ours = memory.layout();
    if h.regions != ours {
        let show = |v: &[(String, u64)]| v.iter().map(|(n, l)| format!("{n}: {l} bytes")).collect::<Vec<_>>().join(", ");
        return Err(format!("memory layout mismatch: source has [{}], destination has [{}]", show(&h.regions), show(&ours)));
    }
    Ok((memory, version))
}

/// Announced sizes against the protocol's and this destination's limits, before anything is
/// allocated for them.
fn check_layout(regions: &[(String, u64)], max_memory: Option<u64>) -> Result<(), String> {
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
fn refuse(sock: &mut TcpStream, reason: &str) {
    let _ = wire::write_frame(sock, PROTOCOL_VERSION, &Control::Refuse { reason: reason.to_string() }, &[]);
}

/// A connection that is not (or no longer) part of the session: told to the events sink.
fn dropped(config: &DestinationConfig, peer: std::net::SocketAddr, reason: String) {
    config.events.emit(Note::ConnectionDropped { peer: peer.to_string(), reason });
}

fn welcome(sock: &mut TcpStream, version: u16, fresh: bool, config: &DestinationConfig) -> Result<(), WireError> {
    wire::write_frame(sock, version, &Control::Welcome { version, fresh_destination: fresh, capabilities: capabilities(config) }, &[])
}

/// Accept the control channel and all data channels of one session; also returns the
/// protocol version agreed on.
fn accept_session(listener: &TcpListener, provide: &mut ProvideMemory, config: &DestinationConfig) -> Result<(TcpStream, Vec<TcpStream>, Hello, GuestMemory, u16), MigrationError> {
    listener.set_nonblocking(true).map_err(|e| MigrationError::Other(format!("listener: {e}")))?;
    let deadline = Instant::now() + config.accept_timeout;
    let mut control: Option<(TcpStream, Hello, GuestMemory)> = None;
    let mut version = PROTOCOL_VERSION;
    let mut data: Vec<Option<TcpStream>> = Vec::new();
    let mut fresh = false;
    loop {
        if control.is_some() && data.iter().all(|d| d.is_some()) {
            let (c, h, m) = control.take().unwrap();
            return Ok((c, data.into_iter().map(|d| d.unwrap()).collect(), h, m, version));
        }
        if Instant::now() >= deadline {
            return Err(MigrationError::Other(format!(
                "timed out after {:?} waiting for the source ({} of {} data channels connected)",
                config.accept_timeout,
                data.iter().filter(|d| d.is_some()).count(),
                data.len()
            )));
        }
        let (mut sock, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(MigrationError::Other(format!("accept: {e}"))),
        };
        sock.set_nonblocking(false).ok();
        sock.set_nodelay(true).ok();
        // A real source speaks at once; a silent connection must not hold up the others long.
        sock.set_read_timeout(Some(Duration::from_secs(3))).ok();
        let hello = match wire::read_frame_limited(&mut sock, wire::MAX_HANDSHAKE_BODY) {
            Ok(Frame { msg: Control::Hello(h), .. }) => h,
            Err(WireError::Version { peer, .. }) if control.is_none() => {
                // A peer of a version whose Hello we cannot parse (1): tell it why.
                let reason = format!("protocol version mismatch: source speaks {peer}, destination speaks {}", VersionRange::SUPPORTED);
                refuse(&mut sock, &reason);
                return Err(MigrationError::Refused(reason));
            }
            Ok(Frame { msg: other, .. }) => {
                dropped(config, peer, format!("expected a handshake, got {other:?}"));
                continue;
            }
            Err(e) => {
                dropped(config, peer, e.to_string());
                continue;
            }
        };
        let session = control.as_ref().map(|(_, h, _)| h.session);
        match (hello.role, session) {
            (Role::Control, None) => {
                let memory = match check_hello(&hello, provide, config) {
                    Ok((m, v)) => {
                        version = v;
                        m
                    }
                    Err(reason) => {
                        refuse(&mut sock, &reason);
                        return Err(MigrationError::Refused(reason));
                    }
                };
                fresh = memory.regions().iter().all(|r| r.is_fresh_zeroed());
                sock.set_read_timeout(None).ok();
                welcome(&mut sock, version, fresh, config).map_err(|source| MigrationError::Wire { channel: "control channel".into(), cause: source })?;
                data = (0..hello.channels).map(|_| None).collect();
                control = Some((sock, hello, memory));
            }
            (_, Some(s)) if s == hello.session => {
                let idx = hello.channel as usize;
                if hello.role != Role::Data || idx >= data.len() || data[idx].is_some() {
                    refuse(&mut sock, &format!("unexpected or duplicate {:?} connection for channel {idx}", hello.role));
                    continue;
                }
                if !hello.versions.contains(version) {
                    refuse(&mut sock, &format!("protocol version mismatch: channel {idx} speaks {}, the session runs version {version}", hello.versions));
                    continue;
                }
                if let Err(e) = welcome(&mut sock, version, fresh, config) {
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

/// Rounds completed by all channels; readers wait here at the end of each round.
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
    channels: usize,
    /// Readers hold it shared while applying a packet; the control loop sets it (exclusively)
    /// once the final round is complete, so nothing changes memory during verification or
    /// after the workload resumes.
    closed: std::sync::RwLock<bool>,
}

#[derive(Default)]
struct GateState {
    round: u32,
    arrived: usize,
    finished: bool,
    failed: bool,
}

enum Event {
    RoundComplete(u32),
    Failed(MigrationError),
    Control(Result<(Control, Vec<u8>), WireError>),
}

impl Gate {
    /// Called by a channel that delivered all of `round`; returns when all channels have.
    fn arrive(&self, round: u32, events: &Sender<Event>) -> Result<(), WireError> {
        let mut s = self.state.lock().unwrap();
        if round != s.round {
            return Err(WireError::malformed("sync packet", format!("for round {round} during round {}", s.round)));
        }
        s.arrived += 1;
        if s.arrived == self.channels {
            s.arrived = 0;
            s.round += 1;
            let _ = events.send(Event::RoundComplete(round));
            self.cv.notify_all();
            return Ok(());
        }
        while s.round == round && !s.failed {
            s = self.cv.wait(s).unwrap();
        }
        Ok(())
    }
    fn current(&self) -> u32 {
        self.state.lock().unwrap().round
    }
    fn fail(&self) {
        self.state.lock().unwrap().failed = true;
        self.cv.notify_all();
    }
}

struct Reader<'a> {
    idx: usize,
    sock: TcpStream,
    memory: &'a GuestMemory,
    method: Method,
    codec: Option<Box<dyn Codec>>,
    gate: &'a Gate,
    counters: &'a Counters,
    fresh: &'a [bool],
    events: Sender<Event>,
    /// For compressed batches of scattered pages only.
    bounce: Vec<u8>,
    zero_copy: bool,
}

impl Reader<'_> {
    fn err(&self, source: WireError) -> MigrationError {
        let round = self.gate.current();
        let source = match source {
            WireError::Closed(_) => WireError::Closed(format!(" (channel {}, round {round}: did the source die?)", self.idx)),
            s => s,
        };
        MigrationError::Wire { channel: format!("channel {} in round {round}", self.idx), cause: source }
    }

    fn run(mut self) {
        let mut payload = vec![0u8; MAX_BATCH_BYTES];
        let mut offsets = vec![0u8; 2 * codec::MAX_BATCH_PAGES * 4];
        let (mut normal, mut zero) = (Vec::with_capacity(128), Vec::with_capacity(128));
        let mut expected_num = 0u64;
        loop {
            let mut hdr = [0u8; PACKET_HEADER_LEN];
            match self.sock.read(&mut hdr[..1]) {
                Ok(0) => {
                    // End of stream at a packet boundary: fine once the migration finished.
                    if !self.gate.state.lock().unwrap().finished {
                        let e = self.err(WireError::Closed(String::new()));
                        let _ = self.events.send(Event::Failed(e));
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    if !self.gate.state.lock().unwrap().finished {
                        let e = self.err(WireError::Io(e));
                        let _ = self.events.send(Event::Failed(e));
                    }
                    return;
                }
            }
            let r = wire::read_exact(&mut self.sock, &mut hdr[1..], "inside a packet header")
                .map_err(PacketError::from)
                .and_then(|_| self.packet(&hdr, &mut expected_num, &mut payload, &mut offsets, &mut normal, &mut zero));
            if let Err(e) = r {
                let e = match e {
                    PacketError::Wire(w) => self.err(w),
                    PacketError::Other(m) => m,
                };
                let _ = self.events.send(Event::Failed(e));
                return;
            }
        }
    }

    fn packet(
        &mut self,
        hdr: &[u8; PACKET_HEADER_LEN],
        expected_num: &mut u64,
        payload: &mut [u8],
        offsets: &mut [u8],
        normal: &mut Vec<u32>,
        zero: &mut Vec<u32>,
    ) -> Result<(), PacketError> {
        let h = PacketHeader::decode(hdr)?;
        if h.method != self.method.code() {
            return Err(WireError::malformed("packet", format!("method {} on a {} migration", method_name(h.method), self.method)).into());
        }
        if h.packet_num != *expected_num {
            return Err(WireError::malformed("packet", format!("number {} where {} was expected", h.packet_num, expected_num)).into());
        }
        *expected_num += 1;
        let round = self.gate.current();
        if h.round != round {
            return Err(WireError::malformed("packet", format!("of round {} during round {round} (stale or early)", h.round)).into());
        }
        if h.kind == PacketKind::Sync {
            let mut crc = [0u8; 4];
            wire::read_exact(&mut self.sock, &mut crc, "in a sync packet")?;
            PacketCrc::new().check(hdr, crc)?;
            self.gate.arrive(h.round, &self.events)?;
            return Ok(());
        }
        let closed = self.gate.closed.read().unwrap();
        if *closed {
            return Err(WireError::malformed("packet", "pages after the final round").into());
        }
        let region = self
            .memory
            .region(h.region as usize)
            .ok_or_else(|| WireError::malformed("packet", format!("region {} does not exist ({} regions)", h.region, self.memory.regions().len())))?
            .clone();
        let offsets = &mut offsets[..h.offsets_len()];
        wire::read_exact(&mut self.sock, offsets, "in page offsets")?;
        decode_offsets(&h, offsets, region.pages(), normal, zero)?;
        let n_bytes = normal.len() * PAGE_SIZE;
        let base = region.host_ptr();
        let len = h.payload_len as usize;
        // Runs of consecutive pages as slices of guest memory.
        // SAFETY: offsets were checked against the region and are strictly increasing, so
        // the runs lie inside it and do not overlap.
        let mut runs: Vec<&mut [u8]> =
            page_runs(normal).map(|(first, n)| unsafe { std::slice::from_raw_parts_mut(base.add(first as usize * PAGE_SIZE), n as usize * PAGE_SIZE) }).collect();
        if round == 0 && self.fresh[h.region as usize] {
            // Fresh memory: allocate the batch's pages in one call instead of one page fault
            // per 4 KiB page in the middle of decompression (faults are this path's largest
            // cost after the codec). Best effort: without it the pages fault in as usual.
            for r in runs.iter() {
                // SAFETY: a range inside the region; populating changes no contents.
                unsafe { libc::madvise(r.as_ptr() as *mut libc::c_void, r.len(), libc::MADV_POPULATE_WRITE) };
            }
        }
        let mut crc = [0u8; 4];
        // Zero pages only (no payload: the source does not mark these raw) take the raw path
        // too: there is nothing to decompress, and a codec asked to inflate nothing may fail.
        if (h.raw && self.zero_copy) || normal.is_empty() {
            // Raw pages go from the socket straight into place (scattered reads for scattered
            // pages); a CRC mismatch fails the whole migration, so unverified bytes never
            // count as migrated.
            read_exact_vectored(&mut self.sock, &mut runs).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => WireError::Closed(" in a payload".into()),
                _ => WireError::Io(e),
            })?;
            wire::read_exact(&mut self.sock, &mut crc, "in a packet checksum")?;
            runs.iter().fold(PacketCrc::new().body(offsets), |c, r| c.body(r)).check(hdr, crc)?;
        } else {
            wire::read_exact(&mut self.sock, &mut payload[..len], "in a payload")?;
            wire::read_exact(&mut self.sock, &mut crc, "in a packet checksum")?;
            PacketCrc::new().body(offsets).body(&payload[..len]).check(hdr, crc)?;
            let decode_err = |cause| PacketError::Other(MigrationError::Codec { channel: format!("channel {} in round {round}", self.idx), cause });
            let codec = self.codec.as_mut();
            let no_codec = || WireError::malformed("packet", "compressed payload on a method-none migration");
            if h.raw {
                // (zero copy turned off, for measurement) raw through the payload buffer
                let mut at = 0;
                for r in runs.iter_mut() {
                    r.copy_from_slice(&payload[at..at + r.len()]);
                    at += r.len();
                }
            } else if runs.len() == 1 && self.zero_copy {
                let codec = codec.ok_or_else(no_codec)?;
                // Contiguous: decompress straight into place.
                codec.decompress(&payload[..len], runs[0]).map_err(decode_err)?;
            } else {
                let codec = codec.ok_or_else(no_codec)?;
                let bounce = &mut self.bounce[..n_bytes];
                codec.decompress(&payload[..len], bounce).map_err(decode_err)?;
                let mut at = 0;
                for r in runs.iter_mut() {
                    r.copy_from_slice(&bounce[at..at + r.len()]);
                    at += r.len();
                }
            }
        }
        if !(round == 0 && self.fresh[h.region as usize]) {
            for &p in zero.iter() {
                unsafe { std::ptr::write_bytes(base.add(p as usize * PAGE_SIZE), 0, PAGE_SIZE) };
            }
        }
        Counters::add(&self.counters.normal_pages, normal.len() as u64);
        Counters::add(&self.counters.zero_pages, zero.len() as u64);
        Counters::add(&self.counters.wire_bytes, h.wire_len() as u64);
        Ok(())
    }
}

enum PacketError {
    Wire(WireError),
    Other(MigrationError),
}

impl From<WireError> for PacketError {
    fn from(e: WireError) -> Self {
        PacketError::Wire(e)
    }
}

fn read_exact_vectored(r: &mut impl Read, mut bufs: &mut [&mut [u8]]) -> std::io::Result<()> {
    use std::io::IoSliceMut;
    let mut skip = 0usize; // bytes of bufs[0] already filled
    while !bufs.is_empty() {
        let mut iov: Vec<IoSliceMut> = Vec::with_capacity(bufs.len());
        for (k, b) in bufs.iter_mut().enumerate() {
            iov.push(IoSliceMut::new(if k == 0 { &mut b[skip..] } else { &mut b[..] }));
        }
        let mut n = match r.read_vectored(&mut iov) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while n > 0 {
            let left = bufs[0].len() - skip;
            if n >= left {
                n -= left;
                skip = 0;
                bufs = &mut bufs[1..];
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    Ok(())
}


/// Receive a migration into `memory` on `listener`, then resume `workload` with the source's
/// device state. Returns only after memory is complete (and verified, when the source asked).
pub fn run_destination(
    listener: &TcpListener,
    memory: &GuestMemory,
    workload: &mut dyn DestinationWorkload,
    config: &DestinationConfig,
) -> Result<DestinationReport, MigrationError> {
    run_destination_with(listener, &mut |_| Ok(memory.clone()), workload, config).map(|(r, _)| r)
}

/// Like [`run_destination`], but the memory is made by `provide` from the source's region
/// table (e.g. an image file of the announced size). Returns the memory with the report.
pub fn run_destination_with(
    listener: &TcpListener,
    provide: &mut ProvideMemory,
    workload: &mut dyn DestinationWorkload,
    config: &DestinationConfig,
) -> Result<(DestinationReport, GuestMemory), MigrationError> {
    let cpu = CpuMeter::start();
    let info = codec::open(&config.codec).map_err(|source| MigrationError::Codec { channel: "setup".into(), cause: source })?.info();
    if let Some(note) = info.note {
        config.events.emit(Note::CodecNote { method: info.method.to_string(), note });
    }
    let provider = info.provider;
    let (mut control, data, hello, memory, version) = accept_session(listener, provide, config)?;
    let memory = &memory;
    let fresh: Vec<bool> = memory.regions().iter().map(|r| r.is_fresh_zeroed()).collect();
    let counters = Counters::default();
    let gate = Gate { state: Mutex::new(GateState::default()), cv: Condvar::new(), channels: data.len(), closed: std::sync::RwLock::new(false) };
    let (ev_tx, ev_rx) = crossbeam_channel::unbounded::<Event>();

    let mut ctl_reader = control.try_clone().map_err(|e| MigrationError::Other(format!("control socket: {e}")))?;
    {
        let ev_tx = ev_tx.clone();
        std::thread::Builder::new()
            .name("pf-dst-control".into())
            .spawn(move || loop {
                let r = wire::read_frame_at(&mut ctl_reader, version);
                let stop = r.is_err();
                if ev_tx.send(Event::Control(r)).is_err() || stop {
                    break;
                }
            })
            .map_err(|e| MigrationError::Other(format!("spawn: {e}")))?;
    }

    let result = std::thread::scope(|scope| {
        let mut socks = Vec::new();
        for (idx, sock) in data.into_iter().enumerate() {
            sock.set_read_timeout(Some(config.io_timeout)).ok();
            socks.push(sock.try_clone().map_err(|e| MigrationError::Other(format!("socket: {e}")))?);
            let codec = match config.codec.method.compresses() {
                false => None,
                true => Some(codec::open(&config.codec).map_err(|source| MigrationError::Codec { channel: format!("channel {idx}"), cause: source })?),
            };
            let reader = Reader { idx, sock, memory, method: config.codec.method, codec, gate: &gate, counters: &counters, fresh: &fresh, events: ev_tx.clone(), bounce: vec![0u8; MAX_BATCH_BYTES], zero_copy: config.zero_copy };
            std::thread::Builder::new()
                .name(format!("pf-c{idx}-rx"))
                .spawn_scoped(scope, move || reader.run())
                .map_err(|e| MigrationError::Other(format!("spawn: {e}")))?;
        }
        let outcome = control_loop(&ev_rx, &mut control, version, memory, workload, &gate, &counters, &cpu, &provider, hello.verify);
        if let Err(e) = &outcome {
            let _ = wire::write_frame(&mut control, version, &Control::Abort { reason: e.to_string() }, &[]);
        }
        // Unblock readers (at the gate or in read) so the scope can end.
        gate.fail();
        for s in &socks {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        outcome
    });
    let _ = control.shutdown(std::net::Shutdown::Both);
    result.map(|r| (r, memory.clone()))
}

#[allow(clippy::too_many_arguments)]
fn control_loop(
    events: &crossbeam_channel::Receiver<Event>,
    control: &mut TcpStream,
    version: u16,
    memory: &GuestMemory,
    workload: &mut dyn DestinationWorkload,
    gate: &Gate,
    counters: &Counters,
    cpu: &CpuMeter,
    provider: &str,
    announced_verify: bool,
) -> Result<DestinationReport, MigrationError> {
    let ctl_err = |source| MigrationError::Wire { channel: "control channel".into(), cause: source };
    let mut completed: Option<u32> = None;
    let mut finish: Option<(u32, Option<String>, Vec<u8>)> = None;
    let mut peak_rss = 0u64;
    loop {
        peak_rss = peak_rss.max(super::stats::rss_anon_bytes());
        if let (Some((f, _, _)), Some(c)) = (&finish, completed) {
            if c >= *f {
                break;
            }
        }
        let event = match events.recv_timeout(Duration::from_millis(100)) {
            Ok(e) => e,
            Err(_) => continue, // sample memory ~10×/s while waiting
        };
        match event {
            Event::RoundComplete(k) => {
                completed = Some(k);
                wire::write_frame(control, version, &Control::RoundDone { round: k, pages: counters.pages() }, &[]).map_err(ctl_err)?;
            }
            Event::Failed(e) => {
                // A source that gives up sends Abort on control and then closes its data
                // channels; report its reason rather than the closed channel it caused.
                let until = Instant::now() + Duration::from_millis(500);
                while let Ok(ev) = events.recv_deadline(until) {
                    if let Event::Control(Ok((Control::Abort { reason }, _))) = ev {
                        return Err(MigrationError::PeerAborted(reason));
                    }
                }
                return Err(e);
            }
            Event::Control(Ok((Control::Finish { round, digest }, state))) => {
                if finish.is_some() || completed.is_some_and(|c| c > round) {
                    return Err(ctl_err(WireError::malformed("Finish", format!("for round {round} after round {completed:?}"))));
                }
                finish = Some((round, digest, state));
            }
            Event::Control(Ok((Control::Abort { reason }, _))) => return Err(MigrationError::PeerAborted(reason)),
            Event::Control(Ok((other, _))) => return Err(ctl_err(WireError::malformed("control message", format!("unexpected {other:?}")))),
            Event::Control(Err(WireError::Closed(_))) => {
                return Err(MigrationError::Other(format!("the source closed the control channel during round {} (did it die?)", gate.current())))
            }
            Event::Control(Err(e)) => return Err(ctl_err(e)),
        }
    }
    let (round, digest, state) = finish.expect("loop exits with a finish");
    gate.state.lock().unwrap().finished = true;
    *gate.closed.write().unwrap() = true;
    let t = Instant::now();
    let verified = match digest {
        Some(hex) => {
            let source_digest = u128::from_str_radix(&hex, 16).map_err(|_| ctl_err(WireError::malformed("Finish", "bad digest")))?;
            let dest_digest = memory.digest();
            if dest_digest != source_digest {
                return Err(MigrationError::Verify { source_digest, dest_digest });
            }
            true
        }
        // Announced in the Hello and accepted there (both sides agreed to skip it).
        None if !announced_verify => false,
        None => return Err(ctl_err(WireError::malformed("Finish", "no memory digest although the source announced verification"))),
    };
    let verify_ms = t.elapsed().as_secs_f64() * 1000.0;
    // Commit point: every check passed. From here on this side runs the guest; errors no
    // longer end in an Abort (the source must not resume after one) but in a report.
    workload.resume(&state).map_err(|source| MigrationError::Workload { what: "resume", cause: source })?;
    let (cpu_s, wall_s) = cpu.read();
    let report = DestinationReport {
        cpu_s,
        wall_s,
        pages: counters.pages(),
        zero_pages: counters.zero_pages.load(Relaxed),
        wire_bytes: counters.wire(),
        verify_ms,
        verified,
        rounds: round + 1,
        provider: provider.to_string(),
        peak_rss_anon_bytes: peak_rss.max(super::stats::rss_anon_bytes()),
        done_not_delivered: false,
    };
    let mut report = report;
    if wire::write_frame(control, version, &Control::Done { report: report.clone() }, &[]).is_err() {
        // The guest runs here now; the source, without Done, stays paused and says so.
        report.done_not_delivered = true;
    }
    Ok(report)
}
