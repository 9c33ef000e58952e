//! Another BPF user, for coexistence tests: a cgroup v2 directory of the test's own, and a
//! cgroup_skb ingress program that counts every packet delivered to a socket below the
//! cgroup it is attached to and lets it pass, loaded and attached through the bpf(2)
//! system call (eight instructions; no object file, no compiler).
//!
//! Attachments are bpf_links: they go away with their descriptor, so nothing stays
//! attached when a test fails or dies. A link at a cgroup is multi-attach, as
//! `BPF_F_ALLOW_MULTI` is.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
pub(crate) const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_F_QUERY_EFFECTIVE: u32 = 1;

/// The size of `union bpf_attr` we pass: large enough for every command used here.
pub(crate) const ATTR_SIZE: usize = 128;

pub(crate) fn bpf(cmd: libc::c_long, attr: &mut [u8; ATTR_SIZE]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded bpf_attr of ATTR_SIZE bytes for `cmd`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), ATTR_SIZE) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

pub(crate) fn put_u32(attr: &mut [u8; ATTR_SIZE], offset: usize, v: u32) {
    attr[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
}

pub(crate) fn put_u64(attr: &mut [u8; ATTR_SIZE], offset: usize, v: u64) {
    attr[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
}

pub(crate) fn fd(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(rc as RawFd) }
}

/// One BPF instruction: opcode, dst/src registers, offset, immediate.
pub(crate) fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | dst;
    b[2..4].copy_from_slice(&off.to_ne_bytes());
    b[4..8].copy_from_slice(&imm.to_ne_bytes());
    u64::from_ne_bytes(b)
}

/// Loads `program` (instructions as [`insn`] makes them) as a GPL program of type
/// `prog_type`, expected at `attach_type`; a refusal carries the verifier's log.
pub(crate) fn load_program(prog_type: u32, attach_type: u32, program: &[u64]) -> Result<OwnedFd> {
    let license = CString::new("GPL").expect("no NUL");
    let mut log = vec![0u8; 4096];
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, prog_type);
    put_u32(&mut attr, 4, program.len() as u32);
    put_u64(&mut attr, 8, program.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 24, 1); // log level
    put_u32(&mut attr, 28, log.len() as u32);
    put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
    put_u32(&mut attr, 68, attach_type); // expected_attach_type
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(rc) => Ok(fd(rc)),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            bail!(
                "BPF_PROG_LOAD: {e}; verifier: {}",
                String::from_utf8_lossy(&log[..end])
            );
        }
    }
}

/// A loaded cgroup_skb ingress program counting packets into a one-element array.
#[derive(Debug)]
pub struct CountingProgram {
    map: OwnedFd,
    prog: OwnedFd,
}

impl CountingProgram {
    /// Creates the map and loads the program.
    pub fn load() -> Result<Self> {
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, BPF_MAP_TYPE_ARRAY);
        put_u32(&mut attr, 4, 4); // key size
        put_u32(&mut attr, 8, 8); // value size
        put_u32(&mut attr, 12, 1); // max entries
        let map = fd(bpf(BPF_MAP_CREATE, &mut attr).context("BPF_MAP_CREATE")?);
        let map_fd = map.as_raw_fd();
        let program = [
            insn(0xb7, 1, 0, 0, 0),      // r1 = 0
            insn(0x63, 10, 1, -4, 0),    // *(u32 *)(r10 - 4) = r1
            insn(0xbf, 2, 10, 0, 0),     // r2 = r10
            insn(0x07, 2, 0, 0, -4),     // r2 += -4
            insn(0x18, 1, 1, 0, map_fd), // r1 = map (BPF_PSEUDO_MAP_FD)
            insn(0, 0, 0, 0, 0),         //   (second half of the 64-bit load)
            insn(0x85, 0, 0, 0, 1),      // call bpf_map_lookup_elem
            insn(0x15, 0, 0, 2, 0),      // if r0 == 0 goto pass
            insn(0xb7, 1, 0, 0, 1),      // r1 = 1
            insn(0xdb, 0, 1, 0, 0),      // lock *(u64 *)(r0 + 0) += r1
            insn(0xb7, 0, 0, 0, 1),      // pass: r0 = 1 (let the packet through)
            insn(0x95, 0, 0, 0, 0),      // exit
        ];
        let prog = load_program(BPF_PROG_TYPE_CGROUP_SKB, BPF_CGROUP_INET_INGRESS, &program)?;
        Ok(Self { map, prog })
    }

    /// The kernel's id of the program.
    pub fn id(&self) -> Result<u32> {
        let mut info = [0u8; 8]; // struct bpf_prog_info: type, id, …
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, self.prog.as_raw_fd() as u32);
        put_u32(&mut attr, 4, info.len() as u32);
        put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
        Ok(u32::from_ne_bytes(info[4..8].try_into().expect("4 bytes")))
    }

    /// Packets counted so far.
    pub fn count(&self) -> Result<u64> {
        let key = 0u32;
        let mut value = 0u64;
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, self.map.as_raw_fd() as u32);
        put_u64(&mut attr, 8, &key as *const u32 as u64);
        put_u64(&mut attr, 16, &mut value as *mut u64 as u64);
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("BPF_MAP_LOOKUP_ELEM")?;
        Ok(value)
    }

    /// Attaches the program at ingress of the cgroup `dir` through a bpf_link.
    pub fn attach(&self, dir: &Path) -> Result<CgroupLink> {
        let cgroup = std::fs::File::open(dir).with_context(|| dir.display().to_string())?;
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, self.prog.as_raw_fd() as u32);
        put_u32(&mut attr, 4, cgroup.as_raw_fd() as u32);
        put_u32(&mut attr, 8, BPF_CGROUP_INET_INGRESS);
        let link = bpf(BPF_LINK_CREATE, &mut attr)
            .with_context(|| format!("BPF_LINK_CREATE at {}", dir.display()))?;
        Ok(CgroupLink { _fd: fd(link) })
    }
}

/// An attachment; dropping it detaches the program.
#[derive(Debug)]
pub struct CgroupLink {
    _fd: OwnedFd,
}

/// The ids of the cgroup_skb ingress programs attached at the cgroup `dir` itself, or with
/// `effective`, those that run for its sockets (its own and its ancestors').
pub fn cgroup_ingress_programs(dir: &Path, effective: bool) -> Result<Vec<u32>> {
    let cgroup = std::fs::File::open(dir).with_context(|| dir.display().to_string())?;
    let mut ids = vec![0u32; 64];
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, cgroup.as_raw_fd() as u32);
    put_u32(&mut attr, 4, BPF_CGROUP_INET_INGRESS);
    put_u32(
        &mut attr,
        8,
        if effective { BPF_F_QUERY_EFFECTIVE } else { 0 },
    );
    put_u64(&mut attr, 16, ids.as_mut_ptr() as u64);
    put_u32(&mut attr, 24, ids.len() as u32);
    bpf(BPF_PROG_QUERY, &mut attr).context("BPF_PROG_QUERY")?;
    let count = u32::from_ne_bytes(attr[24..28].try_into().expect("4 bytes")) as usize;
    ids.truncate(count.min(ids.len()));
    Ok(ids)
}

/// A child cgroup of the test's own, removed on drop (after its processes are gone).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `parent/name`.
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(name);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self { path })
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its `cgroup.procs`, as a C string for [`Cgroup::enter_self`] in a `pre_exec`.
    pub fn procs_path(&self) -> CString {
        CString::new(
            self.path
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .expect("no NUL in a cgroup path")
    }

    /// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`. Only
    /// open/write/close: safe between fork and exec.
    pub fn enter_self(procs: &CString) -> io::Result<()> {
        // SAFETY: a valid C string; the descriptor is closed before returning.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
        }
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A killed process leaves its cgroup a moment after it is reaped.
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    eprintln!("testkit: rmdir {}: {e}", self.path.display());
                    return;
                }
            }
        }
        eprintln!("testkit: rmdir {}: still busy", self.path.display());
    }
}
