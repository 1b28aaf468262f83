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
//! passthrough, every other open of it must use passthrough too, with the same backing
//! file (or it fails with EIO), and a passthrough open is refused while the inode has
//! opens in caching mode. Writes through passthrough would go to the cache file, never
//! to the server, so while a file is read through passthrough:
//! - another read-only open of it waits until the data file is complete at the current
//!   version, then shares it;
//! - an open of it for writing on this mount fails with `ETXTBSY` (other mounts and the
//!   server itself can change it; the readers here follow).
//!
//! Because of that last rule passthrough is used only where it cannot surprise: by
//! default on mounts of a read-only export (no open can write), and on read-write mounts
//! with `ferry mount --passthrough`.
//!
//! The counts are raised before the kernel learns of an open and lowered when its
//! `RELEASE` arrives, after the kernel dropped it: they never undercount the kernel's.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, Errno, FileHandle, FopenFlags, ReplyOpen};

use crate::fs::{Core, OpenReply};

/// Smaller files gain nothing: their pages stay in the kernel's cache across opens.
pub const MIN_SIZE: u64 = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Caching,
    Passthrough,
}

#[derive(Debug, Default)]
struct InodeModes {
    caching: u32,
    passthrough: u32,
    /// Opens for writing between their start and their answer: no passthrough begins
    /// meanwhile (the writer, once answered, is a caching open).
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

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// An open of `ino` for writing begins: until the guard is dropped (after the open
    /// was answered) no passthrough open of `ino` begins. `Err(ETXTBSY)` when one is
    /// going on.
    pub fn writer_opening(self: &Arc<Self>, ino: u64) -> Result<WriterOpening, Errno> {
        let mut state = self.state.lock().map_err(|_| Errno::EIO)?;
        let modes = state.inodes.entry(ino).or_default();
        if modes.backing.is_some() {
            return Err(Errno::ETXTBSY);
        }
        modes.writers_opening += 1;
        Ok(WriterOpening {
            modes: self.clone(),
            ino,
        })
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

    /// Whether `ino` is being read through passthrough right now.
    pub fn passing_through(&self, ino: u64) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| s.inodes.get(&ino).is_some_and(|m| m.backing.is_some()))
    }

    /// Answer an open of `ino` (`flags` as given to `open`) that `core` answered with
    /// `opened`. Gives the reply back unanswered when the open cannot go ahead: with `None`
    /// when it can later (a read-only open while passthrough readers exist and the data
    /// file does not hold the current version whole yet: it is being fetched into it),
    /// with the error to answer when it cannot (`ETXTBSY`: a writer while passthrough
    /// readers exist). With `share_anyway`, such a read-only open shares the readers'
    /// file as it is rather than wait longer (the kernel allows no other kind of open).
    /// Either way `fh` is not open for the kernel: the caller releases it.
    pub fn reply_open(
        &self,
        core: &Core,
        ino: u64,
        opened: &OpenReply,
        flags: i32,
        share_anyway: bool,
        reply: ReplyOpen,
    ) -> Result<(), (ReplyOpen, Option<Errno>)> {
        let (fh, keep_cache) = (opened.fh, opened.keep_cache);
        let read_only = flags & libc::O_ACCMODE == libc::O_RDONLY && flags & libc::O_TRUNC == 0;
        // A reader's close has nothing to commit: the kernel need not send its FLUSH,
        // which saves a trip through the daemon per file read. (With passthrough on, the
        // FLUSH tells `releases_pending` that a caching reader is closing.)
        let no_flush = read_only && !self.enabled();
        let Ok(mut state) = self.state.lock() else {
            reply.opened(FileHandle(fh), caching_flags(keep_cache, no_flush));
            return Ok(());
        };
        let state = &mut *state;
        let modes = state.inodes.entry(ino).or_default();
        if let Some((backing, backing_file, _)) = &modes.backing {
            if !read_only {
                return Err((reply, Some(Errno::ETXTBSY)));
            }
            // Every passthrough open of the inode reads the same file, the pinned one
            // (never replaced while pinned), and a new open should find it whole.
            let file = core.passthrough_file(fh, false);
            let id = file.and_then(|(f, _)| f.metadata().ok().map(|m| (m.dev(), m.ino())));
            if id != Some(*backing_file) && !share_anyway {
                return Err((reply, None));
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
                    core.passthrough_unpin(sino);
                    tracing::warn!(
                        "FUSE passthrough unavailable, reads go through this daemon: {e}"
                    );
                    self.enabled.store(false, Ordering::Relaxed);
                }
                (Err(_), Ok(_)) => core.passthrough_unpin(sino),
            }
        }
        modes.caching += 1;
        state.handles.insert(fh, (ino, Mode::Caching, false));
        reply.opened(FileHandle(fh), caching_flags(keep_cache, no_flush));
        Ok(())
    }

    /// The flags of a `create` reply for `ino` (caching mode: a new file is being
    /// written); `ETXTBSY` when the file is being read through passthrough.
    pub fn create_flags(&self, ino: u64, fh: u64, keep_cache: bool) -> Result<FopenFlags, Errno> {
        let Ok(mut state) = self.state.lock() else {
            return Ok(caching_flags(keep_cache, false));
        };
        let state = &mut *state;
        let modes = state.inodes.entry(ino).or_default();
        if modes.backing.is_some() {
            return Err(Errno::ETXTBSY);
        }
        modes.caching += 1;
        state.handles.insert(fh, (ino, Mode::Caching, false));
        Ok(caching_flags(keep_cache, false))
    }

    /// The kernel released `fh` (after dropping it from its own mode counts).
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
            Mode::Passthrough => {
                modes.passthrough = modes.passthrough.saturating_sub(1);
                if modes.passthrough == 0
                    && let Some((backing, _, sino)) = modes.backing.take()
                {
                    // Closes the kernel's reference to the data file.
                    drop(backing);
                    core.passthrough_unpin(sino);
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
