//! Timestamps that mean something across threads and processes, for downtime measurement.
//!
//! `Instant` is enough inside one process; a migration's downtime runs from the source process
//! pausing to the destination process running, so each stamp also records CLOCK_MONOTONIC
//! (comparable between processes of one boot) and CLOCK_REALTIME (comparable between hosts as
//! far as their clocks agree).

use std::time::{Duration, Instant};

/// One moment, read from three clocks.
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    pub instant: Instant,
    /// CLOCK_MONOTONIC in ns.
    pub monotonic_ns: u64,
    /// CLOCK_REALTIME in ns since the epoch.
    pub realtime_ns: u64,
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Stamp {
    pub fn now() -> Self {
        Self { instant: Instant::now(), monotonic_ns: clock_ns(libc::CLOCK_MONOTONIC), realtime_ns: clock_ns(libc::CLOCK_REALTIME) }
    }
}

/// This host's boot id (from /proc/sys/kernel/random/boot_id), or zeros if unreadable.
pub fn boot_id() -> [u8; 16] {
    static ID: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *ID.get_or_init(read_boot_id)
}

fn read_boot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        if hex.len() == 32 {
            for (i, pair) in hex.chunks(2).enumerate() {
                id[i] = u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap();
            }
        }
    }
    id
}

/// How a downtime was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DowntimeClock {
    /// Both ends on one boot of one host: CLOCK_MONOTONIC, exact.
    Monotonic,
    /// Different hosts (or unknown boot id): CLOCK_REALTIME, as good as the clocks' agreement.
    Realtime,
}

/// Time from `paused` (source) to `running` (destination).
pub(crate) fn downtime(paused_mono: u64, paused_real: u64, paused_boot: [u8; 16], running: &Stamp) -> (Duration, DowntimeClock) {
    let same_boot = paused_boot != [0; 16] && paused_boot == boot_id();
    if same_boot {
        (Duration::from_nanos(running.monotonic_ns.saturating_sub(paused_mono)), DowntimeClock::Monotonic)
    } else {
        (Duration::from_nanos(running.realtime_ns.saturating_sub(paused_real)), DowntimeClock::Realtime)
    }
}
