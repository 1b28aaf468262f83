//! Running commands with a timeout. Output goes to unnamed temp files, not pipes: a
//! command that leaves a daemon behind (`ferry mount`) would otherwise keep the pipe open
//! and a reader waiting for end-of-file would wait forever. We wait for the *process*.
//! A command that runs over its timeout is killed with its whole process group.
//!
//! Every process the tests start is spawned through [`spawn`], under a lock that a test
//! may hold exclusively ([`no_spawns`]): a forked child holds copies of all of this
//! process's descriptors until its exec closes them, and on a FUSE mount each such close
//! is a `FLUSH`, which ferry answers by committing the file's writes. A test that checks
//! what its *own* close does (commit, or report a failure) keeps other tests' spawns out
//! of the way while its files are open.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{PoisonError, RwLock, RwLockWriteGuard, mpsc};
use std::time::{Duration, Instant};

/// Held shared while spawning, exclusively by [`no_spawns`].
static SPAWNING: RwLock<()> = RwLock::new(());

/// `cmd.spawn()`, waiting while some test holds [`no_spawns`]. (`spawn` returns once the
/// child has exec'd, so its copies of our descriptors are closed by then.)
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let _shared = SPAWNING.read().unwrap_or_else(PoisonError::into_inner);
    cmd.spawn()
}

/// A child killed (with its process group, if it leads one) on drop, unless it exited.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            crate::sys::kill(-(self.0.id() as i32), libc::SIGKILL);
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// No process is spawned through [`spawn`] (by any test of this binary) until the guard
/// is dropped. Must not be held across a spawn of one's own: that would deadlock.
pub fn no_spawns() -> RwLockWriteGuard<'static, ()> {
    SPAWNING.write().unwrap_or_else(PoisonError::into_inner)
}

/// Timeout of [`run`] and [`run_stdin`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// What a finished command did.
pub struct Output {
    /// The command line, for messages.
    pub desc: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics (showing everything) unless the command exited 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "command failed: {self}");
        self
    }

    /// Panics (showing everything) if the command exited 0.
    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(!self.success(), "command unexpectedly succeeded: {self}");
        self
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` -> {} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.desc,
            self.status,
            self.elapsed,
            tail(&self.stdout, 8192),
            tail(&self.stderr, 8192)
        )
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A command that did not finish in time (it was killed).
#[derive(Debug)]
pub struct TimedOut {
    pub desc: String,
    pub after: Duration,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` did not finish within {:?} and was killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.desc,
            self.after,
            tail(&self.stdout, 8192),
            tail(&self.stderr, 8192)
        )
    }
}

/// The last `max` bytes of `bytes`, lossily decoded.
pub fn tail(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    let mut s = String::from_utf8_lossy(&bytes[start..]).into_owned();
    if start > 0 {
        s.insert_str(0, "[…]");
    }
    s
}

/// `sh -c script`.
pub fn sh(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    cmd
}

/// Runs `cmd` to completion (standard input closed) within [`DEFAULT_TIMEOUT`]; panics if
/// it runs over. Whatever the exit status, returns the output.
#[track_caller]
pub fn run(cmd: &mut Command) -> Output {
    run_timeout(cmd, None, DEFAULT_TIMEOUT).unwrap_or_else(|t| panic!("{t}"))
}

/// [`run`] with `input` fed to standard input.
#[track_caller]
pub fn run_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    run_timeout(cmd, Some(input), DEFAULT_TIMEOUT).unwrap_or_else(|t| panic!("{t}"))
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if let Some(dir) = cmd.get_current_dir() {
        s.push_str(&format!("  (in {})", dir.display()));
    }
    s
}

fn read_all(mut f: &File) -> Vec<u8> {
    let mut v = Vec::new();
    if f.seek(SeekFrom::Start(0)).is_ok() {
        let _ = f.read_to_end(&mut v);
    }
    v
}

/// Runs `cmd` in its own process group with `input` (or nothing) on standard input.
/// `Err` if it did not finish within `timeout`: the group was killed.
pub fn run_timeout(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, TimedOut> {
    let desc = describe(cmd);
    let out = tempfile::tempfile().expect("a temp file for stdout");
    let err = tempfile::tempfile().expect("a temp file for stderr");
    cmd.stdout(out.try_clone().expect("dup stdout file"))
        .stderr(err.try_clone().expect("dup stderr file"))
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .process_group(0);
    let start = Instant::now();
    let mut child = spawn(cmd).unwrap_or_else(|e| panic!("cannot spawn `{desc}`: {e}"));
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        let input = input.to_vec();
        // A writer thread: the child may not read all of it, or only after writing a lot.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    // The process stdin/stdout/stderr handles of `cmd` hold our file clones; drop them so
    // they do not outlive this call inside `cmd`.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    match wait_timeout(child, timeout) {
        Some(status) => Ok(Output {
            desc,
            status,
            stdout: read_all(&out),
            stderr: read_all(&err),
            elapsed: start.elapsed(),
        }),
        None => Err(TimedOut {
            desc,
            after: timeout,
            stdout: read_all(&out),
            stderr: read_all(&err),
        }),
    }
}

/// Waits for `child` at most `timeout`. On timeout, SIGKILLs its process group (the child
/// must lead one, see [`CommandExt::process_group`]) and the child itself, reaps it if it
/// dies within a few seconds, and returns `None`.
pub fn wait_timeout(mut child: Child, timeout: Duration) -> Option<ExitStatus> {
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(status)) => Some(status),
        Ok(Err(e)) => panic!("waiting for pid {pid}: {e}"),
        Err(_) => {
            crate::sys::kill(-pid, libc::SIGKILL);
            crate::sys::kill(pid, libc::SIGKILL);
            // Reap it if it can die (a process stuck in a FUSE call may not, yet).
            let _ = rx.recv_timeout(Duration::from_secs(5));
            None
        }
    }
}
