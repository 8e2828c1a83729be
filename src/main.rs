//! `shadow-mmu`: runs VMs on the engine under dirty logging, checked by the
//! oracle, and stress-tests them.

mod bench;
mod report;
mod run;
mod stress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A shadow MMU with lockless dirty logging, after the KVM series
/// "KVM: MMU: locklessly write-protect" (2013).
#[derive(Parser)]
#[command(name = "shadow-mmu", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM, run a workload on its vCPUs, harvest the dirty log at an
    /// interval and check every harvest with the oracle.
    Run(run::RunArgs),
    /// Run random configurations for a while; stop at the first failure and
    /// print how to replay it.
    Stress(stress::StressArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ok = match cli.command {
        Command::Run(args) => run::main(&args),
        Command::Stress(args) => stress::main(&args),
        Command::Bench(bench::BenchCommand::MigratePerf(args)) => bench::migrate_perf(&args),
    };
    match ok {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
