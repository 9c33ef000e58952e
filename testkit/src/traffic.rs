//! Traffic helpers; they act in the calling thread's namespace (call them inside [`crate::Netns::run`]).

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long [`tcp_pair`] waits for its connection.
const PAIR_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes `n` blocking connects to `addr`, where nothing listens; returns how many were refused.
///
/// Each refused connect makes the kernel send one RST (`TcpOutRsts`, `TcpAttemptFails`).
/// Errors if a connect succeeds: then something listens there and the test is wrong.
pub fn connect_closed_port(addr: SocketAddr, n: usize) -> Result<usize> {
    let mut refused = 0;
    for _ in 0..n {
        match TcpStream::connect(addr) {
            Err(err) if err.kind() == ErrorKind::ConnectionRefused => refused += 1,
            Err(_) => {}
            Ok(stream) => {
                drop(stream);
                bail!("connect to {addr} succeeded: something listens there");
            }
        }
    }
    Ok(refused)
}

/// Connects to `listener` (an unspecified address means loopback) and accepts: (client, server).
pub fn tcp_pair(listener: &TcpListener) -> Result<(TcpStream, TcpStream)> {
    let mut addr = listener.local_addr().context("listener address")?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let client = TcpStream::connect_timeout(&addr, PAIR_TIMEOUT)
        .with_context(|| format!("connect {addr}"))?;
    let client_addr = client.local_addr().context("client address")?;
    let deadline = Instant::now() + PAIR_TIMEOUT;
    let (server, peer) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            // A non-blocking listener: the handshake may not be queued yet.
            Err(err) if err.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(err) => return Err(err).with_context(|| format!("accept on {addr}")),
        }
    };
    if peer != client_addr {
        bail!("accepted {peer} on {addr}, expected our client {client_addr}");
    }
    Ok((client, server))
}
