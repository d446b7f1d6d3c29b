//! Handshake and control messages: typed structs, JSON bodies in CRC-checked frames.

use super::{read_exact, WireError, MAX_FRAME_BODY, PROTOCOL_VERSION};

use crate::codec::Method;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"PFCT");
const FRAME_HEADER_LEN: usize = 14;

/// Random 128-bit id naming one migration; every connection of it carries the same one.
/// On the wire: 32 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId(pub u128);

impl Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() != 32 {
            return Err(serde::de::Error::custom("session id must be 32 hex digits"));
        }
        u128::from_str_radix(&s, 16).map(SessionId).map_err(serde::de::Error::custom)
    }
}

impl SessionId {
    pub fn random() -> Self {
        SessionId(rand::random())
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Control,
    Data,
}

/// First message on every connection, source → destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    pub session: SessionId,
    pub role: Role,
    /// Data channel index (0 for control).
    pub channel: u16,
    /// Number of data channels that will follow.
    pub channels: u16,
    pub method: Method,
    pub level: u8,
    /// Region table (name, bytes), in region-id order.
    pub regions: Vec<(String, u64)>,
    /// Whether the source will send a digest of all memory in `Finish`. A source that skips
    /// it (`--no-verify`) says so here, and a destination that requires verification refuses
    /// the handshake; a `Finish` without a digest after `verify: true` is a failure.
    /// (Additive field: absent means `true`.)
    #[serde(default = "yes")]
    pub verify: bool,
}

fn yes() -> bool {
    true
}

/// Messages after the handshake (and the handshake replies).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    Hello(Hello),
    /// Handshake accepted.
    Welcome { fresh_destination: bool },
    /// Handshake refused; both sides print `reason`.
    Refuse { reason: String },
    /// Destination: every channel has delivered round `round`.
    RoundDone { round: u32, pages: u64 },
    /// Source: the last round is `round`; the workload's device state is the frame's blob.
    Finish { round: u32, digest: Option<String> },
    /// Destination: memory verified, workload resumed.
    Done { stats: serde_json::Value },
    /// Either side: the migration is over, with this reason.
    Abort { reason: String },
}

fn crc(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p))
}

/// Write one frame: magic, version, body length, blob length, JSON body, blob, CRC32C.
pub fn write_frame(w: &mut impl Write, msg: &Control, blob: &[u8]) -> Result<(), WireError> {
    let body = serde_json::to_vec(msg).expect("control messages serialize");
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    hdr[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    hdr[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hdr[6..10].copy_from_slice(&(body.len() as u32).to_le_bytes());
    hdr[10..14].copy_from_slice(&(blob.len() as u32).to_le_bytes());
    let sum = crc(&[&hdr, &body, blob]);
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len() + blob.len() + 4);
    out.extend_from_slice(&hdr);
    out.extend_from_slice(&body);
    out.extend_from_slice(blob);
    out.extend_from_slice(&sum.to_le_bytes());
    w.write_all(&out)?;
    w.flush()?;
    Ok(())
}

/// Read one frame; checks magic, version, sizes and CRC before parsing the body.
pub fn read_frame(r: &mut impl Read) -> Result<(Control, Vec<u8>), WireError> {
    read_frame_limited(r, MAX_FRAME_BODY)
}

/// [`read_frame`] with a smaller cap on the body and the blob: what a handshake reads from a
/// peer not yet known, so an unauthenticated connection costs at most `max` bytes of memory.
pub fn read_frame_limited(r: &mut impl Read, max: usize) -> Result<(Control, Vec<u8>), WireError> {
    let max = max.min(MAX_FRAME_BODY);
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    read_exact(r, &mut hdr, "while waiting for a control message")?;
    let magic = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    if magic != FRAME_MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes(hdr[4..6].try_into().unwrap());
    let body_len = u32::from_le_bytes(hdr[6..10].try_into().unwrap()) as usize;
    let blob_len = u32::from_le_bytes(hdr[10..14].try_into().unwrap()) as usize;
    if body_len > max || blob_len > max {
        return Err(WireError::malformed("control frame", format!("body {body_len} / blob {blob_len} bytes exceeds {max}")));
    }
    let mut rest = vec![0u8; body_len + blob_len + 4];
    read_exact(r, &mut rest, "in the middle of a control message")?;
    let (payload, tail) = rest.split_at(body_len + blob_len);
    let expected = u32::from_le_bytes(tail.try_into().unwrap());
    let computed = crc(&[&hdr, payload]);
    if computed != expected {
        return Err(WireError::Crc { computed, expected });
    }
    // The frame layout and the Hello/Refuse messages are kept stable across protocol versions,
    // so a peer of another version still gets a readable refusal; the version itself is
    // checked in the handshake (Hello.version).
    let _ = version;
    let msg: Control = serde_json::from_slice(&payload[..body_len])
        .map_err(|e| WireError::malformed("control message", e.to_string()))?;
    Ok((msg, payload[body_len..].to_vec()))
}
