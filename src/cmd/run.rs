//! `shadow-mmu run`.

use std::time::Duration;

use clap::{Args, ValueEnum};
use shadow_mmu_engine::MmuDesign;
use shadow_mmu_testkit::harness::{self, HarnessError, RunConfig};
use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec};

use crate::harvest_args::HarvestKnobs;
use shadow_mmu_engine::workload::{AccessPattern, WorkloadSpec};

/// Access patterns on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Pattern {
    /// Each vCPU sweeps its own slice, one 8-byte write per page.
    Seq,
    /// Random pages of the vCPU's slice.
    Random,
    /// A hot set takes most accesses (see --hot-pages-pct, --hot-access-pct).
    Hot,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Dirty logging design.
    #[arg(long, default_value = "locked")]
    pub mmu: MmuDesign,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub vcpus: u32,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub guest_mib: u64,
    /// Seconds to harvest for.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Stop after this many collections, if sooner.
    #[arg(long)]
    pub collections: Option<u64>,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "seq")]
    pub workload: Pattern,
    /// Share of accesses that are writes, percent.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub write_pct: u8,
    /// With --workload hot: share of each slice that is hot, percent.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub hot_pages_pct: u8,
    /// With --workload hot: share of accesses to the hot set, percent.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub hot_access_pct: u8,
    /// Milliseconds between dirty log collections.
    #[arg(long, default_value_t = 50)]
    pub interval_ms: u64,
    /// Milliseconds the vCPUs run before dirty logging is enabled.
    #[arg(long, default_value_t = 200)]
    pub warmup_ms: u64,
    /// Guest address spaces the vCPUs rotate through (each maps all memory,
    /// so every gfn gets one spte per address space in its rmap).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub address_spaces: u16,
    /// Shadow page budget (n_max_mmu_pages); default: 2% of guest pages, >= 64.
    #[arg(long)]
    pub max_mmu_pages: Option<usize>,
    /// TLB entries per vCPU.
    #[arg(long, default_value_t = 1024)]
    pub tlb_entries: usize,
    /// Never map 2 MiB pages.
    #[arg(long)]
    pub no_large_pages: bool,
    #[command(flatten)]
    pub tdp: crate::tdp_args::TdpKnobs,
    #[command(flatten)]
    pub lock: crate::lock_fault_args::LockFaultKnobs,
    /// Turn `fast_page_fault` off: every write fault on a page protected for
    /// logging takes the slow path under mmu_lock, and the locked design
    /// updates sptes with plain stores (the first measurements' baseline).
    #[arg(long)]
    pub no_fast_page_fault: bool,
    /// Every N collections, turn logging off for one interval and on again
    /// with the vCPUs running.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub relog_every: Option<u64>,
    /// Memslots guest memory is split into, all logged and harvested.
    #[arg(long, default_value_t = 1)]
    pub slots: u32,
    /// Microseconds between two mmu notifier invalidations (64 KiB each)
    /// during logging; 0: none.
    #[arg(long, default_value_t = 0)]
    pub invalidate_every_us: u64,
    /// Delete and re-add a second memslot during the run, with an extra vCPU
    /// writing to it.
    #[arg(long)]
    pub slot_churn: bool,
    /// The dirty-log interface each harvest uses: get (GET clears and
    /// re-protects), clear (manual protect: GET copies, CLEAR in chunks) or
    /// ring (the per-vCPU dirty ring).
    #[arg(long, default_value = "get")]
    pub dirty_log: DirtyLogInterface,
    #[command(flatten)]
    pub knobs: HarvestKnobs,
    /// Threads each harvest (GET, CLEAR, ring reset) is split over; the
    /// locked design runs them one after the other on mmu_lock.
    #[arg(long, default_value_t = 1)]
    pub harvest_threads: u32,
    /// Seed of the workload's random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl RunArgs {
    pub fn config(&self) -> Result<RunConfig, HarnessError> {
        if !(self.seconds.is_finite() && self.seconds >= 0.0) {
            return Err(HarnessError::BadConfig(format!("--seconds {} is not a duration", self.seconds)));
        }
        let pattern = match self.workload {
            Pattern::Seq => AccessPattern::Seq,
            Pattern::Random => AccessPattern::Random,
            Pattern::Hot => {
                AccessPattern::Hot { hot_pages_pct: self.hot_pages_pct, hot_access_pct: self.hot_access_pct }
            }
        };
        // The update fills fields that only exist with the testkit's test-only
        // `break-rules` feature (on under `--all-features`); without it, every
        // field is already given.
        #[allow(clippy::needless_update)]
        Ok(RunConfig {
            mmu: self.mmu,
            fast_page_fault: !self.no_fast_page_fault,
            relog_every: self.relog_every,
            vcpus: self.vcpus,
            guest_bytes: self.guest_mib << 20,
            duration: Duration::from_secs_f64(self.seconds),
            max_collections: self.collections,
            interval: Duration::from_millis(self.interval_ms),
            warmup: Duration::from_millis(self.warmup_ms),
            workload: WorkloadSpec {
                pattern,
                write_pct: self.write_pct,
                address_spaces: self.address_spaces,
                seed: self.seed,
                lock_faults: self.lock.spec().map_err(HarnessError::BadConfig)?,
                ..WorkloadSpec::default()
            },
            max_mmu_pages: self.max_mmu_pages,
            tlb_entries: self.tlb_entries,
            large_pages: !self.no_large_pages,
            eager_page_split: self.tdp.eager_page_split(),
            pml: self.tdp.pml,
            slot_churn: self.slot_churn,
            slots: self.slots,
            invalidate_every: (self.invalidate_every_us > 0)
                .then(|| Duration::from_micros(self.invalidate_every_us)),
            harvest: HarvestSpec {
                // As given: `--initially-set` without `clear` is refused.
                initially_set: self.knobs.initially_set,
                ..self.knobs.spec(self.dirty_log, self.harvest_threads)
            },
            ..RunConfig::default()
        })
    }
}

pub fn main(args: &RunArgs) -> Result<bool, HarnessError> {
    let cfg = args.config()?;
    println!("{}", crate::report::describe(&cfg));
    if let Some(line) = crate::output::oversubscribed(cfg.vcpus, cfg.harvest.harvest_threads) {
        println!("{line}");
    }
    let report = harness::run(&cfg, |_, _| {})?;
    print!("{}", crate::report::summary(&cfg, &report));
    Ok(report.ok())
}
