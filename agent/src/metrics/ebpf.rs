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

const PROGRAM_RUNS: FamilySpec = FamilySpec {
    name: "sockscope_ebpf_program_runs_total",
    help: "Runs of each kernel program (kernel BPF statistics; present while kernel.bpf_stats_enabled=1).",
    kind: Kind::Counter,
    labels: &["program"],
};

const PROGRAM_SECONDS: FamilySpec = FamilySpec {
    name: "sockscope_ebpf_program_run_seconds_total",
    help: "Time spent in each kernel program (kernel BPF statistics; present while kernel.bpf_stats_enabled=1).",
    kind: Kind::Counter,
    labels: &["program"],
};

/// Reads `MAP_ERRORS` and the kernel's statistics of the agent's programs.
pub struct Ebpf {
    errors: PerCpuArray<MapData, u64>,
    programs: Vec<(&'static str, u32)>,
}

impl Ebpf {
    /// A collector over the programs' error counters and the programs `(name, kernel id)`.
    pub fn new(errors: PerCpuArray<MapData, u64>, programs: Vec<(&'static str, u32)>) -> Self {
        Self { errors, programs }
    }

    /// Run counts and times, only while the kernel keeps them: with statistics off the
    /// kernel reports zeros, which would read as "never ran".
    fn program_stats(&self) -> Vec<MetricFamily> {
        let enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
            .is_ok_and(|v| v.trim() == "1");
        if !enabled || self.programs.is_empty() {
            return Vec::new();
        }
        let mut runs = PROGRAM_RUNS.family();
        let mut seconds = PROGRAM_SECONDS.family();
        for info in aya::programs::loaded_programs().filter_map(Result::ok) {
            if let Some((name, _)) = self.programs.iter().find(|(_, id)| *id == info.id()) {
                runs.add(&[name], info.run_count() as f64);
                seconds.add(&[name], info.run_time().as_secs_f64());
            }
        }
        [runs.finish(), seconds.finish()]
            .into_iter()
            .flatten()
            .collect()
    }
}

impl Source for Ebpf {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn specs(&self) -> Vec<FamilySpec> {
        vec![MAP_UPDATE_ERRORS, PROGRAM_RUNS, PROGRAM_SECONDS]
    }

    fn collect(&self, _: &SelfMetrics) -> anyhow::Result<Vec<MetricFamily>> {
        let mut family = MAP_UPDATE_ERRORS.family();
        for (index, name) in (0u32..).zip(map_error::NAMES) {
            let values = self.errors.get(&index, 0)?;
            family.add(&[name], values.iter().sum::<u64>() as f64);
        }
        let mut out: Vec<MetricFamily> = family.finish().into_iter().collect();
        out.extend(self.program_stats());
        Ok(out)
    }
}
