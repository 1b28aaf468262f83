//! Other users on the client: with `--allow-other` a non-root uid can use the mount, its
//! files get its ownership on the export, and permission bits are enforced against it.
//! Without `--allow-other` only the mounting user (root) gets in.
//!
//! The other user is uid/gid 1234 through `setpriv` (util-linux); skipped where missing.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use ferry_tests::{
    Output, RemovedOnDrop, TestMount, TestServer, assert_errno, ferry, fixture_with, require_fuse,
    run,
};

const UID: u32 = 1234;

fn have_setpriv() -> bool {
    let mut cmd = Command::new("setpriv");
    cmd.arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    ferry_tests::process::spawn(&mut cmd)
        .and_then(|mut child| child.wait())
        .is_ok_and(|s| s.success())
}

/// Runs `sh -c script` as uid/gid 1234 with no supplementary groups.
fn as_user(script: &str) -> Output {
    as_uid(UID, script)
}

/// Runs `sh -c script` as uid/gid `uid` with no supplementary groups.
fn as_uid(uid: u32, script: &str) -> Output {
    run(Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .args(["sh", "-c", script]))
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

#[test]
fn allow_other_lets_another_user_in_with_its_own_identity() {
    if !have_setpriv() {
        eprintln!("skipping: setpriv is not installed");
        return;
    }
    // The export root must be searchable by the other user.
    let Some(fx) = fixture_with(&[], &["--allow-other"], |e| chmod(e, 0o755)) else {
        return;
    };
    fs::create_dir(fx.mnt("shared")).expect("mkdir");
    chmod(&fx.mnt("shared"), 0o777);
    fs::write(fx.mnt("shared/rootfile"), b"root's").expect("write");
    chmod(&fx.mnt("shared/rootfile"), 0o644);
    fs::create_dir(fx.mnt("private")).expect("mkdir");
    chmod(&fx.mnt("private"), 0o700);
    fs::write(fx.mnt("private/hidden"), b"hidden").expect("write");

    let m = fx.mount.path().display().to_string();
    as_user(&format!("touch '{m}/shared/f'")).assert_success();
    let md = fs::metadata(fx.exp("shared/f")).expect("the user's file is not on the export");
    assert_eq!((md.uid(), md.gid()), (UID, UID), "owner on the export");
    let md = fs::metadata(fx.mnt("shared/f")).expect("stat through the mount");
    assert_eq!((md.uid(), md.gid()), (UID, UID), "owner through the mount");

    as_user(&format!(
        "mkdir '{m}/shared/d' && echo mine > '{m}/shared/d/g'"
    ))
    .assert_success();
    let md = fs::metadata(fx.exp("shared/d/g")).expect("export");
    assert_eq!((md.uid(), md.gid()), (UID, UID));
    assert_eq!(fs::read(fx.exp("shared/d/g")).expect("export"), b"mine\n");

    // Reading a 0644 root file is allowed, writing it is not.
    let out = as_user(&format!("cat '{m}/shared/rootfile'"));
    out.assert_success();
    assert_eq!(out.stdout, b"root's");
    let out = as_user(&format!("echo x > '{m}/shared/rootfile'"));
    out.assert_failure();
    assert!(out.stderr_str().contains("Permission denied"), "{out}");
    assert_eq!(
        fs::read(fx.exp("shared/rootfile")).expect("export"),
        b"root's"
    );
    // Nor chmod it, nor look into a 0700 root directory.
    as_user(&format!("chmod 666 '{m}/shared/rootfile'")).assert_failure();
    assert_eq!(
        fs::metadata(fx.exp("shared/rootfile"))
            .expect("export")
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
    let out = as_user(&format!("cat '{m}/private/hidden'"));
    out.assert_failure();
    assert!(out.stderr_str().contains("Permission denied"), "{out}");
    as_user(&format!("touch '{m}/private/intruder'")).assert_failure();
    assert!(!fx.exp("private/intruder").exists());
    // Creating in a root-owned 0755 directory is refused.
    as_user(&format!("touch '{m}/nope'")).assert_failure();
    assert!(!fx.exp("nope").exists());
    // The user's own file: it may chmod it, and root may read it.
    as_user(&format!(
        "chmod 600 '{m}/shared/f' && echo own > '{m}/shared/f'"
    ))
    .assert_success();
    assert_eq!(
        fs::metadata(fx.exp("shared/f"))
            .expect("export")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        fs::read(fx.mnt("shared/f")).expect("root reads it"),
        b"own\n"
    );
}

#[test]
fn without_allow_other_other_users_are_kept_out() {
    if !have_setpriv() {
        eprintln!("skipping: setpriv is not installed");
        return;
    }
    let Some(fx) = fixture_with(&[], &[], |e| {
        chmod(e, 0o777);
        fs::write(e.join("open"), b"world-readable").expect("write");
        chmod(&e.join("open"), 0o644);
    }) else {
        return;
    };
    let m = fx.mount.path().display().to_string();
    let out = as_user(&format!("cat '{m}/open'"));
    out.assert_failure();
    assert!(out.stderr_str().contains("Permission denied"), "{out}");
    // Root, who mounted it, is served.
    assert_eq!(fs::read(fx.mnt("open")).expect("read"), b"world-readable");
}

/// Another user's FUSE mount inside the export (without `allow_other`: `EACCES` to
/// everyone else, root and so `ferryd` included; a user's sshfs in their home directory)
/// is left out of its parent's listing instead of failing it: `ls -l` through a mount
/// and `ferry ls` list the rest, and the name itself gives the error.
#[test]
fn another_users_mount_in_the_export_is_left_out_of_its_listing() {
    if !have_setpriv() {
        eprintln!("skipping: setpriv is not installed");
        return;
    }
    if !require_fuse() {
        return;
    }
    let theirs = TestServer::start();
    let export = ferry_tests::temp_dir("export");
    fs::write(export.path().join("f"), b"mine").expect("write");
    fs::create_dir(export.path().join("sub")).expect("mkdir");
    let their_dir = tempfile::Builder::new()
        .prefix("theirs")
        .tempdir_in(export.path())
        .expect("mountpoint");
    chmod(their_dir.path(), 0o755);
    let name = their_dir
        .path()
        .file_name()
        .and_then(|n| n.to_str())
        .expect("utf-8 name")
        .to_string();
    // Last to go: the export, which its server cannot remove while their mount is in it.
    let _export = RemovedOnDrop(export.path().to_path_buf());
    // The real uid is the user's (the mount's owner, `user_id=`), the effective one
    // root's (the mount syscall: neither /dev/fuse's mode nor fusermount3 matter).
    let uid = UID.to_string();
    // (Its stats socket goes there, not to a /tmp/ferry-1234 left behind.)
    let run_dir = ferry_tests::temp_dir("run");
    let runtime = format!("XDG_RUNTIME_DIR={}", run_dir.path().display());
    let _their_mount = TestMount::try_mount_through(
        &[
            "setpriv",
            "--ruid",
            &uid,
            "--rgid",
            &uid,
            "--clear-groups",
            "env",
            &runtime,
        ],
        their_dir,
        &theirs.remote(),
        &["--no-cache"],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    match fs::symlink_metadata(export.path().join(&name)) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {}
        other => {
            eprintln!("skipping: root may look into another user's FUSE mount here ({other:?})");
            return;
        }
    }
    let server = TestServer::start_on(export, &[]);
    let mount = TestMount::new(&server);

    // The rest of the export is listed, their mount is not.
    let lists_the_rest = |out: &Output| {
        out.assert_success();
        let listed = last_words(out);
        assert!(
            listed.contains(&"f".to_string()) && listed.contains(&"sub".to_string()),
            "{out}"
        );
        assert!(!listed.contains(&name), "{out}");
    };
    lists_the_rest(&run(Command::new("ls").arg("-la").arg(mount.path())));
    assert_eq!(fs::read(mount.join("f")).expect("read"), b"mine");
    assert_errno(fs::symlink_metadata(mount.join(&name)), libc::EACCES);

    lists_the_rest(&run(ferry().args(["ls", &server.remote()])));
}

/// The last word of each line of the output without a trailing `/` (the name in a line
/// of `ls -l` or `ferry ls`).
fn last_words(out: &Output) -> Vec<String> {
    out.stdout_str()
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|w| w.trim_end_matches('/').to_string())
        .collect()
}

/// `nobody`: fusermount3 wants the user to have a name.
const NOBODY: u32 = 65534;

/// A user mounts without root (through fusermount3), reads and writes as itself and
/// unmounts. Between, an old daemon of its that finishes late (held stopped across the
/// unmount and the next mount) leaves the next mount at the same path alone: fuser's own
/// unmount at the end of a session (`fusermount3 -u -z` of the path) took it down.
/// Whether mounts made by `nobody` can be tested here; says why not.
fn can_mount_as_nobody() -> bool {
    if !have_setpriv() || !require_fuse() {
        eprintln!("skipping: setpriv or FUSE missing");
        return false;
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    if !passwd.lines().any(|l| l.split(':').nth(2) == Some("65534")) {
        eprintln!("skipping: no user 65534 (fusermount3 needs a user with a name)");
        return false;
    }
    match fs::metadata("/dev/fuse") {
        Ok(m) if m.permissions().mode() & 0o006 == 0o006 => true,
        _ => {
            eprintln!("skipping: /dev/fuse is not 0666 (scripts/test.sh makes it so)");
            false
        }
    }
}

/// `nobody`'s side of a test: its home (its `XDG_RUNTIME_DIR`, where its mounts keep
/// their stats sockets) and the command prefix that runs a program as it there.
struct Nobody {
    home: tempfile::TempDir,
    wrapper: Vec<String>,
}

impl Nobody {
    fn new() -> Nobody {
        let home = ferry_tests::temp_dir("home");
        std::os::unix::fs::chown(home.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
        let wrapper = vec![
            "setpriv".to_string(),
            "--reuid".to_string(),
            NOBODY.to_string(),
            "--regid".to_string(),
            NOBODY.to_string(),
            "--clear-groups".to_string(),
            "env".to_string(),
            format!("XDG_RUNTIME_DIR={}", home.path().display()),
        ];
        Nobody { home, wrapper }
    }

    /// `program` run as nobody.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(&self.wrapper[0]);
        cmd.args(&self.wrapper[1..]).arg(program);
        cmd
    }

    /// A mount of `server` (whose export becomes writable by everyone) made by nobody.
    fn mount(&self, server: &TestServer) -> TestMount {
        chmod(server.export_path(), 0o777);
        let mp = ferry_tests::temp_dir("mnt");
        std::os::unix::fs::chown(mp.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
        let wrapper: Vec<&str> = self.wrapper.iter().map(String::as_str).collect();
        TestMount::try_mount_through(&wrapper, mp, &server.remote(), &["--no-cache"], None)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

#[test]
fn a_user_mounts_without_root_and_a_late_daemon_leaves_the_next_mount_alone() {
    if !can_mount_as_nobody() {
        return;
    }
    let server = TestServer::start();
    fs::write(server.export("f"), b"root's").expect("write");
    chmod(&server.export("f"), 0o644);
    let nobody = Nobody::new();
    let old = nobody.mount(&server);
    let m = old.path().display().to_string();
    let info = ferry_tests::mount::mount_at(old.path()).expect("in mountinfo");
    assert_eq!(info.fstype, "fuse.ferry", "{info:?}");

    let out = as_uid(NOBODY, &format!("cat '{m}/f' && echo mine > '{m}/g'"));
    out.assert_success();
    assert_eq!(out.stdout, b"root's");
    let md = fs::metadata(server.export("g")).expect("the user's file on the export");
    assert_eq!((md.uid(), md.gid()), (NOBODY, NOBODY));
    assert_eq!(fs::read(server.export("g")).expect("read"), b"mine\n");

    let pids = old.daemon_pids();
    assert!(!pids.is_empty(), "no daemon for {m}");
    let stopped = ferry_tests::sys::stop(&pids);
    run(ferry().arg("umount").arg(old.path())).assert_success();
    assert!(!old.is_mounted());
    let mut next = nobody.command(ferry_tests::ferry_bin());
    next.args(["mount", "--no-cache", "--log"])
        .arg(nobody.home.path().join("next.log"))
        .arg(server.remote())
        .arg(old.path());
    run(&mut next).assert_success();
    as_uid(NOBODY, &format!("cat '{m}/g'")).assert_success();
    assert!(
        stopped.resume_until_gone(std::time::Duration::from_secs(10)),
        "the old daemon did not exit once resumed"
    );
    assert!(
        old.is_mounted(),
        "the old daemon took the next mount at its path down"
    );
    let out = as_uid(NOBODY, &format!("cat '{m}/g'"));
    out.assert_success();
    assert_eq!(out.stdout, b"mine\n");

    // The user unmounts its own mount (fusermount3 -u).
    let out = as_uid(
        NOBODY,
        &format!("'{}' umount '{m}'", ferry_tests::ferry_bin().display()),
    );
    out.assert_success();
    assert!(
        ferry_tests::poll_until(std::time::Duration::from_secs(5), || !old.is_mounted()),
        "still mounted after the user's umount"
    );
}

/// Without root, a busy mount is detached on SIGTERM through `fusermount3 -u -z` (the
/// daemon may not `umount2` it), and a second SIGTERM ends the daemon; `ferry umount`
/// of it says it is busy and offers `fusermount3 -u -z`. (fusermount3's "busy" was
/// reported as "Operation not permitted", and the detach failed with it.)
#[test]
fn a_users_busy_mount_is_detached_through_fusermount3() {
    if !can_mount_as_nobody() {
        return;
    }
    let server = TestServer::start();
    let nobody = Nobody::new();
    let m = nobody.mount(&server);
    // A process of nobody's with its working directory in the mount.
    let mut sleeper = nobody.command(Path::new("sh"));
    sleeper
        .current_dir("/")
        .args([
            "-c",
            &format!("cd '{}' && exec sleep 600", m.path().display()),
        ])
        .stdin(std::process::Stdio::null());
    let holder = ferry_tests::process::spawn(&mut sleeper).expect("spawn the holder");
    let holder = ferry_tests::process::KillOnDrop(holder);
    let cwd = format!("/proc/{}/cwd", holder.0.id());
    assert!(
        ferry_tests::poll_until(std::time::Duration::from_secs(10), || {
            fs::read_link(&cwd).is_ok_and(|p| p == m.path())
        }),
        "the holder did not enter the mount"
    );
    let mut umount = nobody.command(ferry_tests::ferry_bin());
    umount.arg("umount").arg(m.path());
    let out = run(&mut umount);
    out.assert_failure();
    let err = out.stderr_str();
    assert!(
        err.contains("busy") && err.contains("fusermount3 -u -z"),
        "{out}"
    );
    assert!(m.is_mounted());

    let pids = m.daemon_pids();
    assert!(!pids.is_empty(), "no daemon for {}", m.path().display());
    for &pid in &pids {
        ferry_tests::sys::kill(pid, libc::SIGTERM);
    }
    assert!(
        ferry_tests::poll_until(std::time::Duration::from_secs(10), || !m.is_mounted()),
        "SIGTERM did not detach the busy mount\n{}",
        m.log()
    );
    for &pid in &pids {
        ferry_tests::sys::kill(pid, libc::SIGTERM);
    }
    assert!(
        ferry_tests::sys::all_gone(&pids, std::time::Duration::from_secs(10)),
        "a second SIGTERM did not end the daemon"
    );
}
