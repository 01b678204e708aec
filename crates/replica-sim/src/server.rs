//! Listeners: one per replica, served by hyper so that a `refuse` fault can really stop
//! listening *and* drop every open keep-alive connection (aborting the accept task aborts its
//! connection tasks), as a crashed process would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::engine::{Fault, Replica};

/// A replica with its listener.
pub(crate) struct Listening {
    pub replica: Arc<Replica>,
    pub addr: SocketAddr,
    app: Router,
    tls: Option<TlsAcceptor>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listening")
            .field("replica", &self.replica.id)
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Listening {
    pub fn new(
        replica: Arc<Replica>,
        listener: TcpListener,
        addr: SocketAddr,
        app: Router,
        tls: Option<TlsAcceptor>,
    ) -> Self {
        let task = serve(listener, app.clone(), tls.clone());
        Listening {
            replica,
            addr,
            app,
            tls,
            accept: Mutex::new(Some(task)),
        }
    }

    fn accept_task(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        self.accept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a fault: `refuse` stops the listener; anything else makes sure it runs.
    pub async fn set_fault(&self, fault: Fault) -> std::io::Result<()> {
        if fault == Fault::Refuse {
            let task = self.accept_task().take();
            if let Some(task) = task {
                task.abort();
                // Aborting only schedules the drop: wait for it, so that the listener is closed
                // when this returns. Until then the kernel would still complete handshakes and
                // reset them later, which looks like a broken answer rather than a refusal.
                let _ = task.await;
            }
        } else if self.accept_task().is_none() {
            let listener = TcpListener::bind(self.addr).await?;
            *self.accept_task() = Some(serve(listener, self.app.clone(), self.tls.clone()));
        }
        self.replica.set_fault(fault);
        Ok(())
    }

    /// Stops the listener and its connections.
    pub fn stop(&self) {
        if let Some(task) = self.accept_task().take() {
            task.abort();
        }
    }
}

/// Serves HTTP/1.1 on `listener`, inside TLS when `tls` is set.
fn serve(listener: TcpListener, app: Router, tls: Option<TlsAcceptor>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let service = TowerToHyperService::new(app.clone());
                        let tls = tls.clone();
                        connections.spawn(async move {
                            let http = http1::Builder::new();
                            let served = match tls {
                                None => http.serve_connection(TokioIo::new(stream), service).await,
                                Some(tls) => match tls.accept(stream).await {
                                    Ok(stream) => {
                                        http.serve_connection(TokioIo::new(stream), service).await
                                    }
                                    Err(e) => {
                                        log::info!("TLS handshake failed: {e}");
                                        return;
                                    }
                                },
                            };
                            if let Err(e) = served {
                                log::debug!("connection ended: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        log::warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    })
}
