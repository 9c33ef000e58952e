//! Section `peers`: other tools that watch the same things, side by side with the agent, on
//! this machine, in one run: node_exporter's netstat and sockstat collectors (/metrics with
//! the same idle listeners), bpftrace with a tracepoint-only script and bcc's `tcpsynbl`
//! (their cost on the same churn). A tool that cannot run here is reported with the reason.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::{AgentProcess, ChildGuard, Netns};

use crate::Args;
use crate::churn::{ChurnLab, Round, TARGET_RATIO};
use crate::listeners::{AGENT_LISTEN, open_listeners};
use crate::measure::{
    Rates, Served, foreign_agents, measure_server, mib, raise_nofile, verdict, warn_foreign,
};

/// Where node_exporter listens, inside the benchmark's namespace.
const NODE_EXPORTER_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9100);
/// How long a peer gets to start (node_exporter to answer, a tracer to attach).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a peer gets to stop after SIGINT / SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The bpftrace program: counts TCP state changes (the tracepoint the agent's `listen_track`
/// also uses); `SYN_RECV → ESTABLISHED` is a completed handshake. BEGIN runs once every probe
/// is attached, so its line says the program is counting.
const BPFTRACE_SCRIPT: &str = "BEGIN { printf(\"sockscope-bench: attached\\n\"); } \
     tracepoint:sock:inet_sock_set_state /args->protocol == 6/ \
     { @states[args->oldstate, args->newstate] = count(); }";
const BPFTRACE_READY: &str = "sockscope-bench: attached";
/// What bcc's tcpsynbl prints once attached.
const TCPSYNBL_READY: &str = "Tracing SYN backlog size";

/// Makes log file names unique within the process.
static LOG_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Runs the section and prints its tables; returns what was found broken.
pub fn run(args: &Args) -> Result<Vec<String>> {
    let mut installer = Installer::new(args);
    let node_exporter = installer.node_exporter();
    let bpftrace = installer.find("bpftrace", &["bpftrace"]);
    scrapes_side_by_side(args, &node_exporter)?;
    churn_side_by_side(args, &bpftrace)
}

/// /metrics of the agent and of node_exporter, one after the other in one namespace with the
/// same idle listeners.
fn scrapes_side_by_side(args: &Args, node_exporter: &Found) -> Result<()> {
    let n = args.listeners as usize;
    let limit = Duration::from_secs(args.timeout);
    raise_nofile(args.listeners + 1024)?;
    let ns = Netns::new()?;
    let held = open_listeners(&ns, n)?;
    let k = args.listener_scrapes;

    let ours = {
        let agent = AgentProcess::start(&ns, &args.agent, &[], AGENT_LISTEN)?;
        measure_server(&ns, agent.pid(), AGENT_LISTEN, k, limit)?
    };
    let theirs = match node_exporter {
        Found::At(bin) => Some(node_exporter_scrapes(
            &ns,
            bin,
            &["netstat", "sockstat"],
            k,
            limit,
        )),
        Found::Missing(_) => None,
    };

    println!(
        "== peers: /metrics with {n} idle listeners in one namespace, {k} scrapes each, one tool at a time =="
    );
    println!(
        "{:<46}{:<10}{:<10}{:<10}{:<10}{:<9}{:<20}CPU/scrape",
        "", "p50 ms", "p99 ms", "max ms", "page MB", "series", "RSS (peak) MiB"
    );
    print_served("sockscope (every listener, netns, counter)", &ours);
    warn_foreign(&ours.scrapes.last, ns.inode());
    match theirs {
        Some(Ok((version, served))) => {
            print_served(&format!("{version} netstat+sockstat"), &served);
            println!(
                "{:<46}(node_exporter shows namespace-wide counters and socket totals: nothing per listener)",
                ""
            );
        }
        // A peer that fails is reported, not counted as the agent being broken.
        Some(Err(err)) => println!("{:<46}could not be measured: {err:#}", "node_exporter"),
        None => println!(
            "{:<46}not measured: {}",
            "node_exporter",
            node_exporter.reason()
        ),
    }
    drop(held);
    Ok(())
}

pub fn print_served(label: &str, s: &Served) {
    println!(
        "{label:<46}{:<10.1}{:<10.1}{:<10.1}{:<10.2}{:<9}{:<20}{:.1} ms",
        s.scrapes.ms(0.5),
        s.scrapes.ms(0.99),
        s.scrapes.ms(1.0),
        s.scrapes.page as f64 / 1e6,
        s.scrapes.series,
        format!("{:.1} ({:.1})", mib(s.rss_kib), mib(s.peak_kib)),
        s.cpu_per_scrape.as_secs_f64() * 1e3
    );
}

/// Starts node_exporter with only `collectors` in `ns` and measures it.
pub fn node_exporter_scrapes(
    ns: &Netns,
    bin: &Path,
    collectors: &[&str],
    k: u32,
    limit: Duration,
) -> Result<(String, Served)> {
    let version = version_of(bin, "--version")
        .map(|v| v.split(" (").next().unwrap_or(&v).replace(", version", ""))
        .unwrap_or_else(|| "node_exporter".into());
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--web.listen-address={NODE_EXPORTER_LISTEN}"))
        .arg("--collector.disable-defaults")
        .args(collectors.iter().map(|c| format!("--collector.{c}")));
    let mut peer = Peer::spawn(ns, cmd, "node_exporter")?;
    let pid = peer.child.pid();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match testkit::http_get_timeout(
            ns,
            NODE_EXPORTER_LISTEN,
            "/metrics",
            Duration::from_secs(2),
        ) {
            Ok((200, _)) => break,
            _ if Instant::now() < deadline && peer.running()? => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => bail!(
                "node_exporter did not serve /metrics ({:?}); its log:\n{}",
                other.map(|(status, _)| status),
                peer.log_tail()
            ),
        }
    }
    let served = measure_server(ns, pid, NODE_EXPORTER_LISTEN, k, limit)?;
    Ok((version, served))
}

/// The churn without any tool, with the agent, and with each tracer that runs here, rounds
/// interleaved (A B C A B C …).
fn churn_side_by_side(args: &Args, bpftrace: &Found) -> Result<Vec<String>> {
    let n = args.churn_connections;
    let limit = Duration::from_secs(args.timeout);
    let tracers = tracers(bpftrace);
    let runnable: Vec<&Tracer> = tracers.iter().filter(|t| t.runnable.is_ok()).collect();
    let kinds = 2 + runnable.len() as u64;
    let lab = ChurnLab::new(n * (kinds * u64::from(args.rounds) + 1))?;
    lab.round(n.min(5_000), limit).context("warm-up churn")?;

    let mut without = Vec::new();
    let mut agent_rounds = Vec::new();
    let mut traced: Vec<Vec<Round>> = vec![Vec::new(); runnable.len()];
    let mut failures: Vec<Option<String>> = vec![None; runnable.len()];
    let mut notes: Vec<Option<String>> = vec![None; runnable.len()];
    let mut broken = Vec::new();
    let mut foreign = BTreeSet::new();
    for _ in 0..args.rounds {
        foreign.extend(foreign_agents(None));
        without.push(lab.round(n, limit)?);
        {
            let agent = AgentProcess::start(&lab.ns, &args.agent, &[], AGENT_LISTEN)?;
            let checked = lab.checked_round(&agent, n, limit, true)?;
            broken.extend(checked.mismatch("peers churn", agent_rounds.len()));
            agent_rounds.push(checked.round);
            foreign.extend(foreign_agents(Some(agent.pid())));
        }
        for (i, tracer) in runnable.iter().enumerate() {
            if failures[i].is_some() {
                continue;
            }
            match tracer.round(&lab, n, limit) {
                Ok((round, note)) => {
                    traced[i].push(round);
                    notes[i] = note;
                }
                Err(err) => failures[i] = Some(format!("{err:#}")),
            }
        }
    }

    println!(
        "== peers: churn of {n} connections on loopback, {} rounds each, interleaved ==",
        args.rounds
    );
    println!(
        "{:<46}{:<13}{:<19}ratio to without (connections/s)",
        "", "median", "min–max"
    );
    let base = Rates(without.iter().map(Round::rate).collect());
    println!(
        "{:<46}{:<13.0}{}",
        "without any tool",
        base.median(),
        base.spread()
    );
    let row = |label: &str, rounds: &[Round]| {
        let rates = Rates(rounds.iter().map(Round::rate).collect());
        let ratio = rates.median() / base.median();
        println!(
            "{label:<46}{:<13.0}{:<19}{ratio:.3} (target ≥ {TARGET_RATIO}: {})",
            rates.median(),
            rates.spread(),
            verdict(ratio >= TARGET_RATIO)
        );
    };
    row("sockscope", &agent_rounds);
    for (i, tracer) in runnable.iter().enumerate() {
        match &failures[i] {
            Some(err) if traced[i].is_empty() => {
                println!("{:<46}not runnable here: {err}", tracer.label)
            }
            _ => {
                row(&tracer.label, &traced[i]);
                if let Some(note) = &notes[i] {
                    println!("{:<46}{note}", "");
                }
                if let Some(err) = &failures[i] {
                    println!("{:<46}stopped after {} rounds: {err}", "", traced[i].len());
                }
            }
        }
    }
    for tracer in &tracers {
        if let Err(why) = &tracer.runnable {
            println!("{:<46}not runnable here: {why}", tracer.label);
        }
    }
    println!(
        "{:<46}(no probes: it costs nothing until scraped)",
        "node_exporter"
    );
    if !foreign.is_empty() {
        println!(
            "warning: other sockscope agents ran meanwhile (pids {foreign:?}): their probes skew every row"
        );
    }
    Ok(broken)
}

/// A tool that attaches BPF programs and counts until interrupted.
struct Tracer {
    label: String,
    command: Option<(PathBuf, Vec<String>)>,
    ready: &'static str,
    /// Whether it can run here; the reason when not.
    runnable: Result<(), String>,
    /// Turns the tool's final output into a note for the table.
    summary: fn(&str, u64) -> Option<String>,
}

/// bpftrace and bcc's tcpsynbl, with whether each can run on this machine.
fn tracers(bpftrace: &Found) -> Vec<Tracer> {
    let mut out = Vec::new();
    let (label, command, runnable) = match bpftrace {
        Found::At(bin) => {
            let version = version_of(bin, "--version").unwrap_or_else(|| "bpftrace".into());
            (
                format!("{version}, tracepoint script"),
                Some((bin.clone(), vec!["-e".into(), BPFTRACE_SCRIPT.into()])),
                Ok(()),
            )
        }
        Found::Missing(why) => ("bpftrace, tracepoint script".into(), None, Err(why.clone())),
    };
    out.push(Tracer {
        label,
        command,
        ready: BPFTRACE_READY,
        runnable,
        summary: bpftrace_summary,
    });

    // bcc's tcpsynbl attaches kprobes to tcp_v4_syn_recv_sock and tcp_v6_syn_recv_sock.
    let tcpsynbl = which(&["tcpsynbl-bpfcc", "tcpsynbl"])
        .or_else(|| Some(PathBuf::from("/usr/share/bcc/tools/tcpsynbl")).filter(|p| p.is_file()));
    let runnable = match (kprobes(), &tcpsynbl) {
        (Err(why), _) => Err(format!(
            "{why}; tcpsynbl attaches kprobes to tcp_v4_syn_recv_sock and tcp_v6_syn_recv_sock{}",
            if tcpsynbl.is_some() {
                ""
            } else {
                " (bpfcc-tools not installed either)"
            }
        )),
        (Ok(()), None) => Err("not installed (Debian package bpfcc-tools)".into()),
        (Ok(()), Some(_)) => Ok(()),
    };
    out.push(Tracer {
        label: "bcc tcpsynbl (kprobes)".into(),
        command: tcpsynbl.map(|bin| (bin, Vec::new())),
        ready: TCPSYNBL_READY,
        runnable,
        summary: |_, _| None,
    });
    out
}

impl Tracer {
    /// Starts the tracer, waits until it is attached, runs one churn round, stops it.
    fn round(&self, lab: &ChurnLab, n: u64, limit: Duration) -> Result<(Round, Option<String>)> {
        let Some((bin, args)) = &self.command else {
            bail!("no command");
        };
        let mut cmd = Command::new(bin);
        cmd.args(args).env("PYTHONUNBUFFERED", "1");
        let mut peer = Peer::spawn(&lab.ns, cmd, &self.label)?;
        let deadline = Instant::now() + START_TIMEOUT;
        while !peer.log().contains(self.ready) {
            if !peer.running()? {
                bail!("{}", one_line(&peer.log_tail()));
            }
            if Instant::now() >= deadline {
                bail!(
                    "not attached within {START_TIMEOUT:?}: {}",
                    one_line(&peer.log_tail())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let round = lab.round(n, limit)?;
        peer.interrupt()?;
        Ok((round, (self.summary)(&peer.log(), round.connections)))
    }
}

/// bpftrace's count of `SYN_RECV → ESTABLISHED` (3 → 1), beside the round's connections.
fn bpftrace_summary(log: &str, connections: u64) -> Option<String> {
    let handshakes: u64 = log
        .lines()
        .find_map(|l| l.strip_prefix("@states[3, 1]: "))?
        .trim()
        .parse()
        .ok()?;
    Some(format!(
        "last round: bpftrace counted {handshakes} SYN_RECV→ESTABLISHED host-wide for {connections} connections"
    ))
}

/// Whether this kernel can attach kprobes, and why not.
fn kprobes() -> Result<(), String> {
    let pmu = Path::new("/sys/bus/event_source/devices/kprobe").exists();
    let events = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|dir| Path::new(dir).join("kprobe_events").exists());
    if pmu || events {
        return Ok(());
    }
    let config = kernel_config_kprobes()
        .map(|line| format!(", {line}"))
        .unwrap_or_default();
    Err(format!(
        "this kernel has no kprobes (no kprobe PMU in /sys/bus/event_source/devices, no \
         kprobe_events in tracefs{config})"
    ))
}

/// The `CONFIG_KPROBES` line of the running kernel's config, when it can be read.
fn kernel_config_kprobes() -> Option<String> {
    let output = Command::new("zcat").arg("/proc/config.gz").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find(|l| l.starts_with("CONFIG_KPROBES=") || l.starts_with("# CONFIG_KPROBES is not set"))
        .map(|l| l.trim_start_matches("# ").to_owned())
}

/// A peer's binary, or why there is none.
pub enum Found {
    At(PathBuf),
    Missing(String),
}

impl Found {
    pub fn reason(&self) -> &str {
        match self {
            Found::At(_) => "",
            Found::Missing(why) => why,
        }
    }
}

/// Finds peers' binaries, installing their Debian package when missing (if allowed).
pub struct Installer {
    allowed: bool,
    updated: bool,
}

impl Installer {
    /// Installs only when `--no-install` is not given.
    pub fn new(args: &Args) -> Self {
        Self {
            allowed: !args.no_install,
            updated: false,
        }
    }

    /// node_exporter, from Debian's prometheus-node-exporter.
    pub fn node_exporter(&mut self) -> Found {
        self.find(
            "prometheus-node-exporter",
            &["prometheus-node-exporter", "node_exporter"],
        )
    }

    fn find(&mut self, package: &str, binaries: &[&str]) -> Found {
        if let Some(bin) = which(binaries) {
            return Found::At(bin);
        }
        if !self.allowed {
            return Found::Missing(format!(
                "not installed (Debian package {package}; --no-install)"
            ));
        }
        if !nix::unistd::geteuid().is_root() {
            return Found::Missing(format!(
                "not installed (Debian package {package}; not root)"
            ));
        }
        println!("peers: installing {package} with apt-get (not installed)");
        match self.install(package) {
            Ok(()) => match which(binaries) {
                Some(bin) => Found::At(bin),
                None => Found::Missing(format!(
                    "not installed ({package} installed no {binaries:?})"
                )),
            },
            Err(err) => Found::Missing(format!(
                "not installed (apt-get install {package}: {err:#})"
            )),
        }
    }

    fn install(&mut self, package: &str) -> Result<()> {
        if !self.updated {
            apt(&["update", "-q"])?;
            self.updated = true;
        }
        apt(&[
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
            package,
        ])
    }
}

/// Runs apt-get non-interactively; its output only shows when it fails.
fn apt(args: &[&str]) -> Result<()> {
    let output = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .context("run apt-get")?;
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr);
        let last: Vec<&str> = text.lines().rev().take(3).collect();
        bail!(
            "{}: {}",
            output.status,
            last.into_iter().rev().collect::<Vec<_>>().join(" / ")
        );
    }
    Ok(())
}

/// The first of `names` found in PATH, /usr/sbin or /usr/bin.
fn which(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from));
    names
        .iter()
        .find_map(|name| dirs.iter().map(|dir| dir.join(name)).find(|p| p.is_file()))
}

/// The first line `bin ARG` prints (on stdout or stderr).
fn version_of(bin: &Path, arg: &str) -> Option<String> {
    let output = Command::new(bin)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = [output.stdout, output.stderr].concat();
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
}

/// A peer process inside a benchmark namespace, its stdout and stderr in a temp file that is
/// removed when it stops.
struct Peer {
    child: ChildGuard,
    log: PathBuf,
}

impl Peer {
    fn spawn(ns: &Netns, mut cmd: Command, name: &str) -> Result<Peer> {
        let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let slug: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(24)
            .collect();
        let log = std::env::temp_dir().join(format!(
            "sockscope-bench-{}-{n}-{slug}.log",
            std::process::id()
        ));
        let file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        match ns.spawn(cmd) {
            Ok(child) => Ok(Peer { child, log }),
            Err(err) => {
                let _ = std::fs::remove_file(&log);
                Err(err)
            }
        }
    }

    fn running(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }

    fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// SIGINT (a tracer prints its maps and detaches), then up to [`STOP_GRACE`] to exit.
    fn interrupt(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.child.pid()).context("pid out of range")?;
        kill(Pid::from_raw(pid), Signal::SIGINT).with_context(|| format!("SIGINT {pid}"))?;
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.terminate(STOP_GRACE)?;
        Ok(())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Err(err) = self.child.terminate(STOP_GRACE) {
            eprintln!("sockscope-bench: stopping {}: {err:#}", self.child.pid());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Text on one line, for a table cell.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
