//! Socket filters against tcpdump, in throwaway network namespaces joined by a veth pair.
//!
//! A bounded, varied traffic mix (TCP handshakes, data, FIN, RST, UDP, ICMP, IPv6, IPv4 and
//! IPv6 fragments, VLAN-tagged frames) crosses the veth while `sockscope capture` and the
//! agent with one named filter per expression of the corpus watch its end in namespace A,
//! next to one live tcpdump per expression. Then, for every expression, the agent's
//! `sockscope_filter_packets_total` equals the number of packets tcpdump captured with it
//! and `sockscope_filter_bytes_total` their original lengths' sum (a second agent in
//! classic mode counts the same packets); the built-in classifier's segments match what the
//! mix sent; and the file of `sockscope capture` holds the packets tcpdump captured for the
//! same expression, in order, with identical data and original length. tcpdump is a host
//! tool: this test is host-only.
//!
//! Live tcpdump, not `tcpdump -r` of one full capture, is the reference: on Linux the kernel
//! takes a VLAN tag out of the frame before a packet socket's filter runs, so a live `tcp`
//! also matches TCP inside a VLAN tag while the same expression over a file (tag back in the
//! data) does not.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use testkit::{AgentProcess, ChildGuard, Netns, require_root, wait_until};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");
const A_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const B_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const A_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
const B_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);

/// The expressions compared with tcpdump.
const CORPUS: &[&str] = &[
    "tcp",
    "udp",
    "icmp",
    "ip",
    "ip6",
    "arp",
    "host 10.77.0.2",
    "src host 10.77.0.1",
    "dst host fd77::1",
    "net 10.77.0.0/24",
    "net fd77::/64",
    "port 8080",
    "tcp dst port 8080",
    "udp port 5353",
    "portrange 5000-6000",
    "tcp portrange 8000-9000",
    "tcp[tcpflags] & tcp-syn != 0",
    "tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)",
    "tcp[tcpflags] & tcp-rst != 0",
    "tcp[tcpflags] & tcp-fin != 0",
    "ip[6:2] & 0x1fff != 0",
    "ip[6] & 0x20 != 0",
    "len > 1000",
    "less 100",
    "greater 1400",
    "ip6 and tcp",
    "ip6 and udp",
    "icmp6",
    "ip6[6] = 44",
    "vlan",
    "vlan 100",
    "vlan and udp",
    "vlan 200 and tcp",
    "ether[12:2] = 0x0800",
    "udp and not port 53",
    "(tcp and port 8080) or icmp",
    "ip and ip[8] = 64",
    "ether broadcast",
    "not tcp and not udp",
    // Arithmetic: libpcap keeps intermediate values in scratch memory.
    "ip[2:2] - ((ip[0] & 0xf) << 2) > 100",
    "ip[8] + ip[9] > 70",
];

/// What `sockscope capture` captures, compared with tcpdump's selection.
const CAPTURE_EXPR: &str = "tcp or icmp or vlan";

fn tcpdump() -> Option<PathBuf> {
    match which::which("tcpdump") {
        Ok(p) => Some(p),
        Err(_) if ci() => panic!("tcpdump is missing (cargo xtask setup installs it)"),
        Err(_) => {
            eprintln!("skipping: tcpdump is not installed");
            None
        }
    }
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn temp_path(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "sockscope-filters-{}-{n}-{tag}",
        std::process::id()
    ))
}

/// Removes its files on drop.
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `(orig_len, data)` of every packet of a capture file.
fn packets(path: &Path) -> Result<Vec<(u32, Vec<u8>)>> {
    let mut capture =
        pcap::Capture::from_file(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    loop {
        match capture.next_packet() {
            Ok(p) => out.push((p.header.len, p.data.to_vec())),
            Err(pcap::Error::NoMorePackets) => return Ok(out),
            Err(e) => bail!("reading {}: {e}", path.display()),
        }
    }
}

/// Waits until `path` (a process's stderr) contains `needle`.
fn wait_for_text(path: &Path, needle: &str, child: &mut ChildGuard) -> Result<()> {
    wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
        if let Some(status) = child.try_wait()? {
            bail!(
                "exited ({status}): {}",
                std::fs::read_to_string(path).unwrap_or_default()
            );
        }
        Ok(std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)))
    })
}

fn spawn_logged(netns: &Netns, mut cmd: Command, log: &Path) -> Result<ChildGuard> {
    let file = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
    netns.spawn(cmd)
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet broadcast frame with an 802.1Q tag `vid` around an IPv4 packet of `proto`
/// (UDP or a TCP SYN) to an address nobody has.
fn vlan_frame(vid: u16, proto: u8, n: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    if proto == 17 {
        l4.extend_from_slice(&7777u16.to_be_bytes());
        l4.extend_from_slice(&7777u16.to_be_bytes());
        l4.extend_from_slice(&(8u16 + 32).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(&[0x5a; 32]);
    } else {
        l4.extend_from_slice(&(40000 + n).to_be_bytes());
        l4.extend_from_slice(&80u16.to_be_bytes());
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    }
    let total = 20 + l4.len() as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&n.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 64, proto, 0, 0, 10, 99, 0, 2, 10, 99, 0, 1]);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0x77, 0x02, 0x81, 0x00]);
    frame.extend_from_slice(&vid.to_be_bytes());
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame
}

/// A raw socket of `domain`/`protocol`, owned.
fn raw_socket(domain: libc::c_int, protocol: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let raw = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    ensure!(raw >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// sendto(2) of `buf` to the address `addr` (a `sockaddr_*`).
fn send_to_addr<A>(fd: &OwnedFd, buf: &[u8], addr: &A) -> Result<()> {
    // SAFETY: a valid buffer and an address of the size given.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
            (addr as *const A).cast(),
            std::mem::size_of::<A>() as u32,
        )
    };
    ensure!(rc >= 0, "sendto: {}", std::io::Error::last_os_error());
    Ok(())
}

fn send_frames(iface: &str, frames: &[Vec<u8>]) -> Result<()> {
    let ifindex = nix::net::if_::if_nametoindex(iface)?;
    let fd = raw_socket(libc::AF_PACKET, 0)?;
    for frame in frames {
        // SAFETY: zeroed then filled sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        send_to_addr(&fd, frame, &addr)?;
    }
    Ok(())
}

fn icmp_echoes(to: Ipv4Addr, count: u16) -> Result<()> {
    let fd = raw_socket(libc::AF_INET, libc::IPPROTO_ICMP)?;
    for seq in 0..count {
        let mut msg = vec![8, 0, 0, 0, 0x12, 0x34];
        msg.extend_from_slice(&seq.to_be_bytes());
        msg.extend_from_slice(&[0xab; 24]);
        let sum = checksum(&msg);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(to).to_be(),
            },
            sin_zero: [0; 8],
        };
        send_to_addr(&fd, &msg, &addr)?;
    }
    Ok(())
}

fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket and option.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
}

/// The bounded mix, sent from B (whose veth end is `b_iface`) to A's listeners.
fn traffic(b_iface: &str) -> Result<()> {
    let targets = [IpAddr::V4(A_V4), IpAddr::V6(A_V6)];
    for (i, ip) in targets.iter().enumerate() {
        // Handshakes, data both ways and FINs.
        for n in 0..12usize {
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::new(*ip, 8080), Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let data = vec![b'd'; 50 + n * 300 + i * 7];
            s.write_all(&data)?;
            let mut echo = vec![0u8; data.len()];
            s.read_exact(&mut echo)?;
            s.shutdown(std::net::Shutdown::Write)?;
            let _ = s.read(&mut [0u8; 1])?;
        }
        // Aborts: RST instead of FIN.
        for _ in 0..4 {
            let s =
                TcpStream::connect_timeout(&SocketAddr::new(*ip, 8080), Duration::from_secs(5))?;
            set_linger_zero(&s);
        }
        // Refused: SYN answered by RST.
        for _ in 0..5 {
            let _ = TcpStream::connect_timeout(&SocketAddr::new(*ip, 8999), Duration::from_secs(5));
        }
        let bind: SocketAddr = if ip.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let udp = UdpSocket::bind(bind)?;
        for n in 0..30usize {
            udp.send_to(&vec![b'u'; 20 + n * 40], SocketAddr::new(*ip, 5353))?;
        }
        // Closed port: ICMP port unreachable (rate limited by the kernel, seen alike).
        for _ in 0..10 {
            udp.send_to(b"q", SocketAddr::new(*ip, 53))?;
        }
        // Larger than the MTU: fragments.
        for _ in 0..6 {
            udp.send_to(&[b'f'; 4000], SocketAddr::new(*ip, 5353))?;
        }
    }
    icmp_echoes(A_V4, 20)?;
    let mut frames = Vec::new();
    for n in 0..15 {
        frames.push(vlan_frame(100, 17, n));
        frames.push(vlan_frame(200, 6, n));
    }
    send_frames(b_iface, &frames)?;
    Ok(())
}

/// Accepts and echoes on A's 8080 until `stop`.
fn echo_server(listener: TcpListener, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    listener.set_nonblocking(true).expect("nonblocking");
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 8192];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn quiet_ipv6_defaults(ns: &Netns) -> Result<()> {
    // No router solicitations on the new links: nothing but our traffic on the wire.
    ns.sysctl("net/ipv6/conf/default/router_solicitations", "0")?;
    ns.sysctl("net/ipv6/conf/all/router_solicitations", "0")
}

#[test]
fn named_filters_and_capture_match_tcpdump() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let Some(tcpdump) = tcpdump() else {
        return Ok(());
    };
    let a = Netns::new()?;
    let b = Netns::new()?;
    quiet_ipv6_defaults(&a)?;
    quiet_ipv6_defaults(&b)?;
    let veth = a.veth_pair(&b, (IpAddr::V4(A_V4), 24), (IpAddr::V4(B_V4), 24))?;
    a.add_address(&veth.local, IpAddr::V6(A_V6), 64)?;
    b.add_address(&veth.peer, IpAddr::V6(B_V6), 64)?;
    a.wait_ipv6_ready(&veth.local, Duration::from_secs(10))?;
    b.wait_ipv6_ready(&veth.peer, Duration::from_secs(10))?;
    // Let the links' own chatter (MLD reports on joining groups) pass.
    std::thread::sleep(Duration::from_secs(3));

    let mut args: Vec<String> = vec![
        "--no-collector.listen".into(),
        "--no-collector.resets".into(),
        "--no-collector.netstat".into(),
        "--no-collector.sysctl".into(),
        // The listener starts after the agent: watched, its port keeps its label at once.
        "--watch.ports".into(),
        "8080".into(),
        "--iface".into(),
        veth.local.clone(),
    ];
    for (n, expr) in CORPUS.iter().enumerate() {
        args.push("--filter".into());
        args.push(format!("f{n:02}={expr}"));
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = AgentProcess::start(
        &a,
        Path::new(AGENT),
        &arg_refs,
        SocketAddr::from(([127, 0, 0, 1], 9844)),
    )?;

    // The same filters once more, in classic mode (libpcap's program itself, packets only).
    let mut classic_args = arg_refs.clone();
    classic_args.extend(["--filter.mode", "classic"]);
    let classic = AgentProcess::start(
        &a,
        Path::new(AGENT),
        &classic_args,
        SocketAddr::from(([127, 0, 0, 1], 9845)),
    )?;

    // One live tcpdump per expression (the last one for the capture's), each with its own
    // file: what tcpdump captures live is the reference, VLAN offload included.
    let mut files = TempFiles(Vec::new());
    let mut dumps = Vec::new();
    for (n, expr) in CORPUS.iter().chain([&CAPTURE_EXPR]).enumerate() {
        let file = temp_path(&format!("tcpdump-{n}.pcap"));
        let log = temp_path(&format!("tcpdump-{n}.log"));
        files.0.extend([file.clone(), log.clone()]);
        let mut dump = Command::new(&tcpdump);
        dump.args(["-i", &veth.local, "-n", "-s", "0", "-B", "4096", "-w"])
            .arg(&file)
            .arg(expr);
        let mut child = spawn_logged(&a, dump, &log)?;
        wait_for_text(&log, "listening on", &mut child)
            .with_context(|| format!("tcpdump {expr:?}"))?;
        dumps.push((expr, file, log, child));
    }
    let ours = temp_path("sockscope.pcap");
    let capture_log = temp_path("capture.log");
    files.0.extend([ours.clone(), capture_log.clone()]);
    let mut capture = Command::new(AGENT);
    capture
        .args(["capture", "-i", &veth.local, "-w"])
        .arg(&ours)
        .arg(CAPTURE_EXPR);
    let mut capture = spawn_logged(&a, capture, &capture_log)?;
    wait_for_text(&capture_log, "listening on", &mut capture)?;

    let before = agent.scrape()?;
    let classic_before = classic.scrape()?;
    let listener = a.run(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, 8080)))??;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || echo_server(listener, stop))
    };
    let peer = veth.peer.clone();
    let started = Instant::now();
    let sent = b.run(move || traffic(&peer));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
    sent??;
    eprintln!("traffic took {:?}", started.elapsed());
    // Let the last packets reach every socket and libpcap's blocks retire (1 s in tcpdump).
    std::thread::sleep(Duration::from_millis(1500));
    let after = agent.scrape()?;
    let classic_after = classic.scrape()?;
    let capture_status = capture.terminate(Duration::from_secs(10))?;
    let capture_text = std::fs::read_to_string(&capture_log)?;
    ensure!(
        capture_status.success(),
        "sockscope capture: {capture_status}: {capture_text}"
    );
    ensure!(
        capture_text.contains("\n0 packets dropped by kernel"),
        "sockscope capture dropped packets: {capture_text}"
    );

    let mut mismatches = Vec::new();
    let mut nonzero = 0;
    let mut reference = Vec::new();
    for (n, (expr, file, log, mut child)) in dumps.into_iter().enumerate() {
        let status = child.terminate(Duration::from_secs(10))?;
        let text = std::fs::read_to_string(&log)?;
        ensure!(
            text.contains("\n0 packets dropped by kernel"),
            "tcpdump {expr:?} dropped packets ({status}): {text}"
        );
        let captured = packets(&file)?;
        if n == CORPUS.len() {
            reference = captured;
            continue;
        }
        let expected = captured.len() as f64;
        let name = format!("f{n:02}");
        let labels = [("filter", name.as_str())];
        let got = after
            .get("sockscope_filter_packets_total", &labels)
            .unwrap_or(-1.0)
            - before
                .get("sockscope_filter_packets_total", &labels)
                .unwrap_or(0.0);
        let expected_bytes: f64 = captured.iter().map(|(len, _)| f64::from(*len)).sum();
        let got_bytes = after
            .get("sockscope_filter_bytes_total", &labels)
            .unwrap_or(-1.0)
            - before
                .get("sockscope_filter_bytes_total", &labels)
                .unwrap_or(0.0);
        eprintln!(
            "{name} {expr:?}: tcpdump {expected} packets {expected_bytes} bytes, sockscope {got} packets {got_bytes} bytes"
        );
        let got_classic = classic_after
            .get("sockscope_filter_packets_total", &labels)
            .unwrap_or(-1.0)
            - classic_before
                .get("sockscope_filter_packets_total", &labels)
                .unwrap_or(0.0);
        if got_classic != expected {
            mismatches.push(format!(
                "{expr:?}: tcpdump {expected} packets, classic mode {got_classic}"
            ));
        }
        if got != expected || got_bytes != expected_bytes {
            mismatches.push(format!(
                "{expr:?}: tcpdump {expected} packets {expected_bytes} bytes, sockscope {got} packets {got_bytes} bytes"
            ));
        }
        if expected > 0.0 {
            nonzero += 1;
        }
    }
    ensure!(mismatches.is_empty(), "counts differ: {mismatches:#?}");
    ensure!(
        nonzero >= CORPUS.len() - 2,
        "the mix leaves most expressions at 0: {nonzero}"
    );

    // The built-in classifier, against what the mix sent (per family: 16 connections to
    // 8080, 4 of them aborted with an RST, 5 refused on 8999) and the 15 SYNs in VLAN 200.
    let segments = |direction: &str, flags: &str, port: &str| {
        let labels = [
            ("iface", veth.local.as_str()),
            ("direction", direction),
            ("flags", flags),
            ("port", port),
        ];
        after
            .get("sockscope_tcp_segments_total", &labels)
            .unwrap_or(0.0)
            - before
                .get("sockscope_tcp_segments_total", &labels)
                .unwrap_or(0.0)
    };
    for (direction, flags, port, expected) in [
        ("ingress", "syn", "8080", 32.0),
        ("egress", "syn_ack", "8080", 32.0),
        ("ingress", "rst", "8080", 8.0),
        ("ingress", "syn", "other", 25.0),
        ("egress", "rst", "other", 10.0),
    ] {
        let got = segments(direction, flags, port);
        ensure!(
            got == expected,
            "sockscope_tcp_segments_total{{{direction},{flags},{port}}}: {got}, expected {expected}"
        );
    }

    let mine = packets(&ours)?;
    ensure!(!mine.is_empty(), "sockscope capture wrote no packets");
    ensure!(
        mine.len() == reference.len(),
        "sockscope capture holds {} packets, tcpdump {}",
        mine.len(),
        reference.len()
    );
    for (i, (m, t)) in mine.iter().zip(&reference).enumerate() {
        ensure!(m == t, "packet {i} differs: sockscope {m:?}, tcpdump {t:?}");
    }
    Ok(())
}

/// `count` datagrams of `size` bytes to 127.0.0.1:5353 inside `ns`.
fn udp_to_mdns_on_lo(ns: &Netns, count: usize, size: usize) -> Result<()> {
    ns.run(|| -> Result<()> {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        for _ in 0..count {
            udp.send_to(&vec![0u8; size], "127.0.0.1:5353")?;
        }
        Ok(())
    })?
}

fn sockscope(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(AGENT).args(args).output()?)
}

#[test]
fn invalid_expressions_and_missing_interfaces() -> Result<()> {
    let out = sockscope(&["filter", "check", "tcp port"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("`tcp port`") && err.contains("syntax error"),
        "{err}"
    );

    let out = sockscope(&["filter", "check", "--linktype", "EN10MB", "udp port 53"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.starts_with("(000) ldh      [12]"), "{text}");

    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let run = |args: &[&str]| -> Result<std::process::Output> {
        let mut cmd = Command::new(AGENT);
        cmd.args(args).stdin(Stdio::null());
        let child = ns.spawn({
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            cmd
        })?;
        let mut child = child;
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            ensure!(
                Instant::now() < deadline,
                "sockscope did not exit: {args:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let c = child.child_mut();
        let mut stderr = String::new();
        c.stderr
            .take()
            .context("stderr")?
            .read_to_string(&mut stderr)?;
        let status = child.try_wait()?.context("status")?;
        Ok(std::process::Output {
            status,
            stdout: Vec::new(),
            stderr: stderr.into_bytes(),
        })
    };
    // Invalid expression at start-up: libpcap's message with the expression, exit 2.
    let out = run(&[
        "--web.listen-address",
        "127.0.0.1:0",
        "--iface",
        "lo",
        "--filter",
        "ok=tcp",
        "--filter",
        "bad=tcp port",
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("filter `bad`") && err.contains("`tcp port`") && err.contains("syntax error"),
        "{err}"
    );

    // Too large for the kernel: the limit named, exit 2.
    let huge: Vec<String> = (1..2200)
        .map(|i| format!("ether[{}] = {}", i % 1500, i % 251))
        .collect();
    let huge = format!("big={}", huge.join(" or "));
    let out = run(&[
        "--web.listen-address",
        "127.0.0.1:0",
        "--iface",
        "lo",
        "--filter",
        &huge,
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("4096") && err.contains("BPF_MAXINSNS"),
        "{err}"
    );

    // A missing interface for capture: named, exit 1.
    let out = run(&["capture", "-i", "nosuch0", "-c", "1", "tcp"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("`nosuch0` does not exist"), "{err}");

    // A missing interface for the agent: said, and the others keep working.
    let agent = AgentProcess::start(
        &ns,
        Path::new(AGENT),
        &[
            "--no-collector.listen",
            "--no-collector.resets",
            "--iface",
            "nosuch0",
            "--iface",
            "lo",
            "--filter",
            "udp=udp port 5353",
        ],
        SocketAddr::from(([127, 0, 0, 1], 9844)),
    )?;
    udp_to_mdns_on_lo(&ns, 25, 1)?;
    let labels = [("filter", "udp")];
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        Ok(agent
            .scrape()?
            .get("sockscope_filter_packets_total", &labels)
            == Some(25.0))
    })
    .with_context(|| agent.log())?;
    assert!(
        agent.log().contains("`nosuch0` does not exist"),
        "{}",
        agent.log()
    );
    Ok(())
}

/// `-w -` streams to a pipe; when the reader goes away the capture ends cleanly (exit 0,
/// said on stderr), and a device that refuses writes ends it with the reason.
#[test]
fn capture_to_a_pipe_that_closes_and_to_a_full_device() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let mut cmd = Command::new(AGENT);
    cmd.args(["capture", "-i", "lo", "-w", "-", "udp port 5353"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ns.spawn(cmd)?;
    let mut stdout = child.child_mut().stdout.take().context("stdout")?;
    // The pcap file header arrives first, before any packet.
    let mut header = [0u8; 24];
    stdout.read_exact(&mut header)?;
    assert_eq!(
        u32::from_ne_bytes(header[..4].try_into()?),
        0xa1b2_c3d4,
        "a pcap header"
    );
    drop(stdout);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        udp_to_mdns_on_lo(&ns, 50, 200)?;
        if let Some(status) = child.try_wait()? {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "capture did not stop on a closed pipe"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    child
        .child_mut()
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut stderr)?;
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("went away"), "{stderr}");
    assert!(
        stderr.contains("packets captured"),
        "tcpdump's summary: {stderr}"
    );

    let out = ns.run(|| {
        Command::new(AGENT)
            .args(["capture", "-i", "lo", "-w", "/dev/full", "-c", "1", "udp"])
            .output()
    })??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    Ok(())
}

/// An interface that goes away is reported; the filters go on counting on the others.
#[test]
fn a_vanishing_interface_is_reported_and_the_rest_keeps_counting() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let a = Netns::new()?;
    let b = Netns::new()?;
    let veth = a.veth_pair(
        &b,
        (IpAddr::V4(Ipv4Addr::new(10, 79, 0, 1)), 24),
        (IpAddr::V4(Ipv4Addr::new(10, 79, 0, 2)), 24),
    )?;
    let agent = AgentProcess::start(
        &a,
        Path::new(AGENT),
        &[
            "--no-collector.listen",
            "--no-collector.resets",
            "--iface",
            &veth.local,
            "--iface",
            "lo",
            "--filter",
            "udp=udp port 5353",
        ],
        SocketAddr::from(([127, 0, 0, 1], 9844)),
    )?;
    // The peer's namespace goes, and the veth pair with it.
    drop(b);
    let gone = format!("interface `{}` has gone", veth.local);
    wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        agent.scrape()?;
        Ok(agent.log().contains(&gone))
    })
    .with_context(|| agent.log())?;
    let labels = [("filter", "udp")];
    let before = agent
        .scrape()?
        .get("sockscope_filter_packets_total", &labels)
        .context("the filter's series")?;
    udp_to_mdns_on_lo(&a, 30, 1)?;
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        Ok(agent
            .scrape()?
            .get("sockscope_filter_packets_total", &labels)
            == Some(before + 30.0))
    })
    .with_context(|| agent.log())?;
    Ok(())
}
