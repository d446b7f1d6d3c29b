//! The progress bar shown while migrating (stderr; hidden when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pageferry::engine::{Event, EventSink, Progress, ProgressSink};

pub struct Bar(ProgressBar);

impl Bar {
    pub fn new(total: u64, enabled: bool) -> Self {
        let target = if enabled { ProgressDrawTarget::stderr_with_hz(10) } else { ProgressDrawTarget::hidden() };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        bar.set_style(
            ProgressStyle::with_template("{spinner} round {msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}")
                .expect("static template")
                .progress_chars("=> "),
        );
        Self(bar)
    }
}

impl ProgressSink for Bar {
    fn update(&self, p: &Progress) {
        self.0.set_length(p.bytes_total.max(1));
        self.0.set_position(p.bytes_done.min(p.bytes_total));
        self.0.set_message(format!("{}, wire {:.1} MiB", p.round, p.wire_bytes as f64 / (1 << 20) as f64));
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
    fn event(&self, e: &Event) {
        // Notes for people; the lifecycle (status, rounds) is for --events.
        if e.is_note() {
            self.0.suspend(|| eprintln!("pageferry: {e}"));
        }
    }
}

/// The engine's events on stderr (the destination's, which has no progress bar).
pub struct StderrEvents;

impl ProgressSink for StderrEvents {
    fn update(&self, _p: &Progress) {}
    fn event(&self, e: &Event) {
        if e.is_note() {
            eprintln!("pageferry: {e}");
        }
    }
}

/// An events sink that prints on stderr.
pub fn stderr_events() -> EventSink {
    EventSink::new(StderrEvents)
}
