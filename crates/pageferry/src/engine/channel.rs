//! The source side of one data channel: `pipeline_depth` compression workers feeding one
//! socket writer through a bounded queue, so compressing the next batch overlaps sending the
//! previous one (and several batches can be in flight to an accelerator).
//!
//! A worker turns a [`Batch`] (≤ 128 dirty pages of one region) into a packet: it finds zero
//! pages (sent as offsets only), compresses the remaining pages — straight from guest memory
//! when they are contiguous, from a gathered copy otherwise — and falls back to raw when the
//! payload would not shrink. Payload bytes that go on the wire must not change between the
//! CRC and the send, so raw pages of memory the guest may write are copied first; pages of
//! static memory are written to the socket straight from guest memory.

use super::auto::{AutoSelector, Encoders, LinkMeter};
use super::policy::Choice;
use super::ratelimit::RateLimiter;
use super::stats::Counters;
use crate::codec::{Codec, CodecError, MAX_BATCH_BYTES};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::wire::{encode_offsets, page_runs, MethodCode, PacketCrc, PacketHeader, PacketKind};
use crossbeam_channel::{Receiver, Sender};
use std::io::{IoSlice, Write};
use crate::transport::Stream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};

/// Up to 128 pages of one region, in increasing order.
pub struct Batch {
    pub region: u16,
    pub round: u32,
    pub pages: Vec<u32>,
}

/// Payload bytes of a packet.
pub enum Payload {
    None,
    /// A buffer owned by the worker's pool (compressed output or a stable copy).
    Owned(Vec<u8>, usize),
    /// Runs of guest memory of a static source, written to the socket directly.
    Guest(Vec<(*const u8, usize)>),
}

// SAFETY: Guest points into a GuestMemory region kept alive by the migration (Arc in the
// worker and socket threads) and only read.
unsafe impl Send for Payload {}

impl Payload {
    /// The payload as one or more slices, in order.
    fn slices(&self) -> Vec<&[u8]> {
        match self {
            Payload::None => vec![],
            Payload::Owned(v, n) => vec![&v[..*n]],
            // SAFETY: see the Send impl.
            Payload::Guest(runs) => runs.iter().map(|&(p, n)| unsafe { std::slice::from_raw_parts(p, n) }).collect(),
        }
    }
    fn len(&self) -> usize {
        self.slices().iter().map(|s| s.len()).sum()
    }
}

/// What the socket writer receives.
pub enum ToSocket {
    Packet {
        header: PacketHeader,
        offsets: Vec<u8>,
        payload: Payload,
        /// CRC32C of offsets + payload; the writer appends the header once the packet number
        /// is known.
        body_crc: u32,
        recycle: Sender<Vec<u8>>,
    },
    Sync { round: u32 },
}

/// Shared failure slot: the first error wins, everyone stops.
#[derive(Default)]
pub struct Failure {
    first: Mutex<Option<String>>,
    flag: std::sync::atomic::AtomicBool,
    /// The first failure was a stall (a channel silent for the stall timeout).
    stalled: std::sync::atomic::AtomicBool,
}

impl Failure {
    pub fn set(&self, msg: String) {
        let mut f = self.first.lock().unwrap();
        if f.is_none() {
            *f = Some(msg);
        }
        self.flag.store(true, Ordering::SeqCst);
    }
    /// Like `set`, for a stall; named as such if it is the first failure.
    pub fn set_stalled(&self, msg: String) {
        let mut f = self.first.lock().unwrap();
        if f.is_none() {
            *f = Some(msg);
            self.stalled.store(true, Ordering::SeqCst);
        }
        self.flag.store(true, Ordering::SeqCst);
    }
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    pub fn take(&self) -> Option<String> {
        self.first.lock().unwrap().clone()
    }
}

/// Batches handed out but not yet queued to a socket; the planner waits for zero at round end.
#[derive(Default)]
pub struct Outstanding {
    n: Mutex<u64>,
    cv: Condvar,
}

impl Outstanding {
    pub fn add(&self) {
        *self.n.lock().unwrap() += 1;
    }
    pub fn done(&self) {
        let mut n = self.n.lock().unwrap();
        *n -= 1;
        if *n == 0 {
            self.cv.notify_all();
        }
    }
    /// Wait until zero or failure; polls the failure flag every 50 ms.
    pub fn wait_zero(&self, failure: &Failure) {
        let mut n = self.n.lock().unwrap();
        while *n > 0 && !failure.is_set() {
            n = self.cv.wait_timeout(n, std::time::Duration::from_millis(50)).unwrap().0;
        }
    }
}

/// True when the 4 KiB page at `p` is all zero.
///
/// # Safety
/// `p` must point to PAGE_SIZE readable bytes, 8-byte aligned.
pub unsafe fn page_is_zero(p: *const u8) -> bool {
    let words = std::slice::from_raw_parts(p as *const u64, PAGE_SIZE / 8);
    words.chunks_exact(16).all(|c| c.iter().fold(0u64, |a, &w| a | w) == 0)
}

#[derive(Clone)]
pub struct WorkerContext {
    pub memory: GuestMemory,
    pub live: bool,
    /// See `SourceConfig::zero_copy`.
    pub zero_copy: bool,
    pub counters: Arc<Counters>,
    pub outstanding: Arc<Outstanding>,
    pub failure: Arc<Failure>,
}

/// A batch whose non-zero pages form at most this many runs is sent as one packet per run
/// (each compressed in place); more scattered batches are gathered into one buffer.
const MAX_SPLIT_RUNS: usize = 4;
/// Buffers come back from the socket writer once written; at most this many per worker.
const POOL: usize = 3;

/// How a worker encodes: one codec, or `auto`'s choice per batch.
pub enum Coder {
    /// One codec; its packets carry `code` (its method's, or an auto session's label for raw).
    Fixed(Box<dyn Codec>, MethodCode),
    Auto { selector: Arc<AutoSelector>, encoders: Encoders },
}

/// The codec for this batch (`choice`: auto's; already opened by `Worker::select`).
fn codec_of(coder: &mut Coder, choice: Option<Choice>) -> &mut dyn Codec {
    match coder {
        Coder::Fixed(c, _) => c.as_mut(),
        Coder::Auto { encoders, .. } => encoders.opened(choice.expect("auto chose").index),
    }
}

/// A compression worker: batches in, packets out to its channel's socket writer. Each batch
/// goes plan (zero pages, runs) → payload (compress, gather or raw) → packet.
pub fn run_worker(ctx: Arc<WorkerContext>, coder: Coder, batches: Receiver<Batch>, to_socket: Sender<ToSocket>) {
    let mut w = Worker::new(ctx, coder, to_socket);
    let mut plan = Plan::default();
    for batch in batches.iter() {
        if !w.ctx.failure.is_set() {
            w.batch(&batch, &mut plan);
        }
        w.ctx.outstanding.done();
    }
}

/// A batch's pages sorted out: zero pages (offsets only) and runs of consecutive normal pages.
#[derive(Default)]
struct Plan {
    normal: Vec<u32>,
    zero: Vec<u32>,
    runs: Vec<(u32, u32)>,
}

impl Plan {
    fn make(&mut self, view: &RegionView, pages: &[u32]) {
        self.normal.clear();
        self.zero.clear();
        for &p in pages {
            if view.page_is_zero(p) {
                self.zero.push(p);
            } else {
                self.normal.push(p);
            }
        }
        self.runs.clear();
        self.runs.extend(page_runs(&self.normal));
    }

    /// The packets to send: (runs, zero pages) each. A few zero pages inside a batch split it
    /// into a few runs; rather than gathering them into one buffer (a copy of every page, which
    /// costs ~0.3 CPU-s/GiB here), each run goes out as its own packet, compressed in place
    /// (`split`); only batches broken into many runs are gathered.
    fn packets(&self, split: bool) -> Vec<(&[(u32, u32)], &[u32])> {
        if split && self.runs.len() > 1 && self.runs.len() <= MAX_SPLIT_RUNS {
            self.runs.iter().enumerate().map(|(i, r)| (std::slice::from_ref(r), if i == 0 { &self.zero[..] } else { &[][..] })).collect()
        } else {
            vec![(&self.runs[..], &self.zero[..])]
        }
    }
}

/// One region's guest memory as the worker reads it.
struct RegionView {
    /// Keeps the mapping alive while slices of it are in use.
    _region: Arc<dyn crate::memory::MemoryRegion>,
    base: *const u8,
}

impl RegionView {
    fn new(memory: &GuestMemory, region: u16) -> Self {
        let r = memory.region(region as usize).expect("planner only names existing regions").clone();
        let base = r.host_ptr() as *const u8;
        Self { _region: r, base }
    }
    fn page_is_zero(&self, page: u32) -> bool {
        // SAFETY: the planner only emits pages inside the region.
        unsafe { page_is_zero(self.base.add(page as usize * PAGE_SIZE)) }
    }
    /// `n` pages from `first`.
    fn run(&self, (first, n): (u32, u32)) -> &[u8] {
        // SAFETY: the planner only emits pages inside the region.
        unsafe { std::slice::from_raw_parts(self.base.add(first as usize * PAGE_SIZE), n as usize * PAGE_SIZE) }
    }
    /// Copy `runs` one after the other into `buf`.
    fn gather(&self, runs: &[(u32, u32)], buf: &mut [u8]) {
        let mut at = 0;
        for &r in runs {
            let src = self.run(r);
            buf[at..at + src.len()].copy_from_slice(src);
            at += src.len();
        }
    }
}

/// Payload buffers of one worker, recycled by the socket writer.
struct Pool {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    allocated: usize,
    buf_len: usize,
    /// Seconds spent waiting for the writer to return a buffer (the link's pace, not work).
    waited: f64,
}

impl Pool {
    fn get(&mut self) -> Vec<u8> {
        if let Ok(b) = self.rx.try_recv() {
            return b;
        }
        if self.allocated < POOL {
            self.allocated += 1;
            return vec![0u8; self.buf_len];
        }
        let t = std::time::Instant::now();
        let b = self.rx.recv().expect("socket writer returns buffers");
        self.waited += t.elapsed().as_secs_f64();
        b
    }
    fn recycle(&self, buf: Vec<u8>) {
        let _ = self.tx.send(buf);
    }
}

/// Time of one codec call for auto's paired probes: this thread's CPU time for a codec that
/// runs on the CPU (a worker descheduled in the middle of one call would otherwise make it
/// look several times slower than its pair on a busy machine), wall time for an accelerator.
#[derive(Clone, Copy)]
enum CodecClock {
    Cpu(std::time::Duration),
    Wall(std::time::Instant),
}

impl CodecClock {
    fn start(hardware: bool) -> Self {
        if hardware { CodecClock::Wall(std::time::Instant::now()) } else { CodecClock::Cpu(super::stats::thread_cpu_time()) }
    }
    fn secs(self) -> f64 {
        match self {
            CodecClock::Cpu(t0) => super::stats::thread_cpu_time().saturating_sub(t0).as_secs_f64(),
            CodecClock::Wall(t0) => t0.elapsed().as_secs_f64(),
        }
    }
}

/// Compress `input` with `codec` into `out` (grown to the codec's bound) only to measure it, for
/// auto's paired and sampled probes: the wire bytes it would take (its length when it did not
/// shrink or the codec failed) and the codec's time ([`CodecClock`]).
fn measure_compress(codec: &mut dyn Codec, input: &[u8], out: &mut Vec<u8>) -> (usize, f64) {
    let need = codec.max_compressed_len(input.len());
    if out.len() < need {
        out.resize(need, 0);
    }
    let clock = CodecClock::start(codec.hardware());
    let wire = match codec.compress(input, out) {
        Ok(Some(n)) if n < input.len() => n,
        _ => input.len(),
    };
    (wire, clock.secs())
}

/// What compressing a packet's pages gave.
enum Compressed {
    Shrunk(Payload),
    /// Not smaller: send raw; `gathered`: the pages are already copied into the scratch buffer.
    Raw { gathered: bool },
}

struct Worker {
    ctx: Arc<WorkerContext>,
    coder: Coder,
    /// This batch's: auto's choice, the method code its packets carry, whether it compresses.
    choice: Option<Choice>,
    method: MethodCode,
    compresses: bool,
    /// What auto learns from this batch: raw and payload bytes, and the seconds it waited
    /// for the link (socket queue full, no buffer back yet) or spent on a paired probe's
    /// shadow, which are not the worker's work on the batch.
    learned: (u64, u64, f64),
    /// auto, a probe with a shadow (`Choice::shadow`): raw bytes, the probe's and the shadow's
    /// wire bytes and codec seconds, on the same input.
    paired: (u64, u64, u64, f64, f64),
    /// Output of the shadow compression and of sampled probes (thrown away).
    shadow_out: Vec<u8>,
    /// Input of a sampled probe: a copy of the slice (guest memory may change under it).
    sample_in: Vec<u8>,
    /// Compress a stable copy, not guest memory in place (see `Codec::tolerates_changing_input`).
    copy_for_codec: bool,
    pool: Pool,
    /// Gathered input of the compressor.
    scratch: Vec<u8>,
    to_socket: Sender<ToSocket>,
}

impl Worker {
    fn new(ctx: Arc<WorkerContext>, coder: Coder, to_socket: Sender<ToSocket>) -> Self {
        // Big enough for the codec's bound on one batch (auto: for any; one is grown if not).
        let buf_len = match &coder {
            Coder::Fixed(c, _) => c.max_compressed_len(MAX_BATCH_BYTES).max(MAX_BATCH_BYTES),
            Coder::Auto { .. } => MAX_BATCH_BYTES + (64 << 10),
        };
        let (tx, rx) = crossbeam_channel::unbounded::<Vec<u8>>();
        let mut pool = Pool { tx, rx, allocated: 0, buf_len, waited: 0.0 };
        let scratch = pool.get();
        let mut w = Self { ctx, coder, choice: None, method: MethodCode(0), compresses: false, learned: (0, 0, 0.0), paired: (0, 0, 0, 0.0, 0.0), shadow_out: Vec::new(), sample_in: Vec::new(), copy_for_codec: false, pool, scratch, to_socket };
        if let Coder::Fixed(c, code) = &w.coder {
            (w.method, w.compresses) = (*code, c.compresses());
            w.copy_for_codec = (w.ctx.live && !c.tolerates_changing_input()) || !w.ctx.zero_copy;
        }
        w
    }

    /// auto: the candidate for this batch (maybe a probe), its codec opened.
    fn select(&mut self) -> Result<(), CodecError> {
        self.learned = (0, 0, 0.0);
        self.paired = (0, 0, 0, 0.0, 0.0);
        if let Coder::Auto { selector, encoders } = &mut self.coder {
            let ch = selector.choose();
            if let Some(j) = ch.shadow.or(ch.sample) {
                encoders.get(j)?;
            }
            let c = encoders.get(ch.index)?;
            self.compresses = c.compresses();
            self.copy_for_codec = (self.ctx.live && !c.tolerates_changing_input()) || !self.ctx.zero_copy;
            self.method = encoders.code(ch.index);
            self.choice = Some(ch);
        }
        Ok(())
    }

    fn batch(&mut self, batch: &Batch, plan: &mut Plan) {
        // auto learns the worker's whole time on the batch (scan, gather, codec, checksums,
        // waiting for a core) but the waits for the link: see `policy`.
        let started = std::time::Instant::now();
        self.pool.waited = 0.0;
        if let Err(e) = self.select() {
            self.ctx.failure.set(format!("compression worker: {e}"));
            return;
        }
        let view = RegionView::new(&self.ctx.memory, batch.region);
        plan.make(&view, &batch.pages);
        if let Some(j) = self.choice.and_then(|c| c.sample) {
            // Not the batch's work: the policy's.
            let t = std::time::Instant::now();
            self.sample(&view, plan.runs.first().copied(), j);
            self.learned.2 += t.elapsed().as_secs_f64();
        }
        let split = self.compresses && !self.copy_for_codec;
        for (runs, zero) in plan.packets(split) {
            let n_pages: usize = runs.iter().map(|&(_, n)| n as usize).sum();
            match self.payload(&view, runs, n_pages) {
                Ok((payload, raw)) => self.packet(batch, runs, zero, n_pages, payload, raw),
                Err(e) => {
                    self.ctx.failure.set(format!("compression worker: {e}"));
                    break;
                }
            }
        }
        if let (Some(ch), Coder::Auto { selector, .. }) = (&self.choice, &self.coder) {
            // The shadow is the policy's work, not the probe's.
            let secs = (started.elapsed().as_secs_f64() - self.learned.2 - self.pool.waited).max(1e-7);
            selector.record(ch, self.learned.0, self.learned.1, secs);
            if ch.shadow.is_some() {
                let (raw, wire, wire_cur, s, s_cur) = self.paired;
                selector.record_pair(ch, raw, wire, wire_cur, s, s_cur);
            }
        }
    }

    /// auto's sampled probe of candidate `j`: compress a copy of up to
    /// [`SAMPLE_BYTES`](super::policy::SAMPLE_BYTES) of the batch's first run of non-zero pages
    /// (`run`; none: zero pages only), output thrown away, and tell the policy.
    fn sample(&mut self, view: &RegionView, run: Option<(u32, u32)>, j: usize) {
        let Coder::Auto { selector, encoders } = &mut self.coder else { return };
        let (raw, wire, secs) = match run {
            None => (0, 0, 0.0),
            Some((first, n)) => {
                let pages = n.min((super::policy::SAMPLE_BYTES / PAGE_SIZE) as u32);
                self.sample_in.clear();
                self.sample_in.extend_from_slice(view.run((first, pages)));
                let (wire, secs) = measure_compress(encoders.opened(j), &self.sample_in, &mut self.shadow_out);
                (self.sample_in.len() as u64, wire as u64, secs)
            }
        };
        selector.record_sample(j, raw, wire, secs);
    }

    /// The payload of `runs` and whether it is raw: compressed when the method compresses and
    /// the result shrinks, else the pages as they are.
    fn payload(&mut self, view: &RegionView, runs: &[(u32, u32)], n_pages: usize) -> Result<(Payload, bool), CodecError> {
        if n_pages == 0 {
            return Ok((Payload::None, false));
        }
        let n_bytes = n_pages * PAGE_SIZE;
        let gathered = match self.compresses {
            true => match self.compress(view, runs, n_bytes)? {
                Compressed::Shrunk(p) => return Ok((p, false)),
                Compressed::Raw { gathered } => gathered,
            },
            false => false,
        };
        Ok((self.raw(view, runs, n_bytes, gathered), true))
    }

    /// Compress guest memory itself when contiguous (zero copy), else a gathered copy.
    fn compress(&mut self, view: &RegionView, runs: &[(u32, u32)], n_bytes: usize) -> Result<Compressed, CodecError> {
        let gathered = runs.len() > 1 || self.copy_for_codec;
        if gathered {
            view.gather(runs, &mut self.scratch);
        }
        let mut out = self.pool.get();
        let gate = match &self.coder {
            Coder::Auto { selector, .. } => selector.gate(),
            Coder::Fixed(..) => None,
        };
        let codec = codec_of(&mut self.coder, self.choice);
        let need = codec.max_compressed_len(n_bytes);
        if out.len() < need {
            out.resize(need, 0);
        }
        let input: &[u8] = if gathered { &self.scratch[..n_bytes] } else { view.run(runs[0]) };
        // --max-cpu: wait for a compression slot (not the worker's work: the policy plans
        // with the cores the gate allows).
        let t = std::time::Instant::now();
        let failure = &self.ctx.failure;
        let _slot = gate.as_ref().and_then(|g| g.enter(|| failure.is_set()));
        self.learned.2 += t.elapsed().as_secs_f64();
        let paired = self.choice.and_then(|c| c.shadow).map(|j| (j, CodecClock::start(codec.hardware())));
        let r = codec.compress(input, &mut out);
        if let (Some((j, clock)), Coder::Auto { encoders, .. }, Ok(got)) = (paired, &mut self.coder, &r) {
            // auto's paired probe: the current candidate on the same bytes, for comparison.
            let secs = clock.secs();
            let wire = got.filter(|&n| n < n_bytes).unwrap_or(n_bytes);
            let wall = std::time::Instant::now();
            let (wire_cur, secs_cur) = measure_compress(encoders.opened(j), input, &mut self.shadow_out);
            let p = &mut self.paired;
            *p = (p.0 + n_bytes as u64, p.1 + wire as u64, p.2 + wire_cur as u64, p.3 + secs, p.4 + secs_cur);
            // Not the probe's work: the policy's.
            self.learned.2 += wall.elapsed().as_secs_f64();
        }
        match r {
            Ok(Some(n)) if n < n_bytes => Ok(Compressed::Shrunk(Payload::Owned(out, n))),
            Ok(_) => {
                self.pool.recycle(out);
                Ok(Compressed::Raw { gathered })
            }
            Err(e) => {
                self.pool.recycle(out);
                Err(e)
            }
        }
    }

    /// Raw pages: the copy already gathered, a fresh copy of live memory (so the bytes
    /// checksummed are the bytes sent), or static memory straight to the socket, run by run.
    fn raw(&mut self, view: &RegionView, runs: &[(u32, u32)], n_bytes: usize, gathered: bool) -> Payload {
        if gathered {
            let copy = std::mem::replace(&mut self.scratch, self.pool.get());
            return Payload::Owned(copy, n_bytes);
        }
        if self.ctx.live || !self.ctx.zero_copy {
            let mut copy = self.pool.get();
            view.gather(runs, &mut copy);
            return Payload::Owned(copy, n_bytes);
        }
        Payload::Guest(runs.iter().map(|&r| (view.run(r).as_ptr(), r.1 as usize * PAGE_SIZE)).collect())
    }

    /// Offsets, header and body CRC; counted and queued to the socket writer (which numbers
    /// the packet and finishes the CRC).
    fn packet(&mut self, batch: &Batch, runs: &[(u32, u32)], zero: &[u32], n_pages: usize, payload: Payload, raw: bool) {
        self.learned.0 += (n_pages * PAGE_SIZE) as u64;
        self.learned.1 += payload.len() as u64;
        let mut offsets = Vec::with_capacity((n_pages + zero.len()) * 4);
        encode_offsets(runs, zero, &mut offsets);
        let header = PacketHeader {
            kind: PacketKind::Pages,
            raw,
            method: self.method,
            region: batch.region,
            normal: n_pages as u16,
            zero: zero.len() as u16,
            round: batch.round,
            packet_num: 0, // assigned by the writer
            payload_len: payload.len() as u32,
        };
        let body_crc = payload.slices().iter().fold(PacketCrc::new().body(&offsets), |c, s| c.body(s)).value();
        let c = &self.ctx.counters;
        if raw && self.compresses {
            // A fallback: the compressor gave up on this batch. (Method none sends every page
            // raw by design; those are just normal pages, as QEMU counts them.)
            Counters::add(&c.raw_pages, n_pages as u64);
        }
        Counters::add(&c.normal_pages, n_pages as u64);
        Counters::add(&c.zero_pages, zero.len() as u64);
        let msg = ToSocket::Packet { header, offsets, payload, body_crc, recycle: self.pool.tx.clone() };
        let t = std::time::Instant::now();
        if self.to_socket.send(msg).is_err() {
            self.ctx.failure.set("channel writer stopped".into());
        }
        self.learned.2 += t.elapsed().as_secs_f64();
    }
}

/// The socket writer of one channel: paces, numbers, checksums and writes packets.
pub fn run_writer(
    name: String,
    mut sock: Stream,
    method: MethodCode,
    rx: Receiver<ToSocket>,
    limiter: Option<Arc<RateLimiter>>,
    counters: Arc<Counters>,
    failure: Arc<Failure>,
    meter: Option<Arc<LinkMeter>>,
) -> Stream {
    let mut packet_num = 0u64;
    for msg in rx.iter() {
        let (mut header, offsets, payload, body_crc, recycle) = match msg {
            ToSocket::Packet { header, offsets, payload, body_crc, recycle } => (header, offsets, payload, body_crc, Some(recycle)),
            ToSocket::Sync { round } => (PacketHeader::sync(method, round, 0), Vec::new(), Payload::None, 0, None),
        };
        if failure.is_set() {
            // Drain (and recycle), so workers never block on a full queue or an empty pool.
            if let (Payload::Owned(buf, _), Some(r)) = (payload, recycle) {
                let _ = r.send(buf);
            }
            continue;
        }
        header.packet_num = packet_num;
        packet_num += 1;
        let hdr = header.encode();
        let crc = PacketCrc::resume(body_crc).finish(&hdr).to_le_bytes();
        let total = header.wire_len();
        // Busy from here (waiting for the limiter, then for the socket) to the end of the write.
        let busy_from = std::time::Instant::now();
        if let Some(l) = &limiter {
            l.acquire(total as u64);
        }
        let mut iov = Vec::with_capacity(4);
        iov.push(IoSlice::new(&hdr));
        iov.push(IoSlice::new(&offsets));
        let parts = payload.slices();
        iov.extend(parts.iter().map(|s| IoSlice::new(s)));
        iov.push(IoSlice::new(&crc));
        let res = write_all_vectored(&mut sock, &mut iov);
        if let Err(e) = res {
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                let t = sock.write_timeout().ok().flatten().map(super::link::secs).unwrap_or_default();
                failure.set_stalled(format!("{name}: the destination accepted no data for {t} (--stall-timeout)"));
            } else {
                failure.set(format!("{name}: sending failed: {e} (did the destination die?)"));
            }
        } else {
            Counters::add(&counters.wire_bytes, total as u64);
            if let Some(m) = &meter {
                m.add(total as u64, busy_from.elapsed());
            }
            Counters::add(&counters.packets, 1);
        }
        if let (Payload::Owned(buf, _), Some(r)) = (payload, recycle) {
            let _ = r.send(buf);
        }
    }
    sock
}

fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
