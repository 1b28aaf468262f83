//! Open files: open, create, read, write, fsync, fallocate, release, unlinked files.

use ferry_common::*;

use crate::harness::*;

#[tokio::test]
async fn create_write_read_release() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let (h, a) = c
        .create("", "f", 0o666, libc::O_RDWR | libc::O_EXCL)
        .await
        .unwrap();
    assert_eq!((a.kind, a.size, a.perm), (FileKind::File, 0, 0o644));
    assert_eq!(c.write(h, 0, b"hello world").await, Ok(11));
    assert_eq!(c.write(h, 100, b"!").await, Ok(1));
    assert_eq!(c.read(h, 0, 5).await.unwrap(), b"hello");
    assert_eq!(
        c.read(h, 6, 1000).await.unwrap().len(),
        95,
        "short read means EOF"
    );
    assert_eq!(c.read(h, 1000, 10).await.unwrap(), b"");
    assert_eq!(c.read(h, 0, MAX_IO + 1).await, Err(libc::EINVAL));
    assert_eq!(c.read(h, u64::MAX, 1).await, Err(libc::EINVAL));
    assert_eq!(
        c.call(Request::Fsync {
            handle: h,
            datasync: true
        })
        .await,
        Ok(Response::Ok)
    );
    assert_eq!(
        c.call(Request::Fallocate {
            handle: h,
            offset: 0,
            len: 1 << 20,
            mode: 0
        })
        .await,
        Ok(Response::Ok)
    );
    assert_eq!(c.getattr("f").await.unwrap().size, 1 << 20);
    assert_eq!(
        c.call(Request::Release { handle: h }).await,
        Ok(Response::Ok)
    );
    assert_eq!(
        c.call(Request::Release { handle: h }).await,
        Err(libc::EBADF)
    );
    assert_eq!(c.read(h, 0, 1).await, Err(libc::EBADF));
    assert_eq!(c.write(h, 0, b"x").await, Err(libc::EBADF));
    assert_eq!(
        c.call(Request::Fsync {
            handle: h,
            datasync: false
        })
        .await,
        Err(libc::EBADF)
    );
    let data = std::fs::read(server.root().join("f")).unwrap();
    assert_eq!(&data[..11], b"hello world");
    assert_eq!(data[100], b'!');
}

#[tokio::test]
async fn create_without_excl_opens_and_truncates() {
    let server = Server::start().await;
    std::fs::write(server.root().join("f"), b"old contents").unwrap();
    let mut c = server.client().await;
    assert_eq!(
        c.create("", "f", 0o644, libc::O_RDWR | libc::O_EXCL).await,
        Err(libc::EEXIST)
    );
    let (h, a) = c.create("", "f", 0o644, libc::O_RDWR).await.unwrap();
    assert_eq!(a.size, 12);
    assert_eq!(c.read(h, 0, 3).await.unwrap(), b"old");
    let (_, a) = c
        .create("", "f", 0o644, libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    assert_eq!(a.size, 0);
    c.mkdir("", "d").await.unwrap();
    assert_eq!(
        c.create("", "d", 0o644, libc::O_RDWR).await,
        Err(libc::EISDIR)
    );
    assert_eq!(
        c.create("nope", "f", 0o644, libc::O_RDWR).await,
        Err(libc::ENOENT)
    );
    assert_eq!(
        c.create("", "bad", 0o644, libc::O_ACCMODE).await,
        Err(libc::EINVAL)
    );
}

#[tokio::test]
async fn open_modes_and_errors() {
    let server = Server::start().await;
    std::fs::write(server.root().join("f"), b"content").unwrap();
    std::fs::create_dir(server.root().join("d")).unwrap();
    let mut c = server.client().await;
    let (ro, a) = c.open("f", libc::O_RDONLY).await.unwrap();
    assert_eq!(a.size, 7);
    assert_eq!(c.write(ro, 0, b"x").await, Err(libc::EBADF));
    let (wo, _) = c.open("f", libc::O_WRONLY).await.unwrap();
    assert_eq!(c.read(wo, 0, 1).await, Err(libc::EBADF));
    // O_APPEND is not passed on: writes land at the offset the client chose.
    let (ap, _) = c.open("f", libc::O_WRONLY | libc::O_APPEND).await.unwrap();
    assert_eq!(c.write(ap, 0, b"C").await, Ok(1));
    assert_eq!(std::fs::read(server.root().join("f")).unwrap(), b"Content");
    let (_, a) = c.open("f", libc::O_RDWR | libc::O_TRUNC).await.unwrap();
    assert_eq!(a.size, 0);
    assert_eq!(c.open("nope", libc::O_RDONLY).await, Err(libc::ENOENT));
    assert_eq!(c.open("d", libc::O_WRONLY).await, Err(libc::EISDIR));
    assert_eq!(c.open("f/x", libc::O_RDONLY).await, Err(libc::ENOTDIR));
    let (dh, a) = c.open("d", libc::O_RDONLY).await.unwrap();
    assert_eq!(a.kind, FileKind::Dir);
    assert_eq!(c.read(dh, 0, 10).await, Err(libc::EISDIR));
    // A read-only handle cannot truncate; SetAttr falls back to the path.
    let a = c
        .attr(Request::SetAttr {
            path: p("f"),
            handle: Some(ro),
            set: SetAttr {
                size: Some(3),
                ..Default::default()
            },
        })
        .await
        .unwrap();
    assert_eq!(a.size, 3);
}

#[tokio::test]
async fn unlinked_open_file_stays_readable_through_its_handle() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let (h, _) = c.create("", "f", 0o644, libc::O_RDWR).await.unwrap();
    c.write(h, 0, b"still here").await.unwrap();
    assert_eq!(
        c.call(Request::Unlink {
            parent: p(""),
            name: n("f")
        })
        .await,
        Ok(Response::Ok)
    );
    assert_eq!(c.getattr("f").await, Err(libc::ENOENT));
    assert_eq!(c.read(h, 0, 100).await.unwrap(), b"still here");
    let by_handle = |handle| Request::GetAttr {
        path: p("f"),
        handle: Some(handle),
    };
    let a = c.attr(by_handle(h)).await.unwrap();
    assert_eq!((a.nlink, a.size), (0, 10));
    // SetAttr through the handle works too (ftruncate, fchmod, futimens).
    let a = c
        .attr(Request::SetAttr {
            path: p("f"),
            handle: Some(h),
            set: SetAttr {
                size: Some(5),
                mode: Some(0o600),
                mtime: Some(TimeSet::Now),
                ..Default::default()
            },
        })
        .await
        .unwrap();
    assert_eq!((a.size, a.perm), (5, 0o600));
    assert_eq!(c.read(h, 0, 100).await.unwrap(), b"still");
    assert_eq!(c.attr(by_handle(999)).await, Err(libc::EBADF));
}

#[tokio::test]
async fn large_io_up_to_max_io() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let data: Vec<u8> = (0..MAX_IO).map(|i| (i * 7 % 256) as u8).collect();
    let (h, _) = c.create("", "big", 0o644, libc::O_RDWR).await.unwrap();
    assert_eq!(c.write(h, 1, &data).await, Ok(MAX_IO));
    assert_eq!(c.read(h, 1, MAX_IO).await.unwrap(), data);
    let a = c.getattr("big").await.unwrap();
    assert_eq!(a.size, MAX_IO as u64 + 1);
}

#[tokio::test]
async fn version_tracks_changes() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let (h, a0) = c.create("", "f", 0o644, libc::O_RDWR).await.unwrap();
    c.write(h, 0, b"one").await.unwrap();
    let a1 = c.getattr("f").await.unwrap();
    assert_ne!(a0.version, a1.version);
    assert_eq!(
        a1.version,
        c.getattr("f").await.unwrap().version,
        "stable when unchanged"
    );
    c.write(h, 0, b"two").await.unwrap(); // same size, new mtime/ctime
    let a2 = c.getattr("f").await.unwrap();
    assert!(a2.version != a1.version || a2.mtime == a1.mtime);
}

#[tokio::test]
async fn small_files_open_with_their_data() {
    let server = Server::start().await;
    std::fs::write(server.root().join("small"), b"tiny content").unwrap();
    std::fs::write(server.root().join("big"), vec![7u8; 5000]).unwrap();
    std::fs::write(server.root().join("empty"), b"").unwrap();
    std::fs::create_dir(server.root().join("d")).unwrap();
    let mut c = server.client().await;

    let (h, a, data) = c.open_inline("small", libc::O_RDONLY, 4096).await.unwrap();
    assert_eq!(data.as_deref(), Some(&b"tiny content"[..]));
    assert_eq!(a.size, 12);
    // The handle is real: it reads like any other.
    assert_eq!(c.read(h, 5, 7).await.unwrap(), b"content");

    // Exactly at the limit still comes inline; one byte over does not.
    let (_, _, data) = c.open_inline("small", libc::O_RDONLY, 12).await.unwrap();
    assert_eq!(data.as_deref(), Some(&b"tiny content"[..]));
    let (_, a, data) = c.open_inline("small", libc::O_RDONLY, 11).await.unwrap();
    assert_eq!((a.size, data), (12, None));

    let (_, a, data) = c.open_inline("big", libc::O_RDONLY, 4096).await.unwrap();
    assert_eq!((a.size, data), (5000, None));
    let (_, _, data) = c.open_inline("empty", libc::O_RDONLY, 4096).await.unwrap();
    assert_eq!(data.as_deref(), Some(&b""[..]));
    // inline_max 0 never inlines, not even an empty file.
    let (_, _, data) = c.open_inline("empty", libc::O_RDONLY, 0).await.unwrap();
    assert_eq!(data, None);
    // O_TRUNC happens before the read: the data is what is left, nothing.
    let (_, a, data) = c
        .open_inline("small", libc::O_RDWR | libc::O_TRUNC, 4096)
        .await
        .unwrap();
    assert_eq!((a.size, data.as_deref()), (0, Some(&b""[..])));
    // A directory is never inlined.
    let (_, a, data) = c.open_inline("d", libc::O_RDONLY, 1 << 20).await.unwrap();
    assert_eq!((a.kind, data), (FileKind::Dir, None));
}

fn read_small(dir: &str, names: &[&str], max_size: u32) -> Request {
    Request::ReadSmall {
        dir: RelPath::root().join(dir.as_bytes()),
        names: names.iter().map(|n| Name(n.as_bytes().to_vec())).collect(),
        max_size,
    }
}

#[tokio::test]
async fn read_small_returns_small_regular_files_only() {
    let server = Server::start().await;
    let d = server.root().join("d");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("a"), b"alpha").unwrap();
    std::fs::write(d.join("b"), vec![7u8; 5000]).unwrap();
    std::fs::write(d.join("big"), vec![1u8; 70_000]).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink("a", d.join("link")).unwrap();
    let fifo = std::ffi::CString::new(d.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let mut c = server.client().await;
    let names = ["a", "b", "big", "sub", "link", "fifo", "missing"];
    let files = match c.call(read_small("d", &names, 65_536)).await {
        Ok(Response::SmallFiles(f)) => f,
        other => panic!("ReadSmall: {other:?}"),
    };
    let got: Vec<(&[u8], u64, usize)> = files
        .iter()
        .map(|f| (&f.name.0[..], f.attr.size, f.data.len()))
        .collect();
    assert_eq!(got, vec![(&b"a"[..], 5, 5), (&b"b"[..], 5000, 5000)]);
    assert_eq!(files[0].data, b"alpha");
    let a = c.getattr("d/a").await.unwrap();
    assert_eq!(
        (files[0].attr.ino, files[0].attr.version),
        (a.ino, a.version)
    );

    // Bad requests: too many names, a name with a slash, a path out of the export.
    let many: Vec<String> = (0..=MAX_SMALL_FILES).map(|i| format!("f{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(c.call(read_small("d", &many, 100)).await, Err(libc::EINVAL));
    assert_eq!(
        c.call(read_small("d", &["x/y"], 100)).await,
        Err(libc::EINVAL)
    );
    assert!(c.call(read_small("d/a", &["b"], 100)).await.is_err());
}

/// Which of the first `pages` pages of `f` are in the page cache.
fn resident(f: &std::fs::File, pages: usize) -> Vec<bool> {
    use std::os::fd::AsRawFd;
    let len = pages * 4096;
    // SAFETY: a fresh shared read-only map of a file at least `len` long, unmapped below;
    // mincore writes one byte per page into a vector that long.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED, "mmap");
        let mut vec = vec![0u8; pages];
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0, "mincore");
        libc::munmap(map, len);
        vec.into_iter().map(|b| b & 1 == 1).collect()
    }
}

/// A small read is answered from the page cache on the connection task when all of it is
/// cached (`RWF_NOWAIT`), else read from the disk: a read only partly cached gives every
/// byte, not the cached part (which the client would take for the end of the file), and
/// the same holds for reads in flight together.
#[tokio::test]
async fn a_small_read_partly_in_the_page_cache_gives_every_byte() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let server = Server::start().await;
    let path = server.root().join("f");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 131 % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: plain integer arguments on a live descriptor.
    let advised = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(advised, 0, "fadvise");
    // No readahead: the read below caches its two pages, not the next ones too.
    // SAFETY: as above.
    let advised = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    assert_eq!(advised, 0, "fadvise random");
    let mut first = [0u8; 8192];
    f.read_exact_at(&mut first, 0).unwrap();
    let cached = resident(&f, 16);
    // Where the page cache cannot be emptied (tmpfs) the reads below still must be right,
    // they just all come from memory.
    if cached[2..].iter().any(|&c| c) {
        eprintln!("note: the test dir keeps pages cached ({cached:?}); every read is cached");
    } else {
        assert!(
            cached[0] && cached[1],
            "the first two pages were read: {cached:?}"
        );
    }

    let mut c = server.client().await;
    let (h, _) = c.open("f", libc::O_RDONLY).await.unwrap();
    let got = c.read(h, 0, 64 * 1024).await.unwrap();
    assert!(
        got == data[..64 * 1024],
        "64 KiB from offset 0 ({} bytes)",
        got.len()
    );
    let end = data.len() as u64;
    let got = c.read(h, end - 8192, 64 * 1024).await.unwrap();
    assert!(
        got == data[data.len() - 8192..],
        "the last 8 KiB ({} bytes)",
        got.len()
    );

    // Many at once: some on the connection task, the rest on the blocking pool.
    let mut offsets = std::collections::HashMap::new();
    for i in 0..32u64 {
        let off = (i * 97 % 240) * 4096;
        let read = Request::Read {
            handle: h,
            offset: off,
            len: 16 * 1024,
        };
        offsets.insert(c.send(read).await, off as usize);
    }
    for _ in 0..offsets.len() {
        let (id, reply) = c.recv().await.unwrap();
        let off = offsets[&id];
        match reply {
            Ok(Response::Data(d)) => {
                assert!(d[..] == data[off..off + 16 * 1024], "16 KiB at {off}")
            }
            other => panic!("read at {off}: {other:?}"),
        }
    }
}
