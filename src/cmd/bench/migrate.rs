//! `shadow-mmu bench migrate`: live migrations over loopback, the
//! destination a process of its own (this binary's `migrate incoming`),
//! for every combination of `--backend`, `--mmu`, `--dirty-log` and
//! `--harvest-threads`, at each `--guest-mib` and `--dirty-rate-mibps`;
//! QEMU's statistics side by side, the guest's speed while it migrates
//! against its speed without (the time of one pass over its memory), the
//! vCPUs' write-fault p99
//! during harvests (the engine), and, in the same run, a raw loopback TCP
//! copy of the same bytes: the physical limit of the total time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use shadow_mmu_engine::MmuDesign;
use shadow_mmu_migrate::SourceHooks;
use shadow_mmu_migrate::source::{Outcome, OutgoingParams, Precopy, Verify, migrate_outgoing};
use shadow_mmu_migrate::stats::{MigrationStats, MigrationStatus, measured_ms};
use shadow_mmu_migrate::tls::{Dialer, TlsConfig};
use shadow_mmu_testkit::credentials::{Authority, Credentials};
use shadow_mmu_testkit::pacer::GuestRate;
use shadow_mmu_testkit::resume::PassPacing;
use shadow_mmu_vmm::{DirtyLogInterface, error_chain};

use super::BenchResult;
use crate::backend_kind::BackendKind;
use crate::harvest_args::HarvestKnobs;
use crate::output::{Progress, Spread};
use crate::vm_description::VmDescription;

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Backends, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "engine")]
    pub backend: Vec<BackendKind>,
    /// The engine's designs, comma-separated (KVM has one).
    #[arg(long, value_delimiter = ',', default_value = "locked,lockless")]
    pub mmu: Vec<MmuDesign>,
    /// Dirty-log interfaces, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "get")]
    pub dirty_log: Vec<DirtyLogInterface>,
    /// Harvest threads, comma-separated (more than one: the engine only).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub harvest_threads: Vec<u32>,
    /// Guest sizes, MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024")]
    pub guest_mib: Vec<u64>,
    /// Dirty-rate caps, MiB/s, comma-separated (0: idle after boot; max: no
    /// cap, the vCPUs flat out).
    #[arg(long, value_delimiter = ',', default_value = "0,256", value_parser = parse_rate)]
    pub dirty_rate_mibps: Vec<Rate>,
    #[command(flatten)]
    pub knobs: HarvestKnobs,
    #[command(flatten)]
    pub lock: crate::lock_fault_args::LockFaultKnobs,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: u32,
    /// QEMU's downtime-limit, ms.
    #[arg(long, default_value_t = 300)]
    pub downtime_limit_ms: u64,
    /// Give pre-copy this long, s (then cancel).
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// QEMU's auto-converge.
    #[arg(long)]
    pub auto_converge: bool,
    /// QEMU's dirty-limit, MiB/s a vCPU, comma-separated (0: none): each
    /// migration runs once with each.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub dirty_limit_mibps: Vec<u64>,
    /// The last this many vCPUs only compute (load, never store); their
    /// progress during the migration is reported against their speed
    /// before it.
    #[arg(long, default_value_t = 0)]
    pub compute_vcpus: u32,
    /// TCP streams for the pages, comma-separated (each migration runs
    /// over each; the raw copy too).
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub connections: Vec<u32>,
    /// When the destination checks the pages, comma-separated: `strict`
    /// (before the guest runs there), `audit` (after).
    #[arg(long, value_delimiter = ',', default_value = "strict")]
    pub verify: Vec<Verify>,
    /// Threads of the source's digest pass, comma-separated: `auto` (the
    /// host's CPUs) or a count.
    #[arg(long, value_delimiter = ',', default_value = "auto", value_parser = parse_threads)]
    pub digest_threads: Vec<Threads>,
    /// Transports, comma-separated: `plain` TCP, `tls` (mutual TLS with a
    /// CA made for the run, both ends in this host).
    #[arg(long, value_delimiter = ',', default_value = "plain")]
    pub transport: Vec<Transport>,
    /// Pre-copy loops, comma-separated: `qemu` (QEMU's, mid-pass syncs),
    /// `rounds` (whole rounds, the loop before it).
    #[arg(long, value_delimiter = ',', default_value = "qemu")]
    pub precopy: Vec<Precopy>,
    /// How long the guest runs at the destination before its check, ms.
    #[arg(long, default_value_t = 300)]
    pub run_after_ms: u64,
    /// Repetitions of every migration, interleaved (each round migrates
    /// every combination once, in turn): each figure is summed up as its
    /// median with its min and max.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// Write the runs here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write SVGs into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// How the migration's connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// TCP.
    Plain,
    /// Mutual TLS over TCP.
    Tls,
}

/// The run's TLS credentials: the destination's files, the source's
/// configuration.
struct BenchTls {
    dest: Credentials,
    source: Arc<TlsConfig>,
}

impl BenchTls {
    /// A CA for the run, and a certificate each for both ends, in `dir`.
    fn new(dir: &std::path::Path) -> BenchResult<Self> {
        let ca = Authority::new(dir, "bench").map_err(|e| e.to_string())?;
        let dest = ca.issue(dir, "destination", &["127.0.0.1", "localhost"]).map_err(|e| e.to_string())?;
        let src = ca.issue(dir, "source", &["source"]).map_err(|e| e.to_string())?;
        let source = TlsConfig::from_pem_files(&src.cert, &src.key, &src.ca).map_err(|e| error_chain(&e))?;
        Ok(Self { dest, source: Arc::new(source) })
    }
}

/// A dirty-rate cap of the command line: MiB/s, or none (`max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(Option<u64>);

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(r) => write!(f, "{r}"),
            None => f.write_str("max"),
        }
    }
}

/// A thread count or `auto` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads(Option<usize>);

fn parse_threads(s: &str) -> Result<Threads, String> {
    match s {
        "auto" => Ok(Threads(None)),
        n => n
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .map(|n| Threads(Some(n)))
            .ok_or(format!("{s:?}: auto or a count")),
    }
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    match s {
        "max" => Ok(Rate(None)),
        _ => s.parse().map(|r| Rate(Some(r))).map_err(|e| format!("{s:?}: MiB/s or max ({e})")),
    }
}

/// A raw loopback TCP copy of `bytes` over `streams` connections at once
/// (each a share, 1 MiB writes from a reused buffer, read by a thread of
/// its own): the link's limit for a migration over as many streams.
/// Returns its time.
fn raw_copy(bytes: u64, streams: u32) -> std::io::Result<Duration> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let streams = u64::from(streams.max(1));
    let readers = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut threads = Vec::new();
        for _ in 0..streams {
            let (mut c, _) = l.accept()?;
            threads.push(std::thread::spawn(move || -> std::io::Result<u64> {
                let mut buf = vec![0u8; 1 << 20];
                let mut got = 0;
                loop {
                    match c.read(&mut buf)? {
                        0 => return Ok(got),
                        n => got += n as u64,
                    }
                }
            }));
        }
        let mut got = 0;
        for t in threads {
            got += t.join().map_err(|_| std::io::Error::other("a reader panicked"))??;
        }
        Ok(got)
    });
    let conns = (0..streams).map(|_| TcpStream::connect(addr)).collect::<std::io::Result<Vec<_>>>()?;
    let t = Instant::now();
    let writers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(k, mut s)| {
            let share = bytes * (k as u64 + 1) / streams - bytes * k as u64 / streams;
            std::thread::spawn(move || -> std::io::Result<()> {
                let buf = vec![0x5au8; 1 << 20];
                let mut sent = 0;
                while sent < share {
                    let n = (share - sent).min(buf.len() as u64) as usize;
                    s.write_all(&buf[..n])?;
                    sent += n as u64;
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        w.join().map_err(|_| std::io::Error::other("a writer panicked"))??;
    }
    let got = readers.join().map_err(|_| std::io::Error::other("the readers panicked"))??;
    assert_eq!(got, bytes);
    Ok(t.elapsed())
}

/// A destination process, and the address it listens on.
fn spawn_destination(
    run_after_ms: u64,
    json: &std::path::Path,
    tls: Option<&Credentials>,
) -> BenchResult<(std::process::Child, String)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["migrate", "incoming", "--listen", "127.0.0.1:0", "--run-after-ms"])
        .arg(run_after_ms.to_string())
        .arg("--json")
        .arg(json)
        .args(tls.map(Credentials::args).unwrap_or_default())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line)?;
    let addr = line.trim().strip_prefix("listening on ").ok_or(format!("the destination said {line:?}"))?;
    Ok((child, addr.to_string()))
}

/// How long the computing vCPU's speed is measured before a migration, at
/// least: from a pass's end, until [`COMPUTE_BASELINE_PASSES`] more ended
/// (a KVM guest's computing vCPU makes two passes a second), or at most
/// [`COMPUTE_BASELINE_MAX`].
const COMPUTE_BASELINE: Duration = Duration::from_millis(500);
/// Passes the computing vCPU's baseline counts, at least.
const COMPUTE_BASELINE_PASSES: u64 = 2;
/// The longest the baseline waits for them.
const COMPUTE_BASELINE_MAX: Duration = Duration::from_secs(10);

/// A VM of the sweep: where it runs and how its dirty log is harvested.
#[derive(Debug, Clone, Copy)]
struct VmChoice {
    backend: BackendKind,
    mmu: MmuDesign,
    log: DirtyLogInterface,
    threads: u32,
    mib: u64,
}

/// The migration's own settings in one run of the sweep.
#[derive(Debug, Clone, Copy)]
struct RunChoice {
    rate: Rate,
    precopy: Precopy,
    /// The dirty-limit, MiB/s a vCPU (0: none).
    limit: u64,
    /// TCP streams for the pages.
    connections: u32,
    /// Mutual TLS on every connection.
    tls: bool,
    verify: Verify,
    /// The digest pass's threads (`None`: automatic).
    digest_threads: Option<usize>,
}

/// One migration of the sweep: a VM under the migration's settings.
#[derive(Debug, Clone, Copy)]
struct Combo {
    vm: VmChoice,
    run: RunChoice,
}

impl Combo {
    /// Every combination `a` asks for (KVM: one design, one harvest thread).
    fn all(a: &MigrateArgs) -> Vec<Combo> {
        let mut vms = Vec::new();
        let lock_faults = a.lock.spec().is_ok_and(|l| l.any());
        for &backend in &a.backend {
            if backend == BackendKind::Kvm && lock_faults {
                println!("(KVM: skipped: the lock faults run on the engine only)");
                continue;
            }
            let mmus: Vec<MmuDesign> = match backend {
                BackendKind::Engine => a.mmu.clone(),
                BackendKind::Kvm => a.mmu.first().copied().into_iter().collect(),
            };
            // More than one harvest thread: the engine only.
            let threads =
                || a.harvest_threads.iter().filter(move |&&t| backend == BackendKind::Engine || t == 1);
            for &mmu in &mmus {
                for &log in &a.dirty_log {
                    for &threads in threads() {
                        vms.extend(a.guest_mib.iter().map(|&mib| VmChoice {
                            backend,
                            mmu,
                            log,
                            threads,
                            mib,
                        }));
                    }
                }
            }
        }
        // Each VM under each of the migration's own settings.
        let runs: Vec<RunChoice> = a
            .dirty_rate_mibps
            .iter()
            .flat_map(|&r| a.precopy.iter().map(move |&p| (r, p)))
            .flat_map(|(r, p)| a.dirty_limit_mibps.iter().map(move |&l| (r, p, l)))
            .flat_map(|(r, p, l)| a.connections.iter().map(move |&n| (r, p, l, n)))
            .flat_map(|(r, p, l, n)| a.transport.iter().map(move |&t| (r, p, l, n, t == Transport::Tls)))
            .flat_map(|(r, p, l, n, tls)| a.verify.iter().map(move |&v| (r, p, l, n, tls, v)))
            .flat_map(|(r, p, l, n, tls, verify)| {
                a.digest_threads.iter().map(move |&Threads(digest_threads)| RunChoice {
                    rate: r,
                    precopy: p,
                    limit: l,
                    connections: n,
                    tls,
                    verify,
                    digest_threads,
                })
            })
            .collect();
        vms.into_iter().flat_map(|vm| runs.iter().map(move |&run| Combo { vm, run })).collect()
    }

    fn label(&self) -> String {
        let l = match self.vm.backend {
            BackendKind::Engine if self.vm.threads > 1 => {
                format!("engine {}, {} x{}", self.vm.mmu, self.vm.log, self.vm.threads)
            }
            BackendKind::Engine => format!("engine {}, {}", self.vm.mmu, self.vm.log),
            BackendKind::Kvm => format!("kvm, {}", self.vm.log),
        };
        let l = match self.run.precopy {
            Precopy::Qemu => l,
            other => format!("{l}, {other}"),
        };
        let l = match self.run.limit {
            0 => l,
            limit => format!("{l}, limit {limit}"),
        };
        let l = match self.run.connections {
            1 => l,
            n => format!("{l}, x{n} streams"),
        };
        let l = if self.run.tls { format!("{l}, tls") } else { l };
        let l = match self.run.verify {
            Verify::Strict => l,
            Verify::Audit => format!("{l}, audit"),
        };
        match self.run.digest_threads {
            None => l,
            Some(n) => format!("{l}, digest x{n}"),
        }
    }

    fn description(&self, a: &MigrateArgs) -> VmDescription {
        let lock = a.lock.spec().unwrap_or_default();
        VmDescription {
            backend: self.vm.backend,
            mmu: self.vm.mmu.to_string(),
            fast_page_fault: true,
            eager_page_split: true,
            pml: false,
            dirty_log: self.vm.log.to_string(),
            initially_set: a.knobs.initially_set && self.vm.log == DirtyLogInterface::Clear,
            ring_entries: a.knobs.ring_entries,
            harvest_threads: self.vm.threads,
            clear_chunk_pages: a.knobs.clear_chunk_pages,
            vcpus: a.vcpus,
            guest_bytes: self.vm.mib << 20,
            random: false,
            write_pct: 100,
            seed: 1,
            dirty_rate: self.run.rate.0.map(|r| r << 20),
            // Checked once, in `main`.
            lock_faults: lock,
            compute_vcpus: a.compute_vcpus,
        }
    }
}

/// What one migration measured, at both ends.
struct Measured {
    stats: MigrationStats,
    error: Option<String>,
    /// The destination's JSON (null if it wrote none).
    dest: serde_json::Value,
    /// The destination's exit, and what it said on stderr.
    dest_ok: bool,
    dest_stderr: String,
    baseline_pass_ns: u64,
    /// Bytes a pass writes.
    pass_bytes: f64,
    passes_during: u64,
    /// Passes the guest would have made without the migration.
    expected: f64,
    /// `passes_during` over `expected`, when 5 or more were expected.
    fraction: Option<f64>,
    /// vCPU write-fault p99 during harvests.
    p99: Option<u64>,
    /// The guest's dirty rate while it migrated.
    rate: GuestRate,
    /// The last computing vCPU's passes a second before the migration and
    /// during it (to the pause), with `--compute-vcpus`.
    compute: Option<(f64, f64)>,
    details: serde_json::Map<String, serde_json::Value>,
}

/// Boots the guest, times a pass without a migration, migrates it to a
/// destination process of its own (which writes `dest_json`).
fn migrate_one(
    a: &MigrateArgs,
    c: &Combo,
    dest_json: &std::path::Path,
    tls: Option<&BenchTls>,
) -> BenchResult<Measured> {
    let tls = tls.filter(|_| c.run.tls);
    let desc = c.description(a);
    let mut vm = desc.boot()?;
    // The guest's speed without a migration: two passes flat out, the
    // longest of the vCPUs' last.
    let p = vm.passes_done();
    vm.release(p + 2);
    let baseline_pass_ns = vm.wait_passes(p + 1).map_err(|e| error_chain(&e))?;
    let (child, addr) = spawn_destination(a.run_after_ms, dest_json, tls.map(|t| &t.dest))?;
    let dialer = match tls {
        Some(t) => Dialer::tls(
            t.source.clone(),
            "127.0.0.1".into(),
            addr.parse().map_err(|e| format!("{addr}: {e}"))?,
        ),
        None => Dialer::default(),
    };
    let params = OutgoingParams {
        downtime_limit: Duration::from_millis(a.downtime_limit_ms),
        timeout: Some(Duration::from_secs(a.timeout_s)),
        auto_converge: a.auto_converge,
        precopy: c.run.precopy,
        dirty_limit: Some(c.run.limit << 20).filter(|&l| l > 0),
        connections: c.run.connections,
        verify: c.run.verify,
        digest_threads: c.run.digest_threads,
        dialer,
        clear_chunk_pages: desc.clear_chunk_pages,
        ..OutgoingParams::default()
    };
    let conn = crate::cmd::migrate::connect(&addr, &params.dialer, params.progress_timeout)?;
    let header = desc.header(vm.as_ref())?;
    let mut pacing = PassPacing::new(vm.as_ref(), desc.dirty_rate).map_err(|e| error_chain(&e))?;
    let computing = (a.compute_vcpus > 0).then(|| desc.vcpus as usize - 1);
    // The computing vCPU's speed at the guest's pace, before the migration.
    let before = computing.map(|id| {
        let mut wait_until = |done: &dyn Fn(u64, Duration) -> bool| {
            let t = Instant::now();
            while !done(vm.vcpu_passes()[id], t.elapsed()) && t.elapsed() < COMPUTE_BASELINE_MAX {
                SourceHooks::tick(&mut pacing, vm.as_ref());
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let p = vm.vcpu_passes()[id];
        wait_until(&|n, _| n > p);
        let (p, t) = (vm.vcpu_passes()[id], Instant::now());
        wait_until(&|n, ran| ran >= COMPUTE_BASELINE && n >= p + COMPUTE_BASELINE_PASSES);
        (vm.vcpu_passes()[id] - p) as f64 / t.elapsed().as_secs_f64()
    });
    let (p0, c0) = (vm.passes_done(), computing.map(|id| vm.vcpu_passes()[id]));
    let r = migrate_outgoing(vm.as_mut(), &conn, &header, &params, &mut pacing);
    let rate = GuestRate::of(desc.dirty_rate, pacing.reached());
    let passes_during = vm.passes_done() - p0;
    let c1 = computing.map(|id| vm.vcpu_passes()[id]);
    let extras = vm.stop().map_err(|e| error_chain(&e))?;
    let out = child.wait_with_output()?;
    let dest: serde_json::Value = std::fs::read_to_string(dest_json)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    let (stats, error) = match r {
        Outcome::Completed(s) => (*s, None),
        Outcome::RunsOn(f) => (*f.stats, Some(error_chain(&f.error))),
        // Here the destination is our child: it said what it did; the
        // source's paused copy goes with the VM's stop.
        Outcome::Unsettled(u) => {
            let e = u.stats().error.clone();
            (*u.discard(), e)
        }
    };
    // The passes the guest made while migrating, against those it would
    // have made without: as many as the rate released, at most as many as
    // its speed allows. Fewer than 5 expected is too coarse to say.
    let secs = stats.total_time_ms / 1e3;
    let by_speed = secs * 1e9 / baseline_pass_ns.max(1) as f64;
    let expected = desc.dirty_rate.map_or(by_speed, |r| by_speed.min(secs * r as f64 / desc.pass_bytes()));
    // Up to the pause: the downtime is nobody's progress.
    let ran = (stats.total_time_ms - stats.downtime_ms.unwrap_or(0.0)) / 1e3;
    let compute = before.zip(c0.zip(c1)).map(|(b, (c0, c1))| (b, (c1 - c0) as f64 / ran.max(1e-3)));
    let p99 = extras
        .latency
        .as_ref()
        .filter(|(harvest, _)| harvest.count() > 0)
        .map(|(harvest, _)| harvest.quantile_ns(0.99));
    Ok(Measured {
        stats,
        error,
        dest,
        dest_ok: out.status.success(),
        dest_stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        baseline_pass_ns,
        pass_bytes: desc.pass_bytes(),
        passes_during,
        expected,
        fraction: (expected >= 5.0).then(|| passes_during as f64 / expected),
        p99,
        rate,
        compute,
        details: extras.figures.iter().map(|(k, v)| (k.to_string(), json!(v))).collect(),
    })
}

/// The table's head and its legend.
fn table_head(bar: &Progress) {
    bar.line(format!(
        "{:<26} {:>5} {:>5} {:>8} {:>7} {:>6} {:>7} {:>8} {:>8} {:>6} {:>8} {:>6} {:>6} {:>9} {:>6} {:>4} {:>4}",
        "backend, design, log",
        "MiB",
        "MiB/s",
        "total ms",
        "setup",
        "xraw",
        "xraw-su",
        "downtime",
        "stall ms",
        "rounds",
        "sent MiB",
        "mbps",
        "guest",
        "fault p99",
        "result",
        "mism",
        "lost"
    ));
    bar.line(
        "(xraw: the total time over the raw copy's; xraw-su: the same without the setup, in which the \
         destination builds and populates its VM; guest: the passes it made while migrating over those \
         it would have made without, by its rate and its speed (-: fewer than 5 expected, too coarse); \
         fault p99: vCPU write faults that met a harvest; stall: the vCPU time the migration cost the guest \
         before the pause, by cause on the line below: mmu_lock waits, TLB flushes, throttle, ring full; \
         KVM hides its lock waits and flushes from userspace)",
    );
}

/// One migration's row of the table and its JSON record; whether it
/// passed (completed, every page matched, none lost after the resume).
fn report_one(c: &Combo, m: &Measured, raw: Duration) -> (String, serde_json::Value, bool) {
    let mism = m.dest["mismatched_pages"].as_u64();
    let lost = m.dest["lost_pages"].as_u64();
    let ok = m.error.is_none() && m.dest_ok && mism == Some(0) && lost == Some(0);
    let stats = &m.stats;
    let raw_ms = raw.as_secs_f64() * 1e3;
    let xraw = stats.total_time_ms / raw_ms;
    let setup_ms = stats.setup_time_ms.unwrap_or(f64::NAN);
    let xraw_su = (stats.total_time_ms - setup_ms) / raw_ms;
    let row = format!(
        "{:<26} {:>5} {:>5} {:>8.1} {:>7.1} {:>6.2} {:>7.2} {:>8.1} {:>8} {:>6} {:>8.1} {:>6.0} {:>6} {:>9} {:>6} {:>4} {:>4}",
        c.label(),
        c.vm.mib,
        c.run.rate.to_string(),
        stats.total_time_ms,
        setup_ms,
        xraw,
        xraw_su,
        stats.downtime_ms.unwrap_or(f64::NAN),
        stats.guest_stall_ms.map_or("-".into(), |s| format!("{s:.1}")),
        stats.rounds.len(),
        stats.transferred_bytes as f64 / f64::from(1u32 << 20),
        stats.mbps,
        m.fraction.map_or("-".into(), |f| format!("{f:.2}")),
        m.p99.map_or("-".into(), |ns| format!("{:.1}us", ns as f64 / 1e3)),
        if ok { "ok" } else { "FAILED" },
        mism.map_or("?".into(), |m| m.to_string()),
        lost.map_or("?".into(), |m| m.to_string()),
    );
    let record = json!({
        "backend": c.vm.backend, "mmu": c.vm.mmu.to_string(), "dirty_log": c.vm.log.to_string(),
        "harvest_threads": c.vm.threads, "guest_mib": c.vm.mib, "dirty_rate_mibps": c.run.rate.0, "raw_copy_ms": raw_ms,
        "precopy": c.run.precopy.to_string(), "dirty_limit_mibps": c.run.limit, "connections": c.run.connections, "tls": c.run.tls, "verify": c.run.verify.to_string(), "digest_threads": c.run.digest_threads,
        "total_time_vs_raw_copy": xraw, "total_time_without_setup_vs_raw_copy": xraw_su,
        "guest_pass_ns_without_migration": m.baseline_pass_ns,
        "guest_passes_expected_without_migration": m.expected,
        "guest_throughput_fraction": m.fraction,
        "guest_bytes_per_pass": m.pass_bytes,
        "guest_passes_during": m.passes_during,
        "vcpu_fault_p99_during_harvest_ns": m.p99,
        "guest_dirty_rate": m.rate,
        "compute_vcpu_passes_per_s": m.compute.map(|(before, during)| json!({"before": before, "during": during})),
        "error": m.error, "source": stats, "destination": m.dest,
        "details": m.details,
    });
    (row, record, ok)
}

pub fn main(a: &MigrateArgs) -> BenchResult {
    a.lock.spec()?;
    let combos = Combo::all(a);
    let bar = Progress::new(combos.len() as u64 * u64::from(a.repeat), "migrations");
    let mut raw = std::collections::BTreeMap::new();
    for &mib in &a.guest_mib {
        for &n in &a.connections {
            let t = raw_copy(mib << 20, n)?;
            let ms = t.as_secs_f64() * 1e3;
            bar.line(format!("raw loopback TCP copy of {mib} MiB over {n} stream(s): {ms:.1} ms"));
            raw.insert((mib, n), t);
        }
    }
    table_head(&bar);
    let dir = std::env::temp_dir().join(format!("shadow-mmu-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tls = a.transport.contains(&Transport::Tls).then(|| BenchTls::new(&dir)).transpose()?;
    let mut runs = Vec::new();
    let mut all_ok = true;
    let mut plotted = Vec::new();
    let mut measured: Vec<Vec<MigrationStats>> = vec![Vec::new(); combos.len()];
    for round in 0..a.repeat {
        for (i, c) in combos.iter().enumerate() {
            let m = migrate_one(a, c, &dir.join(format!("dest-{round}-{i}.json")), tls.as_ref())?;
            let (row, mut record, ok) = report_one(c, &m, raw[&(c.vm.mib, c.run.connections)]);
            record["repetition"] = json!(round);
            all_ok &= ok;
            bar.line(row);
            bar.line(format!("  {}", m.rate.line()));
            if let Some((before, during)) = m.compute {
                bar.line(format!(
                    "  computing vCPU: {:.2} of its speed before the migration ({during:.1} passes/s against {before:.1})",
                    during / before.max(1e-9)
                ));
            }
            if let Some(s) = &m.stats.guest_stall {
                bar.line(format!("  guest stall: {}", s.line()));
            }
            if let Some(p) = &m.stats.downtime_phases {
                let s = &m.stats;
                bar.line(format!(
                    "  downtime phases: {}; expected {}, of it fixed {} (round trip {}); syncs {}",
                    p.line(),
                    measured_ms(s.expected_downtime_ms),
                    measured_ms(s.fixed_downtime_ms),
                    measured_ms(s.round_trip_ms),
                    s.dirty_sync_count
                ));
            }
            if let Some(e) = &m.error {
                bar.line(format!("  {}: {e}", c.label()));
            }
            if !m.dest_ok {
                bar.line(format!("  destination: {}", m.dest_stderr));
            }
            runs.push(record);
            if round == 0 {
                plotted.push((c.label(), c.vm.mib, c.run.rate, m.stats.clone()));
            }
            measured[i].push(m.stats);
            bar.step(format!("round {} {}/{}", round + 1, i + 1, combos.len()));
        }
    }
    bar.finish();
    if a.repeat > 1 {
        print_repetitions(&combos, &measured, a.repeat);
    }
    if let Some(p) = &a.json {
        crate::output::write_runs(p, runs)?;
    }
    if let Some(d) = &a.plot {
        std::fs::create_dir_all(d)?;
        let series: Vec<_> =
            plotted.iter().map(|(l, mib, rate, s)| (format!("{l}, {mib} MiB, {rate} MiB/s"), s)).collect();
        let path = crate::plot::migration_rounds(d, &series)?;
        println!("plot: {}", path.display());
    }
    println!("{}", if all_ok { "OK" } else { "FAILED" });
    Ok(all_ok)
}

/// Each combination's figures over the rounds: median [min, max] of those
/// measured (a failed migration has no downtime).
fn print_repetitions(combos: &[Combo], measured: &[Vec<MigrationStats>], repeat: u32) {
    println!("== over {repeat} repetitions: median [min, max]");
    for (c, runs) in combos.iter().zip(measured) {
        let spread = |f: &dyn Fn(&MigrationStats) -> Option<f64>| {
            let v: Vec<f64> = runs.iter().filter_map(f).collect();
            if v.is_empty() {
                return "not measured".to_string();
            }
            let s = Spread::of(&v);
            format!("{:.1} [{:.1}, {:.1}]", s.median, s.min, s.max)
        };
        println!(
            "{}, {} MiB, {} MiB/s: total {} ms, setup {} ms, downtime {} ms, guest stall {} ms, rounds {}, \
             syncs {}, sent {} MiB, {} mbps; completed {} of {}",
            c.label(),
            c.vm.mib,
            c.run.rate,
            spread(&|s| Some(s.total_time_ms)),
            spread(&|s| s.setup_time_ms),
            spread(&|s| s.downtime_ms),
            spread(&|s| s.guest_stall_ms),
            spread(&|s| Some(s.rounds.len() as f64)),
            spread(&|s| Some(s.dirty_sync_count as f64)),
            spread(&|s| Some(s.transferred_bytes as f64 / f64::from(1u32 << 20))),
            spread(&|s| Some(s.mbps)),
            runs.iter().filter(|s| s.status == MigrationStatus::Completed).count(),
            runs.len()
        );
    }
}
