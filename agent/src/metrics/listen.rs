//! The listen backlog per listener (`sockscope_listen_*`), in every network namespace of the
//! host, and the pass over the namespaces that reads it ([`Scan`]).
//!
//! Gauges and `sockscope_listen_drops_total` come from sock_diag, without BPF: the kernel's
//! own per-socket figures (`sk_ack_backlog`, `sk_max_ack_backlog`, `sk_drops`) and the
//! SYN_RECV request sockets of each listener. The event counters and the occupancy histogram
//! come from the kernel programs through a [`ListenEventSource`]; this module only gives them
//! their series.
//!
//! One series is one `(netns, family, addr, port)`: the sockets of an SO_REUSEPORT group are
//! summed and `sockscope_listen_sockets` says how many there are.
//!
//! `sk_drops` lives and dies with its socket, so `sockscope_listen_drops_total` is made
//! monotonic here: a series is the sum of `sk_drops` of its live sockets plus, for sockets of
//! the series that have closed since, the last value read before they closed (per socket
//! cookie). Inherent limit: drops between the last scrape and a socket's close are never seen.
//! A series whose namespace is gone is dropped whole.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use prometheus::proto::MetricFamily;

use super::{
    SelfMetrics, Source,
    family::{Family, FamilySpec, Kind},
    netstat,
};
use crate::{
    kernel::KernelError,
    listeners::{DumpBuffers, ListenSeries, NsListeners, unspecified},
    netns::{Discovery, NetnsError, NetnsInfo},
    timewait::NsTimeWait,
};

/// Identity of one listener series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId {
    /// Network namespace inode.
    pub netns: u64,
    /// Local address as the kernel holds it; the family follows from it.
    pub addr: IpAddr,
    /// Local port.
    pub port: u16,
}

/// What a kernel program counted at a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListenEventKind {
    /// Accept queue full, a SYN dropped.
    OverflowSyn,
    /// Accept queue full, a handshake-completing ACK dropped.
    OverflowAck,
    /// Accept queue full when a child was to be made without a request in the SYN queue (a
    /// SYN cookie's ACK, a Fast Open SYN): shown as `stage="ack"` with [`Self::OverflowAck`],
    /// but TCP does not discard the segment on the listener, so `sk_drops` holds it once.
    OverflowAckUnqueued,
    /// SYN queue full, SYN dropped.
    SynQueueFullDrop,
    /// SYN queue full (or `tcp_syncookies=2`), answered with a cookie.
    SynQueueFullCookie,
    /// A SYN-ACK retransmitted.
    SynackRetransmit,
    /// A handshake completed into the accept queue.
    Handshake,
}

/// Cumulative counts from the kernel programs since the agent started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListenEvents {
    /// `(listener, what, count so far)`.
    pub counters: Vec<(ListenerId, ListenEventKind, u64)>,
    /// Accept-queue occupancy seen at each handshake: per-bucket counts, *not* cumulative,
    /// one per bound of `occupancy_bounds`.
    pub occupancy: Vec<(ListenerId, Vec<u64>)>,
    /// Sum of the observed occupancies, per listener (the histogram's `_sum`).
    pub occupancy_sums: Vec<(ListenerId, u64)>,
    /// Upper bounds of the buckets, ascending; the last is `+Inf`.
    pub occupancy_bounds: Vec<f64>,
}

/// Where the kernel programs' listen counts are read.
pub trait ListenEventSource: Send + Sync {
    /// The counts now.
    fn read(&self) -> anyhow::Result<ListenEvents>;
}

/// Errors of the pass over the namespaces.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The namespace walk itself failed (not one namespace: those are skipped).
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// What one pass reads, besides the listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanConfig {
    /// SYN_RECV dumps for the SYN queue lengths (the `listen` collector).
    pub listen: bool,
    /// /proc/thread-self/net/{snmp,netstat} (the `netstat` collector).
    pub netstat: bool,
    /// /proc/sys/net (the `sysctl` collector).
    pub sysctl: bool,
    /// Timewait sockets (the `timewait` collector); namespaces that have some get their
    /// counters and settings read too.
    pub timewait: bool,
}

/// The collectors that share one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consumer {
    /// [`Listen`].
    Listen = 0,
    /// [`netstat::Netstat`].
    Netstat = 1,
    /// [`netstat::Sysctl`].
    Sysctl = 2,
    /// [`super::timewait::TimeWait`].
    TimeWait = 3,
}

/// What one pass found in one namespace.
#[derive(Debug)]
pub struct NsSnapshot {
    /// Which namespace.
    pub info: NetnsInfo,
    /// Whether the worker thread could enter the namespace (`setns`).
    pub entered: bool,
    /// Whether `listeners` was read (false: not entered, or it vanished mid-read; then
    /// `listeners` is empty).
    pub listeners_read: bool,
    /// Its listeners.
    pub listeners: NsListeners,
    /// Its counters, when it is the agent's own or has a listener (and `netstat` is on).
    pub netstat: Option<Result<netstat::CounterValues, KernelError>>,
    /// Its settings, likewise.
    pub sysctl: Option<Result<netstat::SysctlValues, KernelError>>,
    /// Its timewait sockets (when `timewait` is on and the namespace could be read).
    pub timewait: Option<NsTimeWait>,
}

/// One pass over every namespace of the host.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases with every pass.
    pub generation: u64,
    /// The agent's own namespace.
    pub own: u64,
    /// Every namespace found, the agent's own first.
    pub namespaces: Vec<NsSnapshot>,
}

/// A consumer that comes later than this after a pass gets a new one, whatever happened.
const MAX_AGE: Duration = Duration::from_secs(5);

/// The pass over the host's namespaces, shared by the `listen`, `netstat` and `sysctl`
/// collectors so that each namespace is entered once per scrape for all of them.
///
/// The registry calls the collectors one after the other and tells them nothing about
/// scrapes, so a scrape is recognised thus: a collector that asks again for a pass it has
/// already had is in the next scrape, and gets a new pass; the others of that scrape then
/// get the same one. The first collector of a scrape carries the pass in its
/// `sockscope_collector_duration_seconds`.
#[derive(Debug)]
pub struct Scan {
    discovery: Discovery,
    config: ScanConfig,
    state: Mutex<ScanState>,
    watched: Vec<u16>,
}

#[derive(Debug, Default)]
struct ScanState {
    current: Option<(Arc<Snapshot>, Instant)>,
    generation: u64,
    consumed: [u64; 4],
    buffers: DumpBuffers,
    text: String,
}

impl Scan {
    /// A pass over what `discovery` finds, reading what `config` asks for.
    pub fn new(discovery: Discovery, config: ScanConfig) -> Self {
        Self {
            discovery,
            config,
            state: Mutex::new(ScanState::default()),
            watched: Vec::new(),
        }
    }

    /// Ports that keep their number in the `port` label of timewait sockets even without a
    /// listener (`--watch.ports`).
    pub fn with_watched_ports(mut self, ports: &[u16]) -> Self {
        self.watched = ports.to_vec();
        self.watched.sort_unstable();
        self
    }

    /// The pass of the current scrape for `consumer`.
    pub fn snapshot(&self, consumer: Consumer) -> Result<Arc<Snapshot>, ListenError> {
        // A panic inside a pass leaves nothing half-done that matters: carry on.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = consumer as usize;
        if let Some((snapshot, taken)) = &state.current
            && state.consumed[slot] != state.generation
            && taken.elapsed() <= MAX_AGE
        {
            let snapshot = Arc::clone(snapshot);
            state.consumed[slot] = state.generation;
            return Ok(snapshot);
        }
        let snapshot = self.run(&mut state)?;
        state.consumed[slot] = state.generation;
        Ok(snapshot)
    }

    fn run(&self, state: &mut ScanState) -> Result<Arc<Snapshot>, ListenError> {
        // The vectors of the previous pass are reused when no collector holds it any more.
        let mut pool: Vec<NsListeners> = match state.current.take() {
            Some((old, _)) => match Arc::try_unwrap(old) {
                Ok(old) => old.namespaces.into_iter().map(|n| n.listeners).collect(),
                Err(_) => Vec::new(),
            },
            None => Vec::new(),
        };
        let namespaces = self.discovery.discover();
        let own = self.discovery.own_inode();
        let config = self.config;
        let mut out = Vec::with_capacity(namespaces.len());
        let ScanState { buffers, text, .. } = state;
        self.discovery.visit(&namespaces, |ns, entered| {
            let inode = ns.info.inode;
            let mut snap = NsSnapshot {
                info: ns.info.clone(),
                entered,
                listeners_read: false,
                listeners: pool.pop().unwrap_or_default(),
                netstat: None,
                sysctl: None,
                timewait: None,
            };
            snap.listeners.sockets.clear();
            snap.listeners.series.clear();
            if entered {
                match snap.listeners.read(buffers, config.listen) {
                    Ok(()) => snap.listeners_read = true,
                    Err(e) => {
                        if inode == own {
                            tracing::warn!("listing the listeners: {e}");
                        } else {
                            tracing::debug!(netns = inode, "listing the listeners: {e}; skipped");
                        }
                        // Half a dump is no figure: the namespace has no listener series now.
                        snap.listeners.sockets.clear();
                        snap.listeners.series.clear();
                    }
                }
                if config.timewait {
                    let mut ports: Vec<u16> =
                        snap.listeners.series.iter().map(|s| s.port).collect();
                    ports.extend_from_slice(&self.watched);
                    ports.sort_unstable();
                    ports.dedup();
                    let labelled = |p: u16| ports.binary_search(&p).is_ok();
                    match NsTimeWait::read(buffers.receive(), labelled) {
                        Ok(tw) => snap.timewait = Some(tw),
                        // Half a dump is no figure: the namespace has no timewait series now.
                        Err(e) if inode == own => tracing::warn!("listing timewait sockets: {e}"),
                        Err(e) => tracing::debug!(netns = inode, "timewait sockets: {e}; skipped"),
                    }
                }
                let has_timewait = snap.timewait.as_ref().is_some_and(|t| t.total() > 0);
                if inode == own || !snap.listeners.series.is_empty() || has_timewait {
                    if config.netstat {
                        snap.netstat = Some(netstat::read_counters(text));
                    }
                    if config.sysctl {
                        snap.sysctl = Some(netstat::read_sysctls(text));
                    }
                }
            }
            out.push(snap);
        })?;
        state.generation += 1;
        let snapshot = Arc::new(Snapshot {
            generation: state.generation,
            own,
            namespaces: out,
        });
        state.current = Some((Arc::clone(&snapshot), Instant::now()));
        Ok(snapshot)
    }
}

const LABELS: &[&str] = &["netns", "family", "addr", "port"];

const ACCEPT_QUEUE_LENGTH: FamilySpec = FamilySpec {
    name: "sockscope_listen_accept_queue_length",
    help: "Connections established and waiting for accept() (sk_ack_backlog; ss -lnt Recv-Q), summed over the sockets of the series.",
    kind: Kind::Gauge,
    labels: LABELS,
};
const ACCEPT_QUEUE_LIMIT: FamilySpec = FamilySpec {
    name: "sockscope_listen_accept_queue_limit",
    help: "Accept queue limit (sk_max_ack_backlog = min(backlog, somaxconn); ss -lnt Send-Q), summed over the sockets of the series.",
    kind: Kind::Gauge,
    labels: LABELS,
};
const SYN_QUEUE_LENGTH: FamilySpec = FamilySpec {
    name: "sockscope_listen_syn_queue_length",
    help: "Half-open requests (SYN_RECV) held for the listener (sock_diag request sockets).",
    kind: Kind::Gauge,
    labels: LABELS,
};
const SOCKETS: FamilySpec = FamilySpec {
    name: "sockscope_listen_sockets",
    help: "Listening sockets behind the series (more than 1 for an SO_REUSEPORT group).",
    kind: Kind::Gauge,
    labels: LABELS,
};
const DROPS: FamilySpec = FamilySpec {
    name: "sockscope_listen_drops_total",
    help: "Drops charged to the listener, any reason (sk_drops of its sockets, kept across their close; sum over a netns = TcpExtListenDrops).",
    kind: Kind::Counter,
    labels: LABELS,
};
const NETNS_INFO: FamilySpec = FamilySpec {
    name: "sockscope_netns_info",
    help: "A network namespace with a listener or timewait sockets: its name (ip netns) and the lowest pid living in it; always 1.",
    kind: Kind::Gauge,
    labels: &["netns", "name", "pid", "comm"],
};
const OVERFLOWS: FamilySpec = FamilySpec {
    name: "sockscope_listen_overflows_total",
    help: "Accept queue full: stage=syn a SYN was dropped, stage=ack a handshake-completing ACK was dropped. Sum over a netns = TcpExtListenOverflows.",
    kind: Kind::Counter,
    labels: &["netns", "family", "addr", "port", "stage"],
};
const SYN_QUEUE_FULL: FamilySpec = FamilySpec {
    name: "sockscope_listen_syn_queue_full_total",
    help: "SYN queue full (or tcp_syncookies=2): action=drop (TcpExtTCPReqQFullDrop) or action=cookie (TcpExtTCPReqQFullDoCookies).",
    kind: Kind::Counter,
    labels: &["netns", "family", "addr", "port", "action"],
};
const SYNACK_RETRANSMITS: FamilySpec = FamilySpec {
    name: "sockscope_listen_synack_retransmits_total",
    help: "SYN-ACKs retransmitted for the listener.",
    kind: Kind::Counter,
    labels: LABELS,
};
const HANDSHAKES: FamilySpec = FamilySpec {
    name: "sockscope_listen_handshakes_total",
    help: "Handshakes completed into the accept queue.",
    kind: Kind::Counter,
    labels: LABELS,
};
const OCCUPANCY: FamilySpec = FamilySpec {
    name: "sockscope_listen_accept_queue_occupancy",
    help: "Accept-queue length seen at each completed handshake.",
    kind: Kind::Histogram,
    labels: LABELS,
};

/// The `listen` collector.
pub struct Listen {
    scan: Arc<Scan>,
    events: Option<Box<dyn ListenEventSource>>,
    state: Mutex<ListenState>,
}

impl Listen {
    /// Reads the listeners of `scan`'s passes and, when given, the kernel programs' counts.
    pub fn new(scan: Arc<Scan>, events: Option<Box<dyn ListenEventSource>>) -> Self {
        Self {
            scan,
            events,
            state: Mutex::new(ListenState::default()),
        }
    }
}

impl Source for Listen {
    fn name(&self) -> &'static str {
        "listen"
    }

    fn specs(&self) -> Vec<FamilySpec> {
        vec![
            ACCEPT_QUEUE_LENGTH,
            ACCEPT_QUEUE_LIMIT,
            SYN_QUEUE_LENGTH,
            SOCKETS,
            DROPS,
            NETNS_INFO,
            OVERFLOWS,
            SYN_QUEUE_FULL,
            SYNACK_RETRANSMITS,
            HANDSHAKES,
            OCCUPANCY,
        ]
    }

    fn collect(&self, _: &SelfMetrics) -> anyhow::Result<Vec<MetricFamily>> {
        // The state first: two concurrent scrapes then take and account their passes in the
        // same order, so a pass is never accounted after a newer one (which would move live
        // sockets to `closed` and count their drops twice). The scan lock comes second
        // everywhere, so this cannot deadlock with the netstat and sysctl collectors.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // The events before the pass: a listener that opens in between is then already in
        // the pass that decides which series its events belong to.
        // Without the kernel programs' counts the gauges still stand: their families are
        // then absent, and the log says why.
        let events = self.events.as_ref().and_then(|source| {
            source
                .read()
                .map_err(|e| tracing::warn!("reading the listen event counters: {e:#}"))
                .ok()
        });
        let snapshot = self.scan.snapshot(Consumer::Listen)?;
        Ok(state.collect(&snapshot, events))
    }
}

/// What the collector remembers between scrapes.
#[derive(Debug, Default)]
struct ListenState {
    /// The pass last accounted for.
    generation: u64,
    /// `(netns, cookie)` → the socket's drops.
    sockets: HashMap<(u64, u64), SocketDrops>,
    /// Drops of the closed sockets of each series.
    closed: HashMap<ListenerId, u64>,
    /// Drops of the live sockets of each series of the last pass, in the pass's order
    /// (namespace by namespace, series by series); `None` where the kernel gave no `sk_drops`.
    live_drops: Vec<Option<u64>>,
    events: EventState,
    /// Last `listen_drops_total` emitted per series, so the subtraction below never makes it
    /// go down between two scrapes.
    drops_emitted: HashMap<ListenerId, u64>,
}

#[derive(Clone, Copy, Debug)]
struct SocketDrops {
    series: ListenerId,
    /// `sk_drops` at the last read (a 32-bit counter that may wrap).
    last: u32,
    /// Drops since the socket was created, 64-bit.
    total: u64,
    /// Generation of the pass that last saw the socket.
    seen: u64,
}

/// How each namespace looked in the pass. A namespace missing from the map is gone.
type View<'a> = HashMap<u64, NsView<'a>>;

#[derive(Clone, Copy, Debug)]
enum NsView<'a> {
    /// Its listeners now.
    Read(&'a NsListeners),
    /// Entered, but the dump failed (it is vanishing, or a transient error): wait.
    Failed,
    /// Never entered (`setns` refused, e.g. without CAP_SYS_ADMIN): its listeners are unknown
    /// and will stay so.
    Blind,
}

impl<'a> NsView<'a> {
    fn of(ns: &'a NsSnapshot) -> Self {
        match (ns.entered, ns.listeners_read) {
            (_, true) => Self::Read(&ns.listeners),
            (true, false) => Self::Failed,
            (false, false) => Self::Blind,
        }
    }

    fn listeners(self) -> Option<&'a NsListeners> {
        match self {
            Self::Read(l) => Some(l),
            Self::Failed | Self::Blind => None,
        }
    }
}

/// One listener series of the page.
struct Row {
    id: ListenerId,
    labels: SeriesLabels,
    /// Its sockets now, when a live listener.
    gauges: Option<ListenSeries>,
    drops: Option<u64>,
}

impl ListenState {
    /// A handshake-completing ACK that overflows the accept queue is charged to the listener's
    /// `sk_drops` twice: once as a listen drop (`tcp_listendrop`, which `ListenDrops` counts)
    /// and once more when TCP discards the segment. The kernel program counts exactly those
    /// ACKs (`stage="ack"`), so they are taken off again to match `ListenDrops`.
    fn discount_ack_overflows(&mut self, rows: &mut [Row], view: &View<'_>) {
        let ack = self.events.ack_overflows(view);
        for row in rows.iter_mut() {
            let Some(drops) = row.drops else { continue };
            let counted = drops.saturating_sub(ack.get(&row.id).copied().unwrap_or(0));
            let emitted = self.drops_emitted.entry(row.id).or_insert(0);
            *emitted = (*emitted).max(counted);
            row.drops = Some(*emitted);
        }
        let live: HashSet<ListenerId> = rows.iter().map(|r| r.id).collect();
        self.drops_emitted.retain(|id, _| live.contains(id));
    }

    fn collect(&mut self, snapshot: &Snapshot, events: Option<ListenEvents>) -> Vec<MetricFamily> {
        let view: View<'_> = snapshot
            .namespaces
            .iter()
            .map(|ns| (ns.info.inode, NsView::of(ns)))
            .collect();
        if snapshot.generation != self.generation {
            self.generation = snapshot.generation;
            self.account_drops(snapshot, &view);
        }
        if let Some(events) = events {
            self.events.update(events, &view);
        }
        let mut rows = self.rows(snapshot, &view);
        self.discount_ack_overflows(&mut rows, &view);
        let mut out = series_families(&rows);
        out.extend(netns_info(snapshot));
        out.extend(self.events.families(&view));
        out
    }

    /// Brings the per-socket drops up to date with the pass: a socket that a readable namespace
    /// no longer lists has closed, and its last drops go to its series for good.
    fn account_drops(&mut self, snapshot: &Snapshot, view: &View<'_>) {
        let generation = snapshot.generation;
        self.live_drops.clear();
        for ns in &snapshot.namespaces {
            let netns = ns.info.inode;
            let base = self.live_drops.len();
            let series = &ns.listeners.series;
            self.live_drops.resize(base + series.len(), None);
            // Sockets and series are both sorted by (addr, port): walk them together.
            let mut k = 0;
            for s in &ns.listeners.sockets {
                while k < series.len() && (series[k].addr, series[k].port) != (s.addr, s.port) {
                    k += 1;
                }
                let Some(raw) = s.drops else { continue };
                let entry = self
                    .sockets
                    .entry((netns, s.cookie))
                    .or_insert(SocketDrops {
                        series: ListenerId {
                            netns,
                            addr: s.addr,
                            port: s.port,
                        },
                        last: raw,
                        total: u64::from(raw),
                        seen: generation,
                    });
                entry.total += u64::from(raw.wrapping_sub(entry.last));
                entry.last = raw;
                entry.seen = generation;
                if let Some(slot) = self.live_drops.get_mut(base + k) {
                    *slot = Some(slot.unwrap_or(0) + entry.total);
                }
            }
        }
        let closed = &mut self.closed;
        self.sockets.retain(|(netns, _), socket| {
            if socket.seen == generation {
                return true;
            }
            match view.get(netns) {
                // Listed before, readable now and not listed: closed.
                Some(NsView::Read(_)) => {
                    if socket.total > 0 {
                        *closed.entry(socket.series).or_insert(0) += socket.total;
                    }
                    false
                }
                // Not readable this time: nothing is known, keep it.
                Some(NsView::Failed | NsView::Blind) => true,
                // The namespace is gone, and with it its series.
                None => false,
            }
        });
        self.closed.retain(|id, _| view.contains_key(&id.netns));
    }

    /// Every listener series of the page, sorted as the registry sorts series (by label
    /// values, as strings): its sort then finds them in order and costs one comparison per
    /// series instead of a full sort of 10,000 series per family.
    fn rows(&self, snapshot: &Snapshot, view: &View<'_>) -> Vec<Row> {
        let live: usize = snapshot
            .namespaces
            .iter()
            .map(|ns| ns.listeners.series.len())
            .sum();
        let mut rows = Vec::with_capacity(live);
        let mut k = 0;
        for ns in &snapshot.namespaces {
            let netns = ns.info.inode.to_string();
            for s in &ns.listeners.series {
                let id = ListenerId {
                    netns: ns.info.inode,
                    addr: s.addr,
                    port: s.port,
                };
                let live = self.live_drops.get(k).copied().flatten();
                k += 1;
                let drops = match (live, self.closed.get(&id)) {
                    (None, None) => None,
                    (live, closed) => Some(live.unwrap_or(0) + closed.copied().unwrap_or(0)),
                };
                rows.push(Row {
                    id,
                    labels: SeriesLabels {
                        netns: netns.clone(),
                        family: family_label(s.addr),
                        addr: s.addr.to_string(),
                        port: s.port.to_string(),
                    },
                    gauges: Some(*s),
                    drops,
                });
            }
        }
        // Counters without a live listener in this pass: series whose sockets all closed, and
        // the sockets of a namespace that could not be read this time.
        let is_live = |id: &ListenerId| {
            view.get(&id.netns)
                .and_then(|v| v.listeners())
                .is_some_and(|l| l.series_at(id.addr, id.port).is_some())
        };
        let mut rest: HashMap<ListenerId, u64> = HashMap::new();
        for (id, value) in &self.closed {
            if !is_live(id) {
                *rest.entry(*id).or_insert(0) += value;
            }
        }
        for ((netns, _), socket) in &self.sockets {
            if matches!(view.get(netns), Some(NsView::Failed | NsView::Blind)) {
                *rest.entry(socket.series).or_insert(0) += socket.total;
            }
        }
        rows.extend(rest.into_iter().map(|(id, value)| Row {
            id,
            labels: SeriesLabels::new(&id),
            gauges: None,
            drops: Some(value),
        }));
        rows.sort_unstable_by(registry_order);
        rows
    }
}

/// The order of the registry (label values compared as strings), computed without comparing
/// strings in the common case: rows of one namespace and address differ only in the port, and
/// the string order of ports is the order of [`port_key`]. Different addresses of a family
/// always have different strings, so comparing strings only then gives the same order.
fn registry_order(a: &Row, b: &Row) -> std::cmp::Ordering {
    if a.id.netns != b.id.netns {
        return a.labels.netns.cmp(&b.labels.netns);
    }
    if a.id.addr != b.id.addr {
        return (a.labels.family, &a.labels.addr).cmp(&(b.labels.family, &b.labels.addr));
    }
    port_key(a.id.port).cmp(&port_key(b.id.port))
}

/// A number that orders ports as their decimal strings order ("1" < "10" < "2"): the digits
/// left-aligned, padded with a byte below '0'.
fn port_key(port: u16) -> u64 {
    let mut digits = [0u8; 8];
    let mut n = port;
    let mut len = 0;
    loop {
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    n = port;
    for i in (0..len).rev() {
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    u64::from_be_bytes(digits)
}

/// The gauges and `sockscope_listen_drops_total`, from rows in the registry's order.
fn series_families(rows: &[Row]) -> Vec<MetricFamily> {
    let mut length = Family::with_capacity(ACCEPT_QUEUE_LENGTH, rows.len());
    let mut limit = Family::with_capacity(ACCEPT_QUEUE_LIMIT, rows.len());
    let mut syn = Family::with_capacity(SYN_QUEUE_LENGTH, rows.len());
    let mut sockets = Family::with_capacity(SOCKETS, rows.len());
    let mut drops = Family::with_capacity(DROPS, rows.len());
    for row in rows {
        let labels = row.labels.values();
        if let Some(s) = &row.gauges {
            length.add(&labels, s.accept_queue as f64);
            limit.add(&labels, s.accept_queue_limit as f64);
            syn.add(&labels, s.syn_queue as f64);
            sockets.add(&labels, f64::from(s.sockets));
        }
        if let Some(value) = row.drops {
            drops.add(&labels, value as f64);
        }
    }
    [length, limit, syn, sockets, drops]
        .into_iter()
        .filter_map(Family::finish)
        .collect()
}

/// `sockscope_netns_info` for every namespace with a listener.
fn netns_info(snapshot: &Snapshot) -> Option<MetricFamily> {
    let mut rows: Vec<[String; 4]> = snapshot
        .namespaces
        .iter()
        .filter(|ns| {
            (ns.listeners_read && !ns.listeners.series.is_empty())
                || ns.timewait.as_ref().is_some_and(|t| t.total() > 0)
        })
        .map(|ns| {
            [
                ns.info.inode.to_string(),
                ns.info.name.clone(),
                ns.info.pid.map(|p| p.to_string()).unwrap_or_default(),
                ns.info.comm.clone(),
            ]
        })
        .collect();
    rows.sort_unstable();
    let mut info = Family::with_capacity(NETNS_INFO, rows.len());
    for row in &rows {
        info.add(row, 1.0);
    }
    info.finish()
}

/// The kernel programs' counts, given their series.
#[derive(Debug, Default)]
struct EventState {
    /// Listener id → its series, decided once.
    mapping: HashMap<ListenerId, ListenerId>,
    /// Highest count seen per id and kind: a count can never go down, even if the source
    /// forgets an id.
    counters: HashMap<(ListenerId, ListenEventKind), u64>,
    /// Last buckets and sum per id.
    occupancy: HashMap<ListenerId, (Vec<u64>, u64)>,
    bounds: Vec<f64>,
}

impl EventState {
    fn update(&mut self, events: ListenEvents, view: &View<'_>) {
        let mut reported: HashSet<u64> = HashSet::new();
        for (id, kind, value) in events.counters {
            reported.insert(id.netns);
            let count = self.counters.entry((id, kind)).or_insert(0);
            *count = (*count).max(value);
        }
        if events.occupancy_bounds != self.bounds {
            // Another bucket layout (a restart of the programs): old buckets cannot be merged.
            self.occupancy.clear();
            self.bounds = events.occupancy_bounds;
        }
        let sums: HashMap<ListenerId, u64> = events.occupancy_sums.into_iter().collect();
        for (id, buckets) in events.occupancy {
            if buckets.len() != self.bounds.len() {
                tracing::debug!(?id, "occupancy buckets do not match the bounds; ignored");
                continue;
            }
            reported.insert(id.netns);
            let sum = sums.get(&id).copied().unwrap_or(0);
            let count: u64 = buckets.iter().sum();
            match self.occupancy.get_mut(&id) {
                Some(old) if old.0.iter().sum::<u64>() > count => {} // never go down
                Some(old) => *old = (buckets, sum),
                None => {
                    self.occupancy.insert(id, (buckets, sum));
                }
            }
        }
        // Forget only what belongs to a namespace that is gone and that the source no longer
        // reports: what remains is bounded by the namespaces alive.
        let keep = |id: &ListenerId| view.contains_key(&id.netns) || reported.contains(&id.netns);
        self.counters.retain(|(id, _), _| keep(id));
        self.occupancy.retain(|id, _| keep(id));
        self.mapping.retain(|id, _| keep(id));
    }

    /// The series of `id`, decided the first time and never again; `None` while its namespace
    /// exists but its dump failed (decided at a later scrape). Where the agent cannot see the
    /// listeners (a namespace gone, never found, or that it may not enter) the id stands as
    /// it is.
    fn series(&mut self, id: ListenerId, view: &View<'_>) -> Option<ListenerId> {
        if let Some(series) = self.mapping.get(&id) {
            return Some(*series);
        }
        let series = match view.get(&id.netns) {
            Some(NsView::Read(listeners)) => resolve(listeners, id),
            Some(NsView::Failed) => return None,
            Some(NsView::Blind) | None => id,
        };
        self.mapping.insert(id, series);
        Some(series)
    }

    /// ACK-stage overflows per series.
    fn ack_overflows(&mut self, view: &View<'_>) -> HashMap<ListenerId, u64> {
        let ids: Vec<(ListenerId, u64)> = self
            .counters
            .iter()
            .filter(|((_, kind), _)| *kind == ListenEventKind::OverflowAck)
            .map(|((id, _), v)| (*id, *v))
            .collect();
        let mut out = HashMap::new();
        for (id, value) in ids {
            if let Some(series) = self.series(id, view) {
                *out.entry(series).or_insert(0) += value;
            }
        }
        out
    }

    fn families(&mut self, view: &View<'_>) -> Vec<MetricFamily> {
        let mut totals: HashMap<(ListenerId, ListenEventKind), u64> = HashMap::new();
        let ids: Vec<((ListenerId, ListenEventKind), u64)> =
            self.counters.iter().map(|(k, v)| (*k, *v)).collect();
        for ((id, kind), value) in ids {
            // Both kinds of ACK-stage overflow make one series.
            let kind = match kind {
                ListenEventKind::OverflowAckUnqueued => ListenEventKind::OverflowAck,
                other => other,
            };
            if let Some(series) = self.series(id, view) {
                *totals.entry((series, kind)).or_insert(0) += value;
            }
        }
        // In the registry's order (see `ListenState::rows`).
        let mut totals: Vec<(SeriesLabels, ListenEventKind, u64)> = totals
            .into_iter()
            .map(|((series, kind), value)| (SeriesLabels::new(&series), kind, value))
            .collect();
        totals.sort_unstable_by(|a, b| {
            (a.0.values(), event_label(a.1)).cmp(&(b.0.values(), event_label(b.1)))
        });
        let mut overflows = OVERFLOWS.family();
        let mut syn_full = SYN_QUEUE_FULL.family();
        let mut retransmits = SYNACK_RETRANSMITS.family();
        let mut handshakes = HANDSHAKES.family();
        for (labels, kind, value) in &totals {
            let [netns, family, addr, port] = labels.values();
            let with_extra = [netns, family, addr, port, event_label(*kind)];
            let value = *value as f64;
            match kind {
                ListenEventKind::OverflowSyn
                | ListenEventKind::OverflowAck
                | ListenEventKind::OverflowAckUnqueued => {
                    overflows.add(&with_extra, value);
                }
                ListenEventKind::SynQueueFullDrop | ListenEventKind::SynQueueFullCookie => {
                    syn_full.add(&with_extra, value);
                }
                ListenEventKind::SynackRetransmit => retransmits.add(&labels.values(), value),
                ListenEventKind::Handshake => handshakes.add(&labels.values(), value),
            }
        }

        let mut by_series: HashMap<ListenerId, (Vec<u64>, u64)> = HashMap::new();
        let ids: Vec<ListenerId> = self.occupancy.keys().copied().collect();
        for id in ids {
            let Some(series) = self.series(id, view) else {
                continue;
            };
            let Some((buckets, sum)) = self.occupancy.get(&id) else {
                continue;
            };
            let entry = by_series
                .entry(series)
                .or_insert_with(|| (vec![0; buckets.len()], 0));
            for (total, count) in entry.0.iter_mut().zip(buckets) {
                *total += count;
            }
            entry.1 += sum;
        }
        let mut histograms: Vec<(SeriesLabels, Vec<u64>, u64)> = by_series
            .into_iter()
            // A listener without a handshake yet has nothing to show.
            .filter(|(_, (buckets, _))| buckets.iter().any(|c| *c != 0))
            .map(|(series, (buckets, sum))| (SeriesLabels::new(&series), buckets, sum))
            .collect();
        histograms.sort_unstable_by(|a, b| a.0.values().cmp(&b.0.values()));
        let mut occupancy = OCCUPANCY.family();
        for (labels, buckets, sum) in &histograms {
            occupancy.add_histogram(&labels.values(), &self.bounds, buckets, *sum as f64);
        }
        [overflows, syn_full, retransmits, handshakes, occupancy]
            .into_iter()
            .filter_map(Family::finish)
            .collect()
    }
}

/// The series an event at `id` belongs to: the listener with exactly that id, else the
/// wildcard listener of the same family and port, else a dual-stack `::` listener for an IPv4
/// id, else the id as it is (a listener that came and went between two passes).
pub fn resolve(listeners: &NsListeners, id: ListenerId) -> ListenerId {
    if listeners.series_at(id.addr, id.port).is_some() {
        return id;
    }
    let wildcard = unspecified(id.addr);
    if listeners.series_at(wildcard, id.port).is_some() {
        return ListenerId {
            addr: wildcard,
            ..id
        };
    }
    let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    if id.addr.is_ipv4()
        && listeners
            .series_at(any6, id.port)
            .is_some_and(|s| !s.v6only)
    {
        return ListenerId { addr: any6, ..id };
    }
    id
}

/// The `stage` or `action` label of an event kind ("" for those without one).
fn event_label(kind: ListenEventKind) -> &'static str {
    match kind {
        ListenEventKind::OverflowSyn => "syn",
        ListenEventKind::OverflowAck | ListenEventKind::OverflowAckUnqueued => "ack",
        ListenEventKind::SynQueueFullDrop => "drop",
        ListenEventKind::SynQueueFullCookie => "cookie",
        ListenEventKind::SynackRetransmit | ListenEventKind::Handshake => "",
    }
}

fn family_label(addr: IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => "ipv4",
        IpAddr::V6(_) => "ipv6",
    }
}

/// The label values of one series.
struct SeriesLabels {
    netns: String,
    family: &'static str,
    addr: String,
    port: String,
}

impl SeriesLabels {
    fn new(id: &ListenerId) -> Self {
        Self {
            netns: id.netns.to_string(),
            family: family_label(id.addr),
            addr: id.addr.to_string(),
            port: id.port.to_string(),
        }
    }

    fn values(&self) -> [&str; 4] {
        [&self.netns, self.family, &self.addr, &self.port]
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder as _, TextEncoder};

    use super::*;
    use crate::listeners::ListenSocket;

    const NS: u64 = 4026531000;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn id(addr: &str, port: u16) -> ListenerId {
        ListenerId {
            netns: NS,
            addr: ip(addr),
            port,
        }
    }

    fn socket(addr: &str, port: u16, cookie: u64, drops: u32) -> ListenSocket {
        ListenSocket {
            addr: ip(addr),
            port,
            accept_queue: 1,
            accept_queue_limit: 4,
            drops: Some(drops),
            cookie,
            inode: 0,
            v6only: false,
        }
    }

    fn listeners(sockets: &[ListenSocket]) -> NsListeners {
        NsListeners::from_sockets(sockets.to_vec())
    }

    fn snapshot(generation: u64, sockets: &[ListenSocket]) -> Snapshot {
        Snapshot {
            generation,
            own: NS,
            namespaces: vec![NsSnapshot {
                info: NetnsInfo {
                    inode: NS,
                    name: "blue".into(),
                    pid: Some(1),
                    comm: "init".into(),
                },
                entered: true,
                listeners_read: true,
                listeners: listeners(sockets),
                netstat: None,
                sysctl: None,
                timewait: None,
            }],
        }
    }

    fn text(families: &[MetricFamily]) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(families, &mut out)
            .expect("encodes");
        String::from_utf8(out).expect("utf-8")
    }

    fn value(families: &[MetricFamily], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = families.iter().find(|f| f.name() == name)?;
        let metric = family.get_metric().iter().find(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })?;
        Some(
            if family.get_field_type() == prometheus::proto::MetricType::COUNTER {
                metric.get_counter().get_value()
            } else {
                metric.get_gauge().get_value()
            },
        )
    }

    /// A fake event source: what the kernel programs would have counted.
    struct Fake(Mutex<ListenEvents>);

    impl ListenEventSource for Fake {
        fn read(&self) -> anyhow::Result<ListenEvents> {
            Ok(self.0.lock().expect("lock").clone())
        }
    }

    fn events(counters: &[(ListenerId, ListenEventKind, u64)]) -> ListenEvents {
        ListenEvents {
            counters: counters.to_vec(),
            ..ListenEvents::default()
        }
    }

    #[test]
    fn events_go_to_the_exact_listener_else_the_wildcard_else_as_they_are() {
        let snap = snapshot(
            1,
            &[
                socket("127.0.0.1", 80, 1, 0),
                socket("0.0.0.0", 8080, 2, 0),
                socket("::", 443, 3, 0),
            ],
        );
        let mut state = ListenState::default();
        let fake = Fake(Mutex::new(events(&[
            (id("127.0.0.1", 80), ListenEventKind::OverflowSyn, 3),
            (id("10.1.2.3", 8080), ListenEventKind::OverflowAck, 5),
            (id("127.0.0.1", 8080), ListenEventKind::OverflowAck, 1),
            (id("10.1.2.3", 443), ListenEventKind::Handshake, 7),
            (id("::ffff:10.1.2.3", 443), ListenEventKind::Handshake, 1),
            (id("10.9.9.9", 9999), ListenEventKind::SynQueueFullCookie, 2),
        ])));
        let out = state.collect(&snap, Some(fake.read().expect("read")));
        let labels = |addr: &'static str,
                      port: &'static str,
                      extra: Option<(&'static str, &'static str)>| {
            let mut l = vec![("netns", "4026531000"), ("addr", addr), ("port", port)];
            l.extend(extra);
            l
        };
        let overflows = "sockscope_listen_overflows_total";
        assert_eq!(
            value(
                &out,
                overflows,
                &labels("127.0.0.1", "80", Some(("stage", "syn")))
            ),
            Some(3.0)
        );
        assert_eq!(
            value(
                &out,
                overflows,
                &labels("0.0.0.0", "8080", Some(("stage", "ack")))
            ),
            Some(6.0),
            "two addresses on one wildcard listener add up"
        );
        assert_eq!(
            value(
                &out,
                "sockscope_listen_handshakes_total",
                &labels("::", "443", None)
            ),
            Some(8.0),
            "IPv4 on a dual-stack listener, plain and v4-mapped"
        );
        assert_eq!(
            value(
                &out,
                "sockscope_listen_syn_queue_full_total",
                &labels("10.9.9.9", "9999", Some(("action", "cookie")))
            ),
            Some(2.0),
            "no listener: as it is"
        );
    }

    #[test]
    fn a_mapping_never_moves_and_counts_never_go_down() {
        let mut state = ListenState::default();
        // First seen while only the wildcard listens: the wildcard's.
        let snap = snapshot(1, &[socket("0.0.0.0", 80, 1, 0)]);
        let ev = events(&[(id("127.0.0.1", 80), ListenEventKind::OverflowSyn, 2)]);
        let out = state.collect(&snap, Some(ev));
        let wild = [("addr", "0.0.0.0"), ("stage", "syn")];
        assert_eq!(
            value(&out, "sockscope_listen_overflows_total", &wild),
            Some(2.0)
        );

        // The listener closes, and a 127.0.0.1:80 listener appears: the id stays where it was.
        let snap = snapshot(2, &[socket("127.0.0.1", 80, 5, 0)]);
        let ev = events(&[(id("127.0.0.1", 80), ListenEventKind::OverflowSyn, 4)]);
        let out = state.collect(&snap, Some(ev));
        assert_eq!(
            value(&out, "sockscope_listen_overflows_total", &wild),
            Some(4.0)
        );
        assert_eq!(
            value(
                &out,
                "sockscope_listen_overflows_total",
                &[("addr", "127.0.0.1"), ("stage", "syn")]
            ),
            None
        );

        // The source forgets the id (or reports less): the count stays.
        let out = state.collect(&snapshot(3, &[]), Some(events(&[])));
        assert_eq!(
            value(&out, "sockscope_listen_overflows_total", &wild),
            Some(4.0)
        );
    }

    #[test]
    fn a_failed_dump_defers_the_decision_and_keeps_the_drops() {
        let mut state = ListenState::default();
        state.collect(&snapshot(1, &[socket("0.0.0.0", 80, 1, 4)]), None);
        let mut snap = snapshot(2, &[]);
        snap.namespaces[0].listeners_read = false;
        let ev = events(&[(id("127.0.0.1", 80), ListenEventKind::Handshake, 1)]);
        let out = state.collect(&snap, Some(ev.clone()));
        assert!(
            !out.iter()
                .any(|f| f.name() == "sockscope_listen_handshakes_total")
        );
        assert_eq!(
            value(&out, "sockscope_listen_drops_total", &[("addr", "0.0.0.0")]),
            Some(4.0),
            "the socket is not known to be closed"
        );
        assert_eq!(
            value(&out, "sockscope_listen_sockets", &[("addr", "0.0.0.0")]),
            None
        );
        let out = state.collect(&snapshot(3, &[socket("0.0.0.0", 80, 1, 5)]), Some(ev));
        assert_eq!(
            value(
                &out,
                "sockscope_listen_handshakes_total",
                &[("addr", "0.0.0.0")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&out, "sockscope_listen_drops_total", &[("addr", "0.0.0.0")]),
            Some(5.0)
        );
    }

    #[test]
    fn a_namespace_that_cannot_be_entered_keeps_its_ids_as_they_are() {
        let mut state = ListenState::default();
        let mut snap = snapshot(1, &[]);
        snap.namespaces[0].entered = false;
        snap.namespaces[0].listeners_read = false;
        let ev = events(&[(id("127.0.0.1", 80), ListenEventKind::Handshake, 1)]);
        let out = state.collect(&snap, Some(ev));
        assert_eq!(
            value(
                &out,
                "sockscope_listen_handshakes_total",
                &[("addr", "127.0.0.1")]
            ),
            Some(1.0)
        );
    }

    #[test]
    fn a_gone_namespace_is_forgotten() {
        let mut state = ListenState::default();
        let gone = ListenerId {
            netns: 99,
            ..id("0.0.0.0", 80)
        };
        let ev = events(&[(gone, ListenEventKind::Handshake, 1)]);
        let out = state.collect(&snapshot(1, &[]), Some(ev));
        assert_eq!(
            value(
                &out,
                "sockscope_listen_handshakes_total",
                &[("netns", "99")]
            ),
            Some(1.0),
            "reported: shown as it is"
        );
        let out = state.collect(&snapshot(2, &[]), Some(events(&[])));
        assert!(
            !out.iter()
                .any(|f| f.name() == "sockscope_listen_handshakes_total")
        );
        assert!(state.events.mapping.is_empty() && state.events.counters.is_empty());
    }

    #[test]
    fn the_occupancy_histogram_sums_per_series_and_skips_empty_ones() {
        let mut state = ListenState::default();
        let snap = snapshot(
            1,
            &[socket("0.0.0.0", 80, 1, 0), socket("0.0.0.0", 81, 2, 0)],
        );
        let ev = ListenEvents {
            counters: Vec::new(),
            occupancy: vec![
                (id("10.0.0.1", 80), vec![1, 2, 0]),
                (id("10.0.0.2", 80), vec![0, 1, 1]),
                (id("0.0.0.0", 81), vec![0, 0, 0]),
            ],
            occupancy_sums: vec![(id("10.0.0.1", 80), 5), (id("10.0.0.2", 80), 40)],
            occupancy_bounds: vec![0.0, 4.0, f64::INFINITY],
        };
        let out = state.collect(&snap, Some(ev));
        let page = text(&out);
        let series = "{netns=\"4026531000\",family=\"ipv4\",addr=\"0.0.0.0\",port=\"80\"";
        for line in [
            format!("sockscope_listen_accept_queue_occupancy_bucket{series},le=\"0\"}} 1"),
            format!("sockscope_listen_accept_queue_occupancy_bucket{series},le=\"4\"}} 4"),
            format!("sockscope_listen_accept_queue_occupancy_bucket{series},le=\"+Inf\"}} 5"),
            format!("sockscope_listen_accept_queue_occupancy_sum{series}}} 45"),
            format!("sockscope_listen_accept_queue_occupancy_count{series}}} 5"),
        ] {
            assert!(page.contains(&line), "{line}\nnot in\n{page}");
        }
        assert!(!page.contains(
            "occupancy_count{netns=\"4026531000\",family=\"ipv4\",addr=\"0.0.0.0\",port=\"81\""
        ));
        assert!(!page.contains("le=\"inf\""));
    }

    #[test]
    fn drops_survive_the_close_of_their_socket() {
        let mut state = ListenState::default();
        let drops = |out: &[MetricFamily]| {
            value(
                out,
                "sockscope_listen_drops_total",
                &[("addr", "0.0.0.0"), ("port", "80")],
            )
        };
        // Two sockets of one reuseport group.
        let a = socket("0.0.0.0", 80, 1, 5);
        let b = socket("0.0.0.0", 80, 2, 7);
        let out = state.collect(&snapshot(1, &[a, b]), None);
        assert_eq!(drops(&out), Some(12.0));
        assert_eq!(
            value(&out, "sockscope_listen_sockets", &[("port", "80")]),
            Some(2.0)
        );
        // b closes after 3 more drops, a gets 1 more.
        let a2 = socket("0.0.0.0", 80, 1, 6);
        let b2 = socket("0.0.0.0", 80, 2, 10);
        state.collect(&snapshot(2, &[a2, b2]), None);
        let out = state.collect(&snapshot(3, &[a2]), None);
        assert_eq!(drops(&out), Some(16.0), "6 live + 10 closed");
        // A new socket on the series starts from its own sk_drops.
        let c = socket("0.0.0.0", 80, 3, 2);
        let out = state.collect(&snapshot(4, &[a2, c]), None);
        assert_eq!(drops(&out), Some(18.0));
        // Every socket closed: the series stays with its count; gauges go.
        let out = state.collect(&snapshot(5, &[]), None);
        assert_eq!(drops(&out), Some(18.0));
        assert_eq!(
            value(&out, "sockscope_listen_sockets", &[("port", "80")]),
            None
        );
        // The namespace goes: so does the series.
        let mut gone = snapshot(6, &[]);
        gone.namespaces.clear();
        let out = state.collect(&gone, None);
        assert_eq!(drops(&out), None);
        assert!(state.sockets.is_empty() && state.closed.is_empty());
    }

    #[test]
    fn ack_overflows_of_both_kinds_make_one_series_and_only_discarded_ones_leave_the_drops() {
        let mut state = ListenState::default();
        let listener = &[("addr", "0.0.0.0"), ("port", "80")];
        // sk_drops 10: 2 SYN-stage drops, 3 discarded ACKs charged twice, 2 cookie ACKs once.
        let snap = snapshot(1, &[socket("0.0.0.0", 80, 1, 10)]);
        let ev = events(&[
            (id("0.0.0.0", 80), ListenEventKind::OverflowSyn, 2),
            (id("0.0.0.0", 80), ListenEventKind::OverflowAck, 3),
            (id("0.0.0.0", 80), ListenEventKind::OverflowAckUnqueued, 2),
        ]);
        let out = state.collect(&snap, Some(ev));
        let stage = |s: &'static str| {
            let mut labels = listener.to_vec();
            labels.push(("stage", s));
            value(&out, "sockscope_listen_overflows_total", &labels)
        };
        assert_eq!(stage("ack"), Some(5.0));
        assert_eq!(stage("syn"), Some(2.0));
        assert_eq!(
            value(&out, "sockscope_listen_drops_total", listener),
            Some(7.0)
        );
    }

    #[test]
    fn a_wrapping_sk_drops_keeps_counting() {
        let mut state = ListenState::default();
        state.collect(&snapshot(1, &[socket("::1", 80, 1, u32::MAX - 1)]), None);
        let out = state.collect(&snapshot(2, &[socket("::1", 80, 1, 3)]), None);
        assert_eq!(
            value(
                &out,
                "sockscope_listen_drops_total",
                &[("addr", "::1"), ("family", "ipv6")]
            ),
            Some(f64::from(u32::MAX) + 4.0)
        );
    }

    #[test]
    fn port_keys_order_like_strings() {
        let mut ports: Vec<u16> = vec![0, 1, 2, 9, 10, 80, 99, 100, 443, 8080, 9844, 12345, 65535];
        let mut strings: Vec<String> = ports.iter().map(ToString::to_string).collect();
        strings.sort();
        ports.sort_by_key(|p| port_key(*p));
        let ours: Vec<String> = ports.iter().map(ToString::to_string).collect();
        assert_eq!(ours, strings);
    }

    #[test]
    fn series_come_out_in_the_registry_order() {
        let mut state = ListenState::default();
        let out = state.collect(
            &snapshot(
                1,
                &[
                    socket("127.0.0.1", 9844, 1, 0),
                    socket("127.0.0.1", 10000, 2, 0),
                    socket("10.0.0.1", 80, 3, 0),
                    socket("::", 80, 4, 0),
                    socket("0.0.0.0", 443, 5, 0),
                ],
            ),
            None,
        );
        let family = out
            .iter()
            .find(|f| f.name() == "sockscope_listen_sockets")
            .expect("family");
        let got: Vec<Vec<String>> = family
            .get_metric()
            .iter()
            .map(|m| m.get_label().iter().map(|l| l.value().to_owned()).collect())
            .collect();
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(got, sorted);
    }

    #[test]
    fn netns_info_names_namespaces_with_listeners() {
        let mut state = ListenState::default();
        let out = state.collect(&snapshot(1, &[socket("0.0.0.0", 80, 1, 0)]), None);
        assert_eq!(
            value(
                &out,
                "sockscope_netns_info",
                &[
                    ("netns", "4026531000"),
                    ("name", "blue"),
                    ("pid", "1"),
                    ("comm", "init")
                ]
            ),
            Some(1.0)
        );
        let out = state.collect(&snapshot(2, &[]), None);
        assert!(!out.iter().any(|f| f.name() == "sockscope_netns_info"));
    }
}
