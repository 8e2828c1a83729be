//! # shadow-mmu core
//!
//! The lock-free structures of the shadow MMU and the orderings they keep,
//! after the patch series "KVM: MMU: locklessly write-protect" (Xiao
//! Guangrong, 2013), with nothing of the VM around them. This is the crate
//! loom checks (`RUSTFLAGS="--cfg loom" cargo test -p shadow-mmu-core`): each
//! model runs the very functions the engine runs.
//!
//! - [`spte`]: the encoding of a shadow page table entry;
//! - [`pte_list`]: rmaps and parent lists, with the seed's lockless walker;
//! - [`rcu`] and [`pool`]: grace periods, and type-stable pools whose memory
//!   goes back to the system only after one, with a bounded backlog;
//! - [`dirty_bitmap`]: a memslot's dirty bitmap and its ordering contract;
//! - [`dirty_ring`]: a vCPU's dirty ring (push, harvest, reset) and its
//!   acquire/release protocol;
//! - [`lockless`]: the seed's lock-free spte operations and `mmu_spte_update`'s
//!   rules (KVM 3.11's `xchg`, the seed's patch 04);
//! - [`tdp`]: the TDP MMU's spte operations by lock held (compare-exchange
//!   under read, atomic-if-volatile under write, `FROZEN_SPTE`);
//! - [`requests`]: vCPU modes and the remote TLB flush handshake;
//! - [`pause`]: the pause handshake of a migration's stop-and-copy;
//! - [`breakage`]: the `break-rules` switches, which fold away in normal
//!   builds;
//! - [`stats`], [`lockdep`]: counters, and which lock a thread holds.
//!
//! Nothing here knows about memslots, vCPU threads or the VM; the engine
//! (`shadow-mmu-engine`) builds those on top.

pub mod breakage;
pub mod dirty_bitmap;
pub mod dirty_ring;
pub mod lockdep;
pub mod lockless;
#[cfg(all(test, loom))]
mod loom_support;
pub mod pause;
pub mod pool;
pub mod pte_list;
pub mod rcu;
pub mod requests;
pub mod spte;
pub mod stats;
pub mod sync;
pub mod tdp;

pub use dirty_bitmap::bitmap_words;
