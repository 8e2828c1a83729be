//! `mmu_lock`: the lock the slow page fault path, zapping and (in the locked
//! design) dirty logging take, with accounting of how long it is waited for
//! and held, for read and for write apart.
//!
//! It is an rwlock, as x86's has been since 5.12 ("KVM: x86/mmu: Use an
//! rwlock for the x86 MMU"). The shadow MMU designs take it only for write
//! ([`MmuLock::lock`]): there it is the spinlock of 3.11, and a write hold
//! excludes everybody as a spinlock would. The TDP design also takes it for
//! read ([`MmuLock::read`]): its vCPU faults, enable-logging's write
//! protection and eager split run side by side, each spte changed by
//! compare-exchange (`tdp_mmu`).
//!
//! The lock guards [`MmuLocked`] (the shadow page hash, the active list and
//! the page budget). Shadow page tables, rmaps and shadow page headers are
//! atomics outside it, but their *writers* all hold it: holding an
//! [`MmuGuard`] is the proof the pte_list writer functions ask for.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::MmuLocked;
use crate::stats::Counter;

/// Accounting of one mode of `mmu_lock`.
#[derive(Debug, Default)]
pub struct LockStats {
    /// Times the lock was taken.
    pub acquisitions: Counter,
    /// Times a taker found it held and had to wait.
    pub contended: Counter,
    /// Total nanoseconds spent waiting for it.
    pub wait_ns: Counter,
    /// Total nanoseconds it was held (summed over concurrent readers).
    pub hold_ns: Counter,
    /// The longest single hold, ns.
    pub max_hold_ns: Counter,
}

impl LockStats {
    /// Accounts a wait that began at `t0`; returns its length, ns.
    fn account_wait(&self, t0: Instant) -> u64 {
        let ns = t0.elapsed().as_nanos() as u64;
        self.contended.inc();
        self.wait_ns.add(ns);
        ns
    }

    fn account_hold(&self, since: Instant) {
        let ns = since.elapsed().as_nanos() as u64;
        self.hold_ns.add(ns);
        self.max_hold_ns.max(ns);
        shadow_mmu_core::lockdep::add_mmu_lock_hold(ns);
    }
}

/// `kvm->mmu_lock`.
pub(crate) struct MmuLock {
    rwlock: RwLock<MmuLocked>,
    /// Threads blocked in `lock` or `read` (for `rwlock_needbreak`).
    waiters: AtomicU32,
    /// Harvest walks under way that take the lock (`harvest.rs`): a wait
    /// that begins while one is counts as behind a harvest.
    harvesting: AtomicU32,
    /// Write holds (every hold, in the shadow MMU designs).
    pub(crate) stats: LockStats,
    /// Read holds (the TDP design's).
    pub(crate) read_stats: LockStats,
}

impl MmuLock {
    pub(crate) fn new(state: MmuLocked) -> Self {
        Self {
            rwlock: RwLock::new(state),
            waiters: AtomicU32::new(0),
            harvesting: AtomicU32::new(0),
            stats: LockStats::default(),
            read_stats: LockStats::default(),
        }
    }

    /// Blocks in `take` (for write or read), counted as a waiter for
    /// `needbreak`, and the wait accounted to the lock and to this thread.
    fn wait<G>(&self, write: bool, take: impl FnOnce() -> G) -> G {
        let t0 = Instant::now();
        // Relaxed: a hint for `needbreak`; the lock orders everything that
        // matters.
        self.waiters.fetch_add(1, Ordering::Relaxed);
        // Relaxed: a classification for statistics.
        let behind_harvest = self.harvesting.load(Ordering::Relaxed) > 0;
        let g = take();
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        let ns = if write { &self.stats } else { &self.read_stats }.account_wait(t0);
        shadow_mmu_core::lockdep::add_mmu_lock_wait(write, ns, behind_harvest);
        g
    }

    /// Runs `f`, a harvest walk that takes the lock, counted as harvesting:
    /// the waits that begin meanwhile are the harvest's doing.
    pub(crate) fn harvesting<R>(&self, f: impl FnOnce() -> R) -> R {
        // Relaxed: a classification for statistics (`wait`).
        self.harvesting.fetch_add(1, Ordering::Relaxed);
        let r = f();
        self.harvesting.fetch_sub(1, Ordering::Relaxed);
        r
    }

    /// `write_lock(&kvm->mmu_lock)` (`spin_lock` in the 3.11 designs).
    pub(crate) fn lock(&self) -> MmuGuard<'_> {
        let guard = match self.rwlock.try_write() {
            Some(g) => g,
            None => self.wait(true, || self.rwlock.write()),
        };
        self.stats.acquisitions.inc();
        shadow_mmu_core::lockdep::set_holds_mmu_lock(true);
        shadow_mmu_core::lockdep::count_mmu_lock(true);
        MmuGuard { guard, lock: self, since: Instant::now() }
    }

    /// `read_lock(&kvm->mmu_lock)`: the TDP design's faults, enable-logging
    /// and eager split.
    pub(crate) fn read(&self) -> MmuReadGuard<'_> {
        MmuReadGuard { guard: Some(self.take_read()), lock: self, since: Instant::now() }
    }

    /// Takes the lock for read, counted (wait, acquisition, lockdep).
    fn take_read(&self) -> RwLockReadGuard<'_, MmuLocked> {
        let guard = match self.rwlock.try_read() {
            Some(g) => g,
            None => self.wait(false, || self.rwlock.read()),
        };
        self.read_stats.acquisitions.inc();
        shadow_mmu_core::lockdep::set_holds_mmu_lock(true);
        shadow_mmu_core::lockdep::count_mmu_lock(false);
        guard
    }

    /// `rwlock_needbreak`: is another thread waiting for the lock?
    fn needbreak(&self) -> bool {
        // Relaxed: a hint (see `MmuLock::waiters`).
        self.waiters.load(Ordering::Relaxed) > 0
    }
}

/// A held `mmu_lock`, for write.
pub(crate) struct MmuGuard<'a> {
    guard: RwLockWriteGuard<'a, MmuLocked>,
    lock: &'a MmuLock,
    since: Instant,
}

impl MmuGuard<'_> {
    /// `spin_needbreak` / `rwlock_needbreak`: is another thread waiting for
    /// the lock?
    pub(crate) fn needbreak(&self) -> bool {
        self.lock.needbreak()
    }

    /// `cond_resched_lock`: lets waiters take the lock, then takes it back.
    pub(crate) fn cond_resched(&mut self) {
        self.lock.stats.account_hold(self.since);
        RwLockWriteGuard::bump(&mut self.guard);
        self.since = Instant::now();
    }

    /// Drops the lock for `f` (an allocation: nothing is allocated under
    /// `mmu_lock`), then takes it back.
    pub(crate) fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        self.lock.stats.account_hold(self.since);
        shadow_mmu_core::lockdep::set_holds_mmu_lock(false);
        let r = RwLockWriteGuard::unlocked(&mut self.guard, f);
        shadow_mmu_core::lockdep::set_holds_mmu_lock(true);
        shadow_mmu_core::lockdep::count_mmu_lock(true);
        self.lock.stats.acquisitions.inc();
        self.since = Instant::now();
        r
    }
}

// SAFETY: shadow pages leave the tables and go back to the pool only under
// `mmu_lock`, so no other thread frees one while we hold it; and we free one
// only in `kvm_mmu_commit_zap_page` and `kvm_mmu_free_page`, which take the
// guard mutably, so every reference bound to a shared borrow of the guard
// has ended before (shadow_page.rs, `PinsShadowPages`). `cond_resched` and
// `unlocked`, which let others in, also take the guard mutably. The TDP
// design's tables go back to the pool only after a grace period of the
// VM's `rcu` that began after they were unlinked (`tdp_mmu::rcu_free`), and
// under the write lock no thread unlinks a table but the holder.
unsafe impl crate::shadow_page::PinsShadowPages for MmuGuard<'_> {}

// SAFETY: an `MmuLocked` is reached only through a held `MmuGuard` (it lives
// in the lock's rwlock from `Mmu::new` on, and no page exists before), so a
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

impl Drop for MmuGuard<'_> {
    fn drop(&mut self) {
        shadow_mmu_core::lockdep::set_holds_mmu_lock(false);
        self.lock.stats.account_hold(self.since);
    }
}

/// A held `mmu_lock`, for read. It gives no access to [`MmuLocked`]: only
/// the TDP MMU takes it, and its state is atomics (sptes, roots).
pub(crate) struct MmuReadGuard<'a> {
    /// `None` only inside `unlocked`.
    guard: Option<RwLockReadGuard<'a, MmuLocked>>,
    lock: &'a MmuLock,
    since: Instant,
}

impl MmuReadGuard<'_> {
    /// `rwlock_needbreak`.
    pub(crate) fn needbreak(&self) -> bool {
        self.lock.needbreak()
    }

    /// Drops the lock for `f` (an allocation), then takes it back.
    pub(crate) fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        self.lock.read_stats.account_hold(self.since);
        shadow_mmu_core::lockdep::set_holds_mmu_lock(false);
        drop(self.guard.take());
        let r = f();
        self.guard = Some(self.lock.take_read());
        self.since = Instant::now();
        r
    }
}

impl Drop for MmuReadGuard<'_> {
    fn drop(&mut self) {
        shadow_mmu_core::lockdep::set_holds_mmu_lock(false);
        self.lock.read_stats.account_hold(self.since);
    }
}
