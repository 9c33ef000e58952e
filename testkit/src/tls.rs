//! An HTTP/1.1 client for the agent's web endpoint with TLS (rustls), client certificates
//! and basic auth, and throwaway certificate authorities (rcgen) to test it with.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned, SupportedProtocolVersion,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};

use crate::Netns;

/// Connect, read and write timeout of [`WebClient::get`].
const TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate authority made for one test.
pub struct Pki {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// A new CA named `name` (its common name).
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            ca_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A leaf certificate for 127.0.0.1 (server or client): (cert PEM, key PEM).
    pub fn leaf(&self, name: &str) -> Result<(String, String)> {
        self.leaf_with(
            name,
            vec![
                SanType::DnsName("localhost".try_into()?),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ],
        )
    }

    /// A leaf certificate with these subject alternative names: (cert PEM, key PEM).
    pub fn leaf_with(&self, name: &str, sans: Vec<SanType>) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, name);
        Ok((
            params.signed_by(&key, &self.issuer)?.pem(),
            key.serialize_pem(),
        ))
    }

    /// A root store holding this CA.
    pub fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes())?)?;
        Ok(roots)
    }
}

/// How a test client talks to the agent.
#[derive(Clone, Debug, Default)]
pub struct WebClient {
    /// TLS with these roots; plain HTTP when None.
    pub roots: Option<RootCertStore>,
    /// Client certificate and key (PEM).
    pub cert: Option<(String, String)>,
    /// TLS versions offered; both when None.
    pub versions: Option<&'static [&'static SupportedProtocolVersion]>,
    /// Basic auth user and password.
    pub auth: Option<(String, String)>,
    /// Extra request header lines.
    pub headers: Vec<String>,
    /// The request method; GET when None.
    pub method: Option<&'static str>,
}

/// A response: status, head (status line and headers) and the body as sent.
#[derive(Debug)]
pub struct WebResponse {
    /// Status code.
    pub status: u16,
    /// Status line and header lines.
    pub head: String,
    /// The body, not decoded (gzip stays gzip).
    pub body: Vec<u8>,
}

impl WebResponse {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl WebClient {
    /// TLS trusting `pki`'s CA.
    pub fn tls(pki: &Pki) -> Result<Self> {
        Ok(Self {
            roots: Some(pki.roots()?),
            ..Self::default()
        })
    }

    /// With basic auth.
    pub fn with_auth(mut self, user: &str, password: &str) -> Self {
        self.auth = Some((user.to_owned(), password.to_owned()));
        self
    }

    fn config(&self) -> Result<Option<Arc<ClientConfig>>> {
        let Some(roots) = &self.roots else {
            return Ok(None);
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(self.versions.unwrap_or(rustls::ALL_VERSIONS))?
            .with_root_certificates(roots.clone());
        let config = match &self.cert {
            Some((cert, key)) => builder.with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes())?],
                PrivateKeyDer::from_pem_slice(key.as_bytes())?,
            )?,
            None => builder.with_no_client_auth(),
        };
        Ok(Some(Arc::new(config)))
    }

    /// One request on a new connection, inside `ns`.
    pub fn get(&self, ns: &Netns, addr: SocketAddr, path: &str) -> Result<WebResponse> {
        let config = self.config()?;
        let mut request = format!(
            "{} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n",
            self.method.unwrap_or("GET")
        );
        if let Some((user, password)) = &self.auth {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            request.push_str(&format!("Authorization: Basic {token}\r\n"));
        }
        for line in &self.headers {
            request.push_str(line);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        ns.run(|| -> Result<WebResponse> {
            let tcp = TcpStream::connect_timeout(&addr, TIMEOUT).context("connect")?;
            tcp.set_read_timeout(Some(TIMEOUT))?;
            tcp.set_write_timeout(Some(TIMEOUT))?;
            let raw = match config {
                Some(config) => {
                    let conn = ClientConnection::new(config, ServerName::from(addr.ip()))?;
                    exchange(StreamOwned::new(conn, tcp), &request)?
                }
                None => exchange(tcp, &request)?,
            };
            parse(&raw)
        })?
    }
}

/// Sends the request and reads to the end (a TLS peer that closes without close_notify
/// ends the response too).
fn exchange(mut stream: impl Read + Write, request: &str) -> Result<Vec<u8>> {
    stream.write_all(request.as_bytes()).context("send")?;
    stream.flush()?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => Ok(raw),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(raw),
        Err(e) => Err(e).context("read the response"),
    }
}

fn parse(raw: &[u8]) -> Result<WebResponse> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no complete response head in {} bytes", raw.len()))?;
    let head = String::from_utf8(raw[..end].to_vec())?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
    let mut response = WebResponse {
        status,
        head,
        body: raw[end + 4..].to_vec(),
    };
    if let Some(len) = response.header("content-length") {
        let len: usize = len.parse()?;
        if response.body.len() < len {
            bail!("body truncated: {} of {len}", response.body.len());
        }
        response.body.truncate(len);
    }
    Ok(response)
}
