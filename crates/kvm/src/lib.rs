//! # shadow-mmu on real KVM
//!
//! The shadow-mmu dirty-logging workloads run on the machine's own KVM,
//! through `/dev/kvm` (with `kvm-ioctls`, `kvm-bindings` and
//! `vmm-sys-util`), as a reference for the engine's dirty-log semantics and
//! harvest cost:
//!
//! - [`probe`](mod@probe): is `/dev/kvm` usable, which flavour (PVM, VMX, SVM), are
//!   guests executed by the CPU or by KVM's instruction emulator, which
//!   dirty-log capabilities;
//! - [`vm`]: a VM with a code/control slot and a test slot that can log
//!   dirty pages (`KVM_MEM_LOG_DIRTY_PAGES`), `KVM_GET_DIRTY_LOG` and
//!   `KVM_CLEAR_DIRTY_LOG` into caller-owned bitmaps;
//! - [`ioctls`]: the dirty-log ioctls `kvm-ioctls` does not wrap;
//! - [`guest`]: guest code generated at run time (hand-encoded x86);
//! - [`perf`]: the vCPU threads of `migrate-perf` as `dirty_log_perf_test`
//!   runs them, one per vCPU, exiting to the host at pass boundaries;
//! - [`script`]: a vCPU that executes host-chosen writes, for differential
//!   tests against the engine;
//! - [`backend`]: KVM as a testkit `Backend`, the interface the engine also
//!   implements.
//!
//! ```no_run
//! let p = shadow_mmu_kvm::probe();
//! println!("{p}");
//! if p.is_usable() {
//!     let protect = shadow_mmu_vmm::DirtyLogProtect::Auto;
//!     let mut vm = shadow_mmu_kvm::KvmScriptVm::new(2 << 20, protect)?;
//!     vm.enable_dirty_logging()?;
//!     vm.run_writes(&[(0x3008, 42)])?;
//!     let mut bitmap = vec![0u64; 8];
//!     assert_eq!(vm.get_dirty_log(&mut bitmap)?, 1);
//!     assert_eq!(bitmap[0], 1 << 3);
//! }
//! # Ok::<(), shadow_mmu_kvm::KvmError>(())
//! ```

mod asm;
pub mod backend;
pub mod delay;
pub mod error;
pub mod guest;
pub mod ioctls;
pub mod perf;
pub mod probe;
pub mod ring;
pub mod script;
pub mod vm;

pub use backend::KvmBackend;
pub use error::{BadConfig, KvmError, Unavailable, UnexpectedExit};
pub use perf::{KvmPerfConfig, KvmPerfVm};
pub use probe::{Capabilities, Execution, Flavour, Probe, REQUIRE_KVM, probe, probed, usable_or_skip};
pub use script::KvmScriptVm;
pub use vm::{KvmVm, VmSetup, bitmap_words};
