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

use crate::error::KvmError;
use crate::guest::{SCRIPT_ENTRY_BYTES, SCRIPT_TABLE_GPA, UCALL_SCRIPT_DONE, script_program};
use crate::vm::{DirtyLogProtect, KvmVm, TEST_GPA, Vcpu, VmSetup};

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
        let vm = KvmVm::new(VmSetup {
            control_bytes: SCRIPT_CONTROL_BYTES,
            test_bytes: guest_bytes,
            protect,
            populate: false,
        })?;
        vm.write_control(0, &script_program()?)?;
        let vcpu = vm.create_vcpu(0, 0, [0; 8])?;
        Ok(Self { vcpu, vm })
    }

    /// Stores each `(offset, value)` in order, 8 bytes at byte `offset` of
    /// the test slot (8-aligned, inside the slot), with guest stores.
    pub fn run_writes(&mut self, writes: &[(u64, u64)]) -> Result<(), KvmError> {
        let bytes = self.vm.test_pages() * crate::vm::PAGE_SIZE;
        if let Some(&(off, _)) = writes.iter().find(|&&(off, _)| off % 8 != 0 || off >= bytes) {
            return Err(KvmError::BadConfig(format!(
                "write at offset {off:#x}: must be 8-aligned and below {bytes:#x}"
            )));
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
            match self.vcpu.run_to_ucall()? {
                UCALL_SCRIPT_DONE => {}
                other => {
                    return Err(KvmError::UnexpectedExit(format!("ucall {other} from the script guest")));
                }
            }
        }
        Ok(())
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
