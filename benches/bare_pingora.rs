//! The floor Pingora itself sets: the smallest `ProxyHttp` that does Tether's job minus
//! Tether — hash the `x-session-affinity` header onto the upstreams (ketama, the ring nginx's
//! `hash … consistent` uses) and proxy with keepalive. Nothing else: no override table, no
//! health, no metering, no timeouts, no logging.
//!
//! `benches/proxy_cost.rs` runs it beside Tether, nginx and HAProxy; Tether's budget is ≤ 10 %
//! CPU per request above this process.
//!
//! ```text
//! bare-pingora --listen 127.0.0.1:7000 --upstream 127.0.0.1:7101 --upstream 127.0.0.1:7102 [--threads 1]
//! ```
//! Stop it with SIGINT (fast exit) or SIGTERM.

use std::net::SocketAddr;

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;
use pingora::server::configuration::{Opt, ServerConf};
use pingora_ketama::{Bucket, Continuum};

#[derive(Parser)]
#[command(
    about = "A bare Pingora proxy hashing x-session-affinity onto upstreams (the benchmark floor)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// An upstream address; repeat for each.
    #[arg(long = "upstream", required = true)]
    upstreams: Vec<SocketAddr>,
    /// Worker threads of the proxy service.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Tokio work stealing across the threads (Pingora's default: on).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    work_stealing: bool,
}

struct HashProxy {
    ring: Continuum,
    upstreams: Vec<SocketAddr>,
}

#[async_trait]
impl ProxyHttp for HashProxy {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let addr = session
            .req_header()
            .headers
            .get("x-session-affinity")
            .and_then(|token| self.ring.node(token.as_bytes()))
            // No token: the first upstream, as cheap as a decision gets.
            .unwrap_or(self.upstreams[0]);
        Ok(Box::new(HttpPeer::new(addr, false, String::new())))
    }
}

fn main() {
    let args = Args::parse();
    let buckets: Vec<Bucket> = args.upstreams.iter().map(|a| Bucket::new(*a, 1)).collect();
    let conf = ServerConf {
        threads: args.threads,
        work_stealing: args.work_stealing,
        pid_file: format!("/tmp/bare-pingora-{}.pid", args.listen.port()),
        upgrade_sock: format!("/tmp/bare-pingora-{}-upgrade.sock", args.listen.port()),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(
        &server.configuration,
        HashProxy {
            ring: Continuum::new(&buckets),
            upstreams: args.upstreams,
        },
    );
    proxy.add_tcp(&args.listen.to_string());
    server.add_service(proxy);
    server.run_forever();
}
