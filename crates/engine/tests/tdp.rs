//! The `tdp` design's own behaviour: which mode of `mmu_lock` each path
//! takes, eager page splitting on enable and at CLEAR, splitting in place
//! at fault time without it, and PML.

use std::sync::Arc;

use shadow_mmu_engine::{GuestOp, HostMemory, MemFlags, MmuDesign, Vcpu, Vm, VmConfig, VmError};
use shadow_mmu_testkit::fixtures::*;
use shadow_mmu_vmm::DirtyLogProtect;

fn tdp(eager_page_split: bool) -> VmConfig {
    VmConfig { mmu: MmuDesign::Tdp, eager_page_split, ..VmConfig::default() }
}

/// 4 MiB mapped with 2 MiB leaves (logging off), every page written.
fn populated(cfg: VmConfig) -> (Vm, Vcpu, Arc<HostMemory>) {
    let (vm, mem) = vm_with_slot(cfg, 4 * MIB, MemFlags::empty());
    let mut vcpu = vm.create_vcpu(0).unwrap();
    run_ops(&mut vcpu, (0..1024).map(|g| GuestOp::Write(page(g), g)));
    assert_eq!(audit(&vm).large_sptes, 2);
    (vm, vcpu, mem)
}

#[test]
fn faults_take_the_read_lock_and_the_harvest_the_write_lock() {
    let (vm, mut vcpu, _mem) = populated(tdp(true));
    vm.enable_dirty_logging(0).unwrap();
    let s0 = vm.stats();
    run_ops(&mut vcpu, (0..1024).step_by(3).map(|g| GuestOp::Write(page(g), 1)));
    let mut bm = vec![0u64; 16];
    assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 342);
    let s = vm.stats();
    assert_eq!(s.mmu.fault_mmu_lock_writes, 0, "no fault takes it for write");
    assert_eq!(s.mmu.harvest_mmu_lock_reads, 0, "no harvest takes it for read");
    assert!(s.mmu.harvest_mmu_lock_writes > 0);
    assert!(s.mmu_lock_read_acquisitions >= s0.mmu_lock_read_acquisitions);
    audit(&vm);
}

#[test]
fn eager_split_on_enable_splits_every_huge_page_and_the_writes_take_the_fast_path() {
    let (vm, mut vcpu, _mem) = populated(tdp(true));
    vm.enable_dirty_logging(0).unwrap();
    let a = audit(&vm);
    assert_eq!((a.large_sptes, a.writable_sptes), (0, 0), "split, then write-protected: {a:?}");
    assert_eq!(vm.stats().mmu.tdp_eager_splits, 2);
    let faults = vm.stats().mmu.fault_mmu_lock_reads;
    run_ops(&mut vcpu, (0..1024).map(|g| GuestOp::Write(page(g), 2)));
    assert_eq!(vm.stats().mmu.fault_mmu_lock_reads, faults, "no slow fault after an eager split");
    assert_eq!(vm.stats().mmu.fast_page_faults, 1024);
    let mut bm = vec![0u64; 16];
    assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 1024);
}

#[test]
fn without_eager_split_the_first_write_splits_in_place() {
    let (vm, mut vcpu, _mem) = populated(tdp(false));
    vm.enable_dirty_logging(0).unwrap();
    let a = audit(&vm);
    assert_eq!((a.large_sptes, a.writable_sptes), (2, 0), "write-protected, not split: {a:?}");
    run_ops(&mut vcpu, [GuestOp::Write(page(5), 1)]);
    let s = vm.stats();
    assert_eq!((s.mmu.tdp_huge_pages_split, s.mmu.tdp_eager_splits), (1, 0));
    // The other 511 pages of the region stayed mapped, read-only and
    // MMU-writable: their writes take the fast path.
    let slow = s.mmu.fault_mmu_lock_reads;
    run_ops(&mut vcpu, (0..512).map(|g| GuestOp::Write(page(g), 2)));
    assert_eq!(vm.stats().mmu.fault_mmu_lock_reads, slow);
    assert_eq!(audit(&vm).large_sptes, 1, "the other region is still huge");
    let mut bm = vec![0u64; 16];
    assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 512);
}

#[test]
fn with_initially_set_each_clear_splits_its_range() {
    let cfg = VmConfig { dirty_log_protect: DirtyLogProtect::ManualInitiallySet, ..tdp(true) };
    let (vm, mut vcpu, _mem) = populated(cfg);
    vm.enable_dirty_logging(0).unwrap();
    assert_eq!(audit(&vm).large_sptes, 2, "INITIALLY_SET protects and splits nothing on enable");
    // CLEAR the first 64 pages: their 2 MiB page is split and they lose W.
    vm.clear_dirty_log(0, 0, 64, &[!0]).unwrap();
    let a = audit(&vm);
    assert_eq!(a.large_sptes, 1, "{a:?}");
    assert_eq!(vm.stats().mmu.tdp_eager_splits, 1);
    let faults = vcpu.stats().page_faults;
    run_ops(&mut vcpu, [GuestOp::Write(page(7), 1), GuestOp::Write(page(100), 1)]);
    assert_eq!(vcpu.stats().page_faults, faults + 1, "page 7 was protected, page 100 was not");
}

#[test]
fn pml_logs_stores_without_faults_and_only_in_the_tdp_design() {
    let e =
        shadow_mmu_engine::Vm::new(VmConfig { pml: true, mmu: MmuDesign::Lockless, ..VmConfig::default() });
    assert_eq!(e.err(), Some(VmError::PmlNeedsTdp(MmuDesign::Lockless)));
    let cfg = VmConfig { pml: true, large_pages: false, ..tdp(true) };
    let (vm, _mem) = vm_with_slot(cfg, 4 * MIB, MemFlags::LOG_DIRTY_PAGES);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    run_ops(&mut vcpu, (0..1024).map(|g| GuestOp::Write(page(g), g)));
    let mut bm = vec![0u64; 16];
    assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 1024);
    // Re-armed by clearing D: 600 more stores log without a fault, and
    // fill the 512-entry log once.
    let faults = vcpu.stats().page_faults;
    run_ops(&mut vcpu, (0..600).map(|g| GuestOp::Write(page(g) + 8, 1)));
    let s = vcpu.stats();
    assert_eq!(s.page_faults, faults);
    assert_eq!(s.pml_full_exits, 1);
    assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 600);
    assert_eq!(set_pages(&bm), (0..600).collect::<Vec<u64>>());
    audit(&vm);
}
