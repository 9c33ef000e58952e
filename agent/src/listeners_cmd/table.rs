//! The terminal table of a [`Report`].

use std::fmt::Write as _;

use super::report::{Listener, Report};

const HEADERS: [&str; 8] = [
    "NETNS",
    "LISTEN",
    "PROCESS",
    "ACCEPTQ",
    "SYNQ",
    "OVERFLOWS",
    "DROPS",
    "DIAGNOSIS",
];

/// Shown where a figure could not be measured (the notes below the table say why).
const NA: &str = "n/a";

/// The report as text: a heading line, the table, and what could not be measured.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let from = if report.source == "kernel" {
        "from the kernel".to_owned()
    } else {
        format!("through {}", report.source)
    };
    let _ = writeln!(
        out,
        "sockscope listeners: {:.1} s {from}, {} samples of every queue (full: length >= limit)",
        report.interval_seconds, report.samples
    );
    if report.listeners.is_empty() {
        out.push_str("no TCP listener found\n");
    } else {
        let rows: Vec<[String; 7]> = report.listeners.iter().map(|l| cells(report, l)).collect();
        let mut widths = [0usize; 7];
        for (i, w) in widths.iter_mut().enumerate() {
            *w = rows
                .iter()
                .map(|r| r[i].chars().count())
                .chain([HEADERS[i].len()])
                .max()
                .unwrap_or(0);
        }
        let indent: usize = widths.iter().map(|w| w + 2).sum();
        let mut line = String::new();
        for (i, w) in widths.iter().enumerate() {
            let _ = write!(line, "{:<w$}  ", HEADERS[i]);
        }
        line.push_str(HEADERS[7]);
        out.push_str(&line);
        out.push('\n');
        for (row, l) in rows.iter().zip(&report.listeners) {
            line.clear();
            for (cell, w) in row.iter().zip(widths) {
                let _ = write!(line, "{cell:<w$}  ");
            }
            let mut diagnosis = l.diagnosis.iter();
            line.push_str(diagnosis.next().map_or("", String::as_str));
            out.push_str(&line);
            out.push('\n');
            // Further findings go on their own lines under the first.
            for more in diagnosis {
                let _ = writeln!(out, "{:indent$}{more}", "");
            }
        }
    }
    for u in &report.unavailable {
        let _ = writeln!(out, "{NA}: {}: {}", u.what, u.why);
    }
    out
}

fn cells(report: &Report, l: &Listener) -> [String; 7] {
    let netns = match report.namespace(l.netns).map(|n| n.label()) {
        Some(label) if !label.is_empty() => format!("{} {label}", l.netns),
        _ => l.netns.to_string(),
    };
    let process = l
        .process
        .as_ref()
        .map_or_else(|| "-".to_owned(), |p| format!("{}/{}", p.comm, p.pid));
    let number = |v: Option<u64>| v.map_or_else(|| NA.to_owned(), |v| v.to_string());
    [
        netns,
        l.listen.clone(),
        process,
        format!("{}/{}", l.accept_queue.length, l.accept_queue.limit),
        l.syn_queue.length.to_string(),
        number(l.overflows.total),
        number(l.drops),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listeners_cmd::report::{Namespace, Overflows, Process, Unavailable};

    #[test]
    fn renders_columns_and_notes() {
        let mut r = Report::new("kernel".into());
        r.interval_seconds = 3.0;
        r.samples = 31;
        r.namespaces.push(Namespace {
            netns: 42,
            name: "demo".into(),
            ..Namespace::default()
        });
        let mut l = Listener::new(42, "::1".parse().expect("addr"), 8080);
        l.process = Some(Process {
            pid: 7,
            comm: "python3".into(),
        });
        l.overflows = Overflows::new(None, None);
        l.diagnosis = vec!["first".into(), "second".into()];
        r.listeners.push(l);
        r.unavailable.push(Unavailable {
            what: "OVERFLOWS".into(),
            why: "no programs".into(),
        });
        let text = render(&r);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("NETNS"), "{text}");
        assert!(
            lines[2].starts_with("42 demo  [::1]:8080  python3/7  0/0"),
            "{text}"
        );
        assert!(lines[2].contains(" n/a "), "{text}");
        assert!(lines[2].ends_with("first"), "{text}");
        let column = lines[1].find("DIAGNOSIS").expect("header");
        assert_eq!(lines[3].find("second"), Some(column), "{text}");
        assert_eq!(lines[4], "n/a: OVERFLOWS: no programs");
    }
}
