//! Do-nothing BPF programs on the hooks the agent uses, for the benchmarks' floor: what the
//! kernel's call into a program at those hooks costs the traffic before the program does
//! any work. Each program is two instructions (`r0 = 0` or `1`; `exit`), loaded and
//! attached through the bpf(2) system call. Attachments are descriptors (raw tracepoint and
//! cgroup links, a packet socket): dropping an [`EmptyPrograms`] or a [`EmptyTap`] detaches
//! everything, also when a benchmark fails.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use anyhow::{Context, Result};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::cgroup_bpf::{
    ATTR_SIZE, BPF_CGROUP_INET_INGRESS, bpf, cgroup_ingress_programs, fd, insn, load_program,
    put_u32, put_u64,
};

const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const SO_ATTACH_BPF: libc::c_int = 50;

/// The root of the cgroup v2 hierarchy, where the agent attaches its cgroup_skb program:
/// the cgroup2 mount of the hierarchy's root (/sys/fs/cgroup, or /sys/fs/cgroup/unified on
/// hybrid systems).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            // `ID PARENT MAJ:MIN ROOT MOUNTPOINT … - FSTYPE …`
            let (left, right) = line.split_once(" - ")?;
            let mut fields = left.split_whitespace().skip(3);
            let (root, mountpoint) = (fields.next()?, fields.next()?);
            (right.starts_with("cgroup2 ") && root == "/")
                .then(|| PathBuf::from(unescape_mount_field(mountpoint)))
        })
        .context("no cgroup v2 hierarchy is mounted")
}

/// A mountinfo field with its octal escapes (`\040` for a space, `\011`, `\012`, `\134`)
/// decoded.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `r0 = ret; exit`.
fn returning(ret: i32) -> [u64; 2] {
    [insn(0xb7, 0, 0, 0, ret), insn(0x95, 0, 0, 0, 0)]
}

/// The hooks a running agent has attached: the raw tracepoints it holds links to (BTF and
/// raw tracepoint programs alike are raw tracepoint links, dispatched the same way) and
/// whether it added a cgroup_skb ingress program at the cgroup root. Links of other kinds
/// (fentry's `tracing`, a perf event's tracepoint) are counted, not reproduced: the floor
/// then leaves them out and says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHooks {
    /// Tracepoint names (`inet_sock_set_state`, …).
    pub tracepoints: BTreeSet<String>,
    /// A cgroup_skb ingress program at the [`cgroup2_root`].
    pub cgroup_ingress: bool,
    /// Links the floor does not reproduce, by `link_type`.
    pub skipped: BTreeMap<String, usize>,
    /// Why the cgroup root's programs could not be compared, when they could not.
    pub cgroup_unread: Option<String>,
}

impl AgentHooks {
    /// The hooks of the agent `pid`, given the root's cgroup ingress programs from before it
    /// started (`root_before`, from [`root_ingress_programs`]; an error there, e.g. no
    /// cgroup v2, leaves the cgroup hook out of the floor and in [`Self::describe`]).
    pub fn of(pid: u32, root_before: &Result<BTreeSet<u32>>) -> Result<Self> {
        let mut tracepoints = BTreeSet::new();
        let mut skipped = BTreeMap::new();
        let mut cgroup_links = 0;
        let dir = format!("/proc/{pid}/fdinfo");
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
            let Ok(text) = std::fs::read_to_string(entry?.path()) else {
                continue;
            };
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim_start_matches(':').trim().to_owned())
            };
            match (field("link_type"), field("tp_name")) {
                (Some(kind), Some(name)) if kind == "raw_tracepoint" => {
                    tracepoints.insert(name);
                }
                // The cgroup link is found at the root below.
                (Some(kind), _) if kind == "cgroup" => cgroup_links += 1,
                (Some(kind), _) => *skipped.entry(kind).or_insert(0) += 1,
                _ => {}
            }
        }
        let (cgroup_ingress, cgroup_unread) = match (root_before, root_ingress_programs()) {
            (Ok(before), Ok(now)) => (now.difference(before).next().is_some(), None),
            (Err(e), _) => (false, Some(format!("{e:#}"))),
            (_, Err(e)) => (false, Some(format!("{e:#}"))),
        };
        if cgroup_unread.is_some() && cgroup_links > 0 {
            skipped.insert("cgroup".to_owned(), cgroup_links);
        }
        Ok(Self {
            tracepoints,
            cgroup_ingress,
            skipped,
            cgroup_unread,
        })
    }

    /// One line for the tables: what the floor attaches.
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self.tracepoints.iter().map(String::as_str).collect();
        let mut s = format!("raw tracepoints {}", names.join(", "));
        if self.cgroup_ingress {
            s.push_str("; cgroup_skb ingress at the cgroup root");
        }
        if let Some(why) = &self.cgroup_unread {
            s.push_str(&format!(
                "; no cgroup_skb program, the cgroup root unread: {why}"
            ));
        }
        if !self.skipped.is_empty() {
            let kinds: Vec<String> = (self.skipped.iter())
                .map(|(kind, n)| format!("{n} {kind}"))
                .collect();
            s.push_str(&format!("; left out: {} links", kinds.join(", ")));
        }
        s
    }
}

/// The ids of the cgroup_skb ingress programs attached at the [`cgroup2_root`] itself.
pub fn root_ingress_programs() -> Result<BTreeSet<u32>> {
    Ok(cgroup_ingress_programs(&cgroup2_root()?, false)?
        .into_iter()
        .collect())
}

/// Do-nothing programs attached to a set of hooks; detached on drop.
#[derive(Debug)]
pub struct EmptyPrograms {
    _links: Vec<OwnedFd>,
}

impl EmptyPrograms {
    /// Attaches a program that returns at once to each hook of `hooks`.
    pub fn attach(hooks: &AgentHooks) -> Result<Self> {
        let mut links = Vec::new();
        let raw = load_program(BPF_PROG_TYPE_RAW_TRACEPOINT, 0, &returning(0))
            .context("loading an empty raw tracepoint program")?;
        for name in &hooks.tracepoints {
            let c_name = CString::new(name.as_str()).context("tracepoint name")?;
            let mut attr = [0u8; ATTR_SIZE];
            put_u64(&mut attr, 0, c_name.as_ptr() as u64);
            put_u32(&mut attr, 8, raw.as_raw_fd() as u32);
            let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr)
                .with_context(|| format!("attaching an empty program to {name}"))?;
            links.push(fd(link));
        }
        if hooks.cgroup_ingress {
            // Passes every packet, as the agent's does.
            let prog = load_program(
                BPF_PROG_TYPE_CGROUP_SKB,
                BPF_CGROUP_INET_INGRESS,
                &returning(1),
            )
            .context("loading an empty cgroup_skb program")?;
            let root = cgroup2_root()?;
            let cgroup = std::fs::File::open(&root).with_context(|| root.display().to_string())?;
            let mut attr = [0u8; ATTR_SIZE];
            put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
            put_u32(&mut attr, 4, cgroup.as_raw_fd() as u32);
            put_u32(&mut attr, 8, BPF_CGROUP_INET_INGRESS);
            let link = bpf(BPF_LINK_CREATE, &mut attr)
                .context("attaching an empty cgroup_skb program at the cgroup root")?;
            links.push(fd(link));
        }
        Ok(Self { _links: links })
    }
}

/// A packet socket on an interface with a socket filter that returns 0 (keeps nothing), as
/// the agent's taps are opened: the cost of the tap itself. Call inside the interface's
/// network namespace; closed on drop.
#[derive(Debug)]
pub struct EmptyTap {
    _socket: Socket,
}

impl EmptyTap {
    /// Opens the tap on `iface`.
    pub fn open(iface: &str) -> Result<Self> {
        let prog = load_program(BPF_PROG_TYPE_SOCKET_FILTER, 0, &returning(0))
            .context("loading an empty socket filter")?;
        let c_iface = CString::new(iface).context("interface name")?;
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(c_iface.as_ptr()) };
        if ifindex == 0 {
            return Err(std::io::Error::last_os_error()).context(format!("interface {iface}"));
        }
        // Protocol 0: nothing arrives before the filter is in and the socket is bound.
        let socket = Socket::new(
            Domain::from(libc::AF_PACKET),
            Type::from(libc::SOCK_RAW),
            None,
        )
        .context("packet socket")?;
        let prog_fd: libc::c_int = prog.as_raw_fd();
        // SAFETY: an int option of the size given.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_ATTACH_BPF,
                (&prog_fd as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("SO_ATTACH_BPF");
        }
        // SAFETY: the storage is zeroed and large enough for a sockaddr_ll, whose length
        // is returned with it.
        let ((), link) = unsafe {
            SockAddr::try_init(|storage, len| {
                let ll = storage.cast::<libc::sockaddr_ll>();
                (*ll).sll_family = libc::AF_PACKET as u16;
                (*ll).sll_protocol = (libc::ETH_P_ALL as u16).to_be();
                (*ll).sll_ifindex = ifindex as i32;
                *len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                Ok(())
            })
        }?;
        socket
            .bind(&link)
            .with_context(|| format!("binding a packet socket to {iface}"))?;
        Ok(Self { _socket: socket })
    }
}

#[cfg(test)]
mod tests {
    use super::unescape_mount_field;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mount_field("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount_field("/mnt/a\\040b\\011c"), "/mnt/a b\tc");
        assert_eq!(unescape_mount_field("/x\\134y"), "/x\\y");
        // Not an escape: kept as it is.
        assert_eq!(unescape_mount_field("/x\\9y\\"), "/x\\9y\\");
    }
}
