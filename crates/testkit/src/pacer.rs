//! How fast a pass guest dirties memory while it migrates, and on either
//! side of a migration. With a rate, the vCPUs keep it inside their passes
//! ([`PassWorkload::set_dirty_rate`]: each vCPU holds after each chunk of 64
//! pages until the chunk took its share of time), and every pass is
//! released: a steady rate, not a pass at full speed and then nothing.
//! With no rate they run flat out (every pass released at once), with a
//! rate of 0 they stay idle. The bytes they stored are counted, so that
//! [`Pacer::reached`] says what rate they really kept.

use std::sync::Arc;

use shadow_mmu_vmm::{BackendError, DirtyPace, PassWorkload, ReachedRate};

/// Sets a guest's pace (module docs).
#[derive(Debug)]
pub struct Pacer {
    rate: Option<u64>,
    base: u64,
    released: u64,
    pace: Arc<DirtyPace>,
    reached: ReachedRate,
}

impl Pacer {
    /// Paces `vm`'s vCPUs at `rate` bytes dirtied a second (`None`: flat
    /// out; 0: idle) from now, counting from the passes they have done.
    pub fn new(vm: &dyn PassWorkload, rate: Option<u64>) -> Result<Self, BackendError> {
        vm.set_dirty_rate(rate.filter(|&r| r > 0))?;
        let base = vm.passes_done();
        let pace = vm.dirty_pace();
        let reached = ReachedRate::start(&pace);
        let mut p = Self { rate, base, released: base, pace, reached };
        p.tick(vm);
        Ok(p)
    }

    /// Releases what the pace allows: every pass, unless idle.
    pub fn tick(&mut self, vm: &dyn PassWorkload) {
        let target = match self.rate {
            Some(0) => self.base,
            _ => u64::MAX,
        };
        if target > self.released {
            self.released = target;
            vm.release(target);
        }
    }

    /// Bytes a second the guest stored since the pacer began.
    pub fn reached(&self) -> f64 {
        self.reached.bytes_per_s(&self.pace)
    }

    /// Lets the vCPUs go on at least `extra` passes beyond those they have
    /// done, whatever the rate (the destination's proof that the guest goes
    /// on, even when it migrated idle).
    pub fn at_least(&mut self, vm: &dyn PassWorkload, extra: u64) {
        let target = vm.passes_done() + extra;
        if target > self.released {
            self.released = target;
            vm.release(target);
        }
    }
}

/// The dirty rate a guest was asked for and the one it kept, MiB/s.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct GuestRate {
    /// Asked for (`None`: flat out).
    pub asked_mibps: Option<f64>,
    /// Stored, over the time measured.
    pub reached_mibps: f64,
}

impl GuestRate {
    /// From a pace of `asked` bytes a second and `reached` bytes a second.
    pub fn of(asked: Option<u64>, reached: f64) -> Self {
        const MIB: f64 = (1u64 << 20) as f64;
        Self { asked_mibps: asked.map(|r| r as f64 / MIB), reached_mibps: reached / MIB }
    }

    /// `guest dirty rate: asked 600 MiB/s, reached 598.2 MiB/s`.
    pub fn line(&self) -> String {
        let asked = self.asked_mibps.map_or_else(|| "flat out".into(), |r| format!("{r:.0} MiB/s"));
        format!("guest dirty rate: asked {asked}, reached {:.1} MiB/s", self.reached_mibps)
    }
}
