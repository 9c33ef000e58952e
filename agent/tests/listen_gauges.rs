//! Listen-backlog gauges and `sockscope_listen_drops_total` against the kernel's own figures,
//! each test in its own throwaway network namespace.
//!
//! The agent runs inside the test's namespace (it serves on 127.0.0.1:9844 there) but reads
//! every namespace of the host, so each test asserts only on series with its own `netns`.
//! Kernel figures are read inside the namespace: `/proc/thread-self/net/tcp{,6}` (rx_queue
//! of a LISTEN line is the accept queue length; the line of each SYN_RECV request) and the
//! namespace's `TcpExtListenDrops`.

use std::{
    mem::size_of,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use testkit::{AgentProcess, Metrics, Netns, require_root, wait_until};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");

fn agent_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9844))
}

/// Socket options of a test listener.
#[derive(Clone, Copy, Default)]
struct Opts {
    reuseport: bool,
    /// TCP_DEFER_ACCEPT in seconds: a handshake without data stays a SYN_RECV request.
    defer_accept: i32,
}

/// A listener made with plain system calls, so that the backlog is exactly `backlog`.
fn listen(addr: SocketAddr, backlog: i32, opts: Opts) -> Result<TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2); the fd is owned right after.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    if opts.reuseport {
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, one)?;
    }
    if opts.defer_accept > 0 {
        setsockopt(
            &fd,
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            opts.defer_accept,
        )?;
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const storage).cast(), len) };
    ensure!(rc == 0, "bind {addr}: {}", std::io::Error::last_os_error());
    // SAFETY: a bound socket.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), backlog) };
    ensure!(rc == 0, "listen: {}", std::io::Error::last_os_error());
    Ok(TcpListener::from(fd))
}

fn setsockopt(fd: &OwnedFd, level: i32, name: i32, value: libc::c_int) -> Result<()> {
    // SAFETY: a valid socket and an int option.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "setsockopt: {}", std::io::Error::last_os_error());
    Ok(())
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Starts `n` non-blocking connects to `to` at once; the sockets stay open with the caller.
fn connect_many(to: SocketAddr, n: usize) -> Result<Vec<OwnedFd>> {
    let family = match to {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    let (storage, len) = sockaddr(to);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        // SAFETY: plain socket(2); owned right after.
        let raw = unsafe {
            libc::socket(
                family,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        ensure!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const storage).cast(), len) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            ensure!(
                e.raw_os_error() == Some(libc::EINPROGRESS),
                "connect {to}: {e}"
            );
        }
        out.push(fd);
    }
    Ok(out)
}

/// What `/proc/thread-self/net/tcp` and `tcp6` say about one local port, in the calling
/// thread's namespace.
#[derive(Debug, Default, PartialEq, Eq)]
struct ProcTcp {
    /// `(rx_queue, tx_queue)` of each LISTEN line: for a listener rx_queue is sk_ack_backlog.
    listen: Vec<(u64, u64)>,
    /// SYN_RECV lines (request sockets).
    syn_recv: usize,
}

fn proc_tcp(port: u16) -> Result<ProcTcp> {
    let mut out = ProcTcp::default();
    for file in ["tcp", "tcp6"] {
        let path = format!("/proc/thread-self/net/{file}");
        let text = std::fs::read_to_string(&path).with_context(|| path.clone())?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(queues)) =
                (fields.get(1), fields.get(3), fields.get(4))
            else {
                bail!("{path}: short line {line:?}");
            };
            let local_port = local
                .rsplit_once(':')
                .map(|(_, p)| u16::from_str_radix(p, 16))
                .context("local address")??;
            if local_port != port {
                continue;
            }
            match *state {
                "0A" => {
                    let (tx, rx) = queues.split_once(':').context("queues")?;
                    out.listen
                        .push((u64::from_str_radix(rx, 16)?, u64::from_str_radix(tx, 16)?));
                }
                "03" => out.syn_recv += 1,
                _ => {}
            }
        }
    }
    Ok(out)
}

/// The labels of one listener series.
fn series<'a>(netns: &'a str, addr: &'a str, port: &'a str) -> [(&'a str, &'a str); 4] {
    let family = if addr.contains(':') { "ipv6" } else { "ipv4" };
    [
        ("netns", netns),
        ("family", family),
        ("addr", addr),
        ("port", port),
    ]
}

fn gauge(m: &Metrics, name: &str, labels: &[(&str, &str); 4]) -> Option<f64> {
    m.get(&format!("sockscope_listen_{name}"), labels)
}

#[test]
fn accept_queue_and_drops_equal_the_kernel() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let netns = ns.inode().to_string();
    let kernel_before = ns.counters()?;
    let somaxconn: u64 = ns.read_sysctl("net.core.somaxconn")?.parse()?;

    const BACKLOG: i32 = 4;
    const CLIENTS: usize = 20;
    let (listener, clients) = ns.run(|| -> Result<_> {
        let listener = listen("127.0.0.1:0".parse()?, BACKLOG, Opts::default())?;
        let clients = connect_many(listener.local_addr()?, CLIENTS)?;
        Ok((listener, clients))
    })??;
    let port = listener.local_addr()?.port();
    let port_label = port.to_string();
    let labels = series(&netns, "127.0.0.1", &port_label);

    // The accept queue fills to backlog + 1 (the kernel's "full" is "more than the limit").
    wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        Ok(ns.run(|| proc_tcp(port))??.listen == vec![(BACKLOG as u64 + 1, 0)])
    })?;

    // Unanswered clients retransmit their SYNs (each one more drop): compare only figures
    // taken while the kernel's count stood still around the scrape.
    let mut compared = None;
    for _ in 0..20 {
        let k0 = ns.counters()?.get("TcpExtListenDrops")?;
        let tcp0 = ns.run(|| proc_tcp(port))??;
        let m = agent.scrape()?;
        let tcp1 = ns.run(|| proc_tcp(port))??;
        let k1 = ns.counters()?.get("TcpExtListenDrops")?;
        if k0 == k1 && tcp0 == tcp1 {
            compared = Some((m, tcp0, k1));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some((m, tcp, drops_now)) = compared else {
        bail!("the kernel's figures never stood still around a scrape");
    };
    let (recv_q, _) = tcp.listen[0];
    assert_eq!(
        gauge(&m, "accept_queue_length", &labels),
        Some(recv_q as f64),
        "accept queue = /proc/net/tcp rx_queue (Recv-Q)\n{}",
        agent.log()
    );
    // /proc/net/tcp has no column for the limit (tx_queue of a listener is 0): the limit is
    // what listen(2) asked for, capped by the namespace's somaxconn.
    assert_eq!(
        gauge(&m, "accept_queue_limit", &labels),
        Some(BACKLOG.min(somaxconn as i32) as f64)
    );
    assert_eq!(
        m.get("sockscope_sysctl_somaxconn", &[("netns", &netns)]),
        Some(somaxconn as f64)
    );
    assert_eq!(gauge(&m, "sockets", &labels), Some(1.0));
    assert_eq!(gauge(&m, "syn_queue_length", &labels), Some(0.0));

    let kernel_drops = drops_now - kernel_before.get("TcpExtListenDrops")?;
    assert!(
        kernel_drops >= (CLIENTS - BACKLOG as usize - 1) as u64,
        "{kernel_drops}"
    );
    assert_eq!(
        gauge(&m, "drops_total", &labels),
        Some(kernel_drops as f64),
        "the listener's sk_drops = the namespace's ListenDrops delta (its only listener that drops)"
    );
    assert_eq!(
        m.sum("sockscope_listen_drops_total", &[("netns", &netns)]),
        kernel_drops as f64
    );
    let before = agent.scrape()?;
    let last_seen = gauge(&before, "drops_total", &labels).context("drops series")?;

    // The listener closes: its counter keeps the last value read, its gauges go.
    drop(listener);
    drop(clients);
    let after = agent.scrape()?;
    assert_eq!(gauge(&after, "drops_total", &labels), Some(last_seen));
    assert_eq!(gauge(&after, "accept_queue_length", &labels), None);
    assert_eq!(gauge(&after, "sockets", &labels), None);
    Ok(())
}

#[test]
fn an_ipv6_listener_has_its_family_and_address() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let netns = ns.inode().to_string();
    let (listener, clients) = ns.run(|| -> Result<_> {
        let listener = listen("[::1]:0".parse()?, 7, Opts::default())?;
        let clients = connect_many(listener.local_addr()?, 2)?;
        Ok((listener, clients))
    })??;
    let port = listener.local_addr()?.port();
    let port_label = port.to_string();
    let labels = series(&netns, "::1", &port_label);
    wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        Ok(ns.run(|| proc_tcp(port))??.listen == vec![(2, 0)])
    })?;
    let m = agent.scrape()?;
    assert_eq!(gauge(&m, "accept_queue_length", &labels), Some(2.0));
    assert_eq!(gauge(&m, "accept_queue_limit", &labels), Some(7.0));
    assert_eq!(gauge(&m, "sockets", &labels), Some(1.0));
    assert_eq!(gauge(&m, "drops_total", &labels), Some(0.0));
    drop(clients);
    Ok(())
}

#[test]
fn a_reuseport_group_is_one_series() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let netns = ns.inode().to_string();
    let opts = Opts {
        reuseport: true,
        ..Opts::default()
    };
    let group = ns.run(|| -> Result<Vec<TcpListener>> {
        let first = listen("127.0.0.1:0".parse()?, 3, opts)?;
        let addr = first.local_addr()?;
        Ok(vec![first, listen(addr, 5, opts)?, listen(addr, 8, opts)?])
    })??;
    let port = group[0].local_addr()?.port();
    let port_label = port.to_string();
    let labels = series(&netns, "127.0.0.1", &port_label);
    let clients = ns.run(|| connect_many(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), 4))??;
    wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let tcp = ns.run(|| proc_tcp(port))??;
        Ok(tcp.listen.iter().map(|(rx, _)| rx).sum::<u64>() == 4)
    })?;
    let m = agent.scrape()?;
    assert_eq!(gauge(&m, "sockets", &labels), Some(3.0));
    assert_eq!(gauge(&m, "accept_queue_limit", &labels), Some(16.0));
    assert_eq!(gauge(&m, "accept_queue_length", &labels), Some(4.0));
    assert_eq!(
        m.series("sockscope_listen_sockets")
            .iter()
            .filter(|s| s.label("netns") == Some(&netns) && s.label("port") == Some(&port_label))
            .count(),
        1,
        "one series for the group"
    );
    drop(clients);
    Ok(())
}

#[test]
fn syn_queue_counts_the_requests_of_each_listener() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let netns = ns.inode().to_string();
    // With TCP_DEFER_ACCEPT a handshake that carries no data stays a request in the SYN
    // queue: connected clients that never write keep it there, deterministically.
    let defer = Opts {
        defer_accept: 60,
        ..Opts::default()
    };
    let (v4, dual, clients) = ns.run(|| -> Result<_> {
        let v4 = listen("127.0.0.1:0".parse()?, 16, defer)?;
        let dual = listen("[::]:0".parse()?, 16, defer)?;
        let dual_port = dual.local_addr()?.port();
        let mut clients = connect_many(v4.local_addr()?, 3)?;
        // IPv4 clients of a dual-stack listener: v4-mapped requests, counted for `::`.
        clients.extend(connect_many(
            SocketAddr::from((Ipv4Addr::LOCALHOST, dual_port)),
            4,
        )?);
        clients.extend(connect_many(
            SocketAddr::from((IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]), dual_port)),
            2,
        )?);
        Ok((v4, dual, clients))
    })??;
    let (v4_port, dual_port) = (v4.local_addr()?.port(), dual.local_addr()?.port());
    wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        Ok(ns.run(|| proc_tcp(v4_port))??.syn_recv == 3
            && ns.run(|| proc_tcp(dual_port))??.syn_recv == 6)
    })?;
    let m = agent.scrape()?;
    let (v4_label, dual_label) = (v4_port.to_string(), dual_port.to_string());
    let kernel_v4 = ns.run(|| proc_tcp(v4_port))??.syn_recv;
    let kernel_dual = ns.run(|| proc_tcp(dual_port))??.syn_recv;
    assert_eq!(
        gauge(
            &m,
            "syn_queue_length",
            &series(&netns, "127.0.0.1", &v4_label)
        ),
        Some(kernel_v4 as f64)
    );
    assert_eq!(
        gauge(&m, "syn_queue_length", &series(&netns, "::", &dual_label)),
        Some(kernel_dual as f64)
    );
    assert_eq!(
        gauge(
            &m,
            "accept_queue_length",
            &series(&netns, "::", &dual_label)
        ),
        Some(0.0)
    );
    drop(clients);
    Ok(())
}

#[test]
fn every_namespace_with_a_listener_is_read() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let a = Netns::new()?;
    let b = Netns::new()?;
    a.sysctl("net.ipv4.tcp_syncookies", "0")?;
    b.sysctl("net.ipv4.tcp_syncookies", "2")?;
    // The agent lives in a; a process lives in b, as in any container.
    let agent = AgentProcess::start(&a, Path::new(AGENT), &[], agent_addr())?;
    // A second agent keeps a process living in b (no outside tool: the tests also run in a
    // minimal guest); it serves on b's own loopback.
    let resident = AgentProcess::start(
        &b,
        Path::new(AGENT),
        &["--no-collector.listen"],
        agent_addr(),
    )?;
    let listener_a = a.run(|| listen("127.0.0.1:0".parse()?, 10, Opts::default()))??;
    let listener_b = b.run(|| listen("0.0.0.0:0".parse()?, 20, Opts::default()))??;
    let (na, nb) = (a.inode().to_string(), b.inode().to_string());
    let pa = listener_a.local_addr()?.port().to_string();
    let pb = listener_b.local_addr()?.port().to_string();

    let m = agent.scrape()?;
    assert_eq!(
        gauge(&m, "accept_queue_limit", &series(&na, "127.0.0.1", &pa)),
        Some(10.0)
    );
    assert_eq!(
        gauge(&m, "accept_queue_limit", &series(&nb, "0.0.0.0", &pb)),
        Some(20.0),
        "the other namespace's listener, with its own netns label\n{}",
        agent.log()
    );
    assert_eq!(
        gauge(&m, "accept_queue_limit", &series(&na, "0.0.0.0", &pb)),
        None
    );
    for (netns, syncookies) in [(&na, 0.0), (&nb, 2.0)] {
        assert_eq!(
            m.get("sockscope_sysctl_tcp_syncookies", &[("netns", netns)]),
            Some(syncookies),
            "netns {netns}"
        );
        for name in [
            "sockscope_netstat_listen_drops_total",
            "sockscope_netstat_listen_overflows_total",
            "sockscope_sysctl_somaxconn",
        ] {
            assert!(
                m.get(name, &[("netns", netns)]).is_some(),
                "{name} for netns {netns}"
            );
        }
    }
    let pid = resident.pid().to_string();
    assert_eq!(
        m.get(
            "sockscope_netns_info",
            &[
                ("netns", &nb),
                ("name", ""),
                ("pid", &pid),
                ("comm", "sockscope")
            ]
        ),
        Some(1.0)
    );
    Ok(())
}

#[test]
fn netns_info_names_a_process_living_in_the_namespace() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let netns = ns.inode().to_string();
    let m = agent.scrape()?;
    let info = m.series("sockscope_netns_info");
    let ours: Vec<_> = info
        .iter()
        .filter(|s| s.label("netns") == Some(&netns))
        .collect();
    assert_eq!(ours.len(), 1, "{info:?}");
    let pid = ours[0].label("pid").context("pid label")?;
    let inode = std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino();
    assert_eq!(inode, ns.inode(), "pid {pid} lives in the namespace");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
    assert_eq!(ours[0].label("comm"), Some(comm.trim_end()));
    assert_eq!(ours[0].value, 1.0);
    // The agent is the only process there.
    assert_eq!(pid, agent.pid().to_string());
    Ok(())
}

#[test]
fn collectors_switch_independently() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let netns = ns.inode().to_string();
    let agent = AgentProcess::start(
        &ns,
        Path::new(AGENT),
        &["--no-collector.listen"],
        agent_addr(),
    )?;
    let m = agent.scrape()?;
    assert!(!m.contains("sockscope_listen_sockets"));
    assert!(!m.contains("sockscope_netns_info"));
    assert!(
        m.get("sockscope_netstat_listen_drops_total", &[("netns", &netns)])
            .is_some()
    );
    assert!(
        m.get("sockscope_sysctl_somaxconn", &[("netns", &netns)])
            .is_some()
    );
    drop(agent);

    let agent = AgentProcess::start(
        &ns,
        Path::new(AGENT),
        &["--no-collector.netstat", "--no-collector.sysctl"],
        agent_addr(),
    )?;
    let m = agent.scrape()?;
    assert!(!m.contains("sockscope_netstat_listen_drops_total"));
    assert!(!m.contains("sockscope_sysctl_somaxconn"));
    assert_eq!(
        gauge(&m, "sockets", &series(&netns, "127.0.0.1", "9844")),
        Some(1.0),
        "the agent's own listener"
    );
    Ok(())
}

/// Raises the soft limit of open files to the hard one (at least `want`).
fn raise_nofile(want: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0,
            "getrlimit"
        );
        if limit.rlim_max < want {
            limit.rlim_max = want;
        }
        limit.rlim_cur = limit.rlim_max;
        ensure!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()
        .context("VmRSS value")
}

#[test]
fn ten_thousand_listeners_are_all_on_the_page() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const LISTENERS: usize = 10_000;
    raise_nofile(LISTENERS as u64 + 1024)?;
    let ns = Netns::new()?;
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let netns = ns.inode().to_string();
    let listeners = ns.run(|| -> Result<Vec<TcpListener>> {
        (0..LISTENERS)
            .map(|_| listen("127.0.0.1:0".parse()?, 128, Opts::default()))
            .collect()
    })??;

    let mut durations = Vec::new();
    let mut collector = Vec::new();
    let mut m = agent.scrape()?;
    for _ in 0..10 {
        let start = Instant::now();
        m = agent.scrape()?;
        durations.push(start.elapsed());
        collector.push(
            m.get(
                "sockscope_collector_duration_seconds",
                &[("collector", "listen")],
            )
            .context("listen duration")?,
        );
    }
    let ours = m
        .series("sockscope_listen_sockets")
        .iter()
        .filter(|s| s.label("netns") == Some(&netns))
        .count();
    assert_eq!(ours, LISTENERS + 1, "every listener and the agent's own");
    durations.sort();
    collector.sort_by(f64::total_cmp);
    let rss = rss_kib(agent.pid())?;
    eprintln!(
        "{LISTENERS} listeners: /metrics median {:?} (max {:?}), listen collector median {:.1} ms, agent RSS {} MiB",
        durations[durations.len() / 2],
        durations[durations.len() - 1],
        collector[collector.len() / 2] * 1e3,
        rss / 1024
    );
    // Speed and memory are measured by the benchmark (`cargo xtask bench --only listeners`),
    // not asserted here: this test proves every listener is on the page.
    drop(listeners);
    Ok(())
}
