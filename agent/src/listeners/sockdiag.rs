//! A TCP socket dump through NETLINK_SOCK_DIAG (what `ss` uses).

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
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
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut out = Vec::new();
    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&receive[offset..size])
                .map_err(|e| SockDiagError::Decode(e.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    out.push(*response);
                }
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    let code = e.code.map_or(0, |c| -c.get());
                    return Err(SockDiagError::Kernel(code));
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}
