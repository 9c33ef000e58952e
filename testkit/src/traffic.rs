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

/// Which side of a connection closes first, and so how it ends (see [`closed_connections`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstCloser {
    /// The client closes, then the server: the client keeps a TIME_WAIT socket.
    Client,
    /// The server closes, then the client: the server keeps a TIME_WAIT socket, on the
    /// listener's port.
    Server,
    /// The client closes and the server keeps its end open: the client's orphaned FIN_WAIT2
    /// socket becomes a timewait socket in FIN_WAIT2 (while `tcp_fin_timeout` ≤ 60 s). The
    /// server ends are returned; dropping them later moves those to TIME_WAIT.
    ClientOrphan,
}

/// Makes `n` connections to `listener` (blocking) and closes them as `first` says. Returns the
/// server ends left open ([`FirstCloser::ClientOrphan`] only; else empty).
pub fn closed_connections(
    listener: &TcpListener,
    n: usize,
    first: FirstCloser,
) -> Result<Vec<TcpStream>> {
    use std::io::Read as _;
    let mut kept = Vec::new();
    let mut rest = [0u8; 16];
    for _ in 0..n {
        let (client, server) = tcp_pair(listener)?;
        let (closer, mut other) = match first {
            FirstCloser::Server => (server, client),
            FirstCloser::Client | FirstCloser::ClientOrphan => (client, server),
        };
        drop(closer);
        if first == FirstCloser::ClientOrphan {
            kept.push(other);
            continue;
        }
        // Wait for the FIN, so the first closer's close is complete before the second.
        other.set_read_timeout(Some(PAIR_TIMEOUT))?;
        let got = other.read(&mut rest).context("reading the peer's FIN")?;
        if got != 0 {
            bail!("the peer sent data instead of closing");
        }
        drop(other);
    }
    Ok(kept)
}

/// Sets SO_LINGER {on, 0}: closing the socket then sends an RST instead of a FIN.
pub fn set_linger_zero(stream: &TcpStream) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_LINGER: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
