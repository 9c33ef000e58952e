//! `sockscope run`: load the probes, serve the metrics, detach on SIGINT/SIGTERM.

use std::{
    collections::{HashMap, HashSet},
    net::{SocketAddr, TcpListener as StdListener},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_common::ListenPortKey;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap};
use tokio::{signal::unix::SignalKind, sync::watch};

use crate::{
    cli::ListenAddress,
    config::Loaded,
    kernel, listeners,
    metrics::{
        self, Metrics, Source,
        budget::Limits,
        listen::{Listen, ListenEventSource, Scan, ScanConfig},
    },
    netns,
    probes::{KernelSupport, PROBES, Probes, listen::ListenMap, ports},
    reload, server,
};

/// A failure that ends the agent, with the exit code to end with.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The listen address is taken or invalid.
    #[error("cannot listen on {address}: {source}{hint}")]
    Listen {
        /// The address asked for.
        address: ListenAddress,
        /// The OS error.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// Missing capabilities.
    #[error(
        "missing capabilities: {0}; run as root or grant them (systemd AmbientCapabilities=, setcap)"
    )]
    Capabilities(String),
    /// `--web.config.file` is unreadable or invalid.
    #[error("{0}")]
    WebConfig(String),
    /// Anything else at start-up.
    #[error("{0:#}")]
    Startup(anyhow::Error),
}

/// Runs the agent until a signal asks it to stop; SIGHUP reloads `--config.file`.
pub fn run(loaded: Loaded) -> Result<(), RunError> {
    run_with_sources(loaded, Vec::new(), None)
}

/// [`run`], serving also the metrics of `extra` sources started beforehand; a reload
/// replaces the named socket filters through `filters`.
pub fn run_with_sources(
    loaded: Loaded,
    extra: Vec<Box<dyn Source>>,
    filters: Option<Arc<crate::filters::LiveFilters>>,
) -> Result<(), RunError> {
    let args = &loaded.args;
    // A bad web configuration is a usage error: refuse it before anything else.
    let web = match &args.web_config_file {
        Some(path) => crate::web::WebState::load(path).map_err(RunError::WebConfig)?,
        None => crate::web::WebState::plain(),
    };
    let missing = crate::caps::missing_required();
    if !missing.is_empty() {
        return Err(RunError::Capabilities(missing.join(", ")));
    }
    raise_nofile_limit();
    // Bind before touching the kernel: a taken port must not leave anything loaded.
    let listener = bind(args.listen_address)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // The runtime's threads never load or attach anything: they start with only the
        // capabilities kept after start-up (the main thread drops the rest once attached).
        .on_thread_start(|| {
            if let Err(e) = crate::caps::drop_to_kept(&[]) {
                tracing::warn!("dropping capabilities on a runtime thread: {e}");
            }
        })
        .enable_all()
        .build()
        .map_err(|e| RunError::Startup(e.into()))?;
    runtime
        .block_on(serve(loaded, listener, Arc::new(web), extra, filters))
        .map_err(RunError::Startup)
}

fn bind(address: ListenAddress) -> Result<StdListener, RunError> {
    let result = match address {
        ListenAddress::Addr(a) => StdListener::bind(a),
        // Dual-stack where IPv6 exists, IPv4 only where it does not.
        ListenAddress::AnyAddr(port) => StdListener::bind(SocketAddr::from(([0u16; 8], port)))
            .or_else(|e| match e.raw_os_error() {
                Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL) => {
                    StdListener::bind(SocketAddr::from(([0u8; 4], port)))
                }
                _ => Err(e),
            }),
    };
    let listener = result.map_err(|source| RunError::Listen {
        address,
        hint: match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (another process serves there; stop it or choose another with --web.listen-address)"
            }
            std::io::ErrorKind::AddrNotAvailable => " (no interface has that address)",
            _ => "",
        },
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| RunError::Startup(e.into()))?;
    Ok(listener)
}

async fn serve(
    loaded: Loaded,
    listener: StdListener,
    web: Arc<crate::web::WebState>,
    extra: Vec<Box<dyn Source>>,
    filters: Option<Arc<crate::filters::LiveFilters>>,
) -> anyhow::Result<()> {
    // Installed before anything answers: the default actions would end the agent without
    // detaching (a SIGTERM right after the first scrape did), and SIGHUP would end it too.
    let mut signals = Signals {
        term: tokio::signal::unix::signal(SignalKind::terminate())?,
        int: tokio::signal::unix::signal(SignalKind::interrupt())?,
        hangup: tokio::signal::unix::signal(SignalKind::hangup())?,
    };
    let args = loaded.args.clone();
    let disabled = args.collectors.disabled();
    let support = KernelSupport::probe(&disabled, &args.paths.to_paths(), args.paths.probe_mode);
    // With a config file the watched ports may change on reload: keep the bitmap in use.
    let watching = !args.watch_ports.is_empty() || args.config_file.is_some();
    let limits = Arc::new(Limits::new(args.series_limit));
    let mut watch_map = None;
    let mut probes = match Probes::load(support, watching) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(
                "{e}; eBPF metrics are unavailable, the kernel's own counters are still served"
            );
            None
        }
    };

    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    let mut port_sync = None;
    let mut listen_events = None;
    let mut timewait_entered = None;
    if let Some(probes) = probes.as_mut() {
        // Before the collectors take them: the maps whose fill the agent reports.
        let watched_maps = probes.watched_maps(&[
            ("RESETS_SENT", "resets_sent"),
            ("RESETS_RECV", "resets_recv"),
            ("LISTEN_PORTS", "listen_ports"),
            ("LISTEN_EVENTS", "listen_events"),
            ("HANDSHAKES", "handshakes"),
            ("TIME_WAIT_ENTERED", "time_wait_entered"),
            ("TCP_SEGMENTS", "tcp_segments"),
        ]);
        let mut counters = ports::CounterMaps {
            resets: Vec::new(),
            listen: None,
            handshakes: None,
            timewait: None,
        };
        for name in ["RESETS_SENT", "RESETS_RECV"] {
            if let Some(map) = probes.second_handle(name) {
                counters.resets.push(map.try_into()?);
            }
        }
        if let Some(map) = probes.second_handle("LISTEN_EVENTS") {
            counters.listen = Some(map.try_into()?);
        }
        if let Some(map) = probes.second_handle("HANDSHAKES") {
            counters.handshakes = Some(map.try_into()?);
        }
        if let Some(map) = probes.second_handle("TIME_WAIT_ENTERED") {
            counters.timewait = Some(map.try_into()?);
        }
        if args.collectors.enabled("resets") {
            let sent: PerCpuHashMap<MapData, _, u64> = take(probes, "RESETS_SENT")?;
            let received: PerCpuHashMap<MapData, _, u64> = take(probes, "RESETS_RECV")?;
            let reasons = probes.reset_reasons.clone();
            sources.push(Box::new(metrics::resets::Resets::new(
                sent,
                received,
                reasons,
                Arc::clone(&limits),
            )));
        }
        let mut watch: Array<MapData, u64> = take(probes, "WATCH_PORTS")?;
        ports::set_watch_ports(&mut watch, &args.watch_ports)?;
        watch_map = Some(watch);
        let listen: BpfHashMap<MapData, ListenPortKey, u8> = take(probes, "LISTEN_PORTS")?;
        let seeded = ports::SeededPorts::new(
            take(probes, "LISTEN_PORT_SEEDED")?,
            take(probes, "LISTEN_GROUP_SEEDED")?,
        );
        port_sync = Some(ports::Upkeep::new(listen, seeded, counters));
        if args.collectors.enabled("listen") {
            listen_events = Some(ListenMap::new(
                take(probes, "LISTEN_EVENTS")?,
                take(probes, "HANDSHAKES")?,
            ));
        }
        if args.collectors.enabled("timewait") {
            match &probes.timewait {
                Ok(()) if probes.is_up("listen_track") => {
                    timewait_entered = Some(take(probes, "TIME_WAIT_ENTERED")?);
                }
                Ok(()) => {}
                Err(why) => tracing::warn!(
                    "TIME_WAIT entries are not counted: {why}; the timewait gauges are still served"
                ),
            }
        }
        if !args.filters.ifaces.is_empty() {
            // The named filters' packet sockets, which the classifier shares.
            let taps = filters.as_ref().map_or_else(Default::default, |f| f.taps());
            match crate::filters::segments::start(
                probes,
                &args.filters.ifaces,
                args.series_limit,
                taps,
            ) {
                Ok(segments) => sources.push(Box::new(segments)),
                Err(e) => tracing::warn!(
                    "the built-in socket filter is unavailable: {e:#}; sockscope_tcp_segments_total is absent"
                ),
            }
        }
        let errors: PerCpuArray<MapData, u64> = take(probes, "MAP_ERRORS")?;
        sources.push(Box::new(metrics::ebpf::Ebpf::new(
            errors,
            probes.program_ids(),
            watched_maps,
        )));
    }
    // One pass over the host's namespaces per scrape serves these three collectors.
    let scan_config = ScanConfig {
        listen: args.collectors.enabled("listen"),
        netstat: args.collectors.enabled("netstat"),
        sysctl: args.collectors.enabled("sysctl"),
        timewait: args.collectors.enabled("timewait"),
    };
    if scan_config.listen || scan_config.netstat || scan_config.sysctl || scan_config.timewait {
        let scan = Arc::new(
            Scan::new(netns::Discovery::new()?, scan_config).with_watched_ports(&args.watch_ports),
        );
        if scan_config.timewait {
            sources.push(Box::new(metrics::timewait::TimeWait::new(
                Arc::clone(&scan),
                timewait_entered,
                args.timewait_top_peers,
                args.series_limit,
            )));
        }
        if scan_config.listen {
            // The kernel programs' per-listener counts, when they are loaded.
            let events: Option<Box<dyn ListenEventSource>> = match listen_events {
                Some(maps) => Some(Box::new(maps)),
                None => None,
            };
            sources.push(Box::new(Listen::new(Arc::clone(&scan), events)));
        }
        if scan_config.netstat {
            sources.push(Box::new(metrics::netstat::Netstat::new(Arc::clone(&scan))));
        }
        if scan_config.sysctl {
            sources.push(Box::new(metrics::netstat::Sysctl::new(scan)));
        }
    }
    sources.extend(extra);
    let metrics = Arc::new(Metrics::new(sources)?);
    record_probe_status(&metrics, probes.as_ref());

    let refresh_seconds = Arc::new(AtomicU64::new(args.refresh_seconds));
    if let Some(mut listen) = port_sync {
        let discovery = Arc::new(netns::Discovery::new()?);
        // Seed before serving so the first events on existing listeners keep their port.
        sync_ports(&mut listen, &discovery);
        let refresh_seconds = Arc::clone(&refresh_seconds);
        tokio::spawn(async move {
            let mut listen = listen;
            loop {
                let interval = Duration::from_secs(refresh_seconds.load(Ordering::Relaxed));
                tokio::time::sleep(interval).await;
                let discovery = Arc::clone(&discovery);
                listen = match tokio::task::spawn_blocking(move || {
                    sync_ports(&mut listen, &discovery);
                    listen
                })
                .await
                {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("listener refresh stopped: {e}");
                        return;
                    }
                };
            }
        });
    }

    // Everything is loaded and attached: keep only what scrapes and reloads still use (a
    // reload may open the packet sockets of new socket filters).
    let reload_needs: &[::caps::Capability] = if args.config_file.is_some() {
        &[::caps::Capability::CAP_NET_RAW]
    } else {
        &[]
    };
    match crate::caps::drop_to_kept(reload_needs) {
        Ok(kept) => {
            let kept: Vec<String> = kept.iter().map(ToString::to_string).collect();
            tracing::info!(
                "capabilities after start-up: {} (the others are dropped)",
                if kept.is_empty() {
                    "none".to_string()
                } else {
                    kept.join(", ")
                }
            );
        }
        Err(e) => tracing::warn!("dropping capabilities after start-up: {e}"),
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let address = listener.local_addr()?;
    let scheme = if web.is_tls() { "https" } else { "http" };
    let web_limits = server::Limits {
        max_requests: args.web_max_requests as usize,
        max_connections: args.web_max_connections as usize,
    };
    let server = tokio::spawn(server::serve(
        listener,
        Arc::clone(&metrics),
        web,
        web_limits,
        stop_rx,
    ));
    tracing::info!(%address, "serving metrics on {scheme}://{address}/metrics");

    let mut live = reload::Live::new(
        loaded,
        watch_map,
        limits,
        Arc::clone(&metrics),
        refresh_seconds,
    )
    .with_filters(filters);
    signals.wait(&mut live).await;
    tracing::info!("stopping: detaching the probes");
    let _ = stop_tx.send(true);
    let _ = server.await;
    drop(probes);
    Ok(())
}

fn take<T>(probes: &mut Probes, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = probes
        .take_map(name)
        .ok_or_else(|| anyhow::anyhow!("map {name} missing from the kernel object"))?;
    T::try_from(map).map_err(|e| anyhow::anyhow!("map {name}: {e}"))
}

fn record_probe_status(metrics: &Metrics, probes: Option<&Probes>) {
    let sm = &metrics.self_metrics;
    sm.build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), &kernel::kernel_release()])
        .set(1.0);
    for spec in PROBES {
        let up = probes.is_some_and(|p| p.is_up(spec.name));
        sm.probe_up
            .with_label_values(&[spec.name])
            .set(if up { 1.0 } else { 0.0 });
        if let Some(path) = probes.and_then(|p| p.path_of(spec.name)) {
            sm.probe_info
                .with_label_values(&[spec.name, path.hook.mode().label()])
                .set(1.0);
        }
    }
}

/// Makes the kernel's listener-port set match the listeners of every namespace now.
fn sync_ports(upkeep: &mut ports::Upkeep, discovery: &netns::Discovery) {
    // The keys before the walk: a listener the kernel adds meanwhile must not be pruned.
    let before = upkeep.port_keys();
    let namespaces = discovery.discover();
    let found: HashSet<u32> = namespaces.iter().map(|ns| ns.info.inode as u32).collect();
    let mut listening: HashMap<u32, HashSet<u16>> = HashMap::new();
    let visited = discovery.visit(&namespaces, |ns, entered| {
        if !entered {
            return;
        }
        match listeners::listeners() {
            Ok(found) => {
                listening.insert(ns.info.inode as u32, found.iter().map(|l| l.port).collect());
            }
            Err(e) => tracing::debug!(netns = ns.info.inode, "listing listeners: {e}"),
        }
    });
    if let Err(e) = visited {
        tracing::warn!("listing listeners: {e}");
        return;
    }
    upkeep.refresh(&before, &found, &listening);
}

/// The signals the agent handles.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Until SIGTERM or SIGINT; each SIGHUP reloads the configuration meanwhile.
    async fn wait(&mut self, live: &mut reload::Live) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hangup.recv() => live.reload(),
            }
        }
    }
}

/// A scrape holds one file descriptor per network namespace; a host with more than ~1,000
/// namespaces would otherwise hit the default soft limit and see some of them vanish.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::debug!(
                    "could not raise RLIMIT_NOFILE: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}
