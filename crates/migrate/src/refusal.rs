//! [`Refusal`]: why a destination will not run the guest, as it travels in
//! a `Refuse` frame and as the source reports it.
//!
//! Each variant is a wire code ([`Refusal::code`]); the stream encodes the
//! fields after it ([`crate::stream`]). A cause that belongs to the
//! destination's own types (its VM, its builder, its stream) crosses the
//! wire as text: its type stays on the machine that raised it, and the
//! source reports it as it came.

use thiserror::Error;

use crate::stream::{PAGE_BYTES, SlotLayout};

/// Why a destination refused a migration, or aborted one before its
/// commit: it will never run this guest.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// Another migration holds this destination.
    #[error("this destination is busy with another migration")]
    Busy,
    /// The header's memslots or page size are not those of the VM built
    /// for it.
    #[error(
        "memslot layout {theirs:?} of {page_size}-byte pages: this VM has {ours:?} of {PAGE_BYTES}-byte pages"
    )]
    Layout {
        /// The header's slots.
        theirs: Vec<SlotLayout>,
        /// The header's page size.
        page_size: u32,
        /// The slots of the VM the destination built.
        ours: Vec<SlotLayout>,
    },
    /// The destination could not build, or prepare, the VM the header
    /// describes.
    #[error("its VM could not be built: {cause}")]
    Build {
        /// The destination's error, as text.
        cause: String,
    },
    /// The destination's VM refused an operation (loading memory,
    /// restoring a vCPU).
    #[error("its VM refused: {cause}")]
    Backend {
        /// The destination's error, as text.
        cause: String,
    },
    /// The stream broke, went silent or came corrupt at the destination.
    #[error("its stream failed: {cause}")]
    Stream {
        /// The destination's error, as text.
        cause: String,
    },
    /// Pages came after the final digests.
    #[error("pages after the final digests")]
    PagesAfterDigests,
    /// A page range outside the VM's memory.
    #[error("pages {first}..+{pages} of slot {slot}: outside the VM's slot 0 of {slot_pages} pages")]
    PagesOutside {
        /// The frame's slot.
        slot: u32,
        /// First page of the range.
        first: u64,
        /// Pages in the range.
        pages: u32,
        /// Pages in the VM's slot 0.
        slot_pages: u64,
    },
    /// Digests of pages outside the VM's memory.
    #[error("digests of slot {slot} pages {first}..+{count}: outside its {slot_pages} pages")]
    DigestsOutside {
        /// The frame's slot.
        slot: u32,
        /// First page.
        first: u64,
        /// Digests in the frame.
        count: u32,
        /// Pages in the VM's slot 0.
        slot_pages: u64,
    },
    /// A state for a vCPU the VM does not have.
    #[error("a state for vCPU {vcpu}: this VM has {vcpus}")]
    VcpuOutside {
        /// The frame's vCPU.
        vcpu: u32,
        /// vCPUs of the VM.
        vcpus: u32,
    },
    /// `Done` came before the state of every vCPU.
    #[error("the stream ended without the state of all {vcpus} vCPUs")]
    MissingVcpuStates {
        /// vCPUs of the VM.
        vcpus: u32,
    },
    /// Pages differ from the source's final digests (or have none).
    #[error("{pages} pages differ from the source's final memory")]
    Mismatch {
        /// Pages that differ.
        pages: u64,
    },
    /// The source asked what became of the migration before its commit
    /// came: the question fenced the commit, so it aborted.
    #[error("the source asked for the outcome before its commit came")]
    QueriedBeforeCommit,
    /// No commit came within the progress timeout.
    #[error("no commit came: {cause}")]
    NoCommit {
        /// The destination's error, as text.
        cause: String,
    },
}

impl Refusal {
    /// Its code on the wire (the stream's decoder reads the same table).
    pub fn code(&self) -> u8 {
        match self {
            Refusal::Busy => 1,
            Refusal::Layout { .. } => 2,
            Refusal::Build { .. } => 3,
            Refusal::Backend { .. } => 4,
            Refusal::Stream { .. } => 5,
            Refusal::PagesAfterDigests => 6,
            Refusal::PagesOutside { .. } => 7,
            Refusal::DigestsOutside { .. } => 8,
            Refusal::VcpuOutside { .. } => 9,
            Refusal::MissingVcpuStates { .. } => 10,
            Refusal::Mismatch { .. } => 11,
            Refusal::QueriedBeforeCommit => 12,
            Refusal::NoCommit { .. } => 13,
        }
    }
}
