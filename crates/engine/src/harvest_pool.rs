//! The helper threads of the parallel harvest (`harvest.rs`), kept between
//! harvests instead of spawned for each.
//!
//! Why: a thread spawned for a harvest gets its CPU only when the host
//! schedules it there; on a virtual machine whose idle vCPU is halted, that
//! took 1 to 4.6 ms here, about as long as a whole 1 GiB harvest, so the
//! main thread did all the work. Kept threads do not help by themselves (a
//! parked one wakes as late), but they can be woken ahead of time:
//! [`HarvestPool::prepare`] makes them spin, ready, for a while, as a VMM
//! would when it starts the stop-and-copy (pausing the vCPUs) before the
//! final harvest. After each job they also spin a little before parking, so
//! a run of harvests (CLEAR's chunks, say) finds them awake.
//!
//! Invariants:
//! - a job is a borrowed `&(dyn Fn(usize) + Sync)`; [`HarvestPool::run`]
//!   does not return before every helper has finished with it (the
//!   `remaining` count, decremented after the call, even when it panics), so
//!   the borrow outlives every use, as with a scoped thread;
//! - one job at a time (`run` takes `&mut`-like exclusion through `busy`);
//! - a helper's panic is counted done and re-raised by `run`, as a scoped
//!   thread's is by its scope.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long helpers spin for more work after a job before they park.
const SPIN_AFTER_JOB: Duration = Duration::ZERO;

/// A job, its lifetime erased (module invariants say why that is sound).
#[derive(Clone, Copy)]
struct Job(*const (dyn Fn(usize) + Sync));

// SAFETY: the pointee is `Sync` (shared by reference between threads), and
// `run` keeps it alive until every helper is done with it.
unsafe impl Send for Job {}

struct Shared {
    job: Mutex<Option<Job>>,
    /// Bumped once per job; helpers run a job when they see it change.
    generation: AtomicU64,
    /// Helpers that have not yet finished the current job.
    remaining: AtomicUsize,
    /// Helpers spin (instead of parking) until this many ns after `origin`.
    spin_until_ns: AtomicU64,
    origin: Instant,
    stop: AtomicBool,
    /// A helper's share of a job panicked.
    panicked: AtomicBool,
    park: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn spin_for(&self, d: Duration) {
        // Relaxed: a hint; `fetch_max` keeps the latest deadline.
        self.spin_until_ns.fetch_max(self.now_ns() + d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// `helpers` threads that run harvest jobs beside the caller.
pub(crate) struct HarvestPool {
    shared: Arc<Shared>,
    helpers: usize,
    threads: Vec<JoinHandle<()>>,
    /// One job at a time.
    busy: Mutex<()>,
}

impl std::fmt::Debug for HarvestPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HarvestPool").field("helpers", &self.helpers).finish()
    }
}

impl HarvestPool {
    /// Starts `helpers` threads, parked.
    pub(crate) fn new(helpers: usize) -> Self {
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            generation: AtomicU64::new(0),
            remaining: AtomicUsize::new(0),
            spin_until_ns: AtomicU64::new(0),
            origin: Instant::now(),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let threads = (1..=helpers)
            .map(|k| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("harvest-{k}"))
                    .spawn(move || helper(&s, k))
                    .expect("spawning a harvest thread")
            })
            .collect();
        Self { shared, helpers, threads, busy: Mutex::new(()) }
    }

    /// Helper threads.
    pub(crate) fn helpers(&self) -> usize {
        self.helpers
    }

    /// Wakes the helpers and keeps them spinning, ready, for `d`.
    pub(crate) fn prepare(&self, d: Duration) {
        self.shared.spin_for(d);
        let _g = self.shared.park.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.shared.wake.notify_all();
    }

    /// Runs `f(0)` on this thread and `f(k)` on helper `k`, for every helper,
    /// and returns when all are done.
    pub(crate) fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        let _one = self.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // SAFETY: erases the borrow's lifetime; sound because this function
        // waits, below, until every helper has finished with the job
        // (module invariants), so `f` outlives every call through the pointer.
        let job = Job(unsafe {
            std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f)
        });
        *self.shared.job.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(job);
        // Relaxed: published by the release increment of `generation`.
        self.shared.remaining.store(self.helpers, Ordering::Relaxed);
        {
            let _g = self.shared.park.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Release: pairs with the helpers' acquire load: they see the job
            // and the count.
            self.shared.generation.fetch_add(1, Ordering::Release);
            self.shared.wake.notify_all();
        }
        f(0);
        // Acquire: pairs with each helper's release decrement, so everything
        // it did in the job happens before our return.
        while self.shared.remaining.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        *self.shared.job.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        // Relaxed: ordered by the acquire wait above. A helper's panic is the
        // caller's, as with a scoped thread.
        if self.shared.panicked.swap(false, Ordering::Relaxed) {
            panic!("a harvest thread panicked");
        }
    }
}

impl Drop for HarvestPool {
    fn drop(&mut self) {
        // Relaxed: the helpers see it under the park lock or at their next
        // check; the joins order the rest.
        self.shared.stop.store(true, Ordering::Relaxed);
        {
            let _g = self.shared.park.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.shared.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A helper's loop: wait for a job (spinning while told to, parked
/// otherwise), run its share, count itself done.
fn helper(s: &Shared, k: usize) {
    let mut seen = 0;
    loop {
        // Wait for the next job.
        loop {
            // Acquire: pairs with `run`'s release increment.
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            // Relaxed: see `Drop`.
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            // Relaxed: a hint (see `spin_for`).
            if s.now_ns() < s.spin_until_ns.load(Ordering::Relaxed) {
                // A spin keeps this CPU awake. (A yield instead measured
                // worse here: 0.78 to 3.5 of the one-thread harvest.)
                std::hint::spin_loop();
                continue;
            }
            let guard = s.park.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Re-check under the lock that `run` and `prepare` notify under,
            // so that no wake-up is missed.
            // Acquire: as above. Relaxed: as above.
            if s.generation.load(Ordering::Acquire) == seen
                && !s.stop.load(Ordering::Relaxed)
                && s.now_ns() >= s.spin_until_ns.load(Ordering::Relaxed)
            {
                drop(s.wake.wait(guard).unwrap_or_else(std::sync::PoisonError::into_inner));
            }
        }
        let job = *s.job.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(Job(f)) = job {
            // SAFETY: `run` keeps the job alive until `remaining` reaches 0,
            // which needs our decrement below, after this call.
            let f = unsafe { &*f };
            // A panic in the job must still count us done, or `run` would
            // wait forever; it is reported as the job's own failure would be.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(k))).is_err() {
                // Relaxed: published by the release decrement below.
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.spin_for(SPIN_AFTER_JOB);
        // Release: pairs with `run`'s acquire wait.
        s.remaining.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn every_share_runs_once_per_job_and_borrows_are_safe() {
        let pool = HarvestPool::new(3);
        for round in 0..50u64 {
            let counts: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
            pool.run(&|k| {
                counts[k].fetch_add(round + 1, Ordering::Relaxed);
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == round + 1), "round {round}");
        }
        pool.prepare(Duration::from_millis(5));
        let hits = AtomicU64::new(0);
        pool.run(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 4);
    }
}
