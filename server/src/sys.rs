//! Thin safe wrappers over the Linux system calls the server needs.
//!
//! This is the only module with `unsafe`: every wrapper takes owned or borrowed file
//! descriptors and `CStr` names, checks the return value, and turns `-1` into the errno
//! the kernel set (see [`last_errno`]). The wrappers never resolve anything themselves:
//! confinement to the export root is [`crate::export`]'s job, and callers must only pass
//! single validated names (no `/`, no `..`) relative to directory fds that module gave out.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A Linux errno value, as carried on the wire.
pub type Errno = i32;

/// Map an `io::Error` to the errno sent to the client. The single place where that
/// mapping happens: errors from the OS keep their exact errno, anything synthesized by
/// std without one becomes EIO.
pub fn errno_of(e: &io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The errno of the system call that just failed on this thread.
pub fn last_errno() -> Errno {
    errno_of(&io::Error::last_os_error())
}

fn cvt(ret: libc::c_int) -> Result<libc::c_int, Errno> {
    if ret == -1 {
        Err(last_errno())
    } else {
        Ok(ret)
    }
}

fn cvt_long(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret == -1 {
        Err(last_errno())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> Result<usize, Errno> {
    if ret < 0 {
        Err(last_errno())
    } else {
        Ok(ret as usize)
    }
}

/// Bytes from the network as a C string; an embedded NUL is EINVAL (path validation
/// already refuses it, this is the last line of defense).
pub fn cstring(bytes: &[u8]) -> Result<CString, Errno> {
    CString::new(bytes).map_err(|_| libc::EINVAL)
}

/// `struct open_how` of `openat2(2)`; our own definition because libc's is
/// `non_exhaustive` and cannot be built with a literal.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dir, path, flags, resolve)`, retrying EAGAIN, which the kernel returns when a
/// concurrent rename or mount made a `RESOLVE_BENEATH` walk unverifiable.
pub fn openat2(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: i32,
    resolve: u64,
) -> Result<OwnedFd, Errno> {
    let how = OpenHow {
        flags: flags as u32 as u64,
        mode: 0,
        resolve,
    };
    let mut tries = 0;
    loop {
        // SAFETY: `how` is a valid open_how of the size passed; `path` is NUL-terminated.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        match cvt_long(ret) {
            // SAFETY: the kernel returned a new descriptor that nothing else owns.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
            Err(libc::EAGAIN) if tries < 16 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// `open(path, flags)` of an operator-supplied path; only for the export root at startup.
pub fn open_startup(path: &CStr, flags: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: `path` is NUL-terminated.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), flags) })?;
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat(dir, name, flags, mode)`; `name` must be a single component.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd, Errno> {
    // SAFETY: `name` is NUL-terminated; the mode is passed as the variadic argument.
    let fd =
        cvt(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) })?;
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat, Errno> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a valid out pointer; fstat fills it completely on success.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: initialized by the successful call above.
    Ok(unsafe { st.assume_init() })
}

pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> Result<libc::stat, Errno> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid out pointer and NUL-terminated name.
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: initialized by the successful call above.
    Ok(unsafe { st.assume_init() })
}

/// `name` in `dir` as the kernel has it, without revalidating (`AT_STATX_DONT_SYNC`)
/// and without triggering an automount: a hung network or FUSE filesystem answers
/// from what it cached. With it, whether the name is another filesystem's root (a
/// mount point in `dir`): when the kernel says so (`STATX_ATTR_MOUNT_ROOT`) or, on a
/// kernel that cannot (before 5.8), when its device is not `dir_dev`.
pub fn stat_unsynced(
    dir: BorrowedFd<'_>,
    name: &CStr,
    dir_dev: u64,
) -> Result<(libc::stat, bool), Errno> {
    let mut stx = MaybeUninit::<libc::statx>::uninit();
    let flags = libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_DONT_SYNC | libc::AT_NO_AUTOMOUNT;
    // SAFETY: valid out pointer and NUL-terminated name.
    cvt(unsafe {
        libc::statx(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags,
            libc::STATX_BASIC_STATS,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: initialized by the successful call above.
    let x = unsafe { stx.assume_init() };
    // SAFETY: all-zero is a valid `stat` (plain integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    st.st_dev = libc::makedev(x.stx_dev_major, x.stx_dev_minor);
    st.st_ino = x.stx_ino;
    st.st_mode = u32::from(x.stx_mode);
    st.st_nlink = x.stx_nlink.into();
    st.st_uid = x.stx_uid;
    st.st_gid = x.stx_gid;
    st.st_rdev = libc::makedev(x.stx_rdev_major, x.stx_rdev_minor);
    st.st_size = x.stx_size as i64;
    st.st_blksize = x.stx_blksize as _;
    st.st_blocks = x.stx_blocks as i64;
    (st.st_atime, st.st_atime_nsec) = (x.stx_atime.tv_sec, x.stx_atime.tv_nsec.into());
    (st.st_mtime, st.st_mtime_nsec) = (x.stx_mtime.tv_sec, x.stx_mtime.tv_nsec.into());
    (st.st_ctime, st.st_ctime_nsec) = (x.stx_ctime.tv_sec, x.stx_ctime.tv_nsec.into());
    let root = libc::STATX_ATTR_MOUNT_ROOT as u64;
    let mounted = match x.stx_attributes_mask & root != 0 {
        true => x.stx_attributes & root != 0,
        false => st.st_dev != dir_dev,
    };
    Ok((st, mounted))
}

/// The id of the mount `fd` is on (`STATX_MNT_ID`, Linux 5.8); `None` where unknown.
pub fn mount_id(fd: BorrowedFd<'_>) -> Option<u64> {
    let mut stx = MaybeUninit::<libc::statx>::uninit();
    // SAFETY: valid out pointer; the empty path names `fd` itself (AT_EMPTY_PATH).
    cvt(unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    })
    .ok()?;
    // SAFETY: initialized by the successful call above.
    let x = unsafe { stx.assume_init() };
    (x.stx_mask & libc::STATX_MNT_ID != 0).then_some(x.stx_mnt_id)
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> Result<libc::statvfs, Errno> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid out pointer.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: initialized by the successful call above.
    Ok(unsafe { st.assume_init() })
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> Result<(), Errno> {
    // SAFETY: NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, dev: u64) -> Result<(), Errno> {
    // SAFETY: NUL-terminated name.
    cvt(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t,
            dev as libc::dev_t,
        )
    })
    .map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    // SAFETY: both strings NUL-terminated.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `readlinkat(fd, "", ...)`: the target of the symlink an `O_PATH|O_NOFOLLOW` fd refers to.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> Result<Vec<u8>, Errno> {
    // PATH_MAX bounds a symlink target on Linux; one byte more detects truncation.
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: the buffer is valid for `buf.len()` bytes; the empty path is NUL-terminated.
    let n = cvt_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    if n >= buf.len() {
        return Err(libc::ENAMETOOLONG);
    }
    buf.truncate(n);
    Ok(buf)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> Result<(), Errno> {
    // SAFETY: NUL-terminated name.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> Result<(), Errno> {
    // The raw system call rather than the glibc wrapper: it exists on every libc.
    // SAFETY: NUL-terminated names, plain integer arguments.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            flags as libc::c_uint,
        )
    };
    cvt_long(ret).map(drop)
}

pub fn linkat(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
) -> Result<(), Errno> {
    // Flags 0: never AT_SYMLINK_FOLLOW, so linking a symlink links the symlink itself.
    // SAFETY: NUL-terminated names.
    cvt(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// Give the open file `fd` (an `O_TMPFILE` made without `O_EXCL`) the name `name` in
/// `dir`: `linkat` of its `/proc/self/fd` link with `AT_SYMLINK_FOLLOW`, which needs no
/// capability (`AT_EMPTY_PATH` would).
pub fn link_open_file(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    let from = proc_fd_path(fd);
    // SAFETY: NUL-terminated names.
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

/// 16 random bytes from the kernel (`getrandom`), for names nobody can guess.
pub fn random_128() -> Result<[u8; 16], Errno> {
    let mut buf = [0u8; 16];
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most the remaining length into `buf`.
        let n = unsafe {
            libc::getrandom(
                buf[done..].as_mut_ptr().cast::<libc::c_void>(),
                buf.len() - done,
                0,
            )
        };
        match cvt_size(n) {
            Ok(n) => done += n,
            Err(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// `fchownat`; `None` leaves that id unchanged (-1).
pub fn fchownat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    uid: Option<u32>,
    gid: Option<u32>,
    flags: i32,
) -> Result<(), Errno> {
    let uid = uid.unwrap_or(u32::MAX);
    let gid = gid.unwrap_or(u32::MAX);
    // SAFETY: NUL-terminated name.
    cvt(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, flags) }).map(drop)
}

pub fn fchown(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> Result<(), Errno> {
    let uid = uid.unwrap_or(u32::MAX);
    let gid = gid.unwrap_or(u32::MAX);
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> Result<(), Errno> {
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
}

/// The `/proc/self/fd/N` path of a descriptor: lets calls without an `AT_EMPTY_PATH`
/// form (chmod, utimensat) act on exactly the inode an `O_PATH` fd refers to.
pub fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    // No interior NUL is possible in a formatted integer.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// A file handle (`name_to_handle_at`): the filesystem's own name for an inode, which
/// finds it again wherever it has moved ([`open_by_handle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    kind: i32,
    bytes: Box<[u8]>,
}

/// Largest file handle the kernel hands out (`MAX_HANDLE_SZ`).
const MAX_HANDLE: usize = 128;

/// The file handle of the inode behind `fd`.
pub fn handle_of(fd: BorrowedFd<'_>) -> Result<Handle, Errno> {
    // `struct file_handle`: two 4-byte fields, then the bytes; u64s for alignment.
    let mut buf = [0u64; 1 + MAX_HANDLE / 8];
    let fh = buf.as_mut_ptr().cast::<libc::file_handle>();
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `fh` points at a buffer of 8 + MAX_HANDLE bytes, suitably aligned, whose
    // `handle_bytes` says how many the kernel may fill; the empty path with
    // AT_EMPTY_PATH names `fd` itself.
    unsafe {
        (*fh).handle_bytes = MAX_HANDLE as u32;
        cvt(libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            fh,
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        ))?;
    }
    // SAFETY: the kernel filled the header and `handle_bytes` (≤ MAX_HANDLE) bytes.
    let (len, kind) = unsafe { ((*fh).handle_bytes as usize, (*fh).handle_type) };
    let all: &[u8] = bytes_of_words(&buf);
    let bytes = all.get(8..8 + len).ok_or(libc::EOVERFLOW)?;
    Ok(Handle {
        kind,
        bytes: bytes.into(),
    })
}

fn bytes_of_words(words: &[u64]) -> &[u8] {
    // SAFETY: any u64 slice is also a valid byte slice of 8 times its length.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) }
}

/// Open the inode `handle` names (on the filesystem of `mount`), wherever it is now:
/// `ESTALE` once it is gone. Needs `CAP_DAC_READ_SEARCH` (`EPERM` otherwise).
pub fn open_by_handle(
    mount: BorrowedFd<'_>,
    handle: &Handle,
    flags: i32,
) -> Result<OwnedFd, Errno> {
    let mut buf = [0u64; 1 + MAX_HANDLE / 8];
    let len = handle.bytes.len().min(MAX_HANDLE);
    let base = buf.as_mut_ptr();
    // SAFETY: the buffer holds the 8-byte header plus MAX_HANDLE bytes; `len` of them
    // are copied in; both pointers derive from `base`.
    unsafe {
        let fh = base.cast::<libc::file_handle>();
        (*fh).handle_bytes = len as u32;
        (*fh).handle_type = handle.kind;
        std::ptr::copy_nonoverlapping(handle.bytes.as_ptr(), base.cast::<u8>().add(8), len);
        let fd = cvt(libc::open_by_handle_at(
            mount.as_raw_fd(),
            fh,
            flags | libc::O_CLOEXEC,
        ))?;
        // SAFETY: a fresh descriptor owned by nobody else.
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Where the inode behind `fd` is now, as an absolute path (`/proc/self/fd`).
pub fn fd_path(fd: BorrowedFd<'_>) -> Result<Vec<u8>, Errno> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let p = proc_fd_path(fd);
    std::fs::read_link(std::ffi::OsStr::from_bytes(p.as_bytes()))
        .map(|p| p.into_os_string().into_vec())
        .map_err(|e| errno_of(&e))
}

/// chmod of the inode behind an `O_PATH` fd. The caller must have checked that it is
/// not a symlink: the `/proc` magic link is followed.
pub fn chmod_fd_path(fd: BorrowedFd<'_>, mode: u32) -> Result<(), Errno> {
    let p = proc_fd_path(fd);
    // SAFETY: NUL-terminated path.
    cvt(unsafe { libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode as libc::mode_t, 0) }).map(drop)
}

/// `utimensat`; `times` are (atime, mtime) with `UTIME_NOW`/`UTIME_OMIT` as usual.
pub fn utimensat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    times: &[libc::timespec; 2],
    flags: i32,
) -> Result<(), Errno> {
    // SAFETY: NUL-terminated name and a two-element timespec array.
    cvt(unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), times.as_ptr(), flags) }).map(drop)
}

pub fn futimens(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> Result<(), Errno> {
    // SAFETY: a two-element timespec array.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> Result<(), Errno> {
    let size = i64::try_from(size).map_err(|_| libc::EFBIG)?;
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }).map(drop)
}

/// One `pread`; may return fewer bytes than asked.
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: i64) -> Result<usize, Errno> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    cvt_size(unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) })
}

/// One `pread` into the spare capacity of `buf`, up to `buf.len()` reaching `max`; `buf`
/// grows by the bytes read. No zeroing of a buffer the read overwrites anyway. May read
/// fewer bytes than there is room for.
pub fn pread_spare(
    fd: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    max: usize,
    offset: i64,
) -> Result<usize, Errno> {
    preadv2_spare(fd, buf, max, offset, 0)
}

/// [`pread_spare`] with `RWF_NOWAIT`: `EAGAIN` instead of waiting for the disk (or a
/// lock), and fewer bytes when only some are in the page cache.
pub fn pread_spare_nowait(
    fd: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    max: usize,
    offset: i64,
) -> Result<usize, Errno> {
    preadv2_spare(fd, buf, max, offset, libc::RWF_NOWAIT)
}

fn preadv2_spare(
    fd: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    max: usize,
    offset: i64,
    flags: libc::c_int,
) -> Result<usize, Errno> {
    let want = max.saturating_sub(buf.len());
    buf.reserve(want);
    let spare = &mut buf.spare_capacity_mut()[..want];
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    // SAFETY: one iovec over `spare`, valid for writes of `spare.len()` bytes; the kernel
    // writes at most that many and reports how many it wrote.
    let n = cvt_size(unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, offset, flags) })?;
    // SAFETY: the kernel initialized the first `n <= want` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// One `pwrite`; may write fewer bytes than given.
pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: i64) -> Result<usize, Errno> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
    cvt_size(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) })
}

/// One `copy_file_range` from `src` at `src_off` to `dst` at `dst_off` (explicit
/// offsets: neither file position moves); may copy fewer bytes than asked. On a
/// filesystem that supports it the data is shared (reflinked), not copied.
pub fn copy_file_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: usize,
) -> Result<usize, Errno> {
    let mut src_off = i64::try_from(src_off).map_err(|_| libc::EINVAL)?;
    let mut dst_off = i64::try_from(dst_off).map_err(|_| libc::EINVAL)?;
    // SAFETY: valid pointers to two live i64 offsets, plain integers otherwise.
    let ret = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut src_off,
            dst.as_raw_fd(),
            &mut dst_off,
            len,
            0,
        )
    };
    cvt_size(ret)
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> Result<(), Errno> {
    // SAFETY: plain integer argument.
    let ret = unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    };
    cvt(ret).map(drop)
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> Result<(), Errno> {
    let offset = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
    let len = i64::try_from(len).map_err(|_| libc::EINVAL)?;
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) }).map(drop)
}

/// Turn on TCP keepalive (first probe after 60 s idle, then every 10 s, give up after 6):
/// a client machine that vanished without closing its connection would otherwise pin
/// that connection's descriptors forever.
pub fn set_keepalive(sock: BorrowedFd<'_>) -> Result<(), Errno> {
    let opts = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 60),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6),
    ];
    for (level, name, value) in opts {
        let value: libc::c_int = value;
        // SAFETY: a pointer to a live c_int and its exact size.
        cvt(unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    Ok(())
}

/// One `read`; may return fewer bytes than asked.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    cvt_size(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// Bytes queued to be read from `fd` (`FIONREAD`; for inotify, events not read yet).
pub fn fionread(fd: BorrowedFd<'_>) -> Result<u64, Errno> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the valid pointer.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) })?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// A new non-blocking inotify instance.
pub fn inotify_init() -> Result<OwnedFd, Errno> {
    // SAFETY: plain integer flags.
    let fd = cvt(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Register a descriptor with tokio's reactor for readiness (read side only). Must be
/// called inside a tokio runtime.
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is open, refers to the same file description for as long as
    // it lives (which is as long as the AsyncFd that owns it), and always returns the
    // same raw descriptor.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    };
    registered.map_err(io::Error::from)
}

/// Watch the directory an already-resolved descriptor refers to, through its
/// `/proc/self/fd/N` magic link: the kernel follows it to exactly that inode, so no
/// network-supplied path is ever walked here. Returns the watch descriptor.
pub fn inotify_watch_fd(
    inotify: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    mask: u32,
) -> Result<i32, Errno> {
    let p = proc_fd_path(dir);
    // SAFETY: NUL-terminated path, plain integers.
    cvt(unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), p.as_ptr(), mask) })
}

pub fn inotify_rm_watch(inotify: BorrowedFd<'_>, wd: i32) -> Result<(), Errno> {
    // SAFETY: plain integers.
    cvt(unsafe { libc::inotify_rm_watch(inotify.as_raw_fd(), wd) }).map(drop)
}

/// `getxattr` of the inode behind a descriptor (through its `/proc/self/fd/N` magic
/// link, which leads to exactly that inode, a symlink included). An empty `buf` asks
/// for the size only. Returns the value's length.
pub fn getxattr_fd(fd: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> Result<usize, Errno> {
    let p = proc_fd_path(fd);
    let ptr = if buf.is_empty() {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr()
    };
    // SAFETY: NUL-terminated strings; `ptr` is null with length 0 or valid for `buf.len()`.
    cvt_size(unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), ptr.cast(), buf.len()) })
}

/// `listxattr` through the magic link, like [`getxattr_fd`].
pub fn listxattr_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    let p = proc_fd_path(fd);
    let ptr = if buf.is_empty() {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr()
    };
    // SAFETY: as in `getxattr_fd`.
    cvt_size(unsafe { libc::listxattr(p.as_ptr(), ptr.cast(), buf.len()) })
}

pub fn setxattr_fd(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> Result<(), Errno> {
    let p = proc_fd_path(fd);
    // SAFETY: NUL-terminated strings; `value` is valid for reads of its length.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn removexattr_fd(fd: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    let p = proc_fd_path(fd);
    // SAFETY: NUL-terminated strings.
    cvt(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(drop)
}

/// The host name (`gethostname(2)`), as raw bytes without the terminating NUL.
pub fn hostname() -> Result<Vec<u8>, Errno> {
    // HOST_NAME_MAX is 64 on Linux; a larger buffer costs nothing.
    let mut buf = vec![0u8; 256];
    // SAFETY: the buffer is valid for writes of `buf.len()` bytes.
    cvt(unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) })?;
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    buf.truncate(len);
    Ok(buf)
}

/// Kill this process with `SIGKILL`: it dies at once, as in a crash.
pub fn kill_self() -> ! {
    // SAFETY: no pointers; `SIGKILL` to ourselves does not return.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

/// Effective uid of the server process.
pub fn geteuid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() }
}

/// Clear the process umask so modes the client computed (`mode & !umask`) reach the
/// disk unchanged. Returns the previous umask.
pub fn clear_umask() -> u32 {
    // SAFETY: cannot fail.
    unsafe { libc::umask(0) as u32 }
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit: every open handle of every client
/// holds a descriptor. Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialized by the successful call above.
    let mut lim = unsafe { lim.assume_init() };
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: pointer to a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Decode the `dev_t` that FUSE and our protocol carry as a 32-bit "new_encode_dev" value.
pub fn decode_dev(rdev: u32) -> u64 {
    let major = (rdev & 0xfff00) >> 8;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

/// Encode a `dev_t` into the 32-bit form FUSE carries (major ≤ 4095, minor ≤ 2^20-1;
/// larger numbers cannot be represented and are truncated, like the kernel's own encoding).
pub fn encode_dev(dev: u64) -> u32 {
    let major = libc::major(dev);
    let minor = libc::minor(dev);
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Whether `dir/name` has extended attributes, without following a final symlink:
/// `ferry_common::XATTRS_NONE`/`XATTRS_SOME`, or `XATTRS_UNKNOWN` when it cannot tell.
/// `name` is one validated component; the path goes through the dir's magic link.
pub fn xattr_hint_at(dir: BorrowedFd<'_>, name: &CStr) -> u8 {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.to_bytes());
    let Ok(path) = CString::new(path) else {
        return ferry_common::XATTRS_UNKNOWN;
    };
    // SAFETY: valid NUL-terminated path; a NULL buffer of size 0 asks for the length.
    let n = unsafe { libc::llistxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    hint(n)
}

/// Like [`xattr_hint_at`] for an open descriptor.
pub fn xattr_hint_fd(fd: BorrowedFd<'_>) -> u8 {
    let path = proc_fd_path(fd);
    // SAFETY: valid NUL-terminated path; size 0 asks for the length only.
    let n = unsafe { libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    hint(n)
}

fn hint(n: isize) -> u8 {
    match n {
        0 => ferry_common::XATTRS_NONE,
        n if n > 0 => ferry_common::XATTRS_SOME,
        _ => ferry_common::XATTRS_UNKNOWN,
    }
}
