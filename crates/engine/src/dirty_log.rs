//! `KVM_GET_DIRTY_LOG` (`kvm_vm_ioctl_get_dirty_log`) and, with manual
//! protect, `KVM_CLEAR_DIRTY_LOG` (`kvm_clear_dirty_log_protect`).
//!
//! Classic GET: for each word of the slot's bitmap, swap it with 0, copy it
//! out, and write-protect the pages whose bits were set, so that the next
//! write to each of them faults and marks it again. The caller copies the
//! pages it was told about only after this returns: by then every write that
//! was not reported by this call will be reported by the next.
//!
//! Manual protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, [`DirtyLogProtect`]):
//! GET only copies the bitmap. CLEAR takes a range and a mask and, word by
//! word, clears only the bits of the mask that are set
//! (`mask &= fetch_andnot(mask)`), then write-protects those pages. The
//! caller copies a page after the CLEAR that covered it. A bit set after the
//! GET (a fault that made a clean page writable) is not in the caller's mask,
//! so it survives the CLEAR and the next GET reports it: that is why CLEAR
//! must not clear whole words (the `clear_whole_word` switch).
//!
//! The ordering of patch 06 holds for CLEAR as for GET: the `fetch_andnot`
//! is AcqRel, so for each bit it returns it acquires the release fence the
//! marker issued after making its spte writable and adding it to its rmap;
//! the walk that follows (locked or lockless) then finds that spte and
//! clears W. A marker whose `fetch_or` comes after our `fetch_andnot` in the
//! word's order leaves its bit set for the next GET.
//!
//! With `INITIALLY_SET` the log starts all ones when logging is enabled and
//! nothing is write-protected then; CLEAR protects chunk by chunk. A page
//! mapped by a large spte is protected at 2 MiB first
//! (`kvm_arch_mmu_enable_log_dirty_pt_masked`), since no 4 KiB rmap holds it.
//!
//! Where we differ from KVM: the locked design (3.11's rules) flushes remote
//! TLBs before it releases `mmu_lock` in CLEAR as in GET, where KVM's CLEAR
//! flushes after unlocking. KVM can, because since 2019 its flush rule keys on
//! the MMU-writable bit (the rule patch 04 proposed, our lockless design's);
//! under 3.11's rule a write-tracking path that met our read-only spte before
//! the flush would skip its own flush. The lockless design flushes after the
//! walk, out of any lock, as for GET.

use std::time::Instant;

use thiserror::Error;

use crate::memslot::Memslot;
use parking_lot::Mutex;

use crate::harvest::word_ranges;
use crate::mmu::lockless::{clear_dirty_mask, mark_page_dirty_after_publish};
use crate::vm::Kvm;
use shadow_mmu_core::dirty_ring::DirtyRing;
use shadow_mmu_vmm::DirtyLogProtect;

/// Dirty pages the lockless harvest write-protects in one read-side section
/// (about 7 µs of walking at the engine's 7 ns per page).
pub const PAGES_PER_READ_SECTION: u32 = 1024;

/// Why `get_dirty_log` was refused. Nothing is harvested when one is
/// returned; the log and the VM are unchanged.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum DirtyLogError {
    /// No slot has this id.
    #[error("slot {0} does not exist")]
    NoSuchSlot(u32),
    /// The slot does not log dirty pages.
    #[error("slot {0} does not log dirty pages (KVM_MEM_LOG_DIRTY_PAGES is off)")]
    NotLogging(u32),
    /// The dirty ring is on: the bitmap ioctls are refused (KVM's `ENXIO`).
    #[error("the dirty ring is on: the dirty bitmap ioctls are refused")]
    DirtyRing,
    /// The bitmap buffer has the wrong size.
    #[error("slot {slot} has {npages} pages: its dirty bitmap is {expected} u64 words, not {got}")]
    BitmapSize {
        /// Slot id.
        slot: u32,
        /// Pages in the slot.
        npages: u64,
        /// Words needed.
        expected: usize,
        /// Words given.
        got: usize,
    },
}

/// Why `clear_dirty_log` was refused (beyond [`DirtyLogError`]'s shared
/// cases). Nothing is cleared when one is returned.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ClearDirtyLogError {
    /// A refusal GET makes too: no such slot, not logging, and the like.
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    /// CLEAR without manual protect (the kvm crate refuses it the same way).
    #[error("clear_dirty_log needs manual protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)")]
    NotManual,
    /// `first_page` is not a multiple of 64.
    #[error("first_page {first_page} is not a multiple of 64")]
    FirstPageUnaligned {
        /// Asked for.
        first_page: u64,
    },
    /// The range is not inside the slot, or is not a whole number of 64-page
    /// words and does not end at the slot's end.
    #[error(
        "pages [{first_page}, +{num_pages}) of slot {slot} ({npages} pages): the range must lie inside the slot and be a multiple of 64 pages unless it ends at the slot's end"
    )]
    BadRange {
        /// Slot id.
        slot: u32,
        /// First page asked for.
        first_page: u64,
        /// Pages asked for.
        num_pages: u64,
        /// Pages in the slot.
        npages: u64,
    },
    /// The mask has the wrong number of words for `num_pages`.
    #[error("{num_pages} pages need a mask of {expected} u64 words, not {got}")]
    MaskSize {
        /// Pages asked for.
        num_pages: u64,
        /// Words needed.
        expected: usize,
        /// Words given.
        got: usize,
    },
}

impl Kvm {
    /// The VM's manual-protect mode.
    pub(crate) fn dirty_log_protect(&self) -> DirtyLogProtect {
        // Relaxed: changed under slots_lock, which every reader that acts on
        // it (GET, CLEAR, enabling logging) holds.
        let v = self.dirty_log_protect.load(std::sync::atomic::Ordering::Relaxed);
        DirtyLogProtect::from_u8(v).expect("only set_dirty_log_protect stores it")
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`.
    pub(crate) fn set_dirty_log_protect(&self, p: DirtyLogProtect) {
        let _slots = self.slots_lock.lock();
        // Relaxed: see `dirty_log_protect`.
        self.dirty_log_protect.store(p as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// `mark_page_dirty_in_slot`, after the caller made its spte writable
    /// and put it in its rmap (patch 06's steps 1 and 2): with the dirty ring
    /// on, a push to the faulting vCPU's `ring`, whose release store of the
    /// entry's flags orders those steps before it; otherwise the release
    /// fence and the bitmap bit (steps 3 and 4).
    #[inline]
    pub(crate) fn mark_page_dirty_in_slot(&self, slot: &Memslot, gfn: u64, ring: Option<&DirtyRing>) {
        let rel_gfn = gfn - slot.base_gfn();
        match ring {
            Some(r) => {
                r.push(slot.id(), rel_gfn);
            }
            None => mark_page_dirty_after_publish(slot.dirty_bitmap(), rel_gfn, &self.mmu.breakage),
        }
        self.mmu.stats.pages_marked_dirty.inc();
    }

    /// `kvm_vm_ioctl_get_dirty_log`.
    pub(crate) fn kvm_vm_ioctl_get_dirty_log(
        &self,
        slot_id: u32,
        out: &mut [u64],
    ) -> Result<u64, DirtyLogError> {
        let _slots = self.slots_lock.lock();
        if self.dirty_ring_entries() != 0 {
            return Err(DirtyLogError::DirtyRing);
        }
        let slots = self.memslots.load_full();
        let slot = slots.get(slot_id).ok_or(DirtyLogError::NoSuchSlot(slot_id))?;
        if !slot.dirty_logging() {
            return Err(DirtyLogError::NotLogging(slot_id));
        }
        let expected = slot.dirty_bitmap().len_words();
        if out.len() != expected {
            return Err(DirtyLogError::BitmapSize {
                slot: slot_id,
                npages: slot.npages(),
                expected,
                got: out.len(),
            });
        }
        let t0 = Instant::now();
        self.kvm_arch_sync_dirty_log();
        let pages = if self.dirty_log_protect().is_manual() {
            Self::copy_dirty_log(slot, out)
        } else {
            self.get_dirty_log_protect(slot, out)
        };
        let stats = &self.mmu.stats;
        stats.get_dirty_log_calls.inc();
        stats.get_dirty_log_ns.add(t0.elapsed().as_nanos() as u64);
        stats.pages_harvested.add(pages);
        Ok(pages)
    }

    /// GET with manual protect: copies the log, clears and protects nothing
    /// (so takes no lock, in either design, as KVM).
    fn copy_dirty_log(slot: &Memslot, out: &mut [u64]) -> u64 {
        let bitmap = slot.dirty_bitmap();
        let mut pages = 0;
        for (i, word) in out.iter_mut().enumerate() {
            *word = bitmap.peek_word(i);
            pages += u64::from(word.count_ones());
        }
        pages
    }

    /// `kvm_clear_dirty_log_protect`: for each word of `mask` (bit `i` of
    /// word `w` is page `first_page + 64 * w + i` of the slot), clears the
    /// bits of the log that are set in it and write-protects those pages.
    /// Returns how many were cleared. Checked first, in KVM's order; a
    /// refusal clears nothing.
    pub(crate) fn kvm_vm_ioctl_clear_dirty_log(
        &self,
        slot_id: u32,
        first_page: u64,
        num_pages: u64,
        mask: &[u64],
    ) -> Result<u64, ClearDirtyLogError> {
        let _slots = self.slots_lock.lock();
        if self.dirty_ring_entries() != 0 {
            return Err(DirtyLogError::DirtyRing.into());
        }
        if !self.dirty_log_protect().is_manual() {
            return Err(ClearDirtyLogError::NotManual);
        }
        if !first_page.is_multiple_of(64) {
            return Err(ClearDirtyLogError::FirstPageUnaligned { first_page });
        }
        let slots = self.memslots.load_full();
        let slot = slots.get(slot_id).ok_or(DirtyLogError::NoSuchSlot(slot_id))?;
        if !slot.dirty_logging() {
            return Err(DirtyLogError::NotLogging(slot_id).into());
        }
        let npages = slot.npages();
        if first_page > npages
            || num_pages > npages - first_page
            || (num_pages < npages - first_page && !num_pages.is_multiple_of(64))
        {
            return Err(ClearDirtyLogError::BadRange { slot: slot_id, first_page, num_pages, npages });
        }
        let expected = crate::bitmap_words(num_pages);
        if mask.len() != expected {
            return Err(ClearDirtyLogError::MaskSize { num_pages, expected, got: mask.len() });
        }
        let t0 = Instant::now();
        self.kvm_arch_sync_dirty_log();
        let first_word = (first_page / 64) as usize;
        let cleared = self.clear_dirty_log_protect(slot, first_word, mask);
        let stats = &self.mmu.stats;
        stats.clear_dirty_log_calls.inc();
        stats.clear_dirty_log_ns.add(t0.elapsed().as_nanos() as u64);
        stats.pages_cleared.add(cleared);
        Ok(cleared)
    }

    /// GET's clearing and protection (`kvm_get_dirty_log_protect`): for each
    /// word, swap it with 0 (AcqRel: patch 06's pairing with the markers),
    /// copy it out, and write-protect the pages whose bits were set. On
    /// `harvest_threads` threads in word-aligned chunks (`harvest.rs`): in
    /// the locked design each chunk under `mmu_lock` with its flush inside
    /// (KVM 3.11), in the lockless one without the lock, each thread in its
    /// own bounded read-side section, and one flush after the join.
    fn get_dirty_log_protect(&self, slot: &Memslot, out: &mut [u64]) -> u64 {
        let ranges = word_ranges(out.len(), self.config.harvest_threads as usize);
        let mut parts = Vec::with_capacity(ranges.len());
        let mut rest = out;
        for r in &ranges {
            let (part, tail) = rest.split_at_mut(r.len());
            parts.push(Mutex::new(part));
            rest = tail;
        }
        let bitmap = slot.dirty_bitmap();
        let total = self.walk_in_parallel(ranges.len(), |k| {
            // Each chunk is taken by one thread only: the lock is never
            // contended; it hands the `&mut` across the scope.
            let mut part = parts[k].lock();
            let first = ranges[k].start;
            self.walk_chunk(|p, t| {
                for (j, word) in part.iter_mut().enumerate() {
                    let i = first + j;
                    let mask = bitmap.take_word(i);
                    *word = mask;
                    if mask != 0 {
                        t.pages += u64::from(mask.count_ones());
                        self.protect_run(p, (slot, i as u64 * 64, mask), false, t);
                    }
                }
            })
        });
        total.pages
    }

    /// CLEAR's clearing and protection: for each word of `mask` from word
    /// `first_word` of the slot's log, `fetch_andnot` (AcqRel, as GET's
    /// swap) keeps only the bits really set, and those pages are
    /// write-protected (`kvm_arch_mmu_enable_log_dirty_pt_masked`). Chunked
    /// and threaded as GET. Returns how many bits were cleared.
    fn clear_dirty_log_protect(&self, slot: &Memslot, first_word: usize, mask: &[u64]) -> u64 {
        let initially_set = self.dirty_log_protect().initially_set();
        let ranges = word_ranges(mask.len(), self.config.harvest_threads as usize);
        let bitmap = slot.dirty_bitmap();
        let total = self.walk_in_parallel(ranges.len(), |k| {
            let r = ranges[k].clone();
            self.walk_chunk(|p, t| {
                for (j, &m) in mask[r.clone()].iter().enumerate() {
                    let i = first_word + r.start + j;
                    if m == 0 {
                        continue;
                    }
                    let m = clear_dirty_mask(bitmap, i, m, &self.mmu.breakage);
                    if m != 0 {
                        t.pages += u64::from(m.count_ones());
                        self.protect_run(p, (slot, i as u64 * 64, m), initially_set, t);
                    }
                }
            })
        });
        total.pages
    }
}
