//! The timewait sockets of one network namespace, counted from a sock_diag dump (what `ss`
//! uses; no /proc text): per kind and local-port label, and per remote endpoint.
//!
//! sock_diag reports a timewait socket with its *substate* as the state (TIME_WAIT, or
//! FIN_WAIT2 for an orphan parked in the timewait table) and with `idiag_timer` 3, which no
//! full socket has: a dump asking for TIME_WAIT and FIN_WAIT2 keeps the messages with timer
//! 3, and full FIN_WAIT2 sockets are left out. The kernel sends nothing else for a timewait
//! socket (no attributes), so a dump of 100,000 of them is about 9 MB of 88-byte messages,
//! read through one reused 64 KiB buffer and counted without allocating per socket. A
//! namespace whose `/proc/net/sockstat` shows no timewait socket is not dumped at all.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use netlink_packet_sock_diag::inet::{ExtensionFlags, StateFlags};

use crate::listeners::{FAMILIES, SockDiagError, sockdiag, tolerate_missing_ipv6};

/// `idiag_timer` of a timewait socket.
pub const TIMEWAIT_TIMER: u8 = 3;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;

/// The two kinds of timewait socket (`state` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TwState {
    /// TIME_WAIT proper: what `ss -tan state time-wait` lists.
    TimeWait,
    /// An orphaned FIN_WAIT2 socket the kernel keeps as a timewait socket.
    FinWait2,
}

impl TwState {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::TimeWait => "time_wait",
            Self::FinWait2 => "fin_wait2",
        }
    }
}

/// The `port` label of a local port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortLabel {
    /// A listener port of the namespace, or a watched port.
    Port(u16),
    /// Inside the namespace's `ip_local_port_range`.
    Ephemeral,
    /// Anything else.
    Other,
}

impl PortLabel {
    /// Decides the label of `port`: `labelled` says whether it is a listener or watched port.
    pub fn of(port: u16, range: Option<(u16, u16)>, labelled: impl Fn(u16) -> bool) -> Self {
        if labelled(port) {
            Self::Port(port)
        } else if range.is_some_and(|(low, high)| (low..=high).contains(&port)) {
            Self::Ephemeral
        } else {
            Self::Other
        }
    }

    /// The label value.
    pub fn label(self) -> String {
        match self {
            Self::Port(p) => p.to_string(),
            Self::Ephemeral => "ephemeral".into(),
            Self::Other => "other".into(),
        }
    }
}

/// A remote endpoint: address and port.
pub type Peer = (IpAddr, u16);

/// Timewait sockets towards one remote endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCount {
    /// All of them (both kinds).
    pub sockets: u64,
    /// Those whose local port is ephemeral: each holds one of the ports `connect()` can
    /// use towards this endpoint.
    pub ephemeral: u64,
}

/// The timewait sockets of one namespace at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NsTimeWait {
    /// `ip_local_port_range` (low, high), when it could be read.
    pub range: Option<(u16, u16)>,
    /// Sockets per kind and local-port label.
    pub by_port: BTreeMap<(TwState, PortLabel), u64>,
    /// Sockets (both kinds) per remote endpoint.
    pub peers: HashMap<Peer, PeerCount>,
}

impl NsTimeWait {
    /// Reads the calling thread's namespace now. `labelled` says which local ports keep their
    /// number; `receive` is a buffer kept between dumps.
    pub fn read(
        receive: &mut Vec<u8>,
        labelled: impl Fn(u16) -> bool,
    ) -> Result<Self, SockDiagError> {
        let range = read_port_range();
        let mut out = Self {
            range,
            ..Self::default()
        };
        // Each dump walks the whole established hash, which namespaces share unless they
        // have their own (tcp_child_ehash_entries): a namespace whose sockstat says it holds
        // no timewait socket is not dumped at all.
        if sockstat_tw() == Some(0) {
            return Ok(out);
        }
        for family in FAMILIES {
            let result = sockdiag::dump_sockets(
                family,
                StateFlags::TIME_WAIT | StateFlags::FIN_WAIT2,
                ExtensionFlags::empty(),
                receive,
                |s| {
                    if s.timer != TIMEWAIT_TIMER {
                        return;
                    }
                    let state = match s.state {
                        TCP_TIME_WAIT => TwState::TimeWait,
                        TCP_FIN_WAIT2 => TwState::FinWait2,
                        _ => return,
                    };
                    let label = PortLabel::of(s.sport, range, &labelled);
                    *out.by_port.entry((state, label)).or_insert(0) += 1;
                    let peer = out.peers.entry((s.dst, s.dport)).or_default();
                    peer.sockets += 1;
                    if label == PortLabel::Ephemeral {
                        peer.ephemeral += 1;
                    }
                },
            );
            tolerate_missing_ipv6(family, result)?;
        }
        Ok(out)
    }

    /// Sockets of one kind.
    pub fn count(&self, state: TwState) -> u64 {
        self.by_port
            .iter()
            .filter(|((s, _), _)| *s == state)
            .map(|(_, n)| n)
            .sum()
    }

    /// All timewait sockets (`/proc/net/sockstat` `tw`).
    pub fn total(&self) -> u64 {
        self.by_port.values().sum()
    }

    /// Ephemeral ports the namespace hands out (`high - low + 1`).
    pub fn ephemeral_ports(&self) -> Option<u64> {
        self.range
            .map(|(low, high)| u64::from(high.saturating_sub(low)) + 1)
    }

    /// The `n` remote endpoints with the most timewait sockets, most first; ties in address
    /// and port order, so the choice is stable.
    pub fn top_peers(&self, n: usize) -> Vec<(Peer, PeerCount)> {
        let mut all: Vec<(Peer, PeerCount)> = self.peers.iter().map(|(p, c)| (*p, *c)).collect();
        let order = |a: &(Peer, PeerCount), b: &(Peer, PeerCount)| {
            b.1.sockets.cmp(&a.1.sockets).then(a.0.cmp(&b.0))
        };
        if all.len() > n && n > 0 {
            all.select_nth_unstable_by(n - 1, order);
        }
        all.truncate(n);
        all.sort_unstable_by(order);
        all
    }
}

/// `tw` of `/proc/net/sockstat` for the calling thread's namespace: its timewait sockets.
pub fn sockstat_tw() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/sockstat").ok()?;
    parse_sockstat_tw(&text)
}

/// Picks `tw` out of the `TCP:` line of /proc/net/sockstat.
pub fn parse_sockstat_tw(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "tw" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// `net.ipv4.ip_local_port_range` of the calling thread's namespace (/proc/sys follows the
/// thread's namespace).
pub fn read_port_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    parse_port_range(&text)
}

/// Parses `"32768\t60999\n"`.
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Some((low, high)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn labels_follow_listeners_then_the_range() {
        let range = Some((32768, 60999));
        let listening = |p: u16| p == 8080;
        assert_eq!(PortLabel::of(8080, range, listening), PortLabel::Port(8080));
        assert_eq!(PortLabel::of(40000, range, listening), PortLabel::Ephemeral);
        assert_eq!(PortLabel::of(32768, range, listening), PortLabel::Ephemeral);
        assert_eq!(PortLabel::of(60999, range, listening), PortLabel::Ephemeral);
        assert_eq!(PortLabel::of(61000, range, listening), PortLabel::Other);
        assert_eq!(PortLabel::of(40000, None, listening), PortLabel::Other);
        assert_eq!(PortLabel::Ephemeral.label(), "ephemeral");
    }

    #[test]
    fn picks_tw_from_sockstat() {
        let text =
            "sockets: used 7\nTCP: inuse 3 orphan 0 tw 162 alloc 9 mem 1\nUDP: inuse 0 mem 0\n";
        assert_eq!(parse_sockstat_tw(text), Some(162));
        assert_eq!(parse_sockstat_tw("UDP: inuse 0\n"), None);
        assert!(sockstat_tw().is_some());
    }

    #[test]
    fn parses_the_range_and_rejects_nonsense() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 1024"), Some((1024, 1024)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("x"), None);
    }

    #[test]
    fn top_peers_are_the_largest_in_a_stable_order() {
        let mut ns = NsTimeWait::default();
        let ip = |d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d));
        for (d, n) in [(1, 5), (2, 9), (3, 5), (4, 1), (5, 7)] {
            ns.peers.insert(
                (ip(d), 80),
                PeerCount {
                    sockets: n,
                    ephemeral: n,
                },
            );
        }
        let top: Vec<(Peer, u64)> = ns
            .top_peers(3)
            .into_iter()
            .map(|(p, c)| (p, c.sockets))
            .collect();
        assert_eq!(
            top,
            vec![((ip(2), 80), 9), ((ip(5), 80), 7), ((ip(1), 80), 5)]
        );
        assert_eq!(ns.top_peers(10).len(), 5);
        assert!(ns.top_peers(0).is_empty());
    }

    #[test]
    fn sees_a_time_wait_socket_of_its_own() -> Result<(), Box<dyn std::error::Error>> {
        use std::io::Read as _;
        // Needs a namespace of its own to be exact; here: at least ours is listed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let server = listener.local_addr()?;
        let client = std::net::TcpStream::connect(server)?;
        let local = client.local_addr()?;
        let (mut accepted, _) = listener.accept()?;
        drop(client);
        let mut rest = Vec::new();
        accepted.read_to_end(&mut rest)?;
        drop(accepted);
        let mut buffer = Vec::new();
        let ns = NsTimeWait::read(&mut buffer, |p| p == server.port())?;
        assert!(ns.count(TwState::TimeWait) >= 1);
        assert!(
            ns.peers
                .get(&(server.ip(), server.port()))
                .is_some_and(|n| n.sockets >= 1)
        );
        let label = PortLabel::of(local.port(), ns.range, |p| p == server.port());
        assert!(ns.by_port.contains_key(&(TwState::TimeWait, label)));
        Ok(())
    }
}
