//! qatzip tests: provider `cpu`; provider `qat` over the fake library (crates/fake-qatzip) with
//! injected failures and a simulated device; provider `qat` over the real QATzip 1.3.1 (its
//! software path), unpacked by scripts/fetch-qatzip.sh — skipped when the package archive
//! cannot be reached.
//!
//! Tests that steer the fake library through its environment variables run in a child
//! process (this test binary, one test, the variables set there), so they never change the
//! environment of the tests running beside them.

use super::*;
use crate::codec::conformance::{self, sample_random, sample_text};
use crate::codec::{deflate_backend_name, CodecError, MAX_BATCH_BYTES};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers

fn opts(provider: Provider, lib: Option<&Path>) -> QatzipOptions {
    QatzipOptions { provider, lib_path: lib.map(Path::to_path_buf) }
}

fn open_with(level: i32, provider: Provider, lib: Option<&Path>) -> Box<dyn Codec> {
    open(level, &opts(provider, lib)).unwrap_or_else(|e| panic!("open {provider} level {level}: {e}"))
}

fn compress(c: &mut dyn Codec, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; c.max_compressed_len(data.len())];
    let n = c.compress(data, &mut out).expect("compress").expect("payload");
    out.truncate(n);
    out
}

fn decompress(c: &mut dyn Codec, payload: &[u8], len: usize) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![0u8; len];
    c.decompress(payload, &mut out).map(|()| out)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The fake library: `$PAGEFERRY_FAKE_QATZIP`, else `libfake_qatzip.so` in this test binary's
/// profile directory (where `cargo test --workspace` puts it), built there on first use when
/// missing (`cargo test -p pageferry` does not build it).
fn fake_lib() -> PathBuf {
    static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // <target>/<profile>/deps/<test binary>
        let profile_dir = exe.parent().and_then(Path::parent).ok_or("unexpected test binary location")?;
        pageferry_testsupport::locate_or_build(profile_dir)
    })
    .clone()
    .unwrap_or_else(|e| panic!("fake QATzip library: {e}"))
}

/// The real QATzip 1.3.1 from `.qatzip/` (unpacked by scripts/fetch-qatzip.sh on first use);
/// None, after printing "skipping: ...", when it cannot be had here.
fn real_lib() -> Option<PathBuf> {
    static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = LIB.get_or_init(|| {
        let root = workspace_root();
        let lib = root.join(".qatzip/usr/lib/x86_64-linux-gnu/libqatzip.so.3");
        if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            return Err("the packaged QATzip is x86-64 Linux only".into());
        }
        if lib.exists() && root.join(".qatzip/usr/include/qatzip.h").exists() {
            return Ok(lib);
        }
        let out = Command::new("bash")
            .arg(root.join("scripts/fetch-qatzip.sh"))
            .output()
            .map_err(|e| format!("cannot run scripts/fetch-qatzip.sh: {e}"))?;
        match out.status.code() {
            Some(0) if lib.exists() => Ok(lib),
            // 2: not a Debian-like host; 3: the package archive cannot be reached.
            Some(2) | Some(3) => Err(format!(
                "scripts/fetch-qatzip.sh could not fetch QATzip: {}",
                String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
            )),
            _ => panic!(
                "scripts/fetch-qatzip.sh failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    });
    match r {
        Ok(p) => Some(p.clone()),
        Err(e) => {
            println!("skipping: real QATzip unavailable ({e})");
            None
        }
    }
}

const CHILD_ENV: &str = "PAGEFERRY_QATZIP_TEST_CHILD";

/// In the test process: run test `name` of this module in a child process with `env` set,
/// check it passed, and return false (the caller returns). In that child: return true (the
/// caller runs the test body).
fn in_child(name: &str, env: &[(&str, &str)]) -> bool {
    if std::env::var_os(CHILD_ENV).is_some() {
        return true;
    }
    let lib = fake_lib(); // built once here, found by the child
    let path = format!("{}::{name}", module_path!().split_once("::").map(|(_, p)| p).unwrap_or(module_path!()));
    let out = Command::new(std::env::current_exe().unwrap())
        .args([path.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("PAGEFERRY_FAKE_QATZIP", lib)
        .envs(env.iter().copied())
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child test {path} with {env:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    false
}

fn fake_counter(name: &str) -> std::ffi::c_long {
    // SAFETY: one of the fake library's counters, `long f(void)`; the library stays loaded
    // (the codecs' handle keeps it).
    unsafe {
        let lib = libloading::Library::new(fake_lib()).unwrap();
        let f: libloading::Symbol<unsafe extern "C" fn() -> std::ffi::c_long> = lib.get(name).unwrap();
        f()
    }
}

fn fake_live_sessions() -> std::ffi::c_long {
    fake_counter("fake_qz_live_sessions")
}

fn members(payload: &[u8]) -> usize {
    let mut dec = cpu::RawInflater::new().unwrap();
    let (mut pos, mut n) = (0, 0);
    let mut scratch = vec![0u8; 4 << 20];
    while pos < payload.len() {
        let h = format::parse_header(&payload[pos..]).unwrap();
        let (used, _) = dec.inflate(&payload[pos + h.len..], &mut scratch).unwrap();
        pos += h.len + used + format::TRAILER_LEN;
        n += 1;
    }
    n
}

// ---------------------------------------------------------------------------------------------
// Options

#[test]
fn provider_names_and_options() {
    for p in Provider::ALL {
        assert_eq!(p.name().parse::<Provider>().unwrap(), p);
        assert_eq!(p.to_string(), p.name());
    }
    assert!("gpu".parse::<Provider>().unwrap_err().to_string().contains("expected auto, qat or cpu"));
    let d = QatzipOptions::default();
    assert_eq!(d.provider, Provider::Auto);
    assert_eq!(d.lib_path, None);
    let o = opts(Provider::Qat, Some(Path::new("/opt/qat/libqatzip.so.3")));
    let json = serde_json::to_string(&o).unwrap();
    assert_eq!(json, r#"{"provider":"qat","lib_path":"/opt/qat/libqatzip.so.3"}"#);
    assert_eq!(serde_json::from_str::<QatzipOptions>(&json).unwrap(), o);
    assert_eq!(serde_json::from_str::<QatzipOptions>("{}").unwrap(), d);
    assert_eq!(o.library(), PathBuf::from("/opt/qat/libqatzip.so.3"));
}

#[test]
fn levels_are_validated() {
    for level in [0, 10] {
        assert!(matches!(open(level, &opts(Provider::Cpu, None)), Err(CodecError::Config(_))));
    }
    let c = open_with(9, Provider::Cpu, None);
    assert_eq!(c.info().level, 9);
}

// ---------------------------------------------------------------------------------------------
// Provider cpu

#[test]
fn cpu_conformance() {
    for level in [1u8, 2, 6, 9] {
        conformance::run_suite(&|| open_with(level.into(), Provider::Cpu, None));
        let c = open_with(level.into(), Provider::Cpu, None);
        assert_eq!(c.info().provider, format!("cpu ({})", deflate_backend_name(level)));
        assert_eq!(c.info().method, METHOD);
        assert!(!c.tolerates_changing_input());
    }
}

#[test]
fn cpu_payload_is_qatzip_gzip_ext() {
    let data = sample_text(64 * 4096, 1);
    for level in [1u8, 5, 9] {
        let mut c = open_with(level.into(), Provider::Cpu, None);
        let p = compress(c.as_mut(), &data);
        let deflate_len = (p.len() - format::HEADER_LEN - format::TRAILER_LEN) as u32;
        let mut want = [0u8; format::HEADER_LEN];
        format::write_header(&mut want, level, data.len() as u32, deflate_len);
        assert_eq!(p[..format::HEADER_LEN], want);
        assert_eq!(p[8], [4, 0, 0, 0, 0, 0, 0, 0, 2][level as usize - 1], "XFL");
        assert_eq!(p[p.len() - 8..p.len() - 4], crc32fast::hash(&data).to_le_bytes());
        assert_eq!(p[p.len() - 4..], (data.len() as u32).to_le_bytes());
        // A standard gzip decoder reads it.
        let mut back = vec![0u8; data.len()];
        assert_eq!(libdeflater::Decompressor::new().gzip_decompress(&p, &mut back).unwrap(), data.len());
        assert!(back == data);
    }
}

#[test]
fn cpu_decodes_multiple_members_with_and_without_qz_records() {
    let parts = [sample_text(5 * 4096, 1), vec![0u8; 3 * 4096], sample_text(4096 + 17, 2), Vec::new(), sample_random(999, 3)];
    let mut c = open_with(1, Provider::Cpu, None);
    let mut plain = libdeflater::Compressor::new(libdeflater::CompressionLvl::new(6).unwrap());
    let mut payload = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if i % 2 == 0 {
            payload.extend(compress(c.as_mut(), part));
        } else {
            // libdeflate's gzip writer: a plain 10-byte header, no extra field.
            let mut out = vec![0u8; plain.gzip_compress_bound(part.len())];
            let n = plain.gzip_compress(part, &mut out).unwrap();
            assert_eq!(out[3], 0, "plain gzip header expected");
            payload.extend_from_slice(&out[..n]);
        }
    }
    let all: Vec<u8> = parts.concat();
    assert_eq!(members(&payload), parts.len());
    assert!(decompress(c.as_mut(), &payload, all.len()).unwrap() == all);
    // Each member must fit; the total must match.
    let err = decompress(c.as_mut(), &payload, all.len() - 1).unwrap_err().to_string();
    assert!(err.contains("member"), "{err}");
    assert!(decompress(c.as_mut(), &payload, all.len() + 1).unwrap_err().to_string().contains("expected"));
    // Trailing bytes after the last member are not a member.
    let mut trailing = payload.clone();
    trailing.push(0);
    assert!(decompress(c.as_mut(), &trailing, all.len()).unwrap_err().to_string().contains("truncated gzip header"));
}

#[test]
fn cpu_rejects_inconsistent_members() {
    let data = sample_text(16 * 4096, 4);
    let mut c = open_with(1, Provider::Cpu, None);
    let good = compress(c.as_mut(), &data);
    let n = good.len();
    let check = |p: &[u8], what: &str| {
        let mut c = open_with(1, Provider::Cpu, None);
        let e = decompress(c.as_mut(), p, data.len()).unwrap_err().to_string();
        assert!(e.contains(what), "expected '{what}' in: {e}");
    };
    let mut p = good.clone();
    p[n - 8] ^= 1;
    check(&p, "CRC-32 mismatch");
    let mut p = good.clone();
    p[n - 1] ^= 1;
    check(&p, "ISIZE");
    let mut p = good.clone();
    let deflate_len = u32::from_le_bytes(p[20..24].try_into().unwrap());
    p[20..24].copy_from_slice(&(deflate_len + 1).to_le_bytes()); // runs into the trailer
    check(&p, "QZ record");
    let mut p = good.clone();
    p[16..20].copy_from_slice(&(data.len() as u32 - 1).to_le_bytes()); // QZ src_len one less
    check(&p, "beyond");
    let mut p = good.clone();
    p[16..20].copy_from_slice(&(data.len() as u32 + 4096).to_le_bytes());
    check(&p, "only");
    let mut p = good.clone();
    p[3] |= 0x20;
    check(&p, "reserved");
    check(&good[..n - 3], "trailer");
    check(&good[..30], "runs past");
}

#[test]
fn cpu_raw_fallback_is_the_engines() {
    let mut c = open_with(1, Provider::Cpu, None);
    let random = sample_random(MAX_BATCH_BYTES, 5);
    assert!(c.max_compressed_len(MAX_BATCH_BYTES) < MAX_BATCH_BYTES + 4096, "receive buffer stays near the batch size");
    let mut out = vec![0u8; c.max_compressed_len(random.len())];
    let n = c.compress(&random, &mut out).unwrap().expect("incompressible data still yields a payload");
    assert!(n >= random.len());
    assert!(decompress(c.as_mut(), &out[..n], random.len()).unwrap() == random);
    // Output that does not fit the buffer given: None.
    let mut small = vec![0u8; random.len()];
    assert_eq!(c.compress(&random, &mut small).unwrap(), None);
    assert_eq!(c.compress(&random, &mut [0u8; 10]).unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// Provider qat over the fake library

#[test]
fn qat_fake_conformance_software_path() {
    let lib = fake_lib();
    for level in [1, 9] {
        conformance::run_suite(&|| open_with(level, Provider::Qat, Some(&lib)));
    }
    let c = open_with(1, Provider::Qat, Some(&lib));
    assert_eq!(c.info().provider, "qat (software path)");
    assert!(!c.tolerates_changing_input());
}

#[test]
fn qat_fake_hardware() {
    if !in_child("qat_fake_hardware", &[("FAKE_QZ_HW", "1")]) {
        return;
    }
    let lib = fake_lib();
    conformance::run_suite(&|| open_with(1, Provider::Qat, Some(&lib)));
    assert_eq!(open_with(1, Provider::Qat, Some(&lib)).info().provider, "qat (hardware)");
    assert_eq!(open_with(1, Provider::Auto, Some(&lib)).info().provider, "qat (hardware)");
}

#[test]
fn auto_without_library_uses_cpu_and_qat_fails_clearly() {
    let missing = Path::new("/nonexistent/dir/libqatzip.so.3");
    let c = open_with(1, Provider::Auto, Some(missing));
    assert_eq!(c.info().provider, format!("cpu ({})", deflate_backend_name(1)));
    // Why, for the engine to pass on as an event (the library prints nothing).
    let note = c.info().note.expect("a fallback carries a note");
    assert!(note.contains("/nonexistent/dir/libqatzip.so.3 not found") && note.contains("using the cpu provider"), "{note}");
    assert_eq!(open_with(1, Provider::Cpu, Some(missing)).info().note, None, "a chosen provider needs no note");
    let e = open(1, &opts(Provider::Qat, Some(missing))).err().expect("qat without a library must fail");
    assert!(matches!(e, CodecError::Setup { .. }));
    let e = e.to_string();
    assert!(e.contains("cannot load the QATzip library /nonexistent/dir/libqatzip.so.3"), "{e}");
    // A bare name that the loader cannot find.
    let e = open(1, &opts(Provider::Qat, Some(Path::new("libqatzip-absent.so.9")))).err().unwrap().to_string();
    assert!(e.contains("libqatzip-absent.so.9"), "{e}");
    // Not a QATzip library at all.
    let e = open(1, &opts(Provider::Qat, Some(Path::new("libc.so.6")))).err().unwrap().to_string();
    assert!(e.contains("lacks qzInit"), "{e}");
}

#[test]
fn environment_names_the_library() {
    let fake = fake_lib();
    if !in_child("environment_names_the_library", &[("PAGEFERRY_QATZIP_LIB", fake.to_str().unwrap())]) {
        return;
    }
    let o = opts(Provider::Qat, None);
    assert_eq!(o.library(), fake);
    assert_eq!(open(1, &o).unwrap().info().provider, "qat (software path)");
    // The option wins over the environment.
    let missing = Path::new("/nonexistent/libqatzip.so.3");
    assert!(open(1, &opts(Provider::Qat, Some(missing))).is_err());
}

#[test]
fn auto_prefers_cpu_over_the_software_path() {
    let c = open_with(1, Provider::Auto, Some(&fake_lib()));
    assert_eq!(c.info().provider, format!("cpu ({})", deflate_backend_name(1)));
    let note = c.info().note.unwrap_or_default();
    assert!(note.contains("found no QAT device"), "{note}");
}

#[test]
fn fake_init_refused() {
    if !in_child("fake_init_refused", &[("FAKE_QZ_FAIL", "init")]) {
        return;
    }
    let lib = fake_lib();
    let e = open(1, &opts(Provider::Qat, Some(&lib))).err().expect("init refused");
    assert!(matches!(e, CodecError::Setup { method, .. } if method == METHOD));
    assert!(e.to_string().contains("qzInit returned QZ_NOSW_NO_HW (-101)"), "{e}");
    assert_eq!(open_with(1, Provider::Auto, Some(&lib)).info().provider, format!("cpu ({})", deflate_backend_name(1)));
    assert_eq!(fake_live_sessions(), 0);
}

#[test]
fn fake_setup_failure() {
    if !in_child("fake_setup_failure", &[("FAKE_QZ_FAIL", "setup")]) {
        return;
    }
    let lib = fake_lib();
    let e = open(3, &opts(Provider::Qat, Some(&lib))).err().expect("setup fails");
    assert!(e.to_string().contains("qzSetupSessionDeflate returned QZ_FAIL (-2)"), "{e}");
    assert_eq!(open_with(3, Provider::Auto, Some(&lib)).info().provider, format!("cpu ({})", deflate_backend_name(3)));
    assert_eq!(fake_live_sessions(), 0);
}

#[test]
fn fake_compress_failure_on_one_call() {
    if !in_child("fake_compress_failure_on_one_call", &[("FAKE_QZ_FAIL", "compress:2")]) {
        return;
    }
    let mut c = open_with(1, Provider::Qat, Some(&fake_lib()));
    let data = sample_text(8 * 4096, 1);
    let mut out = vec![0u8; c.max_compressed_len(data.len())];
    assert!(c.compress(&data, &mut out).unwrap().is_some());
    let e = c.compress(&data, &mut out).unwrap_err();
    assert!(matches!(e, CodecError::Compress { method, .. } if method == METHOD));
    assert!(e.to_string().contains("qzCompress returned QZ_FAIL (-2)"), "{e}");
    let n = c.compress(&data, &mut out).unwrap().expect("later calls work again");
    assert!(decompress(c.as_mut(), &out[..n], data.len()).unwrap() == data);
}

#[test]
fn fake_decompress_failure() {
    if !in_child("fake_decompress_failure", &[("FAKE_QZ_FAIL", "decompress")]) {
        return;
    }
    let mut c = open_with(1, Provider::Qat, Some(&fake_lib()));
    let data = sample_text(8 * 4096, 1);
    let p = compress(c.as_mut(), &data);
    let e = decompress(c.as_mut(), &p, data.len()).unwrap_err();
    assert!(matches!(e, CodecError::Decompress { method, .. } if method == METHOD));
    assert!(e.to_string().contains("qzDecompress returned QZ_DATA_ERROR (-4)"), "{e}");
    // The payload itself is fine.
    assert!(decompress(open_with(1, Provider::Cpu, None).as_mut(), &p, data.len()).unwrap() == data);
}

#[test]
fn sessions_are_torn_down_on_drop() {
    if !in_child("sessions_are_torn_down_on_drop", &[]) {
        return;
    }
    let lib = fake_lib();
    let codecs: Vec<_> = (0..4).map(|_| open_with(1, Provider::Qat, Some(&lib))).collect();
    assert_eq!(fake_live_sessions(), 4);
    drop(codecs);
    assert_eq!(fake_live_sessions(), 0);
    // Auto on the software path closes the session it opened to look.
    drop(open_with(1, Provider::Auto, Some(&lib)));
    assert_eq!(fake_live_sessions(), 0);
}

#[test]
fn qat_output_that_does_not_fit_is_declined() {
    let mut c = open_with(1, Provider::Qat, Some(&fake_lib()));
    let random = sample_random(MAX_BATCH_BYTES, 6);
    let need = c.max_compressed_len(random.len());
    assert!(need < MAX_BATCH_BYTES * 5 / 4, "receive buffer stays near the batch size");
    let mut out = vec![0u8; need];
    let n = c.compress(&random, &mut out).unwrap().unwrap();
    assert!(n >= random.len(), "incompressible data still yields a payload (the engine sends it raw)");
    let mut small = vec![0u8; random.len()];
    assert_eq!(c.compress(&random, &mut small).unwrap(), None);
    // Compressible data through the small buffer: same payload as through the full one.
    let text = sample_text(MAX_BATCH_BYTES, 7);
    let direct = compress(c.as_mut(), &text);
    let m = c.compress(&text, &mut small).unwrap().unwrap();
    assert!(small[..m] == direct[..]);
}

#[test]
fn cross_decoding_cpu_and_fake_qat() {
    let lib = fake_lib();
    let data = sample_text(MAX_BATCH_BYTES, 8);
    for level in [1, 6] {
        let mut cpu = open_with(level, Provider::Cpu, None);
        let mut qat = open_with(level, Provider::Qat, Some(&lib));
        let from_cpu = compress(cpu.as_mut(), &data);
        let from_qat = compress(qat.as_mut(), &data);
        assert!(decompress(qat.as_mut(), &from_cpu, data.len()).unwrap() == data);
        assert!(decompress(cpu.as_mut(), &from_qat, data.len()).unwrap() == data);
    }
}

#[test]
fn fake_device_members_decode_everywhere() {
    if !in_child("fake_device_members_decode_everywhere", &[("FAKE_QZ_DEVICE", "instances=2,latency_us=0,inflight=4")]) {
        return;
    }
    let lib = fake_lib();
    let mut qat = open_with(1, Provider::Qat, Some(&lib));
    let data = sample_text(MAX_BATCH_BYTES - 3 * 4096, 9);
    let p = compress(qat.as_mut(), &data);
    assert_eq!(members(&p), 8, "one member per 64 KiB request");
    assert!(decompress(open_with(1, Provider::Cpu, None).as_mut(), &p, data.len()).unwrap() == data);
    assert!(decompress(qat.as_mut(), &p, data.len()).unwrap() == data);
}

#[test]
fn fake_device_throughput_scales_with_requests_in_flight() {
    const LATENCY_MS: u64 = 3;
    if !in_child(
        "fake_device_throughput_scales_with_requests_in_flight",
        &[("FAKE_QZ_DEVICE", "instances=4,latency_us=3000")],
    ) {
        return;
    }
    let lib = fake_lib();
    let zero = vec![0u8; MAX_BATCH_BYTES]; // 8 requests per batch, next to no host work
    let run = |threads: usize, batches: usize| {
        fake_counter("fake_qz_take_device_peak");
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    let mut c = open_with(1, Provider::Qat, Some(&lib));
                    for _ in 0..batches {
                        compress(c.as_mut(), &zero);
                    }
                });
            }
        });
        (t.elapsed(), fake_counter("fake_qz_take_device_peak"))
    };
    let requests_per_batch = (MAX_BATCH_BYTES / (64 * 1024)) as u32;
    let serial = Duration::from_millis(LATENCY_MS) * requests_per_batch * 2;
    // One caller: its requests go one after another.
    let (one, peak) = run(1, 2);
    println!("1 caller x 2 batches: {one:?}, peak {peak} requests in flight");
    assert!(one >= serial, "one caller took {one:?}, less than {serial:?} of device time");
    assert_eq!(peak, 1);
    // Four callers: 4x the requests over four slots take at least as long as one caller's,
    // and run side by side (timing bounds above that are left to the benchmark: this machine
    // may be busy).
    let (four, peak) = run(4, 2);
    println!("4 callers x 2 batches: {four:?} (serial device time {:?}), peak {peak} in flight", serial * 4);
    assert!(four >= serial, "four callers took {four:?}, less than the device allows ({serial:?})");
    assert!((2..=4).contains(&peak), "peak {peak} requests in flight with 4 callers and 4 slots");
    // Eight callers never get more than four slots.
    let (eight, peak) = run(8, 1);
    println!("8 callers x 1 batch: {eight:?}, peak {peak} in flight");
    assert!(eight >= serial && peak <= 4, "eight callers: {eight:?}, peak {peak}");
}

// ---------------------------------------------------------------------------------------------
// Provider qat over the real QATzip 1.3.1 (software path: no QAT device here)

#[test]
fn real_qatzip_conformance_software_path() {
    let Some(lib) = real_lib() else { return };
    for level in [1, 9] {
        conformance::run_suite(&|| open_with(level, Provider::Qat, Some(&lib)));
    }
    let c = open_with(1, Provider::Qat, Some(&lib));
    assert_eq!(c.info().provider, "qat (software path)");
    assert_eq!(c.max_compressed_len(MAX_BATCH_BYTES), 589904, "qzMaxCompressedLength(512 KiB)");
    // Without a device, auto takes the faster cpu provider.
    assert_eq!(open_with(1, Provider::Auto, Some(&lib)).info().provider, format!("cpu ({})", deflate_backend_name(1)));
}

#[test]
fn real_qatzip_session_recovers_after_each_bad_payload() {
    let Some(lib) = real_lib() else { return };
    let data = sample_text(16 * 4096, 12);
    let mut c = open_with(1, Provider::Qat, Some(&lib));
    let good = compress(c.as_mut(), &data);
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0xFF;
    let cases: [(&str, &[u8], usize); 5] = [
        ("output one page short", &good, data.len() - 4096),
        ("output one page long", &good, data.len() + 4096),
        ("truncated", &good[..good.len() / 2], data.len()),
        ("garbage", &sample_random(3000, 13), data.len()),
        ("flipped byte", &flipped, data.len()),
    ];
    for (what, payload, len) in cases {
        assert!(decompress(c.as_mut(), payload, len).is_err(), "{what}: accepted");
        let back = decompress(c.as_mut(), &good, data.len()).unwrap_or_else(|e| panic!("after {what}: {e}"));
        assert!(back == data, "after {what}: wrong bytes");
    }
}

#[test]
fn real_qatzip_cross_decoding_and_header_bytes() {
    let Some(lib) = real_lib() else { return };
    let text = sample_text(MAX_BATCH_BYTES, 10);
    let random = sample_random(MAX_BATCH_BYTES, 11);
    let zero = vec![0u8; 37 * 4096];
    for level in [1, 5, 9] {
        let mut qat = open_with(level, Provider::Qat, Some(&lib));
        let mut cpu = open_with(level, Provider::Cpu, None);
        for data in [&text, &random, &zero] {
            let from_qat = compress(qat.as_mut(), data);
            let from_cpu = compress(cpu.as_mut(), data);
            // Same header (up to the deflate length) and trailer, byte for byte.
            assert_eq!(from_qat[..20], from_cpu[..20], "level {level}: header");
            assert_eq!(from_qat[from_qat.len() - 8..], from_cpu[from_cpu.len() - 8..], "level {level}: trailer");
            assert_eq!(members(&from_qat), 1);
            assert!(decompress(cpu.as_mut(), &from_qat, data.len()).unwrap() == *data, "cpu decodes QATzip");
            assert!(decompress(qat.as_mut(), &from_cpu, data.len()).unwrap() == *data, "QATzip decodes cpu");
            // A standard single-member gzip decoder reads QATzip's payload too.
            let mut back = vec![0u8; data.len()];
            libdeflater::Decompressor::new().gzip_decompress(&from_qat, &mut back).unwrap();
            assert!(back == *data);
        }
    }
    // QATzip decodes a multi-member payload (as its hardware path writes) from the cpu side.
    let mut cpu = open_with(1, Provider::Cpu, None);
    let (a, b) = text.split_at(3 * 65536);
    let mut payload = compress(cpu.as_mut(), a);
    payload.extend(compress(cpu.as_mut(), b));
    let mut qat = open_with(1, Provider::Qat, Some(&lib));
    assert!(decompress(qat.as_mut(), &payload, text.len()).unwrap() == text);
}

// ---------------------------------------------------------------------------------------------
// Measurement (not a test): `cargo test -p pageferry --release [--features isal] --lib
// codec::qatzip::tests::measure -- --ignored --nocapture` — level 1, 512 KiB batches of the
// silesia-like image, one thread; MB/s per CPU-second of that thread (so other load on the
// machine matters little), best of three passes.

fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[test]
#[ignore]
fn measure() {
    const BATCHES: usize = 128; // 64 MiB
    let mut image = vec![0u8; BATCHES * MAX_BATCH_BYTES];
    pageferry_image::fill(pageferry_image::ImageKind::SilesiaLike, pageferry_image::DEFAULT_SEED, 0, &mut image);
    let mut providers: Vec<(String, Box<dyn Codec>)> = vec![("cpu".into(), open_with(1, Provider::Cpu, None))];
    if let Some(lib) = real_lib() {
        providers.push(("QATzip 1.3.1".into(), open_with(1, Provider::Qat, Some(&lib))));
    }
    let bytes = image.len() as f64;
    for (name, mut c) in providers {
        let (mut best_c, mut best_d) = (f64::MAX, f64::MAX);
        let mut out = 0;
        for _ in 0..3 {
            let mut payloads = Vec::with_capacity(BATCHES);
            let t = thread_cpu_secs();
            for batch in image.chunks(MAX_BATCH_BYTES) {
                payloads.push(compress(c.as_mut(), batch));
            }
            best_c = best_c.min(thread_cpu_secs() - t);
            let mut back = vec![0u8; MAX_BATCH_BYTES];
            let t = thread_cpu_secs();
            for p in &payloads {
                c.decompress(p, &mut back).unwrap();
            }
            best_d = best_d.min(thread_cpu_secs() - t);
            out = payloads.iter().map(Vec::len).sum::<usize>();
        }
        println!(
            "{name:>14} [{}]: compress {:6.1} MB/s, decompress {:6.1} MB/s (per CPU-second), ratio {:.3}",
            c.info().provider,
            bytes / best_c / 1e6,
            bytes / best_d / 1e6,
            bytes / out as f64
        );
    }
}

/// `--multifd-compression auto` adds qatzip by itself only when its codec runs on a device
/// (the fake library's simulated one here), the destination decodes it, and the candidates
/// were not named; named, it is a candidate with or without a device.
#[test]
fn auto_adds_qatzip_with_a_device_only() {
    use crate::engine::auto_candidates;
    use crate::engine::policy::{AutoConfig, Candidate};
    use crate::wire::{Capabilities, Features};
    let qatzip: Candidate = "qatzip:1".parse().unwrap();
    let all = Capabilities { methods: Method::all().map(Method::caps).collect(), features: Features { auto: true, ..Features::default() } };
    let spec = |provider| CodecSpec { qatzip: opts(provider, Some(&fake_lib())), ..CodecSpec::default() };
    let cands = |cfg: &AutoConfig, caps: &Capabilities, provider| auto_candidates(cfg, caps, &spec(provider)).0;
    let named = AutoConfig { candidates: vec![qatzip], hardware_candidates: false, ..AutoConfig::default() };
    if std::env::var_os("FAKE_QZ_HW").is_none() {
        // Without a device (the fake library's software path, or the cpu provider): left out
        // unless named.
        assert!(!cands(&AutoConfig::default(), &all, Provider::Qat).contains(&qatzip));
        assert!(!cands(&AutoConfig::default(), &all, Provider::Cpu).contains(&qatzip));
        assert!(cands(&named, &all, Provider::Cpu).contains(&qatzip));
    }
    if !in_child("auto_adds_qatzip_with_a_device_only", &[("FAKE_QZ_HW", "1")]) {
        return;
    }
    // With one: added to the default candidates ...
    let c = cands(&AutoConfig::default(), &all, Provider::Auto);
    assert!(c.contains(&qatzip), "{c:?}");
    assert_eq!(c.len(), AutoConfig::default().candidates.len() + 1, "{c:?}");
    // ... not when the destination does not decode it, nor to a named list without it.
    let no_qatzip = Capabilities { methods: all.methods.iter().filter(|m| m.name != "qatzip").cloned().collect(), ..all.clone() };
    assert!(!cands(&AutoConfig::default(), &no_qatzip, Provider::Auto).contains(&qatzip));
    let zstd_only = AutoConfig { candidates: vec!["zstd:1".parse().unwrap()], hardware_candidates: false, ..AutoConfig::default() };
    assert!(!cands(&zstd_only, &all, Provider::Auto).contains(&qatzip));
}
