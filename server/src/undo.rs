//! Commits that a crash cannot tear. [`crate::staging::Staging::commit`] changes the real
//! file in place (truncation, then the staged ranges): if `ferryd` died half way, the
//! file would be neither the old content nor the new while the client, whose commit
//! got no answer, reports `EIO`. So before it changes anything, the commit saves here
//! the bytes it will overwrite or cut, the old size and mtime, and the file's path and
//! inode number (an undo record), and removes the record once the file is whole again
//! (before the reply). A record found at startup, or after an apply that failed, is
//! rolled back: the file gets its old content, which is what the client was told.
//!
//! Records protect against the server process dying (a kill, a crash, a restart), not
//! against the machine losing power: nothing is flushed to disk, so they live in a
//! runtime directory (`/run/ferryd` for root) by default. A file opened empty or
//! created is written directly and needs none (nothing to protect).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_common::RelPath;

use crate::export::Export;
use crate::staging::{UNDO_MAX, pread_exact, pwrite_all, size_of};
use crate::sys::{self, Errno, errno_of};

const MAGIC: &str = "ferryd-undo 1";
const CHUNK: usize = 1 << 20;

/// The records of one export.
#[derive(Debug)]
pub struct UndoDir {
    dir: PathBuf,
    next: AtomicU64,
    /// Commits saving more than this keep a redo record instead ([`UNDO_MAX`]).
    undo_max: AtomicU64,
    /// Redo records kept so far (tests check that a commit kept one).
    pub(crate) redo_kept: AtomicU64,
    /// Held (`flock`) while this process uses the folder: a second `ferryd` on the
    /// same export must not roll back the first one's commits in progress.
    _lock: File,
}

/// `path` must be a real directory (no symlink) of this user that nobody else can
/// write to: the records in it are applied to exported files.
fn check_owned(path: &Path, private: bool) -> io::Result<()> {
    let m = std::fs::symlink_metadata(path)?;
    let mode = m.mode();
    let others = if private { 0o077 } else { 0o022 };
    if !m.file_type().is_dir() || m.uid() != sys::geteuid() || mode & others != 0 {
        return Err(io::Error::other(format!(
            "{} is not a directory of this user that only it can write",
            path.display()
        )));
    }
    Ok(())
}

/// What an undo record holds besides the saved bytes.
#[derive(Debug, PartialEq)]
struct Header {
    path: Vec<u8>,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    /// Saved byte ranges `[start, end)`, in the order their bytes follow in the data file.
    regions: Vec<(u64, u64)>,
}

/// A record written for a commit in progress ([`UndoDir::save`]).
#[derive(Debug)]
pub struct Undo {
    rec: PathBuf,
    data: PathBuf,
    header: Header,
}

fn io_errno(e: &io::Error) -> Errno {
    errno_of(e)
}

impl UndoDir {
    /// The records of the export with id `export_id` under `base` (made 0700 if
    /// missing).
    /// Fails if the folders belong to someone else or can be written by others, or
    /// if another process holds the export's folder.
    pub fn open(base: &Path, export_id: u64) -> io::Result<UndoDir> {
        let dir = base.join(format!("{export_id:016x}"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        check_owned(base, false)?;
        check_owned(&dir, true)?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join("lock"))?;
        // SAFETY: a valid descriptor; flock only takes an advisory lock on it.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::other(format!(
                "another ferryd serves this export ({} is locked)",
                dir.display()
            )));
        }
        Ok(UndoDir {
            dir,
            next: AtomicU64::new(0),
            undo_max: AtomicU64::new(UNDO_MAX),
            redo_kept: AtomicU64::new(0),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Most bytes a commit saves in an undo record; a larger one keeps a redo record.
    pub fn undo_max(&self) -> u64 {
        self.undo_max.load(Ordering::Relaxed)
    }

    /// Change [`UndoDir::undo_max`] (tests: redo records for small commits).
    pub fn set_undo_max(&self, bytes: u64) {
        self.undo_max.store(bytes, Ordering::Relaxed);
    }

    /// How many redo records commits have kept (a commit that could not keep one
    /// only logs it).
    pub fn redo_records_kept(&self) -> u64 {
        self.redo_kept.load(Ordering::Relaxed)
    }

    /// A new record's path (`PID-N.<ext>`, N counting up) and the temporary path it is
    /// written at before it is renamed whole into place.
    pub(crate) fn record_paths(&self, ext: &str) -> (PathBuf, PathBuf) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let stem = format!("{}-{n}", std::process::id());
        (
            self.dir.join(format!("{stem}.{ext}")),
            self.dir.join(format!("{stem}.{ext}.tmp")),
        )
    }

    /// Save what a commit of `real` (opened as `path`) is about to change: the bytes of
    /// `regions` (within the file's current size), its size and mtime.
    pub fn save(
        &self,
        real: BorrowedFd<'_>,
        path: &RelPath,
        regions: &[(u64, u64)],
    ) -> Result<Undo, Errno> {
        let st = sys::fstat(real)?;
        let (rec_path, tmp_path) = self.record_paths("rec");
        let data_path = rec_path.with_extension("data");
        let data = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&data_path)
            .map_err(|e| io_errno(&e))?;
        let header = Header {
            path: path.0.clone(),
            dev: st.st_dev,
            ino: st.st_ino,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: (st.st_mtime, st.st_mtime_nsec),
            regions: regions.to_vec(),
        };
        // The handle may be write-only (a file its client may not read): the old bytes
        // are read through a read-only descriptor of the same inode.
        let reader = File::open(std::ffi::OsStr::from_bytes(
            sys::proc_fd_path(real).as_bytes(),
        ))
        .map_err(|e| io_errno(&e))?;
        let written = (|| -> Result<(), Errno> {
            let mut buf = vec![0u8; CHUNK];
            let mut at = 0u64;
            for &(start, end) in regions {
                let mut pos = start;
                while pos < end {
                    let len = CHUNK.min((end - pos) as usize);
                    pread_exact(reader.as_fd(), &mut buf[..len], pos)?;
                    pwrite_all(data.as_fd(), &buf[..len], at)?;
                    pos += len as u64;
                    at += len as u64;
                }
            }
            let mut rec = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp_path)
                .map_err(|e| io_errno(&e))?;
            rec.write_all(header.encode().as_bytes())
                .map_err(|e| io_errno(&e))?;
            // The record counts from here on, whole.
            std::fs::rename(&tmp_path, &rec_path).map_err(|e| io_errno(&e))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp_path);
            let _ = std::fs::remove_file(&data_path);
            return Err(e);
        }
        tracing::debug!(record = %rec_path.display(), "undo record saved");
        Ok(Undo {
            rec: rec_path,
            data: data_path,
            header,
        })
    }

    /// Roll back every undo record left by a server that died in a commit, then
    /// finish every redo record's commit (see [`crate::redo`]). Returns how many files
    /// were rolled back or finished; a record whose path no longer leads to its file
    /// is dropped with a warning.
    pub fn recover(&self, export: &Export) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        // Newest first: two commits of one file interrupted together are undone in the
        // reverse of the order they were made (stems are `PID-N`).
        let mut recs = BTreeMap::new();
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".rec") {
                recs.insert((std::cmp::Reverse(stem_order(stem)), stem.to_string()), p);
            } else if name.ends_with(".rec.tmp") {
                // Never whole: the commit had not begun.
                let _ = std::fs::remove_file(&p);
            }
        }
        let mut done = 0;
        for ((_, stem), rec) in recs {
            let data = self.dir.join(format!("{stem}.data"));
            match Undo::load(&rec, &data).and_then(|u| u.roll_back_by_path(export)) {
                Ok(()) => {
                    done += 1;
                    tracing::warn!(record = %rec.display(), "rolled back a commit a crash interrupted");
                }
                Err(e) => tracing::warn!(
                    record = %rec.display(),
                    "cannot roll back an interrupted commit: {e}"
                ),
            }
            let _ = std::fs::remove_file(&rec);
            let _ = std::fs::remove_file(&data);
        }
        // Data files whose record was never written: their commits never began.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".data") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        done + crate::redo::recover(&self.dir, export)
    }

    /// Remove the directory if no record is in it (at a clean shutdown).
    pub fn close(&self) {
        let only_lock = std::fs::read_dir(&self.dir)
            .map(|d| d.flatten().all(|e| e.file_name() == "lock"))
            .unwrap_or(false);
        if only_lock {
            let _ = std::fs::remove_file(self.dir.join("lock"));
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

impl Undo {
    fn load(rec: &Path, data: &Path) -> io::Result<Undo> {
        let mut text = String::new();
        File::open(rec)?.read_to_string(&mut text)?;
        let header = Header::decode(&text)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed undo record"))?;
        Ok(Undo {
            rec: rec.to_path_buf(),
            data: data.to_path_buf(),
            header,
        })
    }

    fn roll_back_by_path(&self, export: &Export) -> io::Result<()> {
        let h = &self.header;
        let real = open_target(export, &h.path, h.dev, h.ino)?;
        self.roll_back(real.as_fd())
            .map_err(io::Error::from_raw_os_error)
    }

    /// Put the saved bytes, size and mtime back into `real`.
    pub fn roll_back(&self, real: BorrowedFd<'_>) -> Result<(), Errno> {
        let data = File::open(&self.data).map_err(|e| io_errno(&e))?;
        let mut buf = vec![0u8; CHUNK];
        let mut at = 0u64;
        for &(start, end) in &self.header.regions {
            let mut pos = start;
            while pos < end {
                let len = CHUNK.min((end - pos) as usize);
                data.read_exact_at(&mut buf[..len], at)
                    .map_err(|e| io_errno(&e))?;
                pwrite_all(real, &buf[..len], pos)?;
                pos += len as u64;
                at += len as u64;
            }
        }
        if size_of(real)? != self.header.size {
            sys::ftruncate(real, self.header.size)?;
        }
        let omit = libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        };
        let mtime = libc::timespec {
            tv_sec: self.header.mtime.0,
            tv_nsec: self.header.mtime.1,
        };
        sys::futimens(real, &[omit, mtime])
    }

    /// The commit is applied (or rolled back): the record goes.
    pub fn done(self) {
        let _ = std::fs::remove_file(&self.rec);
        let _ = std::fs::remove_file(&self.data);
    }
}

/// The order of records by their stem (`PID-N`): N.
pub(crate) fn stem_order(stem: &str) -> u64 {
    stem.rsplit_once('-')
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .unwrap_or(0)
}

/// The file a record was made for, opened for writing: `path` must still lead to a
/// regular file with device `dev` and inode number `ino`. It is looked at before it is
/// opened for writing: a FIFO or a device there now must not be opened (it could
/// block, or act).
pub(crate) fn open_target(export: &Export, path: &[u8], dev: u64, ino: u64) -> io::Result<File> {
    let at = export
        .resolve(&RelPath(path.to_vec()), libc::O_PATH)
        .map_err(io::Error::from_raw_os_error)?;
    let st = sys::fstat(at.as_fd()).map_err(io::Error::from_raw_os_error)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_ino != ino || st.st_dev != dev {
        return Err(io::Error::other("the path leads to another file now"));
    }
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(std::ffi::OsStr::from_bytes(
            sys::proc_fd_path(at.as_fd()).as_bytes(),
        ))
}

impl Header {
    fn encode(&self) -> String {
        let mut s = format!(
            "{MAGIC}\ndev {}\nino {}\nsize {}\nmtime {} {}\npath {}\n",
            self.dev,
            self.ino,
            self.size,
            self.mtime.0,
            self.mtime.1,
            hex(&self.path)
        );
        RecordText::end(&mut s, "region", &self.regions);
        s
    }

    fn decode(text: &str) -> Option<Header> {
        let mut r = RecordText::open(text, MAGIC)?;
        let dev = r.num("dev")?;
        let ino = r.num("ino")?;
        let size = r.num("size")?;
        let mtime = r.time("mtime")?;
        let path = unhex(r.field("path")?.first().copied().unwrap_or(""))?;
        let regions = r.ranges("region")?;
        Some(Header {
            path,
            dev,
            ino,
            size,
            mtime,
            regions,
        })
    }
}

/// The text of a record (undo or redo): a magic line, `name value...` lines in a fixed
/// order, byte ranges (`kind start end`, sorted, disjoint, not empty), then `end`. A
/// record cut short (being written when the server died) has no `end` and is refused.
pub(crate) struct RecordText<'a> {
    lines: std::str::Lines<'a>,
}

impl<'a> RecordText<'a> {
    /// Append the `kind start end` lines of `ranges` and the `end` line to `s`.
    pub(crate) fn end(s: &mut String, kind: &str, ranges: &[(u64, u64)]) {
        for (a, b) in ranges {
            s.push_str(&format!("{kind} {a} {b}\n"));
        }
        s.push_str("end\n");
    }

    pub(crate) fn open(text: &'a str, magic: &str) -> Option<RecordText<'a>> {
        let mut lines = text.lines();
        (lines.next()? == magic).then_some(RecordText { lines })
    }

    /// The words after `name` on the next line.
    pub(crate) fn field(&mut self, name: &str) -> Option<Vec<&'a str>> {
        let mut words = self.lines.next()?.split(' ');
        (words.next()? == name).then(|| words.collect())
    }

    /// The number after `name` on the next line.
    pub(crate) fn num(&mut self, name: &str) -> Option<u64> {
        self.field(name)?.first()?.parse().ok()
    }

    /// Seconds and nanoseconds after `name` on the next line.
    pub(crate) fn time(&mut self, name: &str) -> Option<(i64, i64)> {
        let w = self.field(name)?;
        Some((w.first()?.parse().ok()?, w.get(1)?.parse().ok()?))
    }

    /// The `kind start end` lines up to `end`.
    pub(crate) fn ranges(self, kind: &str) -> Option<Vec<(u64, u64)>> {
        let mut ranges = Vec::new();
        let mut last_end = 0;
        for line in self.lines {
            if line == "end" {
                return Some(ranges);
            }
            let mut w = line.split(' ');
            if w.next()? != kind {
                return None;
            }
            let a: u64 = w.next()?.parse().ok()?;
            let b: u64 = w.next()?.parse().ok()?;
            if a >= b || a < last_end {
                return None;
            }
            last_end = b;
            ranges.push((a, b));
        }
        None
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_damage() {
        let h = Header {
            path: b"dir/a b\xff".to_vec(),
            dev: 2049,
            ino: 42,
            size: 1 << 33,
            mtime: (1_700_000_000, 5),
            regions: vec![(0, 10), (4096, 1 << 20)],
        };
        let text = h.encode();
        assert_eq!(Header::decode(&text), Some(h));
        // Cut short (a record being written): never taken.
        assert_eq!(Header::decode(&text[..text.len() - 4]), None);
        assert_eq!(Header::decode("garbage"), None);
    }

    #[test]
    fn one_process_per_export_and_only_private_folders() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let first = UndoDir::open(base.path(), 1).unwrap();
        let second = UndoDir::open(base.path(), 1).expect_err("a second ferryd on the export");
        assert!(second.to_string().contains("another ferryd"), "{second}");
        drop(first);
        let again = UndoDir::open(base.path(), 1).expect("free once the first is gone");
        again.close();
        assert!(
            !base.path().join(format!("{:016x}", 1)).exists(),
            "closed empty"
        );
        // A folder others can write to (a planted one in /tmp, say) is refused.
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(UndoDir::open(base.path(), 2).is_err());
    }
}
