//! The mmu notifier's invalidation and the kernbench workload, both designs.

use std::sync::Arc;
use std::time::Duration;

use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_engine::{GuestOp, MemFlags, MmuDesign, VmConfig, VmError};
use shadow_mmu_testkit::fixtures::*;
use shadow_mmu_testkit::kernbench::{KernbenchConfig, KernbenchRun, Workload, kernbench};

const DESIGNS: [MmuDesign; 4] = MmuDesign::ALL;

#[test]
fn invalidation_drops_exactly_the_range_and_the_pages_fault_in_again() {
    for mmu in DESIGNS {
        // 3 MiB: the first 2 MiB mapped by one large spte, the rest 4 KiB.
        let (vm, _mem) = vm_with_slot(VmConfig { mmu, ..VmConfig::default() }, 3 * MIB, MemFlags::empty());
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, (0..768).map(|g| GuestOp::Write(page(g), g)));
        let before = audit(&vm);
        assert_eq!((before.leaf_sptes, before.large_sptes), (257, 1), "{mmu}: {before:?}");

        // Pages 600..610: ten 4 KiB sptes.
        assert_eq!(vm.mmu_notifier_invalidate_range(page(600), 10 * PAGE_SIZE).unwrap(), 10, "{mmu}");
        assert_eq!(audit(&vm).leaf_sptes, 247, "{mmu}");
        // One page inside the large mapping drops all of it.
        assert_eq!(vm.mmu_notifier_invalidate_range(page(7), PAGE_SIZE).unwrap(), 1, "{mmu}");
        let a = audit(&vm);
        assert_eq!((a.leaf_sptes, a.large_sptes), (246, 0), "{mmu}: {a:?}");
        // Nothing left to drop there.
        assert_eq!(vm.mmu_notifier_invalidate_range(page(600), 10 * PAGE_SIZE).unwrap(), 0, "{mmu}");

        // The guest sees its data, and faults exactly where it was dropped.
        let faults = vcpu.stats().page_faults;
        let reads = run_ops(&mut vcpu, (0..768).map(|g| GuestOp::Read(page(g))));
        assert_eq!(reads, (0..768).collect::<Vec<_>>(), "{mmu}");
        assert_eq!(vcpu.stats().page_faults - faults, 11, "{mmu}: one large + ten small refaults");
    }
}

#[test]
fn invalidation_of_a_bad_range_is_refused_and_the_vm_goes_on() {
    let (vm, _mem) = vm_with_slot(VmConfig::default(), 2 * MIB, MemFlags::empty());
    let mut vcpu = vm.create_vcpu(0).unwrap();
    run_ops(&mut vcpu, [GuestOp::Write(page(3), 3)]);
    for (gpa, size) in [(PAGE_SIZE - 1, PAGE_SIZE), (0, 100), (!(PAGE_SIZE - 1), 2 * PAGE_SIZE)] {
        assert!(
            vm.mmu_notifier_invalidate_range(gpa, size) == Err(VmError::BadRange { gpa, size }),
            "[{gpa:#x}, +{size:#x})"
        );
    }
    assert_eq!(audit(&vm).leaf_sptes, 1);
    // Outside every slot: nothing to do, not an error.
    assert_eq!(vm.mmu_notifier_invalidate_range(64 * MIB, PAGE_SIZE).unwrap(), 0);
    assert_eq!(run_ops(&mut vcpu, [GuestOp::Read(page(3))]), vec![3]);
}

fn config(mmu: MmuDesign, workload: Workload) -> KernbenchConfig {
    KernbenchConfig {
        fast_page_fault: true,
        mmu,
        vcpus: 2,
        // 96 page tables' worth, over a budget of 64 pages.
        guest_bytes: 192 * MIB,
        workload,
        max_mmu_pages: 64,
        invalidate_every: Some(Duration::from_micros(200)),
        duration: Duration::from_millis(300),
        seed: 7,
    }
}

/// The shadow page budget binds the shadow MMU designs; the TDP MMU's
/// tables are not counted against it (upstream's `n_max_mmu_pages` is the
/// shadow MMU's), so its shrinker never runs.
fn assert_shrinker(mmu: MmuDesign, r: &KernbenchRun) {
    if mmu == MmuDesign::Tdp {
        assert_eq!(r.sp_shrunk, 0, "{mmu}: {r:?}");
    } else {
        assert!(r.sp_shrunk > 0, "{mmu}: {r:?}");
    }
}

#[test]
fn kernbench_sweep_faults_under_notifier_and_shrinker_pressure() {
    for mmu in DESIGNS {
        let r = kernbench(&config(mmu, Workload::Sweep)).unwrap();
        assert!(r.ops_per_sec > 0.0 && r.faults_per_sec > 0.0, "{mmu}: {r:?}");
        assert!(r.invalidations > 10, "{mmu}: {r:?}");
        assert_shrinker(mmu, &r);
    }
}

#[test]
fn kernbench_replays_a_trace_on_a_copy_per_vcpu() {
    // A toy trace: 40 pages, reads then writes, with revisits.
    let entries: Arc<[u32]> = (0..400u32).map(|i| ((i * 7) % 40) << 1 | (i % 3 == 0) as u32).collect();
    for mmu in DESIGNS {
        // 192 MiB hold 1228 copies of 40 pages: each lap runs in fresh memory,
        // so the shrinker works too, once the laps have faulted in more than
        // the budget of 64 tables maps (64 x 512 pages). On a loaded machine
        // 300 ms may not get that far: run longer until it does.
        let mut cfg = config(mmu, Workload::Replay { entries: entries.clone(), pages: 40 });
        let r = loop {
            let r = kernbench(&cfg).unwrap();
            let faults = r.faults_per_sec * cfg.duration.as_secs_f64();
            if faults > 2.0 * 64.0 * 512.0 || cfg.duration >= Duration::from_secs(8) {
                break r;
            }
            cfg.duration *= 3;
        };
        assert!(r.ops_per_sec > 0.0 && r.faults_per_sec > 0.0, "{mmu}: {r:?}");
        assert_shrinker(mmu, &r);
    }
    // Two vCPUs need two copies.
    let mut small = config(MmuDesign::Locked, Workload::Replay { entries: entries.clone(), pages: 40 });
    small.guest_bytes = 79 * PAGE_SIZE;
    assert!(kernbench(&small).is_err());
    let bad: Arc<[u32]> = Arc::from([3u32 << 1, 80 << 1]);
    assert!(kernbench(&config(MmuDesign::Lockless, Workload::Replay { entries: bad, pages: 40 })).is_err());
    let empty: Arc<[u32]> = Arc::from([]);
    assert!(kernbench(&config(MmuDesign::Lockless, Workload::Replay { entries: empty, pages: 40 })).is_err());
}
