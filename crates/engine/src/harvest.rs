//! The harvest's write-protecting walk, shared by GET (`dirty_log.rs`),
//! CLEAR (`dirty_log.rs`) and the ring reset (`dirty_ring.rs`), on one
//! thread or on several (`VmConfig::harvest_threads`: the caller and the
//! VM's kept helper threads, `harvest_pool.rs`).
//!
//! A harvest is split into chunks of whole bitmap words (64 pages, so that
//! no two threads write sptes of one cache line: a 64-byte line holds the
//! sptes of 8 consecutive gfns, and a word covers 64) or, for the ring
//! reset, of whole rings. Each chunk is walked by one thread:
//! - locked design: the thread takes `mmu_lock` for its chunk and, by 3.11's
//!   rule, flushes remote TLBs before it lets go; with several threads the
//!   chunks queue on the one lock, which is what the benchmark shows;
//! - lockless design: the thread has its own read-side section (quiesced
//!   every `PAGES_PER_READ_SECTION` pages) and its own tally; no lock. The
//!   remote TLB flush comes once, after every thread has joined: a flush
//!   earlier than that would leave the sptes other threads are still
//!   protecting unflushed (the `harvest_thread_flushes_early` switch);
//! - rmap-lock design: as the lockless one, each rmap under its lock bit
//!   instead of in a read-side section;
//! - tdp design: the thread takes `mmu_lock` for write for its chunk (the
//!   VM's split cache first, for CLEAR's eager split), walks the trees, and
//!   the flush comes once after the join, out of the lock, as upstream
//!   flushes after `KVM_MMU_UNLOCK`.
//!
//! The orderings are those of a one-thread harvest, per word: the word's
//! swap (GET) or `fetch_andnot` (CLEAR), AcqRel, acquires the markers'
//! release fences for its bits before the thread walks their rmaps
//! (patch 06); a thread only walks rmaps of bits it took itself.

use std::ops::Range;

use crate::dirty_log::PAGES_PER_READ_SECTION;
use crate::memslot::Memslot;
use crate::mmu::MmuDesign;
use crate::mmu::lock::MmuGuard;
use crate::shadow_page::ShadowPage;
use crate::vm::Kvm;
use shadow_mmu_core::pool::MemoryCache;
use shadow_mmu_core::rcu::ReadGuard;

/// What one thread's walk found, merged after the join.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ChunkTally {
    /// Dirty pages taken (GET) or cleared (CLEAR), or entries reset.
    pub(crate) pages: u64,
    /// Sptes that lost W (the locked walk's count).
    pub(crate) protected: u64,
    /// The lockless walk's (sptes that lost W, restarts).
    pub(crate) lockless: (usize, usize),
    /// Read-side sections opened.
    pub(crate) sections: u64,
    /// Time the walking threads held `mmu_lock`, measured (lockdep's
    /// per-thread account), and the longest hold.
    pub(crate) lock_hold_ns: u64,
    pub(crate) lock_max_hold_ns: u64,
    /// Times the walking threads took `mmu_lock`: (for read, for write).
    pub(crate) lock_takes: (u64, u64),
}

impl std::ops::AddAssign for ChunkTally {
    fn add_assign(&mut self, o: Self) {
        self.pages += o.pages;
        self.protected += o.protected;
        self.lockless.0 += o.lockless.0;
        self.lockless.1 += o.lockless.1;
        self.sections += o.sections;
        self.lock_hold_ns += o.lock_hold_ns;
        self.lock_max_hold_ns = self.lock_max_hold_ns.max(o.lock_max_hold_ns);
        self.lock_takes.0 += o.lock_takes.0;
        self.lock_takes.1 += o.lock_takes.1;
    }
}

/// The write protection a walk owes for one run of pages: (slot, first
/// page offset, 64-bit mask). GET and CLEAR know their slot; the ring
/// reset finds it per run.
pub(crate) type Run<'a> = (&'a Memslot, u64, u64);

/// How a walking thread protects a run: under the lock it holds, in its
/// read-side section, or each rmap under its lock bit.
pub(crate) enum Protector<'g, 'l> {
    Locked(&'g MmuGuard<'l>),
    /// The TDP design: the write lock, held mutably because CLEAR's eager
    /// split drops it to allocate, and the split cache, locked before it.
    Tdp(&'g mut MmuGuard<'l>, &'g mut MemoryCache<ShadowPage>),
    Lockless(&'g mut ReadGuard<'l>, u32),
    RmapLocked,
}

impl Kvm {
    /// Protects one run for a walk, counting into `t`. `initially_set`:
    /// CLEAR under `INITIALLY_SET`, which protects large pages first.
    pub(crate) fn protect_run(
        &self,
        p: &mut Protector<'_, '_>,
        run: Run<'_>,
        initially_set: bool,
        t: &mut ChunkTally,
    ) {
        let (slot, offset, mask) = run;
        if self.mmu.breakage.skip_write_protect() {
            return;
        }
        match p {
            Protector::Locked(g) => {
                t.protected +=
                    self.kvm_arch_mmu_enable_log_dirty_pt_masked(g, slot, offset, mask, initially_set);
            }
            Protector::Lockless(guard, since_quiesce) => {
                self.kvm_arch_mmu_enable_log_dirty_pt_masked_lockless(
                    guard,
                    slot,
                    offset,
                    mask,
                    initially_set,
                    &mut t.lockless,
                );
                *since_quiesce += mask.count_ones();
                if *since_quiesce >= PAGES_PER_READ_SECTION {
                    guard.quiesce();
                    t.sections += 1;
                    *since_quiesce = 0;
                }
            }
            Protector::Tdp(g, cache) => {
                t.protected +=
                    self.kvm_tdp_mmu_enable_log_dirty_pt_masked(g, cache, slot, offset, mask, initially_set);
            }
            Protector::RmapLocked => {
                self.kvm_arch_mmu_enable_log_dirty_pt_masked_rmap_locked(
                    slot,
                    offset,
                    mask,
                    initially_set,
                    &mut t.lockless.0,
                );
            }
        }
    }

    /// One thread's walk: `walk` with a protector of this VM's design (the
    /// lock held for the whole chunk, or one read-side section, quiesced as
    /// it goes); in the locked design the flush owed is made before the
    /// lock goes. Returns the chunk's tally.
    pub(crate) fn walk_chunk(
        &self,
        walk: impl FnOnce(&mut Protector<'_, '_>, &mut ChunkTally),
    ) -> ChunkTally {
        let mut t = ChunkTally::default();
        shadow_mmu_core::lockdep::reset_mmu_lock_max_hold();
        let (held_before, _) = shadow_mmu_core::lockdep::mmu_lock_holds();
        let taken_before = shadow_mmu_core::lockdep::mmu_lock_takes();
        match self.mmu.design {
            MmuDesign::Locked => self.mmu.lock.harvesting(|| {
                let g = self.mmu.lock.lock();
                walk(&mut Protector::Locked(&g), &mut t);
                if t.pages > 0 && !self.mmu.breakage.skip_get_dirty_log_flush() {
                    self.kvm_flush_remote_tlbs();
                }
            }),
            MmuDesign::Lockless => {
                let mut guard = self.mmu.rcu.read_lock();
                t.sections = 1;
                walk(&mut Protector::Lockless(&mut guard, 0), &mut t);
            }
            MmuDesign::RmapLock => walk(&mut Protector::RmapLocked, &mut t),
            // The write lock for the chunk, as `kvm_get_dirty_log_protect`
            // takes it around its loop; the flush comes after the join.
            MmuDesign::Tdp => self.mmu.lock.harvesting(|| {
                // The split cache before mmu_lock (`TdpMmu::split_cache`).
                let mut cache = self.mmu.tdp.split_cache.lock();
                let mut g = self.mmu.lock.lock();
                walk(&mut Protector::Tdp(&mut g, &mut cache), &mut t);
            }),
        }
        let (held_after, max) = shadow_mmu_core::lockdep::mmu_lock_holds();
        t.lock_hold_ns = held_after - held_before;
        t.lock_max_hold_ns = max;
        let taken = shadow_mmu_core::lockdep::mmu_lock_takes();
        t.lock_takes = (taken.0 - taken_before.0, taken.1 - taken_before.1);
        t
    }

    /// Runs `chunk(k)` for each of `chunks` on `threads` threads (this one
    /// included), then, in the designs that protect without `mmu_lock`, the
    /// one remote TLB flush;
    /// adds the tallies to the VM's figures and returns their sum.
    pub(crate) fn walk_in_parallel(
        &self,
        chunks: usize,
        chunk: impl Fn(usize) -> ChunkTally + Sync,
    ) -> ChunkTally {
        // Every participant takes every `threads`-th chunk from its own
        // index on; with fewer chunks than threads, the rest have none.
        let threads = self.harvest_pool.as_ref().map_or(1, |p| p.helpers() + 1);
        let unlocked = self.mmu.design.flushes_after_harvest();
        let early = self.mmu.breakage.harvest_thread_flushes_early() && unlocked;
        let mut total = ChunkTally::default();
        let started = std::time::Instant::now();
        let run_share = |k: usize| {
            if k > 0 && k < chunks {
                // How late a helper thread got a CPU (a halted vCPU of the
                // host can take as long to wake as a whole harvest).
                self.mmu.stats.harvest_thread_start_max_ns.max(started.elapsed().as_nanos() as u64);
            }
            let mut t = ChunkTally::default();
            for c in (k..chunks).step_by(threads) {
                t += chunk(c);
            }
            t
        };
        if early {
            // Broken on purpose: the flush comes before the threads are done
            // (here, before any has started, so that no thread's timing can
            // hide it), and none after the join.
            self.kvm_flush_remote_tlbs();
        }
        match &self.harvest_pool {
            None => total = run_share(0),
            Some(pool) => {
                let tallies: Vec<parking_lot::Mutex<ChunkTally>> =
                    (0..threads).map(|_| parking_lot::Mutex::new(ChunkTally::default())).collect();
                pool.run(&|k| *tallies[k].lock() = run_share(k));
                for t in tallies {
                    total += t.into_inner();
                }
            }
        }
        self.mmu.stats.sptes_write_protected.add(total.protected);
        self.mmu.stats.harvest_read_sections.add(total.sections);
        self.mmu.stats.harvest_mmu_lock_hold_ns.add(total.lock_hold_ns);
        self.mmu.stats.harvest_mmu_lock_max_hold_ns.max(total.lock_max_hold_ns);
        self.mmu.stats.harvest_mmu_lock_reads.add(total.lock_takes.0);
        self.mmu.stats.harvest_mmu_lock_writes.add(total.lock_takes.1);
        self.account_lockless_walks(total.lockless);
        if unlocked && total.pages > 0 && !early && !self.mmu.breakage.skip_get_dirty_log_flush() {
            self.kvm_flush_remote_tlbs();
        }
        total
    }
}

/// `words` words in `chunks` contiguous, word-aligned ranges, as even as
/// can be.
pub(crate) fn word_ranges(words: usize, chunks: usize) -> Vec<Range<usize>> {
    let chunks = chunks.clamp(1, words.max(1));
    (0..chunks).map(|k| words * k / chunks..words * (k + 1) / chunks).collect()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_every_word_once() {
        assert_eq!(word_ranges(10, 3), [0..3, 3..6, 6..10]);
        assert_eq!(word_ranges(2, 4), [0..1, 1..2]);
        // No words: one empty chunk (an array of one range reads to
        // clippy as a mistake, so compare the slice's one element).
        assert!(matches!(word_ranges(0, 2)[..], [ref r] if r.is_empty()));
    }
}
