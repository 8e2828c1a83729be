//! Every rule is load-bearing: each `break-rules` switch must make a test
//! fail, and the same test passes with the switch off (the other tests).
//! Run with `--features break-rules`.
#![cfg(feature = "break-rules")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shadow_mmu_core::breakage::Breakage;
use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_engine::workload::{AccessPattern, WorkloadSpec};
use shadow_mmu_engine::{MmuDesign, VmConfig};
use shadow_mmu_testkit::fixtures::*;
use shadow_mmu_testkit::harness::{self, RunConfig};

/// An oracle run small and hot enough that vCPUs keep translations in their
/// TLBs across harvests.
fn hot_run(design: &VmConfig, breakage: Breakage) -> harness::RunReport {
    let cfg = RunConfig {
        vcpus: 2,
        guest_bytes: 8 << 20,
        duration: Duration::from_secs(60),
        max_collections: Some(200),
        interval: Duration::from_millis(1),
        warmup: Duration::from_millis(20),
        workload: WorkloadSpec {
            pattern: AccessPattern::Hot { hot_pages_pct: 10, hot_access_pct: 90 },
            ..WorkloadSpec::default()
        },
        breakage,
        ..RunConfig::for_design(design)
    };
    harness::run(&cfg, |_, _| {}).unwrap()
}

fn assert_oracle_catches(breakage: Breakage, designs: impl Fn(&VmConfig) -> bool) {
    for design in every_design().into_iter().filter(|d| designs(d)) {
        let r = hot_run(&design, breakage);
        assert!(r.lost_pages > 0, "{}: {breakage:?} went unnoticed: {r:?}", describe(&design));
        let first = &r.lost[0];
        assert!(first.to_string().contains(&format!("gfn {:#x}", first.gfn)), "the report names the gfn");
    }
}

/// The stale-TLB test catches `breakage` in every design (what went
/// unnoticed otherwise: `what`), and so does the oracle.
fn assert_stale_tlb_and_oracle_catch(breakage: Breakage, what: &str) {
    for base in every_design() {
        let (violations, _) = stale_tlb_violations(VmConfig { breakage, ..base.clone() }, 300);
        assert!(violations > 0, "{}: {what} went unnoticed", describe(&base));
    }
    assert_oracle_catches(breakage, |_| true);
}

#[test]
fn skipping_the_get_dirty_log_flush_is_caught() {
    let b = Breakage { skip_get_dirty_log_flush: true, ..Breakage::default() };
    for base in every_design() {
        let (violations, _) = stale_tlb_violations(VmConfig { breakage: b, ..base.clone() }, 300);
        assert!(violations > 0, "{}: stale TLB entries went unnoticed", describe(&base));
    }
    // With PML, GET first kicks every vCPU to drain its log, which flushes
    // TLBs too: an entry goes stale only for a page first written between
    // that kick and the re-arm, and the hot oracle run's later stores to
    // the same page hide it. The stale-TLB test above catches it.
    assert_oracle_catches(b, |d| !d.pml);
}

#[test]
fn skipping_write_protection_is_caught() {
    let b = Breakage { skip_write_protect: true, ..Breakage::default() };
    assert_stale_tlb_and_oracle_catch(b, "unprotected pages");
}

#[test]
fn with_no_switch_on_the_same_runs_pass() {
    for design in every_design() {
        let r = hot_run(&design, Breakage::default());
        assert!(r.ok(), "{}: {r:?}", describe(&design));
    }
    for base in every_design() {
        assert_eq!(stale_tlb_violations(base.clone(), 300).0, 0, "{}", describe(&base));
    }
}

/// Patch 04 in a running VM. The race window (between a lockless write
/// protection and its TLB flush) is a few microseconds, so this is a
/// probabilistic demonstration, not a CI test: it runs rounds until a store
/// slips past write tracking, for up to two minutes. The deterministic catch
/// of this switch is the loom model `loom_skipping_the_patch_04_rule_is_caught`.
/// `cargo test --release --features break-rules --test breakage -- --ignored`
#[test]
#[ignore = "probabilistic, up to 2 minutes: run with --ignored"]
fn skipping_the_patch_04_rule_lets_stores_slip_past_write_tracking() {
    let b = Breakage { skip_patch04_flush_rule: true, ..Breakage::default() };
    let cfg = VmConfig { mmu: MmuDesign::Lockless, breakage: b, ..VmConfig::default() };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut rounds = 0;
    while std::time::Instant::now() < deadline {
        let (violations, n) = tracking_violations(cfg.clone(), 500);
        rounds += n;
        if violations > 0 {
            return;
        }
    }
    panic!("no store slipped past write tracking in {rounds} rounds");
}

#[test]
fn fast_fixing_large_sptes_is_caught() {
    let b = Breakage { fast_fix_large_sptes: true, ..Breakage::default() };
    let cfg = RunConfig {
        mmu: MmuDesign::Lockless,
        vcpus: 2,
        guest_bytes: 16 << 20,
        duration: Duration::from_secs(60),
        max_collections: Some(50),
        interval: Duration::from_millis(2),
        warmup: Duration::from_millis(100),
        breakage: b,
        ..RunConfig::default()
    };
    let r = harness::run(&cfg, |_, _| {}).unwrap();
    assert!(r.lost_pages > 0, "large sptes fixed by the fast path went unnoticed: {r:?}");
    // Off, the same run passes.
    let r = harness::run(&RunConfig { breakage: Breakage::default(), ..cfg }, |_, _| {}).unwrap();
    assert!(r.ok(), "{r:?}");
}

/// The audit's typed error names the page the dirty logging invariant fails
/// for: a harvest that skips write protection leaves the page writable with
/// its bit taken.
#[test]
fn the_audit_names_the_page_a_skipped_write_protection_leaves_writable() {
    use shadow_mmu_engine::{AuditError, AuditOptions, GuestOp, MemFlags};
    let b = Breakage { skip_write_protect: true, ..Breakage::default() };
    for base in every_design() {
        let (vm, _mem) =
            vm_with_slot(VmConfig { breakage: b, ..base.clone() }, 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, [GuestOp::Write(page(7), 1)]);
        assert!(vm.audit(AuditOptions { dirty_log: true }).is_ok(), "{}: marked, so fine", describe(&base));
        let mut bm = vec![0u64; 8];
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 1);
        assert_eq!(
            vm.audit(AuditOptions { dirty_log: true }).unwrap_err(),
            AuditError::DirtyLog { gfn: 7 },
            "{}",
            describe(&base)
        );
    }
}

#[test]
fn clearing_whole_words_is_caught() {
    use shadow_mmu_engine::{GuestOp, MemFlags};
    use shadow_mmu_vmm::DirtyLogProtect;
    let breakage = Breakage { clear_whole_word: true, ..Breakage::default() };
    for base in every_design() {
        for broken in [false, true] {
            let config = VmConfig {
                dirty_log_protect: DirtyLogProtect::Manual,
                breakage: if broken { breakage } else { Breakage::default() },
                ..base.clone()
            };
            let (vm, _mem) = vm_with_slot(config, 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
            let mut vcpu = vm.create_vcpu(0).unwrap();
            run_ops(&mut vcpu, [GuestOp::Write(page(1), 1)]);
            let mut got = vec![0u64; 8];
            vm.get_dirty_log(0, &mut got).unwrap();
            // Page 2 is dirtied after the GET, in the same word as page 1.
            run_ops(&mut vcpu, [GuestOp::Write(page(2), 2)]);
            vm.clear_dirty_log(0, 0, 512, &got).unwrap();
            let mut next = vec![0u64; 8];
            vm.get_dirty_log(0, &mut next).unwrap();
            let audit = vm.audit(shadow_mmu_engine::AuditOptions { dirty_log: true });
            if broken {
                assert_eq!(set_pages(&next), Vec::<u64>::new(), "{}: page 2's bit went", describe(&base));
                assert_eq!(
                    audit.unwrap_err(),
                    shadow_mmu_engine::AuditError::DirtyLog { gfn: 2 },
                    "{}: the audit names the page left writable and unmarked",
                    describe(&base)
                );
            } else {
                assert_eq!(set_pages(&next), [2], "{}", describe(&base));
                audit.unwrap();
            }
        }
    }
}

#[test]
fn pushing_to_the_ring_before_the_rmap_is_caught() {
    use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec};
    let breakage = Breakage { ring_push_before_rmap: true, ..Breakage::default() };
    // Only the lockless design can show it: the locked reset takes mmu_lock,
    // which the fault holds from the push to the rmap add.
    for design in designs_of(MmuDesign::Lockless) {
        let mut caught = false;
        for attempt in 0..5 {
            let cfg = RunConfig {
                mmu: design.mmu,
                fast_page_fault: design.fast_page_fault,
                vcpus: 2,
                guest_bytes: 8 << 20,
                duration: Duration::from_secs(20),
                max_collections: Some(400),
                interval: Duration::from_micros(200),
                warmup: Duration::from_millis(5),
                workload: WorkloadSpec {
                    pattern: AccessPattern::Random,
                    seed: attempt,
                    ..WorkloadSpec::default()
                },
                invalidate_every: Some(Duration::from_micros(100)),
                harvest: HarvestSpec {
                    interface: DirtyLogInterface::Ring,
                    ring_entries: 512,
                    ..HarvestSpec::default()
                },
                breakage,
                ..RunConfig::default()
            };
            let r = harness::run(&cfg, |_, _| {}).unwrap();
            if r.lost_pages > 0 || r.errors.iter().any(|e| matches!(e, harness::RunError::Audit(_))) {
                caught = true;
                break;
            }
        }
        assert!(caught, "{}: pushing before the rmap went unnoticed", describe(&design));
    }
}

#[test]
fn resetting_the_ring_before_the_harvest_is_caught() {
    use shadow_mmu_engine::{GuestOp, MemFlags, Vm};
    for base in every_design() {
        for broken in [false, true] {
            let breakage = Breakage { ring_reset_before_harvest: broken, ..Breakage::default() };
            let vm = Vm::new(VmConfig { breakage, ..base.clone() }).unwrap();
            // Four pages: room for PML's reserve (a whole log's drain).
            vm.enable_dirty_ring(4 * PAGE_SIZE as u32).unwrap();
            let mem = shadow_mmu_engine::HostMemory::anonymous(2 * MIB).unwrap();
            vm.set_user_memory_region(region(0, 0, 2 * MIB, &mem, MemFlags::LOG_DIRTY_PAGES)).unwrap();
            let mut vcpu = vm.create_vcpu(0).unwrap();
            run_ops(&mut vcpu, [GuestOp::Write(page(4), 4)]);
            // A reset that comes before the harvest gives back nothing...
            let reset = vm.reset_dirty_rings().unwrap();
            let mut got = Vec::new();
            vm.harvest_dirty_ring(0, |s, o| got.push((s, o))).unwrap();
            if broken {
                // ... unless it takes pushed entries for harvested ones: the
                // page is re-protected and never reported.
                assert_eq!((reset, got), (1, vec![]), "{}", describe(&base));
            } else {
                assert_eq!((reset, got), (0, vec![(0, 4)]), "{}", describe(&base));
            }
        }
    }
}

#[test]
fn a_harvest_thread_that_flushes_early_is_caught() {
    // Only the lockless design flushes after the join; the locked one
    // flushes inside each chunk's lock hold. With manual protect the GET
    // only copies the log (no protection, no flush), so it can look for an
    // unlogged store without healing it: after each CLEAR (on 4 threads,
    // the hammered page in the last thread's chunk) a store to a page whose
    // bit the CLEAR took must fault and mark it again.
    use shadow_mmu_engine::MemFlags;
    use shadow_mmu_vmm::DirtyLogProtect;
    use std::sync::atomic::{AtomicBool, Ordering};
    const PAGE: u64 = 500;
    for base in designs_of(MmuDesign::Lockless) {
        for broken in [false, true] {
            let breakage = Breakage { harvest_thread_flushes_early: broken, ..Breakage::default() };
            let config = VmConfig {
                harvest_threads: 4,
                dirty_log_protect: DirtyLogProtect::Manual,
                breakage,
                ..base.clone()
            };
            let (vm, mem) = vm_with_slot(config, 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
            let stop = std::sync::Arc::new(AtomicBool::new(false));
            let mut vcpu = vm.create_vcpu(0).unwrap();
            let mut guest = Hammer { gpa: page(PAGE), n: 0, stop: stop.clone() };
            let t = std::thread::spawn(move || vcpu.run(&mut guest).unwrap());
            let word = &mem.page(PAGE)[0];
            while word.load(Ordering::Relaxed) == 0 {
                std::hint::spin_loop();
            }
            let (mut violations, mut changed) = (0, 0);
            let mut bm = vec![0u64; 8];
            for _ in 0..100 {
                vm.get_dirty_log(0, &mut bm).unwrap();
                vm.clear_dirty_log(0, 0, 512, &bm).unwrap();
                let after_clear = word.load(Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
                let later = word.load(Ordering::Relaxed);
                vm.get_dirty_log(0, &mut bm).unwrap();
                if later != after_clear {
                    changed += 1;
                    violations += u32::from(bm[(PAGE / 64) as usize] & (1 << (PAGE % 64)) == 0);
                }
            }
            stop.store(true, Ordering::Relaxed);
            t.join().unwrap();
            assert!(changed > 10, "{}: the page should keep changing", describe(&base));
            if broken {
                assert!(violations > 0, "{}: an early flush went unnoticed", describe(&base));
            } else {
                assert_eq!(violations, 0, "{}", describe(&base));
            }
        }
    }
}

/// KVM's dirty_log_test check has teeth: with the write protection of the
/// harvest skipped, it (or the oracle under it) fails, in every design and
/// with every bitmap interface.
#[test]
fn the_dirty_log_test_catches_a_harvest_that_does_not_protect() {
    use shadow_mmu_engine::EngineBackend;
    use shadow_mmu_testkit::dirty_log_test::dirty_log_test;
    use shadow_mmu_vmm::{Backend, PassSpec};
    use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec};
    for base in every_design() {
        for interface in [DirtyLogInterface::Get, DirtyLogInterface::Clear] {
            let spec = HarvestSpec { interface, clear_chunk_pages: 1 << 12, ..HarvestSpec::default() };
            let config = VmConfig {
                dirty_log_protect: spec.protect(),
                breakage: Breakage { skip_write_protect: true, ..Breakage::default() },
                ..base.clone()
            };
            let backend = EngineBackend { config, dirty_ring: None };
            let pass = PassSpec { random: true, ..PassSpec::sweep(1, 4099 * PAGE_SIZE, 3) };
            let mut vm = backend.start_passes(&pass).unwrap();
            let r = dirty_log_test(vm.as_mut(), &spec, 6, Duration::from_millis(2), 3, |_, _| {});
            assert!(
                r.is_err(),
                "{} {interface}: a harvest that protects nothing went unnoticed",
                describe(&base)
            );
        }
    }
}

/// A guest that stores to one page, then loads from it until told to stop:
/// it stays in guest mode with the store's PML entry in its log.
struct StoreThenSpin {
    gpa: u64,
    stored: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    ops: u64,
}

impl shadow_mmu_engine::GuestCode for StoreThenSpin {
    fn next_op(&mut self, _: u64) -> shadow_mmu_engine::GuestOp {
        use shadow_mmu_engine::GuestOp;
        self.ops += 1;
        if self.ops == 1 {
            return GuestOp::Write(self.gpa, 7);
        }
        // The store is complete (its D bit set, its entry logged).
        self.stored.store(true, Ordering::SeqCst);
        if self.stop.load(Ordering::SeqCst) { GuestOp::Hypercall(0) } else { GuestOp::Read(self.gpa) }
    }
}

/// With PML, GET finds a page whose entry is still in a running vCPU's log
/// only if it has the vCPUs drain first: the page a guest stored to, then
/// kept running, is in the bitmap, and with `pml_skip_sync` it is not.
/// (Deterministic: the vCPU stays in guest mode, loads hitting its TLB, so
/// nothing but the harvest's kick drains its log.)
fn pml_get_reports_a_logged_page(breakage: Breakage) -> bool {
    use shadow_mmu_engine::{GuestOp, HostMemory, MemFlags, Script, UserMemoryRegion, Vm};
    let config = VmConfig { mmu: MmuDesign::Tdp, pml: true, breakage, ..VmConfig::default() };
    let vm = Vm::new(config).unwrap();
    let mem = HostMemory::anonymous(2 << 20).unwrap();
    vm.set_user_memory_region(UserMemoryRegion {
        slot: 0,
        flags: MemFlags::LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: 2 << 20,
        memory: Some(mem.clone()),
        memory_offset: 0,
    })
    .unwrap();
    let gpa = 0x5000;
    let mut vcpu = vm.create_vcpu(0).unwrap();
    // The first store faults (and the fault marks the page); the GET re-arms
    // it by clearing D, so the next store is logged by the page walk.
    vcpu.run(&mut Script::new([GuestOp::Write(gpa, 1)])).unwrap();
    let mut bitmap = vec![0u64; 8];
    vm.get_dirty_log(0, &mut bitmap).unwrap();
    assert_eq!(bitmap[0], 1 << 5, "the fault marked the page");
    let (stored, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let mut guest = StoreThenSpin { gpa, stored: stored.clone(), stop: stop.clone(), ops: 0 };
    let t = std::thread::spawn(move || vcpu.run(&mut guest).unwrap());
    while !stored.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    vm.get_dirty_log(0, &mut bitmap).unwrap();
    stop.store(true, Ordering::SeqCst);
    t.join().unwrap();
    bitmap[0] == 1 << 5
}

#[test]
fn a_pml_harvest_that_does_not_drain_the_logs_is_caught() {
    assert!(pml_get_reports_a_logged_page(Breakage::default()), "GET drains the running vCPU's log");
    assert!(
        !pml_get_reports_a_logged_page(Breakage { pml_skip_sync: true, ..Breakage::default() }),
        "a page still in a running vCPU's PML log went unreported, unnoticed"
    );
}

/// The fresh-memory workload, run as `bench migrate-perf` runs it, catches
/// a slow fault that forgets to mark its page dirty, in every design: its
/// first stores to never-mapped reserve pages are what the oracle finds
/// lost (with `fast_page_fault` on, the swept pages fault on the fast path).
#[test]
fn the_fresh_memory_workload_catches_a_slow_fault_that_does_not_mark_dirty() {
    use shadow_mmu_testkit::perf::migrate_perf;
    use shadow_mmu_vmm::{HarvestSpec, LockFaults};
    let b = Breakage { slow_fault_skips_mark_dirty: true, ..Breakage::default() };
    let fresh = LockFaults { fresh_per_sec: 200_000, ..LockFaults::default() };
    for base in every_design().into_iter().filter(|d| d.fast_page_fault) {
        let mut vm = lock_fault_passes(VmConfig { breakage: b, ..base.clone() }, fresh);
        let (run, _) = migrate_perf(vm.as_mut(), 6, &HarvestSpec::default(), |_, _| {}).unwrap();
        assert!(run.lost_pages > 0, "{}: a fresh page's lost first store went unnoticed", describe(&base));
    }
}
