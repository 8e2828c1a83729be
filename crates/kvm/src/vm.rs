//! A KVM VM with the two memslots every workload here uses, and its vCPUs.
//!
//! Guest physical memory, as `struct kvm_userspace_memory_region`s:
//! - slot [`CONTROL_SLOT`] at gpa 0: guest code and host-written tables,
//!   never logged;
//! - slot [`TEST_SLOT`] at [`TEST_GPA`] (1 GiB), up to [`MAX_TEST_BYTES`]
//!   (2 GiB): the memory the workloads dirty, logged while
//!   [`KvmVm::dirty_logging`] (`KVM_MEM_LOG_DIRTY_PAGES`).
//!
//! vCPUs start in 32-bit protected mode with paging off (CR0.PE only; flat
//! 4 GiB code and data segments loaded straight into the segment registers
//! with `KVM_SET_SREGS`, so no GDT in guest memory), so a guest linear
//! address is a guest physical address and the whole test slot lies below
//! 4 GiB.
//!
//! Dirty bitmaps are indexed by page within the test slot, 64 pages per
//! `u64` (bit `i` of word `w` is page `64 * w + i`), as the engine's.
//!
//! Invariants:
//! - the host mappings behind both slots ([`GuestMemory`]) are unmapped
//!   only after the VM fd and every vCPU fd are closed: [`KvmVm`] and each
//!   [`Vcpu`] hold an `Arc` of them, dropped after their fd (field order), so
//!   KVM never holds a `userspace_addr` into memory we gave back (which the
//!   allocator could hand out again for something else);
//! - the slots' sizes never change after [`KvmVm::new`], so the bitmap size
//!   checks done here are the ones KVM relies on;
//! - host access to guest memory goes through `AtomicU64` words only: the
//!   guest writes it concurrently (through KVM), so no `&[u8]` or `&mut`
//!   view of it is ever made.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_MEM_LOG_DIRTY_PAGES,
    kvm_enable_cap, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use shadow_mmu_core::spte::PAGE_SIZE;

use crate::error::{BadConfig, KvmError, Unavailable, UnexpectedExit};
use crate::ioctls;

/// Memslot of guest code and control tables.
pub const CONTROL_SLOT: u32 = 0;
/// Memslot of the memory the workloads dirty.
pub const TEST_SLOT: u32 = 1;
/// Guest physical address of the test slot.
pub const TEST_GPA: u64 = 1 << 30;
/// Largest test slot: it must end below 4 GiB, where 32-bit code can reach.
pub const MAX_TEST_BYTES: u64 = 2 << 30;
/// Largest control slot: it must end below the test slot.
pub const MAX_CONTROL_BYTES: u64 = TEST_GPA;
/// The I/O port of the guests' exits to the host (KVM selftests' ucalls):
/// `out UCALL_PORT, al` with the ucall code in `al`.
pub const UCALL_PORT: u16 = 0x10;

/// KVM's bitmap layout is the engine's: one bit per page, in `u64` words.
pub use shadow_mmu_core::bitmap_words;
use shadow_mmu_vmm::DirtyLogProtect;

/// An anonymous, private, page-aligned host mapping that backs a memslot.
#[derive(Debug)]
pub struct GuestMemory {
    base: NonNull<AtomicU64>,
    bytes: u64,
}

// SAFETY: the mapping is only accessed through `AtomicU64` (which is
// `Sync`) and by KVM; the pointer and size never change after `map`.
unsafe impl Send for GuestMemory {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps `bytes` (a non-zero multiple of the page size) of zeroed memory;
    /// `populate` faults every page in up front (`MAP_POPULATE`).
    pub fn map(bytes: u64, populate: bool) -> Result<Self, KvmError> {
        if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE) {
            return Err(BadConfig::MappingSize { bytes }.into());
        }
        let len = usize::try_from(bytes).map_err(|_| BadConfig::MappingTooLarge { bytes })?;
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if populate {
            flags |= libc::MAP_POPULATE;
        }
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choosing (NULL hint, no MAP_FIXED) cannot overlap anything of ours;
        // no fd is involved. The result is checked below.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0)
        };
        if p == libc::MAP_FAILED {
            return Err(KvmError::last_os_error("mmap"));
        }
        let base = NonNull::new(p.cast::<AtomicU64>()).ok_or_else(|| KvmError::last_os_error("mmap"))?;
        Ok(Self { base, bytes })
    }

    /// Asks for transparent huge pages behind this mapping (`MADV_HUGEPAGE`,
    /// as QEMU asks for its RAM), so that a lazily mapped guest takes a host
    /// fault per 2 MiB, not per 4 KiB. A hint: where the host refuses it,
    /// nothing changes.
    pub fn advise_huge_pages(&self) {
        // SAFETY: `[base, base + bytes)` is our own live mapping (made in
        // `map`, unmapped only in `Drop`); `MADV_HUGEPAGE` changes no
        // content and no protection, only how later faults are served.
        unsafe {
            libc::madvise(self.base.as_ptr().cast(), self.bytes as usize, libc::MADV_HUGEPAGE);
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    /// Always false: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The host virtual address, for `userspace_addr`.
    fn host_addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// The whole mapping as words.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: `base` starts a live mapping of `bytes` bytes, unmapped only
        // in `drop` (excluded by the borrow of `self`); it is page-aligned, so
        // aligned for `AtomicU64`; every bit pattern is a valid u64; and all
        // our accesses are atomic, so sharing with other threads is
        // race-free. Guest stores arrive from outside the program (the CPU
        // in guest mode, or KVM's emulator copying to user memory); an
        // atomic load concurrent with one may see the old or the new value,
        // never undefined behaviour (the workloads read words only while the
        // vCPUs that write them are parked).
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), (self.bytes / 8) as usize) }
    }

    /// Copies `bytes` into the mapping at byte `offset` (8-aligned), word by
    /// word. For code and tables, written while no vCPU runs.
    fn write_bytes(&self, offset: u64, bytes: &[u8]) -> Result<(), KvmError> {
        let end = offset.checked_add(bytes.len() as u64);
        if !offset.is_multiple_of(8) || end.is_none_or(|e| e > self.bytes) {
            return Err(
                BadConfig::WriteOutsideSlot { bytes: bytes.len(), offset, slot_bytes: self.bytes }.into()
            );
        }
        let words = &self.words()[(offset / 8) as usize..];
        for (w, chunk) in words.iter().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            // Relaxed: no vCPU runs this code yet; KVM_RUN (a syscall) orders
            // these stores before the guest's fetches.
            w.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: `base`/`bytes` are exactly what mmap returned, unmapped once
        // (here). No reference from `words` outlives `self`, and the module
        // invariant keeps KVM from using the range after this: every VM and
        // vCPU fd that could reach it has been closed before the last `Arc`
        // of the owning `VmMemory` goes.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes as usize) };
    }
}

/// The host mappings behind a VM's two slots.
#[derive(Debug)]
pub struct VmMemory {
    /// Slot [`CONTROL_SLOT`].
    pub control: GuestMemory,
    /// Slot [`TEST_SLOT`].
    pub test: GuestMemory,
}

/// How to build a [`KvmVm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSetup {
    /// Bytes of the control slot (code and tables), a multiple of 4 KiB.
    pub control_bytes: u64,
    /// Bytes of the test slot, a multiple of 4 KiB up to [`MAX_TEST_BYTES`].
    pub test_bytes: u64,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`'s flags to enable, if any
    /// (`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`, and `INITIALLY_SET`).
    pub protect: DirtyLogProtect,
    /// Fault the test slot's host memory in up front.
    pub populate: bool,
    /// Enable the dirty ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`) with this many
    /// bytes per vCPU; the bitmap ioctls are then refused.
    pub dirty_ring_bytes: Option<u32>,
}

/// A VM: `/dev/kvm`, `KVM_CREATE_VM`, the two memslots.
pub struct KvmVm {
    // Field order is drop order: the VM fd closes before the memory's Arc
    // goes (module invariant). Shared with the vCPUs of a ring VM, for
    // their own `KVM_RESET_DIRTY_RINGS` (`Vcpu::reap_own_dirty_ring`) only.
    vm: Arc<VmFd>,
    memory: Arc<VmMemory>,
    test_pages: u64,
    logging: bool,
    protect: DirtyLogProtect,
    dirty_ring_bytes: Option<u32>,
    /// Every vCPU's mapped ring, when the ring is on.
    rings: std::sync::Mutex<Vec<Arc<crate::ring::KvmRing>>>,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm")
            .field("test_pages", &self.test_pages)
            .field("logging", &self.logging)
            .field("protect", &self.protect)
            .finish()
    }
}

/// The environment variable that names another device than `/dev/kvm`:
/// the tests point it at a file that is not KVM, to check that every KVM
/// run is skipped with one line and the rest goes on.
pub const DEVICE_ENV: &str = "SHADOW_MMU_KVM_DEVICE";

/// The KVM device: `/dev/kvm`, or the path in [`DEVICE_ENV`].
pub fn device_path() -> String {
    std::env::var(DEVICE_ENV).unwrap_or_else(|_| "/dev/kvm".to_string())
}

/// Opens the KVM device and creates a VM, checking the API version.
pub(crate) fn open_vm() -> Result<VmFd, KvmError> {
    let path = device_path();
    let Ok(cpath) = std::ffi::CString::new(path.clone()) else {
        return Err(Unavailable::NulInPath { path }.into());
    };
    let kvm = match Kvm::new_with_path(&cpath) {
        Ok(kvm) => kvm,
        Err(e) => return Err(Unavailable::Open { path, source: e.into() }.into()),
    };
    let api = kvm.get_api_version();
    if api < 0 {
        let source = std::io::Error::last_os_error();
        return Err(Unavailable::ApiVersionFailed { path, source }.into());
    }
    if api != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(Unavailable::ApiVersion { got: api }.into());
    }
    kvm.create_vm().map_err(|e| Unavailable::CreateVm(e.into()).into())
}

impl KvmVm {
    /// Creates the VM and its two slots, dirty logging off.
    pub fn new(setup: VmSetup) -> Result<Self, KvmError> {
        let VmSetup { control_bytes, test_bytes, protect, populate, dirty_ring_bytes } = setup;
        if control_bytes == 0 || control_bytes > MAX_CONTROL_BYTES || !control_bytes.is_multiple_of(PAGE_SIZE)
        {
            return Err(BadConfig::ControlSlot { bytes: control_bytes }.into());
        }
        if test_bytes == 0 || test_bytes > MAX_TEST_BYTES || !test_bytes.is_multiple_of(PAGE_SIZE) {
            return Err(BadConfig::TestSlot { bytes: test_bytes }.into());
        }
        let vm = open_vm()?;
        if protect.is_manual() {
            let caps = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
            let flags = protect.cap_flags();
            if (caps as u64) & flags != flags {
                return Err(Unavailable::ManualProtect { caps, flags }.into());
            }
            let cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                args: [flags, 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap).map_err(|e| KvmError::ioctl("KVM_ENABLE_CAP", e))?;
        }
        if let Some(bytes) = dirty_ring_bytes {
            let max = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into());
            if max <= 0 {
                return Err(Unavailable::NoDirtyRingAcqRel.into());
            }
            let cap = kvm_enable_cap {
                cap: KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                args: [u64::from(bytes), 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap)
                .map_err(|e| KvmError::ioctl("KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)", e))?;
        }
        let memory = Arc::new(VmMemory {
            control: GuestMemory::map(control_bytes, false)?,
            test: GuestMemory::map(test_bytes, populate)?,
        });
        let this = Self {
            vm: Arc::new(vm),
            memory,
            test_pages: test_bytes / PAGE_SIZE,
            logging: false,
            protect,
            dirty_ring_bytes,
            rings: std::sync::Mutex::new(Vec::new()),
        };
        this.set_region(CONTROL_SLOT, 0, &this.memory.control, 0)?;
        this.set_region(TEST_SLOT, TEST_GPA, &this.memory.test, 0)?;
        Ok(this)
    }

    /// `KVM_SET_USER_MEMORY_REGION` of `slot` over all of `mem`.
    fn set_region(&self, slot: u32, gpa: u64, mem: &GuestMemory, flags: u32) -> Result<(), KvmError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: mem.len(),
            userspace_addr: mem.host_addr(),
        };
        // SAFETY: `userspace_addr..+memory_size` is one live, page-aligned,
        // read-write mapping (`mem`, owned by `self.memory`), and the module
        // invariant keeps it mapped until the VM fd and every vCPU fd are
        // closed, so KVM never accesses it after it is gone.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| KvmError::ioctl("KVM_SET_USER_MEMORY_REGION", e))
    }

    /// Pages of the test slot.
    pub fn test_pages(&self) -> u64 {
        self.test_pages
    }

    /// Is dirty logging on for the test slot?
    pub fn dirty_logging(&self) -> bool {
        self.logging
    }

    /// Was manual dirty log protection enabled?
    pub fn manual_protect(&self) -> bool {
        self.protect.is_manual()
    }

    /// The manual-protect flags enabled on the VM.
    pub fn protect(&self) -> DirtyLogProtect {
        self.protect
    }

    /// The host mappings.
    pub fn memory(&self) -> &VmMemory {
        &self.memory
    }

    /// The guest memory, shared (it lives while any holder does).
    pub(crate) fn shared_memory(&self) -> Arc<VmMemory> {
        self.memory.clone()
    }

    /// The dirty ring's bytes per vCPU, if on.
    pub fn dirty_ring_bytes(&self) -> Option<u32> {
        self.dirty_ring_bytes
    }

    /// Harvests every vCPU's dirty ring: `f(slot, offset)` for each entry
    /// KVM pushed since the last harvest, ring by ring, in order. Returns
    /// how many. Follow with [`Self::reset_dirty_rings`], even after an
    /// error: every ring is harvested first. A ring found completely full is
    /// [`KvmError::DirtyRingOverflow`] (KVM ran past its reserve).
    pub fn harvest_dirty_rings(&self, mut f: impl FnMut(u32, u64)) -> Result<u32, KvmError> {
        let rings = self.rings.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut n, mut overflowed) = (0, false);
        for r in rings.iter() {
            let got = r.harvest(&mut f);
            overflowed |= got == r.entries();
            n += got;
        }
        if overflowed { Err(KvmError::DirtyRingOverflow) } else { Ok(n) }
    }

    /// `KVM_RESET_DIRTY_RINGS` on this VM (see [`ioctls::reset_dirty_rings`]).
    /// The VM fd itself is not handed out: a slot resized behind our back
    /// would break the bitmap size checks `get_dirty_log` relies on.
    pub fn reset_dirty_rings(&self) -> Result<u32, KvmError> {
        ioctls::reset_dirty_rings(&self.vm)
            .map_err(|source| KvmError::Ioctl { op: "KVM_RESET_DIRTY_RINGS", source })
    }

    /// Copies `code` to byte `offset` of the control slot.
    pub fn write_control(&self, offset: u64, code: &[u8]) -> Result<(), KvmError> {
        self.memory.control.write_bytes(offset, code)
    }

    fn set_logging(&mut self, on: bool) -> Result<u64, KvmError> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        let t = Instant::now();
        self.set_region(TEST_SLOT, TEST_GPA, &self.memory.test, flags)?;
        let ns = t.elapsed().as_nanos() as u64;
        self.logging = on;
        Ok(ns)
    }

    /// Turns dirty logging on for the test slot: re-issues
    /// `KVM_SET_USER_MEMORY_REGION` with `KVM_MEM_LOG_DIRTY_PAGES`. KVM
    /// allocates a zeroed log and (without manual protect's `INITIALLY_SET`)
    /// write-protects the slot. Returns the ioctl's time in ns.
    pub fn enable_dirty_logging(&mut self) -> Result<u64, KvmError> {
        self.set_logging(true)
    }

    /// Turns dirty logging off (KVM frees the log). Returns its time in ns.
    pub fn disable_dirty_logging(&mut self) -> Result<u64, KvmError> {
        self.set_logging(false)
    }

    /// `KVM_GET_DIRTY_LOG` of the test slot into `bitmap`, which must have
    /// exactly [`bitmap_words`]`(test_pages)` words. Returns the number of
    /// dirty pages. Without manual protect KVM also clears its log and
    /// write-protects the reported pages; with it, the log is only copied.
    pub fn get_dirty_log(&self, bitmap: &mut [u64]) -> Result<u64, KvmError> {
        let expected = bitmap_words(self.test_pages);
        if bitmap.len() != expected {
            return Err(KvmError::BadBitmapSize { pages: self.test_pages, expected, got: bitmap.len() });
        }
        // SAFETY: the test slot has `test_pages` pages (fixed since `new`)
        // and `bitmap` has one bit for each of them, checked just above.
        match unsafe { ioctls::get_dirty_log(&self.vm, TEST_SLOT, bitmap) } {
            Ok(()) => Ok(bitmap.iter().map(|w| u64::from(w.count_ones())).sum()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(KvmError::NotLogging),
            Err(source) => Err(KvmError::Ioctl { op: "KVM_GET_DIRTY_LOG", source }),
        }
    }

    /// `KVM_CLEAR_DIRTY_LOG` of the test slot: clears (and write-protects)
    /// the pages set in `bitmap`, whose bit `i` of word `w` is page
    /// `first_page + 64 * w + i`. `first_page` must be a multiple of 64 and
    /// `bitmap` no longer than the rest of the slot (a range shorter than
    /// the rest is a whole number of words, as KVM requires). Needs manual
    /// protect.
    pub fn clear_dirty_log(&self, first_page: u64, bitmap: &[u64]) -> Result<(), KvmError> {
        if !self.protect.is_manual() {
            return Err(KvmError::ManualProtectNotEnabled);
        }
        if !first_page.is_multiple_of(64) || first_page >= self.test_pages {
            return Err(BadConfig::ClearFirstPage { first_page, pages: self.test_pages }.into());
        }
        let rest = self.test_pages - first_page;
        if bitmap.is_empty() || bitmap.len() > bitmap_words(rest) {
            return Err(KvmError::BadBitmapSize {
                pages: rest,
                expected: bitmap_words(rest),
                got: bitmap.len(),
            });
        }
        let num_pages = rest.min(64 * bitmap.len() as u64);
        let num_pages =
            u32::try_from(num_pages).map_err(|_| BadConfig::ClearTooManyPages { pages: num_pages })?;
        match ioctls::clear_dirty_log(&self.vm, TEST_SLOT, first_page, num_pages, bitmap) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(KvmError::NotLogging),
            Err(source) => Err(KvmError::Ioctl { op: "KVM_CLEAR_DIRTY_LOG", source }),
        }
    }

    /// `KVM_CREATE_VCPU` `id`, in 32-bit protected mode with paging off
    /// (module docs), about to execute at `eip` with the general registers
    /// `regs` (eax, ecx, edx, ebx, esp, ebp, esi, edi).
    pub fn create_vcpu(&self, id: u32, eip: u32, regs: [u32; 8]) -> Result<Vcpu, KvmError> {
        let fd = self.vm.create_vcpu(u64::from(id)).map_err(|e| KvmError::ioctl("KVM_CREATE_VCPU", e))?;
        let mut sregs = fd.get_sregs().map_err(|e| KvmError::ioctl("KVM_GET_SREGS", e))?;
        let flat = |selector: u16, type_: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        // Type 0xb: code, execute/read, accessed; 0x3: data, read/write, accessed.
        sregs.cs = flat(0x08, 0xb);
        let data = flat(0x10, 0x3);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        // CR0.PE | CR0.ET; paging, caching-disable, EM and TS off (MMX usable).
        sregs.cr0 = 0x11;
        sregs.cr4 = 0;
        sregs.efer = 0;
        fd.set_sregs(&sregs).map_err(|e| KvmError::ioctl("KVM_SET_SREGS", e))?;
        let [eax, ecx, edx, ebx, esp, ebp, esi, edi] = regs.map(u64::from);
        let r = kvm_bindings::kvm_regs {
            rax: eax,
            rcx: ecx,
            rdx: edx,
            rbx: ebx,
            rsp: esp,
            rbp: ebp,
            rsi: esi,
            rdi: edi,
            rip: u64::from(eip),
            rflags: 0x2,
            ..Default::default()
        };
        fd.set_regs(&r).map_err(|e| KvmError::ioctl("KVM_SET_REGS", e))?;
        let mut own_ring = None;
        if let Some(bytes) = self.dirty_ring_bytes {
            let ring = Arc::new(crate::ring::KvmRing::map(&fd, bytes)?);
            self.rings.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(ring.clone());
            own_ring = Some((ring, self.vm.clone()));
        }
        // KVM_CAP_XSAVE2: the bytes KVM_GET_XSAVE fills (0: the
        // traditional 4096).
        let xsave_bytes = self.vm.check_extension_raw(kvm_bindings::KVM_CAP_XSAVE2.into()).max(0) as usize;
        Ok(Vcpu { fd, id, xsave_bytes, own_ring, _memory: self.memory.clone() })
    }
}

/// A vCPU of a [`KvmVm`]; may move to its own thread.
pub struct Vcpu {
    // Field order is drop order: the vCPU fd closes, then the VM fd if this
    // vCPU held it last, before the memory's Arc goes (module invariant).
    fd: VcpuFd,
    id: u32,
    /// What `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)` said.
    xsave_bytes: usize,
    /// With the dirty ring: this vCPU's ring and the VM fd, for its
    /// thread's own reap.
    own_ring: Option<(Arc<crate::ring::KvmRing>, Arc<VmFd>)>,
    _memory: Arc<VmMemory>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}

/// How a `KVM_RUN` of a [`Vcpu`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// `out UCALL_PORT, al`: a ucall with code `al`.
    Ucall(u8),
    /// `KVM_EXIT_DIRTY_RING_FULL`: the vCPU's dirty ring is at its soft
    /// limit; harvest and reset, then run again.
    DirtyRingFull,
    /// `KVM_EXIT_INTERNAL_ERROR` with `KVM_INTERNAL_ERROR_EMULATION`: KVM's
    /// instruction emulator met an instruction it does not implement.
    EmulationFailure,
    /// `KVM_RUN` returned `EINTR` (a signal) while `kicked()` said a kick
    /// was meant: only from [`Vcpu::run_interruptible`].
    Interrupted,
    /// Any other exit, none of which our guests make.
    Other {
        /// What KVM said.
        exit: OtherExit,
        /// The guest's eip at the exit, or the errno of the `KVM_GET_REGS`
        /// that would have read it.
        eip: Result<u64, i32>,
    },
}

impl std::fmt::Display for GuestExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestExit::Ucall(code) => write!(f, "ucall {code}"),
            GuestExit::DirtyRingFull => f.write_str("dirty ring full"),
            GuestExit::EmulationFailure => {
                f.write_str("KVM's instruction emulator failed on a guest instruction")
            }
            GuestExit::Interrupted => f.write_str("KVM_RUN interrupted by a kick"),
            GuestExit::Other { exit, eip: Ok(eip) } => write!(f, "{exit} at eip {eip:#x}"),
            GuestExit::Other { exit, eip: Err(errno) } => {
                let e = std::io::Error::from_raw_os_error(*errno);
                write!(f, "{exit} at eip ? (KVM_GET_REGS: {e})")
            }
        }
    }
}

/// A `KVM_RUN` exit that is none of [`GuestExit`]'s named ones, as
/// `struct kvm_run` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtherExit {
    /// `KVM_EXIT_IO`, an `out` that is not a one-byte ucall on [`UCALL_PORT`].
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// `KVM_EXIT_IO`, an `in`.
    IoIn {
        /// The port.
        port: u16,
    },
    /// `KVM_EXIT_MMIO`: an access to a guest physical address in no memslot.
    Mmio {
        /// The address.
        gpa: u64,
        /// A store (else a load).
        write: bool,
    },
    /// `KVM_EXIT_FAIL_ENTRY`: the CPU refused to enter the guest.
    FailEntry {
        /// `hardware_entry_failure_reason`.
        reason: u64,
    },
    /// `KVM_EXIT_INTERNAL_ERROR` with another suberror than
    /// `KVM_INTERNAL_ERROR_EMULATION`.
    InternalError {
        /// `internal.suberror`.
        suberror: u32,
    },
    /// Any other `exit_reason` (`KVM_EXIT_HLT`, `KVM_EXIT_SHUTDOWN`, ...).
    Reason(u32),
}

impl std::fmt::Display for OtherExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OtherExit::IoOut { port, data } => write!(f, "out to port {port:#x} of {data:x?}"),
            OtherExit::IoIn { port } => write!(f, "in from port {port:#x}"),
            OtherExit::Mmio { gpa, write: true } => write!(f, "KVM_EXIT_MMIO, a store to {gpa:#x}"),
            OtherExit::Mmio { gpa, write: false } => write!(f, "KVM_EXIT_MMIO, a load from {gpa:#x}"),
            OtherExit::FailEntry { reason } => {
                write!(f, "KVM_EXIT_FAIL_ENTRY, hardware_entry_failure_reason {reason:#x}")
            }
            OtherExit::InternalError { suberror } => {
                write!(f, "KVM_EXIT_INTERNAL_ERROR, suberror {suberror}")
            }
            OtherExit::Reason(r) => match exit_name(*r) {
                Some(name) => f.write_str(name),
                None => write!(f, "exit reason {r}"),
            },
        }
    }
}

/// The `KVM_EXIT_*` name of the x86 exit reasons a guest of ours could
/// plausibly meet.
fn exit_name(reason: u32) -> Option<&'static str> {
    use kvm_bindings as k;
    Some(match reason {
        k::KVM_EXIT_UNKNOWN => "KVM_EXIT_UNKNOWN",
        k::KVM_EXIT_EXCEPTION => "KVM_EXIT_EXCEPTION",
        k::KVM_EXIT_HYPERCALL => "KVM_EXIT_HYPERCALL",
        k::KVM_EXIT_DEBUG => "KVM_EXIT_DEBUG",
        k::KVM_EXIT_HLT => "KVM_EXIT_HLT",
        k::KVM_EXIT_IRQ_WINDOW_OPEN => "KVM_EXIT_IRQ_WINDOW_OPEN",
        k::KVM_EXIT_SHUTDOWN => "KVM_EXIT_SHUTDOWN",
        k::KVM_EXIT_SET_TPR => "KVM_EXIT_SET_TPR",
        k::KVM_EXIT_TPR_ACCESS => "KVM_EXIT_TPR_ACCESS",
        k::KVM_EXIT_NMI => "KVM_EXIT_NMI",
        k::KVM_EXIT_SYSTEM_EVENT => "KVM_EXIT_SYSTEM_EVENT",
        k::KVM_EXIT_IOAPIC_EOI => "KVM_EXIT_IOAPIC_EOI",
        k::KVM_EXIT_HYPERV => "KVM_EXIT_HYPERV",
        k::KVM_EXIT_X86_RDMSR => "KVM_EXIT_X86_RDMSR",
        k::KVM_EXIT_X86_WRMSR => "KVM_EXIT_X86_WRMSR",
        k::KVM_EXIT_X86_BUS_LOCK => "KVM_EXIT_X86_BUS_LOCK",
        k::KVM_EXIT_NOTIFY => "KVM_EXIT_NOTIFY",
        k::KVM_EXIT_MEMORY_FAULT => "KVM_EXIT_MEMORY_FAULT",
        _ => return None,
    })
}

/// Words of a saved [`Vcpu`] state: 16 general registers, rip and rflags,
/// then the 4096-byte XSAVE area (`KVM_GET_XSAVE`: x87, MMX, SSE and its
/// header). Not `KVM_GET_FPU`: `KVM_SET_FPU` writes the legacy area only,
/// and on a vCPU that never ran the XSAVE header still says "x87 in its
/// initial state", so the guest found mm0 zeroed (pages written with pass
/// number 0 after a migration mid-pass); QEMU too moves the FPU with
/// `KVM_SET_XSAVE`.
pub const VCPU_STATE_WORDS: usize = 18 + XSAVE_WORDS;

/// Words of the traditional XSAVE area.
pub(crate) const XSAVE_WORDS: usize = 512;

impl Vcpu {
    /// The vCPU id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Reaps this vCPU's own dirty ring, as QEMU's vCPU thread does at a
    /// ring-full exit under a dirty-limit (`kvm_dirty_ring_reap_one`, then
    /// `KVM_RESET_DIRTY_RINGS`, which resets what any harvester marked):
    /// `f(offset)` for each test-slot entry pushed since the last harvest,
    /// in order. Returns the ring's entries harvested so far, by any
    /// harvester (wrapping): the vCPU's dirty pages. A ring found completely
    /// full is [`KvmError::DirtyRingOverflow`], after the reset.
    pub fn reap_own_dirty_ring(&self, mut f: impl FnMut(u64)) -> Result<u32, KvmError> {
        let Some((ring, vm)) = &self.own_ring else {
            return Err(BadConfig::NoDirtyRing.into());
        };
        let got = ring.harvest(|slot, offset| {
            if slot == TEST_SLOT {
                f(offset);
            }
        });
        ioctls::reset_dirty_rings(vm)
            .map_err(|source| KvmError::Ioctl { op: "KVM_RESET_DIRTY_RINGS", source })?;
        if got == ring.entries() {
            return Err(KvmError::DirtyRingOverflow);
        }
        Ok(ring.harvested())
    }

    /// One `KVM_RUN` (re-entered on `EINTR`/`EAGAIN`).
    pub fn run(&mut self) -> Result<GuestExit, KvmError> {
        self.run_interruptible(&|| false)
    }

    /// One `KVM_RUN`, re-entered on `EAGAIN`, and on `EINTR` unless
    /// `kicked()`: then [`GuestExit::Interrupted`] (a VMM's pause, which
    /// signals the vCPU's thread to get it out of guest mode).
    pub fn run_interruptible(&mut self, kicked: &dyn Fn() -> bool) -> Result<GuestExit, KvmError> {
        loop {
            let exit = match self.fd.run() {
                Ok(VcpuExit::IoOut(UCALL_PORT, [code])) => return Ok(GuestExit::Ucall(*code)),
                Ok(VcpuExit::IoOut(port, data)) => OtherExit::IoOut { port, data: data.to_vec() },
                Ok(VcpuExit::IoIn(port, _)) => OtherExit::IoIn { port },
                Ok(VcpuExit::MmioRead(gpa, _)) => OtherExit::Mmio { gpa, write: false },
                Ok(VcpuExit::MmioWrite(gpa, _)) => OtherExit::Mmio { gpa, write: true },
                Ok(VcpuExit::FailEntry(reason, _)) => OtherExit::FailEntry { reason },
                Ok(VcpuExit::Intr) if kicked() => return Ok(GuestExit::Interrupted),
                Ok(VcpuExit::Intr) => continue,
                Err(e) if e.errno() == libc::EINTR && kicked() => return Ok(GuestExit::Interrupted),
                Ok(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)) => {
                    return Ok(GuestExit::DirtyRingFull);
                }
                Ok(VcpuExit::InternalError) => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: KVM_RUN returned with exit_reason
                    // KVM_EXIT_INTERNAL_ERROR (that is what `InternalError`
                    // decodes), for which KVM fills the `internal` member of
                    // the union; it is plain integers, valid for any bits.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    if internal.suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                        return Ok(GuestExit::EmulationFailure);
                    }
                    OtherExit::InternalError { suberror: internal.suberror }
                }
                // `struct kvm_run` still holds the exit: its reason is the
                // one thing every other exit has.
                Ok(_) => OtherExit::Reason(self.fd.get_kvm_run().exit_reason),
                Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => continue,
                Err(e) => return Err(KvmError::ioctl("KVM_RUN", e)),
            };
            let eip = self.fd.get_regs().map(|r| r.rip).map_err(|e| e.errno());
            return Ok(GuestExit::Other { exit, eip });
        }
    }

    /// The vCPU's registers and XSAVE state ([`VCPU_STATE_WORDS`] words), for a
    /// migration: first a `KVM_RUN` with `immediate_exit` set, which completes
    /// an I/O exit's instruction (the ucall's `out`) without running the
    /// guest, as KVM's API documentation asks before saving a vCPU that
    /// exited to userspace. Not in guest mode (the caller's thread owns it).
    pub fn save_state(&mut self) -> Result<Vec<u64>, KvmError> {
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Err(libc::EINTR) => {}
            Ok(()) => {
                return Err(UnexpectedExit::ImmediateExitRan { vcpu: self.id }.into());
            }
            Err(errno) => {
                return Err(KvmError::ioctl("KVM_RUN (immediate_exit)", kvm_ioctls::Error::new(errno)));
            }
        }
        self.check_xsave_size()?;
        let r = self.fd.get_regs().map_err(|e| KvmError::ioctl("KVM_GET_REGS", e))?;
        let x = self.fd.get_xsave().map_err(|e| KvmError::ioctl("KVM_GET_XSAVE", e))?;
        let mut w = vec![
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13,
            r.r14, r.r15, r.rip, r.rflags,
        ];
        w.extend(x.region.chunks_exact(2).map(|p| u64::from(p[0]) | u64::from(p[1]) << 32));
        debug_assert_eq!(w.len(), VCPU_STATE_WORDS);
        Ok(w)
    }

    /// Loads a state of [`Self::save_state`] (another VM's vCPU, of the same
    /// program). Refused unless it is [`VCPU_STATE_WORDS`] words.
    pub fn restore_state(&mut self, w: &[u64]) -> Result<(), KvmError> {
        if w.len() != VCPU_STATE_WORDS {
            return Err(BadConfig::VcpuStateSize { words: w.len() }.into());
        }
        let r = kvm_bindings::kvm_regs {
            rax: w[0],
            rbx: w[1],
            rcx: w[2],
            rdx: w[3],
            rsi: w[4],
            rdi: w[5],
            rsp: w[6],
            rbp: w[7],
            r8: w[8],
            r9: w[9],
            r10: w[10],
            r11: w[11],
            r12: w[12],
            r13: w[13],
            r14: w[14],
            r15: w[15],
            rip: w[16],
            rflags: w[17],
        };
        self.check_xsave_size()?;
        let mut x = kvm_bindings::kvm_xsave::default();
        for (pair, &v) in x.region.chunks_exact_mut(2).zip(&w[18..]) {
            (pair[0], pair[1]) = (v as u32, (v >> 32) as u32);
        }
        self.fd.set_regs(&r).map_err(|e| KvmError::ioctl("KVM_SET_REGS", e))?;
        // SAFETY: KVM_SET_XSAVE reads as many bytes as KVM_CAP_XSAVE2 says
        // (4096 where the capability is absent); `check_xsave_size` made
        // sure that is at most the 4096 bytes of `x` (this process enables
        // no XSTATE feature dynamically).
        unsafe { self.fd.set_xsave(&x) }.map_err(|e| KvmError::ioctl("KVM_SET_XSAVE", e))
    }

    /// Refuses a vCPU whose XSAVE state does not fit the traditional 4096
    /// bytes (dynamically enabled features, such as AMX, which our guests
    /// never use and this process never enables).
    fn check_xsave_size(&self) -> Result<(), KvmError> {
        if self.xsave_bytes > XSAVE_WORDS * 8 {
            return Err(BadConfig::XsaveTooLarge { bytes: self.xsave_bytes }.into());
        }
        Ok(())
    }
}
