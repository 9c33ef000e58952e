//! The cgroup v2 hierarchy, where the listener program attaches at the root so that it sees
//! sockets of every cgroup.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::KernelError;

/// The root of the cgroup v2 hierarchy (`configured`, or the cgroup2 mount whose root is
/// `/` in /proc/self/mountinfo: /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid systems).
pub fn cgroup2_root(configured: Option<&Path>) -> Result<PathBuf, KernelError> {
    if let Some(dir) = configured {
        return if dir.join("cgroup.procs").exists() {
            Ok(dir.to_path_buf())
        } else {
            Err(KernelError::Cgroup(format!(
                "{} is not a cgroup v2 directory",
                dir.display()
            )))
        };
    }
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(|source| KernelError::Read {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    find_root(&mountinfo).ok_or_else(|| {
        KernelError::Cgroup(
            "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified, or pass --path.cgroup2)".into(),
        )
    })
}

/// The mount point of a cgroup2 mount whose root is the hierarchy's root.
fn find_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER`
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mountpoint = fields.next()?;
        (fstype == "cgroup2" && root == "/")
            .then(|| PathBuf::from(mountpoint.replace("\\040", " ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_root_on_a_hybrid_system() {
        let info = "25 1 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    30 25 0:26 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n\
                    31 25 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert_eq!(
            find_root(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn skips_a_container_view_of_a_subtree() {
        let info = "40 30 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_root(info), None);
    }
}
