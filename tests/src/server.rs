//! [`TestServer`]: one `ferryd` exporting a fresh temp dir on `127.0.0.1:0`.
//!
//! The address comes from the one line `ferryd` prints on stdout once it accepts
//! connections (its last word). A reader thread hands that line over with a deadline and
//! then drains stdout so the server never blocks or dies writing to it. Its stderr goes to
//! a log file, printed when a test fails. Drop: SIGCONT (it may have been stopped by the
//! test), SIGTERM, a bounded wait, then SIGKILL.

use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::tail;
use crate::sys::kill;
use crate::wait::poll_until;

/// How long `ferryd` may take to print its address.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `ferryd` may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestServer {
    child: Child,
    exited: Option<ExitStatus>,
    addr: SocketAddr,
    args: Vec<String>,
    export: PathBuf,
    /// The temp dir the export is (removed on drop); `None` for a path the test owns.
    _export_dir: Option<TempDir>,
    log_path: PathBuf,
    // Holds the log file; declared last so it outlives nothing that needs it.
    _work: TempDir,
}

impl TestServer {
    /// `ferryd --listen 127.0.0.1:0 EXPORT`.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `ferryd --listen 127.0.0.1:0 ARGS… EXPORT`.
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_on(crate::temp_dir("export"), args)
    }

    /// Serves `export` (a temp dir the caller may have filled first).
    pub fn start_on(export: TempDir, args: &[&str]) -> Self {
        let path = export.path().to_path_buf();
        Self::serve(path, Some(export), args)
    }

    /// Serves `export`, a directory the caller owns and keeps until the server is
    /// dropped (another mount's mountpoint, say).
    pub fn start_at(export: &Path, args: &[&str]) -> Self {
        Self::serve(export.to_path_buf(), None, args)
    }

    fn serve(export: PathBuf, export_dir: Option<TempDir>, args: &[&str]) -> Self {
        crate::mount::cleanup_stale();
        let work = crate::temp_dir("work");
        let log_path = work.path().join("ferryd.log");
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        // Undo records in the test's own folder (removed with it), kept across restarts.
        if !args.iter().any(|a| a == "--state-dir") {
            let state = work.path().join("state");
            args.extend(["--state-dir".to_string(), state.display().to_string()]);
        }
        let (child, addr) = spawn(&export, "127.0.0.1:0", &args, &log_path);
        TestServer {
            child,
            exited: None,
            addr,
            args,
            export,
            _export_dir: export_dir,
            log_path,
            _work: work,
        }
    }

    /// Kills the server (if still running) and starts a new one with the same arguments
    /// on the same export and the same address, as an administrator restarting it would.
    pub fn restart(&mut self) {
        self.kill();
        let listen = self.addr.to_string();
        let (child, addr) = spawn(&self.export, &listen, &self.args, &self.log_path);
        assert_eq!(addr, self.addr, "restarted ferryd reports another address");
        self.child = child;
        self.exited = None;
    }

    /// [`TestServer::restart`] without the option `flag` and its value (a `--die-at`
    /// the next process must not inherit).
    pub fn restart_without(&mut self, flag: &str) {
        if let Some(i) = self.args.iter().position(|a| a == flag) {
            self.args.drain(i..(i + 2).min(self.args.len()));
        }
        self.restart();
    }

    /// The process of the next server, forked now and started by
    /// [`TestServer::restart_prepared`]: for a test that restarts the server while it
    /// has files of the mount open. A fork then would copy those descriptors, and the
    /// child's exec would close the copies: each close of a descriptor on a FUSE mount is
    /// a `FLUSH`, which commits the file's writes behind the test's back. (Hold
    /// [`crate::process::no_spawns`] meanwhile so that other tests do not fork either.)
    pub fn prepare_restart(&self) -> PreparedServer {
        let listen = self.addr.to_string();
        let (child, line, desc) = launch(&self.export, &listen, &self.args, &self.log_path, true);
        PreparedServer { child, line, desc }
    }

    /// [`TestServer::restart`] with a process forked earlier ([`TestServer::prepare_restart`]).
    pub fn restart_prepared(&mut self, mut next: PreparedServer) {
        use std::io::Write;
        self.kill();
        let go = next
            .child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(b"go\n");
        go.unwrap_or_else(|e| panic!("starting the prepared ferryd: {e}"));
        let (child, addr) = wait_addr(next.child, next.line, &next.desc, &self.log_path);
        assert_eq!(addr, self.addr, "restarted ferryd reports another address");
        self.child = child;
        self.exited = None;
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address as `ferry` takes it on its command line.
    pub fn remote(&self) -> String {
        self.addr.to_string()
    }

    pub fn export_path(&self) -> &Path {
        &self.export
    }

    /// `rel` inside the export.
    pub fn export(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.export.join(rel)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal (SIGSTOP, SIGCONT, …) without waiting for anything.
    /// Sends `sig`; for SIGSTOP, returns once every thread of the server is stopped (a
    /// thread running on another CPU finishes what it is doing first, and could still
    /// answer a request sent right after `kill` returned).
    pub fn signal(&self, sig: i32) {
        if self.exited.is_some() {
            return;
        }
        kill(self.pid(), sig);
        if sig == libc::SIGSTOP {
            let stopped = crate::poll_until(std::time::Duration::from_secs(10), || {
                all_threads_stopped(self.pid())
            });
            assert!(stopped, "ferryd {} did not stop after SIGSTOP", self.pid());
        }
    }

    /// SIGKILL and reap: the server dies without closing anything itself.
    pub fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// SIGTERM, then waits up to [`STOP_TIMEOUT`]; `None` if it was still running then
    /// (it is SIGKILLed).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.exited {
            return Some(s);
        }
        kill(self.pid(), libc::SIGCONT);
        kill(self.pid(), libc::SIGTERM);
        let mut status = None;
        poll_until(STOP_TIMEOUT, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_none() {
            self.kill();
            return None;
        }
        self.exited = status;
        status
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited.is_none()
    }

    /// Its `--state-dir` (undo and redo records, the answers log).
    pub fn state_dir(&self) -> PathBuf {
        let at = self.args.iter().position(|a| a == "--state-dir");
        let dir = at.and_then(|i| self.args.get(i + 1));
        PathBuf::from(dir.expect("a --state-dir"))
    }

    /// What `ferryd` wrote to stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }
}

/// A `ferryd` process forked but not started yet ([`TestServer::prepare_restart`]):
/// a shell that waits for a line on its standard input, then becomes `ferryd`.
pub struct PreparedServer {
    child: Child,
    line: mpsc::Receiver<Option<String>>,
    desc: String,
}

/// Starts `ferryd --listen LISTEN ARGS… EXPORT` (stderr appended to `log_path`) and
/// returns it with the address it printed; panics (showing the log) if it prints none.
fn spawn(export: &Path, listen: &str, args: &[String], log_path: &Path) -> (Child, SocketAddr) {
    let (child, line, desc) = launch(export, listen, args, log_path, false);
    wait_addr(child, line, &desc, log_path)
}

/// Forks `ferryd` (`held`: a shell that execs it once a line arrives on its stdin), and
/// a thread that hands over the first line it prints.
fn launch(
    export: &Path,
    listen: &str,
    args: &[String],
    log_path: &Path,
    held: bool,
) -> (Child, mpsc::Receiver<Option<String>>, String) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("opening the ferryd log file");
    let mut cmd = if held {
        let mut sh = std::process::Command::new("sh");
        sh.arg("-c")
            .arg("read -r _ && exec \"$@\" </dev/null")
            .arg("sh")
            .arg(crate::bins::ferryd_bin())
            .stdin(Stdio::piped());
        sh
    } else {
        crate::bins::ferryd()
    };
    cmd.arg("--listen")
        .arg(listen)
        .args(args)
        .arg(export)
        .stdout(Stdio::piped())
        .stderr(log);
    // If the test process dies without running its destructors (killed by a CI timeout),
    // its servers go with it: a mount left behind then fails fast instead of serving.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let desc = crate::process::describe(&cmd);
    let mut child =
        crate::process::spawn(&mut cmd).unwrap_or_else(|e| panic!("cannot spawn `{desc}`: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let first = match reader.read_line(&mut line) {
            Ok(n) if n > 0 => Some(line),
            _ => None,
        };
        let _ = tx.send(first);
        let _ = io::copy(&mut reader, &mut io::sink());
    });
    (child, rx, desc)
}

/// The address `child` ([`launch`]) printed; panics (showing the log) if it prints none.
fn wait_addr(
    mut child: Child,
    rx: mpsc::Receiver<Option<String>>,
    desc: &str,
    log_path: &Path,
) -> (Child, SocketAddr) {
    let fail = |child: &mut Child, why: String| -> ! {
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read(log_path).unwrap_or_default();
        panic!(
            "`{desc}`: {why}\n--- ferryd stderr ---\n{}",
            tail(&log, 8192)
        );
    };
    let line = match rx.recv_timeout(START_TIMEOUT) {
        Ok(Some(line)) => line,
        Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
            let status = child.try_wait().ok().flatten();
            fail(
                &mut child,
                format!("closed stdout without printing its address (exit: {status:?})"),
            )
        }
        Err(mpsc::RecvTimeoutError::Timeout) => fail(
            &mut child,
            format!("printed no address line within {START_TIMEOUT:?}"),
        ),
    };
    match line
        .split_whitespace()
        .last()
        .and_then(|w| w.parse::<SocketAddr>().ok())
    {
        Some(addr) => (child, addr),
        None => fail(
            &mut child,
            format!("the last word of its first stdout line is not an address: {line:?}"),
        ),
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = std::fs::read(&self.log_path).unwrap_or_default();
            eprintln!(
                "--- ferryd {} stderr ---\n{}\n--- end of ferryd stderr ---",
                self.addr,
                tail(&log, 16384)
            );
        }
    }
}

/// Whether every thread of `pid` is in state T (stopped), from `/proc/PID/task/*/stat`.
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
        })
    })
}
