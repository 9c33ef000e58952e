//! Socket filters: tcpdump expressions compiled by libpcap ([`compile`]), shown and tried
//! offline by `sockscope filter check` ([`check_cmd`]).

pub mod check_cmd;
pub mod compile;

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
