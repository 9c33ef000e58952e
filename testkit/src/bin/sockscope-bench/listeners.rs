//! Section `listeners`: many idle listeners; /metrics latency, page size, series, agent RSS.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use testkit::{AgentProcess, Metrics, Netns};

use crate::Args;
use crate::measure::{measure_server, mib, raise_nofile, verdict, warn_foreign};

/// Where the agent listens, inside the benchmark's namespace.
pub const AGENT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9844);
/// The latency /metrics should stay under.
const TARGET_MS: f64 = 100.0;
/// The RSS the agent should stay under.
const TARGET_MIB: f64 = 64.0;
/// Backlog of each idle listener.
const BACKLOG: i32 = 128;

/// Runs the section and prints its table; returns what was found broken.
pub fn run(args: &Args) -> Result<Vec<String>> {
    let n = args.listeners as usize;
    let limit = Duration::from_secs(args.timeout);
    raise_nofile(args.listeners + 1024)?;
    let ns = Netns::new()?;
    let agent = AgentProcess::start(&ns, &args.agent, &[], AGENT_LISTEN)?;
    let netns = ns.inode().to_string();

    // The series at a few listener counts, for the growth line.
    let mut held = Vec::with_capacity(n);
    let mut growth = Vec::new();
    let mut points = vec![0, n / 10, n];
    points.dedup();
    for &count in &points {
        held.extend(open_listeners(&ns, count - held.len())?);
        let (status, page) = agent.get("/metrics")?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        let m = Metrics::parse(&page).context("parse /metrics")?;
        let ours = m
            .samples()
            .iter()
            .filter(|s| s.label("netns") == Some(netns.as_str()))
            .count();
        growth.push((count, ours));
    }
    let listed = series_of(&agent, &netns)?;

    // The timed scrapes, the peak RSS and the agent's CPU over them alone.
    let served = measure_server(&ns, agent.pid(), AGENT_LISTEN, args.listener_scrapes, limit)?;
    let scrapes = &served.scrapes;
    let k = scrapes.times.len();

    println!("== listeners: {n} idle listeners on 127.0.0.1 in one namespace, {k} scrapes ==");
    println!(
        "{:<12}p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms   target < {TARGET_MS:.0} ms: p50 {}, p99 {}",
        "/metrics",
        scrapes.ms(0.5),
        scrapes.ms(0.9),
        scrapes.ms(0.99),
        scrapes.ms(1.0),
        verdict(scrapes.ms(0.5) < TARGET_MS),
        verdict(scrapes.ms(0.99) < TARGET_MS),
    );
    println!(
        "{:<12}{:.2} MB, {} series ({} of this namespace)",
        "page",
        scrapes.page as f64 / 1e6,
        scrapes.series,
        growth.last().map_or(0, |g| g.1),
    );
    println!(
        "{:<12}RSS {:.1} MiB after the scrapes, peak {:.1} MiB during them   target < {TARGET_MIB:.0} MiB: {}",
        "agent",
        mib(served.rss_kib),
        mib(served.peak_kib),
        verdict(mib(served.peak_kib) < TARGET_MIB),
    );
    println!(
        "{:<12}CPU {:.1} ms per scrape (user + system)",
        "",
        served.cpu_per_scrape.as_secs_f64() * 1e3
    );
    print_growth(&growth);
    warn_foreign(&scrapes.last, ns.inode());

    let mut broken = Vec::new();
    // Every listener has its series, plus the agent's own.
    if listed != n + 1 {
        broken.push(format!(
            "listeners: {listed} sockscope_listen_sockets series for netns {netns}, expected {}",
            n + 1
        ));
    }
    drop(held);
    Ok(broken)
}

/// How many `sockscope_listen_sockets` series the agent shows for `netns`.
fn series_of(agent: &AgentProcess, netns: &str) -> Result<usize> {
    let m = agent.scrape()?;
    Ok(m.series("sockscope_listen_sockets")
        .iter()
        .filter(|s| s.label("netns") == Some(netns))
        .count())
}

/// Prints the series counts and the line through the first and last point.
fn print_growth(growth: &[(usize, usize)]) {
    println!(
        "{:<12}{:<12}series of this namespace",
        "growth", "listeners"
    );
    for (listeners, series) in growth {
        println!("{:<12}{listeners:<12}{series}", "");
    }
    let (Some(&(x0, y0)), Some(&(x1, y1))) = (growth.first(), growth.last()) else {
        return;
    };
    if x1 == x0 {
        return;
    }
    let b = (y1 as f64 - y0 as f64) / (x1 - x0) as f64;
    let a = y0 as f64 - b * x0 as f64;
    let off: Vec<String> = growth[1..growth.len() - 1]
        .iter()
        .map(|&(x, y)| format!("at {x}: {:.0} predicted, {y} seen", a + b * x as f64))
        .collect();
    println!(
        "{:<12}series = {a:.0} + {b:.3}·listeners (through the first and last point{}{})",
        "",
        if off.is_empty() { "" } else { "; " },
        off.join("; ")
    );
}

/// Opens `n` idle listeners on 127.0.0.1 (any port) inside `ns`; they live as long as the
/// sockets returned.
pub fn open_listeners(ns: &Netns, n: usize) -> Result<Vec<Socket>> {
    ns.run(|| -> Result<Vec<Socket>> {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        (0..n)
            .map(|i| {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                    .context("socket(SOCK_STREAM)")?;
                socket
                    .bind(&addr.into())
                    .with_context(|| format!("bind listener {i} to {addr}"))?;
                socket
                    .listen(BACKLOG)
                    .with_context(|| format!("listen {i}"))?;
                Ok(socket)
            })
            .collect()
    })?
}
