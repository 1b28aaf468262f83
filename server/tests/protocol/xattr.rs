//! Extended attributes: round trips, size queries, errno from the OS, symlinks never
//! followed, nothing outside the export reachable, read-only exports.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use ferry_common::*;

use crate::harness::*;

fn get(path: &str, name: &str, size: u32) -> Request {
    Request::GetXattr {
        path: p(path),
        name: name.as_bytes().to_vec(),
        size,
    }
}

fn set(path: &str, name: &str, value: &[u8], flags: i32) -> Request {
    Request::SetXattr {
        path: p(path),
        name: name.as_bytes().to_vec(),
        value: value.to_vec(),
        flags,
    }
}

/// Read an xattr directly on the server's disk (without following symlinks).
fn local_get(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| {
        buf.truncate(len as usize);
        buf
    })
}

#[tokio::test]
async fn set_get_list_remove() {
    let server = Server::start().await;
    std::fs::write(server.root().join("f"), b"x").unwrap();
    let mut c = server.client().await;
    assert_eq!(
        c.call(set("f", "user.color", b"blue", 0)).await,
        Ok(Response::Ok)
    );
    assert_eq!(
        local_get(&server.root().join("f"), "user.color").unwrap(),
        b"blue"
    );
    assert_eq!(
        c.call(get("f", "user.color", 0)).await,
        Ok(Response::XattrSize(4))
    );
    assert_eq!(
        c.call(get("f", "user.color", 100)).await,
        Ok(Response::data(b"blue".to_vec()))
    );
    assert_eq!(c.call(get("f", "user.color", 2)).await, Err(libc::ERANGE));
    // A huge size asks for no huge buffer, and still gets the value.
    assert_eq!(
        c.call(get("f", "user.color", u32::MAX)).await,
        Ok(Response::data(b"blue".to_vec()))
    );
    assert_eq!(c.call(get("f", "user.none", 100)).await, Err(libc::ENODATA));

    c.call(set("f", "user.b", b"", 0)).await.unwrap();
    let list = |size| Request::ListXattr { path: p("f"), size };
    let Ok(Response::XattrSize(n)) = c.call(list(0)).await else {
        panic!("size query");
    };
    let Ok(Response::Data(names)) = c.call(list(n)).await else {
        panic!("list");
    };
    assert_eq!(names.len(), n as usize);
    let mut names: Vec<&[u8]> = names.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
    names.sort();
    assert_eq!(names, vec![&b"user.b"[..], b"user.color"]);
    assert_eq!(c.call(list(3)).await, Err(libc::ERANGE));

    assert_eq!(
        c.call(set("f", "user.color", b"red", libc::XATTR_CREATE))
            .await,
        Err(libc::EEXIST)
    );
    assert_eq!(
        c.call(set("f", "user.new", b"v", libc::XATTR_REPLACE))
            .await,
        Err(libc::ENODATA)
    );
    assert_eq!(
        c.call(set("f", "user.x", b"v", 0x100)).await,
        Err(libc::EINVAL)
    );
    assert_eq!(
        c.call(set("f", "user.color", b"red", libc::XATTR_REPLACE))
            .await,
        Ok(Response::Ok)
    );

    let remove = |name: &str| Request::RemoveXattr {
        path: p("f"),
        name: name.as_bytes().to_vec(),
    };
    assert_eq!(c.call(remove("user.color")).await, Ok(Response::Ok));
    assert_eq!(c.call(remove("user.color")).await, Err(libc::ENODATA));
    assert_eq!(local_get(&server.root().join("f"), "user.color"), None);
    // Bad names: the OS's answers, or EINVAL for an embedded NUL.
    assert_eq!(
        c.call(set("f", "nonamespace", b"v", 0)).await,
        Err(libc::EOPNOTSUPP)
    );
    assert_eq!(
        c.call(set("f", "user.a\0b", b"v", 0)).await,
        Err(libc::EINVAL)
    );
    assert_eq!(c.call(get("missing", "user.a", 0)).await, Err(libc::ENOENT));
}

#[tokio::test]
async fn symlinks_are_never_followed_and_the_root_never_left() {
    let server = Server::start().await;
    std::fs::write(server.root().join("f"), b"x").unwrap();
    std::os::unix::fs::symlink("f", server.root().join("link")).unwrap();
    std::os::unix::fs::symlink("../outside", server.root().join("out")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", server.root().join("secret")).unwrap();
    let mut c = server.client().await;
    c.call(set("f", "user.on_target", b"t", 0)).await.unwrap();
    // The symlink itself has no such attribute; the target's is not reported.
    assert_eq!(
        c.call(get("link", "user.on_target", 100)).await,
        Err(libc::ENODATA)
    );
    // Linux allows no user.* attributes on symlinks: the target is not changed instead.
    assert_eq!(
        c.call(set("link", "user.y", b"v", 0)).await,
        Err(libc::EPERM)
    );
    assert_eq!(local_get(&server.root().join("f"), "user.y"), None);
    for path in ["out/secret", "secret"] {
        let r = c.call(set(path, "user.z", b"v", 0)).await;
        assert!(
            r == Err(libc::EACCES) || r == Err(libc::EPERM),
            "{path}: {r:?}"
        );
    }
    assert_eq!(local_get(&server.outside().join("secret"), "user.z"), None);
}

#[tokio::test]
async fn read_only_exports_allow_reading_only() {
    let server = Server::start_with(true).await;
    let f = server.root().join("f");
    std::fs::write(&f, b"x").unwrap();
    let pf = CString::new(f.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated strings and value.
    let r = unsafe { libc::setxattr(pf.as_ptr(), c"user.k".as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    assert_eq!(r, 0);
    let mut c = server.client().await;
    assert_eq!(
        c.call(get("f", "user.k", 10)).await,
        Ok(Response::data(b"v".to_vec()))
    );
    assert_eq!(c.call(set("f", "user.k", b"w", 0)).await, Err(libc::EROFS));
    let remove = Request::RemoveXattr {
        path: p("f"),
        name: b"user.k".to_vec(),
    };
    assert_eq!(c.call(remove).await, Err(libc::EROFS));
    assert_eq!(local_get(&f, "user.k").unwrap(), b"v");
}

/// Attributes say whether a file has extended attributes only to a client that asked
/// (`XATTR_HINTS`): for the others the server spends no system call on it.
#[tokio::test]
async fn xattr_hints_only_for_clients_that_ask() {
    let server = Server::start().await;
    std::fs::write(server.root().join("plain"), b"x").unwrap();
    std::fs::write(server.root().join("tagged"), b"x").unwrap();
    let path = CString::new(server.root().join("tagged").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings and buffer.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            c"user.k".as_ptr(),
            b"v".as_ptr().cast(),
            1,
            0,
        )
    };
    if rc != 0 {
        eprintln!("skipping: user xattrs not supported on this filesystem");
        return;
    }
    let mut asks = server.client().await;
    assert_eq!(asks.lookup("", "plain").await.unwrap().xattrs, XATTRS_NONE);
    assert_eq!(asks.lookup("", "tagged").await.unwrap().xattrs, XATTRS_SOME);
    assert_eq!(asks.getattr("tagged").await.unwrap().xattrs, XATTRS_SOME);
    let mut plain = Client::connect(server.addr, caps::CALLER_CREDS).await;
    for name in ["plain", "tagged"] {
        assert_eq!(plain.lookup("", name).await.unwrap().xattrs, XATTRS_UNKNOWN);
        assert_eq!(plain.getattr(name).await.unwrap().xattrs, XATTRS_UNKNOWN);
    }
    let listed = match plain
        .call(Request::ListDir {
            path: RelPath::root(),
            max_entries: 100,
            speculative: false,
        })
        .await
    {
        Ok(Response::Listing { entries, .. }) => entries,
        other => panic!("ListDir: {other:?}"),
    };
    assert!(listed.iter().all(|e| e.attr.xattrs == XATTRS_UNKNOWN));
}
