//! The KVM guest paces itself: its delay is calibrated over a few chunk
//! exits, and then it keeps its rate with no exit at all. Only an upper
//! bound on its speed is asserted (a loaded host makes a guest slower,
//! never faster).

use std::time::{Duration, Instant};

use shadow_mmu_kvm::perf::{KvmPerfConfig, KvmPerfVm};
use shadow_mmu_kvm::usable_or_skip;

const MIB: u64 = 1 << 20;

#[test]
fn a_paced_guest_calibrates_its_delay_then_runs_without_exits() {
    if !usable_or_skip() {
        return;
    }
    let cfg = KvmPerfConfig { vcpus: 2, guest_bytes: 256 * MIB, write_pct: 100, ..KvmPerfConfig::default() };
    let vm = KvmPerfVm::new(&cfg).unwrap();
    // 64 MiB/s: 32 a vCPU, whose 128 MiB pass takes 4 s.
    let rate = 64 * MIB;
    vm.set_dirty_rate(Some(rate)).unwrap();
    vm.release(u64::MAX);
    let t = Instant::now();
    while vm.delay_models().iter().any(Option::is_none) {
        assert!(t.elapsed() < Duration::from_secs(5), "calibrated: {:?}", vm.delay_models());
        std::thread::sleep(Duration::from_millis(5));
    }
    for m in vm.delay_models().into_iter().flatten() {
        assert!(m.iter_ns > 0.0, "{m:?}");
    }
    // Calibrated: the guests run paced and exit no more.
    std::thread::sleep(Duration::from_millis(50));
    let (exits, stored, t) = (vm.exits(), vm.dirty_pace().stored(), Instant::now());
    std::thread::sleep(Duration::from_millis(400));
    let (got, took) = (vm.dirty_pace().stored() - stored, t.elapsed());
    assert_eq!(vm.exits(), exits, "no exit while paced by the delay");
    // Within half again its rate, plus the chunk each counter leads by.
    let most = (1.5 * rate as f64 * took.as_secs_f64()) as u64 + 2 * 256 * 1024;
    assert!(got > 0 && got <= most, "{got} bytes in {took:?}, at most {most}");
    assert_eq!(vm.passes(), vec![0, 0], "no pass at full speed");
    // The rate lifted, the delay goes: passes complete.
    vm.set_dirty_rate(None).unwrap();
    vm.wait_passes(&[0, 0]).unwrap();
}
