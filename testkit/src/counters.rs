//! The kernel's own counters: `/proc/thread-self/net/{snmp,netstat,snmp6,sockstat}`.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{Context, Result, anyhow, bail};

/// Per-netns MIB counters named as `nstat -az` names them (`TcpOutRsts`, `TcpExtListenDrops`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Counters {
    values: BTreeMap<String, u64>,
}

impl Counters {
    /// Reads the counters of the calling thread's namespace (use inside [`crate::Netns::run`]).
    pub fn read_current() -> Result<Counters> {
        let snmp = read_proc("snmp")?;
        let netstat = read_proc("netstat")?;
        let mut counters = Counters::parse(&snmp, &netstat)?;
        // Absent when IPv6 is not built in or disabled.
        if let Ok(snmp6) = std::fs::read_to_string("/proc/thread-self/net/snmp6") {
            counters.values.extend(parse_name_value(&snmp6)?);
        }
        Ok(counters)
    }

    /// Parses the text of `/proc/net/snmp` and `/proc/net/netstat` (header line, value line).
    pub fn parse(snmp: &str, netstat: &str) -> Result<Counters> {
        let mut values = parse_tables(snmp).context("parse snmp")?;
        values.extend(parse_tables(netstat).context("parse netstat")?);
        Ok(Counters { values })
    }

    /// The counter `name`, or an error naming it if the kernel has no such counter.
    pub fn get(&self, name: &str) -> Result<u64> {
        self.value(name).ok_or_else(|| {
            anyhow!(
                "no kernel counter named {name:?} ({} known; names look like TcpOutRsts, \
                 TcpExtListenOverflows)",
                self.values.len()
            )
        })
    }

    /// The counter `name`, if the kernel has it.
    pub fn value(&self, name: &str) -> Option<u64> {
        self.values.get(name).copied()
    }

    /// Per-counter increase since `earlier` (saturating: gauges such as `TcpCurrEstab` that went down give 0).
    pub fn delta(&self, earlier: &Counters) -> Counters {
        let values = self
            .values
            .iter()
            .map(|(name, &now)| {
                let before = earlier.values.get(name).copied().unwrap_or(0);
                (name.clone(), now.saturating_sub(before))
            })
            .collect();
        Counters { values }
    }

    /// All counters, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.values.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// The non-zero counters, by name (handy in assertion messages).
    pub fn non_zero(&self) -> BTreeMap<&str, u64> {
        self.iter().filter(|(_, v)| *v != 0).collect()
    }
}

impl fmt::Debug for Counters {
    /// Shows only the non-zero counters: several hundred zeros help nobody.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.non_zero()).finish()
    }
}

/// `/proc/net/sockstat` (and `sockstat6`) of one namespace.
///
/// `tcp_inuse` and `tcp_tw` are per namespace; `tcp_orphan`, `tcp_alloc` and `tcp_mem` are
/// kernel-wide, whatever namespace reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sockstat {
    /// IPv4 TCP sockets in use (`TCP: inuse`), listeners included.
    pub tcp_inuse: u64,
    /// Orphaned TCP sockets (`TCP: orphan`, kernel-wide).
    pub tcp_orphan: u64,
    /// TIME_WAIT sockets, IPv4 and IPv6 (`TCP: tw`).
    pub tcp_tw: u64,
    /// Allocated TCP sockets (`TCP: alloc`, kernel-wide).
    pub tcp_alloc: u64,
    /// TCP memory in pages (`TCP: mem`, kernel-wide).
    pub tcp_mem: u64,
    /// IPv6 TCP sockets in use (`TCP6: inuse` from sockstat6; 0 without IPv6).
    pub tcp6_inuse: u64,
    values: BTreeMap<(String, String), u64>,
}

impl Sockstat {
    /// Reads sockstat of the calling thread's namespace (use inside [`crate::Netns::run`]).
    pub fn read_current() -> Result<Sockstat> {
        let mut text = read_proc("sockstat")?;
        if let Ok(v6) = std::fs::read_to_string("/proc/thread-self/net/sockstat6") {
            text.push_str(&v6);
        }
        Sockstat::parse(&text)
    }

    /// Parses sockstat text (`TCP: inuse 5 orphan 0 tw 0 alloc 7 mem 1` lines).
    pub fn parse(text: &str) -> Result<Sockstat> {
        let mut values = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (section, rest) = line
                .split_once(':')
                .ok_or_else(|| anyhow!("sockstat line without ':': {line:?}"))?;
            let tokens: Vec<&str> = rest.split_whitespace().collect();
            if !tokens.len().is_multiple_of(2) {
                bail!("sockstat line with an odd number of fields: {line:?}");
            }
            for pair in tokens.chunks(2) {
                let value = pair[1]
                    .parse::<u64>()
                    .with_context(|| format!("sockstat value {:?} in {line:?}", pair[1]))?;
                values.insert((section.trim().to_owned(), pair[0].to_owned()), value);
            }
        }
        let field = |section: &str, name: &str| {
            values
                .get(&(section.to_owned(), name.to_owned()))
                .copied()
                .unwrap_or(0)
        };
        Ok(Sockstat {
            tcp_inuse: field("TCP", "inuse"),
            tcp_orphan: field("TCP", "orphan"),
            tcp_tw: field("TCP", "tw"),
            tcp_alloc: field("TCP", "alloc"),
            tcp_mem: field("TCP", "mem"),
            tcp6_inuse: field("TCP6", "inuse"),
            values,
        })
    }

    /// Any field, e.g. `get("UDP", "inuse")`.
    pub fn get(&self, section: &str, field: &str) -> Option<u64> {
        self.values
            .get(&(section.to_owned(), field.to_owned()))
            .copied()
    }
}

fn read_proc(name: &str) -> Result<String> {
    // Never /proc/self/net or /proc/net: those follow the thread-group leader's namespace.
    let path = format!("/proc/thread-self/net/{name}");
    std::fs::read_to_string(&path).with_context(|| format!("read {path}"))
}

/// Parses pairs of `Prefix: names...` / `Prefix: values...` lines into `PrefixName` entries.
fn parse_tables(text: &str) -> Result<BTreeMap<String, u64>> {
    let mut values = BTreeMap::new();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    while let Some(header) = lines.next() {
        let values_line = lines
            .next()
            .ok_or_else(|| anyhow!("header line without values: {header:?}"))?;
        let (prefix, names) = header
            .split_once(':')
            .ok_or_else(|| anyhow!("line without ':': {header:?}"))?;
        let (prefix2, nums) = values_line
            .split_once(':')
            .ok_or_else(|| anyhow!("line without ':': {values_line:?}"))?;
        if prefix != prefix2 {
            bail!("header {prefix:?} followed by values for {prefix2:?}");
        }
        let names: Vec<&str> = names.split_whitespace().collect();
        let nums: Vec<&str> = nums.split_whitespace().collect();
        if names.len() != nums.len() {
            bail!("{prefix}: {} names but {} values", names.len(), nums.len());
        }
        for (name, num) in names.into_iter().zip(nums) {
            values.insert(format!("{prefix}{name}"), parse_counter(num)?);
        }
    }
    Ok(values)
}

/// Parses `Ip6InReceives   123` lines (snmp6).
fn parse_name_value(text: &str) -> Result<BTreeMap<String, u64>> {
    let mut values = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.split_whitespace();
        match (it.next(), it.next(), it.next()) {
            (Some(name), Some(num), None) => {
                values.insert(name.to_owned(), parse_counter(num)?);
            }
            _ => bail!("expected `name value`: {line:?}"),
        }
    }
    Ok(values)
}

/// A counter value; negative ones (`TcpMaxConn -1`) wrap as `nstat` shows them.
fn parse_counter(text: &str) -> Result<u64> {
    text.parse::<u64>()
        .or_else(|_| text.parse::<i64>().map(|v| v as u64))
        .with_context(|| format!("counter value {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "\
Ip: Forwarding DefaultTTL InReceives InHdrErrors
Ip: 1 64 1234 0
Icmp: InMsgs InErrors
Icmp: 3 0
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 10 4 6 2 1 100 90 0 0 7 0
Udp: InDatagrams NoPorts
Udp: 5 1
";

    const NETSTAT: &str = "\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPReqQFullDoCookies TCPReqQFullDrop
TcpExt: 11 2 180 285 40 3
IpExt: InNoRoutes InOctets
IpExt: 0 98765
";

    #[test]
    fn parses_snmp_and_netstat_with_nstat_names() -> Result<()> {
        let c = Counters::parse(SNMP, NETSTAT)?;
        assert_eq!(c.get("TcpOutRsts")?, 7);
        assert_eq!(c.get("TcpEstabResets")?, 2);
        assert_eq!(c.get("TcpAttemptFails")?, 6);
        assert_eq!(c.get("TcpMaxConn")?, u64::MAX);
        assert_eq!(c.get("IpInReceives")?, 1234);
        assert_eq!(c.get("UdpNoPorts")?, 1);
        assert_eq!(c.get("TcpExtListenOverflows")?, 180);
        assert_eq!(c.get("TcpExtListenDrops")?, 285);
        assert_eq!(c.get("TcpExtTCPReqQFullDoCookies")?, 40);
        assert_eq!(c.get("TcpExtTCPReqQFullDrop")?, 3);
        assert_eq!(c.get("IpExtInOctets")?, 98765);
        let err = c.get("TcpOutRst").expect_err("unknown name");
        assert!(err.to_string().contains("TcpOutRst"), "{err}");
        assert_eq!(c.value("Nope"), None);
        Ok(())
    }

    #[test]
    fn delta_subtracts_and_saturates() -> Result<()> {
        let before = Counters::parse(SNMP, NETSTAT)?;
        let after = Counters::parse(
            &SNMP.replace("1 100 90 0 0 7 0", "0 100 90 0 0 9 0"),
            &NETSTAT.replace("11 2 180 285", "11 2 185 290"),
        )?;
        let d = after.delta(&before);
        assert_eq!(d.get("TcpOutRsts")?, 2);
        assert_eq!(d.get("TcpExtListenOverflows")?, 5);
        assert_eq!(d.get("TcpExtListenDrops")?, 5);
        assert_eq!(d.get("TcpCurrEstab")?, 0, "gauge went down");
        assert_eq!(d.get("TcpActiveOpens")?, 0);
        assert_eq!(format!("{d:?}").matches(':').count(), 3, "{d:?}");
        Ok(())
    }

    #[test]
    fn rejects_malformed_tables() {
        assert!(Counters::parse("Tcp: A B\nTcp: 1\n", "").is_err());
        assert!(Counters::parse("Tcp: A B\nUdp: 1 2\n", "").is_err());
        assert!(Counters::parse("Tcp: A B\n", "").is_err());
        assert!(Counters::parse("Tcp: A\nTcp: x\n", "").is_err());
    }

    #[test]
    fn parses_snmp6() -> Result<()> {
        let v = parse_name_value("Ip6InReceives                   	12\nIcmp6InMsgs 3\n")?;
        assert_eq!(v.get("Ip6InReceives"), Some(&12));
        assert_eq!(v.get("Icmp6InMsgs"), Some(&3));
        assert!(parse_name_value("Ip6InReceives 1 2\n").is_err());
        Ok(())
    }

    #[test]
    fn parses_sockstat() -> Result<()> {
        let text = "\
sockets: used 187
TCP: inuse 5 orphan 1 tw 300 alloc 9 mem 2
UDP: inuse 3 mem 4
UDPLITE: inuse 0
RAW: inuse 0
FRAG: inuse 0 memory 0
TCP6: inuse 2
UDP6: inuse 1
";
        let s = Sockstat::parse(text)?;
        assert_eq!(s.tcp_inuse, 5);
        assert_eq!(s.tcp_orphan, 1);
        assert_eq!(s.tcp_tw, 300);
        assert_eq!(s.tcp_alloc, 9);
        assert_eq!(s.tcp_mem, 2);
        assert_eq!(s.tcp6_inuse, 2);
        assert_eq!(s.get("UDP", "inuse"), Some(3));
        assert_eq!(s.get("sockets", "used"), Some(187));
        assert_eq!(s.get("FRAG", "memory"), Some(0));
        assert_eq!(s.get("TCP", "nope"), None);
        assert!(Sockstat::parse("TCP: inuse\n").is_err());
        assert!(Sockstat::parse("TCP: inuse x\n").is_err());
        Ok(())
    }
}
