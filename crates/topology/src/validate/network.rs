//! Who reaches Tether and where it sends traffic: the listeners, the replicas' addresses, the
//! admin API's reach, and the header that carries session tokens.

use std::net::{Ipv4Addr, SocketAddr};

use super::Problems;

fn socket_addr(problems: &mut Problems, key: &str, value: &str) -> Option<SocketAddr> {
    match value.trim().parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problems.add(
                key,
                format!(
                    "{value:?} is not a socket address; write an IP and a port, e.g. 127.0.0.1:9101 \
                     (host names are not resolved, so a DNS outage cannot stall routing)"
                ),
            );
            None
        }
    }
}

/// A listener's address: any IP (`0.0.0.0` is every interface), but a port of its own.
pub(super) fn listener(p: &mut Problems, key: &str, value: &str) -> Option<SocketAddr> {
    let addr = socket_addr(p, key, value)?;
    if addr.port() == 0 {
        p.add(
            key,
            format!(
                "{addr}: port 0 listens on a port the system picks, which no client can know; \
                 choose a port"
            ),
        );
        return None;
    }
    Some(addr)
}

/// A replica's address: one a TCP connection can reach.
pub(super) fn replica(p: &mut Problems, key: &str, value: &str) -> Option<SocketAddr> {
    let addr = socket_addr(p, key, value)?;
    let ip = addr.ip().to_canonical();
    let why = if ip.is_unspecified() {
        "an unspecified IP (0.0.0.0, ::) means every interface to a listener and reaches no replica"
    } else if ip.is_multicast() {
        "a multicast IP takes no TCP connection"
    } else if ip == Ipv4Addr::BROADCAST {
        "the broadcast IP takes no TCP connection"
    } else if addr.port() == 0 {
        "port 0 is no port a replica listens on"
    } else {
        return Some(addr);
    };
    p.add(
        key,
        format!("{addr} is not an address a replica can have: {why}"),
    );
    None
}

/// Whether the admin API at `admin` is reachable from other hosts, so that every endpoint but
/// `/health` must require the admin token (the proxy refuses to start such a listener without
/// one: the token may come from the environment, which only the proxy sees).
pub fn admin_needs_token(admin: SocketAddr) -> bool {
    !admin.ip().to_canonical().is_loopback()
}

const CREDENTIALS: &str = "it carries credentials; a session token must not be a secret, and \
                           every session of one client would hash alike";
const FRAMING: &str = "HTTP uses it to frame the message or manage the connection, and every \
                       proxy on the way may rewrite or drop it";
const ON_THE_WAY: &str = "proxies on the way set or extend it, so it names no session";
const BODY: &str = "it describes the body, which Tether reads and may rewrite";

/// Headers that already mean something to HTTP or to Tether, with the reason that rules each
/// out as the session-token header.
const RESERVED_HEADERS: &[(&str, &str)] = &[
    (
        "authorization",
        "Tether reads the tenant's API key from it and removes it before forwarding, and every \
         session of one client would hash alike",
    ),
    ("proxy-authorization", CREDENTIALS),
    ("cookie", CREDENTIALS),
    ("x-api-key", CREDENTIALS),
    (
        "host",
        "it names the service, the same for every session, and proxies rewrite it",
    ),
    ("forwarded", ON_THE_WAY),
    ("via", ON_THE_WAY),
    ("max-forwards", ON_THE_WAY),
    ("connection", FRAMING),
    ("keep-alive", FRAMING),
    ("proxy-connection", FRAMING),
    ("te", FRAMING),
    ("trailer", FRAMING),
    ("transfer-encoding", FRAMING),
    ("upgrade", FRAMING),
    ("content-length", FRAMING),
    ("expect", FRAMING),
    ("content-type", BODY),
    ("content-encoding", BODY),
    (
        "accept-encoding",
        "Tether sends `identity` in its place so that it can read usage from responses",
    ),
];

/// The session-token header, lower-cased: a valid name that means nothing else.
pub(super) fn affinity_header(p: &mut Problems, value: &str) -> String {
    let header = value.trim().to_ascii_lowercase();
    if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
        p.add(
            "affinity.header",
            format!("{value:?} is not a valid HTTP header name"),
        );
    } else if let Some((_, why)) = RESERVED_HEADERS.iter().find(|(name, _)| *name == header) {
        p.add(
            "affinity.header",
            format!(
                "{header:?} cannot carry session tokens: {why}; use a dedicated header, such as \
                 x-session-affinity"
            ),
        );
    }
    header
}

/// The agents' session-id headers, lower-cased: valid names that mean nothing else, each
/// listed once.
pub(super) fn agent_headers(p: &mut Problems, values: &[String], affinity: &str) -> Vec<String> {
    let mut headers: Vec<String> = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        let key = format!("affinity.agent_headers[{i}]");
        let header = value.trim().to_ascii_lowercase();
        if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            p.add(key, format!("{value:?} is not a valid HTTP header name"));
        } else if let Some((_, why)) = RESERVED_HEADERS.iter().find(|(name, _)| *name == header) {
            p.add(key, format!("{header:?} cannot carry session ids: {why}"));
        } else if header == affinity {
            p.add(key, format!("{header:?} is affinity.header already"));
        } else if headers.contains(&header) {
            p.add(key, format!("{header:?} is listed twice"));
        } else {
            headers.push(header);
        }
    }
    headers
}
