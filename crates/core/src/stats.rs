//! Counters shared between threads.
//!
//! Every counter is a relaxed atomic: counters are statistics, read after the
//! threads that update them are joined or as approximate live figures; no
//! other memory access is ordered by them.

use std::sync::atomic::{AtomicU64, Ordering};

/// A statistic counter, alone in its cache line: counters that different
/// threads bump (vCPUs, the harvester) must not share a line, or every bump
/// is a cache miss for the others.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Counter(AtomicU64);

impl Counter {
    /// Zero.
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        // Relaxed: a statistic (module docs).
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Raises the value to `n` if it is lower (a running maximum).
    #[inline]
    pub fn max(&self, n: u64) {
        // Relaxed: a statistic (module docs).
        self.0.fetch_max(n, Ordering::Relaxed);
    }

    /// Current value.
    #[inline]
    pub fn get(&self) -> u64 {
        // Relaxed: a statistic (module docs).
        self.0.load(Ordering::Relaxed)
    }
}

/// Reads of poisoned (returned) descriptor or shadow page memory by lockless
/// walkers, process-wide. Only `break-rules` builds poison returned memory;
/// a correct grace period keeps this at 0.
#[cfg(feature = "break-rules")]
pub static POISON_READS: Counter = Counter::new();
