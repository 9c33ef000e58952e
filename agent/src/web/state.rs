//! The web configuration in force, reloaded when the file or a file it names changes.
//!
//! Every new connection (and every request) asks [`WebState::current`], which compares the
//! files' modification stamps with those of the configuration in force: a rotated
//! certificate or an edited file is picked up at the next connection, without a signal. An
//! invalid change is logged once and the last good configuration stays in force.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use hyper::header::{HeaderName, HeaderValue};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject as _},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use tokio_rustls::TlsAcceptor;

use super::{
    auth::BasicAuth,
    config::{self, ClientAuthType, TlsServerConfig, TlsVersion, WebConfig},
};

/// What the server applies to a connection or request.
pub struct Active {
    /// TLS; None for plain HTTP.
    pub tls: Option<TlsAcceptor>,
    /// Basic authentication; None when no users are configured.
    pub auth: Option<BasicAuth>,
    /// Extra response headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The files this configuration was read from (the config file first).
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for Active {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Active")
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth.is_some())
            .field("headers", &self.headers)
            .field("files", &self.files)
            .finish()
    }
}

/// A file's identity and version: changes when it is rewritten or replaced.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// The web configuration of the server: fixed (plain HTTP) or from a file.
#[derive(Debug)]
pub struct WebState {
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    active: Arc<Active>,
    /// Stamps of `active.files` when they were read.
    stamps: Vec<Stamp>,
    /// Stamps of a version that failed to load, so it is reported once.
    failed: Option<Vec<Stamp>>,
}

impl WebState {
    /// Plain HTTP, no authentication (no `--web.config.file`).
    pub fn plain() -> Self {
        Self {
            path: None,
            inner: Mutex::new(Inner {
                active: Arc::new(Active {
                    tls: None,
                    auth: None,
                    headers: Vec::new(),
                    files: Vec::new(),
                }),
                stamps: Vec::new(),
                failed: None,
            }),
        }
    }

    /// Reads `path` and everything it names; the error names the file and the problem.
    pub fn load(path: &Path) -> Result<Self, String> {
        let (active, stamps) = load_active(path)?;
        Ok(Self {
            path: Some(path.to_owned()),
            inner: Mutex::new(Inner {
                active: Arc::new(active),
                stamps,
                failed: None,
            }),
        })
    }

    /// Whether TLS is on now.
    pub fn is_tls(&self) -> bool {
        self.current().tls.is_some()
    }

    /// The configuration in force, reloaded first if one of its files changed.
    pub fn current(&self) -> Arc<Active> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(path) = &self.path else {
            return Arc::clone(&inner.active);
        };
        let now: Vec<Stamp> = inner.active.files.iter().map(|f| stamp(f)).collect();
        if now == inner.stamps || inner.failed.as_ref() == Some(&now) {
            return Arc::clone(&inner.active);
        }
        match load_active(path) {
            Ok((active, stamps)) => {
                tracing::info!(file = %path.display(), "web configuration reloaded");
                inner.active = Arc::new(active);
                inner.stamps = stamps;
                inner.failed = None;
            }
            Err(e) => {
                tracing::warn!("{e}; keeping the last good web configuration");
                inner.failed = Some(now);
            }
        }
        Arc::clone(&inner.active)
    }
}

/// Reads the config file and the files it names; stamps are taken before reading, so that a
/// change during the read is seen at the next check.
fn load_active(path: &Path) -> Result<(Active, Vec<Stamp>), String> {
    let name = path.display();
    let config_stamp = stamp(path);
    let text = fs::read_to_string(path).map_err(|e| format!("web config {name}: {e}"))?;
    let config = config::parse(&text).map_err(|e| format!("web config {name}: {e}"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files = vec![path.to_owned()];
    let mut stamps = vec![config_stamp];
    if let Some(tls) = &config.tls_server_config {
        for file in [&tls.cert_file, &tls.key_file, &tls.client_ca_file]
            .into_iter()
            .flatten()
        {
            let file = dir.join(file);
            stamps.push(stamp(&file));
            files.push(file);
        }
    }
    let active = build(&config, dir).map_err(|e| format!("web config {name}: {e}"))?;
    Ok((Active { files, ..active }, stamps))
}

/// Builds what the server applies from a parsed configuration, reading the files it names
/// (relative paths are relative to `dir`, the config file's directory).
pub fn build(config: &WebConfig, dir: &Path) -> Result<Active, String> {
    let tls = config
        .tls_server_config
        .as_ref()
        .map(|tls| {
            server_config(tls, dir, config.http_server_config.http2.unwrap_or(true))
                .map(|c| TlsAcceptor::from(Arc::new(c)))
        })
        .transpose()?;
    let headers = config
        .http_server_config
        .headers
        .pairs()
        .into_iter()
        .map(|(name, value)| {
            Ok((
                HeaderName::from_static(name_lower(name)),
                HeaderValue::from_str(value).map_err(|e| format!("header {name}: {e}"))?,
            ))
        })
        .collect::<Result<_, String>>()?;
    Ok(Active {
        tls,
        auth: BasicAuth::new(config.basic_auth_users.clone()),
        headers,
        files: Vec::new(),
    })
}

fn name_lower(name: &'static str) -> &'static str {
    match name {
        "Content-Security-Policy" => "content-security-policy",
        "X-Frame-Options" => "x-frame-options",
        "X-Content-Type-Options" => "x-content-type-options",
        "X-XSS-Protection" => "x-xss-protection",
        _ => "strict-transport-security",
    }
}

fn server_config(tls: &TlsServerConfig, dir: &Path, http2: bool) -> Result<ServerConfig, String> {
    let provider = Arc::new(provider(tls));
    let versions: Vec<&'static SupportedProtocolVersion> = [
        (TlsVersion::TLS12, &rustls::version::TLS12),
        (TlsVersion::TLS13, &rustls::version::TLS13),
    ]
    .into_iter()
    .filter(|(v, _)| (tls.min_version..=tls.max_version).contains(v))
    .map(|(_, p)| p)
    .collect();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS: {e}"))?;
    let client_ca = || -> Result<Arc<RootCertStore>, String> {
        let certs = match (&tls.client_ca, &tls.client_ca_file) {
            (Some(pem), _) => certs_from_pem(pem.as_bytes(), "client_ca")?,
            (None, Some(file)) => certs_from_file(&dir.join(file))?,
            (None, None) => return Err("client_ca_file is missing".into()),
        };
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("client CA certificate: {e}"))?;
        }
        Ok(Arc::new(roots))
    };
    let verifier: Option<Arc<dyn ClientCertVerifier>> = match tls.client_auth_type {
        ClientAuthType::NoClientCert => None,
        ClientAuthType::RequestClientCert | ClientAuthType::RequireAnyClientCert => {
            Some(Arc::new(AnyClientCert {
                mandatory: tls.client_auth_type == ClientAuthType::RequireAnyClientCert,
                provider: Arc::clone(&provider),
            }))
        }
        ClientAuthType::VerifyClientCertIfGiven => Some(
            WebPkiClientVerifier::builder_with_provider(client_ca()?, Arc::clone(&provider))
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("client CA: {e}"))?,
        ),
        ClientAuthType::RequireAndVerifyClientCert => Some(
            WebPkiClientVerifier::builder_with_provider(client_ca()?, Arc::clone(&provider))
                .build()
                .map_err(|e| format!("client CA: {e}"))?,
        ),
    };
    let verifier = match (verifier, &tls.client_allowed_sans) {
        (Some(inner), Some(allowed)) => Some(Arc::new(AllowedSans {
            inner,
            allowed: allowed.clone(),
        }) as Arc<dyn ClientCertVerifier>),
        (verifier, _) => verifier,
    };
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let certs = match (&tls.cert, &tls.cert_file) {
        (Some(pem), _) => certs_from_pem(pem.as_bytes(), "cert")?,
        (None, Some(file)) => certs_from_file(&dir.join(file))?,
        (None, None) => return Err("cert_file is missing".into()),
    };
    let key = match (&tls.key, &tls.key_file) {
        (Some(pem), _) => {
            PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("key: {e}"))?
        }
        (None, Some(file)) => {
            let file = dir.join(file);
            PrivateKeyDer::from_pem_file(&file).map_err(|e| format!("{}: {e}", file.display()))?
        }
        (None, None) => return Err("key_file is missing".into()),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.ignore_client_order = tls.prefer_server_cipher_suites;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(config)
}

/// ring's provider, narrowed to the configured TLS 1.2 suites and curves.
fn provider(tls: &TlsServerConfig) -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    if !tls.cipher_suites.is_empty() {
        let all = std::mem::take(&mut provider.cipher_suites);
        provider.cipher_suites = all
            .iter()
            .filter(|s| s.tls13().is_some())
            .copied()
            .collect();
        for name in &tls.cipher_suites {
            let wanted = config::CIPHER_SUITES
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| *s);
            if let Some(suite) = all.iter().find(|s| Some(s.suite()) == wanted)
                && !provider.cipher_suites.contains(suite)
            {
                provider.cipher_suites.push(*suite);
            }
        }
    }
    if !tls.curve_preferences.is_empty() {
        let all = std::mem::take(&mut provider.kx_groups);
        for name in &tls.curve_preferences {
            let wanted = config::CURVES
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, g)| *g);
            if let Some(group) = all.iter().find(|g| Some(g.name()) == wanted) {
                provider.kx_groups.push(*group);
            }
        }
    }
    provider
}

fn certs_from_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    certs_from_pem(&bytes, &path.display().to_string())
}

fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no PEM certificate found"));
    }
    Ok(certs)
}

/// `RequestClientCert` and `RequireAnyClientCert`: any certificate is taken as it is (the
/// handshake signature is still checked, so the client holds its key).
#[derive(Debug)]
struct AnyClientCert {
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `client_allowed_sans`: the inner verifier's checks, then one of the certificate's subject
/// alternative names must equal an allowed one. A certificate is then always required.
#[derive(Debug)]
struct AllowedSans {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

/// A certificate's subject alternative names as text: DNS names, e-mail addresses, IP
/// addresses (an IPv4-mapped IPv6 one in its IPv4 form) and URIs (scheme in lower case).
fn subject_alt_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer as _};
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref())
        .map_err(|e| format!("client certificate: {e}"))?;
    let Some(sans) = cert
        .subject_alternative_name()
        .map_err(|e| format!("client certificate's subject alternative names: {e}"))?
    else {
        return Ok(Vec::new());
    };
    Ok(sans
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(s) | GeneralName::RFC822Name(s) => Some((*s).to_owned()),
            // The scheme in lower case, as other exporters' Go (`url.URL.String()`) writes it.
            GeneralName::URI(s) => Some(match s.split_once(':') {
                Some((scheme, rest)) => format!("{}:{rest}", scheme.to_ascii_lowercase()),
                None => (*s).to_owned(),
            }),
            GeneralName::IPAddress(bytes) => match *bytes {
                [a, b, c, d] => Some(std::net::Ipv4Addr::new(*a, *b, *c, *d).to_string()),
                _ => <[u8; 16]>::try_from(*bytes).ok().map(|v6| {
                    let v6 = std::net::Ipv6Addr::from(v6);
                    v6.to_ipv4_mapped()
                        .map_or_else(|| v6.to_string(), |v4| v4.to_string())
                }),
            },
            _ => None,
        })
        .collect())
}

impl ClientCertVerifier for AllowedSans {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let names = subject_alt_names(end_entity).map_err(rustls::Error::General)?;
        if names.iter().any(|n| self.allowed.contains(n)) {
            Ok(verified)
        } else {
            tracing::warn!(
                names = ?names,
                "refused a client certificate: none of its subject alternative names is in \
                 client_allowed_sans"
            );
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let path =
            std::env::temp_dir().join(format!("sockscope-web-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("temp dir");
        Dir(path)
    }

    fn write(dir: &Path, name: &str, text: &str) {
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).expect("write");
        fs::rename(&tmp, dir.join(name)).expect("rename");
    }

    #[test]
    fn subject_alt_names_are_read_as_text_of_every_kind() {
        use rcgen::SanType;
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["scraper.example".to_owned()]).expect("params");
        params.subject_alt_names.extend([
            SanType::Rfc822Name("ops@example.org".try_into().expect("e-mail")),
            SanType::URI("SPIFFE://example.org/prometheus".try_into().expect("uri")),
            SanType::IpAddress([192, 0, 2, 7].into()),
            SanType::IpAddress("2001:db8::1".parse::<std::net::IpAddr>().expect("v6")),
            SanType::IpAddress(
                "::ffff:198.51.100.9"
                    .parse::<std::net::IpAddr>()
                    .expect("v6"),
            ),
        ]);
        let cert = params.self_signed(&key).expect("cert");
        let names = subject_alt_names(cert.der()).expect("parsed");
        assert_eq!(
            names,
            [
                "scraper.example",
                "ops@example.org",
                "spiffe://example.org/prometheus",
                "192.0.2.7",
                "2001:db8::1",
                "198.51.100.9",
            ]
        );
        let bare = rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert!(subject_alt_names(bare.der()).expect("parsed").is_empty());
        assert!(subject_alt_names(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }

    fn self_signed(dir: &Path) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        write(dir, "server.crt", &cert.pem());
        write(dir, "server.key", &key.serialize_pem());
    }

    #[test]
    fn reloads_on_change_and_keeps_the_last_good_config() {
        let d = dir("reload");
        self_signed(&d.0);
        let config = d.0.join("web.yml");
        write(
            &d.0,
            "web.yml",
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n",
        );
        let state = WebState::load(&config).expect("valid");
        let first = state.current();
        assert!(first.tls.is_some() && first.auth.is_none());
        assert!(
            Arc::ptr_eq(&first, &state.current()),
            "unchanged: same config"
        );

        self_signed(&d.0);
        let rotated = state.current();
        assert!(
            !Arc::ptr_eq(&first, &rotated),
            "a new certificate is a new config"
        );

        write(
            &d.0,
            "web.yml",
            "tls_server_config: {cert_file: server.crt}\n",
        );
        assert!(
            Arc::ptr_eq(&rotated, &state.current()),
            "invalid: the last good stays"
        );
        assert!(state.current().tls.is_some());

        let hash = bcrypt::hash("pw", 4).expect("hash");
        write(
            &d.0,
            "web.yml",
            &format!("basic_auth_users:\n  u: '{hash}'\n"),
        );
        let plain = state.current();
        assert!(plain.tls.is_none() && plain.auth.is_some());

        fs::remove_file(&config).expect("remove");
        assert!(
            Arc::ptr_eq(&plain, &state.current()),
            "a vanished file keeps the config"
        );
    }

    #[test]
    fn load_errors_name_the_file() {
        let d = dir("errors");
        let config = d.0.join("web.yml");
        write(
            &d.0,
            "web.yml",
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n",
        );
        let e = WebState::load(&config).expect_err("no certificate files");
        assert!(
            e.contains(&config.display().to_string()) && e.contains("server.crt"),
            "{e}"
        );
        write(&d.0, "server.crt", "not PEM\n");
        write(&d.0, "server.key", "not PEM\n");
        let e = WebState::load(&config).expect_err("not PEM");
        assert!(e.contains("no PEM certificate"), "{e}");
        self_signed(&d.0);
        let other = d.0.join("other");
        fs::create_dir_all(&other).expect("dir");
        self_signed(&other);
        fs::rename(other.join("server.key"), d.0.join("server.key")).expect("swap key");
        let e = WebState::load(&config).expect_err("key of another certificate");
        assert!(e.contains("certificate and key"), "{e}");
    }
}
