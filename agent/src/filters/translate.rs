//! Classic BPF (what libpcap emits) translated to an eBPF socket filter that counts what
//! the classic program accepts, packets and bytes (`skb->len`, plus 4 for a VLAN tag the
//! kernel took out of the frame: the on-wire length libpcap reports), in slot
//! `index` of a per-CPU array map, and always returns 0: no packet is queued.
//!
//! Register use: R6 the context, R7 the accumulator A, R8 the index register X, R9 how many
//! bytes of the packet's head were read ahead; classic scratch memory M[0..16] lives on the
//! stack (zeroed first, as the verifier wants). The first `HEAD_BYTES` (128) bytes of the
//! packet are read once with `bpf_skb_load_bytes`, 2 bytes past an 8-byte boundary so that
//! the IP header's fields are aligned; every load (`ld [k]`, `ld [x + k]`,
//! `ldxb 4*([k]&0xf)`) that falls within them is served from the stack (one aligned load
//! where the offset allows, else byte by byte), the one at `x + k` with a variable stack
//! offset bounded first (privileged programs only). A load within the first `HEAD_BYTES`
//! that the head does not hold lies past the packet's end: the classic program's "return
//! 0", at once; loads beyond them call the helper (out of bounds: "return 0" too). 32-bit
//! ALU and JMP32 keep the classic program's unsigned 32-bit arithmetic.
//! Supported ancillary loads: protocol, pkttype, ifindex and the VLAN ones libpcap uses on
//! Linux; anything else is refused and the filter keeps counting packets only.

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u8,
    /// dst (low nibble) and src (high nibble) registers.
    pub regs: u8,
    /// Offset.
    pub off: i16,
    /// Immediate.
    pub imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Classes and fields shared by classic and extended BPF.
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const STX: u16 = 0x03;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const LEN: u16 = 0x80;
const MSH: u16 = 0xa0;
const K: u16 = 0x00;
const X: u16 = 0x08;
const SRC_A: u16 = 0x10;

// eBPF only.
const E_LDX: u8 = 0x01;
const E_ST: u8 = 0x02;
const E_STX: u8 = 0x03;
const E_ALU: u8 = 0x04;
const E_JMP: u8 = 0x05;
const E_JMP32: u8 = 0x06;
const E_ALU64: u8 = 0x07;
const E_MOV: u8 = 0xb0;
const E_ADD: u8 = 0x00;
const E_AND: u8 = 0x50;
const E_LSH: u8 = 0x60;
const E_END: u8 = 0xd0;
const E_TO_BE: u8 = 0x08;
const E_JA: u8 = 0x00;
const E_JEQ: u8 = 0x10;
const E_JNE: u8 = 0x50;
const E_CALL: u8 = 0x80;
const E_EXIT: u8 = 0x90;
const E_SZ_W: u8 = 0x00;
const E_SZ_H: u8 = 0x08;
const E_SZ_B: u8 = 0x10;
const E_SZ_DW: u8 = 0x18;
const E_MEM: u8 = 0x60;
const E_IMM: u8 = 0x00;
const E_SRC_X: u8 = 0x08;
const E_LD: u8 = 0x00;

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const RA: u8 = 7;
const RX: u8 = 8;
const R9: u8 = 9;
const FP: u8 = 10;

const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_SKB_LOAD_BYTES: i32 = 26;
const HELPER_TAIL_CALL: i32 = 12;
const PACKET_OUTGOING: i32 = 4;
const PSEUDO_MAP_FD: u8 = 1;

/// Stack: M[0..16] at fp-64.., the load buffer at fp-72, the map key at fp-80.
const MEM_BASE: i16 = -64;
const BUF: i16 = -72;
const KEY: i16 = -80;
/// The stack area the first [`HEAD_BYTES`] of the packet are read into once per packet:
/// fp-216 to fp-80, zeroed first.
const HEAD: i16 = -216;
/// Where the packet's first byte lies in it: 2 bytes past an 8-byte boundary, so that an
/// Ethernet frame's network header (byte 14) starts on one and its 2- and 4-byte fields
/// (addresses, ports, EtherType) are aligned stack loads, one instruction each; the verifier
/// allows no unaligned stack load, so others are assembled byte by byte.
const PKT: i16 = HEAD + 2;
/// How much of the packet is read ahead: what libpcap's fixed-offset loads mostly reach.
const HEAD_BYTES: i32 = 128;
/// 8-byte stores that zero the head's area.
const HEAD_WORDS: i16 = (HEAD_BYTES as i16 + 2 + 7) / 8;
const E_OR: u8 = 0x40;
const E_JLT: u8 = 0xa0;
const E_JGT: u8 = 0x20;

const SKF_AD_OFF: i64 = -0x1000;

// `struct __sk_buff` offsets.
const SKB_LEN: i16 = 0;
const SKB_PKT_TYPE: i16 = 4;
const SKB_PROTOCOL: i16 = 16;
const SKB_VLAN_PRESENT: i16 = 20;
const SKB_VLAN_TCI: i16 = 24;
const SKB_VLAN_PROTO: i16 = 28;
const SKB_IFINDEX: i16 = 40;

/// Where a jump goes before offsets are known.
#[derive(Clone, Copy)]
enum Target {
    /// Instruction `.1` of program `.0`.
    Classic(usize, usize),
    /// Program `.0` rejects the packet.
    Drop(usize),
    /// Program `.0` accepts it.
    Count(usize),
}

/// Why a program was not translated.
#[derive(Debug, thiserror::Error)]
#[error("classic instruction {index} (code {code:#06x}, k {k:#x}) has no translation")]
pub struct Untranslatable {
    index: usize,
    code: u16,
    k: u32,
}

struct Emitter {
    out: Vec<Insn>,
    fixups: Vec<(usize, Target)>,
    /// The program being emitted.
    program: usize,
    /// A local jump whose target lies beyond an offset's reach.
    too_far: Option<usize>,
    /// `ld [x + k]` may read the head at a variable stack offset.
    variable_stack: bool,
}

impl Emitter {
    fn push(&mut self, i: Insn) {
        self.out.push(i);
    }

    fn jump(&mut self, i: Insn, target: Target) {
        self.fixups.push((self.out.len(), target));
        self.out.push(i);
    }

    /// A = packet bytes at R2 (size `size`), big-endian; out of bounds drops.
    fn load_packet(&mut self, size: u8) {
        self.push(insn(E_ALU64 | E_MOV | E_SRC_X, R1, R6, 0, 0));
        self.push(insn(E_ALU64 | E_MOV | E_SRC_X, R3, FP, 0, 0));
        self.push(insn(E_ALU64 | E_ADD, R3, 0, 0, i32::from(BUF)));
        self.push(insn(E_ALU64 | E_MOV, R4, 0, 0, i32::from(size)));
        self.push(insn(E_JMP | E_CALL, 0, 0, 0, HELPER_SKB_LOAD_BYTES));
        self.jump(insn(E_JMP | E_JNE, R0, 0, 0, 0), Target::Drop(self.program));
        let (sz, swap) = match size {
            4 => (E_SZ_W, 32),
            2 => (E_SZ_H, 16),
            _ => (E_SZ_B, 0),
        };
        self.push(insn(E_LDX | E_MEM | sz, RA, FP, BUF, 0));
        if swap != 0 {
            self.push(insn(E_ALU | E_END | E_TO_BE, RA, 0, 0, swap));
        }
    }

    /// A = packet bytes at the fixed offset `k`: from the head read ahead when they lie in
    /// it (R9 = how many bytes it holds), else through the helper. Bytes within
    /// [`HEAD_BYTES`] that the head does not hold lie past the packet's end (R9 is its
    /// length then; the head's read cannot fail for that length): the classic program's
    /// "return 0" at once.
    fn load_fixed(&mut self, k: i32, size: u8) {
        let end = k + i32::from(size);
        if end > HEAD_BYTES {
            self.push(insn(E_ALU64 | E_MOV, R2, 0, 0, k));
            self.load_packet(size);
            return;
        }
        self.jump(
            insn(E_JMP | E_JLT, R9, 0, 0, end),
            Target::Drop(self.program),
        );
        self.head_load(PKT + k as i16, size);
    }

    /// A = the `size` bytes at fp + `off` (in the head), big-endian: aligned loads where
    /// the offset allows, else byte by byte.
    fn head_load(&mut self, off: i16, size: u8) {
        let aligned = |n: i16| off.rem_euclid(n) == 0;
        match size {
            2 if aligned(2) => {
                self.push(insn(E_LDX | E_MEM | E_SZ_H, RA, FP, off, 0));
                self.push(insn(E_ALU | E_END | E_TO_BE, RA, 0, 0, 16));
            }
            4 if aligned(4) => {
                self.push(insn(E_LDX | E_MEM | E_SZ_W, RA, FP, off, 0));
                self.push(insn(E_ALU | E_END | E_TO_BE, RA, 0, 0, 32));
            }
            4 if aligned(2) => {
                self.push(insn(E_LDX | E_MEM | E_SZ_H, RA, FP, off, 0));
                self.push(insn(E_ALU | E_END | E_TO_BE, RA, 0, 0, 16));
                self.push(insn(E_ALU | E_LSH, RA, 0, 0, 16));
                self.push(insn(E_LDX | E_MEM | E_SZ_H, R1, FP, off + 2, 0));
                self.push(insn(E_ALU | E_END | E_TO_BE, R1, 0, 0, 16));
                self.push(insn(E_ALU | E_OR | E_SRC_X, RA, R1, 0, 0));
            }
            _ => self.head_bytes(FP, off, size),
        }
    }

    /// A = packet bytes at X + k (the 32-bit sum, as the kernel computes it): from the head
    /// read ahead when they lie in the bytes it holds, else through the helper, which gets
    /// the same offset; within [`HEAD_BYTES`] but not held, past the packet's end (see
    /// `load_fixed`).
    fn load_indirect(&mut self, k: i32, size: u8) {
        self.push(insn(E_ALU | E_MOV | E_SRC_X, R2, RX, 0, 0));
        self.push(insn(E_ALU | E_ADD, R2, 0, 0, k));
        if !self.variable_stack {
            self.load_packet(size);
            return;
        }
        // Unsigned: the bound the verifier sees on the stack offset below. A sum past the
        // buffer, or one the helper would take as negative, goes to the helper.
        let past_buffer =
            self.local_jump(insn(E_JMP | E_JGT, R2, 0, 0, HEAD_BYTES - i32::from(size)));
        self.push(insn(E_ALU64 | E_MOV | E_SRC_X, R3, R2, 0, 0));
        self.push(insn(E_ALU64 | E_ADD, R3, 0, 0, i32::from(size)));
        self.jump(
            insn(E_JMP | E_JGT | E_SRC_X, R3, R9, 0, 0),
            Target::Drop(self.program),
        );
        // A variable stack offset, within the zeroed buffer (privileged programs only).
        self.push(insn(E_ALU64 | E_MOV | E_SRC_X, R3, FP, 0, 0));
        self.push(insn(E_ALU64 | E_ADD | E_SRC_X, R3, R2, 0, 0));
        self.head_bytes(R3, PKT, size);
        let to_done = self.local_jump(insn(E_JMP | E_JA, 0, 0, 0, 0));
        self.land(past_buffer);
        self.load_packet(size);
        self.land(to_done);
    }

    /// X = 4 * (P[k] & 0xf), A kept: from the head read ahead when it holds byte `k`.
    fn load_msh(&mut self, k: i32) {
        if k < HEAD_BYTES {
            // Not held: past the packet's end (see `load_fixed`).
            self.jump(
                insn(E_JMP | E_JLT, R9, 0, 0, k + 1),
                Target::Drop(self.program),
            );
            self.push(insn(E_LDX | E_MEM | E_SZ_B, RX, FP, PKT + k as i16, 0));
            self.push(insn(E_ALU | E_AND, RX, 0, 0, 0xf));
            self.push(insn(E_ALU | E_LSH, RX, 0, 0, 2));
            return;
        }
        // Through A's register: keep A.
        self.push(insn(E_ALU64 | E_MOV | E_SRC_X, R4, RA, 0, 0));
        self.push(insn(E_STX | E_MEM | E_SZ_DW, FP, R4, KEY, 0));
        self.push(insn(E_ALU64 | E_MOV, R2, 0, 0, k));
        self.load_packet(1);
        self.push(insn(E_ALU | E_AND, RA, 0, 0, 0xf));
        self.push(insn(E_ALU | E_LSH, RA, 0, 0, 2));
        self.push(insn(E_ALU64 | E_MOV | E_SRC_X, RX, RA, 0, 0));
        self.push(insn(E_LDX | E_MEM | E_SZ_DW, RA, FP, KEY, 0));
    }

    /// A = the `size` bytes at `base + off` on the stack, big-endian, byte by byte: the
    /// verifier wants aligned stack reads.
    fn head_bytes(&mut self, base: u8, off: i16, size: u8) {
        self.push(insn(E_LDX | E_MEM | E_SZ_B, RA, base, off, 0));
        for i in 1..i16::from(size) {
            self.push(insn(E_ALU | E_LSH, RA, 0, 0, 8));
            self.push(insn(E_LDX | E_MEM | E_SZ_B, R1, base, off + i, 0));
            self.push(insn(E_ALU | E_OR | E_SRC_X, RA, R1, 0, 0));
        }
    }

    /// A jump within the code being emitted, its target set by [`Self::land`].
    fn local_jump(&mut self, i: Insn) -> usize {
        self.out.push(i);
        self.out.len() - 1
    }

    /// Points the local jump at `at` to the next instruction.
    fn land(&mut self, at: usize) {
        match i16::try_from(self.out.len() - at - 1) {
            Ok(off) => self.out[at].off = off,
            Err(_) => self.too_far = Some(at),
        }
    }

    fn load_skb(&mut self, dst: u8, field: i16) {
        self.push(insn(E_LDX | E_MEM | E_SZ_W, dst, R6, field, 0));
    }
}

/// Translates `classic` into an eBPF socket filter counting into slot `index` of the map
/// whose file descriptor is `map_fd`.
pub fn translate(
    classic: &[libc::sock_filter],
    map_fd: i32,
    index: u32,
) -> Result<Vec<Insn>, Untranslatable> {
    translate_many(&[(classic, index)], map_fd, None)
}

/// How the filters' program ends on an interface whose packet socket it shares with the
/// built-in classifier.
#[derive(Clone, Copy, Debug)]
pub struct Handover {
    /// The program array ([`super::bpf_sys::ProgArray`]) whose slot the program tail-calls
    /// after the filters: the classifier, when it watches the interface (empty, the call
    /// falls through).
    pub chain_fd: i32,
    /// A loopback interface: the outgoing copy of each packet skips the filters (tcpdump
    /// counts one copy) and still goes on to the classifier (which counts both).
    pub loopback: bool,
}

/// Translates several classic programs into one eBPF socket filter that runs each in turn,
/// each counting what it accepts into its own slot: one packet tap for all the filters of an
/// interface instead of one each; with `handover`, the program then tail-calls the
/// classifier, so that one tap serves both.
pub fn translate_many(
    programs: &[(&[libc::sock_filter], u32)],
    map_fd: i32,
    handover: Option<Handover>,
) -> Result<Vec<Insn>, Untranslatable> {
    translate_many_with(programs, map_fd, handover, true)
}

/// [`translate_many`]; with `variable_stack` false, `ld [x + k]` always calls the helper:
/// kernels before 5.12 refuse a stack read at a variable offset.
pub fn translate_many_with(
    programs: &[(&[libc::sock_filter], u32)],
    map_fd: i32,
    handover: Option<Handover>,
    variable_stack: bool,
) -> Result<Vec<Insn>, Untranslatable> {
    let mut e = Emitter {
        out: Vec::new(),
        fixups: Vec::new(),
        program: 0,
        too_far: None,
        variable_stack,
    };
    e.push(insn(E_ALU64 | E_MOV | E_SRC_X, R6, R1, 0, 0));
    let skip_outgoing = handover.filter(|h| h.loopback).map(|_| {
        e.load_skb(R1, SKB_PKT_TYPE);
        e.local_jump(insn(E_JMP | E_JEQ, R1, 0, 0, PACKET_OUTGOING))
    });
    // Read the head of the packet once: R9 = min(len, HEAD_BYTES) bytes at HEAD (zeroed
    // first, so the verifier knows it initialized); R9 = 0 if that fails.
    for slot in 0..HEAD_WORDS {
        e.push(insn(E_ST | E_MEM | E_SZ_DW, FP, 0, HEAD + slot * 8, 0));
    }
    e.load_skb(R9, SKB_LEN);
    e.push(insn(E_JMP | E_JLT, R9, 0, 1, HEAD_BYTES + 1));
    e.push(insn(E_ALU64 | E_MOV, R9, 0, 0, HEAD_BYTES));
    // An empty packet: nothing read ahead.
    e.push(insn(E_JMP | E_JLT, R9, 0, 8, 1));
    e.push(insn(E_ALU64 | E_MOV | E_SRC_X, R1, R6, 0, 0));
    e.push(insn(E_ALU64 | E_MOV, R2, 0, 0, 0));
    e.push(insn(E_ALU64 | E_MOV | E_SRC_X, R3, FP, 0, 0));
    e.push(insn(E_ALU64 | E_ADD, R3, 0, 0, i32::from(PKT)));
    e.push(insn(E_ALU64 | E_MOV | E_SRC_X, R4, R9, 0, 0));
    e.push(insn(E_JMP | E_CALL, 0, 0, 0, HELPER_SKB_LOAD_BYTES));
    e.push(insn(E_JMP | E_JEQ, R0, 0, 1, 0));
    e.push(insn(E_ALU64 | E_MOV, R9, 0, 0, 0));
    let mut starts: Vec<Vec<usize>> = Vec::new();
    let mut drops = Vec::new();
    let mut counts = Vec::new();
    let mut ends = Vec::new();
    for (p, (classic, index)) in programs.iter().enumerate() {
        e.program = p;
        let (s, end) = emit_program(&mut e, classic)?;
        starts.push(s);
        // Falling off the end is not possible in a valid classic program; drop anyway.
        drops.push(end);
        e.push(insn(E_JMP | E_JA, 0, 0, 0, 0));
        ends.push(e.out.len() - 1);
        counts.push(e.out.len());
        emit_count(&mut e, *index, map_fd);
        e.push(insn(E_JMP | E_JA, 0, 0, 0, 0));
        ends.push(e.out.len() - 1);
    }
    let exit_at = e.out.len();
    let mut not_tcp = Vec::new();
    if handover.is_some() {
        // Only what the classifier could count goes on to it: an untagged IPv4 or IPv6
        // packet whose protocol is not TCP is one it counts nothing of (anything else, a
        // VLAN-tagged frame or one too short to tell, goes on).
        let short = e.local_jump(insn(E_JMP | E_JLT, R9, 0, 0, 24));
        e.push(insn(E_LDX | E_MEM | E_SZ_H, R1, FP, PKT + 12, 0));
        e.push(insn(E_ALU | E_END | E_TO_BE, R1, 0, 0, 16));
        e.push(insn(E_LDX | E_MEM | E_SZ_B, R2, FP, PKT + 23, 0));
        let ipv4 = e.local_jump(insn(E_JMP | E_JEQ, R1, 0, 0, 0x0800));
        let other = e.local_jump(insn(E_JMP | E_JNE, R1, 0, 0, 0x86dd));
        e.push(insn(E_LDX | E_MEM | E_SZ_B, R2, FP, PKT + 20, 0));
        e.land(ipv4);
        not_tcp.push(e.local_jump(insn(E_JMP | E_JNE, R2, 0, 0, 6)));
        e.land(short);
        e.land(other);
    }
    if let Some(at) = skip_outgoing {
        e.land(at);
    }
    if let Some(h) = handover {
        e.push(insn(E_ALU64 | E_MOV | E_SRC_X, R1, R6, 0, 0));
        e.push(insn(
            E_LD | E_IMM | E_SZ_DW,
            R2,
            PSEUDO_MAP_FD,
            0,
            h.chain_fd,
        ));
        e.push(insn(0, 0, 0, 0, 0));
        e.push(insn(E_ALU64 | E_MOV, R3, 0, 0, 0));
        e.push(insn(E_JMP | E_CALL, 0, 0, 0, HELPER_TAIL_CALL));
    }
    for at in not_tcp {
        e.land(at);
    }
    e.push(insn(E_ALU64 | E_MOV, R0, 0, 0, 0));
    e.push(insn(E_JMP | E_EXIT, 0, 0, 0, 0));
    let too_far = |at: usize| Untranslatable {
        index: at,
        code: 0,
        k: 0,
    };
    // Each program's two exits go on to the next program (or the end).
    for (n, at) in ends.iter().enumerate() {
        let p = n / 2;
        let to = starts
            .get(p + 1)
            .and_then(|s| s.first().copied())
            .unwrap_or(exit_at);
        e.out[*at].off = i16::try_from(to as i64 - *at as i64 - 1).map_err(|_| too_far(*at))?;
    }
    if let Some(at) = e.too_far {
        return Err(too_far(at));
    }
    for (at, target) in std::mem::take(&mut e.fixups) {
        let to = match target {
            Target::Classic(p, i) => *starts[p].get(i).ok_or(too_far(i))?,
            Target::Drop(p) => drops[p],
            Target::Count(p) => counts[p],
        };
        e.out[at].off = i16::try_from(to as i64 - at as i64 - 1).map_err(|_| too_far(at))?;
    }
    Ok(e.out)
}

/// Emits one classic program; returns where each of its instructions starts (the first
/// entry is the program's start, before its prologue) and where its drop exit is.
fn emit_program(
    e: &mut Emitter,
    classic: &[libc::sock_filter],
) -> Result<(Vec<usize>, usize), Untranslatable> {
    let program_start = e.out.len();
    e.push(insn(E_ALU64 | E_MOV, RA, 0, 0, 0));
    e.push(insn(E_ALU64 | E_MOV, RX, 0, 0, 0));
    // Scratch memory is zeroed only for a program that reads it (most never do).
    let reads_memory = classic
        .iter()
        .any(|f| matches!(f.code & 0x07, LD | LDX) && f.code & 0xe0 == MEM);
    if reads_memory {
        for slot in 0..16 {
            e.push(insn(E_ST | E_MEM | E_SZ_W, FP, 0, MEM_BASE + slot * 4, 0));
        }
    }
    let mut starts = Vec::with_capacity(classic.len());
    let p = e.program;
    for (n, f) in classic.iter().enumerate() {
        starts.push(e.out.len());
        let bad = || Untranslatable {
            index: n,
            code: f.code,
            k: f.k,
        };
        let k = f.k as i32;
        let class = f.code & 0x07;
        match class {
            LD | LDX => {
                let dst = if class == LD { RA } else { RX };
                let size = match f.code & 0x18 {
                    W => 4,
                    H => 2,
                    B => 1,
                    _ => return Err(bad()),
                };
                match f.code & 0xe0 {
                    IMM => e.push(insn(E_ALU | E_MOV, dst, 0, 0, k)),
                    LEN => e.load_skb(dst, SKB_LEN),
                    MEM if f.k < 16 => e.push(insn(
                        E_LDX | E_MEM | E_SZ_W,
                        dst,
                        FP,
                        MEM_BASE + f.k as i16 * 4,
                        0,
                    )),
                    ABS if class == LD && i64::from(k) < 0 => {
                        let (field, swap) = match i64::from(k) - SKF_AD_OFF {
                            0 => (SKB_PROTOCOL, true),
                            4 => (SKB_PKT_TYPE, false),
                            8 => (SKB_IFINDEX, false),
                            44 => (SKB_VLAN_TCI, false),
                            48 => (SKB_VLAN_PRESENT, false),
                            60 => (SKB_VLAN_PROTO, true),
                            _ => return Err(bad()),
                        };
                        e.load_skb(RA, field);
                        if swap {
                            e.push(insn(E_ALU | E_END | E_TO_BE, RA, 0, 0, 16));
                        }
                    }
                    ABS if class == LD => e.load_fixed(k, size),
                    IND if class == LD => e.load_indirect(k, size),
                    MSH if class == LDX && size == 1 && k >= 0 => e.load_msh(k),
                    _ => return Err(bad()),
                }
            }
            ST | STX if f.k < 16 => {
                let src = if class == ST { RA } else { RX };
                e.push(insn(
                    E_STX | E_MEM | E_SZ_W,
                    FP,
                    src,
                    MEM_BASE + f.k as i16 * 4,
                    0,
                ));
            }
            ALU => {
                let op = (f.code & 0xf0) as u8;
                // add sub mul div or and lsh rsh neg mod xor share their codes.
                if !matches!(
                    op,
                    0x00 | 0x10 | 0x20 | 0x30 | 0x40 | 0x50 | 0x60 | 0x70 | 0x80 | 0x90 | 0xa0
                ) {
                    return Err(bad());
                }
                if op == 0x80 {
                    e.push(insn(E_ALU | op, RA, 0, 0, 0));
                } else if f.code & 0x08 == X {
                    if op == 0x30 || op == 0x90 {
                        e.jump(insn(E_JMP | E_JEQ, RX, 0, 0, 0), Target::Drop(p));
                    }
                    e.push(insn(E_ALU | op | E_SRC_X, RA, RX, 0, 0));
                } else {
                    if (op == 0x30 || op == 0x90) && k == 0 {
                        return Err(bad());
                    }
                    e.push(insn(E_ALU | op, RA, 0, 0, k));
                }
            }
            JMP => {
                let op = (f.code & 0xf0) as u8;
                let next = n + 1;
                if op == 0x00 {
                    e.jump(
                        insn(E_JMP | E_JA, 0, 0, 0, 0),
                        Target::Classic(p, next + f.k as usize),
                    );
                    continue;
                }
                // jeq jgt jge jset share their codes.
                if !matches!(op, 0x10 | 0x20 | 0x30 | 0x40) {
                    return Err(bad());
                }
                let cond = if f.code & 0x08 == X {
                    insn(E_JMP32 | op | E_SRC_X, RA, RX, 0, 0)
                } else {
                    insn(E_JMP32 | op, RA, 0, 0, k)
                };
                e.jump(cond, Target::Classic(p, next + usize::from(f.jt)));
                e.jump(
                    insn(E_JMP | E_JA, 0, 0, 0, 0),
                    Target::Classic(p, next + usize::from(f.jf)),
                );
            }
            RET => match f.code & 0x18 {
                K if f.k == 0 => e.jump(insn(E_JMP | E_JA, 0, 0, 0, 0), Target::Drop(p)),
                K => e.jump(insn(E_JMP | E_JA, 0, 0, 0, 0), Target::Count(p)),
                SRC_A => {
                    e.jump(insn(E_JMP32 | E_JEQ, RA, 0, 0, 0), Target::Drop(p));
                    e.jump(insn(E_JMP | E_JA, 0, 0, 0, 0), Target::Count(p));
                }
                _ => return Err(bad()),
            },
            MISC => match f.code & 0xf8 {
                0x00 => e.push(insn(E_ALU | E_MOV | E_SRC_X, RX, RA, 0, 0)),
                0x80 => e.push(insn(E_ALU | E_MOV | E_SRC_X, RA, RX, 0, 0)),
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        }
    }
    // Jumps to the program's first instruction land on its prologue.
    if let Some(first) = starts.first_mut() {
        *first = program_start;
    }
    if starts.is_empty() {
        starts.push(program_start);
    }
    let drop_at = e.out.len();
    Ok((starts, drop_at))
}

/// `map[index].packets += 1; map[index].bytes += on-wire length`.
fn emit_count(e: &mut Emitter, index: u32, map_fd: i32) {
    e.push(insn(E_ST | E_MEM | E_SZ_W, FP, 0, KEY, index as i32));
    e.push(insn(E_LD | E_IMM | E_SZ_DW, R1, PSEUDO_MAP_FD, 0, map_fd));
    e.push(insn(0, 0, 0, 0, 0));
    e.push(insn(E_ALU64 | E_MOV | E_SRC_X, R2, FP, 0, 0));
    e.push(insn(E_ALU64 | E_ADD, R2, 0, 0, i32::from(KEY)));
    e.push(insn(E_JMP | E_CALL, 0, 0, 0, HELPER_MAP_LOOKUP));
    // No entry (impossible for an index below max_entries): skip the 11 instructions of
    // the update.
    e.push(insn(E_JMP | E_JEQ, R0, 0, 11, 0));
    e.push(insn(E_LDX | E_MEM | E_SZ_DW, R1, R0, 0, 0));
    e.push(insn(E_ALU64 | E_ADD, R1, 0, 0, 1));
    e.push(insn(E_STX | E_MEM | E_SZ_DW, R0, R1, 0, 0));
    e.load_skb(R2, SKB_LEN);
    // A tag the kernel took out of the frame was on the wire (and is in libpcap's length):
    // 4 bytes more when `vlan_present` (0 or 1).
    e.load_skb(R3, SKB_VLAN_PRESENT);
    e.push(insn(E_ALU64 | E_LSH, R3, 0, 0, 2));
    e.push(insn(E_ALU64 | E_ADD | E_SRC_X, R2, R3, 0, 0));
    e.push(insn(E_LDX | E_MEM | E_SZ_DW, R1, R0, 8, 0));
    e.push(insn(E_ALU64 | E_ADD | E_SRC_X, R1, R2, 0, 0));
    e.push(insn(E_STX | E_MEM | E_SZ_DW, R0, R1, 8, 0));
    e.push(insn(E_ALU64 | E_MOV, R0, 0, 0, 0));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }

    #[test]
    fn jumps_land_on_the_translated_instructions() {
        // ldh [12]; jeq #0x800 jt 0 jf 1; ret #262144; ret #0
        let classic = [
            f(LD | H | ABS, 0, 0, 12),
            f(JMP | 0x10, 0, 1, 0x800),
            f(RET | K, 0, 0, 262_144),
            f(RET | K, 0, 0, 0),
        ];
        let out = translate_many(&[(&classic, 0), (&classic, 1)], 3, None).expect("translates");
        let exits = out.iter().filter(|i| i.code == E_JMP | E_EXIT).count();
        assert_eq!(exits, 1, "both programs go on to one exit");
        let slots: Vec<i32> = out
            .iter()
            .filter(|i| i.code == E_ST | E_MEM | E_SZ_W && i.off == KEY)
            .map(|i| i.imm)
            .collect();
        assert_eq!(slots, [0, 1], "each program counts into its own slot");
        for (at, i) in out.iter().enumerate() {
            let class = i.code & 0x07;
            if (class == E_JMP || class == E_JMP32)
                && i.code & 0xf0 != E_CALL
                && i.code & 0xf0 != E_EXIT
            {
                let to = at as i64 + 1 + i64::from(i.off);
                assert!(
                    to >= 0 && (to as usize) < out.len(),
                    "jump {at} out of the program"
                );
            }
        }
    }

    #[test]
    fn unknown_ancillary_loads_are_refused() {
        // SKF_AD_CPU (36) has no __sk_buff field.
        let classic = [
            f(LD | W | ABS, 0, 0, (SKF_AD_OFF + 36) as u32),
            f(RET | SRC_A, 0, 0, 0),
        ];
        assert!(translate(&classic, 3, 0).is_err());
        let vlan = [
            f(LD | B | ABS, 0, 0, (SKF_AD_OFF + 48) as u32),
            f(RET | SRC_A, 0, 0, 0),
        ];
        assert!(translate(&vlan, 3, 0).is_ok());
    }

    /// Packet byte `i` of the test payloads: never 0, different from its neighbours.
    fn byte(i: usize) -> u8 {
        (i * 7 + 3) as u8 | 1
    }

    /// What libpcap's program reads with `size` bytes at `off` of a `len`-byte packet:
    /// `None` out of bounds (the classic "return 0").
    fn classic_load(len: usize, off: u32, size: u8) -> Option<u32> {
        let off = usize::try_from(off)
            .ok()
            .filter(|&o| o <= i32::MAX as usize)?;
        if off + usize::from(size) > len {
            return None;
        }
        Some((0..usize::from(size)).fold(0u32, |a, i| a << 8 | u32::from(byte(off + i))))
    }

    /// One classic program to run, and which payload lengths it should count.
    struct Case {
        program: Vec<libc::sock_filter>,
        accepts: Box<dyn Fn(usize) -> bool>,
        what: String,
    }

    /// Runs every case's translation, all in one program, on payloads of each length in
    /// `lens`, through the kernel (`BPF_PROG_TEST_RUN`): each must count exactly the
    /// payloads its classic program accepts. Both ways: `ld [x + k]` from the head at a
    /// variable stack offset, and through the helper (for kernels before 5.12).
    fn run_cases(cases: &[Case], lens: &[usize]) {
        for variable_stack in [true, false] {
            run_cases_with(cases, lens, variable_stack);
        }
    }

    fn run_cases_with(cases: &[Case], lens: &[usize], variable_stack: bool) {
        let map = crate::filters::bpf_sys::CountMap::create(cases.len() as u32)
            .expect("creating the counter map");
        let list: Vec<(&[libc::sock_filter], u32)> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| (c.program.as_slice(), i as u32))
            .collect();
        let insns =
            translate_many_with(&list, map.raw_fd(), None, variable_stack).expect("translates");
        let prog = crate::filters::bpf_sys::load_socket_filter(&insns, "sockscope_test")
            .unwrap_or_else(|e| panic!("the verifier refuses the translation: {e}"));
        let mut before: Vec<u64> = (0..cases.len())
            .map(|i| map.read(i as u32).expect("reads").0)
            .collect();
        let mut wrong = Vec::new();
        for &len in lens {
            let mut data = vec![0u8; 14];
            // A local experimental EtherType: the kernel checks no header behind it.
            data[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
            data.extend((0..len).map(byte));
            let rc = crate::filters::bpf_sys::test_run(&prog, &data).expect("test run");
            assert_eq!(rc, 0, "the program queues nothing");
            for (i, case) in cases.iter().enumerate() {
                let now = map.read(i as u32).expect("reads").0;
                let counted = now - before[i];
                before[i] = now;
                if counted != u64::from((case.accepts)(len)) {
                    wrong.push(format!("{} on {len} bytes: counted {counted}", case.what));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "variable stack {variable_stack}: {} wrong: {wrong:#?}",
            wrong.len()
        );
    }

    fn load_code(size: u8) -> u16 {
        match size {
            4 => W,
            2 => H,
            _ => B,
        }
    }

    /// Two cases for one load (`setup`, then `load` reading `size` bytes at packet offset
    /// `off`): one counts the packets where the load succeeds, one those where it reads the
    /// right bytes.
    fn load_cases(
        setup: &[libc::sock_filter],
        load: libc::sock_filter,
        off: u32,
        size: u8,
        what: &str,
    ) -> [Case; 2] {
        let want = classic_load(200, off, size).unwrap_or(0);
        let program = |tail: &[libc::sock_filter]| -> Vec<libc::sock_filter> {
            setup.iter().chain([&load]).chain(tail).copied().collect()
        };
        [
            Case {
                program: program(&[f(RET | K, 0, 0, 1)]),
                accepts: Box::new(move |len| classic_load(len, off, size).is_some()),
                what: what.to_owned(),
            },
            Case {
                program: program(&[
                    f(JMP | 0x10, 0, 1, want),
                    f(RET | K, 0, 0, 1),
                    f(RET | K, 0, 0, 0),
                ]),
                accepts: Box::new(move |len| {
                    classic_load(len, off, size).is_some_and(|a| a == want)
                }),
                what: format!("{what} == {want:#x}"),
            },
        ]
    }

    /// `ld [x + k]` from the head read ahead and through the helper, at the edges of the
    /// bytes held and of the buffer, with sums that wrap at 32 bits and ones the helper
    /// takes as negative: the same packets counted, the same bytes loaded.
    #[test]
    fn indirect_loads_match_the_classic_program() {
        if !testkit::require_root() {
            return;
        }
        let offsets: &[(u32, u32)] = &[
            (0, 0),
            (0, 1),
            (14, 9),
            (60, 20),
            (0, 60),
            (0, 61),
            (100, 22),
            (0, 124),
            (0, 125),
            (120, 6),
            (0, 127),
            (128, 0),
            (100, 29),
            (0, 196),
            (0, 197),
            (0xffff_fff0, 0x14),
            (5, 0xffff_ffff),
            (0x8000_0000, 0),
            (0x7fff_ffff, 0),
        ];
        let mut cases = Vec::new();
        for size in [1u8, 2, 4] {
            for &(x, k) in offsets {
                let load = f(LD | load_code(size) | IND, 0, 0, k);
                cases.extend(load_cases(
                    &[f(LDX | W | IMM, 0, 0, x)],
                    load,
                    x.wrapping_add(k),
                    size,
                    &format!("ld{size} [x + {k:#x}] with x = {x:#x}"),
                ));
            }
        }
        run_cases(
            &cases,
            &[1, 2, 20, 62, 63, 64, 126, 127, 128, 129, 130, 200],
        );
    }

    /// `ld [k]` of each size at every alignment in the head and around its end, on packets
    /// that end before, inside and after the bytes loaded: the same packets counted, the
    /// same bytes loaded.
    #[test]
    fn fixed_loads_at_every_alignment_match_the_classic_program() {
        if !testkit::require_root() {
            return;
        }
        let mut cases = Vec::new();
        for k in (0u32..=24).chain(120..=132) {
            for size in [1u8, 2, 4] {
                let load = f(LD | load_code(size) | ABS, 0, 0, k);
                cases.extend(load_cases(&[], load, k, size, &format!("ld{size} [{k}]")));
            }
        }
        // The test run strips the 14-byte Ethernet header: `len` is what the filter sees, so
        // with every length around the offsets above, each load meets the packet's end both
        // inside it and just past it.
        let lens: Vec<usize> = (1..=29).chain(119..=137).chain([200]).collect();
        run_cases(&cases, &lens);
    }

    /// `ldxb 4*([k]&0xf)` from the head and through the helper; A is kept across it.
    #[test]
    fn header_length_loads_match_the_classic_program() {
        if !testkit::require_root() {
            return;
        }
        let mut cases = Vec::new();
        for k in [0u32, 1, 14, 126, 127, 128, 129, 199, 200] {
            let x = classic_load(200, k, 1).map_or(0, |b| 4 * (b & 0xf));
            cases.push(Case {
                program: vec![
                    f(LD | W | IMM, 0, 0, 0x1234_5678),
                    f(LDX | B | MSH, 0, 0, k),
                    f(JMP | 0x10, 0, 3, 0x1234_5678),
                    f(MISC | 0x80, 0, 0, 0),
                    f(JMP | 0x10, 0, 1, x),
                    f(RET | K, 0, 0, 1),
                    f(RET | K, 0, 0, 0),
                ],
                accepts: Box::new(move |len| (k as usize) < len),
                what: format!("ldxb 4*([{k}]&0xf) == {x}"),
            });
            cases.push(Case {
                program: vec![f(LDX | B | MSH, 0, 0, k), f(RET | K, 0, 0, 1)],
                accepts: Box::new(move |len| (k as usize) < len),
                what: format!("ldxb 4*([{k}]&0xf)"),
            });
        }
        // Fixed offsets, beside them in the same program.
        for (k, size) in [
            (0u32, 4u8),
            (124, 4),
            (125, 4),
            (126, 2),
            (127, 1),
            (128, 1),
        ] {
            let load = f(LD | load_code(size) | ABS, 0, 0, k);
            cases.extend(load_cases(&[], load, k, size, &format!("ld{size} [{k}]")));
        }
        run_cases(&cases, &[1, 14, 15, 127, 128, 129, 130, 200]);
    }
}
