//! The pause handshake between a host and its vCPU threads: the protocol
//! under the testkit's `VcpuGate` (a migration's stop-and-copy, QEMU's
//! auto-converge throttle), here so that loom can check it.
//!
//! The host [`request`](PauseProtocol::request)s a pause, kicks the vCPUs
//! out of guest mode, and waits until [`all_held`](PauseProtocol::all_held);
//! a vCPU outside guest mode that sees the request calls
//! [`hold`](PauseProtocol::hold), which counts it held until the host
//! [`release`](PauseProtocol::release)s them.
//!
//! Invariant: when `all_held(n)` is true, none of the `n` vCPUs is in guest
//! mode, nor will be until `release`. The race it closes: a vCPU that saw
//! the last release but is still in the count when a new request comes: if
//! it then left the count and went back to its guest, the host would have
//! counted it held. So the request and the count share one word, and a
//! vCPU leaves the count only by a compare-exchange from a value without
//! the request: a request that comes first makes it fail, and the vCPU
//! holds on (it has not run since it saved its state); one that comes
//! after sees the count without it, and the host waits for its next hold.
//! (An earlier version kept the two in separate words, ordered by SeqCst on
//! both sides; loom, which does not model SeqCst's total order, could not
//! check that, and a single word needs no such argument.)

use crate::breakage::Breakage;
use crate::sync::atomic::{AtomicU32, Ordering};

/// The request bit of the word; the rest counts the vCPUs held.
const PAUSE: u32 = 1 << 31;

/// The pause request and the count of vCPUs held, in one word (module
/// docs).
#[derive(Debug, Default)]
pub struct PauseProtocol {
    word: AtomicU32,
}

impl PauseProtocol {
    /// Nothing requested, nobody held.
    pub fn new() -> Self {
        Self::default()
    }

    /// Host: asks every vCPU to pause (kick them after).
    pub fn request(&self) {
        // Relaxed would do for the bit itself (an RMW: ordered with every
        // vCPU's increment and leaving compare-exchange in the word's
        // modification order); AcqRel so that what the host wrote before a
        // pause is visible to a vCPU that sees it.
        self.word.fetch_or(PAUSE, Ordering::AcqRel);
    }

    /// Host: vCPUs held now (0 unless a pause is requested... or ending).
    pub fn held(&self) -> u32 {
        // Acquire: pairs with the vCPU's AcqRel increment in `hold`, after
        // which the state it saved and its last access are visible to us.
        self.word.load(Ordering::Acquire) & !PAUSE
    }

    /// Host: are all `vcpus` held under the current request? Once true, none
    /// is in guest mode until `release`.
    pub fn all_held(&self, vcpus: u32) -> bool {
        // Acquire: as in `held`.
        self.word.load(Ordering::Acquire) == PAUSE | vcpus
    }

    /// Host: ends the pause.
    pub fn release(&self) {
        // AcqRel (release the part that matters): pairs with the vCPU's
        // acquire loads in `hold`: what the host did while the vCPUs were
        // held (a restore) is visible to them when they run again.
        self.word.fetch_and(!PAUSE, Ordering::AcqRel);
    }

    /// vCPU, outside guest mode: is a pause requested?
    pub fn requested(&self) -> bool {
        // Acquire: pairs with `request`; a request this misses is followed
        // by a kick (the host kicks until every vCPU is held).
        self.word.load(Ordering::Acquire) & PAUSE != 0
    }

    /// vCPU, outside guest mode with its state saved: counts itself held
    /// and waits (calling `wait` each turn) until the pause ends or `stop()`;
    /// returns when it may go back to the guest (or stop).
    pub fn hold(&self, mut wait: impl FnMut(), stop: impl Fn() -> bool, b: &Breakage) {
        // AcqRel: release pairs with the host's acquire load in `all_held`
        // (our saved state and last access before it).
        self.word.fetch_add(1, Ordering::AcqRel);
        loop {
            // Acquire: pairs with `release`.
            let w = self.word.load(Ordering::Acquire);
            if w & PAUSE != 0 && !stop() {
                wait();
                continue;
            }
            if b.pause_leaves_without_recheck() {
                // Broken on purpose: leaves whatever came since its look.
                self.word.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            // AcqRel: as the increment; fails if a new request came since
            // our load, and then we hold on.
            if self.word.compare_exchange(w, w - 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return;
            }
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::loom_support::check;
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicBool, Ordering};

    /// One vCPU makes two "guest" runs, holding before one whenever a pause
    /// is requested; the host pauses, releases, pauses again. After each
    /// pause completes, the vCPU must not be in its guest.
    fn pause_twice(b: Breakage) {
        check(move || {
            let p = Arc::new(PauseProtocol::new());
            let in_guest = Arc::new(AtomicBool::new(false));
            let done = Arc::new(AtomicBool::new(false));
            let (v, g, d) = (p.clone(), in_guest.clone(), done.clone());
            let vcpu = loom::thread::spawn(move || {
                let mut runs = 0;
                let mut holds = 0;
                while runs < 2 && holds < 3 {
                    // After a hold, straight back to the guest, as a vCPU
                    // kicked out of it does.
                    if v.requested() {
                        holds += 1;
                        v.hold(loom::thread::yield_now, || false, &b);
                    }
                    g.store(true, Ordering::SeqCst);
                    g.store(false, Ordering::SeqCst);
                    runs += 1;
                }
                d.store(true, Ordering::SeqCst);
                (runs, holds)
            });
            let mut paused = 0;
            for _ in 0..2 {
                p.request();
                // The vCPU may have finished its runs: then nobody comes.
                while !p.all_held(1) && !done.load(Ordering::SeqCst) {
                    loom::thread::yield_now();
                }
                if p.all_held(1) {
                    paused += 1;
                    assert!(!in_guest.load(Ordering::SeqCst), "a vCPU is in its guest while paused");
                }
                p.release();
            }
            let (runs, holds) = vcpu.join().unwrap();
            (paused, runs, holds)
        });
    }

    #[test]
    fn loom_no_vcpu_runs_while_paused() {
        pause_twice(Breakage::SEED);
    }

    #[test]
    #[cfg(feature = "break-rules")]
    #[should_panic(expected = "in its guest while paused")]
    fn loom_leaving_without_a_second_look_is_caught() {
        pause_twice(Breakage { pause_leaves_without_recheck: true, ..Breakage::SEED });
    }
}
