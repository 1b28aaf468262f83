//! A server that dies (SIGKILL) or freezes (SIGSTOP) makes operations on the mount fail
//! within a bounded time (EIO, ENOTCONN or ETIMEDOUT), never hang; the mount can still be
//! unmounted cleanly afterwards. When the server is back (SIGCONT, or restarted on the same
//! address), the next operations reconnect (README: "The next operation reconnects").
//!
//! A write whose server dies before the close fails at the close and leaves the server's
//! copy as it was (writes are staged until the close commits them).
//!
//! Each operation runs on its own thread with a deadline. The files and directories used
//! are made on the export before mounting and never touched through the mount before the
//! server goes away, so no cache can answer for the server.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
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

/// How a file is opened and changed before the server dies.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// `open(O_WRONLY)`, `pwrite` in the middle.
    InPlace,
    /// `open(O_WRONLY)`, `ftruncate(0)`, `write`.
    Ftruncate,
    /// `open(O_WRONLY|O_CREAT|O_TRUNC)`, `write`: how most programs rewrite a file.
    OTrunc,
    /// `open(O_WRONLY)`, 8 MiB `pwrite` over a 12 MiB file: writes still in flight
    /// (written behind) when the server dies.
    InFlight,
    /// `open(O_WRONLY)`, then `copy_file_range` from the file itself (opened read-only)
    /// to past its end: a copy the server makes into the staging file.
    CopyInto,
}

/// Files on the export (old content, cached by the mount first) are opened and changed
/// through the mount, each its own way; the server dies before the closes. Each `close()`
/// reports the failure, the export keeps the old content byte for byte (writes are
/// staged until the close commits them) and gains no entry, the mount reads the old
/// content once a restarted server is back, and it still unmounts.
fn failed_upload_keeps_the_old_copy(changes: &[Change]) {
    let mut rng = ferry_tests::rng::Rng::new(0xfa11);
    let files: Vec<(String, Change, Vec<u8>)> = changes
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let len = match c {
                Change::InFlight => 12 << 20,
                _ => 200_000 + i * 50_000,
            };
            (format!("{c:?}"), c, rng.bytes(len))
        })
        .collect();
    let Some(mut fx) = fixture_with(&[], &["--timeout", "2"], |e| {
        for (name, _, old) in &files {
            fs::write(e.join(name), old).expect("write");
        }
    }) else {
        return;
    };
    for (name, _, old) in &files {
        assert!(
            fs::read(fx.mnt(name)).expect("read") == *old,
            "{name} before"
        );
    }
    // While our files are open, no other test may fork: its child's copies of our
    // descriptors, closed at its exec, would flush (commit) them behind our back.
    let no_spawns = ferry_tests::process::no_spawns();
    let mut open = Vec::new();
    for (name, change, _) in &files {
        let path = fx.mnt(name);
        let mut f = match change {
            Change::OTrunc => fs::File::create(&path),
            _ => fs::OpenOptions::new().write(true).open(&path),
        }
        .unwrap_or_else(|e| panic!("{name}: open: {e}"));
        match change {
            Change::InPlace => f.write_all_at(&rng.bytes(64 * 1024), 1000),
            Change::InFlight => f.write_all_at(&rng.bytes(8 << 20), 1 << 20),
            Change::Ftruncate => f.set_len(0).and_then(|()| f.write_all(&rng.bytes(150_000))),
            Change::OTrunc => f.write_all(&rng.bytes(150_000)),
            Change::CopyInto => fs::File::open(&path).and_then(|src| {
                let len = src.metadata()?.len();
                let n = ferry_tests::sys::copy_file_range(&src, 0, &f, len, len as usize)?;
                assert_eq!(n as u64, len, "{name}: bytes copied");
                Ok(())
            }),
        }
        .unwrap_or_else(|e| panic!("{name}: writing: {e}"));
        open.push((name.clone(), f));
    }
    fx.server.kill();

    for (name, f) in open {
        let start = Instant::now();
        match with_deadline(DEADLINE, move || ferry_tests::sys::close(f)) {
            None => panic!("close of {name}: still blocked after {DEADLINE:?}"),
            Some(Ok(())) => {
                let old = &files.iter().find(|(n, _, _)| *n == name).expect("file").2;
                let on_export = match fs::read(fx.exp(&name)) {
                    Ok(d) if d == *old => "still the old content".to_string(),
                    Ok(d) => format!("{} bytes of new content", d.len()),
                    Err(e) => e.to_string(),
                };
                panic!(
                    "close of {name} returned 0 although the server was dead (the export has \
                     {on_export})\n--- mount log ---\n{}",
                    fx.mount.log()
                )
            }
            Some(Err(e)) => {
                let errno = e.raw_os_error();
                assert!(
                    errno.is_some_and(|n| ACCEPTED.contains(&n)),
                    "close of {name}: failed with {e}, expected EIO, ENOTCONN or ETIMEDOUT"
                );
                eprintln!("close of {name}: {e} after {:?}", start.elapsed());
            }
        }
    }
    drop(no_spawns);
    let export = fx.server.export_path().to_path_buf();
    let unchanged = |when: &str| {
        for (name, _, old) in &files {
            let now = fs::read(export.join(name)).expect("read the export");
            assert!(
                now == *old,
                "{when}: {name} on the export has {} bytes{}, not its old {} bytes, although \
                 its close failed",
                now.len(),
                if now.len() == old.len() {
                    " of other content"
                } else {
                    ""
                },
                old.len()
            );
        }
        let mut names: Vec<String> = fs::read_dir(&export)
            .expect("list the export")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want: Vec<String> = files.iter().map(|(n, _, _)| n.clone()).collect();
        want.sort();
        assert_eq!(names, want, "{when}: the export's entries");
    };
    unchanged("server dead");

    fx.server.restart();
    for (name, _, old) in &files {
        let path = fx.mnt(name);
        let mut first = None;
        let ok = ferry_tests::poll_until(DEADLINE, || {
            let p = path.clone();
            match with_deadline(DEADLINE, move || fs::read(p)) {
                Some(Ok(d)) => {
                    first = Some(d);
                    true
                }
                _ => false,
            }
        });
        assert!(ok, "reading {name} did not recover within {DEADLINE:?}");
        let got = first.expect("a read");
        assert!(
            got == *old,
            "{name} through the mount after the failed close: {} bytes, not the old {} \
             (the failed writes are still visible)",
            got.len(),
            old.len()
        );
    }
    unchanged("server restarted");
    fx.mount
        .unmount()
        .unwrap_or_else(|e| panic!("unmount after the failed closes: {e}"));
}

#[test]
fn a_failed_upload_fails_the_close_and_keeps_the_old_copy() {
    failed_upload_keeps_the_old_copy(&[Change::InPlace, Change::InFlight]);
}

#[test]
fn a_failed_rewrite_after_a_truncation_keeps_the_old_copy() {
    failed_upload_keeps_the_old_copy(&[Change::OTrunc, Change::Ftruncate]);
}

#[test]
fn a_failed_close_after_a_server_side_copy_keeps_the_old_copy() {
    failed_upload_keeps_the_old_copy(&[Change::CopyInto]);
}

/// A file open for reading when the server restarts goes on reading through the same
/// descriptor: the mount opens it again on the new connection (`handles_reopened`). A
/// descriptor whose name leads to another file by then fails with `ESTALE` rather than
/// reading the other file's bytes.
#[test]
fn a_reader_keeps_reading_across_a_restart() {
    const MIB: usize = 1 << 20;
    let data = ferry_tests::rng::Rng::new(0x7e0).bytes(16 * MIB);
    // No data cache: every read the kernel does not have goes to the server.
    let Some(mut fx) = fixture_with(&[], &["--no-cache"], |e| {
        populate(e);
        fs::write(e.join("big"), &data).expect("write");
        fs::write(e.join("replaced"), &data[..MIB]).expect("write");
    }) else {
        return;
    };
    let big = fs::File::open(fx.mnt("big")).expect("open big");
    let replaced = fs::File::open(fx.mnt("replaced")).expect("open replaced");
    let mut buf = vec![0u8; 64 * 1024];
    big.read_exact_at(&mut buf, 0)
        .expect("read before the restart");
    assert!(buf == data[..buf.len()], "bytes before the restart");

    fx.server.kill();
    // Replaced by another file (another inode) while the server is away.
    fs::write(fx.exp("replaced.new"), b"another file").expect("write");
    fs::rename(fx.exp("replaced.new"), fx.exp("replaced")).expect("rename");
    fx.server.restart();
    // Once the mount works again (the reconnect), the old descriptors are used.
    assert_recovers(fx.mount.path(), "top", b"top");

    let before = fx.mount.stats().get("handles_reopened");
    // Far past what the kernel can have read ahead: these bytes come from the server.
    let at = 12 * MIB;
    let got = with_deadline(DEADLINE, move || {
        let mut buf = vec![0u8; 256 * 1024];
        big.read_exact_at(&mut buf, at as u64).map(|()| buf)
    })
    .expect("read through the old descriptor hung")
    .expect("read through a descriptor opened before the restart");
    assert!(got == data[at..at + got.len()], "bytes after the restart");
    assert_eq!(
        fx.mount.stats().get("handles_reopened"),
        before + 1,
        "the reader's handle was opened again once"
    );

    let replaced = std::sync::Arc::new(replaced);
    for attempt in ["first", "second"] {
        let f = replaced.clone();
        let err = with_deadline(DEADLINE, move || {
            let mut buf = vec![0u8; 4096];
            f.read_exact_at(&mut buf, 0)
        })
        .expect("read of the replaced file hung")
        .expect_err("a descriptor of a replaced file read something");
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ESTALE),
            "{attempt} read of a file replaced while the server was away: {err}"
        );
    }
    drop(replaced);
    fx.mount
        .unmount()
        .unwrap_or_else(|e| panic!("unmount after the restart: {e}"));
}

/// A read in flight when the server dies is sent again once the server is back: the
/// reader gets its bytes, not `EIO`. The server is stopped first so that the read is
/// surely on the wire, unanswered, when it is killed.
#[test]
fn a_read_in_flight_is_retried_after_a_restart() {
    const MIB: usize = 1 << 20;
    let data = ferry_tests::rng::Rng::new(0x1f11).bytes(16 * MIB);
    // No data cache: the read goes to the server. A long timeout: the connection is
    // lost by the kill, never by the watchdog.
    let Some(mut fx) = fixture_with(&[], &["--no-cache", "--timeout", "60"], |e| {
        populate(e);
        fs::write(e.join("big"), &data).expect("write");
    }) else {
        return;
    };
    let big = fs::File::open(fx.mnt("big")).expect("open big");
    let before = fx.mount.stats();
    let at = 12 * MIB;
    let got = read_across_a_restart(&mut fx, big, at, 256 * 1024, &before);
    assert!(got == data[at..at + got.len()], "bytes after the restart");
    let after = fx.mount.stats();
    assert!(
        after.get("retried") > before.get("retried"),
        "the read was sent again: {after}"
    );
    reopened_once_then_unmount(&mut fx, &before, &after);
}

/// Reads `len` bytes at `at` of `big` on a thread with the server stopped, and once the
/// read has reached the mount's connection (`requests.read` past `before`), restarts the
/// server (SIGKILL ends a stopped process too; the new one takes the same address): the
/// bytes the read got.
fn read_across_a_restart(
    fx: &mut ferry_tests::Fixture,
    big: fs::File,
    at: usize,
    len: usize,
    before: &ferry_tests::Stats,
) -> Vec<u8> {
    fx.server.signal(libc::SIGSTOP);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; len];
        let _ = tx.send(big.read_exact_at(&mut buf, at as u64).map(|()| buf));
    });
    let sent = ferry_tests::poll_until(DEADLINE, || {
        fx.mount.stats().get_or_zero("requests.read") > before.get_or_zero("requests.read")
    });
    assert!(sent, "the read never reached the server's connection");
    fx.server.restart();
    rx.recv_timeout(DEADLINE)
        .expect("the read in flight hung")
        .expect("a read in flight when the server was restarted")
}

/// After [`read_across_a_restart`]: the reader's handle was opened again once, and the
/// mount comes down cleanly.
fn reopened_once_then_unmount(
    fx: &mut ferry_tests::Fixture,
    before: &ferry_tests::Stats,
    after: &ferry_tests::Stats,
) {
    assert_eq!(
        after.get("handles_reopened"),
        before.get("handles_reopened") + 1,
        "the reader's handle was opened again once"
    );
    fx.mount
        .unmount()
        .unwrap_or_else(|e| panic!("unmount after the restart: {e}"));
}

/// Small reads at random are sent to the server by the FUSE session thread and answered
/// by the connection's reader (`reads_at_once`, counted when sent). One in flight when the
/// server dies is read again by the full path once the server is back: the reader gets
/// its bytes.
#[test]
fn a_small_read_at_random_in_flight_is_read_again_after_a_restart() {
    const MIB: usize = 1 << 20;
    const SMALL: usize = 4096;
    let data = ferry_tests::rng::Rng::new(0x5a11).bytes(16 * MIB);
    // A long timeout: the connection is lost by the kill, never by the watchdog.
    let Some(mut fx) = fixture_with(&[], &["--timeout", "60"], |e| {
        populate(e);
        fs::write(e.join("big"), &data).expect("write");
    }) else {
        return;
    };
    // O_DIRECT: every read reaches the mount, as asked, once (through the page cache,
    // the kernel would read a page again after a failed read, hiding the failure).
    let big = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(fx.mnt("big"))
        .expect("open big");
    // Far apart: from the second on, the mount takes them for reads at random.
    for at in [
        5 * MIB + 3 * SMALL,
        9 * MIB + 7 * SMALL,
        2 * MIB + 11 * SMALL,
    ] {
        let mut buf = vec![0u8; SMALL];
        big.read_exact_at(&mut buf, at as u64)
            .expect("a small read");
        assert!(buf == data[at..at + SMALL], "{SMALL} bytes at {at}");
    }
    let before = fx.mount.stats();
    assert!(
        before.get("reads_at_once") >= 2,
        "small reads at random went out from the session thread: {before}"
    );
    let at = 13 * MIB + 5 * SMALL;
    let got = read_across_a_restart(&mut fx, big, at, SMALL, &before);
    assert!(got == data[at..at + SMALL], "bytes after the restart");
    let after = fx.mount.stats();
    assert_eq!(
        after.get("reads_at_once"),
        before.get("reads_at_once") + 1,
        "the lost read went out from the session thread, its second try did not: {after}"
    );
    assert_eq!(
        after.get_or_zero("requests.read"),
        before.get_or_zero("requests.read") + 2,
        "the lost read was sent, then read again through a new handle: {after}"
    );
    reopened_once_then_unmount(&mut fx, &before, &after);
}

/// An operation that finds the server gone waits for it (up to `--timeout`) instead of
/// failing: a server restarted meanwhile answers it. The mount must have been trying to
/// reach the server (`connect_failures`) before the server comes back.
#[test]
fn an_operation_waits_for_a_restarting_server() {
    let Some(mut fx) = fixture_with(&[], &["--timeout", "60"], populate) else {
        return;
    };
    assert_eq!(fs::read(fx.mnt("top")).expect("read"), b"top");
    let before = fx.mount.stats();
    fx.server.kill();
    let (tx, rx) = std::sync::mpsc::channel();
    let p = fx.mnt("d2/file");
    std::thread::spawn(move || {
        let _ = tx.send(fs::read(p));
    });
    let trying = ferry_tests::poll_until(DEADLINE, || {
        fx.mount.stats().get("connect_failures") > before.get("connect_failures")
    });
    assert!(trying, "the mount never tried to reach the dead server");
    fx.server.restart();
    let got = rx
        .recv_timeout(DEADLINE)
        .expect("the read hung")
        .expect("a read while the server restarted");
    assert_eq!(got, b"content");
    assert!(fx.mount.stats().get("reconnects") > before.get("reconnects"));
    fx.mount
        .unmount()
        .unwrap_or_else(|e| panic!("unmount after the restart: {e}"));
}

/// `data` written at `off` of the model `buf`.
fn put(buf: &mut Vec<u8>, off: usize, data: &[u8]) {
    if buf.len() < off + data.len() {
        buf.resize(off + data.len(), 0);
    }
    buf[off..off + data.len()].copy_from_slice(data);
}

/// Closes `f` with [`DEADLINE`].
#[track_caller]
fn close_in_time(name: &str, f: fs::File) -> io::Result<()> {
    with_deadline(DEADLINE, move || ferry_tests::sys::close(f))
        .unwrap_or_else(|| panic!("close of {name}: still blocked after {DEADLINE:?}"))
}

/// Files are opened and changed through the mount, each its own way; the server is
/// killed and started again before the closes, and more is written after it is back.
/// Each `close()` returns 0 and the export has the new content byte for byte: the mount
/// sent again what the killed server's staging files lost (`uploads_replayed`).
#[test]
fn writers_survive_a_restart() {
    const MIB: usize = 1 << 20;
    let mut rng = ferry_tests::rng::Rng::new(0x5e5e);
    let old_small = rng.bytes(300_000);
    let old_big = rng.bytes(6 * MIB);
    let Some(mut fx) = fixture_with(&[], &["--timeout", "10"], |e| {
        for name in ["in_place", "o_trunc", "ftruncate"] {
            fs::write(e.join(name), &old_small).expect("write");
        }
        fs::write(e.join("in_flight"), &old_big).expect("write");
    }) else {
        return;
    };
    let before = fx.mount.stats();
    // Forked before any file is open: nothing forks while they are.
    let next = fx.server.prepare_restart();
    let no_spawns = ferry_tests::process::no_spawns();
    // (name, open file, what the export must hold after the close)
    let mut open: Vec<(&str, fs::File, Vec<u8>)> = Vec::new();
    let opened = |name: &str, create: bool, trunc: bool| {
        fs::OpenOptions::new()
            .write(true)
            .create_new(create)
            .truncate(trunc)
            .open(fx.mnt(name))
            .unwrap_or_else(|e| panic!("{name}: open: {e}"))
    };
    {
        let (f, mut want) = (opened("in_place", false, false), old_small.clone());
        let d = rng.bytes(64 * 1024);
        f.write_all_at(&d, 1000).expect("in_place: write");
        put(&mut want, 1000, &d);
        open.push(("in_place", f, want));
    }
    {
        let mut f = opened("o_trunc", false, true);
        let d = rng.bytes(150_000);
        f.write_all(&d).expect("o_trunc: write");
        open.push(("o_trunc", f, d));
    }
    {
        let f = opened("ftruncate", false, false);
        f.set_len(100).expect("ftruncate: set_len");
        let d = rng.bytes(20_000);
        f.write_all_at(&d, 100).expect("ftruncate: write");
        let mut want = old_small[..100].to_vec();
        put(&mut want, 100, &d);
        open.push(("ftruncate", f, want));
    }
    {
        let mut f = opened("new", true, false);
        let d = rng.bytes(100_000);
        f.write_all(&d).expect("new: write");
        open.push(("new", f, d));
    }
    {
        // Written behind: still on the way when the server dies.
        let (f, mut want) = (opened("in_flight", false, false), old_big.clone());
        let d = rng.bytes(4 * MIB);
        f.write_all_at(&d, MIB as u64).expect("in_flight: write");
        put(&mut want, MIB, &d);
        open.push(("in_flight", f, want));
    }

    fx.server.restart_prepared(next);
    // More changes once the server is back, through the same descriptors.
    for (name, f, want) in &mut open {
        let d = rng.bytes(10_000);
        let at = want.len() / 2;
        f.write_all_at(&d, at as u64)
            .unwrap_or_else(|e| panic!("{name}: write after the restart: {e}"));
        put(want, at, &d);
    }
    // A time set after the restart (as `tar` does before each close) is the file's
    // mtime once it is committed.
    let mtime = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let (_, new_file, _) = open.iter().find(|(n, _, _)| *n == "new").expect("new");
    new_file
        .set_modified(mtime)
        .expect("futimens after the restart");
    let n = open.len() as u64;
    for (name, f, want) in open {
        close_in_time(name, f).unwrap_or_else(|e| {
            panic!(
                "close of {name} after a restart: {e}\n--- mount log ---\n{}",
                fx.mount.log()
            )
        });
        let got = fs::read(fx.exp(name)).expect("read the export");
        ferry_tests::data::assert_same_bytes(&got, &want, &format!("{name} on the export"));
        let through = fs::read(fx.mnt(name)).expect("read through the mount");
        ferry_tests::data::assert_same_bytes(&through, &want, &format!("{name} through the mount"));
    }
    drop(no_spawns);
    assert_eq!(
        fs::metadata(fx.exp("new"))
            .expect("stat")
            .modified()
            .expect("mtime"),
        mtime,
        "the mtime set after the restart"
    );
    let after = fx.mount.stats();
    assert_eq!(
        after.get("uploads_replayed") - before.get("uploads_replayed"),
        n,
        "one replay per file: {after}"
    );
    fx.mount
        .unmount()
        .unwrap_or_else(|e| panic!("unmount after the restart: {e}"));
}

/// With `--spool-writes`, a large copy into the mount, far past what memory keeps for
/// sending again (8 MiB per file; the rest goes to a spool file in the cache directory),
/// when the server restarts: the close returns 0 and the export has every byte. The
/// spool leaves nothing behind in the cache directory.
#[test]
fn a_large_writer_survives_a_restart() {
    const MIB: usize = 1 << 20;
    let mut rng = ferry_tests::rng::Rng::new(0x1a76e);
    let cache = tempfile::tempdir().expect("cache dir");
    let cache_arg = cache.path().to_string_lossy().into_owned();
    let args = [
        "--timeout",
        "10",
        "--cache-dir",
        &cache_arg,
        "--spool-writes",
    ];
    let Some((mut fx, _, next, no_spawns)) = file_for_restart(&mut rng, 12 * MIB, &args) else {
        return;
    };
    let files_before = files_under(cache.path());
    let f = open_to_write(&fx.mnt("f"));
    // Sequential, as `cp` writes, then a change in the middle of it.
    let mut want = rng.bytes(40 * MIB);
    for (i, piece) in want.chunks(MIB).enumerate() {
        f.write_all_at(piece, (i * MIB) as u64).expect("write");
    }
    let d = rng.bytes(100_000);
    f.write_all_at(&d, 20 * MIB as u64 + 7).expect("write");
    put(&mut want, 20 * MIB + 7, &d);
    fx.server.restart_prepared(next);
    let d = rng.bytes(MIB);
    f.write_all_at(&d, 40 * MIB as u64)
        .expect("write after the restart");
    put(&mut want, 40 * MIB, &d);
    close_in_time("f", f).unwrap_or_else(|e| {
        panic!(
            "close after a restart with 41 MiB uncommitted: {e}\n--- mount log ---\n{}",
            fx.mount.log()
        )
    });
    drop(no_spawns);
    let got = fs::read(fx.exp("f")).expect("read the export");
    ferry_tests::data::assert_same_bytes(&got, &want, "the export");
    let after = fx.mount.stats();
    assert_eq!(after.get("uploads_replayed"), 1);
    assert_eq!(after.get("spool_bytes"), 0, "spool kept after the commit");
    assert_eq!(
        files_under(cache.path()),
        files_before,
        "files left in the cache directory"
    );
}

/// Names of the files under `dir`, recursively, sorted.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// More uncommitted data than the mount keeps for sending again (8 MiB in memory; with
/// `--spool-writes` also up to `--cache-size` spooled) when the server restarts: the
/// close fails and the export keeps its old content, which a reader reads meanwhile.
#[test]
fn a_writer_past_what_is_kept_fails_its_close_after_a_restart() {
    let mut rng = ferry_tests::rng::Rng::new(0xb16);
    for spool in [false, true] {
        let mut args = vec!["--timeout", "10"];
        if spool {
            args.extend(["--spool-writes", "--cache-size", "4M"]);
        }
        past_what_is_kept(&args, &mut rng);
    }
}

fn past_what_is_kept(args: &[&str], rng: &mut ferry_tests::rng::Rng) {
    const MIB: usize = 1 << 20;
    let Some((mut fx, old, next, no_spawns)) = file_for_restart(rng, 12 * MIB, args) else {
        return;
    };
    let f = open_to_write(&fx.mnt("f"));
    f.write_all_at(&rng.bytes(16 * MIB), 0).expect("write");
    fx.server.restart_prepared(next);
    // A reader of the file still reads, what the server has: the writes it cannot
    // stage again are lost anyway.
    let reader = fs::File::open(fx.mnt("f")).expect("open to read");
    ferry_tests::sys::fadvise_dontneed(&reader).expect("fadvise");
    let mut buf = vec![0u8; 256 * 1024];
    reader
        .read_exact_at(&mut buf, 4 * MIB as u64)
        .unwrap_or_else(|e| panic!("{args:?}: a read after the restart: {e}"));
    assert!(
        buf == old[4 * MIB..4 * MIB + buf.len()],
        "{args:?}: the reader's bytes"
    );
    drop(reader);
    let err = close_in_time("f", f).expect_err("close after losing 16 MiB of staged writes");
    drop(no_spawns);
    assert!(
        err.raw_os_error().is_some_and(|n| ACCEPTED.contains(&n)),
        "{args:?}: close failed with {err}, expected EIO"
    );
    let now = fs::read(fx.exp("f")).expect("read the export");
    assert!(
        now == old,
        "{args:?}: the export changed although the close failed"
    );
    assert_eq!(fx.mount.stats().get("uploads_replayed"), 0);
}

/// Two descriptors write one file; the server restarts in between, and the second is
/// opened after it (getting a handle on the new connection). A reader sees both writes
/// before the closes; both closes return 0 and the export has both writes: the first
/// descriptor's, staged on the killed server, are sent again although no request of
/// theirs failed.
#[test]
fn a_writer_opened_after_a_restart_does_not_hide_earlier_writes() {
    let mut rng = ferry_tests::rng::Rng::new(0x2f11);
    let Some((mut fx, old, next, no_spawns)) = one_file_for_restart(&mut rng, "10") else {
        return;
    };
    let path = fx.mnt("f");
    let open = || open_to_write(&path);
    let mut want = old.clone();
    let a = open();
    let d = rng.bytes(30_000);
    a.write_all_at(&d, 10_000).expect("first write");
    put(&mut want, 10_000, &d);
    // A read waits for the writes of the file in flight: this one is answered (staged
    // on the server) before the server dies, so no request of it fails.
    fs::read(&path).expect("read before the restart");
    fx.server.restart_prepared(next);
    let b = open();
    let d = rng.bytes(30_000);
    b.write_all_at(&d, 100_000).expect("second write");
    put(&mut want, 100_000, &d);
    // With the kernel's copy dropped, a reader of this mount reads both writes: the
    // second descriptor's new handle lacks the first's, which are staged again first.
    ferry_tests::sys::fadvise_dontneed(&b).expect("fadvise");
    let got = fs::read(&path).expect("read between the writes and the closes");
    ferry_tests::data::assert_same_bytes(&got, &want, "read before the closes");
    close_in_time("the first descriptor", a).expect("close of the first descriptor");
    close_in_time("the second descriptor", b).expect("close of the second descriptor");
    drop(no_spawns);
    let got = fs::read(fx.exp("f")).expect("read the export");
    ferry_tests::data::assert_same_bytes(&got, &want, "the export");
}

/// A descriptor open for reading and writing (a database's) goes on reading after a
/// restart, and it and a reader of the file read what it wrote before: its uncommitted
/// writes are staged again on the new server before a read goes there. Staged once:
/// the close then commits without sending them again.
#[test]
fn a_writer_reads_its_own_writes_after_a_restart() {
    const MIB: usize = 1 << 20;
    let mut rng = ferry_tests::rng::Rng::new(0x4ead);
    // Larger than what an open brings along: reads go to the server.
    let Some((mut fx, old, next, no_spawns)) =
        file_for_restart(&mut rng, 4 * MIB, &["--timeout", "10"])
    else {
        return;
    };
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.mnt("f"))
        .expect("open");
    let reader = fs::File::open(fx.mnt("f")).expect("open to read");
    let mut want = old.clone();
    let d = rng.bytes(64 * 1024);
    f.write_all_at(&d, MIB as u64).expect("write");
    put(&mut want, MIB, &d);
    fx.server.restart_prepared(next);
    let read_at = |through: &fs::File, at: usize, len: usize, what: &str| {
        let mut buf = vec![0u8; len];
        through
            .read_exact_at(&mut buf, at as u64)
            .unwrap_or_else(|e| panic!("{what}: {e}\n--- mount log ---\n{}", fx.mount.log()));
        ferry_tests::data::assert_same_bytes(&buf, &want[at..at + len], what);
    };
    // Never read before: the kernel has none of it, the mount asks the server.
    read_at(&f, 3 * MIB, 128 * 1024, "a read after the restart");
    // The write, with the kernel's copy of it dropped: what the server staged again.
    ferry_tests::sys::fadvise_dontneed(&f).expect("fadvise");
    let (at, len) = (MIB - 32 * 1024, 128 * 1024);
    read_at(
        &reader,
        at,
        len,
        "the write, read through another descriptor",
    );
    read_at(&f, at, len, "the write, read through its own descriptor");
    drop(reader);
    let d = rng.bytes(10_000);
    f.write_all_at(&d, 2 * MIB as u64 + 5)
        .expect("write after the restart");
    put(&mut want, 2 * MIB + 5, &d);
    close_in_time("f", f).expect("close after the restart");
    drop(no_spawns);
    let got = fs::read(fx.exp("f")).expect("read the export");
    ferry_tests::data::assert_same_bytes(&got, &want, "the export");
    let after = fx.mount.stats();
    assert_eq!(
        after.get("uploads_replayed"),
        1,
        "staged again once: {after}"
    );
}

/// A close whose upload failed for good (the server away longer than `--timeout`)
/// takes the changes with it: a descriptor of the same file that writes again once the
/// server is back must not commit its new writes alone on top of the old content, and
/// one that wrote before must not report success. Both closes fail too, and the export
/// keeps the old content.
#[test]
fn writes_after_a_failed_upload_fail_too() {
    let mut rng = ferry_tests::rng::Rng::new(0xfa12);
    let Some((mut fx, old, next, no_spawns)) = one_file_for_restart(&mut rng, "2") else {
        return;
    };
    let path = fx.mnt("f");
    let open = || open_to_write(&path);
    let (a, b, c) = (open(), open(), open());
    a.write_all_at(&rng.bytes(30_000), 0)
        .expect("write through the first");
    b.write_all_at(&rng.bytes(30_000), 50_000)
        .expect("write through the second");
    c.write_all_at(&rng.bytes(30_000), 150_000)
        .expect("write through the third");
    fx.server.kill();
    close_in_time("the first descriptor", a).expect_err("close with the server away");
    fx.server.restart_prepared(next);
    close_in_time("the third descriptor", c)
        .expect_err("close of a descriptor whose writes were lost, writing nothing after");
    // Answered before the server has it, like every write: the close reports it.
    let _ = b.write_all_at(&rng.bytes(30_000), 100_000);
    close_fails("the second descriptor", b);
    drop(no_spawns);
    let now = fs::read(fx.exp("f")).expect("read the export");
    assert!(now == old, "the export changed although the uploads failed");
}

/// A writer that opens once an upload of the file's other writers has failed starts
/// afresh: its own writes commit at its close, while the descriptors that lost their
/// changes keep failing (and commit nothing of theirs).
#[test]
fn a_writer_opened_after_a_failed_upload_starts_afresh() {
    let mut rng = ferry_tests::rng::Rng::new(0xfa13);
    let Some((mut fx, old, next, no_spawns)) = one_file_for_restart(&mut rng, "2") else {
        return;
    };
    let path = fx.mnt("f");
    let (a, b) = (open_to_write(&path), open_to_write(&path));
    a.write_all_at(&rng.bytes(30_000), 0)
        .expect("write through the first");
    b.write_all_at(&rng.bytes(30_000), 50_000)
        .expect("write through the second");
    fx.server.kill();
    close_in_time("the first descriptor", a).expect_err("close with the server away");
    fx.server.restart_prepared(next);
    // `b` is still open: its changes were lost with the upload.
    let fresh = rng.bytes(20_000);
    let d = open_to_write(&path);
    d.write_all_at(&fresh, 120_000)
        .expect("write through a descriptor opened after the failure");
    close_in_time("the descriptor opened after the failure", d)
        .expect("close of a writer that lost nothing");
    let mut want = old.clone();
    want[120_000..140_000].copy_from_slice(&fresh);
    let now = fs::read(fx.exp("f")).expect("read the export");
    assert!(now == want, "the export lacks the fresh writer's bytes");
    // Answered before the server has it, like every write: the close reports it.
    let _ = b.write_all_at(&rng.bytes(30_000), 100_000);
    close_fails("the second descriptor", b);
    drop(no_spawns);
    let now = fs::read(fx.exp("f")).expect("read the export");
    assert!(
        now == want,
        "the failed descriptor's writes reached the export"
    );
}

/// A create and a `mkdir` on their way when the server dies did not run (the names are
/// still free once a new server is up): they are sent again and succeed.
#[test]
fn creates_in_flight_are_sent_again_when_their_names_are_free() {
    let Some(mut fx) = fixture_with(&[], &["--timeout", "60"], populate) else {
        return;
    };
    // Made through the mount: names in it are known free without asking the server,
    // so the create and the mkdir themselves are what is on the way.
    // (Two: a create holds its directory's lock until it is answered.)
    fs::create_dir(fx.mnt("made")).expect("mkdir");
    fs::create_dir(fx.mnt("made2")).expect("mkdir");
    let before = fx.mount.stats();
    fx.server.signal(libc::SIGSTOP);
    let (tx, rx) = std::sync::mpsc::channel();
    let (file, dir) = (fx.mnt("made/new"), fx.mnt("made2/newdir"));
    let txf = tx.clone();
    std::thread::spawn(move || {
        let r = fs::File::create_new(&file).and_then(|mut f| f.write_all(b"new"));
        let _ = txf.send(("create", r));
    });
    std::thread::spawn(move || {
        let _ = tx.send(("mkdir", fs::create_dir(&dir)));
    });
    let sent = ferry_tests::poll_until(DEADLINE, || {
        let st = fx.mount.stats();
        st.get_or_zero("requests.create") > before.get_or_zero("requests.create")
            && st.get_or_zero("requests.mkdir") > before.get_or_zero("requests.mkdir")
    });
    assert!(
        sent,
        "the create and the mkdir never reached the connection"
    );
    // SIGKILL ends the stopped server: neither request ran.
    fx.server.restart();
    for _ in 0..2 {
        let (what, r) = rx.recv_timeout(DEADLINE).expect("an operation hung");
        r.unwrap_or_else(|e| panic!("{what} across the restart: {e}"));
    }
    assert_eq!(fs::read(fx.exp("made/new")).expect("the new file"), b"new");
    assert!(fx.exp("made2/newdir").is_dir(), "the new directory");
    let after = fx.mount.stats();
    assert!(
        after.get("retried") >= before.get("retried") + 2,
        "both were sent again: {after}"
    );
}

/// [`file_for_restart`] of 200,000 bytes, mounted with `--timeout timeout`.
fn one_file_for_restart(rng: &mut ferry_tests::rng::Rng, timeout: &str) -> Option<ForRestart> {
    file_for_restart(rng, 200_000, &["--timeout", timeout])
}

/// A mount, its export holding `f` (random bytes, returned), the next server forked
/// ([`ferry_tests::server::TestServer::prepare_restart`]), and a guard that keeps every
/// test from forking until dropped (a fork with files open would commit them).
type ForRestart = (
    ferry_tests::Fixture,
    Vec<u8>,
    ferry_tests::server::PreparedServer,
    std::sync::RwLockWriteGuard<'static, ()>,
);

/// For tests that restart the server while they hold file `f` open for writing: `f` of
/// `size` random bytes, mounted with `args` (see [`ForRestart`]). No process may be
/// started (`ferry stats` included) until the guard is dropped.
fn file_for_restart(
    rng: &mut ferry_tests::rng::Rng,
    size: usize,
    args: &[&str],
) -> Option<ForRestart> {
    let old = rng.bytes(size);
    let fx = fixture_with(&[], args, |e| {
        fs::write(e.join("f"), &old).expect("write");
    })?;
    let next = fx.server.prepare_restart();
    Some((fx, old, next, ferry_tests::process::no_spawns()))
}

/// The close of `f`, whose earlier writes were lost, fails in time with `EIO` (or
/// another of [`ACCEPTED`]).
fn close_fails(what: &str, f: fs::File) {
    let err =
        close_in_time(what, f).expect_err("close of a descriptor whose earlier writes were lost");
    assert!(
        err.raw_os_error().is_some_and(|n| ACCEPTED.contains(&n)),
        "close of {what} failed with {err}, expected EIO"
    );
}

/// `path` opened for writing.
fn open_to_write(path: &std::path::Path) -> fs::File {
    fs::OpenOptions::new().write(true).open(path).expect("open")
}
