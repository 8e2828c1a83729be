//! # shadow-mmu testkit
//!
//! What runs VMs and judges them, on top of the engine's public API:
//!
//! - [`workload`]: the guests (`dirty_log_perf_test`'s passes, random and
//!   hot sets) and the cut that orders a collection;
//! - [`oracle`]: the lost-page oracle (`dirty_log_test`): a destination copy
//!   checked at every collection;
//! - [`harness`]: a VM under dirty logging, checked by the oracle (what
//!   `shadow-mmu run` and `stress` do);
//! - [`perf`]: `dirty_log_perf_test`'s migrate-perf, latency probes, the
//!   compare-exchange floor;
//! - [`kernbench`] and [`trace`]: the seed's no-regression check, a sweep or
//!   a replay of a real program's page trace;
//! - [`backend`]: the engine as a `shadow_mmu_vmm::Backend`;
//! - [`fixtures`]: small VMs and guests the tests share.

pub mod backend;
pub mod dirty_log_test;
pub mod fixtures;
pub mod harness;
pub mod kernbench;
pub mod oracle;
pub mod perf;
pub mod trace;
pub mod workload;

// The engine's and the core's modules under the names the testkit's modules
// use.
use shadow_mmu_core::{dirty_bitmap, spte, sync};
use shadow_mmu_engine::{audit, dirty_log, dirty_ring, guest, memory, memslot, mmu, vcpu, vm};
