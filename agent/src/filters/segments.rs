//! The built-in socket filter (`tcp_segments` in agent-ebpf) on the packet socket of each
//! `--iface` ([`super::taps`]: alone, or behind the named filters' program on the same
//! socket): `sockscope_tcp_segments_total{iface,direction,flags,port}`. The program returns
//! 0, so the sockets never receive anything; the counts live in `TCP_SEGMENTS`.

use std::{
    collections::{BTreeMap, HashMap},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    sync::{Arc, Mutex},
};

use agent_common::{PORT_OTHER, SegmentKey, segment};
use anyhow::Context as _;
use aya::{
    maps::{Array, MapData, PerCpuHashMap},
    programs::SocketFilter,
};
use prometheus::proto::MetricFamily;

use super::taps::Taps;
use crate::{
    metrics::{
        SelfMetrics, Source,
        budget::Budget,
        family::{FamilySpec, Kind},
        labels,
    },
    probes::Probes,
};

const SEGMENTS: FamilySpec = FamilySpec {
    name: "sockscope_tcp_segments_total",
    help: "TCP segments seen by the built-in socket filter on the interfaces named with --iface, by direction (ingress, egress), flags (syn, syn_ack, rst, fin, other) and local port (listener or watched port, else other). On lo each segment is seen leaving and arriving.",
    kind: Kind::Counter,
    labels: &["iface", "direction", "flags", "port"],
};

const PROGRAM: &str = "tcp_segments";

/// The classifier's sockets and counters.
pub struct Segments {
    map: PerCpuHashMap<MapData, SegmentKey, u64>,
    names: HashMap<u32, String>,
    budget: Mutex<Budget<SegmentKey>>,
    /// Where the program runs.
    _taps: Arc<Taps>,
}

/// Loads the classifier from the agent's object and puts it on the tap of every interface
/// of `ifaces` that exists (a missing one is skipped with a warning).
pub fn start(
    probes: &mut Probes,
    ifaces: &[String],
    series_limit: usize,
    taps: Arc<Taps>,
) -> anyhow::Result<Segments> {
    let netns = std::fs::metadata("/proc/thread-self/ns/net")
        .context("reading the agent's network namespace")?
        .ino() as u32;
    let mut netns_map: Array<MapData, u32> = Array::try_from(
        probes
            .take_map("SEGMENTS_NETNS")
            .context("map SEGMENTS_NETNS missing from the kernel object")?,
    )?;
    netns_map.set(0, netns, 0)?;
    let map = PerCpuHashMap::try_from(
        probes
            .take_map("TCP_SEGMENTS")
            .context("map TCP_SEGMENTS missing from the kernel object")?,
    )?;
    let program: &mut SocketFilter = probes
        .program_mut(PROGRAM)
        .context("program tcp_segments missing from the kernel object")?
        .try_into()?;
    program
        .load()
        .context("loading the tcp_segments socket filter")?;
    let watched = taps.set_classifier(program.fd()?.as_fd(), ifaces)?;
    if watched.is_empty() {
        anyhow::bail!("no interface of --iface could be watched");
    }
    Ok(Segments {
        map,
        names: watched
            .into_iter()
            .map(|(iface, ifindex)| (ifindex, iface))
            .collect(),
        budget: Mutex::new(Budget::new(series_limit)),
        _taps: taps,
    })
}

impl Source for Segments {
    fn name(&self) -> &'static str {
        "tcp_segments"
    }

    fn specs(&self) -> Vec<FamilySpec> {
        vec![SEGMENTS]
    }

    fn collect(&self, self_metrics: &SelfMetrics) -> anyhow::Result<Vec<MetricFamily>> {
        let mut totals: BTreeMap<SegmentKey, u64> = BTreeMap::new();
        {
            let mut budget = self
                .budget
                .lock()
                .map_err(|_| anyhow::anyhow!("budget lock poisoned"))?;
            for entry in self.map.iter() {
                let (key, values) = match entry {
                    Ok(kv) => kv,
                    Err(aya::maps::MapError::KeyNotFound) => continue,
                    Err(e) => return Err(e.into()),
                };
                let key = budget.decide(
                    key,
                    u64::from(key.ifindex),
                    |k| SegmentKey {
                        port: PORT_OTHER,
                        ..k
                    },
                    || {
                        self_metrics
                            .label_overflow
                            .with_label_values(&[SEGMENTS.name])
                            .inc()
                    },
                );
                *totals.entry(key).or_insert(0) += values.iter().sum::<u64>();
            }
        }
        let mut family = SEGMENTS.family();
        for (key, value) in totals {
            let iface = self
                .names
                .get(&key.ifindex)
                .cloned()
                .unwrap_or_else(|| key.ifindex.to_string());
            let direction = if key.direction == segment::EGRESS {
                "egress"
            } else {
                "ingress"
            };
            let flags = segment::FLAG_NAMES
                .get(usize::from(key.flags))
                .copied()
                .unwrap_or("other");
            family.add(
                &[
                    iface,
                    direction.to_string(),
                    flags.to_string(),
                    labels::port(key.port),
                ],
                value as f64,
            );
        }
        Ok(family.finish().into_iter().collect())
    }
}
