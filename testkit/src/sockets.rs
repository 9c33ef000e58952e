//! TCP sockets of a namespace as `ss -tan` lists them, from `/proc/thread-self/net/tcp{,6}`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context, Result, anyhow, bail};

use crate::Netns;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    /// 1
    Established,
    /// 2
    SynSent,
    /// 3 (in /proc: a request socket in a listener's SYN queue)
    SynRecv,
    /// 4
    FinWait1,
    /// 5
    FinWait2,
    /// 6
    TimeWait,
    /// 7
    Close,
    /// 8
    CloseWait,
    /// 9
    LastAck,
    /// 10
    Listen,
    /// 11
    Closing,
    /// 12 (a request socket, as the kernel stores it)
    NewSynRecv,
    /// Anything else.
    Other(u8),
}

impl From<u8> for TcpState {
    /// The state with the kernel's number `n`.
    fn from(n: u8) -> TcpState {
        match n {
            1 => TcpState::Established,
            2 => TcpState::SynSent,
            3 => TcpState::SynRecv,
            4 => TcpState::FinWait1,
            5 => TcpState::FinWait2,
            6 => TcpState::TimeWait,
            7 => TcpState::Close,
            8 => TcpState::CloseWait,
            9 => TcpState::LastAck,
            10 => TcpState::Listen,
            11 => TcpState::Closing,
            12 => TcpState::NewSynRecv,
            other => TcpState::Other(other),
        }
    }
}

/// One socket line of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    /// Local address and port.
    pub local: SocketAddr,
    /// Remote address and port (unspecified for a listener).
    pub remote: SocketAddr,
    /// State (request sockets show as [`TcpState::SynRecv`]).
    pub state: TcpState,
    /// Send queue; 0 for a listener.
    pub tx_queue: u32,
    /// Receive queue; for a listener: the accept queue length (`sk_ack_backlog`).
    pub rx_queue: u32,
    /// Socket inode (0 for request and TIME_WAIT sockets).
    pub inode: u64,
}

impl TcpSocket {
    /// Every IPv4 and IPv6 TCP socket of the calling thread's namespace, request socks included.
    pub fn read_current() -> Result<Vec<TcpSocket>> {
        let mut all = Vec::new();
        for name in ["tcp", "tcp6"] {
            let path = format!("/proc/thread-self/net/{name}");
            match std::fs::read_to_string(&path) {
                Ok(text) => all.extend(TcpSocket::parse(&text).with_context(|| path.clone())?),
                // tcp6 is absent without IPv6.
                Err(_) if name == "tcp6" => {}
                Err(err) => return Err(err).with_context(|| format!("read {path}")),
            }
        }
        Ok(all)
    }

    /// Parses the text of `/proc/net/tcp` or `/proc/net/tcp6` (header line first).
    pub fn parse(text: &str) -> Result<Vec<TcpSocket>> {
        text.lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|line| parse_line(line).with_context(|| format!("socket line {line:?}")))
            .collect()
    }
}

impl Netns {
    /// This namespace's TCP sockets (IPv4 and IPv6), as `ss -tan` would list them.
    pub fn tcp_sockets(&self) -> Result<Vec<TcpSocket>> {
        self.run(TcpSocket::read_current)?
    }
}

fn parse_line(line: &str) -> Result<TcpSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 {
        bail!("too few fields");
    }
    let (tx, rx) = fields[4]
        .split_once(':')
        .ok_or_else(|| anyhow!("queue field {:?}", fields[4]))?;
    Ok(TcpSocket {
        local: parse_addr(fields[1])?,
        remote: parse_addr(fields[2])?,
        state: TcpState::from(u8::from_str_radix(fields[3], 16).context("state")?),
        tx_queue: u32::from_str_radix(tx, 16).context("tx_queue")?,
        rx_queue: u32::from_str_radix(rx, 16).context("rx_queue")?,
        inode: fields[9].parse().context("inode")?,
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits + port (IPv6): words in host byte order.
fn parse_addr(text: &str) -> Result<SocketAddr> {
    let (addr, port) = text
        .split_once(':')
        .ok_or_else(|| anyhow!("address {text:?}"))?;
    let port = u16::from_str_radix(port, 16).context("port")?;
    let word = |i: usize| -> Result<[u8; 4]> {
        let hex = addr
            .get(i * 8..i * 8 + 8)
            .ok_or_else(|| anyhow!("address {addr:?}"))?;
        Ok(u32::from_str_radix(hex, 16)
            .with_context(|| format!("address {addr:?}"))?
            .to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => bail!("address {addr:?} is neither IPv4 nor IPv6"),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_proc_net_tcp() -> Result<()> {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000005 00:00000000 00000000     0        0 1572 1 0000000083f2c219 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 03 00000000:00000000 01:00000066 00000000     0        0 0 0 00000000b1b2c3d4
";
        let s = TcpSocket::parse(v4)?;
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].local, "127.0.0.1:8080".parse()?);
        assert_eq!(s[0].state, TcpState::Listen);
        assert_eq!(s[0].rx_queue, 5);
        assert_eq!(s[0].inode, 1572);
        assert_eq!(s[1].remote, "127.0.0.1:50000".parse()?);
        assert_eq!(s[1].state, TcpState::SynRecv);
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0
   1: 02000120000000000000000001000000:0050 02000120000000000000000002000000:C350 01 00000000:00000000 00:00000000 00000000     0        0 7 1 0000000000000000 100 0 0 10 0
";
        let s = TcpSocket::parse(v6)?;
        assert_eq!(s[0].local, "[::1]:8080".parse()?);
        assert_eq!(s[1].local, "[2001:2::1]:80".parse()?);
        assert_eq!(s[1].remote, "[2001:2::2]:50000".parse()?);
        assert_eq!(s[1].state, TcpState::Established);
        assert!(TcpSocket::parse("header\n 0: 0100007F 00000000:0000 0A\n").is_err());
        Ok(())
    }
}
