//! Open files: reads through the on-disk cache with growing readahead, writes behind with
//! a bounded window, and close-to-open: `flush` (every `close`) waits for the writes,
//! commits them on the server and reports any failure.
//!
//! Opens for reading need no round trip when the server's event stream is healthy and
//! the whole file is cached at its current version; the server handle is then opened
//! lazily, on the first miss. Writes to existing files are staged on the server, so a
//! connection lost before `close` leaves the server's copy as it was.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ferry_common::proto::{Attr, Caller, RelPath, Request, Response, SetAttr};
use futures::StreamExt;
use futures::future::join_all;
use futures::stream::FuturesUnordered;
use tokio::sync::{Notify, Semaphore};

use super::spool::{Spool, SpoolReader, Spools};
use super::{Core, InodeState, errno, poisoned};
use crate::cache::{BLOCK, DataCache, Lookup};
use crate::error::{FsError, FsResult, TransportError};

/// Small files come back whole with the open reply (the seed's `get`).
const INLINE_MAX: u32 = 1024 * 1024;
/// Bytes of writes in flight per inode before `write` waits (backpressure).
const WRITE_WINDOW: usize = 16 * 1024 * 1024;
/// How often cache metadata is written back while files are being closed.
const PERSIST_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// Sequential readahead starts here and doubles up to `MAX_WINDOW`.
const MIN_WINDOW: u64 = 1024 * 1024;
const MAX_WINDOW: u64 = 16 * 1024 * 1024;

/// `window` within an eighth of the cache's cap (at least a block): a small cache
/// (`--cache-size 2M`) would evict a large window's blocks before they are read, and
/// each would be fetched again (a 10 MiB file read twice through a 2 MiB cache moved
/// 62 MB from the server).
fn window_within(cache: &DataCache, window: u64) -> u64 {
    window.min((cache.cap() / 8 / BLOCK * BLOCK).max(BLOCK))
}

/// The server handle an inode's writers on this client share.
#[derive(Debug, Clone, Copy)]
pub(super) struct Writer {
    handle: u64,
    generation: u64,
    /// The server may write through it directly rather than staging: it opened a new or
    /// empty file (the server stages only files with content to protect). A guess on
    /// the safe side: a staged handle truncated at open (`O_TRUNC`) is counted too. (An
    /// `O_DSYNC` handle, never staged, is not: moving its writers to a staged handle
    /// would break their `O_DSYNC`.)
    direct: bool,
    /// A commit (close, fsync) succeeded through it since it was opened: the server's
    /// file now holds content a later writer's failed upload must not destroy.
    committed: bool,
    /// Opened `O_SYNC`/`O_DSYNC`: its writes are never sent again through a staged
    /// handle after a reconnect (they were made durable one by one).
    sync: bool,
}

impl Writer {
    /// `size`: the file's size in the server's open reply, before any local patching.
    fn new(handle: u64, generation: u64, size: u64) -> Self {
        Writer {
            handle,
            generation,
            direct: size == 0,
            committed: false,
            sync: false,
        }
    }

    fn pair(&self) -> (u64, u64) {
        (self.handle, self.generation)
    }

    /// Not to be shared with a new writer once nothing is uncommitted (see
    /// `Core::claim_writer`).
    fn replaceable(&self) -> bool {
        self.direct && self.committed
    }
}

/// Bytes of uncommitted changes one inode keeps in memory for sending again
/// ([`Journal`]); written data past that goes to the inode's spool file.
const JOURNAL_MAX: u64 = 8 * 1024 * 1024;
/// The same for all inodes of this process together.
const JOURNALS_MAX: u64 = 32 * 1024 * 1024;
static JOURNALS: AtomicU64 = AtomicU64::new(0);
/// What each kept change costs besides its data (a million 1-byte writes must not
/// fit).
const ENTRY_COST: u64 = 64;
/// Entries of spooled data one inode keeps (their data is on disk; sequential writes
/// make one entry): 4 MiB of memory at most.
const SPOOLED_ENTRIES_MAX: u64 = 65_536;

/// A change of an inode's content not yet committed, as it was sent.
#[derive(Debug, Clone)]
enum Replay {
    Write {
        offset: u64,
        data: Bytes,
    },
    /// Written data kept in the inode's spool file: `len` bytes at `at` there.
    Spooled {
        offset: u64,
        at: u64,
        len: u64,
    },
    /// A staged truncation: `ftruncate`, an `O_TRUNC` open or create.
    Truncate(u64),
    /// Times or mode sent behind the writes.
    Attrs(SetAttr),
}

/// Every change made through an inode's write handles since its last commit, in order,
/// with the connection generation of the handle each went through, so that a lost
/// connection (the server's staging file went with it) does not lose them: the commit
/// sends them again through a new handle first ([`Core::replay`]). Up to
/// [`JOURNAL_MAX`] per inode and [`JOURNALS_MAX`] in all in memory; written data past
/// that goes to a spool file in the cache directory (up to the cache's size for all
/// files together). Past that, or after a change that cannot be sent again (a
/// server-side copy into the file, `fallocate`), it is not `whole` until the next
/// commit, and a lost connection fails the commit as before.
#[derive(Debug)]
struct Journal {
    ops: Vec<(u64, Replay)>,
    bytes: u64,
    whole: bool,
    /// A change (or the commit) met a lost connection.
    lost: bool,
    /// Connection generation of the oldest uncommitted change, also of one not kept.
    oldest: Option<u64>,
    /// Changes offered since the inode's first: tells a commit whether changes came
    /// while it ran, which it did not cover.
    offered: u64,
    /// An upload of these handles' changes failed: every later change and commit
    /// through them fails too (none may be committed without the lost ones), until no
    /// writer of the inode is open or a new one opens (it starts afresh; the
    /// descriptors open before keep failing: [`WriteTracker::epoch`]).
    failed: bool,
    /// Where written data goes once memory holds no more ([`Replay::Spooled`]).
    spool: Option<Spool>,
    /// Entries of `ops` that are [`Replay::Spooled`] (counted apart from `bytes`).
    spooled: u64,
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            ops: Vec::new(),
            bytes: 0,
            whole: true,
            lost: false,
            oldest: None,
            offered: 0,
            failed: false,
            spool: None,
            spooled: 0,
        }
    }
}

/// What `op` counts against the memory limits (spooled entries are counted apart).
fn op_cost(op: &Replay) -> u64 {
    match op {
        Replay::Write { data, .. } => ENTRY_COST + data.len() as u64,
        Replay::Spooled { .. } => 0,
        _ => ENTRY_COST,
    }
}

impl Journal {
    /// Keep `op`; a write goes to the spool (with `spools`, the mount's) once this
    /// inode or all of them hold their most in memory, or the spool is in use already.
    fn push(&mut self, generation: u64, op: Replay, spools: Option<&Arc<Spools>>) {
        self.offered += 1;
        self.oldest = Some(self.oldest.map_or(generation, |g| g.min(generation)));
        if !self.whole {
            return;
        }
        let n = op_cost(&op);
        let all = JOURNALS.fetch_add(n, Ordering::SeqCst) + n;
        let fits = self.bytes + n <= JOURNAL_MAX && all <= JOURNALS_MAX;
        let op = match (op, spools) {
            (Replay::Write { offset, data }, Some(spools)) if self.spool.is_some() || !fits => {
                JOURNALS.fetch_sub(n, Ordering::SeqCst);
                match self.spooled(spools, generation, offset, &data) {
                    Ok(None) => return,
                    Ok(Some(op)) if self.spooled < SPOOLED_ENTRIES_MAX => {
                        self.spooled += 1;
                        self.ops.push((generation, op));
                        return;
                    }
                    Ok(Some(_)) => {
                        tracing::debug!("too many uncommitted pieces to keep");
                        self.broken();
                        return;
                    }
                    Err(e) => {
                        tracing::debug!("uncommitted writes past what is kept: {e}");
                        self.broken();
                        return;
                    }
                }
            }
            (op, _) => op,
        };
        self.bytes += n;
        self.ops.push((generation, op));
        if !fits {
            self.broken();
        }
    }

    /// `data`, written at `offset` through connection `generation`, appended to the
    /// spool: the entry to keep for it, or `None` when it continues the last entry
    /// (a sequential write), which now covers it.
    fn spooled(
        &mut self,
        spools: &Arc<Spools>,
        generation: u64,
        offset: u64,
        data: &[u8],
    ) -> std::io::Result<Option<Replay>> {
        let spool = match &mut self.spool {
            Some(s) => s,
            None => self.spool.insert(Spool::create(spools)?),
        };
        let at = spool.append(data)?;
        let n = data.len() as u64;
        if let Some((
            g,
            Replay::Spooled {
                offset: o,
                at: a,
                len,
            },
        )) = self.ops.last_mut()
            && *g == generation
            && *o + *len == offset
            && *a + *len == at
        {
            *len += n;
            return Ok(None);
        }
        Ok(Some(Replay::Spooled { offset, at, len: n }))
    }

    /// Changes were made that cannot be sent again: nothing is kept until the next
    /// commit (which remembers what went through which connection).
    fn broken(&mut self) {
        self.clear();
        self.whole = false;
    }

    fn clear(&mut self) {
        JOURNALS.fetch_sub(self.bytes, Ordering::SeqCst);
        self.ops = Vec::new();
        self.bytes = 0;
        self.spool = None;
        self.spooled = 0;
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        JOURNALS.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// A copy of the journal's changes ([`WriteTracker::journal_ops`]).
#[derive(Default)]
struct Kept {
    ops: Vec<Replay>,
    /// To read spooled data from.
    spool: Option<SpoolReader>,
    /// [`Journal::offered`] when the copy was taken.
    offered: u64,
}

/// Where a commit found the journal once it held the write gate ([`WriteTracker::mark`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct JournalMark {
    offered: u64,
    kept: usize,
}

/// Writes in flight for one inode, shared by all its handles.
#[derive(Debug)]
pub struct WriteTracker {
    inflight: AtomicU64,
    done: Notify,
    /// First failure since the last flush; reported by the next write, flush or fsync.
    error: Mutex<Option<i32>>,
    /// Budget in bytes (one permit per byte would overflow; permits are KiB).
    budget: Arc<Semaphore>,
    /// Writes not yet committed on the server.
    dirty: AtomicBool,
    /// Byte ranges of writes in flight. The server runs requests concurrently, so a
    /// write waits until no in-flight write overlaps it: overlapping writes land in the
    /// order they were made, disjoint ones (a sequential stream) stay pipelined.
    ranges: Mutex<Vec<(u64, u64)>>,
    range_done: Notify,
    /// Writes hold it shared from before they are counted until the server answered;
    /// a commit holds it exclusively, so no write can slip between "everything
    /// acknowledged" and the Commit request (it would stay staged, uncommitted).
    gate: Arc<tokio::sync::RwLock<()>>,
    /// The uncommitted changes, kept for sending again.
    journal: Mutex<Journal>,
    /// Bumped when a writer opens after an upload of the others failed (it starts
    /// afresh): a writable descriptor opened before ([`OpenFile::epoch`]) lost its
    /// changes, and its writes, fsyncs and close keep failing.
    epoch: AtomicU64,
}

impl Default for WriteTracker {
    fn default() -> Self {
        WriteTracker {
            inflight: AtomicU64::new(0),
            done: Notify::new(),
            error: Mutex::new(None),
            budget: Arc::new(Semaphore::new(WRITE_WINDOW / 1024)),
            dirty: AtomicBool::new(false),
            ranges: Mutex::new(Vec::new()),
            range_done: Notify::new(),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            journal: Mutex::new(Journal::default()),
            epoch: AtomicU64::new(0),
        }
    }
}

impl WriteTracker {
    /// Wait until no write is in flight. `send` runs before each wait: it sends the
    /// requests still deferred (`Client::uncork`), also those queued meanwhile.
    async fn drain_sending(&self, send: impl Fn()) {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inflight.load(Ordering::SeqCst) == 0 {
                return;
            }
            send();
            notified.await;
        }
    }

    /// Wait until no write in flight overlaps `[start, end)`, then claim it. `send` as
    /// for [`WriteTracker::drain_sending`].
    async fn claim(&self, start: u64, end: u64, send: impl Fn()) {
        loop {
            let notified = self.range_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let Ok(mut r) = self.ranges.lock() else {
                    return;
                };
                if !r.iter().any(|&(s, e)| s < end && start < e) {
                    r.push((start, end));
                    return;
                }
            }
            send();
            notified.await;
        }
    }

    /// [`WriteTracker::claim`] if no write in flight overlaps, without waiting.
    fn try_claim(&self, start: u64, end: u64) -> bool {
        let Ok(mut r) = self.ranges.lock() else {
            return false;
        };
        if r.iter().any(|&(s, e)| s < end && start < e) {
            return false;
        }
        r.push((start, end));
        true
    }

    fn release_range(&self, start: u64, end: u64) {
        if let Ok(mut r) = self.ranges.lock()
            && let Some(i) = r.iter().position(|&x| x == (start, end))
        {
            r.swap_remove(i);
        }
        self.range_done.notify_waiters();
    }

    /// A write's answer arrived: record a failure, free its range and budget.
    fn settle_write(
        &self,
        reply: Result<Result<Response, i32>, TransportError>,
        len: usize,
        range: (u64, u64),
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        match reply {
            Ok(Ok(Response::Written { len: n })) if n as usize == len => {}
            Ok(Ok(_)) => self.fail(libc::EIO),
            Ok(Err(e)) => self.fail(e),
            Err(e) => self.lost_or_fail(e),
        }
        self.release_range(range.0, range.1);
        drop(permit);
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.done.notify_waiters();
        }
    }

    /// Settle a queued write when its answer comes, on the connection's reader (no task
    /// per write).
    fn settle_later(
        self: Arc<Self>,
        sent: Result<crate::conn::Sent, TransportError>,
        len: usize,
        range: (u64, u64),
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        match sent {
            Ok(sent) => sent.then(move |reply| self.settle_write(reply, len, range, permit)),
            Err(e) => self.settle_write(Err(e), len, range, permit),
        }
    }

    /// The connection failed under a change: it is sent again with the journal at the
    /// commit if the journal holds everything, else the commit fails.
    fn lost_or_fail(&self, e: TransportError) {
        let kept = match self.journal.lock() {
            Ok(mut j) if j.whole && !j.failed => {
                j.lost = true;
                true
            }
            Ok(mut j) => {
                j.failed = true;
                false
            }
            Err(_) => false,
        };
        if kept {
            tracing::debug!("connection lost under a change ({e}); kept for sending again");
        } else {
            self.fail(FsError::Transport(e).errno());
        }
    }

    /// A change sent through a handle of connection `generation`.
    fn record(&self, generation: u64, op: Replay) {
        self.record_spooling(None, generation, op);
    }

    /// [`WriteTracker::record`], with the mount's spool files for written data that
    /// memory does not keep.
    fn record_spooling(&self, spools: Option<&Arc<Spools>>, generation: u64, op: Replay) {
        if let Ok(mut j) = self.journal.lock() {
            j.push(generation, op, spools);
        }
    }

    /// A change that cannot be sent again, through a handle of `generation`.
    fn journal_broken(&self, generation: u64) {
        if let Ok(mut j) = self.journal.lock() {
            j.offered += 1;
            j.oldest = Some(j.oldest.map_or(generation, |g| g.min(generation)));
            j.broken();
        }
    }

    /// Taken by a commit under the write gate.
    fn mark(&self) -> JournalMark {
        match self.journal.lock() {
            Ok(j) => JournalMark {
                offered: j.offered,
                kept: j.ops.len(),
            },
            Err(_) => JournalMark {
                offered: 0,
                kept: 0,
            },
        }
    }

    /// The commit that took `mark` succeeded, or the server refused it and dropped the
    /// stage: what it covered is no longer pending. Changes that came while it ran
    /// (an `O_TRUNC` open on another descriptor) stay.
    fn journal_committed(&self, mark: JournalMark) {
        if let Ok(mut j) = self.journal.lock() {
            if j.failed {
                return;
            }
            let later = j.offered > mark.offered;
            if j.whole {
                let done = mark.kept.min(j.ops.len());
                let (mut freed, mut spooled) = (0, 0);
                for (_, op) in j.ops.drain(..done) {
                    freed += op_cost(&op);
                    spooled += u64::from(matches!(op, Replay::Spooled { .. }));
                }
                JOURNALS.fetch_sub(freed, Ordering::SeqCst);
                j.bytes -= freed;
                j.spooled = j.spooled.saturating_sub(spooled);
                j.oldest = j.ops.iter().map(|(g, _)| *g).min();
                if j.spooled == 0 {
                    j.spool = None;
                }
            } else if later {
                // Not kept, and not covered: the next commit cannot send them again.
                return;
            } else {
                j.whole = true;
                j.oldest = None;
            }
            j.lost = false;
        }
    }

    /// The first `sent` changes were staged again through a handle of connection
    /// `generation`, with every writer moved to it ([`Core::restage`]): what went
    /// through dead connections is there now. Called under the write gate, with no
    /// write in flight. Nothing is retagged if a change was offered since the copy
    /// sent was taken (`offered` then: an `O_TRUNC` open, times kept after going by
    /// path, a change that cannot be sent again): the commit then sends it all again.
    fn journal_restaged(&self, generation: u64, sent: usize, offered: u64) {
        if let Ok(mut j) = self.journal.lock() {
            if !j.whole || j.offered != offered {
                return;
            }
            let n = sent.min(j.ops.len());
            for (g, _) in &mut j.ops[..n] {
                *g = generation;
            }
            j.oldest = j.ops.iter().map(|(g, _)| *g).min();
            j.lost = false;
        }
    }

    /// A writable open installed a new handle for the inode's writers: it holds none of
    /// the kept changes, so the commit must send them again through a handle that does.
    fn journal_handle_replaced(&self) {
        if let Ok(mut j) = self.journal.lock()
            && !j.ops.is_empty()
        {
            j.lost = true;
        }
    }

    /// The upload failed and its close said so: the changes are gone, and later ones
    /// through the same handles could not be sent again without them.
    fn journal_failed(&self) {
        if let Ok(mut j) = self.journal.lock() {
            j.broken();
            j.lost = true;
            j.failed = true;
        }
    }

    /// See [`Journal::failed`].
    fn upload_lost(&self) -> bool {
        self.journal.lock().map_or(true, |j| j.failed)
    }

    /// A writer opens after an upload of the others failed: it starts afresh, and the
    /// descriptors open now stay failed (see [`WriteTracker::epoch`]).
    fn fresh_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.journal_fresh();
    }

    /// No writer of the inode is open: whatever happened before concerns nobody now.
    fn journal_fresh(&self) {
        if let Ok(mut j) = self.journal.lock() {
            j.clear();
            j.whole = true;
            j.lost = false;
            j.oldest = None;
            j.failed = false;
        }
    }

    /// Whether the changes since the last commit must be sent again before it: one met
    /// a lost connection, or went through (or the writer's handle belongs to) a
    /// connection that is not the live one.
    fn needs_replay(&self, live: Option<u64>, writer: Option<u64>) -> bool {
        let Ok(j) = self.journal.lock() else {
            return true;
        };
        j.lost || j.oldest.is_some_and(|g| Some(g) != live) || writer != live
    }

    /// A commit met a lost connection: whether its changes can be sent again (then the
    /// next commit does).
    fn commit_lost(&self) -> bool {
        match self.journal.lock() {
            Ok(mut j) if j.whole => {
                j.lost = true;
                true
            }
            _ => false,
        }
    }

    fn replayable(&self) -> bool {
        self.journal.lock().is_ok_and(|j| j.whole)
    }

    /// What to send again, if the journal holds every change since the last commit.
    fn journal_ops(&self) -> Option<Kept> {
        self.journal_ops_from(0)
    }

    /// [`WriteTracker::journal_ops`] from the `n`th on.
    fn journal_ops_from(&self, n: usize) -> Option<Kept> {
        let j = self.journal.lock().ok()?;
        j.whole.then(|| Kept {
            ops: j.ops.iter().skip(n).map(|(_, op)| op.clone()).collect(),
            spool: j.spool.as_ref().and_then(Spool::reader),
            offered: j.offered,
        })
    }

    fn fail(&self, e: i32) {
        tracing::warn!(
            "write failed on the server: {}",
            crate::error::errno_text(e)
        );
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
    }

    fn take_error(&self) -> Option<i32> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }

    /// The error the next change or commit reports: a failed write's, or `EIO` after
    /// an upload of these handles was lost ([`Journal::failed`]).
    fn peek_error(&self) -> Option<i32> {
        let e = self.error.lock().ok().and_then(|e| *e);
        e.or_else(|| self.upload_lost().then_some(libc::EIO))
    }
}

#[derive(Debug)]
struct FileState {
    /// Server handle and the connection generation it belongs to (`None`: not opened yet).
    handle: Option<(u64, u64)>,
    /// Server version the cached data must have.
    version: u64,
    size: u64,
    /// Sequential-read detection and the readahead window.
    next_off: u64,
    window: u64,
    prefetched_to: u64,
    /// Small reads out of sequence in a row: from the second on, the file is being read
    /// at random.
    random_streak: u32,
    /// The whole content, when it came with the open reply (at `version`): reads are
    /// served from it while it is written to the disk cache in the background.
    inline: Option<Bytes>,
    /// Released by the kernel: a handle opened for it now (by a background fill) is
    /// closed again at once.
    released: bool,
    /// Its file could not be found again after a reconnect: reads fail with `ESTALE`.
    lost: bool,
}

impl FileState {
    /// Whether a read at `offset` continues the previous one, and the readahead window
    /// it would get. Changes nothing (see [`FileState::record_read`]).
    fn next_window(&self, offset: u64) -> (bool, u64) {
        let sequential = offset == self.next_off && offset > 0;
        let window = if sequential {
            (self.window * 2).min(MAX_WINDOW)
        } else {
            MIN_WINDOW
        };
        (sequential, window)
    }

    /// What [`FileState::record_read`] would return for this read, changing nothing.
    fn read_is_random(&self, offset: u64, len: u64) -> bool {
        if self.next_off == offset + len && len > 0 {
            return self.random_streak >= 2;
        }
        let (sequential, _) = self.next_window(offset);
        !(sequential || len >= BLOCK || offset == 0) && self.random_streak.saturating_add(1) >= 2
    }

    /// Account for a read of `len` bytes at `offset`; returns whether the file is being
    /// read at random (a second small out-of-order read in a row).
    fn record_read(&mut self, offset: u64, len: u64) -> bool {
        if self.next_off == offset + len && len > 0 {
            // The same read again (run once more after a broken connection).
            return self.random_streak >= 2;
        }
        let (sequential, window) = self.next_window(offset);
        if sequential || len >= BLOCK || offset == 0 {
            self.random_streak = 0;
        } else {
            self.random_streak = self.random_streak.saturating_add(1);
        }
        self.window = window;
        self.next_off = offset + len;
        self.random_streak >= 2
    }

    /// `[offset, offset+len)` of the content the open reply carried, if it did.
    fn inline_slice(&self, offset: u64, len: u64) -> Option<Bytes> {
        let data = self.inline.as_ref()?;
        let start = (offset as usize).min(data.len());
        let end = (offset.saturating_add(len) as usize).min(data.len());
        Some(data.slice(start..end))
    }
}

#[derive(Debug)]
pub struct OpenFile {
    ino: u64,
    /// Server inode number: the cache key.
    sino: u64,
    pub(super) writable: bool,
    /// Who opened it: a handle opened later for it (lazily, or again after a reconnect)
    /// is opened with the opener's credentials, not those of whoever reads.
    opener: Caller,
    /// Of a writable descriptor: [`WriteTracker::epoch`] when it was opened.
    epoch: u64,
    state: Mutex<FileState>,
}

impl OpenFile {
    pub fn handle(&self) -> Option<(u64, u64)> {
        self.state.lock().ok().and_then(|s| s.handle)
    }

    /// A writable descriptor whose changes an upload lost, while a writer opened since
    /// started afresh: its writes, fsyncs and close fail.
    fn lost_changes(&self, tracker: &WriteTracker) -> bool {
        self.writable && self.epoch < tracker.epoch.load(Ordering::SeqCst)
    }

    /// The error a change or commit through this descriptor reports, if any.
    fn change_error(&self, tracker: &WriteTracker) -> Option<i32> {
        match self.lost_changes(tracker) {
            true => Some(libc::EIO),
            false => tracker.peek_error(),
        }
    }
}

/// The block ranges of one file being fetched into the cache, so that fills running at
/// once (a reader's miss, readahead windows) split the work instead of repeating it.
#[derive(Debug, Default)]
pub(super) struct Fetching {
    // std Mutex: held to compare and edit the list, never across an await.
    ranges: Mutex<Vec<InFlight>>,
}

#[derive(Debug)]
struct InFlight {
    start: u64,
    end: u64,
    /// Closed when the fetch ends (however it ends): waiting is acquiring from it.
    done: Arc<Semaphore>,
}

/// Ranges a fill fetches itself; dropping it ends them (their waiters then look at the
/// cache, and fetch what is still missing through their own read).
pub(super) struct Claim<'a> {
    fetching: &'a Fetching,
    ranges: Vec<(u64, u64)>,
    done: Arc<Semaphore>,
}

impl Fetching {
    /// Split the block ranges `missing()` returns (asked with the list locked, so a
    /// fetch that ends meanwhile has stored its blocks or is still listed) into those
    /// fetched by nobody yet (claimed for the caller) and the fetches already bringing
    /// the others.
    fn claim(
        &self,
        missing: impl FnOnce() -> Vec<(u64, u64)>,
    ) -> (Option<Claim<'_>>, Vec<Arc<Semaphore>>) {
        let Ok(mut inflight) = self.ranges.lock() else {
            return (None, Vec::new());
        };
        let missing = missing();
        let mut mine: Vec<(u64, u64)> = Vec::new();
        let mut others: Vec<Arc<Semaphore>> = Vec::new();
        for (start, len) in missing {
            let mut b = start;
            while b < start + len {
                match inflight.iter().find(|r| r.start <= b && b < r.end) {
                    Some(r) => {
                        if !others.iter().any(|o| Arc::ptr_eq(o, &r.done)) {
                            others.push(r.done.clone());
                        }
                    }
                    None => match mine.last_mut() {
                        Some((s, l)) if *s + *l == b => *l += BLOCK,
                        _ => mine.push((b, BLOCK)),
                    },
                }
                b += BLOCK;
            }
        }
        if mine.is_empty() {
            return (None, others);
        }
        let done = Arc::new(Semaphore::new(0));
        for &(s, l) in &mine {
            inflight.push(InFlight {
                start: s,
                end: s + l,
                done: done.clone(),
            });
        }
        let claim = Claim {
            fetching: self,
            ranges: mine,
            done,
        };
        (Some(claim), others)
    }

    /// Until the given fetches have ended.
    async fn wait(&self, others: Vec<Arc<Semaphore>>) {
        for done in others {
            // Closed when the fetch ends: the error is the wake-up.
            let _ = done.acquire().await;
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Ok(mut inflight) = self.fetching.ranges.lock() {
            inflight.retain(|r| !Arc::ptr_eq(&r.done, &self.done));
        }
        self.done.close();
    }
}

/// A `create` as the kernel asked for it.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub parent: u64,
    pub name: Vec<u8>,
    pub mode: u32,
    pub umask: u32,
    pub flags: i32,
}

/// What the adapter needs to answer `open`/`create`.
#[derive(Debug)]
pub struct OpenReply {
    pub fh: u64,
    pub attr: Attr,
    /// The kernel's cached pages are still this file's content (`FOPEN_KEEP_CACHE`).
    pub keep_cache: bool,
}

/// What [`Core::replay`] did.
struct Staged {
    /// The new staged handle and its connection generation.
    pair: (u64, u64),
    /// The writers moved to it (no writable open installed a handle of its own).
    moved: bool,
    /// How many of the journal's changes (from its start) went through it.
    sent: usize,
    /// [`Journal::offered`] when the last of them were taken.
    offered: u64,
}

impl Core {
    pub(super) fn open_file(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        self.files
            .lock()
            .map_err(|_| poisoned())?
            .get(&fh)
            .cloned()
            .ok_or(FsError::Errno(libc::EBADF))
    }

    /// Any open handle on `ino` (lets an unlinked-but-open file keep answering getattr).
    pub(super) fn any_handle(&self, ino: u64) -> Option<Arc<OpenFile>> {
        self.files
            .lock()
            .ok()?
            .values()
            .find(|f| f.ino == ino && f.handle().is_some())
            .cloned()
    }

    /// `ino` changed (a write of ours, a commit, an event): open handles stop serving the
    /// content their open reply carried and read through the cache and the server.
    pub(super) fn drop_inline(&self, ino: u64) {
        for f in self.open_of(ino) {
            if let Ok(mut st) = f.state.lock() {
                st.inline = None;
            }
        }
    }

    /// The open files of `ino`.
    pub(super) fn open_of(&self, ino: u64) -> Vec<Arc<OpenFile>> {
        match self.files.lock() {
            Ok(files) => files.values().filter(|f| f.ino == ino).cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Every open file of `ino` reads version `attr` from now on (and no longer the
    /// content its open reply carried); `restart_readahead` also forgets how far ahead
    /// they fetched. Returns one of them, if any.
    fn move_open_files(
        &self,
        ino: u64,
        attr: &Attr,
        restart_readahead: bool,
    ) -> Option<Arc<OpenFile>> {
        let open = self.open_of(ino);
        for f in &open {
            if let Ok(mut st) = f.state.lock() {
                st.version = attr.version;
                st.size = attr.size;
                st.inline = None;
                if restart_readahead {
                    st.prefetched_to = 0;
                }
            }
        }
        open.into_iter().next()
    }

    /// While writes (or a server-side copy) are pending: the size they imply, which
    /// attributes handed to the kernel carry.
    fn grow_local_size(&self, f: &OpenFile, end: u64) {
        if let Ok(mut inodes) = self.inodes.lock() {
            let st = inodes.entry(f.ino).or_default();
            let base = st
                .local_size
                .unwrap_or_else(|| f.state.lock().map(|s| s.size).unwrap_or(0));
            st.local_size = Some(base.max(end));
        }
    }

    /// `ino` has new content on the server (`attr`, from an event): descriptors already
    /// open read it from now on, as they would a local file, instead of what was current
    /// when they were opened (their server handles read the file as it is now, and a
    /// short read of the old length would make the kernel shrink the file's size for
    /// every opener).
    pub(super) fn changed_on_server(&self, ino: u64, attr: &Attr) {
        let moved = self.move_open_files(ino, attr, true);
        if let (Some(cache), Some(f)) = (&self.cache, moved) {
            cache.validate(f.sino, attr.version, attr.size);
            self.refresh_pinned(&f);
        }
    }

    fn tracker(&self, ino: u64) -> FsResult<Arc<WriteTracker>> {
        self.inode_part(ino, |st| &mut st.writes)
    }

    fn fetch_lock(&self, ino: u64) -> FsResult<Arc<tokio::sync::Mutex<()>>> {
        self.inode_part(ino, |st| &mut st.fetch)
    }

    fn fetching(&self, ino: u64) -> FsResult<Arc<Fetching>> {
        self.inode_part(ino, |st| &mut st.fetching)
    }

    /// One of the shared parts of `ino`'s state, made on first use.
    fn inode_part<T: Default>(
        &self,
        ino: u64,
        part: impl FnOnce(&mut InodeState) -> &mut Option<Arc<T>>,
    ) -> FsResult<Arc<T>> {
        let mut inodes = self.inodes()?;
        Ok(part(inodes.entry(ino).or_default())
            .get_or_insert_default()
            .clone())
    }

    /// Wait until every write in `tracker` has been answered by the server (sending
    /// those still deferred first).
    async fn drained(&self, tracker: &WriteTracker) {
        tracker.drain_sending(|| self.client.uncork()).await;
    }

    /// Wait until every write queued for `ino` has been answered by the server.
    pub(super) async fn drain_writes(&self, ino: u64) -> FsResult<()> {
        self.drained(&*self.tracker(ino)?).await;
        Ok(())
    }

    /// A new descriptor of `ino`. A writable one is counted in writer epoch `epoch`
    /// (the one it joined the writers' handle in), or in the current one.
    #[allow(clippy::too_many_arguments)]
    fn register(
        &self,
        opener: Caller,
        ino: u64,
        sino: u64,
        writable: bool,
        handle: Option<(u64, u64)>,
        attr: &Attr,
        epoch: Option<u64>,
    ) -> FsResult<u64> {
        let epoch = match (writable, epoch) {
            (false, _) => 0,
            (true, Some(e)) => e,
            (true, None) => self.tracker(ino)?.epoch.load(Ordering::SeqCst),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let file = OpenFile {
            ino,
            sino,
            writable,
            opener,
            epoch,
            state: Mutex::new(FileState {
                handle,
                version: attr.version,
                size: attr.size,
                next_off: 0,
                window: MIN_WINDOW,
                prefetched_to: 0,
                random_streak: 0,
                inline: None,
                released: false,
                lost: false,
            }),
        };
        self.files
            .lock()
            .map_err(|_| poisoned())?
            .insert(fh, Arc::new(file));
        Ok(fh)
    }

    /// Whether the kernel may keep its pages, and remember that it now holds `version`.
    fn keep_cache(&self, ino: u64, version: u64, truncating: bool) -> bool {
        let Ok(mut inodes) = self.inodes.lock() else {
            return false;
        };
        let st: &mut InodeState = inodes.entry(ino).or_default();
        let keep = !truncating && st.kernel_version == Some(version);
        st.kernel_version = Some(version);
        keep
    }

    /// Open `ino`.
    pub async fn open(&self, caller: Caller, ino: u64, flags: i32) -> FsResult<OpenReply> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let truncating = flags & libc::O_TRUNC != 0;
        let sino = self.server_ino(ino);
        let parent = self.nodes()?.parent_of(ino);
        if !writable
            && !truncating
            && let Some(dir) = parent
        {
            // Being fetched with its directory's small files: wait for that instead of
            // asking on our own.
            self.sibling_fetched(dir, sino).await;
        }

        // Fast path: nothing to ask the server. (The version is read first: a guard
        // taken inside an `if let` condition would live through the whole body.)
        // (Not of a file the server may not report changes of: `InodeState::uncovered`.)
        let known_version = self
            .inodes()?
            .get(&ino)
            .filter(|s| !s.uncovered)
            .map(|s| s.version);
        if !writable
            && !truncating
            && self.client.events_live()
            && let Some(cache) = &self.cache
            && let Some(version) = known_version
            && let Some(size) = cache.size_of(sino)
            && cache.validate(sino, version, size)
            && cache.complete(sino)
        {
            let attr = lazy_attr(ino, version, size);
            let keep = self.keep_cache(ino, version, false);
            let fh = self.register(caller, ino, sino, false, None, &attr, None)?;
            self.stats
                .opens_without_round_trip
                .fetch_add(1, Ordering::Relaxed);
            if let (Some(dir), Some(core)) = (parent, self.me.upgrade()) {
                core.look_ahead(caller, dir);
            }
            return Ok(OpenReply {
                fh,
                attr,
                keep_cache: keep,
            });
        }

        // All writers of an inode on this client share one staged server handle, so their
        // writes reach the server's staging file in the order they were made. Writable
        // opens of one inode are serialized so two of them never open two handles.
        let open_lock = if writable {
            Some(self.fetch_lock(ino)?)
        } else {
            None
        };
        let _open_guard = match &open_lock {
            Some(l) => Some(l.lock().await),
            None => None,
        };
        // Replacing a direct writer (see `claim_writer`) happens with the inode's writes
        // held off until the new handle is in place: none can land on the old handle
        // after the check that it has nothing uncommitted.
        let replacing = match writable && self.writer_replaceable(ino)? {
            true => Some(self.tracker(ino)?.gate.clone().write_owned().await),
            false => None,
        };
        let claimed = match writable {
            true => self.claim_writer(ino, replacing.is_some())?,
            false => None,
        };
        // The epoch is the one it was counted in: a failure and a fresh writer while
        // this open waits for its attributes must leave it in the failed one.
        if let Some(((handle, generation), epoch)) = claimed {
            drop(replacing);
            let result = async {
                if truncating && self.truncate_staged(caller, ino, 0).await?.is_none() {
                    self.truncate(caller, ino, None, 0).await?;
                }
                let req = Request::GetAttr {
                    path: RelPath::root(),
                    handle: Some(handle),
                };
                let attr = self.note_attr_unseen(Self::expect_attr(
                    self.rpc_on(generation, caller, req).await?,
                )?);
                let keep = self.keep_cache(ino, attr.version, truncating);
                // The writer reference was taken by claim_writer.
                let fh = self.register(
                    caller,
                    ino,
                    sino,
                    true,
                    Some((handle, generation)),
                    &attr,
                    Some(epoch),
                )?;
                Ok(OpenReply {
                    fh,
                    attr,
                    keep_cache: keep,
                })
            }
            .await;
            if result.is_err() {
                self.unclaim_writer(ino)?;
            }
            return result;
        }

        let path = self.path(ino)?;
        if !writable && !truncating {
            // The content an open brings along is what the server last committed: of
            // a file this client is writing, reads must go through the writers'
            // staged copy instead.
            let inline_max = match self.cache.is_some() && self.writer_pair(ino)?.is_none() {
                true => INLINE_MAX,
                false => 0,
            };
            // Opening to read changes nothing on the server: asked again on a new
            // connection if the old one breaks under it.
            let (generation, reply) = self
                .once_more(|| {
                    let req = Request::Open {
                        path: path.clone(),
                        flags,
                        inline_max,
                        staged: false,
                    };
                    async move {
                        let generation = self.client.connect().await?;
                        if let (Some(dir), Some(core)) = (parent, self.me.upgrade()) {
                            // Read next, most likely: the directory's other small files.
                            core.prefetch_siblings(caller, dir, sino);
                        }
                        Ok((generation, self.rpc_on(generation, caller, req).await?))
                    }
                })
                .await?;
            return self.opened(caller, ino, sino, flags, generation, reply, None);
        }
        let generation = self.client.connect().await?;
        let readable = flags & libc::O_ACCMODE != libc::O_WRONLY;
        let inline_max = if self.cache.is_some() && readable && !truncating {
            INLINE_MAX
        } else {
            0
        };
        // A writer's handle is opened read-write when allowed: reads of its own staged
        // (not yet committed) data must go through it.
        let mut reply = None;
        if writable && !readable {
            let rw = (flags & !libc::O_ACCMODE) | libc::O_RDWR;
            let req = Request::Open {
                path: path.clone(),
                flags: rw,
                inline_max: 0,
                staged: true,
            };
            match self.rpc_on(generation, caller, req).await {
                Err(FsError::Errno(libc::EACCES | libc::EPERM)) => {}
                r => reply = Some(r?),
            }
        }
        let reply = match reply {
            Some(r) => r,
            None => {
                let req = Request::Open {
                    path,
                    flags,
                    inline_max,
                    staged: writable,
                };
                self.rpc_on(generation, caller, req).await?
            }
        };
        self.opened(caller, ino, sino, flags, generation, reply, replacing)
    }

    /// The server answered an open (`reply`, on connection `generation`): register it.
    /// `replacing` holds the inode's writes off while a writer's handle is replaced.
    #[allow(clippy::too_many_arguments)]
    fn opened(
        &self,
        caller: Caller,
        ino: u64,
        sino: u64,
        flags: i32,
        generation: u64,
        reply: Response,
        replacing: Option<tokio::sync::OwnedRwLockWriteGuard<()>>,
    ) -> FsResult<OpenReply> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let truncating = flags & libc::O_TRUNC != 0;
        let (handle, attr, data) = match reply {
            Response::Opened { handle, attr } => (handle, attr, None),
            Response::OpenedWithData { handle, attr, data } => (handle, attr, Some(data)),
            _ => return Err(TransportError::Protocol.into()),
        };
        let served_size = attr.size;
        let attr = self.note_attr_unseen(attr);
        let data = data.map(Bytes::from);
        if let Some(cache) = &self.cache {
            if cache.pinned(sino) {
                // Read through passthrough: a change not heard of yet (its event may
                // still come) moves the open readers and refills their file, which the
                // new open then waits for.
                self.changed_on_server(ino, &attr);
            } else {
                cache.validate(sino, attr.version, attr.size);
            }
            if let Some(data) = &data {
                self.stats
                    .bytes_read_from_server
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                // Written to disk off the reply path: reads use the copy in memory.
                if let Some(token) = cache.token(sino) {
                    let (cache, data, version) = (cache.clone(), data.clone(), attr.version);
                    tokio::task::spawn_blocking(move || {
                        let _ = cache.store(sino, version, token, 0, &data);
                    });
                }
            }
        }
        if writable {
            let w = Writer {
                sync: flags & (libc::O_SYNC | libc::O_DSYNC) != 0,
                ..Writer::new(handle, generation, served_size)
            };
            self.set_writer(ino, w)?;
            if truncating {
                self.truncated_in_stage(ino, sino, generation)?;
            }
        }
        drop(replacing);
        let keep = self.keep_cache(ino, attr.version, truncating);
        // (A writer was counted by set_writer.)
        let fh = self.register(
            caller,
            ino,
            sino,
            writable,
            Some((handle, generation)),
            &attr,
            None,
        )?;
        if let Some(data) = data
            && !writable
            && let Ok(f) = self.open_file(fh)
            && let Ok(mut st) = f.state.lock()
        {
            st.inline = Some(data);
        }
        // A writer that opened while this open was on its way: its writes may have
        // dropped the inline content of the opens registered then, not this one's.
        // (One that opens from here on finds this open registered.)
        if !writable && self.writer_pair(ino)?.is_some() {
            self.drop_inline(ino);
        }
        Ok(OpenReply {
            fh,
            attr,
            keep_cache: keep,
        })
    }

    /// Take a reference on the live shared write handle of `ino`, atomically with
    /// finding it (a concurrent last `release` cannot close it under us).
    ///
    /// With `may_replace` (the caller holds the inode's write gate), a handle that may
    /// write directly, has had a commit and has nothing uncommitted since is not
    /// shared: the file now has content to protect, so the new writer gets a staged
    /// handle of its own (which then serves all writers; see [`Core::set_writer`]).
    /// This also covers the writer of a file just created and closed whose `RELEASE`
    /// the kernel has not delivered yet (it is sent asynchronously, after `close`
    /// returns). A handle with writes not yet committed is shared as before: replacing
    /// it could strand them (it may be staged after all, see [`Writer::direct`]).
    /// The writers' handle, and the writer epoch the caller is counted in (read under
    /// the inode table's lock, as `set_writer` changes it).
    fn claim_writer(&self, ino: u64, may_replace: bool) -> FsResult<Option<((u64, u64), u64)>> {
        let live = self.client.live_generation();
        let tracker = self.tracker(ino)?;
        let clean = may_replace
            && !tracker.dirty.load(Ordering::SeqCst)
            && tracker.inflight.load(Ordering::SeqCst) == 0;
        // After a failed upload, a new open (`set_writer`) starts afresh.
        if tracker.upload_lost() {
            return Ok(None);
        }
        let mut inodes = self.inodes()?;
        let st = inodes.entry(ino).or_default();
        match st
            .writer
            .filter(|w| Some(w.generation) == live && !(clean && w.replaceable()))
        {
            Some(w) => {
                st.writers += 1;
                Ok(Some((w.pair(), tracker.epoch.load(Ordering::SeqCst))))
            }
            None => Ok(None),
        }
    }

    /// Whether the live writer of `ino` is one [`Core::claim_writer`] may replace.
    fn writer_replaceable(&self, ino: u64) -> FsResult<bool> {
        let live = self.client.live_generation();
        Ok(self
            .inodes()?
            .get(&ino)
            .and_then(|s| s.writer)
            .is_some_and(|w| Some(w.generation) == live && w.replaceable()))
    }

    /// `w` becomes the handle every writer of `ino` on this client uses, and the
    /// caller's open is counted as a writer (in the same step: a `RELEASE` of the last
    /// other writer must not close `w`). Descriptors open with one it replaces move to
    /// `w`; the old one is closed on the server with the last writer.
    fn set_writer(&self, ino: u64, w: Writer) -> FsResult<()> {
        let tracker = self.tracker(ino)?;
        {
            let mut inodes = self.inodes()?;
            let st = inodes.entry(ino).or_default();
            if st.writers == 0 {
                // The first writer: what earlier ones left (a failed upload) is theirs.
                tracker.journal_fresh();
            } else if tracker.upload_lost() {
                // The others lost their changes; this one has none to lose.
                tracker.fresh_epoch();
            }
            st.writers += 1;
            match st.writer.replace(w) {
                Some(old) => {
                    st.retired.push(old.pair());
                    // Under the inode table's lock: a restage retags the journal
                    // only while the writers' handle is still the one it staged.
                    tracker.journal_handle_replaced();
                }
                None => return Ok(()),
            }
        }
        for f in self.open_of(ino).iter().filter(|f| f.writable) {
            f.state.lock().map_err(|_| poisoned())?.handle = Some(w.pair());
        }
        Ok(())
    }

    fn unclaim_writer(&self, ino: u64) -> FsResult<()> {
        if let Some(st) = self.inodes()?.get_mut(&ino) {
            st.writers = st.writers.saturating_sub(1);
        }
        Ok(())
    }

    /// The live shared write handle of `ino`, if this client has one.
    fn shared_writer(&self, ino: u64) -> FsResult<Option<(u64, u64)>> {
        let live = self.client.live_generation();
        Ok(self.writer_pair(ino)?.filter(|(_, g)| Some(*g) == live))
    }

    /// The inode's shared writer, whichever connection it was opened on.
    pub(super) fn writer_pair(&self, ino: u64) -> FsResult<Option<(u64, u64)>> {
        Ok(self
            .inodes()?
            .get(&ino)
            .and_then(|s| s.writer.map(|w| w.pair())))
    }

    /// The handle reads of `f` go through: the inode's writer (it sees staged data) when
    /// there is one, else `f`'s own.
    async fn io_handle(&self, f: &OpenFile) -> FsResult<(u64, u64)> {
        if let Some(h) = self.shared_writer(f.ino)? {
            return Ok(h);
        }
        self.ensure_handle(f).await
    }

    /// [`Core::io_handle`] for reading file data. The writers' handle may lack this
    /// client's uncommitted changes: it belongs to a connection that is gone (they
    /// went with it), or a writable open installed it after a reconnect. They are
    /// staged again first ([`Core::restage`]), or the read would miss them. Never
    /// called holding the inode's write gate.
    async fn read_handle(&self, caller: Caller, f: &OpenFile) -> FsResult<(u64, u64)> {
        if self.writer_needs_restage(f.ino)?
            && let Some(h) = self.restage(caller, f.ino).await?
        {
            return Ok(h);
        }
        self.io_handle(f).await
    }

    /// Whether `ino`'s writers' handle lacks changes the journal holds. Never for an
    /// `O_SYNC`/`O_DSYNC` writer: its writes are not moved to a staged handle (a
    /// reader then reads the server's file through a handle of its own).
    fn writer_needs_restage(&self, ino: u64) -> FsResult<bool> {
        let Some(w) = self.inodes()?.get(&ino).and_then(|s| s.writer) else {
            return Ok(false);
        };
        if w.sync {
            return Ok(false);
        }
        let live = self.client.live_generation();
        Ok(self.tracker(ino)?.needs_replay(live, Some(w.generation)))
    }

    /// Stage again, on the live connection, the uncommitted changes of `ino` that its
    /// writers' handle lacks ([`Core::replay`]), and return the writers' new handle;
    /// `None` when `ino` has no writer any more, or the changes cannot be sent again
    /// (not all kept, or one failed: the close reports it). The journal then counts the
    /// changes as staged on the new connection: the commit sends only what comes after.
    /// Fails (the changes stay kept for the commit to try again) when they cannot be
    /// staged now.
    async fn restage(&self, caller: Caller, ino: u64) -> FsResult<Option<(u64, u64)>> {
        let sino = self.server_ino(ino);
        let tracker = self.tracker(ino)?;
        let _no_writes_meanwhile = tracker.gate.write().await;
        self.drained(&tracker).await;
        for _ in 0..2 {
            let Some((_, generation)) = self.writer_pair(ino)? else {
                return Ok(None);
            };
            if tracker.peek_error().is_some() || !tracker.replayable() {
                // A change failed, or not all of them are kept: the close fails, and
                // reads go through whatever handle there is (the writers' if live).
                return Ok(None);
            }
            if !tracker.needs_replay(self.client.live_generation(), Some(generation)) {
                return self.writer_pair(ino);
            }
            let staged = self.replay(caller, ino, sino, &tracker).await?;
            if staged.moved {
                // Under the inode table's lock: a writable open that installs a handle
                // of its own after this sees the journal retagged and flags it
                // (`set_writer`); one that did before is seen here.
                let inodes = self.inodes()?;
                let writer = inodes.get(&ino).and_then(|s| s.writer).map(|w| w.pair());
                if writer == Some(staged.pair) {
                    tracker.journal_restaged(staged.pair.1, staged.sent, staged.offered);
                    return Ok(Some(staged.pair));
                }
            }
            // A writable open installed a handle of its own meanwhile, which lacks
            // the earlier changes: staged again through a handle they all move to.
        }
        errno(libc::EIO)
    }

    pub async fn create(&self, caller: Caller, file: &NewFile) -> FsResult<OpenReply> {
        let key = self.client.once_key();
        let mut queued = None;
        // Not queued (the connection went just before): once more, as a first send.
        for _ in 0..2 {
            let generation = self.client.connect().await?;
            let req = self.create_request(file)?;
            match self
                .client
                .start_keyed(Some(generation), caller, req, key)
                .await
            {
                Ok(sent) => {
                    queued = Some((generation, sent));
                    break;
                }
                Err(e) if e.may_have_run() => {}
                Err(e) => return Err(e.into()),
            }
        }
        let Some((generation, sent)) = queued else {
            return errno(libc::EIO);
        };
        let instance = sent.instance();
        match sent.reply().await {
            Err(e) if e.may_have_run() => self.create_again(caller, file, key, instance).await,
            reply => {
                let reply = match reply? {
                    Ok(r) => Ok(self.unwrap_reply(r)),
                    Err(e) => errno(e),
                };
                self.created(caller, file, generation, reply)
            }
        }
    }

    /// A create whose connection broke under it: sent again with its key, which a
    /// server that ran it answers with the file opened again on the new connection
    /// (`OnceKey`); a server that does not remember it gets it once more only if its
    /// name is still free (`Core::again_if_absent_on`).
    async fn create_again(
        &self,
        caller: Caller,
        file: &NewFile,
        key: ferry_common::OnceKey,
        instance: u64,
    ) -> FsResult<OpenReply> {
        let req = self.create_request(file)?;
        // Each repeat on a connection of its own: the answer names a handle of it.
        let (generation, answer) = self
            .repeating(|| async {
                let generation = self.client.connect().await?;
                let answer = self
                    .client
                    .repeat_keyed(Some(generation), caller, req.clone(), key, instance)
                    .await?;
                Ok((generation, answer))
            })
            .await?;
        match answer {
            Ok(Response::NotRemembered) => {}
            Ok(r) => return self.created(caller, file, generation, Ok(self.unwrap_reply(r))),
            Err(e) => return errno(e),
        }
        match self
            .again_if_absent_on(caller, file.parent, &file.name, req)
            .await
        {
            Ok((generation, reply)) => self.created(caller, file, generation, Ok(reply)),
            Err(e) => Err(e),
        }
    }

    /// [`Core::create`] without a task, for the FUSE session thread: queued from the
    /// calling thread, and finished (`done` called) on the connection's reader when
    /// the server answers, before the frames after it. `Err(done)`: it would have to
    /// wait (no live connection at hand, or its slot busy); take [`Core::create`].
    pub fn create_now<F>(&self, caller: Caller, file: &NewFile, done: F) -> Result<(), F>
    where
        F: FnOnce(FsResult<OpenReply>) + Send + 'static,
    {
        let (Some(me), Some(generation)) = (self.me.upgrade(), self.client.live_generation())
        else {
            return Err(done);
        };
        // A create that meets a file this client may cache can cut its data file (a
        // truncation, a new version): local I/O the connection's reader should not
        // wait for. New names, the common case, have nothing cached.
        if self.child_of(file.parent, &file.name).is_some() {
            return Err(done);
        }
        let Ok(req) = self.create_request(file) else {
            return Err(done);
        };
        let key = self.client.once_key();
        let Some(Ok(sent)) = self
            .client
            .try_start_keyed(Some(generation), caller, req, key)
        else {
            return Err(done);
        };
        let file = file.clone();
        let instance = sent.instance();
        sent.then(move |outcome| {
            let reply = match outcome {
                Ok(Ok(r)) => Ok(me.unwrap_reply(r)),
                Ok(Err(e)) => errno(e),
                Err(e) => {
                    if e.may_have_run()
                        && let Some(rt) = me.runtime.get().cloned()
                    {
                        // Sent again, off the reader.
                        rt.spawn(async move {
                            done(me.create_again(caller, &file, key, instance).await)
                        });
                        return;
                    }
                    Err(e.into())
                }
            };
            done(me.created(caller, &file, generation, reply));
        });
        Ok(())
    }

    fn create_request(&self, file: &NewFile) -> FsResult<Request> {
        let (parent, name) = self.child(file.parent, &file.name)?;
        Ok(Request::Create {
            parent,
            name,
            mode: file.mode,
            umask: file.umask,
            flags: file.flags,
        })
    }

    /// The end of a create: the server's reply to it taken in.
    fn created(
        &self,
        caller: Caller,
        file: &NewFile,
        generation: u64,
        reply: FsResult<Response>,
    ) -> FsResult<OpenReply> {
        let (parent, name, flags) = (file.parent, file.name.as_slice(), file.flags);
        let (handle, attr) = match reply? {
            Response::Opened { handle, attr } => (handle, attr),
            _ => return Err(TransportError::Protocol.into()),
        };
        let sino = attr.ino;
        let served_size = attr.size;
        self.dir_changed(parent);
        self.names_changed(parent, name, true);
        let attr = self.entry(parent, name, attr)?;
        if let Some(cache) = &self.cache {
            cache.validate(sino, attr.version, attr.size);
        }
        let w = Writer {
            sync: flags & (libc::O_SYNC | libc::O_DSYNC) != 0,
            ..Writer::new(handle, generation, served_size)
        };
        self.set_writer(attr.ino, w)?;
        if flags & libc::O_TRUNC != 0 {
            // The name may have been an existing file, truncated in the server's stage.
            self.truncated_in_stage(attr.ino, sino, generation)?;
        }
        let keep = self.keep_cache(attr.ino, attr.version, flags & libc::O_TRUNC != 0);
        // (The writer was counted by set_writer.)
        let fh = self.register(
            caller,
            attr.ino,
            sino,
            true,
            Some((handle, generation)),
            &attr,
            None,
        )?;
        Ok(OpenReply {
            fh,
            attr,
            keep_cache: keep,
        })
    }

    /// `f`'s server handle if it can be used as it is: any handle of a writer (its staged
    /// writes live and die with the connection that holds them), a reader's only while
    /// its connection is the live one.
    pub(super) fn usable_handle(&self, f: &OpenFile) -> Option<(u64, u64)> {
        f.handle()
            .filter(|&(_, g)| f.writable || self.client.live_generation() == Some(g))
    }

    /// The server handle of `f`, opening one now if the open was served from the cache,
    /// or if `f` is a reader whose handle was lost with an earlier connection: a reader
    /// open across a reconnect (a restarted server, a network outage) goes on reading.
    async fn ensure_handle(&self, f: &OpenFile) -> FsResult<(u64, u64)> {
        if let Some(h) = self.usable_handle(f) {
            return Ok(h);
        }
        let lock = self.fetch_lock(f.ino)?;
        let _guard = lock.lock().await;
        if let Some(h) = self.usable_handle(f) {
            return Ok(h);
        }
        let (reopening, lost, released) = {
            let st = f.state.lock().map_err(|_| poisoned())?;
            (st.handle.is_some(), st.lost, st.released)
        };
        if lost {
            return Err(FsError::Errno(libc::ESTALE));
        }
        if released {
            return Err(FsError::Errno(libc::EBADF));
        }
        let caller = f.opener;
        let path = match self.path(f.ino) {
            // The file has no name here any more: it cannot be found again.
            Err(_) if reopening => return Err(self.lost(f)),
            r => r?,
        };
        let generation = self.client.connect().await?;
        if let Some(h) = f.handle().filter(|&(_, g)| f.writable || g == generation) {
            return Ok(h);
        }
        let req = Request::Open {
            path,
            flags: libc::O_RDONLY,
            inline_max: 0,
            staged: false,
        };
        let (handle, attr) = match self.rpc_on(generation, caller, req).await? {
            Response::Opened { handle, attr } | Response::OpenedWithData { handle, attr, .. } => {
                (handle, attr)
            }
            _ => return Err(TransportError::Protocol.into()),
        };
        // The name may lead to another file now (the one this descriptor had open was
        // removed or renamed away): it cannot be found again, as NFS says it. (A new file
        // that got the same inode number is not told apart.) Or the kernel released
        // the descriptor while a background fill of it was opening this.
        let refused = {
            let mut st = f.state.lock().map_err(|_| poisoned())?;
            if attr.ino != f.sino {
                st.lost = true;
                Some(libc::ESTALE)
            } else if st.released {
                Some(libc::EBADF)
            } else {
                st.handle = Some((handle, generation));
                if st.version != attr.version {
                    // Changed since the open: close-to-open allows the newer content.
                    st.version = attr.version;
                    st.size = attr.size;
                    if let Some(cache) = &self.cache {
                        cache.validate(f.sino, attr.version, attr.size);
                    }
                }
                None
            }
        };
        if let Some(e) = refused {
            let _ = self
                .rpc_on(generation, caller, Request::Release { handle })
                .await;
            return Err(FsError::Errno(e));
        }
        if reopening {
            self.stats.handles_reopened.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(ino = f.ino, "reopened a reader's handle after a reconnect");
        }
        Ok((handle, generation))
    }

    /// `f`'s file cannot be found again: this and every later read of it fail.
    fn lost(&self, f: &OpenFile) -> FsError {
        if let Ok(mut st) = f.state.lock() {
            st.lost = true;
        }
        FsError::Errno(libc::ESTALE)
    }

    /// Read straight from the server, `max_io` per request, all in flight at once.
    async fn read_remote(
        &self,
        caller: Caller,
        f: &OpenFile,
        offset: u64,
        len: u64,
    ) -> FsResult<Bytes> {
        let (handle, generation) = self.read_handle(caller, f).await?;
        let chunk = u64::from(self.max_io);
        let reqs = (0..len.div_ceil(chunk)).map(|i| {
            let off = offset + i * chunk;
            let n = chunk.min(offset + len - off) as u32;
            self.rpc_on(
                generation,
                caller,
                Request::Read {
                    handle,
                    offset: off,
                    len: n,
                },
            )
        });
        let mut pieces = Vec::new();
        for r in join_all(reqs).await {
            match r? {
                Response::Data(d) => {
                    let short = (d.len() as u64) < chunk;
                    pieces.push(d);
                    if short {
                        break;
                    }
                }
                _ => return Err(TransportError::Protocol.into()),
            }
        }
        // One piece (a read up to `max_io`) is answered as received, without a copy.
        let out = match <[Bytes; 1]>::try_from(pieces) {
            Ok([one]) => one,
            Err(pieces) => Bytes::from(pieces.concat()),
        };
        self.stats
            .bytes_read_from_server
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Fetch the missing blocks of `[offset, offset+len)` into the cache; with `keep`,
    /// for reads about to come through this daemon (their pieces are kept in memory).
    async fn fill(
        &self,
        caller: Caller,
        f: &OpenFile,
        offset: u64,
        len: u64,
        keep: bool,
    ) -> FsResult<()> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        let version = f.state.lock().map_err(|_| poisoned())?.version;
        if cache.missing(f.sino, version, offset, len).is_empty() {
            return Ok(());
        }
        let (handle, generation) = self.read_handle(caller, f).await?;
        // Uncommitted writes of ours: the server's bytes may lack them, the caller reads
        // past the cache instead.
        let Some(token) = cache.token(f.sino) else {
            return Ok(());
        };
        // Decided with the in-flight ranges in hand: what another fill is bringing is
        // waited for, not fetched twice; the rest is fetched here, at the same time as
        // theirs (readahead keeps the next window coming while this one is stored).
        let fetching = self.fetching(f.ino)?;
        let version = f.state.lock().map_err(|_| poisoned())?.version;
        let (mine, others) = fetching.claim(|| cache.missing(f.sino, version, offset, len));
        let Some(mine) = mine else {
            fetching.wait(others).await;
            return Ok(());
        };
        let chunk = u64::from(self.max_io) / BLOCK * BLOCK;
        let mut pieces = Vec::new();
        for &(start, l) in &mine.ranges {
            let mut off = start;
            while off < start + l {
                let n = chunk.min(start + l - off);
                pieces.push((off, n));
                off += n;
            }
        }
        let mut replies: FuturesUnordered<_> = pieces
            .into_iter()
            .map(|(off, n)| async move {
                let read = Request::Read {
                    handle,
                    offset: off,
                    len: n as u32,
                };
                (off, self.rpc_on(generation, caller, read).await)
            })
            .collect();
        // Each piece is stored as it arrives: a reader waiting for the first one is
        // not held up by the last.
        while let Some((off, r)) = replies.next().await {
            match r? {
                Response::Data(d) => {
                    self.stats
                        .bytes_read_from_server
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                    // Kept in memory too: the reader asks for these bytes next.
                    let _ = if keep {
                        cache.store_and_keep(f.sino, version, token, off, d)
                    } else {
                        cache.store(f.sino, version, token, off, &d)
                    };
                }
                _ => return Err(TransportError::Protocol.into()),
            }
        }
        drop(mine);
        fetching.wait(others).await;
        Ok(())
    }

    /// A read answerable at once, on the calling (FUSE session) thread, without the hop
    /// to a runtime worker: from the open reply's data, or from the disk cache when
    /// nothing needs to be fetched or prefetched. `None`: take the full path.
    pub fn read_now(&self, fh: u64, offset: u64, size: u32) -> Option<Bytes> {
        let f = self.open_file(fh).ok()?;
        let cache = self.cache.as_ref()?;
        if f.writable || self.tracker(f.ino).ok()?.inflight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let len = u64::from(size);
        let mut st = f.state.lock().ok()?;
        if let Some(d) = st.inline_slice(offset, len) {
            self.stats
                .bytes_served_from_cache
                .fetch_add(d.len() as u64, Ordering::Relaxed);
            return Some(d);
        }
        let (sequential, window) = st.next_window(offset);
        let window = window_within(cache, window);
        let from = offset + len;
        let prefetch_due =
            sequential && st.prefetched_to < st.size && from + window / 2 >= st.prefetched_to;
        if prefetch_due {
            return None;
        }
        let d = match cache.read(f.sino, st.version, offset, len) {
            Ok(Lookup::Hit(d)) if (d.len() as u64) == len || offset + d.len() as u64 >= st.size => {
                d
            }
            _ => return None,
        };
        st.record_read(offset, len);
        self.stats
            .bytes_served_from_cache
            .fetch_add(d.len() as u64, Ordering::Relaxed);
        Some(d)
    }

    /// A small read at random, sent to the server by the calling (FUSE session) thread;
    /// the caller has the connection's reader answer the kernel ([`Sent::then`] with
    /// [`Core::read_arrived`]): no runtime task, no hand-off to a worker. Only the plain
    /// case of [`Core::read`]: a reader whose handle is open on the live connection, no
    /// writer of the file on this client, a read [`Core::read_now`] could not answer
    /// that fetches no more than was asked and stores nothing. `None`: take the full
    /// path.
    pub fn read_at_once(
        &self,
        caller: Caller,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Option<crate::conn::Sent> {
        let f = self.open_file(fh).ok()?;
        if f.writable
            || u64::from(size) >= BLOCK
            || self.tracker(f.ino).ok()?.inflight.load(Ordering::SeqCst) > 0
            || self.writer_pair(f.ino).ok()?.is_some()
        {
            return None;
        }
        let (handle, generation) = self.usable_handle(&f)?;
        {
            let mut st = f.state.lock().ok()?;
            if st.inline.is_some() || !st.read_is_random(offset, u64::from(size)) {
                return None;
            }
            st.record_read(offset, u64::from(size));
        }
        let read = Request::Read {
            handle,
            offset,
            len: size,
        };
        let sent = self
            .client
            .try_start_on(Some(generation), caller, read)?
            .ok()?;
        self.stats.reads_at_once.fetch_add(1, Ordering::Relaxed);
        Some(sent)
    }

    /// The data of a [`Core::read_at_once`], counted; `None` for anything else (an
    /// error, a lost connection), which the full path reads again.
    pub fn read_arrived(&self, outcome: crate::conn::Outcome) -> Option<Bytes> {
        match outcome {
            Ok(Ok(Response::Data(d))) => {
                self.stats
                    .bytes_read_from_server
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
                Some(d)
            }
            _ => None,
        }
    }

    pub async fn read(
        self: &Arc<Self>,
        caller: Caller,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> FsResult<Bytes> {
        let f = self.open_file(fh)?;
        // A reader's handle is opened again on the new connection (`ensure_handle`);
        // reads through the writers' handle find this client's changes staged again
        // there first (`restage`).
        let f = &f;
        self.once_more(|| self.read_once(caller, f, offset, size))
            .await
    }

    async fn read_once(
        self: &Arc<Self>,
        caller: Caller,
        f: &Arc<OpenFile>,
        offset: u64,
        size: u32,
    ) -> FsResult<Bytes> {
        let len = u64::from(size);
        let Some(cache) = self.cache.clone() else {
            // (Counted as in the cached path: small reads at random go out from the
            // session thread here too, see `Core::read_at_once`.)
            if let Ok(mut st) = f.state.lock() {
                st.record_read(offset, len);
            }
            return self.read_remote(caller, f, offset, len).await;
        };
        // Our own writes must have landed before the server is asked for anything.
        if f.writable || self.tracker(f.ino)?.inflight.load(Ordering::SeqCst) > 0 {
            self.drain_writes(f.ino).await?;
        }
        let (version, file_size, window, sequential, random) = {
            let mut st = f.state.lock().map_err(|_| poisoned())?;
            if let Some(d) = st.inline_slice(offset, len) {
                self.stats
                    .bytes_served_from_cache
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
                return Ok(d);
            }
            let (sequential, _) = st.next_window(offset);
            let random = st.record_read(offset, len);
            (
                st.version,
                st.size,
                window_within(&cache, st.window),
                sequential,
                random,
            )
        };
        for attempt in 0..2 {
            match cache.read(f.sino, version, offset, len) {
                // A short answer before the end of the file would make the kernel zero
                // the rest of its pages: never trust the cache for that.
                Ok(Lookup::Hit(d))
                    if (d.len() as u64) < len && offset + (d.len() as u64) < file_size =>
                {
                    tracing::warn!(
                        offset,
                        len,
                        got = d.len(),
                        file_size,
                        cache_size = ?cache.size_of(f.sino),
                        "short read from the cache before end of file; reading from the server"
                    );
                    break;
                }
                Ok(Lookup::Hit(d)) => {
                    self.stats
                        .bytes_served_from_cache
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                    if sequential {
                        self.prefetch(caller, f, offset + len, window, file_size);
                    }
                    return Ok(d);
                }
                // Small reads at random (the kernel's own readahead asks for far more,
                // though not always in order) fetch just what was asked: a whole block
                // would move up to 32 times the bytes for nothing. The kernel's page
                // cache still keeps what it gets.
                Ok(Lookup::Miss(_)) if attempt == 0 && random => break,
                Ok(Lookup::Miss(_)) if attempt == 0 => {
                    // Fetch what was asked plus a window ahead when reading sequentially.
                    let ahead = if sequential { window } else { 0 };
                    let want = (len + ahead).min(file_size.saturating_sub(offset)).max(len);
                    self.fill(caller, f, offset, want, true).await?;
                    if let Ok(mut st) = f.state.lock() {
                        st.prefetched_to = st.prefetched_to.max(offset + want);
                    }
                }
                _ => break,
            }
        }
        // A small read at random, a short answer from the cache, a cache that could
        // not hold it (cap, disk error), or a fill that lost a race with an event that
        // moved the file to a new version (its bytes were not kept): serve from the
        // network, and keep the whole blocks that came if the version still stands.
        let keep = cache
            .token(f.sino)
            .and_then(|t| Some((f.state.lock().ok()?.version, t)));
        let data = self.read_remote(caller, f, offset, len).await?;
        if let Some((version, token)) = keep {
            let skip = offset.next_multiple_of(BLOCK) - offset;
            if let Some(rest) = data.get(skip as usize..) {
                let _ = cache.store(f.sino, version, token, offset + skip, rest);
            }
        }
        Ok(data)
    }

    /// Start fetching the next window in the background once the reader is within half a
    /// window of what has been fetched.
    fn prefetch(
        self: &Arc<Self>,
        caller: Caller,
        f: &Arc<OpenFile>,
        from: u64,
        window: u64,
        file_size: u64,
    ) {
        let start = {
            let Ok(mut st) = f.state.lock() else { return };
            if st.prefetched_to >= file_size || from + window / 2 < st.prefetched_to {
                return;
            }
            let start = st.prefetched_to.max(from);
            st.prefetched_to = (start + window).min(file_size);
            start
        };
        let (core, f) = (self.clone(), f.clone());
        tokio::spawn(async move {
            let _ = core.fill(caller, &f, start, window, true).await;
        });
    }

    /// What a write changes locally: inline copies, cached blocks, the size the kernel
    /// is shown while writes are pending. Called with the write gate held.
    fn note_write(&self, f: &OpenFile, offset: u64, data: &[u8]) {
        self.drop_inline(f.ino);
        if let Some(cache) = &self.cache
            && cache.wrote(f.sino, offset, data).is_err()
        {
            self.cache_untrusted(f.ino, f.sino, false);
        }
        self.grow_local_size(f, offset + data.len() as u64);
    }

    /// [`Core::note_write`] of bytes read from the cached copy itself (see
    /// [`Core::send_mapped_stores`]): they are not written back into it, where a map
    /// may have stored newer ones meanwhile.
    fn note_write_from_cache(&self, f: &OpenFile, offset: u64, len: u64) {
        self.drop_inline(f.ino);
        if let Some(cache) = &self.cache {
            cache.extended(f.sino, offset + len);
        }
        self.grow_local_size(f, offset + len);
    }

    /// A write queued at once, on the calling (FUSE session) thread, when nothing has to
    /// be waited for: the write gate, the window budget and the byte range are free and
    /// the connection is at hand. `None`: take the full path ([`Core::write`]).
    pub fn write_now(
        &self,
        caller: Caller,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> Option<FsResult<u32>> {
        let f = self.open_file(fh).ok()?;
        let tracker = self.tracker(f.ino).ok()?;
        if let Some(e) = f.change_error(&tracker) {
            return Some(errno(e));
        }
        let (handle, generation) = f.handle()?;
        let len = data.len();
        let end = offset + len as u64;
        let gate = tracker.gate.clone().try_read_owned().ok()?;
        let kib = (len.div_ceil(1024)).clamp(1, WRITE_WINDOW / 1024) as u32;
        let permit = tracker.budget.clone().try_acquire_many_owned(kib).ok()?;
        let range = (offset, end.max(offset + 1));
        if !tracker.try_claim(range.0, range.1) {
            return None;
        }
        let data = Bytes::copy_from_slice(data);
        let request = Request::Write {
            handle,
            offset,
            data: data.clone(),
        };
        // Counted before it is queued: its answer may come back at once.
        tracker.inflight.fetch_add(1, Ordering::SeqCst);
        // Deferred: it may go out with the next request (the commit, say).
        let sent = match self
            .client
            .try_start_deferred(Some(generation), caller, request)
        {
            Some(sent) => sent,
            None => {
                tracker.release_range(range.0, range.1);
                if tracker.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
                    tracker.done.notify_waiters();
                }
                return None;
            }
        };
        tracker.dirty.store(true, Ordering::SeqCst);
        // The gate keeps any commit out until the cache and the size know of it.
        self.note_write(&f, offset, &data);
        let spools = self.spools.get();
        tracker.record_spooling(spools, generation, Replay::Write { offset, data });
        drop(gate);
        tracker.clone().settle_later(sent, len, range, permit);
        Some(Ok(len as u32))
    }

    pub async fn write(
        &self,
        caller: Caller,
        fh: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> FsResult<u32> {
        self.write_with(caller, fh, offset, data, false).await
    }

    /// [`Core::write`]; `from_cache`: the bytes were read from the cached copy (see
    /// [`Core::note_write_from_cache`]).
    async fn write_with(
        &self,
        caller: Caller,
        fh: u64,
        offset: u64,
        data: Vec<u8>,
        from_cache: bool,
    ) -> FsResult<u32> {
        let f = self.open_file(fh)?;
        let tracker = self.tracker(f.ino)?;
        if let Some(e) = f.change_error(&tracker) {
            return errno(e);
        }
        let len = data.len();
        let end = offset + len as u64;
        // Taken before the cache sees the data: a commit must never adopt a cache that
        // holds bytes the server has not been sent yet.
        let gate = tracker.gate.clone().read_owned().await;
        if from_cache {
            self.note_write_from_cache(&f, offset, len as u64);
        } else {
            self.note_write(&f, offset, &data);
        }
        let (handle, generation) = self.ensure_handle(&f).await?;
        let kib = (len.div_ceil(1024)).clamp(1, WRITE_WINDOW / 1024) as u32;
        let permit = match tracker.budget.clone().try_acquire_many_owned(kib) {
            Ok(permit) => permit,
            Err(_) => {
                // Answers to deferred writes give permits back too.
                self.client.uncork();
                tracker
                    .budget
                    .clone()
                    .acquire_many_owned(kib)
                    .await
                    .map_err(|_| poisoned())?
            }
        };
        tracker.inflight.fetch_add(1, Ordering::SeqCst);
        tracker.dirty.store(true, Ordering::SeqCst);
        // (An overlapping write in flight may still be deferred.)
        tracker
            .claim(offset, end.max(offset + 1), || self.client.uncork())
            .await;
        let data = Bytes::from(data);
        tracker.record_spooling(
            self.spools.get(),
            generation,
            Replay::Write {
                offset,
                data: data.clone(),
            },
        );
        let req = Request::Write {
            handle,
            offset,
            data,
        };
        // Queued before `write` returns and before the gate opens: a commit queued after
        // it reaches the server after it (the server applies a handle's writes before a
        // commit that follows them).
        let sent = self.client.start_on(Some(generation), caller, req).await;
        drop(gate);
        tracker.settle_later(sent, len, (offset, end.max(offset + 1)), permit);
        Ok(len as u32)
    }

    /// `copy_file_range(2)` between two files of this mount: the server copies between
    /// the two handles, so no byte crosses the network. Into a file opened for writing it
    /// is staged like a write (the server's copy changes at close). `EXDEV` when the
    /// server cannot do it (the kernel then copies through read and write).
    pub async fn copy_range(
        &self,
        caller: Caller,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> FsResult<u32> {
        if !self.client.copies_ranges() {
            return errno(libc::EXDEV);
        }
        let src = self.open_file(fh_in)?;
        let dst = self.open_file(fh_out)?;
        if !dst.writable {
            return errno(libc::EBADF);
        }
        let len = len.min(ferry_common::MAX_COPY);
        let out = self.tracker(dst.ino)?;
        // Like a write: no commit between the cache learning of it and the server
        // having it.
        let _gate = out.gate.clone().read_owned().await;
        // Earlier writes to either file are applied first: the server runs large ones
        // concurrently with other requests.
        self.drained(&out).await;
        if src.ino != dst.ino {
            self.drained(&*self.tracker(src.ino)?).await;
        }
        if let Some(e) = dst.change_error(&out) {
            return errno(e);
        }
        let (dst_handle, generation) = self.ensure_handle(&dst).await?;
        let (src_handle, src_generation) = self.io_handle(&src).await?;
        if src_generation != generation || self.client.live_generation() != Some(generation) {
            // Handles of two connections (one opened before a reconnect), or of a lost
            // one: the kernel copies through read and write instead.
            return errno(libc::EXDEV);
        }
        out.dirty.store(true, Ordering::SeqCst);
        out.journal_broken(generation);
        // Whatever the outcome, cached bytes of the range may be stale from here on.
        self.drop_inline(dst.ino);
        if let Some(cache) = &self.cache {
            cache.overwritten(dst.sino, off_out, len);
        }
        let req = Request::CopyRange {
            src: src_handle,
            src_offset: off_in,
            dst: dst_handle,
            dst_offset: off_out,
            len,
        };
        let copied = match self.rpc_on(generation, caller, req).await? {
            Response::Written { len } => len,
            _ => return Err(TransportError::Protocol.into()),
        };
        self.stats
            .bytes_copied_on_server
            .fetch_add(u64::from(copied), Ordering::Relaxed);
        if copied > 0 {
            let end = off_out + u64::from(copied);
            if let Some(cache) = &self.cache {
                cache.extended(dst.sino, end);
            }
            self.grow_local_size(&dst, end);
        }
        Ok(copied)
    }

    /// The cache's data file for a passthrough open of `fh` (see `crate::passthrough`),
    /// with the server inode: `fh` is read-only, the file is at least
    /// [`crate::passthrough::MIN_SIZE`] long and wholly cached at the version `fh` reads,
    /// and this client has no write of it pending or open.
    pub fn passthrough_file(&self, fh: u64, pin: bool) -> Option<(std::fs::File, u64)> {
        let f = self.open_file(fh).ok()?;
        if f.writable {
            return None;
        }
        let (version, size) = {
            let st = f.state.lock().ok()?;
            (st.version, st.size)
        };
        if size < crate::passthrough::MIN_SIZE {
            return None;
        }
        let tracker = self.tracker(f.ino).ok()?;
        if self.writing(f.sino)
            || tracker.dirty.load(Ordering::SeqCst)
            || tracker.inflight.load(Ordering::SeqCst) > 0
        {
            return None;
        }
        let file = self
            .cache
            .as_ref()?
            .open_complete(f.sino, version, size, pin)?;
        Some((file, f.sino))
    }

    /// Whether an open of `ino` for reading would likely be given passthrough: the file
    /// is large enough and wholly cached, and this client is not writing it.
    pub fn may_pass_through(&self, ino: u64) -> bool {
        let sino = self.server_ino(ino);
        let Some(cache) = &self.cache else {
            return false;
        };
        !self.writing(sino)
            && cache
                .size_of(sino)
                .is_some_and(|n| n >= crate::passthrough::MIN_SIZE)
            && cache.complete(sino)
    }

    /// Passthrough of `sino` ended. With `untrusted`, a writer opened beside it, whose
    /// memory maps may have written the data file: the file leaves the cache (the next
    /// read fetches the server's bytes), and a map still writing it writes a file
    /// nobody reads.
    pub fn passthrough_unpin(&self, sino: u64, untrusted: bool) {
        if let Some(cache) = &self.cache {
            cache.unpin(sino);
            if untrusted {
                cache.invalidate(sino);
            }
        }
    }

    /// The cached copy of `ino` cannot be trusted any more (a failed commit, a change
    /// the cache could not follow): it is forgotten, and with `refill` (nothing of this
    /// client's is pending) a file read through passthrough is fetched again into its
    /// data file, whose bytes the readers see meanwhile (they may be this client's own
    /// that the server never took).
    fn cache_untrusted(&self, ino: u64, sino: u64, refill: bool) {
        let Some(cache) = &self.cache else {
            return;
        };
        cache.invalidate(sino);
        // (Not while this client's writes are pending: the server's bytes lack them.
        // The commit's own refresh comes after.)
        if !refill || !cache.pinned(sino) {
            return;
        }
        let Some(f) = self.a_reader_of(ino) else {
            return;
        };
        if let Ok(st) = f.state.lock() {
            cache.validate(sino, st.version, st.size);
        }
        self.refresh_pinned(&f);
    }

    pub fn passthrough_opened(&self) {
        self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
    }

    /// A writer beside passthrough readers may map the pinned data file of `sino`
    /// writable (see [`crate::cache::DataCache::mappable`]).
    pub fn data_file_mappable(&self, sino: u64) {
        if let Some(cache) = &self.cache {
            cache.mappable(sino);
        }
    }

    pub fn passthrough_writer_opened(&self) {
        self.stats
            .passthrough_writers
            .fetch_add(1, Ordering::Relaxed);
    }

    /// `close()` (`fsync: None`) or `fsync()` of `fh`, a writer beside passthrough
    /// readers that may have stored through a map ([`Core::send_mapped_stores`]),
    /// one at a time per inode: another close or fsync racing this one (the kernel may
    /// send them together) must not commit before the stores this one found are sent.
    pub async fn commit_with_mapped_stores(
        &self,
        caller: Caller,
        fh: u64,
        fsync: Option<bool>,
    ) -> FsResult<()> {
        let ino = self.open_file(fh)?.ino;
        let lock = self.inode_part(ino, |st| &mut st.map_sends)?;
        let _one_at_a_time = lock.lock().await;
        self.send_mapped_stores(caller, fh).await?;
        match fsync {
            None => self.flush(caller, fh).await,
            Some(datasync) => self.fsync(caller, fh, datasync).await,
        }
    }

    /// Before `fh`, a writer beside passthrough readers, commits: bytes a process stored
    /// through a shared memory map of the file (the kernel maps the cache's data file
    /// itself, see `crate::passthrough`) are written through `fh`, so the commit sends
    /// them. All the data file holds of the current version goes, since the stores'
    /// places are not known; where it holds only part of the file (this client's
    /// writes past the cached blocks, a truncate), stores elsewhere cannot be told from
    /// bytes never fetched, and this fails with `EIO` after sending what it can. A store
    /// landing while the copy is read may be missed.
    async fn send_mapped_stores(&self, caller: Caller, fh: u64) -> FsResult<()> {
        let f = self.open_file(fh)?;
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        if !f.writable || !cache.mapped_stores(f.sino) {
            return Ok(());
        }
        // A refresh still fetching a new version into the copy (after a commit, or a
        // change elsewhere) is waited for: it would leave the copy partial. (Stores a
        // map made into the parts it fetches are lost to it either way.)
        if !self.tracker(f.ino)?.dirty.load(Ordering::SeqCst) {
            self.complete_pinned(caller, f.ino).await;
        }
        let Some(crate::cache::MappedCopy {
            file,
            ranges,
            whole,
        }) = cache.take_mapped_stores(f.sino)
        else {
            return Ok(());
        };
        tracing::info!(
            ino = f.ino,
            "a shared memory map stored into a file read through passthrough: sending its cached copy"
        );
        self.stats
            .mapped_stores_sent
            .fetch_add(1, Ordering::Relaxed);
        let file = Arc::new(file);
        let chunk = u64::from(self.max_io);
        for (start, len) in ranges {
            let mut off = start;
            while off < start + len {
                let n = chunk.min(start + len - off) as usize;
                let from = file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0; n];
                    std::os::unix::fs::FileExt::read_exact_at(&*from, &mut buf, off).map(|_| buf)
                })
                .await;
                let buf = match read {
                    Ok(Ok(buf)) => buf,
                    Ok(Err(e)) => {
                        tracing::warn!("reading the cached copy a map stored into: {e}");
                        return errno(libc::EIO);
                    }
                    Err(_) => return errno(libc::EIO),
                };
                self.write_with(caller, fh, off, buf, true).await?;
                off += n as u64;
            }
        }
        if !whole {
            tracing::warn!(
                ino = f.ino,
                "a shared memory map stored into a file whose cached copy is partial: stores outside it are lost"
            );
            return errno(libc::EIO);
        }
        Ok(())
    }

    /// An open file of `ino` to fetch through, a reader's if there is one: a writer's
    /// handle may be closing (its server handle with it).
    fn a_reader_of(&self, ino: u64) -> Option<Arc<OpenFile>> {
        let open = self.open_of(ino);
        let reader = open.iter().position(|f| !f.writable).unwrap_or(0);
        open.into_iter().nth(reader)
    }

    /// Wait until the pinned data file of `ino` (read through passthrough) holds the
    /// current version whole again, fetching what is missing.
    pub async fn complete_pinned(&self, caller: Caller, ino: u64) {
        let mut off = 0;
        let mut failed = 0;
        let mut passes = 0;
        let mut last_missing = None;
        while failed < 3 {
            let Some(f) = self.a_reader_of(ino) else {
                return;
            };
            let (size, version) = match f.state.lock() {
                Ok(st) => (st.size, st.version),
                Err(_) => return,
            };
            if off >= size {
                // A piece left out (another store was still writing its blocks) is
                // fetched again: the passthrough readers must not keep the old bytes.
                let first_missing = self.cache.as_ref().and_then(|c| {
                    c.missing(f.sino, version, 0, size)
                        .first()
                        .map(|&(at, _)| at)
                });
                // (Once a pass stored nothing there, it never will: no room for it, or
                // another version. Not fetched again.)
                match first_missing {
                    Some(at) if passes < 3 && last_missing != Some(at) => {
                        passes += 1;
                        last_missing = Some(at);
                        off = at;
                        continue;
                    }
                    _ => return,
                }
            }
            // Passthrough readers read the data file itself: nothing to keep. A fill
            // through the writers' handle fails when their last close took it away
            // meanwhile: the next try reads through a reader's own.
            match self.fill(caller, &f, off, MAX_WINDOW, false).await {
                Ok(()) => off += MAX_WINDOW,
                Err(e) => {
                    tracing::debug!("refreshing a passthrough file: {e}");
                    failed += 1;
                }
            }
        }
    }

    /// `f`'s cache entry lost blocks to a new version (a change on the server, a commit
    /// of ours) while passthrough opens read its data file: fetch the whole file again,
    /// into that file, in the background. Those readers see the new bytes as they arrive;
    /// new opens read through this daemon until the entry is complete again.
    fn refresh_pinned(&self, f: &OpenFile) {
        let (Some(cache), Some(rt)) = (&self.cache, self.runtime.get()) else {
            return;
        };
        let Some(core) = self.me.upgrade() else {
            return;
        };
        if !cache.pinned(f.sino) {
            return;
        }
        let ino = f.ino;
        match self.refreshing.lock() {
            Ok(mut r) => {
                if let Some(again) = r.get_mut(&ino) {
                    *again = true;
                    return;
                }
                r.insert(ino, false);
            }
            Err(_) => return,
        }
        rt.spawn(async move {
            loop {
                core.complete_pinned(Caller::default(), ino).await;
                let Ok(mut r) = core.refreshing.lock() else {
                    return;
                };
                match r.get_mut(&ino) {
                    Some(again) if *again => *again = false,
                    _ => {
                        r.remove(&ino);
                        return;
                    }
                }
            }
        });
    }

    /// Wait for this inode's writes, then make them the file's content on the server.
    pub(super) async fn commit(&self, caller: Caller, ino: u64) -> FsResult<()> {
        let sino = self.server_ino(ino);
        let tracker = self.tracker(ino)?;
        // Every write made so far is queued once this is held, and no other starts.
        let _no_writes_meanwhile = tracker.gate.write().await;
        let mark = tracker.mark();
        if tracker.upload_lost() {
            tracker.dirty.store(false, Ordering::SeqCst);
            self.drained(&tracker).await;
            return self.upload_failed(ino, sino, &tracker, FsError::Errno(libc::EIO));
        }
        if !tracker.dirty.swap(false, Ordering::SeqCst) {
            self.drained(&tracker).await;
            return self.clean_commit(ino, sino, &tracker, mark);
        }
        for again in [false, true] {
            let live = self.client.live_generation();
            let Some((mut handle, mut generation)) = self.writer_pair(ino)? else {
                self.drained(&tracker).await;
                return errno(libc::EIO);
            };
            if again || tracker.needs_replay(live, Some(generation)) {
                // Changes went through a handle, or the writer's handle is one, of a
                // connection that is gone, and what it staged went with it.
                self.drained(&tracker).await;
                if let Some(e) = tracker.take_error() {
                    // What the dead handle staged is gone: not one of the server's
                    // refusals, after which the changes are dropped and done with.
                    return self.upload_failed(ino, sino, &tracker, FsError::Errno(e));
                }
                if !tracker.replayable() {
                    return self.upload_failed(ino, sino, &tracker, FsError::Errno(libc::EIO));
                }
                match self.replay(caller, ino, sino, &tracker).await {
                    Ok(staged) => (handle, generation) = staged.pair,
                    Err(e) => return self.upload_failed(ino, sino, &tracker, e),
                }
            }
            // Sent behind the writes without waiting for their answers: the server
            // applies them first and refuses the commit if one of them failed.
            let committed = async {
                self.client
                    .start_on(Some(generation), caller, Request::Commit { handle })
                    .await?
                    .reply()
                    .await
            };
            let (committed, ()) = tokio::join!(committed, self.drained(&tracker));
            match committed {
                // Lost on the way: it may or may not have run; running it again on
                // the same changes gives the same content.
                Err(e) if !again && tracker.replayable() => {
                    tracing::debug!("connection lost under a commit ({e}); sending it again");
                }
                committed => return self.commit_done(ino, sino, &tracker, committed, mark),
            }
        }
        errno(libc::EIO)
    }

    /// Send again, through a new staged handle on the live connection (connecting if
    /// need be), every change of `ino` made since its last commit: the writers' handle
    /// and what it staged went with the connection it was opened on. Every writer of
    /// `ino` moves to the new handle, which is returned (unless a writable open
    /// installed one of its own meanwhile: that one stays the writers', and the new
    /// handle is closed with the last writer). The handle's file must still be `sino`
    /// (`ESTALE` otherwise: the name leads to another file now). Called with the
    /// inode's write gate held and its writes drained.
    async fn replay(
        &self,
        caller: Caller,
        ino: u64,
        sino: u64,
        tracker: &WriteTracker,
    ) -> FsResult<Staged> {
        let before = self.inodes()?.get(&ino).and_then(|s| s.writer);
        if before.is_some_and(|w| w.sync) {
            // Its writes were made durable one by one; a staged copy would not be.
            return errno(libc::EIO);
        }
        let Kept { ops, spool, .. } = tracker.journal_ops().ok_or(FsError::Errno(libc::EIO))?;
        let path = self.path(ino)?;
        let generation = self.client.connect().await?;
        let mut reply = None;
        // Read-write if allowed, as `open` does; a file the caller may only write
        // (created 0200, or 0444 by a process that holds it open) otherwise.
        for flags in [libc::O_RDWR, libc::O_WRONLY] {
            let req = Request::Open {
                path: path.clone(),
                flags,
                inline_max: 0,
                staged: true,
            };
            match self.rpc_on(generation, caller, req).await {
                Err(FsError::Errno(libc::EACCES | libc::EPERM)) if flags == libc::O_RDWR => {}
                r => {
                    reply = Some(r?);
                    break;
                }
            }
        }
        let (handle, attr) = match reply {
            Some(
                Response::Opened { handle, attr } | Response::OpenedWithData { handle, attr, .. },
            ) => (handle, attr),
            _ => return Err(TransportError::Protocol.into()),
        };
        let count = ops.len();
        let sent = async {
            if attr.ino != sino {
                return errno(libc::ESTALE);
            }
            self.send_again(caller, handle, generation, ops, spool)
                .await
        }
        .await;
        if let Err(e) = sent {
            let _ = self
                .rpc_on(generation, caller, Request::Release { handle })
                .await;
            return Err(e);
        }
        let pair = (handle, generation);
        let moved = {
            let mut inodes = self.inodes()?;
            let st = inodes.entry(ino).or_default();
            let now = st.writer.map(|w| w.pair());
            if now == before.map(|w| w.pair()) {
                let old = st
                    .writer
                    .replace(Writer::new(handle, generation, attr.size));
                if let Some(old) =
                    old.filter(|w| self.client.live_generation() == Some(w.generation))
                {
                    st.retired.push(old.pair());
                }
                true
            } else {
                // A writable open installed its own handle meanwhile: the writers are
                // on it already. This one is committed, then closed with them.
                st.retired.push(pair);
                false
            }
        };
        if moved {
            for f in self.open_of(ino).iter().filter(|f| f.writable) {
                f.state.lock().map_err(|_| poisoned())?.handle = Some(pair);
            }
        }
        // A writable open may have staged its O_TRUNC on the handle just retired and
        // kept it after the copy above was taken (it does not wait for the write gate
        // held here): sent too. (Sent twice at worst: each change is idempotent.)
        let late = tracker.journal_ops_from(count).unwrap_or_default();
        let sent = count + late.ops.len();
        if !late.ops.is_empty() {
            self.send_again(caller, handle, generation, late.ops, late.spool)
                .await?;
        }
        self.stats.uploads_replayed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            ino,
            "sent a file's uncommitted changes again after a reconnect"
        );
        Ok(Staged {
            pair,
            moved,
            sent,
            offered: late.offered,
        })
    }

    /// `ops` through `handle`, pipelined ([`WRITE_WINDOW`] bytes in flight at most), but
    /// a change never overtakes one it overlaps or follows: the server runs requests of
    /// one handle concurrently. Spooled data is read from `spool` as it is sent.
    async fn send_again(
        &self,
        caller: Caller,
        handle: u64,
        generation: u64,
        ops: Vec<Replay>,
        spool: Option<SpoolReader>,
    ) -> FsResult<()> {
        let chunk = u64::from(self.max_io);
        let mut ops = std::collections::VecDeque::from(ops);
        let mut inflight: Vec<(u64, u64)> = Vec::new();
        let mut inflight_bytes = 0u64;
        let mut replies = FuturesUnordered::new();
        while let Some(op) = ops.pop_front() {
            let op = match op {
                Replay::Spooled { offset, at, len } => {
                    let n = chunk.min(len);
                    if n < len {
                        ops.push_front(Replay::Spooled {
                            offset: offset + n,
                            at: at + n,
                            len: len - n,
                        });
                    }
                    let data = spool
                        .as_ref()
                        .ok_or(FsError::Errno(libc::EIO))?
                        .read(at, n)
                        .map_err(|e| {
                            tracing::warn!("reading back spooled writes: {e}");
                            FsError::Errno(libc::EIO)
                        })?;
                    Replay::Write {
                        offset,
                        data: Bytes::from(data),
                    }
                }
                op => op,
            };
            let (req, range) = match op {
                Replay::Write { offset, data } => {
                    let end = offset + data.len() as u64;
                    let req = Request::Write {
                        handle,
                        offset,
                        data,
                    };
                    (req, Some((offset, end)))
                }
                Replay::Truncate(size) => {
                    let set = SetAttr {
                        size: Some(size),
                        ..SetAttr::default()
                    };
                    (Self::set_through(handle, set), None)
                }
                Replay::Attrs(set) => (Self::set_through(handle, set), None),
                Replay::Spooled { .. } => return errno(libc::EIO),
            };
            let want = match &req {
                Request::Write { data, .. } => Some(data.len()),
                _ => None,
            };
            let size = want.unwrap_or(0) as u64;
            let span = range.unwrap_or((0, u64::MAX));
            // Wait for answers until this one may go.
            while inflight.iter().any(|&(a, b)| a < span.1 && span.0 < b)
                || (inflight_bytes + size > WRITE_WINDOW as u64 && !inflight.is_empty())
            {
                let Some((done, n, r)) = replies.next().await else {
                    break;
                };
                if let Some(i) = inflight.iter().position(|&x| x == done) {
                    inflight.swap_remove(i);
                }
                inflight_bytes -= n;
                Self::replayed(r)?;
            }
            inflight.push(span);
            inflight_bytes += size;
            replies.push(async move {
                (
                    span,
                    size,
                    (want, self.rpc_on(generation, caller, req).await),
                )
            });
        }
        while let Some((_, _, r)) = replies.next().await {
            Self::replayed(r)?;
        }
        Ok(())
    }

    fn set_through(handle: u64, set: SetAttr) -> Request {
        Request::SetAttr {
            path: RelPath::root(),
            handle: Some(handle),
            set,
        }
    }

    /// One answer of [`Core::replay`]: a write must have been taken whole.
    fn replayed((want, reply): (Option<usize>, FsResult<Response>)) -> FsResult<()> {
        match (want, reply?) {
            (Some(n), Response::Written { len }) if len as usize == n => Ok(()),
            (Some(_), _) => errno(libc::EIO),
            (None, _) => Ok(()),
        }
    }

    /// [`Core::commit`] for the `close` of a writer on the FUSE session thread, when
    /// nothing has to be waited for before the commit is queued (the write gate free,
    /// the connection at hand): `done` runs with the outcome, on the connection's reader
    /// once the server answers, or here. `Err(done)`: nothing was done, take
    /// [`Core::flush`].
    pub fn flush_writer_now<F>(&self, caller: Caller, fh: u64, done: F) -> Result<(), F>
    where
        F: FnOnce(FsResult<()>) + Send + 'static,
    {
        let (Ok(f), Some(me)) = (self.open_file(fh), self.me.upgrade()) else {
            return Err(done);
        };
        if !f.writable {
            done(Ok(()));
            return Ok(());
        }
        let Ok(tracker) = self.tracker(f.ino) else {
            return Err(done);
        };
        if f.lost_changes(&tracker) {
            done(errno(libc::EIO));
            return Ok(());
        }
        if tracker.upload_lost() {
            return Err(done);
        }
        let Ok(gate) = tracker.gate.clone().try_write_owned() else {
            return Err(done);
        };
        let mark = tracker.mark();
        let (ino, sino) = (f.ino, f.sino);
        if !tracker.dirty.load(Ordering::SeqCst) {
            if tracker.inflight.load(Ordering::SeqCst) > 0 {
                return Err(done);
            }
            done(self.clean_commit(ino, sino, &tracker, mark));
            return Ok(());
        }
        let Ok(Some((handle, generation))) = self.writer_pair(ino) else {
            return Err(done);
        };
        if tracker.needs_replay(self.client.live_generation(), Some(generation)) {
            // Its changes are sent again first (`Core::commit`).
            return Err(done);
        }
        let commit = Request::Commit { handle };
        let Some(Ok(sent)) = self.client.try_start_on(Some(generation), caller, commit) else {
            return Err(done);
        };
        // Queued under the gate: every write before it is ahead of it on the wire.
        tracker.dirty.store(false, Ordering::SeqCst);
        sent.then(move |committed| {
            if committed.is_err()
                && let Some(rt) = me.runtime.get().cloned()
                && tracker.commit_lost()
            {
                // The connection went with the commit: the changes are sent again
                // and committed on a new one (`Core::commit`).
                tracker.dirty.store(true, Ordering::SeqCst);
                drop(gate);
                rt.spawn(async move { done(me.commit(caller, ino).await) });
                return;
            }
            // The writes' answers come before the commit's; should one still be out
            // (the connection lost: handlers run in any order), wait for it elsewhere.
            if tracker.inflight.load(Ordering::SeqCst) == 0 {
                done(me.commit_done(ino, sino, &tracker, committed, mark));
                drop(gate);
            } else if let Some(rt) = me.runtime.get().cloned() {
                rt.spawn(async move {
                    me.drained(&tracker).await;
                    done(me.commit_done(ino, sino, &tracker, committed, mark));
                    drop(gate);
                });
            } else {
                // Shutting down: nowhere to wait.
                done(errno(libc::EIO));
            }
        });
        Ok(())
    }

    /// The end of a commit that had nothing to send: report a write that failed.
    fn clean_commit(
        &self,
        ino: u64,
        sino: u64,
        tracker: &WriteTracker,
        mark: JournalMark,
    ) -> FsResult<()> {
        if tracker.upload_lost() {
            return self.upload_failed(ino, sino, tracker, FsError::Errno(libc::EIO));
        }
        if let Some(e) = tracker.take_error() {
            return self.commit_failed(ino, sino, tracker, e, mark);
        }
        self.settle(ino, tracker)?;
        tracker.journal_committed(mark);
        self.committed(ino)
    }

    /// The server's answer to a commit, every write before it answered too.
    fn commit_done(
        &self,
        ino: u64,
        sino: u64,
        tracker: &WriteTracker,
        committed: Result<Result<Response, i32>, TransportError>,
        mark: JournalMark,
    ) -> FsResult<()> {
        if let Some(e) = tracker.take_error() {
            return self.commit_failed(ino, sino, tracker, e, mark);
        }
        let committed = match committed {
            Ok(Ok(r)) => Ok(self.unwrap_reply(r)),
            Ok(Err(e)) => errno(e),
            Err(e) => Err(e.into()),
        };
        let attr = match committed {
            Ok(r) => Self::expect_attr(r)?,
            Err(FsError::Errno(e)) => return self.commit_failed(ino, sino, tracker, e, mark),
            Err(e) => return self.upload_failed(ino, sino, tracker, e),
        };
        self.settle(ino, tracker)?;
        tracker.journal_committed(mark);
        self.committed(ino)?;
        if let Some(cache) = &self.cache {
            cache.adopt(sino, attr.version, attr.size);
        }
        if let Some(parent) = self.nodes()?.parent_of(ino) {
            self.dir_changed(parent);
        }
        if let Some(f) = self.move_open_files(ino, &attr, false) {
            self.refresh_pinned(&f);
        }
        self.note_attr_unseen(attr);
        // Not kept: after a commit the next open reads through the data cache, which is
        // exact by construction, rather than trusting pages the kernel filled during writes.
        self.inodes()?.entry(ino).or_default().kernel_version = None;
        Ok(())
    }

    /// The commit failed, or could not be sent: what the server has is what it had.
    fn upload_failed(
        &self,
        ino: u64,
        sino: u64,
        tracker: &WriteTracker,
        e: FsError,
    ) -> FsResult<()> {
        self.cache_untrusted(ino, sino, true);
        self.settle(ino, tracker)?;
        tracker.journal_failed();
        Err(e)
    }

    /// A write of the commit failed: the server never applies a failed handle's staged
    /// data, so the old copy stands.
    fn commit_failed(
        &self,
        ino: u64,
        sino: u64,
        tracker: &WriteTracker,
        e: i32,
        mark: JournalMark,
    ) -> FsResult<()> {
        self.cache_untrusted(ino, sino, true);
        tracker.dirty.store(false, Ordering::SeqCst);
        self.settle(ino, tracker)?;
        tracker.journal_committed(mark);
        errno(e)
    }

    /// An attribute change (times, mode; not the size or the owner) of a file this
    /// client has open for writing with writes not yet committed, as `tar` makes before
    /// every close (`fchmod`, `futimens`): answered at once from the attributes we hold,
    /// and sent behind the writes before it; a failure is reported by the next write,
    /// fsync or close, like a write's. (The kernel has checked the caller's permission
    /// for the change already.) `None` when it cannot be done that way (the caller sets
    /// them synchronously).
    pub(super) async fn attrs_behind(
        &self,
        caller: Caller,
        ino: u64,
        set: &SetAttr,
    ) -> FsResult<Option<Attr>> {
        let Some(tracker) = self.behind_candidate(ino, set)? else {
            return Ok(None);
        };
        // Held until the request is queued: no write or commit of this inode is queued
        // between the writes before it and it.
        let gate = tracker.gate.clone().write_owned().await;
        let Some((generation, request, attr)) = self.behind_request(ino, set)? else {
            return Ok(None);
        };
        let sent = self
            .client
            .start_on(Some(generation), caller, request)
            .await;
        self.attrs_queued(ino, set, &tracker, gate, (generation, attr), sent)
            .map(Some)
    }

    /// [`Core::attrs_behind`] on the FUSE session thread: `None` also when it would
    /// have to wait (the write gate or the connection busy).
    pub fn setattr_now(&self, caller: Caller, ino: u64, set: &SetAttr) -> Option<FsResult<Attr>> {
        self.runtime.get()?;
        let tracker = match self.behind_candidate(ino, set) {
            Ok(Some(t)) => t,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        let gate = tracker.gate.clone().try_write_owned().ok()?;
        let (generation, request, attr) = match self.behind_request(ino, set) {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        let sent = self
            .client
            .try_start_deferred(Some(generation), caller, request)?;
        Some(self.attrs_queued(ino, set, &tracker, gate, (generation, attr), sent))
    }

    /// A change of times or mode just made on the server (by path) while this client
    /// has uncommitted changes of `ino`: kept with them, so that a commit that has to
    /// send them again applies it after them once more (it would otherwise stamp the
    /// time of its own last write, and `tar`'s `futimens` before `close` would be lost
    /// when the connection was). Harmless otherwise: a commit drops it.
    ///
    /// `generation`: the connection of the writers' handle when the change was
    /// decided on (a restage meanwhile must not count it as sent through the new one).
    pub(super) fn keep_attrs_for_replay(&self, ino: u64, set: &SetAttr, generation: Option<u64>) {
        let (Ok(tracker), Some(generation)) = (self.tracker(ino), generation) else {
            return;
        };
        let attrs = SetAttr {
            mode: set.mode,
            atime: set.atime,
            mtime: set.mtime,
            ..SetAttr::default()
        };
        if attrs != SetAttr::default() && tracker.dirty.load(Ordering::SeqCst) {
            tracker.record(generation, Replay::Attrs(attrs));
        }
    }

    /// Whether `set` on `ino` may be queued behind this client's uncommitted writes:
    /// their tracker if so (checked again under the gate by `behind_request`).
    fn behind_candidate(&self, ino: u64, set: &SetAttr) -> FsResult<Option<Arc<WriteTracker>>> {
        // Not the owner: a server that may not give the file away (not root, or root
        // squashed) refuses it, and that refusal belongs to `fchown`, not to `close`.
        let anything = set.mode.is_some() || set.atime.is_some() || set.mtime.is_some();
        let owner = set.uid.is_some() || set.gid.is_some();
        // (The kernel names no handle for futimens: any writer of ours will do, the
        // ordering that matters is behind this client's writes to the inode.)
        if set.size.is_some() || owner || !anything || !self.client.events_live() {
            return Ok(None);
        }
        // (A writer of a lost connection does not do: the change goes by path now,
        // and is kept to be applied again after the writes, `keep_attrs_for_replay`.)
        if self.shared_writer(ino)?.is_none() {
            return Ok(None);
        }
        let tracker = self.tracker(ino)?;
        // Only with writes not yet committed: their close (or fsync) is what reports a
        // failure. Otherwise (also right after a close, its release still on the way)
        // the change must be on the server when the call returns.
        if !tracker.dirty.load(Ordering::SeqCst) && tracker.inflight.load(Ordering::SeqCst) == 0 {
            return Ok(None);
        }
        if let Some(e) = tracker.peek_error() {
            return errno(e);
        }
        Ok(Some(tracker))
    }

    /// Under the write gate: the request that sets `set` behind the writes, if there are
    /// still writes to queue it behind (a close may have committed and released the
    /// handle meanwhile) and attributes to answer from: (connection generation, request,
    /// the attributes the change applies to).
    fn behind_request(&self, ino: u64, set: &SetAttr) -> FsResult<Option<(u64, Request, Attr)>> {
        let tracker = self.tracker(ino)?;
        let still_writing =
            tracker.dirty.load(Ordering::SeqCst) || tracker.inflight.load(Ordering::SeqCst) > 0;
        let Some((handle, generation)) = self.shared_writer(ino)? else {
            return Ok(None);
        };
        let known = self
            .inodes()?
            .get(&ino)
            .and_then(|st| st.behind.as_deref().copied().or(st.attr.map(|(a, _)| a)));
        let (true, Some(attr)) = (still_writing, known) else {
            return Ok(None);
        };
        let request = Request::SetAttr {
            path: RelPath::root(),
            handle: Some(handle),
            set: set.clone(),
        };
        Ok(Some((generation, request, attr)))
    }

    /// The change is queued (or failed to be, which the close will report like a failed
    /// write): answer it from the attributes we hold.
    fn attrs_queued(
        &self,
        ino: u64,
        set: &SetAttr,
        tracker: &Arc<WriteTracker>,
        gate: tokio::sync::OwnedRwLockWriteGuard<()>,
        (generation, mut attr): (u64, Attr),
        sent: Result<crate::conn::Sent, TransportError>,
    ) -> FsResult<Attr> {
        match sent {
            Ok(sent) => {
                // Queued behind every write before it (the gate is held), ahead of any
                // later write or commit; the server applies it after those writes.
                tracker.inflight.fetch_add(1, Ordering::SeqCst);
                let t = tracker.clone();
                tracker.record(generation, Replay::Attrs(set.clone()));
                sent.then(move |outcome| {
                    match outcome {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => t.fail(e),
                        Err(e) => t.lost_or_fail(e),
                    }
                    if t.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
                        t.done.notify_waiters();
                    }
                });
            }
            Err(e) => {
                tracker.record(generation, Replay::Attrs(set.clone()));
                tracker.lost_or_fail(e);
            }
        }
        drop(gate);
        let local_size = self.inodes()?.get(&ino).and_then(|st| st.local_size);
        let now = {
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            ferry_common::proto::Timespec {
                sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nsec: d.subsec_nanos(),
            }
        };
        let at = |t: ferry_common::proto::TimeSet| match t {
            ferry_common::proto::TimeSet::Now => now,
            ferry_common::proto::TimeSet::At(t) => t,
        };
        if let Some(t) = set.atime {
            attr.atime = at(t);
        }
        if let Some(t) = set.mtime {
            attr.mtime = at(t);
        }
        if let Some(mode) = set.mode {
            attr.perm = (mode & 0o7777) as u16;
        }
        attr.ctime = now;
        if let Some(size) = local_size {
            attr.size = size;
        }
        // What the server will report differs (ctime, a `Now` time): the kernel asks again
        // once the commit brings the real attributes; further changes start from these.
        self.forget_attr(ino);
        if let Some(st) = self.inodes()?.get_mut(&ino) {
            st.behind = Some(Box::new(attr));
        }
        Ok(attr)
    }

    /// The server truncated `ino` to nothing in the stage of this client's write handle
    /// (an `O_TRUNC` open): the next close must commit even if nothing is written.
    fn truncated_in_stage(&self, ino: u64, sino: u64, generation: u64) -> FsResult<()> {
        self.drop_inline(ino);
        let tracker = self.tracker(ino)?;
        tracker.dirty.store(true, Ordering::SeqCst);
        tracker.record(generation, Replay::Truncate(0));
        self.inodes()?.entry(ino).or_default().local_size = Some(0);
        if let Some(cache) = &self.cache {
            cache.truncated(sino, 0);
        }
        Ok(())
    }

    /// ftruncate(2), or the `O_TRUNC` of an open that joins this client's write handle:
    /// through that handle, so the server stages it like a write and the real file keeps
    /// its content until the commit at close (a failure before it loses nothing).
    /// `None` when this client has no write handle on `ino`.
    async fn truncate_staged(&self, caller: Caller, ino: u64, size: u64) -> FsResult<Option<Attr>> {
        let Some((handle, generation)) = self.shared_writer(ino)? else {
            return Ok(None);
        };
        let tracker = self.tracker(ino)?;
        // Like a write: a commit cannot run between the cache learning of it and the
        // server having it, and earlier writes land first.
        let _gate = tracker.gate.clone().read_owned().await;
        self.drained(&tracker).await;
        if let Some(e) = tracker.peek_error() {
            return errno(e);
        }
        tracker.dirty.store(true, Ordering::SeqCst);
        self.drop_inline(ino);
        if let Some(cache) = &self.cache {
            cache.truncated(self.server_ino(ino), size);
        }
        self.inodes()?.entry(ino).or_default().local_size = Some(size);
        let req = Request::SetAttr {
            path: RelPath::root(),
            handle: Some(handle),
            set: SetAttr {
                size: Some(size),
                ..SetAttr::default()
            },
        };
        let attr = Self::expect_attr(self.rpc_on(generation, caller, req).await?)?;
        // (Kept once done: one that failed was reported to `ftruncate` itself.)
        tracker.record(generation, Replay::Truncate(size));
        Ok(Some(attr))
    }

    /// Truncate (or extend) `ino`. Through an open descriptor (ftruncate) it is staged
    /// with the writes; by path (truncate(2)) it applies on the server right away, as
    /// locally: pending writes are committed first, then the size is set on the real file.
    pub(super) async fn truncate(
        &self,
        caller: Caller,
        ino: u64,
        fh: Option<u64>,
        size: u64,
    ) -> FsResult<Attr> {
        // `ftruncate` through a descriptor that lost its changes fails like its writes.
        if let Some(f) = fh.and_then(|fh| self.open_file(fh).ok())
            && f.lost_changes(&*self.tracker(ino)?)
        {
            return errno(libc::EIO);
        }
        if fh.is_some()
            && let Some(attr) = self.truncate_staged(caller, ino, size).await?
        {
            return Ok(attr);
        }
        self.commit(caller, ino).await?;
        let set = SetAttr {
            size: Some(size),
            ..SetAttr::default()
        };
        let attr = match self.path(ino) {
            Ok(path) => Self::expect_attr(
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
            Err(e) => {
                // Unlinked but open: only a handle reaches it (the server stages this one).
                let f = fh.and_then(|fh| self.open_file(fh).ok()).ok_or(e)?;
                let (handle, generation) = self.io_handle(&f).await?;
                let req = Request::SetAttr {
                    path: RelPath::root(),
                    handle: Some(handle),
                    set,
                };
                Self::expect_attr(self.rpc_on(generation, caller, req).await?)?
            }
        };
        if let Some(st) = self.inodes()?.get_mut(&ino)
            && st.local_size.is_some()
        {
            st.local_size = Some(size);
        }
        self.drop_inline(ino);
        if let Some(cache) = &self.cache {
            let sino = self.server_ino(ino);
            if cache.pinned(sino) {
                // Read through passthrough: the readers' file is cut and refilled in
                // place, as for a change on the server, and lengthened at once (the new
                // bytes are zeros; a map of it must not fault past its old end).
                self.changed_on_server(ino, &attr);
                cache.lengthen_pinned(sino, size.min(attr.size));
            } else {
                cache.invalidate(sino);
            }
        }
        if let Some(parent) = self.nodes()?.parent_of(ino) {
            self.dir_changed(parent);
        }
        Ok(attr)
    }

    /// The writer of `ino` has had a commit (see [`Core::claim_writer`]).
    fn committed(&self, ino: u64) -> FsResult<()> {
        if let Some(w) = self.inodes()?.get_mut(&ino).and_then(|s| s.writer.as_mut()) {
            w.committed = true;
        }
        Ok(())
    }

    /// No writes pending any more: attributes come from the server again.
    fn settle(&self, ino: u64, tracker: &WriteTracker) -> FsResult<()> {
        if let Some(st) = self.inodes()?.get_mut(&ino) {
            st.behind = None;
            if tracker.inflight.load(Ordering::SeqCst) == 0 {
                st.local_size = None;
            }
        }
        Ok(())
    }

    /// `close()` of a descriptor: the data is on the server when this returns Ok.
    pub async fn flush(&self, caller: Caller, fh: u64) -> FsResult<()> {
        let f = self.open_file(fh)?;
        if !f.writable {
            return Ok(());
        }
        // Its changes are gone: nothing of the others' may be committed in its name.
        if f.lost_changes(&*self.tracker(f.ino)?) {
            return errno(libc::EIO);
        }
        self.commit(caller, f.ino).await
    }

    pub async fn fsync(&self, caller: Caller, fh: u64, datasync: bool) -> FsResult<()> {
        let f = self.open_file(fh)?;
        if f.lost_changes(&*self.tracker(f.ino)?) {
            return errno(libc::EIO);
        }
        self.commit(caller, f.ino).await?;
        if f.writable
            && let Some((handle, generation)) = self.shared_writer(f.ino)?
        {
            self.rpc_on(generation, caller, Request::Fsync { handle, datasync })
                .await?;
        }
        Ok(())
    }

    pub async fn fallocate(
        &self,
        caller: Caller,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> FsResult<()> {
        let f = self.open_file(fh)?;
        if f.lost_changes(&*self.tracker(f.ino)?) {
            return errno(libc::EIO);
        }
        self.commit(caller, f.ino).await?;
        let (handle, generation) = self.io_handle(&f).await?;
        self.tracker(f.ino)?.journal_broken(generation);
        self.rpc_on(
            generation,
            caller,
            Request::Fallocate {
                handle,
                offset,
                len,
                mode,
            },
        )
        .await?;
        self.drop_inline(f.ino);
        let pending = self.tracker(f.ino)?.dirty.load(Ordering::SeqCst);
        self.cache_untrusted(f.ino, f.sino, !pending);
        self.forget_attr(f.ino);
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0
            && let Some(st) = self.inodes()?.get_mut(&f.ino)
            && let Some(size) = st.local_size
        {
            st.local_size = Some(size.max(offset + len));
        }
        Ok(())
    }

    pub async fn release(&self, caller: Caller, fh: u64) -> FsResult<()> {
        let f = self.open_file(fh)?;
        let others = self.closing_writer(&f)?;
        let result = if f.writable && !others {
            self.commit(caller, f.ino).await
        } else {
            Ok(())
        };
        for (handle, generation) in self.released(fh, &f)? {
            match self
                .rpc_on(generation, caller, Request::Release { handle })
                .await
            {
                // The connection that held the handle is gone, and the server dropped it.
                Err(FsError::Transport(TransportError::StaleHandle)) | Ok(_) => {}
                Err(e) => tracing::debug!("release: {e}"),
            }
        }
        self.schedule_persist();
        result
    }

    /// [`Core::release`] of a writer on the FUSE session thread, when its commit has
    /// nothing to send (as after a `close` that committed): `None` when it has, or must
    /// wait for the write gate or a write in flight. The handles it closes are closed in
    /// the background.
    pub fn release_writer_now(&self, caller: Caller, fh: u64) -> Option<FsResult<()>> {
        let rt = self.runtime.get()?;
        let f = self.open_file(fh).ok()?;
        if !f.writable {
            return None;
        }
        let tracker = self.tracker(f.ino).ok()?;
        let gate = tracker.gate.clone().try_write_owned().ok()?;
        if tracker.dirty.load(Ordering::SeqCst) || tracker.inflight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let mark = tracker.mark();
        let result = match self.closing_writer(&f) {
            Ok(false) => self.clean_commit(f.ino, f.sino, &tracker, mark),
            Ok(true) => Ok(()),
            Err(e) => return Some(Err(e)),
        };
        drop(gate);
        let to_release = match self.released(fh, &f) {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        for (handle, generation) in to_release {
            self.release_in_background(rt, caller, handle, generation);
        }
        self.schedule_persist();
        Some(result)
    }

    /// Close server handle `handle` without waiting: nobody needs the answer (a
    /// refusal only means the handle is gone already).
    fn release_in_background(
        &self,
        rt: &tokio::runtime::Handle,
        caller: Caller,
        handle: u64,
        generation: u64,
    ) {
        let release = Request::Release { handle };
        match self
            .client
            .try_start_deferred(Some(generation), caller, release.clone())
        {
            Some(Ok(sent)) => sent.then(|_| {}),
            // The connection that held the handle is gone, and the server dropped it.
            Some(Err(_)) => {}
            // No connection at hand without waiting.
            None => {
                let client = self.client.clone();
                rt.spawn(async move {
                    let _ = client.call_on(Some(generation), caller, release).await;
                });
            }
        }
    }

    /// A descriptor of `f` is being released: whether other writers of its inode stay
    /// open (they commit at their own close; a `RELEASE` that arrives late, after a
    /// `close` that committed, must not commit their writes early). Of writers released
    /// at once, the last to start commits. Counts this one as closing.
    fn closing_writer(&self, f: &OpenFile) -> FsResult<bool> {
        if !f.writable {
            return Ok(false);
        }
        let mut inodes = self.inodes()?;
        let st = inodes.entry(f.ino).or_default();
        st.closing += 1;
        Ok(st.writers.saturating_sub(st.closing) > 0)
    }

    /// Forget descriptor `fh` of `f`: the server handles to close now (the last writer
    /// closes the shared one and any it replaced).
    fn released(&self, fh: u64, f: &OpenFile) -> FsResult<Vec<(u64, u64)>> {
        self.files.lock().map_err(|_| poisoned())?.remove(&fh);
        let mut to_release = Vec::new();
        if f.writable {
            let mut inodes = self.inodes()?;
            if let Some(st) = inodes.get_mut(&f.ino) {
                st.writers = st.writers.saturating_sub(1);
                st.closing = st.closing.saturating_sub(1);
                if st.writers == 0 {
                    to_release.extend(st.writer.take().map(|w| w.pair()));
                    to_release.append(&mut st.retired);
                }
            }
        } else {
            let mut st = f.state.lock().map_err(|_| poisoned())?;
            st.released = true;
            to_release.extend(st.handle.take());
        }
        if let Some(cache) = &self.cache
            && !self
                .files
                .lock()
                .map_err(|_| poisoned())?
                .values()
                .any(|o| o.ino == f.ino)
        {
            // Kept pieces answer reads of open files only.
            cache.forget_kept(f.sino);
        }
        Ok(to_release)
    }

    /// Write the cache metadata back soon: at most once a second (and at unmount), so
    /// closing 5,000 small files does not rewrite it 5,000 times.
    fn schedule_persist(&self) {
        let (Some(cache), Some(rt)) = (&self.cache, self.runtime.get()) else {
            return;
        };
        if self.persist_due.swap(true, Ordering::SeqCst) {
            return;
        }
        let (cache, due) = (cache.clone(), self.persist_due.clone());
        rt.spawn(async move {
            tokio::time::sleep(PERSIST_EVERY).await;
            due.store(false, Ordering::SeqCst);
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = cache.persist() {
                    tracing::warn!("cannot save cache metadata: {e}");
                }
            })
            .await;
        });
    }

    /// `close` of a read-only descriptor: nothing to wait for, answered on the calling
    /// (FUSE session) thread. `false` for a writer (see [`Core::flush`]).
    pub fn flush_now(&self, fh: u64) -> bool {
        self.open_file(fh).is_ok_and(|f| !f.writable)
    }

    /// The last reference to a read-only descriptor went away: forgotten at once, its
    /// server handle closed in the background. `false`: take [`Core::release`].
    pub fn release_now(&self, caller: Caller, fh: u64) -> bool {
        let Some(rt) = self.runtime.get() else {
            return false;
        };
        let Ok(f) = self.open_file(fh) else {
            return false;
        };
        if f.writable {
            return false;
        }
        let Ok(to_release) = self.released(fh, &f) else {
            return false;
        };
        for (handle, generation) in to_release {
            self.release_in_background(rt, caller, handle, generation);
        }
        self.schedule_persist();
        true
    }
}

/// Attributes for a reply that did not ask the server (only `ino`, version and size matter
/// to the caller; the kernel keeps its own cached attributes).
pub(super) fn lazy_attr(ino: u64, version: u64, size: u64) -> Attr {
    Attr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: Default::default(),
        mtime: Default::default(),
        ctime: Default::default(),
        kind: ferry_common::proto::FileKind::File,
        perm: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        version,
        xattrs: ferry_common::proto::XATTRS_UNKNOWN,
        uncovered: false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fills_at_once_split_the_blocks_and_wait_for_each_other() {
        let fetching = Fetching::default();
        let (first, others) = fetching.claim(|| vec![(0, 4 * BLOCK)]);
        let first = first.unwrap();
        assert!(others.is_empty());
        assert_eq!(first.ranges, vec![(0, 4 * BLOCK)]);
        // Overlapping the first: only the blocks nobody fetches are claimed.
        let (second, others) = fetching.claim(|| vec![(2 * BLOCK, 4 * BLOCK), (8 * BLOCK, BLOCK)]);
        let second = second.unwrap();
        assert_eq!(
            second.ranges,
            vec![(4 * BLOCK, 2 * BLOCK), (8 * BLOCK, BLOCK)]
        );
        assert_eq!(others.len(), 1);
        // All of it in flight: nothing to claim, two fetches to wait for.
        let (third, waits) = fetching.claim(|| vec![(0, 6 * BLOCK), (8 * BLOCK, BLOCK)]);
        assert!(third.is_none());
        assert_eq!(waits.len(), 2);
        let waiting = tokio::spawn(async move {
            for w in waits {
                let _ = w.acquire().await;
            }
        });
        drop(first);
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        // Ended fetches are forgotten: the blocks can be claimed again.
        let (again, others) = fetching.claim(|| vec![(0, BLOCK)]);
        assert!(again.is_some() && others.is_empty());
    }

    /// Past what memory keeps, written data goes to the spool: a sequential stream as
    /// one entry, scattered writes as one entry each; all of it read back in order.
    #[test]
    fn the_journal_spools_what_memory_does_not_keep() {
        let dir = tempfile::tempdir().unwrap();
        let spools = Spools::new(dir.path().to_path_buf(), 1 << 30);
        let mut j = Journal::default();
        let mib = 1u64 << 20;
        for i in 0..12 {
            let data = Bytes::from(vec![i as u8; mib as usize]);
            j.push(
                1,
                Replay::Write {
                    offset: i * mib,
                    data,
                },
                Some(&spools),
            );
        }
        assert!(j.whole);
        assert!(j.bytes <= JOURNAL_MAX);
        // Scattered 4 KiB writes: one spooled entry each, far past the memory limit.
        for i in 0..3000u64 {
            let data = Bytes::from(vec![(i % 251) as u8; 4096]);
            let offset = 100 * mib + i * 8192;
            j.push(1, Replay::Write { offset, data }, Some(&spools));
        }
        assert!(j.whole, "scattered writes fit in the spool");
        assert_eq!(j.spooled, 3001);
        // 7 MiB in memory (each entry costs 64 bytes more), 5 MiB spooled.
        assert_eq!(spools.used(), 5 * mib + 3000 * 4096);
        let mut want = std::collections::BTreeMap::new();
        for i in 0..12u64 {
            want.insert(i * mib, vec![i as u8; mib as usize]);
        }
        for i in 0..3000u64 {
            want.insert(100 * mib + i * 8192, vec![(i % 251) as u8; 4096]);
        }
        let spool = j.spool.as_ref().and_then(Spool::reader).unwrap();
        let mut got = std::collections::BTreeMap::new();
        for (_, op) in &j.ops {
            match op {
                Replay::Write { offset, data } => {
                    got.insert(*offset, data.to_vec());
                }
                Replay::Spooled { offset, at, len } => {
                    let all = spool.read(*at, *len).unwrap();
                    // A coalesced entry: split into the pieces written.
                    let piece = if *len > 4096 { mib } else { 4096 };
                    for (k, c) in all.chunks(piece as usize).enumerate() {
                        got.insert(offset + k as u64 * piece, c.to_vec());
                    }
                }
                _ => panic!("unexpected entry"),
            }
        }
        assert!(got == want, "the journal read back differs");
        j.clear();
        assert_eq!(spools.used(), 0);
    }
}
