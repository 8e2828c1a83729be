//! # shadow-mmu live migration
//!
//! Pre-copy live migration of a VM over TCP between two processes, driven
//! through the testkit's `Backend` trait so that the driver never knows
//! which backend it drives (issue 12). This crate holds, so far, the wire
//! format: [`stream`], a versioned sequence of length-prefixed,
//! checksummed frames that a hostile peer cannot make us allocate beyond
//! [`stream::MAX_FRAME_BYTES`] for; and [`ranges`], what a round sends of a
//! harvest (runs of pages, zero pages as a flag, digests).

pub mod ranges;
pub mod stream;
