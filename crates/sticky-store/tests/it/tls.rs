//! `rediss://` against a real TLS-only redis-server with a private CA.

use std::io;

use tether_sticky_store::testing::RedisServer;
use tether_sticky_store::{Lookup, StoreErrorKind, StoreSettings};

use crate::common::*;

#[tokio::test]
async fn rediss_with_a_private_ca_works_and_an_untrusted_certificate_is_refused() {
    let server = match RedisServer::start_tls() {
        Err(err) if err.kind() == io::ErrorKind::Unsupported => {
            println!("skipped: this redis-server was built without TLS ({err})");
            return;
        }
        started => started.unwrap(),
    };
    assert!(server.url().starts_with("rediss://"));

    let trusting = start(StoreSettings {
        tls_ca_file: server.ca_file().map(Into::into),
        ..settings(&server.url())
    });
    let other = start(StoreSettings {
        tls_ca_file: server.ca_file().map(Into::into),
        ..settings(&server.url())
    });
    wait_ready(&trusting).await;
    wait_ready(&other).await;
    trusting.bind(9, "eu-1", None);
    wait_lookup(&other, 9, found("eu-1")).await;
    wait_until("the announcement arrives over TLS", RECOVERY, || async {
        other.stats().remote_binds == 1
    })
    .await;

    // The system roots do not know the test CA: the store keeps refusing to connect.
    let untrusting = start(settings(&server.url()));
    wait_until("connection attempts fail", RECOVERY, || async {
        untrusting.stats().errors.get(StoreErrorKind::Connect) >= 2
    })
    .await;
    assert!(!untrusting.stats().connected);
    assert_eq!(
        untrusting.lookup(9).await,
        Lookup::Unavailable(StoreErrorKind::Connect)
    );
}
