//! What the running kernel offers and where its fields are: BTF, tracefs format files,
//! network namespaces, /proc counters and sysctls.

pub mod btf;
pub mod cgroup;
pub mod layout;
pub mod tracefs;

/// Errors from reading the kernel's self-description.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// BTF is missing or lacks a type the programs need.
    #[error("kernel BTF: {0} (sockscope needs a kernel built with CONFIG_DEBUG_INFO_BTF)")]
    Btf(String),
    /// No usable cgroup v2 hierarchy.
    #[error("cgroup v2: {0}")]
    Cgroup(String),
    /// tracefs could not be found or mounted.
    #[error("tracefs: {0}")]
    Tracefs(String),
    /// A tracepoint does not exist on this kernel.
    #[error("tracepoint {tracepoint} is not available on this kernel: {detail}")]
    TracepointMissing {
        /// `category:name`.
        tracepoint: String,
        /// What failed.
        detail: String,
    },
    /// A tracepoint exists but its record lacks what the program reads.
    #[error("tracepoint {tracepoint} has an unexpected record layout: {detail}")]
    TracepointLayout {
        /// `category:name`.
        tracepoint: String,
        /// What is missing.
        detail: String,
    },
    /// A /proc or /sys file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Whether the running kernel's release is below `major.minor` (false when unknown).
pub fn release_below(major: u32, minor: u32) -> bool {
    parse_release(&kernel_release()).is_some_and(|v| v < (major, minor))
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Whether `inet_csk_reqsk_queue_is_full()` calls the SYN queue full at the limit (`>=`) rather
/// than past it (`>`). The change came in Linux 6.14 ("tcp/dccp: allow a connection when
/// sk_max_ack_backlog is zero") and went back to the stable series listed in
/// [`SYNQ_GT_SINCE`]; the kernel matrix checks Debian's 6.1 and 6.12 against the counters.
pub fn synq_full_at_limit() -> bool {
    let version = nix::sys::utsname::uname()
        .map(|u| u.version().to_string_lossy().into_owned())
        .unwrap_or_default();
    synq_full_at_limit_for(&kernel_release(), &version)
}

/// First stable release of each series with the `>` comparison.
const SYNQ_GT_SINCE: &[(u32, u32, u32)] = &[
    (6, 13, 2),
    (6, 12, 13),
    (6, 6, 76),
    (6, 1, 129),
    (5, 15, 179),
    (5, 10, 235),
];

fn synq_full_at_limit_for(release: &str, version: &str) -> bool {
    let Some((major, minor, sub)) = full_version(release, version) else {
        return false;
    };
    if (major, minor) >= (6, 14) {
        return false;
    }
    SYNQ_GT_SINCE
        .iter()
        .find(|(ma, mi, _)| (*ma, *mi) == (major, minor))
        .is_none_or(|(_, _, since)| sub < *since)
}

/// `major.minor.sublevel`: Debian's release names carry an ABI number where the sublevel
/// goes (`6.1.0-56-amd64`), its `uname -v` the real one (`… Debian 6.1.192-2 …`).
fn full_version(release: &str, version: &str) -> Option<(u32, u32, u32)> {
    let text = version
        .split_once("Debian ")
        .map_or(release, |(_, rest)| rest);
    let mut parts = text.split(|c: char| !c.is_ascii_digit());
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next().and_then(|p| p.parse().ok()).unwrap_or(0),
    ))
}

/// `uname -r`.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_releases() {
        assert_eq!(super::parse_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(super::parse_release("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(super::parse_release("garbage"), None);
    }

    #[test]
    fn syn_queue_comparison_follows_the_stable_backports() {
        use super::synq_full_at_limit_for as at_limit;
        let debian = |v: &str| format!("#1 SMP PREEMPT_DYNAMIC Debian {v} (2025-10-01)");
        // Checked in the kernel matrix against the kernels' own counters.
        assert!(!at_limit("6.1.0-56-amd64", &debian("6.1.192-2")));
        assert!(!at_limit(
            "6.12.117+deb12-amd64",
            &debian("6.12.117-1~deb12u1")
        ));
        assert!(at_limit("6.1.0-28-amd64", &debian("6.1.119-1")));
        assert!(!at_limit("6.18.44-fc-v657", "#1 SMP"));
        assert!(at_limit("6.8.0-50-generic", "#50-Ubuntu SMP"));
        assert!(at_limit("6.12.5", "#1 SMP"));
        assert!(!at_limit("6.12.20", "#1 SMP"));
    }
}
