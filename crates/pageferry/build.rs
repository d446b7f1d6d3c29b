//! Picks the deflate compressor of this build (see `src/codec/deflate.rs`):
//!
//! * feature `isal`: ISA-L built from source by the `isal-sys` crate (needs nasm + autotools);
//! * otherwise ISA-L from the system when it is installed (Debian/Ubuntu: `libisal-dev`):
//!   a tiny C shim is compiled against the system's `<isa-l/igzip_lib.h>`, so the struct layout
//!   comes from the installed header, and the library is linked dynamically (`-lisal`);
//! * otherwise libdeflate (always built; also every decompression).
//!
//! The probe compiles and links a one-line program against `-lisal`. `PAGEFERRY_ISAL=off`
//! skips it (a libdeflate build for comparisons). It runs again after a package install (the
//! dpkg status file changes), so installing libisal-dev after a first build is picked up.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(pageferry_isal_system)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/codec/isal_shim.c");
    println!("cargo::rerun-if-env-changed=PAGEFERRY_ISAL");
    for watched in ["/var/lib/dpkg/status", "/usr/include/isa-l/igzip_lib.h"] {
        if Path::new(watched).exists() {
            println!("cargo::rerun-if-changed={watched}");
        }
    }
    if std::env::var_os("CARGO_FEATURE_ISAL").is_some() {
        return; // isal-sys builds ISA-L from source and links it statically.
    }
    if std::env::var("PAGEFERRY_ISAL").is_ok_and(|v| v == "off" || v == "0") {
        return;
    }
    if system_isal_links() {
        cc::Build::new().file("src/codec/isal_shim.c").warnings(true).compile("pageferry_isal_shim");
        println!("cargo::rustc-link-lib=dylib=isal");
        println!("cargo::rustc-cfg=pageferry_isal_system");
    }
}

/// True when a program using the igzip stateless API compiles and links against `-lisal`.
fn system_isal_links() -> bool {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = out.join("isal_probe.c");
    let exe = out.join("isal_probe");
    let probe = "#include <isa-l/igzip_lib.h>\n\
                 int main(void) { struct isal_zstream s; isal_deflate_stateless_init(&s); return 0; }\n";
    if std::fs::write(&src, probe).is_err() {
        return false;
    }
    let compiler = cc::Build::new().cargo_metadata(false).get_compiler();
    let mut cmd = compiler.to_command();
    cmd.arg(&src).arg("-o").arg(&exe).arg("-lisal");
    matches!(cmd.output(), Ok(o) if o.status.success())
}
