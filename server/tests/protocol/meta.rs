//! Namespace and metadata operations: happy paths and the errno of each failure.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use ferry_common::*;

use crate::harness::*;

#[tokio::test]
async fn lookup_and_getattr() {
    let server = Server::start().await;
    std::fs::create_dir(server.root().join("d")).unwrap();
    std::fs::write(server.root().join("d/f"), b"hello").unwrap();
    let mut c = server.client().await;
    let a = c.lookup("d", "f").await.unwrap();
    assert_eq!(a.kind, FileKind::File);
    assert_eq!(a.size, 5);
    let meta = std::fs::metadata(server.root().join("d/f")).unwrap();
    assert_eq!(a.ino, meta.ino());
    assert_eq!(a.perm as u32, meta.mode() & 0o7777);
    assert_eq!(a.mtime.sec, meta.mtime());
    assert_eq!(a.mtime.nsec as i64, meta.mtime_nsec());
    assert!(a.blksize >= 128 * 1024);
    assert_eq!(c.getattr("d/f").await.unwrap(), a);
    assert_eq!(c.getattr("").await.unwrap().kind, FileKind::Dir);
    assert_eq!(c.lookup("d", "nope").await, Err(libc::ENOENT));
    assert_eq!(c.lookup("nope", "f").await, Err(libc::ENOENT));
    assert_eq!(c.lookup("d/f", "x").await, Err(libc::ENOTDIR));
    assert_eq!(c.getattr("d/nope").await, Err(libc::ENOENT));
    let long = "x".repeat(300);
    assert_eq!(c.lookup("d", &long).await, Err(libc::ENAMETOOLONG));
}

/// `LookupIn` answers only for the directory named: after an exchange the path leads
/// to the other one, and the answer is `ESTALE`, not the other one's entry.
#[tokio::test]
async fn a_checked_lookup_answers_only_for_its_directory() {
    let server = Server::start().await;
    std::fs::create_dir_all(server.root().join("a/x")).unwrap();
    std::fs::create_dir_all(server.root().join("d/y")).unwrap();
    let mut c = server.client().await;
    let a = c.getattr("a").await.unwrap().ino;
    let root = c.getattr("").await.unwrap().ino;
    let lookup_in = |parent: &str, parent_node: u64, name: &str| Request::LookupIn {
        parent: p(parent),
        parent_node,
        name: n(name),
    };
    let x = c.attr(lookup_in("a", a, "x")).await.unwrap();
    assert_eq!(x, c.lookup("a", "x").await.unwrap());
    assert_eq!(c.attr(lookup_in("a", a, "y")).await, Err(libc::ENOENT));
    assert_eq!(c.attr(lookup_in("", root, "a")).await.unwrap().ino, a);
    let (ra, rd) = (server.root().join("a"), server.root().join("d"));
    let (ca, cd) = (cstr(&ra), cstr(&rd));
    // SAFETY: two valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cd.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0, "exchange: {}", std::io::Error::last_os_error());
    assert_eq!(c.attr(lookup_in("a", a, "y")).await, Err(libc::ESTALE));
    assert_eq!(c.attr(lookup_in("a", a, "x")).await, Err(libc::ESTALE));
    assert_eq!(c.attr(lookup_in("d", a, "x")).await, Ok(x));
    // (The plain lookup answers for whatever the path leads to.)
    assert!(c.lookup("a", "y").await.is_ok());
}

fn cstr(p: &std::path::Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[tokio::test]
async fn mkdir_rmdir_unlink() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let a = c
        .attr(Request::MkDir {
            parent: p(""),
            name: n("d"),
            mode: 0o777,
            umask: 0o027,
        })
        .await
        .unwrap();
    assert_eq!(a.kind, FileKind::Dir);
    assert_eq!(a.perm, 0o750);
    assert_eq!(c.mkdir("", "d").await, Err(libc::EEXIST));
    c.mkdir("d", "sub").await.unwrap();
    let rmdir = |name: &str| Request::RmDir {
        parent: p(""),
        name: n(name),
    };
    let unlink = |name: &str| Request::Unlink {
        parent: p(""),
        name: n(name),
    };
    assert_eq!(c.call(rmdir("d")).await, Err(libc::ENOTEMPTY));
    assert_eq!(c.call(unlink("d")).await, Err(libc::EISDIR));
    assert_eq!(
        c.call(Request::RmDir {
            parent: p("d"),
            name: n("sub")
        })
        .await,
        Ok(Response::Ok)
    );
    assert_eq!(c.call(rmdir("d")).await, Ok(Response::Ok));
    assert_eq!(c.call(rmdir("d")).await, Err(libc::ENOENT));
    std::fs::write(server.root().join("f"), b"").unwrap();
    assert_eq!(c.call(rmdir("f")).await, Err(libc::ENOTDIR));
    assert_eq!(c.call(unlink("f")).await, Ok(Response::Ok));
    assert!(!server.root().join("f").exists());
    assert_eq!(c.call(unlink("f")).await, Err(libc::ENOENT));
}

/// Files removed by `Unlink`, and one a `Rename` replaces, are freed off the request
/// path (`ferryd`'s reaper), but a `StatFs` after them finds them all freed: the server
/// (running in this process) holds none of them by then, and a file that keeps another
/// name is untouched.
#[tokio::test]
async fn removed_and_replaced_files_are_freed_before_a_statfs() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let root = server.root();
    let names: Vec<String> = (0..64).map(|i| format!("gone{i}")).collect();
    // On disk, so that freeing them takes a while (their blocks are freed for real).
    let write_synced = |name: &str, byte: u8| {
        let mut f = std::fs::File::create(root.join(name)).unwrap();
        std::io::Write::write_all(&mut f, &vec![byte; 256 * 1024]).unwrap();
        f.sync_all().unwrap();
    };
    for name in &names {
        write_synced(name, 1);
    }
    for (name, data) in [("old", 2), ("new", 3), ("linked", 4)] {
        write_synced(name, data);
    }
    std::fs::hard_link(root.join("linked"), root.join("other-name")).unwrap();
    let unlink = |name: &str| Request::Unlink {
        parent: p(""),
        name: n(name),
    };
    for name in names.iter().map(String::as_str).chain(["linked"]) {
        assert_eq!(
            c.call(unlink(name)).await,
            Ok(Response::Ok),
            "unlink {name}"
        );
    }
    let replace = Request::Rename {
        parent: p(""),
        name: n("new"),
        new_parent: p(""),
        new_name: n("old"),
        flags: 0,
    };
    assert_eq!(c.call(replace).await, Ok(Response::Ok));
    assert!(matches!(
        c.call(Request::StatFs { path: p("") }).await,
        Ok(Response::StatFs(_))
    ));
    // Descriptors of this process that lead to a file of the export without that name.
    let held: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| t.starts_with(&*root.to_string_lossy()) && t.ends_with(" (deleted)"))
        .collect();
    assert!(held.is_empty(), "still held after the statfs: {held:?}");
    assert_eq!(
        std::fs::read(root.join("old")).unwrap(),
        vec![3; 256 * 1024]
    );
    assert_eq!(
        std::fs::read(root.join("other-name")).unwrap(),
        vec![4; 256 * 1024]
    );
    server.stop().await;
}

#[tokio::test]
async fn symlink_readlink_link() {
    let server = Server::start().await;
    std::fs::write(server.root().join("f"), b"data").unwrap();
    let mut c = server.client().await;
    let a = c.symlink("", "l", "some/where/../else").await.unwrap();
    assert_eq!(a.kind, FileKind::Symlink);
    assert_eq!(a.size, 18);
    assert_eq!(
        c.call(Request::ReadLink { path: p("l") }).await,
        Ok(Response::data(b"some/where/../else".to_vec()))
    );
    assert_eq!(
        c.call(Request::ReadLink { path: p("f") }).await,
        Err(libc::EINVAL)
    );
    assert_eq!(
        c.call(Request::ReadLink { path: p("x") }).await,
        Err(libc::ENOENT)
    );
    assert_eq!(c.symlink("", "l", "x").await, Err(libc::EEXIST));
    let link = |path: &str, name: &str| Request::Link {
        path: p(path),
        new_parent: p(""),
        new_name: n(name),
    };
    let a = c.attr(link("f", "g")).await.unwrap();
    assert_eq!(a.nlink, 2);
    assert_eq!(a.ino, c.getattr("f").await.unwrap().ino);
    assert_eq!(c.call(link("f", "g")).await, Err(libc::EEXIST));
    assert_eq!(c.call(link("nope", "h")).await, Err(libc::ENOENT));
    // Linking a symlink links the symlink, not its target.
    let a = c.attr(link("l", "l2")).await.unwrap();
    assert_eq!(a.kind, FileKind::Symlink);
    c.mkdir("", "d").await.unwrap();
    assert_eq!(c.call(link("d", "d2")).await, Err(libc::EPERM));
}

#[tokio::test]
async fn rename_with_flags() {
    let server = Server::start().await;
    std::fs::write(server.root().join("a"), b"A").unwrap();
    std::fs::write(server.root().join("b"), b"B").unwrap();
    std::fs::create_dir(server.root().join("d")).unwrap();
    let mut c = server.client().await;
    let rename = |from: &str, to_dir: &str, to: &str, flags: u32| Request::Rename {
        parent: p(""),
        name: n(from),
        new_parent: p(to_dir),
        new_name: n(to),
        flags,
    };
    assert_eq!(
        c.call(rename("a", "", "b", rename_flags::NOREPLACE)).await,
        Err(libc::EEXIST)
    );
    assert_eq!(
        c.call(rename("a", "", "b", rename_flags::EXCHANGE)).await,
        Ok(Response::Ok)
    );
    assert_eq!(std::fs::read(server.root().join("a")).unwrap(), b"B");
    assert_eq!(c.call(rename("a", "", "b", 4)).await, Err(libc::EINVAL));
    assert_eq!(
        c.call(rename("a", "", "b", 1 << 20)).await,
        Err(libc::EINVAL)
    );
    assert_eq!(c.call(rename("a", "d", "x", 0)).await, Ok(Response::Ok));
    assert_eq!(std::fs::read(server.root().join("d/x")).unwrap(), b"B");
    assert_eq!(c.call(rename("b", "", "d", 0)).await, Err(libc::EISDIR));
    assert_eq!(c.call(rename("nope", "", "z", 0)).await, Err(libc::ENOENT));
    assert_eq!(
        c.call(rename("d", "d", "inside", 0)).await,
        Err(libc::EINVAL)
    );
}

#[tokio::test]
async fn setattr_applies_each_field() {
    let server = Server::start().await;
    std::fs::write(server.root().join("f"), b"0123456789").unwrap();
    let mut c = server.client().await;
    let before = c.getattr("f").await.unwrap();
    let a = c
        .setattr(
            "f",
            SetAttr {
                size: Some(4),
                mode: Some(libc::S_IFREG | 0o4640),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(a.size, 4);
    assert_eq!(a.perm, 0o4640);
    assert_ne!(a.version, before.version);
    assert_eq!(std::fs::read(server.root().join("f")).unwrap(), b"0123");
    let t = Timespec {
        sec: 1_000_000_000,
        nsec: 123_456_789,
    };
    let a = c
        .setattr(
            "f",
            SetAttr {
                mtime: Some(TimeSet::At(t)),
                atime: Some(TimeSet::Now),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(a.mtime, t);
    assert!(a.atime.sec > t.sec);
    let bad = Timespec {
        sec: 0,
        nsec: 1_000_000_000,
    };
    let r = c
        .setattr(
            "f",
            SetAttr {
                mtime: Some(TimeSet::At(bad)),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(r, Err(libc::EINVAL));
    // The root itself.
    let a = c
        .setattr(
            "",
            SetAttr {
                mode: Some(0o711),
                mtime: Some(TimeSet::At(t)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((a.perm, a.mtime), (0o711, t));
    assert_eq!(
        c.setattr(
            "nope",
            SetAttr {
                mode: Some(0o600),
                ..Default::default()
            }
        )
        .await,
        Err(libc::ENOENT)
    );
    c.mkdir("", "d").await.unwrap();
    let trunc = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    assert_eq!(c.setattr("d", trunc.clone()).await, Err(libc::EISDIR));
    if nix_is_root() {
        let a = c
            .setattr(
                "f",
                SetAttr {
                    uid: Some(1234),
                    gid: Some(5678),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!((a.uid, a.gid), (1234, 5678));
        let meta = std::fs::metadata(server.root().join("f")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    }
}

pub fn nix_is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test]
async fn mknod_makes_fifos_and_refuses_bad_types() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let mknod = |name: &str, mode: u32| Request::MkNod {
        parent: p(""),
        name: n(name),
        mode,
        umask: 0o022,
        rdev: 0,
    };
    let a = c.attr(mknod("fifo", libc::S_IFIFO | 0o666)).await.unwrap();
    assert_eq!((a.kind, a.perm), (FileKind::Fifo, 0o644));
    let a = c.attr(mknod("reg", libc::S_IFREG | 0o600)).await.unwrap();
    assert_eq!(a.kind, FileKind::File);
    assert_eq!(
        c.call(mknod("fifo", libc::S_IFIFO | 0o666)).await,
        Err(libc::EEXIST)
    );
    // I/O on a FIFO is the client kernel's business, never the server's.
    assert!(matches!(
        c.open("fifo", libc::O_RDONLY).await,
        Err(libc::EOPNOTSUPP)
    ));
    let trunc = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    assert_eq!(c.setattr("fifo", trunc).await, Err(libc::EINVAL));
}

#[tokio::test]
async fn statfs_reports_the_filesystem() {
    let server = Server::start().await;
    let mut c = server.client().await;
    match c.call(Request::StatFs { path: p("") }).await.unwrap() {
        Response::StatFs(s) => {
            assert!(s.blocks > 0 && s.bsize > 0 && s.namelen >= 255);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.call(Request::StatFs { path: p("nope") }).await,
        Err(libc::ENOENT)
    );
}

/// A listing bigger than a batch: after each batch the server reads and stats on ahead
/// of the next `ReadDir`. Every entry comes once with its own attributes and no batch
/// is bigger than asked; a stream released while it reads ahead is gone at once; names
/// removed in the middle of a listing never come twice, and every name still there
/// comes.
#[tokio::test]
async fn a_listing_read_ahead_gives_every_entry_once() {
    const N: usize = 3 * MAX_DIR_BATCH as usize + 7;
    let server = Server::start().await;
    let dir = server.root().join("big");
    std::fs::create_dir(&dir).unwrap();
    let name = |i: usize| format!("file-{i:05}");
    for i in 0..N {
        std::fs::write(dir.join(name(i)), vec![0u8; i % 13]).unwrap();
    }
    let mut c = server.client().await;
    let list = |max_entries| Request::ListDir {
        path: p("big"),
        max_entries,
        speculative: false,
    };
    // Released right after its first batch, while the server reads on.
    let h = match c.call(list(100)).await.unwrap() {
        Response::Listing {
            handle,
            entries,
            eof: false,
            ..
        } => {
            assert!(!entries.is_empty() && entries.len() <= 100);
            handle
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        c.call(Request::ReleaseDir { handle: h }).await,
        Ok(Response::Ok)
    );
    assert_eq!(
        c.call(Request::ReadDir {
            handle: h,
            max_entries: 10
        })
        .await,
        Err(libc::EBADF)
    );
    // Read to the end, removing names after the first batch.
    let mut seen = std::collections::BTreeMap::new();
    let keep = |entries: Vec<DirEntry>, seen: &mut std::collections::BTreeMap<_, _>| {
        for e in entries {
            let n = String::from_utf8(e.name.0).unwrap();
            assert!(seen.insert(n, e.attr.size).is_none(), "duplicate entry");
        }
    };
    let h = match c.call(list(MAX_DIR_BATCH)).await.unwrap() {
        Response::Listing {
            handle,
            entries,
            eof: false,
            ..
        } => {
            keep(entries, &mut seen);
            handle
        }
        other => panic!("{other:?}"),
    };
    let removed: Vec<usize> = (0..N).step_by(97).collect();
    for &i in &removed {
        std::fs::remove_file(dir.join(name(i))).unwrap();
    }
    loop {
        match c
            .call(Request::ReadDir {
                handle: h,
                max_entries: 1000,
            })
            .await
            .unwrap()
        {
            Response::Dir { entries, eof } => {
                assert!(entries.len() <= 1000);
                keep(entries, &mut seen);
                if eof {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    for i in 0..N {
        match seen.get(&name(i)) {
            Some(&size) => assert_eq!(size, (i % 13) as u64, "{}", name(i)),
            None => assert!(removed.contains(&i), "{} not listed", name(i)),
        }
    }
    assert!(seen.len() <= N);
    assert_eq!(
        c.call(Request::ReleaseDir { handle: h }).await,
        Ok(Response::Ok)
    );
}

#[tokio::test]
async fn readdir_returns_every_entry_once_with_attributes() {
    let server = Server::start().await;
    let dir = server.root().join("many");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..1000 {
        std::fs::write(dir.join(format!("file-{i:04}")), vec![0u8; i % 7]).unwrap();
    }
    std::os::unix::fs::symlink("file-0001", dir.join("link")).unwrap();
    let mut c = server.client().await;
    let (h, attr) = match c.call(Request::OpenDir { path: p("many") }).await.unwrap() {
        Response::Opened { handle, attr } => (handle, attr),
        other => panic!("{other:?}"),
    };
    assert_eq!(attr.kind, FileKind::Dir);
    let mut seen = std::collections::BTreeMap::new();
    loop {
        match c
            .call(Request::ReadDir {
                handle: h,
                max_entries: 300,
            })
            .await
            .unwrap()
        {
            Response::Dir { entries, eof } => {
                assert!(entries.len() <= 300);
                for e in entries {
                    let name = String::from_utf8(e.name.0).unwrap();
                    assert!(seen.insert(name, e.attr).is_none(), "duplicate entry");
                }
                if eof {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen.len(), 1001);
    assert!(!seen.contains_key(".") && !seen.contains_key(".."));
    assert_eq!(seen["file-0005"].size, 5);
    assert_eq!(seen["link"].kind, FileKind::Symlink);
    // After eof, reading again stays at eof.
    assert_eq!(
        c.call(Request::ReadDir {
            handle: h,
            max_entries: 10
        })
        .await,
        Ok(Response::Dir {
            entries: vec![],
            eof: true
        })
    );
    assert_eq!(
        c.call(Request::ReleaseDir { handle: h }).await,
        Ok(Response::Ok)
    );
    assert_eq!(
        c.call(Request::ReleaseDir { handle: h }).await,
        Err(libc::EBADF)
    );
    assert_eq!(
        c.call(Request::ReadDir {
            handle: h,
            max_entries: 10
        })
        .await,
        Err(libc::EBADF)
    );
    assert_eq!(
        c.call(Request::OpenDir { path: p("nope") }).await,
        Err(libc::ENOENT)
    );
    assert_eq!(
        c.call(Request::OpenDir {
            path: p("many/file-0001")
        })
        .await,
        Err(libc::ENOTDIR)
    );
    // Empty directory: one batch, eof.
    let h = match c.call(Request::OpenDir { path: p("") }).await.unwrap() {
        Response::Opened { handle, .. } => handle,
        other => panic!("{other:?}"),
    };
    match c
        .call(Request::ReadDir {
            handle: h,
            max_entries: 0,
        })
        .await
        .unwrap()
    {
        Response::Dir { entries, eof } => {
            assert_eq!(entries.len(), 1);
            assert!(eof);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn read_only_export_refuses_every_mutation() {
    let server = Server::start_with(true).await;
    std::fs::write(server.root().join("f"), b"data").unwrap();
    let mut c = server.client().await;
    assert_eq!(c.mkdir("", "d").await, Err(libc::EROFS));
    assert_eq!(
        c.create("", "g", 0o644, libc::O_RDWR).await,
        Err(libc::EROFS)
    );
    assert_eq!(c.open("f", libc::O_WRONLY).await, Err(libc::EROFS));
    assert_eq!(
        c.open("f", libc::O_RDONLY | libc::O_TRUNC).await,
        Err(libc::EROFS)
    );
    assert_eq!(c.setattr("f", SetAttr::default()).await, Err(libc::EROFS));
    assert_eq!(
        c.call(Request::Unlink {
            parent: p(""),
            name: n("f")
        })
        .await,
        Err(libc::EROFS)
    );
    assert_eq!(c.symlink("", "l", "f").await, Err(libc::EROFS));
    let (h, _) = c.open("f", libc::O_RDONLY).await.unwrap();
    assert_eq!(c.read(h, 0, 100).await.unwrap(), b"data");
    assert_eq!(c.write(h, 0, b"x").await, Err(libc::EROFS));
    assert_eq!(std::fs::read(server.root().join("f")).unwrap(), b"data");
    assert!(c.lookup("", "f").await.is_ok());
}

#[tokio::test]
async fn new_entries_belong_to_the_caller_when_root() {
    if !nix_is_root() {
        return;
    }
    let server = Server::start().await;
    let mut c = server.client().await;
    c.caller = Caller { uid: 1234, gid: 99 };
    let a = c.mkdir("", "d").await.unwrap();
    assert_eq!((a.uid, a.gid), (1234, 99));
    let (_, a) = c.create("d", "f", 0o644, libc::O_RDWR).await.unwrap();
    assert_eq!((a.uid, a.gid), (1234, 99));
    let a = c.symlink("d", "l", "f").await.unwrap();
    assert_eq!((a.uid, a.gid), (1234, 99));
    let meta = std::fs::symlink_metadata(server.root().join("d/l")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 99));
    // setgid directory: new entries keep the directory's group.
    std::fs::create_dir(server.root().join("sg")).unwrap();
    std::os::unix::fs::chown(server.root().join("sg"), Some(0), Some(4242)).unwrap();
    std::fs::set_permissions(
        server.root().join("sg"),
        std::fs::Permissions::from_mode(0o2777),
    )
    .unwrap();
    let (_, a) = c.create("sg", "f", 0o644, libc::O_RDWR).await.unwrap();
    assert_eq!((a.uid, a.gid), (1234, 4242));
    // Existing files opened through Create keep their owner.
    std::fs::write(server.root().join("mine"), b"").unwrap();
    let (_, a) = c.create("", "mine", 0o644, libc::O_RDWR).await.unwrap();
    assert_eq!(a.uid, 0);
    // Without the capability, entries belong to the server user.
    let mut plain = Client::connect(server.addr, 0).await;
    plain.caller = Caller { uid: 1234, gid: 99 };
    let a = plain.mkdir("", "d2").await.unwrap();
    assert_eq!(a.uid, 0);
}

/// Every change to a directory's entries answers with the directory's attributes after
/// it (the client answers the kernel's next GETATTR of the directory from them).
#[tokio::test]
async fn entry_changes_carry_the_directory_attributes() {
    let server = Server::start().await;
    let mut c = server.client().await;
    c.mkdir("", "d").await.unwrap();
    let dir_now = |server: &Server| std::fs::metadata(server.root().join("d")).unwrap();
    let requests = [
        Request::MkDir {
            parent: p("d"),
            name: n("sub"),
            mode: 0o755,
            umask: 0,
        },
        Request::Create {
            parent: p("d"),
            name: n("f"),
            mode: 0o644,
            umask: 0,
            flags: libc::O_WRONLY,
        },
        Request::Symlink {
            parent: p("d"),
            name: n("l"),
            target: b"f".to_vec(),
        },
        Request::Link {
            path: p("d/f"),
            new_parent: p("d"),
            new_name: n("g"),
        },
        Request::Unlink {
            parent: p("d"),
            name: n("g"),
        },
        Request::RmDir {
            parent: p("d"),
            name: n("sub"),
        },
    ];
    for req in requests {
        let kind = req.kind();
        let Ok(Response::InDir { dir, reply }) = c.call_raw(req).await else {
            panic!("{kind}: no directory attributes");
        };
        let m = dir_now(&server);
        assert_eq!(dir.ino, m.ino(), "{kind}");
        assert_eq!(
            (dir.nlink, dir.mtime.sec, dir.mtime.nsec),
            (m.nlink() as u32, m.mtime(), m.mtime_nsec() as u32),
            "{kind}"
        );
        assert!(!matches!(*reply, Response::InDir { .. }), "{kind}");
    }
    // Failed changes are plain errors; other requests are not wrapped.
    assert_eq!(
        c.call_raw(Request::Unlink {
            parent: p("d"),
            name: n("missing"),
        })
        .await,
        Err(libc::ENOENT)
    );
    assert!(matches!(
        c.call_raw(Request::GetAttr {
            path: p("d"),
            handle: None
        })
        .await,
        Ok(Response::Attr(_))
    ));
}

/// A keyed change sent again (on another connection, as after a lost answer) gets its
/// first answer and does not run twice; a key on a request that takes none is refused;
/// a repeat the server never saw the session of is not run.
#[tokio::test]
async fn a_keyed_change_runs_once() {
    let server = Server::start().await;
    std::fs::write(server.root().join("f"), b"f").unwrap();
    let rename = || Request::Rename {
        parent: p(""),
        name: n("f"),
        new_parent: p(""),
        new_name: n("g"),
        flags: 0,
    };
    let key = OnceKey {
        session: 77,
        seq: 1,
        repeat: false,
    };
    let mut c = server.client().await;
    assert_eq!(c.call_keyed(rename(), key).await, Ok(Response::Ok));
    let mut again = server.client().await;
    let repeat = OnceKey {
        repeat: true,
        ..key
    };
    // Run again, it would fail with ENOENT.
    assert_eq!(again.call_keyed(rename(), repeat).await, Ok(Response::Ok));
    assert!(server.root().join("g").exists());
    // A new key runs: the name is gone now.
    let next = OnceKey { seq: 2, ..key };
    assert_eq!(again.call_keyed(rename(), next).await, Err(libc::ENOENT));
    assert_eq!(
        again
            .call_keyed(
                Request::GetAttr {
                    path: p("g"),
                    handle: None
                },
                OnceKey { seq: 3, ..key }
            )
            .await,
        Err(libc::EINVAL)
    );
    // Unknown session: not run (the directory is not made).
    let stranger = OnceKey {
        session: 78,
        seq: 1,
        repeat: true,
    };
    let mkdir = Request::MkDir {
        parent: p(""),
        name: n("d"),
        mode: 0o755,
        umask: 0,
    };
    assert_eq!(
        again.call_keyed(mkdir, stranger).await,
        Ok(Response::NotRemembered)
    );
    assert!(!server.root().join("d").exists());
}

/// The repeat of a keyed exclusive create that ran opens the file it made on the
/// repeating connection (the first handle went with its connection); a create that
/// failed repeats its failure.
#[tokio::test]
async fn a_keyed_create_repeated_opens_the_same_file_again() {
    let server = Server::start().await;
    let create = |name: &str| Request::Create {
        parent: p(""),
        name: n(name),
        mode: 0o644,
        umask: 0o022,
        flags: libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
    };
    let key = OnceKey {
        session: 5,
        seq: 1,
        repeat: false,
    };
    let mut first = server.client().await;
    let ino = match first.call_keyed(create("f"), key).await {
        Ok(Response::Opened { attr, .. }) => attr.ino,
        other => panic!("create: {other:?}"),
    };
    drop(first);
    let mut again = server.client().await;
    let repeat = OnceKey {
        repeat: true,
        ..key
    };
    let handle = match again.call_keyed(create("f"), repeat).await {
        Ok(Response::Opened { handle, attr }) => {
            assert_eq!(attr.ino, ino, "another file");
            handle
        }
        other => panic!("repeated create (EEXIST if run again): {other:?}"),
    };
    assert_eq!(again.write(handle, 0, b"mine").await, Ok(4));
    again.commit(handle).await.unwrap();
    assert_eq!(std::fs::read(server.root().join("f")).unwrap(), b"mine");
    // A create that failed: its repeat fails the same way, without running.
    std::fs::write(server.root().join("taken"), b"x").unwrap();
    let k2 = OnceKey { seq: 2, ..key };
    assert_eq!(
        again.call_keyed(create("taken"), k2).await,
        Err(libc::EEXIST)
    );
    std::fs::remove_file(server.root().join("taken")).unwrap();
    let r2 = OnceKey { repeat: true, ..k2 };
    assert_eq!(
        again.call_keyed(create("taken"), r2).await,
        Err(libc::EEXIST)
    );
    assert!(!server.root().join("taken").exists());
}
