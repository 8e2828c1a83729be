//! KVM's `dirty_log_test` (`tools/testing/selftests/kvm/dirty_log_test.c`),
//! over any [`PassVm`], so the same check runs on the engine and on KVM.
//!
//! The guest stores the iteration it is in to random pages (one vCPU, each
//! pass one store per page of the slot, at pages drawn with replacement).
//! Each iteration the host lets the vCPU make one pass, reaps the log once
//! at a random point while the vCPU runs (the ring also whenever it fills),
//! then, once the pass is done, reaps again. After each reap it checks
//! every page as `vm_dirty_log_verify` does:
//! - a page dirty in the log holds the current iteration or the one before
//!   (in a reap the vCPU ran through, or an older value, if its store had
//!   faulted but not landed: then the next reap must report it again);
//! - a clean page holds nothing newer than the current iteration, and if it
//!   holds the current one (a store that raced with the reap), the next reap
//!   must report it.
//!
//! On top, the oracle checks each reap's content where the stores carry the
//! oracle's tags (the engine), and every page exactly at the end, on every
//! backend.
//!
//! What the store's "iteration" is depends on the backend
//! ([`PassWorkload::stored_iteration`](shadow_mmu_vmm::PassWorkload::stored_iteration)): KVM's guest stores the pass number, the
//! engine's the workload's iteration tag, which the host advances with each
//! cut, one per iteration, so that both count the same way.

use std::time::Duration;

use thiserror::Error;

use crate::oracle::Oracle;
use shadow_mmu_core::dirty_bitmap::bitmap_words;
use shadow_mmu_core::spte::WORDS_PER_PAGE;
use shadow_mmu_vmm::HarvestSpec;
use shadow_mmu_vmm::{BackendError, PassVm, timed_harvest};

/// What one iteration saw (`Iteration N: dirty: D clean: C writes: W`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IterationCheck {
    /// Pages the iteration's reaps reported dirty.
    pub dirty: u64,
    /// Pages they reported clean.
    pub clean: u64,
    /// Guest stores the iteration made (one pass).
    pub writes: u64,
}

/// A page the check found wrong: the test failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DirtyLogTestError {
    /// A dirty page holds an iteration other than the current or the last.
    #[error("iteration {iteration}: page {page} is dirty but holds iteration {value}")]
    DirtyStale {
        /// The iteration checked.
        iteration: u64,
        /// The page.
        page: u64,
        /// What it holds.
        value: u64,
    },
    /// A clean page holds an iteration from the future.
    #[error("iteration {iteration}: page {page} is clean but holds iteration {value}")]
    CleanFromTheFuture {
        /// The iteration checked.
        iteration: u64,
        /// The page.
        page: u64,
        /// What it holds.
        value: u64,
    },
    /// A page written during the last reap was not reported by this one.
    #[error("iteration {iteration}: page {page} was written during the last reap and is not dirty now")]
    RaceNotReported {
        /// The iteration checked.
        iteration: u64,
        /// The page.
        page: u64,
    },
    /// The oracle found stores the log never reported.
    #[error("{0} lost dirty pages (the oracle)")]
    Lost(u64),
}

/// Why the test could not run or failed.
#[derive(Debug, Error)]
pub enum DirtyLogTestFailure {
    /// The backend refused.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The check failed.
    #[error(transparent)]
    Check(#[from] DirtyLogTestError),
}

/// The whole run (`Total bits checked: dirty (D), clear (C)`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyLogTestReport {
    /// Each iteration.
    pub iterations: Vec<IterationCheck>,
    /// Dirty bits checked in all.
    pub dirty_checked: u64,
    /// Clear bits checked in all.
    pub clear_checked: u64,
    /// Reaps made (two per iteration, and the final one).
    pub reaps: u64,
}

/// The check of one reap (module docs); `track` carries the pages that
/// must be dirty in the next reap.
fn verify(
    vm: &dyn PassVm,
    bitmap: &[u64],
    iteration: u64,
    track: &mut [bool],
    racing: bool,
    first_after_enable: bool,
) -> Result<(u64, u64), DirtyLogTestError> {
    let mem = vm.memory();
    let (mut dirty, mut clean) = (0, 0);
    for page in 0..vm.pages() {
        // Relaxed: the log's reap (an acquire of each word it takes) orders
        // the stores it reports; the rest are checked with any value.
        let value = vm
            .stored_iteration(mem[page as usize * WORDS_PER_PAGE].load(std::sync::atomic::Ordering::Relaxed));
        let was_tracked = std::mem::take(&mut track[page as usize]);
        if bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0 {
            dirty += 1;
            // INITIALLY_SET's first reap reports every page, whatever it holds
            // (dirty_log_test's allowed exception).
            if value != iteration && value + 1 != iteration && !first_after_enable {
                // A reap the vCPU ran through can report a page whose store
                // has not landed: the fault marked it (the engine marks at
                // fault time, as KVM does) and the vCPU, out of guest mode
                // for the fault, re-enters after the reap's protection and
                // flush, faults again and marks it again. It must be dirty
                // in the next reap; only a reap after the pass is strict.
                if !racing {
                    return Err(DirtyLogTestError::DirtyStale { iteration, page, value });
                }
                track[page as usize] = true;
            }
        } else {
            clean += 1;
            if value > iteration {
                return Err(DirtyLogTestError::CleanFromTheFuture { iteration, page, value });
            }
            if was_tracked {
                return Err(DirtyLogTestError::RaceNotReported { iteration, page });
            }
            // Only a reap the vCPU ran through can miss a store of this
            // iteration; after the pass, a clean page holding it was reported
            // by the reap before.
            if value == iteration && racing {
                track[page as usize] = true;
            }
        }
    }
    Ok((dirty, clean))
}

/// Runs `iterations` of the test on `vm` (one vCPU making random passes of
/// stores, none released yet), reaping by `spec`, the first reap of each
/// iteration after a random part of `interval`. `on_iteration` sees each
/// iteration's figures.
pub fn dirty_log_test(
    vm: &mut dyn PassVm,
    spec: &HarvestSpec,
    iterations: u32,
    interval: Duration,
    seed: u64,
    mut on_iteration: impl FnMut(u32, &IterationCheck),
) -> Result<DirtyLogTestReport, DirtyLogTestFailure> {
    let pages = vm.pages();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut report = DirtyLogTestReport::default();
    let mut bitmap = vec![0u64; bitmap_words(pages)];
    let mut track = vec![false; pages as usize];
    let mut oracle = Oracle::new(0, pages);
    vm.set_dirty_logging(true)?;
    oracle.full_copy(vm.memory());
    let mut first = spec.initially_set;
    let mut reap = |vm: &mut dyn PassVm,
                    bitmap: &mut [u64],
                    track: &mut [bool],
                    iteration: u64,
                    racing: bool,
                    cut: Option<u64>,
                    report: &mut DirtyLogTestReport|
     -> Result<(u64, u64), DirtyLogTestFailure> {
        timed_harvest(vm, spec, bitmap)?;
        report.reaps += 1;
        let r = verify(vm, bitmap, iteration, track, racing, std::mem::take(&mut first))?;
        let lost = match cut {
            Some(cut) => oracle.collect(vm.memory(), bitmap, cut).lost_pages,
            None => oracle.copy_dirty(vm.memory(), bitmap).lost_pages,
        };
        if lost > 0 {
            return Err(DirtyLogTestError::Lost(lost).into());
        }
        Ok(r)
    };
    for i in 1..=iterations {
        let pass = u64::from(i);
        // One cut per iteration (the engine's): the stores of this one carry
        // the tag after `last`; KVM's carry the pass number.
        let last = vm.cut();
        let iteration = last.map_or(pass, |t| t + 1);
        vm.release(pass);
        std::thread::sleep(interval.mul_f64(rng.f64()));
        // While the vCPU runs: stores of this iteration may race the reap.
        let (d1, c1) = reap(vm, &mut bitmap, &mut track, iteration, true, last, &mut report)?;
        vm.wait_passes(pass - 1)?;
        // The pass is done: every store of this iteration is complete.
        let done = last.map(|t| t + 1);
        let (d2, c2) = reap(vm, &mut bitmap, &mut track, iteration, false, done, &mut report)?;
        let check = IterationCheck { dirty: d1 + d2, clean: c1 + c2, writes: pages };
        report.dirty_checked += check.dirty;
        report.clear_checked += check.clean;
        on_iteration(i, &check);
        report.iterations.push(check);
    }
    vm.stop()?;
    timed_harvest(vm, spec, &mut bitmap)?;
    let lost = oracle.finish(vm.memory(), &bitmap).lost_pages;
    if lost > 0 {
        return Err(DirtyLogTestError::Lost(lost).into());
    }
    Ok(report)
}
