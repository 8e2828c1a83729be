//! # shadow-mmu engine
//!
//! A user-space reproduction of KVM's x86 shadow MMU and its dirty logging,
//! after the patch series "KVM: MMU: locklessly write-protect" (Xiao
//! Guangrong, 2013). Names follow `arch/x86/kvm/mmu.c` so that the code can
//! be read next to the C.
//!
//! Everything runs for real: guest memory is anonymous host memory
//! ([`memory`]), shadow pages hold real 512-entry tables of atomic sptes
//! (`shadow_page`, `spte`), rmaps are the seed's pte_lists
//! ([`pte_list`](shadow_mmu_core::pte_list)), vCPUs are OS threads with software TLBs that execute guest
//! accesses through the shadow page tables ([`vcpu`]), and dirty logging
//! write-protects and harvests ([`dirty_log`]).
//!
//! The entry point is [`Vm`], shaped after KVM's VM ioctls:
//!
//! ```
//! use shadow_mmu_engine::{GuestOp, HostMemory, MemFlags, Script, UserMemoryRegion, Vm, VmConfig};
//!
//! let vm = Vm::new(VmConfig::default())?;
//! let mem = HostMemory::anonymous(2 << 20)?;
//! vm.set_user_memory_region(UserMemoryRegion {
//!     slot: 0,
//!     flags: MemFlags::LOG_DIRTY_PAGES,
//!     guest_phys_addr: 0,
//!     memory_size: 2 << 20,
//!     memory: Some(mem.clone()),
//!     memory_offset: 0,
//! })?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! vcpu.run(&mut Script::new([GuestOp::Write(0x3008, 42)]))?;
//! let mut bitmap = vec![0u64; 8];
//! assert_eq!(vm.get_dirty_log(0, &mut bitmap)?, 1);
//! assert_eq!(bitmap[0], 1 << 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod audit;
pub mod backend;
pub mod dirty_log;
pub mod dirty_ring;
pub mod guest;
pub(crate) mod harvest;
pub(crate) mod harvest_pool;
pub mod host_access;
pub mod memory;
pub mod memslot;
pub mod mmu;
pub mod notifier_thread;
pub mod page_track;
pub mod passes;
pub(crate) mod shadow_page;
pub mod stats;
pub(crate) mod tdp_mmu;
pub mod vcpu;
pub mod vm;
pub mod workload;

pub use audit::{AuditError, AuditOptions, AuditReport, SpAt, Violation};
pub use backend::{EngineBackend, EngineVm};
pub use dirty_log::{ClearDirtyLogError, DirtyLogError};
pub use dirty_ring::DirtyRingError;
pub use guest::{GuestCode, GuestOp, Script};
pub use memory::{HostMemory, MemoryError};
pub use memslot::{MemFlags, MemslotError, UserMemoryRegion};
pub use mmu::{MmuDesign, UnknownMmuDesign};
pub use page_track::TrackError;
pub use passes::{EnginePassVm, PassesError};
pub use shadow_mmu_core::dirty_bitmap::bitmap_words;
pub use vcpu::{FaultObserver, Vcpu, VcpuError, VcpuExit, VcpuStats};
pub use vm::{VcpuKicker, Vm, VmConfig, VmError, VmStats};
