//! Shadow pages (`struct kvm_mmu_page`): one table of 512 sptes plus the
//! header the MMU keeps about it.
//!
//! # Layout
//!
//! A [`ShadowPage`] is 4 KiB-aligned and its table (`spt`) sits at offset 0,
//! so the address of the table is the address of the page: a non-leaf spte
//! stores it as its pfn (KVM stores `__pa(sp->spt)`), and
//! `page_header` finds the header of any spte by masking its address, as
//! KVM's `page_header(__pa(sptep))` does through `struct page`. The price is
//! that each shadow page takes 8 KiB (4 KiB table, header, padding) where KVM
//! takes 4 KiB plus a slab header; a 1 GiB direct map needs about 513 shadow
//! pages, so 4 MiB instead of about 2.1 MiB.
//!
//! # Invariants
//!
//! - Header fields are written only under `mmu_lock`; they are atomics so that
//!   readers outside the lock (a vCPU's page walk, the fast page fault path,
//!   a lockless rmap walker) read them without a data race. Such readers must
//!   not trust them: the page may be zapped and reused under them. That is
//!   why the level is also encoded in each spte (see `spte.rs`).
//! - A shadow page handed back to the pool has every spte 0, no parent and no
//!   root reference ([`PoolObject::is_clean`]); the pool hands it out again
//!   as is, so a fresh page is always an empty table.
//! - `generation` is bumped every time the page is (re)allocated, so a reader
//!   that remembers it can tell that the page was reused under it.

use std::ptr::NonNull;

use shadow_mmu_core::pool::PoolObject;
use shadow_mmu_core::pte_list::PteListHead;
use shadow_mmu_core::spte::{
    PAGE_SIZE, PT_PAGE_TABLE_LEVEL, PT64_ENT_PER_PAGE, PT64_ROOT_LEVEL, pages_per_spte,
};
use shadow_mmu_core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// The role of a shadow page (`union kvm_mmu_page_role`), reduced to what a
/// direct map needs, plus the guest address space it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpRole {
    /// Level of the table (1 = 4 KiB page table, 4 = root).
    pub level: u8,
    /// A direct map of guest physical memory (always true here; KVM's
    /// indirect pages shadow guest page tables).
    pub direct: bool,
    /// Guest address space: our stand-in for the guest page table root that
    /// shadow paging keys its roots on. Each address space maps all of guest
    /// memory from its own root, so a gfn has one leaf spte per address space
    /// that touched it, and rmap chains longer than one.
    pub asid: u16,
}

impl SpRole {
    const fn pack(self) -> u32 {
        (self.level as u32) | ((self.direct as u32) << 8) | ((self.asid as u32) << 16)
    }

    const fn unpack(v: u32) -> Self {
        Self { level: (v & 0xff) as u8, direct: (v >> 8) & 1 != 0, asid: (v >> 16) as u16 }
    }
}

/// A shadow page: its table and its header.
#[repr(C, align(4096))]
pub struct ShadowPage {
    /// The table (`sp->spt`). Must stay the first field (see module docs).
    spt: [AtomicU64; PT64_ENT_PER_PAGE],
    gfn: AtomicU64,
    role: AtomicU32,
    root_count: AtomicU32,
    invalid: AtomicBool,
    generation: AtomicU64,
    /// The sptes that point to this page (`sp->parent_ptes`).
    parent_ptes: PteListHead,
    /// Links of `active_mmu_pages`, newest at the head, or of an invalid
    /// list between prepare and commit (under `mmu_lock`).
    link_prev: AtomicPtr<ShadowPage>,
    link_next: AtomicPtr<ShadowPage>,
    /// Next page in the same `mmu_page_hash` bucket (under `mmu_lock`).
    hash_next: AtomicPtr<ShadowPage>,
}

const _: () = assert!(std::mem::offset_of!(ShadowPage, spt) == 0);
const _: () = assert!(std::mem::align_of::<ShadowPage>() == PAGE_SIZE as usize);

impl std::fmt::Debug for ShadowPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowPage")
            .field("addr", &(self as *const Self))
            .field("gfn", &self.gfn())
            .field("role", &self.role())
            .field("root_count", &self.root_count())
            .field("invalid", &self.is_invalid())
            .finish()
    }
}

impl ShadowPage {
    /// spte `i` of the table.
    #[inline]
    pub fn spte(&self, i: usize) -> &AtomicU64 {
        &self.spt[i]
    }

    /// The whole table.
    #[inline]
    pub fn spt(&self) -> &[AtomicU64; PT64_ENT_PER_PAGE] {
        &self.spt
    }

    /// Index of `sptep` in this page's table.
    #[inline]
    pub fn spte_index_of(&self, sptep: *const AtomicU64) -> usize {
        let off = sptep as usize - self.spt.as_ptr() as usize;
        debug_assert!(off.is_multiple_of(8) && off < PAGE_SIZE as usize);
        off / 8
    }

    /// Address of the table, what a non-leaf spte stores.
    #[inline]
    pub fn table_addr(&self) -> u64 {
        self as *const Self as u64
    }

    /// First gfn the table translates.
    #[inline]
    pub fn gfn(&self) -> u64 {
        // Relaxed: written under mmu_lock before the page is linked; a reader
        // outside the lock reaches the page through a release-published spte
        // (acquire load), and must not trust the value anyway (module docs).
        self.gfn.load(Ordering::Relaxed)
    }

    /// The role.
    #[inline]
    pub fn role(&self) -> SpRole {
        // Relaxed: as `gfn`.
        SpRole::unpack(self.role.load(Ordering::Relaxed))
    }

    /// gfn mapped by spte `i` (`kvm_mmu_page_get_gfn` for a direct page).
    #[inline]
    pub fn spte_gfn(&self, i: usize) -> u64 {
        self.gfn() + i as u64 * pages_per_spte(self.role().level)
    }

    /// Root references held by address spaces (`sp->root_count`).
    pub fn root_count(&self) -> u32 {
        // Relaxed: only read and written under mmu_lock.
        self.root_count.load(Ordering::Relaxed)
    }

    /// Has the page been zapped (`sp->role.invalid`)?
    pub fn is_invalid(&self) -> bool {
        // Relaxed: only written under mmu_lock; unlocked readers use it as a
        // hint.
        self.invalid.load(Ordering::Relaxed)
    }

    /// Allocation generation (see module docs); only the tests read it.
    #[cfg(test)]
    pub fn generation(&self) -> u64 {
        // Acquire: pairs with the release increment in `init`, so a reader that
        // sees the new generation also sees the new header.
        self.generation.load(Ordering::Acquire)
    }

    /// The parent pte_list.
    pub fn parent_ptes(&self) -> &PteListHead {
        &self.parent_ptes
    }

    /// Is every spte non-present (`is_empty_shadow_page`)?
    pub fn is_empty(&self) -> bool {
        self.spt.iter().all(|s| s.load(Ordering::Relaxed) == 0)
    }

    // --- Header updates and list links, all under mmu_lock (the callers
    // hold it): every access below is relaxed because the lock orders them.

    /// Initialises the header of a page fresh from a memory cache.
    pub(crate) fn init(&self, gfn: u64, role: SpRole) {
        debug_assert!((PT_PAGE_TABLE_LEVEL..=PT64_ROOT_LEVEL).contains(&role.level));
        self.gfn.store(gfn, Ordering::Relaxed);
        self.role.store(role.pack(), Ordering::Relaxed);
        self.invalid.store(false, Ordering::Relaxed);
        // Release: see `generation`.
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn set_invalid(&self) {
        self.invalid.store(true, Ordering::Relaxed);
    }

    pub(crate) fn get_root(&self) {
        // Relaxed: under mmu_lock.
        self.root_count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn put_root(&self) {
        // Relaxed: under mmu_lock.
        let old = self.root_count.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(old > 0);
    }

    pub(crate) fn link_prev(&self) -> Option<SpPtr> {
        // Relaxed: under mmu_lock.
        NonNull::new(self.link_prev.load(Ordering::Relaxed)).map(SpPtr)
    }

    pub(crate) fn link_next(&self) -> Option<SpPtr> {
        // Relaxed: under mmu_lock.
        NonNull::new(self.link_next.load(Ordering::Relaxed)).map(SpPtr)
    }

    pub(crate) fn set_link_prev(&self, p: Option<SpPtr>) {
        // Relaxed: under mmu_lock.
        self.link_prev.store(p.map_or(std::ptr::null_mut(), |p| p.0.as_ptr()), Ordering::Relaxed);
    }

    pub(crate) fn set_link_next(&self, p: Option<SpPtr>) {
        // Relaxed: under mmu_lock.
        self.link_next.store(p.map_or(std::ptr::null_mut(), |p| p.0.as_ptr()), Ordering::Relaxed);
    }

    pub(crate) fn hash_next(&self) -> Option<SpPtr> {
        // Relaxed: under mmu_lock.
        NonNull::new(self.hash_next.load(Ordering::Relaxed)).map(SpPtr)
    }

    pub(crate) fn set_hash_next(&self, p: Option<SpPtr>) {
        // Relaxed: under mmu_lock.
        self.hash_next.store(p.map_or(std::ptr::null_mut(), |p| p.0.as_ptr()), Ordering::Relaxed);
    }
}

impl PoolObject for ShadowPage {
    #[cfg(not(loom))]
    fn construct() -> Box<Self> {
        let page = Box::<Self>::new_zeroed();
        // SAFETY: every field of `ShadowPage` is an atomic integer, bool or
        // pointer (or a struct of one), for which all-zero bytes are a valid
        // value; all-zero is exactly the clean state: empty table, no parent,
        // no root reference, null links.
        unsafe { page.assume_init() }
    }

    #[cfg(loom)]
    fn construct() -> Box<Self> {
        // loom's atomics are not plain memory: build each field.
        Box::new(Self {
            spt: std::array::from_fn(|_| AtomicU64::new(0)),
            gfn: AtomicU64::new(0),
            role: AtomicU32::new(0),
            root_count: AtomicU32::new(0),
            invalid: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            parent_ptes: PteListHead::new(),
            link_prev: AtomicPtr::new(std::ptr::null_mut()),
            link_next: AtomicPtr::new(std::ptr::null_mut()),
            hash_next: AtomicPtr::new(std::ptr::null_mut()),
        })
    }

    fn is_clean(&self) -> bool {
        self.is_empty() && self.parent_ptes.is_empty() && self.root_count() == 0
    }

    #[cfg(feature = "break-rules")]
    fn poison(&self) {
        for s in &self.spt {
            // Relaxed: a reader that comes too late reads it with whatever
            // ordering; the check is for the value.
            s.store(shadow_mmu_core::spte::SPTE_POISON, Ordering::Relaxed);
        }
        self.generation.fetch_add(1, Ordering::Relaxed);
    }
}

/// Proof that the shadow pages reachable from this VM's tables stay
/// allocated while the proof is borrowed. [`SpPtr::get`] takes one and hands
/// out a reference bound to its borrow, as crossbeam-epoch's
/// `load(&'g Guard)` does, so no reference to a shadow page outlives the
/// lock, the read-side section or the lockless walk that keeps it alive.
///
/// The implementors, and why each pins:
/// - `MmuGuard` (mmu/lock.rs): pages leave the tables and go back to the
///   pool only under `mmu_lock`, and only through functions that take the
///   guard mutably (`kvm_mmu_commit_zap_page`, `kvm_mmu_free_page`), so the
///   borrow checker ends every reference bound to `&MmuGuard` before one
///   runs;
/// - `LocklessWalk` and `InGuestMode` (mmu/walk.rs): a page is freed only
///   after a remote TLB flush, which waits for every vCPU in guest mode or
///   in a lockless walk (`kvm_mmu_commit_zap_page`, requests.rs point 2);
/// - `ReadGuard` and `NeverReturned`: a pool returns memory only after a
///   grace period (pool.rs), and the lockless rmap walk is inside one. The
///   TDP MMU hands an unlinked table back to the pool itself only after a
///   grace period (`Kvm::tdp_mmu_rcu_free`), so a table its walker reached
///   in a section is not even reused while the section lasts.
///
/// # Safety
/// An implementor guarantees that a shadow page read from this VM's tables,
/// rmaps or `mmu_page_hash` while the proof is borrowed stays a valid
/// `ShadowPage` (possibly zapped and reused, never freed) for that borrow.
pub(crate) unsafe trait PinsShadowPages {}

// SAFETY: a pool returns memory only after a grace period that began after
// the object was handed back, and a `ReadGuard`'s slot holds an epoch from
// before any such grace period ends (rcu.rs, pool.rs).
unsafe impl PinsShadowPages for shadow_mmu_core::rcu::ReadGuard<'_> {}
// SAFETY: by `NeverReturned::new`'s contract, nothing is returned while it
// lives.
unsafe impl PinsShadowPages for shadow_mmu_core::rcu::NeverReturned {}

/// A pointer to a shadow page of this VM's pool.
///
/// The memory is type-stable: the pool hands a freed page out again as a
/// shadow page, and returns memory to the system only after a grace period
/// (see `pool.rs`). An `SpPtr` is only ever made from a pool allocation or
/// from an spte of this VM. Dereferencing needs a [`PinsShadowPages`] proof.
/// The page may have been zapped and reused since the pointer was taken;
/// users that need the identity check it under `mmu_lock` or by generation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SpPtr(NonNull<ShadowPage>);

// SAFETY: a `ShadowPage` is all atomics, so it is `Sync`; the pointer is to
// type-stable memory (see the type's docs).
unsafe impl Send for SpPtr {}
// SAFETY: as above.
unsafe impl Sync for SpPtr {}

impl std::fmt::Debug for SpPtr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpPtr({:p})", self.0)
    }
}

impl SpPtr {
    /// From a pool allocation.
    pub(crate) fn from_pool(p: NonNull<ShadowPage>) -> Self {
        Self(p)
    }

    /// The pool allocation.
    pub(crate) fn as_non_null(self) -> NonNull<ShadowPage> {
        self.0
    }

    /// From a present non-leaf spte of this VM.
    ///
    /// # Safety
    /// `spte` was read from a shadow page table of this VM and is a present
    /// non-leaf entry, so its pfn is the address of a pool page.
    #[inline]
    pub(crate) unsafe fn from_nonleaf_spte(spte: u64) -> Self {
        let addr = (shadow_mmu_core::spte::spte_to_pfn(spte) << shadow_mmu_core::spte::PAGE_SHIFT) as usize;
        // SAFETY: by the caller's contract the address is a pool page, never 0.
        Self(unsafe { NonNull::new_unchecked(addr as *mut ShadowPage) })
    }

    /// The shadow page, for as long as `pin` is borrowed (the elided
    /// lifetime is the borrow's: `self` is a copy).
    #[inline]
    pub(crate) fn get(self, _pin: &impl PinsShadowPages) -> &ShadowPage {
        // SAFETY: the pointer is a shadow page of this VM (type docs) that
        // `_pin` keeps allocated while borrowed, and the result is bound to
        // that borrow (`PinsShadowPages`'s contract); all fields are atomics,
        // so a shared reference is race-free.
        unsafe { self.0.as_ref() }
    }
}

/// The shadow page an spte sits in (`page_header(__pa(sptep))`).
///
/// # Safety
/// `sptep` points into the table of a shadow page of this VM.
#[inline]
pub(crate) unsafe fn page_header(sptep: *const AtomicU64) -> SpPtr {
    let base = (sptep as usize) & !(PAGE_SIZE as usize - 1);
    // SAFETY: by the caller's contract the table starts at a 4 KiB boundary
    // that is also the start of its `ShadowPage` (layout, module docs).
    SpPtr(unsafe { NonNull::new_unchecked(base as *mut ShadowPage) })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn layout_and_page_header() {
        assert_eq!(std::mem::size_of::<ShadowPage>(), 8192);
        let sp = ShadowPage::construct();
        assert!(sp.is_clean());
        sp.init(0x200, SpRole { level: 2, direct: true, asid: 3 });
        assert_eq!(sp.role(), SpRole { level: 2, direct: true, asid: 3 });
        assert_eq!(sp.spte_gfn(5), 0x200 + 5 * 512);
        let sptep = sp.spte(77) as *const AtomicU64;
        assert_eq!(sp.spte_index_of(sptep), 77);
        // SAFETY: `sptep` points into `sp`'s table.
        let hdr = unsafe { page_header(sptep) };
        // SAFETY: `sp` outlives the section and is never returned.
        let pin = unsafe { shadow_mmu_core::rcu::NeverReturned::new() };
        assert!(std::ptr::eq(hdr.get(&pin), &*sp));
        let g = sp.generation();
        sp.init(0, SpRole { level: 1, direct: true, asid: 0 });
        assert_eq!(sp.generation(), g + 1);
    }
}
