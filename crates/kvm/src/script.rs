//! A one-vCPU VM that executes host-chosen writes, for differential tests
//! against the engine: the host fills a table of (address, value) in the
//! control slot, the guest ([`crate::guest::script_program`]) stores them in
//! order and exits with a ucall.
//!
//! Invariants:
//! - between calls the vCPU is outside `KVM_RUN`, so the test slot holds
//!   still while the host reads it or harvests its log;
//! - [`KvmScriptVm::run_writes`] checks every write before running any, so
//!   a refused list leaves memory and the log untouched; a list longer than
//!   the table is run in table-sized pieces, in order.

use std::sync::atomic::Ordering;

use crate::error::{BadConfig, KvmError, UnexpectedExit};
use crate::guest::{Program, SCRIPT_ENTRY_BYTES, SCRIPT_TABLE_GPA, UCALL_SCRIPT_DONE, script_program};
use crate::vm::{GuestExit, KvmVm, TEST_GPA, Vcpu, VmSetup};
use shadow_mmu_vmm::DirtyLogProtect;

/// Bytes of the control slot: the program's page, then the table.
const SCRIPT_CONTROL_BYTES: u64 = 1 << 20;

/// Writes one run of the guest can take.
pub const SCRIPT_TABLE_WRITES: usize =
    ((SCRIPT_CONTROL_BYTES - SCRIPT_TABLE_GPA as u64 - SCRIPT_ENTRY_BYTES) / SCRIPT_ENTRY_BYTES) as usize;

/// A VM whose single vCPU runs tables of writes.
#[derive(Debug)]
pub struct KvmScriptVm {
    vcpu: Vcpu,
    vm: KvmVm,
}

impl KvmScriptVm {
    /// A VM with a test slot of `guest_bytes` (dirty logging off) and one
    /// vCPU; `protect` is `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`'s flags.
    pub fn new(guest_bytes: u64, protect: DirtyLogProtect) -> Result<Self, KvmError> {
        Self::with_setup(guest_bytes, protect, None)
    }

    /// As [`Self::new`], with the dirty ring of `ring_bytes` bytes instead
    /// of the bitmap ioctls.
    pub fn with_dirty_ring(guest_bytes: u64, ring_bytes: u32) -> Result<Self, KvmError> {
        Self::with_setup(guest_bytes, DirtyLogProtect::Auto, Some(ring_bytes))
    }

    fn with_setup(guest_bytes: u64, protect: DirtyLogProtect, ring: Option<u32>) -> Result<Self, KvmError> {
        let vm = KvmVm::new(VmSetup {
            control_bytes: SCRIPT_CONTROL_BYTES,
            test_bytes: guest_bytes,
            protect,
            populate: false,
            dirty_ring_bytes: ring,
        })?;
        vm.write_control(0, &script_program()?)?;
        let vcpu = vm.create_vcpu(0, 0, [0; 8])?;
        Ok(Self { vcpu, vm })
    }

    /// Stores each `(offset, value)` in order, 8 bytes at byte `offset` of
    /// the test slot (8-aligned, inside the slot), with guest stores. A
    /// dirty-ring-full exit is an error here; see [`Self::run_writes_with`].
    pub fn run_writes(&mut self, writes: &[(u64, u64)]) -> Result<(), KvmError> {
        let vcpu = self.vcpu.id();
        let mut full = |_: &KvmVm| {
            let exit = GuestExit::DirtyRingFull;
            Err(UnexpectedExit::Exit { vcpu, program: Program::Script, exit }.into())
        };
        self.run_writes_with(writes, &mut full).map(|_| ())
    }

    /// [`Self::run_writes`], calling `on_full` at each dirty-ring-full exit
    /// (to harvest and reset the rings) and running on after it. Returns the
    /// number of such exits.
    pub fn run_writes_with(
        &mut self,
        writes: &[(u64, u64)],
        on_full: &mut dyn FnMut(&KvmVm) -> Result<(), KvmError>,
    ) -> Result<u64, KvmError> {
        let mut full_exits = 0;
        let bytes = self.vm.test_pages() * shadow_mmu_core::spte::PAGE_SIZE;
        if let Some(&(off, _)) = writes.iter().find(|&&(off, _)| off % 8 != 0 || off >= bytes) {
            return Err(BadConfig::ScriptWrite { offset: off, slot_bytes: bytes }.into());
        }
        let table = &self.vm.memory().control.words()[SCRIPT_TABLE_GPA as usize / 8..];
        for chunk in writes.chunks(SCRIPT_TABLE_WRITES) {
            // Relaxed: the guest reads the table only in KVM_RUN, a syscall
            // after these stores, in this thread.
            table[0].store(chunk.len() as u64, Ordering::Relaxed);
            for (entry, &(off, value)) in table[2..].chunks_exact(2).zip(chunk) {
                entry[0].store(TEST_GPA + off, Ordering::Relaxed);
                entry[1].store(value, Ordering::Relaxed);
            }
            loop {
                match self.vcpu.run()? {
                    GuestExit::Ucall(UCALL_SCRIPT_DONE) => break,
                    GuestExit::DirtyRingFull => {
                        full_exits += 1;
                        on_full(&self.vm)?;
                    }
                    exit => {
                        let vcpu = self.vcpu.id();
                        return Err(UnexpectedExit::Exit { vcpu, program: Program::Script, exit }.into());
                    }
                }
            }
        }
        Ok(full_exits)
    }
}

/// A script VM is a [`KvmVm`] with a vCPU in it: logging, the log and
/// memory are the VM's.
impl std::ops::Deref for KvmScriptVm {
    type Target = KvmVm;
    fn deref(&self) -> &KvmVm {
        &self.vm
    }
}

impl std::ops::DerefMut for KvmScriptVm {
    fn deref_mut(&mut self) -> &mut KvmVm {
        &mut self.vm
    }
}
