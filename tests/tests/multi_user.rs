//! Other users on the client: with `--allow-other` a non-root uid can use the mount, its
//! files get its ownership on the export, and permission bits are enforced against it.
//! Without `--allow-other` only the mounting user (root) gets in.
//!
//! The other user is uid/gid 1234 through `setpriv` (util-linux); skipped where missing.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use ferry_tests::{Output, fixture_with, run};

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
    run(Command::new("setpriv")
        .arg(format!("--reuid={UID}"))
        .arg(format!("--regid={UID}"))
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
