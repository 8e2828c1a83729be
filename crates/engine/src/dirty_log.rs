//! `KVM_GET_DIRTY_LOG` (`kvm_vm_ioctl_get_dirty_log`).
//!
//! For each word of the slot's bitmap: swap it with 0, copy it out, and
//! write-protect the pages whose bits were set, so that the next write to
//! each of them faults and marks it again. The caller copies the pages it was
//! told about only after this returns: by then every write that was not
//! reported by this call will be reported by the next.

use std::time::Instant;

use thiserror::Error;

use crate::memslot::Memslot;
use crate::mmu::MmuDesign;
use crate::vm::Kvm;

/// Dirty pages the lockless harvest write-protects in one read-side section
/// (about 7 µs of walking at the engine's 7 ns per page).
pub const PAGES_PER_READ_SECTION: u32 = 1024;

/// Why `get_dirty_log` was refused. Nothing is harvested when one is
/// returned; the log and the VM are unchanged.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DirtyLogError {
    /// No slot has this id.
    #[error("slot {0} does not exist")]
    NoSuchSlot(u32),
    /// The slot does not log dirty pages.
    #[error("slot {0} does not log dirty pages (KVM_MEM_LOG_DIRTY_PAGES is off)")]
    NotLogging(u32),
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

impl Kvm {
    /// `kvm_vm_ioctl_get_dirty_log`.
    pub(crate) fn kvm_vm_ioctl_get_dirty_log(
        &self,
        slot_id: u32,
        out: &mut [u64],
    ) -> Result<u64, DirtyLogError> {
        let _slots = self.slots_lock.lock();
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
        let pages = match self.mmu.design {
            MmuDesign::Locked => self.get_dirty_log_locked(slot, out),
            MmuDesign::Lockless => self.get_dirty_log_lockless(slot, out),
        };
        let stats = &self.mmu.stats;
        stats.get_dirty_log_calls.inc();
        stats.get_dirty_log_ns.add(t0.elapsed().as_nanos() as u64);
        stats.pages_harvested.add(pages);
        Ok(pages)
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
