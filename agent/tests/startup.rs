//! Start-up, bad input and shutdown: exit codes, messages, and nothing left attached.

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use testkit::{
    AgentProcess, Netns, TempDir, command_without_caps, connect_closed_port, kernel_bpf_ids,
    partial_tracefs, require_root, wait_until,
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
fn tracefs_without_receive_reset() -> Result<TempDir> {
    partial_tracefs(
        Path::new(AGENT),
        &["sock/inet_sock_set_state", "tcp/tcp_send_reset"],
    )
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
    // The scenario's resets only: a health check that timed out under load can add one of
    // its own when the agent answers it late.
    assert_eq!(
        m.sum(
            "sockscope_tcp_resets_sent_total",
            &[("netns", &netns), ("reason", "no_socket")]
        ),
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

#[test]
fn sigterm_exits_zero_and_detaches_everything() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let mut agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let held = agent.held_bpf_ids()?;
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

#[test]
fn sigkill_leaves_nothing_attached_and_a_restart_works_at_once() -> Result<()> {
    use std::os::unix::process::ExitStatusExt as _;
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let before = kernel_bpf_ids();
    let mut agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let held = agent.held_bpf_ids()?;
    let count = |kind: &str| held.iter().filter(|(k, _)| k == kind).count();
    assert!(
        count("prog_id") >= 3 && count("link_id") >= 1,
        "the agent holds its programs and links: {held:?}"
    );
    let running = kernel_bpf_ids();
    assert!(held.is_subset(&running), "{held:?} not all in {running:?}");
    assert!(held.is_disjoint(&before), "the agent's own, new ids");
    let probes_up = |m: &testkit::Metrics| -> Vec<(String, f64)> {
        m.series("sockscope_probe_up")
            .iter()
            .map(|s| (s.label("probe").unwrap_or_default().to_string(), s.value))
            .collect()
    };
    let up_first = probes_up(&agent.scrape()?);
    assert!(up_first.iter().any(|(_, v)| *v == 1.0), "{up_first:?}");

    let status = agent.kill()?;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    // The kernel frees programs and links when the last descriptor goes: at exit.
    wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok(held.is_disjoint(&kernel_bpf_ids()))
    })
    .with_context(|| {
        let left: Vec<_> = held.intersection(&kernel_bpf_ids()).cloned().collect();
        format!("still in the kernel after SIGKILL: {left:?}")
    })?;
    drop(agent);

    // A restart on the same address binds and attaches at once, and counts.
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let m = agent.scrape()?;
    assert_eq!(probes_up(&m), up_first, "the same probes are up again");
    let netns = ns.inode().to_string();
    let refused = ns.run(|| connect_closed_port(SocketAddr::from(([127, 0, 0, 1], 1)), 2))??;
    assert_eq!(refused, 2);
    let m = agent.scrape()?;
    assert_eq!(
        m.sum(
            "sockscope_tcp_resets_sent_total",
            &[
                ("netns", &netns),
                ("reason", "no_socket"),
                ("port", "other")
            ]
        ),
        2.0,
        "{}",
        agent.log()
    );
    Ok(())
}
