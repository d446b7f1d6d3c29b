//! The qatzip decoder on hostile payloads: decompressing into a batch-sized slice between two
//! canary pages either fills the slice or fails; never a panic, never a write outside it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pageferry::codec::{open, CodecSpec, Method, MAX_BATCH_PAGES};

const PAGE: usize = 4096;
const CANARY: u8 = 0xCC;

fuzz_target!(|data: &[u8]| {
    let Some((&pages, payload)) = data.split_first() else { return };
    let n = (pages as usize % MAX_BATCH_PAGES + 1) * PAGE;
    let mut spec = CodecSpec::new(Method::by_name("qatzip").expect("registered"));
    spec.qatzip.provider = pageferry::codec::qatzip::Provider::Cpu;
    let mut codec = open(&spec).expect("codec opens");
    let mut buf = vec![CANARY; n + 2 * PAGE];
    let _ = codec.decompress(payload, &mut buf[PAGE..PAGE + n]);
    assert!(buf[..PAGE].iter().all(|&b| b == CANARY), "write before the output slice");
    assert!(buf[PAGE + n..].iter().all(|&b| b == CANARY), "write after the output slice");
});
