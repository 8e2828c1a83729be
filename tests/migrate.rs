//! Live migration with two real processes over loopback: `shadow-mmu
//! migrate incoming` as a child process, and the source either as another
//! (`migrate outgoing`) or in this test process through the library (so
//! that the test can look at the source VM after a failure and migrate it
//! again). Each fault of the stream ends in a typed error, the source runs
//! on, and nothing is lost.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shadow_mmu_engine::EngineBackend;
use shadow_mmu_migrate::refusal::Refusal;
use shadow_mmu_migrate::source::{MigrationError, MigrationFailure, Outcome, OutgoingParams};
use shadow_mmu_migrate::stream::{Frame, Header, PAGE_BYTES, SlotLayout, VERSION, read_frame, write_frame};
use shadow_mmu_vmm::{Backend, PassSpec, PassVm};

const MIB: u64 = 1 << 20;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shadow-mmu"))
}

/// A destination process, and the address it listens on.
struct Dest {
    child: Child,
    addr: String,
    json: std::path::PathBuf,
}

impl Dest {
    fn spawn(run_after_ms: u64, tag: &str) -> Self {
        Self::spawn_with(run_after_ms, tag, &[])
    }

    fn spawn_with(run_after_ms: u64, tag: &str, extra: &[&str]) -> Self {
        let json = std::env::temp_dir().join(format!("shadow-mmu-dest-{}-{tag}.json", std::process::id()));
        let _ = std::fs::remove_file(&json);
        let mut child = bin()
            .args(["migrate", "incoming", "--listen", "127.0.0.1:0", "--run-after-ms"])
            .arg(run_after_ms.to_string())
            .arg("--json")
            .arg(&json)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let addr =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")).to_string();
        Self { child, addr, json }
    }

    /// Waits for it, then reads its statistics: exit code, stdout+stderr,
    /// the JSON.
    fn finish(self) -> (i32, String, serde_json::Value) {
        let json = self.json.clone();
        let (code, out, err) = self.wait();
        let v = std::fs::read_to_string(&json)
            .map_or(serde_json::Value::Null, |s| serde_json::from_str(&s).unwrap());
        (code, out + &err, v)
    }

    /// Waits for it: exit code, stdout, stderr.
    fn wait(self) -> (i32, String, String) {
        let out = self.child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn spec(guest_bytes: u64) -> PassSpec {
    PassSpec::sweep(1, guest_bytes, 3)
}

/// The header the CLI writes for an engine VM of `spec` (its VM
/// description: the CLI's JSON contract with its own destination).
fn header(spec: &PassSpec, pages: u64) -> Header {
    let desc = serde_json::json!({
        "backend": "engine", "mmu": "lockless", "fast_page_fault": true, "dirty_log": "get",
        "initially_set": false, "ring_entries": 1 << 12, "harvest_threads": 1,
        "clear_chunk_pages": 262144, "vcpus": spec.vcpus, "guest_bytes": spec.guest_bytes,
        "random": false, "write_pct": 100, "seed": spec.seed, "dirty_rate": 16 * MIB,
    });
    Header::new("engine".into(), desc.to_string(), vec![SlotLayout { id: 0, guest_phys_addr: 0, pages }])
}

/// The failure of a migration that must have failed before its commit.
fn runs_on(o: Outcome) -> MigrationFailure {
    match o {
        Outcome::RunsOn(f) => f,
        other => panic!("{other:?}"),
    }
}

/// A source VM in this process, booted (one pass: every page data).
fn source(spec: &PassSpec) -> Box<dyn PassVm> {
    let backend = EngineBackend::default();
    let vm = backend.start_passes(spec).unwrap();
    vm.release(1);
    vm.wait_passes(0).unwrap();
    vm
}

/// The source VM runs on with dirty logging off, and migrates again.
fn runs_on_and_migrates_again(vm: &mut Box<dyn PassVm>, spec: &PassSpec) {
    let before = vm.passes_done();
    vm.release(before + 2);
    vm.wait_passes(before + 1).unwrap();
    let mut bm = vec![0u64; vm.pages().div_ceil(64) as usize];
    assert!(vm.get_dirty_log(&mut bm).is_err(), "dirty logging is off after a failed migration");
    let dest = Dest::spawn(100, "again");
    let conn = TcpStream::connect(&dest.addr).unwrap();
    let h = header(spec, vm.pages());
    let stats = match common::migrate(vm, &conn, &h, &OutgoingParams::default(), None) {
        Outcome::Completed(s) => s,
        other => panic!("{other:?}"),
    };
    vm.stop().unwrap();
    assert!(stats.converged);
    let (code, out, s) = dest.finish();
    assert_eq!(code, 0, "{out}");
    assert_eq!(s["mismatched_pages"], 0);
    assert_eq!(s["lost_pages"], 0);
    assert_eq!(s["check_after_resume"], "passed");
}

#[test]
fn two_processes_migrate_and_report_in_qemu_terms() {
    let dest = Dest::spawn(200, "cli");
    let dir = std::env::temp_dir().join(format!("shadow-mmu-migrate-{}", std::process::id()));
    let json = dir.join("out.json");
    let out = bin()
        .args(["migrate", "outgoing", "--to", &dest.addr, "--guest-mib", "32", "--dirty-rate-mibps", "64"])
        .args(["--dirty-log", "clear", "--harvest-threads", "2", "--warmup-ms", "50"])
        // Faults that need mmu_lock while logging is on, at both ends (the
        // destination watches its guest with a dirty log after the resume).
        .args(["--fresh-faults", "20000", "--invalidations", "5000", "--json"])
        .arg(&json)
        .arg("--plot")
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for l in [
        "Migration status: completed",
        "downtime:",
        "dirty sync count:",
        "throughput:",
        "round   0:",
        "guest stall: ",
    ] {
        assert!(text.contains(l), "missing {l:?}:\n{text}");
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let s = &v["source"];
    for key in [
        "total_time_ms",
        "downtime_ms",
        "setup_time_ms",
        "expected_downtime_ms",
        "transferred_bytes",
        "total_bytes",
        "remaining_bytes",
        "dirty_sync_count",
        "dirty_pages_rate",
        "mbps",
        "normal_pages",
        "duplicate_pages",
        "cpu_throttle_percentage",
        "guest_stall_ms",
    ] {
        assert!(s[key].is_number(), "{key} in {s}");
    }
    // The rounds' stalls add up to the total (the stop-and-copy's is
    // downtime, not stall), each broken down by cause.
    let rounds = s["rounds"].as_array().unwrap();
    let sum: f64 = rounds.iter().filter_map(|r| r["guest_stall_ms"].as_f64()).sum();
    assert!((sum - s["guest_stall_ms"].as_f64().unwrap()).abs() < 1e-6, "{sum} against {s}");
    assert!(rounds.last().unwrap()["guest_stall_ms"].is_null());
    let causes = &s["guest_stall"];
    for k in ["harvest_lock_wait_ms", "tlb_flush_ms", "throttle_ms", "ring_full_ms", "other_lock_wait_ms"] {
        assert!(causes[k].is_number(), "{k} in {causes}");
    }
    assert_eq!(s["status"], "completed");
    assert_eq!(s["total_bytes"], 32 * MIB);
    assert!(s["rounds"].as_array().unwrap().len() >= 2);
    assert!(dir.join("migration-rounds.svg").exists());
    let (code, out, d) = dest.finish();
    assert_eq!(code, 0, "{out}");
    assert_eq!(d["status"], "completed");
    assert_eq!(d["mismatched_pages"], 0);
    assert_eq!(d["lost_pages"], 0);
    assert!(d["pages_written_after_resume"].as_u64().unwrap() > 0, "the guest went on: {d}");
    assert_eq!(d["check_after_resume"], "passed");
}

#[test]
fn kvm_migrates_between_two_processes() {
    if !shadow_mmu_kvm::usable_or_skip() {
        return;
    }
    // Paced (the pause mostly finds the vCPU between passes) and flat out
    // (always mid-pass: the registers and the MMX register that holds the
    // value it stores must move, or it goes on storing 0).
    for (log, rate, mib) in [("get", Some("32"), "16"), ("ring", Some("32"), "16"), ("get", None, "64")] {
        let dest = Dest::spawn(300, &format!("kvm-{log}"));
        let mut cmd = bin();
        cmd.args(["migrate", "outgoing", "--to", &dest.addr, "--backend", "kvm", "--dirty-log", log]).args([
            "--guest-mib",
            mib,
            "--warmup-ms",
            "50",
        ]);
        if let Some(r) = rate {
            cmd.args(["--dirty-rate-mibps", r]);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}: {text}");
        assert!(
            text.contains("guest stall: ") && !text.contains("guest stall: not measured"),
            "{log}: {text}"
        );
        let (code, out, d) = dest.finish();
        assert_eq!(code, 0, "{log}: {out}");
        assert_eq!(d["mismatched_pages"], 0, "{log}");
        assert_eq!(d["lost_pages"], 0, "{log}");
        assert_eq!(d["regressed_pages"], 0, "{log}: the guest's pass numbers go on above the source's");
        assert!(d["pages_written_after_resume"].as_u64().unwrap() > 0, "{log}: {d}");
        assert_eq!(d["check_after_resume"], "passed", "{log}: {d}");
    }
}

#[test]
fn a_destination_killed_mid_stream_leaves_the_source_running() {
    let spec = spec(32 * MIB);
    let mut vm = source(&spec);
    let mut dest = Dest::spawn(0, "killed");
    let conn = TcpStream::connect(&dest.addr).unwrap();
    let h = header(&spec, vm.pages());
    // 16 MiB/s: round 0 takes two seconds; the kill comes in the first.
    let params = OutgoingParams { max_bandwidth: Some(16 * MIB), ..OutgoingParams::default() };
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        dest.child.kill().unwrap();
        dest.wait()
    });
    let t = Instant::now();
    let e = runs_on(common::migrate(&mut vm, &conn, &h, &params, None));
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(matches!(e.error, MigrationError::Stream(_)), "{e:?}");
    let msg = shadow_mmu_vmm::error_chain(&e);
    assert!(msg.contains("migration failed"), "{msg}");
    killer.join().unwrap();
    runs_on_and_migrates_again(&mut vm, &spec);
}

#[test]
fn a_memslot_layout_the_destination_refuses() {
    let spec = spec(8 * MIB);
    let mut vm = source(&spec);
    let dest = Dest::spawn(0, "layout");
    let conn = TcpStream::connect(&dest.addr).unwrap();
    let mut h = header(&spec, vm.pages());
    h.slots[0].guest_phys_addr = 0x10_0000;
    let e = runs_on(common::migrate(&mut vm, &conn, &h, &OutgoingParams::default(), None));
    match &e.error {
        MigrationError::Refused(Refusal::Layout { theirs, page_size, ours }) => {
            assert_eq!((theirs, *page_size), (&h.slots, PAGE_BYTES), "the header's layout, as it came");
            assert_eq!(ours[0].guest_phys_addr, 0, "{ours:?}");
        }
        other => panic!("{other:?}"),
    }
    let (code, _, err) = dest.wait();
    assert_ne!(code, 0);
    assert!(err.contains("refused the migration: memslot layout"), "{err}");
    // A guest larger than the destination takes.
    let dest = Dest::spawn_with(0, "too-big", &["--max-guest-mib", "4"]);
    let conn = TcpStream::connect(&dest.addr).unwrap();
    let h = header(&spec, vm.pages());
    let e = runs_on(common::migrate(&mut vm, &conn, &h, &OutgoingParams::default(), None));
    match &e.error {
        MigrationError::Refused(Refusal::Build { cause }) => {
            assert!(cause.contains("at most 4 MiB"), "{cause}")
        }
        other => panic!("{other:?}"),
    }
    assert_ne!(dest.wait().0, 0);
    runs_on_and_migrates_again(&mut vm, &spec);
}

/// Sends `frames` after a header of an 8 MiB engine VM (waiting for its
/// `Ready`), then closes; returns the destination's exit and stderr.
fn raw_stream(tag: &str, header: Header, frames: &[u8]) -> (i32, String) {
    let dest = Dest::spawn(0, tag);
    let mut c = TcpStream::connect(&dest.addr).unwrap();
    write_frame(&mut c, &Frame::Header(header)).unwrap();
    while let Ok(f) = read_frame(&mut c, PAGE_BYTES) {
        match f {
            Frame::Heartbeat { .. } => continue,
            Frame::Ready | Frame::Refuse { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    let _ = c.write_all(frames);
    drop(c);
    let (code, _, err) = dest.wait();
    (code, err)
}

#[test]
fn a_corrupt_frame_a_wrong_version_and_a_source_that_closes() {
    let spec = spec(8 * MIB);
    let good = header(&spec, 2048);
    // A frame whose checksum is wrong.
    let mut b = Vec::new();
    write_frame(&mut b, &Frame::Round { round: 0 }).unwrap();
    b[4] ^= 1;
    let (code, err) = raw_stream("crc", good.clone(), &b);
    assert_ne!(code, 0);
    assert!(err.contains("frame checksum mismatch") && err.contains("partial VM is discarded"), "{err}");
    // Another version.
    let mut v2 = good.clone();
    v2.version = VERSION + 1;
    let dest = Dest::spawn(0, "version");
    let mut c = TcpStream::connect(&dest.addr).unwrap();
    write_frame(&mut c, &Frame::Header(v2)).unwrap();
    drop(c);
    let (code, _, err) = dest.wait();
    assert_ne!(code, 0);
    assert!(err.contains(&format!("migration stream version {}", VERSION + 1)), "{err}");
    // A source that goes away after half a round.
    let mut b = Vec::new();
    write_frame(&mut b, &Frame::Round { round: 0 }).unwrap();
    let ranges = vec![shadow_mmu_migrate::ranges::PageRange { first: 0, pages: 1, zero: false }];
    write_frame(&mut b, &Frame::Pages { slot: 0, ranges, data: vec![7; PAGE_BYTES as usize] }).unwrap();
    b.truncate(b.len() - 100);
    let (code, err) = raw_stream("closed", good.clone(), &b);
    assert_ne!(code, 0);
    assert!(err.contains("ended inside a frame") && err.contains("partial VM is discarded"), "{err}");
    // Digests of pages past the slot's end, refused as such.
    let mut b = Vec::new();
    write_frame(&mut b, &Frame::Digest { slot: 0, first: 2047, digests: vec![1, 2] }).unwrap();
    let (code, err) = raw_stream("digests", good, &b);
    assert_ne!(code, 0);
    assert!(err.contains("digests of slot 0 pages 2047..+2: outside its 2048 pages"), "{err}");
}

#[test]
fn a_source_killed_mid_stream_and_a_cancelled_timeout() {
    // The source process dies in round 0 (16 MiB/s of 32 MiB).
    let dest = Dest::spawn(0, "src-killed");
    let mut src = bin()
        .args(["migrate", "outgoing", "--to", &dest.addr, "--guest-mib", "32", "--max-bandwidth-mibps", "16"])
        .args(["--warmup-ms", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    src.kill().unwrap();
    src.wait().unwrap();
    let (code, _, err) = dest.wait();
    assert_ne!(code, 0);
    assert!(err.contains("partial VM is discarded"), "{err}");

    // Pre-copy that cannot converge (no downtime allowed, flat out), with a
    // timeout of 1 s and cancel: cancelled, the source runs on.
    let dest = Dest::spawn(0, "timeout");
    let out = bin()
        .args(["migrate", "outgoing", "--to", &dest.addr, "--guest-mib", "16", "--downtime-limit-ms", "0"])
        .args(["--timeout-s", "1", "--on-timeout", "cancel", "--warmup-ms", "0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("Migration status: cancelled"), "{text}");
    assert!(text.contains("did not converge within the 1s timeout"), "{text}");
    assert!(text.contains("the source VM runs on") && text.contains("dirty logging off"), "{text}");
    let (code, _, err) = dest.wait();
    assert_ne!(code, 0);
    assert!(err.contains("partial VM is discarded"), "{err}");
}

/// A source whose extra page streams are hostile or missing: the
/// destination refuses with a reason, never waits forever, never runs the
/// guest.
#[test]
fn extra_streams_that_never_come_come_wrong_or_come_corrupt() {
    let spec = spec(8 * MIB);
    let mut good = header(&spec, 2048);
    good.id = 77;
    good.progress_timeout_ms = 500;
    // Announces a stream count, attaches `attach`, sends `extra` on the last
    // attached stream; returns the destination's exit and stderr.
    let run = |tag: &str, streams: u32, attach: &[u32], extra: &[u8]| {
        let dest = Dest::spawn(0, tag);
        let mut c = TcpStream::connect(&dest.addr).unwrap();
        write_frame(&mut c, &Frame::Header(Header { streams, ..good.clone() })).unwrap();
        let mut ready = false;
        while let Ok(f) = read_frame(&mut c, PAGE_BYTES) {
            match f {
                Frame::Heartbeat { .. } => continue,
                Frame::Ready => {
                    ready = true;
                    break;
                }
                _ => break,
            }
        }
        let mut extras = Vec::new();
        if ready {
            for &stream in attach {
                let mut s = TcpStream::connect(&dest.addr).unwrap();
                write_frame(&mut s, &Frame::Attach { id: 77, stream }).unwrap();
                extras.push(s);
            }
            if let Some(s) = extras.last_mut() {
                let _ = s.write_all(extra);
            }
        }
        let (code, _, err) = dest.wait();
        (code, err)
    };
    let (code, err) = run("too-many", 65, &[], &[]);
    assert!(code != 0 && err.contains("65 page streams: this destination takes 1 to 64"), "{err}");
    let (code, err) = run("missing", 3, &[1], &[]);
    assert!(code != 0 && err.contains("1 of 2 extra page streams attached"), "{err}");
    let (code, err) = run("wrong-index", 2, &[5], &[]);
    assert!(code != 0 && err.contains("extra page streams [5] attached: 1 to 1 expected"), "{err}");
    let mut b = Vec::new();
    write_frame(&mut b, &Frame::Round { round: 0 }).unwrap();
    b[4] ^= 1;
    let (code, err) = run("corrupt", 2, &[1], &b);
    assert!(
        code != 0 && err.contains("frame checksum mismatch") && err.contains("partial VM is discarded"),
        "{err}"
    );
}

/// Forwards connections to `upstream`, the source's bytes held to `rate`
/// bytes a second (all connections together): a slow link. Returns its
/// address.
fn throttled_link(upstream: &str, rate: u64) -> String {
    use std::io::Read;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let upstream = upstream.to_string();
    let sent = std::sync::Arc::new(std::sync::Mutex::new((Instant::now(), 0u64)));
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(client) = client else { return };
            let Ok(up) = TcpStream::connect(&upstream) else { return };
            let (mut c2, mut u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut u2, &mut c2));
            let (mut from, mut to, sent) = (client, up, sent.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match from.read(&mut buf) {
                        Ok(0) | Err(_) => return to.shutdown(std::net::Shutdown::Write),
                        Ok(n) => n,
                    };
                    // Due when the link's bytes so far fit its rate.
                    let due = {
                        let mut s = sent.lock().unwrap();
                        s.1 += n as u64;
                        s.0 + Duration::from_secs_f64(s.1 as f64 / rate as f64)
                    };
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    if to.write_all(&buf[..n]).is_err() {
                        return Ok(());
                    }
                }
            });
        }
    });
    addr
}

/// Runs a source to `to` (a guest of `mib` MiB at 8 MiB/s, over `streams`
/// page streams, with `extra` arguments) and asserts it completed; returns
/// its output.
fn source_completes(to: &str, mib: &str, streams: &str, extra: &[&str], what: &str) -> String {
    let out = bin()
        .args(["migrate", "outgoing", "--to", to, "--guest-mib", mib, "--dirty-rate-mibps", "8"])
        .args(["--warmup-ms", "50", "--connections", streams])
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("Migration status: completed"), "{what}: {text}");
    text
}

/// The destination's exit and its checks passed.
fn dest_correct(dest: Dest, what: &str) {
    let (code, out, d) = dest.finish();
    assert_eq!(code, 0, "{what}: {out}");
    assert_eq!(d["mismatched_pages"], 0, "{what}: {d}");
    assert_eq!(d["check_after_resume"], "passed", "{what}: {d}");
}

/// A link held to 50 MiB/s: the bandwidth the rules measure is the link's,
/// and the migration completes, page for page, on one stream and on four.
#[test]
fn a_link_held_to_50_mib_a_second_completes_correct() {
    for streams in ["1", "4"] {
        let dest = Dest::spawn(200, &format!("slow-{streams}"));
        let link = throttled_link(&dest.addr, 50 * MIB);
        let what = format!("50 MiB/s, {streams} streams");
        source_completes(&link, "16", streams, &[], &what);
        dest_correct(dest, &what);
    }
}

/// The destination stopped for 2 s (SIGSTOP) while it loads, then
/// continued: within the progress timeout, so the migration completes,
/// correct.
#[test]
fn a_destination_stopped_for_two_seconds_completes_correct() {
    for streams in ["1", "4"] {
        let dest = Dest::spawn(200, &format!("sigstop-{streams}"));
        let (pid, addr) = (dest.child.id() as i32, dest.addr.clone());
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            // SAFETY: `pid` is our child, alive until `finish` reaps it
            // (after this thread is joined).
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            std::thread::sleep(Duration::from_secs(2));
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        });
        let what = format!("SIGSTOP 2 s, {streams} streams");
        let text = source_completes(&addr, "64", streams, &["--max-bandwidth-mibps", "128"], &what);
        stopper.join().unwrap();
        dest_correct(dest, &what);
        let total = text.lines().find_map(|l| l.strip_prefix("total time: ")).unwrap_or("");
        let ms: f64 = total.trim_end_matches(" ms").parse().unwrap_or(0.0);
        assert!(ms >= 2000.0, "{what}: the stop was inside the migration ({total})");
    }
}

/// Forwards connections to `upstream`, flipping one bit of the source's
/// bytes `at` bytes into the first connection. Returns its address.
fn flipping_link(upstream: &str, at: usize) -> String {
    use std::io::Read;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let upstream = upstream.to_string();
    std::thread::spawn(move || {
        for (i, client) in l.incoming().enumerate() {
            let Ok(client) = client else { return };
            let Ok(up) = TcpStream::connect(&upstream) else { return };
            let (mut c2, mut u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut u2, &mut c2));
            let (mut from, mut to) = (client, up);
            std::thread::spawn(move || {
                let (mut buf, mut seen) = (vec![0u8; 64 << 10], 0usize);
                loop {
                    let n = match from.read(&mut buf) {
                        Ok(0) | Err(_) => return to.shutdown(std::net::Shutdown::Write),
                        Ok(n) => n,
                    };
                    if i == 0 && seen <= at && at < seen + n {
                        buf[at - seen] ^= 0x08;
                    }
                    seen += n;
                    if to.write_all(&buf[..n]).is_err() {
                        return Ok(());
                    }
                }
            });
        }
    });
    addr
}

/// Mutual TLS, both ends with certificates of a CA made here: a source
/// whose certificate another CA signed is refused at the handshake, and so
/// is a destination whose certificate is not the CA's; a bit flipped on the
/// wire ends the migration with an error (TLS, not the stream's CRC, finds
/// it), never a completed one; the source runs on after each, and a good
/// migration over TLS completes, correct.
#[test]
fn tls_refuses_bad_certificates_and_a_flipped_bit_fails_the_migration() {
    use shadow_mmu_migrate::tls::{Dialer, TlsConfig};
    use shadow_mmu_testkit::credentials::Authority;
    let dir = std::env::temp_dir().join(format!("shadow-mmu-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Authority::new(&dir, "ours").unwrap();
    let rogue = Authority::new(&dir, "rogue").unwrap();
    let dest_creds = ca.issue(&dir, "dest", &["127.0.0.1"]).unwrap();
    let config = |c: &shadow_mmu_testkit::credentials::Credentials| {
        std::sync::Arc::new(TlsConfig::from_pem_files(&c.cert, &c.key, &c.ca).unwrap())
    };
    let good = config(&ca.issue(&dir, "source", &["source"]).unwrap());
    // A certificate of the rogue CA, the destination's trusted.
    let rogue_source = rogue.issue(&dir, "rogue-source", &["source"]).unwrap();
    let bad = std::sync::Arc::new(
        TlsConfig::from_pem_files(&rogue_source.cert, &rogue_source.key, &dest_creds.ca).unwrap(),
    );
    let spec = spec(16 * MIB);
    let mut vm = source(&spec);
    let h = header(&spec, vm.pages());
    let dest =
        Dest::spawn_with(200, "tls", &dest_creds.args().iter().map(String::as_str).collect::<Vec<_>>());
    let addr: std::net::SocketAddr = dest.addr.parse().unwrap();
    let timeout = Duration::from_secs(5);
    // A source the destination does not trust.
    let e = Dialer::tls(bad, "127.0.0.1".into(), addr).connect(addr, timeout).map(|_| ()).unwrap_err();
    let why = shadow_mmu_vmm::error_chain(&e);
    assert!(why.contains("TLS handshake") && why.contains("alert"), "{why}");
    // A destination this source does not trust: another CA's view of it.
    let rogue_view = config(&rogue.issue(&dir, "rogue-view", &["source"]).unwrap());
    let e = Dialer::tls(rogue_view, "127.0.0.1".into(), addr).connect(addr, timeout).map(|_| ()).unwrap_err();
    let why = shadow_mmu_vmm::error_chain(&e);
    assert!(why.contains("invalid peer certificate"), "{why}");
    // A bit flipped a megabyte into the stream, on a trusted connection.
    let link = flipping_link(&dest.addr, 1 << 20);
    let via: std::net::SocketAddr = link.parse().unwrap();
    let dialer = Dialer::tls(good.clone(), "127.0.0.1".into(), via);
    let conn = dialer.connect(via, timeout).unwrap();
    let params = OutgoingParams { dialer, ..OutgoingParams::default() };
    let f = runs_on(common::migrate(&mut vm, &conn, &h, &params, None));
    assert!(matches!(f.error, MigrationError::Stream(_) | MigrationError::Refused(_)), "{f:?}");
    let (code, _, err) = dest.wait();
    assert_ne!(code, 0);
    assert!(err.contains("failed TLS") && err.contains("partial VM is discarded"), "{err}");
    // Runs on, and migrates again over TLS, correct.
    let before = vm.passes_done();
    vm.release(before + 2);
    vm.wait_passes(before + 1).unwrap();
    let dest =
        Dest::spawn_with(200, "tls-again", &dest_creds.args().iter().map(String::as_str).collect::<Vec<_>>());
    let addr: std::net::SocketAddr = dest.addr.parse().unwrap();
    let dialer = Dialer::tls(good, "127.0.0.1".into(), addr);
    let conn = dialer.connect(addr, timeout).unwrap();
    let params = OutgoingParams { dialer, connections: 2, ..OutgoingParams::default() };
    assert!(matches!(common::migrate(&mut vm, &conn, &h, &params, None), Outcome::Completed(_)));
    vm.stop().unwrap();
    let (code, out, d) = dest.finish();
    assert_eq!(code, 0, "{out}");
    assert_eq!(d["mismatched_pages"], 0);
    assert_eq!(d["check_after_resume"], "passed");
}
