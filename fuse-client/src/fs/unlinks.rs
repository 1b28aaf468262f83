//! Unlinks answered before the server confirms them.
//!
//! `rm -rf` of a tree waits one round trip per file when every unlink waits for the
//! server: 5,000 files at 40 ms RTT are 200 s. But most unlinks cannot fail: the kernel
//! has already checked the directory's permissions (`default_permissions`) against
//! attributes the server's events vouch for, the server can do whatever the kernel
//! allowed (it promises so with `caps::ORDERED_UNLINK`: it runs as root on a writable
//! export), and this client knows the file, that it is not a directory, has no other
//! name and is not open here. Such an unlink is queued on the connection and answered at
//! once; the reply is handled in the background.
//!
//! Why later requests cannot overtake it: requests on one connection are sent in the
//! order they were queued, and `ferryd` runs an `Unlink` on the connection's own task
//! before it reads the next request (`runs_inline` in the server's `conn.rs`; part of
//! the capability's promise). So the
//! `rmdir` that ends `rm -rf`, a create of the same name, a listing of the directory: all
//! of this mount's requests see the unlink done. Other clients see it a round trip later
//! than the program did.
//!
//! If the server refuses it after all (an immutable file, the export changed under a
//! stale view), or the connection is lost with it on the way, the file reappears: the kernel entry, the listing and the known
//! names of the directory are dropped, a warning is logged, `unlinks_behind_failed`
//! counts it, and the next `fsync` of the directory returns the error. `fsync` of a
//! directory and unmount wait for every unlink in flight. `--sync-unlink` turns this off.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_common::proto::{Caller, FileKind, OnceKey, Request, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Core, Invalidation, Shown, errno};
use crate::conn::Sent;
use crate::error::{FsError, FsResult, TransportError};

/// Unlinks in flight at most; the next one waits for a slot.
const IN_FLIGHT: usize = 256;

/// How long the kernel keeps the attributes of a directory with unlinks in flight. It
/// rounds this up to one clock tick (4 ms at `HZ=250`); `fsync` of the directory drops
/// them, so after it `stat` sees every unlink that came before.
const BUSY_DIR_TTL: Duration = Duration::from_nanos(1);

/// Directories whose failed unlink is remembered for `fsync`, at most.
const MAX_ERRORS: usize = 1024;

#[derive(Debug)]
pub(super) struct Behind {
    enabled: AtomicBool,
    slots: Arc<Semaphore>,
    /// The first error of a failed unlink, by directory, until an `fsync` reports it.
    errors: Mutex<HashMap<u64, i32>>,
    /// Unlinks in flight by directory: its attributes from before them are handed to
    /// the kernel for no longer than the call (see [`Core::attr_ttl`]).
    in_dirs: Mutex<HashMap<u64, u32>>,
}

impl Default for Behind {
    fn default() -> Self {
        Behind {
            enabled: AtomicBool::new(false),
            slots: Arc::new(Semaphore::new(IN_FLIGHT)),
            errors: Mutex::new(HashMap::new()),
            in_dirs: Mutex::new(HashMap::new()),
        }
    }
}

impl Core {
    /// Answer unlinks that cannot fail before the server confirms them (the default of
    /// `ferry mount`; off when the mount was asked for `--sync-unlink`).
    pub fn set_unlink_behind(&self, on: bool) {
        self.unlinks.enabled.store(on, Ordering::Relaxed);
    }

    /// Whether this client can tell that unlinking `parent/name` will succeed.
    fn may_unlink_behind(&self, parent: u64, name: &[u8]) -> bool {
        // (Only once the adapter has set up the runtime.) The server's promise covers
        // the order and that it may do whatever the kernel allowed (it runs as root on
        // a writable export).
        if !self.unlinks.enabled.load(Ordering::Relaxed)
            || self.runtime.get().is_none()
            || !self.client.orders_unlinks()
        {
            return false;
        }
        let Some(ino) = self.child_of(parent, name) else {
            return false;
        };
        // Current by the event stream, and no writes of ours pending.
        let Some(attr) = self.known_attr(ino) else {
            return false;
        };
        attr.kind != FileKind::Dir && attr.nlink == 1 && self.open_of(ino).is_empty()
    }

    /// [`Core::unlink_behind`] for the FUSE thread: `None` also when it would have to
    /// wait (no free slot, no live connection at hand).
    pub fn unlink_now(&self, caller: Caller, parent: u64, name: &[u8]) -> Option<FsResult<()>> {
        if !self.may_unlink_behind(parent, name) {
            return None;
        }
        let slot = Arc::clone(&self.unlinks.slots).try_acquire_owned().ok()?;
        let req = self.unlink_request(parent, name).ok()?;
        self.dir_busy(parent, true);
        let key = self.client.once_key();
        match self.client.try_start_keyed(None, caller, req.clone(), key) {
            Some(Ok(sent)) => Some(self.unlink_sent(parent, name, sent, slot, (caller, req, key))),
            // The worker path waits for (or makes) a connection.
            _ => {
                self.dir_busy(parent, false);
                None
            }
        }
    }

    /// Unlink `parent/name` without waiting for the server, if this client can tell it
    /// will succeed; `None` means the caller must unlink it the ordinary way.
    pub(super) async fn unlink_behind(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
    ) -> Option<FsResult<()>> {
        if !self.may_unlink_behind(parent, name) {
            return None;
        }
        let slot = Arc::clone(&self.unlinks.slots).acquire_owned().await.ok()?;
        // Waiting for the slot may have taken a while (and the directory moved: the
        // path is taken only now).
        if !self.may_unlink_behind(parent, name) {
            return None;
        }
        let req = match self.unlink_request(parent, name) {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        self.dir_busy(parent, true);
        let key = self.client.once_key();
        match self
            .client
            .start_keyed(None, caller, req.clone(), key)
            .await
        {
            Ok(sent) => Some(self.unlink_sent(parent, name, sent, slot, (caller, req, key))),
            Err(e) => {
                self.dir_busy(parent, false);
                Some(Err(e.into()))
            }
        }
    }

    pub(super) fn unlink_request(&self, parent: u64, name: &[u8]) -> FsResult<Request> {
        let (p, n) = self.child(parent, name)?;
        Ok(Request::Unlink { parent: p, name: n })
    }

    /// Count an unlink in flight in `dir` (`busy`) or one that ended. Counted before
    /// it is queued: its directory's attributes must not be handed out with a TTL once
    /// the request may have run.
    fn dir_busy(&self, dir: u64, busy: bool) {
        let Ok(mut d) = self.unlinks.in_dirs.lock() else {
            return;
        };
        if busy {
            *d.entry(dir).or_default() += 1;
        } else if let Some(n) = d.get_mut(&dir) {
            *n -= 1;
            if *n == 0 {
                d.remove(&dir);
            }
        }
    }

    /// The unlink is queued: update what this client knows, handle the reply later.
    /// One whose connection broke under it is sent again with its key (`again`: the
    /// caller, the request and its key), on a task: a server that ran it answers with
    /// its first answer.
    fn unlink_sent(
        &self,
        parent: u64,
        name: &[u8],
        sent: Sent,
        slot: OwnedSemaphorePermit,
        again: (Caller, Request, OnceKey),
    ) -> FsResult<()> {
        self.stats.unlinks_behind.fetch_add(1, Ordering::Relaxed);
        let here = self.unlinked_here(parent, name);
        let name = name.to_vec();
        // Handled on the connection's reader: no task (and no wake-up) per unlink.
        let me = self.me.clone();
        let instance = sent.instance();
        sent.then(move |outcome| {
            let Some(me) = me.upgrade() else {
                return;
            };
            if let Err(t) = &outcome
                && t.may_have_run()
                && let Some(rt) = me.runtime.get().cloned()
            {
                rt.spawn(async move {
                    let (caller, req, key) = again;
                    let again = me.repeat_keyed(caller, req, key, instance);
                    let outcome = match again.await {
                        // Not remembered (the server restarted): done if the name is
                        // free (`Core::names_show`), else as lost as before.
                        Ok(Ok(Response::NotRemembered)) => {
                            let shown = Shown {
                                gone: (parent, &name),
                                holds: None,
                            };
                            match me.names_show(caller, &shown).await {
                                Ok(()) => Ok(Ok(Response::Ok)),
                                Err(_) => Err(TransportError::Disconnected),
                            }
                        }
                        r => r,
                    };
                    me.unlink_settled(parent, &name, outcome);
                    me.dir_busy(parent, false);
                    drop(slot);
                });
                return;
            }
            me.unlink_settled(parent, &name, outcome);
            me.dir_busy(parent, false);
            drop(slot);
        });
        here
    }

    fn unlink_settled(
        &self,
        parent: u64,
        name: &[u8],
        outcome: Result<Result<Response, i32>, TransportError>,
    ) {
        let (e, what) = match outcome {
            Ok(Ok(reply)) => {
                // The directory's new attributes, for the kernel's next `GETATTR`.
                self.unwrap_reply(reply);
                return;
            }
            // Someone else removed it first (what was asked for is done), or the path
            // named another directory by the time it arrived: either way this client's
            // view of the directory is not to be trusted.
            Ok(Err(libc::ENOENT)) => {
                self.forget_view(parent, name);
                return;
            }
            Ok(Err(e)) => (e, "refused by the server"),
            Err(t) => (
                FsError::from(t).errno(),
                "lost with the connection (it may or may not have been applied)",
            ),
        };
        self.stats
            .unlinks_behind_failed
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            dir = ?self.path(parent).unwrap_or_default(),
            name = %String::from_utf8_lossy(name),
            "unlink answered ahead {what}: {}; the file stays",
            crate::error::errno_text(e)
        );
        if let Ok(mut errors) = self.unlinks.errors.lock()
            && errors.len() < MAX_ERRORS
        {
            errors.entry(parent).or_insert(e);
        }
        self.forget_view(parent, name);
    }

    /// Whatever this client believed about `dir` and `name` in it is wrong now.
    fn forget_view(&self, dir: u64, name: &[u8]) {
        self.forget_names(dir);
        self.dir_changed(dir);
        self.listing_changed(dir, Some(name));
        self.forget_attr(dir);
        self.invalidate(Invalidation::Entry {
            parent: dir,
            name: name.to_vec(),
        });
        self.invalidate_attrs(dir);
    }

    /// How long the kernel may keep the attributes of `ino` it is given now: the usual
    /// TTL, but only a moment for a directory with unlinks in flight (its times are
    /// about to change; `stat` a moment later gets the server's). The kernel drops a
    /// directory's attributes after every unlink in it and, under
    /// `default_permissions`, checks the directory twice in the next `unlinkat`: with
    /// no TTL at all each check asked again; [`BUSY_DIR_TTL`] lets them share one.
    pub fn attr_ttl(&self, ino: u64) -> Duration {
        // (Asked before the attributes are read: a reply landing in between then costs
        // one more GETATTR, never a stale answer kept for the TTL.)
        // Every slot free: no unlink in flight anywhere (a slot is taken before its
        // directory is counted and given back after), so no lock on this hot path.
        let busy = self.unlinks.slots.available_permits() < IN_FLIGHT
            && self
                .unlinks
                .in_dirs
                .lock()
                .is_ok_and(|d| d.contains_key(&ino));
        if busy { BUSY_DIR_TTL } else { self.ttl() }
    }

    /// `fsync` of directory `dir`: every unlink in flight has reached the server, and
    /// the first one in `dir` that failed since the last `fsync` is reported.
    pub async fn fsyncdir(&self, dir: u64) -> FsResult<()> {
        // Fair: unlinks started after this call wait behind it.
        drop(self.unlinks.slots.acquire_many(IN_FLIGHT as u32).await);
        // Attributes handed out while unlinks were in flight may still be cached for a
        // tick: the kernel drops them before this returns.
        self.invalidate_attrs_now(dir);
        let failed = self
            .unlinks
            .errors
            .lock()
            .ok()
            .and_then(|mut e| e.remove(&dir));
        match failed {
            Some(e) => errno(e),
            None => Ok(()),
        }
    }

    /// Wait (at most `limit`) until no unlink is in flight. Each one ends within the
    /// connection's timeout, so this cannot hang on a dead server.
    pub async fn settle_unlinks(&self, limit: Duration) {
        let all = self.unlinks.slots.acquire_many(IN_FLIGHT as u32);
        drop(tokio::time::timeout(limit, all).await);
    }

    /// Before unlinking `parent/name`: its server inode if it may have other names (its
    /// link count is above one, or not known).
    pub(super) fn other_names_of(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let ino = self.child_of(parent, name)?;
        let attr = self
            .inodes()
            .ok()?
            .get(&ino)
            .and_then(|st| st.attr.map(|(a, _)| a));
        match attr {
            Some(a) if a.kind == FileKind::Dir || a.nlink <= 1 => None,
            _ => Some(self.server_ino(ino)),
        }
    }

    /// Server inode `sino` changed where a kept listing showing it may not hear of it:
    /// its link count, through a name this client added or removed, or a file with
    /// several names, changed through one of them. Cached listings that show it under
    /// its other names carry the old attributes, and no event will correct them: the
    /// server watches directories, and reports a change to the directory of the name it
    /// went through (a link count change to none of them).
    pub(super) fn link_count_changed(&self, sino: u64) {
        super::dirs::DIR_EPOCH.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut c) = self.dir_cache.lock() {
            c.forget_showing(sino);
        }
    }

    /// What this client knows changes when `parent/name` is gone (its own unlink or
    /// rmdir, done or on its way).
    pub(super) fn unlinked_here(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.dir_changed(parent);
        self.listing_changed(parent, Some(name));
        self.names_changed(parent, name, false);
        let gone = self.nodes()?.child(parent, name);
        if let Some(ino) = gone {
            // Its link count and ctime changed.
            self.forget_attr(ino);
        }
        self.nodes()?.unlinked(parent, name);
        Ok(())
    }
}
