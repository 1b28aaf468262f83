//! The command line: `ferry ls/get/put/shell` round trips, `ferry mount`/`umount` and
//! their failures (one line on stderr, non-zero exit, nothing left mounted), usage errors
//! (exit 2), `ferryd` start and stop.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use ferry_tests::mount::{self, TestMount};
use ferry_tests::process::KillOnDrop;
use ferry_tests::rng::Rng;
use ferry_tests::{
    TestServer, ferry, ferryd, poll_until, require_fuse, run, run_stdin, run_timeout, sh, temp_dir,
    wait_for,
};

/// Whether some line of a `ferry ls` listing names `name` (as its last word, `/` for dirs).
fn lists(listing: &str, name: &str) -> bool {
    listing.lines().any(|l| {
        l.split_whitespace()
            .last()
            .is_some_and(|w| w == name || w.strip_suffix('/') == Some(name))
    })
}

/// The non-empty lines of a stream.
fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// An address where nothing listens (a port just released).
fn dead_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr.to_string()
}

#[test]
fn ls_lists_a_directory() {
    let server = TestServer::start();
    fs::write(server.export("a.txt"), b"abc").expect("write");
    fs::create_dir_all(server.export("sub/deeper")).expect("mkdir");
    fs::write(server.export("sub/inner"), b"12345").expect("write");
    let out = run(ferry().args(["ls", &server.remote()]));
    out.assert_success();
    let text = out.stdout_str();
    assert!(lists(&text, "a.txt") && lists(&text, "sub"), "{out}");
    assert_eq!(lines(&text).len(), 2, "{out}");
    let a = text
        .lines()
        .find(|l| lists(l, "a.txt"))
        .expect("a.txt line");
    assert!(
        a.split_whitespace().any(|w| w == "3"),
        "size of a.txt not shown: {a}"
    );
    let out = run(ferry().args(["ls", &server.remote(), "sub"]));
    out.assert_success();
    assert!(
        lists(&out.stdout_str(), "inner") && lists(&out.stdout_str(), "deeper"),
        "{out}"
    );
    let out = run(ferry().args(["ls", &server.remote(), "missing"]));
    out.assert_failure();
    assert!(!out.stderr.is_empty(), "no message: {out}");
    assert!(out.stdout.is_empty(), "{out}");
}

#[test]
fn get_and_put_round_trip() {
    let server = TestServer::start();
    let local = temp_dir("local");
    let cwd = temp_dir("local");
    // Bigger than one request (MAX_IO is 4 MiB) and not a multiple of anything.
    let data = Rng::new(77).bytes((5 << 20) + 12345);
    let src = local.path().join("blob.bin");
    fs::write(&src, &data).expect("write");
    // put LOCAL PATH, put LOCAL (default: its base name), put into a subdirectory.
    run(ferry()
        .args(["put", &server.remote()])
        .arg(&src)
        .arg("remote.bin"))
    .assert_success();
    assert!(
        fs::read(server.export("remote.bin")).expect("export") == data,
        "put: content differs"
    );
    run(ferry()
        .current_dir(cwd.path())
        .args(["put", &server.remote()])
        .arg(&src))
    .assert_success();
    assert!(
        fs::read(server.export("blob.bin")).expect("export") == data,
        "put default name"
    );
    fs::create_dir(server.export("sub")).expect("mkdir");
    run(ferry()
        .args(["put", &server.remote()])
        .arg(&src)
        .arg("sub/in.bin"))
    .assert_success();
    assert!(fs::read(server.export("sub/in.bin")).expect("export") == data);
    // get PATH LOCAL, get PATH (default: base name in the current directory).
    let dst = local.path().join("back.bin");
    run(ferry()
        .args(["get", &server.remote(), "remote.bin"])
        .arg(&dst))
    .assert_success();
    assert!(
        fs::read(&dst).expect("local") == data,
        "get: content differs"
    );
    run(ferry()
        .current_dir(cwd.path())
        .args(["get", &server.remote(), "sub/in.bin"]))
    .assert_success();
    assert!(
        fs::read(cwd.path().join("in.bin")).expect("local") == data,
        "get default name"
    );
    // Empty files, and overwriting a longer file with a shorter one (no stale tail).
    fs::write(local.path().join("empty"), b"").expect("write");
    run(ferry()
        .args(["put", &server.remote()])
        .arg(local.path().join("empty"))
        .arg("e"))
    .assert_success();
    assert_eq!(fs::read(server.export("e")).expect("export"), b"");
    fs::write(local.path().join("short"), b"short").expect("write");
    run(ferry()
        .args(["put", &server.remote()])
        .arg(local.path().join("short"))
        .arg("remote.bin"))
    .assert_success();
    assert_eq!(
        fs::read(server.export("remote.bin")).expect("export"),
        b"short"
    );
    run(ferry()
        .args(["get", &server.remote(), "remote.bin"])
        .arg(&dst))
    .assert_success();
    assert_eq!(fs::read(&dst).expect("local"), b"short");
}

#[test]
fn get_and_put_failures_are_reported() {
    let server = TestServer::start();
    let local = temp_dir("local");
    let dst = local.path().join("never");
    let out = run(ferry()
        .args(["get", &server.remote(), "missing.txt"])
        .arg(&dst));
    out.assert_failure();
    let msg = out.stderr_str().to_lowercase();
    assert!(
        msg.contains("missing.txt") || msg.contains("no such file") || msg.contains("not found"),
        "unclear message: {out}"
    );
    assert_eq!(
        lines(&out.stderr_str()).len(),
        1,
        "expected a one-line message: {out}"
    );
    assert!(!dst.exists(), "a failed get left {}", dst.display());
    let out = run(ferry().args(["get", &server.remote(), ""]).arg(&dst));
    out.assert_failure();
    fs::create_dir(server.export("adir")).expect("mkdir");
    let out = run(ferry().args(["get", &server.remote(), "adir"]).arg(&dst));
    out.assert_failure();
    assert!(!dst.exists());
    let out = run(ferry()
        .args(["put", &server.remote()])
        .arg(local.path().join("no-such-local-file"))
        .arg("x"));
    out.assert_failure();
    assert!(!out.stderr.is_empty(), "{out}");
    assert!(!server.export("x").exists());
    fs::write(local.path().join("f"), b"f").expect("write");
    let out = run(ferry()
        .args(["put", &server.remote()])
        .arg(local.path().join("f"))
        .arg("no/such/dir/f"));
    out.assert_failure();
    let out = run(ferry().args(["ls", &dead_addr()]));
    out.assert_failure();
    assert!(
        out.elapsed < Duration::from_secs(10),
        "ls of a dead server took {:?}",
        out.elapsed
    );
}

#[test]
fn shell_session_through_stdin() {
    let server = TestServer::start();
    fs::create_dir(server.export("sub")).expect("mkdir");
    fs::write(server.export("sub/inner"), b"inside").expect("write");
    let local = temp_dir("local");
    let cwd = temp_dir("local");
    let up = local.path().join("up.txt");
    fs::write(&up, b"uploaded through the shell").expect("write");
    let down = local.path().join("down.txt");
    let script = format!(
        "help\ndir\nput {up}\nput {up} renamed.txt\ndir\ndir sub\nget renamed.txt {down}\nget up.txt\nclose\n",
        up = up.display(),
        down = down.display()
    );
    let out = run_stdin(
        ferry()
            .current_dir(cwd.path())
            .args(["shell", &server.remote()]),
        script.as_bytes(),
    );
    out.assert_success();
    let text = out.stdout_str();
    for word in ["dir", "get", "put", "close"] {
        assert!(text.contains(word), "help does not mention {word}: {out}");
    }
    assert!(lists(&text, "sub"), "dir did not list sub: {out}");
    assert!(
        lists(&text, "up.txt") && lists(&text, "renamed.txt"),
        "{out}"
    );
    assert!(lists(&text, "inner"), "dir sub did not list inner: {out}");
    assert_eq!(
        fs::read(server.export("up.txt")).expect("export"),
        b"uploaded through the shell"
    );
    assert_eq!(
        fs::read(server.export("renamed.txt")).expect("export"),
        b"uploaded through the shell"
    );
    assert_eq!(
        fs::read(&down).expect("local"),
        b"uploaded through the shell"
    );
    assert_eq!(
        fs::read(cwd.path().join("up.txt")).expect("local"),
        b"uploaded through the shell"
    );

    // An error does not end the session; end of input does.
    let out = run_stdin(
        ferry()
            .current_dir(cwd.path())
            .args(["shell", &server.remote()]),
        b"get missing\ndir sub\n",
    );
    assert!(
        (out.stderr_str() + &out.stdout_str())
            .to_lowercase()
            .contains("missing"),
        "no error for a missing file: {out}"
    );
    assert!(
        lists(&out.stdout_str(), "inner"),
        "the session ended at the error: {out}"
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["frobnicate"][..],
        &["mount"][..],
        &["mount", "127.0.0.1:1"][..],
        &["get"][..],
        &["put", "127.0.0.1:1"][..],
        &["ls", "127.0.0.1:1", "a", "b", "c"][..],
        &["umount"][..],
        &["--no-such-flag"][..],
    ] {
        let out = run(ferry().args(args));
        assert_eq!(out.code(), Some(2), "ferry {args:?}: {out}");
        assert!(
            !out.stderr.is_empty(),
            "ferry {args:?} printed no usage: {out}"
        );
    }
    for args in [&[][..], &["--no-such-flag", "/tmp"][..]] {
        let out = run(ferryd().args(args));
        assert_eq!(out.code(), Some(2), "ferryd {args:?}: {out}");
    }
}

#[test]
fn ferryd_stops_on_sigterm_and_rejects_a_missing_dir() {
    let mut server = TestServer::start();
    let status = server
        .stop()
        .expect("ferryd did not exit within 10 s of SIGTERM");
    assert!(status.success(), "ferryd exited with {status} on SIGTERM");
    let out = run(ferryd().args(["--listen", "127.0.0.1:0", "/nonexistent/ferry/export"]));
    out.assert_failure();
    assert!(!out.stderr.is_empty(), "{out}");
}

#[test]
fn mount_fails_fast_when_the_server_is_unreachable() {
    if !require_fuse() {
        return;
    }
    let guard = TestMount::guard(temp_dir("mnt"));
    let out = run(ferry()
        .arg("mount")
        .arg(dead_addr())
        .arg(guard.path())
        .env_remove("RUST_LOG"));
    out.assert_failure();
    assert!(
        out.elapsed < Duration::from_secs(10),
        "took {:?}: {out}",
        out.elapsed
    );
    assert_eq!(
        lines(&out.stderr_str()).len(),
        1,
        "expected a one-line reason: {out}"
    );
    assert!(!guard.is_mounted(), "a failed mount left a mount behind");
    assert!(
        guard.daemon_pids().is_empty(),
        "a failed mount left a daemon behind"
    );
}

/// `ferry mount` with its output piped (`… 2>&1 | cat`, a script's `$(…)`) returns once
/// the mount is ready: the daemon lets go of the pipe, so its reader sees the end. (It
/// kept the pipe until the unmount, and such a command never finished.)
#[test]
fn a_mount_with_its_output_piped_returns() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    let guard = TestMount::guard(temp_dir("mnt"));
    let script = format!(
        "{{ '{}' mount --no-cache '{}' '{}'; echo \"exit $?\"; }} 2>&1 | cat",
        ferry_tests::ferry_bin().display(),
        server.remote(),
        guard.path().display()
    );
    let out = run_timeout(&mut sh(&script), None, Duration::from_secs(30))
        .unwrap_or_else(|t| panic!("the pipe was not let go: {t}"));
    out.assert_success();
    assert!(out.stdout_str().contains("exit 0"), "{out}");
    assert!(guard.is_mounted(), "{out}");
    fs::write(guard.path().join("f"), b"through the mount").expect("write");
    assert_eq!(
        fs::read(server.export("f")).expect("on the export"),
        b"through the mount"
    );
}

/// A mount whose stderr is the journal's socket (a systemd unit's: `JOURNAL_STREAM`
/// names it) keeps logging there once it returns, unlike one whose stderr is a pipe.
/// (Any socket was let go of, so the unit's log ended at "mounted".)
#[test]
fn a_mount_logging_to_the_journal_keeps_logging() {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    let guard = TestMount::guard(temp_dir("mnt"));
    let (mut journal, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let md = fs::metadata(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&theirs)
    ))
    .expect("stat of the socket");
    let mut cmd = ferry();
    cmd.arg("mount")
        .arg("--no-cache")
        .arg(server.remote())
        .arg(guard.path())
        .env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()))
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::os::fd::OwnedFd::from(theirs)));
    let child = ferry_tests::process::spawn(&mut cmd).expect("spawn ferry mount");
    // Our copy of the socket goes with the command: the daemon's is the last one.
    drop(cmd);
    let status = ferry_tests::process::wait_timeout(child, Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "ferry mount: {status:?}"
    );
    assert!(guard.is_mounted());
    let pids = mount::daemons_of(guard.path());
    assert!(!pids.is_empty(), "no daemon process found for the mount");
    for &pid in &pids {
        ferry_tests::sys::kill(pid, libc::SIGTERM);
    }
    assert!(
        ferry_tests::sys::all_gone(&pids, Duration::from_secs(10)),
        "the daemon did not end on SIGTERM"
    );
    journal
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut log = String::new();
    journal.read_to_string(&mut log).expect("the daemon's log");
    assert!(log.contains("signal received"), "{log}");
}

#[test]
fn mount_fails_on_a_missing_or_non_empty_mountpoint() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    let parent = temp_dir("mnt");
    let missing = parent.path().join("missing");
    let out = run(ferry()
        .arg("mount")
        .arg(server.remote())
        .arg(&missing)
        .env_remove("RUST_LOG"));
    out.assert_failure();
    assert_eq!(
        lines(&out.stderr_str()).len(),
        1,
        "expected a one-line reason: {out}"
    );
    assert!(!missing.exists() && !mount::is_mounted(&missing));

    let guard = TestMount::guard(temp_dir("mnt"));
    fs::write(guard.join("occupied"), b"mine").expect("write");
    let out = run(ferry()
        .arg("mount")
        .arg(server.remote())
        .arg(guard.path())
        .env_remove("RUST_LOG"));
    out.assert_failure();
    assert_eq!(
        lines(&out.stderr_str()).len(),
        1,
        "expected a one-line reason: {out}"
    );
    assert!(!guard.is_mounted(), "mounted over a non-empty directory");
    assert_eq!(fs::read(guard.join("occupied")).expect("read"), b"mine");

    // A file is not a mountpoint either.
    let file = parent.path().join("file");
    fs::write(&file, b"").expect("write");
    let out = run(ferry()
        .arg("mount")
        .arg(server.remote())
        .arg(&file)
        .env_remove("RUST_LOG"));
    out.assert_failure();
    assert!(!mount::is_mounted(&file));
}

#[test]
fn umount_unmounts_and_the_daemon_exits() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    fs::write(server.export("f"), b"x").expect("write");
    let mut m = TestMount::new(&server);
    assert_eq!(fs::read(m.join("f")).expect("read"), b"x");
    // What `findmnt -t fuse.ferry` and `df` show.
    let info = mount::mount_at(m.path()).expect("in mountinfo");
    assert_eq!(info.fstype, "fuse.ferry", "{info:?}");
    assert!(
        !m.daemon_pids().is_empty(),
        "no daemon process found for the mount"
    );
    m.unmount().unwrap_or_else(|e| panic!("{e}"));
    assert!(!m.is_mounted());
    assert!(
        !m.join("f").exists(),
        "the mountpoint still shows the export"
    );
    // Unmounting what is not mounted fails.
    let out = run(ferry().arg("umount").arg(m.path()));
    out.assert_failure();
    assert!(!out.stderr.is_empty(), "{out}");
}

/// A mount made at a path right after the path was unmounted survives the old mount's
/// daemon finishing late. (fuser 0.18, which made the mounts, unmounted the path again
/// at the end of every session, and so took the new mount down.) The old daemon is held
/// stopped across the unmount and the new mount to make "late" certain.
#[test]
fn a_daemon_finishing_late_leaves_the_next_mount_at_its_path_alone() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    fs::write(server.export("f"), b"x").expect("write");
    let old = TestMount::new(&server);
    assert_eq!(fs::read(old.join("f")).expect("read"), b"x");
    let pids = old.daemon_pids();
    assert!(!pids.is_empty(), "no daemon process found for the mount");
    let stopped = ferry_tests::sys::stop(&pids);
    run(ferry().arg("umount").arg(old.path())).assert_success();
    assert!(!old.is_mounted());
    // The next mount, by a daemon the old mount's cleanup knows to stop too (its
    // command line names the path).
    let (out, _log) = mount_next(&server, old.path());
    out.assert_success();
    assert_eq!(
        fs::read(old.join("f")).expect("read through the next mount"),
        b"x"
    );
    assert!(
        stopped.resume_until_gone(Duration::from_secs(10)),
        "the old daemon did not exit once resumed"
    );
    assert!(
        old.is_mounted(),
        "the old daemon took the next mount at its path down"
    );
    assert_eq!(
        fs::read(old.join("f")).expect("read through the next mount after"),
        b"x"
    );
}

/// A ferry mount whose daemon died (SIGKILL: the mountpoint answers ENOTCONN) does not
/// stand in the way of mounting there again: `ferry mount` says it unmounts it, and
/// mounts. (It failed with "is not a directory", and while the root's attributes were
/// still cached, with "Transport endpoint is not connected".)
#[test]
fn a_mount_over_a_dead_ferry_mount_replaces_it() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    fs::write(server.export("f"), b"x").expect("write");
    let dead = TestMount::new(&server);
    // The kernel keeps the root's attributes (for minutes, with events): once the
    // daemon is gone a `stat` there may still succeed, and only a listing fails.
    assert!(fs::metadata(dead.path()).expect("stat").is_dir());
    for pid in dead.daemon_pids() {
        ferry_tests::sys::kill(pid, libc::SIGKILL);
    }
    assert!(
        poll_until(Duration::from_secs(10), || fs::read_dir(dead.path())
            .is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))),
        "the mount did not die"
    );
    let (out, _log) = mount_next(&server, dead.path());
    out.assert_success();
    assert!(out.stderr_str().contains("gone"), "{out}");
    assert_eq!(
        fs::read(dead.join("f")).expect("read through the new mount"),
        b"x"
    );
    let at_path = mount::mounts()
        .into_iter()
        .filter(|m| m.mount_point == dead.path())
        .count();
    assert_eq!(at_path, 1, "mounts at {}", dead.path().display());
}

/// `ferry umount` of a mount a process still uses fails, says why and what to do, and
/// leaves the mount working; once the process is gone it unmounts.
#[test]
fn umount_of_a_busy_mount_says_why_and_keeps_it() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    fs::write(server.export("f"), b"x").expect("write");
    let mut m = TestMount::new(&server);
    let held = fs::File::open(m.join("f")).expect("open");
    let out = run(ferry().arg("umount").arg(m.path()));
    out.assert_failure();
    let err = out.stderr_str();
    assert!(err.contains("busy") && err.contains("umount -l"), "{out}");
    assert!(m.is_mounted());
    assert_eq!(fs::read(m.join("f")).expect("read"), b"x");
    drop(held);
    m.unmount().unwrap_or_else(|e| panic!("{e}"));
}

/// `ferry mount --no-cache --log LOG SERVER PATH`: another mount at the path of a test's
/// mount, which that `TestMount` unmounts on drop. Keep the log dir as long as the mount.
fn mount_next(server: &TestServer, path: &Path) -> (ferry_tests::Output, tempfile::TempDir) {
    let log = temp_dir("log");
    let out = run(ferry()
        .arg("mount")
        .arg("--no-cache")
        .arg("--log")
        .arg(log.path().join("next.log"))
        .arg(server.remote())
        .arg(path));
    (out, log)
}

/// SIGTERM to the daemon of a mount that was detached (`umount -l`, while a file in it
/// is open) after the next mount took its path: the daemon ends, and the next mount
/// (and its `ferry stats` socket) stays. (The daemon unmounted the path, so the next
/// mount went down, and its stats socket was removed when the old daemon exited.)
#[test]
fn a_signal_for_a_detached_mount_leaves_the_next_mount_at_its_path_alone() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    fs::write(server.export("f"), b"x").expect("write");
    let old = TestMount::with_args(&server, &["--no-cache"]);
    let held = fs::File::open(old.join("f")).expect("open");
    let pids = old.daemon_pids();
    assert!(!pids.is_empty(), "no daemon process found for the mount");
    ferry_tests::sys::umount_detach(old.path()).expect("umount -l");
    assert!(!old.is_mounted());
    let (out, _log) = mount_next(&server, old.path());
    out.assert_success();
    for &pid in &pids {
        ferry_tests::sys::kill(pid, libc::SIGTERM);
    }
    assert!(
        ferry_tests::sys::all_gone(&pids, Duration::from_secs(10)),
        "the detached mount's daemon did not end on SIGTERM"
    );
    assert!(
        old.is_mounted(),
        "the old daemon took the next mount at its path down"
    );
    assert_eq!(
        fs::read(old.join("f")).expect("read through the next mount"),
        b"x"
    );
    // Panics unless the next mount's daemon answers.
    assert!(old.stats().has("mountpoint"));
    drop(held);
}

/// SIGTERM to the daemon of a mount that an older mount was moved on top of (`mount
/// --move`): mountinfo lists mounts by age, so the moved one comes first, yet it is on
/// top. The daemon ends and leaves it alone. (It took the last line at its path for the
/// top, unmounted the path, so the moved mount, and went on serving.)
#[test]
fn a_signal_leaves_an_older_mount_moved_over_the_mount_alone() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    let aside = temp_dir("aside");
    // Mounted before the ferry mount: the older of the two.
    let tmpfs = ferry_tests::sys::Tmpfs::mount(aside.path(), "1m");
    fs::write(aside.path().join("marker"), b"moved here").expect("write in the tmpfs");
    let m = TestMount::with_args(&server, &["--no-cache"]);
    // Dropped before the mount, also on failure: the tmpfs goes first, then the ferry
    // mount beneath it.
    let mut tmpfs = tmpfs;
    let pids = m.daemon_pids();
    assert!(!pids.is_empty(), "no daemon process found for the mount");
    tmpfs.move_to(m.path());
    assert_eq!(
        fs::read(m.join("marker")).expect("the moved mount, on top"),
        b"moved here"
    );
    for &pid in &pids {
        ferry_tests::sys::kill(pid, libc::SIGTERM);
    }
    assert!(
        ferry_tests::sys::all_gone(&pids, Duration::from_secs(10)),
        "the daemon of the mount beneath did not end on SIGTERM"
    );
    assert_eq!(
        fs::read(m.join("marker")).expect("the moved mount, still on top"),
        b"moved here"
    );
}

/// SIGTERM to the daemon of a mount still in use detaches it (the file open in it still
/// reads), and a second SIGTERM ends the daemon. (The second was ignored: the daemon
/// served the detached mount until its last user let go.)
#[test]
fn a_busy_mount_is_detached_by_a_signal_and_ended_by_the_next() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    fs::write(server.export("f"), b"x").expect("write");
    let m = TestMount::with_args(&server, &["--no-cache"]);
    let held = fs::File::open(m.join("f")).expect("open");
    let pids = m.daemon_pids();
    assert!(!pids.is_empty(), "no daemon process found for the mount");
    for &pid in &pids {
        ferry_tests::sys::kill(pid, libc::SIGTERM);
    }
    assert!(
        poll_until(Duration::from_secs(10), || !m.is_mounted()),
        "SIGTERM did not detach the busy mount"
    );
    let mut buf = [0u8; 1];
    std::os::unix::fs::FileExt::read_at(&held, &mut buf, 0).expect("read after the detach");
    assert_eq!(&buf, b"x");
    assert!(pids.iter().all(|&p| ferry_tests::sys::pid_running(p)));
    for &pid in &pids {
        ferry_tests::sys::kill(pid, libc::SIGTERM);
    }
    assert!(
        ferry_tests::sys::all_gone(&pids, Duration::from_secs(10)),
        "a second SIGTERM did not end the detached mount's daemon"
    );
    drop(held);
}

/// A mount whose connection is aborted (fusectl's `abort`, as an administrator frees a
/// hung mount) is unmounted by its daemon as its session ends: no dead mount is left at
/// the path. (It stayed there, answering ENOTCONN.)
#[test]
fn an_aborted_mount_is_unmounted_by_its_daemon() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    let m = TestMount::with_args(&server, &["--no-cache"]);
    let pids = m.daemon_pids();
    assert!(!pids.is_empty(), "no daemon process found for the mount");
    if !mount::abort_fuse_connection(m.path()) {
        eprintln!("skipping: no fusectl to abort the connection with");
        return;
    }
    assert!(
        poll_until(Duration::from_secs(10), || !m.is_mounted()),
        "the aborted mount is still at its path"
    );
    assert!(
        ferry_tests::sys::all_gone(&pids, Duration::from_secs(10)),
        "the daemon of the aborted mount did not exit"
    );
}

/// A dead mount inside an export (here: the export is a ferry mount whose daemon was
/// killed) reads as EIO through a mount of it, not ENOTCONN: that would say the mount's
/// own connection is gone, and `ferry mount` on its path would unmount it, live.
#[test]
fn a_dead_mount_in_the_export_is_eio_and_leaves_the_mount_of_it_alone() {
    if !require_fuse() {
        return;
    }
    let inner_server = TestServer::start();
    fs::write(inner_server.export("f"), b"x").expect("write");
    let inner = TestMount::new(&inner_server);
    let server = TestServer::start_at(inner.path(), &[]);
    let m = TestMount::with_args(&server, &["--no-cache"]);
    assert_eq!(fs::read(m.join("f")).expect("read"), b"x");
    for pid in inner.daemon_pids() {
        ferry_tests::sys::kill(pid, libc::SIGKILL);
    }
    // (A listing asks the daemon; attributes the kernel holds may still be answered.)
    assert!(
        poll_until(Duration::from_secs(10), || fs::read_dir(inner.path())
            .is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))),
        "the inner mount did not die"
    );
    // A create always reaches the server.
    let err = fs::write(m.join("new"), b"y").expect_err("a create in a dead export");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // What `ferry mount` looks at: the mountpoint's listing (its attributes are cached).
    let err = fs::read_dir(m.path()).expect_err("a listing of a dead export");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let out = run(ferry()
        .arg("mount")
        .arg("--no-cache")
        .arg(server.remote())
        .arg(m.path()));
    out.assert_failure();
    assert!(m.is_mounted(), "{out}");
    // Panics unless the mount's daemon answers.
    assert!(m.stats().has("mountpoint"));
}

#[test]
fn foreground_mount_runs_until_unmounted() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    fs::write(server.export("f"), b"foreground").expect("write");
    let guard = TestMount::guard(temp_dir("mnt"));
    let log = temp_dir("work");
    let log_file = fs::File::create(log.path().join("fg.log")).expect("log");
    let mut cmd = ferry();
    cmd.args(["mount", "--foreground", &server.remote()])
        .arg(guard.path())
        .stdout(Stdio::null())
        .stderr(log_file)
        .process_group(0);
    let mut child =
        KillOnDrop(ferry_tests::process::spawn(&mut cmd).expect("spawn ferry mount --foreground"));
    let show_log = || fs::read_to_string(log.path().join("fg.log")).unwrap_or_default();
    let mounted = poll_until(Duration::from_secs(20), || {
        guard.is_mounted() || child.0.try_wait().ok().flatten().is_some()
    });
    assert!(
        mounted && guard.is_mounted(),
        "foreground mount never appeared:\n{}",
        show_log()
    );
    assert!(
        child.0.try_wait().expect("try_wait").is_none(),
        "--foreground returned while mounted"
    );
    assert_eq!(fs::read(guard.join("f")).expect("read"), b"foreground");
    run(ferry().arg("umount").arg(guard.path())).assert_success();
    let mut status = None;
    wait_for(
        Duration::from_secs(10),
        "the foreground ferry to exit",
        || {
            status = child.0.try_wait().ok().flatten();
            status.is_some()
        },
    );
    let status = status.expect("exit status");
    assert!(
        status.success(),
        "foreground ferry exited with {status}:\n{}",
        show_log()
    );
    assert!(!guard.is_mounted());
    assert!(
        Path::new(guard.path())
            .read_dir()
            .expect("readdir")
            .next()
            .is_none()
    );
}

/// README: "`--foreground` stays attached; Ctrl-C unmounts."
#[test]
fn foreground_mount_unmounts_on_ctrl_c() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    let guard = TestMount::guard(temp_dir("mnt"));
    let mut cmd = ferry();
    cmd.args(["mount", "--foreground", &server.remote()])
        .arg(guard.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let mut child =
        KillOnDrop(ferry_tests::process::spawn(&mut cmd).expect("spawn ferry mount --foreground"));
    wait_for(Duration::from_secs(20), "the foreground mount", || {
        guard.is_mounted()
    });
    fs::write(guard.join("f"), b"x").expect("write through the mount");
    // Ctrl-C in a terminal signals the whole foreground process group.
    ferry_tests::sys::kill(-(child.0.id() as i32), libc::SIGINT);
    wait_for(
        Duration::from_secs(10),
        "the mount to go away after SIGINT",
        || !guard.is_mounted(),
    );
    wait_for(
        Duration::from_secs(10),
        "ferry to exit after SIGINT",
        || child.0.try_wait().ok().flatten().is_some(),
    );
    assert_eq!(fs::read(server.export("f")).expect("export"), b"x");
}

/// README: "SIGINT/SIGTERM: stops accepting, finishes requests in flight, exits 0."
#[test]
fn ferryd_exits_0_on_sigint() {
    let mut server = TestServer::start();
    server.signal(libc::SIGINT);
    let mut status = None;
    wait_for(
        Duration::from_secs(10),
        "ferryd to exit after SIGINT",
        || {
            status = server.try_exit_status();
            status.is_some()
        },
    );
    let status = status.expect("status");
    assert!(status.success(), "ferryd exited with {status} on SIGINT");
}
