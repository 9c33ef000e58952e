//! Socket filters: tcpdump expressions compiled by libpcap ([`compile`]), shown and tried
//! offline by `sockscope filter check` ([`check_cmd`]), counted in the kernel as named
//! filters of the agent ([`count`], through [`translate`] and [`bpf_sys`]); the built-in TCP
//! segment classifier ([`segments`]); `sockscope capture` ([`capture`]).

pub mod bpf_sys;
pub mod capture;
pub mod check_cmd;
pub mod compile;
pub mod count;
pub mod segments;
pub mod translate;

use clap::Subcommand;

/// `sockscope filter ...`.
#[derive(Clone, Debug, Subcommand)]
pub enum FilterCommand {
    /// Compile a tcpdump expression, print the program as `tcpdump -d` does and, with
    /// --pcap, count the packets of a capture file that match.
    Check(check_cmd::CheckArgs),
}

/// Runs a `sockscope filter` subcommand.
pub fn main(command: &FilterCommand) -> std::process::ExitCode {
    match command {
        FilterCommand::Check(args) => check_cmd::main(args),
    }
}

/// The agent's socket filter options (`sockscope run`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct FilterArgs {
    /// A named tcpdump expression counted in the kernel on every --iface:
    /// `NAME=EXPR` (repeatable) → sockscope_filter_packets_total{filter="NAME"}.
    #[arg(long = "filter", value_name = "NAME=EXPR")]
    pub filters: Vec<count::FilterSpec>,
    /// An interface of the agent's own network namespace the socket filters watch
    /// (repeatable; none by default: a packet tap costs every packet something).
    #[arg(long = "iface", value_name = "IFACE")]
    pub ifaces: Vec<String>,
    /// How named filters count: `auto` runs libpcap's program translated to eBPF (packets
    /// and bytes), falling back to `classic` for a program it cannot translate; `classic`
    /// attaches libpcap's program itself and counts packets only (PACKET_STATISTICS).
    #[arg(long = "filter.mode", value_enum, default_value_t = FilterMode::Auto)]
    pub mode: FilterMode,
}

/// `--filter.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FilterMode {
    /// Translated to eBPF where possible: packets and bytes.
    #[default]
    Auto,
    /// libpcap's classic program: packets only.
    Classic,
}

/// Starts what `args` asks for: the metric sources of the socket filters.
pub fn start(args: &FilterArgs) -> Result<Vec<Box<dyn crate::metrics::Source>>, count::StartError> {
    let mut sources: Vec<Box<dyn crate::metrics::Source>> = Vec::new();
    if !args.filters.is_empty() {
        let named = count::NamedFilters::start(&args.filters, &args.ifaces, args.mode)?;
        named.keep_polling(std::time::Duration::from_secs(5));
        sources.push(Box::new(count::FilterSource(named)));
    }
    Ok(sources)
}
