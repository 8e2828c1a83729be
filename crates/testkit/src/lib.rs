//! # shadow-mmu testkit
//!
//! What runs VMs and judges them, on top of the engine's public API (whose
//! `workload` is the guests, and `backend` and `passes` the engine as a
//! `vmm` backend): test-only; nothing in production depends on it.
//!
//! - [`oracle`]: the lost-page oracle (`dirty_log_test`): a destination copy
//!   checked at every collection;
//! - [`harness`]: a VM under dirty logging, checked by the oracle (what
//!   `shadow-mmu run` and `stress` do);
//! - [`perf`]: `dirty_log_perf_test`'s migrate-perf, latency probes, the
//!   compare-exchange floor;
//! - [`pacer`] and [`resume`]: the pass guest's pace, and its start and
//!   check on either side of a live migration;
//! - [`kernbench`] and [`trace`]: the seed's no-regression check, a sweep or
//!   a replay of a real program's page trace;
//! - [`fixtures`]: small VMs and guests the tests share;
//! - [`credentials`]: throwaway TLS credentials, a CA made at run time.

pub mod credentials;
pub mod dirty_log_test;
pub mod fixtures;
pub mod harness;
pub mod kernbench;
pub mod oracle;
pub mod pacer;
pub mod perf;
pub mod resume;
pub mod trace;
