//! `sockscope listeners`: a table of every TCP listener with its queues, what it dropped
//! during an interval and a diagnosis in plain words.
//!
//! Two sources give the same [`report::Report`]: the kernel itself ([`kernel`]: sock_diag
//! in every namespace, the listen probes loaded for the command's life, the owning process
//! from /proc), or a running agent's page ([`agent`], `--agent URL`). [`table`] draws it for a
//! terminal; `--json` prints it as one JSON document per interval, one per line.

pub mod agent;
pub mod kernel;
pub mod owners;
pub mod report;
pub mod table;

use std::{
    io::{IsTerminal as _, Write as _},
    process::ExitCode,
    time::Duration,
};

use crate::cli::ListenersArgs;

/// The shortest `--interval`: shorter would not leave time for a sample between the readings.
const MIN_INTERVAL: Duration = Duration::from_millis(200);
/// The longest `--interval`.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// Parses `--interval`: `5s`, `500ms`, `2m`, `1.5s`, or a number of seconds (`5`).
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (number, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        _ => return Err(format!("`{s}`: use a duration such as 5s, 500ms or 2m")),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: use a duration such as 5s, 500ms or 2m"))?;
    if !value.is_finite() {
        return Err(format!("`{s}` is not a duration"));
    }
    let d = Duration::try_from_secs_f64(value * scale)
        .map_err(|_| format!("`{s}` is not a duration"))?;
    if d < MIN_INTERVAL || d > MAX_INTERVAL {
        return Err(format!(
            "`{s}`: the interval must be from {} ms to {} s",
            MIN_INTERVAL.as_millis(),
            MAX_INTERVAL.as_secs()
        ));
    }
    Ok(d)
}

/// Where the figures come from.
enum Source {
    // Boxed: the kernel source is large and made once.
    Kernel(Box<kernel::KernelSource>),
    Agent(agent::AgentSource),
}

impl Source {
    fn measure(
        &mut self,
        interval: Duration,
        started: &mut dyn FnMut(),
    ) -> anyhow::Result<report::Report> {
        match self {
            Self::Kernel(k) => k.measure(interval, started),
            Self::Agent(a) => a.measure(interval, started),
        }
    }
}

/// Runs the command; 0 when every interval was measured and printed, 1 when it could not
/// (the agent unreachable, no way to read the namespaces), with one line saying why.
pub fn main(args: &ListenersArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sockscope listeners: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &ListenersArgs) -> anyhow::Result<()> {
    let (mut source, from) = match &args.agent {
        Some(url) => (
            Source::Agent(agent::AgentSource::new(url.clone())),
            format!("through {url}"),
        ),
        None => (
            Source::Kernel(Box::new(kernel::KernelSource::new(&args.paths)?)),
            "from the kernel".to_owned(),
        ),
    };
    let clear = args.watch && !args.json && std::io::stdout().is_terminal();
    let mut announced = false;
    loop {
        // Said once, on stderr, when the first reading is in: a person sees that something
        // is happening, and a script knows from when the interval counts.
        let mut started = || {
            if !announced {
                announced = true;
                eprintln!(
                    "sockscope listeners: measuring {from} for {:.1} s{}",
                    args.interval.as_secs_f64(),
                    if args.watch {
                        ", again until Ctrl-C"
                    } else {
                        ""
                    }
                );
            }
        };
        let mut report = source.measure(args.interval, &mut started)?;
        report.finish();
        let mut text = if args.json {
            serde_json::to_string(&report)?
        } else {
            table::render(&report)
        };
        if args.json {
            text.push('\n');
        }
        if clear {
            // Home and clear the screen: the new table replaces the old one.
            text.insert_str(0, "\x1b[H\x1b[2J");
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // The reader went away (`| head`): nothing left to do.
            return Ok(());
        }
        if !args.watch {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_interval("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_interval("2m"), Ok(Duration::from_secs(120)));
        for bad in [
            "0", "100ms", "-1", "abc", "5h", "", "2 hours", "inf", "NaN", "2h",
        ] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
