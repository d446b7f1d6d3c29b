//! Shared helpers for the KVM tests: skip cleanly where /dev/kvm cannot be used.

#![allow(dead_code)]

/// True (after printing "skipping: <reason>") when KVM is not usable here.
pub fn skip() -> bool {
    match pageferry_vmm::kvm_available() {
        Ok(()) => false,
        Err(e) => {
            println!("skipping: {e}");
            true
        }
    }
}
