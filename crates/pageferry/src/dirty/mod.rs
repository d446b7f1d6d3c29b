//! Dirty tracking: which guest pages were written since the previous look.
//!
//! The engine asks a [`DirtyTracker`] once per pre-copy round. The first `collect` after
//! `start` reports every page (round 0 sends all memory); each later call reports the pages
//! written since the call before. Trackers:
//! - [`StaticTracker`]: everything once, then nothing — for paused guests and image files;
//! - [`UffdTracker`]: userfaultfd asynchronous write-protect + `PAGEMAP_SCAN` for memory in this
//!   process (Linux 6.7+);
//! - `AtomicBitmapTracker` (feature `vm-memory`): pages written through rust-vmm vm-memory's
//!   accessors, from its per-region `AtomicBitmap`;
//! - [`UnionTracker`]: two trackers as one (a KVM VMM: the dirty log for vCPU writes plus the
//!   vm-memory bitmap for the VMM's own);
//! - a KVM dirty-log tracker lives with the VMM (`pageferry-vmm`), behind this same trait.
//!
//! A tracker may over-report (a page written back to the same bytes is still dirty) but never
//! under-report: a missed page would leave a stale copy on the destination.

mod bitmap;
mod static_tracker;
mod uffd;
mod union;
#[cfg(feature = "vm-memory")]
mod vm_bitmap;

pub use bitmap::{DirtyBitmap, DirtyPages};
pub use static_tracker::StaticTracker;
pub use uffd::UffdTracker;
pub use union::UnionTracker;
#[cfg(feature = "vm-memory")]
pub use vm_bitmap::AtomicBitmapTracker;

use crate::memory::GuestMemory;

/// Errors of a [`DirtyTracker`].
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// This tracker cannot work here (kernel feature missing, memory it cannot track).
    #[error("dirty tracking is not available: {0}")]
    Unsupported(String),
    /// An operating-system call failed.
    #[error("{op} failed: {cause}")]
    Os {
        /// The call ("UFFDIO_REGISTER", "KVM_GET_DIRTY_LOG", ...).
        op: &'static str,
        /// The OS error.
        cause: std::io::Error,
    },
    /// `collect` before `start`.
    #[error("tracker used before start()")]
    NotStarted,
    /// Anything else, explained.
    #[error("{0}")]
    Other(String),
}

/// "Give me the pages written since the last call", per region.
pub trait DirtyTracker: Send {
    /// Begin tracking `memory`. Must be called before the guest's writes that should count.
    fn start(&mut self, memory: &GuestMemory) -> Result<(), DirtyError>;
    /// Add to `into` every page written since the previous call (all pages on the first call).
    fn collect(&mut self, into: &mut DirtyPages) -> Result<(), DirtyError>;
    /// Whether the memory may change while the engine reads it (false for a paused guest or an
    /// image file). The source copies pages into stable buffers before checksumming them when
    /// this is true.
    fn guest_may_write(&self) -> bool;
    /// Stop tracking and release kernel resources. Called once at the end; idempotent.
    fn stop(&mut self) {}
    /// Short name for reports ("static", "uffd-wp", "kvm-dirty-log").
    fn name(&self) -> &'static str;
}

#[cfg(test)]
mod tests;
#[cfg(all(test, feature = "vm-memory"))]
mod tests_vm;

/// A shared conformance suite every tracker must pass, public so that trackers living in other
/// crates (the KVM dirty log) run the same checks.
pub mod conformance {
    use super::*;

    /// `write_page(region, page)` must make the tracked writer write one page (the host for
    /// trackers of this process, the guest for a KVM slot). `exact`: the tracker reports no
    /// page that was not written.
    pub fn run_suite(
        memory: &GuestMemory,
        tracker: &mut dyn DirtyTracker,
        write_page: &mut dyn FnMut(usize, u64),
        exact: bool,
    ) {
        tracker.start(memory).expect("start");
        let mut all = DirtyPages::for_memory(memory);
        tracker.collect(&mut all).expect("first collect");
        assert_eq!(all.count(), memory.total_pages(), "first collect must report every page");

        // Nothing written: an exact tracker reports nothing.
        let mut none = DirtyPages::for_memory(memory);
        tracker.collect(&mut none).expect("collect");
        if exact {
            assert_eq!(none.count(), 0, "no writes, yet pages reported");
        }

        if !tracker.guest_may_write() {
            // A tracker for memory nobody writes reports everything once, then nothing.
            write_page(0, 0);
            let mut after = DirtyPages::for_memory(memory);
            tracker.collect(&mut after).expect("collect");
            assert_eq!(after.count(), 0, "a static tracker reported pages after the first round");
            tracker.stop();
            return;
        }

        // Write a pattern of pages in every region; each must be reported.
        let mut written = DirtyPages::for_memory(memory);
        for (rid, r) in memory.regions().iter().enumerate() {
            let pages = r.pages();
            for p in [0, 1, pages / 2, pages - 1] {
                write_page(rid, p);
                written.region_mut(rid).set(p);
            }
        }
        let mut got = DirtyPages::for_memory(memory);
        tracker.collect(&mut got).expect("collect");
        for (rid, _) in memory.regions().iter().enumerate() {
            for p in written.region(rid).iter_set() {
                assert!(got.region(rid).get(p), "region {rid} page {p} written but not reported");
            }
            if exact {
                assert_eq!(got.region(rid).count(), written.region(rid).count(), "region {rid}: extra pages reported");
            }
        }

        // Collect resets: the same writes are not reported twice.
        let mut again = DirtyPages::for_memory(memory);
        tracker.collect(&mut again).expect("collect");
        if exact {
            assert_eq!(again.count(), 0, "pages reported twice");
        }

        // A page written twice between collects is reported (once).
        write_page(0, 2.min(memory.regions()[0].pages() - 1));
        write_page(0, 2.min(memory.regions()[0].pages() - 1));
        let mut twice = DirtyPages::for_memory(memory);
        tracker.collect(&mut twice).expect("collect");
        assert!(twice.region(0).get(2.min(memory.regions()[0].pages() - 1)));
        tracker.stop();
        tracker.stop();
    }
}
