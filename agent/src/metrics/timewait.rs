//! `sockscope_tcp_time_wait_*`: timewait sockets now (sock_diag, read in the shared pass over
//! the namespaces, [`super::listen::Scan`]) and the full sockets handed over to the timewait
//! table since the agent started (`TIME_WAIT_ENTERED`, counted by `listen_track`).

use std::sync::Mutex;

use agent_common::{PORT_OTHER, TimeWaitKey, tw_class};
use aya::maps::{MapData, MapError, PerCpuHashMap};
use prometheus::proto::MetricFamily;

use super::{
    SelfMetrics, Source,
    budget::Budget,
    family::{Family, FamilySpec, Kind},
    listen::{Consumer, Scan},
};
use crate::timewait::{PortLabel, TwState};

const SOCKETS: FamilySpec = FamilySpec {
    name: "sockscope_tcp_time_wait_sockets",
    help: "Timewait sockets now (sock_diag): state=time_wait (ss -tan state time-wait) or fin_wait2 (orphans parked as timewait sockets); the sum over a netns is /proc/net/sockstat tw. port = local listener port, ephemeral (inside ip_local_port_range) or other.",
    kind: Kind::Gauge,
    labels: &["netns", "state", "port"],
};

const ENTERED: FamilySpec = FamilySpec {
    name: "sockscope_tcp_time_wait_entered_total",
    help: "Full sockets handed over to the kernel's timewait table (both kinds), by local port label; sockets closed without one (tcp_max_tw_buckets reached, resets, timeouts) are not counted.",
    kind: Kind::Counter,
    labels: &["netns", "port"],
};

const PEERS: FamilySpec = FamilySpec {
    name: "sockscope_tcp_time_wait_peer_sockets",
    help: "Timewait sockets (both kinds) per remote endpoint, for the top N endpoints of each netns (--collector.timewait.top-peers).",
    kind: Kind::Gauge,
    labels: &["netns", "raddr", "rport"],
};

/// The per-CPU counter map of TIME_WAIT entries.
pub type EnteredMap = PerCpuHashMap<MapData, TimeWaitKey, u64>;

/// The `timewait` collector.
pub struct TimeWait {
    scan: std::sync::Arc<Scan>,
    entered: Option<EnteredMap>,
    top_peers: usize,
    budget: Mutex<Budget<TimeWaitKey>>,
}

impl TimeWait {
    /// Gauges from `scan`, entries from `entered` when the kernel programs count them;
    /// `top_peers` endpoints per namespace; `series_limit` listener-port labels per namespace
    /// for the counter before new ones are folded into `other`.
    pub fn new(
        scan: std::sync::Arc<Scan>,
        entered: Option<EnteredMap>,
        top_peers: usize,
        series_limit: usize,
    ) -> Self {
        Self {
            scan,
            entered,
            top_peers,
            budget: Mutex::new(Budget::new(series_limit)),
        }
    }
}

/// The `port` label of a counted entry.
pub fn entered_label(key: &TimeWaitKey) -> PortLabel {
    match key.class {
        tw_class::PORT if key.port != PORT_OTHER => PortLabel::Port(key.port),
        tw_class::EPHEMERAL => PortLabel::Ephemeral,
        _ => PortLabel::Other,
    }
}

/// Sums the per-CPU map into `(netns, label) → total`.
pub fn read_entered(
    map: &EnteredMap,
    mut decide: impl FnMut(TimeWaitKey) -> TimeWaitKey,
) -> anyhow::Result<std::collections::BTreeMap<(u32, PortLabel), u64>> {
    let mut totals = std::collections::BTreeMap::new();
    for entry in map.iter() {
        // An entry deleted during the walk (its namespace is gone) is not an error.
        let (key, values) = match entry {
            Ok(kv) => kv,
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e.into()),
        };
        let key = decide(key);
        let sum: u64 = values.iter().sum();
        *totals.entry((key.netns, entered_label(&key))).or_insert(0) += sum;
    }
    Ok(totals)
}

impl Source for TimeWait {
    fn name(&self) -> &'static str {
        "timewait"
    }

    fn specs(&self) -> Vec<FamilySpec> {
        vec![SOCKETS, ENTERED, PEERS]
    }

    fn collect(&self, self_metrics: &SelfMetrics) -> anyhow::Result<Vec<MetricFamily>> {
        let snapshot = self.scan.snapshot(Consumer::TimeWait)?;
        let mut sockets = Family::with_capacity(SOCKETS, 2 * snapshot.namespaces.len());
        let mut peers = PEERS.family();
        for ns in &snapshot.namespaces {
            let Some(tw) = &ns.timewait else { continue };
            let shown =
                ns.info.inode == snapshot.own || !ns.listeners.series.is_empty() || tw.total() > 0;
            if !shown {
                continue;
            }
            let netns = ns.info.inode.to_string();
            // The ephemeral series of both kinds always exist, at 0 when empty.
            for state in [TwState::TimeWait, TwState::FinWait2] {
                if !tw.by_port.contains_key(&(state, PortLabel::Ephemeral)) {
                    sockets.add(&[netns.as_str(), state.label(), "ephemeral"], 0.0);
                }
            }
            for ((state, port), n) in &tw.by_port {
                sockets.add(
                    &[netns.clone(), state.label().into(), port.label()],
                    *n as f64,
                );
            }
            for ((addr, port), n) in tw.top_peers(self.top_peers) {
                peers.add(
                    &[netns.clone(), addr.to_string(), port.to_string()],
                    n.sockets as f64,
                );
            }
        }
        let mut families: Vec<MetricFamily> = [sockets.finish(), peers.finish()]
            .into_iter()
            .flatten()
            .collect();
        if let Some(map) = &self.entered {
            let mut budget = self
                .budget
                .lock()
                .map_err(|_| anyhow::anyhow!("budget lock poisoned"))?;
            let totals = read_entered(map, |key| {
                budget.decide(
                    key,
                    u64::from(key.netns),
                    |k| TimeWaitKey {
                        port: PORT_OTHER,
                        class: if k.class == tw_class::PORT {
                            tw_class::OTHER
                        } else {
                            k.class
                        },
                        ..k
                    },
                    || {
                        self_metrics
                            .label_overflow
                            .with_label_values(&[ENTERED.name])
                            .inc()
                    },
                )
            })?;
            let mut entered = ENTERED.family();
            for ((netns, label), n) in totals {
                entered.add(&[netns.to_string(), label.label()], n as f64);
            }
            families.extend(entered.finish());
        }
        Ok(families)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entered_labels() {
        let key = |port, class| TimeWaitKey {
            netns: 1,
            port,
            class,
            pad: 0,
        };
        assert_eq!(entered_label(&key(80, tw_class::PORT)), PortLabel::Port(80));
        assert_eq!(entered_label(&key(0, tw_class::PORT)), PortLabel::Other);
        assert_eq!(
            entered_label(&key(0, tw_class::EPHEMERAL)),
            PortLabel::Ephemeral
        );
        assert_eq!(entered_label(&key(0, tw_class::OTHER)), PortLabel::Other);
    }
}
