//! # shadow-mmu vmm
//!
//! The interface between a VM that logs dirty pages and what drives it: a
//! live migration, a benchmark, a test. The software engine
//! (`shadow-mmu-engine`) and the backend over the machine's `/dev/kvm`
//! (`shadow-mmu-kvm`) both implement it, so that whatever is written
//! against it runs on both and its figures and bitmaps can be compared
//! with the real thing.
//!
//! Role traits, after rust-vmm's vm-memory split between access and
//! management, so that each user names only what it uses:
//!
//! - [`GuestMemory`]: the test slot's pages, read and written by the host,
//!   and a view of them;
//! - [`DirtyLog`]: what the VM can log ([`Capabilities`]), logging on and
//!   off, `KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG`, the dirty ring;
//! - [`VcpuControl`]: the vCPUs' [`VcpuGate`] (pause, hold, save and
//!   restore of their state) and their stop;
//! - [`PassWorkload`]: `dirty_log_perf_test`'s guest, passes released by
//!   the host;
//! - [`HarvestProbe`]: the vCPUs' fault latency during harvests, as a
//!   [`LatencySummary`].
//!
//! [`PassVm`] is all five, what [`Backend::start_passes`] gives;
//! [`BackendVm`] is a VM whose one vCPU runs host-chosen stores, what
//! [`Backend::create_vm`] gives. Beside them: the harvest spec
//! ([`interface`]), one harvest by whatever interface a VM has
//! ([`harvest`], [`timed_harvest`]), and typed errors.
//!
//! This crate depends on the core only (the pause handshake is the core's
//! `pause::PauseProtocol`).

pub mod backend;
pub mod dirty_log;
pub mod dirty_pace;
pub mod error;
pub mod interface;
pub mod memory;
pub mod passes;
pub mod probe;
pub mod vcpu;
pub mod vcpu_gate;

pub use backend::{Backend, BackendVm, DirtyLogVm, PassVm};
pub use dirty_log::{Capabilities, DirtyLog, DirtyLogProtect, RingState, harvest, timed_harvest};
pub use dirty_pace::{
    ChunkPacer, DirtyPace, GuestCount, PACE_CHUNK_PAGES, ReachedRate, RingFullLimit, chunk_bytes,
};
pub use error::{BackendError, VcpuStateError, error_chain};
pub use interface::{DirtyLogInterface, HarvestSpec, RingEntries};
pub use memory::{GuestAccessError, GuestMemory, check_guest_access};
pub use passes::{
    HarvestWindow, LockFaults, PassExtras, PassSpec, PassWorkload, ProgressTrace, is_compute_vcpu,
};
pub use probe::{HarvestProbe, LatencySummary, VcpuLoss};
pub use vcpu::{VcpuControl, check_vcpu_states};
pub use vcpu_gate::{PauseTimeout, VcpuGate};
