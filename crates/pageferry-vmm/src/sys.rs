//! Raw KVM ioctl numbers for the calls made without kvm-ioctls' wrappers (they allocate per
//! call or are missing): dirty-log harvesting into our own buffers, and XSAVE areas larger than
//! 4 KiB. Values follow the kernel's `_IOC` encoding for KVMIO (0xAE).

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xae << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`
pub const KVM_GET_DIRTY_LOG: u64 = ioc(IOC_WRITE, 0x42, 16);
/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`
pub const KVM_CLEAR_DIRTY_LOG: u64 = ioc(IOC_READ | IOC_WRITE, 0xc0, 24);
/// `_IOR(KVMIO, 0xa4, struct kvm_xsave)`
pub const KVM_GET_XSAVE: u64 = ioc(IOC_READ, 0xa4, 4096);
/// `_IOW(KVMIO, 0xa5, struct kvm_xsave)`
pub const KVM_SET_XSAVE: u64 = ioc(IOC_WRITE, 0xa5, 4096);
/// `_IOR(KVMIO, 0xcf, struct kvm_xsave)`
pub const KVM_GET_XSAVE2: u64 = ioc(IOC_READ, 0xcf, 4096);

/// `ioctl(fd, req, arg)`, with errno as an io::Error.
///
/// # Safety
/// `arg` must be what the kernel expects for `req`, valid for the whole call.
pub unsafe fn ioctl<T>(fd: &impl std::os::fd::AsRawFd, req: u64, arg: *mut T) -> std::io::Result<i32> {
    // SAFETY: forwarded to the caller.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_match_the_kernel_headers() {
        // kvm-ioctls computes the same numbers through vmm-sys-util's macros.
        assert_eq!(super::KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(super::KVM_CLEAR_DIRTY_LOG, 0xc018_aec0);
        assert_eq!(super::KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(super::KVM_SET_XSAVE, 0x5000_aea5);
        assert_eq!(super::KVM_GET_XSAVE2, 0x9000_aecf);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_dirty_log>(), 16);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_clear_dirty_log>(), 24);
    }
}
