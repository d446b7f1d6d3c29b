//! rust-vmm `vm-memory` guest memory as pageferry regions (feature `vm-memory`).
//!
//! Every region of a [`GuestMemoryMmap`] becomes one [`VmMemoryRegion`] that points at the same
//! host mapping (no copy) and keeps it alive through vm-memory's own `Arc<MmapRegion>`. Regions
//! are named after their guest physical address, `ram@0x<gpa>`, and ordered by address (the
//! order vm-memory keeps them in), so a source and a destination built with the same layout
//! agree on names and ids without any configuration. Any bitmap type works: the bitmap only
//! matters to dirty tracking ([`crate::dirty::AtomicBitmapTracker`]).

use std::sync::Arc;

use ::vm_memory::bitmap::Bitmap;
use ::vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use super::{GuestMemory, MemoryError, MemoryRegion};

/// The name of the vm-memory region at guest physical address `gpa`: `ram@0x<gpa in hex>`.
pub fn vm_region_name(gpa: u64) -> String {
    format!("ram@{gpa:#x}")
}

/// One vm-memory region seen as a pageferry [`MemoryRegion`], sharing its mapping.
pub struct VmMemoryRegion<B: Bitmap> {
    name: String,
    gpa: u64,
    map: Arc<MmapRegion<B>>,
    fresh: bool,
}

impl<B: Bitmap> VmMemoryRegion<B> {
    /// Wrap `region`; its name is [`vm_region_name`] of its guest address.
    pub fn new(region: &GuestRegionMmap<B>) -> Self {
        let gpa = region.start_addr().0;
        Self { name: vm_region_name(gpa), gpa, map: region.get_mmap(), fresh: false }
    }

    /// Declare that the mapping was just created (anonymous, never written), so a destination
    /// may skip zero pages in the first round. Claiming it for memory that holds data makes the
    /// destination keep that data where the source has zero pages.
    pub fn assume_fresh_zeroed(mut self) -> Self {
        self.fresh = true;
        self
    }

    /// Guest physical address of the region's first byte.
    pub fn guest_addr(&self) -> u64 {
        self.gpa
    }
}

// SAFETY: `map` is vm-memory's mapping of `size()` bytes at `as_ptr()`, kept mapped by the Arc we
// hold; vm-memory maps whole pages and `GuestMemory::new` refuses lengths that are not a
// multiple of PAGE_SIZE. MmapRegion<B> is Send + Sync when B is.
unsafe impl<B: Bitmap + Send + Sync> MemoryRegion for VmMemoryRegion<B> {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> u64 {
        self.map.size() as u64
    }
    fn host_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }
    fn is_fresh_zeroed(&self) -> bool {
        self.fresh
    }
}

impl GuestMemory {
    /// All regions of `memory`, in guest-address order, as pageferry guest memory (no copy).
    /// Fails when a region's length is not a multiple of the page size.
    pub fn from_vm_memory<B: Bitmap + Send + Sync + 'static>(memory: &GuestMemoryMmap<B>) -> Result<Self, MemoryError> {
        let regions: Vec<Arc<dyn MemoryRegion>> =
            memory.iter().map(|r| Arc::new(VmMemoryRegion::new(r)) as Arc<dyn MemoryRegion>).collect();
        Self::new(regions)
    }
}
