//! A small eBPF assembler: instruction encoding and forward/backward labels.
//!
//! Just what the kernel tagger needs (no ELF, no relocations other than map
//! file descriptors, which go straight into `ld_map_fd`). Encodings follow the
//! kernel's `include/uapi/linux/bpf.h` and Documentation/bpf/standardization.

use std::collections::HashMap;

/// One encoded instruction (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    /// `dst_reg` in the low nibble, `src_reg` in the high one (little-endian bitfields).
    regs: u8,
    off: i16,
    imm: i32,
}

/// A register, `R0`..`R10` (`R10` is the read-only frame pointer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reg(u8);

pub const R0: Reg = Reg(0);
pub const R1: Reg = Reg(1);
pub const R2: Reg = Reg(2);
pub const R3: Reg = Reg(3);
pub const R4: Reg = Reg(4);
pub const R5: Reg = Reg(5);
pub const R6: Reg = Reg(6);
pub const R7: Reg = Reg(7);
pub const R8: Reg = Reg(8);
pub const R9: Reg = Reg(9);
pub const FP: Reg = Reg(10);

/// Access size of a load or store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    B = 0x10,
    H = 0x08,
    W = 0x00,
    DW = 0x18,
}

/// 64-bit ALU operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alu {
    Add = 0x00,
    Sub = 0x10,
    Or = 0x40,
    And = 0x50,
    Lsh = 0x60,
    Rsh = 0x70,
    Xor = 0xa0,
    Mov = 0xb0,
}

/// Conditional jumps (unsigned comparisons unless named otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jmp {
    Eq = 0x10,
    Gt = 0x20,
    Ge = 0x30,
    Set = 0x40,
    Ne = 0x50,
    Lt = 0xa0,
    Le = 0xb0,
}

const CLASS_LD: u8 = 0x00;
const CLASS_LDX: u8 = 0x01;
const CLASS_ST: u8 = 0x02;
const CLASS_STX: u8 = 0x03;
const CLASS_ALU: u8 = 0x04;
const CLASS_JMP: u8 = 0x05;
const CLASS_ALU64: u8 = 0x07;
const MODE_IMM: u8 = 0x00;
const MODE_MEM: u8 = 0x60;
const MODE_ATOMIC: u8 = 0xc0;
const SRC_K: u8 = 0x00;
const SRC_X: u8 = 0x08;
const OP_END: u8 = 0xd0;
const TO_BE: u8 = 0x08;
const OP_JA: u8 = 0x00;
const OP_CALL: u8 = 0x80;
const OP_EXIT: u8 = 0x90;
const ATOMIC_ADD: i32 = 0x00;
/// `src_reg` of an `ld_imm64` whose immediate is a map file descriptor.
const PSEUDO_MAP_FD: u8 = 1;

fn insn(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst.0 | (src.0 << 4),
        off,
        imm,
    }
}

/// Builds a program; jumps name labels that [`Asm::finish`] resolves.
#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
    errors: Vec<String>,
}

impl Asm {
    pub fn new() -> Asm {
        Asm::default()
    }

    fn push(&mut self, i: Insn) -> &mut Asm {
        self.insns.push(i);
        self
    }

    /// Places `name` at the next instruction.
    pub fn label(&mut self, name: &'static str) -> &mut Asm {
        if self.labels.insert(name, self.insns.len()).is_some() {
            self.errors.push(format!("label `{name}` defined twice"));
        }
        self
    }

    /// `dst = imm` (sign-extended to 64 bits).
    pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Asm {
        self.alu_imm(Alu::Mov, dst, imm)
    }

    /// `dst = src`.
    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Asm {
        self.alu(Alu::Mov, dst, src)
    }

    /// `dst op= imm` (64-bit).
    pub fn alu_imm(&mut self, op: Alu, dst: Reg, imm: i32) -> &mut Asm {
        self.push(insn(CLASS_ALU64 | op as u8 | SRC_K, dst, R0, 0, imm))
    }

    /// `dst op= src` (64-bit).
    pub fn alu(&mut self, op: Alu, dst: Reg, src: Reg) -> &mut Asm {
        self.push(insn(CLASS_ALU64 | op as u8 | SRC_X, dst, src, 0, 0))
    }

    /// `dst = htobe16(dst)` (upper bits cleared); its own inverse.
    pub fn be16(&mut self, dst: Reg) -> &mut Asm {
        self.push(insn(CLASS_ALU | OP_END | TO_BE, dst, R0, 0, 16))
    }

    /// `dst = *(size *)(src + off)`.
    pub fn ldx(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Asm {
        self.push(insn(CLASS_LDX | size as u8 | MODE_MEM, dst, src, off, 0))
    }

    /// `*(size *)(dst + off) = src`.
    pub fn stx(&mut self, size: Size, dst: Reg, off: i16, src: Reg) -> &mut Asm {
        self.push(insn(CLASS_STX | size as u8 | MODE_MEM, dst, src, off, 0))
    }

    /// `*(size *)(dst + off) = imm`.
    pub fn st_imm(&mut self, size: Size, dst: Reg, off: i16, imm: i32) -> &mut Asm {
        self.push(insn(CLASS_ST | size as u8 | MODE_MEM, dst, R0, off, imm))
    }

    /// `lock *(u64 *)(dst + off) += src`.
    pub fn atomic_add64(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Asm {
        self.push(insn(
            CLASS_STX | Size::DW as u8 | MODE_ATOMIC,
            dst,
            src,
            off,
            ATOMIC_ADD,
        ))
    }

    /// `dst = <map with file descriptor fd>` (two instruction slots).
    pub fn ld_map_fd(&mut self, dst: Reg, fd: i32) -> &mut Asm {
        self.push(insn(
            CLASS_LD | Size::DW as u8 | MODE_IMM,
            dst,
            Reg(PSEUDO_MAP_FD),
            0,
            fd,
        ));
        self.push(insn(0, R0, R0, 0, 0))
    }

    fn jump_to(&mut self, i: Insn, target: &'static str) -> &mut Asm {
        self.fixups.push((self.insns.len(), target));
        self.push(i)
    }

    /// `if dst op imm goto target`.
    pub fn jmp_imm(&mut self, op: Jmp, dst: Reg, imm: i32, target: &'static str) -> &mut Asm {
        self.jump_to(insn(CLASS_JMP | op as u8 | SRC_K, dst, R0, 0, imm), target)
    }

    /// `if dst op imm` skip the next `skip` instructions.
    pub fn skip_imm(&mut self, op: Jmp, dst: Reg, imm: i32, skip: i16) -> &mut Asm {
        self.push(insn(CLASS_JMP | op as u8 | SRC_K, dst, R0, skip, imm))
    }

    /// `if dst op src goto target`.
    pub fn jmp(&mut self, op: Jmp, dst: Reg, src: Reg, target: &'static str) -> &mut Asm {
        self.jump_to(insn(CLASS_JMP | op as u8 | SRC_X, dst, src, 0, 0), target)
    }

    /// `goto target`.
    pub fn ja(&mut self, target: &'static str) -> &mut Asm {
        self.jump_to(insn(CLASS_JMP | OP_JA, R0, R0, 0, 0), target)
    }

    /// Calls helper number `helper` (arguments in R1..R5, result in R0;
    /// R1..R5 are clobbered).
    pub fn call(&mut self, helper: i32) -> &mut Asm {
        self.push(insn(CLASS_JMP | OP_CALL, R0, R0, 0, helper))
    }

    /// Returns R0.
    pub fn exit(&mut self) -> &mut Asm {
        self.push(insn(CLASS_JMP | OP_EXIT, R0, R0, 0, 0))
    }

    /// Resolves the labels.
    pub fn finish(mut self) -> Result<Vec<Insn>, String> {
        for (at, name) in std::mem::take(&mut self.fixups) {
            let Some(&target) = self.labels.get(name) else {
                self.errors
                    .push(format!("jump to undefined label `{name}`"));
                continue;
            };
            let off = target as i64 - at as i64 - 1;
            match i16::try_from(off) {
                Ok(off) => self.insns[at].off = off,
                Err(_) => self.errors.push(format!("jump to `{name}` out of range")),
            }
        }
        if self.errors.is_empty() {
            Ok(self.insns)
        } else {
            Err(self.errors.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(i: Insn) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = i.code;
        b[1] = i.regs;
        b[2..4].copy_from_slice(&i.off.to_le_bytes());
        b[4..8].copy_from_slice(&i.imm.to_le_bytes());
        b
    }

    #[test]
    fn encodings_match_the_kernel() {
        let mut a = Asm::new();
        a.mov_imm(R0, 2) // b7 00 .. 02
            .mov(R6, R1) // bf 16
            .ldx(Size::W, R2, R6, 16) // 61 62 10 00
            .stx(Size::DW, FP, -8, R3) // 7b 3a f8 ff
            .st_imm(Size::H, FP, -2, 7) // 6a 0a fe ff 07
            .atomic_add64(R9, 48, R1) // db 19 30 00
            .be16(R3) // dc 03 .. 10
            .label("top")
            .jmp_imm(Jmp::Ne, R0, 0, "out") // 55 00 01 00
            .ja("top") // 05 00 fe ff
            .label("out")
            .call(50) // 85 .. 32
            .ld_map_fd(R1, 9) // 18 11 .. 09, 00..
            .exit(); // 95
        let p = a.finish().unwrap();
        let want: [[u8; 8]; 13] = [
            [0xb7, 0x00, 0, 0, 2, 0, 0, 0],
            [0xbf, 0x16, 0, 0, 0, 0, 0, 0],
            [0x61, 0x62, 16, 0, 0, 0, 0, 0],
            [0x7b, 0x3a, 0xf8, 0xff, 0, 0, 0, 0],
            [0x6a, 0x0a, 0xfe, 0xff, 7, 0, 0, 0],
            [0xdb, 0x19, 48, 0, 0, 0, 0, 0],
            [0xdc, 0x03, 0, 0, 16, 0, 0, 0],
            [0x55, 0x00, 1, 0, 0, 0, 0, 0],
            [0x05, 0x00, 0xfe, 0xff, 0, 0, 0, 0],
            [0x85, 0x00, 0, 0, 50, 0, 0, 0],
            [0x18, 0x11, 0, 0, 9, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0x95, 0, 0, 0, 0, 0, 0, 0],
        ];
        let got: Vec<[u8; 8]> = p.into_iter().map(bytes).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn label_errors_are_reported() {
        let mut a = Asm::new();
        a.ja("nowhere").label("x").label("x").exit();
        let e = a.finish().unwrap_err();
        assert!(e.contains("nowhere") && e.contains("twice"), "{e}");
    }
}
