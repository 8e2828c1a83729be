//! The atomics the lock-free parts of the engine use, swapped for loom's under
//! `cfg(loom)` (run `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`).
//!
//! Only the structures that lockless readers share go through this module:
//! sptes, pte_list heads and descriptors, dirty bitmap words and the vCPU
//! mode and request words. Guest memory itself is always std atomics: it is
//! the host's memory, not a structure whose interleavings we model.

#[cfg(loom)]
pub(crate) use loom::sync::atomic;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic;
