//! # shadow-mmu live migration
//!
//! Pre-copy live migration of a VM over TCP between two processes, driven
//! through the `vmm` traits ([`MigrationVm`]) so that neither end knows
//! which backend it drives, nor what the guest runs:
//!
//! - [`stream`]: the wire format, a versioned sequence of length-prefixed,
//!   checksummed frames that a hostile peer cannot make us allocate beyond
//!   [`stream::MAX_FRAME_BYTES`] for;
//! - `link`: a connection that gives up on a silent peer within the
//!   progress timeout (deadlines, keepalive, heartbeats);
//! - [`handover`]: which side runs the guest at the end: the two state
//!   machines of the point of no return, model-checked;
//! - [`ranges`]: what a round sends of a harvest (runs of pages, zero pages
//!   as a flag) and the page digests of the final check;
//! - [`source`]: pre-copy with QEMU's convergence rule, the timeout, the
//!   stop-and-copy, the source's half of the handover;
//! - [`refusal`]: why a destination refuses, on the wire and in errors;
//! - [`dest`]: the destination, which loads, checks, takes the handover,
//!   answers the source's questions, and checks the resumed guest;
//! - [`throttle`]: QEMU's auto-converge throttle;
//! - [`tls`]: mutual TLS on every connection, in pump threads;
//! - `streams`: the extra TCP streams of the pages (QEMU's multifd);
//! - [`stats`]: QEMU's `info migrate` figures.

use shadow_mmu_vmm::{DirtyLog, GuestMemory, HarvestProbe, VcpuControl};

/// `Display` and `FromStr` for an enum of unit variants, from one table of
/// their names (the CLI's `--precopy`, `--verify`: this crate has no clap
/// to derive them with).
macro_rules! named_choices {
    ($t:ident { $($v:ident => $name:literal),+ $(,)? }) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self { $($t::$v => $name),+ })
            }
        }

        impl std::str::FromStr for $t {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok($t::$v),)+
                    _ => Err(format!("{s:?}: {}", [$($name),+].join(" or "))),
                }
            }
        }
    };
}

pub mod dest;
pub mod handover;
pub(crate) mod link;
pub mod ranges;
pub mod refusal;
pub mod source;
pub mod stats;
pub mod stream;
pub(crate) mod streams;
pub mod throttle;
pub mod tls;

/// A point of a migration, at either end, that its hooks hear of
/// the phase boundaries of `docs/migration.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Source: connected, about to send the header.
    Connected,
    /// Source: the destination said `Ready`.
    ReadyReceived,
    /// Source: round `n` is sent.
    RoundSent(u32),
    /// Source: the vCPUs are paused for the stop-and-copy.
    Paused,
    /// Source: `Done` is sent.
    DoneSent,
    /// Source: the destination said `Verified`.
    VerifiedReceived,
    /// Source: `Commit` is sent (or failed to go): the point of no return.
    CommitSent,
    /// Source: the destination said `Running`.
    RunningReceived,
    /// Destination: a source connected.
    Accepted,
    /// Destination: the header came; the VM is to be built.
    HeaderReceived,
    /// Destination: `Ready` is sent.
    ReadySent,
    /// Destination: round `n` begins.
    RoundBegun(u32),
    /// Destination: `Done` came.
    DoneReceived,
    /// Destination: `Verified` is sent.
    VerifiedSent,
    /// Destination: `Commit` came; the guest is about to start.
    CommitReceived,
    /// Destination: the guest runs and `Running` is sent.
    RunningSent,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Connected => f.write_str("connected"),
            Phase::ReadyReceived => f.write_str("ready-received"),
            Phase::RoundSent(n) => write!(f, "round-{n}-sent"),
            Phase::Paused => f.write_str("paused"),
            Phase::DoneSent => f.write_str("done-sent"),
            Phase::VerifiedReceived => f.write_str("verified-received"),
            Phase::CommitSent => f.write_str("commit-sent"),
            Phase::RunningReceived => f.write_str("running-received"),
            Phase::Accepted => f.write_str("accepted"),
            Phase::HeaderReceived => f.write_str("header-received"),
            Phase::ReadySent => f.write_str("ready-sent"),
            Phase::RoundBegun(n) => write!(f, "round-{n}-begun"),
            Phase::DoneReceived => f.write_str("done-received"),
            Phase::VerifiedSent => f.write_str("verified-sent"),
            Phase::CommitReceived => f.write_str("commit-received"),
            Phase::RunningSent => f.write_str("running-sent"),
        }
    }
}

/// What a migration needs of a VM: its memory, its dirty log, its vCPUs'
/// control, and its harvest probe (which may measure nothing). Nothing of
/// the guest's workload.
pub trait MigrationVm: GuestMemory + DirtyLog + VcpuControl + HarvestProbe {}

impl<T: GuestMemory + DirtyLog + VcpuControl + HarvestProbe + ?Sized> MigrationVm for T {}

/// What the caller of [`source::migrate_outgoing`] hears and does while it
/// runs: the statistics after each round, each [`Phase`], and whatever it
/// does with the running guest between frames (a test workload's pacing).
/// `()` hears nothing and does nothing.
pub trait SourceHooks<V: ?Sized> {
    /// After each pre-copy round, the statistics so far.
    fn round(&mut self, _stats: &stats::MigrationStats) {}
    /// At each phase boundary.
    fn phase(&mut self, _phase: Phase) {}
    /// Between two frames of pre-copy, while the guest runs here.
    fn tick(&mut self, _vm: &V) {}
}

impl<V: ?Sized> SourceHooks<V> for () {}

/// What the caller of [`dest::migrate_incoming`] hears, and how the guest
/// starts here: the migration knows the VM's vCPUs only to restore them.
pub trait DestHooks<V: ?Sized> {
    /// At each phase boundary.
    fn phase(&mut self, _phase: Phase) {}
    /// The VM was built and its layout accepted, before `Ready`: what need
    /// not wait for the pages (a dirty log to watch the guest with once it
    /// runs) is set up now, outside the downtime.
    fn built(&mut self, _vm: &mut V) -> Result<(), dest::BuildError> {
        Ok(())
    }
    /// Every page matched and every vCPU took its state: the last moment to
    /// refuse (the error is the source's refusal), before `Verified` tells
    /// the source it may commit. Whatever must hold before the guest runs
    /// here and could not be set up at `built` is set up now, inside the
    /// downtime.
    fn prepare(&mut self, _vm: &mut V) -> Result<(), dest::BuildError> {
        Ok(())
    }
    /// The source committed: the guest is restored (each vCPU holds its
    /// state) and must run here from now on. Let its vCPUs go.
    fn start(&mut self, vm: &mut V);
}
