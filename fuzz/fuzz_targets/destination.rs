//! The whole destination fed from bytes (harness: `pageferry_fuzz::destination`): a source's
//! control and data streams replayed through the real handshake checks, channel reader, gate
//! and control loop into guest memory with canary pages around every region. Never a panic,
//! never a write outside the regions, never a page changed that no correct packet named.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pageferry_fuzz::destination(data);
});
