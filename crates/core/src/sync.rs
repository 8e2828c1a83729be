//! The atomics the lock-free parts of the engine use, swapped for loom's under
//! `cfg(loom)` (see the README for the loom commands).
//!
//! Only the structures that lockless readers share go through this module:
//! sptes, pte_list heads and descriptors, dirty bitmap words, the grace
//! period's epoch and slots, and the vCPU mode and request words. Guest memory
//! itself is always std atomics: it is the host's memory, not a structure
//! whose interleavings we model.

#[cfg(loom)]
pub use loom::sync::atomic;

#[cfg(not(loom))]
pub use std::sync::atomic;

/// Waiting for another thread: crossbeam's exponential backoff, or, under
/// loom, a yield to loom's scheduler (a spin loop would never let the other
/// thread run).
#[derive(Debug, Default)]
pub struct Backoff {
    #[cfg(not(loom))]
    inner: crossbeam_utils::Backoff,
}

impl Backoff {
    /// A fresh backoff.
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    /// Waits a little, longer each time.
    pub fn snooze(&self) {
        #[cfg(not(loom))]
        self.inner.snooze();
        #[cfg(loom)]
        loom::thread::yield_now();
    }
}

/// One turn of a wait for another thread's progress that has no backoff
/// state (a lockless walker restarting on a descriptor that is being
/// initialised): a spin hint, or, under loom, a yield to its scheduler.
#[inline]
pub fn spin_loop() {
    #[cfg(not(loom))]
    std::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}
