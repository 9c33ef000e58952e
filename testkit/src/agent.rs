//! The agent binary running in a test's namespace.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::http::http_get_timeout;
use crate::{ChildGuard, Metrics, Netns, http_get, process::held_bpf_ids};

/// How long [`AgentProcess::start`] waits for `/healthz` to answer 200.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two `/healthz` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long Drop gives the agent after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Lines of log shown in errors and on a failed test.
const TAIL_LINES: usize = 40;

/// Makes log file names unique within the process (the pid makes them unique across processes).
static LOG_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Asks an agent in a namespace at an address for `/healthz` within a timeout: (status, body).
pub type HealthProbe = dyn Fn(&Netns, SocketAddr, Duration) -> Result<(u16, String)>;

/// A running agent in a namespace: stopped on drop, its stdout+stderr in a temp log file.
///
/// The log file is removed on drop, except when the thread is panicking (a failed test): then
/// its tail is printed and the file kept. It is also kept when start-up fails.
#[derive(Debug)]
pub struct AgentProcess {
    child: ChildGuard,
    netns: Netns,
    listen: SocketAddr,
    log_path: PathBuf,
}

impl AgentProcess {
    /// Starts `bin args… --web.listen-address <listen>` in `netns` and waits until `/healthz` is 200.
    ///
    /// Polling before the server is up makes refused connects, hence RSTs, in the namespace:
    /// take counter baselines after this returns. See [`Netns::spawn`] for PDEATHSIG.
    pub fn start(
        netns: &Netns,
        bin: &Path,
        args: &[&str],
        listen: SocketAddr,
    ) -> Result<AgentProcess> {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        Self::start_command(netns, cmd, listen)
    }

    /// Like [`AgentProcess::start`] with a prepared command (env, working directory…).
    pub fn start_command(netns: &Netns, cmd: Command, listen: SocketAddr) -> Result<AgentProcess> {
        Self::start_command_with_probe(netns, cmd, listen, &|ns, addr, timeout| {
            http_get_timeout(ns, addr, "/healthz", timeout)
        })
    }

    /// Like [`AgentProcess::start_command`], asking `probe` for the agent's `/healthz`
    /// (status, body) instead of plain HTTP: for agents serving TLS or asking for a password.
    pub fn start_command_with_probe(
        netns: &Netns,
        mut cmd: Command,
        listen: SocketAddr,
        probe: &HealthProbe,
    ) -> Result<AgentProcess> {
        let (log_path, log) = create_log_file()?;
        let program = cmd.get_program().to_string_lossy().into_owned();
        cmd.arg("--web.listen-address")
            .arg(listen.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup the log fd")?)
            .stderr(log);
        let child = match netns.spawn(cmd) {
            Ok(child) => child,
            Err(err) => {
                let _ = std::fs::remove_file(&log_path);
                return Err(err);
            }
        };
        let mut agent = AgentProcess {
            child,
            netns: netns.try_clone()?,
            listen,
            log_path,
        };
        match agent.wait_healthy(probe) {
            Ok(()) => Ok(agent),
            Err(err) => {
                let stopped = agent.child.terminate(STOP_GRACE);
                let tail = agent.log_tail(TAIL_LINES);
                let path = agent.log_path.clone();
                // Keep the log file for whoever reads the error.
                agent.log_path = PathBuf::new();
                let stopped = match stopped {
                    Ok(status) => format!("stopped: {status}"),
                    Err(e) => format!("{e:#}"),
                };
                Err(err.context(format!(
                    "agent {program} on {listen} in netns {} did not become healthy ({stopped}); \
                     log {}:\n{tail}",
                    netns.inode(),
                    path.display()
                )))
            }
        }
    }

    fn wait_healthy(&mut self, probe: &HealthProbe) -> Result<()> {
        // Under emulation (the kernel-matrix guests) the verifier alone takes many seconds.
        let timeout = if crate::in_guest() {
            START_TIMEOUT * 3
        } else {
            START_TIMEOUT
        };
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the agent exited during start-up: {status}");
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                bail!("/healthz not 200 within {timeout:?}; last: {last}");
            }
            let timeout = remaining.min(Duration::from_secs(2));
            match probe(&self.netns, self.listen, timeout) {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("status {code}: {}", body.trim()),
                Err(err) => last = format!("{:#}", err),
            }
            std::thread::sleep(
                POLL_INTERVAL.min(deadline.saturating_duration_since(Instant::now())),
            );
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The address given as `--web.listen-address`.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The namespace the agent runs in.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The agent's resident memory now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
    }

    /// Path of the agent's log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the agent has written so far (lossy UTF-8; empty if unreadable).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// GETs `path` from the agent, inside its namespace: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(&self.netns, self.listen, path)
    }

    /// GETs and parses `/metrics`; errors on a status other than 200.
    pub fn scrape(&self) -> Result<Metrics> {
        let (status, body) = self.get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}: {}", body.trim());
        }
        Metrics::parse(&body).context("parse /metrics")
    }

    /// Sends `signal` (SIGHUP, say) to the agent.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, signal).with_context(|| format!("kill -{signal} {pid}"))
    }

    /// Ends the agent with SIGKILL, as the OOM killer would, and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.child.kill()
    }

    /// The BPF programs and links the agent holds (`("prog_id" | "link_id", id)`).
    pub fn held_bpf_ids(&self) -> Result<HashSet<(String, u32)>> {
        held_bpf_ids(self.pid())
    }

    /// Stops the agent with SIGTERM (SIGKILL after `timeout`) and returns its exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.child.terminate(timeout)
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Err(err) = self.child.terminate(STOP_GRACE) {
            eprintln!("testkit: stopping agent {}: {err:#}", self.pid());
        }
        if self.log_path.as_os_str().is_empty() {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "--- agent log {} (last {TAIL_LINES} lines) ---\n{}\n--- end of agent log ---",
                self.log_path.display(),
                self.log_tail(TAIL_LINES)
            );
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

/// Creates a new, uniquely named log file in the temp directory.
fn create_log_file() -> Result<(PathBuf, File)> {
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    for _ in 0..1000 {
        let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("sockscope-agent-{pid}-{n}.log"));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            // Left over from an earlier process with the same pid.
            Err(err) if err.kind() == ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err).with_context(|| format!("create {}", path.display())),
        }
    }
    Err(anyhow!("no free log file name in {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::os::unix::process::ExitStatusExt;

    use super::*;
    use crate::require_root;

    /// Marker argument that turns this test binary into a fake agent.
    const FAKE: &str = "testkit-fake-agent";
    /// Marker argument that makes the fake agent fail at start-up.
    const FAKE_FAIL: &str = "testkit-fake-agent-fail";

    /// Runs the test binary itself as the "agent": only the `fake_agent` test runs, and the
    /// agent's arguments come after `--`, where libtest takes them as (non-matching) filters.
    fn fake_agent_command(fail: bool) -> Result<Command> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args([
            "agent::tests::fake_agent",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "--",
            if fail { FAKE_FAIL } else { FAKE },
        ]);
        Ok(cmd)
    }

    /// The fake agent's body; a no-op unless run by `fake_agent_command`.
    #[test]
    fn fake_agent() {
        let args: Vec<String> = std::env::args().collect();
        let Some(i) = args.iter().position(|a| a == "--web.listen-address") else {
            return;
        };
        if args.iter().any(|a| a == FAKE_FAIL) {
            eprintln!("fatal: simulated start-up failure");
            std::process::exit(3);
        }
        let addr = &args[i + 1];
        let listener = TcpListener::bind(addr.as_str()).expect("bind");
        println!("fake agent listening on {addr}");
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("");
            let response = match path {
                "/healthz" => {
                    "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                        .to_owned()
                }
                "/metrics" => {
                    let body = "# TYPE fake_total counter\nfake_total{reason=\"a\"} 4\nfake_total{reason=\"b\"} 5\n";
                    let (first, second) = body.split_at(20);
                    format!(
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                         {:x}\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\n\r\n",
                        first.len(),
                        second.len()
                    )
                }
                _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned(),
            };
            let _ = stream.write_all(response.as_bytes());
        }
    }

    #[test]
    fn agent_starts_scrapes_and_stops() -> Result<()> {
        if !require_root() {
            return Ok(());
        }
        let ns = Netns::new()?;
        let listen: SocketAddr = "127.0.0.1:9435".parse()?;
        let mut agent = AgentProcess::start_command(&ns, fake_agent_command(false)?, listen)?;
        let pid = agent.pid();
        let child_ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))?;
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&child_ns), ns.inode());

        let before = ns.counters()?;
        let metrics = agent.scrape()?;
        assert_eq!(metrics.sum("fake_total", &[]), 9.0);
        assert_eq!(metrics.get("fake_total", &[("reason", "b")]), Some(5.0));
        assert_eq!(agent.get("/nope")?.0, 404);
        // Clean HTTP closes: no resets in the namespace.
        let delta = ns.counters()?.delta(&before);
        assert_eq!(delta.get("TcpOutRsts")?, 0, "{delta:?}");
        assert_eq!(delta.get("TcpEstabResets")?, 0, "{delta:?}");
        assert!(
            agent
                .log()
                .contains("fake agent listening on 127.0.0.1:9435")
        );

        let log_path = agent.log_path().to_owned();
        let status = agent.terminate(Duration::from_secs(5))?;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        drop(agent);
        assert!(!log_path.exists(), "log removed after a passing test");
        Ok(())
    }

    #[test]
    fn agent_start_failure_reports_the_log() -> Result<()> {
        if !require_root() {
            return Ok(());
        }
        let ns = Netns::new()?;
        let listen: SocketAddr = "127.0.0.1:9435".parse()?;
        let err = AgentProcess::start_command(&ns, fake_agent_command(true)?, listen)
            .expect_err("the fake agent exits at once");
        let msg = format!("{err:#}");
        assert!(msg.contains("simulated start-up failure"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        // The log is kept for the reader of the error: remove it here.
        let path = msg
            .split_whitespace()
            .find(|w| w.contains("sockscope-agent-"))
            .map(|w| w.trim_end_matches(':'))
            .ok_or_else(|| anyhow!("no log path in {msg}"))?;
        std::fs::remove_file(path)?;

        let missing = AgentProcess::start(&ns, Path::new("/nonexistent/sockscope"), &[], listen);
        assert!(missing.is_err());
        Ok(())
    }
}
