//! Directory streams: opendir, readdir (entries with attributes), releasedir.
//!
//! The stream is read through `/proc/self/fd/N` of a descriptor opened beneath the root,
//! so it is exactly the directory that was resolved, even if it is renamed meanwhile.
//! Must never stat an entry by anything but its single name relative to that descriptor.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStringExt;
use std::sync::{Arc, Mutex};

use ferry_common::{DirEntry, MAX_DIR_BATCH, MAX_FRAME, Name, RelPath, Response};

use super::{Ctx, attr_of};
use crate::handles::{Handle, OpenDir};
use crate::sys::{self, Errno, errno_of};

/// Conservative encoded size of one entry besides its name (attributes are varints).
const ENTRY_OVERHEAD: usize = 160;

/// Batches of at least this many entries are stat'ed by up to `STAT_THREADS` threads.
const PARALLEL_STAT_MIN: usize = 512;
const STAT_THREADS: usize = 4;

pub fn opendir(ctx: &Ctx, path: &RelPath) -> Result<Response, Errno> {
    let fd = ctx
        .export
        .resolve(path, libc::O_RDONLY | libc::O_DIRECTORY)?;
    // Watched before it is stat'ed and listed: nothing changes unreported in between.
    ctx.watch_dir(fd.as_fd(), path);
    let st = sys::fstat(fd.as_fd())?;
    let attr = attr_of(&st, ctx.export.root_dev());
    // A second descriptor through our own fd's magic link: std's ReadDir owns it.
    let entries = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| errno_of(&e))?
        .peekable();
    let handle = ctx.handles.insert(Handle::Dir(Arc::new(OpenDir {
        fd,
        path: path.clone(),
        entries: Mutex::new(entries),
    })))?;
    Ok(Response::Opened { handle, attr })
}

/// `OpenDir` plus the first `ReadDir` (one round trip for most directories). A
/// directory read to the end in this batch leaves no handle behind.
pub fn listdir(ctx: &Ctx, path: &RelPath, max_entries: u32) -> Result<Response, Errno> {
    let (handle, attr) = match opendir(ctx, path)? {
        Response::Opened { handle, attr } => (handle, attr),
        _ => return Err(libc::EIO),
    };
    let batch = readdir(ctx, handle, max_entries);
    let (entries, eof) = match batch {
        Ok(Response::Dir { entries, eof }) => (entries, eof),
        Ok(_) => (Vec::new(), false),
        Err(e) => {
            let _ = ctx.handles.remove_dir(handle);
            return Err(e);
        }
    };
    let handle = if eof {
        let _ = ctx.handles.remove_dir(handle);
        0
    } else {
        handle
    };
    Ok(Response::Listing {
        handle,
        attr,
        entries,
        eof,
    })
}

/// The next entries in directory order ("." and ".." are never included). An entry
/// that disappears between reading its name and stat'ing it is skipped, as if the
/// unlink had happened first.
pub fn readdir(ctx: &Ctx, handle: u64, max_entries: u32) -> Result<Response, Errno> {
    let d = ctx.handles.dir(handle)?;
    if let Some(w) = &ctx.watch {
        // Normally already watched since OpenDir; this re-adds a watch that was dropped
        // (the directory moved out of sight and back, say).
        w.ensure_open_dir(d.fd.as_fd(), &d.path, &ctx.export);
    }
    let max = max_entries.clamp(1, MAX_DIR_BATCH) as usize;
    let dir = d.fd.as_fd();
    let stat_all = |names: &[Vec<u8>]| -> Result<Vec<DirEntry>, Errno> {
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let cname = sys::cstring(name)?;
            let st = match sys::fstatat(dir, &cname, libc::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(libc::ENOENT) => continue,
                Err(e) => return Err(e),
            };
            // `ferryd`'s own names at the root (see `redo::reserved`), and its folder
            // wherever a listing meets it.
            if crate::redo::reserved(name)
                && (ctx.export.is_hidden(st.st_dev, st.st_ino) || ctx.export.is_root(dir))
            {
                continue;
            }
            let mut attr = attr_of(&st, ctx.export.root_dev());
            // For a client that forwards xattrs, one more syscall per entry saves it a
            // round trip per `ls -l` probe (others do not ask: ~2 µs per entry saved).
            attr.xattrs = ctx.xattr_hint_at(dir, &cname);
            out.push(DirEntry {
                name: Name(name.clone()),
                attr,
            });
        }
        Ok(out)
    };
    loop {
        // Poisoning only means a previous request panicked; the iterator is still usable.
        let mut it = d.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut names = Vec::new();
        let mut bytes = 0usize;
        // Names are at most 255 bytes on Linux, so MAX_DIR_BATCH entries fit a frame; the
        // byte budget is a second guard for filesystems with longer names.
        while names.len() < max && bytes < MAX_FRAME / 2 {
            let ent = match it.next() {
                None => break,
                Some(Ok(ent)) => ent,
                Some(Err(e)) => return Err(errno_of(&e)),
            };
            let name = ent.file_name().into_vec();
            bytes += name.len() + ENTRY_OVERHEAD;
            names.push(name);
        }
        let eof = it.peek().is_none();
        drop(it);
        // A cold directory's entries cost a name lookup and an inode read each: big
        // batches are stat'ed by a few threads at once (their order kept).
        let entries = if names.len() < PARALLEL_STAT_MIN {
            stat_all(&names)?
        } else {
            in_parallel(&names, &stat_all)?
        };
        // Every name of the batch gone meanwhile: an empty batch would read as the end
        // of the directory, so go on with the next names.
        if !entries.is_empty() || eof {
            return Ok(Response::Dir { entries, eof });
        }
    }
}

/// `stat_all` of `names` split among [`stat_threads`] threads, the results in the order
/// of `names`. A part whose thread cannot be started is done by the calling thread.
fn in_parallel<F>(names: &[Vec<u8>], stat_all: &F) -> Result<Vec<DirEntry>, Errno>
where
    F: Fn(&[Vec<u8>]) -> Result<Vec<DirEntry>, Errno> + Sync,
{
    let threads = stat_threads();
    if threads < 2 {
        return stat_all(names);
    }
    let chunk = names.len().div_ceil(threads);
    let parts: Vec<Result<Vec<DirEntry>, Errno>> = std::thread::scope(|scope| {
        let running: Vec<_> = names
            .chunks(chunk)
            .map(|part| {
                std::thread::Builder::new()
                    .spawn_scoped(scope, || stat_all(part))
                    .map_err(|_| part)
            })
            .collect();
        running
            .into_iter()
            .map(|t| match t {
                Ok(t) => t.join().unwrap_or(Err(libc::EIO)),
                Err(part) => stat_all(part),
            })
            .collect()
    });
    let mut entries = Vec::with_capacity(names.len());
    for part in parts {
        entries.extend(part?);
    }
    Ok(entries)
}

/// Threads that stat a big batch: the machine's parallelism, at most `STAT_THREADS`.
fn stat_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(STAT_THREADS)
    })
}
