//! The UDP socket under a relayed QUIC endpoint. It hands quinn every datagram except the relay's end notice
//! (`00 'V' 'R' 'E' reason`, sent when a cap ends the allocation), which it keeps for the connection to report:
//! without it a capped connection would only time out.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::watch;

use vesper_proto::relay::{parse_end_notice, EndReason};

/// Why a relay ended an allocation, from its end notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    ByteCap,
    TimeCap,
    Other(u8),
}

impl RelayEnd {
    fn parse(datagram: &[u8]) -> Option<RelayEnd> {
        let reason = parse_end_notice(datagram)?;
        Some(match EndReason::from_byte(reason) {
            Some(EndReason::Bytes) => RelayEnd::ByteCap,
            Some(EndReason::Time) => RelayEnd::TimeCap,
            None => RelayEnd::Other(reason),
        })
    }
}

pub(crate) struct RelaySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    relay: SocketAddr,
    ended: watch::Sender<Option<RelayEnd>>,
}

impl fmt::Debug for RelaySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelaySocket")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl RelaySocket {
    /// Wraps `inner`, whose datagrams from `relay` may carry an end notice; the receiver hears of it.
    pub(crate) fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        relay: SocketAddr,
    ) -> (Arc<Self>, watch::Receiver<Option<RelayEnd>>) {
        let (ended, receiver) = watch::channel(None);
        (
            Arc::new(Self {
                inner,
                relay,
                ended,
            }),
            receiver,
        )
    }

    /// Takes end notices out of the `count` received entries; returns how many entries remain (moved to the
    /// front).
    fn strip_notices(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        count: usize,
    ) -> usize {
        let mut kept = 0;
        for index in 0..count {
            let mut entry = meta[index];
            if entry.addr == self.relay {
                // A notice comes alone, or (coalesced by GRO) as the last, shorter segment of a batch.
                let stride = if entry.stride == 0 {
                    entry.len
                } else {
                    entry.stride
                };
                let last_start = entry.len.saturating_sub(1) / stride.max(1) * stride;
                if let Some(end) = RelayEnd::parse(&bufs[index][last_start..entry.len]) {
                    self.ended.send_replace(Some(end));
                    entry.len = last_start;
                }
            }
            if entry.len == 0 {
                continue;
            }
            if kept != index {
                let (front, back) = bufs.split_at_mut(index);
                front[kept][..entry.len].copy_from_slice(&back[0][..entry.len]);
            }
            meta[kept] = entry;
            kept += 1;
        }
        kept
    }
}

impl AsyncUdpSocket for RelaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let count = ready!(self.inner.poll_recv(cx, bufs, meta))?;
            let kept = self.strip_notices(bufs, meta, count);
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
            // Only notices: poll again, which registers the waker when nothing more is there.
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notices_are_taken_out_and_reported() {
        let runtime = quinn::default_runtime().unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let relay: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let (wrapped, ended) = RelaySocket::new(runtime.wrap_udp_socket(socket).unwrap(), relay);

        let mut storage = [[0u8; 32]; 3];
        let meta_for = |len: usize, from: SocketAddr| RecvMeta {
            addr: from,
            len,
            stride: len,
            ecn: None,
            dst_ip: None,
        };
        let other: SocketAddr = "127.0.0.1:10".parse().unwrap();
        storage[0][..5].copy_from_slice(b"first");
        storage[1][..5].copy_from_slice(&[0, b'V', b'R', b'E', 1]);
        storage[2][..6].copy_from_slice(b"second");
        let mut meta = [meta_for(5, relay), meta_for(5, relay), meta_for(6, other)];
        let [a, b, c] = &mut storage;
        let mut bufs = [IoSliceMut::new(a), IoSliceMut::new(b), IoSliceMut::new(c)];
        let kept = wrapped.strip_notices(&mut bufs, &mut meta, 3);
        assert_eq!(kept, 2);
        assert_eq!(&bufs[0][..meta[0].len], b"first");
        assert_eq!(&bufs[1][..meta[1].len], b"second");
        assert_eq!(meta[1].addr, other);
        assert_eq!(*ended.borrow(), Some(RelayEnd::ByteCap));
        // The same five bytes from anyone but the relay are left alone.
        let [a, ..] = &mut storage;
        a[..5].copy_from_slice(&[0, b'V', b'R', b'E', 2]);
        let mut bufs = [IoSliceMut::new(a)];
        let mut meta = [meta_for(5, other)];
        assert_eq!(wrapped.strip_notices(&mut bufs, &mut meta, 1), 1);
        // A notice coalesced after a GRO batch is cut off the end.
        let mut big = [0u8; 64];
        big[20..25].copy_from_slice(&[0, b'V', b'R', b'E', 2]);
        let mut bufs = [IoSliceMut::new(&mut big)];
        let mut meta = [RecvMeta {
            stride: 10,
            ..meta_for(25, relay)
        }];
        assert_eq!(wrapped.strip_notices(&mut bufs, &mut meta, 1), 1);
        assert_eq!(meta[0].len, 20);
        assert_eq!(*ended.borrow(), Some(RelayEnd::TimeCap));
    }
}
