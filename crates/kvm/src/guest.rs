//! The guest programs, generated at run time with `crate::asm`, and a host
//! model of what the dirtying one does.
//!
//! All run in 32-bit protected mode with paging off (see [`crate::vm`]) and
//! end each piece of work with a ucall, `mov eax, code; out UCALL_PORT, al`
//! (KVM's selftests' `ucall`: an exit to the host through port I/O), then
//! jump back to their start, so re-entering `KVM_RUN` runs the next piece.
//! Their 8-byte accesses are MMX `movq` loads and stores (one access each,
//! as the engine's `u64` ones); `movq` is also what KVM's instruction
//! emulator implements, where `movd` is not (which [`crate::probe()`] uses to
//! tell emulation from hardware execution).
//!
//! Invariants:
//! - [`pass_program`] touches only the pages `[base_gpa, base_gpa + 4096 *
//!   pages)` of the test slot (word 0 of each), plus its own pass word in
//!   the control slot; [`model_pass`] reproduces its choices exactly, from
//!   the same LCG state;
//! - [`script_program`] stores only to the addresses the host put in its
//!   table, in table order, one 8-byte store each;
//! - a program returned here has every jump resolved.

use crate::asm::{Asm, Cond, Label, Mm, Reg};
use crate::error::{BadConfig, KvmError};
use shadow_mmu_core::spte::PAGE_SIZE;

use crate::vm::UCALL_PORT;

/// Ucall code: a pass of [`pass_program`] is done.
pub const UCALL_PASS_DONE: u8 = 1;
/// Ucall code: [`script_program`] executed its table.
pub const UCALL_SCRIPT_DONE: u8 = 2;
/// Ucall code: [`probe_program`] ran to its end.
pub const UCALL_PROBE: u8 = 3;
/// Ucall code: a chunk of [`pass_program`] is done and the host set the
/// pace flag: the vCPU thread calibrates the guest's delay
/// ([`crate::delay`]), holds it for a dirty-limit
/// ([`shadow_mmu_vmm::ChunkPacer`]), or lets KVM check its dirty ring.
pub const UCALL_CHUNK: u8 = 4;
/// Pages of a chunk of [`pass_program`] (a pass's first chunk holds the
/// remainder: 1 to this many pages).
pub const CHUNK_PAGES: u32 = shadow_mmu_vmm::PACE_CHUNK_PAGES as u32;
/// The pages of chunk `k` of a pass of `pages` pages in [`pass_program`]:
/// the first holds the remainder (1 to [`CHUNK_PAGES`]), the rest are full.
pub fn chunk_pages(pages: u32, k: u32) -> u32 {
    let chunks = pages.div_ceil(CHUNK_PAGES);
    if k == 0 { pages - CHUNK_PAGES * (chunks - 1) } else { CHUNK_PAGES }
}

/// Where the pace flag is, from the pass word: a `u32` the host sets to
/// non-zero for a chunk exit after each chunk.
pub const PACE_FLAG_OFFSET: u32 = 8;
/// Where the delay is, from the pass word: a `u32` count of iterations of
/// the delay loop the guest runs after each chunk (0: none), which the
/// host calibrates to the guest's pace.
pub const DELAY_OFFSET: u32 = 16;
/// Where the guest counts the pages it began, from the pass word: a
/// wrapping `u32` it adds each chunk's pages to as the chunk begins, from
/// which the host counts the bytes stored.
pub const PAGES_BEGUN_OFFSET: u32 = 24;

/// Which of the programs a vCPU runs: an unexpected exit names it, as the
/// same exit means something else in each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// [`pass_program`].
    Pass,
    /// [`script_program`].
    Script,
    /// [`probe_program`].
    Probe,
}

impl std::fmt::Display for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Program::Pass => "pass",
            Program::Script => "script",
            Program::Probe => "probe",
        })
    }
}

/// The LCG of the guests (Numerical Recipes' `ranqd1`):
/// `x' = 1664525 x + 1013904223 mod 2^32`.
pub const LCG_A: u32 = 1_664_525;
/// See [`LCG_A`].
pub const LCG_C: u32 = 1_013_904_223;

/// One step of the guests' LCG.
pub const fn lcg_next(x: u32) -> u32 {
    x.wrapping_mul(LCG_A).wrapping_add(LCG_C)
}

/// A vCPU's pass over its slice of the test slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassProgram {
    /// Guest physical address of the slice's first page.
    pub base_gpa: u32,
    /// Pages in the slice (at least 1).
    pub pages: u32,
    /// Share of the accesses that are stores, percent (0..=100).
    pub write_pct: u8,
    /// Pages chosen uniformly at random (with replacement) by the LCG,
    /// instead of in order.
    pub random: bool,
    /// Guest physical address (in the control slot, 8-aligned) of the
    /// vCPU's pass word: the guest writes its pass number there and loads the
    /// value it stores from there.
    pub pass_word_gpa: u32,
}

impl PassProgram {
    /// A store happens when the next LCG value is below this (for
    /// `write_pct` in 1..=99; 0 and 100 use no LCG step).
    fn store_threshold(&self) -> u32 {
        ((u64::from(self.write_pct) << 32) / 100) as u32
    }

    fn check(&self) -> Result<(), KvmError> {
        let end = u64::from(self.base_gpa) + u64::from(self.pages) * PAGE_SIZE;
        if self.pages == 0 || self.write_pct > 100 || end > 1 << 32 || !self.pass_word_gpa.is_multiple_of(8) {
            return Err(BadConfig::PassProgram(*self).into());
        }
        Ok(())
    }
}

fn finish(a: Asm) -> Result<Vec<u8>, KvmError> {
    a.finish().ok_or(KvmError::BadConfig(BadConfig::UnresolvedJump))
}

/// `imul esi, esi, LCG_A; add esi, LCG_C`: the LCG state lives in `esi`.
fn emit_lcg_step(a: &mut Asm) {
    a.imul_imm(Reg::Esi, Reg::Esi, LCG_A);
    a.add_imm(Reg::Esi, LCG_C);
}

/// The dirtying guest (`dirty_log_perf_test`'s `vcpu_worker` loop):
///
/// ```text
/// pass:  inc ebp                     ; pass number, 1 on the first pass
///        mov edi, pass_word_gpa
///        mov [edi], ebp              ; the high dword stays 0
///        movq mm0, [edi]             ; the 8-byte value every store stores
///        mov ebx, base_gpa
///        mov esp, chunks - 1         ; chunks of CHUNK_PAGES, the first
///        mov ecx, first              ; one the remainder (1..=CHUNK_PAGES)
/// chunk: add [edi + PAGES_BEGUN_OFFSET], ecx
/// next:  ; random: esi = lcg(esi); edx = base_gpa + 4096 * hi32(esi * pages)
///        ; mixed:  esi = lcg(esi); store iff esi < write_pct% of 2^32
///        movq [page], mm0            ; or movq mm1, [page] for a load
///        add ebx, 4096               ; (sequential)
///        dec ecx
///        jne next
///        mov eax, [edi + DELAY_OFFSET]
///        cmp eax, 0
///        je nodelay
/// delay: dec eax                     ; the calibrated delay: the pace
///        jne delay
/// nodelay: mov eax, [edi + PACE_FLAG_OFFSET]
///        cmp eax, 0
///        je nopace
///        mov eax, UCALL_CHUNK        ; a chunk is done: the host's pace
///        out UCALL_PORT, al
/// nopace: mov ecx, CHUNK_PAGES
///        dec esp
///        jns chunk
///        mov eax, UCALL_PASS_DONE
///        out UCALL_PORT, al
///        jmp pass
/// ```
///
/// The per-page loop is the one before chunks; a chunk adds ten
/// instructions per 64 pages (an emulated guest pays each), and two per
/// iteration of its delay. `esp` serves as the chunk count: the program has
/// no stack.
///
/// Registers at entry: `ebp` = 0 (passes done), `esi` = LCG seed.
pub fn pass_program(p: &PassProgram) -> Result<Vec<u8>, KvmError> {
    use Reg::*;
    p.check()?;
    let mut a = Asm::new();
    let pass = a.label();
    let next = a.label();
    a.bind(pass);
    a.inc(Ebp);
    a.mov_imm(Edi, p.pass_word_gpa);
    a.store(Edi, 0, Ebp);
    a.movq_load(Mm(0), Edi, 0);
    a.mov_imm(Ebx, p.base_gpa);
    a.mov_imm(Esp, p.pages.div_ceil(CHUNK_PAGES) - 1);
    a.mov_imm(Ecx, chunk_pages(p.pages, 0));
    let chunk = a.label();
    a.bind(chunk);
    a.add_to_mem(Edi, PAGES_BEGUN_OFFSET as i8, Ecx);
    a.bind(next);
    let page = if p.random {
        emit_lcg_step(&mut a);
        a.mov_rr(Eax, Esi);
        a.mov_imm(Edx, p.pages);
        a.mul(Edx);
        a.shl_imm(Edx, 12);
        a.add_imm(Edx, p.base_gpa);
        Edx
    } else {
        Ebx
    };
    match p.write_pct {
        0 => a.movq_load(Mm(1), page, 0),
        100 => a.movq_store(page, 0, Mm(0)),
        _ => {
            let (load, done): (Label, Label) = (a.label(), a.label());
            emit_lcg_step(&mut a);
            a.cmp_imm(Esi, p.store_threshold());
            a.jcc(Cond::AboveEq, load);
            a.movq_store(page, 0, Mm(0));
            a.jmp(done);
            a.bind(load);
            a.movq_load(Mm(1), page, 0);
            a.bind(done);
        }
    }
    if !p.random {
        a.add_imm(Ebx, PAGE_SIZE as u32);
    }
    a.dec(Ecx);
    a.jcc(Cond::NotEq, next);
    let (delay, nodelay) = (a.label(), a.label());
    a.load(Eax, Edi, DELAY_OFFSET as i8);
    a.cmp_imm(Eax, 0);
    a.jcc(Cond::Eq, nodelay);
    a.bind(delay);
    a.dec(Eax);
    a.jcc(Cond::NotEq, delay);
    a.bind(nodelay);
    let nopace = a.label();
    a.load(Eax, Edi, PACE_FLAG_OFFSET as i8);
    a.cmp_imm(Eax, 0);
    a.jcc(Cond::Eq, nopace);
    a.mov_imm(Eax, u32::from(UCALL_CHUNK));
    a.out_al(UCALL_PORT as u8);
    a.bind(nopace);
    a.mov_imm(Ecx, CHUNK_PAGES);
    a.dec(Esp);
    a.jcc(Cond::NotSign, chunk);
    a.mov_imm(Eax, u32::from(UCALL_PASS_DONE));
    a.out_al(UCALL_PORT as u8);
    a.jmp(pass);
    finish(a)
}

/// What one pass of [`pass_program`] does, from LCG state `lcg` (updated as
/// the guest updates `esi`): calls `access(page, store)` for each access in
/// order, `page` counted from the slice's first page.
pub fn model_pass(p: &PassProgram, lcg: &mut u32, mut access: impl FnMut(u64, bool)) {
    let threshold = p.store_threshold();
    for i in 0..u64::from(p.pages) {
        let page = if p.random {
            *lcg = lcg_next(*lcg);
            (u64::from(*lcg) * u64::from(p.pages)) >> 32
        } else {
            i
        };
        let store = match p.write_pct {
            0 => false,
            100 => true,
            _ => {
                *lcg = lcg_next(*lcg);
                *lcg < threshold
            }
        };
        access(page, store);
    }
}

/// Guest physical address of [`script_program`]'s table in the control
/// slot: a `u64` count, padding to 16 bytes, then `count` entries of
/// (`u64` guest physical address, `u64` value).
pub const SCRIPT_TABLE_GPA: u32 = 0x1000;
/// Bytes of a script table entry.
pub const SCRIPT_ENTRY_BYTES: u64 = 16;

/// The table-driven writer: executes the stores of its table in order, then
/// makes a [`UCALL_SCRIPT_DONE`] ucall.
///
/// ```text
/// start: mov esi, SCRIPT_TABLE_GPA
///        mov ecx, [esi]              ; count
///        add esi, 16
///        cmp ecx, 0
///        je done
/// next:  mov ebx, [esi]              ; address
///        movq mm0, [esi + 8]         ; value
///        movq [ebx], mm0
///        add esi, 16
///        dec ecx
///        jne next
/// done:  mov eax, UCALL_SCRIPT_DONE
///        out UCALL_PORT, al
///        jmp start
/// ```
pub fn script_program() -> Result<Vec<u8>, KvmError> {
    use Reg::*;
    let mut a = Asm::new();
    let (start, next, done) = (a.label(), a.label(), a.label());
    a.bind(start);
    a.mov_imm(Esi, SCRIPT_TABLE_GPA);
    a.load(Ecx, Esi, 0);
    a.add_imm(Esi, SCRIPT_ENTRY_BYTES as u32);
    a.cmp_imm(Ecx, 0);
    a.jcc(Cond::Eq, done);
    a.bind(next);
    a.load(Ebx, Esi, 0);
    a.movq_load(Mm(0), Esi, 8);
    a.movq_store(Ebx, 0, Mm(0));
    a.add_imm(Esi, SCRIPT_ENTRY_BYTES as u32);
    a.dec(Ecx);
    a.jcc(Cond::NotEq, next);
    a.bind(done);
    a.mov_imm(Eax, u32::from(UCALL_SCRIPT_DONE));
    a.out_al(UCALL_PORT as u8);
    a.jmp(start);
    finish(a)
}

/// The execution probe: `movd mm0, eax` (which hardware executes and KVM's
/// instruction emulator does not implement), then a [`UCALL_PROBE`] ucall
/// and `hlt`.
pub fn probe_program() -> Result<Vec<u8>, KvmError> {
    let mut a = Asm::new();
    a.movd_mm_r(Mm(0), Reg::Eax);
    a.mov_imm(Reg::Eax, u32::from(UCALL_PROBE));
    a.out_al(UCALL_PORT as u8);
    a.hlt();
    finish(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prog(write_pct: u8, random: bool) -> PassProgram {
        PassProgram { base_gpa: 1 << 30, pages: 1000, write_pct, random, pass_word_gpa: 0x800 }
    }

    #[test]
    fn lcg_is_numerical_recipes_ranqd1() {
        // The first values from seed 0, as listed with ranqd1.
        assert_eq!(lcg_next(0), 0x3c6e_f35f);
        assert_eq!(lcg_next(0x3c6e_f35f), 0x4750_2932);
        assert_eq!(lcg_next(0x4750_2932), 0xd1cc_f6e9);
    }

    #[test]
    fn model_sweeps_in_order_or_draws_with_replacement() {
        let mut lcg = 7;
        let mut pages = Vec::new();
        model_pass(&prog(100, false), &mut lcg, |p, s| {
            assert!(s);
            pages.push(p);
        });
        assert_eq!(pages, (0..1000).collect::<Vec<_>>());
        assert_eq!(lcg, 7, "a sequential all-store pass draws nothing");

        let mut seen = vec![false; 1000];
        model_pass(&prog(100, true), &mut lcg, |p, _| seen[p as usize] = true);
        let distinct = seen.iter().filter(|&&s| s).count();
        // 1000 draws with replacement from 1000: about 632 distinct.
        assert!((560..700).contains(&distinct), "{distinct} distinct pages");
    }

    #[test]
    fn model_store_share_follows_write_pct() {
        for pct in [0u8, 10, 50, 90, 100] {
            let mut lcg = 1;
            let mut stores = 0;
            for _ in 0..20 {
                model_pass(&prog(pct, false), &mut lcg, |_, s| stores += u32::from(s));
            }
            let want = 200 * u32::from(pct);
            assert!(stores.abs_diff(want) <= 400, "{pct}%: {stores} stores of 20000");
        }
    }

    #[test]
    fn programs_assemble_and_end_in_a_ucall_loop() {
        for pct in [0, 30, 100] {
            for random in [false, true] {
                let code = pass_program(&prog(pct, random)).expect("assembles");
                // ... mov eax, UCALL_PASS_DONE; out 0x10, al; jmp pass (offset 0).
                let n = code.len();
                assert_eq!(&code[n - 12..n - 5], &[0xb8, UCALL_PASS_DONE, 0, 0, 0, 0xe6, 0x10]);
                let back = i32::from_le_bytes(code[n - 4..].try_into().expect("4 bytes"));
                assert_eq!(back, -(n as i32), "jumps back to the start");
            }
        }
        assert!(script_program().expect("assembles").len() < 128);
        assert_eq!(&probe_program().expect("assembles")[..3], &[0x0f, 0x6e, 0xc0]);
    }

    #[test]
    fn bad_pass_programs_are_refused() {
        let ok = prog(50, false);
        for bad in [
            PassProgram { pages: 0, ..ok },
            PassProgram { write_pct: 101, ..ok },
            PassProgram { base_gpa: u32::MAX - 4095, pages: 2, ..ok },
            PassProgram { pass_word_gpa: 4, ..ok },
        ] {
            match pass_program(&bad) {
                Err(KvmError::BadConfig(BadConfig::PassProgram(p))) => assert_eq!(p, bad),
                other => panic!("{bad:?}: expected BadConfig::PassProgram, got {other:?}"),
            }
        }
    }
}
