//! What TLS adds to a channel, per GiB of wire bytes and per side, next to the bare cipher
//! measured in the same process at the same time (the target: at most 1.25x).
//!
//! `cargo run --release --example tls_cost -- [GIB_PER_RUN] [REPS]` (default 1 GiB, 5 reps).
//! Each rep moves GIB_PER_RUN over loopback as 512 KiB vectored packets from and into a
//! 256 MiB buffer (cold, like guest memory), once over plain TCP and once over TLS 1.3
//! (pageferry's transport, AES-128-GCM), and seals / opens 16 KiB records with aws-lc-rs.
//! CPU time is per thread (sender, receiver), so the other side and the rest of the machine
//! do not count. Prints each rep and the medians.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use pageferry::transport::{self, Stream, TlsClient};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

fn cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

const MEM: usize = 256 << 20;
const PKT: usize = 512 << 10;

fn configs() -> (Arc<rustls::ServerConfig>, TlsClient) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    let p = transport::creds::provider;
    let server = rustls::ServerConfig::builder_with_provider(p()).with_protocol_versions(&[&rustls::version::TLS13]).unwrap().with_no_client_auth().with_single_cert(vec![cert.clone()], key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(p()).with_protocol_versions(&[&rustls::version::TLS13]).unwrap().with_root_certificates(roots).with_no_client_auth();
    (Arc::new(server), TlsClient { config: Arc::new(client), server_name: Some("localhost".into()) })
}

/// (send, recv) CPU-s per GiB moved.
fn transfer(tls: bool, bytes: usize, mem_tx: &[u8], mem_rx: &mut Vec<u8>) -> (f64, f64) {
    let (server, client) = configs();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::scope(|s| {
        let rx = s.spawn(move || {
            let (sock, _) = l.accept().unwrap();
            let mut st = if tls { transport::server_handshake(sock, &server, Duration::from_secs(10)).unwrap() } else { Stream::Plain(sock) };
            let c0 = cpu();
            let mut got = 0;
            while got < bytes {
                let at = got % MEM;
                let end = (at + PKT).min(MEM);
                let n = st.read_vectored(&mut [IoSliceMut::new(&mut mem_rx[at..end])]).unwrap();
                assert!(n > 0);
                got += n;
            }
            cpu() - c0
        });
        let sock = TcpStream::connect(&addr).unwrap();
        let mut st = if tls { transport::client_handshake(sock, &client, &addr, Duration::from_secs(10)).unwrap() } else { Stream::Plain(sock) };
        let c0 = cpu();
        let mut sent = 0;
        while sent < bytes {
            let at = sent % MEM;
            let (a, b) = mem_tx[at..at + PKT].split_at(64);
            let mut bufs = [IoSlice::new(a), IoSlice::new(b)];
            let mut bufs = &mut bufs[..];
            while !bufs.is_empty() {
                let n = st.write_vectored(bufs).unwrap();
                IoSlice::advance_slices(&mut bufs, n);
            }
            sent += PKT;
        }
        let tx = cpu() - c0;
        let gib = bytes as f64 / (1u64 << 30) as f64;
        (tx / gib, rx.join().unwrap() / gib)
    })
}

/// (seal, open) CPU-s per GiB: AES-128-GCM on 16 KiB records, in place, from the same cold
/// buffer (seal) as the transfer reads.
fn cipher(bytes: usize, mem: &mut [u8]) -> (f64, f64) {
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[3u8; 16]).unwrap());
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let rec = 16 << 10;
    let mut tags = Vec::with_capacity(MEM / rec);
    let c0 = cpu();
    let mut done = 0;
    let mut seq = 0u64;
    while done < bytes {
        let at = done % MEM;
        if at == 0 {
            tags.clear();
        }
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&seq.to_be_bytes());
        seq += 1;
        tags.push(key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from([23u8, 3, 3, 64, 17]), &mut mem[at..at + rec]).unwrap());
        done += rec;
    }
    let seal = (cpu() - c0) / gib;
    // Open what the last pass sealed (tags match it), repeatedly for the same byte count.
    let passes = bytes.div_ceil(MEM);
    let sealed = tags.len();
    let first_seq = seq - sealed as u64;
    let c0 = cpu();
    let mut opened = 0;
    for _ in 0..passes {
        for (i, t) in tags.iter().enumerate() {
            let at = i * rec;
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&(first_seq + i as u64).to_be_bytes());
            let mut buf = mem[at..at + rec].to_vec();
            buf.extend_from_slice(t.as_ref());
            std::hint::black_box(key.open_in_place(Nonce::assume_unique_for_key(n), Aad::from([23u8, 3, 3, 64, 17]), &mut buf).unwrap());
            opened += rec;
        }
    }
    // Minus the copies the loop itself makes.
    let copy0 = cpu();
    for i in 0..passes * sealed {
        let at = (i % sealed) * rec;
        std::hint::black_box(mem[at..at + rec].to_vec());
    }
    let copy = cpu() - copy0;
    let open = (cpu() - c0 - 2.0 * copy) / (opened as f64 / (1u64 << 30) as f64);
    (seal, open)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let gib: f64 = args.next().map(|s| s.parse().unwrap()).unwrap_or(1.0);
    let reps: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(5);
    let bytes = ((gib * (1u64 << 30) as f64) as usize).div_ceil(PKT) * PKT;
    let mut mem_tx: Vec<u8> = (0..MEM).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut mem_rx = vec![1u8; MEM];
    let mut cols: Vec<Vec<f64>> = vec![Vec::new(); 8];
    println!("CPU-s per GiB | TCP send | TCP recv | TLS send | TLS recv | +send | +recv | seal | open | +send/seal | +recv/open");
    for _ in 0..reps {
        let (ts, tr) = transfer(false, bytes, &mem_tx, &mut mem_rx);
        let (ls, lr) = transfer(true, bytes, &mem_tx, &mut mem_rx);
        let (seal, open) = cipher(bytes, &mut mem_tx);
        let row = [ts, tr, ls, lr, ls - ts, lr - tr, seal, open];
        println!("rep | {:.3} | {:.3} | {:.3} | {:.3} | {:+.3} | {:+.3} | {:.3} | {:.3} | {:.2} | {:.2}", row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[4] / row[6], row[5] / row[7]);
        for (c, v) in cols.iter_mut().zip(row) {
            c.push(v);
        }
    }
    let m: Vec<f64> = cols.iter_mut().map(|c| median(c)).collect();
    println!("median | {:.3} | {:.3} | {:.3} | {:.3} | {:+.3} | {:+.3} | {:.3} | {:.3} | {:.2} | {:.2}", m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[4] / m[6], m[5] / m[7]);
}
