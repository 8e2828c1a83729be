//! `shadow-mmu trace`: page-level traces of real programs, for
//! `bench kernbench --workload replay` (format: `shadow_mmu_testkit::trace`).

use std::error::Error;
use std::io::{self, BufReader};
use std::path::PathBuf;

use clap::Subcommand;
use shadow_mmu_testkit::trace::{DEFAULT_WINDOW, PageTrace};

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Converts valgrind lackey output (`--tool=lackey --trace-mem=yes`), read
    /// from stdin as a stream, into a page trace; see scripts/record-trace.sh.
    Convert {
        /// The trace file to write.
        out: PathBuf,
        /// Pages in the FIFO window that drops repeated accesses (a TLB of
        /// that many entries); 1 keeps every change of page.
        #[arg(long, default_value_t = DEFAULT_WINDOW)]
        window: u32,
    },
    /// Reads a trace file, checking its format and invariants, and prints its
    /// counts.
    Check {
        /// The trace file.
        file: PathBuf,
    },
}

pub fn main(cmd: &TraceCommand) -> Result<bool, Box<dyn Error>> {
    match cmd {
        TraceCommand::Convert { out, window } => {
            let trace =
                PageTrace::from_lackey(BufReader::with_capacity(1 << 20, io::stdin().lock()), *window)?;
            trace.save(out).map_err(|e| format!("{}: {e}", out.display()))?;
            // What we ship must read back as what we built.
            if PageTrace::load(out).map_err(|e| format!("{}: {e}", out.display()))? != trace {
                return Err(format!("{}: reads back differently", out.display()).into());
            }
            println!("{}: {trace}", out.display());
        }
        TraceCommand::Check { file } => {
            let trace = PageTrace::load(file).map_err(|e| format!("{}: {e}", file.display()))?;
            println!("{}: {trace}", file.display());
        }
    }
    Ok(true)
}
