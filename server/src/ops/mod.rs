//! Requests to system calls: one function per [`Request`] variant, each returning
//! `Result<Response, Errno>`.
//!
//! Errno values come straight from the server's filesystem (mapped once, in
//! [`crate::sys::errno_of`]), so a client sees exactly what a local program would. The
//! few errno values this code chooses itself are documented where they are chosen.
//!
//! Errno values chosen here rather than by the OS:
//!
//! | situation | errno |
//! | --- | --- |
//! | a path or name with `..`, `.`, empty components, `/` in a name, NUL | EINVAL |
//! | a path longer than 4096 bytes | ENAMETOOLONG |
//! | resolution leaves the export (absolute symlink, `..` out of the root) | EACCES |
//! | any mutation on a `--read-only` export (also `Open` for writing or `O_TRUNC`, `Commit` even with nothing staged, `SetXattr`, `RemoveXattr`) | EROFS |
//! | an unknown handle, or a file handle where a directory one is needed (and back) | EBADF |
//! | `Read` longer than `MAX_IO`; offsets beyond `i64::MAX`; open access mode 3 | EINVAL |
//! | `Rename` flags other than NOREPLACE and EXCHANGE | EINVAL |
//! | `SetAttr` times with nanoseconds ≥ 10⁹ | EINVAL |
//! | `SetXattr` flags other than `XATTR_CREATE`/`XATTR_REPLACE` | EINVAL |
//! | a staged write or truncate whose end is beyond `i64::MAX` | EFBIG |
//! | a staged range missing from the staging file (a bug), or a commit write of 0 bytes | EIO |
//! | `Open`/`Create` of a FIFO, socket or device (the client kernel serves those) | EOPNOTSUPP |
//! | `Open`, or truncate by path, of a symlink (never followed) | ELOOP |
//! | truncate by path of a directory / of a FIFO, socket or device | EISDIR / EINVAL |
//! | chmod of a symlink (Linux has no symlink modes) | EOPNOTSUPP |
//! | `ReadLink` of something that is not a symlink | EINVAL |
//! | more than `handles::MAX_HANDLES` open handles on one connection | EMFILE |
//! | a request handler panicked (a bug) | EIO |
//!
//! `OpenDir` of a symlink gives the kernel's ENOTDIR (`O_DIRECTORY|O_NOFOLLOW`).
//! `Fsync` accepts directory handles (a client's `fsyncdir`). `GetAttr`/`SetAttr` with a
//! handle act on the open descriptor and ignore the path, except for a truncate through a
//! read-only handle, which uses the path. Only `Create`, `MkDir`, `MkNod` and `Symlink`
//! look at the caller.
//!
//! The newer requests, and what they deliberately do *not* fail with:
//! - `Open` with `inline_max`: a file too large, not regular, or that changed size while
//!   being read gets a plain `Opened`, never an error.
//! - `Open` with `staged`: where no staging file can be made (no `O_TMPFILE`, a
//!   directory the server may not create in) the handle writes directly, no error; the
//!   staging file's own failures (ENOSPC, EDQUOT) surface on `Write` and `Commit`. A
//!   failed `Commit` keeps everything staged, so retrying it is safe. `O_SYNC`/`O_DSYNC`
//!   opens are never staged (their writes must be durable in the file on return). `Fallocate` on a
//!   staged handle commits first. `Commit` of an unstaged (or directory) handle replies
//!   its attributes.
//! - Xattr requests: every errno is the OS's (ENODATA, ERANGE for a small `size`,
//!   EOPNOTSUPP for an unknown namespace, EPERM for `user.*` on a symlink, E2BIG), and
//!   a `size` above the kernel's 64 KiB limit is simply capped (no large allocation).
//!
//! Everything here is blocking and runs on tokio's blocking pool. It must never resolve
//! a path except through [`crate::export::Export`], never follow a final symlink, and
//! never panic on anything a request contains.
//!
//! Trust model (like NFS `AUTH_SYS`): permission checks are the client kernel's job
//! (`default_permissions`); the server acts with its own credentials and, when it runs as
//! root and the client negotiated [`caps::CALLER_CREDS`], gives the entries it creates the
//! uid/gid the client claims for the caller. Export only to clients you trust with the
//! whole tree: a client can also set any extended attribute the server's credentials
//! allow (for a root server that includes `trusted.*` and `security.*`, file
//! capabilities among them), and with `EVENTS` it hears of every change in every
//! directory any such client has looked into, not only its own.

pub mod dir;
mod io;
mod meta;
mod open;
mod xattr;

pub use io::read_cached;
pub use meta::moved_a_dir;

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use ferry_common::proto::{MAX_LOCATE, Name, rename_flags};
use ferry_common::{Attr, Caller, FileKind, OnceKey, RelPath, Request, Response, Timespec, caps};

use crate::export::Export;
use crate::handles::{Handle, Handles};
use crate::once::{Ctime, FileId, Probe, Verdict};
use crate::sys::{self, Errno};
use crate::watch::Watcher;

/// What the operations of one connection share.
#[derive(Debug)]
pub struct Ctx {
    pub export: Arc<Export>,
    pub handles: Handles,
    /// New entries are chowned to the caller: the server is root and the client
    /// negotiated [`caps::CALLER_CREDS`].
    pub caller_creds: bool,
    /// Present when the client negotiated [`caps::EVENTS`]: directories it looks into
    /// are watched. Clients without it add no watches (nobody would hear of them).
    pub watch: Option<Arc<Watcher>>,
    /// Barriers this connection started: its own writer does not send them back.
    pub own_barriers: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// The client negotiated [`caps::XATTR_HINTS`].
    pub xattr_hints: bool,
    /// The client negotiated [`caps::PARTIAL_WATCHES`]: replies resting on a directory
    /// the server could not watch go out marked (see [`execute`]).
    pub partial_watches: bool,
}

impl Ctx {
    pub fn new(export: Arc<Export>, capabilities: u64, watch: Option<Arc<Watcher>>) -> Ctx {
        let caller_creds = capabilities & caps::CALLER_CREDS != 0 && crate::sys::geteuid() == 0;
        Ctx {
            export,
            handles: Handles::default(),
            caller_creds,
            watch,
            own_barriers: Default::default(),
            xattr_hints: capabilities & caps::XATTR_HINTS != 0,
            partial_watches: capabilities & caps::PARTIAL_WATCHES != 0,
        }
    }

    /// Whether the file behind `dir`/`name` has extended attributes, for a client that
    /// asked ([`caps::XATTR_HINTS`]); unknown otherwise.
    pub fn xattr_hint_at(&self, dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> u8 {
        xattr_hint_at(self.xattr_hints, dir, name)
    }

    /// [`Ctx::xattr_hint_at`] for an open descriptor.
    pub fn xattr_hint_fd(&self, fd: BorrowedFd<'_>) -> u8 {
        if self.xattr_hints {
            crate::sys::xattr_hint_fd(fd)
        } else {
            ferry_common::XATTRS_UNKNOWN
        }
    }

    /// Watch the directory `dir` (just resolved from `path`) for change events, before
    /// the caller stats or lists it. A no-op without `EVENTS`.
    pub fn watch_dir(&self, dir: BorrowedFd<'_>, path: &RelPath) {
        if let Some(w) = &self.watch {
            w.ensure(dir, path);
        }
    }
}

/// Whether the file behind `dir`/`name` has extended attributes, if `asked` (the client
/// negotiated [`caps::XATTR_HINTS`]); unknown otherwise.
pub(crate) fn xattr_hint_at(asked: bool, dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> u8 {
    if asked {
        crate::sys::xattr_hint_at(dir, name)
    } else {
        ferry_common::XATTRS_UNKNOWN
    }
}

/// Execute one request with its [`OnceKey`], if it has one: a change already run
/// under that key gets its first answer (see [`crate::once`]). A key on a request
/// that takes none is `EINVAL`. Blocking; call from `spawn_blocking`.
///
/// For a client with [`caps::PARTIAL_WATCHES`], the reply is marked uncovered (every
/// attribute in it: [`Response::mark_uncovered`]) if a watch of a directory a client
/// looks into failed while it ran (maybe its own: a watch is added before the stat it
/// covers), and, once one has failed, unless every directory it rests on was watched
/// before and after it ran (one not watched before may have changed before someone
/// added its watch); attributes through a file's handle are marked from then on
/// (the file may have been moved or linked anywhere since it was opened). Until the
/// first failure this costs two atomic loads.
pub fn execute_keyed(
    ctx: &Ctx,
    caller: Caller,
    req: Request,
    once: Option<OnceKey>,
) -> Result<Response, Errno> {
    let Some(w) = ctx.watch.as_ref().filter(|_| ctx.partial_watches) else {
        return execute_keyed_unmarked(ctx, caller, req, once);
    };
    let failures = w.failures();
    if !w.partial() {
        let mut reply = execute_keyed_unmarked(ctx, caller, req, once)?;
        if w.failures() != failures {
            reply.mark_uncovered();
        }
        return Ok(reply);
    }
    let Some((dirs, handle)) = rests_on(&req) else {
        return execute_keyed_unmarked(ctx, caller, req, once);
    };
    let covered = |w: &Watcher| {
        dirs.iter().all(|d| w.covers_dir(d))
            && handle.is_none_or(|h| match ctx.handles.get(h) {
                Ok(Handle::File(_)) => false,
                Ok(Handle::Dir(d)) => {
                    crate::sys::fstat(d.fd.as_fd()).is_ok_and(|st| w.covers(st.st_dev, st.st_ino))
                }
                Err(_) => true,
            })
    };
    let before = covered(w);
    let mut reply = execute_keyed_unmarked(ctx, caller, req, once)?;
    if !(before && w.failures() == failures && covered(w)) {
        reply.mark_uncovered();
    }
    Ok(reply)
}

/// The directories (and the handle) the attributes in the reply to `req` rest on: a
/// listing on its directory, anything else on the directory of the entries it names.
/// `None` for requests whose replies carry no attributes.
fn rests_on(req: &Request) -> Option<(Vec<RelPath>, Option<u64>)> {
    let dir_of = |p: &RelPath| p.split_last().map(|(d, _)| d).into_iter();
    let (dirs, handle): (Vec<RelPath>, _) = match req {
        Request::Lookup { parent, .. }
        | Request::LookupIn { parent, .. }
        | Request::MkNod { parent, .. }
        | Request::MkDir { parent, .. }
        | Request::Unlink { parent, .. }
        | Request::RmDir { parent, .. }
        | Request::Symlink { parent, .. }
        | Request::Create { parent, .. } => (vec![parent.clone()], None),
        Request::Link {
            path, new_parent, ..
        } => (dir_of(path).chain([new_parent.clone()]).collect(), None),
        Request::GetAttr { path, handle } | Request::SetAttr { path, handle, .. } => match handle {
            Some(h) => (Vec::new(), Some(*h)),
            None => (dir_of(path).collect(), None),
        },
        Request::Open { path, .. } => (dir_of(path).collect(), None),
        Request::OpenDir { path } | Request::ListDir { path, .. } => (vec![path.clone()], None),
        Request::ReadSmall { dir, .. } => (vec![dir.clone()], None),
        Request::ReadDir { handle, .. } | Request::Commit { handle } => (Vec::new(), Some(*handle)),
        // (`Rename` answers `Ok`: the client marks what it moves into such a directory.)
        _ => return None,
    };
    Some((dirs, handle))
}

fn execute_keyed_unmarked(
    ctx: &Ctx,
    caller: Caller,
    req: Request,
    once: Option<OnceKey>,
) -> Result<Response, Errno> {
    match once {
        None if crate::once::takes_key(&req) => {
            ctx.export.answers().unkeyed(|| execute(ctx, caller, req))
        }
        None => execute(ctx, caller, req),
        Some(_) if !crate::once::takes_key(&req) => Err(libc::EINVAL),
        Some(key) => {
            let again = match &req {
                Request::Create { .. } => Some(req.clone()),
                _ => None,
            };
            let answers = ctx.export.answers();
            let look = answers.look(|| probe(&ctx.export, &req));
            let kind = req.kind();
            answers.run_or_replay(
                key,
                look,
                || {
                    crate::failpoint::reached("before", kind);
                    let answer = execute(ctx, caller, req);
                    crate::failpoint::reached("after", kind);
                    answer
                },
                |first| match again {
                    Some(create) => create_again(ctx, create, first),
                    None => first,
                },
            )
        }
    }
}

/// What a keyed change finds before it runs, for a start after the process died in it
/// to tell whether it ran (`once::Probe`): the files a rename moves and replaces, the
/// one a create opens (or none), and their directories' `ctime`s. `None` for other
/// changes, and when the names cannot be looked at (the change then fails the same
/// way, or nothing is known of it).
fn probe(export: &Export, req: &Request) -> Option<Probe> {
    match req {
        Request::Rename {
            parent,
            name,
            new_parent,
            new_name,
            flags,
        } => {
            let (from_id, from_dir) = look_at(export, parent, name).ok()?;
            let (to_id, to_dir) = look_at(export, new_parent, new_name).ok()?;
            let exchange = flags & rename_flags::EXCHANGE != 0;
            if exchange && to_id.is_none() {
                // Fails (`ENOENT`) the same way when run again.
                return None;
            }
            Some(Probe::Rename {
                from: (parent.clone(), name.clone()),
                from_id: from_id?,
                to: (new_parent.clone(), new_name.clone()),
                to_id,
                exchange,
                ctimes: (from_dir, to_dir),
            })
        }
        Request::Create { parent, name, .. } => {
            let (id, ctime) = look_at(export, parent, name).ok()?;
            Some(Probe::Create {
                entry: (parent.clone(), name.clone()),
                existed: id.is_some(),
                ctime,
            })
        }
        Request::MkDir { parent, name, .. } => make(export, parent, name, libc::S_IFDIR),
        Request::Symlink { parent, name, .. } => make(export, parent, name, libc::S_IFLNK),
        Request::MkNod {
            parent, name, mode, ..
        } => {
            let kind = match mode & libc::S_IFMT {
                0 => libc::S_IFREG,
                kind => kind,
            };
            make(export, parent, name, kind)
        }
        Request::Link {
            path,
            new_parent,
            new_name,
        } => {
            let (dir, name) = export.entry_of(path).ok()?;
            let st = sys::fstatat(dir.as_fd(), &name, libc::AT_SYMLINK_NOFOLLOW).ok()?;
            let (taken, ctime) = look_at(export, new_parent, new_name).ok()?;
            match taken {
                Some(_) => None,
                None => Some(Probe::Link {
                    entry: (new_parent.clone(), new_name.clone()),
                    id: (st.st_dev, st.st_ino),
                    ctime,
                }),
            }
        }
        Request::Unlink { parent, name } | Request::RmDir { parent, name } => {
            let (id, ctime) = look_at(export, parent, name).ok()?;
            Some(Probe::Remove {
                entry: (parent.clone(), name.clone()),
                id: id?,
                ctime,
            })
        }
        _ => None,
    }
}

/// The probe of a change that makes a file of type `kind` at `parent/name`, if free.
fn make(export: &Export, parent: &RelPath, name: &Name, kind: u32) -> Option<Probe> {
    match look_at(export, parent, name).ok()? {
        (Some(_), _) => None,
        (None, ctime) => Some(Probe::Make {
            entry: (parent.clone(), name.clone()),
            kind,
            ctime,
        }),
    }
}

/// The (device, inode) of `parent/name` (not following a symlink; `None` if absent),
/// and its directory's `ctime`.
fn look_at(
    export: &Export,
    parent: &RelPath,
    name: &Name,
) -> Result<(Option<FileId>, Ctime), Errno> {
    let (dir, name) = export.entry(parent, name)?;
    let d = sys::fstat(dir.as_fd())?;
    let ctime = (d.st_ctime, d.st_ctime_nsec);
    match sys::fstatat(dir.as_fd(), &name, libc::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok((Some((st.st_dev, st.st_ino)), ctime)),
        Err(libc::ENOENT) => Ok((None, ctime)),
        Err(e) => Err(e),
    }
}

/// Whether the change that found `probe` ran, by looking at its names again (at a
/// start after the process died in it: nothing else runs meanwhile).
pub fn judge(export: &Export, probe: &Probe) -> Verdict {
    match probe {
        Probe::Rename {
            from,
            from_id,
            to,
            to_id,
            exchange,
            ctimes,
        } => {
            let (Ok((from_now, from_dir)), Ok((to_now, to_dir))) = (
                look_at(export, &from.0, &from.1),
                look_at(export, &to.0, &to.1),
            ) else {
                return Verdict::Unknown;
            };
            let dirs_as_before = (from_dir, to_dir) == *ctimes;
            Verdict::of_rename(
                *from_id,
                *to_id,
                *exchange,
                (from_now, to_now),
                dirs_as_before,
            )
        }
        // Of a name that held a file, the create only opened it (a truncation is staged
        // until a commit): opening what is there again is the same. A name that was
        // free and now holds a regular file holds the one it made: its answer names it,
        // and the repeat opens it again (`create_again` checks inode number and ctime).
        // A name still free, in a directory nothing changed, was never made.
        Probe::Create {
            entry,
            existed: true,
            ..
        } => match look_at(export, &entry.0, &entry.1) {
            Ok((Some(_), _)) => Verdict::NotRun,
            _ => Verdict::Unknown,
        },
        Probe::Create {
            entry,
            existed: false,
            ctime,
        } => made(
            export,
            entry,
            *ctime,
            |st| st.st_mode & libc::S_IFMT == libc::S_IFREG,
            |attr| Response::Opened { handle: 0, attr },
        ),
        // A name that was free: holding what the change makes, it ran (its answer is
        // the entry's attributes); still free in a directory nothing changed, it never
        // ran.
        Probe::Make { entry, kind, ctime } => made(
            export,
            entry,
            *ctime,
            |st| st.st_mode & libc::S_IFMT == *kind,
            Response::Attr,
        ),
        Probe::Link { entry, id, ctime } => made(
            export,
            entry,
            *ctime,
            |st| (st.st_dev, st.st_ino) == *id,
            Response::Attr,
        ),
        // A name that held `id`: free now, it ran; holding `id` in a directory nothing
        // changed, it never ran.
        Probe::Remove { entry, id, ctime } => match look_at(export, &entry.0, &entry.1) {
            Ok((None, _)) => Verdict::Ran(Response::Ok),
            Ok((Some(now), dir)) if now == *id && dir == *ctime => Verdict::NotRun,
            _ => Verdict::Unknown,
        },
    }
}

/// The verdict on a change that makes `entry` (free before, in a directory with
/// `ctime`): ran if it holds a file that is what it makes (`is_it`), with the `answer`
/// its attributes make.
fn made(
    export: &Export,
    entry: &(RelPath, Name),
    ctime: Ctime,
    is_it: impl Fn(&libc::stat) -> bool,
    answer: impl Fn(Attr) -> Response,
) -> Verdict {
    let Ok((dir, name)) = export.entry(&entry.0, &entry.1) else {
        return Verdict::Unknown;
    };
    match sys::fstatat(dir.as_fd(), &name, libc::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if is_it(&st) => Verdict::Ran(answer(attr_of(&st, export.root_dev()))),
        Err(libc::ENOENT)
            if sys::fstat(dir.as_fd()).is_ok_and(|d| (d.st_ctime, d.st_ctime_nsec) == ctime) =>
        {
            Verdict::NotRun
        }
        _ => Verdict::Unknown,
    }
}

/// The repeat of a `Create` that ran: its handle belonged to the connection that broke,
/// so the file is opened again by its name, without `O_CREAT` (gone meanwhile: `EIO`,
/// never a new file), staged as the create was (a staged `O_TRUNC` is staged again),
/// and must be the file the first run answered with: the same inode number and
/// `ctime` (a new file that got a freed inode number has another), else `EIO`.
fn create_again(
    ctx: &Ctx,
    create: Request,
    first: Result<Response, Errno>,
) -> Result<Response, Errno> {
    let made = match first.as_ref().map(Response::inner) {
        Ok(Response::Opened { attr, .. }) => *attr,
        _ => return first,
    };
    let Request::Create {
        parent,
        name,
        flags,
        ..
    } = create
    else {
        return first;
    };
    let path = parent.join(&name.0);
    // Looked at before it is opened: the open may truncate (an empty file's `O_TRUNC`
    // is not staged), which changes its `ctime`.
    let now = match ctx.export.resolve(&path, libc::O_PATH) {
        Ok(probe) => attr_of(&crate::sys::fstat(probe.as_fd())?, ctx.export.root_dev()),
        Err(libc::ENOENT) => return Err(libc::EIO),
        Err(e) => return Err(e),
    };
    if now.ino != made.ino || now.ctime != made.ctime {
        return Err(libc::EIO);
    }
    let flags = flags & !(libc::O_CREAT | libc::O_EXCL);
    let reply = match open::open(ctx, &path, flags, 0, true) {
        Ok(r) => r,
        Err(libc::ENOENT) => return Err(libc::EIO),
        Err(e) => return Err(e),
    };
    match &reply {
        Response::Opened { attr, .. } if attr.ino == made.ino => Ok(reply),
        Response::Opened { handle, .. } => {
            let _ = ctx.handles.remove_file(*handle);
            Err(libc::EIO)
        }
        _ => Err(libc::EIO),
    }
}

/// Requests that may take space on the export, or report it: they wait for the files
/// removed before them to be freed (`crate::reap::settle`).
fn takes_space(req: &Request) -> bool {
    match req {
        Request::Write { .. }
        | Request::Create { .. }
        | Request::Commit { .. }
        | Request::Fsync { .. }
        | Request::Fallocate { .. }
        | Request::CopyRange { .. }
        | Request::MkNod { .. }
        | Request::MkDir { .. }
        | Request::Symlink { .. }
        | Request::Link { .. }
        | Request::SetXattr { .. }
        | Request::StatFs { .. } => true,
        Request::SetAttr { set, .. } => set.size.is_some(),
        _ => false,
    }
}

/// Execute one request. Blocking; call from `spawn_blocking`.
pub fn execute(ctx: &Ctx, caller: Caller, req: Request) -> Result<Response, Errno> {
    if ctx.export.read_only() && req.is_mutation() {
        return Err(libc::EROFS);
    }
    if takes_space(&req) {
        // The space of files removed before it is free (see `crate::reap`).
        crate::reap::settle();
    }
    // Requests that change a directory's entries answer with its new attributes too.
    let changed_dir = match &req {
        Request::MkNod { parent, .. }
        | Request::MkDir { parent, .. }
        | Request::Unlink { parent, .. }
        | Request::RmDir { parent, .. }
        | Request::Symlink { parent, .. }
        | Request::Create { parent, .. } => Some(parent.clone()),
        Request::Link { new_parent, .. } => Some(new_parent.clone()),
        _ => None,
    };
    // Changes a file's watched directories may not hear of (see
    // `Watcher::note_touched`): through a handle, and a new link. The file is named
    // before the request runs, and noted however it ends (a request may fail after it
    // changed the file: a commit, then a failed `fallocate`).
    let touched = ctx.watch.as_ref().and_then(|_| touched_by(ctx, &req));
    let result = execute_plain(ctx, caller, req);
    if let (Some(w), Some(node)) = (&ctx.watch, touched) {
        w.note_touched(node);
    }
    let reply = result?;
    match changed_dir.map(|d| meta::getattr(ctx, &d, None)) {
        Some(Ok(Response::Attr(dir))) => Ok(Response::InDir {
            dir,
            reply: Box::new(reply),
        }),
        _ => Ok(reply),
    }
}

/// The file (node id) `req` may change unseen by the watches of the directories that
/// list it: one changed through a handle (its name may be gone), or one given a new
/// link (changes through that name reach that directory only).
fn touched_by(ctx: &Ctx, req: &Request) -> Option<u64> {
    let st = match req {
        Request::Write { handle, .. }
        | Request::Commit { handle }
        | Request::Fsync { handle, .. }
        | Request::Fallocate { handle, .. }
        | Request::SetAttr {
            handle: Some(handle),
            ..
        }
        | Request::CopyRange { dst: handle, .. } => match ctx.handles.get(*handle) {
            Ok(Handle::File(f)) => crate::sys::fstat(f.fd.as_fd()).ok()?,
            _ => return None,
        },
        Request::Link { path, .. } => {
            let (dir, name) = ctx.export.entry_of(path).ok()?;
            crate::sys::fstatat(dir.as_fd(), &name, libc::AT_SYMLINK_NOFOLLOW).ok()?
        }
        _ => return None,
    };
    Some(node_id(st.st_dev, st.st_ino, ctx.export.root_dev()))
}

fn execute_plain(ctx: &Ctx, caller: Caller, req: Request) -> Result<Response, Errno> {
    match req {
        Request::Ping => Ok(Response::Pong),
        Request::Lookup { parent, name } => meta::lookup(ctx, &parent, &name, None),
        Request::LookupIn {
            parent,
            parent_node,
            name,
        } => meta::lookup(ctx, &parent, &name, Some(parent_node)),
        Request::GetAttr { path, handle } => meta::getattr(ctx, &path, handle),
        Request::SetAttr { path, handle, set } => meta::setattr(ctx, &path, handle, &set),
        Request::ReadLink { path } => meta::readlink(ctx, &path),
        Request::MkNod {
            parent,
            name,
            mode,
            umask,
            rdev,
        } => meta::mknod(ctx, caller, &parent, &name, mode, umask, rdev),
        Request::MkDir {
            parent,
            name,
            mode,
            umask,
        } => meta::mkdir(ctx, caller, &parent, &name, mode, umask),
        Request::Unlink { parent, name } => meta::unlink(ctx, &parent, &name, false),
        Request::RmDir { parent, name } => meta::unlink(ctx, &parent, &name, true),
        Request::Symlink {
            parent,
            name,
            target,
        } => meta::symlink(ctx, caller, &parent, &name, &target),
        Request::Rename {
            parent,
            name,
            new_parent,
            new_name,
            flags,
        } => meta::rename(ctx, &parent, &name, &new_parent, &new_name, flags),
        Request::Link {
            path,
            new_parent,
            new_name,
        } => meta::link(ctx, &path, &new_parent, &new_name),
        Request::StatFs { path } => meta::statfs(ctx, &path),
        Request::Open {
            path,
            flags,
            inline_max,
            staged,
        } => open::open(ctx, &path, flags, inline_max, staged),
        Request::Create {
            parent,
            name,
            mode,
            umask,
            flags,
        } => open::create(ctx, caller, &parent, &name, mode, umask, flags),
        Request::Read {
            handle,
            offset,
            len,
        } => io::read(ctx, handle, offset, len),
        Request::Write {
            handle,
            offset,
            data,
        } => io::write(ctx, handle, offset, &data),
        Request::Fsync { handle, datasync } => io::fsync(ctx, handle, datasync),
        Request::Commit { handle } => io::commit(ctx, handle),
        Request::Fallocate {
            handle,
            offset,
            len,
            mode,
        } => io::fallocate(ctx, handle, offset, len, mode),
        Request::CopyRange {
            src,
            src_offset,
            dst,
            dst_offset,
            len,
        } => io::copy_range(ctx, src, src_offset, dst, dst_offset, len),
        Request::ReadSmall {
            dir,
            names,
            max_size,
        } => open::read_small(ctx, &dir, &names, max_size),
        Request::Locate { nodes } if nodes.len() <= MAX_LOCATE => match &ctx.watch {
            Some(w) => Ok(Response::Located(
                nodes.into_iter().map(|n| w.locate(n)).collect(),
            )),
            None => Err(libc::ENOSYS),
        },
        Request::Locate { .. } => Err(libc::EINVAL),
        Request::Release { handle } => ctx.handles.remove_file(handle).map(|()| Response::Ok),
        Request::OpenDir { path } => dir::opendir(ctx, &path),
        Request::ReadDir {
            handle,
            max_entries,
        } => dir::readdir(ctx, handle, max_entries),
        Request::ListDir {
            path,
            max_entries,
            speculative,
        } => dir::listdir(ctx, &path, max_entries, speculative),
        Request::BarrierAck { id } => {
            if let Some(w) = &ctx.watch {
                w.ack(id);
            }
            Ok(Response::Ok)
        }
        Request::ReleaseDir { handle } => ctx.handles.remove_dir(handle).map(|()| Response::Ok),
        Request::GetXattr { path, name, size } => xattr::get(ctx, &path, &name, size),
        Request::ListXattr { path, size } => xattr::list(ctx, &path, size),
        Request::SetXattr {
            path,
            name,
            value,
            flags,
        } => xattr::set(ctx, &path, &name, &value, flags),
        Request::RemoveXattr { path, name } => xattr::remove(ctx, &path, &name),
    }
}

/// The `stat` of an open handle; a staged one shows its staged size and mtime.
fn handle_stat(h: &Handle) -> Result<libc::stat, Errno> {
    if let Handle::File(f) = h
        && let Some(staging) = f.staging()
    {
        return staging.stat(f.fd.as_fd());
    }
    crate::sys::fstat(h.fd().as_fd())
}

fn handle_attr(ctx: &Ctx, h: &Handle) -> Result<Attr, Errno> {
    Ok(attr_of(&handle_stat(h)?, ctx.export.root_dev()))
}

/// The owner a new entry in `dir` gets when the server acts for callers (see the trust
/// model above), or `None` to leave it to the server's own credentials. In a setgid
/// directory the entry keeps the directory's group, as on a local disk.
fn new_owner(ctx: &Ctx, caller: Caller, dir: BorrowedFd<'_>) -> Option<(u32, u32)> {
    if !ctx.caller_creds {
        return None;
    }
    let gid = match crate::sys::fstat(dir) {
        Ok(p) if p.st_mode & libc::S_ISGID != 0 => p.st_gid,
        _ => caller.gid,
    };
    Some((caller.uid, gid))
}

/// Smallest block size reported: small `st_blksize` values make some programs do tiny
/// I/O, which costs a round trip each over the network.
const MIN_BLKSIZE: u32 = 128 * 1024;

/// Protocol attributes from a `stat` of the server's filesystem.
/// The protocol's node id ([`Attr::ino`]) of the file `(dev, ino)`.
pub fn node_id(dev: u64, ino: u64, root_dev: u64) -> u64 {
    if dev == root_dev {
        ino
    } else {
        // Another filesystem mounted inside the export: mix in the device so its inode
        // numbers do not collide with the root filesystem's. Stable across restarts.
        ino ^ dev.rotate_left(32)
    }
}

pub fn attr_of(st: &libc::stat, root_dev: u64) -> Attr {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFCHR => FileKind::CharDevice,
        libc::S_IFBLK => FileKind::BlockDevice,
        _ => FileKind::File,
    };
    let ino = node_id(st.st_dev, st.st_ino, root_dev);
    let atime = ts(st.st_atime, st.st_atime_nsec);
    let mtime = ts(st.st_mtime, st.st_mtime_nsec);
    let ctime = ts(st.st_ctime, st.st_ctime_nsec);
    let size = u64::try_from(st.st_size).unwrap_or(0);
    let version = version_of(&[
        ctime.sec as u64,
        ctime.nsec.into(),
        mtime.sec as u64,
        mtime.nsec.into(),
        size,
        ino,
    ]);
    Attr {
        ino,
        size,
        blocks: u64::try_from(st.st_blocks).unwrap_or(0),
        atime,
        mtime,
        ctime,
        kind,
        perm: (st.st_mode & 0o7777) as u16,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        xattrs: ferry_common::XATTRS_UNKNOWN,
        uncovered: false,
        rdev: crate::sys::encode_dev(st.st_rdev),
        blksize: u32::try_from(st.st_blksize)
            .unwrap_or(u32::MAX)
            .max(MIN_BLKSIZE),
        version,
    }
}

fn ts(sec: i64, nsec: i64) -> Timespec {
    Timespec {
        sec,
        nsec: u32::try_from(nsec).unwrap_or(0).min(999_999_999),
    }
}

/// A deterministic 64-bit hash (splitmix64 finalizer folded over the words): the value
/// must be the same after a server restart, which std's `DefaultHasher` does not promise.
fn version_of(words: &[u64]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for &w in words {
        h ^= w;
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns once the clock is past the ctimes of `dirs`, so that their next change
    /// moves them (timestamps can be as coarse as a clock tick). Looks at a scratch
    /// file's ctime next to them (not in them: that would change them).
    fn past_ctimes_of(dirs: &[&std::path::Path], next_to: &std::path::Path) {
        use std::os::unix::fs::MetadataExt;
        let ctime = |p: &std::path::Path| {
            let m = std::fs::metadata(p).expect("stat");
            (m.ctime(), m.ctime_nsec())
        };
        let then = dirs.iter().map(|d| ctime(d)).max().expect("a directory");
        let scratch = tempfile::NamedTempFile::new_in(next_to).expect("scratch file");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut mode = 0o600;
        loop {
            mode ^= 0o040;
            let perm = std::os::unix::fs::PermissionsExt::from_mode(mode);
            scratch.as_file().set_permissions(perm).expect("chmod");
            if ctime(scratch.path()) > then {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the clock stands still"
            );
        }
    }

    /// Each keyed change's probe, looked at again before the change ran, after
    /// it ran, and after someone else changed its names, on a real directory.
    #[test]
    fn a_change_is_judged_by_its_names() {
        let top = tempfile::tempdir().expect("temp dir");
        let root = &top.path().join("export");
        std::fs::create_dir(root).expect("mkdir");
        let export = Export::open(root, false).expect("export");
        let tick = || past_ctimes_of(&[root, &root.join("d")], top.path());
        let ino = |p: &str| {
            std::os::unix::fs::MetadataExt::ino(
                &std::fs::symlink_metadata(root.join(p)).expect("stat"),
            )
        };
        let rel = |p: &str| RelPath(p.as_bytes().to_vec());
        let nm = |n: &str| Name(n.as_bytes().to_vec());
        std::fs::create_dir(root.join("d")).expect("mkdir");
        std::fs::write(root.join("d/a"), b"a").expect("write");
        std::fs::write(root.join("b"), b"b").expect("write");
        let rename = |flags| Request::Rename {
            parent: rel("d"),
            name: nm("a"),
            new_parent: rel(""),
            new_name: nm("b"),
            flags,
        };
        // Over an existing file.
        let p = probe(&export, &rename(0)).expect("a probe");
        assert_eq!(judge(&export, &p), Verdict::NotRun);
        // Run and undone (by someone else, say): the names hold what they held, but
        // their directories changed. It may have run: unknown.
        std::fs::hard_link(root.join("b"), root.join("keep")).expect("link");
        let p = probe(&export, &rename(0)).expect("a probe");
        tick();
        std::fs::rename(root.join("d/a"), root.join("b")).expect("rename");
        std::fs::rename(root.join("b"), root.join("d/a")).expect("rename");
        std::fs::rename(root.join("keep"), root.join("b")).expect("rename");
        assert_eq!(judge(&export, &p), Verdict::Unknown, "renamed and back");
        let p = probe(&export, &rename(0)).expect("a probe");
        std::fs::rename(root.join("d/a"), root.join("b")).expect("rename");
        assert_eq!(judge(&export, &p), Verdict::Ran(Response::Ok));
        std::fs::write(root.join("d/a"), b"a again").expect("write");
        assert_eq!(
            judge(&export, &p),
            Verdict::Ran(Response::Ok),
            "a new file at the old name"
        );
        std::fs::remove_file(root.join("b")).expect("rm");
        assert_eq!(judge(&export, &p), Verdict::Unknown);
        // An exchange: both names stay.
        std::fs::write(root.join("b"), b"b").expect("write");
        let p = probe(&export, &rename(rename_flags::EXCHANGE)).expect("a probe");
        assert_eq!(judge(&export, &p), Verdict::NotRun);
        std::fs::rename(root.join("b"), root.join("tmp")).expect("rename");
        std::fs::rename(root.join("d/a"), root.join("b")).expect("rename");
        std::fs::rename(root.join("tmp"), root.join("d/a")).expect("rename");
        assert_eq!(judge(&export, &p), Verdict::Ran(Response::Ok));
        // Nothing to move: no probe (the rename fails the same way when sent again).
        std::fs::remove_file(root.join("d/a")).expect("rm");
        assert_eq!(probe(&export, &rename(0)), None);
        // A create: a new file is the one it made; a file there before, or nothing, it
        // may make or open again.
        let create = Request::Create {
            parent: rel("d"),
            name: nm("new"),
            mode: 0o644,
            umask: 0,
            flags: libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
        };
        let p = probe(&export, &create).expect("a probe");
        assert_eq!(judge(&export, &p), Verdict::NotRun);
        tick();
        std::fs::write(root.join("d/other"), b"").expect("create");
        assert_eq!(
            judge(&export, &p),
            Verdict::Unknown,
            "a free name in a directory that changed"
        );
        std::fs::remove_file(root.join("d/other")).expect("rm");
        let p = probe(&export, &create).expect("a probe");
        std::fs::write(root.join("d/new"), b"").expect("create");
        match judge(&export, &p) {
            Verdict::Ran(Response::Opened { attr, .. }) => assert_eq!(attr.ino, ino("d/new")),
            other => panic!("a create that made its file: {other:?}"),
        }
        let p = probe(&export, &create).expect("a probe");
        assert_eq!(
            judge(&export, &p),
            Verdict::NotRun,
            "opened a file already there"
        );
        std::fs::remove_file(root.join("d/new")).expect("rm");
        assert_eq!(
            judge(&export, &p),
            Verdict::Unknown,
            "the file it opened is gone"
        );
        let p = probe(&export, &create).expect("a probe");
        std::fs::create_dir(root.join("d/new")).expect("mkdir");
        assert_eq!(judge(&export, &p), Verdict::Unknown, "a directory");
        // A mkdir (mknod and symlink alike): the name holds what it makes, it ran.
        let mkdir = Request::MkDir {
            parent: rel("d"),
            name: nm("sub"),
            mode: 0o755,
            umask: 0,
        };
        let p = probe(&export, &mkdir).expect("a probe");
        assert_eq!(judge(&export, &p), Verdict::NotRun);
        std::fs::write(root.join("d/sub"), b"").expect("write");
        assert_eq!(
            judge(&export, &p),
            Verdict::Unknown,
            "a file, not a directory"
        );
        std::fs::remove_file(root.join("d/sub")).expect("rm");
        let p = probe(&export, &mkdir).expect("a probe");
        std::fs::create_dir(root.join("d/sub")).expect("mkdir");
        match judge(&export, &p) {
            Verdict::Ran(Response::Attr(attr)) => assert_eq!(attr.ino, ino("d/sub")),
            other => panic!("a mkdir that ran: {other:?}"),
        }
        assert_eq!(probe(&export, &mkdir), None, "a name taken: fails again");
        let symlink = Request::Symlink {
            parent: rel("d"),
            name: nm("ln"),
            target: b"sub".to_vec(),
        };
        let p = probe(&export, &symlink).expect("a probe");
        std::os::unix::fs::symlink("sub", root.join("d/ln")).expect("symlink");
        assert!(matches!(
            judge(&export, &p),
            Verdict::Ran(Response::Attr(_))
        ));
        // A link: the name holds the file linked.
        let link = Request::Link {
            path: rel("b"),
            new_parent: rel("d"),
            new_name: nm("b2"),
        };
        let p = probe(&export, &link).expect("a probe");
        assert_eq!(judge(&export, &p), Verdict::NotRun);
        std::fs::hard_link(root.join("b"), root.join("d/b2")).expect("link");
        match judge(&export, &p) {
            Verdict::Ran(Response::Attr(attr)) => assert_eq!(attr.ino, ino("b")),
            other => panic!("a link that ran: {other:?}"),
        }
        // An unlink (or rmdir): the name free, it ran; its file there still, not.
        let unlink = Request::Unlink {
            parent: rel("d"),
            name: nm("b2"),
        };
        let p = probe(&export, &unlink).expect("a probe");
        assert_eq!(judge(&export, &p), Verdict::NotRun);
        tick();
        std::fs::rename(root.join("d/b2"), root.join("b3")).expect("rename");
        std::fs::hard_link(root.join("b3"), root.join("d/b2")).expect("link");
        assert_eq!(
            judge(&export, &p),
            Verdict::Unknown,
            "its file there again, after a change of the directory"
        );
        let p = probe(&export, &unlink).expect("a probe");
        std::fs::remove_file(root.join("d/b2")).expect("rm");
        assert_eq!(judge(&export, &p), Verdict::Ran(Response::Ok));
        std::fs::write(root.join("d/b2"), b"another").expect("write");
        assert_eq!(judge(&export, &p), Verdict::Unknown, "another file there");
        let rmdir = Request::RmDir {
            parent: rel("d"),
            name: nm("sub"),
        };
        let p = probe(&export, &rmdir).expect("a probe");
        std::fs::remove_dir(root.join("d/sub")).expect("rmdir");
        assert_eq!(judge(&export, &p), Verdict::Ran(Response::Ok));
        assert_eq!(probe(&export, &rmdir), None, "nothing to remove");
    }

    /// A keyed change logs what it found with its `Begin`; one that cannot succeed, and
    /// a change with no log to keep it in, take no probe.
    #[test]
    fn keyed_changes_log_their_probes() {
        let top = tempfile::tempdir().expect("temp dir");
        let root = &top.path().join("export");
        let state = &top.path().join("state");
        std::fs::create_dir(root).expect("mkdir");
        std::fs::create_dir(state).expect("mkdir");
        std::fs::write(root.join("a"), b"a").expect("write");
        let export = Arc::new(Export::open(root, false).expect("export"));
        let ctx = Ctx::new(export.clone(), 0, None);
        let caller = Caller { uid: 0, gid: 0 };
        let nm = |n: &str| Name(n.as_bytes().to_vec());
        let rename = Request::Rename {
            parent: RelPath::default(),
            name: nm("a"),
            new_parent: RelPath::default(),
            new_name: nm("b"),
            flags: 0,
        };
        let key = |seq| {
            Some(OnceKey {
                session: 1,
                seq,
                repeat: false,
            })
        };
        // No log yet: no probe, and the change runs.
        execute_keyed(&ctx, caller, rename.clone(), key(1)).expect("rename");
        std::fs::rename(root.join("b"), root.join("a")).expect("rename back");
        let id =
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(root.join("a")).expect("stat"));
        export
            .answers()
            .keep_in(state, &|_: &Probe| Verdict::Unknown)
            .expect("keep");
        execute_keyed(&ctx, caller, rename, key(2)).expect("rename");
        let create = Request::Create {
            parent: RelPath::default(),
            name: nm("c"),
            mode: 0o644,
            umask: 0,
            flags: libc::O_RDWR | libc::O_CREAT,
        };
        execute_keyed(&ctx, caller, create, key(3)).expect("create");
        let mkdir = Request::MkDir {
            parent: RelPath::default(),
            name: nm("d"),
            mode: 0o755,
            umask: 0,
        };
        execute_keyed(&ctx, caller, mkdir.clone(), key(4)).expect("mkdir");
        let again = execute_keyed(&ctx, caller, mkdir, key(5));
        assert_eq!(again, Err(libc::EEXIST));
        let probes = crate::once::Answers::logged_probes(state);
        assert_eq!(probes.len(), 4, "{probes:?}");
        match &probes[0] {
            Some(Probe::Rename { from_id, to_id, .. }) => {
                assert_eq!(from_id.1, id);
                assert_eq!(*to_id, None);
            }
            other => panic!("a rename's probe: {other:?}"),
        }
        match &probes[1] {
            Some(Probe::Create { existed, .. }) => assert!(!existed),
            other => panic!("a create's probe: {other:?}"),
        }
        match &probes[2] {
            Some(Probe::Make { kind, .. }) => assert_eq!(*kind, libc::S_IFDIR),
            other => panic!("a mkdir's probe: {other:?}"),
        }
        assert_eq!(probes[3], None, "a mkdir at a name taken has none");
    }

    #[test]
    fn version_changes_with_every_word() {
        let base = [1, 2, 3, 4, 5, 6];
        let v = version_of(&base);
        for i in 0..base.len() {
            let mut w = base;
            w[i] += 1;
            assert_ne!(version_of(&w), v, "word {i}");
        }
        assert_eq!(version_of(&base), v);
    }

    #[test]
    fn dev_encoding_roundtrips() {
        for (maj, min) in [(0, 0), (1, 3), (8, 17), (259, 70000), (4095, 0xfffff)] {
            let dev = libc::makedev(maj, min);
            assert_eq!(crate::sys::decode_dev(crate::sys::encode_dev(dev)), dev);
        }
    }
}
