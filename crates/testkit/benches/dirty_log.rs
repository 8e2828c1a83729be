//! Dirty logging costs on a 1 GiB guest, per design:
//! - `get_dirty_log` of a fully dirtied guest, per dirty page (one
//!   harvesting thread, no vCPU running);
//! - a vCPU's write fault on a page write-protected for dirty logging, per
//!   fault (a pass of one store per page after a harvest).
//!
//! `cargo bench -p shadow-mmu-testkit --bench dirty_log`. Each sample
//! re-dirties (or re-protects) the whole guest outside the timed part.

use std::cell::RefCell;

use divan::Bencher;
use divan::counter::ItemsCount;
use shadow_mmu_engine::workload::{GuestControl, HC_PASS_DONE, WorkloadGuest, WorkloadSpec};
use shadow_mmu_engine::{
    HostMemory, MemFlags, MmuDesign, UserMemoryRegion, Vcpu, VcpuExit, Vm, VmConfig, bitmap_words,
};

const GUEST_BYTES: u64 = 1 << 30;
const PAGES: u64 = GUEST_BYTES >> 12;

fn main() {
    divan::main();
}

struct Guest {
    vm: Vm,
    vcpu: Vcpu,
    guest: WorkloadGuest,
    bitmap: Vec<u64>,
    _mem: std::sync::Arc<HostMemory>,
}

impl Guest {
    /// A 1 GiB guest with dirty logging on, populated by one pass.
    fn new(mmu: MmuDesign) -> Self {
        let vm = Vm::new(VmConfig { mmu, ..VmConfig::default() }).unwrap();
        let mem = HostMemory::anonymous(GUEST_BYTES).unwrap();
        vm.set_user_memory_region(UserMemoryRegion {
            slot: 0,
            flags: MemFlags::LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: GUEST_BYTES,
            memory: Some(mem.clone()),
            memory_offset: 0,
        })
        .unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let spec = WorkloadSpec { exit_each_pass: true, ..WorkloadSpec::default() };
        let guest = WorkloadGuest::new(spec, 0, 1, 0, PAGES, GuestControl::new(1));
        let mut g = Self { vm, vcpu, guest, bitmap: vec![0; bitmap_words(PAGES)], _mem: mem };
        g.pass();
        g
    }

    /// One store to every page.
    fn pass(&mut self) {
        assert_eq!(self.vcpu.run(&mut self.guest).unwrap(), VcpuExit::Hypercall(HC_PASS_DONE));
    }

    fn harvest(&mut self) -> u64 {
        self.vm.get_dirty_log(0, &mut self.bitmap).unwrap()
    }
}

#[divan::bench(args = MmuDesign::ALL, sample_count = 10, sample_size = 1)]
fn get_dirty_log_1gib_fully_dirty(bencher: Bencher, mmu: MmuDesign) {
    let g = RefCell::new(Guest::new(mmu));
    bencher
        .counter(ItemsCount::new(PAGES))
        .with_inputs(|| {
            // Harvest what is there, then dirty every page again.
            let mut g = g.borrow_mut();
            g.harvest();
            g.pass();
        })
        .bench_local_values(|()| {
            let n = g.borrow_mut().harvest();
            assert_eq!(n, PAGES, "every page was dirty");
        });
}

#[divan::bench(args = MmuDesign::ALL, sample_count = 10, sample_size = 1)]
fn vcpu_write_fault_on_protected_page(bencher: Bencher, mmu: MmuDesign) {
    let g = RefCell::new(Guest::new(mmu));
    bencher
        .counter(ItemsCount::new(PAGES))
        .with_inputs(|| {
            // Write-protect every page.
            g.borrow_mut().harvest();
        })
        .bench_local_values(|()| {
            let mut g = g.borrow_mut();
            let before = g.vcpu.stats().write_faults;
            g.pass();
            assert_eq!(g.vcpu.stats().write_faults - before, PAGES, "one write fault per page");
        });
}
