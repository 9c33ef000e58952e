//! `sockscope_tcp_resets_sent_total` and `sockscope_tcp_resets_received_total`, read from the
//! `RESETS_SENT` / `RESETS_RECV` maps of the reset probes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use agent_common::{PORT_OTHER, ResetKey};
use aya::maps::{MapData, PerCpuHashMap};
use prometheus::proto::MetricFamily;

use super::{
    SelfMetrics, Source,
    budget::{Budget, Limits},
    family::{FamilySpec, Kind},
    labels,
};

const SENT: FamilySpec = FamilySpec {
    name: "sockscope_tcp_resets_sent_total",
    help: "TCP RSTs sent (tracepoint tcp:tcp_send_reset), by the kernel's sk_rst_reason, the socket's state (none: no socket) and local port. Sum over a netns = Tcp OutRsts.",
    kind: Kind::Counter,
    labels: &["netns", "reason", "state", "port"],
};

const RECEIVED: FamilySpec = FamilySpec {
    name: "sockscope_tcp_resets_received_total",
    help: "TCP RSTs received and acted on (tracepoint tcp:tcp_receive_reset), by the receiving socket's state and local port.",
    kind: Kind::Counter,
    labels: &["netns", "state", "port"],
};

/// A per-CPU counter map of the reset probes.
pub type ResetMap = PerCpuHashMap<MapData, ResetKey, u64>;

/// Reads the reset counters.
pub struct Resets {
    sent: ResetMap,
    received: ResetMap,
    reasons: HashMap<u8, String>,
    budgets: Mutex<(Budget<ResetKey>, Budget<ResetKey>)>,
    limits: Arc<Limits>,
}

impl Resets {
    /// A collector over the two maps; `limits.series_per_metric()` is the budget of series
    /// with their own port label, per metric and network namespace, read at every scrape.
    pub fn new(
        sent: ResetMap,
        received: ResetMap,
        reasons: HashMap<u8, String>,
        limits: Arc<Limits>,
    ) -> Self {
        let limit = limits.series_per_metric();
        Self {
            sent,
            received,
            reasons,
            budgets: Mutex::new((Budget::new(limit), Budget::new(limit))),
            limits,
        }
    }
}

/// Sums a per-CPU counter map into `(key after the budget) → total`.
fn read(
    map: &ResetMap,
    budget: &mut Budget<ResetKey>,
    metric: &str,
    self_metrics: &SelfMetrics,
) -> anyhow::Result<HashMap<ResetKey, u64>> {
    let mut totals = HashMap::new();
    for entry in map.iter() {
        // An entry deleted during the walk is not an error; anything else is.
        let (key, values) = match entry {
            Ok(kv) => kv,
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(e.into()),
        };
        let sum: u64 = values.iter().sum();
        let key = budget.decide(
            key,
            u64::from(key.netns),
            |k| ResetKey {
                port: PORT_OTHER,
                ..k
            },
            || {
                self_metrics
                    .label_overflow
                    .with_label_values(&[metric])
                    .inc()
            },
        );
        *totals.entry(key).or_insert(0) += sum;
    }
    Ok(totals)
}

impl Source for Resets {
    fn name(&self) -> &'static str {
        "resets"
    }

    fn specs(&self) -> Vec<FamilySpec> {
        vec![SENT, RECEIVED]
    }

    fn collect(&self, self_metrics: &SelfMetrics) -> anyhow::Result<Vec<MetricFamily>> {
        let (sent, received) = {
            let mut budgets = self
                .budgets
                .lock()
                .map_err(|_| anyhow::anyhow!("budget lock poisoned"))?;
            let (sent_budget, received_budget) = &mut *budgets;
            let limit = self.limits.series_per_metric();
            sent_budget.set_limit(limit);
            received_budget.set_limit(limit);
            (
                read(&self.sent, sent_budget, SENT.name, self_metrics)?,
                read(&self.received, received_budget, RECEIVED.name, self_metrics)?,
            )
        };
        let mut sent_family = SENT.family();
        for (key, value) in sent {
            sent_family.add(
                &[
                    key.netns.to_string(),
                    labels::reset_reason(key.reason, &self.reasons),
                    labels::tcp_state(key.state).to_string(),
                    labels::port(key.port),
                ],
                value as f64,
            );
        }
        let mut received_family = RECEIVED.family();
        for (key, value) in received {
            received_family.add(
                &[
                    key.netns.to_string(),
                    labels::tcp_state(key.state).to_string(),
                    labels::port(key.port),
                ],
                value as f64,
            );
        }
        Ok([sent_family.finish(), received_family.finish()]
            .into_iter()
            .flatten()
            .collect())
    }
}
