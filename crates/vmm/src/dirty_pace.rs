//! A steady dirty rate inside a pass: each vCPU's guest code returns to its
//! vCPU thread after every chunk of at most [`PACE_CHUNK_PAGES`] pages
//! while a rate is set, and the thread holds it until the chunk has taken
//! its share of time, so a rate of R bytes a second is R / vCPUs a vCPU,
//! spread over the pass, never a pass at full speed and then nothing.
//!
//! The pace is a floor on each chunk's time, not a schedule: time the vCPU
//! loses inside a chunk (a throttle hold, a full ring, a lock) is not made
//! up afterwards, as a guest whose work costs a fixed time per page (QEMU's
//! migration test guests, a delay loop per page) would not make it up. Only
//! the host's own oversleeping is: a chunk's wait is shortened by what the
//! last one overslept, so that a `sleep` that wakes late does not lower the
//! rate.
//!
//! The threads also count the bytes their guests store, paced or not, so
//! that the rate a guest really reached can be printed beside the one asked
//! for.
//!
//! The same holds carry QEMU's dirty-limit (`vcpu-dirty-limit`, 8.1), which
//! a migration sets ([`DirtyPace::set_limit`]): a cap on each vCPU's dirty
//! rate, kept by holding that vCPU alone, never the others (auto-converge's
//! throttle pauses them all). QEMU holds a vCPU at its dirty ring's full
//! exit, for a time it recomputes each second from the ring's count; ours
//! holds it at its next chunk's end, for exactly what the chunk's bytes
//! exceed, with either dirty-log interface (a ring reaped every 20 ms, as
//! our migration reaps it, rarely fills).

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
    /// Bytes the vCPUs stored so far, counted chunk by chunk.
    stored: AtomicU64,
}

impl DirtyPace {
    /// The pace of a VM of `vcpus` vCPUs, off.
    pub fn new(vcpus: u32) -> Self {
        Self {
            vcpus: vcpus.max(1),
            per_vcpu: AtomicU64::new(0),
            limit: AtomicU64::new(0),
            stored: AtomicU64::new(0),
        }
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
        // Relaxed: as in `set`.
        self.limit.store(limit.unwrap_or(0), Ordering::Relaxed);
    }

    /// The dirty-limit, bytes a second a vCPU (0: none).
    pub fn limit(&self) -> u64 {
        // Relaxed: as in `set`.
        self.limit.load(Ordering::Relaxed)
    }

    /// Whether a rate or a limit is set (the guest code then ends each
    /// chunk with an exit).
    pub fn on(&self) -> bool {
        self.per_vcpu() > 0 || self.limit() > 0
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
        self.stored.load(Ordering::Relaxed)
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
    /// A chunk that stored `bytes` ended: counts them and, under a pace or
    /// a limit, waits until the chunk has taken its share of time at the
    /// lower of the two. Returns the part of the wait the limit added (the
    /// guest's own pace is not a loss).
    pub fn chunk_done(&mut self, pace: &DirtyPace, bytes: u64) -> Duration {
        pace.count(bytes);
        let share = |rate: u64| (rate > 0).then(|| Duration::from_secs_f64(bytes as f64 / rate as f64));
        let (own, limited) = (share(pace.per_vcpu()), share(pace.limit()));
        let mut by_limit = Duration::ZERO;
        if let Some(share) = own.max(limited) {
            let (ran, credit) = (self.chunk_start.elapsed(), std::mem::take(&mut self.overslept));
            let left = |s: Duration| s.saturating_sub(ran).saturating_sub(credit);
            let want = left(share);
            if !want.is_zero() {
                let t = Instant::now();
                std::thread::sleep(want);
                let waited = t.elapsed();
                // A late wake-up only: never more than the chunk's share, so
                // a vCPU descheduled for long does not run flat out after.
                self.overslept = waited.saturating_sub(want).min(share);
                if limited > own {
                    // What the guest's own pace would not have waited.
                    by_limit = want - own.map_or(Duration::ZERO, left);
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

/// Bytes of a chunk of `pages` pages of which `write_pct`% are stores.
pub fn chunk_bytes(pages: u64, write_pct: u8) -> u64 {
    pages * PAGE_SIZE * u64::from(write_pct) / 100
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_vcpu_takes_each_chunk_s_share_of_time() {
        let pace = DirtyPace::new(2);
        pace.set(Some(512 << 20));
        assert_eq!(pace.per_vcpu(), 256 << 20);
        let mut p = ChunkPacer::default();
        let chunk = chunk_bytes(PACE_CHUNK_PAGES, 100);
        let t = Instant::now();
        for _ in 0..100 {
            p.chunk_done(&pace, chunk);
        }
        // 100 chunks of 256 KiB at 256 MiB/s, 1/1024 s each: 97.66 ms at
        // least (the oversleep credit only gives back what a wait overslept).
        let took = t.elapsed();
        assert!(took >= Duration::from_micros(97_656), "{took:?}");
        assert_eq!(pace.stored(), 100 * chunk);
        // Off: no wait.
        pace.set(None);
        assert_eq!(p.chunk_done(&pace, chunk), Duration::ZERO);
        assert!(!pace.on());
        // A dirty-limit of 512 MiB/s: 20 chunks take 10 ms at least, all
        // of the wait the limit's.
        pace.set_limit(Some(512 << 20));
        assert!(pace.on());
        let t = Instant::now();
        let held: Duration = (0..20).map(|_| p.chunk_done(&pace, chunk)).sum();
        assert!(t.elapsed() >= Duration::from_millis(9) && held > Duration::ZERO, "{held:?}");
    }
}
