//! Section `filters`: what socket filters cost a packet stream, and `sockscope capture` beside
//! tcpdump.
//!
//! A bounded stream of small UDP datagrams crosses a veth pair from namespace B to A. veth
//! delivers in the sender's context, so every packet tap on A's end (the agent's packet
//! sockets, a capture) slows the sender down: datagrams sent per second is the figure. Each
//! round streams without the agent (A), with only the built-in TCP segment classifier
//! (`--iface`, B) and with it and ten count-only named filters (C), in the order A T B C C B
//! T A, so that a drift of the machine's speed hits all alike; T is the floor, a packet socket
//! on the interface whose socket filter returns at once (what any tap costs, before its
//! filter does any work); a configuration's rate in the round is the mean of its two streams.
//! The receiver's buffer is raised far above what a stream leaves queued between two drains
//! (SO_RCVBUFFORCE), so no datagram is dropped at
//! the socket (a drop would run the kernel's drop tracepoints, which the agent's other probes
//! watch): `UdpRcvbufErrors` in A's namespace is checked to stay 0. Every with-filter stream
//! checks that the filter `udp_stream` counted each datagram. A second, shorter series does
//! the same with datagrams of a full 1500-byte MTU, labelled so. Then `sockscope capture`
//! and tcpdump each capture one stream (`-w /dev/null`): packets captured, dropped, CPU time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::{AgentProcess, ChildGuard, EmptyTap, Netns, wait_until};

use crate::Args;
use crate::listeners::AGENT_LISTEN;
use crate::measure::{Rates, cpu_time, verdict};

/// The ratio with/without that the filters should reach.
const TARGET_RATIO: f64 = 0.95;
const A: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const PORT: u16 = 7000;
const PAYLOAD: usize = 64;
/// The payload of a datagram that fills a 1500-byte MTU (IPv4 and UDP headers: 28 bytes).
const MTU_PAYLOAD: usize = 1472;
/// The receiver's buffer: far above the datagrams queued between two drains.
const RCVBUF: libc::c_int = 32 << 20;

/// Ten count-only filters of the kinds people name.
const TEN: &[&str] = &[
    "udp_stream=udp dst port 7000",
    "syn=tcp[tcpflags] & tcp-syn != 0",
    "rst=tcp[tcpflags] & tcp-rst != 0",
    "http=tcp port 80 or tcp port 443",
    "dns=udp port 53",
    "icmp=icmp or icmp6",
    "big=greater 1200",
    "v6=ip6",
    "net=net 192.0.2.0/24",
    "frag=ip[6:2] & 0x3fff != 0",
];

struct Lab {
    a: Netns,
    b: Netns,
    iface: String,
    receiver: UdpSocket,
}

impl Lab {
    fn new() -> Result<Lab> {
        let a = Netns::new()?;
        let b = Netns::new()?;
        let pair = a.veth_pair(&b, (IpAddr::V4(A), 24), (IpAddr::V4(B), 24))?;
        let receiver = a.run(|| UdpSocket::bind(SocketAddr::new(IpAddr::V4(A), PORT)))??;
        receiver.set_nonblocking(true)?;
        // SO_RCVBUFFORCE: past the rmem_max limit (root).
        // SAFETY: an int option of the size given, on a socket we own.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&receiver),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&RCVBUF as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("SO_RCVBUFFORCE on the receiver");
        }
        Ok(Lab {
            a,
            b,
            iface: pair.local,
            receiver,
        })
    }

    /// Sends up to `n` datagrams of `size` bytes (stopping after `limit`); returns how many
    /// and how long.
    fn stream(&self, n: u64, size: usize, limit: Duration) -> Result<(u64, Duration)> {
        let result = self.b.run(|| -> Result<(u64, Duration)> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(SocketAddr::new(IpAddr::V4(A), PORT))?;
            let payload = vec![0x5au8; size];
            let start = Instant::now();
            let mut sent = 0;
            while sent < n {
                socket.send(&payload)?;
                sent += 1;
                if sent % 1024 == 0 {
                    self.drain();
                    if start.elapsed() >= limit {
                        break;
                    }
                }
            }
            Ok((sent, start.elapsed()))
        })??;
        self.drain();
        Ok(result)
    }

    /// Empties the receiver, so that its buffer never drops.
    fn drain(&self) {
        let mut buf = [0u8; 2048];
        while self.receiver.recv(&mut buf).is_ok() {}
    }

    /// Datagrams A's namespace dropped for want of receive buffer, so far.
    fn rcvbuf_errors(&self) -> Result<u64> {
        self.a.counters()?.get("UdpRcvbufErrors")
    }
}

/// The three configurations compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    NoAgent,
    /// A packet socket on the interface with a filter that returns at once: the floor.
    Tap,
    Classifier,
    TenFilters,
}

/// Rates per configuration of one series, and what went wrong.
struct Series {
    none: Vec<f64>,
    tap: Vec<f64>,
    builtin: Vec<f64>,
    ten: Vec<f64>,
    /// `UdpRcvbufErrors` over the series.
    receiver_drops: u64,
}

/// One series of `rounds` rounds of `n` datagrams of `size` bytes, each round A T B C C B T A
/// (T: the empty tap).
fn series(args: &Args, lab: &Lab, n: u64, size: usize, broken: &mut Vec<String>) -> Result<Series> {
    let limit = Duration::from_secs(args.timeout);
    lab.stream(n.min(20_000), size, limit)?; // warm-up
    let drops_before = lab.rcvbuf_errors()?;
    let mut out = Series {
        none: Vec::new(),
        tap: Vec::new(),
        builtin: Vec::new(),
        ten: Vec::new(),
        receiver_drops: 0,
    };
    use Config::*;
    for round in 0..args.rounds {
        let mut rates: Vec<(Config, f64)> = Vec::new();
        for config in [
            NoAgent, Tap, Classifier, TenFilters, TenFilters, Classifier, Tap, NoAgent,
        ] {
            let rate = match config {
                NoAgent => {
                    let (sent, wall) = lab.stream(n, size, limit)?;
                    sent as f64 / wall.as_secs_f64()
                }
                Tap => {
                    let _tap = lab.a.run(|| EmptyTap::open(&lab.iface))??;
                    let (sent, wall) = lab.stream(n, size, limit)?;
                    sent as f64 / wall.as_secs_f64()
                }
                _ => {
                    let with_ten = config == TenFilters;
                    let argv = agent_args(&lab.iface, with_ten);
                    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                    let agent = AgentProcess::start(&lab.a, &args.agent, &argv, AGENT_LISTEN)?;
                    let before = agent.scrape()?;
                    let (sent, wall) = lab.stream(n, size, limit)?;
                    if with_ten {
                        let labels = [("filter", "udp_stream")];
                        let counted =
                            wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
                                let after = agent.scrape()?;
                                Ok(after
                                    .get("sockscope_filter_packets_total", &labels)
                                    .unwrap_or(0.0)
                                    - before
                                        .get("sockscope_filter_packets_total", &labels)
                                        .unwrap_or(0.0)
                                    == sent as f64)
                            });
                        if counted.is_err() {
                            broken.push(format!(
                                "{size}-byte round {round}: the filter udp_stream did not count the {sent} datagrams sent"
                            ));
                        }
                    }
                    sent as f64 / wall.as_secs_f64()
                }
            };
            rates.push((config, rate));
        }
        let mean = |c: Config| {
            let of: Vec<f64> = rates.iter().filter(|r| r.0 == c).map(|r| r.1).collect();
            of.iter().sum::<f64>() / of.len() as f64
        };
        out.none.push(mean(NoAgent));
        out.tap.push(mean(Tap));
        out.builtin.push(mean(Classifier));
        out.ten.push(mean(TenFilters));
    }
    out.receiver_drops = lab.rcvbuf_errors()? - drops_before;
    if out.receiver_drops != 0 {
        broken.push(format!(
            "the receiver dropped {} datagrams of {size} bytes (UdpRcvbufErrors)",
            out.receiver_drops
        ));
    }
    Ok(out)
}

fn print_series(s: Series) {
    let (none, tap) = (Rates(s.none), Rates(s.tap));
    let (builtin, ten) = (Rates(s.builtin), Rates(s.ten));
    println!("{:<34}{:<13}{:<19}(datagrams/s)", "", "median", "min–max");
    for (label, rates) in [
        ("no filter", &none),
        ("packet tap, empty filter", &tap),
        ("built-in classifier (--iface)", &builtin),
        ("classifier + ten named filters", &ten),
    ] {
        println!("{label:<34}{:<13.0}{}", rates.median(), rates.spread());
    }
    for (label, rates) in [
        ("built-in classifier", &builtin),
        ("+ ten named filters", &ten),
    ] {
        let ratio = rates.median() / none.median();
        println!(
            "ratio {label:<28}{ratio:.3} (target ≥ {TARGET_RATIO}: {})",
            verdict(ratio >= TARGET_RATIO)
        );
    }
    println!(
        "ratio {:<28}{:.3} (the best any socket filter can do here)",
        "packet tap, empty filter",
        tap.median() / none.median()
    );
    println!(
        "receiver drops (UdpRcvbufErrors in the receiving namespace): {}",
        s.receiver_drops
    );
}

fn agent_args(iface: &str, ten: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--no-collector.listen",
        "--no-collector.resets",
        "--no-collector.netstat",
        "--no-collector.sysctl",
        "--iface",
        iface,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    if ten {
        for f in TEN {
            args.push("--filter".into());
            args.push((*f).into());
        }
    }
    args
}

pub fn run(args: &Args) -> Result<Vec<String>> {
    let mut broken = Vec::new();
    let lab = Lab::new()?;
    let limit = Duration::from_secs(args.timeout);
    let n = args.filter_packets;
    println!(
        "filters: {n} UDP datagrams of {PAYLOAD} bytes per stream over a veth pair, {} rounds of A T B C C B T A \
         (A no agent, T a packet tap whose filter returns at once, B classifier, C classifier + ten filters)",
        args.rounds
    );
    let small = series(args, &lab, n, PAYLOAD, &mut broken)?;
    print_series(small);
    let n_mtu = (n / 4).max(1);
    println!();
    println!(
        "the same with full-MTU datagrams ({MTU_PAYLOAD} bytes of payload, {n_mtu} per stream): \
         fewer packets per byte, a second view, not the target's"
    );
    let mtu = series(args, &lab, n_mtu, MTU_PAYLOAD, &mut broken)?;
    print_series(mtu);
    println!();
    println!("capture of the same stream (expression `udp dst port {PORT}`, -w /dev/null):");
    println!(
        "{:<20}{:>10}{:>10}{:>10}{:>12}{:>14}",
        "", "sent", "captured", "dropped", "drop rate", "CPU (ms)"
    );
    let expr = format!("udp dst port {PORT}");
    let ours = {
        let mut cmd = Command::new(&args.agent);
        cmd.args(["capture", "-i", &lab.iface, "-w", "/dev/null", &expr]);
        capture_round(&lab, cmd, n, limit)?
    };
    print_capture("sockscope capture", &ours);
    let tcpdump = Command::new("tcpdump")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match tcpdump {
        Ok(status) if status.success() => {
            let mut cmd = Command::new("tcpdump");
            cmd.args(["-i", &lab.iface, "-n", "-w", "/dev/null", &expr]);
            let theirs = capture_round(&lab, cmd, n, limit)?;
            print_capture("tcpdump", &theirs);
        }
        _ => println!("{:<20}not installed here", "tcpdump"),
    }
    println!("(one run on a shared machine: figures are noisy)");
    Ok(broken)
}

struct CaptureResult {
    sent: u64,
    captured: u64,
    dropped: u64,
    cpu: Duration,
}

fn print_capture(label: &str, r: &CaptureResult) {
    let rate = r.dropped as f64 / (r.captured + r.dropped).max(1) as f64;
    println!(
        "{label:<20}{:>10}{:>10}{:>10}{:>11.2}%{:>14.0}",
        r.sent,
        r.captured,
        r.dropped,
        rate * 100.0,
        r.cpu.as_secs_f64() * 1e3
    );
}

/// Runs a capture tool over one stream and reads its summary (tcpdump's lines, which
/// `sockscope capture` prints alike).
fn capture_round(lab: &Lab, mut cmd: Command, n: u64, limit: Duration) -> Result<CaptureResult> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let log = std::env::temp_dir().join(format!(
        "sockscope-bench-capture-{}-{}.log",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let result = (|| {
        let mut child = lab.a.spawn(cmd)?;
        wait_listening(&log, &mut child)?;
        let (sent, _) = lab.stream(n, PAYLOAD, limit)?;
        std::thread::sleep(Duration::from_millis(1500));
        let cpu = cpu_time(child.pid())?;
        child.terminate(Duration::from_secs(10))?;
        let text = std::fs::read_to_string(&log)?;
        let field = |suffix: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_suffix(suffix).and_then(|n| n.trim().parse().ok()))
                .with_context(|| format!("no `{suffix}` in: {text}"))
        };
        Ok(CaptureResult {
            sent,
            captured: field(" packets captured")?,
            dropped: field(" packets dropped by kernel")?,
            cpu,
        })
    })();
    let _ = std::fs::remove_file(&log);
    result
}

fn wait_listening(log: &Path, child: &mut ChildGuard) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::fs::read_to_string(log).is_ok_and(|s| s.contains("listening on")) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "capture exited: {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() >= deadline {
            bail!("capture did not start listening");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
