//! Hostile connection patterns against `pageferry recv` through the binary: peers that connect
//! before the real source and never complete a handshake.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

mod common;
use common::bin;

/// The first bytes a source sends: a control Hello for `len` bytes of memory.
fn hello_frame(len: u64) -> Vec<u8> {
    use pageferry::wire::{self, Control, Features, Hello, Role, SessionId, VersionRange};
    let h = Hello {
        versions: VersionRange::SUPPORTED,
        session: SessionId::random(),
        role: Role::Control,
        channel: 0,
        channels: 1,
        method: pageferry::codec::Method::by_name("none").unwrap().code(),
        level: 0,
        regions: vec![("image".into(), len)],
        wants: Features::default(),
        verify: true,
    };
    let mut out = Vec::new();
    wire::write_frame(&mut out, wire::PROTOCOL_VERSION, &Control::Hello(h), &[]).unwrap();
    out
}

#[test]
fn slowloris_and_20_idle_connections_before_the_source_do_not_keep_it_out() {
    let dir = tempfile::Builder::new().prefix("pageferry-hostile-test").tempdir_in("/dev/shm").unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    let out = bin().args(["image", "--size", "8M"]).arg(&src).output().unwrap();
    assert!(out.status.success(), "image: {}", String::from_utf8_lossy(&out.stderr));
    // The accept timeout (8 s) is shorter than the handshake deadline (10 s): a source that
    // had to wait for the hostile peers' deadlines would be turned away.
    let mut recv = bin()
        .args(["recv", "--listen", "127.0.0.1:0", "--json", "--accept-timeout", "8"])
        .arg("--image")
        .arg(&dst)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(recv.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("recv said {line:?}")).to_string();

    // A slowloris: a valid Hello, one byte every 300 ms (the whole frame would take far
    // longer than the handshake deadline).
    let mut drip = TcpStream::connect(&addr).unwrap();
    let drip_addr = drip.local_addr().unwrap().to_string();
    let hello = hello_frame(8 << 20);
    assert!(hello.len() as u64 * 300 > 10_000, "the drip outlasts the deadline");
    let dripper = std::thread::spawn(move || {
        for b in hello {
            if drip.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(&addr).unwrap()).collect();

    let t0 = std::time::Instant::now();
    let s = bin().args(["send", "--quiet", "--json", "--connect", &addr]).arg("--image").arg(&src).output().unwrap();
    eprintln!("the real source finished after {:?} (recv's --accept-timeout: 8 s, handshake deadline: 10 s)", t0.elapsed());
    assert!(s.status.success(), "the real source: {}", String::from_utf8_lossy(&s.stderr));
    let status = recv.wait().unwrap();
    let mut err = String::new();
    recv.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "recv: {err}");
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap(), "destination differs");
    eprintln!("recv said:\n{err}");
    // Every hostile peer is reported, one line each, the slowloris included.
    let reported: Vec<&str> = err.lines().filter(|l| l.starts_with("pageferry: dropping connection from 127.0.0.1:")).collect();
    assert_eq!(reported.len(), 21, "{err}");
    assert!(reported.iter().any(|l| l.contains(&format!("from {drip_addr}:"))), "the slowloris: {err}");
    assert!(reported.iter().any(|l| l.contains("evicted")), "{err}");
    drop(idle);
    dripper.join().unwrap();
}
