//! [`AtomicBitmapTracker`]: pages written through vm-memory's accessors (feature `vm-memory`).
//!
//! A VMM built on rust-vmm writes guest memory itself — device emulation, virtio queues, DMA —
//! through `GuestMemoryMmap` accessors, which mark vm-memory's per-region [`AtomicBitmap`]. KVM's
//! dirty log never sees those writes (it logs vCPU writes only), so a VMM that migrates a
//! running guest needs both: this tracker for its own writes, the KVM log for the guest's,
//! combined with [`super::UnionTracker`] and harvested together each round (Cloud Hypervisor
//! ORs the same two bitmaps per region). `collect` takes each region's bitmap with
//! `get_and_reset`, which clears every word atomically as it reads it, so a write racing the
//! harvest lands either in this round or in the next, never in neither.

use std::sync::Arc;

use ::vm_memory::bitmap::AtomicBitmap;
use ::vm_memory::{GuestMemoryBackend, GuestMemoryMmap, MmapRegion};

use super::{DirtyError, DirtyPages, DirtyTracker};
use crate::memory::{GuestMemory, PAGE_SIZE};

/// Dirty tracking over the [`AtomicBitmap`]s of a `GuestMemoryMmap<AtomicBitmap>`. Track the
/// [`GuestMemory`] made by [`GuestMemory::from_vm_memory`] of the same memory.
pub struct AtomicBitmapTracker {
    regions: Vec<Arc<MmapRegion<AtomicBitmap>>>,
    started: bool,
    first: bool,
}

impl AtomicBitmapTracker {
    /// A tracker for every region of `memory` (not started).
    pub fn new(memory: &GuestMemoryMmap<AtomicBitmap>) -> Self {
        Self { regions: memory.iter().map(|r| r.get_mmap()).collect(), started: false, first: false }
    }

    fn mismatch(what: String) -> DirtyError {
        DirtyError::Other(format!("AtomicBitmapTracker: {what}"))
    }
}

impl DirtyTracker for AtomicBitmapTracker {
    fn start(&mut self, memory: &GuestMemory) -> Result<(), DirtyError> {
        if memory.regions().len() != self.regions.len() {
            return Err(Self::mismatch(format!(
                "guest memory has {} regions, the vm-memory memory {}",
                memory.regions().len(),
                self.regions.len()
            )));
        }
        for (r, m) in memory.regions().iter().zip(&self.regions) {
            if r.host_ptr() != m.as_ptr() || r.len() != m.size() as u64 {
                return Err(Self::mismatch(format!("region '{}' is not this vm-memory memory's", r.name())));
            }
            // One bit per 4 KiB page, like pageferry's bitmaps (vm-memory uses the host page size).
            if m.bitmap().len() as u64 != r.pages() {
                return Err(DirtyError::Unsupported(format!(
                    "region '{}': vm-memory bitmap has {} bits for {} pages of {PAGE_SIZE} bytes",
                    r.name(),
                    m.bitmap().len(),
                    r.pages()
                )));
            }
        }
        // Writes from before the migration do not count: round 0 sends everything anyway.
        for m in &self.regions {
            m.bitmap().reset();
        }
        self.started = true;
        self.first = true;
        Ok(())
    }

    fn collect(&mut self, into: &mut DirtyPages) -> Result<(), DirtyError> {
        if !self.started {
            return Err(DirtyError::NotStarted);
        }
        if into.regions().len() != self.regions.len() {
            return Err(Self::mismatch("dirty set does not match the memory".into()));
        }
        for (i, m) in self.regions.iter().enumerate() {
            let words = m.bitmap().get_and_reset();
            let out = into.region_mut(i);
            if self.first {
                out.set_all();
                continue;
            }
            if words.len() != out.words_mut().len() {
                return Err(Self::mismatch(format!("region {i}: bitmap of {} words, expected {}", words.len(), out.words_mut().len())));
            }
            for (o, w) in out.words_mut().iter_mut().zip(words) {
                *o |= w;
            }
        }
        self.first = false;
        Ok(())
    }

    fn guest_may_write(&self) -> bool {
        true
    }

    fn stop(&mut self) {
        self.started = false;
    }

    fn name(&self) -> &'static str {
        "vm-memory-bitmap"
    }
}
