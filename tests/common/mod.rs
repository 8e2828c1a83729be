//! What the root's migration tests share.

use std::net::TcpStream;

use shadow_mmu_migrate::source::{Outcome, OutgoingParams, migrate_outgoing};
use shadow_mmu_migrate::stream::Header;
use shadow_mmu_testkit::resume::PassPacing;
use shadow_mmu_vmm::PassVm;

/// Migrates `vm` over `conn` announced by `header`, its guest paced at
/// `rate` bytes a second meanwhile (`None`: flat out; 0: idle).
pub fn migrate(
    vm: &mut Box<dyn PassVm>,
    conn: &TcpStream,
    header: &Header,
    params: &OutgoingParams,
    rate: Option<u64>,
) -> Outcome {
    let mut pacing = PassPacing::new(vm.as_ref(), rate).expect("the guest's pace");
    migrate_outgoing(vm.as_mut(), conn, header, params, &mut pacing)
}
