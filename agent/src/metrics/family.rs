//! Building metric families at scrape time from what the collectors read, and writing them
//! out in the Prometheus text format.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

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

/// Size of the last page written, so that the next one gets its buffer in one allocation.
static LAST_PAGE: AtomicUsize = AtomicUsize::new(0);

/// The smallest buffer a page starts with.
const MIN_PAGE: usize = 16 * 1024;

/// A buffer for the next page: the last page's size and an eighth more, so that growing
/// by a few series does not copy the page over again.
pub fn page_buffer() -> Vec<u8> {
    let last = LAST_PAGE.load(Ordering::Relaxed);
    Vec::with_capacity((last + last / 8).max(MIN_PAGE))
}

/// Writes `families` to `out` in the Prometheus text format (version 0.0.4), byte for byte
/// what `prometheus::TextEncoder` writes, dropping each series once it is written.
///
/// Why not the TextEncoder: it formats every value through `f64::to_string` (an allocation
/// per sample), builds the TYPE line with `format!` and writes through a `dyn` writer a few
/// bytes at a time; with 50,000 series that was about 6 ms of a 35 ms render.
pub fn encode_text(families: Vec<MetricFamily>, out: &mut Vec<u8>) -> prometheus::Result<()> {
    for mut family in families {
        if family.get_metric().is_empty() {
            return Err(prometheus::Error::Msg(format!(
                "MetricFamily has no metrics: {}",
                family.name()
            )));
        }
        if family.name().is_empty() {
            return Err(prometheus::Error::Msg("MetricFamily has no name".into()));
        }
        let kind = family.get_field_type();
        let type_name = match kind {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            MetricType::SUMMARY => "summary",
            MetricType::HISTOGRAM => "histogram",
            // The TextEncoder panics on these (`unimplemented!`); no collector emits them.
            MetricType::UNTYPED => {
                return Err(prometheus::Error::Msg(format!(
                    "{}: untyped metrics are not supported",
                    family.name()
                )));
            }
        };
        let metrics = family.take_metric();
        let name = family.name().as_bytes();
        if !family.help().is_empty() {
            out.extend_from_slice(b"# HELP ");
            out.extend_from_slice(name);
            out.push(b' ');
            escape(out, family.help().as_bytes(), false);
            out.push(b'\n');
        }
        out.extend_from_slice(b"# TYPE ");
        out.extend_from_slice(name);
        out.push(b' ');
        out.extend_from_slice(type_name.as_bytes());
        out.push(b'\n');
        for metric in metrics {
            let labels = metric.get_label();
            let ts = metric.timestamp_ms();
            match kind {
                MetricType::COUNTER => {
                    let value = metric.get_counter().get_value();
                    sample(out, name, b"", labels, None, value, ts);
                }
                MetricType::GAUGE => {
                    let value = metric.get_gauge().get_value();
                    sample(out, name, b"", labels, None, value, ts);
                }
                MetricType::HISTOGRAM => {
                    let h = metric.get_histogram();
                    let mut inf_seen = false;
                    let mut bound = String::new();
                    for b in h.get_bucket() {
                        let upper = b.upper_bound();
                        bound.clear();
                        push_f64_string(&mut bound, upper);
                        let le = Some(("le", bound.as_str()));
                        let count = b.cumulative_count() as f64;
                        sample(out, name, b"_bucket", labels, le, count, ts);
                        inf_seen |= upper.is_sign_positive() && upper.is_infinite();
                    }
                    if !inf_seen {
                        let le = Some(("le", "+Inf"));
                        let count = h.get_sample_count() as f64;
                        sample(out, name, b"_bucket", labels, le, count, ts);
                    }
                    sample(out, name, b"_sum", labels, None, h.get_sample_sum(), ts);
                    let count = h.get_sample_count() as f64;
                    sample(out, name, b"_count", labels, None, count, ts);
                }
                MetricType::SUMMARY => {
                    let s = metric.get_summary();
                    let mut quantile = String::new();
                    for q in s.get_quantile() {
                        quantile.clear();
                        push_f64_string(&mut quantile, q.quantile());
                        let label = Some(("quantile", quantile.as_str()));
                        sample(out, name, b"", labels, label, q.value(), ts);
                    }
                    sample(out, name, b"_sum", labels, None, s.sample_sum(), ts);
                    let count = s.sample_count() as f64;
                    sample(out, name, b"_count", labels, None, count, ts);
                }
                MetricType::UNTYPED => unreachable!("refused above"),
            }
        }
    }
    LAST_PAGE.store(out.len(), Ordering::Relaxed);
    Ok(())
}

/// How often at most [`release_freed_memory`] hands memory back.
const RELEASE_INTERVAL: Duration = Duration::from_secs(60);

/// When memory was last handed back.
static LAST_RELEASE: Mutex<Option<Instant>> = Mutex::new(None);

/// Hands the heap memory freed since the last time back to the kernel (glibc's
/// `malloc_trim`), at most once a minute; the first scrape always does.
///
/// Why: glibc keeps freed memory for reuse and hands little of it back. The agent's heap kept
/// what start-up freed (about 17 MB on the development machine) for good, and with 10,000
/// listeners a scrape frees about 30 MB of series, which stayed too (once per glibc arena:
/// a scrape on another blocking thread than the last could keep a second copy). Handing it
/// back costs the next scrape the page faults of its series (about a quarter more CPU for
/// that scrape with 10,000 listeners), hence at most once a minute.
pub fn release_freed_memory() {
    let now = Instant::now();
    {
        let Ok(mut last) = LAST_RELEASE.lock() else {
            return;
        };
        if !release_due(*last, now) {
            return;
        }
        *last = Some(now);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether memory should be handed back now, given when it last was.
fn release_due(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|at| now.saturating_duration_since(at) >= RELEASE_INTERVAL)
}

/// One sample line: `name{labels,extra} value[ timestamp]`.
fn sample(
    out: &mut Vec<u8>,
    name: &[u8],
    suffix: &[u8],
    labels: &[LabelPair],
    extra: Option<(&str, &str)>,
    value: f64,
    timestamp_ms: i64,
) {
    out.extend_from_slice(name);
    out.extend_from_slice(suffix);
    if !labels.is_empty() || extra.is_some() {
        let mut separator = b'{';
        let pairs = labels.iter().map(|l| (l.name(), l.value())).chain(extra);
        for (label, value) in pairs {
            out.push(separator);
            out.extend_from_slice(label.as_bytes());
            out.extend_from_slice(b"=\"");
            escape(out, value.as_bytes(), true);
            out.push(b'"');
            separator = b',';
        }
        out.push(b'}');
    }
    out.push(b' ');
    push_f64(out, value);
    if timestamp_ms != 0 {
        out.push(b' ');
        push_i64(out, timestamp_ms);
    }
    out.push(b'\n');
}

/// Appends `text` escaped as the text format wants: `\\` and newline always, `"` in label
/// values. All three are ASCII, so working on bytes keeps UTF-8 intact.
fn escape(out: &mut Vec<u8>, text: &[u8], quote: bool) {
    let special = |b: u8| b == b'\\' || b == b'\n' || (quote && b == b'"');
    let mut rest = text;
    while let Some(i) = rest.iter().position(|&b| special(b)) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(match rest[i] {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            _ => b"\\\"",
        });
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
}

/// Largest magnitude below which every integer is an exact f64 (2^53).
const EXACT_INTEGERS: f64 = 9_007_199_254_740_992.0;

/// Appends `value` as `f64`'s `Display` writes it (what the TextEncoder uses): whole
/// numbers, nearly every value on the page, take a short path without the float formatter.
fn push_f64(out: &mut Vec<u8>, value: f64) {
    // Below 2^53 the shortest digits that read back as a whole number are all its digits;
    // -0.0 prints as "-0" and takes the general path.
    if value.fract() == 0.0
        && value.abs() < EXACT_INTEGERS
        && !(value == 0.0 && value.is_sign_negative())
    {
        push_i64(out, value as i64);
    } else {
        let mut text = String::new();
        push_f64_string(&mut text, value);
        out.extend_from_slice(text.as_bytes());
    }
}

fn push_f64_string(text: &mut String, value: f64) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = write!(text, "{value}");
}

/// Appends the decimal digits of `value`.
fn push_i64(out: &mut Vec<u8>, value: i64) {
    let mut digits = [0u8; 20];
    let mut n = value.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if value < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[i..]);
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

    /// Our encoder and the TextEncoder, on the same families.
    fn both(families: Vec<MetricFamily>) -> (String, String) {
        let theirs = TextEncoder::new()
            .encode_to_string(&families)
            .expect("encodes");
        let mut ours = Vec::new();
        encode_text(families, &mut ours).expect("encodes");
        (String::from_utf8(ours).expect("utf-8"), theirs)
    }

    const GAUGE: FamilySpec = FamilySpec {
        name: "test_gauge",
        help: "Help with a \\ backslash,\na newline and \"quotes\".",
        kind: Kind::Gauge,
        labels: &["a", "b"],
    };

    const COUNTER: FamilySpec = FamilySpec {
        name: "test_total",
        help: "",
        kind: Kind::Counter,
        labels: &["netns"],
    };

    const BARE: FamilySpec = FamilySpec {
        name: "test_bare",
        help: "No labels.",
        kind: Kind::Gauge,
        labels: &[],
    };

    #[test]
    fn writes_what_the_text_encoder_writes() {
        let values = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            -2.25,
            1e-7,
            123_456_789.0,
            4_026_531_840.0,
            9_007_199_254_740_991.0,
            9_007_199_254_740_992.0,
            9_007_199_254_740_994.0,
            1e21,
            -1e300,
            u64::MAX as f64,
            i64::MIN as f64,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            0.1 + 0.2,
        ];
        let mut gauge = GAUGE.family();
        for (i, v) in values.iter().enumerate() {
            gauge.add(&[format!("v{i}"), String::new()], *v);
        }
        gauge.add(&["back\\slash", "new\nline"], 1.0);
        gauge.add(&["say \"hi\"", "\\\"\n\\n"], 2.0);
        gauge.add(&["utf-8 é ✓", "tab\there"], 3.0);
        let mut counter = COUNTER.family();
        counter.add(&["4026531840"], 52.0);
        counter.add(&["4026532000"], 3.0);
        let mut bare = BARE.family();
        bare.add::<&str>(&[], 7.0);
        let mut hist = HIST.family();
        hist.add_histogram(
            &["80"],
            &[0.0, 0.5, 1.0, 4.0, 1e-3, 1e9, f64::INFINITY],
            &[2, 1, 0, 3, 0, 4, 1],
            17.5,
        );
        // A last finite bound: the +Inf bucket comes from the count.
        hist.add_histogram(&["443"], &[1.0, 2.0], &[1, 1], 3.0);
        let mut families: Vec<MetricFamily> = [gauge, counter, bare, hist]
            .into_iter()
            .filter_map(Family::finish)
            .collect();
        // A timestamp and a summary, which no collector makes but the encoder must get right.
        let mut stamped = Metric::from_label(Vec::new());
        stamped.set_timestamp_ms(1_700_000_000_123);
        let mut g = Gauge::default();
        g.set_value(-4.5);
        stamped.set_gauge(g);
        let mut summary = Metric::from_label(Vec::new());
        let mut s = prometheus::proto::Summary::default();
        let mut q = prometheus::proto::Quantile::default();
        q.set_quantile(0.99);
        q.set_value(12.0);
        s.set_quantile(vec![q]);
        s.set_sample_count(3);
        s.set_sample_sum(20.5);
        summary.set_summary(s);
        for (name, kind, metric) in [
            ("test_stamped", MetricType::GAUGE, stamped),
            ("test_summary", MetricType::SUMMARY, summary),
        ] {
            let mut family = MetricFamily::default();
            family.set_name(name.into());
            family.set_help("h".into());
            family.set_field_type(kind);
            family.set_metric(vec![metric]);
            families.push(family);
        }
        let (ours, theirs) = both(families);
        assert_eq!(ours, theirs);
        assert!(
            ours.contains(r#"test_gauge{a="back\\slash",b="new\nline"} 1"#),
            "{ours}"
        );
        assert!(
            ours.contains(r#"test_gauge{a="say \"hi\"",b="\\\"\n\\n"} 2"#),
            "{ours}"
        );
        assert!(
            ours.contains(
                "# HELP test_gauge Help with a \\\\ backslash,\\na newline and \"quotes\".\n"
            ),
            "{ours}"
        );
        assert!(
            !ours.contains("# HELP test_total"),
            "no HELP line without help"
        );
        assert!(ours.contains("test_bare 7\n"), "{ours}");
        assert!(ours.contains("test_stamped -4.5 1700000000123\n"), "{ours}");
    }

    #[test]
    fn whole_numbers_print_as_display_does() {
        let mut n: i64 = 1;
        for _ in 0..60 {
            for v in [n - 1, n, n + 1, -n, 10 * n / 7] {
                let v = v as f64;
                let mut ours = Vec::new();
                push_f64(&mut ours, v);
                assert_eq!(
                    String::from_utf8(ours).expect("ascii"),
                    v.to_string(),
                    "{v:e}"
                );
            }
            n = n.saturating_mul(2);
        }
    }

    #[test]
    fn refuses_what_the_text_encoder_refuses() {
        let mut out = Vec::new();
        assert!(encode_text(vec![MetricFamily::default()], &mut out).is_err());
        let mut nameless = MetricFamily::default();
        nameless.set_metric(vec![Metric::from_label(Vec::new())]);
        assert!(encode_text(vec![nameless], &mut out).is_err());
    }

    #[test]
    fn memory_goes_back_at_most_once_a_minute() {
        let t0 = Instant::now();
        assert!(release_due(None, t0));
        assert!(!release_due(Some(t0), t0 + Duration::from_secs(59)));
        assert!(release_due(Some(t0), t0 + RELEASE_INTERVAL));
        // Twice in a row does nothing worse than return.
        release_freed_memory();
        release_freed_memory();
    }

    #[test]
    fn the_next_buffer_is_sized_from_the_last_page() {
        let mut c = COUNTER.family();
        c.add(&["1"], 1.0);
        let mut out = Vec::new();
        encode_text(c.finish().into_iter().collect(), &mut out).expect("encodes");
        // Other tests may encode meanwhile: only the lower bound is certain.
        assert!(page_buffer().capacity() >= MIN_PAGE);
    }
}
