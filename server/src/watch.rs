//! Change events ([`caps::EVENTS`](ferry_common::caps::EVENTS)): one inotify instance for
//! the whole server, watching every directory a client with `EVENTS` has looked into,
//! and one reader task turning what the kernel reports into [`Event`]s broadcast to every
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
//! unwatched (with everything under it) until a client looks into it again.
//!
//! Not covered: directories past the kernel's watch limit (`ENOSPC`, logged once; their
//! changes are simply not reported), and watches are never dropped just because no
//! client is interested any more (they live until the directory goes away).
//!
//! This module must never add a watch by a network-supplied path (only through the
//! magic link of a descriptor [`crate::export::Export`] resolved), never stat anything
//! except through that module's resolution beneath the root, and never block a request
//! on event delivery: a slow subscriber lags and gets [`Event::Resync`] instead.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_common::{Attr, Event, Name, RelPath};
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tracing::{debug, error, warn};

use crate::export::Export;
use crate::sys::{self, Errno};

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

/// Events buffered per subscriber; past it the subscriber gets `Resync`.
pub const CHANNEL_CAPACITY: usize = 4096;

/// One event as read from the inotify descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub wd: i32,
    pub mask: u32,
    pub cookie: u32,
    /// The entry inside the watched directory; `None` for the directory itself.
    pub name: Option<Vec<u8>>,
}

/// Parse a buffer filled by `read(2)` on an inotify descriptor; stops at anything
/// truncated (the kernel only returns whole events, so that would be a bug, not data).
pub fn parse_events(buf: &[u8], out: &mut Vec<RawEvent>) {
    const HEADER: usize = 16; // wd, mask, cookie, len: four 32-bit words
    let mut rest = buf;
    while rest.len() >= HEADER {
        let word = |i: usize| {
            let b: [u8; 4] = rest[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]);
            u32::from_ne_bytes(b)
        };
        let (wd, mask, cookie, len) = (word(0) as i32, word(1), word(2), word(3) as usize);
        let Some(name) = rest.get(HEADER..HEADER + len) else {
            break;
        };
        // The name is NUL-padded to an alignment boundary.
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let name = (end > 0).then(|| name[..end].to_vec());
        out.push(RawEvent {
            wd,
            mask,
            cookie,
            name,
        });
        rest = &rest[HEADER + len..];
    }
}

/// A watched directory.
#[derive(Debug, Clone)]
struct Watch {
    /// Relative to the export root, kept current across renames we can see.
    path: Vec<u8>,
    dev: u64,
    ino: u64,
}

/// The bookkeeping of watches, separate from the inotify descriptor so it can be
/// tested with synthetic events.
#[derive(Debug, Default)]
struct State {
    by_wd: HashMap<i32, Watch>,
    by_path: HashMap<Vec<u8>, i32>,
    by_inode: HashMap<(u64, u64), i32>,
    /// Directory `IN_MOVED_FROM`s waiting for their `IN_MOVED_TO`: cookie → (old path,
    /// batches waited). The pair may straddle two reads, so one extra batch is allowed.
    moves: HashMap<u32, (Vec<u8>, u8)>,
}

/// What one batch of kernel events amounts to, before anything is stat'ed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Digest {
    /// (directory, entry) pairs that changed, in first-seen order, without duplicates.
    changed: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Watched directories that moved: still at their recorded path, or gone from view?
    moved_self: Vec<(i32, Vec<u8>)>,
    resync: bool,
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        return name.to_vec();
    }
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// `path` is `dir` or beneath it.
fn is_under(path: &[u8], dir: &[u8]) -> bool {
    path.starts_with(dir) && (path.len() == dir.len() || path.get(dir.len()) == Some(&b'/'))
}

impl State {
    /// Record a watch; returns the watch this displaced from `path` (another directory
    /// now lives there), which the caller removes from the kernel.
    fn insert(&mut self, wd: i32, path: Vec<u8>, dev: u64, ino: u64) -> Option<i32> {
        if let Some(old) = self.by_wd.get(&wd) {
            // Same inode known under an older path: the one just resolved is current.
            if self.by_path.get(&old.path) == Some(&wd) {
                self.by_path.remove(&old.path);
            }
        }
        let displaced = self.by_path.insert(path.clone(), wd).filter(|&o| o != wd);
        if let Some(other) = displaced {
            // The path now names another directory than before, and where the old one
            // went is unknown (we missed its move): stop watching it.
            self.by_path.insert(path.clone(), other);
            self.forget(other);
            self.by_path.insert(path.clone(), wd);
        }
        self.by_inode.insert((dev, ino), wd);
        self.by_wd.insert(wd, Watch { path, dev, ino });
        displaced
    }

    fn forget(&mut self, wd: i32) {
        if let Some(w) = self.by_wd.remove(&wd) {
            if self.by_path.get(&w.path) == Some(&wd) {
                self.by_path.remove(&w.path);
            }
            if self.by_inode.get(&(w.dev, w.ino)) == Some(&wd) {
                self.by_inode.remove(&(w.dev, w.ino));
            }
        }
    }

    /// Watches at or beneath `dir`.
    fn under(&self, dir: &[u8]) -> Vec<i32> {
        self.by_wd
            .iter()
            .filter(|(_, w)| is_under(&w.path, dir))
            .map(|(&wd, _)| wd)
            .collect()
    }

    /// A directory moved from `old` to `new`: every watch beneath follows.
    fn rename(&mut self, old: &[u8], new: &[u8]) {
        if old.is_empty() {
            return; // the root never moves within itself
        }
        for wd in self.under(old) {
            if let Some(w) = self.by_wd.get_mut(&wd) {
                let mut path = new.to_vec();
                path.extend_from_slice(&w.path[old.len()..]);
                if self.by_path.get(&w.path) == Some(&wd) {
                    self.by_path.remove(&w.path);
                }
                w.path = path.clone();
                self.by_path.insert(path, wd);
            }
        }
    }

    /// Turn one batch into a digest, updating paths for the renames it contains.
    fn digest(&mut self, batch: &[RawEvent]) -> Digest {
        let mut d = Digest::default();
        let mut seen = HashSet::new();
        let mut push = |d: &mut Digest, dir: &[u8], name: Option<&[u8]>| {
            let key = (dir.to_vec(), name.map(<[u8]>::to_vec));
            if seen.insert(key.clone()) {
                d.changed.push(key);
            }
        };
        for m in self.moves.values_mut() {
            m.1 += 1;
        }
        for ev in batch {
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                d.resync = true;
                continue;
            }
            if ev.mask & libc::IN_IGNORED != 0 {
                // The watch is gone (directory deleted, unmounted, or removed by us).
                self.forget(ev.wd);
                continue;
            }
            let Some(dir) = self.by_wd.get(&ev.wd).map(|w| w.path.clone()) else {
                continue; // a watch we already dropped; its last events do not matter
            };
            let Some(name) = &ev.name else {
                if ev.mask & libc::IN_MOVE_SELF != 0 {
                    d.moved_self.push((ev.wd, dir.clone()));
                }
                push(&mut d, &dir, None);
                continue;
            };
            push(&mut d, &dir, Some(name));
            let entries =
                libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO;
            if ev.mask & entries != 0 {
                // The directory's own mtime, size and link count changed too.
                push(&mut d, &dir, None);
            }
            if ev.mask & libc::IN_ISDIR != 0 {
                if ev.mask & libc::IN_MOVED_FROM != 0 {
                    self.moves.insert(ev.cookie, (join(&dir, name), 0));
                } else if ev.mask & libc::IN_MOVED_TO != 0
                    && let Some((old, _)) = self.moves.remove(&ev.cookie)
                {
                    self.rename(&old, &join(&dir, name));
                }
            }
        }
        // A move whose other half never came went out of our sight; the directory's
        // own IN_MOVE_SELF (checked against the disk) takes care of its watches.
        self.moves.retain(|_, m| m.1 < 1);
        d
    }
}

/// The server's inotify instance and the subscribers of its events.
#[derive(Debug)]
pub struct Watcher {
    inotify: AsyncFd<OwnedFd>,
    export: Arc<Export>,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    /// The watch limit was hit and logged; log it once only.
    warned_limit: AtomicBool,
}

impl Watcher {
    /// Create the inotify instance and start the reader task (which runs until the
    /// returned handle is aborted). Must be called inside a tokio runtime.
    pub fn start(export: Arc<Export>) -> Result<(Arc<Watcher>, JoinHandle<()>), Errno> {
        let fd = sys::inotify_init()?;
        let inotify = sys::async_fd(fd).map_err(|e| sys::errno_of(&e))?;
        let (events, _) = broadcast::channel(CHANNEL_CAPACITY);
        let w = Arc::new(Watcher {
            inotify,
            export,
            state: Mutex::new(State::default()),
            events,
            warned_limit: AtomicBool::new(false),
        });
        let reader = tokio::spawn(Arc::clone(&w).read_loop());
        Ok((w, reader))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the maps consistent; a panic elsewhere does not matter.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make sure the directory `dir` (a descriptor just resolved from `path`) is
    /// watched. Call before stat'ing or listing it. Blocking (one `fstat`, maybe one
    /// `inotify_add_watch`); never fails the request: an error only means no events.
    pub fn ensure(&self, dir: BorrowedFd<'_>, path: &RelPath) {
        let st = match sys::fstat(dir) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => st,
            _ => return,
        };
        let mut state = self.lock();
        if let Some(&wd) = state.by_inode.get(&(st.st_dev, st.st_ino))
            && state.by_wd.get(&wd).is_some_and(|w| w.path == path.0)
        {
            return;
        }
        // The lock is held across the system call: an event for the new watch may be
        // read right away, and the reader must then find its path in the map.
        match sys::inotify_watch_fd(self.inotify.get_ref().as_fd(), dir, MASK) {
            Ok(wd) => {
                if let Some(old) = state.insert(wd, path.0.clone(), st.st_dev, st.st_ino) {
                    self.unwatch(old);
                }
            }
            Err(libc::ENOSPC) => {
                if !self.warned_limit.swap(true, Ordering::Relaxed) {
                    warn!(
                        "inotify watch limit reached (fs.inotify.max_user_watches): changes \
                         in directories watched from now on are not reported to clients"
                    );
                }
            }
            Err(e) => debug!(errno = e, ?path, "cannot watch directory"),
        }
    }

    /// Like [`Watcher::ensure`] for an open directory handle, whose `path` may be
    /// stale: a directory not watched any more is watched again only if `path` still
    /// leads to it.
    pub fn ensure_open_dir(&self, dir: BorrowedFd<'_>, path: &RelPath, export: &Export) {
        let Ok(st) = sys::fstat(dir) else {
            return;
        };
        if self.lock().by_inode.contains_key(&(st.st_dev, st.st_ino)) {
            return;
        }
        let Ok(now) = export.resolve_dir(path) else {
            return;
        };
        match sys::fstat(now.as_fd()) {
            Ok(n) if (n.st_dev, n.st_ino) == (st.st_dev, st.st_ino) => self.ensure(dir, path),
            _ => {}
        }
    }

    async fn read_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut batch = Vec::new();
            if let Err(e) = self.read_some(&mut buf, &mut batch).await {
                error!("inotify read failed, change events stop: {e}");
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
                        return;
                    }
                }
            }
            let me = Arc::clone(&self);
            let events = match tokio::task::spawn_blocking(move || me.process(&batch)).await {
                Ok(events) => events,
                Err(e) => {
                    error!("event processing failed: {e}");
                    vec![Event::Resync]
                }
            };
            for ev in events {
                // An error only means nobody is subscribed right now.
                let _ = self.events.send(ev);
            }
        }
    }

    /// Wait for the descriptor to be readable and append what one `read` returns.
    async fn read_some(&self, buf: &mut [u8], batch: &mut Vec<RawEvent>) -> std::io::Result<()> {
        loop {
            let mut guard = self.inotify.readable().await?;
            let read = guard.try_io(|fd| {
                loop {
                    match sys::read(fd.get_ref().as_fd(), buf) {
                        Err(libc::EINTR) => continue,
                        other => return other.map_err(std::io::Error::from_raw_os_error),
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
        for (wd, path) in digest.moved_self {
            self.check_moved(wd, &path);
        }
        let mut events: Vec<Event> = digest
            .changed
            .into_iter()
            .map(|(dir, name)| {
                let attr = self.stat(&dir, name.as_deref());
                Event::Changed {
                    parent: RelPath(dir),
                    name: name.map(Name),
                    attr,
                }
            })
            .collect();
        if digest.resync {
            warn!("inotify queue overflowed; clients must revalidate everything");
            events.push(Event::Resync);
        }
        events
    }

    /// A watched directory moved. If its recorded path (already rewritten when the move
    /// happened in a watched parent) still leads to it, nothing to do; otherwise it went
    /// where we cannot follow it, and it and everything under it are unwatched.
    fn check_moved(&self, wd: i32, path: &[u8]) {
        let here = self
            .export
            .resolve_dir(&RelPath(path.to_vec()))
            .and_then(|fd| sys::fstat(fd.as_fd()));
        let mut state = self.lock();
        let Some(w) = state.by_wd.get(&wd) else {
            return;
        };
        if w.path != path {
            return; // renamed again meanwhile; a later event checks again
        }
        if let Ok(st) = here
            && (st.st_dev, st.st_ino) == (w.dev, w.ino)
        {
            return;
        }
        for wd in state.under(path) {
            state.forget(wd);
            self.unwatch(wd);
        }
    }

    /// Remove a watch from the kernel (already forgotten in the maps). Its IN_IGNORED
    /// will arrive for a watch we no longer know: harmless.
    fn unwatch(&self, wd: i32) {
        if let Err(e) = sys::inotify_rm_watch(self.inotify.get_ref().as_fd(), wd) {
            debug!(errno = e, "inotify_rm_watch");
        }
    }

    /// The entry's attributes now, resolved beneath the root like any request;
    /// `None` when it no longer exists there (or cannot be reached any more).
    fn stat(&self, dir: &[u8], name: Option<&[u8]>) -> Option<Attr> {
        let dir = RelPath(dir.to_vec());
        let st = match name {
            Some(name) => {
                let (d, n) = self.export.entry(&dir, &Name(name.to_vec())).ok()?;
                sys::fstatat(d.as_fd(), &n, libc::AT_SYMLINK_NOFOLLOW).ok()?
            }
            None => sys::fstat(self.export.resolve(&dir, libc::O_PATH).ok()?.as_fd()).ok()?,
        };
        Some(crate::ops::attr_of(&st, self.export.root_dev()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(wd: i32, mask: u32, cookie: u32, name: Option<&str>) -> RawEvent {
        RawEvent {
            wd,
            mask,
            cookie,
            name: name.map(|n| n.as_bytes().to_vec()),
        }
    }

    fn key(dir: &str, name: Option<&str>) -> (Vec<u8>, Option<Vec<u8>>) {
        (dir.as_bytes().to_vec(), name.map(|n| n.as_bytes().to_vec()))
    }

    #[test]
    fn parses_kernel_layout() {
        let mut buf = Vec::new();
        for (wd, mask, cookie, name) in [(1i32, 2u32, 3u32, &b"abc"[..]), (4, 5, 6, b"")] {
            let padded = if name.is_empty() { 0 } else { 16 };
            buf.extend_from_slice(&wd.to_ne_bytes());
            buf.extend_from_slice(&mask.to_ne_bytes());
            buf.extend_from_slice(&cookie.to_ne_bytes());
            buf.extend_from_slice(&(padded as u32).to_ne_bytes());
            let mut n = name.to_vec();
            n.resize(padded, 0);
            buf.extend_from_slice(&n);
        }
        let mut out = Vec::new();
        parse_events(&buf, &mut out);
        assert_eq!(out, vec![ev(1, 2, 3, Some("abc")), ev(4, 5, 6, None)]);
        // Truncated input stops cleanly.
        let mut out = Vec::new();
        parse_events(&buf[..20], &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn coalesces_and_reports_the_directory_itself() {
        let mut s = State::default();
        s.insert(1, b"d".to_vec(), 1, 10);
        let d = s.digest(&[
            ev(1, libc::IN_CREATE, 0, Some("f")),
            ev(1, libc::IN_MODIFY, 0, Some("f")),
            ev(1, libc::IN_MODIFY, 0, Some("f")),
            ev(1, libc::IN_ATTRIB, 0, None),
            ev(7, libc::IN_CREATE, 0, Some("unknown wd")),
        ]);
        assert_eq!(d.changed, vec![key("d", Some("f")), key("d", None)]);
        assert!(!d.resync);
    }

    #[test]
    fn directory_renames_move_every_watch_beneath() {
        let mut s = State::default();
        s.insert(1, b"".to_vec(), 1, 1);
        s.insert(2, b"a".to_vec(), 1, 2);
        s.insert(3, b"a/b".to_vec(), 1, 3);
        s.insert(4, b"ab".to_vec(), 1, 4);
        let dir = libc::IN_ISDIR;
        let d = s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 9, Some("a")),
            ev(4, libc::IN_MOVED_TO | dir, 9, Some("z")),
            ev(3, libc::IN_CREATE, 0, Some("f")),
        ]);
        assert_eq!(s.by_wd[&2].path, b"ab/z");
        assert_eq!(s.by_wd[&3].path, b"ab/z/b");
        assert_eq!(
            s.by_wd[&4].path, b"ab",
            "a sibling sharing the prefix stays"
        );
        assert_eq!(s.by_path[&b"ab/z/b"[..]], 3);
        assert!(!s.by_path.contains_key(&b"a/b"[..]));
        assert!(d.changed.contains(&key("ab/z/b", Some("f"))));
        assert!(d.changed.contains(&key("", Some("a"))));
        assert!(d.changed.contains(&key("ab", Some("z"))));
    }

    #[test]
    fn a_move_may_straddle_two_batches_but_not_three() {
        let mut s = State::default();
        s.insert(1, b"".to_vec(), 1, 1);
        s.insert(2, b"a".to_vec(), 1, 2);
        let dir = libc::IN_ISDIR;
        s.digest(&[ev(1, libc::IN_MOVED_FROM | dir, 5, Some("a"))]);
        s.digest(&[ev(1, libc::IN_MOVED_TO | dir, 5, Some("b"))]);
        assert_eq!(s.by_wd[&2].path, b"b");
        s.digest(&[ev(1, libc::IN_MOVED_FROM | dir, 6, Some("b"))]);
        s.digest(&[]);
        s.digest(&[ev(1, libc::IN_MOVED_TO | dir, 6, Some("c"))]);
        assert_eq!(s.by_wd[&2].path, b"b", "too late to pair");
    }

    #[test]
    fn ignored_forgets_and_overflow_resyncs() {
        let mut s = State::default();
        s.insert(2, b"a".to_vec(), 1, 2);
        let d = s.digest(&[
            ev(2, libc::IN_DELETE_SELF, 0, None),
            ev(2, libc::IN_IGNORED, 0, None),
            ev(-1, libc::IN_Q_OVERFLOW, 0, None),
        ]);
        assert_eq!(d.changed, vec![key("a", None)]);
        assert!(d.resync);
        assert!(s.by_wd.is_empty() && s.by_path.is_empty() && s.by_inode.is_empty());
    }

    #[test]
    fn same_inode_under_a_new_path_replaces_the_old() {
        let mut s = State::default();
        assert_eq!(s.insert(2, b"a".to_vec(), 1, 2), None);
        assert_eq!(s.insert(2, b"b".to_vec(), 1, 2), None);
        assert!(!s.by_path.contains_key(&b"a"[..]));
        assert_eq!(s.by_path[&b"b"[..]], 2);
        // A new directory at an old path replaces that path's watch.
        assert_eq!(s.insert(3, b"b".to_vec(), 1, 3), Some(2));
        assert_eq!(s.by_path[&b"b"[..]], 3);
        assert!(!s.by_wd.contains_key(&2));
    }
}
