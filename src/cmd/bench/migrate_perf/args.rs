//! `bench migrate-perf`'s arguments.

use std::path::PathBuf;

use clap::Args;
use shadow_mmu_engine::MmuDesign;
use shadow_mmu_vmm::{DirtyLogInterface, HarvestSpec, LockFaults};

use crate::backend_kind::BackendKind;
use crate::harvest_args::HarvestKnobs;
use crate::lock_fault_args::LockFaultKnobs;
use crate::output::parse_size;

#[derive(Debug, Clone, Args)]
pub struct MigratePerfArgs {
    /// Backends, comma-separated: engine, kvm (the machine's /dev/kvm).
    #[arg(long, value_delimiter = ',', default_value = "engine,kvm")]
    pub backend: Vec<BackendKind>,
    /// Designs of the engine, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "locked,lockless")]
    pub mmu: Vec<MmuDesign>,
    /// The TDP design's eager page splitting, comma-separated: true, false
    /// (`kvm.eager_page_split`; `false` is `--no-eager-split`). Each value
    /// runs the `tdp` design once; the other designs ignore it.
    #[arg(long, value_delimiter = ',', default_value = "true")]
    pub eager_split: Vec<bool>,
    /// The TDP design's PML (D-bit logging), comma-separated: false, true.
    /// Each value runs the `tdp` design once more; the others ignore it.
    #[arg(long, value_delimiter = ',', default_value = "false")]
    pub pml: Vec<bool>,
    /// vCPUs, comma-separated: each count runs everything asked for (the
    /// vCPU sweep; past the host's CPUs the run says it is oversubscribed).
    #[arg(long = "vcpus", value_delimiter = ',', default_value = "1",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub vcpus_list: Vec<u32>,
    /// The count of the sweep point being run (one of `vcpus_list`).
    #[arg(skip = 1u32)]
    pub vcpus: u32,
    /// Guest memory in MiB, all vCPUs together; a comma-separated list runs
    /// each size (the plot's x axis).
    #[arg(long, value_delimiter = ',', conflicts_with = "bytes_per_vcpu")]
    pub guest_mib: Vec<u64>,
    /// Guest memory per vCPU (`dirty_log_perf_test -b`): bytes with an
    /// optional K, M, G suffix; a comma-separated list runs each size.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub bytes_per_vcpu: Vec<u64>,
    /// Repetitions of every run, interleaved (each round runs every design
    /// once, in turn): each timed figure is reported as their median with
    /// its min and max, and each ratio per pair of runs of one round.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// Iterations (harvests after the bulk copy).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub iterations: u32,
    /// Share of accesses that are writes, percent.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub write_pct: u8,
    /// Random pages instead of a sequential sweep.
    #[arg(long)]
    pub random: bool,
    /// Never map 2 MiB pages (engine).
    #[arg(long)]
    pub no_large_pages: bool,
    /// Turn the engine's `fast_page_fault` off, in both designs: the
    /// baseline of the first measurements, where a write fault on a logged page takes
    /// the slow path and the locked design updates sptes with plain stores.
    #[arg(long)]
    pub no_fast_page_fault: bool,
    /// Seconds of the fault-heavy (logging off) measurement of the engine,
    /// per design, spread over five alternations of the designs; 0 skips it.
    #[arg(long, default_value_t = 6.0)]
    pub fault_heavy_seconds: f64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write SVG charts into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Dirty-log interfaces, comma-separated: get (GET clears and
    /// re-protects), clear (manual protect: GET copies, CLEAR in chunks),
    /// ring (the per-vCPU dirty ring, reaped when full and at each harvest).
    #[arg(long, value_delimiter = ',', default_value = "get")]
    pub dirty_log: Vec<DirtyLogInterface>,
    #[command(flatten)]
    pub knobs: HarvestKnobs,
    #[command(flatten)]
    pub lock: LockFaultKnobs,
    /// The lock faults of the sweep point being run (one of `lock.points()`).
    #[arg(skip)]
    pub lock_point: LockFaults,
    /// Sweep only the first N pages (a multiple of 64) of every guest size:
    /// a fixed working set, with the guest mapped lazily (MAP_NORESERVE), so
    /// that a guest larger than this machine runs and the harvest's cost can
    /// be set against the guest's size (engine only).
    #[arg(long)]
    pub dirty_pages: Option<u64>,
    /// Threads each harvest is split over, comma-separated (engine; KVM's
    /// harvest is its own ioctl, run with 1).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub harvest_threads: Vec<u32>,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl MigratePerfArgs {
    /// Every harvest spec the lists ask for, checked.
    pub(super) fn harvest_specs(&self) -> Result<Vec<HarvestSpec>, String> {
        let mut v = Vec::new();
        for &interface in &self.dirty_log {
            for &harvest_threads in &self.harvest_threads {
                let s = self.knobs.spec(interface, harvest_threads);
                s.validate().map_err(|e| e.to_string())?;
                v.push(s);
            }
        }
        Ok(v)
    }
}
