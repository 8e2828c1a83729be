//! The shadow page table entry (spte): one `u64`, stored in an `AtomicU64`.
//!
//! This module owns the encoding. Everything else reads and builds sptes
//! through the helpers below, named as in `arch/x86/kvm/mmu.c`.
//!
//! ```text
//!  63      55 54  52 51                                12 11 10  9  8  7  6  5  4  3  2  1  0
//! +----------+------+------------------------------------+--+--+-----+--+--+--+-----+--+--+--+
//! |    0     |level |                pfn                 |MW|HW|  0  |PS| D| A|  0  | U| W| P|
//! +----------+------+------------------------------------+--+--+-----+--+--+--+-----+--+--+--+
//! ```
//!
//! - `P` present, `W` writable, `U` user, `A` accessed, `D` dirty, `PS` large
//!   (a 2 MiB leaf at level 2), as in the x86 page table format.
//! - `HW` = `SPTE_HOST_WRITEABLE`: the host mapping of the page is writable.
//! - `MW` = `SPTE_MMU_WRITEABLE`: the MMU allows the page to be writable; it is
//!   write-protected (W clear) only for dirty logging. An spte with both set is
//!   [`spte_is_locklessly_modifiable`]: it may be made writable again without
//!   `mmu_lock` (fast page fault), so whoever clears W on it must flush TLBs
//!   (patch 04/15).
//! - `pfn`: for a leaf, the host page frame, i.e. the host virtual address of
//!   the guest page shifted right by 12 (our "host physical" memory is the
//!   process's anonymous mappings); for a non-leaf entry, the address of the
//!   child shadow page table >> 12, as KVM stores `__pa(sp->spt)`.
//! - `level`: the level of the table the spte sits in (1 = 4 KiB tables, 4 =
//!   root). The seed's review (patch 12/15) asked for it: a lockless walker
//!   that races with the reuse of a shadow page can then tell a leaf from a
//!   pointer to a table by the spte alone, and never clears W on a non-leaf.
//!
//! Invariants kept by the MMU:
//! - a non-present spte is exactly 0;
//! - W implies both HW and MW;
//! - a non-leaf spte is present, writable, has PS clear and a level >= 2.

/// Level of the 4 KiB page tables (`PT_PAGE_TABLE_LEVEL`).
pub const PT_PAGE_TABLE_LEVEL: u8 = 1;
/// Level of the page directories, where a 2 MiB leaf may sit (`PT_DIRECTORY_LEVEL`).
pub const PT_DIRECTORY_LEVEL: u8 = 2;
/// Level of the root of a 4-level, 48-bit direct map (`PT64_ROOT_LEVEL`).
pub const PT64_ROOT_LEVEL: u8 = 4;
/// Highest level at which a leaf may sit. We map 4 KiB and 2 MiB pages (KVM
/// also maps 1 GiB pages; the seed's logic does not depend on it).
pub const PT_MAX_HUGEPAGE_LEVEL: u8 = PT_DIRECTORY_LEVEL;
/// Number of page sizes we map, and thus of rmap arrays per memslot (`KVM_NR_PAGE_SIZES`).
pub const KVM_NR_PAGE_SIZES: usize = PT_MAX_HUGEPAGE_LEVEL as usize;

/// Every level a leaf may sit at, 4 KiB first (KVM's `for (i =
/// PT_PAGE_TABLE_LEVEL; i < PT_PAGE_TABLE_LEVEL + KVM_NR_PAGE_SIZES; ++i)`).
#[inline]
pub fn mapping_levels() -> std::ops::RangeInclusive<u8> {
    PT_PAGE_TABLE_LEVEL..=PT_MAX_HUGEPAGE_LEVEL
}

/// sptes per shadow page table (`PT64_ENT_PER_PAGE`).
pub const PT64_ENT_PER_PAGE: usize = 512;
/// log2 of the guest and host page size.
pub const PAGE_SHIFT: u32 = 12;
/// Guest and host page size.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// 64-bit words per page: the unit in which guest memory is read and written.
pub const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;
/// Bits of guest physical address a 4-level map translates.
pub const GUEST_PHYS_BITS: u32 = 48;
/// One past the highest gfn a 4-level map can translate.
pub const GFN_LIMIT: u64 = 1 << (GUEST_PHYS_BITS - PAGE_SHIFT);

/// Present.
pub const PT_PRESENT_MASK: u64 = 1 << 0;
/// Writable.
pub const PT_WRITABLE_MASK: u64 = 1 << 1;
/// User accessible.
pub const PT_USER_MASK: u64 = 1 << 2;
/// Accessed.
pub const PT_ACCESSED_MASK: u64 = 1 << 5;
/// Dirty.
pub const PT_DIRTY_MASK: u64 = 1 << 6;
/// Large page (2 MiB leaf at level 2).
pub const PT_PAGE_SIZE_MASK: u64 = 1 << 7;
/// First software-available bit, as in the KVM of 2013.
pub const PT_FIRST_AVAIL_BITS_SHIFT: u32 = 10;
/// The host mapping is writable.
pub const SPTE_HOST_WRITEABLE: u64 = 1 << PT_FIRST_AVAIL_BITS_SHIFT;
/// The MMU allows writes; W is clear only for dirty logging.
pub const SPTE_MMU_WRITEABLE: u64 = 1 << (PT_FIRST_AVAIL_BITS_SHIFT + 1);
/// The pfn field (bits 12..=51).
pub const PT64_BASE_ADDR_MASK: u64 = ((1 << 52) - 1) & !(PAGE_SIZE - 1);
/// Shift of the level field, in the second software-available range.
pub const SPTE_LEVEL_SHIFT: u32 = 52;
/// The level field (bits 52..=54).
pub const SPTE_LEVEL_MASK: u64 = 0x7 << SPTE_LEVEL_SHIFT;

/// What a shadow page's table holds after its memory was "returned" in a
/// `break-rules` build: a value the MMU never makes (level 7), that lockless
/// readers check for, to catch reads of memory returned too early.
#[cfg(feature = "break-rules")]
pub const SPTE_POISON: u64 = PT_PRESENT_MASK | PT_WRITABLE_MASK | (7 << SPTE_LEVEL_SHIFT) | 0xdead_b000;

/// Is the spte present?
#[inline]
pub const fn is_shadow_present_pte(spte: u64) -> bool {
    spte & PT_PRESENT_MASK != 0
}

/// Is W set?
#[inline]
pub const fn is_writable_pte(spte: u64) -> bool {
    spte & PT_WRITABLE_MASK != 0
}

/// Is PS set (a large leaf)?
#[inline]
pub const fn is_large_pte(spte: u64) -> bool {
    spte & PT_PAGE_SIZE_MASK != 0
}

/// Does the spte map a page (rather than point to a table), given the level of
/// the table it sits in? As KVM's `is_last_spte`.
#[inline]
pub const fn is_last_spte(spte: u64, level: u8) -> bool {
    level == PT_PAGE_TABLE_LEVEL || is_large_pte(spte)
}

/// Is the spte present and a leaf, judged by the level encoded in the spte
/// itself? This is the check a lockless walker can make without trusting the
/// shadow page the spte sits in (the review of patch 12/15).
#[inline]
pub const fn is_last_spte_by_encoding(spte: u64) -> bool {
    is_shadow_present_pte(spte) && is_last_spte(spte, spte_level(spte))
}

/// Both HW and MW: W may be set again without `mmu_lock` (patch 04/15).
#[inline]
pub const fn spte_is_locklessly_modifiable(spte: u64) -> bool {
    spte & (SPTE_HOST_WRITEABLE | SPTE_MMU_WRITEABLE) == (SPTE_HOST_WRITEABLE | SPTE_MMU_WRITEABLE)
}

/// `spte_has_volatile_bits` (KVM 3.11): may a writer outside `mmu_lock`
/// change this spte, so that a locked update must read the old value with the
/// same atomic that writes the new one (`xchg`)? In 3.11 that is a locklessly
/// modifiable spte (the fast page fault may set W), or one whose accessed or
/// dirty bit the hardware may still set. We model no hardware A/D bits, so
/// only the first clause applies.
#[inline]
pub const fn spte_has_volatile_bits(spte: u64) -> bool {
    spte_is_locklessly_modifiable(spte)
}

/// The level of the table the spte sits in (0 for a non-present spte).
#[inline]
pub const fn spte_level(spte: u64) -> u8 {
    ((spte & SPTE_LEVEL_MASK) >> SPTE_LEVEL_SHIFT) as u8
}

/// The pfn field.
#[inline]
pub const fn spte_to_pfn(spte: u64) -> u64 {
    (spte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
}

/// The level field for an spte in a table of `level`.
#[inline]
pub const fn level_bits(level: u8) -> u64 {
    (level as u64) << SPTE_LEVEL_SHIFT
}

/// Number of 4 KiB pages one spte at `level` maps (`KVM_PAGES_PER_HPAGE`).
#[inline]
pub const fn pages_per_spte(level: u8) -> u64 {
    1 << (9 * (level as u32 - 1))
}

/// Index of the spte that translates `gfn` in a table of `level`.
#[inline]
pub const fn spte_index(gfn: u64, level: u8) -> usize {
    ((gfn >> (9 * (level as u32 - 1))) & (PT64_ENT_PER_PAGE as u64 - 1)) as usize
}

/// First gfn of the region an spte at `level` translates.
#[inline]
pub const fn level_base_gfn(gfn: u64, level: u8) -> u64 {
    gfn & !(pages_per_spte(level) - 1)
}

/// The leaf spte `set_spte` builds.
///
/// `host_writable`: the host mapping may be written (the memslot is not
/// read-only). `writable`: set W (and MW) now. A leaf that is not writable
/// now but is host-writable still gets MW, so that a later write fault can be
/// fixed by the fast path in the lockless design.
#[inline]
pub const fn make_leaf_spte(pfn: u64, level: u8, host_writable: bool, writable: bool) -> u64 {
    let mut spte = PT_PRESENT_MASK | PT_USER_MASK | PT_ACCESSED_MASK | level_bits(level);
    spte |= (pfn << PAGE_SHIFT) & PT64_BASE_ADDR_MASK;
    if level > PT_PAGE_TABLE_LEVEL {
        spte |= PT_PAGE_SIZE_MASK;
    }
    if host_writable {
        spte |= SPTE_HOST_WRITEABLE | SPTE_MMU_WRITEABLE;
        if writable {
            spte |= PT_WRITABLE_MASK | PT_DIRTY_MASK;
        }
    }
    spte
}

/// The non-leaf spte `link_shadow_page` builds: a pointer to the child table
/// at physical address `child_table_addr`, sitting in a table of `level`.
#[inline]
pub const fn make_nonleaf_spte(child_table_addr: u64, level: u8) -> u64 {
    (child_table_addr & PT64_BASE_ADDR_MASK)
        | PT_PRESENT_MASK
        | PT_WRITABLE_MASK
        | PT_USER_MASK
        | PT_ACCESSED_MASK
        | level_bits(level)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_encoding_round_trips() {
        let pfn = 0x0007_f123_4567_u64;
        let s = make_leaf_spte(pfn, 1, true, true);
        assert!(is_shadow_present_pte(s));
        assert!(is_writable_pte(s));
        assert!(!is_large_pte(s));
        assert_eq!(spte_to_pfn(s), pfn);
        assert_eq!(spte_level(s), 1);
        assert!(is_last_spte(s, 1));
        assert!(is_last_spte_by_encoding(s));
        assert!(spte_is_locklessly_modifiable(s));
    }

    #[test]
    fn write_protected_leaf_stays_locklessly_modifiable() {
        let s = make_leaf_spte(42, 1, true, false);
        assert!(!is_writable_pte(s));
        assert!(spte_is_locklessly_modifiable(s));
        assert_eq!(s & PT_DIRTY_MASK, 0);
        let ro = make_leaf_spte(42, 1, false, true);
        assert!(!is_writable_pte(ro), "a read-only host mapping is never writable");
        assert!(!spte_is_locklessly_modifiable(ro));
    }

    #[test]
    fn large_leaf_and_nonleaf_are_told_apart_by_encoding() {
        let large = make_leaf_spte(0x200, 2, true, true);
        assert!(is_large_pte(large));
        assert_eq!(spte_level(large), 2);
        assert!(is_last_spte_by_encoding(large));
        let nonleaf = make_nonleaf_spte(0xdead_b000, 2);
        assert!(is_writable_pte(nonleaf));
        assert!(!is_large_pte(nonleaf));
        assert!(!is_last_spte_by_encoding(nonleaf));
        assert_eq!(spte_to_pfn(nonleaf) << PAGE_SHIFT, 0xdead_b000);
        assert!(!is_last_spte_by_encoding(0), "non-present is never a leaf");
    }

    #[test]
    fn indices_and_bases() {
        let gfn = 0x1_2345u64;
        assert_eq!(spte_index(gfn, 1), 0x145);
        assert_eq!(spte_index(gfn, 2), 0x91);
        assert_eq!(level_base_gfn(gfn, 2), 0x1_2200);
        assert_eq!(pages_per_spte(1), 1);
        assert_eq!(pages_per_spte(2), 512);
        assert_eq!(pages_per_spte(4), 512 * 512 * 512);
    }
}
