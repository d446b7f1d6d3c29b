//! `pageferry vm demo`: a running KVM guest migrated live between two processes.

use std::process::Command;

fn kvm_usable() -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipping: cannot open /dev/kvm: {e}");
            false
        }
    }
}

fn live_migrate(method: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_pageferry"))
        .args(["vm", "demo", "--json", "--verify", "--multifd-compression", method, "--mem", "128M", "--working-set", "8M", "--downtime-limit", "20"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{method}: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (s, d) = (&r["source"], &r["destination"]);
    // Memory equal at switchover: the engine compared digests of both sides before resuming.
    assert_eq!(s["engine"]["verified"], true, "{method}");
    assert_eq!(s["engine"]["method"], method);
    assert_eq!(s["engine"]["dirty_tracker"], "kvm-dirty-log+vm-memory-bitmap");
    // Counter continuity: the destination's memory holds the counter the source stopped at,
    // and the guest goes on from there.
    let paused = s["counter_at_pause"].as_u64().unwrap();
    assert!(paused >= 1000, "the guest ran before the migration");
    assert_eq!(d["counter_at_restore"].as_u64().unwrap(), paused, "{method}: counter continuity");
    assert!(d["first_counter_after_resume"].as_u64().unwrap() > paused);
    assert!(d["counter_after_run"].as_u64().unwrap() > paused);
    assert_eq!(d["stamps_ok"], true, "{method}: every page's stamp matches the guest's write sequence");
    assert!(d["downtime_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn live_guest_migrates_with_zstd() {
    if kvm_usable() {
        live_migrate("zstd");
    }
}

#[test]
fn live_guest_migrates_with_none() {
    if kvm_usable() {
        live_migrate("none");
    }
}

#[test]
fn live_guest_migrates_over_tls() {
    if !kvm_usable() {
        return;
    }
    // The smallest guest the demo takes (4 MiB, 2 MiB rewritten), throwaway mutual x509.
    let out = Command::new(env!("CARGO_BIN_EXE_pageferry"))
        .args(["vm", "demo", "--json", "--verify", "--tls", "--mem", "4M", "--working-set", "2M", "--downtime-limit", "20"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (s, d) = (&r["source"], &r["destination"]);
    assert_eq!(s["engine"]["transport"], "TLS 1.3 AES_128_GCM_SHA256");
    assert_eq!(s["engine"]["verified"], true);
    let paused = s["counter_at_pause"].as_u64().unwrap();
    assert_eq!(d["counter_at_restore"].as_u64().unwrap(), paused, "counter continuity");
    assert!(d["counter_after_run"].as_u64().unwrap() > paused, "the guest runs on the destination");
    assert_eq!(d["stamps_ok"], true);
}

#[test]
fn vm_recv_timeout_ends_the_migration_and_tells_the_source() {
    if !kvm_usable() {
        return;
    }
    use std::io::BufRead;
    let mut recv = Command::new(env!("CARGO_BIN_EXE_pageferry"))
        .args(["vm", "recv", "--listen", "127.0.0.1:0", "--timeout", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(recv.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("vm recv said {line:?}")).to_string();
    // 64 MiB at 4 MB/s would take ~16 s; the destination allows 1 s.
    let send = Command::new(env!("CARGO_BIN_EXE_pageferry"))
        .args(["vm", "send", "--quiet", "--connect", &addr, "--mem", "64M", "--working-set", "2M", "--max-bandwidth", "4MB"])
        .output()
        .unwrap();
    let out = recv.wait_with_output().unwrap();
    let (re, se) = (String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&send.stderr));
    assert_eq!(out.status.code(), Some(8), "vm recv exits with the timeout's status: {re}");
    assert!(re.contains("the destination's --timeout"), "{re}");
    assert_eq!(send.status.code(), Some(1), "{se}");
    assert!(se.contains("the destination's --timeout"), "the source hears why: {se}");
}

#[test]
fn vm_recv_refuses_a_wrong_source_and_the_right_one_then_migrates() {
    if !kvm_usable() {
        return;
    }
    use std::io::BufRead;
    let mut recv = Command::new(env!("CARGO_BIN_EXE_pageferry"))
        .args(["vm", "recv", "--listen", "127.0.0.1:0", "--json", "--multifd-compression", "zstd", "--accept-timeout", "30", "--run-after-ms", "50"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(recv.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("vm recv said {line:?}")).to_string();
    let send = |method: &str| {
        Command::new(env!("CARGO_BIN_EXE_pageferry"))
            .args(["vm", "send", "--quiet", "--json", "--connect", &addr, "--mem", "4M", "--working-set", "2M", "--multifd-compression", method])
            .output()
            .unwrap()
    };
    let wrong = send("none");
    let we = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(5), "{we}");
    assert!(we.contains("compression method mismatch: source uses none, destination expects zstd"), "{we}");
    // The same vm recv, still listening: the right source's guest resumes there.
    let right = send("zstd");
    assert!(right.status.success(), "the right source after a refused one: {}", String::from_utf8_lossy(&right.stderr));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let out = recv.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vm recv: {err}");
    let refused: Vec<&str> = err.lines().filter(|l| l.starts_with("pageferry: refused connection from 127.0.0.1:")).collect();
    assert!(refused.len() == 1 && refused[0].contains("compression method mismatch"), "{err}");
    let s: serde_json::Value = serde_json::from_slice(&right.stdout).unwrap();
    let d: serde_json::Value = serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("vm recv --json ({e}): {rest}"));
    assert_eq!(d["counter_at_restore"], s["counter_at_pause"], "counter continuity");
    assert_eq!(d["stamps_ok"], true);
}
