//! The machine interface: exit statuses per failure class and `send --events` (JSON lines).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Output, Stdio};

mod common;
use common::bin;

fn image(dir: &Path, size: &str) -> std::path::PathBuf {
    let path = dir.join("src.img");
    let out = bin().args(["image", "--size", size]).arg(&path).output().unwrap();
    assert!(out.status.success(), "image: {}", String::from_utf8_lossy(&out.stderr));
    path
}

/// A destination on an ephemeral port: (process, its address, its stdout after the first line).
fn recv(dir: &Path, extra: &[&str]) -> (Child, String, BufReader<ChildStdout>) {
    let mut child = bin().args(["recv", "--listen", "127.0.0.1:0", "--image"]).arg(dir.join("dst.img")).args(extra).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("recv said {line:?}")).to_string();
    (child, addr, out)
}

fn send(addr: &str, src: &Path, extra: &[&str]) -> Output {
    bin().args(["send", "--quiet", "--connect", addr, "--image"]).arg(src).args(extra).output().unwrap()
}

fn events(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

#[test]
fn events_follow_qemus_statuses_and_end_with_the_report() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let src = image(dir.path(), "16M");
    let (mut d, addr, _out) = recv(dir.path(), &["--multifd-compression", "zstd"]);
    // A writer, so there is at least one pre-copy round before the switchover.
    let out = send(&addr, &src, &["--multifd-compression", "zstd", "--events", "--dirty-rate", "20MB", "--dirty-set", "4M"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.wait().unwrap().success());
    let ev = events(&out);
    for e in &ev {
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000, "{e}");
    }
    let statuses: Vec<&str> = ev.iter().filter(|e| e["event"] == "MIGRATION").map(|e| e["data"]["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["setup", "active", "pre-switchover", "device", "completed"]);
    // Passes count from 1, one per round, the last one while the source is paused.
    let passes: Vec<u64> = ev.iter().filter(|e| e["event"] == "MIGRATION_PASS").map(|e| e["data"]["pass"].as_u64().unwrap()).collect();
    let rounds: Vec<&serde_json::Value> = ev.iter().filter(|e| e["event"] == "MIGRATION_ROUND").map(|e| &e["data"]).collect();
    assert!(!rounds.is_empty());
    assert_eq!(passes, (1..=rounds.len() as u64 + 1).collect::<Vec<_>>());
    assert_eq!(rounds[0]["pages"], 4096, "round 0 sends all memory");
    for r in &rounds {
        assert!(r["seconds"].as_f64().unwrap() > 0.0 && r["raw_bytes_per_s"].as_f64().unwrap() > 0.0 && r["wire_bytes"].as_u64().unwrap() > 0, "{r}");
    }
    let last = ev.last().unwrap();
    let report = &last["data"]["report"];
    assert_eq!(report["status"], "completed");
    assert_eq!(report["rounds"].as_u64().unwrap(), passes.len() as u64);
    assert_eq!(report["pages_per_round"][0], 4096);
}

#[test]
fn exit_status_names_the_failure_class() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let src = image(dir.path(), "16M");

    // 1: a local failure (no such image).
    assert_eq!(send("127.0.0.1:1", &dir.path().join("missing.img"), &[]).status.code(), Some(1));
    // 2: a bad command line.
    assert_eq!(bin().args(["send", "--no-such-flag"]).output().unwrap().status.code(), Some(2));

    // 6: network (nobody listens); with --events the last line says the same.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = send(&format!("127.0.0.1:{port}"), &src, &["--events"]);
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
    let ev = events(&out);
    assert_eq!(ev.first().unwrap()["data"]["status"], "setup");
    assert_eq!(ev.last().unwrap()["data"]["status"], "failed");
    assert_eq!(ev.last().unwrap()["data"]["exit_code"], 6);
    assert!(ev.last().unwrap()["data"]["error"].as_str().unwrap().contains("cannot connect"));

    // 5: refused in the handshake, on both sides (recv once its --accept-timeout has passed
    // with no other source).
    let (mut d, addr, _out) = recv(dir.path(), &["--multifd-compression", "zlib", "--accept-timeout", "2"]);
    let out = send(&addr, &src, &["--multifd-compression", "zstd"]);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.wait().unwrap().code(), Some(5));

    // 7: protocol: a "destination" that answers with garbage.
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap().to_string();
    let garbage = std::thread::spawn(move || {
        let (mut s, _) = fake.accept().unwrap();
        let mut hello = [0u8; 16];
        let _ = s.read(&mut hello);
        let _ = s.write_all(&[0xEE; 256]);
        std::thread::sleep(std::time::Duration::from_millis(500));
    });
    let out = send(&addr, &src, &[]);
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    garbage.join().unwrap();

    // 8: not converged (the guest dirties faster than a capped link drains).
    let (mut d, addr, _out) = recv(dir.path(), &[]);
    let out = send(&addr, &src, &["--dirty-rate", "50MB", "--dirty-set", "4M", "--downtime-limit", "1", "--max-rounds", "2", "--max-bandwidth", "20MB", "--events"]);
    assert_eq!(out.status.code(), Some(8), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(events(&out).last().unwrap()["data"]["exit_code"], 8);
    assert!(!d.wait().unwrap().success());
}

#[test]
fn postcopy_reports_postcopy_active_between_active_and_completed() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let src = image(dir.path(), "16M");
    let (mut d, addr, _out) = recv(dir.path(), &["--no-verify"]);
    // Capped so the first round cannot already fit the downtime limit (then pre-copy would
    // complete, as QEMU does when the rest fits before postcopy starts).
    let out = send(&addr, &src, &["--events", "--postcopy-after-rounds", "1", "--no-verify", "--dirty-rate", "50MB", "--dirty-set", "4M", "--downtime-limit", "1", "--max-bandwidth", "20MB"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.wait().unwrap().success());
    let ev = events(&out);
    let statuses: Vec<&str> = ev.iter().filter(|e| e["event"] == "MIGRATION").map(|e| e["data"]["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["setup", "active", "postcopy-active", "completed"]);
}

#[test]
fn recv_events_follow_qemus_statuses_and_end_with_the_report() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let src = image(dir.path(), "8M");
    let mut d = bin()
        .args(["recv", "--listen", "127.0.0.1:0", "--events", "--image"])
        .arg(dir.path().join("dst.img"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(d.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let listening: serde_json::Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("not JSON ({e}): {first}"));
    assert_eq!(listening["event"], "LISTENING", "{first}");
    let addr = listening["data"]["address"].as_str().unwrap().to_string();
    let s = send(&addr, &src, &[]);
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    assert!(d.wait().unwrap().success());
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let ev: Vec<serde_json::Value> = rest.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let statuses: Vec<&str> = ev.iter().filter(|e| e["event"] == "MIGRATION").map(|e| e["data"]["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["setup", "active", "device", "completed"]);
    let report = &ev.last().unwrap()["data"]["report"];
    assert!(report["pages"].as_u64().unwrap() >= 2048, "all 2048 pages: {report}");
    assert_eq!(report["verified"], true);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(dir.path().join("dst.img")).unwrap());
}
