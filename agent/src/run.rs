//! `sockscope run`: load the probes, serve the metrics, detach on SIGINT/SIGTERM.

use std::{
    collections::HashSet,
    net::{SocketAddr, TcpListener as StdListener},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use agent_common::ListenPortKey;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap};
use tokio::{signal::unix::SignalKind, sync::watch};

use crate::{
    cli::{ListenAddress, RunArgs},
    kernel, listeners,
    metrics::{self, Metrics, Source},
    probes::{KernelSupport, PROBES, Probes, ports},
    server,
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
    /// Anything else at start-up.
    #[error("{0:#}")]
    Startup(anyhow::Error),
}

/// Runs the agent until a signal asks it to stop.
pub fn run(args: RunArgs) -> Result<(), RunError> {
    let missing = crate::caps::missing_required();
    if !missing.is_empty() {
        return Err(RunError::Capabilities(missing.join(", ")));
    }
    // Bind before touching the kernel: a taken port must not leave anything loaded.
    let listener = bind(args.listen_address)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| RunError::Startup(e.into()))?;
    runtime
        .block_on(serve(args, listener))
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

async fn serve(args: RunArgs, listener: StdListener) -> anyhow::Result<()> {
    let netns = kernel::own_netns()?;
    let disabled = args.collectors.disabled();
    let support = KernelSupport::probe(&disabled, &args.paths.to_paths());
    let mut probes = match Probes::load(support) {
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
    if let Some(probes) = probes.as_mut() {
        if args.collectors.enabled("resets") {
            let sent: PerCpuHashMap<MapData, _, u64> = take(probes, "RESETS_SENT")?;
            let received: PerCpuHashMap<MapData, _, u64> = take(probes, "RESETS_RECV")?;
            let reasons = probes.reset_reasons.clone();
            sources.push(Box::new(metrics::resets::Resets::new(
                sent,
                received,
                reasons,
                args.series_limit,
            )));
        }
        let mut watch: Array<MapData, u64> = take(probes, "WATCH_PORTS")?;
        ports::set_watch_ports(&mut watch, &args.watch_ports)?;
        let listen: BpfHashMap<MapData, ListenPortKey, u8> = take(probes, "LISTEN_PORTS")?;
        port_sync = Some(listen);
        let errors: PerCpuArray<MapData, u64> = take(probes, "MAP_ERRORS")?;
        sources.push(Box::new(metrics::ebpf::Ebpf::new(errors)));
    }
    if args.collectors.enabled("netstat") {
        sources.push(Box::new(metrics::netstat::Netstat::new(
            netns,
            PathBuf::from("/proc/thread-self/net"),
        )));
    }
    if args.collectors.enabled("sysctl") {
        sources.push(Box::new(metrics::netstat::Sysctl::new(netns)));
    }
    let metrics = Arc::new(Metrics::new(sources)?);
    record_probe_status(&metrics, probes.as_ref());

    if let Some(mut listen) = port_sync {
        // Seed before serving so the first events on existing listeners keep their port.
        sync_ports(&mut listen, netns);
        let interval = Duration::from_secs(args.refresh_seconds);
        tokio::spawn(async move {
            let mut listen = listen;
            loop {
                tokio::time::sleep(interval).await;
                listen = match tokio::task::spawn_blocking(move || {
                    sync_ports(&mut listen, netns);
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

    let (stop_tx, stop_rx) = watch::channel(false);
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(server::serve(listener, Arc::clone(&metrics), stop_rx));
    tracing::info!(%address, "serving metrics on http://{address}/metrics");

    wait_for_signal().await?;
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
    }
}

/// Makes the kernel's listener-port set match the namespace's listeners now.
fn sync_ports(map: &mut BpfHashMap<MapData, ListenPortKey, u8>, netns: u64) {
    let listeners = match listeners::listeners() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("listing listeners: {e}");
            return;
        }
    };
    let ports: HashSet<u16> = listeners.iter().map(|l| l.port).collect();
    if let Err(e) = ports::sync_listen_ports(map, netns as u32, &ports) {
        tracing::warn!("updating listener ports: {e}");
    }
}

async fn wait_for_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}
