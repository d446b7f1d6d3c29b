//! Test support for the workspace's test suites, kept out of pageferry's public API (it runs
//! cargo). Where the test suites find `crates/fake-qatzip` (the stand-in libqatzip): one
//! function for the library's own tests and the CLI's, so both locate and build it the same
//! way.

pub mod pki;

use std::path::{Path, PathBuf};
use std::process::Command;

/// `$PAGEFERRY_FAKE_QATZIP` when set, else `libfake_qatzip.so` in `profile_dir`
/// (`<target>/<profile>`, where `cargo test --workspace` builds it as a workspace member),
/// built there with cargo when missing (`cargo test -p <one crate>` does not build it).
pub fn locate_or_build(profile_dir: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("PAGEFERRY_FAKE_QATZIP").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let lib = profile_dir.join("libfake_qatzip.so");
    if lib.exists() {
        return Ok(lib);
    }
    let target_dir = profile_dir.parent().ok_or("unexpected target directory layout")?;
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "fake-qatzip"])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!("building the fake QATzip library: {cmd:?}");
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo build -p fake-qatzip failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    if lib.exists() {
        Ok(lib)
    } else {
        Err(format!("{} missing after cargo build -p fake-qatzip", lib.display()))
    }
}
