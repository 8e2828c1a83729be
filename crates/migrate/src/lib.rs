//! # shadow-mmu live migration
//!
//! Pre-copy live migration of a VM over TCP between two processes, driven
//! through the testkit's [`PassVm`](shadow_mmu_testkit::backend::PassVm)
//! so that neither end knows which backend it drives:
//!
//! - [`stream`]: the wire format, a versioned sequence of length-prefixed,
//!   checksummed frames that a hostile peer cannot make us allocate beyond
//!   [`stream::MAX_FRAME_BYTES`] for;
//! - [`ranges`]: what a round sends of a harvest (runs of pages, zero pages
//!   as a flag) and the page digests of the final check;
//! - [`source`]: pre-copy with QEMU's convergence rule, the timeout, the
//!   stop-and-copy;
//! - [`dest`]: the destination, which loads, checks, resumes and checks
//!   again;
//! - [`pacer`]: the guest's dirty rate, and QEMU's auto-converge throttle;
//! - [`stats`]: QEMU's `info migrate` figures.

pub mod dest;
pub mod pacer;
pub mod ranges;
pub mod source;
pub mod stats;
pub mod stream;
