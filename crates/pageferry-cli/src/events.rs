//! `send --events` / `recv --events`: the migration's lifecycle as JSON lines on stdout, for
//! orchestrators (libvirt/KubeVirt style), named after QEMU's QMP events. One object per line
//! (the source's; `recv` starts with `{"event":"LISTENING","data":{"address":"ADDR"}}`, then
//! `setup`, `active`, `device` or `postcopy-active`, and the same last line with its report):
//!
//! ```text
//! {"timestamp":{"seconds":1764300000,"microseconds":12},"event":"MIGRATION","data":{"status":"setup"}}
//! {"timestamp":…,"event":"MIGRATION","data":{"status":"active"}}
//! {"timestamp":…,"event":"MIGRATION_PASS","data":{"pass":1,"round":0,"pages":262144}}
//! {"timestamp":…,"event":"MIGRATION_ROUND","data":{"round":0,"pages":262144,"wire_bytes":…,"seconds":…,"raw_bytes_per_s":…,"wire_bytes_per_s":…,"dirty_pages":…,"expected_downtime_ms":…,"overhead_ms":…,"fixed_ms":…}}
//! {"timestamp":…,"event":"MIGRATION","data":{"status":"pre-switchover"}}
//! {"timestamp":…,"event":"MIGRATION","data":{"status":"device"}}
//! {"timestamp":…,"event":"MIGRATION_PASS","data":{"pass":3,"round":2,"pages":118}}
//! {"timestamp":…,"event":"MIGRATION","data":{"status":"completed","report":{…}}}
//! ```
//!
//! The last line is always one `MIGRATION` event with status `completed` (with the report),
//! `failed` or `cancelled` (with `error` and the process's `exit_code`). Notes meant for people
//! (codec fallbacks, dropped connections) stay on stderr.

use std::io::Write;
use std::sync::Mutex;
use std::time::SystemTime;

use pageferry::engine::{Event, MigrationStatus, Progress, ProgressSink};
use serde_json::{json, Value};

use crate::progress::Bar;

/// A [`ProgressSink`] that writes lifecycle events to stdout and passes progress to a bar.
pub struct JsonEvents {
    bar: Bar,
    /// The engine's final status (completed/failed/cancelled), printed by [`JsonEvents::end`]
    /// together with the report or the error.
    terminal: Mutex<Option<MigrationStatus>>,
}

impl JsonEvents {
    pub fn new(bar: Bar) -> Self {
        Self { bar, terminal: Mutex::new(None) }
    }

    fn emit(&self, event: &str, data: Value) {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let line = json!({
            "timestamp": { "seconds": now.as_secs(), "microseconds": now.subsec_micros() },
            "event": event,
            "data": data,
        });
        let mut out = std::io::stdout().lock();
        // A closed stdout must not fail the migration; the exit status still tells.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// `recv --events`' first line: where it listens (port 0 picks one).
    pub fn listening(&self, addr: std::net::SocketAddr) {
        self.emit("LISTENING", json!({ "address": addr.to_string() }));
    }

    /// The last line: completed with the report, or failed/cancelled with the error and the
    /// exit status the process is about to return.
    pub fn end<R: serde::Serialize>(&self, result: &anyhow::Result<R>) {
        match result {
            Ok(report) => self.emit("MIGRATION", json!({ "status": MigrationStatus::Completed.name(), "report": report })),
            Err(e) => {
                let code = crate::exit::code(e);
                let status = match *self.terminal.lock().unwrap() {
                    Some(MigrationStatus::Cancelled) => MigrationStatus::Cancelled,
                    _ if code == crate::exit::CANCELLED => MigrationStatus::Cancelled,
                    _ => MigrationStatus::Failed,
                };
                self.emit("MIGRATION", json!({ "status": status.name(), "error": format!("{e:#}"), "exit_code": code }));
            }
        }
    }
}

impl ProgressSink for JsonEvents {
    fn update(&self, p: &Progress) {
        self.bar.update(p);
    }
    fn finish(&self) {
        self.bar.finish();
    }
    fn event(&self, e: &Event) {
        match e {
            Event::Status(s @ (MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled)) => {
                *self.terminal.lock().unwrap() = Some(*s);
            }
            Event::Status(s) => self.emit("MIGRATION", json!({ "status": s.name() })),
            Event::RoundStarted { round, pages } => self.emit("MIGRATION_PASS", json!({ "pass": round + 1, "round": round, "pages": pages })),
            Event::RoundFinished(r) => self.emit("MIGRATION_ROUND", json!(r)),
            other => self.bar.event(other),
        }
    }
}
