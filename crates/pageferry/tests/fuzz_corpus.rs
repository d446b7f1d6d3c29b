//! The fuzz harness (fuzz/src/lib.rs) on the stable toolchain: every seed of fuzz/corpus runs
//! through its target's checks, the harness's own checks are shown to fire, and the
//! `destination` seeds are recorded from real migrations (ignored test
//! `write_destination_seed_corpus`).

#[path = "../../../fuzz/src/lib.rs"]
mod harness;

use harness::{Arena, DestinationInput, FRESH, LAYOUT, NO_VERIFY, NO_ZERO_COPY};
use pageferry::codec::{CodecSpec, Method};
use pageferry::dirty::{DirtyError, DirtyPages, DirtyTracker};
use pageferry::engine::{self, DestinationConfig, DestinationWorkload, NoProgress, NoWorkload, PostcopyConfig, SourceConfig, WorkloadError};
use pageferry::memory::{GuestMemory, MemoryRegion, MmapRegion, PAGE_SIZE};
use pageferry::wire::{read_frame, PacketHeader, PacketKind};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(corpus().join(target))
        .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seeds for {target}");
    v
}

#[test]
fn every_fuzz_seed_passes_its_target() {
    for (_, s) in seeds("control_frame") {
        harness::control_frame(&s);
    }
    for (_, s) in seeds("packet_header") {
        harness::packet_header(&s);
    }
    for m in ["zlib", "zstd", "qatzip"] {
        for (_, s) in seeds(&format!("decode_{m}")) {
            harness::decode(m, &s);
        }
    }
    let dest = seeds("destination");
    for (name, s) in &dest {
        let outcome = harness::destination(s).expect("a seed is long enough");
        // Seeds named ok-* are whole recorded migrations: the replay completes them, verified
        // (ok-*-postcopy-*: in postcopy, every discarded page placed; where this kernel has no
        // userfaultfd the destination refuses them, as it would refuse the live source).
        if name.starts_with("ok-") {
            let report = match outcome {
                Err(e) if name.contains("postcopy") && e.to_string().contains("postcopy is not possible on this destination") => {
                    eprintln!("{name}: skipped ({e})");
                    continue;
                }
                r => r.unwrap_or_else(|e| panic!("{name}: {e}")),
            };
            assert!(report.pages > 0, "{name}: {report:?}");
            if name.contains("postcopy") {
                let pc = report.postcopy.as_ref().unwrap_or_else(|| panic!("{name}: no postcopy in {report:?}"));
                assert!(pc.discarded_pages > 0, "{name}: {pc:?}");
            } else {
                assert!(report.verified && report.postcopy.is_none(), "{name}: {report:?}");
            }
        }
    }
    assert!(dest.iter().filter(|(n, _)| n.starts_with("ok-")).count() >= 12);
    assert!(dest.iter().filter(|(n, _)| n.contains("-2ch")).count() >= 3, "seeds with two data channels");
    assert!(dest.iter().filter(|(n, _)| n.contains("postcopy")).count() >= 2, "postcopy seeds");
}

#[test]
fn a_canary_page_catches_a_write_one_byte_outside_its_span() {
    let quiet = |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
    for (span, offset) in [(0usize, -1isize), (0, 2 * PAGE_SIZE as isize), (1, -1), (1, PAGE_SIZE as isize)] {
        let mut a = Arena::new(&[2, 1]);
        a.span(span).fill(0x11); // writes inside a span are fine
        assert!(!quiet(&|| a.check_canaries()));
        // SAFETY: one byte next to the span, inside the arena's canary page.
        unsafe { *a.ptr(span).offset(offset) = 0 };
        assert!(quiet(&|| a.check_canaries()), "a write at {offset} of span {span} went unnoticed");
    }
}

#[test]
fn the_destination_harness_allows_only_pages_of_correct_packets() {
    let (_, seed) = seeds("destination").into_iter().find(|(n, _)| n.starts_with("ok-zstd-used")).expect("an ok-zstd-used seed");
    let input = DestinationInput::parse(&seed).unwrap();
    assert_eq!(input.streams.len(), 1);
    let mut data = input.streams[0];
    read_frame(&mut data).expect("the data Hello");
    // The whole recorded stream: every page of the guest was sent by a correct packet.
    let all = harness::allowed_pages(data, true, false);
    let pages: usize = LAYOUT.iter().map(|&(_, p)| p).sum();
    for (r, &(_, n)) in LAYOUT.iter().enumerate() {
        for p in 0..n {
            assert!(all.contains(&(r, p)), "page {p} of region {r} not allowed");
        }
    }
    assert!(all.len() >= pages);
    // One bit flipped in the payload of the first compressed packet: its CRC fails, its
    // pages and those of every later packet are no longer allowed, and the real destination
    // refuses the input without changing memory outside them (the harness checks).
    let mut at = 0;
    let (pos, h) = loop {
        let h = PacketHeader::decode(data[at..at + 32].try_into().unwrap()).unwrap();
        if h.kind == PacketKind::Pages && !h.raw && h.payload_len > 0 {
            break (at, h);
        }
        at += h.wire_len();
    };
    let mut bad = seed.clone();
    let data_at = seed.len() - data.len();
    bad[data_at + pos + 32 + h.offsets_len()] ^= 0x10;
    assert_eq!(harness::allowed_pages(&bad[data_at..], true, false), harness::allowed_pages(&data[..pos], true, false));
    let e = harness::destination(&bad).unwrap().expect_err("a corrupt packet must fail");
    assert!(e.to_string().contains("CRC"), "{e}");
}

/// A hostile source ends postcopy's round with discarded pages still missing, then sends a
/// page of the next round: the destination must refuse it, not write it into memory whose
/// missing pages block the writer until the source sends them (it never will: before the fix
/// the reader, and so the whole destination, hung for good).
#[test]
fn a_page_of_a_later_round_after_the_postcopy_switchover_is_refused() {
    let (name, seed) = seeds("destination").into_iter().find(|(n, _)| n.starts_with("ok-none-postcopy")).expect("a postcopy seed");
    let input = DestinationInput::parse(&seed).unwrap();
    let mut ctl = input.control;
    read_frame(&mut ctl).unwrap();
    let pc_round = std::iter::from_fn(|| read_frame(&mut ctl).ok())
        .find_map(|f| match f.msg {
            pageferry::wire::Control::Postcopy { round, .. } => Some(round),
            _ => None,
        })
        .expect("a Postcopy frame");
    let (mut data, urgent) = (input.streams[0], input.streams[1]);
    let whole = data;
    read_frame(&mut data).unwrap();
    // The pre-copy rounds as recorded, then postcopy's Sync with none of its pages, then a
    // raw page of the round after it, on a page the switchover discarded.
    let mut n = 0u64;
    let mut method = None;
    while let Ok(h) = PacketHeader::decode(data[..32].try_into().unwrap()) {
        if h.round >= pc_round {
            break;
        }
        method = Some(h.method);
        data = &data[h.wire_len()..];
        n += 1;
    }
    let method = method.unwrap();
    let mut stream = whole[..whole.len() - data.len()].to_vec();
    stream.extend(pageferry::wire::encode_packet(&PacketHeader::sync(method, pc_round, n), &[], &[]));
    let mut offsets = Vec::new();
    pageferry::wire::encode_offsets(&[(3, 1)], &[], &mut offsets);
    let page = PacketHeader { kind: PacketKind::Pages, raw: true, method, region: 0, normal: 1, zero: 0, round: pc_round + 1, packet_num: n + 1, payload_len: PAGE_SIZE as u32 };
    stream.extend(pageferry::wire::encode_packet(&page, &offsets, &[0x5A; PAGE_SIZE]));
    let mut urgent_hello = urgent;
    read_frame(&mut urgent_hello).unwrap();
    let urgent = &urgent[..urgent.len() - urgent_hello.len()];
    // Every pre-copy packet, the Postcopy frame, then the Sync and the late page.
    let schedule: Vec<u8> = std::iter::repeat_n(1u8, n as usize).chain([0, 1, 1]).collect();
    let bad = harness::destination_input(input.flags, input.control, &schedule, &[&stream, urgent]);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(harness::destination(&bad).unwrap().map(|r| format!("{r:?}")).map_err(|e| e.to_string())));
    let outcome = rx.recv_timeout(std::time::Duration::from_secs(20)).unwrap_or_else(|_| panic!("{name}: the destination hangs on a page after postcopy's round"));
    let e = match outcome {
        Err(e) if e.contains("postcopy is not possible on this destination") => return eprintln!("skipped: {e}"),
        r => r.expect_err("a page after postcopy's round must fail the migration"),
    };
    assert!(e.contains("after the switchover to postcopy"), "{e}");
}

// ---- recording the destination seeds ----

/// What a recording proxy saw: each connection's bytes from the source (in connection
/// order: 0 control, then the channels), and the order they arrived in (connection, its
/// length after the chunk), under one lock.
#[derive(Default)]
struct Recording {
    streams: Vec<Vec<u8>>,
    arrivals: Vec<(usize, usize)>,
}

/// A TCP proxy recording what the source sends on each connection, and in which order.
fn recording_proxy(upstream: String) -> (String, Arc<Mutex<Recording>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let rec: Arc<Mutex<Recording>> = Arc::default();
    let r = rec.clone();
    std::thread::spawn(move || {
        for down in listener.incoming() {
            let Ok(mut down) = down else { return };
            let mut up = TcpStream::connect(&upstream).unwrap();
            let conn = {
                let mut r = r.lock().unwrap();
                r.streams.push(Vec::new());
                r.streams.len() - 1
            };
            let (mut down2, mut up2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            let r = r.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = down.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    // Recorded before it is forwarded: what the source sends only after the
                    // destination answered is always recorded after what it answered.
                    {
                        let mut r = r.lock().unwrap();
                        r.streams[conn].extend_from_slice(&buf[..n]);
                        let len = r.streams[conn].len();
                        r.arrivals.push((conn, len));
                    }
                    if up.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = up.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut up2, &mut down2);
                let _ = down2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, rec)
}

/// Where each item of a stream after its Hello ends: control frames (connection 0) or packets.
fn item_ends(conn: usize, stream: &[u8]) -> Vec<usize> {
    let mut rest = stream;
    read_frame(&mut rest).expect("a Hello");
    let mut ends = Vec::new();
    while !rest.is_empty() {
        if conn == 0 {
            read_frame(&mut rest).expect("a recorded control frame");
        } else {
            let h = PacketHeader::decode(rest[..32].try_into().unwrap()).expect("a recorded packet");
            rest = &rest[h.wire_len()..];
        }
        ends.push(stream.len() - rest.len());
    }
    ends
}

/// The schedule of a recording: each control frame and packet in the order its last byte
/// reached the proxy (byte k: connection k delivers its next item).
fn schedule(rec: &Recording) -> Vec<u8> {
    let mut items: Vec<(usize, usize, usize)> = Vec::new(); // (arrival, connection, item)
    for (conn, stream) in rec.streams.iter().enumerate() {
        for (i, end) in item_ends(conn, stream).into_iter().enumerate() {
            let arrival = rec.arrivals.iter().position(|&(c, len)| c == conn && len >= end).unwrap();
            items.push((arrival, conn, i));
        }
    }
    items.sort();
    items.into_iter().map(|(_, conn, _)| conn as u8).collect()
}

/// The destination's guest in a postcopy recording: reads every page, last region first, as
/// soon as it starts, so it faults on pages still on the source (page requests, answered on
/// the urgent channel).
#[derive(Default)]
struct Toucher {
    memory: Option<GuestMemory>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl DestinationWorkload for Toucher {
    fn resume(&mut self, _: &[u8]) -> Result<(), WorkloadError> {
        let m = self.memory.clone().unwrap();
        self.thread = Some(std::thread::spawn(move || {
            let mut sum = 0u64;
            for r in m.regions().iter().rev() {
                for p in (0..r.pages()).rev() {
                    // SAFETY: inside the region; read only.
                    sum = sum.wrapping_add(unsafe { r.host_ptr().add(p as usize * PAGE_SIZE + 17).read_volatile() } as u64);
                }
            }
            sum
        }));
        Ok(())
    }
}

/// Everything on the first call, then a few pages of ram0 and ram1 (a second round); with
/// `.1`, all of ram0 on the third call (the pages postcopy discards).
struct SomeRounds(u32, bool);

impl DirtyTracker for SomeRounds {
    fn start(&mut self, _: &GuestMemory) -> Result<(), DirtyError> {
        Ok(())
    }
    fn collect(&mut self, into: &mut DirtyPages) -> Result<(), DirtyError> {
        self.0 += 1;
        if self.0 == 1 {
            for i in 0..into.regions().len() {
                into.region_mut(i).set_all();
            }
        } else if self.0 == 3 && self.1 {
            into.region_mut(0).set_all();
        } else if self.0 <= 3 {
            for p in [1, 2, 5, 9] {
                into.region_mut(0).set(p);
            }
            into.region_mut(1).set(0);
        }
        Ok(())
    }
    fn guest_may_write(&self) -> bool {
        false
    }
    fn name(&self) -> &'static str {
        "some-rounds"
    }
}

/// The source's guest: text-like, random-looking and zero pages in every region.
fn source_memory() -> GuestMemory {
    let regions = LAYOUT
        .iter()
        .enumerate()
        .map(|(r, &(name, pages))| {
            let m = MmapRegion::anonymous(name, (pages * PAGE_SIZE) as u64).unwrap();
            // SAFETY: our fresh mapping.
            let bytes = unsafe { std::slice::from_raw_parts_mut(m.host_ptr(), pages * PAGE_SIZE) };
            for (p, page) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
                match (p + r) % 4 {
                    0 => page.fill(0),
                    1 => page.iter_mut().enumerate().for_each(|(i, b)| *b = b"pageferry fuzz seed "[i % 20]),
                    _ => {
                        let mut x = (p * 131 + r * 7 + 1) as u64;
                        for b in page.iter_mut() {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            *b = x as u8;
                        }
                    }
                }
            }
            Arc::new(m) as Arc<dyn MemoryRegion>
        })
        .collect();
    GuestMemory::new(regions).unwrap()
}

/// What one recorded migration does.
struct Case {
    name: &'static str,
    method: &'static str,
    auto: bool,
    fresh: bool,
    flags: u8,
    channels: usize,
    postcopy: bool,
}

/// One real migration through the recording proxy: its `destination` fuzz input.
fn record(c: &Case) -> Vec<u8> {
    let src = source_memory();
    // The destination's memory: fresh anonymous memory, or a used (not fresh) arena.
    let arena = Arena::new(&LAYOUT.iter().map(|&(_, p)| p).collect::<Vec<_>>());
    let dst = if c.fresh {
        GuestMemory::new(LAYOUT.iter().map(|&(n, p)| Arc::new(MmapRegion::anonymous(n, (p * PAGE_SIZE) as u64).unwrap()) as Arc<dyn MemoryRegion>).collect()).unwrap()
    } else {
        let regions = LAYOUT
            .iter()
            .enumerate()
            // SAFETY: span i of `arena`, alive until the migration ends.
            .map(|(i, &(n, p))| Arc::new(unsafe { MmapRegion::from_raw(n, arena.ptr(i), (p * PAGE_SIZE) as u64, false) }.unwrap()) as Arc<dyn MemoryRegion>)
            .collect();
        GuestMemory::new(regions).unwrap()
    };
    let mut spec = CodecSpec::new(Method::by_name(c.method).unwrap());
    spec.qatzip.provider = pageferry::codec::qatzip::Provider::Cpu;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (proxy, rec) = recording_proxy(listener.local_addr().unwrap().to_string());
    let dcfg = DestinationConfig { codec: spec.clone(), require_verify: !c.postcopy, ..Default::default() };
    let mut scfg = SourceConfig { channels: c.channels, codec: spec, auto: c.auto.then(Default::default), ..Default::default() };
    if c.postcopy {
        // Two pre-copy rounds, then postcopy; slow enough that the destination's guest faults
        // on discarded pages before the background push brings them.
        scfg.postcopy = Some(PostcopyConfig { after_rounds: Some(2) });
        scfg.downtime_limit = std::time::Duration::ZERO;
        scfg.max_bandwidth = Some(200_000);
    }
    let mut toucher = Toucher { memory: Some(dst.clone()), thread: None };
    std::thread::scope(|s| {
        let d = s.spawn(|| if c.postcopy { engine::run_destination(&listener, &dst, &mut toucher, &dcfg) } else { engine::run_destination(&listener, &dst, &mut NoWorkload, &dcfg) });
        let r = engine::run_source(&proxy, &src, &mut SomeRounds(0, c.postcopy), &mut NoWorkload, &scfg, &NoProgress).unwrap();
        assert_eq!(r.verified, !c.postcopy);
        let d = d.join().unwrap().unwrap();
        if c.postcopy {
            assert!(r.postcopy_pages_requested > 0, "{}: the guest asked for no page ({:?})", c.name, d.postcopy);
        }
    });
    if let Some(t) = toucher.thread.take() {
        t.join().unwrap();
    }
    assert_eq!(src.digest(), dst.digest());
    let rec = rec.lock().unwrap();
    assert_eq!(rec.streams.len(), 1 + c.channels + c.postcopy as usize, "control, the data channels, the urgent channel");
    let schedule = schedule(&rec);
    let streams: Vec<&[u8]> = rec.streams[1..].iter().map(|s| &s[..]).collect();
    let flags = c.flags | if c.fresh { FRESH } else { 0 } | if c.postcopy { NO_VERIFY } else { 0 };
    harness::destination_input(flags, &rec.streams[0], &schedule, &streams)
}

/// `cargo test --release -p pageferry --test fuzz_corpus write_destination_seed_corpus -- --ignored`
/// writes fuzz/corpus/destination/ok-*: recorded migrations (methods, auto, fresh and used
/// destination memory, in place and through buffers, one and two data channels, postcopy with
/// page requests), each with the order its items arrived in, each checked to replay to
/// completion.
#[test]
#[ignore]
fn write_destination_seed_corpus() {
    let dir = corpus().join("destination");
    std::fs::create_dir_all(&dir).unwrap();
    let case = |name, method, auto, fresh, flags, channels, postcopy| Case { name, method, auto, fresh, flags, channels, postcopy };
    let cases = [
        case("ok-none-fresh", "none", false, true, 0, 1, false),
        case("ok-none-used", "none", false, false, 0, 1, false),
        case("ok-none-buffered", "none", false, false, NO_ZERO_COPY, 1, false),
        case("ok-zlib-fresh", "zlib", false, true, 0, 1, false),
        case("ok-zstd-used", "zstd", false, false, 0, 1, false),
        case("ok-zstd-buffered", "zstd", false, true, NO_ZERO_COPY, 1, false),
        case("ok-qatzip-used", "qatzip", false, false, 0, 1, false),
        case("ok-auto-fresh", "zstd", true, true, 0, 1, false),
        case("ok-none-2ch-used", "none", false, false, 0, 2, false),
        case("ok-zstd-2ch-fresh", "zstd", false, true, 0, 2, false),
        case("ok-zlib-2ch-buffered", "zlib", false, false, NO_ZERO_COPY, 2, false),
        case("ok-none-postcopy-used", "none", false, false, 0, 1, true),
        case("ok-zstd-2ch-postcopy-fresh", "zstd", false, true, 0, 2, true),
        case("ok-qatzip-2ch-postcopy-used", "qatzip", false, false, 0, 2, true),
    ];
    for c in &cases {
        let input = record(c);
        let report = harness::destination(&input).unwrap().unwrap_or_else(|e| panic!("{} does not replay: {e}", c.name));
        assert_eq!(report.verified, !c.postcopy);
        assert_eq!(report.postcopy.is_some(), c.postcopy);
        std::fs::write(dir.join(c.name), &input).unwrap();
    }
}
