//! Directory listings. A listing is fetched in batches of up to `MAX_DIR_BATCH` entries,
//! each with its attributes (one round trip lists thousands of entries, `ls -l` needs no
//! per-entry lookups). While the server's event stream is healthy, a complete listing is
//! kept and re-listing the directory needs no round trip at all; any change the server
//! reports in that directory, or that this client makes, drops it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_common::proto::{
    Attr, Caller, DirEntry, FileKind, MAX_DIR_BATCH, RelPath, Request, Response,
};

use super::{Core, Invalidation, ListingChanged, poisoned};
use crate::error::{FsError, FsResult, TransportError};
use crate::nodes::ROOT;

/// Bumped on every directory invalidation: a listing fetched across one is not kept.
pub(super) static DIR_EPOCH: AtomicU64 = AtomicU64::new(0);

/// Most subdirectories whose listings one listing prefetches.
pub(super) const PREFETCH_DIRS: usize = 64;
/// Prefetched listings in flight at once (per mount).
pub(super) const PREFETCH_PARALLEL: usize = 16;
/// Largest file fetched with its siblings (`ReadSmall`): one cache block.
const SIBLING_MAX: u64 = crate::cache::BLOCK;
/// Most bytes and files one `ReadSmall` asks for: its reply shares the connection with
/// requests someone waits for, so it stays short on a slow link (1 MiB is 0.8 s at
/// 10 Mbit/s).
const SIBLINGS_BYTES: u64 = 1024 * 1024;
const SIBLINGS_FILES: usize = 128;
/// Directories past the one a program reads its way through whose small files are
/// fetched ahead of it ([`Core::look_ahead`]), and the most listings looked through to
/// find them; a listing longer than `LOOKAHEAD_LISTING_MAX` ends the search.
const LOOKAHEAD_DIRS: usize = 3;
const LOOKAHEAD_SCAN: usize = 32;
const LOOKAHEAD_LISTING_MAX: usize = 1024;
/// Most listings one walk's step fetches ahead of it ([`Core::walk_ahead`]).
const WALK_AHEAD_LISTINGS: usize = 256;

/// A batch of a server directory stream: its entries and whether the stream ended with
/// them.
type Batch = FsResult<(Vec<DirEntry>, bool)>;

/// Batches fetched ahead of the kernel: at most this many wait unread.
const BATCHES_AHEAD: usize = 2;

/// Whether a batch of a listing was covered by the server's events: with
/// `caps::PARTIAL_WATCHES`, a listing of a directory the server could not watch has
/// every entry marked uncovered (a subdirectory may be by itself, a file only so).
fn batch_covered(entries: &[DirEntry]) -> bool {
    entries
        .iter()
        .all(|e| !e.attr.uncovered || e.attr.kind == FileKind::Dir)
}

/// The batches of a server directory stream, fetched one after the other by a task,
/// each asked for as soon as the previous one came (not when the kernel reaches it):
/// the server lists and stats the next while the kernel takes in the entries here.
#[derive(Debug)]
struct Ahead {
    batches: tokio::sync::mpsc::Receiver<Batch>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Ahead {
    fn drop(&mut self) {
        // A batch nobody will read: not worth the server's work.
        self.task.abort();
    }
}

/// An open directory: the entries fetched so far, in the order the server gave them.
#[derive(Debug)]
pub struct DirStream {
    ino: u64,
    parent: u64,
    /// Server handle and connection generation; `None` when served from the cache.
    handle: Option<(u64, u64)>,
    entries: Arc<Vec<DirEntry>>,
    eof: bool,
    epoch: u64,
    /// The directory's change count when the stream was opened
    /// (`Core::listing_opened`).
    since: u64,
    /// A batch fetched ahead failed: the error of the next read that needs it.
    failed: Option<FsError>,
    /// Every batch was covered by the server's events (the directory was watched):
    /// only then is the whole listing kept.
    covered: bool,
    /// The batches after these, being fetched (none once the stream ended, or after a
    /// failed batch: the next `readdir` asks again itself).
    ahead: Option<Ahead>,
}

impl DirStream {
    /// Whether an entry after cookie `offset` may still come from the server and none
    /// is here yet. (Cookies: 1 is after `.`, 2 after `..`, 2 + i + 1 after entry i.)
    fn lacks(&self, offset: u64) -> bool {
        !self.eof && self.entries.len() <= offset.saturating_sub(2) as usize
    }

    fn listed(&self, offset: u64) -> Listed {
        Listed {
            ino: self.ino,
            parent: self.parent,
            entries: Arc::clone(&self.entries),
            offset,
            since: self.since,
        }
    }
}

/// A directory stream's entries from a cookie on, as far as they have come: a reply
/// takes as many as the kernel's buffer holds (see [`Core::fill_listing`]).
#[derive(Debug)]
pub struct Listed {
    ino: u64,
    parent: u64,
    entries: Arc<Vec<DirEntry>>,
    offset: u64,
    since: u64,
}

impl Listed {
    /// The directory listed.
    pub fn dir(&self) -> u64 {
        self.ino
    }
}

/// One directory entry as the adapter replies it: `offset` is the cookie of the next one.
#[derive(Debug, Clone)]
pub struct ListedEntry<'a> {
    pub ino: u64,
    pub offset: u64,
    pub name: &'a [u8],
    pub kind: FileKind,
    /// `None` for `.` and `..` (no lookup reference is taken for them).
    pub attr: Option<&'a Attr>,
    /// Still the directory's state as far as this client knows: otherwise the entry
    /// and its attributes are the kernel's for this reply only.
    pub vouched: bool,
}

/// Entries whose attributes a reply notes at a time: it stops where the kernel's buffer
/// is full, so it notes at most this many it does not send.
const NOTE_CHUNK: usize = 128;

impl Core {
    /// Open a directory; the flag says the listing comes from the cache (and so the
    /// kernel's cached copy, if any, is still right).
    pub async fn opendir(self: &Arc<Self>, caller: Caller, ino: u64) -> FsResult<(u64, bool)> {
        let epoch = DIR_EPOCH.load(Ordering::SeqCst);
        // Before the listing is asked for: changes from here on are its business.
        let since = self.listing_opened(ino);
        let opened = async {
            let (stream, from_cache) = self.open_stream(caller, ino, (epoch, since)).await?;
            Ok((self.keep_stream(stream)?, from_cache))
        }
        .await;
        if opened.is_err() {
            self.listing_closed(ino);
        }
        opened
    }

    /// The stream, and whether it comes from the kept listing.
    async fn open_stream(
        self: &Arc<Self>,
        caller: Caller,
        ino: u64,
        (epoch, since): (u64, u64),
    ) -> FsResult<(DirStream, bool)> {
        let parent = self.dot_dot(ino)?;
        if let Some(entries) = self.cached_listing(ino)? {
            let stream = self.cached_stream(caller, ino, parent, (epoch, since), entries);
            return Ok((stream, true));
        }
        let path = self.path(ino)?;
        // Open and first batch in one round trip; small directories need no more.
        let (generation, listing) = self
            .once_more(|| {
                let req = Request::ListDir {
                    path: path.clone(),
                    max_entries: MAX_DIR_BATCH,
                    speculative: false,
                };
                async move {
                    let generation = self.client.connect().await?;
                    Ok((generation, self.rpc_on(generation, caller, req).await?))
                }
            })
            .await?;
        let (handle, attr, entries, eof) = match listing {
            Response::Listing {
                handle,
                attr,
                entries,
                eof,
            } => (handle, attr, entries, eof),
            _ => return Err(TransportError::Protocol.into()),
        };
        // (Also what the listing tells of the directory's own coverage.)
        self.note_coverage(ino, attr.uncovered);
        let covered = !attr.uncovered && batch_covered(&entries);
        if ino != ROOT && self.nodes()?.to_kernel(attr.ino) != ino {
            // The path leads to another directory now (this one was renamed or replaced
            // on the server, or something was mounted on it there): its entries are not
            // this directory's. The name is looked up again (the kernel retries an
            // ESTALE open once, with a fresh lookup, which then finds the other one).
            if !eof {
                let _ = self
                    .rpc_on(generation, caller, Request::ReleaseDir { handle })
                    .await;
            }
            self.path_went_stale(ino);
            return Err(FsError::Errno(libc::ESTALE));
        }
        self.reserve_inodes(entries.len());
        let entries = Arc::new(entries);
        if eof && covered {
            self.keep_listing(ino, epoch, &entries);
            self.prefetch_children(caller, ino, path, &entries, PREFETCH_DIRS);
        }
        let handle = (!eof).then_some((handle, generation));
        let stream = DirStream {
            ino,
            parent,
            handle,
            entries,
            eof,
            epoch,
            since,
            failed: None,
            covered,
            ahead: handle.and_then(|h| self.fetch_ahead(caller, h)),
        };
        Ok((stream, false))
    }

    /// [`Core::opendir`] on the FUSE session thread, for a listing kept in the cache
    /// (the usual case deep in a tree walk, whose listings were prefetched). `None`:
    /// take the full path.
    pub fn opendir_now(self: &Arc<Self>, caller: Caller, ino: u64) -> Option<FsResult<u64>> {
        if !self.client.events_live() || self.runtime.get().is_none() {
            return None;
        }
        let parent = self.dot_dot(ino).ok()?;
        let epoch = DIR_EPOCH.load(Ordering::SeqCst);
        let since = self.listing_opened(ino);
        let Some(entries) = self.cached_listing(ino).ok().flatten() else {
            self.listing_closed(ino);
            return None;
        };
        let stream = self.cached_stream(caller, ino, parent, (epoch, since), entries);
        let kept = self.keep_stream(stream);
        if kept.is_err() {
            self.listing_closed(ino);
        }
        Some(kept)
    }

    /// The kept listing of `ino`, while events vouch for kept listings.
    fn cached_listing(&self, ino: u64) -> FsResult<Option<Arc<Vec<DirEntry>>>> {
        if !self.client.events_live() {
            return Ok(None);
        }
        Ok(self
            .dir_cache
            .lock()
            .map_err(|_| poisoned())?
            .get(ino)
            .cloned())
    }

    /// `..` only needs a plausible inode number; the kernel resolves `..` itself.
    fn dot_dot(&self, ino: u64) -> FsResult<u64> {
        Ok(if ino == ROOT {
            ROOT
        } else {
            self.nodes()?.parent_of(ino).unwrap_or(ROOT)
        })
    }

    fn cached_stream(
        self: &Arc<Self>,
        caller: Caller,
        ino: u64,
        parent: u64,
        (epoch, since): (u64, u64),
        entries: Arc<Vec<DirEntry>>,
    ) -> DirStream {
        self.stats
            .listings_from_cache
            .fetch_add(1, Ordering::Relaxed);
        // A walk (ls -R, find, du) goes on into the subdirectories next.
        if let Ok(path) = self.path(ino) {
            self.prefetch_children(caller, ino, path, &entries, PREFETCH_DIRS);
        }
        self.walk_ahead(caller, parent, ino);
        DirStream {
            ino,
            parent,
            handle: None,
            entries,
            eof: true,
            epoch,
            since,
            failed: None,
            covered: true,
            ahead: None,
        }
    }

    fn keep_stream(&self, stream: DirStream) -> FsResult<u64> {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs
            .lock()
            .map_err(|_| poisoned())?
            .insert(fh, Arc::new(tokio::sync::Mutex::new(stream)));
        Ok(fh)
    }

    /// Entries from cookie `offset` on: those here, or if none is, the next batch from
    /// the server. With readdirplus, each real entry the kernel accepts is remembered via
    /// [`Core::listed`].
    pub async fn readdir(&self, caller: Caller, fh: u64, offset: u64) -> FsResult<Listed> {
        let stream = self
            .dirs
            .lock()
            .map_err(|_| poisoned())?
            .get(&fh)
            .cloned()
            .ok_or(FsError::Errno(libc::EBADF))?;
        let mut s = stream.lock().await;
        while s.lacks(offset) {
            if let Some(e) = s.failed.take() {
                return Err(e);
            }
            let Some(h) = s.handle else {
                break;
            };
            let batch = match s.ahead.as_mut() {
                Some(a) => a
                    .batches
                    .recv()
                    .await
                    .unwrap_or(Err(FsError::Errno(libc::EIO))),
                None => self.read_batch(caller, h).await,
            };
            self.take_batch(&mut s, caller, h, batch)?;
            // Whatever else came meanwhile, so the kernel's next reads find it here. A
            // failed one fails the read that needs it, not this one.
            while let Some(batch) = s.ahead.as_mut().and_then(|a| a.batches.try_recv().ok()) {
                if let Err(e) = self.take_batch(&mut s, caller, h, batch) {
                    s.failed = Some(e);
                    break;
                }
            }
        }
        Ok(s.listed(offset))
    }

    /// Add a batch fetched for stream `s` (server handle `h`) to its entries.
    fn take_batch(
        &self,
        s: &mut DirStream,
        caller: Caller,
        h: (u64, u64),
        batch: Batch,
    ) -> FsResult<()> {
        let (entries, eof) = match batch {
            Ok(b) => b,
            Err(e) => {
                s.ahead = None;
                return Err(e);
            }
        };
        s.eof = eof || entries.is_empty();
        // While the kernel still takes in the entries before these: its replies then
        // find the tables grown.
        self.reserve_inodes(entries.len());
        s.covered &= batch_covered(&entries);
        Arc::make_mut(&mut s.entries).extend(entries);
        if s.eof {
            s.ahead = None;
            if s.covered {
                self.keep_listing(s.ino, s.epoch, &s.entries);
            }
        } else if s.ahead.is_none() {
            s.ahead = self.fetch_ahead(caller, h);
        }
        Ok(())
    }

    /// [`Core::readdir`] on the FUSE session thread when entries after `offset` are
    /// already here (a cached listing, or batches fetched ahead). `None`: take the full
    /// path.
    pub fn readdir_now(&self, fh: u64, offset: u64) -> Option<Listed> {
        let stream = self.dirs.lock().ok()?.get(&fh).cloned()?;
        let s = stream.try_lock().ok()?;
        if s.lacks(offset) {
            return None;
        }
        Some(s.listed(offset))
    }

    /// Hand the entries of `l` to a reply in order, `.` and `..` first where its cookie
    /// is before them, until `add` says the kernel's buffer is full (returns true). For
    /// readdirplus (`plus`), the entries the kernel accepted are remembered
    /// ([`Core::listed`]) before the reply goes out, and their attributes taken as the
    /// newest ([`Core::note_attrs`]).
    ///
    /// An entry whose name changed in the directory after the stream was opened may be
    /// older than the change (the server stat'ed it before, or it waited here while the
    /// change's event went through, ignored for a name the kernel did not have yet): it
    /// is not vouched for, so its attributes are not taken, and the kernel gets it for
    /// this reply only (it looks it up again when it uses it). An entry handed over as
    /// vouched for whose name changed while the reply was filled is made unverified and
    /// its attributes forgotten here, and returned (name, inode) for the caller to
    /// invalidate once the reply is out.
    pub fn fill_listing(
        &self,
        l: &Listed,
        plus: bool,
        mut add: impl FnMut(&ListedEntry) -> bool,
    ) -> Vec<(Vec<u8>, u64)> {
        let changed = self.listing_changed_since(l.ino, l.since);
        let dots = [(0, b".".as_slice(), l.ino), (1, b"..".as_slice(), l.parent)];
        for (cookie, name, ino) in dots {
            let dot = ListedEntry {
                ino,
                offset: cookie + 1,
                name,
                kind: FileKind::Dir,
                attr: None,
                vouched: true,
            };
            if l.offset <= cookie && add(&dot) {
                return Vec::new();
            }
        }
        let mut first = l.offset.saturating_sub(2) as usize;
        let mut last = first;
        let mut attrs = Vec::with_capacity(NOTE_CHUNK);
        let mut accepted = Vec::with_capacity(NOTE_CHUNK);
        let mut taken = Vec::with_capacity(NOTE_CHUNK);
        while first < l.entries.len() {
            let chunk = &l.entries[first..l.entries.len().min(first + NOTE_CHUNK)];
            attrs.clear();
            attrs.extend(chunk.iter().map(|e| e.attr));
            self.to_kernel_attrs(&mut attrs, false);
            accepted.clear();
            taken.clear();
            let mut full = false;
            for (i, (e, attr)) in chunk.iter().zip(&attrs).enumerate() {
                // (A subdirectory the server could not watch is vouched for by name;
                // its attributes go to the kernel for the short TTL only, and are
                // never answered from the client's own table: `known_attr`.)
                let vouched = changed.vouches(&e.name.0);
                let entry = ListedEntry {
                    ino: attr.ino,
                    offset: 2 + (first + i) as u64 + 1,
                    name: &e.name.0,
                    kind: attr.kind,
                    attr: Some(attr),
                    vouched,
                };
                if add(&entry) {
                    full = true;
                    break;
                }
                last = first + i + 1;
                accepted.push((
                    e.name.0.as_slice(),
                    attr.ino,
                    vouched,
                    attr.kind == FileKind::Dir,
                ));
                if vouched {
                    taken.push(e.attr);
                }
            }
            if plus {
                self.note_attrs(&mut taken);
                self.listed(l.ino, &accepted);
            }
            if full {
                break;
            }
            first += chunk.len();
        }
        if !plus {
            return Vec::new();
        }
        // Changed while this reply was filled, and handed over as vouched for.
        let now = self.listing_changed_since(l.ino, l.since);
        if matches!(now, ListingChanged::Nothing) {
            return Vec::new();
        }
        let first = l.offset.saturating_sub(2) as usize;
        let Ok(mut nodes) = self.nodes.lock() else {
            return Vec::new();
        };
        let late: Vec<(Vec<u8>, u64)> = l.entries[first.min(last)..last]
            .iter()
            .filter(|e| changed.vouches(&e.name.0) && !now.vouches(&e.name.0))
            .map(|e| {
                nodes.unverify(l.ino, &e.name.0);
                (e.name.0.clone(), nodes.to_kernel(e.attr.ino))
            })
            .collect();
        drop(nodes);
        for (_, ino) in &late {
            self.forget_attr(*ino);
        }
        late
    }

    /// Entries of `dir` a reply just handed the kernel as vouched for, whose names
    /// changed while it was filled (see [`Core::fill_listing`]): the kernel drops them.
    pub fn changed_while_listed(&self, dir: u64, late: Vec<(Vec<u8>, u64)>) {
        for (name, ino) in late {
            self.invalidate(Invalidation::Entry { parent: dir, name });
            self.invalidate(Invalidation::Inode { ino, data: false });
        }
    }

    /// Keep the complete listing of `ino`, fetched since `epoch`, if no directory was
    /// invalidated meanwhile and events vouch for it. The epoch is checked under the
    /// cache's lock: an invalidation (epoch bumped, then the entry removed under the
    /// lock) cannot slip between the check and the insert.
    ///
    /// Events name the directory by inode, so a listing kept for a directory the kernel
    /// does not hold yet (a prefetch that came back before the kernel took the
    /// subdirectory's entry) is dropped by its events like any other.
    fn keep_listing(&self, ino: u64, epoch: u64, entries: &Arc<Vec<DirEntry>>) {
        if !self.client.events_live() {
            return;
        }
        if let Ok(mut c) = self.dir_cache.lock()
            && DIR_EPOCH.load(Ordering::SeqCst) == epoch
        {
            c.keep(ino, entries);
        }
    }

    /// The next batch of the server's directory stream `handle`.
    async fn read_batch(
        &self,
        caller: Caller,
        (handle, generation): (u64, u64),
    ) -> FsResult<(Vec<DirEntry>, bool)> {
        let req = Request::ReadDir {
            handle,
            max_entries: MAX_DIR_BATCH,
        };
        match self.rpc_on(generation, caller, req).await? {
            Response::Dir { entries, eof } => Ok((entries, eof)),
            _ => Err(TransportError::Protocol.into()),
        }
    }

    /// Fetch the batches of `handle` one after the other in the background, up to
    /// [`BATCHES_AHEAD`] of them unread, until the stream ends or a batch fails.
    fn fetch_ahead(&self, caller: Caller, handle: (u64, u64)) -> Option<Ahead> {
        let me = self.me.upgrade()?;
        let (tx, batches) = tokio::sync::mpsc::channel(BATCHES_AHEAD);
        let task = tokio::spawn(async move {
            loop {
                let batch = me.read_batch(caller, handle).await;
                let last = match &batch {
                    Ok((entries, eof)) => *eof || entries.is_empty(),
                    Err(_) => true,
                };
                if tx.send(batch).await.is_err() || last {
                    return;
                }
            }
        });
        Some(Ahead { batches, task })
    }

    /// Fetch the listings of (up to [`PREFETCH_DIRS`] of) the subdirectories of `path`
    /// in the background, several at a time, into the listing cache: a tree walk then
    /// finds each directory already listed instead of waiting a round trip for it, which
    /// over a WAN link is most of its time. Only while events keep the cache honest.
    ///
    /// `dir` is the directory at `path`; at most `max` are fetched, and the number
    /// started is returned. Where a walk goes through `dir` ([`Core::walk_ahead`]), each
    /// listing fetched has its own subdirectories fetched in turn.
    fn prefetch_children(
        self: &Arc<Self>,
        caller: Caller,
        dir: u64,
        path: RelPath,
        entries: &[DirEntry],
        max: usize,
    ) -> usize {
        if !self.client.events_live() {
            return 0;
        }
        // (Also called on the FUSE session thread, which is outside the runtime.)
        let Some(rt) = self.runtime.get() else {
            return 0;
        };
        let children: Vec<(u64, RelPath)> = {
            let (Ok(nodes), Ok(cache), Ok(mut pending)) = (
                self.nodes.lock(),
                self.dir_cache.lock(),
                self.prefetches.lock(),
            ) else {
                return 0;
            };
            let mut children = Vec::new();
            // (Not one the server could not watch: it would refuse, as it did.)
            for e in entries
                .iter()
                .filter(|e| e.attr.kind == FileKind::Dir && !e.attr.uncovered)
            {
                if children.len() == max.min(PREFETCH_DIRS) {
                    break;
                }
                let ino = nodes.to_kernel(e.attr.ino);
                if !cache.contains(ino) && pending.insert(ino) {
                    children.push((ino, path.join(&e.name.0)));
                }
            }
            children
        };
        let started = children.len();
        // Once the server refuses one (its watches run low), the rest would be too.
        let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for (ino, child) in children {
            let core = Arc::clone(self);
            let refused = Arc::clone(&refused);
            rt.spawn(async move {
                let _pending = Prefetching(&core, ino);
                let Some(entries) = core.list_ahead(caller, ino, &child, &refused).await else {
                    return;
                };
                let walked = core.looked_ahead.lock().is_ok_and(|l| l.walked(dir));
                if walked {
                    core.prefetch_children(caller, ino, child, &entries, PREFETCH_DIRS);
                }
            });
        }
        started
    }

    /// Fetch the listing of `ino` (at `path`) and keep it; returns it when kept
    /// (complete, still the same directory, watched). Refused (the server's watches run
    /// low) sets `refused`; skipped once it is set, or when the listing is kept already.
    async fn list_ahead(
        &self,
        caller: Caller,
        ino: u64,
        path: &RelPath,
        refused: &std::sync::atomic::AtomicBool,
    ) -> Option<Arc<Vec<DirEntry>>> {
        let _slot = self.prefetching.acquire().await.ok()?;
        if refused.load(Ordering::Relaxed) {
            return None;
        }
        let epoch = DIR_EPOCH.load(Ordering::SeqCst);
        if self
            .dir_cache
            .lock()
            .map(|c| c.contains(ino))
            .unwrap_or(true)
        {
            return None;
        }
        // (Refused, EAGAIN, rather than take a watch the server keeps for directories
        // clients look into.)
        let req = Request::ListDir {
            path: path.clone(),
            max_entries: MAX_DIR_BATCH,
            speculative: true,
        };
        let (handle, attr, entries, eof) = match self.client.call(caller, req).await {
            Ok(Ok(Response::Listing {
                handle,
                attr,
                entries,
                eof,
            })) => (handle, attr, entries, eof),
            Ok(Err(libc::EAGAIN)) => {
                refused.store(true, Ordering::Relaxed);
                self.stats
                    .prefetches_refused
                    .fetch_add(1, Ordering::Relaxed);
                return None;
            }
            _ => return None,
        };
        self.stats
            .listings_prefetched
            .fetch_add(1, Ordering::Relaxed);
        // (Not kept if the path led to another directory meanwhile.)
        let same = self
            .nodes
            .lock()
            .is_ok_and(|n| n.to_kernel(attr.ino) == ino);
        // (Nor if the server could not watch it: nothing would drop it.)
        if !eof || !same || attr.uncovered || !batch_covered(&entries) {
            // Too big to prefetch whole: the walk will list it itself.
            if !eof {
                let _ = self
                    .client
                    .call(caller, Request::ReleaseDir { handle })
                    .await;
            }
            return None;
        }
        let entries = Arc::new(entries);
        self.keep_listing(ino, epoch, &entries);
        Some(entries)
    }

    /// A walk through `parent` (two of its subdirectories entered in a row from kept
    /// listings, as `ls -R`, `find` or `du` do) goes on into its other subdirectories
    /// next, and into theirs first: fetch the subdirectories of every subdirectory of
    /// `parent` whose listing is kept, up to [`WALK_AHEAD_LISTINGS`], and those of the
    /// ones still coming as they come (see [`Core::prefetch_children`]). Without it, the
    /// walk's first step into each subdirectory waited for a listing only asked for
    /// when the subdirectory itself was entered.
    fn walk_ahead(self: &Arc<Self>, caller: Caller, parent: u64, entered: u64) {
        if parent == entered
            || !self
                .looked_ahead
                .lock()
                .is_ok_and(|mut l| l.entered_sub(parent, entered))
        {
            return;
        }
        let (Ok(Some(siblings)), Ok(parent_path)) =
            (self.cached_listing(parent), self.path(parent))
        else {
            return;
        };
        let mut budget = WALK_AHEAD_LISTINGS;
        for e in siblings.iter().filter(|e| e.attr.kind == FileKind::Dir) {
            if budget == 0 {
                break;
            }
            let Ok(ino) = self.nodes().map(|n| n.to_kernel(e.attr.ino)) else {
                return;
            };
            if let Ok(Some(entries)) = self.cached_listing(ino) {
                let path = parent_path.join(&e.name.0);
                budget -= self.prefetch_children(caller, ino, path, &entries, budget);
            }
        }
    }

    /// A file of `dir` is being opened for reading and was not in the data cache: fetch
    /// the directory's other small regular files that are not cached at their listed
    /// version, whole, in one `ReadSmall` round trip, into the data cache. A program
    /// reading its way through a directory (`cat *`, `grep -r`, a compiler) then opens
    /// the rest without a round trip each. Only with a listing vouched for by events.
    pub(super) fn prefetch_siblings(self: &Arc<Self>, caller: Caller, dir: u64, opening: u64) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        if !self.client.events_live() || !self.client.reads_small() {
            return;
        }
        let Some(entries) = self.dir_cache.lock().ok().and_then(|c| c.get(dir).cloned()) else {
            return;
        };
        let Ok(path) = self.path(dir) else {
            return;
        };
        let mut names = Vec::new();
        let mut inos = std::collections::HashSet::new();
        // Server inode → (listed version, cache token): a reply is stored only for the
        // version listed and if nothing re-based the entry meanwhile.
        let mut expect = std::collections::HashMap::new();
        let mut total = 0u64;
        for e in entries.iter() {
            if e.attr.kind != FileKind::File
                || e.attr.ino == opening
                || e.attr.size == 0
                || e.attr.size > SIBLING_MAX
                || total + e.attr.size > SIBLINGS_BYTES
                || names.len() == SIBLINGS_FILES
                || self.writing(e.attr.ino)
            {
                continue;
            }
            if cache.validate(e.attr.ino, e.attr.version, e.attr.size) && cache.complete(e.attr.ino)
            {
                continue;
            }
            let Some(token) = cache.token(e.attr.ino) else {
                continue;
            };
            total += e.attr.size;
            names.push(e.name.clone());
            inos.insert(e.attr.ino);
            expect.insert(e.attr.ino, (e.attr.version, token));
        }
        if names.is_empty() {
            // All in the cache already: a program reading through it goes on to the
            // next directories as from one whose files were just fetched.
            if let Ok(mut la) = self.looked_ahead.lock() {
                la.fetched_together(dir);
            }
            return;
        }
        let (done, watch) = tokio::sync::watch::channel(false);
        {
            let Ok(mut s) = self.siblings.lock() else {
                return;
            };
            if s.contains_key(&dir) {
                return;
            }
            s.insert(dir, (inos, watch));
        }
        let core = Arc::clone(self);
        tokio::spawn(async move {
            let req = Request::ReadSmall {
                dir: path,
                names,
                max_size: SIBLING_MAX as u32,
            };
            if let Ok(Ok(Response::SmallFiles(files))) = core.client.call(caller, req).await {
                let n = files.len() as u64;
                let bytes: u64 = files.iter().map(|f| f.data.len() as u64).sum();
                let cache = cache.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    for f in files {
                        // Another version than listed: the file changed since, and its
                        // event says so; not worth keeping.
                        if let Some(&(version, token)) = expect.get(&f.attr.ino)
                            && version == f.attr.version
                        {
                            let _ = cache.store(f.attr.ino, version, token, 0, &f.data);
                        }
                    }
                })
                .await;
                core.stats.files_prefetched.fetch_add(n, Ordering::Relaxed);
                core.stats
                    .bytes_read_from_server
                    .fetch_add(bytes, Ordering::Relaxed);
            }
            if let Ok(mut la) = core.looked_ahead.lock() {
                la.fetched_together(dir);
            }
            if let Ok(mut s) = core.siblings.lock() {
                s.remove(&dir);
            }
            let _ = done.send(true);
        });
    }

    /// A file of `dir` was opened from the data cache after the directory's small files
    /// were fetched together: the program is reading its way through the directory,
    /// maybe through a tree (`cat` of what `find` printed, `grep -r`, a build), and its
    /// first open in each directory would wait for the server to read that directory's
    /// files from its disk. Fetch, as [`Core::prefetch_siblings`] does, the small files
    /// of the next [`LOOKAHEAD_DIRS`] directories a depth-first walk in listing order
    /// reaches, so that they are read while the program reads this one. Only through
    /// listings this client has (vouched for by events), once per directory it enters.
    pub(super) fn look_ahead(self: &Arc<Self>, caller: Caller, dir: u64) {
        if self.cache.is_none() || !self.client.events_live() || !self.client.reads_small() {
            return;
        }
        let newly_entered = self
            .looked_ahead
            .lock()
            .is_ok_and(|mut la| la.fetched.contains(&dir) && la.entered(dir));
        if !newly_entered {
            return;
        }
        for next in self.walk_after(dir) {
            self.prefetch_siblings(caller, next, 0);
        }
    }

    /// Up to [`LOOKAHEAD_DIRS`] directories with small files that follow `dir` in a
    /// depth-first walk in listing order (its subdirectories first, then the
    /// directories after it, climbing), over listings this client has.
    fn walk_after(&self, dir: u64) -> Vec<u64> {
        let (Ok(nodes), Ok(cache)) = (self.nodes.lock(), self.dir_cache.lock()) else {
            return Vec::new();
        };
        let listing = |d: u64| {
            cache
                .get(d)
                .filter(|l| l.len() <= LOOKAHEAD_LISTING_MAX)
                .cloned()
        };
        // The subdirectories of `d` from position `from` of its listing on.
        let subdirs_from = |l: &[DirEntry], from: usize| -> Vec<u64> {
            l.iter()
                .skip(from)
                .filter(|e| e.attr.kind == FileKind::Dir)
                .map(|e| nodes.to_kernel(e.attr.ino))
                .collect()
        };
        let mut found = Vec::new();
        let mut scanned = 0;
        // Directories still to visit, the next one last: first those below `dir`.
        let mut pending: Vec<u64> = listing(dir).map_or_else(Vec::new, |l| subdirs_from(&l, 0));
        pending.reverse();
        let mut climbing = dir;
        while found.len() < LOOKAHEAD_DIRS && scanned < LOOKAHEAD_SCAN {
            let Some(next) = pending.pop() else {
                // Nothing left below: the directories after `climbing` in its parent.
                if climbing == ROOT {
                    break;
                }
                let Some(parent) = nodes.parent_of(climbing) else {
                    break;
                };
                let Some(l) = listing(parent) else {
                    break;
                };
                scanned += 1;
                let Some(at) = l
                    .iter()
                    .position(|e| nodes.to_kernel(e.attr.ino) == climbing)
                else {
                    break;
                };
                pending = subdirs_from(&l, at + 1);
                pending.reverse();
                climbing = parent;
                continue;
            };
            let Some(l) = listing(next) else {
                // Not listed here: neither it nor what is below it is known.
                continue;
            };
            scanned += 1;
            if l.iter().any(|e| {
                e.attr.kind == FileKind::File && e.attr.size > 0 && e.attr.size <= SIBLING_MAX
            }) {
                found.push(next);
            }
            let mut below = subdirs_from(&l, 0);
            below.reverse();
            pending.extend(below);
        }
        found
    }

    /// If `sino` (in directory `dir`) is among small files being fetched, wait until
    /// they are in the data cache.
    pub(super) async fn sibling_fetched(&self, dir: u64, sino: u64) {
        let watch = match self.siblings.lock() {
            Ok(s) => match s.get(&dir) {
                Some((inos, watch)) if inos.contains(&sino) => watch.clone(),
                _ => return,
            },
            Err(_) => return,
        };
        let mut watch = watch;
        let _ = watch.wait_for(|done| *done).await;
    }

    /// Room in the inode tables for `n` more inodes.
    fn reserve_inodes(&self, n: usize) {
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.reserve(n);
        }
        if let Ok(mut inodes) = self.inodes.lock() {
            inodes.reserve(n);
        }
    }

    /// The kernel accepted these readdirplus entries of `dir` (name, inode, vouched for,
    /// a directory): it now holds a reference to each.
    pub fn listed(&self, dir: u64, entries: &[(&[u8], u64, bool, bool)]) {
        if let Ok(mut n) = self.nodes.lock() {
            for &(name, ino, vouched, is_dir) in entries {
                if vouched {
                    n.remember(dir, name, ino, is_dir);
                } else {
                    n.remember_unverified(dir, name, ino, is_dir);
                }
            }
        }
    }

    /// [`Core::releasedir`] on the FUSE session thread for a stream with nothing open
    /// or in flight on the server (a listing served from the cache, or one that came
    /// whole with its `ListDir`).
    pub fn releasedir_now(&self, fh: u64) -> bool {
        let Ok(mut dirs) = self.dirs.lock() else {
            return false;
        };
        let idle = dirs.get(&fh).and_then(|s| {
            s.try_lock()
                .ok()
                .filter(|s| s.handle.is_none() && s.ahead.is_none())
                .map(|s| self.stream_done(&s))
        });
        if idle.is_some() {
            dirs.remove(&fh);
            return true;
        }
        false
    }

    /// A directory stream is released. The kernel (`FOPEN_CACHE_DIR`) may have filled its
    /// own copy of the listing from it *after* an event's invalidation of that copy went
    /// through: the stream's entries were taken when it was opened, and the kernel reads
    /// (and stores) them whenever the process gets to its `getdents`, which may be after
    /// the event (glibc's `opendir` alone puts an `fstat` in between, whose `GETATTR`
    /// also hands the kernel the new mtime its cache is later checked against). Nothing
    /// would drop that copy again: later opens answered from a fresh kept listing say
    /// `FOPEN_KEEP_CACHE`, and the kernel serves the old names until the next change in
    /// the directory. So when the stream's entries are no longer the directory's kept
    /// listing and some listing was dropped since it was opened, drop the kernel's copy
    /// once more. Release comes after every `getdents` through the descriptor is done,
    /// so after any fill from this stream.
    fn stream_done(&self, s: &DirStream) {
        self.listing_closed(s.ino);
        if DIR_EPOCH.load(Ordering::SeqCst) == s.epoch {
            return;
        }
        let vouched = self
            .dir_cache
            .lock()
            .is_ok_and(|c| c.get(s.ino).is_some_and(|e| Arc::ptr_eq(e, &s.entries)));
        if !vouched {
            self.invalidate(Invalidation::Inode {
                ino: s.ino,
                data: true,
            });
        }
    }

    pub async fn releasedir(&self, caller: Caller, fh: u64) -> FsResult<()> {
        let stream = self.dirs.lock().map_err(|_| poisoned())?.remove(&fh);
        if let Some(stream) = stream {
            let mut s = stream.lock().await;
            self.stream_done(&s);
            // Stops the fetching: a batch nobody will read is not worth the server's work.
            s.ahead = None;
            if let Some((handle, generation)) = s.handle {
                let _ = self
                    .rpc_on(generation, caller, Request::ReleaseDir { handle })
                    .await;
            }
        }
        Ok(())
    }
}

/// A listing being prefetched: taken off [`Core::prefetches`] when dropped.
struct Prefetching<'a>(&'a Core, u64);

impl Drop for Prefetching<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.0.prefetches.lock() {
            pending.remove(&self.1);
        }
    }
}

/// What [`Core::look_ahead`] goes by.
#[derive(Default)]
pub(super) struct LookAhead {
    /// The directories it last fetched ahead from, newest last: a program going back
    /// and forth between a few (`diff -r a b`) does not start a walk at every open.
    entered: std::collections::VecDeque<u64>,
    /// The directories whose small files were last fetched together (or found all
    /// cached), newest last.
    fetched: std::collections::VecDeque<u64>,
    /// Directories a walk goes through ([`Core::walk_ahead`]): the last subdirectory
    /// entered from a kept listing in each of the last few directories, and the
    /// directories found walked, newest last.
    last_entered: std::collections::VecDeque<(u64, u64)>,
    walked: std::collections::VecDeque<u64>,
}

impl LookAhead {
    /// Directories remembered in `fetched`, and in `entered`.
    const FETCHED_MAX: usize = 64;
    const ENTERED_MAX: usize = 8;

    fn fetched_together(&mut self, dir: u64) {
        if self.fetched.len() == Self::FETCHED_MAX {
            self.fetched.pop_front();
        }
        self.fetched.push_back(dir);
    }

    /// A subdirectory `dir` of `parent` is entered from a kept listing: whether that
    /// makes `parent` newly walked (another subdirectory of it was entered last, with
    /// at most a few other directories' in between: a depth-first walk enters the
    /// subdirectories of the one before first).
    fn entered_sub(&mut self, parent: u64, dir: u64) -> bool {
        let before = self.last_entered.iter().position(|&(p, _)| p == parent);
        let second = before.is_some_and(|i| self.last_entered[i].1 != dir);
        if let Some(i) = before {
            self.last_entered.remove(i);
        }
        if self.last_entered.len() == Self::ENTERED_MAX {
            self.last_entered.pop_front();
        }
        self.last_entered.push_back((parent, dir));
        if !second || self.walked.contains(&parent) {
            return false;
        }
        if self.walked.len() == Self::ENTERED_MAX {
            self.walked.pop_front();
        }
        self.walked.push_back(parent);
        true
    }

    fn walked(&self, dir: u64) -> bool {
        self.walked.contains(&dir)
    }

    /// Whether `dir` is newly entered (and then remembered as such).
    fn entered(&mut self, dir: u64) -> bool {
        if self.entered.contains(&dir) {
            return false;
        }
        if self.entered.len() == Self::ENTERED_MAX {
            self.entered.pop_front();
        }
        self.entered.push_back(dir);
        true
    }
}
