//! sockscope's agent: loads the kernel programs with aya, reads listener queues and kernel
//! counters, and serves them as Prometheus metrics.
//!
//! Layout: [`cli`] parses flags, [`run`] wires everything up, [`probes`] loads and attaches
//! the programs, [`metrics`] reads them at scrape time, [`server`] answers HTTP,
//! [`kernel`] knows where the running kernel keeps things, [`listeners`] lists listening
//! sockets through sock_diag, [`netns`] finds the host's network namespaces and works inside
//! each of them; [`listeners_cmd`] is `sockscope listeners`, the table of listeners.

pub mod caps;
pub mod check;
pub mod cli;
pub mod config;
pub mod filters;
pub mod kernel;
pub mod listeners;
pub mod listeners_cmd;
pub mod metrics;
pub mod netns;
pub mod probes;
pub mod reload;
pub mod run;
pub mod server;
pub mod timewait;
pub mod timewait_cmd;
pub mod web;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};

/// Entry point of the `sockscope` binary.
pub fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match cli.command {
        Some(cli::Command::Check(args)) => {
            init_logging("warn");
            if check::check(&args) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some(cli::Command::Listeners(args)) => {
            // The command reports what it could not measure itself: the probes' warnings
            // would only repeat it on stderr.
            init_logging("error");
            listeners_cmd::main(&args)
        }
        Some(cli::Command::Timewait(args)) => {
            init_logging("error");
            timewait_cmd::main(&args)
        }
        Some(cli::Command::Filter(command)) => {
            init_logging("warn");
            filters::main(&command)
        }
        Some(cli::Command::Capture(args)) => {
            init_logging("warn");
            filters::capture::main(&args)
        }
        Some(cli::Command::HashPassword(args)) => web::hash_password::main(&args),
        // The flags were validated above; the run options are read again from the command
        // line and merged with --config.file.
        Some(cli::Command::Run(_)) | None => run_agent(),
    }
}

/// `--help` and `--version` print and exit 0; any bad flag or value prints the error and
/// the usage, and exits 2.
fn usage_error(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    if !e.use_stderr() {
        return ExitCode::SUCCESS;
    }
    if !e.render().to_string().contains("Usage:") {
        eprintln!("\n{}", cli::Cli::command().render_usage());
    }
    ExitCode::from(2)
}

fn run_agent() -> ExitCode {
    let cli_args = config::run_cli_args(std::env::args_os().collect());
    let loaded = match config::Loaded::load(cli_args) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("sockscope: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&loaded.args.log_level);
    loaded.log_shadowed();
    let (extra, live_filters) = match filters::start(&loaded.args.filters) {
        Ok(started) => started,
        Err(e) => {
            eprintln!("sockscope: {e}");
            return match e {
                filters::count::StartError::Usage(_) => ExitCode::from(2),
                filters::count::StartError::Other(_) => ExitCode::FAILURE,
            };
        }
    };
    match run::run_with_sources(loaded, extra, Some(live_filters)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sockscope: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; RUST_LOG, when set, overrides `--log.level`. Kernel-side aya-log records
/// arrive through the `log` bridge.
fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
