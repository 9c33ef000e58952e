//! Section `web`: what TLS, basic auth and gzip cost a scrape, and what gzip saves.
//!
//! One agent in its own namespace beside 1,000 idle listeners (a page of some size); its
//! web configuration is rewritten between the modes and picked up by its reload, so every
//! mode is measured against the same process. Each scrape is a new connection (TLS pays its
//! handshake every time, as a Prometheus server whose keep-alive lapsed would).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::{AgentProcess, Netns, Pki, TempDir, WebClient, wait_until};

use crate::Args;
use crate::listeners::{AGENT_LISTEN, open_listeners};
use crate::measure::percentile;

/// Idle listeners beside the agent, for a page of realistic size.
const LISTENERS: usize = 1_000;
/// bcrypt cost of the benchmark's password (the usual 10).
const COST: u32 = 10;

/// Runs the section and prints its table; returns what was found broken.
pub fn run(args: &Args) -> Result<Vec<String>> {
    let dir = TempDir::new("bench-web")?;
    let pki = Pki::new("sockscope bench CA")?;
    let (cert, key) = pki.leaf("sockscope bench")?;
    dir.write("server.crt", &cert)?;
    dir.write("server.key", &key)?;
    let config = dir.write("web.yml", "")?;

    let ns = Netns::new()?;
    let _listeners = open_listeners(&ns, LISTENERS)?;
    let mut cmd = Command::new(&args.agent);
    cmd.arg("--web.config.file").arg(&config);
    let _agent = AgentProcess::start_command(&ns, cmd, AGENT_LISTEN)?;

    let k = args.listener_scrapes as usize;
    let limit = Duration::from_secs(args.timeout);
    println!(
        "== web: /metrics over a new connection each, {k} scrapes per mode, {LISTENERS} idle listeners =="
    );
    println!(
        "{:<22}{:>9}{:>9}{:>9}{:>12}",
        "mode", "p50 ms", "p90 ms", "max ms", "bytes"
    );
    let plain = WebClient::default();
    let gzip = WebClient {
        headers: vec!["Accept-Encoding: gzip".to_owned()],
        ..WebClient::default()
    };
    // Warm-up, unreported: the first scrapes of a new agent grow its buffers.
    for _ in 0..5 {
        plain.get(&ns, AGENT_LISTEN, "/metrics")?;
    }
    let base = report("plain HTTP", &ns, &plain, k, limit, None)?;
    report("gzip", &ns, &gzip, k, limit, Some(base))?;

    dir.write(
        "web.yml",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n",
    )?;
    let tls = WebClient::tls(&pki)?;
    reloaded(&ns, &tls)?;
    report("TLS", &ns, &tls, k, limit, Some(base))?;

    let hash = bcrypt::hash("bench password", COST)?;
    dir.write(
        "web.yml",
        &format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
             basic_auth_users:\n  bench: '{hash}'\n"
        ),
    )?;
    let authed = WebClient::tls(&pki)?.with_auth("bench", "bench password");
    reloaded(&ns, &WebClient::tls(&pki)?)?;
    let started = Instant::now();
    let first = authed.get(&ns, AGENT_LISTEN, "/metrics")?;
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    if first.status != 200 {
        bail!("the authenticated scrape answered {}", first.status);
    }
    println!(
        "{:<22}{first_ms:>9.1}{:>9}{:>9}{:>12}   (the one bcrypt at cost {COST})",
        "TLS + auth, first", "", "", ""
    );
    report("TLS + auth, cached", &ns, &authed, k, limit, Some(base))?;
    println!(
        "(ratios are p50 against plain HTTP; the machine may be shared, so single figures are noisy)"
    );
    Ok(Vec::new())
}

/// Waits until the agent answers `client` (the reload happens on the next connection).
fn reloaded(ns: &Netns, client: &WebClient) -> Result<()> {
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        Ok(client.get(ns, AGENT_LISTEN, "/healthz").is_ok())
    })
    .context("the agent did not take the new web configuration")
}

/// Times `k` scrapes (bounded by `limit`), prints one row, returns the p50 in ms.
fn report(
    mode: &str,
    ns: &Netns,
    client: &WebClient,
    k: usize,
    limit: Duration,
    base: Option<f64>,
) -> Result<f64> {
    let deadline = Instant::now() + limit;
    let mut times = Vec::with_capacity(k);
    let mut bytes = 0;
    while times.len() < k && Instant::now() < deadline {
        let started = Instant::now();
        let r = client.get(ns, AGENT_LISTEN, "/metrics")?;
        times.push(started.elapsed());
        if r.status != 200 {
            bail!("{mode}: /metrics answered {}", r.status);
        }
        bytes = r.body.len();
    }
    let ms = |p| percentile(&times, p).as_secs_f64() * 1e3;
    let ratio = base.map_or(String::new(), |b| format!("   ×{:.2}", ms(0.5) / b));
    println!(
        "{mode:<22}{:>9.1}{:>9.1}{:>9.1}{bytes:>12}{ratio}",
        ms(0.5),
        ms(0.9),
        ms(1.0)
    );
    Ok(ms(0.5))
}
