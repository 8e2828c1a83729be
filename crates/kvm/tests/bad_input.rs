//! Bad input gets a typed error, with a message that says what was wrong,
//! and leaves the VM working.

use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_kvm::usable_or_skip;
use shadow_mmu_kvm::vm::{KvmVm, VmSetup};
use shadow_mmu_kvm::{BadConfig, KvmError, KvmPerfConfig, KvmPerfVm, KvmScriptVm, bitmap_words};
use shadow_mmu_vmm::{DirtyLogProtect, error_chain};

/// `r` is `BadConfig` `want`, and prints it once: `bad configuration: ...`.
#[track_caller]
fn assert_bad_config<T: std::fmt::Debug>(r: Result<T, KvmError>, want: BadConfig) {
    match r {
        Err(e @ KvmError::BadConfig(_)) => {
            assert!(matches!(&e, KvmError::BadConfig(got) if *got == want), "{e:?}, not {want:?}");
            assert_eq!(error_chain(&e), format!("bad configuration: {want}"));
        }
        other => panic!("expected BadConfig {want:?}, got {other:?}"),
    }
}

#[test]
fn bad_perf_configs_are_refused_before_touching_kvm() {
    // Checked before /dev/kvm is opened: runs (and must pass) without KVM.
    let ok = KvmPerfConfig::default();
    let too_large = (2 << 30) + PAGE_SIZE;
    for (bad, want) in [
        (KvmPerfConfig { vcpus: 0, ..ok.clone() }, BadConfig::PerfVcpus { vcpus: 0 }),
        (KvmPerfConfig { vcpus: 257, ..ok.clone() }, BadConfig::PerfVcpus { vcpus: 257 }),
        (
            KvmPerfConfig { guest_bytes: (16 << 20) + 100, ..ok.clone() },
            BadConfig::GuestBytesNotPages { bytes: (16 << 20) + 100 },
        ),
        (KvmPerfConfig { guest_bytes: 0, ..ok.clone() }, BadConfig::GuestBytesPerVcpu { bytes: 0, vcpus: 1 }),
        (
            KvmPerfConfig { vcpus: 4, guest_bytes: 3 * PAGE_SIZE, ..ok.clone() },
            BadConfig::GuestBytesPerVcpu { bytes: 3 * PAGE_SIZE, vcpus: 4 },
        ),
        (
            KvmPerfConfig { guest_bytes: too_large, ..ok.clone() },
            BadConfig::GuestBytesTooLarge { bytes: too_large },
        ),
        (KvmPerfConfig { write_pct: 101, ..ok.clone() }, BadConfig::WritePct { pct: 101 }),
    ] {
        assert_bad_config(KvmPerfVm::new(&bad), want);
    }
    for (control_bytes, test_bytes, want) in [
        (0, PAGE_SIZE, BadConfig::ControlSlot { bytes: 0 }),
        (PAGE_SIZE, 0, BadConfig::TestSlot { bytes: 0 }),
        (PAGE_SIZE, PAGE_SIZE + 1, BadConfig::TestSlot { bytes: PAGE_SIZE + 1 }),
        (PAGE_SIZE, too_large, BadConfig::TestSlot { bytes: too_large }),
    ] {
        let r = KvmVm::new(VmSetup {
            control_bytes,
            test_bytes,
            protect: DirtyLogProtect::Auto,
            populate: false,
            dirty_ring_bytes: None,
        });
        assert_bad_config(r, want);
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
    for first_page in [1, 256, 300] {
        let r = vm.clear_dirty_log(first_page, &[u64::MAX]);
        assert_bad_config(r, BadConfig::ClearFirstPage { first_page, pages: 256 });
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
        Err(e @ KvmError::Ioctl { op: "KVM_RESET_DIRTY_RINGS", .. }) => {
            let errno = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .and_then(std::io::Error::raw_os_error);
            assert_eq!(errno, Some(libc::EINVAL), "{e:?}");
            // The errno is the cause, printed once, after the operation.
            let einval = std::io::Error::from_raw_os_error(libc::EINVAL);
            assert_eq!(error_chain(&e), format!("KVM_RESET_DIRTY_RINGS failed: {einval}"));
        }
        other => panic!("expected EINVAL, got {other:?}"),
    }

    let perf = KvmPerfVm::new(&KvmPerfConfig { vcpus: 2, guest_bytes: 1 << 20, ..Default::default() })
        .expect("perf VM");
    assert_bad_config(perf.wait_passes(&[0]), BadConfig::WaitPassesEntries { vcpus: 2, got: 1 });
    perf.release(1);
    assert!(perf.wait_passes(&[0, 0]).is_ok());
}
