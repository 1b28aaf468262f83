//! Redo records: crash safety for commits too large for an undo record.
//!
//! An undo record ([`crate::undo`]) saves the old bytes a commit overwrites, which costs
//! reading and writing all of them: past [`crate::staging::UNDO_MAX`] that is too slow.
//! A large commit keeps a redo record instead, which costs no byte of data: the staging
//! file already holds every new byte, so the commit links it (an `O_TMPFILE`, otherwise
//! gone with the process) into a hidden folder of the export, `.ferryd` at its root
//! (the same filesystem, so a link is possible), and writes a small record in the state
//! directory: the file's path, device and inode number, the link's name and inode
//! number, and the [`Plan`] (truncation, staged ranges, size, mtime). The apply of a
//! plan is idempotent, so a server killed half way through it finishes it at its next
//! start: the file gets the new content, never a torn one. The client, whose commit got
//! no answer, was told `EIO`, as for any reply lost after the work was done.
//!
//! Order, so that a crash anywhere leaves nothing half done: the record is written
//! (renamed whole into place) before the link is made and removed after the link is
//! gone. At start, a record whose link is missing is dropped: its apply either never
//! began (the link is made first) or had finished (the link goes first).
//!
//! The hidden folder exists only while a large commit is in progress (the last one
//! removes it) and, while it exists, clients cannot reach it: [`crate::export::Export`]
//! refuses its device and inode number whatever path leads there (a symlink beneath the
//! root can), its name at the root cannot be created, renamed or removed, and listings
//! leave it out. A name in it is 128 random bits, never sent to a client.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_common::RelPath;

use crate::export::Export;
use crate::staging::{Plan, apply_plan, size_of};
use crate::sys::{self, Errno, errno_of};
use crate::undo::{RecordText, UndoDir, hex, open_target, unhex};

const MAGIC: &str = "ferryd-redo 1";

/// The hidden folder's name at the export root.
pub const AREA_NAME: &[u8] = b".ferryd";

/// Whether `name`, at the export root, is reserved to `ferryd`: `.ferryd`, and the
/// `.ferryd.<random>` names it is made under. No client may reach, make, rename or
/// remove such a name there, whether the folder exists or not, and listings leave it
/// out.
pub fn reserved(name: &[u8]) -> bool {
    name == AREA_NAME || name.starts_with(b".ferryd.")
}

fn area_name() -> CString {
    CString::new(AREA_NAME).unwrap_or_default()
}

/// The export's hidden folder, made when the first large commit needs it and removed
/// when the last one is done.
#[derive(Debug)]
pub struct Area {
    /// The export root (`O_PATH`).
    root: OwnedFd,
    state: Mutex<AreaState>,
    /// Device and inode number of the folder while it exists (0 otherwise): read
    /// without the lock by every path check.
    dev: AtomicU64,
    ino: AtomicU64,
}

#[derive(Debug, Default)]
struct AreaState {
    users: usize,
    dir: Option<Arc<OwnedFd>>,
}

/// The folder, held for one commit ([`Area::enter`]).
#[derive(Debug)]
pub struct InArea<'a> {
    area: &'a Area,
    dir: Arc<OwnedFd>,
    dev: u64,
    ino: u64,
}

impl Drop for InArea<'_> {
    fn drop(&mut self) {
        self.area.leave();
    }
}

/// Whether `dir` is a folder this process could have made: a real directory of this
/// user that nobody else can enter.
fn looks_ours(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
        && st.st_uid == sys::geteuid()
        && st.st_mode & 0o777 == 0o700
}

/// The names in directory `dir` ("." and ".." aside).
fn names_in(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    use std::os::unix::ffi::OsStrExt;
    let path = sys::proc_fd_path(dir);
    std::fs::read_dir(std::ffi::OsStr::from_bytes(path.as_bytes()))?
        .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
        .collect()
}

impl Area {
    pub fn new(root: OwnedFd) -> Area {
        Area {
            root,
            state: Mutex::new(AreaState::default()),
            dev: AtomicU64::new(0),
            ino: AtomicU64::new(0),
        }
    }

    /// Device and inode number of the folder, while it exists.
    pub fn identity(&self) -> Option<(u64, u64)> {
        match self.ino.load(Ordering::Acquire) {
            0 => None,
            ino => Some((self.dev.load(Ordering::Acquire), ino)),
        }
    }

    /// The folder for one commit, made if no other commit holds it. It is made under
    /// a random name, known by its identity, and only then renamed to `.ferryd`, so no
    /// client path can reach it before it is refused; a `.ferryd` already there (not
    /// removed at start: not only ours) is never used.
    pub fn enter(&self) -> Result<InArea<'_>, Errno> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let dir = match &state.dir {
            Some(dir) => Arc::clone(dir),
            None => {
                let dir = Arc::new(self.make()?);
                state.dir = Some(Arc::clone(&dir));
                dir
            }
        };
        state.users += 1;
        let (dev, ino) = self.identity().ok_or(libc::EIO)?;
        Ok(InArea {
            area: self,
            dir,
            dev,
            ino,
        })
    }

    /// Make the folder (see [`Area::enter`]); its identity is set when this returns.
    fn make(&self) -> Result<OwnedFd, Errno> {
        let tmp = CString::new(format!(".ferryd.{}", hex(&sys::random_128()?)))
            .map_err(|_| libc::EINVAL)?;
        sys::mkdirat(self.root.as_fd(), &tmp, 0o700)?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let made = sys::openat(self.root.as_fd(), &tmp, flags, 0).and_then(|dir| {
            let st = sys::fstat(dir.as_fd())?;
            self.dev.store(st.st_dev, Ordering::Release);
            self.ino.store(st.st_ino, Ordering::Release);
            sys::renameat2(
                self.root.as_fd(),
                &tmp,
                self.root.as_fd(),
                &area_name(),
                libc::RENAME_NOREPLACE,
            )?;
            Ok(dir)
        });
        if made.is_err() {
            self.ino.store(0, Ordering::Release);
            self.dev.store(0, Ordering::Release);
            let _ = sys::unlinkat(self.root.as_fd(), &tmp, libc::AT_REMOVEDIR);
        }
        made
    }

    fn leave(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.users = state.users.saturating_sub(1);
        if state.users > 0 {
            return;
        }
        // Hidden until it is gone: nobody may slip into it in between. If it cannot go
        // (a link in it could not be removed), it stays, hidden, for the next commit.
        match sys::unlinkat(self.root.as_fd(), &area_name(), libc::AT_REMOVEDIR) {
            Ok(()) | Err(libc::ENOENT) => {}
            Err(e) => {
                tracing::warn!(errno = e, "cannot remove the export's .ferryd folder");
                return;
            }
        }
        state.dir = None;
        self.ino.store(0, Ordering::Release);
        self.dev.store(0, Ordering::Release);
    }

    /// At start, after the records are done: remove a `.ferryd` of ours left by a
    /// crash (its links have no record left, so their commits never began or had
    /// finished), and any `.ferryd.<random>` one being made. Anything in it that is
    /// not one of our links keeps it in place.
    fn tidy(&self) {
        if let Ok(names) = names_in(self.root.as_fd()) {
            for n in names {
                if n.starts_with(b".ferryd.")
                    && let Ok(c) = CString::new(n)
                {
                    self.tidy_one(&c);
                }
            }
        }
        self.tidy_one(&area_name());
    }

    fn tidy_one(&self, name: &CString) {
        let name = name.clone();
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let Ok(dir) = sys::openat(self.root.as_fd(), &name, flags, 0) else {
            return;
        };
        if !sys::fstat(dir.as_fd()).is_ok_and(|st| looks_ours(&st)) {
            return;
        }
        for n in names_in(dir.as_fd()).unwrap_or_default() {
            if is_link_name(&n)
                && let Ok(c) = CString::new(n)
                && sys::fstatat(dir.as_fd(), &c, libc::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
            {
                let _ = sys::unlinkat(dir.as_fd(), &c, 0);
            }
        }
        if let Err(e) = sys::unlinkat(self.root.as_fd(), &name, libc::AT_REMOVEDIR) {
            tracing::warn!(
                errno = e,
                "leaving the export's .ferryd folder: not only ours"
            );
        }
    }
}

fn is_link_name(n: &[u8]) -> bool {
    n.len() == 32 && n.iter().all(u8::is_ascii_hexdigit)
}

/// What a redo record holds.
#[derive(Debug, PartialEq)]
struct Header {
    path: Vec<u8>,
    dev: u64,
    ino: u64,
    /// The hidden folder and the link in it.
    area: (u64, u64),
    link: String,
    link_ino: u64,
    plan: Plan,
}

/// A redo record of a commit in progress ([`UndoDir::save_redo`]).
#[derive(Debug)]
pub struct Redo<'a> {
    rec: PathBuf,
    link: CString,
    area: InArea<'a>,
}

impl Redo<'_> {
    /// A new staging file for the handle whose file this record linked: an `O_TMPFILE`
    /// can be given a name only once, so the next large commit of the handle could
    /// keep no record with the old one. Made in the hidden folder (the filesystem of
    /// the real file, as the link showed), still unnamed.
    pub fn fresh_staging(&self) -> Result<OwnedFd, Errno> {
        let flags = libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC;
        sys::openat(self.area.dir.as_fd(), c".", flags, 0o600)
    }

    /// The apply is done (or failed and will not be redone): the link goes, then the
    /// record, then (for the last commit) the folder.
    pub fn done(self) {
        if let Err(e) = sys::unlinkat(self.area.dir.as_fd(), &self.link, 0) {
            tracing::warn!(errno = e, "cannot remove a redo record's link");
        }
        let _ = std::fs::remove_file(&self.rec);
    }
}

impl UndoDir {
    /// Keep a redo record for the commit of `plan` from `staged` (the staging file) to
    /// `real` (opened as `path`).
    pub fn save_redo<'a>(
        &self,
        area: &'a Area,
        real: BorrowedFd<'_>,
        path: &RelPath,
        staged: BorrowedFd<'_>,
        plan: &Plan,
    ) -> Result<Redo<'a>, Errno> {
        let st = sys::fstat(real)?;
        let sst = sys::fstat(staged)?;
        let area = area.enter()?;
        if sst.st_dev != area.dev {
            // A file on another filesystem beneath the root: no link can reach it.
            return Err(libc::EXDEV);
        }
        let link = hex(&sys::random_128()?);
        let header = Header {
            path: path.0.clone(),
            dev: st.st_dev,
            ino: st.st_ino,
            area: (area.dev, area.ino),
            link: link.clone(),
            link_ino: sst.st_ino,
            plan: plan.clone(),
        };
        let (rec, tmp) = self.record_paths("redo");
        let written = (|| -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(header.encode().as_bytes())?;
            // The record counts from here on, whole.
            std::fs::rename(&tmp, &rec)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(errno_of(&e));
        }
        let link = CString::new(link).map_err(|_| libc::EINVAL)?;
        if let Err(e) = sys::link_open_file(staged, area.dir.as_fd(), &link) {
            let _ = std::fs::remove_file(&rec);
            return Err(e);
        }
        tracing::debug!(record = %rec.display(), "redo record saved");
        self.redo_kept.fetch_add(1, Ordering::Relaxed);
        Ok(Redo { rec, link, area })
    }
}

/// Finish every commit with a redo record in `dir` (oldest first), then remove the
/// hidden folder. Returns how many were finished.
pub(crate) fn recover(dir: &Path, export: &Export) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut recs = BTreeMap::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".redo") {
            recs.insert(crate::undo::stem_order(stem), e.path());
        } else if name.ends_with(".redo.tmp") {
            // Never whole: the commit had not begun.
            let _ = std::fs::remove_file(e.path());
        }
    }
    let mut done = 0;
    for rec in recs.into_values() {
        match redo_one(&rec, export) {
            Ok(true) => {
                done += 1;
                tracing::warn!(record = %rec.display(), "finished a commit a crash interrupted");
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(
                record = %rec.display(),
                "cannot finish an interrupted commit: {e}"
            ),
        }
        let _ = std::fs::remove_file(&rec);
    }
    export.area().tidy();
    done
}

/// Apply one record; `Ok(false)` if its link is gone (nothing to do).
fn redo_one(rec: &Path, export: &Export) -> io::Result<bool> {
    let mut text = String::new();
    File::open(rec)?.read_to_string(&mut text)?;
    let h = Header::decode(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed redo record"))?;
    let os = io::Error::from_raw_os_error;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let area = match sys::openat(export.root_fd(), &area_name(), flags, 0) {
        Ok(a) => a,
        Err(libc::ENOENT) => return Ok(false),
        Err(e) => return Err(os(e)),
    };
    let ast = sys::fstat(area.as_fd()).map_err(os)?;
    if (ast.st_dev, ast.st_ino) != h.area {
        return Err(io::Error::other("the .ferryd folder is another one now"));
    }
    let link = CString::new(h.link.as_bytes()).map_err(|_| os(libc::EINVAL))?;
    let data = match sys::openat(
        area.as_fd(),
        &link,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        0,
    ) {
        Ok(d) => d,
        Err(libc::ENOENT) => return Ok(false),
        Err(e) => return Err(os(e)),
    };
    let dst = sys::fstat(data.as_fd()).map_err(os)?;
    let staged_end = h.plan.ranges.last().map_or(0, |&(_, e)| e);
    if dst.st_mode & libc::S_IFMT != libc::S_IFREG
        || dst.st_ino != h.link_ino
        || size_of(data.as_fd()).map_err(os)? < staged_end
    {
        return Err(io::Error::other("the link is not the staged data"));
    }
    let real = open_target(export, &h.path, h.dev, h.ino)?;
    apply_plan(data.as_fd(), real.as_fd(), &h.plan).map_err(os)?;
    let _ = sys::unlinkat(area.as_fd(), &link, 0);
    Ok(true)
}

impl Header {
    fn encode(&self) -> String {
        let p = &self.plan;
        let mut s = format!(
            "{MAGIC}\ndev {}\nino {}\npath {}\narea {} {}\nlink {} {}\ntruncate {}\nsize {}\nmtime {} {}\n",
            self.dev,
            self.ino,
            hex(&self.path),
            self.area.0,
            self.area.1,
            self.link,
            self.link_ino,
            p.truncate_to.map_or("-".to_string(), |t| t.to_string()),
            p.size,
            p.mtime.0,
            p.mtime.1,
        );
        RecordText::end(&mut s, "range", &p.ranges);
        s
    }

    fn decode(text: &str) -> Option<Header> {
        let mut r = RecordText::open(text, MAGIC)?;
        let dev = r.num("dev")?;
        let ino = r.num("ino")?;
        let path = unhex(r.field("path")?.first().copied().unwrap_or(""))?;
        let a = r.field("area")?;
        let area = (a.first()?.parse().ok()?, a.get(1)?.parse().ok()?);
        let l = r.field("link")?;
        let link = l.first()?.to_string();
        if !is_link_name(link.as_bytes()) {
            return None;
        }
        let link_ino = l.get(1)?.parse().ok()?;
        let truncate_to = match *r.field("truncate")?.first()? {
            "-" => None,
            v => Some(v.parse().ok()?),
        };
        let size = r.num("size")?;
        let mtime = r.time("mtime")?;
        let ranges = r.ranges("range")?;
        Some(Header {
            path,
            dev,
            ino,
            area,
            link,
            link_ino,
            plan: Plan {
                truncate_to,
                ranges,
                size,
                mtime,
            },
        })
    }
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
            area: (2049, 7),
            link: "0123456789abcdef0123456789abcdef".to_string(),
            link_ino: 99,
            plan: Plan {
                truncate_to: Some(0),
                ranges: vec![(0, 10), (4096, 1 << 33)],
                size: 1 << 33,
                mtime: (1_700_000_000, 5),
            },
        };
        let text = h.encode();
        assert_eq!(Header::decode(&text), Some(h));
        assert_eq!(Header::decode(&text[..text.len() - 4]), None);
        assert_eq!(Header::decode(&text.replace("0123", "../x")), None);
        assert_eq!(Header::decode("garbage"), None);
    }
}
