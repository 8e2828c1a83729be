//! How fast a pass guest dirties memory while it migrates, and on either
//! side of a migration: a [`Pacer`] releases the vCPUs' passes
//! ([`PassWorkload::release`]) so that they dirty at most `rate` bytes a
//! second on average (a pass stores to each swept page, `write_pct`% of
//! them). With no rate they run flat out (every pass released at once), with
//! a rate of 0 they stay idle. It is ticked by whoever drives the VM (a
//! migration's hooks between frames, the CLI before and after), so it needs
//! no thread of its own and no `Sync` VM.

use std::time::Instant;

use shadow_mmu_core::spte::PAGE_SIZE;
use shadow_mmu_vmm::PassWorkload;

/// Releases passes at a rate (module docs).
#[derive(Debug)]
pub struct Pacer {
    rate: Option<u64>,
    pass_bytes: f64,
    start: Instant,
    base: u64,
    released: u64,
}

impl Pacer {
    /// Paces `vm`'s vCPUs at `rate` bytes dirtied a second (`None`: flat
    /// out; 0: idle) from now, counting from the passes they have done.
    /// `write_pct` is the share of accesses that store.
    pub fn new(vm: &dyn PassWorkload, rate: Option<u64>, write_pct: u8) -> Self {
        let pass_bytes =
            (vm.swept_pages() as f64 * PAGE_SIZE as f64 * f64::from(write_pct) / 100.0).max(PAGE_SIZE as f64);
        let base = vm.passes_done();
        let mut p = Self { rate, pass_bytes, start: Instant::now(), base, released: base };
        p.tick(vm);
        p
    }

    /// Releases what the rate allows by now.
    pub fn tick(&mut self, vm: &dyn PassWorkload) {
        let target = match self.rate {
            None => u64::MAX,
            Some(0) => self.base,
            Some(r) => {
                self.base + 1 + (self.start.elapsed().as_secs_f64() * r as f64 / self.pass_bytes) as u64
            }
        };
        if target > self.released {
            self.released = target;
            vm.release(target);
        }
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
