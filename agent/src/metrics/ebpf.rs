//! Health of the kernel side: failed in-kernel map updates.

use agent_common::map_error;
use aya::maps::{MapData, PerCpuArray};
use prometheus::proto::MetricFamily;

use super::{
    SelfMetrics, Source,
    family::{FamilySpec, Kind},
};

const MAP_UPDATE_ERRORS: FamilySpec = FamilySpec {
    name: "sockscope_ebpf_map_update_errors_total",
    help: "In-kernel map updates that failed (map full): counts that could not be kept.",
    kind: Kind::Counter,
    labels: &["map"],
};

/// Reads `MAP_ERRORS`.
pub struct Ebpf {
    errors: PerCpuArray<MapData, u64>,
}

impl Ebpf {
    /// A collector over the programs' error counters.
    pub fn new(errors: PerCpuArray<MapData, u64>) -> Self {
        Self { errors }
    }
}

impl Source for Ebpf {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn specs(&self) -> Vec<FamilySpec> {
        vec![MAP_UPDATE_ERRORS]
    }

    fn collect(&self, _: &SelfMetrics) -> anyhow::Result<Vec<MetricFamily>> {
        let mut family = MAP_UPDATE_ERRORS.family();
        for (index, name) in (0u32..).zip(map_error::NAMES) {
            let values = self.errors.get(&index, 0)?;
            family.add(&[name], values.iter().sum::<u64>() as f64);
        }
        Ok(family.finish().into_iter().collect())
    }
}
