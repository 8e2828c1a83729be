//! `shadow-mmu stress`: random configurations until the time is up or one
//! fails.

use std::time::{Duration, Instant};

use clap::Args;
use shadow_mmu_testkit::harness::{self, HarnessError};

#[derive(Debug, Args)]
pub struct StressArgs {
    /// Minutes to run for.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Seed of the sequence of runs, decimal or 0x-hex (default: from the
    /// clock; printed).
    #[arg(long, value_parser = parse_u64)]
    pub seed: Option<u64>,
    /// Longest harvesting time of one run, seconds.
    #[arg(long, default_value_t = 20)]
    pub max_run_seconds: u64,
    /// Replay one run: the seed a failing run printed.
    #[arg(long, conflicts_with = "seed", value_parser = parse_u64)]
    pub run_seed: Option<u64>,
}

/// A u64 in decimal or with a 0x prefix in hex.
fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?} is not a decimal or 0x-hex u64: {e}"))
}

/// SplitMix64: run seeds from the sequence seed.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn one(i: u64, run_seed: u64, max: Duration) -> Result<bool, HarnessError> {
    let cfg = harness::random_config(run_seed, max);
    let t0 = Instant::now();
    let r = harness::run(&cfg, |_, _| {})?;
    println!(
        "[{i}] run-seed={run_seed:#018x} {} -> {} collections, {} pages harvested, {} lost, {:.1} s",
        crate::report::describe(&cfg),
        r.collections,
        r.harvested_pages,
        r.lost_pages,
        t0.elapsed().as_secs_f64()
    );
    if !r.ok() {
        print!("{}", crate::report::summary(&cfg, &r));
        println!("replay: shadow-mmu stress --run-seed {run_seed:#x} --max-run-seconds {}", max.as_secs());
    }
    Ok(r.ok())
}

pub fn main(args: &StressArgs) -> Result<bool, HarnessError> {
    let max = Duration::from_secs(args.max_run_seconds.max(1));
    if let Some(s) = args.run_seed {
        return one(0, s, max);
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!(
        "stress: seed {seed:#x}, {} minutes (replay all: shadow-mmu stress --seed {seed:#x})",
        args.minutes
    );
    let deadline = Instant::now() + Duration::from_secs_f64(args.minutes.max(0.0) * 60.0);
    let mut i = 0;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        if !one(i, splitmix(seed ^ i), max.min(left.max(Duration::from_secs(1))))? {
            return Ok(false);
        }
        i += 1;
    }
    println!("stress: {i} runs, all OK");
    Ok(true)
}
