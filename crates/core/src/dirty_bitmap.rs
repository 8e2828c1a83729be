//! A memslot's dirty bitmap, in KVM's layout: bit `i` of the little-endian
//! `u64` word `i / 64` is page `base_gfn + i`.
//!
//! Ordering contract (patch 06/15):
//! - the marking side ([`DirtyBitmap::mark`]) is an atomic RMW that must be
//!   preceded by a release fence issued after the spte was made writable and
//!   added to its rmap (`set_spte`), or after the fast path's compare-exchange.
//!   It must never be skipped because the bit looks set already: the harvester
//!   only synchronises with the RMW whose value its swap reads (or an RMW later
//!   in that release sequence), so skipping would leave our spte writes
//!   unordered before the harvester's rmap walk;
//! - the harvesting side ([`DirtyBitmap::take_word`]) swaps a word with 0 with
//!   `AcqRel`, the `xchg` full barrier of `kvm_vm_ioctl_get_dirty_log`: it
//!   acquires every marker's release fence for the bits it returns, so the
//!   rmap walk that follows sees every writable spte behind those bits.

use crate::sync::atomic::{AtomicU64, Ordering};

/// Number of `u64` words a bitmap for `npages` pages has.
pub const fn bitmap_words(npages: u64) -> usize {
    npages.div_ceil(64) as usize
}

/// A dirty bitmap: one bit per page of a memslot.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    npages: u64,
}

impl DirtyBitmap {
    /// An all-clean bitmap for `npages` pages.
    pub fn new(npages: u64) -> Self {
        let words = (0..bitmap_words(npages)).map(|_| AtomicU64::new(0)).collect();
        Self { words, npages }
    }

    /// Pages covered.
    #[inline]
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// Number of words.
    #[inline]
    pub fn len_words(&self) -> usize {
        self.words.len()
    }

    /// Sets the bit of page `rel_gfn` (relative to the slot base):
    /// `mark_page_dirty_in_slot`. See the module docs for the fence the
    /// caller owes before this call.
    #[inline]
    pub fn mark(&self, rel_gfn: u64) {
        debug_assert!(rel_gfn < self.npages);
        // Relaxed RMW: the caller's preceding release fence is what the
        // harvester's AcqRel swap in `take_word` synchronises with (fence-to-
        // atomic synchronisation through this RMW's place in the word's
        // modification order).
        self.words[(rel_gfn / 64) as usize].fetch_or(1 << (rel_gfn % 64), Ordering::Relaxed);
    }

    /// Atomically takes word `i`, leaving it clean: the `xchg(&dirty_bitmap[i], 0)`
    /// of `kvm_vm_ioctl_get_dirty_log`.
    #[inline]
    pub fn take_word(&self, i: usize) -> u64 {
        // A cheap relaxed peek first: most words of a sparse log are clean,
        // and a swap that returns 0 synchronises with nothing we need.
        if self.words[i].load(Ordering::Relaxed) == 0 {
            return 0;
        }
        // AcqRel pairs with the release fence each marker issues before its
        // `fetch_or` (see `mark`): everything a marker did before marking is
        // visible to our caller's rmap walk.
        self.words[i].swap(0, Ordering::AcqRel)
    }

    /// Clears the bits of `mask` in word `i` and returns those of them that
    /// were set: `KVM_CLEAR_DIRTY_LOG`'s `mask &= atomic_long_fetch_andnot()`.
    #[inline]
    pub fn clear_mask(&self, i: usize, mask: u64) -> u64 {
        if mask == 0 {
            return 0;
        }
        // AcqRel, as `take_word`'s swap and for the same reason: it acquires
        // the markers' release fences for the bits it returns.
        self.words[i].fetch_and(!mask, Ordering::AcqRel) & mask
    }

    /// Reads word `i` without clearing it.
    #[inline]
    pub fn peek_word(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::Relaxed)
    }

    /// Is page `rel_gfn` marked?
    #[inline]
    pub fn test(&self, rel_gfn: u64) -> bool {
        self.peek_word((rel_gfn / 64) as usize) & (1 << (rel_gfn % 64)) != 0
    }

    /// Clears every bit (when dirty logging is enabled afresh, as KVM
    /// allocates a zeroed bitmap then).
    pub fn clear_all(&self) {
        for w in self.words.iter() {
            // Relaxed: called under the locks that serialise flag changes;
            // markers cannot be running against a slot whose logging is off.
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Sets every bit of the slot's pages (none past the end), as KVM does
    /// for `KVM_DIRTY_LOG_INITIALLY_SET` when logging is enabled.
    pub fn set_all(&self) {
        for (i, w) in self.words.iter().enumerate() {
            let rest = self.npages - 64 * i as u64;
            // Relaxed: as `clear_all`.
            w.store(if rest >= 64 { u64::MAX } else { (1 << rest) - 1 }, Ordering::Relaxed);
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_kvm() {
        let b = DirtyBitmap::new(130);
        assert_eq!(b.len_words(), 3);
        b.mark(0);
        b.mark(65);
        b.mark(129);
        assert_eq!(b.peek_word(0), 1);
        assert_eq!(b.peek_word(1), 1 << 1);
        assert_eq!(b.peek_word(2), 1 << 1);
        assert!(b.test(65) && !b.test(64));
        assert_eq!(b.count(), 3);
        assert_eq!(b.take_word(1), 2);
        assert_eq!(b.take_word(1), 0);
        assert_eq!(b.count(), 2);
        b.clear_all();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn set_all_and_clear_mask() {
        let b = DirtyBitmap::new(130);
        b.set_all();
        assert_eq!(b.count(), 130, "no bit past the slot's end");
        assert_eq!(b.peek_word(2), 0b11);
        // Only the bits of the mask that were set come back, and only they go.
        assert_eq!(b.clear_mask(2, 0b110), 0b010);
        assert_eq!(b.peek_word(2), 0b01);
        assert_eq!(b.clear_mask(2, 0b110), 0);
        assert_eq!(b.clear_mask(0, 0), 0);
        assert_eq!(b.count(), 129);
    }

    #[test]
    fn bitmap_words_rounds_up() {
        assert_eq!(bitmap_words(1), 1);
        assert_eq!(bitmap_words(64), 1);
        assert_eq!(bitmap_words(65), 2);
    }
}
