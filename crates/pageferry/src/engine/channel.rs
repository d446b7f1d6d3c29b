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

use super::ratelimit::RateLimiter;
use super::stats::Counters;
use crate::codec::{Codec, MAX_BATCH_BYTES};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::wire::{encode_offsets, page_runs, MethodCode, PacketCrc, PacketHeader, PacketKind};
use crossbeam_channel::{Receiver, Sender};
use std::io::{IoSlice, Write};
use std::net::TcpStream;
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
}

impl Failure {
    pub fn set(&self, msg: String) {
        let mut f = self.first.lock().unwrap();
        if f.is_none() {
            *f = Some(msg);
        }
        self.flag.store(true, Ordering::SeqCst);
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

/// A compression worker: batches in, packets out to its channel's socket writer.
pub fn run_worker(ctx: Arc<WorkerContext>, mut codec: Box<dyn Codec>, batches: Receiver<Batch>, to_socket: Sender<ToSocket>) {
    let method = codec.info().method.code();
    let buf_len = codec.max_compressed_len(MAX_BATCH_BYTES).max(MAX_BATCH_BYTES);
    let copy_for_codec = (ctx.live && !codec.tolerates_changing_input()) || !ctx.zero_copy;
    // Buffers come back from the socket writer once written; at most `POOL` per worker.
    const POOL: usize = 3;
    let (recycle_tx, recycle_rx) = crossbeam_channel::unbounded::<Vec<u8>>();
    let mut allocated = 0usize;
    let get_buf = |allocated: &mut usize| -> Vec<u8> {
        if let Ok(b) = recycle_rx.try_recv() {
            return b;
        }
        if *allocated < POOL {
            *allocated += 1;
            return vec![0u8; buf_len];
        }
        recycle_rx.recv().expect("socket writer returns buffers")
    };
    let mut scratch = get_buf(&mut allocated);
    let mut normal: Vec<u32> = Vec::with_capacity(128);
    let mut zero: Vec<u32> = Vec::with_capacity(128);

    for batch in batches.iter() {
        if ctx.failure.is_set() {
            ctx.outstanding.done();
            continue;
        }
        let region = ctx.memory.region(batch.region as usize).expect("planner only names existing regions").clone();
        let base = region.host_ptr() as *const u8;
        normal.clear();
        zero.clear();
        for &p in &batch.pages {
            // SAFETY: the planner only emits pages inside the region.
            if unsafe { page_is_zero(base.add(p as usize * PAGE_SIZE)) } {
                zero.push(p);
            } else {
                normal.push(p);
            }
        }
        // Runs of consecutive pages: (first page, count).
        let all_runs: Vec<(u32, u32)> = page_runs(&normal).collect();
        // A few zero pages inside a batch split it into a few runs. Rather than gathering the
        // runs into one buffer (a copy of every page, which costs ~0.3 CPU-s/GiB here), each
        // run goes out as its own packet, compressed in place; only batches broken into many
        // runs are gathered.
        let split = codec.compresses() && !copy_for_codec && all_runs.len() > 1 && all_runs.len() <= MAX_SPLIT_RUNS;
        let groups: Vec<(&[(u32, u32)], &[u32])> = if split {
            all_runs.iter().enumerate().map(|(i, r)| (std::slice::from_ref(r), if i == 0 { &zero[..] } else { &[][..] })).collect()
        } else {
            vec![(&all_runs[..], &zero[..])]
        };
        let guest = |first: u32, n: u32| -> &[u8] {
            // SAFETY: the planner only emits pages inside the region.
            unsafe { std::slice::from_raw_parts(base.add(first as usize * PAGE_SIZE), n as usize * PAGE_SIZE) }
        };
        for (runs, zero) in groups {
            let n_pages: usize = runs.iter().map(|&(_, n)| n as usize).sum();
            let n_bytes = n_pages * PAGE_SIZE;
            let gather = |buf: &mut Vec<u8>| {
                let mut at = 0;
                for &(first, n) in runs {
                    let src = guest(first, n);
                    buf[at..at + src.len()].copy_from_slice(src);
                    at += src.len();
                }
            };

            let mut payload = Payload::None;
            let mut raw = false;
            if n_pages > 0 && codec.compresses() {
                // Input: guest memory itself when contiguous (zero-copy), else a gathered copy.
                let gathered = runs.len() > 1 || copy_for_codec;
                if gathered {
                    gather(&mut scratch);
                }
                let input: &[u8] = if gathered { &scratch[..n_bytes] } else { guest(runs[0].0, runs[0].1) };
                let mut out = get_buf(&mut allocated);
                match codec.compress(input, &mut out) {
                    Ok(Some(n)) if n < n_bytes => payload = Payload::Owned(out, n),
                    Ok(_) => {
                        raw = true;
                        let _ = recycle_tx.send(out);
                    }
                    Err(e) => {
                        ctx.failure.set(format!("compression worker: {e}"));
                        let _ = recycle_tx.send(out);
                        break;
                    }
                }
                if raw && gathered {
                    let p = std::mem::replace(&mut scratch, get_buf(&mut allocated));
                    payload = Payload::Owned(p, n_bytes);
                }
            } else if n_pages > 0 {
                raw = true;
            }
            if raw && matches!(payload, Payload::None) {
                payload = if ctx.live || !ctx.zero_copy {
                    // Copy, so the bytes checksummed are the bytes sent.
                    let mut p = get_buf(&mut allocated);
                    gather(&mut p);
                    Payload::Owned(p, n_bytes)
                } else {
                    // Static memory: straight from guest memory to the socket, run by run.
                    Payload::Guest(runs.iter().map(|&(f, n)| (guest(f, n).as_ptr(), n as usize * PAGE_SIZE)).collect())
                };
            }
            if raw && codec.compresses() {
                // A fallback: the compressor gave up on this batch. (Method none sends every
                // page raw by design; those are just normal pages, as QEMU counts them.)
                Counters::add(&ctx.counters.raw_pages, n_pages as u64);
            }
            let mut offsets = Vec::with_capacity((n_pages + zero.len()) * 4);
            encode_offsets(runs, zero, &mut offsets);
            let header = PacketHeader {
                kind: PacketKind::Pages,
                raw,
                method,
                region: batch.region,
                normal: n_pages as u16,
                zero: zero.len() as u16,
                round: batch.round,
                packet_num: 0, // assigned by the writer
                payload_len: payload.len() as u32,
            };
            let body_crc = payload.slices().iter().fold(PacketCrc::new().body(&offsets), |c, s| c.body(s)).value();
            Counters::add(&ctx.counters.normal_pages, n_pages as u64);
            Counters::add(&ctx.counters.zero_pages, zero.len() as u64);
            let msg = ToSocket::Packet { header, offsets, payload, body_crc, recycle: recycle_tx.clone() };
            if to_socket.send(msg).is_err() {
                ctx.failure.set("channel writer stopped".into());
            }
        }
        ctx.outstanding.done();
    }
}

/// The socket writer of one channel: paces, numbers, checksums and writes packets.
pub fn run_writer(
    name: String,
    mut sock: TcpStream,
    method: MethodCode,
    rx: Receiver<ToSocket>,
    limiter: Option<Arc<RateLimiter>>,
    counters: Arc<Counters>,
    failure: Arc<Failure>,
) -> TcpStream {
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
            failure.set(format!("{name}: sending failed: {e} (did the destination die?)"));
        } else {
            Counters::add(&counters.wire_bytes, total as u64);
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
