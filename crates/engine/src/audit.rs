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

use crate::mmu::lock::MmuGuard;
use crate::shadow_page::{SpPtr, page_header};
use crate::spte::{
    PT_PAGE_TABLE_LEVEL, SPTE_HOST_WRITEABLE, SPTE_MMU_WRITEABLE, is_large_pte, is_last_spte,
    is_shadow_present_pte, is_writable_pte, level_base_gfn, mapping_levels, pages_per_spte, spte_level,
    spte_to_pfn,
};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::vm::Kvm;

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
    /// Runs the audit.
    pub(crate) fn audit(&self, opts: AuditOptions) -> Result<AuditReport, AuditError> {
        let g = self.mmu.lock.lock();
        let slots = self.memslots.load_full();
        let mut report = AuditReport::default();
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

        // rmaps: structure, and where each entry is.
        let mut rmap_entries: HashMap<usize, (u32, u8, usize)> = HashMap::new();
        for slot in slots.iter() {
            for level in mapping_levels() {
                for (idx, head) in slot.rmaps(level).iter().enumerate() {
                    // SAFETY: we hold mmu_lock, so no writer runs; descriptors
                    // are type-stable pool memory.
                    let n = unsafe { head.check_invariants() };
                    report.rmap_entries += n;
                    report.max_rmap_len = report.max_rmap_len.max(n);
                    // SAFETY: as above.
                    for sptep in unsafe { head.iter() } {
                        let prev = rmap_entries.insert(sptep.as_ptr() as usize, (slot.id(), level, idx));
                        ensure!(prev.is_none(), Rmap, "spte {sptep:p} in two rmaps");
                    }
                }
            }
        }

        // Shadow pages.
        let active: Vec<SpPtr> = g.active_pages().collect();
        report.shadow_pages = active.len();
        ensure!(
            active.len() == g.n_used_mmu_pages,
            PageLists,
            "active list {} != n_used {}",
            active.len(),
            g.n_used_mmu_pages
        );
        let hashed = g.hash_len();
        ensure!(hashed == g.n_used_mmu_pages, PageLists, "hash {hashed} != n_used {}", g.n_used_mmu_pages);
        let live: HashSet<SpPtr> = active.iter().copied().collect();
        let mut parents_seen: HashMap<SpPtr, usize> = HashMap::new();
        for &sp in &active {
            let p = sp.get(&g);
            let role = p.role();
            ensure!(!p.is_invalid(), PageLists, "{p:?} invalid but active");
            ensure!(g.hash_lookup(p.gfn(), role) == Some(sp), PageLists, "{p:?} not hashed under its key");
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
                    self.audit_leaf(
                        &g,
                        &mut report,
                        &rmap_entries,
                        &slots,
                        ring_pending.as_ref(),
                        opts,
                        sptep,
                        spte,
                        gfn,
                        role.level,
                    )?;
                } else {
                    // SAFETY: a present non-leaf spte of one of our tables.
                    let child = unsafe { SpPtr::from_nonleaf_spte(spte) };
                    ensure!(live.contains(&child), Table, "{p:?}[{i}] points to a dead page");
                    let c = child.get(&g);
                    ensure!(
                        c.role().level + 1 == role.level,
                        Table,
                        "{p:?}[{i}]: child level {}",
                        c.role().level
                    );
                    ensure!(
                        c.gfn() == level_base_gfn(gfn, role.level),
                        Table,
                        "{p:?}[{i}]: child gfn {:#x}",
                        c.gfn()
                    );
                    // SAFETY: we hold mmu_lock.
                    let has = unsafe { c.parent_ptes().iter() }.any(|q| std::ptr::eq(q.as_ptr(), sptep));
                    ensure!(has, Table, "{p:?}[{i}] missing from its child's parent_ptes");
                    *parents_seen.entry(child).or_default() += 1;
                }
            }
        }
        for &sp in &active {
            // SAFETY: we hold mmu_lock.
            let n = unsafe { sp.get(&g).parent_ptes().check_invariants() };
            let seen = parents_seen.get(&sp).copied().unwrap_or(0);
            ensure!(n == seen, Table, "{:?}: {n} parent ptes, {seen} sptes point to it", sp.get(&g));
            if sp.get(&g).root_count() > 0 {
                ensure!(n == 0, Table, "{:?}: a root with parents", sp.get(&g));
            }
        }
        ensure!(
            report.leaf_sptes == report.rmap_entries,
            Rmap,
            "{} leaf sptes but {} rmap entries",
            report.leaf_sptes,
            report.rmap_entries
        );
        Ok(report)
    }

    #[allow(clippy::too_many_arguments)]
    fn audit_leaf(
        &self,
        g: &MmuGuard<'_>,
        report: &mut AuditReport,
        rmap_entries: &HashMap<usize, (u32, u8, usize)>,
        slots: &crate::memslot::Memslots,
        ring_pending: Option<&HashSet<(u32, u64)>>,
        opts: AuditOptions,
        sptep: &AtomicU64,
        spte: u64,
        gfn: u64,
        level: u8,
    ) -> Result<(), AuditError> {
        report.leaf_sptes += 1;
        ensure!(level <= crate::spte::PT_MAX_HUGEPAGE_LEVEL, Leaf, "leaf at level {level}");
        ensure!((level > PT_PAGE_TABLE_LEVEL) == is_large_pte(spte), Leaf, "spte {spte:#x} at level {level}");
        let slot = slots.find(gfn).ok_or_else(|| AuditError::Structure {
            invariant: Invariant::Leaf,
            detail: format!("leaf for gfn {gfn:#x} outside memslots"),
        })?;
        ensure!(!slot.is_invalid(), Leaf, "leaf into deleted slot {}", slot.id());
        ensure!(spte_to_pfn(spte) == slot.gfn_to_pfn(gfn), Leaf, "gfn {gfn:#x}: spte pfn is not the slot's");
        let at = rmap_entries.get(&(sptep as *const AtomicU64 as usize));
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
            if opts.dirty_log && slot.dirty_logging() {
                // Under INITIALLY_SET a large spte stays writable until a
                // CLEAR reaches it; every page under it is then still marked.
                ensure!(
                    !is_large_pte(spte) || self.dirty_log_protect().initially_set(),
                    Leaf,
                    "writable large spte in logged slot {}",
                    slot.id()
                );
                for g in gfn..gfn + pages_per_spte(level) {
                    let rel = g - slot.base_gfn();
                    let marked = match ring_pending {
                        Some(p) => p.contains(&(slot.id(), rel)),
                        None => slot.dirty_bitmap().test(rel),
                    };
                    if !marked {
                        return Err(AuditError::DirtyLog { gfn: g });
                    }
                }
            }
        }
        Ok(())
    }
}
