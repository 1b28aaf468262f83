//! One client connection: the handshake, then a reader that decodes requests and runs
//! each concurrently, and a single writer that sends replies as they finish (out of
//! order: a slow read does not hold up a lookup behind it).
//!
//! ```text
//!  socket ──► reader ──spawn──► request task ──spawn_blocking──► ops::execute
//!                                     │
//!  socket ◄── writer ◄──── mpsc ──────┘   (reply + the request's in-flight permit)
//!               ▲
//!               └──── broadcast ◄── watch reader   (change events, with `EVENTS` only)
//! ```
//!
//! Generic over the transport so TLS can wrap the TCP stream later. Must never panic on
//! bytes from the peer, never let one connection's failure reach another (every error
//! ends only this connection), and never keep more than [`MAX_IN_FLIGHT`] requests of
//! one connection in progress.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_common::codec::{ServerCodec, decode_body, encode_body};
use ferry_common::{
    Event, Hello, HelloReply, MAGIC, MAX_IO, PROTOCOL_VERSION, Request, RequestFrame, ServerFrame,
    Welcome, caps,
};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_util::codec::{Framed, FramedParts, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, trace, warn};

use crate::export::Export;
use crate::ops::{self, Ctx};
use crate::send::FrameSink;
use crate::watch::Watcher;

/// A client must complete the handshake within this time or is dropped: a connection
/// that never speaks must not hold a task and a descriptor forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests of one connection in progress at once; past it the reader stops reading,
/// which pushes back on the client through TCP.
pub const MAX_IN_FLIGHT: usize = 128;

/// Largest `Hello` frame accepted; the real one is a few dozen bytes.
const MAX_HELLO: usize = 64 * 1024;

/// Capabilities this server implements; `EVENTS` and `LOCATE` only when it has a
/// [`Watcher`].
const SERVER_CAPS: u64 = caps::CALLER_CREDS
    | caps::EVENTS
    | caps::COPY_RANGE
    | caps::READ_SMALL
    | caps::XATTR_HINTS
    | caps::LOCATE
    | caps::PARTIAL_WATCHES
    | caps::CHECKED_LOOKUP;

/// A reply on its way to the writer, holding the request's in-flight permit so the limit
/// also bounds replies waiting to be written.
struct Outgoing {
    id: u64,
    frame: ServerFrame,
    /// The events already broadcast go out before it (see [`Watcher::caught_up`]).
    after_events: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Serve one connection until the peer leaves, misbehaves, or `shutdown` fires; then
/// finish the requests already started and send their replies.
pub async fn serve<T>(
    io: T,
    export: Arc<Export>,
    watcher: Option<Arc<Watcher>>,
    shutdown: CancellationToken,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut framed = Framed::new(
        io,
        LengthDelimitedCodec::builder()
            .length_field_length(4)
            .max_frame_length(MAX_HELLO)
            .new_codec(),
    );
    // A server that can no longer report every change offers none: the client then
    // revalidates instead of trusting silence. Past a directory it could not watch,
    // only to clients that cannot be told which (`caps::PARTIAL_WATCHES`).
    let mut offered = if watcher.as_ref().is_some_and(|w| !w.lost_all()) {
        SERVER_CAPS
    } else {
        // (A client asks where a directory went only when an event said it went.)
        SERVER_CAPS & !(caps::EVENTS | caps::LOCATE | caps::PARTIAL_WATCHES)
    };
    let partial = watcher.as_ref().is_some_and(|w| w.partial());
    // (`Unlink` always runs inline; whether it can fail where the client's kernel said
    // yes depends on who we are.)
    if crate::sys::geteuid() == 0 && !export.read_only() {
        offered |= caps::ORDERED_UNLINK;
    }
    let capabilities = tokio::select! {
        _ = shutdown.cancelled() => return,
        res = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut framed, &export, offered, partial)) => match res {
            Err(_) => {
                warn!("no handshake within {HANDSHAKE_TIMEOUT:?}, closing");
                return;
            }
            Ok(Err(e)) => {
                warn!("handshake failed: {e}");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(caps))) => caps,
        },
    };
    // Bytes the client pipelined after its Hello stay in the read buffer.
    let framed = framed.map_codec(|_| ServerCodec::new());
    let watcher = watcher.filter(|_| capabilities & caps::EVENTS != 0);
    let ctx = Arc::new(Ctx::new(export, capabilities, watcher));
    serve_requests(framed, ctx, shutdown).await;
}

/// Returns the negotiated capabilities, or `None` when the connection must close after
/// a refusal that was already answered. `partial`: some directory could not be watched,
/// so events go only to a client that can be told which (`caps::PARTIAL_WATCHES`).
async fn handshake<T>(
    framed: &mut Framed<T, LengthDelimitedCodec>,
    export: &Arc<Export>,
    offered: u64,
    partial: bool,
) -> io::Result<Option<u64>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let body = match framed.next().await {
        Some(body) => body?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before hello",
            ));
        }
    };
    // Check magic and version from the fixed prefix before decoding the rest, so a
    // client of another protocol version (whose Hello may have more fields) still gets
    // a readable refusal instead of a dropped connection.
    let (magic, version) = hello_prefix(&body)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a ferry hello"))?;
    if magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad magic, not a ferry client",
        ));
    }
    if version != PROTOCOL_VERSION {
        let reason = format!(
            "protocol version mismatch: server speaks {PROTOCOL_VERSION}, client speaks {version}"
        );
        warn!("refusing client: {reason}");
        let reply = HelloReply::Refused {
            version: PROTOCOL_VERSION,
            reason,
        };
        framed.send(Bytes::from(encode_body(&reply)?)).await?;
        SinkExt::<Bytes>::close(framed).await?;
        return Ok(None);
    }
    let hello: Hello = decode_body(&body)?;
    let exp = Arc::clone(export);
    let root = tokio::task::spawn_blocking(move || {
        crate::sys::fstat(exp.root_fd()).map(|st| ops::attr_of(&st, exp.root_dev()))
    })
    .await
    .map_err(io::Error::other)?
    .map_err(io::Error::from_raw_os_error)?;
    let mut capabilities = hello.capabilities & offered;
    if partial && capabilities & caps::PARTIAL_WATCHES == 0 {
        capabilities &= !caps::EVENTS;
    }
    if capabilities & caps::EVENTS == 0 {
        // Its watches are what `Locate` answers from, and they serve only event clients.
        capabilities &= !caps::LOCATE;
    }
    let welcome = HelloReply::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        capabilities,
        read_only: export.read_only(),
        root,
        max_io: MAX_IO,
        server: format!("ferryd {}", env!("CARGO_PKG_VERSION")),
        export_id: export.id(),
        instance: export.instance(),
    });
    framed.send(Bytes::from(encode_body(&welcome)?)).await?;
    info!(client = ?hello.client, capabilities, "client connected");
    Ok(Some(capabilities))
}

/// Magic and version from the start of a bincode `Hello`: eight raw bytes, then a
/// bincode varint (< 251: the byte itself; 251: u16 LE; 252: u32 LE).
fn hello_prefix(body: &[u8]) -> Option<([u8; 8], u32)> {
    let magic: [u8; 8] = body.get(..8)?.try_into().ok()?;
    let rest = body.get(8..)?;
    let version = match *rest.first()? {
        b @ 0..=250 => u32::from(b),
        251 => u32::from(u16::from_le_bytes(rest.get(1..3)?.try_into().ok()?)),
        252 => u32::from_le_bytes(rest.get(1..5)?.try_into().ok()?),
        _ => return None,
    };
    Some((magic, version))
}

async fn serve_requests<T>(
    framed: Framed<T, ServerCodec>,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Requests are read through the codec (with whatever was read past the handshake);
    // replies go out through a sink that sends file data from its own buffer.
    let parts = framed.into_parts();
    let (read_half, write_half) = tokio::io::split(parts.io);
    let mut read_parts = FramedParts::new::<ServerFrame>(read_half, parts.codec);
    // (Built from parts, a reader decodes what its buffer holds before reading more.)
    read_parts.read_buf = parts.read_buf;
    let mut stream = Framed::from_parts(read_parts);
    let sink = FrameSink::new(write_half, parts.write_buf);
    let (tx, rx) = mpsc::channel::<Outgoing>(MAX_IN_FLIGHT + 16);
    // Subscribed before the first request runs: no event of a watch it adds is missed.
    let events = ctx.watch.as_ref().map(|w| w.subscribe());
    let writer = tokio::spawn(write_loop(sink, rx, events, Arc::clone(&ctx)));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));

    loop {
        let frame = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                debug!("shutting down, finishing requests in flight");
                break;
            }
            // The writer is gone (socket error): nothing we compute can be delivered.
            _ = tx.closed() => break,
            next = stream.next() => match next {
                None => {
                    debug!("client closed the connection");
                    break;
                }
                Some(Err(e)) => {
                    warn!("closing connection: {e}");
                    break;
                }
                Some(Ok(frame)) => frame,
            },
        };
        let RequestFrame {
            id,
            caller,
            request,
            once,
        } = frame;
        if let Request::BarrierAck { id: barrier } = request {
            if let Some(w) = &ctx.watch {
                w.ack(barrier);
            }
            let out = Outgoing {
                id,
                frame: ServerFrame::Reply {
                    id,
                    result: Ok(ferry_common::Response::Ok),
                },
                after_events: false,
                _permit: None,
            };
            if tx.send(out).await.is_err() {
                break;
            }
            continue;
        }
        if let Request::Ping = request {
            // Answered ahead of slower work and without taking a permit.
            let out = Outgoing {
                id,
                frame: ServerFrame::Reply {
                    id,
                    result: Ok(ferry_common::Response::Pong),
                },
                after_events: false,
                _permit: None,
            };
            if tx.send(out).await.is_err() {
                break;
            }
            continue;
        }
        // A request ordered behind its handle's writes (see `ordered_after_writes`) waits
        // off the connection task while any of them still runs.
        let behind_writes = ordered_after_writes(&request)
            .and_then(|h| ctx.handles.file(h).ok())
            .filter(|f| f.writes_running.load(Ordering::SeqCst) > 0);
        let read = match behind_writes {
            None => quick_read(&ctx, &request, permits.available_permits() == MAX_IN_FLIGHT),
            Some(_) => QuickRead::No,
        };
        if behind_writes.is_none()
            && ((runs_inline(&request)
                && stays_home(&ctx, &request)
                && !may_wait_for_others(&ctx, &request))
                || quick_commit(&ctx, &request)
                || !matches!(read, QuickRead::No))
        {
            // Metadata calls on the export take microseconds: running them here saves
            // two thread hand-offs per request, which is most of a loopback round trip.
            // Anything that moves data or may wait (I/O, fsync, listings, opens that
            // may meet a FIFO, commits with much staged or another client's barrier to
            // wait for) still goes to the blocking pool below, except small reads (see
            // `quick_read`).
            let kind = request.kind();
            let started = Instant::now();
            let written = written_handle(&request);
            let result = match read {
                QuickRead::Cached(data) => Ok(data),
                // The slot is held until the read is done. The worker thread says it
                // blocks: the runtime moves its other tasks (other connections) to
                // another thread meanwhile, so a slow or hung disk stalls only this
                // connection.
                QuickRead::FromDisk(_slot) => {
                    tokio::task::block_in_place(|| ops::execute_keyed(&ctx, caller, request, once))
                }
                QuickRead::No => ops::execute_keyed(&ctx, caller, request, once),
            };
            if let (Some(h), Err(e)) = (written, &result)
                && let Ok(f) = ctx.handles.file(h)
            {
                f.write_failed(*e);
            }
            match &result {
                Ok(_) => trace!(id, kind, elapsed = ?started.elapsed(), "done inline"),
                Err(errno) => debug!(id, kind, errno, elapsed = ?started.elapsed(), "failed"),
            }
            let out = Outgoing {
                id,
                frame: ServerFrame::Reply { id, result },
                after_events: false,
                _permit: None,
            };
            if tx.send(out).await.is_err() {
                break;
            }
            continue;
        }
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tx.closed() => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed; treat as end of connection
            },
        };
        // A write in progress holds back a commit of its handle that arrives meanwhile.
        let writing = written_handle(&request).and_then(|h| ctx.handles.file(h).ok());
        if let Some(f) = &writing {
            f.writes_running.fetch_add(1, Ordering::SeqCst);
        }
        let committing = match behind_writes {
            Some(f) => Some(f),
            None => ordered_after_writes(&request).and_then(|h| ctx.handles.file(h).ok()),
        };
        let ctx = Arc::clone(&ctx);
        let tx = tx.clone();
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                if let Some(f) = &committing {
                    f.writes_settled().await;
                }
                let kind = request.kind();
                // Unstaged opens that truncate, and size changes, change the file as
                // visibly as a commit does. (A staged truncation, also of an existing
                // file met by Create, is applied by the commit, which has its own barrier.)
                let truncates = matches!(&request,
                    Request::Open { flags, staged: false, .. } if flags & libc::O_TRUNC != 0)
                    || matches!(&request, Request::SetAttr { set, .. } if set.size.is_some());
                let renaming = may_wait_for_others(&ctx, &request).then(|| request.clone());
                let started = Instant::now();
                let blocking_span = tracing::Span::current();
                let ctx2 = Arc::clone(&ctx);
                let (result, moved_dir) = tokio::task::spawn_blocking(move || {
                    blocking_span.in_scope(|| {
                        let result = ops::execute_keyed(&ctx2, caller, request, once);
                        let moved_dir =
                            result.is_ok() && renaming.is_some_and(|r| ops::moved_a_dir(&ctx2, &r));
                        (result, moved_dir)
                    })
                })
                .await
                .unwrap_or_else(|e| {
                    error!(kind, "request handler failed: {e}");
                    (Err(libc::EIO), false)
                });
                if let Some(f) = &writing {
                    if let Err(e) = &result {
                        f.write_failed(*e);
                    }
                    f.writes_running.fetch_sub(1, Ordering::SeqCst);
                    f.writes_done.notify_waiters();
                }
                // Close-to-open: other clients drop their copy before the committer's
                // close() returns.
                let changed = match result.as_ref().map(|r| r.inner()) {
                    Ok(ferry_common::Response::Attr(a)) if kind == "commit" || truncates => {
                        Some(*a)
                    }
                    Ok(
                        ferry_common::Response::Opened { attr, .. }
                        | ferry_common::Response::OpenedWithData { attr, .. },
                    ) if truncates => Some(*attr),
                    _ => None,
                };
                if let (Some(attr), Some(w)) = (changed, &ctx.watch) {
                    w.barrier(Some(attr), &ctx.own_barriers).await;
                }
                // A directory moved: another client's kernel holds it by one name only,
                // and until it drops the old name a lookup of the new one fails there
                // (ESTALE, the kernel refusing to move the old name under a rename).
                // The mover's rename() returns once the others have the events.
                if let (true, Some(w)) = (moved_dir, &ctx.watch) {
                    w.caught_up().await;
                    w.barrier(None, &ctx.own_barriers).await;
                }
                // Where directories are now: the client must have the events of the
                // changes that took them there first (it judges the answer by them).
                let after_events = kind == "locate";
                if let (true, Some(w)) = (after_events, &ctx.watch) {
                    w.caught_up().await;
                }
                match &result {
                    Ok(_) => trace!(id, kind, elapsed = ?started.elapsed(), "done"),
                    Err(errno) => debug!(id, kind, errno, elapsed = ?started.elapsed(), "failed"),
                }
                let out = Outgoing {
                    id,
                    frame: ServerFrame::Reply { id, result },
                    after_events,
                    _permit: Some(permit),
                };
                // A send error means the connection is closing; the reply has nowhere to go.
                let _ = tx.send(out).await;
            }
            .instrument(span),
        );
    }

    // Stop reading, let requests already started finish: each holds a permit until its
    // reply reaches the writer (or the writer is gone), so owning them all means done.
    drop(stream);
    let _ = permits.acquire_many(MAX_IN_FLIGHT as u32).await;
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("connection write side ended: {e}"),
        Err(e) => error!("writer task failed: {e}"),
    }
    info!(open_handles = ctx.handles.len(), "connection closed");
}

async fn write_loop<W>(
    mut sink: FrameSink<W>,
    mut rx: mpsc::Receiver<Outgoing>,
    mut events: Option<broadcast::Receiver<Event>>,
    ctx: Arc<Ctx>,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut told = Told {
        // A connection that begins with the server already partial has been given
        // nothing unmarked to take back: no resync (a client that reconnects
        // revalidates everything by itself).
        partial: ctx.partial_watches && ctx.watch.as_ref().is_some_and(|w| w.partial()),
        ..Told::default()
    };
    loop {
        tokio::select! {
            // Replies first: they are what requests in flight wait for.
            biased;
            out = rx.recv() => match out {
                Some(out) => {
                    if out.after_events {
                        send_events(&mut sink, &mut events, &ctx, &mut told).await?;
                    }
                    reply(&mut sink, out, &ctx, &mut told).await?;
                }
                None => break,
            },
            ev = next_event(&mut events) => event(&mut sink, ev, &ctx, &mut told).await?,
        }
        // Write everything already queued before one flush: many small replies become
        // one segment instead of one system call each.
        while let Ok(out) = rx.try_recv() {
            if out.after_events {
                send_events(&mut sink, &mut events, &ctx, &mut told).await?;
            }
            reply(&mut sink, out, &ctx, &mut told).await?;
        }
        send_events(&mut sink, &mut events, &ctx, &mut told).await?;
        sink.flush().await?;
    }
    sink.close().await
}

/// What the connection's writer has told its client of the server's watches.
#[derive(Default)]
struct Told {
    /// `Event::Incomplete` was sent (it is sent once).
    incomplete: bool,
    /// The server could not watch some directory, and this client, told per reply
    /// (`caps::PARTIAL_WATCHES`), was sent one `Event::Resync` for it.
    partial: bool,
}

/// Queue a reply. If the server's event stream became incomplete, `Event::Incomplete`
/// goes first (once): the reply may rest on a directory that could not be watched,
/// and the client must know that before it trusts the reply for long.
async fn reply<W>(
    sink: &mut FrameSink<W>,
    mut out: Outgoing,
    ctx: &Ctx,
    told: &mut Told,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    if !told.incomplete && ctx.watch.as_ref().is_some_and(|w| incomplete_for(ctx, w)) {
        told.incomplete = true;
        sink.feed(ServerFrame::Event(Event::Incomplete)).await?;
    }
    if partial_for(sink, ctx, told).await? {
        mark_links(&mut out.frame);
    }
    feed(sink, out).await
}

/// Whether the server could not watch some directory and the client is told per reply;
/// the first time, it is sent one `Event::Resync` first. A file with several links may
/// change through a name in such a directory, which no watch reports: from then on its
/// attributes go out marked uncovered, by this writer (the one place every reply and
/// event passes, in the order the client takes them), and the resync drops what the
/// client trusted of such files before.
async fn partial_for<W>(sink: &mut FrameSink<W>, ctx: &Ctx, told: &mut Told) -> io::Result<bool>
where
    W: AsyncWrite + Unpin,
{
    let partial = ctx.partial_watches && ctx.watch.as_ref().is_some_and(|w| w.partial());
    if partial && !std::mem::replace(&mut told.partial, true) {
        sink.feed(ServerFrame::Event(Event::Resync)).await?;
    }
    Ok(partial)
}

/// Mark the attributes of files with several links in `frame` uncovered.
fn mark_links(frame: &mut ServerFrame) {
    let mut mark = |a: &mut ferry_common::Attr| {
        if a.nlink > 1 && a.kind != ferry_common::FileKind::Dir {
            a.uncovered = true;
        }
    };
    match frame {
        ServerFrame::Reply {
            result: Ok(reply), ..
        } => reply.attrs_mut(&mut mark),
        ServerFrame::Event(Event::Changed {
            attr: Some(attr), ..
        })
        | ServerFrame::Event(Event::Barrier {
            attr: Some(attr), ..
        }) => mark(attr),
        _ => {}
    }
}

/// Whether the connection's client must hear that events no longer report every change
/// it may rely on.
fn incomplete_for(ctx: &Ctx, w: &Watcher) -> bool {
    w.lost_all() || (w.partial() && !ctx.partial_watches)
}

/// Queue every event received so far.
async fn send_events<W>(
    sink: &mut FrameSink<W>,
    events: &mut Option<broadcast::Receiver<Event>>,
    ctx: &Ctx,
    told: &mut Told,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    while let Some(ev) = try_next_event(events) {
        event(sink, ev, ctx, told).await?;
    }
    Ok(())
}

/// Queue an event, unless the client made it itself or was already told it.
async fn event<W>(sink: &mut FrameSink<W>, ev: Event, ctx: &Ctx, told: &mut Told) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    // (A client told per reply hears of a directory that could not be watched there.)
    let not_for_it =
        ev == Event::Incomplete && ctx.watch.as_ref().is_some_and(|w| !incomplete_for(ctx, w));
    let told_already =
        ev == Event::Incomplete && (not_for_it || std::mem::replace(&mut told.incomplete, true));
    if told_already || is_own(ctx, &ev) {
        return Ok(());
    }
    let mut frame = ServerFrame::Event(ev);
    if partial_for(sink, ctx, told).await? {
        mark_links(&mut frame);
    }
    sink.feed(frame).await
}

/// Requests cheap enough to run on the connection task (see `serve_requests`). They run
/// in the order they arrived, before the next request is read: `caps::ORDERED_UNLINK`
/// promises that for `Unlink` (clients answer it before its reply comes), so it must
/// stay here.
fn runs_inline(r: &Request) -> bool {
    matches!(
        r,
        Request::Lookup { .. }
            | Request::LookupIn { .. }
            | Request::GetAttr { .. }
            | Request::ReadLink { .. }
            | Request::MkDir { .. }
            | Request::Unlink { .. }
            | Request::RmDir { .. }
            | Request::Symlink { .. }
            | Request::Rename { .. }
            | Request::Link { .. }
            | Request::StatFs { .. }
            | Request::Release { .. }
            | Request::ReleaseDir { .. }
            // Creating cannot block (O_NONBLOCK, never a FIFO); an existing file it meets
            // is truncated in a staging file, not freed.
            | Request::Create { .. }
    ) || match r {
        // Small writes land in the page cache in microseconds; large ones stream on the
        // blocking pool, where a writer throttled by the kernel stalls nobody else.
        Request::Write { data, .. } => data.len() <= INLINE_WRITE_MAX,
        // Attribute changes other than the size (which may free or zero a large file, and
        // waits for a barrier like a commit).
        Request::SetAttr { set, .. } => set.size.is_none(),
        _ => false,
    }
}

/// A rename while other clients listen: one that moves a directory waits for them
/// before its reply (see the request task), which must not hold up the connection.
fn may_wait_for_others(ctx: &Ctx, r: &Request) -> bool {
    matches!(r, Request::Rename { .. })
        && ctx
            .watch
            .as_ref()
            .is_some_and(|w| w.others_subscribed() > 0)
}

/// Whether an inline request stays on the export's own filesystem: not through a
/// handle of a file on another one, and, while filesystems are mounted beneath the
/// export, not on or beneath their mount points (see [`crate::mounts`]). A call into a
/// network or FUSE filesystem mounted there may hang with it: on the blocking pool it
/// holds up only its own connection.
fn stays_home(ctx: &Ctx, r: &Request) -> bool {
    let e = &ctx.export;
    // (Nothing is foreign while nothing is mounted beneath the export.)
    let foreign = |h: &u64| {
        e.has_submounts()
            && ctx.handles.get(*h).is_ok_and(|h| match h {
                crate::handles::Handle::File(f) => f.foreign,
                crate::handles::Handle::Dir(d) => d.foreign,
            })
    };
    match r {
        Request::GetAttr {
            handle: Some(h), ..
        }
        | Request::SetAttr {
            handle: Some(h), ..
        }
        | Request::Write { handle: h, .. }
        | Request::Release { handle: h }
        | Request::ReleaseDir { handle: h } => !foreign(h),
        Request::Lookup { parent, name }
        | Request::LookupIn { parent, name, .. }
        | Request::MkDir { parent, name, .. }
        | Request::Unlink { parent, name }
        | Request::RmDir { parent, name }
        | Request::Symlink { parent, name, .. }
        | Request::Create { parent, name, .. } => e.at_home(parent, Some(name)),
        Request::Rename {
            parent,
            name,
            new_parent,
            new_name,
            ..
        } => e.at_home(parent, Some(name)) && e.at_home(new_parent, Some(new_name)),
        Request::Link {
            path,
            new_parent,
            new_name,
        } => e.path_at_home(path) && e.at_home(new_parent, Some(new_name)),
        Request::GetAttr { path, .. }
        | Request::SetAttr { path, .. }
        | Request::ReadLink { path }
        | Request::StatFs { path } => e.path_at_home(path),
        _ => true,
    }
}

/// A `Commit` that can run on the connection task: of an unstaged handle (a new file,
/// whose writes went to it directly) or one with little staged, and with no other
/// client a barrier would have to wait for. (Writes still running on the blocking
/// pool keep it off the task too: see `behind_writes`.) Saves the two thread hand-offs
/// of the blocking pool on every `close` of a small file.
fn quick_commit(ctx: &Ctx, r: &Request) -> bool {
    let Request::Commit { handle } = r else {
        return false;
    };
    if ctx
        .watch
        .as_ref()
        .is_some_and(|w| w.others_subscribed() > 0)
    {
        return false;
    }
    ctx.handles
        .file(*handle)
        .is_ok_and(|f| !f.foreign && f.commit_is_quick(INLINE_WRITE_MAX as u64))
}

/// How a small `Read` is answered on the connection task instead of the blocking pool.
enum QuickRead {
    /// Not: anything else, a large read, or one that would wait while others do.
    No,
    /// Read from the page cache already, without waiting for the disk.
    Cached(ferry_common::Response),
    /// To be read here from the disk; the slot is held until dropped.
    FromDisk(DiskReadSlot),
}

/// A small read is answered here when its bytes are in the page cache (a one-syscall
/// copy), or, when the connection has nothing on the blocking pool and no other
/// connection is reading on its task, read here from the disk: a lone reader of small
/// pieces at random (a database, `git`, a seek in a media file) waits for its disk and
/// two thread hand-offs less than through the pool. Readers in parallel still overlap
/// on the pool, and at most one connection task at a time waits for a disk read (of at
/// most [`INLINE_READ_MAX`]), inside `block_in_place`: other connections go on on
/// other threads. That connection's own next requests (and pings) wait for the read;
/// a read slower than the client's timeout (a hung disk under the export) makes the
/// client reconnect and send it again, and then it goes to the pool (the slot is
/// still taken).
fn quick_read(ctx: &Ctx, r: &Request, pool_idle: bool) -> QuickRead {
    let Request::Read {
        handle,
        offset,
        len,
    } = *r
    else {
        return QuickRead::No;
    };
    if len as usize > INLINE_READ_MAX {
        return QuickRead::No;
    }
    // A file on another filesystem mounted beneath the export may wait for it: the
    // pool's, not this connection's (nor the one disk-read slot's).
    if ctx.export.has_submounts() && ctx.handles.file(handle).is_ok_and(|f| f.foreign) {
        return QuickRead::No;
    }
    if let Some(data) = ops::read_cached(ctx, handle, offset, len) {
        return QuickRead::Cached(data);
    }
    // (`block_in_place` needs a multi-threaded runtime: ferryd's always is.)
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    match (pool_idle && multi_thread)
        .then(DiskReadSlot::take)
        .flatten()
    {
        Some(slot) => QuickRead::FromDisk(slot),
        None => QuickRead::No,
    }
}

/// Whether a connection task is reading from the disk (see [`quick_read`]).
static DISK_READ_INLINE: AtomicBool = AtomicBool::new(false);

/// The one connection task allowed to wait for a disk read; released on drop.
struct DiskReadSlot;

impl DiskReadSlot {
    fn take() -> Option<DiskReadSlot> {
        (!DISK_READ_INLINE.swap(true, Ordering::AcqRel)).then_some(DiskReadSlot)
    }
}

impl Drop for DiskReadSlot {
    fn drop(&mut self) {
        DISK_READ_INLINE.store(false, Ordering::Release);
    }
}

/// Largest read run on the connection task: the client's cache block, which its first
/// read of a file fetches.
const INLINE_READ_MAX: usize = 128 * 1024;

/// Requests a client may send right behind writes of the same handle without waiting
/// for their answers, and that must apply after them: `Commit`, and attribute changes
/// through the handle (`futimens` before `close`, as `tar` does).
fn ordered_after_writes(r: &Request) -> Option<u64> {
    match r {
        Request::Commit { handle } => Some(*handle),
        Request::SetAttr {
            handle: Some(handle),
            ..
        } => Some(*handle),
        _ => None,
    }
}

/// The handle a `Write` goes through.
fn written_handle(r: &Request) -> Option<u64> {
    match r {
        Request::Write { handle, .. } => Some(*handle),
        _ => None,
    }
}

/// Largest write run on the connection task.
const INLINE_WRITE_MAX: usize = 64 * 1024;

/// A barrier this connection started itself: its client made the change.
fn is_own(ctx: &Ctx, ev: &Event) -> bool {
    match ev {
        Event::Barrier { id, .. } => ctx
            .own_barriers
            .lock()
            .map(|own| own.contains(id))
            .unwrap_or(false),
        _ => false,
    }
}

/// The next event for this connection; never completes without a subscription. A
/// subscriber that fell behind by more than the channel holds gets `Resync`: it lost
/// events and must revalidate, which is cheaper than the server buffering without bound.
async fn next_event(events: &mut Option<broadcast::Receiver<Event>>) -> Event {
    loop {
        let Some(rx) = events else {
            return std::future::pending().await;
        };
        match rx.recv().await {
            Ok(ev) => return ev,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    lost = n,
                    "client too slow for change events, sending Resync"
                );
                return Event::Resync;
            }
            Err(broadcast::error::RecvError::Closed) => *events = None,
        }
    }
}

fn try_next_event(events: &mut Option<broadcast::Receiver<Event>>) -> Option<Event> {
    match events.as_mut()?.try_recv() {
        Ok(ev) => Some(ev),
        Err(broadcast::error::TryRecvError::Lagged(n)) => {
            warn!(
                lost = n,
                "client too slow for change events, sending Resync"
            );
            Some(Event::Resync)
        }
        Err(_) => None,
    }
}

async fn feed<W>(sink: &mut FrameSink<W>, out: Outgoing) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    match sink.feed(out.frame).await {
        // The codec refuses a reply it cannot encode (too large) before writing any of
        // it; the client still gets an answer to its request.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            error!(id = out.id, "reply could not be encoded: {e}");
            sink.feed(ServerFrame::Reply {
                id: out.id,
                result: Err(libc::EIO),
            })
            .await
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_of_a_real_hello() {
        let body = encode_body(&Hello::new("t", 0)).unwrap_or_default();
        assert_eq!(hello_prefix(&body), Some((MAGIC, PROTOCOL_VERSION)));
        let mut h = Hello::new("t", 0);
        h.version = 70_000;
        let body = encode_body(&h).unwrap_or_default();
        assert_eq!(hello_prefix(&body), Some((MAGIC, 70_000)));
        h.version = 300;
        let body = encode_body(&h).unwrap_or_default();
        assert_eq!(hello_prefix(&body), Some((MAGIC, 300)));
        assert_eq!(hello_prefix(b"short"), None);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_gets_resync() {
        let (tx, rx) = broadcast::channel(2);
        let mut events = Some(rx);
        let ev = |n: &str| Event::Changed {
            parent: ferry_common::RelPath::root(),
            dir: 1,
            name: Some(ferry_common::Name(n.as_bytes().to_vec())),
            attr: None,
        };
        for n in ["a", "b", "c"] {
            tx.send(ev(n)).unwrap();
        }
        assert_eq!(next_event(&mut events).await, Event::Resync);
        // After the resync it goes on with what is still buffered.
        assert_eq!(next_event(&mut events).await, ev("b"));
        assert_eq!(try_next_event(&mut events), Some(ev("c")));
        assert_eq!(try_next_event(&mut events), None);
        drop(tx);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), next_event(&mut events))
                .await
                .is_err(),
            "a closed channel never yields"
        );
        assert!(events.is_none());
    }
}
