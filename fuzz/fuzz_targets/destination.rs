//! The whole destination fed from bytes (harness: `pageferry_fuzz::destination`): a source's
//! control stream and up to three channel streams (one or two data channels, postcopy's urgent
//! channel) replayed, in an order the input's schedule decides, through the real handshake
//! checks, channel readers, gate, control loop and postcopy switchover into guest memory with
//! canary pages around every region. Never a panic or a hang, never a write outside the
//! regions, never a page changed that no correct packet named, never a completion that was not
//! checked.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pageferry_fuzz::destination(data);
});
