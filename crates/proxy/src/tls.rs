//! TLS: the certificates the HTTPS listeners serve, and the TLS settings of each replica's peer.
//!
//! **Listeners.** Each `listen_tls` listener gets one [`CertResolver`]: rustls asks it for a
//! certificate during every handshake, and it answers from the [`ServerCerts`] it holds in an
//! `ArcSwap`. A reload reads the files again and swaps in new `ServerCerts` in one store: new
//! handshakes get the new certificate, established connections keep the session they have (a
//! certificate only matters during the handshake). The certificate chosen is the one whose
//! subject-alternative names cover the server name the client sent (SNI; exact names before
//! wildcards), else the listener's first.
//!
//! **Replicas.** A replica with `tls` gets an `HttpPeer` with TLS on, its server name, its CA
//! list and its client certificate, all read and checked here when the topology is installed,
//! so nothing is parsed (or can fail to parse) on a connection.
//!
//! Every problem names the setting and the file, and says what is wrong with it.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::{parse_x509, CertKey, WrappedX509};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tether_topology::{CertificateFiles, TlsListener, Topology, UpstreamTls};

/// Why a certificate, key or CA file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {path}: {reason}")]
pub struct TlsFileError {
    /// The setting that names the file (`listen_tls[0].cert`).
    pub key: String,
    /// The file.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

fn file_error(key: &str, path: &Path, reason: impl Into<String>) -> TlsFileError {
    TlsFileError {
        key: key.to_owned(),
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|e| file_error(key, path, format!("cannot read: {e}")))
}

/// The certificates of a PEM file, leaf first; at least one, each one X.509 that parses.
fn certificates(key: &str, path: &Path, pem: &[u8]) -> Result<Vec<Vec<u8>>, TlsFileError> {
    let mut out = Vec::new();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| file_error(key, path, format!("not PEM: {e}")))?;
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| {
            file_error(
                key,
                path,
                format!("certificate {} is not valid X.509: {e}", out.len() + 1),
            )
        })?;
        out.push(cert.as_ref().to_vec());
    }
    if out.is_empty() {
        return Err(file_error(
            key,
            path,
            "holds no certificate (expected PEM `-----BEGIN CERTIFICATE-----` blocks)",
        ));
    }
    Ok(out)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn private_key(key: &str, path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    match rustls_pemfile::private_key(&mut &pem[..]) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(file_error(
            key,
            path,
            "holds no private key (expected a PEM `PRIVATE KEY` block)",
        )),
        Err(e) => Err(file_error(key, path, format!("not PEM: {e}"))),
    }
}

/// A certificate chain and its key, loaded and checked against each other.
#[derive(Debug)]
struct LoadedCertificate {
    /// The chain, DER, leaf first.
    chain: Vec<Vec<u8>>,
    /// The key, DER.
    key: PrivateKeyDer<'static>,
    certified: Arc<CertifiedKey>,
    /// DNS names of the leaf's subject-alternative-name extension, lower-cased.
    names: Vec<String>,
}

/// Reads `files` (whose settings are `cert_setting` and `key_setting`) and checks that the key
/// is the certificate's. `digest` takes the bytes of both files.
fn load_certificate(
    cert_setting: &str,
    key_setting: &str,
    files: &CertificateFiles,
    digest: &mut Sha256,
) -> Result<LoadedCertificate, TlsFileError> {
    let cert_pem = read(cert_setting, &files.cert)?;
    let key_pem = read(key_setting, &files.key)?;
    digest.update(&cert_pem);
    digest.update(&key_pem);
    let chain = certificates(cert_setting, &files.cert, &cert_pem)?;
    let key = private_key(key_setting, &files.key, &key_pem)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        file_error(
            key_setting,
            &files.key,
            format!("unsupported private key: {e}"),
        )
    })?;
    let names = chain
        .first()
        .map(|leaf| dns_names(leaf))
        .unwrap_or_default();
    let certified = CertifiedKey::new(
        chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect(),
        signing,
    );
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => {
            return Err(file_error(
                key_setting,
                &files.key,
                format!("is not the key of {}: {e}", files.cert.display()),
            ))
        }
    }
    Ok(LoadedCertificate {
        chain,
        key,
        certified: Arc::new(certified),
        names,
    })
}

fn dns_names(leaf: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// The certificates one listener serves, by server name.
#[derive(Debug)]
pub struct ServerCerts {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` certificates, under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// SHA-256 of every file's bytes, to tell whether a reload changed anything.
    digest: [u8; 32],
}

impl ServerCerts {
    /// Reads and checks the certificates of `listener` (`listen_tls[index]`).
    pub fn load(index: usize, listener: &TlsListener) -> Result<ServerCerts, TlsFileError> {
        let mut digest = Sha256::new();
        let mut loaded = Vec::with_capacity(listener.certificates.len());
        for (i, files) in listener.certificates.iter().enumerate() {
            let key = if i == 0 {
                format!("listen_tls[{index}]")
            } else {
                format!("listen_tls[{index}].sni[{}]", i - 1)
            };
            loaded.push(load_certificate(
                &format!("{key}.cert"),
                &format!("{key}.key"),
                files,
                &mut digest,
            )?);
        }
        let Some(default) = loaded.first().map(|c| Arc::clone(&c.certified)) else {
            return Err(TlsFileError {
                key: format!("listen_tls[{index}]"),
                path: String::new(),
                reason: "has no certificate".into(),
            });
        };
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        // The first certificate naming a server wins, as the first listed is the default.
        for c in &loaded {
            for name in &c.names {
                let entry = match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()),
                    None => exact.entry(name.clone()),
                };
                entry.or_insert_with(|| Arc::clone(&c.certified));
            }
        }
        Ok(ServerCerts {
            default,
            exact,
            wildcard,
            digest: digest.finalize().into(),
        })
    }

    /// The certificate for a client that asked for `server_name` (none: the default).
    pub fn choose(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name else {
            return &self.default;
        };
        let name = name.to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return c;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
    }
}

/// What rustls asks for a certificate on every handshake of one listener.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<ServerCerts>,
}

impl CertResolver {
    fn new(certs: ServerCerts) -> Self {
        CertResolver {
            current: ArcSwap::from_pointee(certs),
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.current.load();
        Some(Arc::clone(certs.choose(client_hello.server_name())))
    }
}

/// The certificates of every HTTPS listener, read again on each reload.
#[derive(Debug)]
pub struct ListenerCerts {
    /// One per listener the process started with, in `listen_tls` order.
    listeners: Vec<(std::net::SocketAddr, Arc<CertResolver>)>,
}

/// Certificates read for a reload, not yet served.
#[derive(Debug)]
pub struct PendingCerts(Vec<Option<ServerCerts>>);

impl PendingCerts {
    /// The listeners whose files changed, as `listen_tls[i] (address)`.
    pub fn changed(&self, running: &ListenerCerts) -> Vec<String> {
        running
            .listeners
            .iter()
            .zip(&self.0)
            .enumerate()
            .filter_map(|(i, ((addr, resolver), new))| {
                let new = new.as_ref()?;
                (new.digest != resolver.current.load().digest)
                    .then(|| format!("listen_tls[{i}] ({addr})"))
            })
            .collect()
    }
}

impl ListenerCerts {
    /// Reads every listener's certificates.
    pub fn load(topology: &Topology) -> Result<ListenerCerts, TlsFileError> {
        let mut listeners = Vec::with_capacity(topology.listen_tls.len());
        for (i, l) in topology.listen_tls.iter().enumerate() {
            let certs = ServerCerts::load(i, l)?;
            listeners.push((l.address, Arc::new(CertResolver::new(certs))));
        }
        Ok(ListenerCerts { listeners })
    }

    /// The listeners: address and the resolver its TLS settings use.
    pub fn listeners(&self) -> &[(std::net::SocketAddr, Arc<CertResolver>)] {
        &self.listeners
    }

    /// Reads the certificates `topology` names for the running listeners (a listener is
    /// matched by its address; one the process does not have waits for a restart).
    pub fn prepare(&self, topology: &Topology) -> Result<PendingCerts, TlsFileError> {
        let mut pending = Vec::with_capacity(self.listeners.len());
        for (addr, _) in &self.listeners {
            let found = topology
                .listen_tls
                .iter()
                .enumerate()
                .find(|(_, l)| l.address == *addr);
            pending.push(match found {
                Some((i, l)) => Some(ServerCerts::load(i, l)?),
                None => None,
            });
        }
        Ok(PendingCerts(pending))
    }

    /// Serves `pending` to new connections.
    pub fn apply(&self, pending: PendingCerts) {
        for ((_, resolver), new) in self.listeners.iter().zip(pending.0) {
            if let Some(new) = new {
                if new.digest != resolver.current.load().digest {
                    resolver.current.store(Arc::new(new));
                }
            }
        }
    }
}

/// The Pingora TLS settings of a listener: TLS 1.2 and 1.3 (all rustls speaks), ALPN `h2`
/// then `http/1.1`, certificates from `resolver`.
pub fn listener_settings(
    resolver: &Arc<CertResolver>,
) -> pingora::Result<pingora::listeners::tls::TlsSettings> {
    let mut settings = pingora::listeners::tls::TlsSettings::intermediate("", "")?;
    settings.set_cert_resolver(Arc::clone(resolver) as Arc<dyn ResolvesServerCert>);
    settings.enable_h2();
    Ok(settings)
}

/// A replica's TLS as its peer needs it: checked, parsed, ready to set on the `HttpPeer`.
pub fn configure_peer(
    peer: &mut HttpPeer,
    tls: &UpstreamTls,
    key: &str,
) -> Result<(), TlsFileError> {
    peer.scheme = pingora_core::upstreams::peer::Scheme::HTTPS;
    peer.sni = tls.sni.clone();
    peer.options.verify_cert = tls.verify;
    peer.options.verify_hostname = tls.verify;
    if let Some(ca_file) = &tls.ca_file {
        let setting = format!("{key}: tls.ca_file");
        let pem = read(&setting, ca_file)?;
        let ders = certificates(&setting, ca_file, &pem)?;
        // Pingora's connection pool and our probe checkers key a peer by its reuse hash, which
        // leaves the CA list out: put it in through the group key, so connections verified
        // against an old CA list are not reused once it changes.
        let mut hasher = DefaultHasher::new();
        ders.hash(&mut hasher);
        peer.group_key = hasher.finish();
        let cas: Vec<WrappedX509> = ders
            .into_iter()
            .map(|der| WrappedX509::new(der, parse_x509))
            .collect();
        peer.options.ca = Some(Arc::from(cas.into_boxed_slice()));
    }
    if let Some(files) = &tls.client_cert {
        let loaded = load_certificate(
            &format!("{key}: tls.client_cert"),
            &format!("{key}: tls.client_key"),
            files,
            &mut Sha256::new(),
        )?;
        let der = loaded.key.secret_der().to_vec();
        // Pingora reads the key back from these bytes on each new connection.
        if PrivateKeyDer::try_from(der.as_slice()).is_err() {
            return Err(file_error(
                &format!("{key}: tls.client_key"),
                &files.key,
                "is not a PKCS#8, PKCS#1 or SEC1 key",
            ));
        }
        peer.client_cert_key = Some(Arc::new(CertKey::new(loaded.chain, der)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::PathBuf;

    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    /// A self-signed certificate for `names`, written to `dir/<stem>.crt` and `.key`.
    fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> (CertificateFiles, Vec<u8>) {
        let params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let files = CertificateFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        (files, cert.der().to_vec())
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tether-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn listener(certificates: Vec<CertificateFiles>) -> TlsListener {
        TlsListener {
            address: "127.0.0.1:8443".parse().unwrap(),
            certificates,
        }
    }

    fn served(certs: &ServerCerts, name: Option<&str>) -> Vec<u8> {
        certs
            .choose(name)
            .end_entity_cert()
            .unwrap()
            .as_ref()
            .to_vec()
    }

    #[test]
    fn the_certificate_follows_the_server_name_exact_then_wildcard_then_the_first() {
        let dir = temp_dir("choose");
        let (main, main_der) = write_cert(&dir, "main", &["api.example.com", "127.0.0.1"]);
        let (wild, wild_der) = write_cert(&dir, "wild", &["*.eu.example.com"]);
        let (exact, exact_der) = write_cert(&dir, "exact", &["special.eu.example.com"]);
        let certs = ServerCerts::load(0, &listener(vec![main, wild, exact])).unwrap();
        assert_eq!(served(&certs, Some("api.example.com")), main_der);
        assert_eq!(served(&certs, Some("API.Example.COM")), main_der);
        assert_eq!(served(&certs, Some("x.eu.example.com")), wild_der);
        assert_eq!(served(&certs, Some("special.eu.example.com")), exact_der);
        // A wildcard covers one label only; unknown names and no name get the first.
        assert_eq!(served(&certs, Some("a.b.eu.example.com")), main_der);
        assert_eq!(served(&certs, Some("unknown.test")), main_der);
        assert_eq!(served(&certs, None), main_der);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn load_error(files: CertificateFiles) -> String {
        ServerCerts::load(2, &listener(vec![files]))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn an_unusable_file_is_an_error_naming_its_key_and_path() {
        let dir = temp_dir("errors");
        let (a, _) = write_cert(&dir, "a", &["a.test"]);
        let (b, _) = write_cert(&dir, "b", &["b.test"]);

        let mismatched = load_error(CertificateFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        });
        assert!(
            mismatched.starts_with("listen_tls[2].key: ")
                && mismatched.contains("is not the key of"),
            "{mismatched}"
        );

        let missing = load_error(CertificateFiles {
            cert: dir.join("absent.crt"),
            key: a.key.clone(),
        });
        assert!(
            missing.starts_with("listen_tls[2].cert: ") && missing.contains("cannot read"),
            "{missing}"
        );

        // A key where the certificate belongs, and a certificate where the key belongs.
        let swapped = load_error(CertificateFiles {
            cert: a.key.clone(),
            key: a.cert.clone(),
        });
        assert!(swapped.contains("holds no certificate"), "{swapped}");
        let no_key = load_error(CertificateFiles {
            cert: a.cert.clone(),
            key: a.cert.clone(),
        });
        assert!(
            no_key.starts_with("listen_tls[2].key: ") && no_key.contains("holds no private key"),
            "{no_key}"
        );

        let garbage = dir.join("garbage.crt");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let invalid = load_error(CertificateFiles {
            cert: garbage,
            key: a.key.clone(),
        });
        assert!(invalid.contains("not valid X.509"), "{invalid}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_reload_swaps_only_changed_certificates_and_keeps_the_old_ones_on_error() {
        let dir = temp_dir("reload");
        let (files, first_der) = write_cert(&dir, "edge", &["edge.test"]);
        let topology_with = |files: Vec<CertificateFiles>| {
            let mut t = tether_topology::Topology::from_yaml(
                "listen: 127.0.0.1:8080\nlocal_region: r\nregions:\n  - name: r\n    replicas:\n      - { id: a, address: \"127.0.0.1:9000\" }\n",
                "test",
            )
            .unwrap();
            t.listen_tls = vec![listener(files)];
            t
        };
        let topology = topology_with(vec![files.clone()]);
        let running = ListenerCerts::load(&topology).unwrap();
        let current = |r: &ListenerCerts| served(&r.listeners()[0].1.current.load(), None);

        let unchanged = running.prepare(&topology).unwrap();
        assert!(unchanged.changed(&running).is_empty());

        let (_, renewed_der) = write_cert(&dir, "edge", &["edge.test"]);
        let pending = running.prepare(&topology).unwrap();
        assert_eq!(
            pending.changed(&running),
            ["listen_tls[0] (127.0.0.1:8443)"]
        );
        assert_eq!(current(&running), first_der, "nothing served before apply");
        running.apply(pending);
        assert_eq!(current(&running), renewed_der);

        std::fs::write(&files.key, "not a key").unwrap();
        assert!(running.prepare(&topology).is_err());
        assert_eq!(current(&running), renewed_der, "a bad file changes nothing");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_replica_peer_gets_tls_its_name_its_cas_and_its_client_certificate() {
        let dir = temp_dir("peer");
        let (ca, _) = write_cert(&dir, "ca", &["ca.test"]);
        let (client, _) = write_cert(&dir, "client", &["client.test"]);
        let mut peer = HttpPeer::new("127.0.0.1:9000", false, String::new());
        let tls = UpstreamTls {
            sni: "replica.test".into(),
            ca_file: Some(ca.cert.clone()),
            verify: true,
            client_cert: Some(client.clone()),
        };
        configure_peer(&mut peer, &tls, "replica a").unwrap();
        assert!(peer.is_tls());
        assert_eq!(peer.sni, "replica.test");
        assert_eq!(peer.options.ca.as_ref().map(|c| c.len()), Some(1));
        assert!(peer.client_cert_key.is_some());

        // Another CA list is another pool of connections (and another probe checker).
        use pingora::upstreams::peer::Peer;
        let (other_ca, _) = write_cert(&dir, "other-ca", &["other.test"]);
        let mut other = HttpPeer::new("127.0.0.1:9000", false, String::new());
        let other_tls = UpstreamTls {
            ca_file: Some(other_ca.cert),
            ..tls.clone()
        };
        configure_peer(&mut other, &other_tls, "replica a").unwrap();
        assert_ne!(peer.reuse_hash(), other.reuse_hash());

        let mut peer = HttpPeer::new("127.0.0.1:9000", false, String::new());
        let wrong_key = UpstreamTls {
            client_cert: Some(CertificateFiles {
                cert: client.cert,
                key: ca.key,
            }),
            ..tls
        };
        let e = configure_peer(&mut peer, &wrong_key, "replica a")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("replica a: tls.client_key: "), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
