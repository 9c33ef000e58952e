//! What the benchmark reads from /proc, and how it sums up repeated measurements.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Pids of running `sockscope` processes other than `ours`: probes are global, so another
/// agent (a parallel test run) slows the rounds without ours too.
pub fn foreign_agents(ours: Option<u32>) -> BTreeSet<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    let is_agent = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sockscope")
    };
    (dir.flatten())
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| Some(pid) != ours && is_agent(&pid))
        .collect()
}

/// Runs `f` and returns how long it took, with its value.
pub fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    let start = Instant::now();
    let value = f()?;
    Ok((start.elapsed(), value))
}

/// `VmRSS` of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// User + system CPU time of every thread of `pid` (`utime` + `stime` of /proc/PID/stat).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // Fields after the parenthesised comm (which may hold spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64> {
        let field = fields.get(i).with_context(|| format!("short {path}"))?;
        field
            .parse()
            .with_context(|| format!("field {} of {path}", i + 3))
    };
    let ticks = tick(11)? + tick(12)?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// The median (mean of the middle two for an even count; NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The smallest and largest value.
pub fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Prints each round's own ratio `label` (the streams of a round run back to back, so a
/// drift of the machine's speed between rounds cancels out): their median and spread, beside
/// the ratio of the medians.
pub fn print_round_ratios(label: &str, without: &[f64], with: &[f64], what: &str) {
    let ratios: Vec<f64> = with.iter().zip(without).map(|(w, wo)| w / wo).collect();
    let (lo, hi) = min_max(&ratios);
    println!(
        "{label:<17}{:<13.3}{lo:.3}–{hi:.3}  (each round's {what})",
        median(&ratios)
    );
}

/// The hooks the agent attaches with `args` in `ns`, read from an agent started for
/// the purpose and stopped again: where the floor rounds attach their empty programs.
pub fn agent_hooks(
    ns: &testkit::Netns,
    agent: &std::path::Path,
    args: &[&str],
    listen: std::net::SocketAddr,
) -> Result<testkit::AgentHooks> {
    // Without cgroup v2 the floor goes on without the cgroup hook and says so.
    let before = testkit::root_ingress_programs();
    let agent = testkit::AgentProcess::start(ns, agent, args, listen)?;
    testkit::AgentHooks::of(agent.pid(), &before)
}

/// The floor's line under a table: what it is and what it attached.
pub fn print_floor_note(hooks: &testkit::AgentHooks) {
    println!(
        "(hooks only: programs that return at once, on the agent's hooks ({}): what calling \
         any program there costs this kernel, before the agent's do any work)",
        hooks.describe()
    );
}

/// Nearest-rank percentile of `values` (`p` in 0..=1); zero when empty.
pub fn percentile(values: &[Duration], p: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len().max(1)) - 1)
        .copied()
        .unwrap_or_default()
}

/// `VmHWM` of `pid` (the peak resident set since it started), in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in {path}"))
}

/// KiB as MiB, for the tables.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Raises this process's soft limit of open files to at least `want` (and the hard limit,
/// which root may do, when it is lower). Children (the agent) inherit it.
pub fn raise_nofile(want: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if limit.rlim_cur >= want {
        return Ok(());
    }
    limit.rlim_max = limit.rlim_max.max(want);
    limit.rlim_cur = want;
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setrlimit(RLIMIT_NOFILE, {want})"));
    }
    Ok(())
}

/// Rates of repeated rounds: median and spread, as the tables print them.
pub struct Rates(pub Vec<f64>);

impl Rates {
    pub fn median(&self) -> f64 {
        median(&self.0)
    }

    /// `lo–hi`, rounded to whole units.
    pub fn spread(&self) -> String {
        let (lo, hi) = min_max(&self.0);
        format!("{lo:.0}–{hi:.0}")
    }
}

/// "met" or "not met".
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "not met" }
}

/// One timed series of GETs of a /metrics page.
pub struct Scrapes {
    /// Each GET's wall time, client side (connect to last byte).
    pub times: Vec<Duration>,
    /// The last page's size in bytes.
    pub page: usize,
    /// Sample lines of the last page.
    pub series: usize,
    /// The last page.
    pub last: String,
}

impl Scrapes {
    /// Milliseconds at percentile `p` (0..=1).
    pub fn ms(&self, p: f64) -> f64 {
        percentile(&self.times, p).as_secs_f64() * 1e3
    }
}

/// GETs `path` from `addr` inside `ns` up to `k` times (at most for `limit`), timing each.
pub fn time_scrapes(
    ns: &testkit::Netns,
    addr: std::net::SocketAddr,
    path: &str,
    k: u32,
    limit: Duration,
) -> Result<Scrapes> {
    let start = Instant::now();
    let mut times = Vec::with_capacity(k as usize);
    let mut last = String::new();
    while times.len() < k as usize && (times.is_empty() || start.elapsed() < limit) {
        let (took, (status, body)) = time(|| testkit::http_get(ns, addr, path))?;
        if status != 200 {
            anyhow::bail!("GET {path} from {addr} answered {status}: {}", body.trim());
        }
        times.push(took);
        last = body;
    }
    Ok(Scrapes {
        times,
        page: last.len(),
        series: sample_lines(&last),
        last,
    })
}

/// Lines of a Prometheus text page that are samples (not comments, not blank).
pub fn sample_lines(page: &str) -> usize {
    page.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// Resets `pid`'s `VmHWM` to its current RSS (`/proc/PID/clear_refs` 5), so that a later
/// [`peak_rss_kib`] shows the peak of what happened in between.
pub fn reset_peak_rss(pid: u32) -> Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("write 5 to {path}"))
}

/// A /metrics server measured over a series of scrapes: latency, page, RSS, CPU.
pub struct Served {
    pub scrapes: Scrapes,
    /// RSS after the scrapes, KiB.
    pub rss_kib: u64,
    /// Peak RSS during the scrapes, KiB.
    pub peak_kib: u64,
    /// CPU time (user + system) per scrape.
    pub cpu_per_scrape: Duration,
}

/// Times `k` scrapes of `http://addr/metrics` (bounded by `limit`) served by process `pid`
/// inside `ns`, after one untimed warm-up scrape.
pub fn measure_server(
    ns: &testkit::Netns,
    pid: u32,
    addr: std::net::SocketAddr,
    k: u32,
    limit: Duration,
) -> Result<Served> {
    time_scrapes(ns, addr, "/metrics", 1, limit).context("warm-up scrape")?;
    reset_peak_rss(pid)?;
    let cpu0 = cpu_time(pid)?;
    let scrapes = time_scrapes(ns, addr, "/metrics", k, limit)?;
    let cpu = cpu_time(pid)?.saturating_sub(cpu0);
    let n = u32::try_from(scrapes.times.len().max(1)).unwrap_or(u32::MAX);
    Ok(Served {
        rss_kib: rss_kib(pid)?,
        peak_kib: peak_rss_kib(pid)?,
        cpu_per_scrape: cpu / n,
        scrapes,
    })
}

/// Series of `page` labelled with another network namespace than `ours`, and how many such
/// namespaces: the agent reads every namespace of the host, so other processes' listeners
/// (a parallel test run) weigh on its page too.
pub fn foreign_series(page: &str, ours: u64) -> (usize, usize) {
    let ours = ours.to_string();
    let mut namespaces = std::collections::BTreeSet::new();
    let mut series = 0;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, rest)) = line.split_once("netns=\"") else {
            continue;
        };
        let netns = rest.split('"').next().unwrap_or_default();
        if netns != ours {
            series += 1;
            namespaces.insert(netns.to_owned());
        }
    }
    (series, namespaces.len())
}

/// Prints a warning when other namespaces put more than a few series on the page.
pub fn warn_foreign(page: &str, ours: u64) {
    let (series, namespaces) = foreign_series(page, ours);
    // The host's namespace and a few test namespaces hold some series anyway.
    if series > 1000 {
        println!(
            "warning: {series} series of {namespaces} other namespaces on the page (other processes' \
             listeners): they weigh on the figures above"
        );
    }
}
