//! Grace periods: our small RCU, an epoch scheme.
//!
//! # Design notes
//!
//! The seed protects lockless rmap walkers with `rcu_read_lock()`, and frees
//! pte_list descriptors and shadow pages with `SLAB_DESTROY_BY_RCU` and
//! `call_rcu`. We need the same two things, plus what the review asked for:
//! a bound on what waits for a grace period (Marcelo's objection to
//! unbounded `call_rcu`), which means the freeing side must be able to *wait*
//! for a grace period (`synchronize_rcu`). crossbeam-epoch defers, but it
//! cannot wait; so this module is ours, and small.
//!
//! - A global epoch counter, starting at 1.
//! - A fixed array of reader slots. A reader claims a slot, stores the epoch
//!   it saw into it, and issues a SeqCst fence ([`Rcu::read_lock`]). It
//!   stores 0 when it is done ([`ReadGuard`]'s drop).
//! - [`Rcu::synchronize`]: a SeqCst fence, bump the epoch to `target`, then
//!   wait until every slot holds 0 or an epoch >= `target`.
//! - [`Rcu::poll`]: the same test without waiting, for "has a grace period
//!   passed since `tag`?".
//!
//! # Why it is correct
//!
//! The updater unlinks an object (a store), then fences (SeqCst). A reader
//! stores its epoch, then fences (SeqCst), then loads pointers. The two
//! fences are ordered one way or the other:
//! - updater's fence first: the reader's loads, after its fence, see the
//!   unlink, so it cannot reach the object;
//! - reader's fence first: the updater's slot loads, after its fence, see the
//!   reader's epoch (or a later value of the slot), which is below `target`,
//!   so the updater waits until the slot changes, i.e. the reader is done
//!   (0, a release store that publishes everything the reader did with the
//!   object) or has started a new section (an epoch >= `target`, read from our
//!   bump or later, so that section's fence comes after ours and the first
//!   case applies to it).
//!
//! A slot may hold a stale epoch if the reader was preempted between loading
//! the epoch and storing it: that only makes updaters wait longer.

use std::time::Instant;

use crossbeam_utils::CachePadded;

use crate::stats::Counter;
use crate::sync::Backoff;
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};

/// Default number of reader slots per VM: concurrent read-side sections.
pub const DEFAULT_READER_SLOTS: usize = 64;

#[derive(Debug)]
struct Slot {
    claimed: AtomicBool,
    /// 0: not in a read-side section; else the epoch seen at entry.
    epoch: AtomicU64,
}

/// A grace period domain (one per VM).
#[derive(Debug)]
pub struct Rcu {
    epoch: CachePadded<AtomicU64>,
    slots: Box<[CachePadded<Slot>]>,
    /// Grace periods waited for by `synchronize`.
    pub synchronize_calls: Counter,
    /// Nanoseconds spent in `synchronize`.
    pub synchronize_ns: Counter,
}

impl Default for Rcu {
    fn default() -> Self {
        Self::new(DEFAULT_READER_SLOTS)
    }
}

/// A read-side critical section (`rcu_read_lock` .. `rcu_read_unlock`).
#[derive(Debug)]
pub struct ReadGuard<'a> {
    rcu: &'a Rcu,
    slot: usize,
}

/// Proof that memory a type-stable pool takes back from now on stays
/// allocated for as long as the proof is borrowed. Lockless walks take one
/// and hand out references bound to its borrow, as crossbeam-epoch's
/// `load(&'g Guard)` does; a [`ReadGuard::quiesce`] (which borrows the guard
/// mutably) therefore cannot happen while such a reference is alive.
///
/// # Safety
/// An implementor guarantees the above for the pools of its domain.
pub unsafe trait ReadSection {}

// SAFETY: while a `ReadGuard` lives, its slot holds the epoch it entered at
// (or a later one, after `quiesce`, which needs `&mut self`); a pool returns
// memory only after a grace period that began after the object was handed
// back, and `synchronize` waits for every slot that holds an older epoch
// (module docs).
unsafe impl ReadSection for ReadGuard<'_> {}

/// A section over memory that is never returned while the value lives (loom
/// models, benchmarks, tests whose structures outlive every walk): crossbeam's
/// `unprotected()`.
#[derive(Debug)]
pub struct NeverReturned(());

impl NeverReturned {
    /// # Safety
    /// No memory that a walk given this value may reach is returned to the
    /// system while the value lives.
    pub const unsafe fn new() -> Self {
        Self(())
    }
}

// SAFETY: by `NeverReturned::new`'s contract.
unsafe impl ReadSection for NeverReturned {}

impl Rcu {
    /// A domain with room for `readers` concurrent read-side sections.
    pub fn new(readers: usize) -> Self {
        Self {
            epoch: CachePadded::new(AtomicU64::new(1)),
            slots: (0..readers.max(1))
                .map(|_| CachePadded::new(Slot { claimed: AtomicBool::new(false), epoch: AtomicU64::new(0) }))
                .collect(),
            synchronize_calls: Counter::default(),
            synchronize_ns: Counter::default(),
        }
    }

    /// `rcu_read_lock`: enters a read-side section. Objects unlinked and
    /// handed to this domain after the fence below are not freed until the
    /// guard is dropped. Waits for a free slot if all are taken.
    #[inline]
    pub fn read_lock(&self) -> ReadGuard<'_> {
        let n = self.slots.len();
        let start = thread_hint() % n;
        let backoff = Backoff::new();
        loop {
            for k in 0..n {
                let i = (start + k) % n;
                let s = &self.slots[i];
                // Acquire: pairs with the release in `ReadGuard::drop`, so the
                // previous owner is done with the slot.
                if !s.claimed.load(Ordering::Relaxed) && !s.claimed.swap(true, Ordering::Acquire) {
                    // SeqCst: reading the epoch an updater bumped (SeqCst) places
                    // this section after that updater's fence (module docs).
                    let e = self.epoch.load(Ordering::SeqCst);
                    // Relaxed: published by the fence that follows.
                    s.epoch.store(e, Ordering::Relaxed);
                    // SeqCst fence: the reader's half of the module docs'
                    // argument; pairs with the fence in `synchronize`/`poll`.
                    fence(Ordering::SeqCst);
                    return ReadGuard { rcu: self, slot: i };
                }
            }
            backoff.snooze();
        }
    }

    /// The current epoch, read after a SeqCst fence: objects unlinked before
    /// this call are safe to free once [`Rcu::poll`] returns true for the
    /// returned tag.
    pub fn tag(&self) -> u64 {
        // SeqCst fence: the updater's half of the module docs' argument for
        // everything it unlinked before.
        fence(Ordering::SeqCst);
        self.epoch.load(Ordering::SeqCst)
    }

    /// Has a grace period passed since `tag` was taken? Does not wait; bumps
    /// the epoch so that sections starting from now on do not hold it up.
    pub fn poll(&self, tag: u64) -> bool {
        let target = tag + 1;
        // SeqCst RMW: new readers see `target` or later (module docs).
        let _ = self.epoch.fetch_max(target, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.slots.iter().all(|s| {
            // Acquire: pairs with the reader's release store of 0.
            let e = s.epoch.load(Ordering::Acquire);
            e == 0 || e >= target
        })
    }

    /// `synchronize_rcu`: returns once every read-side section that began
    /// before the call has ended.
    pub fn synchronize(&self) {
        let t0 = Instant::now();
        // SeqCst fence and RMW: the updater's half of the module docs.
        fence(Ordering::SeqCst);
        let target = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        for s in self.slots.iter() {
            let backoff = Backoff::new();
            loop {
                // Acquire: pairs with the reader's release store of 0.
                let e = s.epoch.load(Ordering::Acquire);
                if e == 0 || e >= target {
                    break;
                }
                backoff.snooze();
            }
        }
        self.synchronize_calls.inc();
        self.synchronize_ns.add(t0.elapsed().as_nanos() as u64);
    }

    /// Number of read-side sections in progress (racy; for statistics and
    /// tests).
    pub fn readers(&self) -> usize {
        // Relaxed: a snapshot for statistics.
        self.slots.iter().filter(|s| s.epoch.load(Ordering::Relaxed) != 0).count()
    }
}

impl ReadGuard<'_> {
    /// Leaves the section for `f`, then enters a new one (the TDP MMU's
    /// yield: `rcu_read_unlock`, drop and retake `mmu_lock`,
    /// `rcu_read_lock`). Nothing read before stays protected after.
    pub fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let s = &self.rcu.slots[self.slot];
        // Release: as in `drop`.
        s.epoch.store(0, Ordering::Release);
        let r = f();
        // SeqCst: as in `read_lock`.
        let e = self.rcu.epoch.load(Ordering::SeqCst);
        // Relaxed: published by the fence that follows.
        s.epoch.store(e, Ordering::Relaxed);
        // SeqCst fence: as in `read_lock`.
        fence(Ordering::SeqCst);
        r
    }

    /// Leaves and re-enters the section, letting waiting updaters finish (the
    /// seed's `kvm_mmu_rcu_free_page_end` + `_begin` when `need_resched`).
    #[inline]
    pub fn quiesce(&mut self) {
        let s = &self.rcu.slots[self.slot];
        // Release: as in `drop`.
        s.epoch.store(0, Ordering::Release);
        // SeqCst: as in `read_lock`.
        let e = self.rcu.epoch.load(Ordering::SeqCst);
        // Relaxed: published by the fence that follows.
        s.epoch.store(e, Ordering::Relaxed);
        // SeqCst fence: as in `read_lock`.
        fence(Ordering::SeqCst);
    }
}

impl Drop for ReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        let s = &self.rcu.slots[self.slot];
        // Release: pairs with the updater's acquire load of the slot; every
        // access of this section happens before the updater frees anything.
        s.epoch.store(0, Ordering::Release);
        // Release: pairs with the next owner's acquire claim.
        s.claimed.store(false, Ordering::Release);
    }
}

/// A per-thread number to spread readers over the slots.
fn thread_hint() -> usize {
    use std::cell::Cell;
    thread_local!(static HINT: Cell<usize> = const { Cell::new(usize::MAX) });
    HINT.with(|h| {
        if h.get() == usize::MAX {
            let x = h as *const Cell<usize> as usize;
            h.set((x >> 6) ^ (x >> 16));
        }
        h.get()
    })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool as StdBool;

    #[test]
    fn synchronize_with_no_reader_returns() {
        let rcu = Rcu::new(4);
        rcu.synchronize();
        let t = rcu.tag();
        assert!(rcu.poll(t));
    }

    #[test]
    fn synchronize_waits_for_an_older_reader_only() {
        let rcu = Arc::new(Rcu::new(4));
        let g = rcu.read_lock();
        let tag = rcu.tag();
        assert!(!rcu.poll(tag), "a reader from before the tag holds it up");
        let done = Arc::new(StdBool::new(false));
        let t = {
            let (rcu, done) = (rcu.clone(), done.clone());
            std::thread::spawn(move || {
                rcu.synchronize();
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(!done.load(std::sync::atomic::Ordering::SeqCst), "returned under a reader");
        // A reader that starts now does not hold up the grace period.
        let late = rcu.read_lock();
        drop(g);
        t.join().unwrap();
        assert!(rcu.poll(tag));
        drop(late);
        assert_eq!(rcu.readers(), 0);
    }

    #[test]
    fn quiesce_lets_updaters_through() {
        let rcu = Rcu::new(2);
        let mut g = rcu.read_lock();
        let tag = rcu.tag();
        assert!(!rcu.poll(tag));
        g.quiesce();
        assert!(rcu.poll(tag), "after quiesce the section counts as new");
    }

    #[test]
    fn more_readers_than_slots_wait_for_a_slot() {
        let rcu = Arc::new(Rcu::new(1));
        let g = rcu.read_lock();
        let t = {
            let rcu = rcu.clone();
            std::thread::spawn(move || {
                let _g = rcu.read_lock();
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!t.is_finished());
        drop(g);
        t.join().unwrap();
    }
}

/// loom model of the grace period: a reader that loaded a pointer inside a
/// read-side section must never see the object freed before the section
/// ends (see `loom_support` for how loom is driven).
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicUsize;

    struct World {
        rcu: Rcu,
        ptr: AtomicUsize,
        freed: AtomicBool,
    }

    fn reader_vs_free(grace: bool) {
        crate::loom_support::check(move || {
            let w =
                Arc::new(World { rcu: Rcu::new(2), ptr: AtomicUsize::new(1), freed: AtomicBool::new(false) });
            let (wr, wu) = (w.clone(), w.clone());
            let (p, ()) = crate::loom_support::two(
                move || {
                    let g = wr.rcu.read_lock();
                    // Acquire: as a lockless walker's load of a pointer.
                    let p = wr.ptr.load(Ordering::Acquire);
                    if p != 0 {
                        // Relaxed: what matters is whether it can read true.
                        assert!(
                            !wr.freed.load(Ordering::Relaxed),
                            "read of freed memory inside a read-side section"
                        );
                    }
                    drop(g);
                    p
                },
                move || {
                    // Unlink, wait for a grace period, free.
                    wu.ptr.store(0, Ordering::Release);
                    if grace {
                        wu.rcu.synchronize();
                    }
                    wu.freed.store(true, Ordering::Relaxed);
                },
            );
            p
        });
    }

    #[test]
    fn loom_grace_period_protects_a_reader() {
        reader_vs_free(true);
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "read of freed memory")]
    fn loom_freeing_without_a_grace_period_is_caught() {
        reader_vs_free(false);
    }
}
