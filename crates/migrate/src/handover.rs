//! The handover: which side runs the guest once the source has sent it
//! all. Two small state machines, with no I/O, that the source
//! ([`crate::source`]) and the destination ([`crate::dest`]) drive, and that
//! the model checker in this module's tests drives the same way.
//!
//! # The protocol
//!
//! ```text
//!        source                                   destination
//!   Sending  ── Done ─────────────────────────▶  Receiving
//!      │                                             │ every page matched its
//!      │                                             │ digest, every vCPU took
//!      │                                             ▼ its state
//!   AwaitVerified ◀──────────────────── Verified ── Prepared
//!      │ (point of no return)                        │
//!      ▼                                             │
//!   Committed ── Commit ──────────────────────────▶  │ (point of no return)
//!      │                                             ▼
//!      │ ◀────────────────────────────── Running ── Running (guest started)
//!      ▼
//!   Completed ── Settled ─────────────────────────▶  (stops answering)
//!
//!   on a failure (the link, a deadline, a corrupt frame):
//!   Sending, AwaitVerified ──▶ RunsOn       Receiving, Prepared ──▶ Aborted
//!   Committed ──▶ Settling: Query ──▶ (new connection) ──▶ Status(Running|Aborted)
//!   Settling ── window over ──▶ Postmigrate (paused; the operator decides)
//! ```
//!
//! A `Query` that finds the destination in `Receiving` or `Prepared`
//! aborts it first (it fences the late `Commit`), then answers. `Running`
//! and `Aborted` are final at the destination; `Completed`, `RunsOn` and
//! `Discarded` at the source.
//!
//! # Why it is safe
//!
//! - **At most one side ever runs the guest.** The destination starts the
//!   guest only on `Commit`. The source resumes only (a) before it sends
//!   `Commit`, when the destination cannot have it, or (b) when the
//!   destination said `Aborted`, which it says only from its final
//!   `Aborted` state, where a later `Commit` is refused. A `Commit` lost,
//!   delayed or corrupted leaves the source in `Committed`, which never
//!   resumes on its own: it asks.
//! - **The protocol never loses the guest.** The source discards its
//!   paused copy only on `Running`, which the destination says only from
//!   its final `Running` state. The destination leaves `Running` for
//!   nothing: the checks after the resume report, they do not stop the
//!   guest.
//! - **What the source cannot know, it says.** With no answer within the
//!   settle window (the destination killed, stopped, or cut off after the
//!   source sent `Commit`), the source stays paused in `Postmigrate`, its
//!   memory kept, and an operator resumes or discards it
//!   (`docs/migration.md` says when each is right).
//!
//! Messages carry the migration's id (`Commit`, `Running`, `Query`,
//! `Status`, `Settled`), so that nothing of another migration is taken for
//! this one's; every frame carries a CRC, so a corrupted one is a failure
//! of the link, never another message.

use shadow_mmu_core::breakage::Breakage;

/// What a destination says of a migration, asked by its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Answer {
    /// It knows no migration of that id (another process, or one that has
    /// not read the header): proves nothing.
    Unknown,
    /// It runs the guest (final).
    Running,
    /// It will never run the guest (final).
    Aborted,
}

impl Answer {
    /// The byte it travels as.
    pub fn to_byte(self) -> u8 {
        match self {
            Answer::Unknown => 0,
            Answer::Running => 1,
            Answer::Aborted => 2,
        }
    }

    /// The answer a byte names, if any.
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Answer::Unknown,
            1 => Answer::Running,
            2 => Answer::Aborted,
            _ => return None,
        })
    }
}

/// Where the source is in the handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceState {
    /// Pre-copy and the stop-and-copy, up to `Done`: the destination
    /// cannot run the guest yet, so any failure resumes it here.
    Sending,
    /// `Done` sent: waiting for `Verified`.
    AwaitVerified,
    /// `Commit` sent (the point of no return): waiting for `Running`.
    Committed,
    /// No answer on the migration's connection: asking the destination over
    /// new ones, for the settle window.
    Settling,
    /// Paused, the memory kept, the outcome unknown: the operator decides
    /// (QEMU's `postmigrate` run state).
    Postmigrate,
    /// The destination runs the guest; the copy here is discarded (final).
    Completed,
    /// The guest runs here again (final).
    RunsOn,
    /// The operator discarded the paused copy (final).
    Discarded,
}

/// What happened to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceEvent {
    /// It sent `Done`.
    DoneSent,
    /// The destination said `Verified`.
    Verified,
    /// The destination said it runs the guest (its `Running`, or a query's
    /// answer).
    Running,
    /// The destination said it never will (a `Refuse`, or a query's
    /// answer).
    Aborted,
    /// The link failed, a deadline passed, or a frame came corrupt or out
    /// of turn (a query's attempt, in `Settling` and `Postmigrate`).
    Failed,
    /// The settle window is over.
    SettleExpired,
    /// The operator resumes the paused copy.
    OperatorResume,
    /// The operator discards it.
    OperatorDiscard,
}

/// What the source must do on a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceAction {
    /// Nothing.
    None,
    /// Send `Commit` (the state is `Committed` before the first byte goes).
    SendCommit,
    /// Ask the destination over a new connection.
    Query,
    /// Resume the vCPUs here.
    Resume,
    /// Discard the paused copy.
    Discard,
    /// Report `Postmigrate` and wait for the operator.
    AwaitOperator,
}

impl SourceState {
    /// The transition on `event`, and what to do.
    pub fn on(self, event: SourceEvent, breakage: &Breakage) -> (SourceState, SourceAction) {
        use SourceAction as A;
        use SourceEvent as E;
        use SourceState as S;
        match (self, event) {
            (S::Sending, E::DoneSent) => (S::AwaitVerified, A::None),
            // Before `Commit`, the destination cannot run the guest: nothing
            // it says or fails to say keeps it from running here. (A
            // `Running` before our `Commit` is a peer out of protocol.)
            (S::Sending | S::AwaitVerified, E::Failed | E::Aborted | E::Running) => (S::RunsOn, A::Resume),
            (S::Sending, E::Verified) => (S::RunsOn, A::Resume),
            (S::AwaitVerified, E::Verified) => (S::Committed, A::SendCommit),
            (S::Committed | S::Settling | S::Postmigrate, E::Running) => (S::Completed, A::Discard),
            (S::Committed | S::Settling | S::Postmigrate, E::Aborted) => (S::RunsOn, A::Resume),
            (S::Committed, E::Failed) if breakage.source_resumes_without_answer() => (S::RunsOn, A::Resume),
            // The `Commit` may have arrived: ask, never assume.
            (S::Committed, E::Failed) => (S::Settling, A::Query),
            (S::Settling, E::Failed) => (S::Settling, A::Query),
            (S::Settling, E::SettleExpired) => (S::Postmigrate, A::AwaitOperator),
            (S::Postmigrate, E::OperatorResume) => (S::RunsOn, A::Resume),
            (S::Postmigrate, E::OperatorDiscard) => (S::Discarded, A::Discard),
            // A duplicate `Verified`, a failed query the operator asked for,
            // anything in a final state: no change.
            (s, _) => (s, A::None),
        }
    }

    /// Whether the guest may run here in this state (before the stop of
    /// `Sending` it does).
    pub fn may_run_guest(self) -> bool {
        matches!(self, SourceState::Sending | SourceState::RunsOn)
    }

    /// Whether this side still holds a copy of the guest.
    pub fn holds_guest(self) -> bool {
        !matches!(self, SourceState::Completed | SourceState::Discarded)
    }

    /// Whether the state is final.
    pub fn is_final(self) -> bool {
        matches!(self, SourceState::Completed | SourceState::RunsOn | SourceState::Discarded)
    }
}

/// Where the destination is in the handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestState {
    /// Loading the stream.
    Receiving,
    /// Every page checked and every vCPU restored, `Verified` sent: the
    /// guest starts on `Commit`.
    Prepared,
    /// The guest runs here (final).
    Running,
    /// The partial VM is discarded; the guest never ran here (final).
    Aborted,
}

/// What happened to the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestEvent {
    /// `Done` came, every page matched and every vCPU took its state.
    Checked,
    /// `Done` came, and a check failed.
    CheckFailed,
    /// `Commit` came.
    Commit,
    /// The link failed, a deadline passed, or a frame came corrupt or out of
    /// turn.
    Failed,
    /// The source asked, over a new connection.
    Query,
}

/// What the destination must do on a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestAction {
    /// Nothing.
    None,
    /// Send `Verified`.
    SendVerified,
    /// Start the guest, then send `Running` (again, for a duplicate
    /// `Commit`).
    Start,
    /// Discard the partial VM and say why (`Refuse`) where it still can.
    Abort,
}

impl DestState {
    /// The transition on `event`, and what to do. A `Query` is then
    /// answered with [`DestState::answer`] of the new state.
    pub fn on(self, event: DestEvent) -> (DestState, DestAction) {
        use DestAction as A;
        use DestEvent as E;
        use DestState as S;
        match (self, event) {
            (S::Receiving, E::Checked) => (S::Prepared, A::SendVerified),
            (S::Prepared, E::Commit) => (S::Running, A::Start),
            // A duplicate `Commit`: say `Running` again.
            (S::Running, E::Commit) => (S::Running, A::Start),
            // A query fences: once answered `Aborted`, no `Commit` starts
            // the guest. A `Commit` before `Verified` is out of protocol.
            (S::Receiving | S::Prepared, E::CheckFailed | E::Failed | E::Query | E::Commit) => {
                (S::Aborted, A::Abort)
            }
            // A late `Commit` after the abort: say so again.
            (S::Aborted, E::Commit) => (S::Aborted, A::Abort),
            // A duplicate `Done`; a failure after the decision; a query of a
            // final state.
            (s, _) => (s, A::None),
        }
    }

    /// What a query hears in this state (after [`DestState::on`] moved a
    /// non-final state to `Aborted`).
    pub fn answer(self) -> Answer {
        match self {
            DestState::Running => Answer::Running,
            DestState::Aborted => Answer::Aborted,
            DestState::Receiving | DestState::Prepared => Answer::Unknown,
        }
    }
}

#[cfg(test)]
mod model;
