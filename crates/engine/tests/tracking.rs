//! Page write tracking: tracked pages exit on write, and stay tracked while
//! dirty logging write-protects the same sptes without the lock (patch 04).

use shadow_mmu_engine::{GuestOp, MemFlags, TrackError, VcpuExit};
use shadow_mmu_testkit::fixtures::*;

#[test]
fn tracked_pages_exit_on_write_and_come_back_when_untracked() {
    for d in every_design() {
        let mmu = describe(&d);
        let (vm, mem) = vm_with_slot(d, 4 * MIB, MemFlags::empty());
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, [GuestOp::Write(page(5), 55), GuestOp::Write(page(6), 66)]);
        assert_eq!(audit(&vm).large_sptes, 1, "{mmu}: one large spte maps the first 2 MiB");
        vm.track_write(5).unwrap();
        assert_eq!(
            run_one(&mut vcpu, GuestOp::Write(page(5), 56)),
            VcpuExit::WriteTracked { gpa: page(5), value: 56 }
        );
        assert_eq!(mem.page(5)[0].load(std::sync::atomic::Ordering::Relaxed), 55, "the store did not land");
        // Reads of the tracked page and writes around it work; the region is
        // mapped with 4 KiB pages now.
        assert_eq!(run_ops(&mut vcpu, [GuestOp::Write(page(6), 67), GuestOp::Read(page(5))]), vec![55]);
        let a = audit(&vm);
        assert_eq!(a.large_sptes, 0, "{mmu}: no large spte over a tracked page");
        // Counted: two adds need two removes.
        vm.track_write(5).unwrap();
        vm.untrack_write(5).unwrap();
        assert!(matches!(run_one(&mut vcpu, GuestOp::Write(page(5), 57)), VcpuExit::WriteTracked { .. }));
        vm.untrack_write(5).unwrap();
        run_ops(&mut vcpu, [GuestOp::Write(page(5), 58), GuestOp::Read(page(5))]);
        assert_eq!(mem.page(5)[0].load(std::sync::atomic::Ordering::Relaxed), 58);
        assert_eq!(vm.untrack_write(5), Err(TrackError::NotTracked(5)));
        assert_eq!(vm.track_write(1 << 20), Err(TrackError::NoSlot(1 << 20)));
        assert_eq!(vm.untrack_write(1 << 20), Err(TrackError::NoSlot(1 << 20)));
        audit(&vm);
    }
}

#[test]
fn tracking_survives_concurrent_lockless_write_protection() {
    // In the locked design with the fast path this is KVM 3.11's race as
    // well as patch 04's: the fast path setting W under write tracking's
    // locked write protection (`shadow_mmu_core::lockless`).
    for d in every_design() {
        let mmu = describe(&d);
        let (violations, rounds) = tracking_violations(d, 300);
        assert_eq!(
            violations, 0,
            "{mmu}: stores slipped past write tracking in {violations} of {rounds} rounds"
        );
    }
}
