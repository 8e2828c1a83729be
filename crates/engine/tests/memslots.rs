//! Memslots through the VM: set, delete, re-flag, and every refused change
//! leaves the VM running with its memory intact.

use shadow_mmu_engine::memslot::MemslotError;
use shadow_mmu_engine::{GuestOp, HostMemory, MemFlags, VcpuError, VcpuExit, VmConfig};
use shadow_mmu_testkit::fixtures::*;

#[test]
fn refused_changes_leave_the_vm_running() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let (vm, mem) = vm_with_slot(base.clone(), 4 * MIB, MemFlags::empty());
        let other = HostMemory::anonymous(2 * MIB).unwrap();
        vm.set_user_memory_region(region(1, 8 * MIB, 2 * MIB, &other, MemFlags::empty())).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, [GuestOp::Write(page(3), 33), GuestOp::Write(8 * MIB + page(1), 81)]);

        let bad: Vec<(shadow_mmu_engine::UserMemoryRegion, MemslotError)> = vec![
            (
                region(2, 3 * MIB, 2 * MIB, &other, MemFlags::empty()),
                MemslotError::Overlap {
                    slot: 2,
                    gpa: 3 * MIB,
                    size: 2 * MIB,
                    other: 0,
                    other_gpa: 0,
                    other_size: 4 * MIB,
                },
            ),
            (
                region(2, 16 * MIB + 512, MIB, &other, MemFlags::empty()),
                MemslotError::Unaligned { field: "guest_phys_addr", value: 16 * MIB + 512 },
            ),
            (region(2, 16 * MIB, 0, &other, MemFlags::empty()), MemslotError::ZeroSize { slot: 2 }),
            (
                region(2, (1 << 48) - MIB, 2 * MIB, &other, MemFlags::empty()),
                MemslotError::OutOfRange { gpa: (1 << 48) - MIB, size: 2 * MIB, bits: 48 },
            ),
            (
                region(1, 12 * MIB, 2 * MIB, &other, MemFlags::empty()),
                MemslotError::Duplicate { slot: 1, gpa: 8 * MIB, size: 2 * MIB },
            ),
            (
                region(1, 8 * MIB, 2 * MIB, &mem, MemFlags::empty()),
                MemslotError::Duplicate { slot: 1, gpa: 8 * MIB, size: 2 * MIB },
            ),
            (
                region(1, 8 * MIB, 2 * MIB, &other, MemFlags::READONLY),
                MemslotError::ReadonlyChange { slot: 1 },
            ),
            (
                region(600, 16 * MIB, MIB, &other, MemFlags::empty()),
                MemslotError::InvalidSlotId { slot: 600, max: 509 },
            ),
            (
                region(2, 16 * MIB, 4 * MIB, &other, MemFlags::empty()),
                MemslotError::MemoryTooSmall { slot: 2, offset: 0, size: 4 * MIB, len: 2 * MIB },
            ),
        ];
        for (r, want) in bad {
            let msg = format!("{r:?}");
            assert_eq!(vm.set_user_memory_region(r).unwrap_err(), want, "{msg}");
            // The VM keeps running, memory intact, every mapping still there.
            let reads = run_ops(&mut vcpu, [GuestOp::Read(page(3)), GuestOp::Read(8 * MIB + page(1))]);
            assert_eq!(reads, vec![33, 81]);
            assert_eq!(vm.memslots().len(), 2);
            audit(&vm);
        }
        assert_eq!(vm.delete_memory_region(7).unwrap_err(), MemslotError::ZeroSize { slot: 7 });
        let e = vm.enable_dirty_logging(7).unwrap_err();
        assert_eq!(e, MemslotError::NoSuchSlot { slot: 7 });
        assert_eq!(e.to_string(), "slot 7 does not exist");
    }
}

#[test]
fn deleting_a_slot_zaps_every_spte_that_maps_it() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let (vm, _mem) =
            vm_with_slot(VmConfig { address_spaces: 3, ..base.clone() }, 4 * MIB, MemFlags::empty());
        let mem1 = HostMemory::anonymous(4 * MIB).unwrap();
        vm.set_user_memory_region(region(1, 4 * MIB, 4 * MIB, &mem1, MemFlags::empty())).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        // Map slot 1 from three address spaces, with 4 KiB and 2 MiB sptes.
        for asid in 0..3 {
            let mut ops = vec![GuestOp::SetAddressSpace(asid)];
            ops.extend((0..1024).step_by(7).map(|i| GuestOp::Write(4 * MIB + page(i), i)));
            ops.push(GuestOp::Write(page(1), 11));
            run_ops(&mut vcpu, ops);
        }
        let before = audit(&vm);
        assert!(before.leaf_sptes >= 3 * 2, "both slots mapped in three address spaces: {before:?}");
        let slot1 = vm.memslots().get(1).unwrap().clone();
        vm.delete_memory_region(1).unwrap();
        for level in 1..=2 {
            assert!(slot1.rmaps(level).iter().all(|h| h.is_empty()), "rmaps of the deleted slot are empty");
        }
        let after = audit(&vm);
        assert_eq!(after.leaf_sptes, 3, "only slot 0's page 1, once per address space: {after:?}");
        // The deleted range now exits to userspace; slot 0 is untouched.
        assert_eq!(
            run_one(&mut vcpu, GuestOp::Write(4 * MIB + page(7), 1)),
            VcpuExit::Mmio { gpa: 4 * MIB + page(7), write: true, value: 1 }
        );
        assert_eq!(run_ops(&mut vcpu, [GuestOp::Read(page(1))]), vec![11]);
        // Re-added with fresh memory, it reads zeros.
        let fresh = HostMemory::anonymous(4 * MIB).unwrap();
        vm.set_user_memory_region(region(1, 4 * MIB, 4 * MIB, &fresh, MemFlags::empty())).unwrap();
        assert_eq!(run_ops(&mut vcpu, [GuestOp::Read(4 * MIB + page(7))]), vec![0]);
        audit(&vm);
        drop(slot1);
    }
}

#[test]
fn read_only_slots_and_holes_exit_as_mmio() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let vm = shadow_mmu_engine::Vm::new(base.clone()).unwrap();
        let mem = HostMemory::anonymous(2 * MIB).unwrap();
        mem.page(5)[0].store(55, std::sync::atomic::Ordering::Relaxed);
        vm.set_user_memory_region(region(0, 0, 2 * MIB, &mem, MemFlags::READONLY)).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        assert_eq!(run_ops(&mut vcpu, [GuestOp::Read(page(5))]), vec![55]);
        assert_eq!(
            run_one(&mut vcpu, GuestOp::Write(page(5), 9)),
            VcpuExit::Mmio { gpa: page(5), write: true, value: 9 }
        );
        assert_eq!(mem.page(5)[0].load(std::sync::atomic::Ordering::Relaxed), 55, "the write did not land");
        assert_eq!(
            run_one(&mut vcpu, GuestOp::Read(64 * MIB)),
            VcpuExit::Mmio { gpa: 64 * MIB, write: false, value: 0 }
        );
        assert_eq!(vcpu.stats().mmio_exits, 2);
        let a = audit(&vm);
        assert_eq!(a.writable_sptes, 0);
        // Logging a read-only slot is allowed; it never has dirty pages.
        vm.enable_dirty_logging(0).unwrap();
        let mut bm = vec![0u64; 8];
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 0);
    }
}

#[test]
fn unaligned_accesses_and_bad_address_spaces_are_errors() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let (vm, _mem) = vm_with_slot(base.clone(), 2 * MIB, MemFlags::empty());
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut s = shadow_mmu_engine::Script::new([GuestOp::Write(4, 1)]);
        assert_eq!(vcpu.run(&mut s).unwrap_err(), VcpuError::Unaligned(4));
        let mut s = shadow_mmu_engine::Script::new([GuestOp::SetAddressSpace(1)]);
        assert_eq!(vcpu.run(&mut s).unwrap_err(), VcpuError::BadAddressSpace { asid: 1, max: 1 });
        // The vCPU still works.
        assert_eq!(run_ops(&mut vcpu, [GuestOp::Write(8, 2), GuestOp::Read(8)]), vec![2]);
    }
}

#[test]
fn slots_at_offsets_share_one_mapping() {
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let vm = shadow_mmu_engine::Vm::new(base.clone()).unwrap();
        let mem = HostMemory::anonymous(4 * MIB).unwrap();
        let mut r = region(0, 0, 2 * MIB, &mem, MemFlags::empty());
        vm.set_user_memory_region(r.clone()).unwrap();
        r.slot = 1;
        r.guest_phys_addr = 16 * MIB;
        r.memory_offset = 2 * MIB;
        vm.set_user_memory_region(r).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, [GuestOp::Write(16 * MIB + page(3), 7)]);
        assert_eq!(mem.page(512 + 3)[0].load(std::sync::atomic::Ordering::Relaxed), 7);
        audit(&vm);
    }
}

#[test]
fn host_writes_are_checked_per_slot_and_logged_like_the_guests() {
    use shadow_mmu_vmm::GuestAccessError;
    for base in every_design() {
        eprintln!("design: {}", describe(&base));
        let (vm, mem) = vm_with_slot(base.clone(), 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
        let ro = HostMemory::anonymous(2 * MIB).unwrap();
        vm.set_user_memory_region(region(1, 4 * MIB, 2 * MIB, &ro, MemFlags::READONLY)).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        run_ops(&mut vcpu, [GuestOp::Write(page(1), 11)]);
        // Refused, writing nothing: across the end of slot 0 into the hole,
        // into the hole, into the read-only slot, unaligned.
        let bad = [
            (2 * MIB - 8, 2, GuestAccessError::NoSlot { gpa: 2 * MIB - 8, bytes: 16 }),
            (3 * MIB, 1, GuestAccessError::NoSlot { gpa: 3 * MIB, bytes: 8 }),
            (4 * MIB, 1, GuestAccessError::ReadOnly { gpa: 4 * MIB, slot: 1 }),
            (page(2) + 4, 1, GuestAccessError::Unaligned { gpa: page(2) + 4, bytes: 8 }),
        ];
        for (gpa, n, want) in bad {
            assert_eq!(vm.write_guest(gpa, &vec![7; n]), Err(want.clone()), "{gpa:#x}");
            assert!(!want.to_string().is_empty());
        }
        assert_eq!(mem.page(511)[511].load(std::sync::atomic::Ordering::Relaxed), 0);
        // Reading the read-only slot is fine.
        ro.page(3)[0].store(33, std::sync::atomic::Ordering::Relaxed);
        let mut out = [0u64; 1];
        vm.read_guest(4 * MIB + page(3), &mut out).unwrap();
        assert_eq!(out, [33]);
        // A good write lands, is seen by the guest, and is in the log with
        // the guest's page.
        vm.write_guest(page(9) + 8, &[99]).unwrap();
        let mut bm = vec![0u64; 8];
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 2);
        assert_eq!(set_pages(&bm), vec![1, 9]);
        assert_eq!(run_ops(&mut vcpu, [GuestOp::Read(page(9) + 8)]), vec![99]);
        // With logging off, host writes are not logged.
        vm.disable_dirty_logging(0).unwrap();
        vm.write_guest(page(10), &[1]).unwrap();
        vm.enable_dirty_logging(0).unwrap();
        assert_eq!(vm.get_dirty_log(0, &mut bm).unwrap(), 0);
        audit(&vm);
    }
}
