//! Two-process migrations over TLS through the `pageferry` binary, and what the operator sees
//! when a peer is refused (the library's own tests cover every refusal case in-process).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};

mod common;
use common::{bin, shm_dir, make_image, same_file, fake_qatzip_lib};

fn start_recv(listen: &str, image: &Path, extra: &[&str]) -> (Child, String) {
    start_recv_for(20, listen, image, extra)
}

/// `recv` that gives up after `accept_timeout_s` without an accepted source.
fn start_recv_for(accept_timeout_s: u32, listen: &str, image: &Path, extra: &[&str]) -> (Child, String) {
    let mut child = bin()
        .args(["recv", "--listen", listen, "--json", "--accept-timeout", &accept_timeout_s.to_string()])
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

fn finish(child: Child) -> (bool, String) {
    let (code, err) = finish_code(child);
    (code == Some(0), err)
}

/// The exit status and stderr of a finished `recv`.
fn finish_code(mut child: Child) -> (Option<i32>, String) {
    let code = child.wait().unwrap().code();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (code, err)
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

// ------------------------------------------------------------------------------------------
// Refusals through the binary: a PKI made in the test (rcgen), in the --tls-creds layout.

/// crates/pageferry-cli/src/exit.rs: the peer refused the migration in the handshake.
const EXIT_REFUSED: i32 = 5;

use pageferry_testsupport::pki::{ca, leaf, write, Ca};

/// A creds directory trusting `ca` with one `role` certificate (see [`leaf`]).
fn creds_dir(ca: &Ca, role: &str, cn: &str, sans: &[&str], expired: bool) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "ca-cert.pem", &ca.cert.pem());
    leaf(d.path(), ca, role, cn, sans, expired);
    d
}

fn server_creds(ca: &Ca, expired: bool) -> tempfile::TempDir {
    creds_dir(ca, "server", "dest.example", &["localhost", "127.0.0.1"], expired)
}

fn client_creds(ca: &Ca, cn: &str, expired: bool) -> tempfile::TempDir {
    creds_dir(ca, "client", cn, &[cn], expired)
}

fn arg(d: &tempfile::TempDir) -> &str {
    d.path().to_str().unwrap()
}

const PREVIOUS: &[u8] = b"what the destination image held before\n";

/// The destination image as it was before the refused source: same bytes, no partial file.
fn assert_untouched(dst: &Path) {
    assert_eq!(std::fs::read(dst).unwrap(), PREVIOUS, "a refused source changed the destination image");
    let mut partial = dst.as_os_str().to_owned();
    partial.push(".incomplete");
    assert!(!Path::new(&partial).exists(), "a refused source made {partial:?}");
}

/// `send` was refused: exit status 5 and one line on stderr that contains every `needle`.
fn assert_refused(out: &Output, needles: &[&str]) -> String {
    let e = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(out.status.code(), Some(EXIT_REFUSED), "send: {e}");
    assert_eq!(e.lines().count(), 1, "one line: {e}");
    for n in needles {
        assert!(e.contains(n), "send's line lacks {n:?}: {e}");
    }
    eprintln!("send: {e}");
    e
}

/// A source with `bad` flags is refused (send exits 5 with one line containing `src_says`);
/// the destination image is untouched; recv reports the refused peer in one line containing
/// `dst_says`, keeps listening, and a source with `good` flags then migrates byte-identical.
fn refused_then_right_source(recv_tls: &[&str], bad: &[&str], good: &[&str], src_says: &[&str], dst_says: &[&str]) {
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, "8M");
    std::fs::write(&dst, PREVIOUS).unwrap();
    let (recv, addr) = start_recv("127.0.0.1:0", &dst, recv_tls);
    assert_refused(&send(&addr, &src, bad), src_says);
    assert_untouched(&dst);
    let s = send(&addr, &src, good);
    assert!(s.status.success(), "the right source after a refused one: {}", String::from_utf8_lossy(&s.stderr));
    let (ok, err) = finish(recv);
    assert!(ok, "recv: {err}");
    assert!(same_file(&src, &dst), "destination differs");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line for the refused peer: {err}");
    assert!(lines[0].starts_with("pageferry: refused connection from 127.0.0.1:"), "{err}");
    for n in dst_says {
        assert!(lines[0].contains(n), "recv's line lacks {n:?}: {err}");
    }
    eprintln!("recv: {err}");
}

/// Only a refused source comes: send exits 5 with `src_says`; recv reports it, keeps
/// listening until its accept timeout, then exits 5 itself with a last line naming the
/// refusal (`dst_says`); the destination image is untouched.
fn refused_and_nobody_else(recv_tls: &[&str], bad: &[&str], src_says: &[&str], dst_says: &[&str]) {
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, "4M");
    std::fs::write(&dst, PREVIOUS).unwrap();
    let (recv, addr) = start_recv_for(2, "127.0.0.1:0", &dst, recv_tls);
    assert_refused(&send(&addr, &src, bad), src_says);
    let (code, err) = finish_code(recv);
    assert_eq!(code, Some(EXIT_REFUSED), "recv: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "the refused peer, then why recv ends: {err}");
    assert!(lines[0].starts_with("pageferry: refused connection from 127.0.0.1:"), "{err}");
    assert!(lines[1].starts_with("pageferry recv: error:") && lines[1].contains("refused 1 connection(s)"), "{err}");
    for n in dst_says {
        assert!(lines[0].contains(n) && lines[1].contains(n), "recv's lines lack {n:?}: {err}");
    }
    eprintln!("recv: {err}");
    assert_untouched(&dst);
}

#[test]
fn client_certificate_outside_tls_authz_is_refused_and_an_authorized_one_migrates() {
    let ca = ca("test CA");
    let (srv, intruder, allowed) = (server_creds(&ca, false), client_creds(&ca, "intruder.example", false), client_creds(&ca, "allowed.example", false));
    let recv_tls = ["--tls-creds", arg(&srv), "--tls-authz", "CN=allowed.example"];
    refused_then_right_source(
        &recv_tls,
        &["--tls-creds", arg(&intruder)],
        &["--tls-creds", arg(&allowed)],
        &["refused our credentials", "--tls-authz"],
        &["CN=intruder.example", "--tls-authz"],
    );
    refused_and_nobody_else(&recv_tls, &["--tls-creds", arg(&intruder)], &["--tls-authz"], &["CN=intruder.example", "--tls-authz"]);
}

#[test]
fn tls_hostname_not_in_the_server_certificate_is_refused_and_the_default_works() {
    let ca = ca("test CA");
    let (srv, cli) = (server_creds(&ca, false), client_creds(&ca, "source.example", false));
    refused_then_right_source(
        &["--tls-creds", arg(&srv)],
        &["--tls-creds", arg(&cli), "--tls-hostname", "wrong.example"],
        // Default: the host of --connect (127.0.0.1, a SAN of the server certificate).
        &["--tls-creds", arg(&cli)],
        &["not valid for the name \"wrong.example\"", "--tls-hostname"],
        &["refused our credentials", "--tls-hostname"],
    );
}

#[test]
fn expired_client_certificate_is_refused_on_both_sides() {
    let ca = ca("test CA");
    let (srv, old, cli) = (server_creds(&ca, false), client_creds(&ca, "source.example", true), client_creds(&ca, "source.example", false));
    refused_then_right_source(&["--tls-creds", arg(&srv)], &["--tls-creds", arg(&old)], &["--tls-creds", arg(&cli)], &["expired"], &["has expired"]);
}

#[test]
fn expired_server_certificate_is_refused_on_both_sides() {
    let ca = ca("test CA");
    let (stale, cli) = (server_creds(&ca, true), client_creds(&ca, "source.example", false));
    refused_and_nobody_else(&["--tls-creds", arg(&stale)], &["--tls-creds", arg(&cli)], &["certificate has expired"], &["expired"]);
}

#[test]
fn wrong_pre_shared_key_is_refused_on_both_sides() {
    let (right, wrong) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let right = psk_file(right.path(), "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff");
    let wrong = psk_file(wrong.path(), "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100");
    let (right, wrong) = (right.to_str().unwrap(), wrong.to_str().unwrap());
    refused_then_right_source(&["--tls-psk", right], &["--tls-psk", wrong], &["--tls-psk", right], &["pre-shared key"], &["pre-shared key"]);
    refused_and_nobody_else(&["--tls-psk", right], &["--tls-psk", wrong], &["pre-shared key"], &["pre-shared key"]);
}
