//! Nothing allocates while holding `mmu_lock`: every allocation made by a
//! thread that holds it is counted by this test binary's global allocator,
//! while VMs of both designs fault, shrink, log, harvest, track pages and
//! delete and re-add memslots.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use shadow_mmu_engine::{GuestOp, HostMemory, MemFlags, MmuDesign, VcpuExit, VmConfig};
use shadow_mmu_testkit::fixtures::*;

struct CountUnderLock;

static UNDER_LOCK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; counting
// touches only a static atomic and a const-initialised thread-local.
unsafe impl GlobalAlloc for CountUnderLock {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if shadow_mmu_core::lockdep::holds_mmu_lock() {
            UNDER_LOCK.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if shadow_mmu_core::lockdep::holds_mmu_lock() {
            UNDER_LOCK.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CountUnderLock = CountUnderLock;

#[test]
fn nothing_allocates_under_mmu_lock() {
    for d in every_design() {
        let mmu = describe(&d);
        let cfg = VmConfig {
            max_mmu_pages: Some(64),
            address_spaces: 3,
            max_free_shadow_pages: 0,
            max_free_descs: 16,
            large_pages: false,
            ..d.clone()
        };
        // 4 KiB pages over 64 MiB in 3 address spaces: about 100 tables
        // against a budget of 64, so the shrinker runs all along.
        let (vm, _mem) = vm_with_slot(cfg, 64 * MIB, MemFlags::empty());
        let mem1 = HostMemory::anonymous(2 * MIB).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut bm = vec![0u64; 256];
        let before = UNDER_LOCK.load(Ordering::Relaxed);
        for round in 0..4u64 {
            // Faults in three address spaces, with the shrinker zapping.
            for asid in 0..3 {
                let mut ops = vec![GuestOp::SetAddressSpace(asid)];
                ops.extend((0..16384).step_by(3).map(|g| GuestOp::Write(page(g), g + round)));
                run_ops(&mut vcpu, ops);
            }
            // Logging on, harvests, logging off.
            vm.enable_dirty_logging(0).unwrap();
            run_ops(&mut vcpu, (0..16384).step_by(5).map(|g| GuestOp::Write(page(g), g)));
            vm.get_dirty_log(0, &mut bm).unwrap();
            vm.get_dirty_log(0, &mut bm).unwrap();
            vm.disable_dirty_logging(0).unwrap();
            // Tracking.
            vm.track_write(7).unwrap();
            assert!(matches!(run_one(&mut vcpu, GuestOp::Write(page(7), 1)), VcpuExit::WriteTracked { .. }));
            vm.untrack_write(7).unwrap();
            // A second slot, mapped, then deleted.
            vm.set_user_memory_region(region(1, 128 * MIB, 2 * MIB, &mem1, MemFlags::empty())).unwrap();
            run_ops(&mut vcpu, (0..512).map(|g| GuestOp::Write(128 * MIB + page(g), g)));
            vm.delete_memory_region(1).unwrap();
            vm.set_nr_mmu_pages(64 + round as usize).unwrap();
        }
        let n = UNDER_LOCK.load(Ordering::Relaxed) - before;
        assert_eq!(n, 0, "{mmu}: {n} allocations under mmu_lock");
        let s = vm.stats();
        // The TDP design's faults take the lock for read, and its tables
        // are not budgeted (no shrinker).
        let took = if d.mmu == MmuDesign::Tdp {
            s.mmu_lock_read_acquisitions > 10_000 && s.mmu_lock_acquisitions > 0
        } else {
            s.mmu_lock_acquisitions > 10_000 && s.mmu.sp_shrunk > 0
        };
        assert!(took, "{mmu}: the workload took the lock: {s:?}");
    }
}
