//! pageferry: live migration of guest memory over several parallel channels ("multifd"),
//! each compressing 512 KiB batches with a pluggable method.
//!
//! Seams: [`memory::MemoryRegion`] (whose memory), [`dirty::DirtyTracker`] (which pages
//! changed), [`codec::Codec`] (how a batch is compressed), [`engine::SourceWorkload`] /
//! [`engine::DestinationWorkload`] (what pauses and resumes). The [`engine`] drives them; the
//! [`wire`] module documents the protocol.

pub mod codec;
pub mod dirty;
pub mod engine;
pub mod memory;
pub mod wire;
