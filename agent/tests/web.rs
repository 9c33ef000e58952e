//! The web endpoint: TLS, client certificates and basic auth from `--web.config.file`
//! (certificates made here with rcgen), reloads, and hostile or careless clients.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use rustls::SupportedProtocolVersion;
use testkit::{
    AgentProcess, Netns, Pki, TempDir, VethLab, WebClient, http_get, require_root, wait_until,
};

const AGENT: &str = env!("CARGO_BIN_EXE_sockscope");
const TIMEOUT: Duration = Duration::from_secs(10);

fn agent_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9844))
}

/// Writes the web config and starts the agent with it, healthy as seen by `client`.
fn start(
    ns: &Netns,
    config: &Path,
    client: &WebClient,
    extra: &[&str],
    listen: SocketAddr,
) -> Result<AgentProcess> {
    let mut cmd = Command::new(AGENT);
    cmd.arg("--web.config.file").arg(config).args(extra);
    let client = client.clone();
    AgentProcess::start_command_with_probe(ns, cmd, listen, &move |ns, addr, _| {
        let r = client.get(ns, addr, "/healthz")?;
        Ok((r.status, r.text()))
    })
}

/// Server certificate and key of `pki` written into `dir` as server.crt / server.key.
fn server_files(pki: &Pki, dir: &TempDir) -> Result<()> {
    let (cert, key) = pki.leaf("sockscope test server")?;
    dir.write("server.crt", &cert)?;
    dir.write("server.key", &key)?;
    Ok(())
}

static TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

const TLS: &str = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n";

#[test]
fn tls_scrape_needs_the_right_ca_and_refuses_plain_http() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = TempDir::new("web-tls")?;
    let pki = Pki::new("sockscope test CA")?;
    server_files(&pki, &dir)?;
    let config = dir.write(
        "web.yml",
        &format!("{TLS}http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"),
    )?;
    let ns = Netns::new()?;
    let client = WebClient::tls(&pki)?;
    let agent = start(&ns, &config, &client, &[], agent_addr())?;

    let page = client.get(&ns, agent_addr(), "/metrics")?;
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.text().contains("sockscope_build_info"));
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert!(agent.log().contains("https://127.0.0.1:9844/metrics"));

    let stranger = Pki::new("another CA")?;
    let err = WebClient::tls(&stranger)?
        .get(&ns, agent_addr(), "/metrics")
        .expect_err("a server certificate from another CA must not be trusted");
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");

    let plain = http_get(&ns, agent_addr(), "/metrics");
    assert!(
        plain.is_err(),
        "plain HTTP to the TLS port answered: {plain:?}"
    );
    // Still serving after the refusals.
    assert_eq!(client.get(&ns, agent_addr(), "/metrics")?.status, 200);
    Ok(())
}

#[test]
fn basic_auth_wrong_password_401_right_one_200() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = TempDir::new("web-auth")?;
    let pki = Pki::new("sockscope test CA")?;
    server_files(&pki, &dir)?;
    let hash = bcrypt::hash("correct horse", 10)?;
    let config = dir.write(
        "web.yml",
        &format!("{TLS}basic_auth_users:\n  prometheus: '{hash}'\n"),
    )?;
    let ns = Netns::new()?;
    let good = WebClient::tls(&pki)?.with_auth("prometheus", "correct horse");
    let _agent = start(&ns, &config, &good, &[], agent_addr())?;

    for (who, client) in [
        ("no credentials", WebClient::tls(&pki)?),
        (
            "wrong password",
            WebClient::tls(&pki)?.with_auth("prometheus", "battery staple"),
        ),
        (
            "unknown user",
            WebClient::tls(&pki)?.with_auth("grafana", "correct horse"),
        ),
    ] {
        let r = client.get(&ns, agent_addr(), "/metrics")?;
        assert_eq!(r.status, 401, "{who}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Basic realm=\"sockscope\""),
            "{who}"
        );
        assert!(!r.text().contains("sockscope_"), "{who}: page leaked");
    }
    let r = good.get(&ns, agent_addr(), "/metrics")?;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("sockscope_build_info"));
    // The second scrape is answered from the cache: far below one bcrypt at cost 10 would
    // not be a fair bound on a busy machine, so only check it still works.
    assert_eq!(good.get(&ns, agent_addr(), "/metrics")?.status, 200);
    Ok(())
}

/// A TLS client trusting `pki` that offers the ALPN protocols `offer`.
fn alpn_connector(pki: &Pki, offer: &[&[u8]]) -> Result<tokio_rustls::TlsConnector> {
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(pki.roots()?)
    .with_no_client_auth();
    config.alpn_protocols = offer.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// Runs `f` on a new single-threaded runtime inside `ns`.
fn in_runtime<T: Send>(
    ns: &Netns,
    f: impl std::future::Future<Output = Result<T>> + Send,
) -> Result<T> {
    ns.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(f)
    })?
}

/// A client connection to the agent over TLS, with hyper's client for the protocol that
/// TLS negotiated.
enum AgentConnection {
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>),
    H1(hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>),
}

/// Opens a connection with `connector` (inside a runtime): the connection, the protocol
/// negotiated, and the task driving the connection, which ends when the agent closes it.
async fn connect_agent(
    connector: tokio_rustls::TlsConnector,
) -> Result<(
    AgentConnection,
    Option<Vec<u8>>,
    tokio::task::JoinHandle<()>,
)> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let addr = agent_addr();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = connector.connect(addr.ip().into(), tcp).await?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let io = TokioIo::new(tls);
    Ok(if alpn.as_deref() == Some(b"h2") {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        (
            AgentConnection::H2(send),
            alpn,
            tokio::spawn(async { drop(conn.await) }),
        )
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
        (
            AgentConnection::H1(send),
            alpn,
            tokio::spawn(async { drop(conn.await) }),
        )
    })
}

impl AgentConnection {
    /// GET `path`: (status, body).
    async fn get(&mut self, path: &str) -> Result<(u16, String)> {
        use http_body_util::{BodyExt as _, Empty};
        let addr = agent_addr();
        let response = match self {
            Self::H2(send) => {
                let request =
                    hyper::Request::get(format!("https://{addr}{path}")).body(Empty::new())?;
                send.send_request(request).await?
            }
            Self::H1(send) => {
                let request = hyper::Request::get(path)
                    .header("host", addr.to_string())
                    .body(Empty::new())?;
                send.send_request(request).await?
            }
        };
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// One GET of `path` over TLS offering the ALPN protocols `offer`: (the protocol
/// negotiated, status, body).
fn alpn_get(
    ns: &Netns,
    pki: &Pki,
    offer: &[&[u8]],
    path: &str,
) -> Result<(Option<Vec<u8>>, u16, String)> {
    let connector = alpn_connector(pki, offer)?;
    in_runtime(ns, async move {
        let (mut conn, alpn, _) = connect_agent(connector).await?;
        let (status, body) = conn.get(path).await?;
        Ok((alpn, status, body))
    })
}

/// How long the agent keeps an HTTP/2 connection open after one request, idle (None: still
/// open after `limit`).
fn h2_idle_lifetime(ns: &Netns, pki: &Pki, limit: Duration) -> Result<Option<Duration>> {
    let connector = alpn_connector(pki, &[b"h2"])?;
    in_runtime(ns, async move {
        let (mut conn, alpn, driver) = connect_agent(connector).await?;
        anyhow::ensure!(
            alpn.as_deref() == Some(b"h2"),
            "HTTP/2 not negotiated: {alpn:?}"
        );
        let (status, _) = conn.get("/healthz").await?;
        anyhow::ensure!(status == 200, "healthz over HTTP/2: {status}");
        let idle_since = Instant::now();
        Ok(tokio::time::timeout(limit, driver)
            .await
            .ok()
            .map(|_| idle_since.elapsed()))
    })
}

#[test]
fn http2_is_offered_over_tls_unless_switched_off() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = TempDir::new("web-h2")?;
    let pki = Pki::new("server CA")?;
    server_files(&pki, &dir)?;
    let both: &[&[u8]] = &[b"h2", b"http/1.1"];
    for (http2, expected) in [
        ("", Some(b"h2".to_vec())),
        (
            "http_server_config:\n  http2: false\n",
            Some(b"http/1.1".to_vec()),
        ),
    ] {
        let config = dir.write("web.yml", &format!("{TLS}{http2}"))?;
        let ns = Netns::new()?;
        let _agent = start(&ns, &config, &WebClient::tls(&pki)?, &[], agent_addr())?;
        let (alpn, status, body) = alpn_get(&ns, &pki, both, "/metrics")?;
        assert_eq!(alpn, expected, "{http2:?}");
        assert_eq!(status, 200, "{http2:?}");
        assert!(body.contains("sockscope_build_info"), "{http2:?}: {body}");
        let (_, status, _) = alpn_get(&ns, &pki, both, "/nothing-here")?;
        assert_eq!(status, 404, "{http2:?}");
        // A client that offers only HTTP/1.1 gets it either way.
        let (alpn, status, _) = alpn_get(&ns, &pki, &[b"http/1.1"], "/healthz")?;
        assert_eq!(
            (alpn.as_deref(), status),
            (Some(&b"http/1.1"[..]), 200),
            "{http2:?}"
        );
        if expected.as_deref() == Some(b"h2") {
            // No header deadline in HTTP/2: an idle connection is closed after 10 s instead.
            let lifetime = h2_idle_lifetime(&ns, &pki, Duration::from_secs(30))?;
            assert!(
                lifetime.is_some_and(|t| t >= Duration::from_secs(9)),
                "an idle HTTP/2 connection stayed open for {lifetime:?} (None: over 30 s)"
            );
        }
    }
    Ok(())
}

/// A server CA (its leaf in server.crt/server.key) and a client CA (in clients.crt).
fn server_and_client_cas(dir: &TempDir) -> Result<(Pki, Pki)> {
    let server_pki = Pki::new("server CA")?;
    let client_pki = Pki::new("client CA")?;
    server_files(&server_pki, dir)?;
    dir.write("clients.crt", &client_pki.ca_pem)?;
    Ok((server_pki, client_pki))
}

#[test]
fn client_certificate_required_and_tls13_only() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = TempDir::new("web-mtls")?;
    let (server_pki, client_pki) = server_and_client_cas(&dir)?;
    let config = dir.write(
        "web.yml",
        &format!(
            "{TLS}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: clients.crt\n  \
             min_version: TLS13\n"
        ),
    )?;
    let ns = Netns::new()?;
    let with_cert = WebClient {
        cert: Some(client_pki.leaf("prometheus")?),
        ..WebClient::tls(&server_pki)?
    };
    let _agent = start(&ns, &config, &with_cert, &[], agent_addr())?;

    let r = with_cert.get(&ns, agent_addr(), "/metrics")?;
    assert_eq!(r.status, 200);

    let without = WebClient::tls(&server_pki)?.get(&ns, agent_addr(), "/metrics");
    assert!(
        without.is_err(),
        "a client without a certificate was served: {without:?}"
    );
    let foreign = WebClient {
        cert: Some(server_pki.leaf("intruder")?),
        ..WebClient::tls(&server_pki)?
    }
    .get(&ns, agent_addr(), "/metrics");
    assert!(
        foreign.is_err(),
        "a certificate from another CA was accepted: {foreign:?}"
    );
    let tls12 = WebClient {
        versions: Some(TLS12_ONLY),
        ..with_cert.clone()
    }
    .get(&ns, agent_addr(), "/metrics");
    let err = tls12.expect_err("min_version TLS13 must refuse a TLS 1.2 client");
    assert!(format!("{err:#}").contains("ProtocolVersion"), "{err:#}");
    Ok(())
}

#[test]
fn client_allowed_sans_admits_only_certificates_naming_an_allowed_san() -> Result<()> {
    use rcgen::SanType;
    if !require_root() {
        return Ok(());
    }
    let dir = TempDir::new("web-sans")?;
    let (server_pki, client_pki) = server_and_client_cas(&dir)?;
    // VerifyClientCertIfGiven on its own would let a client without a certificate in;
    // with client_allowed_sans a certificate is required.
    let config = dir.write(
        "web.yml",
        &format!(
            "{TLS}  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: clients.crt\n  \
             client_allowed_sans: [prometheus.example, 'spiffe://example.org/scraper']\n"
        ),
    )?;
    let client = |sans: Vec<SanType>| -> Result<WebClient> {
        Ok(WebClient {
            cert: Some(client_pki.leaf_with("client", sans)?),
            ..WebClient::tls(&server_pki)?
        })
    };
    let by_dns = client(vec![
        SanType::DnsName("other.example".try_into()?),
        SanType::DnsName("prometheus.example".try_into()?),
    ])?;
    let ns = Netns::new()?;
    let agent = start(&ns, &config, &by_dns, &[], agent_addr())?;

    assert_eq!(by_dns.get(&ns, agent_addr(), "/metrics")?.status, 200);
    let by_uri = client(vec![SanType::URI(
        "spiffe://example.org/scraper".try_into()?,
    )])?;
    assert_eq!(by_uri.get(&ns, agent_addr(), "/metrics")?.status, 200);
    for (who, c) in [
        (
            "a certificate of the right CA with other names",
            client(vec![
                SanType::DnsName("grafana.example".try_into()?),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ])?,
        ),
        (
            "a certificate whose common name is an allowed name",
            WebClient {
                cert: Some(client_pki.leaf_with("prometheus.example", vec![])?),
                ..WebClient::tls(&server_pki)?
            },
        ),
        ("no certificate", WebClient::tls(&server_pki)?),
        (
            "an allowed name from another CA",
            WebClient {
                cert: Some(server_pki.leaf_with(
                    "x",
                    vec![SanType::DnsName("prometheus.example".try_into()?)],
                )?),
                ..WebClient::tls(&server_pki)?
            },
        ),
    ] {
        let r = c.get(&ns, agent_addr(), "/metrics").map(|r| r.status);
        assert!(r.is_err(), "{who} was served: {r:?}");
    }
    // Still serving: the refusals were the check's, not a dead agent's.
    assert_eq!(by_dns.get(&ns, agent_addr(), "/metrics")?.status, 200);
    let log = agent.log();
    assert!(
        log.contains("none of its subject alternative names is in client_allowed_sans"),
        "{log}"
    );
    Ok(())
}

#[test]
fn rotated_certificates_are_picked_up_and_invalid_changes_keep_the_last_good_config() -> Result<()>
{
    if !require_root() {
        return Ok(());
    }
    let dir = TempDir::new("web-reload")?;
    let old = Pki::new("old CA")?;
    server_files(&old, &dir)?;
    let config = dir.write("web.yml", TLS)?;
    let ns = Netns::new()?;
    let old_client = WebClient::tls(&old)?;
    let agent = start(&ns, &config, &old_client, &[], agent_addr())?;
    assert_eq!(old_client.get(&ns, agent_addr(), "/metrics")?.status, 200);

    let new = Pki::new("new CA")?;
    let new_client = WebClient::tls(&new)?;
    server_files(&new, &dir)?;
    wait_until(TIMEOUT, Duration::from_millis(100), || {
        Ok(new_client.get(&ns, agent_addr(), "/healthz").is_ok())
    })
    .context("the new certificate is not served")?;
    assert!(
        old_client.get(&ns, agent_addr(), "/healthz").is_err(),
        "the old certificate is still served"
    );
    assert!(agent.log().contains("web configuration reloaded"));

    // A broken file, then a key that does not exist: the last good configuration stays.
    dir.write("web.yml", "tls_server_config: [\n")?;
    assert_eq!(new_client.get(&ns, agent_addr(), "/metrics")?.status, 200);
    dir.write(
        "web.yml",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: missing.key\n",
    )?;
    for _ in 0..3 {
        assert_eq!(new_client.get(&ns, agent_addr(), "/metrics")?.status, 200);
    }
    let log = agent.log();
    let name = config.display().to_string();
    assert!(
        log.lines().any(|l| l.contains(&name)
            && l.contains("missing.key")
            && l.contains("keeping the last good web configuration")),
        "{log}"
    );
    // The same broken version is reported once, not on every connection.
    assert_eq!(log.matches("missing.key").count(), 1, "{log}");

    // Fixed again: plain HTTP with basic auth (TLS off) is taken.
    let hash = bcrypt::hash("pw", 4)?;
    dir.write("web.yml", &format!("basic_auth_users:\n  u: '{hash}'\n"))?;
    let plain = WebClient::default().with_auth("u", "pw");
    wait_until(TIMEOUT, Duration::from_millis(100), || {
        Ok(plain
            .get(&ns, agent_addr(), "/metrics")
            .is_ok_and(|r| r.status == 200))
    })?;
    assert_eq!(
        WebClient::default()
            .with_auth("u", "nope")
            .get(&ns, agent_addr(), "/metrics")?
            .status,
        401
    );
    Ok(())
}

/// Bad files at start: exit 1, and stderr names the file and the problem. No root needed:
/// the file is read before anything else.
#[test]
fn invalid_web_config_exits_1_naming_file_and_problem() -> Result<()> {
    let dir = TempDir::new("web-invalid")?;
    let pki = Pki::new("CA")?;
    server_files(&pki, &dir)?;
    let cases = [
        (
            "unknown.yml",
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  cert_fil: x\n",
            "unknown field `cert_fil`",
        ),
        (
            "nokey.yml",
            "tls_server_config:\n  cert_file: server.crt\n",
            "key_file",
        ),
        (
            "missing.yml",
            "tls_server_config:\n  cert_file: server.crt\n  key_file: absent.key\n",
            "absent.key",
        ),
        (
            "hash.yml",
            "basic_auth_users:\n  prometheus: secret\n",
            "not a bcrypt hash",
        ),
        (
            "notpem.yml",
            "tls_server_config:\n  cert_file: notpem.yml\n  key_file: server.key\n",
            "no PEM certificate",
        ),
        (
            "version.yml",
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS11\n",
            "TLS12 or TLS13",
        ),
    ];
    for (name, text, problem) in cases {
        let path = dir.write(name, text)?;
        let out = Command::new(AGENT)
            .arg("--web.config.file")
            .arg(&path)
            .arg("--web.listen-address=127.0.0.1:0")
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()) && stderr.contains(problem),
            "{name}: {stderr}"
        );
    }
    let absent = dir.path().join("absent.yml");
    let out = Command::new(AGENT)
        .arg("--web.config.file")
        .arg(&absent)
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&absent.display().to_string()) && stderr.contains("No such file"),
        "{stderr}"
    );
    Ok(())
}

/// 100 concurrent scrapes while random-source SYNs flood the agent's own port: every scrape
/// gets the page, and neither the page nor the agent's memory grows much.
#[test]
fn concurrent_scrapes_during_a_syn_flood_all_answered_and_bounded() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lab = VethLab::new()?;
    let addr = SocketAddr::new(lab.server_ip(false), 9844);
    let agent = AgentProcess::start(
        &lab.server,
        Path::new(AGENT),
        &["--web.max-requests=100"],
        addr,
    )?;
    let netns = lab.server.inode().to_string();
    // Warm up: every series family the flood touches exists once, allocator pools and the
    // page buffer have grown.
    lab.syn_flood(addr, 10, None)?;
    let mut before = 0;
    for _ in 0..5 {
        before = agent.scrape()?.own_series_count(&netns);
    }
    let rss_before = agent.rss_kib()?;

    let (flooded, statuses) = std::thread::scope(|s| -> Result<(usize, Vec<u16>)> {
        let flood = s.spawn(|| lab.syn_flood(addr, 30_000, None));
        let scrapers: Vec<_> = (0..100)
            .map(|_| s.spawn(|| http_get(&lab.server, addr, "/metrics").map(|(c, _)| c)))
            .collect();
        let statuses = scrapers
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("scraper panicked"))?)
            .collect::<Result<Vec<_>>>()?;
        let flooded = flood.join().map_err(|_| anyhow!("flood panicked"))??;
        Ok((flooded, statuses))
    })?;
    assert!(flooded > 1_000, "only {flooded} SYNs went out");
    assert_eq!(statuses.len(), 100);
    assert!(statuses.iter().all(|&c| c == 200), "{statuses:?}");

    let (_, page) = agent.get("/metrics")?;
    let after = testkit::Metrics::parse(&page)?.own_series_count(&netns);
    let rss_after = agent.rss_kib()?;
    eprintln!(
        "series {before} → {after}; page {} bytes; RSS {rss_before} → {rss_after} KiB; \
         {flooded} SYNs",
        page.len()
    );
    assert!(
        after <= before + 20,
        "the agent's own series grew from {before} to {after}"
    );
    // Other tests' namespaces add to the page; even so it stays far from this.
    assert!(page.len() < 4 << 20, "the page has {} bytes", page.len());
    assert!(
        rss_after <= rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    Ok(())
}

/// 50 connections that send nothing (or half a request) do not stop other scrapes, and
/// are closed once the header deadline (10 s) passes.
#[test]
fn idle_and_slow_clients_do_not_block_scrapes() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let held = ns.run(|| -> Result<Vec<TcpStream>> {
        (0..50)
            .map(|i| {
                let mut s = TcpStream::connect_timeout(&agent_addr(), TIMEOUT)?;
                if i % 2 == 0 {
                    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")?;
                }
                Ok(s)
            })
            .collect()
    })??;
    let started = Instant::now();
    for _ in 0..5 {
        let (status, body) = agent.get("/metrics")?;
        assert_eq!(status, 200);
        assert!(body.contains("sockscope_build_info"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "5 scrapes took {:?} beside 50 idle connections",
        started.elapsed()
    );
    // The server hangs up on each idle one after the header deadline.
    for mut s in held {
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut buf = Vec::new();
        let n = s.read_to_end(&mut buf);
        assert!(
            n.is_ok()
                || n.as_ref()
                    .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
            "an idle connection stayed open: {n:?}"
        );
    }
    Ok(())
}

/// Garbage, huge headers, wrong methods and gzip: the agent answers each sensibly and
/// keeps serving; the gzip page decodes to the plain one.
#[test]
fn malformed_requests_methods_and_gzip() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let agent = AgentProcess::start(&ns, Path::new(AGENT), &[], agent_addr())?;
    let raw = |bytes: &[u8]| -> Result<Vec<u8>> {
        ns.run(|| -> Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&agent_addr(), TIMEOUT)?;
            s.set_read_timeout(Some(Duration::from_secs(15)))?;
            // The server may hang up before taking everything: that is an answer too.
            let _ = s.write_all(bytes);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            Ok(out)
        })?
    };
    let mut garbage = vec![0u8; 4096];
    for (i, b) in garbage.iter_mut().enumerate() {
        *b = (i * 7919 % 251) as u8;
    }
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("binary garbage", garbage, Some("400")),
        ("huge header", huge.into_bytes(), Some("431")),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            None,
        ),
        ("bad request line", b"GET\r\n\r\n".to_vec(), Some("400")),
        ("bare CRLFs", b"\r\n\r\n\r\n\r\n".to_vec(), None),
        (
            "bad content length",
            b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
            Some("400"),
        ),
    ];
    for (what, bytes, status) in cases {
        let answer = raw(&bytes)?;
        let text = String::from_utf8_lossy(&answer);
        if let Some(status) = status {
            assert!(
                text.starts_with(&format!("HTTP/1.1 {status}")),
                "{what}: {text}"
            );
        }
        assert!(
            !text.contains("sockscope_build_info"),
            "{what} got the page"
        );
    }

    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let r = WebClient {
            method: Some(method),
            ..WebClient::default()
        }
        .get(&ns, agent_addr(), "/metrics")?;
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method}");
    }
    let head = WebClient {
        method: Some("HEAD"),
        ..WebClient::default()
    }
    .get(&ns, agent_addr(), "/metrics")?;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    let plain = WebClient::default().get(&ns, agent_addr(), "/metrics")?;
    let gzipped = WebClient {
        headers: vec!["Accept-Encoding: gzip, deflate".to_owned()],
        ..WebClient::default()
    }
    .get(&ns, agent_addr(), "/metrics")?;
    assert_eq!(gzipped.status, 200);
    assert_eq!(gzipped.header("content-encoding"), Some("gzip"));
    assert_eq!(plain.header("content-encoding"), None);
    let mut decoded = String::new();
    flate2::read::GzDecoder::new(&gzipped.body[..]).read_to_string(&mut decoded)?;
    assert!(gzipped.body.len() < decoded.len() / 2);
    // Two scrapes differ in values (scrape counters, durations), not in their series.
    let series = |page: &str| -> Result<Vec<String>> {
        let parsed = testkit::Metrics::parse(page)?;
        let mut names: Vec<String> = parsed.samples().iter().map(|s| s.name.clone()).collect();
        names.sort();
        names.dedup();
        Ok(names)
    };
    assert_eq!(series(&decoded)?, series(&plain.text())?);

    // Alive and serving after all of it.
    let (status, _) = agent.get("/metrics")?;
    assert_eq!(status, 200);
    Ok(())
}

/// With one request allowed in flight, a second one while a slow bcrypt check runs gets
/// 503 at once instead of queueing.
#[test]
fn requests_beyond_the_cap_get_503_at_once() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = TempDir::new("web-cap")?;
    // Cost 15: seconds per check, long enough to overlap the second request.
    let hash = bcrypt::hash("pw", 15)?;
    let config = dir.write("web.yml", &format!("basic_auth_users:\n  u: '{hash}'\n"))?;
    let ns = Netns::new()?;
    let any = WebClient::default().with_auth("u", "wrong");
    let mut cmd = Command::new(AGENT);
    cmd.arg("--web.config.file")
        .arg(&config)
        .arg("--web.max-requests=1");
    // Healthy when it answers at all (401 without the right password).
    let _agent = AgentProcess::start_command_with_probe(&ns, cmd, agent_addr(), &|ns, a, _| {
        let r = WebClient::default().get(ns, a, "/healthz")?;
        Ok((if r.status == 401 { 200 } else { r.status }, r.text()))
    })?;
    std::thread::scope(|s| -> Result<()> {
        // The slow request may reach the agent while one of the quick ones below holds the
        // slot: then it is refused itself, and sent again (a bounded number of times).
        let slow = s.spawn(|| {
            for _ in 0..50 {
                let r = any.get(&ns, agent_addr(), "/metrics")?;
                if r.status != 503 {
                    return Ok(r);
                }
            }
            Err(anyhow!("the slow request never got the slot"))
        });
        // Ask until the slow request holds the only slot (no credentials: no bcrypt, 401
        // while the slot is free), as long as it runs.
        let mut refused = None;
        while !slow.is_finished() {
            let started = Instant::now();
            let r = WebClient::default().get(&ns, agent_addr(), "/healthz")?;
            if r.status == 503 {
                refused = Some((r, started.elapsed()));
                break;
            }
            assert_eq!(r.status, 401, "{}", r.text());
            std::thread::sleep(Duration::from_millis(20));
        }
        let first = slow.join().map_err(|_| anyhow!("panicked"))??;
        assert_eq!(first.status, 401);
        let (second, took) =
            refused.ok_or_else(|| anyhow!("no request was refused while the slot was held"))?;
        assert_eq!(second.header("retry-after"), Some("1"), "{}", second.text());
        assert!(took < Duration::from_secs(2), "the 503 took {took:?}");
        Ok(())
    })
}

/// `sockscope hash-password` prints a hash the agent's basic auth accepts.
#[test]
fn hash_password_prints_a_bcrypt_hash() -> Result<()> {
    use std::process::Stdio;
    let run = |input: &str| -> Result<std::process::Output> {
        let mut child = Command::new(AGENT)
            .args(["hash-password", "--cost", "4"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("no stdin"))?
            .write_all(input.as_bytes())?;
        Ok(child.wait_with_output()?)
    };
    let out = run("correct horse\n")?;
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout)?;
    let hash = hash.trim();
    assert!(hash.starts_with("$2b$04$"), "{hash}");
    assert!(bcrypt::verify("correct horse", hash)?);
    assert!(agent::web::parse(&format!("basic_auth_users:\n  u: '{hash}'\n")).is_ok());
    let empty = run("\n")?;
    assert_eq!(empty.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("no password"));
    Ok(())
}

/// `RequireAnyClientCert`: a certificate from any issuer is taken (the client still proves
/// it holds the key), none is refused; `VerifyClientCertIfGiven` takes no certificate but
/// refuses a foreign one.
#[test]
fn any_client_cert_and_verify_if_given() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = TempDir::new("web-anycert")?;
    let server_pki = Pki::new("server CA")?;
    let client_pki = Pki::new("client CA")?;
    let foreign_pki = Pki::new("foreign CA")?;
    server_files(&server_pki, &dir)?;
    dir.write("clients.crt", &client_pki.ca_pem)?;
    let bare = WebClient::tls(&server_pki)?;
    let foreign = WebClient {
        cert: Some(foreign_pki.leaf("anyone")?),
        ..bare.clone()
    };
    let known = WebClient {
        cert: Some(client_pki.leaf("prometheus")?),
        ..bare.clone()
    };

    let config = dir.write(
        "any.yml",
        &format!("{TLS}  client_auth_type: RequireAnyClientCert\n"),
    )?;
    let ns = Netns::new()?;
    let agent = start(&ns, &config, &foreign, &[], agent_addr())?;
    assert_eq!(foreign.get(&ns, agent_addr(), "/metrics")?.status, 200);
    assert!(bare.get(&ns, agent_addr(), "/metrics").is_err());
    drop(agent);

    let config = dir.write(
        "if-given.yml",
        &format!(
            "{TLS}  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: clients.crt\n"
        ),
    )?;
    let ns = Netns::new()?;
    let _agent = start(&ns, &config, &bare, &[], agent_addr())?;
    assert_eq!(bare.get(&ns, agent_addr(), "/metrics")?.status, 200);
    assert_eq!(known.get(&ns, agent_addr(), "/metrics")?.status, 200);
    assert!(foreign.get(&ns, agent_addr(), "/metrics").is_err());
    Ok(())
}

/// With `--web.max-connections 5`, five idle connections fill the server: a sixth is
/// closed at once (no queueing), and once they go, scrapes are served again.
#[test]
fn connections_beyond_the_cap_are_closed_at_once() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new()?;
    let agent = AgentProcess::start(
        &ns,
        Path::new(AGENT),
        &["--web.max-connections=5"],
        agent_addr(),
    )?;
    // The health checks of the start-up may still hold their slots for a moment.
    std::thread::sleep(Duration::from_millis(200));
    let held = ns.run(|| -> Result<Vec<TcpStream>> {
        (0..5)
            .map(|_| Ok(TcpStream::connect_timeout(&agent_addr(), TIMEOUT)?))
            .collect()
    })??;
    let refused = ns.run(|| -> Result<(usize, Duration)> {
        let started = Instant::now();
        let mut s = TcpStream::connect_timeout(&agent_addr(), TIMEOUT)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = Vec::new();
        let n = match s.read_to_end(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(e.into()),
        };
        Ok((n, started.elapsed()))
    })??;
    assert_eq!(refused.0, 0, "the sixth connection was served");
    assert!(
        refused.1 < Duration::from_secs(2),
        "closing took {:?}",
        refused.1
    );
    drop(held);
    wait_until(TIMEOUT, Duration::from_millis(50), || {
        Ok(agent.get("/metrics").is_ok_and(|(status, _)| status == 200))
    })?;
    Ok(())
}
