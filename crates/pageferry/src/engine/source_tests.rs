//! Tests of `source.rs`: kept in their own file so `source.rs` reads as the code it is.

use super::*;

const MS: f64 = 1e-3;

fn round(secs: f64, tail: f64, wire_in_tail: u64) -> RoundTiming {
    // 100 MB of guest memory over 50 MB of wire in `secs`.
    RoundTiming { bytes: 100e6, secs, tail, wire: 50_000_000, wire_in_tail, collect: 2.0 * MS, slowest_window: None }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn the_estimate_is_the_fixed_cost_plus_the_remainder_at_the_rate() {
    let fixed = Duration::from_millis(20);
    assert_eq!(switchover_estimate(fixed, 8e6, 100e6), Duration::from_millis(100));
    assert_eq!(switchover_estimate(Duration::ZERO, 8e6, 100e6), Duration::from_millis(80));
    // Nothing left, or no rate measured: the fixed cost is all there is.
    assert_eq!(switchover_estimate(fixed, 0.0, 100e6), fixed);
    assert_eq!(switchover_estimate(fixed, 8e6, 0.0), fixed);
}

#[test]
fn a_tail_that_is_only_the_drain_of_queued_bytes_is_no_overhead() {
    // 1 MB of 50 MB still unwritten when the last batch was queued: 20 ms at the round's
    // wire rate, the whole tail.
    let m = SwitchoverModel::default().observe(&round(1.0, 20.0 * MS, 1_000_000));
    assert!(close(m.overhead, 0.0), "{m:?}");
    assert!(close(m.rate, 100e6), "{m:?}");
    assert_eq!(m.fixed, Duration::from_secs_f64(2.0 * MS), "only the dirty-log collection");
}

#[test]
fn the_tail_beyond_the_drain_is_overhead_taken_out_of_the_rate_and_into_the_fixed_cost() {
    let m = SwitchoverModel::default().observe(&round(1.0, 50.0 * MS, 1_000_000));
    assert!(close(m.overhead, 30.0 * MS), "{m:?}");
    assert!(close(m.rate, 100e6 / 0.97), "the rate of the bytes, without the round's fixed part: {m:?}");
    assert_eq!(m.fixed, Duration::from_secs_f64(32.0 * MS));
    // So a remainder as big as this round is expected to take the round's own time.
    let again = switchover_estimate(m.fixed, 100e6, m.rate).as_secs_f64() - 2.0 * MS;
    assert!((again - 1.0).abs() < 1e-6, "{again}");
}

#[test]
fn the_fixed_cost_keeps_the_largest_overhead_of_the_last_three_rounds() {
    let mut model = SwitchoverModel::default();
    let overheads: Vec<f64> = [40.0, 10.0, 0.0, 0.0, 0.0]
        .iter()
        .map(|o| model.observe(&round(1.0, (20.0 + o) * MS, 1_000_000)).fixed.as_secs_f64() - 2.0 * MS)
        .collect();
    let want = [40.0, 40.0, 40.0, 10.0, 0.0];
    for (got, want) in overheads.iter().zip(want) {
        assert!((got - want * MS).abs() < 1e-6, "{overheads:?}");
    }
}

#[test]
fn the_remainder_is_expected_at_the_slowest_short_window_of_this_round_and_the_one_before() {
    let mut model = SwitchoverModel::default();
    let with = |slowest| RoundTiming { slowest_window: slowest, ..round(1.0, 20.0 * MS, 1_000_000) };
    // No window measured: the round's rate.
    assert!(close(model.observe(&with(None)).switch_rate, 100e6));
    // A window at 40 MB/s in this round: that.
    let m = model.observe(&with(Some(40e6)));
    assert!(close(m.rate, 100e6) && close(m.switch_rate, 40e6), "{m:?}");
    // The next round's windows were faster, but the one before still counts ...
    assert!(close(model.observe(&with(Some(80e6))).switch_rate, 40e6));
    // ... and a round without windows (too short) keeps the last one that had some.
    assert!(close(model.observe(&with(None)).switch_rate, 80e6));
    // Windows faster than the round's average do not raise the rate.
    assert!(close(model.observe(&with(Some(300e6))).switch_rate, 80e6), "the round before still counts");
    assert!(close(model.observe(&with(Some(300e6))).switch_rate, 100e6));
    // The estimate with it.
    let m = model.observe(&with(Some(50e6)));
    assert_eq!(switchover_estimate(m.fixed, 5e6, m.switch_rate), m.fixed + Duration::from_millis(100));
}

#[test]
fn at_most_half_a_round_is_taken_as_overhead() {
    // A round of a few batches: queued at once, then nearly all of it is the round trip.
    let t = RoundTiming { bytes: 1e6, secs: 10.0 * MS, tail: 9.9 * MS, wire: 1_000_000, wire_in_tail: 0, collect: 0.0, slowest_window: None };
    let m = SwitchoverModel::default().observe(&t);
    assert!(close(m.overhead, 5.0 * MS), "{m:?}");
    assert!(close(m.rate, 1e6 / (5.0 * MS)), "{m:?}");
}
