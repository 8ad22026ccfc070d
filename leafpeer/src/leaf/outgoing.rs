//! The session's outbound stream: frames in the order they were queued, with runs of sends and of
//! acknowledgements that are already waiting merged into one frame each.
//!
//! Under load many sends queue up while a frame is being written; one `SendBatch` then carries them, so the super
//! peer takes them in one task and pushes those for the same recipient in one frame. A lone send still goes out
//! as a plain `SendFrame` the moment it is queued: nothing waits for a batch to fill. (Every super peer of
//! protocol 1 or later takes batches.)

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::Stream;
use prost::Message as _;
use tokio::sync::mpsc;
use vesper_proto::v1::{client_frame, ClientFrame, MessageAck, MessageAcks, SendBatch};
use vesper_proto::validate::{MAX_BATCH_BYTES, MAX_BATCH_MESSAGES};

/// Bytes a send adds to a batch besides its own encoding (field tag and length prefix), rounded up.
const PER_SEND_FRAMING: usize = 8;

/// Reads the session's queue and merges what is ready.
pub struct Outgoing {
    queue: mpsc::Receiver<ClientFrame>,
    /// A frame read while looking for more of a run, which goes out next.
    held: Option<ClientFrame>,
}

impl Outgoing {
    pub fn new(queue: mpsc::Receiver<ClientFrame>) -> Self {
        Self { queue, held: None }
    }

    /// The next queued frame, if one is ready now.
    fn ready(&mut self) -> Option<ClientFrame> {
        self.held.take().or_else(|| self.queue.try_recv().ok())
    }
}

impl Stream for Outgoing {
    type Item = ClientFrame;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClientFrame>> {
        let this = self.get_mut();
        let first = match this.held.take() {
            Some(frame) => frame,
            None => match ready!(this.queue.poll_recv(cx)) {
                Some(frame) => frame,
                None => return Poll::Ready(None),
            },
        };
        let frame = match first.frame {
            Some(client_frame::Frame::Send(send)) => {
                let mut bytes = send.encoded_len() + PER_SEND_FRAMING;
                let mut sends = vec![send];
                while sends.len() < MAX_BATCH_MESSAGES {
                    match this.ready() {
                        Some(ClientFrame {
                            frame: Some(client_frame::Frame::Send(next)),
                        }) => {
                            let size = next.encoded_len() + PER_SEND_FRAMING;
                            if bytes + size > MAX_BATCH_BYTES {
                                this.held = Some(ClientFrame {
                                    frame: Some(client_frame::Frame::Send(next)),
                                });
                                break;
                            }
                            bytes += size;
                            sends.push(next);
                        }
                        Some(other) => {
                            this.held = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                match <[_; 1]>::try_from(sends) {
                    Ok([send]) => client_frame::Frame::Send(send),
                    Err(sends) => client_frame::Frame::SendBatch(SendBatch { sends }),
                }
            }
            Some(client_frame::Frame::MessageAck(ack)) => {
                let mut ids = vec![ack.delivery_id];
                // Delivery ids are 8 bytes each: a full run is well under a KiB.
                while ids.len() < MAX_BATCH_MESSAGES {
                    match this.ready() {
                        Some(ClientFrame {
                            frame: Some(client_frame::Frame::MessageAck(next)),
                        }) => ids.push(next.delivery_id),
                        Some(other) => {
                            this.held = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                match <[_; 1]>::try_from(ids) {
                    Ok([delivery_id]) => {
                        client_frame::Frame::MessageAck(MessageAck { delivery_id })
                    }
                    Err(delivery_ids) => {
                        client_frame::Frame::MessageAcks(MessageAcks { delivery_ids })
                    }
                }
            }
            other => {
                return Poll::Ready(Some(ClientFrame { frame: other }));
            }
        };
        Poll::Ready(Some(ClientFrame { frame: Some(frame) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use vesper_proto::v1::{Ping, SendFrame, SendMessageRequest};

    fn send(request_id: u64, payload_bytes: usize) -> ClientFrame {
        ClientFrame {
            frame: Some(client_frame::Frame::Send(SendFrame {
                request_id,
                message: Some(SendMessageRequest {
                    payload: vec![7; payload_bytes],
                    ..Default::default()
                }),
            })),
        }
    }

    fn ack(delivery_id: u64) -> ClientFrame {
        ClientFrame {
            frame: Some(client_frame::Frame::MessageAck(MessageAck { delivery_id })),
        }
    }

    fn ping() -> ClientFrame {
        ClientFrame {
            frame: Some(client_frame::Frame::Ping(Ping { nonce: 1 })),
        }
    }

    /// Request ids of a Send or SendBatch frame.
    fn request_ids(frame: &ClientFrame) -> Vec<u64> {
        match &frame.frame {
            Some(client_frame::Frame::Send(send)) => vec![send.request_id],
            Some(client_frame::Frame::SendBatch(batch)) => {
                batch.sends.iter().map(|send| send.request_id).collect()
            }
            other => panic!("expected sends, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn runs_merge_in_order_and_other_frames_keep_their_place() {
        let (tx, rx) = mpsc::channel(256);
        for frame in [
            send(1, 10),
            send(2, 10),
            ping(),
            ack(1),
            ack(2),
            send(3, 10),
        ] {
            tx.send(frame).await.unwrap();
        }
        drop(tx);
        let frames: Vec<ClientFrame> = Outgoing::new(rx).collect().await;
        assert_eq!(frames.len(), 4, "{frames:?}");
        assert!(matches!(
            frames[0].frame,
            Some(client_frame::Frame::SendBatch(_))
        ));
        assert_eq!(request_ids(&frames[0]), [1, 2]);
        assert_eq!(frames[1], ping());
        assert_eq!(
            frames[2].frame,
            Some(client_frame::Frame::MessageAcks(MessageAcks {
                delivery_ids: vec![1, 2]
            }))
        );
        // A lone send stays a plain SendFrame.
        assert_eq!(frames[3], send(3, 10));
    }

    #[tokio::test]
    async fn batches_stop_at_their_count_and_byte_limits() {
        let (tx, rx) = mpsc::channel(256);
        for id in 0..(MAX_BATCH_MESSAGES as u64 + 1) {
            tx.send(send(id, 10)).await.unwrap();
        }
        // 50 KiB each: two fit in a batch (128 KiB) after the small send left over from the first one.
        for id in 100..104 {
            tx.send(send(id, 50 << 10)).await.unwrap();
        }
        // Larger than a batch may be: travels alone.
        tx.send(send(200, MAX_BATCH_BYTES + 1)).await.unwrap();
        drop(tx);
        let frames: Vec<ClientFrame> = Outgoing::new(rx).collect().await;
        let ids: Vec<Vec<u64>> = frames.iter().map(request_ids).collect();
        assert_eq!(ids[0], (0..MAX_BATCH_MESSAGES as u64).collect::<Vec<_>>());
        assert_eq!(ids[1], [MAX_BATCH_MESSAGES as u64, 100, 101]);
        assert_eq!(ids[2], [102, 103]);
        assert_eq!(ids[3], [200]);
        assert_eq!(ids.len(), 4);
        for frame in &frames {
            if let Some(client_frame::Frame::SendBatch(batch)) = &frame.frame {
                assert!(batch.encoded_len() <= MAX_BATCH_BYTES);
            }
        }
    }
}
