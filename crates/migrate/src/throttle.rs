//! QEMU's auto-converge throttle: a thread that, every 10 ms timeslice the
//! vCPUs run, pauses them for `pct / (100 - pct)` of a timeslice, through
//! the VM's [`VcpuGate`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use shadow_mmu_vmm::VcpuGate;

/// QEMU's auto-converge throttle (module docs).
#[derive(Debug)]
pub struct Throttle {
    pct: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// QEMU's `CPU_THROTTLE_TIMESLICE_NS`: the vCPUs run this long between
/// throttle pauses.
pub const THROTTLE_TIMESLICE: Duration = Duration::from_millis(10);
/// QEMU's `cpu-throttle-initial` default, percent.
pub const THROTTLE_INITIAL: u32 = 20;
/// QEMU's `cpu-throttle-increment` default, percent.
pub const THROTTLE_INCREMENT: u32 = 10;
/// QEMU's `CPU_THROTTLE_PCT_MAX`.
pub const THROTTLE_MAX: u32 = 99;

impl Throttle {
    /// A throttle of `gate`'s vCPUs, at 0% until raised.
    pub fn start(gate: Arc<VcpuGate>) -> Self {
        let pct = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (pct, stop) = (pct.clone(), stop.clone());
            std::thread::spawn(move || {
                // Relaxed, both: a setting and a stop flag read eventually;
                // `stop` below joins us, ordering all else.
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(THROTTLE_TIMESLICE);
                    let p = pct.load(Ordering::Relaxed);
                    if p > 0 {
                        gate.request_pause();
                        std::thread::sleep(THROTTLE_TIMESLICE * p / (100 - p));
                        gate.resume();
                    }
                }
            })
        };
        Self { pct, stop, thread: Some(thread) }
    }

    /// The throttle now, percent.
    pub fn pct(&self) -> u32 {
        // Relaxed: we are its only writer.
        self.pct.load(Ordering::Relaxed)
    }

    /// A round did not converge: QEMU's step (20%, then 10% more each
    /// time, at most 99%). Returns the new percentage.
    pub fn raise(&self) -> u32 {
        let p = match self.pct() {
            0 => THROTTLE_INITIAL,
            p => (p + THROTTLE_INCREMENT).min(THROTTLE_MAX),
        };
        // Relaxed: see the thread.
        self.pct.store(p, Ordering::Relaxed);
        p
    }

    /// Stops the thread; the vCPUs are not left paused by it. Idempotent.
    pub fn stop(&mut self) {
        // Relaxed: see the thread.
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_steps_as_qemu_does() {
        let mut t = Throttle::start(Arc::new(VcpuGate::new(1, Box::new(|| {}))));
        let steps: Vec<u32> = (0..10).map(|_| t.raise()).collect();
        assert_eq!(steps, [20, 30, 40, 50, 60, 70, 80, 90, 99, 99]);
        t.stop();
    }
}
