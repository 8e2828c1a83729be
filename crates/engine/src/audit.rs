//! The MMU audit (KVM's `mmu_audit.c`): checks, under `mmu_lock`, that the
//! shadow page tables, the hash, the active list, the rmaps and the parent
//! lists agree, and (optionally) the dirty logging invariant.
//!
//! The dirty logging invariant: a writable leaf spte in a slot that logs
//! dirty pages has its page's bit set in the dirty bitmap (with PML: a
//! writable 4 KiB leaf with D set; with D clear its next store is logged). It is what makes
//! harvesting correct (a page that can be written without a fault has been,
//! or will be, reported). In the locked design it holds whenever `mmu_lock`
//! is free. Check it with vCPUs stopped.

use std::collections::{HashMap, HashSet};

use crate::memslot::Memslots;
use crate::mmu::lock::MmuGuard;
use crate::shadow_page::{SpPtr, page_header};
use crate::vm::Kvm;
use shadow_mmu_core::spte::{
    PT_DIRTY_MASK, PT_PAGE_TABLE_LEVEL, SPTE_HOST_WRITEABLE, SPTE_MMU_WRITEABLE, is_large_pte, is_last_spte,
    is_shadow_present_pte, is_writable_pte, level_base_gfn, mapping_levels, pages_per_spte, spte_level,
    spte_to_pfn,
};
use shadow_mmu_core::sync::atomic::{AtomicU64, Ordering};

/// What to check beyond structure.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuditOptions {
    /// Check the dirty logging invariant (module docs).
    pub dirty_log: bool,
}

/// What the audit counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Shadow pages on the active list.
    pub shadow_pages: usize,
    /// Present leaf sptes.
    pub leaf_sptes: usize,
    /// ... of which large.
    pub large_sptes: usize,
    /// ... of which writable.
    pub writable_sptes: usize,
    /// Entries in all rmaps.
    pub rmap_entries: usize,
    /// Longest rmap.
    pub max_rmap_len: usize,
}

/// Which of the MMU's structural invariants an audit found broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invariant {
    /// pte_list structure, or an spte in two rmaps.
    Rmap,
    /// The shadow page hash, the active list and `n_used_mmu_pages` agree.
    PageLists,
    /// A shadow page table: encodings, children, parent ptes.
    Table,
    /// A leaf spte: level, pfn, slot, rmap entry, permissions.
    Leaf,
}

impl std::fmt::Display for Invariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Invariant::Rmap => "rmaps",
            Invariant::PageLists => "shadow page lists",
            Invariant::Table => "shadow page tables",
            Invariant::Leaf => "leaf sptes",
        })
    }
}

/// What an audit found wrong (the first thing; the audit stops there).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// The dirty logging invariant: a writable spte in a logged slot, for a
    /// page whose dirty bit is clear. Its next writes would be lost.
    #[error("dirty log invariant: gfn {gfn:#x} writable but not marked dirty")]
    DirtyLog {
        /// The page.
        gfn: u64,
    },
    /// A structural invariant of the MMU.
    #[error("MMU invariant ({invariant}): {0}", invariant = .0.invariant())]
    Structure(Violation),
}

/// A shadow page, as an audit names it: the gfn it maps and its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpAt {
    /// `sp->gfn`.
    pub gfn: u64,
    /// `sp->role.level`.
    pub level: u8,
}

impl std::fmt::Display for SpAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shadow page gfn {:#x} level {}", self.gfn, self.level)
    }
}

/// A broken structural invariant, with what the audit found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// An spte in two rmaps.
    #[error("spte {sptep:#x} in two rmaps")]
    SpteInTwoRmaps {
        /// Its address.
        sptep: usize,
    },
    /// An rmap whose lock bit is held with no walker running (a walk or a
    /// writer that did not drop it).
    #[error("rmap {index} of slot {slot} level {level} is left locked")]
    RmapLockHeld {
        /// The slot.
        slot: u32,
        /// The rmap's level.
        level: u8,
        /// Its index in the slot's rmaps of that level.
        index: usize,
    },
    /// Not one rmap entry per present leaf spte.
    #[error("{leaf_sptes} leaf sptes but {rmap_entries} rmap entries")]
    RmapCount {
        /// Present leaf sptes.
        leaf_sptes: usize,
        /// Entries in all rmaps.
        rmap_entries: usize,
    },
    /// The active list's length is not `n_used_mmu_pages`.
    #[error("active list {active} != n_used {n_used}")]
    ActiveCount {
        /// Pages on the active list.
        active: usize,
        /// `n_used_mmu_pages`.
        n_used: usize,
    },
    /// The hash's population is not `n_used_mmu_pages`.
    #[error("hash {hashed} != n_used {n_used}")]
    HashCount {
        /// Pages in the hash.
        hashed: usize,
        /// `n_used_mmu_pages`.
        n_used: usize,
    },
    /// An invalid page on the active list.
    #[error("{0} invalid but active")]
    InvalidActive(SpAt),
    /// An active page not found in the hash under its key.
    #[error("{0} not hashed under its key")]
    NotHashed(SpAt),
    /// A non-present spte that is not 0.
    #[error("{sp}[{index}]: non-present spte {spte:#x} is not 0")]
    NonPresentNotZero {
        /// The page.
        sp: SpAt,
        /// The spte's index.
        index: usize,
        /// Its value.
        spte: u64,
    },
    /// An spte that encodes another level than its page's.
    #[error("{sp}[{index}]: spte {spte:#x} encodes another level")]
    SpteLevel {
        /// The page.
        sp: SpAt,
        /// The spte's index.
        index: usize,
        /// Its value.
        spte: u64,
    },
    /// A non-leaf spte that points to a page not on the active list.
    #[error("{sp}[{index}] points to a dead page")]
    DeadChild {
        /// The page.
        sp: SpAt,
        /// The spte's index.
        index: usize,
    },
    /// A child one level below its parent's, or at another gfn than the
    /// spte maps.
    #[error("{sp}[{index}]: child {child}")]
    ChildMisplaced {
        /// The page.
        sp: SpAt,
        /// The spte's index.
        index: usize,
        /// The child.
        child: SpAt,
    },
    /// A non-leaf spte missing from its child's `parent_ptes`.
    #[error("{sp}[{index}] missing from its child's parent_ptes")]
    MissingParentPte {
        /// The page.
        sp: SpAt,
        /// The spte's index.
        index: usize,
    },
    /// Not one parent pte per spte that points to the page.
    #[error("{sp}: {parent_ptes} parent ptes, {pointing} sptes point to it")]
    ParentCount {
        /// The page.
        sp: SpAt,
        /// Entries in its `parent_ptes`.
        parent_ptes: usize,
        /// sptes that point to it.
        pointing: usize,
    },
    /// The TDP design: an rmap entry (its tree has no rmap).
    #[error("the TDP MMU has {0} rmap entries; it keeps none")]
    TdpRmapEntries(usize),
    /// The TDP design: not as many tables in the trees as
    /// `tdp_mmu_pages` counts.
    #[error("{walked} tables in the TDP MMU's trees, {counted} counted")]
    TdpPageCount {
        /// Tables reached from the roots.
        walked: usize,
        /// `tdp_mmu_pages`.
        counted: i64,
    },
    /// A root with parents.
    #[error("{0}: a root with parents")]
    RootWithParents(SpAt),
    /// A leaf above the largest page size.
    #[error("leaf at level {level}")]
    LeafLevel {
        /// Its level.
        level: u8,
    },
    /// A leaf whose large-page bit disagrees with its level.
    #[error("spte {spte:#x} at level {level}")]
    LargeBit {
        /// The spte.
        spte: u64,
        /// Its level.
        level: u8,
    },
    /// A leaf for a gfn in no memslot.
    #[error("leaf for gfn {gfn:#x} outside memslots")]
    OutsideMemslots {
        /// The gfn.
        gfn: u64,
    },
    /// A leaf into a slot being deleted.
    #[error("gfn {gfn:#x}: leaf into deleted slot {slot}")]
    DeletedSlot {
        /// The gfn.
        gfn: u64,
        /// The slot.
        slot: u32,
    },
    /// A leaf whose pfn is not the slot's for its gfn.
    #[error("gfn {gfn:#x}: spte {spte:#x}'s pfn is not the slot's")]
    Pfn {
        /// The gfn.
        gfn: u64,
        /// The spte.
        spte: u64,
    },
    /// A leaf in another rmap than its gfn's, or in none:
    /// `(slot, level, index)`.
    #[error("gfn {gfn:#x} level {level}: spte in rmap {found:?}, want {want:?}")]
    RmapPlace {
        /// The gfn.
        gfn: u64,
        /// The leaf's level.
        level: u8,
        /// The rmap it is in.
        found: Option<(u32, u8, usize)>,
        /// The rmap it belongs in.
        want: (u32, u8, usize),
    },
    /// `page_header` of the sptep names a page of another level.
    #[error("gfn {gfn:#x} level {level}: page_header disagrees")]
    PageHeader {
        /// The gfn.
        gfn: u64,
        /// The leaf's level.
        level: u8,
    },
    /// A large spte over a slot's edge.
    #[error("large spte over a slot edge at gfn {gfn:#x}")]
    LargeOverEdge {
        /// The gfn.
        gfn: u64,
    },
    /// A writable spte without both of its writable bits.
    #[error("gfn {gfn:#x}: writable spte {spte:#x} without HW|MW")]
    WritableWithoutHwMw {
        /// The gfn.
        gfn: u64,
        /// The spte.
        spte: u64,
    },
    /// A writable spte into a read-only slot.
    #[error("gfn {gfn:#x}: writable spte into read-only slot {slot}")]
    WritableReadOnly {
        /// The gfn.
        gfn: u64,
        /// The slot.
        slot: u32,
    },
    /// A writable large spte in a logged slot (without INITIALLY_SET).
    #[error("gfn {gfn:#x}: writable large spte in logged slot {slot}")]
    WritableLargeLogged {
        /// The gfn.
        gfn: u64,
        /// The slot.
        slot: u32,
    },
}

impl Violation {
    /// The invariant it breaks.
    pub fn invariant(&self) -> Invariant {
        use Violation as V;
        match self {
            V::SpteInTwoRmaps { .. }
            | V::RmapCount { .. }
            | V::RmapLockHeld { .. }
            | V::TdpRmapEntries(_) => Invariant::Rmap,
            V::ActiveCount { .. } | V::HashCount { .. } | V::InvalidActive(_) | V::NotHashed(_) => {
                Invariant::PageLists
            }
            V::NonPresentNotZero { .. }
            | V::SpteLevel { .. }
            | V::DeadChild { .. }
            | V::ChildMisplaced { .. }
            | V::MissingParentPte { .. }
            | V::ParentCount { .. }
            | V::RootWithParents(_)
            | V::TdpPageCount { .. } => Invariant::Table,
            V::LeafLevel { .. }
            | V::LargeBit { .. }
            | V::OutsideMemslots { .. }
            | V::DeletedSlot { .. }
            | V::Pfn { .. }
            | V::RmapPlace { .. }
            | V::PageHeader { .. }
            | V::LargeOverEdge { .. }
            | V::WritableWithoutHwMw { .. }
            | V::WritableReadOnly { .. }
            | V::WritableLargeLogged { .. } => Invariant::Leaf,
        }
    }
}

/// Returns the violation if the invariant does not hold.
macro_rules! ensure {
    ($cond:expr, $violation:expr) => {
        if !$cond {
            return Err(AuditError::Structure($violation));
        }
    };
}

impl Kvm {
    /// Runs the audit, phase by phase as `mmu_audit.c` does: the rmaps,
    /// the lists of shadow pages, each page's table (its leaves and its
    /// children), the parent lists.
    pub(crate) fn audit(&self, opts: AuditOptions) -> Result<AuditReport, AuditError> {
        let g = self.mmu.lock.lock();
        let slots = self.memslots.load_full();
        // With the dirty ring on, a page is marked while an entry for it is
        // pushed and not yet reset, in any vCPU's ring.
        let ring_pending: Option<HashSet<(u32, u64)>> = (self.dirty_ring_entries() != 0).then(|| {
            let mut set = HashSet::new();
            for r in self.dirty_rings.lock().iter() {
                r.ring.for_each_pending(|s, o| {
                    set.insert((s, o));
                });
            }
            set
        });
        let mut a = Auditor {
            kvm: self,
            g: &g,
            slots: &slots,
            opts,
            ring_pending,
            rmap_entries: HashMap::new(),
            parents_seen: HashMap::new(),
            report: AuditReport::default(),
        };
        a.audit_rmaps()?;
        if self.mmu.design == crate::mmu::MmuDesign::Tdp {
            let r = a.report.rmap_entries;
            ensure!(r == 0, Violation::TdpRmapEntries(r));
            a.audit_page_lists()?;
            a.audit_tdp_roots()?;
            return Ok(a.report);
        }
        let active = a.audit_page_lists()?;
        let live: HashSet<SpPtr> = active.iter().copied().collect();
        for &sp in &active {
            a.audit_sp(sp, &live)?;
        }
        a.audit_parent_ptes(&active)?;
        let r = a.report;
        ensure!(
            r.leaf_sptes == r.rmap_entries,
            Violation::RmapCount { leaf_sptes: r.leaf_sptes, rmap_entries: r.rmap_entries }
        );
        Ok(r)
    }
}

/// Where `sp` is, for a violation.
fn sp_at(g: &MmuGuard<'_>, sp: SpPtr) -> SpAt {
    let p = sp.get(g);
    SpAt { gfn: p.gfn(), level: p.role().level }
}

/// One audit, under `mmu_lock`: what it has seen so far, for the checks
/// that follow.
struct Auditor<'a, 'g> {
    kvm: &'a Kvm,
    g: &'a MmuGuard<'g>,
    slots: &'a Memslots,
    opts: AuditOptions,
    /// With the dirty ring on: `(slot, offset)` of each entry pushed and
    /// not yet reset.
    ring_pending: Option<HashSet<(u32, u64)>>,
    /// Where each rmap entry (an sptep) is: slot, level, index.
    rmap_entries: HashMap<usize, (u32, u8, usize)>,
    /// For each shadow page, how many sptes point to it.
    parents_seen: HashMap<SpPtr, usize>,
    report: AuditReport,
}

impl Auditor<'_, '_> {
    /// The rmaps: each pte_list's structure, and no spte in two of them.
    fn audit_rmaps(&mut self) -> Result<(), AuditError> {
        for slot in self.slots.iter() {
            for level in mapping_levels() {
                for (idx, head) in slot.rmaps(level).iter().enumerate() {
                    let held = head.is_rmap_locked();
                    ensure!(!held, Violation::RmapLockHeld { slot: slot.id(), level, index: idx });
                    // SAFETY: we hold mmu_lock, so no writer runs; descriptors
                    // are type-stable pool memory.
                    let n = unsafe { head.check_invariants() };
                    self.report.rmap_entries += n;
                    self.report.max_rmap_len = self.report.max_rmap_len.max(n);
                    // SAFETY: as above.
                    for sptep in unsafe { head.iter() } {
                        let prev = self.rmap_entries.insert(sptep.as_ptr() as usize, (slot.id(), level, idx));
                        ensure!(prev.is_none(), Violation::SpteInTwoRmaps { sptep: sptep.as_ptr() as usize });
                    }
                }
            }
        }
        Ok(())
    }

    /// The active list, the hash and `n_used_mmu_pages` agree
    /// (`audit_all_active_sps`); returns the active pages.
    fn audit_page_lists(&mut self) -> Result<Vec<SpPtr>, AuditError> {
        let g = self.g;
        let active: Vec<SpPtr> = g.active_pages().collect();
        self.report.shadow_pages = active.len();
        let n_used = g.n_used_mmu_pages;
        ensure!(active.len() == n_used, Violation::ActiveCount { active: active.len(), n_used });
        let hashed = g.hash_len();
        ensure!(hashed == n_used, Violation::HashCount { hashed, n_used });
        for &sp in &active {
            let p = sp.get(g);
            ensure!(!p.is_invalid(), Violation::InvalidActive(sp_at(g, sp)));
            ensure!(g.hash_lookup(p.gfn(), p.role()) == Some(sp), Violation::NotHashed(sp_at(g, sp)));
        }
        Ok(active)
    }

    /// Each spte of `sp`'s table: zero when not present, of the page's
    /// level, a leaf ([`Self::audit_leaf`]) or a live child that lists it
    /// among its parents.
    fn audit_sp(&mut self, sp: SpPtr, live: &HashSet<SpPtr>) -> Result<(), AuditError> {
        let g = self.g;
        let p = sp.get(g);
        let role = p.role();
        let at = sp_at(g, sp);
        for (index, sptep) in p.spt().iter().enumerate() {
            // Relaxed: we hold mmu_lock, which orders every writer before us.
            let spte = sptep.load(Ordering::Relaxed);
            if !is_shadow_present_pte(spte) {
                ensure!(spte == 0, Violation::NonPresentNotZero { sp: at, index, spte });
                continue;
            }
            ensure!(spte_level(spte) == role.level, Violation::SpteLevel { sp: at, index, spte });
            let gfn = p.spte_gfn(index);
            if is_last_spte(spte, role.level) {
                self.audit_leaf(sptep, spte, gfn, role.level)?;
                continue;
            }
            // SAFETY: a present non-leaf spte of one of our tables.
            let child = unsafe { SpPtr::from_nonleaf_spte(spte) };
            ensure!(live.contains(&child), Violation::DeadChild { sp: at, index });
            let c = child.get(g);
            let placed = c.role().level + 1 == role.level && c.gfn() == level_base_gfn(gfn, role.level);
            ensure!(placed, Violation::ChildMisplaced { sp: at, index, child: sp_at(g, child) });
            // SAFETY: we hold mmu_lock.
            let has = unsafe { c.parent_ptes().iter() }.any(|q| std::ptr::eq(q.as_ptr(), sptep));
            ensure!(has, Violation::MissingParentPte { sp: at, index });
            *self.parents_seen.entry(child).or_default() += 1;
        }
        Ok(())
    }

    /// The TDP design's trees, from each root: every table at its level
    /// and place, entries 0 (never left frozen) or of the table's level,
    /// leaves checked as the shadow MMU's but for the rmap, and as many
    /// tables as `tdp_mmu_pages` counts.
    fn audit_tdp_roots(&mut self) -> Result<(), AuditError> {
        let g = self.g;
        let mut tables = 0usize;
        let mut stack: Vec<SpPtr> = self.kvm.tdp_mmu_roots().collect();
        while let Some(sp) = stack.pop() {
            tables += 1;
            let p = sp.get(g);
            let (level, at) = (p.role().level, sp_at(g, sp));
            for (index, sptep) in p.spt().iter().enumerate() {
                // Relaxed: we hold mmu_lock for write; only the fast path
                // writes beside us, and only W.
                let spte = sptep.load(Ordering::Relaxed);
                if !is_shadow_present_pte(spte) {
                    ensure!(spte == 0, Violation::NonPresentNotZero { sp: at, index, spte });
                    continue;
                }
                ensure!(spte_level(spte) == level, Violation::SpteLevel { sp: at, index, spte });
                let gfn = p.spte_gfn(index);
                if is_last_spte(spte, level) {
                    self.audit_leaf(sptep, spte, gfn, level)?;
                    continue;
                }
                // SAFETY: a present non-leaf spte of one of our tables.
                let child = unsafe { SpPtr::from_nonleaf_spte(spte) };
                let c = child.get(g);
                let placed = c.role().level + 1 == level && c.gfn() == level_base_gfn(gfn, level);
                ensure!(placed, Violation::ChildMisplaced { sp: at, index, child: sp_at(g, child) });
                stack.push(child);
            }
        }
        let counted = self.kvm.mmu.tdp.pages.load(std::sync::atomic::Ordering::Relaxed);
        ensure!(tables as i64 == counted, Violation::TdpPageCount { walked: tables, counted });
        self.report.shadow_pages = tables;
        Ok(())
    }

    /// Each page's parent list holds exactly the sptes that point to it;
    /// a root has none.
    fn audit_parent_ptes(&self, active: &[SpPtr]) -> Result<(), AuditError> {
        let g = self.g;
        for &sp in active {
            // SAFETY: we hold mmu_lock.
            let n = unsafe { sp.get(g).parent_ptes().check_invariants() };
            let seen = self.parents_seen.get(&sp).copied().unwrap_or(0);
            let at = sp_at(g, sp);
            ensure!(n == seen, Violation::ParentCount { sp: at, parent_ptes: n, pointing: seen });
            if sp.get(g).root_count() > 0 {
                ensure!(n == 0, Violation::RootWithParents(at));
            }
        }
        Ok(())
    }

    /// A leaf spte (`inspect_spte_has_rmap`, `audit_write_protection`):
    /// its level, pfn, slot and rmap entry, its permissions, and the dirty
    /// logging invariant.
    fn audit_leaf(&mut self, sptep: &AtomicU64, spte: u64, gfn: u64, level: u8) -> Result<(), AuditError> {
        let (g, report) = (self.g, &mut self.report);
        report.leaf_sptes += 1;
        ensure!(level <= shadow_mmu_core::spte::PT_MAX_HUGEPAGE_LEVEL, Violation::LeafLevel { level });
        ensure!((level > PT_PAGE_TABLE_LEVEL) == is_large_pte(spte), Violation::LargeBit { spte, level });
        let slot = self.slots.find(gfn).ok_or(AuditError::Structure(Violation::OutsideMemslots { gfn }))?;
        ensure!(!slot.is_invalid(), Violation::DeletedSlot { gfn, slot: slot.id() });
        ensure!(spte_to_pfn(spte) == slot.gfn_to_pfn(gfn), Violation::Pfn { gfn, spte });
        if self.kvm.mmu.design != crate::mmu::MmuDesign::Tdp {
            let found = self.rmap_entries.get(&(sptep as *const AtomicU64 as usize)).copied();
            let want = (slot.id(), level, crate::memslot::gfn_to_index(gfn, slot.base_gfn(), level));
            ensure!(found == Some(want), Violation::RmapPlace { gfn, level, found, want });
        }
        // SAFETY: `sptep` is in one of our tables.
        let header_level = unsafe { page_header(sptep) }.get(g).role().level;
        ensure!(header_level == level, Violation::PageHeader { gfn, level });
        if is_large_pte(spte) {
            report.large_sptes += 1;
            ensure!(slot.lpage_ok(gfn), Violation::LargeOverEdge { gfn });
        }
        if is_writable_pte(spte) {
            report.writable_sptes += 1;
            let both = SPTE_HOST_WRITEABLE | SPTE_MMU_WRITEABLE;
            ensure!(spte & both == both, Violation::WritableWithoutHwMw { gfn, spte });
            ensure!(!slot.readonly(), Violation::WritableReadOnly { gfn, slot: slot.id() });
            // With PML a 4 KiB leaf is re-armed by clearing D: writable
            // with D clear, its next store logs it (`vcpu/pml.rs`).
            let pml_armed = self.kvm.mmu.tdp.pml && level == PT_PAGE_TABLE_LEVEL && spte & PT_DIRTY_MASK == 0;
            if self.opts.dirty_log && slot.dirty_logging() && !pml_armed {
                // Under INITIALLY_SET a large spte stays writable until a
                // CLEAR reaches it; every page under it is then still marked.
                ensure!(
                    !is_large_pte(spte) || self.kvm.dirty_log_protect().initially_set(),
                    Violation::WritableLargeLogged { gfn, slot: slot.id() }
                );
                for page in gfn..gfn + pages_per_spte(level) {
                    let rel = page - slot.base_gfn();
                    let marked = match &self.ring_pending {
                        Some(p) => p.contains(&(slot.id(), rel)),
                        None => slot.dirty_bitmap().test(rel),
                    };
                    if !marked {
                        return Err(AuditError::DirtyLog { gfn: page });
                    }
                }
            }
        }
        Ok(())
    }
}
