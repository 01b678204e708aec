//! What the file exposes and where it sends traffic: listeners, replica addresses, the admin
//! API's reach, and the header that carries session tokens.

use super::*;

const TOKEN: &str = "admin: { token: \"0123456789abcdef\" }\n";

fn admin_on(addr: &str) -> String {
    VALID.replace(
        "admin_listen: 127.0.0.1:9090",
        &format!("admin_listen: \"{addr}\""),
    )
}

#[test]
fn an_admin_listener_off_loopback_needs_a_token() {
    for addr in [
        "0.0.0.0:9090",
        "10.0.0.5:9090",
        "[::]:9090",
        "[2001:db8::1]:9090",
    ] {
        let t = load(&format!("{}{TOKEN}", admin_on(addr))).unwrap();
        assert!(admin_needs_token(t.admin_listen.unwrap()), "{addr}");
    }
}

#[test]
fn an_admin_listener_on_loopback_needs_no_token() {
    for addr in [
        "127.0.0.1:9090",
        "127.3.2.1:9090",
        "[::1]:9090",
        "[::ffff:127.0.0.1]:9090",
    ] {
        let t = load(&admin_on(addr)).unwrap();
        assert_eq!(t.admin.token, None, "{addr}");
        assert!(!admin_needs_token(t.admin_listen.unwrap()), "{addr}");
    }
}

#[test]
fn headers_with_a_meaning_of_their_own_cannot_carry_session_tokens() {
    for name in [
        "authorization",
        "Authorization",
        "proxy-authorization",
        "cookie",
        "x-api-key",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "content-type",
        "content-encoding",
        "accept-encoding",
        "forwarded",
    ] {
        let p = problem(&VALID.replace("header: X-Session-Affinity", &format!("header: {name}")));
        assert_eq!(p.key, "affinity.header", "{name}");
        assert!(
            p.message.starts_with(&format!(
                "{:?} cannot carry session tokens",
                name.to_ascii_lowercase()
            )),
            "{name}: {}",
            p.message
        );
    }
    let p = problem(&VALID.replace("header: X-Session-Affinity", "header: authorization"));
    assert!(p.message.contains("API key"), "{}", p.message);
    let t =
        load(&VALID.replace("header: X-Session-Affinity", "header: X-Conversation-Id")).unwrap();
    assert_eq!(t.affinity.header, "x-conversation-id");
}

#[test]
fn a_replica_address_must_be_one_a_connection_can_reach() {
    for (address, why) in [
        ("0.0.0.0:9102", "unspecified"),
        ("[::]:9102", "unspecified"),
        ("0.0.0.0:0", "unspecified"),
        ("127.0.0.1:0", "port 0"),
        ("[::1]:0", "port 0"),
        ("224.0.0.1:9102", "multicast"),
        ("[ff02::1]:9102", "multicast"),
        ("255.255.255.255:9102", "broadcast"),
    ] {
        let p = problem(&VALID.replace("127.0.0.1:9102", address));
        assert_eq!(p.key, "regions[0].replicas[1].address", "{address}");
        assert!(p.message.contains(why), "{address}: {}", p.message);
    }
}

#[test]
fn a_listener_needs_a_port_of_its_own() {
    let p = problem(&VALID.replace("listen: 127.0.0.1:8080", "listen: 127.0.0.1:0"));
    assert_eq!(p.key, "listen");
    assert!(p.message.contains("port 0"), "{}", p.message);
    let p = problem(&admin_on("127.0.0.1:0"));
    assert_eq!(p.key, "admin_listen");
    // Every interface is a listener's business, not a replica's.
    let t = load(&VALID.replace("listen: 127.0.0.1:8080", "listen: 0.0.0.0:8080")).unwrap();
    assert!(t.listen.ip().is_unspecified());
}
