//! The machine's KVM as a testkit [`Backend`]: each VM is a [`KvmScriptVm`]
//! (a test slot and one vCPU that runs host-chosen stores), with or without
//! manual protect.

use std::sync::atomic::AtomicU64;

use shadow_mmu_testkit::backend::{Backend, BackendError, BackendVm, Capabilities};

use crate::script::KvmScriptVm;

/// KVM through `/dev/kvm`, classic (`KVM_GET_DIRTY_LOG` clears and
/// re-protects) or with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmBackend {
    /// Enable manual protect on each VM.
    pub manual_protect: bool,
}

impl Backend for KvmBackend {
    fn name(&self) -> String {
        format!("KVM{}", if self.manual_protect { " (manual protect)" } else { "" })
    }

    fn create_vm(&self, guest_bytes: u64) -> Result<Box<dyn BackendVm>, BackendError> {
        let name = self.name();
        let vm = KvmScriptVm::new(guest_bytes, self.manual_protect)
            .map_err(|e| BackendError::new(&name, "creating the VM", e))?;
        Ok(Box::new(KvmBackendVm { name, vm, manual_protect: self.manual_protect }))
    }
}

/// A VM of [`KvmBackend`].
struct KvmBackendVm {
    name: String,
    vm: KvmScriptVm,
    manual_protect: bool,
}

impl BackendVm for KvmBackendVm {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { manual_protect: self.manual_protect, mmu_figures: false }
    }

    fn pages(&self) -> u64 {
        self.vm.vm().test_pages()
    }

    fn memory(&self) -> &[AtomicU64] {
        self.vm.memory()
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<(), BackendError> {
        let r = if on { self.vm.enable_dirty_logging() } else { self.vm.disable_dirty_logging() };
        r.map(|_| ()).map_err(|e| BackendError::new(&self.name, "setting dirty logging", e))
    }

    fn get_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<u64, BackendError> {
        self.vm.get_dirty_log(bitmap).map_err(|e| BackendError::new(&self.name, "KVM_GET_DIRTY_LOG", e))
    }

    fn clear_dirty_log(&mut self, first_page: u64, bitmap: &[u64]) -> Result<(), BackendError> {
        self.vm
            .clear_dirty_log(first_page, bitmap)
            .map_err(|e| BackendError::new(&self.name, "KVM_CLEAR_DIRTY_LOG", e))
    }

    fn run_writes(&mut self, writes: &[(u64, u64)]) -> Result<(), BackendError> {
        self.vm.run_writes(writes).map_err(|e| BackendError::new(&self.name, "run_writes", e))
    }
}
