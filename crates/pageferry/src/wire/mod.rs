//! The pageferry wire protocol, version 1.
//!
//! ```text
//!  source                                               destination
//!    │ ── control: Hello{role=control, session, method, regions} ──▶ │ check version, method,
//!    │ ◀──────────────── Welcome | Refuse{reason} ─────────────────  │ regions; both print reason
//!    │ ── data ch 0..N: Hello{role=data, session, channel} ────────▶ │ wrong session: dropped
//!    │ ◀──────────────── Welcome | Refuse{reason} ─────────────────  │
//!    │                                                               │
//!    │  round k (k = 0, 1, ...):                                     │
//!    │ ══ data ch i: Pages{round k, region, offsets, payload}* ════▶ │ write in place
//!    │ ══ data ch i: Sync{round k} ════════════════════════════════▶ │ all N synced → round k done
//!    │ ◀──────────── control: RoundDone{k} ────────────────────────  │
//!    │  ... until the rest fits the downtime limit; pause guest ...  │
//!    │ ══ data: last dirty pages, Sync{f} ═════════════════════════▶ │
//!    │ ── control: Finish{round f, digest, device state} ──────────▶ │ verify, resume guest
//!    │ ◀──────────── control: Done{dest stats} | Abort{reason} ─────  │
//!    │  (either side may send Abort{reason} on control at any time; both print it)
//! ```
//!
//! State machine of a destination data channel: `Handshake → Round(k) --Sync(k)--> Gate(k)
//! --all channels synced--> Round(k+1)`. A channel blocks at the gate, so no packet of round
//! k+1 is applied before every channel has delivered round k: a stale copy of a page can never
//! overwrite a newer one, whichever channel is faster. Within a round a page is sent at most
//! once.
//!
//! Framing: control frames and handshakes are `FrameHeader` + JSON body + optional binary blob
//! + CRC32C. Data packets are a fixed 32-byte [`PacketHeader`], page offsets (u32 each), the
//! payload, and a CRC32C over all of it. Every packet decodes on its own (each batch is
//! compressed independently). Integers are little-endian.
//!
//! Versioning: [`PROTOCOL_VERSION`] is bumped on any incompatible change; peers must run the
//! same version and refuse otherwise (with a message naming both versions). Additive changes
//! to JSON bodies (new optional fields) do not bump the version.

mod control;
mod packet;

pub use control::{read_frame, write_frame, Control, Hello, Role, SessionId};
pub use packet::{decode_offsets, packet_crc, PacketHeader, PacketKind, PACKET_HEADER_LEN, PACKET_MAGIC};

pub const PROTOCOL_VERSION: u16 = 1;
/// Largest control frame body we accept (a region table or device state; not guest memory).
pub const MAX_FRAME_BODY: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by peer{0}")]
    Closed(String),
    #[error("i/o error: {0}")]
    Io(std::io::Error),
    #[error("bad magic {found:#010x} (not a pageferry peer, or stream out of sync)")]
    BadMagic { found: u32 },
    #[error("protocol version mismatch: peer speaks {peer}, we speak {ours}")]
    Version { peer: u16, ours: u16 },
    #[error("CRC32C mismatch: computed {computed:#010x}, packet says {expected:#010x}")]
    Crc { computed: u32, expected: u32 },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        WireError::Io(e)
    }
}

impl WireError {
    pub fn malformed(what: &'static str, detail: impl Into<String>) -> Self {
        WireError::Malformed { what, detail: detail.into() }
    }
}

/// `read_exact` that reports a clean EOF as `Closed`.
pub fn read_exact(r: &mut impl std::io::Read, buf: &mut [u8], context: &str) -> Result<(), WireError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            WireError::Closed(format!(" {context}"))
        } else {
            WireError::Io(e)
        }
    })
}

#[cfg(test)]
mod tests;
