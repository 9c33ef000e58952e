//! Listening sockets as the kernel reports them (sock_diag over netlink), one namespace at a
//! time: the calling thread's.

pub mod sockdiag;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_sock_diag::inet::{ExtensionFlags, StateFlags};
use sockdiag::DiagSocket;

pub use sockdiag::SockDiagError;

/// One listening TCP socket in the calling thread's network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    /// Local address as the kernel holds it.
    pub addr: IpAddr,
    /// Local port.
    pub port: u16,
    /// Accept queue length (`sk_ack_backlog`).
    pub accept_queue: u32,
    /// Accept queue limit (`sk_max_ack_backlog`).
    pub accept_queue_limit: u32,
    /// Socket inode (to find the owning process).
    pub inode: u32,
}

/// Lists the TCP listeners (IPv4 and IPv6) of the calling thread's network namespace.
pub fn listeners() -> Result<Vec<Listener>, SockDiagError> {
    let mut out = Vec::new();
    let mut receive = Vec::new();
    for family in FAMILIES {
        let result = sockdiag::dump_sockets(
            family,
            StateFlags::LISTEN,
            ExtensionFlags::empty(),
            &mut receive,
            |s| {
                out.push(Listener {
                    addr: s.src,
                    port: s.sport,
                    accept_queue: s.recv_queue,
                    accept_queue_limit: s.send_queue,
                    inode: s.inode,
                });
            },
        );
        tolerate_missing_ipv6(family, result)?;
    }
    Ok(out)
}

/// `AF_INET` and `AF_INET6`, in the order dumps go through them.
pub const FAMILIES: [u8; 2] = [libc::AF_INET as u8, libc::AF_INET6 as u8];

/// A kernel or namespace without IPv6 has no IPv6 sockets: not an error.
pub fn tolerate_missing_ipv6(
    family: u8,
    result: Result<(), SockDiagError>,
) -> Result<(), SockDiagError> {
    match result {
        Err(SockDiagError::Kernel(e))
            if family == libc::AF_INET6 as u8 && (e == libc::EAFNOSUPPORT || e == libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// One listening socket, with what the listen-backlog metrics need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenSocket {
    /// Local address as the kernel holds it (`0.0.0.0`, `::`, `127.0.0.1`).
    pub addr: IpAddr,
    /// Local port.
    pub port: u16,
    /// Accept queue length (`sk_ack_backlog`; `ss -lnt` Recv-Q).
    pub accept_queue: u32,
    /// Accept queue limit (`sk_max_ack_backlog`; `ss -lnt` Send-Q).
    pub accept_queue_limit: u32,
    /// Drops charged to the socket (`sk_drops`, the `d` of `ss -m`); `None` when the kernel
    /// sent no SK_MEMINFO.
    pub drops: Option<u32>,
    /// The kernel's socket cookie: unique per socket for the whole boot, unlike the inode.
    pub cookie: u64,
    /// Socket inode.
    pub inode: u32,
    /// IPV6_V6ONLY: an IPv6 wildcard listener without it also takes IPv4 connections.
    pub v6only: bool,
}

/// One `(addr, port)` of a namespace: every socket listening there (an SO_REUSEPORT group is
/// several), summed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenSeries {
    /// Local address.
    pub addr: IpAddr,
    /// Local port.
    pub port: u16,
    /// Sockets behind it.
    pub sockets: u32,
    /// Sum of their accept queue lengths.
    pub accept_queue: u64,
    /// Sum of their accept queue limits.
    pub accept_queue_limit: u64,
    /// Half-open requests (SYN_RECV) held for it.
    pub syn_queue: u64,
    /// Whether every socket is IPv6-only (meaningful for IPv6 wildcards).
    pub v6only: bool,
}

/// The listeners of one namespace. Kept between scrapes so that its vectors are reused.
#[derive(Debug, Default)]
pub struct NsListeners {
    /// Every listening socket, sorted by `(addr, port)`.
    pub sockets: Vec<ListenSocket>,
    /// One entry per `(addr, port)`, sorted by it.
    pub series: Vec<ListenSeries>,
}

/// Buffers reused from one dump to the next.
#[derive(Debug, Default)]
pub struct DumpBuffers {
    receive: Vec<u8>,
}

impl DumpBuffers {
    /// The receive buffer, for other dumps of the same pass.
    pub fn receive(&mut self) -> &mut Vec<u8> {
        &mut self.receive
    }
}

impl NsListeners {
    /// Replaces the content with the calling thread's namespace now: listening sockets of both
    /// families with their `sk_drops`, grouped into series; with `syn_queue`, also the SYN_RECV
    /// request sockets, attributed to their listener.
    pub fn read(
        &mut self,
        buffers: &mut DumpBuffers,
        syn_queue: bool,
    ) -> Result<(), SockDiagError> {
        self.sockets.clear();
        self.series.clear();
        for family in FAMILIES {
            let sockets = &mut self.sockets;
            let result = sockdiag::dump_sockets(
                family,
                StateFlags::LISTEN,
                // SK_MEMINFO carries sk_drops (the plain MEMINFO does not).
                ExtensionFlags::SKMEMINFO,
                &mut buffers.receive,
                |s| sockets.push(listen_socket(s)),
            );
            tolerate_missing_ipv6(family, result)?;
        }
        self.group();
        if !syn_queue {
            return Ok(());
        }
        for family in FAMILIES {
            // A SYN_RECV dump walks the host's whole established hash: skip it for a family
            // without listeners here (a v4-mapped request of a dual-stack listener is reported
            // in the listener's family, IPv6).
            if !self.series.iter().any(|s| family_of(s.addr) == family) {
                continue;
            }
            let series = &mut self.series;
            let result = sockdiag::dump_sockets(
                family,
                StateFlags::SYN_RECV,
                ExtensionFlags::empty(),
                &mut buffers.receive,
                |r| {
                    // inet_diag reports request sockets (TCP_NEW_SYN_RECV) as SYN_RECV; a TCP
                    // Fast Open child (a full socket still in SYN_RECV) counts here too.
                    if r.state == SYN_RECV
                        && let Some(s) = find_listener(series, r.src, r.sport)
                    {
                        s.syn_queue += 1;
                    }
                },
            );
            tolerate_missing_ipv6(family, result)?;
        }
        Ok(())
    }

    /// Listeners made of `sockets` (no SYN queue figures).
    pub fn from_sockets(sockets: Vec<ListenSocket>) -> Self {
        let mut l = Self {
            sockets,
            series: Vec::new(),
        };
        l.group();
        l
    }

    /// Sorts the sockets and sums them into series.
    fn group(&mut self) {
        self.sockets.sort_unstable_by_key(|s| (s.addr, s.port));
        for s in &self.sockets {
            match self.series.last_mut() {
                Some(last) if last.addr == s.addr && last.port == s.port => {
                    last.sockets += 1;
                    last.accept_queue += u64::from(s.accept_queue);
                    last.accept_queue_limit += u64::from(s.accept_queue_limit);
                    last.v6only &= s.v6only;
                }
                _ => self.series.push(ListenSeries {
                    addr: s.addr,
                    port: s.port,
                    sockets: 1,
                    accept_queue: u64::from(s.accept_queue),
                    accept_queue_limit: u64::from(s.accept_queue_limit),
                    syn_queue: 0,
                    v6only: s.v6only,
                }),
            }
        }
    }

    /// The series of `(addr, port)`, if some socket listens there.
    pub fn series_at(&self, addr: IpAddr, port: u16) -> Option<&ListenSeries> {
        self.series
            .binary_search_by_key(&(addr, port), |s| (s.addr, s.port))
            .ok()
            .map(|i| &self.series[i])
    }
}

const SYN_RECV: u8 = 3;

/// The listener a connection to `addr:port` belongs to, in a series list sorted by
/// `(addr, port)`: the one bound to that address, else the wildcard of the same family.
pub fn find_listener(
    series: &mut [ListenSeries],
    addr: IpAddr,
    port: u16,
) -> Option<&mut ListenSeries> {
    let exact = series.binary_search_by_key(&(addr, port), |s| (s.addr, s.port));
    let index = match exact {
        Ok(i) => i,
        Err(_) => series
            .binary_search_by_key(&(unspecified(addr), port), |s| (s.addr, s.port))
            .ok()?,
    };
    series.get_mut(index)
}

/// `0.0.0.0` or `::`, in the family of `addr`.
pub fn unspecified(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

fn family_of(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn listen_socket(s: &DiagSocket) -> ListenSocket {
    ListenSocket {
        addr: s.src,
        port: s.sport,
        accept_queue: s.recv_queue,
        accept_queue_limit: s.send_queue,
        drops: s.drops,
        cookie: s.cookie,
        inode: s.inode,
        v6only: s.v6only.unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(addr: &str, port: u16, queue: u32, limit: u32) -> ListenSocket {
        ListenSocket {
            addr: addr.parse().expect("address"),
            port,
            accept_queue: queue,
            accept_queue_limit: limit,
            drops: Some(0),
            cookie: 0,
            inode: 0,
            v6only: false,
        }
    }

    #[test]
    fn reuseport_groups_are_one_series_summed() {
        let mut l = NsListeners {
            sockets: vec![
                socket("0.0.0.0", 80, 1, 128),
                socket("::", 80, 0, 128),
                socket("0.0.0.0", 80, 2, 128),
                socket("127.0.0.1", 22, 0, 4),
            ],
            series: Vec::new(),
        };
        l.group();
        let s = l
            .series_at("0.0.0.0".parse().expect("addr"), 80)
            .expect("series");
        assert_eq!(
            (s.sockets, s.accept_queue, s.accept_queue_limit),
            (2, 3, 256)
        );
        assert_eq!(l.series.len(), 3);
        assert!(l.series_at("::".parse().expect("addr"), 22).is_none());
    }

    #[test]
    fn requests_go_to_the_exact_listener_else_the_wildcard() {
        let mut l = NsListeners {
            sockets: vec![
                socket("0.0.0.0", 80, 0, 1),
                socket("127.0.0.1", 80, 0, 1),
                socket("::", 443, 0, 1),
            ],
            series: Vec::new(),
        };
        l.group();
        let ip = |s: &str| s.parse::<IpAddr>().expect("addr");
        for (addr, port) in [
            ("127.0.0.1", 80),
            ("10.0.0.1", 80),
            ("::ffff:10.0.0.1", 443),
        ] {
            find_listener(&mut l.series, ip(addr), port)
                .expect("found")
                .syn_queue += 1;
        }
        assert!(find_listener(&mut l.series, ip("10.0.0.1"), 443).is_none());
        assert_eq!(
            l.series_at(ip("127.0.0.1"), 80).map(|s| s.syn_queue),
            Some(1)
        );
        assert_eq!(l.series_at(ip("0.0.0.0"), 80).map(|s| s.syn_queue), Some(1));
        assert_eq!(l.series_at(ip("::"), 443).map(|s| s.syn_queue), Some(1));
    }
}
