//! Exit status per failure class, for orchestrators (libvirt/KubeVirt style): one function maps
//! the engine's errors. README "Exit codes" documents the table.

use pageferry::engine::MigrationError;
use pageferry::wire::WireError;

// 0: success. 2: bad command line (clap's status).

/// Any other failure: bad local input or setup (image file, flags the engine rejects), the
/// workload or dirty tracking failed, the peer aborted for its own reasons. The source keeps
/// running.
pub const FAILURE: i32 = 1;
/// The source sent its final state but does not know whether the destination took over: the
/// source stays paused; ask the destination before resuming anything.
pub const OUTCOME_UNKNOWN: i32 = 3;
/// Cancelled, here (SIGINT/SIGTERM) or by the peer. The source keeps running.
pub const CANCELLED: i32 = 4;
/// The peer refused the migration in the handshake (method, version, size, room, verification
/// policy). Nothing was sent; the source keeps running.
pub const REFUSED: i32 = 5;
/// Network: cannot connect, connection lost or reset, a channel stalled or timed out. The source
/// keeps running.
pub const NETWORK: i32 = 6;
/// Protocol or data corruption: malformed frames, bad magic, CRC mismatch, a payload that does
/// not decompress, memory digests that differ. The source keeps running.
pub const PROTOCOL: i32 = 7;
/// Pre-copy did not converge within --max-rounds / --timeout. The source keeps running.
pub const NOT_CONVERGED: i32 = 8;
/// Post-copy failed after the switchover: the source is stopped for good and the destination
/// holds part of the memory; neither runs the guest, both keep their state.
pub const POSTCOPY_FAILED: i32 = 9;

/// The exit status for `e`: the class of the first [`MigrationError`] in its chain, else
/// [`FAILURE`].
pub fn code(e: &anyhow::Error) -> i32 {
    match e.chain().find_map(|c| c.downcast_ref::<MigrationError>()) {
        Some(m) => class(m),
        None => FAILURE,
    }
}

/// The one mapping from the engine's error variants to exit statuses.
pub fn class(e: &MigrationError) -> i32 {
    use MigrationError as M;
    match e {
        M::OutcomeUnknown(_) => OUTCOME_UNKNOWN,
        M::Cancelled { .. } => CANCELLED,
        M::Stalled(_) => NETWORK,
        M::TimedOut(_) => NOT_CONVERGED,
        M::Refused(_) | M::Wire { cause: WireError::Version { .. }, .. } => REFUSED,
        M::Connect { .. } | M::Wire { cause: WireError::Closed(_) | WireError::Io(_), .. } => NETWORK,
        M::Wire { cause: WireError::BadMagic { .. } | WireError::Crc { .. } | WireError::Malformed { .. }, .. } => PROTOCOL,
        M::Codec { cause: pageferry::codec::CodecError::Decompress { .. }, .. } | M::Verify { .. } => PROTOCOL,
        M::NotConverged(_) => NOT_CONVERGED,
        M::Postcopy(_) => POSTCOPY_FAILED,
        M::Codec { .. } | M::Dirty(_) | M::Workload { .. } | M::PeerAborted(_) | M::Config(_) | M::Other(_) => FAILURE,
    }
}
