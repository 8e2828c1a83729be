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

/// A kick (`Vm::kick_vcpus`) makes a running vCPU return `Intr` at an
/// access boundary; running again goes on with the next operation, none
/// lost or repeated, in every design, with logging on.
#[test]
fn a_kicked_vcpu_exits_at_an_access_boundary_and_loses_no_operation() {
    use shadow_mmu_engine::{GuestCode, GuestOp, MemFlags, VcpuExit};
    struct Counter {
        n: u64,
        last: u64,
    }
    impl GuestCode for Counter {
        fn next_op(&mut self, _: u64) -> GuestOp {
            if self.n == self.last {
                return GuestOp::Hypercall(0);
            }
            self.n += 1;
            // Each store to a new page of 2 MiB, round and round: faults too.
            GuestOp::Write(page(self.n % 512), self.n)
        }
    }
    for base in every_design() {
        let (vm, mem) = vm_with_slot(base.clone(), 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let kicker = {
            let vm = vm.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    vm.kick_vcpus();
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            })
        };
        let mut guest = Counter { n: 0, last: 2_000_000 };
        let mut intrs = 0;
        loop {
            match vcpu.run(&mut guest).unwrap() {
                VcpuExit::Intr => intrs += 1,
                VcpuExit::Hypercall(0) => break,
                other => panic!("{}: {other:?}", describe(&base)),
            }
        }
        kicker.join().unwrap();
        assert!(intrs > 0, "{}: no kick seen", describe(&base));
        assert_eq!(vcpu.stats().writes, 2_000_000, "{}: every store once", describe(&base));
        let last = 2_000_000u64;
        assert_eq!(mem.page(last % 512)[0].load(std::sync::atomic::Ordering::Relaxed), last);
        audit(&vm);
    }
}
