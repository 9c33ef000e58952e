//! Test kit for sockscope's integration tests and benchmarks.
//!
//! Everything here is driven from Rust (sockets, `setns`/`unshare`, `/proc`): no `ip`, `ss` or
//! `nstat` is ever run, so the same tests work inside a minimal initramfs under qemu.
//!
//! - [`Netns`]: a throwaway network namespace (with `lo` up), per-namespace sysctls, the
//!   kernel's own counters ([`Counters`], [`Sockstat`]) and process spawning inside it.
//! - [`AgentProcess`]: the agent binary running in a namespace, with its log and `/metrics`.
//! - [`http_get`], [`Metrics`]: a tiny HTTP/1.1 client and a Prometheus text parser.
//! - [`WebClient`], [`Pki`]: requests with TLS, client certificates and basic auth, and
//!   throwaway certificate authorities.
//! - [`connect_closed_port`], [`tcp_pair`]: traffic helpers for use inside [`Netns::run`].
//! - [`Netns::veth_pair`], [`Netns::add_address`], [`Netns::add_route`]…: links, addresses,
//!   routes and neighbours over rtnetlink; [`Netns::tcp_sockets`]: `/proc/net/tcp{,6}`.
//! - [`EmptyPrograms`], [`EmptyTap`]: do-nothing programs on the agent's hooks ([`AgentHooks`]),
//!   the benchmarks' floor.
//! - [`syn_flood`]: a raw-socket SYN generator with spoofed sources (IPv4, IPv6).
//! - [`VethLab`] and the listen-backlog scenarios [`accept_overflow`], [`syn_queue_fill`],
//!   [`ack_stage_overflow`], each checked against the kernel's counters in `tests/`.
//!
//! Trap: `/proc/self/net/*` and `/proc/net/*` follow the netns of the thread-group leader, not
//! of the calling thread; this crate always reads `/proc/thread-self/net/*`.
//!
//! Nothing here keeps global state besides atomic counters for unique file and interface names, so tests
//! may run in parallel on many threads.

mod agent;
mod cgroup_bpf;
mod counters;
mod hook_floor;
mod http;
mod metrics;
mod netns;
mod process;
mod rtnl;
mod scenarios;
mod sockets;
mod synflood;
mod tempdir;
mod tls;
mod traffic;

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

pub use agent::{AgentProcess, HealthProbe};
pub use cgroup_bpf::{Cgroup, CgroupLink, CountingProgram, cgroup_ingress_programs};
pub use counters::{Counters, Sockstat};
pub use hook_floor::{AgentHooks, EmptyPrograms, EmptyTap, cgroup2_root, root_ingress_programs};
pub use http::{http_get, http_get_timeout};
pub use metrics::{Metrics, Sample};
pub use netns::{NamedNetns, Netns, NetnsGuard};
pub use process::{
    ChildGuard, command_with_caps, command_without_caps, held_bpf_ids, kernel_bpf_ids, thread_caps,
};
pub use rtnl::{LinkStatus, RouteVia, VethPair};
pub use scenarios::{
    AcceptOverflow, AckStageOverflow, AckStageParams, ClientStates, LAB_CLIENT_V4, LAB_CLIENT_V6,
    LAB_SERVER_V4, LAB_SERVER_V6, LAB_SPOOFED_V4, LAB_SPOOFED_V6, SynQueueFill, SynQueueParams,
    TooSlow, VethLab, accept_overflow, ack_stage_overflow, connect_many, listen_on,
    retry_if_too_slow, syn_queue_fill,
};
pub use sockets::{TcpSocket, TcpState};
pub use synflood::{SourceSpec, SynFloodOptions, syn_flood};
pub use tempdir::{TempDir, partial_tracefs};
pub use tls::{Pki, WebClient, WebResponse};
pub use traffic::{
    FirstCloser, closed_connections, connect_closed_port, set_linger_zero, tcp_pair,
};

/// Calls `f` every `interval` until it returns `Ok(true)`; errors on timeout or on `f`'s error.
pub fn wait_until(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(());
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(interval.min(timeout - elapsed));
    }
}

/// Whether the running kernel's `uname -r` is at least `major.minor` (false when unparsable).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(uts) = nix::sys::utsname::uname() else {
        return false;
    };
    let release = uts.release().to_string_lossy().into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let version = (|| Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?)))();
    version.is_some_and(|v: (u32, u32)| v >= (major, minor))
}

/// Whether this process runs inside a kernel-matrix guest: its `/init` sets
/// `SOCKSCOPE_GUEST=1` (see docs/KERNEL-MATRIX.md).
pub fn in_guest() -> bool {
    std::env::var("SOCKSCOPE_GUEST").is_ok_and(|v| v == "1")
}

/// For tests that need outside tools a guest does not carry (`needs` names them): false, with a
/// "host-only" line, inside a kernel-matrix guest; true everywhere else, so under `CI=true` on
/// the host nothing skips.
pub fn host_only(needs: &str) -> bool {
    if in_guest() {
        eprintln!("skipping in the kernel-matrix guest: host-only test (needs {needs})");
        return false;
    }
    true
}

/// Returns whether the test may run: true as root; otherwise panics under `CI=true`, else
/// prints a skip notice and returns false.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let ci = std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false);
    if ci {
        panic!("this test needs root (CAP_SYS_ADMIN, CAP_BPF) and CI=true forbids skipping it");
    }
    eprintln!("skipping: needs root (CAP_SYS_ADMIN, CAP_BPF)");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_succeeds_and_times_out() {
        let mut n = 0;
        wait_until(Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            Ok(n >= 3)
        })
        .expect("condition becomes true");
        assert_eq!(n, 3);

        let err = wait_until(Duration::from_millis(30), Duration::from_millis(5), || {
            Ok(false)
        })
        .expect_err("never true");
        assert!(err.to_string().contains("not met"), "{err}");

        let err = wait_until(Duration::from_secs(5), Duration::from_millis(1), || {
            bail!("boom")
        })
        .expect_err("error propagates");
        assert!(err.to_string().contains("boom"));
    }

    #[test]
    fn only_a_guest_skips_host_only_tests() {
        // The variable is read, never set here: tests run in parallel threads.
        assert_eq!(host_only("promtool"), !in_guest());
    }
}
