//! Guest memory as the engine sees it: an ordered list of named regions, each a host mapping.
//!
//! The engine never knows who owns a region — an image file mapped shared, a memfd, anonymous
//! memory, a KVM memory slot of a VMM — it only needs a name, a length and a host pointer.
//! A VMM adopts pageferry by implementing [`MemoryRegion`] for its own mappings (or wrapping
//! them with [`MmapRegion::from_raw`]).
//!
//! Concurrency: the guest may write a region while the source reads it. Reads therefore go
//! through raw pointers into buffers the engine owns or into codecs that tolerate changing
//! input; see `engine::source` for the rules.

mod mmap;
#[cfg(feature = "vm-memory")]
mod vm_mem;

pub use mmap::MmapRegion;
#[cfg(feature = "vm-memory")]
pub use vm_mem::{vm_region_name, VmMemoryRegion};

use std::sync::Arc;

/// Size of a guest page; every offset on the wire counts in these.
pub const PAGE_SIZE: usize = 4096;

/// Errors from creating or sizing memory backings.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// An operating-system call on a backing failed.
    #[error("{what} '{name}': {cause}")]
    Io {
        /// The operation ("open", "mmap", ...).
        what: &'static str,
        /// The region (or file) it was for.
        name: String,
        /// The OS error.
        cause: std::io::Error,
    },
    /// A region's length is zero or not a multiple of [`PAGE_SIZE`].
    #[error("region '{name}': length {len} is not a non-zero multiple of the page size ({PAGE_SIZE})")]
    BadLength {
        /// The region.
        name: String,
        /// Its length in bytes.
        len: u64,
    },
    /// A file-backed destination region does not fit on its file system.
    #[error("{}: needs {need} bytes ({:.1} MiB), the file system has {free} bytes ({:.1} MiB) free", path.display(), *need as f64 / 1048576.0, *free as f64 / 1048576.0)]
    NoSpace {
        /// The file that was to be created.
        path: std::path::PathBuf,
        /// Bytes it needs.
        need: u64,
        /// Bytes free on its file system.
        free: u64,
    },
    /// Two regions have the same name (names identify regions on the wire).
    #[error("duplicate region name '{0}'")]
    DuplicateName(String),
}

/// One contiguous piece of guest memory mapped into this process.
///
/// # Safety
/// Implementors promise that `host_ptr()` points to `len()` bytes that stay mapped, readable
/// and writable for as long as the region lives, and that `len()` is a multiple of
/// [`PAGE_SIZE`].
pub unsafe trait MemoryRegion: Send + Sync {
    /// Stable name, matched between source and destination (e.g. "ram0", "image").
    fn name(&self) -> &str;
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    fn len(&self) -> u64;
    /// Start of the host mapping.
    fn host_ptr(&self) -> *mut u8;
    /// True when every byte is known to be zero because the backing was just created; a
    /// destination may then skip writing zero pages in the first round.
    fn is_fresh_zeroed(&self) -> bool {
        false
    }
    /// Length in pages.
    fn pages(&self) -> u64 {
        self.len() / PAGE_SIZE as u64
    }
}

/// The guest's memory: regions in a fixed order (their index is the region id on the wire).
#[derive(Clone, Default)]
pub struct GuestMemory {
    regions: Vec<Arc<dyn MemoryRegion>>,
}

impl GuestMemory {
    /// Memory made of `regions`, in this order (their index is the region id on the wire).
    /// Fails on a length that is not a non-zero multiple of [`PAGE_SIZE`] or a repeated name.
    pub fn new(regions: Vec<Arc<dyn MemoryRegion>>) -> Result<Self, MemoryError> {
        for (i, r) in regions.iter().enumerate() {
            if r.len() == 0 || r.len() % PAGE_SIZE as u64 != 0 {
                return Err(MemoryError::BadLength { name: r.name().into(), len: r.len() });
            }
            if regions[..i].iter().any(|o| o.name() == r.name()) {
                return Err(MemoryError::DuplicateName(r.name().into()));
            }
        }
        Ok(Self { regions })
    }
    /// Memory made of one region.
    pub fn single(region: impl MemoryRegion + 'static) -> Result<Self, MemoryError> {
        Self::new(vec![Arc::new(region)])
    }
    /// The regions, in id order.
    pub fn regions(&self) -> &[Arc<dyn MemoryRegion>] {
        &self.regions
    }
    /// Region `id`, if there is one.
    pub fn region(&self, id: usize) -> Option<&Arc<dyn MemoryRegion>> {
        self.regions.get(id)
    }
    /// Bytes in all regions.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len()).sum()
    }
    /// Pages in all regions.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE as u64
    }

    /// A 128-bit digest of all regions (xxh3), in region order. Used to verify a migration end
    /// to end; the caller must make sure nobody writes the memory meanwhile.
    pub fn digest(&self) -> u128 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for r in &self.regions {
            h.update(r.name().as_bytes());
            // SAFETY: the region contract guarantees len bytes mapped at host_ptr.
            let bytes = unsafe { std::slice::from_raw_parts(r.host_ptr(), r.len() as usize) };
            for chunk in bytes.chunks(1 << 20) {
                h.update(chunk);
            }
        }
        h.digest128()
    }

    /// Region layout as sent in the handshake: (name, length) in order.
    pub fn layout(&self) -> Vec<(String, u64)> {
        self.regions.iter().map(|r| (r.name().to_string(), r.len())).collect()
    }
}

/// Conformance suite for [`MemoryRegion`] backings (public so out-of-tree backings run it).
pub mod conformance {
    use super::*;

    /// `region` must be freshly made, `len` bytes long.
    pub fn run_suite(region: Arc<dyn MemoryRegion>, len: u64) {
        assert_eq!(region.len(), len);
        assert_eq!(region.len() % PAGE_SIZE as u64, 0);
        assert_eq!(region.pages(), len / PAGE_SIZE as u64);
        assert_eq!(region.host_ptr() as usize % PAGE_SIZE, 0, "mapping must be page aligned");
        // SAFETY: the region contract.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.host_ptr(), len as usize) };
        if region.is_fresh_zeroed() {
            assert!(bytes.iter().all(|&b| b == 0), "a region claiming to be fresh must read zero");
        }
        let mem = GuestMemory::new(vec![region.clone()]).unwrap();
        let before = mem.digest();
        let last = len as usize - 1;
        bytes[0] = 0x11;
        bytes[last] = 0x22;
        assert_eq!((bytes[0], bytes[last]), (0x11, 0x22));
        assert_ne!(mem.digest(), before, "digest must see writes");
        assert_eq!(mem.total_bytes(), len);
        assert_eq!(mem.layout(), vec![(region.name().to_string(), len)]);
        // Duplicate names are refused.
        assert!(matches!(GuestMemory::new(vec![region.clone(), region]), Err(MemoryError::DuplicateName(_))));
    }
}

#[cfg(test)]
mod tests;
