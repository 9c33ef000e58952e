//! `sockscope timewait`: per network namespace, the remote endpoints with the most TIME_WAIT
//! sockets against the ephemeral ports `connect()` has for them, the TIME_WAIT table against
//! `tcp_max_tw_buckets`, and the connections that skipped TIME_WAIT because it was full.
//! Reads the kernel directly (sock_diag, /proc in each namespace); needs no agent and no BPF.
//!
//! Why a peer runs out: a connection is a 4-tuple, so towards one remote address and port the
//! local side has one connection per local port, and a TIME_WAIT socket keeps its port for
//! 60 s. When the ephemeral ports in TIME_WAIT towards one endpoint approach the size of
//! `ip_local_port_range`, `connect()` to it starts failing with EADDRNOTAVAIL (unless
//! `net.ipv4.tcp_tw_reuse` lets it take over TIME_WAIT ports, or the socket binds a local
//! address of its own).

use std::{io::Write as _, process::ExitCode};

use serde::Serialize;

use crate::{
    cli::TimewaitArgs,
    metrics::netstat,
    netns::Discovery,
    timewait::{NsTimeWait, TwState},
};

/// Share of the ephemeral ports in TIME_WAIT towards one endpoint from which it is flagged.
pub const WARN_SHARE: f64 = 0.5;
/// Share of `tcp_max_tw_buckets` from which the table is flagged as nearly full.
pub const TABLE_WARN_SHARE: f64 = 0.9;

/// What the command found.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Namespaces with timewait sockets or TIME_WAIT overflows, and the command's own.
    pub namespaces: Vec<NsReport>,
}

/// One namespace.
#[derive(Debug, Serialize)]
pub struct NsReport {
    /// Namespace inode (the `netns` label of the metrics).
    pub netns: u64,
    /// Its name in /run/netns, if any.
    pub name: String,
    /// The lowest pid living there, and its command.
    pub pid: Option<u32>,
    /// That process's command name.
    pub comm: String,
    /// TIME_WAIT sockets.
    pub time_wait: u64,
    /// Orphaned FIN_WAIT2 sockets held as timewait sockets.
    pub fin_wait2: u64,
    /// `net.ipv4.tcp_max_tw_buckets`.
    pub tcp_max_tw_buckets: Option<i64>,
    /// `net.ipv4.ip_local_port_range`.
    pub ip_local_port_range: Option<[u16; 2]>,
    /// Ports in that range.
    pub ephemeral_ports: Option<u64>,
    /// Connections closed without TIME_WAIT because the table was full (TcpExtTCPTimeWaitOverflow).
    pub time_wait_overflows: Option<u64>,
    /// The endpoints with the most timewait sockets, most first.
    pub peers: Vec<PeerReport>,
    /// Plain-words warnings.
    pub warnings: Vec<String>,
}

/// One remote endpoint.
#[derive(Debug, Serialize)]
pub struct PeerReport {
    /// Remote address.
    pub raddr: String,
    /// Remote port.
    pub rport: u16,
    /// Timewait sockets towards it.
    pub sockets: u64,
    /// Of those, the ones holding an ephemeral local port.
    pub ephemeral: u64,
    /// `ephemeral` as a share of the namespace's ephemeral ports (0 to 1).
    pub share: Option<f64>,
}

/// Runs the command.
pub fn main(args: &TimewaitArgs) -> ExitCode {
    match collect(args.top) {
        Ok(report) => {
            let text = if args.json {
                match serde_json::to_string(&report) {
                    Ok(t) => t + "\n",
                    Err(e) => {
                        eprintln!("sockscope timewait: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                render(&report)
            };
            // A closed pipe (`| head`) ends the command quietly.
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sockscope timewait: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads every namespace the command can enter.
pub fn collect(top: usize) -> anyhow::Result<Report> {
    let discovery = Discovery::new()?;
    let namespaces = discovery.discover();
    let own = discovery.own_inode();
    let mut out = Vec::new();
    let mut own_error = None;
    discovery.visit(&namespaces, |ns, entered| {
        if !entered {
            return;
        }
        let mut buffer = Vec::new();
        let tw = match NsTimeWait::read(&mut buffer, |_| false) {
            Ok(tw) => tw,
            Err(e) => {
                // Another namespace may vanish mid-read: it is left out.
                if ns.info.inode == own {
                    own_error = Some(e);
                }
                return;
            }
        };
        let mut text = String::new();
        let counters = netstat::read_counters(&mut text).ok();
        let sysctls = netstat::read_sysctls(&mut text).ok();
        let overflows =
            counters.and_then(|c| value(netstat::COUNTERS, &c, "TcpExtTCPTimeWaitOverflow"));
        let max_buckets = sysctls.and_then(|s| {
            netstat::SYSCTLS
                .iter()
                .position(|(n, ..)| *n == "tcp_max_tw_buckets")
                .and_then(|i| s[i])
        });
        if ns.info.inode != own && tw.total() == 0 && overflows.unwrap_or(0) == 0 {
            return;
        }
        out.push(ns_report(ns.info.clone(), &tw, max_buckets, overflows, top));
    })?;
    if let Some(e) = own_error {
        return Err(anyhow::anyhow!("listing timewait sockets: {e}"));
    }
    Ok(Report { namespaces: out })
}

fn value(
    counters: &[(&str, &str, &str)],
    values: &netstat::CounterValues,
    nstat: &str,
) -> Option<u64> {
    counters
        .iter()
        .position(|(_, n, _)| *n == nstat)
        .and_then(|i| values[i])
}

/// The report of one namespace, with its warnings.
pub fn ns_report(
    info: crate::netns::NetnsInfo,
    tw: &NsTimeWait,
    tcp_max_tw_buckets: Option<i64>,
    time_wait_overflows: Option<u64>,
    top: usize,
) -> NsReport {
    let ports = tw.ephemeral_ports();
    let mut warnings = Vec::new();
    let peers: Vec<PeerReport> = tw
        .top_peers(top)
        .into_iter()
        .map(|((addr, port), c)| {
            let share = ports.map(|p| c.ephemeral as f64 / p as f64);
            if let (Some(share), Some(p)) = (share, ports)
                && share >= WARN_SHARE
            {
                warnings.push(format!(
                    "{}: {} of the {} ephemeral ports are in TIME_WAIT towards this endpoint ({:.0}%); \
                     when none is left, connect() to it fails with EADDRNOTAVAIL. Reuse connections, \
                     widen net.ipv4.ip_local_port_range, or let the other side close first.",
                    endpoint(&addr, port),
                    c.ephemeral,
                    p,
                    share * 100.0
                ));
            }
            PeerReport {
                raddr: addr.to_string(),
                rport: port,
                sockets: c.sockets,
                ephemeral: c.ephemeral,
                share,
            }
        })
        .collect();
    let total = tw.total();
    if let Some(max) = tcp_max_tw_buckets.filter(|m| *m > 0)
        && total as f64 >= TABLE_WARN_SHARE * max as f64
    {
        warnings.push(format!(
            "the TIME_WAIT table holds {total} of at most {max} sockets (net.ipv4.tcp_max_tw_buckets): \
             beyond it, closing connections skip TIME_WAIT."
        ));
    }
    if let Some(n) = time_wait_overflows.filter(|n| *n > 0) {
        warnings.push(format!(
            "{n} connections were closed without TIME_WAIT since boot because the table was full \
             (tcp_max_tw_buckets); late segments of those connections can reach new ones."
        ));
    }
    NsReport {
        netns: info.inode,
        name: info.name,
        pid: info.pid,
        comm: info.comm,
        time_wait: tw.count(TwState::TimeWait),
        fin_wait2: tw.count(TwState::FinWait2),
        tcp_max_tw_buckets,
        ip_local_port_range: tw.range.map(|(l, h)| [l, h]),
        ephemeral_ports: ports,
        time_wait_overflows,
        peers,
        warnings,
    }
}

fn endpoint(addr: &std::net::IpAddr, port: u16) -> String {
    match addr {
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
    }
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The report as a terminal table.
pub fn render(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for (i, ns) in report.namespaces.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        let mut who = Vec::new();
        if !ns.name.is_empty() {
            who.push(ns.name.clone());
        }
        if let Some(pid) = ns.pid {
            who.push(format!("pid {pid} {}", ns.comm));
        }
        let _ = writeln!(
            s,
            "netns {}{}",
            ns.netns,
            if who.is_empty() {
                String::new()
            } else {
                format!(" ({})", who.join(", "))
            }
        );
        let range = ns
            .ip_local_port_range
            .map_or_else(|| "-".into(), |[l, h]| format!("{l}-{h}"));
        let _ = writeln!(
            s,
            "  TIME_WAIT {}  FIN_WAIT2 (timewait) {}  tcp_max_tw_buckets {}  overflows {}  ephemeral ports {} ({})",
            ns.time_wait,
            ns.fin_wait2,
            or_dash(ns.tcp_max_tw_buckets),
            or_dash(ns.time_wait_overflows),
            range,
            or_dash(ns.ephemeral_ports),
        );
        if ns.peers.is_empty() {
            let _ = writeln!(s, "  no timewait sockets");
        } else {
            let _ = writeln!(
                s,
                "  {:<46} {:>9} {:>10} {:>8}",
                "PEER", "TIMEWAIT", "EPHEMERAL", "OF PORTS"
            );
            for p in &ns.peers {
                let addr: std::net::IpAddr =
                    p.raddr.parse().unwrap_or(std::net::IpAddr::from([0u8; 4]));
                let _ = writeln!(
                    s,
                    "  {:<46} {:>9} {:>10} {:>8}",
                    endpoint(&addr, p.rport),
                    p.sockets,
                    p.ephemeral,
                    p.share
                        .map_or_else(|| "-".into(), |x| format!("{:.1}%", x * 100.0)),
                );
            }
        }
        for w in &ns.warnings {
            let _ = writeln!(s, "  ! {w}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::timewait::{PeerCount, PortLabel};

    fn ns(peer_ephemeral: u64) -> NsTimeWait {
        let mut tw = NsTimeWait {
            range: Some((50000, 50999)),
            ..NsTimeWait::default()
        };
        tw.by_port.insert(
            (TwState::TimeWait, PortLabel::Ephemeral),
            peer_ephemeral + 3,
        );
        tw.peers.insert(
            (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 80),
            PeerCount {
                sockets: peer_ephemeral,
                ephemeral: peer_ephemeral,
            },
        );
        tw.peers.insert(
            (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 6)), 443),
            PeerCount {
                sockets: 3,
                ephemeral: 3,
            },
        );
        tw
    }

    #[test]
    fn warns_when_a_peer_holds_half_the_ports_and_not_before() {
        let info = crate::netns::NetnsInfo::default();
        let calm = ns_report(info.clone(), &ns(499), Some(262144), Some(0), 10);
        assert!(calm.warnings.is_empty(), "{:?}", calm.warnings);
        let hot = ns_report(info, &ns(900), Some(1000), Some(7), 10);
        assert_eq!(hot.warnings.len(), 3, "{:?}", hot.warnings);
        assert!(hot.warnings[0].starts_with("10.0.0.5:80: 900 of the 1000 ephemeral ports"));
        assert!(hot.warnings[1].contains("903 of at most 1000"));
        assert!(hot.warnings[2].starts_with("7 connections"));
        assert_eq!(hot.peers[0].share, Some(0.9));
        let text = render(&Report {
            namespaces: vec![hot],
        });
        assert!(text.contains("10.0.0.5:80"), "{text}");
        assert!(text.contains("90.0%"), "{text}");
    }
}
