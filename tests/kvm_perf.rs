//! `migrate-perf` on KVM, small: the passes dirty exactly what the guest
//! program says (all pages, none, the model's subset), memory holds the pass
//! numbers, manual protect's get/clear split behaves as KVM documents, and
//! `migrate_perf` reports every figure.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_kvm::guest::model_pass;
use shadow_mmu_kvm::perf::slice;
use shadow_mmu_kvm::usable_or_skip;
use shadow_mmu_kvm::{KvmBackend, KvmPerfConfig, KvmPerfVm, bitmap_words};
use shadow_mmu_testkit::fixtures::set_pages;
use shadow_mmu_testkit::perf::migrate_perf;
use shadow_mmu_vmm::{Backend, DirtyLogProtect, HarvestSpec, PassSpec};

const MIB16: u64 = 16 << 20;

fn start(cfg: &KvmPerfConfig) -> KvmPerfVm {
    KvmPerfVm::new(cfg).expect("perf VM")
}

/// Releases pass `pass` and waits for it; returns its slowest vCPU's time.
fn pass(vm: &KvmPerfVm, pass: u64) -> u64 {
    vm.release(pass);
    vm.wait_passes(&vec![pass - 1; vm.config().vcpus as usize]).expect("pass")
}

/// Word 0 of every page holds `want`.
fn assert_pages_hold(vm: &KvmPerfVm, want: u64) {
    let bad = (0..vm.test_pages())
        .filter(|p| vm.memory().test.words()[(p * 512) as usize].load(Ordering::Relaxed) != want)
        .count();
    assert_eq!(bad, 0, "{bad} pages do not hold {want}");
}

#[test]
fn sequential_stores_dirty_every_page_and_store_the_pass_number() {
    if !usable_or_skip() {
        return;
    }
    for vcpus in [1, 3] {
        let mut vm = start(&KvmPerfConfig { vcpus, guest_bytes: MIB16, ..KvmPerfConfig::default() });
        let pages = vm.test_pages();
        let t = Instant::now();
        pass(&vm, 1);
        let populate = t.elapsed();
        assert_pages_hold(&vm, 1);
        let enable_ns = vm.enable_dirty_logging().expect("enable");
        let mut bitmap = vec![0u64; bitmap_words(pages)];
        assert_eq!(vm.get_dirty_log(&mut bitmap).expect("harvest"), 0, "the log starts clear");
        for p in 2..=4 {
            let dirty_ns = pass(&vm, p);
            let t = Instant::now();
            let dirty = vm.get_dirty_log(&mut bitmap).expect("harvest");
            let get_ns = t.elapsed().as_nanos();
            assert_eq!(dirty, pages, "pass {p}");
            assert!(bitmap.iter().all(|&w| w == u64::MAX), "pass {p}: every page");
            assert_pages_hold(&vm, p);
            println!(
                "{vcpus} vCPU(s), 16 MiB: populate {populate:?}, enable {enable_ns} ns, pass {p}: \
                 dirty memory {dirty_ns} ns ({} ns/page), get_dirty_log {get_ns} ns",
                dirty_ns * u64::from(vcpus) / pages
            );
        }
        vm.stop().expect("stop");
    }
}

#[test]
fn loads_dirty_nothing() {
    if !usable_or_skip() {
        return;
    }
    let mut vm = start(&KvmPerfConfig { write_pct: 0, guest_bytes: 4 << 20, ..KvmPerfConfig::default() });
    pass(&vm, 1);
    vm.enable_dirty_logging().expect("enable");
    let mut bitmap = vec![0u64; bitmap_words(vm.test_pages())];
    for p in 2..=3 {
        pass(&vm, p);
        assert_eq!(vm.get_dirty_log(&mut bitmap).expect("harvest"), 0);
    }
    assert_pages_hold(&vm, 0);
    assert_eq!(vm.passes(), [3]);
}

#[test]
fn manual_protect_get_copies_and_clear_reprotects() {
    if !usable_or_skip() {
        return;
    }
    if !shadow_mmu_kvm::probed().has_manual_protect() {
        println!("skipped: KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2");
        return;
    }
    let cfg =
        KvmPerfConfig { guest_bytes: 4 << 20, protect: DirtyLogProtect::Manual, ..KvmPerfConfig::default() };
    let mut vm = start(&cfg);
    let pages = vm.test_pages();
    pass(&vm, 1);
    vm.enable_dirty_logging().expect("enable");
    let mut bitmap = vec![0u64; bitmap_words(pages)];
    assert_eq!(vm.get_dirty_log(&mut bitmap).expect("harvest"), 0, "no INITIALLY_SET: starts clear");
    pass(&vm, 2);
    assert_eq!(vm.get_dirty_log(&mut bitmap).expect("harvest"), pages);
    // KVM_GET_DIRTY_LOG only copied the log: the same again.
    let mut again = vec![0u64; bitmap.len()];
    assert_eq!(vm.get_dirty_log(&mut again).expect("harvest"), pages);
    assert_eq!(again, bitmap);
    let t = Instant::now();
    vm.clear_dirty_log(0, &bitmap).expect("clear");
    println!("KVM_CLEAR_DIRTY_LOG of {pages} pages: {:?}", t.elapsed());
    assert_eq!(vm.get_dirty_log(&mut bitmap).expect("harvest"), 0, "cleared, no writes since");
    // Cleared pages are write-protected again: the next pass logs them all.
    pass(&vm, 3);
    assert_eq!(vm.get_dirty_log(&mut bitmap).expect("harvest"), pages);
    // A partial clear: pages 64..128 only (first_page 64, one word).
    vm.clear_dirty_log(64, &[u64::MAX]).expect("partial clear");
    assert_eq!(vm.get_dirty_log(&mut bitmap).expect("harvest"), pages - 64);
    assert_eq!(bitmap[1], 0);
    assert!(bitmap.iter().enumerate().all(|(i, &w)| i == 1 || w == u64::MAX));
}

#[test]
fn random_and_mixed_passes_dirty_exactly_the_modelled_pages() {
    if !usable_or_skip() {
        return;
    }
    for (random, write_pct, vcpus) in [(true, 100, 2), (false, 40, 1), (true, 60, 3)] {
        let cfg =
            KvmPerfConfig { vcpus, guest_bytes: 4 << 20, write_pct, random, seed: 42, ..Default::default() };
        let mut vm = start(&cfg);
        let pages = vm.test_pages();
        // The model of every vCPU's first two passes.
        let mut lcg: Vec<u32> = (0..vcpus).map(|id| cfg.initial_lcg(id)).collect();
        let mut model = |pass_no: u64, stored: &mut BTreeSet<u64>, last: &mut Vec<u64>| {
            for id in 0..vcpus {
                let (first, _) = slice(pages, id, vcpus);
                model_pass(&cfg.pass_program(id), &mut lcg[id as usize], |page, store| {
                    if store {
                        stored.insert(first + page);
                        last[(first + page) as usize] = pass_no;
                    }
                });
            }
        };
        let mut last = vec![0u64; pages as usize];
        model(1, &mut BTreeSet::new(), &mut last);
        pass(&vm, 1);
        vm.enable_dirty_logging().expect("enable");
        let mut want = BTreeSet::new();
        model(2, &mut want, &mut last);
        pass(&vm, 2);
        let mut bitmap = vec![0u64; bitmap_words(pages)];
        let dirty = vm.get_dirty_log(&mut bitmap).expect("harvest");
        let what = format!("random {random}, {write_pct}% stores, {vcpus} vCPUs");
        assert_eq!(set_pages(&bitmap), want.iter().copied().collect::<Vec<_>>(), "{what}");
        assert!(dirty > 0 && dirty < pages, "{what}: a proper subset, got {dirty} of {pages}");
        let words: Vec<u64> = (0..pages)
            .map(|p| vm.memory().test.words()[(p * 512) as usize].load(Ordering::Relaxed))
            .collect();
        assert_eq!(words, last, "{what}: each page holds the last pass that stored to it");
        println!("{what}: {dirty} of {pages} pages dirty, as modelled");
    }
}

#[test]
fn migrate_perf_reports_every_figure() {
    if !usable_or_skip() {
        return;
    }
    let manual = shadow_mmu_kvm::probed().has_manual_protect();
    // Through the testkit's Backend trait and its one migrate-perf
    // procedure, as `bench migrate-perf` runs it.
    let spec = PassSpec::sweep(2, MIB16, 1);
    let mut vm = KvmBackend {
        protect: if manual { DirtyLogProtect::Manual } else { DirtyLogProtect::Auto },
        dirty_ring: None,
    }
    .start_passes(&spec)
    .expect("perf VM");
    let mut seen = 0;
    let (run, _) = migrate_perf(vm.as_mut(), 3, &HarvestSpec::default(), |i, _| {
        seen += 1;
        assert_eq!(i, seen);
    })
    .expect("migrate-perf");
    assert_eq!(run.iterations.len(), 3);
    assert!(run.populate_ns > 0 && run.enable_dirty_logging_ns > 0);
    // The first harvest comes after pass 2 wrote every page; later ones race
    // with the running vCPUs, so see any share of memory.
    assert_eq!(run.iterations[0].dirty_pages, MIB16 / PAGE_SIZE);
    for it in &run.iterations {
        assert!(it.dirty_pages <= MIB16 / PAGE_SIZE, "{it:?}");
        assert!(it.dirty_memory_ns > 0 && it.get_dirty_log_ns > 0, "{it:?}");
        assert_eq!(it.clear_dirty_log_ns.is_some_and(|ns| ns > 0), manual, "{it:?}");
    }
    // One full pass, then a harvest with every vCPU parked: exactly all pages.
    assert_eq!(run.quiet.dirty_pages, MIB16 / PAGE_SIZE, "{:?}", run.quiet);
    assert_eq!(run.quiet.clear_dirty_log_ns.is_some_and(|ns| ns > 0), manual);
    assert_eq!(run.lost_pages, 0);
    println!(
        "migrate-perf on KVM, 2 vCPUs, 16 MiB, manual protect {manual}: populate {} ns, enable {} ns, \
         dirty memory {} ns, get_dirty_log {} ns, clear_dirty_log {:?} ns, {} dirty pages (averages); quiet: {:?}",
        run.populate_ns,
        run.enable_dirty_logging_ns,
        run.dirty_memory_avg_ns(),
        run.get_dirty_log_avg_ns(),
        run.clear_dirty_log_avg_ns(),
        run.dirty_pages_avg(),
        run.quiet
    );
}
