//! The oracle, in the manner of KVM's `dirty_log_test`, against every design.
//! CI parameters: 2 vCPUs, 256 MiB, 50 collections. The long version is
//! `shadow-mmu stress` (see the README).

use std::time::Duration;

use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_engine::workload::{AccessPattern, WorkloadSpec};
use shadow_mmu_engine::{MmuDesign, VmConfig, VmStats};
use shadow_mmu_testkit::fixtures::{describe, every_design};
use shadow_mmu_testkit::harness::{self, RunConfig, RunReport};

/// The CI shape: 50 collections (the duration only bounds them), for the
/// design of `d` (its MMU design and `fast_page_fault`).
fn fifty_collections(d: &VmConfig) -> RunConfig {
    RunConfig { duration: Duration::from_secs(600), max_collections: Some(50), ..RunConfig::for_design(d) }
}

/// A small, fast-collecting run of the design of `d`: `vcpus` over `mib`
/// MiB, a collection every 3 ms.
fn small(d: &VmConfig, vcpus: u32, mib: u64) -> RunConfig {
    RunConfig {
        vcpus,
        guest_bytes: mib << 20,
        interval: Duration::from_millis(3),
        warmup: Duration::from_millis(30),
        ..fifty_collections(d)
    }
}

fn check(cfg: &RunConfig) -> RunReport {
    let r = harness::run(cfg, |_, _| {}).unwrap();
    assert!(r.ok(), "{cfg:?}\nlost {}: {:?}\nerrors: {:?}", r.lost_pages, r.lost, r.errors);
    assert_eq!(Some(r.collections), cfg.max_collections, "ran every collection");
    assert!(r.harvested_pages > 0 && r.vcpu.page_faults > 0, "{r:?}");
    r
}

#[test]
fn ci_two_vcpus_256_mib_50_collections() {
    for d in every_design() {
        let cfg = RunConfig {
            vcpus: 2,
            guest_bytes: 256 << 20,
            interval: Duration::from_millis(10),
            warmup: Duration::from_millis(100),
            ..fifty_collections(&d)
        };
        let r = check(&cfg);
        assert!(r.vm.mmu.sptes_write_protected > 0);
    }
}

/// The shadow page budget binds the shadow MMU designs; the TDP MMU's
/// tables are not counted against it (upstream's `n_max_mmu_pages` is the
/// shadow MMU's), and a deleted slot's leaves go but its tables stay.
fn assert_shrinker_ran(d: &VmConfig, vm: &VmStats) {
    let mmu = describe(d);
    if d.mmu == MmuDesign::Tdp {
        assert_eq!(vm.mmu.sp_shrunk, 0, "{mmu}: no shrinker");
    } else {
        assert!(vm.mmu.sp_shrunk > 0, "{mmu}: the shrinker ran");
    }
}

#[test]
fn random_reads_and_writes_under_shrinker_pressure_with_rmap_chains() {
    for d in every_design() {
        let mmu = describe(&d);
        let cfg = RunConfig {
            vcpus: 3,
            guest_bytes: 64 << 20,
            interval: Duration::from_millis(3),
            warmup: Duration::from_millis(50),
            workload: WorkloadSpec {
                pattern: AccessPattern::Random,
                write_pct: 70,
                address_spaces: 4,
                switch_every: 500,
                ..WorkloadSpec::default()
            },
            max_mmu_pages: Some(64),
            ..fifty_collections(&d)
        };
        let r = check(&cfg);
        assert_shrinker_ran(&d, &r.vm);
        assert!(r.vcpu.reads > 0 && r.vcpu.writes > 0, "{mmu}");
    }
}

#[test]
fn hot_set_through_small_tlbs_with_pass_exits() {
    for d in every_design() {
        let cfg = RunConfig {
            vcpus: 4,
            guest_bytes: 16 << 20,
            interval: Duration::from_millis(2),
            warmup: Duration::from_millis(20),
            workload: WorkloadSpec {
                pattern: AccessPattern::Hot { hot_pages_pct: 5, hot_access_pct: 95 },
                exit_each_pass: true,
                ..WorkloadSpec::default()
            },
            tlb_entries: 64,
            ..fifty_collections(&d)
        };
        let r = check(&cfg);
        assert!(r.vcpu.tlb_hits > 0, "the TLB served accesses, so stale entries matter");
    }
}

#[test]
fn under_shrinker_pressure_while_a_memslot_is_deleted_and_re_added() {
    for d in every_design() {
        let mmu = describe(&d);
        let cfg = RunConfig {
            vcpus: 2,
            guest_bytes: 64 << 20,
            interval: Duration::from_millis(3),
            warmup: Duration::from_millis(50),
            workload: WorkloadSpec {
                pattern: AccessPattern::Random,
                address_spaces: 3,
                switch_every: 300,
                ..WorkloadSpec::default()
            },
            max_mmu_pages: Some(64),
            max_free_shadow_pages: Some(0),
            slot_churn: true,
            ..fifty_collections(&d)
        };
        let r = check(&cfg);
        assert_shrinker_ran(&d, &r.vm);
        assert!(r.slot_churn_cycles > 0, "{mmu}: the slot was deleted and re-added");
        if d.mmu != MmuDesign::Tdp {
            assert!(
                r.vm.pool_objects_returned > 0,
                "{mmu}: shadow page memory went back after grace periods"
            );
        }
    }
}

#[test]
fn logging_turned_off_and_on_again_with_the_vcpus_running() {
    for d in every_design() {
        let mmu = describe(&d);
        let cfg = RunConfig { relog_every: Some(5), ..small(&d, 2, 32) };
        let r = check(&cfg);
        assert_eq!(r.relogs, 10, "{mmu}");
        if d.fast_page_fault {
            assert!(r.vm.mmu.fast_page_faults > 0, "{mmu}: the fast path ran across the re-enables");
        }
    }
}

#[test]
fn mmu_notifier_invalidations_during_dirty_logging() {
    for d in every_design() {
        let mmu = describe(&d);
        let cfg = RunConfig {
            vcpus: 2,
            guest_bytes: 32 << 20,
            interval: Duration::from_millis(3),
            warmup: Duration::from_millis(30),
            workload: WorkloadSpec {
                pattern: AccessPattern::Random,
                write_pct: 80,
                ..WorkloadSpec::default()
            },
            invalidate_every: Some(Duration::from_micros(300)),
            ..fifty_collections(&d)
        };
        let r = check(&cfg);
        assert!(r.invalidations > 10, "{mmu}: {} invalidations", r.invalidations);
    }
}

#[test]
fn logging_on_several_slots_at_once() {
    for d in every_design() {
        let mmu = describe(&d);
        let cfg = RunConfig {
            vcpus: 3,
            guest_bytes: 48 << 20,
            slots: 3,
            interval: Duration::from_millis(3),
            warmup: Duration::from_millis(30),
            workload: WorkloadSpec {
                pattern: AccessPattern::Random,
                address_spaces: 2,
                ..WorkloadSpec::default()
            },
            ..fifty_collections(&d)
        };
        let r = check(&cfg);
        assert!(r.vm.mmu.sptes_write_protected > 0, "{mmu}");
        assert_eq!(
            r.vm.mmu.get_dirty_log_calls,
            3 * (r.collections + 1),
            "{mmu}: each slot, each collection"
        );
    }
}

/// Manual protect: GET, then CLEAR in chunks (small ones, so that many
/// CLEARs run while the vCPUs fault), with and without `INITIALLY_SET`,
/// with relogging and notifier invalidations, checked by the oracle at
/// every collection.
#[test]
fn manual_protect_with_chunked_clears_and_initially_set() {
    use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec};
    for d in every_design() {
        for (initially_set, chunk) in [(false, 64), (true, 512), (true, 1 << 18)] {
            let mmu = describe(&d);
            let cfg = RunConfig {
                workload: WorkloadSpec {
                    pattern: AccessPattern::Random,
                    write_pct: 80,
                    ..WorkloadSpec::default()
                },
                relog_every: Some(20),
                invalidate_every: Some(Duration::from_micros(500)),
                harvest: HarvestSpec {
                    interface: DirtyLogInterface::Clear,
                    clear_chunk_pages: chunk,
                    initially_set,
                    ..HarvestSpec::default()
                },
                ..small(&d, 2, 32)
            };
            let r = check(&cfg);
            let m = &r.vm.mmu;
            assert!(m.clear_dirty_log_calls > 0 && m.pages_cleared > 0, "{mmu}: {m:?}");
            if chunk == 64 {
                assert!(m.clear_dirty_log_calls > 2 * r.collections, "{mmu}: chunked CLEARs");
            }
            if initially_set {
                // Each enable (the first and two relogs) starts all ones.
                assert!(r.harvested_pages >= 3 * (32 << 8), "{mmu}: {} harvested", r.harvested_pages);
            }
        }
    }
}

/// The dirty ring, with a ring small enough that the vCPUs keep hitting its
/// soft limit, with relogging and notifier invalidations, checked by the
/// oracle at every collection.
#[test]
fn the_dirty_ring_with_full_exits_relogging_and_invalidations() {
    use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec};
    for d in every_design() {
        let mmu = describe(&d);
        let cfg = RunConfig {
            workload: WorkloadSpec {
                pattern: AccessPattern::Random,
                write_pct: 80,
                ..WorkloadSpec::default()
            },
            relog_every: Some(20),
            invalidate_every: Some(Duration::from_micros(500)),
            harvest: HarvestSpec {
                interface: DirtyLogInterface::Ring,
                // PML reserves a whole log's drain (512 entries) beyond
                // KVM's 64: its smallest ring is larger.
                ring_entries: if d.pml { 1024 } else { 256 },
                ..HarvestSpec::default()
            },
            ..small(&d, 2, 32)
        };
        let r = check(&cfg);
        let m = &r.vm.mmu;
        assert!(
            m.ring_entries_harvested > 0 && m.ring_entries_reset == m.ring_entries_harvested,
            "{mmu}: {m:?}"
        );
        assert!(r.vcpu.dirty_ring_full_exits > 0, "{mmu}: the ring should fill");
        assert_eq!(m.get_dirty_log_calls, 0, "{mmu}: no bitmap ioctl with the ring");
    }
}

/// Every interface with the harvest split over threads (3: chunks of
/// uneven size), checked by the oracle in every design.
#[test]
fn harvests_on_several_threads() {
    use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec};
    for d in every_design() {
        for interface in [DirtyLogInterface::Get, DirtyLogInterface::Clear, DirtyLogInterface::Ring] {
            let mmu = describe(&d);
            let cfg = RunConfig {
                workload: WorkloadSpec {
                    pattern: AccessPattern::Random,
                    write_pct: 80,
                    ..WorkloadSpec::default()
                },
                harvest: HarvestSpec {
                    interface,
                    clear_chunk_pages: 1024,
                    ring_entries: 1024,
                    harvest_threads: 3,
                    ..HarvestSpec::default()
                },
                max_collections: Some(25),
                ..small(&d, 2, 16)
            };
            let r = check(&cfg);
            assert!(r.vm.mmu.sptes_write_protected > 0, "{mmu} {interface}");
        }
    }
}

/// KVM's dirty_log_test, in every design and with every interface (the
/// slot not a multiple of 64 pages, as the selftest's).
#[test]
fn dirty_log_test_in_every_design_and_interface() {
    use shadow_mmu_engine::EngineBackend;
    use shadow_mmu_testkit::dirty_log_test::dirty_log_test;
    use shadow_mmu_vmm::{Backend, PassSpec};
    use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec};
    for d in every_design() {
        for (interface, initially_set) in [
            (DirtyLogInterface::Get, false),
            (DirtyLogInterface::Clear, false),
            (DirtyLogInterface::Clear, true),
            (DirtyLogInterface::Ring, false),
        ] {
            let spec = HarvestSpec {
                interface,
                initially_set,
                clear_chunk_pages: 1024,
                ring_entries: 2048,
                ..HarvestSpec::default()
            };
            let config = VmConfig { dirty_log_protect: spec.protect(), ..d.clone() };
            let backend = EngineBackend { config, dirty_ring: spec.ring() };
            let pass = PassSpec { random: true, ..PassSpec::sweep(1, 4099 * PAGE_SIZE, 5) };
            let mut vm = backend.start_passes(&pass).unwrap();
            let r = dirty_log_test(vm.as_mut(), &spec, 8, Duration::from_millis(3), 5, |_, _| {})
                .unwrap_or_else(|e| panic!("{} {}: {e}", describe(&d), spec.label()));
            assert_eq!(r.iterations.len(), 8);
            assert!(r.dirty_checked > 0 && r.clear_checked > 0, "{r:?}");
        }
    }
}

/// Each lock-fault workload alone, then the three mixed, at `rate` faults
/// per second per vCPU.
fn lock_fault_workloads(rate: u32) -> [(&'static str, shadow_mmu_vmm::LockFaults); 4] {
    use shadow_mmu_vmm::LockFaults;
    let none = LockFaults::default();
    [
        ("fresh", LockFaults { fresh_per_sec: rate, ..none }),
        ("split", LockFaults { split_per_sec: rate, ..none }),
        ("invalidations", LockFaults { invalidations_per_sec: rate, ..none }),
        ("mix", LockFaults::mix(rate)),
    ]
}

/// The lock faults (fresh memory, broken-up huge pages, mmu notifier
/// invalidations, and the three mixed) while logging is on, through the
/// harness: every design, the oracle checking every collection, each
/// workload seen to run.
#[test]
fn lock_fault_workloads_in_every_design() {
    for d in every_design() {
        for (what, lock) in lock_fault_workloads(200_000) {
            let mut cfg = RunConfig { max_collections: Some(20), ..small(&d, 2, 16) };
            cfg.workload.lock_faults = lock;
            let r = check(&cfg);
            let ctx = format!("{} {what}: {r:?}", describe(&d));
            assert_eq!(r.reserve.fresh > 0, lock.fresh_per_sec > 0, "{ctx}");
            assert_eq!(r.reserve.split > 0, lock.split_per_sec > 0, "{ctx}");
            assert_eq!(r.invalidations > 0, lock.invalidations_per_sec > 0, "{ctx}");
        }
    }
}

/// The same workloads on the pass VM, through `migrate-perf`'s procedure
/// (what `bench migrate-perf` runs): the oracle checks each harvest, the
/// reserve included, and the figures count each workload's faults.
#[test]
fn lock_fault_workloads_under_migrate_perf_in_every_design() {
    use shadow_mmu_testkit::fixtures::lock_fault_passes;
    use shadow_mmu_testkit::perf::migrate_perf;
    use shadow_mmu_vmm::HarvestSpec;
    for d in every_design() {
        for (what, lock) in lock_fault_workloads(200_000) {
            let mut vm = lock_fault_passes(d.clone(), lock);
            let (swept, reserve) = if lock.needs_reserve() { (2048, 2048) } else { (4096, 0) };
            assert_eq!((vm.swept_pages(), vm.stored_pages()), (swept, swept + reserve), "{what}");
            let (run, extras) = migrate_perf(vm.as_mut(), 6, &HarvestSpec::default(), |_, _| {})
                .unwrap_or_else(|e| panic!("{} {what}: {e}", describe(&d)));
            let ctx = format!("{} {what}: {:?}", describe(&d), extras.figures);
            assert_eq!(run.lost_pages, 0, "{ctx}");
            let figure = |k: &str| extras.figures.iter().find(|f| f.0 == k).map(|f| f.1).unwrap();
            assert_eq!(figure("fresh_touches") > 0, lock.fresh_per_sec > 0, "{ctx}");
            assert_eq!(figure("split_touches") > 0, lock.split_per_sec > 0, "{ctx}");
            assert_eq!(figure("mmu_notifier_invalidations") > 0, lock.invalidations_per_sec > 0, "{ctx}");
        }
    }
}
