//! Links the programs' calls of the kernel function `bpf_rdonly_cast` before loading.
//!
//! The compiled object cannot name a kernel function: its programs call a helper number no
//! helper has ([`RDONLY_CAST_CALL`]), and this rewrites each such call in the object's code
//! sections into a call of the kernel function by its BTF id on the running kernel. Where the
//! kernel has no such function, each call becomes a plain move of its first argument: the
//! programs then take the path that reads through `bpf_probe_read_kernel` (the layout's BTF
//! ids are absent), and the verifier never walks the other.

use agent_common::RDONLY_CAST_CALL;
use object::{Object, ObjectSection, SectionKind};

/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
/// `BPF_ALU64 | BPF_MOV | BPF_X`.
const MOV64_REG: u8 = 0xbf;
/// `BPF_PSEUDO_KFUNC_CALL`, in the source-register nibble.
const KFUNC_CALL_REGS: u8 = 2 << 4;
/// `r0 = r1`: destination 0, source 1.
const MOVE_R1_TO_R0_REGS: u8 = 1 << 4;

/// The object's bytes with every placeholder call linked (8-byte aligned, as the loader
/// wants them), and how many calls were rewritten.
pub struct Linked {
    words: Vec<u64>,
    len: usize,
    /// Calls rewritten.
    pub calls: usize,
}

impl Linked {
    /// The object, ready for the loader.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes; u8 has no alignment.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

/// Rewrites the placeholder calls of `object` into calls of the kernel function whose BTF id
/// is `kfunc`, or into moves when it is `None`.
pub fn link(object: &[u8], kfunc: Option<u32>) -> Result<Linked, String> {
    let mut words = vec![0u64; object.len().div_ceil(8)];
    // SAFETY: `words` spans at least `object.len()` bytes.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), object.len()) };
    bytes.copy_from_slice(object);
    let code: Vec<(usize, usize)> = {
        let file =
            object::File::parse(object).map_err(|e| format!("the kernel programs' object: {e}"))?;
        file.sections()
            .filter(|s| s.kind() == SectionKind::Text)
            .filter_map(|s| s.file_range())
            .map(|(at, size)| (at as usize, size as usize))
            .collect()
    };
    let mut calls = 0;
    for (at, size) in code {
        let section = bytes
            .get_mut(at..at + size)
            .ok_or("the kernel programs' object: a code section lies beyond the file")?;
        for insn in section.chunks_exact_mut(8) {
            let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            if insn[0] != CALL || insn[1] != 0 || imm != RDONLY_CAST_CALL {
                continue;
            }
            match kfunc {
                Some(id) => {
                    insn[1] = KFUNC_CALL_REGS;
                    insn[4..8].copy_from_slice(&id.to_le_bytes());
                }
                None => {
                    insn[0] = MOV64_REG;
                    insn[1] = MOVE_R1_TO_R0_REGS;
                    insn[4..8].copy_from_slice(&0u32.to_le_bytes());
                }
            }
            insn[2..4].copy_from_slice(&0u16.to_le_bytes());
            calls += 1;
        }
    }
    Ok(Linked {
        words,
        len: object.len(),
        calls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The programs' object as built (empty only when built with AYA_BUILD_SKIP).
    fn built() -> &'static [u8] {
        let object = super::super::EBPF_OBJECT;
        assert!(
            !object.is_empty() || option_env!("AYA_BUILD_SKIP").is_some(),
            "the kernel programs were not built"
        );
        object
    }

    fn placeholder_calls(object: &[u8]) -> usize {
        let file = object::File::parse(object).unwrap();
        file.sections()
            .filter(|s| s.kind() == SectionKind::Text)
            .map(|s| {
                s.data()
                    .unwrap()
                    .chunks_exact(8)
                    .filter(|i| {
                        i[0] == CALL
                            && i[1] == 0
                            && i32::from_le_bytes([i[4], i[5], i[6], i[7]]) == RDONLY_CAST_CALL
                    })
                    .count()
            })
            .sum()
    }

    #[test]
    fn every_placeholder_call_is_linked_to_the_kernel_function() {
        let object = built();
        if object.is_empty() {
            return;
        }
        let before = placeholder_calls(object);
        assert!(before > 0, "the programs call bpf_rdonly_cast somewhere");
        let linked = link(object, Some(4242)).unwrap();
        assert_eq!(linked.calls, before);
        assert_eq!(placeholder_calls(linked.bytes()), 0);
        assert_eq!(linked.bytes().len(), object.len());
        assert_eq!(linked.bytes().as_ptr() as usize % 8, 0);
        // Each rewritten instruction is a kernel-function call of that id, nothing else moved.
        let changed: Vec<usize> = object
            .chunks_exact(8)
            .zip(linked.bytes().chunks_exact(8))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (_, b))| {
                assert_eq!(b[..4], [CALL, KFUNC_CALL_REGS, 0, 0]);
                assert_eq!(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), 4242);
                i
            })
            .collect();
        assert_eq!(changed.len(), before);
    }

    #[test]
    fn without_the_kernel_function_each_call_becomes_a_move() {
        let object = built();
        if object.is_empty() {
            return;
        }
        let linked = link(object, None).unwrap();
        assert_eq!(placeholder_calls(linked.bytes()), 0);
        let moves = object
            .chunks_exact(8)
            .zip(linked.bytes().chunks_exact(8))
            .filter(|(a, b)| a != b)
            .inspect(|(_, b)| assert_eq!(**b, [MOV64_REG, MOVE_R1_TO_R0_REGS, 0, 0, 0, 0, 0, 0]))
            .count();
        assert_eq!(moves, linked.calls);
    }

    /// The compiler turns a zeroed or copied buffer of bytes into a call of `memset` or
    /// `memcpy`, which on BPF is an out-of-line loop of one-byte stores: a 128-byte buffer
    /// zeroed that way cost the classifier about 35 ns per packet. No program may call one.
    #[test]
    fn no_program_calls_an_out_of_line_memory_function() {
        use object::ObjectSymbol as _;
        let object = built();
        if object.is_empty() {
            return;
        }
        let file = object::File::parse(object).unwrap();
        let mut calls = Vec::new();
        for section in file.sections() {
            let name = section.name().unwrap_or("?");
            if section.kind() != SectionKind::Text || name == ".text" {
                continue;
            }
            for (_, relocation) in section.relocations() {
                let object::RelocationTarget::Symbol(index) = relocation.target() else {
                    continue;
                };
                let symbol = file.symbol_by_index(index).unwrap();
                let target = symbol.name().unwrap_or("?");
                if ["memset", "memcpy", "memmove", "memcmp", "bcmp"].contains(&target) {
                    calls.push(format!("{name} calls {target}"));
                }
            }
        }
        assert!(calls.is_empty(), "{calls:#?}");
    }

    #[test]
    fn a_file_that_is_not_an_object_is_refused() {
        let err = link(b"not an ELF file", None).err().unwrap();
        assert!(err.contains("the kernel programs' object"), "{err}");
    }
}
