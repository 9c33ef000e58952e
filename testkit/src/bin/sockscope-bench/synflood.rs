//! Section `synflood`: a bounded SYN flood from spoofed sources against a listener whose SYN
//! queue is full, with the agent scraped as Prometheus would: exact counts, its CPU and RSS.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use testkit::{AgentProcess, Counters, Metrics, Netns, SynFloodOptions, VethLab, syn_flood};

use crate::Args;
use crate::listeners::AGENT_LISTEN;
use crate::measure::{
    Rates, cpu_time, median, mib, min_max, peak_rss_kib, percentile, reset_peak_rss, rss_kib, time,
    verdict,
};

/// The listener's backlog: the SYN queue holds this many requests, every later SYN is a cookie.
const BACKLOG: i32 = 128;
/// The agent's CPU over a flood should stay under this share of one core.
const TARGET_CPU_PERCENT: f64 = 2.0;
/// How long the kernel gets to process the last SYNs, and the counts to agree.
const SETTLE: Duration = Duration::from_secs(5);

/// The agent's figures for one namespace, as listen_accuracy compares them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Figures {
    cookies: f64,
    drops: f64,
}

impl Figures {
    fn of(m: &Metrics, netns: &str) -> Figures {
        Figures {
            cookies: m.sum(
                "sockscope_listen_syn_queue_full_total",
                &[("netns", netns), ("action", "cookie")],
            ),
            drops: m.sum("sockscope_listen_drops_total", &[("netns", netns)]),
        }
    }

    fn kernel(delta: &Counters) -> Result<Figures> {
        Ok(Figures {
            cookies: delta.get("TcpExtTCPReqQFullDoCookies")? as f64,
            drops: delta.get("TcpExtListenDrops")? as f64,
        })
    }

    fn minus(self, before: Figures) -> Figures {
        Figures {
            cookies: self.cookies - before.cookies,
            drops: self.drops - before.drops,
        }
    }
}

/// One flood and what came of it.
struct Flood {
    sent: usize,
    wall: Duration,
    /// The agent's CPU time over the flood, scrapes included.
    cpu: Duration,
    /// Scrapes during the flood, and their latency.
    scrapes: Vec<Duration>,
    /// Agent (delta) and kernel (delta) at the same moment, after the flood.
    agent: Figures,
    kernel: Figures,
    syncookies_sent: u64,
    rss_kib: u64,
    peak_kib: u64,
}

/// Runs the section and prints its table; returns what was found broken.
pub fn run(args: &Args) -> Result<Vec<String>> {
    let lab = VethLab::new()?;
    lab.server.sysctl("net.ipv4.tcp_syncookies", "1")?;
    let agent = AgentProcess::start(&lab.server, &args.agent, &[], AGENT_LISTEN)?;
    let count = usize::try_from(args.flood_syns)?;
    let rate = u32::try_from(args.flood_syns.div_ceil(args.flood_seconds))?;
    let mut floods = Vec::new();
    let mut next_flow = 0;
    for _ in 0..args.flood_rounds {
        floods.push(flood(args, &lab, &agent, count, rate, next_flow)?);
        next_flow += count as u64;
    }

    println!(
        "== synflood: {count} SYNs from spoofed sources at {rate}/s over a veth pair, backlog {BACKLOG}, \
         tcp_syncookies=1, scrapes every {} s, {} floods ==",
        args.scrape_interval, args.flood_rounds
    );
    let per = |f: &dyn Fn(&Flood) -> f64| Rates(floods.iter().map(f).collect());
    let sent = per(&|f| f.sent as f64);
    let rates = per(&|f| f.sent as f64 / f.wall.as_secs_f64().max(1e-9));
    let cpu = per(&|f| 100.0 * f.cpu.as_secs_f64() / f.wall.as_secs_f64().max(1e-9));
    let cookies = per(&|f| f.syncookies_sent as f64);
    println!("{:<17}{:<13}min–max", "", "median");
    println!(
        "{:<17}{:<13.0}{}",
        "SYNs sent",
        sent.median(),
        sent.spread()
    );
    println!(
        "{:<17}{:<13.0}{}",
        "SYNs/s achieved",
        rates.median(),
        rates.spread()
    );
    println!(
        "{:<17}{:<13.0}{}",
        "SyncookiesSent",
        cookies.median(),
        cookies.spread()
    );
    let (lo, hi) = min_max(&cpu.0);
    println!(
        "{:<17}{:<13}{lo:.2}–{hi:.2}   target < {TARGET_CPU_PERCENT}% of a core: {}",
        "agent CPU %",
        format!("{:.2}", cpu.median()),
        verdict(cpu.median() < TARGET_CPU_PERCENT)
    );
    let rss: Vec<f64> = floods.iter().map(|f| mib(f.rss_kib)).collect();
    let peak: Vec<f64> = floods.iter().map(|f| mib(f.peak_kib)).collect();
    println!(
        "{:<17}{:<13}peak during the floods {:.1} MiB",
        "agent RSS MiB",
        format!("{:.1}", median(&rss)),
        min_max(&peak).1
    );
    let scrapes: Vec<Duration> = floods.iter().flat_map(|f| f.scrapes.clone()).collect();
    println!(
        "{:<17}{} during the floods, p50 {:.1} ms, max {:.1} ms",
        "scrapes",
        scrapes.len(),
        percentile(&scrapes, 0.5).as_secs_f64() * 1e3,
        percentile(&scrapes, 1.0).as_secs_f64() * 1e3
    );
    println!(
        "{:<17}(utime + stime of the agent over each flood, its scrapes included, in clock ticks \
         of {:.0} ms: {:.2}% of a core over {} s; the probes run in each SYN's softirq, not in it)",
        "",
        tick_ms(),
        tick_ms() / 10.0 / args.flood_seconds as f64,
        args.flood_seconds
    );

    let mut broken = Vec::new();
    for (i, f) in floods.iter().enumerate() {
        println!(
            "{:<17}flood {}: agent cookie {} = TCPReqQFullDoCookies {}, agent drops {} = ListenDrops {}: {}",
            if i == 0 { "counts" } else { "" },
            i + 1,
            f.agent.cookies,
            f.kernel.cookies,
            f.agent.drops,
            f.kernel.drops,
            if f.agent == f.kernel {
                "exact"
            } else {
                "INEXACT"
            }
        );
        if f.agent != f.kernel {
            broken.push(format!(
                "synflood {}: agent {:?}, kernel {:?}",
                i + 1,
                f.agent,
                f.kernel
            ));
        }
        if f.kernel.cookies == 0.0 {
            broken.push(format!(
                "synflood {}: no SYN got a cookie: the flood did not fill the queue",
                i + 1
            ));
        }
    }
    Ok(broken)
}

/// One flood against a fresh listener, the agent scraped every `scrape_interval` meanwhile.
fn flood(
    args: &Args,
    lab: &VethLab,
    agent: &AgentProcess,
    count: usize,
    rate: u32,
    first_flow: u64,
) -> Result<Flood> {
    let server = &lab.server;
    let netns = server.inode().to_string();
    let target = lab
        .server
        .run(|| listen_on(SocketAddr::new(lab.server_ip(false), 0)))??;
    let addr = target
        .local_addr()?
        .as_socket()
        .context("listener address")?;
    let options = SynFloodOptions {
        rate: Some(rate),
        // Paced to take flood_seconds; the limit only guards against a stuck sender.
        time_limit: Duration::from_secs(args.flood_seconds * 2 + 10),
        first_flow,
    };
    let sources = lab.spoofed_sources(false);

    let agent0 = Figures::of(&agent.scrape()?, &netns);
    let kernel0 = server.counters()?;
    reset_peak_rss(agent.pid())?;
    let cpu0 = cpu_time(agent.pid())?;
    let start = Instant::now();
    let interval = Duration::from_secs(args.scrape_interval);
    let (sent, scrapes) = std::thread::scope(|s| -> Result<(usize, Vec<Duration>)> {
        let sender = s.spawn(|| {
            lab.client
                .run(|| syn_flood(addr, &sources, count, &options))
        });
        let mut scrapes = Vec::new();
        let mut next = start;
        while !sender.is_finished() {
            if Instant::now() >= next {
                let (took, m) = time(|| agent.scrape())?;
                drop(m);
                scrapes.push(took);
                next += interval;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let sent = match sender.join() {
            Ok(result) => result??,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        Ok((sent, scrapes))
    })?;
    let wall = start.elapsed();
    let cpu = cpu_time(agent.pid())?.saturating_sub(cpu0);
    let (rss_kib, peak_kib) = (rss_kib(agent.pid())?, peak_rss_kib(agent.pid())?);

    // Every SYN processed before comparing (TcpInSegs counts each one that reached TCP).
    let settled = testkit::wait_until(SETTLE, Duration::from_millis(10), || {
        Ok(server.counters()?.delta(&kernel0).get("TcpInSegs")? >= sent as u64)
    });
    if let Err(err) = settled {
        bail!(
            "{sent} SYNs sent, the server's TCP did not see them all: {err:#}; {:?}",
            server.counters()?.delta(&kernel0)
        );
    }
    let (agent_delta, kernel_delta, syncookies_sent) =
        compare(agent, server, &netns, agent0, &kernel0)?;
    Ok(Flood {
        sent,
        wall,
        cpu,
        scrapes,
        agent: agent_delta,
        kernel: kernel_delta,
        syncookies_sent,
        rss_kib,
        peak_kib,
    })
}

/// The agent's figures and the kernel's, read at the same moment as the accuracy tests do
/// (page first, counters right after), retried until equal for up to [`SETTLE`]: a SYN-ACK
/// retransmission between the two reads can make a passing difference. Returns the last pair.
fn compare(
    agent: &AgentProcess,
    server: &Netns,
    netns: &str,
    agent0: Figures,
    kernel0: &Counters,
) -> Result<(Figures, Figures, u64)> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let got = Figures::of(&agent.scrape()?, netns).minus(agent0);
        let delta = server.counters()?.delta(kernel0);
        let want = Figures::kernel(&delta)?;
        if got == want || Instant::now() >= deadline {
            return Ok((got, want, delta.get("TcpExtSyncookiesSent")?));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A listener on `addr` (port 0: any) with [`BACKLOG`], in the calling thread's namespace.
fn listen_on(addr: SocketAddr) -> Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("socket(SOCK_STREAM)")?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    socket
        .listen(BACKLOG)
        .with_context(|| format!("listen on {addr}"))?;
    Ok(socket)
}

/// Milliseconds per clock tick, the resolution of utime and stime.
fn tick_ms() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1000.0 / (if hz > 0 { hz as f64 } else { 100.0 })
}
