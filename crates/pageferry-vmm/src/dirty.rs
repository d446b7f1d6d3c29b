//! `KvmDirtyTracker`: the engine's [`DirtyTracker`] over KVM's dirty log of the VM's RAM slot.
//!
//! Why it exists: the guest writes its memory from inside KVM, where neither userfaultfd nor
//! soft-dirty bits see it; KVM itself records guest writes per memory slot. `start` turns on
//! `KVM_MEM_LOG_DIRTY_PAGES` for the slot (and `stop` turns it off again, so a VM that is not
//! migrating pays nothing); each `collect` fetches the log straight into a buffer whose word
//! layout is pageferry's [`DirtyBitmap`] layout (bit i of word w = page 64w+i) and ORs it into
//! the caller's set.
//!
//! Two harvesting modes ([`DirtyLogMode`]):
//! - `GetLog`: `KVM_GET_DIRTY_LOG` returns and clears the log in one call, write-protecting
//!   the pages it reports so their next write is logged again.
//! - `ManualProtect` (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with initially-set bits): enabling the
//!   log costs nothing up front; `KVM_GET_DIRTY_LOG` only copies the bitmap and
//!   `KVM_CLEAR_DIRTY_LOG` re-protects exactly the pages just reported. A write that lands
//!   between the two calls stays logged for the next round, so nothing is lost.
//!
//! Exactness: KVM logs guest writes only (not the host's), and the guest's page tables have
//! their accessed/dirty bits preset and its code and config pages mapped read-only (see
//! `guest.rs`), so the log holds exactly the pages the guest program stored to.

use crate::sys::{self, KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG};
use crate::vm::{set_slot, DirtyLogMode, VmInner, RAM_SLOT};
use pageferry::dirty::{AtomicBitmapTracker, UnionTracker};
use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, KVM_MEM_LOG_DIRTY_PAGES};
use pageferry::dirty::{DirtyError, DirtyPages, DirtyTracker};
use pageferry::memory::{GuestMemory, PAGE_SIZE};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What [`crate::Vm::dirty_tracker`] returns: KVM's dirty log (vCPU writes) united with
/// vm-memory's bitmap (the VMM's writes through [`crate::Vm::guest_ram`]).
pub type VmDirtyTracker = UnionTracker<KvmDirtyTracker, AtomicBitmapTracker>;

/// Cost of one `collect`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HarvestStats {
    /// Time in the kernel calls (GET, plus CLEAR in manual-protect mode).
    pub kernel: Duration,
    /// Whole `collect`, including merging into the caller's bitmap.
    pub total: Duration,
    /// Pages the kernel reported.
    pub dirty_pages: u64,
}

/// Dirty tracking for a [`crate::Vm`]'s guest RAM through KVM's dirty log. Get one from
/// [`crate::Vm::kvm_dirty_tracker`] (alone) or [`crate::Vm::dirty_tracker`] (with vm-memory's
/// bitmap); one may be started at a time per VM.
pub struct KvmDirtyTracker {
    vm: Arc<VmInner>,
    started: bool,
    first: bool,
    pages: u64,
    scratch: Vec<u64>,
    last: Option<HarvestStats>,
}

impl KvmDirtyTracker {
    pub(crate) fn new(vm: Arc<VmInner>) -> Self {
        let pages = vm.mem_bytes / PAGE_SIZE as u64;
        Self { vm, started: false, first: false, pages, scratch: vec![0; pages.div_ceil(64) as usize], last: None }
    }

    /// The harvesting mode (chosen when the VM was created, [`crate::VmConfig::dirty_log`]).
    pub fn mode(&self) -> DirtyLogMode {
        self.vm.dirty_log
    }

    /// Cost of the most recent `collect`.
    pub fn last_harvest(&self) -> Option<HarvestStats> {
        self.last
    }

    fn os(op: &'static str) -> impl Fn(std::io::Error) -> DirtyError {
        move |cause| DirtyError::Os { op, cause }
    }

    /// Fetch the slot's log into `scratch` (and re-protect in manual mode). Returns the number
    /// of dirty pages.
    fn harvest(&mut self) -> Result<u64, DirtyError> {
        let mut log = kvm_dirty_log { slot: RAM_SLOT, ..Default::default() };
        log.__bindgen_anon_1.dirty_bitmap = self.scratch.as_mut_ptr().cast();
        // SAFETY: the bitmap buffer has one bit per page of the slot, rounded up to 64 bits.
        unsafe { sys::ioctl(&self.vm.vm_fd, KVM_GET_DIRTY_LOG, &mut log) }.map_err(Self::os("KVM_GET_DIRTY_LOG"))?;
        let dirty: u64 = self.scratch.iter().map(|w| w.count_ones() as u64).sum();
        if self.vm.dirty_log == DirtyLogMode::ManualProtect && dirty > 0 {
            let mut clear = kvm_clear_dirty_log { slot: RAM_SLOT, num_pages: self.pages as u32, first_page: 0, ..Default::default() };
            clear.__bindgen_anon_1.dirty_bitmap = self.scratch.as_mut_ptr().cast();
            // SAFETY: as above; first_page 0 and num_pages = the whole slot.
            unsafe { sys::ioctl(&self.vm.vm_fd, KVM_CLEAR_DIRTY_LOG, &mut clear) }.map_err(Self::os("KVM_CLEAR_DIRTY_LOG"))?;
        }
        Ok(dirty)
    }
}

impl DirtyTracker for KvmDirtyTracker {
    fn start(&mut self, memory: &GuestMemory) -> Result<(), DirtyError> {
        if self.started {
            return Err(DirtyError::Other("tracker already started".into()));
        }
        let ours = memory.regions().len() == 1
            && memory.regions()[0].host_ptr() == self.vm.ram_ptr()
            && memory.regions()[0].len() == self.vm.mem_bytes;
        if !ours {
            return Err(DirtyError::Other("KvmDirtyTracker can only track its own VM's guest_memory()".into()));
        }
        if self.pages > u32::MAX as u64 {
            return Err(DirtyError::Unsupported("slot too large".into()));
        }
        if self.vm.tracking.swap(true, Ordering::SeqCst) {
            return Err(DirtyError::Other("another KvmDirtyTracker is already tracking this VM".into()));
        }
        if let Err(e) = set_slot(&self.vm.vm_fd, &self.vm.ram, KVM_MEM_LOG_DIRTY_PAGES) {
            self.vm.tracking.store(false, Ordering::SeqCst);
            return Err(DirtyError::Other(format!("enabling the dirty log: {e}")));
        }
        self.started = true;
        self.first = true;
        Ok(())
    }

    fn collect(&mut self, into: &mut DirtyPages) -> Result<(), DirtyError> {
        if !self.started {
            return Err(DirtyError::NotStarted);
        }
        if into.regions().len() != 1 || into.region(0).pages() != self.pages {
            return Err(DirtyError::Other("dirty set does not match the VM's memory".into()));
        }
        let t0 = Instant::now();
        let dirty = self.harvest()?;
        let kernel = t0.elapsed();
        let out = into.region_mut(0);
        if self.first {
            // Round 0 sends everything; the harvest above only reset the log.
            out.set_all();
            self.first = false;
        } else if dirty > 0 {
            for (o, s) in out.words_mut().iter_mut().zip(&self.scratch) {
                *o |= *s;
            }
        }
        self.last = Some(HarvestStats { kernel, total: t0.elapsed(), dirty_pages: dirty });
        Ok(())
    }

    fn guest_may_write(&self) -> bool {
        true
    }

    fn stop(&mut self) {
        if self.started {
            self.started = false;
            let _ = set_slot(&self.vm.vm_fd, &self.vm.ram, 0);
            self.vm.tracking.store(false, Ordering::SeqCst);
        }
    }

    fn name(&self) -> &'static str {
        match self.vm.dirty_log {
            DirtyLogMode::GetLog => "kvm-dirty-log",
            DirtyLogMode::ManualProtect => "kvm-dirty-log-manual",
        }
    }
}

impl Drop for KvmDirtyTracker {
    fn drop(&mut self) {
        self.stop();
    }
}
