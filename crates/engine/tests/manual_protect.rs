//! Manual protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) and `INITIALLY_SET`
//! on the engine, in every design: GET only copies, CLEAR clears the set bits
//! of its mask and re-protects those pages, every refusal is typed and
//! changes nothing, and the audit's dirty-log invariant holds throughout.

use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_engine::{ClearDirtyLogError, DirtyLogError, GuestOp, MemFlags, VcpuExit, VmConfig};
use shadow_mmu_testkit::fixtures::*;
use shadow_mmu_vmm::DirtyLogProtect;

fn manual(base: &VmConfig, p: DirtyLogProtect) -> VmConfig {
    VmConfig { dirty_log_protect: p, ..base.clone() }
}

fn get(vm: &shadow_mmu_engine::Vm, words: usize) -> Vec<u64> {
    let mut bm = vec![0u64; words];
    vm.get_dirty_log(0, &mut bm).unwrap();
    bm
}

#[test]
fn get_copies_and_clear_clears_only_the_set_bits_of_its_mask() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let (vm, _mem) =
            vm_with_slot(manual(&base, DirtyLogProtect::Manual), 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, [1, 5, 70, 130].map(|g| GuestOp::Write(page(g), g)));
        let first = get(&vm, 8);
        assert_eq!(set_pages(&first), [1, 5, 70, 130]);
        assert_eq!(get(&vm, 8), first, "GET only copies: the log is unchanged");
        audit(&vm);
        // The reported pages stay writable until a CLEAR: no new fault.
        let faults = vcpu.stats().page_faults;
        run_ops(&mut vcpu, [GuestOp::Write(page(5) + 8, 1)]);
        assert_eq!(vcpu.stats().page_faults, faults, "page 5 is still writable after GET");
        // A page dirtied after the GET is not in the caller's mask: a CLEAR
        // with the GET's mask leaves its bit (and its writable spte) alone.
        run_ops(&mut vcpu, [GuestOp::Write(page(9), 9)]);
        let cleared = vm.clear_dirty_log(0, 0, 512, &first).unwrap();
        assert_eq!(cleared, 4);
        assert_eq!(set_pages(&get(&vm, 8)), [9]);
        audit(&vm);
        // A CLEAR of bits that are not set clears nothing.
        assert_eq!(vm.clear_dirty_log(0, 0, 512, &first).unwrap(), 0);
        // The cleared pages are protected again: the next write faults and
        // marks; a partial range (one word, from page 64) clears page 70 only.
        run_ops(&mut vcpu, [GuestOp::Write(page(1), 2), GuestOp::Write(page(70), 3)]);
        assert_eq!(set_pages(&get(&vm, 8)), [1, 9, 70]);
        assert_eq!(vm.clear_dirty_log(0, 64, 64, &[u64::MAX]).unwrap(), 1);
        assert_eq!(set_pages(&get(&vm, 8)), [1, 9]);
        audit(&vm);
        let s = vm.stats().mmu;
        assert_eq!((s.clear_dirty_log_calls, s.pages_cleared), (3, 5));
    }
}

#[test]
fn clear_refusals_are_typed_and_change_nothing() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        // 300 pages: the last word is partial.
        let (vm, _mem) = vm_with_slot(base.clone(), 300 * PAGE_SIZE, MemFlags::LOG_DIRTY_PAGES);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, [GuestOp::Write(page(3), 1), GuestOp::Write(page(299), 2)]);
        assert_eq!(vm.clear_dirty_log(0, 0, 300, &[u64::MAX; 5]), Err(ClearDirtyLogError::NotManual));
        vm.set_dirty_log_protect(DirtyLogProtect::Manual);
        assert_eq!(vm.dirty_log_protect(), DirtyLogProtect::Manual);
        let want = get(&vm, 5);
        assert_eq!(set_pages(&want), [3, 299], "GET (still classic before the cap) left them set");
        // The classic GET above cleared and re-protected them; dirty them again.
        run_ops(&mut vcpu, [GuestOp::Write(page(3), 3), GuestOp::Write(page(299), 4)]);
        let want = get(&vm, 5);
        let bad: Vec<(u32, u64, u64, Vec<u64>, ClearDirtyLogError)> = vec![
            (0, 1, 64, vec![1], ClearDirtyLogError::FirstPageUnaligned { first_page: 1 }),
            (7, 0, 64, vec![1], ClearDirtyLogError::DirtyLog(DirtyLogError::NoSuchSlot(7))),
            (
                0,
                320,
                0,
                vec![],
                ClearDirtyLogError::BadRange { slot: 0, first_page: 320, num_pages: 0, npages: 300 },
            ),
            (
                0,
                256,
                64,
                vec![1],
                ClearDirtyLogError::BadRange { slot: 0, first_page: 256, num_pages: 64, npages: 300 },
            ),
            (
                0,
                0,
                100,
                vec![1, 1],
                ClearDirtyLogError::BadRange { slot: 0, first_page: 0, num_pages: 100, npages: 300 },
            ),
            (0, 0, 128, vec![u64::MAX], ClearDirtyLogError::MaskSize { num_pages: 128, expected: 2, got: 1 }),
            (0, 256, 44, vec![1, 1], ClearDirtyLogError::MaskSize { num_pages: 44, expected: 1, got: 2 }),
        ];
        for (slot, first, n, mask, e) in bad {
            assert_eq!(vm.clear_dirty_log(slot, first, n, &mask), Err(e.clone()), "{slot} {first}+{n}");
            assert!(!e.to_string().is_empty());
            assert_eq!(get(&vm, 5), want, "a refused CLEAR changed the log");
        }
        // Good edge cases: an empty range at the end, the partial last word.
        assert_eq!(vm.clear_dirty_log(0, 256, 0, &[]), Ok(0));
        assert_eq!(vm.clear_dirty_log(0, 256, 44, &[u64::MAX]), Ok(1));
        assert_eq!(set_pages(&get(&vm, 5)), [3]);
        vm.disable_dirty_logging(0).unwrap();
        assert_eq!(
            vm.clear_dirty_log(0, 0, 300, &[0; 5]),
            Err(ClearDirtyLogError::DirtyLog(DirtyLogError::NotLogging(0)))
        );
        // The VM runs on.
        assert_eq!(run_ops(&mut vcpu, [GuestOp::Write(page(4), 5), GuestOp::Read(page(4))]), vec![5]);
        audit(&vm);
    }
}

#[test]
fn initially_set_starts_all_ones_and_protects_chunk_by_chunk() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let config = manual(&base, DirtyLogProtect::ManualInitiallySet);
        let (vm, _mem) = vm_with_slot(config, 4 * MIB, MemFlags::empty());
        let mut vcpu = vm.create_vcpu(0).unwrap();
        // Map the first 2 MiB large (one write per page), before logging.
        run_ops(&mut vcpu, (0..512).map(|g| GuestOp::Write(page(g), g)));
        assert!(vm.stats().mmu.large_sptes_mapped > 0, "the region should be mapped large");
        let protected = vm.stats().mmu.sptes_write_protected;
        vm.enable_dirty_logging(0).unwrap();
        assert_eq!(vm.stats().mmu.sptes_write_protected, protected, "enabling protects nothing");
        assert_eq!(get(&vm, 16).iter().map(|w| w.count_ones()).sum::<u32>(), 1024, "all ones");
        audit(&vm);
        // Writes through the large spte need no fault.
        let faults = vcpu.stats().page_faults;
        run_ops(&mut vcpu, [GuestOp::Write(page(100), 1)]);
        assert_eq!(vcpu.stats().page_faults, faults);
        // CLEAR one word inside the large page: the 2 MiB page is protected
        // first, then the 4 KiB ones; every other page stays marked.
        assert_eq!(vm.clear_dirty_log(0, 64, 64, &[u64::MAX]).unwrap(), 64);
        let bm = get(&vm, 16);
        assert_eq!(bm[1], 0);
        assert_eq!(bm.iter().map(|w| w.count_ones()).sum::<u32>(), 1024 - 64);
        audit(&vm);
        // A write to a cleared page faults and marks it again; one to a page
        // still marked is logged either way.
        run_ops(&mut vcpu, [GuestOp::Write(page(70), 2), GuestOp::Write(page(200), 3)]);
        assert!(vcpu.stats().page_faults > faults, "the large spte was protected");
        assert_eq!(get(&vm, 16)[1], 1 << 6);
        audit(&vm);
        // Clearing everything leaves a log that only new writes fill.
        let all = get(&vm, 16);
        vm.clear_dirty_log(0, 0, 1024, &all).unwrap();
        assert_eq!(set_pages(&get(&vm, 16)), Vec::<u64>::new());
        run_ops(&mut vcpu, [GuestOp::Write(page(513), 4)]);
        assert_eq!(set_pages(&get(&vm, 16)), [513]);
        audit(&vm);
        // Re-enabling logging starts all ones again.
        vm.disable_dirty_logging(0).unwrap();
        vm.enable_dirty_logging(0).unwrap();
        assert_eq!(get(&vm, 16).iter().map(|w| w.count_ones()).sum::<u32>(), 1024);
        assert_eq!(run_one(&mut vcpu, GuestOp::Hypercall(0)), VcpuExit::Hypercall(0));
    }
}

#[test]
fn only_the_locked_design_takes_mmu_lock_to_harvest() {
    for base in every_design() {
        for protect in [DirtyLogProtect::Auto, DirtyLogProtect::Manual] {
            let (vm, _mem) = vm_with_slot(manual(&base, protect), 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
            let mut vcpu = vm.create_vcpu(0).unwrap();
            run_ops(&mut vcpu, (0..300).map(|g| GuestOp::Write(page(g), g)));
            let got = get(&vm, 8);
            assert_eq!(set_pages(&got).len(), 300);
            if protect == DirtyLogProtect::Manual {
                assert_eq!(vm.clear_dirty_log(0, 0, 512, &got).unwrap(), 300);
            }
            let held = vm.stats().mmu.harvest_mmu_lock_hold_ns;
            let what = format!("{} {protect:?}: harvests held mmu_lock {held} ns", describe(&base));
            assert_eq!(held > 0, !base.mmu.protects_without_mmu_lock(), "{what}");
            // The walks protected every page (the next writes fault) and
            // left no rmap locked (the audit checks every lock bit).
            audit(&vm);
            let faults = vcpu.stats().page_faults;
            run_ops(&mut vcpu, [GuestOp::Write(page(7), 1)]);
            if base.pml {
                // Re-armed by clearing D: the store logs the page, no fault.
                assert_eq!(vcpu.stats().page_faults, faults, "{what}");
                assert_eq!(set_pages(&get(&vm, 8)), [7], "{what}: page 7 was logged again");
            } else {
                assert_eq!(vcpu.stats().page_faults, faults + 1, "{what}: page 7 was protected");
            }
        }
    }
}
