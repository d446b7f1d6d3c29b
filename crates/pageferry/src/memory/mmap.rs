//! `MmapRegion`: the memory backings pageferry ships — a file mapped shared (image files,
//! files in /dev/shm), a memfd, anonymous memory — and a wrapper for a mapping someone else
//! owns (a VMM's guest RAM).

use super::{MemoryError, MemoryRegion, PAGE_SIZE};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

/// A host mapping of guest memory. Unmapped on drop unless it wraps a foreign mapping.
pub struct MmapRegion {
    name: String,
    ptr: *mut u8,
    len: u64,
    owned: bool,
    fresh: bool,
    _file: Option<File>,
}

// SAFETY: the mapping is plain shared memory; synchronisation of its contents is the engine's
// business (see the memory module docs).
unsafe impl Send for MmapRegion {}
unsafe impl Sync for MmapRegion {}

fn check_len(name: &str, len: u64) -> Result<(), MemoryError> {
    if len == 0 || len % PAGE_SIZE as u64 != 0 {
        return Err(MemoryError::BadLength { name: name.into(), len });
    }
    Ok(())
}

fn io_err<'a>(what: &'static str, name: &'a str) -> impl FnOnce(std::io::Error) -> MemoryError + 'a {
    move |source| MemoryError::Io { what, name: name.into(), cause: source }
}

fn map(fd: i32, len: u64, flags: i32) -> std::io::Result<*mut u8> {
    // SAFETY: plain mmap call; the result is checked.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), len as usize, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0)
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p as *mut u8)
}

impl MmapRegion {
    /// Map an existing file shared, read-write; its length (a page multiple) is the region's.
    pub fn open_file(name: &str, path: &Path) -> Result<Self, MemoryError> {
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(io_err("open", name))?;
        let len = file.metadata().map_err(io_err("stat", name))?.len();
        check_len(name, len)?;
        let ptr = map(file.as_raw_fd(), len, libc::MAP_SHARED).map_err(io_err("mmap", name))?;
        Ok(Self { name: name.into(), ptr, len, owned: true, fresh: false, _file: Some(file) })
    }

    /// Create (or truncate) a file of `len` zero bytes and map it shared.
    pub fn create_file(name: &str, path: &Path, len: u64) -> Result<Self, MemoryError> {
        check_len(name, len)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err("create", name))?;
        file.set_len(len).map_err(io_err("resize", name))?;
        let ptr = map(file.as_raw_fd(), len, libc::MAP_SHARED).map_err(io_err("mmap", name))?;
        Ok(Self { name: name.into(), ptr, len, owned: true, fresh: true, _file: Some(file) })
    }

    /// Create a new file (it must not exist) of `len` zero bytes with all its blocks
    /// reserved (`posix_fallocate`), and map it shared. The space is checked against the file
    /// system's free space first, so a destination that cannot hold the guest says so — naming
    /// the path and both sizes — before any page arrives, and writing the mapping can never
    /// fault for lack of room (a sparse file on a full tmpfs kills its writer with SIGBUS).
    /// On any error the file is removed again.
    pub fn create_file_reserved(name: &str, path: &Path, len: u64) -> Result<Self, MemoryError> {
        check_len(name, len)?;
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(io_err("create", name))?;
        let made = (|| {
            let free = free_bytes(&file).map_err(io_err("statvfs", name))?;
            if free < len {
                return Err(MemoryError::NoSpace { path: path.to_path_buf(), need: len, free });
            }
            reserve(&file, len).map_err(|cause| match cause.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EFBIG) => MemoryError::NoSpace { path: path.to_path_buf(), need: len, free },
                _ => MemoryError::Io { what: "reserve space for", name: name.into(), cause },
            })?;
            map(file.as_raw_fd(), len, libc::MAP_SHARED).map_err(io_err("mmap", name))
        })();
        match made {
            Ok(ptr) => Ok(Self { name: name.into(), ptr, len, owned: true, fresh: true, _file: Some(file) }),
            Err(e) => {
                drop(file);
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// A new memfd of `len` zero bytes, mapped shared (shareable with another process by fd).
    pub fn memfd(name: &str, len: u64) -> Result<Self, MemoryError> {
        check_len(name, len)?;
        let cname = std::ffi::CString::new(format!("pageferry-{name}")).expect("no NUL in name");
        // SAFETY: valid C string; result checked.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Io { what: "memfd_create", name: name.into(), cause: std::io::Error::last_os_error() });
        }
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).map_err(io_err("resize", name))?;
        let ptr = map(fd, len, libc::MAP_SHARED).map_err(io_err("mmap", name))?;
        Ok(Self { name: name.into(), ptr, len, owned: true, fresh: true, _file: Some(file) })
    }

    /// Private anonymous memory of `len` zero bytes.
    pub fn anonymous(name: &str, len: u64) -> Result<Self, MemoryError> {
        check_len(name, len)?;
        let ptr = map(-1, len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .map_err(io_err("mmap", name))?;
        Ok(Self { name: name.into(), ptr, len, owned: true, fresh: true, _file: None })
    }

    /// Wrap a mapping owned elsewhere (e.g. a VMM's guest RAM). Not unmapped on drop.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable and writable bytes that outlive the region.
    pub unsafe fn from_raw(name: &str, ptr: *mut u8, len: u64, fresh_zeroed: bool) -> Result<Self, MemoryError> {
        check_len(name, len)?;
        Ok(Self { name: name.into(), ptr, len, owned: false, fresh: fresh_zeroed, _file: None })
    }

    /// The backing file, if any (for fsync or sharing the fd).
    pub fn file(&self) -> Option<&File> {
        self._file.as_ref()
    }

    /// Flush a file-backed mapping to its file.
    pub fn sync(&self) -> std::io::Result<()> {
        // SAFETY: our own mapping.
        if unsafe { libc::msync(self.ptr.cast(), self.len as usize, libc::MS_SYNC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

// SAFETY: ptr/len describe a live read-write mapping for the region's lifetime.
unsafe impl MemoryRegion for MmapRegion {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn host_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn is_fresh_zeroed(&self) -> bool {
        self.fresh
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: unmapping our own mapping.
            unsafe { libc::munmap(self.ptr.cast(), self.len as usize) };
        }
    }
}

/// Bytes an unprivileged writer may still allocate on `file`'s file system.
fn free_bytes(file: &File) -> std::io::Result<u64> {
    // SAFETY: fstatvfs fills the struct; the result is checked.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Allocate every block of `file` up to `len` (posix_fallocate; on a file system without it,
/// by writing zeros).
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    let len_off = libc::off_t::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on our descriptor.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len_off) };
    match rc {
        0 => Ok(()),
        libc::EOPNOTSUPP | libc::EINVAL => {
            use std::os::unix::fs::FileExt;
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}
