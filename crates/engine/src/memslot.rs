//! Memslots: ranges of guest physical memory backed by host memory, each with
//! flags, a dirty bitmap and, per mapping level, an rmap array.
//!
//! The set of memslots ([`Memslots`]) is immutable once published: a change
//! builds a new set and publishes it (KVM copies `kvm_memslots` and
//! `rcu_assign_pointer`s it; we use `ArcSwap`). What changes in place are a
//! slot's `flags` (dirty logging on and off: the rmaps and bitmap stay the
//! same objects, as KVM shares them between the old and new slot) and its
//! `invalid` flag (set under `mmu_lock` when the slot is being deleted).
//!
//! Invariants of a published set:
//! - slots are sorted by base gfn and do not overlap;
//! - every slot is page-aligned, non-empty, below [`GFN_LIMIT`], and its
//!   host memory covers it;
//! - slot ids are unique and below [`KVM_USER_MEM_SLOTS`].
//!
//! rmap heads live in boxed arrays that never move while the slot lives, so
//! a head's address is a stable nulls marker for its pte_list.

use std::sync::Arc;

use thiserror::Error;

use crate::memory::HostMemory;
use shadow_mmu_core::dirty_bitmap::DirtyBitmap;
use shadow_mmu_core::pte_list::PteListHead;
use shadow_mmu_core::spte::{
    GFN_LIMIT, KVM_NR_PAGE_SIZES, PAGE_SHIFT, PAGE_SIZE, PT_DIRECTORY_LEVEL, PT_PAGE_TABLE_LEVEL,
    level_base_gfn, pages_per_spte,
};
use shadow_mmu_core::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};

/// Number of user memslots (`KVM_USER_MEM_SLOTS` of the x86 KVM of 2013).
pub const KVM_USER_MEM_SLOTS: u32 = 509;

/// Memslot flags (`KVM_MEM_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct MemFlags(u32);

impl MemFlags {
    /// `KVM_MEM_LOG_DIRTY_PAGES`: track writes in the dirty bitmap.
    pub const LOG_DIRTY_PAGES: Self = Self(1 << 0);
    /// `KVM_MEM_READONLY`: guest writes exit to userspace as MMIO.
    pub const READONLY: Self = Self(1 << 1);
    const ALL: u32 = Self::LOG_DIRTY_PAGES.0 | Self::READONLY.0;

    /// No flags.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// From raw bits, refusing unknown ones.
    pub const fn from_bits(bits: u32) -> Option<Self> {
        if bits & !Self::ALL != 0 { None } else { Some(Self(bits)) }
    }

    /// Raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Are all of `other`'s flags set?
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets of flags.
    #[must_use]
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// These flags without `other`'s.
    #[must_use]
    pub const fn difference(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }
}

/// The argument of `KVM_SET_USER_MEMORY_REGION`.
#[derive(Debug, Clone)]
pub struct UserMemoryRegion {
    /// Slot id.
    pub slot: u32,
    /// Flags.
    pub flags: MemFlags,
    /// First guest physical address (page-aligned).
    pub guest_phys_addr: u64,
    /// Size in bytes (page-aligned); 0 deletes the slot.
    pub memory_size: u64,
    /// Host memory backing the slot (KVM's `userspace_addr`); may be `None`
    /// only when deleting.
    pub memory: Option<Arc<HostMemory>>,
    /// Byte offset of the slot's first page in `memory` (page-aligned).
    pub memory_offset: u64,
}

/// Why a memslot change was refused. The VM is unchanged when one is returned.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum MemslotError {
    /// The slot id is out of range.
    #[error("slot id {slot} is out of range (at most {max} user slots)")]
    InvalidSlotId {
        /// The id.
        slot: u32,
        /// Number of slots.
        max: u32,
    },
    /// Unknown flag bits.
    #[error("unknown memslot flags {0:#x}")]
    UnknownFlags(u32),
    /// A field is not page-aligned.
    #[error("{field} {value:#x} is not aligned to {PAGE_SIZE} bytes")]
    Unaligned {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// `memory_size` 0 deletes a slot, and there is no such slot.
    #[error("memory_size 0 deletes a slot, but slot {slot} does not exist")]
    ZeroSize {
        /// The id.
        slot: u32,
    },
    /// The range leaves guest physical address space.
    #[error("range {gpa:#x}+{size:#x} is beyond the {bits}-bit guest physical address space")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Size.
        size: u64,
        /// Guest physical address bits.
        bits: u32,
    },
    /// The range overlaps another slot.
    #[error(
        "range {gpa:#x}+{size:#x} of slot {slot} overlaps slot {other} at {other_gpa:#x}+{other_size:#x}"
    )]
    Overlap {
        /// The id.
        slot: u32,
        /// Start.
        gpa: u64,
        /// Size.
        size: u64,
        /// The slot it overlaps.
        other: u32,
        /// Its start.
        other_gpa: u64,
        /// Its size.
        other_size: u64,
    },
    /// The slot exists with another range or other memory; only its flags may
    /// change in place.
    #[error(
        "slot {slot} already exists at {gpa:#x}+{size:#x}; only its flags can change in place \
         (delete it first to move, resize or re-back it)"
    )]
    Duplicate {
        /// The id.
        slot: u32,
        /// Its current start.
        gpa: u64,
        /// Its current size.
        size: u64,
    },
    /// No slot has this id.
    #[error("slot {slot} does not exist")]
    NoSuchSlot {
        /// The id.
        slot: u32,
    },
    /// `KVM_MEM_READONLY` cannot be toggled on an existing slot.
    #[error("slot {slot}: KVM_MEM_READONLY cannot change on an existing slot")]
    ReadonlyChange {
        /// The id.
        slot: u32,
    },
    /// No host memory given for a new slot.
    #[error("slot {slot}: a new slot needs host memory")]
    NoMemory {
        /// The id.
        slot: u32,
    },
    /// The host memory does not cover the slot.
    #[error("slot {slot}: host memory of {len:#x} bytes cannot back {size:#x} bytes at offset {offset:#x}")]
    MemoryTooSmall {
        /// The id.
        slot: u32,
        /// Offset asked for.
        offset: u64,
        /// Size asked for.
        size: u64,
        /// Size of the host memory.
        len: u64,
    },
}

/// One memslot (`struct kvm_memory_slot`).
#[derive(Debug)]
pub struct Memslot {
    id: u32,
    base_gfn: u64,
    npages: u64,
    flags: AtomicU32,
    invalid: AtomicBool,
    memory: Arc<HostMemory>,
    first_page: u64,
    rmap: [Box<[PteListHead]>; KVM_NR_PAGE_SIZES],
    dirty_bitmap: DirtyBitmap,
    /// Write-tracking count of each page (`gfn_track[KVM_PAGE_TRACK_WRITE]`).
    write_track: Box<[AtomicU16]>,
    /// Tracked pages in each 2 MiB region (`disallow_lpage`): no large spte
    /// may map a region with one.
    lpage_track: Box<[AtomicU16]>,
}

/// `gfn_to_index`: index of the rmap head of `gfn` at `level` in a slot
/// starting at `base_gfn`.
#[inline]
pub const fn gfn_to_index(gfn: u64, base_gfn: u64, level: u8) -> usize {
    let shift = 9 * (level as u32 - 1);
    ((gfn >> shift) - (base_gfn >> shift)) as usize
}

fn rmap_array(len: usize) -> Box<[PteListHead]> {
    #[cfg(not(loom))]
    {
        let arr = Box::<[PteListHead]>::new_zeroed_slice(len);
        // SAFETY: `PteListHead` is a transparent `AtomicUsize`, for which
        // all-zero bytes are valid and mean "empty list".
        unsafe { arr.assume_init() }
    }
    #[cfg(loom)]
    {
        (0..len).map(|_| PteListHead::new()).collect()
    }
}

impl Memslot {
    fn new(r: &UserMemoryRegion, memory: Arc<HostMemory>) -> Self {
        let base_gfn = r.guest_phys_addr >> PAGE_SHIFT;
        let npages = r.memory_size >> PAGE_SHIFT;
        let last = base_gfn + npages - 1;
        let rmap = std::array::from_fn(|i| {
            let level = i as u8 + PT_PAGE_TABLE_LEVEL;
            rmap_array(gfn_to_index(last, base_gfn, level) + 1)
        });
        Self {
            id: r.slot,
            base_gfn,
            npages,
            flags: AtomicU32::new(r.flags.bits()),
            invalid: AtomicBool::new(false),
            memory,
            first_page: r.memory_offset >> PAGE_SHIFT,
            write_track: (0..npages).map(|_| AtomicU16::new(0)).collect(),
            lpage_track: (0..=gfn_to_index(last, base_gfn, PT_DIRECTORY_LEVEL))
                .map(|_| AtomicU16::new(0))
                .collect(),
            rmap,
            dirty_bitmap: DirtyBitmap::new(npages),
        }
    }

    /// Slot id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// First gfn.
    pub fn base_gfn(&self) -> u64 {
        self.base_gfn
    }

    /// Number of pages.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// Does the slot contain `gfn`?
    #[inline]
    pub fn contains(&self, gfn: u64) -> bool {
        gfn.wrapping_sub(self.base_gfn) < self.npages
    }

    /// Current flags.
    #[inline]
    pub fn flags(&self) -> MemFlags {
        // Relaxed: flags change only under slots_lock and mmu_lock; readers
        // that act on them hold one of the two (the slow fault path,
        // get_dirty_log), or read them inside a lockless walk, which the
        // SeqCst fences of `begin_lockless_walk` and
        // `synchronize_lockless_walks` order against the change
        // (`mmu/fast_fault.rs`).
        MemFlags(self.flags.load(Ordering::Relaxed))
    }

    pub(crate) fn set_flags(&self, flags: MemFlags) {
        // Relaxed: see `flags`; a change that lockless walks must see is
        // followed by `synchronize_lockless_walks`, whose fence orders it.
        self.flags.store(flags.bits(), Ordering::Relaxed);
    }

    /// Is dirty logging on?
    #[inline]
    pub fn dirty_logging(&self) -> bool {
        self.flags().contains(MemFlags::LOG_DIRTY_PAGES)
    }

    /// Is the slot read-only to the guest?
    #[inline]
    pub fn readonly(&self) -> bool {
        self.flags().contains(MemFlags::READONLY)
    }

    /// Is the slot being deleted (`KVM_MEMSLOT_INVALID`)?
    #[inline]
    pub fn is_invalid(&self) -> bool {
        // Relaxed: set under mmu_lock; the fault path checks it under mmu_lock.
        self.invalid.load(Ordering::Relaxed)
    }

    pub(crate) fn set_invalid(&self) {
        // Relaxed: see `is_invalid`.
        self.invalid.store(true, Ordering::Relaxed);
    }

    /// The host memory.
    pub fn memory(&self) -> &Arc<HostMemory> {
        &self.memory
    }

    /// Index in the host memory of the page backing `gfn`.
    #[inline]
    pub fn host_page_index(&self, gfn: u64) -> u64 {
        debug_assert!(self.contains(gfn));
        self.first_page + (gfn - self.base_gfn)
    }

    /// Host pfn backing `gfn` (`gfn_to_pfn_memslot`).
    #[inline]
    pub fn gfn_to_pfn(&self, gfn: u64) -> u64 {
        self.memory.host_pfn(self.host_page_index(gfn))
    }

    /// The rmap head of `gfn` at `level` (`__gfn_to_rmap`).
    #[inline]
    pub fn rmap(&self, gfn: u64, level: u8) -> &PteListHead {
        debug_assert!(self.contains(gfn));
        &self.rmap[(level - PT_PAGE_TABLE_LEVEL) as usize][gfn_to_index(gfn, self.base_gfn, level)]
    }

    /// All rmap heads at `level`.
    pub fn rmaps(&self, level: u8) -> &[PteListHead] {
        &self.rmap[(level - PT_PAGE_TABLE_LEVEL) as usize]
    }

    /// First gfn covered by rmap head `index` at `level`.
    pub fn rmap_index_gfn(&self, index: usize, level: u8) -> u64 {
        level_base_gfn(self.base_gfn, level) + index as u64 * pages_per_spte(level)
    }

    /// Can `gfn` be mapped by a 2 MiB spte? Only when the whole 2 MiB-aligned
    /// region lies in this slot (KVM also requires that the host mapping be
    /// huge; our host memory is not).
    #[inline]
    pub fn lpage_ok(&self, gfn: u64) -> bool {
        let base = level_base_gfn(gfn, PT_DIRECTORY_LEVEL);
        base >= self.base_gfn && base + pages_per_spte(PT_DIRECTORY_LEVEL) <= self.base_gfn + self.npages
    }

    /// Is `gfn` write-tracked (`kvm_page_track_is_active`)? The fault path and
    /// the trackers read and change the counts under `mmu_lock`.
    #[inline]
    pub fn is_write_tracked(&self, gfn: u64) -> bool {
        // Relaxed: under mmu_lock (see the doc).
        self.write_track[(gfn - self.base_gfn) as usize].load(Ordering::Relaxed) != 0
    }

    /// Does the 2 MiB region of `gfn` hold a tracked page?
    #[inline]
    pub fn lpage_tracked(&self, gfn: u64) -> bool {
        // Relaxed: under mmu_lock.
        self.lpage_track[gfn_to_index(gfn, self.base_gfn, PT_DIRECTORY_LEVEL)].load(Ordering::Relaxed) != 0
    }

    /// Adds (`delta` = 1) or drops (-1) one write-tracking reference of `gfn`;
    /// returns false, changing nothing, if that would go below 0 or above
    /// `u16::MAX`. Under `mmu_lock`.
    pub(crate) fn update_write_track(&self, gfn: u64, delta: i32) -> bool {
        let i = (gfn - self.base_gfn) as usize;
        // Relaxed: under mmu_lock.
        let n = i32::from(self.write_track[i].load(Ordering::Relaxed)) + delta;
        let Ok(n) = u16::try_from(n) else { return false };
        self.write_track[i].store(n, Ordering::Relaxed);
        let l = &self.lpage_track[gfn_to_index(gfn, self.base_gfn, PT_DIRECTORY_LEVEL)];
        let ln = i32::from(l.load(Ordering::Relaxed)) + delta;
        l.store(u16::try_from(ln).expect("region count follows page counts"), Ordering::Relaxed);
        true
    }

    /// The dirty bitmap.
    pub fn dirty_bitmap(&self) -> &DirtyBitmap {
        &self.dirty_bitmap
    }

    /// `mark_page_dirty_in_slot`. The caller owes the release fence of
    /// patch 06 before this call (see `dirty_bitmap.rs`).
    #[inline]
    pub fn mark_page_dirty(&self, gfn: u64) {
        self.dirty_bitmap.mark(gfn - self.base_gfn);
    }

    /// Guest physical address of the slot.
    pub fn guest_phys_addr(&self) -> u64 {
        self.base_gfn << PAGE_SHIFT
    }

    /// Size of the slot in bytes.
    pub fn memory_size(&self) -> u64 {
        self.npages * PAGE_SIZE
    }
}

/// The kind of change a region asks for, once validated.
#[derive(Debug)]
pub(crate) enum MemslotChange {
    /// A new slot.
    Create(Arc<Memslot>),
    /// Delete this slot.
    Delete(Arc<Memslot>),
    /// Only the flags of this slot change.
    FlagsOnly(Arc<Memslot>, MemFlags),
}

/// A published set of memslots (`struct kvm_memslots`).
#[derive(Debug, Default, Clone)]
pub struct Memslots {
    slots: Vec<Arc<Memslot>>,
}

impl Memslots {
    /// The slot containing `gfn` (`gfn_to_memslot`).
    #[inline]
    pub fn find(&self, gfn: u64) -> Option<&Arc<Memslot>> {
        let i = self.slots.partition_point(|s| s.base_gfn + s.npages <= gfn);
        self.slots.get(i).filter(|s| s.contains(gfn))
    }

    /// The slot with id `id` (`id_to_memslot`).
    pub fn get(&self, id: u32) -> Option<&Arc<Memslot>> {
        self.slots.iter().find(|s| s.id == id)
    }

    /// All slots, by base gfn.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Memslot>> {
        self.slots.iter()
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// No slots?
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Total pages in all slots.
    pub fn total_pages(&self) -> u64 {
        self.slots.iter().map(|s| s.npages).sum()
    }

    /// Validates `r` against this set (`__kvm_set_memory_region`'s checks).
    pub(crate) fn prepare(&self, r: &UserMemoryRegion) -> Result<MemslotChange, MemslotError> {
        let slot = r.slot;
        if slot >= KVM_USER_MEM_SLOTS {
            return Err(MemslotError::InvalidSlotId { slot, max: KVM_USER_MEM_SLOTS });
        }
        MemFlags::from_bits(r.flags.bits()).ok_or(MemslotError::UnknownFlags(r.flags.bits()))?;
        for (field, value) in [
            ("guest_phys_addr", r.guest_phys_addr),
            ("memory_size", r.memory_size),
            ("memory_offset", r.memory_offset),
        ] {
            if value % PAGE_SIZE != 0 {
                return Err(MemslotError::Unaligned { field, value });
            }
        }
        let old = self.get(slot);
        if r.memory_size == 0 {
            return match old {
                Some(old) => Ok(MemslotChange::Delete(old.clone())),
                None => Err(MemslotError::ZeroSize { slot }),
            };
        }
        let end = r.guest_phys_addr.checked_add(r.memory_size);
        if end.is_none_or(|end| end > GFN_LIMIT << PAGE_SHIFT) {
            return Err(MemslotError::OutOfRange {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                bits: shadow_mmu_core::spte::GUEST_PHYS_BITS,
            });
        }
        if let Some(old) = old {
            let same_memory = r.memory.as_ref().is_none_or(|m| Arc::ptr_eq(m, &old.memory))
                && r.memory_offset >> PAGE_SHIFT == old.first_page;
            if old.guest_phys_addr() != r.guest_phys_addr
                || old.memory_size() != r.memory_size
                || !same_memory
            {
                return Err(MemslotError::Duplicate {
                    slot,
                    gpa: old.guest_phys_addr(),
                    size: old.memory_size(),
                });
            }
            if old.flags().contains(MemFlags::READONLY) != r.flags.contains(MemFlags::READONLY) {
                return Err(MemslotError::ReadonlyChange { slot });
            }
            return Ok(MemslotChange::FlagsOnly(old.clone(), r.flags));
        }
        for other in &self.slots {
            let (a0, a1) = (r.guest_phys_addr, r.guest_phys_addr + r.memory_size);
            let (b0, b1) = (other.guest_phys_addr(), other.guest_phys_addr() + other.memory_size());
            if a0 < b1 && b0 < a1 {
                return Err(MemslotError::Overlap {
                    slot,
                    gpa: a0,
                    size: r.memory_size,
                    other: other.id,
                    other_gpa: b0,
                    other_size: other.memory_size(),
                });
            }
        }
        let memory = r.memory.clone().ok_or(MemslotError::NoMemory { slot })?;
        if r.memory_offset.checked_add(r.memory_size).is_none_or(|e| e > memory.len()) {
            return Err(MemslotError::MemoryTooSmall {
                slot,
                offset: r.memory_offset,
                size: r.memory_size,
                len: memory.len(),
            });
        }
        Ok(MemslotChange::Create(Arc::new(Memslot::new(r, memory))))
    }

    /// This set with `slot` added.
    pub(crate) fn with(&self, slot: Arc<Memslot>) -> Self {
        let mut slots = self.slots.clone();
        let i = slots.partition_point(|s| s.base_gfn < slot.base_gfn);
        slots.insert(i, slot);
        Self { slots }
    }

    /// This set without slot `id`.
    pub(crate) fn without(&self, id: u32) -> Self {
        Self { slots: self.slots.iter().filter(|s| s.id != id).cloned().collect() }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn region(slot: u32, gpa: u64, size: u64, mem: &Arc<HostMemory>) -> UserMemoryRegion {
        UserMemoryRegion {
            slot,
            flags: MemFlags::empty(),
            guest_phys_addr: gpa,
            memory_size: size,
            memory: Some(mem.clone()),
            memory_offset: 0,
        }
    }

    fn created(slots: &Memslots, r: &UserMemoryRegion) -> Memslots {
        match slots.prepare(r).unwrap() {
            MemslotChange::Create(s) => slots.with(s),
            other => panic!("expected create, got {other:?}"),
        }
    }

    #[test]
    fn lookup_and_rmap_geometry() {
        let mem = HostMemory::anonymous(4 << 20).unwrap();
        let slots = Memslots::default();
        let slots = created(&slots, &region(1, 2 << 20, 2 << 20, &mem));
        let slots = created(&slots, &region(0, 0, 1 << 20, &mem));
        assert_eq!(slots.find(0).unwrap().id(), 0);
        assert_eq!(slots.find(255).unwrap().id(), 0);
        assert!(slots.find(256).is_none(), "hole between slots");
        assert_eq!(slots.find(512).unwrap().id(), 1);
        assert!(slots.find(1024).is_none());
        let s1 = slots.get(1).unwrap();
        assert_eq!(s1.rmaps(1).len(), 512);
        assert_eq!(s1.rmaps(2).len(), 1);
        assert!(s1.lpage_ok(700));
        let s0 = slots.get(0).unwrap();
        assert!(!s0.lpage_ok(3), "1 MiB slot cannot hold a 2 MiB page");
        assert_eq!(s1.gfn_to_pfn(513), mem.host_pfn(1));
        assert_eq!(s1.rmap_index_gfn(0, 2), 512);
    }

    #[test]
    fn bad_regions_are_refused_with_typed_errors() {
        let mem = HostMemory::anonymous(1 << 20).unwrap();
        let slots = created(&Memslots::default(), &region(0, 0, 1 << 20, &mem));
        let big = HostMemory::anonymous(8 << 20).unwrap();
        let cases: Vec<(UserMemoryRegion, MemslotError)> = vec![
            (
                region(KVM_USER_MEM_SLOTS, 0, PAGE_SIZE, &mem),
                MemslotError::InvalidSlotId { slot: 509, max: 509 },
            ),
            (
                region(1, 0x1001, PAGE_SIZE, &mem),
                MemslotError::Unaligned { field: "guest_phys_addr", value: 0x1001 },
            ),
            (region(1, 1 << 20, 100, &mem), MemslotError::Unaligned { field: "memory_size", value: 100 }),
            (region(1, 1 << 20, 0, &mem), MemslotError::ZeroSize { slot: 1 }),
            (
                region(1, (1 << 48) - PAGE_SIZE, 8192, &mem),
                MemslotError::OutOfRange { gpa: (1 << 48) - PAGE_SIZE, size: 8192, bits: 48 },
            ),
            (
                region(1, 0x8_0000, 1 << 20, &big),
                MemslotError::Overlap {
                    slot: 1,
                    gpa: 0x8_0000,
                    size: 1 << 20,
                    other: 0,
                    other_gpa: 0,
                    other_size: 1 << 20,
                },
            ),
            (region(0, 1 << 20, 1 << 20, &mem), MemslotError::Duplicate { slot: 0, gpa: 0, size: 1 << 20 }),
            (
                region(1, 1 << 20, 2 << 20, &mem),
                MemslotError::MemoryTooSmall { slot: 1, offset: 0, size: 2 << 20, len: 1 << 20 },
            ),
        ];
        for (r, want) in cases {
            assert_eq!(slots.prepare(&r).unwrap_err(), want, "{r:?}");
        }
        let mut ro = region(0, 0, 1 << 20, &mem);
        ro.flags = MemFlags::READONLY;
        assert_eq!(slots.prepare(&ro).unwrap_err(), MemslotError::ReadonlyChange { slot: 0 });
        let mut none = region(2, 4 << 20, PAGE_SIZE, &mem);
        none.memory = None;
        assert_eq!(slots.prepare(&none).unwrap_err(), MemslotError::NoMemory { slot: 2 });
        let mut offs = region(2, 4 << 20, PAGE_SIZE, &mem);
        offs.memory_offset = 12;
        assert_eq!(
            slots.prepare(&offs).unwrap_err(),
            MemslotError::Unaligned { field: "memory_offset", value: 12 }
        );
        assert_eq!(MemFlags::from_bits(4), None);
    }

    #[test]
    fn flags_only_and_delete() {
        let mem = HostMemory::anonymous(1 << 20).unwrap();
        let slots = created(&Memslots::default(), &region(0, 0, 1 << 20, &mem));
        let mut logging = region(0, 0, 1 << 20, &mem);
        logging.flags = MemFlags::LOG_DIRTY_PAGES;
        assert!(
            matches!(slots.prepare(&logging).unwrap(), MemslotChange::FlagsOnly(_, f) if f == MemFlags::LOG_DIRTY_PAGES)
        );
        logging.memory = None;
        assert!(
            matches!(slots.prepare(&logging).unwrap(), MemslotChange::FlagsOnly(..)),
            "memory may be omitted"
        );
        let del = region(0, 0, 0, &mem);
        assert!(matches!(slots.prepare(&del).unwrap(), MemslotChange::Delete(_)));
        assert!(slots.without(0).is_empty());
    }
}
