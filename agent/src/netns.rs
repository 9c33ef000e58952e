//! Every network namespace of the host, and a way to work inside each of them.
//!
//! Why this is needed: sock_diag dumps, `/proc/thread-self/net/*` and `/proc/sys/net/*` all
//! answer for the network namespace of the *calling thread*. To read another namespace the
//! agent has to move a thread into it with `setns(2)`.
//!
//! Discovery walks `/proc/[0-9]*/ns/net` (one entry per process, keeping the lowest pid of
//! each namespace as the one shown to people) and the bind mounts in `/run/netns` (their
//! file names are what `ip netns` shows). Namespaces that only an open file descriptor or a
//! socket keeps alive, with no process inside and no bind mount, cannot be found this way.
//!
//! Each namespace found is held by an open fd for the rest of the scrape, so `setns` still
//! works when its last process exits meanwhile; the fds are closed at the end of the scrape so
//! that the agent never keeps a dead namespace alive.

use std::{
    collections::HashSet,
    fmt::Write as _,
    fs::{self, File},
    io::{self, Read as _},
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// The calling thread's own namespace file (never /proc/self: that is the main thread's).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Errors that stop a whole walk (a single namespace failing is never one: it is skipped).
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A file that must exist could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The worker thread could not be started.
    #[error("cannot start the network namespace worker thread: {0}")]
    Thread(io::Error),
    /// The work done inside a namespace panicked.
    #[error("the network namespace worker thread panicked")]
    Panicked,
}

/// What tells a person which namespace a `netns` label means.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetnsInfo {
    /// Inode of the namespace: the `netns` label.
    pub inode: u64,
    /// Name of the bind mount in /run/netns (as `ip netns` lists it); empty when none.
    pub name: String,
    /// The lowest pid living in the namespace, if a process lives there.
    pub pid: Option<u32>,
    /// That process's command name (`/proc/PID/comm`); empty without a process.
    pub comm: String,
}

/// One namespace found on the host, held open until this value is dropped.
#[derive(Debug)]
pub struct Namespace {
    /// Who it is.
    pub info: NetnsInfo,
    fd: OwnedFd,
}

/// Finds the host's network namespaces and runs work inside them.
#[derive(Debug)]
pub struct Discovery {
    proc_root: PathBuf,
    run_netns: PathBuf,
    own: OwnedFd,
    own_inode: u64,
}

impl Discovery {
    /// Reads the host's /proc and /run/netns; the calling thread's namespace is the agent's own.
    pub fn new() -> Result<Self, NetnsError> {
        Self::with_paths(PathBuf::from("/proc"), PathBuf::from("/run/netns"))
    }

    /// Like [`Discovery::new`] with other roots (for tests).
    pub fn with_paths(proc_root: PathBuf, run_netns: PathBuf) -> Result<Self, NetnsError> {
        let own = open_ns(Path::new(THREAD_NETNS)).map_err(|source| NetnsError::Read {
            path: THREAD_NETNS.into(),
            source,
        })?;
        let own_inode = fd_inode(&own).map_err(|source| NetnsError::Read {
            path: THREAD_NETNS.into(),
            source,
        })?;
        Ok(Self {
            proc_root,
            run_netns,
            own,
            own_inode,
        })
    }

    /// Inode of the agent's own namespace.
    pub fn own_inode(&self) -> u64 {
        self.own_inode
    }

    /// Every namespace found now, the agent's own first, then by lowest pid; unnamed, unpopulated
    /// ones cannot be found (see the module docs). Never fails: what cannot be read is skipped.
    pub fn discover(&self) -> Vec<Namespace> {
        let mut found: Vec<Namespace> = Vec::new();
        let mut seen: HashSet<u64> = HashSet::new();
        let root = self.proc_root.to_string_lossy();
        let mut path = String::with_capacity(64);
        for pid in self.pids() {
            path.clear();
            let _ = write!(path, "{root}/{pid}/ns/net");
            // stat is cheaper than open: open only the first process of each namespace.
            let Ok(meta) = fs::metadata(&path) else {
                continue; // exited, or a process we may not inspect
            };
            if seen.contains(&meta.ino()) {
                continue;
            }
            let Ok(fd) = open_ns(Path::new(&path)) else {
                continue;
            };
            // The process may have moved between stat and open: the fd is the truth.
            let Ok(inode) = fd_inode(&fd) else { continue };
            if !seen.insert(inode) {
                continue;
            }
            let comm = self.comm(pid);
            found.push(Namespace {
                info: NetnsInfo {
                    inode,
                    name: String::new(),
                    pid: Some(pid),
                    comm,
                },
                fd,
            });
        }
        self.add_named(&mut found);
        self.put_own_first(&mut found);
        found
    }

    /// Runs `work` once inside each of `namespaces`, in order, on one fresh thread that moves
    /// from namespace to namespace; it is given the namespace and whether the thread could
    /// enter it (`false`: `setns` failed; the namespace is then best left out).
    ///
    /// The thread ends afterwards, so no thread of the agent stays in a foreign namespace.
    pub fn visit<F>(&self, namespaces: &[Namespace], mut work: F) -> Result<(), NetnsError>
    where
        F: FnMut(&Namespace, bool) + Send,
    {
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name("sockscope-netns".into())
                .spawn_scoped(scope, || {
                    for ns in namespaces {
                        let entered = self.enter(ns);
                        work(ns, entered);
                    }
                })
                .map_err(NetnsError::Thread)?;
            handle.join().map_err(|_| NetnsError::Panicked)
        })
    }

    /// Moves the calling thread into `ns`; for the agent's own namespace only when the thread is
    /// not there already, so that the agent reads its own namespace even without CAP_SYS_ADMIN.
    fn enter(&self, ns: &Namespace) -> bool {
        if ns.info.inode == self.own_inode && current_inode() == Some(self.own_inode) {
            return true;
        }
        match setns(ns.fd.as_fd(), CloneFlags::CLONE_NEWNET) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(netns = ns.info.inode, "setns: {e}; namespace skipped");
                false
            }
        }
    }

    /// Numeric entries of /proc, ascending.
    fn pids(&self) -> Vec<u32> {
        let Ok(dir) = fs::read_dir(&self.proc_root) else {
            return Vec::new();
        };
        let mut pids: Vec<u32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        pids
    }

    fn comm(&self, pid: u32) -> String {
        let mut comm = String::new();
        let path = self.proc_root.join(pid.to_string()).join("comm");
        if File::open(path)
            .and_then(|mut f| f.read_to_string(&mut comm))
            .is_err()
        {
            comm.clear();
        }
        let trimmed = comm.trim_end_matches('\n').len();
        comm.truncate(trimmed);
        comm
    }

    /// Names from /run/netns; named namespaces without a process are added too.
    fn add_named(&self, found: &mut Vec<Namespace>) {
        let Ok(dir) = fs::read_dir(&self.run_netns) else {
            return;
        };
        let mut entries: Vec<(String, PathBuf)> = dir
            .filter_map(|e| {
                let e = e.ok()?;
                Some((e.file_name().to_str()?.to_owned(), e.path()))
            })
            .collect();
        entries.sort();
        for (name, path) in entries {
            // A file there that is not a mounted namespace (mount gone) stats as a plain file.
            let Ok(fd) = open_ns(&path) else { continue };
            if !is_netns(&fd) {
                continue;
            }
            let Ok(inode) = fd_inode(&fd) else { continue };
            match found.iter_mut().find(|n| n.info.inode == inode) {
                Some(ns) if ns.info.name.is_empty() => ns.info.name = name,
                Some(_) => {} // a second name for the same namespace: the first one stays
                None => found.push(Namespace {
                    info: NetnsInfo {
                        inode,
                        name,
                        pid: None,
                        comm: String::new(),
                    },
                    fd,
                }),
            }
        }
    }

    /// The agent's namespace first (read without setns); added if /proc did not show it (the
    /// agent in a pid namespace that /proc does not belong to).
    fn put_own_first(&self, found: &mut Vec<Namespace>) {
        if let Some(index) = found.iter().position(|n| n.info.inode == self.own_inode) {
            let own = found.remove(index);
            found.insert(0, own);
        } else if let Ok(fd) = self.own.try_clone() {
            let pid = std::process::id();
            found.insert(
                0,
                Namespace {
                    info: NetnsInfo {
                        inode: self.own_inode,
                        name: String::new(),
                        pid: Some(pid),
                        comm: self.comm(pid),
                    },
                    fd,
                },
            );
        }
    }
}

fn open_ns(path: &Path) -> io::Result<OwnedFd> {
    // std opens with O_RDONLY | O_CLOEXEC.
    File::open(path).map(OwnedFd::from)
}

fn fd_inode(fd: &OwnedFd) -> io::Result<u64> {
    nix::sys::stat::fstat(fd)
        .map(|s| s.st_ino)
        .map_err(io::Error::from)
}

/// Whether `fd` is a network namespace (NS_GET_NSTYPE), not a file left behind in /run/netns.
fn is_netns(fd: &OwnedFd) -> bool {
    // _IO(0xb7, 0x3): include/uapi/linux/nsfs.h.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    use std::os::fd::AsRawFd as _;
    // SAFETY: NS_GET_NSTYPE takes no argument and only returns a value; on a file that is not
    // a namespace it fails with ENOTTY.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    kind == libc::CLONE_NEWNET
}

fn current_inode() -> Option<u64> {
    fs::metadata(THREAD_NETNS).ok().map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn finds_its_own_namespace_first_with_its_pid() -> anyhow::Result<()> {
        if !root() {
            return Ok(());
        }
        let d = Discovery::new()?;
        let all = d.discover();
        let own = all
            .first()
            .ok_or_else(|| anyhow::anyhow!("nothing found"))?;
        assert_eq!(own.info.inode, d.own_inode());
        assert!(own.info.pid.is_some());
        let mut inodes: Vec<u64> = all.iter().map(|n| n.info.inode).collect();
        inodes.sort_unstable();
        inodes.dedup();
        assert_eq!(inodes.len(), all.len(), "one entry per namespace");
        Ok(())
    }

    #[test]
    fn visits_each_namespace_on_a_thread_inside_it() -> anyhow::Result<()> {
        if !root() {
            return Ok(());
        }
        let d = Discovery::new()?;
        let all = d.discover();
        let mut seen = Vec::new();
        d.visit(&all, |ns, entered| {
            if entered {
                seen.push((ns.info.inode, current_inode()));
            }
        })?;
        assert!(!seen.is_empty());
        for (inode, inside) in seen {
            assert_eq!(Some(inode), inside);
        }
        assert_eq!(
            current_inode(),
            Some(d.own_inode()),
            "the caller never moves"
        );
        Ok(())
    }

    #[test]
    fn a_missing_proc_finds_only_the_own_namespace() -> anyhow::Result<()> {
        if !root() {
            return Ok(());
        }
        let d = Discovery::with_paths("/nonexistent".into(), "/nonexistent".into())?;
        let all = d.discover();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].info.inode, d.own_inode());
        Ok(())
    }
}
