//! Section `timewait`: many TIME_WAIT sockets in one namespace (default 100,000): /metrics
//! latency (target < 200 ms) and agent RSS (target < 64 MiB), and node_exporter's sockstat and
//! tcpstat collectors on the same sockets.
//!
//! The sockets are made on loopback inside the benchmark's own namespace: clients close first
//! towards a few listeners on 127.0.0.1–127.0.0.4, with `ip_local_port_range` widened to
//! 10000–65535 (above the agent's and node_exporter's ports, which a client's TIME_WAIT
//! socket would otherwise keep from being bound), `tcp_tw_reuse` 0 and `tcp_max_tw_buckets`
//! above the count. A TIME_WAIT socket
//! lives 60 s, so the measures run right after, and the table prints the namespace's
//! sockstat `tw` before and after each tool's scrapes.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::{AgentProcess, FirstCloser, Metrics, Netns, closed_connections};

use crate::Args;
use crate::listeners::AGENT_LISTEN;
use crate::measure::{Served, measure_server, mib, verdict};
use crate::peers::{Found, Installer, node_exporter_scrapes, print_served};

/// Targets of the issue.
const TARGET_P50_MS: f64 = 200.0;
const TARGET_RSS_MIB: f64 = 64.0;
/// Client connections per listener: well inside the 55,536 ports of the widened range.
const PER_LISTENER: u64 = 25_000;

/// Runs the section and prints its table; returns what was found broken.
pub fn run(args: &Args) -> Result<Vec<String>> {
    let n = args.time_wait_sockets;
    let limit = Duration::from_secs(args.timeout);
    let node_exporter = Installer::new(args).node_exporter();
    let ns = Netns::new()?;
    ns.sysctl("net.ipv4.ip_local_port_range", "10000 65535")?;
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0")?;
    ns.sysctl("net.ipv4.tcp_max_tw_buckets", &(n + 10_000).to_string())?;
    let mut broken = Vec::new();

    // Made before the agent starts: its start-up is not in the 60 s the sockets live.
    let started = Instant::now();
    let listeners = n.div_ceil(PER_LISTENER);
    let mut made = 0u64;
    for i in 0..listeners {
        let addr: SocketAddr = format!("127.0.0.{}:8080", i % 250 + 1).parse()?;
        let count = PER_LISTENER.min(n - made);
        ns.run(|| -> Result<()> {
            let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            closed_connections(&listener, count as usize, FirstCloser::Client)?;
            Ok(())
        })??;
        made += count;
        if started.elapsed() > limit {
            bail!("only {made} of {n} TIME_WAIT sockets made within {limit:?}");
        }
    }
    let made_in = started.elapsed();
    let tw = || -> Result<u64> {
        ns.sockstat()?
            .get("TCP", "tw")
            .context("no TCP tw in sockstat")
    };
    let k = args.listener_scrapes;
    let before_agent = tw()?;
    let ours = {
        let agent = AgentProcess::start(&ns, &args.agent, &[], AGENT_LISTEN)?;
        let served = measure_server(&ns, agent.pid(), AGENT_LISTEN, k, limit)?;
        // The figure itself must be right: the gauges' sum is sockstat's tw (± the sockets
        // that expired or the scrapes' own connections added between the two readings).
        let page = Metrics::parse(&served.scrapes.last)?;
        let shown = page.sum(
            "sockscope_tcp_time_wait_sockets",
            &[("netns", &ns.inode().to_string())],
        ) as u64;
        let now = tw()?;
        if shown.abs_diff(now) > 1_000 {
            broken.push(format!(
                "timewait gauge sum {shown} far from sockstat tw {now}"
            ));
        }
        (served, shown)
    };
    let after_agent = tw()?;
    let theirs = match &node_exporter {
        Found::At(bin) => Some(node_exporter_scrapes(
            &ns,
            bin,
            &["sockstat", "tcpstat"],
            k,
            limit,
        )),
        Found::Missing(_) => None,
    };
    let after_node_exporter = tw()?;

    println!(
        "== timewait: {n} TIME_WAIT sockets in one namespace (made in {:.1} s), {k} scrapes each, one tool at a time ==",
        made_in.as_secs_f64()
    );
    println!(
        "{:<46}{:<10}{:<10}{:<10}{:<10}{:<9}{:<20}CPU/scrape",
        "", "p50 ms", "p99 ms", "max ms", "page MB", "series", "RSS (peak) MiB"
    );
    let (served, shown): (Served, u64) = ours;
    print_served("sockscope (timewait and every collector)", &served);
    println!(
        "{:<46}p50 target < {TARGET_P50_MS} ms: {}; RSS target < {TARGET_RSS_MIB} MiB: {}; gauge sum {shown}",
        "",
        verdict(served.scrapes.ms(0.5) < TARGET_P50_MS),
        verdict(mib(served.peak_kib) < TARGET_RSS_MIB),
    );
    match theirs {
        Some(Ok((version, s))) => print_served(&format!("{version} sockstat+tcpstat"), &s),
        Some(Err(err)) => println!("{:<46}could not be measured: {err:#}", "node_exporter"),
        None => println!(
            "{:<46}not measured: {}",
            "node_exporter",
            node_exporter.reason()
        ),
    }
    println!(
        "sockstat tw: {before_agent} before the agent, {after_agent} after it, {after_node_exporter} after node_exporter"
    );
    Ok(broken)
}
