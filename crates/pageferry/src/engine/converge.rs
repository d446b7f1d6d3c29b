//! Auto-converge: when pre-copy does not converge, throttle the source workload harder each
//! time the guest keeps out-dirtying the link.
//!
//! The rule is QEMU's (`migration_trigger_throttle` / `mig_throttle_guest_down` in
//! migration/ram.c, facts only): after each dirty-bitmap sync, if the bytes dirtied since the
//! previous sync exceed `trigger_threshold`% of the bytes transferred in that period, a
//! counter goes up; when it reaches 2 it is reset and the throttle is raised — to `initial`
//! the first time, then by `increment`, never above `max`. The counter is not reset by a
//! round below the threshold.

use super::AutoConverge;

/// The throttle decision, one call per completed round.
#[derive(Debug)]
pub(super) struct Throttler {
    cfg: AutoConverge,
    high_count: u32,
    pct: u8,
}

impl Throttler {
    pub fn new(cfg: AutoConverge) -> Self {
        Self { cfg, high_count: 0, pct: 0 }
    }

    /// The throttle now in effect (percent of the workload's time taken away).
    pub fn pct(&self) -> u8 {
        self.pct
    }

    /// A round moved `transferred` wire bytes while the guest dirtied `dirtied` bytes. Returns
    /// the new throttle when it should change.
    pub fn after_round(&mut self, dirtied: u64, transferred: u64) -> Option<u8> {
        let threshold = transferred as u128 * self.cfg.trigger_threshold as u128 / 100;
        if (dirtied as u128) <= threshold {
            return None;
        }
        self.high_count += 1;
        if self.high_count < 2 {
            return None;
        }
        self.high_count = 0;
        let next = if self.pct == 0 { self.cfg.initial } else { self.pct.saturating_add(self.cfg.increment).min(self.cfg.max) };
        if next == self.pct {
            return None;
        }
        self.pct = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_on_every_second_high_round_from_initial_by_increment_up_to_max() {
        let mut t = Throttler::new(AutoConverge { initial: 20, increment: 30, max: 75, trigger_threshold: 50 });
        // Below or at the threshold: nothing, and the counter does not move.
        assert_eq!(t.after_round(50, 100), None);
        assert_eq!(t.after_round(50, 100), None);
        assert_eq!(t.after_round(51, 100), None); // first high round
        assert_eq!(t.after_round(10, 100), None); // a low round does not reset the count
        assert_eq!(t.after_round(200, 100), Some(20)); // second high round: initial
        assert_eq!(t.pct(), 20);
        assert_eq!(t.after_round(200, 100), None);
        assert_eq!(t.after_round(200, 100), Some(50));
        assert_eq!(t.after_round(200, 100), None);
        assert_eq!(t.after_round(200, 100), Some(75)); // capped at max
        assert_eq!(t.after_round(200, 100), None);
        assert_eq!(t.after_round(200, 100), None); // already at max: no change reported
        assert_eq!(t.pct(), 75);
    }

    #[test]
    fn threshold_is_a_percentage_of_transferred_bytes() {
        let mut t = Throttler::new(AutoConverge { trigger_threshold: 10, ..Default::default() });
        assert_eq!(t.after_round(11, 100), None);
        assert_eq!(t.after_round(11, 100), Some(20));
        let mut t = Throttler::new(AutoConverge::default());
        // Nothing transferred at all but something dirtied counts as high.
        assert_eq!(t.after_round(1, 0), None);
        assert_eq!(t.after_round(1, 0), Some(20));
        assert_eq!(t.after_round(u64::MAX, u64::MAX), None);
    }

    #[test]
    fn validation_rejects_out_of_range_settings() {
        assert!(AutoConverge::default().validate().is_ok());
        assert!(AutoConverge { initial: 0, ..Default::default() }.validate().is_err());
        assert!(AutoConverge { max: 100, ..Default::default() }.validate().is_err());
        assert!(AutoConverge { initial: 60, max: 50, ..Default::default() }.validate().is_err());
        assert!(AutoConverge { trigger_threshold: 0, ..Default::default() }.validate().is_err());
    }
}
