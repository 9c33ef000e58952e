//! Hostile and churning conditions: the page answers, stays bounded, and reports no errors.

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use testkit::{AgentProcess, NamedNetns, Netns, VethLab, connect_closed_port, require_root};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");

fn agent_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9844))
}

/// Series of the page that belong to `netns` or to no namespace (other tests' namespaces,
/// which this agent also sees, are not counted).
fn series_count(page: &testkit::Metrics, netns: &str) -> usize {
    page.own_series_count(netns)
}

/// A port scan (2,000 closed ports) and a SYN flood from 20,000 spoofed source ports must not
/// grow the page: unanswered ports become `other` in the kernel, and listen events are keyed
/// by listener.
#[test]
fn port_scan_and_random_source_flood_keep_the_page_bounded() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lab = VethLab::new()?;
    let agent = AgentProcess::start(&lab.server, Path::new(AGENT), &[], agent_addr())?;
    let listener = lab
        .server
        .run(|| TcpListener::bind(SocketAddr::new(lab.server_ip(false), 0)))??;
    let target = listener.local_addr()?;
    // Warm-up: every family that the storm will touch exists once.
    lab.server
        .run(|| connect_closed_port(SocketAddr::from(([127, 0, 0, 1], 1)), 1))??;
    lab.syn_flood(target, 10, None)?;
    let netns = lab.server.inode().to_string();
    let before = series_count(&agent.scrape()?, &netns);

    lab.server.run(|| -> Result<()> {
        for port in 20_000..22_000u16 {
            connect_closed_port(SocketAddr::from(([127, 0, 0, 1], port)), 1)?;
        }
        Ok(())
    })??;
    lab.syn_flood(target, 20_000, None)?;
    let after = agent.scrape()?;
    let grown = series_count(&after, &netns).saturating_sub(before);
    assert!(
        grown <= 20,
        "the page grew by {grown} series ({before} before)"
    );
    let other = after
        .get(
            "sockscope_tcp_resets_sent_total",
            &[
                ("netns", &netns),
                ("reason", "no_socket"),
                ("state", "none"),
                ("port", "other"),
            ],
        )
        .unwrap_or(0.0);
    assert!(
        other >= 2_000.0,
        "the scanned ports are folded into `other`: {other}"
    );
    drop(listener);
    Ok(())
}

/// Namespaces with listeners appear and vanish while scrapes run: every scrape answers 200
/// and no collector reports an error.
#[test]
fn namespaces_and_listeners_churning_during_scrapes() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let home = Netns::new()?;
    let agent = AgentProcess::start(&home, Path::new(AGENT), &[], agent_addr())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    // The churn goes on until the scrapes have seen enough of it (a slow, busy machine
    // scrapes slowly), bounded by the round count and the deadline.
    const SCRAPES: usize = 8;
    let enough = std::sync::atomic::AtomicBool::new(false);
    let scrapes = std::thread::scope(|s| -> Result<usize> {
        let enough = &enough;
        let churn = s.spawn(move || -> Result<()> {
            for round in 0..400u64 {
                if Instant::now() > deadline
                    || (round >= 40 && enough.load(std::sync::atomic::Ordering::Relaxed))
                {
                    break;
                }
                let ns = Netns::new()?;
                // Named like `ip netns add` does, so the agent finds it; every other round
                // stays unnamed (found by no one) to cover that case too.
                let named = (round % 2 == 0)
                    .then(|| {
                        NamedNetns::new(
                            &ns,
                            &format!("sockscope-test-{}-{round}", std::process::id()),
                        )
                    })
                    .transpose()?;
                let listeners = ns.run(|| -> Result<Vec<TcpListener>> {
                    (0..25)
                        .map(|_| Ok(TcpListener::bind("127.0.0.1:0")?))
                        .collect()
                })??;
                std::thread::sleep(Duration::from_millis(20 + (round % 5) * 10));
                drop(listeners);
                drop(named);
                drop(ns);
            }
            Ok(())
        });
        let mut scrapes = 0;
        while !churn.is_finished() && Instant::now() < deadline {
            let page = agent.scrape()?;
            let errors = page.sum("sockscope_collector_errors_total", &[]);
            assert_eq!(
                errors,
                0.0,
                "a collector failed during churn\n{}",
                agent.log()
            );
            scrapes += 1;
            if scrapes >= SCRAPES {
                enough.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        churn.join().expect("churn thread")?;
        Ok(scrapes)
    })?;
    assert!(
        scrapes >= SCRAPES,
        "only {scrapes} scrapes ran during the churn"
    );
    Ok(())
}

/// The entries of a namespace that is gone are removed from the kernel maps (after two
/// refreshes without it), so maps do not fill up as containers come and go, and its series
/// leave the page.
#[test]
fn a_gone_namespace_leaves_the_maps_and_the_page() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let home = Netns::new()?;
    let agent = AgentProcess::start(
        &home,
        Path::new(AGENT),
        &["--listeners.refresh-interval=1"],
        agent_addr(),
    )?;
    let gone = Netns::new()?;
    gone.run(|| connect_closed_port(SocketAddr::from(([127, 0, 0, 1], 1)), 3))??;
    let label = gone.inode().to_string();
    let sent =
        |m: &testkit::Metrics| m.sum("sockscope_tcp_resets_sent_total", &[("netns", &label)]);
    assert_eq!(sent(&agent.scrape()?), 3.0);
    drop(gone);
    testkit::wait_until(Duration::from_secs(15), Duration::from_millis(250), || {
        // Only the reset series: other tests running meanwhile may get the freed inode for
        // a namespace of theirs (inodes are reused lowest first), but cause no resets there.
        Ok(agent
            .scrape()?
            .series("sockscope_tcp_resets_sent_total")
            .iter()
            .all(|s| s.label("netns") != Some(label.as_str())))
    })
    .map_err(|e| anyhow::anyhow!("{e}: the gone namespace's series stay\n{}", agent.log()))?;
    Ok(())
}
