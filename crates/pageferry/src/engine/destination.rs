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

use super::postcopy::{FaultStop, Placer};
use super::stats::{Counters, CpuMeter, DestinationReport, Event as Note, MigrationStatus};
use super::{DestinationConfig, DestinationWorkload, MigrationError, Side};
use crate::codec::{self, Codec, CodecSpec, Method, MAX_BATCH_BYTES};
use crate::memory::{GuestMemory, MemoryRegion, PAGE_SIZE};
use crate::wire::{
    self, PostcopyStats, decode_offsets, page_runs, Capabilities, Control, Features, Frame, Hello, MethodCode, PacketCrc, PacketHeader, PacketKind, Role, SessionId,
    VersionRange, WireError, PACKET_HEADER_LEN, PROTOCOL_VERSION,
};
use crossbeam_channel::{RecvTimeoutError, Sender};
use std::io::Read;
use crate::transport::{self, PeerIdentity, Stream};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[path = "destination_accept.rs"]
mod accept;
use accept::*;
#[path = "destination_replay.rs"]
pub(super) mod replay;

/// Provides the destination's memory once the source's region table is known.
///
/// It is called only for a control Hello that passed every check that needs no memory, and
/// may be called again: a handshake can still be refused after it (the layout it returned
/// differs from the source's, or postcopy is not possible on it), and then the destination
/// drops the memory it returned — before serving anyone else — and keeps listening for the
/// right source, whose Hello calls it anew. A provider that creates something for the memory
/// (a file, a VM) should undo it when the memory is dropped unused, and must serve a second
/// call (see `pageferry recv`'s image file, removed when a refused handshake drops it).
/// An `Err` is a refusal too: the source is told why, and the destination keeps listening.
pub type ProvideMemory<'a> = dyn FnMut(&[(String, u64)]) -> Result<GuestMemory, String> + 'a;

/// Rounds completed by all channels; readers wait here at the end of each round.
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
    channels: usize,
    /// A channel that reaches the end of a round waits here for the others (the session's
    /// threads); `false` in the single-threaded replay, whose scheduler does not step a
    /// channel that is waiting (see [`Reader::waiting`]).
    blocking: bool,
    /// Readers hold it shared while applying a packet; the control loop sets it (exclusively)
    /// once the final round is complete, so nothing changes memory during verification or
    /// after the workload resumes.
    closed: std::sync::RwLock<bool>,
    /// Postcopy's round and placer, once the switchover is done: pages of that round are
    /// placed through userfaultfd, never written directly.
    postcopy: Mutex<Option<(u32, Arc<Placer>)>>,
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
    fn new(channels: usize, blocking: bool) -> Self {
        Gate { state: Mutex::new(GateState::default()), cv: Condvar::new(), channels, blocking, closed: std::sync::RwLock::new(false), postcopy: Mutex::new(None) }
    }

    /// Called by a channel that delivered all of `round`; returns when all channels have
    /// (at once when not `blocking`).
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
        while self.blocking && s.round == round && !s.failed {
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

struct Reader<'a, S: Read = Stream> {
    idx: usize,
    sock: S,
    memory: &'a GuestMemory,
    /// Methods packets may name: the session's one, or (auto) every announced method.
    accepted: Vec<Method>,
    /// A decoder per accepted method, opened at its first compressed packet.
    codecs: Vec<Option<Box<dyn Codec>>>,
    /// Options for opening them (qatzip provider and library).
    spec: &'a CodecSpec,
    gate: &'a Gate,
    counters: &'a Counters,
    fresh: &'a [bool],
    events: Sender<Event>,
    /// For compressed batches of scattered pages only.
    bounce: Vec<u8>,
    zero_copy: bool,
    /// Postcopy's urgent channel: no rounds or syncs, postcopy pages only.
    urgent: bool,
    /// The packet number expected next.
    next_num: u64,
    /// The last round this channel synced (it waits at the gate until that round completes).
    synced: Option<u32>,
    stall: Duration,
    /// The end of the stream between packets is the source going quiet, not a failure (the
    /// in-memory replay, [`replay::replay_destination`], which steps its streams in turn).
    quiet_end: bool,
}

/// What every reader of one destination session shares (see [`Reader::new`]).
struct ReaderShared<'a> {
    memory: &'a GuestMemory,
    accepted: &'a [Method],
    config: &'a DestinationConfig,
    gate: &'a Gate,
    counters: &'a Counters,
    fresh: &'a [bool],
    events: &'a Sender<Event>,
}

impl<'a, S: Read> Reader<'a, S> {
    /// A reader for data channel `idx` (or postcopy's urgent channel), the one constructor the
    /// session's threads and the in-memory replay share.
    fn new(shared: &ReaderShared<'a>, idx: usize, sock: S, urgent: bool, quiet_end: bool) -> Self {
        Reader {
            idx,
            sock,
            memory: shared.memory,
            accepted: shared.accepted.to_vec(),
            codecs: shared.accepted.iter().map(|_| None).collect(),
            spec: &shared.config.codec,
            gate: shared.gate,
            counters: shared.counters,
            fresh: shared.fresh,
            events: shared.events.clone(),
            bounce: vec![0u8; MAX_BATCH_BYTES],
            zero_copy: shared.config.zero_copy,
            urgent,
            next_num: 0,
            synced: None,
            stall: shared.config.stall_timeout,
            quiet_end,
        }
    }
}

impl<S: Read> Reader<'_, S> {
    fn err(&self, source: WireError) -> MigrationError {
        let round = self.gate.current();
        if super::link::is_timeout(&source) {
            return MigrationError::Stalled(format!("no data from the source on channel {} for {} (round {round}; --stall-timeout)", self.idx, super::link::secs(self.stall)));
        }
        let source = match source {
            WireError::Closed(_) => WireError::Closed(format!(" (channel {}, round {round}: did the source die?)", self.idx)),
            s => s,
        };
        MigrationError::Wire { channel: format!("channel {} in round {round}", self.idx), cause: source }
    }

    fn run(mut self) {
        let mut bufs = RxBufs::default();
        while self.step(&mut bufs) {}
    }

    /// Read and apply one packet; false once the stream ended or failed (reported).
    fn step(&mut self, bufs: &mut RxBufs) -> bool {
        let mut hdr = [0u8; PACKET_HEADER_LEN];
        let first = loop {
            match self.sock.read(&mut hdr[..1]) {
                // A stopped and continued process (SIGSTOP/SIGCONT) sees EINTR: not a failure.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        match first {
            // End of stream at a packet boundary: fine once the migration finished.
            Ok(0) => {
                self.stream_ended(WireError::Closed(String::new()));
                return false;
            }
            Ok(_) => {}
            Err(e) => {
                self.stream_ended(WireError::Io(e));
                return false;
            }
        }
        let r = wire::read_exact(&mut self.sock, &mut hdr[1..], "inside a packet header").map_err(PacketError::from).and_then(|_| self.packet(&hdr, bufs));
        if let Err(e) = r {
            let e = match e {
                PacketError::Wire(w) => self.err(w),
                PacketError::Other(m) => m,
            };
            let _ = self.events.send(Event::Failed(e));
            return false;
        }
        true
    }

    /// Waiting at the gate: this channel synced a round the others have not all finished.
    fn waiting(&self) -> bool {
        self.synced.is_some_and(|r| self.gate.current() <= r)
    }

    /// The data channel ended between packets: a failure unless the migration finished.
    fn stream_ended(&self, cause: WireError) {
        if !self.gate.state.lock().unwrap().finished && !(self.quiet_end && matches!(cause, WireError::Closed(_))) {
            let _ = self.events.send(Event::Failed(self.err(cause)));
        }
    }

    /// One packet: validate → receive → apply.
    fn packet(&mut self, hdr: &[u8; PACKET_HEADER_LEN], bufs: &mut RxBufs) -> Result<(), PacketError> {
        let (h, placer) = self.validate(hdr)?;
        if let (Some(placer), PacketKind::Pages) = (placer, h.kind) {
            return self.postcopy_packet(&h, hdr, &placer, bufs);
        }
        if h.kind == PacketKind::Sync {
            return self.sync(hdr, &h);
        }
        // Held while the packet is applied; the control loop takes it exclusively once the
        // final round is complete, so nothing changes memory during verification or after the
        // workload resumed.
        let closed = self.gate.closed.read().unwrap();
        if *closed {
            return Err(WireError::malformed("packet", "pages after the final round").into());
        }
        // Checked before the switchover began, applied after it (the switchover waits for
        // packets being applied, see `start_postcopy`): its pages may be discarded already.
        if self.gate.postcopy.lock().unwrap().is_some() {
            return Err(WireError::malformed("packet", format!("of round {} sent before the destination reported postcopy running", h.round)).into());
        }
        let region = self.region(&h)?;
        let mut runs = self.receive_offsets(&h, &region, bufs)?;
        let received = self.receive(hdr, &h, bufs, &mut runs)?;
        self.apply(&h, &region, received, bufs, &mut runs)
    }

    /// What the header says that this channel's state must agree with: the session's method,
    /// the next packet number, the current round (or postcopy's, whose placer is returned).
    fn validate(&mut self, hdr: &[u8; PACKET_HEADER_LEN]) -> Result<(PacketHeader, Option<Arc<Placer>>), PacketError> {
        let h = PacketHeader::decode(hdr)?;
        if !self.accepted.iter().any(|m| m.code() == h.method) {
            let detail = match &self.accepted[..] {
                [one] => format!("method {} on a {one} migration", method_name(h.method)),
                all => format!("method {}, which the destination did not announce (it decodes {})", method_name(h.method), all.iter().map(|m| m.name()).collect::<Vec<_>>().join(", ")),
            };
            return Err(WireError::malformed("packet", detail).into());
        }
        if h.packet_num != self.next_num {
            return Err(WireError::malformed("packet", format!("number {} where {} was expected", h.packet_num, self.next_num)).into());
        }
        self.next_num += 1;
        let switched = self.gate.postcopy.lock().unwrap().as_ref().map(|(r, p)| (*r, p.clone()));
        let placer = match switched {
            Some((r, p)) if r == h.round => Some(p),
            // Every page of another round would be written straight into memory whose
            // discarded pages are registered missing: the writer would block until the source
            // sends them, and a hostile one never does.
            Some((r, _)) => return Err(WireError::malformed("packet", format!("of round {} after the switchover to postcopy in round {r}", h.round)).into()),
            None => None,
        };
        if self.urgent && (h.kind == PacketKind::Sync || placer.is_none()) {
            return Err(WireError::malformed("urgent packet", format!("{:?} of round {} outside postcopy", h.kind, h.round)).into());
        }
        let round = self.gate.current();
        if h.round != round && !self.urgent {
            return Err(WireError::malformed("packet", format!("of round {} during round {round} (stale or early)", h.round)).into());
        }
        Ok((h, placer))
    }

    /// End of the round on this channel: wait at the gate for the others.
    fn sync(&mut self, hdr: &[u8; PACKET_HEADER_LEN], h: &PacketHeader) -> Result<(), PacketError> {
        let mut crc = [0u8; 4];
        wire::read_exact(&mut self.sock, &mut crc, "in a sync packet")?;
        PacketCrc::new().check(hdr, crc)?;
        self.gate.arrive(h.round, &self.events)?;
        self.synced = Some(h.round);
        Ok(())
    }

    fn region(&self, h: &PacketHeader) -> Result<Arc<dyn MemoryRegion>, WireError> {
        let n = self.memory.regions().len();
        self.memory.region(h.region as usize).cloned().ok_or_else(|| WireError::malformed("packet", format!("region {} does not exist ({n} regions)", h.region)))
    }

    /// Round 0 into fresh memory: zero pages need no writing, and pages are populated first.
    fn fresh_round(&self, h: &PacketHeader) -> bool {
        h.round == 0 && self.fresh[h.region as usize]
    }

    /// Read and check the page offsets; the normal pages' runs as slices of guest memory.
    fn receive_offsets<'m>(&mut self, h: &PacketHeader, region: &'m Arc<dyn MemoryRegion>, bufs: &mut RxBufs) -> Result<Vec<&'m mut [u8]>, PacketError> {
        let offsets = &mut bufs.offsets[..h.offsets_len()];
        wire::read_exact(&mut self.sock, offsets, "in page offsets")?;
        decode_offsets(h, offsets, region.pages(), &mut bufs.normal, &mut bufs.zero)?;
        let base = region.host_ptr();
        // SAFETY: offsets were checked against the region and are strictly increasing, so
        // the runs lie inside it and do not overlap.
        let runs: Vec<&mut [u8]> =
            page_runs(&bufs.normal).map(|(first, n)| unsafe { std::slice::from_raw_parts_mut(base.add(first as usize * PAGE_SIZE), n as usize * PAGE_SIZE) }).collect();
        if self.fresh_round(h) {
            // Fresh memory: allocate the batch's pages in one call instead of one page fault
            // per 4 KiB page in the middle of decompression (faults are this path's largest
            // cost after the codec). Best effort: without it the pages fault in as usual.
            for r in runs.iter() {
                // SAFETY: a range inside the region; populating changes no contents.
                unsafe { libc::madvise(r.as_ptr() as *mut libc::c_void, r.len(), libc::MADV_POPULATE_WRITE) };
            }
        }
        Ok(runs)
    }

    /// Read the payload and the CRC, and check the CRC. Raw pages go from the socket straight
    /// into place (scattered reads for scattered pages); a CRC mismatch then fails the whole
    /// migration, so unverified bytes never count as migrated. Anything else goes to the
    /// payload buffer first.
    fn receive(&mut self, hdr: &[u8; PACKET_HEADER_LEN], h: &PacketHeader, bufs: &mut RxBufs, runs: &mut [&mut [u8]]) -> Result<Received, PacketError> {
        let offsets = &bufs.offsets[..h.offsets_len()];
        let mut crc = [0u8; 4];
        // Zero pages only (no payload: the source does not mark these raw) take the raw path
        // too: there is nothing to decompress, and a codec asked to inflate nothing may fail.
        if (h.raw && self.zero_copy) || bufs.normal.is_empty() {
            read_exact_vectored(&mut self.sock, runs).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => WireError::Closed(" in a payload".into()),
                _ => WireError::Io(e),
            })?;
            wire::read_exact(&mut self.sock, &mut crc, "in a packet checksum")?;
            runs.iter().fold(PacketCrc::new().body(offsets), |c, r| c.body(r)).check(hdr, crc)?;
            return Ok(Received::InPlace);
        }
        let len = h.payload_len as usize;
        wire::read_exact(&mut self.sock, &mut bufs.payload[..len], "in a payload")?;
        wire::read_exact(&mut self.sock, &mut crc, "in a packet checksum")?;
        PacketCrc::new().body(offsets).body(&bufs.payload[..len]).check(hdr, crc)?;
        Ok(Received::Payload(len))
    }

    /// Put a checked packet's pages in place: the payload (decompressed or raw), zeros for
    /// the zero pages; count them.
    fn apply(&mut self, h: &PacketHeader, region: &Arc<dyn MemoryRegion>, received: Received, bufs: &RxBufs, runs: &mut [&mut [u8]]) -> Result<(), PacketError> {
        if let Received::Payload(len) = received {
            self.place(h, &bufs.payload[..len], runs)?;
        }
        if !self.fresh_round(h) {
            let base = region.host_ptr();
            for &p in bufs.zero.iter() {
                // SAFETY: zero pages were checked against the region like the others.
                unsafe { std::ptr::write_bytes(base.add(p as usize * PAGE_SIZE), 0, PAGE_SIZE) };
            }
        }
        Counters::add(&self.counters.normal_pages, bufs.normal.len() as u64);
        Counters::add(&self.counters.zero_pages, bufs.zero.len() as u64);
        Counters::add(&self.counters.wire_bytes, h.wire_len() as u64);
        Ok(())
    }

    /// A payload read into the buffer: decompressed straight into place when contiguous,
    /// through the bounce buffer when scattered; raw (zero copy turned off, for measurement)
    /// copied.
    fn place(&mut self, h: &PacketHeader, payload: &[u8], runs: &mut [&mut [u8]]) -> Result<(), PacketError> {
        if h.raw {
            copy_into_runs(payload, runs);
            return Ok(());
        }
        let (idx, round) = (self.idx, h.round);
        let decode_err = |cause| PacketError::Other(MigrationError::Codec { channel: format!("channel {idx} in round {round}"), cause });
        let codec = decoder(&mut self.codecs, &self.accepted, self.spec, h.method, || format!("channel {idx} in round {round}"))?;
        if runs.len() == 1 && self.zero_copy {
            codec.decompress(payload, runs[0]).map_err(decode_err)?;
        } else {
            let n_bytes = runs.iter().map(|r| r.len()).sum();
            let bounce = &mut self.bounce[..n_bytes];
            codec.decompress(payload, bounce).map_err(decode_err)?;
            copy_into_runs(bounce, runs);
        }
        Ok(())
    }
}

/// Copy `from` into `runs`, one after the other.
fn copy_into_runs(from: &[u8], runs: &mut [&mut [u8]]) {
    let mut at = 0;
    for r in runs.iter_mut() {
        r.copy_from_slice(&from[at..at + r.len()]);
        at += r.len();
    }
}

/// A reader's receive buffers, one batch each.
struct RxBufs {
    payload: Vec<u8>,
    offsets: Vec<u8>,
    normal: Vec<u32>,
    zero: Vec<u32>,
}

impl Default for RxBufs {
    fn default() -> Self {
        Self {
            payload: vec![0u8; MAX_BATCH_BYTES],
            offsets: vec![0u8; 2 * codec::MAX_BATCH_PAGES * 4],
            normal: Vec::with_capacity(codec::MAX_BATCH_PAGES),
            zero: Vec::with_capacity(codec::MAX_BATCH_PAGES),
        }
    }
}

/// Where a packet's payload went.
enum Received {
    /// Raw pages read straight into guest memory (or no payload).
    InPlace,
    /// This many bytes in the payload buffer.
    Payload(usize),
}

impl<S: Read> Reader<'_, S> {
    /// A page packet of the postcopy round: checked like any other, decoded into a buffer,
    /// then placed atomically (pages already present are left alone).
    fn postcopy_packet(&mut self, h: &PacketHeader, hdr: &[u8; PACKET_HEADER_LEN], placer: &Placer, bufs: &mut RxBufs) -> Result<(), PacketError> {
        let region = self.region(h)?;
        let RxBufs { payload, offsets, normal, zero } = bufs;
        let offsets = &mut offsets[..h.offsets_len()];
        wire::read_exact(&mut self.sock, offsets, "in page offsets")?;
        decode_offsets(h, offsets, region.pages(), normal, zero)?;
        let len = h.payload_len as usize;
        let mut crc = [0u8; 4];
        wire::read_exact(&mut self.sock, &mut payload[..len], "in a payload")?;
        wire::read_exact(&mut self.sock, &mut crc, "in a packet checksum")?;
        PacketCrc::new().body(offsets).body(&payload[..len]).check(hdr, crc)?;
        let n_bytes = normal.len() * PAGE_SIZE;
        let data: &[u8] = if h.raw || normal.is_empty() {
            &payload[..len]
        } else {
            let idx = self.idx;
            let codec = decoder(&mut self.codecs, &self.accepted, self.spec, h.method, || format!("channel {idx} in postcopy"))?;
            codec
                .decompress(&payload[..len], &mut self.bounce[..n_bytes])
                .map_err(|cause| PacketError::Other(MigrationError::Codec { channel: format!("channel {idx} in postcopy"), cause }))?;
            &self.bounce[..n_bytes]
        };
        let closed = self.gate.closed.read().unwrap();
        if *closed {
            // Postcopy is complete: a late answer to a request whose page came by the other
            // path meanwhile. Nothing to place.
            return Ok(());
        }
        placer
            .place(h.region, normal, data, zero)
            .map_err(|e| PacketError::Other(MigrationError::Postcopy(format!("placing pages: {e}"))))?;
        drop(closed);
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
///
/// Lifecycle [`Event::Status`](super::Event::Status) events go to
/// [`DestinationConfig::events`]: `Setup` first, `Active` once the session's channels are
/// accepted, `Device` when the source's final state arrived (or `PostcopyActive` when the
/// guest starts here in postcopy), and exactly one of `Completed`, `Failed`, `Cancelled` last.
pub fn run_destination_with(
    listener: &TcpListener,
    provide: &mut ProvideMemory,
    workload: &mut dyn DestinationWorkload,
    config: &DestinationConfig,
) -> Result<(DestinationReport, GuestMemory), MigrationError> {
    config.events.emit(Note::Status(MigrationStatus::Setup));
    let result = destination_session(listener, provide, workload, config);
    config.events.emit(Note::Status(match &result {
        Ok(_) => MigrationStatus::Completed,
        Err(MigrationError::Cancelled { .. }) => MigrationStatus::Cancelled,
        Err(_) => MigrationStatus::Failed,
    }));
    result
}

fn destination_session(
    listener: &TcpListener,
    provide: &mut ProvideMemory,
    workload: &mut dyn DestinationWorkload,
    config: &DestinationConfig,
) -> Result<(DestinationReport, GuestMemory), MigrationError> {
    let cpu = CpuMeter::start();
    if config.only {
        // A restricted destination checks its one decoder before accepting anyone.
        codec::open(&config.codec).map_err(|source| MigrationError::Codec { channel: "setup".into(), cause: source })?;
    }
    let Session { control, data, urgent, hello, memory, version, accepted } = accept_session(listener, provide, config)?;
    let deadline = config.timeout.map(|t| accepted + t);
    config.events.emit(Note::Status(MigrationStatus::Active));
    // Every read and write on every channel is bounded by the stall timeout; the source sends
    // keepalives on control, so a silent control channel is a dead one.
    control.set_read_timeout(Some(config.stall_timeout)).ok();
    // Methods the packets may name, and who decodes them (for the report).
    let accepted = accepted_methods(&hello, config);
    let mut providers = Vec::new();
    for &m in accepted.iter().filter(|m| m.compresses()) {
        let spec = CodecSpec { method: m, level: m.default_level(), qatzip: config.codec.qatzip.clone() };
        let info = codec::open(&spec).map_err(|source| MigrationError::Codec { channel: "setup".into(), cause: source })?.info();
        // (An auto session lists every method; notes only for the one a session uses.)
        if let (Some(note), false) = (info.note, hello.wants.auto) {
            config.events.emit(Note::CodecNote { method: info.method.to_string(), note });
        }
        providers.push(info.provider);
    }
    let provider = if providers.is_empty() { "none".to_string() } else { providers.join(", ") };
    let memory = &memory;
    let fresh: Vec<bool> = memory.regions().iter().map(|r| r.is_fresh_zeroed()).collect();
    let counters = Counters::default();
    let gate = Gate::new(data.len(), true);
    // Control frames are written by the control loop and, in postcopy, the fault thread.
    let ctl_w = Arc::new(Mutex::new(control.try_clone().map_err(|e| MigrationError::Other(format!("control socket: {e}")))?));
    let (ev_tx, ev_rx) = crossbeam_channel::unbounded::<Event>();

    let mut ctl_reader = control.try_clone().map_err(|e| MigrationError::Other(format!("control socket: {e}")))?;
    let link = super::link::ControlLink::shared(ctl_w.clone(), config.stall_timeout, version).map_err(|e| MigrationError::Other(format!("control socket: {e}")))?;
    link.spawn_keepalive(config.stall_timeout).map_err(|e| MigrationError::Other(format!("spawn: {e}")))?;
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

    let shared = ReaderShared { memory, accepted: &accepted, config, gate: &gate, counters: &counters, fresh: &fresh, events: &ev_tx };
    let result = std::thread::scope(|scope| {
        let mut socks = Vec::new();
        let n_data = data.len();
        for (idx, sock) in data.into_iter().chain(urgent).enumerate() {
            let urgent = idx == n_data;
            // The urgent channel may stay silent for the whole pre-copy phase.
            sock.set_read_timeout(if urgent { None } else { Some(config.stall_timeout) }).ok();
            socks.push(sock.try_clone().map_err(|e| MigrationError::Other(format!("socket: {e}")))?);
            let reader = Reader::new(&shared, idx, sock, urgent, false);
            std::thread::Builder::new()
                .name(if urgent { "pf-urgent-rx".into() } else { format!("pf-c{idx}-rx") })
                .spawn_scoped(scope, move || reader.run())
                .map_err(|e| MigrationError::Other(format!("spawn: {e}")))?;
        }
        let outcome = control_loop(&mut &ev_rx, &ctl_w, version, memory, workload, &gate, &counters, &cpu, &provider, hello.verify, hello.wants.postcopy, deadline, config);
        if outcome.is_err() {
            // A postcopy that fails keeps its registration: whatever waits on a missing page
            // stays blocked rather than reading zeros (state kept, as QEMU's postcopy-paused).
            if let Some((_, p)) = gate.postcopy.lock().unwrap().as_ref() {
                p.abandon();
            }
        }
        // The first failure anywhere ends every channel at once: tell the source why (it
        // prints the same), then close everything so nothing waits for a timeout.
        match &outcome {
            Err(MigrationError::Cancelled { by: Side::Destination }) => link.send_last(&Control::Cancel { by: Side::Destination.to_string() }),
            Err(MigrationError::Cancelled { .. }) | Err(MigrationError::PeerAborted(_)) => {}
            Err(e) => link.send_last(&Control::Abort { reason: e.to_string() }),
            Ok(_) => link.stop(),
        }
        // Unblock readers (at the gate or in read) so the scope can end.
        gate.fail();
        for s in &socks {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        outcome
    });
    link.shutdown();
    result.map(|r| (r, memory.clone()))
}

/// Methods a session's packets may name: the Hello's, or (auto) every method announced.
fn accepted_methods(hello: &Hello, config: &DestinationConfig) -> Vec<Method> {
    if hello.wants.auto {
        capabilities(config).methods.iter().filter_map(|c| Method::from_code(c.code)).collect()
    } else {
        Method::from_code(hello.method).into_iter().collect()
    }
}

/// Postcopy on the destination while it runs: the placer and the fault thread.
struct PostcopyRun {
    round: u32,
    placer: Arc<Placer>,
    stop: Arc<FaultStop>,
    fault_thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    started: Instant,
}

impl PostcopyRun {
    fn stop_faults(&mut self) -> Result<(), String> {
        self.stop.stop();
        match self.fault_thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the fault thread panicked".into()),
            None => Ok(()),
        }
    }
}

impl Drop for PostcopyRun {
    fn drop(&mut self) {
        let _ = self.stop_faults();
    }
}

fn send_ctl<W: std::io::Write>(ctl: &Mutex<W>, version: u16, msg: &Control, blob: &[u8]) -> Result<(), WireError> {
    wire::write_frame(&mut *ctl.lock().unwrap(), version, msg, blob)
}

/// Switch to postcopy: register memory, discard the pages still dirty on the source, start
/// asking for pages, start the workload.
#[allow(clippy::too_many_arguments)]
fn start_postcopy<W: std::io::Write + Send + 'static>(
    version: u16,
    round: u32,
    discard: &[(u16, u32, u32)],
    state: &[u8],
    ctl: &Arc<Mutex<W>>,
    memory: &GuestMemory,
    workload: &mut dyn DestinationWorkload,
    gate: &Gate,
) -> Result<PostcopyRun, MigrationError> {
    let started = Instant::now();
    // No packet is being applied while memory is registered and pages are discarded (a
    // direct write into a discarded page would block on it); later ones see the placer.
    let applying = gate.closed.write().unwrap();
    let placer = Arc::new(Placer::start(memory, discard).map_err(MigrationError::Postcopy)?);
    *gate.postcopy.lock().unwrap() = Some((round, placer.clone()));
    drop(applying);
    let stop = Arc::new(FaultStop::new().map_err(MigrationError::Postcopy)?);
    let (p, st, c) = (placer.clone(), stop.clone(), ctl.clone());
    let fault_thread = std::thread::Builder::new()
        .name("pf-dst-faults".into())
        .spawn(move || {
            p.serve_faults(&st, &mut |region, pages| {
                send_ctl(&c, version, &Control::PageRequest { region, pages }, &[]).map_err(|e| format!("asking the source for pages: {e}"))
            })
        })
        .map_err(|e| MigrationError::Other(format!("spawn: {e}")))?;
    let mut run = PostcopyRun { round, placer, stop, fault_thread: Some(fault_thread), started };
    if let Err(cause) = workload.resume(state) {
        let _ = run.stop_faults();
        return Err(MigrationError::Postcopy(format!("the workload did not start: {cause}")));
    }
    send_ctl(ctl, version, &Control::PostcopyRunning, &[]).map_err(|e| MigrationError::Postcopy(format!("control channel: {e}")))?;
    Ok(run)
}

/// Where the control loop's events come from: the session's reader and control threads (a
/// channel), or the in-memory replay, which steps its streams as the loop asks.
trait EventSource {
    fn recv_timeout(&mut self, wait: Duration) -> Result<Event, RecvTimeoutError>;
    fn recv_deadline(&mut self, until: Instant) -> Result<Event, RecvTimeoutError>;
}

impl EventSource for &crossbeam_channel::Receiver<Event> {
    fn recv_timeout(&mut self, wait: Duration) -> Result<Event, RecvTimeoutError> {
        crossbeam_channel::Receiver::recv_timeout(self, wait)
    }
    fn recv_deadline(&mut self, until: Instant) -> Result<Event, RecvTimeoutError> {
        crossbeam_channel::Receiver::recv_deadline(self, until)
    }
}

#[allow(clippy::too_many_arguments)]
fn control_loop<W: std::io::Write + Send + 'static>(
    events: &mut dyn EventSource,
    ctl: &Arc<Mutex<W>>,
    version: u16,
    memory: &GuestMemory,
    workload: &mut dyn DestinationWorkload,
    gate: &Gate,
    counters: &Counters,
    cpu: &CpuMeter,
    provider: &str,
    announced_verify: bool,
    announced_postcopy: bool,
    deadline: Option<Instant>,
    config: &DestinationConfig,
) -> Result<DestinationReport, MigrationError> {
    let ctl_err = |source| MigrationError::Wire { channel: "control channel".into(), cause: source };
    let mut completed: Option<u32> = None;
    let mut finish: Option<(u32, Option<String>, Vec<u8>)> = None;
    let mut postcopy: Option<PostcopyRun> = None;
    let mut incomplete_since: Option<Instant> = None;
    let mut peak_rss = 0u64;
    let mut sampled: Option<Instant> = None;
    loop {
        // Memory ~10×/s (reading /proc costs tens of µs; events come much faster).
        if sampled.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
            peak_rss = peak_rss.max(super::stats::rss_anon_bytes());
            sampled = Some(Instant::now());
        }
        if let (Some((f, _, _)), Some(c)) = (&finish, completed) {
            if c >= *f {
                break;
            }
        }
        if config.cancel.is_cancelled() && postcopy.is_none() && finish.is_none() {
            return Err(MigrationError::Cancelled { by: Side::Destination });
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            // The source hears this in the Abort (it resumes: nothing was committed here).
            let e = MigrationError::TimedOut(format!(
                "timed out after {} (the destination's --timeout) in round {}",
                super::link::secs(config.timeout.unwrap_or_default()),
                gate.current()
            ));
            return Err(if postcopy.is_some() { MigrationError::Postcopy(e.to_string()) } else { e });
        }
        if let (Some(pc), Some(c)) = (&postcopy, completed) {
            if c >= pc.round {
                // Every channel delivered the background push; requested pages may still be
                // on their way on the urgent channel.
                if pc.placer.remaining() == 0 {
                    break;
                }
                let since = *incomplete_since.get_or_insert_with(Instant::now);
                if since.elapsed() > config.stall_timeout {
                    return Err(MigrationError::Postcopy(format!(
                        "the source finished sending but {} discarded pages never arrived",
                        pc.placer.remaining()
                    )));
                }
            }
        }
        let wait = if postcopy.is_some() { Duration::from_millis(2) } else { Duration::from_millis(100) };
        let event = match events.recv_timeout(wait) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => continue, // sample memory ~10×/s while waiting
            // No stream can say anything more (the replay's input ended).
            Err(RecvTimeoutError::Disconnected) => {
                let missing = postcopy.as_ref().map_or(0, |pc| pc.placer.remaining());
                let e = format!(
                    "every channel ended in round {} without completing the migration{}",
                    gate.current(),
                    if missing > 0 { format!(" ({missing} discarded pages never arrived)") } else { String::new() }
                );
                return Err(if postcopy.is_some() { MigrationError::Postcopy(e) } else { MigrationError::Other(e) });
            }
        };
        let in_postcopy = |e: MigrationError| if postcopy.is_some() { MigrationError::Postcopy(e.to_string()) } else { e };
        match event {
            Event::RoundComplete(k) => {
                completed = Some(k);
                if postcopy.is_none() {
                    send_ctl(ctl, version, &Control::RoundDone { round: k, pages: counters.pages() }, &[]).map_err(|e| ctl_write_err(e, config))?;
                }
            }
            Event::Failed(e) => {
                // A source that gives up sends Abort on control and then closes its data
                // channels; report its reason rather than the closed channel it caused.
                let until = Instant::now() + Duration::from_millis(200);
                while let Ok(ev) = events.recv_deadline(until) {
                    match ev {
                        Event::Control(Ok((Control::Abort { reason }, _))) => return Err(in_postcopy(MigrationError::PeerAborted(reason))),
                        Event::Control(Ok((Control::Cancel { .. }, _))) => return Err(in_postcopy(MigrationError::Cancelled { by: Side::Source })),
                        // The control link died too, without a word: that is the cause (the
                        // source closes its data channels when it loses control).
                        Event::Control(Err(WireError::Closed(_))) => {
                            return Err(in_postcopy(MigrationError::Other(format!("the source closed the control channel during round {} (did it die?), then {e}", gate.current()))))
                        }
                        _ => {}
                    }
                }
                return Err(in_postcopy(e));
            }
            Event::Control(Ok((Control::Finish { round, digest }, state))) => {
                if finish.is_some() || postcopy.is_some() || completed.is_some_and(|c| c > round) {
                    return Err(ctl_err(WireError::malformed("Finish", format!("for round {round} after round {completed:?}"))));
                }
                finish = Some((round, digest, state));
                // The source is paused: its last pages and device state are on their way.
                config.events.emit(Note::Status(MigrationStatus::Device));
            }
            Event::Control(Ok((Control::Postcopy { round, discard }, state))) => {
                // Only a source that announced postcopy in its Hello (which a verifying
                // destination refuses) may switch: postcopy completes without a digest.
                if !announced_postcopy {
                    return Err(ctl_err(WireError::malformed("Postcopy", "the source did not announce postcopy in its Hello")));
                }
                if finish.is_some() || postcopy.is_some() || completed.map_or(0, |c| c + 1) != round {
                    return Err(ctl_err(WireError::malformed("Postcopy", format!("for round {round} after round {completed:?}"))));
                }
                postcopy = Some(start_postcopy(version, round, &discard, &state, ctl, memory, workload, gate)?);
                config.events.emit(Note::Status(MigrationStatus::PostcopyActive));
            }
            Event::Control(Ok((Control::Abort { reason }, _))) => return Err(in_postcopy(MigrationError::PeerAborted(reason))),
            Event::Control(Ok((Control::Cancel { .. }, _))) => return Err(in_postcopy(MigrationError::Cancelled { by: Side::Source })),
            Event::Control(Ok((Control::Keepalive, _))) => {}
            Event::Control(Ok((other, _))) => return Err(in_postcopy(ctl_err(WireError::malformed("control message", format!("unexpected {other:?}"))))),
            Event::Control(Err(WireError::Closed(_))) => {
                return Err(in_postcopy(MigrationError::Other(format!("the source closed the control channel during round {} (did it die?)", gate.current()))))
            }
            Event::Control(Err(e)) if super::link::is_timeout(&e) => {
                return Err(in_postcopy(MigrationError::Stalled(format!(
                    "no control message from the source for {} (round {}; --stall-timeout)",
                    super::link::secs(config.stall_timeout),
                    gate.current()
                ))))
            }
            Event::Control(Err(e)) => return Err(in_postcopy(ctl_err(e))),
        }
    }
    if let Some(mut pc) = postcopy {
        // Complete: stop asking, unregister, report.
        gate.state.lock().unwrap().finished = true;
        *gate.closed.write().unwrap() = true;
        pc.stop_faults().map_err(MigrationError::Postcopy)?;
        pc.placer.finish();
        let report = DestinationReport {
            postcopy: Some(PostcopyStats { duration_ms: pc.started.elapsed().as_secs_f64() * 1000.0, ..pc.placer.stats() }),
            ..final_report(cpu, counters, provider, peak_rss, pc.round + 1)
        };
        // All memory is here and the guest runs here; the source only misses the news.
        return Ok(send_done(ctl, version, report));
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
    let report = DestinationReport { verify_ms, verified, ..final_report(cpu, counters, provider, peak_rss, round + 1) };
    // The guest runs here now; a source without Done stays paused and says so.
    Ok(send_done(ctl, version, report))
}

/// The destination's report at completion (pre-copy or postcopy): what every path shares.
fn final_report(cpu: &CpuMeter, counters: &Counters, provider: &str, peak_rss: u64, rounds: u32) -> DestinationReport {
    let (cpu_s, wall_s) = cpu.read();
    DestinationReport {
        cpu_s,
        wall_s,
        pages: counters.pages(),
        zero_pages: counters.zero_pages.load(Relaxed),
        wire_bytes: counters.wire(),
        rounds,
        provider: provider.to_string(),
        peak_rss_anon_bytes: peak_rss.max(super::stats::rss_anon_bytes()),
        ..Default::default()
    }
}

/// Send Done with `report`; past the commit point a failed send is noted in the report, not an
/// error (the guest runs here whatever the source hears).
fn send_done<W: std::io::Write>(ctl: &Mutex<W>, version: u16, mut report: DestinationReport) -> DestinationReport {
    if send_ctl(ctl, version, &Control::Done { report: report.clone() }, &[]).is_err() {
        report.done_not_delivered = true;
    }
    report
}
