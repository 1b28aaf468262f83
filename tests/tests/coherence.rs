//! Changes made behind a mount's back (on the server's disk, or through a second mount of
//! the same export) become visible through it within a few seconds: ARCHITECTURE.md
//! promises the kernel's 1 s entry/attribute TTL as the bound for renames and
//! replacements, and the protocol pushes change events to clients.
//!
//! Each check polls under a deadline ([`DEADLINE`], far above the promised second).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use ferry_tests::{TestMount, fixture_with, poll_until};

const DEADLINE: Duration = Duration::from_secs(10);

fn listed(dir: &Path, name: &str) -> bool {
    fs::read_dir(dir)
        .map(|d| d.flatten().any(|e| e.file_name() == name))
        .unwrap_or(false)
}

#[track_caller]
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    assert!(
        poll_until(DEADLINE, &mut cond),
        "not visible within {DEADLINE:?}: {what}"
    );
}

#[test]
fn changes_on_the_export_show_through_the_mount() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::create_dir(e.join("dir")).expect("mkdir");
        fs::write(e.join("dir/old"), b"old content").expect("write");
    }) else {
        return;
    };
    // Let the mount cache what there is.
    assert!(listed(&fx.mnt("dir"), "old"));
    assert_eq!(fs::read(fx.mnt("dir/old")).expect("read"), b"old content");

    fs::write(fx.exp("dir/new"), b"created on the server").expect("write");
    eventually("a file created on the export is listed", || {
        listed(&fx.mnt("dir"), "new")
    });
    eventually("a file created on the export is readable", || {
        fs::read(fx.mnt("dir/new")).is_ok_and(|d| d == b"created on the server")
    });
    fs::write(fx.exp("dir/old"), b"rewritten on the server, longer").expect("write");
    eventually("new content of a cached file", || {
        fs::read(fx.mnt("dir/old")).is_ok_and(|d| d == b"rewritten on the server, longer")
    });
    fs::rename(fx.exp("dir/old"), fx.exp("dir/renamed")).expect("rename");
    eventually("a rename on the export", || {
        fs::metadata(fx.mnt("dir/old")).is_err()
            && fs::read(fx.mnt("dir/renamed"))
                .is_ok_and(|d| d == b"rewritten on the server, longer")
    });
    fs::remove_file(fx.exp("dir/new")).expect("unlink");
    eventually("an unlink on the export", || {
        fs::metadata(fx.mnt("dir/new")).is_err() && !listed(&fx.mnt("dir"), "new")
    });
    fs::set_permissions(fx.exp("dir/renamed"), fs::Permissions::from_mode(0o600)).expect("chmod");
    eventually("a chmod on the export", || {
        fs::metadata(fx.mnt("dir/renamed")).is_ok_and(|m| m.permissions().mode() & 0o777 == 0o600)
    });
}

#[test]
fn two_mounts_see_each_others_changes() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("shared"), b"v1").expect("write");
    }) else {
        return;
    };
    let other = TestMount::new(&fx.server);
    let (a, b) = (fx.mount.path(), other.path());
    assert_eq!(fs::read(a.join("shared")).expect("read"), b"v1");
    assert_eq!(fs::read(b.join("shared")).expect("read"), b"v1");
    fs::write(a.join("shared"), b"version two").expect("write through A");
    eventually("A's write through B", || {
        fs::read(b.join("shared")).is_ok_and(|d| d == b"version two")
    });
    fs::create_dir(b.join("from_b")).expect("mkdir through B");
    fs::write(b.join("from_b/f"), b"bee").expect("write through B");
    eventually("B's new directory through A", || {
        fs::read(a.join("from_b/f")).is_ok_and(|d| d == b"bee")
    });
    fs::remove_file(a.join("shared")).expect("unlink through A");
    eventually("A's unlink through B", || {
        !listed(b, "shared") && fs::metadata(b.join("shared")).is_err()
    });
}
