//! A TCP socket dump through NETLINK_SOCK_DIAG (what `ss` uses).
//!
//! The netlink socket belongs to the network namespace of the thread that creates it, so a
//! dump always answers for the calling thread's namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, Parseable as _,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::IPPROTO_TCP,
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// Only sockets in LISTEN.
pub const LISTEN_ONLY: StateFlags = StateFlags::LISTEN;

/// Errors of a sock_diag dump.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    /// The netlink socket failed.
    #[error("sock_diag netlink socket: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel answered with an error (errno).
    #[error("sock_diag: {}", std::io::Error::from_raw_os_error(*.0))]
    Kernel(i32),
    /// The answer could not be decoded.
    #[error("sock_diag: undecodable answer: {0}")]
    Decode(String),
}

/// Dumps the TCP sockets of `family` in `states` in the calling thread's namespace.
pub fn dump_tcp(family: u8, states: StateFlags) -> Result<Vec<InetResponse>, SockDiagError> {
    let mut out = Vec::new();
    let mut receive = Vec::new();
    dump_raw(
        family,
        states,
        ExtensionFlags::empty(),
        &mut receive,
        |payload| {
            let response =
                InetResponse::parse(payload).map_err(|e| SockDiagError::Decode(e.to_string()))?;
            out.push(response);
            Ok(())
        },
    )?;
    Ok(out)
}

/// One socket of a dump: the fields of `struct inet_diag_msg` and the attributes the agent
/// uses, decoded in place (a dump of 10,000 sockets allocates nothing per socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// TCP state (request sockets are reported as SYN_RECV, 3; a timewait socket as its
    /// substate, TIME_WAIT or FIN_WAIT2).
    pub state: u8,
    /// `idiag_timer`: 3 for a timewait socket (its timer), else the full socket's pending timer.
    pub timer: u8,
    /// Local address.
    pub src: IpAddr,
    /// Local port.
    pub sport: u16,
    /// Remote address.
    pub dst: IpAddr,
    /// Remote port.
    pub dport: u16,
    /// The socket cookie, unique per socket for the whole boot.
    pub cookie: u64,
    /// `idiag_rqueue`: for a listener, the accept queue length (`sk_ack_backlog`).
    pub recv_queue: u32,
    /// `idiag_wqueue`: for a listener, the accept queue limit (`sk_max_ack_backlog`).
    pub send_queue: u32,
    /// Socket inode.
    pub inode: u32,
    /// `sk_drops` (INET_DIAG_SKMEMINFO, when asked for and long enough).
    pub drops: Option<u32>,
    /// IPV6_V6ONLY (INET_DIAG_SKV6ONLY, sent for IPv6 sockets).
    pub v6only: Option<bool>,
}

/// Dumps the TCP sockets of `family` in `states` in the calling thread's namespace, handing
/// each one to `each` as it is decoded. `extensions` asks for attributes
/// ([`ExtensionFlags::SKMEMINFO`] for `sk_drops`); `receive` is a buffer kept between calls.
pub fn dump_sockets(
    family: u8,
    states: StateFlags,
    extensions: ExtensionFlags,
    receive: &mut Vec<u8>,
    mut each: impl FnMut(&DiagSocket),
) -> Result<(), SockDiagError> {
    dump_raw(family, states, extensions, receive, |payload| {
        each(&decode(payload)?);
        Ok(())
    })
}

/// Size of the receive buffer of a dump: the kernel fills at most 32 KiB per batch.
const RECEIVE_BUFFER: usize = 64 * 1024;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `struct inet_diag_msg`.
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_SKMEMINFO: u16 = 7;
const INET_DIAG_SKV6ONLY: u16 = 11;
/// Index of `SK_MEMINFO_DROPS` in the SKMEMINFO array of u32s.
const SK_MEMINFO_DROPS: usize = 8;

/// Sends the dump request and hands the payload of every answer message to `each`.
fn dump_raw(
    family: u8,
    states: StateFlags,
    extensions: ExtensionFlags,
    receive: &mut Vec<u8>,
    mut each: impl FnMut(&[u8]) -> Result<(), SockDiagError>,
) -> Result<(), SockDiagError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == libc::AF_INET6 as u8 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions,
            states,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    if receive.len() < RECEIVE_BUFFER {
        receive.resize(RECEIVE_BUFFER, 0);
    }
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        if size == 0 {
            return Err(SockDiagError::Decode(
                "the dump ended without NLMSG_DONE".into(),
            ));
        }
        let mut rest = &receive[..size];
        while rest.len() >= NLMSG_HDRLEN {
            let length = u32_at(rest, 0) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            if length < NLMSG_HDRLEN || length > rest.len() {
                return Err(SockDiagError::Decode(format!(
                    "netlink message of {length} bytes in {} left",
                    rest.len()
                )));
            }
            let payload = &rest[NLMSG_HDRLEN..length];
            match kind {
                // A dump that failed midway says so in its DONE message.
                NLMSG_DONE => {
                    let code = if payload.len() >= 4 {
                        u32_at(payload, 0) as i32
                    } else {
                        0
                    };
                    return if code < 0 {
                        Err(SockDiagError::Kernel(-code))
                    } else {
                        Ok(())
                    };
                }
                NLMSG_ERROR => {
                    let code = if payload.len() >= 4 {
                        -(u32_at(payload, 0) as i32)
                    } else {
                        libc::EIO
                    };
                    return Err(SockDiagError::Kernel(code));
                }
                SOCK_DIAG_BY_FAMILY => each(payload)?,
                _ => {}
            }
            rest = &rest[align4(length).min(rest.len())..];
        }
    }
}

/// Decodes one `inet_diag_msg` and its attributes.
fn decode(payload: &[u8]) -> Result<DiagSocket, SockDiagError> {
    if payload.len() < INET_DIAG_MSG_LEN {
        return Err(SockDiagError::Decode(format!(
            "inet_diag_msg of {} bytes",
            payload.len()
        )));
    }
    let family = payload[0];
    let address = |at: usize| -> IpAddr {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&payload[at..at + 16]);
        if family == libc::AF_INET6 as u8 {
            IpAddr::V6(Ipv6Addr::from(octets))
        } else {
            IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
        }
    };
    let mut socket = DiagSocket {
        family,
        state: payload[1],
        timer: payload[2],
        // struct inet_diag_sockid at offset 4: ports in network order, then addresses.
        sport: u16::from_be_bytes([payload[4], payload[5]]),
        dport: u16::from_be_bytes([payload[6], payload[7]]),
        src: address(8),
        dst: address(24),
        // Two host-order u32s, low half first.
        cookie: u64::from(u32_at(payload, 44)) | u64::from(u32_at(payload, 48)) << 32,
        recv_queue: u32_at(payload, 56),
        send_queue: u32_at(payload, 60),
        inode: u32_at(payload, 68),
        drops: None,
        v6only: None,
    };
    let mut attrs = &payload[INET_DIAG_MSG_LEN..];
    while attrs.len() >= 4 {
        let length = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if length < 4 || length > attrs.len() {
            break;
        }
        let value = &attrs[4..length];
        match kind {
            INET_DIAG_SKMEMINFO if value.len() >= (SK_MEMINFO_DROPS + 1) * 4 => {
                socket.drops = Some(u32_at(value, SK_MEMINFO_DROPS * 4));
            }
            INET_DIAG_SKV6ONLY if !value.is_empty() => socket.v6only = Some(value[0] != 0),
            _ => {}
        }
        attrs = &attrs[align4(length).min(attrs.len())..];
    }
    Ok(socket)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inet_diag_msg for 127.0.0.1:8080 in LISTEN, with SKMEMINFO (d=7) and SKV6ONLY.
    fn message() -> Vec<u8> {
        let mut m = vec![0u8; INET_DIAG_MSG_LEN];
        m[0] = libc::AF_INET as u8;
        m[1] = 10;
        m[4..6].copy_from_slice(&8080u16.to_be_bytes());
        m[8..12].copy_from_slice(&[127, 0, 0, 1]);
        m[44..48].copy_from_slice(&5u32.to_ne_bytes());
        m[48..52].copy_from_slice(&1u32.to_ne_bytes());
        m[56..60].copy_from_slice(&3u32.to_ne_bytes());
        m[60..64].copy_from_slice(&128u32.to_ne_bytes());
        m[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        let mut meminfo = Vec::new();
        for i in 0..9u32 {
            meminfo.extend_from_slice(&(if i == 8 { 7 } else { 100 + i }).to_ne_bytes());
        }
        m.extend_from_slice(&(4 + meminfo.len() as u16).to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_SKMEMINFO.to_ne_bytes());
        m.extend_from_slice(&meminfo);
        m.extend_from_slice(&5u16.to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_SKV6ONLY.to_ne_bytes());
        m.extend_from_slice(&[1, 0, 0, 0]);
        m
    }

    #[test]
    fn decodes_the_message_and_its_attributes() -> Result<(), SockDiagError> {
        let s = decode(&message())?;
        assert_eq!(s.src, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!((s.sport, s.state), (8080, 10));
        assert_eq!((s.recv_queue, s.send_queue, s.inode), (3, 128, 4242));
        assert_eq!(s.cookie, (1 << 32) | 5);
        assert_eq!(s.drops, Some(7));
        assert_eq!(s.v6only, Some(true));
        Ok(())
    }

    #[test]
    fn a_short_meminfo_gives_no_drops_and_a_short_message_an_error() -> Result<(), SockDiagError> {
        let mut m = message();
        m.truncate(INET_DIAG_MSG_LEN);
        m.extend_from_slice(&12u16.to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_SKMEMINFO.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        assert_eq!(decode(&m)?.drops, None);
        assert!(decode(&m[..40]).is_err());
        Ok(())
    }

    #[test]
    fn dumps_the_listeners_here() -> Result<(), SockDiagError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let mut found = Vec::new();
        let mut buffer = Vec::new();
        dump_sockets(
            libc::AF_INET as u8,
            StateFlags::LISTEN,
            ExtensionFlags::SKMEMINFO,
            &mut buffer,
            |s| found.push(*s),
        )?;
        let ours = found
            .iter()
            .find(|s| s.sport == port)
            .ok_or_else(|| SockDiagError::Decode("our listener is missing".into()))?;
        assert_eq!(ours.src, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(ours.drops, Some(0));
        assert_ne!(ours.cookie, 0);
        // The library's decoding agrees.
        let same = dump_tcp(libc::AF_INET as u8, StateFlags::LISTEN)?;
        assert!(same.iter().any(|r| r.header.socket_id.source_port == port));
        Ok(())
    }
}
