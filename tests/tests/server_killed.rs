//! A server that dies (SIGKILL) or freezes (SIGSTOP) makes operations on the mount fail
//! within a bounded time (EIO, ENOTCONN or ETIMEDOUT), never hang; the mount can still be
//! unmounted cleanly afterwards. When the server is back (SIGCONT, or restarted on the same
//! address), the next operations reconnect (README: "The next operation reconnects").
//!
//! Each operation runs on its own thread with a deadline. The files and directories used
//! are made on the export before mounting and never touched through the mount before the
//! server goes away, so no cache can answer for the server.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::{errno_name, fixture_with, run_timeout, with_deadline};

const DEADLINE: Duration = Duration::from_secs(15);
const ACCEPTED: [i32; 3] = [libc::EIO, libc::ENOTCONN, libc::ETIMEDOUT];

fn populate(export: &std::path::Path) {
    for d in ["d1", "d2", "d3"] {
        fs::create_dir(export.join(d)).expect("mkdir");
        fs::write(export.join(d).join("file"), b"content").expect("write");
    }
    fs::write(export.join("top"), b"top").expect("write");
}

/// Runs `op` with [`DEADLINE`]; asserts it failed with one of [`ACCEPTED`].
#[track_caller]
fn assert_fails_in_time<T: std::fmt::Debug + Send + 'static>(
    what: &str,
    op: impl FnOnce() -> io::Result<T> + Send + 'static,
) {
    let start = Instant::now();
    match with_deadline(DEADLINE, op) {
        None => panic!("{what}: still blocked after {DEADLINE:?}"),
        Some(Ok(v)) => panic!("{what}: succeeded ({v:?}) although the server is gone"),
        Some(Err(e)) => {
            let errno = e.raw_os_error();
            assert!(
                errno.is_some_and(|n| ACCEPTED.contains(&n)),
                "{what}: failed with {} ({e}), expected EIO, ENOTCONN or ETIMEDOUT",
                errno
                    .map(errno_name)
                    .unwrap_or_else(|| format!("{:?}", e.kind()))
            );
            eprintln!("{what}: {e} after {:?}", start.elapsed());
        }
    }
}

#[track_caller]
fn assert_ls_fails_in_time(dir: PathBuf) {
    let start = Instant::now();
    let mut ls = Command::new("ls");
    ls.arg("-l").arg(&dir);
    match run_timeout(&mut ls, None, DEADLINE) {
        Err(t) => panic!("{t}"),
        Ok(out) => {
            assert!(
                !out.success(),
                "`ls -l {}` succeeded with the server gone: {out}",
                dir.display()
            );
            assert!(!out.stderr.is_empty(), "ls failed silently: {out}");
            eprintln!(
                "ls: {} after {:?}",
                out.stderr_str().trim(),
                start.elapsed()
            );
        }
    }
}

#[test]
fn killed_server_makes_operations_fail_not_hang() {
    let Some(mut fx) = fixture_with(&[], &[], populate) else {
        return;
    };
    // The mount works before.
    assert_eq!(fs::read(fx.mnt("top")).expect("read"), b"top");
    fx.server.kill();
    assert_ls_fails_in_time(fx.mnt("d1"));
    let p = fx.mnt("d2/file");
    assert_fails_in_time("read of an uncached file", move || fs::read(p));
    let p = fx.mnt("d3");
    assert_fails_in_time("readdir of an uncached directory", move || {
        fs::read_dir(p).and_then(|d| d.collect::<io::Result<Vec<_>>>())
    });
    let p = fx.mnt("new");
    assert_fails_in_time("create", move || fs::write(p, b"x"));
    fx.mount
        .unmount()
        .unwrap_or_else(|e| panic!("unmount after the server died: {e}"));
}

#[test]
fn stopped_server_makes_operations_time_out() {
    let Some(mut fx) = fixture_with(&[], &["--timeout", "2"], populate) else {
        return;
    };
    assert_eq!(fs::read(fx.mnt("top")).expect("read"), b"top");
    fx.server.signal(libc::SIGSTOP);
    // (If an assertion fails, the server's Drop sends SIGCONT before SIGTERM.)
    let p = fx.mnt("d2/file");
    assert_fails_in_time("read of an uncached file, server stopped", move || {
        fs::read(p)
    });
    assert_ls_fails_in_time(fx.mnt("d1"));
    fx.server.signal(libc::SIGCONT);
    fx.mount
        .unmount()
        .unwrap_or_else(|e| panic!("unmount after the server was stopped: {e}"));
}

/// Polls (up to [`DEADLINE`]) until reading `rel` through the mount gives `want`; each
/// attempt runs with its own deadline so a hung call fails the test rather than the suite.
#[track_caller]
fn assert_recovers(mount: &std::path::Path, rel: &str, want: &'static [u8]) {
    let path = mount.join(rel);
    let mut last = String::from("never tried");
    let ok = ferry_tests::poll_until(DEADLINE, || {
        let p = path.clone();
        match with_deadline(DEADLINE, move || fs::read(p)) {
            Some(Ok(d)) if d == want => true,
            other => {
                last = format!("{other:?}");
                false
            }
        }
    });
    assert!(
        ok,
        "reading {rel} did not recover within {DEADLINE:?}; last: {last}"
    );
}

#[test]
fn operations_work_again_after_sigcont() {
    let Some(fx) = fixture_with(&[], &["--timeout", "2"], populate) else {
        return;
    };
    assert_eq!(fs::read(fx.mnt("top")).expect("read"), b"top");
    fx.server.signal(libc::SIGSTOP);
    let p = fx.mnt("d2/file");
    assert_fails_in_time("read with the server stopped", move || fs::read(p));
    fx.server.signal(libc::SIGCONT);
    assert_recovers(fx.mount.path(), "d3/file", b"content");
    fs::write(fx.mnt("after"), b"after").expect("write after recovery");
    assert_eq!(fs::read(fx.exp("after")).expect("export"), b"after");
}

#[test]
fn mount_reconnects_to_a_restarted_server() {
    let Some(mut fx) = fixture_with(&[], &[], populate) else {
        return;
    };
    assert_eq!(fs::read(fx.mnt("top")).expect("read"), b"top");
    fx.server.kill();
    let p = fx.mnt("d1/file");
    assert_fails_in_time("read with the server dead", move || fs::read(p));
    fx.server.restart();
    assert_recovers(fx.mount.path(), "d2/file", b"content");
    assert_eq!(
        fs::read(fx.mnt("top")).expect("read a file looked up before"),
        b"top"
    );
    fs::write(fx.mnt("d3/new"), b"new").expect("create after the restart");
    assert_eq!(fs::read(fx.exp("d3/new")).expect("export"), b"new");
    fx.mount
        .unmount()
        .unwrap_or_else(|e| panic!("unmount after the restart: {e}"));
}
