//! The userfaultfd uapi (`include/uapi/linux/userfaultfd.h`) that the libc crate lacks, spelled
//! out once for both users: postcopy's MISSING mode (`engine/postcopy.rs`) and the
//! write-protect dirty tracker (`dirty/uffd.rs`).

/// `UFFD_API`, the API version asked for in `UFFDIO_API`.
pub(crate) const UFFD_API: u64 = 0xAA;
/// `userfaultfd(2)` flag: handle user-mode faults only (allowed to unprivileged processes).
pub(crate) const UFFD_USER_MODE_ONLY: libc::c_int = 1;
pub(crate) const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub(crate) const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub(crate) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub(crate) const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Bits of `uffdio_register.ioctls`: the range supports `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`.
pub(crate) const HAVE_COPY: u64 = 1 << 0x03;
pub(crate) const HAVE_ZEROPAGE: u64 = 1 << 0x04;

/// `_IOWR(ty, nr, size)`.
pub(crate) const fn iowr(ty: u64, nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (ty << 8) | nr
}
/// `_IOR(ty, nr, size)`.
pub(crate) const fn ior(ty: u64, nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (ty << 8) | nr
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioApi {
    pub(crate) api: u64,
    pub(crate) features: u64,
    pub(crate) ioctls: u64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub(crate) struct UffdioRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}
#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioRegister {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
    pub(crate) ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioCopy {
    pub(crate) dst: u64,
    pub(crate) src: u64,
    pub(crate) len: u64,
    pub(crate) mode: u64,
    pub(crate) copy: i64,
}
#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioZeropage {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
    pub(crate) zeropage: i64,
}
#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioWriteprotect {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
}
/// `struct uffd_msg` (32 bytes); for a page fault: flags at 8, address at 16.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UffdMsg {
    pub(crate) event: u8,
    pub(crate) _reserved: [u8; 7],
    pub(crate) flags: u64,
    pub(crate) address: u64,
    pub(crate) _feat: u64,
}
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

pub(crate) const UFFDIO_API: u64 = iowr(0xAA, 0x3F, std::mem::size_of::<UffdioApi>() as u64);
pub(crate) const UFFDIO_REGISTER: u64 = iowr(0xAA, 0x00, std::mem::size_of::<UffdioRegister>() as u64);
pub(crate) const UFFDIO_UNREGISTER: u64 = ior(0xAA, 0x01, std::mem::size_of::<UffdioRange>() as u64);
pub(crate) const UFFDIO_COPY: u64 = iowr(0xAA, 0x03, std::mem::size_of::<UffdioCopy>() as u64);
pub(crate) const UFFDIO_ZEROPAGE: u64 = iowr(0xAA, 0x04, std::mem::size_of::<UffdioZeropage>() as u64);
pub(crate) const UFFDIO_WRITEPROTECT: u64 = iowr(0xAA, 0x06, std::mem::size_of::<UffdioWriteprotect>() as u64);

/// # Safety
/// `arg` must be the struct the ioctl `req` expects.
pub(crate) unsafe fn ioctl<T>(fd: i32, req: u64, arg: &mut T) -> libc::c_int {
    libc::ioctl(fd, req as libc::c_ulong, arg as *mut T)
}
