//! Data packets: a fixed header, page offsets, payload, CRC32C.
//!
//! ```text
//! offset size field
//!  0      4   magic "PFDP"
//!  4      1   kind: 0 = pages, 1 = sync (end of round on this channel)
//!  5      1   flags: bit 0 = payload is raw (not compressed)
//!  6      1   method code (none 0, zlib 1, zstd 2, qatzip 3)
//!  7      1   reserved, 0
//!  8      2   region id
//! 10      2   normal pages (in the payload)
//! 12      2   zero pages (offsets only)
//! 14      2   reserved, 0
//! 16      4   round
//! 20      8   packet number (per channel, from 0, consecutive, sync packets included)
//! 28      4   payload length
//! 32      4×n page indexes within the region: normal pages then zero pages, each list
//!             strictly increasing
//!  …      …   payload: the normal pages, compressed with the method or raw
//!  …      4   CRC32C of the offsets, then the payload, then the header (header last, so
//!             the socket writer stamps the packet number without re-reading the payload)
//! ```

use super::WireError;
use crate::codec::{Method, MAX_BATCH_BYTES, MAX_BATCH_PAGES};
use crate::memory::PAGE_SIZE;

pub const PACKET_MAGIC: u32 = u32::from_le_bytes(*b"PFDP");
pub const PACKET_HEADER_LEN: usize = 32;
pub const FLAG_RAW: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketKind {
    Pages,
    Sync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketHeader {
    pub kind: PacketKind,
    pub raw: bool,
    pub method: Method,
    pub region: u16,
    pub normal: u16,
    pub zero: u16,
    pub round: u32,
    pub packet_num: u64,
    pub payload_len: u32,
}

impl PacketHeader {
    pub fn sync(method: Method, round: u32, packet_num: u64) -> Self {
        Self { kind: PacketKind::Sync, raw: false, method, region: 0, normal: 0, zero: 0, round, packet_num, payload_len: 0 }
    }

    pub fn encode(&self) -> [u8; PACKET_HEADER_LEN] {
        let mut b = [0u8; PACKET_HEADER_LEN];
        b[0..4].copy_from_slice(&PACKET_MAGIC.to_le_bytes());
        b[4] = match self.kind {
            PacketKind::Pages => 0,
            PacketKind::Sync => 1,
        };
        b[5] = if self.raw { FLAG_RAW } else { 0 };
        b[6] = self.method.code();
        b[8..10].copy_from_slice(&self.region.to_le_bytes());
        b[10..12].copy_from_slice(&self.normal.to_le_bytes());
        b[12..14].copy_from_slice(&self.zero.to_le_bytes());
        b[16..20].copy_from_slice(&self.round.to_le_bytes());
        b[20..28].copy_from_slice(&self.packet_num.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Parse and check everything a header alone can tell: magic, kind, flags, method, page
    /// counts and the payload length bound (a payload never exceeds the batch it carries, so
    /// a receive buffer of one batch always suffices).
    pub fn decode(b: &[u8; PACKET_HEADER_LEN]) -> Result<Self, WireError> {
        let magic = u32::from_le_bytes(b[0..4].try_into().unwrap());
        if magic != PACKET_MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        let kind = match b[4] {
            0 => PacketKind::Pages,
            1 => PacketKind::Sync,
            k => return Err(WireError::malformed("packet header", format!("unknown kind {k}"))),
        };
        if b[5] & !FLAG_RAW != 0 || b[7] != 0 || b[14] != 0 || b[15] != 0 {
            return Err(WireError::malformed("packet header", "reserved bits set"));
        }
        let method = Method::from_code(b[6]).ok_or_else(|| WireError::malformed("packet header", format!("unknown method code {}", b[6])))?;
        let h = Self {
            kind,
            raw: b[5] & FLAG_RAW != 0,
            method,
            region: u16::from_le_bytes(b[8..10].try_into().unwrap()),
            normal: u16::from_le_bytes(b[10..12].try_into().unwrap()),
            zero: u16::from_le_bytes(b[12..14].try_into().unwrap()),
            round: u32::from_le_bytes(b[16..20].try_into().unwrap()),
            packet_num: u64::from_le_bytes(b[20..28].try_into().unwrap()),
            payload_len: u32::from_le_bytes(b[28..32].try_into().unwrap()),
        };
        let (n, z, len) = (h.normal as usize, h.zero as usize, h.payload_len as usize);
        match kind {
            PacketKind::Sync => {
                if n != 0 || z != 0 || len != 0 || h.raw || h.region != 0 {
                    return Err(WireError::malformed("sync packet", "carries pages or payload"));
                }
            }
            PacketKind::Pages => {
                if n + z == 0 {
                    return Err(WireError::malformed("packet header", "no pages"));
                }
                if n > MAX_BATCH_PAGES || z > MAX_BATCH_PAGES {
                    return Err(WireError::malformed(
                        "packet header",
                        format!("{n} normal / {z} zero pages exceeds the batch limit of {MAX_BATCH_PAGES}"),
                    ));
                }
                if len > n * PAGE_SIZE || len > MAX_BATCH_BYTES {
                    return Err(WireError::malformed("packet header", format!("payload of {len} bytes for {n} pages")));
                }
                if h.raw && len != n * PAGE_SIZE {
                    return Err(WireError::malformed("packet header", format!("raw payload of {len} bytes for {n} pages")));
                }
                if n == 0 && len != 0 {
                    return Err(WireError::malformed("packet header", "payload without normal pages"));
                }
                if n > 0 && len == 0 {
                    return Err(WireError::malformed("packet header", "normal pages without payload"));
                }
            }
        }
        Ok(h)
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
    if !normal.is_empty() && !zero.is_empty() {
        let (mut i, mut j) = (0, 0);
        while i < normal.len() && j < zero.len() {
            match normal[i].cmp(&zero[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => return Err(WireError::malformed("packet", format!("page {} both normal and zero", normal[i]))),
            }
        }
    }
    Ok(())
}

/// CRC32C of a packet: offsets, payload, then header.
pub fn packet_crc(header: &[u8], offsets: &[u8], payload: &[u8]) -> u32 {
    let c = crc32c::crc32c_append(0, offsets);
    let c = crc32c::crc32c_append(c, payload);
    crc32c::crc32c_append(c, header)
}
