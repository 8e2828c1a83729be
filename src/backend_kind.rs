//! Where a VM runs (`--backend engine|kvm`), and the one place the CLI
//! builds a backend from its choices.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use shadow_mmu_engine::{EngineBackend, VmConfig};
use shadow_mmu_kvm::KvmBackend;
use shadow_mmu_vmm::{Backend, HarvestSpec};

/// Where a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The engine, in the design of `--mmu`.
    Engine,
    /// The machine's KVM (`/dev/kvm`).
    Kvm,
}

impl BackendKind {
    /// Its name, in reports, headers and JSON.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Engine => "engine",
            BackendKind::Kvm => "kvm",
        }
    }

    /// The backend that runs `spec`'s dirty-log interface here. On the
    /// engine, VMs of `engine` (its design and knobs) with the interface's
    /// manual protect and harvest threads; KVM takes the interface alone
    /// (its harvest is one ioctl).
    pub fn backend(self, engine: &VmConfig, spec: &HarvestSpec) -> Box<dyn Backend> {
        match self {
            BackendKind::Engine => Box::new(EngineBackend {
                config: VmConfig {
                    dirty_log_protect: spec.protect(),
                    harvest_threads: spec.harvest_threads,
                    ..engine.clone()
                },
                dirty_ring: spec.ring(),
            }),
            BackendKind::Kvm => Box::new(KvmBackend { protect: spec.protect(), dirty_ring: spec.ring() }),
        }
    }
}
