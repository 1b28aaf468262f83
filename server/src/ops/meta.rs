//! Namespace and metadata operations: lookup, attributes, links, directories, nodes.
//!
//! Every operation on a name is a `*at` call on the parent directory's descriptor with
//! the final component never followed. Must never operate on a path string directly.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use ferry_common::{Caller, Name, RelPath, Response, SetAttr, StatFs, TimeSet, rename_flags};

use super::{Ctx, attr_of};
use crate::handles::Handle;
use crate::sys::{self, Errno};

const NOFOLLOW: i32 = libc::AT_SYMLINK_NOFOLLOW;

fn attr_at(ctx: &Ctx, dir: BorrowedFd<'_>, name: &CStr) -> Result<Response, Errno> {
    let st = sys::fstatat(dir, name, NOFOLLOW)?;
    let mut attr = attr_of(&st, ctx.export.root_dev());
    attr.xattrs = ctx.xattr_hint_at(dir, name);
    Ok(Response::Attr(attr))
}

/// With `parent_node`: only in that directory (see `Request::LookupIn`).
pub fn lookup(
    ctx: &Ctx,
    parent: &RelPath,
    name: &Name,
    parent_node: Option<u64>,
) -> Result<Response, Errno> {
    let (dir, name) = ctx.export.entry(parent, name)?;
    let dir = dir.as_fd();
    if let Some(node) = parent_node {
        let st = sys::fstat(dir)?;
        if super::node_id(st.st_dev, st.st_ino, ctx.export.root_dev()) != node {
            return Err(libc::ESTALE);
        }
    }
    ctx.watch_dir(dir, parent);
    entry_attr(ctx, dir, parent, &name).map(Response::Attr)
}

/// The attributes of entry `name` of `dir` (whose path is `parent`) about to go out: a
/// directory is watched first if it can be (its own changes are reported only through
/// its own watch), and marked [`ferry_common::Attr::uncovered`] otherwise.
fn entry_attr(
    ctx: &Ctx,
    dir: BorrowedFd<'_>,
    parent: &RelPath,
    name: &CStr,
) -> Result<ferry_common::Attr, Errno> {
    let mut st = sys::fstatat(dir, name, NOFOLLOW)?;
    let mut covered = true;
    if let Some(w) = &ctx.watch {
        (st, covered) = w.ensure_entry(dir, parent, name, st);
    }
    let mut attr = attr_of(&st, ctx.export.root_dev());
    attr.xattrs = ctx.xattr_hint_at(dir, name);
    attr.uncovered = !covered;
    Ok(attr)
}

/// With a handle the open descriptor is stat'ed, so this works after unlink. By path,
/// as a lookup: the parent is watched first (a client may hold a name it was given
/// before this server watched anything, such as across a restart, and ask only its
/// attributes).
pub fn getattr(ctx: &Ctx, path: &RelPath, handle: Option<u64>) -> Result<Response, Errno> {
    if handle.is_none()
        && ctx.watch.is_some()
        && let Some((parent, name)) = path.split_last()
    {
        return lookup(ctx, &parent, &name, None);
    }
    let mut covered = true;
    let (st, hint) = match handle {
        Some(h) => (
            super::handle_stat(&ctx.handles.get(h)?)?,
            ferry_common::XATTRS_UNKNOWN,
        ),
        None => {
            let fd = ctx.export.resolve(path, libc::O_PATH)?;
            let st = sys::fstat(fd.as_fd())?;
            let st = match &ctx.watch {
                Some(w) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                    // Watched if it can be (it is already when a client looks into it);
                    // stat again once watched: a change between the two is reported.
                    covered = w.ensure_eagerly(fd.as_fd(), path);
                    sys::fstat(fd.as_fd())?
                }
                _ => st,
            };
            (st, ctx.xattr_hint_fd(fd.as_fd()))
        }
    };
    let mut attr = attr_of(&st, ctx.export.root_dev());
    attr.uncovered = !covered;
    attr.xattrs = hint;
    Ok(Response::Attr(attr))
}

/// Applied in the order chown, truncate, chmod, times: chown clears setuid/setgid bits, so
/// a mode set in the same request must come after it, and times come last because a
/// truncate would bump mtime again.
pub fn setattr(
    ctx: &Ctx,
    path: &RelPath,
    handle: Option<u64>,
    set: &SetAttr,
) -> Result<Response, Errno> {
    let times = times_of(set)?;
    if let Some(h) = handle {
        let h = ctx.handles.get(h)?;
        let fd = h.fd().as_fd();
        if set.uid.is_some() || set.gid.is_some() {
            sys::fchown(fd, set.uid, set.gid)?;
        }
        if let Some(size) = set.size {
            match &h {
                Handle::File(f) if f.writable => match f.staging() {
                    // Staged like a write: the real file keeps its size until Commit.
                    Some(mut staging) => staging.truncate(f.fd.as_fd(), size)?,
                    None => sys::ftruncate(f.fd.as_fd(), size)?,
                },
                // A read-only handle cannot truncate; the path can (the client kernel has
                // already checked the caller may).
                _ => {
                    let (dir, name) = ctx.export.entry_of(path)?;
                    truncate_at(dir.as_fd(), &name, size)?;
                }
            }
        }
        if let Some(mode) = set.mode {
            sys::fchmod(fd, mode & 0o7777)?;
        }
        if let Some(t) = times {
            sys::futimens(fd, &t)?;
            if let (Handle::File(f), Some(_)) = (&h, set.mtime)
                && let Some(mut staging) = f.staging()
            {
                // Applied to the real file now, and again at Commit, which would
                // otherwise stamp it with the last write's time.
                staging.set_mtime(resolved_mtime(&t[1]));
            }
        }
        return super::handle_attr(ctx, &h).map(Response::Attr);
    }
    let (dir, name) = ctx.export.entry_of(path)?;
    let dir = dir.as_fd();
    if set.uid.is_some() || set.gid.is_some() {
        sys::fchownat(dir, &name, set.uid, set.gid, NOFOLLOW)?;
    }
    if let Some(size) = set.size {
        truncate_at(dir, &name, size)?;
    }
    if let Some(mode) = set.mode {
        chmod_at(dir, &name, mode & 0o7777)?;
    }
    if let Some(t) = times {
        sys::utimensat(dir, &name, &t, NOFOLLOW)?;
    }
    match path.split_last() {
        Some((parent, _)) => entry_attr(ctx, dir, &parent, &name).map(Response::Attr),
        None => getattr(ctx, path, None),
    }
}

/// The concrete time a `futimens` mtime stands for (`UTIME_NOW` is now).
fn resolved_mtime(t: &libc::timespec) -> libc::timespec {
    if t.tv_nsec == libc::UTIME_NOW {
        crate::staging::now()
    } else {
        *t
    }
}

/// `None` when neither time is set; nanoseconds out of range are EINVAL (they would
/// otherwise alias the kernel's `UTIME_NOW`/`UTIME_OMIT` markers).
fn times_of(set: &SetAttr) -> Result<Option<[libc::timespec; 2]>, Errno> {
    if set.atime.is_none() && set.mtime.is_none() {
        return Ok(None);
    }
    let one = |t: Option<TimeSet>| -> Result<libc::timespec, Errno> {
        Ok(match t {
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            Some(TimeSet::Now) => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            Some(TimeSet::At(ts)) if ts.nsec < 1_000_000_000 => libc::timespec {
                tv_sec: ts.sec,
                tv_nsec: ts.nsec.into(),
            },
            Some(TimeSet::At(_)) => return Err(libc::EINVAL),
        })
    };
    Ok(Some([one(set.atime)?, one(set.mtime)?]))
}

/// Truncate `dir/name` without following a final symlink and without opening anything
/// but a regular file (opening a FIFO or device can block or have side effects).
fn truncate_at(dir: BorrowedFd<'_>, name: &CStr, size: u64) -> Result<(), Errno> {
    let st = sys::fstatat(dir, name, NOFOLLOW)?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {}
        libc::S_IFDIR => return Err(libc::EISDIR),
        // truncate(2) would follow it; the client resolves symlinks itself, so a
        // truncate naming one is refused like any open of a symlink for writing.
        libc::S_IFLNK => return Err(libc::ELOOP),
        _ => return Err(libc::EINVAL),
    }
    // O_NONBLOCK: if the name was swapped for a FIFO since the stat, fail instead of
    // blocking a worker thread forever.
    let flags =
        libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    let fd = sys::openat(dir, name, flags, 0)?;
    sys::ftruncate(fd.as_fd(), size)
}

/// chmod of `dir/name`; a symlink is EOPNOTSUPP (Linux has no symlink modes, and
/// following it could reach outside the export).
fn chmod_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> Result<(), Errno> {
    let fd = sys::openat(
        dir,
        name,
        libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0,
    )?;
    let st = sys::fstat(fd.as_fd())?;
    if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(libc::EOPNOTSUPP);
    }
    sys::chmod_fd_path(fd.as_fd(), mode)
}

pub fn readlink(ctx: &Ctx, path: &RelPath) -> Result<Response, Errno> {
    let fd = ctx.export.resolve(path, libc::O_PATH)?;
    let st = sys::fstat(fd.as_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
        return Err(libc::EINVAL); // what readlink(2) says for a non-symlink
    }
    sys::readlink_fd(fd.as_fd()).map(Response::data)
}

/// Give a freshly created entry the caller's ownership (see [`super::new_owner`]). A
/// failure (a filesystem without ownership, say) leaves the entry owned by the server,
/// which is never more permissive than intended.
fn chown_new(ctx: &Ctx, caller: Caller, dir: BorrowedFd<'_>, name: &CStr) {
    let Some((uid, gid)) = super::new_owner(ctx, caller, dir) else {
        return;
    };
    if let Err(e) = sys::fchownat(dir, name, Some(uid), Some(gid), NOFOLLOW) {
        tracing::debug!(errno = e, "chown of a new entry to the caller failed");
    }
}

pub(super) fn new_mode(mode: u32, umask: u32) -> u32 {
    mode & 0o7777 & !umask
}

pub fn mknod(
    ctx: &Ctx,
    caller: Caller,
    parent: &RelPath,
    name: &Name,
    mode: u32,
    umask: u32,
    rdev: u32,
) -> Result<Response, Errno> {
    let (dir, name) = ctx.export.entry(parent, name)?;
    let dir = dir.as_fd();
    ctx.watch_dir(dir, parent);
    // The file type bits pass through; the kernel refuses types mknod cannot make, and
    // devices need the server to be privileged (EPERM otherwise, from the OS).
    let mode = (mode & libc::S_IFMT) | new_mode(mode, umask);
    sys::mknodat(dir, &name, mode, sys::decode_dev(rdev))?;
    chown_new(ctx, caller, dir, &name);
    attr_at(ctx, dir, &name)
}

pub fn mkdir(
    ctx: &Ctx,
    caller: Caller,
    parent: &RelPath,
    name: &Name,
    mode: u32,
    umask: u32,
) -> Result<Response, Errno> {
    let (dir, cname) = ctx.export.entry(parent, name)?;
    let dir = dir.as_fd();
    ctx.watch_dir(dir, parent);
    sys::mkdirat(dir, &cname, new_mode(mode, umask))?;
    chown_new(ctx, caller, dir, &cname);
    // Watched from birth: the client knows it is empty and may answer lookups in it
    // itself until an event says otherwise (before the stat the client gets).
    if ctx.watch.is_some()
        && let Ok(new) = sys::openat(
            dir,
            &cname,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0,
        )
    {
        ctx.watch_dir(new.as_fd(), &parent.join(&name.0));
    }
    attr_at(ctx, dir, &cname)
}

pub fn unlink(ctx: &Ctx, parent: &RelPath, name: &Name, rmdir: bool) -> Result<Response, Errno> {
    let (dir, name) = ctx.export.entry(parent, name)?;
    ctx.watch_dir(dir.as_fd(), parent);
    let flags = if rmdir { libc::AT_REMOVEDIR } else { 0 };
    let held = (!rmdir).then(|| hold(dir.as_fd(), &name)).flatten();
    sys::unlinkat(dir.as_fd(), &name, flags)?;
    if let Some(held) = held {
        crate::reap::later(held);
    }
    Ok(Response::Ok)
}

/// The file `dir/name` about to lose a name, held so that, if that was its last, it is
/// freed on the reaper thread rather than in the call that removes the name (see
/// `crate::reap`). `None` if there is none (or no descriptor to spare), and for a
/// directory: an empty one frees nothing worth it, and its watch would go later.
fn hold(dir: BorrowedFd<'_>, name: &CStr) -> Option<OwnedFd> {
    let held = sys::openat(
        dir,
        name,
        libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0,
    )
    .ok()?;
    let st = sys::fstat(held.as_fd()).ok()?;
    (st.st_mode & libc::S_IFMT != libc::S_IFDIR).then_some(held)
}

/// The target is stored as given: it is only ever interpreted by the client (the
/// server never follows a final symlink, and mid-path ones only beneath the root).
pub fn symlink(
    ctx: &Ctx,
    caller: Caller,
    parent: &RelPath,
    name: &Name,
    target: &[u8],
) -> Result<Response, Errno> {
    let (dir, name) = ctx.export.entry(parent, name)?;
    let dir = dir.as_fd();
    ctx.watch_dir(dir, parent);
    let target = sys::cstring(target)?;
    sys::symlinkat(&target, dir, &name)?;
    chown_new(ctx, caller, dir, &name);
    attr_at(ctx, dir, &name)
}

pub fn rename(
    ctx: &Ctx,
    parent: &RelPath,
    name: &Name,
    new_parent: &RelPath,
    new_name: &Name,
    flags: u32,
) -> Result<Response, Errno> {
    // Only the flags the protocol defines; RENAME_WHITEOUT and future ones are refused
    // rather than passed to the kernel unexamined.
    if flags & !(rename_flags::NOREPLACE | rename_flags::EXCHANGE) != 0 {
        return Err(libc::EINVAL);
    }
    let (old_dir, old) = ctx.export.entry(parent, name)?;
    let (new_dir, new) = ctx.export.entry(new_parent, new_name)?;
    ctx.watch_dir(old_dir.as_fd(), parent);
    ctx.watch_dir(new_dir.as_fd(), new_parent);
    // A file the rename replaces (an editor's atomic save) is freed off this path too.
    let replaced = match flags & (rename_flags::NOREPLACE | rename_flags::EXCHANGE) {
        0 => hold(new_dir.as_fd(), &new),
        _ => None,
    };
    sys::renameat2(old_dir.as_fd(), &old, new_dir.as_fd(), &new, flags)?;
    if let Some(replaced) = replaced {
        crate::reap::later(replaced);
    }
    Ok(Response::Ok)
}

/// Whether rename `req` (which succeeded) moved a directory, or for an exchange either
/// of two, judged by what the names hold now. Other clients' kernels hold a directory
/// by one name only: until they drop the old one, a lookup of the new one fails there
/// (see `conn.rs`, which waits for them).
pub fn moved_a_dir(ctx: &Ctx, req: &ferry_common::Request) -> bool {
    let ferry_common::Request::Rename {
        parent,
        name,
        new_parent,
        new_name,
        flags,
    } = req
    else {
        return false;
    };
    let is_dir = |parent: &RelPath, name: &Name| {
        ctx.export.entry(parent, name).is_ok_and(|(dir, name)| {
            sys::fstatat(dir.as_fd(), &name, NOFOLLOW)
                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
        })
    };
    is_dir(new_parent, new_name) || (flags & rename_flags::EXCHANGE != 0 && is_dir(parent, name))
}

pub fn link(
    ctx: &Ctx,
    path: &RelPath,
    new_parent: &RelPath,
    new_name: &Name,
) -> Result<Response, Errno> {
    let (old_dir, old) = ctx.export.entry_of(path)?;
    let (new_dir, new) = ctx.export.entry(new_parent, new_name)?;
    ctx.watch_dir(new_dir.as_fd(), new_parent);
    sys::linkat(old_dir.as_fd(), &old, new_dir.as_fd(), &new)?;
    attr_at(ctx, new_dir.as_fd(), &new)
}

pub fn statfs(ctx: &Ctx, path: &RelPath) -> Result<Response, Errno> {
    let fd = ctx.export.resolve(path, libc::O_PATH)?;
    let st = sys::fstatvfs(fd.as_fd())?;
    Ok(Response::StatFs(StatFs {
        blocks: st.f_blocks,
        bfree: st.f_bfree,
        bavail: st.f_bavail,
        files: st.f_files,
        ffree: st.f_ffree,
        bsize: u32::try_from(st.f_bsize).unwrap_or(u32::MAX),
        namelen: u32::try_from(st.f_namemax).unwrap_or(u32::MAX),
        frsize: u32::try_from(st.f_frsize).unwrap_or(u32::MAX),
    }))
}
