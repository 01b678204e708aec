//! Tether's Pingora glue, as a library so that its hooks are tested and benchmarked from
//! outside the binary: the `ProxyHttp` implementation ([`proxy`]), admission
//! ([`admission`]) and per-tenant limits ([`limits`]), which session a request is
//! ([`session_key`]), the request-body read-ahead and rewrite ([`body`]) within a memory budget ([`body_budget`]), the errors Tether answers
//! ([`error`]), the routing state swapped on reload ([`router`]), the header added to answers
//! ([`response_header`]), metering ([`meter`]), the
//! admin listener ([`admin`]), hot reload ([`reload`]), active probes ([`probe`]), and the
//! server assembly ([`server`]) with the shutdown's drain ([`drain`]), the shared sticky store of a tier ([`tier`]), and upstream connections Tether
//! can break off ([`upstream_io`]). Routing rules live in `tether-affinity`, usage extraction in
//! `tether-metering`; nothing here decides what they decide.

pub mod admin;
pub mod admission;
pub mod body;
pub mod body_budget;
pub mod drain;
pub mod engine_probe;
pub mod error;
pub mod limits;
pub mod meter;
pub mod probe;
pub mod proxy;
pub mod reload;
pub mod report_cmd;
pub mod response_header;
pub mod router;
pub mod server;
pub mod session_key;
pub mod tier;
pub mod tls;
pub mod upstream_io;
pub mod verified_keys;
