//! vCPU modes, requests, and the remote TLB flush protocol
//! (`kvm_flush_remote_tlbs`).
//!
//! # The contract
//!
//! When [`VcpuSet::kvm_flush_remote_tlbs`] returns, no vCPU can still use a
//! TLB entry (or a page-walk result) it obtained before the call began. A
//! guest write through a stale writable entry after that point would be a
//! lost dirty page (or, after memslot deletion, a write into unmapped
//! memory), so the protocol has to be exact.
//!
//! # Modes
//!
//! - `OUTSIDE_GUEST_MODE`: the vCPU thread runs host code (fault handling,
//!   waiting for `mmu_lock`, between runs). It uses no TLB entry and walks no
//!   shadow page table.
//! - `IN_GUEST_MODE`: the vCPU executes guest accesses: TLB lookups, page
//!   walks over the shadow page tables, loads and stores to guest memory. It
//!   checks its requests at every access boundary (our stand-in for the
//!   IPI that forces a VM exit).
//! - `READING_SHADOW_PAGE_TABLES`: outside guest mode, but walking the
//!   shadow page tables without `mmu_lock` (the fast page fault path). A
//!   flush waits for it like for guest mode, so that shadow pages are not
//!   freed under the walk (`walk_shadow_page_lockless_begin`).
//!
//! # The handshake
//!
//! ```text
//!   flusher (any thread)                      vCPU
//!   --------------------                      ----
//!   (sptes already changed)                   enter:  mode = IN_GUEST_MODE   [SeqCst store]
//!   requests |= TLB_FLUSH       [SeqCst RMW]          r = requests           [SeqCst load]
//!   m = mode                    [SeqCst load]         if r != 0: exit, handle, retry enter
//!   while m != OUTSIDE and TLB_FLUSH still set:
//!       wait                                  each access boundary:
//!                                                     if requests != 0 [acquire]:
//!                                                         mode = OUTSIDE   [release store]
//!                                                         flush TLB; clear bit [AcqRel]
//!                                                         enter again
//! ```
//!
//! Why it is exact:
//! 1. Store buffering on (`requests`, `mode`) with SeqCst on both sides: either
//!    the flusher sees the vCPU in guest mode, or the vCPU's entry check sees
//!    the request and flushes before its first access.
//! 2. A vCPU that the flusher sees in guest mode may be in the middle of an
//!    access that uses a stale entry. The flusher waits until the vCPU either
//!    leaves guest mode (release store, which publishes every guest store it
//!    made) or clears the request bit after flushing. Either happens only at
//!    an access boundary, so the in-flight access has completed and is
//!    visible to the flusher (release/acquire), and no later access uses an
//!    entry older than the flush.
//! 3. A vCPU outside guest mode holds no usable entry: it must pass the entry
//!    check of (1) before its next access, and flushes there.
//!
//! This is KVM's `kvm_make_all_cpus_request` with the IPI's "wait until the
//! target has exited" replaced by polling the target's mode.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_utils::CachePadded;
use parking_lot::RwLock;

use crate::stats::Counter;
use crate::sync::Backoff;
use crate::sync::atomic::{AtomicU8, AtomicU32, Ordering, fence};

/// The vCPU runs host code.
pub const OUTSIDE_GUEST_MODE: u8 = 0;
/// The vCPU executes guest accesses.
pub const IN_GUEST_MODE: u8 = 1;
/// The vCPU walks shadow page tables without `mmu_lock`.
pub const READING_SHADOW_PAGE_TABLES: u8 = 2;

/// Request: flush the TLB before the next guest access (`KVM_REQ_TLB_FLUSH`).
pub const KVM_REQ_TLB_FLUSH: u32 = 1 << 0;
/// Request: leave `KVM_RUN` for userspace at the next access boundary (a
/// VMM's kick, as QEMU's signal that makes `KVM_RUN` return `EINTR`).
pub const KVM_REQ_EXIT: u32 = 1 << 1;

/// The part of a vCPU that other threads touch.
#[derive(Debug)]
pub struct VcpuShared {
    id: u32,
    /// Mode and requests share a cache line: the flusher writes one and reads
    /// the other, the vCPU reads both at every access.
    state: CachePadded<ModeAndRequests>,
}

#[derive(Debug)]
struct ModeAndRequests {
    mode: AtomicU8,
    requests: AtomicU32,
}

impl VcpuShared {
    /// The shared part of vCPU `id`, outside guest mode, with no request.
    pub fn new(id: u32) -> Self {
        Self {
            id,
            state: CachePadded::new(ModeAndRequests {
                mode: AtomicU8::new(OUTSIDE_GUEST_MODE),
                requests: AtomicU32::new(0),
            }),
        }
    }

    /// vCPU id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Current mode (racy; for tests and statistics).
    pub fn mode(&self) -> u8 {
        self.state.mode.load(Ordering::Relaxed)
    }

    /// Pending requests, as the vCPU's access-boundary check reads them.
    #[inline]
    pub fn pending_requests(&self) -> u32 {
        // Acquire: pairs with the flusher's SeqCst `fetch_or`, so that what the
        // flusher did before requesting (changing sptes) is visible to the
        // page walks we do after handling the request.
        self.state.requests.load(Ordering::Acquire)
    }

    /// Tries to enter guest mode: succeeds only if no request is pending.
    /// On failure the vCPU stays outside guest mode and must handle its
    /// requests first (`vcpu_enter_guest`'s last check).
    #[inline]
    pub fn try_enter_guest_mode(&self) -> bool {
        // SeqCst store then SeqCst load: the vCPU half of the store-buffering
        // handshake (module docs, point 1); pairs with the flusher's SeqCst
        // fetch_or then SeqCst load of `mode`.
        self.state.mode.store(IN_GUEST_MODE, Ordering::SeqCst);
        if self.state.requests.load(Ordering::SeqCst) == 0 {
            return true;
        }
        self.exit_guest_mode();
        false
    }

    /// Leaves guest mode (a VM exit), or ends a lockless walk.
    #[inline]
    pub fn exit_guest_mode(&self) {
        // Release: pairs with the flusher's load of `mode`; every guest store
        // and page walk this vCPU made in guest mode happens-before a flusher
        // that sees OUTSIDE_GUEST_MODE returning (module docs, point 2).
        self.state.mode.store(OUTSIDE_GUEST_MODE, Ordering::Release);
    }

    /// Enters `READING_SHADOW_PAGE_TABLES` (`walk_shadow_page_lockless_begin`),
    /// from outside guest mode. Leave with [`Self::exit_guest_mode`].
    #[inline]
    pub fn begin_lockless_walk(&self) {
        // Relaxed: the fence below orders it (KVM: the store, then smp_mb()).
        self.state.mode.store(READING_SHADOW_PAGE_TABLES, Ordering::Relaxed);
        // SeqCst fence: pairs with the SeqCst fence of a flusher
        // (`make_all_cpus_request`, between its requests and its loads of
        // `mode`) and of `synchronize_lockless_walks` (between a memslot
        // flag's store and its loads of `mode`). Of two SeqCst fences one
        // precedes the other: either that side's load of `mode` sees this
        // store and it waits for our walk, or the walk below sees every
        // store it made before its fence (the sptes it changed, the flag it
        // set).
        fence(Ordering::SeqCst);
    }

    /// Takes the pending TLB flush request, if any, clearing its bit. The
    /// caller flushes its TLB *before* calling this (module docs, point 2).
    #[inline]
    pub fn ack_tlb_flush(&self) -> bool {
        // AcqRel: release publishes the completed flush (and every access
        // before it) to a flusher that sees the bit clear; acquire reads the
        // latest flusher's fetch_or, ordering the sptes it changed before
        // our next page walk.
        self.state.requests.fetch_and(!KVM_REQ_TLB_FLUSH, Ordering::AcqRel) & KVM_REQ_TLB_FLUSH != 0
    }

    /// Asks the vCPU to leave `KVM_RUN` at its next access boundary
    /// ([`KVM_REQ_EXIT`]); does not wait.
    pub fn request_exit(&self) {
        self.make_request(KVM_REQ_EXIT);
    }

    /// Takes a pending exit request, if any, clearing its bit.
    #[inline]
    pub fn take_exit_request(&self) -> bool {
        // Relaxed load first: the common case has none. AcqRel on the clear:
        // acquire pairs with the requester's SeqCst fetch_or (what it did
        // before asking is visible to the userspace we exit to).
        if self.state.requests.load(Ordering::Relaxed) & KVM_REQ_EXIT == 0 {
            return false;
        }
        self.state.requests.fetch_and(!KVM_REQ_EXIT, Ordering::AcqRel) & KVM_REQ_EXIT != 0
    }

    #[inline]
    fn make_request(&self, req: u32) {
        // SeqCst: the flusher half of the handshake (module docs, point 1).
        self.state.requests.fetch_or(req, Ordering::SeqCst);
    }

    /// Must a flusher that requested `req` keep waiting for this vCPU?
    #[inline]
    fn must_wait(&self, req: u32) -> bool {
        // SeqCst: pairs with the vCPU's SeqCst entry store (point 1) and, being
        // at least acquire, with its release store of OUTSIDE_GUEST_MODE
        // (point 2).
        if self.state.mode.load(Ordering::SeqCst) == OUTSIDE_GUEST_MODE {
            return false;
        }
        // Acquire: pairs with the vCPU's AcqRel clear after it flushed.
        self.state.requests.load(Ordering::Acquire) & req != 0
    }
}

/// The VM's vCPUs, as the flushers see them.
#[derive(Debug, Default)]
pub struct VcpuSet {
    vcpus: RwLock<Vec<Arc<VcpuShared>>>,
    /// Flushes performed.
    pub flushes: Counter,
    /// Nanoseconds flushers spent waiting for vCPUs.
    pub flush_wait_ns: Counter,
}

impl VcpuSet {
    /// Adds a vCPU that flushes will wait for.
    pub fn add(&self, v: Arc<VcpuShared>) {
        self.vcpus.write().push(v);
    }

    /// Asks every vCPU to leave `KVM_RUN` at its next access boundary;
    /// does not wait (the VMM's threads see each run return).
    pub fn request_all_exit(&self) {
        for v in self.vcpus.read().iter() {
            v.request_exit();
        }
    }

    /// Ids of the vCPUs created.
    pub fn ids(&self) -> Vec<u32> {
        self.vcpus.read().iter().map(|v| v.id).collect()
    }

    /// `kvm_make_all_cpus_request(kvm, req)` and wait, as for an IPI with
    /// wait=1: returns when every vCPU is outside guest mode or has
    /// handled `req`.
    pub fn make_all_cpus_request(&self, req: u32) {
        let vcpus = self.vcpus.read();
        for v in vcpus.iter() {
            v.make_request(req);
        }
        // SeqCst fence (KVM's smp_mb__after_atomic in
        // kvm_make_vcpus_request_mask): pairs with the fence of
        // `begin_lockless_walk`. A lockless walk whose mode store we do not
        // see below sees every spte change we made before this point.
        fence(Ordering::SeqCst);
        let t0 = Instant::now();
        for v in vcpus.iter() {
            let backoff = Backoff::new();
            while v.must_wait(req) {
                backoff.snooze();
            }
        }
        self.flush_wait_ns.add(t0.elapsed().as_nanos() as u64);
    }

    /// The `synchronize_srcu_expedited(&kvm->srcu)` of a memslot update, for
    /// the one reader that matters to it: returns when every lockless walk
    /// (`READING_SHADOW_PAGE_TABLES`, the fast page fault) that may have read
    /// the memslot flags as they were before the call has ended. The caller
    /// changed a flag before calling; see the engine's `mmu/fast_fault.rs` for
    /// the proof.
    ///
    /// Where we differ from SRCU: we poll the mode, so a vCPU that starts a
    /// new walk each time we look keeps us waiting; each walk is a few
    /// hundred nanoseconds and a vCPU runs guest code between two, so in
    /// practice this ends at once.
    pub fn synchronize_lockless_walks(&self) {
        // SeqCst fence: pairs with `begin_lockless_walk`'s (see there).
        fence(Ordering::SeqCst);
        let vcpus = self.vcpus.read();
        for v in vcpus.iter() {
            let backoff = Backoff::new();
            // Acquire: pairs with `exit_guest_mode`'s release store, so the
            // walk's compare-exchange happens before our caller's rmap walk.
            while v.state.mode.load(Ordering::Acquire) == READING_SHADOW_PAGE_TABLES {
                backoff.snooze();
            }
        }
    }

    /// `kvm_flush_remote_tlbs`.
    pub fn kvm_flush_remote_tlbs(&self) {
        self.flushes.inc();
        self.make_all_cpus_request(KVM_REQ_TLB_FLUSH);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn flush_returns_at_once_with_no_vcpu_in_guest_mode() {
        let set = VcpuSet::default();
        let v = Arc::new(VcpuShared::new(0));
        set.add(v.clone());
        set.kvm_flush_remote_tlbs();
        assert!(!v.try_enter_guest_mode(), "an outside vCPU sees the request on entry");
        assert!(v.ack_tlb_flush());
        assert!(v.try_enter_guest_mode());
    }

    #[test]
    fn flush_waits_for_a_vcpu_in_guest_mode_until_it_acks() {
        let set = Arc::new(VcpuSet::default());
        let v = Arc::new(VcpuShared::new(0));
        set.add(v.clone());
        assert!(v.try_enter_guest_mode());
        let done = Arc::new(AtomicBool::new(false));
        let flusher = {
            let (set, done) = (set.clone(), done.clone());
            std::thread::spawn(move || {
                set.kvm_flush_remote_tlbs();
                done.store(true, Ordering::SeqCst);
            })
        };
        // Wait until the request is visible, then check the flusher waits.
        while v.pending_requests() == 0 {
            std::hint::spin_loop();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "flush returned while a vCPU could use stale entries");
        // The vCPU reaches an access boundary, exits, flushes, acks.
        v.exit_guest_mode();
        assert!(v.ack_tlb_flush());
        flusher.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn flush_waits_for_a_lockless_walker() {
        let set = Arc::new(VcpuSet::default());
        let v = Arc::new(VcpuShared::new(0));
        set.add(v.clone());
        v.begin_lockless_walk();
        let flusher = {
            let set = set.clone();
            std::thread::spawn(move || set.kvm_flush_remote_tlbs())
        };
        while v.pending_requests() == 0 {
            std::hint::spin_loop();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!flusher.is_finished(), "flush must wait for READING_SHADOW_PAGE_TABLES");
        v.exit_guest_mode();
        flusher.join().unwrap();
    }
}
