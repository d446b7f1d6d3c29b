//! A hand-crafted "evil source" against a real [`run_destination`]: every malformed, corrupt,
//! truncated or out-of-order input must end the migration with an error that names the cause
//! — never a panic, a hang or a reported success — and must leave the destination's memory
//! outside the pages a packet legitimately targets untouched (a 0xCC canary). Plus handshake
//! tests with the real [`run_source`], and the round-ordering rule (a late stale copy never
//! wins).

use super::*;
use crate::codec::{self, Codec, CodecSpec, Method};
use crate::dirty::StaticTracker;
use crate::memory::{GuestMemory, MemoryRegion, MmapRegion, PAGE_SIZE};
use crate::wire::{self, encode_packet, Control, Hello, PacketHeader, PacketKind, Role, SessionId, VersionRange, PROTOCOL_VERSION};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn named(name: &str) -> Method {
    name.parse().unwrap()
}

/// Longest a destination may take to notice anything; beyond it the test fails as a hang.
const WATCHDOG: Duration = Duration::from_secs(20);
const IO: Duration = Duration::from_secs(10);
const CANARY: u8 = 0xCC;
/// Region sizes (pages) of the destination under attack.
const LAYOUT: [u64; 2] = [64, 16];

/// A region that never claims to be freshly zeroed (so zero pages are always written).
struct NotFresh(MmapRegion);

// SAFETY: delegates to an MmapRegion, which upholds the contract.
unsafe impl MemoryRegion for NotFresh {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn host_ptr(&self) -> *mut u8 {
        self.0.host_ptr()
    }
}

fn memory_filled(pages: &[u64], fill: u8) -> GuestMemory {
    let regions = pages
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let r = MmapRegion::anonymous(&format!("ram{i}"), n * PAGE_SIZE as u64).unwrap();
            unsafe { std::ptr::write_bytes(r.host_ptr(), fill, r.len() as usize) };
            Arc::new(NotFresh(r)) as Arc<dyn MemoryRegion>
        })
        .collect();
    GuestMemory::new(regions).unwrap()
}

fn region_bytes(m: &GuestMemory, id: usize) -> &[u8] {
    let r = m.region(id).unwrap();
    unsafe { std::slice::from_raw_parts(r.host_ptr(), r.len() as usize) }
}

/// One page of recognisable, compressible content.
fn page(tag: u8) -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| (i as u8).wrapping_mul(7) ^ tag).collect()
}

fn pages(tags: &[u8]) -> Vec<u8> {
    tags.iter().flat_map(|&t| page(t)).collect()
}

/// What the destination's memory must hold: the canary, except pages set by valid packets.
struct Model {
    regions: Vec<Vec<u8>>,
}

impl Model {
    fn canary() -> Self {
        Self { regions: LAYOUT.iter().map(|&n| vec![CANARY; n as usize * PAGE_SIZE]).collect() }
    }
    fn set(&mut self, region: usize, page_no: u32, content: &[u8]) {
        let at = page_no as usize * PAGE_SIZE;
        self.regions[region][at..at + PAGE_SIZE].copy_from_slice(content);
    }
    fn page(&self, region: usize, page_no: u32) -> &[u8] {
        let at = page_no as usize * PAGE_SIZE;
        &self.regions[region][at..at + PAGE_SIZE]
    }
    /// The digest a correct source would announce for this content.
    fn digest(&self) -> u128 {
        let m = memory_filled(&LAYOUT, 0);
        for (i, r) in self.regions.iter().enumerate() {
            unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), m.region(i).unwrap().host_ptr(), r.len()) };
        }
        m.digest()
    }
    /// Every page equals the model, except `loose` pages (the targets of a packet that failed
    /// half-way, which the destination may have partly written in place).
    fn check(&self, m: &GuestMemory, loose: &[(usize, u32)]) {
        for (rid, want) in self.regions.iter().enumerate() {
            let got = region_bytes(m, rid);
            for (p, (g, w)) in got.chunks(PAGE_SIZE).zip(want.chunks(PAGE_SIZE)).enumerate() {
                if loose.contains(&(rid, p as u32)) {
                    continue;
                }
                if g != w {
                    let at = g.iter().zip(w).position(|(a, b)| a != b).unwrap();
                    panic!("region {rid} page {p} byte {at}: destination has {:#04x}, expected {:#04x}", g[at], w[at]);
                }
            }
        }
    }
}

/// Records what the destination resumed with.
#[derive(Clone, Default)]
struct Recorder {
    resumed: Arc<Mutex<Option<Vec<u8>>>>,
}

impl DestinationWorkload for Recorder {
    fn resume(&mut self, device_state: &[u8]) -> Result<(), WorkloadError> {
        *self.resumed.lock().unwrap() = Some(device_state.to_vec());
        Ok(())
    }
}

type DestResult = Result<DestinationReport, MigrationError>;

/// Run a real destination that accepts only `method` on its own thread; its result arrives
/// on the receiver.
fn spawn_destination(listener: TcpListener, memory: GuestMemory, method: Method, recorder: Recorder) -> Receiver<DestResult> {
    spawn_destination_with(listener, memory, recorder, dest_config(method))
}

/// What [`spawn_destination`] runs with: only `method`, 10 s to accept, 10 s stall timeout.
fn dest_config(method: Method) -> DestinationConfig {
    DestinationConfig { codec: CodecSpec::new(method), only: true, accept_timeout: IO, stall_timeout: IO, ..Default::default() }
}

/// A real destination with `config` on its own thread; its result arrives on the receiver.
fn spawn_destination_with(listener: TcpListener, memory: GuestMemory, recorder: Recorder, config: DestinationConfig) -> Receiver<DestResult> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("pf-test-dst".into())
        .spawn(move || {
            let mut w = recorder;
            let _ = tx.send(run_destination(&listener, &memory, &mut w, &config));
        })
        .unwrap();
    rx
}

/// The destination's result, or a test failure if it hangs or panics.
fn await_destination(rx: &Receiver<DestResult>) -> DestResult {
    match rx.recv_timeout(WATCHDOG) {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) => panic!("destination hung: no result after {WATCHDOG:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("destination thread panicked"),
    }
}

fn hello(session: SessionId, role: Role, channel: u16, channels: u16, method: Method, regions: Vec<(String, u64)>) -> Control {
    Control::Hello(Hello {
        versions: VersionRange::SUPPORTED,
        session,
        role,
        channel,
        channels,
        method: method.code(),
        level: method.default_level(),
        regions,
        wants: Default::default(),
        verify: true,
    })
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(IO)).unwrap();
    s.set_write_timeout(Some(IO)).unwrap();
    s
}

fn expect_welcome(s: &mut TcpStream) {
    match wire::read_frame_at(s, PROTOCOL_VERSION).unwrap() {
        (Control::Welcome { .. }, _) => {}
        (other, _) => panic!("expected Welcome, got {other:?}"),
    }
}

/// A source that speaks the protocol by hand, after a correct handshake.
struct Evil {
    ctl: TcpStream,
    data: Vec<TcpStream>,
    nums: Vec<u64>,
    method: Method,
    codec: Box<dyn Codec>,
    dest: Receiver<DestResult>,
    recorder: Recorder,
    memory: GuestMemory,
}

impl Evil {
    fn start(method: Method, channels: u16) -> Self {
        let memory = memory_filled(&LAYOUT, CANARY);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let recorder = Recorder::default();
        let dest = spawn_destination(listener, memory.clone(), method, recorder.clone());
        let session = SessionId::random();
        let mut ctl = connect(&addr);
        wire::write_frame(&mut ctl, PROTOCOL_VERSION, &hello(session, Role::Control, 0, channels, method, memory.layout()), &[]).unwrap();
        expect_welcome(&mut ctl);
        let data = (0..channels)
            .map(|i| {
                let mut s = connect(&addr);
                wire::write_frame(&mut s, PROTOCOL_VERSION, &hello(session, Role::Data, i, channels, method, memory.layout()), &[]).unwrap();
                expect_welcome(&mut s);
                s
            })
            .collect();
        let codec = codec::open(&CodecSpec::new(method)).unwrap();
        Self { ctl, data, nums: vec![0; channels as usize], method, codec, dest, recorder, memory }
    }

    /// Header, offsets, payload and CRC32C of a packet, numbered as the next on `ch`.
    fn packet(&mut self, ch: usize, mut h: PacketHeader, offsets: &[u32], payload: &[u8]) -> Vec<u8> {
        h.packet_num = self.nums[ch];
        self.nums[ch] = self.nums[ch].wrapping_add(1);
        h.payload_len = payload.len() as u32;
        encode(&h, offsets, payload)
    }

    /// A valid pages packet: `content` holds the normal pages, compressed with the method
    /// (raw for `none`).
    fn pages(&mut self, ch: usize, round: u32, region: u16, normal: &[u32], zero: &[u32], content: &[u8]) -> Vec<u8> {
        assert_eq!(content.len(), normal.len() * PAGE_SIZE);
        let (raw, payload) = self.compress(content);
        let h = header(self.method, raw, round, region, normal.len(), zero.len());
        self.packet(ch, h, &[normal, zero].concat(), &payload)
    }

    fn compress(&mut self, content: &[u8]) -> (bool, Vec<u8>) {
        if content.is_empty() {
            return (false, Vec::new());
        }
        let mut out = vec![0u8; self.codec.max_compressed_len(content.len()).max(content.len())];
        match self.codec.compress(content, &mut out).unwrap() {
            Some(n) if n < content.len() => (false, out[..n].to_vec()),
            _ => (true, content.to_vec()),
        }
    }

    fn sync(&mut self, ch: usize, round: u32) -> Vec<u8> {
        let h = PacketHeader::sync(self.method.code(), round, 0);
        self.packet(ch, h, &[], &[])
    }

    /// Write bytes to a data channel; errors are ignored (the destination may already have
    /// hung up, which is what some tests provoke).
    fn send(&mut self, ch: usize, bytes: &[u8]) {
        let _ = self.data[ch].write_all(bytes);
    }

    /// Next control message (the destination's RoundDone, Done or Abort).
    fn control(&mut self) -> Control {
        wire::read_frame_at(&mut self.ctl, PROTOCOL_VERSION).unwrap_or_else(|e| panic!("reading the control channel: {e}")).0
    }

    fn expect_round_done(&mut self, round: u32) {
        match self.control() {
            Control::RoundDone { round: r, .. } if r == round => {}
            other => panic!("expected RoundDone {{ round: {round} }}, got {other:?}"),
        }
    }

    fn finish(&mut self, round: u32, digest: Option<String>, state: &[u8]) {
        wire::write_frame(&mut self.ctl, PROTOCOL_VERSION, &Control::Finish { round, digest }, state).unwrap();
    }

    /// The destination must fail, naming every needle; it must tell the source the same
    /// reason on the control channel and must not have resumed a workload.
    fn expect_failure(mut self, needles: &[&str]) -> (String, GuestMemory) {
        let e = match await_destination(&self.dest) {
            Ok(r) => panic!("destination reported success on hostile input: {r:?}"),
            Err(e) => e.to_string(),
        };
        eprintln!("destination refused hostile input: {e}");
        for n in needles {
            assert!(e.contains(n), "destination error '{e}' does not mention '{n}'");
        }
        assert!(self.recorder.resumed.lock().unwrap().is_none(), "a failed migration resumed the workload");
        // The Abort on the control channel carries the same reason (after any RoundDone).
        loop {
            match wire::read_frame_at(&mut self.ctl, PROTOCOL_VERSION) {
                Ok((Control::RoundDone { .. }, _)) => continue,
                Ok((Control::Abort { reason }, _)) => {
                    assert_eq!(reason, e, "the Abort sent to the source differs from the destination's error");
                    break;
                }
                Ok((other, _)) => panic!("expected Abort, got {other:?}"),
                Err(err) => panic!("no Abort on the control channel ({err}); destination said '{e}'"),
            }
        }
        (e, self.memory.clone())
    }
}

fn header(method: Method, raw: bool, round: u32, region: u16, normal: usize, zero: usize) -> PacketHeader {
    PacketHeader { kind: PacketKind::Pages, raw, method: method.code(), region, normal: normal as u16, zero: zero as u16, round, packet_num: 0, payload_len: 0 }
}

fn encode(h: &PacketHeader, offsets: &[u32], payload: &[u8]) -> Vec<u8> {
    let offs: Vec<u8> = offsets.iter().flat_map(|p| p.to_le_bytes()).collect();
    encode_packet(h, &offs, payload)
}

fn zstd_frame(content: &[u8], with_size: bool) -> Vec<u8> {
    let mut c = zstd::bulk::Compressor::new(1).unwrap();
    c.include_contentsize(with_size).unwrap();
    c.compress(content).unwrap()
}

// ---- bad input on a data channel ----

#[test]
fn truncated_packet_fails_as_closed() {
    // Cut a raw contiguous packet and a raw scattered one (both read straight into guest
    // memory) at every interesting point: in the header, the offsets, the payload, the CRC.
    for scattered in [false, true] {
        let targets: &[u32] = if scattered { &[10, 12, 13, 20] } else { &[10, 11, 12, 13] };
        let full_len = 32 + 16 + 4 * PAGE_SIZE + 4;
        for cut in [10, 32 + 6, 32 + 16 + 2 * PAGE_SIZE + 5, full_len - 1] {
            let mut ev = Evil::start(named("none"), 1);
            let mut model = Model::canary();
            let first = ev.pages(0, 0, 0, &[0, 1], &[], &pages(&[1, 2]));
            ev.send(0, &first);
            model.set(0, 0, &page(1));
            model.set(0, 1, &page(2));
            let bad = ev.pages(0, 0, 0, targets, &[], &pages(&[3, 4, 5, 6]));
            assert_eq!(bad.len(), full_len);
            ev.send(0, &bad[..cut]);
            ev.data[0].shutdown(Shutdown::Write).unwrap();
            let (e, mem) = ev.expect_failure(&["closed", "channel 0"]);
            assert!(e.contains("did the source die"), "{e}");
            // A raw payload is written in place before its CRC is checked: only its target
            // pages may have changed.
            let loose: Vec<_> = targets.iter().map(|&p| (0, p)).collect();
            model.check(&mem, &loose);
        }
    }
}

#[test]
fn peer_dying_mid_round_fails_without_touching_other_memory() {
    let mut ev = Evil::start(named("none"), 2);
    let a = ev.pages(0, 0, 0, &[0, 1, 2, 3], &[], &pages(&[1, 2, 3, 4]));
    ev.send(0, &a);
    let s = ev.sync(0, 0);
    ev.send(0, &s);
    let b = ev.pages(1, 0, 1, &[3, 5], &[7], &pages(&[5, 6]));
    ev.send(1, &b);
    // The source process dies: every socket closes, round 0 never completes.
    drop(std::mem::take(&mut ev.data));
    ev.ctl.shutdown(Shutdown::Both).unwrap();
    let e = match await_destination(&ev.dest) {
        Ok(r) => panic!("destination reported success after the source died: {r:?}"),
        Err(e) => e.to_string(),
    };
    // Whichever socket the destination noticed first: a data channel or the control channel.
    assert!(e.contains("closed") && e.contains("die?"), "{e}");
    assert!(ev.recorder.resumed.lock().unwrap().is_none());
    // The packets sent may or may not have been applied before the destination noticed;
    // nothing else may have changed.
    let loose: Vec<_> = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 3), (1, 5), (1, 7)].into();
    Model::canary().check(&ev.memory, &loose);
}

#[test]
fn crc_mismatch_in_payload_fails() {
    // Raw, contiguous or scattered: the payload lands in place before the CRC is checked, so
    // only its target pages may differ.
    for targets in [[5u32, 6, 7], [5, 7, 9]] {
        let mut ev = Evil::start(named("none"), 1);
        let mut bad = ev.pages(0, 0, 0, &targets, &[], &pages(&[1, 2, 3]));
        bad[32 + 12 + PAGE_SIZE + 100] ^= 0x20;
        ev.send(0, &bad);
        let (e, mem) = ev.expect_failure(&["CRC32C mismatch", "channel 0 in round 0"]);
        assert!(e.starts_with("protocol error"), "{e}");
        Model::canary().check(&mem, &targets.map(|p| (0, p)));
    }

    // Compressed (contiguous or not): checked before anything is written.
    for (method, targets) in [(named("zstd"), &[5u32, 6, 7][..]), (named("zstd"), &[5, 7, 9]), (named("zlib"), &[5, 6, 7]), (named("zlib"), &[5, 7, 9])] {
        let mut ev = Evil::start(method, 1);
        let mut bad = ev.pages(0, 0, 0, targets, &[11], &pages(&[1, 2, 3]));
        let n = bad.len();
        bad[n - 4 - 3] ^= 0x01; // last payload bytes
        ev.send(0, &bad);
        let (_, mem) = ev.expect_failure(&["CRC32C mismatch"]);
        Model::canary().check(&mem, &[]);
    }

    // A flipped bit in the offsets (still a valid page list: 5 becomes 4) or in the CRC.
    for (at, bit) in [(32usize, 0x01u8), (usize::MAX, 0x80)] {
        let mut ev = Evil::start(named("zstd"), 1);
        let mut bad = ev.pages(0, 0, 0, &[5, 6], &[], &pages(&[1, 2]));
        let i = if at == usize::MAX { bad.len() - 1 } else { at };
        bad[i] ^= bit;
        ev.send(0, &bad);
        let (_, mem) = ev.expect_failure(&["CRC32C mismatch"]);
        Model::canary().check(&mem, &[]);
    }
}

#[test]
fn garbage_payload_with_valid_crc_fails_to_decompress() {
    for (method, targets) in [(named("zstd"), &[3u32, 4][..]), (named("zstd"), &[3, 9]), (named("zlib"), &[3, 4]), (named("zlib"), &[3, 9])] {
        let mut ev = Evil::start(method, 1);
        let garbage: Vec<u8> = (0..1000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let h = header(method, false, 0, 0, 2, 0);
        let pkt = ev.packet(0, h, targets, &garbage);
        ev.send(0, &pkt);
        let (e, mem) = ev.expect_failure(&[&format!("{method} decompression failed"), "channel 0 in round 0"]);
        assert!(!e.contains("CRC"), "{e}");
        let loose: Vec<_> = targets.iter().map(|&p| (0usize, p)).collect();
        Model::canary().check(&mem, &loose);
    }
}

#[test]
fn pages_outside_the_region_are_rejected() {
    for (region, normal, zero) in [(1u16, &[15u32, 16][..], &[][..]), (1, &[0], &[16]), (0, &[], &[u32::MAX]), (0, &[1, 64], &[])] {
        let mut ev = Evil::start(named("none"), 1);
        let tags: Vec<u8> = (0..normal.len() as u8).collect();
        let bad = ev.pages(0, 0, region, normal, zero, &pages(&tags));
        ev.send(0, &bad);
        let (e, mem) = ev.expect_failure(&["outside region", &format!("region {region} of {} pages", LAYOUT[region as usize])]);
        assert!(e.contains("malformed packet"), "{e}");
        Model::canary().check(&mem, &[]);
    }
}

#[test]
fn payload_inflating_beyond_its_batch_is_rejected() {
    // A zstd frame of 2 pages declared as 1 normal page, with and without the content size
    // in the frame: the decompressor must stop at the page, never write past it.
    for with_size in [true, false] {
        let mut ev = Evil::start(named("zstd"), 1);
        let frame = zstd_frame(&pages(&[1, 2]), with_size);
        assert!(frame.len() < PAGE_SIZE);
        let pkt = ev.packet(0, header(named("zstd"), false, 0, 0, 1, 0), &[7], &frame);
        ev.send(0, &pkt);
        let (_, mem) = ev.expect_failure(&["zstd decompression failed"]);
        Model::canary().check(&mem, &[(0, 7)]);
    }
    // Scattered target pages (decompressed into a bounce buffer): same.
    let mut ev = Evil::start(named("zstd"), 1);
    let frame = zstd_frame(&pages(&[1, 2, 3]), false);
    let pkt = ev.packet(0, header(named("zstd"), false, 0, 0, 2, 0), &[7, 9], &frame);
    ev.send(0, &pkt);
    let (_, mem) = ev.expect_failure(&["zstd decompression failed"]);
    Model::canary().check(&mem, &[]);
    // And the other way round: a frame of 1 page declared as 2 pages.
    let mut ev = Evil::start(named("zstd"), 1);
    let frame = zstd_frame(&page(1), true);
    let pkt = ev.packet(0, header(named("zstd"), false, 0, 0, 2, 0), &[7, 8], &frame);
    ev.send(0, &pkt);
    let (e, mem) = ev.expect_failure(&["zstd decompression failed"]);
    assert!(e.contains("inflated to 4096 bytes, expected 8192") || e.contains("Src size"), "{e}");
    Model::canary().check(&mem, &[(0, 7), (0, 8)]);
}

#[test]
fn wrong_or_unknown_method_in_a_packet_is_rejected() {
    // A raw packet of method none on a zstd migration.
    let mut ev = Evil::start(named("zstd"), 1);
    let pkt = ev.packet(0, header(named("none"), true, 0, 0, 1, 0), &[2], &page(1));
    ev.send(0, &pkt);
    let (_, mem) = ev.expect_failure(&["method none on a zstd migration"]);
    Model::canary().check(&mem, &[]);
    // A method code nobody knows.
    let mut ev = Evil::start(named("zstd"), 1);
    let mut pkt = ev.packet(0, header(named("zstd"), false, 0, 0, 1, 0), &[2], &zstd_frame(&page(1), true));
    pkt[6] = 9;
    ev.send(0, &pkt);
    let (_, mem) = ev.expect_failure(&["unknown method code 9"]);
    Model::canary().check(&mem, &[]);
}

#[test]
fn packet_of_a_completed_round_is_rejected_and_never_applied() {
    let mut ev = Evil::start(named("none"), 1);
    let mut model = Model::canary();
    let a = ev.pages(0, 0, 0, &[2], &[], &page(1));
    ev.send(0, &a);
    let s = ev.sync(0, 0);
    ev.send(0, &s);
    ev.expect_round_done(0);
    model.set(0, 2, &page(1));
    // A late copy of round 0 with other content, after round 0 has completed.
    let stale = ev.pages(0, 0, 0, &[2], &[], &page(9));
    ev.send(0, &stale);
    let (e, mem) = ev.expect_failure(&["of round 0 during round 1", "stale"]);
    assert!(e.contains("channel 0 in round 1"), "{e}");
    model.check(&mem, &[]);
}

#[test]
fn packet_number_gap_or_replay_is_rejected() {
    for next in [2u64, 0, u64::MAX] {
        let mut ev = Evil::start(named("none"), 1);
        let mut model = Model::canary();
        let a = ev.pages(0, 0, 0, &[1], &[], &page(1));
        ev.send(0, &a);
        model.set(0, 1, &page(1));
        ev.nums[0] = next;
        let b = ev.pages(0, 0, 0, &[2], &[], &page(2));
        ev.send(0, &b);
        let (_, mem) = ev.expect_failure(&[&format!("number {next} where 1 was expected")]);
        model.check(&mem, &[]);
    }
}

#[test]
fn sync_for_the_wrong_round_is_rejected() {
    // Sync(1) while round 0 is open; and Sync(0) again once round 0 is over.
    let mut ev = Evil::start(named("none"), 2);
    let s = ev.sync(0, 0);
    ev.send(0, &s);
    let s = ev.sync(1, 1);
    ev.send(1, &s);
    ev.expect_failure(&["round 1 during round 0"]);

    let mut ev = Evil::start(named("none"), 1);
    let s = ev.sync(0, 0);
    ev.send(0, &s);
    ev.expect_round_done(0);
    let s = ev.sync(0, 0);
    ev.send(0, &s);
    let (_, mem) = ev.expect_failure(&["round 0 during round 1"]);
    Model::canary().check(&mem, &[]);
}

#[test]
fn unknown_region_id_is_rejected() {
    for region in [2u16, u16::MAX] {
        let mut ev = Evil::start(named("none"), 1);
        let pkt = ev.pages(0, 0, region, &[0], &[], &page(1));
        ev.send(0, &pkt);
        let (_, mem) = ev.expect_failure(&[&format!("region {region} does not exist (2 regions)")]);
        Model::canary().check(&mem, &[]);
    }
}

#[test]
fn finish_with_a_wrong_digest_is_a_verification_failure() {
    let mut ev = Evil::start(named("none"), 1);
    let mut model = Model::canary();
    let a = ev.pages(0, 0, 0, &[0], &[1], &page(1));
    ev.send(0, &a);
    let s = ev.sync(0, 0);
    ev.send(0, &s);
    ev.expect_round_done(0);
    model.set(0, 0, &page(1));
    model.set(0, 1, &[0u8; PAGE_SIZE]);
    let right = model.digest();
    ev.finish(0, Some(format!("{:032x}", right ^ 1)), b"state");
    let (e, mem) = ev.expect_failure(&["verification failed", &format!("{:032x}", right ^ 1), &format!("{right:032x}")]);
    assert!(!e.contains("success"));
    model.check(&mem, &[]);

    // A digest that is not even hex.
    let mut ev = Evil::start(named("none"), 1);
    let s = ev.sync(0, 0);
    ev.send(0, &s);
    ev.expect_round_done(0);
    ev.finish(0, Some("not a digest".into()), b"");
    ev.expect_failure(&["bad digest"]);
}

#[test]
fn finish_for_a_round_already_passed_is_rejected() {
    let mut ev = Evil::start(named("none"), 1);
    for round in 0..2 {
        let s = ev.sync(0, round);
        ev.send(0, &s);
        ev.expect_round_done(round);
    }
    ev.finish(0, None, b"");
    ev.expect_failure(&["Finish", "for round 0 after round Some(1)"]);
}

#[test]
fn abort_from_the_source_ends_the_destination_with_its_reason() {
    let mut ev = Evil::start(named("none"), 1);
    wire::write_frame(&mut ev.ctl, PROTOCOL_VERSION, &Control::Abort { reason: "operator pressed ^C".into() }, &[]).unwrap();
    let e = await_destination(&ev.dest).unwrap_err().to_string();
    assert!(e.contains("peer aborted") && e.contains("operator pressed ^C"), "{e}");
}

// ---- the round-ordering rule ----

#[test]
fn late_stale_copy_never_wins() {
    for method in [named("none"), named("zstd")] {
        let mut ev = Evil::start(method, 2);
        let mut model = Model::canary();
        const P: u32 = 5;
        let (a, b) = (page(0xA0), page(0xB0));
        // Channel 1 races ahead: it ends round 0 at once, then sends round 1's copy of P (B)
        // and ends round 1. Its reader must stop at the gate after Sync(0).
        let s = ev.sync(1, 0);
        ev.send(1, &s);
        let newer = ev.pages(1, 1, 0, &[P], &[], &b);
        ev.send(1, &newer);
        let s = ev.sync(1, 1);
        ev.send(1, &s);
        // Give channel 1's reader every chance to misbehave (correctness does not depend on
        // this pause; the gate enforces it).
        std::thread::sleep(Duration::from_millis(30));
        // Only now, last in wall-clock terms, channel 0 delivers round 0's copy of P (A).
        let older = ev.pages(0, 0, 0, &[P], &[], &a);
        ev.send(0, &older);
        let s = ev.sync(0, 0);
        ev.send(0, &s);
        ev.expect_round_done(0);
        let s = ev.sync(0, 1);
        ev.send(0, &s);
        ev.expect_round_done(1);
        model.set(0, P, &b);
        ev.finish(1, Some(format!("{:032x}", model.digest())), b"device state");
        match ev.control() {
            Control::Done { report } => assert_eq!(report.rounds, 2, "{report:?}"),
            other => panic!("{method}: expected Done, got {other:?}"),
        }
        let report = await_destination(&ev.dest).unwrap_or_else(|e| panic!("{method}: {e}"));
        assert!(report.verified);
        assert_eq!(report.pages, 2);
        assert_eq!(ev.recorder.resumed.lock().unwrap().as_deref(), Some(&b"device state"[..]));
        assert_eq!(model.page(0, P), &b[..]);
        model.check(&ev.memory, &[]);
    }
}

#[test]
fn valid_zero_only_packets_are_applied() {
    // A batch of zero pages only (no payload) is what a source sends for untouched memory;
    // on a destination that is not fresh, the zeros must be written.
    for method in [named("zlib"), named("zstd"), named("none")] {
        let mut ev = Evil::start(method, 1);
        let mut model = Model::canary();
        let z = ev.pages(0, 0, 1, &[], &[0, 1, 2, 15], &[]);
        ev.send(0, &z);
        let mixed = ev.pages(0, 0, 0, &[3], &[4], &page(3));
        ev.send(0, &mixed);
        let s = ev.sync(0, 0);
        ev.send(0, &s);
        ev.expect_round_done(0);
        for p in [0, 1, 2, 15] {
            model.set(1, p, &[0u8; PAGE_SIZE]);
        }
        model.set(0, 3, &page(3));
        model.set(0, 4, &[0u8; PAGE_SIZE]);
        ev.finish(0, Some(format!("{:032x}", model.digest())), b"");
        match ev.control() {
            Control::Done { .. } => {}
            other => panic!("{method}: expected Done, got {other:?}"),
        }
        await_destination(&ev.dest).unwrap_or_else(|e| panic!("{method}: {e}"));
        model.check(&ev.memory, &[]);
    }
}

#[test]
fn real_source_zero_batches_overwrite_a_non_fresh_destination() {
    // Whole batches of zero pages (untouched guest memory: the common case) travel as
    // offsets only; the destination, not fresh here, must write them.
    let src = memory_filled(&[300, 200], 0);
    for p in (0..300).step_by(7) {
        let at = p * PAGE_SIZE;
        unsafe { std::ptr::copy_nonoverlapping(page(p as u8).as_ptr(), src.region(0).unwrap().host_ptr().add(at), PAGE_SIZE) };
    }
    for method in [named("zstd"), named("zlib"), named("none")] {
        let dst = memory_filled(&[300, 200], CANARY);
        let (r, d) = migrate_with(&src, &dst, source_config(method, 2), method);
        let r = r.unwrap_or_else(|e| panic!("{method}: source: {e}"));
        d.unwrap_or_else(|e| panic!("{method}: destination: {e}"));
        assert!(r.verified);
        assert!(r.zero_pages >= 200 + 250, "{method}: {} zero pages", r.zero_pages);
        assert_eq!(src.digest(), dst.digest(), "{method}");
    }
}

fn source_config(method: Method, channels: usize) -> SourceConfig {
    SourceConfig { channels, codec: CodecSpec::new(method), connect_timeout: Duration::from_secs(5), ..Default::default() }
}

/// The real source against the real destination, each with its own memory and method.
fn migrate_with(src: &GuestMemory, dst: &GuestMemory, scfg: SourceConfig, dst_method: Method) -> (Result<MigrationReport, MigrationError>, DestResult) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dest = spawn_destination(listener, dst.clone(), dst_method, Recorder::default());
    let r = run_source(&addr, src, &mut StaticTracker::new(), &mut NoWorkload, &scfg, &NoProgress);
    (r, await_destination(&dest))
}

#[path = "tests_hostile_handshake.rs"]
mod handshake;
