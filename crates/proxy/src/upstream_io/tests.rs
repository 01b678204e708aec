use std::time::Duration;

use pingora::protocols::l4::socket::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// A connector bound to a fresh status, and a listener that accepts but answers only what
/// the test writes to the accepted socket.
async fn replica() -> (
    Arc<ReplicaConnector>,
    Arc<ReplicaStatus>,
    Arc<Cut>,
    TcpListener,
    SocketAddr,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = SocketAddr::Inet(listener.local_addr().unwrap());
    let cut = Cut::new();
    let status = Arc::new(ReplicaStatus::default());
    let connector = ReplicaConnector::new(Duration::from_secs(1), Arc::clone(&cut));
    connector.bind(&status);
    (connector, status, cut, listener, addr)
}

fn aborted(e: &io::Error) -> Option<Aborted> {
    e.get_ref()?.downcast_ref::<Aborted>().copied()
}

/// Reads `stream` in a task of its own, runs `signal` while the read waits, and returns the
/// error that ended it (within 5 s).
async fn read_ended_by(mut stream: Stream, signal: impl FnOnce(), why: &str) -> io::Error {
    let read = tokio::spawn(async move {
        let mut buf = [0u8; 16];
        stream.read(&mut buf).await
    });
    tokio::task::yield_now().await;
    signal();
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect(why)
        .unwrap()
        .unwrap_err()
}

#[tokio::test]
async fn a_departure_breaks_off_a_request_waiting_for_its_first_byte() {
    let (connector, status, _cut, listener, addr) = replica().await;
    let mut stream = connector.connect(&addr).await.unwrap();
    let (_server, _) = listener.accept().await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    stream.flush().await.unwrap();
    let e = read_ended_by(stream, || status.depart(), "the read ends at the departure").await;
    assert_eq!(aborted(&e), Some(Aborted::Departed));
}

#[tokio::test]
async fn a_departure_leaves_an_answer_that_has_started_alone() {
    let (connector, status, _cut, listener, addr) = replica().await;
    let mut stream = connector.connect(&addr).await.unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    stream.flush().await.unwrap();
    server.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(n > 0);
    status.depart();
    server
        .write_all(b"content-length: 0\r\n\r\n")
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(n > 0, "the rest of the answer still arrives");
}

#[tokio::test]
async fn a_departure_before_the_request_went_out_does_not_break_it_off() {
    let (connector, status, _cut, listener, addr) = replica().await;
    status.depart();
    let mut stream = connector.connect(&addr).await.unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    stream.flush().await.unwrap();
    server
        .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(stream.read(&mut buf).await.unwrap() > 0);
}

#[tokio::test]
async fn a_departure_between_the_connect_and_the_first_write_breaks_the_request_off() {
    let (connector, status, _cut, listener, addr) = replica().await;
    let mut stream = connector.connect(&addr).await.unwrap();
    let (_server, _) = listener.accept().await.unwrap();
    status.depart();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    stream.flush().await.unwrap();
    let mut buf = [0u8; 16];
    let e = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("the read ends at once")
        .unwrap_err();
    assert_eq!(aborted(&e), Some(Aborted::Departed));
}

#[test]
fn an_abort_made_into_a_pingora_error_reads_back_as_itself() {
    for abort in [Aborted::Departed, Aborted::Cut] {
        let e = abort.into_error();
        assert_eq!(Aborted::of(&e), Some(abort));
        // As Pingora passes it on: wrapped once more.
        let wrapped = Error::because(ErrorType::ReadError, "passed on", e);
        assert_eq!(Aborted::of(&wrapped), Some(abort));
    }
}

#[tokio::test]
async fn the_cut_ends_a_stream_mid_answer() {
    let (connector, _status, cut, listener, addr) = replica().await;
    let mut stream = connector.connect(&addr).await.unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    stream.flush().await.unwrap();
    server.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    assert!(stream.read(&mut buf).await.unwrap() > 0);
    let e = read_ended_by(stream, || cut.fire(), "the read ends at the cut").await;
    assert_eq!(aborted(&e), Some(Aborted::Cut));
}

#[tokio::test]
async fn a_refused_connection_is_reported_as_pingora_reports_it() {
    let (connector, _status, _cut, listener, addr) = replica().await;
    drop(listener);
    let e = connector.connect(&addr).await.unwrap_err();
    assert_eq!(e.etype(), &ErrorType::ConnectRefused);
}
