//! Helpers every two-process test file of the `pageferry` binary uses (one copy, included by
//! each test crate with `mod common;`; not every crate uses every helper).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pageferry"))
}

/// A temporary directory in /dev/shm (images are written to memory, not disk).
pub fn shm_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("pageferry-test").tempdir_in("/dev/shm").unwrap()
}

/// `pageferry image --size SIZE PATH`, which must succeed.
pub fn make_image(path: &Path, size: &str) {
    let out = bin().args(["image", "--size", size]).arg(path).output().unwrap();
    assert!(out.status.success(), "image: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// The fake QATzip library: `$PAGEFERRY_FAKE_QATZIP`, else `libfake_qatzip.so` next to the
/// pageferry binary (`cargo test --workspace` builds it there as a workspace member), built
/// there once when missing (`cargo test -p pageferry-cli`).
pub fn fake_qatzip_lib() -> PathBuf {
    static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        // <target>/<profile>/pageferry
        let profile_dir = Path::new(env!("CARGO_BIN_EXE_pageferry")).parent().ok_or("unexpected binary location")?;
        pageferry_testsupport::locate_or_build(profile_dir)
    })
    .clone()
    .unwrap_or_else(|e| panic!("fake QATzip library: {e}"))
}
