//! pageferry: live migration of guest memory over several parallel channels ("multifd"),
//! each compressing 512 KiB batches with a pluggable method (`none`, `zlib`, `zstd`, `qatzip`),
//! modelled on QEMU's multifd migration.
//!
//! A source pushes a guest's RAM to a destination over a control channel and N TCP data
//! channels while the guest keeps running: pre-copy rounds resend the pages it dirties until
//! the rest fits the downtime budget, then the source pauses the guest, sends the last pages
//! and its device state, and the destination resumes it.
//!
//! # Seams
//! A VMM plugs in through small traits, each with a shared conformance suite:
//! [`memory::MemoryRegion`] (whose memory: mappings, files, a rust-vmm `GuestMemoryMmap` with
//! the `vm-memory` feature), [`dirty::DirtyTracker`] (which pages changed: userfaultfd,
//! vm-memory's bitmap, a KVM dirty log, or a union of them), [`codec::Codec`] (how a batch is
//! compressed) and [`engine::SourceWorkload`] / [`engine::DestinationWorkload`] (what pauses
//! and resumes). The [`engine`] drives them; the [`wire`] module documents the protocol.
//!
//! # Quick start
//! Migrate 8 MiB of memory between two threads over loopback with zstd:
//!
//! ```
//! use pageferry::codec::{CodecSpec, Method};
//! use pageferry::dirty::StaticTracker;
//! use pageferry::engine::{self, NoWorkload};
//! use pageferry::memory::{GuestMemory, MemoryRegion, MmapRegion};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let src = MmapRegion::anonymous("ram0", 8 << 20)?;
//! unsafe { src.host_ptr().write_bytes(0x5A, 1 << 20) }; // some content
//! let src = GuestMemory::single(src)?;
//! let dst = GuestMemory::single(MmapRegion::anonymous("ram0", 8 << 20)?)?;
//!
//! let codec = CodecSpec::new("zstd".parse::<Method>()?);
//! let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
//! let addr = listener.local_addr()?.to_string();
//! let dst_cfg = engine::DestinationConfig { codec: codec.clone(), ..Default::default() };
//! let receiver = std::thread::spawn(move || engine::run_destination(&listener, &dst, &mut NoWorkload, &dst_cfg));
//!
//! // A static guest: StaticTracker (everything once) and NoWorkload (nothing to pause). A live
//! // guest brings a real tracker and a workload that pauses its vCPUs.
//! let src_cfg = engine::SourceConfig { codec, ..Default::default() };
//! let report = engine::run_source(&addr, &src, &mut StaticTracker::new(), &mut NoWorkload, &src_cfg, &engine::NoProgress)?;
//! receiver.join().unwrap()?;
//! assert!(report.verified);
//! println!("{}", report.render());
//! # Ok(()) }
//! ```
//!
//! With the `vm-memory` feature, `GuestMemory::from_vm_memory` and `dirty::AtomicBitmapTracker`
//! take a rust-vmm `GuestMemoryMmap` directly; `examples/vm_memory_migration.rs` is a complete
//! embedding (`cargo run --example vm_memory_migration --features vm-memory`).
//!
//! # Features
//! - `vm-memory`: rust-vmm vm-memory integration (`memory::VmMemoryRegion`,
//!   `dirty::AtomicBitmapTracker`).
//! - `isal`: deflate compression with ISA-L built from source (needs nasm and autotools).
//!   Without it, the build uses the system's ISA-L when installed (`libisal-dev`), else
//!   libdeflate; `codec::deflate_backend_name` says which.

#![warn(missing_docs)]

pub mod codec;
pub mod dirty;
pub mod engine;
pub mod memory;
pub mod wire;
pub mod transport;
mod uffd_sys;
