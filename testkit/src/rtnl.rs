//! Links, addresses and routes in a [`Netns`], set up with rtnetlink messages (no `ip`).
//!
//! A netlink socket talks to the namespace of the thread that created it, so every request
//! here opens its socket on a thread inside the target namespace ([`Netns::run`]).

use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, Inet6IfaceFlags, InfoData, InfoKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage, State,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

use crate::Netns;

/// How long [`Netns::veth_pair`] waits for both ends to be operationally up.
const LINK_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes veth names unique within the process (names only need to be unique per namespace).
static VETH_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The two ends of a veth pair made by [`Netns::veth_pair`]: a name in each namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPair {
    /// Name of the end in the namespace `veth_pair` was called on.
    pub local: String,
    /// Name of the end in the peer namespace.
    pub peer: String,
}

/// An interface's state and counters, from [`Netns::link_status`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// Operationally up (IF_OPER_UP: carrier on, seen by the kernel's link watcher).
    pub oper_up: bool,
    /// IPv6 considers the link ready (`IF_READY`: set from the link watcher's carrier-on
    /// event; IPv6 addresses are only brought into service after it).
    pub ipv6_ready: bool,
    /// Name of the attached queueing discipline (`noqueue` for a veth that is up).
    pub qdisc: String,
    /// Link-layer (MAC) address.
    pub mac: Vec<u8>,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Packets dropped on receive.
    pub rx_dropped: u64,
    /// Packets dropped on send.
    pub tx_dropped: u64,
}

/// What kind of route [`Netns::add_route`] installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteVia {
    /// Through a gateway on a directly connected network.
    Gateway(IpAddr),
    /// Silently discard everything sent there (`ip route add blackhole`).
    Blackhole,
}

impl Netns {
    /// Creates a veth pair with one end here and one in `peer`, assigns `local_addr`/`peer_addr`
    /// (address, prefix length; IPv4 or IPv6), sets both ends up and waits until both carry
    /// traffic.
    ///
    /// The peer end is created directly in `peer` (`IFLA_NET_NS_FD` in the peer's link
    /// message), so its name never exists here. Errors name the missing `veth` module when the
    /// kernel cannot make veth devices. Both ends get `accept_dad=0`, so their IPv6 addresses
    /// (link-local too) need no duplicate address detection.
    pub fn veth_pair(
        &self,
        peer: &Netns,
        local_addr: (IpAddr, u8),
        peer_addr: (IpAddr, u8),
    ) -> Result<VethPair> {
        let n = VETH_COUNTER.fetch_add(1, Ordering::Relaxed);
        // IFNAMSIZ is 16 with the NUL: "skv" + 4 hex digits of the pid + ≤ 5 digits + 'a'/'b'.
        let tag = format!("{:04x}{}", std::process::id() & 0xffff, n % 100_000);
        let pair = VethPair {
            local: format!("skv{tag}a"),
            peer: format!("skv{tag}b"),
        };
        if pair.local.len() > 15 {
            bail!("veth name {} too long", pair.local);
        }
        let peer_fd = peer.as_fd_raw();
        let (local_name, peer_name) = (pair.local.clone(), pair.peer.clone());
        self.run(move || create_veth(&local_name, &peer_name, peer_fd))?
            .with_context(|| {
                format!(
                    "create veth {}/{} from netns {} to netns {}",
                    pair.local,
                    pair.peer,
                    self.inode(),
                    peer.inode()
                )
            })?;
        // No duplicate address detection on either end, link-local addresses included: while
        // the link-local address is tentative the kernel sends no neighbour solicitation for
        // packets whose source is not its own (spoofed SYNs), and they wait, then vanish.
        if std::path::Path::new("/proc/sys/net/ipv6").exists() {
            self.sysctl(&format!("net/ipv6/conf/{}/accept_dad", pair.local), "0")?;
            peer.sysctl(&format!("net/ipv6/conf/{}/accept_dad", pair.peer), "0")?;
        }
        self.add_address(&pair.local, local_addr.0, local_addr.1)?;
        peer.add_address(&pair.peer, peer_addr.0, peer_addr.1)?;
        self.set_link_up(&pair.local)?;
        peer.set_link_up(&pair.peer)?;
        // The end set up first had no carrier yet: its transmit queue keeps the `noop` qdisc,
        // which drops everything (counted as tx_dropped), until the kernel's link watcher
        // handles the carrier-on event from a work queue; under load that took over 1 s here
        // and cost the first ARP reply. The watcher marks the link operationally up as it
        // attaches the real qdisc, and only then does IPv6 mark the link ready (IF_READY) and
        // put its addresses in service: wait for both on both ends.
        let ipv6 = std::path::Path::new("/proc/sys/net/ipv6").exists();
        let ready = crate::wait_until(LINK_READY_TIMEOUT, Duration::from_millis(1), || {
            let (a, b) = (
                self.link_status(&pair.local)?,
                peer.link_status(&pair.peer)?,
            );
            Ok(a.oper_up && b.oper_up && (!ipv6 || (a.ipv6_ready && b.ipv6_ready)))
        });
        ready.with_context(|| {
            format!(
                "veth {}/{} not operationally up: {:?} / {:?}",
                pair.local,
                pair.peer,
                self.link_status(&pair.local),
                peer.link_status(&pair.peer)
            )
        })?;
        self.wait_ipv6_ready(&pair.local, LINK_READY_TIMEOUT)?;
        peer.wait_ipv6_ready(&pair.peer, LINK_READY_TIMEOUT)?;
        Ok(pair)
    }

    /// Adds `addr/prefix` to interface `ifname` in this namespace (IPv6: without DAD; on a
    /// link that is up, returns once the address is usable).
    pub fn add_address(&self, ifname: &str, addr: IpAddr, prefix: u8) -> Result<()> {
        self.run(|| -> Result<()> {
            let index = if_index(ifname)?;
            let mut msg = AddressMessage::default();
            msg.header.family = family(addr);
            msg.header.prefix_len = prefix;
            msg.header.index = index;
            msg.attributes.push(AddressAttribute::Local(addr));
            msg.attributes.push(AddressAttribute::Address(addr));
            if addr.is_ipv6() {
                msg.header.flags = AddressHeaderFlags::Nodad;
                msg.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            request(
                RouteNetlinkMessage::NewAddress(msg),
                NLM_F_CREATE | NLM_F_EXCL,
            )
        })?
        .with_context(|| {
            format!(
                "add address {addr}/{prefix} to {ifname} in netns {}",
                self.inode()
            )
        })
    }

    /// Sets interface `ifname` up in this namespace.
    pub fn set_link_up(&self, ifname: &str) -> Result<()> {
        self.run(|| -> Result<()> {
            let mut msg = LinkMessage::default();
            msg.header.index = if_index(ifname)?;
            msg.header.flags = LinkFlags::Up;
            msg.header.change_mask = LinkFlags::Up;
            request(RouteNetlinkMessage::SetLink(msg), 0)
        })?
        .with_context(|| format!("set {ifname} up in netns {}", self.inode()))
    }

    /// Adds a route to `dest/prefix` in this namespace's main table (a gateway or a blackhole).
    pub fn add_route(&self, dest: IpAddr, prefix: u8, via: RouteVia) -> Result<()> {
        self.run(|| -> Result<()> {
            let mut msg = RouteMessage::default();
            msg.header = route_header(dest, prefix);
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(dest)));
            match via {
                RouteVia::Gateway(gateway) => {
                    if gateway.is_ipv4() != dest.is_ipv4() {
                        bail!("gateway {gateway} and destination {dest} differ in family");
                    }
                    msg.header.kind = RouteType::Unicast;
                    msg.header.scope = RouteScope::Universe;
                    msg.attributes
                        .push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
                }
                RouteVia::Blackhole => {
                    msg.header.kind = RouteType::BlackHole;
                    msg.header.scope = RouteScope::Universe;
                }
            }
            request(
                RouteNetlinkMessage::NewRoute(msg),
                NLM_F_CREATE | NLM_F_EXCL,
            )
        })?
        .with_context(|| {
            format!(
                "add route {dest}/{prefix} {via:?} in netns {}",
                self.inode()
            )
        })
    }

    /// State and packet statistics of interface `ifname` in this namespace.
    pub fn link_status(&self, ifname: &str) -> Result<LinkStatus> {
        self.run(|| -> Result<LinkStatus> {
            let mut msg = LinkMessage::default();
            msg.header.index = if_index(ifname)?;
            let answers = transact(RouteNetlinkMessage::GetLink(msg), 0)?;
            let mut status = LinkStatus::default();
            for answer in answers {
                let RouteNetlinkMessage::NewLink(link) = answer else {
                    continue;
                };
                status.up = link.header.flags.contains(LinkFlags::Up);
                for attr in link.attributes {
                    match attr {
                        LinkAttribute::OperState(state) => status.oper_up = state == State::Up,
                        LinkAttribute::Qdisc(name) => status.qdisc = name,
                        LinkAttribute::Address(mac) => status.mac = mac,
                        LinkAttribute::AfSpecUnspec(specs) => {
                            for spec in specs {
                                let AfSpecUnspec::Inet6(inet6) = spec else {
                                    continue;
                                };
                                for item in inet6 {
                                    if let AfSpecInet6::Flags(flags) = item {
                                        status.ipv6_ready = flags.contains(Inet6IfaceFlags::Ready);
                                    }
                                }
                            }
                        }
                        LinkAttribute::Stats64(stats) => {
                            status.rx_packets = stats.rx_packets;
                            status.tx_packets = stats.tx_packets;
                            status.rx_dropped = stats.rx_dropped;
                            status.tx_dropped = stats.tx_dropped;
                        }
                        _ => {}
                    }
                }
            }
            Ok(status)
        })?
        .with_context(|| format!("read the state of {ifname} in netns {}", self.inode()))
    }

    /// IPv6 addresses on `ifname`, each with whether it is still tentative (in duplicate
    /// address detection, not yet usable).
    pub fn ipv6_addresses(&self, ifname: &str) -> Result<Vec<(Ipv6Addr, bool)>> {
        self.run(|| -> Result<Vec<(Ipv6Addr, bool)>> {
            let index = if_index(ifname)?;
            let mut msg = AddressMessage::default();
            msg.header.family = AddressFamily::Inet6;
            let answers = transact(RouteNetlinkMessage::GetAddress(msg), NLM_F_DUMP)?;
            let mut found = Vec::new();
            for answer in answers {
                let RouteNetlinkMessage::NewAddress(addr) = answer else {
                    continue;
                };
                if addr.header.index != index {
                    continue;
                }
                let mut tentative = addr.header.flags.contains(AddressHeaderFlags::Tentative);
                let mut ip = None;
                for attr in addr.attributes {
                    match attr {
                        AddressAttribute::Address(IpAddr::V6(a)) => ip = Some(a),
                        AddressAttribute::Flags(f) => {
                            tentative |= f.contains(AddressFlags::Tentative);
                        }
                        _ => {}
                    }
                }
                if let Some(ip) = ip {
                    found.push((ip, tentative));
                }
            }
            Ok(found)
        })?
        .with_context(|| {
            format!(
                "list the IPv6 addresses of {ifname} in netns {}",
                self.inode()
            )
        })
    }

    /// Waits until every IPv6 address on `ifname` is usable: not tentative, its local route
    /// in place (else packets to it are dropped, `Ip6InAddrErrors`) and its solicited-node
    /// multicast group joined (else neighbour solicitations for it go unanswered).
    ///
    /// Addresses without DAD are never tentative, yet the kernel adds their route and joins
    /// their group from a work queue, which lagged over a second here under load.
    pub fn wait_ipv6_ready(&self, ifname: &str, timeout: Duration) -> Result<()> {
        if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
            return Ok(());
        }
        let ready = || -> Result<bool> {
            let addrs = self.ipv6_addresses(ifname)?;
            if addrs.iter().any(|(_, tentative)| *tentative) {
                return Ok(false);
            }
            let (groups, local) =
                self.run(|| -> Result<_> { Ok((ipv6_groups(ifname)?, ipv6_local_routes()?)) })??;
            Ok(addrs
                .iter()
                .all(|(addr, _)| groups.contains(&solicited_node(*addr)) && local.contains(addr)))
        };
        crate::wait_until(timeout, Duration::from_millis(1), ready).with_context(|| {
            format!(
                "IPv6 addresses of {ifname} not ready: {:?}",
                self.ipv6_addresses(ifname)
            )
        })
    }

    /// Adds a permanent neighbour entry (ARP or NDP): `ip` is at `mac` on `ifname`.
    pub fn add_neighbour(&self, ifname: &str, ip: IpAddr, mac: &[u8]) -> Result<()> {
        self.run(|| -> Result<()> {
            let mut msg = NeighbourMessage::default();
            msg.header.family = family(ip);
            msg.header.ifindex = if_index(ifname)?;
            msg.header.state = NeighbourState::Permanent;
            msg.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
            msg.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
            request(
                RouteNetlinkMessage::NewNeighbour(msg),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
        })?
        .with_context(|| format!("add neighbour {ip} on {ifname} in netns {}", self.inode()))
    }

    /// Index of interface `ifname` in this namespace.
    pub fn link_index(&self, ifname: &str) -> Result<u32> {
        self.run(|| if_index(ifname))?
    }

    fn as_fd_raw(&self) -> i32 {
        std::os::fd::AsFd::as_fd(self).as_raw_fd()
    }
}

fn family(addr: IpAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route_header(dest: IpAddr, prefix: u8) -> RouteHeader {
    RouteHeader {
        address_family: family(dest),
        destination_prefix_length: prefix,
        table: RouteHeader::RT_TABLE_MAIN,
        protocol: RouteProtocol::Static,
        ..RouteHeader::default()
    }
}

/// Creates `local` here and its peer `peer` directly in the namespace behind `peer_netns_fd`.
fn create_veth(local: &str, peer: &str, peer_netns_fd: i32) -> Result<()> {
    let mut peer_msg = LinkMessage::default();
    peer_msg
        .attributes
        .push(LinkAttribute::IfName(peer.to_owned()));
    // IFLA_NET_NS_FD on the peer: the kernel creates that end in the peer's namespace.
    peer_msg
        .attributes
        .push(LinkAttribute::NetNsFd(peer_netns_fd));
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(local.to_owned()));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
    ]));
    match request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL) {
        Err(err)
            if err
                .downcast_ref::<io::Error>()
                .and_then(io::Error::raw_os_error)
                == Some(libc::EOPNOTSUPP) =>
        {
            Err(err.context(
                "the kernel cannot create veth devices: load the `veth` module (CONFIG_VETH)",
            ))
        }
        other => other,
    }
}

/// The solicited-node multicast address of `addr` (ff02::1:ffXX:XXXX).
fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::from(
        0xff02_0000_0000_0000_0000_0001_ff00_0000u128
            | u128::from(u32::from_be_bytes([0, o[13], o[14], o[15]])),
    )
}

/// IPv6 multicast groups joined on `ifname` in the calling thread's namespace.
fn ipv6_groups(ifname: &str) -> Result<Vec<Ipv6Addr>> {
    let path = "/proc/thread-self/net/igmp6";
    let text = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    let mut groups = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 3 || fields[1] != ifname {
            continue;
        }
        let group = u128::from_str_radix(fields[2], 16)
            .with_context(|| format!("group in {path} line {line:?}"))?;
        groups.push(Ipv6Addr::from(group));
    }
    Ok(groups)
}

/// Destinations of the IPv6 host (/128) routes in the calling thread's namespace: the local
/// routes of its addresses among them.
fn ipv6_local_routes() -> Result<Vec<Ipv6Addr>> {
    let path = "/proc/thread-self/net/ipv6_route";
    let text = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    let mut routes = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 2 || fields[1] != "80" {
            continue;
        }
        let dest = u128::from_str_radix(fields[0], 16)
            .with_context(|| format!("destination in {path} line {line:?}"))?;
        routes.push(Ipv6Addr::from(dest));
    }
    Ok(routes)
}

/// Index of `ifname` in the calling thread's namespace.
fn if_index(ifname: &str) -> Result<u32> {
    let name = std::ffi::CString::new(ifname).context("interface name with a NUL")?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("no interface {ifname}"));
    }
    Ok(index)
}

/// Sends one rtnetlink request from the calling thread's namespace and waits for its ack.
///
/// A kernel error comes back as an [`io::Error`] (so callers can match on the errno).
fn request(msg: RouteNetlinkMessage, extra_flags: u16) -> Result<()> {
    transact(msg, extra_flags).map(drop)
}

/// Sends one rtnetlink request and returns the messages answered before the ack.
fn transact(msg: RouteNetlinkMessage, extra_flags: u16) -> Result<Vec<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("open a NETLINK_ROUTE socket")?;
    socket.bind_auto().context("bind the netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connect the netlink socket to the kernel")?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | extra_flags;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).context("send the netlink request")?;
    let mut answers = Vec::new();
    loop {
        let (reply, _) = socket
            .recv_from_full()
            .context("receive the netlink answer")?;
        let mut offset = 0;
        while offset < reply.len() {
            let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[offset..])
                .map_err(|e| anyhow!("parse the netlink answer: {e}"))?;
            let len = answer.header.length as usize;
            match answer.payload {
                NetlinkPayload::Error(err) => {
                    return match err.code {
                        None => Ok(answers),
                        Some(_) => Err(err.to_io().into()),
                    };
                }
                NetlinkPayload::Done(_) => return Ok(answers),
                NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};

    use super::*;
    use crate::require_root;

    #[test]
    fn veth_pair_connects_two_namespaces() -> Result<()> {
        if !require_root() {
            return Ok(());
        }
        let a = Netns::new()?;
        let b = Netns::new()?;
        let a4 = Ipv4Addr::new(198, 18, 0, 1);
        let b4 = Ipv4Addr::new(198, 18, 0, 2);
        let pair = a.veth_pair(&b, (a4.into(), 24), (b4.into(), 24))?;
        let a6: Ipv6Addr = "2001:2::1".parse()?;
        let b6: Ipv6Addr = "2001:2::2".parse()?;
        a.add_address(&pair.local, a6.into(), 64)?;
        b.add_address(&pair.peer, b6.into(), 64)?;
        let addrs = a.ipv6_addresses(&pair.local)?;
        assert!(addrs.contains(&(a6, false)), "{addrs:?}");
        assert!(
            addrs.iter().any(|(ip, t)| ip.segments()[0] == 0xfe80 && !t),
            "a usable link-local address: {addrs:?}"
        );
        let status = a.link_status(&pair.local)?;
        assert!(
            status.up && status.oper_up && status.ipv6_ready,
            "{status:?}"
        );
        assert_eq!(status.qdisc, "noqueue");
        assert_eq!(status.tx_dropped, 0, "{status:?}");
        assert!(a.link_index(&pair.local).is_ok());
        assert!(a.link_index(&pair.peer).is_err(), "the peer end moved");
        assert!(b.link_index(&pair.peer).is_ok());
        // Again: names are unique, and a second pair between the same namespaces works.
        let second = a.veth_pair(
            &b,
            (Ipv4Addr::new(198, 18, 1, 1).into(), 24),
            (Ipv4Addr::new(198, 18, 1, 2).into(), 24),
        )?;
        assert_ne!(second, pair);
        // A route via the veth, and a blackhole.
        a.add_route(
            Ipv4Addr::new(198, 19, 0, 0).into(),
            16,
            RouteVia::Gateway(b4.into()),
        )?;
        b.add_route("2001:2:0:1::".parse()?, 64, RouteVia::Blackhole)?;
        assert!(
            a.add_route(
                Ipv4Addr::new(198, 19, 0, 0).into(),
                16,
                RouteVia::Gateway(b4.into())
            )
            .is_err(),
            "the same route twice"
        );

        // TCP over the veth, both families.
        for (server, client) in [(IpAddr::from(b4), IpAddr::from(a4)), (b6.into(), a6.into())] {
            let listener = b.run(|| TcpListener::bind((server, 0)))??;
            let port = listener.local_addr()?.port();
            let stream = a.run(|| TcpStream::connect((server, port)))??;
            assert_eq!(stream.local_addr()?.ip(), client);
            let (_accepted, peer) = listener.accept()?;
            assert_eq!(peer.ip(), client);
        }
        Ok(())
    }

    #[test]
    fn solicited_node_addresses() {
        let addr: Ipv6Addr = "2001:2::1:2345:6789".parse().expect("v6");
        assert_eq!(
            solicited_node(addr),
            "ff02::1:ff45:6789".parse::<Ipv6Addr>().expect("v6")
        );
    }

    #[test]
    fn missing_interface_is_an_error() -> Result<()> {
        if !require_root() {
            return Ok(());
        }
        let a = Netns::new()?;
        let err = a
            .add_address("nonexistent0", Ipv4Addr::new(198, 18, 0, 1).into(), 24)
            .expect_err("no such interface");
        assert!(format!("{err:#}").contains("nonexistent0"), "{err:#}");
        Ok(())
    }
}
