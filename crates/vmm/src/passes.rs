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
    /// Faults that need `mmu_lock`, paced while dirty logging is on.
    pub lock_faults: LockFaults,
    /// Map the guest's memory lazily, each page on its first touch, not
    /// all of it up front: a migration's destination, whose pages come
    /// from the stream, is ready at once (QEMU's and Cloud Hypervisor's
    /// are). Benchmarks populate, so that a first pass measures the MMU,
    /// not the host kernel's first-touch faults.
    pub lazy_memory: bool,
    /// The last this many vCPUs only load (their passes store nothing):
    /// vCPUs that compute while the others dirty memory, whose progress
    /// shows what a throttle costs the part of the guest that does not
    /// dirty (auto-converge holds every vCPU; dirty-limit only those over
    /// the limit).
    pub compute_vcpus: u32,
    /// Sample the guest's progress every millisecond for
    /// [`PassExtras::progress`], where the backend can: a thread of its
    /// own on a host the vCPUs share, so only a benchmark that plots the
    /// samples asks. The harvest windows are recorded either way.
    pub progress_samples: bool,
}

impl PassSpec {
    /// `vcpus` vCPUs storing to every page of `guest_bytes` in order, each
    /// pass, from `seed`: nothing else (no working set, no lock faults,
    /// memory populated, no computing vCPU). The other fields are set on
    /// top of it.
    pub fn sweep(vcpus: u32, guest_bytes: u64, seed: u64) -> Self {
        Self {
            vcpus,
            guest_bytes,
            write_pct: 100,
            random: false,
            seed,
            dirty_pages: None,
            lock_faults: LockFaults::default(),
            lazy_memory: false,
            compute_vcpus: 0,
            progress_samples: false,
        }
    }
}

/// Whether vCPU `id` of `vcpus` is one of the last `compute_vcpus`, which
/// only load ([`PassSpec::compute_vcpus`]).
pub fn is_compute_vcpu(id: u32, vcpus: u32, compute_vcpus: u32) -> bool {
    compute_vcpus > 0 && id + compute_vcpus >= vcpus
}

/// Faults that need `mmu_lock` while dirty logging is on, each paced per
/// vCPU: the faults a real guest takes during a migration, which
/// `fast_page_fault` cannot fix because no spte, or no 4 KiB spte, maps the
/// page. Where the harvest holds the lock (the locked design), each of them
/// waits for it.
///
/// The first two need memory no pass sweeps: a *reserve* as large as the
/// swept pages, right after them, each vCPU its own part (the same split as
/// its slice). The backend that runs them says which it can.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockFaults {
    /// First touches (stores) of never-mapped reserve pages, per second per
    /// vCPU: a growing working set, as a guest allocating does. Each takes
    /// the slow path: no spte maps the page.
    pub fresh_per_sec: u32,
    /// First stores, per second per vCPU, to reserve pages that were mapped
    /// with 2 MiB pages before logging was enabled: the 4 KiB faults after
    /// enabling logging breaks up huge pages (without eager split; with it,
    /// the TDP design's are fast-path faults on split leaves).
    pub split_per_sec: u32,
    /// mmu notifier invalidations per second per vCPU, each of one swept
    /// page at random (THP, KSM, NUMA balancing or swap in the host): the
    /// next store to it faults with no spte.
    pub invalidations_per_sec: u32,
}

impl LockFaults {
    /// All three at `rate / 3` faults per second per vCPU each (the
    /// remainder to the fresh touches): a mix at a total fault rate.
    pub fn mix(rate: u32) -> Self {
        Self {
            fresh_per_sec: rate - 2 * (rate / 3),
            split_per_sec: rate / 3,
            invalidations_per_sec: rate / 3,
        }
    }

    /// Are any asked for?
    pub fn any(&self) -> bool {
        self.fresh_per_sec > 0 || self.split_per_sec > 0 || self.invalidations_per_sec > 0
    }

    /// Do they need the reserve (fresh or split touches)?
    pub fn needs_reserve(&self) -> bool {
        self.fresh_per_sec > 0 || self.split_per_sec > 0
    }

    /// The pages a guest of `guest_pages` pages sweeps by default: all of
    /// them, or the first half where these faults need the reserve (the
    /// second half).
    pub fn swept_pages(&self, guest_pages: u64) -> u64 {
        if self.needs_reserve() { guest_pages / 2 } else { guest_pages }
    }

    /// Faults per second per vCPU, all three together.
    pub fn total_per_sec(&self) -> u64 {
        u64::from(self.fresh_per_sec) + u64::from(self.split_per_sec) + u64::from(self.invalidations_per_sec)
    }

    /// `fresh 1000/s, split 0/s, invalidations 500/s per vCPU`, or `none`.
    pub fn label(&self) -> String {
        if !self.any() {
            return "none".into();
        }
        format!(
            "fresh {}/s, split {}/s, invalidations {}/s per vCPU",
            self.fresh_per_sec, self.split_per_sec, self.invalidations_per_sec
        )
    }
}

/// The passes, as the host releases and watches them. Between a completed
/// pass and the next release a vCPU runs nothing.
pub trait PassWorkload {
    /// Lets every vCPU go on up to pass `n`.
    fn release(&self, n: u64);

    /// The dirty rate the vCPUs keep inside their passes, and the bytes
    /// they stored.
    fn dirty_pace(&self) -> std::sync::Arc<crate::DirtyPace>;

    /// Paces the vCPUs at `rate` bytes a second inside their passes
    /// (`None`: flat out), as far as the passes released let them go.
    fn set_dirty_rate(&self, rate: Option<u64>) -> Result<(), BackendError> {
        self.dirty_pace().set(rate);
        Ok(())
    }

    /// The iteration a word the guest stored carries: the pass number on
    /// KVM (its guest stores it), the workload's tag on the engine.
    fn stored_iteration(&self, word: u64) -> u64 {
        word
    }

    /// Pages the vCPUs sweep: all of the test slot, or the working set of
    /// [`PassSpec::dirty_pages`].
    fn swept_pages(&self) -> u64;

    /// Pages any store may land in, from the slot's start: the swept pages,
    /// and the reserve of [`LockFaults`] after them where there is one.
    fn stored_pages(&self) -> u64 {
        self.swept_pages()
    }

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

    /// Passes each vCPU has completed, by vCPU.
    fn vcpu_passes(&self) -> Vec<u64>;

    /// The least iteration ([`Self::stored_iteration`]) any store the vCPUs
    /// make from now on carries: after
    /// [`crate::VcpuControl::restore_vcpus`], what a migration's destination
    /// checks the guest's new stores against.
    fn iteration_floor(&self) -> u64;
}

/// One harvest window as the guest lived it: from the harvest's start to
/// its end, ns since the passes started; the guest's accesses (all vCPUs)
/// at both ends; and the vCPU-ns they had spent waiting for the host to
/// release a pass (the workload's own rhythm, not time a harvest took).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HarvestWindow {
    /// Start, ns.
    pub begin_ns: u64,
    /// End, ns.
    pub end_ns: u64,
    /// Accesses made by then.
    pub begin_accesses: u64,
    /// ... and by its end.
    pub end_accesses: u64,
    /// vCPU-ns waited for releases by then, all vCPUs.
    pub begin_idle_ns: u64,
    /// ... and by its end.
    pub end_idle_ns: u64,
}

/// The guest's progress over a run: its accesses sampled over time, and the
/// harvest windows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgressTrace {
    /// vCPUs.
    pub vcpus: u32,
    /// (ns since the passes started, accesses made by then, all vCPUs).
    pub samples: Vec<(u64, u64)>,
    /// Each probed harvest.
    pub windows: Vec<HarvestWindow>,
}

impl ProgressTrace {
    /// Accesses per vCPU-second the vCPUs ran (not waiting for a release)
    /// inside the harvest windows, and outside them between the first
    /// window's start and the last one's end; `None` without a window, or
    /// with no running time on either side.
    pub fn rates(&self) -> Option<(f64, f64)> {
        let (first, last) = (self.windows.first()?, self.windows.last()?);
        let vcpus = u64::from(self.vcpus.max(1));
        // vCPU-ns running in a span of `ns` in which they idled `idle`.
        let running = |ns: u64, idle: u64| (ns * vcpus).saturating_sub(idle);
        let inside_ns: u64 = self
            .windows
            .iter()
            .map(|w| running(w.end_ns - w.begin_ns, w.end_idle_ns - w.begin_idle_ns))
            .sum();
        let inside: u64 = self.windows.iter().map(|w| w.end_accesses - w.begin_accesses).sum();
        let span_ns = running(last.end_ns - first.begin_ns, last.end_idle_ns - first.begin_idle_ns);
        let outside_ns = span_ns.checked_sub(inside_ns).filter(|&n| n > 0)?;
        let outside = (last.end_accesses - first.begin_accesses).saturating_sub(inside);
        (inside_ns > 0)
            .then(|| (inside as f64 / (inside_ns as f64 / 1e9), outside as f64 / (outside_ns as f64 / 1e9)))
    }

    /// Progress inside harvest windows as a fraction of progress outside
    /// them, per running vCPU-second (1.0: the harvests cost the guest
    /// nothing).
    pub fn fraction(&self) -> Option<f64> {
        self.rates().filter(|r| r.1 > 0.0).map(|(i, o)| i / o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_rates_count_running_time_only() {
        let w = |b: u64, e: u64, ab: u64, ae: u64, ib: u64, ie: u64| HarvestWindow {
            begin_ns: b,
            end_ns: e,
            begin_accesses: ab,
            end_accesses: ae,
            begin_idle_ns: ib,
            end_idle_ns: ie,
        };
        // One vCPU: 1 s windows at 0 and 10 s; between them it ran 4 s and
        // idled 4 s; 100 accesses in each window, 800 outside.
        let t = ProgressTrace {
            vcpus: 1,
            samples: Vec::new(),
            windows: vec![
                w(0, 1_000_000_000, 0, 100, 0, 0),
                w(9_000_000_000, 10_000_000_000, 900, 1000, 4_000_000_000, 4_000_000_000),
            ],
        };
        let (inside, outside) = t.rates().unwrap();
        assert_eq!((inside, outside), (100.0, 200.0));
        assert_eq!(t.fraction(), Some(0.5));
        assert_eq!(ProgressTrace::default().rates(), None, "no window");
    }
}

/// What a VM measured beyond the common figures, at its stop.
#[derive(Debug, Clone, Default)]
pub struct PassExtras {
    /// vCPU write-fault latencies: during a harvest, and with none running.
    pub latency: Option<(crate::LatencySummary, crate::LatencySummary)>,
    /// What each vCPU lost, by cause, over the whole run; and, of its
    /// `mmu_lock` waits, those in faults that overlapped a harvest (read,
    /// write).
    pub vcpu_losses: Vec<(crate::VcpuLoss, (u64, u64))>,
    /// The guest's progress, where the backend samples it.
    pub progress: Option<ProgressTrace>,
    /// Named figures, for the JSON's `details`.
    pub figures: Vec<(&'static str, u64)>,
    /// Lines for the report.
    pub lines: Vec<String>,
}
