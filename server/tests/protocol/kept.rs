//! Listings `ferryd` keeps in memory while its watches vouch for them: a second listing
//! of a quiet directory is answered without stat'ing its files again, and a listing
//! asked after any change (on the server's disk or through a client) shows that change
//! at once, without waiting for anything.

use std::collections::BTreeMap;
use std::fs::{File, FileTimes};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use ferry_common::*;

use crate::harness::*;

/// The whole listing of `path` (first batch and the rest), by name.
async fn listing(c: &mut Client, path: &str) -> BTreeMap<String, Attr> {
    let (handle, mut entries, mut eof) = match c
        .call(Request::ListDir {
            path: p(path),
            max_entries: 64,
            speculative: false,
        })
        .await
        .unwrap()
    {
        Response::Listing {
            handle,
            entries,
            eof,
            ..
        } => (handle, entries, eof),
        other => panic!("ListDir: {other:?}"),
    };
    while !eof {
        match c
            .call(Request::ReadDir {
                handle,
                max_entries: 64,
            })
            .await
            .unwrap()
        {
            Response::Dir {
                entries: more,
                eof: e,
            } => {
                entries.extend(more);
                eof = e;
            }
            other => panic!("ReadDir: {other:?}"),
        }
    }
    if handle != 0 {
        let _ = c.call(Request::ReleaseDir { handle }).await;
    }
    entries
        .into_iter()
        .map(|e| (String::from_utf8_lossy(&e.name.0).into_owned(), e.attr))
        .collect()
}

/// What the disk says of directory `dir` now, in the terms of a listing.
fn on_disk(dir: &std::path::Path) -> BTreeMap<String, (u64, u32, i64, u64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.path().symlink_metadata().unwrap();
            let name = e.file_name().into_string().unwrap();
            (
                name,
                (m.size(), m.mode() & 0o7777, m.mtime_nsec(), m.nlink()),
            )
        })
        .collect()
}

fn seen(l: &BTreeMap<String, Attr>) -> BTreeMap<String, (u64, u32, i64, u64)> {
    l.iter()
        .map(|(n, a)| {
            let a = (
                a.size,
                u32::from(a.perm),
                i64::from(a.mtime.nsec),
                u64::from(a.nlink),
            );
            (n.clone(), a)
        })
        .collect()
}

fn timespec(t: SystemTime) -> (i64, u32) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    (d.as_secs() as i64, d.subsec_nanos())
}

/// A change no watch reports (an access time moved by a read, `relatime`) shows that
/// the second listing of a quiet directory came from memory; a change that is reported
/// (`chmod`) made just before the next listing shows in it at once.
#[tokio::test]
async fn a_quiet_directory_is_listed_again_from_memory_and_a_change_ends_that() {
    let server = Server::start().await;
    let d = server.root().join("d");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("f"), b"data").unwrap();
    let mut c = Client::connect(server.addr, caps::EVENTS).await;
    listing(&mut c, "d").await;
    // An access time before the modification: the next read moves it (`relatime`).
    let mtime = std::fs::metadata(d.join("f")).unwrap().modified().unwrap();
    let old = mtime - Duration::from_secs(100);
    File::options()
        .write(true)
        .open(d.join("f"))
        .unwrap()
        .set_times(FileTimes::new().set_accessed(old))
        .unwrap();
    let (old_sec, _) = timespec(old);
    c.wait_event("d/f's new atime", |e| match e {
        Event::Changed {
            name: Some(n),
            attr: Some(a),
            ..
        } => n.0 == b"f" && a.atime.sec == old_sec,
        _ => false,
    })
    .await;
    // Read from disk (the event is digested), kept.
    assert_eq!(listing(&mut c, "d").await["f"].atime.sec, old_sec);
    std::fs::read(d.join("f")).unwrap();
    let now_atime = std::fs::metadata(d.join("f")).unwrap().atime();
    assert!(
        now_atime > old_sec,
        "the read did not move the atime: no test"
    );

    assert_eq!(
        listing(&mut c, "d").await["f"].atime.sec,
        old_sec,
        "the second listing was not the kept one"
    );
    // Another connection gets the kept listing too; a lookup is taken from the disk.
    let mut other = Client::connect(server.addr, caps::EVENTS).await;
    assert_eq!(listing(&mut other, "d").await["f"].atime.sec, old_sec);
    assert_eq!(other.lookup("d", "f").await.unwrap().atime.sec, now_atime);

    std::fs::set_permissions(d.join("f"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let after = listing(&mut c, "d").await;
    assert_eq!((after["f"].perm, after["f"].atime.sec), (0o600, now_atime));
}

/// Changes made on the disk and through the protocol, each followed at once by a
/// listing (from memory whenever the directory was quiet since the last one): every
/// listing is what the disk says.
#[tokio::test]
async fn a_listing_right_after_a_change_shows_it() {
    let server = Server::start().await;
    let d = server.root().join("d");
    std::fs::create_dir(&d).unwrap();
    for i in 0..40 {
        std::fs::write(d.join(format!("f{i}")), vec![b'x'; i]).unwrap();
    }
    let mut c = Client::connect(server.addr, caps::EVENTS).await;
    let mut rng = Rng(0x5eed);
    for round in 0..300 {
        let i = rng.below(40);
        let name = format!("f{i}");
        let path = d.join(&name);
        let op = rng.below(10);
        if op != 2 && !path.exists() {
            std::fs::write(&path, b"again").unwrap();
        }
        match op {
            0 => std::fs::write(&path, vec![b'y'; rng.below(100)]).unwrap(),
            1 => {
                let mode = 0o600 | rng.below(0o100) as u32;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap()
            }
            2 => {
                let _ = std::fs::remove_file(&path);
            }
            3 => std::fs::rename(&path, d.join(format!("f{}", rng.below(40)))).unwrap(),
            4 => {
                let set = SetAttr {
                    size: Some(rng.below(50) as u64),
                    ..Default::default()
                };
                c.setattr(&format!("d/{name}"), set).await.unwrap();
            }
            // Quiet rounds: the next listing comes from memory.
            _ => {}
        }
        let l = listing(&mut c, "d").await;
        assert_eq!(seen(&l), on_disk(&d), "round {round}");
    }
}

/// A kept listing hands out subdirectories and files with several links as they are
/// now: changes inside a subdirectory reach only the subdirectory's own watch, and a
/// file changed through another name, in a directory nobody watches, reaches none.
#[tokio::test]
async fn a_kept_listing_stats_subdirectories_and_linked_files_again() {
    let server = Server::start().await;
    let d = server.root().join("d");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::create_dir(server.root().join("elsewhere")).unwrap();
    std::fs::write(d.join("linked"), b"1").unwrap();
    std::fs::hard_link(d.join("linked"), server.root().join("elsewhere/other")).unwrap();
    let mut c = Client::connect(server.addr, caps::EVENTS).await;
    // Twice: the second listing is read after the first one's watches were added.
    listing(&mut c, "d").await;
    assert_eq!(seen(&listing(&mut c, "d").await), on_disk(&d));

    std::fs::write(server.root().join("elsewhere/other"), b"longer").unwrap();
    std::fs::write(d.join("sub/new"), b"x").unwrap();
    // Once its event is digested, `d` is quiet as far as its own watch can tell.
    c.wait_event("d/sub/new", |e| {
        matches!(e, Event::Changed { parent, name: Some(n), .. }
            if parent.0 == b"d/sub" && n.0 == b"new")
    })
    .await;
    let l = listing(&mut c, "d").await;
    assert_eq!(l["linked"].size, 6);
    assert_eq!(seen(&l), on_disk(&d));
}

/// Entries removed while their directory's listing is kept are gone from the next one,
/// once their events are digested as well as before.
#[tokio::test]
async fn a_kept_listing_leaves_out_what_went_meanwhile() {
    let server = Server::start().await;
    let d = server.root().join("d");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("f"), b"1").unwrap();
    let mut c = Client::connect(server.addr, caps::EVENTS).await;
    listing(&mut c, "d").await;
    listing(&mut c, "d").await;
    std::fs::remove_dir(d.join("sub")).unwrap();
    assert_eq!(listing(&mut c, "d").await.len(), 1);
    std::fs::remove_file(d.join("f")).unwrap();
    c.wait_event(
        "d/f gone",
        |e| matches!(e, Event::Changed { name: Some(n), attr: None, .. } if n.0 == b"f"),
    )
    .await;
    assert!(listing(&mut c, "d").await.is_empty());
}

/// Directories `d` and `e` of `server`'s export, `d` holding `f` ("1"); with
/// `linked`, `f` also named `e/g`.
fn d_and_e(server: &Server, linked: bool) -> (PathBuf, PathBuf) {
    let (d, e) = (server.root().join("d"), server.root().join("e"));
    std::fs::create_dir(&d).unwrap();
    std::fs::create_dir(&e).unwrap();
    std::fs::write(d.join("f"), b"1").unwrap();
    if linked {
        std::fs::hard_link(d.join("f"), e.join("g")).unwrap();
    }
    (d, e)
}

/// Make a change in `e` (watched) and wait for its event: everything queued before is
/// digested then.
async fn events_caught_up(c: &mut Client, e: &std::path::Path, tag: &str) {
    std::fs::write(e.join(tag), b"").unwrap();
    c.wait_event(
        tag,
        |ev| matches!(ev, Event::Changed { name: Some(n), .. } if n.0 == tag.as_bytes()),
    )
    .await;
}

/// A file with one link when its directory's listing was kept, that gains a link in a
/// watched directory (through `ferryd` or on the disk) and is then written through
/// it: no event names the first directory, and its next listing shows the file as the
/// disk does all the same.
#[tokio::test]
async fn a_kept_listing_follows_a_file_that_gained_a_link_elsewhere() {
    let server = Server::start().await;
    let (d, e) = d_and_e(&server, false);
    std::fs::write(d.join("h"), b"1").unwrap();
    let mut c = Client::connect(server.addr, caps::EVENTS).await;
    listing(&mut c, "e").await;
    listing(&mut c, "d").await;
    assert_eq!(seen(&listing(&mut c, "d").await), on_disk(&d));

    c.call(Request::Link {
        path: p("d/f"),
        new_parent: p("e"),
        new_name: n("g"),
    })
    .await
    .unwrap();
    // (Listed again once the link's event is digested: `d` is quiet as far as its own
    // watch can tell.)
    c.wait_event("e/g", |ev| {
        matches!(ev, Event::Changed { parent, name: Some(n), .. } if parent.0 == b"e" && n.0 == b"g")
    })
    .await;
    assert_eq!(
        seen(&listing(&mut c, "d").await),
        on_disk(&d),
        "after a Link"
    );

    std::fs::hard_link(d.join("h"), e.join("i")).unwrap();
    std::fs::write(e.join("i"), b"much longer").unwrap();
    c.wait_event("e/i written", |ev| {
        matches!(ev, Event::Changed { parent, name: Some(n), attr: Some(a), .. }
            if parent.0 == b"e" && n.0 == b"i" && a.size == 11)
    })
    .await;
    assert_eq!(
        seen(&listing(&mut c, "d").await),
        on_disk(&d),
        "after a link and a write on the disk"
    );
}

/// A file written through a handle whose name is gone (opened as `e/g`, a second link,
/// since unlinked: the write is reported to no watch) shows as the disk has it in the
/// next listing of the directory of its remaining name.
#[tokio::test]
async fn a_kept_listing_follows_a_write_through_a_handle_of_a_name_gone() {
    let server = Server::start().await;
    let (d, e) = d_and_e(&server, true);
    let mut c = Client::connect(server.addr, caps::EVENTS).await;
    let (h, _) = c.open("e/g", libc::O_RDWR).await.unwrap();
    std::fs::remove_file(e.join("g")).unwrap();
    listing(&mut c, "d").await;
    assert_eq!(seen(&listing(&mut c, "d").await), on_disk(&d));
    listing(&mut c, "e").await;
    c.write(h, 0, b"much longer").await.unwrap();
    c.commit(h).await.unwrap();
    assert_eq!(std::fs::metadata(d.join("f")).unwrap().len(), 11);
    // Whatever the commit queued is digested once a later change's event is out.
    events_caught_up(&mut c, &e, "later").await;
    assert_eq!(seen(&listing(&mut c, "d").await), on_disk(&d));
}

/// Past the watch limit, a file may gain a link in a directory no watch covers, and a
/// listing must then mark it: no kept listing is handed out.
#[tokio::test]
async fn past_the_watch_limit_listings_are_read_afresh() {
    let options = ferry_server::Options {
        max_watches: Some(1),
        ..Default::default()
    };
    let server = Server::start_opts(false, options).await;
    let (d, e) = d_and_e(&server, false);
    let mut c = Client::connect(server.addr, caps::EVENTS | caps::PARTIAL_WATCHES).await;
    listing(&mut c, "d").await;
    listing(&mut c, "d").await;
    // One watch too many: the server is partial from now on.
    assert!(listing(&mut c, "e").await.is_empty());
    std::fs::hard_link(d.join("f"), e.join("g")).unwrap();
    std::fs::write(e.join("g"), b"much longer").unwrap();
    let l = listing(&mut c, "d").await;
    assert_eq!(seen(&l), on_disk(&d));
    assert!(l["f"].uncovered, "{:?}", l["f"]);
}

/// A staged handle opened as `e/g` (a second link, since unlinked: nothing reports
/// changes through it) is committed by an `Fsync`, then by a `Fallocate` that commits
/// and fails, each time with its writes sent before `d` was listed: the next listing
/// of `d` shows the file as the disk has it. (helper-55: neither was noted.)
#[tokio::test]
async fn a_kept_listing_follows_commits_by_fsync_and_by_a_failing_fallocate() {
    let server = Server::start().await;
    let (d, e) = d_and_e(&server, true);
    let mut c = Client::connect(server.addr, caps::EVENTS).await;
    let (h, _) = c.open_staged("e/g", libc::O_RDWR).await.unwrap();
    c.write(h, 0, b"much longer").await.unwrap();
    std::fs::remove_file(e.join("g")).unwrap();
    listing(&mut c, "e").await;
    events_caught_up(&mut c, &e, "s1").await;
    listing(&mut c, "d").await;
    assert_eq!(seen(&listing(&mut c, "d").await), on_disk(&d));
    c.call(Request::Fsync {
        handle: h,
        datasync: false,
    })
    .await
    .unwrap();
    assert_eq!(std::fs::metadata(d.join("f")).unwrap().len(), 11);
    events_caught_up(&mut c, &e, "s2").await;
    assert_eq!(
        seen(&listing(&mut c, "d").await),
        on_disk(&d),
        "after Fsync"
    );

    c.write(h, 11, b", and more").await.unwrap();
    // A change in `d` itself: the next listing is read afresh and kept from after the
    // write, so only the `Fallocate` can make it stat `f` again.
    std::fs::write(d.join("z"), b"").unwrap();
    c.wait_event(
        "d/z",
        |ev| matches!(ev, Event::Changed { name: Some(n), .. } if n.0 == b"z"),
    )
    .await;
    listing(&mut c, "d").await;
    assert_eq!(seen(&listing(&mut c, "d").await), on_disk(&d));
    let r = c
        .call(Request::Fallocate {
            handle: h,
            offset: 0,
            len: 1,
            mode: 0x7000_0000,
        })
        .await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(std::fs::metadata(d.join("f")).unwrap().len(), 21);
    events_caught_up(&mut c, &e, "s4").await;
    assert_eq!(
        seen(&listing(&mut c, "d").await),
        on_disk(&d),
        "after Fallocate"
    );
}
