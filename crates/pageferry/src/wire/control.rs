//! Handshake and control messages: typed structs, JSON bodies in CRC-checked frames (layout
//! and rules in the module doc of [`crate::wire`]).

use super::{read_exact, MethodCode, VersionRange, WireError, MAX_FRAME_BODY, MIN_PROTOCOL_VERSION};

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Magic of a control frame ("PFCT").
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"PFCT");
/// Bytes of a control frame header.
pub const FRAME_HEADER_LEN: usize = 14;

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
    /// A fresh random id.
    pub fn random() -> Self {
        SessionId(rand::random())
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Which connection of a session a Hello opens. On the wire (JSON): `"control"`, `"data"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The control channel (`"control"`).
    Control,
    /// A data channel (`"data"`).
    Data,
    /// Postcopy's urgent channel (`"urgent"`): pages the destination faulted on, ahead of the
    /// background push. Only with the postcopy feature.
    Urgent,
}

/// Optional features. In a Hello: what the source will use; in a Welcome: what the
/// destination supports. `tls` is set when channels run over TLS (see the module doc); the
/// others are reserved, switched on by the features that need them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    /// Channels run over TLS.
    #[serde(default)]
    pub tls: bool,
    /// Post-copy: the destination may run before all pages arrived and request pages.
    #[serde(default)]
    pub postcopy: bool,
    /// Per-packet method choice among the destination's methods.
    #[serde(default)]
    pub auto: bool,
    /// Levels may be negative (zstd's fast levels). In a Hello: the source reads a negative
    /// `min_level`; a destination announces negative levels only to such a source (an earlier
    /// build parsed levels as unsigned). In a Welcome: the destination accepts negative levels.
    /// Not a requirement: [`Features::missing`] never names it. Sent only when true, so frames
    /// of sources and destinations without it are unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub signed_levels: bool,
}

impl Features {
    /// Names of the features in `wants` that `self` lacks.
    pub fn missing(&self, wants: &Features) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (name, want, have) in [("tls", wants.tls, self.tls), ("postcopy", wants.postcopy, self.postcopy), ("auto", wants.auto, self.auto)] {
            if want && !have {
                v.push(name);
            }
        }
        v
    }
}

/// A method the destination decodes, with the levels it accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodCaps {
    /// The method's wire code.
    pub code: MethodCode,
    /// For messages only; the code is what counts.
    pub name: String,
    /// Lowest level it accepts (signed: zstd's fast levels are negative).
    pub min_level: i32,
    /// Highest level it accepts.
    pub max_level: i32,
}

/// What a destination can do, announced in its Welcome.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Methods it decodes.
    pub methods: Vec<MethodCaps>,
    #[serde(default)]
    /// Optional features it supports.
    pub features: Features,
}

impl Capabilities {
    /// What a peer that parses levels as unsigned (a Hello without
    /// [`Features::signed_levels`]) can read: negative bounds raised to 0, and
    /// `signed_levels` off.
    pub fn for_unsigned_peer(mut self) -> Self {
        for m in &mut self.methods {
            m.min_level = m.min_level.max(0);
            m.max_level = m.max_level.max(0);
        }
        self.features.signed_levels = false;
        self
    }
    /// Can a source send `method` (called `name`) at `level` using `wants`? Err is the message.
    pub fn check(&self, method: MethodCode, name: &str, level: i32, wants: &Features) -> Result<(), String> {
        let list = || self.methods.iter().map(|m| format!("{} {}..={}", m.name, m.min_level, m.max_level)).collect::<Vec<_>>().join(", ");
        match self.methods.iter().find(|m| m.code == method) {
            None => return Err(format!("the destination does not decode {name} (it decodes: {})", list())),
            Some(m) if !(m.min_level..=m.max_level).contains(&level) => {
                return Err(format!("the destination does not accept {name} level {level} (it decodes: {})", list()))
            }
            Some(_) => {}
        }
        let missing = self.features.missing(wants);
        if !missing.is_empty() {
            return Err(format!("the destination does not support {}", missing.join(", ")));
        }
        Ok(())
    }
}

/// First message on every connection, source → destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol versions the source speaks.
    pub versions: VersionRange,
    /// The migration this connection belongs to.
    pub session: SessionId,
    /// Which connection this is.
    pub role: Role,
    /// Data channel index (0 for control).
    pub channel: u16,
    /// Number of data channels that will follow.
    pub channels: u16,
    /// Compression method of the session.
    pub method: MethodCode,
    /// Its level (signed: zstd's fast levels are negative).
    pub level: i32,
    /// Region table (name, bytes), in region-id order.
    pub regions: Vec<(String, u64)>,
    /// Features the source will use.
    #[serde(default)]
    pub wants: Features,
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

/// The destination's side of the final report (inside `Control::Done`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DestinationReport {
    /// Destination process CPU time, seconds.
    pub cpu_s: f64,
    /// Destination wall time, seconds.
    pub wall_s: f64,
    /// Pages received (zero pages included).
    pub pages: u64,
    /// Zero pages received.
    pub zero_pages: u64,
    /// Bytes received on the data channels.
    pub wire_bytes: u64,
    /// Time spent hashing memory for verification, ms.
    pub verify_ms: f64,
    /// The digests were compared and matched.
    pub verified: bool,
    /// Rounds received.
    pub rounds: u32,
    /// Who decompressed ("libdeflate", "qat (software path)", ...).
    pub provider: String,
    /// Peak anonymous memory of the destination process seen during the migration (guest
    /// memory that is anonymous counts here too).
    #[serde(default)]
    pub peak_rss_anon_bytes: u64,
    /// The destination resumed (the commit point was passed) but could not deliver `Done` to
    /// the source: the source then reports the outcome as unknown and stays paused, so the
    /// operator must tell it (the destination is the one running).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub done_not_delivered: bool,
    /// Postcopy's counters and fault latencies, when the migration ended in postcopy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyStats>,
}

/// The destination's postcopy counters (inside `DestinationReport`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PostcopyStats {
    /// `Postcopy` received to every discarded page placed, milliseconds.
    pub duration_ms: f64,
    /// Pages discarded at switchover (still dirty on the source), each placed once since.
    pub discarded_pages: u64,
    /// Faults read by the fault thread (several threads may fault on one page).
    pub faults: u64,
    /// Pages asked of the source over the return path.
    pub pages_requested: u64,
    /// Pages that arrived when the page was already there (sent by both paths).
    pub duplicate_pages: u64,
    /// Fault read to page placed, microseconds.
    pub fault_latency_p50_us: f64,
    /// 99th percentile of the same, microseconds.
    pub fault_latency_p99_us: f64,
    /// Worst of the same, microseconds.
    pub fault_latency_max_us: f64,
}

/// Every control message (handshake included). On the wire: a JSON object whose `"type"` is
/// the snake_case variant name (`hello`, `welcome`, `refuse`, `round_done`, `finish`,
/// `done`, `abort`), the fields beside it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// First message on every connection (source).
    Hello(Hello),
    /// Handshake accepted, at protocol `version` (the highest both speak).
    Welcome {
        /// The protocol version both speak from here on.
        version: u16,
        /// The destination's memory is freshly zeroed (zero pages need not be written).
        fresh_destination: bool,
        /// What the destination decodes and supports.
        capabilities: Capabilities,
    },
    /// Handshake refused; both sides print `reason`. Same shape in every version.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Destination: every channel has delivered round `round`.
    RoundDone {
        /// The round.
        round: u32,
        /// Pages received in it.
        pages: u64,
    },
    /// Source: the last round is `round`; the workload's device state is the frame's blob.
    Finish {
        /// The last round.
        round: u32,
        /// The source memory's xxh3-128 (hex) when verifying.
        digest: Option<String>,
    },
    /// Source, instead of `Finish` (postcopy feature): the guest is paused for good; rounds up
    /// to `round - 1` are complete; `discard` (region, first page, pages) were dirtied since
    /// and come as round `round`, on request or in the background. Blob: the device state.
    Postcopy {
        /// The round the remaining pages come as.
        round: u32,
        /// Runs of still-dirty pages: (region, first page, pages).
        discard: Vec<(u16, u32, u32)>,
    },
    /// Destination: postcopy registered, discarded pages dropped, workload running.
    PostcopyRunning,
    /// Destination (the return path): the running workload waits for these pages of
    /// `region`, in fault order.
    PageRequest {
        /// The region.
        region: u16,
        /// Its pages, in fault order.
        pages: Vec<u32>,
    },
    /// Destination: memory verified, workload resumed.
    Done {
        /// The destination's side of the report.
        report: DestinationReport,
    },
    /// Either side: the migration is over, with this reason.
    Abort {
        /// Why.
        reason: String,
    },
    /// Either side: the migration was cancelled there (an operator's ^C, a management call).
    Cancel {
        /// "source" or "destination".
        by: String,
    },
    /// Either side, on the control channel when it has had nothing else to send for a quarter
    /// of the stall timeout: proof that the peer and the link are alive.
    Keepalive,
}

/// One control frame as read.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// The protocol version its body is encoded in (header bytes 4..6).
    pub version: u16,
    /// The message.
    pub msg: Control,
    /// Binary attachment (the device state of `Finish`/`Postcopy`; else empty).
    pub blob: Vec<u8>,
}

fn crc(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p))
}

/// One frame as bytes: magic, version, body length, blob length, JSON body, blob, CRC32C.
pub fn encode_frame(version: u16, msg: &Control, blob: &[u8]) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("control messages serialize");
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    hdr[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    hdr[4..6].copy_from_slice(&version.to_le_bytes());
    hdr[6..10].copy_from_slice(&(body.len() as u32).to_le_bytes());
    hdr[10..14].copy_from_slice(&(blob.len() as u32).to_le_bytes());
    let sum = crc(&[&hdr, &body, blob]);
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len() + blob.len() + 4);
    out.extend_from_slice(&hdr);
    out.extend_from_slice(&body);
    out.extend_from_slice(blob);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Write one frame encoded in protocol `version` (see [`encode_frame`]).
pub fn write_frame(w: &mut impl Write, version: u16, msg: &Control, blob: &[u8]) -> Result<(), WireError> {
    w.write_all(&encode_frame(version, msg, blob))?;
    w.flush()?;
    Ok(())
}

/// Read one frame; checks magic, sizes and CRC, then the version (a frame older than
/// [`MIN_PROTOCOL_VERSION`] is `WireError::Version`, its body unread: older versions may
/// encode it differently), then parses the body.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, WireError> {
    read_frame_limited(r, MAX_FRAME_BODY)
}

/// [`read_frame`] with a smaller cap on the body and the blob: what a handshake reads from a
/// peer not yet known, so an unauthenticated connection costs at most `max` bytes of memory.
pub fn read_frame_limited(r: &mut impl Read, max: usize) -> Result<Frame, WireError> {
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
    if version < MIN_PROTOCOL_VERSION {
        return Err(WireError::Version { peer: VersionRange { min: version, max: version }, ours: VersionRange::SUPPORTED });
    }
    let msg: Control = serde_json::from_slice(&payload[..body_len]).map_err(|e| WireError::malformed("control message", e.to_string()))?;
    Ok(Frame { version, msg, blob: payload[body_len..].to_vec() })
}

/// Read one frame of a session running at protocol `version`; a frame of another version is
/// malformed.
pub fn read_frame_at(r: &mut impl Read, version: u16) -> Result<(Control, Vec<u8>), WireError> {
    let f = read_frame(r)?;
    if f.version != version {
        return Err(WireError::malformed("control frame", format!("of protocol version {} in a version {version} session", f.version)));
    }
    Ok((f.msg, f.blob))
}
