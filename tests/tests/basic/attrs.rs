//! Metadata: mode, owner, size, timestamps with nanoseconds, statfs, fallocate, FIFOs,
//! and inode numbers that stay put.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, chown, lchown, symlink};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_tests::sys::{self, Time, drop_caches, fallocate, mkfifo, statvfs, truncate, utimensat};
use ferry_tests::{assert_errno, fixture};

fn perm(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn new_files_have_the_requested_mode_and_owner() {
    let Some(fx) = fixture() else { return };
    let umask = sys::umask();
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(fx.mnt("f"))
        .expect("create with mode 0640");
    assert_eq!(perm(&fx.exp("f")), 0o640 & !umask);
    assert_eq!(perm(&fx.mnt("f")), 0o640 & !umask);
    std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o751)
        .create(fx.mnt("d"))
        .expect("mkdir 0751");
    assert_eq!(perm(&fx.exp("d")), 0o751 & !umask);
    let (m, e) = (
        fs::metadata(fx.mnt("f")).expect("stat"),
        fs::metadata(fx.exp("f")).expect("export stat"),
    );
    assert_eq!(
        (m.uid(), m.gid()),
        (0, 0),
        "created by root through the mount"
    );
    assert_eq!((e.uid(), e.gid()), (0, 0), "export owner");
    assert_eq!(m.nlink(), 1);
    assert_eq!((m.mtime(), m.mtime_nsec()), (e.mtime(), e.mtime_nsec()));
}

#[test]
fn chmod_shows_on_the_export() {
    let Some(fx) = fixture() else { return };
    fs::write(fx.mnt("f"), b"x").expect("write");
    fs::create_dir(fx.mnt("d")).expect("mkdir");
    for mode in [0o600, 0o755, 0o4755, 0o2711, 0o000, 0o644] {
        fs::set_permissions(fx.mnt("f"), Permissions::from_mode(mode)).expect("chmod");
        assert_eq!(perm(&fx.exp("f")), mode, "export mode after chmod {mode:o}");
        assert_eq!(perm(&fx.mnt("f")), mode, "mount mode after chmod {mode:o}");
    }
    fs::set_permissions(fx.mnt("d"), Permissions::from_mode(0o1777)).expect("chmod sticky");
    assert_eq!(perm(&fx.exp("d")), 0o1777);
    // chmod through an open handle (fchmod).
    let f = File::open(fx.mnt("f")).expect("open");
    f.set_permissions(Permissions::from_mode(0o604))
        .expect("fchmod");
    assert_eq!(perm(&fx.exp("f")), 0o604);
    assert_errno(
        fs::set_permissions(fx.mnt("missing"), Permissions::from_mode(0o600)),
        libc::ENOENT,
    );
}

#[test]
fn chown_shows_on_the_export() {
    let Some(fx) = fixture() else { return };
    fs::write(fx.mnt("f"), b"x").expect("write");
    fs::create_dir(fx.mnt("d")).expect("mkdir");
    chown(fx.mnt("f"), Some(1234), Some(5678)).expect("chown");
    let e = fs::metadata(fx.exp("f")).expect("export");
    assert_eq!((e.uid(), e.gid()), (1234, 5678), "export owner");
    let m = fs::metadata(fx.mnt("f")).expect("mount");
    assert_eq!((m.uid(), m.gid()), (1234, 5678), "mount owner");
    chown(fx.mnt("f"), None, Some(42)).expect("chgrp only");
    let e = fs::metadata(fx.exp("f")).expect("export");
    assert_eq!((e.uid(), e.gid()), (1234, 42));
    chown(fx.mnt("d"), Some(7), Some(8)).expect("chown a directory");
    let e = fs::metadata(fx.exp("d")).expect("export");
    assert_eq!((e.uid(), e.gid()), (7, 8));
    // lchown changes the link, not its target.
    fs::write(fx.mnt("target"), b"t").expect("write");
    symlink("target", fx.mnt("link")).expect("symlink");
    lchown(fx.mnt("link"), Some(4321), Some(4321)).expect("lchown");
    let l = fs::symlink_metadata(fx.exp("link")).expect("export lstat");
    assert_eq!(
        (l.uid(), l.gid()),
        (4321, 4321),
        "symlink owner on the export"
    );
    let t = fs::metadata(fx.exp("target")).expect("export stat");
    assert_eq!((t.uid(), t.gid()), (0, 0), "lchown followed the symlink");
}

#[test]
fn truncate_grows_and_shrinks() {
    let Some(fx) = fixture() else { return };
    let p = fx.mnt("f");
    fs::write(&p, b"0123456789").expect("write");
    truncate(&p, 4).expect("truncate(2) shrink");
    assert_eq!(fs::read(fx.exp("f")).expect("export"), b"0123");
    assert_eq!(fs::read(&p).expect("mount"), b"0123");
    truncate(&p, 8).expect("truncate(2) grow");
    assert_eq!(fs::read(fx.exp("f")).expect("export"), b"0123\0\0\0\0");
    assert_eq!(fs::read(&p).expect("mount"), b"0123\0\0\0\0");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("open");
    f.set_len(3 << 20).expect("ftruncate grow");
    assert_eq!(f.metadata().expect("fstat").len(), 3 << 20);
    // Staged like a write: the export changes at fsync (or close), not before.
    assert_eq!(fs::metadata(fx.exp("f")).expect("export").len(), 8);
    f.sync_all().expect("fsync");
    assert_eq!(fs::metadata(fx.exp("f")).expect("export").len(), 3 << 20);
    f.set_len(2).expect("ftruncate shrink");
    assert_eq!(f.metadata().expect("fstat").len(), 2);
    assert_eq!(fs::metadata(&p).expect("stat").len(), 2);
    f.write_all(b"!").expect("write at the handle's offset (0)");
    drop(f);
    assert_eq!(fs::read(fx.exp("f")).expect("export"), b"!1");
    assert_eq!(fs::read(&p).expect("mount"), b"!1");
    truncate(&p, 0).expect("truncate to 0");
    assert_eq!(fs::metadata(fx.exp("f")).expect("export").len(), 0);
    assert_eq!(fs::metadata(&p).expect("mount").len(), 0);
}

#[test]
fn timestamps_keep_nanoseconds() {
    let Some(fx) = fixture() else { return };
    let p = fx.mnt("f");
    fs::write(&p, b"x").expect("write");
    let (atime, mtime) = ((1_600_000_000, 123_456_789), (1_700_000_000, 987_654_321));
    utimensat(
        &p,
        Time::At(atime.0, atime.1),
        Time::At(mtime.0, mtime.1),
        false,
    )
    .expect("utimensat");
    for (label, path) in [("export", fx.exp("f")), ("mount", p.clone())] {
        let m = fs::metadata(&path).expect("stat");
        assert_eq!((m.mtime(), m.mtime_nsec()), mtime, "{label} mtime");
        assert_eq!((m.atime(), m.atime_nsec()), atime, "{label} atime");
    }
    // UTIME_OMIT keeps atime; UTIME_NOW sets mtime to about now.
    utimensat(&p, Time::Omit, Time::Now, false).expect("utimensat now");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    for (label, path) in [("export", fx.exp("f")), ("mount", p.clone())] {
        let m = fs::metadata(&path).expect("stat");
        assert!(
            (m.mtime() - now).abs() <= 60,
            "{label}: UTIME_NOW gave mtime {} (now {now})",
            m.mtime()
        );
        assert_eq!(
            (m.atime(), m.atime_nsec()),
            atime,
            "{label}: UTIME_OMIT changed atime"
        );
    }
    // Directories, and a symlink itself (AT_SYMLINK_NOFOLLOW).
    fs::create_dir(fx.mnt("d")).expect("mkdir");
    utimensat(&fx.mnt("d"), Time::At(5, 6), Time::At(7, 8), false).expect("utimensat dir");
    let m = fs::metadata(fx.exp("d")).expect("export");
    assert_eq!((m.mtime(), m.mtime_nsec()), (7, 8));
    symlink("f", fx.mnt("l")).expect("symlink");
    utimensat(&fx.mnt("l"), Time::At(11, 12), Time::At(13, 14), true).expect("lutimes");
    let l = fs::symlink_metadata(fx.exp("l")).expect("export lstat");
    assert_eq!((l.mtime(), l.mtime_nsec()), (13, 14), "symlink mtime");
    let t = fs::metadata(fx.exp("f")).expect("export stat");
    assert_ne!(
        (t.mtime(), t.mtime_nsec()),
        (13, 14),
        "lutimes followed the link"
    );
    // A write moves mtime forward.
    utimensat(&p, Time::At(1, 0), Time::At(1, 0), false).expect("utimensat");
    fs::write(&p, b"changed").expect("write");
    assert!(fs::metadata(fx.exp("f")).expect("export").mtime() > 1);
    assert!(fs::metadata(&p).expect("mount").mtime() > 1);
}

#[test]
fn statfs_matches_the_export() {
    let Some(fx) = fixture() else { return };
    let (m, e) = (
        statvfs(fx.mount.path()).expect("statvfs on the mount"),
        statvfs(fx.server.export_path()).expect("statvfs on the export"),
    );
    let total = |s: &libc::statvfs| s.f_blocks as f64 * s.f_frsize as f64;
    let free = |s: &libc::statvfs| s.f_bfree as f64 * s.f_frsize as f64;
    let (tm, te) = (total(&m), total(&e));
    assert!(te > 0.0, "export reports no blocks");
    assert!(
        (tm - te).abs() <= te * 0.01,
        "total size: mount {tm} (f_blocks {} x f_frsize {}, f_bsize {}) vs export {te}",
        m.f_blocks,
        m.f_frsize,
        m.f_bsize
    );
    assert!(
        (free(&m) - free(&e)).abs() <= te * 0.01,
        "free space: mount {} vs export {}",
        free(&m),
        free(&e)
    );
    assert_eq!(m.f_files, e.f_files, "inode count");
    assert_eq!(m.f_namemax, 255, "f_namemax");
}

#[test]
fn fallocate_reserves_space() {
    let Some(fx) = fixture() else { return };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(fx.mnt("f"))
        .expect("create");
    fallocate(&f, 0, 0, 1 << 20).expect("fallocate");
    assert_eq!(f.metadata().expect("fstat").len(), 1 << 20);
    let e = fs::metadata(fx.exp("f")).expect("export");
    assert_eq!(e.len(), 1 << 20, "export size");
    assert!(
        e.blocks() * 512 >= 1 << 20,
        "export allocated {} blocks",
        e.blocks()
    );
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20).expect("fallocate KEEP_SIZE");
    assert_eq!(
        f.metadata().expect("fstat").len(),
        1 << 20,
        "KEEP_SIZE grew the file"
    );
    let e = fs::metadata(fx.exp("f")).expect("export");
    assert_eq!(e.len(), 1 << 20);
    assert!(
        e.blocks() * 512 >= 2 << 20,
        "export allocated {} blocks",
        e.blocks()
    );
    assert!(fs::read(fx.mnt("f")).expect("read").iter().all(|&b| b == 0));
}

#[test]
fn mkfifo_and_mknod_create_special_files() {
    let Some(fx) = fixture() else { return };
    let umask = sys::umask();
    mkfifo(&fx.mnt("pipe"), 0o640).expect("mkfifo");
    let e = fs::symlink_metadata(fx.exp("pipe")).expect("export lstat");
    assert!(
        e.file_type().is_fifo(),
        "export: not a FIFO: {:?}",
        e.file_type()
    );
    assert_eq!(e.permissions().mode() & 0o7777, 0o640 & !umask);
    let m = fs::symlink_metadata(fx.mnt("pipe")).expect("mount lstat");
    assert!(m.file_type().is_fifo(), "mount: not a FIFO");
    assert_errno(mkfifo(&fx.mnt("pipe"), 0o600), libc::EEXIST);
    sys::mknod(&fx.mnt("plain"), libc::S_IFREG | 0o600, 0).expect("mknod S_IFREG");
    let e = fs::symlink_metadata(fx.exp("plain")).expect("export lstat");
    assert!(e.is_file() && e.len() == 0);
}

#[test]
fn inode_numbers_are_stable() {
    let Some(fx) = fixture() else { return };
    fs::create_dir_all(fx.mnt("d/e")).expect("mkdir");
    fs::write(fx.mnt("d/e/f"), b"x").expect("write");
    fs::write(fx.mnt("g"), b"y").expect("write");
    let ino = |rel: &str| fs::symlink_metadata(fx.mnt(rel)).expect("stat").ino();
    let before: Vec<u64> = ["d", "d/e", "d/e/f", "g"].iter().map(|r| ino(r)).collect();
    let mut distinct = before.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        4,
        "different files share inode numbers: {before:?}"
    );
    assert_eq!(
        before,
        ["d", "d/e", "d/e/f", "g"].map(&ino).to_vec(),
        "second stat"
    );
    match drop_caches(2) {
        Ok(()) => {}
        Err(e) => eprintln!("note: cannot drop caches ({e}); checking without"),
    }
    let after: Vec<u64> = ["d", "d/e", "d/e/f", "g"].iter().map(|r| ino(r)).collect();
    assert_eq!(before, after, "inode numbers changed after dropping caches");
    fs::write(fx.mnt("d/e/f"), b"new content").expect("rewrite");
    fs::rename(fx.mnt("g"), fx.mnt("d/h")).expect("rename");
    assert_eq!(ino("d/e/f"), before[2], "inode changed by a write");
    assert_eq!(ino("d/h"), before[3], "inode changed by a rename");
    let _ = drop_caches(2);
    assert_eq!(
        ino("d/h"),
        before[3],
        "inode of a renamed file after dropping caches"
    );
}

/// ARCHITECTURE.md: "Inode numbers are the server's ... the export root is inode 1."
#[test]
fn inode_numbers_are_the_servers() {
    let Some(fx) = fixture() else { return };
    fs::create_dir(fx.mnt("d")).expect("mkdir");
    fs::write(fx.mnt("d/f"), b"x").expect("write");
    symlink("f", fx.mnt("d/l")).expect("symlink");
    for rel in ["d", "d/f", "d/l"] {
        let m = fs::symlink_metadata(fx.mnt(rel))
            .expect("mount lstat")
            .ino();
        let e = fs::symlink_metadata(fx.exp(rel))
            .expect("export lstat")
            .ino();
        assert_eq!(m, e, "inode number of {rel}: mount {m}, export {e}");
    }
    assert_eq!(
        fs::metadata(fx.mount.path()).expect("stat root").ino(),
        1,
        "inode number of the mount's root"
    );
}

/// What `tar` does for every file it extracts: write, `fchown`, `fchmod`, `futimens`,
/// close. The changes show through the open descriptor at once and on the export after
/// the close, with the data; the mtime is the one set, not the time of the commit.
#[test]
fn owner_mode_and_times_set_before_close_land_with_the_data() {
    let Some(fx) = fixture() else { return };
    let f = File::create(fx.mnt("f")).expect("create");
    (&f).write_all(b"payload").expect("write");
    std::os::unix::fs::fchown(&f, Some(1234), Some(5678)).expect("fchown");
    f.set_permissions(Permissions::from_mode(0o640))
        .expect("fchmod");
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000_000, 5);
    f.set_times(std::fs::FileTimes::new().set_modified(mtime))
        .expect("futimens");
    let m = f.metadata().expect("fstat");
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777, m.mtime(), m.len()),
        (1234, 5678, 0o640, 1_000_000_000, 7),
        "through the open descriptor"
    );
    ferry_tests::sys::close(f).expect("close");
    let e = fs::metadata(fx.exp("f")).expect("export");
    assert_eq!(
        (
            e.uid(),
            e.gid(),
            e.mode() & 0o7777,
            e.mtime(),
            e.mtime_nsec()
        ),
        (1234, 5678, 0o640, 1_000_000_000, 5),
        "on the export"
    );
    assert_eq!(fs::read(fx.exp("f")).expect("export"), b"payload");
    let m = fs::metadata(fx.mnt("f")).expect("stat");
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777, m.mtime()),
        (1234, 5678, 0o640, 1_000_000_000),
        "through the mount after the close"
    );
}
