//! Changes whose answer the network lost: the server ran them, the connection dropped
//! before the reply reached the mount (a proxy in between cuts it there,
//! `ferry_tests::proxy`). The mount sends the change again with its key on a new
//! connection, and the server answers from its record of the first run: the change
//! reports success and ran once (`server/src/once.rs`). Before, `mv`, `mkdir` and
//! friends failed with `EIO` although the server had done the work.

use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::time::Duration;

use ferry_tests::proxy::CutProxy;
use ferry_tests::{TestMount, TestServer, poll_until, require_fuse, with_deadline};

const DEADLINE: Duration = Duration::from_secs(20);

/// `op` on the mount with the reply to its `kind` request lost: it must succeed, and the
/// proxy must have lost exactly one more reply.
fn lose_answer_of<T: Send + 'static>(
    proxy: &CutProxy,
    kind: &str,
    op: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> T {
    let before = proxy.cuts();
    proxy.lose_reply_to(kind);
    let r = with_deadline(DEADLINE, op).unwrap_or_else(|| panic!("{kind}: hung"));
    let r = r.unwrap_or_else(|e| panic!("{kind} whose answer was lost: {e}"));
    // (An unlink answered ahead returns before its answer comes.)
    assert!(
        poll_until(DEADLINE, || proxy.cuts() == before + 1),
        "{kind}: no answer was lost"
    );
    r
}

#[test]
fn changes_whose_answer_was_lost_succeed_once() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    let e = |p: &str| server.export(p);
    fs::write(e("f"), b"content of f").expect("write");
    fs::create_dir(e("empty")).expect("mkdir");
    let proxy = CutProxy::start(server.addr());
    let mount = TestMount::try_mount(&proxy.remote(), &[]).expect("mount through the proxy");
    let m = |p: &str| mount.join(p);
    // Known to the mount first: the changes below are one request each.
    for name in ["f", "empty"] {
        fs::symlink_metadata(m(name)).expect("stat");
    }

    let (from, to) = (m("f"), m("g"));
    lose_answer_of(&proxy, "rename", move || fs::rename(from, to));
    assert_eq!(fs::read(e("g")).expect("renamed"), b"content of f");
    assert!(!e("f").exists(), "the old name is still there");

    let dir = m("made");
    lose_answer_of(&proxy, "mkdir", move || fs::create_dir(dir));
    assert!(e("made").is_dir(), "the new directory");

    let dir = m("empty");
    lose_answer_of(&proxy, "rmdir", move || fs::remove_dir(dir));
    assert!(!e("empty").exists(), "the removed directory");

    let link = m("l");
    lose_answer_of(&proxy, "symlink", move || symlink("g", link));
    assert_eq!(
        fs::read_link(e("l")).expect("symlink"),
        std::path::Path::new("g")
    );

    let (from, to) = (m("g"), m("g2"));
    lose_answer_of(&proxy, "link", move || fs::hard_link(from, to));
    assert_eq!(fs::metadata(e("g")).expect("stat").nlink(), 2);

    // Through the mount, all of it as the server has it.
    let mut names: Vec<String> = fs::read_dir(mount.path())
        .expect("list the mount")
        .map(|d| d.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["g", "g2", "l", "made"]);
}

/// `rm` of a file the mount answers before the server does (`unlinks.rs`), with the
/// server's answer lost: sent again with its key, the unlink counts as done, and the
/// directory's `fsync` (which reports unlinks answered ahead that failed) succeeds.
#[test]
fn an_unlink_answered_ahead_whose_answer_was_lost_is_done() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    fs::write(server.export("gone"), b"bye").expect("write");
    let proxy = CutProxy::start(server.addr());
    let mount = TestMount::try_mount(&proxy.remote(), &[]).expect("mount through the proxy");
    assert!(
        poll_until(DEADLINE, || mount.stats().flag("events_live")),
        "the event stream never came up"
    );
    fs::symlink_metadata(mount.join("gone")).expect("stat");
    let before = mount.stats();
    let file = mount.join("gone");
    lose_answer_of(&proxy, "unlink", move || fs::remove_file(file));
    let dir = mount.path().to_path_buf();
    with_deadline(DEADLINE, move || fs::File::open(dir)?.sync_all())
        .expect("fsync of the directory hung")
        .expect("fsync of the directory: no unlink failed");
    assert!(
        !server.export("gone").exists(),
        "the file is still on the server"
    );
    let after = mount.stats();
    assert_eq!(
        after.get_or_zero("unlinks_behind"),
        before.get_or_zero("unlinks_behind") + 1,
        "not answered ahead: {after}"
    );
    assert_eq!(after.get_or_zero("unlinks_behind_failed"), 0, "{after}");
}

/// A create whose answer was lost (`File::create_new`, and `File::create` of a new
/// name): sent again with its key, it gets the file the first run made, on a handle of
/// the new connection; what is written through it is what the server has after the
/// close. (`File::create` of a name the kernel knows is an `OPEN` with `O_TRUNC`.)
#[test]
fn a_create_whose_answer_was_lost_opens_its_own_file() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    let proxy = CutProxy::start(server.addr());
    let mount = TestMount::try_mount(&proxy.remote(), &[]).expect("mount through the proxy");
    for (name, exclusive) in [("new", true), ("plain", false)] {
        let path = mount.join(name);
        lose_answer_of(&proxy, "create", move || {
            use std::io::Write;
            let mut f = if exclusive {
                fs::File::create_new(&path)?
            } else {
                fs::File::create(&path)?
            };
            f.write_all(b"written after the lost answer")?;
            f.sync_all()
        });
        assert_eq!(
            fs::read(server.export(name)).expect("read the export"),
            b"written after the lost answer",
            "{name}"
        );
    }
}

/// A rename that never reached the server (the network dropped it on the way): sent
/// again with its key to the same server, which knows the mount's session and has
/// no record of the key, so it runs it now. (A server that restarted in between would
/// not be sent the repeat: another process may have run it.)
#[test]
fn a_change_that_never_arrived_runs_when_sent_again() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    fs::write(server.export("a"), b"a").expect("write");
    let proxy = CutProxy::start(server.addr());
    let mount = TestMount::try_mount(&proxy.remote(), &[]).expect("mount through the proxy");
    // The server learns the mount's session from a first keyed change.
    fs::create_dir(mount.join("d")).expect("mkdir");
    fs::symlink_metadata(mount.join("a")).expect("stat");
    let before = proxy.cuts();
    proxy.lose_request("rename");
    let (from, to) = (mount.join("a"), mount.join("b"));
    with_deadline(DEADLINE, move || fs::rename(from, to))
        .expect("rename hung")
        .expect("rename whose request was lost");
    assert_eq!(proxy.cuts(), before + 1, "no request was lost");
    assert_eq!(fs::read(server.export("b")).expect("renamed"), b"a");
    assert!(!server.export("a").exists());
}

/// `op` on the mount with the reply to its `kind` request lost, and the server killed
/// and started again before the mount can send anything more: the restarted server
/// took over the answers the killed one kept in its state directory
/// (`server/src/once/log.rs`), so the repeat is answered and `op` succeeds. Before,
/// a restarted server was another instance: `EIO`.
fn lose_answer_in_a_restart<T: Send + 'static>(
    server: &mut TestServer,
    proxy: &CutProxy,
    kind: &str,
    op: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> T {
    let before = proxy.cuts();
    proxy.hold_after_cut();
    proxy.lose_reply_to(kind);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(op());
    });
    let lost = poll_until(DEADLINE, || proxy.cuts() == before + 1);
    if lost {
        server.restart();
    }
    proxy.release();
    assert!(lost, "{kind}: no answer was lost");
    let r = rx
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("{kind}: hung"));
    r.unwrap_or_else(|e| panic!("{kind} whose answer was lost in a restart: {e}"))
}

#[test]
fn changes_whose_answer_was_lost_in_a_server_restart_succeed_once() {
    if !require_fuse() {
        return;
    }
    let mut server = TestServer::start();
    fs::write(server.export("f"), b"content of f").expect("write");
    let proxy = CutProxy::start(server.addr());
    let mount = TestMount::try_mount(&proxy.remote(), &[]).expect("mount through the proxy");
    let m = |p: &str| mount.join(p);
    fs::symlink_metadata(m("f")).expect("stat");

    // Run again, each would fail: the old name is gone, the new one taken.
    let (from, to) = (m("f"), m("g"));
    lose_answer_in_a_restart(&mut server, &proxy, "rename", move || fs::rename(from, to));
    assert_eq!(
        fs::read(server.export("g")).expect("renamed"),
        b"content of f"
    );
    assert!(!server.export("f").exists(), "the old name is still there");

    let dir = m("made");
    lose_answer_in_a_restart(&mut server, &proxy, "mkdir", move || fs::create_dir(dir));
    assert!(server.export("made").is_dir(), "the new directory");

    let path = m("new");
    lose_answer_in_a_restart(&mut server, &proxy, "create", move || {
        use std::io::Write;
        let mut f = fs::File::create_new(&path)?;
        f.write_all(b"written after the restart")?;
        f.sync_all()
    });
    assert_eq!(
        fs::read(server.export("new")).expect("created"),
        b"written after the restart"
    );
    let log = server.log();
    assert!(
        log.contains("took over"),
        "the restarted server did not take over the answers:\n{log}"
    );
}

/// `op` on the mount with the reply to its `kind` request lost, and then the reply to
/// its repeat lost too (a link that drops twice in a row): the mount sends it a third
/// time, with the same key, and `op` succeeds. Before, the second loss was `EIO`.
fn lose_two_answers_of<T: Send + 'static>(
    proxy: &CutProxy,
    kind: &str,
    op: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> T {
    let before = proxy.cuts();
    // Held after the first cut: the repeat waits until the second loss is armed.
    proxy.hold_after_cut();
    proxy.lose_reply_to(kind);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(op());
    });
    let first = poll_until(DEADLINE, || proxy.cuts() == before + 1);
    proxy.lose_reply_to(kind);
    proxy.release();
    assert!(first, "{kind}: no answer was lost");
    let r = rx
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("{kind}: hung"));
    let r = r.unwrap_or_else(|e| panic!("{kind} whose answer was lost twice: {e}"));
    assert_eq!(
        proxy.cuts(),
        before + 2,
        "{kind}: the repeat's answer was not lost"
    );
    r
}

#[test]
fn changes_whose_answer_was_lost_twice_succeed_once() {
    if !require_fuse() {
        return;
    }
    let server = TestServer::start();
    fs::write(server.export("f"), b"content of f").expect("write");
    let proxy = CutProxy::start(server.addr());
    let mount = TestMount::try_mount(&proxy.remote(), &[]).expect("mount through the proxy");
    let m = |p: &str| mount.join(p);
    fs::symlink_metadata(m("f")).expect("stat");

    let (from, to) = (m("f"), m("g"));
    lose_two_answers_of(&proxy, "rename", move || fs::rename(from, to));
    assert_eq!(
        fs::read(server.export("g")).expect("renamed"),
        b"content of f"
    );
    assert!(!server.export("f").exists(), "the old name is still there");

    let dir = m("made");
    lose_two_answers_of(&proxy, "mkdir", move || fs::create_dir(dir));
    assert!(server.export("made").is_dir(), "the new directory");

    let path = m("new");
    lose_two_answers_of(&proxy, "create", move || {
        use std::io::Write;
        let mut f = fs::File::create_new(&path)?;
        f.write_all(b"written after two losses")?;
        f.sync_all()
    });
    assert_eq!(
        fs::read(server.export("new")).expect("created"),
        b"written after two losses"
    );
}

/// `op` on the mount, with `server` started with `--die-at POINT`: once it died there,
/// `meanwhile` (what happens while it is down) and a restart without `--die-at`, on
/// the same address. Returns what `op` returned.
fn across_a_death(
    server: &mut TestServer,
    mount: &TestMount,
    point: &str,
    op: fn(&std::path::Path) -> std::io::Result<()>,
    meanwhile: impl FnOnce(&TestServer),
) -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let at = mount.path().to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(op(&at));
    });
    let died = poll_until(DEADLINE, || !server.is_running());
    if died {
        meanwhile(server);
        server.restart_without("--die-at");
    }
    assert!(died, "{point}: ferryd did not die there");
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("{point}: hung"))
}

/// `ferryd` dies inside a change (`--die-at`: `SIGKILL` once the change's `Begin` is
/// logged, before or after its system calls, before its answer is) and is started
/// again on its state folder: it looks at the change's names again (`ops::judge`, its
/// verdict logged). A change that ran is answered as done (a create's file is opened
/// again), one that never ran runs when the mount sends it again. So `mv`, an atomic
/// save's temp file, `mkdir`, `ln -s`, `ln`, `rm` and `rmdir` succeed, and each ran
/// once. Before the probes, every such repeat was answered `NotRemembered`: `EIO` (for
/// `rm`, answered ahead, at the directory's `fsync`), except that a change making a
/// name that was never made got through the mount's own fallback (sent again once a
/// lookup finds the name free).
#[test]
fn changes_a_server_died_in_succeed_once_after_its_restart() {
    if !require_fuse() {
        return;
    }
    type Op = fn(&std::path::Path) -> std::io::Result<()>;
    // (The export, then the mount.)
    type Check = fn(&std::path::Path, &std::path::Path);
    let save: Op = |m| {
        use std::io::Write;
        let mut f = fs::File::create_new(m.join("new"))?;
        f.write_all(b"written after the restart")?;
        f.sync_all()
    };
    let cases: [(&str, Op, Check); 7] = [
        (
            "rename",
            |m| fs::rename(m.join("doc.tmp"), m.join("doc")),
            |e, _| {
                assert_eq!(fs::read(e.join("doc")).expect("doc"), b"saved");
                assert!(!e.join("doc.tmp").exists(), "temp file left");
            },
        ),
        ("create", save, |e, _| {
            assert_eq!(
                fs::read(e.join("new")).expect("created"),
                b"written after the restart"
            );
        }),
        (
            "mkdir",
            |m| fs::create_dir(m.join("made")),
            |e, m| {
                assert!(e.join("made").is_dir());
                // The mount takes the new directory for neither empty nor watched:
                // what appears in it on the server shows.
                fs::write(e.join("made/x"), b"x").expect("write on the server");
                assert!(
                    poll_until(DEADLINE, || m.join("made/x").exists()),
                    "a file made on the server in the new directory never showed"
                );
            },
        ),
        (
            "symlink",
            |m| symlink("doc", m.join("ln")),
            |e, _| {
                assert_eq!(
                    fs::read_link(e.join("ln")).expect("symlink"),
                    std::path::Path::new("doc")
                );
            },
        ),
        (
            "link",
            |m| fs::hard_link(m.join("doc"), m.join("doc2")),
            |e, _| {
                assert_eq!(fs::metadata(e.join("doc")).expect("doc").nlink(), 2);
            },
        ),
        (
            "unlink",
            |m| {
                // Answered ahead: a failure would come at the directory's fsync.
                fs::remove_file(m.join("doc.tmp"))?;
                fs::File::open(m)?.sync_all()
            },
            |e, _| {
                assert!(!e.join("doc.tmp").exists());
            },
        ),
        (
            "rmdir",
            |m| fs::remove_dir(m.join("empty")),
            |e, _| {
                assert!(!e.join("empty").exists());
            },
        ),
    ];
    for (kind, op, check) in cases {
        for stage in ["before", "after"] {
            let point = format!("{stage}-{kind}");
            let mut server = TestServer::start_with(&["--die-at", &point]);
            fs::write(server.export("doc"), b"old").expect("write");
            fs::write(server.export("doc.tmp"), b"saved").expect("write");
            fs::create_dir(server.export("empty")).expect("mkdir");
            let mount = TestMount::try_mount(&server.remote(), &[]).expect("mount");
            for name in ["doc", "doc.tmp", "empty"] {
                fs::symlink_metadata(mount.join(name)).expect("stat");
            }
            let r = across_a_death(&mut server, &mount, &point, op, |_| {});
            r.unwrap_or_else(|e| {
                panic!("{point}: failed after the restart: {e}\n{}", server.log())
            });
            check(server.export_path(), mount.path());
            let log = server.log();
            assert!(
                log.contains(&format!("dying at {point}")),
                "{point}: died elsewhere:\n{log}"
            );
            let verdict = match stage {
                "before" => "0 had run, 1 had not run, 0 cannot be told",
                _ => "1 had run, 0 had not run, 0 cannot be told",
            };
            assert!(
                log.contains(verdict),
                "{point}: not judged \"{verdict}\":\n{log}"
            );
        }
    }
}

/// Changes whose answer nobody kept: `ferryd` dies in them, and the next one starts
/// without its state folder (lost with its tmpfs, say), so the mount's repeat gets no
/// answer and the mount looks at the names itself. A rename whose old name is free and
/// whose new name holds the renamed file, or a removal whose name is free, in the
/// directories they were in, is done: `mv`, `rmdir` and `rm` succeed, and the mount
/// shows the names as the server has them (the next save works). Before, they failed
/// with `EIO` (`rm` at the directory's `fsync`), and a stale entry for the old name
/// could make the next `> doc.tmp` fail with `ENOENT`. Names that show nothing (the
/// change never ran; a directory renamed away meanwhile) are still `EIO`.
#[test]
fn a_change_nobody_remembers_is_done_if_the_names_show_it() {
    if !require_fuse() {
        return;
    }
    type Op = fn(&std::path::Path) -> std::io::Result<()>;
    // (The export, then the mount.)
    type Check = fn(&std::path::Path, &std::path::Path);
    let rename: Op = |m| fs::rename(m.join("doc.tmp"), m.join("doc"));
    // An editor's save: the temp file written through the mount, then renamed.
    let save: Op = |m| {
        fs::write(m.join("doc.tmp"), b"saved")?;
        fs::rename(m.join("doc.tmp"), m.join("doc"))
    };
    let rmdir: Op = |m| fs::remove_dir(m.join("d/empty"));
    // What happens on the server while it is down.
    type Meanwhile = fn(&std::path::Path);
    let nothing: Meanwhile = |_| {};
    let cases: [(&str, Meanwhile, Op, bool, Check); 5] = [
        ("after-rename", nothing, save, true, |e, m| {
            assert!(!m.join("doc.tmp").exists(), "the old name is still shown");
            assert_eq!(fs::read(m.join("doc")).expect("read"), b"saved");
            // The next save: a new temp file, renamed over the document.
            fs::write(m.join("doc.tmp"), b"saved again").expect("write the next temp file");
            fs::rename(m.join("doc.tmp"), m.join("doc")).expect("the next rename");
            assert_eq!(fs::read(e.join("doc")).expect("read"), b"saved again");
        }),
        ("after-rmdir", nothing, rmdir, true, |e, m| {
            assert!(!m.join("d/empty").exists(), "the directory is still shown");
            assert!(!e.join("d/empty").exists());
        }),
        (
            "after-unlink",
            nothing,
            |m| {
                // Answered ahead: a failure would come at the directory's fsync.
                fs::remove_file(m.join("doc.tmp"))?;
                fs::File::open(m)?.sync_all()
            },
            true,
            |e, _| assert!(!e.join("doc.tmp").exists()),
        ),
        ("before-rename", nothing, rename, false, |e, m| {
            assert_eq!(fs::read(e.join("doc.tmp")).expect("read"), b"saved");
            assert_eq!(fs::read(m.join("doc")).expect("read"), b"old");
        }),
        (
            "before-rmdir",
            |e| fs::rename(e.join("d"), e.join("d2")).expect("rename on the server"),
            rmdir,
            false,
            |e, _| assert!(e.join("d2/empty").is_dir(), "removed after all"),
        ),
    ];
    for (point, while_down, op, done, check) in cases {
        let mut server = TestServer::start_with(&["--die-at", point]);
        fs::write(server.export("doc"), b"old").expect("write");
        fs::write(server.export("doc.tmp"), b"saved").expect("write");
        fs::create_dir_all(server.export("d/empty")).expect("mkdir");
        let mount = TestMount::try_mount(&server.remote(), &[]).expect("mount");
        let m = |p: &str| mount.join(p);
        // Known to the mount: its listings, the entries, their contents.
        fs::read_dir(mount.path()).expect("list").for_each(drop);
        fs::read_dir(m("d")).expect("list").for_each(drop);
        assert_eq!(fs::read(m("doc")).expect("read"), b"old");
        assert_eq!(fs::read(m("doc.tmp")).expect("read"), b"saved");
        let r = across_a_death(&mut server, &mount, point, op, |server| {
            let _ = fs::remove_dir_all(server.state_dir());
            while_down(server.export_path());
        });
        match done {
            true => r.unwrap_or_else(|e| panic!("{point}: {e}\n{}", server.log())),
            false => assert_eq!(
                r.map_err(|e| e.raw_os_error()),
                Err(Some(libc::EIO)),
                "{point}: names that show nothing"
            ),
        }
        assert!(
            !server.log().contains("took over"),
            "{point}: the restarted server knew the answer"
        );
        check(server.export_path(), mount.path());
    }
}

/// A `mkdir` the server died in, answered after its restart from its log: the new
/// process watches nothing in the directory, so the mount trusts its attributes no
/// longer than without events, and an entry made in it on the export shows in its
/// times and link count. (They stayed as the answer gave them for the 5-minute TTL.)
#[test]
fn a_directory_made_across_a_server_death_follows_the_export() {
    if !require_fuse() {
        return;
    }
    let mut server = TestServer::start_with(&["--die-at", "after-mkdir"]);
    let mount = TestMount::try_mount(&server.remote(), &[]).expect("mount");
    across_a_death(
        &mut server,
        &mount,
        "after-mkdir",
        |m| fs::create_dir(m.join("made")),
        |_| {},
    )
    .expect("mkdir across the death");
    let first = fs::metadata(mount.join("made")).expect("stat through the mount");
    fs::create_dir(server.export("made/inner")).expect("mkdir on the export");
    let on_export = fs::metadata(server.export("made")).expect("stat on the export");
    assert_ne!(first.nlink(), on_export.nlink());
    assert!(
        poll_until(DEADLINE, || fs::metadata(mount.join("made")).is_ok_and(
            |m| {
                (m.mtime(), m.mtime_nsec(), m.nlink())
                    == (on_export.mtime(), on_export.mtime_nsec(), on_export.nlink())
            }
        )),
        "the directory's times and link count through the mount stayed as answered"
    );
}
