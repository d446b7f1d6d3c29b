//! Our TLS record layer against plain rustls connections (it must stay real TLS 1.3 on the
//! wire, both directions, KeyUpdate included) and against a proxy that tampers with records.

use super::tls::{self, TlsStream};
use super::creds;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

struct Pki {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// A self-signed certificate for localhost; configs the way `creds` makes them, except
/// what `tickets` and `extract` choose (a plain rustls peer keeps rustls' defaults).
fn pki(tickets: usize, extract: bool) -> Pki {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    let mut server = ServerConfig::builder_with_provider(creds::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server.send_tls13_tickets = tickets;
    server.enable_secret_extraction = extract;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut client = ClientConfig::builder_with_provider(creds::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = extract;
    Pki { server: Arc::new(server), client: Arc::new(client) }
}

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    for x in [&c, &s] {
        x.set_read_timeout(Some(T)).unwrap();
        x.set_write_timeout(Some(T)).unwrap();
    }
    (c, s)
}

fn name() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(seed as u32).to_le_bytes()[2]).collect()
}

/// Write `d` in uneven pieces (and some vectored writes), then close_notify.
fn send_all(mut w: impl Write, d: &[u8]) {
    let mut at = 0;
    let sizes = [1usize, 5000, 16384, 16385, 70000, 3, 300000];
    let mut i = 0;
    while at < d.len() {
        let n = sizes[i % sizes.len()].min(d.len() - at);
        if i % 3 == 2 && n > 2 {
            let (a, b) = d[at..at + n].split_at(n / 2);
            let mut bufs = [io::IoSlice::new(a), io::IoSlice::new(b)];
            let mut bufs = &mut bufs[..];
            let mut left = n;
            while left > 0 {
                let k = w.write_vectored(bufs).unwrap();
                left -= k;
                io::IoSlice::advance_slices(&mut bufs, k);
            }
        } else {
            w.write_all(&d[at..at + n]).unwrap();
        }
        at += n;
        i += 1;
    }
}

fn read_to_end(mut r: impl Read) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    let mut buf = vec![0u8; 40000];
    loop {
        match r.read(&mut buf)? {
            0 => return Ok(v),
            n => v.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn our_client_talks_to_a_plain_rustls_server_both_ways_with_key_updates() {
    let p = pki(0, false);
    let (c, s) = pair();
    let up = data(3 << 20 | 123, 1);
    let down = data(1 << 20 | 7, 2);
    let (up2, down2) = (up.clone(), down.clone());
    let srv = thread::spawn(move || {
        let mut conn = StreamOwned::new(ServerConnection::new(p.server).unwrap(), s);
        let got = read_to_end(&mut conn).unwrap();
        assert!(got == up2, "server got {} bytes, wanted {}", got.len(), up2.len());
        // Rotate keys mid-stream (rustls asks for an update back).
        conn.write_all(&down2[..1000]).unwrap();
        conn.conn.refresh_traffic_keys().unwrap();
        conn.write_all(&down2[1000..]).unwrap();
        conn.conn.send_close_notify();
        conn.flush().unwrap();
    });
    let mut cfg = (*p.client).clone();
    cfg.enable_secret_extraction = true;
    let ours = tls::client(c, Arc::new(cfg), name(), T).unwrap();
    ours.key_update_after(7);
    send_all(&ours, &up);
    ours.close_notify().unwrap();
    let got = read_to_end(&ours).unwrap();
    assert!(got == down, "client got {} bytes", got.len());
    // After close_notify, reads stay at end of stream.
    assert_eq!((&ours).read(&mut [0u8; 8]).unwrap(), 0);
    srv.join().unwrap();
}

#[test]
fn a_plain_rustls_client_talks_to_our_server_both_ways_with_key_updates() {
    let p = pki(0, true);
    let (c, s) = pair();
    let up = data(2 << 20 | 5, 3);
    let down = data(3 << 20 | 11, 4);
    let (up2, down2) = (up.clone(), down.clone());
    let cli = thread::spawn(move || {
        let mut conn = StreamOwned::new(ClientConnection::new(p.client, name()).unwrap(), c);
        // Written before the handshake is done: it follows the client's Finished at once,
        // so the server's handshake may read it together with the Finished.
        conn.conn.writer().write_all(&up2[..100]).unwrap();
        conn.write_all(&up2[100..200000]).unwrap();
        conn.conn.refresh_traffic_keys().unwrap();
        conn.write_all(&up2[200000..]).unwrap();
        conn.conn.send_close_notify();
        conn.flush().unwrap();
        let got = read_to_end(&mut conn).unwrap();
        assert!(got == down2, "client got {} bytes", got.len());
    });
    let ours = tls::server(s, p.server, T).unwrap();
    assert!(ours.describe().starts_with("TLS 1.3 AES_128_GCM"), "{}", ours.describe());
    ours.key_update_after(3);
    let got = read_to_end(&ours).unwrap();
    assert!(got == up, "server got {} bytes, wanted {}", got.len(), up.len());
    send_all(&ours, &down);
    ours.close_notify().unwrap();
    cli.join().unwrap();
}

#[test]
fn reader_and_writer_threads_share_one_connection() {
    let p = pki(0, true);
    let (c, s) = pair();
    let srv = thread::spawn(move || {
        // Echo until close_notify.
        let ours = tls::server(s, p.server, T).unwrap();
        let mut buf = vec![0u8; 50000];
        loop {
            let n = (&ours).read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            (&ours).write_all(&buf[..n]).unwrap();
        }
        ours.close_notify().unwrap();
    });
    let ours = tls::client(c, p.client, name(), T).unwrap();
    let reader = ours.try_clone().unwrap();
    let want = data(4 << 20, 9);
    let w2 = want.clone();
    let rd = thread::spawn(move || read_to_end(&reader).unwrap());
    send_all(&ours, &w2);
    ours.close_notify().unwrap();
    assert!(rd.join().unwrap() == want);
    srv.join().unwrap();
}

#[test]
fn a_server_that_sends_session_tickets_is_a_clear_error() {
    // A rustls server with tickets on: the ticket arrives after the handshake, where our
    // record layer accepts only data, alerts and KeyUpdate.
    let p = pki(2, false);
    let (c, s) = pair();
    let srv = thread::spawn(move || {
        let mut conn = StreamOwned::new(ServerConnection::new(p.server).unwrap(), s);
        let _ = conn.write_all(b"hello");
        let _ = conn.flush();
        let _ = read_to_end(&mut conn);
    });
    let mut cfg = (*p.client).clone();
    cfg.enable_secret_extraction = true;
    let ours = tls::client(c, Arc::new(cfg), name(), T).unwrap();
    let e = read_to_end(&ours).unwrap_err();
    assert!(e.to_string().contains("NewSessionTicket"), "{e}");
    ours.shutdown(std::net::Shutdown::Both).unwrap();
    srv.join().unwrap();
}

// ------------------------------------------------------------------------------------------
// Tampering: a proxy from the client to the server that forwards handshake records as they
// are and does something to one application-data record.

#[derive(Clone, Copy, Debug)]
enum Tamper {
    FlipBit,
    Replay,
    Drop,
    Truncate,
}

/// Record-by-record proxy client → server. Records that start after `armed` is set (the
/// handshake is done on both ends) are counted; the `at`-th gets `t`.
fn proxy(mut from: TcpStream, mut to: TcpStream, armed: Arc<AtomicBool>, at: usize, t: Tamper) {
    let mut back_from = to.try_clone().unwrap();
    let mut back_to = from.try_clone().unwrap();
    thread::spawn(move || {
        let _ = io::copy(&mut back_from, &mut back_to);
        let _ = back_to.shutdown(std::net::Shutdown::Write);
    });
    let mut n = 0;
    loop {
        let mut hdr = [0u8; 5];
        if from.read_exact(&mut hdr).is_err() {
            break;
        }
        let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
        let mut rec = hdr.to_vec();
        rec.resize(5 + len, 0);
        if from.read_exact(&mut rec[5..]).is_err() {
            break;
        }
        let app = armed.load(Ordering::SeqCst);
        let hit = app && n == at;
        if app {
            n += 1;
        }
        if !hit {
            if to.write_all(&rec).is_err() {
                break;
            }
            continue;
        }
        match t {
            Tamper::FlipBit => {
                rec[5 + len / 2] ^= 0x10;
                let _ = to.write_all(&rec);
            }
            Tamper::Replay => {
                let _ = to.write_all(&rec);
                let _ = to.write_all(&rec);
            }
            Tamper::Drop => {}
            Tamper::Truncate => {
                let _ = to.write_all(&rec[..rec.len() / 2]);
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Send 6 records of data through the proxy with `t` applied to the 4th; return what the
/// server read before its error, the server's error, and the client's view afterwards.
fn tampered(t: Tamper) -> (Vec<u8>, io::Error, Option<io::Error>) {
    let p = pki(0, true);
    let (c, pc) = pair();
    let (ps, s) = pair();
    let armed = Arc::new(AtomicBool::new(false));
    let a2 = armed.clone();
    thread::spawn(move || proxy(pc, ps, a2, 3, t));
    let srv = thread::spawn(move || tls::server(s, p.server, T).unwrap());
    let ours = tls::client(c, p.client, name(), T).unwrap();
    let server = srv.join().unwrap();
    armed.store(true, Ordering::SeqCst);
    let want = data(6 * 16384, 5);
    (&ours).write_all(&want).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16384];
    let err = loop {
        match (&server).read(&mut buf) {
            Ok(0) => panic!("{t:?}: end of stream instead of an error"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert!(got[..] == want[..got.len()], "{t:?}: only intact records are delivered");
    // The error sticks.
    assert!((&server).read(&mut buf).is_err());
    server.shutdown(std::net::Shutdown::Both).unwrap();
    let client_view = (&ours).read(&mut buf).err();
    (got, err, client_view)
}

fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

#[test]
fn a_flipped_bit_in_a_record_is_an_authentication_error_and_the_peer_is_told() {
    let (got, e, client) = tampered(Tamper::FlipBit);
    assert_eq!(got.len(), 3 * 16384);
    assert!(matches!(tls_error(&e), Some(rustls::Error::DecryptError)), "{e}");
    let client = client.expect("the client sees the server's alert");
    assert!(matches!(tls_error(&client), Some(rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac))), "{client}");
}

#[test]
fn a_replayed_record_is_refused() {
    let (got, e, _) = tampered(Tamper::Replay);
    assert_eq!(got.len(), 4 * 16384);
    assert!(matches!(tls_error(&e), Some(rustls::Error::DecryptError)), "{e}");
}

#[test]
fn a_dropped_record_is_refused() {
    let (got, e, _) = tampered(Tamper::Drop);
    assert_eq!(got.len(), 3 * 16384);
    assert!(matches!(tls_error(&e), Some(rustls::Error::DecryptError)), "{e}");
}

#[test]
fn a_truncated_record_is_an_unexpected_end_of_stream() {
    let (got, e, _) = tampered(Tamper::Truncate);
    assert_eq!(got.len(), 3 * 16384);
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
}

#[test]
fn unknown_content_types_and_non_data_records_are_refused() {
    // A raw peer that completes a handshake with rustls' buffered API, then writes records
    // our layer must refuse: a record with outer type handshake.
    let p = pki(0, true);
    let (c, s) = pair();
    let cli = thread::spawn(move || {
        let mut conn = StreamOwned::new(ClientConnection::new(p.client, name()).unwrap(), c);
        conn.write_all(b"ok").unwrap();
        conn.flush().unwrap();
        // A plaintext handshake record after the handshake.
        conn.sock.write_all(&[22, 3, 3, 0, 4, 24, 0, 0, 0]).unwrap();
        let _ = read_to_end(&mut conn.sock);
    });
    let ours = tls::server(s, p.server, T).unwrap();
    let mut buf = [0u8; 2];
    (&ours).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
    let e = (&ours).read(&mut buf).unwrap_err();
    assert!(e.to_string().contains("unexpected record type 22"), "{e}");
    ours.shutdown(std::net::Shutdown::Both).unwrap();
    cli.join().unwrap();
}

#[test]
fn end_of_stream_without_close_notify_is_an_error() {
    let p = pki(0, true);
    let (c, s) = pair();
    let cli = thread::spawn(move || {
        let mut conn = StreamOwned::new(ClientConnection::new(p.client, name()).unwrap(), c);
        conn.write_all(b"abc").unwrap();
        conn.flush().unwrap();
        conn.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = read_to_end(&mut conn.sock);
    });
    let ours = tls::server(s, p.server, T).unwrap();
    let e = read_to_end(&ours).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    ours.shutdown(std::net::Shutdown::Both).unwrap();
    cli.join().unwrap();
}

#[test]
fn an_unknown_inner_content_type_is_refused() {
    let p = pki(0, true);
    let (c, s) = pair();
    let srv = thread::spawn(move || tls::server(s, p.server, T).unwrap());
    let ours = tls::client(c, p.client, name(), T).unwrap();
    let server: TlsStream = srv.join().unwrap();
    (&ours).write_all(b"fine").unwrap();
    ours.send_record_for_test(b"odd", 99).unwrap();
    let mut buf = [0u8; 4];
    (&server).read_exact(&mut buf).unwrap();
    let e = (&server).read(&mut buf).unwrap_err();
    assert!(e.to_string().contains("unexpected content type 99"), "{e}");
    // An alert other than close_notify is the peer's error.
    let (c, s) = pair();
    let p = pki(0, true);
    let srv = thread::spawn(move || tls::server(s, p.server, T).unwrap());
    let ours = tls::client(c, p.client, name(), T).unwrap();
    let server: TlsStream = srv.join().unwrap();
    ours.send_record_for_test(&[2, 80], 21).unwrap();
    let e = (&server).read(&mut buf).unwrap_err();
    assert!(matches!(tls_error(&e), Some(rustls::Error::AlertReceived(rustls::AlertDescription::InternalError))), "{e}");
}

#[test]
fn records_right_behind_the_clients_finished_are_kept_even_a_partial_one() {
    // A rustls client whose Finished, two data records and half of a third reach the
    // server in one piece: rustls decrypts what it holds while finishing the handshake,
    // the partial record must stay ours.
    let p = pki(0, true);
    let (mut c, s) = pair();
    let want = data(40000, 6);
    let w2 = want.clone();
    let cli = thread::spawn(move || {
        let mut conn = ClientConnection::new(p.client, name()).unwrap();
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(&mut c).unwrap();
            }
            if conn.is_handshaking() {
                conn.read_tls(&mut c).unwrap();
                conn.process_new_packets().unwrap();
            }
        }
        conn.writer().write_all(&w2).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        let cut = out.len() - 7000;
        c.write_all(&out[..cut]).unwrap();
        thread::sleep(Duration::from_millis(200));
        c.write_all(&out[cut..]).unwrap();
        conn.send_close_notify();
        conn.write_tls(&mut c).unwrap();
        let _ = read_to_end(&mut c);
    });
    let ours = tls::server(s, p.server, T).unwrap();
    assert!(ours.handshake_leftover_for_test().1 > 0, "the test must leave a partial record behind the handshake");
    let got = read_to_end(&ours).unwrap();
    assert!(got == want, "got {} bytes", got.len());
    ours.shutdown(std::net::Shutdown::Both).unwrap();
    cli.join().unwrap();
}

#[test]
fn a_peer_that_does_not_speak_tls_gets_alerts_a_frame_header_long() {
    let p = pki(0, true);
    let (mut c, s) = pair();
    let srv = thread::spawn(move || tls::server(s, p.server, T).err());
    c.write_all(&[0x50u8; 282]).unwrap();
    let mut v = Vec::new();
    let _ = c.read_to_end(&mut v);
    let e = srv.join().unwrap().expect("refused");
    assert!(matches!(tls_error(&e), Some(rustls::Error::InvalidMessage(_))), "{e}");
    // Two alert records (rustls' and ours): 14 bytes, what a pageferry frame header needs.
    assert!(v.len() >= 14 && v[0] == 0x15 && v[7] == 0x15, "{v:?}");
}
