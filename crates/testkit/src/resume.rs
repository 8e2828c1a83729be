//! The pass guest on either side of a live migration: its pacing while it
//! migrates ([`PassPacing`], the source's hook), its start at the
//! destination ([`PassStart`]), and the check of what it does there
//! ([`check_after_resume`]): every page whose content moved on from the
//! source's final digest must be in the destination's dirty log (`lost`
//! otherwise), and carry at least the iteration the guest had reached when
//! it stopped at the source (`regressed` otherwise), so the guest goes on
//! where it stopped. The check reports; it never stops the guest.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use shadow_mmu_core::spte::WORDS_PER_PAGE;
use shadow_mmu_migrate::dest::BuildError;
use shadow_mmu_migrate::ranges::{digest_of, page_digest, quiescent_bytes};
use shadow_mmu_migrate::{DestHooks, Phase, SourceHooks};
use shadow_mmu_vmm::{BackendError, PassVm, error_chain, harvest};

use crate::pacer::Pacer;

/// How the check of the guest's writes after it resumed came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResumeCheck {
    /// Not run: the guest did not start here, or it was not asked for.
    #[default]
    NotRun,
    /// Every page written was logged and continued the source's stores.
    Passed,
    /// Pages were written but not logged, or went behind the source's.
    Failed,
    /// The guest could not be watched long enough to say (it made no
    /// progress, or its vCPUs could not be paused for the check).
    Inconclusive,
}

/// What [`check_after_resume`] found (`None`: not measured).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResumeReport {
    /// The verdict.
    pub check_after_resume: ResumeCheck,
    /// Why, when it was not a pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_note: Option<String>,
    /// How long the guest ran here before the check, ms (process time: a
    /// stopped destination does not count it).
    pub run_after_ms: Option<u64>,
    /// Passes the guest had completed when it arrived.
    pub passes_at_resume: Option<u64>,
    /// Passes it had completed when the check paused it.
    pub passes_after_run: Option<u64>,
    /// Pages it wrote here (their content moved on from the source's).
    pub pages_written_after_resume: Option<u64>,
    /// Of those, pages the destination's dirty log missed.
    pub lost_pages: Option<u64>,
    /// Of those, pages whose stores do not continue the source's (an
    /// iteration below the one the guest had reached when it stopped there).
    pub regressed_pages: Option<u64>,
}

/// The pass guest's pace while it migrates: a [`Pacer`] ticked between
/// frames (the source's hook).
#[derive(Debug)]
pub struct PassPacing {
    pacer: Pacer,
    /// The rate reached up to the pause of the stop-and-copy.
    at_pause: Option<f64>,
}

impl PassPacing {
    /// Paces `vm`'s guest at `rate` bytes a second (`None`: flat out; 0:
    /// idle) from now on.
    pub fn new(vm: &dyn PassVm, rate: Option<u64>) -> Result<Self, BackendError> {
        Ok(Self { pacer: Pacer::new(vm, rate)?, at_pause: None })
    }

    /// Bytes a second the guest stored from the pacing's start to the
    /// migration's pause (to now, if it did not pause): its rate while it
    /// ran, the downtime left out.
    pub fn reached(&self) -> f64 {
        self.at_pause.unwrap_or_else(|| self.pacer.reached())
    }
}

impl SourceHooks<dyn PassVm> for PassPacing {
    fn phase(&mut self, phase: Phase) {
        if phase == Phase::Paused {
            self.at_pause = Some(self.pacer.reached());
        }
    }

    fn tick(&mut self, vm: &(dyn PassVm + 'static)) {
        self.pacer.tick(vm);
    }
}

/// The pass guest's start at the destination (the destination's hook): its
/// dirty log on once the VM is built (the check watches it; on before any
/// page loads, outside the downtime: the pages the stream loads are the
/// host's writes, which no dirty log sees, and the guest stores nothing
/// before its start), where its passes stand, then at least one pass
/// released, then the pace.
#[derive(Debug)]
pub struct PassStart {
    rate: Option<u64>,
    /// Why the pace could not be set, if it could not.
    failed: Option<String>,
    /// The least iteration the guest's new stores carry, and its passes,
    /// read before it starts.
    floor: u64,
    passes_at_resume: u64,
    pacer: Option<Pacer>,
}

impl PassStart {
    /// A start at `rate` bytes a second (`None`: flat out; 0: idle after a
    /// first pass).
    pub fn new(rate: Option<u64>) -> Self {
        Self { rate, failed: None, floor: 0, passes_at_resume: 0, pacer: None }
    }
}

impl DestHooks<dyn PassVm> for PassStart {
    fn built(&mut self, vm: &mut (dyn PassVm + 'static)) -> Result<(), BuildError> {
        Ok(vm.set_dirty_logging(true)?)
    }

    fn prepare(&mut self, vm: &mut (dyn PassVm + 'static)) -> Result<(), BuildError> {
        self.passes_at_resume = vm.passes_done();
        self.floor = vm.iteration_floor();
        Ok(())
    }

    fn start(&mut self, vm: &mut (dyn PassVm + 'static)) {
        match Pacer::new(vm, self.rate) {
            Ok(mut pacer) => {
                // At least one pass here, even for a guest that migrated idle.
                pacer.at_least(vm, 1);
                self.pacer = Some(pacer);
            }
            Err(e) => {
                // The guest runs, flat out; the check says why it cannot tell.
                vm.release(u64::MAX);
                self.failed = Some(format!("the guest's pace: {}", error_chain(&e)));
            }
        }
    }
}

/// Lets the guest that `start` started in `vm` run `run_after` (0: no
/// check) at its pace, harvesting every 20 ms, pauses it (within
/// `pause_within`) and checks every page against the source's
/// `final_digests`. What it finds is the report; it never fails.
pub fn check_after_resume(
    vm: &mut dyn PassVm,
    start: PassStart,
    final_digests: &[u64],
    run_after: Duration,
    pause_within: Duration,
) -> ResumeReport {
    let mut report = ResumeReport::default();
    if run_after.is_zero() {
        return report;
    }
    report.passes_at_resume = Some(start.passes_at_resume);
    let (check, note) = match watch(vm, start, final_digests, run_after, pause_within, &mut report) {
        Err(why) => (ResumeCheck::Inconclusive, Some(why)),
        Ok((written, lost, regressed)) => {
            (report.pages_written_after_resume, report.lost_pages, report.regressed_pages) =
                (Some(written), Some(lost), Some(regressed));
            if lost > 0 || regressed > 0 {
                let why =
                    format!("{lost} pages written but not logged, {regressed} pages behind the source's");
                (ResumeCheck::Failed, Some(why))
            } else if written == 0 {
                let ms = report.run_after_ms.unwrap_or(0);
                (ResumeCheck::Inconclusive, Some(format!("the guest wrote nothing in {ms} ms here")))
            } else {
                (ResumeCheck::Passed, None)
            }
        }
    };
    (report.check_after_resume, report.check_note) = (check, note);
    report
}

/// Lets the guest run, pauses it, and compares every page: the pages
/// written, lost and behind; `Err` says why it could not tell.
fn watch(
    vm: &mut dyn PassVm,
    start: PassStart,
    digests: &[u64],
    run_after: Duration,
    pause_within: Duration,
    report: &mut ResumeReport,
) -> Result<(u64, u64, u64), String> {
    let PassStart { floor, passes_at_resume, pacer, failed, .. } = start;
    if let Some(why) = failed {
        return Err(why);
    }
    let mut pacer = pacer.ok_or("the guest was never started")?;
    let pages = vm.pages();
    // The log of the run: harvests every 20 ms, OR-ed (a ring must be
    // reaped as it fills; a bitmap may be harvested any time).
    let words = pages.div_ceil(64) as usize;
    let (mut bitmap, mut one) = (vec![0u64; words], vec![0u64; words]);
    // Pages caught behind the source at a collection, while the guest runs:
    // a later pass would write over a wrong value before the final check.
    let mut behind = vec![false; pages as usize];
    let mut collect = |vm: &mut dyn PassVm| -> Result<(), String> {
        harvest(vm, &mut one).map_err(|e| format!("a harvest failed: {}", error_chain(&e)))?;
        for (w, (b, &o)) in bitmap.iter_mut().zip(&one).enumerate() {
            *b |= o;
            let mut m = o;
            while m != 0 {
                let p = w as u64 * 64 + u64::from(m.trailing_zeros());
                m &= m - 1;
                behind[p as usize] |= running_page_behind(vm, p, floor, digests[p as usize]);
            }
        }
        Ok(())
    };
    // At least `run_after`, and until the guest completed a pass here (a
    // loaded host can keep a vCPU thread off its CPU for a while), at most
    // ten times as long and two seconds more. Counted in this loop's own
    // steps, so that a stopped destination (SIGSTOP) does not count the time
    // it stood still against the guest.
    let patience = run_after * 10 + Duration::from_secs(2);
    let (mut ran, mut last_step, mut last_collect) = (Duration::ZERO, Instant::now(), Instant::now());
    while ran < run_after || (vm.passes_done() == passes_at_resume && ran < patience) {
        pacer.tick(vm);
        if last_collect.elapsed() >= Duration::from_millis(20) {
            collect(vm)?;
            last_collect = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(1));
        ran += last_step.elapsed().min(Duration::from_millis(20));
        last_step = Instant::now();
    }
    report.run_after_ms = Some(ran.as_millis() as u64);
    vm.vcpu_gate().pause(pause_within).map_err(|e| format!("its vCPUs could not be paused: {e}"))?;
    report.passes_after_run = Some(vm.passes_done());
    collect(vm)?;
    // SAFETY: paused just above (`pause` returned `Ok`: every vCPU is held),
    // and nothing else writes guest memory until the caller stops or
    // resumes the VM, after this returns.
    Ok(unsafe { compare_pages(vm, digests, &bitmap, &behind, floor) })
}

/// The check of a paused guest after it ran here: pages whose content moved
/// on from the source's final `digests` (written), of those the ones not in
/// the run's dirty `bitmap` (lost), and the ones holding no store of
/// iteration `floor` or later, or caught `behind` while it ran (regressed).
///
/// # Safety
///
/// `vm`'s vCPUs are paused (their stores ordered before the call by the
/// gate's acquire) and nothing writes its memory until this returns.
unsafe fn compare_pages(
    vm: &dyn PassVm,
    digests: &[u64],
    bitmap: &[u64],
    behind: &[bool],
    floor: u64,
) -> (u64, u64, u64) {
    let memory = vm.memory();
    // SAFETY: the vCPUs are paused and nothing writes guest memory (this
    // function's contract); `bytes` dies with this function.
    let bytes = unsafe { quiescent_bytes(memory) };
    let (mut written, mut lost, mut regressed) = (0, 0, 0);
    for p in 0..vm.pages() {
        if digests[p as usize] == page_digest(bytes, p) {
            continue;
        }
        written += 1;
        if bitmap[(p / 64) as usize] & (1 << (p % 64)) == 0 {
            lost += 1;
        }
        let words = &memory[p as usize * WORDS_PER_PAGE..][..WORDS_PER_PAGE];
        // Relaxed: the vCPUs are paused (the gate's acquire ordered their
        // stores before us).
        let newest = words.iter().map(|x| vm.stored_iteration(x.load(Ordering::Relaxed))).max();
        if newest.unwrap_or(0) < floor || behind[p as usize] {
            regressed += 1;
        }
    }
    (written, lost, regressed)
}

/// Is page `p` of a running guest, reported dirty, behind the source: moved
/// on from the source's final content (`digest`) yet holding no store of
/// iteration `floor` or later? Read with relaxed loads while the guest
/// runs: a store's word only grows, so a page that holds a good value is
/// never read as behind.
fn running_page_behind(vm: &dyn PassVm, p: u64, floor: u64, digest: u64) -> bool {
    let words = &vm.memory()[p as usize * WORDS_PER_PAGE..][..WORDS_PER_PAGE];
    let mut page = [0u8; WORDS_PER_PAGE * 8];
    let mut newest = 0;
    for (b, w) in page.chunks_exact_mut(8).zip(words) {
        // Relaxed: see above; the harvest that reported the page ordered the
        // store it reports before us.
        let v = w.load(Ordering::Relaxed);
        newest = newest.max(vm.stored_iteration(v));
        b.copy_from_slice(&v.to_le_bytes());
    }
    newest < floor && digest != digest_of(p, crc32c::crc32c(&page))
}
