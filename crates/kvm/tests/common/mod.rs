//! Shared by the KVM tests: skip cleanly where `/dev/kvm` cannot be used.

use std::sync::OnceLock;

use shadow_mmu_kvm::{Probe, probe};

/// The probe, run once per test binary.
pub fn kvm() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(probe)
}

/// True when the KVM tests can run; otherwise prints one line saying why
/// (the test then returns and passes).
pub fn kvm_usable() -> bool {
    match &kvm().usable {
        Ok(()) => true,
        Err(why) => {
            println!("skipped: {why}");
            false
        }
    }
}

/// A deterministic generator for test inputs (splitmix64).
#[allow(dead_code)] // not every test binary draws numbers
pub struct SplitMix(pub u64);

#[allow(dead_code)]
impl SplitMix {
    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}
