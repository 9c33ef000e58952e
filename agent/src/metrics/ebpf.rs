//! Health of the kernel side: failed in-kernel map updates, the fill of the hash maps, and
//! the programs' run statistics.

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

const MAP_ENTRIES: FamilySpec = FamilySpec {
    name: "sockscope_ebpf_map_entries",
    help: "Entries in each of the agent's kernel hash maps now (a full map loses counts: see sockscope_ebpf_map_update_errors_total).",
    kind: Kind::Gauge,
    labels: &["map"],
};

const MAP_MAX_ENTRIES: FamilySpec = FamilySpec {
    name: "sockscope_ebpf_map_max_entries",
    help: "Capacity of each of the agent's kernel hash maps.",
    kind: Kind::Gauge,
    labels: &["map"],
};

/// One of the agent's hash maps, watched for its fill through a handle of its own.
pub struct WatchedMap {
    /// The `map` label.
    pub label: &'static str,
    /// A second handle on the map (the collectors own the first).
    pub map: MapData,
}

/// Reads `MAP_ERRORS`, the fill of the hash maps and the kernel's statistics of the
/// agent's programs.
pub struct Ebpf {
    errors: PerCpuArray<MapData, u64>,
    programs: Vec<(&'static str, u32)>,
    maps: Vec<WatchedMap>,
}

impl Ebpf {
    /// A collector over the programs' error counters, the programs `(name, kernel id)` and
    /// the hash maps to watch.
    pub fn new(
        errors: PerCpuArray<MapData, u64>,
        programs: Vec<(&'static str, u32)>,
        maps: Vec<WatchedMap>,
    ) -> Self {
        Self {
            errors,
            programs,
            maps,
        }
    }

    fn map_fill(&self) -> Vec<MetricFamily> {
        let mut entries = MAP_ENTRIES.family();
        let mut max = MAP_MAX_ENTRIES.family();
        for watched in &self.maps {
            let Ok(info) = watched.map.info() else {
                continue;
            };
            match count_keys(&watched.map, info.key_size(), info.max_entries()) {
                Ok(n) => entries.add(&[watched.label], n as f64),
                Err(e) => tracing::debug!(map = watched.label, "counting entries: {e}"),
            }
            max.add(&[watched.label], f64::from(info.max_entries()));
        }
        [entries.finish(), max.finish()]
            .into_iter()
            .flatten()
            .collect()
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
        vec![
            MAP_UPDATE_ERRORS,
            MAP_ENTRIES,
            MAP_MAX_ENTRIES,
            PROGRAM_RUNS,
            PROGRAM_SECONDS,
        ]
    }

    fn collect(&self, _: &SelfMetrics) -> anyhow::Result<Vec<MetricFamily>> {
        let mut family = MAP_UPDATE_ERRORS.family();
        for (index, name) in (0u32..).zip(map_error::NAMES) {
            let values = self.errors.get(&index, 0)?;
            family.add(&[name], values.iter().sum::<u64>() as f64);
        }
        let mut out: Vec<MetricFamily> = family.finish().into_iter().collect();
        out.extend(self.map_fill());
        out.extend(self.program_stats());
        Ok(out)
    }
}

/// The keys of a hash map, counted with `BPF_MAP_GET_NEXT_KEY` (one call per key; at most
/// `max_entries` + 1 calls, so a map changing meanwhile cannot keep it going).
fn count_keys(map: &MapData, key_size: u32, max_entries: u32) -> std::io::Result<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut count = 0u64;
    let mut first = true;
    while count <= u64::from(max_entries) {
        let attr = Attr {
            map_fd: fd,
            pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: bpf(2) with an attribute block of the documented layout; both buffers
        // are key_size bytes and outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const Attr,
                std::mem::size_of::<Attr>(),
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::ENOENT) {
                Ok(count)
            } else {
                Err(err)
            };
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(count)
}
