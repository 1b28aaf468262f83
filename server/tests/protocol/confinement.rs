//! Nothing a client sends may reach outside the export root.

use std::os::unix::fs::{MetadataExt, symlink};

use ferry_common::*;

use crate::harness::*;

/// The state of `outside/secret` that no request may change.
fn secret_state(server: &Server) -> (Vec<u8>, u32, i64, u32) {
    let path = server.outside().join("secret");
    let meta = std::fs::metadata(&path).unwrap();
    (
        std::fs::read(&path).unwrap(),
        meta.mode(),
        meta.mtime(),
        meta.uid(),
    )
}

#[tokio::test]
async fn dot_dot_and_bad_names_are_invalid() {
    let server = Server::start().await;
    std::fs::create_dir(server.root().join("a")).unwrap();
    let mut c = server.client().await;
    assert_eq!(c.lookup("", "..").await, Err(libc::EINVAL));
    assert_eq!(c.lookup("", ".").await, Err(libc::EINVAL));
    assert_eq!(c.lookup("a/..", "outside").await, Err(libc::EINVAL));
    assert_eq!(c.lookup("..", "outside").await, Err(libc::EINVAL));
    assert_eq!(c.lookup("/etc", "passwd").await, Err(libc::EINVAL));
    assert_eq!(c.lookup("", "a/b").await, Err(libc::EINVAL));
    assert_eq!(c.lookup("", "").await, Err(libc::EINVAL));
    assert_eq!(c.lookup("", "a\0b").await, Err(libc::EINVAL));
    assert_eq!(c.getattr("../outside/secret").await, Err(libc::EINVAL));
    assert_eq!(c.getattr("a//b").await, Err(libc::EINVAL));
    assert_eq!(c.getattr("a/").await, Err(libc::EINVAL));
    assert_eq!(
        c.open("../outside/secret", libc::O_RDONLY).await,
        Err(libc::EINVAL)
    );
    assert_eq!(c.mkdir("..", "x").await, Err(libc::EINVAL));
    assert_eq!(
        c.call(Request::Rename {
            parent: p(""),
            name: n("a"),
            new_parent: p(""),
            new_name: n(".."),
            flags: 0
        })
        .await,
        Err(libc::EINVAL)
    );
    assert_eq!(c.getattr(&"a/".repeat(3000)).await, Err(libc::ENAMETOOLONG));
}

#[tokio::test]
async fn escaping_symlinks_are_not_followed() {
    let server = Server::start().await;
    let root = server.root();
    symlink("/etc", root.join("etc")).unwrap();
    symlink("../../../../../../..", root.join("up")).unwrap();
    symlink("../outside", root.join("outdir")).unwrap();
    let mut c = server.client().await;
    // The link itself is a fine entry.
    for name in ["etc", "up", "outdir"] {
        assert_eq!(c.lookup("", name).await.unwrap().kind, FileKind::Symlink);
        assert_eq!(c.getattr(name).await.unwrap().kind, FileKind::Symlink);
    }
    // Going through it is refused as EACCES (the walk would leave the root).
    assert_eq!(c.lookup("etc", "passwd").await, Err(libc::EACCES));
    assert_eq!(c.getattr("etc/passwd").await, Err(libc::EACCES));
    assert_eq!(
        c.open("etc/passwd", libc::O_RDONLY).await,
        Err(libc::EACCES)
    );
    assert_eq!(c.lookup("up", "etc").await, Err(libc::EACCES));
    assert_eq!(c.getattr("up/etc/passwd").await, Err(libc::EACCES));
    assert_eq!(c.lookup("outdir", "secret").await, Err(libc::EACCES));
    assert_eq!(
        c.open("outdir/secret", libc::O_RDONLY).await,
        Err(libc::EACCES)
    );
    // O_DIRECTORY|O_NOFOLLOW on a symlink: the kernel says ENOTDIR.
    assert_eq!(
        c.call(Request::OpenDir { path: p("outdir") }).await,
        Err(libc::ENOTDIR)
    );
    assert_eq!(
        c.call(Request::OpenDir { path: p("up/etc") }).await,
        Err(libc::EACCES)
    );
    assert_eq!(
        c.call(Request::StatFs { path: p("up/etc") }).await,
        Err(libc::EACCES)
    );
    // Nothing can be created, renamed or linked through it.
    let before = std::fs::read_dir(server.outside()).unwrap().count();
    assert_eq!(
        c.create("outdir", "new", 0o644, libc::O_RDWR).await,
        Err(libc::EACCES)
    );
    assert_eq!(c.mkdir("outdir", "new").await, Err(libc::EACCES));
    assert_eq!(c.symlink("outdir", "new", "x").await, Err(libc::EACCES));
    std::fs::write(root.join("mine"), b"m").unwrap();
    let rename_out = Request::Rename {
        parent: p(""),
        name: n("mine"),
        new_parent: p("outdir"),
        new_name: n("stolen"),
        flags: 0,
    };
    assert_eq!(c.call(rename_out).await, Err(libc::EACCES));
    let rename_in = Request::Rename {
        parent: p("outdir"),
        name: n("secret"),
        new_parent: p(""),
        new_name: n("stolen"),
        flags: 0,
    };
    assert_eq!(c.call(rename_in).await, Err(libc::EACCES));
    let link_in = Request::Link {
        path: p("outdir/secret"),
        new_parent: p(""),
        new_name: n("stolen"),
    };
    assert_eq!(c.call(link_in).await, Err(libc::EACCES));
    let unlink = Request::Unlink {
        parent: p("outdir"),
        name: n("secret"),
    };
    assert_eq!(c.call(unlink).await, Err(libc::EACCES));
    assert_eq!(std::fs::read_dir(server.outside()).unwrap().count(), before);
    assert!(server.outside().join("secret").exists());
}

#[tokio::test]
async fn final_symlinks_are_never_followed_by_changes() {
    let server = Server::start().await;
    symlink("../outside/secret", server.root().join("esc")).unwrap();
    symlink(server.outside().join("secret"), server.root().join("abs")).unwrap();
    let untouched = secret_state(&server);
    let mut c = server.client().await;
    for name in ["esc", "abs"] {
        let set = |s: SetAttr| s;
        assert_eq!(
            c.setattr(
                name,
                set(SetAttr {
                    mode: Some(0o777),
                    ..Default::default()
                })
            )
            .await,
            Err(libc::EOPNOTSUPP)
        );
        assert_eq!(
            c.setattr(
                name,
                set(SetAttr {
                    size: Some(0),
                    ..Default::default()
                })
            )
            .await,
            Err(libc::ELOOP)
        );
        assert_eq!(c.open(name, libc::O_RDONLY).await, Err(libc::ELOOP));
        assert_eq!(
            c.open(name, libc::O_RDWR | libc::O_TRUNC).await,
            Err(libc::ELOOP)
        );
        assert_eq!(
            c.create("", name, 0o644, libc::O_RDWR | libc::O_TRUNC)
                .await,
            Err(libc::ELOOP)
        );
        assert_eq!(
            c.create("", name, 0o644, libc::O_RDWR | libc::O_EXCL).await,
            Err(libc::EEXIST)
        );
        // Times and ownership change the link itself (lutimes/lchown semantics).
        let t = Timespec {
            sec: 12345,
            nsec: 0,
        };
        let a = c
            .setattr(
                name,
                set(SetAttr {
                    mtime: Some(TimeSet::At(t)),
                    ..Default::default()
                }),
            )
            .await
            .unwrap();
        assert_eq!((a.kind, a.mtime), (FileKind::Symlink, t));
        let a = c
            .setattr(
                name,
                set(SetAttr {
                    uid: Some(4321),
                    ..Default::default()
                }),
            )
            .await;
        if crate::meta::nix_is_root() {
            assert_eq!(a.unwrap().uid, 4321);
        }
        assert_eq!(
            secret_state(&server),
            untouched,
            "after changes through {name}"
        );
    }
    // Reading the link is fine and returns the stored target.
    assert_eq!(
        c.call(Request::ReadLink { path: p("esc") }).await,
        Ok(Response::data(b"../outside/secret".to_vec()))
    );
    // Removing it removes the link, not the target.
    let unlink = Request::Unlink {
        parent: p(""),
        name: n("esc"),
    };
    assert_eq!(c.call(unlink).await, Ok(Response::Ok));
    assert_eq!(secret_state(&server), untouched);
}

#[tokio::test]
async fn symlinks_that_stay_beneath_are_followed_mid_path() {
    let server = Server::start().await;
    std::fs::create_dir_all(server.root().join("real/sub")).unwrap();
    std::fs::write(server.root().join("real/sub/f"), b"x").unwrap();
    symlink("real", server.root().join("alias")).unwrap();
    symlink("../real/sub", server.root().join("real/up")).unwrap();
    let mut c = server.client().await;
    assert_eq!(c.lookup("alias/sub", "f").await.unwrap().size, 1);
    assert_eq!(c.getattr("real/up/f").await.unwrap().size, 1);
    let (h, _) = c.open("alias/sub/f", libc::O_RDONLY).await.unwrap();
    assert_eq!(c.read(h, 0, 10).await.unwrap(), b"x");
    // The final component still is not followed.
    assert_eq!(c.getattr("alias").await.unwrap().kind, FileKind::Symlink);
}
