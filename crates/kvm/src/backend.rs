//! The machine's KVM as a testkit [`Backend`]: each VM is a [`KvmScriptVm`]
//! (a test slot and one vCPU that runs host-chosen stores), or, for
//! `migrate-perf`, a [`KvmPerfVm`] (vCPU threads making passes), with or
//! without manual protect.

use std::sync::atomic::AtomicU64;

use shadow_mmu_testkit::backend::{
    Backend, BackendError, BackendVm, Capabilities, PassExtras, PassSpec, PassVm,
};

use crate::perf::{KvmPerfConfig, KvmPerfVm};
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

    fn start_passes(&self, spec: &PassSpec) -> Result<Box<dyn PassVm>, BackendError> {
        let name = self.name();
        let cfg = KvmPerfConfig {
            vcpus: spec.vcpus,
            guest_bytes: spec.guest_bytes,
            write_pct: spec.write_pct,
            random: spec.random,
            seed: spec.seed,
            manual_protect: self.manual_protect,
        };
        let vm = KvmPerfVm::new(&cfg).map_err(|e| BackendError::new(&name, "starting the passes", e))?;
        Ok(Box::new(KvmPassVm { name, vm }))
    }
}

/// A [`PassVm`] of [`KvmBackend`]. Its guests store the pass number, with no
/// iteration tag: the oracle checks its harvests at the end only.
struct KvmPassVm {
    name: String,
    vm: KvmPerfVm,
}

impl PassVm for KvmPassVm {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { manual_protect: self.vm.config().manual_protect, mmu_figures: false }
    }

    fn pages(&self) -> u64 {
        self.vm.pages()
    }

    fn memory(&self) -> &[AtomicU64] {
        self.vm.memory()
    }

    fn enable_dirty_logging(&mut self) -> Result<u64, BackendError> {
        self.vm.enable_dirty_logging().map_err(|e| BackendError::new(&self.name, "enabling dirty logging", e))
    }

    fn get_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<u64, BackendError> {
        self.vm.get_dirty_log(bitmap).map_err(|e| BackendError::new(&self.name, "KVM_GET_DIRTY_LOG", e))
    }

    fn clear_dirty_log(&mut self, bitmap: &[u64]) -> Result<(), BackendError> {
        self.vm.clear_dirty_log(bitmap).map_err(|e| BackendError::new(&self.name, "KVM_CLEAR_DIRTY_LOG", e))
    }

    fn release(&self, n: u64) {
        self.vm.release(n);
    }

    fn wait_passes(&self, since: u64) -> Result<u64, BackendError> {
        let since = vec![since; self.vm.config().vcpus as usize];
        self.vm.wait_passes(&since).map_err(|e| BackendError::new(&self.name, "waiting for the passes", e))
    }

    fn cut(&self) -> Option<u64> {
        None
    }

    fn stop(&mut self) -> Result<PassExtras, BackendError> {
        self.vm.stop().map_err(|e| BackendError::new(&self.name, "stopping the vCPUs", e))?;
        Ok(PassExtras::default())
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
