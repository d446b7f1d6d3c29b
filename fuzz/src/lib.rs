//! The fuzz targets' harness, shared by every target (each `fuzz_targets/*.rs` is one call)
//! and by the library's corpus test (`crates/pageferry/tests/fuzz_corpus.rs` includes this
//! file with `#[path]`), so the stable test suite runs every seed through the same checks.
//!
//! Memory a target lets the library write lies in an [`Arena`]: spans with a canary page
//! on both sides, checked after every input. Expensive state (codecs, arenas, guest memory)
//! is made once per thread and reused, so an input costs its own work only.

use pageferry::codec::{self, Codec, CodecSpec, Method, MAX_BATCH_PAGES};
use pageferry::engine::{self, DestinationConfig, NoWorkload};
use pageferry::memory::{GuestMemory, MemoryRegion, MmapRegion, PAGE_SIZE};
use pageferry::wire::{decode_offsets, decode_packet, encode_frame, read_frame, read_frame_limited, PacketHeader, PacketKind, MAX_HANDSHAKE_BODY, PACKET_HEADER_LEN};
use std::cell::RefCell;
use std::sync::Arc;

/// What canary pages are filled with.
pub const CANARY: u8 = 0xCC;
static CANARY_PAGE: [u8; PAGE_SIZE] = [CANARY; PAGE_SIZE];

/// Page-aligned memory of spans, each with a canary page before and after:
/// `[canary][span 0][canary][span 1][canary]…`.
pub struct Arena {
    map: MmapRegion,
    /// Byte offset and length of each span.
    spans: Vec<(usize, usize)>,
}

impl Arena {
    /// Spans of these many pages each.
    pub fn new(span_pages: &[usize]) -> Self {
        let total = PAGE_SIZE + span_pages.iter().map(|p| (p + 1) * PAGE_SIZE).sum::<usize>();
        let map = MmapRegion::anonymous("arena", total as u64).expect("map the arena");
        let mut spans = Vec::new();
        let mut at = PAGE_SIZE;
        for &p in span_pages {
            spans.push((at, p * PAGE_SIZE));
            at += (p + 1) * PAGE_SIZE;
        }
        let arena = Self { map, spans };
        arena.all().fill(CANARY);
        arena
    }
    #[allow(clippy::mut_from_ref)]
    fn all(&self) -> &mut [u8] {
        // SAFETY: the mapping is ours, `len` bytes; callers never hold two views at once.
        unsafe { std::slice::from_raw_parts_mut(self.map.host_ptr(), self.map.len() as usize) }
    }
    /// Start of span `i`.
    pub fn ptr(&self, i: usize) -> *mut u8 {
        // SAFETY: inside the mapping.
        unsafe { self.map.host_ptr().add(self.spans[i].0) }
    }
    /// Span `i`.
    pub fn span(&mut self, i: usize) -> &mut [u8] {
        let (at, len) = self.spans[i];
        &mut self.all()[at..at + len]
    }
    /// Panics (naming the span and the side) when a canary page changed.
    pub fn check_canaries(&self) {
        let all = self.all();
        for (i, &(at, len)) in self.spans.iter().enumerate() {
            assert!(all[at - PAGE_SIZE..at] == CANARY_PAGE, "write into the canary page before span {i}");
            assert!(all[at + len..at + len + PAGE_SIZE] == CANARY_PAGE, "write into the canary page after span {i}");
        }
    }
}

// ---- decoders ----

struct Decoder {
    method: &'static str,
    codec: Box<dyn Codec>,
    /// One batch-sized span.
    out: Arena,
}

thread_local! {
    static DECODERS: RefCell<Vec<Decoder>> = const { RefCell::new(Vec::new()) };
}

fn open_codec(method: &str) -> Box<dyn Codec> {
    let mut spec = CodecSpec::new(Method::by_name(method).expect("a registered method"));
    spec.qatzip.provider = codec::qatzip::Provider::Cpu;
    codec::open(&spec).expect("codec opens")
}

/// Target `decode_<method>`: byte 0 picks the output size (1 to 128 pages), the rest is a
/// payload decompressed into exactly that many bytes. The output slice ends at the span's
/// canary page and the page before it is armed as a canary too, so a write one byte past
/// either end is caught. The codec is opened once and reused, also after errors (as a
/// destination reuses a channel's decoder for every packet).
pub fn decode(method: &'static str, data: &[u8]) {
    let Some((&pages, payload)) = data.split_first() else { return };
    let n = (pages as usize % MAX_BATCH_PAGES + 1) * PAGE_SIZE;
    DECODERS.with(|d| {
        let mut d = d.borrow_mut();
        let i = match d.iter().position(|x| x.method == method) {
            Some(i) => i,
            None => {
                d.push(Decoder { method, codec: open_codec(method), out: Arena::new(&[MAX_BATCH_PAGES]) });
                d.len() - 1
            }
        };
        let Decoder { codec, out, .. } = &mut d[i];
        let span = out.span(0);
        let start = span.len() - n;
        if start > 0 {
            span[start - PAGE_SIZE..start].fill(CANARY);
        }
        let _ = codec.decompress(payload, &mut span[start..]);
        if start > 0 {
            assert!(span[start - PAGE_SIZE..start] == CANARY_PAGE, "{method}: write before the output slice");
        }
        out.check_canaries();
    });
}

// ---- control frames, packet headers ----

/// Target `control_frame`: any bytes decode to a frame that re-encodes to bytes decoding to
/// the same frame, or fail; the handshake's limit is applied as the destination applies it.
pub fn control_frame(data: &[u8]) {
    let _ = read_frame_limited(&mut &data[..], MAX_HANDSHAKE_BODY);
    if let Ok(frame) = read_frame(&mut &data[..]) {
        let again = encode_frame(frame.version, &frame.msg, &frame.blob);
        let back = read_frame(&mut &again[..]).expect("a re-encoded frame decodes");
        assert_eq!(frame, back);
    }
}

/// Target `packet_header`: bytes 0–1 are the region's pages (minus one), the rest a packet.
/// A header that decodes has consistent lengths; offsets that pass `decode_offsets` lie in
/// the region, strictly increasing within each list; the whole-packet decoder fails cleanly.
pub fn packet_header(data: &[u8]) {
    if data.len() < PACKET_HEADER_LEN + 2 {
        return;
    }
    let region_pages = u16::from_le_bytes([data[0], data[1]]) as u64 + 1;
    let data = &data[2..];
    let _ = decode_packet(data, region_pages);
    let hdr: &[u8; PACKET_HEADER_LEN] = data[..PACKET_HEADER_LEN].try_into().unwrap();
    let Ok(h) = PacketHeader::decode(hdr) else { return };
    assert_eq!(h.wire_len(), PACKET_HEADER_LEN + h.offsets_len() + h.payload_len as usize + 4);
    let rest = &data[PACKET_HEADER_LEN..];
    if rest.len() < h.offsets_len() {
        return;
    }
    let (mut normal, mut zero) = (Vec::new(), Vec::new());
    if decode_offsets(&h, &rest[..h.offsets_len()], region_pages, &mut normal, &mut zero).is_ok() {
        assert_eq!(normal.len(), h.normal as usize);
        assert_eq!(zero.len(), h.zero as usize);
        for list in [&normal, &zero] {
            assert!(list.iter().all(|&p| (p as u64) < region_pages));
            assert!(list.windows(2).all(|w| w[0] < w[1]));
        }
    }
}

// ---- the whole destination ----

/// The destination's guest memory in the `destination` target: (name, pages) per region.
pub const LAYOUT: [(&str, usize); 3] = [("ram0", 16), ("ram1", 1), ("rom", 8)];

/// Flags (byte 0 of a `destination` input).
pub const FRESH: u8 = 1;
/// Flag: the destination reads raw and compressed pages through its buffers, not in place.
pub const NO_ZERO_COPY: u8 = 2;

struct Dest {
    arena: Arena,
    /// Over the arena's spans: announced fresh (zeroed), or not (holding `pattern`).
    fresh: GuestMemory,
    used: GuestMemory,
    /// Region i's bytes before an input, when not fresh.
    pattern: Vec<Vec<u8>>,
    /// The base the spans hold now (fresh: zeros).
    holds_fresh: bool,
}

impl Dest {
    fn new() -> Self {
        let pages: Vec<usize> = LAYOUT.iter().map(|&(_, p)| p).collect();
        let arena = Arena::new(&pages);
        let memory = |fresh: bool| {
            let regions = LAYOUT
                .iter()
                .enumerate()
                .map(|(i, &(name, p))| {
                    // SAFETY: span i of the arena, which lives as long as this Dest.
                    let r = unsafe { MmapRegion::from_raw(name, arena.ptr(i), (p * PAGE_SIZE) as u64, fresh) }.expect("region");
                    Arc::new(r) as Arc<dyn MemoryRegion>
                })
                .collect();
            GuestMemory::new(regions).expect("memory")
        };
        let pattern = LAYOUT
            .iter()
            .enumerate()
            .map(|(i, &(_, p))| (0..p * PAGE_SIZE).map(|b| ((b / PAGE_SIZE) * 7 + i * 31 + b % 251 + 1) as u8).collect())
            .collect();
        let (fresh, used) = (memory(true), memory(false));
        let mut d = Self { arena, fresh, used, pattern, holds_fresh: false };
        d.reset_all(true);
        d
    }

    fn base(&self, region: usize, fresh: bool) -> &[u8] {
        static ZEROS: [u8; 64 * PAGE_SIZE] = [0; 64 * PAGE_SIZE];
        if fresh {
            &ZEROS[..LAYOUT[region].1 * PAGE_SIZE]
        } else {
            &self.pattern[region]
        }
    }

    fn reset_all(&mut self, fresh: bool) {
        for i in 0..LAYOUT.len() {
            let base = self.base(i, fresh).to_vec();
            self.arena.span(i).copy_from_slice(&base);
        }
        self.holds_fresh = fresh;
    }

    /// Pages that differ from the base, as (region, page); restores them.
    fn changed_pages(&mut self) -> Vec<(usize, usize)> {
        let mut changed = Vec::new();
        for i in 0..LAYOUT.len() {
            let base = self.base(i, self.holds_fresh).to_vec();
            let span = self.arena.span(i);
            for (p, (now, was)) in span.chunks_exact_mut(PAGE_SIZE).zip(base.chunks_exact(PAGE_SIZE)).enumerate() {
                if now != was {
                    changed.push((i, p));
                    now.copy_from_slice(was);
                }
            }
        }
        changed
    }
}

thread_local! {
    static DEST: RefCell<Option<Dest>> = const { RefCell::new(None) };
}

/// Pages an input may change, from an independent parse of the data stream (after its
/// Hello) with the whole-packet decoder: the pages of each packet that is well-formed, in
/// sequence, of the current round and CRC-correct, up to the first that is not; of that one
/// only when it is raw and read in place (`zero_copy`), whose pages the reader receives
/// before it can check the CRC (the migration then fails), and only its checked normal pages.
pub fn allowed_pages(mut rest: &[u8], zero_copy: bool) -> Vec<(usize, usize)> {
    let mut allowed = Vec::new();
    let (mut num, mut round) = (0u64, 0u32);
    while rest.len() >= PACKET_HEADER_LEN {
        let hdr: &[u8; PACKET_HEADER_LEN] = rest[..PACKET_HEADER_LEN].try_into().unwrap();
        let Ok(h) = PacketHeader::decode(hdr) else { break };
        if h.packet_num != num || h.round != round {
            break;
        }
        num += 1;
        if h.kind == PacketKind::Sync {
            match rest.get(..h.wire_len()).map(|p| decode_packet(p, 1)) {
                Some(Ok(_)) => round += 1,
                _ => break,
            }
            rest = &rest[h.wire_len()..];
            continue;
        }
        let Some(&(_, region_pages)) = LAYOUT.get(h.region as usize) else { break };
        let region = h.region as usize;
        match rest.get(..h.wire_len()).map(|p| decode_packet(p, region_pages as u64)) {
            Some(Ok(p)) => {
                allowed.extend(p.normal.iter().chain(&p.zero).map(|&q| (region, q as usize)));
                rest = &rest[h.wire_len()..];
            }
            _ => {
                let offsets = rest.get(PACKET_HEADER_LEN..PACKET_HEADER_LEN + h.offsets_len());
                let (mut normal, mut zero) = (Vec::new(), Vec::new());
                if let (true, true, Some(o)) = (h.raw, zero_copy, offsets) {
                    if decode_offsets(&h, o, region_pages as u64, &mut normal, &mut zero).is_ok() {
                        allowed.extend(normal.iter().map(|&q| (region, q as usize)));
                    }
                }
                break;
            }
        }
    }
    allowed
}

/// Target `destination`: one source's streams replayed through the real destination
/// (`engine::replay_destination`: handshake checks, the channel reader, the gate, the control
/// loop) into a guest memory of three regions with canary pages around each. Input: byte 0
/// flags ([`FRESH`], [`NO_ZERO_COPY`]), bytes 1–2 the control stream's length (u16 LE), the
/// control stream (control Hello, control frames), the data stream (data Hello, packets).
///
/// Checks: no panic; no write outside the regions (canaries); no page changed that a
/// correct packet did not name ([`allowed_pages`]). Returns the destination's outcome.
pub fn destination(data: &[u8]) -> Option<Result<engine::DestinationReport, engine::MigrationError>> {
    if data.len() < 3 {
        return None;
    }
    let flags = data[0];
    let ctl_len = (u16::from_le_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
    let (control, stream) = data[3..].split_at(ctl_len);
    let fresh = flags & FRESH != 0;
    let zero_copy = flags & NO_ZERO_COPY == 0;
    DEST.with(|d| {
        let mut d = d.borrow_mut();
        let d = d.get_or_insert_with(Dest::new);
        if d.holds_fresh != fresh {
            d.reset_all(fresh);
        }
        let mut config = DestinationConfig { zero_copy, ..Default::default() };
        config.codec.qatzip.provider = codec::qatzip::Provider::Cpu;
        let memory = if fresh { &d.fresh } else { &d.used };
        let outcome = engine::replay_destination(control, stream, memory, &mut NoWorkload, &config);
        d.arena.check_canaries();
        let changed = d.changed_pages();
        if !changed.is_empty() {
            let mut after_hello = stream;
            let packets = match read_frame_limited(&mut after_hello, MAX_HANDSHAKE_BODY) {
                Ok(_) => after_hello,
                Err(_) => &[][..],
            };
            let allowed = allowed_pages(packets, zero_copy);
            for page in &changed {
                assert!(allowed.contains(page), "page {page:?} changed, but no correct packet named it (outcome: {outcome:?})");
            }
        }
        Some(outcome)
    })
}

/// A `destination` input: flags, the control stream, the data stream.
pub fn destination_input(flags: u8, control: &[u8], data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(control.len()).expect("a control stream under 64 KiB");
    [&[flags][..], &len.to_le_bytes(), control, data].concat()
}
