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
use crate::wire::{PacketHeader, PacketKind, PACKET_HEADER_LEN};
use crossbeam_channel::{Receiver, Sender};
use std::io::{IoSlice, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Guest memory of a static source, written to the socket directly.
    Guest(*const u8, usize),
}

// SAFETY: Guest points into a GuestMemory region kept alive by the migration (Arc in the
// worker and socket threads) and only read.
unsafe impl Send for Payload {}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::None => &[],
            Payload::Owned(v, n) => &v[..*n],
            // SAFETY: see the Send impl.
            Payload::Guest(p, n) => unsafe { std::slice::from_raw_parts(*p, *n) },
        }
    }
}

/// What the socket writer receives.
pub enum ToSocket {
    Packet {
        header: PacketHeader,
        offsets: Vec<u8>,
        payload: Payload,
        /// CRC32C of offsets + payload; the writer prepends the header's once the packet
        /// number is known.
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

pub struct WorkerContext {
    pub memory: GuestMemory,
    pub live: bool,
    pub counters: Arc<Counters>,
    pub outstanding: Arc<Outstanding>,
    pub failure: Arc<Failure>,
}

/// A compression worker: batches in, packets out to its channel's socket writer.
pub fn run_worker(ctx: Arc<WorkerContext>, mut codec: Box<dyn Codec>, batches: Receiver<Batch>, to_socket: Sender<ToSocket>) {
    let method = codec.info().method;
    let buf_len = codec.max_compressed_len(MAX_BATCH_BYTES).max(MAX_BATCH_BYTES);
    let copy_for_codec = ctx.live && !codec.tolerates_changing_input();
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
        let n_bytes = normal.len() * PAGE_SIZE;
        let contiguous = !normal.is_empty() && (normal[normal.len() - 1] - normal[0]) as usize + 1 == normal.len();
        // Input for the codec: guest memory itself, or a gathered (stable) copy in `scratch`.
        let mut gathered = false;
        let input: &[u8] = if normal.is_empty() {
            &[]
        } else if contiguous && !copy_for_codec {
            // SAFETY: pages [normal[0], normal[0]+len) lie inside the region.
            unsafe { std::slice::from_raw_parts(base.add(normal[0] as usize * PAGE_SIZE), n_bytes) }
        } else {
            for (i, &p) in normal.iter().enumerate() {
                // SAFETY: source page inside the region; destination inside scratch.
                unsafe {
                    std::ptr::copy_nonoverlapping(base.add(p as usize * PAGE_SIZE), scratch.as_mut_ptr().add(i * PAGE_SIZE), PAGE_SIZE)
                };
            }
            gathered = true;
            &scratch[..n_bytes]
        };

        let mut payload = Payload::None;
        let mut raw = false;
        if !normal.is_empty() {
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
                    ctx.outstanding.done();
                    continue;
                }
            }
            if raw {
                payload = if gathered {
                    let p = std::mem::replace(&mut scratch, get_buf(&mut allocated));
                    Payload::Owned(p, n_bytes)
                } else if ctx.live {
                    // Copy so the bytes checksummed are the bytes sent.
                    let mut p = get_buf(&mut allocated);
                    p[..n_bytes].copy_from_slice(input);
                    Payload::Owned(p, n_bytes)
                } else {
                    Payload::Guest(input.as_ptr(), n_bytes)
                };
                Counters::add(&ctx.counters.raw_pages, normal.len() as u64);
            }
        }
        let mut offsets = Vec::with_capacity((normal.len() + zero.len()) * 4);
        for &p in normal.iter().chain(zero.iter()) {
            offsets.extend_from_slice(&p.to_le_bytes());
        }
        let header = PacketHeader {
            kind: PacketKind::Pages,
            raw,
            method,
            region: batch.region,
            normal: normal.len() as u16,
            zero: zero.len() as u16,
            round: batch.round,
            packet_num: 0, // assigned by the writer
            payload_len: payload.bytes().len() as u32,
        };
        let body_crc = crc32c::crc32c_append(crc32c::crc32c(&offsets), payload.bytes());
        Counters::add(&ctx.counters.normal_pages, normal.len() as u64);
        Counters::add(&ctx.counters.zero_pages, zero.len() as u64);
        let msg = ToSocket::Packet { header, offsets, payload, body_crc, recycle: recycle_tx.clone() };
        if to_socket.send(msg).is_err() {
            ctx.failure.set("channel writer stopped".into());
        }
        ctx.outstanding.done();
    }
}

/// The socket writer of one channel: paces, numbers, checksums and writes packets.
pub fn run_writer(
    name: String,
    mut sock: TcpStream,
    method: crate::codec::Method,
    rx: Receiver<ToSocket>,
    limiter: Option<Arc<RateLimiter>>,
    counters: Arc<Counters>,
    failure: Arc<Failure>,
    packets_sent: Arc<AtomicU64>,
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
        let body_len = offsets.len() + payload.bytes().len();
        let body_crc = if body_len == 0 { crc32c::crc32c(&[]) } else { body_crc };
        let crc = crc32c::crc32c_combine(crc32c::crc32c(&hdr), body_crc, body_len).to_le_bytes();
        let total = PACKET_HEADER_LEN + body_len + 4;
        if let Some(l) = &limiter {
            l.acquire(total as u64);
        }
        let res = write_all_vectored(&mut sock, &mut [IoSlice::new(&hdr), IoSlice::new(&offsets), IoSlice::new(payload.bytes()), IoSlice::new(&crc)]);
        if let Err(e) = res {
            failure.set(format!("{name}: sending failed: {e} (did the destination die?)"));
        } else {
            Counters::add(&counters.wire_bytes, total as u64);
            Counters::add(&counters.packets, 1);
            packets_sent.fetch_add(1, Ordering::Relaxed);
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
