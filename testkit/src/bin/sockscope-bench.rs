//! `sockscope-bench`: what the agent costs the traffic it watches, measured on this machine.
//!
//! Run by `cargo xtask bench` as `sockscope-bench --agent target/release/sockscope [ARGS]`.
//! Every section creates its own throwaway network namespace and sends only to that
//! namespace's loopback, so it neither depends on nor disturbs the host's network.
//!
//! - `resets`: a bounded reset storm, N connects to a closed port on 127.0.0.1, each refused
//!   by the kernel with an RST, timed in rounds alternating without and with the agent (ABAB,
//!   so drift hits both alike). The probes run in the connecting thread, so their cost shows
//!   as fewer connects/s: the ratio with/without of the medians is the figure (target ≥ 0.97).
//!   Every with-agent round also checks that the agent counted each reset (its `no_socket`
//!   delta = the namespace's `TcpOutRsts` delta = N). Then, with the agent still running and
//!   its maps filled, /metrics latency over K scrapes, and the agent's RSS and CPU time.
//!
//! Benchmarks report, they never fail on a slow machine: the exit status is 1 only when
//! something is broken (the agent does not start, a connect is not refused, counts differ).
//! More sections (listen backlog, TIME_WAIT, socket filters) go in as [`Section`] variants.

#[path = "sockscope-bench/measure.rs"]
mod measure;
#[path = "sockscope-bench/resets.rs"]
mod resets;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};

#[derive(Parser, Debug)]
#[command(about = "Measures what the sockscope agent costs, in throwaway network namespaces")]
struct Args {
    /// The agent binary (target/release/sockscope)
    #[arg(long)]
    agent: PathBuf,
    /// Connects to a closed port per reset-storm round
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    connects: u64,
    /// Reset-storm rounds without the agent, and as many with it
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// /metrics scrapes timed for the latency figures
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    scrapes: u32,
    /// Time limit of each load loop (one storm round, the scrapes), in seconds
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Run only this section (default: every section)
    #[arg(long, value_enum)]
    only: Option<Section>,
}

/// A benchmark section; each is one function that prints its own tables.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Section {
    /// Reset storm without/with the agent, then /metrics latency and the agent's RSS and CPU
    Resets,
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
        "sockscope-bench: Linux {release}, {cpus} CPUs, N = {} connects, R = {} rounds, {} scrapes",
        args.connects, args.rounds, args.scrapes
    );
    let sections = match args.only {
        Some(section) => vec![section],
        None => Section::value_variants().to_vec(),
    };
    let mut broken = Vec::new();
    for section in sections {
        broken.extend(match section {
            Section::Resets => resets::run(args)?,
        });
    }
    Ok(broken)
}
