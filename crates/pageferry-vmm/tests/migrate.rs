//! A running guest migrated live by pageferry's engine over loopback TCP, both ends in this
//! process: the destination continues the guest where the source stopped it.

mod common;

use pageferry::codec::{CodecSpec, Method};
use pageferry::engine::{AutoConverge, PostcopyConfig, run_destination, run_destination_with, run_source, DestinationConfig, MigrationReport, NoProgress, SourceConfig};
use pageferry_vmm::{PendingDestination, Vm, VmConfig, VmStatus};
use std::net::TcpListener;
use std::time::Duration;

const MIB: u64 = 1 << 20;

struct Outcome {
    report: MigrationReport,
    paused_at: u64,
}

/// Migrate a running writer guest from a new source VM to a new destination VM in this
/// process, check that the destination continues it exactly, and print the timings.
#[allow(clippy::too_many_arguments)]
fn migrate(mem: u64, ws: u64, pages_per_tick: u64, method: Method, verify: bool, lazy_destination: bool, downtime_limit: Duration, tweak: impl FnOnce(&mut SourceConfig)) -> Outcome {
    let src = Vm::new(VmConfig { mem_bytes: mem, working_set_bytes: ws, pages_per_tick, tick: Some(Duration::from_millis(1)), ..Default::default() }).unwrap();
    src.start().unwrap();
    src.wait_for_counter(1000, Duration::from_secs(30)).unwrap();
    // Either a VM made up front, or one the handshake creates at the source's size.
    let pending = PendingDestination::new();
    let made = (!lazy_destination).then(|| Vm::new_destination(mem).unwrap());

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let codec = CodecSpec::new(method);
    let (report, dreport) = std::thread::scope(|s| {
        let dcfg = DestinationConfig { codec: codec.clone(), require_verify: verify, postcopy_kernel_faults: true, ..Default::default() };
        let made = made.as_ref();
        let pending = &pending;
        let d = s.spawn(move || match made {
            Some(vm) => run_destination(&listener, &vm.guest_memory(), &mut vm.destination_workload(), &dcfg),
            None => {
                let mut workload = pending.clone();
                run_destination_with(&listener, &mut |layout| pending.provide(layout), &mut workload, &dcfg).map(|(r, _)| r)
            }
        });
        let mut tracker = src.dirty_tracker();
        let mut work = src.source_workload();
        let mut cfg = SourceConfig { codec: codec.clone(), downtime_limit, verify, ..Default::default() };
        tweak(&mut cfg);
        let r = run_source(&addr, &src.guest_memory(), &mut tracker, &mut work, &cfg, &NoProgress);
        (r, d.join().unwrap())
    });
    let dreport = dreport.expect("destination");
    let dst = made.unwrap_or_else(|| pending.take_vm().expect("the handshake created the VM"));
    assert_eq!(dst.mem_bytes(), mem);
    let report = report.expect("source");
    print!("{}", report.render());
    assert_eq!(report.verified, verify);
    assert_eq!(dreport.verified, verify);
    assert_eq!(report.dirty_tracker, "kvm-dirty-log+vm-memory-bitmap");

    assert_eq!(src.status(), VmStatus::Paused);
    let paused_at = src.counter();
    let pause = src.last_pause().unwrap();
    let r = dst.wait_resume_report(Duration::from_secs(10)).unwrap();
    assert_eq!(dst.status(), VmStatus::Running);
    assert_eq!(r.counter_at_restore, paused_at, "the destination's memory must hold the source's last counter");
    assert!(r.unrestored_msrs.is_empty());
    let (first, _) = r.first_progress.expect("guest made no progress on the destination");
    assert!(first > paused_at);
    let (downtime, clock) = r.downtime().unwrap();
    println!(
        "vmm: source pause {:?} (vCPU out after {:?}); destination restore {:?}; pause→vCPU running {:?} ({clock:?}); pause→first progress {:?}; counter {} → {}",
        pause.state_captured,
        pause.vcpu_stopped,
        r.restore_took,
        downtime,
        r.downtime_to_progress().unwrap().0,
        paused_at,
        first
    );
    dst.wait_for_counter(paused_at + 500, Duration::from_secs(10)).unwrap();
    dst.pause().unwrap();
    let pat = dst.check_pattern().expect("page stamps on the destination");
    assert_eq!(pat.working_set_pages, ws / 4096);
    assert_eq!(dst.unexpected_exits(), 0);
    Outcome { report, paused_at }
}

#[test]
fn live_migration_of_a_running_guest_verified() {
    if common::skip() {
        return;
    }
    // 16 pages per 1 ms tick: 64 MB/s of dirtying over a 16 MiB working set.
    let o = migrate(256 * MIB, 16 * MIB, 16, "zstd".parse::<Method>().unwrap(), true, true, Duration::from_millis(50), |_| {});
    assert!(o.report.rounds >= 2 && o.paused_at > 1000);
}

#[test]
fn live_migration_downtime() {
    if common::skip() {
        return;
    }
    // 4 pages per 1 ms tick (16 MB/s) over a 16 MiB working set, a 5 ms downtime budget, no
    // end-to-end digest (it would count in the downtime): the destination's page stamps are
    // the check.
    let o = migrate(256 * MIB, 16 * MIB, 4, "none".parse::<Method>().unwrap(), false, false, Duration::from_millis(5), |_| {});
    println!("engine downtime {:.1} ms, rounds {}", o.report.downtime_ms, o.report.rounds);
}

#[test]
fn auto_converge_throttles_the_vcpu_until_a_guest_faster_than_the_link_migrates() {
    if common::skip() {
        return;
    }
    // 16 pages per 1 ms tick (64 MB/s) over a 4 MiB working set, a 16 MB/s link: every round
    // leaves the whole working set dirty (~260 ms at the cap), over the 10 ms limit. The guest
    // catches up on naps under 50 ms, so the throttle starts at 90% (90 ms naps).
    let o = migrate(64 * MIB, 4 * MIB, 16, "none".parse::<Method>().unwrap(), false, false, Duration::from_millis(10), |c| {
        c.max_bandwidth = Some(16_000_000);
        c.max_rounds = 20;
        c.auto_converge = Some(AutoConverge { initial: 90, ..Default::default() });
    });
    assert_eq!(o.report.mechanisms, ["pre-copy", "auto-converge"]);
    assert!(o.report.throttle_pct_per_round.last().copied().unwrap() >= 90, "{:?}", o.report.throttle_pct_per_round);
}

#[test]
fn refused_migration_leaves_the_source_running() {
    if common::skip() {
        return;
    }
    let src = Vm::new(VmConfig { mem_bytes: 32 * MIB, working_set_bytes: 4 * MIB, pages_per_tick: 4, tick: Some(Duration::from_millis(1)), ..Default::default() }).unwrap();
    src.start().unwrap();
    src.wait_for_counter(10, Duration::from_secs(10)).unwrap();
    // A destination of a different size refuses the region layout (and, nobody else coming,
    // ends at its accept timeout naming that refusal).
    let dst = Vm::new_destination(16 * MIB).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dcfg = DestinationConfig { accept_timeout: Duration::from_secs(1), ..Default::default() };
    let (r, d) = std::thread::scope(|s| {
        let dmem = dst.guest_memory();
        let mut dwork = dst.destination_workload();
        let d = s.spawn(move || run_destination(&listener, &dmem, &mut dwork, &dcfg));
        let mut tracker = src.dirty_tracker();
        let mut work = src.source_workload();
        let r = run_source(&addr, &src.guest_memory(), &mut tracker, &mut work, &SourceConfig::default(), &NoProgress);
        (r, d.join().unwrap())
    });
    let (se, de) = (r.unwrap_err().to_string(), d.unwrap_err().to_string());
    assert!(se.contains("memory layout mismatch"), "{se}");
    assert!(de.contains("refused 1 connection(s)") && de.contains("memory layout mismatch"), "{de}");
    assert_eq!(src.status(), VmStatus::Running);
    assert_eq!(dst.status(), VmStatus::Created);
    let c = src.counter();
    src.wait_for_counter(c + 10, Duration::from_secs(10)).unwrap();
    // Tracking was switched off again: a new tracker can start.
    let mut t = src.dirty_tracker();
    pageferry::dirty::DirtyTracker::start(&mut t, &src.guest_memory()).unwrap();
}

#[test]
fn a_pending_destination_serves_the_next_source_after_a_handshake_refused_after_provide() {
    // The engine may refuse a handshake after `provide` (postcopy not possible here, ...),
    // drop its memory and call `provide` again for the next source.
    if common::skip() {
        return;
    }
    let ram = |len: u64| [(pageferry_vmm::RAM_REGION.to_string(), len)];
    let pending = PendingDestination::new();
    drop(pending.provide(&ram(16 * MIB)).unwrap());
    let m = pending.provide(&ram(16 * MIB)).expect("the same size: the same unused VM");
    assert_eq!(m.total_bytes(), 16 * MIB);
    drop(m);
    let m = pending.provide(&ram(32 * MIB)).expect("another size: a new VM, not \"already holds a VM\"");
    assert_eq!(m.total_bytes(), 32 * MIB);
    drop(m);
    let vm = pending.take_vm().unwrap();
    assert_eq!((vm.mem_bytes(), vm.status()), (32 * MIB, VmStatus::Created));
    // A size fixed up front (`vm recv --mem`) refuses another one, naming both, and stays.
    let fixed = PendingDestination::with_ram(16 * MIB).unwrap();
    let e = fixed.provide(&ram(32 * MIB)).err().expect("a source of another size is refused");
    assert!(e.contains(&(16 * MIB).to_string()) && e.contains(&(32 * MIB).to_string()), "{e}");
    assert_eq!(fixed.provide(&ram(16 * MIB)).unwrap().total_bytes(), 16 * MIB);
}

#[test]
fn postcopy_live_migration_of_a_guest_faster_than_the_link() {
    if common::skip() {
        return;
    }
    // 32 pages per 1 ms tick (128 MB/s) over a 16 MiB working set, a 32 MB/s link: pre-copy
    // cannot converge, so the engine switches to postcopy; the vCPU runs on the destination
    // and faults on the pages still on the source, which come over the urgent channel.
    let o = migrate(64 * MIB, 16 * MIB, 32, "none".parse::<Method>().unwrap(), false, false, Duration::from_millis(5), |c| {
        c.max_bandwidth = Some(32_000_000);
        c.postcopy = Some(PostcopyConfig::default());
    });
    let r = &o.report;
    assert_eq!(r.mechanisms, ["pre-copy", "postcopy"]);
    let pc = r.postcopy.as_ref().expect("postcopy stats");
    println!(
        "postcopy: {:.1} ms, {} discarded, {} faults, {} requested / {} pushed, fault latency p50 {:.0} us p99 {:.0} us max {:.0} us",
        r.postcopy_ms, pc.discarded_pages, pc.faults, r.postcopy_pages_requested, r.postcopy_pages_pushed, pc.fault_latency_p50_us, pc.fault_latency_p99_us, pc.fault_latency_max_us
    );
    assert!(pc.discarded_pages > 0 && pc.faults > 0 && r.postcopy_pages_requested > 0, "{pc:?}");
    assert!(r.postcopy_pages_requested + r.postcopy_pages_pushed >= pc.discarded_pages);
}
