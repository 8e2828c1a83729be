//! `shadow-mmu migrate incoming|outgoing`: live migration between two
//! processes over TCP, on the engine or on the machine's KVM. The CLI is
//! what knows the backends: it describes the VM in the stream's header
//! ([`VmDescription`], JSON) and builds it again at the destination; the
//! migration itself (`shadow_mmu_migrate`) drives whatever it is given.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use engine::{MmuDesign, VmConfig};
use serde::{Deserialize, Serialize};
use shadow_mmu_migrate::dest::{IncomingParams, IncomingVm, migrate_incoming};
use shadow_mmu_migrate::source::{OnTimeout, OutgoingParams, migrate_outgoing};
use shadow_mmu_migrate::stats::MigrationStats;
use shadow_mmu_migrate::stream::{Header, SlotLayout, VERSION};
use testkit::backend::error_chain;
use testkit::backend::{Backend, EngineBackend, PassSpec, PassVm};
use testkit::interface::{DirtyLogInterface, HarvestSpec};

use crate::harvest_args::HarvestKnobs;

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// The destination: listens, builds the VM the stream's header
    /// describes, loads and checks it, resumes the guest and checks it again.
    Incoming(IncomingArgs),
    /// The source: boots a VM, lets its workload run, migrates it.
    Outgoing(Box<OutgoingArgs>),
}

/// Where the VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Where {
    /// The engine, in the design of `--mmu`.
    Engine,
    /// The machine's KVM (`/dev/kvm`).
    Kvm,
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
}

#[derive(Debug, Args)]
pub struct OutgoingArgs {
    /// The destination's address.
    #[arg(long)]
    pub to: String,
    /// Where the VM runs.
    #[arg(long, value_enum, default_value = "engine")]
    pub backend: Where,
    /// The engine's dirty-logging design.
    #[arg(long, default_value = "lockless")]
    pub mmu: MmuDesign,
    /// Turn the engine's `fast_page_fault` off.
    #[arg(long)]
    pub no_fast_page_fault: bool,
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
    /// Give pre-copy this long, s.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// What to do at the timeout.
    #[arg(long, value_enum, default_value = "cancel")]
    pub on_timeout: TimeoutAction,
    /// QEMU's auto-converge: throttle the vCPUs 20%, then 10% more each round
    /// that does not converge, up to 99%.
    #[arg(long)]
    pub auto_converge: bool,
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
}

/// The VM, as the stream's header carries it (JSON in `Header::config`):
/// what the destination needs to build the same VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// Where it runs.
    pub backend: Where,
    /// The engine's design.
    pub mmu: String,
    /// The engine's `fast_page_fault`.
    pub fast_page_fault: bool,
    /// The dirty-log interface.
    pub dirty_log: String,
    /// `KVM_DIRTY_LOG_INITIALLY_SET`.
    pub initially_set: bool,
    /// Ring entries per vCPU.
    pub ring_entries: u32,
    /// Harvest threads.
    pub harvest_threads: u32,
    /// CLEAR window, pages.
    pub clear_chunk_pages: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest bytes.
    pub guest_bytes: u64,
    /// Random pages rather than a sweep.
    pub random: bool,
    /// Stores, percent.
    pub write_pct: u8,
    /// The workload's seed.
    pub seed: u64,
    /// The dirty-rate cap, bytes a second.
    pub dirty_rate: Option<u64>,
}

impl VmDescription {
    pub fn of(a: &OutgoingArgs) -> Self {
        Self {
            backend: a.backend,
            mmu: a.mmu.to_string(),
            fast_page_fault: !a.no_fast_page_fault,
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
        }
    }

    /// The harvest spec it asks for, checked.
    fn harvest(&self) -> Result<HarvestSpec, String> {
        let interface: DirtyLogInterface = self.dirty_log.parse().map_err(|e| format!("{e}"))?;
        let spec = HarvestSpec {
            interface,
            clear_chunk_pages: self.clear_chunk_pages,
            initially_set: self.initially_set && interface == DirtyLogInterface::Clear,
            ring_entries: self.ring_entries,
            harvest_threads: self.harvest_threads,
        };
        spec.validate().map_err(|e| e.to_string())?;
        Ok(spec)
    }

    /// The backend that builds it.
    fn backend(&self) -> Result<Box<dyn Backend>, String> {
        let spec = self.harvest()?;
        let ring = spec.ring_bytes().map(|b| b / 16);
        Ok(match self.backend {
            Where::Engine => {
                let mmu: MmuDesign = self.mmu.parse().map_err(|e| format!("--mmu {}: {e}", self.mmu))?;
                let config = VmConfig {
                    mmu,
                    fast_page_fault: self.fast_page_fault,
                    dirty_log_protect: spec.protect(),
                    harvest_threads: spec.harvest_threads,
                    ..VmConfig::default()
                };
                Box::new(EngineBackend { config, dirty_ring: ring })
            }
            Where::Kvm => Box::new(shadow_mmu_kvm::KvmBackend { protect: spec.protect(), dirty_ring: ring }),
        })
    }

    fn pass_spec(&self) -> PassSpec {
        PassSpec {
            vcpus: self.vcpus,
            guest_bytes: self.guest_bytes,
            write_pct: self.write_pct,
            random: self.random,
            seed: self.seed,
            dirty_pages: None,
        }
    }

    /// Builds and starts the VM, vCPUs waiting for their first release.
    fn start(&self) -> Result<Box<dyn PassVm>, String> {
        self.backend()?.start_passes(&self.pass_spec()).map_err(|e| error_chain(&e))
    }

    /// Builds the VM and boots it: a first pass, so that every page holds
    /// data.
    pub fn boot(&self) -> Result<Box<dyn PassVm>, String> {
        let vm = self.start()?;
        vm.release(1);
        vm.wait_passes(0).map_err(|e| error_chain(&e))?;
        Ok(vm)
    }

    /// The stream's header for `vm`, built from this description.
    pub fn header(&self, vm: &dyn PassVm) -> Result<Header, serde_json::Error> {
        Ok(Header {
            version: VERSION,
            page_size: 4096,
            backend: match self.backend {
                Where::Engine => "engine".into(),
                Where::Kvm => "kvm".into(),
            },
            config: serde_json::to_string(self)?,
            slots: vec![SlotLayout { id: 0, guest_phys_addr: 0, pages: vm.pages() }],
        })
    }

    /// Bytes a pass of the guest stores to (one 8-byte store per page of
    /// `write_pct`% of them; a page dirtied counts 4 KiB).
    pub fn pass_bytes(&self) -> f64 {
        self.guest_bytes as f64 * f64::from(self.write_pct) / 100.0
    }
}

pub fn main(cmd: &MigrateCommand) -> Result<bool, Box<dyn std::error::Error>> {
    match cmd {
        MigrateCommand::Incoming(a) => incoming(a),
        MigrateCommand::Outgoing(a) => outgoing(a),
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .map_err(|e| format!("writing {}: {e}", path.display()).into())
}

fn incoming(a: &IncomingArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let l = TcpListener::bind(&a.listen).map_err(|e| format!("listening on {}: {e}", a.listen))?;
    println!("listening on {}", l.local_addr()?);
    std::io::stdout().flush()?;
    let (conn, peer) = l.accept()?;
    println!("incoming migration from {peer}");
    let mut build = |h: &Header| {
        if h.backend != "engine" && h.backend != "kvm" {
            return Err(format!("backend {:?}: this destination runs engine or kvm", h.backend));
        }
        let d: VmDescription =
            serde_json::from_str(&h.config).map_err(|e| format!("the header's VM description: {e}"))?;
        if let Some(max) = a.max_guest_mib.filter(|&m| d.guest_bytes > m << 20) {
            return Err(format!(
                "a guest of {} MiB: this destination takes at most {max} MiB (--max-guest-mib)",
                d.guest_bytes >> 20
            ));
        }
        let vm = d.start()?;
        Ok(IncomingVm { vm, dirty_rate: d.dirty_rate, write_pct: d.write_pct })
    };
    let params = IncomingParams { run_after: Duration::from_millis(a.run_after_ms) };
    let (stats, ok) = match migrate_incoming(&conn, &mut build, &params) {
        Ok((stats, mut vm)) => {
            vm.stop().map_err(|e| error_chain(&e))?;
            (stats, true)
        }
        Err(f) => {
            eprintln!("error: {}", error_chain(&f));
            (*f.stats, false)
        }
    };
    println!("status: {}", stats.status);
    println!(
        "received {} kbytes in {} rounds: {} normal pages, {} duplicate",
        stats.received_bytes / 1024,
        stats.rounds,
        stats.normal_pages,
        stats.duplicate_pages
    );
    println!("mismatched pages: {} (checked in {:.1} ms)", stats.mismatched_pages, stats.verify_ms);
    if stats.run_after_ms > 0 {
        println!(
            "after resuming, {} ms: passes {} -> {}, {} pages written, {} lost, {} behind the source",
            stats.run_after_ms,
            stats.passes_at_resume,
            stats.passes_after_run,
            stats.pages_written_after_resume,
            stats.lost_pages,
            stats.regressed_pages
        );
    }
    if let Some(p) = &a.json {
        write_json(p, &serde_json::to_value(&stats)?)?;
    }
    Ok(ok)
}

/// Connects to `to`, retrying for a while (the destination may still be
/// starting).
pub fn connect(to: &str) -> Result<TcpStream, String> {
    let t = Instant::now();
    loop {
        match TcpStream::connect(to) {
            Ok(c) => return Ok(c),
            Err(e) if t.elapsed() > Duration::from_secs(10) => {
                return Err(format!("connecting to {to}: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn outgoing(a: &OutgoingArgs) -> Result<bool, Box<dyn std::error::Error>> {
    if a.backend == Where::Kvm && a.guest_mib > 2048 {
        return Err(format!("--guest-mib {}: KVM's test slot holds at most 2048", a.guest_mib).into());
    }
    let desc = VmDescription::of(a);
    let mut vm = desc.boot()?;
    let mut pacer = shadow_mmu_migrate::pacer::Pacer::new(vm.as_ref(), desc.dirty_rate, desc.write_pct);
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(a.warmup_ms) {
        pacer.tick(vm.as_ref());
        std::thread::sleep(Duration::from_millis(1));
    }
    let header = desc.header(vm.as_ref())?;
    let params = OutgoingParams {
        downtime_limit: Duration::from_millis(a.downtime_limit_ms),
        max_bandwidth: Some(a.max_bandwidth_mibps << 20).filter(|&b| b > 0),
        timeout: Some(Duration::from_secs(a.timeout_s)),
        on_timeout: match a.on_timeout {
            TimeoutAction::Cancel => OnTimeout::Cancel,
            TimeoutAction::Force => OnTimeout::Force,
        },
        auto_converge: a.auto_converge,
        dirty_rate: desc.dirty_rate,
        write_pct: desc.write_pct,
        clear_chunk_pages: desc.clear_chunk_pages,
        ..OutgoingParams::default()
    };
    println!("migrating {} ({}) to {}", vm.name(), header.config, a.to);
    let conn = connect(&a.to)?;
    let bar = crate::bench::Progress::spinner("round 0: the bulk copy");
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
    let r = migrate_outgoing(vm.as_mut(), &conn, &header, &params, &mut progress);
    bar.finish();
    let (stats, ok) = match r {
        Ok(stats) => {
            vm.stop().map_err(|e| error_chain(&e))?;
            (stats, true)
        }
        Err(f) => {
            eprintln!("error: {}", error_chain(&f));
            // The source runs on: show it.
            let before = vm.passes_done();
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(300) {
                pacer.at_least(vm.as_ref(), 1);
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut bm = vec![0u64; vm.pages().div_ceil(64) as usize];
            let logging = vm.get_dirty_log(&mut bm).is_ok();
            println!(
                "the source VM runs on: passes {before} -> {}, dirty logging {}",
                vm.passes_done(),
                if logging { "on" } else { "off" }
            );
            vm.stop().map_err(|e| error_chain(&e))?;
            (*f.stats, false)
        }
    };
    for l in stats.lines() {
        println!("{l}");
    }
    if let Some(p) = &a.json {
        write_json(p, &serde_json::json!({ "config": desc, "source": stats }))?;
    }
    if let Some(dir) = &a.plot {
        std::fs::create_dir_all(dir)?;
        let path = crate::plot::migration_rounds(dir, &[(vm.name(), &stats)])?;
        println!("plot: {}", path.display());
    }
    Ok(ok)
}
