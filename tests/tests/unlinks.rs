//! Unlinks answered before the server confirms them (`fuse-client/src/fs/unlinks.rs`):
//! `rm -rf` does not wait a round trip per file, the server still ends up with exactly
//! what was asked for, a refusal that comes later brings the file back and is reported
//! by `fsync` of its directory, and whatever cannot be predicted stays synchronous.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::{Fixture, assert_errno, fixture_with, poll_until, run, with_deadline};

const DEADLINE: Duration = Duration::from_secs(10);

fn events_live(fx: &Fixture) {
    assert!(
        poll_until(DEADLINE, || fx.mount.stats().flag("events_live")),
        "the event stream never came up\n{}",
        fx.mount.log()
    );
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[test]
fn rm_rf_does_not_wait_for_each_unlink_and_the_server_follows() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        for d in 0..5 {
            let dir = e.join(format!("tree/d{d}"));
            fs::create_dir_all(&dir).expect("mkdir");
            for i in 0..40 {
                fs::write(dir.join(format!("f{i:02}")), format!("{d}/{i}")).expect("write");
            }
        }
        fs::write(e.join("keep"), b"keep").expect("write");
    }) else {
        return;
    };
    events_live(&fx);
    let before = fx.mount.stats();
    run(Command::new("rm").arg("-rf").arg(fx.mnt("tree"))).assert_success();
    // The rmdir of `tree` reached the server after every unlink in it: nothing is left,
    // with no fsync and no polling.
    assert!(!fx.exp("tree").exists(), "export still has the tree");
    assert_eq!(fs::read(fx.exp("keep")).expect("keep"), b"keep");
    let after = fx.mount.stats();
    assert_eq!(
        after.get("unlinks_behind") - before.get("unlinks_behind"),
        200,
        "every file's unlink should have been answered ahead of the server\n{after}"
    );
    assert_eq!(after.get("unlinks_behind_failed"), 0, "{after}");
    assert_errno(fs::metadata(fx.mnt("tree")), libc::ENOENT);
}

#[test]
fn what_cannot_be_predicted_is_unlinked_synchronously() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("open"), b"still readable").expect("write");
        fs::write(e.join("linked"), b"two names").expect("write");
        fs::hard_link(e.join("linked"), e.join("other-name")).expect("link");
        fs::write(e.join("plain"), b"plain").expect("write");
    }) else {
        return;
    };
    events_live(&fx);
    let mut held = File::open(fx.mnt("open")).expect("open");
    assert_eq!(fs::metadata(fx.mnt("linked")).expect("stat").nlink(), 2);
    let before = fx.mount.stats().get("unlinks_behind");

    // Open on this mount: the client must keep answering for it, so it waits.
    fs::remove_file(fx.mnt("open")).expect("unlink open file");
    assert!(!fx.exp("open").exists(), "export still has the open file");
    let mut s = String::new();
    held.read_to_string(&mut s).expect("read after unlink");
    assert_eq!(s, "still readable");

    // Two names: the other one's link count must come from the server.
    fs::remove_file(fx.mnt("linked")).expect("unlink one of two names");
    assert!(!fx.exp("linked").exists(), "export still has `linked`");
    assert_eq!(fs::metadata(fx.mnt("other-name")).expect("stat").nlink(), 1);

    assert_eq!(fx.mount.stats().get("unlinks_behind"), before);

    // A plain file beside them is (the checks above are not vacuous).
    fs::metadata(fx.mnt("plain")).expect("stat");
    fs::remove_file(fx.mnt("plain")).expect("unlink plain file");
    assert_eq!(fx.mount.stats().get("unlinks_behind"), before + 1);
}

#[test]
fn sync_unlink_mounts_wait_for_the_server() {
    let Some(fx) = fixture_with(&[], &["--sync-unlink"], |e| {
        fs::write(e.join("f"), b"x").expect("write");
    }) else {
        return;
    };
    events_live(&fx);
    fs::metadata(fx.mnt("f")).expect("stat");
    fs::remove_file(fx.mnt("f")).expect("unlink");
    assert!(!fx.exp("f").exists(), "export still has f");
    assert_eq!(fx.mount.stats().get("unlinks_behind"), 0);
}

/// Clears the immutable flag again, also when the test fails (or the export could not
/// be removed).
struct Immutable(PathBuf);

impl Immutable {
    /// `None` where the export's filesystem has no immutable flag.
    fn set(path: &Path) -> Option<Immutable> {
        let out = run(Command::new("chattr").arg("+i").arg(path));
        if !out.status.success() {
            eprintln!(
                "skipping: chattr +i {} failed (filesystem without the flag?): {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(Immutable(path.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn an_unlink_the_server_refuses_later_brings_the_file_back() {
    let Some(fx) = fixture_with(&[], &[], |_| {}) else {
        return;
    };
    events_live(&fx);
    // Made through the mount: the client knows every name in `d`, and answers lookups
    // of others itself, which must stop once it is proven wrong. The file comes from
    // the export (nothing of ours is being written or released), announced by its event.
    fs::create_dir(fx.mnt("d")).expect("mkdir");
    fs::write(fx.exp("d/f"), b"precious").expect("write on the export");
    assert!(
        poll_until(DEADLINE, || fx.mnt("d/f").exists()),
        "the new file never showed through the mount"
    );
    // Every event about it has been delivered once this last one shows (a late one
    // would bring the name back by itself and hide what is tested below).
    fs::set_permissions(fx.exp("d/f"), fs::Permissions::from_mode(0o600)).expect("chmod");
    assert!(
        poll_until(DEADLINE, || fs::metadata(fx.mnt("d/f"))
            .is_ok_and(|m| m.mode() & 0o777 == 0o600)),
        "the mode change never showed through the mount"
    );
    // The client cannot know (the flag change makes no event): to it the file is a
    // plain one it may delete.
    let Some(_flag) = Immutable::set(&fx.exp("d/f")) else {
        return;
    };
    fs::remove_file(fx.mnt("d/f")).expect("answered before the server refused");
    assert_eq!(fx.mount.stats().get("unlinks_behind"), 1);
    assert_errno(fsync_dir(&fx.mnt("d")), libc::EPERM);
    // Reported once.
    fsync_dir(&fx.mnt("d")).expect("second fsync");
    assert_eq!(fs::read(fx.exp("d/f")).expect("export"), b"precious");
    assert!(
        poll_until(DEADLINE, || fx.mnt("d/f").exists()),
        "the file did not come back on the mount"
    );
    assert_eq!(fs::read(fx.mnt("d/f")).expect("read"), b"precious");
    let stats = fx.mount.stats();
    assert_eq!(stats.get("unlinks_behind_failed"), 1, "{stats}");
    assert!(
        fx.mount.log().contains("the file stays"),
        "no warning in the mount's log:\n{}",
        fx.mount.log()
    );
}

/// The unlink returns while the server cannot answer anything; `fsync` of the directory
/// returns only once the server has applied it.
#[test]
fn unlink_returns_at_once_and_fsync_of_the_directory_waits_for_the_server() {
    // A long timeout: the frozen server must not be given up on.
    let Some(mut fx) = fixture_with(&[], &["--timeout", "60"], |e| {
        fs::write(e.join("f"), b"x").expect("write");
    }) else {
        return;
    };
    events_live(&fx);
    fs::metadata(fx.mnt("f")).expect("stat");
    // Opened before: opening it asks the server, which would wait for it as well.
    let dir = File::open(fx.mnt("")).expect("open the directory");
    fx.server.signal(libc::SIGSTOP);
    let mnt = fx.mount.path().to_path_buf();
    let unlinked = with_deadline(DEADLINE, move || fs::remove_file(mnt.join("f")));
    let frozen_export_has_it = fx.exp("f").exists();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let synced = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let _ = tid_tx.send(unsafe { libc::gettid() });
        dir.sync_all()
    });
    let tid = tid_rx.recv().expect("fsync thread id");
    // It must be waiting inside fsync while the server cannot answer.
    let in_fsync = || {
        fs::read_to_string(format!("/proc/self/task/{tid}/syscall"))
            .is_ok_and(|s| s.split_whitespace().next() == Some(&libc::SYS_fsync.to_string()))
    };
    let waited = poll_until(DEADLINE, in_fsync);
    fx.server.signal(libc::SIGCONT);
    assert!(
        waited,
        "fsync of the directory did not wait for the stopped server"
    );
    let synced = synced.join().expect("fsync thread");
    match unlinked {
        Some(r) => r.expect("unlink while the server is stopped"),
        None => panic!("unlink waited for a stopped server"),
    }
    assert!(
        frozen_export_has_it,
        "a stopped server cannot have applied it"
    );
    synced.expect("fsync of the directory");
    assert!(
        !fx.exp("f").exists(),
        "fsync returned before the server applied it"
    );
    assert!(fx.server.is_running());
}

/// While an unlink is on its way, the kernel may keep the directory's attributes from
/// before it for a clock tick; `fsync` of the directory drops them, so a `stat` after it
/// shows the times the server gave the directory.
#[test]
fn fsync_of_the_directory_shows_its_times_after_the_unlinks() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::create_dir(e.join("d")).expect("mkdir");
        for i in 0..10 {
            fs::write(e.join(format!("d/f{i}")), b"x").expect("write");
        }
    }) else {
        return;
    };
    events_live(&fx);
    for i in 0..10 {
        fs::metadata(fx.mnt(format!("d/f{i}"))).expect("stat");
    }
    let before = fx.mount.stats().get("unlinks_behind");
    for i in 0..10 {
        fs::remove_file(fx.mnt(format!("d/f{i}"))).expect("unlink");
        // Right after the unlink: the attributes of before it, kept for a tick.
        fs::metadata(fx.mnt("d")).expect("stat the directory");
        fsync_dir(&fx.mnt("d")).expect("fsync the directory");
        let (seen, server) = (
            fs::metadata(fx.mnt("d")).expect("stat the directory"),
            fs::metadata(fx.exp("d")).expect("stat the export's directory"),
        );
        assert_eq!(
            (
                seen.mtime(),
                seen.mtime_nsec(),
                seen.ctime(),
                seen.ctime_nsec()
            ),
            (
                server.mtime(),
                server.mtime_nsec(),
                server.ctime(),
                server.ctime_nsec()
            ),
            "after unlinking f{i} and fsync of the directory"
        );
    }
    assert_eq!(fx.mount.stats().get("unlinks_behind") - before, 10);
}
