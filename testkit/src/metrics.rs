//! A parser for the Prometheus text exposition format, with lookups for assertions.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow, bail};

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, including `_total`, `_bucket`… suffixes as exposed.
    pub name: String,
    /// Label pairs, unescaped.
    pub labels: BTreeMap<String, String>,
    /// Sample value (may be infinite or NaN).
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }

    /// Whether the sample carries every given label pair (it may have more).
    pub fn has_labels(&self, labels: &[(&str, &str)]) -> bool {
        labels.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// A parsed scrape: samples in order, plus the `# TYPE` of each metric family.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

impl Metrics {
    /// Parses Prometheus text format; errors name the offending line.
    pub fn parse(text: &str) -> Result<Metrics> {
        let mut metrics = Metrics::default();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if let (Some("TYPE"), Some(name), Some(kind)) =
                    (words.next(), words.next(), words.next())
                {
                    metrics.types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            let sample =
                parse_sample(line).with_context(|| format!("line {}: {line:?}", index + 1))?;
            metrics.samples.push(sample);
        }
        Ok(metrics)
    }

    /// All samples, in exposition order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Samples of the namespace with inode `netns` or of no namespace: what a test's own
    /// agent adds, without the series of other tests' namespaces that it also sees.
    pub fn own_series_count(&self, netns: &str) -> usize {
        self.samples
            .iter()
            .filter(|s| s.label("netns").is_none_or(|n| n == netns))
            .count()
    }

    /// All samples named `name`.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// Sum of the samples named `name` that carry all the given label pairs (0 if none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.has_labels(labels))
            .map(|s| s.value)
            .sum()
    }

    /// The value of the one series named `name` whose labels are exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels.len() == labels.len() && s.has_labels(labels))
            .map(|s| s.value)
    }

    /// Whether any sample is named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// The `# TYPE` of a metric family (`counter`, `gauge`, `histogram`…).
    pub fn metric_type(&self, family: &str) -> Option<&str> {
        self.types.get(family).map(String::as_str)
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| anyhow!("no value"))?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        || name.starts_with(|c: char| c.is_ascii_digit())
    {
        bail!("bad metric name {name:?}");
    }
    let mut rest = line[name_end..].trim_start();
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or_else(|| anyhow!("no value"))?;
    let value = parse_value(value)?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .with_context(|| format!("bad timestamp {timestamp:?}"))?;
    }
    if let Some(extra) = fields.next() {
        bail!("unexpected {extra:?} after the value");
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `l1="v1",l2="v2"}` (after the `{`); returns what follows the `}`.
fn parse_labels<'a>(mut rest: &'a str, labels: &mut BTreeMap<String, String>) -> Result<&'a str> {
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let eq = rest.find('=').ok_or_else(|| anyhow!("label without '='"))?;
        let key = rest[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("bad label name {key:?}");
        }
        rest = rest[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or_else(|| anyhow!("label {key} value not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => bail!("unterminated value of label {key}"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, other)) => {
                        value.push('\\');
                        value.push(other);
                    }
                    None => bail!("unterminated value of label {key}"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(key.to_owned(), value).is_some() {
            bail!("label {key} given twice");
        }
        rest = rest[end + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            bail!("expected ',' or '}}' after label {key}");
        }
    }
}

fn parse_value(text: &str) -> Result<f64> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text
            .parse::<f64>()
            .with_context(|| format!("bad value {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP sockscope_resets_total TCP resets sent.
# TYPE sockscope_resets_total counter
sockscope_resets_total{netns="4026532000",reason="no_socket"} 3
sockscope_resets_total{netns="4026532000",reason="not_specified"} 2
sockscope_resets_total{netns="4026531840",reason="no_socket"} 10
# TYPE sockscope_up gauge
sockscope_up 1
weird{path="C:\\dir\\",quote="say \"hi\"",nl="a\nb",} 1.5e3 1700000000000
h_bucket{le="+Inf"} +Inf
h_bucket{le="0.5"} -Inf
nan_metric NaN
spaced { a = "1" , b="2" } 7
"#;

    #[test]
    fn parses_samples_labels_and_values() -> Result<()> {
        let m = Metrics::parse(TEXT)?;
        assert_eq!(m.samples().len(), 9);
        assert_eq!(m.metric_type("sockscope_resets_total"), Some("counter"));
        assert_eq!(m.metric_type("sockscope_up"), Some("gauge"));
        assert_eq!(m.get("sockscope_up", &[]), Some(1.0));

        let weird = &m.series("weird")[0];
        assert_eq!(weird.label("path"), Some(r"C:\dir\"));
        assert_eq!(weird.label("quote"), Some(r#"say "hi""#));
        assert_eq!(weird.label("nl"), Some("a\nb"));
        assert_eq!(weird.value, 1500.0);

        assert_eq!(m.get("h_bucket", &[("le", "+Inf")]), Some(f64::INFINITY));
        assert_eq!(m.get("h_bucket", &[("le", "0.5")]), Some(f64::NEG_INFINITY));
        assert!(m.get("nan_metric", &[]).is_some_and(f64::is_nan));
        assert_eq!(m.get("spaced", &[("a", "1"), ("b", "2")]), Some(7.0));
        Ok(())
    }

    #[test]
    fn sum_get_series() -> Result<()> {
        let m = Metrics::parse(TEXT)?;
        let name = "sockscope_resets_total";
        assert_eq!(m.series(name).len(), 3);
        assert_eq!(m.sum(name, &[]), 15.0);
        assert_eq!(m.sum(name, &[("netns", "4026532000")]), 5.0);
        assert_eq!(m.sum(name, &[("reason", "no_socket")]), 13.0);
        assert_eq!(m.sum(name, &[("netns", "1")]), 0.0);
        assert_eq!(m.sum("absent", &[]), 0.0);
        // get() needs the exact label set.
        assert_eq!(m.get(name, &[("netns", "4026532000")]), None);
        assert_eq!(
            m.get(name, &[("reason", "no_socket"), ("netns", "4026532000")]),
            Some(3.0)
        );
        assert!(m.contains(name));
        assert!(!m.contains("sockscope"));
        Ok(())
    }

    #[test]
    fn rejects_malformed_lines() {
        for bad in [
            "no_value",
            "m{a=\"1\"",
            "m{a=1} 2",
            "m{a=\"1\" b=\"2\"} 3",
            "m{a=\"1\",a=\"2\"} 3",
            "m 1 2 3",
            "m abc",
            "m 1 notatime",
            "9m 1",
            "m{a=\"unterminated} 1",
        ] {
            assert!(Metrics::parse(bad).is_err(), "{bad:?} should not parse");
        }
        let err = Metrics::parse("ok 1\nbad{ 2\n").expect_err("bad line");
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
    }
}
