//! Coexistence with other BPF users of the cgroup hooks: the agent's cgroup_skb program,
//! attached at the cgroup v2 root through a bpf_link (multi-attach), neither displaces a
//! program that was at the root before it nor keeps another one, attached at a child
//! cgroup, from seeing its packets; and the agent's figures stay exact meanwhile.

use std::{
    collections::HashSet,
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use testkit::{
    AgentProcess, Cgroup, CountingProgram, Netns, TcpState, cgroup_ingress_programs, require_root,
    wait_until,
};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");
/// Tells [`coexist_listener_helper`] which port to listen on.
const HELPER_ENV: &str = "SOCKSCOPE_COEXIST_LISTEN_PORT";
/// Connections made to the listener in the child cgroup.
const CONNECTS: u64 = 5;

fn agent_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9844))
}

/// Not a test of its own: the process that `cgroup_programs_coexist` starts inside its
/// child cgroup (a socket belongs to the cgroup of the process that creates it). Listens
/// until its standard input closes.
#[test]
#[ignore = "the listener process of cgroup_programs_coexist, started by it"]
fn coexist_listener_helper() -> Result<()> {
    let port: u16 = std::env::var(HELPER_ENV)
        .context("started by cgroup_programs_coexist only")?
        .parse()?;
    let _listener = TcpListener::bind(("127.0.0.1", port))?;
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    Ok(())
}

fn cookies(agent: &AgentProcess, netns: &str, port: u16) -> Result<f64> {
    Ok(agent.scrape()?.sum(
        "sockscope_listen_syn_queue_full_total",
        &[
            ("netns", netns),
            ("port", &port.to_string()),
            ("action", "cookie"),
        ],
    ))
}

fn connect(ns: &Netns, port: u16, n: u64) -> Result<()> {
    ns.run(|| -> Result<()> {
        for _ in 0..n {
            TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(5),
            )?;
        }
        Ok(())
    })?
}

#[test]
fn cgroup_programs_coexist() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let root = agent::kernel::cgroup::cgroup2_root(None)?;
    // Another user's program at the root before the agent starts, multi-attach as a bpf_link
    // is (BPF_F_ALLOW_MULTI), as systemd's IP accounting attaches its own.
    let earlier = CountingProgram::load()?;
    let _earlier_link = earlier.attach(&root)?;
    let earlier_id = earlier.id()?;

    let ns = Netns::new()?;
    let netns = ns.inode().to_string();
    // Every SYN to a listener is answered with a cookie: one exact count per connection.
    ns.sysctl("net.ipv4.tcp_syncookies", "2")?;
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let held: HashSet<u32> = agent
        .held_bpf_ids()?
        .into_iter()
        .filter(|(kind, _)| kind == "prog_id")
        .map(|(_, id)| id)
        .collect();
    let at_root = cgroup_ingress_programs(&root, false)?;
    let ours: Vec<u32> = at_root
        .iter()
        .copied()
        .filter(|id| held.contains(id))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "the agent's cgroup_skb program at the root: {at_root:?}"
    );
    let agent_prog = ours[0];
    assert!(
        at_root.contains(&earlier_id),
        "the program attached before the agent is still there: {at_root:?}"
    );

    // A child cgroup with a program of its own, and a listener process inside it.
    let cgroup = Cgroup::create(
        &root,
        &format!("sockscope-coexist-{}-{}", std::process::id(), ns.inode()),
    )?;
    let other = CountingProgram::load()?;
    let other_link = other.attach(cgroup.path())?;
    let effective = cgroup_ingress_programs(cgroup.path(), true)?;
    for id in [agent_prog, earlier_id, other.id()?] {
        assert!(
            effective.contains(&id),
            "program {id} runs for the child cgroup's sockets: {effective:?}"
        );
    }
    let port =
        ns.run(|| -> Result<u16> { Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) })??;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "--exact",
        "coexist_listener_helper",
        "--ignored",
        "--test-threads=1",
    ])
    .env(HELPER_ENV, port.to_string())
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let procs = cgroup.procs_path();
    // SAFETY: Cgroup::enter_self only opens, writes and closes.
    unsafe {
        cmd.pre_exec(move || Cgroup::enter_self(&procs));
    }
    let helper = ns.spawn(cmd)?;
    wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        Ok(ns
            .tcp_sockets()?
            .iter()
            .any(|s| s.state == TcpState::Listen && s.local.port() == port))
    })
    .context("the helper does not listen")?;
    let in_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", helper.pid()))?;
    assert!(
        in_cgroup.contains(
            &cgroup
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string()
        ),
        "{in_cgroup}"
    );

    assert_eq!(other.count()?, 0, "nothing else lives in the child cgroup");
    let earlier_before = earlier.count()?;
    connect(&ns, port, CONNECTS)?;
    assert_eq!(
        cookies(&agent, &netns, port)?,
        CONNECTS as f64,
        "the agent counts every cookie: {}",
        agent.log()
    );
    // Each connection brings at least its SYN and its handshake-completing ACK to the
    // listener, through every program that runs for it.
    let seen = other.count()?;
    assert!(seen >= 2 * CONNECTS, "the child's program saw {seen}");
    let seen = earlier.count()? - earlier_before;
    assert!(
        seen >= 2 * CONNECTS,
        "the root's earlier program saw {seen}"
    );

    // The other program goes; the agent's goes on counting.
    drop(other_link);
    assert!(!cgroup_ingress_programs(cgroup.path(), false)?.contains(&other.id()?));
    connect(&ns, port, CONNECTS)?;
    assert_eq!(cookies(&agent, &netns, port)?, 2.0 * CONNECTS as f64);
    assert!(cgroup_ingress_programs(&root, false)?.contains(&agent_prog));
    drop(helper);
    drop(cgroup);
    Ok(())
}
