//! Capabilities: checked as capabilities, not as user id 0.

use caps::{CapSet, Capability};

/// Capabilities `run` cannot work without on this kernel, with why.
pub fn required() -> Vec<(Capability, &'static str)> {
    if kernel_knows(Capability::CAP_BPF) {
        vec![
            (Capability::CAP_BPF, "load programs and create maps"),
            (
                Capability::CAP_PERFMON,
                "attach tracepoints and read kernel memory from them",
            ),
        ]
    } else {
        // Before Linux 5.8 both were part of CAP_SYS_ADMIN.
        vec![(
            Capability::CAP_SYS_ADMIN,
            "load and attach BPF programs (kernel before 5.8)",
        )]
    }
}

/// Capabilities some features need, with which.
pub fn optional() -> Vec<(Capability, &'static str)> {
    [
        (
            Capability::CAP_NET_ADMIN,
            "load the cgroup_skb program of the listen_ingress probe (SYN-queue decisions; CAP_SYS_ADMIN allows it too)",
        ),
        (
            Capability::CAP_SYS_ADMIN,
            "enter other network namespaces (their listeners and counters), list the kernel's programs for their statistics, and mount tracefs when it is not mounted",
        ),
        (
            Capability::CAP_SYS_PTRACE,
            "find the network namespaces of processes of other users or with capabilities the agent lacks (/proc/PID/ns/net)",
        ),
    ]
    .into_iter()
    // Root reads tracefs (mode 0700, owned by root) as its owner.
    .chain((!nix::unistd::geteuid().is_root()).then_some((
        Capability::CAP_DAC_READ_SEARCH,
        "read tracefs as a user other than root (only --probe.mode=tracepoint or its fallback)",
    )))
    .collect()
}

/// Capabilities still used once the programs are attached: entering network namespaces
/// and finding them (every scrape and refresh), listing the kernel's programs for their
/// statistics. Maps are read and written through descriptors already open, which needs no
/// capability; the programs detach by closing theirs.
pub const KEPT_AFTER_START: &[Capability] =
    &[Capability::CAP_SYS_ADMIN, Capability::CAP_SYS_PTRACE];

/// Drops every capability but [`KEPT_AFTER_START`] and `also` (`CAP_NET_RAW` on the thread
/// that reloads, when a reload may add socket filters) from the calling thread: from its
/// bounding set (when it may: CAP_SETPCAP), its ambient and inheritable sets, then its
/// permitted and effective sets. Capabilities are per thread: call it on every thread
/// (the runtime's threads on start, the main thread after start-up); threads created later
/// inherit the creator's sets. Returns what the thread keeps.
pub fn drop_to_kept(also: &[Capability]) -> Result<Vec<Capability>, caps::errors::CapsError> {
    let permitted = caps::read(None, CapSet::Permitted)?;
    let keep: caps::CapsHashSet = KEPT_AFTER_START
        .iter()
        .chain(also)
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    if has(Capability::CAP_SETPCAP) {
        for cap in caps::read(None, CapSet::Bounding)? {
            if !KEPT_AFTER_START.contains(&cap) && !also.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    // Effective must stay within permitted: shrink it first.
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    let mut kept: Vec<Capability> = keep.into_iter().collect();
    kept.sort_by_key(|c| c.index());
    Ok(kept)
}

fn kernel_knows(cap: Capability) -> bool {
    caps::runtime::thread_all_supported().contains(&cap)
}

/// Whether the calling thread has `cap` in its effective set.
pub fn has(cap: Capability) -> bool {
    caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false)
}

/// The required capabilities that are missing, as their names.
pub fn missing_required() -> Vec<String> {
    required()
        .into_iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(cap, _)| cap.to_string())
        .collect()
}
