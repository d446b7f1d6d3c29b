//! The qatzip decoder (cpu provider: libdeflate walking gzip-ext members) on hostile payloads (harness: `pageferry_fuzz::decode`): decompressing
//! into a slice of 1 to 128 pages between canary pages either fills it or fails; never a
//! panic, never a write outside the slice.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pageferry_fuzz::decode("qatzip", data));
