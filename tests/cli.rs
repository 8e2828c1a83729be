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

#[test]
fn bench_migrate_perf_writes_json_for_both_designs() {
    let dir = std::env::temp_dir().join(format!("shadow-mmu-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("mp.json");
    let (code, out, err) = shadow_mmu(&[
        "bench",
        "migrate-perf",
        "--backend",
        "engine",
        "--mmu",
        "locked,lockless",
        "--vcpus",
        "1",
        "--guest-mib",
        "16",
        "--iterations",
        "2",
        "--fault-heavy-seconds",
        "0.3",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "Populate memory time",
        "Enabling dirty logging time",
        "Get dirty log over 2 iterations",
        "lockless/locked",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (r, mmu) in runs.iter().zip(["locked", "lockless"]) {
        assert_eq!(r["backend"], "engine");
        assert_eq!(r["mmu"], mmu);
        assert_eq!(r["lost_pages"], 0);
        assert!(r["get_dirty_log_avg_ns"].as_u64().unwrap() > 0);
        assert_eq!(r["iterations"].as_array().unwrap().len(), 2);
        assert!(r["fault_heavy_faults_per_sec"].as_f64().unwrap() > 0.0);
    }
    let (code, _, err) = shadow_mmu(&["bench", "migrate-perf", "--backend", "qemu"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown backend"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
