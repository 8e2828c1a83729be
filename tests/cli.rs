//! The `shadow-mmu` binary: the README's main command in small, and bad
//! arguments.

use std::process::Command;

fn shadow_mmu(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shadow-mmu")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_reports_faults_dirty_pages_lock_time_and_no_lost_page() {
    let (code, out, err) = shadow_mmu(&[
        "run",
        "--mmu",
        "locked",
        "--vcpus",
        "2",
        "--guest-mib",
        "16",
        "--seconds",
        "0.5",
        "--workload",
        "seq",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    for line in ["pages faulted", "pages dirtied", "pages harvested", "mmu_lock", "lost pages            0"] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(out.trim_end().ends_with("OK"));
}

#[test]
fn bad_arguments_are_refused_with_a_clear_message() {
    let (code, _, err) = shadow_mmu(&["run", "--mmu", "nonsense"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown MMU design"), "{err}");
    let (code, _, err) = shadow_mmu(&["run", "--write-pct", "101"]);
    assert_eq!(code, 2);
    assert!(err.contains("101"), "{err}");
    let (code, _, err) = shadow_mmu(&["run", "--vcpus", "8", "--guest-mib", "1", "--max-mmu-pages", "10"]);
    assert_eq!(code, 2);
    assert!(err.contains("below the minimum"), "{err}");
    let (code, _, err) = shadow_mmu(&["stress", "--run-seed", "0xzz"]);
    assert_eq!(code, 2);
    assert!(err.contains("0x-hex"), "{err}");
}

#[test]
fn stress_replays_one_run_by_seed() {
    let (code, out, err) = shadow_mmu(&["stress", "--run-seed", "0x1234", "--max-run-seconds", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("run-seed=0x0000000000001234"), "{out}");
}
