//! The payload format: QATzip's `QZ_DEFLATE_GZIP_EXT`, i.e. RFC 1952 gzip members whose header
//! carries an extra field with subfield ID `'Q','Z'` holding two little-endian u32s — the
//! member's uncompressed size and the length of its deflate data.
//!
//! A member as QATzip 1.3.1 writes it (checked byte for byte against the library's software
//! path; its hardware path writes one such member per hardware buffer, 64 KiB by default):
//!
//! ```text
//! 1f 8b 08 04 | 00 00 00 00 | XFL ff | 0c 00 | 'Q' 'Z' 08 00 | src_len:u32 | deflate_len:u32
//! deflate data (deflate_len bytes) | CRC-32 of the uncompressed data:u32 | ISIZE:u32
//! ```
//!
//! FLG is FEXTRA only, MTIME 0, OS 255 (unknown), XFL 4 at level 1, 2 at level 9 and 0
//! otherwise (gzip's "fastest" / "best" hints). A payload is one or more members back to back;
//! any multi-member gzip decoder reads it.

/// Bytes of a member header as written here and by QATzip (10 fixed + XLEN + one subfield).
pub(crate) const HEADER_LEN: usize = 24;
/// CRC-32 + ISIZE.
pub(crate) const TRAILER_LEN: usize = 8;

const ID1: u8 = 0x1f;
const ID2: u8 = 0x8b;
const CM_DEFLATE: u8 = 8;
const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
const FRESERVED: u8 = 0xe0;
const OS_UNKNOWN: u8 = 0xff;
/// Subfield ID of QATzip's size record, and its length.
const QZ_SI: [u8; 2] = *b"QZ";
const QZ_SUBFIELD_LEN: u16 = 8;

/// XFL for a compression level, as QATzip (and zlib's gzip writer) sets it.
pub(crate) fn xfl_for_level(level: u8) -> u8 {
    match level {
        1 => 4,
        9 => 2,
        _ => 0,
    }
}

/// Write a 24-byte member header into `out[..HEADER_LEN]`.
pub(crate) fn write_header(out: &mut [u8], level: u8, src_len: u32, deflate_len: u32) {
    let h = &mut out[..HEADER_LEN];
    h[..4].copy_from_slice(&[ID1, ID2, CM_DEFLATE, FEXTRA]);
    h[4..8].copy_from_slice(&0u32.to_le_bytes()); // MTIME
    h[8] = xfl_for_level(level);
    h[9] = OS_UNKNOWN;
    h[10..12].copy_from_slice(&(4 + QZ_SUBFIELD_LEN).to_le_bytes()); // XLEN
    h[12..14].copy_from_slice(&QZ_SI);
    h[14..16].copy_from_slice(&QZ_SUBFIELD_LEN.to_le_bytes());
    h[16..20].copy_from_slice(&src_len.to_le_bytes());
    h[20..24].copy_from_slice(&deflate_len.to_le_bytes());
}

/// Write the 8-byte trailer into `out[..TRAILER_LEN]`.
pub(crate) fn write_trailer(out: &mut [u8], crc: u32, isize: u32) {
    out[..4].copy_from_slice(&crc.to_le_bytes());
    out[4..8].copy_from_slice(&isize.to_le_bytes());
}

/// Sizes from a `QZ` subfield.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct QzSizes {
    pub src_len: u32,
    pub deflate_len: u32,
}

/// A parsed member header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemberHeader {
    /// Header bytes, i.e. where the deflate data starts.
    pub len: usize,
    /// The `QZ` size record, when the header has one.
    pub qz: Option<QzSizes>,
}

/// Parse the gzip member header at the start of `input`. Validates the magic, method, reserved
/// flag bits, the extra field's subfield structure, the zero-terminated name and comment, and
/// the header CRC when FHCRC is set (FTEXT is a hint and ignored).
pub(crate) fn parse_header(input: &[u8]) -> Result<MemberHeader, String> {
    if input.len() < 10 {
        return Err(format!("truncated gzip header ({} bytes)", input.len()));
    }
    if input[0] != ID1 || input[1] != ID2 {
        return Err(format!("not a gzip member (magic {:02x} {:02x})", input[0], input[1]));
    }
    if input[2] != CM_DEFLATE {
        return Err(format!("gzip compression method {} is not deflate", input[2]));
    }
    let flg = input[3];
    if flg & FRESERVED != 0 {
        return Err(format!("gzip header has reserved flag bits set ({flg:#04x})"));
    }
    let mut p = 10;
    let mut qz = None;
    if flg & FEXTRA != 0 {
        let xlen = u16::from_le_bytes(read::<2>(input, p).ok_or("truncated gzip extra length")?) as usize;
        p += 2;
        let extra = input.get(p..p + xlen).ok_or("truncated gzip extra field")?;
        p += xlen;
        let mut q = 0;
        while q < extra.len() {
            let sub = extra.get(q..q + 4).ok_or("malformed gzip extra subfield")?;
            let si = [sub[0], sub[1]];
            let len = u16::from_le_bytes([sub[2], sub[3]]) as usize;
            let data = extra.get(q + 4..q + 4 + len).ok_or("gzip extra subfield overruns the extra field")?;
            if si == QZ_SI {
                if len != QZ_SUBFIELD_LEN as usize {
                    return Err(format!("QZ subfield of {len} bytes (expected {QZ_SUBFIELD_LEN})"));
                }
                if qz.is_some() {
                    return Err("two QZ subfields in one gzip header".into());
                }
                qz = Some(QzSizes {
                    src_len: u32::from_le_bytes(data[0..4].try_into().unwrap()),
                    deflate_len: u32::from_le_bytes(data[4..8].try_into().unwrap()),
                });
            }
            q += 4 + len;
        }
    }
    for (flag, what) in [(FNAME, "name"), (FCOMMENT, "comment")] {
        if flg & flag != 0 {
            let rest = input.get(p..).unwrap_or(&[]);
            let end = rest.iter().position(|&b| b == 0).ok_or_else(|| format!("unterminated gzip {what}"))?;
            p += end + 1;
        }
    }
    if flg & FHCRC != 0 {
        let stored = u16::from_le_bytes(read::<2>(input, p).ok_or("truncated gzip header CRC")?);
        let actual = crc32fast::hash(&input[..p]) as u16;
        if stored != actual {
            return Err(format!("gzip header CRC {stored:#06x} != {actual:#06x}"));
        }
        p += 2;
    }
    Ok(MemberHeader { len: p, qz })
}

/// Parse an 8-byte trailer at `input[at..]`: (CRC-32, ISIZE).
pub(crate) fn parse_trailer(input: &[u8], at: usize) -> Option<(u32, u32)> {
    Some((u32::from_le_bytes(read::<4>(input, at)?), u32::from_le_bytes(read::<4>(input, at + 4)?)))
}

fn read<const N: usize>(input: &[u8], at: usize) -> Option<[u8; N]> {
    input.get(at..at.checked_add(N)?)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_qatzip_bytes() {
        let mut h = [0u8; HEADER_LEN];
        write_header(&mut h, 1, 524288, 4220);
        // Bytes QATzip 1.3.1's software path writes for a 512 KiB batch at level 1.
        let qatzip: [u8; 24] =
            [0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 4, 0xff, 0x0c, 0, b'Q', b'Z', 8, 0, 0, 0, 8, 0, 0x7c, 0x10, 0, 0];
        assert_eq!(h, qatzip);
        assert_eq!(
            parse_header(&h).unwrap(),
            MemberHeader { len: HEADER_LEN, qz: Some(QzSizes { src_len: 524288, deflate_len: 4220 }) }
        );
        write_header(&mut h, 9, 1, 2);
        assert_eq!(h[8], 2);
        write_header(&mut h, 5, 1, 2);
        assert_eq!(h[8], 0);
    }

    #[test]
    fn plain_and_decorated_headers() {
        // No extra field.
        let plain = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        assert_eq!(parse_header(&plain).unwrap(), MemberHeader { len: 10, qz: None });
        // Extra field with a foreign subfield, a name, a comment and a header CRC.
        let mut h = vec![0x1f, 0x8b, 8, FEXTRA | FNAME | FCOMMENT | FHCRC, 0, 0, 0, 0, 0, 3, 6, 0, b'A', b'B', 2, 0, 7, 7];
        h.extend_from_slice(b"name\0comment\0");
        let crc = crc32fast::hash(&h) as u16;
        h.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(parse_header(&h).unwrap(), MemberHeader { len: h.len(), qz: None });
        let n = h.len();
        h[n - 1] ^= 1;
        assert!(parse_header(&h).unwrap_err().contains("header CRC"));
    }

    #[test]
    fn malformed_headers() {
        let mut h = [0u8; HEADER_LEN];
        write_header(&mut h, 1, 10, 10);
        for n in 0..HEADER_LEN {
            assert!(parse_header(&h[..n]).is_err(), "truncated at {n} accepted");
        }
        let mut bad = h;
        bad[1] = 0;
        assert!(parse_header(&bad).is_err());
        let mut bad = h;
        bad[2] = 7;
        assert!(parse_header(&bad).is_err());
        let mut bad = h;
        bad[3] |= 0x80;
        assert!(parse_header(&bad).unwrap_err().contains("reserved"));
        let mut bad = h;
        bad[14] = 9; // QZ subfield claims 9 bytes: overruns XLEN
        assert!(parse_header(&bad).is_err());
        let mut bad = h;
        bad[10] = 11; // XLEN shorter than the subfield
        assert!(parse_header(&bad).is_err());
        assert!(parse_header(&[0x1f, 0x8b, 8, FNAME, 0, 0, 0, 0, 0, 3, b'x']).unwrap_err().contains("unterminated"));
    }
}
