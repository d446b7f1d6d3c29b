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
use pageferry::wire::{decode_offsets, decode_packet, encode_frame, read_frame, read_frame_limited, Control, PacketHeader, PacketKind, Role, MAX_HANDSHAKE_BODY, PACKET_HEADER_LEN};
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
/// Flag: the destination accepts a migration without the end-to-end digest (`recv
/// --no-verify`); also set whenever the input's control Hello announces postcopy, which a
/// verifying destination refuses.
pub const NO_VERIFY: u8 = 4;
/// At most this many channel streams (two data channels and postcopy's urgent one).
pub const MAX_STREAMS: usize = 3;

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

    /// Pages that differ from the base, as (region, page, now all zeros); restores them.
    fn changed_pages(&mut self) -> Vec<(usize, usize, bool)> {
        let mut changed = Vec::new();
        for i in 0..LAYOUT.len() {
            let base = self.base(i, self.holds_fresh).to_vec();
            let span = self.arena.span(i);
            for (p, (now, was)) in span.chunks_exact_mut(PAGE_SIZE).zip(base.chunks_exact(PAGE_SIZE)).enumerate() {
                if now != was {
                    changed.push((i, p, now.iter().all(|&b| b == 0)));
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

/// Pages an input may change, from an independent parse of one channel's stream (after its
/// Hello) with the whole-packet decoder: the pages of each packet that is well-formed, in
/// sequence, of the current round (any round on postcopy's `urgent` channel, which has no
/// syncs) and CRC-correct, up to the first that is not; of that one only when it is raw and
/// read in place (`zero_copy`), whose pages the reader receives before it can check the CRC
/// (the migration then fails), and only its checked normal pages.
pub fn allowed_pages(mut rest: &[u8], zero_copy: bool, urgent: bool) -> Vec<(usize, usize)> {
    let mut allowed = Vec::new();
    let (mut num, mut round) = (0u64, 0u32);
    while rest.len() >= PACKET_HEADER_LEN {
        let hdr: &[u8; PACKET_HEADER_LEN] = rest[..PACKET_HEADER_LEN].try_into().unwrap();
        let Ok(h) = PacketHeader::decode(hdr) else { break };
        if urgent {
            round = h.round;
        }
        if h.packet_num != num || h.round != round {
            break;
        }
        num += 1;
        if h.kind == PacketKind::Sync {
            match rest.get(..h.wire_len()).map(|p| decode_packet(p, 1)) {
                Some(Ok(_)) if !urgent => round += 1,
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

/// A `destination` input, split: byte 0 flags ([`FRESH`], [`NO_ZERO_COPY`], [`NO_VERIFY`]),
/// then the control stream (u16 LE length, then the control Hello and control frames), the
/// schedule (u16 LE length, then one byte per step: which stream delivers the next item,
/// see `engine::replay_destination`), then up to [`MAX_STREAMS`] channel streams, each a u32
/// LE length and the bytes (a data or urgent channel's Hello, then packets). A length past
/// the end of the input is cut to what is there.
pub struct DestinationInput<'a> {
    pub flags: u8,
    pub control: &'a [u8],
    pub schedule: &'a [u8],
    pub streams: Vec<&'a [u8]>,
}

impl<'a> DestinationInput<'a> {
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&flags, mut rest) = data.split_first()?;
        let mut take = |len_bytes: usize| -> Option<&'a [u8]> {
            if rest.len() < len_bytes {
                return None;
            }
            let mut n = [0u8; 4];
            n[..len_bytes].copy_from_slice(&rest[..len_bytes]);
            let len = (u32::from_le_bytes(n) as usize).min(rest.len() - len_bytes);
            let (chunk, after) = rest[len_bytes..].split_at(len);
            rest = after;
            Some(chunk)
        };
        let control = take(2)?;
        let schedule = take(2).unwrap_or_default();
        let mut streams = Vec::new();
        while streams.len() < MAX_STREAMS {
            match take(4) {
                Some(s) => streams.push(s),
                None => break,
            }
        }
        Some(Self { flags, control, schedule, streams })
    }

    /// The bytes of this input.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![self.flags];
        v.extend_from_slice(&u16::try_from(self.control.len()).expect("a control stream under 64 KiB").to_le_bytes());
        v.extend_from_slice(self.control);
        v.extend_from_slice(&u16::try_from(self.schedule.len()).expect("a schedule under 64 KiB").to_le_bytes());
        v.extend_from_slice(self.schedule);
        for s in &self.streams {
            v.extend_from_slice(&u32::try_from(s.len()).unwrap().to_le_bytes());
            v.extend_from_slice(s);
        }
        v
    }
}

/// The control stream's Hello and frames as an independent parse sees them: whether the
/// Hello announces postcopy, the digest of the first `Finish` (the one a destination can
/// accept), and the pages of every in-range discard range of a `Postcopy`.
struct ControlView {
    postcopy: bool,
    finish_digest: Option<Option<u128>>,
    discarded: Vec<(usize, usize)>,
}

fn control_view(mut control: &[u8]) -> ControlView {
    let mut v = ControlView { postcopy: false, finish_digest: None, discarded: Vec::new() };
    match read_frame_limited(&mut control, MAX_HANDSHAKE_BODY) {
        Ok(pageferry::wire::Frame { msg: Control::Hello(h), .. }) => v.postcopy = h.wants.postcopy,
        _ => return v,
    }
    while let Ok(f) = read_frame(&mut control) {
        match f.msg {
            Control::Finish { digest, .. } if v.finish_digest.is_none() => {
                v.finish_digest = Some(digest.and_then(|d| u128::from_str_radix(&d, 16).ok()));
            }
            Control::Postcopy { discard, .. } => {
                for (r, first, n) in discard {
                    let Some(&(_, pages)) = LAYOUT.get(r as usize) else { continue };
                    let (first, n) = (first as usize, n as usize);
                    if first.checked_add(n).is_some_and(|end| end <= pages) {
                        v.discarded.extend((first..first + n).map(|p| (r as usize, p)));
                    }
                }
            }
            _ => {}
        }
    }
    v
}

/// Target `destination`: one source's streams (control, up to two data channels, postcopy's
/// urgent channel) replayed through the real destination (`engine::replay_destination`:
/// handshake checks, the channel readers, the gate, the control loop, the postcopy switch and
/// placement) in the order the input's schedule decides, into a guest memory of three regions
/// with canary pages around each. Input: see [`DestinationInput`].
///
/// Checks: no panic; no write outside the regions (canaries); no page changed that a correct
/// packet did not name ([`allowed_pages`], on every stream), except pages a `Postcopy`
/// discarded, which may read as zeros; and no completion unless everything was checked: a
/// verified completion leaves exactly the memory whose digest the source's `Finish` named, an
/// unverified one only where the destination was told to accept it, a postcopy completion
/// only once every discarded page was named by a correct packet. Returns the outcome.
pub fn destination(data: &[u8]) -> Option<Result<engine::DestinationReport, engine::MigrationError>> {
    let input = DestinationInput::parse(data)?;
    let fresh = input.flags & FRESH != 0;
    let zero_copy = input.flags & NO_ZERO_COPY == 0;
    let view = control_view(input.control);
    let no_verify = input.flags & NO_VERIFY != 0 || view.postcopy;
    DEST.with(|d| {
        let mut d = d.borrow_mut();
        let d = d.get_or_insert_with(Dest::new);
        if d.holds_fresh != fresh {
            d.reset_all(fresh);
        }
        let mut config = DestinationConfig { zero_copy, require_verify: !no_verify, ..Default::default() };
        config.codec.qatzip.provider = codec::qatzip::Provider::Cpu;
        let memory = if fresh { &d.fresh } else { &d.used };
        let outcome = engine::replay_destination(input.control, &input.streams, input.schedule, memory, &mut NoWorkload, &config);
        d.arena.check_canaries();
        let digest = matches!(&outcome, Ok(r) if r.verified).then(|| memory.digest());
        let changed = d.changed_pages();
        let named = || {
            let mut named = Vec::new();
            for &s in &input.streams {
                let mut rest = s;
                if let Ok(pageferry::wire::Frame { msg: Control::Hello(h), .. }) = read_frame_limited(&mut rest, MAX_HANDSHAKE_BODY) {
                    named.extend(allowed_pages(rest, zero_copy, h.role == Role::Urgent));
                }
            }
            named
        };
        if !changed.is_empty() {
            let named = named();
            for &(r, p, zeros) in &changed {
                let page = (r, p);
                assert!(
                    named.contains(&page) || (zeros && view.discarded.contains(&page)),
                    "page {page:?} changed, but no correct packet named it (outcome: {outcome:?})"
                );
            }
        }
        if let Ok(report) = &outcome {
            match &report.postcopy {
                Some(_) => {
                    let named = named();
                    for page in &view.discarded {
                        assert!(named.contains(page), "postcopy completed, but no correct packet brought discarded page {page:?} (report: {report:?})");
                    }
                }
                None if report.verified => {
                    assert_eq!(view.finish_digest, Some(digest), "a verified completion whose memory is not the one the source's Finish named");
                }
                None => assert!(no_verify, "an unverified completion on a destination that requires the digest: {report:?}"),
            }
        }
        Some(outcome)
    })
}

/// A `destination` input: flags, the control stream, the schedule, the channels' streams.
pub fn destination_input(flags: u8, control: &[u8], schedule: &[u8], streams: &[&[u8]]) -> Vec<u8> {
    DestinationInput { flags, control, schedule, streams: streams.to_vec() }.encode()
}
