//! The kernel's own counters and settings (`sockscope_netstat_*`, `sockscope_sysctl_*`), read
//! from /proc without BPF, so a user can check every eBPF figure against them on one page.
//!
//! They are read in the agent's own network namespace and in every namespace that has a TCP
//! listener, during the one pass over the namespaces that also reads the listeners
//! ([`super::listen::Scan`]): one `setns` per namespace per scrape for everything. The files
//! answer for the reading *thread's* namespace: `/proc/thread-self/net/{snmp,netstat}` (never
//! /proc/net or /proc/self/net, which follow the main thread) and `/proc/sys/net/*`.

use std::{fs::File, io::Read as _, sync::Arc};

use prometheus::proto::MetricFamily;

use super::{
    SelfMetrics, Source,
    family::{Family, FamilySpec, Kind},
    listen::{Consumer, Scan, Snapshot},
};
use crate::kernel::KernelError;

/// `(metric suffix, nstat name, help)`.
pub const COUNTERS: &[(&str, &str, &str)] = &[
    (
        "listen_overflows_total",
        "TcpExtListenOverflows",
        "Accept queue full (TcpExt ListenOverflows).",
    ),
    (
        "listen_drops_total",
        "TcpExtListenDrops",
        "Drops charged to listeners, any reason (TcpExt ListenDrops).",
    ),
    (
        "syn_queue_full_drops_total",
        "TcpExtTCPReqQFullDrop",
        "SYNs dropped because the SYN queue was full and cookies were off (TcpExt TCPReqQFullDrop).",
    ),
    (
        "syn_queue_full_cookies_total",
        "TcpExtTCPReqQFullDoCookies",
        "SYNs answered with a cookie because the SYN queue was full or tcp_syncookies=2 (TcpExt TCPReqQFullDoCookies).",
    ),
    (
        "syncookies_sent_total",
        "TcpExtSyncookiesSent",
        "SYN cookies sent (TcpExt SyncookiesSent).",
    ),
    (
        "syncookies_recv_total",
        "TcpExtSyncookiesRecv",
        "Valid SYN cookies received (TcpExt SyncookiesRecv).",
    ),
    (
        "syncookies_failed_total",
        "TcpExtSyncookiesFailed",
        "Invalid SYN cookies received (TcpExt SyncookiesFailed).",
    ),
    (
        "resets_sent_total",
        "TcpOutRsts",
        "TCP RSTs sent (Tcp OutRsts).",
    ),
    (
        "established_resets_total",
        "TcpEstabResets",
        "Connections reset from ESTABLISHED or CLOSE_WAIT (Tcp EstabResets).",
    ),
    (
        "time_wait_overflows_total",
        "TcpExtTCPTimeWaitOverflow",
        "Sockets closed without TIME_WAIT because tcp_max_tw_buckets was reached (TcpExt TCPTimeWaitOverflow).",
    ),
    (
        "time_wait_recycled_total",
        "TcpExtTWRecycled",
        "TIME_WAIT sockets recycled (TcpExt TWRecycled).",
    ),
    (
        "time_wait_killed_total",
        "TcpExtTWKilled",
        "TIME_WAIT sockets killed (TcpExt TWKilled).",
    ),
];

/// `(metric suffix, sysctl, index of the value, help)`.
pub const SYSCTLS: &[(&str, &str, usize, &str)] = &[
    (
        "somaxconn",
        "net.core.somaxconn",
        0,
        "Upper limit of a listen() backlog (net.core.somaxconn).",
    ),
    (
        "tcp_max_syn_backlog",
        "net.ipv4.tcp_max_syn_backlog",
        0,
        "net.ipv4.tcp_max_syn_backlog.",
    ),
    (
        "tcp_syncookies",
        "net.ipv4.tcp_syncookies",
        0,
        "net.ipv4.tcp_syncookies: 0 off, 1 when the SYN queue is full, 2 always.",
    ),
    (
        "tcp_abort_on_overflow",
        "net.ipv4.tcp_abort_on_overflow",
        0,
        "net.ipv4.tcp_abort_on_overflow: 1 sends RST when the accept queue is full.",
    ),
    (
        "tcp_max_tw_buckets",
        "net.ipv4.tcp_max_tw_buckets",
        0,
        "net.ipv4.tcp_max_tw_buckets.",
    ),
    (
        "ip_local_port_range_low",
        "net.ipv4.ip_local_port_range",
        0,
        "Lowest ephemeral port (net.ipv4.ip_local_port_range).",
    ),
    (
        "ip_local_port_range_high",
        "net.ipv4.ip_local_port_range",
        1,
        "Highest ephemeral port (net.ipv4.ip_local_port_range).",
    ),
];

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn specs(
    prefix: &str,
    kind: Kind,
    items: impl Iterator<Item = (&'static str, &'static str)>,
) -> Vec<FamilySpec> {
    items
        .map(|(suffix, help)| FamilySpec {
            // Built once at start-up: the names live as long as the agent.
            name: leak(format!("{prefix}{suffix}")),
            help,
            kind,
            labels: &["netns"],
        })
        .collect()
}

/// The [`COUNTERS`] of one namespace, in that order; `None` for one this kernel does not keep.
pub type CounterValues = [Option<u64>; COUNTERS.len()];

/// The [`SYSCTLS`] of one namespace, in that order.
pub type SysctlValues = [Option<i64>; SYSCTLS.len()];

/// Reads [`COUNTERS`] for the calling thread's namespace; `text` is a buffer kept between calls.
pub fn read_counters(text: &mut String) -> Result<CounterValues, KernelError> {
    let mut values = [None; COUNTERS.len()];
    for file in [
        "/proc/thread-self/net/snmp",
        "/proc/thread-self/net/netstat",
    ] {
        read_into(file, text)?;
        extract_counters(text, &mut values);
    }
    Ok(values)
}

/// Picks [`COUNTERS`] out of the header-line/value-line pairs of /proc/net/snmp or netstat,
/// without building a map of the several hundred others.
pub fn extract_counters(text: &str, values: &mut CounterValues) {
    let mut lines = text.lines();
    while let (Some(header), Some(numbers)) = (lines.next(), lines.next()) {
        let (Some((prefix, names)), Some((_, numbers))) =
            (header.split_once(':'), numbers.split_once(':'))
        else {
            continue;
        };
        for (name, number) in names.split_whitespace().zip(numbers.split_whitespace()) {
            let wanted = COUNTERS.iter().position(|(_, nstat, _)| {
                nstat.len() == prefix.len() + name.len()
                    && nstat.starts_with(prefix)
                    && nstat.ends_with(name)
            });
            // Tcp MaxConn is -1; nothing we export is signed.
            if let (Some(i), Ok(v)) = (wanted, number.parse::<u64>()) {
                values[i] = Some(v);
            }
        }
    }
}

/// Reads [`SYSCTLS`] for the calling thread's namespace.
pub fn read_sysctls(text: &mut String) -> Result<SysctlValues, KernelError> {
    let mut values = [None; SYSCTLS.len()];
    let mut path = String::with_capacity(64);
    let mut last_key = "";
    for (i, (_, key, index, _)) in SYSCTLS.iter().enumerate() {
        // ip_local_port_range gives two metrics: read it once.
        if *key != last_key {
            path.clear();
            path.push_str("/proc/sys/");
            path.extend(key.chars().map(|c| if c == '.' { '/' } else { c }));
            read_into(&path, text)?;
            last_key = *key;
        }
        values[i] = text
            .split_whitespace()
            .nth(*index)
            .and_then(|v| v.parse().ok());
    }
    Ok(values)
}

fn read_into(path: &str, text: &mut String) -> Result<(), KernelError> {
    text.clear();
    File::open(path)
        .and_then(|mut f| f.read_to_string(text))
        .map(drop)
        .map_err(|source| KernelError::Read {
            path: path.to_owned(),
            source,
        })
}

/// Emits one family per spec, one series per namespace that has its values. A failure in the
/// agent's own namespace fails the collector (as it always did); a failure in another
/// namespace (it vanished mid-scrape) only leaves that namespace out.
fn emit<T: Copy, const N: usize>(
    specs: &[FamilySpec],
    snapshot: &Snapshot,
    values_of: impl Fn(&super::listen::NsSnapshot) -> Option<&Result<[Option<T>; N], KernelError>>,
    as_f64: impl Fn(T) -> f64,
) -> anyhow::Result<Vec<MetricFamily>> {
    let mut families: Vec<Family> = specs
        .iter()
        .map(|s| Family::with_capacity(*s, snapshot.namespaces.len()))
        .collect();
    for ns in &snapshot.namespaces {
        let values = match values_of(ns) {
            None => continue,
            Some(Ok(values)) => values,
            Some(Err(e)) if ns.info.inode == snapshot.own => return Err(anyhow::anyhow!("{e}")),
            Some(Err(e)) => {
                tracing::debug!(netns = ns.info.inode, "{e}; namespace left out");
                continue;
            }
        };
        let netns = ns.info.inode.to_string();
        for (family, value) in families.iter_mut().zip(values) {
            // A counter this kernel does not keep is left out, not reported as 0.
            if let Some(v) = value {
                family.add(&[&netns], as_f64(*v));
            }
        }
    }
    Ok(families.into_iter().filter_map(Family::finish).collect())
}

/// `sockscope_netstat_*` for the agent's namespace and every namespace with a listener.
pub struct Netstat {
    specs: Vec<FamilySpec>,
    scan: Arc<Scan>,
}

impl Netstat {
    /// Reads the counters gathered by `scan`.
    pub fn new(scan: Arc<Scan>) -> Self {
        Self {
            specs: specs(
                "sockscope_netstat_",
                Kind::Counter,
                COUNTERS.iter().map(|(s, _, h)| (*s, *h)),
            ),
            scan,
        }
    }
}

impl Source for Netstat {
    fn name(&self) -> &'static str {
        "netstat"
    }

    fn specs(&self) -> Vec<FamilySpec> {
        self.specs.clone()
    }

    fn collect(&self, _: &SelfMetrics) -> anyhow::Result<Vec<MetricFamily>> {
        let snapshot = self.scan.snapshot(Consumer::Netstat)?;
        emit(
            &self.specs,
            &snapshot,
            |ns| ns.netstat.as_ref(),
            |v| v as f64,
        )
    }
}

/// `sockscope_sysctl_*` for the agent's namespace and every namespace with a listener.
pub struct Sysctl {
    specs: Vec<FamilySpec>,
    scan: Arc<Scan>,
}

impl Sysctl {
    /// Reads the settings gathered by `scan`.
    pub fn new(scan: Arc<Scan>) -> Self {
        Self {
            specs: specs(
                "sockscope_sysctl_",
                Kind::Gauge,
                SYSCTLS.iter().map(|(s, _, _, h)| (*s, *h)),
            ),
            scan,
        }
    }
}

impl Source for Sysctl {
    fn name(&self) -> &'static str {
        "sysctl"
    }

    fn specs(&self) -> Vec<FamilySpec> {
        self.specs.clone()
    }

    fn collect(&self, _: &SelfMetrics) -> anyhow::Result<Vec<MetricFamily>> {
        let snapshot = self.scan.snapshot(Consumer::Sysctl)?;
        emit(
            &self.specs,
            &snapshot,
            |ns| ns.sysctl.as_ref(),
            |v| v as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_wanted_counters_only() {
        let mut v = [None; COUNTERS.len()];
        extract_counters(
            "Tcp: RtoAlgorithm MaxConn OutRsts EstabResets\nTcp: 1 -1 7 2\n",
            &mut v,
        );
        extract_counters(
            "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 3 180 285\n\
             IpExt: InNoRoutes\nIpExt: 0\n",
            &mut v,
        );
        let get = |nstat: &str| {
            COUNTERS
                .iter()
                .position(|(_, n, _)| *n == nstat)
                .and_then(|i| v[i])
        };
        assert_eq!(get("TcpOutRsts"), Some(7));
        assert_eq!(get("TcpEstabResets"), Some(2));
        assert_eq!(get("TcpExtListenOverflows"), Some(180));
        assert_eq!(get("TcpExtListenDrops"), Some(285));
        assert_eq!(get("TcpExtSyncookiesSent"), Some(3));
        assert_eq!(get("TcpExtTWKilled"), None, "absent, not 0");
    }

    #[test]
    fn reads_the_own_namespace() -> anyhow::Result<()> {
        let mut text = String::new();
        let counters = read_counters(&mut text)?;
        assert!(counters.iter().filter(|v| v.is_some()).count() >= 10);
        let sysctls = read_sysctls(&mut text)?;
        assert!(sysctls.iter().all(Option::is_some), "{sysctls:?}");
        Ok(())
    }
}
