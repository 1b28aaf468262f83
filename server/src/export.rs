//! The export root and the resolution of network paths beneath it.
//!
//! Every path received from a client goes through [`Export::resolve`],
//! [`Export::resolve_dir`] or [`Export::entry`]: validated with
//! [`ferry_common::path`] (bad paths are EINVAL), then opened with `openat2` relative to
//! the root's `O_PATH` descriptor with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`. A symlink
//! in the middle of a path is followed only while it stays beneath the root; an absolute
//! one or one climbing out with `..` fails, and we report that failure as EACCES (the
//! kernel says EXDEV, which a client would mistake for a cross-device rename). The final
//! component is never followed: it is opened `O_NOFOLLOW`, or handed to a `*at` call on
//! its parent directory with `AT_SYMLINK_NOFOLLOW`.
//!
//! This module must never open anything by an absolute path or relative to the current
//! directory, and never pass a client-supplied multi-component path to a plain `*at`
//! call: only `openat2` walks paths.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use ferry_common::path::{check_name, check_path};
use ferry_common::{Name, RelPath};

use crate::redo::{AREA_NAME, Area, reserved};
use crate::staging::Records;
use crate::sys::{self, Errno};

/// How every network path is resolved: beneath the root, no `/proc` magic links.
const RESOLVE: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;

/// Why the export could not be opened at startup.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot export {}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot export {}: not a directory", .0.display())]
    NotDir(PathBuf),
    #[error("/proc is not mounted: ferryd needs /proc/self/fd")]
    NoProc,
}

/// The exported directory, opened once at startup.
#[derive(Debug)]
pub struct Export {
    /// `O_PATH|O_DIRECTORY` descriptor of the root: every resolution starts here, so a
    /// rename of the exported directory itself does not change what is served.
    root: OwnedFd,
    /// Absolute path at startup, for messages only; never used to open anything.
    path: PathBuf,
    read_only: bool,
    /// `st_dev` of the root: files on it keep their own inode number as `Attr::ino`.
    root_dev: u64,
    /// See [`export_id`].
    id: u64,
    /// Undo records of commits in progress (see [`crate::undo`]); unset when the
    /// server has no state directory.
    undo: std::sync::OnceLock<crate::undo::UndoDir>,
    /// The hidden folder of redo records (see [`crate::redo`]): refused to clients.
    area: Area,
    /// Inode number of the root (on `root_dev`).
    root_ino: u64,
    /// Answers of recent keyed changes (see [`crate::once`]); also names the
    /// `Welcome::instance`.
    answers: crate::once::Answers,
    /// Whether other filesystems are mounted beneath the root (see [`Export::at_home`]).
    submounts: crate::mounts::Submounts,
    /// The root's mount id (see [`Export::foreign`]).
    root_mount: Option<u64>,
}

impl Export {
    pub fn open(dir: &Path, read_only: bool) -> Result<Export, ExportError> {
        let open_err = |source| ExportError::Open {
            path: dir.to_path_buf(),
            source,
        };
        let path = std::fs::canonicalize(dir).map_err(open_err)?;
        let meta = std::fs::metadata(&path).map_err(open_err)?;
        if !meta.is_dir() {
            return Err(ExportError::NotDir(path));
        }
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| open_err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        // The one open by absolute path: the operator's own argument, at startup.
        let root = sys::open_startup(&c, libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .map_err(|e| open_err(std::io::Error::from_raw_os_error(e)))?;
        let st =
            sys::fstat(root.as_fd()).map_err(|e| open_err(std::io::Error::from_raw_os_error(e)))?;
        // chmod and directory listings reach an open descriptor through /proc/self/fd
        // (see `sys::chmod_fd_path`); without /proc they would fail at the first use.
        let probe = sys::proc_fd_path(root.as_fd());
        if std::fs::metadata(std::ffi::OsStr::from_bytes(probe.as_bytes())).is_err() {
            return Err(ExportError::NoProc);
        }
        // Without a host name the id still distinguishes exports on this host.
        let host = sys::hostname().unwrap_or_default();
        let id = export_id(&host, path.as_os_str().as_bytes(), st.st_dev, st.st_ino);
        let area_root = root
            .try_clone()
            .map_err(|e| open_err(std::io::Error::from_raw_os_error(sys::errno_of(&e))))?;
        let submounts = crate::mounts::Submounts::watch(root.as_fd(), &path);
        let root_mount = sys::mount_id(root.as_fd());
        Ok(Export {
            submounts,
            root_mount,
            root,
            path,
            read_only,
            root_dev: st.st_dev,
            id,
            undo: std::sync::OnceLock::new(),
            area: Area::new(area_root),
            root_ino: st.st_ino,
            answers: crate::once::Answers::default(),
        })
    }

    /// Keep undo records of commits in `undo` from now on.
    pub fn set_undo(&self, undo: crate::undo::UndoDir) {
        let _ = self.undo.set(undo);
    }

    pub fn undo(&self) -> Option<&crate::undo::UndoDir> {
        self.undo.get()
    }

    /// Where commits keep their crash records, if the server has a state directory.
    pub fn records(&self) -> Option<Records<'_>> {
        self.undo.get().map(|undo| Records {
            undo,
            area: &self.area,
        })
    }

    pub fn area(&self) -> &Area {
        &self.area
    }

    pub fn answers(&self) -> &crate::once::Answers {
        &self.answers
    }

    /// See `Welcome::instance`.
    pub fn instance(&self) -> u64 {
        self.answers.instance()
    }

    /// Whether a file with device `dev` and inode number `ino` is the hidden folder.
    pub fn is_hidden(&self, dev: u64, ino: u64) -> bool {
        self.area.identity() == Some((dev, ino))
    }

    /// Whether directory `dir` is the export root.
    pub fn is_root(&self, dir: BorrowedFd<'_>) -> bool {
        sys::fstat(dir).is_ok_and(|st| (st.st_dev, st.st_ino) == (self.root_dev, self.root_ino))
    }

    /// `EACCES` if `fd` is the hidden folder.
    fn refuse_hidden(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        if self.area.identity().is_none() {
            return Ok(());
        }
        let st = sys::fstat(fd)?;
        if self.is_hidden(st.st_dev, st.st_ino) {
            return Err(libc::EACCES);
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn root_dev(&self) -> u64 {
        self.root_dev
    }

    /// The `Welcome::export_id` of this export.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Open `path` beneath the root with `flags | O_NOFOLLOW | O_CLOEXEC`: the final
    /// component is never followed (with `O_PATH` a final symlink yields a descriptor of
    /// the symlink itself; with any other access it is ELOOP).
    pub fn resolve(&self, path: &RelPath, flags: i32) -> Result<OwnedFd, Errno> {
        let fd = self.open_beneath(path, flags | libc::O_NOFOLLOW)?;
        // The final component is not followed: only its own name can be the folder.
        if path.0.rsplit(|&b| b == b'/').next() == Some(AREA_NAME) {
            self.refuse_hidden(fd.as_fd())?;
        }
        Ok(fd)
    }

    /// An `O_PATH` descriptor of the directory `path`. The last component of a parent
    /// path is itself in the middle of the full path, so a symlink there is followed as
    /// long as it stays beneath the root.
    pub fn resolve_dir(&self, path: &RelPath) -> Result<OwnedFd, Errno> {
        let fd = self.open_beneath(path, libc::O_PATH | libc::O_DIRECTORY)?;
        // A symlink, final or not, may lead into the hidden folder. (Beneath it, only
        // names nobody knows: see [`crate::redo`].)
        self.refuse_hidden(fd.as_fd())?;
        Ok(fd)
    }

    /// Whether `path` leads to the directory `(dev, ino)` now.
    pub fn leads_to(&self, path: &RelPath, (dev, ino): (u64, u64)) -> bool {
        self.resolve_dir(path)
            .and_then(|d| sys::fstat(d.as_fd()))
            .is_ok_and(|st| (st.st_dev, st.st_ino) == (dev, ino))
    }

    /// Whether a call on `name` in `parent` (on `parent` itself for `None`) stays on the
    /// export's own filesystem: the walk to it crosses no mount point, its own name
    /// included. One `openat2(O_PATH | O_NOFOLLOW)` with `RESOLVE_NO_XDEV`, which
    /// fails with EXDEV before it would enter another filesystem: nothing is asked of
    /// that one (no revalidation, no automount). Checked only while something is
    /// mounted beneath the root (see [`crate::mounts`]). A bad name or path stays home:
    /// the call fails there at once, before touching anything.
    pub fn at_home(&self, parent: &RelPath, name: Option<&Name>) -> bool {
        if !self.submounts.any() {
            return true;
        }
        if name.is_some_and(|n| check_name(&n.0).is_err()) {
            return true;
        }
        let mut path = parent.0.clone();
        if let Some(n) = name {
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&n.0);
        }
        self.walk_at_home(&path)
    }

    /// [`Export::at_home`] for a whole path.
    pub fn path_at_home(&self, path: &RelPath) -> bool {
        !self.submounts.any() || self.walk_at_home(&path.0)
    }

    /// The walk of [`Export::at_home`].
    fn walk_at_home(&self, path: &[u8]) -> bool {
        if path.is_empty() || check_path(path).is_err() {
            return true;
        }
        let Ok(c) = sys::cstring(path) else {
            return true;
        };
        let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // (EXDEV: the walk would have crossed a mount point, or left the root.)
        match sys::openat2(
            self.root.as_fd(),
            &c,
            flags,
            RESOLVE | libc::RESOLVE_NO_XDEV,
        ) {
            Ok(_) => true,
            Err(e) => e != libc::EXDEV,
        }
    }

    /// Whether the open `fd` is on another mount than the root (a filesystem mounted
    /// beneath it): by mount id, or, on kernels without one, by device. Asked only
    /// while something is mounted beneath the root: otherwise nothing is.
    pub fn foreign(&self, fd: BorrowedFd<'_>) -> bool {
        if !self.submounts.any() {
            return false;
        }
        match (self.root_mount, sys::mount_id(fd)) {
            (Some(root), Some(id)) => id != root,
            _ => sys::fstat(fd).is_ok_and(|st| st.st_dev != self.root_dev),
        }
    }

    /// Whether anything is mounted beneath the root (see [`crate::mounts`]).
    pub fn has_submounts(&self) -> bool {
        self.submounts.any()
    }

    /// The parent directory of an entry and its validated name, for the `*at` calls.
    pub fn entry(&self, parent: &RelPath, name: &Name) -> Result<(OwnedFd, CString), Errno> {
        check_name(&name.0).map_err(|e| e.errno())?;
        let dir = self.resolve_dir(parent)?;
        // A name reserved at the root (however the root was reached): not to be
        // looked up, made, renamed or removed.
        if reserved(&name.0) && self.is_root(dir.as_fd()) {
            return Err(libc::EACCES);
        }
        Ok((dir, sys::cstring(&name.0)?))
    }

    /// Like [`Export::entry`] for a whole path; the root is its own entry `"."` in itself,
    /// which lets callers treat it uniformly (no `*at` call on `"."` can leave it).
    pub fn entry_of(&self, path: &RelPath) -> Result<(OwnedFd, CString), Errno> {
        check_path(&path.0).map_err(|e| e.errno())?;
        match path.split_last() {
            Some((parent, name)) => self.entry(&parent, &name),
            None => Ok((self.resolve_dir(path)?, c".".to_owned())),
        }
    }

    fn open_beneath(&self, path: &RelPath, flags: i32) -> Result<OwnedFd, Errno> {
        check_path(&path.0).map_err(|e| e.errno())?;
        // A name reserved at the root, and anything beneath it. (Reached through a
        // symlink, the folder itself is refused by its identity; names beneath it are
        // random and never sent.)
        if reserved(path.0.split(|&b| b == b'/').next().unwrap_or_default()) {
            return Err(libc::EACCES);
        }
        let c = if path.is_root() {
            c".".to_owned()
        } else {
            sys::cstring(&path.0)?
        };
        sys::openat2(self.root.as_fd(), &c, flags | libc::O_CLOEXEC, RESOLVE).map_err(|e| {
            // EXDEV here means "the walk tried to leave the root", not a cross-device
            // operation; the client must not see EXDEV for it (see the module doc).
            if e == libc::EXDEV { libc::EACCES } else { e }
        })
    }
}

/// A stable identity of an export for clients' persistent caches: the same host, export
/// path and root directory (device and inode) give the same id after a restart or on
/// another port; a directory recreated under the same name does not (its inode differs),
/// so a cache of the old one is not reused for it.
///
/// FNV-1a over length-prefixed fields, then the splitmix64 finalizer: deterministic
/// across builds and platforms, which std's `DefaultHasher` does not promise.
pub fn export_id(host: &[u8], canonical_path: &[u8], dev: u64, ino: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for field in [host, canonical_path] {
        eat(&(field.len() as u64).to_le_bytes());
        eat(field);
    }
    eat(&dev.to_le_bytes());
    eat(&ino.to_le_bytes());
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_id_is_stable_and_depends_on_every_field() {
        let id = export_id(b"host", b"/srv/data", 2049, 1234);
        assert_eq!(id, export_id(b"host", b"/srv/data", 2049, 1234));
        assert_ne!(id, export_id(b"host2", b"/srv/data", 2049, 1234));
        assert_ne!(id, export_id(b"host", b"/srv/data2", 2049, 1234));
        assert_ne!(id, export_id(b"host", b"/srv/data", 2050, 1234));
        assert_ne!(id, export_id(b"host", b"/srv/data", 2049, 1235));
        // Length prefixes: moving bytes between host and path changes the id.
        assert_ne!(export_id(b"ab", b"c", 1, 1), export_id(b"a", b"bc", 1, 1));
    }

    #[test]
    fn same_directory_same_id() {
        let dir = tempfile::TempDir::new().unwrap();
        let a = Export::open(dir.path(), false).unwrap();
        let b = Export::open(&dir.path().join("."), true).unwrap();
        assert_eq!(a.id(), b.id());
        let other = tempfile::TempDir::new().unwrap();
        assert_ne!(a.id(), Export::open(other.path(), false).unwrap().id());
    }
}
