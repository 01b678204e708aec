//! Where the store connects (one node or a cluster) and the connection it sends commands on.
//!
//! Everything here runs on the store's own runtime: redis-rs spawns each connection's driver
//! task on the runtime that creates it, and that runtime must outlive every request.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::io::tcp::TcpSettings;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, RedisResult, Value};

/// Bound on establishing a connection, handshake included.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on any command other than a lookup (writes, pings). Past it the command counts as
/// timed out; redis-rs drops the answer if it arrives later.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an idle connection is checked. With [`REQUEST_TIMEOUT`] it bounds how long a
/// silently dead server (host gone, process stopped) keeps costing each lookup its full
/// timeout before lookups fail at once.
pub(crate) const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// A configured Redis deployment, not yet connected.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The node of the URL: the whole deployment, or the cluster's seed. Pub/sub starts on it
    /// in a cluster too, since a `PUBLISH` anywhere in a cluster reaches every node.
    node: Client,
    /// Set for Redis Cluster.
    cluster: Option<ClusterClient>,
}

impl Target {
    /// Builds the clients (no I/O). `ca_pem` replaces the system roots for `rediss://`.
    pub(crate) fn new(
        info: ConnectionInfo,
        cluster: bool,
        ca_pem: Option<Vec<u8>>,
    ) -> RedisResult<Target> {
        // Lookups are single small requests: Nagle's algorithm would hold them back.
        let info = info.set_tcp_settings(tcp_settings());
        let node = match &ca_pem {
            Some(pem) => Client::build_with_tls(info.clone(), certificates(pem))?,
            None => Client::open(info.clone())?,
        };
        if !cluster {
            return Ok(Target {
                node,
                cluster: None,
            });
        }
        let mut builder = ClusterClientBuilder::new([info])
            .tcp_settings(tcp_settings())
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(REQUEST_TIMEOUT)
            // The store bounds every call itself and would rather answer "unavailable" than
            // wait through a long retry schedule.
            .retries(2);
        if let Some(pem) = &ca_pem {
            builder = builder.certs(certificates(pem));
        }
        Ok(Target {
            node,
            cluster: Some(builder.build()?),
        })
    }

    pub(crate) fn uses_tls(&self) -> bool {
        matches!(
            self.node.get_connection_info().addr(),
            ConnectionAddr::TcpTls { .. }
        )
    }

    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The node the subscriber starts with.
    pub(crate) fn pubsub_seed(&self) -> &Client {
        &self.node
    }

    /// Opens the command connection (bounded by [`CONNECT_TIMEOUT`] by the caller).
    pub(crate) async fn connect(&self) -> RedisResult<RedisConnection> {
        match &self.cluster {
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(REQUEST_TIMEOUT));
                let conn = self
                    .node
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(RedisConnection::Single(conn))
            }
            Some(cluster) => Ok(RedisConnection::Cluster(
                cluster.get_async_connection().await?,
            )),
        }
    }

    /// A client for another node of the cluster, with the seed's credentials and TLS settings.
    pub(crate) fn node_client(&self, host: &str, port: u16) -> RedisResult<Client> {
        let seed = self.node.get_connection_info().clone();
        let addr = match seed.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        Client::open(seed.set_addr(addr))
    }
}

fn tcp_settings() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

fn certificates(ca_pem: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca_pem.to_vec()),
    }
}

/// The command connection: a cheap-to-clone handle onto a driver task on the store's runtime.
#[derive(Clone)]
pub(crate) enum RedisConnection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl RedisConnection {
    /// Runs one command. In a cluster it goes to the node owning the key's slot.
    pub(crate) async fn query(&mut self, cmd: &redis::Cmd) -> RedisResult<Value> {
        match self {
            RedisConnection::Single(conn) => cmd.query_async(conn).await,
            RedisConnection::Cluster(conn) => cmd.query_async(conn).await,
        }
    }

    /// Checks that the deployment answers. In a cluster, one node answering is enough: the
    /// cluster connection reconnects to the others by itself, and a lookup whose slot lives on
    /// an unreachable node fails on its own.
    pub(crate) async fn ping(&mut self) -> RedisResult<()> {
        let ping = redis::cmd("PING");
        match self {
            RedisConnection::Single(conn) => ping.query_async::<Value>(conn).await.map(drop),
            RedisConnection::Cluster(conn) => conn
                .route_command(ping, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
                .await
                .map(drop),
        }
    }
}
