//! The inode table: which path on the server each kernel inode number stands for.
//!
//! Inode numbers are the server's own (`Attr::ino`), so the same file has the same number
//! for as long as it exists, across lookups, forgets and remounts. The export root is
//! swapped with inode 1, which FUSE reserves for the root. A node remembers every name it
//! was seen under (hard links), so unlinking one name leaves it reachable by the others.
//!
//! Lookup-count contract (fuser `ll/request.rs`): every reply that hands the kernel an
//! entry (lookup, create, mkdir, mknod, symlink, link, each non-dot readdirplus entry)
//! adds one; `forget` subtracts; at zero the node may be dropped. The root never is.
//!
//! A directory renamed on the server, as events report, keeps its node: the client asks
//! the server where it went (`Request::Locate`) and moves it there ([`Nodes::rehome`]),
//! so a process that holds it (its working directory) keeps working. Such an answer is
//! taken only if nothing it rests on changed since it was asked for ([`Ticket`]): the
//! node's own place, the places of the directories on its old and new paths, the names
//! along the new path (events report them), and no rename of this client's in flight
//! touches any of them (its reply is applied relative to the names before it).
//!
//! This module does no I/O and holds no locks of its own; the caller wraps it in a Mutex.

use std::collections::{HashMap, HashSet, VecDeque};

use ferry_common::proto::RelPath;
use rustc_hash::FxHashMap;

use crate::error::{FsError, FsResult};

/// Give memory back once a table is mostly empty: the kernel forgets the inodes of a
/// huge listing when it needs the memory (or on `drop_caches`), and a table keeps its
/// peak capacity otherwise. Shrinking to twice what is left, below a quarter, keeps
/// the cost per removal constant on average.
pub fn shrink_if_sparse<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    if map.capacity() > 4096 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

pub const ROOT: u64 = 1;

/// Deepest path the table will build (guards against a corrupted parent cycle).
const MAX_DEPTH: usize = 4096;

/// Names reported changed that are remembered for judging location answers; past it,
/// answers asked for before the oldest one forgotten are asked again.
const CHANGED_NAMES_MAX: usize = 4096;

type Key = (u64, Vec<u8>);

#[derive(Debug)]
struct Node {
    /// Names this node is known under: (parent inode, name). The first is used for paths.
    names: Vec<(u64, Vec<u8>)>,
    lookups: u64,
    dir: bool,
    /// The table's clock when the first name last changed (see [`Ticket`]).
    placed: u64,
}

#[derive(Debug)]
pub struct Nodes {
    root_server_ino: u64,
    // (Fx hashing: the keys come from the server, which is trusted with the whole tree
    // anyway; SipHash was a tenth of a 10,000-entry listing's reply.)
    map: FxHashMap<u64, Node>,
    by_name: FxHashMap<(u64, Vec<u8>), u64>,
    /// Names handed to the kernel from a listing that no longer vouched for them (see
    /// `Core::fill_listing`): the name may be gone or stand for another inode now, so
    /// a lookup of it asks the server.
    unverified: HashSet<(u64, Vec<u8>)>,
    /// Counts changes that can make a location answer out of date.
    clock: u64,
    /// Names events reported gone, replaced or new, with the clock then (the newest),
    /// oldest first in `changed_order`, at most `CHANGED_NAMES_MAX`.
    changed: HashMap<Key, u64>,
    changed_order: VecDeque<(Key, u64)>,
    /// Answers asked for before this clock are out of date (names forgotten, a resync).
    changed_floor: u64,
    /// Renames of this client's sent and not yet applied: token → (from, to).
    renaming: HashMap<u64, (Key, Key)>,
    next_rename: u64,
}

/// The table's clock when location answers were asked for ([`Nodes::ticket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    at: u64,
}

/// What became of location answers ([`Nodes::rehome`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rehomed {
    /// Moved: to their new place, or, beneath a directory the kernel does not hold,
    /// out of the table (no path leads to them).
    pub moved: Vec<u64>,
    /// Out of date (something they rest on changed): to be asked again.
    pub again: Vec<u64>,
    /// A rename of this client's in flight touches them: to be asked again once it is
    /// applied.
    pub wait: Vec<u64>,
    /// Held directories whose name a moved one took: to be located too.
    pub unplaced: Vec<u64>,
}

/// The verdict on one location answer.
enum Verdict {
    Skip,
    Again,
    Wait,
    /// To this name, or (`None`) out of the table.
    Place(Option<Key>),
}

impl Nodes {
    pub fn new(root_server_ino: u64) -> Self {
        Nodes {
            root_server_ino,
            map: FxHashMap::default(),
            by_name: FxHashMap::default(),
            unverified: HashSet::new(),
            clock: 0,
            changed: HashMap::new(),
            changed_order: VecDeque::new(),
            changed_floor: 0,
            renaming: HashMap::new(),
            next_rename: 0,
        }
    }

    /// Room for `n` more nodes and names, made ahead of a listing's replies (growing
    /// the tables by a rehash in the middle of one would hold up the kernel).
    pub fn reserve(&mut self, n: usize) {
        self.map.reserve(n);
        self.by_name.reserve(n);
    }

    /// Server inode number to kernel inode number (root and 1 swap places).
    pub fn to_kernel(&self, server_ino: u64) -> u64 {
        if server_ino == self.root_server_ino {
            ROOT
        } else if server_ino == ROOT {
            self.root_server_ino
        } else {
            server_ino
        }
    }

    /// Number of nodes known (root excluded), for stats.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The server path of kernel inode `ino`.
    pub fn path(&self, ino: u64) -> FsResult<RelPath> {
        let mut comps: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let node = self.map.get(&cur).ok_or(FsError::Errno(libc::ESTALE))?;
            // A file with several names goes by one nobody reported gone: an event of one
            // link's removal leaves the others good (the name stays known, unverified,
            // in case the event raced a rename this client has not applied yet).
            let (parent, name) = node
                .names
                .iter()
                .find(|key| self.unverified.is_empty() || !self.unverified.contains(*key))
                .or_else(|| node.names.first())
                .ok_or(FsError::Errno(libc::ENOENT))?;
            comps.push(name);
            cur = *parent;
            if comps.len() > MAX_DEPTH {
                return Err(FsError::Errno(libc::ELOOP));
            }
        }
        let mut path = RelPath::root();
        for c in comps.iter().rev() {
            path = path.join(c);
        }
        Ok(path)
    }

    /// Whether the kernel holds inode `ino` (the root always).
    pub fn knows(&self, ino: u64) -> bool {
        ino == ROOT || self.map.contains_key(&ino)
    }

    /// The kernel inode of `parent/name`, if this table knows it.
    pub fn child(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.by_name.get(&(parent, name.to_vec())).copied()
    }

    /// The kernel inode a server path refers to, if every component is known.
    pub fn resolve(&self, path: &RelPath) -> Option<u64> {
        if path.is_root() {
            return Some(ROOT);
        }
        path.0
            .split(|&b| b == b'/')
            .try_fold(ROOT, |dir, comp| self.child(dir, comp))
    }

    /// Every known (parent, name, inode) triple, for a full revalidation.
    pub fn all_entries(&self) -> Vec<(u64, Vec<u8>, u64)> {
        self.by_name
            .iter()
            .map(|((p, n), i)| (*p, n.clone(), *i))
            .collect()
    }

    /// Every known entry of the directories `dirs`: (directory, name, inode). One scan
    /// of the whole table, for rare events.
    pub fn children_of(&self, dirs: &HashSet<u64>) -> Vec<(u64, Vec<u8>, u64)> {
        if dirs.is_empty() {
            return Vec::new();
        }
        self.by_name
            .iter()
            .filter(|((p, _), _)| dirs.contains(p))
            .map(|((p, n), i)| (*p, n.clone(), *i))
            .collect()
    }

    /// The directory and name `ino` was last seen under.
    pub fn name_of(&self, ino: u64) -> Option<(u64, Vec<u8>)> {
        self.map.get(&ino)?.names.first().cloned()
    }

    /// The directory `ino` was last seen in.
    pub fn parent_of(&self, ino: u64) -> Option<u64> {
        self.map.get(&ino)?.names.first().map(|(p, _)| *p)
    }

    pub fn child_path(&self, parent: u64, name: &[u8]) -> FsResult<RelPath> {
        Ok(self.path(parent)?.join(name))
    }

    /// [`Nodes::remember`] of a name nobody vouches for any more: a lookup of it goes
    /// to the server until one is answered.
    pub fn remember_unverified(&mut self, parent: u64, name: &[u8], ino: u64, dir: bool) {
        self.remember(parent, name, ino, dir);
        if ino != ROOT {
            self.unverified.insert((parent, name.to_vec()));
        }
    }

    /// `parent/name`, remembered already, may be gone or stand for another inode now.
    pub fn unverify(&mut self, parent: u64, name: &[u8]) {
        let key = (parent, name.to_vec());
        if self.by_name.contains_key(&key) {
            self.unverified.insert(key);
        }
    }

    /// Whether `parent/name` was remembered unverified since the server last answered
    /// for it.
    pub fn is_unverified(&self, parent: u64, name: &[u8]) -> bool {
        !self.unverified.is_empty() && self.unverified.contains(&(parent, name.to_vec()))
    }

    /// The kernel now holds one more reference to `ino`, reached as `parent/name`;
    /// `dir`: it is a directory.
    pub fn remember(&mut self, parent: u64, name: &[u8], ino: u64, dir: bool) {
        if ino == ROOT {
            return;
        }
        let key = (parent, name.to_vec());
        if !self.unverified.is_empty() {
            self.unverified.remove(&key);
        }
        if let Some(&old) = self.by_name.get(&key)
            && old != ino
        {
            self.drop_name(old, &key);
        }
        let clock = self.clock + 1;
        let node = self.map.entry(ino).or_insert(Node {
            names: Vec::new(),
            lookups: 0,
            dir,
            placed: clock,
        });
        node.lookups += 1;
        if node.names.first() != Some(&key) {
            // A new node, a nameless one named, or another first name: a new place.
            node.placed = clock;
            self.clock = clock;
            // Most recently seen name first: it is the one most likely still valid.
            if let Some(pos) = node.names.iter().position(|n| *n == key) {
                node.names.remove(pos);
            }
            node.names.insert(0, key.clone());
        }
        self.by_name.insert(key, ino);
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let Some(node) = self.map.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0
            && let Some(node) = self.map.remove(&ino)
        {
            for key in node.names {
                if self.by_name.get(&key) == Some(&ino) {
                    self.by_name.remove(&key);
                    self.unverified.remove(&key);
                }
            }
            shrink_if_sparse(&mut self.map);
            shrink_if_sparse(&mut self.by_name);
        }
    }

    /// `parent/name` no longer exists (unlink, rmdir, replaced by a rename).
    pub fn unlinked(&mut self, parent: u64, name: &[u8]) {
        let key = (parent, name.to_vec());
        if let Some(ino) = self.by_name.remove(&key) {
            self.drop_name(ino, &key);
        }
    }

    fn drop_name(&mut self, ino: u64, key: &(u64, Vec<u8>)) {
        self.unverified.remove(key);
        if let Some(node) = self.map.get_mut(&ino) {
            if node.names.first() == Some(key) {
                self.clock += 1;
                node.placed = self.clock;
            }
            node.names.retain(|n| n != key);
        }
        if self.by_name.get(key) == Some(&ino) {
            self.by_name.remove(key);
        }
    }

    /// A successful rename (or exchange) on the server.
    pub fn renamed(
        &mut self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        exchange: bool,
    ) {
        let from = (parent, name.to_vec());
        let to = (new_parent, new_name.to_vec());
        self.unverified.remove(&from);
        self.unverified.remove(&to);
        let src = self.by_name.remove(&from);
        let dst = self.by_name.remove(&to);
        if let Some(d) = dst {
            self.drop_name(d, &to);
        }
        if let Some(s) = src {
            self.rename_key(s, &from, &to);
        }
        if exchange && let Some(d) = dst {
            self.rename_key(d, &to, &from);
        }
    }

    fn rename_key(&mut self, ino: u64, from: &(u64, Vec<u8>), to: &(u64, Vec<u8>)) {
        if let Some(node) = self.map.get_mut(&ino) {
            self.clock += 1;
            node.placed = self.clock;
            node.names.retain(|n| n != from);
            node.names.insert(0, to.clone());
            self.by_name.insert(to.clone(), ino);
        }
    }

    /// This client sends a rename of `from` to `to`: no location answer resting on
    /// either name is taken until its reply is applied ([`Nodes::rename_done`] with
    /// the token returned, also when it failed).
    pub fn rename_sent(&mut self, from: (u64, &[u8]), to: (u64, &[u8])) -> u64 {
        self.next_rename += 1;
        let keys = ((from.0, from.1.to_vec()), (to.0, to.1.to_vec()));
        self.renaming.insert(self.next_rename, keys);
        self.next_rename
    }

    pub fn rename_done(&mut self, token: u64) {
        self.renaming.remove(&token);
    }

    /// An event reported `parent/name` gone, replaced or new.
    pub fn name_changed(&mut self, parent: u64, name: &[u8]) {
        self.clock += 1;
        let key = (parent, name.to_vec());
        self.changed.insert(key.clone(), self.clock);
        self.changed_order.push_back((key, self.clock));
        while self.changed_order.len() > CHANGED_NAMES_MAX {
            if let Some((key, at)) = self.changed_order.pop_front() {
                if self.changed.get(&key) == Some(&at) {
                    self.changed.remove(&key);
                }
                self.changed_floor = at;
            }
        }
    }

    /// Anything may have changed (events were lost): no answer asked for before now is
    /// taken.
    pub fn all_changed(&mut self) {
        self.clock += 1;
        self.changed_floor = self.clock;
        self.changed.clear();
        self.changed_order.clear();
    }

    fn changed_since(&self, key: &Key, t: Ticket) -> bool {
        t.at < self.changed_floor || self.changed.get(key).is_some_and(|&c| c > t.at)
    }

    /// Whether `ino` is a directory the kernel holds (not the root).
    pub fn is_dir(&self, ino: u64) -> bool {
        self.map.get(&ino).is_some_and(|n| n.dir)
    }

    /// Whether directory `ino` is known by another first name than `parent/name`.
    pub fn elsewhere(&self, ino: u64, parent: u64, name: &[u8]) -> bool {
        self.map.get(&ino).is_some_and(|n| {
            n.dir
                && n.names
                    .first()
                    .is_none_or(|(p, m)| (*p, m.as_slice()) != (parent, name))
        })
    }

    /// The table as of now, for [`Nodes::rehome`] once the server said where
    /// directories are.
    pub fn ticket(&self) -> Ticket {
        Ticket { at: self.clock }
    }

    /// The server says where directories are now: (kernel inode, path, or `None` where
    /// it does not know). Each answer is judged on its own (see the module doc); the
    /// parents first, so that a directory and one beneath it answered together land
    /// right.
    pub fn rehome(&mut self, t: Ticket, found: &[(u64, Option<RelPath>)]) -> Rehomed {
        let mut found: Vec<(u64, &RelPath)> = found
            .iter()
            .filter_map(|(ino, path)| Some((*ino, path.as_ref()?)))
            .collect();
        found.sort_by_key(|(_, p)| p.0.iter().filter(|&&b| b == b'/').count() + 1);
        let mut out = Rehomed::default();
        let mut now = HashSet::new();
        for (ino, path) in found {
            match self.verdict(t, ino, path, &now) {
                Verdict::Skip => {}
                Verdict::Again => out.again.push(ino),
                Verdict::Wait => out.wait.push(ino),
                Verdict::Place(to) => {
                    if self.place(ino, to, &mut out.unplaced) {
                        out.moved.push(ino);
                        now.insert(ino);
                        // (Those whose name it took changed place with this batch too.)
                        now.extend(out.unplaced.iter().copied());
                    }
                }
            }
        }
        out.unplaced.retain(|ino| !out.moved.contains(ino));
        out
    }

    /// Whether the answer "`ino` is at `path`" can be taken (see [`Nodes::rehome`]);
    /// `now`: nodes this batch of answers placed already.
    fn verdict(&self, t: Ticket, ino: u64, path: &RelPath, now: &HashSet<u64>) -> Verdict {
        let fresh = |n: &Node, i: u64| n.placed <= t.at || now.contains(&i);
        let Some((parent_path, name)) = path.split_last() else {
            return Verdict::Skip; // the root, which no other directory is
        };
        match self.map.get(&ino) {
            Some(n) if n.dir => {
                if !fresh(n, ino) {
                    return Verdict::Again;
                }
            }
            _ => return Verdict::Skip,
        }
        // Its own place and those of the directories above it.
        let mut keys: Vec<Key> = Vec::new();
        let mut cur = ino;
        while cur != ROOT && keys.len() <= MAX_DEPTH {
            let Some(n) = self.map.get(&cur) else { break };
            if !fresh(n, cur) {
                return Verdict::Again;
            }
            let Some(key) = n.names.first() else { break };
            keys.push(key.clone());
            cur = key.0;
        }
        // The new path, through first names the server vouches for, each unchanged.
        let mut cur = ROOT;
        let mut held = true;
        for comp in parent_path
            .0
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
        {
            let key = (cur, comp.to_vec());
            if self.changed_since(&key, t) {
                return Verdict::Again;
            }
            // (Also the first name not held: a rename of ours in flight may be what
            // makes the kernel not hold it.)
            keys.push(key.clone());
            let Some(n) = self
                .by_name
                .get(&key)
                .and_then(|i| Some((*i, self.map.get(i)?)))
            else {
                held = false; // beneath a directory the kernel does not hold
                break;
            };
            let (next, n) = n;
            if next == ino
                || n.names.first() != Some(&key)
                || (self.unverified.contains(&key) && !now.contains(&next))
                || !fresh(n, next)
            {
                return Verdict::Again;
            }
            cur = next;
        }
        let to = held.then(|| (cur, name.0.clone()));
        if let Some(key) = &to {
            if self.changed_since(key, t) {
                return Verdict::Again;
            }
            keys.push(key.clone());
        }
        if self
            .renaming
            .values()
            .any(|(from, to)| keys.contains(from) || keys.contains(to))
        {
            return Verdict::Wait;
        }
        Verdict::Place(to)
    }

    /// Move directory `ino` to `to` (`None`: out of the table); whether it moved.
    /// Held directories whose name it took go to `unplaced`.
    fn place(&mut self, ino: u64, to: Option<Key>, unplaced: &mut Vec<u64>) -> bool {
        let old = match self.map.get(&ino) {
            Some(n) if n.names.first() == to.as_ref() => return false, // there already
            Some(n) if to.is_none() && n.names.is_empty() => return false,
            Some(n) => n.names.clone(),
            None => return false,
        };
        for key in &old {
            self.unverified.remove(key);
            if self.by_name.get(key) == Some(&ino) {
                self.by_name.remove(key);
            }
        }
        if let Some(key) = &to
            && let Some(&other) = self.by_name.get(key)
        {
            self.drop_name(other, key);
            if self.is_dir(other) {
                unplaced.push(other);
            }
        }
        self.clock += 1;
        let clock = self.clock;
        let Some(node) = self.map.get_mut(&ino) else {
            return false;
        };
        node.placed = clock;
        node.names.clear();
        if let Some(key) = to {
            node.names.push(key.clone());
            // Until a lookup confirms it, the name is not answered locally: an event
            // about it may still be on its way.
            self.unverified.insert(key.clone());
            self.by_name.insert(key, ino);
        }
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_renames_and_links() {
        let mut n = Nodes::new(500);
        assert_eq!(n.to_kernel(500), ROOT);
        assert_eq!(n.to_kernel(ROOT), 500);
        assert_eq!(n.to_kernel(7), 7);
        n.remember(ROOT, b"d", 10, false);
        n.remember(10, b"f", 11, false);
        assert_eq!(n.path(11).unwrap().0, b"d/f");
        n.renamed(ROOT, b"d", ROOT, b"e", false);
        assert_eq!(n.path(11).unwrap().0, b"e/f");
        n.remember(ROOT, b"hard", 11, false);
        n.unlinked(10, b"f");
        assert_eq!(n.path(11).unwrap().0, b"hard");
        n.unlinked(ROOT, b"hard");
        assert!(n.path(11).is_err());
    }

    #[test]
    fn exchange_and_replace() {
        let mut n = Nodes::new(2);
        n.remember(ROOT, b"a", 10, false);
        n.remember(ROOT, b"b", 11, false);
        n.renamed(ROOT, b"a", ROOT, b"b", true);
        assert_eq!(n.path(10).unwrap().0, b"b");
        assert_eq!(n.path(11).unwrap().0, b"a");
        n.renamed(ROOT, b"a", ROOT, b"b", false);
        assert_eq!(n.path(11).unwrap().0, b"b");
        assert!(n.path(10).is_err());
    }

    #[test]
    fn children_of_several_directories_in_one_scan() {
        let mut n = Nodes::new(500);
        n.remember(ROOT, b"a", 10, false);
        n.remember(ROOT, b"b", 20, false);
        n.remember(10, b"x", 11, false);
        n.remember(10, b"y", 12, false);
        n.remember(20, b"z", 21, false);
        n.remember(11, b"deep", 13, false);
        let dirs: HashSet<u64> = [10, 20].into_iter().collect();
        let mut got = n.children_of(&dirs);
        got.sort();
        assert_eq!(
            got,
            vec![
                (10, b"x".to_vec(), 11),
                (10, b"y".to_vec(), 12),
                (20, b"z".to_vec(), 21)
            ]
        );
        assert!(n.children_of(&HashSet::new()).is_empty());
    }

    #[test]
    fn forget_drops_at_zero() {
        let mut n = Nodes::new(2);
        n.remember(ROOT, b"a", 10, false);
        n.remember(ROOT, b"a", 10, false);
        n.forget(10, 1);
        assert!(n.path(10).is_ok());
        n.forget(10, 1);
        assert!(n.path(10).is_err());
        assert!(n.is_empty());
    }

    #[test]
    fn forgetting_a_huge_listing_gives_its_memory_back() {
        let mut n = Nodes::new(2);
        for ino in 10..100_010u64 {
            n.remember(ROOT, format!("file{ino}").as_bytes(), ino, false);
        }
        let peak = n.map.capacity() + n.by_name.capacity();
        assert!(peak >= 200_000);
        for ino in 10..99_910u64 {
            n.forget(ino, 1);
        }
        assert_eq!(n.len(), 100);
        let now = n.map.capacity() + n.by_name.capacity();
        assert!(now <= 2 * 4096, "capacity {now} left of {peak}");
        assert!(n.path(100_000).is_ok());
    }

    fn rp(s: &str) -> Option<RelPath> {
        Some(RelPath(s.as_bytes().to_vec()))
    }

    fn moved(v: &[u64]) -> Rehomed {
        Rehomed {
            moved: v.to_vec(),
            ..Rehomed::default()
        }
    }

    #[test]
    fn a_located_directory_moves_with_what_is_beneath() {
        let mut n = Nodes::new(500);
        n.remember(ROOT, b"work", 10, true);
        n.remember(10, b"f", 11, false);
        n.remember(ROOT, b"other", 20, true);
        assert!(n.is_dir(10) && !n.is_dir(11));
        let t = n.ticket();
        assert_eq!(n.rehome(t, &[(10, rp("other/moved"))]), moved(&[10]));
        assert_eq!(n.path(11).unwrap().0, b"other/moved/f");
        assert_eq!(n.child(ROOT, b"work"), None);
        assert_eq!(n.child(20, b"moved"), Some(10));
        assert!(n.is_unverified(20, b"moved"), "until a lookup confirms it");
        // Said again, nothing moves; files and unknown answers are not moved at all.
        let t = n.ticket();
        let again = [(10, rp("other/moved")), (11, rp("x")), (10, None)];
        assert_eq!(n.rehome(t, &again), Rehomed::default());
        // Beneath a directory the kernel does not hold: no path leads to it.
        let t = n.ticket();
        assert_eq!(n.rehome(t, &[(10, rp("far/away"))]), moved(&[10]));
        assert!(n.path(11).is_err());
        assert_eq!(n.child(20, b"moved"), None);
        // A lookup of it by a name gives it that name again.
        n.remember(ROOT, b"back", 10, true);
        assert_eq!(n.path(11).unwrap().0, b"back/f");
    }

    #[test]
    fn an_answer_is_not_taken_once_what_it_rests_on_changed() {
        let mut n = Nodes::new(500);
        n.remember(ROOT, b"a", 10, true);
        n.remember(ROOT, b"b", 20, true);
        n.remember(ROOT, b"c", 30, true);
        // This client's exchange of a and b, whose events came before its reply: the
        // answer is not taken while the exchange is under way, nor after it.
        let t = n.ticket();
        let answer = [(10, rp("b")), (20, rp("a"))];
        let token = n.rename_sent((ROOT, b"a"), (ROOT, b"b"));
        let out = n.rehome(t, &answer);
        assert_eq!(out.wait, vec![10, 20]);
        n.renamed(ROOT, b"a", ROOT, b"b", true);
        n.rename_done(token);
        assert_eq!(n.rehome(t, &answer).again, vec![10, 20]);
        assert_eq!(n.path(10).unwrap().0, b"b");
        assert_eq!(n.path(20).unwrap().0, b"a");
        assert_eq!(
            n.rehome(n.ticket(), &answer),
            Rehomed::default(),
            "there already"
        );
        // A rename elsewhere does not hold an answer back.
        let t = n.ticket();
        let token = n.rename_sent((30, b"x"), (30, b"y"));
        assert_eq!(n.rehome(t, &[(10, rp("c/b"))]), moved(&[10]));
        n.rename_done(token);
        // A node looked up under another name since: out of date.
        let t = n.ticket();
        n.remember(ROOT, b"d", 10, true);
        assert_eq!(n.rehome(t, &[(10, rp("c/b"))]).again, vec![10]);
        // A nameless node named again since (reviewer's case): out of date too.
        let t = n.ticket();
        assert_eq!(n.rehome(t, &[(10, rp("nowhere/held"))]), moved(&[10]));
        let t = n.ticket();
        n.remember(ROOT, b"w3", 10, true);
        assert_eq!(n.rehome(t, &[(10, rp("w2"))]).again, vec![10]);
        assert_eq!(n.path(10).unwrap().0, b"w3");
        // The name it would land on was reported changed since: asked again.
        let t = n.ticket();
        n.name_changed(ROOT, b"e");
        assert_eq!(n.rehome(t, &[(10, rp("e"))]).again, vec![10]);
        // ... and so when a directory on the way was.
        n.remember(30, b"sub", 40, true);
        let t = n.ticket();
        n.name_changed(ROOT, b"c");
        assert_eq!(n.rehome(t, &[(10, rp("c/sub/x"))]).again, vec![10]);
        // A fresh answer is taken; a held directory whose name it took is to be
        // located too.
        let t = n.ticket();
        let out = n.rehome(t, &[(10, rp("c/sub"))]);
        assert_eq!((out.moved, out.unplaced), (vec![10], vec![40]));
        assert_eq!(n.path(10).unwrap().0, b"c/sub");
        assert!(n.path(40).is_err());
    }

    #[test]
    fn answers_for_a_directory_and_one_beneath_land_right_in_any_order() {
        // Held: a, a/c. On the server: mv a/c a/c2; mv a b. Answered in one batch,
        // the child first.
        let mut n = Nodes::new(500);
        n.remember(ROOT, b"a", 10, true);
        n.remember(10, b"c", 11, true);
        let t = n.ticket();
        let out = n.rehome(t, &[(11, rp("b/c2")), (10, rp("b"))]);
        assert_eq!(out.moved, vec![10, 11]);
        assert_eq!(n.path(11).unwrap().0, b"b/c2");
    }

    #[test]
    fn a_new_path_through_the_directory_itself_is_asked_again() {
        // Held: a (10), a/b (20). Server: mv a/b tmp; mv a tmp/b; mv tmp a: a is now
        // at a/b. The table still has b beneath a: the way goes through 10 itself.
        let mut n = Nodes::new(500);
        n.remember(ROOT, b"a", 10, true);
        n.remember(10, b"b", 20, true);
        let t = n.ticket();
        assert_eq!(n.rehome(t, &[(10, rp("a/b"))]).again, vec![10]);
        // Answered together with where 20 went, its parent first: both land.
        let t = n.ticket();
        let out = n.rehome(t, &[(20, rp("a")), (10, rp("a/b"))]);
        assert_eq!(out.moved, vec![20, 10]);
        assert_eq!(n.path(10).unwrap().0, b"a/b");
        assert_eq!(n.path(20).unwrap().0, b"a");
    }

    #[test]
    fn names_forgotten_past_the_limit_make_older_answers_out_of_date() {
        let mut n = Nodes::new(500);
        n.remember(ROOT, b"a", 10, true);
        let t = n.ticket();
        for i in 0..=CHANGED_NAMES_MAX {
            n.name_changed(ROOT, format!("n{i}").as_bytes());
        }
        assert_eq!(n.rehome(t, &[(10, rp("b"))]).again, vec![10]);
        let t = n.ticket();
        n.all_changed();
        assert_eq!(n.rehome(t, &[(10, rp("b"))]).again, vec![10]);
        assert_eq!(n.rehome(n.ticket(), &[(10, rp("b"))]), moved(&[10]));
    }

    #[test]
    fn an_answer_through_a_name_a_rename_of_ours_is_making_waits() {
        // This mount renames p to r (done on the server, reply not applied); the server
        // moved held a into it: "r/a" goes through a name the table does not hold yet.
        let mut n = Nodes::new(500);
        n.remember(ROOT, b"a", 10, true);
        n.remember(ROOT, b"p", 20, true);
        let t = n.ticket();
        let token = n.rename_sent((ROOT, b"p"), (ROOT, b"r"));
        assert_eq!(n.rehome(t, &[(10, rp("r/a"))]).wait, vec![10]);
        n.renamed(ROOT, b"p", ROOT, b"r", false);
        n.rename_done(token);
        assert_eq!(n.rehome(n.ticket(), &[(10, rp("r/a"))]), moved(&[10]));
        assert_eq!(n.path(10).unwrap().0, b"r/a");
    }
}
