//! Cancelling a migration from outside (an operator's ^C, a VMM's management call).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A handle that ends a running migration: clone it into the config, call [`cancel`] from any
/// thread (a signal handler's thread, a management API). The side that cancels tells its peer
/// ("cancelled by the source" / "... destination"), tears down every connection, removes
/// nothing from the source's memory and resumes a paused source workload; both sides return
/// [`MigrationError::Cancelled`](super::MigrationError::Cancelled) within about a second.
/// A source already past the commit point (its final state sent) cannot take it back: it
/// waits for the destination's answer as usual.
///
/// [`cancel`]: CancelToken::cancel
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A handle nobody has cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// Ask the migration to end now.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether [`cancel`](CancelToken::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Which side a cancel or a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The side that sends the guest.
    Source,
    /// The side that receives it.
    Destination,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}
