//! The kernel's own counters and settings of a network namespace: /proc/net/{snmp,netstat}
//! and /proc/sys/net.

use std::{collections::HashMap, fs, path::Path};

use super::KernelError;

/// Counters of one namespace, by nstat's names (`TcpOutRsts`, `TcpExtListenOverflows`).
pub type NetCounters = HashMap<String, u64>;

/// Reads `snmp` and `netstat` in `net_dir` (`/proc/thread-self/net` for the calling thread's
/// namespace; never `/proc/net`, which follows the process's main thread).
pub fn read_counters(net_dir: &Path) -> Result<NetCounters, KernelError> {
    let mut counters = NetCounters::new();
    for file in ["snmp", "netstat"] {
        let path = net_dir.join(file);
        let text = fs::read_to_string(&path).map_err(|source| KernelError::Read {
            path: path.display().to_string(),
            source,
        })?;
        parse_counters(&text, &mut counters);
    }
    Ok(counters)
}

/// Parses the header-line/value-line pairs of /proc/net/snmp and /proc/net/netstat.
pub fn parse_counters(text: &str, into: &mut NetCounters) {
    let mut lines = text.lines();
    while let (Some(header), Some(values)) = (lines.next(), lines.next()) {
        let (Some((prefix, names)), Some((_, values))) =
            (header.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            // Tcp MaxConn is -1; nothing we export is signed.
            if let Ok(v) = value.parse::<u64>() {
                into.insert(format!("{prefix}{name}"), v);
            }
        }
    }
}

/// Reads a sysctl of the calling thread's network namespace: `net.core.somaxconn` →
/// /proc/sys/net/core/somaxconn, values split on white space.
pub fn read_sysctl(key: &str) -> Result<Vec<i64>, KernelError> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    let text = fs::read_to_string(&path).map_err(|source| KernelError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(text
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snmp_and_netstat_pairs() {
        let mut c = NetCounters::new();
        parse_counters(
            "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm MaxConn OutRsts\nTcp: 1 -1 7\n",
            &mut c,
        );
        parse_counters(
            "TcpExt: SyncookiesSent ListenOverflows\nTcpExt: 3 180\n",
            &mut c,
        );
        assert_eq!(c.get("TcpOutRsts"), Some(&7));
        assert_eq!(c.get("TcpExtListenOverflows"), Some(&180));
        assert_eq!(c.get("IpDefaultTTL"), Some(&64));
        assert_eq!(c.get("TcpMaxConn"), None);
    }
}
