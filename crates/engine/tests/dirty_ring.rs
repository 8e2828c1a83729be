//! The dirty ring on the engine, in every design: KVM's size rules, pushes
//! harvested in order, the reset's re-protection, the soft limit's exit,
//! slots deleted between push and reset, and the bitmap ioctls and host
//! writes refused while the ring is on.

use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_engine::{DirtyLogError, DirtyRingError, GuestOp, MemFlags, VcpuExit, Vm, VmConfig};
use shadow_mmu_testkit::fixtures::*;
use shadow_mmu_vmm::GuestAccessError;

/// The smallest ring KVM takes: one page of `kvm_dirty_gfn`s (256 entries).
const ONE_PAGE: u32 = PAGE_SIZE as u32;

/// A ring of `cfg`'s VM and its soft limit: one page (256 entries, 64
/// reserved), or with PML four (1024 entries, 64 + 512 reserved: room for
/// a whole log's drain).
fn ring_of(cfg: &VmConfig) -> (u32, u64) {
    if cfg.pml { (4 * ONE_PAGE, 1024 - 576) } else { (ONE_PAGE, 192) }
}

fn harvest(vm: &Vm, vcpu: u32) -> Vec<(u32, u64)> {
    let mut v = Vec::new();
    vm.harvest_dirty_ring(vcpu, |s, o| v.push((s, o))).unwrap();
    v
}

#[test]
fn size_rules_are_kvms() {
    let vm = Vm::new(VmConfig::default()).unwrap();
    for (bytes, e) in [
        (3 << 12, DirtyRingError::NotPowerOfTwo(3 << 12)),
        (0, DirtyRingError::NotPowerOfTwo(0)),
        (2048, DirtyRingError::TooSmall(2048)),
        (2 << 20, DirtyRingError::TooBig(2 << 20)),
    ] {
        assert_eq!(vm.enable_dirty_ring(bytes), Err(e.clone()));
        assert!(!e.to_string().is_empty());
    }
    assert_eq!(vm.dirty_ring_entries(), None, "refusals change nothing");
    assert_eq!(vm.harvest_dirty_ring(0, |_, _| {}), Err(DirtyRingError::NotEnabled));
    assert_eq!(vm.reset_dirty_rings(), Err(DirtyRingError::NotEnabled));
    vm.enable_dirty_ring(1 << 20).unwrap();
    assert_eq!(vm.dirty_ring_entries(), Some(65536));
    assert_eq!(vm.enable_dirty_ring(ONE_PAGE), Err(DirtyRingError::AlreadySet));
    let vm2 = Vm::new(VmConfig::default()).unwrap();
    let _v = vm2.create_vcpu(0).unwrap();
    assert_eq!(vm2.enable_dirty_ring(ONE_PAGE), Err(DirtyRingError::VcpusExist));
    assert_eq!(vm.harvest_dirty_ring(3, |_, _| {}), Err(DirtyRingError::NoSuchVcpu(3)));
}

#[test]
fn pushes_are_harvested_in_order_and_the_reset_reprotects() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let vm = Vm::new(base.clone()).unwrap();
        vm.enable_dirty_ring(ring_of(&base).0).unwrap();
        let mem = shadow_mmu_engine::HostMemory::anonymous(2 * MIB).unwrap();
        vm.set_user_memory_region(region(0, 0, 2 * MIB, &mem, MemFlags::LOG_DIRTY_PAGES)).unwrap();
        let mut v0 = vm.create_vcpu(0).unwrap();
        let mut v1 = vm.create_vcpu(1).unwrap();
        assert_eq!(vm.dirty_ring_vcpus(), [0, 1]);
        run_ops(&mut v0, [9, 3, 9, 4].map(|g| GuestOp::Write(page(g), g)));
        run_ops(&mut v1, [GuestOp::Write(page(100), 1)]);
        // Each page once (the second write to page 9 found it writable), in
        // the order of the faults.
        assert_eq!(harvest(&vm, 0), [(0, 9), (0, 3), (0, 4)]);
        assert_eq!(harvest(&vm, 1), [(0, 100)]);
        assert_eq!(harvest(&vm, 0), [], "harvested once");
        // The bitmap ioctls are refused, and host writes to the logged slot.
        let mut bm = vec![0u64; 8];
        assert_eq!(vm.get_dirty_log(0, &mut bm), Err(DirtyLogError::DirtyRing));
        assert!(vm.clear_dirty_log(0, 0, 512, &bm).is_err());
        assert_eq!(vm.write_guest(page(7), &[1]), Err(GuestAccessError::DirtyRing { gpa: page(7), slot: 0 }));
        // Until the reset the pages stay writable: no new push.
        run_ops(&mut v0, [GuestOp::Write(page(3) + 8, 5)]);
        assert_eq!(harvest(&vm, 0), []);
        audit(&vm);
        assert_eq!(vm.reset_dirty_rings().unwrap(), 4);
        audit(&vm);
        // Re-protected: the next write faults and pushes again.
        run_ops(&mut v0, [GuestOp::Write(page(3), 6), GuestOp::Write(page(5), 7)]);
        assert_eq!(harvest(&vm, 0), [(0, 3), (0, 5)]);
        // An entry pushed after the harvest is not reset: it waits for the
        // next harvest.
        run_ops(&mut v0, [GuestOp::Write(page(9), 8)]);
        assert_eq!(vm.reset_dirty_rings().unwrap(), 2);
        assert_eq!(harvest(&vm, 0), [(0, 9)]);
        assert_eq!(vm.reset_dirty_rings().unwrap(), 1);
        let m = vm.stats().mmu;
        assert_eq!((m.ring_entries_harvested, m.ring_entries_reset, m.ring_resets), (7, 7, 3));
    }
}

#[test]
fn the_soft_limit_exits_until_the_rings_are_reset() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let vm = Vm::new(base.clone()).unwrap();
        let (bytes, soft) = ring_of(&base);
        vm.enable_dirty_ring(bytes).unwrap();
        let mem = shadow_mmu_engine::HostMemory::anonymous(4 * MIB).unwrap();
        vm.set_user_memory_region(region(0, 0, 4 * MIB, &mem, MemFlags::LOG_DIRTY_PAGES)).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let n = soft + 108;
        let mut script = shadow_mmu_engine::Script::new((0..n).map(|g| GuestOp::Write(page(g), g + 1)));
        assert_eq!(vcpu.run(&mut script).unwrap(), VcpuExit::DirtyRingFull);
        // The access that filled the ring completed; nothing ran after it.
        assert_eq!(vcpu.stats().writes, soft);
        assert_eq!(vcpu.run(&mut script).unwrap(), VcpuExit::DirtyRingFull, "still full");
        let got = harvest(&vm, 0);
        assert_eq!(got.len() as u64, soft);
        assert_eq!(vm.reset_dirty_rings().unwrap(), soft);
        assert_eq!(vcpu.run(&mut script).unwrap(), VcpuExit::Hypercall(0));
        assert_eq!(harvest(&vm, 0).len(), 108);
        assert_eq!(vcpu.stats().dirty_ring_full_exits, 2);
        let last = n - 1;
        assert_eq!(mem.page(last)[0].load(std::sync::atomic::Ordering::Relaxed), n);
    }
}

#[test]
fn a_slot_deleted_between_push_and_reset_is_skipped() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let vm = Vm::new(base.clone()).unwrap();
        vm.enable_dirty_ring(ring_of(&base).0).unwrap();
        let a = shadow_mmu_engine::HostMemory::anonymous(2 * MIB).unwrap();
        let b = shadow_mmu_engine::HostMemory::anonymous(2 * MIB).unwrap();
        vm.set_user_memory_region(region(0, 0, 2 * MIB, &a, MemFlags::LOG_DIRTY_PAGES)).unwrap();
        vm.set_user_memory_region(region(1, 4 * MIB, 2 * MIB, &b, MemFlags::LOG_DIRTY_PAGES)).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, [GuestOp::Write(page(1), 1), GuestOp::Write(4 * MIB + page(2), 2)]);
        assert_eq!(harvest(&vm, 0), [(0, 1), (1, 2)]);
        vm.delete_memory_region(1).unwrap();
        // Slot 1 again, smaller: offset 2 is now past its end.
        vm.set_user_memory_region(region(1, 4 * MIB, PAGE_SIZE, &b, MemFlags::LOG_DIRTY_PAGES)).unwrap();
        assert_eq!(vm.reset_dirty_rings().unwrap(), 2);
        run_ops(&mut vcpu, [GuestOp::Write(page(1), 3)]);
        assert_eq!(harvest(&vm, 0), [(0, 1)], "slot 0's page was re-protected");
        audit(&vm);
    }
}
