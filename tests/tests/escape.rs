//! Nothing outside the export is reachable through the server: not through symlinks in
//! the export (absolute, or relative with `..`), not through `..` in a path, whatever the
//! operation (read, list, create, unlink, rename, link, setattr).
//!
//! Through the mount the *kernel* resolves symlinks, on the client: `cat mount/out_abs/x`
//! reads the client's own `/etc/x`, which is correct and not an escape. So the server is
//! attacked directly: with `ferry get`/`ferry ls` (which send whole paths) and with raw
//! protocol requests; through the mount only with the calls that act on a symlink itself
//! (lchown, lutimes, link), which the kernel passes to the server as they are. (chmod of a
//! symlink is refused by the kernel before it reaches any filesystem.)

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use ferry_common::proto::{FileKind, Request, Response, SetAttr};
use ferry_tests::sys::{Time, utimensat};
use ferry_tests::wire::{RawConn, name, open, rel};
use ferry_tests::{TestMount, TestServer, ferry, require_fuse, run, temp_dir};
use tempfile::TempDir;

const SECRET: &[u8] = b"TOPSECRET-c0ffee";
const SECRET_MODE: u32 = 0o600;

/// A server whose export holds symlinks pointing out of it, and the directory they point
/// to (a sibling temp dir holding `secret`).
struct Escape {
    server: TestServer,
    outside: TempDir,
}

impl Escape {
    fn new() -> Escape {
        let outside = temp_dir("outside");
        let secret = outside.path().join("secret");
        fs::write(&secret, SECRET).expect("write secret");
        fs::set_permissions(&secret, fs::Permissions::from_mode(SECRET_MODE)).expect("chmod");
        let outside_name = outside
            .path()
            .file_name()
            .expect("temp dir name")
            .to_string_lossy()
            .into_owned();
        let export = temp_dir("export");
        let e = export.path();
        let link = |target: &str, at: &str| {
            symlink(target, e.join(at)).unwrap_or_else(|err| panic!("symlink {at}: {err}"));
        };
        link("/etc", "out_abs");
        link("../../../../etc", "out_rel");
        link(&outside.path().display().to_string(), "out_dir_abs");
        link(&format!("../{outside_name}"), "out_dir_rel");
        link(&secret.display().to_string(), "out_secret_abs");
        link(&format!("../{outside_name}/secret"), "out_secret_rel");
        fs::create_dir(e.join("sub")).expect("mkdir");
        fs::write(e.join("sub/inner.txt"), b"inner").expect("write");
        link("sub/inner.txt", "in_rel");
        link("sub", "dir_link");
        link("../sub/inner.txt", "sub/up_and_back");
        let server = TestServer::start_on(export, &[]);
        Escape { server, outside }
    }

    fn secret(&self) -> std::path::PathBuf {
        self.outside.path().join("secret")
    }

    /// The outside file is exactly as it was made.
    #[track_caller]
    fn assert_secret_untouched(&self) {
        let md = fs::metadata(self.secret()).expect("the outside file is gone");
        assert_eq!(
            md.permissions().mode() & 0o7777,
            SECRET_MODE,
            "outside file mode changed"
        );
        assert_eq!((md.uid(), md.gid()), (0, 0), "outside file owner changed");
        assert_eq!(
            fs::read(self.secret()).expect("read"),
            SECRET,
            "outside file content changed"
        );
        let names: Vec<_> = fs::read_dir(self.outside.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names,
            ["secret"],
            "something was created next to the outside file"
        );
        for p in [self.secret(), self.outside.path().to_path_buf()] {
            let xattrs = ferry_tests::sys::llistxattr(&p).expect("listxattr");
            assert!(
                xattrs.is_empty(),
                "extended attributes appeared on {}: {xattrs:?}",
                p.display()
            );
        }
    }
}

fn leaks(bytes: &[u8]) -> bool {
    let s = String::from_utf8_lossy(bytes);
    s.contains(std::str::from_utf8(SECRET).expect("ascii")) || s.contains("root:x:0:0")
}

#[test]
fn ferry_get_cannot_follow_symlinks_out() {
    let esc = Escape::new();
    let local = temp_dir("local");
    for path in [
        "out_rel/passwd",
        "out_abs/passwd",
        "out_secret_abs",
        "out_secret_rel",
        "out_dir_rel/secret",
        "out_dir_abs/secret",
    ] {
        let dest = local.path().join("got");
        let out = run(ferry()
            .current_dir(local.path())
            .args(["get", &esc.server.remote(), path])
            .arg(&dest));
        assert!(!out.success(), "`ferry get {path}` succeeded: {out}");
        assert!(
            !leaks(&out.stdout) && !leaks(&out.stderr),
            "`ferry get {path}` leaked: {out}"
        );
        if let Ok(data) = fs::read(&dest) {
            assert!(
                !leaks(&data),
                "`ferry get {path}` wrote outside data to {}",
                dest.display()
            );
        }
        let _ = fs::remove_file(&dest);
    }
    esc.assert_secret_untouched();
}

#[test]
fn ferry_get_refuses_dotdot() {
    let esc = Escape::new();
    let local = temp_dir("local");
    for path in [
        "../etc/passwd",
        "sub/../../etc/passwd",
        "sub/../../../../../etc/passwd",
        "..",
    ] {
        let dest = local.path().join("got");
        let out = run(ferry()
            .current_dir(local.path())
            .args(["get", &esc.server.remote(), path])
            .arg(&dest));
        assert!(!out.success(), "`ferry get {path}` succeeded: {out}");
        assert!(!leaks(&out.stdout), "`ferry get {path}` leaked: {out}");
        assert!(
            fs::read(&dest).map(|d| !leaks(&d)).unwrap_or(true),
            "`ferry get {path}` wrote /etc/passwd locally"
        );
    }
    // A leading slash names the export root, never the server's /.
    let out = run(ferry()
        .current_dir(local.path())
        .args(["get", &esc.server.remote(), "/etc/passwd"])
        .arg(local.path().join("abs")));
    assert!(!leaks(&out.stdout), "{out}");
    assert!(
        fs::read(local.path().join("abs"))
            .map(|d| !leaks(&d))
            .unwrap_or(true),
        "`ferry get /etc/passwd` fetched the server's /etc/passwd"
    );
}

#[test]
fn ferry_ls_does_not_list_outside_directories() {
    let esc = Escape::new();
    for path in [
        "out_abs",
        "out_rel",
        "out_dir_rel",
        "out_dir_abs",
        "out_rel/",
        "out_abs/ssl",
    ] {
        let out = run(ferry().args(["ls", &esc.server.remote(), path]));
        let text = out.stdout_str() + &out.stderr_str();
        assert!(
            !["passwd", "secret", "hostname", "openssl.cnf"]
                .iter()
                .any(|w| text.contains(w)),
            "`ferry ls {path}` shows what is outside the export: {out}"
        );
    }
}

/// Symlinks that stay inside the export are followed by `ferry get` and `ferry ls`, as a
/// last component as well as in the middle of a path.
#[test]
fn symlinks_inside_the_export_work() {
    let esc = Escape::new();
    let local = temp_dir("local");
    let mut failures = Vec::new();
    for path in ["dir_link/inner.txt", "in_rel", "sub/up_and_back"] {
        let dest = local.path().join("got");
        let out = run(ferry()
            .current_dir(local.path())
            .args(["get", &esc.server.remote(), path])
            .arg(&dest));
        match fs::read(&dest) {
            Ok(d) if out.success() && d == b"inner" => {}
            got => failures.push(format!("`ferry get {path}`: {got:?}\n{out}")),
        }
        let _ = fs::remove_file(&dest);
    }
    let out = run(ferry().args(["ls", &esc.server.remote(), "dir_link"]));
    if !(out.success() && out.stdout_str().contains("inner.txt")) {
        failures.push(format!("`ferry ls dir_link`: {out}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn raw_requests_cannot_escape() {
    let esc = Escape::new();
    let (mut c, _) = RawConn::handshake(esc.server.addr());
    let no_data = |r: &Result<Response, i32>, what: &str| match r {
        Ok(Response::Data(d)) => assert!(!leaks(d), "{what} leaked outside data"),
        Ok(resp) => {
            let dbg = format!("{resp:?}");
            assert!(
                !dbg.contains("passwd") && !dbg.contains("\"secret\""),
                "{what} leaked: {dbg}"
            );
        }
        Err(_) => {}
    };
    for (parent, n) in [
        ("out_rel", "passwd"),
        ("out_abs", "passwd"),
        ("out_dir_rel", "secret"),
        ("out_dir_abs", "secret"),
    ] {
        let r = c.call(Request::Lookup {
            parent: rel(parent),
            name: name(n),
        });
        assert!(r.is_err(), "Lookup {parent}/{n} succeeded: {r:?}");
        let r = c.call(Request::GetAttr {
            path: rel(&format!("{parent}/{n}")),
            handle: None,
        });
        assert!(r.is_err(), "GetAttr {parent}/{n} succeeded: {r:?}");
        let r = c.call(open(&format!("{parent}/{n}"), libc::O_RDONLY));
        assert!(r.is_err(), "Open {parent}/{n} succeeded: {r:?}");
    }
    // Opening an escaping symlink itself: never data from outside.
    for path in ["out_secret_abs", "out_secret_rel"] {
        match c.call(open(path, libc::O_RDONLY)) {
            Err(_) => {}
            Ok(Response::Opened { handle, attr }) => {
                assert_ne!(
                    attr.kind,
                    FileKind::File,
                    "Open {path} opened the outside file"
                );
                let r = c.call(Request::Read {
                    handle,
                    offset: 0,
                    len: 4096,
                });
                no_data(&r, path);
            }
            Ok(other) => panic!("Open {path}: {other:?}"),
        }
    }
    for path in ["out_abs", "out_rel", "out_dir_rel"] {
        match c.call(Request::OpenDir { path: rel(path) }) {
            Err(_) => {}
            Ok(Response::Opened { handle, .. }) => {
                let r = c.call(Request::ReadDir {
                    handle,
                    max_entries: 4096,
                });
                no_data(&r, path);
            }
            Ok(other) => panic!("OpenDir {path}: {other:?}"),
        }
    }
    // Mutations through an escaping directory symlink.
    for dir in ["out_dir_rel", "out_dir_abs"] {
        let r = c.call(Request::Create {
            parent: rel(dir),
            name: name("pwned"),
            mode: 0o644,
            umask: 0,
            flags: libc::O_WRONLY | libc::O_CREAT,
        });
        assert!(r.is_err(), "Create in {dir}: {r:?}");
        let r = c.call(Request::MkDir {
            parent: rel(dir),
            name: name("pwned_dir"),
            mode: 0o755,
            umask: 0,
        });
        assert!(r.is_err(), "MkDir in {dir}: {r:?}");
        let r = c.call(Request::Symlink {
            parent: rel(dir),
            name: name("pwned_link"),
            target: b"x".to_vec(),
        });
        assert!(r.is_err(), "Symlink in {dir}: {r:?}");
        let r = c.call(Request::MkNod {
            parent: rel(dir),
            name: name("pwned_fifo"),
            mode: libc::S_IFIFO | 0o644,
            umask: 0,
            rdev: 0,
        });
        assert!(r.is_err(), "MkNod in {dir}: {r:?}");
        let r = c.call(Request::Unlink {
            parent: rel(dir),
            name: name("secret"),
        });
        assert!(r.is_err(), "Unlink in {dir}: {r:?}");
        let r = c.call(Request::Rename {
            parent: rel(dir),
            name: name("secret"),
            new_parent: rel(""),
            new_name: name("stolen"),
            flags: 0,
        });
        assert!(r.is_err(), "Rename out of {dir}: {r:?}");
        let r = c.call(Request::Rename {
            parent: rel("sub"),
            name: name("inner.txt"),
            new_parent: rel(dir),
            new_name: name("planted"),
            flags: 0,
        });
        assert!(r.is_err(), "Rename into {dir}: {r:?}");
        let r = c.call(Request::Link {
            path: rel(&format!("{dir}/secret")),
            new_parent: rel(""),
            new_name: name("hardlinked"),
        });
        assert!(r.is_err(), "Link from {dir}: {r:?}");
        let r = c.call(Request::SetAttr {
            path: rel(&format!("{dir}/secret")),
            handle: None,
            set: SetAttr {
                mode: Some(0o666),
                ..SetAttr::default()
            },
        });
        assert!(r.is_err(), "SetAttr in {dir}: {r:?}");
    }
    assert!(!esc.server.export("stolen").exists() && !esc.server.export("hardlinked").exists());
    // SetAttr naming an escaping symlink acts on the link or fails, never on its target.
    for path in ["out_secret_abs", "out_secret_rel"] {
        let _ = c.call(Request::SetAttr {
            path: rel(path),
            handle: None,
            set: SetAttr {
                mode: Some(0o777),
                ..SetAttr::default()
            },
        });
        let _ = c.call(Request::SetAttr {
            path: rel(path),
            handle: None,
            set: SetAttr {
                uid: Some(4242),
                gid: Some(4242),
                ..SetAttr::default()
            },
        });
        let _ = c.call(Request::SetAttr {
            path: rel(path),
            handle: None,
            set: SetAttr {
                size: Some(0),
                ..SetAttr::default()
            },
        });
        // A hard link of the symlink is a link to the symlink, not to the outside file.
        let new_name = format!("{path}_hl");
        if c.call(Request::Link {
            path: rel(path),
            new_parent: rel(""),
            new_name: name(&new_name),
        })
        .is_ok()
        {
            let md = fs::symlink_metadata(esc.server.export(&new_name)).expect("lstat");
            assert!(
                md.file_type().is_symlink(),
                "Link {path} hard-linked the outside file"
            );
        }
    }
    // Extended attributes: through escaping directories nothing is reached; on an
    // escaping symlink they concern the link itself, never its target.
    for path in [
        "out_dir_rel/secret",
        "out_dir_abs/secret",
        "out_dir_rel",
        "out_dir_abs",
        "out_secret_rel",
        "out_secret_abs",
    ] {
        let through_dir = path.contains('/');
        for name_ in ["user.pwned", "trusted.pwned"] {
            let r = c.call(Request::SetXattr {
                path: rel(path),
                name: name_.as_bytes().to_vec(),
                value: b"x".to_vec(),
                flags: 0,
            });
            if through_dir {
                assert!(r.is_err(), "SetXattr {name_} on {path}: {r:?}");
            }
        }
        let r = c.call(Request::ListXattr {
            path: rel(path),
            size: 4096,
        });
        if through_dir {
            assert!(r.is_err(), "ListXattr {path}: {r:?}");
        }
        let r = c.call(Request::GetXattr {
            path: rel(path),
            name: b"security.selinux".to_vec(),
            size: 4096,
        });
        if through_dir {
            assert!(r.is_err(), "GetXattr {path}: {r:?}");
        }
    }
    esc.assert_secret_untouched();
    // Escaping with `..` or an absolute path is refused outright.
    for path in ["..", "../etc", "sub/../..", "/etc", "sub/../../etc/passwd"] {
        let r = c.call(Request::GetAttr {
            path: rel(path),
            handle: None,
        });
        assert!(r.is_err(), "GetAttr {path:?}: {r:?}");
        let r = c.call(Request::OpenDir { path: rel(path) });
        assert!(r.is_err(), "OpenDir {path:?}: {r:?}");
    }
}

#[test]
fn mount_ops_on_escaping_symlinks_stay_inside() {
    if !require_fuse() {
        return;
    }
    let esc = Escape::new();
    let mount = TestMount::new(&esc.server);
    let m = |p: &str| mount.join(p);
    for link in ["out_secret_abs", "out_secret_rel"] {
        // lchown and lutimes act on the link, which the server must not follow.
        let r = std::os::unix::fs::lchown(m(link), Some(4321), Some(4321));
        if r.is_ok() {
            let md = fs::symlink_metadata(esc.server.export(link)).expect("lstat");
            assert_eq!(
                (md.uid(), md.gid()),
                (4321, 4321),
                "lchown did not change the link"
            );
        }
        let before = fs::metadata(esc.secret()).expect("stat secret");
        let _ = utimensat(&m(link), Time::At(12345, 0), Time::At(12345, 0), true);
        let after = fs::metadata(esc.secret()).expect("stat secret");
        assert_eq!(
            (before.mtime(), before.mtime_nsec()),
            (after.mtime(), after.mtime_nsec()),
            "lutimes on {link} changed the outside file's mtime"
        );
        let hl = format!("{link}.hl");
        if fs::hard_link(m(link), m(&hl)).is_ok() {
            let md = fs::symlink_metadata(esc.server.export(&hl)).expect("lstat");
            assert!(
                md.file_type().is_symlink(),
                "link({link}) hard-linked the outside file"
            );
        }
    }
    // A symlink created through the mount is stored as given and still not followed by
    // the server.
    symlink("/etc/passwd", m("new_abs")).expect("symlink through the mount");
    assert_eq!(
        fs::read_link(esc.server.export("new_abs")).expect("readlink"),
        Path::new("/etc/passwd")
    );
    let local = temp_dir("local");
    let out = run(ferry()
        .args(["get", &esc.server.remote(), "new_abs"])
        .arg(local.path().join("got")));
    assert!(!out.success() && !leaks(&out.stdout), "{out}");
    esc.assert_secret_untouched();
}
