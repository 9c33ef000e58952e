//! Start-up, bad input and shutdown: exit codes, messages, and nothing left attached.

use std::{
    collections::HashSet,
    fs,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use testkit::{
    AgentProcess, Netns, command_without_caps, connect_closed_port, require_root, wait_until,
};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");

fn agent_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9844))
}

/// Runs the agent to completion in `ns` with `args`; returns (exit code, stderr).
fn run_to_exit(ns: &Netns, args: &[&str], drop_caps: &[u32]) -> Result<(i32, String)> {
    let mut cmd = command_without_caps(Path::new(AGENT), args, drop_caps);
    let output = ns.run(move || cmd.output())??;
    let code = output.status.code().context("killed by a signal")?;
    Ok((code, String::from_utf8_lossy(&output.stderr).into_owned()))
}

#[test]
fn unknown_flag_and_bad_values_are_usage_errors() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    for (args, needle) in [
        (&["--no-such-flag"][..], "--no-such-flag"),
        (&["--web.listen-address", "nonsense"], "nonsense"),
        (&["--watch.ports", "80,http"], "http"),
        (&["--log.level", "loud"], "loud"),
        (&["run", "--collector.nope"], "--collector.nope"),
    ] {
        let (code, stderr) = run_to_exit(&ns, args, &[])?;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?} must name the bad input: {stderr}"
        );
        assert!(
            stderr.contains("Usage:"),
            "{args:?} must print the usage: {stderr}"
        );
    }
    Ok(())
}

#[test]
fn address_in_use_is_one_clear_line() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let holder = ns.run(|| TcpListener::bind(agent_addr()))??;
    let (code, stderr) = run_to_exit(&ns, &["--web.listen-address", "127.0.0.1:9844"], &[])?;
    drop(holder);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("127.0.0.1:9844") && stderr.contains("in use"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn missing_capabilities_are_named() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let (code, stderr) = run_to_exit(&ns, &[], &[CAP_BPF, CAP_PERFMON])?;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("CAP_PERFMON"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    // `check` says the same and exits 1 too.
    let (code, _) = run_to_exit(&ns, &["check"], &[CAP_BPF])?;
    assert_eq!(code, 1);
    Ok(())
}

/// A fake tracefs that lacks `tcp:tcp_receive_reset`, as an old or trimmed kernel would.
fn tracefs_without_receive_reset() -> Result<tempdir::Dir> {
    // On a fresh machine tracefs may not be mounted yet: the agent mounts it when it needs it.
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        let status = Command::new(AGENT)
            .args(["check", "--probe.mode=tracepoint"])
            .output()?;
        anyhow::ensure!(
            status.status.code().is_some(),
            "sockscope check did not run"
        );
    }
    let dir = tempdir::Dir::new("tracefs")?;
    for tp in ["sock/inet_sock_set_state", "tcp/tcp_send_reset"] {
        let src = Path::new("/sys/kernel/tracing/events")
            .join(tp)
            .join("format");
        let dst = dir.path().join("events").join(tp);
        fs::create_dir_all(&dst)?;
        fs::copy(&src, dst.join("format")).with_context(|| src.display().to_string())?;
    }
    Ok(dir)
}

#[test]
fn a_missing_tracepoint_downs_one_probe_and_the_rest_works() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let fake = tracefs_without_receive_reset()?;
    let arg = format!("--path.tracefs={}", fake.path().display());
    // Classic tracepoints only: the raw ones do not depend on tracefs.
    let agent = AgentProcess::start(
        &ns,
        Path::new(AGENT),
        &[&arg, "--probe.mode=tracepoint"],
        agent_addr(),
    )?;
    let netns = ns.inode().to_string();
    // The start-up polls of /healthz before the server listened were refused with resets of
    // their own (more on a loaded machine): count from here.
    let before = agent
        .scrape()?
        .sum("sockscope_tcp_resets_sent_total", &[("netns", &netns)]);
    ns.run(|| connect_closed_port(SocketAddr::from(([127, 0, 0, 1], 1)), 5))??;
    let m = agent.scrape()?;
    assert_eq!(
        m.get("sockscope_probe_up", &[("probe", "rst_recv")]),
        Some(0.0)
    );
    assert_eq!(
        m.get("sockscope_probe_up", &[("probe", "rst_send")]),
        Some(1.0)
    );
    assert_eq!(
        m.get("sockscope_probe_up", &[("probe", "listen_track")]),
        Some(1.0)
    );
    assert_eq!(
        m.sum("sockscope_tcp_resets_sent_total", &[("netns", &netns)]) - before,
        5.0
    );
    assert_eq!(
        m.sum("sockscope_tcp_resets_received_total", &[("netns", &netns)]),
        0.0
    );
    let log = agent.log();
    assert!(
        log.contains("rst_recv") && log.contains("tcp:tcp_receive_reset is not available"),
        "the log says which probe and why: {log}"
    );
    Ok(())
}

/// BPF objects (programs, links) a process holds, from its fdinfo.
fn held_bpf_ids(pid: u32) -> Result<HashSet<(String, u32)>> {
    let mut ids = HashSet::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        for line in text.lines() {
            for kind in ["prog_id", "link_id"] {
                if let Some(v) = line
                    .strip_prefix(kind)
                    .and_then(|r| r.trim_start_matches(':').trim().parse().ok())
                {
                    ids.insert((kind.to_string(), v));
                }
            }
        }
    }
    Ok(ids)
}

/// The program and link ids that exist in the kernel now.
fn kernel_bpf_ids() -> HashSet<(String, u32)> {
    let progs = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| ("prog_id".to_string(), p.id()));
    let links = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| ("link_id".to_string(), l.id()));
    progs.chain(links).collect()
}

#[test]
fn sigterm_exits_zero_and_detaches_everything() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let mut agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let held = held_bpf_ids(agent.pid())?;
    assert!(
        held.iter().filter(|(k, _)| k == "prog_id").count() >= 3,
        "the agent holds its programs: {held:?}"
    );
    // Listing the kernel's ids can stop short when another test's agent exits mid-walk
    // (an id vanishes between "next id" and "get by id"): retry rather than fail on that.
    wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok(held.is_subset(&kernel_bpf_ids()))
    })
    .context("the agent's programs and links are not all listed in the kernel")?;
    let status = agent.terminate(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok(held.is_disjoint(&kernel_bpf_ids()))
    })
    .context("programs or links of the stopped agent are still in the kernel")?;
    Ok(())
}

mod tempdir {
    use std::path::{Path, PathBuf};

    /// A temporary directory removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(prefix: &str) -> std::io::Result<Self> {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("sockscope-{prefix}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
