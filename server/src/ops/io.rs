//! I/O on open files: read, write, fsync, commit, fallocate.
//!
//! A staged handle (see [`crate::staging`]) reads and writes through its staging state;
//! everything else goes straight to the descriptor. Must never touch a file by path:
//! only handles reach here.

use std::os::fd::AsFd;

use ferry_common::{MAX_IO, Response};

use super::{Ctx, handle_attr};
use crate::handles::Handle;
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
    let start = offset(off)?;
    if let Some(staging) = f.staging() {
        return staging
            .read(f.fd.as_fd(), off, len as usize)
            .map(Response::Data);
    }
    let mut buf = vec![0u8; len as usize];
    let mut done = 0usize;
    while done < buf.len() {
        let pos = start.checked_add(done as i64).ok_or(libc::EINVAL)?;
        match sys::pread(f.fd.as_fd(), &mut buf[done..], pos) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(libc::EINTR) => {}
            // Bytes already read are returned; the error will repeat on the next call.
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(Response::Data(buf))
}

/// Writes all bytes at `off` (never appending, see [`PASSED_FLAGS`]). A failure after a
/// partial write reports the bytes written, as `write(2)` does.
pub fn write(ctx: &Ctx, handle: u64, off: u64, data: &[u8]) -> Result<Response, Errno> {
    if data.len() > MAX_IO as usize {
        return Err(libc::EINVAL);
    }
    let f = ctx.handles.file(handle)?;
    let start = offset(off)?;
    if let Some(mut staging) = f.staging() {
        let done = staging.write(f.fd.as_fd(), off, data)?;
        // `done` ≤ MAX_IO, checked above.
        return Ok(Response::Written { len: done as u32 });
    }
    let mut done = 0usize;
    while done < data.len() {
        let pos = start.checked_add(done as i64).ok_or(libc::EFBIG)?;
        match sys::pwrite(f.fd.as_fd(), &data[done..], pos) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(libc::EINTR) => {}
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    // `done` ≤ MAX_IO, checked above.
    Ok(Response::Written { len: done as u32 })
}

/// Commits a staged handle first: what is made durable must be what the client wrote.
/// Works on directory handles too (a client's `fsyncdir`).
pub fn fsync(ctx: &Ctx, handle: u64, datasync: bool) -> Result<Response, Errno> {
    let h = ctx.handles.get(handle)?;
    commit_handle(&h)?;
    sys::fsync(h.fd().as_fd(), datasync)?;
    Ok(Response::Ok)
}

/// Apply a staged handle's changes to the real file; any other handle just gets its
/// attributes (the protocol's "nothing pending" answer).
pub fn commit(ctx: &Ctx, handle: u64) -> Result<Response, Errno> {
    let h = ctx.handles.get(handle)?;
    commit_handle(&h)?;
    handle_attr(ctx, &h).map(Response::Attr)
}

fn commit_handle(h: &Handle) -> Result<(), Errno> {
    match h {
        Handle::File(f) if let Some(e) = f.take_write_failure() => {
            // What the failed write was part of must not become the file's content.
            if let Some(mut staging) = f.staging() {
                staging.discard();
            }
            Err(e)
        }
        Handle::File(f) => match f.staging() {
            Some(mut staging) => staging.commit(f.fd.as_fd()),
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
        staging.commit(f.fd.as_fd())?;
    }
    sys::fallocate(f.fd.as_fd(), mode, off, len)?;
    Ok(Response::Ok)
}
