//! Bad input gets a typed error, with a message that says what was wrong,
//! and leaves the VM working.

use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_kvm::usable_or_skip;
use shadow_mmu_kvm::vm::{KvmVm, VmSetup};
use shadow_mmu_kvm::{KvmError, KvmPerfConfig, KvmPerfVm, KvmScriptVm, bitmap_words};
use shadow_mmu_vmm::DirtyLogProtect;

#[test]
fn bad_perf_configs_are_refused_before_touching_kvm() {
    // Checked before /dev/kvm is opened: runs (and must pass) without KVM.
    let ok = KvmPerfConfig::default();
    for (bad, what) in [
        (KvmPerfConfig { vcpus: 0, ..ok.clone() }, "vcpus"),
        (KvmPerfConfig { vcpus: 257, ..ok.clone() }, "vcpus"),
        (KvmPerfConfig { guest_bytes: (16 << 20) + 100, ..ok.clone() }, "multiple of 4 KiB"),
        (KvmPerfConfig { guest_bytes: 0, ..ok.clone() }, "at least one page"),
        (KvmPerfConfig { vcpus: 4, guest_bytes: 3 * PAGE_SIZE, ..ok.clone() }, "at least one page"),
        (KvmPerfConfig { guest_bytes: (2 << 30) + PAGE_SIZE, ..ok.clone() }, "at most"),
        (KvmPerfConfig { write_pct: 101, ..ok.clone() }, "write_pct"),
    ] {
        match KvmPerfVm::new(&bad) {
            Err(KvmError::BadConfig(msg)) => assert!(msg.contains(what), "{msg:?} should mention {what:?}"),
            other => panic!("{bad:?}: expected BadConfig, got {other:?}"),
        }
    }
    for (control_bytes, test_bytes) in
        [(0, PAGE_SIZE), (PAGE_SIZE, 0), (PAGE_SIZE, PAGE_SIZE + 1), (PAGE_SIZE, (2 << 30) + PAGE_SIZE)]
    {
        let r = KvmVm::new(VmSetup {
            control_bytes,
            test_bytes,
            protect: DirtyLogProtect::Auto,
            populate: false,
            dirty_ring_bytes: None,
        });
        assert!(matches!(r, Err(KvmError::BadConfig(_))), "{control_bytes} {test_bytes}: {r:?}");
    }
}

#[test]
fn wrong_bitmap_sizes_are_typed_errors_and_the_vm_keeps_working() {
    if !usable_or_skip() {
        return;
    }
    let pages = 1000; // not a multiple of 64: 16 words, the last one partial
    let mut vm = KvmScriptVm::new(pages * PAGE_SIZE, DirtyLogProtect::Auto).expect("KVM VM");
    vm.enable_dirty_logging().expect("logging");
    vm.run_writes(&[(0, 1), (999 * PAGE_SIZE, 2)]).expect("writes");
    for len in [0, 15, 17, 64] {
        let mut bitmap = vec![0u64; len];
        match vm.get_dirty_log(&mut bitmap) {
            Err(e @ KvmError::BadBitmapSize { pages: 1000, expected: 16, got }) => {
                assert_eq!(got, len);
                let msg = e.to_string();
                assert!(
                    msg.contains("16") && msg.contains("1000") && msg.contains(&len.to_string()),
                    "{msg}"
                );
            }
            other => panic!("{len} words: expected BadBitmapSize, got {other:?}"),
        }
    }
    // Nothing was harvested by the refused calls.
    let mut bitmap = vec![0u64; bitmap_words(pages)];
    assert_eq!(vm.get_dirty_log(&mut bitmap).expect("harvest"), 2);
    assert_eq!((bitmap[0], bitmap[15]), (1, 1 << (999 - 960)));
}

#[test]
fn clear_dirty_log_misuse_is_refused() {
    if !usable_or_skip() {
        return;
    }
    // Without manual protect.
    let mut auto = KvmScriptVm::new(1 << 20, DirtyLogProtect::Auto).expect("KVM VM");
    auto.enable_dirty_logging().expect("logging");
    assert!(matches!(auto.clear_dirty_log(0, &[0; 4]), Err(KvmError::ManualProtectNotEnabled)));
    let perf =
        KvmPerfVm::new(&KvmPerfConfig { guest_bytes: 1 << 20, ..KvmPerfConfig::default() }).expect("perf VM");
    assert!(matches!(perf.clear_dirty_log(0, &[0; 4]), Err(KvmError::ManualProtectNotEnabled)));

    if !shadow_mmu_kvm::probed().has_manual_protect() {
        println!("skipped: KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2");
        return;
    }
    let mut vm = KvmScriptVm::new(1 << 20, DirtyLogProtect::Manual).expect("KVM VM"); // 256 pages, 4 words
    let e = vm.clear_dirty_log(0, &[0; 4]).expect_err("logging is off");
    assert!(matches!(e, KvmError::NotLogging), "{e}");
    vm.enable_dirty_logging().expect("logging");
    vm.run_writes(&[(0, 1), (70 * PAGE_SIZE, 1)]).expect("writes");
    for (first, words) in [(1, 1), (256, 1), (300, 1)] {
        let e = vm.clear_dirty_log(first, &vec![u64::MAX; words]).expect_err("bad first page");
        assert!(matches!(e, KvmError::BadConfig(_)), "{first}: {e}");
    }
    for (first, words) in [(0, 0), (0, 5), (192, 2)] {
        let e = vm.clear_dirty_log(first, &vec![u64::MAX; words]).expect_err("bad length");
        assert!(matches!(e, KvmError::BadBitmapSize { .. }), "{first}+{words}: {e}");
    }
    let perf = KvmPerfVm::new(&KvmPerfConfig {
        guest_bytes: 1 << 20,
        protect: DirtyLogProtect::Manual,
        ..Default::default()
    })
    .expect("perf VM");
    assert!(matches!(
        perf.clear_dirty_log(0, &[0; 5]),
        Err(KvmError::BadBitmapSize { expected: 4, got: 5, .. })
    ));
    // The refusals changed nothing: both pages are still in the log, and a
    // good clear of the second word clears page 70 only.
    let mut bitmap = [0u64; 4];
    assert_eq!(vm.get_dirty_log(&mut bitmap).expect("harvest"), 2);
    vm.clear_dirty_log(64, &[u64::MAX]).expect("clear");
    assert_eq!(vm.get_dirty_log(&mut bitmap).expect("harvest"), 1);
    assert_eq!(bitmap, [1, 0, 0, 0]);
}

#[test]
fn harvest_before_logging_and_other_misuse() {
    if !usable_or_skip() {
        return;
    }
    let mut bitmap = [0u64; 4];
    let vm = KvmScriptVm::new(1 << 20, DirtyLogProtect::Auto).expect("KVM VM");
    assert!(matches!(vm.get_dirty_log(&mut bitmap), Err(KvmError::NotLogging)));
    // No dirty ring enabled on this VM: KVM_RESET_DIRTY_RINGS is EINVAL.
    match vm.reset_dirty_rings() {
        Err(KvmError::Ioctl { op: "KVM_RESET_DIRTY_RINGS", source }) => {
            assert_eq!(source.raw_os_error(), Some(libc::EINVAL), "{source}")
        }
        other => panic!("expected EINVAL, got {other:?}"),
    }

    let perf = KvmPerfVm::new(&KvmPerfConfig { vcpus: 2, guest_bytes: 1 << 20, ..Default::default() })
        .expect("perf VM");
    assert!(matches!(perf.wait_passes(&[0]), Err(KvmError::BadConfig(_))));
    perf.release(1);
    assert!(perf.wait_passes(&[0, 0]).is_ok());
}
