//! Two-process migrations through the `pageferry` binary over loopback TCP.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

mod common;
use common::{bin, shm_dir, make_image, same_file};

/// Start `pageferry recv` and return it with the address it listens on.
fn start_recv(image: &Path, extra: &[&str]) -> (Child, String, BufReader<std::process::ChildStdout>) {
    start_recv_within(image, 20, extra)
}

/// [`start_recv`] with `--accept-timeout ACCEPT_S` (short where only refused sources come).
fn start_recv_within(image: &Path, accept_s: u64, extra: &[&str]) -> (Child, String, BufReader<std::process::ChildStdout>) {
    let mut child = bin()
        .args(["recv", "--listen", "127.0.0.1:0", "--json", "--accept-timeout", &accept_s.to_string()])
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
    (child, addr, out)
}

fn send(addr: &str, image: &Path, extra: &[&str]) -> Output {
    bin().args(["send", "--quiet", "--json", "--connect", addr]).arg("--image").arg(image).args(extra).output().unwrap()
}

fn finish_recv(mut child: Child, mut out: BufReader<std::process::ChildStdout>) -> (bool, String, String) {
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status.success(), rest, err)
}

fn report(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "send failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("send --json prints one JSON object")
}

fn migrate_image(method: &[&str], size: &str) -> (serde_json::Value, PathBuf, PathBuf, tempfile::TempDir) {
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, size);
    let (recv, addr, out) = start_recv(&dst, method);
    let s = send(&addr, &src, method);
    let (ok, _, err) = finish_recv(recv, out);
    assert!(ok, "recv failed: {err}");
    (report(&s), src, dst, dir)
}

#[test]
fn each_method_migrates_an_image_byte_identical() {
    for method in [
        &["--multifd-compression", "none"][..],
        &["--multifd-compression", "zlib", "--multifd-zlib-level", "1"],
        &["--multifd-compression", "zstd", "--multifd-zstd-level", "3"],
        // A fast (negative) level, as a separate argument.
        &["--multifd-compression", "zstd", "--multifd-zstd-level", "-5"],
        &["--multifd-compression", "qatzip", "--qatzip-provider", "cpu"],
    ] {
        let (r, src, dst, _dir) = migrate_image(method, "24M");
        assert!(same_file(&src, &dst), "{method:?}: destination differs");
        assert_eq!(r["status"], "completed");
        assert_eq!(r["verified"], true);
        assert_eq!(r["method"], method[1]);
        assert_eq!(r["memory_bytes"], 24 << 20);
        assert!(r["recv_cpu_s"].as_f64().unwrap() > 0.0);
        if let (true, Some(level)) = (method.get(2).is_some_and(|f| f.ends_with("-level")), method.get(3)) {
            assert_eq!(r["level"], level.parse::<i64>().unwrap(), "{method:?}");
        }
        if method[1] != "none" {
            // zstd's fast levels trade ratio for speed.
            let least = if method.get(3) == Some(&"-5") { 1.5 } else { 2.0 };
            assert!(r["ratio"].as_f64().unwrap() > least, "{method:?}: ratio {}", r["ratio"]);
        }
    }
}

#[test]
fn a_destination_told_no_method_decodes_what_the_source_sends_and_auto_reports_its_choices() {
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, "24M");
    for method in [&["--multifd-compression", "zstd"][..], &["--multifd-compression", "auto", "--max-bandwidth", "200mbit", "--max-cpu", "1"]] {
        let (recv, addr, out) = start_recv(&dst, &[]);
        let s = send(&addr, &src, method);
        let (ok, _, err) = finish_recv(recv, out);
        assert!(ok, "{method:?}: recv failed: {err}");
        assert!(same_file(&src, &dst), "{method:?}: destination differs");
        let r = report(&s);
        assert_eq!(r["method"], method[1]);
        if method[1] == "auto" {
            let shares = r["auto"]["shares"].as_array().unwrap();
            let batches: u64 = shares.iter().map(|s| s["batches"].as_u64().unwrap()).sum();
            assert_eq!(batches, 48, "every 512 KiB batch of 24 MiB was planned by auto: {shares:?}");
            assert!(r["auto"]["last_reason"].as_str().unwrap().contains("link"), "{}", r["auto"]);
        }
    }
    // auto's flags need auto.
    let out = bin().args(["send", "--connect", "x:1", "--image", "/nonexistent", "--max-cpu", "2"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("need --multifd-compression auto"));
}

#[test]
fn dirtied_source_ends_equal_on_the_destination() {
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, "64M");
    let m = ["--multifd-compression", "zstd"];
    let (recv, addr, out) = start_recv(&dst, &m);
    let s = send(&addr, &src, &[&m[..], &["--dirty-rate", "40MB", "--dirty-set", "16M", "--downtime-limit", "50"]].concat());
    let (ok, _, err) = finish_recv(recv, out);
    assert!(ok, "recv failed: {err}");
    let r = report(&s);
    assert_eq!(r["dirty_tracker"], "uffd-wp");
    assert!(r["rounds"].as_u64().unwrap() >= 2);
    // The writer stopped at switchover: the source file is the final memory.
    assert!(same_file(&src, &dst), "destination differs from the source's final memory");
}

#[test]
fn unreachable_peer_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = shm_dir();
    let src = dir.path().join("src.img");
    make_image(&src, "1M");
    let out = bin().args(["send", "--quiet", "--connect", &format!("127.0.0.1:{port}")]).arg("--image").arg(&src).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to 127.0.0.1"), "{err}");
}

/// The lines of `recv`'s stderr that report a refused peer.
fn refusal_lines(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.starts_with("pageferry: refused connection from 127.0.0.1:")).collect()
}

#[test]
fn method_mismatch_is_refused_and_both_sides_say_why() {
    // Only the wrong source comes: recv reports it, waits out its --accept-timeout, then
    // exits 5 naming the refusal.
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, "1M");
    let (mut recv, addr, out) = start_recv_within(&dst, 2, &["--multifd-compression", "zlib"]);
    let s = send(&addr, &src, &["--multifd-compression", "zstd"]);
    let code = recv.wait().unwrap().code();
    let (_, _, recv_err) = finish_recv(recv, out);
    assert_eq!(s.status.code(), Some(5), "refused in the handshake");
    assert_eq!(code, Some(5), "recv: {recv_err}");
    let send_err = String::from_utf8_lossy(&s.stderr);
    let reason = "compression method mismatch: source uses zstd, destination expects zlib";
    assert!(send_err.contains(reason), "source said: {send_err}");
    let refused = refusal_lines(&recv_err);
    assert!(refused.len() == 1 && refused[0].ends_with(reason), "destination said: {recv_err}");
    let last = recv_err.lines().last().unwrap_or_default();
    assert!(last.starts_with("pageferry recv: error:") && last.contains("no source accepted within 2s: refused 1 connection(s)") && last.ends_with(reason), "{recv_err}");
    assert!(!dst.exists() && !dir.path().join("dst.img.incomplete").exists());
}

#[test]
fn wrong_method_source_is_refused_and_the_right_one_then_migrates() {
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, "4M");
    let (recv, addr, out) = start_recv(&dst, &["--multifd-compression", "zlib"]);
    let wrong = send(&addr, &src, &["--multifd-compression", "zstd"]);
    assert_eq!(wrong.status.code(), Some(5), "{}", String::from_utf8_lossy(&wrong.stderr));
    let reason = "compression method mismatch: source uses zstd, destination expects zlib";
    assert!(String::from_utf8_lossy(&wrong.stderr).contains(reason));
    assert!(!dir.path().join("dst.img.incomplete").exists(), "the refused source made a partial image");
    // The same recv, still listening.
    let right = send(&addr, &src, &["--multifd-compression", "zlib"]);
    assert!(report(&right)["verified"].as_bool().unwrap());
    let (ok, rest, err) = finish_recv(recv, out);
    assert!(ok, "recv after a refused source: {err}");
    assert!(rest.contains("\"verified\":true"), "{rest}");
    let refused = refusal_lines(&err);
    assert!(refused.len() == 1 && refused[0].ends_with(reason), "one line for the refused source: {err}");
    assert!(same_file(&src, &dst), "destination differs from the right source");
}

#[test]
fn bad_flags_are_rejected_with_a_message() {
    let out = bin().args(["send", "--connect", "x:1", "--image", "/nonexistent", "--multifd-compression", "lz4"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown compression method 'lz4'"));
    let out = bin().args(["send", "--connect", "x:1", "--image", "/nonexistent", "--multifd-compression", "zstd", "--multifd-zstd-level", "25"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("level 25 out of range"));
    let out = bin().args(["send", "--connect", "x:1", "--image", "/nonexistent", "--multifd-compression", "zstd", "--multifd-zstd-level", "-21"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("zstd level -21 out of range -20..=19"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bin().args(["send", "--connect", "x:1", "--image", "/nonexistent", "--multifd-compression", "zlib", "--multifd-zlib-level=-1"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("zlib level -1 out of range 1..=9"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bin().args(["send", "--connect", "x:1", "--image", "/nonexistent", "--max-bandwidth", "fast"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad bandwidth"));
    let out = bin().args(["send", "--connect", "x:1", "--image", "/nonexistent"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));
}

#[test]
fn demo_runs_end_to_end_on_a_small_guest() {
    let dir = shm_dir();
    let out = bin().args(["demo", "--size", "48M", "--dirty-rate", "20MB", "--dirty-set", "8M", "--json"]).arg("--dir").arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "demo failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["status"], "completed");
    assert_eq!(r["verified"], false, "the in-band digest was off");
    assert!(r["verified_by"].as_str().unwrap().starts_with("yes, by the demo: the destination file equals"), "{}", r["verified_by"]);
    assert_eq!(r["method"], "zstd");
    assert_eq!(r["channels"], 2);
    // Files are cleaned up.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// The real QATzip 1.3.1, unpacked by the project's script; None (with the reason printed)
/// when it cannot be fetched.
fn real_qatzip() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let lib = root.join(".qatzip/usr/lib/x86_64-linux-gnu/libqatzip.so.3");
    if !lib.exists() {
        let out = Command::new("bash").arg(root.join("scripts/fetch-qatzip.sh")).output().unwrap();
        if !out.status.success() {
            eprintln!("skipping: QATzip could not be fetched: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
    }
    Some(lib)
}

#[test]
fn qatzip_level_2_through_the_real_library_two_processes() {
    // The analogue of QEMU's /migration/multifd/tcp/plain/qatzip: the library's software path.
    let Some(lib) = real_qatzip() else { return };
    let lib = lib.to_str().unwrap();
    let q = ["--multifd-compression", "qatzip", "--multifd-qatzip-level", "2", "--qatzip-provider", "qat", "--qatzip-lib", lib];
    let (r, src, dst, _dir) = migrate_image(&q, "16M");
    assert!(same_file(&src, &dst));
    assert_eq!(r["provider"], "qat (software path)");
    assert_eq!(r["recv_provider"], "qat (software path)");
    assert_eq!(r["level"], 2);
    assert!(r["ratio"].as_f64().unwrap() > 2.0);

    // Cross-decoding across processes: a cpu sender to a QATzip receiver, and back.
    for (send_p, recv_p) in [("cpu", "qat"), ("qat", "cpu")] {
        let dir = shm_dir();
        let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
        make_image(&src, "8M");
        fn side<'a>(p: &'a str, lib: &'a str) -> Vec<&'a str> {
            vec!["--multifd-compression", "qatzip", "--qatzip-provider", p, "--qatzip-lib", lib]
        }
        let (recv, addr, out) = start_recv(&dst, &side(recv_p, lib));
        let s = send(&addr, &src, &side(send_p, lib));
        let (ok, _, err) = finish_recv(recv, out);
        assert!(ok, "recv ({recv_p}) failed: {err}");
        let r = report(&s);
        assert!(same_file(&src, &dst), "{send_p} -> {recv_p}");
        assert!(r["provider"].as_str().unwrap().starts_with(send_p), "{}", r["provider"]);
        assert!(r["recv_provider"].as_str().unwrap().starts_with(recv_p), "{}", r["recv_provider"]);
    }
}

/// A guest dirtying 4x faster than the link moves (400 MB/s over a 100 MB/s cap, 32 MiB
/// written at random in a 256 MiB image): every round leaves about the whole dirty set
/// (~330 ms at the cap) dirty again, over the 100 ms downtime limit.
const FOUR_X: [&str; 10] = ["--dirty-rate", "400MB", "--dirty-set", "32M", "--max-bandwidth", "100MB", "--downtime-limit", "100", "--max-rounds", "20"];

#[test]
fn dirtying_four_times_faster_than_the_link_does_not_converge_in_pre_copy() {
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, "256M");
    let (recv, addr, out) = start_recv(&dst, &[]);
    let s = send(&addr, &src, &FOUR_X);
    let (ok, _, recv_err) = finish_recv(recv, out);
    assert!(!s.status.success() && !ok);
    let err = String::from_utf8_lossy(&s.stderr);
    assert!(err.contains("did not converge") && err.contains("after 20 rounds") && err.contains("--auto-converge"), "{err}");
    assert!(recv_err.contains("did not converge"), "the destination says why: {recv_err}");
}

#[test]
fn auto_converge_finishes_the_migration_dirtying_four_times_faster_than_the_link() {
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, "256M");
    let (recv, addr, out) = start_recv(&dst, &[]);
    // QEMU's defaults but a step of 20: fewer rounds to reach the throttle this guest needs.
    let s = send(&addr, &src, &[&FOUR_X[..], &["--auto-converge", "--cpu-throttle-increment", "20"]].concat());
    let (ok, _, err) = finish_recv(recv, out);
    assert!(ok, "recv failed: {err}");
    let r = report(&s);
    assert_eq!(r["status"], "completed");
    assert_eq!(r["mechanisms"], serde_json::json!(["pre-copy", "auto-converge"]));
    let throttle: Vec<u64> = r["throttle_pct_per_round"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(throttle.len() as u64, r["rounds"].as_u64().unwrap());
    assert_eq!(throttle[0], 0);
    assert!(throttle.windows(2).all(|w| w[0] <= w[1]), "the throttle only rises: {throttle:?}");
    assert!(throttle.contains(&20) && *throttle.last().unwrap() >= 40, "{throttle:?}");
    // The writer stopped at switchover: the source file is the final memory.
    assert!(same_file(&src, &dst), "destination differs from the source's final memory");
}

/// A tmpfs of `size` mounted on a fresh directory (unmounted on drop), or why not.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir.path()).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn destination_without_room_refuses_in_the_handshake_and_keeps_the_old_image() {
    let fs = match SmallFs::mount("8m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIP destination_without_room: cannot mount a small tmpfs (needs root): {why}");
            return;
        }
    };
    let dir = shm_dir();
    let src = dir.path().join("src.img");
    make_image(&src, "24M");
    let dst = fs.0.path().join("dst.img");
    std::fs::write(&dst, b"an older image").unwrap();
    let small = dir.path().join("small.img");
    make_image(&small, "4M");
    for method in ["none", "zstd"] {
        // Only the source without room comes: refused, recv exits 5 naming path and sizes.
        let (mut recv, addr, out) = start_recv_within(&dst, 2, &["--multifd-compression", method]);
        let s = send(&addr, &src, &["--multifd-compression", method]);
        let code = recv.wait().unwrap().code();
        let (_, _, err) = finish_recv(recv, out);
        let serr = String::from_utf8_lossy(&s.stderr);
        assert!(code != Some(0) && !s.status.success(), "{method}: a destination without room succeeded");
        for e in [&serr[..], &err[..]] {
            assert!(e.contains("dst.img.incomplete") && e.contains("needs 25165824 bytes") && e.contains("free"), "{method}: {e}");
            assert!(!e.contains("Bad address") && !e.contains("signal"), "{method}: {e}");
        }
        assert_eq!(s.status.code(), Some(5), "refused in the handshake");
        assert_eq!(code, Some(5), "{method}: recv ends refused: {err}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"an older image", "{method}: the old image changed");
        assert!(!fs.0.path().join("dst.img.incomplete").exists(), "{method}: a partial image was left behind");
        // The listener stays after a source without room: a smaller one then fits.
        let (recv, addr, out) = start_recv(&dst, &["--multifd-compression", method]);
        let s = send(&addr, &src, &["--multifd-compression", method]);
        assert_eq!(s.status.code(), Some(5), "{method}: {}", String::from_utf8_lossy(&s.stderr));
        assert_eq!(std::fs::read(&dst).unwrap(), b"an older image", "{method}: the old image changed");
        assert!(!fs.0.path().join("dst.img.incomplete").exists(), "{method}: a partial image was left behind");
        report(&send(&addr, &small, &["--multifd-compression", method]));
        let (ok, _, err) = finish_recv(recv, out);
        assert!(ok, "{method}: recv after a source without room: {err}");
        assert_eq!(refusal_lines(&err).len(), 1, "{err}");
        assert!(refusal_lines(&err)[0].contains("needs 25165824 bytes"), "{err}");
        assert!(same_file(&small, &dst), "{method}: the smaller source's image");
        std::fs::write(&dst, b"an older image").unwrap();
    }
}

#[test]
fn a_source_refused_after_its_image_was_reserved_leaves_no_file_and_the_next_one_migrates() {
    // recv reserves IMAGE.incomplete for a Hello that passed every check needing no memory;
    // the postcopy check comes after it (userfaultfd cannot serve a file on a disk file system
    // such as ext4 or xfs). That refusal must remove the file at once and leave the next
    // source's image to be made afresh.
    let dir = tempfile::Builder::new().prefix("pageferry-disk-test").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (src, dst, partial) = (dir.path().join("src.img"), dir.path().join("dst.img"), dir.path().join("dst.img.incomplete"));
    make_image(&src, "4M");
    std::fs::write(&dst, b"an older image").unwrap();
    let (recv, addr, out) = start_recv(&dst, &["--no-verify"]);
    let wrong = send(&addr, &src, &["--no-verify", "--postcopy"]);
    if wrong.status.success() {
        // A file system userfaultfd serves (tmpfs, hugetlbfs): nothing is refused after provide.
        let (ok, _, err) = finish_recv(recv, out);
        assert!(ok, "{err}");
        eprintln!("SKIP a_source_refused_after_its_image_was_reserved: postcopy works on {}", dir.path().display());
        return;
    }
    let werr = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(5), "{werr}");
    assert!(werr.contains("postcopy is not possible on this destination"), "{werr}");
    // Gone before the next source connects: the refusal drops it before recv answers again.
    assert!(!partial.exists(), "the refused source's partial image was left behind");
    assert_eq!(std::fs::read(&dst).unwrap(), b"an older image", "the old image changed");
    let right = send(&addr, &src, &["--no-verify"]);
    report(&right);
    let (ok, _, err) = finish_recv(recv, out);
    assert!(ok, "recv after a source refused after provide: {err}");
    assert!(refusal_lines(&err).len() == 1 && refusal_lines(&err)[0].contains("postcopy is not possible"), "{err}");
    assert!(same_file(&src, &dst), "destination differs from the right source");
    assert!(!partial.exists());
}

#[test]
fn completed_image_replaces_the_old_one_and_a_failed_one_never_does() {
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, "8M");
    std::fs::write(&dst, b"old").unwrap();
    // The source hangs up right after the handshake (wrong flags: refused) -> nothing changes
    // (recv waits out its short --accept-timeout for another source, then ends).
    let (recv, addr, out) = start_recv_within(&dst, 2, &[]);
    let s = send(&addr, &src, &["--no-verify"]);
    let (ok, _, err) = finish_recv(recv, out);
    assert!(!ok && !s.status.success());
    assert!(err.contains("--no-verify"), "{err}");
    assert_eq!(std::fs::read(&dst).unwrap(), b"old");
    assert!(!dir.path().join("dst.img.incomplete").exists());
    // Both sides agree to skip the digest: completes and replaces it.
    let (recv, addr, out) = start_recv(&dst, &["--no-verify"]);
    let s = send(&addr, &src, &["--no-verify"]);
    let (ok, rest, err) = finish_recv(recv, out);
    assert!(ok, "{err}");
    assert!(rest.contains("\"verified\":false"), "{rest}");
    report(&s);
    assert!(same_file(&src, &dst));
    assert!(!dir.path().join("dst.img.incomplete").exists());
}

/// The CLI writer's n-th write (crates/pageferry-cli/src/workload.rs): xorshift64 picks the
/// page, `n` is stamped into every 64th word.
fn replay_writer(image: &mut [u8], from: &serde_json::Value, to: &serde_json::Value) {
    let (mut x, n0, n1, pages) = (from["x"].as_u64().unwrap(), from["n"].as_u64().unwrap(), to["n"].as_u64().unwrap(), from["pages"].as_u64().unwrap());
    for n in n0..n1 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = &mut image[(x % pages) as usize * 4096..][..4096];
        for i in (0..512).step_by(64) {
            page[i * 8..i * 8 + 8].copy_from_slice(&(n ^ (i as u64) << 40).to_le_bytes());
        }
    }
    assert_eq!(x, to["x"].as_u64().unwrap(), "replayed sequence ends where the writer stopped");
}

#[test]
fn postcopy_finishes_the_migration_dirtying_four_times_faster_than_the_link() {
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, "256M");
    // The destination continues the source's writer at once after the switchover: it faults
    // on the pages still on the source and asks for them.
    // (--no-verify: postcopy cannot compare digests; the test compares the files instead.)
    let (recv, addr, out) = start_recv(&dst, &["--resume-writer", "--run-after-ms", "50", "--no-verify"]);
    let s = send(&addr, &src, &[&FOUR_X[..], &["--postcopy"]].concat());
    let (ok, recv_json, err) = finish_recv(recv, out);
    assert!(ok, "recv failed: {err}");
    let r = report(&s);
    assert_eq!(r["status"], "completed");
    assert_eq!(r["mechanisms"], serde_json::json!(["pre-copy", "postcopy"]));
    assert!(r["postcopy_reason"].as_str().unwrap().contains("does not converge"), "{}", r["postcopy_reason"]);
    let pc = &r["postcopy"];
    let (requested, pushed) = (r["postcopy_pages_requested"].as_u64().unwrap(), r["postcopy_pages_pushed"].as_u64().unwrap());
    let discarded = pc["discarded_pages"].as_u64().unwrap();
    assert!(discarded > 1000, "the dirty set was still dirty: {discarded}");
    assert!(requested > 0 && pc["faults"].as_u64().unwrap() > 0, "the destination's writer faulted: {pc}");
    assert!(requested + pushed >= discarded, "every discarded page was sent: {requested} + {pushed} < {discarded}");
    assert!(pc["fault_latency_max_us"].as_f64().unwrap() >= pc["fault_latency_p50_us"].as_f64().unwrap());
    // The destination = the source's final memory plus the writes the writer made there.
    let d: serde_json::Value = serde_json::from_str(recv_json.trim()).unwrap();
    let w = &d["workload"];
    assert!(w["to"]["n"].as_u64().unwrap() > w["from"]["n"].as_u64().unwrap(), "the writer ran on the destination: {w}");
    let mut expected = std::fs::read(&src).unwrap();
    replay_writer(&mut expected, &w["from"], &w["to"]);
    assert!(std::fs::read(&dst).unwrap() == expected, "destination differs from the source's final memory plus the destination's writes");
}

/// A migration slow enough (~40 MB/s over 64 MiB) to be interrupted in the middle.
fn slow_pair(dir: &Path) -> (Child, String, BufReader<std::process::ChildStdout>, Child) {
    let (src, dst) = (dir.join("src.img"), dir.join("dst.img"));
    make_image(&src, "64M");
    std::fs::write(&dst, b"old").unwrap();
    let (recv, addr, out) = start_recv(&dst, &["--stall-timeout", "2"]);
    let send = bin()
        .args(["send", "--quiet", "--json", "--connect", &addr, "--max-bandwidth", "40MB", "--stall-timeout", "2"])
        .arg("--image")
        .arg(&src)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    (recv, addr, out, send)
}

fn signal(child: &Child, sig: i32) -> std::time::Instant {
    // SAFETY: plain kill(2) on our child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
    std::time::Instant::now()
}

fn wait_stderr(mut child: Child) -> (Option<i32>, String, std::time::Instant) {
    let status = child.wait().unwrap();
    let end = std::time::Instant::now();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status.code(), err, end)
}

#[test]
fn sigint_cancels_both_sides_promptly_and_leaves_no_partial_image() {
    for victim in ["source", "destination"] {
        let dir = shm_dir();
        let (recv, _addr, _out, send) = slow_pair(dir.path());
        let sent = if victim == "source" { signal(&send, libc::SIGINT) } else { signal(&recv, libc::SIGTERM) };
        let (rc_send, err_send, end_send) = wait_stderr(send);
        let (rc_recv, err_recv, end_recv) = wait_stderr(recv);
        eprintln!("cancel by the {victim}: send exit {rc_send:?} after {:?}, recv exit {rc_recv:?} after {:?}", end_send - sent, end_recv - sent);
        for (rc, err) in [(rc_send, &err_send), (rc_recv, &err_recv)] {
            assert_eq!(rc, Some(4), "exit code of a cancelled migration: {err}");
            assert!(err.contains(&format!("cancelled by the {victim}")), "{err}");
        }
        for t in [end_send - sent, end_recv - sent] {
            assert!(t <= std::time::Duration::from_secs(2), "cancel took {t:?}");
        }
        assert_eq!(std::fs::read(dir.path().join("dst.img")).unwrap(), b"old", "the old image changed");
        assert!(!dir.path().join("dst.img.incomplete").exists(), "a partial image was left behind");
    }
}

#[test]
fn a_killed_peer_is_detected_promptly_on_the_other_side() {
    for victim in ["source", "destination"] {
        let dir = shm_dir();
        let (recv, _addr, _out, send) = slow_pair(dir.path());
        let (killed, other) = if victim == "source" { (send, recv) } else { (recv, send) };
        let sent = signal(&killed, libc::SIGKILL);
        let _ = wait_stderr(killed);
        let (rc, err, end) = wait_stderr(other);
        eprintln!("{victim} killed: the other side exits {rc:?} after {:?}: {}", end - sent, err.trim());
        // recv names the source's death (a failure, 1); send sees the link broken (network, 6).
        assert_eq!(rc, Some(if victim == "source" { 1 } else { 6 }), "{err}");
        assert!(err.contains(victim) && err.contains("die?"), "{err}");
        assert!(end - sent <= std::time::Duration::from_secs(3), "took {:?}", end - sent);
        assert_eq!(std::fs::read(dir.path().join("dst.img")).unwrap(), b"old");
        if victim == "source" {
            assert!(!dir.path().join("dst.img.incomplete").exists(), "the destination left a partial image");
        }
    }
}

#[test]
fn a_destination_stopped_for_a_second_is_not_a_failure() {
    // SIGSTOP then SIGCONT (1 s, under the 2 s stall timeout): blocked reads come back with
    // EINTR, which is retried; the migration completes byte-identical.
    let dir = shm_dir();
    let (recv, _addr, out, send) = slow_pair(dir.path());
    signal(&recv, libc::SIGSTOP);
    std::thread::sleep(std::time::Duration::from_secs(1));
    signal(&recv, libc::SIGCONT);
    let o = send.wait_with_output().unwrap();
    let (ok, _, err) = finish_recv(recv, out);
    assert!(ok, "recv failed after SIGSTOP/SIGCONT: {err}");
    report(&o);
    assert!(same_file(&dir.path().join("src.img"), &dir.path().join("dst.img")));
}

#[test]
fn recv_timeout_ends_the_migration_tells_the_source_and_keeps_the_old_image() {
    // 16 MiB at 2 MB/s takes ~8 s; recv allows 1 s from the accepted handshake.
    let dir = shm_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    make_image(&src, "16M");
    std::fs::write(&dst, b"old").unwrap();
    let (recv, addr, _out) = start_recv(&dst, &["--timeout", "1"]);
    let t0 = std::time::Instant::now();
    let s = send(&addr, &src, &["--max-bandwidth", "2MB"]);
    let (rc, err, end) = wait_stderr(recv);
    eprintln!("recv --timeout 1: recv exit {rc:?} after {:?}, send exit {:?}: {}", end - t0, s.status.code(), String::from_utf8_lossy(&s.stderr).trim());
    // Generous: the timeout ended it, not the ~8 s transfer or the 30 s stall timeout.
    assert!(t0.elapsed() < std::time::Duration::from_secs(6), "took {:?}", t0.elapsed());
    assert_eq!(rc, Some(8), "recv exits with the timeout's status (crates/pageferry-cli/src/exit.rs): {err}");
    assert!(err.contains("timed out after 1 s (the destination's --timeout)"), "{err}");
    let serr = String::from_utf8_lossy(&s.stderr);
    assert_eq!(s.status.code(), Some(1), "the source: the peer aborted: {serr}");
    assert!(serr.contains("peer aborted") && serr.contains("the destination's --timeout"), "the source hears why: {serr}");
    assert_eq!(std::fs::read(&dst).unwrap(), b"old", "the old image changed");
    assert!(!dir.path().join("dst.img.incomplete").exists(), "a partial image was left behind");
}
