//! Embedding pageferry in a rust-vmm VMM: live-migrate a `vm-memory` guest between two threads
//! over loopback TCP with zstd, while a "device" keeps writing guest memory, and print the report.
//!
//! ```sh
//! cargo run --release --example vm_memory_migration --features vm-memory
//! ```
//!
//! What a VMM supplies (everything else is the engine's):
//! - guest memory: its `GuestMemoryMmap`, handed over region by region without a copy;
//! - dirty tracking: vm-memory's `AtomicBitmap` for the VMM's own writes (a KVM VMM adds its
//!   dirty log with `UnionTracker`, see `crates/pageferry-vmm`);
//! - a `SourceWorkload` that pauses the guest and returns its device state, and a
//!   `DestinationWorkload` that restores it and resumes.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pageferry::codec::{CodecSpec, Method};
use pageferry::dirty::AtomicBitmapTracker;
use pageferry::engine::{self, DestinationWorkload, SourceWorkload, WorkloadError};
use pageferry::memory::GuestMemory;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Ram = GuestMemoryMmap<AtomicBitmap>;

/// Guest RAM: 48 MiB below a hole at 48 MiB, 16 MiB above it (two regions, as on a PC).
fn guest_ram() -> Ram {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 48 << 20), (GuestAddress(64 << 20), 16 << 20)]).expect("mmap guest RAM")
}

/// Stands in for device emulation: writes guest pages through vm-memory (so the AtomicBitmap
/// sees them) until the engine pauses it for the switchover.
struct Device {
    ram: Ram,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Device {
    fn start(ram: &Ram) -> Device {
        let (ram, stop) = (ram.clone(), Arc::new(AtomicBool::new(false)));
        let (r, s) = (ram.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                // A counter stamped into one of 1024 pages of the first 4 MiB, ~10k pages/s.
                let gpa = GuestAddress((n % 1024) * 4096);
                r.write_obj(n, gpa).expect("guest write");
                n += 1;
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
            n
        });
        Device { ram, stop, thread: Some(thread) }
    }
}

impl SourceWorkload for Device {
    /// Stop writing; the device state is whatever the destination needs to carry on (here: the
    /// number of writes done, which is also the next counter value).
    fn pause(&mut self) -> Result<Vec<u8>, WorkloadError> {
        self.stop.store(true, Ordering::SeqCst);
        let writes = self.thread.take().map(|t| t.join().expect("device thread")).unwrap_or(0);
        Ok(writes.to_le_bytes().to_vec())
    }
    /// The migration failed after the pause: the source keeps the guest.
    fn resume_after_failure(&mut self) -> Result<(), WorkloadError> {
        *self = Device::start(&self.ram);
        Ok(())
    }
}

/// The destination's side: restores the device state and would start the vCPUs.
struct Restore(Option<u64>);

impl DestinationWorkload for Restore {
    fn resume(&mut self, device_state: &[u8]) -> Result<(), WorkloadError> {
        let bytes: [u8; 8] = device_state.try_into().map_err(|_| "device state is not 8 bytes")?;
        self.0 = Some(u64::from_le_bytes(bytes));
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Source guest with some content, and an empty destination guest of the same layout.
    let src_ram = guest_ram();
    for i in 0..(64u64 << 20) / 4096 {
        let gpa = if i < (48 << 20) / 4096 { i * 4096 } else { (64 << 20) + (i - (48 << 20) / 4096) * 4096 };
        if i % 4 != 3 {
            src_ram.write_slice(format!("page {i} of the example guest; ").repeat(8).as_bytes(), GuestAddress(gpa))?;
        }
    }
    let dst_ram = guest_ram();
    // The engine's view of both: same region names ("ram@0x0", "ram@0x4000000") on each side.
    let src_mem = GuestMemory::from_vm_memory(&src_ram)?;
    let dst_mem = GuestMemory::from_vm_memory(&dst_ram)?;

    // Destination thread: listen on an ephemeral loopback port, expect zstd.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let zstd = CodecSpec::new("zstd".parse::<Method>()?);
    let dst_cfg = engine::DestinationConfig { codec: zstd.clone(), ..Default::default() };
    let destination = std::thread::spawn(move || {
        let mut restore = Restore(None);
        let report = engine::run_destination(&listener, &dst_mem, &mut restore, &dst_cfg);
        report.map(|r| (r, restore.0))
    });

    // Source: track the device's writes with vm-memory's bitmaps, migrate over 2 channels.
    let mut device = Device::start(&src_ram);
    let mut tracker = AtomicBitmapTracker::new(&src_ram);
    let src_cfg = engine::SourceConfig { codec: zstd, channels: 2, ..Default::default() };
    let report = engine::run_source(&addr, &src_mem, &mut tracker, &mut device, &src_cfg, &engine::NoProgress)?;
    let (_, writes) = destination.join().expect("destination thread")?;

    print!("{}", report.render());
    println!("device writes before pause: {}", writes.unwrap_or(0));
    // The destination holds exactly the source's final memory (the engine compared digests too).
    assert_eq!(src_mem.digest(), GuestMemory::from_vm_memory(&dst_ram)?.digest());
    println!("destination memory equals the source's");
    Ok(())
}

/// `cargo test --example vm_memory_migration --features vm-memory` runs the example itself.
#[test]
fn example_migrates() {
    main().expect("example migration");
}
