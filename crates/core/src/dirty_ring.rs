//! A vCPU's dirty ring (`struct kvm_dirty_ring`, `virt/kvm/dirty_ring.c`;
//! api.rst 8.29, `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`).
//!
//! One ring per vCPU, of `entries` [`DirtyGfn`]s (a power of two). Three
//! parties, each with its own index, all wrapping `u32`s:
//! - the vCPU pushes ([`DirtyRing::push`]) at `dirty_index`: the slot and
//!   offset of a page it dirtied, then the flags `DIRTY`;
//! - the harvester (userspace in KVM) collects ([`DirtyRing::harvest`]) at
//!   `fetch_index`: in order, skipping none, stopping at the first entry
//!   that is not exactly `DIRTY`, and marks each one `DIRTY | RESET`;
//! - the reset (`KVM_RESET_DIRTY_RINGS`, [`DirtyRing::reset`]) at
//!   `reset_index`: every entry marked `RESET`, in order, back to 0, with
//!   the pages coalesced into (slot, offset, 64-bit mask) runs for
//!   re-protection.
//!
//! # Invariants
//! 1. `reset_index <= fetch_index <= dirty_index <= reset_index + entries`
//!    (mod 2^32): the vCPU never overwrites an entry the reset has not given
//!    back. A push never fails (it runs under `mmu_lock`): the vCPU stops at
//!    the soft limit, `entries - KVM_DIRTY_RING_RSVD_ENTRIES`, and makes at
//!    most one push per guest access before it exits with
//!    `DirtyRingFull` at its next access boundary; the reserve covers that.
//! 2. Each entry goes 0 -> `DIRTY` (vCPU) -> `DIRTY | RESET` (harvester) ->
//!    0 (reset), and only its owner of the moment writes it.
//!
//! # Ordering (ACQ_REL)
//! - push: the caller's dirtying (the spte made writable and put in its
//!   rmap, patch 06's steps 1 to 3) comes first; the slot and offset are
//!   stored, then the flags with release. The harvester's acquire load of
//!   the flags pairs with it: it sees the slot and offset, and everything
//!   the vCPU did before.
//! - harvest: the store of `DIRTY | RESET` is a release; the reset's acquire
//!   load of the flags pairs with it, so the reset sees the entry as the
//!   harvester saw it, and (transitively) the vCPU's spte and rmap writes:
//!   its re-protection finds the writable spte.
//! - reset: the entries are zeroed, then `reset_index` is stored with
//!   release; the vCPU's acquire load of `reset_index` in `push` pairs with
//!   it, so an entry the vCPU reuses was zeroed and read before.
//! - The harvester tests `flags == DIRTY`, not `flags & DIRTY`, as KVM's
//!   selftests do: where the reset runs on another thread than the
//!   harvester, the harvester may, on the next lap, still read its own
//!   `DIRTY | RESET` (the reset's 0 and the next push not yet visible to
//!   it), and must not take it for a new entry. It also collects at most
//!   one lap per call.

use crossbeam_utils::CachePadded;

use crate::breakage::Breakage;
use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// `KVM_DIRTY_GFN_F_DIRTY`: pushed, not yet harvested.
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: harvested, not yet reset.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 2;
/// Entries kept free beyond the soft limit (`KVM_DIRTY_RING_RSVD_ENTRIES`;
/// KVM adds the PML buffer's size, which we do not have).
pub const KVM_DIRTY_RING_RSVD_ENTRIES: u32 = 64;
/// Most entries a ring may have (`KVM_DIRTY_RING_MAX_ENTRIES`).
pub const KVM_DIRTY_RING_MAX_ENTRIES: u32 = 65536;
/// Bytes of one entry (`sizeof(struct kvm_dirty_gfn)`).
pub const DIRTY_GFN_BYTES: u32 = 16;

/// `struct kvm_dirty_gfn`: one entry.
#[derive(Debug, Default)]
#[repr(C)]
pub struct DirtyGfn {
    flags: AtomicU32,
    slot: AtomicU32,
    offset: AtomicU64,
}

/// One vCPU's ring (module docs).
#[derive(Debug)]
pub struct DirtyRing {
    gfns: Box<[DirtyGfn]>,
    /// Written by the vCPU only.
    dirty_index: CachePadded<AtomicU32>,
    /// Written by the harvester only.
    fetch_index: CachePadded<AtomicU32>,
    /// Written by the reset only.
    reset_index: CachePadded<AtomicU32>,
    soft_limit: u32,
}

impl DirtyRing {
    /// A ring of `entries` entries (a power of two, more than the reserve;
    /// the VM checks KVM's size rules before it builds one), with a soft
    /// limit `reserve` entries short of full.
    ///
    /// # Panics
    /// If `entries` is not a power of two or not above `reserve`.
    pub fn new(entries: u32, reserve: u32) -> Self {
        assert!(
            entries.is_power_of_two() && entries > reserve,
            "ring of {entries} entries, {reserve} reserved"
        );
        Self {
            gfns: (0..entries).map(|_| DirtyGfn::default()).collect(),
            dirty_index: CachePadded::new(AtomicU32::new(0)),
            fetch_index: CachePadded::new(AtomicU32::new(0)),
            reset_index: CachePadded::new(AtomicU32::new(0)),
            soft_limit: entries - reserve,
        }
    }

    /// Entries.
    pub fn entries(&self) -> u32 {
        self.gfns.len() as u32
    }

    fn entry(&self, index: u32) -> &DirtyGfn {
        &self.gfns[(index & (self.entries() - 1)) as usize]
    }

    /// Entries pushed and not yet reset (`kvm_dirty_ring_used`).
    pub fn used(&self) -> u32 {
        // Relaxed: a count; `push` reads `reset_index` with acquire where
        // it matters.
        self.dirty_index.load(Ordering::Relaxed).wrapping_sub(self.reset_index.load(Ordering::Relaxed))
    }

    /// Entries harvested from this ring since it was made, by whoever
    /// harvested them (wrapping): the vCPU's dirty pages, as QEMU's
    /// dirty-limit counts them (`cpu->dirty_pages`).
    pub fn harvested(&self) -> u32 {
        // Relaxed: a count, read by the ring's own vCPU thread after it
        // harvested (its own store) or by statistics.
        self.fetch_index.load(Ordering::Relaxed)
    }

    /// At or past the soft limit (`kvm_dirty_ring_soft_full`)?
    pub fn soft_full(&self) -> bool {
        self.used() >= self.soft_limit
    }

    /// `kvm_dirty_ring_push`, by the ring's vCPU only: publishes (slot,
    /// offset). Returns whether the ring is now soft-full (the vCPU must
    /// exit at its next access boundary).
    ///
    /// # Panics
    /// If the ring is full (invariant 1 broken: the vCPU ran past the soft
    /// limit by more than the reserve).
    #[inline]
    pub fn push(&self, slot: u32, offset: u64) -> bool {
        // Relaxed: only this vCPU stores `dirty_index`.
        let i = self.dirty_index.load(Ordering::Relaxed);
        // Acquire: pairs with the reset's release store of `reset_index`:
        // the entry we are about to reuse was read and zeroed before.
        let used = i.wrapping_sub(self.reset_index.load(Ordering::Acquire));
        assert!(used < self.entries(), "dirty ring overflow: {used} entries in use");
        let e = self.entry(i);
        // Relaxed: published by the release store of the flags below.
        e.slot.store(slot, Ordering::Relaxed);
        e.offset.store(offset, Ordering::Relaxed);
        // Release: pairs with the harvester's acquire load of the flags
        // (module docs): the entry, and what the vCPU did before the push.
        e.flags.store(KVM_DIRTY_GFN_F_DIRTY, Ordering::Release);
        // Relaxed: read by this vCPU and by `used`'s counts.
        self.dirty_index.store(i.wrapping_add(1), Ordering::Relaxed);
        used + 1 >= self.soft_limit
    }

    /// The harvester's collection (userspace's loop over the mmapped ring),
    /// by one thread at a time per ring: calls `f(slot, offset)` for each
    /// entry pushed since the last harvest, in order, and marks each one
    /// harvested. Returns how many.
    pub fn harvest(&self, f: impl FnMut(u32, u64)) -> u32 {
        // Relaxed: only the harvester stores `fetch_index`.
        let mut i = self.fetch_index.load(Ordering::Relaxed);
        let n = harvest_entries(&self.gfns, &mut i, f);
        // Relaxed: our own index.
        self.fetch_index.store(i, Ordering::Relaxed);
        n
    }

    /// Calls `f(slot, offset)` for every entry pushed and not yet reset, for
    /// audits of a quiescent VM (with pushes, harvests or resets running,
    /// the answer is a snapshot of no single instant).
    pub fn for_each_pending(&self, mut f: impl FnMut(u32, u64)) {
        // Acquire: pairs with the reset's release store.
        let mut i = self.reset_index.load(Ordering::Acquire);
        // Relaxed: a quiescent read (see above).
        let end = self.dirty_index.load(Ordering::Relaxed);
        while i != end {
            let e = self.entry(i);
            // Relaxed: as above.
            f(e.slot.load(Ordering::Relaxed), e.offset.load(Ordering::Relaxed));
            i = i.wrapping_add(1);
        }
    }

    /// `kvm_dirty_ring_reset`, by one thread at a time per ring: gives back
    /// every harvested entry, in order, and calls `protect(slot, offset,
    /// mask)` for each run of them coalesced as KVM does (pages of one slot
    /// within 64 of each other, bit `i` of `mask` being page `offset + i`).
    /// Returns how many entries it gave back.
    pub fn reset(&self, b: &Breakage, mut protect: impl FnMut(u32, u64, u64)) -> u32 {
        // Relaxed: only the reset stores `reset_index`.
        let mut i = self.reset_index.load(Ordering::Relaxed);
        let mut n = 0;
        let mut run: Option<(u32, u64, u64)> = None;
        loop {
            let e = self.entry(i);
            // Acquire: pairs with the harvester's release store.
            let flags = e.flags.load(Ordering::Acquire);
            let harvested = if b.ring_reset_before_harvest() {
                flags & KVM_DIRTY_GFN_F_DIRTY != 0
            } else {
                flags & KVM_DIRTY_GFN_F_RESET != 0
            };
            if !harvested {
                break;
            }
            // Relaxed: ordered by the acquire load above.
            let (slot, offset) = (e.slot.load(Ordering::Relaxed), e.offset.load(Ordering::Relaxed));
            // Relaxed: published to the vCPU by the release store of
            // `reset_index` below.
            e.flags.store(0, Ordering::Relaxed);
            i = i.wrapping_add(1);
            n += 1;
            run = Some(match run {
                Some((s, base, mask)) if s == slot => match coalesce(base, mask, offset) {
                    Some(r) => (s, r.0, r.1),
                    None => {
                        protect(s, base, mask);
                        (slot, offset, 1)
                    }
                },
                Some((s, base, mask)) => {
                    protect(s, base, mask);
                    (slot, offset, 1)
                }
                None => (slot, offset, 1),
            });
        }
        // Release: pairs with `push`'s acquire load (module docs).
        self.reset_index.store(i, Ordering::Release);
        if let Some((s, base, mask)) = run {
            protect(s, base, mask);
        }
        n
    }
}

/// The harvester's collection over any ring's entries: ours, or the ring
/// KVM maps into userspace (same layout). From `*fetch_index` on, calls
/// `f(slot, offset)` for each entry that is exactly `DIRTY`, in order, marks
/// it `DIRTY | RESET`, and advances `*fetch_index`; at most one lap. Returns
/// how many. One harvester per ring at a time.
pub fn harvest_entries(gfns: &[DirtyGfn], fetch_index: &mut u32, mut f: impl FnMut(u32, u64)) -> u32 {
    let entries = gfns.len() as u32;
    debug_assert!(entries.is_power_of_two());
    let mut n = 0;
    // At most one lap: entries past it are not reset yet (invariant 1).
    while n < entries {
        let e = &gfns[(*fetch_index & (entries - 1)) as usize];
        // Acquire: pairs with the push's release store (module docs).
        if e.flags.load(Ordering::Acquire) != KVM_DIRTY_GFN_F_DIRTY {
            break;
        }
        // Relaxed: ordered by the acquire load above.
        f(e.slot.load(Ordering::Relaxed), e.offset.load(Ordering::Relaxed));
        // Release: pairs with the reset's acquire load of the flags.
        e.flags.store(KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET, Ordering::Release);
        *fetch_index = fetch_index.wrapping_add(1);
        n += 1;
    }
    n
}

/// KVM's coalescing of the next entry at `offset` into the run (`base`,
/// `mask`): forward within 64 pages, or backwards as long as no bit falls
/// off the top. `None`: start a new run.
fn coalesce(base: u64, mask: u64, offset: u64) -> Option<(u64, u64)> {
    let delta = offset.wrapping_sub(base) as i64;
    if (0..64).contains(&delta) {
        return Some((base, mask | 1 << delta));
    }
    if (-63..0).contains(&delta) {
        let shift = (-delta) as u32;
        if (mask << shift) >> shift == mask {
            return Some((offset, mask << shift | 1));
        }
    }
    None
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn push_harvest_reset_in_order_and_coalesced() {
        let r = DirtyRing::new(8, 2);
        assert!(!r.push(1, 10));
        assert!(!r.push(1, 12));
        assert!(!r.push(1, 9)); // backwards, within 64
        assert!(!r.push(1, 200)); // a new run
        assert!(!r.push(2, 200)); // another slot
        assert!(r.push(2, 201), "6 of 8 with 2 reserved: soft-full");
        assert!(r.soft_full());
        let mut got = Vec::new();
        assert_eq!(r.harvest(|s, o| got.push((s, o))), 6);
        assert_eq!(got, [(1, 10), (1, 12), (1, 9), (1, 200), (2, 200), (2, 201)]);
        assert_eq!(r.harvest(|_, _| panic!("nothing new")), 0);
        let mut runs = Vec::new();
        assert_eq!(r.reset(&Breakage::SEED, |s, o, m| runs.push((s, o, m))), 6);
        assert_eq!(runs, [(1, 9, 0b1011), (1, 200, 1), (2, 200, 0b11)]);
        assert_eq!(r.used(), 0);
        // Around the ring again: the indices wrap, the entries are reused.
        for k in 0..5 {
            r.push(3, k);
        }
        let mut got = Vec::new();
        r.harvest(|s, o| got.push((s, o)));
        assert_eq!(got, (0..5).map(|k| (3, k)).collect::<Vec<_>>());
        assert_eq!(r.reset(&Breakage::SEED, |_, _, _| {}), 5);
    }

    #[test]
    fn the_reset_stops_at_the_first_entry_not_harvested() {
        let r = DirtyRing::new(8, 2);
        r.push(0, 1);
        r.harvest(|_, _| {});
        r.push(0, 2);
        let mut runs = Vec::new();
        assert_eq!(r.reset(&Breakage::SEED, |s, o, m| runs.push((s, o, m))), 1);
        assert_eq!(runs, [(0, 1, 1)]);
        assert_eq!(r.used(), 1);
    }

    #[test]
    fn coalescing_is_kvms() {
        assert_eq!(coalesce(100, 1, 163), Some((100, 1 | 1 << 63)));
        assert_eq!(coalesce(100, 1, 164), None);
        assert_eq!(coalesce(100, 1, 37), Some((37, 1 << 63 | 1)));
        assert_eq!(coalesce(100, 1 << 1, 37), None, "bit 1 would fall off the top");
        assert_eq!(coalesce(100, 1, 36), None);
    }

    #[test]
    #[should_panic(expected = "dirty ring overflow")]
    fn overflow_is_an_invariant_violation() {
        let r = DirtyRing::new(4, 1);
        for k in 0..5 {
            r.push(0, k);
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    /// A vCPU dirties a page ("spte" stands for the writable spte in its
    /// rmap) and pushes it; the harvester collects and the reset
    /// re-protects. The reset must see the spte (patch 06's order through
    /// the ring), and must give back only entries the harvester collected.
    fn push_harvest_reset(b: Breakage) {
        crate::loom_support::check(move || {
            let ring = Arc::new(DirtyRing::new(4, 1));
            let spte = Arc::new(AtomicU64::new(0));
            let (r1, s1, r2, s2) = (ring.clone(), spte.clone(), ring.clone(), spte.clone());
            let (_, (collected, protected)) = crate::loom_support::two(
                move || {
                    // Relaxed: the release store in `push` publishes it.
                    s1.store(1, Ordering::Relaxed);
                    r1.push(0, 7);
                },
                move || {
                    let mut collected = 0;
                    r2.harvest(|_, o| collected += o);
                    let mut protected = 0;
                    r2.reset(&b, |_, o, _| {
                        // Relaxed: what it reads is what matters.
                        assert_eq!(s2.load(Ordering::Relaxed), 1, "the reset missed the writable spte");
                        protected += o;
                    });
                    assert_eq!(protected, collected, "the reset gave back an entry nobody collected");
                    (collected, protected)
                },
            );
            (collected, protected)
        });
    }

    #[test]
    fn loom_push_harvest_reset() {
        push_harvest_reset(Breakage::SEED);
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "nobody collected")]
    fn loom_resetting_before_the_harvest_is_caught() {
        push_harvest_reset(Breakage { ring_reset_before_harvest: true, ..Breakage::SEED });
    }

    /// Around a ring of 2: the vCPU pushes three entries, waiting for the
    /// reset when the ring is full, while the harvester collects and resets.
    /// Nothing is collected twice or torn, and nothing is lost.
    #[test]
    fn loom_a_reused_entry_is_never_read_stale() {
        crate::loom_support::check(|| {
            let ring = Arc::new(DirtyRing::new(2, 0));
            let (r1, r2) = (ring.clone(), ring.clone());
            let (_, got) = crate::loom_support::two(
                move || {
                    for k in 1..=3u64 {
                        while r1.used() >= 2 {
                            loom::thread::yield_now();
                        }
                        r1.push(k as u32, k);
                    }
                },
                move || {
                    let (mut got, mut rounds) = (Vec::new(), 0);
                    while got.len() < 3 {
                        r2.harvest(|s, o| got.push((s, o)));
                        r2.reset(&Breakage::SEED, |_, _, _| {});
                        rounds += 1;
                        loom::thread::yield_now();
                    }
                    (got, rounds)
                },
            );
            assert_eq!(got.0, [(1, 1), (2, 2), (3, 3)]);
            got.1
        });
    }
}
