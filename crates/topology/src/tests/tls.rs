//! `listen_tls` and a region's or replica's `tls`: shape only (the proxy reads the files).

use std::path::PathBuf;

use super::*;

const LISTENER: &str = r#"
listen_tls:
  - address: 0.0.0.0:8443
    cert: /etc/tether/api.crt
    key: /etc/tether/api.key
    sni:
      - { cert: /etc/tether/eu.crt, key: /etc/tether/eu.key }
"#;

#[test]
fn a_tls_listener_keeps_its_certificates_in_order() {
    let t = load(&format!("{VALID}{LISTENER}")).unwrap();
    assert_eq!(t.listen_tls.len(), 1);
    let l = &t.listen_tls[0];
    assert_eq!(l.address, "0.0.0.0:8443".parse().unwrap());
    let certs: Vec<_> = l.certificates.iter().map(|c| c.cert.clone()).collect();
    assert_eq!(
        certs,
        [
            PathBuf::from("/etc/tether/api.crt"),
            PathBuf::from("/etc/tether/eu.crt")
        ]
    );
    assert!(load(VALID).unwrap().listen_tls.is_empty(), "off by default");
}

#[test]
fn a_tls_listener_needs_its_own_port_and_both_files() {
    let on_listen = LISTENER.replace("0.0.0.0:8443", "127.0.0.1:8080");
    let p = problem(&format!("{VALID}{on_listen}"));
    assert_eq!(p.key, "listen_tls[0].address");
    assert!(p.message.contains("is also `listen`"), "{p}");

    let twice = format!(
        "{VALID}listen_tls:\n  - {{ address: \"127.0.0.1:8443\", cert: a.crt, key: a.key }}\n  - {{ address: \"127.0.0.1:8443\", cert: b.crt, key: b.key }}\n"
    );
    let p = problem(&twice);
    assert_eq!(p.key, "listen_tls[1].address");
    assert!(p.message.contains("sni"), "points at the sni list: {p}");

    let no_key =
        format!("{VALID}listen_tls:\n  - {{ address: \"127.0.0.1:8443\", cert: a.crt }}\n");
    let (_, message) = parse_error(&no_key);
    assert!(message.contains("missing field `key`"), "{message}");

    let empty = format!(
        "{VALID}listen_tls:\n  - {{ address: \"127.0.0.1:8443\", cert: \"\", key: a.key }}\n"
    );
    assert_eq!(problem(&empty).key, "listen_tls[0].cert");
}

fn with_region_tls(tls: &str) -> String {
    VALID.replace(
        "  - name: eu\n    replicas:",
        &format!("  - name: eu\n    tls: {tls}\n    replicas:"),
    )
}

#[test]
fn region_tls_applies_to_its_replicas_each_named_by_its_ip_unless_sni_is_set() {
    let t = load(&with_region_tls("{ ca_file: /etc/tether/ca.crt }")).unwrap();
    let eu1 = t.replicas().find(|(_, r)| r.id == "eu-1").unwrap().1;
    let tls = eu1.tls.as_ref().unwrap();
    assert_eq!(tls.sni, "127.0.0.1");
    assert!(tls.verify);
    assert_eq!(tls.ca_file, Some(PathBuf::from("/etc/tether/ca.crt")));
    assert!(tls.client_cert.is_none());
    let us1 = t.replicas().find(|(_, r)| r.id == "us-1").unwrap().1;
    assert!(us1.tls.is_none(), "another region stays plain");

    let named = load(&with_region_tls("{ sni: inference.example.com }")).unwrap();
    let eu2 = named.replicas().find(|(_, r)| r.id == "eu-2").unwrap().1;
    assert_eq!(eu2.tls.as_ref().unwrap().sni, "inference.example.com");

    // A replica's own `tls` replaces its region's.
    let own = with_region_tls("{ sni: region.example.com }").replace(
        "{ id: eu-1, address: \"127.0.0.1:9101\",",
        "{ id: eu-1, address: \"127.0.0.1:9101\", tls: { sni: own.example.com, verify: false },",
    );
    let t = load(&own).unwrap();
    let eu1 = t.replicas().find(|(_, r)| r.id == "eu-1").unwrap().1;
    assert_eq!(eu1.tls.as_ref().unwrap().sni, "own.example.com");
    assert!(!eu1.tls.as_ref().unwrap().verify);
}

#[test]
fn upstream_tls_mistakes_are_named() {
    let p = problem(&with_region_tls("{ client_cert: /etc/c.crt }"));
    assert_eq!(p.key, "regions[0].tls.client_key");
    let p = problem(&with_region_tls("{ client_key: /etc/c.key }"));
    assert_eq!(p.key, "regions[0].tls.client_cert");
    let p = problem(&with_region_tls("{ sni: \"not a name\" }"));
    assert_eq!(p.key, "regions[0].tls.sni");
    let p = problem(&with_region_tls("{ verify: false, ca_file: /etc/ca.crt }"));
    assert_eq!(p.key, "regions[0].tls.verify");
    let (_, message) = parse_error(&with_region_tls("{ ca: /etc/ca.crt }"));
    assert!(message.contains("unknown field `ca`"), "{message}");
}

#[test]
fn a_reload_reports_certificate_and_replica_tls_changes_and_new_listeners_need_a_restart() {
    let before = load(&format!("{VALID}{LISTENER}")).unwrap();
    let renamed = load(&format!(
        "{VALID}{}",
        LISTENER.replace("api.crt", "api-2.crt")
    ))
    .unwrap();
    let d = diff(&before, &before, &renamed);
    assert_eq!(d.changes, ["listen_tls[0] (0.0.0.0:8443) certificates"]);
    assert!(d.restart_required.is_empty());

    let moved = load(&format!("{VALID}{}", LISTENER.replace("8443", "9443"))).unwrap();
    assert_eq!(
        diff(&before, &before, &moved).restart_required,
        ["listen_tls[].address"]
    );

    let tls = load(&with_region_tls("{ sni: a.example.com }")).unwrap();
    let d = diff(&before, &load(VALID).unwrap(), &tls);
    assert!(
        d.changes
            .iter()
            .any(|c| c.starts_with("replica eu-1: tls (sni a.example.com")),
        "{:?}",
        d.changes
    );
}
