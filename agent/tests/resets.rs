//! Reset probes against the kernel's own counters, in a throwaway network namespace.
//!
//! The scenario causes resets of three reasons, each a known number of times, and checks:
//! the agent's sum for the namespace equals the namespace's `Tcp OutRsts` delta exactly,
//! each reason's count equals what the scenario did, and received resets are counted by the
//! receiving socket's state.
//!
//! Before Linux 6.10, `tcp_send_reset` is not reached by resets sent without a full socket, so
//! there the tracepoint paths must show `rst_send` as unavailable (and count nothing), never a
//! short sum; its fentry path (no reset reason: `unknown`) must count exactly where the kernel
//! permits fentry (the kernel-matrix guests). [`rst_send_exact`] says which the tests demand.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Result, ensure};
use testkit::{
    AgentProcess, Metrics, Netns, connect_closed_port, kernel_at_least, require_root,
    set_linger_zero, tcp_pair, wait_until,
};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");
const SENT: &str = "sockscope_tcp_resets_sent_total";
const RECEIVED: &str = "sockscope_tcp_resets_received_total";

/// Whether this kernel's `tcp_send_reset` sees every reset sent (Linux 6.10).
fn rst_send_exact() -> bool {
    kernel_at_least(6, 10)
}

/// The `reason` labels of (no socket, abort on close, SO_LINGER 0) on the path `rst_send`
/// took, or `None` when it is down; down is allowed only before 6.10 outside the guests.
fn sent_reasons(agent: &AgentProcess) -> Result<Option<[&'static str; 3]>> {
    let m = agent.scrape()?;
    if m.get(
        "sockscope_probe_info",
        &[("probe", "rst_send"), ("path", "fentry")],
    ) == Some(1.0)
    {
        return Ok(Some(["unknown"; 3]));
    }
    if m.get("sockscope_probe_up", &[("probe", "rst_send")]) == Some(1.0) {
        ensure!(
            rst_send_exact(),
            "before 6.10 only fentry is exact:\n{}",
            agent.log()
        );
        return Ok(Some(["no_socket", "tcp_abort_on_close", "tcp_state"]));
    }
    ensure!(
        !rst_send_exact() && !testkit::in_guest(),
        "rst_send must be up here:\n{}",
        agent.log()
    );
    Ok(None)
}

/// On a kernel before 6.10: `rst_send` is down with the reason in the log, and no series.
fn assert_rst_send_unavailable(agent: &AgentProcess, netns: &str) -> Result<()> {
    let m = agent.scrape()?;
    ensure!(
        m.get("sockscope_probe_up", &[("probe", "rst_send")]) == Some(0.0),
        "rst_send must be down before Linux 6.10\n{}",
        agent.log()
    );
    let log = agent.log();
    ensure!(
        log.contains("probe unavailable") && log.contains("predates Linux 6.10"),
        "the log must say why rst_send is down:\n{log}"
    );
    ensure!(
        m.sum(SENT, &[("netns", netns)]) == 0.0,
        "no sent resets may be shown without the probe"
    );
    eprintln!("kernel before 6.10: rst_send is unavailable, as it must be");
    Ok(())
}

fn agent_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9844))
}

/// Server side closes with unread data: the kernel aborts with an RST (tcp_abort_on_close).
/// The client reads until the reset arrives, so its own close sends nothing more.
fn close_with_unread_data(listener: &TcpListener) -> Result<()> {
    let (mut client, server) = tcp_pair(listener)?;
    client.write_all(b"unread")?;
    // Wait until the bytes sit in the server's receive queue.
    server.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut peek = [0u8; 1];
    ensure!(server.peek(&mut peek)? == 1, "server saw no data");
    drop(server);
    expect_reset(&mut client)
}

/// Client sets SO_LINGER {on, 0} and closes: an RST instead of a FIN.
fn close_with_linger_zero(listener: &TcpListener) -> Result<()> {
    let (client, mut server) = tcp_pair(listener)?;
    set_linger_zero(&client)?;
    drop(client);
    expect_reset(&mut server)
}

fn expect_reset(stream: &mut TcpStream) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
        other => anyhow::bail!("expected a reset, got {other:?}"),
    }
}

fn sent(m: &Metrics, netns: &str, reason: &str, state: &str, port: &str) -> f64 {
    sent_series(m, netns, reason, state, port).unwrap_or(0.0)
}

/// The series of resets sent with these labels, if there is one.
fn sent_series(m: &Metrics, netns: &str, reason: &str, state: &str, port: &str) -> Option<f64> {
    m.get(
        SENT,
        &[
            ("netns", netns),
            ("reason", reason),
            ("state", state),
            ("port", port),
        ],
    )
}

fn received(m: &Metrics, netns: &str, state: &str, port: &str) -> f64 {
    m.get(
        RECEIVED,
        &[("netns", netns), ("state", state), ("port", port)],
    )
    .unwrap_or(0.0)
}

#[test]
fn resets_match_the_kernel_and_the_scenario_btf_tracepoints() -> Result<()> {
    resets_match_the_kernel_and_the_scenario("btf_tracepoint")
}

#[test]
fn resets_match_the_kernel_and_the_scenario_raw_tracepoints() -> Result<()> {
    resets_match_the_kernel_and_the_scenario("raw_tracepoint")
}

#[test]
fn resets_match_the_kernel_and_the_scenario_classic_tracepoints() -> Result<()> {
    resets_match_the_kernel_and_the_scenario("tracepoint")
}

/// `rst_recv` through fentry on `tcp_reset` (the other probes take their usual paths). The
/// guests' kernels permit fentry, so there it must be chosen and give the same figures; a
/// kernel that refuses it (our hosts) must show the probe as down, with the reason.
#[test]
fn resets_match_the_kernel_and_the_scenario_fentry() -> Result<()> {
    resets_match_the_kernel_and_the_scenario("fentry")
}

/// The path `probe` must take under `--probe.mode=mode`.
fn expected_path(probe: &str, mode: &str) -> &'static str {
    match (probe, mode) {
        ("rst_recv" | "rst_send", "fentry") => "fentry",
        // listen_track has no fentry path: it keeps its first choice.
        (_, "fentry" | "btf_tracepoint") => "btf_tracepoint",
        (_, "raw_tracepoint") => "raw_tracepoint",
        _ => "tracepoint",
    }
}

/// The same figures whichever path the probes take.
fn resets_match_the_kernel_and_the_scenario(mode: &str) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let mode_arg = format!("--probe.mode={mode}");
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[&mode_arg], agent_addr())?;
    let probes = agent.scrape()?;
    // Before 6.10 only the fentry path of rst_send is exact; the tracepoint ones are down.
    let exact = rst_send_exact() || mode == "fentry";
    for probe in ["rst_send", "rst_recv", "listen_track"] {
        if probe == "rst_send" && !exact {
            continue;
        }
        let path = expected_path(probe, mode);
        let info = probes.get("sockscope_probe_info", &[("probe", probe), ("path", path)]);
        if path == "fentry" && info != Some(1.0) && !testkit::in_guest() {
            let log = agent.log();
            ensure!(
                probes.get("sockscope_probe_up", &[("probe", probe)]) == Some(0.0)
                    && log.contains("probe unavailable: fentry"),
                "without fentry, {probe} must be down with the reason:\n{log}"
            );
            eprintln!("this kernel refuses fentry: {probe} is down, as it must be");
            return Ok(());
        }
        ensure!(
            info == Some(1.0),
            "{probe} must run on {path} under --probe.mode={mode}: {}",
            agent.log()
        );
    }
    let netns = ns.inode().to_string();

    let kernel_before = ns.counters()?;
    let before = agent.scrape()?;

    const CLOSED_PORT: usize = 25;
    const UNREAD: usize = 7;
    const LINGER: usize = 11;
    let listener_port = ns.run(|| -> Result<u16> {
        // A port nobody listens on (bound, never listening, so no one else takes it).
        let closed = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let closed_port = closed.local_addr()?.port();
        let refused =
            connect_closed_port(SocketAddr::from(([127, 0, 0, 1], closed_port)), CLOSED_PORT)?;
        ensure!(
            refused == CLOSED_PORT,
            "only {refused} of {CLOSED_PORT} connects were refused"
        );
        let listener = TcpListener::bind("127.0.0.1:0")?;
        for _ in 0..UNREAD {
            close_with_unread_data(&listener)?;
        }
        for _ in 0..LINGER {
            close_with_linger_zero(&listener)?;
        }
        Ok(listener.local_addr()?.port())
    })??;
    let port = listener_port.to_string();

    let expected_total = (CLOSED_PORT + UNREAD + LINGER) as f64;
    // The programs count synchronously; the wait only covers softirq stragglers.
    let mut after = agent.scrape()?;
    wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        after = agent.scrape()?;
        Ok(
            after.sum(SENT, &[("netns", &netns)]) - before.sum(SENT, &[("netns", &netns)])
                >= expected_total,
        )
    })
    .ok();
    let kernel = ns.counters()?.delta(&kernel_before);

    let out_rsts = kernel.get("TcpOutRsts")? as f64;
    assert_eq!(
        out_rsts, expected_total,
        "the scenario sends exactly this many resets"
    );
    let d = |f: &dyn Fn(&Metrics) -> f64| f(&after) - f(&before);
    if exact {
        let agent_total =
            after.sum(SENT, &[("netns", &netns)]) - before.sum(SENT, &[("netns", &netns)]);
        assert_eq!(
            agent_total,
            out_rsts,
            "sum of {SENT} must equal the Tcp OutRsts delta\n{}",
            agent.log()
        );
        let [no_socket, abort, linger] =
            sent_reasons(&agent)?.expect("rst_send was checked to be up");
        assert_eq!(
            d(&|m| sent(m, &netns, no_socket, "none", "other")),
            CLOSED_PORT as f64
        );
        assert_eq!(
            d(&|m| sent(m, &netns, abort, "close", &port)),
            UNREAD as f64,
            "unread data at close, on the listener's port"
        );
        assert_eq!(
            d(&|m| sent(m, &netns, linger, "close", "other")),
            LINGER as f64,
            "SO_LINGER 0 goes through tcp_disconnect (reason tcp_state), from an ephemeral port"
        );
    } else {
        assert_rst_send_unavailable(&agent, &netns)?;
    }

    assert_eq!(
        d(&|m| received(m, &netns, "syn_sent", "other")),
        CLOSED_PORT as f64
    );
    assert_eq!(
        d(&|m| received(m, &netns, "established", "other")),
        UNREAD as f64
    );
    assert_eq!(
        d(&|m| received(m, &netns, "established", &port)),
        LINGER as f64
    );

    // The counting map holds at least this namespace's label sets, one entry each (received
    // resets: counted on every kernel, unlike those sent before 6.10).
    let entries = after
        .get("sockscope_ebpf_map_entries", &[("map", "resets_recv")])
        .unwrap_or(0.0);
    let own_sets = after
        .series("sockscope_tcp_resets_received_total")
        .iter()
        .filter(|s| s.label("netns") == Some(netns.as_str()))
        .count() as f64;
    assert!(
        entries >= own_sets && own_sets >= 3.0,
        "resets_recv holds {entries} entries, this namespace has {own_sets} series"
    );
    assert_eq!(
        after.get("sockscope_ebpf_map_max_entries", &[("map", "resets_recv")]),
        Some(8192.0)
    );

    // The agent's own copy of the kernel counter agrees too.
    let own = after.sum("sockscope_netstat_resets_sent_total", &[("netns", &netns)])
        - before.sum("sockscope_netstat_resets_sent_total", &[("netns", &netns)]);
    assert_eq!(own, out_rsts);
    Ok(())
}

#[test]
fn watched_ports_keep_their_label_and_others_fold() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    // Two closed ports: one watched, one not.
    let (watched, unwatched) = ns.run(|| -> Result<(u16, u16)> {
        let a = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let b = std::net::UdpSocket::bind("127.0.0.1:0")?;
        Ok((a.local_addr()?.port(), b.local_addr()?.port()))
    })??;
    let watch = format!("--watch.ports={watched}");
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[&watch], agent_addr())?;
    let netns = ns.inode().to_string();
    ns.run(|| -> Result<()> {
        connect_closed_port(SocketAddr::from(([127, 0, 0, 1], watched)), 3)?;
        connect_closed_port(SocketAddr::from(([127, 0, 0, 1], unwatched)), 4)?;
        Ok(())
    })??;
    let Some([no_socket, ..]) = sent_reasons(&agent)? else {
        return assert_rst_send_unavailable(&agent, &netns);
    };
    let m = agent.scrape()?;
    assert_eq!(
        sent(&m, &netns, no_socket, "none", &watched.to_string()),
        3.0
    );
    assert_eq!(sent(&m, &netns, no_socket, "none", "other"), 4.0);
    assert_eq!(
        sent_series(&m, &netns, no_socket, "none", &unwatched.to_string()),
        None
    );
    Ok(())
}

/// A listener from before the agent started is known only from the agent's seeding (its
/// marks in `LISTEN_*_SEEDED`): its resets keep its port, and a closed port beside it (in
/// the same group of 64 ports, so past the group mark) folds into `other`.
#[test]
fn a_listener_from_before_the_agent_keeps_its_port() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:0"))??;
    let port = listener.local_addr()?.port();
    let neighbour = port ^ 1;
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let netns = ns.inode().to_string();
    const ABORTS: usize = 3;
    const REFUSED: usize = 4;
    ns.run(|| -> Result<()> {
        for _ in 0..ABORTS {
            close_with_unread_data(&listener)?;
        }
        ensure!(
            connect_closed_port(SocketAddr::from(([127, 0, 0, 1], neighbour)), REFUSED)? == REFUSED,
            "port {neighbour} must be closed"
        );
        Ok(())
    })??;
    let Some([no_socket, abort_on_close, _]) = sent_reasons(&agent)? else {
        return assert_rst_send_unavailable(&agent, &netns);
    };
    let m = agent.scrape()?;
    let own = port.to_string();
    assert_eq!(
        sent(&m, &netns, abort_on_close, "close", &own),
        ABORTS as f64,
        "aborts on the seeded listener's port keep it"
    );
    assert_eq!(sent(&m, &netns, no_socket, "none", "other"), REFUSED as f64);
    assert_eq!(
        sent_series(&m, &netns, no_socket, "none", &neighbour.to_string()),
        None
    );
    Ok(())
}

#[test]
fn series_budget_folds_into_other_and_counts_it() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let ports: Vec<u16> = (0..4).map(|i| 20000 + i).collect();
    let watch = format!(
        "--watch.ports={}",
        ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let agent = AgentProcess::start(
        &ns,
        Path::new(AGENT),
        &[&watch, "--limit.series-per-metric=2"],
        agent_addr(),
    )?;
    let netns = ns.inode().to_string();
    let Some([no_socket, ..]) = sent_reasons(&agent)? else {
        ns.run(|| connect_closed_port(SocketAddr::from(([127, 0, 0, 1], ports[0])), 1))??;
        return assert_rst_send_unavailable(&agent, &netns);
    };
    for (i, port) in ports.iter().enumerate() {
        ns.run(|| connect_closed_port(SocketAddr::from(([127, 0, 0, 1], *port)), 1))??;
        // Scrape between events so the first two ports are decided before the others.
        let m = agent.scrape()?;
        let with_own_label = ports[..=i]
            .iter()
            .filter(|p| sent(&m, &netns, no_socket, "none", &p.to_string()) == 1.0)
            .count();
        assert_eq!(with_own_label, (i + 1).min(2));
    }
    let m = agent.scrape()?;
    assert_eq!(
        sent(&m, &netns, no_socket, "none", "other"),
        2.0,
        "the last two ports fold"
    );
    assert_eq!(
        m.get("sockscope_label_overflow_total", &[("metric", SENT)]),
        Some(2.0)
    );
    Ok(())
}
