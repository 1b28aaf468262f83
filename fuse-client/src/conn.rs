//! One multiplexed connection to `ferryd`, with liveness and lazy reconnect.
//!
//! Any number of tasks call [`Client::call`] concurrently; each request gets an id, is
//! written to the socket in queueing order (by the queueing thread itself when it can,
//! or, for a request nobody waits for at once, with the next one: see `Outbox`), and
//! its reply is routed back by id whenever the server finishes it
//! (replies arrive out of order; [`Sent::then`] handles one on the reader, no task
//! waiting). A watchdog declares the connection
//! dead when requests are outstanding and nothing has arrived for `timeout` (pings keep
//! a slow but healthy link alive), so no caller waits forever: a dead server costs an
//! error within seconds, never a frozen `ls`. The next call reconnects.
//!
//! This module must never block a thread (it runs on the tokio runtime the FUSE adapter
//! spawns onto) and never interprets filesystem semantics: it moves frames.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use ferry_common::codec::{ClientCodec, FrameCodec};
use ferry_common::proto::{
    Caller, Event, Hello, HelloReply, OnceKey, PROTOCOL_VERSION, Request, RequestFrame, Response,
    ServerFrame, Welcome, caps,
};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Notify, oneshot};
use tokio_util::codec::{Encoder, Framed, FramedRead};
use tokio_util::sync::CancellationToken;

use crate::error::TransportError;

/// Capabilities this client asks for.
const CLIENT_CAPS: u64 = caps::CALLER_CREDS
    | caps::EVENTS
    | caps::COPY_RANGE
    | caps::READ_SMALL
    | caps::ORDERED_UNLINK
    | caps::LOCATE
    | caps::PARTIAL_WATCHES
    | caps::CHECKED_LOOKUP;

/// Where events pushed by the server go.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// What became of one request: the transport failed, or the server's reply (its errno
/// on failure).
pub type Outcome = Result<Result<Response, i32>, TransportError>;

/// Code run on the connection's reader with a request's outcome ([`Sent::then`]).
pub type OnReply = Box<dyn FnOnce(Outcome) + Send>;

/// Who is waiting for each request's reply, by id.
type Pending = Mutex<HashMap<u64, Waiter>>;

enum Waiter {
    /// A task awaiting [`Sent::reply`].
    Task(oneshot::Sender<Result<Response, i32>>),
    /// Code to run with the reply; no task waits.
    Then(OnReply),
}

/// Take every waiter out (the connection is gone) and tell each: tasks see their
/// sender dropped, handlers run here, outside the lock.
fn abandon(pending: &Pending, silent: &AtomicBool) {
    let waiters = match pending.lock() {
        Ok(mut p) => std::mem::take(&mut *p),
        Err(_) => return,
    };
    for (_, w) in waiters {
        if let Waiter::Then(f) = w {
            f(Err(lost(silent)));
        }
    }
}

/// How a request learns its connection is gone: dropped by the watchdog (`silent`), or
/// closed or reset.
fn lost(silent: &AtomicBool) -> TransportError {
    match silent.load(Ordering::SeqCst) {
        true => TransportError::Silent,
        false => TransportError::Disconnected,
    }
}

/// A live connection. Dropped (and its tasks stopped) once it is declared dead.
struct Conn {
    generation: u64,
    out: Arc<Outbox>,
    // std Mutex: held for a map insert/remove only, never across an await.
    pending: Arc<Pending>,
    next_id: AtomicU64,
    dead: CancellationToken,
    /// Dropped by the watchdog: the server said nothing for `timeout`.
    silent: Arc<AtomicBool>,
    /// The server's `Welcome::instance` (its table of answers to keyed changes).
    instance: u64,
}

impl Conn {
    fn is_dead(&self) -> bool {
        self.dead.is_cancelled()
    }
}

/// The sending side of a connection. A request is encoded and written to the socket by
/// the thread that queues it, FUSE session thread or runtime worker alike, as long as
/// nothing is waiting to go out before it; only what the socket does not take at once
/// is left to the writer task. Most requests thus cost no hand-off to another thread
/// (on a 2-CPU machine, waking the writer was one context switch per request). Order
/// is kept: bytes leave in the order frames were queued, under one lock.
///
/// A request nobody waits for at once (a write answered ahead, a setattr sent behind
/// the writes, a release) may be *deferred*: its frame stays in the buffer until the
/// next request that is not deferred, an [`Client::uncork`], or [`CORK_DELAY`] later,
/// so that `tar`'s write, write, setattr and commit of a small file go out in one
/// system call (and reach the server in one read) instead of four.
struct Outbox {
    half: OwnedWriteHalf,
    // std Mutex: held to encode a frame and for non-blocking writes, never across an
    // await.
    queue: Mutex<Outgoing>,
    /// Tells the writer task there are bytes the socket did not take.
    wake: Notify,
    /// Tells the writer task deferred frames wait in the buffer.
    cork: Notify,
    dead: CancellationToken,
}

/// How long a deferred frame waits at most for a request to go out with.
const CORK_DELAY: Duration = Duration::from_millis(2);

/// Most bytes of deferred frames kept back: past it they go out at once.
const CORK_MAX: usize = 64 * 1024;

/// Largest frame the queueing thread writes itself; larger ones (big writes) go to the
/// writer task. Copying up to 64 KiB into the socket costs the caller less than waking
/// the writer (`tar` writes files in records of 10 KiB).
const WRITE_HERE_MAX: usize = 64 * 1024;

#[derive(Default)]
struct Outgoing {
    /// Encoded frames not yet written, oldest first.
    buf: BytesMut,
    codec: ClientCodec,
    /// The writer task owns the rest of `buf`: nobody else writes until it is empty.
    writer_has_it: bool,
    /// The writer task ticks (every [`CORK_DELAY`], sending deferred frames nothing
    /// else took along), or has been told to start.
    cork_armed: bool,
    /// A frame was deferred since the last tick: the ticks go on.
    deferred_lately: bool,
}

impl Outbox {
    /// Queue one frame and write whatever the socket takes now, or, for a `deferred`
    /// one, leave it with any before it until something else goes out (see
    /// [`Outbox`]). `Err`: the connection is broken (and now declared dead).
    fn push(&self, frame: RequestFrame, deferred: bool) -> Result<(), ()> {
        let mut q = self.queue.lock().map_err(|_| ())?;
        if self.dead.is_cancelled() {
            return Err(());
        }
        let Outgoing { buf, codec, .. } = &mut *q;
        let before = buf.len();
        if let Err(e) = codec.encode(frame, buf) {
            tracing::warn!("cannot send a request: {e}");
            self.dead.cancel();
            return Err(());
        }
        if q.writer_has_it {
            return Ok(());
        }
        if deferred && q.buf.len() <= CORK_MAX {
            q.deferred_lately = true;
            if !q.cork_armed {
                q.cork_armed = true;
                drop(q);
                self.cork.notify_one();
            }
            return Ok(());
        }
        // A larger frame is left to the writer: copying it into the socket (and, on
        // loopback, through the server's side of it) would hold up the caller, where the
        // writer does it in parallel.
        let here = q.buf.len() - before <= WRITE_HERE_MAX;
        self.write_or_hand_over(q, here)
    }

    /// Send the deferred frames now (someone waits for one of their answers).
    fn uncork(&self) -> Result<(), ()> {
        let q = self.queue.lock().map_err(|_| ())?;
        if q.writer_has_it || q.buf.is_empty() {
            return Ok(());
        }
        self.write_or_hand_over(q, true)
    }

    /// Write what the socket takes now (unless not `here`) and leave the rest to the
    /// writer task.
    fn write_or_hand_over(
        &self,
        mut q: std::sync::MutexGuard<'_, Outgoing>,
        here: bool,
    ) -> Result<(), ()> {
        if here && let Err(e) = self.write_some(&mut q.buf) {
            tracing::warn!("connection to server broken: {e}");
            self.dead.cancel();
            return Err(());
        }
        if !q.buf.is_empty() {
            q.writer_has_it = true;
            drop(q);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Write from the front of `buf` until it is empty or the socket is full.
    fn write_some(&self, buf: &mut BytesMut) -> std::io::Result<()> {
        while !buf.is_empty() {
            match self.half.try_write(buf) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => buf.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The writer task: whenever `push` left bytes behind, write them as the socket
    /// drains, then hand writing back to `push`. While frames are being deferred it
    /// also ticks every [`CORK_DELAY`], sending those nothing else took along; the
    /// ticks stop after one without a frame deferred since the one before. (A tick per
    /// period, not a timer per deferred frame: `tar` defers a few frames per file,
    /// and each timer cost two wake-ups of this task.)
    async fn drain(&self) {
        let mut ticking = false;
        loop {
            let tick = if ticking {
                tokio::select! {
                    _ = self.dead.cancelled() => return,
                    _ = tokio::time::sleep(CORK_DELAY) => true,
                    // Bytes left behind: the deferred ones go with them.
                    _ = self.wake.notified() => false,
                }
            } else {
                tokio::select! {
                    _ = self.dead.cancelled() => return,
                    _ = self.wake.notified() => false,
                    _ = self.cork.notified() => {
                        ticking = true;
                        continue;
                    }
                }
            };
            if tick {
                let Ok(mut q) = self.queue.lock() else {
                    self.dead.cancel();
                    return;
                };
                if !std::mem::take(&mut q.deferred_lately) {
                    // (The next deferred frame tells this task to tick again.)
                    q.cork_armed = false;
                    ticking = false;
                }
                if q.writer_has_it || q.buf.is_empty() {
                    continue;
                }
                q.writer_has_it = true;
            }
            loop {
                tokio::select! {
                    _ = self.dead.cancelled() => return,
                    r = self.half.writable() => if let Err(e) = r {
                        tracing::warn!("connection to server broken: {e}");
                        self.dead.cancel();
                        return;
                    },
                }
                let Ok(mut q) = self.queue.lock() else {
                    self.dead.cancel();
                    return;
                };
                if let Err(e) = self.write_some(&mut q.buf) {
                    tracing::warn!("connection to server broken: {e}");
                    self.dead.cancel();
                    return;
                }
                if q.buf.is_empty() {
                    q.writer_has_it = false;
                    break;
                }
            }
        }
    }
}

/// Counters kept by the connection for `ferry stats` and tests.
#[derive(Default, Debug)]
pub struct ConnStats {
    pub requests: AtomicU64,
    /// Requests by kind (`Request::kind`).
    pub by_kind: Mutex<HashMap<&'static str, u64>>,
    pub events: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub reconnects: AtomicU64,
    /// Attempts to connect that failed (each try while a restarting server is waited
    /// for counts).
    pub connect_failures: AtomicU64,
    pub failures: AtomicU64,
}

pub struct Client {
    addr: String,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    generation: AtomicU64,
    welcome: Mutex<Option<Welcome>>,
    events: Mutex<Option<EventSink>>,
    connect_hook: Mutex<Option<ConnectHook>>,
    /// Generation of the connection while it is alive, 0 when there is none.
    live: Arc<AtomicU64>,
    /// Generation of the connection whose server said its events are incomplete
    /// (`Event::Incomplete`), 0 when none did.
    incomplete: AtomicU64,
    /// Generation of the connection whose connect hook (a reconnect's resync) has run:
    /// until then, what was cached before is not vouched for by this connection.
    hooked: AtomicU64,
    pub stats: ConnStats,
    closed: AtomicBool,
    /// Capabilities asked for besides [`CLIENT_CAPS`] (set before connecting).
    extra_caps: AtomicU64,
    /// A connection was made once: from then on a server that cannot be reached is
    /// waited for, up to `timeout`, before the call fails (see [`Client::current`]).
    ever_connected: AtomicBool,
    /// The last attempt to connect failed, when, and how; cleared by a connection.
    gave_up: Mutex<Option<(Instant, TransportError)>>,
    /// This client's [`OnceKey::session`] (random) and its last key.
    session: u64,
    once_seq: AtomicU64,
}

/// Pauses between connection attempts while a restarting server is waited for.
const RETRY_FIRST: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_millis(250);

/// Called with the new generation each time a connection is established.
pub type ConnectHook = Arc<dyn Fn(u64) + Send + Sync>;

impl Client {
    /// A client for `addr` (`host:port`). Nothing is connected until [`Client::connect`]
    /// or the first call.
    pub fn new(addr: impl Into<String>, timeout: Duration) -> Arc<Client> {
        Arc::new(Client {
            addr: addr.into(),
            timeout,
            conn: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            welcome: Mutex::new(None),
            events: Mutex::new(None),
            connect_hook: Mutex::new(None),
            live: Arc::new(AtomicU64::new(0)),
            incomplete: AtomicU64::new(0),
            hooked: AtomicU64::new(0),
            stats: ConnStats::default(),
            closed: AtomicBool::new(false),
            extra_caps: AtomicU64::new(0),
            ever_connected: AtomicBool::new(false),
            gave_up: Mutex::new(None),
            session: {
                use std::hash::BuildHasher;
                // RandomState's keys come from the OS's randomness, per process.
                std::collections::hash_map::RandomState::new()
                    .hash_one((std::process::id(), std::time::SystemTime::now()))
            },
            once_seq: AtomicU64::new(0),
        })
    }

    /// A new key for a change that must run at most once ([`Client::call_keyed`]).
    pub fn once_key(&self) -> OnceKey {
        OnceKey {
            session: self.session,
            seq: self.once_seq.fetch_add(1, Ordering::Relaxed),
            repeat: false,
        }
    }

    /// The repeat of a change named by `key` whose first send went to the server with
    /// `instance` and lost its connection: sent (marked `repeat`) only to a server with
    /// that instance (the same process, or one restarted that took over its answers);
    /// another may have run it and cannot know (`NotRemembered`, at once).
    pub async fn repeat_keyed(
        self: &Arc<Self>,
        generation: Option<u64>,
        caller: Caller,
        request: Request,
        key: OnceKey,
        instance: u64,
    ) -> Result<Result<Response, i32>, TransportError> {
        if let Some(g) = generation
            && self.live_generation() != Some(g)
        {
            return Err(self.failed(TransportError::StaleHandle));
        }
        let conn = self.current().await?;
        if conn.instance != instance {
            return Ok(Ok(Response::NotRemembered));
        }
        let repeat = OnceKey {
            repeat: true,
            ..key
        };
        self.enqueue(&conn, generation, caller, request, Some(repeat), false)?
            .reply()
            .await
    }

    /// [`Client::start_on`] of a change named by `key`.
    pub async fn start_keyed(
        self: &Arc<Self>,
        generation: Option<u64>,
        caller: Caller,
        request: Request,
        key: OnceKey,
    ) -> Result<Sent, TransportError> {
        if let Some(g) = generation
            && self.live_generation() != Some(g)
        {
            return Err(self.failed(TransportError::StaleHandle));
        }
        let conn = self.current().await?;
        self.enqueue(&conn, generation, caller, request, Some(key), false)
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn set_event_sink(&self, sink: EventSink) {
        if let Ok(mut e) = self.events.lock() {
            *e = Some(sink);
        }
    }

    pub fn set_connect_hook(&self, hook: ConnectHook) {
        if let Ok(mut h) = self.connect_hook.lock() {
            *h = Some(hook);
        }
    }

    /// The generation of the connection if one is alive right now (no waiting).
    pub fn live_generation(&self) -> Option<u64> {
        match self.live.load(Ordering::SeqCst) {
            0 => None,
            g => Some(g),
        }
    }

    /// Whether the server pushes change events on the live connection, every change
    /// (so that no event means no change).
    pub fn events_live(&self) -> bool {
        self.live_generation().is_some_and(|g| {
            self.incomplete.load(Ordering::SeqCst) != g && self.hooked.load(Ordering::SeqCst) == g
        }) && self.granted(caps::EVENTS)
    }

    /// Ask servers to tell whether files have extended attributes (only worth its cost
    /// to a mount that forwards them). Takes effect at the next connection.
    pub fn want_xattr_hints(&self, want: bool) {
        let bits = if want { caps::XATTR_HINTS } else { 0 };
        self.extra_caps.store(bits, Ordering::Relaxed);
    }

    /// Whether the server copies between handles itself (`Request::CopyRange`).
    pub fn copies_ranges(&self) -> bool {
        self.granted(caps::COPY_RANGE)
    }

    /// Whether the server reads small files of a directory whole (`Request::ReadSmall`).
    pub fn reads_small(&self) -> bool {
        self.granted(caps::READ_SMALL)
    }

    /// Whether the server says where a directory went (`Request::Locate`).
    pub fn locates(&self) -> bool {
        self.granted(caps::LOCATE)
    }

    /// Whether the server looks up only in the directory named (`Request::LookupIn`).
    pub fn checks_lookups(&self) -> bool {
        self.granted(caps::CHECKED_LOOKUP)
    }

    /// Whether the server applies an unlink before anything sent after it, wherever the
    /// client's kernel allowed it (`caps::ORDERED_UNLINK`).
    pub fn orders_unlinks(&self) -> bool {
        self.granted(caps::ORDERED_UNLINK)
    }

    /// Whether the last handshake granted capability `bit` (asked on hot paths: every
    /// locally answered lookup checks the event stream, so no copy of the welcome).
    fn granted(&self, bit: u64) -> bool {
        self.welcome
            .lock()
            .is_ok_and(|w| w.as_ref().is_some_and(|w| w.capabilities & bit != 0))
    }

    /// What the server said in the last successful handshake.
    pub fn welcome(&self) -> Option<Welcome> {
        self.welcome.lock().ok().and_then(|w| w.clone())
    }

    /// Connect now (or confirm the current connection is alive); returns its generation.
    pub async fn connect(self: &Arc<Self>) -> Result<u64, TransportError> {
        Ok(self.current().await?.generation)
    }

    /// Stop using the network: in-flight and later calls fail with `Closed`.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(c) = self.conn.lock().await.take() {
            // Deferred requests (releases, say) still go: best effort, without waiting.
            let _ = c.out.uncork();
            c.dead.cancel();
        }
    }

    /// The generation of the live connection, if any (handles from older ones are void).
    pub async fn generation(&self) -> Option<u64> {
        self.conn
            .lock()
            .await
            .as_ref()
            .filter(|c| !c.is_dead())
            .map(|c| c.generation)
    }

    /// The live connection, or a new one.
    ///
    /// Once a connection has existed, a server that cannot be reached (refused, reset,
    /// no route) is tried again for up to `timeout`: a server restarting, or a network
    /// gone for a moment, costs a short wait instead of failed calls. Only the first
    /// attempt after a working connection waits: once it gave up, later calls try once
    /// each (a server that is away fails them at once, not after `timeout` each), and
    /// calls that waited for their turn meanwhile fail with the same error.
    async fn current(self: &Arc<Self>) -> Result<Arc<Conn>, TransportError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(TransportError::Closed);
        }
        let asked = Instant::now();
        let mut slot = self.conn.lock().await;
        if self.closed.load(Ordering::SeqCst) {
            return Err(TransportError::Closed);
        }
        if let Some(c) = slot.as_ref()
            && !c.is_dead()
        {
            return Ok(c.clone());
        }
        let patient = {
            let gave_up = self.gave_up.lock().map_err(|_| TransportError::Closed)?;
            match gave_up.as_ref() {
                Some((at, e)) if *at >= asked => return Err(self.failed(e.again())),
                Some(_) => false,
                None => self.ever_connected.load(Ordering::SeqCst),
            }
        };
        *slot = None;
        let deadline = asked + self.timeout;
        let mut pause = RETRY_FIRST;
        let conn = loop {
            // No attempt runs much past the caller's wait (a connect that hangs).
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = self.open_conn(left.max(RETRY_MAX)).await;
            if attempt.is_err() {
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
            }
            match attempt {
                Ok(c) => break c,
                Err(e)
                    if patient
                        && e.transient()
                        && Instant::now() + pause < deadline
                        && !self.closed.load(Ordering::SeqCst) =>
                {
                    tracing::debug!(addr = %self.addr, "server not reachable ({e}); trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX);
                }
                Err(e) => {
                    if let Ok(mut g) = self.gave_up.lock() {
                        *g = Some((Instant::now(), e.again()));
                    }
                    return Err(self.failed(e));
                }
            }
        };
        if let Ok(mut g) = self.gave_up.lock() {
            *g = None;
        }
        if self.ever_connected.swap(true, Ordering::SeqCst) {
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(addr = %self.addr, "reconnected");
        }
        *slot = Some(conn.clone());
        self.live.store(conn.generation, Ordering::SeqCst);
        drop(slot);
        let hook = self.connect_hook.lock().ok().and_then(|h| h.clone());
        if let Some(hook) = hook {
            hook(conn.generation);
        }
        // (Never backwards: an older connection's hook may finish after a newer one's.)
        self.hooked.fetch_max(conn.generation, Ordering::SeqCst);
        Ok(conn)
    }

    async fn open_conn(self: &Arc<Self>, limit: Duration) -> Result<Arc<Conn>, TransportError> {
        // One deadline for the connect and the handshake together.
        let deadline =
            tokio::time::Instant::now() + self.timeout.min(Duration::from_secs(10)).min(limit);
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| TransportError::ConnectTimeout(self.addr.clone()))?
            .map_err(|e| TransportError::Connect(self.addr.clone(), e))?;
        // Small requests (lookups, getattr) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let (framed, welcome) = tokio::time::timeout_at(
            deadline,
            handshake(
                stream,
                &self.client_name(),
                CLIENT_CAPS | self.extra_caps.load(Ordering::Relaxed),
            ),
        )
        .await
        .map_err(|_| TransportError::HandshakeTimeout)??;
        let instance = welcome.instance;
        if let Ok(mut w) = self.welcome.lock() {
            *w = Some(welcome);
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(self.spawn_tasks(framed, generation, instance))
    }

    fn client_name(&self) -> String {
        format!("ferry {}", env!("CARGO_PKG_VERSION"))
    }

    fn spawn_tasks(
        self: &Arc<Self>,
        framed: Framed<TcpStream, ClientCodec>,
        generation: u64,
        instance: u64,
    ) -> Arc<Conn> {
        let pending: Arc<Pending> = Arc::new(Mutex::new(HashMap::new()));
        let dead = CancellationToken::new();
        let last_rx = Arc::new(Mutex::new(Instant::now()));
        // The halves go separate ways: replies are read by a task, requests are written
        // by whoever queues them (see `Outbox`). Bytes the handshake read ahead stay.
        let parts = framed.into_parts();
        let (read_half, write_half) = parts.io.into_split();
        let mut stream = FramedRead::new(read_half, parts.codec);
        stream.read_buffer_mut().extend_from_slice(&parts.read_buf);
        let out = Arc::new(Outbox {
            half: write_half,
            queue: Mutex::new(Outgoing::default()),
            wake: Notify::new(),
            cork: Notify::new(),
            dead: dead.clone(),
        });

        // Writer: only for what the socket did not take at once.
        let wout = out.clone();
        tokio::spawn(async move { wout.drain().await });

        // Reader: route replies by id, hand events to the sink.
        let rdead = dead.clone();
        let rpending = pending.clone();
        let rlast = last_rx.clone();
        let me = Arc::downgrade(self);
        let silent = Arc::new(AtomicBool::new(false));
        let rsilent = silent.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    _ = rdead.cancelled() => break,
                    f = stream.next() => f,
                };
                match frame {
                    Some(Ok(ServerFrame::Reply { id, result })) => {
                        if let Ok(mut t) = rlast.lock() {
                            *t = Instant::now();
                        }
                        if let Some(me) = me.upgrade() {
                            let n = match &result {
                                Ok(Response::Data(d)) => d.len() as u64,
                                _ => 0,
                            };
                            me.stats.bytes_received.fetch_add(n, Ordering::Relaxed);
                        }
                        // A task's answer is handed over under the lock, so `Sent::then`
                        // finds either the waiter or the answer.
                        let handler = match rpending.lock() {
                            Ok(mut p) => match p.remove(&id) {
                                Some(Waiter::Task(w)) => {
                                    let _ = w.send(result);
                                    None
                                }
                                Some(Waiter::Then(f)) => Some((f, result)),
                                None => None,
                            },
                            Err(_) => None,
                        };
                        if let Some((f, result)) = handler {
                            f(Ok(result));
                        }
                    }
                    Some(Ok(ServerFrame::Event(ev))) => {
                        if let Ok(mut t) = rlast.lock() {
                            *t = Instant::now();
                        }
                        if let Some(me) = me.upgrade() {
                            me.stats.events.fetch_add(1, Ordering::Relaxed);
                            // Before any reply that follows it is handed over.
                            if ev == Event::Incomplete {
                                me.incomplete.store(generation, Ordering::SeqCst);
                            }
                        }
                        let sink = me
                            .upgrade()
                            .and_then(|m| m.events.lock().ok().and_then(|e| e.clone()));
                        if let Some(sink) = sink {
                            sink(ev);
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!("connection to server broken: {e}");
                        break;
                    }
                    None => {
                        tracing::warn!("server closed the connection");
                        break;
                    }
                }
            }
            rdead.cancel();
            if let Some(me) = me.upgrade() {
                let _ = me
                    .live
                    .compare_exchange(generation, 0, Ordering::SeqCst, Ordering::SeqCst);
            }
            // Dropping the senders wakes every waiter with an error.
            abandon(&rpending, &rsilent);
        });

        let conn = Arc::new(Conn {
            generation,
            out,
            pending,
            next_id: AtomicU64::new(1),
            dead: dead.clone(),
            silent,
            instance,
        });

        // Watchdog: while anything is outstanding, the server must say something at least
        // every `timeout`; ping it after a quiet second so a slow link is not mistaken for a
        // dead one.
        let timeout = self.timeout;
        let wconn = Arc::downgrade(&conn);
        tokio::spawn(async move {
            let tick = Duration::from_millis(250).min(timeout / 4);
            let mut last_ping = Instant::now();
            loop {
                tokio::select! {
                    _ = dead.cancelled() => break,
                    _ = tokio::time::sleep(tick) => {}
                }
                let Some(conn) = wconn.upgrade() else { break };
                let outstanding = conn.pending.lock().map(|p| !p.is_empty()).unwrap_or(false);
                if !outstanding {
                    if let Ok(mut t) = last_rx.lock() {
                        *t = Instant::now();
                    }
                    continue;
                }
                let quiet = last_rx.lock().map(|t| t.elapsed()).unwrap_or_default();
                if quiet >= timeout {
                    tracing::warn!("server silent for {:?}; dropping the connection", quiet);
                    conn.silent.store(true, Ordering::SeqCst);
                    dead.cancel();
                    abandon(&conn.pending, &conn.silent);
                    break;
                }
                if quiet >= Duration::from_secs(1) && last_ping.elapsed() >= Duration::from_secs(1)
                {
                    last_ping = Instant::now();
                    let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
                    let (ptx, _prx) = oneshot::channel();
                    if let Ok(mut p) = conn.pending.lock() {
                        p.insert(id, Waiter::Task(ptx));
                    }
                    let _ = conn.out.push(
                        RequestFrame {
                            id,
                            caller: Caller::default(),
                            request: Request::Ping,
                            once: None,
                        },
                        false,
                    );
                }
            }
        });
        conn
    }

    /// Send one request and wait for its reply. The outer error is the transport (the
    /// connection failed); the inner one is the server's errno for this request.
    pub async fn call(
        self: &Arc<Self>,
        caller: Caller,
        request: Request,
    ) -> Result<Result<Response, i32>, TransportError> {
        self.call_on(None, caller, request).await
    }

    /// Like [`Client::call`], but only on connection `generation` (requests naming
    /// server-side handles are meaningless on any other connection).
    pub async fn call_on(
        self: &Arc<Self>,
        generation: Option<u64>,
        caller: Caller,
        request: Request,
    ) -> Result<Result<Response, i32>, TransportError> {
        self.start_on(generation, caller, request)
            .await?
            .reply()
            .await
    }

    /// Queue one request for sending and return without waiting for its reply: requests
    /// queued one after the other reach the server in that order.
    pub async fn start_on(
        self: &Arc<Self>,
        generation: Option<u64>,
        caller: Caller,
        request: Request,
    ) -> Result<Sent, TransportError> {
        // A handle of a connection already gone stays void: no reconnect to learn that.
        if let Some(g) = generation
            && self.live_generation() != Some(g)
        {
            return Err(self.failed(TransportError::StaleHandle));
        }
        let conn = self.current().await?;
        self.enqueue(&conn, generation, caller, request, None, false)
    }

    /// [`Client::start_on`] without waiting for anything: `None` (the request dropped)
    /// when that would mean waiting (no live connection at hand, or its slot busy).
    pub fn try_start_on(
        self: &Arc<Self>,
        generation: Option<u64>,
        caller: Caller,
        request: Request,
    ) -> Option<Result<Sent, TransportError>> {
        self.try_start(generation, caller, request, None, false)
    }

    /// [`Client::try_start_on`] of a request nobody waits for at once: it may go out
    /// with the next one (see `Outbox`). Whoever comes to wait for its answer other than
    /// through [`Sent::reply`] calls [`Client::uncork`] first.
    pub fn try_start_deferred(
        self: &Arc<Self>,
        generation: Option<u64>,
        caller: Caller,
        request: Request,
    ) -> Option<Result<Sent, TransportError>> {
        self.try_start(generation, caller, request, None, true)
    }

    /// Send deferred requests now: an answer to one of them is about to be waited for.
    pub fn uncork(&self) {
        // The slot is not waited for: while someone holds it (briefly), the deferred
        // requests go with the next request or, at the latest, after `CORK_DELAY`.
        let out = match self.conn.try_lock() {
            Ok(slot) => slot.as_ref().map(|c| Arc::clone(&c.out)),
            Err(_) => None,
        };
        if let Some(out) = out
            && out.uncork().is_err()
        {
            tracing::debug!("connection broken while sending deferred requests");
        }
    }

    /// [`Client::try_start_on`] of a change named by `key`.
    pub fn try_start_keyed(
        self: &Arc<Self>,
        generation: Option<u64>,
        caller: Caller,
        request: Request,
        key: OnceKey,
    ) -> Option<Result<Sent, TransportError>> {
        self.try_start(generation, caller, request, Some(key), false)
    }

    fn try_start(
        self: &Arc<Self>,
        generation: Option<u64>,
        caller: Caller,
        request: Request,
        once: Option<OnceKey>,
        deferred: bool,
    ) -> Option<Result<Sent, TransportError>> {
        let conn = {
            let slot = self.conn.try_lock().ok()?;
            match slot.as_ref() {
                Some(c) if !c.is_dead() && !self.closed.load(Ordering::SeqCst) => c.clone(),
                _ => return None,
            }
        };
        Some(self.enqueue(&conn, generation, caller, request, once, deferred))
    }

    fn enqueue(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        generation: Option<u64>,
        caller: Caller,
        request: Request,
        once: Option<OnceKey>,
        deferred: bool,
    ) -> Result<Sent, TransportError> {
        if let Some(g) = generation
            && g != conn.generation
        {
            return Err(TransportError::StaleHandle);
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut k) = self.stats.by_kind.lock() {
            *k.entry(request.kind()).or_default() += 1;
        }
        if let Request::Write { data, .. } = &request {
            self.stats
                .bytes_sent
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending
            .lock()
            .map_err(|_| TransportError::Disconnected)?
            .insert(id, Waiter::Task(tx));
        if conn.is_dead() {
            return Err(self.failed(lost(&conn.silent)));
        }
        if conn
            .out
            .push(
                RequestFrame {
                    id,
                    caller,
                    request,
                    once,
                },
                deferred,
            )
            .is_err()
        {
            return Err(self.failed(TransportError::Disconnected));
        }
        Ok(Sent {
            rx,
            id,
            deferred,
            pending: Arc::clone(&conn.pending),
            client: Arc::clone(self),
            silent: Arc::clone(&conn.silent),
            instance: conn.instance,
        })
    }

    fn failed(&self, e: TransportError) -> TransportError {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        e
    }
}

/// Send `Hello`, read the reply, switch to the request codec.
async fn handshake(
    stream: TcpStream,
    client: &str,
    capabilities: u64,
) -> Result<(Framed<TcpStream, ClientCodec>, Welcome), TransportError> {
    let mut framed = Framed::new(stream, FrameCodec::<Hello, HelloReply>::new());
    framed
        .send(Hello::new(client, capabilities))
        .await
        .map_err(TransportError::Io)?;
    let reply = match framed.next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => return Err(TransportError::Io(e)),
        None => {
            return Err(TransportError::Refused(
                "server closed the connection during the handshake (not a ferry server?)".into(),
            ));
        }
    };
    match reply {
        HelloReply::Welcome(w) => {
            let framed = framed.map_codec(|_| ClientCodec::new());
            Ok((framed, w))
        }
        HelloReply::Refused { version, reason } => Err(TransportError::Refused(format!(
            "{reason} (server protocol {version}, client protocol {PROTOCOL_VERSION})"
        ))),
    }
}

/// A request on its way; [`Sent::reply`] waits for the answer.
pub struct Sent {
    rx: oneshot::Receiver<Result<Response, i32>>,
    id: u64,
    /// Possibly still in the buffer (see [`Client::try_start_deferred`]).
    deferred: bool,
    pending: Arc<Pending>,
    client: Arc<Client>,
    silent: Arc<AtomicBool>,
    instance: u64,
}

impl Sent {
    /// The `Welcome::instance` of the server it was sent to.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    pub async fn reply(self) -> Outcome {
        if self.deferred {
            self.client.uncork();
        }
        match self.rx.await {
            Ok(r) => Ok(r),
            Err(_) => Err(self.client.failed(lost(&self.silent))),
        }
    }

    /// Run `f` with the outcome instead of waiting for it: on the connection's reader
    /// when the reply arrives, or here and now if it already has (or the connection is
    /// gone). Saves a task, and its wake-ups, per request whose answer only updates
    /// bookkeeping. `f` must be quick and must not wait.
    pub fn then(self, f: impl FnOnce(Outcome) + Send + 'static) {
        let Sent {
            mut rx,
            id,
            pending,
            client,
            silent,
            ..
        } = self;
        // Counted as `Sent::reply` counts a lost connection.
        let f: OnReply = Box::new(move |outcome| match outcome {
            Err(e) => f(Err(client.failed(e))),
            ok => f(ok),
        });
        let f = match pending.lock() {
            Ok(mut p) => match p.get_mut(&id) {
                Some(w) => {
                    *w = Waiter::Then(f);
                    return;
                }
                None => f,
            },
            Err(_) => f,
        };
        // The reader hands a task's answer over under the lock: it is in `rx` by now,
        // or was dropped with the connection.
        match rx.try_recv() {
            Ok(r) => f(Ok(r)),
            Err(_) => f(Err(lost(&silent))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use bytes::Bytes;

    use super::*;

    /// An outbox writing to a loopback socket, and the socket's other end (non-blocking:
    /// loopback delivers what a write took before the write returns).
    async fn outbox() -> (Arc<Outbox>, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (peer, _) = listener.accept().expect("accept");
        peer.set_nonblocking(true).expect("non-blocking peer");
        let (_, half) = stream.into_split();
        let out = Arc::new(Outbox {
            half,
            queue: Mutex::new(Outgoing::default()),
            wake: Notify::new(),
            cork: Notify::new(),
            dead: CancellationToken::new(),
        });
        (out, peer)
    }

    fn frame(id: u64, len: usize) -> RequestFrame {
        let request = if len == 0 {
            Request::Ping
        } else {
            Request::Write {
                handle: 1,
                offset: 0,
                data: Bytes::from(vec![7u8; len]),
            }
        };
        RequestFrame {
            id,
            caller: Caller::default(),
            request,
            once: None,
        }
    }

    /// The bytes of pings `ids` on the wire.
    fn wire(ids: &[u64]) -> Vec<u8> {
        let mut codec = ClientCodec::new();
        let mut buf = BytesMut::new();
        for &id in ids {
            codec.encode(frame(id, 0), &mut buf).expect("encode");
        }
        buf.to_vec()
    }

    /// Everything the peer has been sent so far.
    fn received(peer: &mut std::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match peer.read(&mut chunk) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return got,
                Err(e) => panic!("reading what was sent: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn deferred_requests_go_out_with_the_next_one() {
        let (out, mut peer) = outbox().await;
        out.push(frame(1, 0), true).expect("push");
        out.push(frame(2, 0), true).expect("push");
        assert!(
            received(&mut peer).is_empty(),
            "deferred requests were sent"
        );
        out.push(frame(3, 0), false).expect("push");
        assert_eq!(received(&mut peer), wire(&[1, 2, 3]));
    }

    #[tokio::test]
    async fn uncork_sends_deferred_requests_at_once() {
        let (out, mut peer) = outbox().await;
        out.push(frame(1, 0), true).expect("push");
        assert!(
            received(&mut peer).is_empty(),
            "a deferred request was sent"
        );
        out.uncork().expect("uncork");
        assert_eq!(received(&mut peer), wire(&[1]));
        out.uncork().expect("nothing to send");
        assert!(received(&mut peer).is_empty(), "sent twice");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deferred_request_goes_out_alone_after_the_delay() {
        let (out, mut peer) = outbox().await;
        let writer = out.clone();
        let task = tokio::spawn(async move { writer.drain().await });
        out.push(frame(1, 0), true).expect("push");
        tokio::time::sleep(CORK_DELAY / 2).await;
        assert!(received(&mut peer).is_empty(), "sent before its delay");
        tokio::time::sleep(CORK_DELAY).await;
        assert_eq!(received(&mut peer), wire(&[1]));
        // And again for the next one: the writer re-arms.
        out.push(frame(2, 0), true).expect("push");
        tokio::time::sleep(CORK_DELAY * 2).await;
        assert_eq!(received(&mut peer), wire(&[2]));
        // With nothing deferred for a period, the ticks stop; the next frame starts them.
        tokio::time::sleep(CORK_DELAY * 3).await;
        assert!(
            !out.queue.lock().expect("queue").cork_armed,
            "still ticking"
        );
        out.push(frame(3, 0), true).expect("push");
        tokio::time::sleep(CORK_DELAY * 2).await;
        assert_eq!(received(&mut peer), wire(&[3]));
        out.dead.cancel();
        task.await.expect("writer task");
    }

    #[tokio::test]
    async fn deferred_requests_past_the_cap_go_out() {
        let (out, mut peer) = outbox().await;
        let each = CORK_MAX / 4;
        let mut pushed = 0;
        loop {
            out.push(frame(pushed, each), true).expect("push");
            pushed += 1;
            let q = out.queue.lock().expect("queue");
            if q.buf.is_empty() || q.writer_has_it {
                break;
            }
            assert!(q.buf.len() <= CORK_MAX, "more than the cap kept back");
        }
        assert_eq!(pushed, 4, "kept back past the cap, or not up to it");
        assert!(!received(&mut peer).is_empty(), "nothing sent past the cap");
    }
}
