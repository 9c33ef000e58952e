//! Listening sockets as the kernel reports them (sock_diag over netlink).

pub mod sockdiag;

use std::net::IpAddr;

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
pub fn listeners() -> Result<Vec<Listener>, sockdiag::SockDiagError> {
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        match sockdiag::dump_tcp(family, sockdiag::LISTEN_ONLY) {
            Ok(responses) => out.extend(responses.into_iter().map(|r| Listener {
                addr: r.header.socket_id.source_address,
                port: r.header.socket_id.source_port,
                accept_queue: r.header.recv_queue,
                accept_queue_limit: r.header.send_queue,
                inode: r.header.inode,
            })),
            // A kernel or namespace without IPv6 has no IPv6 listeners.
            Err(sockdiag::SockDiagError::Kernel(e))
                if family == libc::AF_INET6 as u8 && e == libc::EAFNOSUPPORT => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
