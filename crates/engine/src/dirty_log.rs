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
use crate::mmu::MmuDesign;
use crate::mmu::lockless::mark_page_dirty_after_publish;
use crate::vm::Kvm;
use shadow_mmu_core::dirty_ring::DirtyRing;

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

/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: who clears and re-protects the
/// dirty log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DirtyLogProtect {
    /// `KVM_GET_DIRTY_LOG` clears and re-protects what it reports (KVM
    /// before 4.20, and the seed).
    #[default]
    Auto,
    /// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: GET only copies the log;
    /// `clear_dirty_log` clears and re-protects.
    Manual,
    /// `Manual` with `KVM_DIRTY_LOG_INITIALLY_SET`: a slot's log starts all
    /// ones when logging is enabled, and nothing is write-protected then.
    ManualInitiallySet,
}

impl DirtyLogProtect {
    /// Does GET leave clearing to CLEAR?
    pub fn is_manual(self) -> bool {
        self != Self::Auto
    }

    /// Does the log start all ones?
    pub fn initially_set(self) -> bool {
        self == Self::ManualInitiallySet
    }

    /// The capability's `args[0]` (`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` = 1,
    /// `KVM_DIRTY_LOG_INITIALLY_SET` = 2).
    pub fn cap_flags(self) -> u64 {
        match self {
            Self::Auto => 0,
            Self::Manual => 1,
            Self::ManualInitiallySet => 3,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Auto,
            1 => Self::Manual,
            _ => Self::ManualInitiallySet,
        }
    }
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
        DirtyLogProtect::from_u8(self.dirty_log_protect.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`.
    pub(crate) fn set_dirty_log_protect(&self, p: DirtyLogProtect) {
        let _slots = self.slots_lock.lock();
        // Relaxed: see `dirty_log_protect`.
        self.dirty_log_protect.store(p.cap_flags() as u8, std::sync::atomic::Ordering::Relaxed);
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
        let pages = match (self.dirty_log_protect().is_manual(), self.mmu.design) {
            (true, _) => Self::copy_dirty_log(slot, out),
            (false, MmuDesign::Locked) => self.get_dirty_log_locked(slot, out),
            (false, MmuDesign::Lockless) => self.get_dirty_log_lockless(slot, out),
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
        let first_word = (first_page / 64) as usize;
        let cleared = match self.mmu.design {
            MmuDesign::Locked => self.clear_dirty_log_locked(slot, first_word, mask),
            MmuDesign::Lockless => self.clear_dirty_log_lockless(slot, first_word, mask),
        };
        let stats = &self.mmu.stats;
        stats.clear_dirty_log_calls.inc();
        stats.clear_dirty_log_ns.add(t0.elapsed().as_nanos() as u64);
        stats.pages_cleared.add(cleared);
        Ok(cleared)
    }

    /// The loop both designs' CLEAR share: clears the set bits of each mask
    /// word from word `first_word` of `slot`'s log on, and hands those bits
    /// to `protect` (with the offset of their first page). Returns the
    /// number cleared.
    #[inline]
    fn clear_words(
        &self,
        slot: &Memslot,
        first_word: usize,
        mask: &[u64],
        mut protect: impl FnMut(u64, u64),
    ) -> u64 {
        let bitmap = slot.dirty_bitmap();
        let mut pages = 0;
        for (j, &m) in mask.iter().enumerate() {
            let i = first_word + j;
            if m == 0 {
                continue;
            }
            let m = if self.mmu.breakage.clear_whole_word() {
                bitmap.take_word(i) & m
            } else {
                bitmap.clear_mask(i, m)
            };
            if m == 0 {
                continue;
            }
            pages += u64::from(m.count_ones());
            if !self.mmu.breakage.skip_write_protect() {
                protect(i as u64 * 64, m);
            }
        }
        pages
    }

    /// The locked design's CLEAR: under `mmu_lock` once per call, flushing
    /// before it lets go (module docs: where we differ).
    fn clear_dirty_log_locked(&self, slot: &Memslot, first_word: usize, mask: &[u64]) -> u64 {
        let initially_set = self.dirty_log_protect().initially_set();
        let g = self.mmu.lock.lock();
        let mut protected = 0;
        let pages = self.clear_words(slot, first_word, mask, |offset, m| {
            protected += self.kvm_arch_mmu_enable_log_dirty_pt_masked(&g, slot, offset, m, initially_set);
        });
        self.mmu.stats.sptes_write_protected.add(protected);
        if pages > 0 && !self.mmu.breakage.skip_get_dirty_log_flush() {
            self.kvm_flush_remote_tlbs();
        }
        pages
    }

    /// The lockless design's CLEAR: as its GET, no `mmu_lock`, bounded
    /// read-side sections, the flush after the walk.
    fn clear_dirty_log_lockless(&self, slot: &Memslot, first_word: usize, mask: &[u64]) -> u64 {
        let initially_set = self.dirty_log_protect().initially_set();
        let mut guard = self.mmu.rcu.read_lock();
        let mut sections = 1;
        let mut since_quiesce = 0;
        let mut tally = (0, 0);
        let pages = self.clear_words(slot, first_word, mask, |offset, m| {
            self.kvm_arch_mmu_enable_log_dirty_pt_masked_lockless(
                &guard,
                slot,
                offset,
                m,
                initially_set,
                &mut tally,
            );
            since_quiesce += m.count_ones();
            if since_quiesce >= PAGES_PER_READ_SECTION {
                guard.quiesce();
                sections += 1;
                since_quiesce = 0;
            }
        });
        drop(guard);
        self.mmu.stats.harvest_read_sections.add(sections);
        self.account_lockless_walks(tally);
        if pages > 0 && !self.mmu.breakage.skip_get_dirty_log_flush() {
            self.kvm_flush_remote_tlbs();
        }
        pages
    }

    /// The loop both designs share: swap each word of `slot`'s bitmap with
    /// 0, copy it to `out`, and hand the bits taken to `protect` (with the
    /// offset of their first page). Returns the number of dirty pages.
    #[inline]
    fn harvest_words(&self, slot: &Memslot, out: &mut [u64], mut protect: impl FnMut(u64, u64)) -> u64 {
        let bitmap = slot.dirty_bitmap();
        let mut pages = 0;
        for (i, word) in out.iter_mut().enumerate() {
            let mask = bitmap.take_word(i);
            *word = mask;
            if mask == 0 {
                continue;
            }
            pages += u64::from(mask.count_ones());
            if !self.mmu.breakage.skip_write_protect() {
                protect(i as u64 * 64, mask);
            }
        }
        pages
    }

    /// The locked design: the whole harvest under `mmu_lock`, remote TLB
    /// flush inside it.
    fn get_dirty_log_locked(&self, slot: &Memslot, out: &mut [u64]) -> u64 {
        let g = self.mmu.lock.lock();
        let mut protected = 0;
        let pages = self.harvest_words(slot, out, |offset, mask| {
            protected += self.kvm_mmu_write_protect_pt_masked(&g, slot, offset, mask);
        });
        self.mmu.stats.sptes_write_protected.add(protected);
        if pages > 0 && !self.mmu.breakage.skip_get_dirty_log_flush() {
            self.kvm_flush_remote_tlbs();
        }
        pages
    }

    /// The lockless design (patches 05, 12, 13): no `mmu_lock`; the walk is
    /// a read-side section of the grace period (`kvm_mmu_rcu_free_page_begin`
    /// .. `_end`), and the remote TLB flush comes after it, with no lock held.
    ///
    /// The swap of each word acquires the release fence every marker issued
    /// after making its spte writable and adding it to its rmap (patch 06;
    /// `shadow_mmu_core::lockless`), so the walks below find every writable
    /// spte behind the bits taken.
    ///
    /// The read-side section is bounded: every [`PAGES_PER_READ_SECTION`]
    /// dirty pages the walk leaves and re-enters it (`quiesce`), as
    /// enable-logging does between rmaps. A free under `mmu_lock` whose pool
    /// backlog is full waits for a grace period (`Pool::retire`); with one
    /// section over the whole bitmap, that free (and the fault or zap
    /// holding the lock, and every vCPU queued behind it) would wait for the
    /// whole harvest. Nothing carries across a quiescent point: each word's
    /// walk is complete in itself, and no pointer loaded before it is used
    /// after it.
    fn get_dirty_log_lockless(&self, slot: &Memslot, out: &mut [u64]) -> u64 {
        let mut guard = self.mmu.rcu.read_lock();
        let mut sections = 1;
        let mut since_quiesce = 0;
        let mut tally = (0, 0);
        let pages = self.harvest_words(slot, out, |offset, mask| {
            self.kvm_mmu_write_protect_pt_masked_lockless(&guard, slot, offset, mask, &mut tally);
            since_quiesce += mask.count_ones();
            if since_quiesce >= PAGES_PER_READ_SECTION {
                guard.quiesce();
                sections += 1;
                since_quiesce = 0;
            }
        });
        drop(guard);
        self.mmu.stats.harvest_read_sections.add(sections);
        self.account_lockless_walks(tally);
        if pages > 0 && !self.mmu.breakage.skip_get_dirty_log_flush() {
            self.kvm_flush_remote_tlbs();
        }
        pages
    }
}
