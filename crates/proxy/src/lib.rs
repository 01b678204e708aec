//! Tether's Pingora glue, as a library so that its hooks are tested and benchmarked from
//! outside the binary: the `ProxyHttp` implementation ([`proxy`]), admission
//! ([`admission`]), the request-body rewrite ([`body`]), the errors Tether answers
//! ([`error`]), the routing state swapped on reload ([`router`]), metering ([`meter`]), the
//! admin listener ([`admin`]), hot reload ([`reload`]), active probes ([`probe`]), and the
//! server assembly ([`server`]), and the shared sticky store of a tier ([`tier`]). Routing rules live in `tether-affinity`, usage extraction in
//! `tether-metering`; nothing here decides what they decide.

pub mod admin;
pub mod admission;
pub mod body;
pub mod engine_probe;
pub mod error;
pub mod meter;
pub mod probe;
pub mod proxy;
pub mod reload;
pub mod report_cmd;
pub mod router;
pub mod server;
pub mod tier;
