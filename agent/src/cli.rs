//! Command line: node_exporter-style flags (`--web.listen-address`, `--collector.<name>` /
//! `--no-collector.<name>`).

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, str::FromStr};

use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Parser, Subcommand};

/// The collectors that can be switched on and off, with what they read.
pub const COLLECTORS: &[(&str, &str)] = &[
    (
        "resets",
        "TCP resets sent and received, by reason, state and port (eBPF tracepoints)",
    ),
    (
        "listen",
        "per-listener accept and SYN queues, drops and listen-overflow events, in every network namespace (sock_diag; eBPF)",
    ),
    (
        "netstat",
        "the kernel's TCP counters of the agent's network namespace and of every one with a listener (/proc/net/snmp, netstat)",
    ),
    (
        "sysctl",
        "the TCP settings of the agent's network namespace and of every one with a listener (/proc/sys/net)",
    ),
    (
        "timewait",
        "timewait sockets per port and per remote endpoint, and TIME_WAIT entries per port, in every network namespace (sock_diag; eBPF)",
    ),
];

/// sockscope: what the kernel's TCP stack does to connections at the listen backlog.
#[derive(Debug, Parser)]
#[command(name = "sockscope", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `run`, also accepted without the subcommand.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the probes and serve Prometheus metrics (the default).
    Run(RunArgs),
    /// Say, feature by feature, what this kernel and these privileges allow.
    Check(CheckArgs),
    /// Show every TCP listener with its queues, its drops during an interval and a diagnosis.
    Listeners(ListenersArgs),
    /// Show the remote endpoints with the most TIME_WAIT sockets against the ephemeral ports
    /// available to them, in every network namespace.
    Timewait(TimewaitArgs),
    /// Read a password from standard input and print its bcrypt hash for basic_auth_users.
    HashPassword(HashPasswordArgs),
    /// tcpdump expressions: compile and try them (`sockscope filter check`).
    #[command(subcommand)]
    Filter(crate::filters::FilterCommand),
    /// Capture the packets a tcpdump expression matches to a pcap file (or stdout).
    Capture(crate::filters::capture::CaptureArgs),
}

/// Options of `sockscope timewait`.
#[derive(Clone, Debug, Args)]
pub struct TimewaitArgs {
    /// Endpoints shown per network namespace.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Options of `sockscope hash-password`.
#[derive(Clone, Debug, Args)]
pub struct HashPasswordArgs {
    /// bcrypt cost: each step doubles the time of a check (10 takes tens of milliseconds;
    /// the agent checks each user and password once, then caches the outcome).
    #[arg(long, value_name = "COST", default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=31))]
    pub cost: u32,
}

/// Options of `sockscope run`.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// TOML file holding any of these flags, keyed by flag name (`"watch.ports" = [80]`);
    /// flags given here win over it. SIGHUP reads it again (see README, "Config file").
    #[arg(long = "config.file", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// Address to serve metrics on: `host:port`, `[v6]:port`, or `:port` for every address.
    #[arg(
        long = "web.listen-address",
        value_name = "ADDR",
        default_value = ":9844"
    )]
    pub listen_address: ListenAddress,
    /// Web configuration (TLS, client certificates, basic auth, response headers) in the
    /// Prometheus exporter-toolkit format; re-read when it or a file it names changes.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,
    /// Requests handled at once; further requests get 503 until one ends.
    #[arg(long = "web.max-requests", value_name = "N", default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub web_max_requests: u32,
    /// Connections open at once; further connections are closed at once.
    #[arg(long = "web.max-connections", value_name = "N", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub web_max_connections: u32,
    /// Log level (error, warn, info, debug, trace); RUST_LOG, when set, takes precedence.
    #[arg(long = "log.level", value_name = "LEVEL", default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: String,
    /// Ports whose `port` label is never folded into `other`, comma separated.
    #[arg(long = "watch.ports", value_name = "PORTS", value_delimiter = ',')]
    pub watch_ports: Vec<u16>,
    /// Series with their own port label allowed per metric and network namespace; further
    /// label sets are folded into `other` and counted in sockscope_label_overflow_total.
    #[arg(
        long = "limit.series-per-metric",
        value_name = "N",
        default_value_t = 2000
    )]
    pub series_limit: usize,
    /// Seconds between refreshes of the listener ports that keep their `port` label (new
    /// listeners are seen at once by the kernel; the refresh prunes closed ones).
    #[arg(long = "listeners.refresh-interval", value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub refresh_seconds: u64,
    /// Remote endpoints per network namespace in sockscope_tcp_time_wait_peer_sockets (the
    /// ones with the most timewait sockets).
    #[arg(
        long = "collector.timewait.top-peers",
        value_name = "N",
        default_value_t = 20
    )]
    pub timewait_top_peers: usize,
    /// Where the kernel's interfaces are.
    #[command(flatten)]
    pub paths: PathArgs,
    /// Which collectors run.
    #[command(flatten)]
    pub collectors: CollectorFlags,
    /// Socket filters on interfaces.
    #[command(flatten)]
    pub filters: crate::filters::FilterArgs,
}

/// Options of `sockscope check`.
#[derive(Clone, Debug, Args)]
pub struct CheckArgs {
    /// Where the kernel's interfaces are.
    #[command(flatten)]
    pub paths: PathArgs,
}

/// Options of `sockscope listeners`.
#[derive(Clone, Debug, Args)]
pub struct ListenersArgs {
    /// How long to measure: `5s`, `500ms`, `2m`, or seconds (`5`); the queues are sampled
    /// every 100 ms meanwhile (every second with --agent).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = crate::listeners_cmd::parse_interval)]
    pub interval: std::time::Duration,
    /// Measure again after every interval and redraw, until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// Print one JSON document per interval (one per line) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Read a running agent's page (`http://host:9844`) instead of the kernel.
    #[arg(long, value_name = "URL", value_parser = crate::listeners_cmd::agent::AgentUrl::parse)]
    pub agent: Option<crate::listeners_cmd::agent::AgentUrl>,
    /// Where the kernel's interfaces are (without --agent).
    #[command(flatten)]
    pub paths: PathArgs,
}

/// `--path.*`: where the kernel's interfaces are mounted, when not where the agent looks.
#[derive(Clone, Debug, Args)]
pub struct PathArgs {
    /// tracefs mount point; found (or mounted) automatically when not given.
    #[arg(long = "path.tracefs", value_name = "DIR")]
    pub tracefs: Option<PathBuf>,
    /// Root of the cgroup v2 hierarchy; found in /proc/self/mountinfo when not given (in a
    /// container, mount the host's and name it here).
    #[arg(long = "path.cgroup2", value_name = "DIR")]
    pub cgroup2: Option<PathBuf>,
    /// Which hooks the probes may use: `auto` takes the cheapest the kernel offers and falls
    /// back to the next; the others force one kind (to prove each path on a kernel).
    #[arg(long = "probe.mode", value_enum, default_value_t = crate::probes::ProbeMode::Auto)]
    pub probe_mode: crate::probes::ProbeMode,
}

impl PathArgs {
    /// As the probes take them.
    pub fn to_paths(&self) -> crate::probes::Paths {
        crate::probes::Paths {
            tracefs: self.tracefs.clone(),
            cgroup2: self.cgroup2.clone(),
        }
    }
}

/// `--web.listen-address`: an address, or only a port for every address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    /// `host:port`.
    Addr(SocketAddr),
    /// `:port`: IPv6 and IPv4 on every address.
    AnyAddr(u16),
}

impl FromStr for ListenAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(port) = s.strip_prefix(':') {
            return port
                .parse()
                .map(Self::AnyAddr)
                .map_err(|_| format!("`{s}`: the port must be a number from 0 to 65535"));
        }
        if let Some(port) = s.strip_prefix("localhost:") {
            let port: u16 = port.parse().map_err(|_| format!("`{s}`: bad port"))?;
            return Ok(Self::Addr(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        s.parse().map(Self::Addr).map_err(|_| {
            format!(
                "`{s}` is not a listen address; use host:port (127.0.0.1:9844, [::1]:9844) or :port"
            )
        })
    }
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::AnyAddr(p) => write!(f, ":{p}"),
        }
    }
}

/// `--collector.<name>` and `--no-collector.<name>` for each of [`COLLECTORS`]; the last
/// one given wins, every collector is on by default.
#[derive(Clone, Debug, Default)]
pub struct CollectorFlags {
    disabled: BTreeSet<&'static str>,
}

impl CollectorFlags {
    /// Whether the collector runs.
    pub fn enabled(&self, name: &str) -> bool {
        !self.disabled.contains(name)
    }

    /// The collectors switched off.
    pub fn disabled(&self) -> Vec<&'static str> {
        self.disabled.iter().copied().collect()
    }
}

impl FromArgMatches for CollectorFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Self::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for (name, _) in COLLECTORS {
            if matches.get_flag(&format!("no-collector.{name}")) {
                self.disabled.insert(name);
            } else if matches.get_flag(&format!("collector.{name}")) {
                self.disabled.remove(name);
            }
        }
        Ok(())
    }
}

impl Args for CollectorFlags {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        for (name, what) in COLLECTORS {
            let on = format!("collector.{name}");
            let off = format!("no-collector.{name}");
            cmd = cmd
                .arg(
                    Arg::new(on.clone())
                        .long(on.clone())
                        .action(ArgAction::SetTrue)
                        .overrides_with(off.clone())
                        .help(format!("Enable the {name} collector: {what} (default: on)")),
                )
                .arg(
                    Arg::new(off.clone())
                        .long(off)
                        .action(ArgAction::SetTrue)
                        .overrides_with(on)
                        .help(format!("Disable the {name} collector")),
                );
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sockscope").chain(args.iter().copied()))
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(":9844".parse(), Ok(ListenAddress::AnyAddr(9844)));
        assert_eq!(
            "127.0.0.1:1".parse(),
            Ok(ListenAddress::Addr(SocketAddr::from(([127, 0, 0, 1], 1))))
        );
        assert!("[::1]:80".parse::<ListenAddress>().is_ok());
        assert!("nonsense".parse::<ListenAddress>().is_err());
        assert!(":99999".parse::<ListenAddress>().is_err());
    }

    #[test]
    fn run_is_the_default_and_collectors_toggle() {
        let cli = parse(&["--no-collector.netstat", "--watch.ports", "80,443"]).expect("parses");
        assert!(cli.command.is_none());
        assert!(!cli.run.collectors.enabled("netstat"));
        assert!(cli.run.collectors.enabled("resets"));
        assert_eq!(cli.run.watch_ports, vec![80, 443]);
        let cli = parse(&["run", "--no-collector.resets", "--collector.resets"]).expect("parses");
        let Some(Command::Run(run)) = cli.command else {
            panic!("run subcommand")
        };
        assert!(run.collectors.enabled("resets"), "the last flag wins");
    }

    #[test]
    fn listeners_options() {
        let cli = parse(&[
            "listeners",
            "--interval",
            "2s",
            "--json",
            "--agent",
            "http://[::1]:9844",
        ])
        .expect("parses");
        let Some(Command::Listeners(args)) = cli.command else {
            panic!("listeners subcommand")
        };
        assert_eq!(args.interval, std::time::Duration::from_secs(2));
        assert!(args.json && !args.watch);
        assert_eq!(args.agent.map(|u| u.port), Some(9844));
        for bad in [
            &["listeners", "--interval", "0"][..],
            &["listeners", "--interval", "soon"],
            &["listeners", "--agent", "ftp://x"],
            &["listeners", "--bogus"],
        ] {
            assert_eq!(parse(bad).expect_err("must fail").exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        for args in [
            &["--bogus"][..],
            &["--web.listen-address", "x"],
            &["--watch.ports", "70000"],
        ] {
            let err = parse(args).expect_err("must fail");
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
