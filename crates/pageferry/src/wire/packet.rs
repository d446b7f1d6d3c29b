//! Data packets: a fixed header, page offsets, payload, CRC32C (layout in the module doc of
//! [`crate::wire`]).

use super::{MethodCode, WireError, MAX_BATCH_BYTES, MAX_BATCH_PAGES, PAGE_SIZE};

/// Magic of a data packet ("PFDP").
pub const PACKET_MAGIC: u32 = u32::from_le_bytes(*b"PFDP");
/// Bytes of a packet header.
pub const PACKET_HEADER_LEN: usize = 32;
/// Header byte 5, bit 0: the payload is the normal pages as they are (not compressed).
pub const FLAG_RAW: u8 = 0x01;

/// Header byte 4. The discriminants are the wire codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PacketKind {
    /// Pages of one region.
    Pages = 0,
    /// End of the round on this channel; no pages, no payload.
    Sync = 1,
}

impl PacketKind {
    /// Its wire code.
    pub fn code(self) -> u8 {
        self as u8
    }
    /// The kind with wire code `c`, if any.
    pub fn from_code(c: u8) -> Option<Self> {
        [PacketKind::Pages, PacketKind::Sync].into_iter().find(|k| k.code() == c)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// A data packet's fixed header (layout in the module doc of [`crate::wire`]).
pub struct PacketHeader {
    /// Pages or Sync.
    pub kind: PacketKind,
    /// The payload is the normal pages uncompressed.
    pub raw: bool,
    /// The session's method; the destination refuses any other.
    pub method: MethodCode,
    /// Region id the page offsets are in.
    pub region: u16,
    /// Non-zero pages in the packet.
    pub normal: u16,
    /// Zero pages in the packet (offsets only).
    pub zero: u16,
    /// Round the pages belong to.
    pub round: u32,
    /// Sequence number on its channel (from 0).
    pub packet_num: u64,
    /// Payload bytes after the offsets.
    pub payload_len: u32,
}

impl PacketHeader {
    /// The end-of-round packet of a channel.
    pub fn sync(method: MethodCode, round: u32, packet_num: u64) -> Self {
        Self { kind: PacketKind::Sync, raw: false, method, region: 0, normal: 0, zero: 0, round, packet_num, payload_len: 0 }
    }

    /// The header's bytes on the wire (the CRC32C trails the packet; see [`PacketCrc`]).
    pub fn encode(&self) -> [u8; PACKET_HEADER_LEN] {
        let mut b = [0u8; PACKET_HEADER_LEN];
        b[0..4].copy_from_slice(&PACKET_MAGIC.to_le_bytes());
        b[4] = self.kind.code();
        b[5] = if self.raw { FLAG_RAW } else { 0 };
        b[6] = self.method.0;
        b[8..10].copy_from_slice(&self.region.to_le_bytes());
        b[10..12].copy_from_slice(&self.normal.to_le_bytes());
        b[12..14].copy_from_slice(&self.zero.to_le_bytes());
        b[16..20].copy_from_slice(&self.round.to_le_bytes());
        b[20..28].copy_from_slice(&self.packet_num.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Parse and check everything a header alone can tell: magic, kind, flags, page counts
    /// and the payload length bound (a payload never exceeds the batch it carries, so a
    /// receive buffer of one batch always suffices). The method code is the receiver's to
    /// check against the session's.
    pub fn decode(b: &[u8; PACKET_HEADER_LEN]) -> Result<Self, WireError> {
        let magic = u32::from_le_bytes(b[0..4].try_into().unwrap());
        if magic != PACKET_MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        let kind = PacketKind::from_code(b[4]).ok_or_else(|| WireError::malformed("packet header", format!("unknown kind {}", b[4])))?;
        if b[5] & !FLAG_RAW != 0 || b[7] != 0 || b[14] != 0 || b[15] != 0 {
            return Err(WireError::malformed("packet header", "reserved bits set"));
        }
        let h = Self {
            kind,
            raw: b[5] & FLAG_RAW != 0,
            method: MethodCode(b[6]),
            region: u16::from_le_bytes(b[8..10].try_into().unwrap()),
            normal: u16::from_le_bytes(b[10..12].try_into().unwrap()),
            zero: u16::from_le_bytes(b[12..14].try_into().unwrap()),
            round: u32::from_le_bytes(b[16..20].try_into().unwrap()),
            packet_num: u64::from_le_bytes(b[20..28].try_into().unwrap()),
            payload_len: u32::from_le_bytes(b[28..32].try_into().unwrap()),
        };
        match kind {
            PacketKind::Sync => h.check_sync()?,
            PacketKind::Pages => h.check_pages()?,
        }
        Ok(h)
    }

    fn check_sync(&self) -> Result<(), WireError> {
        if self.normal != 0 || self.zero != 0 || self.payload_len != 0 || self.raw || self.region != 0 {
            return Err(WireError::malformed("sync packet", "carries pages or payload"));
        }
        Ok(())
    }

    fn check_pages(&self) -> Result<(), WireError> {
        let (n, z, len) = (self.normal as usize, self.zero as usize, self.payload_len as usize);
        let bad = |detail: String| Err(WireError::malformed("packet header", detail));
        if n + z == 0 {
            return bad("no pages".into());
        }
        if n > MAX_BATCH_PAGES || z > MAX_BATCH_PAGES {
            return bad(format!("{n} normal / {z} zero pages exceeds the batch limit of {MAX_BATCH_PAGES}"));
        }
        if len > n * PAGE_SIZE || len > MAX_BATCH_BYTES {
            return bad(format!("payload of {len} bytes for {n} pages"));
        }
        if self.raw && len != n * PAGE_SIZE {
            return bad(format!("raw payload of {len} bytes for {n} pages"));
        }
        if n == 0 && len != 0 {
            return bad("payload without normal pages".into());
        }
        if n > 0 && len == 0 {
            return bad("normal pages without payload".into());
        }
        Ok(())
    }

    /// Bytes of page offsets that follow the header.
    pub fn offsets_len(&self) -> usize {
        (self.normal as usize + self.zero as usize) * 4
    }

    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        PACKET_HEADER_LEN + self.offsets_len() + self.payload_len as usize + 4
    }
}

/// Runs of consecutive pages in a strictly increasing list: `(first page, count)`. The source
/// uses them to compress or write contiguous guest memory in one piece, the destination to
/// decompress or read into it.
pub fn page_runs(pages: &[u32]) -> PageRuns<'_> {
    PageRuns { pages }
}

/// Iterator of [`page_runs`].
pub struct PageRuns<'a> {
    pages: &'a [u32],
}

impl Iterator for PageRuns<'_> {
    type Item = (u32, u32);
    fn next(&mut self) -> Option<(u32, u32)> {
        let first = *self.pages.first()?;
        let mut n = 1;
        while n < self.pages.len() && self.pages[n] == self.pages[n - 1].wrapping_add(1) {
            n += 1;
        }
        self.pages = &self.pages[n..];
        Some((first, n as u32))
    }
}

/// Append the offsets of a pages packet: the normal pages (given as runs), then the zero pages.
pub fn encode_offsets(normal_runs: &[(u32, u32)], zero: &[u32], out: &mut Vec<u8>) {
    for &(first, n) in normal_runs {
        for p in first..first + n {
            out.extend_from_slice(&p.to_le_bytes());
        }
    }
    for &p in zero {
        out.extend_from_slice(&p.to_le_bytes());
    }
}

/// Decode and validate the offsets of a pages packet against a region of `region_pages`:
/// every index in range, each list strictly increasing, no page both normal and zero.
pub fn decode_offsets(h: &PacketHeader, bytes: &[u8], region_pages: u64, normal: &mut Vec<u32>, zero: &mut Vec<u32>) -> Result<(), WireError> {
    debug_assert_eq!(bytes.len(), h.offsets_len());
    normal.clear();
    zero.clear();
    for (i, c) in bytes.chunks_exact(4).enumerate() {
        let p = u32::from_le_bytes(c.try_into().unwrap());
        if p as u64 >= region_pages {
            return Err(WireError::malformed("packet", format!("page {p} outside region {} of {region_pages} pages", h.region)));
        }
        if i < h.normal as usize {
            normal.push(p)
        } else {
            zero.push(p)
        }
    }
    for list in [&*normal, &*zero] {
        if list.windows(2).any(|w| w[0] >= w[1]) {
            return Err(WireError::malformed("packet", "page offsets not strictly increasing"));
        }
    }
    disjoint(normal, zero)
}

/// Two strictly increasing lists share no page.
fn disjoint(normal: &[u32], zero: &[u32]) -> Result<(), WireError> {
    let (mut i, mut j) = (0, 0);
    while i < normal.len() && j < zero.len() {
        match normal[i].cmp(&zero[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => return Err(WireError::malformed("packet", format!("page {} both normal and zero", normal[i]))),
        }
    }
    Ok(())
}

/// The packet CRC32C, computed incrementally in wire order of its parts except the header:
/// offsets, then payload (in as many pieces as it was sent or received), then the header
/// last — so the source's socket writer stamps the packet number into a header without
/// re-reading the payload, and the destination checks raw pages read straight into place.
#[derive(Clone, Copy, Debug, Default)]
pub struct PacketCrc(u32);

impl PacketCrc {
    /// A CRC over nothing yet.
    pub fn new() -> Self {
        PacketCrc(0)
    }
    /// The CRC so far (of offsets and payload), to carry to the socket writer.
    pub fn resume(body_crc: u32) -> Self {
        PacketCrc(body_crc)
    }
    /// Add the next piece of the body (offsets, or a piece of the payload).
    pub fn body(self, bytes: &[u8]) -> Self {
        PacketCrc(crc32c::crc32c_append(self.0, bytes))
    }
    /// The body's CRC so far.
    pub fn value(self) -> u32 {
        self.0
    }
    /// The packet's CRC: the body's, then the header.
    pub fn finish(self, header: &[u8; PACKET_HEADER_LEN]) -> u32 {
        crc32c::crc32c_append(self.0, header)
    }
    /// Finish and compare with the 4 CRC bytes that ended the packet.
    pub fn check(self, header: &[u8; PACKET_HEADER_LEN], trailer: [u8; 4]) -> Result<(), WireError> {
        let computed = self.finish(header);
        let expected = u32::from_le_bytes(trailer);
        if computed != expected {
            return Err(WireError::Crc { computed, expected });
        }
        Ok(())
    }
}

/// CRC32C of a whole packet: offsets, payload, then header.
pub fn packet_crc(header: &[u8; PACKET_HEADER_LEN], offsets: &[u8], payload: &[u8]) -> u32 {
    PacketCrc::new().body(offsets).body(payload).finish(header)
}

/// A whole packet as bytes (header, offsets, payload, CRC), for tests and tools; the engine
/// writes the same parts with one vectored write.
pub fn encode_packet(h: &PacketHeader, offsets: &[u8], payload: &[u8]) -> Vec<u8> {
    let hdr = h.encode();
    let crc = packet_crc(&hdr, offsets, payload);
    let mut v = Vec::with_capacity(h.wire_len());
    v.extend_from_slice(&hdr);
    v.extend_from_slice(offsets);
    v.extend_from_slice(payload);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// A whole packet parsed from bytes by [`decode_packet`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedPacket {
    /// Its header.
    pub header: PacketHeader,
    /// Page offsets of the normal pages.
    pub normal: Vec<u32>,
    /// Page offsets of the zero pages.
    pub zero: Vec<u32>,
    /// The payload (compressed or raw pages).
    pub payload: Vec<u8>,
}

/// Parse and check one whole packet (header, offsets against a region of `region_pages`,
/// CRC), the inverse of [`encode_packet`]; trailing bytes are an error. The engine's reader
/// does the same checks in the same order while reading from a socket.
pub fn decode_packet(bytes: &[u8], region_pages: u64) -> Result<DecodedPacket, WireError> {
    let short = || WireError::Closed(" inside a packet".into());
    let hdr: &[u8; PACKET_HEADER_LEN] = bytes.get(..PACKET_HEADER_LEN).ok_or_else(short)?.try_into().unwrap();
    let header = PacketHeader::decode(hdr)?;
    if bytes.len() < header.wire_len() {
        return Err(short());
    }
    if bytes.len() > header.wire_len() {
        return Err(WireError::malformed("packet", format!("{} bytes after its end", bytes.len() - header.wire_len())));
    }
    let offsets = &bytes[PACKET_HEADER_LEN..PACKET_HEADER_LEN + header.offsets_len()];
    let payload = &bytes[PACKET_HEADER_LEN + header.offsets_len()..bytes.len() - 4];
    let (mut normal, mut zero) = (Vec::new(), Vec::new());
    if header.kind == PacketKind::Pages {
        decode_offsets(&header, offsets, region_pages, &mut normal, &mut zero)?;
    }
    PacketCrc::new().body(offsets).body(payload).check(hdr, bytes[bytes.len() - 4..].try_into().unwrap())?;
    Ok(DecodedPacket { header, normal, zero, payload: payload.to_vec() })
}
