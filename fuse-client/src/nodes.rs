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
//! taken only if no path in the table changed since it was asked for, and no rename
//! of this client's was in flight meanwhile (its reply, applied relative to the names
//! before it, could otherwise undo or double the move).
//!
//! This module does no I/O and holds no locks of its own; the caller wraps it in a Mutex.

use std::collections::{HashMap, HashSet};

use ferry_common::proto::RelPath;

use crate::error::{FsError, FsResult};

/// Give memory back once a table is mostly empty: the kernel forgets the inodes of a
/// huge listing when it needs the memory (or on `drop_caches`), and a table keeps its
/// peak capacity otherwise. Shrinking to twice what is left, below a quarter, keeps
/// the cost per removal constant on average.
pub fn shrink_if_sparse<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 4096 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

pub const ROOT: u64 = 1;

/// Deepest path the table will build (guards against a corrupted parent cycle).
const MAX_DEPTH: usize = 4096;

#[derive(Debug)]
struct Node {
    /// Names this node is known under: (parent inode, name). The first is used for paths.
    names: Vec<(u64, Vec<u8>)>,
    lookups: u64,
    dir: bool,
    /// For a directory the server located beneath a directory the kernel does not hold:
    /// its whole path (used while it has no name in the table).
    at: Option<Box<RelPath>>,
}

#[derive(Debug)]
pub struct Nodes {
    root_server_ino: u64,
    map: HashMap<u64, Node>,
    by_name: HashMap<(u64, Vec<u8>), u64>,
    /// Names handed to the kernel from a listing that no longer vouched for them (see
    /// `Core::fill_listing`): the name may be gone or stand for another inode now, so
    /// a lookup of it asks the server.
    unverified: HashSet<(u64, Vec<u8>)>,
    /// Counts every change of a node's path (its first name, or where it was located):
    /// a location asked for before the last change may be out of date.
    moves: u64,
    /// This client's renames sent and not yet applied here.
    renaming: u32,
}

/// The table's paths as of a moment ([`Nodes::ticket`]), to be moved by location
/// answers asked for then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    moves: u64,
}

impl Nodes {
    pub fn new(root_server_ino: u64) -> Self {
        Nodes {
            root_server_ino,
            map: HashMap::new(),
            by_name: HashMap::new(),
            unverified: HashSet::new(),
            moves: 0,
            renaming: 0,
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
        let mut path = RelPath::root();
        while cur != ROOT {
            let node = self.map.get(&cur).ok_or(FsError::Errno(libc::ESTALE))?;
            let Some((parent, name)) = node.names.first() else {
                match &node.at {
                    Some(at) => {
                        path = (**at).clone();
                        break;
                    }
                    None => return Err(FsError::Errno(libc::ENOENT)),
                }
            };
            comps.push(name);
            cur = *parent;
            if comps.len() > MAX_DEPTH {
                return Err(FsError::Errno(libc::ELOOP));
            }
        }
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
        let node = self.map.entry(ino).or_insert(Node {
            names: Vec::new(),
            lookups: 0,
            dir,
            at: None,
        });
        node.lookups += 1;
        if node.names.first() != Some(&key) {
            if !node.names.is_empty() || node.at.take().is_some() {
                self.moves += 1;
            }
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
                self.moves += 1;
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
        self.moves += 1;
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
            node.names.retain(|n| n != from);
            node.names.insert(0, to.clone());
            node.at = None;
            self.by_name.insert(to.clone(), ino);
        }
    }

    /// This client sends a rename: no location answer is taken until its reply is
    /// applied ([`Nodes::rename_done`], also when it failed).
    pub fn rename_sent(&mut self) {
        self.renaming += 1;
    }

    pub fn rename_done(&mut self) {
        self.renaming = self.renaming.saturating_sub(1);
        self.moves += 1;
    }

    /// Whether `ino` is a directory the kernel holds (not the root).
    pub fn is_dir(&self, ino: u64) -> bool {
        self.map.get(&ino).is_some_and(|n| n.dir)
    }

    /// The table's paths as of now, for [`Nodes::rehome`] once the server said where
    /// directories are.
    pub fn ticket(&self) -> Ticket {
        Ticket { moves: self.moves }
    }

    /// The server says where directories are now: (kernel inode, path). Taken only if
    /// nothing moved in the table since the ticket was issued and no rename of this
    /// client's is in flight (`None`: ask again later); then each directory the kernel
    /// still holds moves there: under its parent if the kernel holds that (a name it
    /// had there goes), else by its whole path. Returns how many moved.
    pub fn rehome(&mut self, t: Ticket, found: &[(u64, RelPath)]) -> Option<usize> {
        if t.moves != self.moves || self.renaming > 0 {
            return None;
        }
        Some(
            found
                .iter()
                .filter(|(ino, path)| self.place(*ino, path))
                .count(),
        )
    }

    /// Move directory `ino` to `path` (see [`Nodes::rehome`]); whether it moved.
    fn place(&mut self, ino: u64, path: &RelPath) -> bool {
        if ino == ROOT || !self.is_dir(ino) {
            return false;
        }
        let Some((parent_path, name)) = path.split_last() else {
            return false; // the root, which no other directory can be
        };
        let to = self.resolve(&parent_path).map(|p| (p, name.0));
        // A parent reached through the node itself (the table's names are older than
        // the answer) would make a cycle: the whole path then.
        let to = to.filter(|(p, _)| !self.beneath(*p, ino));
        let old: Vec<(u64, Vec<u8>)> = match self.map.get(&ino) {
            Some(n) if n.names.first() == to.as_ref() => return false, // there already
            Some(n) if to.is_none() && n.at.as_deref() == Some(path) => return false,
            Some(n) => n.names.clone(),
            None => return false,
        };
        self.moves += 1;
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
        }
        let Some(node) = self.map.get_mut(&ino) else {
            return false;
        };
        node.names.clear();
        match to {
            Some(key) => {
                node.at = None;
                node.names.push(key.clone());
                self.unverified.remove(&key);
                self.by_name.insert(key, ino);
            }
            None => node.at = Some(Box::new(path.clone())),
        }
        true
    }

    /// Whether `ino` is `dir` or reached through it by first names.
    fn beneath(&self, mut ino: u64, dir: u64) -> bool {
        for _ in 0..MAX_DEPTH {
            if ino == dir {
                return true;
            }
            match self.map.get(&ino).and_then(|n| n.names.first()) {
                Some((parent, _)) => ino = *parent,
                None => return false,
            }
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

    #[test]
    fn a_located_directory_moves_with_what_is_beneath() {
        let mut n = Nodes::new(500);
        n.remember(ROOT, b"work", 10, true);
        n.remember(10, b"f", 11, false);
        n.remember(ROOT, b"other", 20, true);
        assert!(n.is_dir(10) && !n.is_dir(11));
        // Renamed on the server to other/moved: under a directory the kernel holds.
        let t = n.ticket();
        assert_eq!(n.rehome(t, &[(10, rp("other/moved"))]), Some(1));
        assert_eq!(n.path(11).unwrap().0, b"other/moved/f");
        assert_eq!(n.child(ROOT, b"work"), None);
        assert_eq!(n.child(20, b"moved"), Some(10));
        // Then beneath a directory it does not hold: by its whole path.
        let t = n.ticket();
        assert_eq!(n.rehome(t, &[(10, rp("far/away"))]), Some(1));
        assert_eq!(n.path(11).unwrap().0, b"far/away/f");
        assert_eq!(n.child(20, b"moved"), None);
        // Said again, nothing moves; files are not moved at all.
        let t = n.ticket();
        assert_eq!(n.rehome(t, &[(10, rp("far/away")), (11, rp("x"))]), Some(0));
        // A lookup of it by a name gives it that name again.
        n.remember(ROOT, b"back", 10, true);
        assert_eq!(n.path(11).unwrap().0, b"back/f");
    }

    #[test]
    fn a_location_is_not_taken_after_a_move_or_during_a_rename() {
        let mut n = Nodes::new(500);
        n.remember(ROOT, b"a", 10, true);
        n.remember(ROOT, b"b", 20, true);
        // This client's exchange of a and b, whose events came before its reply: the
        // answer must not be applied before the exchange is, nor after it.
        let t = n.ticket();
        let answer = [(10, rp("b")), (20, rp("a"))];
        n.rename_sent();
        assert_eq!(n.rehome(t, &answer), None);
        n.renamed(ROOT, b"a", ROOT, b"b", true);
        n.rename_done();
        assert_eq!(n.rehome(t, &answer), None, "asked before the exchange");
        assert_eq!(n.path(10).unwrap().0, b"b");
        assert_eq!(n.path(20).unwrap().0, b"a");
        assert_eq!(n.rehome(n.ticket(), &answer), Some(0), "there already");
        // An answer asked for before a lookup moved the node is out of date.
        let t = n.ticket();
        n.remember(20, b"inside", 10, true);
        assert_eq!(n.rehome(t, &[(10, rp("b"))]), None);
        assert_eq!(n.path(10).unwrap().0, b"a/inside");
        // A fresh one is taken; the name it lands on is taken from whoever had it.
        let t = n.ticket();
        assert_eq!(n.rehome(t, &[(10, rp("b"))]), Some(1));
        assert_eq!(n.path(10).unwrap().0, b"b");
        assert_eq!(n.child(20, b"inside"), None);
    }

    #[test]
    fn a_location_beneath_the_node_itself_makes_no_cycle() {
        let mut n = Nodes::new(500);
        n.remember(ROOT, b"a", 10, true);
        n.remember(10, b"b", 20, true);
        // The server swapped them around: a is now b/a, b is at the root. The table
        // still has b beneath a.
        let t = n.ticket();
        assert_eq!(n.rehome(t, &[(10, rp("b/a"))]), Some(1));
        assert_eq!(n.path(10).unwrap().0, b"b/a");
        assert!(n.path(20).is_ok());
    }

    fn rp(s: &str) -> RelPath {
        RelPath(s.as_bytes().to_vec())
    }
}
