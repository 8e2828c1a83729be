//! The probe: one line, and on a PVM host the emulator is what runs plain
//! guests.

use shadow_mmu_kvm::{Execution, Flavour, usable_or_skip};

#[test]
fn probe_prints_one_line_and_finds_how_guests_run() {
    let p = shadow_mmu_kvm::probed();
    let line = p.to_string();
    println!("{line}");
    assert!(line.starts_with("kvm: ") && !line.contains('\n'), "{line:?}");
    if !usable_or_skip() {
        assert!(line.ends_with("KVM runs skipped"), "{line}");
        return;
    }
    assert_ne!(p.execution, Execution::Unknown, "a usable KVM ran the probe guest");
    if p.flavour == Flavour::Pvm {
        // What the BRIEF says of PVM hosts, checked: plain guests are
        // executed by KVM's instruction emulator, so vCPU timings say
        // nothing about hardware shadow paging.
        assert_eq!(p.execution, Execution::Emulated);
        assert!(!p.vcpu_timings_comparable);
        assert!(line.contains("instruction emulator"), "{line}");
    }
    if p.execution == Execution::Emulated {
        assert!(!p.vcpu_timings_comparable);
    }
}
