//! The ops port's listener, with its bounds: at most [`MAX_CONNECTIONS`] open at once (one past it is closed
//! as soon as it is accepted, so it fails at once instead of waiting in the backlog), and a connection that
//! sends nothing for [`IDLE_TIMEOUT`] is closed (so idle or stalled clients cannot hold every slot for long).
//! Probes and Prometheus open one connection each; the status page one per viewer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Connections the ops port keeps open at most.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that sends nothing this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A TCP listener that keeps to the bounds above; `refused` counts the connections closed for the cap.
pub struct Capped {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    refused: Counter,
    idle: Duration,
}

impl Capped {
    pub fn new(inner: TcpListener, refused: Counter) -> Self {
        Self::with_bounds(inner, refused, MAX_CONNECTIONS, IDLE_TIMEOUT)
    }

    fn with_bounds(inner: TcpListener, refused: Counter, max: usize, idle: Duration) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(max)),
            refused,
            idle,
        }
    }
}

impl axum::serve::Listener for Capped {
    type Io = Connection;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // axum's own accept retries on errors (out of file descriptors, say) after a pause.
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let _ = stream.set_nodelay(true);
                    return (Connection::new(stream, slot, self.idle), addr);
                }
                Err(_) => {
                    self.refused.inc();
                    tracing::debug!(%addr, "ops port: connection cap reached; closing");
                    drop(stream);
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// One accepted connection: it holds its slot until dropped, and fails reads once idle too long.
pub struct Connection<S = TcpStream> {
    stream: S,
    _slot: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S> Connection<S> {
    fn new(stream: S, slot: OwnedSemaphorePermit, idle: Duration) -> Self {
        Self {
            stream,
            _slot: slot,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Connection<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + this.idle;
                    this.deadline.as_mut().reset(next);
                }
                Poll::Ready(result)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "ops port: nothing received within the idle timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Connection<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn listener(max: usize, idle: Duration) -> (Capped, std::net::SocketAddr, Counter) {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let refused = Counter::default();
        (
            Capped::with_bounds(inner, refused.clone(), max, idle),
            addr,
            refused,
        )
    }

    /// Reads until the peer closes; true when it did so without sending anything.
    async fn closed_without_a_byte(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn one_past_the_cap_is_closed_and_a_freed_slot_is_used_again() {
        let (mut capped, addr, refused) = listener(2, Duration::from_secs(60)).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let (first, _) = capped.accept().await;
        let _b = TcpStream::connect(addr).await.unwrap();
        let (_second, _) = capped.accept().await;
        // The third is accepted and closed at once; the accept goes on waiting for a connection it can keep.
        let mut third = TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::spawn(async move {
            let kept = capped.accept().await;
            (capped, kept)
        });
        assert!(closed_without_a_byte(&mut third).await);
        assert_eq!(refused.get(), 1);
        // A slot freed: the next connection is kept.
        drop(first);
        let mut fourth = TcpStream::connect(addr).await.unwrap();
        let (_capped, (mut kept, _)) = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("accepted")
            .unwrap();
        fourth.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        kept.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x");
        assert_eq!(refused.get(), 1);
    }

    // In-memory streams under paused time: the deadline is checked to the second, not raced against a socket.
    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_its_read_after_the_idle_timeout_and_talk_renews_it() {
        let (mut client, server) = tokio::io::duplex(64);
        let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let mut connection = Connection::new(server, slot, Duration::from_secs(60));
        let mut byte = [0u8; 1];
        // Traffic before the deadline moves it.
        tokio::time::advance(Duration::from_secs(50)).await;
        client.write_all(b"a").await.unwrap();
        connection.read_exact(&mut byte).await.unwrap();
        tokio::time::advance(Duration::from_secs(50)).await;
        client.write_all(b"b").await.unwrap();
        connection.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"b");
        // Then silence: the read fails once the idle timeout has passed since the last byte, not before.
        let silent_from = Instant::now();
        let error = connection.read(&mut byte).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(silent_from.elapsed(), Duration::from_secs(60));
    }
}
