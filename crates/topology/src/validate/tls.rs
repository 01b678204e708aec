//! TLS settings: the HTTPS listeners (`listen_tls`) and TLS to replicas (`tls`). Only the
//! shape is checked here; the files are read (and their certificates and keys checked) by the
//! proxy when it starts and reloads, and by `tether check`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::{network, Problems};
use crate::raw::{RawListenTls, RawUpstreamTls};
use crate::{CertificateFiles, TlsListener, UpstreamTls};

/// A file setting: a path that names something.
fn path(p: &mut Problems, key: &str, value: &Path) -> bool {
    if value.as_os_str().is_empty() {
        p.add(key, "is empty; write the path of a PEM file");
        return false;
    }
    true
}

/// `listen_tls`: each listener on an address of its own (not `listen` or `admin_listen`
/// either), each certificate with its key.
pub(super) fn listeners(
    p: &mut Problems,
    raw: &[RawListenTls],
    taken: &[(&str, Option<SocketAddr>)],
) -> Vec<TlsListener> {
    let mut out: Vec<TlsListener> = Vec::with_capacity(raw.len());
    for (i, l) in raw.iter().enumerate() {
        let key = format!("listen_tls[{i}]");
        let address = network::listener(p, &format!("{key}.address"), &l.address);
        if let Some(addr) = address {
            if let Some((other, _)) = taken.iter().find(|(_, a)| *a == Some(addr)) {
                p.add(
                    format!("{key}.address"),
                    format!("{addr} is also `{other}`; use another port"),
                );
            }
            if let Some(j) = out.iter().position(|o| o.address == addr) {
                p.add(
                    format!("{key}.address"),
                    format!(
                        "{addr} is also listen_tls[{j}].address; put more certificates of one \
                         listener under its `sni` list"
                    ),
                );
            }
        }
        let mut certificates = Vec::with_capacity(1 + l.sni.len());
        let default_ok = path(p, &format!("{key}.cert"), &l.cert);
        let default_ok = path(p, &format!("{key}.key"), &l.key) && default_ok;
        if default_ok {
            certificates.push(CertificateFiles {
                cert: l.cert.clone(),
                key: l.key.clone(),
            });
        }
        for (j, c) in l.sni.iter().enumerate() {
            let ok = path(p, &format!("{key}.sni[{j}].cert"), &c.cert);
            if path(p, &format!("{key}.sni[{j}].key"), &c.key) && ok {
                certificates.push(CertificateFiles {
                    cert: c.cert.clone(),
                    key: c.key.clone(),
                });
            }
        }
        out.push(TlsListener {
            address: address.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            certificates,
        });
    }
    out
}

/// Whether `name` can be sent as a server name: a DNS name (letters, digits, `-`, `.`, at most
/// 253 bytes, labels of 1 to 63) or an IP address (then no SNI is sent and the certificate
/// must list the IP).
fn server_name_is_valid(name: &str) -> bool {
    if name.parse::<IpAddr>().is_ok() {
        return true;
    }
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A replica's or region's `tls`. `sni` stays empty when not set: each replica then uses its
/// own IP ([`for_replica`]).
pub(super) fn upstream(p: &mut Problems, key: &str, raw: &RawUpstreamTls) -> Option<UpstreamTls> {
    let before = p.0.len();
    if let Some(sni) = &raw.sni {
        if !server_name_is_valid(sni) {
            p.add(
                format!("{key}.sni"),
                format!(
                    "{sni:?} is not a server name: write a DNS name (api.example.com) or an IP"
                ),
            );
        }
    }
    if let Some(ca) = &raw.ca_file {
        path(p, &format!("{key}.ca_file"), ca);
    }
    let client_cert = match (&raw.client_cert, &raw.client_key) {
        (None, None) => None,
        (Some(cert), Some(k)) => {
            let ok = path(p, &format!("{key}.client_cert"), cert);
            if path(p, &format!("{key}.client_key"), k) && ok {
                Some(CertificateFiles {
                    cert: cert.clone(),
                    key: k.clone(),
                })
            } else {
                None
            }
        }
        (Some(_), None) => {
            p.add(
                format!("{key}.client_key"),
                "is missing: a client_cert needs the key it was issued for",
            );
            None
        }
        (None, Some(_)) => {
            p.add(
                format!("{key}.client_cert"),
                "is missing: a client_key needs the certificate issued for it",
            );
            None
        }
    };
    if !raw.verify && raw.ca_file.is_some() {
        p.add(
            format!("{key}.verify"),
            "is false, so ca_file would never be used: remove one of them",
        );
    }
    (p.0.len() == before).then(|| UpstreamTls {
        sni: raw.sni.clone().unwrap_or_default(),
        ca_file: raw.ca_file.clone(),
        verify: raw.verify,
        client_cert,
    })
}

/// `tls` as one replica uses it: without `sni`, the replica's IP is the name checked.
pub(super) fn for_replica(tls: &UpstreamTls, address: SocketAddr) -> UpstreamTls {
    let mut tls = tls.clone();
    if tls.sni.is_empty() {
        tls.sni = address.ip().to_string();
    }
    tls
}

#[cfg(test)]
mod tests {
    use super::server_name_is_valid;

    #[test]
    fn server_names() {
        for ok in [
            "api.example.com",
            "localhost",
            "127.0.0.1",
            "::1",
            "a-b.c_d.io",
        ] {
            assert!(server_name_is_valid(ok), "{ok}");
        }
        for bad in [
            "",
            "a..b",
            "-a.com",
            "a-.com",
            "a b.com",
            "*.example.com",
            "é.com",
        ] {
            assert!(!server_name_is_valid(bad), "{bad}");
        }
    }
}
