//! Packet header, page offsets and whole packets (harness: `pageferry_fuzz::packet_header`):
//! a header that decodes has consistent lengths, and offsets that pass `decode_offsets` lie
//! inside the region, strictly increasing within each list.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pageferry_fuzz::packet_header(data));
