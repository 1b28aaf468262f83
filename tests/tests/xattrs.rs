//! Extended attributes (`ferry mount --xattrs`): set, read, listed and removed through
//! the mount as on the export's disk; refused as unsupported without the flag; and the
//! server's hint that a file has none, which answers `ls -l`'s probes without a round
//! trip, given up as soon as the file gets one behind the mount's back.

use std::fs;
use std::process::Command;
use std::time::Duration;

use ferry_tests::stats::Stats;
use ferry_tests::sys::{lgetxattr, llistxattr, lremovexattr, lsetxattr};
use ferry_tests::{assert_errno, fixture, fixture_with, run, wait_for};

const DEADLINE: Duration = Duration::from_secs(10);

#[test]
fn xattrs_set_through_the_mount_are_on_the_export_and_read_back() {
    let Some(fx) = fixture_with(&[], &["--xattrs"], |_| {}) else {
        return;
    };
    fs::write(fx.mnt("f"), b"content").expect("write through the mount");
    lsetxattr(&fx.mnt("f"), "user.color", b"blue").expect("setxattr through the mount");
    assert_eq!(
        lgetxattr(&fx.exp("f"), "user.color").expect("xattr on the export"),
        b"blue"
    );
    assert_eq!(
        lgetxattr(&fx.mnt("f"), "user.color").expect("getxattr through the mount"),
        b"blue"
    );
    assert_eq!(
        llistxattr(&fx.mnt("f")).expect("listxattr through the mount"),
        vec![b"user.color".to_vec()]
    );
    assert_errno(lgetxattr(&fx.mnt("f"), "user.other"), libc::ENODATA);

    lremovexattr(&fx.mnt("f"), "user.color").expect("removexattr through the mount");
    assert_errno(lgetxattr(&fx.exp("f"), "user.color"), libc::ENODATA);
    assert_errno(lgetxattr(&fx.mnt("f"), "user.color"), libc::ENODATA);
    assert!(llistxattr(&fx.mnt("f")).expect("listxattr").is_empty());
    // The file's content is untouched by all of it.
    assert_eq!(fs::read(fx.exp("f")).expect("export"), b"content");
}

#[test]
fn without_the_flag_xattrs_are_not_supported() {
    let Some(fx) = fixture() else { return };
    fs::write(fx.mnt("f"), b"content").expect("write through the mount");
    assert_errno(
        lsetxattr(&fx.mnt("f"), "user.color", b"blue"),
        libc::EOPNOTSUPP,
    );
    assert_errno(lgetxattr(&fx.exp("f"), "user.color"), libc::ENODATA);
}

#[test]
fn ls_l_asks_nothing_of_files_without_xattrs_and_sees_one_set_on_the_server() {
    const FILES: usize = 200;
    let Some(fx) = fixture_with(&[], &["--xattrs"], |export| {
        fs::create_dir(export.join("d")).expect("mkdir");
        for i in 0..FILES {
            fs::write(export.join(format!("d/f{i:03}")), b"x").expect("populate");
        }
    }) else {
        return;
    };
    let before = Stats::of(fx.mount.path()).get_or_zero("requests.getxattr");
    let out = run(Command::new("ls").arg("-l").arg(fx.mnt("d")));
    out.assert_success();
    assert_eq!(
        out.stdout_str().lines().count(),
        FILES + 1,
        "{}",
        out.stdout_str()
    );
    let asked = Stats::of(fx.mount.path()).get_or_zero("requests.getxattr") - before;
    assert_eq!(
        asked, 0,
        "ls -l asked the server for xattrs of files that have none"
    );
    assert_errno(lgetxattr(&fx.mnt("d/f007"), "user.tag"), libc::ENODATA);

    // Set behind the mount's back: the hint that the file has none must go.
    lsetxattr(&fx.exp("d/f007"), "user.tag", b"new").expect("setxattr on the export");
    wait_for(
        DEADLINE,
        "the server's new xattr to show through the mount",
        || lgetxattr(&fx.mnt("d/f007"), "user.tag").is_ok_and(|v| v == b"new"),
    );
    assert!(
        llistxattr(&fx.mnt("d/f007"))
            .expect("listxattr")
            .contains(&b"user.tag".to_vec())
    );
}
