//! `sockscope listeners` on its own: reads the kernel directly, in every network namespace.
//!
//! The listen probes are loaded as `run` loads them, once for the command's life (dropping
//! them detaches them). Each interval then takes a first reading (the programs' per-listener
//! counts, then every namespace's listeners through sock_diag with their `sk_drops`, and
//! the namespace's own counters), samples the queues every [`SAMPLE_PERIOD`], and takes a
//! second reading in the opposite order. The order makes a drop that lands between the two
//! halves of a reading look explained rather than unexplained: at the start the counts are
//! read first, at the end last, so an overflow is never missing from the counts while its
//! drop is in `sk_drops`.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::PerCpuHashMap;

use super::{
    owners,
    report::{
        AcceptQueue, Listener, Namespace, NsCounters, Overflows, Process, Report, Settings,
        SynQueue, SynQueueFull, Unavailable, is_full,
    },
};
use crate::{
    caps,
    cli::PathArgs,
    listeners::{DumpBuffers, NsListeners},
    metrics::{
        listen::{ListenEventKind, ListenEventSource as _, ListenerId, resolve},
        netstat::{self, CounterValues, SysctlValues},
    },
    netns::{Discovery, Namespace as FoundNamespace, NetnsInfo},
    probes::{KernelSupport, Probes, listen::ListenMap},
};

/// How often the queues are sampled between the two readings.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(100);

/// At most this share of the time goes to sampling: on a host where one pass over the
/// namespaces takes longer than a fifth of the period, the period stretches.
const SAMPLING_SHARE: u32 = 5;

const PROC: &str = "/proc";

/// What the columns need from the kernel programs.
const SYN_STAGE: &str = "OVERFLOWS at the SYN stage and SYN-queue-full drops and cookies";
const ACK_STAGE: &str = "OVERFLOWS at the ACK stage (and their second charge to DROPS)";

/// The kernel as the source of reports.
pub struct KernelSource {
    discovery: Discovery,
    /// Kept for the command's life: dropping it detaches the programs.
    _probes: Option<Probes>,
    events: Option<ListenMap>,
    /// Whether `listen_ingress` counts (SYN-stage overflows, SYN-queue-full events).
    syn_stage: bool,
    /// Whether `listen_ack_drop` counts (ACK-stage overflows).
    ack_stage: bool,
    unavailable: Vec<Unavailable>,
    buffers: DumpBuffers,
    text: String,
}

/// One namespace in a reading.
struct NsReading {
    info: NetnsInfo,
    entered: bool,
    /// `None` when it could not be read (not entered, or vanishing).
    listeners: Option<NsListeners>,
    counters: Option<CounterValues>,
    settings: Option<SysctlValues>,
}

/// Per-listener findings of the samples.
#[derive(Clone, Copy, Debug, Default)]
struct Samples {
    taken: u32,
    full: u32,
    accept_max: u64,
    syn_max: u64,
}

/// `(listener as the kernel program keyed it, what)` → count since the programs loaded.
type Counts = HashMap<(ListenerId, ListenEventKind), u64>;

impl KernelSource {
    /// Finds the namespaces and loads the listen probes; what cannot be loaded is recorded
    /// as unavailable, never an error.
    pub fn new(paths: &PathArgs) -> anyhow::Result<Self> {
        let discovery = Discovery::new()?;
        let mut source = Self {
            discovery,
            _probes: None,
            events: None,
            syn_stage: false,
            ack_stage: false,
            unavailable: Vec::new(),
            buffers: DumpBuffers::default(),
            text: String::new(),
        };
        source.load_probes(paths);
        Ok(source)
    }

    fn load_probes(&mut self, paths: &PathArgs) {
        let both = format!("{SYN_STAGE}; {ACK_STAGE}");
        let missing = caps::missing_required();
        if !missing.is_empty() {
            self.unavailable.push(Unavailable {
                what: both,
                why: format!(
                    "the kernel programs need {} (run as root)",
                    missing.join(", ")
                ),
            });
            return;
        }
        // The reset probes tell nothing here: leave them out.
        let support = KernelSupport::probe(&["resets"], &paths.to_paths(), paths.probe_mode);
        let mut probes = match Probes::load(support, false) {
            Ok(p) => p,
            Err(e) => {
                self.unavailable.push(Unavailable {
                    what: both,
                    why: e.to_string(),
                });
                return;
            }
        };
        let map = counter_map(&mut probes, "LISTEN_EVENTS").and_then(|events| {
            Ok(ListenMap::new(
                events,
                counter_map(&mut probes, "HANDSHAKES")?,
            ))
        });
        match map {
            Ok(maps) => self.events = Some(maps),
            Err(why) => {
                self.unavailable.push(Unavailable { what: both, why });
                self._probes = Some(probes);
                return;
            }
        }
        for (probe, what, up) in [
            ("listen_ingress", SYN_STAGE, &mut self.syn_stage),
            ("listen_ack_drop", ACK_STAGE, &mut self.ack_stage),
        ] {
            *up = probes.is_up(probe);
            if !*up {
                let why = probes
                    .status
                    .iter()
                    .find(|s| s.spec.name == probe)
                    .map_or_else(
                        || format!("probe {probe} unknown"),
                        |s| format!("probe {probe}: {}; needs {}", s.detail, s.spec.needs),
                    );
                self.unavailable.push(Unavailable {
                    what: what.to_owned(),
                    why,
                });
            }
        }
        self._probes = Some(probes);
    }

    /// Measures for `interval`; `started` is called once the first reading is taken.
    pub fn measure(
        &mut self,
        interval: Duration,
        started: &mut dyn FnMut(),
    ) -> anyhow::Result<Report> {
        // Held for the interval only: the command never keeps a dead namespace alive longer.
        let namespaces = self.discovery.discover();
        let mut samples: HashMap<ListenerId, Samples> = HashMap::new();

        let start = Instant::now();
        let counts_before = self.read_counts();
        let first = self.read(&namespaces, false)?;
        let mut passes = 1;
        for ns in &first {
            add_sample(&mut samples, ns.info.inode, ns.listeners.as_ref());
        }
        started();

        let deadline = start + interval;
        let mut next = Instant::now() + SAMPLE_PERIOD;
        while next < deadline {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let began = Instant::now();
            self.sample(&namespaces, &mut samples)?;
            passes += 1;
            let took = began.elapsed();
            next = (next + SAMPLE_PERIOD).max(Instant::now() + took * (SAMPLING_SHARE - 1));
        }
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));

        let last = self.read(&namespaces, true)?;
        let counts_after = self.read_counts();
        let elapsed = start.elapsed();
        passes += 1;
        for ns in &last {
            add_sample(&mut samples, ns.info.inode, ns.listeners.as_ref());
        }
        drop(namespaces);

        let mut report = Report::new("kernel".to_owned());
        report.interval_seconds = elapsed.as_secs_f64();
        report.samples = passes;
        report.unavailable = self.unavailable.clone();
        let blind = last.iter().filter(|ns| !ns.entered).count();
        if blind > 0 {
            report.unavailable.push(Unavailable {
                what: format!("the listeners of {blind} network namespace(s)"),
                why: "could not enter them (setns needs CAP_SYS_ADMIN)".to_owned(),
            });
        }
        let events = match (counts_before, counts_after) {
            (Some(before), Some(after)) => Some(per_series(&before, &after, &last)),
            _ => None,
        };
        self.fill(&mut report, &first, &last, &samples, events.as_ref());
        Ok(report)
    }

    /// The kernel programs' counts now; `None` without them (or when the map cannot be read,
    /// which the unavailable list then says).
    fn read_counts(&mut self) -> Option<Counts> {
        let source = self.events.as_ref()?;
        match source.read() {
            Ok(events) => Some(
                events
                    .counters
                    .into_iter()
                    .map(|(id, kind, n)| ((id, kind), n))
                    .collect(),
            ),
            Err(e) => {
                let why = format!("reading the kernel programs' counts: {e:#}");
                if !self.unavailable.iter().any(|u| u.why == why) {
                    self.unavailable.push(Unavailable {
                        what: format!("{SYN_STAGE}; {ACK_STAGE}"),
                        why,
                    });
                }
                None
            }
        }
    }

    /// One reading of every namespace: listeners with `sk_drops` and SYN queues, the
    /// namespace's counters and, with `settings`, its sysctls where it has listeners.
    fn read(
        &mut self,
        namespaces: &[FoundNamespace],
        settings: bool,
    ) -> anyhow::Result<Vec<NsReading>> {
        let mut out = Vec::with_capacity(namespaces.len());
        let (buffers, text) = (&mut self.buffers, &mut self.text);
        self.discovery.visit(namespaces, |ns, entered| {
            let mut reading = NsReading {
                info: ns.info.clone(),
                entered,
                listeners: None,
                counters: None,
                settings: None,
            };
            if entered {
                let mut listeners = NsListeners::default();
                // A namespace vanishing mid-read is left out of this reading, not an error.
                if listeners.read(buffers, true).is_ok() {
                    if settings && !listeners.series.is_empty() {
                        reading.settings = netstat::read_sysctls(text).ok();
                    }
                    reading.listeners = Some(listeners);
                }
                reading.counters = netstat::read_counters(text).ok();
            }
            out.push(reading);
        })?;
        Ok(out)
    }

    /// One sample of every namespace's queues.
    fn sample(
        &mut self,
        namespaces: &[FoundNamespace],
        samples: &mut HashMap<ListenerId, Samples>,
    ) -> anyhow::Result<()> {
        let buffers = &mut self.buffers;
        let mut listeners = NsListeners::default();
        self.discovery.visit(namespaces, |ns, entered| {
            if entered && listeners.read(buffers, true).is_ok() {
                add_sample(samples, ns.info.inode, Some(&listeners));
            }
        })?;
        Ok(())
    }

    /// The report's namespaces and listeners from the two readings.
    fn fill(
        &self,
        report: &mut Report,
        first: &[NsReading],
        last: &[NsReading],
        samples: &HashMap<ListenerId, Samples>,
        events: Option<&HashMap<(ListenerId, ListenEventKind), u64>>,
    ) {
        // `(netns, socket cookie)` → sk_drops at the first reading.
        let drops_before: HashMap<(u64, u64), u32> = first
            .iter()
            .filter_map(|ns| Some((ns.info.inode, ns.listeners.as_ref()?)))
            .flat_map(|(netns, l)| {
                l.sockets
                    .iter()
                    .filter_map(move |s| Some(((netns, s.cookie), s.drops?)))
            })
            .collect();
        let counters_before: HashMap<u64, CounterValues> = first
            .iter()
            .filter_map(|ns| Some((ns.info.inode, ns.counters?)))
            .collect();
        let mut inodes: HashMap<u32, ListenerId> = HashMap::new();
        for ns in last {
            let Some(listeners) = ns.listeners.as_ref().filter(|l| !l.series.is_empty()) else {
                continue;
            };
            let netns = ns.info.inode;
            report.namespaces.push(Namespace {
                netns,
                name: ns.info.name.clone(),
                pid: ns.info.pid,
                comm: ns.info.comm.clone(),
                settings: ns.settings.map(settings).unwrap_or_default(),
                counters: match (counters_before.get(&netns), ns.counters) {
                    (Some(before), Some(after)) => Some(counter_delta(before, &after)),
                    _ => None,
                },
            });
            for s in &listeners.series {
                let id = ListenerId {
                    netns,
                    addr: s.addr,
                    port: s.port,
                };
                let seen = samples.get(&id).copied().unwrap_or_default();
                let mut l = Listener::new(netns, s.addr, s.port);
                l.sockets = s.sockets;
                l.accept_queue = AcceptQueue {
                    length: s.accept_queue,
                    limit: s.accept_queue_limit,
                    max: seen.accept_max,
                    samples: seen.taken,
                    full_samples: seen.full,
                    full_percent: 0.0,
                };
                l.syn_queue = SynQueue {
                    length: s.syn_queue,
                    max: seen.syn_max,
                };
                let count = |kind| events.map(|e| e.get(&(id, kind)).copied().unwrap_or(0));
                // Overflows at the ACK stage; of them, those whose segment the listener
                // discarded too (charged to its `sk_drops` twice).
                let (ack, discarded) = if self.ack_stage {
                    let discarded = count(ListenEventKind::OverflowAck);
                    let unqueued = count(ListenEventKind::OverflowAckUnqueued);
                    (discarded.zip(unqueued).map(|(d, u)| d + u), discarded)
                } else {
                    (None, None)
                };
                if self.syn_stage {
                    l.overflows = Overflows::new(count(ListenEventKind::OverflowSyn), ack);
                    l.syn_queue_full = count(ListenEventKind::SynQueueFullDrop)
                        .zip(count(ListenEventKind::SynQueueFullCookie))
                        .map(|(drop, cookie)| SynQueueFull { drop, cookie });
                } else {
                    l.overflows = Overflows::new(None, ack);
                }
                l.drops = self.drops(netns, listeners, s.addr, s.port, &drops_before, discarded);
                for socket in listeners
                    .sockets
                    .iter()
                    .filter(|x| x.addr == s.addr && x.port == s.port)
                {
                    inodes.insert(socket.inode, id);
                }
                report.listeners.push(l);
            }
        }
        self.add_owners(report, &inodes);
    }

    /// Drops charged to the listener during the interval: the increase of `sk_drops` of its
    /// sockets (all of it for a socket born meanwhile), less the ACK-stage overflows whose
    /// segment the listener discarded, which the kernel charges to `sk_drops` twice (as the
    /// agent does; see metrics/listen.rs).
    fn drops(
        &self,
        netns: u64,
        listeners: &NsListeners,
        addr: std::net::IpAddr,
        port: u16,
        before: &HashMap<(u64, u64), u32>,
        ack_overflows: Option<u64>,
    ) -> Option<u64> {
        let mut total: Option<u64> = None;
        for s in listeners
            .sockets
            .iter()
            .filter(|s| s.addr == addr && s.port == port)
        {
            let Some(now) = s.drops else { continue };
            let since = match before.get(&(netns, s.cookie)) {
                Some(then) => now.wrapping_sub(*then),
                None => now,
            };
            *total.get_or_insert(0) += u64::from(since);
        }
        total.map(|t| t.saturating_sub(ack_overflows.unwrap_or(0)))
    }

    /// The process holding each listener's sockets (the lowest pid among them).
    fn add_owners(&self, report: &mut Report, inodes: &HashMap<u32, ListenerId>) {
        let wanted: HashSet<u32> = inodes.keys().copied().collect();
        let found = owners::owners(Path::new(PROC), &wanted);
        let mut by_listener: HashMap<ListenerId, u32> = HashMap::new();
        for (inode, pid) in found {
            if let Some(id) = inodes.get(&inode) {
                let owner = by_listener.entry(*id).or_insert(pid);
                *owner = (*owner).min(pid);
            }
        }
        for l in &mut report.listeners {
            let id = ListenerId {
                netns: l.netns,
                addr: l.addr,
                port: l.port,
            };
            l.process = by_listener.get(&id).map(|pid| Process {
                pid: *pid,
                comm: owners::comm(Path::new(PROC), *pid),
            });
        }
    }
}

/// Adds one look at a namespace's queues. An SO_REUSEPORT group counts as full when any of
/// its sockets is: a SYN hashed to that socket is dropped whatever the others hold.
fn add_sample(samples: &mut HashMap<ListenerId, Samples>, netns: u64, l: Option<&NsListeners>) {
    let Some(l) = l else { return };
    for s in &l.series {
        let entry = samples
            .entry(ListenerId {
                netns,
                addr: s.addr,
                port: s.port,
            })
            .or_default();
        entry.taken += 1;
        entry.accept_max = entry.accept_max.max(s.accept_queue);
        entry.syn_max = entry.syn_max.max(s.syn_queue);
    }
    // Sockets are sorted like the series: a full one marks its series once per sample.
    let mut last_full = None;
    for s in &l.sockets {
        let key = (s.addr, s.port);
        if last_full != Some(key)
            && is_full(u64::from(s.accept_queue), u64::from(s.accept_queue_limit))
        {
            last_full = Some(key);
            if let Some(entry) = samples.get_mut(&ListenerId {
                netns,
                addr: s.addr,
                port: s.port,
            }) {
                entry.full += 1;
            }
        }
    }
}

/// The programs' counts during the interval, each given to the listener series it belongs
/// to at the end (the exact address, else the wildcard, else a dual-stack `::`).
fn per_series(
    before: &Counts,
    after: &Counts,
    last: &[NsReading],
) -> HashMap<(ListenerId, ListenEventKind), u64> {
    let by_ns: HashMap<u64, &NsListeners> = last
        .iter()
        .filter_map(|ns| Some((ns.info.inode, ns.listeners.as_ref()?)))
        .collect();
    let mut out = HashMap::new();
    for ((id, kind), now) in after {
        let delta = now.saturating_sub(before.get(&(*id, *kind)).copied().unwrap_or(0));
        if delta == 0 {
            continue;
        }
        // A listener gone by the end has no row to carry its counts.
        let Some(listeners) = by_ns.get(&id.netns) else {
            continue;
        };
        *out.entry((resolve(listeners, *id), *kind)).or_insert(0) += delta;
    }
    out
}

fn counter(values: &CounterValues, nstat: &str) -> Option<u64> {
    let i = netstat::COUNTERS.iter().position(|(_, n, _)| *n == nstat)?;
    values[i]
}

fn counter_delta(before: &CounterValues, after: &CounterValues) -> NsCounters {
    let delta = |nstat| Some(counter(after, nstat)?.saturating_sub(counter(before, nstat)?));
    NsCounters {
        listen_overflows: delta("TcpExtListenOverflows"),
        listen_drops: delta("TcpExtListenDrops"),
        syn_queue_full_drops: delta("TcpExtTCPReqQFullDrop"),
        syn_queue_full_cookies: delta("TcpExtTCPReqQFullDoCookies"),
    }
}

fn settings(values: SysctlValues) -> Settings {
    let get = |suffix: &str| {
        let i = netstat::SYSCTLS.iter().position(|(s, ..)| *s == suffix)?;
        values[i]
    };
    Settings {
        somaxconn: get("somaxconn"),
        tcp_syncookies: get("tcp_syncookies"),
        tcp_max_syn_backlog: get("tcp_max_syn_backlog"),
    }
}

/// A per-CPU counter map of the listen programs, by listener, out of `probes`.
fn counter_map<V: aya::Pod>(
    probes: &mut Probes,
    name: &str,
) -> Result<PerCpuHashMap<aya::maps::MapData, agent_common::ListenerKey, V>, String> {
    let map = probes
        .take_map(name)
        .ok_or_else(|| format!("map {name} missing from the kernel object"))?;
    PerCpuHashMap::try_from(map).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listeners::ListenSocket;

    fn socket(addr: &str, port: u16, queue: u32, limit: u32, cookie: u64) -> ListenSocket {
        ListenSocket {
            addr: addr.parse().expect("addr"),
            port,
            accept_queue: queue,
            accept_queue_limit: limit,
            drops: Some(0),
            cookie,
            inode: 0,
            v6only: false,
        }
    }

    #[test]
    fn a_reuseport_group_is_full_when_one_socket_is() {
        let l = NsListeners::from_sockets(vec![
            socket("0.0.0.0", 80, 4, 4, 1),
            socket("0.0.0.0", 80, 0, 4, 2),
            socket("0.0.0.0", 80, 5, 4, 3),
            socket("0.0.0.0", 81, 1, 4, 4),
        ]);
        let mut samples = HashMap::new();
        add_sample(&mut samples, 7, Some(&l));
        add_sample(&mut samples, 7, Some(&l));
        let at = |port| {
            samples[&ListenerId {
                netns: 7,
                addr: "0.0.0.0".parse().expect("addr"),
                port,
            }]
        };
        assert_eq!((at(80).taken, at(80).full, at(80).accept_max), (2, 2, 9));
        assert_eq!((at(81).taken, at(81).full), (2, 0));
    }

    #[test]
    fn counts_go_to_the_series_they_belong_to() {
        let l = NsListeners::from_sockets(vec![socket("0.0.0.0", 80, 0, 4, 1)]);
        let last = vec![NsReading {
            info: NetnsInfo {
                inode: 7,
                ..NetnsInfo::default()
            },
            entered: true,
            listeners: Some(l),
            counters: None,
            settings: None,
        }];
        let id = |addr: &str| ListenerId {
            netns: 7,
            addr: addr.parse().expect("addr"),
            port: 80,
        };
        let kind = ListenEventKind::OverflowSyn;
        let before: Counts = HashMap::from([((id("10.0.0.1"), kind), 3)]);
        let after: Counts = HashMap::from([
            ((id("10.0.0.1"), kind), 5),
            ((id("10.0.0.2"), kind), 4),
            ((id("0.0.0.0"), kind), 1),
        ]);
        let out = per_series(&before, &after, &last);
        assert_eq!(out.get(&(id("0.0.0.0"), kind)), Some(&7));
        assert_eq!(out.len(), 1);
    }
}
