//! The VMM's error type, shared by every module of the crate.

use pageferry::memory::MemoryError;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` is missing or cannot be opened (tests skip on this).
    #[error("KVM is not available: {0}")]
    KvmUnavailable(std::io::Error),
    #[error("{op} failed: {source}")]
    Kvm { op: &'static str, #[source] source: std::io::Error },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("device state: {0}")]
    State(String),
    /// The guest stopped in a way it never should (triple fault, failed entry, ...).
    #[error("guest failed: {0}")]
    Guest(String),
    /// The operation does not fit the VM's current lifecycle state.
    #[error("{0}")]
    Lifecycle(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

/// Map a kvm-ioctls error to [`VmError::Kvm`] for `op`.
pub(crate) fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm { op, source: std::io::Error::from_raw_os_error(e.errno()) }
}
