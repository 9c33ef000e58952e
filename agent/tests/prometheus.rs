//! The shipped dashboards, rules and deployment files, proven against the real tools
//! (host-only: Prometheus, promtool, systemd-analyze and the Python checkers are outside
//! oracles; `cargo xtask test` installs them).
//!
//! The live test starts Debian's `prometheus` server inside a test network namespace, scraping
//! real agents every second with `deploy/prometheus/sockscope.rules.yml` loaded, runs
//! scenarios there (accept-queue overflow, SYN-queue drops with cookies off, a reset storm,
//! label overflow), then asks Prometheus's HTTP API: every query of every dashboard panel
//! parses, each panel's main query returns data (but the panels listed in [`PENDING`]), the
//! rules evaluate without error, and the overflow, SYN-queue, reset and probe alerts fire.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use testkit::{
    AgentProcess, ChildGuard, Netns, SynQueueParams, TempDir, VethLab, accept_overflow,
    command_without_caps, connect_closed_port, listen_on, partial_tracefs, require_root,
    syn_queue_fill,
};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const RULES: &str = "deploy/prometheus/sockscope.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/sockscope.rules.test.yml";
const RUNBOOK: &str = "docs/RUNBOOK.md";
/// Where `cargo xtask setup` installs the Python checkers (grafana-foundation-sdk,
/// kubernetes-validate).
const PYTHON: &str = "target/tools/python/bin/python3";

/// Dashboard panels (dashboard title, panel title) whose main query cannot return data here
/// yet, and why. When the feature lands, delete its line: the test then demands data, and
/// fails while a listed panel returns data, so this list cannot go stale.
const PENDING: &[(&str, &str, &str)] = &[(
    "sockscope / Agent",
    "Kernel CPU spent in sockscope's programs",
    "needs kernel.bpf_stats_enabled=1, a host-wide setting the test leaves alone",
)];

/// Alerts the live scenarios must make fire: (alert, label that must match, its value).
/// `NETNS` stands for the lab's server namespace.
const MUST_FIRE: &[(&str, &str, &str)] = &[
    ("SockscopeAcceptQueueOverflowing", "netns", "NETNS"),
    ("SockscopeAcceptQueueSaturated", "netns", "NETNS"),
    ("SockscopeSynQueueFullCookiesOff", "netns", "NETNS"),
    ("SockscopeResetStorm", "netns", "NETNS"),
    ("SockscopeLabelOverflow", "instance", MAIN_AGENT),
    ("SockscopeProbeDown", "instance", PROBE_DOWN_AGENT),
];

/// Alerts that must stay silent for the lab's namespace and the main agent.
const MUST_NOT_FIRE: &[&str] = &[
    "SockscopeAgentDown",
    "SockscopeTimeWaitBucketsOverflow",
    "SockscopeTimeWaitPortExhaustion",
];

/// Recording rules over metrics not in the agent yet (see [`PENDING`]).
const PENDING_RECORDS: &[&str] = &[];

const MAIN_AGENT: &str = "127.0.0.1:9844";
/// A second agent with a tracefs lacking `tcp:tcp_receive_reset`: probe `rst_recv` down.
const PROBE_DOWN_AGENT: &str = "127.0.0.1:9845";
const PROMETHEUS: &str = "127.0.0.1:9090";
/// Ports in `--watch.ports` of the main agent, beyond its series budget of 2: resets to them
/// make label overflow. Each reset round reaches one more of them, so the overflow counter
/// rises in every round.
const WATCHED: [u16; RESET_ROUNDS + 2] = [7001, 7002, 7003, 7004, 7005, 7006, 7007];
/// Resets sent in [`RESET_ROUNDS`] rounds: the 20,000 after the first round, in the 5-minute
/// window, are 67/s, above the storm threshold of 50/s.
const RESETS: usize = 25_000;
const RESET_ROUNDS: usize = 5;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const ALERT_TIMEOUT: Duration = Duration::from_secs(90);
const DATA_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(500);

fn root() -> &'static Path {
    Path::new(ROOT)
}

/// `program` when it runs; panics under CI=true when it is missing, else None (skip).
fn tool(program: &str, version_arg: &str, install: &str) -> Option<PathBuf> {
    let path = if program.contains('/') {
        root().join(program)
    } else {
        PathBuf::from(program)
    };
    let found = Command::new(&path)
        .arg(version_arg)
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{program} is missing and CI=true forbids skipping; {install}");
    }
    eprintln!("skipping: {program} not installed ({install})");
    None
}

fn python() -> Option<PathBuf> {
    tool(
        PYTHON,
        "--version",
        "`cargo xtask setup` installs it (grafana-foundation-sdk, kubernetes-validate)",
    )
}

/// Runs `cmd`; errors with its whole output unless it succeeds.
fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    Ok(text)
}

#[test]
fn rules_pass_promtool_check_and_unit_tests() -> Result<()> {
    let Some(promtool) = tool("promtool", "--version", "apt-get install prometheus") else {
        return Ok(());
    };
    let out = run_ok(
        Command::new(&promtool)
            .args(["check", "rules", RULES])
            .current_dir(root()),
    )?;
    ensure!(out.contains("SUCCESS"), "{out}");
    // promtool resolves the test file's rule_files relative to the test file.
    let out = run_ok(
        Command::new(&promtool)
            .args(["test", "rules", RULE_TESTS])
            .current_dir(root()),
    )?;
    ensure!(out.contains("SUCCESS"), "{out}");
    // Every alert has unit tests that see it fire and see it silent.
    let rules = fs::read_to_string(root().join(RULES))?;
    let tests = fs::read_to_string(root().join(RULE_TESTS))?;
    for alert in yaml_values(&rules, "- alert:") {
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|case| case.contains(&format!("alertname: {alert}\n")))
            .collect();
        ensure!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{alert}: no unit test where it stays silent"
        );
        ensure!(
            cases.iter().any(|c| c.contains("- exp_labels:")),
            "{alert}: no unit test where it fires"
        );
    }
    Ok(())
}

/// The values after `key` on the lines of a YAML text that have it (`- alert: Name`).
fn yaml_values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key))
        .map(|v| v.trim().trim_matches('"'))
        .collect()
}

#[test]
fn every_alert_links_its_runbook_section() -> Result<()> {
    let rules = fs::read_to_string(root().join(RULES))?;
    let runbook = fs::read_to_string(root().join(RUNBOOK))?;
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let alerts = yaml_values(&rules, "- alert:");
    let urls = yaml_values(&rules, "runbook_url:");
    ensure!(
        !alerts.is_empty() && alerts.len() == urls.len(),
        "{} alerts, {} runbook_url",
        alerts.len(),
        urls.len()
    );
    for (alert, url) in alerts.iter().zip(&urls) {
        let anchor = alert.to_lowercase();
        ensure!(
            url.ends_with(&format!("/{RUNBOOK}#{anchor}")),
            "{alert}: runbook_url {url} does not point at {RUNBOOK}#{anchor}"
        );
        ensure!(
            anchors.contains(&anchor),
            "{RUNBOOK} has no section `## {alert}`"
        );
    }
    Ok(())
}

fn dashboard_files() -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(root().join("dashboards"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    ensure!(files.len() == 4, "expected 4 dashboards: {files:?}");
    Ok(files)
}

fn load_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&fs::read_to_string(path)?)
        .with_context(|| format!("parse {}", path.display()))
}

#[test]
fn dashboards_match_the_grafana_model() -> Result<()> {
    let files = dashboard_files()?;
    for file in &files {
        let d = load_json(file)?;
        let name = file.display();
        // Grafana 12's dashboard schema version.
        ensure!(
            d["schemaVersion"].as_u64() == Some(41),
            "{name}: schemaVersion"
        );
        let vars: Vec<&str> = d["templating"]["list"]
            .as_array()
            .context("templating.list")?
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        ensure!(
            vars[..2] == ["datasource", "instance"],
            "{name}: variables {vars:?}"
        );
        // The agent's own metrics have no port label.
        let wants_port = !file.ends_with("sockscope-agent.json");
        ensure!(
            vars.contains(&"port") == wants_port,
            "{name}: port variable {}expected",
            if wants_port { "" } else { "not " }
        );
        for panel in panels(&d) {
            let title = panel["title"].as_str().unwrap_or_default();
            ensure!(
                panel["description"].as_str().is_some_and(|s| s.len() > 80),
                "{name}: panel {title:?} lacks a description"
            );
            ensure!(
                panel["datasource"]["uid"] == "${datasource}",
                "{name}: panel {title:?} does not use the datasource variable"
            );
            for t in panel["targets"].as_array().context("targets")? {
                ensure!(
                    t["datasource"]["uid"] == "${datasource}",
                    "{name}: {title:?}"
                );
            }
        }
    }
    let Some(python) = python() else {
        return Ok(());
    };
    let checker = root().join("agent/tests/support/grafana_model.py");
    run_ok(Command::new(python).arg(checker).args(&files))?;
    Ok(())
}

/// The panels of a dashboard, rows left out.
fn panels(d: &Value) -> Vec<&Value> {
    d["panels"]
        .as_array()
        .map(|a| a.iter().filter(|p| p["type"] != "row").collect())
        .unwrap_or_default()
}

#[test]
fn kubernetes_manifests_match_the_schemas() -> Result<()> {
    let Some(python) = python() else {
        return Ok(());
    };
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    // The ServiceMonitor is a prometheus-operator CRD: no schema ships with Kubernetes.
    files.retain(|p| {
        p.extension().is_some_and(|e| e == "yaml")
            && !p.to_string_lossy().ends_with("servicemonitor.yaml")
    });
    files.sort();
    ensure!(files.len() >= 2, "{files:?}");
    let out = run_ok(
        Command::new(python)
            .args(["-m", "kubernetes_validate", "--strict", "-k", "1.30.0"])
            .args(&files),
    )?;
    // One "INFO ... passed" line per document; anything else is a finding.
    let findings: Vec<&str> = out
        .lines()
        .filter(|l| !l.contains("passed"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    ensure!(findings.is_empty(), "kubernetes-validate:\n{out}");
    ensure!(out.contains("daemonset/sockscope"), "{out}");
    Ok(())
}

#[test]
fn systemd_unit_verifies() -> Result<()> {
    let Some(analyze) = tool("systemd-analyze", "--version", "apt-get install systemd") else {
        return Ok(());
    };
    // The unit starts /usr/local/bin/sockscope; verify wants it to exist, so point a copy of
    // the unit at the binary just built.
    let unit = fs::read_to_string(root().join("deploy/systemd/sockscope.service"))?;
    ensure!(
        unit.contains("ExecStart=/usr/local/bin/sockscope "),
        "{unit}"
    );
    let dir = TempDir::new("unit")?;
    let copy = dir.path().join("sockscope.service");
    fs::write(
        &copy,
        unit.replace(
            "ExecStart=/usr/local/bin/sockscope ",
            &format!("ExecStart={AGENT} "),
        ),
    )?;
    let out = run_ok(
        Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(&copy),
    )?;
    let findings: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("sockscope.service"))
        .collect();
    ensure!(findings.is_empty(), "systemd-analyze verify:\n{out}");
    Ok(())
}

/// The capabilities the deployment files grant: (systemd unit, DaemonSet), as `CAP_*` names.
fn deployed_capabilities() -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let unit = fs::read_to_string(root().join("deploy/systemd/sockscope.service"))?;
    let unit: BTreeSet<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("no CapabilityBoundingSet= in the unit")?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let ds = fs::read_to_string(root().join("deploy/kubernetes/daemonset.yaml"))?;
    let ds: BTreeSet<String> = ds
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: ["))
        .context("no capabilities add: [...] in the DaemonSet")?
        .trim_end_matches(']')
        .split(',')
        .map(|c| format!("CAP_{}", c.trim().trim_matches('"')))
        .collect();
    Ok((unit, ds))
}

#[test]
fn deployed_capabilities_are_enough() -> Result<()> {
    let (unit, ds) = deployed_capabilities()?;
    ensure!(
        unit == ds,
        "the unit grants {unit:?} but the DaemonSet {ds:?}: keep them the same"
    );
    if !require_root() {
        return Ok(());
    }
    let keep: Vec<u32> = unit
        .iter()
        .map(|name| {
            name.parse::<caps::Capability>()
                .map(|c| u32::from(c.index()))
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))
        })
        .collect::<Result<_>>()?;
    let last: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()?;
    let drop: Vec<u32> = (0..=last).filter(|c| !keep.contains(c)).collect();
    // The agent in one namespace, a listener in another: with only the deployed
    // capabilities every probe attaches and the other namespace is read.
    let ns = Netns::new()?;
    let other = Netns::new()?;
    let (_listener, addr) = other.run(|| listen_on(SocketAddr::from(([127, 0, 0, 1], 0)), 8))??;
    // The agent finds a namespace through a process living in it.
    let mut sleeper = Command::new("sleep");
    sleeper.arg("60");
    let _resident = other.spawn(sleeper)?;
    let cmd = command_without_caps(Path::new(AGENT), &[], &drop);
    let agent = AgentProcess::start_command(&ns, cmd, MAIN_AGENT.parse()?)?;
    let m = agent.scrape()?;
    let probes = m.series("sockscope_probe_up");
    ensure!(!probes.is_empty(), "no sockscope_probe_up");
    for p in probes {
        ensure!(
            p.value == 1.0,
            "probe {:?} down with capabilities {unit:?}:\n{}",
            p.label("probe"),
            agent.log()
        );
    }
    let other_inode = other.inode().to_string();
    let port = addr.port().to_string();
    ensure!(
        m.sum(
            "sockscope_listen_sockets",
            &[("netns", other_inode.as_str()), ("port", port.as_str())]
        ) == 1.0,
        "the listener in another namespace is not seen with {unit:?}"
    );
    Ok(())
}

/// Prometheus running in a namespace; stopped on drop. Its log is kept in its temp dir and
/// printed on a failed test.
struct PrometheusServer {
    netns: Netns,
    addr: SocketAddr,
    _child: ChildGuard,
    dir: TempDir,
}

impl PrometheusServer {
    /// Starts `prometheus` in `ns` on [`PROMETHEUS`], scraping `targets` every second with
    /// the rules of [`RULES`], their `for:` shortened to 1 s, evaluated every second.
    fn start(ns: &Netns, targets: &[&str]) -> Result<PrometheusServer> {
        let dir = TempDir::new("prometheus")?;
        let rules = fs::read_to_string(root().join(RULES))?;
        let mut shortened = 0;
        let rules: String = rules
            .lines()
            .map(|line| {
                let indent = line.len() - line.trim_start().len();
                if line.trim_start().starts_with("for: ") {
                    shortened += 1;
                    format!("{}for: 1s\n", " ".repeat(indent))
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        ensure!(shortened > 0, "no `for:` found in {RULES}");
        fs::write(dir.path().join("rules.yml"), rules)?;
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files: ['{}']\n\
                 scrape_configs:\n  - job_name: sockscope\n    static_configs:\n      - targets: [{}]\n",
                dir.path().join("rules.yml").display(),
                targets.join(", ")
            ),
        )?;
        let log = fs::File::create(dir.path().join("prometheus.log"))?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        let child = ns.spawn(cmd)?;
        let server = PrometheusServer {
            netns: ns.try_clone()?,
            addr: PROMETHEUS.parse()?,
            _child: child,
            dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match testkit::http_get_timeout(&server.netns, server.addr, "/-/ready", POLL * 4) {
                Ok((200, _)) => break,
                _ if Instant::now() > deadline => {
                    bail!(
                        "Prometheus not ready within {READY_TIMEOUT:?}:\n{}",
                        server.log()
                    )
                }
                _ => std::thread::sleep(POLL),
            }
        }
        Ok(server)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GETs an API path; returns its `data` when `status` is `success`, else the error.
    fn api(&self, path: &str) -> Result<Value> {
        let (code, body) = testkit::http_get(&self.netns, self.addr, path)?;
        let v: Value =
            serde_json::from_str(&body).with_context(|| format!("{path}: {code} {body}"))?;
        if v["status"] != "success" {
            bail!("{path}: {code} {}: {}", v["errorType"], v["error"]);
        }
        Ok(v["data"].clone())
    }

    /// An instant query's result vector (or matrix, or scalar as one element).
    fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql)))?;
        Ok(match &data["result"] {
            Value::Array(a) if data["resultType"] != "scalar" => a.clone(),
            other => vec![other.clone()],
        })
    }

    /// Firing alerts: (name, labels).
    fn firing(&self) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        let data = self.api("/api/v1/alerts")?;
        Ok(data["alerts"]
            .as_array()
            .context("alerts")?
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| {
                let labels: BTreeMap<String, String> = a["labels"]
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                (labels.get("alertname").cloned().unwrap_or_default(), labels)
            })
            .collect())
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}\n--- end ---", self.log());
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A panel query with the dashboard's variables replaced by concrete values.
fn substitute(expr: &str, netns: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$instance", MAIN_AGENT)
        .replace("$netns", netns)
        .replace("$port", ".*")
}

/// What a scenario leaves running (listeners, clients) until the checks are done.
type Keep = Box<dyn std::any::Any>;

/// Backlog 4, 200 connects, nobody accepts: accept-queue overflow (SYN stage), a full queue.
fn scenario_accept_overflow(lab: &VethLab) -> Result<Keep> {
    let kept = accept_overflow(&lab.server, [127, 0, 0, 1].into(), 4, 200)?;
    Ok(Box::new(kept))
}

/// 200 spoofed SYNs over 4 s to a backlog-8 listener with SYN cookies off: SYN-queue drops,
/// SYN-ACK retransmits. Paced, so the drop counter rises across scrapes: rate() ignores the
/// first value of a new series.
fn scenario_syn_queue_drops(lab: &VethLab) -> Result<Keep> {
    let params = SynQueueParams {
        syncookies: 0,
        rate: Some(50),
        ..SynQueueParams::default()
    };
    let filled = syn_queue_fill(lab, &params)?;
    ensure!(
        filled.server.get("TcpExtTCPReqQFullDrop")? > 0,
        "no SYN-queue drop"
    );
    Ok(Box::new(filled))
}

/// A reset storm to a closed port, and resets to each watched port (label overflow), in
/// rounds 1.5 s apart: the counters rise across scrapes (rate() and increase() ignore the
/// first value of a new series).
fn scenario_resets(lab: &VethLab) -> Result<Keep> {
    for round in 0..RESET_ROUNDS {
        lab.server.run(|| -> Result<()> {
            let n = RESETS / RESET_ROUNDS;
            let refused = connect_closed_port(SocketAddr::from(([127, 0, 0, 1], 1)), n)?;
            ensure!(refused == n, "{refused} of {n} refused");
            for &port in &WATCHED[..round + 3] {
                connect_closed_port(SocketAddr::from(([127, 0, 0, 1], port)), 3)?;
            }
            Ok(())
        })??;
        std::thread::sleep(Duration::from_millis(1500));
    }
    Ok(Box::new(()))
}

/// Client-closed loopback connections in two rounds 1.5 s apart: TIME_WAIT sockets towards
/// one peer, and entries that rise across scrapes.
fn scenario_time_wait(lab: &VethLab) -> Result<Keep> {
    lab.server.run(|| -> Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        for _ in 0..2 {
            testkit::closed_connections(&listener, 40, testkit::FirstCloser::Client)?;
            std::thread::sleep(Duration::from_millis(1500));
        }
        Ok(())
    })??;
    Ok(Box::new(()))
}

#[test]
fn live_prometheus_sees_the_scenarios_and_fires_the_alerts() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    if tool("prometheus", "--version", "apt-get install prometheus").is_none() {
        return Ok(());
    }
    let lab = VethLab::new()?;
    let netns = lab.server.inode().to_string();
    let watch = format!("--watch.ports={}", WATCHED.map(|p| p.to_string()).join(","));
    let _agent = testkit::AgentProcess::start(
        &lab.server,
        Path::new(AGENT),
        &[
            &watch,
            "--limit.series-per-metric=2",
            "--iface=lo",
            "--filter=syns=tcp[tcpflags] & tcp-syn != 0",
            "--filter=resets=tcp[tcpflags] & tcp-rst != 0",
        ],
        MAIN_AGENT.parse()?,
    )?;
    let fake = partial_tracefs(
        Path::new(AGENT),
        &["sock/inet_sock_set_state", "tcp/tcp_send_reset"],
    )?;
    let _probe_down = testkit::AgentProcess::start(
        &lab.server,
        Path::new(AGENT),
        &[
            &format!("--path.tracefs={}", fake.path().display()),
            "--probe.mode=tracepoint",
        ],
        PROBE_DOWN_AGENT.parse()?,
    )?;
    let prom = PrometheusServer::start(&lab.server, &[MAIN_AGENT, PROBE_DOWN_AGENT])?;
    // A first scrape of both before the scenarios, so that rate() sees the increase.
    wait_for("both targets up", DATA_TIMEOUT, || {
        Ok(prom.query("up{job=\"sockscope\"} == 1")?.len() == 2)
    })?;

    // One call per scenario. The main agent's socket filters on the lab's `lo` see the
    // scenarios' SYNs and resets.
    let _kept: Vec<Keep> = vec![
        scenario_accept_overflow(&lab)?,
        scenario_syn_queue_drops(&lab)?,
        scenario_resets(&lab)?,
        scenario_time_wait(&lab)?,
    ];

    // The alerts fire in the live server.
    let deadline = Instant::now() + ALERT_TIMEOUT;
    let missing = loop {
        let firing = prom.firing()?;
        let missing: Vec<&str> = MUST_FIRE
            .iter()
            .filter(|(alert, label, value)| {
                let value = if *value == "NETNS" { &netns } else { *value };
                !firing.iter().any(|(name, labels)| {
                    name == alert && labels.get(*label).is_some_and(|v| v == value)
                })
            })
            .map(|(alert, _, _)| *alert)
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        std::thread::sleep(POLL);
    };
    ensure!(
        missing.is_empty(),
        "alerts not firing within {ALERT_TIMEOUT:?}: {missing:?}; firing: {:?}",
        prom.firing()?
    );
    // The probe-down alert names the probe the fake tracefs lacks.
    ensure!(
        prom.firing()?
            .iter()
            .any(|(n, l)| n == "SockscopeProbeDown"
                && l.get("probe").is_some_and(|p| p == "rst_recv")),
        "SockscopeProbeDown without probe=rst_recv"
    );

    // Every rule evaluates without error.
    let groups = prom.api("/api/v1/rules")?;
    let mut rule_count = 0;
    let mut records = Vec::new();
    for group in groups["groups"].as_array().context("groups")? {
        for rule in group["rules"].as_array().context("rules")? {
            rule_count += 1;
            ensure!(
                rule["health"] != "err",
                "rule {} fails: {}",
                rule["name"],
                rule["lastError"]
            );
            if rule["type"] == "recording" {
                records.push(rule["name"].as_str().context("name")?.to_owned());
            }
        }
    }
    ensure!(rule_count >= 20, "only {rule_count} rules loaded");
    // Every recording rule has series for the lab's namespace, but the pending ones.
    for record in &records {
        let pending = PENDING_RECORDS.contains(&record.as_str());
        let found = !prom
            .query(&format!("{record}{{netns=\"{netns}\"}}"))?
            .is_empty();
        ensure!(
            found != pending,
            "recording rule {record}: {}",
            if pending {
                "listed in PENDING_RECORDS but has data: remove it there"
            } else {
                "no series for the lab's namespace"
            }
        );
    }
    // Alerts the scenarios give no cause to fire stay silent for the lab.
    for (name, labels) in prom.firing()? {
        let ours = labels.get("netns") == Some(&netns)
            || labels.get("instance").is_some_and(|i| i == MAIN_AGENT);
        ensure!(
            !(ours && MUST_NOT_FIRE.contains(&name.as_str())),
            "{name} fires without cause: {labels:?}"
        );
    }

    check_dashboards(&prom, &netns)
}

/// Every query of every panel parses; each panel's main query (refId A) returns data, but the
/// [`PENDING`] ones, which must not. The variables' queries find the test's values.
fn check_dashboards(prom: &PrometheusServer, netns: &str) -> Result<()> {
    let mut problems = Vec::new();
    let mut pending_seen = BTreeSet::new();
    for file in dashboard_files()? {
        let d = load_json(&file)?;
        let dash = d["title"].as_str().unwrap_or_default().to_owned();
        check_variables(prom, &d, netns).with_context(|| format!("{dash}: variables"))?;
        for panel in panels(&d) {
            let title = panel["title"].as_str().unwrap_or_default();
            let pending = PENDING
                .iter()
                .find(|(dd, pt, _)| *dd == dash && *pt == title);
            if pending.is_some() {
                pending_seen.insert((dash.clone(), title.to_owned()));
            }
            for target in panel["targets"].as_array().context("targets")? {
                let expr = substitute(target["expr"].as_str().context("expr")?, netns);
                let main = target["refId"] == "A";
                // Data may take a scrape or a rule evaluation to appear: poll the main query.
                let patience = if main && pending.is_none() {
                    DATA_TIMEOUT
                } else {
                    Duration::ZERO
                };
                let deadline = Instant::now() + patience;
                let last = loop {
                    let last = prom.query(&expr);
                    let done = match &last {
                        Ok(r) => !r.is_empty() || !main || pending.is_some(),
                        Err(_) => true,
                    };
                    if done || Instant::now() > deadline {
                        break last;
                    }
                    std::thread::sleep(POLL);
                };
                match (last, pending) {
                    (Err(err), _) => problems.push(format!("{dash} / {title}: {expr}: {err:#}")),
                    (Ok(r), None) if main && r.is_empty() => {
                        problems.push(format!("{dash} / {title}: no data for {expr}"))
                    }
                    (Ok(r), Some((_, _, why))) if main && !r.is_empty() => problems.push(format!(
                        "{dash} / {title}: listed as pending ({why}) but returns data: \
                         remove it from PENDING"
                    )),
                    _ => {}
                }
            }
        }
    }
    for (dash, title, _) in PENDING {
        if !pending_seen.contains(&(dash.to_string(), title.to_string())) {
            problems.push(format!("PENDING names no panel: {dash} / {title}"));
        }
    }
    ensure!(
        problems.is_empty(),
        "dashboard queries:\n{}",
        problems.join("\n")
    );
    Ok(())
}

/// The `label_values(METRIC{…}, LABEL)` variables find the test's instance, netns and ports.
fn check_variables(prom: &PrometheusServer, d: &Value, netns: &str) -> Result<()> {
    for var in d["templating"]["list"].as_array().context("list")? {
        if var["type"] != "query" {
            continue;
        }
        let q = var["query"]["query"].as_str().context("query")?;
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .with_context(|| format!("not label_values(): {q}"))?;
        let (selector, label) = inner.rsplit_once(", ").context("label")?;
        let selector = substitute(selector, netns);
        let data = prom.api(&format!("/api/v1/series?match[]={}", url_encode(&selector)))?;
        let values: BTreeSet<&str> = data
            .as_array()
            .context("series")?
            .iter()
            .filter_map(|s| s[label].as_str())
            .collect();
        let name = var["name"].as_str().unwrap_or_default();
        let pending_filters = selector.starts_with("sockscope_tcp_segments_total");
        let ok = match name {
            "instance" => values.contains(MAIN_AGENT),
            "netns" => values.contains(netns),
            "port" => !values.is_empty() || pending_filters,
            _ => !values.is_empty(),
        };
        ensure!(ok, "variable {name} ({q}) found {values:?}");
    }
    Ok(())
}

/// Polls `f` until true, at most `timeout`.
fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(POLL);
    }
}
