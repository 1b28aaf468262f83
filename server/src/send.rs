//! The outgoing side of a connection: frames are encoded into one buffer, except the
//! file data of large `Data` replies, which goes to the socket from the reply's own
//! buffer (vectored writes) instead of being copied into it.
//!
//! A cold sequential read sends every byte of the file this way; copying it into the
//! frame buffer first was a seventh of the server's CPU.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use ferry_common::ServerFrame;
use ferry_common::codec::encode_frame;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Data replies at least this long are sent from their own buffer.
const SPLIT_MIN: usize = 64 * 1024;
/// `feed` writes to the socket once this much is queued.
const FLUSH_AT: usize = 256 * 1024;
/// Buffers handed to one `writev`.
const MAX_SLICES: usize = 64;

pub struct FrameSink<W> {
    io: W,
    /// Encoded bytes not yet moved to `chunks`.
    buf: BytesMut,
    /// What is queued for the socket, in order.
    chunks: VecDeque<Bytes>,
    queued: usize,
}

impl<W: AsyncWrite + Unpin> FrameSink<W> {
    /// `pending`: bytes already encoded for this socket and not yet written.
    pub fn new(io: W, pending: BytesMut) -> Self {
        FrameSink {
            io,
            queued: pending.len(),
            buf: pending,
            chunks: VecDeque::new(),
        }
    }

    /// Queue `frame`, writing to the socket when enough is queued. A frame that cannot
    /// be encoded (too large) is an `InvalidInput` error, and nothing of it is queued;
    /// socket errors are never of that kind.
    pub async fn feed(&mut self, frame: ServerFrame) -> io::Result<()> {
        let (head, data) = frame.split_data(SPLIT_MIN);
        let before = self.buf.len();
        encode_frame(&head, data.as_ref().map_or(0, Bytes::len), &mut self.buf)?;
        self.queued += self.buf.len() - before;
        if let Some(data) = data {
            self.chunks.push_back(self.buf.split().freeze());
            self.queued += data.len();
            self.chunks.push_back(data);
        }
        if self.queued >= FLUSH_AT {
            self.write_out().await.map_err(not_invalid_input)?;
        }
        Ok(())
    }

    /// Write everything queued and flush the socket.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.write_out().await.map_err(not_invalid_input)?;
        self.io.flush().await.map_err(not_invalid_input)
    }

    /// Flush, then shut the write side down.
    pub async fn close(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.io.shutdown().await
    }

    async fn write_out(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.chunks.push_back(self.buf.split().freeze());
        }
        while !self.chunks.is_empty() {
            // On the stack: this runs for every batch of replies.
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            for (slot, chunk) in slices.iter_mut().zip(&self.chunks) {
                *slot = IoSlice::new(chunk);
                count += 1;
            }
            let mut n = self.io.write_vectored(&slices[..count]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.queued = self.queued.saturating_sub(n);
            while n > 0 {
                let Some(first) = self.chunks.front_mut() else {
                    break;
                };
                if n < first.len() {
                    first.advance(n);
                    break;
                }
                n -= first.len();
                self.chunks.pop_front();
            }
        }
        self.queued = 0;
        Ok(())
    }
}

/// A socket error told apart from a frame that could not be encoded (`InvalidInput`,
/// which the caller answers with an error reply instead).
fn not_invalid_input(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::InvalidInput {
        io::Error::other(e)
    } else {
        e
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ferry_common::Response;
    use ferry_common::codec::ClientCodec;
    use futures::StreamExt;
    use tokio_util::codec::FramedRead;

    /// Frames of every kind and size, data sent from its own buffer or not, arrive
    /// whole and in order through a pipe that takes a few bytes at a time.
    #[tokio::test]
    async fn frames_arrive_whole_and_in_order() {
        let (w, r) = tokio::io::duplex(1000);
        let frames: Vec<ServerFrame> = (0..40u64)
            .map(|i| ServerFrame::Reply {
                id: i,
                result: match i % 4 {
                    0 => Err(i as i32),
                    1 => Ok(Response::Data(Bytes::from(vec![i as u8; 10]))),
                    _ => Ok(Response::Data(Bytes::from(
                        (0..SPLIT_MIN + i as usize * 4099)
                            .map(|b| (b as u64 * i) as u8)
                            .collect::<Vec<u8>>(),
                    ))),
                },
            })
            .collect();
        let sent = frames.clone();
        let writer = tokio::spawn(async move {
            let mut sink = FrameSink::new(w, BytesMut::new());
            for f in sent {
                sink.feed(f).await.unwrap();
            }
            sink.close().await.unwrap();
        });
        let got: Vec<ServerFrame> = FramedRead::new(r, ClientCodec::new())
            .map(|f| f.unwrap())
            .collect()
            .await;
        writer.await.unwrap();
        assert_eq!(got, frames);
    }
}
