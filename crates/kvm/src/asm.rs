//! A tiny x86 assembler for the guest programs: the handful of 32-bit
//! protected-mode instructions they need, hand-encoded.
//!
//! Every instruction here has 32-bit operands and no prefix (the default in
//! a code segment with D = 1). Encodings follow the Intel SDM, volume 2:
//! `ModRM = mod << 6 | reg << 3 | rm`; `mod = 11` names a register, `mod =
//! 01` a base register plus an 8-bit displacement. A base of `esp` (rm = 100)
//! needs a SIB byte (`0x24`: no index, base esp); `ebp` as a base is fine with
//! `mod = 01`. Each encoding is unit-tested against the bytes GNU `as` emits
//! for it (`as --32`, `objdump -d`).
//!
//! Invariants: jumps are `rel32`, relative to the end of the jump, patched
//! when the program is finished; [`Asm::finish`] refuses a program with a
//! jump to a label that was never bound, so a returned program never jumps
//! into garbage.

/// A 32-bit general purpose register, numbered as in ModRM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // the full register file, so encodings read as in the SDM
pub(crate) enum Reg {
    Eax = 0,
    Ecx = 1,
    Edx = 2,
    Ebx = 3,
    Esp = 4,
    Ebp = 5,
    Esi = 6,
    Edi = 7,
}

/// An MMX register `mm0`..`mm7` (for 8-byte loads and stores in 32-bit
/// mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mm(pub u8);

/// A condition of `jcc` (the low nibble of its `0F 8x` opcode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cond {
    /// Unsigned above or equal (CF = 0): `jae`.
    AboveEq = 0x3,
    /// Equal (ZF = 1): `je`.
    Eq = 0x4,
    /// Not equal (ZF = 0): `jne`.
    NotEq = 0x5,
    /// Not sign (SF = 0): `jns`.
    NotSign = 0x9,
}

/// A jump target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Label(usize);

/// A program being assembled.
#[derive(Debug, Default)]
pub(crate) struct Asm {
    code: Vec<u8>,
    /// Offset each label is bound to.
    labels: Vec<Option<usize>>,
    /// (offset of a rel32 field, its label).
    fixups: Vec<(usize, Label)>,
}

const fn modrm(md: u8, reg: u8, rm: u8) -> u8 {
    md << 6 | (reg & 7) << 3 | (rm & 7)
}

impl Asm {
    /// An empty program.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }

    fn emit_u32(&mut self, v: u32) {
        self.code.extend_from_slice(&v.to_le_bytes());
    }

    /// ModRM (and SIB) for `reg` with the memory operand `[base + disp8]`.
    fn mem_operand(&mut self, reg: u8, base: Reg, disp: i8) {
        self.emit(&[modrm(0b01, reg, base as u8)]);
        if base == Reg::Esp {
            self.emit(&[0x24]);
        }
        self.emit(&[disp as u8]);
    }

    /// A new, unbound label.
    pub(crate) fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `l` to the current offset.
    pub(crate) fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.code.len());
    }

    /// `mov r32, imm32`: `B8+rd id`.
    pub(crate) fn mov_imm(&mut self, dst: Reg, imm: u32) {
        self.emit(&[0xb8 + dst as u8]);
        self.emit_u32(imm);
    }

    /// `mov r/m32, r32` with a register destination: `89 /r`, mod 11.
    pub(crate) fn mov_rr(&mut self, dst: Reg, src: Reg) {
        self.emit(&[0x89, modrm(0b11, src as u8, dst as u8)]);
    }

    /// `mov [base + disp8], r32`: `89 /r`.
    pub(crate) fn store(&mut self, base: Reg, disp: i8, src: Reg) {
        self.emit(&[0x89]);
        self.mem_operand(src as u8, base, disp);
    }

    /// `mov r32, [base + disp8]`: `8B /r`.
    /// `add [base + disp], src`: a read-modify-write of guest memory.
    pub(crate) fn add_to_mem(&mut self, base: Reg, disp: i8, src: Reg) {
        self.emit(&[0x01]);
        self.mem_operand(src as u8, base, disp);
    }

    pub(crate) fn load(&mut self, dst: Reg, base: Reg, disp: i8) {
        self.emit(&[0x8b]);
        self.mem_operand(dst as u8, base, disp);
    }

    /// `movd mm, r32`: `0F 6E /r`, mod 11.
    pub(crate) fn movd_mm_r(&mut self, dst: Mm, src: Reg) {
        self.emit(&[0x0f, 0x6e, modrm(0b11, dst.0, src as u8)]);
    }

    /// `movq [base + disp8], mm`: `0F 7F /r` (one 8-byte store).
    pub(crate) fn movq_store(&mut self, base: Reg, disp: i8, src: Mm) {
        self.emit(&[0x0f, 0x7f]);
        self.mem_operand(src.0, base, disp);
    }

    /// `movq mm, [base + disp8]`: `0F 6F /r` (one 8-byte load).
    pub(crate) fn movq_load(&mut self, dst: Mm, base: Reg, disp: i8) {
        self.emit(&[0x0f, 0x6f]);
        self.mem_operand(dst.0, base, disp);
    }

    /// `add r/m32, imm32`: `81 /0 id`.
    pub(crate) fn add_imm(&mut self, dst: Reg, imm: u32) {
        self.emit(&[0x81, modrm(0b11, 0, dst as u8)]);
        self.emit_u32(imm);
    }

    /// `cmp r/m32, imm32`: `81 /7 id`.
    pub(crate) fn cmp_imm(&mut self, lhs: Reg, imm: u32) {
        self.emit(&[0x81, modrm(0b11, 7, lhs as u8)]);
        self.emit_u32(imm);
    }

    /// `imul r32, r/m32, imm32`: `69 /r id` (dst = src * imm, low 32 bits).
    pub(crate) fn imul_imm(&mut self, dst: Reg, src: Reg, imm: u32) {
        self.emit(&[0x69, modrm(0b11, dst as u8, src as u8)]);
        self.emit_u32(imm);
    }

    /// `mul r/m32`: `F7 /4` (edx:eax = eax * src, unsigned).
    pub(crate) fn mul(&mut self, src: Reg) {
        self.emit(&[0xf7, modrm(0b11, 4, src as u8)]);
    }

    /// `shl r/m32, imm8`: `C1 /4 ib`.
    pub(crate) fn shl_imm(&mut self, dst: Reg, n: u8) {
        self.emit(&[0xc1, modrm(0b11, 4, dst as u8), n]);
    }

    /// `inc r32`: `40+rd` (the one-byte form of 32-bit mode).
    pub(crate) fn inc(&mut self, r: Reg) {
        self.emit(&[0x40 + r as u8]);
    }

    /// `dec r32`: `48+rd`.
    pub(crate) fn dec(&mut self, r: Reg) {
        self.emit(&[0x48 + r as u8]);
    }

    /// `jcc rel32`: `0F 80+cc cd`.
    pub(crate) fn jcc(&mut self, cond: Cond, to: Label) {
        self.emit(&[0x0f, 0x80 + cond as u8]);
        self.fixups.push((self.code.len(), to));
        self.emit_u32(0);
    }

    /// `jmp rel32`: `E9 cd`.
    pub(crate) fn jmp(&mut self, to: Label) {
        self.emit(&[0xe9]);
        self.fixups.push((self.code.len(), to));
        self.emit_u32(0);
    }

    /// `out imm8, al`: `E6 ib`.
    pub(crate) fn out_al(&mut self, port: u8) {
        self.emit(&[0xe6, port]);
    }

    /// `hlt`: `F4`.
    pub(crate) fn hlt(&mut self) {
        self.emit(&[0xf4]);
    }

    /// The program, jumps patched; `None` if a jump targets a label that
    /// was never bound.
    pub(crate) fn finish(mut self) -> Option<Vec<u8>> {
        for &(at, Label(l)) in &self.fixups {
            let target = self.labels[l]?;
            // rel32 counts from the end of the 4-byte field. Programs are far
            // below 2 GiB, so both offsets fit in i64 and the difference in i32.
            let rel = target as i64 - (at as i64 + 4);
            let rel = i32::try_from(rel).ok()?;
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        Some(self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::Reg::*;
    use super::*;

    fn bytes(f: impl FnOnce(&mut Asm)) -> Vec<u8> {
        let mut a = Asm::new();
        f(&mut a);
        a.finish().expect("no unbound labels")
    }

    // Expected bytes: GNU as, `as --32` then `objdump -d`, for the
    // instruction in each comment (zero displacements: `objdump -D -b binary
    // -mi386` of the bytes, see the module docs).
    #[test]
    fn mov_encodings() {
        // mov $0x12345678,%ebx / mov eax,0xdeadbeef
        assert_eq!(bytes(|a| a.mov_imm(Ebx, 0x1234_5678)), [0xbb, 0x78, 0x56, 0x34, 0x12]);
        assert_eq!(bytes(|a| a.mov_imm(Eax, 0xdead_beef)), [0xb8, 0xef, 0xbe, 0xad, 0xde]);
        // mov %esi,%eax
        assert_eq!(bytes(|a| a.mov_rr(Eax, Esi)), [0x89, 0xf0]);
        // mov %ebp,0x0(%ebx)  /  mov %edx,0x4(%ebx)
        assert_eq!(bytes(|a| a.store(Ebx, 0, Ebp)), [0x89, 0x6b, 0x00]);
        assert_eq!(bytes(|a| a.store(Ebx, 4, Edx)), [0x89, 0x53, 0x04]);
        // mov %eax,-0x8(%esp) (SIB) / mov %eax,0x0(%ebp)
        assert_eq!(bytes(|a| a.store(Esp, -8, Eax)), [0x89, 0x44, 0x24, 0xf8]);
        assert_eq!(bytes(|a| a.store(Ebp, 0, Eax)), [0x89, 0x45, 0x00]);
        // mov 0x8(%esi),%eax / mov 0xc(%esi),%edx
        assert_eq!(bytes(|a| a.load(Eax, Esi, 8)), [0x8b, 0x46, 0x08]);
        assert_eq!(bytes(|a| a.load(Edx, Esi, 12)), [0x8b, 0x56, 0x0c]);
        // add %ecx,0x18(%edi)
        assert_eq!(bytes(|a| a.add_to_mem(Edi, 24, Ecx)), [0x01, 0x4f, 0x18]);
    }

    #[test]
    fn mmx_encodings() {
        // movd %ebp,%mm0 / movq %mm0,0x0(%ebx) / movq 0x0(%ebx),%mm1
        assert_eq!(bytes(|a| a.movd_mm_r(Mm(0), Ebp)), [0x0f, 0x6e, 0xc5]);
        assert_eq!(bytes(|a| a.movq_store(Ebx, 0, Mm(0))), [0x0f, 0x7f, 0x43, 0x00]);
        assert_eq!(bytes(|a| a.movq_load(Mm(1), Ebx, 0)), [0x0f, 0x6f, 0x4b, 0x00]);
    }

    #[test]
    fn alu_encodings() {
        // add $0x3c6ef35f,%esi / cmp $0x80000000,%esi
        assert_eq!(bytes(|a| a.add_imm(Esi, 0x3c6e_f35f)), [0x81, 0xc6, 0x5f, 0xf3, 0x6e, 0x3c]);
        assert_eq!(bytes(|a| a.cmp_imm(Esi, 0x8000_0000)), [0x81, 0xfe, 0x00, 0x00, 0x00, 0x80]);
        // imul $0x19660d,%esi,%esi / mul %ecx
        assert_eq!(bytes(|a| a.imul_imm(Esi, Esi, 0x0019_660d)), [0x69, 0xf6, 0x0d, 0x66, 0x19, 0x00]);
        assert_eq!(bytes(|a| a.mul(Ecx)), [0xf7, 0xe1]);
        // shl $0xc,%edx
        assert_eq!(bytes(|a| a.shl_imm(Edx, 12)), [0xc1, 0xe2, 0x0c]);
        // inc %ebp / dec %ecx
        assert_eq!(bytes(|a| a.inc(Ebp)), [0x45]);
        assert_eq!(bytes(|a| a.dec(Ecx)), [0x49]);
    }

    #[test]
    fn control_encodings() {
        // out %al,$0x10 / hlt
        assert_eq!(bytes(|a| a.out_al(0x10)), [0xe6, 0x10]);
        assert_eq!(bytes(|a| a.hlt()), [0xf4]);
        // top: dec %ecx; jne top  =>  49 0f 85 f9 ff ff ff (rel32 = -7)
        let back = bytes(|a| {
            let top = a.label();
            a.bind(top);
            a.dec(Ecx);
            a.jcc(Cond::NotEq, top);
        });
        assert_eq!(back, [0x49, 0x0f, 0x85, 0xf9, 0xff, 0xff, 0xff]);
        // jae / je / jns forward over one hlt: 0f 83 01 00 00 00 f4, 0f 84 ...
        for (cond, op) in [(Cond::AboveEq, 0x83), (Cond::Eq, 0x84), (Cond::NotSign, 0x89)] {
            let fwd = bytes(|a| {
                let over = a.label();
                a.jcc(cond, over);
                a.hlt();
                a.bind(over);
            });
            assert_eq!(fwd, [0x0f, op, 0x01, 0x00, 0x00, 0x00, 0xf4]);
        }
        // jmp to itself: e9 fb ff ff ff (rel32 = -5)
        let spin = bytes(|a| {
            let l = a.label();
            a.bind(l);
            a.jmp(l);
        });
        assert_eq!(spin, [0xe9, 0xfb, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn unbound_label_is_refused() {
        let mut a = Asm::new();
        let l = a.label();
        a.jmp(l);
        assert_eq!(a.finish(), None);
    }
}
