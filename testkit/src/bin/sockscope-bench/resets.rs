//! Section `resets`: a reset storm without and with the agent, /metrics latency, agent RSS and CPU.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::{AgentHooks, AgentProcess, EmptyPrograms, Metrics, Netns};

use crate::Args;
use crate::measure::{
    agent_hooks, cpu_time, foreign_agents, median, min_max, percentile, print_floor_note,
    print_round_ratios, rss_kib, time,
};

/// Where the agent listens, inside the benchmark's namespace.
const AGENT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9844);
/// A port nothing listens on in a fresh namespace (discard).
const CLOSED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9);
/// Connects of the untimed warm-up storm (at most N).
const WARMUP: u64 = 10_000;
/// The ratio with/without the agent that the reset storm should reach.
const TARGET_RATIO: f64 = 0.97;

/// One timed storm: how many connects were refused, in how long.
#[derive(Debug, Clone, Copy)]
struct Round {
    connects: u64,
    wall: Duration,
}

impl Round {
    fn rate(&self) -> f64 {
        self.connects as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// What a with-agent round saw besides its timing.
struct WithRound {
    round: Round,
    agent_rsts: u64,
    out_rsts: u64,
    cpu: Duration,
}

/// Runs the section and prints its tables; returns what was found broken.
pub fn run(args: &Args) -> Result<Vec<String>> {
    let ns = Netns::new()?;
    let limit = Duration::from_secs(args.timeout);
    storm(&ns, args.connects.min(WARMUP), limit).context("warm-up storm")?;
    let hooks = agent_hooks(&ns, &args.agent, &args.agent_argv(), AGENT_LISTEN)
        .context("the agent's hooks")?;
    let (mut without, mut floor, mut with) = (Vec::new(), Vec::new(), Vec::new());
    let mut foreign = BTreeSet::new();
    let mut kept = None;
    for i in 0..args.rounds {
        // Without, hooks only, with; then with, hooks only, without: drift over the run hits
        // all three alike.
        let agent_first = i % 2 == 1;
        // Stop the last round's agent first: its probes are global.
        drop(kept.take());
        if !agent_first {
            foreign.extend(foreign_agents(None));
            without.push(storm(&ns, args.connects, limit)?);
            floor.push(floor_round(&ns, &hooks, args.connects, limit)?);
        }
        let agent = AgentProcess::start(&ns, &args.agent, &args.agent_argv(), AGENT_LISTEN)?;
        with.push(with_round(&ns, &agent, args.connects, limit)?);
        foreign.extend(foreign_agents(Some(agent.pid())));
        if agent_first {
            drop(agent);
            foreign.extend(foreign_agents(None));
            floor.push(floor_round(&ns, &hooks, args.connects, limit)?);
            without.push(storm(&ns, args.connects, limit)?);
        } else {
            kept = Some(agent);
        }
    }
    if kept.is_none() {
        // The last round ended without the agent: one for the scrapes, its maps filled by
        // an untimed storm as long as a round (so its RSS is taken as late after start-up
        // as in the other case).
        let agent = AgentProcess::start(&ns, &args.agent, &args.agent_argv(), AGENT_LISTEN)?;
        storm(&ns, args.connects, limit).context("storm before the scrapes")?;
        kept = Some(agent);
    }
    // The last agent stays up, its maps filled, for the scrapes.
    let Some(agent) = kept else {
        bail!("no rounds ran");
    };
    let rss_storm = rss_kib(agent.pid())?;
    let broken = print_storm(args, &without, &floor, &with, &foreign);
    print_floor_note(&hooks);
    print_latency(&ns, &agent, args.scrapes, limit)?;
    let cpu: Vec<f64> = (with.iter())
        .map(|w| 100.0 * w.cpu.as_secs_f64() / w.round.wall.as_secs_f64().max(1e-9))
        .collect();
    println!("== agent ==");
    println!(
        "RSS {:.1} MiB after storm, {:.1} MiB after scrapes; CPU during storm {:.1}% of a core",
        rss_storm as f64 / 1024.0,
        rss_kib(agent.pid())? as f64 / 1024.0,
        median(&cpu)
    );
    println!(
        "(median of the rounds; the probes run in the connecting thread: their cost is in the ratio)"
    );
    Ok(broken)
}

/// Prints the storm table and the count check; returns the rounds whose counts differ.
fn print_storm(
    args: &Args,
    without: &[Round],
    floor: &[Round],
    with: &[WithRound],
    foreign: &BTreeSet<u32>,
) -> Vec<String> {
    println!(
        "== reset storm: {} connects to a closed port, {} rounds each (without, hooks only, with; then reversed) ==",
        args.connects, args.rounds
    );
    let rates_without: Vec<f64> = without.iter().map(Round::rate).collect();
    let rates_floor: Vec<f64> = floor.iter().map(Round::rate).collect();
    let rates_with: Vec<f64> = with.iter().map(|w| w.round.rate()).collect();
    println!("{:<17}{:<13}{:<19}(connects/s)", "", "median", "min–max");
    for (label, rates) in [
        ("without agent", &rates_without),
        ("hooks only", &rates_floor),
        ("with agent", &rates_with),
    ] {
        let (lo, hi) = min_max(rates);
        println!("{label:<17}{:<13.0}{lo:.0}–{hi:.0}", median(rates));
    }
    let ratio = median(&rates_with) / median(&rates_without);
    let met = if ratio >= TARGET_RATIO {
        "met"
    } else {
        "not met"
    };
    println!("{:<17}{ratio:<13.3}target ≥ {TARGET_RATIO}: {met}", "ratio");
    print_round_ratios("round ratios", &rates_without, &rates_with, "with/without");
    let ratio_floor = median(&rates_floor) / median(&rates_without);
    println!(
        "{:<17}{ratio_floor:<13.3}the best any programs on these hooks can do here",
        "ratio hooks only"
    );
    print_round_ratios(
        "round ratios",
        &rates_without,
        &rates_floor,
        "hooks only/without",
    );
    let rounds = (without.iter().chain(floor)).chain(with.iter().map(|w| &w.round));
    let truncated = rounds.filter(|r| r.connects < args.connects).count();
    if truncated > 0 {
        println!(
            "{:<17}{truncated} rounds stopped at the {}s limit",
            "", args.timeout
        );
    }
    if !foreign.is_empty() {
        println!(
            "warning: other sockscope agents ran meanwhile (pids {foreign:?}): their probes skew both"
        );
    }
    let broken: Vec<String> = (with.iter().enumerate())
        .filter(|(_, w)| w.agent_rsts != w.out_rsts || w.out_rsts != w.round.connects)
        .map(|(i, w)| {
            format!(
                "round {}: agent counted {} no_socket resets, TcpOutRsts rose by {}, {} connects",
                i + 1,
                w.agent_rsts,
                w.out_rsts,
                w.round.connects
            )
        })
        .collect();
    if broken.is_empty() {
        let (lo, hi) = min_max(&with.iter().map(|w| w.agent_rsts as f64).collect::<Vec<_>>());
        let n = if lo == hi {
            format!("{lo}")
        } else {
            format!("{lo}–{hi}")
        };
        println!(
            "{:<17}exact: agent {n} = OutRsts {n} in every round",
            "counts"
        );
    } else {
        println!("{:<17}INEXACT: {}", "counts", broken.join("; "));
    }
    broken
}

/// Times `k` scrapes of the agent's /metrics (bounded by `limit`) and prints percentiles.
fn print_latency(ns: &Netns, agent: &AgentProcess, k: u32, limit: Duration) -> Result<()> {
    println!("== /metrics latency: {k} scrapes ==");
    let start = Instant::now();
    let (mut times, mut page) = (Vec::new(), 0);
    while times.len() < k as usize && start.elapsed() < limit {
        let (took, (status, body)) = time(|| agent.get("/metrics"))?;
        if status != 200 {
            bail!("/metrics answered {status}: {}", body.trim());
        }
        times.push(took);
        page = body.len();
    }
    let ms = |p: f64| percentile(&times, p).as_secs_f64() * 1e3;
    println!(
        "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  page {page} bytes",
        ms(0.50),
        ms(0.90),
        ms(0.99),
        ms(1.0)
    );
    // What testkit's client adds to each: a thread that enters the namespace.
    let hops = (0..times.len())
        .map(|_| time(|| ns.run(|| ())).map(|(took, ())| took))
        .collect::<Result<Vec<_>>>()?;
    let hop = percentile(&hops, 0.5).as_secs_f64() * 1e3;
    println!(
        "({} timed; each includes a thread + setns into the netns: p50 {hop:.2} ms)",
        times.len()
    );
    Ok(())
}

/// A storm with do-nothing programs on the agent's hooks.
fn floor_round(ns: &Netns, hooks: &AgentHooks, n: u64, limit: Duration) -> Result<Round> {
    let _empty = EmptyPrograms::attach(hooks)?;
    storm(ns, n, limit)
}

/// A storm with the agent attached, with the agent's and the kernel's reset counts around it.
fn with_round(ns: &Netns, agent: &AgentProcess, n: u64, limit: Duration) -> Result<WithRound> {
    // Baselines after start(): its /healthz polling may itself have been refused.
    let netns = ns.inode().to_string();
    let no_socket = |m: &Metrics| {
        m.sum(
            "sockscope_tcp_resets_sent_total",
            &[("netns", &netns), ("reason", "no_socket")],
        )
    };
    let agent0 = no_socket(&agent.scrape()?);
    let out0 = ns.counters()?.get("TcpOutRsts")?;
    let cpu0 = cpu_time(agent.pid())?;
    let round = storm(ns, n, limit)?;
    let cpu = cpu_time(agent.pid())?.saturating_sub(cpu0);
    let out_rsts = ns.counters()?.get("TcpOutRsts")?.saturating_sub(out0);
    let agent_rsts = (no_socket(&agent.scrape()?) - agent0).max(0.0) as u64;
    Ok(WithRound {
        round,
        agent_rsts,
        out_rsts,
        cpu,
    })
}

/// Up to `n` blocking connects to [`CLOSED`] inside `ns`, stopping early after `limit`.
///
/// Timed on the namespace's thread, so the thread's creation and setns are not counted.
/// Each refused connect costs socket(), connect() (the SYN, the kernel's RST) and close().
fn storm(ns: &Netns, n: u64, limit: Duration) -> Result<Round> {
    ns.run(|| -> Result<Round> {
        let start = Instant::now();
        let mut done = 0;
        while done < n {
            match TcpStream::connect(CLOSED) {
                Err(err) if err.kind() == ErrorKind::ConnectionRefused => done += 1,
                Err(err) => return Err(err).context(format!("connect {CLOSED} number {done}")),
                Ok(_) => bail!("connect to {CLOSED} succeeded: something listens there"),
            }
            if done % 1024 == 0 && start.elapsed() >= limit {
                break;
            }
        }
        Ok(Round {
            connects: done,
            wall: start.elapsed(),
        })
    })?
}
