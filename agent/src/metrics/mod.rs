//! The `/metrics` page: collectors that read the maps and the kernel at scrape time.

pub mod budget;
pub mod ebpf;
pub mod family;
pub mod labels;
pub mod listen;
pub mod netstat;
pub mod resets;
pub mod timewait;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use prometheus::{
    CounterVec, GaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

/// A group of metrics read at scrape time (one `--collector.<name>`).
pub trait Source: Send + Sync {
    /// The collector's name, as in `--collector.<name>` and the `collector` label.
    fn name(&self) -> &'static str;
    /// The families it may emit.
    fn specs(&self) -> Vec<family::FamilySpec>;
    /// Reads its figures. An error leaves its series absent for this scrape.
    fn collect(&self, self_metrics: &SelfMetrics) -> anyhow::Result<Vec<MetricFamily>>;
}

/// The agent's own metrics.
pub struct SelfMetrics {
    /// `sockscope_collector_duration_seconds{collector}`.
    pub duration: GaugeVec,
    /// `sockscope_collector_errors_total{collector}`.
    pub errors: CounterVec,
    /// `sockscope_label_overflow_total{metric}`.
    pub label_overflow: CounterVec,
    /// `sockscope_probe_up{probe}`.
    pub probe_up: GaugeVec,
    /// `sockscope_probe_info{probe,path}`.
    pub probe_info: GaugeVec,
    /// `sockscope_build_info{version,kernel}`.
    pub build_info: GaugeVec,
}

impl SelfMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let duration = GaugeVec::new(
            Opts::new(
                "sockscope_collector_duration_seconds",
                "Time the last scrape spent in each collector.",
            ),
            &["collector"],
        )?;
        let errors = CounterVec::new(
            Opts::new(
                "sockscope_collector_errors_total",
                "Scrapes in which a collector failed; its series are then absent, not zero.",
            ),
            &["collector"],
        )?;
        let label_overflow = CounterVec::new(
            Opts::new(
                "sockscope_label_overflow_total",
                "Label sets folded into `other` by the cardinality budget.",
            ),
            &["metric"],
        )?;
        let probe_up = GaugeVec::new(
            Opts::new(
                "sockscope_probe_up",
                "1 when the probe is attached and counting, 0 when this kernel cannot run it (the log says why).",
            ),
            &["probe"],
        )?;
        let build_info = GaugeVec::new(
            Opts::new(
                "sockscope_build_info",
                "sockscope's version and the running kernel; always 1.",
            ),
            &["version", "kernel"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        let probe_info = GaugeVec::new(
            Opts::new(
                "sockscope_probe_info",
                "1 for the path each attached probe runs on: raw_tracepoint, tracepoint or cgroup_skb.",
            ),
            &["probe", "path"],
        )?;
        registry.register(Box::new(probe_up.clone()))?;
        registry.register(Box::new(probe_info.clone()))?;
        registry.register(Box::new(build_info.clone()))?;
        registry.register(Box::new(label_overflow.clone()))?;
        Ok(Self {
            duration,
            errors,
            label_overflow,
            probe_up,
            probe_info,
            build_info,
        })
    }
}

/// Runs one [`Source`] inside the registry, timing it and counting its failures.
struct Timed {
    source: Box<dyn Source>,
    descs: Vec<Desc>,
    self_metrics: Arc<SelfMetrics>,
    /// Off: switched off by a reload; the source keeps its state and emits nothing.
    on: Arc<AtomicBool>,
}

impl Collector for Timed {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if !self.on.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let start = Instant::now();
        let name = self.source.name();
        let result = self.source.collect(&self.self_metrics);
        self.self_metrics
            .duration
            .with_label_values(&[name])
            .set(start.elapsed().as_secs_f64());
        match result {
            Ok(families) => families,
            Err(e) => {
                tracing::warn!(collector = name, "collector failed: {e:#}");
                self.self_metrics.errors.with_label_values(&[name]).inc();
                Vec::new()
            }
        }
    }
}

/// The metrics registry of a running agent.
pub struct Metrics {
    registry: Registry,
    /// The agent's own metrics, shared with the collectors.
    pub self_metrics: Arc<SelfMetrics>,
    /// Per source, whether it is served.
    switches: HashMap<&'static str, Arc<AtomicBool>>,
}

impl Metrics {
    /// A registry with the self metrics and `sources`.
    pub fn new(sources: Vec<Box<dyn Source>>) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let self_metrics = Arc::new(SelfMetrics::new(&registry)?);
        let mut switches = HashMap::new();
        for source in sources {
            let on = Arc::new(AtomicBool::new(true));
            switches.insert(source.name(), Arc::clone(&on));
            // Every collector's error counter exists from the start, at 0.
            self_metrics.errors.with_label_values(&[source.name()]);
            let descs = source
                .specs()
                .iter()
                .map(family::FamilySpec::desc)
                .collect();
            registry.register(Box::new(Timed {
                source,
                descs,
                self_metrics: Arc::clone(&self_metrics),
                on,
            }))?;
        }
        Ok(Self {
            registry,
            self_metrics,
            switches,
        })
    }

    /// Serves the source `name` or stops serving it (its state is kept: counters go on
    /// from where they were). False when no such source was registered at start.
    pub fn set_enabled(&self, name: &str, on: bool) -> bool {
        match self.switches.get(name) {
            Some(switch) => {
                switch.store(on, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// The page in the Prometheus text format.
    pub fn render(&self) -> Result<Vec<u8>, prometheus::Error> {
        // The registry runs the collectors and sorts the series; the text is written by
        // `family::encode_text` (the TextEncoder's format, without its per-sample
        // allocations), into a buffer sized from the last page, freeing each series once
        // it is written. Then, at most once a minute, freed memory goes back to the kernel.
        let families = self.registry.gather();
        let mut out = family::page_buffer();
        family::encode_text(families, &mut out)?;
        family::release_freed_memory();
        Ok(out)
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
