//! Listen-backlog scenarios whose effect the kernel's own counters confirm.
//!
//! - [`accept_overflow`]: accept-queue overflow at the SYN stage (loopback is enough).
//! - [`syn_queue_fill`]: SYN-queue full from spoofed sources, with `tcp_syncookies` 0, 1 or 2.
//! - [`ack_stage_overflow`]: accept-queue overflow when the handshake-completing ACK arrives.
//!
//! The last two need a [`VethLab`]: a server and a client namespace joined by a veth pair.
//! Every helper returns the sockets it opened; they stay open (and the kernel state with them)
//! until the returned value drops.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::rtnl::{RouteVia, VethPair};
use crate::sockets::TcpState;
use crate::synflood::{SourceSpec, SynFloodOptions, syn_flood};
use crate::{Counters, Netns, wait_until};

/// Server end of a [`VethLab`] (RFC 2544 benchmarking range: never routed anywhere).
pub const LAB_SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Client end of a [`VethLab`].
pub const LAB_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Spoofed IPv4 sources of a [`VethLab`]: routed by the server to the silent client side.
pub const LAB_SPOOFED_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 0, 0), 16);
/// Server end of a [`VethLab`], IPv6 (RFC 5180 benchmarking range).
pub const LAB_SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
/// Client end of a [`VethLab`], IPv6.
pub const LAB_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
/// Spoofed IPv6 sources of a [`VethLab`].
pub const LAB_SPOOFED_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0), 64);

/// How long a scenario waits for the kernel to finish processing what it sent.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The client kernel's delayed-ACK timeout (TCP_DELACK_MAX, HZ/5) for a deferred final ACK.
const DELACK_MAX: Duration = Duration::from_millis(200);

/// A server and a client namespace joined by a veth pair (IPv4 and IPv6).
///
/// The server routes the spoofed ranges ([`LAB_SPOOFED_V4`], [`LAB_SPOOFED_V6`]) to the
/// client, which has forwarding off and blackhole routes for them: SYN-ACKs to spoofed
/// sources vanish there without an RST or an ICMP error, so the server's SYN queue stays full.
/// Each side has a permanent neighbour entry for the other (no ARP, no neighbour discovery).
#[derive(Debug)]
pub struct VethLab {
    /// The server namespace (listeners, the agent).
    pub server: Netns,
    /// The client namespace (connects, the SYN generator).
    pub client: Netns,
    /// Interface names: `local` in the server, `peer` in the client.
    pub veth: VethPair,
    /// Next unused flow of the spoofed sources, so repeated floods never reuse a flow.
    next_flow: AtomicU64,
}

impl VethLab {
    /// Two fresh namespaces joined as described on [`VethLab`].
    pub fn new() -> Result<VethLab> {
        Self::join(&Netns::new()?, &Netns::new()?)
    }

    /// Joins existing namespaces (one lab per pair: the addresses are fixed; never the host's
    /// namespace); turns forwarding off in `client`.
    pub fn join(server: &Netns, client: &Netns) -> Result<VethLab> {
        crate::netns::refuse_initial(server, "build a veth lab")?;
        crate::netns::refuse_initial(client, "build a veth lab")?;
        let veth = server.veth_pair(
            client,
            (LAB_SERVER_V4.into(), 24),
            (LAB_CLIENT_V4.into(), 24),
        )?;
        server.add_address(&veth.local, LAB_SERVER_V6.into(), 64)?;
        client.add_address(&veth.peer, LAB_CLIENT_V6.into(), 64)?;
        server.add_route(
            LAB_SPOOFED_V4.0.into(),
            LAB_SPOOFED_V4.1,
            RouteVia::Gateway(LAB_CLIENT_V4.into()),
        )?;
        server.add_route(
            LAB_SPOOFED_V6.0.into(),
            LAB_SPOOFED_V6.1,
            RouteVia::Gateway(LAB_CLIENT_V6.into()),
        )?;
        // New namespaces copy forwarding from the host's: make sure it is off here, and drop
        // the spoofed ranges explicitly. IPv4 with forwarding off already drops SYN-ACKs to
        // them silently (IpInAddrErrors); IPv6 answered with ICMPv6 destination unreachable
        // (rate-limited: 6 per 200 SYN-ACKs), noise in the server's counters.
        client.sysctl("net.ipv4.ip_forward", "0")?;
        client.sysctl("net.ipv6.conf.all.forwarding", "0")?;
        client.add_route(
            LAB_SPOOFED_V4.0.into(),
            LAB_SPOOFED_V4.1,
            RouteVia::Blackhole,
        )?;
        client.add_route(
            LAB_SPOOFED_V6.0.into(),
            LAB_SPOOFED_V6.1,
            RouteVia::Blackhole,
        )?;
        // Permanent neighbour entries: no ARP or neighbour discovery ever holds a packet back
        // (a lost first solicitation under load cost a 1 s retry, longer than a delayed ACK).
        let server_mac = server.link_status(&veth.local)?.mac;
        let client_mac = client.link_status(&veth.peer)?.mac;
        for ip in [IpAddr::from(LAB_CLIENT_V4), LAB_CLIENT_V6.into()] {
            server.add_neighbour(&veth.local, ip, &client_mac)?;
        }
        for ip in [IpAddr::from(LAB_SERVER_V4), LAB_SERVER_V6.into()] {
            client.add_neighbour(&veth.peer, ip, &server_mac)?;
        }
        let lab = VethLab {
            server: server.try_clone()?,
            client: client.try_clone()?,
            veth,
            next_flow: AtomicU64::new(0),
        };
        lab.probe(false)?;
        lab.probe(true)?;
        Ok(lab)
    }

    /// A UDP round trip client → server → client (IPv4 or IPv6), retried until it works.
    ///
    /// Even with the links and addresses reported ready, the first IPv6 packets to the
    /// server were sometimes refused here (`Ip6InAddrErrors`) while the kernel was still
    /// bringing the link into service; a working round trip is the proof. Only UDP counters
    /// move.
    fn probe(&self, ipv6: bool) -> Result<()> {
        let server = self
            .server
            .run(|| UdpSocket::bind((self.server_ip(ipv6), 0)))??;
        let client = self
            .client
            .run(|| UdpSocket::bind((self.client_ip(ipv6), 0)))??;
        server.set_read_timeout(Some(Duration::from_millis(50)))?;
        client.set_read_timeout(Some(Duration::from_millis(50)))?;
        let target = server.local_addr()?;
        let mut buf = [0u8; 16];
        let probed = wait_until(SETTLE_TIMEOUT, Duration::from_millis(1), || {
            client.send_to(b"probe", target)?;
            let Ok((_, from)) = server.recv_from(&mut buf) else {
                return Ok(false);
            };
            server.send_to(b"answer", from)?;
            Ok(client.recv_from(&mut buf).is_ok())
        });
        probed.with_context(|| {
            format!(
                "no UDP round trip {} -> {target} over the lab's veth",
                self.client_ip(ipv6)
            )
        })
    }

    /// The server's address in the lab, IPv4 or IPv6.
    pub fn server_ip(&self, ipv6: bool) -> IpAddr {
        if ipv6 {
            LAB_SERVER_V6.into()
        } else {
            LAB_SERVER_V4.into()
        }
    }

    /// The client's address in the lab, IPv4 or IPv6.
    pub fn client_ip(&self, ipv6: bool) -> IpAddr {
        if ipv6 {
            LAB_CLIENT_V6.into()
        } else {
            LAB_CLIENT_V4.into()
        }
    }

    /// The spoofed source range (ports 1024-65535), IPv4 or IPv6.
    pub fn spoofed_sources(&self, ipv6: bool) -> SourceSpec {
        let (net, prefix) = if ipv6 {
            (IpAddr::from(LAB_SPOOFED_V6.0), LAB_SPOOFED_V6.1)
        } else {
            (IpAddr::from(LAB_SPOOFED_V4.0), LAB_SPOOFED_V4.1)
        };
        SourceSpec {
            net,
            prefix,
            ports: 1024..=65535,
        }
    }

    /// Sends `count` SYNs to `target` from the client namespace with fresh spoofed sources.
    pub fn syn_flood(&self, target: SocketAddr, count: usize, rate: Option<u32>) -> Result<usize> {
        let first_flow = self.next_flow.fetch_add(count as u64, Ordering::Relaxed);
        let sources = self.spoofed_sources(target.is_ipv6());
        let options = SynFloodOptions {
            rate,
            first_flow,
            ..SynFloodOptions::default()
        };
        self.client
            .run(|| syn_flood(target, &sources, count, &options))?
    }
}

/// How many of a group of client sockets are in which state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStates {
    /// Handshake done (from the client's view).
    pub established: usize,
    /// SYN sent, no SYN-ACK yet (the SYN was dropped).
    pub syn_sent: usize,
    /// Closed with an error (for example reset by the server).
    pub closed: usize,
    /// Anything else.
    pub other: usize,
}

impl ClientStates {
    /// Counts the states of `sockets` (`TCP_INFO`).
    pub fn of(sockets: &[Socket]) -> Result<ClientStates> {
        let mut states = ClientStates::default();
        for socket in sockets {
            match tcp_state(socket)? {
                TcpState::Established => states.established += 1,
                TcpState::SynSent => states.syn_sent += 1,
                TcpState::Close => states.closed += 1,
                _ => states.other += 1,
            }
        }
        Ok(states)
    }
}

/// What [`accept_overflow`] set up: a listener that never accepts and its clients.
#[derive(Debug)]
pub struct AcceptOverflow {
    /// The listener (backlog as asked, never accepting).
    pub listener: Socket,
    /// Its address.
    pub addr: SocketAddr,
    /// The non-blocking client sockets, in connect order.
    pub clients: Vec<Socket>,
}

impl AcceptOverflow {
    /// The clients' current states.
    pub fn client_states(&self) -> Result<ClientStates> {
        ClientStates::of(&self.clients)
    }

    /// Closes every socket (the same as dropping the value).
    pub fn close(self) {}
}

/// In `ns`: a listener on `ip` (e.g. 127.0.0.1 or ::1) with `backlog` that never accepts, and
/// `connects` concurrent non-blocking connects to it. Overflows the accept queue.
///
/// On loopback the handshake completes inside `connect()`, so every overflow is at the SYN
/// stage: the SYNs that find the accept queue full are dropped (`ListenOverflows`,
/// `ListenDrops`) and their clients stay in SYN_SENT, retransmitting, until the value drops.
pub fn accept_overflow(
    ns: &Netns,
    ip: IpAddr,
    backlog: i32,
    connects: usize,
) -> Result<AcceptOverflow> {
    let (listener, addr) = ns.run(|| listen_on(SocketAddr::new(ip, 0), backlog))??;
    let clients = ns.run(|| connect_many(addr, connects, false))??;
    Ok(AcceptOverflow {
        listener,
        addr,
        clients,
    })
}

/// Parameters of [`syn_queue_fill`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynQueueParams {
    /// `net.ipv4.tcp_syncookies` for the server namespace (0, 1 or 2; IPv6 follows it too).
    pub syncookies: u8,
    /// The listener's backlog: also the SYN queue's limit.
    pub backlog: i32,
    /// SYNs to send, each from a new spoofed source.
    pub syns: usize,
    /// `net.ipv4.tcp_max_syn_backlog` for the server namespace, if to be changed.
    pub max_syn_backlog: Option<u32>,
    /// SYNs per second (`None`: as fast as possible).
    pub rate: Option<u32>,
    /// Use the lab's IPv6 addresses.
    pub ipv6: bool,
}

impl Default for SynQueueParams {
    /// Cookies on (the kernel's default), backlog 8, 200 SYNs, IPv4, unpaced.
    fn default() -> Self {
        SynQueueParams {
            syncookies: 1,
            backlog: 8,
            syns: 200,
            max_syn_backlog: None,
            rate: None,
            ipv6: false,
        }
    }
}

/// What [`syn_queue_fill`] did and what the server's kernel counted.
#[derive(Debug)]
pub struct SynQueueFill {
    /// The listener (never accepts; its SYN queue lives as long as it does).
    pub listener: Socket,
    /// Its address.
    pub addr: SocketAddr,
    /// SYNs sent.
    pub sent: usize,
    /// The server namespace's counters' increase during the flood.
    pub server: Counters,
    /// Request sockets in the listener's SYN queue afterwards.
    pub syn_recv: usize,
}

/// Fills the SYN queue of a fresh listener in `lab.server` with SYNs from spoofed sources
/// sent from `lab.client`, after setting `tcp_syncookies` (and `tcp_max_syn_backlog`).
///
/// The sysctls stay set in the server namespace.
pub fn syn_queue_fill(lab: &VethLab, params: &SynQueueParams) -> Result<SynQueueFill> {
    let server = &lab.server;
    server.sysctl("net.ipv4.tcp_syncookies", &params.syncookies.to_string())?;
    if let Some(max) = params.max_syn_backlog {
        server.sysctl("net.ipv4.tcp_max_syn_backlog", &max.to_string())?;
    }
    let bind = SocketAddr::new(lab.server_ip(params.ipv6), 0);
    let (listener, addr) = server.run(|| listen_on(bind, params.backlog))??;
    let before = server.counters()?;
    let sent = lab.syn_flood(addr, params.syns, params.rate)?;
    // Every SYN reaches TCP (TcpInSegs) unless a device queue dropped it.
    let settled = wait_until(SETTLE_TIMEOUT, Duration::from_millis(5), || {
        Ok(server.counters()?.delta(&before).get("TcpInSegs")? >= sent as u64)
    });
    let delta = server.counters()?.delta(&before);
    settled.with_context(|| format!("{sent} SYNs sent; server counters {delta:?}"))?;
    let syn_recv = server
        .tcp_sockets()?
        .iter()
        .filter(|s| s.local == addr && s.state == TcpState::SynRecv)
        .count();
    Ok(SynQueueFill {
        listener,
        addr,
        sent,
        server: delta,
        syn_recv,
    })
}

/// Parameters of [`ack_stage_overflow`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckStageParams {
    /// The listener's backlog (accept queue and SYN queue limit).
    pub backlog: i32,
    /// Clients connected first whose kernel delays the final ACK by 200 ms (client-side
    /// `TCP_DEFER_ACCEPT`): their handshakes wait in the SYN queue.
    pub late_clients: usize,
    /// Ordinary clients connected next: they fill the accept queue (the first of them), or
    /// are dropped at the SYN stage (the rest).
    pub prompt_clients: usize,
    /// `net.ipv4.tcp_abort_on_overflow` for the server: ACK-stage overflows then send RSTs.
    pub abort_on_overflow: bool,
    /// `net.ipv4.tcp_syncookies` for the server (1: prompt clients past a full SYN queue get
    /// cookies; 0: they are dropped, `TCPReqQFullDrop`).
    pub syncookies: u8,
    /// Use the lab's IPv6 addresses.
    pub ipv6: bool,
}

impl Default for AckStageParams {
    /// Backlog 4, 5 late clients, 195 prompt ones (200 connects), no abort, cookies on, IPv4.
    fn default() -> Self {
        AckStageParams {
            backlog: 4,
            late_clients: 5,
            prompt_clients: 195,
            abort_on_overflow: false,
            syncookies: 1,
            ipv6: false,
        }
    }
}

/// A timing-bound scenario's precondition did not hold (the machine was too slow for it,
/// e.g. a guest under software emulation with a busy host): nothing was measured, and a
/// fresh run may succeed. See [`retry_if_too_slow`].
#[derive(Debug)]
pub struct TooSlow(pub String);

impl std::fmt::Display for TooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TooSlow {}

/// Runs `attempt` up to `attempts` times while it fails with [`TooSlow`], each time from
/// scratch (the closure builds its own lab); any other error, or the last [`TooSlow`], is
/// returned as it is. Only the precondition is retried: a run that went ahead is judged once.
pub fn retry_if_too_slow<T>(attempts: u32, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let mut n = 1;
    loop {
        match attempt() {
            Err(e) if n < attempts && e.downcast_ref::<TooSlow>().is_some() => {
                eprintln!("attempt {n} of {attempts} not measured, running again: {e:#}");
                n += 1;
            }
            done => return done,
        }
    }
}

/// What [`ack_stage_overflow`] did and what both kernels counted.
#[derive(Debug)]
pub struct AckStageOverflow {
    /// The listener (never accepts).
    pub listener: Socket,
    /// Its address.
    pub addr: SocketAddr,
    /// Clients whose final ACK came late, in connect order.
    pub late: Vec<Socket>,
    /// Ordinary clients, in connect order.
    pub prompt: Vec<Socket>,
    /// The server namespace's counters' increase.
    pub server: Counters,
    /// The client namespace's counters' increase.
    pub client: Counters,
    /// States of the late clients at the end.
    pub late_states: ClientStates,
    /// States of the prompt clients at the end.
    pub prompt_states: ClientStates,
    /// The listener's accept queue length at the end.
    pub accept_queue: u32,
    /// Request sockets left in the listener's SYN queue at the end.
    pub syn_recv: usize,
}

impl AckStageOverflow {
    /// Overflows at the SYN stage: clients whose SYN was dropped (still in SYN_SENT), less the
    /// SYN-queue drops (`TCPReqQFullDrop`, with cookies off), which are no overflows.
    pub fn syn_stage_overflows(&self) -> Result<u64> {
        let dropped = (self.prompt_states.syn_sent + self.late_states.syn_sent) as u64;
        Ok(dropped.saturating_sub(self.server.get("TcpExtTCPReqQFullDrop")?))
    }

    /// Overflows at the ACK stage: `ListenOverflows` less the SYN-stage ones.
    pub fn ack_stage_overflows(&self) -> Result<u64> {
        let total = self.server.get("TcpExtListenOverflows")?;
        Ok(total.saturating_sub(self.syn_stage_overflows()?))
    }
}

/// Makes handshake-completing ACKs meet a full accept queue, which plain connects never do.
///
/// In `lab.server`: a listener with `backlog` that never accepts. From `lab.client`: first
/// `late_clients` connects whose final ACK the client kernel holds back for 200 ms (client-side
/// `TCP_DEFER_ACCEPT`), so they wait in the SYN queue (or, past it, hold a syncookie); once
/// their SYN-ACKs are in, `prompt_clients` ordinary connects fill the accept queue (the rest
/// are dropped at the SYN stage). Then the late ACKs meet the full accept queue: ACK-stage
/// overflows. Returns about 350 ms after the late SYN-ACKs: after those ACKs, before the
/// server's first SYN-ACK retransmission (1 s), whose answer would overflow again. The
/// sysctls stay set in the server namespace.
///
/// Measured on 6.18: over a veth pair, as on loopback, an ordinary connect's handshake
/// completes inside `connect()` (each hop runs in the sender's softirq), so 200 plain
/// concurrent connects from 1 to 8 threads gave 0 or 1 ACK-stage overflows; hence the
/// delayed ACKs. With `tcp_abort_on_overflow=1` only overflows of request sockets are reset
/// (`TcpExtEmbryonicRsts`); an overflowing syncookie ACK is dropped silently.
pub fn ack_stage_overflow(lab: &VethLab, params: &AckStageParams) -> Result<AckStageOverflow> {
    let (server, client) = (&lab.server, &lab.client);
    server.sysctl("net.ipv4.tcp_syncookies", &params.syncookies.to_string())?;
    server.sysctl(
        "net.ipv4.tcp_abort_on_overflow",
        if params.abort_on_overflow { "1" } else { "0" },
    )?;
    let bind = SocketAddr::new(lab.server_ip(params.ipv6), 0);
    let (listener, addr) = server.run(|| listen_on(bind, params.backlog))??;
    let server_before = server.counters()?;
    let client_before = client.counters()?;

    let late_start = Instant::now();
    let late = client.run(|| connect_many(addr, params.late_clients, true))??;
    // Every late SYN processed by the server, and every SYN-ACK by the client: the late
    // clients that got one are established, their final ACK still due.
    wait_until(SETTLE_TIMEOUT, Duration::from_millis(1), || {
        let s = server.counters()?.delta(&server_before);
        let c = client.counters()?.delta(&client_before);
        Ok(s.get("TcpInSegs")? >= params.late_clients as u64
            && c.get("TcpInSegs")? >= s.get("TcpOutSegs")?)
    })
    .context("the late clients' handshakes did not settle")?;
    let late_done = Instant::now();
    let late_settled = late_done - late_start;
    let prompt = client.run(|| connect_many(addr, params.prompt_clients, false))??;
    if late_start.elapsed() >= DELACK_MAX {
        return Err(TooSlow(format!(
            "the connects took {:?} (late ones settled after {late_settled:?}), past the late \
             clients' delayed ACK: too slow a machine; late {:?}, server {:?}, client {:?}",
            late_start.elapsed(),
            ClientStates::of(&late)?,
            server.counters()?.delta(&server_before),
            client.counters()?.delta(&client_before),
        ))
        .into());
    }
    // The late ACKs leave 200 ms after their SYN-ACKs; the first SYN-ACK retransmission (and
    // the prompt clients' first SYN retransmission) comes 1 s after the first transmission.
    std::thread::sleep(
        (DELACK_MAX + Duration::from_millis(150)).saturating_sub(late_done.elapsed()),
    );

    let server_delta = server.counters()?.delta(&server_before);
    let client_delta = client.counters()?.delta(&client_before);
    let sockets = server.tcp_sockets()?;
    let accept_queue = sockets
        .iter()
        .find(|s| s.local == addr && s.state == TcpState::Listen)
        .map(|s| s.rx_queue)
        .unwrap_or(0);
    let syn_recv = sockets
        .iter()
        .filter(|s| s.local == addr && s.state == TcpState::SynRecv)
        .count();
    Ok(AckStageOverflow {
        late_states: ClientStates::of(&late)?,
        prompt_states: ClientStates::of(&prompt)?,
        listener,
        addr,
        late,
        prompt,
        server: server_delta,
        client: client_delta,
        accept_queue,
        syn_recv,
    })
}

/// A listener on `addr` (port 0: any) with `backlog`, in the calling thread's namespace.
pub fn listen_on(addr: SocketAddr, backlog: i32) -> Result<(Socket, SocketAddr)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("socket(SOCK_STREAM)")?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket
        .bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    socket
        .listen(backlog)
        .with_context(|| format!("listen on {addr}"))?;
    let local = socket
        .local_addr()?
        .as_socket()
        .context("listener address")?;
    Ok((socket, local))
}

/// `n` non-blocking connects to `addr` from the calling thread's namespace; with
/// `defer_final_ack`, the kernel delays each handshake's final ACK (client-side TCP_DEFER_ACCEPT).
pub fn connect_many(addr: SocketAddr, n: usize, defer_final_ack: bool) -> Result<Vec<Socket>> {
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .context("socket(SOCK_STREAM)")?;
        socket.set_nonblocking(true)?;
        if defer_final_ack {
            set_int_opt(&socket, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, 1)
                .context("setsockopt(TCP_DEFER_ACCEPT)")?;
        }
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(err) => return Err(err).with_context(|| format!("connect {i} to {addr}")),
        }
        sockets.push(socket);
    }
    Ok(sockets)
}

fn set_int_opt(socket: &Socket, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: `value` is a live c_int and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The TCP state of `socket` (`TCP_INFO`'s `tcpi_state`).
fn tcp_state(socket: &Socket) -> Result<TcpState> {
    // SAFETY: tcp_info is plain old data; all-zero is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(TCP_INFO)");
    }
    Ok(TcpState::from(info.tcpi_state))
}
