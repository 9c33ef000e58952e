//! Building metric families at scrape time from what the collectors read.

use prometheus::{
    core::Desc,
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

/// A metric family's name, help, type and label names: what a collector declares.
#[derive(Clone, Copy, Debug)]
pub struct FamilySpec {
    /// Full metric name.
    pub name: &'static str,
    /// HELP text.
    pub help: &'static str,
    /// Counter, gauge or histogram.
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
    /// Buckets, sum and count (filled with [`Family::add_histogram`]).
    Histogram,
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

    /// An empty family with room for `series` series.
    pub fn with_capacity(spec: FamilySpec, series: usize) -> Self {
        Self {
            spec,
            metrics: Vec::with_capacity(series),
        }
    }

    fn metric<S: AsRef<str>>(&self, values: &[S]) -> Metric {
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
        Metric::from_label(labels)
    }

    /// Adds one series of a counter or gauge; `values` are the label values in the spec's
    /// order.
    pub fn add<S: AsRef<str>>(&mut self, values: &[S], value: f64) {
        let mut metric = self.metric(values);
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
            Kind::Histogram => {
                debug_assert!(false, "{}: a histogram takes add_histogram", self.spec.name);
                return;
            }
        }
        self.metrics.push(metric);
    }

    /// Adds one histogram series from per-bucket counts that are *not* cumulative:
    /// `counts[i]` observations fell at or below `upper_bounds[i]` and above the bound before.
    /// The last bound is normally `+Inf`; observations above a last finite bound are lost, as
    /// the two slices must say the same thing. `_count` is the sum of `counts`.
    pub fn add_histogram<S: AsRef<str>>(
        &mut self,
        values: &[S],
        upper_bounds: &[f64],
        counts: &[u64],
        sum: f64,
    ) {
        debug_assert_eq!(self.spec.kind, Kind::Histogram, "{}", self.spec.name);
        debug_assert_eq!(upper_bounds.len(), counts.len(), "{}", self.spec.name);
        let mut metric = self.metric(values);
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(upper_bounds.len());
        for (bound, count) in upper_bounds.iter().zip(counts) {
            cumulative = cumulative.saturating_add(*count);
            // The encoder writes the +Inf bucket itself, from the count; given here it would be
            // written again, as `le="inf"`.
            if bound.is_infinite() && bound.is_sign_positive() {
                continue;
            }
            let mut bucket = Bucket::default();
            bucket.set_upper_bound(*bound);
            bucket.set_cumulative_count(cumulative);
            buckets.push(bucket);
        }
        let mut histogram = Histogram::default();
        histogram.set_bucket(buckets);
        histogram.set_sample_count(cumulative);
        histogram.set_sample_sum(sum);
        metric.set_histogram(histogram);
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
            Kind::Histogram => MetricType::HISTOGRAM,
        });
        family.set_metric(self.metrics);
        Some(family)
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder as _, TextEncoder};

    use super::*;

    const HIST: FamilySpec = FamilySpec {
        name: "test_occupancy",
        help: "Test.",
        kind: Kind::Histogram,
        labels: &["port"],
    };

    fn encode(family: Family) -> String {
        let mut out = Vec::new();
        let families: Vec<MetricFamily> = family.finish().into_iter().collect();
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("encodes");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn histograms_are_cumulative_with_one_inf_bucket() {
        let mut f = HIST.family();
        f.add_histogram(
            &["80"],
            &[0.0, 1.0, 4.0, f64::INFINITY],
            &[2, 0, 3, 1],
            17.0,
        );
        let text = encode(f);
        let expected = "\
# HELP test_occupancy Test.
# TYPE test_occupancy histogram
test_occupancy_bucket{port=\"80\",le=\"0\"} 2
test_occupancy_bucket{port=\"80\",le=\"1\"} 2
test_occupancy_bucket{port=\"80\",le=\"4\"} 5
test_occupancy_bucket{port=\"80\",le=\"+Inf\"} 6
test_occupancy_sum{port=\"80\"} 17
test_occupancy_count{port=\"80\"} 6
";
        assert_eq!(text, expected);
    }

    #[test]
    fn an_empty_family_is_not_sent() {
        assert!(HIST.family().finish().is_none());
    }
}
