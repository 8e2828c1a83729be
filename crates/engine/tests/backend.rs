//! The engine as a `vmm` backend (`EngineBackend`), in every design: a VM
//! with a test slot, its log, refused stores that store nothing.

use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_engine::EngineBackend;
use shadow_mmu_testkit::fixtures::{MIB, every_design, set_pages};
use shadow_mmu_vmm::{Backend, harvest};

#[test]
fn the_engine_as_a_backend() {
    for config in every_design() {
        let backend = EngineBackend { config, dirty_ring: None };
        let mut vm = backend.create_vm(2 * MIB).unwrap();
        assert_eq!(vm.pages(), 512);
        let mut bitmap = vec![0u64; 8];
        assert!(harvest(vm.as_mut(), &mut bitmap).is_err(), "{}: logging is off", backend.name());
        vm.set_dirty_logging(true).unwrap();
        vm.run_writes(&[(3 * PAGE_SIZE + 8, 7), (9 * PAGE_SIZE, 1)]).unwrap();
        assert_eq!(harvest(vm.as_mut(), &mut bitmap).unwrap(), 2);
        assert_eq!(set_pages(&bitmap), vec![3, 9]);
        assert_eq!(vm.memory()[3 * 512 + 1].load(std::sync::atomic::Ordering::Relaxed), 7);
        // Refused stores store nothing, and the VM goes on.
        let e = vm.run_writes(&[(0, 1), (4, 2)]).unwrap_err();
        assert!(e.to_string().contains("run_writes refused"), "{e}");
        assert_eq!(harvest(vm.as_mut(), &mut bitmap).unwrap(), 0);
        assert!(vm.clear_dirty_log(0, &bitmap).is_err(), "no manual protect on the engine yet");
        assert!(vm.large_sptes_mapped().is_some());
    }
}

/// The guest's progress: its harvest windows always, its samples a
/// millisecond apart only where the spec asks for them (a thread of their
/// own beside the vCPUs).
#[test]
fn progress_samples_only_when_asked() {
    use shadow_mmu_vmm::PassSpec;
    for asked in [false, true] {
        let spec = PassSpec { progress_samples: asked, ..PassSpec::sweep(1, 4 * MIB, 1) };
        let mut vm = EngineBackend::default().start_passes(&spec).unwrap();
        vm.set_dirty_logging(true).unwrap();
        vm.release(2);
        vm.wait_passes(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        vm.harvest_begin();
        let mut bitmap = vec![0u64; 16];
        harvest(vm.as_mut(), &mut bitmap).unwrap();
        vm.harvest_end();
        let trace = vm.stop().unwrap().progress.unwrap();
        assert_eq!(trace.windows.len(), 1, "asked {asked}");
        assert_eq!(!trace.samples.is_empty(), asked, "asked {asked}: {} samples", trace.samples.len());
        assert!(trace.samples.windows(2).all(|w| w[0] <= w[1]), "in order");
    }
}
