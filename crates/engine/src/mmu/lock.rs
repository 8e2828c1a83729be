//! `mmu_lock`: the lock the slow page fault path, zapping and (in the locked
//! design) dirty logging take, with accounting of how long it is waited for
//! and held.
//!
//! The lock guards [`MmuLocked`] (the shadow page hash, the active list and
//! the page budget). Shadow page tables, rmaps and shadow page headers are
//! atomics outside it, but their *writers* all hold it: holding an
//! [`MmuGuard`] is the proof the pte_list writer functions ask for.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard};

use super::MmuLocked;
use crate::stats::Counter;

/// Accounting of `mmu_lock`.
#[derive(Debug, Default)]
pub struct LockStats {
    /// Times the lock was taken.
    pub acquisitions: Counter,
    /// Times a taker found it held and had to wait.
    pub contended: Counter,
    /// Total nanoseconds spent waiting for it.
    pub wait_ns: Counter,
    /// Total nanoseconds it was held.
    pub hold_ns: Counter,
    /// The longest single hold, ns.
    pub max_hold_ns: Counter,
}

/// `kvm->mmu_lock`.
pub(crate) struct MmuLock {
    mutex: Mutex<MmuLocked>,
    /// Threads blocked in `lock` (for `spin_needbreak`).
    waiters: AtomicU32,
    pub(crate) stats: LockStats,
}

impl MmuLock {
    pub(crate) fn new(state: MmuLocked) -> Self {
        Self { mutex: Mutex::new(state), waiters: AtomicU32::new(0), stats: LockStats::default() }
    }

    /// `spin_lock(&kvm->mmu_lock)`.
    pub(crate) fn lock(&self) -> MmuGuard<'_> {
        let guard = match self.mutex.try_lock() {
            Some(g) => g,
            None => {
                let t0 = Instant::now();
                // Relaxed: a hint for `needbreak`; the mutex orders everything
                // that matters.
                self.waiters.fetch_add(1, Ordering::Relaxed);
                let g = self.mutex.lock();
                self.waiters.fetch_sub(1, Ordering::Relaxed);
                self.stats.contended.inc();
                self.stats.wait_ns.add(t0.elapsed().as_nanos() as u64);
                g
            }
        };
        self.stats.acquisitions.inc();
        shadow_mmu_core::lockdep::set_holds_mmu_lock(true);
        MmuGuard { guard, lock: self, since: Instant::now() }
    }
}

/// A held `mmu_lock`.
pub(crate) struct MmuGuard<'a> {
    guard: MutexGuard<'a, MmuLocked>,
    lock: &'a MmuLock,
    since: Instant,
}

impl MmuGuard<'_> {
    /// `spin_needbreak`: is another thread waiting for the lock?
    pub(crate) fn needbreak(&self) -> bool {
        // Relaxed: a hint (see `MmuLock::waiters`).
        self.lock.waiters.load(Ordering::Relaxed) > 0
    }

    /// `cond_resched_lock`: lets waiters take the lock, then takes it back.
    pub(crate) fn cond_resched(&mut self) {
        self.account_hold();
        MutexGuard::bump(&mut self.guard);
        self.since = Instant::now();
    }
}

// SAFETY: shadow pages leave the tables and go back to the pool only under
// `mmu_lock`, so no other thread frees one while we hold it; and we free one
// only in `kvm_mmu_commit_zap_page` and `kvm_mmu_free_page`, which take the
// guard mutably, so every reference bound to a shared borrow of the guard
// has ended before (shadow_page.rs, `PinsShadowPages`). `cond_resched`,
// which lets others in, also takes the guard mutably.
unsafe impl crate::shadow_page::PinsShadowPages for MmuGuard<'_> {}

// SAFETY: an `MmuLocked` is reached only through a held `MmuGuard` (it lives
// in the lock's mutex from `Mmu::new` on, and no page exists before), so a
// borrow of it is a borrow of the guard, with the guard's argument above.
unsafe impl crate::shadow_page::PinsShadowPages for MmuLocked {}

impl Deref for MmuGuard<'_> {
    type Target = MmuLocked;
    fn deref(&self) -> &MmuLocked {
        &self.guard
    }
}

impl DerefMut for MmuGuard<'_> {
    fn deref_mut(&mut self) -> &mut MmuLocked {
        &mut self.guard
    }
}

impl MmuGuard<'_> {
    fn account_hold(&self) {
        let ns = self.since.elapsed().as_nanos() as u64;
        self.lock.stats.hold_ns.add(ns);
        self.lock.stats.max_hold_ns.max(ns);
        shadow_mmu_core::lockdep::add_mmu_lock_hold(ns);
    }
}

impl Drop for MmuGuard<'_> {
    fn drop(&mut self) {
        shadow_mmu_core::lockdep::set_holds_mmu_lock(false);
        self.account_hold();
    }
}
