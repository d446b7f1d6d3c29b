//! The commit point with a real KVM guest: a bit flipped in `Finish` or `Done`, or the link
//! dropped at either, through the fault proxy. Whatever happens, at most one copy of the guest
//! runs: a destination that resumed means the source stays paused ("outcome unknown" unless
//! it learned of the success), a destination that did not means the source runs again or
//! reports the outcome as unknown.

mod common;
#[path = "../../pageferry/src/engine/fault_proxy.rs"]
mod fault_proxy;

use fault_proxy::{Action, At, Dir, Fault, FaultProxy};
use pageferry::codec::{CodecSpec, Method};
use pageferry::engine::{run_destination, run_source, DestinationConfig, MigrationError, NoProgress, SourceConfig};
use pageferry_vmm::{Vm, VmConfig, VmStatus};
use std::net::TcpListener;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn run(fault: Fault) -> (Result<(), MigrationError>, bool, VmStatus, VmStatus) {
    let src = Vm::new(VmConfig { mem_bytes: 32 * MIB, working_set_bytes: 2 * MIB, pages_per_tick: 4, tick: Some(Duration::from_millis(1)), ..Default::default() }).unwrap();
    src.start().unwrap();
    src.wait_for_counter(600, Duration::from_secs(30)).unwrap();
    let dst = Vm::new_destination(32 * MIB).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = FaultProxy::start(&listener.local_addr().unwrap().to_string(), vec![fault]);
    let stall = Duration::from_secs(2);
    let codec = CodecSpec::new(Method::by_name("zstd").unwrap());
    let (r, d) = std::thread::scope(|s| {
        let dcfg = DestinationConfig { codec: codec.clone(), stall_timeout: stall, ..Default::default() };
        let (dmem, mut dwork) = (dst.guest_memory(), dst.destination_workload());
        let d = s.spawn(move || run_destination(&listener, &dmem, &mut dwork, &dcfg));
        let cfg = SourceConfig { codec, stall_timeout: stall, downtime_limit: Duration::from_millis(20), ..Default::default() };
        let (mut tracker, mut work) = (src.dirty_tracker(), src.source_workload());
        let r = run_source(&proxy.addr, &src.guest_memory(), &mut tracker, &mut work, &cfg, &NoProgress);
        (r.map(|_| ()), d.join().unwrap())
    });
    std::thread::sleep(Duration::from_millis(100));
    let (ss, ds) = (src.status(), dst.status());
    if ds == VmStatus::Running {
        dst.pause().unwrap();
    }
    if ss == VmStatus::Running {
        src.pause().unwrap();
    }
    (r, d.is_ok(), ss, ds)
}

#[test]
fn switchover_faults_never_leave_two_running_guests() {
    if common::skip() {
        return;
    }
    let frame = |dir, ty, action| Fault { conn: 0, dir, at: At::Frame(ty, 0), action };
    // Finish corrupted: the destination refuses it (Abort) and never starts; the source resumes.
    let (r, d_ok, ss, ds) = run(frame(Dir::Up, "finish", Action::Flip(2)));
    println!("flip Finish: source {:?}, destination ok {d_ok}, source vm {ss:?}, destination vm {ds:?}", r.as_ref().err().map(|e| e.to_string()));
    assert!(matches!(r, Err(MigrationError::PeerAborted(_))), "{r:?}");
    assert_eq!((ss, ds), (VmStatus::Running, VmStatus::Created));
    // Done lost: the destination runs the guest; the source stays paused and says why.
    for action in [Action::Flip(2), Action::Drop] {
        let (r, d_ok, ss, ds) = run(frame(Dir::Down, "done", action.clone()));
        println!("{action:?} Done: source {:?}, destination ok {d_ok}, source vm {ss:?}, destination vm {ds:?}", r.as_ref().err().map(|e| e.to_string()));
        assert!(matches!(r, Err(MigrationError::OutcomeUnknown(_))), "{r:?}");
        assert!(d_ok);
        assert_eq!((ss, ds), (VmStatus::Paused, VmStatus::Running));
    }
    // The link dropped at Finish: the destination never starts; the source cannot know.
    let (r, d_ok, ss, ds) = run(frame(Dir::Up, "finish", Action::Drop));
    println!("drop at Finish: source {:?}, destination ok {d_ok}, source vm {ss:?}, destination vm {ds:?}", r.as_ref().err().map(|e| e.to_string()));
    assert!(matches!(r, Err(MigrationError::OutcomeUnknown(_))), "{r:?}");
    assert!(!d_ok);
    assert_eq!((ss, ds), (VmStatus::Paused, VmStatus::Created));
}
