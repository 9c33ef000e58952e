//! `--config.file` and SIGHUP: the file's settings take effect, the command line wins over
//! it, and a reload changes watched ports, budgets and collectors in place without losing a
//! counter or re-attaching a program; an invalid file changes nothing and the log says why;
//! a setting that needs a restart is named.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use testkit::{
    AgentProcess, Metrics, Netns, TempDir, connect_closed_port, require_root, wait_until,
};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");
const SENT: &str = "sockscope_tcp_resets_sent_total";

fn agent_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9844))
}

/// A config file in a directory removed on drop.
struct ConfigFile {
    dir: TempDir,
    path: String,
}

impl ConfigFile {
    fn new(text: &str) -> Result<Self> {
        let dir = TempDir::new("reload")?;
        let path = dir.write("sockscope.toml", text)?;
        let path = path.to_str().context("UTF-8 temp path")?.to_string();
        Ok(Self { dir, path })
    }

    /// Replaces the content at once (write then rename), as a config tool would.
    fn write(&self, text: &str) -> Result<()> {
        self.dir.write("sockscope.toml", text)?;
        Ok(())
    }

    fn path(&self) -> &str {
        &self.path
    }
}

/// Sends SIGHUP and waits until the log has one more line containing `marker`.
fn hangup(agent: &AgentProcess, marker: &str) -> Result<String> {
    let before = agent.log().matches(marker).count();
    agent.signal(Signal::SIGHUP)?;
    wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        Ok(agent.log().matches(marker).count() > before)
    })
    .with_context(|| format!("no `{marker}` in the log after SIGHUP:\n{}", agent.log()))?;
    let log = agent.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(marker))
        .unwrap_or_default();
    Ok(line.to_string())
}

fn sent(m: &Metrics, netns: &str, port: &str) -> f64 {
    m.sum(
        SENT,
        &[
            ("netns", netns),
            ("reason", "no_socket"),
            ("state", "none"),
            ("port", port),
        ],
    )
}

fn has_netstat(m: &Metrics) -> bool {
    m.samples()
        .iter()
        .any(|s| s.name.starts_with("sockscope_netstat_"))
}

/// Two ports nobody listens on in `ns`.
fn closed_ports(ns: &Netns) -> Result<(u16, u16)> {
    // The test's own namespace has nothing listening. The ports lie below the namespace's
    // ephemeral range: a connect whose source port the kernel picked equal to its
    // destination would connect to itself and succeed.
    let (low, _) = ns.run(|| -> Result<(u16, u16)> {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
        let mut parts = range.split_whitespace().map(str::parse::<u16>);
        match (parts.next(), parts.next()) {
            (Some(Ok(low)), Some(Ok(high))) => Ok((low, high)),
            _ => anyhow::bail!("unreadable ip_local_port_range: {range:?}"),
        }
    })??;
    anyhow::ensure!(low > 7010, "ephemeral ports start at {low}");
    Ok((7001, 7002))
}

fn refuse(ns: &Netns, port: u16, n: usize) -> Result<()> {
    let refused = ns.run(|| connect_closed_port(SocketAddr::from(([127, 0, 0, 1], port)), n))??;
    anyhow::ensure!(refused == n, "{refused} of {n} connects to {port} refused");
    Ok(())
}

#[test]
fn sighup_applies_watch_ports_budgets_and_collectors_in_place() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let netns = ns.inode().to_string();
    let (a, b) = closed_ports(&ns)?;
    let config = ConfigFile::new(&format!(
        "\"watch.ports\" = [{a}]\n[limit]\nseries-per-metric = 100\n"
    ))?;
    let mut agent = AgentProcess::start(
        &ns,
        Path::new(AGENT),
        &["--config.file", config.path()],
        agent_addr(),
    )?;
    let held = agent.held_bpf_ids()?;
    assert!(!held.is_empty(), "the agent holds its programs");

    // Watched from the file: port a keeps its label, b folds.
    refuse(&ns, a, 2)?;
    refuse(&ns, b, 3)?;
    let m = agent.scrape()?;
    assert_eq!(sent(&m, &netns, &a.to_string()), 2.0);
    assert_eq!(sent(&m, &netns, "other"), 3.0);
    assert!(has_netstat(&m), "netstat is on");

    // Reload: watch b too, switch the netstat collector off.
    config.write(&format!(
        "\"watch.ports\" = [{a}, {b}]\n\"limit.series-per-metric\" = 100\n\"collector.netstat\" = false\n"
    ))?;
    let line = hangup(&agent, "applied")?;
    assert!(
        line.contains("watch.ports") && line.contains("collector.netstat"),
        "{line}"
    );
    refuse(&ns, b, 4)?;
    let m = agent.scrape()?;
    assert_eq!(sent(&m, &netns, &b.to_string()), 4.0, "b is watched now");
    assert_eq!(sent(&m, &netns, &a.to_string()), 2.0, "a's counter goes on");
    assert_eq!(sent(&m, &netns, "other"), 3.0, "and so does other's");
    assert!(!has_netstat(&m), "netstat is off");
    assert_eq!(agent.held_bpf_ids()?, held, "nothing re-attached");

    // An invalid file: nothing changes, the log names the key.
    config.write("\"watch.ports\" = [1, 70000]\n")?;
    let line = hangup(&agent, "reload failed")?;
    assert!(
        line.contains("watch.ports") && line.contains("70000") && line.contains(config.path()),
        "{line}"
    );
    config.write("\"watch.prots\" = [1]\n")?;
    let line = hangup(&agent, "reload failed")?;
    assert!(line.contains("unknown key `watch.prots`"), "{line}");
    refuse(&ns, b, 1)?;
    assert_eq!(
        sent(&agent.scrape()?, &netns, &b.to_string()),
        5.0,
        "b is still watched"
    );

    // A budget of 0 folds label sets not seen yet, and counts them; netstat back on; the
    // log level needs a restart and keeps its running value.
    // A third closed port, below the ephemeral range as the others (see closed_ports).
    let c = b + 1;
    config.write(&format!(
        "\"watch.ports\" = [{a}, {b}, {c}]\n\"limit.series-per-metric\" = 0\n\"log.level\" = \"debug\"\n"
    ))?;
    let line = hangup(&agent, "applied")?;
    assert!(
        line.contains("limit.series-per-metric") && line.contains("collector.netstat"),
        "{line}"
    );
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("log.level") && l.contains("after a restart")),
        "{log}"
    );
    let overflow_before = agent
        .scrape()?
        .get("sockscope_label_overflow_total", &[("metric", SENT)])
        .unwrap_or(0.0);
    refuse(&ns, c, 2)?;
    refuse(&ns, a, 1)?;
    let m = agent.scrape()?;
    assert_eq!(
        sent(&m, &netns, &c.to_string()),
        0.0,
        "c folds: no budget left"
    );
    assert_eq!(sent(&m, &netns, "other"), 5.0, "3 before and c's 2");
    assert_eq!(
        sent(&m, &netns, &a.to_string()),
        3.0,
        "a was decided before"
    );
    // The registry may read its own counters before the collector that folds: the
    // count shows in the next scrape at the latest. At least c's label set folded (a
    // scrape connection aborted under load is another new label set, folded too).
    let overflow = agent
        .scrape()?
        .get("sockscope_label_overflow_total", &[("metric", SENT)])
        .unwrap_or(0.0);
    assert!(overflow > overflow_before, "{overflow} > {overflow_before}");
    assert!(has_netstat(&m), "netstat is back");
    assert_eq!(agent.held_bpf_ids()?, held, "nothing re-attached");
    let status = agent.terminate(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    Ok(())
}

#[test]
fn command_line_wins_and_a_bad_file_stops_start_up() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let netns = ns.inode().to_string();
    let (a, b) = closed_ports(&ns)?;
    let config = ConfigFile::new(&format!(
        "\"watch.ports\" = [{a}]\n\"collector.netstat\" = false\n"
    ))?;
    let watch = format!("--watch.ports={b}");
    let agent = AgentProcess::start(
        &ns,
        Path::new(AGENT),
        &[
            "--config.file",
            config.path(),
            &watch,
            "--collector.netstat",
        ],
        agent_addr(),
    )?;
    refuse(&ns, a, 1)?;
    refuse(&ns, b, 1)?;
    let m = agent.scrape()?;
    assert_eq!(
        sent(&m, &netns, &b.to_string()),
        1.0,
        "the command line's port"
    );
    assert_eq!(
        sent(&m, &netns, "other"),
        1.0,
        "the file's port is not watched"
    );
    assert!(has_netstat(&m), "--collector.netstat wins over the file");
    drop(agent);

    // At start an invalid file is one clear line and exit 1, before anything is loaded.
    config.write("[web]\nlisten-adress = \":1\"\n")?;
    let output = ns.run(|| {
        std::process::Command::new(AGENT)
            .args(["--config.file", config.path()])
            .output()
    })??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(config.path()) && stderr.contains("unknown key `web.listen-adress`"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let output = ns.run(|| {
        std::process::Command::new(AGENT)
            .args(["--config.file", "/nonexistent/sockscope.toml"])
            .output()
    })??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/sockscope.toml"), "{stderr}");
    Ok(())
}

fn filter_packets(m: &Metrics, name: &str) -> Option<f64> {
    m.get("sockscope_filter_packets_total", &[("filter", name)])
}

#[test]
fn sighup_replaces_socket_filters_and_keeps_the_counts_of_unchanged_ones() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let (a, b) = closed_ports(&ns)?;
    let to_a = format!("to_a=tcp dst port {a} and tcp[tcpflags] & tcp-syn != 0");
    let to_b = format!("to_b=tcp dst port {b} and tcp[tcpflags] & tcp-syn != 0");
    let config = ConfigFile::new(&format!(
        "iface = [\"lo\"]\nfilter = [\"{to_a}\", \"gone=tcp dst port {b}\"]\n"
    ))?;
    let agent = AgentProcess::start(
        &ns,
        Path::new(AGENT),
        &["--config.file", config.path()],
        agent_addr(),
    )?;
    // Each refused connect is one SYN on `lo` (its outgoing copy is left out, as tcpdump does).
    refuse(&ns, a, 3)?;
    let m = agent.scrape()?;
    assert_eq!(filter_packets(&m, "to_a"), Some(3.0), "{}", agent.log());
    assert_eq!(filter_packets(&m, "gone"), Some(0.0));

    // Keep to_a, drop gone, add to_b.
    config.write(&format!(
        "iface = [\"lo\"]\nfilter = [\"{to_a}\", \"{to_b}\"]\n"
    ))?;
    let line = hangup(&agent, "applied")?;
    assert!(line.contains("filter"), "{line}");
    let m = agent.scrape()?;
    assert_eq!(
        filter_packets(&m, "to_a"),
        Some(3.0),
        "an unchanged filter keeps its count across the reload"
    );
    assert_eq!(
        filter_packets(&m, "gone"),
        None,
        "a removed filter leaves the page"
    );
    assert_eq!(filter_packets(&m, "to_b"), Some(0.0));

    refuse(&ns, a, 2)?;
    refuse(&ns, b, 4)?;
    let m = agent.scrape()?;
    assert_eq!(filter_packets(&m, "to_a"), Some(5.0), "{}", agent.log());
    assert_eq!(filter_packets(&m, "to_b"), Some(4.0), "{}", agent.log());

    // An invalid expression on reload changes nothing.
    config.write("iface = [\"lo\"]\nfilter = [\"bad=tcp port nonsense\"]\n")?;
    let line = hangup(&agent, "reload")?;
    assert!(!line.contains("applied filter"), "{line}");
    let m = agent.scrape()?;
    assert_eq!(filter_packets(&m, "to_a"), Some(5.0), "{}", agent.log());
    assert_eq!(filter_packets(&m, "bad"), None);
    Ok(())
}

/// Packet sockets open in `ns` (`/proc/net/packet` lists them per namespace).
fn packet_sockets(ns: &Netns) -> Result<usize> {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/packet"))??;
    Ok(text
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count())
}

/// RSTs the classifier saw on `lo` in `direction`, all ports.
fn rsts_seen(m: &Metrics, direction: &str) -> f64 {
    m.sum(
        "sockscope_tcp_segments_total",
        &[("iface", "lo"), ("direction", direction), ("flags", "rst")],
    )
}

/// Refused connects to `port` in batches until `stop`; returns how many.
fn refuse_until(ns: &Netns, port: u16, stop: &std::sync::atomic::AtomicBool) -> Result<usize> {
    let mut total = 0;
    // Bounded: 200 batches at most, whatever happens to the flag.
    for _ in 0..200 {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        refuse(ns, port, 50)?;
        total += 50;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(total)
}

/// The classifier and the named filters share one packet socket on `lo`; reloads under
/// traffic hand it from one program to the next (filters changed, all removed, added back)
/// without the classifier missing or doubling a segment, and an unchanged filter keeps an
/// exact count through them.
#[test]
fn reloads_under_traffic_hand_the_one_tap_over_exactly() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let (a, b) = closed_ports(&ns)?;
    let to_a = format!("to_a=tcp dst port {a} and tcp[tcpflags] & tcp-syn != 0");
    let to_b = format!("to_b=tcp dst port {b} and tcp[tcpflags] & tcp-syn != 0");
    let config = ConfigFile::new(&format!("iface = [\"lo\"]\nfilter = [\"{to_a}\"]\n"))?;
    let agent = AgentProcess::start(
        &ns,
        Path::new(AGENT),
        &["--config.file", config.path()],
        agent_addr(),
    )?;
    assert_eq!(packet_sockets(&ns)?, 1, "one tap on lo: {}", agent.log());
    let counters = ns.counters()?;
    let before = agent.scrape()?;
    ensure_classifier(&before, &agent)?;

    // Phase 1: to_a stays, to_b comes, under traffic to a.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sent = std::thread::scope(|s| -> Result<usize> {
        let traffic = s.spawn(|| refuse_until(&ns, a, &stop));
        std::thread::sleep(Duration::from_millis(150));
        config.write(&format!(
            "iface = [\"lo\"]\nfilter = [\"{to_a}\", \"{to_b}\"]\n"
        ))?;
        let line = hangup(&agent, "applied");
        std::thread::sleep(Duration::from_millis(150));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = traffic.join().expect("traffic thread")?;
        line?;
        Ok(sent)
    })?;
    assert_eq!(packet_sockets(&ns)?, 1, "still one tap: {}", agent.log());
    let m = agent.scrape()?;
    assert_eq!(
        filter_packets(&m, "to_a"),
        Some(sent as f64),
        "an unchanged filter counts every SYN through the reload: {}",
        agent.log()
    );
    let rsts = ns.counters()?.delta(&counters).get("TcpOutRsts")? as f64;
    assert!(rsts >= sent as f64);
    for direction in ["egress", "ingress"] {
        assert_eq!(
            rsts_seen(&m, direction) - rsts_seen(&before, direction),
            rsts,
            "{direction} RSTs on lo: the classifier saw each once through the reload"
        );
    }

    // Phase 2: every filter goes (the classifier alone on the tap), then one comes back.
    let counters = ns.counters()?;
    let before = agent.scrape()?;
    stop.store(false, std::sync::atomic::Ordering::Relaxed);
    std::thread::scope(|s| -> Result<()> {
        let traffic = s.spawn(|| refuse_until(&ns, b, &stop));
        let reloads = (|| -> Result<()> {
            std::thread::sleep(Duration::from_millis(100));
            config.write("iface = [\"lo\"]\n")?;
            hangup(&agent, "applied")?;
            anyhow::ensure!(packet_sockets(&ns)? == 1, "the classifier's tap");
            std::thread::sleep(Duration::from_millis(100));
            config.write(&format!("iface = [\"lo\"]\nfilter = [\"{to_b}\"]\n"))?;
            hangup(&agent, "applied")?;
            anyhow::ensure!(packet_sockets(&ns)? == 1, "one tap again");
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        traffic.join().expect("traffic thread")?;
        reloads
    })
    .with_context(|| agent.log())?;
    let m = agent.scrape()?;
    assert_eq!(filter_packets(&m, "to_a"), None);
    let rsts = ns.counters()?.delta(&counters).get("TcpOutRsts")? as f64;
    for direction in ["egress", "ingress"] {
        assert_eq!(
            rsts_seen(&m, direction) - rsts_seen(&before, direction),
            rsts,
            "{direction} RSTs on lo: the classifier saw each once through the reloads"
        );
    }
    Ok(())
}

/// The classifier runs (its series are on the page once lo has carried a segment).
fn ensure_classifier(m: &Metrics, agent: &AgentProcess) -> Result<()> {
    anyhow::ensure!(
        m.samples()
            .iter()
            .any(|s| s.name == "sockscope_tcp_segments_total"),
        "no classifier series: {}",
        agent.log()
    );
    Ok(())
}
