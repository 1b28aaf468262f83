//! Names: mkdir/rmdir, unlink, rename (plain, RENAME_NOREPLACE, RENAME_EXCHANGE),
//! symlinks, hard links, open-then-unlink, big directories.

use std::collections::BTreeSet;
use std::fs::Permissions;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt, symlink};

use ferry_tests::sys::{drop_caches, renameat2, truncate};
use ferry_tests::{assert_errno, fixture, fixture_with};

fn names(dir: &std::path::Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn mkdir_and_rmdir() {
    let Some(fx) = fixture() else { return };
    fs::create_dir(fx.mnt("d")).expect("mkdir");
    assert!(fx.exp("d").is_dir(), "export has no directory d");
    assert_errno(fs::create_dir(fx.mnt("d")), libc::EEXIST);
    fs::create_dir_all(fx.mnt("d/e/f")).expect("mkdir -p");
    assert!(fx.exp("d/e/f").is_dir());
    fs::write(fx.mnt("d/e/file"), b"x").expect("file in d/e");
    assert_errno(fs::remove_dir(fx.mnt("d/e")), libc::ENOTEMPTY);
    assert_errno(fs::remove_dir(fx.mnt("d/e/file")), libc::ENOTDIR);
    assert_errno(fs::remove_dir(fx.mnt("missing")), libc::ENOENT);
    fs::remove_dir(fx.mnt("d/e/f")).expect("rmdir empty dir");
    fs::remove_file(fx.mnt("d/e/file")).expect("unlink");
    fs::remove_dir(fx.mnt("d/e")).expect("rmdir now empty dir");
    assert!(!fx.exp("d/e").exists(), "export still has d/e");
    assert_errno(fs::metadata(fx.mnt("d/e")), libc::ENOENT);
    assert_eq!(names(&fx.mnt("d")), BTreeSet::new());
    // Directory link counts as the export reports them (2 + subdirectories).
    fs::create_dir(fx.mnt("d/s1")).expect("mkdir");
    fs::create_dir(fx.mnt("d/s2")).expect("mkdir");
    let on_disk = fs::metadata(fx.exp("d")).expect("export").nlink();
    assert_eq!(fs::metadata(fx.mnt("d")).expect("mount").nlink(), on_disk);
}

#[test]
fn unlink_removes_the_name() {
    let Some(fx) = fixture() else { return };
    fs::write(fx.mnt("f"), b"data").expect("write");
    fs::remove_file(fx.mnt("f")).expect("unlink");
    // The unlink may still be on its way to the server (`fs/unlinks.rs` in the client);
    // an fsync of the directory waits for it.
    File::open(fx.mnt(""))
        .and_then(|d| d.sync_all())
        .expect("fsync dir");
    assert!(!fx.exp("f").exists(), "export still has f");
    assert_errno(fs::metadata(fx.mnt("f")), libc::ENOENT);
    assert_errno(File::open(fx.mnt("f")), libc::ENOENT);
    assert_errno(fs::remove_file(fx.mnt("f")), libc::ENOENT);
    fs::create_dir(fx.mnt("d")).expect("mkdir");
    assert_errno(fs::remove_file(fx.mnt("d")), libc::EISDIR);
    assert!(fx.exp("d").is_dir());
}

#[test]
fn rename_replaces_the_target_atomically() {
    let Some(fx) = fixture() else { return };
    fs::write(fx.mnt("a"), b"AAA").expect("write a");
    fs::write(fx.mnt("b"), b"BBBBBB").expect("write b");
    let ino_a = fs::metadata(fx.mnt("a")).expect("stat a").ino();
    let mut old_b = File::open(fx.mnt("b")).expect("open b");
    fs::rename(fx.mnt("a"), fx.mnt("b")).expect("rename a over b");
    assert_errno(fs::metadata(fx.mnt("a")), libc::ENOENT);
    assert!(!fx.exp("a").exists(), "export still has a");
    assert_eq!(fs::read(fx.mnt("b")).expect("read b"), b"AAA");
    assert_eq!(fs::read(fx.exp("b")).expect("export b"), b"AAA");
    assert_eq!(
        fs::metadata(fx.mnt("b")).expect("stat b").ino(),
        ino_a,
        "b is not the renamed file"
    );
    // The replaced file lives on through its open handle.
    let mut s = String::new();
    old_b
        .read_to_string(&mut s)
        .expect("read the replaced file");
    assert_eq!(s, "BBBBBB");
    // Into another directory, and a directory itself.
    fs::create_dir_all(fx.mnt("d1/inner")).expect("mkdir");
    fs::create_dir(fx.mnt("d2")).expect("mkdir");
    fs::rename(fx.mnt("b"), fx.mnt("d2/b2")).expect("rename across directories");
    assert_eq!(fs::read(fx.exp("d2/b2")).expect("export"), b"AAA");
    fs::rename(fx.mnt("d1"), fx.mnt("d2/d1")).expect("rename a directory");
    assert!(fx.exp("d2/d1/inner").is_dir());
    assert_eq!(names(&fx.mnt("d2")), ["b2", "d1"].map(String::from).into());
    assert_eq!(names(&fx.mnt("")), ["d2"].map(String::from).into());
}

#[test]
fn rename_errors() {
    let Some(fx) = fixture() else { return };
    fs::create_dir_all(fx.mnt("full/x")).expect("mkdir");
    fs::create_dir(fx.mnt("empty")).expect("mkdir");
    fs::create_dir(fx.mnt("src")).expect("mkdir");
    fs::write(fx.mnt("file"), b"f").expect("write");
    assert_errno(fs::rename(fx.mnt("src"), fx.mnt("full")), libc::ENOTEMPTY);
    assert_errno(fs::rename(fx.mnt("src"), fx.mnt("file")), libc::ENOTDIR);
    assert_errno(fs::rename(fx.mnt("file"), fx.mnt("empty")), libc::EISDIR);
    assert_errno(fs::rename(fx.mnt("src"), fx.mnt("src/sub")), libc::EINVAL);
    assert_errno(fs::rename(fx.mnt("nope"), fx.mnt("x")), libc::ENOENT);
    assert_errno(fs::rename(fx.mnt("file"), fx.mnt("nodir/x")), libc::ENOENT);
    fs::rename(fx.mnt("src"), fx.mnt("empty")).expect("a directory replaces an empty one");
    assert!(fx.exp("empty").is_dir() && !fx.exp("src").exists());
    fs::rename(fx.mnt("file"), fx.mnt("file")).expect("rename onto itself");
    assert_eq!(fs::read(fx.exp("file")).expect("export"), b"f");
}

#[test]
fn rename_noreplace_and_exchange() {
    let Some(fx) = fixture() else { return };
    fs::write(fx.mnt("a"), b"A").expect("write");
    fs::write(fx.mnt("b"), b"B").expect("write");
    assert_errno(
        renameat2(&fx.mnt("a"), &fx.mnt("b"), libc::RENAME_NOREPLACE),
        libc::EEXIST,
    );
    assert_eq!(fs::read(fx.exp("a")).expect("export a"), b"A");
    assert_eq!(fs::read(fx.exp("b")).expect("export b"), b"B");
    renameat2(&fx.mnt("a"), &fx.mnt("c"), libc::RENAME_NOREPLACE)
        .expect("RENAME_NOREPLACE onto a free name");
    assert!(!fx.exp("a").exists());
    assert_eq!(fs::read(fx.exp("c")).expect("export c"), b"A");

    renameat2(&fx.mnt("b"), &fx.mnt("c"), libc::RENAME_EXCHANGE).expect("RENAME_EXCHANGE");
    assert_eq!(fs::read(fx.exp("b")).expect("export b"), b"A");
    assert_eq!(fs::read(fx.exp("c")).expect("export c"), b"B");
    assert_eq!(fs::read(fx.mnt("b")).expect("mount b"), b"A");
    assert_eq!(fs::read(fx.mnt("c")).expect("mount c"), b"B");
    // A file and a directory swap places.
    fs::create_dir(fx.mnt("d")).expect("mkdir");
    fs::write(fx.mnt("d/inside"), b"i").expect("write");
    renameat2(&fx.mnt("b"), &fx.mnt("d"), libc::RENAME_EXCHANGE).expect("exchange file/dir");
    assert!(fx.exp("b/inside").is_file());
    assert_eq!(fs::read(fx.exp("d")).expect("export d"), b"A");
    assert_eq!(fs::read(fx.mnt("b/inside")).expect("mount b/inside"), b"i");
    assert_errno(
        renameat2(&fx.mnt("c"), &fx.mnt("missing"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
    );
}

#[test]
fn symlink_and_readlink() {
    let Some(fx) = fixture() else { return };
    fs::create_dir(fx.mnt("dir")).expect("mkdir");
    fs::write(fx.mnt("dir/target"), b"through the link").expect("write");
    symlink("dir/target", fx.mnt("l")).expect("symlink");
    symlink("some/where/else", fx.mnt("dangling")).expect("dangling symlink");
    symlink("dir", fx.mnt("dl")).expect("directory symlink");
    assert_eq!(
        fs::read_link(fx.mnt("l")).expect("readlink"),
        std::path::Path::new("dir/target")
    );
    assert_eq!(
        fs::read_link(fx.exp("l")).expect("export readlink"),
        std::path::Path::new("dir/target")
    );
    assert_eq!(
        fs::read_link(fx.exp("dangling")).expect("export readlink"),
        std::path::Path::new("some/where/else")
    );
    assert!(
        fs::symlink_metadata(fx.mnt("l"))
            .expect("lstat")
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        fs::symlink_metadata(fx.mnt("dangling"))
            .expect("lstat")
            .len(),
        "some/where/else".len() as u64,
        "a symlink's size is the length of its target"
    );
    assert_eq!(
        fs::read(fx.mnt("l")).expect("read through"),
        b"through the link"
    );
    assert_eq!(
        fs::read(fx.mnt("dl/target")).expect("read via dir link"),
        b"through the link"
    );
    assert_errno(File::open(fx.mnt("dangling")), libc::ENOENT);
    assert_errno(symlink("x", fx.mnt("l")), libc::EEXIST);
    // Writing through a symlink writes the target.
    fs::write(fx.mnt("l"), b"rewritten").expect("write through the link");
    assert_eq!(
        fs::read(fx.exp("dir/target")).expect("export"),
        b"rewritten"
    );
    assert!(
        fs::symlink_metadata(fx.exp("l"))
            .expect("export lstat")
            .file_type()
            .is_symlink()
    );
    // A long target survives the round trip.
    let long = "x/".repeat(1000) + "end";
    symlink(&long, fx.mnt("long")).expect("long symlink");
    assert_eq!(
        fs::read_link(fx.mnt("long")).expect("readlink"),
        std::path::Path::new(&long)
    );
    assert_eq!(
        fs::read_link(fx.exp("long")).expect("export readlink"),
        std::path::Path::new(&long)
    );
}

#[test]
fn hard_links_share_the_inode() {
    let Some(fx) = fixture() else { return };
    fs::write(fx.mnt("a"), b"shared").expect("write");
    fs::create_dir(fx.mnt("d")).expect("mkdir");
    fs::hard_link(fx.mnt("a"), fx.mnt("d/b")).expect("link");
    let (ma, mb) = (
        fs::metadata(fx.mnt("a")).expect("stat a"),
        fs::metadata(fx.mnt("d/b")).expect("stat b"),
    );
    assert_eq!(ma.ino(), mb.ino(), "both names must be one inode");
    assert_eq!(ma.nlink(), 2, "nlink of a");
    assert_eq!(mb.nlink(), 2, "nlink of b");
    let (ea, eb) = (
        fs::metadata(fx.exp("a")).expect("export a"),
        fs::metadata(fx.exp("d/b")).expect("export b"),
    );
    assert_eq!(ea.ino(), eb.ino(), "export: not a hard link");
    assert_eq!(ea.nlink(), 2);
    // Content is shared both ways.
    let mut f = OpenOptions::new()
        .append(true)
        .open(fx.mnt("d/b"))
        .expect("open b");
    f.write_all(b" content").expect("append via b");
    drop(f);
    assert_eq!(fs::read(fx.mnt("a")).expect("read a"), b"shared content");
    assert_eq!(fs::read(fx.exp("a")).expect("export a"), b"shared content");
    assert_errno(fs::hard_link(fx.mnt("a"), fx.mnt("d/b")), libc::EEXIST);
    assert_errno(fs::hard_link(fx.mnt("d"), fx.mnt("dlink")), libc::EPERM);
    assert_errno(fs::hard_link(fx.mnt("missing"), fx.mnt("x")), libc::ENOENT);
    fs::remove_file(fx.mnt("a")).expect("unlink a");
    assert_eq!(fs::metadata(fx.mnt("d/b")).expect("stat b").nlink(), 1);
    assert_eq!(fs::read(fx.mnt("d/b")).expect("read b"), b"shared content");
    // The surviving name is fully usable (a client that remembered the inode by its first
    // name would now send a path that no longer exists).
    fs::set_permissions(fx.mnt("d/b"), Permissions::from_mode(0o600)).expect("chmod b");
    assert_eq!(
        fs::metadata(fx.exp("d/b"))
            .expect("export")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    truncate(&fx.mnt("d/b"), 6).expect("truncate b");
    fs::write(fx.mnt("d/b"), b"rewritten").expect("write b");
    assert_eq!(fs::read(fx.exp("d/b")).expect("export"), b"rewritten");
    let _ = drop_caches(2);
    assert_eq!(fs::read(fx.mnt("d/b")).expect("read b"), b"rewritten");
    assert_errno(fs::metadata(fx.mnt("a")), libc::ENOENT);
}

#[test]
fn renames_keep_open_files_and_children_reachable() {
    let Some(fx) = fixture() else { return };
    fs::create_dir_all(fx.mnt("dir/sub")).expect("mkdir");
    fs::write(fx.mnt("dir/sub/f"), b"child").expect("write");
    let open = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.mnt("dir/sub/f"))
        .expect("open");
    let ino = fs::metadata(fx.mnt("dir/sub/f")).expect("stat").ino();
    // Rename the file's parent's parent, then the file itself.
    fs::rename(fx.mnt("dir"), fx.mnt("moved")).expect("rename dir");
    assert_errno(fs::metadata(fx.mnt("dir/sub/f")), libc::ENOENT);
    assert_eq!(
        fs::read(fx.mnt("moved/sub/f")).expect("read via new path"),
        b"child"
    );
    open.write_all_at(b"CH", 0)
        .expect("write through the handle after the rename");
    open.set_len(3).expect("ftruncate after the rename");
    open.sync_all().expect("fsync after the rename");
    assert_eq!(fs::read(fx.exp("moved/sub/f")).expect("export"), b"CHi");
    fs::rename(fx.mnt("moved/sub/f"), fx.mnt("moved/g")).expect("rename file");
    open.write_all_at(b"!", 3)
        .expect("write after the second rename");
    open.set_permissions(Permissions::from_mode(0o640))
        .expect("fchmod after rename");
    drop(open);
    assert_eq!(fs::read(fx.exp("moved/g")).expect("export"), b"CHi!");
    assert_eq!(
        fs::metadata(fx.exp("moved/g"))
            .expect("export")
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    // Children of the renamed directory, through the kernel's cached inodes and after
    // the kernel forgot them.
    fs::write(fx.mnt("moved/sub/new"), b"new").expect("create in renamed dir");
    assert_eq!(fs::read(fx.exp("moved/sub/new")).expect("export"), b"new");
    let _ = drop_caches(2);
    assert_eq!(fs::metadata(fx.mnt("moved/g")).expect("stat").ino(), ino);
    fs::set_permissions(fx.mnt("moved/sub"), Permissions::from_mode(0o700)).expect("chmod");
    assert_eq!(
        fs::metadata(fx.exp("moved/sub"))
            .expect("export")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    // Renaming back and forth over the same names.
    fs::rename(fx.mnt("moved"), fx.mnt("dir")).expect("rename back");
    fs::write(fx.mnt("dir/sub/new"), b"again").expect("write via the old name");
    assert_eq!(fs::read(fx.exp("dir/sub/new")).expect("export"), b"again");
    assert_eq!(names(&fx.mnt("")), ["dir"].map(String::from).into());
}

#[test]
fn open_then_unlinked_file_stays_usable() {
    let Some(fx) = fixture() else { return };
    let p = fx.mnt("tmpfile");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .expect("create");
    f.write_all(b"before unlink").expect("write");
    f.flush().expect("flush");
    fs::remove_file(&p).expect("unlink while open");
    assert_errno(fs::metadata(&p), libc::ENOENT);
    assert!(!fx.exp("tmpfile").exists(), "export still lists the name");
    assert!(
        !fs::read_dir(fx.mnt(""))
            .expect("readdir")
            .any(|e| e.expect("entry").file_name() == "tmpfile"),
        "readdir still lists the name"
    );
    f.seek(SeekFrom::Start(0)).expect("seek");
    let mut s = String::new();
    f.read_to_string(&mut s).expect("read after unlink");
    assert_eq!(s, "before unlink");
    f.write_all(b", and after").expect("write after unlink");
    f.seek(SeekFrom::Start(0)).expect("seek");
    s.clear();
    f.read_to_string(&mut s).expect("read again");
    assert_eq!(s, "before unlink, and after");
    let md = f.metadata().expect("fstat after unlink");
    assert_eq!(md.len(), 24);
    assert_eq!(md.nlink(), 0);
    f.set_len(6).expect("ftruncate after unlink");
    assert_eq!(f.metadata().expect("fstat").len(), 6);
    // A new file under the same name is a different file.
    fs::write(&p, b"new").expect("recreate");
    f.seek(SeekFrom::Start(0)).expect("seek");
    s.clear();
    f.read_to_string(&mut s).expect("read the old file");
    assert_eq!(s, "before");
    assert_eq!(fs::read(fx.exp("tmpfile")).expect("export"), b"new");
}

/// More entries than one ReadDir batch (4096) and than one kernel readdir buffer.
#[test]
fn big_directory_lists_every_entry() {
    // Over three of the server's 4,096-entry batches: the client asks for each next one
    // while the kernel takes in the last, and the server stats big batches in parallel.
    const N: usize = 3 * 4096 + 1;
    let Some(fx) = fixture_with(&[], &[], |export| {
        fs::create_dir(export.join("big")).expect("mkdir");
        for i in 0..N {
            // Sizes tell the entries' attributes apart: each name must keep its own.
            File::create(export.join(format!("big/entry-with-a-longish-name-{i:05}")))
                .and_then(|f| f.set_len((i % 251) as u64))
                .expect("create entry");
        }
    }) else {
        return;
    };
    let listed = |dir: &std::path::Path| -> Vec<(std::ffi::OsString, u64)> {
        fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| {
                let e = e.expect("entry");
                (e.file_name(), e.metadata().expect("stat").len())
            })
            .collect()
    };
    // `ls -l` on a fresh mount of its own (this one's first listing is left half
    // read, below): the attributes come with the names (readdirplus), so the whole
    // listing is a handful of requests (one per 4,096-entry batch and a few for the
    // directory itself), not one per entry. The kernel must keep what it was handed
    // meanwhile: no other test drops its caches.
    let kept = ferry_tests::sys::kernel_caches_kept();
    let fresh = ferry_tests::TestMount::new(&fx.server);
    // With the event stream up: without it, entries are trusted for a second only,
    // and on a loaded machine `ls` may outlast that and look names up again.
    assert!(
        ferry_tests::poll_until(std::time::Duration::from_secs(10), || fresh
            .stats()
            .flag("events_live")),
        "the event stream did not come up"
    );
    let before = fresh.stats();
    let out = ferry_tests::run(
        std::process::Command::new("ls")
            .arg("-l")
            .arg(fresh.join("big")),
    );
    out.assert_success();
    assert_eq!(
        out.stdout_str().lines().count(),
        N + 1,
        "`ls -l` lines (entries and the total)"
    );
    let after = fresh.stats();
    drop(kept);
    let sent = after.get("requests") - before.get("requests");
    assert!(
        sent <= 12,
        "`ls -l` of {N} entries took {sent} requests\nbefore:\n{before}\nafter:\n{after}"
    );
    // A listing left after its first entries (its next batch on the way), first.
    {
        let mut d = fs::read_dir(fx.mnt("big")).expect("read_dir");
        for _ in 0..3 {
            d.next().expect("an entry").expect("entry");
        }
    }
    // In the server's order, each name once, with its own size.
    let want = listed(&fx.exp("big"));
    assert_eq!(want.len(), N);
    let got = listed(&fx.mnt("big"));
    assert_eq!(got.len(), N, "entries listed through the mount");
    assert!(
        got == want,
        "the mount lists other names, sizes or order than the export"
    );
    // Listing again gives the same answer (from the cached listing now).
    assert!(listed(&fx.mnt("big")) == want);
}

/// Names are bytes: non-UTF-8, newlines, unicode, shell metacharacters all survive.
#[test]
fn odd_names_round_trip() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let Some(fx) = fixture() else { return };
    let names: [&[u8]; 8] = [
        b"with space",
        b"new\nline",
        b"tab\there",
        "unicode-\u{e9}\u{6f22}\u{1f980}".as_bytes(),
        b"latin1-\xe9\xff",
        b"-leading-dash",
        b"$(not a command);*?[]'\"\\",
        b".hidden",
    ];
    for n in names {
        let n = OsStr::from_bytes(n);
        fs::write(fx.mnt(n), n.as_bytes()).unwrap_or_else(|e| panic!("create {n:?}: {e}"));
        fs::create_dir(fx.mnt(n).with_extension("d"))
            .unwrap_or_else(|e| panic!("mkdir {n:?}: {e}"));
        assert_eq!(fs::read(fx.exp(n)).expect("export"), n.as_bytes(), "{n:?}");
    }
    let on_mount: BTreeSet<Vec<u8>> = fs::read_dir(fx.mnt(""))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().as_bytes().to_vec())
        .collect();
    let on_export: BTreeSet<Vec<u8>> = fs::read_dir(fx.exp(""))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().as_bytes().to_vec())
        .collect();
    assert_eq!(on_mount, on_export);
    assert_eq!(on_mount.len(), 2 * names.len());
}

/// A path of about 4000 bytes (close to PATH_MAX with the mountpoint in front).
#[test]
fn deep_paths_work() {
    let Some(fx) = fixture() else { return };
    let budget = 4000 - fx.mount.path().as_os_str().len();
    let component = "d".repeat(60);
    let mut rel = std::path::PathBuf::new();
    while rel.as_os_str().len() + component.len() + 1 + 10 < budget {
        rel.push(&component);
    }
    fs::create_dir_all(fx.mnt(&rel)).expect("mkdir -p of a deep path");
    let file = rel.join("leaf.txt");
    fs::write(fx.mnt(&file), b"deep").expect("write at the bottom");
    assert_eq!(fs::read(fx.exp(&file)).expect("export"), b"deep");
    assert_eq!(fs::read(fx.mnt(&file)).expect("read back"), b"deep");
    let renamed = rel.join("leaf2.txt");
    fs::rename(fx.mnt(&file), fx.mnt(&renamed)).expect("rename at the bottom");
    assert!(fx.exp(&renamed).is_file());
}

/// Hundreds of files open at once, each with its own server-side handle.
#[test]
fn many_open_files_at_once() {
    let Some(fx) = fixture() else { return };
    const N: usize = 300;
    let mut files: Vec<File> = (0..N)
        .map(|i| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(fx.mnt(format!("f{i}")))
                .unwrap_or_else(|e| panic!("open #{i}: {e}"))
        })
        .collect();
    for (i, f) in files.iter_mut().enumerate() {
        write!(f, "file number {i}").expect("write");
    }
    for (i, f) in files.iter_mut().enumerate() {
        f.seek(SeekFrom::Start(0)).expect("seek");
        let mut s = String::new();
        f.read_to_string(&mut s).expect("read");
        assert_eq!(s, format!("file number {i}"));
    }
    drop(files);
    for i in 0..N {
        assert_eq!(
            fs::read(fx.exp(format!("f{i}"))).expect("export"),
            format!("file number {i}").as_bytes()
        );
    }
}

/// A file with names in two directories: removing or adding one name changes the link
/// count the other directory's listing shows (no event says so: the server watches
/// directories, and a link count change is reported to none of them).
#[test]
fn link_counts_stay_true_in_listings_of_other_names() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::create_dir(e.join("d1")).expect("mkdir");
        fs::create_dir(e.join("d2")).expect("mkdir");
        fs::write(e.join("d1/f"), b"shared").expect("write");
        fs::hard_link(e.join("d1/f"), e.join("d2/g")).expect("link");
    }) else {
        return;
    };
    let listed_nlink = |dir: &str, name: &str| -> u64 {
        fs::read_dir(fx.mnt(dir))
            .expect("read_dir")
            .map(|e| e.expect("entry"))
            .find(|e| e.file_name() == name)
            .unwrap_or_else(|| panic!("{dir}/{name} not listed"))
            .metadata()
            .expect("stat")
            .nlink()
    };
    assert_eq!(listed_nlink("d2", "g"), 2);
    fs::remove_file(fx.mnt("d1/f")).expect("unlink one name");
    assert_eq!(listed_nlink("d2", "g"), 1, "after removing the other name");
    fs::hard_link(fx.mnt("d2/g"), fx.mnt("d1/h")).expect("link");
    assert_eq!(listed_nlink("d1", "h"), 2);
    fs::remove_file(fx.mnt("d1/h")).expect("unlink the new name");
    assert_eq!(listed_nlink("d2", "g"), 1, "after removing the new name");
    // A name replaced by a rename is removed as well.
    fs::hard_link(fx.mnt("d2/g"), fx.mnt("d1/h")).expect("link");
    assert_eq!(listed_nlink("d2", "g"), 2);
    fs::write(fx.mnt("d1/other"), b"other").expect("write");
    fs::rename(fx.mnt("d1/other"), fx.mnt("d1/h")).expect("rename over a name");
    assert_eq!(
        listed_nlink("d2", "g"),
        1,
        "after a rename replaced the other name"
    );
}
