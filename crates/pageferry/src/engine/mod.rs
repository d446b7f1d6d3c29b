//! The migration engine: pre-copy rounds over a control channel and N data channels.
//!
//! Source side ([`run_source`]): round 0 sends every page, each later round the pages the
//! [`DirtyTracker`](crate::dirty::DirtyTracker) reports, until the rest fits the downtime budget; then it pauses the
//! [`SourceWorkload`], sends the last dirty set and the workload's device state, and the
//! destination resumes its [`DestinationWorkload`]. Destination side ([`run_destination`]):
//! accepts the channels, writes pages straight into its [`GuestMemory`](crate::memory::GuestMemory), enforces the
//! per-round ordering rule, verifies and resumes.
//!
//! Threads per side: one control thread (the caller's); per channel one socket thread and
//! `pipeline_depth` compression (or decompression) stages on the source (destination: one
//! reader that decompresses in place). See `source.rs` and `destination.rs`.

mod auto;
mod cancel;
mod channel;
mod converge;
mod postcopy;
mod destination;
mod link;
pub mod policy;
pub mod ratelimit;
mod source;
#[cfg(test)]
pub(crate) use source::auto_candidates;
pub mod stats;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod fault_proxy;
#[cfg(test)]
mod tests_faults;
#[cfg(test)]
mod tests_hostile;
#[cfg(test)]
mod tests_tls;

pub use cancel::{CancelToken, Side};
pub use destination::{run_destination, run_destination_with, ProvideMemory};
#[doc(hidden)]
pub use destination::replay::replay_destination;
pub use source::run_source;
pub use postcopy::PostcopyStats;
pub use stats::{DestinationReport, Event, EventSink, MigrationReport, MigrationStatus, NoProgress, Progress, ProgressSink, RoundStats};

use crate::codec::{CodecError, CodecSpec};
use crate::dirty::DirtyError;
use crate::wire::WireError;
use std::time::Duration;

/// Errors a workload hook may return (a VMM's own error type, boxed).
pub type WorkloadError = Box<dyn std::error::Error + Send + Sync>;

/// What runs on the source and must stop for the switchover.
pub trait SourceWorkload: Send {
    /// Stop the guest (vCPUs, device emulation) and return its device state, which the
    /// destination receives in [`DestinationWorkload::resume`]. Called at most once.
    fn pause(&mut self) -> Result<Vec<u8>, WorkloadError>;
    /// The migration failed after `pause`: keep running here.
    fn resume_after_failure(&mut self) -> Result<(), WorkloadError>;
    /// Run at `100 - pct` percent of full speed from now on (auto-converge; 0 = full speed).
    /// Returns `Ok(false)` when this workload cannot be throttled (the default); the engine
    /// then says so in its report and error instead of pretending to throttle.
    fn set_throttle(&mut self, pct: u8) -> Result<bool, WorkloadError> {
        let _ = pct;
        Ok(false)
    }
}

/// What the destination starts once all memory has arrived.
pub trait DestinationWorkload: Send {
    /// Restore `device_state` (from the source's `pause`) and start running.
    fn resume(&mut self, device_state: &[u8]) -> Result<(), WorkloadError>;
}

/// A workload with nothing to pause (image files): state is empty.
#[derive(Default)]
pub struct NoWorkload;

impl SourceWorkload for NoWorkload {
    fn pause(&mut self) -> Result<Vec<u8>, WorkloadError> {
        Ok(Vec::new())
    }
    fn resume_after_failure(&mut self) -> Result<(), WorkloadError> {
        Ok(())
    }
}

impl DestinationWorkload for NoWorkload {
    fn resume(&mut self, _device_state: &[u8]) -> Result<(), WorkloadError> {
        Ok(())
    }
}

/// Default of `--stall-timeout`.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Source settings (CLI names in brackets).
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Data channels \[`--multifd-channels`, default 2\].
    pub channels: usize,
    /// Method and level \[`--multifd-compression`, `--multifd-<method>-level`\]; with `auto`
    /// set, only its local options count (the qatzip provider and library).
    pub codec: CodecSpec,
    /// \[`--multifd-compression auto`\]: choose the method and level per window among these
    /// candidates and what the destination decodes (see [`policy`]).
    pub auto: Option<policy::AutoConfig>,
    /// Batches in flight to the compressor per channel \[`--pipeline-depth`\]; `None` picks the
    /// codec's default.
    pub pipeline_depth: Option<usize>,
    /// Switch over when the remaining dirty pages fit this at the measured rate
    /// \[`--downtime-limit`, ms, default 300\].
    pub downtime_limit: Duration,
    /// Give up (source untouched) after this many rounds \[`--max-rounds`, default 30\].
    pub max_rounds: u32,
    /// Give up (source untouched) after this long \[`--timeout`, default 600 s\].
    pub timeout: Duration,
    /// Cap on wire bytes per second across all channels \[`--max-bandwidth`\].
    pub max_bandwidth: Option<u64>,
    /// A limiter to use instead of one made from `max_bandwidth`: its cap can be changed
    /// while the migration runs ([`ratelimit::RateLimiter::set_rate`]).
    pub limiter: Option<std::sync::Arc<ratelimit::RateLimiter>>,
    /// Compare a digest of all memory at the end (both sides hash their memory).
    pub verify: bool,
    /// Keep retrying a refused connection this long (the destination may still be starting).
    pub connect_timeout: Duration,
    /// A channel (data or control) on which nothing moves for this long has failed
    /// \[`--stall-timeout`, default 30 s\]. Each channel counts on its own: data flowing on
    /// another does not excuse a silent one. Both sides send keepalives on the control channel
    /// at a quarter of it.
    pub stall_timeout: Duration,
    /// Ends the migration from outside (see [`CancelToken`]).
    pub cancel: CancelToken,
    /// Throttle the workload when pre-copy does not converge \[`--auto-converge`\]; `None`
    /// leaves it at full speed.
    pub auto_converge: Option<AutoConverge>,
    /// May switch to postcopy \[`--postcopy`\]; `None`: pre-copy only.
    pub postcopy: Option<PostcopyConfig>,
    /// Compress (static) guest memory in place and write raw pages from it; `false` copies
    /// every batch first — only useful to measure what zero copy saves.
    pub zero_copy: bool,
    /// TLS 1.3 on every channel \[`--tls-creds`, `--tls-psk`\]; `None`: plain TCP.
    pub tls: Option<crate::transport::TlsClient>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            channels: 2,
            codec: CodecSpec::default(),
            auto: None,
            pipeline_depth: None,
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            timeout: Duration::from_secs(600),
            max_bandwidth: None,
            limiter: None,
            verify: true,
            connect_timeout: Duration::from_secs(10),
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            cancel: CancelToken::default(),
            auto_converge: None,
            postcopy: None,
            zero_copy: true,
            tls: None,
        }
    }
}

/// Auto-converge settings, QEMU's names and defaults: after a round in which the guest dirtied
/// more than `trigger_threshold` percent of the bytes the link moved, for the second time, the
/// throttle starts at `initial` percent, then rises by `increment` each further second time,
/// up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoConverge {
    /// \[`--cpu-throttle-initial`, default 20\]
    pub initial: u8,
    /// \[`--cpu-throttle-increment`, default 10\]
    pub increment: u8,
    /// \[`--max-cpu-throttle`, default 99\]
    pub max: u8,
    /// \[`--throttle-trigger-threshold`, default 50\]
    pub trigger_threshold: u8,
}

impl Default for AutoConverge {
    fn default() -> Self {
        Self { initial: 20, increment: 10, max: 99, trigger_threshold: 50 }
    }
}

impl AutoConverge {
    /// Check the ranges QEMU accepts (1..=99 for the percentages, 1..=100 for the threshold).
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [("--cpu-throttle-initial", self.initial), ("--cpu-throttle-increment", self.increment), ("--max-cpu-throttle", self.max)] {
            if !(1..=99).contains(&v) {
                return Err(format!("{name} must be 1..=99, got {v}"));
            }
        }
        if !(1..=100).contains(&self.trigger_threshold) {
            return Err(format!("--throttle-trigger-threshold must be 1..=100, got {}", self.trigger_threshold));
        }
        if self.initial > self.max {
            return Err(format!("--cpu-throttle-initial ({}) exceeds --max-cpu-throttle ({})", self.initial, self.max));
        }
        Ok(())
    }
}

/// Postcopy settings (QEMU: capability postcopy-ram, then migrate-start-postcopy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostcopyConfig {
    /// Switch after this many pre-copy rounds \[`--postcopy-after-rounds`\]; without it the
    /// engine switches only when pre-copy is not converging (see `source.rs`).
    pub after_rounds: Option<u32>,
}

/// Destination settings.
#[derive(Clone)]
pub struct DestinationConfig {
    /// Options for opening decoders (the qatzip provider and library). Its method is the only
    /// one accepted when `only` is set; otherwise the method and level are not used.
    pub codec: CodecSpec,
    /// Accept only `codec.method` [`recv --multifd-compression M`]. Off (the default): the
    /// destination announces and decodes every method of this build, per packet, so a source
    /// may use any of them or choose per batch (`auto`).
    pub only: bool,
    /// How long to wait for the source to connect all channels. Peers refused meanwhile (TLS,
    /// or a control Hello this destination refuses) do not end the wait; when it passes with
    /// nobody accepted, the destination fails with [`MigrationError::Refused`] naming the last
    /// refusal (or a timeout when nobody was refused).
    pub accept_timeout: Duration,
    /// Bound on the whole migration, counted from the accepted control handshake
    /// \[`recv --timeout`\]: when it passes, the destination aborts (the source is told why,
    /// in an Abort naming this timeout) and fails with [`MigrationError::TimedOut`]
    /// ([`MigrationError::Postcopy`] after a switch to postcopy). `None` (the default): only
    /// the stall timeout and the source's own `--timeout` bound it.
    pub timeout: Option<Duration>,
    /// A channel (data or control) silent for this long has failed [`--stall-timeout`,
    /// default 30 s]; see [`SourceConfig::stall_timeout`].
    pub stall_timeout: Duration,
    /// Ends the migration from outside (see [`CancelToken`]).
    pub cancel: CancelToken,
    /// Decompress and read raw pages straight into guest memory; `false` goes through a
    /// bounce buffer — only useful to measure what zero copy saves.
    pub zero_copy: bool,
    /// Refuse a source that announces it will not send the end-to-end digest (its
    /// `--no-verify`), and fail a `Finish` without one [`--no-verify` on the destination
    /// turns this off: both sides must agree to skip verification].
    pub require_verify: bool,
    /// Refuse a source announcing more memory than this (bytes, all regions), before anything
    /// is allocated. `None`: only the protocol's limits (and whatever the provider checks).
    pub max_memory: Option<u64>,
    /// Where notes (dropped stray connections, codec fallbacks) go; discarded by default.
    pub events: EventSink,
    /// The workload touches guest memory from the kernel (a KVM vCPU): postcopy then needs a
    /// userfaultfd that handles kernel-mode faults too (root, CAP_SYS_PTRACE or
    /// `vm.unprivileged_userfaultfd=1`), and a source asking for postcopy is refused where
    /// there is none, instead of the guest failing on its first missing page.
    pub postcopy_kernel_faults: bool,
    /// TLS 1.3 on every channel: the source must complete a handshake with this configuration
    /// (and, when it verifies clients, present an accepted certificate) before it is heard.
    /// `None`: plain TCP.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// A connection must complete its TLS handshake and send its pageferry handshake within
    /// this time, or it is dropped (the destination keeps listening).
    pub handshake_timeout: Duration,
    /// At most this many connections may be in their handshake at once (so unauthenticated
    /// peers cannot exhaust threads or memory); a new connection at the cap ends the oldest
    /// pending handshake, so idle or dripping peers that came first cannot keep the right
    /// source waiting for their deadline.
    pub max_pending_handshakes: usize,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        Self {
            codec: CodecSpec::default(),
            only: false,
            accept_timeout: Duration::from_secs(60),
            timeout: None,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            cancel: CancelToken::default(),
            zero_copy: true,
            require_verify: true,
            max_memory: None,
            events: EventSink::default(),
            postcopy_kernel_faults: false,
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 16,
        }
    }
}

/// Why a migration ended without success. The source's memory is never modified, and a
/// source whose workload was paused has been resumed when this is returned — except
/// [`MigrationError::OutcomeUnknown`], after the commit point, where it stays paused.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The destination could not be reached within `connect_timeout`.
    #[error("cannot connect to {addr}: {cause}")]
    Connect {
        /// The address tried.
        addr: String,
        /// The last connection error.
        cause: std::io::Error,
    },
    /// Source: the destination refused the session in the handshake (method, version, size,
    /// policy) and said why. Destination: no source was accepted within the accept timeout,
    /// and at least one was refused (the count, and the last one and why).
    #[error("handshake refused: {0}")]
    Refused(String),
    /// The peer ended the migration and said why.
    #[error("peer aborted the migration: {0}")]
    PeerAborted(String),
    /// Reading or writing a channel failed: the connection, or bytes that break the protocol.
    #[error("protocol error on {channel}: {cause}")]
    Wire {
        /// Which channel ("control channel", "channel 2", ...).
        channel: String,
        /// What happened.
        cause: WireError,
    },
    /// A codec failed (setup, or a payload that does not decompress).
    #[error("{channel}: {cause}")]
    Codec {
        /// Which channel (or "setup").
        channel: String,
        /// What happened.
        cause: CodecError,
    },
    /// The dirty tracker failed.
    #[error("dirty tracking: {0}")]
    Dirty(DirtyError),
    /// Pre-copy did not fit the downtime limit within the rounds allowed; the source keeps
    /// running.
    #[error("migration did not converge: {0}")]
    NotConverged(String),
    /// Failure after the switchover to postcopy: the source is stopped for good and the
    /// destination holds part of the memory; both keep their state.
    #[error("postcopy failed after the switchover (source stopped, destination incomplete; both keep their state): {0}")]
    Postcopy(String),
    /// A workload hook failed.
    #[error("workload {what} failed: {cause}")]
    Workload {
        /// Which hook ("pause", "resume", ...).
        what: &'static str,
        /// The workload's error.
        cause: WorkloadError,
    },
    /// The memory digests differ: the destination's memory is not the source's.
    #[error("verification failed: source memory digest {source_digest:032x}, destination {dest_digest:032x}")]
    Verify {
        /// xxh3-128 of the source's memory.
        source_digest: u128,
        /// xxh3-128 of the destination's.
        dest_digest: u128,
    },
    /// The source sent its final state (the commit point) but did not learn whether the
    /// destination accepted it. The source's workload stays paused: resuming it could make
    /// two running copies. Whoever drives the migration must ask the destination.
    #[error("outcome unknown: the destination may be running; do not resume here ({0})")]
    OutcomeUnknown(String),
    /// A channel went silent for the stall timeout (the message names the channel, the
    /// direction and the time).
    #[error("{0}")]
    Stalled(String),
    /// `--timeout` ran out, the source's or the destination's (the message names which, and the
    /// phase).
    #[error("{0}")]
    TimedOut(String),
    /// Cancelled by [`CancelToken::cancel`] on this side, or by the peer's.
    #[error("cancelled by the {by}")]
    Cancelled {
        /// The side whose cancel ended it.
        by: Side,
    },
    /// Invalid settings.
    #[error("{0}")]
    Config(String),
    /// Anything else, explained.
    #[error("{0}")]
    Other(String),
}

impl From<DirtyError> for MigrationError {
    fn from(e: DirtyError) -> Self {
        MigrationError::Dirty(e)
    }
}

// The engine maps wire page indexes to memory pages one to one.
const _: () = assert!(crate::memory::PAGE_SIZE == crate::wire::PAGE_SIZE);
