//! Named filters counted in the kernel: `--filter NAME=EXPR` on each `--iface`.
//!
//! Each filter is compiled by libpcap on a live handle of each interface. Normally all the
//! filters of an interface run as one eBPF program ([`translate::translate_many`]) on the
//! interface's one packet socket, which it shares with the built-in classifier
//! ([`super::taps`]): each counts the packets its classic program accepts, and their bytes,
//! in its slot of a per-CPU array ([`CountMap`]), the program then hands the packet on to
//! the classifier, and returns 0, so nothing is queued. Where that fails, each filter gets
//! a socket of its own, translated alone (counting in a second run of slots) or, if
//! it cannot be translated (or with `--filter.mode classic`), carrying the classic program
//! itself: such a socket is never read and its receive buffer is as small as the kernel
//! allows, so matching packets are counted by the kernel (`PACKET_STATISTICS`: `tp_packets`
//! includes the ones dropped for want of room) and dropped before any copy. Reading the
//! statistics resets them: they are added up here, under a lock, at every scrape and every
//! few seconds (the kernel's counter is 32 bits wide).
//!
//! On a loopback interface the outgoing copy of each packet is left out, as libpcap does, so
//! the count equals tcpdump's: by `PACKET_IGNORE_OUTGOING` on a filter's own socket, by the
//! combined program itself on the shared one ([`super::taps`]). The interfaces are those of
//! the agent's own network namespace.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use prometheus::proto::MetricFamily;

use super::{
    bpf_sys::{self, CountMap},
    compile::{self, CompileError, Program},
    translate,
};
use crate::metrics::{
    SelfMetrics, Source,
    family::{FamilySpec, Kind},
};

/// `--filter NAME=EXPR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterSpec {
    /// The `filter` label.
    pub name: String,
    /// The pcap-filter(7) expression.
    pub expr: String,
}

impl std::str::FromStr for FilterSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((name, expr)) = s.split_once('=') else {
            return Err(format!(
                "`{s}`: a filter is NAME=EXPR, e.g. --filter 'syn80=tcp dst port 80 and tcp[tcpflags] & tcp-syn != 0'"
            ));
        };
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(format!(
                "`{name}`: a filter name takes letters, digits, `_`, `-` and `.` only"
            ));
        }
        if expr.trim().is_empty() {
            return Err(format!("filter `{name}` has an empty expression"));
        }
        Ok(Self {
            name: name.to_string(),
            expr: expr.trim().to_string(),
        })
    }
}

/// `PACKET_IGNORE_OUTGOING`.
pub(super) const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// One never-read packet socket with a classic BPF program, on one interface.
pub struct CountingSocket {
    fd: OwnedFd,
    presence: Presence,
    total: u64,
    /// Counts in the [`CountMap`] (a translated program) rather than in its statistics.
    in_map: bool,
}

/// An interface watched, known by its index: says once when it has gone.
struct Presence {
    iface: String,
    ifindex: u32,
    gone: bool,
}

impl Presence {
    fn check(&mut self) {
        let present = nix::net::if_::if_nametoindex(self.iface.as_str()) == Ok(self.ifindex);
        if !present && !self.gone {
            tracing::warn!(
                iface = %self.iface,
                "interface `{}` has gone: its filters count nothing more until the agent restarts",
                self.iface
            );
        }
        self.gone = !present;
    }
}

/// Leaves the outgoing copy of each packet out of the socket `fd` (loopback's second copy).
pub(super) fn ignore_outgoing(fd: &OwnedFd) -> anyhow::Result<()> {
    setsockopt(
        fd,
        libc::SOL_PACKET,
        PACKET_IGNORE_OUTGOING,
        &1 as &libc::c_int,
    )
    .context("PACKET_IGNORE_OUTGOING (Linux 4.20 or later)")
}

/// `setsockopt(2)` with a value of type `T`.
pub(super) fn setsockopt<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: `value` points to a live T of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `iface` is a loopback interface.
pub fn is_loopback(iface: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/type"))
        .ok()
        .and_then(|t| t.trim().parse::<u16>().ok())
        == Some(libc::ARPHRD_LOOPBACK)
        || iface == "lo"
}

/// A packet socket bound to `iface` (of the current network namespace) for every protocol,
/// with `attach` run on it before the bind, so that no packet arrives before its filter.
/// Returns the socket and the interface index.
pub fn packet_socket(
    iface: &str,
    attach: impl FnOnce(&OwnedFd) -> anyhow::Result<()>,
) -> anyhow::Result<(OwnedFd, u32)> {
    let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|_| {
        anyhow::anyhow!("interface `{iface}` does not exist in the agent's network namespace")
    })?;
    // Protocol 0: no packet is queued until the bind below, after the filter is in.
    // SAFETY: plain socket(2).
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error())
            .context("opening a packet socket (needs CAP_NET_RAW)");
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    attach(&fd)?;
    // SAFETY: zeroed sockaddr_ll, then filled.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding a packet socket to `{iface}`"));
    }
    Ok((fd, ifindex))
}

impl CountingSocket {
    /// Opens the socket on `iface` with `program` attached before any packet can arrive:
    /// its translation `translated` (a loaded eBPF program counting into the map) when
    /// given, else the classic program itself.
    pub fn open(
        iface: &str,
        program: &Program,
        translated: Option<&OwnedFd>,
    ) -> anyhow::Result<Self> {
        let loopback = is_loopback(iface);
        let (fd, ifindex) = packet_socket(iface, |fd| {
            if let Some(prog) = translated {
                let prog_fd: libc::c_int = prog.as_raw_fd();
                setsockopt(fd, libc::SOL_SOCKET, bpf_sys::SO_ATTACH_BPF, &prog_fd)
                    .context("attaching the translated program")?;
            } else {
                let prog = libc::sock_fprog {
                    len: program.insns.len() as u16,
                    filter: program.insns.as_ptr().cast_mut(),
                };
                setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)
                    .context("attaching the classic BPF program")?;
            }
            // The kernel raises it to its minimum: a couple of packets stay queued, the
            // rest are counted and dropped.
            setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &0 as &libc::c_int)
                .context("shrinking the receive buffer")?;
            if loopback {
                ignore_outgoing(fd)?;
            }
            Ok(())
        })?;
        Ok(Self {
            fd,
            presence: Presence {
                iface: iface.to_string(),
                ifindex,
                gone: false,
            },
            total: 0,
            in_map: translated.is_some(),
        })
    }

    /// Adds the kernel's count since the last read (which the read resets) and returns the
    /// total.
    pub fn poll(&mut self) -> u64 {
        if self.in_map {
            self.presence.check();
            return 0;
        }
        let mut stats = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: a tpacket_stats buffer of the length given.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut stats as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            self.total += u64::from(stats.tp_packets);
        }
        self.presence.check();
        self.total
    }
}

/// A named filter's sockets, one per interface.
pub struct NamedFilter {
    /// The `filter` label.
    pub name: String,
    /// Its own sockets (where it does not share the interface's combined program).
    sockets: Vec<CountingSocket>,
    /// Interfaces where the combined program counts it.
    shared: usize,
}

/// The named filters of a running agent.
#[derive(Clone)]
pub struct NamedFilters {
    /// Set when these filters are replaced: their polling thread ends and lets them go.
    retired: Arc<std::sync::atomic::AtomicBool>,
    filters: Arc<Mutex<Vec<NamedFilter>>>,
    /// Per interface, the program running every filter's translation, for its tap.
    combined: Arc<Vec<(String, Arc<OwnedFd>)>>,
    /// The interfaces of `combined`.
    presence: Arc<Mutex<Vec<Presence>>>,
    map: Option<Arc<CountMap>>,
}

/// A filter's counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Totals {
    /// The `filter` label.
    pub name: String,
    /// Packets matched.
    pub packets: u64,
    /// Their bytes, when every socket of the filter runs the translated program.
    pub bytes: Option<u64>,
    /// The part of `packets` and `bytes` counted on the filter's own sockets: a reload
    /// opens the new ones before the old ones close, so both count the packets between.
    /// (The combined programs take over from each other on one socket in one step.)
    pub own: (u64, u64),
}

/// Why the named filters could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad flags or an expression libpcap rejects: a usage error (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Anything else.
    #[error("{0:#}")]
    Other(anyhow::Error),
}

impl NamedFilters {
    /// Compiles every filter for every interface and opens their sockets. A missing
    /// interface is skipped with a warning; an invalid or oversized expression fails.
    pub fn start(
        specs: &[FilterSpec],
        ifaces: &[String],
        mode: super::FilterMode,
        taps: &super::taps::Taps,
    ) -> Result<Self, StartError> {
        if ifaces.is_empty() {
            return Err(StartError::Usage(
                "--filter needs the interfaces to watch: add --iface IFACE (repeatable)".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for spec in specs {
            if !seen.insert(spec.name.as_str()) {
                return Err(StartError::Usage(format!(
                    "filter name `{}` is given twice; each --filter needs its own name",
                    spec.name
                )));
            }
        }
        // Syntax first, on a dead handle: an invalid expression fails even when no
        // interface is there to compile on.
        for spec in specs {
            compile::compile_dead(pcap::Linktype::ETHERNET, &spec.expr)
                .map_err(|e| usage(&spec.name, e))?;
        }
        // Slot i: filter i in the interfaces' combined programs; slot n + i: filter i on
        // its own sockets, translated alone.
        let slots = specs.len() as u32;
        let map = match CountMap::create(2 * slots) {
            _ if mode == super::FilterMode::Classic => None,
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                tracing::warn!(
                    "cannot create the filters' counter map ({e}): they count packets only, no bytes"
                );
                None
            }
        };
        let mut filters: Vec<NamedFilter> = specs
            .iter()
            .map(|s| NamedFilter {
                name: s.name.clone(),
                sockets: Vec::new(),
                shared: 0,
            })
            .collect();
        let mut combined = Vec::new();
        let mut presence = Vec::new();
        for iface in ifaces {
            let handle = match compile::open_live_for_compile(iface) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!("{e}; the filters skip it");
                    continue;
                }
            };
            let mut programs = Vec::with_capacity(specs.len());
            for spec in specs {
                let program =
                    compile::compile_on(&handle, &spec.expr).map_err(|e| usage(&spec.name, e))?;
                program.check_size(&spec.name).map_err(StartError::Usage)?;
                programs.push(program);
            }
            // All the filters in one program, on the interface's one tap: the cheap way.
            if let Some(map) = map.as_ref().filter(|_| !programs.is_empty()) {
                let loaded = {
                    let list: Vec<(&[libc::sock_filter], u32)> = programs
                        .iter()
                        .enumerate()
                        .map(|(i, p)| (p.insns.as_slice(), i as u32))
                        .collect();
                    let load = |variable_stack: bool| {
                        taps.handover(iface)
                            .map_err(|e| format!("no program array: {e}"))
                            .and_then(|handover| {
                                translate::translate_many_with(
                                    &list,
                                    map.raw_fd(),
                                    Some(handover),
                                    variable_stack,
                                )
                                .map_err(|e| e.to_string())
                            })
                            .and_then(|insns| bpf_sys::load_socket_filter(&insns, "sockscope_filt"))
                    };
                    // An older kernel refuses the variable stack offsets: without them.
                    load(true).or_else(|_| load(false))
                };
                match loaded {
                    Ok(fd) => {
                        let ifindex = nix::net::if_::if_nametoindex(iface.as_str())
                            .with_context(|| format!("interface `{iface}`"))
                            .map_err(StartError::Other)?;
                        combined.push((iface.clone(), Arc::new(fd)));
                        presence.push(Presence {
                            iface: iface.clone(),
                            ifindex,
                            gone: false,
                        });
                        for filter in &mut filters {
                            filter.shared += 1;
                        }
                        tracing::info!(
                            iface,
                            filters = specs.len(),
                            "counting the named filters in the kernel, in one program"
                        );
                        continue;
                    }
                    Err(e) => tracing::debug!(
                        iface,
                        "the filters do not run as one program ({e}); one socket each"
                    ),
                }
            }
            for (index, (program, (spec, filter))) in programs
                .iter()
                .zip(specs.iter().zip(filters.iter_mut()))
                .enumerate()
            {
                let translated = map.as_ref().and_then(|map| {
                    let slot = slots + index as u32;
                    let load = |variable_stack: bool| {
                        let list = [(program.insns.as_slice(), slot)];
                        translate::translate_many_with(&list, map.raw_fd(), None, variable_stack)
                            .map_err(|e| e.to_string())
                            .and_then(|insns| bpf_sys::load_socket_filter(&insns, "sockscope_filt"))
                    };
                    // An older kernel refuses the variable stack offsets: without them.
                    let loaded = load(true).or_else(|_| load(false));
                    match loaded {
                        Ok(fd) => Some(fd),
                        Err(e) => {
                            tracing::warn!(
                                filter = %spec.name,
                                iface,
                                "counting packets only, no bytes: the program could not be translated to eBPF: {e}"
                            );
                            None
                        }
                    }
                });
                let socket = CountingSocket::open(iface, program, translated.as_ref())
                    .with_context(|| format!("filter `{}` on `{iface}`", spec.name))
                    .map_err(StartError::Other)?;
                filter.sockets.push(socket);
            }
            tracing::info!(
                iface,
                filters = specs.len(),
                "counting the named filters in the kernel"
            );
        }
        Ok(Self {
            retired: Arc::default(),
            filters: Arc::new(Mutex::new(filters)),
            combined: Arc::new(combined),
            presence: Arc::new(Mutex::new(presence)),
            map,
        })
    }

    /// The combined program of each interface, for [`super::taps::Taps::set_filters`].
    pub fn programs(&self) -> &[(String, Arc<OwnedFd>)] {
        &self.combined
    }

    /// The counts of every filter with at least one interface.
    pub fn totals(&self) -> Vec<Totals> {
        // Notices interfaces that went away.
        for p in self
            .presence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            p.check();
        }
        let mut filters = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        let slots = filters.len() as u32;
        let mut out = Vec::new();
        for (index, f) in filters.iter_mut().enumerate() {
            if f.sockets.is_empty() && f.shared == 0 {
                continue;
            }
            let mut own: (u64, u64) = (f.sockets.iter_mut().map(|s| s.poll()).sum(), 0);
            let mut shared = (0, 0);
            let all_in_map = f.sockets.iter().all(|s| s.in_map);
            let read = |slot: u32| match self.map.as_ref().map(|m| m.read(slot)) {
                Some(Ok(counts)) => counts,
                Some(Err(e)) => {
                    tracing::warn!(filter = %f.name, "reading the counter map: {e}");
                    (0, 0)
                }
                None => (0, 0),
            };
            if f.shared > 0 {
                shared = read(index as u32);
            }
            if f.sockets.iter().any(|s| s.in_map) {
                let (p, b) = read(slots + index as u32);
                own = (own.0 + p, b);
            }
            out.push(Totals {
                name: f.name.clone(),
                packets: shared.0 + own.0,
                bytes: (all_in_map && self.map.is_some()).then_some(shared.1 + own.1),
                own,
            });
        }
        out
    }

    /// Reads the kernel's counters every `interval` on a thread of its own, so that its
    /// 32-bit counters never wrap between two reads.
    pub fn keep_polling(&self, interval: Duration) {
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("filter-poll".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    if this.retired.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let _ = this.totals();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the filter counter thread: {e}");
        }
    }
}

impl NamedFilters {
    /// Ends the polling thread: once the last handle goes, the sockets close.
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn usage(name: &str, e: CompileError) -> StartError {
    StartError::Usage(format!("filter `{name}`: {e}"))
}

const PACKETS: FamilySpec = FamilySpec {
    name: "sockscope_filter_packets_total",
    help: "Packets matching a named tcpdump expression (--filter NAME=EXPR) on the interfaces named with --iface, counted in the kernel by libpcap's program for it, as tcpdump would capture them.",
    kind: Kind::Counter,
    labels: &["filter"],
};

const BYTES: FamilySpec = FamilySpec {
    name: "sockscope_filter_bytes_total",
    help: "On-wire bytes of the packets counted in sockscope_filter_packets_total, counted by the filter's program translated to eBPF; absent for a filter whose program could not be translated.",
    kind: Kind::Counter,
    labels: &["filter"],
};

/// The collector of `sockscope_filter_packets_total` and `sockscope_filter_bytes_total`.
pub struct FilterSource(pub Arc<super::LiveFilters>);

impl Source for FilterSource {
    fn name(&self) -> &'static str {
        "filters"
    }

    fn specs(&self) -> Vec<FamilySpec> {
        vec![PACKETS, BYTES]
    }

    fn collect(&self, _: &SelfMetrics) -> anyhow::Result<Vec<MetricFamily>> {
        let totals: BTreeMap<String, Totals> = self
            .0
            .totals()
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let mut packets = PACKETS.family();
        let mut bytes = BYTES.family();
        for (name, t) in &totals {
            packets.add(&[name], t.packets as f64);
            if let Some(b) = t.bytes {
                bytes.add(&[name], b as f64);
            }
        }
        Ok([packets.finish(), bytes.finish()]
            .into_iter()
            .flatten()
            .collect())
    }
}
