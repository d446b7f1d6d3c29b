//! Two-process migrations over TLS through the `pageferry` binary, and what the operator sees
//! when a peer is refused (the library's own tests cover every refusal case in-process).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pageferry"))
}

fn shm_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("pageferry-tls-test").tempdir_in("/dev/shm").unwrap()
}

fn make_image(path: &Path, size: &str) {
    let out = bin().args(["image", "--size", size]).arg(path).output().unwrap();
    assert!(out.status.success(), "image: {}", String::from_utf8_lossy(&out.stderr));
}

fn start_recv(listen: &str, image: &Path, extra: &[&str]) -> (Child, String) {
    let mut child = bin()
        .args(["recv", "--listen", listen, "--json", "--accept-timeout", "20"])
        .arg("--image")
        .arg(image)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("recv said {line:?}")).to_string();
    // Keep draining stdout so the child never blocks on it.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    (child, addr)
}

fn send(addr: &str, image: &Path, extra: &[&str]) -> Output {
    bin().args(["send", "--quiet", "--json", "--connect", addr]).arg("--image").arg(image).args(extra).output().unwrap()
}

fn finish(mut child: Child) -> (bool, String) {
    let ok = child.wait().unwrap().success();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (ok, err)
}

fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// Throwaway x509 credentials in the --tls-creds layout (one directory serves both sides).
fn x509() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    pageferry::transport::creds::write_throwaway_x509(d.path(), &["localhost", "127.0.0.1"]).unwrap();
    d
}

fn psk_file(dir: &Path, key_hex: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("keys.psk");
    std::fs::write(&p, format!("qemu:{key_hex}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// The fake QATzip library next to the binary (built once when missing).
fn fake_qatzip_lib() -> PathBuf {
    use std::sync::OnceLock;
    static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let profile_dir = Path::new(env!("CARGO_BIN_EXE_pageferry")).parent().ok_or("unexpected binary location")?;
        pageferry_testsupport::locate_or_build(profile_dir)
    })
    .clone()
    .unwrap_or_else(|e| panic!("fake QATzip library: {e}"))
}

fn every_method() -> Vec<Vec<String>> {
    let fake = fake_qatzip_lib().display().to_string();
    let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        m(&["--multifd-compression", "none"]),
        m(&["--multifd-compression", "zlib"]),
        m(&["--multifd-compression", "zstd"]),
        m(&["--multifd-compression", "qatzip", "--qatzip-provider", "qat", "--qatzip-lib", &fake]),
    ]
}

/// Migrate a 12 MiB image with every method, `tls` flags on both sides.
fn every_method_over(recv_tls: &[&str], send_tls: &[&str]) {
    for method in every_method() {
        let method: Vec<&str> = method.iter().map(String::as_str).collect();
        let dir = shm_dir();
        let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
        make_image(&src, "12M");
        let (recv, addr) = start_recv("127.0.0.1:0", &dst, &[&method[..], recv_tls].concat());
        let s = send(&addr, &src, &[&method[..], send_tls].concat());
        let (ok, err) = finish(recv);
        assert!(s.status.success(), "{method:?}: send failed: {}", String::from_utf8_lossy(&s.stderr));
        assert!(ok, "{method:?}: recv failed: {err}");
        let r: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
        assert_eq!(r["transport"], "TLS 1.3 AES_128_GCM_SHA256", "{method:?}");
        assert_eq!(r["verified"], true);
        assert!(same_file(&src, &dst), "{method:?}: destination differs");
        assert!(err.is_empty(), "{method:?}: recv complained: {err}");
    }
}

#[test]
fn x509_mutual_tls_every_method_two_processes() {
    let creds = x509();
    let c = creds.path().to_str().unwrap();
    every_method_over(&["--tls-creds", c], &["--tls-creds", c]);
}

#[test]
fn psk_every_method_two_processes() {
    let d = tempfile::tempdir().unwrap();
    let f = psk_file(d.path(), "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff");
    let f = f.to_str().unwrap();
    every_method_over(&["--tls-psk", f], &["--tls-psk", f, "--tls-psk-identity", "qemu"]);
}

#[test]
fn refused_peer_gets_one_line_on_both_sides_and_recv_keeps_listening() {
    let creds = x509();
    let c = creds.path().to_str().unwrap();
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, "8M");
    let (recv, addr) = start_recv("127.0.0.1:0", &dst, &["--tls-creds", c]);
    // A plaintext source, then a source with the wrong pre-shared credentials.
    let plain = send(&addr, &src, &[]);
    assert!(!plain.status.success());
    let e = String::from_utf8_lossy(&plain.stderr);
    assert!(e.contains("requires TLS") && e.trim().lines().count() == 1, "{e}");
    let k = tempfile::tempdir().unwrap();
    let f = psk_file(k.path(), "ffeeddccbbaa99887766554433221100");
    let wrong = send(&addr, &src, &["--tls-psk", f.to_str().unwrap()]);
    assert!(!wrong.status.success());
    assert_eq!(String::from_utf8_lossy(&wrong.stderr).trim().lines().count(), 1, "{}", String::from_utf8_lossy(&wrong.stderr));
    // The right one.
    let s = send(&addr, &src, &["--tls-creds", c]);
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let (ok, err) = finish(recv);
    assert!(ok, "{err}");
    assert!(same_file(&src, &dst));
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "one line per refused peer: {err}");
    assert!(lines.iter().all(|l| l.starts_with("pageferry: refused connection from 127.0.0.1:")), "{err}");
    assert!(lines[0].contains("does not speak TLS"), "{err}");
}

#[test]
fn recv_refuses_a_non_loopback_address_without_tls_unless_insecure() {
    let dir = shm_dir();
    let dst = dir.path().join("dst.img");
    let out = bin().args(["recv", "--listen", "0.0.0.0:0"]).arg("--image").arg(&dst).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("refusing to listen on 0.0.0.0:0 without TLS") && e.contains("--insecure") && e.trim().lines().count() == 1, "{e}");
    assert!(out.stdout.is_empty(), "nothing listened");
    // --insecure: it listens (and gives up quickly, nobody connects).
    let out = bin().args(["recv", "--listen", "0.0.0.0:0", "--insecure", "--accept-timeout", "1"]).arg("--image").arg(&dst).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("listening on 0.0.0.0:"), "{}", String::from_utf8_lossy(&out.stderr));
    // TLS credentials: allowed.
    let creds = x509();
    let out = bin().args(["recv", "--listen", "0.0.0.0:0", "--accept-timeout", "1", "--tls-creds"]).arg(creds.path()).arg("--image").arg(&dst).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("listening on 0.0.0.0:"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn demo_runs_over_tls() {
    let out = bin().args(["demo", "--size", "16M", "--dirty-rate", "0", "--tls", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["status"], "completed");
    assert!(r["verified_by"].as_str().unwrap().starts_with("yes, by the demo"), "{}", r["verified_by"]);
    assert_eq!(r["transport"], "TLS 1.3 AES_128_GCM_SHA256");
}
