//! # shadow-mmu live migration
//!
//! Pre-copy live migration of a VM over TCP between two processes, driven
//! through the `vmm` traits ([`PassVm`](shadow_mmu_vmm::PassVm)) so that
//! neither end knows which backend it drives:
//!
//! - [`stream`]: the wire format, a versioned sequence of length-prefixed,
//!   checksummed frames that a hostile peer cannot make us allocate beyond
//!   [`stream::MAX_FRAME_BYTES`] for;
//! - [`link`]: a connection that gives up on a silent peer within the
//!   progress timeout (deadlines, keepalive, heartbeats);
//! - [`handover`]: which side runs the guest at the end: the two state
//!   machines of the point of no return, model-checked;
//! - [`ranges`]: what a round sends of a harvest (runs of pages, zero pages
//!   as a flag) and the page digests of the final check;
//! - [`source`]: pre-copy with QEMU's convergence rule, the timeout, the
//!   stop-and-copy, the source's half of the handover;
//! - [`dest`]: the destination, which loads, checks, takes the handover,
//!   answers the source's questions, and checks the resumed guest;
//! - [`pacer`]: the guest's dirty rate, and QEMU's auto-converge throttle;
//! - [`stats`]: QEMU's `info migrate` figures.

pub mod dest;
pub mod handover;
pub mod link;
pub mod pacer;
pub mod ranges;
pub mod source;
pub mod stats;
pub mod stream;

/// A point of a migration, at either end, that an [`Observer`] hears of:
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

/// Hears what a migration does, at either end: the statistics after each
/// round (the source's), and each [`Phase`]. `()` hears nothing.
pub trait Observer {
    /// After each pre-copy round, the statistics so far.
    fn round(&mut self, _stats: &stats::MigrationStats) {}
    /// At each phase boundary.
    fn phase(&mut self, _phase: Phase) {}
}

impl Observer for () {}
