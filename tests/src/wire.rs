//! A raw protocol client over a plain blocking `TcpStream`: the 4-byte big-endian length
//! prefix written by hand around [`encode_body`]/[`decode_body`], so tests can also send
//! what a well-behaved client never would (bad magic, huge lengths, truncated frames).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ferry_common::codec::{decode_body, encode_body};
use ferry_common::proto::{
    Caller, FileKind, Hello, HelloReply, MAX_FRAME, RelPath, Request, RequestFrame, Response,
    ServerFrame, Welcome,
};

/// How long a read waits for the server before a test fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);

pub struct RawConn {
    stream: TcpStream,
    next_id: u64,
    pub caller: Caller,
}

impl RawConn {
    /// Connects (no handshake).
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("set_read_timeout");
        stream.set_nodelay(true).expect("set_nodelay");
        RawConn {
            stream,
            next_id: 1,
            caller: Caller { uid: 0, gid: 0 },
        }
    }

    /// Connects and completes a normal handshake; panics unless welcomed.
    pub fn handshake(addr: SocketAddr) -> (RawConn, Welcome) {
        let mut c = RawConn::connect(addr);
        c.send_hello(&Hello::new("ferry-tests", 0))
            .expect("sending Hello");
        match c.read_hello_reply() {
            Ok(HelloReply::Welcome(w)) => (c, w),
            other => panic!("expected Welcome from {addr}, got {other:?}"),
        }
    }

    /// Writes bytes as they are.
    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Writes one frame: big-endian length, then `body`.
    pub fn write_frame(&mut self, body: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(4 + body.len());
        buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
        buf.extend_from_slice(body);
        self.write_raw(&buf)
    }

    pub fn send_hello(&mut self, hello: &Hello) -> io::Result<()> {
        let body = encode_body(hello)?;
        self.write_frame(&body)
    }

    /// Reads one frame body (refusing a length over [`MAX_FRAME`]).
    pub fn read_frame(&mut self) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("server sent a {len}-byte frame"),
            ));
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body)?;
        Ok(body)
    }

    pub fn read_hello_reply(&mut self) -> io::Result<HelloReply> {
        let body = self.read_frame()?;
        decode_body(&body)
    }

    pub fn read_server_frame(&mut self) -> io::Result<ServerFrame> {
        let body = self.read_frame()?;
        decode_body(&body)
    }

    /// Sends `request` with a fresh id; returns the id.
    pub fn send_request(&mut self, request: Request) -> io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let body = encode_body(&RequestFrame {
            id,
            caller: self.caller,
            request,
            once: None,
        })?;
        self.write_frame(&body)?;
        Ok(id)
    }

    /// Reads frames until the reply to `id` (skipping events); panics on anything else.
    pub fn reply_to(&mut self, id: u64) -> Result<Response, i32> {
        loop {
            match self.read_server_frame() {
                Ok(ServerFrame::Reply { id: got, result }) => {
                    assert_eq!(got, id, "reply to the wrong request");
                    return result;
                }
                Ok(ServerFrame::Event(_)) => continue,
                Err(e) => panic!("reading the reply to request {id}: {e}"),
            }
        }
    }

    /// One request, one reply. Panics on a transport error; returns the server's result.
    pub fn call(&mut self, request: Request) -> Result<Response, i32> {
        let id = self
            .send_request(request)
            .unwrap_or_else(|e| panic!("sending a request: {e}"));
        self.reply_to(id)
    }

    /// Half-closes our side (the server sees end of stream).
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Reads until the server closes the connection. `Ok(bytes it sent before closing)`;
    /// `Err` if it was still open after `timeout`.
    pub fn wait_closed(&mut self, timeout: Duration) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "connection still open after {timeout:?} ({} bytes received)",
                    seen.len()
                ));
            }
            self.stream
                .set_read_timeout(Some(left))
                .expect("set_read_timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(seen),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Ok(seen);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("unexpected read error: {e}")),
            }
        }
    }
}

/// A relative path from a `&str`.
pub fn rel(p: &str) -> RelPath {
    RelPath(p.as_bytes().to_vec())
}

/// A name from a `&str`.
pub fn name(n: &str) -> ferry_common::proto::Name {
    ferry_common::proto::Name(n.as_bytes().to_vec())
}

/// A plain `Open` request (no inline data, no staging): one place to follow protocol
/// changes to this request.
pub fn open(path: &str, flags: i32) -> Request {
    Request::Open {
        path: rel(path),
        flags,
        inline_max: 0,
        staged: false,
    }
}

/// A fresh client can connect, be welcomed, ping, and stat the export root.
#[track_caller]
pub fn assert_healthy(addr: SocketAddr) {
    let (mut c, w) = RawConn::handshake(addr);
    assert_eq!(w.root.kind, FileKind::Dir, "export root is not a directory");
    assert_eq!(c.call(Request::Ping), Ok(Response::Pong), "ping");
    match c.call(Request::GetAttr {
        path: RelPath::root(),
        handle: None,
    }) {
        Ok(Response::Attr(a)) => assert_eq!(a.kind, FileKind::Dir),
        other => panic!("GetAttr of the root: {other:?}"),
    }
}
