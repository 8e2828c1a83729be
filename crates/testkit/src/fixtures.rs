//! Small VMs, guests and checks that the tests of every crate share: a VM
//! with one slot, scripted runs, the list of designs to run, the bitmap's
//! pages, and two measured properties (stale TLB entries, write tracking).
//! They panic on failure, as test code does.

use std::sync::Arc;

use shadow_mmu_engine::{
    AuditOptions, AuditReport, GuestOp, HostMemory, MemFlags, MmuDesign, Script, UserMemoryRegion, Vcpu,
    VcpuExit, Vm, VmConfig,
};

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// The pass VM the lock-fault tests run `migrate-perf` on: one vCPU over
/// 16 MiB (half of it the lock faults' reserve, where they need one), the
/// design of `config`, making the lock faults `lock`.
pub fn lock_fault_passes(
    config: VmConfig,
    lock: shadow_mmu_vmm::LockFaults,
) -> Box<dyn shadow_mmu_vmm::PassVm> {
    use shadow_mmu_vmm::Backend;
    let backend = shadow_mmu_engine::EngineBackend { config, dirty_ring: None };
    let pass =
        shadow_mmu_vmm::PassSpec { lock_faults: lock, ..shadow_mmu_vmm::PassSpec::sweep(1, 16 * MIB, 9) };
    backend.start_passes(&pass).expect("a pass VM of 16 MiB")
}

/// Every design the engine runs: each MMU design, with `fast_page_fault` on
/// (KVM 3.11 and the seed) and off (the baseline of the first
/// measurements), and the TDP design also with PML and without eager split.
pub fn every_design() -> Vec<VmConfig> {
    MmuDesign::ALL.into_iter().flat_map(designs_of).collect()
}

/// `mmu`, with `fast_page_fault` on and off; for `tdp`, also with PML
/// (D-bit logging) and without eager split, the other way from its
/// default in both.
pub fn designs_of(mmu: MmuDesign) -> Vec<VmConfig> {
    let mut v: Vec<VmConfig> = [true, false]
        .map(|fast_page_fault| VmConfig { mmu, fast_page_fault, ..VmConfig::default() })
        .to_vec();
    if mmu == MmuDesign::Tdp {
        v.push(VmConfig { mmu, pml: true, eager_page_split: false, ..VmConfig::default() });
    }
    v
}

/// The design of `c`, for messages.
pub fn describe(c: &VmConfig) -> String {
    format!(
        "{}{}{}{}",
        c.mmu,
        if c.fast_page_fault { "" } else { ", no fast_page_fault" },
        if c.pml { ", pml" } else { "" },
        if c.eager_page_split || c.mmu != MmuDesign::Tdp { "" } else { ", no eager split" }
    )
}

/// A region of `size` bytes of `mem` at guest physical `gpa`.
pub fn region(slot: u32, gpa: u64, size: u64, mem: &Arc<HostMemory>, flags: MemFlags) -> UserMemoryRegion {
    UserMemoryRegion {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        memory: Some(mem.clone()),
        memory_offset: 0,
    }
}

/// A VM with one slot of `size` bytes at guest physical 0.
pub fn vm_with_slot(config: VmConfig, size: u64, flags: MemFlags) -> (Vm, Arc<HostMemory>) {
    let vm = Vm::new(config).unwrap();
    let mem = HostMemory::anonymous(size).unwrap();
    vm.set_user_memory_region(region(0, 0, size, &mem, flags)).unwrap();
    (vm, mem)
}

/// Runs `ops` on `vcpu`; expects the script to finish (hypercall 0) and
/// returns the values read.
pub fn run_ops(vcpu: &mut Vcpu, ops: impl IntoIterator<Item = GuestOp>) -> Vec<u64> {
    let mut script = Script::new(ops);
    assert_eq!(vcpu.run(&mut script).unwrap(), VcpuExit::Hypercall(0));
    script.reads
}

/// Runs one op, returns the exit.
pub fn run_one(vcpu: &mut Vcpu, op: GuestOp) -> VcpuExit {
    let mut script = Script::new([op]);
    vcpu.run(&mut script).unwrap()
}

/// The guest physical address of page `gfn`.
pub fn page(gfn: u64) -> u64 {
    gfn << 12
}

/// Runs the MMU audit with the dirty logging invariant; panics on a finding.
pub fn audit(vm: &Vm) -> AuditReport {
    vm.audit(AuditOptions { dirty_log: true }).unwrap_or_else(|e| panic!("MMU audit failed: {e}"))
}

/// Page numbers set in a bitmap.
pub fn set_pages(bitmap: &[u64]) -> Vec<u64> {
    let mut v = Vec::new();
    for (i, w) in bitmap.iter().enumerate() {
        for b in 0..64 {
            if w & (1 << b) != 0 {
                v.push(i as u64 * 64 + b);
            }
        }
    }
    v
}

/// A guest that stores an increasing counter to one word until told to stop.
pub struct Hammer {
    /// Where it stores.
    pub gpa: u64,
    /// The last value stored.
    pub n: u64,
    /// Set to make it exit (`Hypercall(0)`).
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

impl shadow_mmu_engine::GuestCode for Hammer {
    fn next_op(&mut self, _: u64) -> GuestOp {
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return GuestOp::Hypercall(0);
        }
        self.n += 1;
        GuestOp::Write(self.gpa, self.n)
    }
}

/// The remote flush property, measured: a vCPU stores to page 0 through its
/// TLB in a loop; the host harvests repeatedly. A store that completes after
/// one `get_dirty_log` returns must be reported by the next one. Returns
/// (violations, rounds in which the page changed between two harvests).
pub fn stale_tlb_violations(config: VmConfig, rounds: u32) -> (u32, u32) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (vm, mem) = vm_with_slot(config, 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
    let stop = Arc::new(AtomicBool::new(false));
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut guest = Hammer { gpa: 0, n: 0, stop: stop.clone() };
    let t = std::thread::spawn(move || vcpu.run(&mut guest).unwrap());
    let word = &mem.page(0)[0];
    let mut bm = vec![0u64; 8];
    while word.load(Ordering::Relaxed) == 0 {
        std::hint::spin_loop();
    }
    vm.get_dirty_log(0, &mut bm).unwrap();
    let (mut violations, mut changed) = (0, 0);
    for _ in 0..rounds {
        let after_last = word.load(Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_micros(200));
        let before_next = word.load(Ordering::Relaxed);
        vm.get_dirty_log(0, &mut bm).unwrap();
        if after_last != before_next {
            changed += 1;
            violations += u32::from(bm[0] & 1 == 0);
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(t.join().unwrap(), shadow_mmu_engine::VcpuExit::Hypercall(0));
    (violations, changed)
}

/// A guest that stores to pages `first..first+n` in turn until told to stop.
pub struct Sweeper {
    /// First page.
    pub first: u64,
    /// Pages swept.
    pub n: u64,
    /// Stores so far.
    pub i: u64,
    /// Set to make it exit (`Hypercall(0)`).
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

impl shadow_mmu_engine::GuestCode for Sweeper {
    fn next_op(&mut self, _: u64) -> GuestOp {
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return GuestOp::Hypercall(0);
        }
        self.i += 1;
        GuestOp::Write(page(self.first + self.i % self.n), self.i)
    }
}

/// Patch 04's race, measured: vCPU 0 stores consecutive values to page 0
/// through its TLB, vCPU 1 keeps pages 1..512 dirty (so that each harvest,
/// after it clears W on page 0, has more walking to do before its TLB
/// flush); a harvester loops over `get_dirty_log`; the main thread tracks
/// writes to page 0, checks, and untracks, `rounds` times. After
/// `track_write` returns, no store may land in memory without a
/// `WriteTracked` exit: the first exit must carry the value right after the
/// one memory held when tracking returned. Returns (violations, rounds).
pub fn tracking_violations(config: VmConfig, rounds: u32) -> (u32, u32) {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (vm, mem) = vm_with_slot(config, 2 * MIB, MemFlags::LOG_DIRTY_PAGES);
    let stop = Arc::new(AtomicBool::new(false));
    let exits: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let vcpu_thread = {
        let (stop, exits, mem) = (stop.clone(), exits.clone(), mem.clone());
        std::thread::spawn(move || {
            let mut guest = Hammer { gpa: 0, n: 0, stop };
            loop {
                match vcpu.run(&mut guest).unwrap() {
                    VcpuExit::WriteTracked { gpa: 0, value } => {
                        // Emulate the store, as a tracker would, and go on.
                        let mut e = exits.lock().unwrap();
                        mem.page(0)[0].store(value, Ordering::Relaxed);
                        e.push(value);
                    }
                    VcpuExit::Hypercall(0) => break,
                    other => panic!("unexpected exit {other:?}"),
                }
            }
        })
    };
    let mut vcpu1 = vm.create_vcpu(1).unwrap();
    let sweeper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut guest = Sweeper { first: 1, n: 511, i: 0, stop };
            assert_eq!(vcpu1.run(&mut guest).unwrap(), VcpuExit::Hypercall(0));
        })
    };
    let harvester = {
        let (stop, vm) = (stop.clone(), vm.clone());
        std::thread::spawn(move || {
            let mut bm = vec![0u64; 8];
            while !stop.load(Ordering::Relaxed) {
                vm.get_dirty_log(0, &mut bm).unwrap();
            }
        })
    };
    let word = &mem.page(0)[0];
    while word.load(Ordering::Relaxed) == 0 {
        std::hint::spin_loop();
    }
    let mut violations = 0;
    for _ in 0..rounds {
        exits.lock().unwrap().clear();
        vm.track_write(0).unwrap();
        let m0 = word.load(Ordering::Relaxed);
        let first = loop {
            if let Some(&v) = exits.lock().unwrap().first() {
                break v;
            }
            std::thread::yield_now();
        };
        if first > m0 + 1 {
            violations += 1;
        }
        vm.untrack_write(0).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    vcpu_thread.join().unwrap();
    sweeper.join().unwrap();
    harvester.join().unwrap();
    (violations, rounds)
}
