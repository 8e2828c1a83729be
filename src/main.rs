//! `shadow-mmu`: runs VMs on the engine under dirty logging, checked by the
//! oracle, and stress-tests them.

mod backend_kind;
mod cmd;
mod harvest_args;
mod lock_fault_args;
mod output;
mod plot;
mod report;
mod tdp_args;
mod vm_description;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cmd::{bench, dirty_log_test, migrate, run, stress, trace};

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
    /// KVM's dirty_log_test: the guest stores the iteration into random
    /// pages, the host reaps while it runs and checks every page.
    DirtyLogTest(dirty_log_test::DirtyLogTestArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(Box<bench::BenchCommand>),
    /// Live migration between two processes over TCP.
    #[command(subcommand)]
    Migrate(migrate::MigrateCommand),
    /// Page traces of real programs, for kernbench's replay.
    #[command(subcommand)]
    Trace(trace::TraceCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let passed = |r: Result<bool, Box<dyn std::error::Error>>| r.map(|ok| if ok { 0 } else { 1 });
    let code: Result<u8, Box<dyn std::error::Error>> = match cli.command {
        Command::Run(args) => passed(run::main(&args).map_err(Into::into)),
        Command::Stress(args) => passed(stress::main(&args).map_err(Into::into)),
        Command::DirtyLogTest(args) => passed(dirty_log_test::main(&args)),
        Command::Bench(cmd) => passed(bench::main(&cmd)),
        // Its own codes (cmd/migrate.rs's docs).
        Command::Migrate(cmd) => migrate::main(&cmd),
        Command::Trace(cmd) => passed(trace::main(&cmd)),
    };
    match code {
        Ok(c) => ExitCode::from(c),
        Err(e) => {
            eprintln!("error: {}", report::error_chain(e.as_ref()));
            ExitCode::from(2)
        }
    }
}
