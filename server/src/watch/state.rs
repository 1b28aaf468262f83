//! The bookkeeping behind [`super::Watcher`], free of system calls so it can be tested
//! with synthetic events: parsing what inotify returns, the maps between watch
//! descriptors, directory paths and inodes, and turning a batch of kernel events into
//! the (directory, entry) pairs that changed.
//!
//! Must never do I/O: everything that touches the filesystem or the inotify descriptor
//! is the caller's, which keeps this deterministic.

use std::collections::{HashMap, HashSet};

/// One event as read from the inotify descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub wd: i32,
    pub mask: u32,
    pub cookie: u32,
    /// The entry inside the watched directory; `None` for the directory itself.
    pub name: Option<Vec<u8>>,
}

/// Parse a buffer filled by `read(2)` on an inotify descriptor; stops at anything
/// truncated (the kernel only returns whole events, so that would be a bug, not data).
pub fn parse_events(buf: &[u8], out: &mut Vec<RawEvent>) {
    const HEADER: usize = 16; // wd, mask, cookie, len: four 32-bit words
    let mut rest = buf;
    while rest.len() >= HEADER {
        let word = |i: usize| {
            let b: [u8; 4] = rest[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]);
            u32::from_ne_bytes(b)
        };
        let (wd, mask, cookie, len) = (word(0) as i32, word(1), word(2), word(3) as usize);
        let Some(name) = rest.get(HEADER..HEADER + len) else {
            break;
        };
        // The name is NUL-padded to an alignment boundary.
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let name = (end > 0).then(|| name[..end].to_vec());
        out.push(RawEvent {
            wd,
            mask,
            cookie,
            name,
        });
        rest = &rest[HEADER + len..];
    }
}

/// A watched directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// Relative to the export root, kept current across renames we can see.
    pub path: Vec<u8>,
    pub dev: u64,
    pub ino: u64,
    /// [`State::generation`] when this watch was added or last reported an event: a
    /// listing begun at a later generation saw everything it reported (see
    /// [`super::Watcher::cached_listing`]).
    pub changed: u64,
}

/// The bookkeeping of watches, separate from the inotify descriptor so it can be
/// tested with synthetic events.
#[derive(Debug, Default)]
pub struct State {
    pub by_wd: HashMap<i32, Watch>,
    pub by_path: HashMap<Vec<u8>, i32>,
    pub by_inode: HashMap<(u64, u64), i32>,
    /// Every device a watch was ever on (a few: filesystems mounted in the export).
    pub devs: HashSet<u64>,
    /// Watches set aside by a move onto their path (see [`State::rename`]), and the
    /// batches they waited.
    parked: HashMap<i32, u8>,
    /// Watches a request gave a new path since the last batch: where they are now is
    /// known already, whatever a move read later says was at their new path.
    repathed: HashSet<i32>,
    /// Watches moved by this batch's renames, to be checked once it is digested.
    moved: HashSet<i32>,
    /// File handles of watched directories (on the root's filesystem), kept after their
    /// watch goes (moved out of sight, say): they find a directory wherever it went.
    pub handles: HashMap<(u64, u64), crate::sys::Handle>,
    /// Directory `IN_MOVED_FROM`s waiting for their `IN_MOVED_TO`: cookie → (old path,
    /// batches waited). The pair may straddle two reads, so one extra batch is allowed.
    moves: HashMap<u32, (Vec<u8>, u8)>,
    /// Counts batches digested and watches added: every watch's [`Watch::changed`] and
    /// `overflowed` are values of it.
    pub generation: u64,
    /// The generation of the last batch in which the kernel's queue overflowed (events
    /// were lost everywhere before it).
    pub overflowed: u64,
    /// Files (node ids) that may have changed with no event from the watch of every
    /// directory that lists them, and the generation when that was noted: files that
    /// gained a link, and files changed through a handle (see
    /// [`super::Watcher::note_touched`]).
    pub touched: HashMap<u64, u64>,
    /// Past [`TOUCHED_MAX`] files, `touched` starts again from this generation: any
    /// file may have been touched before it.
    pub touched_floor: u64,
}

/// Most files [`State::touched`] remembers.
pub const TOUCHED_MAX: usize = 1 << 16;

/// An entry (or, with `name: None`, the directory itself) that changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The directory's path when the event was read.
    pub dir: Vec<u8>,
    /// The directory's (device, inode): which directory it is, whatever its path.
    pub id: (u64, u64),
    pub name: Option<Vec<u8>>,
}

/// What one batch of kernel events amounts to, before anything is stat'ed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Digest {
    /// Entries that changed, in first-seen order, without duplicates.
    pub changed: Vec<Change>,
    /// Watched directories that moved: still at their recorded path, or gone from view?
    pub moved_self: Vec<(i32, Vec<u8>)>,
    pub resync: bool,
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        return name.to_vec();
    }
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// `path` is `dir` or beneath it.
fn is_under(path: &[u8], dir: &[u8]) -> bool {
    path.starts_with(dir) && (path.len() == dir.len() || path.get(dir.len()) == Some(&b'/'))
}

impl State {
    /// Record a watch; returns the watch this displaced from `path` (another directory
    /// now lives there), which the caller removes from the kernel.
    pub fn insert(&mut self, wd: i32, path: Vec<u8>, dev: u64, ino: u64) -> Option<(i32, Watch)> {
        self.parked.remove(&wd);
        if let Some(old) = self.by_wd.get(&wd) {
            if old.path != path {
                self.repathed.insert(wd);
            }
            // Same inode known under an older path: the one just resolved is current.
            if self.by_path.get(&old.path) == Some(&wd) {
                self.by_path.remove(&old.path);
            }
        }
        let displaced = self.by_path.insert(path.clone(), wd).filter(|&o| o != wd);
        let mut gone = None;
        if let Some(other) = displaced {
            // The path now names another directory than before, and where the old one
            // went is unknown (we missed its move): stop watching it.
            self.by_path.insert(path.clone(), other);
            gone = self.forget(other).map(|w| (other, w));
            self.by_path.insert(path.clone(), wd);
        }
        self.by_inode.insert((dev, ino), wd);
        self.devs.insert(dev);
        self.generation += 1;
        let changed = self.generation;
        self.by_wd.insert(
            wd,
            Watch {
                path,
                dev,
                ino,
                changed,
            },
        );
        gone
    }

    /// Keep the file handle of directory `id`. Past as many handles as four times the
    /// watches (at least 65,536), those of directories no longer watched go.
    pub fn keep_handle(&mut self, id: (u64, u64), handle: crate::sys::Handle) {
        self.handles.insert(id, handle);
        if self.handles.len() > (4 * self.by_wd.len()).max(1 << 16) {
            let by_inode = &self.by_inode;
            self.handles.retain(|id, _| by_inode.contains_key(id));
        }
    }

    /// Note that the file `node` may have changed unseen by its directories' watches.
    pub fn touch(&mut self, node: u64) {
        self.generation += 1;
        if self.touched.len() >= TOUCHED_MAX && !self.touched.contains_key(&node) {
            self.touched.clear();
            self.touched_floor = self.generation;
        }
        self.touched.insert(node, self.generation);
    }

    /// Trust nothing told before now (events were lost).
    pub fn distrust(&mut self) {
        self.generation += 1;
        self.overflowed = self.generation;
    }

    /// Drop watch `wd` from the maps; returns what it watched.
    pub fn forget(&mut self, wd: i32) -> Option<Watch> {
        self.parked.remove(&wd);
        self.repathed.remove(&wd);
        self.moved.remove(&wd);
        let w = self.by_wd.remove(&wd)?;
        if self.by_path.get(&w.path) == Some(&wd) {
            self.by_path.remove(&w.path);
        }
        if self.by_inode.get(&(w.dev, w.ino)) == Some(&wd) {
            self.by_inode.remove(&(w.dev, w.ino));
        }
        Some(w)
    }

    /// Watches at or beneath `dir`.
    pub fn under(&self, dir: &[u8]) -> Vec<i32> {
        self.by_wd
            .iter()
            .filter(|(_, w)| is_under(&w.path, dir))
            .map(|(&wd, _)| wd)
            .collect()
    }

    /// A directory moved from `old` to `new`: every watch beneath follows. Watches at
    /// `new` and beneath before the move are set aside (`parked`): the directory there
    /// was replaced (removed: its watch goes with its `IN_IGNORED`) or, for an exchange
    /// (`renameat2(RENAME_EXCHANGE)`, reported as two moves, maybe split between two
    /// batches), is about to move to `old`: the next move from `new` then takes only
    /// them.
    pub fn rename(&mut self, old: &[u8], new: &[u8]) {
        if old.is_empty() {
            return; // the root never moves within itself
        }
        let beneath = self.under(old);
        let parked: Vec<i32> = beneath
            .iter()
            .copied()
            .filter(|wd| self.parked.contains_key(wd))
            .collect();
        let moving = if parked.is_empty() { beneath } else { parked };
        // (Not one a request already found at `new`: that is the one that moved.)
        let displaced: Vec<i32> = self
            .under(new)
            .into_iter()
            .filter(|wd| !moving.contains(wd) && !self.repathed.contains(wd))
            .collect();
        for wd in &displaced {
            if let Some(w) = self.by_wd.get(wd)
                && self.by_path.get(&w.path) == Some(wd)
            {
                self.by_path.remove(&w.path);
            }
        }
        for wd in moving {
            self.parked.remove(&wd);
            if let Some(w) = self.by_wd.get_mut(&wd) {
                if w.path == old {
                    self.moved.insert(wd);
                }
                let mut path = new.to_vec();
                path.extend_from_slice(&w.path[old.len()..]);
                if self.by_path.get(&w.path) == Some(&wd) {
                    self.by_path.remove(&w.path);
                }
                w.path = path.clone();
                self.by_path.insert(path, wd);
            }
        }
        self.parked.extend(displaced.into_iter().map(|wd| (wd, 0)));
    }

    /// Turn one batch into a digest, updating paths for the renames it contains.
    pub fn digest(&mut self, batch: &[RawEvent]) -> Digest {
        let mut d = Digest::default();
        let mut seen = HashSet::new();
        let mut push = |d: &mut Digest, (dir, id): &(Vec<u8>, (u64, u64)), name: Option<&[u8]>| {
            let name = name.map(<[u8]>::to_vec);
            if seen.insert((*id, name.clone())) {
                d.changed.push(Change {
                    dir: dir.clone(),
                    id: *id,
                    name,
                });
            }
        };
        for m in self.moves.values_mut() {
            m.1 += 1;
        }
        for age in self.parked.values_mut() {
            *age += 1;
        }
        self.generation += 1;
        let generation = self.generation;
        for ev in batch {
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                d.resync = true;
                self.overflowed = generation;
                continue;
            }
            if let Some(w) = self.by_wd.get_mut(&ev.wd) {
                w.changed = generation;
            }
            if ev.mask & libc::IN_IGNORED != 0 {
                // The watch is gone (directory deleted, unmounted, or removed by us).
                let _ = self.forget(ev.wd);
                continue;
            }
            let Some(at) = self
                .by_wd
                .get(&ev.wd)
                .map(|w| (w.path.clone(), (w.dev, w.ino)))
            else {
                continue; // a watch we already dropped; its last events do not matter
            };
            let dir = &at.0;
            let Some(name) = &ev.name else {
                if ev.mask & libc::IN_MOVE_SELF != 0 {
                    d.moved_self.push((ev.wd, dir.clone()));
                }
                push(&mut d, &at, None);
                continue;
            };
            push(&mut d, &at, Some(name));
            let entries =
                libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO;
            if ev.mask & entries != 0 {
                // The directory's own mtime, size and link count changed too.
                push(&mut d, &at, None);
            }
            if ev.mask & libc::IN_ISDIR != 0 {
                if ev.mask & libc::IN_MOVED_FROM != 0 {
                    self.moves.insert(ev.cookie, (join(dir, name), 0));
                } else if ev.mask & libc::IN_MOVED_TO != 0
                    && let Some((old, _)) = self.moves.remove(&ev.cookie)
                {
                    self.rename(&old, &join(dir, name));
                }
            }
        }
        // A move whose other half never came went out of our sight; the directory's
        // own IN_MOVE_SELF (checked against the disk) takes care of its watches.
        self.moves.retain(|_, m| m.1 < 1);
        // A watch set aside a batch ago and not taken by a move since (an exchange's
        // second half may come in the next batch): its directory was replaced (its
        // removal is reported once nothing holds it any more) or went where we cannot
        // see. It is checked like a directory that moved itself.
        let moved = &mut self.moved;
        self.parked.retain(|&wd, age| {
            if *age >= 1 {
                moved.insert(wd);
            }
            *age < 1
        });
        // Each directory a move took is checked where the bookkeeping put it (an
        // exchange with a directory nobody watched puts it back at its old path).
        for wd in self.moved.drain() {
            if let Some(w) = self.by_wd.get(&wd) {
                d.moved_self.push((wd, w.path.clone()));
            }
        }
        self.repathed.clear();
        // Each change is looked at where its directory is now: one renamed later in the
        // batch (`mkdir tmp; fill it; mv tmp final`) has its entries stat'ed under its
        // new path, not reported gone from the old one.
        for c in &mut d.changed {
            if let Some(w) = self.by_inode.get(&c.id).and_then(|wd| self.by_wd.get(wd)) {
                c.dir.clone_from(&w.path);
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(wd: i32, mask: u32, cookie: u32, name: Option<&str>) -> RawEvent {
        RawEvent {
            wd,
            mask,
            cookie,
            name: name.map(|n| n.as_bytes().to_vec()),
        }
    }

    fn key(dir: &str, name: Option<&str>) -> (Vec<u8>, Option<Vec<u8>>) {
        (dir.as_bytes().to_vec(), name.map(|n| n.as_bytes().to_vec()))
    }

    /// (directory path, entry) of each change.
    fn pairs(d: &Digest) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        d.changed
            .iter()
            .map(|c| (c.dir.clone(), c.name.clone()))
            .collect()
    }

    #[test]
    fn parses_kernel_layout() {
        let mut buf = Vec::new();
        for (wd, mask, cookie, name) in [(1i32, 2u32, 3u32, &b"abc"[..]), (4, 5, 6, b"")] {
            let padded = if name.is_empty() { 0 } else { 16 };
            buf.extend_from_slice(&wd.to_ne_bytes());
            buf.extend_from_slice(&mask.to_ne_bytes());
            buf.extend_from_slice(&cookie.to_ne_bytes());
            buf.extend_from_slice(&(padded as u32).to_ne_bytes());
            let mut n = name.to_vec();
            n.resize(padded, 0);
            buf.extend_from_slice(&n);
        }
        let mut out = Vec::new();
        parse_events(&buf, &mut out);
        assert_eq!(out, vec![ev(1, 2, 3, Some("abc")), ev(4, 5, 6, None)]);
        // Truncated input stops cleanly.
        let mut out = Vec::new();
        parse_events(&buf[..20], &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn coalesces_and_reports_the_directory_itself() {
        let mut s = State::default();
        s.insert(1, b"d".to_vec(), 1, 10);
        let d = s.digest(&[
            ev(1, libc::IN_CREATE, 0, Some("f")),
            ev(1, libc::IN_MODIFY, 0, Some("f")),
            ev(1, libc::IN_MODIFY, 0, Some("f")),
            ev(1, libc::IN_ATTRIB, 0, None),
            ev(7, libc::IN_CREATE, 0, Some("unknown wd")),
        ]);
        assert_eq!(pairs(&d), vec![key("d", Some("f")), key("d", None)]);
        assert!(d.changed.iter().all(|c| c.id == (1, 10)));
        assert!(!d.resync);
    }

    #[test]
    fn directory_renames_move_every_watch_beneath() {
        let mut s = State::default();
        s.insert(1, b"".to_vec(), 1, 1);
        s.insert(2, b"a".to_vec(), 1, 2);
        s.insert(3, b"a/b".to_vec(), 1, 3);
        s.insert(4, b"ab".to_vec(), 1, 4);
        let dir = libc::IN_ISDIR;
        let d = s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 9, Some("a")),
            ev(4, libc::IN_MOVED_TO | dir, 9, Some("z")),
            ev(3, libc::IN_CREATE, 0, Some("f")),
        ]);
        assert_eq!(s.by_wd[&2].path, b"ab/z");
        assert_eq!(s.by_wd[&3].path, b"ab/z/b");
        assert_eq!(
            s.by_wd[&4].path, b"ab",
            "a sibling sharing the prefix stays"
        );
        assert_eq!(s.by_path[&b"ab/z/b"[..]], 3);
        assert!(!s.by_path.contains_key(&b"a/b"[..]));
        let changed = pairs(&d);
        assert!(changed.contains(&key("ab/z/b", Some("f"))));
        assert!(changed.contains(&key("", Some("a"))));
        assert!(changed.contains(&key("ab", Some("z"))));
        // Each names its directory by inode too: `a/b` is still inode 3.
        assert!(
            d.changed
                .iter()
                .any(|c| c.id == (1, 3) && c.name.as_deref() == Some(&b"f"[..]))
        );
    }

    #[test]
    fn changes_before_a_rename_in_the_same_batch_are_placed_under_the_new_path() {
        let mut s = State::default();
        s.insert(1, b"".to_vec(), 1, 1);
        s.insert(2, b"tmp".to_vec(), 1, 2);
        let dir = libc::IN_ISDIR;
        let d = s.digest(&[
            ev(2, libc::IN_CREATE, 0, Some("f")),
            ev(1, libc::IN_MOVED_FROM | dir, 4, Some("tmp")),
            ev(1, libc::IN_MOVED_TO | dir, 4, Some("final")),
            ev(2, libc::IN_MODIFY, 0, Some("f")),
        ]);
        let changed = pairs(&d);
        assert!(changed.contains(&key("final", Some("f"))), "{changed:?}");
        assert!(!changed.contains(&key("tmp", Some("f"))), "{changed:?}");
        assert!(changed.contains(&key("", Some("tmp"))));
    }

    #[test]
    fn a_move_may_straddle_two_batches_but_not_three() {
        let mut s = State::default();
        s.insert(1, b"".to_vec(), 1, 1);
        s.insert(2, b"a".to_vec(), 1, 2);
        let dir = libc::IN_ISDIR;
        s.digest(&[ev(1, libc::IN_MOVED_FROM | dir, 5, Some("a"))]);
        s.digest(&[ev(1, libc::IN_MOVED_TO | dir, 5, Some("b"))]);
        assert_eq!(s.by_wd[&2].path, b"b");
        s.digest(&[ev(1, libc::IN_MOVED_FROM | dir, 6, Some("b"))]);
        s.digest(&[]);
        s.digest(&[ev(1, libc::IN_MOVED_TO | dir, 6, Some("c"))]);
        assert_eq!(s.by_wd[&2].path, b"b", "too late to pair");
    }

    #[test]
    fn ignored_forgets_and_overflow_resyncs() {
        let mut s = State::default();
        s.insert(2, b"a".to_vec(), 1, 2);
        let d = s.digest(&[
            ev(2, libc::IN_DELETE_SELF, 0, None),
            ev(2, libc::IN_IGNORED, 0, None),
            ev(-1, libc::IN_Q_OVERFLOW, 0, None),
        ]);
        assert_eq!(pairs(&d), vec![key("a", None)]);
        assert!(d.resync);
        assert!(s.by_wd.is_empty() && s.by_path.is_empty() && s.by_inode.is_empty());
    }

    #[test]
    fn same_inode_under_a_new_path_replaces_the_old() {
        let mut s = State::default();
        assert_eq!(s.insert(2, b"a".to_vec(), 1, 2), None);
        assert_eq!(s.insert(2, b"b".to_vec(), 1, 2), None);
        assert!(!s.by_path.contains_key(&b"a"[..]));
        assert_eq!(s.by_path[&b"b"[..]], 2);
        // A new directory at an old path replaces that path's watch.
        assert!(matches!(s.insert(3, b"b".to_vec(), 1, 3), Some((2, w)) if w.ino == 2));
        assert_eq!(s.by_path[&b"b"[..]], 3);
        assert!(!s.by_wd.contains_key(&2));
    }

    #[test]
    fn exchanged_directories_each_keep_their_watches() {
        let mut s = State::default();
        s.insert(1, b"".to_vec(), 1, 1);
        s.insert(2, b"a".to_vec(), 1, 2);
        s.insert(3, b"a/in".to_vec(), 1, 3);
        s.insert(4, b"b".to_vec(), 1, 4);
        s.insert(5, b"p".to_vec(), 1, 5);
        s.insert(6, b"p/c".to_vec(), 1, 6);
        let dir = libc::IN_ISDIR;
        // renameat2(a, b, RENAME_EXCHANGE), as the kernel reports it.
        let d = s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 7, Some("a")),
            ev(1, libc::IN_MOVED_TO | dir, 7, Some("b")),
            ev(2, libc::IN_MOVE_SELF, 0, None),
            ev(1, libc::IN_MOVED_FROM | dir, 8, Some("b")),
            ev(1, libc::IN_MOVED_TO | dir, 8, Some("a")),
            ev(4, libc::IN_MOVE_SELF, 0, None),
            ev(3, libc::IN_CREATE, 0, Some("f")),
        ]);
        assert_eq!(s.by_wd[&2].path, b"b");
        assert_eq!(s.by_wd[&3].path, b"b/in");
        assert_eq!(s.by_wd[&4].path, b"a");
        assert_eq!(s.by_path[&b"a"[..]], 4);
        assert_eq!(s.by_path[&b"b"[..]], 2);
        assert_eq!(s.by_path[&b"b/in"[..]], 3);
        assert!(pairs(&d).contains(&key("b/in", Some("f"))));
        // Across two parents, and a directory exchanged with a file (one move only).
        s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 9, Some("a")),
            ev(5, libc::IN_MOVED_TO | dir, 9, Some("c")),
            ev(5, libc::IN_MOVED_FROM | dir, 10, Some("c")),
            ev(1, libc::IN_MOVED_TO | dir, 10, Some("a")),
        ]);
        assert_eq!(s.by_wd[&4].path, b"p/c");
        assert_eq!(s.by_wd[&6].path, b"a");
        s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 11, Some("b")),
            ev(1, libc::IN_MOVED_TO | dir, 11, Some("file")),
            ev(1, libc::IN_MOVED_FROM, 12, Some("file")),
            ev(1, libc::IN_MOVED_TO, 12, Some("b")),
        ]);
        assert_eq!(s.by_wd[&2].path, b"file");
        assert_eq!(s.by_wd[&3].path, b"file/in");
        assert_eq!(s.by_path[&b"file"[..]], 2);
        // Split between two batches (the reader's window ended in between).
        s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 13, Some("file")),
            ev(1, libc::IN_MOVED_TO | dir, 13, Some("a")),
        ]);
        assert_eq!(s.by_wd[&2].path, b"a");
        assert_eq!(s.by_path[&b"a"[..]], 2);
        s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 14, Some("a")),
            ev(1, libc::IN_MOVED_TO | dir, 14, Some("file")),
        ]);
        assert_eq!(s.by_wd[&2].path, b"a");
        assert_eq!(s.by_wd[&3].path, b"a/in");
        assert_eq!(s.by_wd[&6].path, b"file");
        assert_eq!(s.by_path[&b"file"[..]], 6);
        // A move over an empty directory: the one replaced is set aside until its
        // removal is reported, and a later move of the new one there takes it along.
        s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 15, Some("file")),
            ev(1, libc::IN_MOVED_TO | dir, 15, Some("b")),
            ev(4, libc::IN_DELETE_SELF, 0, None),
            ev(4, libc::IN_IGNORED, 0, None),
        ]);
        assert!(!s.by_wd.contains_key(&4));
        s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 16, Some("b")),
            ev(1, libc::IN_MOVED_TO | dir, 16, Some("c")),
        ]);
        assert_eq!(s.by_wd[&6].path, b"c");
    }

    #[test]
    fn a_directory_a_request_rewatched_at_its_new_path_is_not_set_aside() {
        // mv x y, and a lookup of y re-watches x's inode there before the move is read.
        let mut s = State::default();
        s.insert(1, b"".to_vec(), 1, 1);
        s.insert(2, b"x".to_vec(), 1, 2);
        s.insert(3, b"x/sub".to_vec(), 1, 3);
        let dir = libc::IN_ISDIR;
        assert!(s.insert(2, b"y".to_vec(), 1, 2).is_none());
        s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 7, Some("x")),
            ev(1, libc::IN_MOVED_TO | dir, 7, Some("y")),
        ]);
        assert_eq!(s.by_wd[&3].path, b"y/sub");
        s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 8, Some("y")),
            ev(1, libc::IN_MOVED_TO | dir, 8, Some("z")),
        ]);
        assert_eq!(s.by_wd[&2].path, b"z");
        assert_eq!(s.by_wd[&3].path, b"z/sub");
    }

    #[test]
    fn a_replaced_directory_set_aside_is_checked_a_batch_later() {
        // mv x y over an empty y whose removal is reported late (something holds it).
        let mut s = State::default();
        s.insert(1, b"".to_vec(), 1, 1);
        s.insert(2, b"x".to_vec(), 1, 2);
        s.insert(3, b"x/sub".to_vec(), 1, 3);
        s.insert(4, b"y".to_vec(), 1, 4);
        let dir = libc::IN_ISDIR;
        s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 7, Some("x")),
            ev(1, libc::IN_MOVED_TO | dir, 7, Some("y")),
        ]);
        let d = s.digest(&[]);
        assert!(
            d.moved_self.contains(&(4, b"y".to_vec())),
            "{:?}",
            d.moved_self
        );
        s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 8, Some("y")),
            ev(1, libc::IN_MOVED_TO | dir, 8, Some("z")),
        ]);
        assert_eq!(s.by_wd[&2].path, b"z");
        assert_eq!(s.by_wd[&3].path, b"z/sub");
    }

    #[test]
    fn a_directory_moved_back_within_a_batch_is_checked_where_it_ended() {
        // Exchanged with a directory nobody watches: the second move puts the watch
        // back at its old path, where the other directory is now. Only the disk can
        // tell: the digest has it checked there.
        let mut s = State::default();
        s.insert(1, b"".to_vec(), 1, 1);
        s.insert(2, b"a".to_vec(), 1, 2);
        let dir = libc::IN_ISDIR;
        let d = s.digest(&[
            ev(1, libc::IN_MOVED_FROM | dir, 7, Some("a")),
            ev(1, libc::IN_MOVED_TO | dir, 7, Some("b")),
            ev(2, libc::IN_MOVE_SELF, 0, None),
            ev(1, libc::IN_MOVED_FROM | dir, 8, Some("b")),
            ev(1, libc::IN_MOVED_TO | dir, 8, Some("a")),
        ]);
        assert!(
            d.moved_self.contains(&(2, b"a".to_vec())),
            "{:?}",
            d.moved_self
        );
    }
}
