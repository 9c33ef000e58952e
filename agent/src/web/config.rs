//! `--web.config.file`: the Prometheus exporter-toolkit format (YAML), parsed strictly.
//!
//! [`parse`] is pure (no file is read): it checks everything that can be checked from the
//! text alone, so that the fuzz target and the unit tests exercise exactly what the agent
//! runs. Reading the certificate files is [`super::state`]'s job.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// TLS; plain HTTP when absent.
    #[serde(default)]
    pub tls_server_config: Option<TlsServerConfig>,
    /// Response headers and HTTP options.
    #[serde(default)]
    pub http_server_config: HttpServerConfig,
    /// User name to bcrypt hash; no authentication when empty.
    #[serde(default)]
    pub basic_auth_users: BTreeMap<String, String>,
}

/// `tls_server_config`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsServerConfig {
    /// PEM certificate chain, inline.
    #[serde(default)]
    pub cert: Option<String>,
    /// PEM private key, inline.
    #[serde(default)]
    pub key: Option<String>,
    /// PEM CA certificates for client certificates, inline.
    #[serde(default)]
    pub client_ca: Option<String>,
    /// Certificate chain file (PEM); relative to the config file's directory.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Private key file (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Whether and how clients present certificates.
    #[serde(default)]
    pub client_auth_type: ClientAuthType,
    /// CA certificates (PEM) that sign accepted client certificates.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Lowest TLS version accepted.
    #[serde(default = "TlsVersion::tls12")]
    pub min_version: TlsVersion,
    /// Highest TLS version accepted.
    #[serde(default = "TlsVersion::tls13")]
    pub max_version: TlsVersion,
    /// TLS 1.2 cipher suites by their Go names, in preference order; TLS 1.3's are fixed.
    #[serde(default)]
    pub cipher_suites: Vec<String>,
    /// Whether the server's order of `cipher_suites` wins over the client's.
    #[serde(default = "yes")]
    pub prefer_server_cipher_suites: bool,
    /// Key exchange groups by their Go names, in preference order.
    #[serde(default)]
    pub curve_preferences: Vec<String>,
    /// A client certificate is accepted only if one of its subject alternative names (DNS
    /// name, e-mail address, IP address or URI, as text) equals one of these.
    #[serde(default)]
    pub client_allowed_sans: Option<Vec<String>>,
}

fn yes() -> bool {
    true
}

/// `client_auth_type`, Go's `tls.ClientAuthType` names.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum ClientAuthType {
    /// No client certificate is asked for.
    #[default]
    NoClientCert,
    /// Asked for, not required, not verified.
    RequestClientCert,
    /// Required, not verified.
    RequireAnyClientCert,
    /// Not required; verified against the client CA when given.
    VerifyClientCertIfGiven,
    /// Required and verified against the client CA.
    RequireAndVerifyClientCert,
}

impl ClientAuthType {
    /// Whether a client CA is needed to verify certificates.
    pub fn verifies(self) -> bool {
        matches!(
            self,
            Self::VerifyClientCertIfGiven | Self::RequireAndVerifyClientCert
        )
    }
}

/// `min_version` / `max_version`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.0: refused with an explanation (not offered by the TLS library).
    TLS10,
    /// TLS 1.1: refused likewise.
    TLS11,
    /// TLS 1.2.
    TLS12,
    /// TLS 1.3.
    TLS13,
}

impl TlsVersion {
    fn tls12() -> Self {
        Self::TLS12
    }
    fn tls13() -> Self {
        Self::TLS13
    }
}

/// `http_server_config`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpServerConfig {
    /// Whether HTTP/2 is offered to TLS clients (ALPN `h2`); default true, as in other
    /// Prometheus exporters. Plain HTTP is always HTTP/1.1.
    #[serde(default)]
    pub http2: Option<bool>,
    /// Extra response headers.
    #[serde(default)]
    pub headers: Headers,
}

/// The response headers exporter-toolkit allows.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Headers {
    /// `Content-Security-Policy`.
    #[serde(rename = "Content-Security-Policy", default)]
    pub content_security_policy: Option<String>,
    /// `X-Frame-Options`: deny or sameorigin.
    #[serde(rename = "X-Frame-Options", default)]
    pub x_frame_options: Option<String>,
    /// `X-Content-Type-Options`: nosniff.
    #[serde(rename = "X-Content-Type-Options", default)]
    pub x_content_type_options: Option<String>,
    /// `X-XSS-Protection`.
    #[serde(rename = "X-XSS-Protection", default)]
    pub x_xss_protection: Option<String>,
    /// `Strict-Transport-Security`.
    #[serde(rename = "Strict-Transport-Security", default)]
    pub strict_transport_security: Option<String>,
}

impl Headers {
    /// The headers to send: name and value, blank ones left out.
    pub fn pairs(&self) -> Vec<(&'static str, &str)> {
        [
            ("Content-Security-Policy", &self.content_security_policy),
            ("X-Frame-Options", &self.x_frame_options),
            ("X-Content-Type-Options", &self.x_content_type_options),
            ("X-XSS-Protection", &self.x_xss_protection),
            ("Strict-Transport-Security", &self.strict_transport_security),
        ]
        .into_iter()
        .filter_map(|(name, value)| {
            value
                .as_deref()
                .filter(|v| !v.is_empty())
                .map(|v| (name, v))
        })
        .collect()
    }
}

/// Why a web configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(message.into()))
}

/// TLS 1.2 cipher suites by Go's names (and the IANA names rustls uses), as rustls knows them.
pub const CIPHER_SUITES: &[(&str, rustls::CipherSuite)] = &[
    (
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

/// Key exchange groups by Go's `tls.CurveID` names.
pub const CURVES: &[(&str, rustls::NamedGroup)] = &[
    ("X25519", rustls::NamedGroup::X25519),
    ("CurveP256", rustls::NamedGroup::secp256r1),
    ("CurveP384", rustls::NamedGroup::secp384r1),
];

/// Parses and checks a web configuration. Empty text (or only comments) means plain HTTP
/// without authentication. File paths are returned as written.
pub fn parse(text: &str) -> Result<WebConfig, ConfigError> {
    let config: Option<WebConfig> =
        serde_yaml_ng::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
    let config = config.unwrap_or_default();
    if let Some(tls) = &config.tls_server_config {
        check_tls(tls)?;
    }
    check_headers(&config.http_server_config.headers)?;
    for (user, hash) in &config.basic_auth_users {
        if user.is_empty() {
            return err("basic_auth_users: a user name is empty");
        }
        if user.contains(':') {
            return err(format!(
                "basic_auth_users: user {user:?} contains `:`, which basic auth cannot carry"
            ));
        }
        if hash.parse::<bcrypt::HashParts>().is_err() {
            return err(format!(
                "basic_auth_users: the password of {user:?} is not a bcrypt hash \
                 (make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"
            ));
        }
    }
    Ok(config)
}

fn check_tls(tls: &TlsServerConfig) -> Result<(), ConfigError> {
    let cert = one_of(&tls.cert, &tls.cert_file, "cert", "cert_file")?;
    let key = one_of(&tls.key, &tls.key_file, "key", "key_file")?;
    match (cert, key) {
        (true, true) => {}
        (false, _) => return err("tls_server_config: cert_file (or cert) is required"),
        (_, false) => return err("tls_server_config: key_file (or key) is required"),
    }
    let has_ca = one_of(
        &tls.client_ca,
        &tls.client_ca_file,
        "client_ca",
        "client_ca_file",
    )?;
    if tls.client_auth_type.verifies() && !has_ca {
        return err(format!(
            "tls_server_config: client_auth_type {:?} needs client_ca_file to verify certificates with",
            tls.client_auth_type
        ));
    }
    if has_ca && tls.client_auth_type == ClientAuthType::NoClientCert {
        return err(
            "tls_server_config: client_ca_file is set but client_auth_type is NoClientCert; \
             set client_auth_type: RequireAndVerifyClientCert",
        );
    }
    match &tls.client_allowed_sans {
        Some(sans) if sans.is_empty() => {
            return err(
                "tls_server_config: client_allowed_sans is empty, so no client could connect; \
                 list the allowed names or leave it out",
            );
        }
        // Unverified certificates (RequestClientCert, RequireAnyClientCert) can name any
        // SAN their maker likes: matching them would protect nothing.
        Some(_) if !tls.client_auth_type.verifies() => {
            return err(format!(
                "tls_server_config: client_allowed_sans needs verified client certificates, \
                 not client_auth_type {:?}; set client_auth_type: RequireAndVerifyClientCert \
                 and client_ca_file",
                tls.client_auth_type
            ));
        }
        _ => {}
    }
    for (name, version) in [
        ("min_version", tls.min_version),
        ("max_version", tls.max_version),
    ] {
        if version < TlsVersion::TLS12 {
            return err(format!(
                "tls_server_config: {name} {version:?} is not offered; use TLS12 or TLS13"
            ));
        }
    }
    if tls.min_version > tls.max_version {
        return err(format!(
            "tls_server_config: min_version {:?} is above max_version {:?}",
            tls.min_version, tls.max_version
        ));
    }
    for name in &tls.cipher_suites {
        if !CIPHER_SUITES.iter().any(|(n, _)| n == name) {
            return err(format!(
                "tls_server_config: unknown cipher suite {name:?}; known: {}",
                CIPHER_SUITES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if !tls.cipher_suites.is_empty() && tls.min_version == TlsVersion::TLS13 {
        return err(
            "tls_server_config: cipher_suites apply to TLS 1.2 only, but min_version is TLS13",
        );
    }
    for name in &tls.curve_preferences {
        if !CURVES.iter().any(|(n, _)| n == name) {
            return err(format!(
                "tls_server_config: unsupported curve {name:?}; supported: X25519, CurveP256, CurveP384"
            ));
        }
    }
    Ok(())
}

/// Whether one of an inline value and a file is set; an error when both are.
fn one_of<A, B>(
    inline: &Option<A>,
    file: &Option<B>,
    inline_name: &str,
    file_name: &str,
) -> Result<bool, ConfigError> {
    match (inline.is_some(), file.is_some()) {
        (true, true) => err(format!(
            "tls_server_config: set {file_name} or {inline_name}, not both"
        )),
        (a, b) => Ok(a || b),
    }
}

fn check_headers(headers: &Headers) -> Result<(), ConfigError> {
    if let Some(v) = headers.x_frame_options.as_deref().filter(|v| !v.is_empty())
        && !["deny", "sameorigin"].contains(&v.to_ascii_lowercase().as_str())
    {
        return err(format!(
            "http_server_config.headers: X-Frame-Options {v:?} is not one of deny, sameorigin"
        ));
    }
    if let Some(v) = headers
        .x_content_type_options
        .as_deref()
        .filter(|v| !v.is_empty())
        && !v.eq_ignore_ascii_case("nosniff")
    {
        return err(format!(
            "http_server_config.headers: X-Content-Type-Options {v:?} is not nosniff"
        ));
    }
    for (name, value) in headers.pairs() {
        if hyper::header::HeaderValue::from_str(value).is_err() {
            return err(format!(
                "http_server_config.headers: the value of {name} is not a valid header value"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7zG";

    #[test]
    fn empty_means_plain_http() {
        assert_eq!(parse(""), Ok(WebConfig::default()));
        assert_eq!(parse("# nothing\n"), Ok(WebConfig::default()));
        assert_eq!(parse("{}"), Ok(WebConfig::default()));
    }

    #[test]
    fn full_file() {
        let config = parse(&format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
             client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  \
             min_version: TLS13\n  curve_preferences: [X25519]\n\
             http_server_config:\n  http2: false\n  headers:\n    X-Frame-Options: deny\n\
             basic_auth_users:\n  prometheus: '{HASH}'\n"
        ))
        .expect("valid");
        let tls = config.tls_server_config.expect("tls");
        assert_eq!(tls.cert_file, Some(PathBuf::from("server.crt")));
        assert_eq!(
            tls.client_auth_type,
            ClientAuthType::RequireAndVerifyClientCert
        );
        assert_eq!(tls.min_version, TlsVersion::TLS13);
        assert_eq!(tls.max_version, TlsVersion::TLS13);
        assert_eq!(
            config.http_server_config.headers.pairs(),
            vec![("X-Frame-Options", "deny")]
        );
        assert_eq!(config.basic_auth_users["prometheus"], HASH);
    }

    #[test]
    fn refusals_say_why() {
        let cases = [
            ("tls_server_config:\n  cert_file: a\n", "key_file"),
            ("tls_server_config:\n  key_file: a\n", "cert_file"),
            ("bogus: 1\n", "unknown field `bogus`"),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  certfile: c\n",
                "unknown field `certfile`",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Maybe\n",
                "unknown variant `Maybe`",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n",
                "needs client_ca_file",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n",
                "NoClientCert",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS10\n",
                "TLS12 or TLS13",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS13\n  max_version: TLS12\n",
                "above max_version",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
                "unknown cipher suite",
            ),
            (
                "tls_server_config:\n  cert: x\n  cert_file: a\n  key_file: b\n",
                "not both",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: c\n  client_allowed_sans: []\n",
                "client_allowed_sans is empty",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_allowed_sans: [prometheus]\n",
                "client_allowed_sans needs verified client certificates, not client_auth_type NoClientCert",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAnyClientCert\n  client_allowed_sans: [prometheus]\n",
                "not client_auth_type RequireAnyClientCert",
            ),
            ("basic_auth_users:\n  u: plaintext\n", "not a bcrypt hash"),
            (
                "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
                "X-Frame-Options",
            ),
            (
                "http_server_config:\n  headers:\n    X-Powered-By: me\n",
                "unknown field `X-Powered-By`",
            ),
            ("- a\n- b\n", "expected struct WebConfig"),
        ];
        for (text, expected) in cases {
            let e = parse(text).expect_err(text);
            assert!(e.0.contains(expected), "{text:?}: {e}");
        }
    }

    /// The README's example is a valid file.
    #[test]
    fn readme_example_parses() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("### Web configuration").expect("section")..];
        let start = section.find("```yaml\n").expect("yaml block") + "```yaml\n".len();
        let end = start + section[start..].find("```").expect("block end");
        let config = parse(&section[start..end]).expect("the README example parses");
        assert!(config.tls_server_config.is_some());
        let hash = &config.basic_auth_users["prometheus"];
        assert_eq!(
            bcrypt::verify("correct horse battery staple", hash).ok(),
            Some(true)
        );
    }

    #[test]
    fn known_cipher_suites_are_offered_by_rustls() {
        let provider = rustls::crypto::ring::default_provider();
        for (name, suite) in CIPHER_SUITES {
            assert!(
                provider.cipher_suites.iter().any(|s| s.suite() == *suite),
                "{name}"
            );
        }
    }
}
