//! Least privilege: the agent works with exactly the capabilities the README lists (as root
//! with a reduced bounding set, and as an unprivileged user with them as ambient
//! capabilities), keeps only CAP_SYS_ADMIN and CAP_SYS_PTRACE on every thread once its
//! programs are attached, and `sockscope check` names a missing one.

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use testkit::{
    AgentProcess, Metrics, Netns, command_with_caps, connect_closed_port, kernel_bpf_ids,
    require_root, thread_caps, wait_until,
};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What `sockscope run` needs (README, "Capabilities").
const NEEDED: &[u32] = &[
    CAP_BPF,
    CAP_PERFMON,
    CAP_NET_ADMIN,
    CAP_SYS_ADMIN,
    CAP_SYS_PTRACE,
];
/// What it keeps after start-up.
const KEPT: u64 = 1 << CAP_SYS_ADMIN | 1 << CAP_SYS_PTRACE;
/// `nobody`.
const NOBODY: u32 = 65534;

fn agent_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9844))
}

fn probes_up(m: &Metrics) -> Vec<(String, f64)> {
    m.series("sockscope_probe_up")
        .iter()
        .map(|s| (s.label("probe").unwrap_or_default().to_string(), s.value))
        .collect()
}

/// Starts the agent from `cmd` in a fresh namespace and checks a scenario there: a
/// listener is seen, refused connects are counted exactly, the probes are as `expected`
/// (or, when `None`, returned), every thread keeps only [`KEPT`] (and a bounding set of
/// `bounding`).
fn scenario(
    cmd: Command,
    uid: u32,
    expected: Option<&[(String, f64)]>,
    bounding: u64,
) -> Result<Vec<(String, f64)>> {
    let ns = Netns::new()?;
    let netns = ns.inode().to_string();
    let agent = AgentProcess::start_command(&ns, cmd, agent_addr())?;
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:0"))??;
    let port = listener.local_addr()?.port().to_string();
    let refused = ns.run(|| connect_closed_port(SocketAddr::from(([127, 0, 0, 1], 1)), 3))??;
    assert_eq!(refused, 3);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))?;
    let real_uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_default();
    assert_eq!(real_uid, uid.to_string(), "runs as {uid}");
    let m = agent.scrape()?;
    let log = agent.log();
    let up = probes_up(&m);
    if let Some(expected) = expected {
        assert_eq!(
            up, expected,
            "the same probes as with every capability: {log}"
        );
    }
    assert_eq!(
        m.sum(
            "sockscope_listen_sockets",
            &[("netns", &netns), ("port", &port)]
        ),
        1.0,
        "{log}"
    );
    assert_eq!(
        m.sum(
            "sockscope_tcp_resets_sent_total",
            &[
                ("netns", &netns),
                ("reason", "no_socket"),
                ("port", "other")
            ]
        ),
        3.0,
        "{log}"
    );
    for (tid, [inh, prm, eff, bnd, amb]) in thread_caps(agent.pid())? {
        assert_eq!(
            (prm, eff, inh, amb),
            (KEPT, KEPT, 0, 0),
            "thread {tid}: permitted, effective, inheritable, ambient"
        );
        assert_eq!(bnd, bounding, "thread {tid}: bounding set");
    }
    assert!(
        log.contains("capabilities after start-up: CAP_SYS_PTRACE, CAP_SYS_ADMIN"),
        "{log}"
    );
    drop(listener);
    // SIGTERM with only the kept capabilities: a clean exit, nothing left in the kernel.
    let held = agent.held_bpf_ids()?;
    let mut agent = agent;
    let status = agent.terminate(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok(held.is_disjoint(&kernel_bpf_ids()))
    })
    .context("programs or links of the stopped agent are still in the kernel")?;
    Ok(up)
}

/// The agent binary copied into a fresh directory under the temp dir, mode 0755; removed on
/// drop.
struct ReachableCopy(std::path::PathBuf);

impl ReachableCopy {
    fn new() -> Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("sockscope-privileges-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let copy = Self(dir.join("sockscope"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::copy(AGENT, &copy.0)?;
        std::fs::set_permissions(&copy.0, std::fs::Permissions::from_mode(0o755))?;
        Ok(copy)
    }
}

impl Drop for ReachableCopy {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn runs_with_exactly_the_listed_capabilities_and_keeps_two() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let needed_mask = NEEDED.iter().fold(0u64, |m, c| m | 1 << c);
    // Every capability: the baseline, and the bounding set is dropped too (CAP_SETPCAP).
    let baseline = scenario(Command::new(AGENT), 0, None, KEPT)?;
    assert!(
        baseline.iter().any(|(p, v)| p == "rst_send" && *v == 1.0),
        "{baseline:?}"
    );
    // Root with only the listed ones: without CAP_SETPCAP the bounding set stays as given.
    scenario(
        command_with_caps(Path::new(AGENT), &[], NEEDED, None),
        0,
        Some(&baseline),
        needed_mask,
    )?;
    // An unprivileged user with them as ambient capabilities, from a copy of the binary it
    // can reach (the build directory may be under a home only root may enter).
    let copy = ReachableCopy::new()?;
    scenario(
        command_with_caps(&copy.0, &[], NEEDED, Some(NOBODY)),
        NOBODY,
        Some(&baseline),
        needed_mask,
    )?;
    Ok(())
}

#[test]
fn check_names_a_missing_capability() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    // Neither CAP_NET_ADMIN nor CAP_SYS_ADMIN: the cgroup_skb program cannot be loaded.
    let keep = [CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE];
    let mut cmd = command_with_caps(Path::new(AGENT), &["check"], &keep, None);
    let output = ns.run(move || cmd.output())??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = |needle: &str| {
        stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line("capability CAP_NET_ADMIN").starts_with("missing"),
        "{stdout}"
    );
    assert!(
        line("capability CAP_SYS_ADMIN").starts_with("missing"),
        "{stdout}"
    );
    assert!(
        line("capability CAP_SYS_PTRACE").starts_with("ok"),
        "{stdout}"
    );
    assert!(
        line("probe listen_ingress").starts_with("missing"),
        "{stdout}"
    );
    assert!(
        line("capabilities after start-up").contains("CAP_SYS_ADMIN"),
        "{stdout}"
    );
    // The required ones are there: check can run.
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    Ok(())
}
