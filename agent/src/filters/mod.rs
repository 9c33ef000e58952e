//! Socket filters: tcpdump expressions compiled by libpcap ([`compile`]), shown and tried
//! offline by `sockscope filter check` ([`check_cmd`]), counted in the kernel as named
//! filters of the agent ([`count`], through [`translate`] and [`bpf_sys`]); the built-in TCP
//! segment classifier ([`segments`]); the packet sockets both run on, one per interface
//! ([`taps`]); `sockscope capture` ([`capture`]).

pub mod bpf_sys;
pub mod capture;
pub mod check_cmd;
pub mod compile;
pub mod count;
pub mod segments;
pub mod taps;
pub mod translate;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

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

/// The metric sources of the socket filters, and the handle a reload replaces them through.
pub type Started = (Vec<Box<dyn crate::metrics::Source>>, Arc<LiveFilters>);

/// Starts what `args` asks for: the metric source of the named filters, and the handle a
/// reload replaces them through.
pub fn start(args: &FilterArgs) -> Result<Started, count::StartError> {
    let live = Arc::new(LiveFilters::start(args)?);
    let source: Box<dyn crate::metrics::Source> = Box::new(count::FilterSource(Arc::clone(&live)));
    Ok((vec![source], live))
}

/// How often the kernel's 32-bit classic counters are read, so they never wrap unseen.
const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The named filters of a running agent, which a reload (SIGHUP) may replace: the counts of
/// a filter whose name and expression stay are carried over, so its counter never goes back.
pub struct LiveFilters {
    state: Mutex<LiveState>,
    /// The packet sockets, shared with the classifier.
    taps: Arc<taps::Taps>,
}

struct LiveState {
    filters: Vec<count::FilterSpec>,
    ifaces: Vec<String>,
    mode: FilterMode,
    running: Option<count::NamedFilters>,
    /// Added to each filter's kernel counts: what earlier generations counted.
    base: HashMap<String, (u64, Option<u64>)>,
}

impl LiveFilters {
    fn start(args: &FilterArgs) -> Result<Self, count::StartError> {
        let taps = Arc::new(taps::Taps::default());
        let running = if args.filters.is_empty() {
            None
        } else {
            let named = count::NamedFilters::start(&args.filters, &args.ifaces, args.mode, &taps)?;
            taps.set_filters(named.programs())
                .map_err(count::StartError::Other)?;
            named.keep_polling(POLL_INTERVAL);
            Some(named)
        };
        Ok(Self {
            taps,
            state: Mutex::new(LiveState {
                filters: args.filters.clone(),
                ifaces: args.ifaces.clone(),
                mode: args.mode,
                running,
                base: HashMap::new(),
            }),
        })
    }

    /// The packet sockets, for the classifier to share.
    pub fn taps(&self) -> Arc<taps::Taps> {
        Arc::clone(&self.taps)
    }

    /// Every filter's counts, its earlier generations included.
    pub fn totals(&self) -> Vec<count::Totals> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(running) = &state.running else {
            return Vec::new();
        };
        let mut totals = running.totals();
        for t in &mut totals {
            if let Some((packets, bytes)) = state.base.get(&t.name) {
                t.packets += packets;
                t.bytes = t.bytes.map(|b| b + bytes.unwrap_or(0));
            }
        }
        totals
    }

    /// Puts `args`' filters in place of the running ones; false when nothing changed. The
    /// new programs take over each interface's tap in one step, a filter's own sockets are
    /// attached before the old ones go, and a filter that keeps its name and expression
    /// continues its counts. On error the running filters stay.
    pub fn replace(&self, args: &FilterArgs) -> Result<bool, count::StartError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.filters == args.filters && state.ifaces == args.ifaces && state.mode == args.mode {
            return Ok(false);
        }
        let next = if args.filters.is_empty() {
            None
        } else {
            Some(count::NamedFilters::start(
                &args.filters,
                &args.ifaces,
                args.mode,
                &self.taps,
            )?)
        };
        self.taps
            .set_filters(next.as_ref().map_or(&[][..], |n| n.programs()))
            .map_err(count::StartError::Other)?;
        // Both generations are read back to back, after the taps changed hands: what the
        // old programs counted is final, what the new ones counted since is theirs; only a
        // filter's own sockets, old and new, both count what arrived since the new ones
        // opened, which the new ones' count takes back. A packet that arrives between the
        // reads, or meets the old program on another CPU while the taps change hands, may
        // be counted once too few or too many, nothing more.
        let fresh: HashMap<String, count::Totals> = next
            .as_ref()
            .map(|n| {
                n.totals()
                    .into_iter()
                    .map(|t| (t.name.clone(), t))
                    .collect()
            })
            .unwrap_or_default();
        let old: HashMap<String, count::Totals> = state
            .running
            .as_ref()
            .map(|r| {
                r.totals()
                    .into_iter()
                    .map(|t| (t.name.clone(), t))
                    .collect()
            })
            .unwrap_or_default();
        let mut base = HashMap::new();
        for spec in &args.filters {
            let kept = state.filters.iter().any(|s| s == spec);
            let (Some(before), true) = (old.get(&spec.name), kept) else {
                continue;
            };
            let before_packets = before.packets + state.base.get(&spec.name).map_or(0, |b| b.0);
            let before_bytes = before
                .bytes
                .map(|b| b + state.base.get(&spec.name).and_then(|b| b.1).unwrap_or(0));
            let now = fresh.get(&spec.name);
            let now_packets = now.map_or(0, |t| t.own.0);
            let now_bytes = now.and_then(|t| t.bytes.map(|_| t.own.1));
            base.insert(
                spec.name.clone(),
                (
                    before_packets.saturating_sub(now_packets),
                    before_bytes.map(|b| b.saturating_sub(now_bytes.unwrap_or(0))),
                ),
            );
        }
        if let Some(next) = &next {
            next.keep_polling(POLL_INTERVAL);
        }
        if let Some(old) = state.running.take() {
            old.retire();
        }
        state.running = next;
        state.base = base;
        state.filters = args.filters.clone();
        state.ifaces = args.ifaces.clone();
        state.mode = args.mode;
        Ok(true)
    }
}
