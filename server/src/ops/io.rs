//! I/O on open files: read, write, copy, fsync, commit, fallocate.
//!
//! A staged handle (see [`crate::staging`]) reads and writes through its staging state;
//! everything else goes straight to the descriptor. Must never touch a file by path:
//! only handles reach here.

use std::os::fd::AsFd;

use ferry_common::{MAX_COPY, MAX_IO, Response};

use super::{Ctx, handle_attr};
use crate::handles::Handle;
use crate::staging::Records;
use crate::staging::{pread_some, pwrite_full};
use crate::sys::{self, Errno};

fn offset(offset: u64) -> Result<i64, Errno> {
    // pread/pwrite take a signed offset; beyond it is what the kernel says for a
    // negative one.
    i64::try_from(offset).map_err(|_| libc::EINVAL)
}

/// Reads until `len` bytes or end of file: a short `Data` means EOF, which the client
/// relies on.
pub fn read(ctx: &Ctx, handle: u64, off: u64, len: u32) -> Result<Response, Errno> {
    if len > MAX_IO {
        return Err(libc::EINVAL);
    }
    let f = ctx.handles.file(handle)?;
    offset(off)?;
    if let Some(staging) = f.staging() {
        return staging
            .read(f.fd.as_fd(), off, len as usize)
            .map(Response::data);
    }
    pread_some(f.fd.as_fd(), off, len as usize).map(Response::data)
}

/// [`read`] when every byte asked for is in the page cache, read without waiting for the
/// disk (`RWF_NOWAIT`): quick enough for the connection task. `None` when some byte is
/// not cached, the handle is staged, or anything fails: then the caller reads the usual
/// way, which gives the real answer (or error).
pub fn read_cached(ctx: &Ctx, handle: u64, off: u64, len: u32) -> Option<Response> {
    if len > MAX_IO {
        return None;
    }
    let f = ctx.handles.file(handle).ok()?;
    // (A staged handle reads through its staging. Files of other filesystems mounted
    // beneath the export never come here: `conn::quick_read`.)
    if f.staging.is_some() {
        return None;
    }
    let start = offset(off).ok()?;
    let len = len as usize;
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let pos = start.checked_add(buf.len() as i64)?;
        match sys::pread_spare_nowait(f.fd.as_fd(), &mut buf, len, pos) {
            Ok(0) => break,
            Ok(_) | Err(libc::EINTR) => {}
            Err(_) => return None,
        }
    }
    Some(Response::data(buf))
}

/// Writes all bytes at `off` (never appending, see [`PASSED_FLAGS`]). A failure after a
/// partial write reports the bytes written, as `write(2)` does.
pub fn write(ctx: &Ctx, handle: u64, off: u64, data: &[u8]) -> Result<Response, Errno> {
    if data.len() > MAX_IO as usize {
        return Err(libc::EINVAL);
    }
    let f = ctx.handles.file(handle)?;
    offset(off)?;
    if let Some(mut staging) = f.staging() {
        let done = staging.write(f.fd.as_fd(), off, data)?;
        // `done` ≤ MAX_IO, checked above.
        return Ok(Response::Written { len: done as u32 });
    }
    let done = pwrite_full(f.fd.as_fd(), data, off)?;
    // `done` ≤ MAX_IO, checked above.
    Ok(Response::Written { len: done as u32 })
}

/// Commits a staged handle first: what is made durable must be what the client wrote.
/// Works on directory handles too (a client's `fsyncdir`).
pub fn fsync(ctx: &Ctx, handle: u64, datasync: bool) -> Result<Response, Errno> {
    let h = ctx.handles.get(handle)?;
    commit_handle(&h, ctx.export.records())?;
    sys::fsync(h.fd().as_fd(), datasync)?;
    Ok(Response::Ok)
}

/// Apply a staged handle's changes to the real file; any other handle just gets its
/// attributes (the protocol's "nothing pending" answer).
pub fn commit(ctx: &Ctx, handle: u64) -> Result<Response, Errno> {
    let h = ctx.handles.get(handle)?;
    commit_handle(&h, ctx.export.records())?;
    handle_attr(ctx, &h).map(Response::Attr)
}

fn commit_handle(h: &Handle, records: Option<Records<'_>>) -> Result<(), Errno> {
    match h {
        Handle::File(f) if let Some(e) = f.take_write_failure() => {
            // What the failed write was part of must not become the file's content.
            if let Some(mut staging) = f.staging() {
                staging.discard();
            }
            Err(e)
        }
        Handle::File(f) => match f.staging() {
            Some(mut staging) => staging.commit(f.fd.as_fd(), records),
            None => Ok(()),
        },
        Handle::Dir(_) => Ok(()),
    }
}

/// On a staged handle the pending changes are committed first: fallocate acts on the
/// real file (it reserves space there, or changes its size or holes), and doing it
/// under staged data would make the staged view and the file disagree.
pub fn fallocate(ctx: &Ctx, handle: u64, off: u64, len: u64, mode: i32) -> Result<Response, Errno> {
    let f = ctx.handles.file(handle)?;
    let mut staging = f.staging();
    if let Some(staging) = &mut staging {
        staging.commit(f.fd.as_fd(), ctx.export.records())?;
    }
    sys::fallocate(f.fd.as_fd(), mode, off, len)?;
    Ok(Response::Ok)
}

/// Chunk of a copy that goes through a staging file (read, then written, in memory).
const COPY_CHUNK: usize = 1024 * 1024;

/// `copy_file_range` between two handles of this connection, done here so the bytes
/// never cross the network. Each side behaves as its reads and writes do: a staged source
/// gives its staged bytes, a staged destination gets the bytes in its staging file (the
/// real file changes at commit, as with writes). Copies until `len` (at most
/// [`MAX_COPY`]) or the source's end; a failure after some bytes reports those bytes.
pub fn copy_range(
    ctx: &Ctx,
    src: u64,
    src_off: u64,
    dst: u64,
    dst_off: u64,
    len: u64,
) -> Result<Response, Errno> {
    let from = ctx.handles.file(src)?;
    let to = ctx.handles.file(dst)?;
    if !to.writable {
        return Err(libc::EBADF);
    }
    let len = len.min(MAX_COPY);
    // Both ranges must be addressable as signed offsets, as for pread/pwrite.
    offset(src_off.checked_add(len).ok_or(libc::EINVAL)?)?;
    offset(dst_off.checked_add(len).ok_or(libc::EFBIG)?).map_err(|_| libc::EFBIG)?;
    let mut done = 0u64;
    let result = if from.staging.is_none() && to.staging.is_none() {
        // Plain descriptors: the kernel copies (or shares the blocks, where it can).
        loop {
            if done == len {
                break Ok(());
            }
            let want = usize::try_from(len - done).unwrap_or(usize::MAX);
            match sys::copy_file_range(
                from.fd.as_fd(),
                src_off + done,
                to.fd.as_fd(),
                dst_off + done,
                want,
            ) {
                Ok(0) => break Ok(()),
                Ok(n) => done += n as u64,
                Err(libc::EINTR) => {}
                Err(e) => break Err(e),
            }
        }
    } else {
        loop {
            if done == len {
                break Ok(());
            }
            let want = COPY_CHUNK.min(usize::try_from(len - done).unwrap_or(usize::MAX));
            let chunk = match from.staging() {
                Some(staging) => staging.read(from.fd.as_fd(), src_off + done, want),
                None => pread_some(from.fd.as_fd(), src_off + done, want),
            };
            let chunk = match chunk {
                Ok(c) if c.is_empty() => break Ok(()),
                Ok(c) => c,
                Err(e) => break Err(e),
            };
            // Neither staging lock is held across both calls: source and destination may
            // be the same handle.
            let wrote = match to.staging() {
                Some(mut staging) => staging.write(to.fd.as_fd(), dst_off + done, &chunk),
                None => pwrite_full(to.fd.as_fd(), &chunk, dst_off + done),
            };
            match wrote {
                Ok(n) => done += n as u64,
                Err(e) => break Err(e),
            }
            if chunk.len() < want {
                break Ok(());
            }
        }
    };
    match result {
        Ok(()) => {}
        Err(e) if done == 0 => return Err(e),
        // Reported as a short copy; the error repeats on the caller's next call.
        Err(_) => {}
    }
    // `done` ≤ MAX_COPY < 4 GiB.
    Ok(Response::Written {
        len: u32::try_from(done).map_err(|_| libc::EIO)?,
    })
}
