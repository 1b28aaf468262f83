//! The filesystem core: every FUSE operation as an async function over plain types.
//!
//! It turns kernel inode numbers and file handles into protocol requests, keeps the inode
//! table in step with what the server did, and returns `Attr`s or an [`FsError`]. It knows
//! nothing of fuser replies (the adapter in `fuse.rs` does the replying), so it can be
//! driven from tests or other front ends. It must never block a thread on the network:
//! everything waits through `Client` on the tokio runtime.
//!
//! - `mod.rs`: names and attributes (lookup, getattr, setattr, create-like ops, rename).
//! - `files.rs`: open files: the data cache, readahead, write-behind, commit on close.
//! - `dirs.rs`: listings, cached while the server's event stream is healthy
//!   (`listings.rs`: the kept ones).
//! - `events.rs`: server change events → kernel and cache invalidations.

mod dirs;
mod events;
mod files;
mod listings;
pub mod spool;
mod unlinks;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use ferry_common::OnceKey;
use ferry_common::proto::{
    Attr, Caller, FileKind, MAX_IO, Name, RelPath, Request, Response, SetAttr, StatFs, XATTRS_NONE,
    XATTRS_UNKNOWN,
};
use rustc_hash::FxHashMap;

use crate::cache::DataCache;
use crate::conn::Client;
use crate::error::{FsError, FsResult, TransportError};
use crate::nodes::{Nodes, ROOT};

pub use dirs::{Listed, ListedEntry};
pub use events::Invalidation;
pub use files::{NewFile, OpenReply};
pub use listings::events_vouch_for;

/// How long the kernel may trust entries and attributes. With server events, changes are
/// pushed and this is only a safety net; without them it bounds staleness.
pub const TTL_WITH_EVENTS: Duration = Duration::from_secs(300);
pub const TTL_WITHOUT_EVENTS: Duration = Duration::from_secs(1);

/// Most times one keyed change is sent again after its connection broke under it
/// ([`Core::repeat_keyed`]). Each waits at most `--timeout` for a server to answer.
pub const MAX_REPEATS: u32 = 3;

/// Every name in a directory this client created (`InodeState::names`).
#[derive(Debug)]
struct KnownNames {
    names: HashSet<Vec<u8>>,
    /// When this started: trusted no longer than the kernel's own entry TTL (a server
    /// that could not watch the directory sends no events for it).
    since: Instant,
}

/// What this client knows about one inode beyond the kernel's view.
#[derive(Debug, Default)]
struct InodeState {
    /// Server version of the attributes last handed to the kernel.
    version: u64,
    /// The version whose data the kernel's page cache may hold (for `FOPEN_KEEP_CACHE`).
    kernel_version: Option<u64>,
    /// Open handles of this client that may write.
    writers: u32,
    /// Of those, how many are being released (see `Core::release`).
    closing: u32,
    /// The one server handle all of this client's writers of the inode share.
    writer: Option<files::Writer>,
    /// Writer handles replaced by a newer one while descriptors that used them were still
    /// open (see `Core::claim_writer`): closed on the server with the last writer.
    retired: Vec<(u64, u64)>,
    /// While writes are pending: the size those writes imply (attributes are patched with
    /// it so the kernel never sees the file shrink under its own writes).
    local_size: Option<u64>,
    /// Writes queued for the server. This and the next two are made on first use: a
    /// listing of 10,000 names creates 10,000 of these states, most never opened.
    writes: Option<Arc<files::WriteTracker>>,
    /// Serializes writable opens and server handle opens of this inode.
    fetch: Option<Arc<tokio::sync::Mutex<()>>>,
    /// Block ranges being fetched into the cache (readahead and misses).
    fetching: Option<Arc<files::Fetching>>,
    /// Serializes the closes and fsyncs of writers beside passthrough readers that may
    /// have stored through maps (`Core::commit_with_mapped_stores`).
    map_sends: Option<Arc<tokio::sync::Mutex<()>>>,
    /// The server's hint whether the file has extended attributes (`XATTRS_*`).
    xattrs: u8,
    /// The last attributes received were marked `Attr::uncovered` (kept when they are
    /// dropped): changes to the inode, and for a directory to its names, may go
    /// unreported, so nothing of it is answered without the server (its version, its
    /// names, its xattrs hint).
    uncovered: bool,
    /// The server's attributes as last received (kernel inode number) and when: a
    /// `GETATTR` is answered from them while the event stream vouches that nothing
    /// changed since (an event that changes them replaces or drops them).
    attr: Option<(Attr, Instant)>,
    /// For a directory this client created: every name in it, as long as every change
    /// in it was this client's own. A lookup of any other name is ENOENT without a round
    /// trip (the kernel looks up each name before creating it). Boxed, like `behind`:
    /// a listing of 100,000 names creates 100,000 states that never use it.
    names: Option<Box<KnownNames>>,
    /// For a directory with listing streams open: the names changed since the oldest
    /// was opened (see `Core::fill_listing`). Boxed, and dropped with the last stream.
    listing: Option<Box<ListingChanges>>,
    /// ctime of the newest attributes seen for the inode. Replies and events can arrive
    /// out of order (an event stat'ed before a change delivered after its reply): older
    /// attributes never replace newer ones, nor does their version.
    seen_ctime: Option<ferry_common::proto::Timespec>,
    /// Attributes this client answered for changes queued behind its uncommitted
    /// writes (see `Core::attrs_behind`): the base for the next such change, until the
    /// commit brings the server's.
    behind: Option<Box<Attr>>,
}

/// Changes to a directory while listing streams of it are open. Each change gets the
/// next count; a stream remembers the count it was opened at, and an entry whose name
/// changed after that is not vouched for by the stream.
#[derive(Debug, Default)]
struct ListingChanges {
    /// Streams of the directory open now.
    streams: u32,
    count: u64,
    /// Names changed and the count each change got, up to `LISTING_NAMES_MAX`.
    names: Vec<(u64, Box<[u8]>)>,
    /// Every name counts as changed from this count on (too many names, a resync).
    all: Option<u64>,
}

/// Counts of listing changes, for all directories: one never repeats, even across a
/// directory's `ListingChanges` dropped and made again.
static LISTING_CLOCK: AtomicU64 = AtomicU64::new(0);

impl ListingChanges {
    /// Called with the inode table's lock held, as are the reads of the clock.
    fn note(&mut self, name: Option<&[u8]>) {
        self.count = LISTING_CLOCK.fetch_add(1, Ordering::SeqCst) + 1;
        // A name changing again (a log being appended) keeps its one place.
        if let Some(n) = name
            && let Some(seen) = self.names.iter_mut().find(|(_, m)| **m == *n)
        {
            seen.0 = self.count;
            return;
        }
        match name {
            Some(n) if self.names.len() < LISTING_NAMES_MAX => {
                self.names.push((self.count, n.into()));
            }
            // The newest such change: a stream opened after an older one must still
            // see this one.
            _ => self.all = Some(self.count),
        }
    }

    /// What changed after count `since`.
    fn since(&self, since: u64) -> ListingChanged {
        if self.count <= since {
            ListingChanged::Nothing
        } else if self.all.is_some_and(|c| c > since) {
            ListingChanged::All
        } else {
            ListingChanged::Names(
                self.names
                    .iter()
                    .filter(|(c, _)| *c > since)
                    .map(|(_, n)| n.clone())
                    .collect(),
            )
        }
    }
}

/// Changed names a directory remembers while it is listed; past these, every name
/// counts as changed.
const LISTING_NAMES_MAX: usize = 256;

/// What changed in a directory since a listing stream was opened.
pub(super) enum ListingChanged {
    Nothing,
    Names(HashSet<Box<[u8]>>),
    All,
}

impl ListingChanged {
    pub(super) fn vouches(&self, name: &[u8]) -> bool {
        match self {
            ListingChanged::Nothing => true,
            ListingChanged::Names(names) => !names.contains(name),
            ListingChanged::All => false,
        }
    }
}

impl InodeState {
    /// Whether `attr` is at least as recent as anything seen for this inode.
    fn is_current(&self, attr: &Attr) -> bool {
        self.seen_ctime
            .is_none_or(|c| (attr.ctime.sec, attr.ctime.nsec) >= (c.sec, c.nsec))
    }

    /// What this client knows ahead of the server: the size its pending writes imply,
    /// and changes answered ahead of it (queued behind uncommitted writes).
    fn patch(&self, attr: &mut Attr) {
        if let Some(size) = self.local_size {
            attr.size = size;
        }
        if let Some(b) = self.behind.as_deref().copied() {
            attr.perm = b.perm;
            attr.atime = b.atime;
            attr.mtime = b.mtime;
        }
    }

    /// [`InodeState::take_if_current`] for an event's attributes, which never clear
    /// `uncovered`: an event can come from a watch the server no longer has (its
    /// directory moved away or past the watch limit), or name a file that also has a
    /// name no watch reports.
    fn take_event_attr(&mut self, attr: &Attr) -> bool {
        let mut attr = *attr;
        attr.uncovered |= self.uncovered;
        self.take_if_current(&attr)
    }

    /// Take `attr` as the inode's newest attributes if it is; returns whether it was.
    fn take_if_current(&mut self, attr: &Attr) -> bool {
        // (Uncovered even when older: the server could not watch it at some point.)
        if attr.uncovered {
            self.uncovered = true;
        }
        if !self.is_current(attr) {
            return false;
        }
        self.uncovered = attr.uncovered;
        self.seen_ctime = Some(attr.ctime);
        self.attr = Some((*attr, Instant::now()));
        true
    }
}

/// Small files of one directory being fetched (`ReadSmall`): the server inodes asked
/// for, and a flag set once they are in the data cache (or the fetch failed).
type SiblingFetch = (
    std::collections::HashSet<u64>,
    tokio::sync::watch::Receiver<bool>,
);

/// Counters shown by `ferry stats`.
#[derive(Debug, Default)]
pub struct Stats {
    pub opens_without_round_trip: AtomicU64,
    pub getattrs_without_round_trip: AtomicU64,
    pub lookups_without_round_trip: AtomicU64,
    pub listings_from_cache: AtomicU64,
    pub listings_prefetched: AtomicU64,
    /// Prefetches the server refused (its watches kept for directories clients look
    /// into: see `Request::ListDir::speculative`).
    pub prefetches_refused: AtomicU64,
    pub bytes_read_from_server: AtomicU64,
    pub bytes_served_from_cache: AtomicU64,
    /// Reads sent by the FUSE session thread, to be answered by the connection's reader
    /// (`Core::read_at_once`); counted when sent (one lost with its connection is read
    /// again by the full path, and counted there too, in `requests.read`).
    pub reads_at_once: AtomicU64,
    /// Readdirplus entries handed to the kernel for that reply only (not vouched for:
    /// changed since the stream opened), and ones handed with the short TTL (events
    /// not live, or not covered by a watch): the kernel looks each up again when used.
    pub entries_unvouched: AtomicU64,
    pub entries_short_ttl: AtomicU64,
    /// Bytes `copy_file_range` had the server copy (never sent over the network).
    pub bytes_copied_on_server: AtomicU64,
    /// Small files fetched whole with their directory's siblings (`ReadSmall`).
    pub files_prefetched: AtomicU64,
    /// Opens served by FUSE passthrough from the data cache (see `crate::passthrough`).
    pub passthrough_opens: AtomicU64,
    /// Opens for writing beside passthrough readers (direct I/O through this daemon).
    pub passthrough_writers: AtomicU64,
    /// Times a writer's shared maps had stored into a passthrough file's cached copy,
    /// which was then sent through the writer.
    pub mapped_stores_sent: AtomicU64,
    /// Readers' server handles opened again after a reconnect.
    pub handles_reopened: AtomicU64,
    /// Files whose uncommitted changes were sent again after a reconnect
    /// (`Core::replay`).
    pub uploads_replayed: AtomicU64,
    /// Operations run again because their connection was closed or reset under them
    /// (`Core::once_more`).
    pub retried: AtomicU64,
    pub invalidations: AtomicU64,
    pub resyncs: AtomicU64,
    /// Unlinks answered before the server confirmed them (see `fs/unlinks.rs`), and
    /// those of them the server then refused.
    pub unlinks_behind: AtomicU64,
    pub unlinks_behind_failed: AtomicU64,
    /// Directories renamed on the server that the kernel holds, moved in the inode
    /// table to where the server said they went (`Request::Locate`).
    pub dirs_located: AtomicU64,
}

pub struct Core {
    pub client: Arc<Client>,
    // std Mutexes: each is held for a map operation only, never across an await.
    nodes: Mutex<Nodes>,
    inodes: Mutex<FxHashMap<u64, InodeState>>,
    files: Mutex<HashMap<u64, Arc<files::OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<dirs::DirStream>>>>,
    /// Listings by directory inode, valid while the event stream is.
    dir_cache: Mutex<listings::Listings>,
    next_fh: AtomicU64,
    /// Largest read/write payload per request, from the handshake.
    pub max_io: u32,
    pub cache: Option<Arc<DataCache>>,
    /// Spool files for uncommitted writes past what memory keeps, in the cache's
    /// directory and within its size (`ferry mount --spool-writes`; none without a
    /// cache).
    spools: OnceLock<Arc<spool::Spools>>,
    invalidator: OnceLock<std::sync::mpsc::Sender<Invalidation>>,
    attrs_invalidator: OnceLock<events::AttrInvalidator>,
    /// A write-back of the cache metadata is scheduled.
    persist_due: Arc<std::sync::atomic::AtomicBool>,
    /// Bounds the listings prefetched at once.
    prefetching: tokio::sync::Semaphore,
    /// Directories whose listings are being prefetched (each is fetched once).
    prefetches: Mutex<std::collections::HashSet<u64>>,
    /// Small files being fetched by directory (`ReadSmall`): directory → the server
    /// inodes asked for, and a flag set when they are in the data cache (or failed).
    siblings: Mutex<HashMap<u64, SiblingFetch>>,
    /// Directories whose small files were fetched together, for [`Core::look_ahead`].
    looked_ahead: Mutex<dirs::LookAhead>,
    /// Pinned entries being fetched again (by inode), and whether another change came
    /// meanwhile (the fetch then runs once more): one refresh per file at a time.
    refreshing: Mutex<HashMap<u64, bool>>,
    /// Unlinks answered before the server confirmed them.
    unlinks: unlinks::Behind,
    /// Directories whose new place is asked of the server (`Core::locate_later`).
    locating: Mutex<events::Locating>,
    /// The runtime, for work started from threads outside it (barrier acks).
    runtime: OnceLock<tokio::runtime::Handle>,
    /// This core, for work it starts in the background on its own.
    me: std::sync::Weak<Core>,
    pub stats: Stats,
}

/// A rename of this client's under way, for the inode table (`Nodes::rename_sent`);
/// over when dropped, replied or not.
struct Renaming<'a>(&'a Core, u64);

impl<'a> Renaming<'a> {
    fn start(core: &'a Core, from: (u64, &[u8]), to: (u64, &[u8])) -> FsResult<Renaming<'a>> {
        let token = core.nodes()?.rename_sent(from, to);
        Ok(Renaming(core, token))
    }
}

impl Drop for Renaming<'_> {
    fn drop(&mut self) {
        if let Ok(mut n) = self.0.nodes.lock() {
            n.rename_done(self.1);
        }
    }
}

fn errno<T>(e: i32) -> FsResult<T> {
    Err(FsError::Errno(e))
}

fn name_of(name: &[u8]) -> FsResult<Name> {
    Name::new(name.to_vec()).map_err(|e| FsError::Errno(e.errno()))
}

fn poisoned() -> FsError {
    FsError::Errno(libc::EIO)
}

impl Core {
    pub fn new(
        client: Arc<Client>,
        root: &Attr,
        max_io: u32,
        cache: Option<Arc<DataCache>>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Core {
            me: me.clone(),
            client,
            nodes: Mutex::new(Nodes::new(root.ino)),
            inodes: Mutex::new(FxHashMap::default()),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            dir_cache: Mutex::new(listings::Listings::default()),
            next_fh: AtomicU64::new(1),
            max_io: max_io.clamp(64 * 1024, MAX_IO),
            spools: OnceLock::new(),
            cache,
            invalidator: OnceLock::new(),
            attrs_invalidator: OnceLock::new(),
            persist_due: Arc::default(),
            prefetching: tokio::sync::Semaphore::new(dirs::PREFETCH_PARALLEL),
            prefetches: Mutex::new(std::collections::HashSet::new()),
            siblings: Mutex::new(HashMap::new()),
            looked_ahead: Mutex::default(),
            refreshing: Mutex::new(HashMap::new()),
            unlinks: unlinks::Behind::default(),
            locating: Mutex::default(),
            runtime: OnceLock::new(),
            stats: Stats::default(),
        })
    }

    /// Keep uncommitted writes past what memory holds in spool files in the cache's
    /// directory (up to its size), so they can be sent again after a reconnect. It
    /// costs every byte written past 8 MiB before a commit a copy into a local file.
    pub fn spool_writes(&self) {
        if let Some(c) = &self.cache {
            let _ = self
                .spools
                .set(spool::Spools::new(c.dir().to_path_buf(), c.cap()));
        }
    }

    pub fn set_runtime(&self, rt: tokio::runtime::Handle) {
        let _ = self.runtime.set(rt);
    }

    /// How long the kernel may cache entries and attributes right now.
    pub fn ttl(&self) -> Duration {
        if self.client.events_live() {
            TTL_WITH_EVENTS
        } else {
            TTL_WITHOUT_EVENTS
        }
    }

    fn nodes(&self) -> FsResult<MutexGuard<'_, Nodes>> {
        self.nodes.lock().map_err(|_| poisoned())
    }

    fn inodes(&self) -> FsResult<MutexGuard<'_, FxHashMap<u64, InodeState>>> {
        self.inodes.lock().map_err(|_| poisoned())
    }

    /// Every attribute handed to the kernel passes here: the server inode number becomes
    /// the kernel's, the version is remembered, and a size implied by pending writes wins.
    pub fn note_attr(&self, attr: Attr) -> Attr {
        let mut one = [attr];
        self.note_attrs(&mut one);
        one[0]
    }

    /// [`Core::note_attr`] for several attributes, taking each lock once (a listing's
    /// reply hands the kernel thousands).
    pub fn note_attrs(&self, attrs: &mut [Attr]) {
        self.to_kernel_attrs(attrs, true);
    }

    /// The attributes the kernel gets for `attrs` (its inode numbers, a newer state
    /// already seen, the size pending writes imply); with `record`, they are also taken
    /// as the inodes' newest ([`Core::note_attr`]).
    fn to_kernel_attrs(&self, attrs: &mut [Attr], record: bool) {
        if let Ok(n) = self.nodes.lock() {
            for attr in attrs.iter_mut() {
                attr.ino = n.to_kernel(attr.ino);
            }
        }
        let Ok(mut inodes) = self.inodes.lock() else {
            return;
        };
        for attr in attrs.iter_mut() {
            if !record {
                if let Some(st) = inodes.get(&attr.ino) {
                    if !st.is_current(attr)
                        && let Some((newer, _)) = st.attr
                    {
                        *attr = newer;
                    }
                    st.patch(attr);
                }
                continue;
            }
            let st = inodes.entry(attr.ino).or_default();
            if attr.xattrs != XATTRS_UNKNOWN {
                st.xattrs = attr.xattrs;
            } else if st.version != attr.version {
                // Changed in some way we cannot see: xattrs may have changed too.
                st.xattrs = XATTRS_UNKNOWN;
            }
            if st.take_if_current(attr) {
                st.version = attr.version;
            } else if let Some((newer, _)) = st.attr {
                // A reply overtaken by a newer event: the kernel gets the newer state.
                *attr = newer;
            }
            st.patch(attr);
        }
    }

    /// Attributes from a reply the kernel does not get yet (a changed directory's): kept
    /// for the `GETATTR` that follows.
    fn remember_attr(&self, mut attr: Attr) {
        if let Ok(n) = self.nodes.lock() {
            attr.ino = n.to_kernel(attr.ino);
        }
        if let Ok(mut inodes) = self.inodes.lock() {
            inodes.entry(attr.ino).or_default().take_if_current(&attr);
        }
    }

    /// Attributes of `ino` known current without asking the server: received since the
    /// last change the server reported, while the event stream is healthy, within the
    /// kernel's own TTL, and with no writes of ours pending.
    fn known_attr(&self, ino: u64) -> Option<Attr> {
        if !self.client.events_live() {
            return None;
        }
        let mut inodes = self.inodes.lock().ok()?;
        let st = inodes.get_mut(&ino)?;
        if st.writers > 0 || st.local_size.is_some() {
            return None;
        }
        let (attr, when) = st.attr?;
        let ttl = match listings::events_vouch_for(&attr) {
            true => TTL_WITH_EVENTS,
            false => TTL_WITHOUT_EVENTS,
        };
        if when.elapsed() >= ttl || attr.uncovered || st.uncovered {
            // (Uncovered: a directory whose own changes nothing reports.)
            st.attr = None;
            return None;
        }
        st.version = attr.version;
        if attr.xattrs != XATTRS_UNKNOWN {
            st.xattrs = attr.xattrs;
        }
        Some(attr)
    }

    /// Whether what the server last said of `ino` was marked uncovered (see
    /// `InodeState::uncovered`).
    fn uncovered(&self, ino: u64) -> bool {
        self.inodes
            .lock()
            .is_ok_and(|i| i.get(&ino).is_some_and(|s| s.uncovered))
    }

    /// A reply showed `ino` uncovered (or not) without its attributes being taken:
    /// only the former is noted (the latter waits for attributes that are current).
    fn note_coverage(&self, ino: u64, uncovered: bool) {
        if uncovered && let Ok(mut inodes) = self.inodes.lock() {
            inodes.entry(ino).or_default().uncovered = true;
        }
    }

    /// The attributes this client last had of `ino`, however old.
    fn last_attr(&self, ino: u64) -> Option<Attr> {
        Some(self.inodes.lock().ok()?.get(&ino)?.attr?.0)
    }

    /// Forget what we know of `ino`'s attributes (the next `GETATTR` asks the server).
    fn forget_attr(&self, ino: u64) {
        if let Ok(mut inodes) = self.inodes.lock()
            && let Some(st) = inodes.get_mut(&ino)
        {
            st.attr = None;
        }
    }

    /// Forget that this client knows every name in `dir`.
    fn forget_names(&self, dir: u64) {
        if let Ok(mut inodes) = self.inodes.lock()
            && let Some(st) = inodes.get_mut(&dir)
        {
            st.names = None;
        }
    }

    /// Whether `dir` is known not to hold `name` (no need to ask the server).
    fn knows_absent(&self, dir: u64, name: &[u8]) -> bool {
        self.client.events_live()
            && self.inodes.lock().is_ok_and(|i| {
                i.get(&dir).is_some_and(|s| {
                    !s.uncovered
                        && s.names.as_ref().is_some_and(|n| {
                            n.since.elapsed() < TTL_WITH_EVENTS && !n.names.contains(name)
                        })
                })
            })
    }

    /// This client added (`true`) or removed `name` in `dir`.
    fn names_changed(&self, dir: u64, name: &[u8], added: bool) {
        if let Ok(mut inodes) = self.inodes.lock()
            && let Some(known) = inodes.get_mut(&dir).and_then(|s| s.names.as_mut())
        {
            let names = &mut known.names;
            if added {
                names.insert(name.to_vec());
            } else {
                names.remove(name);
            }
        }
    }

    /// Like [`Core::note_attr`] for attributes the kernel does not receive (open and
    /// commit replies): if they show a change, the kernel's cached attributes are
    /// dropped, since the event announcing that change will look like one it has seen.
    fn note_attr_unseen(&self, attr: Attr) -> Attr {
        let kernel_ino = self
            .nodes
            .lock()
            .map(|n| n.to_kernel(attr.ino))
            .unwrap_or(attr.ino);
        let before = self
            .inodes
            .lock()
            .ok()
            .and_then(|i| i.get(&kernel_ino).map(|s| s.version));
        let attr = self.note_attr(attr);
        if before.is_some_and(|v| v != attr.version) {
            // On this thread: a commit of every file `tar` writes would otherwise cost a
            // wake-up of the invalidation thread each.
            self.invalidate_attrs_now(attr.ino);
        }
        attr
    }

    /// Whether this client has the file of server inode `sino` open for writing or
    /// writes to it pending.
    fn writing(&self, sino: u64) -> bool {
        let ino = self.nodes.lock().map(|n| n.to_kernel(sino)).unwrap_or(sino);
        self.inodes.lock().map_or(true, |inodes| {
            inodes
                .get(&ino)
                .is_some_and(|st| st.writers > 0 || st.local_size.is_some())
        })
    }

    /// The inode this client knows under `parent/name`, if any.
    pub fn child_of(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.nodes.lock().ok()?.child(parent, name)
    }

    pub fn path(&self, ino: u64) -> FsResult<RelPath> {
        self.nodes()?.path(ino)
    }

    fn child(&self, parent: u64, name: &[u8]) -> FsResult<(RelPath, Name)> {
        let name = name_of(name)?;
        Ok((self.path(parent)?, name))
    }

    async fn rpc(&self, caller: Caller, req: Request) -> FsResult<Response> {
        match self.client.call(caller, req).await? {
            Ok(r) => Ok(self.unwrap_reply(r)),
            Err(e) => errno(e),
        }
    }

    /// Run `op`, and once more if the connection broke under it (closed or reset by the
    /// other end; a server gone silent has had its `--timeout` already). Only for
    /// operations that change nothing on the server, so a second run is harmless: the
    /// second run reconnects, waiting for a restarting server (`Client::current`), and
    /// a reader's handle is opened again on the new connection (`ensure_handle`). A
    /// server restart then costs a `stat`, `open` or `read` in flight a short wait, not
    /// an `EIO`.
    async fn once_more<T, F>(&self, op: impl Fn() -> F) -> FsResult<T>
    where
        F: Future<Output = FsResult<T>>,
    {
        match op().await {
            Err(FsError::Transport(e)) if e.dropped() => {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("connection lost under a request; sending it again");
                op().await
            }
            r => r,
        }
    }

    /// A change of names (mkdir, mknod, symlink, link, unlink, rmdir, rename) that runs
    /// at most once: if its connection breaks under it (closed, reset, or silent past
    /// `--timeout`), it is sent again with the same key on a new connection, and a
    /// server that ran it answers with its first answer instead of running it again
    /// (`OnceKey`). One that could not even be queued goes once more as a first send.
    /// `Ok(None)`: the server does not remember it (it restarted meanwhile, say), so
    /// whether it ran is unknown.
    async fn rpc_once(&self, caller: Caller, req: Request) -> FsResult<Option<Response>> {
        Ok(self.rpc_once_told(caller, req).await?.0)
    }

    /// [`Core::rpc_once`], also telling whether the answer came to a repeat (the first
    /// send's connection broke): then it may be old (a server that restarted since
    /// told what it found, not what it did).
    async fn rpc_once_told(
        &self,
        caller: Caller,
        req: Request,
    ) -> FsResult<(Option<Response>, bool)> {
        let key = self.client.once_key();
        let sent = match self
            .client
            .start_keyed(None, caller, req.clone(), key)
            .await
        {
            Err(e) if e.may_have_run() => {
                self.client
                    .start_keyed(None, caller, req.clone(), key)
                    .await
            }
            sent => sent,
        };
        let sent = sent?;
        let instance = sent.instance();
        let (answer, repeated) = match sent.reply().await {
            Err(e) if e.may_have_run() => {
                (self.repeat_keyed(caller, req, key, instance).await?, true)
            }
            r => (r?, false),
        };
        match answer {
            Ok(Response::NotRemembered) => Ok((None, repeated)),
            Ok(r) => Ok((Some(self.unwrap_reply(r)), repeated)),
            Err(e) => errno(e),
        }
    }

    /// Run `repeat` (sending a keyed change again, `Client::repeat_keyed`), and again
    /// each time the connection breaks under it too (a link that keeps dropping), at
    /// most [`MAX_REPEATS`] times: the server runs the change at most once however
    /// often it comes.
    pub(super) async fn repeating<T, F>(
        &self,
        mut repeat: impl FnMut() -> F,
    ) -> Result<T, TransportError>
    where
        F: Future<Output = Result<T, TransportError>>,
    {
        let mut repeats = 0;
        loop {
            repeats += 1;
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                repeats,
                "connection lost under a change; sending it again with its key"
            );
            match repeat().await {
                Err(e) if e.may_have_run() && repeats < MAX_REPEATS => {}
                r => return r,
            }
        }
    }

    /// [`Core::repeating`] of a keyed change on whichever connection is live.
    pub(super) async fn repeat_keyed(
        &self,
        caller: Caller,
        req: Request,
        key: OnceKey,
        instance: u64,
    ) -> Result<Result<Response, i32>, TransportError> {
        self.repeating(|| {
            self.client
                .repeat_keyed(None, caller, req.clone(), key, instance)
        })
        .await
    }

    /// A removal or rename (see [`Core::rpc_once`]) that the server does not remember
    /// is done if the server's names show it (`shown`): `gone` is free in its
    /// directory (still the one it was) and, for a rename, the new name holds the file
    /// the old one held (it ran, or someone did the same: either way it is done, and
    /// nothing runs twice). Else, and with no `shown` (an exchange, a file this client
    /// did not know), `EIO`: it may or may not have run.
    async fn rpc_once_or_shown(
        &self,
        caller: Caller,
        req: Request,
        shown: Option<Shown<'_>>,
    ) -> FsResult<()> {
        if self.rpc_once(caller, req).await?.is_some() {
            return Ok(());
        }
        let Some(shown) = shown else {
            return errno(libc::EIO);
        };
        match self.names_show(caller, &shown).await {
            Ok(()) => {
                tracing::debug!("a change the server does not remember shows done in its names");
                Ok(())
            }
            Err(why) => {
                tracing::debug!("a change the server does not remember: {why}");
                errno(libc::EIO)
            }
        }
    }

    /// Whether the server's names are as `shown` says; if not, why not. Any doubt (a
    /// lookup that fails otherwise, a directory that is another now) is a no.
    pub(super) async fn names_show(
        &self,
        caller: Caller,
        shown: &Shown<'_>,
    ) -> Result<(), &'static str> {
        let ask = |req: Request| self.once_more(move || self.rpc(caller, req.clone()));
        // The directories are the ones the names were in (a directory renamed away
        // while the server was down leaves a free name behind that proves nothing).
        let mut dirs = vec![shown.gone.0];
        dirs.extend(shown.holds.as_ref().map(|h| h.dir));
        for dir in dirs {
            let path = self.path(dir).map_err(|_| "a directory with no path")?;
            match ask(Request::GetAttr { path, handle: None }).await {
                Ok(Response::Attr(a)) if a.ino == self.server_ino(dir) => {}
                _ => return Err("its directory is not the one it was"),
            }
        }
        let lookup = |dir: u64, name: &[u8]| {
            self.child(dir, name)
                .map(|(parent, name)| Request::Lookup { parent, name })
                .map_err(|_| "a name with no path")
        };
        match ask(lookup(shown.gone.0, shown.gone.1)?).await {
            Err(FsError::Errno(libc::ENOENT)) => {}
            Ok(_) => return Err("the name is still there: it may never have run"),
            Err(_) => return Err("the name cannot be looked up"),
        }
        let Some(holds) = &shown.holds else {
            return Ok(());
        };
        // The same inode number, and (a number can be reused) what a rename leaves as
        // it was: type, size, mtime.
        match ask(lookup(holds.dir, holds.name)?).await {
            Ok(Response::Attr(a))
                if a.ino == holds.ino
                    && holds
                        .was
                        .is_none_or(|w| (w.kind, w.size, w.mtime) == (a.kind, a.size, a.mtime)) =>
            {
                Ok(())
            }
            Ok(_) => Err("the new name holds another file"),
            Err(_) => Err("the new name cannot be looked up"),
        }
    }

    /// A request that makes `parent/name` (create, mkdir, mknod, symlink, link) lost its
    /// connection on the way: it may or may not have run. If the name is still absent
    /// on the server (looked up on a new connection), it did not, and `req` is sent
    /// again there; if it exists, `EIO` (an exclusive create cannot tell its own file
    /// from one made by someone else). Returns the reply and the connection it came on.
    async fn again_if_absent_on(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        req: Request,
    ) -> FsResult<(u64, Response)> {
        let (parent_path, n) = self.child(parent, name)?;
        let generation = self.client.connect().await?;
        let lookup = Request::Lookup {
            parent: parent_path,
            name: n,
        };
        match self.rpc_on(generation, caller, lookup).await {
            Err(FsError::Errno(libc::ENOENT)) => {}
            Ok(_) => return errno(libc::EIO),
            Err(e) => return Err(e),
        }
        self.stats.retried.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("connection lost under a create; the name is still free: sending it again");
        Ok((generation, self.rpc_on(generation, caller, req).await?))
    }

    async fn rpc_on(&self, generation: u64, caller: Caller, req: Request) -> FsResult<Response> {
        match self.client.call_on(Some(generation), caller, req).await? {
            Ok(r) => Ok(self.unwrap_reply(r)),
            Err(e) => errno(e),
        }
    }

    /// A reply with a changed directory's attributes: remember them (the kernel asks for
    /// them next), hand back the reply itself.
    fn unwrap_reply(&self, r: Response) -> Response {
        match r {
            Response::InDir { dir, reply } => {
                self.remember_attr(dir);
                self.unwrap_reply(*reply)
            }
            r => r,
        }
    }

    fn expect_attr(r: Response) -> FsResult<Attr> {
        match r {
            Response::Attr(a) => Ok(a),
            _ => Err(TransportError::Protocol.into()),
        }
    }

    /// Record that the kernel got an entry for `parent/name` and return kernel attrs.
    fn entry(&self, parent: u64, name: &[u8], attr: Attr) -> FsResult<Attr> {
        let attr = self.note_attr(attr);
        self.nodes()?
            .remember(parent, name, attr.ino, attr.kind == FileKind::Dir);
        Ok(attr)
    }

    /// Run a request that creates `parent/name` and hand the new entry to the kernel.
    async fn new_entry(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        req: Request,
    ) -> FsResult<Attr> {
        let is_dir = matches!(req, Request::MkDir { .. });
        let again = req.clone();
        let (reply, repeated) = match self.rpc_once_told(caller, req).await {
            Ok((Some(r), repeated)) => (Ok(r), repeated),
            // Not remembered: made by the change itself before a restart, or by someone
            // else? Only a free name tells.
            Ok((None, _)) => (
                (self.again_if_absent_on(caller, parent, name, again).await).map(|(_, r)| r),
                false,
            ),
            Err(e) => (Err(e), false),
        };
        let mut attr = Self::expect_attr(reply?)?;
        if is_dir && repeated {
            // The answer of a server since restarted, which watches nothing in it:
            // its attributes are trusted no longer than without events.
            attr.uncovered = true;
        }
        self.dir_changed(parent);
        self.names_changed(parent, name, true);
        let attr = self.entry(parent, name, attr)?;
        if is_dir && !repeated && !attr.uncovered {
            // Empty, and every change in it will be ours until an event says otherwise.
            // (Not from a repeat's answer: a server restarted since found it made, and
            // may have let others into it before it watched it. Nor from one that could
            // not watch it: no event would say otherwise.)
            let mut inodes = self.inodes()?;
            let st = inodes.entry(attr.ino).or_default();
            st.names = Some(Box::new(KnownNames {
                names: HashSet::new(),
                since: Instant::now(),
            }));
        }
        Ok(attr)
    }

    /// A change this client made in directory `dir`: its cached listing is stale.
    fn dir_changed(&self, dir: u64) {
        dirs::DIR_EPOCH.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut c) = self.dir_cache.lock() {
            c.remove(dir);
        }
    }

    /// A listing stream of `dir` opens: the count to compare later changes with.
    pub(super) fn listing_opened(&self, dir: u64) -> u64 {
        let Ok(mut inodes) = self.inodes.lock() else {
            return 0;
        };
        let changes = inodes
            .entry(dir)
            .or_default()
            .listing
            .get_or_insert_default();
        changes.streams += 1;
        LISTING_CLOCK.load(Ordering::SeqCst)
    }

    /// A listing stream of `dir` is done.
    pub(super) fn listing_closed(&self, dir: u64) {
        if let Ok(mut inodes) = self.inodes.lock()
            && let Some(st) = inodes.get_mut(&dir)
            && let Some(changes) = st.listing.as_mut()
        {
            changes.streams = changes.streams.saturating_sub(1);
            if changes.streams == 0 {
                st.listing = None;
            }
        }
    }

    /// `name` in `dir` changed (created, removed, renamed, rewritten; `None`: maybe
    /// any): streams of `dir` opened before do not vouch for it any more.
    pub(super) fn listing_changed(&self, dir: u64, name: Option<&[u8]>) {
        if let Ok(mut inodes) = self.inodes.lock()
            && let Some(changes) = inodes.get_mut(&dir).and_then(|st| st.listing.as_mut())
        {
            changes.note(name);
        }
    }

    /// What changed in `dir` after count `since` (see [`Core::listing_opened`]).
    pub(super) fn listing_changed_since(&self, dir: u64, since: u64) -> ListingChanged {
        let Ok(inodes) = self.inodes.lock() else {
            return ListingChanged::All;
        };
        let Some(changes) = inodes.get(&dir).and_then(|st| st.listing.as_ref()) else {
            // No stream open: nothing to compare with (the caller's stream is open).
            return ListingChanged::All;
        };
        changes.since(since)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.forget(ino, n);
            if nodes.path(ino).is_err()
                && let Ok(mut c) = self.dir_cache.lock()
            {
                // The kernel holds it no more: its listing goes with it.
                c.remove(ino);
            }
            if nodes.path(ino).is_err()
                && ino != ROOT
                && let Ok(mut inodes) = self.inodes.lock()
                && inodes
                    .get(&ino)
                    .is_some_and(|s| s.writers == 0 && s.local_size.is_none())
            {
                inodes.remove(&ino);
                crate::nodes::shrink_if_sparse(&mut inodes);
            }
        }
    }

    /// A lookup answerable without the server, for the FUSE thread: a name known absent,
    /// or one whose inode and attributes are known and vouched for by events (the kernel
    /// looks up again whenever its entry timed out, in the middle of a long `rm -rf`).
    pub fn lookup_now(&self, parent: u64, name: &[u8]) -> Option<FsResult<Attr>> {
        if self.knows_absent(parent, name) {
            self.stats
                .lookups_without_round_trip
                .fetch_add(1, Ordering::Relaxed);
            return Some(errno(libc::ENOENT));
        }
        let ino = {
            let nodes = self.nodes.lock().ok()?;
            if nodes.is_unverified(parent, name) {
                return None;
            }
            nodes.child(parent, name)
        };
        // (A name in a directory the server does not watch may have changed unreported.)
        if self.uncovered(parent) {
            return None;
        }
        let Some(ino) = ino else {
            return self.lookup_listed(parent, name);
        };
        let attr = self.known_attr(ino)?;
        // The reply gives the kernel one more reference, as any lookup does.
        self.nodes
            .lock()
            .ok()?
            .remember(parent, name, attr.ino, attr.kind == FileKind::Dir);
        self.stats
            .lookups_without_round_trip
            .fetch_add(1, Ordering::Relaxed);
        Some(Ok(attr))
    }

    /// A name the kernel had from a kept listing and forgot since (memory pressure
    /// evicts dentries; the directory stays, and its cached pages list the name): a
    /// `stat` of it is answered from the listing, as readdirplus would have, instead of
    /// one round trip per name. Not for entries the server could not watch, nor while
    /// events are down (no listing is kept then). An event about the name drops the
    /// listing first; one that comes after it was read here invalidates the kernel's
    /// entry, which waits for this lookup to finish (the kernel holds the directory's
    /// lock while it looks up), so a stale answer does not stay.
    fn lookup_listed(&self, parent: u64, name: &[u8]) -> Option<FsResult<Attr>> {
        if !self.client.events_live() {
            return None;
        }
        let attr = self.dir_cache.lock().ok()?.find(parent, name)?;
        if attr.uncovered {
            return None;
        }
        let r = self.entry(parent, name, attr);
        self.stats
            .lookups_without_round_trip
            .fetch_add(1, Ordering::Relaxed);
        Some(r)
    }

    /// Attributes answerable without the server, for the FUSE thread.
    pub fn getattr_now(&self, ino: u64) -> Option<Attr> {
        let attr = self.known_attr(ino)?;
        self.stats
            .getattrs_without_round_trip
            .fetch_add(1, Ordering::Relaxed);
        Some(attr)
    }

    pub async fn lookup(&self, caller: Caller, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let (parent_path, n) = self.child(parent, name)?;
        if self.knows_absent(parent, name) {
            self.stats
                .lookups_without_round_trip
                .fetch_add(1, Ordering::Relaxed);
            return errno(libc::ENOENT);
        }
        let checked = self.client.checks_lookups();
        let parent_node = self.server_ino(parent);
        let attr = self
            .once_more(|| {
                let req = match checked {
                    true => Request::LookupIn {
                        parent: parent_path.clone(),
                        parent_node,
                        name: n.clone(),
                    },
                    false => Request::Lookup {
                        parent: parent_path.clone(),
                        name: n.clone(),
                    },
                };
                async move { Self::expect_attr(self.rpc(caller, req).await?) }
            })
            .await;
        if checked && matches!(attr, Err(FsError::Errno(libc::ESTALE))) {
            // The path leads to another directory now (renamed on the server, and its
            // event not here yet): what it holds is not this one's.
            self.path_went_stale(parent);
        }
        self.entry(parent, name, attr?)
    }

    pub async fn getattr(&self, caller: Caller, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        if let Some(attr) = self.known_attr(ino) {
            self.stats
                .getattrs_without_round_trip
                .fetch_add(1, Ordering::Relaxed);
            return Ok(attr);
        }
        // An open file's handle answers for it, unless it is a reader's from a lost
        // connection: then its path does.
        let open = fh
            .and_then(|fh| self.open_file(fh).ok())
            .filter(|f| self.usable_handle(f).is_some());
        let path = self.path(ino);
        let open = match (&path, open) {
            (_, Some(o)) => Some(o),
            (Err(_), None) => self.any_handle(ino),
            (Ok(_), None) => None,
        };
        let by_handle = match open.as_ref().and_then(|o| o.handle().map(|h| (o, h))) {
            Some((o, (handle, generation))) => {
                let req = Request::GetAttr {
                    path: RelPath::root(),
                    handle: Some(handle),
                };
                match self.rpc_on(generation, caller, req).await {
                    // A reader's connection broke under it: its path answers.
                    Err(FsError::Transport(e)) if e.dropped() && !o.writable && path.is_ok() => {
                        None
                    }
                    r => Some(Self::expect_attr(r?)?),
                }
            }
            None => None,
        };
        let attr = match by_handle {
            Some(attr) => attr,
            None => {
                let path = path?;
                self.once_more(|| {
                    let req = Request::GetAttr {
                        path: path.clone(),
                        handle: None,
                    };
                    async move { Self::expect_attr(self.rpc(caller, req).await?) }
                })
                .await?
            }
        };
        let before = self.inodes()?.get(&ino).map(|s| {
            let quiet = s.writers == 0 && s.local_size.is_none();
            (s.version, quiet)
        });
        let attr = self.note_attr(attr);
        if attr.ino != ino {
            // The name now refers to another file (replaced behind our back).
            return errno(libc::ESTALE);
        }
        // Someone else's change (none of this client's writes is pending), seen here
        // before any event told of it, or with no events at all: what is open of the
        // file reads the new content from now on, as that event would have made it
        // (arriving later with this version, it changes nothing).
        if let Some((known, true)) = before
            && known != 0
            && known != attr.version
            && attr.kind == FileKind::File
        {
            let current = match self.inodes()?.get_mut(&ino) {
                Some(st) if st.version == attr.version => {
                    st.kernel_version = None;
                    true
                }
                _ => false, // an event brought a newer version meanwhile
            };
            if current {
                self.changed_on_server(ino, &attr);
                self.invalidate(events::Invalidation::Inode { ino, data: true });
                // One that came while this was done wins (its own move may have run
                // before this one).
                let newer = self.inodes()?.get(&ino).and_then(|st| {
                    (st.version != attr.version)
                        .then_some(st.attr)
                        .flatten()
                        .map(|(a, _)| a)
                });
                if let Some(newer) = newer {
                    self.changed_on_server(ino, &newer);
                }
            }
        }
        Ok(attr)
    }

    pub async fn setattr(
        &self,
        caller: Caller,
        ino: u64,
        fh: Option<u64>,
        mut set: SetAttr,
    ) -> FsResult<Attr> {
        if let Some(attr) = self.attrs_behind(caller, ino, &set).await? {
            return Ok(attr);
        }
        // Pending writes land before the size or times change, as they would locally.
        self.drain_writes(ino).await?;
        let mut attr = None;
        if let Some(size) = set.size.take() {
            attr = Some(self.truncate(caller, ino, fh, size).await?);
        }
        if set != SetAttr::default() {
            let kept = set.clone();
            let writer = self.writer_pair(ino)?.map(|(_, g)| g);
            let open = fh.and_then(|fh| self.open_file(fh).ok());
            let handle = open.as_ref().and_then(|o| o.handle());
            let path = match self.path(ino) {
                Ok(p) => p,
                // Unlinked but open: the handle is all there is.
                Err(e) if handle.is_none() => return Err(e),
                Err(_) => RelPath::root(),
            };
            let a = match handle {
                Some((handle, generation)) => {
                    let req = Request::SetAttr {
                        path,
                        handle: Some(handle),
                        set,
                    };
                    Self::expect_attr(self.rpc_on(generation, caller, req).await?)?
                }
                None => Self::expect_attr(
                    self.rpc(
                        caller,
                        Request::SetAttr {
                            path,
                            handle: None,
                            set,
                        },
                    )
                    .await?,
                )?,
            };
            if let Some(parent) = self.nodes()?.parent_of(ino) {
                self.dir_changed(parent);
            }
            self.keep_attrs_for_replay(ino, &kept, writer);
            attr = Some(a);
        }
        match attr {
            Some(a) => Ok(self.note_attr(a)),
            None => self.getattr(caller, ino, fh).await,
        }
    }

    /// Kernel inode number back to the server's (the cache is keyed by the server's).
    fn server_ino(&self, ino: u64) -> u64 {
        self.nodes.lock().map(|n| n.to_kernel(ino)).unwrap_or(ino)
    }

    pub async fn readlink(&self, caller: Caller, ino: u64) -> FsResult<Vec<u8>> {
        let path = self.path(ino)?;
        let req = || self.rpc(caller, Request::ReadLink { path: path.clone() });
        match self.once_more(req).await? {
            Response::Data(d) => Ok(Vec::from(d)),
            _ => Err(TransportError::Protocol.into()),
        }
    }

    pub async fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<Attr> {
        let (p, n) = self.child(parent, name)?;
        let req = Request::MkNod {
            parent: p,
            name: n,
            mode,
            umask,
            rdev,
        };
        self.new_entry(caller, parent, name, req).await
    }

    pub async fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> FsResult<Attr> {
        let (p, n) = self.child(parent, name)?;
        let req = Request::MkDir {
            parent: p,
            name: n,
            mode,
            umask,
        };
        self.new_entry(caller, parent, name, req).await
    }

    pub async fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<Attr> {
        let (p, n) = self.child(parent, name)?;
        let req = Request::Symlink {
            parent: p,
            name: n,
            target: target.to_vec(),
        };
        self.new_entry(caller, parent, name, req).await
    }

    pub async fn link(
        &self,
        caller: Caller,
        ino: u64,
        new_parent: u64,
        new_name: &[u8],
    ) -> FsResult<Attr> {
        let path = self.path(ino)?;
        let (np, nn) = self.child(new_parent, new_name)?;
        let req = Request::Link {
            path,
            new_parent: np,
            new_name: nn,
        };
        let attr = self.new_entry(caller, new_parent, new_name, req).await?;
        self.link_count_changed(self.server_ino(attr.ino));
        Ok(attr)
    }

    pub async fn unlink(&self, caller: Caller, parent: u64, name: &[u8]) -> FsResult<()> {
        if let Some(done) = self.unlink_behind(caller, parent, name).await {
            return done;
        }
        let req = self.unlink_request(parent, name)?;
        let shared = self.other_names_of(parent, name);
        let shown = Shown {
            gone: (parent, name),
            holds: None,
        };
        self.rpc_once_or_shown(caller, req, Some(shown)).await?;
        if let Some(sino) = shared {
            self.link_count_changed(sino);
        }
        self.unlinked_here(parent, name)
    }

    pub async fn rmdir(&self, caller: Caller, parent: u64, name: &[u8]) -> FsResult<()> {
        let (p, n) = self.child(parent, name)?;
        let shown = Shown {
            gone: (parent, name),
            holds: None,
        };
        self.rpc_once_or_shown(caller, Request::RmDir { parent: p, name: n }, Some(shown))
            .await?;
        self.unlinked_here(parent, name)
    }

    pub async fn rename(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        let (p, n) = self.child(parent, name)?;
        let (np, nn) = self.child(new_parent, new_name)?;
        let req = Request::Rename {
            parent: p,
            name: n,
            new_parent: np,
            new_name: nn,
            flags,
        };
        let exchange = flags & ferry_common::proto::rename_flags::EXCHANGE != 0;
        // A file replaced by the rename loses a name.
        let replaced = if exchange {
            None
        } else {
            self.other_names_of(new_parent, new_name)
        };
        // The file renamed, as this client knows it: a rename the server does not
        // remember is done if the names show it moved. (An exchange leaves both names
        // taken, and an unknown file shows nothing: those are `EIO`.)
        let moved = match exchange {
            true => None,
            false => self.nodes()?.child(parent, name),
        };
        let shown = moved.map(|ino| Shown {
            gone: (parent, name),
            holds: Some(Holds {
                dir: new_parent,
                name: new_name,
                ino: self.server_ino(ino),
                was: self.last_attr(ino),
            }),
        });
        // No location answer is taken while the rename is under way (see `Nodes::rehome`).
        let _renaming = Renaming::start(self, (parent, name), (new_parent, new_name))?;
        self.rpc_once_or_shown(caller, req, shown).await?;
        if let Some(sino) = replaced {
            self.link_count_changed(sino);
        }
        self.dir_changed(parent);
        self.dir_changed(new_parent);
        self.listing_changed(parent, Some(name));
        self.listing_changed(new_parent, Some(new_name));
        let touched = {
            let nodes = self.nodes()?;
            [nodes.child(parent, name), nodes.child(new_parent, new_name)]
        };
        for ino in touched.into_iter().flatten().chain([parent, new_parent]) {
            self.forget_attr(ino);
        }
        if !exchange {
            self.names_changed(parent, name, false);
            self.names_changed(new_parent, new_name, true);
        }
        self.nodes()?
            .renamed(parent, name, new_parent, new_name, exchange);
        // Moved into a directory the server does not watch: nothing reports its changes
        // (nor its name's) any more. The kernel keeps the entry and attributes it had.
        let into = [
            (new_parent, new_name, touched[0]),
            (parent, name, touched[1].filter(|_| exchange)),
        ];
        for (dir, name, ino) in into {
            if let Some(ino) = ino
                && self.uncovered(dir)
            {
                if let Ok(mut inodes) = self.inodes.lock() {
                    inodes.entry(ino).or_default().uncovered = true;
                }
                self.invalidate(Invalidation::Entry {
                    parent: dir,
                    name: name.to_vec(),
                });
                self.invalidate(Invalidation::Inode { ino, data: false });
            }
        }
        Ok(())
    }

    pub async fn statfs(&self, caller: Caller, ino: u64) -> FsResult<StatFs> {
        let path = self.path(ino).unwrap_or_default();
        let req = || self.rpc(caller, Request::StatFs { path: path.clone() });
        match self.once_more(req).await? {
            Response::StatFs(s) => Ok(s),
            _ => Err(TransportError::Protocol.into()),
        }
    }

    /// `getxattr`/`listxattr`: the value (or list), or its length when `size == 0`.
    /// Without a round trip: the file is known to have no extended attributes (and the
    /// event stream would have told us otherwise). `ls -l` probes every file.
    fn known_without_xattrs(&self, ino: u64) -> bool {
        self.client.events_live()
            && self.inodes.lock().is_ok_and(|i| {
                i.get(&ino)
                    .is_some_and(|s| s.xattrs == XATTRS_NONE && !s.uncovered)
            })
    }

    /// [`Core::xattr_get`] answered here and now, without the server: for a file known
    /// to have no extended attributes (`ls -l` asks of every entry). `None`: ask it.
    pub fn xattr_get_now(
        &self,
        ino: u64,
        name: Option<&[u8]>,
        size: u32,
    ) -> Option<FsResult<XattrReply>> {
        if !self.known_without_xattrs(ino) {
            return None;
        }
        Some(match name {
            Some(_) => errno(libc::ENODATA),
            None if size == 0 => Ok(XattrReply::Size(0)),
            None => Ok(XattrReply::Data(Vec::new())),
        })
    }

    pub async fn xattr_get(
        &self,
        caller: Caller,
        ino: u64,
        name: Option<&[u8]>,
        size: u32,
    ) -> FsResult<XattrReply> {
        if let Some(r) = self.xattr_get_now(ino, name, size) {
            return r;
        }
        let path = self.path(ino)?;
        let req = || {
            let path = path.clone();
            self.rpc(
                caller,
                match name {
                    Some(n) => Request::GetXattr {
                        path,
                        name: n.to_vec(),
                        size,
                    },
                    None => Request::ListXattr { path, size },
                },
            )
        };
        match self.once_more(req).await? {
            Response::Data(d) => Ok(XattrReply::Data(Vec::from(d))),
            Response::XattrSize(n) => Ok(XattrReply::Size(n)),
            _ => Err(TransportError::Protocol.into()),
        }
    }

    pub async fn xattr_set(
        &self,
        caller: Caller,
        ino: u64,
        name: &[u8],
        value: Option<&[u8]>,
        flags: i32,
    ) -> FsResult<()> {
        let path = self.path(ino)?;
        let req = match value {
            Some(v) => Request::SetXattr {
                path,
                name: name.to_vec(),
                value: v.to_vec(),
                flags,
            },
            None => Request::RemoveXattr {
                path,
                name: name.to_vec(),
            },
        };
        self.rpc(caller, req).await?;
        if let Ok(mut inodes) = self.inodes.lock() {
            inodes.entry(ino).or_default().xattrs = XATTRS_UNKNOWN;
        }
        Ok(())
    }

    /// Counters for `ferry stats`, as (name, value) pairs.
    pub fn stats_snapshot(&self) -> Vec<(String, u64)> {
        let c = &self.client.stats;
        let mut v = vec![
            ("requests".to_string(), c.requests.load(Ordering::Relaxed)),
            (
                "bytes_sent".to_string(),
                c.bytes_sent.load(Ordering::Relaxed),
            ),
            (
                "bytes_received".to_string(),
                c.bytes_received.load(Ordering::Relaxed),
            ),
            (
                "events_received".to_string(),
                c.events.load(Ordering::Relaxed),
            ),
            (
                "reconnects".to_string(),
                c.reconnects.load(Ordering::Relaxed),
            ),
            (
                "connect_failures".to_string(),
                c.connect_failures.load(Ordering::Relaxed),
            ),
            (
                "transport_failures".to_string(),
                c.failures.load(Ordering::Relaxed),
            ),
        ];
        let s = &self.stats;
        for (k, a) in [
            ("opens_without_round_trip", &s.opens_without_round_trip),
            (
                "getattrs_without_round_trip",
                &s.getattrs_without_round_trip,
            ),
            ("lookups_without_round_trip", &s.lookups_without_round_trip),
            ("listings_from_cache", &s.listings_from_cache),
            ("listings_prefetched", &s.listings_prefetched),
            ("prefetches_refused", &s.prefetches_refused),
            ("bytes_read_from_server", &s.bytes_read_from_server),
            ("bytes_served_from_cache", &s.bytes_served_from_cache),
            ("reads_at_once", &s.reads_at_once),
            ("entries_unvouched", &s.entries_unvouched),
            ("entries_short_ttl", &s.entries_short_ttl),
            ("bytes_copied_on_server", &s.bytes_copied_on_server),
            ("files_prefetched", &s.files_prefetched),
            ("passthrough_opens", &s.passthrough_opens),
            ("passthrough_writers", &s.passthrough_writers),
            ("mapped_stores_sent", &s.mapped_stores_sent),
            ("handles_reopened", &s.handles_reopened),
            ("uploads_replayed", &s.uploads_replayed),
            ("retried", &s.retried),
            ("invalidations", &s.invalidations),
            ("resyncs", &s.resyncs),
            ("unlinks_behind", &s.unlinks_behind),
            ("unlinks_behind_failed", &s.unlinks_behind_failed),
            ("dirs_located", &s.dirs_located),
        ] {
            v.push((k.to_string(), a.load(Ordering::Relaxed)));
        }
        if let Some(cache) = &self.cache {
            v.push(("cache_bytes".into(), cache.used()));
            v.push(("cache_cap".into(), cache.cap()));
            if let Some(spools) = self.spools.get() {
                v.push(("spool_bytes".into(), spools.used()));
            }
            v.push((
                "cache_hit_bytes".into(),
                cache.stats.hit_bytes.load(Ordering::Relaxed),
            ));
            v.push((
                "cache_miss_bytes".into(),
                cache.stats.miss_bytes.load(Ordering::Relaxed),
            ));
            v.push((
                "cache_evicted_bytes".into(),
                cache.stats.evicted_bytes.load(Ordering::Relaxed),
            ));
        }
        if let Ok(k) = c.by_kind.lock() {
            let mut kinds: Vec<_> = k.iter().collect();
            kinds.sort();
            for (kind, n) in kinds {
                v.push((format!("requests.{kind}"), *n));
            }
        }
        if let Ok(n) = self.nodes.lock() {
            v.push(("inodes_known".into(), n.len() as u64));
        }
        v
    }
}

#[derive(Debug)]
pub enum XattrReply {
    Data(Vec<u8>),
    Size(u32),
}

/// What the names of a removal or rename look like once it is done
/// ([`Core::rpc_once_or_shown`]): `gone` (a directory and a name in it) is free, and
/// for a rename `holds` holds the file renamed.
pub(super) struct Shown<'a> {
    pub gone: (u64, &'a [u8]),
    pub holds: Option<Holds<'a>>,
}

/// The new name of a rename and the file it must hold: the server's inode number and
/// the attributes this client last had of it, if any.
pub(super) struct Holds<'a> {
    pub dir: u64,
    pub name: &'a [u8],
    pub ino: u64,
    pub was: Option<Attr>,
}

#[cfg(test)]
mod listing_changes_tests {
    use super::*;

    /// The count a stream opened now gets (`Core::listing_opened`).
    fn opened() -> u64 {
        LISTING_CLOCK.load(Ordering::SeqCst)
    }

    #[test]
    fn a_stream_sees_the_changes_after_it_opened_and_only_those() {
        let mut c = ListingChanges::default();
        c.note(Some(b"before"));
        let since = opened();
        assert!(matches!(c.since(since), ListingChanged::Nothing));
        c.note(Some(b"x"));
        let changed = c.since(since);
        assert!(!changed.vouches(b"x"));
        assert!(changed.vouches(b"before") && changed.vouches(b"y"));
    }

    #[test]
    fn a_name_changing_again_keeps_one_place() {
        let mut c = ListingChanges::default();
        let since = opened();
        for _ in 0..LISTING_NAMES_MAX + 10 {
            c.note(Some(b"log"));
        }
        assert_eq!(c.names.len(), 1);
        assert!(c.all.is_none());
        let changed = c.since(since);
        assert!(!changed.vouches(b"log") && changed.vouches(b"other"));
    }

    #[test]
    fn too_many_names_or_a_resync_count_for_streams_opened_after_an_earlier_one() {
        let mut c = ListingChanges::default();
        for i in 0..LISTING_NAMES_MAX + 1 {
            c.note(Some(format!("n{i}").as_bytes()));
        }
        let old = opened();
        assert!(matches!(c.since(old), ListingChanged::Nothing));
        // Past the cap, a change stands for every name, also for a stream opened after
        // the first such change.
        c.note(Some(b"x"));
        assert!(matches!(c.since(old), ListingChanged::All));
        let newer = opened();
        c.note(None);
        assert!(matches!(c.since(newer), ListingChanged::All));
    }
}
