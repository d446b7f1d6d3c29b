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
//! Commit point (as in QEMU): once the source has written `Finish` whole, the destination is
//! the side that may run the guest. The destination resumes only after its own checks pass
//! (every round complete, the digest equal when verification was announced); it sends
//! `Abort` only before resuming, never after. A source that gets `Abort` after `Finish`
//! resumes its guest; a source that cannot learn the outcome (`Done` lost or garbled, the link
//! gone, a timeout) stays paused and reports "outcome unknown: the destination may be running;
//! do not resume here" (`MigrationError::OutcomeUnknown`) — never two running copies. A
//! `Finish` that could not be written whole is no commit (its CRC covers the whole frame), so
//! the source resumes after such a write error.
//!
//! Verification is agreed in the handshake: `Hello.verify` says whether `Finish` will carry
//! the digest; a destination that requires it refuses `verify: false`, and a `Finish` without
//! a digest after `verify: true` is a failure, not an unverified success.
//!
//! Limits checked before anything is allocated: a handshake frame is at most
//! [`MAX_HANDSHAKE_BODY`] bytes (larger: dropped unread), at most [`MAX_REGIONS`] regions,
//! names of at most [`MAX_REGION_NAME`] bytes, each region a non-zero page multiple of at most
//! 2^32 pages (offsets are u32), the total within the destination's `max_memory`.
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

pub use control::{read_frame, read_frame_limited, write_frame, Control, Hello, Role, SessionId};
pub use packet::{decode_offsets, packet_crc, PacketHeader, PacketKind, PACKET_HEADER_LEN, PACKET_MAGIC};

pub const PROTOCOL_VERSION: u16 = 1;
/// Largest control frame body we accept (a region table or device state; not guest memory).
pub const MAX_FRAME_BODY: usize = 64 << 20;
/// Largest handshake frame (a Hello with its region table) a destination reads from a peer it
/// does not know yet: ample for [`MAX_REGIONS`] regions, and what an unauthenticated
/// connection may cost in memory.
pub const MAX_HANDSHAKE_BODY: usize = 1 << 20;
/// Most regions a Hello may announce.
pub const MAX_REGIONS: usize = 1024;
/// Longest region name (bytes).
pub const MAX_REGION_NAME: usize = 256;

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
