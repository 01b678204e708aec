//! Test certificates, made at run time: a CA, server certificates it signs for loopback names,
//! client certificates for mutual TLS, written as PEM files; and a TLS client that reports the
//! certificate a server presented.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};

/// A certificate authority that signs test certificates.
#[derive(Debug)]
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct PemFiles {
    /// The certificate (chain) file.
    pub cert: PathBuf,
    /// The private key file.
    pub key: PathBuf,
    /// The leaf certificate, DER: what a client sees.
    pub der: Vec<u8>,
}

impl TestCa {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(TestCa { issuer })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `dir/<file>` and returns its path.
    pub fn write(&self, dir: &Path, file: &str) -> anyhow::Result<PathBuf> {
        let path = dir.join(file);
        std::fs::write(&path, self.pem())?;
        Ok(path)
    }

    /// A server certificate for `names` (DNS names or IPs) with common name `cn`, written to
    /// `dir/<stem>.crt` and `dir/<stem>.key` (each written to a temporary file first and
    /// renamed, as certificate tools do, so a reader never sees half a file).
    pub fn server(
        &self,
        dir: &Path,
        stem: &str,
        cn: &str,
        names: &[&str],
    ) -> anyhow::Result<PemFiles> {
        self.issue(dir, stem, cn, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate (mutual TLS) with common name `cn`.
    pub fn client(&self, dir: &Path, stem: &str, cn: &str) -> anyhow::Result<PemFiles> {
        self.issue(dir, stem, cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        dir: &Path,
        stem: &str,
        cn: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<PemFiles> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = PemFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            der: cert.der().to_vec(),
        };
        replace(&files.key, &key.serialize_pem())?;
        replace(&files.cert, &cert.pem())?;
        Ok(files)
    }
}

/// Writes `path` through a temporary file and a rename.
fn replace(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A rustls client config trusting only `ca` (PEM), offering `alpn`.
pub fn client_config(ca: &TestCa, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.issuer.der().to_vec()))?;
    #[allow(deprecated)] // ring, as the proxy uses
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A TLS connection to `addr` asking for `server_name`.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    server_name: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned()).context("server name")?;
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?)
}

/// The leaf certificate (DER) the server presented on `stream`.
pub fn served_certificate(
    stream: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Option<Vec<u8>> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
}

/// A `reqwest` client trusting only `ca`: HTTP/2 when `http2`, else HTTP/1.1 only.
pub fn https_client(ca: &TestCa, http2: bool) -> anyhow::Result<reqwest::Client> {
    let root = reqwest::Certificate::from_pem(ca.pem().as_bytes())?;
    let builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root);
    let builder = if http2 { builder } else { builder.http1_only() };
    Ok(builder.build()?)
}
