//! The kept listings (`Core::dir_cache`): each directory's complete listing, valid while
//! the event stream is, with the server inode numbers of its files sorted beside it.
//!
//! A change reported under one name of a file with several (or a link count this client
//! changed) must drop every listing that shows the file under another name, which no
//! event names. Scanning the entries themselves reads every cached `DirEntry` (name and
//! attributes) per such change, on the connection's reader: 8.2 ms with 300,000 cached
//! names in 10,000 listings (release build, a throwaway test); the sorted numbers make
//! it one binary search per kept listing, 0.5 ms there, for 8 bytes more per file.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use ferry_common::proto::{Attr, DirEntry, FileKind};

use super::TTL_WITHOUT_EVENTS;

/// Whether attributes of `a` may be trusted for as long as events flow: not those of a
/// file with several names, whose link count (and ctime) a change of a name in another
/// directory moves, which only an event for that directory reports, and only to a
/// client that holds the file by that name. Such attributes are trusted for
/// [`TTL_WITHOUT_EVENTS`] at most.
pub fn events_vouch_for(a: &Attr) -> bool {
    a.kind == FileKind::Dir || a.nlink <= 1
}

struct Kept {
    entries: Arc<Vec<DirEntry>>,
    /// Server inode numbers of the listing's non-directory entries, sorted.
    files: Box<[u64]>,
    /// (hash of the name, index of the entry), sorted: made at the first
    /// [`Listings::find`] (a kernel that forgot entries it had from this listing).
    names: OnceLock<Box<[(u64, u32)]>>,
    /// When a listing showing files with several names stops being served (see
    /// [`events_vouch_for`]).
    until: Option<Instant>,
}

impl Kept {
    fn fresh(&self) -> bool {
        self.until.is_none_or(|t| Instant::now() < t)
    }
}

/// The names' hash: any fixed one (the index lives as long as the process).
fn name_hash(name: &[u8]) -> u64 {
    rustc_hash::FxBuildHasher.hash_one(name)
}

#[derive(Default)]
pub(super) struct Listings {
    by_dir: HashMap<u64, Kept>,
}

impl Listings {
    fn kept(&self, dir: u64) -> Option<&Kept> {
        self.by_dir.get(&dir).filter(|k| k.fresh())
    }

    pub fn get(&self, dir: u64) -> Option<&Arc<Vec<DirEntry>>> {
        self.kept(dir).map(|k| &k.entries)
    }

    pub fn contains(&self, dir: u64) -> bool {
        self.kept(dir).is_some()
    }

    /// Keeps `entries` as the listing of `dir`, unless one is kept already (and still
    /// served).
    pub fn keep(&mut self, dir: u64, entries: &Arc<Vec<DirEntry>>) {
        let kept = || {
            let mut files: Vec<u64> = entries
                .iter()
                .filter(|e| e.attr.kind != FileKind::Dir)
                .map(|e| e.attr.ino)
                .collect();
            files.sort_unstable();
            let linked = entries.iter().any(|e| !events_vouch_for(&e.attr));
            Kept {
                entries: Arc::clone(entries),
                files: files.into_boxed_slice(),
                names: OnceLock::new(),
                until: linked.then(|| Instant::now() + TTL_WITHOUT_EVENTS),
            }
        };
        match self.by_dir.entry(dir) {
            Entry::Occupied(mut o) if !o.get().fresh() => {
                o.insert(kept());
            }
            Entry::Occupied(_) => {}
            Entry::Vacant(v) => {
                v.insert(kept());
            }
        }
    }

    /// The attributes the kept listing of `dir` has for `name`.
    pub fn find(&self, dir: u64, name: &[u8]) -> Option<Attr> {
        let k = self.kept(dir)?;
        let names = k.names.get_or_init(|| {
            let mut v: Vec<(u64, u32)> = k
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| (name_hash(&e.name.0), i as u32))
                .collect();
            v.sort_unstable();
            v.into_boxed_slice()
        });
        let h = name_hash(name);
        let first = names.partition_point(|&(x, _)| x < h);
        names[first..]
            .iter()
            .take_while(|&&(x, _)| x == h)
            .map(|&(_, i)| &k.entries[i as usize])
            .find(|e| e.name.0 == name)
            .map(|e| e.attr)
    }

    pub fn remove(&mut self, dir: u64) {
        self.by_dir.remove(&dir);
    }

    pub fn clear(&mut self) {
        self.by_dir.clear();
    }

    /// Drops every listing that shows the file with server inode number `sino`.
    pub fn forget_showing(&mut self, sino: u64) {
        self.by_dir
            .retain(|_, k| k.files.binary_search(&sino).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::proto::Name;

    fn entry(ino: u64, kind: FileKind) -> DirEntry {
        let mut attr = super::super::files::lazy_attr(ino, 1, 0);
        attr.kind = kind;
        DirEntry {
            name: Name(format!("n{ino}").into_bytes()),
            attr,
        }
    }

    #[test]
    fn a_file_drops_exactly_the_listings_that_show_it() {
        let mut l = Listings::default();
        let a = Arc::new(vec![entry(9, FileKind::File), entry(3, FileKind::File)]);
        let b = Arc::new(vec![entry(3, FileKind::File), entry(5, FileKind::Dir)]);
        let c = Arc::new(vec![entry(7, FileKind::File)]);
        l.keep(1, &a);
        l.keep(2, &b);
        l.keep(4, &c);
        // A directory is never dropped as a file.
        l.forget_showing(5);
        assert!(l.contains(1) && l.contains(2) && l.contains(4));
        l.forget_showing(3);
        assert!(!l.contains(1) && !l.contains(2) && l.contains(4));
        // Kept once: a second listing does not replace the first.
        l.keep(4, &a);
        assert!(Arc::ptr_eq(l.get(4).unwrap_or(&a), &c));
        l.remove(4);
        assert!(l.get(4).is_none());
    }

    #[test]
    fn names_are_found_in_a_kept_listing() {
        let mut l = Listings::default();
        let many: Vec<DirEntry> = (1..=5000).map(|i| entry(i, FileKind::File)).collect();
        l.keep(1, &Arc::new(many));
        for i in [1u64, 2, 2500, 4999, 5000] {
            let found = l.find(1, format!("n{i}").as_bytes());
            assert_eq!(found.map(|a| a.ino), Some(i), "n{i}");
        }
        assert!(l.find(1, b"n0").is_none());
        assert!(l.find(1, b"n5001").is_none());
        assert!(l.find(2, b"n1").is_none(), "no listing kept for 2");
    }
}
