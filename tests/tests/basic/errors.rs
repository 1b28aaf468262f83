//! The errno a local disk gives for common mistakes comes back through the mount.

use std::fs::{self, File, OpenOptions};

use ferry_tests::sys::truncate;
use ferry_tests::{assert_errno, fixture};

#[test]
fn missing_names_are_enoent() {
    let Some(fx) = fixture() else { return };
    assert_errno(File::open(fx.mnt("missing")), libc::ENOENT);
    assert_errno(fs::metadata(fx.mnt("missing")), libc::ENOENT);
    assert_errno(fs::symlink_metadata(fx.mnt("missing")), libc::ENOENT);
    assert_errno(fs::read_dir(fx.mnt("missing")), libc::ENOENT);
    assert_errno(fs::read_link(fx.mnt("missing")), libc::ENOENT);
    assert_errno(File::create(fx.mnt("no/such/dir")), libc::ENOENT);
    assert_errno(fs::create_dir(fx.mnt("no/such")), libc::ENOENT);
    assert_errno(truncate(&fx.mnt("missing"), 0), libc::ENOENT);
}

#[test]
fn directories_are_eisdir_for_writes() {
    let Some(fx) = fixture() else { return };
    fs::create_dir(fx.mnt("d")).expect("mkdir");
    assert_errno(
        OpenOptions::new().write(true).open(fx.mnt("d")),
        libc::EISDIR,
    );
    assert_errno(File::create(fx.mnt("d")), libc::EISDIR);
    assert_errno(fs::read(fx.mnt("d")), libc::EISDIR);
    assert_errno(truncate(&fx.mnt("d"), 0), libc::EISDIR);
    assert!(fx.exp("d").is_dir());
}

#[test]
fn files_in_the_middle_of_a_path_are_enotdir() {
    let Some(fx) = fixture() else { return };
    fs::write(fx.mnt("f"), b"x").expect("write");
    assert_errno(File::open(fx.mnt("f/x")), libc::ENOTDIR);
    assert_errno(fs::metadata(fx.mnt("f/x")), libc::ENOTDIR);
    assert_errno(File::create(fx.mnt("f/x")), libc::ENOTDIR);
    assert_errno(fs::create_dir(fx.mnt("f/x")), libc::ENOTDIR);
    assert_errno(fs::read_dir(fx.mnt("f")), libc::ENOTDIR);
    assert_errno(fs::read_dir(fx.mnt("f/")), libc::ENOTDIR);
}

#[test]
fn overlong_names_are_enametoolong() {
    let Some(fx) = fixture() else { return };
    let ok = "a".repeat(255);
    let long = "b".repeat(256);
    fs::write(fx.mnt(&ok), b"255").expect("a 255-byte name is fine");
    assert!(fx.exp(&ok).is_file());
    assert_eq!(fs::read(fx.mnt(&ok)).expect("read"), b"255");
    assert_errno(File::create(fx.mnt(&long)), libc::ENAMETOOLONG);
    assert_errno(fs::create_dir(fx.mnt(&long)), libc::ENAMETOOLONG);
    assert_errno(fs::metadata(fx.mnt(&long)), libc::ENAMETOOLONG);
    assert_errno(
        std::os::unix::fs::symlink("t", fx.mnt(&long)),
        libc::ENAMETOOLONG,
    );
    assert_errno(fs::rename(fx.mnt(&ok), fx.mnt(&long)), libc::ENAMETOOLONG);
    assert!(fx.exp(&ok).is_file(), "the failed rename lost the file");
}
