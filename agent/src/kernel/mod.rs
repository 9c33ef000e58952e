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
}
