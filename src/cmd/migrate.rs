//! `shadow-mmu migrate incoming|outgoing|control`: live migration between
//! two processes over TCP, on the engine or on the machine's KVM. The CLI
//! is what knows the backends: it describes the VM in the stream's header
//! ([`VmDescription`], JSON) and builds it again at the destination; the
//! migration itself (`shadow_mmu_migrate`) drives whatever it is given.
//! A source whose handover's outcome is unknown stays paused and takes
//! the operator's word on a control socket (`migrate control`).
//!
//! Exit codes (docs/migration.md): 0 the migration completed (the guest
//! runs at the destination); 1 it failed (the source runs the guest on; the
//! destination never ran it); 2 a usage or setup error; 3 (source) the
//! outcome stayed unknown and the operator decided; 4 (destination) the
//! guest runs here but the check after the resume found pages lost or
//! behind.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use shadow_mmu_engine::MmuDesign;
use shadow_mmu_migrate::dest::{BuildError, IncomingParams, migrate_incoming};
use shadow_mmu_migrate::source::{
    OnTimeout, Outcome, OutgoingParams, Precopy, Unsettled, Verify, migrate_outgoing,
};
use shadow_mmu_migrate::stats::{IncomingStats, MigrationStats, MigrationStatus};
use shadow_mmu_migrate::stream::Header;
use shadow_mmu_migrate::tls::{Dialer, TlsConfig, TlsError, TlsListener};
use shadow_mmu_migrate::{DestHooks, Phase, SourceHooks};
use shadow_mmu_testkit::pacer::GuestRate;
use shadow_mmu_testkit::resume::{PassPacing, PassStart, ResumeCheck, ResumeReport, check_after_resume};
use shadow_mmu_vmm::{DirtyLogInterface, PassVm, error_chain};

use crate::backend_kind::BackendKind;
use crate::harvest_args::HarvestKnobs;
use crate::output::write_json;
use crate::vm_description::{DescriptionError, VmDescription};

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// The destination: listens, builds the VM the stream's header
    /// describes, loads and checks it, resumes the guest and checks it again.
    Incoming(IncomingArgs),
    /// The source: boots a VM, lets its workload run, migrates it.
    Outgoing(Box<OutgoingArgs>),
    /// Tells a source paused in `postmigrate` (its outcome unknown) what to
    /// do: ask the destination again, resume the guest here, discard it.
    Control(ControlArgs),
}

/// What the operator tells a source in `postmigrate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ControlAction {
    /// Its statistics so far.
    Status,
    /// Ask the destination again (its answer settles the migration).
    Query,
    /// Resume the guest at the source: only once the destination is known
    /// not to run it (killed, or its output says it never ran it).
    Resume,
    /// Discard the source's paused copy: only once the destination is known
    /// to run the guest.
    Discard,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The source's control socket (`migrate outgoing` prints it).
    #[arg(long)]
    pub socket: PathBuf,
    /// What to do.
    #[arg(value_enum)]
    pub action: ControlAction,
}

/// `--on-timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TimeoutAction {
    /// Give up; the source runs on (Cloud Hypervisor's default).
    Cancel,
    /// Stop the guest and copy the rest, whatever the downtime.
    Force,
}

/// The access pattern of the migrating guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Each vCPU sweeps its slice, one 8-byte store per page per pass.
    Seq,
    /// Random pages of the slice.
    Random,
}

#[derive(Debug, Args)]
pub struct IncomingArgs {
    /// Address to listen on (port 0: any; the address is printed).
    #[arg(long)]
    pub listen: String,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// How long the guest runs here before its writes are checked, ms (0:
    /// resume only).
    #[arg(long, default_value_t = 1000)]
    pub run_after_ms: u64,
    /// Refuse a VM of more guest memory than this, MiB (the destination
    /// allocates and populates what the header asks for).
    #[arg(long)]
    pub max_guest_mib: Option<u64>,
    /// Write the destination's statistics here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// How long to wait for a word from the source, s, until its header
    /// brings the source's own --progress-timeout-s.
    #[arg(long, default_value_t = 10)]
    pub progress_timeout_s: u64,
    /// Stop this process (SIGSTOP) at a phase boundary (tests: docs/migration.md).
    #[arg(long, hide = true)]
    pub stop_at: Option<String>,
}

/// Mutual TLS on every connection, both ends (QEMU's `tls-creds`): all
/// three files, or none.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// This side's certificate chain, PEM.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This side's private key, PEM.
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA certificates this side trusts for the other's certificate,
    /// PEM (the destination requires the source's).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The credentials, if TLS was asked for.
    pub fn config(&self) -> Result<Option<Arc<TlsConfig>>, String> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(c), Some(k), Some(ca)) => {
                TlsConfig::from_pem_files(c, k, ca).map(|t| Some(Arc::new(t))).map_err(|e| error_chain(&e))
            }
            _ => Ok(None),
        }
    }
}

#[derive(Debug, Args)]
pub struct OutgoingArgs {
    /// The destination's address.
    #[arg(long)]
    pub to: String,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The name the destination's certificate must bear (default: the
    /// host of --to).
    #[arg(long)]
    pub tls_hostname: Option<String>,
    /// Where the VM runs.
    #[arg(long, value_enum, default_value = "engine")]
    pub backend: BackendKind,
    /// The engine's dirty-logging design.
    #[arg(long, default_value = "lockless")]
    pub mmu: MmuDesign,
    /// Turn the engine's `fast_page_fault` off.
    #[arg(long)]
    pub no_fast_page_fault: bool,
    #[command(flatten)]
    pub tdp: crate::tdp_args::TdpKnobs,
    #[command(flatten)]
    pub lock: crate::lock_fault_args::LockFaultKnobs,
    /// The dirty-log interface.
    #[arg(long, default_value = "get")]
    pub dirty_log: DirtyLogInterface,
    #[command(flatten)]
    pub knobs: HarvestKnobs,
    /// Threads of each harvest (the engine's lockless design runs them side
    /// by side; KVM harvests in one ioctl).
    #[arg(long, default_value_t = 1)]
    pub harvest_threads: u32,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: u32,
    /// Guest memory, MiB (KVM's test slot: at most 2048).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1 << 16))]
    pub guest_mib: u64,
    /// The guest's access pattern.
    #[arg(long, value_enum, default_value = "seq")]
    pub workload: Workload,
    /// Share of accesses that store, percent.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub write_pct: u8,
    /// Cap on how fast the guest dirties memory, MiB/s (0: idle after its
    /// first pass); without it the vCPUs run flat out.
    #[arg(long)]
    pub dirty_rate_mibps: Option<u64>,
    /// QEMU's downtime-limit, ms.
    #[arg(long, default_value_t = 300)]
    pub downtime_limit_ms: u64,
    /// QEMU's max-bandwidth, MiB/s (0: as fast as the link).
    #[arg(long, default_value_t = 0)]
    pub max_bandwidth_mibps: u64,
    /// Give the setup and pre-copy this long, s.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// How long either side waits for a word from the other, s; also the
    /// deadline of every write and of each handshake of the handover
    /// (default: 10, or --timeout-s if shorter and not 0).
    #[arg(long)]
    pub progress_timeout_s: Option<f64>,
    /// How long to ask the destination for the handover's outcome when it
    /// was not heard, s; then the source stays paused for the operator.
    #[arg(long, default_value_t = 30.0)]
    pub settle_timeout_s: f64,
    /// The control socket of a source left in `postmigrate` (default: one
    /// in the temporary directory, named after the process).
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// What to do at the timeout.
    #[arg(long, value_enum, default_value = "cancel")]
    pub on_timeout: TimeoutAction,
    /// QEMU's auto-converge: throttle the vCPUs 20%, then 10% more each round
    /// that does not converge, up to 99%.
    #[arg(long)]
    pub auto_converge: bool,
    /// QEMU's dirty-limit: hold each vCPU that dirties more than this many
    /// MiB/s (that vCPU alone) while the migration runs.
    #[arg(long)]
    pub dirty_limit_mibps: Option<u64>,
    /// The last this many vCPUs only compute (load, never store).
    #[arg(long, default_value_t = 0)]
    pub compute_vcpus: u32,
    /// TCP streams for the pages, this connection included (QEMU's multifd
    /// channels).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub connections: u32,
    /// Pre-copy's loop: `qemu` syncs mid-pass when the unsent pages fit
    /// (QEMU's); `rounds` sends whole rounds (the loop before it).
    #[arg(long, default_value = "qemu")]
    pub precopy: Precopy,
    /// When the destination compares every page with the source's digest:
    /// `strict`, before the guest runs there (in the downtime); `audit`,
    /// after (the source keeps its paused copy until the audit passed).
    #[arg(long, default_value = "strict")]
    pub verify: Verify,
    /// Threads of the digest pass (default: the host's CPUs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub digest_threads: Option<u32>,
    /// How long the guest runs before the migration starts, ms.
    #[arg(long, default_value_t = 300)]
    pub warmup_ms: u64,
    /// Seed of the guest's random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the statistics here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG of the rounds into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Stop this process (SIGSTOP) at a phase boundary (tests: docs/migration.md).
    #[arg(long, hide = true)]
    pub stop_at: Option<String>,
}

impl OutgoingArgs {
    /// The progress timeout.
    pub fn progress_timeout(&self) -> Duration {
        let default = if self.timeout_s > 0 { self.timeout_s.min(10) } else { 10 };
        Duration::from_secs_f64(self.progress_timeout_s.unwrap_or(default as f64).max(0.001))
    }
}

/// The description of the VM `a` asks for.
fn describe(a: &OutgoingArgs) -> Result<VmDescription, String> {
    let lock = a.lock.spec()?;
    Ok(VmDescription {
        backend: a.backend,
        mmu: a.mmu.to_string(),
        fast_page_fault: !a.no_fast_page_fault,
        eager_page_split: a.tdp.eager_page_split(),
        pml: a.tdp.pml,
        dirty_log: a.dirty_log.to_string(),
        initially_set: a.knobs.initially_set,
        ring_entries: a.knobs.ring_entries,
        harvest_threads: a.harvest_threads,
        clear_chunk_pages: a.knobs.clear_chunk_pages,
        vcpus: a.vcpus,
        guest_bytes: a.guest_mib << 20,
        random: a.workload == Workload::Random,
        write_pct: a.write_pct,
        seed: a.seed,
        dirty_rate: a.dirty_rate_mibps.map(|r| r << 20),
        lock_faults: lock,
        compute_vcpus: a.compute_vcpus,
    })
}

/// Runs a migrate command; returns its exit code (module docs).
pub fn main(cmd: &MigrateCommand) -> Result<u8, Box<dyn std::error::Error>> {
    match cmd {
        MigrateCommand::Incoming(a) => incoming(a),
        MigrateCommand::Outgoing(a) => outgoing(a),
        MigrateCommand::Control(a) => control(a),
    }
}

/// `--stop-at`: stops this process (SIGSTOP) at the phase named.
fn stop_at(stop_at: Option<&str>, phase: Phase) {
    if stop_at == Some(phase.to_string().as_str()) {
        eprintln!("stopping at {phase} (--stop-at)");
        // SAFETY: raise(3) has no memory-safety preconditions; SIGSTOP stops
        // the whole process until a SIGCONT (or a kill).
        unsafe { libc::raise(libc::SIGSTOP) };
    }
}

/// The source's hooks: the round lines, `--stop-at`, the guest's pace.
struct SourceCli<'a> {
    stop_at: Option<&'a str>,
    rounds: &'a mut dyn FnMut(&MigrationStats),
    pacing: PassPacing,
}

impl SourceHooks<dyn PassVm> for SourceCli<'_> {
    fn round(&mut self, stats: &MigrationStats) {
        (self.rounds)(stats);
    }

    fn phase(&mut self, phase: Phase) {
        self.pacing.phase(phase);
        stop_at(self.stop_at, phase);
    }

    fn tick(&mut self, vm: &(dyn PassVm + 'static)) {
        self.pacing.tick(vm);
    }
}

/// The destination's hooks: `--stop-at`, and the guest's start at the pace
/// its description gives (`pace`, set when the header came).
struct DestCli<'a> {
    stop_at: Option<&'a str>,
    pace: &'a std::cell::Cell<(Option<u64>, u8)>,
    start: Option<PassStart>,
}

impl DestHooks<dyn PassVm> for DestCli<'_> {
    fn phase(&mut self, phase: Phase) {
        stop_at(self.stop_at, phase);
    }

    fn built(&mut self, vm: &mut (dyn PassVm + 'static)) -> Result<(), BuildError> {
        let (rate, _) = self.pace.get();
        self.start.insert(PassStart::new(rate)).built(vm)
    }

    fn prepare(&mut self, vm: &mut (dyn PassVm + 'static)) -> Result<(), BuildError> {
        self.start.as_mut().expect("built before prepared").prepare(vm)
    }

    fn start(&mut self, vm: &mut (dyn PassVm + 'static)) {
        self.start.as_mut().expect("prepared before the start").start(vm);
    }
}

fn incoming(a: &IncomingArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let public = TcpListener::bind(&a.listen).map_err(|e| format!("listening on {}: {e}", a.listen))?;
    println!("listening on {}", public.local_addr()?);
    std::io::stdout().flush()?;
    // With TLS the migration accepts the pumps' plain ends on a loopback
    // listener (`shadow_mmu_migrate::tls`).
    let tls = a.tls.config()?;
    let tls_listener = match &tls {
        Some(t) => Some(TlsListener::start(public.try_clone()?, t.clone())?),
        None => None,
    };
    let l = tls_listener.as_ref().map_or(&public, |t| t.local());
    let pace = std::cell::Cell::new((None, 100));
    let mut build = |h: &Header| -> Result<Box<dyn PassVm>, BuildError> {
        if h.backend != "engine" && h.backend != "kvm" {
            return Err(BuildError::UnknownBackend { named: h.backend.clone(), runs: "engine or kvm" });
        }
        let d: VmDescription =
            serde_json::from_str(&h.config).map_err(|e| BuildError::Description(Box::new(e)))?;
        if let Some(max) = a.max_guest_mib.map(|m| m << 20).filter(|&m| d.guest_bytes > m) {
            return Err(BuildError::TooLarge { bytes: d.guest_bytes, max });
        }
        pace.set((d.dirty_rate, d.write_pct));
        d.start_destination().map_err(|e| match e {
            DescriptionError::Backend(e) => BuildError::Backend(e),
            e => BuildError::Description(Box::new(e)),
        })
    };
    let progress_timeout = Duration::from_secs(a.progress_timeout_s.max(1));
    let params = IncomingParams { progress_timeout };
    let mut hooks = DestCli { stop_at: a.stop_at.as_deref(), pace: &pace, start: None };
    let (stats, report, code) = match migrate_incoming(l, &mut build, &params, &mut hooks) {
        Ok(mut incoming) => {
            let start = hooks.start.take().expect("a started guest was prepared");
            let run_after = Duration::from_millis(a.run_after_ms);
            let vm = incoming.vm.as_mut();
            let report = check_after_resume(vm, start, &incoming.final_digests, run_after, progress_timeout);
            // The guest ran here for --run-after-ms; this process's run ends.
            vm.stop().map_err(|e| error_chain(&e))?;
            let code = if report.check_after_resume == ResumeCheck::Failed { 4 } else { 0 };
            (incoming.stats, report, code)
        }
        Err(f) => (*f.stats, ResumeReport::default(), 1),
    };
    for line in incoming_lines(&stats, &report) {
        println!("{line}");
    }
    if let Some(e) = &stats.error {
        eprintln!("error: {e}");
    }
    for f in tls.iter().flat_map(|t| t.failures()) {
        eprintln!("tls: {f}");
    }
    if let Some(p) = &a.json {
        // One object: the migration's figures, then the check's.
        let mut v = serde_json::to_value(&stats)?;
        if let (Some(o), serde_json::Value::Object(r)) = (v.as_object_mut(), serde_json::to_value(&report)?) {
            o.extend(r);
        }
        write_json(p, &v)?;
    }
    Ok(code)
}

/// The destination's report: what it received, its checks, what became of
/// the guest ("not checked" where a check did not run).
fn incoming_lines(s: &IncomingStats, r: &ResumeReport) -> Vec<String> {
    let mut l = vec![
        format!("status: {}", s.status.name()),
        match s.status {
            MigrationStatus::Completed => "the guest runs here".to_string(),
            _ => "the guest never ran here; the partial VM is discarded".to_string(),
        },
        format!(
            "received {} kbytes in {} rounds: {} normal pages, {} duplicate",
            s.received_bytes / 1024,
            s.rounds,
            s.normal_pages,
            s.duplicate_pages
        ),
        match (s.mismatched_pages, s.verify_ms) {
            (Some(m), Some(v)) => format!("mismatched pages: {m} (checked in {v:.1} ms)"),
            (Some(m), None) => format!("mismatched pages: {m} (no digest came)"),
            _ => "mismatched pages: not checked".to_string(),
        },
    ];
    let check = match r.check_after_resume {
        ResumeCheck::NotRun => "not run".to_string(),
        ResumeCheck::Passed => "passed".to_string(),
        ResumeCheck::Failed => "FAILED".to_string(),
        ResumeCheck::Inconclusive => "inconclusive".to_string(),
    };
    let note = r.check_note.as_ref().map_or(String::new(), |n| format!(": {n}"));
    l.push(format!("check after resuming: {check}{note}"));
    if let (Some(ms), Some(w), Some(lost), Some(behind)) =
        (r.run_after_ms, r.pages_written_after_resume, r.lost_pages, r.regressed_pages)
    {
        l.push(format!(
            "after resuming, {ms} ms: passes {} -> {}, {w} pages written, {lost} lost, {behind} behind the source",
            r.passes_at_resume.unwrap_or(0),
            r.passes_after_run.unwrap_or(0),
        ));
    }
    l
}

/// Connects to `to`, retrying for up to `within` (the destination may
/// still be starting).
pub fn connect(to: &str, dialer: &Dialer, within: Duration) -> Result<TcpStream, String> {
    let t = Instant::now();
    let addr = to
        .to_socket_addrs()
        .map_err(|e| format!("{to}: {e}"))?
        .next()
        .ok_or_else(|| format!("{to}: no address"))?;
    loop {
        match dialer.connect(addr, within) {
            Ok(c) => return Ok(c),
            // A TLS refusal is an answer: no point asking again.
            Err(e) if !matches!(e, TlsError::Io(_)) || t.elapsed() > within => {
                return Err(format!("connecting to {to}: {}", error_chain(&e)));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// How the source dials `a.to`: plain, or TLS with `a`'s credentials.
fn dialer(a: &OutgoingArgs) -> Result<Dialer, String> {
    let Some(tls) = a.tls.config()? else { return Ok(Dialer::default()) };
    let addr = a.to.to_socket_addrs().map_err(|e| format!("{}: {e}", a.to))?.next();
    let addr = addr.ok_or_else(|| format!("{}: no address", a.to))?;
    let host = a.to.rsplit_once(':').map_or(a.to.as_str(), |(h, _)| h).trim_matches(['[', ']']);
    Ok(Dialer::tls(tls, a.tls_hostname.clone().unwrap_or_else(|| host.to_string()), addr))
}

/// The source's parameters from its arguments.
pub fn outgoing_params(a: &OutgoingArgs, desc: &VmDescription) -> Result<OutgoingParams, String> {
    Ok(OutgoingParams {
        dialer: dialer(a)?,
        downtime_limit: Duration::from_millis(a.downtime_limit_ms),
        max_bandwidth: Some(a.max_bandwidth_mibps << 20).filter(|&b| b > 0),
        timeout: Some(Duration::from_secs(a.timeout_s)),
        on_timeout: match a.on_timeout {
            TimeoutAction::Cancel => OnTimeout::Cancel,
            TimeoutAction::Force => OnTimeout::Force,
        },
        auto_converge: a.auto_converge,
        dirty_limit: a.dirty_limit_mibps.map(|l| l << 20),
        precopy: a.precopy,
        verify: a.verify,
        digest_threads: a.digest_threads.map(|n| n as usize),
        connections: a.connections,
        clear_chunk_pages: desc.clear_chunk_pages,
        progress_timeout: a.progress_timeout(),
        settle_timeout: Duration::from_secs_f64(a.settle_timeout_s.max(0.0)),
        ..OutgoingParams::default()
    })
}

fn outgoing(a: &OutgoingArgs) -> Result<u8, Box<dyn std::error::Error>> {
    if a.backend == BackendKind::Kvm && a.guest_mib > 2048 {
        return Err(format!("--guest-mib {}: KVM's test slot holds at most 2048", a.guest_mib).into());
    }
    let desc = describe(a)?;
    let mut vm = desc.boot()?;
    let mut pacer = shadow_mmu_testkit::pacer::Pacer::new(vm.as_ref(), desc.dirty_rate)?;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(a.warmup_ms) {
        pacer.tick(vm.as_ref());
        std::thread::sleep(Duration::from_millis(1));
    }
    let header = desc.header(vm.as_ref())?;
    let params = outgoing_params(a, &desc)?;
    let socket = a.control_socket.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("shadow-mmu-migrate-{}.sock", std::process::id()))
    });
    println!("migrating {} ({}) to {}", vm.name(), header.config, a.to);
    println!("control socket (if the outcome is unknown): {}", socket.display());
    std::io::stdout().flush()?;
    let conn = connect(&a.to, &params.dialer, params.progress_timeout)?;
    let bar = crate::output::Progress::spinner("round 0: the bulk copy");
    let mut progress = |s: &MigrationStats| {
        let r = s.rounds.last().expect("a round");
        bar.line(format!(
            "round {:3}: {:7} pages, {:7} kbytes in {:7.1} ms, harvest {:6.2} ms, {:.0} mbps, remaining {} kbytes, throttle {}%",
            r.round,
            r.pages_harvested,
            r.bytes_sent / 1024,
            r.send_ms,
            r.harvest_ns as f64 / 1e6,
            r.bandwidth_bytes_per_s * 8.0 / 1e6,
            s.remaining_bytes / 1024,
            r.cpu_throttle_percentage
        ));
        bar.step(format!(
            "round {} sent; {} MiB sent, {} MiB dirty",
            r.round + 1,
            s.transferred_bytes >> 20,
            s.remaining_bytes >> 20
        ));
    };
    let pacing = PassPacing::new(vm.as_ref(), desc.dirty_rate)?;
    let mut hooks = SourceCli { stop_at: a.stop_at.as_deref(), rounds: &mut progress, pacing };
    let outcome = migrate_outgoing(vm.as_mut(), &conn, &header, &params, &mut hooks);
    let reached = hooks.pacing.reached();
    bar.finish();
    let rate = GuestRate::of(desc.dirty_rate, reached);
    println!("{}", rate.line());
    drop(conn);
    let report = |stats: &MigrationStats| -> Result<(), Box<dyn std::error::Error>> {
        for l in stats.lines() {
            println!("{l}");
        }
        std::io::stdout().flush()?;
        if let Some(p) = &a.json {
            write_json(p, &serde_json::json!({ "config": desc, "source": stats, "guest_dirty_rate": rate }))?;
        }
        Ok(())
    };
    let (stats, code) = match outcome {
        Outcome::Completed(stats) => {
            vm.stop().map_err(|e| error_chain(&e))?;
            report(&stats)?;
            (stats, 0)
        }
        Outcome::RunsOn(f) => {
            runs_on(vm.as_mut(), &desc);
            vm.stop().map_err(|e| error_chain(&e))?;
            report(&f.stats)?;
            (f.stats, 1)
        }
        Outcome::Unsettled(u) => {
            report(u.stats())?;
            let (stats, code) = postmigrate(u, &mut vm, &desc, &socket)?;
            // What changed since the report above (the JSON whole).
            println!("Migration status: {}", stats.status.name());
            println!("{}", stats.source_vm_line());
            if let Some(p) = &a.json {
                write_json(p, &serde_json::json!({ "config": desc, "source": stats }))?;
            }
            (stats, code)
        }
    };
    if let Some(dir) = &a.plot {
        std::fs::create_dir_all(dir)?;
        let path = crate::plot::migration_rounds(dir, &[(vm.name(), &*stats)])?;
        println!("plot: {}", path.display());
    }
    Ok(code)
}

/// Shows that the source VM runs on: its vCPUs let go, the workload at its
/// own pace (--dirty-rate-mibps) for 300 ms, dirty logging off.
fn runs_on(vm: &mut dyn PassVm, desc: &VmDescription) {
    let before = vm.passes_done();
    let mut pacer = match shadow_mmu_testkit::pacer::Pacer::new(vm, desc.dirty_rate) {
        Ok(p) => p,
        Err(e) => {
            return println!("the source VM runs on, but its pace could not be set: {}", error_chain(&e));
        }
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(300) {
        pacer.tick(vm);
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut bm = vec![0u64; vm.pages().div_ceil(64) as usize];
    let logging = vm.get_dirty_log(&mut bm).is_ok();
    let pace = match desc.dirty_rate {
        None => "flat out".to_string(),
        Some(0) => "idle".to_string(),
        Some(r) => format!("at {} MiB/s", r >> 20),
    };
    println!(
        "the source VM runs on: vCPUs {}, passes {before} -> {} in 300 ms ({pace}), dirty logging {}",
        if vm.vcpu_gate().pause_requested() { "PAUSED" } else { "running" },
        vm.passes_done(),
        if logging { "on" } else { "off" }
    );
}

/// A source whose handover's outcome is unknown: paused, its memory kept,
/// until the operator (or the destination, asked again through the
/// operator's `query`) decides. Serves the control socket; returns the
/// final statistics and the exit code.
fn postmigrate(
    u: Unsettled,
    vm: &mut Box<dyn PassVm>,
    desc: &VmDescription,
    socket: &Path,
) -> Result<(Box<MigrationStats>, u8), Box<dyn std::error::Error>> {
    let _ = std::fs::remove_file(socket);
    let l = UnixListener::bind(socket).map_err(|e| format!("binding {}: {e}", socket.display()))?;
    let me = std::env::current_exe().map_or_else(|_| "shadow-mmu".into(), |p| p.display().to_string());
    let ctl = format!("{me} migrate control --socket {}", socket.display());
    println!("the source VM is paused in postmigrate: the destination may or may not run the guest.");
    println!("  ask the destination again:   {ctl} query");
    println!("  resume the guest here:       {ctl} resume   (only if the destination does not run it)");
    println!("  discard the guest here:      {ctl} discard  (only if the destination runs it)");
    std::io::stdout().flush()?;
    let mut pending = Some(u);
    let done = loop {
        let (conn, _) = l.accept()?;
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line)?;
        let u = pending.take().expect("unsettled until done");
        let (reply, done) = match ControlAction::from_str(line.trim(), true) {
            Ok(ControlAction::Query) => match u.ask(vm.as_mut()) {
                Outcome::Completed(stats) => {
                    vm.stop().map_err(|e| error_chain(&e))?;
                    (control_reply(true, &stats, "the destination runs the guest"), Some((stats, 0)))
                }
                Outcome::RunsOn(f) => {
                    let r = control_reply(true, &f.stats, "the destination aborted; the guest runs here");
                    (r, Some((f.stats, 1)))
                }
                Outcome::Unsettled(again) => {
                    let r = control_reply(false, again.stats(), "still unknown");
                    pending = Some(again);
                    (r, None)
                }
            },
            Ok(ControlAction::Resume) => {
                let stats = u.resume(vm.as_mut());
                (control_reply(true, &stats, "resumed here by the operator"), Some((stats, 3)))
            }
            Ok(ControlAction::Discard) => {
                let stats = u.discard();
                vm.stop().map_err(|e| error_chain(&e))?;
                (control_reply(true, &stats, "discarded here by the operator"), Some((stats, 3)))
            }
            Ok(ControlAction::Status) => {
                let r = control_reply(true, u.stats(), "unknown: paused in postmigrate");
                pending = Some(u);
                (r, None)
            }
            Err(e) => {
                pending = Some(u);
                (serde_json::json!({ "ok": false, "message": e }), None)
            }
        };
        let mut w = &conn;
        writeln!(w, "{reply}")?;
        if let Some(d) = done {
            break d;
        }
    };
    let _ = std::fs::remove_file(socket);
    let (stats, code) = done;
    if stats.source_vm == shadow_mmu_migrate::stats::SourceVm::Running {
        runs_on(vm.as_mut(), desc);
        vm.stop().map_err(|e| error_chain(&e))?;
    }
    Ok((stats, code))
}

/// The control socket's answer: one line of JSON.
fn control_reply(ok: bool, stats: &MigrationStats, message: &str) -> serde_json::Value {
    serde_json::json!({
        "ok": ok,
        "message": message,
        "status": stats.status.name(),
        "source_vm": stats.source_vm,
        "error": stats.error,
    })
}

/// `migrate control`: one action on a source's control socket; prints its
/// answer.
fn control(a: &ControlArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let conn = std::os::unix::net::UnixStream::connect(&a.socket).map_err(|e| {
        format!("connecting to {}: {e} (is a source paused in postmigrate there?)", a.socket.display())
    })?;
    let action = a.action.to_possible_value().expect("a named action");
    let mut w = &conn;
    writeln!(w, "{}", action.get_name())?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    print!("{line}");
    let ok = serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v["ok"].as_bool());
    Ok(if ok == Some(true) { 0 } else { 1 })
}
