//! Dirty tracking for memory mapped in this process, with userfaultfd's *asynchronous*
//! write-protect mode and the `PAGEMAP_SCAN` ioctl (Linux 6.7+).
//!
//! How it works: every region is registered with a userfaultfd in write-protect mode and
//! protected once. With `UFFD_FEATURE_WP_ASYNC` the kernel resolves a write fault on its own —
//! no thread has to read fault messages — by clearing the protection of that page, which
//! `PAGEMAP_SCAN` then reports as `PAGE_IS_WRITTEN`. One scan per round with
//! `PM_SCAN_WP_MATCHING` returns the written ranges and write-protects them again atomically.
//! Soft-dirty bits are not used (not available on the kernels we target).
//!
//! The libc crate lacks these uapi definitions: userfaultfd's are in `uffd_sys.rs` (shared with
//! postcopy), `PAGEMAP_SCAN`'s are spelled out below from `include/uapi/linux/fs.h`.

use super::{DirtyError, DirtyPages, DirtyTracker};
use crate::memory::{GuestMemory, PAGE_SIZE};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::uffd_sys::*;

// --- uapi: PAGEMAP_SCAN ---
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}
const PAGEMAP_SCAN: u64 = iowr(b'f' as u64, 16, std::mem::size_of::<PmScanArg>() as u64);

fn os(op: &'static str) -> DirtyError {
    DirtyError::Os { op, cause: std::io::Error::last_os_error() }
}

fn open_uffd() -> Result<OwnedFd, DirtyError> {
    // SAFETY: plain syscall; result checked.
    let fd = unsafe {
        libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY)
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(DirtyError::Unsupported(format!("userfaultfd: {e}")));
    }
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// userfaultfd-WP + PAGEMAP_SCAN tracker for regions mapped in this process.
pub struct UffdTracker {
    uffd: Option<OwnedFd>,
    pagemap: Option<File>,
    ranges: Vec<(u64, u64)>,
    reported_all: bool,
    buf: Vec<PageRegion>,
}

impl Default for UffdTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl UffdTracker {
    /// A tracker (not started).
    pub fn new() -> Self {
        Self { uffd: None, pagemap: None, ranges: Vec::new(), reported_all: false, buf: vec![PageRegion::default(); 4096] }
    }

    /// Whether this kernel offers asynchronous write-protect (the features this tracker needs).
    pub fn probe() -> Result<(), DirtyError> {
        let fd = open_uffd()?;
        let mut api = UffdioApi { api: UFFD_API, ..Default::default() };
        // SAFETY: UFFDIO_API takes a uffdio_api.
        if unsafe { ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(os("UFFDIO_API"));
        }
        let need = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        if api.features & need != need {
            return Err(DirtyError::Unsupported(format!(
                "kernel lacks userfaultfd WP_ASYNC/WP_UNPOPULATED (features {:#x}); Linux 6.7+ needed",
                api.features
            )));
        }
        Ok(())
    }

    fn supported_features() -> Result<u64, DirtyError> {
        let fd = open_uffd()?;
        let mut api = UffdioApi { api: UFFD_API, ..Default::default() };
        // SAFETY: UFFDIO_API takes a uffdio_api.
        if unsafe { ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(os("UFFDIO_API"));
        }
        Ok(api.features)
    }

    /// Scan `[start, end)`, re-protect written pages, and mark them in `mark(first_page, count)`.
    fn scan(&mut self, start: u64, end: u64, mut mark: impl FnMut(u64, u64)) -> Result<(), DirtyError> {
        let pagemap = self.pagemap.as_ref().ok_or(DirtyError::NotStarted)?.as_raw_fd();
        let mut from = start;
        while from < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: from,
                end,
                vec: self.buf.as_mut_ptr() as u64,
                vec_len: self.buf.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: PAGEMAP_SCAN takes a pm_scan_arg whose vec points to vec_len page_regions.
            let n = unsafe { ioctl(pagemap, PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(os("PAGEMAP_SCAN"));
            }
            for r in &self.buf[..n as usize] {
                let first = (r.start - start) / PAGE_SIZE as u64;
                mark(first, (r.end - r.start) / PAGE_SIZE as u64);
            }
            if arg.walk_end <= from {
                return Err(DirtyError::Other(format!("PAGEMAP_SCAN made no progress at {from:#x}")));
            }
            from = arg.walk_end;
        }
        Ok(())
    }
}

impl DirtyTracker for UffdTracker {
    fn start(&mut self, memory: &GuestMemory) -> Result<(), DirtyError> {
        let avail = Self::supported_features()?;
        let mut want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        if avail & want != want {
            return Err(DirtyError::Unsupported(format!(
                "kernel lacks userfaultfd WP_ASYNC/WP_UNPOPULATED (features {avail:#x}); Linux 6.7+ needed"
            )));
        }
        want |= avail & UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        let fd = open_uffd()?;
        let mut api = UffdioApi { api: UFFD_API, features: want, ..Default::default() };
        // SAFETY: UFFDIO_API takes a uffdio_api.
        if unsafe { ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(os("UFFDIO_API"));
        }
        self.ranges.clear();
        for r in memory.regions() {
            let range = UffdioRange { start: r.host_ptr() as u64, len: r.len() };
            let mut reg = UffdioRegister { range, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
            // SAFETY: UFFDIO_REGISTER takes a uffdio_register.
            if unsafe { ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(DirtyError::Unsupported(format!(
                    "cannot write-protect region '{}' with userfaultfd ({e}); anonymous memory, memfd and /dev/shm files work, files on disk do not",
                    r.name()
                )));
            }
            let mut wp = UffdioWriteprotect {
                range: UffdioRange { start: r.host_ptr() as u64, len: r.len() },
                mode: UFFDIO_WRITEPROTECT_MODE_WP,
            };
            // SAFETY: UFFDIO_WRITEPROTECT takes a uffdio_writeprotect.
            if unsafe { ioctl(fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) } != 0 {
                return Err(os("UFFDIO_WRITEPROTECT"));
            }
            self.ranges.push((r.host_ptr() as u64, r.len()));
        }
        self.pagemap = Some(File::open("/proc/self/pagemap").map_err(|source| DirtyError::Os { op: "open /proc/self/pagemap", cause: source })?);
        self.uffd = Some(fd);
        self.reported_all = false;
        Ok(())
    }

    fn collect(&mut self, into: &mut DirtyPages) -> Result<(), DirtyError> {
        if self.uffd.is_none() {
            return Err(DirtyError::NotStarted);
        }
        let ranges = self.ranges.clone();
        if !self.reported_all {
            // Round 0 sends everything; re-arm so that only later writes count from here on.
            for (i, &(start, len)) in ranges.iter().enumerate() {
                self.scan(start, start + len, |_, _| {})?;
                into.region_mut(i).set_all();
            }
            self.reported_all = true;
            return Ok(());
        }
        for (i, &(start, len)) in ranges.iter().enumerate() {
            let bitmap = into.region_mut(i);
            self.scan(start, start + len, |first, n| bitmap.set_range(first, first + n))?;
        }
        Ok(())
    }

    fn guest_may_write(&self) -> bool {
        true
    }

    fn stop(&mut self) {
        // Closing the userfaultfd unregisters the ranges and drops the protection.
        self.uffd = None;
        self.pagemap = None;
    }

    fn name(&self) -> &'static str {
        "uffd-wp"
    }
}
