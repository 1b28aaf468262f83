//! Staged writes: invisible in the real file (read directly from the export) until
//! Commit or Fsync, discarded by Release or a dropped connection, exact overlay reads.

use std::os::unix::fs::symlink;
use std::time::{Duration, SystemTime};

use ferry_common::*;

use crate::harness::*;

fn mtime_of(a: &Attr) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(a.mtime.sec as u64, a.mtime.nsec)
}

#[tokio::test]
async fn staged_writes_reach_the_file_only_on_commit() {
    let server = Server::start().await;
    let f = server.root().join("f");
    std::fs::write(&f, b"original").unwrap();
    let mut c = server.client().await;
    let (h, a) = c.open_staged("f", libc::O_RDWR).await.unwrap();
    assert_eq!(a.size, 8);

    assert_eq!(c.write(h, 0, b"NEW").await, Ok(3));
    assert_eq!(c.write(h, 10, b"tail").await, Ok(4));
    assert_eq!(c.read(h, 0, 100).await.unwrap(), b"NEWginal\0\0tail");
    assert_eq!(c.handle_attr(h).await.unwrap().size, 14);
    // Everyone else still sees the old file.
    assert_eq!(std::fs::read(&f).unwrap(), b"original");
    assert_eq!(c.getattr("f").await.unwrap().size, 8);
    let (other, _) = c.open("f", libc::O_RDONLY).await.unwrap();
    assert_eq!(c.read(other, 0, 100).await.unwrap(), b"original");
    // No staging file shows up in the directory.
    assert_eq!(std::fs::read_dir(server.root()).unwrap().count(), 1);

    let committed = c.commit(h).await.unwrap();
    assert_eq!(committed.size, 14);
    assert_eq!(std::fs::read(&f).unwrap(), b"NEWginal\0\0tail");
    assert_eq!(c.read(other, 0, 100).await.unwrap(), b"NEWginal\0\0tail");

    // The handle stays staged after a commit: later writes are staged again.
    c.write(h, 0, b"again").await.unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"NEWginal\0\0tail");
    assert_eq!(
        c.call(Request::Fsync {
            handle: h,
            datasync: true
        })
        .await,
        Ok(Response::Ok)
    );
    assert_eq!(std::fs::read(&f).unwrap(), b"againnal\0\0tail");
    // Nothing pending: Commit just answers the attributes.
    assert_eq!(c.commit(h).await.unwrap().size, 14);
}

#[tokio::test]
async fn truncates_are_staged_too() {
    let server = Server::start().await;
    let f = server.root().join("f");
    std::fs::write(&f, b"0123456789").unwrap();
    let mut c = server.client().await;
    let (h, _) = c.open_staged("f", libc::O_RDWR).await.unwrap();
    assert_eq!(c.truncate_handle(h, 4).await.unwrap().size, 4);
    assert_eq!(c.truncate_handle(h, 8).await.unwrap().size, 8);
    // The bytes cut off by the first truncate are gone, not resurrected.
    assert_eq!(c.read(h, 0, 100).await.unwrap(), b"0123\0\0\0\0");
    assert_eq!(std::fs::read(&f).unwrap(), b"0123456789");
    c.commit(h).await.unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"0123\0\0\0\0");
}

#[tokio::test]
async fn a_dropped_connection_leaves_the_file_byte_identical() {
    let server = Server::start().await;
    let f = server.root().join("f");
    let content: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    std::fs::write(&f, &content).unwrap();
    let before = std::fs::metadata(&f).unwrap();
    {
        let mut c = server.client().await;
        let (h, _) = c.open_staged("f", libc::O_WRONLY).await.unwrap();
        c.write(h, 0, &[0xff; 70_000]).await.unwrap();
        c.truncate_handle(h, 10).await.unwrap();
        c.write(h, 200_000, b"beyond").await.unwrap();
        // Dropped here without Commit or Release: the connection just dies.
    }
    // Released with the connection; a fresh one sees the old content.
    let mut c = server.client().await;
    let (h, a) = c.open("f", libc::O_RDONLY).await.unwrap();
    assert_eq!(a.size, 100_000);
    assert_eq!(c.read(h, 0, 200_000).await.unwrap(), content);
    assert_eq!(std::fs::read(&f).unwrap(), content);
    let after = std::fs::metadata(&f).unwrap();
    assert_eq!(before.modified().unwrap(), after.modified().unwrap());

    // Release without Commit discards as well.
    let (h, _) = c.open_staged("f", libc::O_RDWR).await.unwrap();
    c.write(h, 5, b"xyz").await.unwrap();
    c.call(Request::Release { handle: h }).await.unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), content);
}

#[tokio::test]
async fn commit_stamps_the_time_of_the_last_write() {
    let server = Server::start().await;
    let f = server.root().join("f");
    std::fs::write(&f, b"some data").unwrap();
    let mut c = server.client().await;
    let (h, _) = c.open_staged("f", libc::O_RDWR).await.unwrap();
    let before_write = SystemTime::now();
    c.write(h, 0, b"SOME").await.unwrap();
    let after_write = SystemTime::now();
    let staged = c.handle_attr(h).await.unwrap();
    // The only sleep in these tests: it puts the commit measurably later than the
    // write, so a commit that stamped its own time (file timestamps come from a coarse
    // clock, up to a tick behind) could not pass for the write's time.
    std::thread::sleep(Duration::from_millis(50));
    let committed = c.commit(h).await.unwrap();
    let m = mtime_of(&committed);
    assert!(
        m >= before_write - Duration::from_millis(20),
        "{m:?} < {before_write:?}"
    );
    assert!(
        m <= after_write,
        "mtime {m:?} is after the write reply {after_write:?}"
    );
    assert_eq!(
        committed.mtime, staged.mtime,
        "GetAttr showed the same mtime"
    );
    assert_eq!(std::fs::metadata(&f).unwrap().modified().unwrap(), m);
}

#[tokio::test]
async fn empty_files_and_created_files_are_written_directly() {
    let server = Server::start().await;
    std::fs::write(server.root().join("empty"), b"").unwrap();
    let mut c = server.client().await;
    let (h, _) = c.open_staged("empty", libc::O_RDWR).await.unwrap();
    c.write(h, 0, b"direct").await.unwrap();
    assert_eq!(
        std::fs::read(server.root().join("empty")).unwrap(),
        b"direct"
    );
    // O_TRUNC of an empty file has nothing to protect either.
    std::fs::write(server.root().join("empty"), b"").unwrap();
    let (h, a) = c
        .open_staged("empty", libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    assert_eq!(a.size, 0);
    c.write(h, 0, b"again").await.unwrap();
    assert_eq!(
        std::fs::read(server.root().join("empty")).unwrap(),
        b"again"
    );
    let (h, _) = c
        .create("", "made", 0o644, libc::O_RDWR | libc::O_EXCL)
        .await
        .unwrap();
    c.write(h, 0, b"at once").await.unwrap();
    assert_eq!(
        std::fs::read(server.root().join("made")).unwrap(),
        b"at once"
    );
    // O_SYNC promises durability on every write, which staging could not keep.
    let (h, _) = c
        .open_staged("made", libc::O_RDWR | libc::O_SYNC)
        .await
        .unwrap();
    c.write(h, 0, b"AT").await.unwrap();
    assert_eq!(
        std::fs::read(server.root().join("made")).unwrap(),
        b"AT once"
    );
    // A read-only staged open is just an open.
    let (h, _) = c.open_staged("made", libc::O_RDONLY).await.unwrap();
    assert_eq!(c.commit(h).await.unwrap().size, 7);
}

#[tokio::test]
async fn read_only_exports_refuse_commit() {
    let server = Server::start_with(true).await;
    std::fs::write(server.root().join("f"), b"x").unwrap();
    let mut c = server.client().await;
    assert_eq!(
        c.open_staged("f", libc::O_RDWR).await.map(|_| ()),
        Err(libc::EROFS)
    );
    let (h, _) = c.open_staged("f", libc::O_RDONLY).await.unwrap();
    assert_eq!(c.commit(h).await, Err(libc::EROFS));
}

/// Random writes, truncates and reads through one staged handle against a model; the
/// real file must not change until the commits, which make it equal to the model.
#[tokio::test]
async fn overlay_reads_match_a_model() {
    let server = Server::start().await;
    let f = server.root().join("f");
    let mut rng = Rng(0x57a6_ed00_1234_5678);
    let initial: Vec<u8> = (0..5000).map(|_| rng.next() as u8).collect();
    std::fs::write(&f, &initial).unwrap();
    let mut c = server.client().await;
    let (h, _) = c.open_staged("f", libc::O_RDWR).await.unwrap();
    let mut model = initial.clone();
    let mut committed = initial;
    for step in 0..400 {
        match rng.below(10) {
            0..=4 => {
                let off = rng.below(9000);
                let data: Vec<u8> = (0..rng.below(3000)).map(|_| rng.next() as u8).collect();
                assert_eq!(c.write(h, off as u64, &data).await, Ok(data.len() as u32));
                if !data.is_empty() {
                    if model.len() < off + data.len() {
                        model.resize(off + data.len(), 0);
                    }
                    model[off..off + data.len()].copy_from_slice(&data);
                }
            }
            5 | 6 => {
                let size = rng.below(9000);
                let a = c.truncate_handle(h, size as u64).await.unwrap();
                assert_eq!(a.size, size as u64);
                model.resize(size, 0);
            }
            7 | 8 => {
                let off = rng.below(10_000);
                let len = rng.below(5000);
                let want = &model[off.min(model.len())..(off + len).min(model.len())];
                assert_eq!(
                    c.read(h, off as u64, len as u32).await.unwrap(),
                    want,
                    "step {step}"
                );
            }
            _ => {
                if rng.below(4) == 0 {
                    c.commit(h).await.unwrap();
                    committed = model.clone();
                }
            }
        }
        assert_eq!(c.handle_attr(h).await.unwrap().size, model.len() as u64);
        if step % 20 == 0 {
            assert_eq!(std::fs::read(&f).unwrap(), committed, "step {step}");
        }
    }
    assert_eq!(c.read(h, 0, 20_000).await.unwrap(), model);
    assert_eq!(c.commit(h).await.unwrap().size, model.len() as u64);
    assert_eq!(std::fs::read(&f).unwrap(), model);
}

#[tokio::test]
async fn truncating_opens_are_staged_until_commit() {
    let server = Server::start().await;
    let real = server.root().join("f");
    std::fs::write(&real, b"old content").unwrap();
    let mut c = server.client().await;
    // open(O_TRUNC): the handle sees an empty file, the real one keeps its bytes.
    let (h, a) = c
        .open_staged("f", libc::O_RDWR | libc::O_TRUNC)
        .await
        .unwrap();
    assert_eq!(a.size, 0);
    assert_eq!(c.read(h, 0, 100).await.unwrap(), b"");
    c.write(h, 0, b"new").await.unwrap();
    assert_eq!(c.read(h, 0, 100).await.unwrap(), b"new");
    assert_eq!(std::fs::read(&real).unwrap(), b"old content");
    // A connection lost now changes nothing.
    drop(c);
    let mut c = server.client().await;
    assert_eq!(std::fs::read(&real).unwrap(), b"old content");
    let (h, _) = c
        .open_staged("f", libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    c.write(h, 0, b"new").await.unwrap();
    assert_eq!(c.commit(h).await.unwrap().size, 3);
    assert_eq!(std::fs::read(&real).unwrap(), b"new");
    // Create of an existing file with O_TRUNC is staged the same way; a truncation with
    // nothing written still needs the commit.
    let (h, a) = c
        .create("", "f", 0o644, libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    assert_eq!(a.size, 0);
    assert_eq!(std::fs::read(&real).unwrap(), b"new");
    assert_eq!(c.commit(h).await.unwrap().size, 0);
    assert_eq!(std::fs::read(&real).unwrap(), b"");
}

/// A client may send its commit right behind its writes, without waiting for their
/// answers: the commit applies every write sent before it (large ones run concurrently
/// on the server) and fails, applying nothing, if one of them failed.
#[tokio::test]
async fn a_commit_sent_behind_writes_applies_them_or_none() {
    let server = Server::start().await;
    let real = server.root().join("f");
    let old: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&real, &old).unwrap();
    let mut c = server.client().await;
    let (h, _) = c.open_staged("f", libc::O_WRONLY).await.unwrap();
    let mut want = old.clone();
    let mut ids = Vec::new();
    for i in 0..4u64 {
        // 1 MiB each (run on the blocking pool) and a small one (run inline).
        let big = vec![b'a' + i as u8; 1 << 20];
        want[(i << 20) as usize..((i + 1) << 20) as usize].copy_from_slice(&big);
        ids.push(
            c.send(Request::Write {
                handle: h,
                offset: i << 20,
                data: big.into(),
            })
            .await,
        );
    }
    let commit = c.send(Request::Commit { handle: h }).await;
    let mut committed = None;
    for _ in 0..5 {
        let (id, r) = c.recv().await.expect("reply");
        if id == commit {
            committed = Some(r);
        } else {
            assert!(ids.contains(&id));
            assert!(matches!(r, Ok(Response::Written { len }) if len == 1 << 20));
        }
    }
    assert!(
        matches!(committed, Some(Ok(Response::Attr(_)))),
        "{committed:?}"
    );
    assert!(
        std::fs::read(&real).unwrap() == want,
        "not every write was applied"
    );

    // A failing write (past the largest offset) poisons what was sent with it.
    let good = c
        .send(Request::Write {
            handle: h,
            offset: 0,
            data: b"lost".to_vec().into(),
        })
        .await;
    let bad = c
        .send(Request::Write {
            handle: h,
            offset: i64::MAX as u64,
            data: b"x".to_vec().into(),
        })
        .await;
    let commit = c.send(Request::Commit { handle: h }).await;
    let mut results = std::collections::HashMap::new();
    for _ in 0..3 {
        let (id, r) = c.recv().await.expect("reply");
        results.insert(id, r);
    }
    assert!(results[&good].is_ok());
    let failed = results[&bad]
        .clone()
        .expect_err("a write past the end of time");
    assert_eq!(
        results[&commit],
        Err(failed),
        "the commit must report the failed write"
    );
    assert!(
        std::fs::read(&real).unwrap() == want,
        "a poisoned commit changed the file"
    );
    // The handle starts over: the next commit applies only what follows.
    c.write(h, 1, b"ok").await.unwrap();
    c.commit(h).await.unwrap();
    want[1..3].copy_from_slice(b"ok");
    assert!(std::fs::read(&real).unwrap() == want);
}

/// `futimens` sent right behind a large write (which runs on the blocking pool) applies
/// after it: the write does not bump the mtime the client set.
#[tokio::test]
async fn times_sent_behind_a_write_apply_after_it() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let (h, _) = c
        .create("", "new", 0o644, libc::O_WRONLY | libc::O_EXCL)
        .await
        .unwrap();
    let stamp = Timespec {
        sec: 1_000_000_000,
        nsec: 5,
    };
    for round in 0..5u64 {
        let w = c
            .send(Request::Write {
                handle: h,
                offset: round << 20,
                data: vec![round as u8; 1 << 20].into(),
            })
            .await;
        let t = c
            .send(Request::SetAttr {
                path: p(""),
                handle: Some(h),
                set: SetAttr {
                    mtime: Some(TimeSet::At(stamp)),
                    ..SetAttr::default()
                },
            })
            .await;
        let mut done = 0;
        while done < 2 {
            let (id, r) = c.recv().await.expect("reply");
            assert!(id == w || id == t);
            r.unwrap();
            done += 1;
        }
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(server.root().join("new")).unwrap();
        assert_eq!(
            (m.mtime(), m.mtime_nsec()),
            (1_000_000_000, 5),
            "round {round}: the write landed after the times"
        );
    }
}

fn copy(src: u64, src_offset: u64, dst: u64, dst_offset: u64, len: u64) -> Request {
    Request::CopyRange {
        src,
        src_offset,
        dst,
        dst_offset,
        len,
    }
}

#[tokio::test]
async fn copy_range_between_plain_and_staged_handles() {
    let server = Server::start().await;
    let root = server.root();
    std::fs::write(root.join("src"), b"0123456789").unwrap();
    std::fs::write(root.join("dst"), b"abcdefghij").unwrap();
    let mut c = server.client().await;
    assert!(c.welcome.capabilities & caps::COPY_RANGE != 0);
    let (src, _) = c.open("src", libc::O_RDONLY).await.unwrap();

    // Plain descriptors: the real file changes at once; a short count at the source's end.
    let (plain, _) = c.open("dst", libc::O_RDWR).await.unwrap();
    assert_eq!(
        c.call(copy(src, 2, plain, 8, 100)).await,
        Ok(Response::Written { len: 8 })
    );
    assert_eq!(
        std::fs::read(root.join("dst")).unwrap(),
        b"abcdefgh23456789"
    );
    assert_eq!(
        c.call(copy(src, 50, plain, 0, 10)).await,
        Ok(Response::Written { len: 0 })
    );

    // Staged destination: the copy waits for the commit; a staged source gives its
    // staged bytes.
    let (staged, _) = c.open_staged("dst", libc::O_RDWR).await.unwrap();
    assert_eq!(
        c.call(copy(src, 0, staged, 0, 3)).await,
        Ok(Response::Written { len: 3 })
    );
    assert_eq!(
        std::fs::read(root.join("dst")).unwrap(),
        b"abcdefgh23456789"
    );
    assert_eq!(c.read(staged, 0, 4).await.unwrap(), b"012d");
    assert_eq!(
        c.call(copy(staged, 0, staged, 20, 2)).await,
        Ok(Response::Written { len: 2 })
    );
    assert_eq!(c.commit(staged).await.unwrap().size, 22);
    assert_eq!(
        std::fs::read(root.join("dst")).unwrap(),
        b"012defgh23456789\x00\x00\x00\x0001"
    );

    // Errors: unknown handles, a read-only destination, offsets past what a file can hold.
    assert_eq!(c.call(copy(src, 0, 9999, 0, 1)).await, Err(libc::EBADF));
    assert_eq!(c.call(copy(9999, 0, plain, 0, 1)).await, Err(libc::EBADF));
    assert_eq!(c.call(copy(plain, 0, src, 0, 1)).await, Err(libc::EBADF));
    assert_eq!(
        c.call(copy(src, 0, plain, u64::MAX - 1, 10)).await,
        Err(libc::EFBIG)
    );
    assert_eq!(
        c.call(copy(src, u64::MAX - 1, plain, 0, 10)).await,
        Err(libc::EINVAL)
    );
}

#[tokio::test]
async fn copy_range_is_refused_on_a_read_only_export() {
    let server = Server::start_with(true).await;
    std::fs::write(server.root().join("f"), b"data").unwrap();
    let mut c = server.client().await;
    let (h, _) = c.open("f", libc::O_RDONLY).await.unwrap();
    assert_eq!(c.call(copy(h, 0, h, 10, 4)).await, Err(libc::EROFS));
}

/// A commit too large for an undo record (here every one: the limit is 0) keeps a redo
/// record while it runs, and leaves neither record nor hidden folder behind.
#[tokio::test]
async fn a_commit_with_a_redo_record_leaves_nothing_behind() {
    let server = Server::start().await;
    let state = server.dir.path().join("state");
    let undo = ferry_server::undo::UndoDir::open(&state, server.export.id()).unwrap();
    undo.set_undo_max(0);
    server.export.set_undo(undo);
    let f = server.root().join("f");
    std::fs::write(&f, b"old content").unwrap();
    let mut c = server.client().await;
    let (h, _) = c.open_staged("f", libc::O_RDWR).await.unwrap();
    c.truncate_handle(h, 0).await.unwrap();
    assert_eq!(c.write(h, 0, b"new").await, Ok(3));
    c.commit(h).await.unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"new");
    assert_eq!(server.export.undo().unwrap().redo_records_kept(), 1);
    assert!(!server.root().join(".ferryd").exists());
    let left: Vec<_> = std::fs::read_dir(server.export.undo().unwrap().dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "lock")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// While a large commit holds the hidden folder, clients neither see nor reach it.
#[tokio::test]
async fn the_hidden_folder_is_not_listed_or_reachable() {
    let server = Server::start().await;
    std::fs::write(server.root().join("a"), b"a").unwrap();
    symlink(".ferryd", server.root().join("l")).unwrap();
    let held = server.export.area().enter().unwrap();
    assert!(server.root().join(".ferryd").is_dir());
    let mut c = server.client().await;
    let names = match c
        .call(Request::ListDir {
            path: RelPath::root(),
            max_entries: 100,
            speculative: false,
        })
        .await
    {
        Ok(Response::Listing { entries, .. }) => entries
            .into_iter()
            .map(|e| String::from_utf8(e.name.0).unwrap())
            .collect::<Vec<_>>(),
        other => panic!("ListDir: {other:?}"),
    };
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(!names.contains(&".ferryd".to_string()), "{names:?}");
    assert_eq!(c.lookup("", ".ferryd").await, Err(libc::EACCES));
    assert_eq!(c.lookup("l", "x").await, Err(libc::EACCES));
    // A path through it to a name in it: only its random names are there.
    assert_eq!(c.getattr("l/x").await, Err(libc::ENOENT));
    assert_eq!(c.mkdir("", ".ferryd").await, Err(libc::EACCES));
    assert_eq!(c.mkdir("l", "x").await, Err(libc::EACCES));
    assert_eq!(
        c.call(Request::Rename {
            parent: p(""),
            name: n("a"),
            new_parent: p(""),
            new_name: n(".ferryd"),
            flags: 0
        })
        .await,
        Err(libc::EACCES)
    );
    drop(held);
    assert!(!server.root().join(".ferryd").exists());
    // The names stay ferryd's: a client's `.ferryd` could be taken for ferryd's, or
    // keep every large commit from its record.
    assert_eq!(c.mkdir("", ".ferryd").await, Err(libc::EACCES));
    assert_eq!(c.mkdir("", ".ferryd.1").await, Err(libc::EACCES));
    // One made on the server's disk is neither listed nor reachable either.
    std::fs::create_dir(server.root().join(".ferryd")).unwrap();
    std::fs::write(server.root().join(".ferryd/x"), b"x").unwrap();
    assert_eq!(c.lookup("", ".ferryd").await, Err(libc::EACCES));
    assert_eq!(c.getattr(".ferryd/x").await, Err(libc::EACCES));
    let listed = match c
        .call(Request::ListDir {
            path: RelPath::root(),
            max_entries: 100,
            speculative: false,
        })
        .await
    {
        Ok(Response::Listing { entries, .. }) => entries.len(),
        other => panic!("ListDir: {other:?}"),
    };
    assert_eq!(listed, 2);
}
