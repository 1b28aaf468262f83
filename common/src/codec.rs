//! Bytes to frames: a 4-byte big-endian length prefix (tokio-util's
//! `LengthDelimitedCodec`, capped at [`MAX_FRAME`]) around a bincode body decoded with
//! the same limit. An oversized length is rejected from the header alone, before any
//! allocation; a body that does not decode is an `InvalidData` error. Either way the
//! caller drops that one connection.

use std::cell::RefCell;
use std::io;
use std::marker::PhantomData;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::proto::MAX_FRAME;

/// bincode settings shared by both ends: varint integers, decoding bounded by the frame cap.
pub fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Encode one message body (no length prefix).
pub fn encode_body<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(msg, bincode_config())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("encode: {e}")))
}

/// Decode one message body; trailing bytes are an error (a frame holds exactly one message).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> io::Result<T> {
    let (msg, used) = bincode::serde::decode_from_slice(body, bincode_config())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("malformed frame: {e}")))?;
    if used != body.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed frame: {} trailing bytes", body.len() - used),
        ));
    }
    Ok(msg)
}

/// Codec sending `Out` messages and receiving `In` messages.
pub struct FrameCodec<Out, In> {
    framing: LengthDelimitedCodec,
    _marker: PhantomData<fn(Out) -> In>,
}

impl<Out, In> Default for FrameCodec<Out, In> {
    fn default() -> Self {
        FrameCodec {
            framing: LengthDelimitedCodec::builder()
                .max_frame_length(MAX_FRAME)
                .length_field_length(4)
                .new_codec(),
            _marker: PhantomData,
        }
    }
}

impl<Out, In> FrameCodec<Out, In> {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<Out: Serialize, In> Encoder<Out> for FrameCodec<Out, In> {
    type Error = io::Error;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> io::Result<()> {
        encode_frame(&item, 0, dst)
    }
}

/// Encode `item` as the head of one frame into `dst`: length prefix, then the body,
/// serialized in place (no multi-megabyte payload goes through an intermediate `Vec`).
///
/// With `tail_len > 0`, `item`'s encoding must end with an empty byte string that
/// stands for `tail_len` bytes sent right after the head, as they are (see
/// [`ServerFrame::split_data`](crate::proto::ServerFrame::split_data)): the head then
/// carries that string's real length and the frame's length counts the tail.
pub fn encode_frame<T: Serialize>(item: &T, tail_len: usize, dst: &mut BytesMut) -> io::Result<()> {
    let start = dst.len();
    dst.put_u32(0);
    let mut writer = dst.writer();
    let encoded = bincode::serde::encode_into_std_write(item, &mut writer, bincode_config());
    let dst = writer.into_inner();
    let refuse = |dst: &mut BytesMut, why: String| {
        dst.truncate(start);
        Err(io::Error::new(io::ErrorKind::InvalidInput, why))
    };
    if let Err(e) = encoded {
        return refuse(dst, format!("encode: {e}"));
    }
    if tail_len > 0 {
        // The empty string's length (a one-byte varint 0) becomes the tail's length.
        if dst.len() == start + 4 || dst[dst.len() - 1] != 0 {
            return refuse(dst, "encode: no empty byte string at the end".into());
        }
        dst.truncate(dst.len() - 1);
        let mut writer = dst.writer();
        let encoded =
            bincode::encode_into_std_write(tail_len as u64, &mut writer, bincode_config());
        if let Err(e) = encoded {
            return refuse(writer.into_inner(), format!("encode: {e}"));
        }
    }
    let body_len = dst.len() - start - 4 + tail_len;
    if body_len > MAX_FRAME {
        return refuse(
            dst,
            format!("frame of {body_len} bytes exceeds the {MAX_FRAME}-byte limit"),
        );
    }
    dst[start..start + 4].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(())
}

impl<Out, In: DeserializeOwned> Decoder for FrameCodec<Out, In> {
    type Item = In;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<In>> {
        match self.framing.decode(src)? {
            Some(body) => {
                let body = body.freeze();
                let _frame = FrameInDecode::set(&body);
                decode_body(&body).map(Some)
            }
            None => {
                // Room for what comes next: the reader reads into the spare capacity
                // only, and a reply that straddles its end costs a second `recv`.
                // (Once its header is in, the framing reserves the rest of a frame.)
                if src.capacity() - src.len() < READ_ROOM / 4 {
                    src.reserve(READ_ROOM);
                }
                Ok(None)
            }
        }
    }
}

/// Spare room kept in a connection's read buffer (see [`FrameCodec::decode`]).
const READ_ROOM: usize = 64 * 1024;

thread_local! {
    /// The frame [`FrameCodec::decode`] is decoding on this thread, if any.
    static FRAME: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Marks a frame as being decoded on this thread until dropped.
struct FrameInDecode;

impl FrameInDecode {
    fn set(body: &Bytes) -> FrameInDecode {
        FRAME.with(|f| *f.borrow_mut() = Some(body.clone()));
        FrameInDecode
    }
}

impl Drop for FrameInDecode {
    fn drop(&mut self) {
        FRAME.with(|f| *f.borrow_mut() = None);
    }
}

/// `bytes` as a `Bytes`: a view into the frame being decoded when it lies inside it
/// (no copy), a copy otherwise.
pub(crate) fn share_of_frame(bytes: &[u8]) -> Bytes {
    FRAME.with(|f| match f.borrow().as_ref() {
        Some(frame) if contains(frame, bytes) => frame.slice_ref(bytes),
        _ => Bytes::copy_from_slice(bytes),
    })
}

fn contains(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    !inner.is_empty() && i >= o && i + inner.len() <= o + outer.len()
}

/// What a client uses: sends requests, receives server frames.
pub type ClientCodec = FrameCodec<crate::proto::RequestFrame, crate::proto::ServerFrame>;
/// What a server uses: sends server frames, receives requests.
pub type ServerCodec = FrameCodec<crate::proto::ServerFrame, crate::proto::RequestFrame>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::proto::*;
    use proptest::prelude::*;

    fn roundtrip(req: Request) {
        let frame = RequestFrame {
            id: 7,
            caller: Caller { uid: 1, gid: 2 },
            request: req,
            once: None,
        };
        let mut buf = BytesMut::new();
        ClientCodec::new().encode(frame.clone(), &mut buf).unwrap();
        let got = ServerCodec::new().decode(&mut buf).unwrap().unwrap();
        assert_eq!(got, frame);
        assert!(buf.is_empty());
    }

    /// A `Data` reply sent as a head plus its data is byte for byte the frame the codec
    /// makes of it whole, at every varint width of the length.
    #[test]
    fn a_split_data_reply_is_the_same_frame() {
        for len in [1usize, 250, 251, 65_535, 65_536, 4 << 20] {
            let data: Bytes = (0..len).map(|i| (i * 7) as u8).collect::<Vec<u8>>().into();
            let frame = ServerFrame::Reply {
                id: 1 << 40,
                result: Ok(Response::Data(data.clone())),
            };
            let mut whole = BytesMut::new();
            ServerCodec::new()
                .encode(frame.clone(), &mut whole)
                .unwrap();
            let (head, tail) = frame.split_data(1);
            let tail = tail.unwrap();
            assert_eq!(tail, data);
            let mut split = BytesMut::new();
            encode_frame(&head, tail.len(), &mut split).unwrap();
            split.extend_from_slice(&tail);
            assert_eq!(split, whole, "len {len}");
        }
        // Below the threshold, or not data: whole.
        let small = ServerFrame::Reply {
            id: 1,
            result: Ok(Response::Data(Bytes::from_static(b"abc"))),
        };
        assert_eq!(small.clone().split_data(4), (small, None));
        let err = ServerFrame::Reply {
            id: 1,
            result: Err(5),
        };
        assert_eq!(err.clone().split_data(0), (err.clone(), None));
        // A frame that does not end with an empty byte string is refused, not mangled.
        let mut buf = BytesMut::new();
        assert!(encode_frame(&err, 10, &mut buf).is_err());
        assert!(buf.is_empty());
    }

    /// A read reply's or a write's data is a view into the received frame, not a copy.
    #[test]
    fn data_is_not_copied_out_of_its_frame() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
        let mut buf = BytesMut::new();
        ServerCodec::new()
            .encode(
                ServerFrame::Reply {
                    id: 3,
                    result: Ok(Response::data(data.clone())),
                },
                &mut buf,
            )
            .unwrap();
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let got = ClientCodec::new().decode(&mut buf).unwrap().unwrap();
        let ServerFrame::Reply {
            result: Ok(Response::Data(d)),
            ..
        } = got
        else {
            panic!("not a data reply: {got:?}");
        };
        assert_eq!(d, data);
        assert!(range.contains(&(d.as_ptr() as usize)));
        // The same for the data of a write, on the server's side.
        let mut buf = BytesMut::new();
        ClientCodec::new()
            .encode(
                RequestFrame {
                    id: 4,
                    caller: Caller::default(),
                    request: Request::Write {
                        handle: 1,
                        offset: 0,
                        data: data.clone().into(),
                    },
                    once: None,
                },
                &mut buf,
            )
            .unwrap();
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        let got = ServerCodec::new().decode(&mut buf).unwrap().unwrap();
        let Request::Write { data: w, .. } = got.request else {
            panic!("not a write: {got:?}");
        };
        assert_eq!(w, data);
        assert!(range.contains(&(w.as_ptr() as usize)));
        // Outside a decode, bytes are copied.
        let copy = share_of_frame(&data[..10]);
        assert_eq!(copy, data[..10]);
        assert_ne!(copy.as_ptr(), data.as_ptr());
    }

    #[test]
    fn roundtrips() {
        roundtrip(Request::Ping);
        roundtrip(Request::Write {
            handle: 3,
            offset: 1 << 40,
            data: vec![9; 100_000].into(),
        });
        roundtrip(Request::Rename {
            parent: RelPath(b"a/b".to_vec()),
            name: Name(b"x".to_vec()),
            new_parent: RelPath::root(),
            new_name: Name(b"y".to_vec()),
            flags: rename_flags::EXCHANGE,
        });
    }

    #[test]
    fn oversized_header_is_rejected_without_allocating() {
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        buf.put_slice(b"abc");
        let err = ServerCodec::new().decode(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn huge_length_inside_body_is_rejected() {
        // A Write whose byte-string length claims 1 TiB: the limit must stop it.
        let mut body = Vec::new();
        body.push(1u8); // id
        body.extend_from_slice(&[0, 0]); // caller
        body.push(15); // Request::Write variant index
        body.extend_from_slice(&[1, 0]); // handle, offset
        body.push(253); // u64 varint marker
        body.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.put_slice(&body);
        assert!(ServerCodec::new().decode(&mut buf).is_err());
    }

    #[test]
    fn partial_frame_waits_for_more() {
        let mut full = BytesMut::new();
        ClientCodec::new()
            .encode(
                RequestFrame {
                    id: 1,
                    caller: Caller::default(),
                    request: Request::Ping,
                    once: None,
                },
                &mut full,
            )
            .unwrap();
        let mut part = BytesMut::from(&full[..full.len() - 1]);
        assert!(ServerCodec::new().decode(&mut part).unwrap().is_none());
    }

    #[test]
    fn trailing_garbage_is_rejected() {
        let mut body = encode_body(&RequestFrame {
            id: 1,
            caller: Caller::default(),
            request: Request::Ping,
            once: None,
        })
        .unwrap();
        body.push(0);
        assert!(decode_body::<RequestFrame>(&body).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut codec = ServerCodec::new();
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            let _ = decode_body::<ServerFrame>(&bytes);
            let _ = decode_body::<Hello>(&bytes);
        }
    }
}
