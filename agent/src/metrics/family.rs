//! Building metric families at scrape time from what the collectors read.

use prometheus::{
    core::Desc,
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

/// A metric family's name, help, type and label names: what a collector declares.
#[derive(Clone, Copy, Debug)]
pub struct FamilySpec {
    /// Full metric name.
    pub name: &'static str,
    /// HELP text.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Label names, in output order.
    pub labels: &'static [&'static str],
}

/// The metric types the collectors emit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic.
    Counter,
    /// Goes up and down.
    Gauge,
}

impl FamilySpec {
    /// The descriptor the registry checks for clashes.
    pub fn desc(&self) -> Desc {
        Desc::new(
            self.name.to_string(),
            self.help.to_string(),
            self.labels.iter().map(ToString::to_string).collect(),
            Default::default(),
        )
        .expect("metric names and labels are static and valid")
    }

    /// An empty family to fill.
    pub fn family(&self) -> Family {
        Family::new(*self)
    }
}

/// A family being filled during one scrape.
pub struct Family {
    spec: FamilySpec,
    metrics: Vec<Metric>,
}

impl Family {
    fn new(spec: FamilySpec) -> Self {
        Self {
            spec,
            metrics: Vec::new(),
        }
    }

    /// Adds one series; `values` are the label values in the spec's order.
    pub fn add<S: AsRef<str>>(&mut self, values: &[S], value: f64) {
        debug_assert_eq!(values.len(), self.spec.labels.len(), "{}", self.spec.name);
        let labels = self
            .spec
            .labels
            .iter()
            .zip(values)
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name((*name).to_string());
                pair.set_value(value.as_ref().to_string());
                pair
            })
            .collect();
        let mut metric = Metric::from_label(labels);
        match self.spec.kind {
            Kind::Counter => {
                let mut c = Counter::default();
                c.set_value(value);
                metric.set_counter(c);
            }
            Kind::Gauge => {
                let mut g = Gauge::default();
                g.set_value(value);
                metric.set_gauge(g);
            }
        }
        self.metrics.push(metric);
    }

    /// The finished family; `None` when it has no series (nothing to send).
    pub fn finish(self) -> Option<MetricFamily> {
        if self.metrics.is_empty() {
            return None;
        }
        let mut family = MetricFamily::default();
        family.set_name(self.spec.name.to_string());
        family.set_help(self.spec.help.to_string());
        family.set_field_type(match self.spec.kind {
            Kind::Counter => MetricType::COUNTER,
            Kind::Gauge => MetricType::GAUGE,
        });
        family.set_metric(self.metrics);
        Some(family)
    }
}
