//! `dirty_log_perf_test`'s workload: each vCPU makes passes over its slice
//! of the test slot (pages `[id * n / vcpus, (id + 1) * n / vcpus)`), one
//! 8-byte access per page, and waits for the host after each pass. What a
//! benchmark, the oracle and the migration tests drive.

use crate::BackendError;

/// The passes' shape ([`crate::Backend::start_passes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassSpec {
    /// vCPUs, one thread each.
    pub vcpus: u32,
    /// Bytes of the test slot.
    pub guest_bytes: u64,
    /// Share of accesses that are stores, percent.
    pub write_pct: u8,
    /// Random pages instead of a sequential sweep.
    pub random: bool,
    /// Seed of the random choices.
    pub seed: u64,
    /// Only the first this many pages (a multiple of 64) are swept, split
    /// among the vCPUs: a fixed working set in a guest of any size, mapped
    /// lazily (`bench migrate-perf --dirty-pages`). `None`: all of them.
    pub dirty_pages: Option<u64>,
}

/// The passes, as the host releases and watches them. Between a completed
/// pass and the next release a vCPU runs nothing.
pub trait PassWorkload {
    /// Lets every vCPU go on up to pass `n`.
    fn release(&self, n: u64);

    /// The iteration a word the guest stored carries: the pass number on
    /// KVM (its guest stores it), the workload's tag on the engine.
    fn stored_iteration(&self, word: u64) -> u64 {
        word
    }

    /// Pages the vCPUs sweep: all of the test slot, or the working set of
    /// [`PassSpec::dirty_pages`].
    fn swept_pages(&self) -> u64;

    /// Waits until every vCPU has completed more than `since` passes;
    /// returns the longest of their last passes, ns.
    fn wait_passes(&self, since: u64) -> Result<u64, BackendError>;

    /// Where the vCPUs tag their stores with an iteration (the engine's
    /// workload): starts a new one and returns the last whose stores are all
    /// complete, so that the oracle can check each harvest; `None` where the
    /// stores carry no tag (the oracle then checks at the end only). Called
    /// with every vCPU waiting for a release.
    fn cut(&self) -> Option<u64>;

    /// Passes every vCPU has completed (the least of their counts).
    fn passes_done(&self) -> u64;

    /// The least iteration ([`Self::stored_iteration`]) any store the vCPUs
    /// make from now on carries: after
    /// [`crate::VcpuControl::restore_vcpus`], what a migration's destination
    /// checks the guest's new stores against.
    fn iteration_floor(&self) -> u64;
}

/// What a VM measured beyond the common figures, at its stop.
#[derive(Debug, Clone, Default)]
pub struct PassExtras {
    /// vCPU write-fault latencies: during a harvest, and with none running.
    pub latency: Option<(crate::LatencySummary, crate::LatencySummary)>,
    /// Named figures, for the JSON's `details`.
    pub figures: Vec<(&'static str, u64)>,
    /// Lines for the report.
    pub lines: Vec<String>,
}
