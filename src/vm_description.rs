//! The VM a migration moves, as the stream's header describes it (JSON in
//! `Header::config`): what the destination needs to build the same VM, on
//! the same backend, with the same guest.

use serde::{Deserialize, Serialize};
use shadow_mmu_engine::{MmuDesign, UnknownMmuDesign, VmConfig};
use shadow_mmu_migrate::stream::{Header, SlotLayout};
use shadow_mmu_vmm::interface::{BadHarvestSpec, UnknownInterface};
use shadow_mmu_vmm::{Backend, BackendError, DirtyLogInterface, HarvestSpec, LockFaults, PassSpec, PassVm};
use thiserror::Error;

use crate::backend_kind::BackendKind;

/// Why a description cannot be built.
#[derive(Debug, Error)]
pub enum DescriptionError {
    /// A dirty-log interface this build does not have.
    #[error(transparent)]
    Interface(#[from] UnknownInterface),
    /// A harvest spec that cannot run.
    #[error(transparent)]
    Spec(#[from] BadHarvestSpec),
    /// An MMU design this build does not have.
    #[error("--mmu {mmu}")]
    Mmu {
        /// The design named.
        mmu: String,
        /// Why not.
        #[source]
        source: UnknownMmuDesign,
    },
    /// The backend refused the VM or its passes.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// The VM, as the stream's header carries it (JSON in `Header::config`):
/// what the destination needs to build the same VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// Where it runs.
    pub backend: BackendKind,
    /// The engine's design.
    pub mmu: String,
    /// The engine's `fast_page_fault`.
    pub fast_page_fault: bool,
    /// The `tdp` design's eager page splitting (absent in streams written
    /// before it existed: on, the default).
    #[serde(default = "eager_split_default")]
    pub eager_page_split: bool,
    /// The `tdp` design's PML (absent in older streams: off).
    #[serde(default)]
    pub pml: bool,
    /// The dirty-log interface.
    pub dirty_log: String,
    /// `KVM_DIRTY_LOG_INITIALLY_SET`.
    pub initially_set: bool,
    /// Ring entries per vCPU.
    pub ring_entries: u32,
    /// Harvest threads.
    pub harvest_threads: u32,
    /// CLEAR window, pages.
    pub clear_chunk_pages: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest bytes.
    pub guest_bytes: u64,
    /// Random pages rather than a sweep.
    pub random: bool,
    /// Stores, percent.
    pub write_pct: u8,
    /// The workload's seed.
    pub seed: u64,
    /// The dirty-rate cap, bytes a second.
    pub dirty_rate: Option<u64>,
    /// The workload's lock faults (absent in older streams: none).
    #[serde(flatten, with = "LockFaultsDef")]
    pub lock_faults: LockFaults,
    /// vCPUs that only compute (load), the last ones (absent in older
    /// streams: none).
    #[serde(default)]
    pub compute_vcpus: u32,
}

/// `LockFaults` in the header, with the names its fields have had there
/// since streams first carried them.
#[derive(Serialize, Deserialize)]
#[serde(remote = "LockFaults")]
struct LockFaultsDef {
    #[serde(rename = "fresh_faults", default)]
    fresh_per_sec: u32,
    #[serde(rename = "split_faults", default)]
    split_per_sec: u32,
    #[serde(rename = "invalidations", default)]
    invalidations_per_sec: u32,
}

fn eager_split_default() -> bool {
    true
}

impl VmDescription {
    /// The harvest spec it asks for, checked.
    fn harvest(&self) -> Result<HarvestSpec, DescriptionError> {
        let interface: DirtyLogInterface = self.dirty_log.parse()?;
        let spec = HarvestSpec {
            interface,
            clear_chunk_pages: self.clear_chunk_pages,
            initially_set: self.initially_set && interface == DirtyLogInterface::Clear,
            ring_entries: self.ring_entries,
            harvest_threads: self.harvest_threads,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The backend that builds it.
    fn backend(&self) -> Result<Box<dyn Backend>, DescriptionError> {
        let spec = self.harvest()?;
        let mmu: MmuDesign =
            self.mmu.parse().map_err(|source| DescriptionError::Mmu { mmu: self.mmu.clone(), source })?;
        let engine = VmConfig {
            mmu,
            fast_page_fault: self.fast_page_fault,
            eager_page_split: self.eager_page_split,
            pml: self.pml,
            ..VmConfig::default()
        };
        Ok(self.backend.backend(&engine, &spec))
    }

    fn pass_spec(&self, lazy_memory: bool) -> PassSpec {
        PassSpec {
            vcpus: self.vcpus,
            guest_bytes: self.guest_bytes,
            write_pct: self.write_pct,
            random: self.random,
            seed: self.seed,
            dirty_pages: None,
            lock_faults: self.lock_faults,
            lazy_memory,
            compute_vcpus: self.compute_vcpus,
            progress_samples: false,
        }
    }

    /// Builds and starts the VM, vCPUs waiting for their first release.
    pub fn start(&self) -> Result<Box<dyn PassVm>, DescriptionError> {
        Ok(self.backend()?.start_passes(&self.pass_spec(false))?)
    }

    /// Builds and starts the VM a migration's destination loads: its memory
    /// mapped lazily (the stream fills it; populating it first made the
    /// destination take 0.4 to 2.8 s per GiB before it said `Ready`).
    pub fn start_destination(&self) -> Result<Box<dyn PassVm>, DescriptionError> {
        Ok(self.backend()?.start_passes(&self.pass_spec(true))?)
    }

    /// Builds the VM and boots it: a first pass, so that every page holds
    /// data.
    pub fn boot(&self) -> Result<Box<dyn PassVm>, DescriptionError> {
        let vm = self.start()?;
        vm.release(1);
        vm.wait_passes(0)?;
        Ok(vm)
    }

    /// The stream's header for `vm`, built from this description.
    pub fn header(&self, vm: &dyn PassVm) -> Result<Header, serde_json::Error> {
        let slots = vec![SlotLayout { id: 0, guest_phys_addr: 0, pages: vm.pages() }];
        Ok(Header::new(self.backend.name().into(), serde_json::to_string(self)?, slots))
    }

    /// Bytes a pass of the guest stores to (one 8-byte store per page of
    /// `write_pct`% of them; a page dirtied counts 4 KiB).
    pub fn pass_bytes(&self) -> f64 {
        self.guest_bytes as f64 * f64::from(self.write_pct) / 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn description(lock_faults: LockFaults) -> VmDescription {
        VmDescription {
            backend: BackendKind::Engine,
            mmu: "lockless".into(),
            fast_page_fault: true,
            eager_page_split: true,
            pml: false,
            dirty_log: "get".into(),
            initially_set: false,
            ring_entries: 0,
            harvest_threads: 1,
            clear_chunk_pages: 4096,
            vcpus: 2,
            guest_bytes: 1 << 30,
            random: false,
            write_pct: 100,
            seed: 1,
            dirty_rate: None,
            lock_faults,
            compute_vcpus: 0,
        }
    }

    /// The lock faults keep the names streams have carried them under, and
    /// a stream from before them reads as none.
    #[test]
    fn lock_faults_keep_their_names_in_the_header() {
        let lock = LockFaults { fresh_per_sec: 1, split_per_sec: 2, invalidations_per_sec: 3 };
        let json = serde_json::to_value(description(lock)).unwrap();
        assert_eq!((json["fresh_faults"].as_u64(), json["split_faults"].as_u64()), (Some(1), Some(2)));
        assert_eq!(json["invalidations"].as_u64(), Some(3));
        let back: VmDescription = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, description(lock));
        let mut older = json;
        for k in ["fresh_faults", "split_faults", "invalidations"] {
            older.as_object_mut().unwrap().remove(k);
        }
        let back: VmDescription = serde_json::from_value(older).unwrap();
        assert_eq!(back.lock_faults, LockFaults::default());
    }
}
