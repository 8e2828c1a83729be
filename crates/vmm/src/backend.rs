//! A way to run dirty-logging VMs ([`Backend`]), and the two kinds of VM it
//! gives: one whose vCPU runs host-chosen stores ([`BackendVm`]), and one
//! whose vCPUs make passes on threads of their own ([`PassVm`]). Tests and
//! tools written against them run unchanged on the engine and on KVM.
//!
//! A VM has one memslot of test memory at guest physical 0. Between calls
//! no vCPU of a [`BackendVm`] runs, so its memory holds still while the
//! host reads it or harvests its log.

use crate::{BackendError, DirtyLog, GuestMemory, HarvestProbe, PassSpec, PassWorkload, VcpuControl};

/// A way to run dirty-logging VMs.
pub trait Backend {
    /// A name for reports ("engine locked", "KVM (manual protect)").
    fn name(&self) -> String;

    /// A VM with `guest_bytes` of test memory at guest physical 0 (dirty
    /// logging off) and one vCPU.
    fn create_vm(&self, guest_bytes: u64) -> Result<Box<dyn BackendVm>, BackendError>;

    /// A VM whose `spec.vcpus` vCPUs make passes over their slices of the
    /// test slot, each on a thread of its own, none released yet.
    fn start_passes(&self, spec: &PassSpec) -> Result<Box<dyn PassVm>, BackendError>;
}

/// Memory and its dirty log: what a harvest needs.
pub trait DirtyLogVm: GuestMemory + DirtyLog {}

impl<T: GuestMemory + DirtyLog + ?Sized> DirtyLogVm for T {}

/// A VM of some backend whose one vCPU runs host-chosen stores.
pub trait BackendVm: GuestMemory + DirtyLog {
    /// Runs the vCPU through these guest stores, in order: 8 bytes of
    /// `value` at byte `offset` of the test slot. Checked first: a refused
    /// list stores nothing.
    fn run_writes(&mut self, writes: &[(u64, u64)]) -> Result<(), BackendError>;

    /// Dirty-ring-full exits so far (the backend harvests and resets at each
    /// one, keeping what it collected for the next `harvest_dirty_ring`).
    fn ring_full_exits(&self) -> u64 {
        0
    }

    /// Large (2 MiB) sptes installed so far, where
    /// [`crate::Capabilities::mmu_figures`].
    fn large_sptes_mapped(&self) -> Option<u64> {
        None
    }
}

/// A VM running passes ([`Backend::start_passes`]): every role.
pub trait PassVm: GuestMemory + DirtyLog + VcpuControl + PassWorkload + HarvestProbe {}

impl<T: GuestMemory + DirtyLog + VcpuControl + PassWorkload + HarvestProbe + ?Sized> PassVm for T {}
