//! `ferryd --read-only`: everything that reads works, everything that writes fails with
//! EROFS (through the mount, `ferry put` and raw requests), and the export is unchanged.

use std::fs::{self, File, OpenOptions, Permissions};
use std::os::unix::fs::{PermissionsExt, symlink};

use ferry_common::proto::{Request, Response, SetAttr};
use ferry_tests::sys::{Time, mkfifo, renameat2, truncate, utimensat};
use ferry_tests::tree::{self, Opts};
use ferry_tests::wire::{RawConn, name, open, rel};
use ferry_tests::{TestServer, assert_errno, ferry, fixture_with, run, temp_dir};

const OPTS: Opts = Opts {
    perm: true,
    nlink: true,
    mtime: true,
    owner: true,
};

#[test]
fn writes_through_the_mount_fail_with_erofs() {
    let Some(fx) = fixture_with(&["--read-only"], &[], |e| {
        tree::make_sample(e, 11).expect("sample tree");
    }) else {
        return;
    };
    let before = tree::snapshot(fx.server.export_path(), OPTS).expect("snapshot");
    // Reads work.
    assert_eq!(fs::read(fx.mnt("a.txt")).expect("read"), b"alpha\n");
    assert_eq!(fs::read_dir(fx.mnt("sub")).expect("readdir").count(), 3);
    assert_eq!(
        fs::read_link(fx.mnt("link")).expect("readlink"),
        std::path::Path::new("a.txt")
    );
    tree::assert_same(fx.server.export_path(), fx.mount.path(), Opts::PERM);
    // Writes do not.
    let erofs = libc::EROFS;
    assert_errno(File::create(fx.mnt("new")), erofs);
    assert_errno(OpenOptions::new().write(true).open(fx.mnt("a.txt")), erofs);
    assert_errno(OpenOptions::new().append(true).open(fx.mnt("a.txt")), erofs);
    assert_errno(fs::create_dir(fx.mnt("newdir")), erofs);
    assert_errno(fs::remove_file(fx.mnt("a.txt")), erofs);
    assert_errno(fs::remove_dir(fx.mnt("emptydir")), erofs);
    assert_errno(fs::rename(fx.mnt("a.txt"), fx.mnt("b.txt")), erofs);
    assert_errno(
        renameat2(&fx.mnt("a.txt"), &fx.mnt("empty"), libc::RENAME_EXCHANGE),
        erofs,
    );
    assert_errno(symlink("x", fx.mnt("newlink")), erofs);
    assert_errno(fs::hard_link(fx.mnt("a.txt"), fx.mnt("hl")), erofs);
    assert_errno(
        fs::set_permissions(fx.mnt("a.txt"), Permissions::from_mode(0o777)),
        erofs,
    );
    assert_errno(
        std::os::unix::fs::chown(fx.mnt("a.txt"), Some(1), Some(1)),
        erofs,
    );
    assert_errno(truncate(&fx.mnt("a.txt"), 0), erofs);
    assert_errno(
        utimensat(&fx.mnt("a.txt"), Time::At(1, 1), Time::At(1, 1), false),
        erofs,
    );
    assert_errno(mkfifo(&fx.mnt("fifo"), 0o644), erofs);
    assert_eq!(
        tree::snapshot(fx.server.export_path(), OPTS).expect("snapshot"),
        before,
        "the read-only export changed"
    );
}

#[test]
fn ferry_put_and_raw_writes_are_refused() {
    let server = TestServer::start_with(&["--read-only"]);
    fs::write(server.export("f"), b"original").expect("write");
    let local = temp_dir("local");
    fs::write(local.path().join("up"), b"upload").expect("write");
    let out = run(ferry()
        .args(["put", &server.remote()])
        .arg(local.path().join("up"))
        .arg("f"));
    out.assert_failure();
    assert!(!out.stderr.is_empty(), "no reason given: {out}");
    let out = run(ferry()
        .args(["put", &server.remote()])
        .arg(local.path().join("up"))
        .arg("new"));
    out.assert_failure();
    assert_eq!(fs::read(server.export("f")).expect("export"), b"original");
    assert!(!server.export("new").exists());
    // Reads still work with ferry get.
    let out = run(ferry()
        .args(["get", &server.remote(), "f"])
        .arg(local.path().join("down")));
    out.assert_success();
    assert_eq!(
        fs::read(local.path().join("down")).expect("read"),
        b"original"
    );

    let (mut c, welcome) = RawConn::handshake(server.addr());
    assert!(welcome.read_only, "Welcome does not say read_only");
    let refused = [
        Request::Create {
            parent: rel(""),
            name: name("x"),
            mode: 0o644,
            umask: 0,
            flags: libc::O_WRONLY | libc::O_CREAT,
        },
        Request::MkDir {
            parent: rel(""),
            name: name("d"),
            mode: 0o755,
            umask: 0,
        },
        Request::Unlink {
            parent: rel(""),
            name: name("f"),
        },
        Request::Rename {
            parent: rel(""),
            name: name("f"),
            new_parent: rel(""),
            new_name: name("g"),
            flags: 0,
        },
        Request::SetAttr {
            path: rel("f"),
            handle: None,
            set: SetAttr {
                size: Some(0),
                ..SetAttr::default()
            },
        },
        open("f", libc::O_WRONLY),
        open("f", libc::O_RDONLY | libc::O_TRUNC),
        Request::Symlink {
            parent: rel(""),
            name: name("l"),
            target: b"f".to_vec(),
        },
        Request::Link {
            path: rel("f"),
            new_parent: rel(""),
            new_name: name("h"),
        },
    ];
    for req in refused {
        let kind = req.kind();
        assert_eq!(
            c.call(req),
            Err(libc::EROFS),
            "{kind} on a read-only export"
        );
    }
    // A handle opened for reading cannot be written through.
    let handle = match c.call(open("f", libc::O_RDONLY)) {
        Ok(Response::Opened { handle, .. }) => handle,
        other => panic!("Open for reading: {other:?}"),
    };
    let r = c.call(Request::Write {
        handle,
        offset: 0,
        data: b"evil".to_vec().into(),
    });
    assert!(r.is_err(), "Write on a read-only export: {r:?}");
    assert_eq!(fs::read(server.export("f")).expect("export"), b"original");
    assert_eq!(
        fs::read_dir(server.export_path()).expect("readdir").count(),
        1
    );
}

/// On a read-only export nothing on the mount can write, so fully cached large files are
/// read through FUSE passthrough by default (where the kernel offers it), and a file
/// changed on the server's disk still reads new through the mount.
#[test]
fn a_read_only_export_reads_cached_files_through_passthrough() {
    let data = ferry_tests::rng::Rng::new(0x40a5).bytes(3 << 20);
    let Some(fx) = fixture_with(&["--read-only"], &[], |e| {
        fs::write(e.join("big"), &data).expect("write");
    }) else {
        return;
    };
    assert!(fs::read(fx.mnt("big")).expect("first read") == data);
    let before = fx.mount.stats();
    assert!(fs::read(fx.mnt("big")).expect("second read") == data);
    let after = fx.mount.stats();
    if after.get("passthrough_opens") == before.get("passthrough_opens") {
        let log = fx.mount.log();
        assert!(
            log.contains("passthrough"),
            "no passthrough open on a read-only export, and the mount log does not say why:\n{log}"
        );
        eprintln!("passthrough unavailable here:\n{log}");
        return;
    }
    assert_eq!(
        after.get_or_zero("requests.read"),
        before.get_or_zero("requests.read"),
        "the second read went through the daemon\n{after}"
    );
    let mut changed = data.clone();
    changed[12345] ^= 0x5a;
    fs::write(fx.exp("big"), &changed).expect("change on the server's disk");
    assert!(
        ferry_tests::poll_until(std::time::Duration::from_secs(5), || {
            fs::read(fx.mnt("big")).is_ok_and(|d| d == changed)
        }),
        "a change on the server's disk does not show through the mount"
    );
}
