//! The MMU through the VM: page sizes, locked dirty logging, the shrinker,
//! rmap chains, and the bad inputs of get_dirty_log.

use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_engine::{
    DirtyLogError, GuestOp, MemFlags, MmuDesign, VcpuExit, VmConfig, VmError, bitmap_words,
};
use shadow_mmu_testkit::fixtures::*;

#[test]
fn large_pages_only_where_the_slot_allows() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        // 3 MiB: the first 2 MiB can be one large spte, the last 1 MiB cannot.
        let (vm, _mem) = vm_with_slot(base.clone(), 3 * MIB, MemFlags::empty());
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, [GuestOp::Write(page(5), 1), GuestOp::Write(page(600), 2)]);
        let a = audit(&vm);
        assert_eq!((a.leaf_sptes, a.large_sptes), (2, 1), "{a:?}");
        // Anything else in the first 2 MiB needs no fault.
        let faults = vcpu.stats().page_faults;
        run_ops(&mut vcpu, (0..512).map(|i| GuestOp::Write(page(i), i)));
        assert_eq!(vcpu.stats().page_faults, faults);

        let (vm, _mem) =
            vm_with_slot(VmConfig { large_pages: false, ..base.clone() }, 3 * MIB, MemFlags::empty());
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, [GuestOp::Write(page(5), 1), GuestOp::Write(page(600), 2)]);
        assert_eq!(audit(&vm).large_sptes, 0);
    }
}

#[test]
fn enabling_logging_drops_large_sptes_and_write_protects_the_rest() {
    for base in designs_of(MmuDesign::Locked) {
        eprintln!("design: {}", describe(&base));
        let (vm, _mem) = vm_with_slot(base.clone(), 5 * MIB, MemFlags::empty());
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let gfns: Vec<u64> = (0..1280).step_by(3).collect();
        run_ops(&mut vcpu, gfns.iter().map(|&g| GuestOp::Write(page(g), g)));
        let before = audit(&vm);
        assert_eq!(before.large_sptes, 2, "{before:?}");
        assert!(before.writable_sptes > 2);

        vm.enable_dirty_logging(0).unwrap();
        let after = audit(&vm);
        assert_eq!(after.large_sptes, 0, "large sptes are dropped (locked design)");
        assert_eq!(after.writable_sptes, 0, "everything is write-protected");
        assert_eq!(vm.stats().mmu.large_sptes_dropped, 2);

        let mut bm = vec![0u64; bitmap_words(1280)];
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 0, "a fresh log is clean");
        // Reads map 4 KiB read-only and do not dirty; writes fault and dirty.
        run_ops(
            &mut vcpu,
            [GuestOp::Read(page(1)), GuestOp::Write(page(2), 1), GuestOp::Write(page(1000), 1)],
        );
        let a = audit(&vm);
        assert_eq!(a.writable_sptes, 2);
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 2);
        assert_eq!(set_pages(&bm), vec![2, 1000]);
        // Values survive all of it.
        let reads = run_ops(
            &mut vcpu,
            gfns.iter().filter(|&&g| g != 2 && g != 1000).map(|&g| GuestOp::Read(page(g))),
        );
        let want: Vec<u64> = gfns.iter().copied().filter(|&g| g != 2 && g != 1000).collect();
        assert_eq!(reads, want);
    }
}

#[test]
fn get_dirty_log_reports_exactly_the_pages_written_since_the_last_call() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let (vm, _mem) = vm_with_slot(base.clone(), 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut bm = vec![0u64; bitmap_words(512)];
        run_ops(&mut vcpu, [3, 64, 65, 200, 511, 3].map(|g| GuestOp::Write(page(g) + 8, g)));
        run_ops(&mut vcpu, [GuestOp::Read(page(100))]);
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 5);
        assert_eq!(bm[0], 1 << 3);
        assert_eq!(bm[1], 0b11);
        assert_eq!(bm[3], 1 << (200 - 192));
        assert_eq!(bm[7], 1 << 63);
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 0, "harvested bits are cleared");
        assert_eq!(bm, vec![0; 8]);
        // Each write after a harvest faults again (with PML: sets D and is
        // logged, no fault) and is reported again.
        let faults = vcpu.stats().write_faults;
        run_ops(&mut vcpu, [GuestOp::Write(page(3), 1), GuestOp::Write(page(3), 2)]);
        let refaults = u64::from(!base.pml);
        assert_eq!(vcpu.stats().write_faults, faults + refaults, "one fault, then the spte is writable");
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 1);
        assert_eq!(set_pages(&bm), vec![3]);
        assert_eq!(audit(&vm).writable_sptes, if base.pml { 5 } else { 0 });
    }
}

#[test]
fn get_dirty_log_refuses_bad_input_and_keeps_the_log() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let (vm, mem) = vm_with_slot(base.clone(), 2 * MIB, MemFlags::empty());
        let other = shadow_mmu_engine::HostMemory::anonymous(MIB).unwrap();
        vm.set_user_memory_region(region(1, 4 * MIB, MIB, &other, MemFlags::LOG_DIRTY_PAGES)).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, [GuestOp::Write(4 * MIB + page(9), 1)]);
        let mut small = vec![0u64; 3];
        assert_eq!(
            vm.get_dirty_log(1, &mut small).unwrap_err(),
            DirtyLogError::BitmapSize { slot: 1, npages: 256, expected: 4, got: 3 }
        );
        let mut big = vec![0u64; 5];
        assert!(matches!(vm.get_dirty_log(1, &mut big), Err(DirtyLogError::BitmapSize { got: 5, .. })));
        let mut bm = vec![0u64; 8];
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap_err(), DirtyLogError::NotLogging(0));
        assert_eq!(vm.get_dirty_log(9, &mut bm).unwrap_err(), DirtyLogError::NoSuchSlot(9));
        assert!(DirtyLogError::NotLogging(0).to_string().contains("KVM_MEM_LOG_DIRTY_PAGES"));
        // Nothing was harvested by the refused calls.
        let mut bm = vec![0u64; 4];
        assert_eq!(vm.get_dirty_log(1, &mut bm).unwrap(), 1);
        assert_eq!(set_pages(&bm), vec![9]);
        // And the guest kept running.
        assert_eq!(run_ops(&mut vcpu, [GuestOp::Read(4 * MIB + page(9))]), vec![1]);
        drop(mem);
    }
}

#[test]
fn the_shrinker_keeps_the_vm_within_its_budget() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let cfg = VmConfig { max_mmu_pages: Some(64), address_spaces: 4, large_pages: false, ..base.clone() };
        let (vm, _mem) = vm_with_slot(cfg, 64 * MIB, MemFlags::LOG_DIRTY_PAGES);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        // 16384 pages in 4 address spaces need about 4 * (32 + 3) tables.
        for asid in 0..4 {
            let mut ops = vec![GuestOp::SetAddressSpace(asid)];
            ops.extend((0..16384).map(|g| GuestOp::Write(page(g) + 8 * u64::from(asid), g)));
            run_ops(&mut vcpu, ops);
            let s = vm.stats();
            // The TDP MMU's tables are not counted against the shadow page
            // budget (upstream's `n_max_mmu_pages` is the shadow MMU's).
            let tdp = base.mmu == MmuDesign::Tdp;
            assert!(tdp || s.mmu_pages_used <= 64, "{} used", s.mmu_pages_used);
        }
        let s = vm.stats();
        let a = audit(&vm);
        if base.mmu == MmuDesign::Tdp {
            assert_eq!((s.mmu.sp_shrunk, a.shadow_pages), (0, 4 * (32 + 3)), "{s:?}");
        } else {
            let created = s.mmu.sp_created as usize;
            assert!(created > 64 && s.mmu.sp_shrunk as usize >= created - 64, "{s:?}");
            assert!(a.shadow_pages <= 64);
        }
        // Everything reads back, through rebuilt tables.
        for asid in 0..4u16 {
            let mut ops = vec![GuestOp::SetAddressSpace(asid)];
            ops.extend((0..16384).step_by(97).map(|g| GuestOp::Read(page(g) + 8 * u64::from(asid))));
            let reads = run_ops(&mut vcpu, ops);
            assert_eq!(reads, (0..16384).step_by(97).collect::<Vec<u64>>());
        }
        // Every written page was logged, shrinking or not.
        let mut bm = vec![0u64; bitmap_words(16384)];
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 16384);
        audit(&vm);
    }
}

#[test]
fn set_nr_mmu_pages_zaps_down_to_the_budget() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let cfg = VmConfig { large_pages: false, ..base.clone() };
        let (vm, _mem) = vm_with_slot(cfg, 64 * MIB, MemFlags::empty());
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, (0..16384).map(|g| GuestOp::Write(page(g), g)));
        assert_eq!(vm.stats().mmu_pages_used, 32 + 3, "32 page tables, a directory, a PDPT, a root");
        assert_eq!(vm.set_nr_mmu_pages(10), Err(VmError::BudgetTooSmall(10)));
        vm.set_nr_mmu_pages(64).unwrap();
        assert_eq!(vm.stats().mmu_pages_max, 64);
        let s = vm.stats();
        assert!(s.mmu_pages_used <= 64);
        audit(&vm);
        // The default budget follows guest memory: 2% of its pages, at least 64.
        let (vm, _mem) = vm_with_slot(base.clone(), 256 * MIB, MemFlags::empty());
        assert_eq!(vm.stats().mmu_pages_max, 65536 * 20 / 1000);
    }
}

#[test]
fn address_spaces_build_rmap_chains_that_get_dirty_log_protects_entirely() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let cfg = VmConfig { address_spaces: 7, ..base.clone() };
        let (vm, _mem) = vm_with_slot(cfg, 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        for asid in 0..7 {
            run_ops(&mut vcpu, [GuestOp::SetAddressSpace(asid), GuestOp::Write(page(42), u64::from(asid))]);
        }
        let a = audit(&vm);
        if base.mmu == MmuDesign::Tdp {
            // No rmap: GET finds the 7 sptes by walking the 7 trees.
            assert_eq!((a.max_rmap_len, a.writable_sptes), (0, 7), "{a:?}");
        } else {
            assert_eq!((a.max_rmap_len, a.writable_sptes), (7, 7), "{a:?}");
            assert!(vm.stats().desc_pool_in_use >= 3, "7 entries need 3 descriptors");
        }
        let mut bm = vec![0u64; 8];
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 1);
        // With PML the 7 sptes keep W and lose D.
        let writable = if base.pml { 7 } else { 0 };
        assert_eq!(audit(&vm).writable_sptes, writable, "all 7 sptes re-armed");
        // Each address space faults on its next write (with PML: logs it),
        // and is logged.
        for asid in 0..7 {
            let f = vcpu.stats().write_faults;
            run_ops(&mut vcpu, [GuestOp::SetAddressSpace(asid), GuestOp::Write(page(42), 100)]);
            assert_eq!(vcpu.stats().write_faults, f + u64::from(!base.pml));
        }
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 1);
    }
}

#[test]
fn vm_and_vcpu_configuration_errors() {
    let e = shadow_mmu_engine::Vm::new(VmConfig { address_spaces: 0, ..VmConfig::default() }).unwrap_err();
    assert!(matches!(e, VmError::BadConfig { field: "address_spaces", value: 0, min: 1, .. }), "{e}");
    let e = shadow_mmu_engine::Vm::new(VmConfig { tlb_entries: 0, ..VmConfig::default() }).unwrap_err();
    assert!(e.to_string().contains("tlb_entries"));
    assert_eq!(
        shadow_mmu_engine::Vm::new(VmConfig { max_mmu_pages: Some(3), ..VmConfig::default() }).unwrap_err(),
        VmError::BudgetTooSmall(3)
    );
    let (vm, _mem) = vm_with_slot(VmConfig::default(), 2 * MIB, MemFlags::empty());
    let _v0 = vm.create_vcpu(0).unwrap();
    assert_eq!(vm.create_vcpu(0).unwrap_err(), VmError::BadVcpuId { id: 0, max: 1024 });
    assert_eq!(vm.create_vcpu(5000).unwrap_err(), VmError::BadVcpuId { id: 5000, max: 1024 });
    let mut v1 = vm.create_vcpu(1).unwrap();
    assert_eq!(run_one(&mut v1, GuestOp::Hypercall(7)), VcpuExit::Hypercall(7));
}

#[test]
fn disabling_logging_lets_large_pages_come_back() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let (vm, _mem) = vm_with_slot(base.clone(), 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, (0..512).map(|g| GuestOp::Write(page(g), g)));
        assert_eq!(audit(&vm).large_sptes, 0);
        vm.disable_dirty_logging(0).unwrap();
        let mut bm = vec![0u64; 8];
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap_err(), DirtyLogError::NotLogging(0));
        // The 4 KiB sptes stay writable; a fault elsewhere in the region (none
        // here: all mapped) would not happen. Zap-by-budget, then refault: large.
        vm.set_nr_mmu_pages(64).unwrap();
        let reads = run_ops(&mut vcpu, (0..512).step_by(50).map(|g| GuestOp::Read(page(g))));
        assert_eq!(reads, (0..512).step_by(50).collect::<Vec<u64>>());
        audit(&vm);
    }
}

#[test]
fn lockless_enable_logging_keeps_large_sptes_read_only_and_drops_them_at_fault() {
    for base in designs_of(MmuDesign::Lockless) {
        eprintln!("design: {}", describe(&base));
        let cfg = base.clone();
        let (vm, _mem) = vm_with_slot(cfg, 4 * MIB, MemFlags::empty());
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, (0..1024).step_by(8).map(|g| GuestOp::Write(page(g), g)));
        assert_eq!(audit(&vm).large_sptes, 2);
        vm.enable_dirty_logging(0).unwrap();
        let a = audit(&vm);
        assert_eq!((a.large_sptes, a.writable_sptes), (2, 0), "patch 03: read-only, not dropped: {a:?}");
        assert_eq!(vm.stats().mmu.large_sptes_dropped, 0);
        // Reads of the logged slot do not fault.
        let faults = vcpu.stats().page_faults;
        let reads = run_ops(&mut vcpu, (0..1024).step_by(8).map(|g| GuestOp::Read(page(g))));
        assert_eq!(reads, (0..1024).step_by(8).collect::<Vec<u64>>());
        assert_eq!(vcpu.stats().page_faults, faults, "reads hit the read-only large sptes");
        // A write drops the large spte of its region (lazily) and maps 4 KiB.
        run_ops(&mut vcpu, [GuestOp::Write(page(600), 1)]);
        assert_eq!(vm.stats().mmu.large_sptes_dropped, 1);
        let a = audit(&vm);
        assert_eq!(a.large_sptes, 1, "the other region keeps its large spte");
        let mut bm = vec![0u64; 16];
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 1);
        assert_eq!(set_pages(&bm), vec![600]);
        // The next write to a protected 4 KiB page takes the fast path, if on.
        run_ops(&mut vcpu, [GuestOp::Write(page(600), 2)]);
        assert_eq!(vm.stats().mmu.fast_page_faults, u64::from(base.fast_page_fault));
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 1);
    }
}

#[test]
fn both_designs_fix_logged_write_faults_fast_unless_the_knob_is_off() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let (vm, _mem) = vm_with_slot(base.clone(), 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut bm = vec![0u64; 8];
        // The first write maps the page (slow path); each write after a
        // harvest finds it present and read-only.
        for round in 0..4 {
            run_ops(&mut vcpu, [GuestOp::Write(page(9), round)]);
            assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 1);
            assert_eq!(set_pages(&bm), vec![9]);
        }
        // With PML only the first write faults; the others set D.
        assert_eq!(vcpu.stats().write_faults, if base.pml { 1 } else { 4 });
        let fast = if base.fast_page_fault && !base.pml { 3 } else { 0 };
        assert_eq!(
            vm.stats().mmu.fast_page_faults,
            fast,
            "KVM 3.6+ fixes these without mmu_lock, in both designs"
        );
        audit(&vm);
    }
}

/// The lockless harvest's read-side sections are bounded (one per
/// `PAGES_PER_READ_SECTION` dirty pages), and a free under `mmu_lock` whose
/// pool backlog is full (here: always, with no free list and no backlog)
/// waits for a grace period while harvests run, without losing a page or
/// leaving an spte writable and unlogged.
#[test]
fn a_full_backlog_during_a_lockless_harvest() {
    use shadow_mmu_engine::dirty_log::PAGES_PER_READ_SECTION;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    for base in designs_of(MmuDesign::Lockless) {
        eprintln!("design: {}", describe(&base));
        let cfg = VmConfig {
            address_spaces: 3,
            large_pages: false,
            max_free_descs: 0,
            max_deferred_desc_bytes: 0,
            max_free_shadow_pages: 0,
            max_deferred_bytes: 0,
            ..base.clone()
        };
        let pages = 16384u64;
        let (vm, _mem) = vm_with_slot(cfg, pages * PAGE_SIZE, MemFlags::LOG_DIRTY_PAGES);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        for asid in 0..3 {
            let mut ops = vec![GuestOp::SetAddressSpace(asid)];
            ops.extend((0..pages).map(|g| GuestOp::Write(page(g), g)));
            run_ops(&mut vcpu, ops);
        }
        // One harvest of every page: bounded sections.
        let mut bm = vec![0u64; bitmap_words(pages)];
        let before = vm.stats().mmu.harvest_read_sections;
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), pages);
        let sections = vm.stats().mmu.harvest_read_sections - before;
        assert!(sections > pages / u64::from(PAGES_PER_READ_SECTION), "{sections} read-side sections");
        // Now the race: a vCPU re-dirties, an mmu notifier drops sptes (and
        // frees descriptors and tables into a full backlog) and the host
        // harvests, all at once.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut guest = Sweeper { first: 0, n: pages, i: 0, stop };
                assert_eq!(vcpu.run(&mut guest).unwrap(), VcpuExit::Hypercall(0));
                vcpu
            })
        };
        let zapper = {
            let vm = vm.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let gpa = (i * 7 % (pages / 16)) * 16 * PAGE_SIZE;
                    vm.mmu_notifier_invalidate_range(gpa, 16 * PAGE_SIZE).unwrap();
                }
            })
        };
        while !zapper.is_finished() {
            vm.get_dirty_log(0, &mut bm).unwrap();
        }
        zapper.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        let _vcpu = writer.join().unwrap();
        let s = vm.stats();
        assert!(s.pool_backlog_waits > 0, "frees waited for grace periods: {s:?}");
        assert!(s.pool_backlog_wait_max_ns > 0, "the longest wait is reported: {s:?}");
        // The dirty logging invariant holds (a writable spte has its bit set).
        audit(&vm);
    }
}
