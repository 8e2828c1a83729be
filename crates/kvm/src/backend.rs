//! The machine's KVM as a testkit [`Backend`]: each VM is a [`KvmScriptVm`]
//! (a test slot and one vCPU that runs host-chosen stores), or, for
//! `migrate-perf`, a [`KvmPerfVm`] (vCPU threads making passes), with or
//! without manual protect.

use std::sync::atomic::AtomicU64;

use shadow_mmu_testkit::backend::{
    Backend, BackendError, BackendVm, Capabilities, DirtyLogVm, PassExtras, PassSpec, PassVm,
};

use crate::error::KvmError;
use crate::perf::{KvmPerfConfig, KvmPerfVm};
use crate::script::KvmScriptVm;
use crate::vm::KvmVm;

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
        Ok(Box::new(KvmBackendVm { name, manual_protect: self.manual_protect, inner: vm }))
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
        Ok(Box::new(KvmBackendVm { name, manual_protect: self.manual_protect, inner: vm }))
    }
}

/// What both of KVM's VMs are: a [`KvmVm`] with something running in it.
trait WrapsKvmVm {
    fn kvm(&self) -> &KvmVm;
    fn kvm_mut(&mut self) -> &mut KvmVm;
}

impl WrapsKvmVm for KvmScriptVm {
    fn kvm(&self) -> &KvmVm {
        self.vm()
    }
    fn kvm_mut(&mut self) -> &mut KvmVm {
        self.vm_mut()
    }
}

impl WrapsKvmVm for KvmPerfVm {
    fn kvm(&self) -> &KvmVm {
        self.vm()
    }
    fn kvm_mut(&mut self) -> &mut KvmVm {
        self.vm_mut()
    }
}

/// A VM of [`KvmBackend`]: a [`KvmScriptVm`] (host-chosen stores) or a
/// [`KvmPerfVm`] (the passes' vCPU threads). The passes' guests store the
/// pass number, with no iteration tag: the oracle checks their harvests at
/// the end only.
struct KvmBackendVm<V> {
    name: String,
    manual_protect: bool,
    inner: V,
}

impl<V> KvmBackendVm<V> {
    fn fail(&self, op: &'static str, e: KvmError) -> BackendError {
        BackendError::new(&self.name, op, e)
    }
}

impl<V: WrapsKvmVm> DirtyLogVm for KvmBackendVm<V> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { manual_protect: self.manual_protect, mmu_figures: false }
    }

    fn pages(&self) -> u64 {
        self.inner.kvm().test_pages()
    }

    fn memory(&self) -> &[AtomicU64] {
        self.inner.kvm().memory().test.words()
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<(), BackendError> {
        let vm = self.inner.kvm_mut();
        let r = if on { vm.enable_dirty_logging() } else { vm.disable_dirty_logging() };
        r.map(|_| ()).map_err(|e| self.fail("setting dirty logging", e))
    }

    fn get_dirty_log(&mut self, bitmap: &mut [u64]) -> Result<u64, BackendError> {
        self.inner.kvm().get_dirty_log(bitmap).map_err(|e| self.fail("KVM_GET_DIRTY_LOG", e))
    }

    fn clear_dirty_log(&mut self, first_page: u64, bitmap: &[u64]) -> Result<(), BackendError> {
        self.inner.kvm().clear_dirty_log(first_page, bitmap).map_err(|e| self.fail("KVM_CLEAR_DIRTY_LOG", e))
    }
}

impl BackendVm for KvmBackendVm<KvmScriptVm> {
    fn run_writes(&mut self, writes: &[(u64, u64)]) -> Result<(), BackendError> {
        self.inner.run_writes(writes).map_err(|e| self.fail("run_writes", e))
    }
}

impl PassVm for KvmBackendVm<KvmPerfVm> {
    fn release(&self, n: u64) {
        self.inner.release(n);
    }

    fn wait_passes(&self, since: u64) -> Result<u64, BackendError> {
        let since = vec![since; self.inner.config().vcpus as usize];
        self.inner.wait_passes(&since).map_err(|e| self.fail("waiting for the passes", e))
    }

    fn cut(&self) -> Option<u64> {
        None
    }

    fn stop(&mut self) -> Result<PassExtras, BackendError> {
        self.inner.stop().map_err(|e| self.fail("stopping the vCPUs", e))?;
        Ok(PassExtras::default())
    }
}
