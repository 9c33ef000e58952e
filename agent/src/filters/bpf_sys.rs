//! The few bpf(2) commands the translated named filters need: a per-CPU array of
//! `{packets, bytes}` per filter, loading a socket filter from instructions built at run
//! time (aya loads programs from object files only), reading the counters, and the
//! one-slot program array through which the filters' program hands each packet on to the
//! classifier (a tail call).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::translate::Insn;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
#[cfg(test)]
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// `SO_ATTACH_BPF`.
pub const SO_ATTACH_BPF: libc::c_int = 50;

/// A zeroed `union bpf_attr`, large enough for the commands used here.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn call(&mut self, cmd: libc::c_long) -> std::io::Result<libc::c_long> {
        // SAFETY: bpf(2) with an attribute buffer of the size given.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, self.0.as_mut_ptr(), self.0.len()) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }
}

fn owned(rc: libc::c_long) -> OwnedFd {
    // SAFETY: a new descriptor returned by bpf(2).
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// Per filter, per CPU: packets then bytes.
pub struct CountMap {
    fd: OwnedFd,
    cpus: usize,
}

impl CountMap {
    /// A map with `entries` slots.
    pub fn create(entries: u32) -> std::io::Result<Self> {
        let rc = Attr::new()
            .u32(0, BPF_MAP_TYPE_PERCPU_ARRAY)
            .u32(4, 4)
            .u32(8, 16)
            .u32(12, entries.max(1))
            .call(BPF_MAP_CREATE)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        Ok(Self {
            fd: owned(rc),
            cpus,
        })
    }

    /// The map's descriptor, for the programs' map references.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// `(packets, bytes)` of slot `index`, summed over the CPUs.
    pub fn read(&self, index: u32) -> std::io::Result<(u64, u64)> {
        let key = index;
        let mut values = vec![0u64; self.cpus * 2];
        Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, &key as *const u32 as u64)
            .u64(16, values.as_mut_ptr() as u64)
            .call(BPF_MAP_LOOKUP_ELEM)?;
        Ok(values
            .chunks(2)
            .fold((0, 0), |(p, b), v| (p + v[0], b + v[1])))
    }
}

/// A program array of one slot: the program a tail call through it continues with.
pub struct ProgArray {
    fd: OwnedFd,
}

impl ProgArray {
    /// An empty array: a tail call through it falls through.
    pub fn create() -> std::io::Result<Self> {
        let rc = Attr::new()
            .u32(0, BPF_MAP_TYPE_PROG_ARRAY)
            .u32(4, 4)
            .u32(8, 4)
            .u32(12, 1)
            .call(BPF_MAP_CREATE)?;
        Ok(Self { fd: owned(rc) })
    }

    /// The map's descriptor, for the programs' map references.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Puts `prog` in the slot.
    pub fn set(&self, prog: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        let key = 0u32;
        let value: u32 = prog.as_raw_fd() as u32;
        Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, &key as *const u32 as u64)
            .u64(16, &value as *const u32 as u64)
            .call(BPF_MAP_UPDATE_ELEM)?;
        Ok(())
    }
}

/// Loads a socket filter; the verifier's log on failure. The first try asks for no log:
/// a log that overflows its buffer fails the load on recent kernels, even of a program the
/// verifier accepts. Only a refused program is loaded again, with the log, to say why.
pub fn load_socket_filter(insns: &[Insn], name: &str) -> Result<OwnedFd, String> {
    match prog_load(insns, name, None) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            let mut log = vec![0u8; 1 << 20];
            match prog_load(insns, name, Some(&mut log)) {
                // Refused once, accepted now: keep it.
                Ok(fd) => Ok(fd),
                Err(e) => {
                    let end = log.iter().position(|&c| c == 0).unwrap_or(log.len());
                    let text = String::from_utf8_lossy(&log[..end]);
                    let tail: Vec<&str> = text.lines().rev().take(3).collect();
                    let tail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
                    if tail.is_empty() {
                        Err(format!("{first}"))
                    } else {
                        Err(format!("{e}: {tail}"))
                    }
                }
            }
        }
    }
}

fn prog_load(insns: &[Insn], name: &str, log: Option<&mut [u8]>) -> std::io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = Attr::new();
    attr.u32(0, BPF_PROG_TYPE_SOCKET_FILTER)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64);
    if let Some(log) = log {
        attr.u32(24, 1)
            .u32(28, log.len() as u32)
            .u64(32, log.as_mut_ptr() as u64);
    }
    let name = name.as_bytes();
    let n = name.len().min(15);
    attr.0[48..48 + n].copy_from_slice(&name[..n]);
    attr.call(BPF_PROG_LOAD).map(owned)
}

/// Runs the socket filter `prog` once on `data` (`BPF_PROG_TEST_RUN`): the kernel takes the
/// first 14 bytes as the Ethernet header and hands the program the rest. Returns the
/// program's return value.
#[cfg(test)]
pub fn test_run(prog: &OwnedFd, data: &[u8]) -> std::io::Result<u32> {
    let mut attr = Attr::new();
    attr.u32(0, prog.as_raw_fd() as u32)
        .u32(8, data.len() as u32)
        .u64(16, data.as_ptr() as u64)
        .u32(32, 1);
    attr.call(BPF_PROG_TEST_RUN)?;
    Ok(u32::from_ne_bytes(
        attr.0[4..8].try_into().expect("4 bytes"),
    ))
}
