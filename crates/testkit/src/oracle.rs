//! The oracle for lost dirty pages, after KVM's `dirty_log_test`.
//!
//! The oracle plays the migration's destination: it keeps a copy of a
//! memslot's memory, brought up to date at each collection with the pages
//! the dirty log reported. Guest stores carry the iteration they were made in
//! (see [`shadow_mmu_engine::workload`]), and each collection is preceded by a cut, so
//! that every store tagged with an iteration up to `cut` is complete before
//! `get_dirty_log` starts.
//!
//! At each collection (with the bitmap `get_dirty_log` returned):
//! - a page reported clean must hold nothing newer than the copy: every word
//!   whose value differs from the copy must carry a tag above `cut` (a store
//!   racing with this collection, which the next collection will report).
//!   Otherwise a store that completed before the harvest started was not
//!   reported, and the copy misses it: a **lost dirty page**, named by gfn;
//! - a page reported dirty is copied.
//!
//! At the end, with the vCPUs stopped (the stop-and-copy of a migration),
//! after a last harvest and copy, every page whose content differs from the
//! copy is a lost dirty page: the check is exact.
//!
//! The oracle reads guest memory with relaxed atomic loads while vCPUs keep
//! storing; the cut and the dirty log protocol provide the ordering.

use std::sync::atomic::{AtomicU64, Ordering};

use shadow_mmu_core::spte::WORDS_PER_PAGE;
use shadow_mmu_engine::workload::value_tag;

/// A store the dirty log failed to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostWrite {
    /// The page.
    pub gfn: u64,
    /// Word within the page.
    pub word: usize,
    /// What guest memory holds.
    pub memory: u64,
    /// What the copy holds.
    pub copy: u64,
    /// Collection that found it (0-based; `u64::MAX` for the final check).
    pub collection: u64,
}

impl std::fmt::Display for LostWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lost dirty page: gfn {:#x} word {} holds {:#x} (iteration {}), copy has {:#x} (iteration {}), at collection {}",
            self.gfn,
            self.word,
            self.memory,
            value_tag(self.memory),
            self.copy,
            value_tag(self.copy),
            if self.collection == u64::MAX { "final".to_string() } else { self.collection.to_string() }
        )
    }
}

/// What one collection saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollectStats {
    /// Pages reported dirty.
    pub dirty_pages: u64,
    /// ... whose content was the same as the copy's (reported, but nothing
    /// new to copy).
    pub dirty_unchanged: u64,
    /// Pages reported clean whose content was newer than the copy.
    pub lost_pages: u64,
    /// Bits set past the end of the slot.
    pub stray_bits: u64,
}

impl std::ops::AddAssign for CollectStats {
    /// Sums two collections' figures (of two memslots harvested together).
    fn add_assign(&mut self, o: Self) {
        self.dirty_pages += o.dirty_pages;
        self.dirty_unchanged += o.dirty_unchanged;
        self.lost_pages += o.lost_pages;
        self.stray_bits += o.stray_bits;
    }
}

/// The destination copy of one memslot, and the checks.
#[derive(Debug)]
pub struct Oracle {
    base_gfn: u64,
    npages: u64,
    copy: Vec<u64>,
    collections: u64,
    lost: Vec<LostWrite>,
    lost_pages: u64,
}

/// How many lost writes are kept in detail.
const KEEP_LOST: usize = 64;

impl Oracle {
    /// For a slot of `npages` pages at `base_gfn`; the copy starts zeroed, as
    /// fresh guest memory is.
    pub fn new(base_gfn: u64, npages: u64) -> Self {
        Self {
            base_gfn,
            npages,
            copy: vec![0; npages as usize * WORDS_PER_PAGE],
            collections: 0,
            lost: Vec::new(),
            lost_pages: 0,
        }
    }

    /// Copies all of `mem` (the bulk copy after enabling dirty logging).
    pub fn full_copy(&mut self, mem: &[AtomicU64]) {
        assert_eq!(mem.len(), self.copy.len());
        for (c, m) in self.copy.iter_mut().zip(mem) {
            *c = m.load(Ordering::Relaxed);
        }
    }

    fn copy_page(&mut self, mem: &[AtomicU64], p: usize) -> bool {
        let r = p * WORDS_PER_PAGE..(p + 1) * WORDS_PER_PAGE;
        let mut changed = false;
        for (c, m) in self.copy[r.clone()].iter_mut().zip(&mem[r]) {
            // Relaxed: guest data; the cut and get_dirty_log order the stores
            // we must see (module docs).
            let v = m.load(Ordering::Relaxed);
            changed |= *c != v;
            *c = v;
        }
        changed
    }

    fn stray_bits(&self, bitmap: &[u64]) -> u64 {
        let tail = self.npages % 64;
        let mut n = 0;
        if tail != 0
            && let Some(last) = bitmap.last()
        {
            n += u64::from((last >> tail).count_ones());
        }
        n
    }

    fn record(&mut self, lost: LostWrite) {
        self.lost_pages += 1;
        if self.lost.len() < KEEP_LOST {
            self.lost.push(lost);
        }
    }

    /// One collection: checks the pages `bitmap` reports clean against the
    /// copy (module docs), then copies the pages it reports dirty. `cut` is
    /// the last iteration whose stores were all complete before the harvest.
    pub fn collect(&mut self, mem: &[AtomicU64], bitmap: &[u64], cut: u64) -> CollectStats {
        assert_eq!(mem.len(), self.copy.len());
        assert_eq!(bitmap.len(), self.npages.div_ceil(64) as usize);
        let mut st = CollectStats { stray_bits: self.stray_bits(bitmap), ..CollectStats::default() };
        let collection = self.collections;
        self.collections += 1;
        for p in 0..self.npages as usize {
            if bitmap[p / 64] & (1 << (p % 64)) != 0 {
                st.dirty_pages += 1;
                if !self.copy_page(mem, p) {
                    st.dirty_unchanged += 1;
                }
                continue;
            }
            let base = p * WORDS_PER_PAGE;
            for w in 0..WORDS_PER_PAGE {
                // Relaxed: as in `copy_page`.
                let cur = mem[base + w].load(Ordering::Relaxed);
                let old = self.copy[base + w];
                // A store tagged above the cut may race with this harvest; the
                // next collection answers for it. A value older than the copy
                // would mean memory went backwards: also an error.
                if cur != old && (value_tag(cur) <= cut || value_tag(cur) < value_tag(old)) {
                    st.lost_pages += 1;
                    self.record(LostWrite {
                        gfn: self.base_gfn + p as u64,
                        word: w,
                        memory: cur,
                        copy: old,
                        collection,
                    });
                    break;
                }
            }
        }
        st
    }

    /// A collection without the check of clean pages, for guests whose
    /// stores carry no iteration tags (KVM's): copies the pages `bitmap`
    /// reports dirty. [`Self::finish`] still checks every page exactly.
    pub fn copy_dirty(&mut self, mem: &[AtomicU64], bitmap: &[u64]) -> CollectStats {
        self.collections += 1;
        self.copy_reported(mem, bitmap)
    }

    /// Copies the pages `bitmap` reports dirty; counts them.
    fn copy_reported(&mut self, mem: &[AtomicU64], bitmap: &[u64]) -> CollectStats {
        assert_eq!(mem.len(), self.copy.len());
        assert_eq!(bitmap.len(), self.npages.div_ceil(64) as usize);
        let mut st = CollectStats { stray_bits: self.stray_bits(bitmap), ..CollectStats::default() };
        for p in 0..self.npages as usize {
            if bitmap[p / 64] & (1 << (p % 64)) != 0 {
                st.dirty_pages += 1;
                if !self.copy_page(mem, p) {
                    st.dirty_unchanged += 1;
                }
            }
        }
        st
    }

    /// The final check, with every vCPU stopped: copies the pages `bitmap`
    /// (the last harvest) reports dirty, then requires the copy to equal
    /// memory exactly.
    pub fn finish(&mut self, mem: &[AtomicU64], bitmap: &[u64]) -> CollectStats {
        let mut st = self.copy_reported(mem, bitmap);
        // Relaxed loads below: the vCPU threads are joined, which orders all
        // their stores before us.
        for p in 0..self.npages as usize {
            let base = p * WORDS_PER_PAGE;
            if let Some(w) =
                (0..WORDS_PER_PAGE).find(|&w| mem[base + w].load(Ordering::Relaxed) != self.copy[base + w])
            {
                st.lost_pages += 1;
                let lost = LostWrite {
                    gfn: self.base_gfn + p as u64,
                    word: w,
                    memory: mem[base + w].load(Ordering::Relaxed),
                    copy: self.copy[base + w],
                    collection: u64::MAX,
                };
                self.record(lost);
            }
        }
        st
    }

    /// Lost pages found so far (each page counted once per check that found it).
    pub fn lost_pages(&self) -> u64 {
        self.lost_pages
    }

    /// The first lost writes found, in detail.
    pub fn lost(&self) -> &[LostWrite] {
        &self.lost
    }

    /// Collections checked so far.
    pub fn collections(&self) -> u64 {
        self.collections
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use shadow_mmu_engine::workload::encode_value;

    fn mem(pages: usize) -> Vec<AtomicU64> {
        (0..pages * WORDS_PER_PAGE).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn a_clean_page_with_an_old_unreported_store_is_lost() {
        let m = mem(3);
        let mut o = Oracle::new(0x100, 3);
        o.full_copy(&m);
        // Iteration 1: page 1 written and reported, page 2 written and NOT.
        m[WORDS_PER_PAGE].store(encode_value(1, 0, 1), Ordering::Relaxed);
        m[2 * WORDS_PER_PAGE + 5].store(encode_value(1, 0, 2), Ordering::Relaxed);
        let st = o.collect(&m, &[0b010], 1);
        assert_eq!(st.dirty_pages, 1);
        assert_eq!(st.lost_pages, 1);
        assert_eq!(o.lost()[0].gfn, 0x102);
        assert_eq!(o.lost()[0].word, 5);
        assert!(o.lost()[0].to_string().contains("gfn 0x102"));
    }

    #[test]
    fn a_store_racing_the_harvest_is_left_to_the_next_collection() {
        let m = mem(1);
        let mut o = Oracle::new(0, 1);
        o.full_copy(&m);
        // Tagged 2, above the cut of 1: may race the harvest, so not lost yet.
        m[0].store(encode_value(2, 0, 1), Ordering::Relaxed);
        assert_eq!(o.collect(&m, &[0], 1).lost_pages, 0);
        // Next collection (cut 2): it must be reported now.
        assert_eq!(o.collect(&m, &[0], 2).lost_pages, 1);
    }

    #[test]
    fn finish_is_exact_and_stray_bits_are_counted() {
        let m = mem(2);
        let mut o = Oracle::new(0, 2);
        o.full_copy(&m);
        m[3].store(encode_value(9, 1, 1), Ordering::Relaxed);
        let st = o.finish(&m, &[0b1]);
        assert_eq!((st.dirty_pages, st.lost_pages), (1, 0));
        m[WORDS_PER_PAGE].store(encode_value(9, 1, 2), Ordering::Relaxed);
        let st = o.finish(&m, &[0b100]);
        assert_eq!(st.lost_pages, 1, "page 1 changed, not reported");
        assert_eq!(st.stray_bits, 1, "bit 2 is past the slot's 2 pages");
        assert_eq!(st.dirty_unchanged, 0);
    }

    /// Untagged stores (KVM's guests): harvests only copy, and the final
    /// check is exact: a store no harvest reported is a lost page.
    #[test]
    fn untagged_collections_and_the_exact_final_check() {
        let mem: Vec<AtomicU64> = (0..4 * WORDS_PER_PAGE).map(|_| AtomicU64::new(0)).collect();
        let mut o = Oracle::new(0, 4);
        o.full_copy(&mem);
        mem[WORDS_PER_PAGE].store(7, Ordering::Relaxed);
        mem[3 * WORDS_PER_PAGE + 5].store(9, Ordering::Relaxed);
        // A harvest that reports page 1 only.
        let st = o.copy_dirty(&mem, &[0b0010]);
        assert_eq!((st.dirty_pages, st.lost_pages), (1, 0), "no check of clean pages here");
        // The last harvest reports nothing: page 3's store was never reported.
        let st = o.finish(&mem, &[0]);
        assert_eq!(st.lost_pages, 1);
        assert_eq!(o.lost()[0].gfn, 3);
        assert_eq!(o.lost()[0].word, 5);
    }
}
