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
}

impl Nodes {
    pub fn new(root_server_ino: u64) -> Self {
        Nodes {
            root_server_ino,
            map: HashMap::new(),
            by_name: HashMap::new(),
            unverified: HashSet::new(),
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
            let (parent, name) = node.names.first().ok_or(FsError::Errno(libc::ENOENT))?;
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
    pub fn remember_unverified(&mut self, parent: u64, name: &[u8], ino: u64) {
        self.remember(parent, name, ino);
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

    /// The kernel now holds one more reference to `ino`, reached as `parent/name`.
    pub fn remember(&mut self, parent: u64, name: &[u8], ino: u64) {
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
        });
        node.lookups += 1;
        // Most recently seen name first: it is the one most likely still valid.
        if let Some(pos) = node.names.iter().position(|n| *n == key) {
            node.names.remove(pos);
        }
        node.names.insert(0, key.clone());
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
            node.names.retain(|n| n != from);
            node.names.insert(0, to.clone());
            self.by_name.insert(to.clone(), ino);
        }
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
        n.remember(ROOT, b"d", 10);
        n.remember(10, b"f", 11);
        assert_eq!(n.path(11).unwrap().0, b"d/f");
        n.renamed(ROOT, b"d", ROOT, b"e", false);
        assert_eq!(n.path(11).unwrap().0, b"e/f");
        n.remember(ROOT, b"hard", 11);
        n.unlinked(10, b"f");
        assert_eq!(n.path(11).unwrap().0, b"hard");
        n.unlinked(ROOT, b"hard");
        assert!(n.path(11).is_err());
    }

    #[test]
    fn exchange_and_replace() {
        let mut n = Nodes::new(2);
        n.remember(ROOT, b"a", 10);
        n.remember(ROOT, b"b", 11);
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
        n.remember(ROOT, b"a", 10);
        n.remember(ROOT, b"b", 20);
        n.remember(10, b"x", 11);
        n.remember(10, b"y", 12);
        n.remember(20, b"z", 21);
        n.remember(11, b"deep", 13);
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
        n.remember(ROOT, b"a", 10);
        n.remember(ROOT, b"a", 10);
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
            n.remember(ROOT, format!("file{ino}").as_bytes(), ino);
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
}
