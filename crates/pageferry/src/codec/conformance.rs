//! Conformance suite for [`Codec`] implementations: every method and provider must pass it.
//! `make` opens a fresh codec; the suite checks round trips, the raw decision, independence of
//! packets, every malformed-payload case the destination can meet, and — for codecs that claim
//! it — decodability when the input changes during compression.

use super::{Codec, MAX_BATCH_BYTES};
use crate::memory::PAGE_SIZE;

/// Deterministic text-like sample data (compressible, not trivially).
pub fn sample_text(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "memory ", "page ", "migration ", "the ", "of ", "channel ", "compress ", "guest ",
        "dirty ", "round ", "batch ", "zstd ", "<tag> ", "0x1f2e ", "{\n", "};\n",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % 16) as usize].as_bytes());
        if x % 11 == 0 {
            out.extend_from_slice(&x.to_le_bytes()[..3]);
        }
    }
    out.truncate(len);
    out
}

/// Deterministic incompressible data.
pub fn sample_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn compress(c: &mut dyn Codec, input: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![0u8; c.max_compressed_len(input.len()).max(1)];
    let n = c.compress(input, &mut out).expect("compress must not fail on valid input")?;
    assert!(n <= out.len(), "compress claims {n} bytes in a {} byte buffer", out.len());
    out.truncate(n);
    Some(out)
}

/// Run every check against codecs made by `make`.
pub fn run_suite(make: &dyn Fn() -> Box<dyn Codec>) {
    let mut c = make();
    let method = c.info().method;
    assert_eq!(c.compresses(), method.compresses(), "{method}: codec and registry disagree on compressing");
    if !method.compresses() {
        let text = sample_text(MAX_BATCH_BYTES, 1);
        assert!(compress(c.as_mut(), &text).is_none(), "method none must send raw");
        let mut out = vec![0u8; PAGE_SIZE];
        assert!(c.decompress(b"anything", &mut out).is_err());
        return;
    }

    // Round trips: one page, a full batch of text, a zero batch, an odd number of pages.
    for (name, data) in [
        ("one page", sample_text(PAGE_SIZE, 2)),
        ("full batch text", sample_text(MAX_BATCH_BYTES, 3)),
        ("zero batch", vec![0u8; MAX_BATCH_BYTES]),
        ("37 pages", sample_text(37 * PAGE_SIZE, 4)),
    ] {
        let payload = compress(c.as_mut(), &data).unwrap_or_else(|| panic!("{method}: {name} not compressed"));
        assert!(payload.len() < data.len(), "{method}: {name} did not shrink");
        let mut back = vec![0xEEu8; data.len()];
        c.decompress(&payload, &mut back).unwrap_or_else(|e| panic!("{method}: {name}: {e}"));
        assert!(back == data, "{method}: {name} round trip differs");
    }

    // Incompressible data: either declined or not smaller than the input (the engine then
    // sends it raw); if a payload is produced it still decodes.
    let random = sample_random(MAX_BATCH_BYTES, 5);
    if let Some(p) = compress(c.as_mut(), &random) {
        assert!(p.len() as f64 >= random.len() as f64 * 0.98, "{method}: random data shrank suspiciously");
        let mut back = vec![0u8; random.len()];
        c.decompress(&p, &mut back).expect("random payload decodes");
        assert!(back == random);
    }

    // Packets are independent: a fresh codec decodes the second payload of another codec.
    let a = sample_text(8 * PAGE_SIZE, 6);
    let b = sample_text(8 * PAGE_SIZE, 7);
    let _pa = compress(c.as_mut(), &a).unwrap();
    let pb = compress(c.as_mut(), &b).unwrap();
    let mut fresh = make();
    let mut back = vec![0u8; b.len()];
    fresh.decompress(&pb, &mut back).expect("independent packet");
    assert!(back == b);

    // Malformed payloads: errors, never panics, never writes past the output.
    let text = sample_text(16 * PAGE_SIZE, 8);
    let good = compress(c.as_mut(), &text).unwrap();
    let mut guarded = vec![0x5Au8; 16 * PAGE_SIZE + 4096];
    let (out, guard) = guarded.split_at_mut(16 * PAGE_SIZE);
    // Claims to inflate beyond the batch: output one page short.
    let mut short = vec![0u8; 15 * PAGE_SIZE];
    assert!(c.decompress(&good, &mut short).is_err(), "{method}: payload inflating beyond the batch accepted");
    // Inflates to less than the batch.
    let mut long = vec![0u8; 17 * PAGE_SIZE];
    assert!(c.decompress(&good, &mut long).is_err(), "{method}: short payload accepted");
    // Truncated.
    assert!(c.decompress(&good[..good.len() / 2], out).is_err(), "{method}: truncated payload accepted");
    // Garbage and empty.
    assert!(c.decompress(&sample_random(3000, 9), out).is_err(), "{method}: garbage accepted");
    assert!(c.decompress(&[], out).is_err(), "{method}: empty payload accepted");
    // Flipped bits in the middle: error or (rarely) a wrong but bounded result.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xFF;
    let _ = c.decompress(&bad, out);
    assert!(guard.iter().all(|&x| x == 0x5A), "{method}: wrote past the output buffer");
    // Still usable after errors.
    let mut back = vec![0u8; text.len()];
    c.decompress(&good, &mut back).expect("usable after errors");
    assert!(back == text);

    // A codec claiming to tolerate changing input: pages nobody touched decode exactly.
    if c.tolerates_changing_input() {
        changing_input(make);
    }
}

/// A writer thread rewrites the first quarter of the batch (with bytes copied from the rest,
/// to provoke matches) while it is being compressed; every payload must decode to the batch's
/// size, with the untouched three quarters exact.
fn changing_input(make: &dyn Fn() -> Box<dyn Codec>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let len = MAX_BATCH_BYTES;
    let buf: Arc<Vec<u8>> = Arc::new(sample_text(len, 10));
    let ptr = buf.as_ptr() as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let buf = buf.clone();
        std::thread::spawn(move || {
            let _keep = buf;
            let mut x: u64 = 12345;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x as usize) % (len / 4);
                let from = len / 4 + (x >> 20) as usize % (len - len / 4);
                // SAFETY: in bounds; racing byte writes model a guest writing its memory.
                unsafe { ((ptr + off) as *mut u8).write_volatile(*((ptr + from) as *const u8)) };
            }
        })
    };
    let mut c = make();
    let mut d = make();
    let mut out = vec![0u8; c.max_compressed_len(len)];
    let mut back = vec![0u8; len];
    for _ in 0..40 {
        // SAFETY: the slice is only read; concurrent writes model guest activity (see above).
        let input = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        if let Some(n) = c.compress(input, &mut out).expect("compress") {
            d.decompress(&out[..n], &mut back).expect("payload of changing input must decode");
            let untouched = unsafe { std::slice::from_raw_parts((ptr + len / 4) as *const u8, len - len / 4) };
            assert!(back[len / 4..] == *untouched, "untouched pages decoded wrong");
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}
