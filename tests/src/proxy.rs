//! A TCP proxy between a mount and its server that can lose one answer: armed with a
//! request kind ([`CutProxy::lose_reply_to`]), it lets the next request of that kind
//! reach the server, and when the server's reply comes it cuts the connection instead
//! of passing the reply on. What a client sees when the network drops right after the
//! server did the work. Other connections, and new ones after the cut, pass unchanged.
//!
//! With [`CutProxy::hold_after_cut`], connections made after the next cut wait until
//! [`CutProxy::release`]: time for a test to restart the server before the client can
//! send anything again.
//!
//! Frames are read whole (4-byte big-endian length, then the body) and decoded only to
//! learn request kinds and reply ids; the bytes forwarded are the bytes read.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use ferry_common::codec::decode_body;
use ferry_common::proto::{MAX_FRAME, RequestFrame, ServerFrame};

#[derive(Default)]
struct Shared {
    /// The kind whose next request loses its reply.
    armed: Mutex<Option<String>>,
    /// The kind whose next request is lost itself (never reaches the server).
    armed_request: Mutex<Option<String>>,
    /// Replies lost so far.
    cuts: AtomicUsize,
    /// The next cut holds new connections.
    hold_next: AtomicBool,
    /// New connections wait while this is true.
    held: Mutex<bool>,
    released: Condvar,
    stopping: AtomicBool,
    /// Every socket made, shut down when the proxy goes.
    sockets: Mutex<Vec<TcpStream>>,
}

pub struct CutProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl CutProxy {
    /// A proxy on a free loopback port in front of `server`.
    pub fn start(server: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared::default());
        let sh = Arc::clone(&shared);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if sh.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                sh.wait_released();
                if sh.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(upstream) = TcpStream::connect(server) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                if let Err(e) = connect_pair(&sh, client, upstream) {
                    eprintln!("proxy: {e}");
                }
            }
        });
        CutProxy { addr, shared }
    }

    /// The `host:port` to mount.
    pub fn remote(&self) -> String {
        self.addr.to_string()
    }

    /// Lose the reply to the next request of `kind` (`Request::kind`: "rename",
    /// "mkdir", ...), on whichever connection it comes.
    pub fn lose_reply_to(&self, kind: &str) {
        if let Ok(mut a) = self.shared.armed.lock() {
            *a = Some(kind.to_string());
        }
    }

    /// Lose the next request of `kind` itself: the connection is cut before it reaches
    /// the server.
    pub fn lose_request(&self, kind: &str) {
        if let Ok(mut a) = self.shared.armed_request.lock() {
            *a = Some(kind.to_string());
        }
    }

    /// Replies (or requests) lost so far.
    pub fn cuts(&self) -> usize {
        self.shared.cuts.load(Ordering::SeqCst)
    }

    /// Connections made after the next cut wait (accepted, not yet passed on to the
    /// server) until [`CutProxy::release`].
    pub fn hold_after_cut(&self) {
        self.shared.hold_next.store(true, Ordering::SeqCst);
    }

    /// Let held connections through to the server.
    pub fn release(&self) {
        self.shared.release();
    }
}

impl Shared {
    /// A reply or request was lost (the connection is cut right after).
    fn lost(&self) {
        if self.hold_next.swap(false, Ordering::SeqCst)
            && let Ok(mut held) = self.held.lock()
        {
            *held = true;
        }
        self.cuts.fetch_add(1, Ordering::SeqCst);
    }

    fn wait_released(&self) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        while *held && !self.stopping.load(Ordering::SeqCst) {
            held = match self.released.wait(held) {
                Ok(h) => h,
                Err(_) => return,
            };
        }
    }

    fn release(&self) {
        if let Ok(mut held) = self.held.lock() {
            *held = false;
        }
        self.released.notify_all();
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.release();
        // Wakes the accepting thread, which then sees `stopping`.
        let _ = TcpStream::connect(self.addr);
        if let Ok(socks) = self.shared.sockets.lock() {
            for s in socks.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn connect_pair(sh: &Arc<Shared>, client: TcpStream, upstream: TcpStream) -> io::Result<()> {
    {
        let mut socks = sh
            .sockets
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        socks.push(client.try_clone()?);
        socks.push(upstream.try_clone()?);
    }
    // The id of this connection's request whose reply is to be lost.
    let target: Arc<Mutex<Option<u64>>> = Arc::default();
    let (c_in, s_out) = (client.try_clone()?, upstream.try_clone()?);
    let (s_in, c_out) = (upstream, client);
    {
        let (sh, target) = (Arc::clone(sh), Arc::clone(&target));
        std::thread::spawn(move || to_server(&sh, c_in, s_out, &target));
    }
    let sh = Arc::clone(sh);
    std::thread::spawn(move || to_client(&sh, s_in, c_out, &target));
    Ok(())
}

fn read_frame(from: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    from.read_exact(&mut len)?;
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME + 16 {
        return Err(io::Error::other("oversized frame"));
    }
    let mut frame = len.to_vec();
    frame.resize(4 + n, 0);
    from.read_exact(&mut frame[4..])?;
    Ok(frame)
}

fn cut(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// Client to server: the first frame is the handshake; each request after it is looked
/// at before it is passed on (so its reply cannot come before it is known).
fn to_server(sh: &Shared, mut from: TcpStream, mut to: TcpStream, target: &Mutex<Option<u64>>) {
    let mut first = true;
    while let Ok(frame) = read_frame(&mut from) {
        let request = match first {
            true => None,
            false => decode_body::<RequestFrame>(&frame[4..]).ok(),
        };
        if let Some(req) = &request
            && let Ok(mut armed) = sh.armed_request.lock()
            && armed.as_deref() == Some(req.request.kind())
        {
            *armed = None;
            sh.lost();
            break;
        }
        if let Some(req) = request
            && let Ok(mut armed) = sh.armed.lock()
            && armed.as_deref() == Some(req.request.kind())
            && let Ok(mut t) = target.lock()
            && t.is_none()
        {
            *t = Some(req.id);
            *armed = None;
        }
        first = false;
        if to.write_all(&frame).is_err() {
            break;
        }
    }
    cut(&from, &to);
}

/// Server to client: the reply to the target request is not passed on; the connection
/// is cut instead.
fn to_client(sh: &Shared, mut from: TcpStream, mut to: TcpStream, target: &Mutex<Option<u64>>) {
    let mut first = true;
    while let Ok(frame) = read_frame(&mut from) {
        if !first
            && let Ok(ServerFrame::Reply { id, .. }) = decode_body::<ServerFrame>(&frame[4..])
            && target.lock().is_ok_and(|t| *t == Some(id))
        {
            sh.lost();
            break;
        }
        first = false;
        if to.write_all(&frame).is_err() {
            break;
        }
    }
    cut(&from, &to);
}
