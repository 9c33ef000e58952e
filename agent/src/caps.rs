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
    vec![
        (
            Capability::CAP_SYS_ADMIN,
            "enter other network namespaces (their listeners and counters) and mount tracefs when it is not mounted",
        ),
        (
            Capability::CAP_SYS_PTRACE,
            "find the network namespaces of processes of other users",
        ),
    ]
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
