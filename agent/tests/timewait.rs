//! TIME_WAIT figures against the kernel's own, each test in namespaces of its own.
//!
//! The agent runs in one namespace and the traffic in another, named under /run/netns so the
//! agent finds it: the agent's own scrapes then leave no timewait socket where the test
//! counts. In the traffic namespace `tcp_tw_reuse` is 0, so no connect takes over a TIME_WAIT
//! port and every count stays as made.
//!
//! Oracles: `/proc/thread-self/net/tcp{,6}` of the namespace (TIME_WAIT lines), its
//! `/proc/net/sockstat` `tw` and `TcpExtTCPTimeWaitOverflow`, and what the scenario did.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, TcpListener},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use testkit::{
    AgentProcess, FirstCloser, Metrics, NamedNetns, Netns, TcpState, closed_connections,
    require_root, wait_until,
};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");
const SOCKETS: &str = "sockscope_tcp_time_wait_sockets";
const ENTERED: &str = "sockscope_tcp_time_wait_entered_total";
const PEERS: &str = "sockscope_tcp_time_wait_peer_sockets";

fn agent_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9844))
}

/// A traffic namespace the agent can find, with TIME_WAIT reuse off.
struct Work {
    ns: Netns,
    _name: NamedNetns,
    name: String,
    label: String,
}

impl Work {
    fn new(tag: &str) -> Result<Self> {
        Self::named(Netns::new()?, tag)
    }

    fn named(ns: Netns, tag: &str) -> Result<Self> {
        let name = format!("sockscope-tw-{tag}-{}-{}", std::process::id(), ns.inode());
        let named = NamedNetns::new(&ns, &name)?;
        ns.sysctl("net.ipv4.tcp_tw_reuse", "0")?;
        let label = ns.inode().to_string();
        Ok(Self {
            ns,
            _name: named,
            name,
            label,
        })
    }

    /// TIME_WAIT sockets of the namespace as /proc/net/tcp lists them (`ss -tan state
    /// time-wait`), per remote endpoint.
    fn time_wait_by_peer(&self) -> Result<HashMap<SocketAddr, u64>> {
        let mut out = HashMap::new();
        for s in self.ns.tcp_sockets()? {
            if s.state == TcpState::TimeWait {
                *out.entry(s.remote).or_insert(0) += 1;
            }
        }
        Ok(out)
    }

    fn time_wait_count(&self) -> Result<u64> {
        Ok(self.time_wait_by_peer()?.values().sum())
    }

    /// `ss -tan state time-wait` in the namespace, where `ss` exists (a host-only oracle:
    /// minimal guests have none).
    fn ss_time_wait_count(&self) -> Result<Option<u64>> {
        let output = match std::process::Command::new("ss")
            .args(["-N", &self.name, "-H", "-tan", "state", "time-wait"])
            .output()
        {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        ensure!(
            output.status.success(),
            "ss: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(Some(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count() as u64,
        ))
    }

    fn sockstat_tw(&self) -> Result<u64> {
        self.ns
            .sockstat()?
            .get("TCP", "tw")
            .context("no TCP tw in sockstat")
    }

    fn listener(&self, addr: &str) -> Result<TcpListener> {
        let addr: SocketAddr = addr.parse()?;
        self.ns.run(|| TcpListener::bind(addr))?.context("bind")
    }

    fn connections(
        &self,
        listener: &TcpListener,
        n: usize,
        first: FirstCloser,
    ) -> Result<Vec<std::net::TcpStream>> {
        self.ns.run(|| closed_connections(listener, n, first))?
    }

    fn gauge(&self, page: &Metrics, state: &str, port: &str) -> f64 {
        page.get(
            SOCKETS,
            &[("netns", &self.label), ("state", state), ("port", port)],
        )
        .unwrap_or(0.0)
    }

    fn gauge_sum(&self, page: &Metrics, state: Option<&str>) -> f64 {
        match state {
            Some(s) => page.sum(SOCKETS, &[("netns", &self.label), ("state", s)]),
            None => page.sum(SOCKETS, &[("netns", &self.label)]),
        }
    }

    /// Entries from ephemeral ports: labelled `ephemeral`, or — rarely — with a port number
    /// other than `listener`, when a namespace just destroyed had a listener on that port and
    /// the kernel gave its inode number to this one (the agent's listener-port set lags by
    /// one refresh; docs/METRICS.md). Parallel tests make such namespaces all the time.
    fn ephemeral_entries(&self, page: &Metrics, listener: Option<&str>) -> f64 {
        page.series(ENTERED)
            .into_iter()
            .filter(|s| s.label("netns") == Some(self.label.as_str()))
            .filter(|s| {
                let port = s.label("port").unwrap_or_default();
                port == "ephemeral" || (port.parse::<u16>().is_ok() && Some(port) != listener)
            })
            .map(|s| s.value)
            .sum()
    }

    fn entered(&self, page: &Metrics, port: &str) -> f64 {
        page.get(ENTERED, &[("netns", &self.label), ("port", port)])
            .unwrap_or(0.0)
    }
}

fn start_agent(home: &Netns, args: &[&str]) -> Result<AgentProcess> {
    AgentProcess::start(home, Path::new(AGENT), args, agent_addr())
}

/// Scrapes until `ready` holds for the page (the pass over the namespaces may have started
/// before the sockets settled), at most 10 s.
fn scrape_until(agent: &AgentProcess, ready: impl Fn(&Metrics) -> bool) -> Result<Metrics> {
    let mut last = None;
    wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let page = agent.scrape()?;
        let ok = ready(&page);
        last = Some(page);
        Ok(ok)
    })
    .with_context(|| format!("agent log:\n{}", agent.log()))?;
    last.context("no page")
}

#[test]
fn client_and_server_closes_btf_tracepoints() -> Result<()> {
    client_and_server_closes("btf_tracepoint")
}

#[test]
fn client_and_server_closes_raw_tracepoints() -> Result<()> {
    client_and_server_closes("raw_tracepoint")
}

#[test]
fn client_and_server_closes_classic_tracepoints() -> Result<()> {
    client_and_server_closes("tracepoint")
}

/// N client-closed connections leave N TIME_WAIT sockets on ephemeral ports, M server-closed
/// ones leave M on the listener's port; the gauges equal the kernel's lists and sockstat, and
/// the entries rise by exactly N and M.
fn client_and_server_closes(mode: &str) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const N: usize = 60;
    const M: usize = 25;
    let home = Netns::new()?;
    let work = Work::new(mode)?;
    let mode_arg = format!("--probe.mode={mode}");
    let agent = start_agent(&home, &[&mode_arg])?;
    let listener = work.listener("127.0.0.1:0")?;
    let port = listener.local_addr()?.port().to_string();
    let before = scrape_until(&agent, |p| {
        p.get(
            "sockscope_probe_info",
            &[("probe", "listen_track"), ("path", mode)],
        ) == Some(1.0)
    })?;
    ensure!(work.ephemeral_entries(&before, Some(&port)) == 0.0);

    work.connections(&listener, N, FirstCloser::Client)?;
    work.connections(&listener, M, FirstCloser::Server)?;
    let page = scrape_until(&agent, |p| {
        work.gauge_sum(p, Some("time_wait")) >= (N + M) as f64 && work.entered(p, &port) >= M as f64
    })?;
    let tw_before = work.sockstat_tw()?;
    let listed = work.time_wait_count()?;
    let page2 = agent.scrape()?;
    let tw_after = work.sockstat_tw()?;
    for p in [&page, &page2] {
        ensure!(work.gauge(p, "time_wait", "ephemeral") == N as f64, "{p:?}");
        ensure!(work.gauge(p, "time_wait", &port) == M as f64);
        ensure!(work.gauge_sum(p, Some("time_wait")) == listed as f64);
        ensure!(work.gauge_sum(p, Some("fin_wait2")) == 0.0);
        ensure!(work.ephemeral_entries(p, Some(&port)) == N as f64);
        ensure!(work.entered(p, &port) == M as f64);
        ensure!(work.entered(p, "other") == 0.0);
    }
    ensure!(listed == (N + M) as u64, "the kernel lists {listed}");
    if let Some(ss) = work.ss_time_wait_count()? {
        ensure!(ss == listed, "ss lists {ss}, /proc/net/tcp {listed}");
    }
    ensure!(
        tw_before == tw_after,
        "sockstat tw moved: {tw_before} → {tw_after}"
    );
    ensure!(work.gauge_sum(&page2, None) == tw_after as f64);
    // The kernel counters and settings of a namespace without a listener of its own… it has
    // one here; they are there either way.
    ensure!(
        page2
            .get(
                "sockscope_sysctl_tcp_max_tw_buckets",
                &[("netns", &work.label)]
            )
            .is_some()
    );
    ensure!(
        page2
            .get(
                "sockscope_sysctl_ip_local_port_range_low",
                &[("netns", &work.label)]
            )
            .is_some()
    );
    Ok(())
}

/// Orphans closed before the peer's FIN become timewait sockets in FIN_WAIT2: counted once as
/// they enter, and not again when the peer's FIN moves them to TIME_WAIT.
#[test]
fn orphaned_fin_wait2_sockets_enter_once() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const N: usize = 40;
    let home = Netns::new()?;
    let work = Work::new("orphan")?;
    let agent = start_agent(&home, &[])?;
    let listener = work.listener("127.0.0.1:0")?;
    let servers = work.connections(&listener, N, FirstCloser::ClientOrphan)?;
    let page = scrape_until(&agent, |p| work.gauge_sum(p, Some("fin_wait2")) >= N as f64)?;
    ensure!(work.gauge(&page, "fin_wait2", "ephemeral") == N as f64);
    ensure!(work.gauge_sum(&page, None) == work.sockstat_tw()? as f64);
    ensure!(work.ephemeral_entries(&page, None) == N as f64);
    drop(servers);
    let page = scrape_until(&agent, |p| work.gauge_sum(p, Some("time_wait")) >= N as f64)?;
    ensure!(work.gauge(&page, "time_wait", "ephemeral") == N as f64);
    ensure!(work.gauge_sum(&page, Some("fin_wait2")) == 0.0);
    ensure!(work.time_wait_count()? == N as u64);
    ensure!(work.gauge_sum(&page, None) == work.sockstat_tw()? as f64);
    ensure!(
        work.ephemeral_entries(&page, None) == N as f64,
        "the move from FIN_WAIT2 to TIME_WAIT inside the timewait socket counted again"
    );
    Ok(())
}

/// With `tcp_max_tw_buckets` = M, N > M client closes leave M timewait sockets: M entries,
/// and N − M overflows, equal to TcpExtTCPTimeWaitOverflow.
#[test]
fn a_full_time_wait_table_is_counted_as_overflow() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const M: usize = 8;
    const N: usize = 30;
    let home = Netns::new()?;
    let work = Work::new("overflow")?;
    work.ns
        .sysctl("net.ipv4.tcp_max_tw_buckets", &M.to_string())?;
    let agent = start_agent(&home, &[])?;
    let listener = work.listener("127.0.0.1:0")?;
    let counters = work.ns.counters()?;
    work.connections(&listener, N, FirstCloser::Client)?;
    let overflows = work
        .ns
        .counters()?
        .delta(&counters)
        .value("TcpExtTCPTimeWaitOverflow")
        .unwrap_or(0);
    ensure!(overflows == (N - M) as u64, "kernel overflows {overflows}");
    let label = [("netns", work.label.as_str())];
    let page = scrape_until(&agent, |p| {
        p.get("sockscope_netstat_time_wait_overflows_total", &label) == Some(overflows as f64)
    })?;
    ensure!(work.gauge(&page, "time_wait", "ephemeral") == M as f64);
    ensure!(work.ephemeral_entries(&page, None) == M as f64);
    ensure!(work.gauge_sum(&page, None) == work.sockstat_tw()? as f64);
    ensure!(page.get("sockscope_sysctl_tcp_max_tw_buckets", &label) == Some(M as f64));
    Ok(())
}

/// The top-N endpoints are those with the most TIME_WAIT sockets in the kernel's list.
#[test]
fn top_peers_match_the_kernel_list() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let home = Netns::new()?;
    let work = Work::new("peers")?;
    let agent = start_agent(&home, &["--collector.timewait.top-peers=2"])?;
    let mut expected = Vec::new();
    for (addr, n) in [("127.0.0.3:0", 3), ("127.0.0.1:0", 9), ("127.0.0.2:0", 6)] {
        let listener = work.listener(addr)?;
        work.connections(&listener, n, FirstCloser::Client)?;
        expected.push((listener.local_addr()?, n as u64));
    }
    expected.sort_by_key(|e| std::cmp::Reverse(e.1));
    expected.truncate(2);
    let page = scrape_until(&agent, |p| work.gauge_sum(p, Some("time_wait")) >= 18.0)?;
    let listed = work.time_wait_by_peer()?;
    let mut kernel_top: Vec<(SocketAddr, u64)> = listed.into_iter().collect();
    kernel_top.sort_by_key(|e| std::cmp::Reverse(e.1));
    kernel_top.truncate(2);
    ensure!(kernel_top == expected, "kernel {kernel_top:?}");
    let mut shown: Vec<(SocketAddr, u64)> = page
        .series(PEERS)
        .into_iter()
        .filter(|s| s.label("netns") == Some(work.label.as_str()))
        .map(|s| -> Result<(SocketAddr, u64)> {
            let ip: IpAddr = s.label("raddr").context("raddr")?.parse()?;
            let port: u16 = s.label("rport").context("rport")?.parse()?;
            Ok((SocketAddr::new(ip, port), s.value as u64))
        })
        .collect::<Result<_>>()?;
    shown.sort_by_key(|e| std::cmp::Reverse(e.1));
    ensure!(
        shown == kernel_top,
        "agent {shown:?}, kernel {kernel_top:?}"
    );
    // No listener is left there: the timewait sockets alone name the namespace.
    ensure!(
        page.sum(
            "sockscope_netns_info",
            &[("netns", &work.label), ("name", &work.name)]
        ) == 1.0,
        "the namespace is not named"
    );
    Ok(())
}

/// Timewait sockets appear in namespaces that come and go during scrapes: every scrape
/// answers, no collector fails, and each namespace has at most N peer series.
#[test]
fn namespaces_with_time_wait_churning_during_scrapes() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let home = Netns::new()?;
    let agent = start_agent(&home, &["--collector.timewait.top-peers=3"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    const SCRAPES: usize = 8;
    let enough = AtomicBool::new(false);
    let scrapes = std::thread::scope(|s| -> Result<usize> {
        let enough = &enough;
        let churn = s.spawn(move || -> Result<()> {
            for round in 0..200u64 {
                if Instant::now() > deadline || (round >= 20 && enough.load(Ordering::Relaxed)) {
                    break;
                }
                let work = Work::new(&format!("churn{round}"))?;
                let mut held = Vec::new();
                for i in 0..5u8 {
                    let listener = work.listener(&format!("127.0.0.{}:0", i + 1))?;
                    work.connections(&listener, 4, FirstCloser::Client)?;
                    // Orphans too: sockets that move between kinds while a dump runs.
                    held.extend(work.connections(&listener, 2, FirstCloser::ClientOrphan)?);
                }
                std::thread::sleep(Duration::from_millis(10 + (round % 4) * 10));
                drop(held);
                drop(work);
            }
            Ok(())
        });
        let mut scrapes = 0;
        while !churn.is_finished() && Instant::now() < deadline {
            let page = agent.scrape()?;
            ensure!(
                page.sum("sockscope_collector_errors_total", &[]) == 0.0,
                "a collector failed during churn\n{}",
                agent.log()
            );
            let mut per_ns: HashMap<String, usize> = HashMap::new();
            for s in page.series(PEERS) {
                *per_ns
                    .entry(s.label("netns").unwrap_or_default().to_string())
                    .or_insert(0) += 1;
            }
            ensure!(per_ns.values().all(|n| *n <= 3), "{per_ns:?}");
            scrapes += 1;
            if scrapes >= SCRAPES {
                enough.store(true, Ordering::Relaxed);
            }
        }
        churn.join().expect("churn thread")?;
        Ok(scrapes)
    })?;
    ensure!(
        scrapes >= SCRAPES,
        "only {scrapes} scrapes ran during the churn"
    );
    Ok(())
}

/// `sockscope timewait --json` reads the kernel alone: the namespace's counts, the peer that
/// holds most of a small port range, and a warning about it.
#[test]
fn the_timewait_command_warns_about_a_peer_near_exhaustion() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let work = Work::new("cmd")?;
    work.ns
        .sysctl("net.ipv4.ip_local_port_range", "40000 40019")?;
    let listener = work.listener("127.0.0.1:0")?;
    let server = listener.local_addr()?;
    work.connections(&listener, 16, FirstCloser::Client)?;
    let output = std::process::Command::new(AGENT)
        .args(["timewait", "--json"])
        .output()?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let ns = report["namespaces"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|n| n["netns"].as_u64() == Some(work.ns.inode()))
        })
        .with_context(|| format!("our namespace is missing: {report}"))?;
    ensure!(ns["time_wait"] == 16, "{ns}");
    ensure!(ns["ephemeral_ports"] == 20, "{ns}");
    ensure!(ns["ip_local_port_range"] == serde_json::json!([40000, 40019]));
    let peer = &ns["peers"][0];
    ensure!(peer["raddr"] == server.ip().to_string() && peer["rport"] == server.port());
    ensure!(peer["sockets"] == 16 && peer["ephemeral"] == 16, "{peer}");
    let warnings = ns["warnings"].as_array().context("warnings")?;
    ensure!(
        warnings.len() == 1
            && warnings[0]
                .as_str()
                .is_some_and(|w| w.contains("16 of the 20 ephemeral ports")),
        "{warnings:?}"
    );
    // The table names the same.
    let table = std::process::Command::new(AGENT).arg("timewait").output()?;
    let text = String::from_utf8_lossy(&table.stdout);
    ensure!(
        table.status.success() && text.contains(&server.to_string()),
        "{text}"
    );
    Ok(())
}

/// Full sockets that leave FIN_WAIT2 for CLOSE because of a reset enter no TIME_WAIT and are
/// not counted: the client shuts its side (FIN_WAIT1/2, not orphaned), the server aborts.
#[test]
fn a_reset_in_fin_wait2_is_no_entry() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const N: usize = 12;
    let home = Netns::new()?;
    let work = Work::new("reset")?;
    let agent = start_agent(&home, &[])?;
    let listener = work.listener("127.0.0.1:0")?;
    let counters = work.ns.counters()?;
    work.ns.run(|| -> Result<()> {
        use std::io::Read as _;
        for _ in 0..N {
            let (mut client, server) = testkit::tcp_pair(&listener)?;
            client.shutdown(std::net::Shutdown::Write)?;
            testkit::set_linger_zero(&server)?;
            drop(server);
            client.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = [0u8; 4];
            let got = client.read(&mut buf);
            ensure!(
                matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "expected a reset, got {got:?}"
            );
        }
        Ok(())
    })??;
    let resets = work
        .ns
        .counters()?
        .delta(&counters)
        .value("TcpOutRsts")
        .unwrap_or(0);
    ensure!(resets >= N as u64, "only {resets} resets sent");
    let page = scrape_until(&agent, |p| {
        p.sum(
            "sockscope_tcp_resets_received_total",
            &[("netns", &work.label)],
        ) >= N as f64
    })?;
    let received: Vec<_> = page
        .series("sockscope_tcp_resets_received_total")
        .into_iter()
        .filter(|s| s.label("netns") == Some(work.label.as_str()))
        .collect();
    // FIN_WAIT1 or FIN_WAIT2, as the reset overtakes the ACK of the FIN or not: either way
    // the socket leaves a FIN state for CLOSE, which is what is tested.
    ensure!(
        received
            .iter()
            .all(|s| matches!(s.label("state"), Some("fin_wait1" | "fin_wait2"))),
        "{received:?}"
    );
    ensure!(work.gauge_sum(&page, None) == 0.0);
    ensure!(work.sockstat_tw()? == 0);
    ensure!(page.sum(ENTERED, &[("netns", &work.label)]) == 0.0);
    Ok(())
}

/// IPv6 connections: the timewait socket is matched by its IPv6 addresses too.
#[test]
fn ipv6_client_closes_enter_time_wait_exactly() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const N: usize = 30;
    let home = Netns::new()?;
    let work = Work::new("v6")?;
    let agent = start_agent(&home, &[])?;
    let listener = work.listener("[::1]:0")?;
    let server = listener.local_addr()?;
    work.connections(&listener, N, FirstCloser::Client)?;
    let page = scrape_until(&agent, |p| work.ephemeral_entries(p, None) >= N as f64)?;
    ensure!(work.ephemeral_entries(&page, None) == N as f64);
    ensure!(work.gauge(&page, "time_wait", "ephemeral") == N as f64);
    ensure!(work.time_wait_count()? == N as u64);
    ensure!(work.gauge_sum(&page, None) == work.sockstat_tw()? as f64);
    let peer = page.get(
        PEERS,
        &[
            ("netns", &work.label),
            ("raddr", "::1"),
            ("rport", &server.port().to_string()),
        ],
    );
    ensure!(peer == Some(N as f64), "{peer:?}");
    Ok(())
}

/// A namespace with an established hash of its own, of one bucket
/// (`tcp_child_ehash_entries` = 1 in its parent): every socket is in one chain, so the
/// timewait socket of a closing connection sits deep in it, wherever the kernel puts it.
#[test]
fn entries_are_exact_in_one_long_hash_chain() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const N: usize = 120;
    let home = Netns::new()?;
    let parent = Netns::new()?;
    parent.sysctl("net.ipv4.tcp_child_ehash_entries", "1")?;
    let work = Work::named(parent.run(Netns::new)??, "chain")?;
    ensure!(work.ns.read_sysctl("net.ipv4.tcp_ehash_entries")? == "1");
    // The table's default size follows the hash: 0 here.
    work.ns.sysctl("net.ipv4.tcp_max_tw_buckets", "100000")?;
    let agent = start_agent(&home, &[])?;
    let listener = work.listener("127.0.0.1:0")?;
    let port = listener.local_addr()?.port().to_string();
    work.connections(&listener, N, FirstCloser::Client)?;
    work.connections(&listener, N / 2, FirstCloser::Server)?;
    let page = scrape_until(&agent, |p| work.entered(p, &port) >= (N / 2) as f64)?;
    ensure!(work.time_wait_count()? == (N + N / 2) as u64);
    ensure!(work.gauge(&page, "time_wait", "ephemeral") == N as f64);
    ensure!(
        work.ephemeral_entries(&page, Some(&port)) == N as f64,
        "entries {} of {N}",
        work.ephemeral_entries(&page, Some(&port))
    );
    ensure!(work.entered(&page, &port) == (N / 2) as f64);
    Ok(())
}
