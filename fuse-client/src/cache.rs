//! The persistent on-disk data cache: file contents by server inode, in 128 KiB blocks.
//!
//! Each cached file is a sparse `<ino>.data` file plus `<ino>.meta` (the server version the
//! blocks belong to, the file size, which blocks are present). Reading 4 KiB of a 10 GiB
//! file caches one block, not the file. Blocks are served only while the file's server
//! version equals the version they were fetched at: [`DataCache::validate`] drops them the
//! moment the server reports another version. The metadata is written back when a file is
//! closed and at unmount, so a remount of an unchanged export reads from disk, not the
//! network.
//!
//! The size cap is hard: before a block is stored, least recently used blocks are
//! evicted until it fits, including blocks of the file being copied when that file alone
//! is larger than the cap. They are punched out of their data files after the cache lock
//! is released, and count as on the disk until they are (see [`DataCache::evict_to`]).
//!
//! The last fetched pieces of sequential reads are also kept in memory (up to
//! `KEEP_CAP` bytes in all) and answer the reads they were fetched for, so data that just
//! came from the network is not read back from the data file, and the data file is
//! written without keeping the bytes in the page cache. A kept piece is served only
//! while its blocks are present at the entry's generation: every change of the entry
//! (a new version, this client's writes, a truncation, a re-base) drops them. A piece
//! goes once read through, at the file's last close, or when abandoned; one that finds
//! no room is not kept, and its bytes stay in the page cache as any other store's.
//!
//! This module owns only the cache directory; it never talks to the network and never
//! blocks on anything but local disk I/O (callers run it on blocking-friendly threads or
//! accept short local I/O).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Unit of caching and eviction.
pub const BLOCK: u64 = 128 * 1024;

/// What a cached block costs on disk is counted in units of this (the block size of
/// ext4, xfs, btrfs and tmpfs on 4 KiB pages): a 100-byte file takes 4 KiB. (A
/// filesystem with larger blocks takes more than is counted for small files.)
const DISK_UNIT: u64 = 4096;

/// What an entry's metadata file costs on disk, counted while it has any block: a
/// file's own `<ino>.meta` takes a filesystem block, as much as a small file's data.
const META_CHARGE: u64 = DISK_UNIT;

/// What the data of block `b` of a file of `size` bytes counts against the cap
/// (`Inner::used`): its bytes in whole `DISK_UNIT`s. With the entry's `META_CHARGE`
/// (see [`Entry::charged`]); counting bytes alone, a cache of 2 KB files took four times
/// its cap on disk.
fn charge_of(size: u64, b: u64) -> u64 {
    let bytes = size.saturating_sub(b * BLOCK).min(BLOCK);
    bytes.div_ceil(DISK_UNIT) * DISK_UNIT
}

/// Bytes of fetched pieces kept in memory for the reads they were fetched for, in all.
/// A sequential reader's readahead runs up to 1.5 windows (24 MiB) ahead of it.
const KEEP_CAP: u64 = 32 * 1024 * 1024;

/// Entries of `Inner::kept_order` beyond which those of pieces already gone are swept.
const KEEP_ORDER_MAX: usize = 1024;

/// A kept piece not read through while this many bytes of newer pieces were offered
/// for keeping (8 times the cap: room for several readers' readahead) was abandoned by
/// its reader and is dropped. (Half that in unit tests, which write it all to disk.)
const KEEP_ABANDONED: u64 = if cfg!(test) { 4 } else { 8 } * KEEP_CAP;

/// Largest metadata file accepted when loading (a corrupt one is dropped, not trusted).
const MAX_META: usize = 16 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    version: u64,
    size: u64,
    blocks: Vec<u64>,
}

#[derive(Debug)]
struct Entry {
    version: u64,
    size: u64,
    /// Present blocks and their LRU tick.
    blocks: HashMap<u64, u64>,
    meta_dirty: bool,
    /// Changes whenever this client's writes touch the entry or it is re-based; a fill
    /// stores its data only if the generation it started under is still current.
    generation: u64,
    /// This client wrote bytes the server has not committed yet: data fetched from the
    /// server may lack them, so nothing fetched is stored until [`DataCache::adopt`].
    dirty: bool,
    /// Fetched pieces kept in memory (see [`DataCache::store_and_keep`]), by offset.
    kept: Vec<Kept>,
    /// `<ino>.meta` exists and lists blocks as this entry's: it must go before any of
    /// those blocks' bytes change (see [`Entry::unlist`]).
    on_disk: bool,
}

/// A piece of a file as fetched and stored, kept in memory for the reads about to ask
/// for it.
#[derive(Debug)]
struct Kept {
    offset: u64,
    data: Bytes,
    /// The entry's generation when it was stored: served only while it is current.
    generation: u64,
    /// Bytes read from it so far: a piece read through is dropped.
    served: u64,
    /// Order of keeping, for the cap (`Inner::kept_order`).
    seq: u64,
    /// `Inner::keep_clock` when it was kept.
    born: u64,
}

impl Entry {
    fn block_len(&self, block: u64) -> u64 {
        let start = block * BLOCK;
        self.size.saturating_sub(start).min(BLOCK)
    }

    /// What the entry counts against the cap: its blocks' data (see [`charge_of`]), and
    /// its metadata file while it has any. Every change of the blocks (or of the size,
    /// with blocks present) moves `Inner::used` by the difference of this before and
    /// after.
    fn charged(&self) -> u64 {
        // (O(blocks): for whole-entry changes. A block added or removed moves `used` by
        // `add_block`/`remove_block`.)
        let data: u64 = self.blocks.keys().map(|&b| charge_of(self.size, b)).sum();
        if self.blocks.is_empty() {
            0
        } else {
            data + META_CHARGE
        }
    }

    /// Whether every block of the file is present.
    fn whole(&self) -> bool {
        (0..self.size.div_ceil(BLOCK)).all(|b| self.blocks.contains_key(&b))
    }

    /// An entry for a file this client changed before knowing its server version: no
    /// version matches it, so nothing is served from it until a commit or an open
    /// re-bases it.
    fn changed_locally(size: u64, generation: u64) -> Entry {
        Entry {
            version: u64::MAX,
            size,
            blocks: HashMap::new(),
            meta_dirty: false,
            generation,
            dirty: true,
            kept: Vec::new(),
            on_disk: false,
        }
    }

    /// The bytes of this entry's blocks are about to change, or the blocks to go: its
    /// metadata file goes first (under the cache lock, before the data file is touched),
    /// so what is on disk never lists a block whose bytes are not the server's at the
    /// listed version, whenever this daemon dies. [`DataCache::persist`] writes it anew.
    fn unlist(&mut self, dir: &Path, ino: u64) {
        if self.on_disk {
            let _ = std::fs::remove_file(meta_path_in(dir, ino));
            self.on_disk = false;
        }
        self.meta_dirty = true;
    }

    /// Record block `b` at LRU tick `t`; what it adds to `Inner::used` (its data, and
    /// the metadata's charge for an entry's first block), 0 if it was there.
    fn add_block(&mut self, b: u64, t: u64, lru: &mut BTreeMap<u64, (u64, u64)>) -> u64 {
        let first = self.blocks.is_empty();
        match self.blocks.insert(b, t) {
            Some(old) => {
                lru.remove(&old);
                0
            }
            None => charge_of(self.size, b) + if first { META_CHARGE } else { 0 },
        }
    }

    /// Forget block `b`; what that takes off `Inner::used` (0 if it was not there).
    fn remove_block(&mut self, b: u64, lru: &mut BTreeMap<u64, (u64, u64)>) -> u64 {
        let Some(t) = self.blocks.remove(&b) else {
            return 0;
        };
        lru.remove(&t);
        charge_of(self.size, b)
            + if self.blocks.is_empty() {
                META_CHARGE
            } else {
                0
            }
    }

    /// Drop every cached block of the entry from the LRU and the byte count.
    fn drop_blocks(&mut self, lru: &mut BTreeMap<u64, (u64, u64)>, used: &mut u64) {
        let freed = self.charged();
        for (_, t) in self.blocks.drain() {
            lru.remove(&t);
        }
        *used = used.saturating_sub(freed);
    }
}

#[derive(Debug, Default)]
struct Inner {
    files: HashMap<u64, Entry>,
    /// tick → (ino, block), oldest first.
    lru: BTreeMap<u64, (u64, u64)>,
    tick: u64,
    used: u64,
    /// Bytes stores have made room for and are writing (see [`DataCache::evict_to`]):
    /// counted against the cap until their blocks are recorded, so two stores at once
    /// cannot both fill the same free space.
    reserved: u64,
    generations: u64,
    /// Bytes of all kept pieces, and (ino, seq) of each in the order they were kept:
    /// the oldest are looked at first for pieces gone or abandoned.
    kept_bytes: u64,
    kept_order: VecDeque<(u64, u64)>,
    kept_seq: u64,
    /// Bytes of pieces offered for keeping (kept or not): the age of kept pieces.
    keep_clock: u64,
    /// Entries a passthrough open reads directly (by server inode, with a count): their
    /// data file is never punched, evicted or replaced, only rewritten, cut or
    /// lengthened in place (see [`DataCache::pin`]).
    pins: HashMap<u64, u32>,
    /// Entries whose data file was handed to the kernel as a passthrough backing file:
    /// a process may still map it after every open closed (its map reads and writes
    /// that file, not the daemon). Once unpinned, such a file is never cut or punched:
    /// it is unlinked and a new one begun, so a map keeps the bytes it had.
    /// `true`: a process may also map the current data file writable (a writer beside
    /// passthrough readers), so any byte of it may change at any time and the entry's
    /// metadata is never written (see [`DataCache::mappable`]) until the file is
    /// replaced.
    exposed: HashMap<u64, bool>,
    /// Stores writing their bytes now (outside the lock): (ino, first block, last
    /// block, id). Their blocks are not evicted, their data file not emptied, their
    /// entry's metadata not written, and no other store writes the same blocks.
    stores: Vec<(u64, u64, u64, u64)>,
    store_ids: u64,
    /// Evicted blocks being punched out of their data files now (outside the lock):
    /// (ino, first block, last block, id), as for `stores`. No store writes them until
    /// the punch is done (its bytes would be punched out after it recorded them), and
    /// no passthrough open pins their entry.
    punches: Vec<(u64, u64, u64, u64)>,
    /// What they counted in `used` (see [`Entry::charged`]): out of it, still on the disk.
    punching: u64,
    /// Reads of present blocks from their data files now (outside the lock): (ino,
    /// first block, last block, id). Their blocks are not evicted meanwhile (a punch
    /// would have them read as zeros); any other change moves the entry's version or
    /// generation, which the read checks once it has the bytes.
    reads: Vec<(u64, u64, u64, u64)>,
}

impl Inner {
    /// Register a store of the block runs `first..=last` of `ino` (none of them being
    /// written by another store, see [`Inner::storing`]); its id for `end_store`.
    fn begin_store(&mut self, ino: u64, runs: &[(u64, u64)]) -> u64 {
        self.store_ids += 1;
        for &(first, last) in runs {
            self.stores.push((ino, first, last, self.store_ids));
        }
        self.store_ids
    }

    fn end_store(&mut self, id: u64) {
        self.stores.retain(|s| s.3 != id);
    }

    /// Whether the metadata of `ino` may be written: no store is writing its blocks
    /// and no process may map its data file writable. (A punch in flight does not
    /// matter: its blocks are out of the index, so no metadata lists them.)
    fn settled(&self, ino: u64) -> bool {
        !self.stores.iter().any(|&(i, ..)| i == ino) && self.exposed.get(&ino) != Some(&true)
    }

    /// Whether a store is writing block `b` of `ino`, or an eviction punching it out
    /// (`None`: any block).
    fn storing(&self, ino: u64, b: Option<u64>) -> bool {
        holds(self.stores.iter().chain(&self.punches), ino, b)
    }

    /// Register a read of the present blocks `first..=last` of `ino` from its data
    /// file (see `Inner::reads`); its id for `end_read`.
    fn begin_read(&mut self, ino: u64, first: u64, last: u64) -> u64 {
        self.store_ids += 1;
        self.reads.push((ino, first, last, self.store_ids));
        self.store_ids
    }

    fn end_read(&mut self, id: u64) {
        self.reads.retain(|r| r.3 != id);
    }

    /// Whether a read is taking block `b` of `ino` from its data file.
    fn reading(&self, ino: u64, b: u64) -> bool {
        holds(&self.reads, ino, b.into())
    }

    /// Whether an eviction is punching blocks out of the data file of `ino`.
    fn punching(&self, ino: u64) -> bool {
        holds(&self.punches, ino, None)
    }

    fn next_generation(&mut self) -> u64 {
        self.generations += 1;
        self.generations
    }

    /// Drop the kept pieces of `ino` (its entry changed).
    fn forget_kept(&mut self, ino: u64) {
        if let Some(e) = self.files.get_mut(&ino) {
            let freed: u64 = e.kept.drain(..).map(|k| k.data.len() as u64).sum();
            self.kept_bytes = self.kept_bytes.saturating_sub(freed);
        }
    }

    /// Whether a piece of `len` bytes can be kept: room under the cap once pieces
    /// read through or abandoned are dropped. Pieces still to be read are never pushed
    /// out for a newer one (they are what their readers ask for next, and their bytes
    /// are no longer in the page cache): a piece that does not fit is simply not kept.
    fn room_to_keep(&mut self, len: u64) -> bool {
        while let Some(&(oldest, seq)) = self.kept_order.front() {
            let born = self
                .files
                .get(&oldest)
                .and_then(|e| e.kept.iter().find(|k| k.seq == seq))
                .map(|k| k.born);
            // Its reader stopped: `KEEP_ABANDONED` bytes were offered since.
            let abandoned = born.is_some_and(|b| b + KEEP_ABANDONED < self.keep_clock);
            if born.is_some() && !abandoned {
                break;
            }
            self.kept_order.pop_front();
            if let Some(e) = self.files.get_mut(&oldest)
                && let Some(i) = e.kept.iter().position(|k| k.seq == seq)
            {
                let k = e.kept.remove(i);
                self.kept_bytes = self.kept_bytes.saturating_sub(k.data.len() as u64);
            }
        }
        len > 0 && self.kept_bytes + len <= KEEP_CAP
    }

    /// Keep `data` (stored at `offset` under `generation`) in memory, if there is room.
    fn keep(&mut self, ino: u64, offset: u64, data: Bytes, generation: u64) {
        let len = data.len() as u64;
        let Some(e) = self.files.get_mut(&ino) else {
            return;
        };
        // A piece fetched again replaces the one it overlaps.
        let end = offset + len;
        let mut freed = 0;
        e.kept.retain(|k| {
            let overlaps = k.offset < end && offset < k.offset + k.data.len() as u64;
            if overlaps {
                freed += k.data.len() as u64;
            }
            !overlaps
        });
        self.kept_bytes = self.kept_bytes.saturating_sub(freed);
        if !self.room_to_keep(len) {
            return;
        }
        let Some(e) = self.files.get_mut(&ino) else {
            return;
        };
        self.kept_seq += 1;
        let at = e.kept.partition_point(|k| k.offset < offset);
        e.kept.insert(
            at,
            Kept {
                offset,
                data,
                generation,
                served: 0,
                seq: self.kept_seq,
                born: self.keep_clock,
            },
        );
        self.kept_bytes += len;
        self.kept_order.push_back((ino, self.kept_seq));
        // Pieces read through leave their entries behind; a live piece at the front
        // keeps them from being skipped: sweep now and then.
        if self.kept_order.len() > KEEP_ORDER_MAX {
            let files = &self.files;
            self.kept_order.retain(|&(ino, seq)| {
                files
                    .get(&ino)
                    .is_some_and(|e| e.kept.iter().any(|k| k.seq == seq))
            });
        }
    }
}

impl Entry {
    /// `[offset, end)` from the kept pieces, if they hold all of it at the entry's
    /// generation (the caller checked that its blocks are present). A single piece
    /// gives a view into itself; a range across pieces is copied. Whether they answer
    /// or not, the pieces count the range as read, and those read to their end are
    /// dropped (a read the data file answered does not leave them behind); the second
    /// value is the bytes freed with them.
    fn take_kept(&mut self, offset: u64, end: u64) -> (Option<Bytes>, u64) {
        let data = self.kept_range(offset, end);
        let mut freed = 0;
        self.kept.retain_mut(|k| {
            let (from, to) = (
                offset.max(k.offset),
                end.min(k.offset + k.data.len() as u64),
            );
            if from < to {
                k.served += to - from;
            }
            let done = k.served >= k.data.len() as u64;
            if done {
                freed += k.data.len() as u64;
            }
            !done
        });
        (data, freed)
    }

    fn kept_range(&self, offset: u64, end: u64) -> Option<Bytes> {
        let first = self
            .kept
            .iter()
            .position(|k| k.offset <= offset && offset < k.offset + k.data.len() as u64)?;
        let mut at = offset;
        let mut last = first;
        while at < end {
            let k = self.kept.get(last)?;
            if k.offset > at || k.generation != self.generation {
                return None;
            }
            at = k.offset + k.data.len() as u64;
            if at < end {
                last += 1;
            }
        }
        if first == last {
            let k = &self.kept[first];
            return Some(
                k.data
                    .slice((offset - k.offset) as usize..(end - k.offset) as usize),
            );
        }
        let mut v = Vec::with_capacity((end - offset) as usize);
        for k in &self.kept[first..=last] {
            let from = offset.max(k.offset) - k.offset;
            let to = end.min(k.offset + k.data.len() as u64) - k.offset;
            v.extend_from_slice(&k.data[from as usize..to as usize]);
        }
        Some(Bytes::from(v))
    }
}

#[derive(Debug, Default)]
pub struct CacheStats {
    pub hit_bytes: AtomicU64,
    pub miss_bytes: AtomicU64,
    pub evicted_bytes: AtomicU64,
}

pub struct DataCache {
    dir: PathBuf,
    cap: u64,
    /// Free space left on the cache's filesystem (0: no check), see [`DataCache::limit`].
    min_free: u64,
    /// `used` plus the filesystem's free bytes when last sampled, and when: what the
    /// cache could grow to (other programs' use aside), for [`DataCache::limit`].
    room: Mutex<Option<(std::time::Instant, u64)>>,
    /// Set once [`DataCache::limit`] has logged that free space limits the cache.
    limited: AtomicBool,
    /// Set by [`DataCache::close`]: no metadata is written after it.
    closed: AtomicBool,
    // std Mutex: bookkeeping only; file I/O happens outside it where possible.
    inner: Mutex<Inner>,
    /// An eviction's punches are done (see [`DataCache::evict_to`]).
    punched: Condvar,
    /// Tests: held, it stops evictions between taking blocks out and punching them.
    #[cfg(test)]
    punch_gate: Mutex<()>,
    /// Tests: held, it stops stores between making room and writing their blocks.
    #[cfg(test)]
    store_gate: Mutex<()>,
    /// Tests: held, it stops reads of present blocks before they read the data file.
    #[cfg(test)]
    read_gate: Mutex<()>,
    /// Serializes metadata write-back (its temporary files share names).
    persisting: Mutex<()>,
    /// `LOCK_FILE`, locked: one mount at a time uses a cache dir.
    _lock: File,
    /// Pinned entries a process's shared map stored into, as seen just before this
    /// daemon's own write to the data file (which changes its mtime too): kept until
    /// [`DataCache::take_mapped_stores`].
    mapped: Mutex<HashSet<u64>>,
    /// Whether a store through a shared map changes the data file's mtime on this
    /// filesystem, also the next store into a page once it was written back (as on
    /// ext4; not on tmpfs, which writes nothing back). Without it every map store is
    /// assumed (and mounts of writable exports use no passthrough).
    maps_show: bool,
    pub stats: CacheStats,
}

/// A pinned data file a map stored into (see [`DataCache::take_mapped_stores`]).
#[derive(Debug)]
pub struct MappedCopy {
    pub file: File,
    /// Ranges holding the current version, in order.
    pub ranges: Vec<(u64, u64)>,
    /// Whether they are the whole file.
    pub whole: bool,
}

/// Whether one of `runs` ((ino, first block, last block, id), as `Inner::stores`)
/// holds block `b` of `ino` (`None`: any block of it).
fn holds<'a>(
    runs: impl IntoIterator<Item = &'a (u64, u64, u64, u64)>,
    ino: u64,
    b: Option<u64>,
) -> bool {
    runs.into_iter()
        .any(|&(i, f, l, _)| i == ino && b.is_none_or(|b| f <= b && b <= l))
}

/// An eviction's punch of `[off, off+len)` out of a data file (see
/// [`DataCache::evict_to`]).
struct Punch {
    /// The data file as it was at the eviction: a file that replaced it since is not
    /// touched.
    file: std::sync::Arc<File>,
    off: u64,
    len: u64,
    /// What its evicted blocks counted in `used` (see [`charge_of`]).
    counted: u64,
}

/// Result of asking the cache for a range.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit(Bytes),
    /// Block-aligned ranges `(offset, len)` that must be fetched first.
    Miss(Vec<(u64, u64)>),
}

fn lock_err() -> io::Error {
    io::Error::other("cache lock poisoned")
}

impl DataCache {
    /// Open (or create) the cache in `dir`, keeping at most `cap` bytes of file data.
    /// Fails with [`io::ErrorKind::WouldBlock`] while another mount uses `dir`.
    pub fn open(dir: &Path, cap: u64) -> io::Result<DataCache> {
        Self::open_with(dir, cap, 0, None)
    }

    /// [`DataCache::open`] for the mount at `user` (recorded with this process's id for
    /// [`DataCache::user_of`]), keeping at least `min_free` bytes free on the filesystem
    /// of `dir` as well: when other programs take the space, the cache gives it back.
    pub fn open_for(dir: &Path, cap: u64, min_free: u64, user: &Path) -> io::Result<DataCache> {
        Self::open_with(dir, cap, min_free, Some(user))
    }

    /// The process id and mountpoint of the mount that last used the cache in `dir`.
    pub fn user_of(dir: &Path) -> Option<(u32, PathBuf)> {
        use std::os::unix::ffi::OsStringExt;
        let bytes = std::fs::read(dir.join(LOCK_FILE)).ok()?;
        let nl = bytes.iter().position(|&b| b == b'\n')?;
        let pid = std::str::from_utf8(&bytes[..nl]).ok()?.parse().ok()?;
        let path = PathBuf::from(std::ffi::OsString::from_vec(bytes[nl + 1..].to_vec()));
        Some((pid, path))
    }

    fn open_with(
        dir: &Path,
        cap: u64,
        min_free: u64,
        user: Option<&Path>,
    ) -> io::Result<DataCache> {
        std::fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        // SAFETY: a valid descriptor; the lock goes with it when the cache is dropped.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is in use by another mount", dir.display()),
                ),
                _ => e,
            });
        }
        if let Some(user) = user {
            let mut record = format!("{}\n", std::process::id()).into_bytes();
            record.extend_from_slice(user.as_os_str().as_encoded_bytes());
            lock.set_len(0)?;
            lock.write_all_at(&record, 0)?;
        }
        begin_session(dir)?;
        let cache = DataCache {
            _lock: lock,
            dir: dir.to_path_buf(),
            cap: cap.max(BLOCK + META_CHARGE),
            min_free,
            room: Mutex::new(None),
            limited: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            inner: Mutex::new(Inner::default()),
            punched: Condvar::new(),
            #[cfg(test)]
            punch_gate: Mutex::new(()),
            #[cfg(test)]
            store_gate: Mutex::new(()),
            #[cfg(test)]
            read_gate: Mutex::new(()),
            persisting: Mutex::new(()),
            mapped: Mutex::new(HashSet::new()),
            maps_show: maps_change_mtime(dir),
            stats: CacheStats::default(),
        };
        cache.load()?;
        Ok(cache)
    }

    /// Whether a store through a shared map of a data file changes its mtime here,
    /// every time (see [`DataCache::mapped_stores`]).
    pub fn dates_map_stores(&self) -> bool {
        self.maps_show
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// What the cached files take on disk, as counted against the cap (see [`Entry::charged`]).
    pub fn used(&self) -> u64 {
        self.inner.lock().map(|i| i.used).unwrap_or(0)
    }

    fn data_path(&self, ino: u64) -> PathBuf {
        self.dir.join(format!("{ino}.data"))
    }

    fn meta_path(&self, ino: u64) -> PathBuf {
        meta_path_in(&self.dir, ino)
    }

    fn load(&self) -> io::Result<()> {
        let mut metas = Vec::new();
        let mut datas = Vec::new();
        for ent in std::fs::read_dir(&self.dir)? {
            let ent = ent?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if name.ends_with(".meta.tmp") {
                // A write-back this daemon's predecessor did not finish.
                let _ = std::fs::remove_file(ent.path());
                continue;
            }
            if let Some(ino) = name
                .strip_suffix(".data")
                .and_then(|n| n.parse::<u64>().ok())
            {
                datas.push(ino);
                continue;
            }
            let Some(ino) = name
                .strip_suffix(".meta")
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            metas.push(ino);
        }
        // Data without metadata (its metadata went before its blocks changed, and this
        // daemon's predecessor died before writing it again) is nobody's: it would only
        // take room outside the cap.
        let listed: HashSet<u64> = metas.iter().copied().collect();
        for ino in datas.into_iter().filter(|ino| !listed.contains(ino)) {
            let _ = std::fs::remove_file(self.data_path(ino));
        }
        let mut found = self.read_metas(&metas);
        // Oldest metadata first: a rough recency order for the LRU after a restart.
        found.sort_by_key(|f| (f.0, f.1));
        let mut inner = self.inner.lock().map_err(|_| lock_err())?;
        for (_, ino, meta, data_ok) in found {
            match (meta, data_ok) {
                (Some(meta), Some(len)) => {
                    let generation = inner.next_generation();
                    let mut entry = Entry {
                        version: meta.version,
                        size: meta.size,
                        blocks: HashMap::new(),
                        meta_dirty: false,
                        generation,
                        dirty: false,
                        kept: Vec::new(),
                        on_disk: true,
                    };
                    for b in meta.blocks {
                        // (An empty file is cached as its block 0, of no bytes.)
                        if b * BLOCK >= meta.size && (b, meta.size) != (0, 0) {
                            continue;
                        }
                        if b * BLOCK + entry.block_len(b) > len {
                            // Its bytes cannot be in a data file this short: not trusted,
                            // nor is the metadata that lists it (written again without).
                            entry.unlist(&self.dir, ino);
                            continue;
                        }
                        inner.tick += 1;
                        let t = inner.tick;
                        entry.blocks.insert(b, t);
                        inner.lru.insert(t, (ino, b));
                    }
                    inner.used += entry.charged();
                    inner.files.insert(ino, entry);
                }
                _ => {
                    let _ = std::fs::remove_file(self.meta_path(ino));
                    let _ = std::fs::remove_file(self.data_path(ino));
                }
            }
        }
        drop(inner);
        self.evict_to(0)?;
        Ok(())
    }

    /// For each of `inos`, its metadata file's mtime and content and its data file's
    /// length, read by several threads at once: a mount with a cache of 20,000 files
    /// spent 2 s reading them one at a time from a cold disk.
    #[allow(clippy::type_complexity)]
    fn read_metas(
        &self,
        inos: &[u64],
    ) -> Vec<(
        Option<std::time::SystemTime>,
        u64,
        Option<Meta>,
        Option<u64>,
    )> {
        let read_one = |ino: u64| {
            // One open: its mtime and length from the descriptor, and a file too long to
            // be metadata is not read at all.
            let file = File::open(self.meta_path(ino)).ok();
            let stat = file.as_ref().and_then(|f| f.metadata().ok());
            let mtime = stat.as_ref().and_then(|m| m.modified().ok());
            let meta = file
                .zip(stat)
                .filter(|(_, m)| m.len() <= MAX_META as u64)
                .and_then(|(mut f, m)| {
                    let mut b = Vec::with_capacity(m.len() as usize);
                    f.read_to_end(&mut b).ok().map(|_| b)
                })
                .filter(|b| b.len() <= MAX_META)
                .and_then(|b| {
                    bincode::serde::decode_from_slice::<Meta, _>(&b, bincode::config::standard())
                        .ok()
                        .map(|(m, _)| m)
                });
            let data_len = std::fs::metadata(self.data_path(ino)).map(|m| m.len()).ok();
            (mtime, ino, meta, data_len)
        };
        const THREADS: usize = 16;
        if inos.len() < 64 {
            return inos.iter().map(|&ino| read_one(ino)).collect();
        }
        let chunk = inos.len().div_ceil(THREADS);
        let mut found = Vec::with_capacity(inos.len());
        std::thread::scope(|scope| {
            let running: Vec<_> = inos
                .chunks(chunk)
                .map(|part| {
                    let read_part = || part.iter().map(|&ino| read_one(ino)).collect::<Vec<_>>();
                    (
                        part,
                        std::thread::Builder::new().spawn_scoped(scope, read_part),
                    )
                })
                .collect();
            for (part, t) in running {
                match t.map(|t| t.join()) {
                    Ok(Ok(got)) => found.extend(got),
                    // Not started, or panicked: read here.
                    _ => found.extend(part.iter().map(|&ino| read_one(ino))),
                }
            }
        });
        found
    }

    /// The server says `ino` is at `version` with `size` bytes. Returns whether cached
    /// blocks (if any) are still current; stale ones are dropped.
    pub fn validate(&self, ino: u64, version: u64, size: u64) -> bool {
        let Ok(mut inner) = self.inner.lock() else {
            return false;
        };
        let inner = &mut *inner;
        match inner.files.get_mut(&ino) {
            Some(e) if e.version == version && e.size == size => !e.blocks.is_empty(),
            Some(e) => {
                e.unlist(&self.dir, ino);
                e.drop_blocks(&mut inner.lru, &mut inner.used);
                e.version = version;
                e.size = size;
                e.generation = inner.generations + 1;
                inner.generations += 1;
                inner.forget_kept(ino);
                self.reset_data(&inner.pins, &mut inner.exposed, ino, size);
                false
            }
            None => {
                // A pinned file is refilled in place: it must not outgrow the version.
                if inner.pins.contains_key(&ino) {
                    self.reset_data(&inner.pins, &mut inner.exposed, ino, size);
                }
                let generation = inner.next_generation();
                inner.files.insert(
                    ino,
                    Entry {
                        version,
                        size,
                        blocks: HashMap::new(),
                        meta_dirty: true,
                        generation,
                        dirty: false,
                        kept: Vec::new(),
                        on_disk: false,
                    },
                );
                false
            }
        }
    }

    /// After this client's own change the server reports `version`/`size`: the cached
    /// blocks (kept in step by [`DataCache::wrote`]) belong to that version now.
    pub fn adopt(&self, ino: u64, version: u64, size: u64) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let inner = &mut *inner;
        if let Some(e) = inner.files.get_mut(&ino) {
            e.unlist(&self.dir, ino);
            if e.size != size {
                // Our view of the length disagrees with the server's: trust nothing.
                e.drop_blocks(&mut inner.lru, &mut inner.used);
                self.reset_data(&inner.pins, &mut inner.exposed, ino, size);
            }
            e.version = version;
            e.size = size;
            e.dirty = false;
            e.generation = inner.generations + 1;
            inner.generations += 1;
            inner.forget_kept(ino);
        }
    }

    /// What a fetch must hand to [`DataCache::store`]: `None` while this client has
    /// uncommitted writes to `ino` (fetched data could lack them) or has no entry for it.
    pub fn token(&self, ino: u64) -> Option<u64> {
        let inner = self.inner.lock().ok()?;
        inner
            .files
            .get(&ino)
            .filter(|e| !e.dirty)
            .map(|e| e.generation)
    }

    fn recount(files: &HashMap<u64, Entry>) -> u64 {
        files.values().map(Entry::charged).sum()
    }

    /// The file size the cache has an entry for.
    pub fn size_of(&self, ino: u64) -> Option<u64> {
        self.inner.lock().ok()?.files.get(&ino).map(|e| e.size)
    }

    /// Whether every block of the file is cached at its current version.
    pub fn complete(&self, ino: u64) -> bool {
        let Ok(inner) = self.inner.lock() else {
            return false;
        };
        match inner.files.get(&ino) {
            Some(e) => e.whole(),
            None => false,
        }
    }

    /// The data file of `ino` opened for reading, when it holds exactly the file: every
    /// block cached at `version`, `size` bytes long, no uncommitted change of this client.
    /// With `pin`, the entry is pinned (see [`DataCache::pin`]) in the same step, so no
    /// eviction or reset can come between the check and the pin.
    pub fn open_complete(&self, ino: u64, version: u64, size: u64, pin: bool) -> Option<File> {
        let mut inner = self.inner.lock().ok()?;
        let e = inner.files.get(&ino)?;
        if e.version != version || e.size != size || e.dirty || !e.whole() {
            return None;
        }
        // A punch still to land would make holes under the passthrough readers (the
        // file may have been cut and filled again since its blocks were evicted).
        if pin && inner.punching(ino) {
            return None;
        }
        // Opened under the lock: no reset can cut the file between the check and here.
        let file = File::open(self.data_path(ino)).ok()?;
        file.metadata().ok().filter(|m| m.len() == size)?;
        if pin {
            let count = inner.pins.entry(ino).or_default();
            *count += 1;
            if *count > 1 {
                self.note_mapped_stores(ino, &file);
            }
            inner.exposed.entry(ino).or_insert(false);
            stamp_own(&file);
        }
        Some(file)
    }

    /// Block-aligned ranges of `[offset, offset+len)` (clipped to the file size) that are
    /// not cached at `version`. Does not count as a use for the LRU.
    pub fn missing(&self, ino: u64, version: u64, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let Ok(inner) = self.inner.lock() else {
            return vec![(offset, len)];
        };
        let Some(e) = inner.files.get(&ino).filter(|e| e.version == version) else {
            let start = offset / BLOCK * BLOCK;
            return vec![(start, (offset + len).div_ceil(BLOCK) * BLOCK - start)];
        };
        let end = (offset + len).min(e.size);
        let mut missing: Vec<(u64, u64)> = Vec::new();
        if offset >= end {
            return missing;
        }
        for b in offset / BLOCK..end.div_ceil(BLOCK) {
            if !e.blocks.contains_key(&b) {
                match missing.last_mut() {
                    Some((s, l)) if *s + *l == b * BLOCK => *l += BLOCK,
                    _ => missing.push((b * BLOCK, BLOCK)),
                }
            }
        }
        missing
    }

    /// Read `[offset, offset+len)` (clipped to the file size) if all of it is cached:
    /// from the kept pieces when they hold it, else from the data file.
    pub fn read(&self, ino: u64, version: u64, offset: u64, len: u64) -> io::Result<Lookup> {
        let (end, generation, id) = {
            let mut inner = self.inner.lock().map_err(|_| lock_err())?;
            let inner = &mut *inner;
            let Some(e) = inner.files.get_mut(&ino).filter(|e| e.version == version) else {
                let start = offset / BLOCK * BLOCK;
                return Ok(Lookup::Miss(vec![(
                    start,
                    (offset + len).div_ceil(BLOCK) * BLOCK - start,
                )]));
            };
            let end = (offset + len).min(e.size);
            if offset >= end {
                return Ok(Lookup::Hit(Bytes::new()));
            }
            let mut missing: Vec<(u64, u64)> = Vec::new();
            for b in offset / BLOCK..end.div_ceil(BLOCK) {
                match e.blocks.get_mut(&b) {
                    Some(t) => {
                        inner.lru.remove(t);
                        inner.tick += 1;
                        *t = inner.tick;
                        inner.lru.insert(inner.tick, (ino, b));
                    }
                    None => match missing.last_mut() {
                        Some((s, l)) if *s + *l == b * BLOCK => *l += BLOCK,
                        _ => missing.push((b * BLOCK, BLOCK)),
                    },
                }
            }
            if missing.is_empty() {
                let (data, freed) = e.take_kept(offset, end);
                inner.kept_bytes = inner.kept_bytes.saturating_sub(freed);
                if let Some(data) = data {
                    self.stats
                        .hit_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    return Ok(Lookup::Hit(data));
                }
            }
            if !missing.is_empty() {
                return Ok(Lookup::Miss(missing));
            }
            let generation = e.generation;
            (
                end,
                generation,
                inner.begin_read(ino, offset / BLOCK, (end - 1) / BLOCK),
            )
        };
        // Read into fresh capacity: zeroing the buffer first cost a tenth of the
        // daemon's CPU when a file is read from the cache at disk speed.
        let want = end - offset;
        #[cfg(test)]
        drop(self.read_gate.lock());
        let read = File::open(self.data_path(ino)).and_then(|mut file| {
            file.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::with_capacity(want as usize);
            file.take(want).read_to_end(&mut buf)?;
            Ok(buf)
        });
        let current = {
            // Unregistered whatever happened: a poisoned lock still holds the list.
            let mut inner = self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            inner.end_read(id);
            inner
                .files
                .get(&ino)
                .is_some_and(|e| e.version == version && e.generation == generation)
        };
        if !current {
            // Changed while it was read (a write, a cut, a new version): the bytes may
            // be from either side of the change.
            let start = offset / BLOCK * BLOCK;
            return Ok(Lookup::Miss(vec![(
                start,
                end.div_ceil(BLOCK) * BLOCK - start,
            )]));
        }
        let buf = read?;
        if buf.len() as u64 != want {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.stats
            .hit_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(Lookup::Hit(Bytes::from(buf)))
    }

    /// Store data fetched from the server at `offset` (block-aligned) for `version`, by a
    /// fetch that began when [`DataCache::token`] gave `token`. Only whole blocks (or the
    /// file's last, partial block) are recorded, and nothing if this client wrote to the
    /// file since the token was taken.
    pub fn store(
        &self,
        ino: u64,
        version: u64,
        token: u64,
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        self.store_inner(ino, version, token, offset, data, None)
    }

    /// [`DataCache::store`], and keep the stored blocks of `data` in memory to answer
    /// the reads about to ask for them (a sequential reader's fills).
    pub fn store_and_keep(
        &self,
        ino: u64,
        version: u64,
        token: u64,
        offset: u64,
        data: Bytes,
    ) -> io::Result<()> {
        self.store_inner(ino, version, token, offset, &data, Some(&data))
    }

    fn store_inner(
        &self,
        ino: u64,
        version: u64,
        token: u64,
        offset: u64,
        data: &[u8],
        keep: Option<&Bytes>,
    ) -> io::Result<()> {
        if !offset.is_multiple_of(BLOCK) || data.is_empty() {
            return Ok(());
        }
        self.stats
            .miss_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let end = offset + data.len() as u64;
        let (size, keeping, pinned, runs, id, empty) = {
            let mut inner = self.inner.lock().map_err(|_| lock_err())?;
            let size = match inner.files.get(&ino) {
                Some(e) if e.version == version && e.generation == token && !e.dirty => e.size,
                _ => return Ok(()),
            };
            // The whole blocks of the range, in runs without a block another store is
            // writing: one store at a time writes a block (a second one, of another
            // version or the same bytes, could land its bytes after the first recorded
            // its own). A block left out is fetched again when read (a pinned file's
            // refresh looks for what is missing at its end).
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut b = offset / BLOCK;
            while b * BLOCK < end {
                let block_end = ((b + 1) * BLOCK).min(size);
                if block_end <= end && block_end > b * BLOCK && !inner.storing(ino, Some(b)) {
                    match runs.last_mut() {
                        Some(run) if run.1 + 1 == b => run.1 = b,
                        _ => runs.push((b, b)),
                    }
                }
                b += 1;
            }
            if runs.is_empty() {
                return Ok(());
            }
            let id = inner.begin_store(ino, &runs);
            // Kept in memory only whole. (A store racing this one may take the room
            // first: then this piece is not kept after all, and its bytes are read
            // back from the disk.)
            let whole = runs.len() == 1 && runs[0].0 * BLOCK == offset;
            let keeping = keep.is_some() && whole && {
                inner.keep_clock += data.len() as u64;
                inner.room_to_keep(data.len() as u64)
            };
            let empty = inner.files.get(&ino).is_none_or(|e| e.blocks.is_empty());
            (
                size,
                keeping,
                inner.pins.contains_key(&ino),
                runs,
                id,
                empty,
            )
        };
        let run_end = |last: u64| ((last + 1) * BLOCK).min(size);
        let need: u64 = runs
            .iter()
            .flat_map(|&(first, last)| first..=last)
            .map(|b| charge_of(size, b))
            .sum::<u64>()
            + if empty { META_CHARGE } else { 0 };
        let room = match need > self.cap {
            true => Ok(false),
            false => self.evict_to(need),
        };
        if !matches!(room, Ok(true)) {
            if let Ok(mut inner) = self.inner.lock() {
                inner.end_store(id);
            }
            return room.map(|_| ());
        }
        #[cfg(test)]
        drop(self.store_gate.lock());
        let written = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(self.data_path(ino))
            .and_then(|file| {
                for &(first, last) in &runs {
                    let (from, to) = (first * BLOCK, run_end(last));
                    let bytes = &data[(from - offset) as usize..(to - offset) as usize];
                    // A kept piece is read from memory, not from this file.
                    self.own_write(ino, &file, pinned, || match keeping {
                        true => write_dontcache(&file, bytes, from),
                        false => file.write_all_at(bytes, from),
                    })?;
                }
                Ok(file)
            });
        let mut guard = self.inner.lock().map_err(|_| lock_err())?;
        let inner = &mut *guard;
        let blocks = || runs.iter().flat_map(|&(first, last)| first..=last);
        // Whether the blocks just written are recorded. Any that are not must not stay
        // on the disk uncounted (the cap holds there too): they are punched out below.
        let record = match (&written, inner.files.get(&ino)) {
            (Ok(_), Some(e)) if e.version == version && e.generation == token && !e.dirty => {
                // The entry lost its last block while these were written: the
                // metadata's charge, not reserved, must fit too, or they are not
                // recorded (as a store that found no room; fetched again when read).
                let lost_all = !empty && e.blocks.is_empty();
                let on_disk = inner.used + inner.punching;
                let others = inner.reserved.saturating_sub(need);
                !lost_all || on_disk + others + need + META_CHARGE <= self.limit(on_disk)
            }
            _ => false,
        };
        if !record {
            if let Some(e) = inner.files.get_mut(&ino) {
                // A write (or a re-base) may have raced with this fill, and the bytes
                // just written may have landed over newer ones: those blocks are not
                // trusted any more (a refresh of a pinned entry fetches them again).
                // (Its metadata goes before any block it may list is punched.)
                e.unlist(&self.dir, ino);
                let mut freed = 0;
                for b in blocks() {
                    freed += e.remove_block(b, &mut inner.lru);
                }
                inner.used = inner.used.saturating_sub(freed);
                if freed > 0 {
                    // Present blocks are punched: a read of them in flight must see
                    // the entry changed (see `Inner::reads`).
                    inner.generations += 1;
                    e.generation = inner.generations;
                }
            }
            // Punched while this store still holds its blocks (no other store writes
            // them meanwhile) and its room (they count as on the disk until then).
            // Not in a file a process may read directly (pinned, or mapped): its
            // blocks there are left as they are.
            let direct = inner.pins.contains_key(&ino) || inner.exposed.contains_key(&ino);
            if !direct {
                drop(guard);
                let punch = |f: &File| {
                    for &(first, last) in &runs {
                        let from = first * BLOCK;
                        punch_hole(f, from, whole_blocks(run_end(last) - from));
                    }
                };
                match &written {
                    Ok(f) => punch(f),
                    Err(_) => {
                        if let Ok(f) = OpenOptions::new().write(true).open(self.data_path(ino)) {
                            punch(&f);
                        }
                    }
                }
                guard = self.inner.lock().map_err(|_| lock_err())?;
            }
            let inner = &mut *guard;
            inner.end_store(id);
            inner.reserved = inner.reserved.saturating_sub(need);
            self.punched.notify_all();
            let file = written?;
            // The file must not outgrow the current version. (Only the current data
            // file: one unlinked meanwhile may still be mapped.)
            let current = |m: &std::fs::Metadata| {
                std::fs::metadata(self.data_path(ino))
                    .is_ok_and(|p| (p.dev(), p.ino()) == (m.dev(), m.ino()))
            };
            if let Some(size) = inner.files.get(&ino).map(|e| e.size)
                && file.metadata().is_ok_and(|m| m.len() > size && current(&m))
            {
                let _ = self.own_write(ino, &file, pinned, || file.set_len(size));
            }
            return Ok(());
        }
        inner.end_store(id);
        // The room made for these blocks is theirs now.
        inner.reserved = inner.reserved.saturating_sub(need);
        let Some(e) = inner.files.get_mut(&ino) else {
            return Ok(());
        };
        for b in blocks() {
            inner.tick += 1;
            inner.used += e.add_block(b, inner.tick, &mut inner.lru);
            inner.lru.insert(inner.tick, (ino, b));
        }
        e.meta_dirty = true;
        if let Some(data) = keep.filter(|_| keeping) {
            let (first, last) = runs[0];
            let piece = data.slice(0..(run_end(last) - first * BLOCK) as usize);
            inner.keep(ino, first * BLOCK, piece, token);
        }
        Ok(())
    }

    /// Evict least recently used blocks until `extra` more bytes fit under the cap;
    /// returns whether they fit, and if so reserves them: the caller must take
    /// `extra` off `reserved` once its blocks are recorded (or not). Blocks of pinned
    /// entries are never evicted.
    ///
    /// The evicted blocks leave the index (and their entry's metadata file) under the
    /// lock, and are punched out of their data files after it is released: a punch can
    /// take milliseconds (21 ms seen; on a filesystem mounted `-o discard` it waits for
    /// the device), during which every other use of the cache went on waiting. Until
    /// the punch is done its blocks are registered (`Inner::punches`): no store writes
    /// them, and they still count as on the disk, so the cap holds there too (a store
    /// that fits once they are gone waits for them).
    fn evict_to(&self, extra: u64) -> io::Result<bool> {
        let mut inner = self.inner.lock().map_err(|_| lock_err())?;
        loop {
            let on_disk = inner.used + inner.punching;
            let limit = self.limit(on_disk);
            if on_disk + inner.reserved + extra <= limit {
                inner.reserved += extra;
                return Ok(true);
            }
            // Asking for no room (a write patching cached blocks): the punches in flight
            // make what room is needed.
            if extra == 0 && inner.used + inner.reserved <= limit {
                return Ok(true);
            }
            if inner.punching > 0 && inner.used + inner.reserved + extra <= limit {
                inner = self.punched.wait(inner).map_err(|_| lock_err())?;
                continue;
            }
            let (id, punches) = self.evict_some(&mut inner, limit, extra);
            if punches.is_empty() {
                if inner.punching > 0 {
                    inner = self.punched.wait(inner).map_err(|_| lock_err())?;
                    continue;
                }
                // Nothing to punch (what is cached is pinned or being stored, or what
                // was evicted needs no punch: a data file replaced, or gone).
                let fits = inner.used + inner.reserved + extra <= limit;
                if fits {
                    inner.reserved += extra;
                }
                return Ok(fits);
            }
            drop(inner);
            #[cfg(test)]
            let gate = self.punch_gate.lock();
            for p in &punches {
                punch_hole(&p.file, p.off, p.len);
            }
            #[cfg(test)]
            drop(gate);
            // Unregistered whatever happened meanwhile: stores waiting for the punch
            // must be woken, also when a panic elsewhere poisoned the lock.
            let relocked = self.inner.lock();
            let poisoned = relocked.is_err();
            inner = relocked.unwrap_or_else(std::sync::PoisonError::into_inner);
            let bytes: u64 = punches.iter().map(|p| p.counted).sum();
            inner.punching = inner.punching.saturating_sub(bytes);
            inner.punches.retain(|r| r.3 != id);
            self.punched.notify_all();
            if poisoned {
                return Err(lock_err());
            }
        }
    }

    /// Take least recently used blocks out of the index until `extra` more bytes fit
    /// under `limit` less the eviction's slack, and register them (under one id) as
    /// being punched; the punches to make, through the data files as they are now.
    fn evict_some(&self, inner: &mut Inner, limit: u64, extra: u64) -> (u64, Vec<Punch>) {
        // Past the cap, room for the next stores too is made at once (`evict_slack`):
        // fewer, larger punches.
        let target = limit.saturating_sub(evict_slack(limit));
        // (ino, offset, length, charge)
        let mut evicted: Vec<(u64, u64, u64, u64)> = Vec::new();
        let mut from = 0;
        // (Punches in flight are left out: their room comes when they are done.)
        while inner.used + inner.reserved + extra > target {
            let Some((&t, &(ino, b))) = inner.lru.range(from..).next() else {
                break;
            };
            if inner.pins.contains_key(&ino) || inner.storing(ino, Some(b)) || inner.reading(ino, b)
            {
                from = t + 1;
                continue;
            }
            inner.lru.remove(&t);
            if inner.exposed.contains_key(&ino)
                && let Some(e) = inner.files.get_mut(&ino)
            {
                // A map may still read its data file: the file goes whole, unlinked.
                let bytes: u64 = e.blocks.keys().map(|&b| e.block_len(b)).sum();
                e.unlist(&self.dir, ino);
                e.drop_blocks(&mut inner.lru, &mut inner.used);
                // A store writing the old file meanwhile records nothing.
                inner.generations += 1;
                e.generation = inner.generations;
                self.stats.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.reset_data(&inner.pins, &mut inner.exposed, ino, 0);
                continue;
            }
            if let Some(e) = inner.files.get_mut(&ino)
                && e.blocks.contains_key(&b)
            {
                // (Its LRU tick is gone already.)
                let len = e.block_len(b);
                let charge = e.remove_block(b, &mut inner.lru);
                inner.used = inner.used.saturating_sub(charge);
                self.stats.evicted_bytes.fetch_add(len, Ordering::Relaxed);
                // Its metadata file goes before any of its bytes do.
                e.unlist(&self.dir, ino);
                evicted.push((ino, b * BLOCK, len, charge));
            }
        }
        evicted.sort_unstable();
        // Adjacent blocks of a file (a sequential read's oldest) go in one punch.
        evicted.dedup_by(|next, run| {
            let joins = next.0 == run.0 && run.1 + run.2 == next.1;
            if joins {
                run.2 += next.2;
                run.3 += next.3;
            }
            joins
        });
        inner.store_ids += 1;
        let id = inner.store_ids;
        let mut punches: Vec<Punch> = Vec::new();
        let mut i = 0;
        while i < evicted.len() {
            let ino = evicted[i].0;
            let n = evicted[i..].iter().take_while(|r| r.0 == ino).count();
            let runs = &evicted[i..i + n];
            i += n;
            let Ok(file) = OpenOptions::new().write(true).open(self.data_path(ino)) else {
                continue;
            };
            let file = std::sync::Arc::new(file);
            let emptied = inner.files.get(&ino).is_none_or(|e| e.blocks.is_empty());
            // An emptied file (unless a store is writing it: that one's bytes stay) is
            // punched whole, bytes of stores that were not recorded too; cut, it could
            // lose the block a store begun meanwhile writes past its old end.
            let whole = match file.metadata() {
                Ok(m) if emptied && m.len() > 0 && !inner.storing(ino, None) => Some(m.len()),
                _ => None,
            };
            if let Some(len) = whole {
                let counted = runs.iter().map(|r| r.3).sum();
                inner.punches.push((ino, 0, len.div_ceil(BLOCK) - 1, id));
                punches.push(Punch {
                    file,
                    off: 0,
                    len: whole_blocks(len),
                    counted,
                });
                continue;
            }
            for &(_, off, len, charge) in runs {
                if len == 0 {
                    continue;
                }
                let last = (off + len).div_ceil(BLOCK) - 1;
                inner.punches.push((ino, off / BLOCK, last, id));
                punches.push(Punch {
                    file: std::sync::Arc::clone(&file),
                    off,
                    len: whole_blocks(off + len) - off,
                    counted: charge,
                });
            }
        }
        inner.punching += punches.iter().map(|p| p.counted).sum::<u64>();
        (id, punches)
    }

    /// The most file data the cache may hold now, `used` bytes of it on disk: the cap,
    /// or less where the filesystem would otherwise have under `min_free` bytes free.
    fn limit(&self, used: u64) -> u64 {
        if self.min_free == 0 {
            return self.cap;
        }
        let Ok(mut room) = self.room.lock() else {
            return self.cap;
        };
        // The cache's own stores and evictions move `used` and the free bytes alike:
        // their sum holds between samples, taken at most every `ROOM_EVERY`.
        let now = std::time::Instant::now();
        let total = match *room {
            Some((at, total)) if now.duration_since(at) < ROOM_EVERY => total,
            _ => match free_bytes(&self.dir) {
                Some(free) => {
                    *room = Some((now, used + free));
                    used + free
                }
                None => return self.cap,
            },
        };
        let limit = self.cap.min(total.saturating_sub(self.min_free));
        if limit < self.cap && !self.limited.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "data cache limited to {} MiB (of --cache-size {} MiB): its filesystem \
                 is to keep {} MiB free (--cache-min-free)",
                limit >> 20,
                self.cap >> 20,
                self.min_free >> 20
            );
        }
        limit
    }

    /// A passthrough open reads the data file of `ino` directly: until the matching
    /// [`DataCache::unpin`], none of its blocks is evicted, and a new version is written
    /// over the old bytes in place (the file is only cut to the new size), so the reader
    /// sees the new content as it is fetched, never holes.
    pub fn pin(&self, ino: u64) {
        if let Ok(mut inner) = self.inner.lock() {
            *inner.pins.entry(ino).or_default() += 1;
            inner.exposed.entry(ino).or_insert(false);
        }
    }

    /// A process may map the current data file of `ino` writable from now on (a writer
    /// joins passthrough readers, the kernel maps that file itself): its metadata goes,
    /// and is not written again while that file is the entry's (the next mount starts
    /// the entry anew instead of trusting bytes a map may have changed).
    pub fn mappable(&self, ino: u64) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let inner = &mut *inner;
        if let Some(e) = inner.files.get_mut(&ino) {
            e.unlist(&self.dir, ino);
        }
        inner.exposed.insert(ino, true);
    }

    pub fn unpin(&self, ino: u64) {
        if let Ok(mut inner) = self.inner.lock()
            && let Some(n) = inner.pins.get_mut(&ino)
        {
            *n -= 1;
            if *n == 0 {
                inner.pins.remove(&ino);
                if let Ok(mut mapped) = self.mapped.lock() {
                    mapped.remove(&ino);
                }
            }
        }
    }

    pub fn pinned(&self, ino: u64) -> bool {
        self.inner
            .lock()
            .is_ok_and(|inner| inner.pins.contains_key(&ino))
    }

    /// Whether a process stored bytes into the pinned data file of `ino` through a
    /// shared memory map (the kernel maps a passthrough file's data file itself): its
    /// mtime is no longer the stamp this daemon leaves after its own writes.
    pub fn mapped_stores(&self, ino: u64) -> bool {
        self.pinned(ino)
            && (!self.maps_show
                || self.mapped.lock().is_ok_and(|m| m.contains(&ino))
                || std::fs::metadata(self.data_path(ino)).is_ok_and(|m| !stamped(&m)))
    }

    /// This daemon's own `write` to `file`, the data file of `ino`: if it is pinned, a
    /// map's store found there first is remembered (the write changes the mtime too),
    /// and the file is stamped after (see [`DataCache::mapped_stores`]).
    fn own_write<T>(&self, ino: u64, file: &File, pinned: bool, write: impl FnOnce() -> T) -> T {
        if pinned {
            self.note_mapped_stores(ino, file);
        }
        let r = write();
        if pinned {
            stamp_own(file);
        }
        r
    }

    /// Before this daemon writes the pinned data file of `ino`: whether a map stored
    /// into it since the last stamp is remembered (the write changes the mtime too).
    fn note_mapped_stores(&self, ino: u64, file: &File) {
        if file.metadata().is_ok_and(|m| !stamped(&m))
            && let Ok(mut mapped) = self.mapped.lock()
        {
            mapped.insert(ino);
        }
    }

    /// After [`DataCache::mapped_stores`]: the pinned data file of `ino`, stamped again,
    /// with the ranges of it that hold the current version (plus what maps stored), in
    /// order, and whether they are the whole file. Its dirty pages are written back first, which makes the kernel fault (and
    /// change the mtime) at a map's next store into any of them, so stores from here on
    /// show at the next look.
    pub fn take_mapped_stores(&self, ino: u64) -> Option<MappedCopy> {
        let (file, ranges, whole) = {
            let inner = self.inner.lock().ok()?;
            if !inner.pins.contains_key(&ino) {
                return None;
            }
            let e = inner.files.get(&ino)?;
            let file = File::open(self.data_path(ino)).ok()?;
            let mut blocks: Vec<u64> = e.blocks.keys().copied().collect();
            blocks.sort_unstable();
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for b in blocks {
                let (start, len) = (b * BLOCK, e.block_len(b));
                match ranges.last_mut() {
                    Some((s, l)) if *s + *l == start => *l += len,
                    _ => ranges.push((start, len)),
                }
            }
            (file, ranges, e.whole())
        };
        if let Ok(mut mapped) = self.mapped.lock() {
            mapped.remove(&ino);
        }
        stamp_own(&file);
        let _ = file.sync_data();
        Some(MappedCopy {
            file,
            ranges,
            whole,
        })
    }

    /// The data file of `ino` no longer holds valid blocks: emptied; for a pinned entry
    /// only cut to `size` (its bytes are overwritten as the new ones arrive); for an
    /// exposed one, unlinked (a map of it keeps its bytes) and begun anew.
    fn reset_data(
        &self,
        pins: &HashMap<u64, u32>,
        exposed: &mut HashMap<u64, bool>,
        ino: u64,
        size: u64,
    ) {
        if pins.contains_key(&ino) {
            if let Ok(f) = OpenOptions::new().write(true).open(self.data_path(ino))
                && f.metadata().is_ok_and(|m| m.len() > size)
            {
                let _ = self.own_write(ino, &f, true, || f.set_len(size));
            }
        } else if exposed.remove(&ino).is_some() {
            // (Whatever maps it keep it; the entry's next data file is a new one.)
            let _ = std::fs::remove_file(self.data_path(ino));
        } else {
            drop_data(&self.data_path(ino));
        }
    }

    /// Free the disk blocks of `[off, off+len)` in the data file of `ino`.
    fn punch(&self, ino: u64, off: u64, len: u64) {
        if let Ok(f) = OpenOptions::new().write(true).open(self.data_path(ino)) {
            punch_hole(&f, off, len);
        }
    }

    /// This client wrote `data` at `offset`: keep the cached copy in step. Bytes land in
    /// blocks already cached; other blocks are left to be fetched when read (write-around).
    pub fn wrote(&self, ino: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let (keep, pinned) = {
            let mut inner = self.inner.lock().map_err(|_| lock_err())?;
            let e = Self::changing(&self.dir, &mut inner, ino, end);
            // Write-around: new data is not copied into the cache (that would write every
            // byte twice on the client's disk); blocks already cached are patched so they
            // stay exact (in a pinned file, the passthrough readers see them at once).
            let keep = (offset / BLOCK..end.div_ceil(BLOCK))
                .filter(|b| e.blocks.contains_key(b))
                .count();
            (keep, inner.pins.contains_key(&ino))
        };
        if keep == 0 {
            return Ok(());
        }
        self.evict_to(0)?;
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(self.data_path(ino))?;
        // A block evicted meanwhile just gets bytes nobody reads: presence is never
        // restored here, only by a store.
        self.own_write(ino, &file, pinned, || file.write_all_at(data, offset))
    }

    /// This client is changing `[offset, offset+len)` without the bytes passing through
    /// here (the server copies them): the blocks it touches are dropped, the others
    /// kept. The size grows only with [`DataCache::extended`], once the server said how
    /// much it changed.
    pub fn overwritten(&self, ino: u64, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = offset.saturating_add(len);
        let dropped: Vec<(u64, u64)> = {
            let Ok(mut inner) = self.inner.lock() else {
                return;
            };
            let inner = &mut *inner;
            Self::changing(&self.dir, inner, ino, 0);
            if inner.exposed.contains_key(&ino) && !inner.pins.contains_key(&ino) {
                // Not punched under a map that may still read it: begun anew.
                if let Some(e) = inner.files.get_mut(&ino) {
                    e.drop_blocks(&mut inner.lru, &mut inner.used);
                }
                self.reset_data(&inner.pins, &mut inner.exposed, ino, 0);
                return;
            }
            // A pinned file keeps its bytes for the readers until its refresh.
            let punch = !inner.pins.contains_key(&ino);
            let Some(e) = inner.files.get_mut(&ino) else {
                return;
            };
            let mut dropped = Vec::new();
            let mut freed = 0;
            for b in offset / BLOCK..end.div_ceil(BLOCK) {
                if e.blocks.contains_key(&b) {
                    dropped.push((b * BLOCK, e.block_len(b)));
                    freed += e.remove_block(b, &mut inner.lru);
                }
            }
            inner.used = inner.used.saturating_sub(freed);
            if !punch {
                dropped.clear();
            }
            dropped
        };
        for (off, len) in dropped {
            self.punch(ino, off, len);
        }
    }

    /// This client's change made `ino` at least `end` bytes long.
    pub fn extended(&self, ino: u64, end: u64) {
        if let Ok(mut inner) = self.inner.lock() {
            Self::changing(&self.dir, &mut inner, ino, end);
        }
    }

    /// The entry of `ino` about to be changed by this client up to `end`: nothing fetched
    /// before is stored into it any more, nothing fetched is until the commit is adopted,
    /// and a growing file lengthens its (formerly) last block.
    fn changing<'a>(dir: &Path, inner: &'a mut Inner, ino: u64, end: u64) -> &'a mut Entry {
        let generation = inner.next_generation();
        inner.forget_kept(ino);
        let e = inner
            .files
            .entry(ino)
            .or_insert_with(|| Entry::changed_locally(0, generation));
        e.unlist(dir, ino);
        e.generation = generation;
        e.dirty = true;
        if end > e.size {
            // Only the last block's length changes with the size.
            let last = e.size / BLOCK;
            let before = charge_of(e.size, last);
            e.size = end;
            if e.blocks.contains_key(&last) {
                inner.used += charge_of(e.size, last) - before;
            }
        }
        e
    }

    /// This client truncated `ino` to `size` in its staged (uncommitted) copy: nothing
    /// cached stays (for a pinned entry, what lies before the cut does), and nothing
    /// fetched is stored until the commit is adopted.
    pub fn truncated(&self, ino: u64, size: u64) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let inner = &mut *inner;
        let generation = inner.next_generation();
        inner.forget_kept(ino);
        let e = inner
            .files
            .entry(ino)
            .or_insert_with(|| Entry::changed_locally(size, generation));
        e.unlist(&self.dir, ino);
        let pinned = inner.pins.contains_key(&ino);
        let old_size = e.size;
        let counted = e.charged();
        if pinned {
            // Read through passthrough: the blocks before the cut stay exact (the file is
            // cut below, in place), so a map's stores into them can still be sent.
            let keep = size.div_ceil(BLOCK);
            for (b, t) in e.blocks.clone() {
                if b >= keep {
                    e.blocks.remove(&b);
                    inner.lru.remove(&t);
                }
            }
        } else {
            for (_, t) in e.blocks.drain() {
                inner.lru.remove(&t);
            }
        }
        e.size = size;
        e.generation = generation;
        e.dirty = true;
        // (The last block kept may have changed length with the size.)
        inner.used = inner.used.saturating_sub(counted) + e.charged();
        self.reset_data(&inner.pins, &mut inner.exposed, ino, size);
        if pinned && size > old_size {
            // Past the old end the file is zeros: so is the lengthened data file (sparse),
            // which a map of it may reach.
            self.lengthen_pinned(ino, size);
        }
    }

    /// A pinned data file is as long as the file it holds once this client made it
    /// longer: a map of it (the kernel maps it directly) must not fault past its end.
    /// The new bytes read as zeros until they are fetched or written.
    pub fn lengthen_pinned(&self, ino: u64, end: u64) {
        if let Ok(f) = OpenOptions::new().write(true).open(self.data_path(ino))
            && f.metadata().is_ok_and(|m| m.len() < end)
        {
            let _ = self.own_write(ino, &f, true, || f.set_len(end));
        }
    }

    /// Nobody reads `ino` any more: its kept pieces go.
    pub fn forget_kept(&self, ino: u64) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.forget_kept(ino);
        }
    }

    /// Forget everything about `ino` (deleted, or changed in a way we cannot track).
    pub fn invalidate(&self, ino: u64) {
        if let Ok(mut inner) = self.inner.lock() {
            let inner = &mut *inner;
            inner.forget_kept(ino);
            // Whether listed or not: a failed cache write may have left one behind.
            let _ = std::fs::remove_file(self.meta_path(ino));
            if let Some(e) = inner.files.remove(&ino) {
                for (_, t) in e.blocks {
                    inner.lru.remove(&t);
                }
                inner.used = Self::recount(&inner.files);
            }
            self.reset_data(&inner.pins, &mut inner.exposed, ino, u64::MAX);
        }
    }

    /// The mount is ending: metadata written back, everything in the cache dir on
    /// disk, and the session marked as ended cleanly (see [`begin_session`]).
    pub fn close(&self) -> io::Result<()> {
        let persisted = {
            let _one_at_a_time = self
                .persisting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Metadata files are true even where this fails (see `Entry::unlist`): the
            // session still ends cleanly.
            let persisted = self.persist_now();
            // Nothing is written after the sync below (work still running may try).
            self.closed.store(true, Ordering::SeqCst);
            persisted
        };
        // The evictions' punches in flight land before the sync (not later ones: a
        // busy mount may always have one).
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let upto = inner.store_ids;
        while inner.punches.iter().any(|p| p.3 <= upto) {
            inner = self
                .punched
                .wait(inner)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        drop(inner);
        let dir = File::open(&self.dir)?;
        // SAFETY: a valid descriptor.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        std::fs::remove_file(self.dir.join(SESSION_FILE))?;
        dir.sync_all()?;
        persisted
    }

    /// Write back metadata of changed entries (on close and at unmount). An entry with
    /// writes the server has not committed is not written (its blocks may hold them);
    /// a metadata file goes into place only while what it lists is still present at
    /// its version, so it is true whenever this daemon dies.
    pub fn persist(&self) -> io::Result<()> {
        let _one_at_a_time = self.persisting.lock().map_err(|_| lock_err())?;
        if self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.persist_now()
    }

    /// [`DataCache::persist`], with `persisting` held.
    fn persist_now(&self) -> io::Result<()> {
        let changed: Vec<(u64, Meta)> = {
            let mut inner = self.inner.lock().map_err(|_| lock_err())?;
            let inner = &mut *inner;
            let unsettled: HashSet<u64> = inner
                .files
                .keys()
                .copied()
                .filter(|ino| !inner.settled(*ino))
                .collect();
            inner
                .files
                .iter_mut()
                .filter(|(ino, e)| e.meta_dirty && !e.dirty && !unsettled.contains(ino))
                .map(|(ino, e)| {
                    e.meta_dirty = false;
                    let mut blocks: Vec<u64> = e.blocks.keys().copied().collect();
                    blocks.sort_unstable();
                    (
                        *ino,
                        Meta {
                            version: e.version,
                            size: e.size,
                            blocks,
                        },
                    )
                })
                .collect()
        };
        let mut failed = None;
        for (ino, meta) in changed {
            let path = self.meta_path(ino);
            let tmp = path.with_extension("meta.tmp");
            let written = match meta.blocks.is_empty() {
                true => Ok(false),
                false => bincode::serde::encode_to_vec(&meta, bincode::config::standard())
                    .map_err(|e| io::Error::other(e.to_string()))
                    .and_then(|bytes| std::fs::write(&tmp, bytes))
                    .map(|()| true),
            };
            let mut inner = self.inner.lock().map_err(|_| lock_err())?;
            // A store writing now may be one that lost a race and is about to be
            // dropped; a file a process may map writable may hold anything.
            let settled = inner.settled(ino);
            let Some(e) = inner.files.get_mut(&ino) else {
                // Forgotten meanwhile, and its file removed with it.
                let _ = std::fs::remove_file(&tmp);
                continue;
            };
            let still_true = e.version == meta.version
                && e.size == meta.size
                && !e.dirty
                && meta.blocks.iter().all(|b| e.blocks.contains_key(b));
            if !settled {
                let _ = std::fs::remove_file(&tmp);
                e.meta_dirty = true;
                continue;
            }
            match written {
                Ok(true) if still_true => match std::fs::rename(&tmp, &path) {
                    Ok(()) => e.on_disk = true,
                    Err(err) => {
                        e.meta_dirty = true;
                        failed.get_or_insert(err);
                    }
                },
                Ok(true) => {
                    // Changed meanwhile (and marked for the next write-back).
                    let _ = std::fs::remove_file(&tmp);
                }
                Ok(false) if e.on_disk => {
                    let _ = std::fs::remove_file(&path);
                    e.on_disk = false;
                }
                Ok(false) => {}
                Err(err) => {
                    let _ = std::fs::remove_file(&tmp);
                    e.meta_dirty = true;
                    failed.get_or_insert(err);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Set once `RWF_DONTCACHE` was refused (an older kernel, a filesystem without it).
static NO_DONTCACHE: AtomicBool = AtomicBool::new(false);

/// Write `buf` at `off` with `RWF_DONTCACHE` (Linux 6.14+): the page cache lets go of
/// the pages once they are on disk, so a big sequential fill keeps recycling the same
/// few pages instead of taking fresh ones for every byte (the reads it was fetched for
/// take the data from memory, see [`DataCache::store_and_keep`]). Where the kernel or
/// the filesystem does not support it, a plain write.
fn write_dontcache(file: &File, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    if NO_DONTCACHE.load(Ordering::Relaxed) {
        return file.write_all_at(buf, off);
    }
    while !buf.is_empty() {
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: one iovec over a live slice, a valid fd; the kernel only reads it.
        let n = unsafe {
            libc::pwritev2(
                file.as_raw_fd(),
                &iov,
                1,
                off as libc::off_t,
                libc::RWF_DONTCACHE,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => {
                    NO_DONTCACHE.store(true, Ordering::Relaxed);
                    file.write_all_at(buf, off)
                }
                _ => Err(e),
            };
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n as usize..];
        off += n as u64;
    }
    Ok(())
}

/// Set the mtime of a pinned data file to the epoch after this daemon wrote it: a store
/// through a process's shared map of it sets the present time instead (see
/// [`DataCache::mapped_stores`]). Setting times needs only ownership, so a read-only
/// descriptor does.
fn stamp_own(file: &File) {
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
    ];
    // SAFETY: a valid fd and two timespecs, as futimens(2) takes.
    unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) };
}

/// Whether, in `dir`, a store through a shared memory map changes a file's mtime (see
/// [`DataCache::mapped_stores`]), also a second store into the same page once the file
/// was stamped and synced again: tried on an unnamed file.
fn maps_change_mtime(dir: &Path) -> bool {
    let Ok(file) = tempfile::tempfile_in(dir) else {
        return false;
    };
    if file.set_len(4096).is_err() {
        return false;
    }
    // SAFETY: a one-page shared writable map of our own file, unmapped below; only its
    // first byte is written.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return false;
    }
    let mut dated = true;
    for round in 0..2u8 {
        stamp_own(&file);
        let _ = file.sync_data();
        // SAFETY: the first byte of the live one-page map.
        unsafe { map.cast::<u8>().write_volatile(round + 1) };
        dated &= file.metadata().is_ok_and(|m| !stamped(&m));
    }
    // SAFETY: unmapping the map made above.
    unsafe { libc::munmap(map, 4096) };
    dated
}

/// Whether a data file's mtime is still the stamp [`stamp_own`] left.
fn stamped(m: &std::fs::Metadata) -> bool {
    (m.mtime(), m.mtime_nsec()) == (0, 0)
}

/// How long a sample of the cache filesystem's free space is used (see
/// [`DataCache::limit`]).
const ROOM_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Held locked (`flock`) by the mount using a cache dir.
const LOCK_FILE: &str = "lock";

/// Present while a mount uses the cache dir, holding the machine's boot id
/// (`/proc/sys/kernel/random/boot_id`); removed by [`DataCache::close`] once everything
/// is on disk.
const SESSION_FILE: &str = "session";

/// A mount starts using `dir` (locked). When the last one did not end cleanly and the
/// machine restarted since, its files may not have reached the disk in the order they
/// were written (a metadata file listing blocks whose bytes were lost): everything is
/// dropped. A daemon that died without the machine going down left all it wrote in the
/// page cache, where each metadata file was only ever true (see [`Entry::unlist`]).
fn begin_session(dir: &Path) -> io::Result<()> {
    let now = std::fs::read("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let marker = dir.join(SESSION_FILE);
    match std::fs::read(&marker) {
        Ok(last) if !now.is_empty() && last == now => {}
        Ok(_) => {
            tracing::warn!(
                "the data cache in {} was in use when the machine went down: emptied",
                dir.display()
            );
            for ent in std::fs::read_dir(dir)? {
                let ent = ent?;
                let name = ent.file_name();
                let ours = name.to_str().is_some_and(|n| {
                    [".data", ".meta", ".meta.tmp"].iter().any(|ext| {
                        n.strip_suffix(ext)
                            .is_some_and(|i| i.parse::<u64>().is_ok())
                    })
                });
                if ours {
                    std::fs::remove_file(ent.path())?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let tmp = dir.join("session.tmp");
    let f = File::create(&tmp)?;
    std::io::Write::write_all(&mut &f, &now)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &marker)?;
    File::open(dir)?.sync_all()
}

/// Bytes an unprivileged writer can still allocate on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a NUL-terminated path and a zeroed out-struct the call fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Bytes an eviction frees beyond what the store that needs it asks for, for a cache
/// limited to `limit`: a 32nd of it, at most 8 MiB, in whole blocks. A punch costs about
/// as much for 8 MiB as for one block (and may wait for the device to discard): a full
/// cache filled a block at a time spent half its time punching (a 1 GiB read through a
/// 128 MiB cache took twice as long as through one that fit it).
fn evict_slack(limit: u64) -> u64 {
    (limit / 32).min(8 << 20) / BLOCK * BLOCK
}

/// `n` rounded up to whole cache blocks: where an eviction's punch ends. A punch frees
/// only the filesystem blocks it covers whole: one that ends at the end of the file, in
/// the middle of its last filesystem block, leaves that block allocated (a 100-byte
/// file kept its 4 KiB), while one that goes past the end frees it, on filesystems with
/// blocks of up to 128 KiB. (The evicted block's range is registered whole.)
fn whole_blocks(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// Free the disk blocks of `[off, off+len)` of `f`, keeping its size.
fn punch_hole(f: &File, off: u64, len: u64) {
    // SAFETY: valid fd; punching a hole only frees disk blocks of our own file.
    unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        );
    }
}

fn meta_path_in(dir: &Path, ino: u64) -> PathBuf {
    dir.join(format!("{ino}.meta"))
}

fn drop_data(path: &Path) {
    if let Ok(f) = OpenOptions::new().write(true).open(path) {
        let _ = f.set_len(0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Stores running at once (fills of different files, a read's own fetch beside a
    /// prefetch) never take the cache over its cap together: room made by one store
    /// is not handed to another while its bytes are being written.
    #[test]
    fn concurrent_stores_stay_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 4 * BLOCK;
        let c = std::sync::Arc::new(DataCache::open(dir.path(), cap).unwrap());
        let over = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                let (c, over) = (std::sync::Arc::clone(&c), std::sync::Arc::clone(&over));
                std::thread::spawn(move || {
                    let d = data(2 * BLOCK as usize, t as u8);
                    for round in 0..60u64 {
                        let ino = 100 + t;
                        c.validate(ino, 1, 64 * BLOCK);
                        let Some(token) = c.token(ino) else { continue };
                        c.store(ino, 1, token, (round % 30) * 2 * BLOCK, &d)
                            .unwrap();
                        if c.used() > cap {
                            over.store(true, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!over.load(Ordering::SeqCst), "the cache went over its cap");
        assert!(c.used() <= cap);
    }

    #[test]
    fn range_tracked_and_versioned() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        let size = 10 * BLOCK + 100;
        assert!(!c.validate(7, 1, size));
        assert!(matches!(c.read(7, 1, 0, 10).unwrap(), Lookup::Miss(_)));
        let d = data(BLOCK as usize, 1);
        c.store(7, 1, c.token(7).unwrap(), 3 * BLOCK, &d).unwrap();
        assert_eq!(
            c.used(),
            BLOCK + META_CHARGE,
            "the block and the metadata file"
        );
        assert_eq!(
            c.read(7, 1, 3 * BLOCK + 5, 10).unwrap(),
            Lookup::Hit(d[5..15].to_vec().into())
        );
        assert_eq!(
            c.read(7, 1, 3 * BLOCK + 5, BLOCK).unwrap(),
            Lookup::Miss(vec![(4 * BLOCK, BLOCK)])
        );
        // The last, partial block is cacheable.
        let tail = data(100, 2);
        c.store(7, 1, c.token(7).unwrap(), 10 * BLOCK, &tail)
            .unwrap();
        assert_eq!(
            c.read(7, 1, 10 * BLOCK, 4096).unwrap(),
            Lookup::Hit(tail.clone().into())
        );
        // A stale fill for an old version is ignored; a new version drops everything.
        assert!(c.validate(7, 1, size));
        assert!(!c.validate(7, 2, size));
        assert_eq!(c.used(), 0);
        c.store(7, 1, c.token(7).unwrap(), 0, &d).unwrap();
        assert_eq!(c.used(), 0);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(2 * BLOCK as usize, 3);
        // (Dropped without `close`: as a daemon killed.)
        drop(holding(dir.path(), 64 * BLOCK, 9, 5, &d));
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        assert_eq!(c.used(), 2 * BLOCK + META_CHARGE);
        assert!(c.validate(9, 5, 2 * BLOCK));
        assert!(c.complete(9));
        assert_eq!(c.read(9, 5, 0, 2 * BLOCK).unwrap(), Lookup::Hit(d.into()));
    }

    /// A cache in `dir` holding all of `d` as file `ino` at `version`, its metadata
    /// written back.
    fn holding(dir: &Path, cap: u64, ino: u64, version: u64, d: &[u8]) -> DataCache {
        let c = DataCache::open(dir, cap).unwrap();
        c.validate(ino, version, d.len() as u64);
        c.store(ino, version, c.token(ino).unwrap(), 0, d).unwrap();
        c.persist().unwrap();
        c
    }

    /// Every `.data` file in `dir` has its `.meta` (nothing is left outside the cap).
    fn no_orphans(dir: &Path) {
        for ent in std::fs::read_dir(dir).unwrap() {
            let name = ent.unwrap().file_name().into_string().unwrap();
            if let Some(ino) = name.strip_suffix(".data") {
                assert!(
                    dir.join(format!("{ino}.meta")).exists(),
                    "{name} was left without its metadata"
                );
            }
            assert!(!name.ends_with(".tmp"), "{name} was left behind");
        }
    }

    #[test]
    fn a_clean_close_survives_reopen_and_ends_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(2 * BLOCK as usize, 3);
        {
            let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
            assert!(dir.path().join(SESSION_FILE).exists());
            c.validate(9, 5, 2 * BLOCK);
            c.store(9, 5, c.token(9).unwrap(), 0, &d).unwrap();
            c.close().unwrap();
            assert!(!dir.path().join(SESSION_FILE).exists());
            // Work still running after the close writes nothing.
            c.validate(8, 1, BLOCK);
            c.store(8, 1, c.token(8).unwrap(), 0, &data(BLOCK as usize, 8))
                .unwrap();
            c.persist().unwrap();
            assert!(!dir.path().join("8.meta").exists());
        }
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        assert!(c.validate(9, 5, 2 * BLOCK));
        assert_eq!(c.read(9, 5, 0, 2 * BLOCK).unwrap(), Lookup::Hit(d.into()));
    }

    #[test]
    fn blocks_being_stored_are_never_evicted_or_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 2 * BLOCK + META_CHARGE).unwrap();
        c.validate(1, 1, 4 * BLOCK);
        c.store(1, 1, c.token(1).unwrap(), 0, &data(BLOCK as usize, 1))
            .unwrap();
        // A store of file 1's block 2 is writing its bytes (outside the lock).
        let id = c.inner.lock().unwrap().begin_store(1, &[(2, 2)]);
        let two = data(BLOCK as usize, 2);
        OpenOptions::new()
            .write(true)
            .open(dir.path().join("1.data"))
            .unwrap()
            .write_all_at(&two, 2 * BLOCK)
            .unwrap();
        assert!(
            (1..=3).any(|b| c.inner.lock().unwrap().storing(1, Some(b))),
            "a second store of a block being stored"
        );
        // File 2 takes the whole cap: file 1's block 0 goes, and with it the last block
        // file 1 has recorded, but its data file is not emptied under the store.
        c.validate(2, 1, 2 * BLOCK);
        c.store(2, 1, c.token(2).unwrap(), 0, &data(2 * BLOCK as usize, 3))
            .unwrap();
        assert_eq!(c.used(), 2 * BLOCK + META_CHARGE, "file 2 is cached");
        let mut got = vec![0; BLOCK as usize];
        File::open(dir.path().join("1.data"))
            .unwrap()
            .read_exact_at(&mut got, 2 * BLOCK)
            .unwrap();
        assert!(got == two, "the bytes of the store in flight were wiped");
        c.inner.lock().unwrap().end_store(id);
        assert!(!(1..=3).any(|b| c.inner.lock().unwrap().storing(1, Some(b))));
    }

    /// A store of blocks partly being written by another store stores the others (it
    /// used to leave them all out, and a remount fetched them again).
    #[test]
    fn a_store_overlapping_another_stores_the_blocks_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        c.validate(1, 1, 4 * BLOCK);
        let other = c.inner.lock().unwrap().begin_store(1, &[(1, 1)]);
        let d = data(3 * BLOCK as usize, 7);
        c.store(1, 1, c.token(1).unwrap(), 0, &d).unwrap();
        assert_eq!(c.missing(1, 1, 0, 3 * BLOCK), vec![(BLOCK, BLOCK)]);
        assert_eq!(
            c.read(1, 1, 2 * BLOCK, BLOCK).unwrap(),
            Lookup::Hit(d[2 * BLOCK as usize..].to_vec().into())
        );
        c.inner.lock().unwrap().end_store(other);
        c.store(1, 1, c.token(1).unwrap(), 0, &d).unwrap();
        assert_eq!(c.read(1, 1, 0, 3 * BLOCK).unwrap(), Lookup::Hit(d.into()));
        let inner = c.inner.lock().unwrap();
        assert!(inner.stores.is_empty() && inner.reserved == 0);
        assert_eq!(inner.used, 3 * BLOCK + META_CHARGE);
    }

    #[test]
    fn a_data_file_that_may_be_mapped_writable_is_never_listed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = holding(dir.path(), 64 * BLOCK, 5, 1, &data(2 * BLOCK as usize, 5));
            assert!(dir.path().join("5.meta").exists());
            c.mappable(5);
            assert!(!dir.path().join("5.meta").exists());
            c.persist().unwrap();
            assert!(!dir.path().join("5.meta").exists(), "written again");
            // Once its data file is replaced (a new version of a file passed through),
            // the entry is listed again.
            c.pin(5);
            c.unpin(5);
            c.validate(5, 2, BLOCK);
            c.store(5, 2, c.token(5).unwrap(), 0, &data(BLOCK as usize, 6))
                .unwrap();
            c.persist().unwrap();
            assert!(
                dir.path().join("5.meta").exists(),
                "the new data file not listed"
            );
            c.mappable(5);
        }
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        assert!(!c.validate(5, 1, 2 * BLOCK));
        no_orphans(dir.path());
    }

    #[test]
    fn one_mount_at_a_time_uses_a_cache_dir() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        let second = DataCache::open(dir.path(), 64 * BLOCK).map(|_| ());
        assert_eq!(
            second.map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock),
            "a second user of the dir would punch and cut the first one's files"
        );
        drop(c);
        DataCache::open(dir.path(), 64 * BLOCK).unwrap();
    }

    /// A daemon that dies (the cache dropped without `close`) while this client's
    /// writes are not committed: the next one must not take the patched blocks for the
    /// server's bytes at the old version, whether or not metadata was written back
    /// after the write. Once committed (adopted), they are the new version's bytes.
    #[test]
    fn uncommitted_writes_are_never_listed_as_the_servers() {
        let old = data(2 * BLOCK as usize, 1);
        for write_back_after in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            {
                let c = holding(dir.path(), 64 * BLOCK, 1, 7, &old);
                c.wrote(1, 10, b"XYZ").unwrap();
                if write_back_after {
                    c.persist().unwrap();
                }
            }
            let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
            c.validate(1, 7, 2 * BLOCK);
            match c.read(1, 7, 0, 2 * BLOCK).unwrap() {
                Lookup::Miss(_) => {}
                Lookup::Hit(got) => assert_eq!(
                    &got[..],
                    &old[..],
                    "uncommitted bytes served as version 7 (written back after: {write_back_after})"
                ),
            }
            no_orphans(dir.path());
        }
        // Committed: the patched blocks are the new version's.
        let dir = tempfile::tempdir().unwrap();
        let mut new = old.clone();
        new[10..13].copy_from_slice(b"XYZ");
        {
            let c = holding(dir.path(), 64 * BLOCK, 1, 7, &old);
            c.wrote(1, 10, b"XYZ").unwrap();
            c.adopt(1, 8, 2 * BLOCK);
            c.persist().unwrap();
        }
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        assert!(c.validate(1, 8, 2 * BLOCK));
        assert_eq!(c.read(1, 8, 0, 2 * BLOCK).unwrap(), Lookup::Hit(new.into()));
    }

    /// A daemon that dies after evicting (punching) blocks of a file whose metadata was
    /// written back before: the next one never serves the holes as the file's bytes.
    #[test]
    fn evicted_blocks_are_never_listed() {
        let dir = tempfile::tempdir().unwrap();
        let one = data(4 * BLOCK as usize, 1);
        {
            let c = holding(dir.path(), 4 * BLOCK + 2 * META_CHARGE, 1, 7, &one);
            c.validate(2, 3, 2 * BLOCK);
            c.store(2, 3, c.token(2).unwrap(), 0, &data(2 * BLOCK as usize, 2))
                .unwrap();
            assert_eq!(
                c.used(),
                4 * BLOCK + 2 * META_CHARGE,
                "file 2 took two of file 1's blocks"
            );
        }
        let c = DataCache::open(dir.path(), 4 * BLOCK + 2 * META_CHARGE).unwrap();
        c.validate(1, 7, 4 * BLOCK);
        for b in 0..4 {
            if let Lookup::Hit(got) = c.read(1, 7, b * BLOCK, BLOCK).unwrap() {
                let want = &one[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
                assert!(got[..] == *want, "block {b} served with other bytes");
            }
        }
        no_orphans(dir.path());
    }

    #[test]
    fn blocks_past_the_end_of_their_data_file_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(3 * BLOCK as usize, 5);
        {
            let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
            c.validate(4, 2, 3 * BLOCK);
            c.store(4, 2, c.token(4).unwrap(), 0, &d).unwrap();
            c.close().unwrap();
        }
        // Cut behind the metadata's back (as a daemon before the metadata went first
        // could leave it).
        OpenOptions::new()
            .write(true)
            .open(dir.path().join("4.data"))
            .unwrap()
            .set_len(BLOCK + 10)
            .unwrap();
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        assert_eq!(c.used(), BLOCK + META_CHARGE);
        assert!(c.validate(4, 2, 3 * BLOCK));
        assert_eq!(
            c.read(4, 2, 0, BLOCK).unwrap(),
            Lookup::Hit(d[..BLOCK as usize].to_vec().into())
        );
        assert!(matches!(
            c.read(4, 2, BLOCK, BLOCK).unwrap(),
            Lookup::Miss(_)
        ));
    }

    #[test]
    fn a_session_cut_by_a_machine_restart_empties_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        drop(holding(
            dir.path(),
            64 * BLOCK,
            9,
            5,
            &data(2 * BLOCK as usize, 3),
        ));
        // The daemon died; then the machine did (another boot id).
        std::fs::write(dir.path().join(SESSION_FILE), b"another boot\n").unwrap();
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        assert_eq!(c.used(), 0);
        assert!(!c.validate(9, 5, 2 * BLOCK));
        assert!(!dir.path().join("9.data").exists());
        assert!(!dir.path().join("9.meta").exists());
    }

    #[test]
    fn pinned_entries_are_never_evicted_and_change_in_place() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 4 * BLOCK).unwrap();
        c.validate(1, 1, 2 * BLOCK);
        c.store(1, 1, c.token(1).unwrap(), 0, &data(2 * BLOCK as usize, 1))
            .unwrap();
        let reader = c.open_complete(1, 1, 2 * BLOCK, true).unwrap();
        // Another file wants more than the cap leaves: it gets what fits, the pinned
        // blocks stay, and the cap holds.
        c.validate(2, 1, 4 * BLOCK);
        for i in 0..4 {
            c.store(
                2,
                1,
                c.token(2).unwrap(),
                i * BLOCK,
                &data(BLOCK as usize, 2),
            )
            .unwrap();
            assert!(c.used() <= 4 * BLOCK);
        }
        assert!(c.complete(1));
        // A server-side copy into it (this client's `copy_file_range`): its blocks are
        // no longer counted as cached, but the readers' bytes are not punched away.
        c.overwritten(1, 0, BLOCK);
        let mut head = vec![0u8; 16];
        reader.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(
            head,
            data(16, 1),
            "a pinned file punched by a server-side copy"
        );
        c.adopt(1, 1, 2 * BLOCK);
        // A new, shorter version: the same file is cut and rewritten, never replaced.
        assert!(!c.validate(1, 2, BLOCK + 10));
        assert_eq!(c.open_complete(1, 2, BLOCK + 10, false).map(|_| ()), None);
        let new = data(BLOCK as usize + 10, 9);
        c.store(1, 2, c.token(1).unwrap(), 0, &new).unwrap();
        let again = c.open_complete(1, 2, BLOCK + 10, false).unwrap();
        let (a, b) = (reader.metadata().unwrap(), again.metadata().unwrap());
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "same data file");
        let mut got = vec![0u8; new.len()];
        reader.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, new, "the pinned reader sees the new version");
        c.unpin(1);
        assert!(!c.pinned(1));
    }

    /// A data file once handed to the kernel for passthrough may still be mapped by a
    /// process after every open closed: evicting, re-basing or forgetting the entry
    /// then leaves that file's bytes alone (it is unlinked, a new one begun).
    #[test]
    fn a_data_file_passed_through_is_never_cut_or_punched_after() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 4 * BLOCK + META_CHARGE).unwrap();
        let old = data(2 * BLOCK as usize, 1);
        let reread = |f: &File| {
            let mut got = vec![0u8; old.len()];
            f.read_exact_at(&mut got, 0).map(|_| got)
        };
        let fill = |ino: u64, version: u64, blocks: u64, seed: u8| {
            c.validate(ino, version, blocks * BLOCK);
            for i in 0..blocks {
                let t = c.token(ino).unwrap();
                c.store(ino, version, t, i * BLOCK, &data(BLOCK as usize, seed))
                    .unwrap();
            }
        };
        // Evicted to make room for another file.
        c.validate(1, 1, 2 * BLOCK);
        c.store(1, 1, c.token(1).unwrap(), 0, &old).unwrap();
        let mapped = c.open_complete(1, 1, 2 * BLOCK, true).unwrap();
        c.unpin(1);
        fill(2, 1, 4, 2);
        assert!(!c.complete(1), "the unpinned entry was evicted");
        assert_eq!(reread(&mapped).unwrap(), old, "a map of it after eviction");
        assert_eq!(c.used(), 4 * BLOCK + META_CHARGE);
        // A file cached again after that is a new data file, punched as usual.
        c.invalidate(2);
        c.validate(1, 1, 2 * BLOCK);
        c.store(1, 1, c.token(1).unwrap(), 0, &old).unwrap();
        assert!(c.complete(1));
        // Re-based on a new version, then forgotten.
        for change in [
            &(|c: &DataCache| {
                c.validate(1, 2, BLOCK);
            }) as &dyn Fn(&DataCache),
            &|c: &DataCache| c.invalidate(1),
            &|c: &DataCache| c.truncated(1, 10),
        ] {
            c.invalidate(1);
            c.validate(1, 1, 2 * BLOCK);
            c.store(1, 1, c.token(1).unwrap(), 0, &old).unwrap();
            let mapped = c.open_complete(1, 1, 2 * BLOCK, true).unwrap();
            c.unpin(1);
            change(&c);
            assert_eq!(reread(&mapped).unwrap(), old, "a map of it after a change");
        }
    }

    /// The probe behind [`DataCache::mapped_stores`]: ext4 (and the like) date a map's
    /// stores; tmpfs does not, where the machine has one to try.
    #[test]
    fn map_stores_are_dated_where_the_filesystem_does() {
        let dir = tempfile::tempdir().unwrap();
        let fs_type = |p: &Path| {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: an all-zero statfs is valid; the path is NUL-terminated.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type)
        };
        if fs_type(dir.path()) == Some(libc::EXT4_SUPER_MAGIC) {
            assert!(maps_change_mtime(dir.path()), "ext4 dates map stores");
        }
        let shm = Path::new("/dev/shm");
        if fs_type(shm) == Some(libc::TMPFS_MAGIC) {
            eprintln!("tmpfs dates map stores: {}", maps_change_mtime(shm));
        }
    }

    /// A staged truncate of a pinned file keeps the blocks before the cut (their bytes
    /// stay, the readers' file is cut in place), lengthens the file when it grows
    /// (zeros, so a map reaching the new end does not fault), and counts exactly.
    #[test]
    fn a_truncate_of_a_pinned_file_keeps_what_is_before_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 16 * BLOCK).unwrap();
        let old = data(3 * BLOCK as usize + 10, 4);
        c.validate(1, 1, old.len() as u64);
        c.store(1, 1, c.token(1).unwrap(), 0, &old).unwrap();
        let reader = c.open_complete(1, 1, old.len() as u64, true).unwrap();
        assert_eq!(c.used(), 3 * BLOCK + DISK_UNIT + META_CHARGE);
        c.truncated(1, BLOCK + 5);
        assert_eq!(
            c.used(),
            BLOCK + DISK_UNIT + META_CHARGE,
            "blocks 0 and 1 (cut to 5 bytes) stay"
        );
        assert_eq!(reader.metadata().unwrap().len(), BLOCK + 5);
        c.truncated(1, 4 * BLOCK);
        assert_eq!(reader.metadata().unwrap().len(), 4 * BLOCK, "lengthened");
        assert_eq!(
            c.used(),
            2 * BLOCK + META_CHARGE,
            "block 1 is whole again: its tail reads as zeros"
        );
        let mut got = vec![0u8; 2 * BLOCK as usize];
        reader.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got[..BLOCK as usize + 5], &old[..BLOCK as usize + 5]);
        assert!(got[BLOCK as usize + 5..].iter().all(|&b| b == 0));
        c.adopt(1, 2, 4 * BLOCK);
        assert_eq!(c.missing(1, 2, 0, 4 * BLOCK), vec![(2 * BLOCK, 2 * BLOCK)]);
        c.unpin(1);
    }

    #[test]
    fn cap_is_hard_even_for_one_big_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 4 * BLOCK).unwrap();
        c.validate(1, 1, 100 * BLOCK);
        for i in 0..100 {
            c.store(
                1,
                1,
                c.token(1).unwrap(),
                i * BLOCK,
                &data(BLOCK as usize, i as u8),
            )
            .unwrap();
            assert!(c.used() <= 4 * BLOCK);
        }
        // The most recent blocks survive.
        assert!(matches!(
            c.read(1, 1, 99 * BLOCK, 10).unwrap(),
            Lookup::Hit(_)
        ));
        assert!(matches!(c.read(1, 1, 0, 10).unwrap(), Lookup::Miss(_)));
        let on_disk = std::fs::metadata(dir.path().join("1.data")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(
            on_disk.blocks() * 512 <= 5 * BLOCK,
            "holes punched: {}",
            on_disk.blocks() * 512
        );
    }

    /// A full cache does not evict (and punch) a block per store: an eviction frees room
    /// for the next stores too.
    #[test]
    fn a_full_cache_makes_room_for_the_next_stores_too() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 64 * BLOCK + META_CHARGE;
        assert_eq!(evict_slack(cap), 2 * BLOCK);
        let c = DataCache::open(dir.path(), cap).unwrap();
        c.validate(1, 1, 100 * BLOCK);
        let store = |i: u64| {
            c.store(
                1,
                1,
                c.token(1).unwrap(),
                i * BLOCK,
                &data(BLOCK as usize, i as u8),
            )
            .unwrap()
        };
        for i in 0..64 {
            store(i);
        }
        assert_eq!(c.used(), cap);
        // The 65th block evicts the three oldest, so the next two need no eviction.
        store(64);
        assert_eq!(c.used(), 62 * BLOCK + META_CHARGE);
        store(65);
        store(66);
        assert_eq!(c.used(), cap);
        for i in 0..3 {
            assert!(matches!(
                c.read(1, 1, i * BLOCK, 1).unwrap(),
                Lookup::Miss(_)
            ));
        }
        assert!(matches!(
            c.read(1, 1, 3 * BLOCK, 1).unwrap(),
            Lookup::Hit(_)
        ));
        use std::os::unix::fs::MetadataExt;
        let on_disk = std::fs::metadata(dir.path().join("1.data")).unwrap();
        // (Plus the filesystem's index of the file's pieces, which `st_blocks` counts
        // too: ext4 takes a 4 KiB block for it once a file has more than four, as the
        // writeback of a loaded machine may make it; 8 MiB + 4 KiB was seen.)
        assert!(
            on_disk.blocks() * 512 <= 64 * BLOCK + 16 * 1024,
            "evicted blocks still on disk: {} bytes",
            on_disk.blocks() * 512
        );
    }

    /// Run `meanwhile` while an eviction waits to punch the blocks it took out: the one
    /// that storing file 2's first block into the full cache `c` makes.
    fn while_punching(c: &DataCache, meanwhile: impl FnOnce()) {
        std::thread::scope(|scope| {
            // Held in here: a failing `meanwhile` drops it before the join.
            let gate = c.punch_gate.lock().unwrap();
            let evicting = scope.spawn(|| {
                c.validate(2, 1, BLOCK);
                c.store(2, 1, c.token(2).unwrap(), 0, &data(BLOCK as usize, 2))
                    .unwrap();
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while c.inner.lock().unwrap().punching == 0 {
                assert!(std::time::Instant::now() < deadline, "no eviction began");
                std::thread::yield_now();
            }
            meanwhile();
            drop(gate);
            evicting.join().unwrap();
        });
    }

    /// A block being read from the data file is not evicted (and punched) under the
    /// reader, which would get zeros: the eviction takes other blocks, or makes no room.
    #[test]
    fn a_block_being_read_is_not_punched_out_under_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let one = data(2 * BLOCK as usize, 1);
        let c = holding(dir.path(), 2 * BLOCK + 2 * META_CHARGE, 1, 1, &one);
        std::thread::scope(|scope| {
            let gate = c.read_gate.lock().unwrap();
            let reader = scope.spawn(|| c.read(1, 1, 0, BLOCK).unwrap());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while c.inner.lock().unwrap().reads.is_empty() {
                assert!(std::time::Instant::now() < deadline, "no read began");
                std::thread::yield_now();
            }
            // Two blocks of file 2 need all of file 1's room: its block 1 goes, its
            // block 0 (being read) stays, and file 2 does not fit.
            c.validate(2, 1, 2 * BLOCK);
            c.store(2, 1, c.token(2).unwrap(), 0, &data(2 * BLOCK as usize, 2))
                .unwrap();
            drop(gate);
            match reader.join().unwrap() {
                Lookup::Hit(got) => assert!(
                    got[..] == one[..BLOCK as usize],
                    "the block read while an eviction ran has other bytes"
                ),
                other => panic!("block 0 was cached: {other:?}"),
            }
        });
        assert!(matches!(c.read(1, 1, BLOCK, 1).unwrap(), Lookup::Miss(_)));
        assert!(matches!(c.read(1, 1, 0, BLOCK).unwrap(), Lookup::Hit(_)));
    }

    /// A store whose blocks are not recorded (the file changed on the server while
    /// they were fetched and written) takes them off the disk too: the cap holds on the
    /// disk, not only in the count.
    #[test]
    fn blocks_stored_but_not_recorded_leave_the_disk() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        c.validate(1, 1, 8 * BLOCK);
        c.store(1, 1, c.token(1).unwrap(), 0, &data(BLOCK as usize, 1))
            .unwrap();
        let token = c.token(1).unwrap();
        std::thread::scope(|scope| {
            let gate = c.store_gate.lock().unwrap();
            let storing = scope.spawn(|| {
                c.store(1, 1, token, 4 * BLOCK, &data(2 * BLOCK as usize, 2))
                    .unwrap()
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while c.inner.lock().unwrap().stores.is_empty() {
                assert!(std::time::Instant::now() < deadline, "no store began");
                std::thread::yield_now();
            }
            // Version 2, the same size: what version 1 had cached goes.
            assert!(!c.validate(1, 2, 8 * BLOCK));
            drop(gate);
            storing.join().unwrap();
        });
        assert_eq!(c.used(), 0);
        assert!(matches!(
            c.read(1, 2, 4 * BLOCK, 1).unwrap(),
            Lookup::Miss(_)
        ));
        let on_disk = std::fs::metadata(dir.path().join("1.data")).unwrap();
        assert_eq!(
            on_disk.blocks(),
            0,
            "blocks written but not recorded are still on disk ({} bytes)",
            on_disk.blocks() * 512
        );
    }

    /// Evicted blocks are punched after the cache lock is released: a store that
    /// fetched one of them again meanwhile must not record it, or it would be served as
    /// zeros once the punch lands.
    #[test]
    fn a_block_being_punched_out_is_not_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 64 * BLOCK + 2 * META_CHARGE;
        let one = data(60 * BLOCK as usize, 1);
        let c = holding(dir.path(), cap, 1, 1, &one);
        c.validate(3, 1, 4 * BLOCK);
        c.store(3, 1, c.token(3).unwrap(), 0, &data(4 * BLOCK as usize, 3))
            .unwrap();
        assert_eq!(c.used(), cap);
        // File 2's block evicts the three oldest (file 1's first).
        while_punching(&c, || {
            // Room without waiting for the punch, and file 1's block 0 fetched again.
            c.invalidate(3);
            c.store(1, 1, c.token(1).unwrap(), 0, &one[..BLOCK as usize])
                .unwrap();
        });
        assert!(
            matches!(c.read(1, 1, 0, BLOCK).unwrap(), Lookup::Miss(_)),
            "a block stored while it was being punched out is listed"
        );
        // Once punched, it is stored as usual.
        c.store(1, 1, c.token(1).unwrap(), 0, &one[..BLOCK as usize])
            .unwrap();
        let Lookup::Hit(got) = c.read(1, 1, 0, BLOCK).unwrap() else {
            panic!("not stored after the punch");
        };
        assert!(got[..] == one[..BLOCK as usize]);
        assert!(c.used() <= cap);
    }

    /// A passthrough open does not pin a file whose old blocks an eviction is still
    /// punching out: cut and filled again meanwhile, it would get holes under its
    /// readers once it grows back over them.
    #[test]
    fn a_file_being_punched_is_not_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 64 * BLOCK + 2 * META_CHARGE;
        let c = holding(dir.path(), cap, 1, 1, &data(64 * BLOCK as usize, 1));
        // Block 0 used last: blocks 1 to 3 are the oldest.
        assert!(matches!(c.read(1, 1, 0, 1).unwrap(), Lookup::Hit(_)));
        while_punching(&c, || {
            // A new version of one block, cached whole.
            let new = data(BLOCK as usize, 9);
            c.validate(1, 2, BLOCK);
            c.store(1, 2, c.token(1).unwrap(), 0, &new).unwrap();
            assert!(c.complete(1));
            assert!(c.open_complete(1, 2, BLOCK, false).is_some());
            assert!(
                c.open_complete(1, 2, BLOCK, true).is_none(),
                "pinned with a punch still to land"
            );
        });
        assert!(c.open_complete(1, 2, BLOCK, true).is_some());
        assert!(c.pinned(1));
    }

    /// Small files count against the cap as they take the disk: their data in whole
    /// filesystem blocks, and their metadata files. (Counting their bytes alone, a cache
    /// of 2 KB files took four times its cap.)
    #[test]
    fn small_files_count_what_they_take_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 128 * DISK_UNIT;
        let c = DataCache::open(dir.path(), cap).unwrap();
        for ino in 1..=1000 {
            c.validate(ino, 1, 100);
            c.store(ino, 1, c.token(ino).unwrap(), 0, &data(100, ino as u8))
                .unwrap();
            assert!(c.used() <= cap);
        }
        c.persist().unwrap();
        use std::os::unix::fs::MetadataExt;
        let disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
            .sum();
        if disk > cap + 4 * DISK_UNIT {
            let mut kinds: HashMap<String, (u64, u64)> = HashMap::new();
            for e in std::fs::read_dir(dir.path()).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                let kind = name.rsplit('.').next().unwrap().to_string();
                let k = kinds.entry(kind).or_default();
                k.0 += 1;
                k.1 += e.metadata().unwrap().blocks() * 512;
            }
            eprintln!("{kinds:?}");
        }
        assert!(
            disk <= cap + 4 * DISK_UNIT,
            "the cache takes {disk} bytes of disk for a cap of {cap}"
        );
        assert!(matches!(c.read(1000, 1, 0, 100).unwrap(), Lookup::Hit(_)));
    }

    /// A cache of many files (their metadata read by several threads) comes back whole.
    #[test]
    fn many_files_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let used = {
            let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
            for ino in 1..=300 {
                c.validate(ino, 7, 1000);
                c.store(ino, 7, c.token(ino).unwrap(), 0, &data(1000, ino as u8))
                    .unwrap();
            }
            c.close().unwrap();
            c.used()
        };
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        assert_eq!(c.used(), used);
        for ino in 1..=300 {
            assert!(c.validate(ino, 7, 1000), "file {ino} lost");
            assert_eq!(
                c.read(ino, 7, 0, 1000).unwrap(),
                Lookup::Hit(data(1000, ino as u8).into())
            );
        }
    }

    #[test]
    fn own_writes_keep_cache_exact() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        // A cached file overwritten in place (and extended inside its last block) stays
        // exact: the written bytes land in the cached blocks.
        let mut model = data(2 * BLOCK as usize + 100, 4);
        c.validate(3, 1, model.len() as u64);
        c.store(3, 1, c.token(3).unwrap(), 0, &model).unwrap();
        let patch = data(70_000, 7);
        c.wrote(3, 100_000, &patch).unwrap();
        model[100_000..170_000].copy_from_slice(&patch);
        c.wrote(3, model.len() as u64, b"tail").unwrap();
        model.extend_from_slice(b"tail");
        c.adopt(3, 2, model.len() as u64);
        assert_eq!(
            c.read(3, 2, 0, model.len() as u64).unwrap(),
            Lookup::Hit(model.clone().into())
        );
        // New data in blocks that were not cached is not copied in (write-around).
        c.validate(4, 1, 0);
        c.wrote(4, 0, &data(3 * BLOCK as usize, 9)).unwrap();
        c.adopt(4, 2, 3 * BLOCK);
        assert!(matches!(c.read(4, 2, 0, 10).unwrap(), Lookup::Miss(_)));
        assert_eq!(c.used(), 2 * BLOCK + DISK_UNIT + META_CHARGE);
    }

    #[test]
    fn fills_racing_own_writes_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        c.validate(5, 1, 4 * BLOCK);
        // A fill started, then this client wrote into the block it fetches: the fetched
        // bytes predate the write and are dropped.
        let token = c.token(5).unwrap();
        c.wrote(5, 10, b"new").unwrap();
        c.store(5, 1, token, 0, &data(BLOCK as usize, 1)).unwrap();
        assert!(matches!(c.read(5, 1, 0, 10).unwrap(), Lookup::Miss(_)));
        // Until the writes are committed nothing fetched is stored at all.
        assert_eq!(c.token(5), None);
        c.adopt(5, 2, 4 * BLOCK);
        let token = c.token(5).unwrap();
        let fresh = data(BLOCK as usize, 2);
        c.store(5, 2, token, 0, &fresh).unwrap();
        assert_eq!(
            c.read(5, 2, 0, 10).unwrap(),
            Lookup::Hit(fresh[..10].to_vec().into())
        );
        // A patched cached block stays exact and counted once.
        c.wrote(5, 0, b"abc").unwrap();
        c.adopt(5, 3, 4 * BLOCK);
        let mut want = fresh[..10].to_vec();
        want[..3].copy_from_slice(b"abc");
        assert_eq!(c.read(5, 3, 0, 10).unwrap(), Lookup::Hit(want.into()));
        assert_eq!(c.used(), BLOCK + META_CHARGE);
    }

    #[test]
    fn writes_to_an_uncached_file_block_fills_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        c.wrote(6, 0, b"hello").unwrap();
        // An open that re-bases the entry must not let committed-only bytes in.
        c.validate(6, 1, 5);
        assert_eq!(c.token(6), None);
        c.adopt(6, 2, 5);
        assert!(c.token(6).is_some());
    }

    /// The data file of `ino` emptied behind the cache's back: what is read after this
    /// can only have come from memory.
    fn empty_data_file(c: &DataCache, ino: u64) {
        File::options()
            .write(true)
            .open(c.data_path(ino))
            .unwrap()
            .set_len(0)
            .unwrap();
    }

    #[test]
    fn kept_pieces_answer_reads_until_read_through() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        c.validate(2, 1, 8 * BLOCK);
        let d = data(4 * BLOCK as usize, 4);
        c.store_and_keep(2, 1, c.token(2).unwrap(), 0, Bytes::from(d.clone()))
            .unwrap();
        let e = data(4 * BLOCK as usize, 5);
        c.store_and_keep(2, 1, c.token(2).unwrap(), 4 * BLOCK, Bytes::from(e.clone()))
            .unwrap();
        empty_data_file(&c, 2);
        let piece = |from: u64, to: u64| -> Bytes {
            [d.as_slice(), e.as_slice()].concat()[from as usize..to as usize]
                .to_vec()
                .into()
        };
        // Within one piece, then across the two.
        assert_eq!(
            c.read(2, 1, 0, 3 * BLOCK).unwrap(),
            Lookup::Hit(piece(0, 3 * BLOCK))
        );
        assert_eq!(
            c.read(2, 1, 3 * BLOCK, 2 * BLOCK).unwrap(),
            Lookup::Hit(piece(3 * BLOCK, 5 * BLOCK))
        );
        // The first piece was read through and dropped: its bytes now come from the
        // (emptied) data file.
        assert!(c.read(2, 1, 0, BLOCK).is_err());
        assert_eq!(
            c.read(2, 1, 5 * BLOCK, 3 * BLOCK).unwrap(),
            Lookup::Hit(piece(5 * BLOCK, 8 * BLOCK))
        );
        assert!(c.read(2, 1, 7 * BLOCK, 10).is_err());
    }

    /// Every change of an entry (own writes, truncation, a new version, eviction)
    /// stops its kept pieces from being served: reads then see the data file.
    #[test]
    fn kept_pieces_never_outlive_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 8 * BLOCK + META_CHARGE).unwrap();
        let d = data(2 * BLOCK as usize, 6);
        let keep = |ino: u64, version: u64| {
            c.validate(ino, version, 2 * BLOCK);
            let token = c.token(ino).unwrap();
            c.store_and_keep(ino, version, token, 0, Bytes::from(d.clone()))
                .unwrap();
        };

        // This client's write patches the data file; the piece must not hide it.
        keep(1, 1);
        c.wrote(1, 5, b"new").unwrap();
        c.adopt(1, 2, 2 * BLOCK);
        let mut want = d.clone();
        want[5..8].copy_from_slice(b"new");
        assert_eq!(
            c.read(1, 2, 0, 16).unwrap(),
            Lookup::Hit(want[..16].to_vec().into())
        );

        // A new version on the server.
        keep(2, 1);
        assert!(!c.validate(2, 2, 2 * BLOCK));
        assert!(matches!(c.read(2, 2, 0, 16).unwrap(), Lookup::Miss(_)));

        // A staged truncation, then its commit.
        keep(3, 1);
        c.truncated(3, 0);
        c.adopt(3, 2, 0);
        assert_eq!(c.read(3, 2, 0, 16).unwrap(), Lookup::Hit(Bytes::new()));

        // Eviction of a block: the piece does not bring it back.
        keep(4, 1);
        c.validate(5, 1, 8 * BLOCK);
        c.store(5, 1, c.token(5).unwrap(), 0, &data(8 * BLOCK as usize, 7))
            .unwrap();
        assert!(matches!(c.read(4, 1, 0, 16).unwrap(), Lookup::Miss(_)));
        assert!(c.inner.lock().unwrap().kept_bytes <= KEEP_CAP);
    }

    /// Over the cap, a new piece is not kept (the kept ones are what their readers ask
    /// for next), and it is written to the page cache as usual, so its read-back is
    /// from memory too.
    #[test]
    fn kept_pieces_stay_under_their_cap() {
        let dir = tempfile::tempdir().unwrap();
        let piece = 4 * 1024 * 1024;
        let n = 3 * KEEP_CAP / piece;
        let c = DataCache::open(dir.path(), 2 * n * piece).unwrap();
        c.validate(1, 1, n * piece);
        for i in 0..n {
            let token = c.token(1).unwrap();
            c.store_and_keep(
                1,
                1,
                token,
                i * piece,
                Bytes::from(vec![i as u8; piece as usize]),
            )
            .unwrap();
            let inner = c.inner.lock().unwrap();
            assert!(inner.kept_bytes <= KEEP_CAP);
            let held: u64 = inner.files[&1]
                .kept
                .iter()
                .map(|k| k.data.len() as u64)
                .sum();
            assert_eq!(held, inner.kept_bytes);
            assert!(inner.kept_order.len() as u64 <= KEEP_CAP / piece);
        }
        // The oldest are the ones kept: the first from memory, the last from the file.
        let last = n - 1;
        assert_eq!(
            c.read(1, 1, last * piece, 16).unwrap(),
            Lookup::Hit(vec![last as u8; 16].into())
        );
        empty_data_file(&c, 1);
        assert_eq!(
            c.read(1, 1, 0, 16).unwrap(),
            Lookup::Hit(vec![0u8; 16].into())
        );
        assert!(c.read(1, 1, last * piece, 16).is_err());
    }

    /// A read the data file answers (part of it was not kept) still counts against the
    /// pieces it covers: they do not linger once read.
    #[test]
    fn pieces_read_past_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let c = DataCache::open(dir.path(), 64 * BLOCK).unwrap();
        c.validate(1, 1, 8 * BLOCK);
        let d = data(8 * BLOCK as usize, 3);
        let token = c.token(1).unwrap();
        c.store_and_keep(
            1,
            1,
            token,
            0,
            Bytes::copy_from_slice(&d[..4 * BLOCK as usize]),
        )
        .unwrap();
        c.store(1, 1, token, 4 * BLOCK, &d[4 * BLOCK as usize..])
            .unwrap();
        assert_eq!(
            c.read(1, 1, 0, 2 * BLOCK).unwrap(),
            Lookup::Hit(d[..2 * BLOCK as usize].to_vec().into())
        );
        assert_eq!(c.inner.lock().unwrap().kept_bytes, 4 * BLOCK);
        // Half from the kept piece, half only in the file: the file answers.
        assert_eq!(
            c.read(1, 1, 2 * BLOCK, 4 * BLOCK).unwrap(),
            Lookup::Hit(d[2 * BLOCK as usize..6 * BLOCK as usize].to_vec().into())
        );
        let inner = c.inner.lock().unwrap();
        assert!(inner.files[&1].kept.is_empty(), "a piece read past lingers");
        assert_eq!(inner.kept_bytes, 0);
    }

    /// A piece its reader never came back for does not hold its room for ever.
    #[test]
    fn abandoned_pieces_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let piece = 4 << 20;
        let c = DataCache::open(dir.path(), 2 * piece).unwrap();
        c.validate(1, 1, BLOCK);
        c.store_and_keep(
            1,
            1,
            c.token(1).unwrap(),
            0,
            Bytes::from(data(BLOCK as usize, 1)),
        )
        .unwrap();
        // Read through one after the other (each dropped at once), past the age limit.
        let n = KEEP_ABANDONED / piece + 2;
        c.validate(2, 1, n * piece);
        let d = Bytes::from(data(piece as usize, 2));
        for i in 0..n {
            let token = c.token(2).unwrap();
            c.store_and_keep(2, 1, token, i * piece, d.clone()).unwrap();
            assert!(matches!(
                c.read(2, 1, i * piece, piece).unwrap(),
                Lookup::Hit(_)
            ));
        }
        let inner = c.inner.lock().unwrap();
        assert!(
            inner.files[&1].kept.is_empty(),
            "the abandoned piece is still kept"
        );
        assert_eq!(inner.kept_bytes, 0);
    }
}
