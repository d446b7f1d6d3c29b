//! The static tracker: every page once, then nothing. For memory nobody writes during the
//! migration (a paused guest, an image file).

use super::{DirtyError, DirtyPages, DirtyTracker};
use crate::memory::GuestMemory;

/// Every page once, then nothing: for memory nobody writes during the migration.
#[derive(Default)]
pub struct StaticTracker {
    state: State,
}

#[derive(Default, PartialEq)]
enum State {
    #[default]
    Idle,
    Started,
    Reported,
}

impl StaticTracker {
    /// A tracker (not started).
    pub fn new() -> Self {
        Self::default()
    }
}

impl DirtyTracker for StaticTracker {
    fn start(&mut self, _memory: &GuestMemory) -> Result<(), DirtyError> {
        self.state = State::Started;
        Ok(())
    }
    fn collect(&mut self, into: &mut DirtyPages) -> Result<(), DirtyError> {
        match self.state {
            State::Idle => Err(DirtyError::NotStarted),
            State::Started => {
                for i in 0..into.regions().len() {
                    into.region_mut(i).set_all();
                }
                self.state = State::Reported;
                Ok(())
            }
            State::Reported => Ok(()),
        }
    }
    fn guest_may_write(&self) -> bool {
        false
    }
    fn name(&self) -> &'static str {
        "static"
    }
}
