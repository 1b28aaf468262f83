//! [`TestMount`]: `ferry mount REMOTE MOUNTPOINT` on a fresh temp dir, undone on `Drop`
//! whatever happened: `ferry umount`, then (if still mounted) an abort of the FUSE
//! connection and a lazy unmount, then SIGKILL for a daemon that did not exit.
//!
//! The daemon is found by its command line (a `ferry` process with the mountpoint among its
//! arguments): the mountpoint's name is unique, so this never hits another test's daemon.
//! A watchdog per mount force-unmounts it when a test runs far too long, so a hung FUSE
//! call fails its test instead of hanging the whole suite.
//!
//! [`cleanup_stale`] removes what a crashed run left: mounts, processes and temp dirs
//! whose `ferry-test-<pid>-` names a pid that no longer exists.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Once, mpsc};
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{run_timeout, tail, wait_timeout};
use crate::server::TestServer;
use crate::sys::{kill, pid_running, umount_detach};
use crate::wait::poll_until;

/// How long `ferry mount` may take to return.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `ferry umount` may take.
pub const UMOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon may take to exit once its mount is gone.
pub const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default lifetime of a mount before its watchdog force-unmounts it; override with
/// `FERRY_TEST_WATCHDOG_SECS`.
pub const WATCHDOG_DEFAULT: Duration = Duration::from_secs(180);

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub major: u32,
    pub minor: u32,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    pub options: String,
}

impl MountEntry {
    pub fn is_fuse(&self) -> bool {
        self.fstype == "fuse" || self.fstype == "fuseblk" || self.fstype.starts_with("fuse.")
    }
}

/// `\040`-style escapes of mountinfo back to bytes.
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (pre, post) = line.split_once(" - ")?;
    let f: Vec<&str> = pre.split(' ').collect();
    let (major, minor) = f.get(2)?.split_once(':')?;
    let mut p = post.split(' ');
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mount_point: unescape(f.get(4)?),
        options: f.get(5).copied().unwrap_or("").to_string(),
        fstype: p.next()?.to_string(),
        source: p.next().unwrap_or("").to_string(),
    })
}

/// The current mount table of this process's namespace.
pub fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(parse_mountinfo_line)
        .collect()
}

/// The (topmost) mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mount_point == path)
}

/// Whether anything is mounted at exactly `path`.
pub fn is_mounted(path: &Path) -> bool {
    mount_at(path).is_some()
}

/// Pids of processes (other than this one) whose command line satisfies `pred`.
pub fn processes(pred: impl Fn(&[OsString]) -> bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<OsString> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| OsString::from_vec(a.to_vec()))
            .collect();
        if !args.is_empty() && pred(&args) {
            pids.push(pid);
        }
    }
    pids
}

fn argv0_is(args: &[OsString], names: &[&str]) -> bool {
    Path::new(&args[0])
        .file_name()
        .is_some_and(|n| names.iter().any(|w| n == OsStr::new(w)))
}

fn same_path_arg(arg: &OsStr, path: &Path) -> bool {
    let a = arg.as_bytes();
    let a = if a.len() > 1 {
        a.strip_suffix(b"/").unwrap_or(a)
    } else {
        a
    };
    a == path.as_os_str().as_bytes()
}

/// Pids of `ferry` processes serving (or mounting) `mountpoint`.
pub fn daemons_of(mountpoint: &Path) -> Vec<i32> {
    processes(|args| {
        argv0_is(args, &["ferry"]) && args.iter().any(|a| same_path_arg(a, mountpoint))
    })
}

/// Aborts the FUSE connection behind the mount at `mountpoint` through fusectl (mounting
/// fusectl when it is not): every pending and future request fails with ENOTCONN.
pub fn abort_fuse_connection(mountpoint: &Path) -> bool {
    let Some(m) = mount_at(mountpoint).filter(MountEntry::is_fuse) else {
        return false;
    };
    let conns = Path::new("/sys/fs/fuse/connections");
    let dev = (m.major << 20) | m.minor;
    let abort = conns.join(dev.to_string()).join("abort");
    if !abort.exists() && conns.is_dir() && !mounts().iter().any(|e| e.fstype == "fusectl") {
        let (src, target, fstype) = (
            crate::sys::cstr(Path::new("fusectl")),
            crate::sys::cstr(conns),
            crate::sys::cstr(Path::new("fusectl")),
        );
        // SAFETY: valid NUL-terminated strings; no data argument.
        unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            );
        }
    }
    std::fs::write(abort, "1").is_ok()
}

/// Last resort: kill the daemons, abort the connection, detach the mount.
pub fn force_unmount(mountpoint: &Path) {
    for pid in daemons_of(mountpoint) {
        kill(pid, libc::SIGKILL);
    }
    abort_fuse_connection(mountpoint);
    // Several layers may be stacked on one mountpoint (a mount that "succeeded" twice).
    for _ in 0..4 {
        if !is_mounted(mountpoint) || umount_detach(mountpoint).is_err() {
            break;
        }
    }
}

/// The pid in a `ferry-test-<pid>-…` component of `path`, if any.
fn owner_pid(path: &Path) -> Option<i32> {
    path.components().find_map(|c| {
        let s = c.as_os_str().to_str()?;
        let rest = s.strip_prefix(crate::TEMP_PREFIX)?;
        rest.split('-').next()?.parse().ok()
    })
}

/// Once per process: unmount, kill and remove what earlier runs that died left behind
/// (anything named `ferry-test-<pid>-` for a pid that is gone or a zombie). Never touches
/// what a live run (a concurrent `cargo test`) owns. `FERRY_TEST_KEEP_STALE=1` skips it.
pub fn cleanup_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("FERRY_TEST_KEEP_STALE").is_some_and(|v| v == "1") {
            return;
        }
        let me = std::process::id() as i32;
        let stale = |p: &Path| owner_pid(p).is_some_and(|pid| pid != me && !pid_running(pid));
        for m in mounts() {
            if stale(&m.mount_point) {
                eprintln!("cleaning up stale mount {}", m.mount_point.display());
                force_unmount(&m.mount_point);
            }
        }
        let leftovers = processes(|args| {
            argv0_is(args, &["ferry", "ferryd"]) && args.iter().any(|a| stale(Path::new(a)))
        });
        for pid in leftovers {
            eprintln!("killing stale ferry process {pid}");
            kill(pid, libc::SIGCONT);
            kill(pid, libc::SIGKILL);
        }
        let table = mounts();
        if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
            for entry in dir.flatten() {
                let path = entry.path();
                let busy = table.iter().any(|m| m.mount_point.starts_with(&path));
                if stale(&path) && !busy {
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
    });
}

fn watchdog_limit() -> Duration {
    std::env::var("FERRY_TEST_WATCHDOG_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(WATCHDOG_DEFAULT)
}

/// A FUSE mount of a ferry export, unmounted on drop.
pub struct TestMount {
    path: PathBuf,
    log_path: PathBuf,
    /// Dropping it stops the watchdog.
    watchdog: Option<mpsc::Sender<()>>,
    unmounted: bool,
    /// `XDG_CACHE_HOME` of the mount's daemon: its data cache is `<this>/ferry/<export-id>/`.
    cache_home: PathBuf,
    _work: TempDir,
    /// Taken in `drop`: removed only when nothing is mounted on it any more.
    mountpoint: Option<TempDir>,
}

impl TestMount {
    /// `ferry mount SERVER MOUNTPOINT`; panics (with both logs) unless it returns 0 and the
    /// mount is listed in mountinfo.
    pub fn new(server: &TestServer) -> Self {
        Self::with_args(server, &[])
    }

    /// `ferry mount ARGS… SERVER MOUNTPOINT`.
    pub fn with_args(server: &TestServer, args: &[&str]) -> Self {
        match Self::try_mount(&server.remote(), args) {
            Ok(m) => m,
            Err(e) => panic!(
                "{e}\n--- ferryd stderr ---\n{}",
                tail(server.log().as_bytes(), 8192)
            ),
        }
    }

    /// `ferry mount ARGS… REMOTE MOUNTPOINT` on a fresh mountpoint; `Err` describes why
    /// there is no usable mount (everything it may have left is cleaned up already).
    pub fn try_mount(remote: &str, args: &[&str]) -> Result<Self, String> {
        Self::try_mount_in(remote, args, None)
    }

    /// `ferry mount ARGS… SERVER MOUNTPOINT` with `XDG_CACHE_HOME=cache_home`: a later
    /// mount given the same dir finds the data cache this one leaves behind (the caller
    /// owns the dir; it must outlive the mounts using it).
    pub fn with_cache_home(server: &TestServer, args: &[&str], cache_home: &Path) -> Self {
        match Self::try_mount_in(&server.remote(), args, Some(cache_home)) {
            Ok(m) => m,
            Err(e) => panic!(
                "{e}\n--- ferryd stderr ---\n{}",
                tail(server.log().as_bytes(), 8192)
            ),
        }
    }

    /// [`TestMount::try_mount`] with `XDG_CACHE_HOME` set to `cache_home`, or (`None`) to
    /// a fresh dir of this mount's own.
    pub fn try_mount_in(
        remote: &str,
        args: &[&str],
        cache_home: Option<&Path>,
    ) -> Result<Self, String> {
        Self::try_mount_on(crate::temp_dir("mnt"), remote, args, cache_home)
    }

    /// [`TestMount::try_mount_in`] on `mountpoint` (an empty dir the caller made, e.g.
    /// inside another server's export); removed after the unmount.
    pub fn try_mount_on(
        mountpoint: TempDir,
        remote: &str,
        args: &[&str],
        cache_home: Option<&Path>,
    ) -> Result<Self, String> {
        Self::try_mount_through(&[], mountpoint, remote, args, cache_home)
    }

    /// [`TestMount::try_mount_on`] with `ferry mount` run by the command `wrapper`
    /// (e.g. `setpriv` with its options) instead of directly.
    pub fn try_mount_through(
        wrapper: &[&str],
        mountpoint: TempDir,
        remote: &str,
        args: &[&str],
        cache_home: Option<&Path>,
    ) -> Result<Self, String> {
        let mut m = Self::guard(mountpoint);
        if let Some(home) = cache_home {
            m.cache_home = home.to_path_buf();
        }
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args)
                    .arg(crate::bins::ferry_bin())
                    .stdin(Stdio::null());
                cmd
            }
            None => crate::bins::ferry(),
        };
        cmd.arg("mount")
            .args(args)
            .arg(remote)
            .arg(&m.path)
            .env("XDG_CACHE_HOME", &m.cache_home);
        let desc = crate::process::describe(&cmd);
        let log = File::create(&m.log_path).expect("creating the mount log");
        // The daemon inherits these: its later complaints land in the same log.
        cmd.stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .process_group(0);
        let child = crate::process::spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("cannot spawn `{desc}`: {e}"));
        drop(cmd);
        match wait_timeout(child, MOUNT_TIMEOUT) {
            Some(s) if s.success() => {}
            Some(s) => return Err(format!("`{desc}` failed ({s}):\n{}", m.log())),
            None => {
                return Err(format!(
                    "`{desc}` did not return within {MOUNT_TIMEOUT:?}:\n{}",
                    m.log()
                ));
            }
        }
        if !mount_at(&m.path).is_some_and(|e| e.is_fuse()) {
            return Err(format!(
                "`{desc}` returned 0 but no FUSE mount is listed at {} in /proc/self/mountinfo\n{}",
                m.path.display(),
                m.log()
            ));
        }
        Ok(m)
    }

    /// A mount object for `mountpoint` without mounting anything: whatever gets mounted
    /// there (a foreground `ferry mount` the test runs itself, a mount that should have
    /// failed) is cleaned up on drop, and forced down by the watchdog if the test hangs.
    pub fn guard(mountpoint: TempDir) -> Self {
        cleanup_stale();
        let work = crate::temp_dir("work");
        let mut m = TestMount {
            path: mountpoint.path().to_path_buf(),
            log_path: work.path().join("mount.log"),
            watchdog: None,
            unmounted: false,
            cache_home: work.path().join("cache"),
            _work: work,
            mountpoint: Some(mountpoint),
        };
        m.start_watchdog();
        m
    }

    fn start_watchdog(&mut self) {
        let (tx, rx) = mpsc::channel::<()>();
        let path = self.path.clone();
        let limit = watchdog_limit();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "watchdog: {} still mounted after {limit:?}; forcing it down so the test fails instead of hanging",
                    path.display()
                );
                force_unmount(&path);
            }
        });
        self.watchdog = Some(tx);
    }

    /// The mountpoint.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` inside the mount.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// What `ferry mount` and its daemon wrote so far.
    pub fn log(&self) -> String {
        let bytes = std::fs::read(&self.log_path).unwrap_or_default();
        tail(&bytes, 16384)
    }

    /// The `XDG_CACHE_HOME` the mount's daemon was started with.
    pub fn cache_home(&self) -> &Path {
        &self.cache_home
    }

    /// `ferry stats MOUNTPOINT --json`, parsed; panics unless it succeeds.
    #[track_caller]
    pub fn stats(&self) -> crate::stats::Stats {
        crate::stats::Stats::of(&self.path)
    }

    /// Pids of the `ferry` processes serving this mount.
    pub fn daemon_pids(&self) -> Vec<i32> {
        daemons_of(&self.path)
    }

    /// Whether the mount is still listed in mountinfo.
    pub fn is_mounted(&self) -> bool {
        is_mounted(&self.path)
    }

    /// `ferry umount MOUNTPOINT`, checked: it must exit 0, the mount must be gone from
    /// mountinfo and the daemon must exit. `Err` says what went wrong (`Drop` still cleans).
    pub fn unmount(&mut self) -> Result<(), String> {
        // A process another test forks holds copies of this test's descriptors until
        // it execs: the mount can be busy for that moment, and is tried again.
        let mut last = Err("`ferry umount` did not run".to_string());
        poll_until(UMOUNT_TIMEOUT, || {
            let mut cmd = crate::bins::ferry();
            cmd.arg("umount").arg(&self.path);
            match run_timeout(&mut cmd, None, UMOUNT_TIMEOUT) {
                Ok(out) if out.success() => {
                    last = Ok(());
                    true
                }
                Ok(out) => {
                    last = Err(format!("{out}"));
                    !out.stderr_str().contains("busy")
                }
                Err(t) => {
                    last = Err(t.to_string());
                    true
                }
            }
        });
        last?;
        if !poll_until(Duration::from_secs(5), || !self.is_mounted()) {
            return Err(format!(
                "`ferry umount` exited 0 but {} is still in mountinfo",
                self.path.display()
            ));
        }
        if !poll_until(DAEMON_EXIT_TIMEOUT, || self.daemon_pids().is_empty()) {
            return Err(format!(
                "daemon(s) {:?} still running {DAEMON_EXIT_TIMEOUT:?} after unmount",
                self.daemon_pids()
            ));
        }
        self.unmounted = true;
        self.watchdog = None;
        Ok(())
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        self.watchdog = None;
        if !self.unmounted {
            if self.is_mounted() {
                let mut cmd = crate::bins::ferry();
                cmd.arg("umount").arg(&self.path).stdin(Stdio::null());
                match run_timeout(&mut cmd, None, UMOUNT_TIMEOUT) {
                    Ok(o) if o.success() => {}
                    Ok(o) => eprintln!("cleanup: {o}"),
                    Err(t) => eprintln!("cleanup: {t}"),
                }
            }
            if self.is_mounted() {
                eprintln!(
                    "cleanup: {} still mounted after `ferry umount`; aborting and detaching",
                    self.path.display()
                );
                force_unmount(&self.path);
            }
            if !poll_until(DAEMON_EXIT_TIMEOUT, || self.daemon_pids().is_empty()) {
                let pids = self.daemon_pids();
                eprintln!("cleanup: killing daemon(s) {pids:?} that outlived the mount");
                for pid in pids {
                    kill(pid, libc::SIGKILL);
                }
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- ferry mount {} log ---\n{}\n--- end of mount log ---",
                self.path.display(),
                self.log()
            );
        }
        let mountpoint = self.mountpoint.take();
        if self.is_mounted() {
            eprintln!(
                "cleanup: {} is still mounted; leaving the directory in place",
                self.path.display()
            );
            if let Some(m) = mountpoint {
                let _ = m.keep();
            }
        }
    }
}
