//! Migrations over TLS, and every way a peer can be refused: each refused peer gets a clear
//! reason on both sides, the destination's memory stays untouched, and the destination keeps
//! listening until the right source arrives and migrates.

use super::tests::test_memory;
use super::*;
use crate::codec::{CodecSpec, Method};
use crate::dirty::StaticTracker;
use crate::memory::{GuestMemory, MemoryRegion, MmapRegion};
use crate::transport::creds::{self, PskKey, TlsClient};
use crate::transport::{self, Stream};
use crate::wire::{self, Control, Hello, Role, SessionId};
use rustls::ServerConfig;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn m(name: &str) -> Method {
    Method::by_name(name).unwrap()
}

// ------------------------------------------------------------------------------------------
// A small PKI written in the --tls-creds layout.

use pageferry_testsupport::pki::{ca, leaf, write, Ca};

fn creds_dir(ca: &Ca) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "ca-cert.pem", &ca.cert.pem());
    d
}

/// A destination directory (server cert for localhost and 127.0.0.1) and a source directory
/// (client cert CN=`client`), both trusting `ca`.
fn pki(ca: &Ca, client: &str) -> (tempfile::TempDir, tempfile::TempDir) {
    let (srv, cli) = (creds_dir(ca), creds_dir(ca));
    leaf(srv.path(), ca, "server", "dest.example", &["localhost", "127.0.0.1"], false);
    leaf(cli.path(), ca, "client", client, &[client], false);
    (srv, cli)
}

fn server(dir: &Path, authz: &[&str]) -> Arc<ServerConfig> {
    let authz: Vec<String> = authz.iter().map(|s| s.to_string()).collect();
    creds::x509_server(dir, true, &authz).unwrap().config
}

fn client(dir: &Path) -> TlsClient {
    creds::x509_client(dir, None).unwrap().config
}

/// Mutual x509 for a loopback destination (for tests elsewhere in the engine).
pub(super) fn loopback_pki() -> (Arc<ServerConfig>, TlsClient) {
    let ca = ca("test CA");
    let (srv, cli) = pki(&ca, "source.example");
    (server(srv.path(), &[]), client(cli.path()))
}

fn psk(identity: &str, hex_byte: u8) -> Vec<PskKey> {
    vec![PskKey::new(identity, vec![hex_byte; 32]).unwrap()]
}

// ------------------------------------------------------------------------------------------
// A destination on a thread that records what it refuses.

type Messages = Arc<Mutex<Vec<String>>>;

/// Keeps the destination's events as the lines the command would print.
struct Recorder(Messages);

impl ProgressSink for Recorder {
    fn update(&self, _p: &Progress) {}
    fn event(&self, e: &Event) {
        // The notes an operator reads (the lifecycle statuses are not what these tests check).
        if e.is_note() {
            self.0.lock().unwrap().push(e.to_string());
        }
    }
}

struct Dest {
    addr: String,
    memory: GuestMemory,
    messages: Messages,
    handle: std::thread::JoinHandle<Result<DestinationReport, MigrationError>>,
}

fn start_destination(like: &GuestMemory, method: Method, tls: Option<Arc<ServerConfig>>, tweak: impl FnOnce(&mut DestinationConfig)) -> Dest {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let memory = GuestMemory::new(like.regions().iter().map(|r| Arc::new(MmapRegion::anonymous(r.name(), r.len()).unwrap()) as Arc<dyn MemoryRegion>).collect()).unwrap();
    let messages: Messages = Arc::default();
    let mut cfg = DestinationConfig {
        codec: CodecSpec::new(method),
        accept_timeout: Duration::from_secs(30),
        tls,
        events: EventSink::new(Recorder(messages.clone())),
        ..Default::default()
    };
    tweak(&mut cfg);
    let mem = memory.clone();
    let handle = std::thread::spawn(move || run_destination(&listener, &mem, &mut NoWorkload, &cfg));
    Dest { addr, memory, messages, handle }
}

impl Dest {
    /// Wait until the destination reported a refusal containing `needle`; returns it.
    fn refused(&self, needle: &str) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = self.messages.lock().unwrap().iter().find(|m| m.starts_with("refused connection from ") && m.contains(needle)) {
                return m.clone();
            }
            assert!(Instant::now() < until, "the destination never reported {needle:?}; it reported {:?}", self.messages.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn untouched(&self) -> bool {
        self.memory.regions().iter().all(|r| {
            let s = unsafe { std::slice::from_raw_parts(r.host_ptr(), r.len() as usize) };
            s.iter().all(|&b| b == 0)
        })
    }
}

fn source_config(method: Method, tls: Option<TlsClient>) -> SourceConfig {
    SourceConfig { channels: 2, codec: CodecSpec::new(method), tls, connect_timeout: Duration::from_secs(5), ..Default::default() }
}

fn send(addr: &str, memory: &GuestMemory, cfg: &SourceConfig) -> Result<MigrationReport, MigrationError> {
    run_source(addr, memory, &mut StaticTracker::new(), &mut NoWorkload, cfg, &NoProgress)
}

/// The bad source is refused with `src_says` (its error) and `dst_says` (the destination's
/// report); the destination's memory is untouched; then the good source migrates.
fn refused_then_right_peer(dest_tls: Arc<ServerConfig>, bad: Option<TlsClient>, good: TlsClient, src_says: &str, dst_says: &str) {
    let src = test_memory([600, 100]);
    let dest = start_destination(&src, m("zstd"), Some(dest_tls), |_| {});
    let err = send(&dest.addr, &src, &source_config(m("zstd"), bad)).expect_err("the bad source must be refused");
    let err = err.to_string();
    assert!(err.contains(src_says), "source said: {err}");
    let said = dest.refused(dst_says);
    assert!(!said.contains('\n') && !err.contains('\n'), "one line each: {said:?} / {err:?}");
    assert!(dest.untouched(), "the refused peer changed the destination's memory");
    let r = send(&dest.addr, &src, &source_config(m("zstd"), Some(good))).expect("the right source migrates after a refused one");
    assert!(r.verified);
    dest.handle.join().unwrap().expect("destination completes");
    assert_eq!(src.digest(), dest.memory.digest());
}

// ------------------------------------------------------------------------------------------
// Migrations

#[test]
fn x509_mutual_tls_migrates_every_method_byte_identical() {
    let ca = ca("test CA");
    let (srv, cli) = pki(&ca, "source.example");
    let src = test_memory([1500, 300]);
    for method in [m("none"), m("zlib"), m("zstd"), m("qatzip")] {
        let mut codec = CodecSpec::new(method);
        codec.qatzip.provider = crate::codec::qatzip::Provider::Cpu;
        let dest = start_destination(&src, method, Some(server(srv.path(), &[])), |c| c.codec = codec.clone());
        let cfg = SourceConfig { codec: codec.clone(), ..source_config(method, Some(client(cli.path()))) };
        let r = send(&dest.addr, &src, &cfg).unwrap_or_else(|e| panic!("{method}: {e}"));
        dest.handle.join().unwrap().unwrap();
        assert!(r.verified, "{method}");
        assert_eq!(src.digest(), dest.memory.digest(), "{method}");
        assert!(dest.messages.lock().unwrap().is_empty(), "{:?}", dest.messages);
    }
}

#[test]
fn psk_migrates_byte_identical_and_authz_lists_identities() {
    let src = test_memory([800, 100]);
    let keys = vec![PskKey::new("qemu", vec![7; 32]).unwrap(), PskKey::new("other", vec![9; 32]).unwrap()];
    let dest = start_destination(&src, m("zstd"), Some(creds::psk_server(&keys, &["qemu".into()]).unwrap()), |_| {});
    let r = send(&dest.addr, &src, &source_config(m("zstd"), Some(creds::psk_client(&keys, "qemu").unwrap()))).unwrap();
    assert!(r.verified);
    dest.handle.join().unwrap().unwrap();
    assert_eq!(src.digest(), dest.memory.digest());
}

#[test]
fn psk_files_parse_like_qemu_and_short_keys_are_refused() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "keys.psk", "# comment\nqemu:000102030405060708090a0b0c0d0e0f\n\nalice:ffeeddccbbaa99887766554433221100aa\n");
    let k = creds::load_psk_file(d.path()).unwrap(); // a directory holding keys.psk, like QEMU's dir=
    assert!(k.warnings.is_empty(), "{:?}", k.warnings);
    assert_eq!(k.config.iter().map(|k| k.identity.as_str()).collect::<Vec<_>>(), ["qemu", "alice"]);
    assert!(!format!("{:?}", k.config).contains("0001020304"), "keys never shown");
    write(d.path(), "short.psk", "qemu:00112233\n");
    let e = creds::load_psk_file(&d.path().join("short.psk")).err().unwrap().to_string();
    assert!(e.contains("at least 16"), "{e}");
    write(d.path(), "bad.psk", "qemu:zz\n");
    assert!(creds::load_psk_file(&d.path().join("bad.psk")).is_err());
}

#[test]
fn group_readable_key_files_are_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let ca = ca("test CA");
    let (srv, _cli) = pki(&ca, "c");
    assert!(creds::x509_server(srv.path(), true, &[]).unwrap().warnings.is_empty());
    std::fs::set_permissions(srv.path().join("server-key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let w = creds::x509_server(srv.path(), true, &[]).unwrap().warnings;
    assert!(w.len() == 1 && w[0].contains("server-key.pem") && w[0].contains("644"), "{w:?}");
}

// ------------------------------------------------------------------------------------------
// Refusals: each one leaves the destination listening and its memory untouched.

#[test]
fn plaintext_source_is_refused_by_a_tls_destination() {
    let ca = ca("test CA");
    let (srv, cli) = pki(&ca, "source.example");
    refused_then_right_peer(server(srv.path(), &[]), None, client(cli.path()), "requires TLS", "does not speak TLS");
}

#[test]
fn certificate_from_another_ca_is_refused() {
    let (good_ca, evil_ca) = (ca("test CA"), ca("another CA"));
    let (srv, cli) = pki(&good_ca, "source.example");
    // The impostor trusts the real CA (it can see the destination's certificate) but its own
    // certificate is signed by another CA.
    let evil = creds_dir(&good_ca);
    leaf(evil.path(), &evil_ca, "client", "source.example", &["source.example"], false);
    refused_then_right_peer(server(srv.path(), &[]), Some(client(evil.path())), client(cli.path()), "refused our credentials", "not signed by our CA");
}

#[test]
fn destination_certificate_from_another_ca_is_refused_by_the_source() {
    let (good_ca, other_ca) = (ca("test CA"), ca("another CA"));
    let (srv, cli) = pki(&good_ca, "source.example");
    let (_, wrong) = pki(&other_ca, "source.example");
    refused_then_right_peer(server(srv.path(), &[]), Some(client(wrong.path())), client(cli.path()), "not signed by our CA", "refused");
}

#[test]
fn expired_client_certificate_is_refused() {
    let ca = ca("test CA");
    let (srv, cli) = pki(&ca, "source.example");
    let old = creds_dir(&ca);
    leaf(old.path(), &ca, "client", "source.example", &["source.example"], true);
    refused_then_right_peer(server(srv.path(), &[]), Some(client(old.path())), client(cli.path()), "our certificate has expired", "has expired");
}

#[test]
fn expired_destination_certificate_is_refused_by_the_source() {
    let ca = ca("test CA");
    let (srv, cli) = pki(&ca, "source.example");
    let stale = creds_dir(&ca);
    leaf(stale.path(), &ca, "server", "dest.example", &["localhost", "127.0.0.1"], true);
    let src = test_memory([300, 100]);
    let dest = start_destination(&src, m("none"), Some(server(stale.path(), &[])), |c| c.accept_timeout = Duration::from_secs(3));
    let err = send(&dest.addr, &src, &source_config(m("none"), Some(client(cli.path())))).unwrap_err().to_string();
    assert!(err.contains("certificate has expired"), "{err}");
    dest.refused("refused");
    assert!(dest.untouched());
    let _ = srv;
}

#[test]
fn wrong_psk_is_refused() {
    let dest_keys = psk("qemu", 7);
    refused_then_right_peer(
        creds::psk_server(&dest_keys, &[]).unwrap(),
        Some(creds::psk_client(&psk("qemu", 8), "qemu").unwrap()),
        creds::psk_client(&dest_keys, "qemu").unwrap(),
        "pre-shared key",
        "refused",
    );
}

#[test]
fn wrong_hostname_is_refused() {
    let ca = ca("test CA");
    let (srv, cli) = pki(&ca, "source.example");
    let mut wrong = client(cli.path());
    wrong.server_name = Some("not-the-destination.example".into());
    refused_then_right_peer(server(srv.path(), &[]), Some(wrong), client(cli.path()), "not valid for the name \"not-the-destination.example\"", "refused");
}

#[test]
fn client_certificate_outside_authz_is_refused() {
    let ca = ca("test CA");
    let (srv, allowed) = pki(&ca, "allowed.example");
    let (_, other) = pki(&ca, "intruder.example");
    refused_then_right_peer(server(srv.path(), &["allowed.example"]), Some(client(other.path())), client(allowed.path()), "not in its --tls-authz list", "not in the --tls-authz list");
}

#[test]
fn tls_1_2_is_refused() {
    let ca = ca("test CA");
    let (srv, cli) = pki(&ca, "source.example");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(creds::load_certs(&cli.path().join("ca-cert.pem")).unwrap().remove(0)).unwrap();
    let certs = creds::load_certs(&cli.path().join("client-cert.pem")).unwrap();
    let key = creds::load_key(&cli.path().join("client-key.pem")).unwrap();
    let old = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    let old = TlsClient { config: Arc::new(old), server_name: None };
    refused_then_right_peer(server(srv.path(), &[]), Some(old), client(cli.path()), "TLS version", "TLS 1.3 is required");
}

#[test]
fn tls_source_to_a_plaintext_destination_is_a_clear_error_on_both_sides() {
    let ca = ca("test CA");
    let (_srv, cli) = pki(&ca, "source.example");
    let src = test_memory([300, 100]);
    let dest = start_destination(&src, m("none"), None, |c| c.accept_timeout = Duration::from_secs(3));
    let err = send(&dest.addr, &src, &source_config(m("none"), Some(client(cli.path())))).unwrap_err().to_string();
    assert!(err.contains("closed the connection during the TLS handshake"), "{err}");
    dest.refused("a TLS client connected, but this destination has no TLS credentials");
    assert!(dest.untouched());
}

#[test]
fn silent_connections_cannot_exhaust_the_destination() {
    // More silent connections than the cap: the oldest are evicted as newer ones arrive and
    // the real source, connecting after them, still migrates.
    let ca = ca("test CA");
    let (srv, cli) = pki(&ca, "source.example");
    let src = test_memory([300, 100]);
    let dest = start_destination(&src, m("none"), Some(server(srv.path(), &[])), |c| {
        c.handshake_timeout = Duration::from_millis(500);
        c.max_pending_handshakes = 4;
    });
    let silent: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(&dest.addr).unwrap()).collect();
    let r = send(&dest.addr, &src, &source_config(m("none"), Some(client(cli.path())))).unwrap();
    assert!(r.verified);
    dest.handle.join().unwrap().unwrap();
    assert_eq!(src.digest(), dest.memory.digest());
    // Each silent connection is reported: evicted (at least the 2 over the cap and the one the
    // source's control channel replaced), timed out, or closed when the session was complete.
    let said = dest.messages.lock().unwrap().clone();
    assert!(said.iter().filter(|m| m.contains("evicted")).count() >= 3, "{said:?}");
    assert_eq!(said.iter().filter(|m| m.starts_with("dropping connection from")).count(), 6, "{said:?}");
    drop(silent);
}

// ------------------------------------------------------------------------------------------
// Channel binding

fn tls_hello(session: SessionId, role: Role, channel: u16, memory: &GuestMemory) -> Control {
    let method = m("none");
    Control::Hello(Hello {
        versions: wire::VersionRange::SUPPORTED,
        session,
        role,
        channel,
        channels: 1,
        method: method.code(),
        level: method.default_level(),
        regions: memory.layout(),
        wants: wire::Features { tls: true, ..Default::default() },
        verify: true,
    })
}

fn open(addr: &str, tls: &TlsClient) -> Stream {
    let tcp = TcpStream::connect(addr).unwrap();
    let s = transport::client_handshake(tcp, tls, addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn data_channel_from_another_identity_cannot_join_the_session() {
    let ca = ca("test CA");
    let (srv, alice) = pki(&ca, "alice.example");
    let (_, mallory) = pki(&ca, "mallory.example");
    let src = test_memory([100, 100]);
    let dest = start_destination(&src, m("none"), Some(server(srv.path(), &[])), |c| c.accept_timeout = Duration::from_secs(3));
    let session = SessionId::random();
    let mut ctl = open(&dest.addr, &client(alice.path()));
    wire::write_frame(&mut ctl, wire::PROTOCOL_VERSION, &tls_hello(session, Role::Control, 0, &src), &[]).unwrap();
    assert!(matches!(wire::read_frame(&mut ctl).unwrap().msg, Control::Welcome { .. }));
    // Mallory holds a valid certificate of the same CA and knows the session id.
    let mut data = open(&dest.addr, &client(mallory.path()));
    wire::write_frame(&mut data, wire::PROTOCOL_VERSION, &tls_hello(session, Role::Data, 0, &src), &[]).unwrap();
    match wire::read_frame(&mut data).unwrap().msg {
        Control::Refuse { reason } => assert!(reason.contains("CN=mallory.example") && reason.contains("CN=alice.example"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    dest.refused("channel 0 is authenticated as CN=mallory.example");
    // The destination never got its data channel: it gives up at the accept timeout.
    assert!(dest.untouched());
    let e = dest.handle.join().unwrap().unwrap_err().to_string();
    assert!(e.contains("0 of 1 data channels"), "{e}");
}

// ------------------------------------------------------------------------------------------
// What crosses the wire

/// Forward source→destination bytes through a relay that keeps a copy of them.
fn recording_proxy(to: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
    let rec = seen.clone();
    std::thread::spawn(move || {
        for up in l.incoming() {
            let Ok(up) = up else { return };
            let down = TcpStream::connect(&to).unwrap();
            let (rec, mut u1, mut d1) = (rec.clone(), up.try_clone().unwrap(), down.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match std::io::Read::read(&mut u1, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            rec.lock().unwrap().extend_from_slice(&buf[..n]);
                            if std::io::Write::write_all(&mut d1, &buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = d1.shutdown(std::net::Shutdown::Write);
            });
            let (mut d2, mut u2) = (down, up);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut d2, &mut u2);
                let _ = u2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, seen)
}

/// Whether `capture` contains a 32-byte-aligned 32-byte block of `memory` that is not a
/// repeated byte; any 64-byte run of memory contains such an aligned block in full.
fn leaks(memory: &GuestMemory, capture: &[u8]) -> bool {
    let mut blocks = std::collections::HashSet::new();
    for r in memory.regions() {
        let s = unsafe { std::slice::from_raw_parts(r.host_ptr(), r.len() as usize) };
        for b in s.chunks_exact(32) {
            if b.iter().any(|&x| x != b[0]) {
                blocks.insert(<[u8; 32]>::try_from(b).unwrap());
            }
        }
    }
    capture.windows(32).any(|w| blocks.contains(w))
}

#[test]
fn captured_tls_stream_contains_no_run_of_guest_memory() {
    let ca = ca("test CA");
    let (srv, cli) = pki(&ca, "source.example");
    let src = test_memory([400, 100]);
    for tls in [false, true] {
        let dest = start_destination(&src, m("none"), tls.then(|| server(srv.path(), &[])), |_| {});
        let (proxy, seen) = recording_proxy(dest.addr.clone());
        let mut cfg = source_config(m("none"), tls.then(|| client(cli.path())));
        if tls {
            cfg.tls.as_mut().unwrap().server_name = Some("localhost".into());
        }
        send(&proxy, &src, &cfg).unwrap_or_else(|e| panic!("tls={tls}: {e}"));
        dest.handle.join().unwrap().unwrap();
        assert_eq!(src.digest(), dest.memory.digest());
        let capture = seen.lock().unwrap().clone();
        assert!(capture.len() as u64 >= src.total_bytes() / 2, "the proxy saw the migration ({} bytes)", capture.len());
        // The check can fail: plaintext shows guest memory; TLS must not.
        assert_eq!(leaks(&src, &capture), !tls, "tls={tls}");
    }
}
