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
//! descriptor is closed where it is, as before. Space shows as free in `statfs` once
//! the reaper got to the file, microseconds to milliseconds later.

use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

/// Files waiting to be freed, at most.
const QUEUE: usize = 256;

static REAPER: OnceLock<Option<SyncSender<OwnedFd>>> = OnceLock::new();

/// Close `held` (the last reference to a file whose last name is gone) on the reaper
/// thread, or here when that cannot be.
pub fn later(held: OwnedFd) {
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = sync_channel::<OwnedFd>(QUEUE);
        std::thread::Builder::new()
            .name("ferryd-reap".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    let Some(tx) = reaper else {
        return drop(held);
    };
    match tx.try_send(held) {
        Ok(()) => {}
        Err(TrySendError::Full(held) | TrySendError::Disconnected(held)) => drop(held),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// The descriptor handed over is closed by the reaper, not kept: the file it held
    /// (unlinked) goes.
    #[test]
    fn a_held_file_is_closed_on_the_reaper_thread() {
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
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while names_held() {
            assert!(
                std::time::Instant::now() < deadline,
                "the reaper did not close {link} within 10 s"
            );
            std::thread::yield_now();
        }
    }
}
