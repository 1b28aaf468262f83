//! Whether other filesystems are mounted beneath the export root.
//!
//! ferryd answers cheap metadata calls on a connection's own task (`conn::runs_inline`):
//! on the export's disk they take microseconds. A call that reaches into another
//! filesystem mounted inside the export (an NFS or sshfs mount in an exported home, a
//! FUSE mount whose server hung) may wait for minutes, and it would hold a runtime
//! thread meanwhile: with ferryd's default of one thread per two CPUs, every client
//! would wait. So those go to the blocking pool, like I/O.
//!
//! Telling them apart costs a path walk per call (`Export::at_home`); most exports
//! have nothing mounted beneath them, and there the check is one atomic load. A thread keeps
//! the answer current: it waits on `/proc/self/mountinfo`, which the kernel marks
//! (`POLLPRI`) on every change to this process's mount table, and re-reads it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

/// The mount table, to be asked whether anything is mounted beneath one directory.
#[derive(Debug)]
pub struct Submounts {
    /// Something is (or may be) mounted beneath the root.
    any: Arc<AtomicBool>,
}

impl Submounts {
    /// Watch the mount table for mounts beneath the directory `root`, opened at
    /// `startup` (canonical). The directory is followed wherever it is renamed to: its
    /// path is read again (from `/proc/self/fd`) at every change to the table. Without
    /// `/proc/self/mountinfo` to watch, assume there are: every call is then checked.
    pub fn watch(root: BorrowedFd<'_>, startup: &Path) -> Submounts {
        let any = Arc::new(AtomicBool::new(true));
        let (Ok(mut table), Ok(root)) = (
            File::open("/proc/self/mountinfo"),
            root.try_clone_to_owned(),
        ) else {
            return Submounts { any };
        };
        let root = Root {
            fd: root,
            startup: startup.to_path_buf(),
        };
        any.store(beneath(&mut table, &root.path()), Ordering::SeqCst);
        let weak = Arc::downgrade(&any);
        let spawned = std::thread::Builder::new()
            .name("ferryd-mounts".into())
            .spawn(move || follow(table, &root, weak));
        if spawned.is_err() {
            // Not followed: check every call from now on.
            any.store(true, Ordering::SeqCst);
        }
        Submounts { any }
    }

    /// Whether any filesystem is mounted beneath the root, as of the last change to the
    /// mount table the watching thread has read (microseconds behind).
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }
}

/// The export root, as followed by the watching thread.
struct Root {
    fd: OwnedFd,
    /// Its path at startup: used if its current one cannot be read.
    startup: PathBuf,
}

impl Root {
    /// Where the root is now (renamed on the server's disk since the start, say).
    fn path(&self) -> PathBuf {
        let link = crate::sys::proc_fd_path(self.fd.as_fd());
        match std::fs::read_link(OsStr::from_bytes(link.as_bytes())) {
            Ok(p) if p.is_absolute() => p,
            _ => self.startup.clone(),
        }
    }
}

/// Re-read the table after every change until the [`Submounts`] is dropped (checked
/// once a second).
fn follow(mut table: File, root: &Root, any: Weak<AtomicBool>) {
    loop {
        let mut pfd = libc::pollfd {
            fd: table.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
        let Some(any) = any.upgrade() else { return };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            any.store(true, Ordering::SeqCst);
            return;
        }
        if n > 0 {
            any.store(beneath(&mut table, &root.path()), Ordering::SeqCst);
        }
    }
}

/// Whether the table lists a mount point beneath `root`. An unreadable table: yes.
fn beneath(table: &mut File, root: &Path) -> bool {
    let mut text = Vec::new();
    if table.rewind().is_err() || table.read_to_end(&mut text).is_err() {
        return true;
    }
    mount_points(&text).any(|p| strictly_beneath(&p, root))
}

/// The mount points (fifth field) of `/proc/self/mountinfo`, unescaped.
fn mount_points(text: &[u8]) -> impl Iterator<Item = PathBuf> + '_ {
    text.split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| PathBuf::from(OsStr::from_bytes(&unescape(field))))
}

/// The kernel writes space, tab, newline and backslash in mount points as `\ooo`.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

fn strictly_beneath(p: &Path, root: &Path) -> bool {
    p != root && p.starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const TABLE: &[u8] = b"\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw
40 22 0:40 / /srv/export/a\\040b rw - fuse.ferry ferry rw
41 22 0:41 / /srv/exported rw - tmpfs tmpfs rw
";

    #[test]
    fn mount_points_are_unescaped() {
        let points: Vec<PathBuf> = mount_points(TABLE).collect();
        assert_eq!(
            points,
            ["/", "/proc", "/srv/export/a b", "/srv/exported"].map(PathBuf::from)
        );
        assert_eq!(unescape(b"a\\134b\\011c\\0"), b"a\\b\tc\\0");
    }

    #[test]
    fn only_mounts_strictly_beneath_the_root_count() {
        let under = |root: &str| mount_points(TABLE).any(|p| strictly_beneath(&p, Path::new(root)));
        assert!(under("/srv/export"));
        // A sibling whose name starts the same, and the root's own mount, do not.
        assert!(!under("/srv/exported"));
        assert!(!under("/srv/export/a b"));
        assert!(!under("/home"));
        assert!(under("/"));
    }

    #[test]
    fn a_mount_made_after_the_start_is_seen() {
        // Watching a directory: the table's own answer, whatever it is, is current.
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        let fd = File::open(&root).expect("open the root");
        let s = Submounts::watch(fd.as_fd(), &root);
        assert!(
            !s.any(),
            "nothing is mounted beneath a new temporary directory"
        );
        let sub = root.join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        mount_and_see(&s, &sub, "the root");
    }

    /// The export directory renamed on the server's disk after the start: a mount
    /// beneath its new path is seen (the watcher looked at the startup path only).
    #[test]
    fn a_mount_beneath_the_renamed_root_is_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = std::fs::canonicalize(dir.path()).expect("canonical");
        let root = base.join("export");
        std::fs::create_dir(&root).expect("mkdir");
        let fd = File::open(&root).expect("open the root");
        let s = Submounts::watch(fd.as_fd(), &root);
        assert!(!s.any());
        let moved = base.join("moved");
        std::fs::rename(&root, &moved).expect("rename the root");
        let sub = moved.join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        mount_and_see(&s, &sub, "the renamed root");
    }

    /// Mounts a tmpfs on `sub` (beneath `where_`), and checks that `s` sees it come and
    /// go. Skipped (with a note) where this process may not mount.
    fn mount_and_see(s: &Submounts, sub: &std::path::Path, where_: &str) {
        let c = std::ffi::CString::new(sub.as_os_str().as_bytes()).expect("path");
        // SAFETY: valid C strings; a tmpfs mount on a directory of our own.
        let r = unsafe {
            libc::mount(
                c"none".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r != 0 {
            eprintln!(
                "note: cannot mount here ({}); skipped",
                std::io::Error::last_os_error()
            );
            return;
        }
        let seen = poll(|| s.any());
        // SAFETY: valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        assert!(seen, "a mount beneath {where_} was not seen in 5 s");
        assert!(poll(|| !s.any()), "its unmount was not seen in 5 s");
    }

    fn poll(mut f: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        f()
    }
}
