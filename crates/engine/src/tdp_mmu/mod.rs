//! The TDP MMU (`arch/x86/kvm/mmu/tdp_mmu.c`, since 5.10; the default on
//! every EPT/NPT host since 5.15): the `tdp` design.
//!
//! The same direct map as the shadow MMU's, built the other way:
//! - **No rmap.** One paging tree per address space, of 512-entry tables
//!   (the shadow MMU's `ShadowPage`s, with no hash, parent list or rmap
//!   entry), 4 levels, 2 MiB leaves. Every action on a gfn range walks the
//!   tree with a [`tdp_iter::TdpIter`].
//! - **`mmu_lock` is an rwlock** (`mmu/lock.rs`). Read: vCPU slow faults
//!   (`fault.rs`), enable-logging's write protection and eager split
//!   (`dirty_log.rs`, `split.rs`). Write: the 64-page re-arm of GET, CLEAR
//!   and the ring reset, CLEAR's eager split, zaps, write tracking. None:
//!   the fast path.
//! - **Atomic sptes.** Under the read lock every store is a
//!   compare-exchange, and a loser re-evaluates the same entry; a table
//!   being taken apart parks its entries at `FROZEN_SPTE`. Under the write
//!   lock stores are plain unless the spte is volatile
//!   (`shadow_mmu_core::tdp`).
//! - **Tables freed after a grace period** of the VM's `rcu`
//!   ([`Kvm::tdp_mmu_rcu_free`]): every walk runs in a read-side section,
//!   and a table unlinked under the read lock may still be read by other
//!   walkers. vCPUs in guest mode are not in a section: the remote TLB
//!   flush, which waits for them, comes before the unlinker leaves its
//!   section, so the grace period ends after it.
//! - **Yielding** only after progress, when someone waits for the lock
//!   ([`Kvm::tdp_mmu_iter_cond_resched`]); the dirty-log walkers yield
//!   without flushing; the masked re-arm never yields.
//! - **Flushes batched**: one per enable, after unlock; one per GET, CLEAR
//!   or reset that cleared anything, after unlock (`harvest.rs`). A leaf
//!   that loses MMU-writable (write tracking) is flushed for at once.
//! - **Eager page splitting** (`split.rs`) on enable and at CLEAR, and
//!   **PML** (`VmConfig::pml`: D bits instead of W, `dirty_log.rs` and the
//!   vCPU's log in `vcpu/pml.rs`).
//!
//! Where we differ from upstream, and why:
//! - Roots: one per address space, made at the first fault under the read
//!   lock by compare-exchange, and kept until the VM goes; upstream's
//!   refcounted roots on an RCU list exist for root invalidation (SMM,
//!   CR0.WP, memslot flushes), which dirty logging never does.
//! - Disabling logging recovers no huge pages (upstream, since 6.13,
//!   `kvm_tdp_mmu_recover_huge_pages`): the other designs do not either.
//! - `need_resched()` is not modelled: a walk yields only when a thread
//!   waits for `mmu_lock` (`rwlock_needbreak`, as on a preemptible kernel).
//! - A read fault in a logged slot maps the page read-only (with
//!   MMU-writable), as the other designs do, so that the four designs log
//!   the same pages.
//! - The rest (no shadow page budget, the harvest's lock per chunk, the
//!   split cache, PML's drain) is in `docs/design.md`, "Where we differ".

pub(crate) mod dirty_log;
pub(crate) mod fault;
pub(crate) mod split;
pub(crate) mod tdp_iter;
pub(crate) mod zap;

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, AtomicUsize};

use parking_lot::Mutex;

use crate::mmu::MmuCaches;
use crate::mmu::lock::{MmuGuard, MmuReadGuard};
use crate::shadow_page::{ShadowPage, SpPtr, SpRole};
use crate::vm::Kvm;
use shadow_mmu_core::pool::MemoryCache;
use shadow_mmu_core::rcu::ReadGuard;
use shadow_mmu_core::spte::{PT64_ROOT_LEVEL, level_base_gfn};
use shadow_mmu_core::sync::atomic::{AtomicPtr, Ordering};
use tdp_iter::TdpIter;

/// Unlinked tables that may wait for a grace period before a reclaim waits
/// for one itself (the bound on deferred frees the seed's review asked for).
const MAX_DEFERRED_TABLES: usize = 4096;

/// The TDP MMU's own state (in every VM; used by the `tdp` design only).
pub(crate) struct TdpMmu {
    /// `kvm->arch.tdp_mmu_pages`: tables in the trees.
    pub(crate) pages: AtomicI64,
    /// Tables unlinked since the last reclaim (`call_rcu`), chained through
    /// their headers' `link_next` (unused by TDP tables otherwise), so that
    /// queuing one under `mmu_lock` allocates nothing.
    pending: Mutex<Option<SpPtr>>,
    /// Chains of unlinked tables waiting for their grace period, each with
    /// the `rcu` tag taken after every table in it was unlinked.
    waiting: Mutex<VecDeque<(u64, SpPtr)>>,
    /// Tables in `pending` and `waiting`.
    deferred: AtomicUsize,
    /// `kvm.eager_page_split`.
    pub(crate) eager_page_split: bool,
    /// PML (`enable_pml`): dirty logging clears D, not W, on 4 KiB leaves,
    /// and the vCPUs' page walks log D bits they set (`vcpu/pml.rs`).
    pub(crate) pml: bool,
    /// Tables for eager split, filled with `mmu_lock` dropped. Lock order:
    /// this, then `mmu_lock` (never the other way: a splitter holds it
    /// while it drops and retakes `mmu_lock` to allocate). Its vector was
    /// allocated with the VM, so using it under `mmu_lock` allocates
    /// nothing.
    pub(crate) split_cache: Mutex<MemoryCache<ShadowPage>>,
}

impl TdpMmu {
    pub(crate) fn new(eager_page_split: bool, pml: bool) -> Self {
        Self {
            pages: AtomicI64::new(0),
            pending: Mutex::new(None),
            waiting: Mutex::new(VecDeque::new()),
            deferred: AtomicUsize::new(0),
            eager_page_split,
            pml,
            split_cache: Mutex::new(MemoryCache::default()),
        }
    }
}

/// A lock mode a TDP walk may hold: what it needs to yield, and whether
/// others write sptes beside it.
pub(crate) trait TdpLock {
    /// Read lock: other writers run too, every store is a compare-exchange.
    const SHARED: bool;
    fn needbreak(&self) -> bool;
    /// Drops the lock for `f`, then takes it back.
    fn unlocked_for<R>(&mut self, f: impl FnOnce() -> R) -> R;
}

impl TdpLock for MmuReadGuard<'_> {
    const SHARED: bool = true;
    fn needbreak(&self) -> bool {
        MmuReadGuard::needbreak(self)
    }
    fn unlocked_for<R>(&mut self, f: impl FnOnce() -> R) -> R {
        self.unlocked(f)
    }
}

impl TdpLock for MmuGuard<'_> {
    const SHARED: bool = false;
    fn needbreak(&self) -> bool {
        MmuGuard::needbreak(self)
    }
    fn unlocked_for<R>(&mut self, f: impl FnOnce() -> R) -> R {
        self.unlocked(f)
    }
}

impl Kvm {
    /// The root of `asid`, made if there is none yet (`kvm_tdp_mmu_alloc_root`,
    /// under the read lock: a compare-exchange publishes it, and a loser
    /// hands its page back). Takes a page from `caches`.
    pub(crate) fn tdp_mmu_root(&self, asid: u16, caches: &mut MmuCaches) -> SpPtr {
        if let Some(root) = self.mmu.root(asid) {
            return root;
        }
        let sp = SpPtr::from_pool(caches.sp.alloc());
        // SAFETY: fresh from the pool, not yet reachable: ours alone.
        let page = unsafe { sp.as_non_null().as_ref() };
        page.init(0, SpRole { level: PT64_ROOT_LEVEL, direct: true, asid });
        page.get_root();
        match self.mmu.publish_root(asid, sp) {
            Ok(()) => {
                self.mmu.tdp.pages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                sp
            }
            Err(winner) => {
                page.put_root();
                // Never published: nobody else can have seen it.
                self.tdp_mmu_rcu_free(sp);
                winner
            }
        }
    }

    /// The roots made so far.
    pub(crate) fn tdp_mmu_roots(&self) -> impl Iterator<Item = SpPtr> + '_ {
        (0..self.mmu.address_spaces()).filter_map(|asid| self.mmu.root(asid))
    }

    /// `call_rcu(&sp->rcu_head, tdp_mmu_free_sp_rcu_callback)`: `sp` was
    /// unlinked (or never published); it goes back to the pool after a
    /// grace period. Allocates nothing: callable under `mmu_lock`.
    pub(crate) fn tdp_mmu_rcu_free(&self, sp: SpPtr) {
        let mut pending = self.mmu.tdp.pending.lock();
        // SAFETY: unlinked: no walker writes its header; ours to chain.
        unsafe { sp.as_non_null().as_ref() }.set_link_next(*pending);
        *pending = Some(sp);
        self.mmu.tdp.deferred.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Hands back the tables whose grace period has passed; waits for one if
    /// too many are deferred. Called with no lock held and outside any
    /// read-side section (it may wait for a grace period).
    pub(crate) fn tdp_mmu_reclaim(&self) {
        debug_assert!(!shadow_mmu_core::lockdep::holds_mmu_lock());
        let tdp = &self.mmu.tdp;
        if let Some(chain) = tdp.pending.lock().take() {
            if self.mmu.breakage.tdp_free_table_without_grace_period() {
                // Broken on purpose: back to the pool now, whoever still
                // walks these tables.
                self.tdp_mmu_free_chain(chain);
            } else {
                // Taken after every table of the chain was unlinked.
                let tag = self.mmu.rcu.tag();
                tdp.waiting.lock().push_back((tag, chain));
            }
        }
        let wait = tdp.deferred.load(std::sync::atomic::Ordering::Relaxed) > MAX_DEFERRED_TABLES;
        if wait {
            self.mmu.rcu.synchronize();
        }
        loop {
            let chain = {
                let mut q = tdp.waiting.lock();
                match q.front() {
                    Some(&(tag, chain)) if wait || self.mmu.rcu.poll(tag) => {
                        q.pop_front();
                        chain
                    }
                    _ => break,
                }
            };
            self.tdp_mmu_free_chain(chain);
        }
    }

    /// `tdp_mmu_free_sp_rcu_callback` for each table of a chain.
    fn tdp_mmu_free_chain(&self, chain: SpPtr) {
        let mut next = Some(chain);
        while let Some(sp) = next {
            // SAFETY: a grace period has passed since `sp` was unlinked (or
            // it was never published), so no walker still reads it: ours.
            let page = unsafe { sp.as_non_null().as_ref() };
            next = page.link_next();
            clean_table(page);
            self.mmu.tdp.deferred.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            // SAFETY: from `sp_pool` (a vCPU cache's or the split cache's),
            // handed back once: it left its chain above.
            unsafe { self.mmu.sp_pool.free(sp.as_non_null()) };
        }
    }

    /// `tdp_mmu_iter_cond_resched`: if the walk made progress and someone
    /// waits for `mmu_lock`, flushes if `flush`, leaves the section, lets
    /// the waiter in, and marks the walk to restart from the root. Returns
    /// whether it yielded (the caller's next step restarts).
    pub(crate) fn tdp_mmu_iter_cond_resched(
        &self,
        lock: &mut impl TdpLock,
        section: &mut ReadGuard<'_>,
        iter: &mut TdpIter,
        flush: bool,
    ) -> bool {
        if !iter.made_progress() || !lock.needbreak() {
            return false;
        }
        if flush {
            self.kvm_flush_remote_tlbs();
        }
        section.unlocked(|| lock.unlocked_for(std::thread::yield_now));
        self.mmu.stats.tdp_mmu_yields.inc();
        if self.mmu.breakage.tdp_walk_resumes_without_restart() {
            // Broken on purpose: the walk goes on in the tables it holds.
            return false;
        }
        iter.set_yielded();
        true
    }

    /// `kvm_arch_sync_dirty_log` with PML: every vCPU drains its log
    /// before a GET, CLEAR or ring harvest reads the log. Waits, through the
    /// remote flush handshake, for each vCPU in guest mode to pass an
    /// access boundary, where it drains before it leaves guest mode
    /// (`vcpu/pml.rs`); a vCPU outside guest mode has an empty log.
    pub(crate) fn kvm_arch_sync_dirty_log(&self) {
        if self.mmu.tdp.pml && !self.mmu.breakage.pml_skip_sync() {
            self.kvm_flush_remote_tlbs();
            self.mmu.stats.pml_syncs.inc();
        }
    }

    /// A fresh table for `gfn`'s region at `level` (the level of the entry
    /// that will point to it), from `cache`.
    pub(crate) fn tdp_mmu_alloc_sp(
        cache: &mut shadow_mmu_core::pool::MemoryCache<ShadowPage>,
        gfn: u64,
        level: u8,
        asid: u16,
    ) -> SpPtr {
        let sp = SpPtr::from_pool(cache.alloc());
        // SAFETY: fresh from the pool, not yet reachable: ours alone.
        let page = unsafe { sp.as_non_null().as_ref() };
        page.init(level_base_gfn(gfn, level), SpRole { level: level - 1, direct: true, asid });
        sp
    }
}

/// Puts a table back in the pool's clean state: frozen or stale entries
/// to 0, no root reference.
fn clean_table(page: &ShadowPage) {
    for s in page.spt() {
        // Relaxed: nobody else can reach the table (its grace period is over).
        s.store(0, Ordering::Relaxed);
    }
    while page.root_count() > 0 {
        page.put_root();
    }
    page.set_link_next(None);
}

impl crate::mmu::Mmu {
    /// Publishes `sp` as the root of `asid` if it has none; else returns
    /// the root another thread published first.
    pub(crate) fn publish_root(&self, asid: u16, sp: SpPtr) -> Result<(), SpPtr> {
        let slot: &AtomicPtr<ShadowPage> = self.root_slot(asid);
        // Release: publishes the root's (empty) table to `Mmu::root`'s
        // acquire load. Acquire on failure: the winner's root, whole.
        slot.compare_exchange(
            std::ptr::null_mut(),
            sp.as_non_null().as_ptr(),
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .map(|_| ())
        .map_err(|w| SpPtr::from_pool(NonNull::new(w).expect("a failed exchange from null found a root")))
    }
}

#[cfg(all(test, feature = "break-rules", not(loom)))]
mod tests {
    use crate::guest::{GuestOp, Script};
    use crate::memory::HostMemory;
    use crate::memslot::{MemFlags, UserMemoryRegion};
    use crate::mmu::MmuDesign;
    use crate::vm::{Vm, VmConfig};
    use shadow_mmu_core::breakage::Breakage;
    use shadow_mmu_core::spte::{PT_DIRECTORY_LEVEL, PT64_ROOT_LEVEL, spte_index};

    /// A table unlinked under the read lock (a fault maps a huge leaf where
    /// a table of 4 KiB leaves was) stays out of the pool while a read-side
    /// section that may have reached it is open; with the switch it goes
    /// back at once, for anyone to reuse under that reader.
    fn table_returned_under_an_open_section(breakage: Breakage) -> bool {
        let vm = Vm::new(VmConfig { mmu: MmuDesign::Tdp, breakage, ..VmConfig::default() }).unwrap();
        let mem = HostMemory::anonymous(4 << 20).unwrap();
        let region = |flags| UserMemoryRegion {
            slot: 0,
            flags,
            guest_phys_addr: 0,
            memory_size: 4 << 20,
            memory: Some(mem.clone()),
            memory_offset: 0,
        };
        vm.set_user_memory_region(region(MemFlags::LOG_DIRTY_PAGES)).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        // Logging on: page 3 is mapped at 4 KiB, in a table under the 2 MiB
        // entry of region 0.
        vcpu.run(&mut Script::new([GuestOp::Write(3 << 12, 3)])).unwrap();
        let kvm = vm.kvm();
        let section = kvm.mmu.rcu.read_lock();
        let mut sp = kvm.mmu.root(0).unwrap();
        for level in (PT_DIRECTORY_LEVEL + 1..=PT64_ROOT_LEVEL).rev() {
            let spte = sp
                .get(&section)
                .spte(spte_index(3, level))
                .load(shadow_mmu_core::sync::atomic::Ordering::Acquire);
            // SAFETY: a present non-leaf spte of the tree, in `section`.
            sp = unsafe { crate::shadow_page::SpPtr::from_nonleaf_spte(spte) };
        }
        let pte = sp.get(&section).spte(0).load(shadow_mmu_core::sync::atomic::Ordering::Acquire);
        // SAFETY: as above: the 4 KiB table, which this section has reached.
        let table = unsafe { crate::shadow_page::SpPtr::from_nonleaf_spte(pte) };
        assert_eq!(table.get(&section).role().level, 1);
        // Logging off: a write to an unmapped page of region 0 maps it
        // 2 MiB, unlinking the table (another thread: ours is in a section).
        vm.disable_dirty_logging(0).unwrap();
        let before = kvm.mmu.sp_pool.in_use();
        std::thread::scope(|s| {
            s.spawn(|| vcpu.run(&mut Script::new([GuestOp::Write(100 << 12, 100)])).unwrap());
        });
        let returned = kvm.mmu.sp_pool.in_use() < before;
        drop(section);
        returned
    }

    #[test]
    fn an_unlinked_table_waits_for_its_grace_period() {
        assert!(!table_returned_under_an_open_section(Breakage::SEED));
        let broken = Breakage { tdp_free_table_without_grace_period: true, ..Breakage::SEED };
        assert!(table_returned_under_an_open_section(broken), "the switch hands it back at once");
    }
}
