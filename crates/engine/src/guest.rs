//! What a vCPU runs: a guest program that produces memory accesses.
//!
//! A real guest is a stream of instructions; what the MMU sees of it is a
//! stream of loads and stores to guest physical addresses. A [`GuestCode`]
//! produces that stream, and the vCPU executes each access through its TLB,
//! the shadow page tables and, when needed, the page fault handler, landing
//! in host memory. A hypercall ends [`crate::Vcpu::run`] and returns to the
//! host, like the `ucall`s of KVM's selftests.

/// One step of a guest program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestOp {
    /// Load 8 bytes from an 8-aligned guest physical address.
    Read(u64),
    /// Store 8 bytes: (address, value).
    Write(u64, u64),
    /// Switch to another address space (a guest context switch: our stand-in
    /// for loading CR3 under shadow paging). Flushes this vCPU's TLB.
    SetAddressSpace(u16),
    /// Exit to the host with a code.
    Hypercall(u64),
}

/// A guest program.
pub trait GuestCode {
    /// The next operation. `last_read` is the value of the most recent
    /// [`GuestOp::Read`] (0 before the first).
    fn next_op(&mut self, last_read: u64) -> GuestOp;
}

impl<G: GuestCode + ?Sized> GuestCode for &mut G {
    fn next_op(&mut self, last_read: u64) -> GuestOp {
        (**self).next_op(last_read)
    }
}

/// A guest program made of a fixed list of operations, then a hypercall
/// with code 0. For tests.
#[derive(Debug, Clone, Default)]
pub struct Script {
    ops: std::collections::VecDeque<GuestOp>,
    /// Values of the reads executed so far.
    pub reads: Vec<u64>,
    pending_read: bool,
}

impl Script {
    /// A script of `ops`.
    pub fn new(ops: impl IntoIterator<Item = GuestOp>) -> Self {
        Self { ops: ops.into_iter().collect(), reads: Vec::new(), pending_read: false }
    }
}

impl GuestCode for Script {
    fn next_op(&mut self, last_read: u64) -> GuestOp {
        if std::mem::take(&mut self.pending_read) {
            self.reads.push(last_read);
        }
        let op = self.ops.pop_front().unwrap_or(GuestOp::Hypercall(0));
        self.pending_read = matches!(op, GuestOp::Read(_));
        op
    }
}
