//! Extended attributes: get, list, set, remove.
//!
//! The path is resolved beneath the root like any other (`O_PATH|O_NOFOLLOW`, so a
//! final symlink is the symlink itself), then the `*xattr` call goes through the
//! descriptor's `/proc/self/fd/N` magic link, which reaches exactly that inode. Must
//! never pass a client path to an `*xattr` call, and never allocate more than the
//! kernel's own limit for a reply, whatever size the client asks for.

use std::os::fd::AsFd;

use ferry_common::{RelPath, Response};

use super::Ctx;
use crate::sys::{self, Errno};

/// The kernel's `XATTR_SIZE_MAX` and `XATTR_LIST_MAX`: no value or name list is
/// larger, so a buffer of this size never gives ERANGE where a larger one would not.
const XATTR_MAX: u32 = 64 * 1024;

/// `size == 0` answers the length (`XattrSize`); otherwise the value, or ERANGE from
/// the OS if it does not fit in `size` bytes.
pub fn get(ctx: &Ctx, path: &RelPath, name: &[u8], size: u32) -> Result<Response, Errno> {
    let fd = ctx.export.resolve(path, libc::O_PATH)?;
    let name = sys::cstring(name)?;
    let mut buf = vec![0u8; size.min(XATTR_MAX) as usize];
    let n = sys::getxattr_fd(fd.as_fd(), &name, &mut buf)?;
    reply(buf, n, size)
}

pub fn list(ctx: &Ctx, path: &RelPath, size: u32) -> Result<Response, Errno> {
    let fd = ctx.export.resolve(path, libc::O_PATH)?;
    let mut buf = vec![0u8; size.min(XATTR_MAX) as usize];
    let n = sys::listxattr_fd(fd.as_fd(), &mut buf)?;
    reply(buf, n, size)
}

fn reply(mut buf: Vec<u8>, n: usize, size: u32) -> Result<Response, Errno> {
    if size == 0 {
        // At most XATTR_MAX, as the kernel never reports more.
        return Ok(Response::XattrSize(
            u32::try_from(n).map_err(|_| libc::E2BIG)?,
        ));
    }
    buf.truncate(n);
    Ok(Response::data(buf))
}

/// Only `XATTR_CREATE` and `XATTR_REPLACE` are passed on; other flag bits are EINVAL,
/// as the kernel itself answers for unknown ones.
pub fn set(
    ctx: &Ctx,
    path: &RelPath,
    name: &[u8],
    value: &[u8],
    flags: i32,
) -> Result<Response, Errno> {
    if flags & !(libc::XATTR_CREATE | libc::XATTR_REPLACE) != 0 {
        return Err(libc::EINVAL);
    }
    let fd = ctx.export.resolve(path, libc::O_PATH)?;
    let name = sys::cstring(name)?;
    sys::setxattr_fd(fd.as_fd(), &name, value, flags)?;
    Ok(Response::Ok)
}

pub fn remove(ctx: &Ctx, path: &RelPath, name: &[u8]) -> Result<Response, Errno> {
    let fd = ctx.export.resolve(path, libc::O_PATH)?;
    let name = sys::cstring(name)?;
    sys::removexattr_fd(fd.as_fd(), &name)?;
    Ok(Response::Ok)
}
