//! The kernel's own counters and settings (`sockscope_netstat_*`, `sockscope_sysctl_*`), read
//! from /proc without BPF, so a user can check every eBPF figure against them on one page.

use std::path::PathBuf;

use prometheus::proto::MetricFamily;

use super::{
    SelfMetrics, Source,
    family::{FamilySpec, Kind},
};
use crate::kernel::procfs;

/// `(metric suffix, nstat name, help)`.
const COUNTERS: &[(&str, &str, &str)] = &[
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
const SYSCTLS: &[(&str, &str, usize, &str)] = &[
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

/// `sockscope_netstat_*` for the agent's own network namespace.
pub struct Netstat {
    specs: Vec<FamilySpec>,
    netns: u64,
    net_dir: PathBuf,
}

impl Netstat {
    /// Reads the counters of the namespace `netns`, whose /proc/net is `net_dir`.
    pub fn new(netns: u64, net_dir: PathBuf) -> Self {
        Self {
            specs: specs(
                "sockscope_netstat_",
                Kind::Counter,
                COUNTERS.iter().map(|(s, _, h)| (*s, *h)),
            ),
            netns,
            net_dir,
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
        let counters = procfs::read_counters(&self.net_dir)?;
        let netns = self.netns.to_string();
        Ok(self
            .specs
            .iter()
            .zip(COUNTERS)
            .filter_map(|(spec, (_, nstat, _))| {
                // A counter this kernel does not keep is left out, not reported as 0.
                let value = counters.get(*nstat)?;
                let mut family = spec.family();
                family.add(&[&netns], *value as f64);
                family.finish()
            })
            .collect())
    }
}

/// `sockscope_sysctl_*` for the agent's own network namespace.
pub struct Sysctl {
    specs: Vec<FamilySpec>,
    netns: u64,
}

impl Sysctl {
    /// Reads the settings of the calling thread's namespace, labelled `netns`.
    pub fn new(netns: u64) -> Self {
        Self {
            specs: specs(
                "sockscope_sysctl_",
                Kind::Gauge,
                SYSCTLS.iter().map(|(s, _, _, h)| (*s, *h)),
            ),
            netns,
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
        let netns = self.netns.to_string();
        let mut out = Vec::new();
        for (spec, (_, key, index, _)) in self.specs.iter().zip(SYSCTLS) {
            let values = procfs::read_sysctl(key)?;
            if let Some(value) = values.get(*index) {
                let mut family = spec.family();
                family.add(&[&netns], *value as f64);
                out.extend(family.finish());
            }
        }
        Ok(out)
    }
}
