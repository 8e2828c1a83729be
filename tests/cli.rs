//! The `shadow-mmu` binary: the README's main command in small, and bad
//! arguments.

use std::process::Command;

use shadow_mmu_core::spte::PAGE_SIZE;

/// A directory of this test process's own for a test's files:
/// `shadow-mmu-<tag>-<pid>` under the temporary directory, created.
fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shadow-mmu-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

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
fn run_with_the_fast_path_off_several_slots_notifier_and_relogging() {
    let (code, out, err) = shadow_mmu(&[
        "run",
        "--mmu",
        "locked",
        "--no-fast-page-fault",
        "--vcpus",
        "2",
        "--guest-mib",
        "16",
        "--slots",
        "2",
        "--relog-every",
        "3",
        "--invalidate-every-us",
        "500",
        "--interval-ms",
        "5",
        "--collections",
        "9",
        "--seconds",
        "30",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "fast-page-fault=false",
        "slots=2",
        "0 write faults fixed by fast_page_fault",
        "logging re-enabled    3 times",
        "invalidations during logging",
        "pool backlog",
        "lost pages            0",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let (code, out, err) = shadow_mmu(&["run", "--mmu", "lockless", "--guest-mib", "8", "--seconds", "0.3"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("fast-page-fault=true") && out.contains("harvest read-side sections"), "{out}");
    let (code, _, err) = shadow_mmu(&["run", "--guest-mib", "1", "--slots", "3"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("3 slots"), "{err}");
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
fn bench_migrate_perf_writes_json_and_plots_for_both_designs_and_sizes() {
    let dir = scratch_dir("cli");
    let json = dir.join("mp.json");
    let plots = dir.join("plots");
    let (code, out, err) = shadow_mmu(&[
        "bench",
        "migrate-perf",
        "--backend",
        "engine",
        "--mmu",
        "locked,lockless",
        "--vcpus",
        "2",
        "--bytes-per-vcpu",
        "4M,8M",
        "--iterations",
        "2",
        "--repeat",
        "2",
        "--fault-heavy-seconds",
        "0.3",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plots.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.is_empty(), "no progress bar off a terminal: {err}");
    for line in [
        "Populate memory time",
        "Enabling dirty logging time",
        "Iteration 2 dirty memory time",
        "Iteration 2 get dirty log time",
        "Get dirty log over 2 iterations",
        "floor (one compare-exchange per page",
        "Harvest with no vCPU running",
        "vCPU write-fault latency during harvest: p50",
        "vCPU write-fault latency with no harvest: p50",
        "16 MiB, get: lockless/locked harvest time",
        "16 MiB, get: the floor bounds that ratio from below: ",
        "16 MiB, get: engine lockless: the harvests held mmu_lock 0 ns",
        "lockless/locked fault-heavy throughput",
        "== over 2 repetitions: median [min, max]",
        "16 MiB, get: engine lockless: harvest ",
        "16 MiB, get: lockless/locked harvest ",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let bound: f64 = out
        .split("16 MiB, get: the floor bounds that ratio from below: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a number after the bound's label");
    assert!(bound.is_finite() && bound > 0.0, "bound {bound} in:\n{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 8, "2 rounds x 2 sizes x 2 designs");
    let order = [("locked", 8u64), ("lockless", 8), ("locked", 16), ("lockless", 16)];
    for (i, (r, (mmu, bytes))) in runs.iter().zip(order.iter().chain(&order).copied()).enumerate() {
        assert_eq!(r["repetition"], i / 4, "round by round");
        assert_eq!(r["backend"], "engine");
        assert_eq!(r["mmu"], mmu);
        assert_eq!(r["vcpus"], 2);
        assert_eq!(r["guest_bytes"], bytes << 20);
        assert_eq!(r["lost_pages"], 0);
        for key in [
            "populate_ns",
            "enable_dirty_logging_ns",
            "dirty_memory_avg_ns",
            "get_dirty_log_avg_ns",
            "vcpu_fault_p99_ns_idle",
        ] {
            assert!(r[key].as_u64().unwrap() > 0, "{key}: {r}");
        }
        assert_eq!(r["details"]["fast_page_fault"], true, "{r}");
        for key in
            ["fast_page_faults", "pool_backlog_waits", "pool_backlog_wait_max_ns", "harvest_read_sections"]
        {
            assert!(r["details"][key].is_u64(), "{key}: {r}");
        }
        // With 2 iterations a harvest may meet no fault: the key is there.
        assert!(r["vcpu_fault_p99_ns_harvest"].is_u64(), "{r}");
        for key in ["ns_per_dirty_page", "floor_ns_per_page", "fault_heavy_faults_per_sec"] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
        }
        assert_eq!(r["iterations"].as_array().unwrap().len(), 2);
        assert_eq!(r["quiet_dirty_pages"], (bytes << 20) / PAGE_SIZE, "a full pass dirties every page");
        assert!(
            !r["progress"]["samples"].as_array().unwrap().is_empty(),
            "the guest's progress sampled: {r}"
        );
    }
    for svg in ["get-dirty-log.svg", "fault-latency.svg", "guest-progress.svg"] {
        let text = std::fs::read_to_string(plots.join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.contains("engine lockless"), "{svg}");
    }
    for bad in [&["--backend", "qemu"][..], &["--bytes-per-vcpu", "4Q"], &["--guest-mib", "1,0"]] {
        let mut args = vec!["bench", "migrate-perf"];
        args.extend_from_slice(bad);
        let (code, _, err) = shadow_mmu(&args);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert!(!err.is_empty());
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Every interface and two harvest thread counts: the product of the
/// lists, each run checked by the oracle, with KVM's lines and the JSON's
/// per-interface keys.
#[test]
fn bench_migrate_perf_runs_every_interface_and_thread_count() {
    let dir = scratch_dir("cli-if");
    let json = dir.join("mp.json");
    let (code, out, err) = shadow_mmu(&[
        "bench",
        "migrate-perf",
        "--repeat",
        "1",
        "--backend",
        "engine",
        "--dirty-log",
        "get,clear,ring",
        "--harvest-threads",
        "1,2",
        "--clear-chunk-pages",
        "512",
        "--ring-entries",
        "1024",
        "--guest-mib",
        "8",
        "--iterations",
        "2",
        "--fault-heavy-seconds",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "== backend=engine mmu=lockless dirty-log=clear x 2 threads",
        "Iteration 2 clear dirty log time",
        "Clear dirty log over 2 iterations",
        "8 MiB, ring: engine lockless: the harvests held mmu_lock 0 ns",
        "8 MiB, clear: engine lockless: the harvests held mmu_lock 0 ns",
        "8 MiB, get x 2 threads: engine lockless: harvest with no vCPU running on 2 threads against 1",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 12, "3 interfaces x 2 thread counts x 2 designs");
    for r in runs {
        assert_eq!(r["lost_pages"], 0, "{r}");
        assert!(r["mmu_lock_max_hold_ns"].is_u64(), "{r}");
        let log = r["dirty_log"].as_str().unwrap();
        assert!(r["harvest_threads"].as_u64().unwrap() >= 1);
        assert_eq!(r["clear_dirty_log_avg_ns"].is_u64(), log == "clear", "{r}");
        assert_eq!(r["ring_full_exits"].is_u64(), log == "ring", "{r}");
        if r["mmu"] == "lockless" {
            assert_eq!(r["mmu_lock_max_hold_ns"], 0, "the lockless harvest never takes mmu_lock: {r}");
        }
    }
    let bad = shadow_mmu(&["bench", "migrate-perf", "--dirty-log", "clear", "--clear-chunk-pages", "100"]);
    assert_ne!(bad.0, 0, "a chunk that is not a multiple of 64");
    std::fs::remove_dir_all(&dir).ok();
}

/// A fixed working set in guests of two sizes, the larger mapped lazily:
/// every run harvests exactly the working set, with no page lost and none
/// reported outside it.
#[test]
fn bench_migrate_perf_sweeps_a_working_set_of_any_guest_size() {
    let dir = scratch_dir("cli-ws");
    let json = dir.join("mp.json");
    let (code, out, err) = shadow_mmu(&[
        "bench",
        "migrate-perf",
        "--repeat",
        "1",
        "--backend",
        "engine,kvm",
        "--dirty-log",
        "get,clear,ring",
        "--ring-entries",
        "256",
        "--guest-mib",
        "8,512",
        "--dirty-pages",
        "512",
        "--iterations",
        "2",
        "--fault-heavy-seconds",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("--dirty-pages, runs on the engine only") || out.contains("KVM unavailable"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 12, "2 sizes x 3 interfaces x 2 designs");
    for r in runs {
        assert_eq!(r["lost_pages"], 0, "{r}");
        assert_eq!(r["quiet_dirty_pages"], 512, "the working set, at every size: {r}");
    }
    for bad in ["100", "0"] {
        let (code, out, err) = shadow_mmu(&[
            "bench",
            "migrate-perf",
            "--repeat",
            "1",
            "--backend",
            "engine",
            "--guest-mib",
            "8",
            "--dirty-pages",
            bad,
        ]);
        assert_ne!(code, 0, "--dirty-pages {bad}: {out}{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_kernbench_sweeps_and_replays_the_shipped_trace() {
    let dir = scratch_dir("kb");
    for workload in ["sweep", "replay"] {
        let json = dir.join(format!("{workload}.json"));
        let (code, out, err) = shadow_mmu(&[
            "bench",
            "kernbench",
            "--workload",
            workload,
            "--guest-mib",
            "192",
            "--seconds",
            "0.4",
            "--rounds",
            "2",
            "--json",
            json.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("lockless/locked kernbench throughput"), "{out}");
        assert!(out.contains("per round (target >= 0.98)"), "the ratio with its spread: {out}");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let runs = v["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2);
        for (r, mmu) in runs.iter().zip(["locked", "lockless"]) {
            assert_eq!(r["mmu"], mmu);
            assert_eq!(r["workload"], workload);
            assert!(r["ops_per_sec"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["rounds"][0]["invalidations"].as_u64().unwrap() > 0, "{r}");
        }
    }
    let missing = dir.join("missing.smtrace");
    let (code, _, err) =
        shadow_mmu(&["bench", "kernbench", "--workload", "replay", "--trace", missing.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("missing.smtrace"), "{err}");
    let corrupt = dir.join("corrupt.smtrace");
    std::fs::write(&corrupt, b"SMMUTRC1 this is not a trace").unwrap();
    let (code, _, err) =
        shadow_mmu(&["bench", "kernbench", "--workload", "replay", "--trace", corrupt.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("corrupt.smtrace"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_migrate_perf_without_kvm_skips_the_kvm_runs_with_one_line() {
    let dir = scratch_dir("nodev");
    let json = dir.join("mp.json");
    let out = Command::new(env!("CARGO_BIN_EXE_shadow-mmu"))
        .env("SHADOW_MMU_KVM_DEVICE", "/dev/null")
        .args([
            "bench",
            "migrate-perf",
            "--repeat",
            "1",
            "--guest-mib",
            "8",
            "--iterations",
            "1",
            "--fault-heavy-seconds",
            "0",
        ])
        .args(["--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let skip: Vec<&str> = stdout.lines().filter(|l| l.contains("kvm")).collect();
    assert_eq!(skip.len(), 1, "{stdout}");
    assert!(skip[0].starts_with("kvm: unavailable: ") && skip[0].ends_with("KVM runs skipped"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let backends: Vec<&str> =
        v["runs"].as_array().unwrap().iter().map(|r| r["backend"].as_str().unwrap()).collect();
    assert_eq!(backends, ["engine", "engine"]);
    std::fs::remove_dir_all(&dir).ok();
}

/// `dirty-log-test` in KVM's selftest's words, on the engine (both designs)
/// and, where /dev/kvm is usable, on KVM.
#[test]
fn dirty_log_test_prints_the_selftests_lines_on_every_backend() {
    let (code, out, err) = shadow_mmu(&[
        "dirty-log-test",
        "-M",
        "all",
        "-i",
        "3",
        "-I",
        "2",
        "-c",
        "65536",
        "--guest-pages",
        "4099",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "== dirty-log-test: backend=engine mmu=locked mode=dirty-log",
        "== dirty-log-test: backend=engine mmu=lockless mode=clear-log",
        "== dirty-log-test: backend=engine mmu=lockless mode=dirty-ring",
        "Iteration  3: dirty: ",
        "Total bits checked: dirty (",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(!out.contains("FAILED"), "{out}");
    assert!(out.contains("backend=kvm mode=dirty-log") || out.contains("(KVM: skipped"), "{out}");
    let (code, _, err) = shadow_mmu(&["dirty-log-test", "--guest-pages", "0"]);
    assert_ne!(code, 0, "{err}");
}

#[test]
fn bench_migrate_perf_sweeps_vcpu_counts() {
    let dir = scratch_dir("cli-vcpus");
    let json = dir.join("sweep.json");
    let (code, out, err) = shadow_mmu(&[
        "bench",
        "migrate-perf",
        "--backend",
        "engine",
        "--mmu",
        "lockless",
        "--vcpus",
        "1,2",
        "--guest-mib",
        "16",
        "--iterations",
        "2",
        "--repeat",
        "1",
        "--fault-heavy-seconds",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("==== 1 vCPU(s)") && out.contains("==== 2 vCPU(s)"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let vcpus: Vec<u64> =
        v["runs"].as_array().unwrap().iter().map(|r| r["vcpus"].as_u64().unwrap()).collect();
    assert_eq!(vcpus, [1, 2]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_migrate_repeats_interleaved_and_reports_the_guest_stall() {
    let dir = scratch_dir("cli-bm");
    let json = dir.join("bm.json");
    let (code, out, err) = shadow_mmu(&[
        "bench",
        "migrate",
        "--backend",
        "engine,kvm",
        "--mmu",
        "locked,lockless",
        "--guest-mib",
        "8",
        "--dirty-rate-mibps",
        "64",
        "--fresh-faults",
        "20000",
        "--repeat",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("(KVM: skipped: the lock faults run on the engine only)"), "{out}");
    assert!(out.contains("== over 2 repetitions: median [min, max]"), "{out}");
    assert!(out.contains("engine lockless, get, 8 MiB, 64 MiB/s: total "), "{out}");
    assert!(out.contains("guest stall: "), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    let order: Vec<(u64, String)> =
        runs.iter().map(|r| (r["repetition"].as_u64().unwrap(), r["mmu"].as_str().unwrap().into())).collect();
    let want = [(0, "locked"), (0, "lockless"), (1, "locked"), (1, "lockless")];
    assert_eq!(order, want.map(|(r, m)| (r, m.to_string())), "the rounds interleave the designs");
    assert!(runs.iter().all(|r| r["source"]["guest_stall_ms"].is_number()), "{v}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `bench pace`: a line per rate on each backend (KVM's skipped with one
/// line where it cannot run), and the JSON.
#[test]
fn bench_pace_reports_the_rate_reached_beside_the_one_asked() {
    let dir = scratch_dir("cli-pace");
    let json = dir.join("pace.json");
    let (code, out, err) = shadow_mmu(&[
        "bench",
        "pace",
        "--guest-mib",
        "64",
        "--vcpus",
        "1",
        "--dirty-rate-mibps",
        "64",
        "--settle-ms",
        "100",
        "--measure-ms",
        "100",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("engine      1     flat out"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("engine ") && l.contains(" 64 ")), "{out}");
    assert!(out.contains("kvm ") || out.contains("(KVM: skipped"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["runs"].as_array().unwrap().iter().any(|r| r["asked_mibps"] == 64), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}
