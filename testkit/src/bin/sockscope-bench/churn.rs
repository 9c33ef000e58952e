//! Section `churn`: connections opened and closed on loopback, without and with the agent.

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::{AgentHooks, AgentProcess, EmptyPrograms, Metrics, Netns};

use crate::Args;
use crate::listeners::AGENT_LISTEN;
use crate::measure::{
    Rates, agent_hooks, cpu_time, foreign_agents, median, print_floor_note, print_round_ratios,
    verdict,
};

/// The ratio with/without the agent that the churn should reach.
pub const TARGET_RATIO: f64 = 0.97;
/// Connections of the untimed warm-up round (at most N).
const WARMUP: u64 = 5_000;

/// One timed churn round: how many connections, in how long.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    pub connections: u64,
    pub wall: Duration,
}

impl Round {
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// A namespace to churn in, against a listener on 127.0.0.1.
pub struct ChurnLab {
    pub ns: Netns,
}

impl ChurnLab {
    /// A fresh namespace, sized for `total` connections over its life.
    pub fn new(total: u64) -> Result<ChurnLab> {
        let ns = Netns::new()?;
        // The server closes first, so each connection leaves one TIME_WAIT socket on the
        // server's side (the client's ports are free again at once). Room for all of them:
        // past the limit the kernel would skip TIME_WAIT, and later rounds would do less work.
        let buckets = total.saturating_add(total / 4).max(262_144);
        ns.sysctl("net.ipv4.tcp_max_tw_buckets", &buckets.to_string())?;
        Ok(ChurnLab { ns })
    }

    /// A new listener for one round. Every round has its own port: a client port the
    /// earlier rounds left in TIME_WAIT on the same server port would send its SYN to that
    /// timewait socket instead of the listener, more work per connection with every round.
    fn listener(&self) -> Result<TcpListener> {
        Ok(self.ns.run(|| TcpListener::bind("127.0.0.1:0"))??)
    }

    /// Up to `n` connections against a new listener, each connect + accept + close (server
    /// first), stopping early after `limit`.
    pub fn round(&self, n: u64, limit: Duration) -> Result<Round> {
        self.round_on(&self.listener()?, n, limit)
    }

    /// [`ChurnLab::round`] on `listener`. Timed on the namespace's thread (its creation and
    /// setns not counted).
    fn round_on(&self, listener: &TcpListener, n: u64, limit: Duration) -> Result<Round> {
        let addr = listener.local_addr()?;
        self.ns.run(|| -> Result<Round> {
            let start = Instant::now();
            let mut done = 0;
            while done < n {
                let client = TcpStream::connect(addr)
                    .with_context(|| format!("connect {addr} number {done}"))?;
                let (server, peer) = listener
                    .accept()
                    .with_context(|| format!("accept number {done}"))?;
                if Some(peer) != client.local_addr().ok() {
                    bail!("accepted {peer}, not our client: someone else connects");
                }
                drop(server);
                drop(client);
                done += 1;
                if done % 1024 == 0 && start.elapsed() >= limit {
                    break;
                }
            }
            Ok(Round {
                connections: done,
                wall: start.elapsed(),
            })
        })?
    }

    /// The agent's handshake count for `port` in our namespace.
    fn handshakes(&self, m: &Metrics, port: u16) -> f64 {
        let netns = self.ns.inode().to_string();
        let port = port.to_string();
        m.sum(
            "sockscope_listen_handshakes_total",
            &[("netns", &netns), ("port", &port)],
        )
    }

    /// A round with do-nothing programs on the agent's hooks.
    pub fn floor_round(&self, hooks: &AgentHooks, n: u64, limit: Duration) -> Result<Round> {
        let _empty = EmptyPrograms::attach(hooks)?;
        self.round(n, limit)
    }

    /// A round with the agent running, checked: the agent's handshake delta for the
    /// listener and the namespace's `TcpPassiveOpens` delta must both equal the connections.
    /// `listen_expected` is false when the agent was told `--no-collector.listen`: then only
    /// `TcpPassiveOpens` is compared (otherwise a missing collector counts 0, a mismatch).
    pub fn checked_round(
        &self,
        agent: &AgentProcess,
        n: u64,
        limit: Duration,
        listen_expected: bool,
    ) -> Result<Checked> {
        let listener = self.listener()?;
        let port = listener.local_addr()?.port();
        let agent0 = self.handshakes(&agent.scrape()?, port);
        let opens0 = self.ns.counters()?.get("TcpPassiveOpens")?;
        let cpu0 = cpu_time(agent.pid())?;
        let round = self.round_on(&listener, n, limit)?;
        let cpu = cpu_time(agent.pid())?.saturating_sub(cpu0);
        let opens = self.ns.counters()?.get("TcpPassiveOpens")? - opens0;
        let counted = listen_expected
            .then(|| agent.scrape())
            .transpose()?
            .map(|m| (self.handshakes(&m, port) - agent0).max(0.0) as u64);
        Ok(Checked {
            round,
            counted,
            opens,
            cpu,
        })
    }
}

/// A with-agent round and what was counted in it.
pub struct Checked {
    pub round: Round,
    /// The agent's handshakes for the listener; `None` under `--no-collector.listen`.
    pub counted: Option<u64>,
    /// The namespace's `TcpPassiveOpens` delta (our scrapes are not in the round).
    pub opens: u64,
    /// The agent's CPU time during the round.
    pub cpu: Duration,
}

impl Checked {
    /// A description of the mismatch, if the counts are not all equal to the connections.
    pub fn mismatch(&self, who: &str, i: usize) -> Option<String> {
        let n = self.round.connections;
        let counted = self.counted.map_or_else(
            || "handshakes not compared (--no-collector.listen)".to_owned(),
            |c| format!("{c} handshakes counted"),
        );
        (self.counted.is_some_and(|c| c != n) || self.opens != n).then(|| {
            format!(
                "{who} round {}: {counted}, TcpPassiveOpens rose by {}, {n} connections",
                i + 1,
                self.opens
            )
        })
    }
}

/// Runs the section and prints its table; returns what was found broken.
pub fn run(args: &Args) -> Result<Vec<String>> {
    let n = args.churn_connections;
    let limit = Duration::from_secs(args.timeout);
    let lab = ChurnLab::new(n * (3 * u64::from(args.rounds) + 1))?;
    lab.round(n.min(WARMUP), limit).context("warm-up churn")?;
    let hooks = agent_hooks(&lab.ns, &args.agent, &args.agent_argv(), AGENT_LISTEN)
        .context("the agent's hooks")?;
    let listen_expected = !args.agent_args.iter().any(|a| a == "--no-collector.listen");
    let (mut without, mut floor, mut with) = (Vec::new(), Vec::new(), Vec::new());
    let mut foreign = BTreeSet::new();
    for i in 0..args.rounds {
        // Without, hooks only, with; then with, hooks only, without: drift over the run (the
        // namespace's timewait table grows) hits all three alike.
        let agent_first = i % 2 == 1;
        if !agent_first {
            foreign.extend(foreign_agents(None));
            without.push(lab.round(n, limit)?);
            floor.push(lab.floor_round(&hooks, n, limit)?);
        }
        {
            // Stopped at the end of this block: a "without" round has no probes.
            let agent =
                AgentProcess::start(&lab.ns, &args.agent, &args.agent_argv(), AGENT_LISTEN)?;
            with.push(lab.checked_round(&agent, n, limit, listen_expected)?);
            foreign.extend(foreign_agents(Some(agent.pid())));
        }
        if agent_first {
            foreign.extend(foreign_agents(None));
            floor.push(lab.floor_round(&hooks, n, limit)?);
            without.push(lab.round(n, limit)?);
        }
    }

    println!(
        "== churn: {n} connections (connect + accept + close) on loopback, {} rounds each \
         (without, hooks only, with; then reversed) ==",
        args.rounds
    );
    let rates_without = Rates(without.iter().map(Round::rate).collect());
    let rates_floor = Rates(floor.iter().map(Round::rate).collect());
    let rates_with = Rates(with.iter().map(|w| w.round.rate()).collect());
    println!("{:<17}{:<13}{:<19}(connections/s)", "", "median", "min–max");
    for (label, rates) in [
        ("without agent", &rates_without),
        ("hooks only", &rates_floor),
        ("with agent", &rates_with),
    ] {
        println!("{label:<17}{:<13.0}{}", rates.median(), rates.spread());
    }
    let ratio = rates_with.median() / rates_without.median();
    println!(
        "{:<17}{ratio:<13.3}target ≥ {TARGET_RATIO}: {}",
        "ratio",
        verdict(ratio >= TARGET_RATIO)
    );
    print_round_ratios(
        "round ratios",
        &rates_without.0,
        &rates_with.0,
        "with/without",
    );
    let ratio_floor = rates_floor.median() / rates_without.median();
    println!(
        "{:<17}{ratio_floor:<13.3}the best any programs on these hooks can do here",
        "ratio hooks only"
    );
    print_round_ratios(
        "round ratios",
        &rates_without.0,
        &rates_floor.0,
        "hooks only/without",
    );
    print_floor_note(&hooks);
    let rounds = (without.iter().chain(&floor)).chain(with.iter().map(|w| &w.round));
    let truncated = rounds.filter(|r| r.connections < n).count();
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
    let cpu: Vec<f64> = (with.iter())
        .map(|w| 100.0 * w.cpu.as_secs_f64() / w.round.wall.as_secs_f64().max(1e-9))
        .collect();
    println!(
        "{:<17}{:.1}% of a core during the rounds (median; the probes' cost is in the ratio)",
        "agent CPU",
        median(&cpu)
    );
    let broken: Vec<String> = (with.iter().enumerate())
        .filter_map(|(i, w)| w.mismatch("churn", i))
        .collect();
    if broken.is_empty() && !listen_expected {
        println!(
            "{:<17}exact: TcpPassiveOpens = connections in every round (the agent's listen \
             collector is off: no handshakes to compare)",
            "counts"
        );
    } else if broken.is_empty() {
        println!(
            "{:<17}exact: handshakes counted = TcpPassiveOpens = connections in every round",
            "counts"
        );
    } else {
        println!("{:<17}INEXACT: {}", "counts", broken.join("; "));
    }
    Ok(broken)
}
