//! A steady dirty rate inside a pass, R / vCPUs a vCPU for a rate of R
//! bytes a second, spread over the pass at the scale of a chunk of
//! [`PACE_CHUNK_PAGES`] pages, never a pass at full speed and then nothing.
//! The engine's guest code returns to its vCPU thread after every chunk
//! while a rate is set, and the thread holds it until the chunk has taken
//! its share of time ([`ChunkPacer`]); KVM's guest code runs a calibrated
//! delay loop after each chunk instead (`shadow_mmu_kvm::delay`), and exits
//! only while its delay is calibrated, a limit needs its exits, or its
//! dirty ring needs them.
//!
//! The pace is a floor on each chunk's time, not a schedule: time the vCPU
//! loses inside a chunk (a throttle hold, a full ring, a lock) is not made
//! up afterwards, as a guest whose work costs a fixed time per page (a
//! delay loop, as KVM's guest here) would not make it up. Only
//! the host's own oversleeping is: a chunk's wait is shortened by what the
//! last one overslept, so that a `sleep` that wakes late does not lower the
//! rate.
//!
//! The bytes the guests store, paced or not, are counted (by the engine's
//! threads; KVM's guests count their own, [`GuestCount`]), so that the rate
//! a guest really reached can be printed beside the one asked for.
//!
//! QEMU's dirty-limit (`vcpu-dirty-limit`, 8.1), which a migration sets
//! ([`DirtyPace::set_limit`]), caps each vCPU's dirty rate by holding that
//! vCPU alone, never the others (auto-converge's throttle pauses them all).
//! Where it is held depends on the VM's dirty log:
//! - with the dirty ring, as QEMU does: at the vCPU's ring-full exit. The
//!   vCPU thread reaps its own ring (QEMU's `kvm_dirty_ring_reap_one`;
//!   the migration's periodic reaper stays asleep under the limit, as
//!   QEMU's does, so that the rings fill), then sleeps ([`RingFullLimit`]).
//!   QEMU's sleep (`throttle_us_per_full`) is recomputed once a second from
//!   the vCPU's measured rate; ours is exactly what the pages the vCPU
//!   dirtied since its last hold exceed at the limit, the value QEMU's
//!   controller converges to. Its grain is the ring: a vCPU of a 65536-entry
//!   ring dirties 256 MiB flat out between holds. KVM's guest still exits
//!   after each chunk under a limit, without a hold: on a host whose KVM
//!   emulates the guest's stores, a vCPU that never exits runs past its
//!   ring's soft limit and overflows it (KVM checks the soft-full request
//!   only when it enters the guest, and the emulator pushes an entry per
//!   store, where a CPU faults on each page's first store); an exit every
//!   64 stores stays within the ring's reserve.
//! - with the bitmaps, which QEMU's dirty-limit refuses (it needs the
//!   ring's per-vCPU counts): at the vCPU's next chunk exit, for exactly
//!   what the chunk's bytes exceed.
//!
//! Either hold, and a paced chunk's wait, goes through the vCPU's
//! [`VcpuGate::hold_off`](crate::VcpuGate::hold_off): a pause ends it at
//! once, so that a stop-and-copy never waits out a hold.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shadow_mmu_core::spte::PAGE_SIZE;

/// Pages of a chunk at most: 256 KiB, under half a millisecond at 600 MiB/s
/// a vCPU.
pub const PACE_CHUNK_PAGES: u64 = 64;

/// A VM's dirty rate, set by the host and read by every vCPU thread.
#[derive(Debug)]
pub struct DirtyPace {
    vcpus: u32,
    /// Bytes a second each vCPU may store; 0: no pace (flat out).
    per_vcpu: AtomicU64,
    /// The migration's dirty-limit, bytes a second a vCPU; 0: none.
    limit: AtomicU64,
    /// Bumped by each [`Self::set_limit`], so that a vCPU measures its rate
    /// under a limit from when that limit was set.
    limit_epoch: AtomicU64,
    /// Whether the limit is held at ring-full exits (the VM has a dirty
    /// ring) rather than at chunk exits.
    limit_at_ring_full: bool,
    /// Bytes the vCPUs stored so far, counted chunk by chunk.
    stored: AtomicU64,
    /// Where a backend whose guests count their own stores reads them
    /// (KVM's guest code counts the pages it begins), added to `stored`.
    guest_count: std::sync::OnceLock<GuestCount>,
}

/// Reads the bytes the guests stored, as they count them.
pub struct GuestCount(pub Box<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for GuestCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GuestCount")
    }
}

impl DirtyPace {
    /// The pace of a VM of `vcpus` vCPUs, off; its dirty-limit held at
    /// ring-full exits if `limit_at_ring_full` (the VM has a dirty ring),
    /// else at chunk exits (module docs).
    pub fn new(vcpus: u32, limit_at_ring_full: bool) -> Self {
        Self {
            vcpus: vcpus.max(1),
            per_vcpu: AtomicU64::new(0),
            limit: AtomicU64::new(0),
            limit_epoch: AtomicU64::new(0),
            limit_at_ring_full,
            stored: AtomicU64::new(0),
            guest_count: std::sync::OnceLock::new(),
        }
    }

    /// Counts the guests' stores with `count` (bytes so far) from now on,
    /// beside [`Self::count`]'s; set once, by the backend that makes the
    /// VM.
    pub fn count_from_guest(&self, count: GuestCount) {
        let _ = self.guest_count.set(count);
    }

    /// Paces every vCPU at `rate / vcpus` bytes a second (`None` or 0: no
    /// pace).
    pub fn set(&self, rate: Option<u64>) {
        let per = rate.map_or(0, |r| r.div_ceil(u64::from(self.vcpus)));
        // Relaxed: a setting each vCPU thread reads at its next chunk; no
        // other data is published through it.
        self.per_vcpu.store(per, Ordering::Relaxed);
    }

    /// Caps every vCPU's dirty rate at `limit` bytes a second (`None` or
    /// 0: no cap), whatever its pace.
    pub fn set_limit(&self, limit: Option<u64>) {
        // Relaxed: as in `set`; a vCPU that reads the new epoch with the old
        // limit (or the reverse) only starts its measure one hold late.
        self.limit.store(limit.unwrap_or(0), Ordering::Relaxed);
        self.limit_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// The dirty-limit, bytes a second a vCPU (0: none).
    pub fn limit(&self) -> u64 {
        // Relaxed: as in `set`.
        self.limit.load(Ordering::Relaxed)
    }

    /// Whether the dirty-limit is held at ring-full exits (module docs).
    pub fn limit_at_ring_full(&self) -> bool {
        self.limit_at_ring_full
    }

    /// The dirty-limit where chunk exits hold it (0: none, or held at
    /// ring-full exits).
    fn chunk_limit(&self) -> u64 {
        if self.limit_at_ring_full { 0 } else { self.limit() }
    }

    /// The dirty-limit where ring-full exits hold it (0: none, or held at
    /// chunk exits).
    pub fn ring_full_limit(&self) -> u64 {
        if self.limit_at_ring_full { self.limit() } else { 0 }
    }

    /// Whether the engine's guest ends each chunk with an exit: while a
    /// rate, or a limit held at chunk exits, is set (its vCPUs see their
    /// ring fill at every access; KVM decides its exits per vCPU).
    pub fn on(&self) -> bool {
        self.per_vcpu() > 0 || self.chunk_limit() > 0
    }

    /// Bytes each vCPU may store a second (0: no pace).
    pub fn per_vcpu(&self) -> u64 {
        // Relaxed: as in `set`.
        self.per_vcpu.load(Ordering::Relaxed)
    }

    /// Counts `bytes` stored by a vCPU.
    pub fn count(&self, bytes: u64) {
        // Relaxed: a statistic, read as a total.
        self.stored.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes the vCPUs stored so far.
    pub fn stored(&self) -> u64 {
        // Relaxed: as in `count`.
        self.stored.load(Ordering::Relaxed) + self.guest_count.get().map_or(0, |c| (c.0)())
    }
}

/// The rate a guest reached between two readings of [`DirtyPace::stored`].
#[derive(Debug, Clone, Copy)]
pub struct ReachedRate {
    at: Instant,
    stored: u64,
}

impl ReachedRate {
    /// Starts measuring now.
    pub fn start(pace: &DirtyPace) -> Self {
        Self { at: Instant::now(), stored: pace.stored() }
    }

    /// Bytes a second stored since the start.
    pub fn bytes_per_s(&self, pace: &DirtyPace) -> f64 {
        (pace.stored() - self.stored) as f64 / self.at.elapsed().as_secs_f64().max(1e-9)
    }
}

/// One vCPU thread's side of the pace.
#[derive(Debug)]
pub struct ChunkPacer {
    /// When the current chunk began.
    chunk_start: Instant,
    /// How long the last wait overslept, to take off the next.
    overslept: Duration,
}

impl Default for ChunkPacer {
    fn default() -> Self {
        Self { chunk_start: Instant::now(), overslept: Duration::ZERO }
    }
}

impl ChunkPacer {
    /// A chunk that stored `bytes` ended (counted by the caller, or by the
    /// guest): under a pace or a limit, waits with `wait` until the chunk
    /// has taken its share of time at the lower of the two. `wait(d)` keeps the vCPU out for `d`
    /// and returns how long it did: a vCPU thread waits through its
    /// [`VcpuGate::hold_off`](crate::VcpuGate::hold_off), so that a pause
    /// ends the wait (with the bitmaps, QEMU's dirty-limit has no other
    /// place to hold a vCPU than its gate). Returns the part of the wait
    /// the limit added (the guest's own pace is not a loss).
    pub fn chunk_done(
        &mut self,
        pace: &DirtyPace,
        bytes: u64,
        wait: impl FnOnce(Duration) -> Duration,
    ) -> Duration {
        let share = |rate: u64| (rate > 0).then(|| Duration::from_secs_f64(bytes as f64 / rate as f64));
        let (own, limited) = (share(pace.per_vcpu()), share(pace.chunk_limit()));
        let mut by_limit = Duration::ZERO;
        if let Some(share) = own.max(limited) {
            let (ran, credit) = (self.chunk_start.elapsed(), std::mem::take(&mut self.overslept));
            let left = |s: Duration| s.saturating_sub(ran).saturating_sub(credit);
            let want = left(share);
            if !want.is_zero() {
                let waited = wait(want);
                // A late wake-up only: never more than the chunk's share, so
                // a vCPU descheduled for long does not run flat out after.
                self.overslept = waited.saturating_sub(want).min(share);
                if limited > own {
                    // What the guest's own pace would not have waited.
                    by_limit = waited.min(want).saturating_sub(own.map_or(Duration::ZERO, left));
                }
            }
        }
        self.chunk_start = Instant::now();
        by_limit
    }

    /// The guest stopped between chunks (a pass's end, a pause): the next
    /// chunk's time starts now.
    pub fn restart(&mut self) {
        self.chunk_start = Instant::now();
    }
}

/// One vCPU thread's side of a dirty-limit held at its ring-full exit
/// (module docs): after the thread reaped its own full ring, how long to
/// hold the vCPU.
#[derive(Debug, Default)]
pub struct RingFullLimit {
    /// The limit's epoch the window below was opened under.
    epoch: u64,
    /// Since when, and from which of the ring's harvested count, the vCPU's
    /// pages are measured: the end of its last hold.
    since: Option<(Instant, u32)>,
}

impl RingFullLimit {
    /// The vCPU reaped its full ring, whose entries harvested so far (by
    /// any thread, a migration's syncs too) number `harvested`: the time
    /// to hold it so that the pages it dirtied since its last hold have
    /// taken their share at the limit. The first fill under a limit opens
    /// the measure and holds nothing (what the vCPU dirtied before the
    /// limit is not held against it).
    pub fn hold_for(&mut self, pace: &DirtyPace, harvested: u32) -> Duration {
        let (limit, now) = (pace.ring_full_limit(), Instant::now());
        // Relaxed: as in `set_limit`.
        let epoch = pace.limit_epoch.load(Ordering::Relaxed);
        let hold = match self.since {
            Some((at, from)) if self.epoch == epoch && limit > 0 => {
                let bytes = u64::from(harvested.wrapping_sub(from)) * PAGE_SIZE;
                Duration::from_secs_f64(bytes as f64 / limit as f64).saturating_sub(now - at)
            }
            _ => Duration::ZERO,
        };
        (self.epoch, self.since) = (epoch, Some((now + hold, harvested)));
        hold
    }
}

/// Bytes of a chunk of `pages` pages of which `write_pct`% are stores.
pub fn chunk_bytes(pages: u64, write_pct: u8) -> u64 {
    pages * PAGE_SIZE * u64::from(write_pct) / 100
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_vcpu_takes_each_chunk_s_share_of_time() {
        let pace = DirtyPace::new(2, false);
        pace.set(Some(512 << 20));
        assert_eq!(pace.per_vcpu(), 256 << 20);
        let mut p = ChunkPacer::default();
        let chunk = chunk_bytes(PACE_CHUNK_PAGES, 100);
        let t = Instant::now();
        for _ in 0..100 {
            pace.count(chunk);
            p.chunk_done(&pace, chunk, sleep);
        }
        // 100 chunks of 256 KiB at 256 MiB/s, 1/1024 s each: 97.66 ms at
        // least (the oversleep credit only gives back what a wait overslept).
        let took = t.elapsed();
        assert!(took >= Duration::from_micros(97_656), "{took:?}");
        assert_eq!(pace.stored(), 100 * chunk);
        // Off: no wait.
        pace.set(None);
        assert_eq!(p.chunk_done(&pace, chunk, sleep), Duration::ZERO);
        assert!(!pace.on());
        // A dirty-limit of 512 MiB/s: 20 chunks take 10 ms at least, all
        // of the wait the limit's.
        pace.set_limit(Some(512 << 20));
        assert!(pace.on());
        let t = Instant::now();
        let held: Duration = (0..20).map(|_| p.chunk_done(&pace, chunk, sleep)).sum();
        assert!(t.elapsed() >= Duration::from_millis(9) && held > Duration::ZERO, "{held:?}");
    }

    fn sleep(d: Duration) -> Duration {
        let t = Instant::now();
        std::thread::sleep(d);
        t.elapsed()
    }

    #[test]
    fn a_wait_cut_short_counts_only_what_it_waited() {
        let pace = DirtyPace::new(1, false);
        pace.set_limit(Some(1 << 20));
        let mut p = ChunkPacer::default();
        // 256 KiB at 1 MiB/s: a quarter second asked, 1 ms waited (a pause
        // came): 1 ms of it is the limit's.
        let held = p.chunk_done(&pace, chunk_bytes(PACE_CHUNK_PAGES, 100), |_| Duration::from_millis(1));
        assert_eq!(held, Duration::from_millis(1));
    }

    #[test]
    fn a_ring_full_hold_is_what_the_pages_since_the_last_exceed_at_the_limit() {
        let pace = DirtyPace::new(1, true);
        let mut l = RingFullLimit::default();
        // No limit: nothing held, and chunk exits stay off.
        assert_eq!(l.hold_for(&pace, 1000), Duration::ZERO);
        pace.set_limit(Some(4 * MIB));
        assert!(!pace.on(), "a ring-full limit holds nothing at chunk exits");
        assert_eq!(pace.ring_full_limit(), 4 * MIB);
        // The first fill under the limit opens the measure.
        assert_eq!(l.hold_for(&pace, 2000), Duration::ZERO);
        // 1024 pages (4 MiB) at 4 MiB/s: a second, less the time since.
        let held = l.hold_for(&pace, 3024);
        assert!(held > Duration::from_millis(990) && held <= Duration::from_secs(1), "{held:?}");
        // The harvested count wraps.
        let mut w = RingFullLimit::default();
        w.hold_for(&pace, u32::MAX - 511);
        let held = w.hold_for(&pace, 512);
        assert!(held > Duration::from_millis(990), "{held:?}");
        // A new limit starts a new measure.
        pace.set_limit(Some(8 * MIB));
        assert_eq!(l.hold_for(&pace, 9000), Duration::ZERO);
        // Held at chunk exits instead, a VM without a ring never holds here.
        let chunks = DirtyPace::new(1, false);
        chunks.set_limit(Some(MIB));
        let mut c = RingFullLimit::default();
        c.hold_for(&chunks, 0);
        assert_eq!(c.hold_for(&chunks, 1 << 20), Duration::ZERO);
        assert!(chunks.on());
    }

    const MIB: u64 = 1 << 20;
}
