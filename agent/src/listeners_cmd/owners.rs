//! Which process holds a socket open: the `socket:[inode]` links of `/proc/PID/fd`, as
//! `ss -p` finds them.
//!
//! A socket belongs to whichever processes hold a file descriptor on it, whatever namespace
//! they live in (a thread may create a listener in another network namespace than its
//! process's), so every process is looked at, lowest pid first; the walk stops as soon as
//! every socket asked for has an owner, which bounds its cost on a busy host.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

/// The lowest pid holding each of `inodes` open, for those it could find (a process of
/// another user needs CAP_SYS_PTRACE or root to be looked into).
pub fn owners(proc_root: &Path, inodes: &HashSet<u32>) -> HashMap<u32, u32> {
    let mut found = HashMap::new();
    if inodes.is_empty() {
        return found;
    }
    let Ok(dir) = fs::read_dir(proc_root) else {
        return found;
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        // Gone meanwhile, a kernel thread, or not ours to read: nothing to learn.
        let Ok(fds) = fs::read_dir(proc_root.join(pid.to_string()).join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(inode) = socket_inode(target.as_os_str().as_bytes())
                && inodes.contains(&inode)
            {
                found.entry(inode).or_insert(pid);
            }
        }
        if found.len() == inodes.len() {
            break;
        }
    }
    found
}

/// A process's command name, without the newline; empty when it cannot be read.
pub fn comm(proc_root: &Path, pid: u32) -> String {
    fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
        .map(|c| c.trim_end_matches('\n').to_owned())
        .unwrap_or_default()
}

/// The inode of a `socket:[12345]` link target.
fn socket_inode(link: &[u8]) -> Option<u32> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::fd::AsRawFd as _};

    use super::*;

    #[test]
    fn parses_socket_links_only() {
        assert_eq!(socket_inode(b"socket:[4242]"), Some(4242));
        assert_eq!(socket_inode(b"pipe:[4242]"), None);
        assert_eq!(socket_inode(b"socket:[x]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
    }

    #[test]
    fn finds_our_own_listener() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let link = fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd()))?;
        let inode = socket_inode(link.as_os_str().as_bytes())
            .ok_or_else(|| anyhow::anyhow!("not a socket: {link:?}"))?;
        let found = owners(Path::new("/proc"), &HashSet::from([inode]));
        assert_eq!(found.get(&inode), Some(&std::process::id()));
        assert!(!comm(Path::new("/proc"), std::process::id()).is_empty());
        Ok(())
    }
}
