//! `ferryd`: serves one directory over the ferry protocol.
//!
//! - [`export`]: the export root and the confinement of every network path beneath it.
//! - [`conn`]: one task per connection: handshake, concurrent requests, one writer.
//! - [`ops`]: one function per request, blocking system calls, errno from the OS.
//! - [`once`]: the answers of recent keyed changes, so a change sent again runs once.
//! - [`handles`]: the per-connection table of open files and directories.
//! - [`staging`]: staged writes of a handle, invisible in the real file until `Commit`.
//! - [`undo`], [`redo`]: records that keep a commit a crash interrupts from tearing a file.
//! - [`sys`]: safe wrappers over the system calls (the only `unsafe` code).
//! - [`watch`]: inotify watches of the directories clients look into, change events.
//! - [`failpoint`]: a crash at a chosen point, for tests (`--die-at`).
//!
//! What the server must never do, whatever a client sends:
//! - open, stat or modify anything outside the export root (paths are re-validated and
//!   resolved with `openat2(RESOLVE_BENEATH)`; final symlinks are never followed);
//! - panic or allocate without bound on network input (frames are size-capped before
//!   decoding, requests in flight per connection are capped);
//! - let one bad or slow connection affect another (each has its own task, handle
//!   table and error handling; errors end only that connection).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod conn;
pub mod export;
pub mod failpoint;
pub mod handles;
pub mod mounts;
pub mod once;
pub mod ops;
pub mod reap;
pub mod redo;
pub mod send;
pub mod staging;
pub mod sys;
pub mod undo;
pub mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, warn};

pub use export::{Export, ExportError};

/// How long connections get after shutdown to finish the requests they have started.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How a server runs, beyond its export.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Most directories watched at once (`--max-watches`); `None`: the kernel's limit.
    pub max_watches: Option<usize>,
    /// Offer no change events at all, as a server without inotify (`--no-events`, for
    /// tests of clients that must revalidate).
    pub no_events: bool,
}

/// Accept connections on `listener` and serve `export` until `shutdown` completes; then
/// stop accepting, let connections finish their requests in flight (at most
/// [`DRAIN_TIMEOUT`]) and return.
pub async fn run(listener: TcpListener, export: Arc<Export>, shutdown: impl Future) {
    run_with(listener, export, Options::default(), shutdown).await
}

/// [`run`] with [`Options`].
pub async fn run_with(
    listener: TcpListener,
    export: Arc<Export>,
    options: Options,
    shutdown: impl Future,
) {
    let token = CancellationToken::new();
    let mut conns = JoinSet::new();
    // Without inotify (the per-user instance limit, say) the server still serves, it
    // just does not offer change events.
    let (watcher, watch_task) = match options.no_events {
        true => (None, None),
        false => match watch::Watcher::start(Arc::clone(&export), options.max_watches) {
            Ok((w, task)) => (Some(w), Some(task)),
            Err(errno) => {
                warn!(errno, "cannot create an inotify instance: no change events");
                (None, None)
            }
        },
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    // Replies are flushed in batches already; Nagle would only add latency.
                    if let Err(e) = sock.set_nodelay(true) {
                        warn!(%peer, "set_nodelay: {e}");
                    }
                    if let Err(errno) = sys::set_keepalive(std::os::fd::AsFd::as_fd(&sock)) {
                        warn!(%peer, errno, "cannot enable TCP keepalive");
                    }
                    let span = tracing::info_span!("conn", %peer);
                    conns.spawn(
                        conn::serve(sock, Arc::clone(&export), watcher.clone(), token.child_token())
                            .instrument(span),
                    );
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning on a failing accept;
                    // existing connections keep being served meanwhile.
                    error!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    error!("connection task failed: {e}");
                }
            }
        }
    }
    drop(listener);
    info!(connections = conns.len(), "shutting down");
    token.cancel();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = conns.len(),
            "connections still busy after {DRAIN_TIMEOUT:?}, closing them"
        );
        conns.shutdown().await;
    }
    // The reader holds the last reference to the inotify descriptor besides ours.
    if let Some(task) = watch_task {
        task.abort();
    }
}
