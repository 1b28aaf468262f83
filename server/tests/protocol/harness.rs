//! Test harness: an in-process server over a temporary export, and a raw protocol
//! client that does the handshake by hand. Every server is stopped on `Drop`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ferry_common::codec::{ClientCodec, decode_body, encode_body};
use ferry_common::*;
use futures::{SinkExt, StreamExt};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;

/// Upper bound for anything a test waits on; a hang fails instead of blocking CI.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct Server {
    pub addr: SocketAddr,
    /// Holds `export/` (what is served) and `outside/` (what must stay untouchable).
    pub dir: TempDir,
    /// What is served (tests reach its commit records and hidden folder).
    pub export: Arc<ferry_server::Export>,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<()>>,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(false).await
    }

    pub async fn start_with(read_only: bool) -> Server {
        Server::start_opts(read_only, ferry_server::Options::default()).await
    }

    pub async fn start_opts(read_only: bool, options: ferry_server::Options) -> Server {
        let dir = TempDir::new().unwrap();
        std::fs::create_dir(dir.path().join("export")).unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/secret"), b"top secret").unwrap();
        let export =
            Arc::new(ferry_server::Export::open(&dir.path().join("export"), read_only).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ferry_server::run_with(
            listener,
            Arc::clone(&export),
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            dir,
            export,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("export")
    }

    pub fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    pub async fn client(&self) -> Client {
        Client::connect(
            self.addr,
            caps::CALLER_CREDS | caps::COPY_RANGE | caps::XATTR_HINTS,
        )
        .await
    }

    /// Trigger shutdown; `run` must then return within the deadline.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn stop(mut self) {
        self.begin_stop();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.begin_stop();
    }
}

/// Send a raw handshake frame and read the raw reply frame (None on EOF).
pub async fn raw_handshake(stream: &mut TcpStream, body: &[u8]) -> Option<Vec<u8>> {
    let mut msg = (body.len() as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(body);
    stream.write_all(&msg).await.unwrap();
    read_raw_frame(stream).await
}

pub async fn read_raw_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    let r = tokio::time::timeout(DEADLINE, stream.read_exact(&mut len))
        .await
        .unwrap();
    if r.is_err() {
        return None;
    }
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut body))
        .await
        .unwrap()
        .ok()?;
    Some(body)
}

/// Whether the server closed the connection (EOF or reset) within the deadline.
pub async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

pub struct Client {
    pub framed: Framed<TcpStream, ClientCodec>,
    pub welcome: Welcome,
    next_id: u64,
    pub caller: Caller,
    /// Events that arrived while waiting for a reply, oldest first.
    pub events: std::collections::VecDeque<Event>,
}

impl Client {
    pub async fn connect(addr: SocketAddr, capabilities: u64) -> Client {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let body = encode_body(&Hello::new("test", capabilities)).unwrap();
        let reply = raw_handshake(&mut stream, &body)
            .await
            .expect("hello reply");
        let welcome = match decode_body::<HelloReply>(&reply).unwrap() {
            HelloReply::Welcome(w) => w,
            HelloReply::Refused { reason, .. } => panic!("refused: {reason}"),
        };
        Client {
            framed: Framed::new(stream, ClientCodec::new()),
            welcome,
            next_id: 1,
            caller: Caller { uid: 0, gid: 0 },
            events: Default::default(),
        }
    }

    pub async fn send(&mut self, request: Request) -> u64 {
        self.send_keyed(request, None).await
    }

    pub async fn send_keyed(&mut self, request: Request, once: Option<OnceKey>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let caller = self.caller;
        self.framed
            .send(RequestFrame {
                id,
                caller,
                request,
                once,
            })
            .await
            .unwrap();
        id
    }

    /// [`Client::call`] of a change named by `once`.
    pub async fn call_keyed(&mut self, request: Request, once: OnceKey) -> Result<Response, i32> {
        let id = self.send_keyed(request, Some(once)).await;
        let (got, result) = self.recv().await.expect("connection open");
        assert_eq!(got, id);
        result.map(|r| r.inner().clone())
    }

    /// Next reply; None if the server closed the connection. Events arriving meanwhile
    /// are kept in `events`.
    pub async fn recv(&mut self) -> Option<(u64, Result<Response, i32>)> {
        loop {
            match tokio::time::timeout(DEADLINE, self.framed.next())
                .await
                .expect("reply in time")
            {
                Some(Ok(ServerFrame::Reply { id, result })) => return Some((id, result)),
                Some(Ok(ServerFrame::Event(e))) => self.events.push_back(e),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next event (buffered or from the stream), or None if nothing arrives within
    /// `timeout`. A reply arriving here is a test bug.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        match tokio::time::timeout(timeout, self.framed.next()).await {
            Err(_) => None,
            Ok(Some(Ok(ServerFrame::Event(e)))) => Some(e),
            Ok(other) => panic!("expected an event, got {other:?}"),
        }
    }

    /// Skip events until one satisfies `pred`; panics after `DEADLINE`. Returns it and
    /// the events skipped before it.
    pub async fn wait_event(
        &mut self,
        what: &str,
        pred: impl Fn(&Event) -> bool,
    ) -> (Event, Vec<Event>) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(e) if pred(&e) => return (e, skipped),
                Some(e) => skipped.push(e),
                None => panic!("no event {what} within {DEADLINE:?}; got {skipped:#?}"),
            }
        }
    }

    /// The reply, without the changed directory's attributes that namespace changes
    /// carry (see [`Client::call_raw`]).
    pub async fn call(&mut self, request: Request) -> Result<Response, i32> {
        self.call_raw(request).await.map(|r| r.inner().clone())
    }

    pub async fn call_raw(&mut self, request: Request) -> Result<Response, i32> {
        let id = self.send(request).await;
        let (got, result) = self.recv().await.expect("connection open");
        assert_eq!(got, id);
        result
    }

    pub async fn attr(&mut self, request: Request) -> Result<Attr, i32> {
        match self.call(request).await? {
            Response::Attr(a) => Ok(a),
            other => panic!("expected Attr, got {other:?}"),
        }
    }

    pub async fn lookup(&mut self, parent: &str, name: &str) -> Result<Attr, i32> {
        self.attr(Request::Lookup {
            parent: p(parent),
            name: n(name),
        })
        .await
    }

    pub async fn getattr(&mut self, path: &str) -> Result<Attr, i32> {
        self.attr(Request::GetAttr {
            path: p(path),
            handle: None,
        })
        .await
    }

    pub async fn open(&mut self, path: &str, flags: i32) -> Result<(u64, Attr), i32> {
        opened(
            self.call(Request::Open {
                path: p(path),
                flags,
                inline_max: 0,
                staged: false,
            })
            .await,
        )
    }

    /// `Open` asking for inline data; `Some(data)` when the server sent it.
    pub async fn open_inline(
        &mut self,
        path: &str,
        flags: i32,
        inline_max: u32,
    ) -> Result<(u64, Attr, Option<Vec<u8>>), i32> {
        match self
            .call(Request::Open {
                path: p(path),
                flags,
                inline_max,
                staged: false,
            })
            .await?
        {
            Response::Opened { handle, attr } => Ok((handle, attr, None)),
            Response::OpenedWithData { handle, attr, data } => Ok((handle, attr, Some(data))),
            other => panic!("expected Opened, got {other:?}"),
        }
    }

    /// `Open { staged: true }` without inline data.
    pub async fn open_staged(&mut self, path: &str, flags: i32) -> Result<(u64, Attr), i32> {
        opened(
            self.call(Request::Open {
                path: p(path),
                flags,
                inline_max: 0,
                staged: true,
            })
            .await,
        )
    }

    pub async fn handle_attr(&mut self, handle: u64) -> Result<Attr, i32> {
        self.attr(Request::GetAttr {
            path: RelPath::root(),
            handle: Some(handle),
        })
        .await
    }

    pub async fn commit(&mut self, handle: u64) -> Result<Attr, i32> {
        self.attr(Request::Commit { handle }).await
    }

    pub async fn truncate_handle(&mut self, handle: u64, size: u64) -> Result<Attr, i32> {
        self.attr(Request::SetAttr {
            path: RelPath::root(),
            handle: Some(handle),
            set: SetAttr {
                size: Some(size),
                ..Default::default()
            },
        })
        .await
    }

    pub async fn create(
        &mut self,
        parent: &str,
        name: &str,
        mode: u32,
        flags: i32,
    ) -> Result<(u64, Attr), i32> {
        opened(
            self.call(Request::Create {
                parent: p(parent),
                name: n(name),
                mode,
                umask: 0o022,
                flags,
            })
            .await,
        )
    }

    pub async fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, i32> {
        match self
            .call(Request::Read {
                handle,
                offset,
                len,
            })
            .await?
        {
            Response::Data(d) => Ok(Vec::from(d)),
            other => panic!("expected Data, got {other:?}"),
        }
    }

    pub async fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        match self
            .call(Request::Write {
                handle,
                offset,
                data: data.to_vec().into(),
            })
            .await?
        {
            Response::Written { len } => Ok(len),
            other => panic!("expected Written, got {other:?}"),
        }
    }

    pub async fn mkdir(&mut self, parent: &str, name: &str) -> Result<Attr, i32> {
        self.attr(Request::MkDir {
            parent: p(parent),
            name: n(name),
            mode: 0o755,
            umask: 0,
        })
        .await
    }

    pub async fn symlink(&mut self, parent: &str, name: &str, target: &str) -> Result<Attr, i32> {
        self.attr(Request::Symlink {
            parent: p(parent),
            name: n(name),
            target: target.as_bytes().to_vec(),
        })
        .await
    }

    pub async fn setattr(&mut self, path: &str, set: SetAttr) -> Result<Attr, i32> {
        self.attr(Request::SetAttr {
            path: p(path),
            handle: None,
            set,
        })
        .await
    }
}

fn opened(r: Result<Response, i32>) -> Result<(u64, Attr), i32> {
    match r? {
        Response::Opened { handle, attr } => Ok((handle, attr)),
        other => panic!("expected Opened, got {other:?}"),
    }
}

pub fn p(s: &str) -> RelPath {
    RelPath(s.as_bytes().to_vec())
}

pub fn n(s: &str) -> Name {
    Name(s.as_bytes().to_vec())
}

/// A length-prefixed frame with an arbitrary body, for malformed-input tests.
pub fn raw_frame(body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.extend_from_slice(&(body.len() as u32).to_be_bytes());
    b.extend_from_slice(body);
    b
}

/// A small deterministic generator (xorshift*): reproducible random tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
