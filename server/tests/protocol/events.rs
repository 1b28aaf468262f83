//! Change events: what a client that negotiated EVENTS hears about directories it looked
//! into, whoever made the change. Every wait polls the stream with a deadline; absence is
//! shown by ordering (a later change's event arrives, the earlier one never did).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use ferry_common::*;

use crate::harness::*;

/// Well above the ~100 ms target, to stay reliable on a loaded CI machine.
const LATENCY: Duration = Duration::from_secs(2);

async fn events_client(server: &Server) -> Client {
    let c = Client::connect(server.addr, caps::EVENTS).await;
    assert_eq!(c.welcome.capabilities, caps::EVENTS);
    c
}

/// The attr of a `Changed` for `parent`/`name` (name `None`: the directory itself).
fn changed<'a>(ev: &'a Event, parent: &str, name: Option<&str>) -> Option<&'a Option<Attr>> {
    match ev {
        Event::Changed {
            parent: p,
            name: n,
            attr,
            ..
        } if p.0 == parent.as_bytes()
            && n.as_ref().map(|n| &n.0[..]) == name.map(str::as_bytes) =>
        {
            Some(attr)
        }
        _ => None,
    }
}

/// Wait for a `Changed` of `parent`/`name` whose attr satisfies `ok`, within `LATENCY`.
async fn expect(
    c: &mut Client,
    parent: &str,
    name: Option<&str>,
    ok: impl Fn(&Option<Attr>) -> bool,
) -> Vec<Event> {
    let started = Instant::now();
    let what = format!("{parent}/{name:?}");
    let (_, skipped) = c
        .wait_event(&what, |e| changed(e, parent, name).is_some_and(&ok))
        .await;
    assert!(
        started.elapsed() < LATENCY,
        "event {what} took {:?}",
        started.elapsed()
    );
    skipped
}

/// The entries of directory `path`, in the server's order.
async fn entries(c: &mut Client, path: &str) -> Vec<DirEntry> {
    let h = match c.call(Request::OpenDir { path: p(path) }).await.unwrap() {
        Response::Opened { handle, .. } => handle,
        other => panic!("{other:?}"),
    };
    match c
        .call(Request::ReadDir {
            handle: h,
            max_entries: 100,
        })
        .await
        .unwrap()
    {
        Response::Dir { entries, .. } => entries,
        other => panic!("{other:?}"),
    }
}

/// The names of directory `path`, in the server's order.
async fn list(c: &mut Client, path: &str) -> Vec<String> {
    entries(c, path)
        .await
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name.0).into_owned())
        .collect()
}

#[tokio::test]
async fn changes_on_disk_reach_a_client_that_listed_the_directory() {
    let server = Server::start().await;
    std::fs::create_dir(server.root().join("d")).unwrap();
    let mut c = events_client(&server).await;
    list(&mut c, "d").await;
    let f = server.root().join("d/f");

    std::fs::write(&f, b"hello").unwrap();
    expect(&mut c, "d", Some("f"), |a| a.is_some_and(|a| a.size == 5)).await;
    // The directory's own attributes changed with the new entry.
    expect(&mut c, "d", None, |a| {
        a.is_some_and(|a| a.kind == FileKind::Dir)
    })
    .await;

    std::fs::write(&f, b"hello, longer").unwrap();
    expect(&mut c, "d", Some("f"), |a| a.is_some_and(|a| a.size == 13)).await;

    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    expect(&mut c, "d", Some("f"), |a| {
        a.is_some_and(|a| a.perm == 0o600)
    })
    .await;

    std::fs::rename(&f, server.root().join("d/g")).unwrap();
    expect(&mut c, "d", Some("f"), Option::is_none).await;
    expect(&mut c, "d", Some("g"), |a| a.is_some_and(|a| a.size == 13)).await;

    std::fs::remove_file(server.root().join("d/g")).unwrap();
    expect(&mut c, "d", Some("g"), Option::is_none).await;
}

#[tokio::test]
async fn changes_through_another_connection_are_reported() {
    let server = Server::start().await;
    std::fs::create_dir(server.root().join("d")).unwrap();
    let mut watcher = events_client(&server).await;
    watcher.lookup("", "d").await.unwrap();
    list(&mut watcher, "d").await;

    let mut other = server.client().await;
    let (h, _) = other
        .create("d", "new", 0o644, libc::O_RDWR | libc::O_EXCL)
        .await
        .unwrap();
    other.write(h, 0, b"abc").await.unwrap();
    other.call(Request::Release { handle: h }).await.unwrap();
    expect(&mut watcher, "d", Some("new"), |a| {
        a.is_some_and(|a| a.size == 3)
    })
    .await;
    other.mkdir("d", "sub").await.unwrap();
    expect(&mut watcher, "d", Some("sub"), |a| {
        a.is_some_and(|a| a.kind == FileKind::Dir)
    })
    .await;
    // A lookup in the root watched it too.
    std::fs::write(server.root().join("top"), b"").unwrap();
    expect(&mut watcher, "", Some("top"), Option::is_some).await;
}

#[tokio::test]
async fn events_of_a_renamed_directory_carry_its_new_path() {
    let server = Server::start().await;
    std::fs::create_dir_all(server.root().join("a/sub")).unwrap();
    let sub_ino = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(server.root().join("a/sub"))
            .unwrap()
            .ino()
    };
    let mut c = events_client(&server).await;
    list(&mut c, "").await;
    list(&mut c, "a").await;
    list(&mut c, "a/sub").await;

    std::fs::write(server.root().join("a/sub/w"), b"1").unwrap();
    let (ev, _) = c
        .wait_event("a/sub/w", |e| changed(e, "a/sub", Some("w")).is_some())
        .await;
    assert!(
        matches!(ev, Event::Changed { dir, .. } if dir == sub_ino),
        "{ev:?}"
    );

    std::fs::rename(server.root().join("a"), server.root().join("b")).unwrap();
    expect(&mut c, "", Some("a"), Option::is_none).await;
    expect(&mut c, "", Some("b"), Option::is_some).await;

    std::fs::write(server.root().join("b/sub/x"), b"1").unwrap();
    let (ev, skipped) = c
        .wait_event("b/sub/x", |e| {
            changed(e, "b/sub", Some("x")).is_some_and(Option::is_some)
        })
        .await;
    // The same directory, whatever its path.
    assert!(
        matches!(ev, Event::Changed { dir, .. } if dir == sub_ino),
        "{ev:?}"
    );
    assert!(
        !skipped
            .iter()
            .any(|e| matches!(e, Event::Changed { parent, .. } if parent.0.starts_with(b"a"))),
        "stale path in {skipped:?}"
    );
    std::fs::write(server.root().join("b/y"), b"1").unwrap();
    expect(&mut c, "b", Some("y"), Option::is_some).await;

    // Moved out of the export: no more events under any path for it, and clients are
    // told it and its subdirectory are not watched any more (nothing reports changes
    // to what they hold of them now).
    std::fs::rename(server.root().join("b"), server.outside().join("b")).unwrap();
    expect(&mut c, "", Some("b"), Option::is_none).await;
    c.wait_event(
        "sub unwatched",
        |e| matches!(e, Event::Unwatched { dirs } if dirs.len() == 2 && dirs.contains(&sub_ino)),
    )
    .await;
    std::fs::write(server.outside().join("b/sub/z"), b"1").unwrap();
    std::fs::write(server.root().join("marker"), b"1").unwrap();
    let skipped = expect(&mut c, "", Some("marker"), Option::is_some).await;
    assert!(
        !skipped
            .iter()
            .any(|e| changed(e, "b/sub", Some("z")).is_some()),
        "event from outside the export: {skipped:?}"
    );
}

#[tokio::test]
async fn directories_nobody_looked_into_are_silent() {
    let server = Server::start().await;
    std::fs::create_dir(server.root().join("seen")).unwrap();
    std::fs::create_dir(server.root().join("unseen")).unwrap();
    let mut c = events_client(&server).await;
    list(&mut c, "seen").await;
    // Changed first, so its event (if any) would come before the marker's.
    std::fs::write(server.root().join("unseen/f"), b"x").unwrap();
    std::fs::write(server.root().join("seen/marker"), b"x").unwrap();
    let skipped = expect(&mut c, "seen", Some("marker"), Option::is_some).await;
    assert!(
        skipped
            .iter()
            .all(|e| matches!(e, Event::Changed { parent, .. } if parent.0 == b"seen")),
        "unexpected events: {skipped:?}"
    );
}

#[tokio::test]
async fn clients_without_events_get_none() {
    let server = Server::start().await;
    std::fs::create_dir(server.root().join("d")).unwrap();
    let mut plain = server.client().await;
    assert_eq!(plain.welcome.capabilities & caps::EVENTS, 0);
    list(&mut plain, "d").await;
    let mut listener = events_client(&server).await;
    list(&mut listener, "d").await;
    std::fs::write(server.root().join("d/f"), b"x").unwrap();
    expect(&mut listener, "d", Some("f"), Option::is_some).await;
    // The event has been broadcast by now; a subscribed writer would have it queued.
    assert_eq!(plain.call(Request::Ping).await, Ok(Response::Pong));
    assert!(plain.events.is_empty());
    assert_eq!(plain.next_event(Duration::from_millis(200)).await, None);
}

#[tokio::test]
async fn staged_writes_are_announced_at_commit_only() {
    let server = Server::start().await;
    std::fs::create_dir(server.root().join("d")).unwrap();
    std::fs::write(server.root().join("d/f"), b"content").unwrap();
    let mut c = events_client(&server).await;
    list(&mut c, "d").await;
    let (h, _) = c.open_staged("d/f", libc::O_RDWR).await.unwrap();
    c.write(h, 0, b"CONTENT, longer").await.unwrap();
    std::fs::write(server.root().join("d/marker"), b"x").unwrap();
    let skipped = expect(&mut c, "d", Some("marker"), Option::is_some).await;
    // Neither the real file nor the hidden staging file made a sound.
    assert_eq!(skipped, vec![]);
    c.commit(h).await.unwrap();
    expect(&mut c, "d", Some("f"), |a| a.is_some_and(|a| a.size == 15)).await;
}

/// Past its watch limit (`--max-watches`, or the kernel's), the server can no longer
/// report every change. Each subscribed client hears `Incomplete` once, before the
/// first reply that rests on a directory it could not watch; a client connecting later
/// is not offered events at all.
#[tokio::test]
async fn a_server_out_of_watches_says_so_before_the_reply_that_needs_it() {
    let options = ferry_server::Options {
        max_watches: Some(1),
        ..Default::default()
    };
    let server = Server::start_opts(false, options).await;
    std::fs::create_dir(server.root().join("d")).unwrap();
    std::fs::write(server.root().join("d/x"), b"x").unwrap();
    let mut c = events_client(&server).await;
    let mut idle = events_client(&server).await;
    // The root takes the one watch (`d`, whose attributes go out, would only be watched
    // within nine tenths of the limit: it is not).
    c.call(Request::Lookup {
        parent: p(""),
        name: n("d"),
    })
    .await
    .unwrap();
    assert!(c.events.is_empty(), "{:?}", c.events);
    // A lookup in `d` (answered on the connection's own task, right after the failed
    // watch) needs a second.
    c.call(Request::Lookup {
        parent: p("d"),
        name: n("x"),
    })
    .await
    .unwrap();
    assert_eq!(
        c.events.iter().collect::<Vec<_>>(),
        [&Event::Incomplete],
        "Incomplete must come before the reply"
    );
    c.events.clear();
    idle.wait_event("Incomplete", |e| *e == Event::Incomplete)
        .await;
    // Once only, and events of watched directories still come.
    list(&mut c, "d").await;
    std::fs::write(server.root().join("f"), b"x").unwrap();
    let skipped = expect(&mut c, "", Some("f"), |a| a.is_some()).await;
    assert!(!skipped.contains(&Event::Incomplete), "{skipped:?}");
    let later = Client::connect(server.addr, caps::EVENTS).await;
    assert_eq!(later.welcome.capabilities & caps::EVENTS, 0);
}

/// The capabilities of a client told per reply what rests on unwatched directories.
const PARTIAL: u64 = caps::EVENTS | caps::PARTIAL_WATCHES;

/// A server that watches two directories at most, exporting the empty `d` and `e`: a
/// client's lookups in the root and in `d` take both watches, `e` is one too many.
async fn two_watch_server() -> Server {
    let options = ferry_server::Options {
        max_watches: Some(2),
        ..Default::default()
    };
    let server = Server::start_opts(false, options).await;
    for d in ["d", "e"] {
        std::fs::create_dir(server.root().join(d)).unwrap();
    }
    server
}

/// With `caps::PARTIAL_WATCHES`, a directory the server cannot watch leaves the rest of
/// the stream live: the client hears no `Incomplete`; every attribute that rests on that
/// directory goes out marked uncovered (lookups, attributes by path and by handle,
/// listings, opens), those that rest on watched directories do not, and events of the
/// watched ones keep coming. A client connecting later is still offered events, one
/// without the capability is not.
#[tokio::test]
async fn past_its_watch_limit_the_server_marks_what_rests_on_unwatched_directories() {
    let server = two_watch_server().await;
    for d in ["d", "e"] {
        std::fs::write(server.root().join(d).join("x"), b"x").unwrap();
    }
    let partial = PARTIAL;
    let mut c = Client::connect(server.addr, partial).await;
    assert_eq!(c.welcome.capabilities & partial, partial);
    // The root and `d` take the two watches; `e` is one too many.
    c.lookup("", "d").await.unwrap();
    assert!(!c.lookup("d", "x").await.unwrap().uncovered);
    let in_e = c.lookup("e", "x").await.unwrap();
    assert!(in_e.uncovered, "{in_e:?}");
    assert!(c.getattr("e/x").await.unwrap().uncovered);
    assert!(c.getattr("e").await.unwrap().uncovered);
    let (h, opened) = c.open("e/x", libc::O_RDONLY).await.unwrap();
    assert!(opened.uncovered);
    assert!(c.handle_attr(h).await.unwrap().uncovered);
    match c
        .call(Request::ListDir {
            path: p("e"),
            max_entries: 100,
            speculative: false,
        })
        .await
        .unwrap()
    {
        Response::Listing { attr, entries, .. } => {
            assert!(attr.uncovered);
            assert!(entries.iter().all(|e| e.attr.uncovered), "{entries:?}");
        }
        other => panic!("{other:?}"),
    }
    // What rests on watched directories is not marked.
    assert!(!c.lookup("d", "x").await.unwrap().uncovered);
    assert!(!c.getattr("d/x").await.unwrap().uncovered);
    assert!(!c.getattr("d").await.unwrap().uncovered);
    let (h, opened) = c.open("d/x", libc::O_RDONLY).await.unwrap();
    assert!(!opened.uncovered);
    // (But through a file's handle, marked: the file may move; see below.)
    assert!(c.handle_attr(h).await.unwrap().uncovered);
    assert!(
        entries(&mut c, "d").await.iter().all(|e| !e.attr.uncovered),
        "a watched directory's entries were marked"
    );
    assert!(!c.events.contains(&Event::Incomplete), "{:?}", c.events);
    // Events of the watched directories still come, and never an `Incomplete`.
    std::fs::write(server.root().join("d/new"), b"n").unwrap();
    let skipped = expect(&mut c, "d", Some("new"), |a| a.is_some()).await;
    assert!(!skipped.contains(&Event::Incomplete), "{skipped:?}");
    let later = Client::connect(server.addr, partial).await;
    assert_eq!(later.welcome.capabilities & partial, partial);
    let old = Client::connect(server.addr, caps::EVENTS).await;
    assert_eq!(old.welcome.capabilities & caps::EVENTS, 0);
}

/// A keyed create in a directory the server could not watch, repeated after its answer
/// was lost: the repeat's answer (an open of the file the first made) is marked, and so
/// are attributes through its handle. (helper-51: the repeat's open ran outside the
/// marking.)
#[tokio::test]
async fn a_repeated_create_in_an_unwatched_directory_is_marked_too() {
    let server = two_watch_server().await;
    let partial = PARTIAL;
    let mut c = Client::connect(server.addr, partial).await;
    c.lookup("", "d").await.unwrap();
    c.lookup("d", "nothing").await.unwrap_err();
    assert!(c.getattr("e").await.unwrap().uncovered);
    let create = Request::Create {
        parent: p("e"),
        name: n("f"),
        mode: 0o644,
        umask: 0o022,
        flags: libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
    };
    let key = OnceKey {
        session: 9,
        seq: 1,
        repeat: false,
    };
    match c.call_keyed(create.clone(), key).await.unwrap().inner() {
        Response::Opened { attr, .. } => assert!(attr.uncovered, "first: {attr:?}"),
        other => panic!("{other:?}"),
    }
    drop(c);
    let mut again = Client::connect(server.addr, partial).await;
    let repeat = OnceKey {
        repeat: true,
        ..key
    };
    let reply = again.call_keyed(create, repeat).await.unwrap();
    let (handle, attr) = match reply.inner() {
        Response::Opened { handle, attr } => (*handle, *attr),
        other => panic!("{other:?}"),
    };
    let by_handle = again.handle_attr(handle).await.unwrap();
    assert!(
        attr.uncovered && by_handle.uncovered,
        "repeat: {reply:?}, by handle: {by_handle:?}"
    );
}

/// Once a directory could not be watched, attributes through a file's handle are
/// marked: the file may have moved into such a directory since it was opened.
/// (helper-51: a file opened in a watched directory, then renamed into an unwatched
/// one, went on being answered unmarked.)
#[tokio::test]
async fn attributes_through_a_handle_are_marked_once_a_watch_failed() {
    let server = two_watch_server().await;
    std::fs::write(server.root().join("d/x"), b"x").unwrap();
    let partial = PARTIAL;
    let mut c = Client::connect(server.addr, partial).await;
    c.lookup("", "d").await.unwrap();
    assert!(!c.lookup("d", "x").await.unwrap().uncovered);
    let (h, opened) = c.open("d/x", libc::O_RDONLY).await.unwrap();
    assert!(!opened.uncovered);
    assert!(!c.handle_attr(h).await.unwrap().uncovered);
    assert!(c.lookup("e", "nothing").await.is_err());
    assert!(c.getattr("e").await.unwrap().uncovered);
    let r = c
        .call(Request::Rename {
            parent: p("d"),
            name: n("x"),
            new_parent: p("e"),
            new_name: n("x"),
            flags: 0,
        })
        .await;
    assert_eq!(r, Ok(Response::Ok));
    assert!(c.getattr("e/x").await.unwrap().uncovered);
    let by_handle = c.handle_attr(h).await.unwrap();
    assert!(by_handle.uncovered, "{by_handle:?}");
}

/// Once a directory could not be watched, a client told per reply hears one `Resync`
/// (what it trusted of files with several links may change through a name no watch
/// reports), and from then on such files' attributes are marked, in replies and events.
#[tokio::test]
async fn past_its_watch_limit_files_with_several_links_are_marked() {
    let server = two_watch_server().await;
    std::fs::write(server.root().join("d/x"), b"x").unwrap();
    std::fs::hard_link(server.root().join("d/x"), server.root().join("d/y")).unwrap();
    std::fs::write(server.root().join("d/one"), b"1").unwrap();
    let partial = PARTIAL;
    let mut c = Client::connect(server.addr, partial).await;
    c.lookup("", "d").await.unwrap();
    assert!(!c.lookup("d", "x").await.unwrap().uncovered);
    assert!(c.events.is_empty(), "{:?}", c.events);
    c.lookup("e", "nothing").await.unwrap_err();
    assert_eq!(c.events.iter().collect::<Vec<_>>(), [&Event::Resync]);
    c.events.clear();
    assert!(c.lookup("d", "x").await.unwrap().uncovered);
    assert!(!c.lookup("d", "one").await.unwrap().uncovered);
    std::fs::write(server.root().join("d/y"), b"xx").unwrap();
    expect(&mut c, "d", Some("y"), |a| a.is_some_and(|a| a.uncovered)).await;
    // A connection made once the server is partial: marked replies, and no resync
    // (there is nothing unmarked for it to take back).
    let mut later = Client::connect(server.addr, partial).await;
    assert_eq!(later.welcome.capabilities & partial, partial);
    assert!(later.lookup("d", "x").await.unwrap().uncovered);
    assert!(!later.lookup("d", "one").await.unwrap().uncovered);
    std::fs::write(server.root().join("d/x"), b"xyz").unwrap();
    let skipped = expect(&mut later, "d", Some("x"), |a| {
        a.is_some_and(|a| a.uncovered)
    })
    .await;
    assert!(
        !later.events.contains(&Event::Resync) && !skipped.contains(&Event::Resync),
        "{:?} {skipped:?}",
        later.events
    );
}

/// Subdirectories whose attributes a listing hands out are watched only within nine
/// tenths of the watch limit: a listing of many of them leaves room for the
/// directories clients look into, and never makes the stream incomplete by itself.
#[tokio::test]
async fn watches_for_listed_subdirectories_leave_room_for_required_ones() {
    // 18 watches for the root, `p` and the first 16 subdirectories; 2 left.
    let options = ferry_server::Options {
        max_watches: Some(20),
        ..Default::default()
    };
    let server = Server::start_opts(false, options).await;
    for i in 0..20 {
        std::fs::create_dir_all(server.root().join(format!("p/s{i:02}"))).unwrap();
    }
    let mut c = events_client(&server).await;
    list(&mut c, "").await;
    let listed = entries(&mut c, "p").await;
    let names: Vec<String> = listed
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name.0).into_owned())
        .collect();
    assert_eq!(names.len(), 20);
    // Watched in listing order while the budget lasts; the others go out marked.
    let uncovered: Vec<bool> = listed.iter().map(|e| e.attr.uncovered).collect();
    assert_eq!(uncovered[..16], [false; 16], "{uncovered:?}");
    assert_eq!(uncovered[16..], [true; 4], "{uncovered:?}");
    // An eagerly watched one reports what is made in it.
    std::fs::write(server.root().join(format!("p/{}/g", names[0])), b"x").unwrap();
    expect(
        &mut c,
        &format!("p/{}", names[0]),
        Some("g"),
        Option::is_some,
    )
    .await;
    // The last two listed (watched in listing order, so not eagerly), looked into:
    // required watches, within the limit.
    let (a, b) = (&names[18], &names[19]);
    list(&mut c, &format!("p/{a}")).await;
    list(&mut c, &format!("p/{b}")).await;
    std::fs::write(server.root().join(format!("p/{b}/f")), b"x").unwrap();
    let skipped = expect(&mut c, &format!("p/{b}"), Some("f"), Option::is_some).await;
    assert!(
        !c.events.contains(&Event::Incomplete) && !skipped.contains(&Event::Incomplete),
        "{skipped:?}"
    );
}

/// A listing asked ahead of need (`speculative`) is refused with EAGAIN rather than
/// take one of the watches kept for directories clients look into; asked for real, it
/// takes one.
#[tokio::test]
async fn a_speculative_listing_does_not_take_a_required_watch() {
    let options = ferry_server::Options {
        max_watches: Some(2),
        ..Default::default()
    };
    let server = Server::start_opts(false, options).await;
    std::fs::create_dir(server.root().join("d")).unwrap();
    let mut c = events_client(&server).await;
    list(&mut c, "").await;
    let ahead = |speculative| Request::ListDir {
        path: p("d"),
        max_entries: 100,
        speculative,
    };
    assert_eq!(c.call(ahead(true)).await, Err(libc::EAGAIN));
    assert!(matches!(
        c.call(ahead(false)).await,
        Ok(Response::Listing { .. })
    ));
    assert!(!c.events.contains(&Event::Incomplete), "{:?}", c.events);
}

/// `Locate` (with `LOCATE`, offered only beside `EVENTS`): where a directory a client
/// looked into is now, after a rename on the server, its subdirectories along with it,
/// also beneath a directory nobody looked into (found by its file handle, as root);
/// `None` for one the server never watched, or that left the export.
#[tokio::test]
async fn locate_answers_where_a_watched_directory_went() {
    let server = Server::start().await;
    let root = server.root();
    std::fs::create_dir_all(root.join("a/sub")).unwrap();
    std::fs::create_dir(root.join("b")).unwrap();
    std::fs::create_dir(root.join("plain")).unwrap();
    std::fs::create_dir_all(root.join("c")).unwrap();
    std::fs::create_dir_all(root.join("deep/er")).unwrap();
    let plain = Client::connect(server.addr, caps::LOCATE).await;
    assert_eq!(plain.welcome.capabilities, 0, "LOCATE without EVENTS");
    let mut c = Client::connect(server.addr, caps::EVENTS | caps::LOCATE).await;
    assert_eq!(c.welcome.capabilities, caps::EVENTS | caps::LOCATE);
    let locate = async |c: &mut Client, nodes: &[u64]| match c
        .call(Request::Locate {
            nodes: nodes.to_vec(),
        })
        .await
    {
        Ok(Response::Located(paths)) => paths
            .into_iter()
            .map(|p| p.map(|p| String::from_utf8(p.0).unwrap()))
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let a = c.lookup("", "a").await.unwrap().ino;
    let sub = c.lookup("a", "sub").await.unwrap().ino;
    let plain_ino = std::fs::metadata(root.join("plain"))
        .map(|m| m.ino())
        .unwrap();
    list(&mut c, "a/sub").await;
    list(&mut c, "b").await;
    let some = |s: &str| Some(s.to_string());
    assert_eq!(locate(&mut c, &[a, plain_ino]).await, [some("a"), None]);

    std::fs::rename(root.join("a"), root.join("b/a2")).unwrap();
    expect(&mut c, "", Some("a"), Option::is_none).await;
    assert_eq!(
        locate(&mut c, &[a, sub]).await,
        [some("b/a2"), some("b/a2/sub")]
    );

    std::fs::rename(root.join("b/a2"), server.outside().join("a")).unwrap();
    expect(&mut c, "b", Some("a2"), Option::is_none).await;
    assert_eq!(locate(&mut c, &[a, sub]).await, [None, None]);
    let c_ino = c.lookup("", "c").await.unwrap().ino;
    list(&mut c, "c").await;
    std::fs::rename(root.join("c"), root.join("deep/er/c")).unwrap();
    expect(&mut c, "", Some("c"), Option::is_none).await;
    // SAFETY: no arguments, no side effects.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(locate(&mut c, &[c_ino]).await, [some("deep/er/c")]);
    }
    let too_many = vec![a; MAX_LOCATE + 1];
    assert_eq!(
        c.call(Request::Locate { nodes: too_many }).await,
        Err(libc::EINVAL)
    );
}

/// A `Locate` answer is read from the disk as it is: the events of the changes made
/// before it (which may still sit in the server's 10 ms window) reach the client first,
/// so that it can tell an answer resting on names it has not heard of yet.
#[tokio::test]
async fn locate_answers_after_the_events_of_changes_made_before_it() {
    let server = Server::start().await;
    let root = server.root();
    std::fs::create_dir(root.join("a")).unwrap();
    std::fs::create_dir(root.join("p")).unwrap();
    let mut c = Client::connect(server.addr, caps::EVENTS | caps::LOCATE).await;
    let a = c.lookup("", "a").await.unwrap().ino;
    list(&mut c, "").await;
    list(&mut c, "p").await;
    for round in 0..5 {
        let (from, to) = if round % 2 == 0 {
            ("a", "p/a")
        } else {
            ("p/a", "a")
        };
        c.events.clear();
        std::fs::rename(root.join(from), root.join(to)).unwrap();
        let answer = c.call(Request::Locate { nodes: vec![a] }).await;
        assert_eq!(answer, Ok(Response::Located(vec![Some(p(to))])));
        let (dir, name) = to.rsplit_once('/').unwrap_or(("", to));
        assert!(
            c.events
                .iter()
                .any(|e| changed(e, dir, Some(name)).is_some_and(|x| x.is_some_and(|x| x.ino == a))),
            "({round}) the move's event came after the answer: {:?}",
            c.events
        );
    }
}

/// `mv x y` over an empty watched `y` that something on the server holds open (its
/// removal is reported only once released): `y`'s watch, set aside, is checked a batch
/// later and dropped alone, not with `x`'s (now at `y`) and those beneath it (helper-49).
#[tokio::test]
async fn a_held_directory_replaced_by_a_move_takes_only_its_own_watch_along() {
    let server = Server::start().await;
    let root = server.root();
    std::fs::create_dir_all(root.join("x/sub")).unwrap();
    std::fs::create_dir(root.join("y")).unwrap();
    let mut c = events_client(&server).await;
    let x = c.lookup("", "x").await.unwrap().ino;
    list(&mut c, "").await;
    list(&mut c, "x").await;
    list(&mut c, "x/sub").await;
    list(&mut c, "y").await;
    let hold = std::fs::File::open(root.join("y")).unwrap();
    std::fs::rename(root.join("x"), root.join("y")).unwrap();
    expect(&mut c, "", Some("y"), Option::is_some).await;
    // The next batch (made after the move's events went out) checks the watch set
    // aside; the one after shows whether `y/sub` is still watched.
    std::fs::write(root.join("m1"), b"1").unwrap();
    let mut skipped = expect(&mut c, "", Some("m1"), Option::is_some).await;
    std::fs::write(root.join("y/sub/f"), b"1").unwrap();
    std::fs::write(root.join("m2"), b"1").unwrap();
    skipped.extend(expect(&mut c, "", Some("m2"), Option::is_some).await);
    drop(hold);
    assert!(
        !skipped
            .iter()
            .any(|e| matches!(e, Event::Unwatched { dirs } if dirs.contains(&x))),
        "x unwatched: {skipped:?}"
    );
    assert!(
        skipped
            .iter()
            .any(|e| changed(e, "y/sub", Some("f")).is_some()),
        "y/sub/f not reported: {skipped:?}"
    );
}
