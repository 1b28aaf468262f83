//! Directory streams: opendir, readdir (entries with attributes), releasedir.
//!
//! The stream is read through `/proc/self/fd/N` of a descriptor opened beneath the root,
//! so it is exactly the directory that was resolved, even if it is renamed meanwhile.
//! Must never stat an entry by anything but its single name relative to that descriptor.

use std::collections::VecDeque;
use std::fs::ReadDir;
use std::iter::Peekable;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_common::{DirEntry, FileKind, MAX_DIR_BATCH, MAX_FRAME, Name, RelPath, Response};

use super::{Ctx, attr_of};
use crate::export::Export;
use crate::handles::{Handle, OpenDir};
use crate::sys::{self, Errno, errno_of};
use crate::watch::{KEPT_LISTING_MAX, Watcher};

/// Conservative encoded size of one entry besides its name (attributes are varints).
const ENTRY_OVERHEAD: usize = 160;

/// Names read and stat'ed at a time; parts of at least `PARALLEL_STAT_MIN` names are
/// stat'ed by up to `STAT_THREADS` threads.
const PART: usize = 512;
const PARALLEL_STAT_MIN: usize = 256;
const STAT_THREADS: usize = 4;

/// A batch that has taken this long goes out with the entries it has (see `readdir`).
const BATCH_BUDGET: Duration = Duration::from_millis(5);
/// The same for a listing's first batch (`ListDir`), longer: a warm directory of a full
/// batch comes whole in one round trip, and so does a subdirectory's prefetch, which
/// keeps only whole listings.
const FIRST_BATCH_BUDGET: Duration = Duration::from_millis(25);

/// Entries a stream reads ahead of its client's requests, at most.
const AHEAD_MAX: usize = MAX_DIR_BATCH as usize;

/// Bytes of entries all streams together may hold: past it, a stream reads only what a
/// request asks for, and nothing ahead.
const AHEAD_LIMIT: usize = 64 << 20;
static AHEAD_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The entries of an open directory, read and stat'ed a part at a time, by the request
/// that needs them or, after a batch went out, ahead of the next request by a thread of
/// the stream's own: the server stats the next batch while this one travels and the
/// client hands it to its kernel. One part is in work at a time, so parts keep their
/// order.
#[derive(Debug)]
pub struct Listing {
    /// Names not yet read (none for a kept listing, whose entries are all ahead). Only
    /// whoever set `Ahead::working` reads them.
    names: Mutex<Option<Peekable<ReadDir>>>,
    ahead: Mutex<Ahead>,
    /// A part was stored, or the work stopped.
    changed: Condvar,
    /// Everything read so far, while the whole listing may be kept
    /// ([`Watcher::keep_listing`]).
    fill: Mutex<Option<Fill>>,
}

/// A listing being read whole, to be kept once it is complete.
#[derive(Debug)]
struct Fill {
    watch: Arc<Watcher>,
    dir: (u64, u64),
    /// The watch generation and the time when the stream opened.
    since: u64,
    at: Instant,
    hints: bool,
    entries: Vec<DirEntry>,
    /// Counted in `FILL_BYTES` until the fill is dropped.
    bytes: usize,
}

/// Bytes all fills together may hold: past it, a listing is not kept.
const FILL_LIMIT: usize = 64 << 20;
static FILL_BYTES: AtomicUsize = AtomicUsize::new(0);

impl Fill {
    /// Count `bytes` more; false (the fill must go) past [`KEPT_LISTING_MAX`] or
    /// [`FILL_LIMIT`].
    fn grow(&mut self, bytes: usize) -> bool {
        if self.bytes + bytes > KEPT_LISTING_MAX
            || FILL_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes > FILL_LIMIT
        {
            FILL_BYTES.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        self.bytes += bytes;
        true
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        FILL_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Ahead {
    /// Stat'ed, not yet sent.
    entries: VecDeque<DirEntry>,
    /// Their size as counted for frames (and for `AHEAD_BYTES`).
    bytes: usize,
    /// Every name has been read and stat'ed.
    done: bool,
    /// Reading the names failed: reported once the entries before it went out, and
    /// to every request after.
    error: Option<Errno>,
    /// A part is being read and stat'ed.
    working: bool,
}

impl Listing {
    fn new(names: ReadDir, fill: Option<Fill>) -> Listing {
        Listing {
            names: Mutex::new(Some(names.peekable())),
            ahead: Mutex::new(Ahead::default()),
            changed: Condvar::new(),
            fill: Mutex::new(fill),
        }
    }

    /// A listing whose entries are all known already.
    fn kept(entries: Vec<DirEntry>) -> Listing {
        let bytes: usize = entries.iter().map(entry_size).sum();
        AHEAD_BYTES.fetch_add(bytes, Ordering::Relaxed);
        Listing {
            names: Mutex::new(None),
            ahead: Mutex::new(Ahead {
                entries: entries.into(),
                bytes,
                done: true,
                error: None,
                working: false,
            }),
            changed: Condvar::new(),
            fill: Mutex::new(None),
        }
    }

    fn ahead(&self) -> MutexGuard<'_, Ahead> {
        // Poisoning only means a request panicked; the state is updated in one piece.
        self.ahead.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store the outcome of a part and wake whoever waits for it.
    fn store(&self, a: &mut Ahead, part: Result<Part, Errno>) {
        let mut fill = self.fill.lock().unwrap_or_else(|p| p.into_inner());
        match part {
            Ok(Part { entries, done }) => {
                let bytes: usize = entries.iter().map(entry_size).sum();
                if let Some(f) = fill.as_mut() {
                    if f.grow(bytes) {
                        f.entries.extend(entries.iter().cloned());
                    } else {
                        *fill = None;
                    }
                }
                a.bytes += bytes;
                AHEAD_BYTES.fetch_add(bytes, Ordering::Relaxed);
                a.entries.extend(entries);
                a.done = done;
                if done && let Some(mut f) = fill.take() {
                    let entries = std::mem::take(&mut f.entries);
                    f.watch
                        .keep_listing(f.dir, f.since, f.hints, entries, f.bytes, f.at);
                }
            }
            Err(e) => {
                a.error = Some(e);
                *fill = None;
            }
        }
        self.changed.notify_all();
    }
}

impl Drop for Listing {
    fn drop(&mut self) {
        let a = self.ahead.get_mut().unwrap_or_else(|p| p.into_inner());
        AHEAD_BYTES.fetch_sub(a.bytes, Ordering::Relaxed);
    }
}

/// Entries of a directory, stat'ed; `done`: no name is left.
struct Part {
    entries: Vec<DirEntry>,
    done: bool,
}

fn entry_size(e: &DirEntry) -> usize {
    e.name.0.len() + ENTRY_OVERHEAD
}

/// Errors of stat'ing one entry that leave it out of its directory's listing instead of
/// failing the listing, as `sftp-server` does: another user's FUSE mount without
/// `allow_other` (`EACCES` even to root), a dead or unreachable mount, a bad inode.
/// A lookup of the name still gets the error.
fn left_out(name: &[u8], e: Errno) -> bool {
    let out = matches!(
        e,
        libc::EACCES
            | libc::EPERM
            | libc::EIO
            | libc::ENOTCONN
            | libc::ESTALE
            | libc::ETIMEDOUT
            | libc::EHOSTDOWN
            | libc::ENXIO
            | libc::ENODEV
            | libc::EOVERFLOW
    );
    if out {
        tracing::debug!(name = %String::from_utf8_lossy(name), errno = e, "entry left out of a listing");
    }
    out
}

/// What stat'ing an entry needs besides its directory (owned: a read-ahead thread
/// outlives the request that started it).
#[derive(Clone)]
struct Stat {
    export: Arc<Export>,
    xattr_hints: bool,
    watch: Option<Arc<Watcher>>,
}

impl Stat {
    fn of(ctx: &Ctx) -> Stat {
        Stat {
            export: Arc::clone(&ctx.export),
            xattr_hints: ctx.xattr_hints,
            watch: ctx.watch.clone(),
        }
    }

    /// The entries `names` of `dir` with their attributes, in order. A name gone
    /// meanwhile is skipped, as if the unlink had happened first. Subdirectories are
    /// watched before their attributes are taken (see [`Watcher::ensure_entry`]) when
    /// `path` is `dir`'s path.
    fn all(
        &self,
        dir: BorrowedFd<'_>,
        path: Option<&RelPath>,
        names: &[Vec<u8>],
    ) -> Result<Vec<DirEntry>, Errno> {
        let mut out = Vec::with_capacity(names.len());
        // (Only looked for while something is mounted beneath the export.)
        let dir_dev = match self.export.has_submounts() {
            true => Some(sys::fstat(dir)?.st_dev),
            false => None,
        };
        for name in names {
            let cname = sys::cstring(name)?;
            // Another filesystem mounted here (only looked for while there is one
            // beneath the export) gives what the kernel has cached of its root: a
            // hung NFS or FUSE mount must not hang the listing of its parent. It is
            // not watched (its changes are not seen) and not probed for xattrs.
            let unsynced = match dir_dev {
                Some(dev) => match sys::stat_unsynced(dir, &cname, dev) {
                    Ok((st, true)) => Some(st),
                    Ok((_, false)) => None,
                    Err(libc::ENOENT) => continue,
                    Err(e) if left_out(name, e) => continue,
                    Err(e) => return Err(e),
                },
                None => None,
            };
            let elsewhere = unsynced.is_some();
            let mut st = match unsynced
                .map_or_else(|| sys::fstatat(dir, &cname, libc::AT_SYMLINK_NOFOLLOW), Ok)
            {
                Ok(st) => st,
                Err(libc::ENOENT) => continue,
                Err(e) if left_out(name, e) => continue,
                Err(e) => return Err(e),
            };
            // `ferryd`'s own names at the root (see `redo::reserved`), and its folder
            // wherever a listing meets it.
            if crate::redo::reserved(name)
                && (self.export.is_hidden(st.st_dev, st.st_ino) || self.export.is_root(dir))
            {
                continue;
            }
            // A subdirectory's own changes reach clients only through its own watch.
            let mut covered = !elsewhere;
            if let Some(w) = &self.watch
                && !elsewhere
                && st.st_mode & libc::S_IFMT == libc::S_IFDIR
            {
                (st, covered) = match path {
                    Some(path) => w.ensure_entry(dir, path, &cname, st),
                    None => (st, w.lost_all() || w.covers(st.st_dev, st.st_ino)),
                };
            }
            let mut attr = attr_of(&st, self.export.root_dev());
            attr.uncovered = !covered;
            // For a client that forwards xattrs, one more syscall per entry saves it a
            // round trip per `ls -l` probe (others do not ask: ~3 µs per entry saved).
            attr.xattrs = super::xattr_hint_at(self.xattr_hints && !elsewhere, dir, &cname);
            out.push(DirEntry {
                name: Name(name.clone()),
                attr,
            });
        }
        Ok(out)
    }

    /// Whether `path` still leads to the directory `dir`.
    fn still_at(&self, dir: BorrowedFd<'_>, path: &RelPath) -> bool {
        sys::fstat(dir).is_ok_and(|st| self.export.leads_to(path, (st.st_dev, st.st_ino)))
    }

    /// Read the next part of `d`'s names and stat them; true with them when no name is
    /// left. Only for whoever set `Ahead::working`.
    fn next_part(&self, d: &OpenDir) -> Result<Part, Errno> {
        let (names, done) = {
            let mut it = d.listing.names.lock().unwrap_or_else(|p| p.into_inner());
            let Some(it) = it.as_mut() else {
                return Ok(Part {
                    entries: Vec::new(),
                    done: true,
                });
            };
            let mut names = Vec::with_capacity(PART);
            while names.len() < PART {
                match it.next() {
                    None => break,
                    Some(Ok(ent)) => names.push(ent.file_name().into_vec()),
                    Some(Err(e)) => return Err(errno_of(&e)),
                }
            }
            (names, it.peek().is_none())
        };
        let dir = d.fd.as_fd();
        // Subdirectories are watched under the stream's path only while it still leads
        // to the stream's directory (a watch must never record a wrong path).
        let watched = self.watch.is_some() && !names.is_empty() && self.still_at(dir, &d.path);
        let path = watched.then_some(&d.path);
        // A cold directory costs a name lookup and an inode read per entry: several
        // threads at once overlap the reads.
        let entries = if names.len() < PARALLEL_STAT_MIN {
            self.all(dir, path, &names)?
        } else {
            in_parallel(&names, &|part: &[Vec<u8>]| self.all(dir, path, part))?
        };
        Ok(Part { entries, done })
    }
}

pub fn opendir(ctx: &Ctx, path: &RelPath) -> Result<Response, Errno> {
    open_dir(ctx, path, false)
}

/// [`opendir`]; `speculative`: see [`ferry_common::Request::ListDir`].
fn open_dir(ctx: &Ctx, path: &RelPath, speculative: bool) -> Result<Response, Errno> {
    let fd = ctx
        .export
        .resolve(path, libc::O_RDONLY | libc::O_DIRECTORY)?;
    // Watched before it is stat'ed and listed: nothing changes unreported in between.
    match &ctx.watch {
        Some(w) if speculative => {
            if !w.ensure_eagerly(fd.as_fd(), path) {
                return Err(libc::EAGAIN);
            }
        }
        _ => ctx.watch_dir(fd.as_fd(), path),
    }
    let st = sys::fstat(fd.as_fd())?;
    let attr = attr_of(&st, ctx.export.root_dev());
    let id = (st.st_dev, st.st_ino);
    let kept = ctx.watch.as_ref().and_then(|w| {
        let (kept, since) = w.cached_listing(id, ctx.xattr_hints)?;
        // A kept listing goes to the stream whole: within the bytes all streams may
        // hold ahead, else it is read from the disk as any other.
        let bytes: usize = kept.iter().map(entry_size).sum();
        (AHEAD_BYTES.load(Ordering::Relaxed) + bytes <= AHEAD_LIMIT).then_some((w, kept, since))
    });
    let listing = match kept {
        Some((w, kept, since)) => {
            let touched = w.touched_since(since, &kept);
            Listing::kept(refreshed(ctx, fd.as_fd(), path, &kept, &touched)?)
        }
        None => {
            let fill = ctx.watch.as_ref().and_then(|w| {
                Some(Fill {
                    watch: Arc::clone(w),
                    dir: id,
                    since: w.listing_ticket(id)?,
                    at: Instant::now(),
                    hints: ctx.xattr_hints,
                    entries: Vec::new(),
                    bytes: 0,
                })
            });
            // A second descriptor through our own fd's magic link: std's ReadDir owns it.
            let names = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(|e| errno_of(&e))?;
            Listing::new(names, fill)
        }
    };
    let foreign = ctx.export.foreign(fd.as_fd());
    let handle = ctx.handles.insert(Handle::Dir(Arc::new(OpenDir {
        fd: std::mem::ManuallyDrop::new(fd),
        foreign,
        path: path.clone(),
        listing,
    })))?;
    Ok(Response::Opened { handle, attr })
}

/// A kept listing of `dir` (just resolved from `path`), with the entries its watch
/// does not vouch for stat'ed again: subdirectories, files with several links, and
/// those `touched` (see [`Watcher::touched_since`]); those gone meanwhile are left out.
fn refreshed(
    ctx: &Ctx,
    dir: BorrowedFd<'_>,
    path: &RelPath,
    kept: &[DirEntry],
    touched: &[bool],
) -> Result<Vec<DirEntry>, Errno> {
    let again: Vec<bool> = kept
        .iter()
        .zip(touched)
        .map(|(e, &t)| t || e.attr.kind == FileKind::Dir || e.attr.nlink > 1)
        .collect();
    let names: Vec<Vec<u8>> = kept
        .iter()
        .zip(&again)
        .filter(|(_, a)| **a)
        .map(|(e, _)| e.name.0.clone())
        .collect();
    if names.is_empty() {
        return Ok(kept.to_vec());
    }
    let stat = Stat::of(ctx);
    // Subdirectories are watched under `path` only while it leads to `dir`.
    let path = stat.still_at(dir, path).then_some(path);
    let fresh = if names.len() < PARALLEL_STAT_MIN {
        stat.all(dir, path, &names)?
    } else {
        in_parallel(&names, &|part: &[Vec<u8>]| stat.all(dir, path, part))?
    };
    let mut fresh = fresh.into_iter().peekable();
    let mut out = Vec::with_capacity(kept.len());
    for (e, &again) in kept.iter().zip(&again) {
        if !again {
            out.push(e.clone());
        } else if let Some(f) = fresh.next_if(|f| f.name == e.name) {
            out.push(f);
        }
    }
    Ok(out)
}

/// `OpenDir` plus the first `ReadDir` (one round trip for most directories). A
/// directory read to the end in this batch leaves no handle behind.
pub fn listdir(
    ctx: &Ctx,
    path: &RelPath,
    max_entries: u32,
    speculative: bool,
) -> Result<Response, Errno> {
    let (handle, attr) = match open_dir(ctx, path, speculative)? {
        Response::Opened { handle, attr } => (handle, attr),
        _ => return Err(libc::EIO),
    };
    let batch = next_batch(ctx, handle, max_entries, FIRST_BATCH_BUDGET);
    let (entries, eof) = match batch {
        Ok(Response::Dir { entries, eof }) => (entries, eof),
        Ok(_) => (Vec::new(), false),
        Err(e) => {
            let _ = ctx.handles.remove_dir(handle);
            return Err(e);
        }
    };
    let handle = if eof {
        let _ = ctx.handles.remove_dir(handle);
        0
    } else {
        handle
    };
    Ok(Response::Listing {
        handle,
        attr,
        entries,
        eof,
    })
}

/// The next entries in directory order ("." and ".." are never included): up to
/// `max_entries`, or fewer once the batch has taken `BATCH_BUDGET` (a cold directory's
/// entries cost an inode read each, and the client hands the kernel the entries it has
/// while the server stats on). The stream then reads on ahead of the next request.
pub fn readdir(ctx: &Ctx, handle: u64, max_entries: u32) -> Result<Response, Errno> {
    next_batch(ctx, handle, max_entries, BATCH_BUDGET)
}

fn next_batch(
    ctx: &Ctx,
    handle: u64,
    max_entries: u32,
    budget: Duration,
) -> Result<Response, Errno> {
    let d = ctx.handles.dir(handle)?;
    if let Some(w) = &ctx.watch {
        // Normally already watched since OpenDir; this re-adds a watch that was dropped
        // (the directory moved out of sight and back, say).
        w.ensure_open_dir(d.fd.as_fd(), &d.path, &ctx.export);
    }
    let max = max_entries.clamp(1, MAX_DIR_BATCH) as usize;
    let stat = Stat::of(ctx);
    let started = Instant::now();
    let mut a = d.listing.ahead();
    loop {
        // An empty batch would read as the end of the directory: one goes out with
        // entries, at the end, or with the error.
        let ready = a.entries.len() >= max
            || a.bytes >= MAX_FRAME / 2
            || a.done
            || a.error.is_some()
            || (!a.entries.is_empty() && started.elapsed() >= budget);
        if ready {
            break;
        }
        if a.working {
            // The read-ahead thread has a part in work: wait for it.
            let wait = if a.entries.is_empty() {
                Duration::from_secs(1)
            } else {
                budget.saturating_sub(started.elapsed())
            };
            a = d
                .listing
                .changed
                .wait_timeout(a, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            continue;
        }
        a.working = true;
        drop(a);
        // Should the part panic, `working` is cleared all the same.
        let claim = Working(&*d);
        let part = stat.next_part(&d);
        std::mem::forget(claim);
        a = d.listing.ahead();
        d.listing.store(&mut a, part);
        a.working = false;
    }
    let mut entries = Vec::new();
    let mut bytes = 0;
    // Names are at most 255 bytes on Linux, so MAX_DIR_BATCH entries fit a frame; the
    // byte budget is a second guard for filesystems with longer names.
    while entries.len() < max && bytes < MAX_FRAME / 2 {
        let Some(e) = a.entries.pop_front() else {
            break;
        };
        bytes += entry_size(&e);
        entries.push(e);
    }
    a.bytes -= bytes;
    AHEAD_BYTES.fetch_sub(bytes, Ordering::Relaxed);
    // An error stays: the names of the part that failed are lost, and a listing
    // read on past them would look complete.
    if entries.is_empty()
        && let Some(e) = a.error
    {
        return Err(e);
    }
    let eof = a.done && a.entries.is_empty();
    if !a.done
        && !a.working
        && a.error.is_none()
        && a.entries.len() < AHEAD_MAX
        && AHEAD_BYTES.load(Ordering::Relaxed) < AHEAD_LIMIT
    {
        a.working = true;
        drop(a);
        read_ahead(d, stat);
    }
    Ok(Response::Dir { entries, eof })
}

/// A stream whose `Ahead::working` is cleared however its holder ends (unwinding
/// included).
struct Working<D: std::ops::Deref<Target = OpenDir>>(D);

impl<D: std::ops::Deref<Target = OpenDir>> Drop for Working<D> {
    fn drop(&mut self) {
        let mut a = self.0.listing.ahead();
        a.working = false;
        if std::thread::panicking() {
            // The names the part had taken are lost: the listing must not end as if
            // complete.
            a.error.get_or_insert(libc::EIO);
        }
        self.0.listing.changed.notify_all();
    }
}

/// Read and stat `d`'s next parts on a thread of their own (its caller set
/// `Ahead::working`), until `AHEAD_MAX` entries wait, the names end, or the stream is
/// released.
fn read_ahead(d: Arc<OpenDir>, stat: Stat) {
    let working = Working(d);
    let spawned = std::thread::Builder::new()
        .name("ferryd-list".into())
        .spawn(move || {
            let d = &working.0;
            loop {
                let part = stat.next_part(d);
                let mut a = d.listing.ahead();
                d.listing.store(&mut a, part);
                // Released (this thread holds the last reference), or far enough ahead.
                let more = Arc::strong_count(d) > 1
                    && !a.done
                    && a.error.is_none()
                    && a.entries.len() < AHEAD_MAX
                    && AHEAD_BYTES.load(Ordering::Relaxed) < AHEAD_LIMIT;
                if !more {
                    return;
                }
            }
        });
    // Not started: its closure (and so `working`) was dropped, which cleared the flag;
    // the next request reads for itself.
    drop(spawned);
}

/// `stat_all` of `names` split among [`stat_threads`] threads, the results in the order
/// of `names`. A part whose thread cannot be started is done by the calling thread.
fn in_parallel<F>(names: &[Vec<u8>], stat_all: &F) -> Result<Vec<DirEntry>, Errno>
where
    F: Fn(&[Vec<u8>]) -> Result<Vec<DirEntry>, Errno> + Sync,
{
    let threads = stat_threads();
    if threads < 2 {
        return stat_all(names);
    }
    let chunk = names.len().div_ceil(threads);
    let parts: Vec<Result<Vec<DirEntry>, Errno>> = std::thread::scope(|scope| {
        let running: Vec<_> = names
            .chunks(chunk)
            .map(|part| {
                std::thread::Builder::new()
                    .spawn_scoped(scope, || stat_all(part))
                    .map_err(|_| part)
            })
            .collect();
        running
            .into_iter()
            .map(|t| match t {
                Ok(t) => t.join().unwrap_or(Err(libc::EIO)),
                Err(part) => stat_all(part),
            })
            .collect()
    });
    let mut entries = Vec::with_capacity(names.len());
    for part in parts {
        entries.extend(part?);
    }
    Ok(entries)
}

/// Threads that stat a big batch: the machine's parallelism, at most `STAT_THREADS`.
fn stat_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(STAT_THREADS)
    })
}
