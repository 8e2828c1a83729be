//! `shadow-mmu bench`: benchmarks in the manner of KVM's
//! `dirty_log_perf_test`, and the seed's kernbench no-regression run.

mod kernbench;
mod migrate;
mod migrate_perf;
mod pace;

use std::error::Error;

use clap::Subcommand;

pub use kernbench::KernbenchArgs;
pub use migrate_perf::MigratePerfArgs;
pub use pace::PaceArgs;

/// What a bench returns: whether every check passed.
pub type BenchResult<T = bool> = Result<T, Box<dyn Error>>;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// get_dirty_log time with vCPUs write-faulting, per backend and design,
    /// with the vCPUs' fault latency and a compare-exchange floor
    /// (`dirty_log_perf_test`'s report, and the seed's first claim).
    MigratePerf(MigratePerfArgs),
    /// The no-regression run: a fault-heavy workload with logging off, under
    /// mmu notifier invalidations and shrinker pressure, swept or replayed
    /// from a real program's trace (the seed's second claim).
    Kernbench(KernbenchArgs),
    /// Live migrations over loopback, the destination a process of its
    /// own: QEMU's statistics per backend, design, interface and dirty rate,
    /// beside a raw loopback copy of the same bytes.
    Migrate(migrate::MigrateArgs),
    /// How closely a guest keeps the dirty rate asked of it, per backend
    /// and vCPU count, with nothing else running.
    Pace(PaceArgs),
}

/// Runs a bench.
pub fn main(cmd: &BenchCommand) -> BenchResult {
    match cmd {
        BenchCommand::MigratePerf(a) => migrate_perf::main(a),
        BenchCommand::Kernbench(a) => kernbench::main(a),
        BenchCommand::Migrate(a) => migrate::main(a),
        BenchCommand::Pace(a) => pace::main(a),
    }
}
