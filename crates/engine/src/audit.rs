//! The MMU audit (KVM's `mmu_audit.c`): checks, under `mmu_lock`, that the
//! shadow page tables, the hash, the active list, the rmaps and the parent
//! lists agree, and (optionally) the dirty logging invariant.
//!
//! The dirty logging invariant: a writable leaf spte in a slot that logs
//! dirty pages has its page's bit set in the dirty bitmap. It is what makes
//! harvesting correct (a page that can be written without a fault has been,
//! or will be, reported). In the locked design it holds whenever `mmu_lock`
//! is free. Check it with vCPUs stopped.

use std::collections::{HashMap, HashSet};

use crate::memslot::Memslots;
use crate::mmu::lock::MmuGuard;
use crate::shadow_page::{SpPtr, page_header};
use crate::vm::Kvm;
use shadow_mmu_core::spte::{
    PT_PAGE_TABLE_LEVEL, SPTE_HOST_WRITEABLE, SPTE_MMU_WRITEABLE, is_large_pte, is_last_spte,
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
    #[error("MMU invariant ({invariant}): {detail}")]
    Structure {
        /// Which.
        invariant: Invariant,
        /// What was found, for a person.
        detail: String,
    },
}

macro_rules! ensure {
    ($cond:expr, $inv:ident, $($fmt:tt)*) => {
        if !$cond {
            return Err(AuditError::Structure { invariant: Invariant::$inv, detail: format!($($fmt)*) });
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
        let active = a.audit_page_lists()?;
        let live: HashSet<SpPtr> = active.iter().copied().collect();
        for &sp in &active {
            a.audit_sp(sp, &live)?;
        }
        a.audit_parent_ptes(&active)?;
        let r = a.report;
        ensure!(
            r.leaf_sptes == r.rmap_entries,
            Rmap,
            "{} leaf sptes but {} rmap entries",
            r.leaf_sptes,
            r.rmap_entries
        );
        Ok(r)
    }
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
                    // SAFETY: we hold mmu_lock, so no writer runs; descriptors
                    // are type-stable pool memory.
                    let n = unsafe { head.check_invariants() };
                    self.report.rmap_entries += n;
                    self.report.max_rmap_len = self.report.max_rmap_len.max(n);
                    // SAFETY: as above.
                    for sptep in unsafe { head.iter() } {
                        let prev = self.rmap_entries.insert(sptep.as_ptr() as usize, (slot.id(), level, idx));
                        ensure!(prev.is_none(), Rmap, "spte {sptep:p} in two rmaps");
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
        ensure!(
            active.len() == g.n_used_mmu_pages,
            PageLists,
            "active list {} != n_used {}",
            active.len(),
            g.n_used_mmu_pages
        );
        let hashed = g.hash_len();
        ensure!(hashed == g.n_used_mmu_pages, PageLists, "hash {hashed} != n_used {}", g.n_used_mmu_pages);
        for &sp in &active {
            let p = sp.get(g);
            ensure!(!p.is_invalid(), PageLists, "{p:?} invalid but active");
            ensure!(
                g.hash_lookup(p.gfn(), p.role()) == Some(sp),
                PageLists,
                "{p:?} not hashed under its key"
            );
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
        for (i, sptep) in p.spt().iter().enumerate() {
            // Relaxed: we hold mmu_lock, which orders every writer before us.
            let spte = sptep.load(Ordering::Relaxed);
            if !is_shadow_present_pte(spte) {
                ensure!(spte == 0, Table, "{p:?}[{i}]: non-present spte {spte:#x} is not 0");
                continue;
            }
            ensure!(
                spte_level(spte) == role.level,
                Table,
                "{p:?}[{i}]: spte {spte:#x} encodes another level"
            );
            let gfn = p.spte_gfn(i);
            if is_last_spte(spte, role.level) {
                self.audit_leaf(sptep, spte, gfn, role.level)?;
                continue;
            }
            // SAFETY: a present non-leaf spte of one of our tables.
            let child = unsafe { SpPtr::from_nonleaf_spte(spte) };
            ensure!(live.contains(&child), Table, "{p:?}[{i}] points to a dead page");
            let c = child.get(g);
            ensure!(c.role().level + 1 == role.level, Table, "{p:?}[{i}]: child level {}", c.role().level);
            ensure!(
                c.gfn() == level_base_gfn(gfn, role.level),
                Table,
                "{p:?}[{i}]: child gfn {:#x}",
                c.gfn()
            );
            // SAFETY: we hold mmu_lock.
            let has = unsafe { c.parent_ptes().iter() }.any(|q| std::ptr::eq(q.as_ptr(), sptep));
            ensure!(has, Table, "{p:?}[{i}] missing from its child's parent_ptes");
            *self.parents_seen.entry(child).or_default() += 1;
        }
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
            ensure!(n == seen, Table, "{:?}: {n} parent ptes, {seen} sptes point to it", sp.get(g));
            if sp.get(g).root_count() > 0 {
                ensure!(n == 0, Table, "{:?}: a root with parents", sp.get(g));
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
        ensure!(level <= shadow_mmu_core::spte::PT_MAX_HUGEPAGE_LEVEL, Leaf, "leaf at level {level}");
        ensure!((level > PT_PAGE_TABLE_LEVEL) == is_large_pte(spte), Leaf, "spte {spte:#x} at level {level}");
        let slot = self.slots.find(gfn).ok_or_else(|| AuditError::Structure {
            invariant: Invariant::Leaf,
            detail: format!("leaf for gfn {gfn:#x} outside memslots"),
        })?;
        ensure!(!slot.is_invalid(), Leaf, "leaf into deleted slot {}", slot.id());
        ensure!(spte_to_pfn(spte) == slot.gfn_to_pfn(gfn), Leaf, "gfn {gfn:#x}: spte pfn is not the slot's");
        let at = self.rmap_entries.get(&(sptep as *const AtomicU64 as usize));
        let want = (slot.id(), level, crate::memslot::gfn_to_index(gfn, slot.base_gfn(), level));
        ensure!(at == Some(&want), Leaf, "gfn {gfn:#x} level {level}: spte in rmap {at:?}, want {want:?}");
        // SAFETY: `sptep` is in one of our tables.
        ensure!(unsafe { page_header(sptep) }.get(g).role().level == level, Leaf, "page_header disagrees");
        if is_large_pte(spte) {
            report.large_sptes += 1;
            ensure!(slot.lpage_ok(gfn), Leaf, "large spte over a slot edge at gfn {gfn:#x}");
        }
        if is_writable_pte(spte) {
            report.writable_sptes += 1;
            let both = SPTE_HOST_WRITEABLE | SPTE_MMU_WRITEABLE;
            ensure!(spte & both == both, Leaf, "writable spte {spte:#x} without HW|MW");
            ensure!(!slot.readonly(), Leaf, "writable spte into read-only slot {}", slot.id());
            if self.opts.dirty_log && slot.dirty_logging() {
                // Under INITIALLY_SET a large spte stays writable until a
                // CLEAR reaches it; every page under it is then still marked.
                ensure!(
                    !is_large_pte(spte) || self.kvm.dirty_log_protect().initially_set(),
                    Leaf,
                    "writable large spte in logged slot {}",
                    slot.id()
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
