//! The fuzz harness (fuzz/src/lib.rs) on the stable toolchain: every seed of fuzz/corpus runs
//! through its target's checks, the harness's own checks are shown to fire, and the
//! `destination` seeds are recorded from real migrations (ignored test
//! `write_destination_seed_corpus`).

#[path = "../../../fuzz/src/lib.rs"]
mod harness;

use harness::{Arena, FRESH, LAYOUT, NO_ZERO_COPY};
use pageferry::codec::{CodecSpec, Method};
use pageferry::dirty::{DirtyError, DirtyPages, DirtyTracker};
use pageferry::engine::{self, DestinationConfig, NoProgress, NoWorkload, SourceConfig};
use pageferry::memory::{GuestMemory, MemoryRegion, MmapRegion, PAGE_SIZE};
use pageferry::wire::{PacketHeader, PacketKind};
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
        // Seeds named ok-* are whole recorded migrations: the replay completes them, verified.
        if name.starts_with("ok-") {
            let report = outcome.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(report.verified && report.pages > 0, "{name}: {report:?}");
        }
    }
    assert!(dest.iter().filter(|(n, _)| n.starts_with("ok-")).count() >= 6);
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
    let (_, seed) = seeds("destination").into_iter().find(|(n, _)| n.starts_with("ok-zstd")).expect("an ok-zstd seed");
    let ctl_len = u16::from_le_bytes([seed[1], seed[2]]) as usize;
    let mut data = &seed[3 + ctl_len..];
    pageferry::wire::read_frame(&mut data).expect("the data Hello");
    // The whole recorded stream: every page of the guest was sent by a correct packet.
    let all = harness::allowed_pages(data, true);
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
    assert_eq!(harness::allowed_pages(&bad[data_at..], true), harness::allowed_pages(&data[..pos], true));
    let e = harness::destination(&bad).unwrap().expect_err("a corrupt packet must fail");
    assert!(e.to_string().contains("CRC"), "{e}");
}

// ---- recording the destination seeds ----

/// A TCP proxy recording what the source sends on each connection, in connection order
/// (0: control, 1: data channel 0).
fn recording_proxy(upstream: String) -> (String, Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let streams: Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>> = Arc::default();
    let s = streams.clone();
    std::thread::spawn(move || {
        for down in listener.incoming() {
            let Ok(mut down) = down else { return };
            let mut up = TcpStream::connect(&upstream).unwrap();
            let rec = Arc::new(Mutex::new(Vec::new()));
            s.lock().unwrap().push(rec.clone());
            let (mut down2, mut up2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = down.read(&mut buf) {
                    if n == 0 || up.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                let _ = up.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut up2, &mut down2);
                let _ = down2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, streams)
}

/// Everything on the first call, then a few pages of ram0 and ram1 (a second round).
struct SomeRounds(u32);

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

/// One real migration through the recording proxy: its `destination` fuzz input.
fn record(method: &str, auto: bool, fresh: bool, flags: u8) -> Vec<u8> {
    let src = source_memory();
    // The destination's memory: fresh anonymous memory, or a used (not fresh) arena.
    let arena = Arena::new(&LAYOUT.iter().map(|&(_, p)| p).collect::<Vec<_>>());
    let dst = if fresh {
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
    let mut spec = CodecSpec::new(Method::by_name(method).unwrap());
    spec.qatzip.provider = pageferry::codec::qatzip::Provider::Cpu;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (proxy, streams) = recording_proxy(listener.local_addr().unwrap().to_string());
    let dcfg = DestinationConfig { codec: spec.clone(), ..Default::default() };
    let scfg = SourceConfig { channels: 1, codec: spec, auto: auto.then(Default::default), ..Default::default() };
    std::thread::scope(|s| {
        let d = s.spawn(|| engine::run_destination(&listener, &dst, &mut NoWorkload, &dcfg));
        let r = engine::run_source(&proxy, &src, &mut SomeRounds(0), &mut NoWorkload, &scfg, &NoProgress).unwrap();
        assert!(r.verified);
        d.join().unwrap().unwrap();
    });
    let streams = streams.lock().unwrap();
    assert_eq!(streams.len(), 2, "control and one data channel");
    let (control, data) = (streams[0].lock().unwrap().clone(), streams[1].lock().unwrap().clone());
    harness::destination_input(flags | if fresh { FRESH } else { 0 }, &control, &data)
}

/// `cargo test --release -p pageferry --test fuzz_corpus write_destination_seed_corpus -- --ignored`
/// writes fuzz/corpus/destination/ok-*: recorded migrations (methods, auto, fresh and used
/// destination memory, in place and through buffers), each checked to replay to completion.
#[test]
#[ignore]
fn write_destination_seed_corpus() {
    let dir = corpus().join("destination");
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("ok-none-fresh", "none", false, true, 0),
        ("ok-none-used", "none", false, false, 0),
        ("ok-none-buffered", "none", false, false, NO_ZERO_COPY),
        ("ok-zlib-fresh", "zlib", false, true, 0),
        ("ok-zstd-used", "zstd", false, false, 0),
        ("ok-zstd-buffered", "zstd", false, true, NO_ZERO_COPY),
        ("ok-qatzip-used", "qatzip", false, false, 0),
        ("ok-auto-fresh", "zstd", true, true, 0),
    ];
    for (name, method, auto, fresh, flags) in cases {
        let input = record(method, auto, fresh, flags);
        let report = harness::destination(&input).unwrap().unwrap_or_else(|e| panic!("{name} does not replay: {e}"));
        assert!(report.verified);
        std::fs::write(dir.join(name), &input).unwrap();
    }
}
