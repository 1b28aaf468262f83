//! The per-connection table of open files and directories.
//!
//! Handle ids are chosen by the server (a counter starting at 1, never reused within a
//! connection) so a client cannot guess or collide with another connection's handles:
//! each connection has its own table, dropped with the connection, which closes every
//! descriptor it still holds. A handle id that is not in the table is EBADF.
//!
//! This module must never hold the table's lock across a system call: lookups clone an
//! `Arc` out of the map and the I/O happens after the lock is released.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_common::RelPath;

use crate::staging::Staging;
use crate::sys::Errno;

/// Most handles one connection may hold open; past it `Open` fails with EMFILE so one
/// client cannot exhaust the server's descriptors for everyone else.
pub const MAX_HANDLES: usize = 1 << 16;

/// An open file: a real descriptor (not `O_PATH`), usable after the file is unlinked.
#[derive(Debug)]
pub struct OpenFile {
    /// Closed on drop: see [`close_off_thread`].
    pub fd: ManuallyDrop<OwnedFd>,
    /// Opened `O_WRONLY` or `O_RDWR`: `SetAttr` may `ftruncate` through it.
    pub writable: bool,
    /// On another filesystem than the export's (mounted beneath it): calls through it
    /// may wait on that filesystem, so none runs on a connection's task.
    pub foreign: bool,
    /// Writes go to a staging file until `Commit` (see [`crate::staging`]). Its lock is
    /// held for a whole operation on the handle, system calls included: that is what
    /// keeps a commit from interleaving with a write. It serializes only this handle.
    pub staging: Option<Mutex<Staging>>,
    /// Writes through this handle running on the blocking pool. A client may send its
    /// `Commit` right behind its writes without waiting for their answers: the commit
    /// waits until these are done, so it applies every write sent before it.
    pub writes_running: AtomicU64,
    pub writes_done: tokio::sync::Notify,
    /// The first write that failed since the last commit: that commit fails with it and
    /// applies nothing (the client reports it to `close`).
    write_failed: Mutex<Option<Errno>>,
}

impl OpenFile {
    pub fn new(fd: OwnedFd, writable: bool, foreign: bool, staging: Option<Staging>) -> OpenFile {
        OpenFile {
            fd: ManuallyDrop::new(fd),
            writable,
            foreign,
            staging: staging.map(Mutex::new),
            writes_running: AtomicU64::new(0),
            writes_done: tokio::sync::Notify::new(),
            write_failed: Mutex::new(None),
        }
    }

    pub fn write_failed(&self, e: Errno) {
        let mut slot = self.write_failed.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    }

    /// The failure a commit must report, if a write failed since the last one.
    pub fn take_write_failure(&self) -> Option<Errno> {
        self.write_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Wait until no write of this handle is running.
    pub async fn writes_settled(&self) {
        loop {
            let done = self.writes_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.writes_running.load(Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }

    /// Whether the handle stages nothing or would commit quickly (see
    /// `Staging::commit_is_small`), checked without waiting: a staging state another
    /// request holds counts as not quick.
    pub fn commit_is_quick(&self, max_bytes: u64) -> bool {
        match &self.staging {
            None => true,
            Some(lock) => match lock.try_lock() {
                Ok(s) => s.commit_is_small(max_bytes),
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    p.into_inner().commit_is_small(max_bytes)
                }
                Err(std::sync::TryLockError::WouldBlock) => false,
            },
        }
    }

    /// The staging state of a staged handle, locked.
    pub fn staging(&self) -> Option<MutexGuard<'_, Staging>> {
        // Poisoned: a request panicked mid-operation; the ranges and the staging file
        // are updated in an order that keeps them usable (data first, then the range).
        let lock = self.staging.as_ref()?;
        Some(lock.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        // SAFETY: `fd` is not used again.
        close_off_thread(unsafe { ManuallyDrop::take(&mut self.fd) }, self.foreign);
    }
}

impl Drop for OpenDir {
    fn drop(&mut self) {
        // SAFETY: `fd` is not used again.
        close_off_thread(unsafe { ManuallyDrop::take(&mut self.fd) }, self.foreign);
    }
}

/// Close `fd`; one of a file on another filesystem mounted beneath the export on a
/// thread of its own. A handle is dropped wherever its last reference goes, often on
/// a runtime thread (a connection ending with files open), and a close there may wait
/// for that filesystem (FUSE's FLUSH, NFS writing back): hung, it would hold up every
/// connection on that thread.
fn close_off_thread(fd: OwnedFd, foreign: bool) {
    if !foreign {
        return drop(fd);
    }
    // (Without a thread, the closure and the descriptor are dropped here.)
    let spawned = std::thread::Builder::new()
        .name("ferryd-close".into())
        .spawn(move || drop(fd));
    if spawned.is_err() {
        tracing::warn!("no thread to close a file of another filesystem: closed here");
    }
}

/// An open directory stream.
#[derive(Debug)]
pub struct OpenDir {
    /// Descriptor of the directory, for `fstatat` of each entry and `GetAttr`. Closed
    /// on drop: see [`close_off_thread`].
    pub fd: ManuallyDrop<OwnedFd>,
    /// On another filesystem mounted beneath the export (see [`OpenFile::foreign`]).
    pub foreign: bool,
    /// The path it was opened by; may be stale after a rename (used only to re-add a
    /// change watch after checking it still leads to `fd`'s directory).
    pub path: RelPath,
    /// Its entries, read and stat'ed ahead of the requests for them.
    pub listing: crate::ops::dir::Listing,
}

#[derive(Debug, Clone)]
pub enum Handle {
    File(Arc<OpenFile>),
    Dir(Arc<OpenDir>),
}

impl Handle {
    /// The descriptor behind either kind, for `GetAttr`/`SetAttr`/`Fsync`.
    pub fn fd(&self) -> &OwnedFd {
        match self {
            Handle::File(f) => &f.fd,
            Handle::Dir(d) => &d.fd,
        }
    }
}

#[derive(Debug)]
pub struct Handles {
    /// A std `Mutex`, not tokio's: critical sections are a map insert/get/remove, never
    /// held across an `.await` or a system call, so contention stays negligible.
    map: Mutex<HashMap<u64, Handle>>,
    next: AtomicU64,
}

impl Default for Handles {
    fn default() -> Self {
        Handles {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }
}

impl Handles {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Handle>> {
        // A poisoned lock only means another request panicked mid-insert; the map itself
        // is still consistent (each operation is a single call), so keep serving.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, h: Handle) -> Result<u64, Errno> {
        let mut map = self.lock();
        if map.len() >= MAX_HANDLES {
            return Err(libc::EMFILE);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        map.insert(id, h);
        Ok(id)
    }

    pub fn get(&self, id: u64) -> Result<Handle, Errno> {
        self.lock().get(&id).cloned().ok_or(libc::EBADF)
    }

    pub fn file(&self, id: u64) -> Result<Arc<OpenFile>, Errno> {
        match self.get(id)? {
            Handle::File(f) => Ok(f),
            Handle::Dir(_) => Err(libc::EBADF),
        }
    }

    pub fn dir(&self, id: u64) -> Result<Arc<OpenDir>, Errno> {
        match self.get(id)? {
            Handle::Dir(d) => Ok(d),
            Handle::File(_) => Err(libc::EBADF),
        }
    }

    /// Remove a file handle; the descriptor closes when the last in-flight request
    /// using it finishes.
    pub fn remove_file(&self, id: u64) -> Result<(), Errno> {
        self.remove(id, false)
    }

    pub fn remove_dir(&self, id: u64) -> Result<(), Errno> {
        self.remove(id, true)
    }

    fn remove(&self, id: u64, dir: bool) -> Result<(), Errno> {
        let removed = {
            let mut map = self.lock();
            match map.get(&id) {
                Some(h) if matches!(h, Handle::Dir(_)) == dir => map.remove(&id),
                _ => None,
            }
        };
        // Dropped here, outside the lock: closing a descriptor is a system call.
        removed.map(drop).ok_or(libc::EBADF)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
