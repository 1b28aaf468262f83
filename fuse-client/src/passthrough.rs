//! FUSE passthrough for files read from the data cache, and the I/O mode of every open.
//!
//! A read-only open of a file of at least [`MIN_SIZE`] whose every byte is in the data
//! cache at its current version (and that this client is not writing) can get the
//! cache's data file as its backing file: the kernel reads that file directly, so reads
//! never reach this daemon and run at the local disk's speed (its page cache is the data
//! file's own). The cache entry is pinned meanwhile: never evicted, and a new version (a
//! change on the server or through another mount) is fetched into the same file in
//! place, so a passthrough reader follows changes like any other open descriptor.
//!
//! The kernel keeps one I/O mode per inode (`fs/fuse/iomode.c`): while an open of it uses
//! passthrough, every other open of it must name the same backing file (or it fails with
//! EIO), and a passthrough open is refused while the inode has opens in caching mode. So
//! while a file is read through passthrough:
//! - another read-only open of it waits until the data file is complete at the current
//!   version, then shares it;
//! - an open of it for writing (a create meeting it, a truncate) is a passthrough open
//!   with `FOPEN_DIRECT_IO`: its reads and writes come to this daemon like any writer's
//!   (the kernel's page cache is bypassed, the server gets every byte at `close`), and
//!   what it overwrites of the cached blocks is patched in the shared data file, so the
//!   readers on this mount see that at once; the rest (appends) once the copy is
//!   refreshed after the commit, as for a change made elsewhere.
//!
//! Only a memory map of such a writer escapes this daemon: the kernel maps the data file
//! itself, so bytes stored through a `MAP_SHARED` writable map (which needs a descriptor
//! open for reading and writing) land there. This daemon stamps the data file's mtime
//! after each of its own writes, remembering a foreign one it finds first; a store
//! through a map changes it (the kernel dates the first store into a clean page, and
//! the send below cleans them again), and the writer's `FLUSH` (or `FSYNC`) then sends
//! the cached copy through the writer before committing (`Core::send_mapped_stores`).
//! Where the cache's filesystem does not date such stores, a writable export's mount
//! uses no passthrough. Stores made after the writer's last close cannot reach the
//! server by themselves: while readers stay open they read them (and so do new opens),
//! and a later writer's close may send them as its own; once the last reader closes,
//! the data file leaves the cache if such a writer opened beside them (see
//! [`IoModes::released`]), so they are never taken for the server's bytes after that,
//! and a map still open keeps the file, unlinked.
//!
//! Passthrough is on by default wherever the kernel offers it to this process (root,
//! Linux 6.9+); `ferry mount --passthrough off` turns it off.
//!
//! The counts are raised before the kernel learns of an open and lowered when its
//! `RELEASE` arrives, after the kernel dropped it: they never undercount the kernel's.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fuser::{BackingId, FileAttr, FileHandle, FopenFlags, Generation, ReplyCreate, ReplyOpen};

use crate::fs::{Core, OpenReply};

/// Smaller files gain nothing: their pages stay in the kernel's cache across opens.
pub const MIN_SIZE: u64 = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Caching,
    Passthrough,
    /// A writer beside passthrough readers: a passthrough open whose reads and writes
    /// come through this daemon (`FOPEN_DIRECT_IO`); `may_map` when it was opened for
    /// reading too, which a shared writable map needs.
    Writer {
        may_map: bool,
    },
}

#[derive(Debug, Default)]
struct InodeModes {
    caching: u32,
    /// Passthrough opens, writers among them.
    passthrough: u32,
    /// Whether a writer open for reading and writing opened while passthrough lasted:
    /// its memory maps (if any) wrote the data file itself, so the file is not trusted
    /// once passthrough ends.
    written_beside: bool,
    /// Opens for writing (and size changes) between their start and their answer: no
    /// passthrough begins meanwhile.
    writers_opening: u32,
    /// Shared by the passthrough opens; with the data file's (dev, ino) and the server
    /// inode whose cache entry is pinned.
    backing: Option<(BackingId, (u64, u64), u64)>,
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, InodeModes>,
    /// Open handle → (inode, mode it was opened in, closed by some descriptor: a
    /// `FLUSH` came, so its `RELEASE` is most likely on its way).
    handles: HashMap<u64, (u64, Mode, bool)>,
}

/// How long a read-only open that could pass through waits for the `RELEASE`s of
/// caching opens already closed: the kernel sends them in the background, so a file
/// read twice in a row would otherwise never leave caching mode.
pub const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

#[derive(Debug)]
pub struct IoModes {
    enabled: AtomicBool,
    state: Mutex<State>,
}

impl IoModes {
    pub fn new(enabled: bool) -> IoModes {
        IoModes {
            enabled: AtomicBool::new(enabled),
            state: Mutex::new(State::default()),
        }
    }

    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// An open of `ino` for writing (or a size change) begins: until the guard is
    /// dropped (after it was answered) no passthrough of `ino` begins. One going on
    /// already goes on: the writer joins it (see the module's notes).
    pub fn writer_opening(self: &Arc<Self>, ino: u64) -> WriterOpening {
        if let Ok(mut state) = self.state.lock() {
            state.inodes.entry(ino).or_default().writers_opening += 1;
        }
        WriterOpening {
            modes: self.clone(),
            ino,
        }
    }

    /// A descriptor of `fh` was closed.
    pub fn flushed(&self, fh: u64) {
        if let Ok(mut state) = self.state.lock()
            && let Some(h) = state.handles.get_mut(&fh)
        {
            h.2 = true;
        }
    }

    /// Whether a read-only open of `ino` should wait (at most [`RELEASE_WAIT`]) before
    /// asking for passthrough: the inode's caching opens have all been closed and only
    /// their `RELEASE`s are missing.
    pub fn releases_pending(&self, ino: u64) -> bool {
        let Ok(state) = self.state.lock() else {
            return false;
        };
        self.enabled()
            && state.inodes.get(&ino).is_some_and(|m| {
                m.caching > 0
                    && m.writers_opening == 0
                    && state
                        .handles
                        .values()
                        .filter(|(i, mode, _)| *i == ino && *mode == Mode::Caching)
                        .all(|(_, _, flushed)| *flushed)
            })
    }

    /// Whether `fh` is a writer opened beside passthrough readers that can map the file
    /// writable (see [`crate::fs::Core::send_mapped_stores`]).
    pub fn may_map_beside_passthrough(&self, fh: u64) -> bool {
        self.state.lock().is_ok_and(|s| {
            s.handles
                .get(&fh)
                .is_some_and(|h| h.1 == Mode::Writer { may_map: true })
        })
    }

    /// Whether `ino` is being read through passthrough right now.
    pub fn passing_through(&self, ino: u64) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| s.inodes.get(&ino).is_some_and(|m| m.backing.is_some()))
    }

    /// Answer an open of `ino` (`flags` as given to `open`) that `core` answered with
    /// `opened`. Gives the reply back unanswered when the open should wait: a read-only
    /// open while passthrough readers exist and the data file does not hold the current
    /// version whole yet (it is being fetched into it). With `share_anyway`, such an open
    /// shares the readers' file as it is rather than wait longer (the kernel allows no
    /// other kind of open). Then `fh` is not open for the kernel: the caller releases it.
    pub fn reply_open(
        &self,
        core: &Core,
        ino: u64,
        opened: &OpenReply,
        flags: i32,
        share_anyway: bool,
        reply: ReplyOpen,
    ) -> Result<(), ReplyOpen> {
        let (fh, keep_cache) = (opened.fh, opened.keep_cache);
        let read_only = flags & libc::O_ACCMODE == libc::O_RDONLY && flags & libc::O_TRUNC == 0;
        // A reader's close has nothing to commit: the kernel need not send its FLUSH,
        // which saves a trip through the daemon per file read. (Of a file that may pass
        // through, the FLUSH tells `releases_pending` that a caching reader is closing.)
        let no_flush = read_only && (!self.enabled() || opened.attr.size < MIN_SIZE);
        // (Poisoned or not: an answer in the wrong mode would fail the open with EIO.)
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *state;
        let modes = state.inodes.entry(ino).or_default();
        if !read_only && modes.backing.is_some() {
            join_as_writer(core, modes, &mut state.handles, ino, fh, flags);
            if let Some((backing, _, _)) = &modes.backing {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO, backing);
            }
            return Ok(());
        }
        if let Some((backing, backing_file, _)) = &modes.backing {
            // Every passthrough open of the inode reads the same file, the pinned one
            // (never replaced while pinned), and a new open should find it whole, unless
            // a writer here is changing it (then it holds that writer's bytes, as the
            // other readers see them).
            let file = core.passthrough_file(fh, false);
            let id = file.and_then(|(f, _)| f.metadata().ok().map(|m| (m.dev(), m.ino())));
            let writing = state
                .handles
                .values()
                .any(|(i, mode, _)| *i == ino && matches!(mode, Mode::Writer { .. }));
            if id != Some(*backing_file) && !share_anyway && !writing {
                return Err(reply);
            }
            modes.passthrough += 1;
            state.handles.insert(fh, (ino, Mode::Passthrough, false));
            core.passthrough_opened();
            reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), backing);
            return Ok(());
        }
        if self.enabled()
            && read_only
            && modes.caching == 0
            && modes.writers_opening == 0
            && let Some((file, sino)) = core.passthrough_file(fh, true)
        {
            // Pinned from here: give the pin back unless the open passes through.
            match (file.metadata(), reply.open_backing(&file)) {
                (Ok(meta), Ok(backing)) => {
                    modes.passthrough += 1;
                    state.handles.insert(fh, (ino, Mode::Passthrough, false));
                    core.passthrough_opened();
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing);
                    modes.backing = Some((backing, (meta.dev(), meta.ino()), sino));
                    return Ok(());
                }
                (_, Err(e)) => {
                    core.passthrough_unpin(sino, false);
                    tracing::warn!(
                        "FUSE passthrough unavailable, reads go through this daemon: {e}"
                    );
                    self.enabled.store(false, Ordering::Relaxed);
                }
                (Err(_), Ok(_)) => core.passthrough_unpin(sino, false),
            }
        }
        modes.caching += 1;
        state.handles.insert(fh, (ino, Mode::Caching, false));
        reply.opened(FileHandle(fh), caching_flags(keep_cache, no_flush));
        Ok(())
    }

    /// Answer a `create` that made or met file `attr.ino` and opened it as `fh`: in
    /// caching mode (a new file is being written), or as a writer beside passthrough
    /// readers of a file it met.
    pub fn reply_create(
        &self,
        core: &Core,
        ttl: &Duration,
        attr: &FileAttr,
        opened: &OpenReply,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (fh, keep_cache) = (opened.fh, opened.keep_cache);
        let ino = attr.ino.0;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *state;
        let modes = state.inodes.entry(ino).or_default();
        if modes.backing.is_some() {
            join_as_writer(core, modes, &mut state.handles, ino, fh, flags);
        }
        if let Some((backing, _, _)) = &modes.backing {
            let flags = FopenFlags::FOPEN_DIRECT_IO;
            return reply.created_passthrough(
                ttl,
                attr,
                Generation(0),
                FileHandle(fh),
                flags,
                backing,
            );
        }
        modes.caching += 1;
        state.handles.insert(fh, (ino, Mode::Caching, false));
        let flags = caching_flags(keep_cache, false);
        reply.created(ttl, attr, Generation(0), FileHandle(fh), flags)
    }

    /// The kernel released `fh` (after dropping it from its own mode counts). The last
    /// passthrough open of an inode unpins its data file, which leaves the cache if a
    /// writer opened meanwhile.
    pub fn released(&self, core: &Core, fh: u64) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let state = &mut *state;
        let Some((ino, mode, _)) = state.handles.remove(&fh) else {
            return;
        };
        let Some(modes) = state.inodes.get_mut(&ino) else {
            return;
        };
        match mode {
            Mode::Caching => modes.caching = modes.caching.saturating_sub(1),
            Mode::Passthrough | Mode::Writer { .. } => {
                modes.passthrough = modes.passthrough.saturating_sub(1);
                if modes.passthrough == 0
                    && let Some((backing, _, sino)) = modes.backing.take()
                {
                    // Closes the kernel's reference to the data file.
                    drop(backing);
                    // A writer's memory map may have written it: its bytes are not the
                    // server's (see the module's notes).
                    core.passthrough_unpin(sino, std::mem::take(&mut modes.written_beside));
                }
            }
        }
        if modes.caching == 0 && modes.passthrough == 0 && modes.writers_opening == 0 {
            state.inodes.remove(&ino);
        }
    }
}

/// See [`IoModes::writer_opening`].
#[derive(Debug)]
pub struct WriterOpening {
    modes: Arc<IoModes>,
    ino: u64,
}

impl Drop for WriterOpening {
    fn drop(&mut self) {
        if let Ok(mut state) = self.modes.state.lock()
            && let Some(m) = state.inodes.get_mut(&self.ino)
        {
            m.writers_opening = m.writers_opening.saturating_sub(1);
            if m.caching == 0 && m.passthrough == 0 && m.writers_opening == 0 {
                state.inodes.remove(&self.ino);
            }
        }
    }
}

/// Count `fh`, opened for writing (`flags`), as a passthrough open of `ino` beside its
/// readers (answered with `FOPEN_DIRECT_IO`).
fn join_as_writer(
    core: &Core,
    modes: &mut InodeModes,
    handles: &mut HashMap<u64, (u64, Mode, bool)>,
    ino: u64,
    fh: u64,
    flags: i32,
) {
    modes.passthrough += 1;
    // Only a descriptor open for reading and writing can map the file writable
    // (`MAP_SHARED`, `PROT_WRITE`).
    let may_map = flags & libc::O_ACCMODE == libc::O_RDWR;
    modes.written_beside |= may_map;
    if may_map && let Some((_, _, sino)) = modes.backing {
        core.data_file_mappable(sino);
    }
    handles.insert(fh, (ino, Mode::Writer { may_map }, false));
    core.passthrough_writer_opened();
}

fn caching_flags(keep_cache: bool, no_flush: bool) -> FopenFlags {
    let mut flags = FopenFlags::empty();
    if keep_cache {
        flags |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if no_flush {
        flags |= FopenFlags::FOPEN_NOFLUSH;
    }
    flags
}
