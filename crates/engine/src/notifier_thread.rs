//! A host thread that plays the mmu notifier: invalidations of guest memory
//! at a steady rate, as THP collapse, KSM, NUMA balancing or swap make them
//! in a real host ([`Vm::mmu_notifier_invalidate_range`]). Each drops the
//! sptes of its range; the vCPUs fault the pages in again, on the slow path
//! (no spte maps them), so that every design's faults take `mmu_lock`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_vmm::LockFaults;
use thiserror::Error;

use crate::vm::{Vm, VmError};

/// What the thread invalidates, and how often.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Invalidations {
    /// Guest physical address of the region the ranges are drawn from.
    pub gpa: u64,
    /// Bytes of that region (whole ranges only; at least one range).
    pub bytes: u64,
    /// Bytes each invalidation drops, a multiple of 4 KiB.
    pub range_bytes: u64,
    /// Invalidations per second.
    pub per_sec: f64,
    /// Seed of the ranges' choice.
    pub seed: u64,
}

impl Invalidations {
    /// The invalidations of `lock` ([`LockFaults::invalidations_per_sec`]):
    /// one 4 KiB page at a time, drawn from the first `swept_pages` pages,
    /// at the rate per vCPU times `vcpus`; `None` if it asks for none.
    pub fn of_lock_faults(lock: &LockFaults, vcpus: u32, swept_pages: u64, seed: u64) -> Option<Self> {
        (lock.invalidations_per_sec > 0).then(|| Self {
            gpa: 0,
            bytes: swept_pages * PAGE_SIZE,
            range_bytes: PAGE_SIZE,
            per_sec: f64::from(lock.invalidations_per_sec) * f64::from(vcpus),
            seed,
        })
    }
}

/// Why the thread stopped before it was asked to.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NotifierError {
    /// An invalidation was refused.
    #[error("mmu notifier invalidation")]
    Vm(#[from] VmError),
    /// The thread panicked.
    #[error("the mmu notifier thread panicked")]
    Panicked,
}

/// Invalidations made at once at most, before the clock is read again: a
/// thread that fell behind (descheduled on a busy host) catches up in
/// steps, not in one burst.
const CATCH_UP: u64 = 64;

/// The longest sleep between two checks of the clock and the stop flag.
const MAX_SLEEP: Duration = Duration::from_millis(1);

/// The running thread; [`MmuNotifierThread::stop`] joins it.
#[derive(Debug)]
pub struct MmuNotifierThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64, VmError>>>,
}

impl MmuNotifierThread {
    /// Starts invalidating `what` in `vm`.
    pub fn start(vm: &Vm, what: Invalidations) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (vm, stop2) = (vm.clone(), stop.clone());
        let thread = std::thread::spawn(move || invalidate(&vm, &what, &stop2));
        Self { stop, thread: Some(thread) }
    }

    /// Stops the thread and joins it: the invalidations it made.
    pub fn stop(mut self) -> Result<u64, NotifierError> {
        // Relaxed: the join orders everything after.
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => Ok(r?),
            Some(Err(_)) => Err(NotifierError::Panicked),
            None => Ok(0),
        }
    }
}

impl Drop for MmuNotifierThread {
    fn drop(&mut self) {
        // Relaxed: as in `stop`.
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.take().map(JoinHandle::join);
    }
}

/// The thread: as many invalidations as the rate owes since the start,
/// then a sleep until the next is due.
fn invalidate(vm: &Vm, what: &Invalidations, stop: &AtomicBool) -> Result<u64, VmError> {
    let mut rng = fastrand::Rng::with_seed(what.seed ^ 0x1e7);
    let ranges = (what.bytes / what.range_bytes).max(1);
    let period = Duration::from_secs_f64(1.0 / what.per_sec.max(1e-3));
    let t0 = Instant::now();
    let mut n = 0u64;
    // Relaxed: joined after the flag is set.
    while !stop.load(Ordering::Relaxed) {
        let due = (t0.elapsed().as_secs_f64() * what.per_sec) as u64;
        if due <= n {
            std::thread::sleep(period.min(MAX_SLEEP));
            continue;
        }
        for _ in 0..(due - n).min(CATCH_UP) {
            let gpa = what.gpa + rng.u64(..ranges) * what.range_bytes;
            vm.mmu_notifier_invalidate_range(gpa, what.range_bytes.min(what.gpa + what.bytes - gpa))?;
            n += 1;
        }
    }
    Ok(n)
}
