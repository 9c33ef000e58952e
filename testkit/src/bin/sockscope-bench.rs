//! `sockscope-bench`: what the agent costs the traffic it watches, measured on this machine.
//!
//! Run by `cargo xtask bench` as `sockscope-bench --agent target/release/sockscope [ARGS]`.
//! Every section creates its own throwaway network namespaces and sends only inside them
//! (loopback, or a veth pair between two of its own namespaces), so it neither depends on nor
//! disturbs the host's network. Every load loop is bounded in count and in time.
//!
//! - `resets`: a bounded reset storm, N connects to a closed port on 127.0.0.1, each refused
//!   by the kernel with an RST, timed in rounds without the agent, with only programs that
//!   return at once on the agent's hooks ("hooks only", the floor: what the kernel's call
//!   into any program there costs) and with the agent, then in reverse order, so drift hits
//!   all alike. The probes run in the connecting thread, so their cost shows as fewer
//!   connects/s: the ratio with/without of the medians is the figure (target ≥ 0.97).
//!   Every with-agent round also checks that the agent counted each reset (its `no_socket`
//!   delta = the namespace's `TcpOutRsts` delta = N). Then, with the agent still running and
//!   its maps filled, /metrics latency over K scrapes, and the agent's RSS and CPU time.
//! - `churn`: connection churn on loopback, each connection connect + accept + close, timed
//!   in rounds without, hooks only and with the agent, then reversed (target ratio ≥ 0.97),
//!   each round against a new listener; every with-agent round checks the agent's handshake count for the listener
//!   against `TcpPassiveOpens`.
//! - `synflood`: a paced SYN flood from spoofed sources over a veth lab, against a listener
//!   with backlog 128 and `tcp_syncookies=1`, the agent scraped every 10 s meanwhile: its
//!   counts must equal the kernel's (`TCPReqQFullDoCookies`, `ListenDrops`); its CPU over
//!   the flood (target < 2% of a core) and RSS.
//! - `listeners`: 10,000 idle listeners; /metrics latency (target < 100 ms), page size,
//!   series, agent RSS (target < 64 MiB), and series = a + b·listeners.
//! - `peers`: the same measures, side by side in one namespace, for what else runs here:
//!   node_exporter's netstat and sockstat collectors (/metrics with 10,000 listeners), bpftrace
//!   with a tracepoint-only script (its cost on the churn), and bcc's `tcpsynbl` (needs
//!   kprobes). A tool that cannot run here is reported so, with the reason; nothing is faked.
//! - `timewait`: 100,000 TIME_WAIT sockets in one namespace: /metrics latency (target
//!   < 200 ms) and agent RSS (target < 64 MiB), beside node_exporter's sockstat and tcpstat
//!   collectors on the same sockets.
//! - `web`: /metrics latency and size over plain HTTP, gzip, TLS and TLS with basic auth
//!   (the first, uncached bcrypt and the cached ones), one agent reloading its web config.
//! - `filters`: a bounded UDP stream over a veth pair without the agent, with its built-in
//!   TCP segment classifier (`--iface`) and with ten count-only named filters, in rounds
//!   A T B C C B T A, T a packet tap whose filter returns at once (the floor) (target ratio
//!   ≥ 0.95; each stream with filters checks one filter's count,
//!   each series that the receiver dropped nothing); 64-byte datagrams, then a labelled
//!   second series of full-MTU ones; then `sockscope capture` and tcpdump on the same
//!   stream: packets captured, dropped, CPU time.
//!
//! Benchmarks report, they never fail on a slow machine: the exit status is 1 only when
//! something is broken (the agent does not start, a connect is not refused, counts differ).

#[path = "sockscope-bench/churn.rs"]
mod churn;
#[path = "sockscope-bench/filters.rs"]
mod filters;
#[path = "sockscope-bench/listeners.rs"]
mod listeners;
#[path = "sockscope-bench/measure.rs"]
mod measure;
#[path = "sockscope-bench/peers.rs"]
mod peers;
#[path = "sockscope-bench/resets.rs"]
mod resets;
#[path = "sockscope-bench/synflood.rs"]
mod synflood;
#[path = "sockscope-bench/timewait.rs"]
mod timewait;
#[path = "sockscope-bench/web.rs"]
mod web;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

impl Args {
    /// [`Args::agent_args`] as the agent's command line takes them.
    pub fn agent_argv(&self) -> Vec<&str> {
        self.agent_args.iter().map(String::as_str).collect()
    }
}

#[derive(Parser, Debug)]
#[command(about = "Measures what the sockscope agent costs, in throwaway network namespaces")]
pub struct Args {
    /// The agent binary (target/release/sockscope)
    #[arg(long)]
    agent: PathBuf,
    /// Connects to a closed port per reset-storm round
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    connects: u64,
    /// Rounds without the agent, and as many with it (reset storm, churn, peers' churn)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// /metrics scrapes timed after the reset storm
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    scrapes: u32,
    /// Time limit of each load loop (one round, one series of scrapes), in seconds
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Connections (connect + accept + close) per churn round
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    churn_connections: u64,
    /// SYNs per flood (each from a new spoofed source)
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    flood_syns: u64,
    /// Seconds each flood is spread over (sets the rate)
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    flood_seconds: u64,
    /// Floods, one after the other, each against a fresh listener
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    flood_rounds: u32,
    /// Seconds between two scrapes during a flood (as a Prometheus server would)
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    scrape_interval: u64,
    /// Idle listeners of the `listeners` and `peers` sections
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    listeners: u64,
    /// /metrics scrapes timed with the idle listeners (per tool in `peers`)
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    listener_scrapes: u32,
    /// TIME_WAIT sockets of the `timewait` section
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=250_000))]
    time_wait_sockets: u64,
    /// Never install missing peers (node_exporter, bpftrace) with apt-get
    #[arg(long)]
    no_install: bool,
    /// UDP datagrams per stream of the `filters` section (a quarter of it for full-MTU ones)
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    filter_packets: u64,
    /// An argument for the agent of the `resets` and `churn` sections, repeatable (e.g.
    /// `--agent-arg=--no-collector.listen`: what one collector's probes cost; churn then
    /// checks its rounds against `TcpPassiveOpens` only); their floor then has the hooks of
    /// that agent
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Run only these sections, comma-separated (default: every section)
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
}

/// A benchmark section; each is one function that prints its own tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    /// Reset storm without/with the agent, then /metrics latency and the agent's RSS and CPU
    Resets,
    /// Connection churn on loopback without/with the agent
    Churn,
    /// A bounded SYN flood from spoofed sources: exact counts, agent CPU and RSS
    Synflood,
    /// Idle listeners: /metrics latency, page size, series, agent RSS
    Listeners,
    /// node_exporter, bpftrace and bcc's tcpsynbl beside the agent, where they can run
    Peers,
    /// Many TIME_WAIT sockets: /metrics latency and agent RSS, beside node_exporter
    Timewait,
    /// /metrics over plain HTTP, gzip, TLS and TLS with basic auth
    Web,
    /// A packet stream without filters, with the built-in classifier, with ten named
    /// filters; sockscope capture beside tcpdump
    Filters,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(broken) if broken.is_empty() => ExitCode::SUCCESS,
        Ok(broken) => {
            for problem in broken {
                eprintln!("sockscope-bench: broken: {problem}");
            }
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("sockscope-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the selected sections; returns what was found broken (empty when all is well).
fn run(args: &Args) -> Result<Vec<String>> {
    if !args.agent.is_file() {
        bail!("agent binary {} not found", args.agent.display());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "sockscope-bench: Linux {release}, {cpus} CPUs, agent {}, R = {} rounds",
        args.agent.display(),
        args.rounds
    );
    if !args.agent_args.is_empty() {
        println!(
            "agent arguments (resets, churn): {}",
            args.agent_args.join(" ")
        );
    }
    let sections = if args.only.is_empty() {
        Section::value_variants().to_vec()
    } else {
        Section::value_variants()
            .iter()
            .copied()
            .filter(|s| args.only.contains(s))
            .collect()
    };
    let mut broken = Vec::new();
    for section in sections {
        println!();
        let found = match section {
            Section::Resets => resets::run(args),
            Section::Churn => churn::run(args),
            Section::Synflood => synflood::run(args),
            Section::Listeners => listeners::run(args),
            Section::Peers => peers::run(args),
            Section::Timewait => timewait::run(args),
            Section::Web => web::run(args),
            Section::Filters => filters::run(args),
        };
        // One section that cannot run does not keep the others from reporting.
        match found.with_context(|| format!("section {section:?}")) {
            Ok(problems) => broken.extend(problems),
            Err(err) => {
                println!("section {section:?} stopped: {err:#}");
                broken.push(format!("{err:#}"));
            }
        }
    }
    Ok(broken)
}
