//! `promtool check metrics` reports nothing for the whole page (host-only: promtool is an
//! outside oracle, installed by `cargo xtask test` from Debian's `prometheus` package).

use std::{
    io::Write as _,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use testkit::{AgentProcess, Netns, connect_closed_port, host_only, require_root};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");

fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("promtool");
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "promtool is missing and CI=true forbids skipping; `cargo xtask test` installs it (Debian package prometheus)"
        );
    }
    eprintln!("skipping: promtool not installed (apt-get install prometheus)");
    None
}

#[test]
fn promtool_finds_nothing_to_report() -> Result<()> {
    if !require_root() || !host_only("promtool") {
        return Ok(());
    }
    let Some(promtool) = promtool() else {
        return Ok(());
    };
    let ns = Netns::new()?;
    let agent = AgentProcess::start(
        &ns,
        Path::new(AGENT),
        &[],
        SocketAddr::from(([127, 0, 0, 1], 9844)),
    )?;
    // Some resets so that every family has series.
    ns.run(|| connect_closed_port(SocketAddr::from(([127, 0, 0, 1], 1)), 3))??;
    let (status, page) =
        testkit::http_get(&ns, SocketAddr::from(([127, 0, 0, 1], 9844)), "/metrics")?;
    assert_eq!(status, 200);
    assert!(page.contains("sockscope_tcp_resets_sent_total"), "{page}");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(page.as_bytes())?;
    let out = child.wait_with_output()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !report.trim().is_empty() {
        bail!(
            "promtool check metrics reported:\n{report}\n--- page ---\n{page}\n{}",
            agent.log()
        );
    }
    Ok(())
}
