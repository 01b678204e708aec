//! Upstream connections that Tether can break off: a hung replica must not hold its clients
//! for the whole `read_timeout`, and a shutdown must end the streams it cannot wait for in a
//! way that still logs them.
//!
//! Pingora waits for a replica's response header in one `read` with no hook in between, so
//! the only way to end that wait early is at the socket. With `upstream.watch_connections`,
//! every replica's peer carries a [`ReplicaConnector`] (Pingora's custom L4 connector) that
//! wraps the TCP stream in a [`WatchedStream`] (off by default: Pingora 0.9 pools no
//! connection a custom connector made). The stream's reads fail with an [`Aborted`] error:
//!
//! - [`Aborted::Departed`]: its replica left rotation ([`ReplicaStatus::depart`]: probe
//!   `fall`, ejection, `drain?now=true`) after the request on this connection was sent and
//!   before any byte of the answer came back. Pingora reports a read error before the
//!   response header, which the retry policy sends to the next replica at once.
//! - [`Aborted::Cut`]: the edge-wide [`Cut`] fired (the drain limit of a shutdown passed).
//!   Every read fails, mid-stream too, so each request ends through Pingora's error path and
//!   its `logging` hook writes a usage record (`incomplete`).
//!
//! The cost on the hot path is two atomic loads per read and, per connection and task, one
//! registration with each `Notify` (re-registered only when the task changes).

use std::future::Future;
use std::io;
use std::net::SocketAddr as InetSocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora::{Error, ErrorType};
use tether_health::ReplicaStatus;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// Why Tether broke off an upstream read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Aborted {
    /// The replica left rotation while the request waited for its first response byte.
    #[error("the replica left rotation before answering")]
    Departed,
    /// The shutdown's drain limit passed.
    #[error("cut at the end of the shutdown's drain limit")]
    Cut,
}

impl Aborted {
    /// A Pingora error that [`Aborted::of`] reads back as `self`, for an attempt Tether breaks
    /// off before Pingora reads (the replica departed before the request went out).
    pub fn into_error(self) -> Box<Error> {
        let mut e = Error::because(
            ErrorType::ConnectionClosed,
            "broken off by Tether",
            io::Error::new(io::ErrorKind::ConnectionAborted, self),
        );
        e.as_up();
        e
    }

    /// The abort behind a Pingora error, if Tether caused it.
    pub fn of(e: &Error) -> Option<Aborted> {
        // Pingora wraps the read's `io::Error` in one of its errors, and that one again as it
        // passes the error from the upstream half of the proxy to the downstream half.
        let mut cause = e.cause.as_deref()?;
        for _ in 0..4 {
            // A `Box<Error>` given as a cause is boxed once more, not unboxed.
            let inner = cause
                .downcast_ref::<Box<Error>>()
                .map(|b| &**b)
                .or_else(|| cause.downcast_ref::<Error>());
            if let Some(inner) = inner {
                cause = inner.cause.as_deref()?;
                continue;
            }
            let io = cause.downcast_ref::<io::Error>()?;
            return io.get_ref()?.downcast_ref::<Aborted>().copied();
        }
        None
    }
}

/// The edge-wide signal that ends every upstream read (the end of a shutdown's drain).
#[derive(Debug, Default)]
pub struct Cut {
    fired: AtomicBool,
    notify: Arc<Notify>,
}

impl Cut {
    /// A signal that has not fired.
    pub fn new() -> Arc<Cut> {
        Arc::new(Cut::default())
    }

    /// Breaks off every upstream read, now and from now on.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Whether it fired.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

/// Connects to one replica and watches the connection for its departures and for the cut.
#[derive(Debug)]
pub struct ReplicaConnector {
    connect_timeout: Duration,
    /// Set once the fleet that owns the replica is built (a status outlives reloads).
    status: OnceLock<Arc<ReplicaStatus>>,
    cut: Arc<Cut>,
}

impl ReplicaConnector {
    /// A connector honouring `connect_timeout` (Pingora applies none to custom connectors).
    pub fn new(connect_timeout: Duration, cut: Arc<Cut>) -> Arc<ReplicaConnector> {
        Arc::new(ReplicaConnector {
            connect_timeout,
            status: OnceLock::new(),
            cut,
        })
    }

    /// Ties the connector to its replica's live status (the first call wins: the status of a
    /// replica is the same across the generations that share this connector).
    pub fn bind(&self, status: &Arc<ReplicaStatus>) {
        let _ = self.status.set(Arc::clone(status));
    }
}

#[async_trait]
impl L4Connect for ReplicaConnector {
    async fn connect(&self, addr: &SocketAddr) -> pingora::Result<Stream> {
        let Some(inet) = addr.as_inet().copied() else {
            return Error::e_explain(ErrorType::ConnectError, "replicas are TCP addresses");
        };
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(inet)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(connect_error(inet, e)),
            Err(_) => {
                return Error::e_explain(
                    ErrorType::ConnectTimedout,
                    format!("timeout {:?} connecting to {inet}", self.connect_timeout),
                )
            }
        };
        let watched = WatchedStream {
            tcp,
            status: self.status.get().cloned(),
            cut: Arc::clone(&self.cut),
            connected_at: self.status.get().map(|s| s.departures()),
            sent_at: None,
            departed: None,
            cut_wait: None,
        };
        Ok(VirtualSocketStream::new(Box::new(watched)).into())
    }
}

/// The error types Pingora's own TCP connector gives, which the failure hooks classify.
fn connect_error(addr: InetSocketAddr, e: io::Error) -> Box<Error> {
    let etype = match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
        io::ErrorKind::TimedOut => ErrorType::ConnectTimedout,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            ErrorType::ConnectNoRoute
        }
        _ => ErrorType::ConnectError,
    };
    Error::because(etype, format!("Fail to connect to {addr}"), e)
}

/// A waiter registered with a `Notify`, and the task it wakes. Its allocation is reused when
/// it is armed again for the connection's next request.
struct Registration {
    notify: Arc<Notify>,
    notified: Pin<Box<OwnedNotified>>,
    waker: Option<Waker>,
}

impl Registration {
    fn new(notify: &Arc<Notify>) -> Registration {
        let mut notified = Box::pin(Arc::clone(notify).notified_owned());
        // Enabled before the caller re-checks its condition: a notification from then on
        // is not lost.
        notified.as_mut().enable();
        Registration {
            notify: Arc::clone(notify),
            notified,
            waker: None,
        }
    }

    /// Waits afresh (for the next request on the connection).
    fn rearm(&mut self) {
        self.notified.set(Arc::clone(&self.notify).notified_owned());
        self.notified.as_mut().enable();
        self.waker = None;
    }

    /// Whether it was notified; otherwise `cx`'s task is woken when it is.
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            // Already registered for this task: skip the Notify's lock.
            return false;
        }
        let ready = self.notified.as_mut().poll(cx).is_ready();
        self.waker = Some(cx.waker().clone());
        ready
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registration")
    }
}

/// A replica connection whose reads fail once the replica departs before answering, or once
/// the edge cuts every stream.
#[derive(Debug)]
pub struct WatchedStream {
    tcp: TcpStream,
    status: Option<Arc<ReplicaStatus>>,
    cut: Arc<Cut>,
    /// The replica's departure count when the connection was made, the baseline of its first
    /// request: a departure between the connect and the first write (after the proxy's own
    /// check that the replica is still in rotation) then still ends the wait.
    connected_at: Option<u64>,
    /// The replica's departure count when the current request went out; `None` once its
    /// answer started (or before any request).
    sent_at: Option<u64>,
    /// Armed while `sent_at` is set.
    departed: Option<Registration>,
    cut_wait: Option<Registration>,
}

impl WatchedStream {
    fn aborted(&self) -> Option<Aborted> {
        if self.cut.fired() {
            return Some(Aborted::Cut);
        }
        match (self.sent_at, &self.status) {
            (Some(at), Some(status)) if status.departures() != at => Some(Aborted::Departed),
            _ => None,
        }
    }

    /// Registers `cx` for the signals that matter now; `Some` if one fired meanwhile.
    fn watch(&mut self, cx: &mut Context<'_>) -> Option<Aborted> {
        let cut = self
            .cut_wait
            .get_or_insert_with(|| Registration::new(&self.cut.notify));
        if cut.poll(cx) {
            cut.rearm();
        }
        if let (Some(status), Some(_)) = (&self.status, self.sent_at) {
            let departed = self
                .departed
                .get_or_insert_with(|| Registration::new(status.departed()));
            if departed.poll(cx) {
                departed.rearm();
            }
        }
        self.aborted()
    }

    /// A request goes out (HTTP/1: the previous answer was read whole before it).
    fn sending(&mut self) {
        if self.sent_at.is_some() {
            return;
        }
        if let Some(status) = &self.status {
            if let Some(departed) = &mut self.departed {
                departed.rearm();
            }
            // Read after arming: a departure from here on is both counted and notified.
            let now = status.departures();
            self.sent_at = Some(self.connected_at.take().unwrap_or(now));
        }
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(abort) = this.aborted() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, abort)));
        }
        let filled = buf.filled().len();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > filled {
                    // The answer started: from here only the cut ends it.
                    this.sent_at = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.watch(cx) {
                Some(abort) => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, abort)))
                }
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.tcp).poll_write(cx, data);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.sending();
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.sending();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

impl VirtualSocket for WatchedStream {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> io::Result<()> {
        match opt {
            VirtualSockOpt::NoDelay => self.tcp.set_nodelay(true),
            // Tether sets no upstream TCP keep-alive (idle connections expire by
            // `upstream.idle_timeout`).
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
