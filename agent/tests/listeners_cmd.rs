//! `sockscope listeners`, standalone and against an agent, in throwaway namespaces.
//!
//! Each test runs the command inside its own namespace and looks only at that namespace's
//! rows of the JSON document (the command reads every namespace of the host, and other tests
//! run alongside). The scenario starts once the command says on stderr that its first reading
//! is in, and ends (its clients closed, so no SYN is retransmitted) before the interval does:
//! the kernel's counter delta around the scenario is then exactly what the command's
//! interval saw.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    path::Path,
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;
use testkit::{
    AgentProcess, ChildGuard, Counters, Netns, SynQueueParams, VethLab, accept_overflow,
    command_without_caps, require_root, syn_queue_fill,
};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");

/// How long the command may take to load its probes and take its first reading.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `sockscope listeners …` running in a namespace, its output collected meanwhile (the
/// JSON of a busy host does not fit in a pipe buffer).
struct Run {
    child: ChildGuard,
    stdout: Option<JoinHandle<std::io::Result<String>>>,
    stderr_lines: mpsc::Receiver<String>,
    stderr: String,
}

impl Run {
    fn start(ns: &Netns, args: &[&str], drop_caps: &[u32]) -> Result<Self> {
        let cmd = command_without_caps(Path::new(AGENT), args, drop_caps);
        let mut child = ns.spawn(cmd)?;
        let mut stdout = child.child_mut().stdout.take().context("stdout")?;
        let stderr = child.child_mut().stderr.take().context("stderr")?;
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            stdout.read_to_string(&mut text).map(|_| text)
        });
        let (tx, stderr_lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdout: Some(stdout),
            stderr_lines,
            stderr: String::new(),
        })
    }

    /// Waits for the line that says the first reading is in.
    fn wait_measuring(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    self.stderr.push_str(&line);
                    self.stderr.push('\n');
                    if line.contains("measuring") {
                        return Ok(());
                    }
                }
                Err(_) => bail!(
                    "no `measuring` line within {START_TIMEOUT:?} ({:?}); stderr:\n{}",
                    self.child.try_wait()?,
                    self.stderr
                ),
            }
        }
    }

    /// Waits for the command to exit: its status, stdout and stderr.
    fn finish(mut self, timeout: Duration) -> Result<(ExitStatus, String, String)> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                bail!("still running after {timeout:?}; stderr:\n{}", self.stderr);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = self
            .stdout
            .take()
            .context("stdout taken")?
            .join()
            .map_err(|_| anyhow!("the stdout reader panicked"))??;
        // The process is gone: its stderr pipe is at its end.
        while let Ok(line) = self.stderr_lines.recv_timeout(Duration::from_secs(1)) {
            self.stderr.push_str(&line);
            self.stderr.push('\n');
        }
        Ok((status, stdout, self.stderr))
    }
}

/// The one JSON document of a run.
fn document(stdout: &str) -> Result<Value> {
    let line = stdout
        .lines()
        .next()
        .with_context(|| format!("no output: {stdout:?}"))?;
    serde_json::from_str(line).context("the output is not JSON")
}

/// The row of `netns` and `listen` (`addr:port`).
fn row(doc: &Value, netns: u64, listen: SocketAddr) -> Result<&Value> {
    let rows = doc["listeners"].as_array().context("no listeners array")?;
    rows.iter()
        .find(|r| r["netns"].as_u64() == Some(netns) && r["listen"] == listen.to_string())
        .with_context(|| {
            let ours: Vec<&Value> = rows
                .iter()
                .filter(|r| r["netns"].as_u64() == Some(netns))
                .collect();
            format!("no row for {listen} in netns {netns}; its rows: {ours:?}")
        })
}

fn diagnosis(row: &Value) -> Vec<String> {
    row["diagnosis"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn standalone_counts_the_overflows_of_its_namespace() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let mut run = Run::start(&ns, &["listeners", "--json", "--interval", "3"], &[])?;
    run.wait_measuring()?;
    let before = ns.counters()?;
    let mut scenario = accept_overflow(&ns, "127.0.0.1".parse()?, 4, 60)?;
    // Closed clients retransmit no SYN: nothing overflows after this, and the listener
    // (never accepting) stays open until the command's last reading.
    scenario.clients.clear();
    let kernel = ns.counters()?.delta(&before);
    let (status, stdout, stderr) = run.finish(Duration::from_secs(60))?;
    assert!(status.success(), "{status}: {stderr}");
    let doc = document(&stdout)?;
    let row = row(&doc, ns.inode(), scenario.addr)?;

    let overflows = kernel.get("TcpExtListenOverflows")?;
    assert!(overflows > 0, "the scenario must overflow: {kernel:?}");
    assert_eq!(row["overflows"]["total"].as_u64(), Some(overflows), "{row}");
    assert_eq!(row["overflows"]["syn"].as_u64(), Some(overflows), "{row}");
    assert_eq!(
        row["drops"].as_u64(),
        Some(kernel.get("TcpExtListenDrops")?),
        "{row}"
    );
    assert_eq!(row["accept_queue"]["limit"].as_u64(), Some(4), "{row}");
    assert_eq!(row["accept_queue"]["length"].as_u64(), Some(5), "{row}");
    assert!(
        row["accept_queue"]["full_samples"].as_u64() > Some(0),
        "{row}"
    );
    // The listener is the test process's own socket.
    assert_eq!(
        row["process"]["pid"].as_u64(),
        Some(u64::from(std::process::id())),
        "{row}"
    );
    let d = diagnosis(row);
    assert!(
        d[0].contains("the application accepts too slowly")
            && d[0].contains(&format!("{overflows} overflows"))
            && d[0].contains("its listen(backlog) gives 4 while net.core.somaxconn is"),
        "{d:?}"
    );
    assert_eq!(d.len(), 1, "every drop is an overflow: {d:?}");
    assert_eq!(row["troubled"], true);
    let ns_info = doc["namespaces"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["netns"].as_u64() == Some(ns.inode())))
        .context("the namespace is listed")?;
    assert_eq!(
        ns_info["counters"]["listen_overflows"].as_u64(),
        Some(overflows)
    );
    drop(scenario);
    Ok(())
}

#[test]
fn through_an_agent_shows_the_same_overflows() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let listen = SocketAddr::from(([127, 0, 0, 1], 9844));
    let _agent = AgentProcess::start(&ns, Path::new(AGENT), &[], listen)?;
    let url = format!("http://{listen}");
    let mut run = Run::start(
        &ns,
        &["listeners", "--json", "--interval", "3", "--agent", &url],
        &[],
    )?;
    run.wait_measuring()?;
    let before = ns.counters()?;
    let mut scenario = accept_overflow(&ns, "127.0.0.1".parse()?, 4, 60)?;
    scenario.clients.clear();
    let kernel = ns.counters()?.delta(&before);
    let (status, stdout, stderr) = run.finish(Duration::from_secs(60))?;
    assert!(status.success(), "{status}: {stderr}");
    let doc = document(&stdout)?;
    assert_eq!(doc["source"], format!("{url}/metrics"));
    let row = row(&doc, ns.inode(), scenario.addr)?;
    let overflows = kernel.get("TcpExtListenOverflows")?;
    assert!(overflows > 0, "the scenario must overflow: {kernel:?}");
    assert_eq!(row["overflows"]["total"].as_u64(), Some(overflows), "{row}");
    assert_eq!(
        row["drops"].as_u64(),
        Some(kernel.get("TcpExtListenDrops")?),
        "{row}"
    );
    assert!(row["process"].is_null(), "the page does not say: {row}");
    assert!(
        diagnosis(row)[0].contains("the application accepts too slowly"),
        "{row}"
    );
    drop(scenario);
    Ok(())
}

/// Runs the command to its end in `ns`: (exit code, stderr).
fn run_to_exit(ns: &Netns, args: &[&str]) -> Result<(i32, String)> {
    let run = Run::start(ns, args, &[])?;
    let (status, _, stderr) = run.finish(Duration::from_secs(60))?;
    Ok((status.code().context("killed by a signal")?, stderr))
}

#[test]
fn an_unreachable_agent_is_one_line_and_exit_1() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let (code, stderr) = run_to_exit(
        &ns,
        &[
            "listeners",
            "--agent",
            "http://127.0.0.1:1",
            "--interval",
            "1",
        ],
    )?;
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("http://127.0.0.1:1"), "{stderr}");
    assert!(stderr.contains("cannot reach the agent"), "{stderr}");
    Ok(())
}

#[test]
fn bad_options_are_usage_errors() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    for (args, needle) in [
        (&["listeners", "--interval", "0"][..], "0"),
        (&["listeners", "--interval", "soon"], "soon"),
        (&["listeners", "--agent", "https://x:1"], "https"),
        (&["listeners", "--no-such-option"], "--no-such-option"),
    ] {
        let (code, stderr) = run_to_exit(&ns, args)?;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(stderr.contains("Usage:"), "{args:?}: {stderr}");
    }
    Ok(())
}

/// Fills a SYN queue from spoofed sources with `syncookies` during the command's interval;
/// returns the listener's row and the server's counter delta.
fn syn_queue_row(syncookies: u8) -> Result<(Value, Counters)> {
    let lab = VethLab::new()?;
    let mut run = Run::start(
        &lab.server,
        &["listeners", "--json", "--interval", "3"],
        &[],
    )?;
    run.wait_measuring()?;
    let fill = syn_queue_fill(
        &lab,
        &SynQueueParams {
            syncookies,
            // High enough that only the SYN queue's own limit drops.
            max_syn_backlog: Some(4096),
            ..SynQueueParams::default()
        },
    )?;
    let (status, stdout, stderr) = run.finish(Duration::from_secs(60))?;
    assert!(status.success(), "{status}: {stderr}");
    let doc = document(&stdout)?;
    let row = row(&doc, lab.server.inode(), fill.addr)?.clone();
    Ok((row, fill.server))
}

#[test]
fn syncookies_2_is_not_called_a_full_syn_queue() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (row, kernel) = syn_queue_row(2)?;
    let cookies = kernel.get("TcpExtTCPReqQFullDoCookies")?;
    assert!(cookies > 0, "every SYN is a cookie: {kernel:?}");
    assert_eq!(
        row["syn_queue_full"]["cookie"].as_u64(),
        Some(cookies),
        "{row}"
    );
    assert_eq!(diagnosis(&row), vec!["ok"], "{row}");
    assert_eq!(row["troubled"], false);
    Ok(())
}

#[test]
fn syncookies_1_with_a_full_syn_queue_says_so() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (row, kernel) = syn_queue_row(1)?;
    let cookies = kernel.get("TcpExtTCPReqQFullDoCookies")?;
    assert!(cookies > 0, "the queue must fill: {kernel:?}");
    assert_eq!(
        diagnosis(&row),
        vec![format!(
            "SYN queue full: answering with SYN cookies ({cookies}); check for a SYN flood or raise the backlog"
        )],
        "{row}"
    );
    Ok(())
}

#[test]
fn syncookies_0_with_a_full_syn_queue_drops() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (row, kernel) = syn_queue_row(0)?;
    let dropped = kernel.get("TcpExtTCPReqQFullDrop")?;
    assert!(dropped > 0, "the queue must fill: {kernel:?}");
    assert_eq!(row["drops"].as_u64(), Some(dropped), "{row}");
    assert_eq!(
        diagnosis(&row),
        vec![format!(
            "SYN queue full and syncookies off: {dropped} SYNs dropped (net.ipv4.tcp_syncookies=0)"
        )],
        "{row}"
    );
    assert!(row["syn_queue"]["max"].as_u64() > Some(0), "{row}");
    Ok(())
}

#[test]
fn without_the_kernel_programs_the_gauges_and_drops_remain() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let listener = ns.run(|| std::net::TcpListener::bind("127.0.0.1:0"))??;
    let addr = listener.local_addr()?;
    // CAP_SYS_ADMIN (21), CAP_PERFMON (38), CAP_BPF (39): no programs, no other namespace.
    let run = Run::start(
        &ns,
        &["listeners", "--json", "--interval", "1"],
        &[21, 38, 39],
    )?;
    let (status, stdout, stderr) = run.finish(Duration::from_secs(60))?;
    assert!(status.success(), "{status}: {stderr}");
    let doc = document(&stdout)?;
    let row = row(&doc, ns.inode(), addr)?;
    assert_eq!(row["drops"].as_u64(), Some(0), "{row}");
    assert!(row["overflows"]["total"].is_null(), "{row}");
    assert!(row["syn_queue_full"].is_null(), "{row}");
    assert_eq!(diagnosis(row), vec!["ok"]);
    let unavailable = doc["unavailable"].to_string();
    assert!(
        unavailable.contains("OVERFLOWS") && unavailable.contains("CAP_BPF"),
        "{unavailable}"
    );
    drop(listener);
    Ok(())
}

#[test]
fn watch_prints_one_document_per_interval() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let mut cmd = Command::new(AGENT);
    cmd.args(["listeners", "--json", "--watch", "--interval", "500ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = ns.spawn(cmd)?;
    let stdout = child.child_mut().stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    for n in 0..2 {
        let line = lines
            .next()
            .with_context(|| format!("document {n} missing"))??;
        let doc: Value = serde_json::from_str(&line)?;
        assert!(doc["interval_seconds"].as_f64() >= Some(0.5), "{doc}");
    }
    let status = child.terminate(Duration::from_secs(5))?;
    assert!(!status.success(), "stopped by SIGTERM: {status}");
    Ok(())
}
