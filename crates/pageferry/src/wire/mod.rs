//! The pageferry wire protocol, version 2: the whole specification.
//!
//! This module owns the format and depends on nothing of the engine: which method a code
//! names is the codec registry's business (`crate::codec`), what a page is in memory the
//! memory module's; here a method is a [`MethodCode`] and a page is [`PAGE_SIZE`] bytes at a
//! page index of a region.
//!
//! # Sequence
//!
//! ```text
//!  source                                                        destination
//!    │ ── control: Hello{versions, session, role=control, channels,        │ negotiate version,
//!    │              method, level, regions, wants} ──────────────────────▶ │ check method, level,
//!    │ ◀── Welcome{version, fresh_destination, capabilities} | Refuse ───  │ regions, wants
//!    │  check version and capabilities (else Abort{reason})                │
//!    │ ── data ch 0..N: Hello{role=data, session, channel, ...} ───────▶  │ other session: dropped
//!    │ ◀── Welcome | Refuse ───────────────────────────────────────────    │
//!    │                                                                     │
//!    │  round k (k = 0, 1, ...):                                           │
//!    │ ══ data ch i: Pages{round k, region, offsets, payload}* ══════════▶ │ write in place
//!    │ ══ data ch i: Sync{round k} ══════════════════════════════════════▶ │ all N synced → k done
//!    │ ◀── control: RoundDone{k, pages} ─────────────────────────────────  │
//!    │  ... until the rest fits the downtime limit; pause the guest ...    │
//!    │ ══ data: last dirty pages, Sync{f} ═══════════════════════════════▶ │
//!    │ ── control: Finish{round f, digest} + device state blob ─────────▶  │ verify, resume guest
//!    │ ◀── control: Done{report} | Abort{reason} ────────────────────────  │
//!    │  (either side may send Abort{reason} or Cancel{by} on control at any time; both
//!    │   print it; either side sends Keepalive on control after stall-timeout/4 silent)
//! ```
//!
//! # State machines
//!
//! Source (one control thread; data channels only send):
//!
//! ```text
//! Connect ─Hello→ AwaitWelcome ─Welcome(v, caps ok)→ OpenData(i) ─Welcome→ … → Round(0)
//!            │ Refuse / bad version / caps lack method, level or a wanted feature → Failed
//! Round(k): send batches on all channels, Sync(k) on each ─→ AwaitRoundDone(k)
//! AwaitRoundDone(k) ─RoundDone(k)→ Round(k+1)            if the dirty rest > downtime budget
//!                   ─RoundDone(k)→ Paused: last pages, Sync(f), Finish(f) → AwaitDone
//! AwaitDone ─Done(report)→ Completed
//!           ─Abort→ Failed (the workload is resumed)
//!           ─lost / garbled / timeout→ OutcomeUnknown (stays paused: the destination may run)
//! any state before Finish ─Abort / error / timeout→ Failed (send Abort; a paused workload
//!           is resumed)
//! ```
//!
//! Destination (one control thread, one reader per data channel):
//!
//! ```text
//! Listen ─control Hello ok (version, method, level, wants, verify, limits, storage)→
//!        Welcome, AcceptData ─all N data Hellos of this session→ Running
//!        │ control Hello refused → Refuse, go on     (strays and garbage: dropped, go on)
//!        │ accept timeout, nobody accepted → Failed (Refused: the last refusal, if any)
//! Running: reader i: Round(k) ─Pages(k)→ apply ─Sync(k)→ Gate(k) ─all N at the gate→ Round(k+1)
//!          control: on each completed round k send RoundDone(k)
//!          control ─Finish(f)→ wait for round f complete → Closed (no packet applied after)
//! Closed ─digest ok (or verification off as agreed)→ resume workload (commit) → Done(report)
//!        → Completed
//! any state before the commit ─Abort / bad packet / closed channel / timeout→ Failed (send
//!        Abort); after it the destination never sends Abort
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
//! A data channel blocks at the gate, so no packet of round k+1 is applied before every
//! channel has delivered round k: a stale copy of a page can never overwrite a newer one,
//! whichever channel is faster. Within a round a page is sent at most once. Packet numbers
//! count from 0 per channel, consecutive, Sync included.
//!
//! # Control frames (control channel, and the handshake on every connection)
//!
//! ```text
//! offset size field
//!  0      4   magic "PFCT"
//!  4      2   protocol version the body is encoded in: a Hello carries the sender's
//!             highest; every later frame the session's agreed version
//!  6      4   body length (≤ 64 MiB)
//! 10      4   blob length (≤ 64 MiB)
//! 14      …   body: one JSON object (UTF-8), `"type"` names the message
//!  …      …   blob: binary (Finish: the workload's device state), else empty
//!  …      4   CRC32C of header, body, blob
//! ```
//!
//! Messages ([`Control`]; `"type"` value, fields):
//! - `hello` — [`Hello`]: `versions` {min, max} spoken, `session` (32 hex digits, one per
//!   migration), `role` (`"control"` | `"data"` | `"urgent"`), `channel` (data index, 0 for control),
//!   `channels` (N), `method` (wire code), `level` (signed integer: zstd's fast levels are
//!   negative), `regions` ([name, bytes] in id order),
//!   `wants` ([`Features`] the source will use), `verify` (Finish will carry the digest;
//!   absent = true).
//! - `welcome`: `version` (agreed), `fresh_destination` (memory is fresh zeroed),
//!   `capabilities` ([`Capabilities`]: `methods` [{code, name, min_level, max_level}] the
//!   destination decodes, `features` {tls, postcopy, auto, signed_levels}).
//!   `signed_levels` is written only when true.
//! - `refuse`: `reason`. `round_done`: `round`, `pages` (received so far). `finish`: `round`
//!   (the last), `digest` (xxh3-128 of all memory, 32 hex digits, or null = not verified).
//! - `done`: `report` ([`DestinationReport`]). `abort`: `reason`.
//!
//! Verification is agreed in the handshake: `Hello.verify` says whether `Finish` will carry
//! the digest; a destination that requires it refuses `verify: false`, and a `Finish` without
//! a digest after `verify: true` is a failure, not an unverified success.
//!
//! Postcopy (`Hello.wants.postcopy`, offered in `Welcome.capabilities.features.postcopy`; the
//! source then also connects one `Hello{role="urgent"}` channel, which carries only pages of
//! the postcopy round, no Sync). Messages: `postcopy`: `round`, `discard` ([region, first
//! page, pages]), blob = device state; `postcopy_running`; `page_request`: `region`, `pages`;
//! `done.report.postcopy` (counters, fault latencies). Instead of `Finish`, after round k:
//!
//! ```text
//!    │  pause guest for good; D = pages dirtied since round k        │
//!    │ ── control: Postcopy{round k+1, discard D, device state} ───▶ │ register memory with
//!    │                                                               │ userfaultfd MISSING, drop
//!    │                                                               │ D, start the guest
//!    │ ◀──────────── control: PostcopyRunning ──────────────────────  │
//!    │ ◀──────────── control: PageRequest{region, pages}* ──────────  │ fault thread, fault order
//!    │ ══ urgent ch: Pages{round k+1} (requested pages) ═══════════▶ │ UFFDIO_COPY / ZEROPAGE
//!    │ ══ data ch i: Pages{round k+1} (rest of D), Sync{k+1} ══════▶ │ (never over a page
//!    │ ◀──────────── control: Done{dest stats, postcopy stats} ─────  │  already there: EEXIST)
//! ```
//!
//! The destination is complete when every page of D is placed and all data channels synced
//! round k+1; a page can arrive twice (requested while its background copy was on the way):
//! the second copy is dropped. Once it has switched, the destination refuses a packet of any
//! other round, and one of the postcopy round that was checked before the switchover and
//! applied during it (the source sends none before `PostcopyRunning`). There is no digest
//! (the guest runs before all memory is there), so a destination that requires verification
//! refuses a postcopy source. After
//! `Postcopy` is written, any failure is a postcopy failure: the source never resumes, the
//! destination keeps what arrived and leaves the guest blocked on the missing pages (it never
//! reads zeros). There is no `--postcopy-recover`: recovering would need a reconnect handshake
//! that names the session, the destination's received-page bitmap sent back, and the source
//! kept alive to serve it — none of which this version has; both sides report the failure.
//!
//! Limits checked before anything is allocated: a handshake frame is at most
//! [`MAX_HANDSHAKE_BODY`] bytes (larger: dropped unread), at most [`MAX_REGIONS`] regions,
//! names of at most [`MAX_REGION_NAME`] bytes, each region a non-zero page multiple of at most
//! 2^32 pages (offsets are u32), the total within the destination's `max_memory`.
//!
//! A frame of a version below [`MIN_PROTOCOL_VERSION`] is not parsed (its body may differ);
//! `Refuse {reason}` has the same frame and body in every version, so any peer can read why.
//! New optional JSON fields (with defaults) do not bump the version.
//!
//! Transport: with TLS configured, every connection (control and data) first completes a TLS
//! 1.3 handshake and everything below travels inside standard TLS 1.3 application-data
//! records (after the handshake the record layer is pageferry's own: see `crate::transport`);
//! a data channel's Hello is accepted only from the identity that opened the session's control
//! channel (its peer certificate, or the one derived from its pre-shared key).
//!
//! # Data packets (data channels, after the handshake)
//!
//! ```text
//! offset size field
//!  0      4   magic "PFDP"
//!  4      1   kind (PacketKind): 0 = pages, 1 = sync (end of round on this channel)
//!  5      1   flags: bit 0 (FLAG_RAW) = payload is raw (not compressed); others 0
//!  6      1   method code (MethodCode, the session's): none 0, zlib 1, zstd 2, qatzip 3
//!  7      1   reserved, 0
//!  8      2   region id
//! 10      2   normal pages (in the payload), ≤ 128
//! 12      2   zero pages (offsets only), ≤ 128
//! 14      2   reserved, 0
//! 16      4   round
//! 20      8   packet number (per channel, from 0, consecutive, sync packets included)
//! 28      4   payload length (≤ normal pages × 4096; raw: exactly that)
//! 32      4×n page indexes within the region: normal pages then zero pages, each list
//!             strictly increasing, no page in both
//!  …      …   payload: the normal pages, compressed with the method or raw
//!  …      4   CRC32C of the offsets, then the payload, then the header (header last, so
//!             the socket writer stamps the packet number without re-reading the payload;
//!             [`PacketCrc`])
//! ```
//!
//! A sync packet has region, counts and payload length 0 and no flags. Every packet decodes
//! on its own (each batch is compressed independently). Integers are little-endian.
//!
//! # Codes (pinned by tests; never reuse or renumber)
//!
//! | what | codes |
//! |---|---|
//! | packet kind (byte 4) | pages 0, sync 1 |
//! | packet flags (byte 5) | raw 0x01 |
//! | method (byte 6, `Hello.method`, `MethodCaps.code`) | none 0, zlib 1, zstd 2, qatzip 3 (declared by each codec file) |
//! | role (JSON) | `"control"`, `"data"`, `"urgent"` (postcopy) |
//! | control message (JSON `"type"`) | `hello`, `welcome`, `refuse`, `round_done`, `finish`, `postcopy`, `postcopy_running`, `page_request`, `done`, `abort` |
//!
//! # Versions
//!
//! [`PROTOCOL_VERSION`] (N) is bumped on any incompatible change. A build speaks N and N-1
//! ([`VersionRange::policy`]); the Hello carries the source's range, the destination picks
//! the highest version both speak and says it in the Welcome, and everything after is
//! encoded in that version. No common version: the destination refuses with a message
//! naming both ranges ("source speaks versions 0..=1, destination speaks version 2"), and a
//! source refuses a Welcome outside its own range the same way.
//!
//! Version 1 (no range in its Hello, methods by name, an untyped Done) is refused: it
//! predates negotiation, so the N-1 window starts at 2 ([`MIN_PROTOCOL_VERSION`]). A v1
//! source gets a readable Refuse (its frame layout is the same); a v1 destination cannot
//! parse a v2 Hello and closes the connection, which the source reports as such.
//!
//! # Capabilities
//!
//! The destination announces in its Welcome the methods (with level ranges) it decodes and
//! the optional [`Features`] it supports (`tls`, `postcopy`, `auto`: on; `tls` is informational — TLS wraps the whole connection, so a Hello that arrives at all came over the transport the destination requires — and set by both sides when their channels run over TLS). It
//! also checks the Hello itself and refuses a method, level or wanted feature it lacks; the
//! source checks the Welcome's capabilities against what it will send and fails with a clear
//! message (sending Abort) instead of a mismatch later.
//!
//! Levels are signed (zstd's fast levels, -20..=-1). Builds from before that parsed levels as
//! unsigned, so both sides say they read negative levels with `signed_levels` in their
//! features (written only when true: frames without it are byte for byte as before): a
//! destination announces a negative `min_level` only to a Hello that has it, and raises
//! negative bounds to 0 for one that has not. A source of this build offers it always; a
//! Hello with a negative `level` reaches an earlier destination as a frame it cannot parse
//! (it drops the connection), which the source reports as a closed connection.
//!
//! `auto` (per-packet method choice): a source that wants it (`Hello.wants.auto`; its
//! `method`/`level` are then not checked) may send each packet with any method the Welcome
//! announced, at any announced level — the packet's method byte says which, and levels do
//! not matter to decoders. Raw packets (uncompressed batches) carry `none`, or the first
//! announced method when `none` is not announced; so do sync packets. A packet naming a method
//! the Welcome did not announce is a protocol error. Without `auto`, every packet carries the
//! Hello's method. A destination announces every method of its build, or only M when
//! restricted (`recv --multifd-compression M`).

mod control;
mod packet;

pub use control::{
    encode_frame, read_frame, read_frame_at, read_frame_limited, write_frame, Capabilities, Control, DestinationReport, Features, Frame, Hello, MethodCaps, PostcopyStats, Role,
    SessionId, FRAME_HEADER_LEN, FRAME_MAGIC,
};
pub use packet::{
    decode_offsets, decode_packet, encode_offsets, encode_packet, packet_crc, page_runs, DecodedPacket, PacketCrc, PacketHeader, PacketKind, PageRuns,
    FLAG_RAW, PACKET_HEADER_LEN, PACKET_MAGIC,
};

use serde::{Deserialize, Serialize};

/// N: the version this build writes when it can.
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest version this build speaks (see "Versions": 1 had no negotiation).
pub const MIN_PROTOCOL_VERSION: u16 = VersionRange::SUPPORTED.min;
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
/// The unit of memory on the wire; page indexes count these.
pub const PAGE_SIZE: usize = 4096;
/// Largest batch: pages of one packet.
pub const MAX_BATCH_PAGES: usize = 128;
/// Largest batch in bytes (its pages).
pub const MAX_BATCH_BYTES: usize = MAX_BATCH_PAGES * PAGE_SIZE;

/// A compression method on the wire (packet byte 6, `Hello.method`). Which method a code
/// names is declared by the codec files and looked up in the codec registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MethodCode(pub u8);

impl std::fmt::Display for MethodCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "method code {}", self.0)
    }
}

/// Protocol versions `min..=max` a peer speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

impl VersionRange {
    /// What this build speaks.
    pub const SUPPORTED: VersionRange = VersionRange::policy(PROTOCOL_VERSION);

    /// The range a build of version `n` speaks: `n` and `n - 1`, never below 2 (the first
    /// version with negotiation).
    pub const fn policy(n: u16) -> Self {
        let min = if n > 2 { n - 1 } else { 2 };
        VersionRange { min, max: n }
    }

    /// The highest version both speak, if any.
    pub fn negotiate(self, peer: VersionRange) -> Option<u16> {
        let (lo, hi) = (self.min.max(peer.min), self.max.min(peer.max));
        (lo <= hi && peer.min <= peer.max).then_some(hi)
    }

    /// Whether `v` is in the range.
    pub fn contains(self, v: u16) -> bool {
        (self.min..=self.max).contains(&v)
    }
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "version {}", self.min)
        } else {
            write!(f, "versions {}..={}", self.min, self.max)
        }
    }
}

#[derive(Debug, thiserror::Error)]
/// Errors reading or writing the protocol.
pub enum WireError {
    #[error("connection closed by peer{0}")]
    /// The peer closed the connection (with context).
    Closed(String),
    #[error("i/o error: {0}")]
    /// A socket error (reset, timeout, ...).
    Io(std::io::Error),
    #[error("bad magic {found:#010x} (not a pageferry peer, or stream out of sync)")]
    /// A frame or packet did not start with its magic.
    BadMagic {
        /// The four bytes found instead.
        found: u32,
    },
    #[error("protocol version mismatch: peer speaks {peer}, we speak {ours}")]
    /// No protocol version both peers speak.
    Version {
        /// What the peer speaks.
        peer: VersionRange,
        /// What this build speaks.
        ours: VersionRange,
    },
    #[error("CRC32C mismatch: computed {computed:#010x}, packet says {expected:#010x}")]
    /// A frame or packet failed its CRC32C.
    Crc {
        /// CRC of the bytes received.
        computed: u32,
        /// CRC the sender wrote.
        expected: u32,
    },
    #[error("malformed {what}: {detail}")]
    /// Bytes that are not a valid message (bad length, field out of range, wrong order).
    Malformed {
        /// Which message.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        WireError::Io(e)
    }
}

impl WireError {
    /// A [`WireError::Malformed`].
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
#[cfg(test)]
mod tests_golden;
