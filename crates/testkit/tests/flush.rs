//! The remote TLB flush protocol, seen from outside: stale TLB entries never
//! outlive `get_dirty_log`, and memslot deletion never leaves a vCPU a
//! translation into unmapped memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shadow_mmu_engine::{HostMemory, MemFlags, VcpuExit};
use shadow_mmu_testkit::fixtures::*;

#[test]
fn no_store_through_a_stale_tlb_entry_escapes_the_log() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let (violations, changed) = stale_tlb_violations(base.clone(), 300);
        assert!(changed > 100, "the guest must store between harvests ({changed} rounds)");
        assert_eq!(violations, 0, "stores after get_dirty_log returned went unreported");
    }
}

/// A vCPU storing into a slot while the host deletes it: the vCPU must see
/// an MMIO exit, never a store into unmapped memory (which would crash the
/// test process).
#[test]
fn deleting_a_slot_under_a_running_vcpu() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        for round in 0..40u64 {
            let (vm, _mem0) = vm_with_slot(base.clone(), 2 * MIB, MemFlags::empty());
            let mem1 = HostMemory::anonymous(2 * MIB).unwrap();
            let flags = if round % 2 == 0 { MemFlags::LOG_DIRTY_PAGES } else { MemFlags::empty() };
            vm.set_user_memory_region(region(1, 4 * MIB, 2 * MIB, &mem1, flags)).unwrap();
            drop(mem1); // the slot holds the only reference now
            let stop = Arc::new(AtomicBool::new(false));
            let mut vcpu = vm.create_vcpu(0).unwrap();
            let mut guest = Hammer { gpa: 4 * MIB + page(round % 512), n: 0, stop: stop.clone() };
            let t = std::thread::spawn(move || vcpu.run(&mut guest).unwrap());
            std::thread::sleep(std::time::Duration::from_micros(50 * (round % 5)));
            vm.delete_memory_region(1).unwrap();
            let exit = t.join().unwrap();
            assert!(
                matches!(exit, VcpuExit::Mmio { gpa, write: true, .. } if gpa == 4 * MIB + page(round % 512)),
                "{exit:?}"
            );
            audit(&vm);
            stop.store(true, Ordering::Relaxed);
        }
    }
}
