//! The file `recv` receives into (IMAGE.incomplete) and how it goes away when the handshake it
//! was made for is refused.
//!
//! The engine calls `provide` for a control Hello that passed every check needing no memory;
//! it may still refuse that source afterwards (postcopy not possible on this file, ...), drop
//! the memory and keep listening for the right source. The file belongs to the handshake until
//! the session is accepted (the engine's `active` status): a [`PartialImage`] dropped before
//! that removes its file, so a refused source leaves nothing behind and the next source's
//! `provide` finds the space free. After it, `recv` keeps or removes the file itself.

use pageferry::engine::{Event, EventSink, MigrationStatus, Progress, ProgressSink};
use pageferry::memory::{GuestMemory, MemoryError, MemoryRegion, MmapRegion};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

/// Whether the session was accepted, shared by the events sink that learns it and the images
/// that depend on it.
#[derive(Clone, Default)]
pub struct Accepted(Arc<AtomicBool>);

impl Accepted {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `events`, noting the session's acceptance (status `active`) before passing each on.
    pub fn watch(&self, events: EventSink) -> EventSink {
        EventSink::new(Watch { inner: events, accepted: self.clone() })
    }
}

struct Watch {
    inner: EventSink,
    accepted: Accepted,
}

impl ProgressSink for Watch {
    fn update(&self, p: &Progress) {
        self.inner.0.update(p)
    }
    fn finish(&self) {
        self.inner.0.finish()
    }
    fn event(&self, e: &Event) {
        if matches!(e, Event::Status(MigrationStatus::Active)) {
            self.accepted.0.store(true, Ordering::SeqCst);
        }
        self.inner.0.event(e)
    }
}

/// A destination image file created (space reserved) for one handshake; removed when dropped
/// before the session was accepted.
pub struct PartialImage {
    region: MmapRegion,
    path: PathBuf,
    /// The file's identity (device, inode): only this file is ever removed, never one a later
    /// handshake made at the same path.
    id: (u64, u64),
    accepted: Accepted,
}

impl PartialImage {
    /// Create `path` with `len` bytes reserved (see [`MmapRegion::create_file_reserved`]).
    pub fn create(name: &str, path: &Path, len: u64, accepted: &Accepted) -> Result<Self, MemoryError> {
        let region = MmapRegion::create_file_reserved(name, path, len)?;
        let meta = region.file().expect("a file-backed region").metadata().map_err(|cause| MemoryError::Io { what: "stat", name: name.into(), cause })?;
        Ok(Self { region, path: path.to_path_buf(), id: (meta.dev(), meta.ino()), accepted: accepted.clone() })
    }
}

// SAFETY: delegates to an MmapRegion, which upholds the contract.
unsafe impl MemoryRegion for PartialImage {
    fn name(&self) -> &str {
        self.region.name()
    }
    fn len(&self) -> u64 {
        self.region.len()
    }
    fn host_ptr(&self) -> *mut u8 {
        self.region.host_ptr()
    }
    fn is_fresh_zeroed(&self) -> bool {
        self.region.is_fresh_zeroed()
    }
}

impl Drop for PartialImage {
    fn drop(&mut self) {
        if self.accepted.get() {
            return;
        }
        if std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Memory held without keeping it alive (the resumed writer's, so a refused handshake's
/// memory is really dropped).
#[derive(Default)]
pub struct WeakMemory(Vec<Weak<dyn MemoryRegion>>);

impl WeakMemory {
    pub fn of(memory: &GuestMemory) -> Self {
        Self(memory.regions().iter().map(Arc::downgrade).collect())
    }

    /// The memory, while someone (the engine's session) still holds it.
    pub fn upgrade(&self) -> Option<GuestMemory> {
        let regions = self.0.iter().map(Weak::upgrade).collect::<Option<Vec<_>>>()?;
        if regions.is_empty() {
            return None;
        }
        GuestMemory::new(regions).ok()
    }
}
