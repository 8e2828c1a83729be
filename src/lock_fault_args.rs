//! The lock-fault workloads' knobs (`LockFaults`), shared by `run`,
//! `migrate outgoing`, `bench migrate` and `bench migrate-perf` (which
//! takes `--lock-faults` as a list: the fault-rate sweep).

use clap::Args;
use shadow_mmu_vmm::LockFaults;

/// `--fresh-faults`, `--split-faults`, `--invalidations`, `--lock-faults`.
#[derive(Debug, Clone, Default, Args)]
pub struct LockFaultKnobs {
    /// First stores per second per vCPU to never-mapped memory while dirty
    /// logging is on: a growing working set (engine). The vCPUs then sweep
    /// the first half of the guest; these touch the second.
    #[arg(long, default_value_t = 0)]
    pub fresh_faults: u32,
    /// First stores per second per vCPU, while logging is on, to memory
    /// mapped with 2 MiB pages before it was enabled: the 4 KiB faults of
    /// broken-up huge pages (engine; the reserve as for --fresh-faults).
    #[arg(long, default_value_t = 0)]
    pub split_faults: u32,
    /// mmu notifier invalidations per second per vCPU while logging is on,
    /// each of one swept page (engine).
    #[arg(long, default_value_t = 0)]
    pub invalidations: u32,
    /// The three mixed, a third each, at this many faults per second per
    /// vCPU; bench migrate-perf takes a comma-separated list, each value a
    /// point of the sweep.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["fresh_faults", "split_faults", "invalidations"])]
    pub lock_faults: Vec<u32>,
}

impl LockFaultKnobs {
    /// Each point asked for: one per `--lock-faults` value, or the three
    /// single knobs as one.
    pub fn points(&self) -> Vec<LockFaults> {
        if self.lock_faults.is_empty() {
            vec![LockFaults {
                fresh_per_sec: self.fresh_faults,
                split_per_sec: self.split_faults,
                invalidations_per_sec: self.invalidations,
            }]
        } else {
            self.lock_faults.iter().map(|&r| LockFaults::mix(r)).collect()
        }
    }

    /// The one point a command that runs one VM takes.
    pub fn spec(&self) -> Result<LockFaults, String> {
        match self.points()[..] {
            [one] => Ok(one),
            _ => Err(format!("--lock-faults takes one rate here, not {}", self.lock_faults.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_splits_a_rate_in_thirds_and_single_knobs_make_one_point() {
        let k = LockFaultKnobs { lock_faults: vec![0, 10], ..LockFaultKnobs::default() };
        let p = k.points();
        assert_eq!(p.len(), 2);
        assert!(!p[0].any());
        assert_eq!((p[1].fresh_per_sec, p[1].split_per_sec, p[1].invalidations_per_sec), (4, 3, 3));
        assert!(k.spec().is_err(), "two rates for one VM");
        let k = LockFaultKnobs { fresh_faults: 5, ..LockFaultKnobs::default() };
        assert_eq!(k.spec().unwrap().total_per_sec(), 5);
    }
}
