//! Files freed off the request path.
//!
//! Removing a file's last name frees its blocks inside `unlinkat` when nothing holds
//! the file: on ext4 that is a truncate of every extent and, on a filesystem mounted
//! with `discard`, a discard the call waits for. Unlinks run inline on their
//! connection's task, in order (`caps::ORDERED_UNLINK`), so that wait held up every
//! request behind it: the `rmdir` that ends each directory of an `rm -rf` waited for
//! the directory's unlinks one after the other (2.2 ms for ten files here). An unlink
//! now holds the file by an `O_PATH` descriptor (a reference; no permission on the file
//! is needed) while it removes the name, which is all a later request can see, and
//! hands the descriptor to the reaper thread, whose `close` frees the file.
//!
//! The queue is bounded: when it is full, or the thread could not be started, the
//! descriptor is closed where it is, as before. A request that takes space (a write, a
//! create, a commit, `statfs`: `ops::takes_space`) first waits for the files queued
//! before it ([`settle`]): the space of what was removed earlier is free by then, as
//! when the removal freed it itself, and a write right after an `rm` on a full export
//! does not fail with `ENOSPC`. A removed directory's watch goes (`IN_IGNORED`) when
//! the last file held in it is closed, not at its `rmdir`.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Files waiting to be freed, at most.
const QUEUE: usize = 256;

/// Longest [`settle`] waits (a disk that stopped answering must not stop the server).
const SETTLE_MAX: Duration = Duration::from_secs(5);

static REAPER: OnceLock<Option<SyncSender<OwnedFd>>> = OnceLock::new();

/// Files handed to the reaper and not closed yet.
static PENDING: AtomicUsize = AtomicUsize::new(0);
/// Signalled when `PENDING` drops to zero.
static SETTLED: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());

/// Close `held` (the last reference to a file whose last name is gone) on the reaper
/// thread, or here when that cannot be.
pub fn later(held: OwnedFd) {
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = sync_channel::<OwnedFd>(QUEUE);
        std::thread::Builder::new()
            .name("ferryd-reap".into())
            .spawn(move || {
                for held in rx {
                    drop(held);
                    if PENDING.fetch_sub(1, Ordering::SeqCst) == 1 {
                        let _guard = SETTLED.0.lock().unwrap_or_else(|p| p.into_inner());
                        SETTLED.1.notify_all();
                    }
                }
            })
            .ok()
            .map(|_| tx)
    });
    let Some(tx) = reaper else {
        return drop(held);
    };
    PENDING.fetch_add(1, Ordering::SeqCst);
    if let Err(TrySendError::Full(held) | TrySendError::Disconnected(held)) = tx.try_send(held) {
        drop(held);
        PENDING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wait until every file handed over so far is closed (at most [`SETTLE_MAX`]).
pub fn settle() {
    if PENDING.load(Ordering::SeqCst) == 0 {
        return;
    }
    let deadline = Instant::now() + SETTLE_MAX;
    let mut guard = SETTLED.0.lock().unwrap_or_else(|p| p.into_inner());
    while PENDING.load(Ordering::SeqCst) > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::warn!("files removed earlier are still being freed after 5 s");
            return;
        }
        guard = match SETTLED.1.wait_timeout(guard, left) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A descriptor handed over is closed, not kept: the file it held (unlinked) goes,
    /// at the latest when `settle` returns.
    #[test]
    fn a_file_handed_over_is_closed_by_settle_at_the_latest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("held");
        std::fs::write(&path, b"bytes").expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let link = format!("/proc/self/fd/{}", file.as_raw_fd());
        std::fs::remove_file(&path).expect("unlink");
        let names_held = || {
            std::fs::read_link(&link).is_ok_and(|t| t.to_string_lossy().ends_with("held (deleted)"))
        };
        assert!(names_held(), "{link} is the unlinked file before");
        later(OwnedFd::from(file));
        settle();
        assert!(!names_held(), "{link} still holds the file after settle");
    }
}
