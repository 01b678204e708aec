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

use crate::engine::{Fault, Replica};

/// A replica with its listener.
#[derive(Debug)]
pub(crate) struct Listening {
    pub replica: Arc<Replica>,
    pub addr: SocketAddr,
    app: Router,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Listening {
    pub fn new(
        replica: Arc<Replica>,
        listener: TcpListener,
        addr: SocketAddr,
        app: Router,
    ) -> Self {
        let task = serve(listener, app.clone());
        Listening {
            replica,
            addr,
            app,
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
            *self.accept_task() = Some(serve(listener, self.app.clone()));
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

fn serve(listener: TcpListener, app: Router) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        let service = TowerToHyperService::new(app.clone());
                        connections.spawn(async move {
                            if let Err(e) = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                            {
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
