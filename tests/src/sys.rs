//! Thin wrappers over the libc calls std does not offer (renameat2, utimensat with
//! nanoseconds, fallocate, copy_file_range, mkfifo, statvfs, a checked close, …), each returning
//! `io::Result` so a test can assert on the errno, plus the errno assertions themselves.

use std::ffi::CString;
use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The path as a C string (test paths never contain NUL).
pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `sig` to `pid` (negative: a process group); errors are ignored (already gone).
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Processes held stopped ([`stop`]): continued (SIGCONT) when dropped, also when the
/// test fails meanwhile.
pub struct Stopped(Vec<i32>);

/// SIGSTOPs `pids` until the guard is dropped.
pub fn stop(pids: &[i32]) -> Stopped {
    for &pid in pids {
        kill(pid, libc::SIGSTOP);
    }
    Stopped(pids.to_vec())
}

impl Stopped {
    /// Continues them now; whether they all exited within `within` after.
    pub fn resume_until_gone(self, within: std::time::Duration) -> bool {
        let pids = self.0.clone();
        drop(self);
        all_gone(&pids, within)
    }
}

/// Whether every one of `pids` is gone (or a zombie) within `within`.
pub fn all_gone(pids: &[i32], within: std::time::Duration) -> bool {
    crate::poll_until(within, || pids.iter().all(|&p| !pid_running(p)))
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for &pid in &self.0 {
            kill(pid, libc::SIGCONT);
        }
    }
}

/// Whether a process with this pid exists and is not a zombie. (A test binary killed
/// while some of its threads are blocked in a FUSE call stays a zombie until they return:
/// it is dead all the same, its cleanup will never run.)
pub fn pid_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// `renameat2(AT_FDCWD, from, AT_FDCWD, to, flags)`.
pub fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (f, t) = (cstr(from), cstr(to));
    // SAFETY: both strings are valid NUL-terminated paths for the duration of the call.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    })
}

/// A timestamp argument of [`utimensat`].
#[derive(Debug, Clone, Copy)]
pub enum Time {
    At(i64, i64),
    Now,
    Omit,
}

impl Time {
    fn timespec(self) -> libc::timespec {
        let (sec, nsec) = match self {
            Time::At(s, n) => (s, n),
            Time::Now => (0, libc::UTIME_NOW),
            Time::Omit => (0, libc::UTIME_OMIT),
        };
        libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as _,
        }
    }
}

/// `utimensat(AT_FDCWD, path, [atime, mtime], nofollow ? AT_SYMLINK_NOFOLLOW : 0)`.
pub fn utimensat(path: &Path, atime: Time, mtime: Time, nofollow: bool) -> io::Result<()> {
    let p = cstr(path);
    let times = [atime.timespec(), mtime.timespec()];
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: valid path and a two-element timespec array, as the call requires.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), flags) })
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(file: &File, mode: i32, offset: i64, len: i64) -> io::Result<()> {
    // SAFETY: the fd is open for the duration of the call.
    check(unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) })
}

/// `close(2)` of `file`, with its result: dropping a `File` ignores a failed close, and
/// on a network filesystem close is where a failed upload is reported.
pub fn close(file: File) -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = file.into_raw_fd();
    // SAFETY: we own `fd` (taken out of the File) and close it exactly once.
    check(unsafe { libc::close(fd) })
}

/// `posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`: drops the file's clean pages from the
/// kernel's page cache, so the next read asks the filesystem again.
pub fn fadvise_dontneed(file: &File) -> io::Result<()> {
    // SAFETY: the fd is open for the duration of the call.
    let ret = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

/// `mkfifo(path, mode)`.
pub fn mkfifo(path: &Path, mode: u32) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: valid path.
    check(unsafe { libc::mkfifo(p.as_ptr(), mode as libc::mode_t) })
}

/// `mknod(path, mode, dev)`.
pub fn mknod(path: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: valid path.
    check(unsafe { libc::mknod(p.as_ptr(), mode as libc::mode_t, dev as libc::dev_t) })
}

/// `truncate(path, len)` (follows symlinks).
pub fn truncate(path: &Path, len: u64) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: valid path.
    check(unsafe { libc::truncate(p.as_ptr(), len as libc::off_t) })
}

/// `statvfs(path)`.
pub fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let p = cstr(path);
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and a pointer to a live statvfs.
    check(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
    Ok(st)
}

/// `umount2(path, MNT_DETACH)`: a lazy unmount.
pub fn umount_detach(path: &Path) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: valid path.
    check(unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) })
}

/// Taken for writing by [`drop_caches`], for reading by [`kernel_caches_kept`].
static KERNEL_CACHES: RwLock<()> = RwLock::new(());

/// Drops the kernel's clean page cache, dentries and inodes (`echo 3`), or with
/// `what == 2` only dentries and inodes: a FUSE client then sees FORGETs and lookups again.
/// Machine-wide: it waits while a test of this process holds [`kernel_caches_kept`].
pub fn drop_caches(what: u8) -> io::Result<()> {
    kernel_caches_alone().drop_caches(what)
}

/// Held by a test that drops the kernel's caches itself and then counts what the kernel
/// asks for: no other test of this process drops them (nor holds [`kernel_caches_kept`])
/// meanwhile. (Another test's `drop_caches(1)` between a listing and the count threw away
/// the held directory's cached listing, and the kernel read it again instead of looking
/// its names up: CI of session 31.)
pub struct CachesAlone {
    _held: RwLockWriteGuard<'static, ()>,
}

impl CachesAlone {
    /// [`drop_caches`] under this guard.
    pub fn drop_caches(&self, what: u8) -> io::Result<()> {
        // SAFETY: sync(2) has no arguments.
        unsafe { libc::sync() };
        std::fs::write("/proc/sys/vm/drop_caches", format!("{what}\n"))
    }
}

/// See [`CachesAlone`].
pub fn kernel_caches_alone() -> CachesAlone {
    CachesAlone {
        _held: KERNEL_CACHES.write().unwrap_or_else(|e| e.into_inner()),
    }
}

/// Held by a test that counts the requests the kernel's dentry and inode caches spare
/// (an `ls -l` that looks nothing up): other tests' [`drop_caches`] wait until it is
/// dropped. (A `drop_caches(2)` during such a count made the kernel forget the entries a
/// listing had just handed over, and look 1,026 of them up again: session 29.)
pub fn kernel_caches_kept() -> RwLockReadGuard<'static, ()> {
    KERNEL_CACHES.read().unwrap_or_else(|e| e.into_inner())
}

/// `llistxattr(path)`: the extended attribute names of `path` itself (no symlink
/// following).
pub fn llistxattr(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let p = cstr(path);
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid path and a buffer of the given length.
    let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// `lgetxattr(path, name)`: the value of extended attribute `name` of `path` itself.
pub fn lgetxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (cstr(path), cstr(Path::new(name)));
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid C strings and a buffer of the given length.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

/// `lsetxattr(path, name, value, 0)`.
pub fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (p, n) = (cstr(path), cstr(Path::new(name)));
    // SAFETY: valid C strings and a value of the given length.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `lremovexattr(path, name)`.
pub fn lremovexattr(path: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cstr(path), cstr(Path::new(name)));
    // SAFETY: valid C strings.
    if unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The current umask (set back right away).
pub fn umask() -> u32 {
    // SAFETY: umask(2) cannot fail; we restore the value at once.
    unsafe {
        let old = libc::umask(0o022);
        libc::umask(old);
        old as u32
    }
}

/// Symbolic name of common errno values, with the number: `ENOENT (2)`.
pub fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EINTR => "EINTR",
        libc::ENXIO => "ENXIO",
        libc::ETXTBSY => "ETXTBSY",
        libc::ESTALE => "ESTALE",
        libc::ENODATA => "ENODATA",
        libc::ERANGE => "ERANGE",
        libc::EBUSY => "EBUSY",
        _ => "E?",
    };
    format!("{name} ({e})")
}

fn describe_err(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{} \"{e}\"", errno_name(n)),
        None => format!("non-OS error {:?} \"{e}\"", e.kind()),
    }
}

/// Asserts `r` failed with errno `expected`.
#[track_caller]
pub fn assert_errno<T: Debug>(r: io::Result<T>, expected: i32) {
    assert_errno_in(r, &[expected]);
}

/// `copy_file_range(2)` with explicit offsets (neither file position moves); returns the
/// bytes copied, which may be fewer than `len`.
pub fn copy_file_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: usize,
) -> io::Result<usize> {
    let mut src_off = libc::loff_t::try_from(src_off).map_err(|_| io::Error::other("offset"))?;
    let mut dst_off = libc::loff_t::try_from(dst_off).map_err(|_| io::Error::other("offset"))?;
    // SAFETY: valid descriptors and pointers to two live offsets.
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
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// Asserts `r` failed with one of the `expected` errno values.
#[track_caller]
pub fn assert_errno_in<T: Debug>(r: io::Result<T>, expected: &[i32]) {
    let want: Vec<String> = expected.iter().map(|&e| errno_name(e)).collect();
    match r {
        Ok(v) => panic!(
            "expected {} but the call succeeded: {v:?}",
            want.join(" or ")
        ),
        Err(e) => assert!(
            e.raw_os_error().is_some_and(|n| expected.contains(&n)),
            "expected {} but got {}",
            want.join(" or "),
            describe_err(&e)
        ),
    }
}

/// A tmpfs mounted for one test (root only), lazily unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE tmpfs AT`, checked.
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        let out = crate::run(
            std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(at),
        );
        out.assert_success();
        Tmpfs(at.to_path_buf())
    }

    /// `mount --move` of it to `to`, checked; it is unmounted there when dropped.
    pub fn move_to(&mut self, to: &Path) {
        let out = crate::run(
            std::process::Command::new("mount")
                .arg("--move")
                .arg(&self.0)
                .arg(to),
        );
        out.assert_success();
        self.0 = to.to_path_buf();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
