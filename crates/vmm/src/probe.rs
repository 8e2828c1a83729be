//! The vCPUs' fault latency during harvests, where a backend can time its
//! faults (the engine; KVM does not show its faults to userspace).

use std::time::Duration;

/// The quantiles a [`LatencySummary`] keeps: those the reports and plots
/// read.
pub const SUMMARY_QUANTILES: [f64; 9] = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999];

/// A latency distribution in a few numbers: how many, the quantiles of
/// [`SUMMARY_QUANTILES`], the largest. The backend that recorded the
/// latencies keeps the histogram; this crate needs none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySummary {
    count: u64,
    /// The value at each of [`SUMMARY_QUANTILES`], ns.
    quantiles_ns: [u64; SUMMARY_QUANTILES.len()],
    max_ns: u64,
}

impl LatencySummary {
    /// The summary of what `quantile` (a quantile's value, ns) says of
    /// `count` latencies whose largest is `max_ns`.
    pub fn from_fn(count: u64, max_ns: u64, quantile: impl Fn(f64) -> u64) -> Self {
        Self { count, quantiles_ns: SUMMARY_QUANTILES.map(quantile), max_ns }
    }

    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest, ns (0 if none).
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// The value at quantile `q`, ns: one of [`SUMMARY_QUANTILES`] (another
    /// `q` is a bug of the caller's).
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let i = SUMMARY_QUANTILES.iter().position(|&k| k == q);
        self.quantiles_ns[i.unwrap_or_else(|| panic!("quantile {q} is not one a summary keeps"))]
    }
}

/// What the vCPUs lost to the host's work, in ns of vCPU time, summed
/// since they started, by cause: the stall a migration or a harvest costs
/// the guest beyond its own work. Where a backend cannot see a cause (KVM
/// hides its lock waits and flushes), it reports 0 and says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuLoss {
    /// Waiting for `mmu_lock` for read in page faults.
    pub mmu_lock_read_wait_ns: u64,
    /// ... for write.
    pub mmu_lock_write_wait_ns: u64,
    /// Of those waits, those that began while a harvest held the lock (or
    /// was between two of its holds): the harvest's doing. The rest are
    /// behind other vCPUs' faults or the host's invalidations, and would
    /// be there without a harvest.
    pub harvest_lock_wait_ns: u64,
    /// Handling remote TLB flush requests.
    pub tlb_flush_ns: u64,
    /// Held out of the guest by a throttle (auto-converge's pauses through
    /// the `VcpuGate`, dirty-limit's holds of one vCPU) or a pause.
    pub throttle_ns: u64,
    /// Waiting for the host to reap a full dirty ring.
    pub ring_full_ns: u64,
}

impl VcpuLoss {
    /// What dirty logging's harvests and the throttle cost: the lock waits
    /// behind a harvest, the flushes, the throttle, the full rings. (Lock
    /// waits behind others are not the migration's: see
    /// [`Self::harvest_lock_wait_ns`].)
    pub fn stall_ns(&self) -> u64 {
        self.harvest_lock_wait_ns + self.tlb_flush_ns + self.throttle_ns + self.ring_full_ns
    }

    /// What was lost since `earlier`, a reading of the same counters.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            mmu_lock_read_wait_ns: self.mmu_lock_read_wait_ns.saturating_sub(earlier.mmu_lock_read_wait_ns),
            mmu_lock_write_wait_ns: self
                .mmu_lock_write_wait_ns
                .saturating_sub(earlier.mmu_lock_write_wait_ns),
            harvest_lock_wait_ns: self.harvest_lock_wait_ns.saturating_sub(earlier.harvest_lock_wait_ns),
            tlb_flush_ns: self.tlb_flush_ns.saturating_sub(earlier.tlb_flush_ns),
            throttle_ns: self.throttle_ns.saturating_sub(earlier.throttle_ns),
            ring_full_ns: self.ring_full_ns.saturating_sub(earlier.ring_full_ns),
        }
    }

    /// Each cause with its name, for reports and JSON.
    pub fn causes(&self) -> [(&'static str, u64); 6] {
        [
            ("mmu_lock_read_wait", self.mmu_lock_read_wait_ns),
            ("mmu_lock_write_wait", self.mmu_lock_write_wait_ns),
            ("harvest_lock_wait", self.harvest_lock_wait_ns),
            ("tlb_flush", self.tlb_flush_ns),
            ("throttle", self.throttle_ns),
            ("ring_full", self.ring_full_ns),
        ]
    }
}

impl std::iter::Sum for VcpuLoss {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |mut t, l| {
            t += l;
            t
        })
    }
}

impl std::ops::AddAssign for VcpuLoss {
    fn add_assign(&mut self, o: Self) {
        self.mmu_lock_read_wait_ns += o.mmu_lock_read_wait_ns;
        self.mmu_lock_write_wait_ns += o.mmu_lock_write_wait_ns;
        self.harvest_lock_wait_ns += o.harvest_lock_wait_ns;
        self.tlb_flush_ns += o.tlb_flush_ns;
        self.throttle_ns += o.throttle_ns;
        self.ring_full_ns += o.ring_full_ns;
    }
}

/// Harvest instrumentation (module docs).
pub trait HarvestProbe {
    /// The final harvest is coming (the stop-and-copy): wake whatever
    /// threads it will use so that they are ready within `within`.
    fn prepare_harvest(&self, _within: Duration) {}

    /// Marks the start of a harvest, for backends that time each vCPU fault
    /// and tell faults during a harvest from others.
    fn harvest_begin(&self) {}

    /// Marks the end of a harvest.
    fn harvest_end(&self) {}

    /// The vCPUs' write faults that overlapped a harvest since the last
    /// call, where the backend times its faults.
    fn take_harvest_latency(&self) -> Option<LatencySummary> {
        None
    }

    /// What each vCPU has lost so far ([`VcpuLoss`]), read live; empty
    /// where the backend measures none.
    fn vcpu_losses(&self) -> Vec<VcpuLoss> {
        Vec::new()
    }
}
