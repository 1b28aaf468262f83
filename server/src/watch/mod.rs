//! Change events ([`caps::EVENTS`](ferry_common::caps::EVENTS)): one inotify instance for
//! the whole server, watching every directory a client with `EVENTS` has looked into or
//! been given the attributes of, and one reader task turning what the kernel reports into [`Event`]s broadcast to every
//! such connection.
//!
//! ```text
//!  ops (lookup, opendir, ...) ──ensure──► inotify watch on /proc/self/fd/N
//!  kernel ──► reader task: read a ~10 ms window ──► coalesce by (dir, name)
//!         ──► lstat beneath the root ──► broadcast ──► each connection's writer
//! ```
//!
//! Watches are added lazily and *before* the stat or listing that prompted them, so a
//! change can never slip between what a client was told and the first event. Each watch
//! remembers the directory's path relative to the root; directory renames seen in a
//! watched parent (`IN_MOVED_FROM`/`IN_MOVED_TO` paired by cookie) rewrite the paths of
//! every watch beneath, and a watched directory that moved somewhere we cannot see is
//! unwatched (with everything under it, each reported gone) until a client looks into
//! it again. Events name their directory by inode as well as by path: a client's path
//! of it may be stale. Each watched directory's file handle is kept, so that
//! [`Watcher::locate`] finds it wherever it went beneath the root (as root), and a
//! `Locate` reply waits for the events of the changes made before it
//! ([`Watcher::caught_up`]).
//!
//! A directory that cannot be watched (the kernel's watch limit, `ENOSPC`, or
//! `--max-watches`) leaves changes in it unreported. A client with
//! [`caps::PARTIAL_WATCHES`](ferry_common::caps::PARTIAL_WATCHES) is told per reply:
//! every attribute of a reply that rests on a directory not watched (before and after
//! the request ran), or that ran while such a watch failed, goes out marked
//! [`Attr::uncovered`] (`ops::execute`), and it keeps trusting events for the rest.
//! To other clients the stream is *incomplete* for good: each is sent
//! [`Event::Incomplete`] before any reply that relied on the missing watch (see
//! [`Watcher::complete`] and the connection's writer), and later ones are not offered
//! events at all; they then revalidate as if they had no events. Either way slower
//! but never stale. Watches are never dropped just because no client is interested
//! any more (they live until the directory goes away).
//!
//! This module must never add a watch by a network-supplied path (only through the
//! magic link of a descriptor [`crate::export::Export`] resolved), never stat anything
//! except through that module's resolution beneath the root, and never block a request
//! on event delivery: a slow subscriber lags and gets [`Event::Resync`] instead. The one
//! deliberate wait is a commit's barrier ([`Watcher::barrier`]), bounded by a timeout.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_common::{Attr, DirEntry, Event, Name, RelPath};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, broadcast};
use tokio::task::JoinHandle;
use tracing::{debug, error, warn};

use crate::export::Export;
use crate::sys::{self, Errno};

mod listings;
mod state;

pub use listings::KEPT_LISTING_MAX;
use listings::Listings;
use state::State;
pub use state::{RawEvent, parse_events};

/// What every watch reports. `IN_EXCL_UNLINK`: a file unlinked while open elsewhere
/// stops producing events for its old directory. `IN_ONLYDIR`: refuse anything that is
/// not a directory (the fd is one, but this costs nothing).
pub const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_EXCL_UNLINK
    | libc::IN_ONLYDIR;

/// How long the reader keeps collecting after the first event of a batch: a burst of
/// writes to one file becomes one event, at a latency far below the ~100 ms target.
pub const WINDOW: Duration = Duration::from_millis(10);

/// Most kernel events in one batch; a batch that is full is processed at once.
pub const MAX_BATCH: usize = 4096;

/// How long no eager watch is added after the kernel ran out of watches for one.
pub const EAGER_PAUSE: Duration = Duration::from_secs(60);

/// Events buffered per subscriber; past it the subscriber gets `Resync`.
pub const CHANNEL_CAPACITY: usize = 4096;

/// The server's inotify instance and the subscribers of its events.
#[derive(Debug)]
pub struct Watcher {
    inotify: AsyncFd<OwnedFd>,
    export: Arc<Export>,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    /// Some change anywhere may go unreported from now on (inotify itself failed).
    incomplete: AtomicBool,
    /// Some directory a client looked into could not be watched: changes in it may go
    /// unreported. Clients with [`ferry_common::caps::PARTIAL_WATCHES`] are told per
    /// reply ([`Watcher::covers_dir`], [`Watcher::failures`]); to the others the stream
    /// is incomplete.
    partial: AtomicBool,
    /// Watches of directories clients look into that could not be added, so far.
    failures: AtomicU64,
    /// Most watches this server holds at once (`--max-watches`); past it, as past the
    /// kernel's limit, the stream becomes incomplete.
    max_watches: usize,
    /// Most watches held for eager ones to be added ([`Watcher::watch`]): nine tenths
    /// of the smaller of `max_watches` and the kernel's per-user limit at start.
    eager_watches: usize,
    /// No eager watch is added before this (ms since `started`): the kernel ran out
    /// first (its limit is shared with the user's other programs) not long ago.
    eager_paused_until: AtomicU64,
    started: std::time::Instant,
    /// Commit barriers waiting for acknowledgements: id → (acks still due, wake-up).
    barriers: Mutex<HashMap<u64, (usize, Arc<Notify>)>>,
    next_barrier: AtomicU64,
    /// The root opened for reading, which `open_by_handle_at` needs (see
    /// [`Watcher::locate`]); `None` if it cannot be.
    handle_mount: std::sync::OnceLock<Option<OwnedFd>>,
    /// Bytes read from the inotify descriptor so far, and of those, how many have been
    /// digested and their events broadcast (see [`Watcher::caught_up`]).
    read_pos: AtomicU64,
    digested_pos: AtomicU64,
    digested: Notify,
    /// Held across a read and its count, and across `FIONREAD` and the load of the
    /// count: no byte is then counted in neither.
    reading: Mutex<()>,
    /// Listings with attributes, handed out again while the watches vouch for them
    /// ([`Watcher::cached_listing`]).
    kept: Mutex<Listings>,
}

/// Longest a reply waits for the events of changes made before it ([`Watcher::caught_up`]).
const CATCH_UP_MAX: Duration = Duration::from_secs(1);

/// How long a commit waits for other clients to acknowledge its barrier. A client that
/// does not answer in time (gone, stalled) only delays the committer by this much.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(2);

impl Watcher {
    /// Create the inotify instance and start the reader task (which runs until the
    /// returned handle is aborted). `max_watches`: see `--max-watches` (`None`: only
    /// the kernel's limit). Must be called inside a tokio runtime.
    pub fn start(
        export: Arc<Export>,
        max_watches: Option<usize>,
    ) -> Result<(Arc<Watcher>, JoinHandle<()>), Errno> {
        let fd = sys::inotify_init()?;
        let inotify = sys::async_fd(fd).map_err(|e| sys::errno_of(&e))?;
        let (events, _) = broadcast::channel(CHANNEL_CAPACITY);
        let w = Arc::new(Watcher {
            inotify,
            export,
            state: Mutex::new(State::default()),
            events,
            incomplete: AtomicBool::new(false),
            partial: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            max_watches: max_watches.unwrap_or(usize::MAX),
            eager_watches: {
                let kernel = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
                    .ok()
                    .and_then(|s| s.trim().parse::<usize>().ok())
                    .unwrap_or(usize::MAX);
                nine_tenths(max_watches.unwrap_or(usize::MAX).min(kernel))
            },
            eager_paused_until: AtomicU64::new(0),
            started: std::time::Instant::now(),
            barriers: Mutex::new(HashMap::new()),
            next_barrier: AtomicU64::new(1),
            handle_mount: std::sync::OnceLock::new(),
            read_pos: AtomicU64::new(0),
            digested_pos: AtomicU64::new(0),
            digested: Notify::new(),
            reading: Mutex::new(()),
            kept: Mutex::new(Listings::default()),
        });
        let reader = tokio::spawn(Arc::clone(&w).read_loop());
        Ok((w, reader))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether every change in the directories clients looked into has been reported.
    /// Once false, it stays false until the server restarts.
    pub fn complete(&self) -> bool {
        !self.lost_all() && !self.partial()
    }

    /// Whether changes may go unreported anywhere (no client can trust events).
    pub fn lost_all(&self) -> bool {
        self.incomplete.load(Ordering::SeqCst)
    }

    /// Whether some directory a client looked into is not watched (see
    /// [`Watcher::covers_dir`]).
    pub fn partial(&self) -> bool {
        self.partial.load(Ordering::SeqCst)
    }

    /// How many watches of directories clients look into could not be added so far: a
    /// reply computed while this changed may rest on one.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    /// Whether the directory at `path` (beneath the root) is watched now.
    pub fn covers_dir(&self, path: &RelPath) -> bool {
        self.export
            .resolve_dir(path)
            .and_then(|fd| sys::fstat(fd.as_fd()))
            .is_ok_and(|st| self.covers(st.st_dev, st.st_ino))
    }

    /// Some change anywhere may go unreported from now on: say so, once, to every
    /// subscriber. Set before the caller answers any request that relied on what was
    /// lost, so the connection's writer sends `Incomplete` ahead of that answer.
    fn lose(&self, why: &str) {
        if !self.incomplete.swap(true, Ordering::SeqCst) {
            warn!(
                "{why}: changes are no longer reported; clients revalidate what they \
                 cache (within 1 s) instead of waiting for events, until ferryd restarts"
            );
            // An error only means nobody is subscribed right now.
            let _ = self.events.send(Event::Incomplete);
        }
    }

    /// A directory a client looks into could not be watched: counted before the caller
    /// answers (see [`Watcher::failures`]). Clients without
    /// [`ferry_common::caps::PARTIAL_WATCHES`] are told, once, that the stream is
    /// incomplete (their writers skip this `Incomplete` for the others).
    fn lose_dir(&self, why: &str) {
        self.failures.fetch_add(1, Ordering::SeqCst);
        if !self.partial.swap(true, Ordering::SeqCst) {
            warn!(
                "{why}: changes in directories past the limit are not reported; clients \
                 revalidate what they hold of those (within 1 s) instead of waiting for \
                 events (older clients: of everything), until ferryd restarts (raise \
                 fs.inotify.max_user_watches to avoid this)"
            );
            // An error only means nobody is subscribed right now.
            let _ = self.events.send(Event::Incomplete);
        }
    }

    /// Tell every other subscribed client that the file with `attr` has new content (with
    /// `None`: only to apply the events sent before) and wait (at most
    /// [`BARRIER_TIMEOUT`]) until they have all dropped what those make stale.
    /// `own` is the calling connection's set of barriers, which its writer skips.
    pub async fn barrier(&self, attr: Option<Attr>, own: &std::sync::Mutex<HashSet<u64>>) {
        // Every subscriber but the caller must answer.
        let due = self.others_subscribed();
        if due == 0 {
            return;
        }
        let id = self.next_barrier.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        self.barriers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (due, Arc::clone(&wake)));
        own.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
        let _ = self.events.send(Event::Barrier { id, attr });
        if tokio::time::timeout(BARRIER_TIMEOUT, wake.notified())
            .await
            .is_err()
        {
            debug!(id, "barrier not acknowledged by every client in time");
        }
        self.barriers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        own.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// Subscribers other than the caller (one of them): those a barrier waits for.
    pub fn others_subscribed(&self) -> usize {
        self.events.receiver_count().saturating_sub(1)
    }

    /// A client acknowledged barrier `id`.
    pub fn ack(&self, id: u64) {
        let mut barriers = self.barriers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((due, wake)) = barriers.get_mut(&id) {
            *due = due.saturating_sub(1);
            if *due == 0 {
                // notify_one keeps the permit if the committer is not waiting yet.
                wake.notify_one();
                barriers.remove(&id);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the maps consistent; a panic elsewhere does not matter.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make sure the directory `dir` (a descriptor just resolved from `path`) is
    /// watched. Call before stat'ing or listing it. Blocking (one `fstat`, maybe one
    /// `inotify_add_watch`); never fails the request: an error only means no events,
    /// and makes the stream incomplete.
    pub fn ensure(&self, dir: BorrowedFd<'_>, path: &RelPath) {
        self.watch(dir, path, false);
    }

    /// Whether `st` (a directory at `path`) is watched under that path.
    fn watched_at(state: &State, st: &libc::stat, path: &[u8]) -> bool {
        state
            .by_inode
            .get(&(st.st_dev, st.st_ino))
            .and_then(|wd| state.by_wd.get(wd))
            .is_some_and(|w| w.path == path)
    }

    /// [`Watcher::ensure`]; `eager`: a watch only worth having (a subdirectory whose
    /// attributes go out), which gives up quietly (no events for it, nothing else lost)
    /// where a required one makes the stream incomplete, and leaves a tenth of the
    /// watches to required ones. Returns whether the directory is watched now.
    fn watch(&self, dir: BorrowedFd<'_>, path: &RelPath, eager: bool) -> bool {
        let st = match sys::fstat(dir) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => st,
            _ => return false,
        };
        let mut state = self.lock();
        // A watch of this inode number at this path may be the watch of a directory
        // removed since, whose `IN_IGNORED` is not digested yet: `rm -rf d; mkdir d`
        // gives the new `d` the old one's number at once (ext4), and that watch hears
        // nothing of it. Only undigested events can hide that; then the kernel is asked
        // (adding a watch gives the existing one's descriptor for the same directory).
        let watched = Self::watched_at(&state, &st, &path.0);
        if watched && self.digested_all() {
            return true;
        }
        let known = state.by_inode.contains_key(&(st.st_dev, st.st_ino));
        let budget = if eager {
            self.eager_budget()
        } else {
            self.max_watches
        };
        if !known && state.by_wd.len() >= budget {
            if !eager {
                self.lose_dir("--max-watches reached");
            }
            return false;
        }
        // The lock is held across the system call: an event for the new watch may be
        // read right away, and the reader must then find its path in the map.
        match sys::inotify_watch_fd(self.inotify.get_ref().as_fd(), dir, MASK) {
            Ok(wd) if watched && state.by_inode.get(&(st.st_dev, st.st_ino)) == Some(&wd) => true,
            Ok(wd) => {
                // An inode number watched before, but another directory now.
                let reused = watched;
                if !known && self.removed(dir, path) {
                    // Removed before the watch was added: it would never hear of
                    // anything, not even its own deletion, and pin the inode for good.
                    self.unwatch(wd);
                    return false;
                }
                let id = (st.st_dev, st.st_ino);
                // (Taken again for a new watch: the inode number may have been reused.)
                if id.0 == self.export.root_dev()
                    && (!known || reused || !state.handles.contains_key(&id))
                    && let Ok(handle) = sys::handle_of(dir)
                {
                    state.keep_handle(id, handle);
                }
                if let Some((old, w)) = state.insert(wd, path.0.clone(), st.st_dev, st.st_ino) {
                    self.unwatch(old);
                    if let Some(ev) = self.lost_sight(&[w]) {
                        // An error only means nobody is subscribed right now.
                        let _ = self.events.send(ev);
                    }
                }
                true
            }
            Err(e) if eager => {
                debug!(errno = e, ?path, "cannot watch a subdirectory");
                if e == libc::ENOSPC {
                    // The kernel's limit is shared with the user's other programs:
                    // leave what is left to required watches for a while.
                    let until = self.started.elapsed() + EAGER_PAUSE;
                    self.eager_paused_until
                        .store(until.as_millis() as u64, Ordering::Relaxed);
                }
                false
            }
            Err(libc::ENOSPC) => {
                self.lose_dir("inotify watch limit reached (fs.inotify.max_user_watches)");
                false
            }
            Err(e) => {
                // Removed meanwhile, say: nothing will change in it. Anything else
                // leaves a directory clients look into unwatched.
                debug!(errno = e, ?path, "cannot watch directory");
                if e != libc::ENOENT {
                    self.lose_dir(&format!("cannot watch a directory (errno {e})"));
                }
                false
            }
        }
    }

    /// An eager watch of `dir` (just resolved from `path`), for a listing asked ahead of
    /// need; returns whether it is watched (always, once the stream is lost for all:
    /// no client trusts it then).
    pub fn ensure_eagerly(&self, dir: BorrowedFd<'_>, path: &RelPath) -> bool {
        self.lost_all() || self.watch(dir, path, true)
    }

    /// Most watches held for an eager one to be added now.
    fn eager_budget(&self) -> usize {
        let paused = self.eager_paused_until.load(Ordering::Relaxed);
        if (self.started.elapsed().as_millis() as u64) < paused {
            0
        } else {
            self.eager_watches
        }
    }

    /// Whether directory `dir`, just watched, was removed already: no link left, and
    /// `path` does not lead to it (some filesystems report no links for a live one).
    fn removed(&self, dir: BorrowedFd<'_>, path: &RelPath) -> bool {
        let Ok(st) = sys::fstat(dir) else {
            return false;
        };
        st.st_nlink == 0 && !self.export.leads_to(path, (st.st_dev, st.st_ino))
    }

    /// Whether the directory `(dev, ino)` is watched (under whatever path).
    pub fn covers(&self, dev: u64, ino: u64) -> bool {
        self.lock().by_inode.contains_key(&(dev, ino))
    }

    /// Where directory `node` (a node id, [`crate::ops::node_id`]) is now, if it is
    /// beneath the root: found by its file handle (kept for directories this server
    /// watched on the root's filesystem; needs `CAP_DAC_READ_SEARCH`), else at its
    /// watch's path. Either is answered only if it leads to that very directory now,
    /// resolved beneath the root as any request's path.
    pub fn locate(&self, node: u64) -> Option<RelPath> {
        let root_dev = self.export.root_dev();
        let (handle, watched) = {
            let state = self.lock();
            // Node ids of other filesystems mounted in the export mix in the device
            // (`ops::node_id`): one candidate per device.
            let watched = state
                .devs
                .iter()
                .map(|&dev| match dev == root_dev {
                    true => (dev, node),
                    false => (dev, node ^ dev.rotate_left(32)),
                })
                .find_map(|id| state.by_inode.get(&id))
                .and_then(|wd| state.by_wd.get(wd))
                .map(|w| (RelPath(w.path.clone()), (w.dev, w.ino)));
            (state.handles.get(&(root_dev, node)).cloned(), watched)
        };
        if let Some(found) = handle.and_then(|h| self.found_by_handle(&h, (root_dev, node))) {
            return Some(found);
        }
        let (path, id) = watched?;
        self.export.leads_to(&path, id).then_some(path)
    }

    /// The path beneath the root of the directory `id` that `handle` names.
    fn found_by_handle(&self, handle: &sys::Handle, id: (u64, u64)) -> Option<RelPath> {
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        // (`open_by_handle_at` takes no `O_PATH` descriptor for the filesystem.)
        let mount = self
            .handle_mount
            .get_or_init(|| {
                let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
                sys::openat(self.export.root_fd(), c".", flags, 0).ok()
            })
            .as_ref()?;
        let fd = sys::open_by_handle(mount.as_fd(), handle, flags).ok()?;
        let st = sys::fstat(fd.as_fd()).ok()?;
        if (st.st_dev, st.st_ino) != id {
            return None;
        }
        let root = sys::fd_path(self.export.root_fd()).ok()?;
        let at = sys::fd_path(fd.as_fd()).ok()?;
        let rel = if at == root {
            Vec::new()
        } else {
            let beneath = if root.ends_with(b"/") {
                root
            } else {
                [&root[..], b"/"].concat()
            };
            at.strip_prefix(&beneath[..])?.to_vec()
        };
        let path = RelPath(rel);
        self.export.leads_to(&path, id).then_some(path)
    }

    /// Make sure the directory entry `name` of `dir` (whose path is `path`; `st` its
    /// attributes just taken) is watched if it is a directory, before its attributes
    /// are handed out: a change inside it changes them (mtime, link count), and only its
    /// own watch reports that. Best effort (an eager watch, see [`Watcher::watch`]).
    /// Returns its attributes (taken again once newly watched) and whether they are
    /// covered by events: false for a directory left unwatched (past the budget, or
    /// without permission), whose attributes must then go out marked
    /// ([`ferry_common::Attr::uncovered`]).
    pub fn ensure_entry(
        &self,
        dir: BorrowedFd<'_>,
        path: &RelPath,
        name: &std::ffi::CStr,
        st: libc::stat,
    ) -> (libc::stat, bool) {
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR || self.lost_all() {
            // (Once lost for all, no client trusts events: nothing to mark.)
            return (st, true);
        }
        let at = path.join(name.to_bytes());
        {
            let state = self.lock();
            // (Unless the watch may be a removed directory's: see `Watcher::watch`.)
            if Self::watched_at(&state, &st, &at.0) && self.digested_all() {
                return (st, true);
            }
            let known = state.by_inode.contains_key(&(st.st_dev, st.st_ino));
            if !known && state.by_wd.len() >= self.eager_budget() {
                return (st, false);
            }
        }
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let Ok(fd) = sys::openat(dir, name, flags, 0) else {
            return (st, false);
        };
        if !self.watch(fd.as_fd(), &at, true) {
            return (st, false);
        }
        // Taken again once watched: a change between the two is then reported.
        (sys::fstat(fd.as_fd()).unwrap_or(st), true)
    }

    /// Like [`Watcher::ensure`] for an open directory handle, whose `path` may be
    /// stale: a directory not watched any more is watched again only if `path` still
    /// leads to it.
    pub fn ensure_open_dir(&self, dir: BorrowedFd<'_>, path: &RelPath, export: &Export) {
        let Ok(st) = sys::fstat(dir) else {
            return;
        };
        // (A watch of its inode number may be a removed directory's: see `Watcher::watch`.)
        let watched = self.covers(st.st_dev, st.st_ino) && self.digested_all();
        if !watched && export.leads_to(path, (st.st_dev, st.st_ino)) {
            self.ensure(dir, path);
        }
    }

    async fn read_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut batch = Vec::new();
            if let Err(e) = self.read_some(&mut buf, &mut batch).await {
                error!("inotify read failed, change events stop: {e}");
                self.lose("inotify read failed");
                self.stop_catching_up();
                return;
            }
            let deadline = tokio::time::Instant::now() + WINDOW;
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, self.read_some(&mut buf, &mut batch)).await
                {
                    Err(_) => break,
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        error!("inotify read failed, change events stop: {e}");
                        self.lose("inotify read failed");
                        self.stop_catching_up();
                        return;
                    }
                }
            }
            let upto = self.read_pos.load(Ordering::SeqCst);
            let me = Arc::clone(&self);
            let events = match tokio::task::spawn_blocking(move || me.process(&batch)).await {
                Ok(events) => events,
                Err(e) => {
                    error!("event processing failed: {e}");
                    // Its events may not have stamped their watches: kept listings go.
                    self.lock().distrust();
                    vec![Event::Resync]
                }
            };
            for ev in events {
                // An error only means nobody is subscribed right now.
                let _ = self.events.send(ev);
            }
            self.digested_pos.store(upto, Ordering::SeqCst);
            self.digested.notify_waiters();
        }
    }

    /// No more events will come: nobody waits for them ([`Watcher::caught_up`]).
    fn stop_catching_up(&self) {
        self.digested_pos.store(u64::MAX, Ordering::SeqCst);
        self.digested.notify_waiters();
    }

    /// Wait until the events of every change made before now have been broadcast (at
    /// most [`CATCH_UP_MAX`]): a reply sent after them, by a writer that sends the
    /// events it has first, reaches its client after them. For answers read from the
    /// filesystem as it is now (`Locate`), which the client must not take before the
    /// events of the changes that led there.
    pub async fn caught_up(&self) {
        let target = {
            let _reading = self.reading.lock().unwrap_or_else(|p| p.into_inner());
            let queued = sys::fionread(self.inotify.get_ref().as_fd()).unwrap_or(0);
            self.read_pos.load(Ordering::SeqCst) + queued
        };
        let deadline = tokio::time::Instant::now() + CATCH_UP_MAX;
        loop {
            let notified = self.digested.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.digested_pos.load(Ordering::SeqCst) >= target {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                debug!("events not caught up within {CATCH_UP_MAX:?}");
                return;
            }
        }
    }

    /// Whether the events of every change made before now have been digested (without
    /// waiting: see [`Watcher::caught_up`] for that).
    fn digested_all(&self) -> bool {
        let target = {
            let _reading = self.reading.lock().unwrap_or_else(|p| p.into_inner());
            let Ok(queued) = sys::fionread(self.inotify.get_ref().as_fd()) else {
                return false;
            };
            self.read_pos.load(Ordering::SeqCst) + queued
        };
        self.digested_pos.load(Ordering::SeqCst) >= target
    }

    fn kept(&self) -> MutexGuard<'_, Listings> {
        // Every update leaves the maps consistent.
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a listing of directory `id` that starts now may be kept from
    /// ([`Watcher::keep_listing`]): the current watch generation, if the directory is
    /// watched (call after [`Watcher::ensure`]); `None` otherwise.
    pub fn listing_ticket(&self, id: (u64, u64)) -> Option<u64> {
        if self.lost_all() {
            return None;
        }
        let state = self.lock();
        state.by_inode.contains_key(&id).then_some(state.generation)
    }

    /// Keep the whole listing of directory `id` (`entries`, `bytes` as counted for
    /// frames), read from a ticket `since` taken at `at`, unless its watch reported
    /// something since.
    pub fn keep_listing(
        &self,
        id: (u64, u64),
        since: u64,
        hints: bool,
        entries: Vec<DirEntry>,
        bytes: usize,
        at: std::time::Instant,
    ) {
        if !self.vouches(id, since) {
            return;
        }
        self.kept().keep(id, since, hints, entries, bytes, at);
    }

    /// The file `node` (a node id) may have changed where no watch of a directory
    /// listing it reports it: it gained a link (changes through that name go to that
    /// directory only), or it was changed through a handle (its name may be gone:
    /// `IN_EXCL_UNLINK`). Kept listings stat it again ([`Watcher::touched_since`]).
    pub fn note_touched(&self, node: u64) {
        self.lock().touch(node);
    }

    /// Which of `entries` (a kept listing begun at generation `since`) were noted
    /// touched since ([`Watcher::note_touched`]); all of them if the record of that
    /// time is lost.
    pub fn touched_since(&self, since: u64, entries: &[DirEntry]) -> Vec<bool> {
        let state = self.lock();
        if state.touched_floor > since {
            return vec![true; entries.len()];
        }
        entries
            .iter()
            .map(|e| state.touched.get(&e.attr.ino).is_some_and(|&g| g > since))
            .collect()
    }

    /// Whether a listing of `id` begun at generation `since` has missed no change its
    /// watch reported: the directory is watched, its watch was there and has digested
    /// nothing since, and no event was lost since.
    fn vouches(&self, id: (u64, u64), since: u64) -> bool {
        if self.lost_all() {
            return false;
        }
        let state = self.lock();
        state
            .by_inode
            .get(&id)
            .and_then(|wd| state.by_wd.get(wd))
            .is_some_and(|w| w.changed <= since && state.overflowed <= since)
            && state.touched_floor <= since
    }

    /// The listing of directory `id` as kept (with `hints`: see
    /// [`ferry_common::caps::XATTR_HINTS`]) and the generation it began at, if it is
    /// current (never while the server is partial): every change made before
    /// now has had its event digested, and none of them was in this directory since the
    /// listing began. A change made while the listing was read either had its event
    /// queued or merged into one queued and not yet read (inotify merges an event
    /// equal to the last one queued), which was digested after the ticket: either
    /// way the watch's generation moved past the listing's.
    ///
    /// Vouches for the names and for the attributes of entries whose changes come
    /// through this directory's watch: not for subdirectories (their own watches
    /// report changes inside them), files with several links (changed through
    /// another name, maybe in a directory nobody watches) or files noted touched since
    /// ([`Watcher::touched_since`]); the caller stats those again.
    pub fn cached_listing(&self, id: (u64, u64), hints: bool) -> Option<(Arc<[DirEntry]>, u64)> {
        // Past the watch limit a file may gain a link in a directory nobody watches,
        // and must then go out marked (`conn::mark_links`): listings are read afresh.
        if self.lost_all() || self.partial() || !self.digested_all() {
            return None;
        }
        let now = std::time::Instant::now();
        let current = |since| self.vouches(id, since);
        self.kept().get(id, hints, now, current)
    }

    /// Wait for the descriptor to be readable and append what one `read` returns.
    async fn read_some(&self, buf: &mut [u8], batch: &mut Vec<RawEvent>) -> std::io::Result<()> {
        loop {
            let mut guard = self.inotify.readable().await?;
            let read = guard.try_io(|fd| {
                let _reading = self.reading.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    match sys::read(fd.get_ref().as_fd(), buf) {
                        Err(libc::EINTR) => continue,
                        Ok(n) => {
                            self.read_pos.fetch_add(n as u64, Ordering::SeqCst);
                            return Ok(n);
                        }
                        Err(e) => return Err(std::io::Error::from_raw_os_error(e)),
                    }
                }
            });
            match read {
                Ok(Ok(n)) => {
                    parse_events(&buf[..n], batch);
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Blocking: bookkeeping, then one stat per changed entry.
    fn process(&self, batch: &[RawEvent]) -> Vec<Event> {
        let digest = self.lock().digest(batch);
        let mut unwatched = Vec::new();
        // (A directory's own move event and the digest's check of where a move took it
        // often name the same place: checked once.)
        let mut checked = HashSet::new();
        for (wd, path) in digest.moved_self {
            if checked.insert((wd, path.clone())) {
                unwatched.extend(self.check_moved(wd, &path));
            }
        }
        let lost = self.lost_sight(&unwatched);
        let root_dev = self.export.root_dev();
        let mut events: Vec<Event> = digest
            .changed
            .into_iter()
            .map(|c| {
                let attr = self.stat(&c.dir, c.id, c.name.as_deref());
                Event::Changed {
                    parent: RelPath(c.dir),
                    dir: crate::ops::node_id(c.id.0, c.id.1, root_dev),
                    name: c.name.map(Name),
                    attr,
                }
            })
            .collect();
        // A file that gained a link changes through that name unseen by the watches of
        // its other names' directories.
        {
            let mut state = self.lock();
            for ev in &events {
                if let Event::Changed { attr: Some(a), .. } = ev
                    && a.kind != ferry_common::FileKind::Dir
                    && a.nlink > 1
                {
                    state.touch(a.ino);
                }
            }
        }
        // After the events that came with the moves.
        events.extend(lost);
        if digest.resync {
            warn!("inotify queue overflowed; clients must revalidate everything");
            events.push(Event::Resync);
        }
        events
    }

    /// Watched directories went where the server cannot follow them (a move it missed):
    /// whatever clients hold of them and of their files would go stale unreported
    /// (the files' own events came through those watches), so clients are told to drop
    /// it. A client that finds them again under their new path has them watched again.
    fn lost_sight(&self, dirs: &[state::Watch]) -> Option<Event> {
        let w = dirs.first()?;
        debug!(
            count = dirs.len(),
            path = ?String::from_utf8_lossy(&w.path),
            "watched directories moved out of sight"
        );
        let root_dev = self.export.root_dev();
        Some(Event::Unwatched {
            dirs: dirs
                .iter()
                .map(|w| crate::ops::node_id(w.dev, w.ino, root_dev))
                .collect(),
        })
    }

    /// A watched directory moved. If its recorded path (already rewritten when the move
    /// happened in a watched parent) still leads to it, nothing to do; otherwise it went
    /// where we cannot follow it, and it and everything under it are unwatched.
    /// Returns the watches dropped.
    fn check_moved(&self, wd: i32, path: &[u8]) -> Vec<state::Watch> {
        let here = self
            .export
            .resolve_dir(&RelPath(path.to_vec()))
            .and_then(|fd| sys::fstat(fd.as_fd()));
        let mut state = self.lock();
        let Some(w) = state.by_wd.get(&wd) else {
            return Vec::new();
        };
        if w.path != path {
            return Vec::new(); // renamed again meanwhile; a later event checks again
        }
        if let Ok(st) = here
            && (st.st_dev, st.st_ino) == (w.dev, w.ino)
        {
            return Vec::new();
        }
        let mut dropped = Vec::new();
        // A watch set aside by a directory moved onto its path (see `State::rename`)
        // no longer owns that path: it goes with those set aside beneath it, not the
        // directory that took its place and what is beneath that.
        let set_aside = state.by_path.get(path) != Some(&wd);
        for wd in state.under(path) {
            let owns_its_path = state
                .by_wd
                .get(&wd)
                .is_some_and(|w| state.by_path.get(&w.path) == Some(&wd));
            if set_aside && owns_its_path {
                continue;
            }
            dropped.extend(state.forget(wd));
            self.unwatch(wd);
        }
        dropped
    }

    /// Remove a watch from the kernel (already forgotten in the maps). Its IN_IGNORED
    /// will arrive for a watch we no longer know: harmless.
    fn unwatch(&self, wd: i32) {
        if let Err(e) = sys::inotify_rm_watch(self.inotify.get_ref().as_fd(), wd) {
            debug!(errno = e, "inotify_rm_watch");
        }
    }

    /// The entry's attributes now, resolved beneath the root like any request;
    /// `None` when it no longer exists there, cannot be reached any more, or `dir` is
    /// not the directory `id` any more (moved since: the entry found would be another
    /// directory's).
    fn stat(&self, dir: &[u8], id: (u64, u64), name: Option<&[u8]>) -> Option<Attr> {
        let dir = RelPath(dir.to_vec());
        let is_it = |st: &libc::stat| (st.st_dev, st.st_ino) == id;
        let st = match name {
            Some(name) => {
                let (d, n) = self.export.entry(&dir, &Name(name.to_vec())).ok()?;
                if !sys::fstat(d.as_fd()).is_ok_and(|st| is_it(&st)) {
                    return None;
                }
                sys::fstatat(d.as_fd(), &n, libc::AT_SYMLINK_NOFOLLOW).ok()?
            }
            None => {
                let st = sys::fstat(self.export.resolve(&dir, libc::O_PATH).ok()?.as_fd()).ok()?;
                if !is_it(&st) {
                    return None;
                }
                st
            }
        };
        let mut attr = crate::ops::attr_of(&st, self.export.root_dev());
        // A subdirectory's own changes come only through its own watch.
        attr.uncovered = st.st_mode & libc::S_IFMT == libc::S_IFDIR
            && name.is_some()
            && !self.covers(st.st_dev, st.st_ino);
        Some(attr)
    }
}

/// Nine tenths of `n`, rounded down (`n` minus a tenth rounded up): what eager watches
/// may use of a limit of `n`.
fn nine_tenths(n: usize) -> usize {
    n - n.div_ceil(10)
}
