//! Listings the server keeps in memory, with their attributes, while its watches vouch
//! for them: a client that lists a directory another client (or an earlier mount)
//! listed gets it without a `getdents` or an `fstatat` per entry, whatever the kernel
//! has dropped from its caches meanwhile.
//!
//! Only the bookkeeping lives here (no I/O): which listing is kept, since which watch
//! generation it is current, and which goes when the byte budget is full (least recently
//! used first). Whether a kept listing is still current is [`super::Watcher`]'s to say.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_common::DirEntry;

/// Bytes all kept listings may hold together (as counted for frames: name plus a
/// conservative size of the attributes); a 100,000-entry directory is about 20 MB.
pub const KEPT_BYTES: usize = 64 << 20;

/// A listing bigger than this is not kept.
pub const KEPT_LISTING_MAX: usize = KEPT_BYTES / 2;

/// How long after its stream opened a kept listing is handed out at most, however
/// quiet its directory: a change no watch reports (a hard link made on the server's
/// disk in a directory nobody watches, an access time, a store into a shared mapping)
/// reaches a client that lists the directory afresh at most this much later than
/// without kept listings (its own cache may then keep it for its TTL).
pub const KEPT_FOR: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Kept {
    entries: Arc<[DirEntry]>,
    /// The watch generation the listing began at: current while its directory's watch
    /// has reported nothing since (see [`super::Watcher::cached_listing`]).
    since: u64,
    /// Whether the entries carry extended-attribute hints (for clients that ask).
    hints: bool,
    bytes: usize,
    at: Instant,
    /// When it was last handed out or kept, in `Listings::clock` ticks.
    used: u64,
}

/// Kept listings by directory (device, inode).
#[derive(Debug, Default)]
pub struct Listings {
    by_dir: HashMap<(u64, u64), Kept>,
    /// `Kept::used` → directory: the least recently used first.
    by_use: BTreeMap<u64, (u64, u64)>,
    bytes: usize,
    clock: u64,
}

impl Listings {
    /// The listing kept for directory `id` with `hints` and the generation it began
    /// at, if `current(since)` says it still is (else it is dropped). `now`: for
    /// [`KEPT_FOR`].
    pub fn get(
        &mut self,
        id: (u64, u64),
        hints: bool,
        now: Instant,
        current: impl FnOnce(u64) -> bool,
    ) -> Option<(Arc<[DirEntry]>, u64)> {
        let k = self.by_dir.get(&id)?;
        if k.hints != hints {
            return None;
        }
        if now.saturating_duration_since(k.at) >= KEPT_FOR || !current(k.since) {
            self.remove(id);
            return None;
        }
        self.clock += 1;
        let used = self.clock;
        let k = self.by_dir.get_mut(&id)?;
        self.by_use.remove(&k.used);
        k.used = used;
        self.by_use.insert(used, id);
        Some((Arc::clone(&k.entries), k.since))
    }

    /// Keep `entries` of directory `id`, a listing begun at generation `since` and
    /// time `at`, in place of any older one; `bytes`: their size as counted for
    /// frames. Evicts the least recently used listings past [`KEPT_BYTES`].
    pub fn keep(
        &mut self,
        id: (u64, u64),
        since: u64,
        hints: bool,
        entries: Vec<DirEntry>,
        bytes: usize,
        at: Instant,
    ) {
        if bytes > KEPT_LISTING_MAX {
            return;
        }
        if let Some(old) = self.by_dir.get(&id)
            && old.since > since
        {
            return; // a newer listing is kept already
        }
        self.remove(id);
        while self.bytes + bytes > KEPT_BYTES {
            let Some((_, &oldest)) = self.by_use.iter().next() else {
                break;
            };
            self.remove(oldest);
        }
        self.clock += 1;
        self.by_use.insert(self.clock, id);
        self.bytes += bytes;
        self.by_dir.insert(
            id,
            Kept {
                entries: entries.into(),
                since,
                hints,
                bytes,
                at,
                used: self.clock,
            },
        );
    }

    fn remove(&mut self, id: (u64, u64)) {
        if let Some(k) = self.by_dir.remove(&id) {
            self.by_use.remove(&k.used);
            self.bytes -= k.bytes;
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Listings held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_dir.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::{Attr, FileKind, Name, Timespec};

    fn entries(n: usize) -> Vec<DirEntry> {
        let t = Timespec { sec: 0, nsec: 0 };
        (0..n)
            .map(|i| DirEntry {
                name: Name(format!("f{i}").into_bytes()),
                attr: Attr {
                    ino: i as u64,
                    size: 0,
                    blocks: 0,
                    atime: t,
                    mtime: t,
                    ctime: t,
                    kind: FileKind::File,
                    perm: 0o644,
                    nlink: 1,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    blksize: 4096,
                    version: 0,
                    xattrs: 0,
                    uncovered: false,
                },
            })
            .collect()
    }

    #[test]
    fn a_kept_listing_is_handed_out_only_while_current_and_young() {
        let mut l = Listings::default();
        let now = Instant::now();
        l.keep((1, 2), 7, false, entries(3), 300, now);
        assert_eq!(
            l.get((1, 2), false, now, |since| since == 7)
                .map(|e| e.0.len()),
            Some(3)
        );
        // Asked with the other hint setting: not this one, and it stays.
        assert!(l.get((1, 2), true, now, |_| true).is_none());
        assert_eq!(l.len(), 1);
        // Too old (counted from when its stream opened): dropped.
        assert!(l.get((1, 2), false, now + KEPT_FOR, |_| true).is_none());
        assert_eq!((l.len(), l.bytes()), (0, 0));
        let opened = now - KEPT_FOR;
        l.keep((1, 2), 7, false, entries(3), 300, opened);
        assert!(l.get((1, 2), false, now, |_| true).is_none());
        assert_eq!((l.len(), l.bytes()), (0, 0));
        // Not current any more: dropped.
        l.keep((1, 2), 7, false, entries(3), 300, now);
        assert!(l.get((1, 2), false, now, |since| since > 7).is_none());
        assert_eq!((l.len(), l.bytes()), (0, 0));
    }

    #[test]
    fn an_older_listing_does_not_replace_a_newer_one() {
        let mut l = Listings::default();
        let now = Instant::now();
        l.keep((1, 2), 9, false, entries(2), 200, now);
        l.keep((1, 2), 8, false, entries(5), 500, now);
        assert_eq!(
            l.get((1, 2), false, now, |_| true).map(|e| e.0.len()),
            Some(2)
        );
        l.keep((1, 2), 10, false, entries(4), 400, now);
        assert_eq!(
            l.get((1, 2), false, now, |_| true).map(|e| e.0.len()),
            Some(4)
        );
        assert_eq!(l.bytes(), 400);
    }

    #[test]
    fn the_least_recently_used_listings_go_past_the_budget() {
        let mut l = Listings::default();
        let now = Instant::now();
        let third = KEPT_BYTES / 3;
        l.keep((0, 1), 1, false, entries(1), third, now);
        l.keep((0, 2), 1, false, entries(1), third, now);
        l.keep((0, 3), 1, false, entries(1), third, now);
        // 1 is used, so 2 is the least recently used when 4 comes.
        assert!(l.get((0, 1), false, now, |_| true).is_some());
        l.keep((0, 4), 1, false, entries(1), third, now);
        assert!(l.get((0, 2), false, now, |_| true).is_none());
        for kept in [1, 3, 4] {
            assert!(l.get((0, kept), false, now, |_| true).is_some(), "{kept}");
        }
        assert!(l.bytes() <= KEPT_BYTES);
        // Too big to keep at all: nothing else goes for it.
        l.keep((0, 5), 1, false, entries(1), KEPT_LISTING_MAX + 1, now);
        assert_eq!(l.len(), 3);
    }
}
