//! Test-only switches, each breaking one rule of the design, to show that
//! the tests catch it (`--features break-rules`; never in a shipped build).
//!
//! With the feature off this module is empty and no check is compiled in.
//! With it on, each switch is off unless a test sets it in
//! [`crate::VmConfig::breakage`].

/// Which rules to break.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Breakage {
    /// `get_dirty_log` does not flush remote TLBs after write-protecting: a
    /// vCPU keeps writing through its stale writable TLB entry, unlogged.
    pub skip_get_dirty_log_flush: bool,
    /// `get_dirty_log` harvests bits without write-protecting the pages:
    /// the next write to them does not fault, and is not logged.
    pub skip_write_protect: bool,
}
