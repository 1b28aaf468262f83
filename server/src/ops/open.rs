//! Opening files: open (with inline data for small files, staged for writers that ask),
//! create, and reading small files of a directory whole (`ReadSmall`).
//!
//! Files are opened only through [`crate::export::Export`] (beneath the root, final
//! component not followed) or with `openat` of one validated name on a resolved parent.
//! Must never open a FIFO, socket or device node for I/O (that can block a worker
//! forever or have side effects): the client kernel serves those itself, so `Open` of
//! one is EOPNOTSUPP.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use ferry_common::path::check_name;
use ferry_common::{
    Attr, Caller, MAX_IO, MAX_SMALL_FILES, Name, OpenFlags, RelPath, Response, SmallFile,
};

use super::{Ctx, attr_of, new_owner};
use crate::handles::{Handle, OpenFile};
use crate::staging::Staging;
use crate::sys::{self, Errno};

/// Client open flags the server honors. `O_APPEND` is deliberately absent: the client
/// keeps its own page cache and writes at explicit offsets (the client kernel computes
/// append positions), so the server `pwrite`s exactly where it is told. `O_CREAT` and
/// `O_EXCL` belong to `Create`; everything else (`O_DIRECT`, `O_NOATIME`, ...) is dropped.
const PASSED_FLAGS: i32 = libc::O_ACCMODE | libc::O_TRUNC | libc::O_SYNC | libc::O_DSYNC;

/// Flags every I/O open gets: never follow the final component, never become a
/// controlling terminal, and `O_NONBLOCK` so that a name swapped for a FIFO between our
/// check and the open fails instead of blocking (it has no effect on regular files).
const ALWAYS: i32 = libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;

fn access_mode(flags: OpenFlags) -> Result<(i32, bool), Errno> {
    let acc = flags & libc::O_ACCMODE;
    match acc {
        libc::O_RDONLY => Ok((acc, false)),
        libc::O_WRONLY | libc::O_RDWR => Ok((acc, true)),
        // Linux's "3" mode (ioctl-only access) has no meaning over the wire.
        _ => Err(libc::EINVAL),
    }
}

/// Only regular files and directories are opened for I/O.
fn check_openable(st: &libc::stat) -> Result<(), Errno> {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG | libc::S_IFDIR => Ok(()),
        libc::S_IFLNK => Err(libc::ELOOP), // what O_NOFOLLOW gives
        _ => Err(libc::EOPNOTSUPP),
    }
}

fn opened(
    ctx: &Ctx,
    fd: OwnedFd,
    writable: bool,
    staging: Option<Staging>,
) -> Result<Response, Errno> {
    let own = sys::fstat(fd.as_fd())?;
    check_openable(&own)?;
    // As seen through the handle: a staged truncation shows.
    let st = match &staging {
        Some(s) => s.stat(fd.as_fd())?,
        None => own,
    };
    let attr = attr_of(&st, ctx.export.root_dev());
    let foreign = ctx.export.foreign(fd.as_fd());
    let file = OpenFile::new(fd, writable, foreign, staging);
    let handle = ctx.handles.insert(Handle::File(Arc::new(file)))?;
    Ok(Response::Opened { handle, attr })
}

pub fn open(
    ctx: &Ctx,
    path: &RelPath,
    flags: OpenFlags,
    inline_max: u32,
    staged: bool,
) -> Result<Response, Errno> {
    let (_, writable) = access_mode(flags)?;
    // The file's directory is watched before anything of the file is stat'ed: a client
    // may open by a name it was given before this server ran (a descriptor reopened
    // after a restart), and no lookup watched that directory then.
    if ctx.watch.is_some()
        && let Some((parent, _)) = path.split_last()
        && let Ok(dir) = ctx.export.resolve_dir(&parent)
    {
        ctx.watch_dir(dir.as_fd(), &parent);
    }
    // Look before opening: opening a device or FIFO may have side effects.
    let probe = ctx.export.resolve(path, libc::O_PATH)?;
    let st = sys::fstat(probe.as_fd())?;
    check_openable(&st)?;
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        // Before the open whose fstat the client gets (see `Ctx::watch_dir`).
        ctx.watch_dir(probe.as_fd(), path);
    }
    // O_SYNC/O_DSYNC (O_SYNC includes the O_DSYNC bit) promise every write is durable
    // in the file when it returns, which staging cannot keep: such opens write directly.
    let stage = staged && writable && flags & libc::O_DSYNC == 0;
    let truncating = flags & libc::O_TRUNC != 0;
    // A staged open truncates in its staging file, not the real one.
    let passed = if stage {
        flags & PASSED_FLAGS & !libc::O_TRUNC
    } else {
        flags & PASSED_FLAGS
    };
    let fd = ctx.export.resolve(path, passed | ALWAYS)?;
    // A write-only descriptor cannot be read: such opens never carry data, nor do
    // staged truncating ones (the real file still has the old content).
    let readable = flags & libc::O_ACCMODE != libc::O_WRONLY;
    let inline = match inline_max {
        0 => None,
        _ if !readable || (stage && truncating) => None,
        max => read_inline(ctx, fd.as_fd(), max)?,
    };
    let staging = if stage {
        let staging = staging_for(ctx, path, fd.as_fd())?;
        if truncating {
            truncate_staged(fd.as_fd(), staging)?
        } else {
            staging
        }
    } else {
        None
    };
    match (opened(ctx, fd, writable, staging)?, inline) {
        (Response::Opened { handle, .. }, Some((attr, data))) => {
            Ok(Response::OpenedWithData { handle, attr, data })
        }
        (reply, _) => Ok(reply),
    }
}

/// A staging file for a staged open of `path` (already opened as `fd`, after any
/// `O_TRUNC`), or `None` to write directly: the file is empty (nothing to protect, and
/// the common create-then-write case stays cheap), is not a regular file, or its
/// directory cannot hold a staging file.
fn staging_for(ctx: &Ctx, path: &RelPath, fd: BorrowedFd<'_>) -> Result<Option<Staging>, Errno> {
    let st = sys::fstat(fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size == 0 {
        return Ok(None);
    }
    // The parent as it is now; if it was renamed away meanwhile the staging file may
    // land on another filesystem, which only makes the commit copy instead of share.
    match ctx.export.entry_of(path) {
        Ok((dir, _)) => Staging::create(dir.as_fd(), path),
        Err(_) => Ok(None),
    }
}

/// Apply an open's `O_TRUNC` to `staging`, or, where there is none (the file is empty
/// or cannot be staged), to the real file at once.
fn truncate_staged(fd: BorrowedFd<'_>, staging: Option<Staging>) -> Result<Option<Staging>, Errno> {
    match staging {
        Some(mut s) => {
            s.truncate(fd, 0)?;
            Ok(Some(s))
        }
        None => {
            if sys::fstat(fd)?.st_mode & libc::S_IFMT == libc::S_IFREG {
                sys::ftruncate(fd, 0)?;
            }
            Ok(None)
        }
    }
}

/// `ReadSmall`: whole small regular files of one directory (see the request). Every
/// entry is pinned by its single name beneath the resolved directory with `O_PATH` and
/// checked to be a regular file before that inode is opened for reading (opening a
/// device or FIFO may have effects), then read and checked unchanged as an inline
/// open's data is.
pub fn read_small(
    ctx: &Ctx,
    dir: &RelPath,
    names: &[Name],
    max_size: u32,
) -> Result<Response, Errno> {
    if names.len() > MAX_SMALL_FILES {
        return Err(libc::EINVAL);
    }
    let dirfd = ctx.export.resolve_dir(dir)?;
    let mut files = Vec::new();
    let mut left = MAX_IO as usize;
    for name in names {
        if check_name(&name.0).is_err() {
            return Err(libc::EINVAL);
        }
        let Ok(c) = sys::cstring(&name.0) else {
            return Err(libc::EINVAL);
        };
        // Pinned down with O_PATH (opens nothing), checked, then opened for reading
        // through that very inode: a name swapped for a device meanwhile is never opened.
        let Ok(path_fd) = sys::openat(
            dirfd.as_fd(),
            &c,
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0,
        ) else {
            continue;
        };
        let regular_and_small = sys::fstat(path_fd.as_fd()).is_ok_and(|st| {
            st.st_mode & libc::S_IFMT == libc::S_IFREG
                && u64::try_from(st.st_size).is_ok_and(|n| n <= u64::from(max_size))
                && usize::try_from(st.st_size).is_ok_and(|n| n <= left)
        });
        if !regular_and_small {
            continue;
        }
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        let proc_path = sys::proc_fd_path(path_fd.as_fd());
        let Ok(fd) = sys::openat(dirfd.as_fd(), &proc_path, flags, 0) else {
            continue;
        };
        let cap = u32::try_from(left).unwrap_or(u32::MAX).min(max_size);
        if let Ok(Some((attr, data))) = read_inline(ctx, fd.as_fd(), cap) {
            left -= data.len();
            files.push(SmallFile {
                name: name.clone(),
                attr,
                data,
            });
        }
    }
    Ok(Response::SmallFiles(files))
}

/// The whole content of a regular file of at most `max` bytes, with its attributes
/// taken by `fstat` after the read. `None` (reply a plain `Opened`) for anything else,
/// including a file that changed size while it was read: the client must never get
/// data and attributes that disagree.
fn read_inline(ctx: &Ctx, fd: BorrowedFd<'_>, max: u32) -> Result<Option<(Attr, Vec<u8>)>, Errno> {
    let st = sys::fstat(fd)?;
    let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || size > u64::from(max) {
        return Ok(None);
    }
    // One byte more than the limit (or than the size, if smaller) detects a file that
    // grew meanwhile without reading a large one whole.
    let cap = (max as usize).min(MAX_IO as usize).min(size as usize) + 1;
    let mut data = vec![0u8; cap];
    let mut done = 0usize;
    while done < data.len() {
        match sys::pread(fd, &mut data[done..], done as i64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    data.truncate(done);
    let after = attr_of(&sys::fstat(fd)?, ctx.export.root_dev());
    if data.len() as u64 != after.size {
        return Ok(None);
    }
    Ok(Some((after, data)))
}

/// Create-or-open. Without `O_EXCL` from the client an existing file is opened (and
/// truncated with `O_TRUNC`), as `open(O_CREAT)` does; only a file this call actually
/// created is given the caller's ownership. A new file is never staged (it has no
/// previous content to protect); an existing one opened for writing is, like a staged
/// `Open`, its truncation included, so the client must `Commit` such a handle.
pub fn create(
    ctx: &Ctx,
    caller: Caller,
    parent: &RelPath,
    name: &Name,
    mode: u32,
    umask: u32,
    flags: OpenFlags,
) -> Result<Response, Errno> {
    let (_, writable) = access_mode(flags)?;
    let path = parent.join(&name.0);
    let (dir, name) = ctx.export.entry(parent, name)?;
    let dir = dir.as_fd();
    ctx.watch_dir(dir, parent);
    let base = (flags & PASSED_FLAGS) | ALWAYS;
    let perm = mode & 0o7777 & !umask;
    let excl = flags & libc::O_EXCL != 0;
    // Always try an exclusive create first so we know whether the file is new. The
    // loop covers a concurrent unlink between our EEXIST and the plain open.
    for _ in 0..8 {
        match sys::openat(dir, &name, base | libc::O_CREAT | libc::O_EXCL, perm) {
            Ok(fd) => {
                give_to_caller(ctx, caller, dir, &fd, perm);
                return opened(ctx, fd, writable, None);
            }
            Err(libc::EEXIST) if !excl => {
                let stage = writable && flags & libc::O_DSYNC == 0;
                let passed = if stage { base & !libc::O_TRUNC } else { base };
                let fd = match open_existing(dir, &name, passed) {
                    Err(libc::ENOENT) => continue,
                    r => r?,
                };
                let staging = if stage {
                    let st = sys::fstat(fd.as_fd())?;
                    let staging = if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size > 0 {
                        Staging::create(dir, &path)?
                    } else {
                        None
                    };
                    if flags & libc::O_TRUNC != 0 {
                        truncate_staged(fd.as_fd(), staging)?
                    } else {
                        staging
                    }
                } else {
                    None
                };
                return opened(ctx, fd, writable, staging);
            }
            Err(e) => return Err(e),
        }
    }
    Err(libc::EEXIST)
}

fn open_existing(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> Result<OwnedFd, Errno> {
    let st = sys::fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW)?;
    check_openable(&st)?;
    sys::openat(dir, name, flags, 0)
}

fn give_to_caller(ctx: &Ctx, caller: Caller, dir: BorrowedFd<'_>, fd: &OwnedFd, perm: u32) {
    let Some((uid, gid)) = new_owner(ctx, caller, dir) else {
        return;
    };
    if let Err(e) = sys::fchown(fd.as_fd(), Some(uid), Some(gid)) {
        tracing::debug!(errno = e, "chown of a new file to the caller failed");
        return;
    }
    // chown clears setuid/setgid; a file created with them asked to keep them.
    let restored = if perm & 0o6000 != 0 {
        sys::fchmod(fd.as_fd(), perm)
    } else {
        Ok(())
    };
    if let Err(e) = restored {
        tracing::debug!(errno = e, "restoring setuid/setgid bits failed");
    }
}
