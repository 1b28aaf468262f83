//! Raw TCP against `ferryd`: the handshake, then what a broken or hostile client sends
//! (bad magic, wrong version, oversized or truncated frames, garbage). The server must drop
//! that one connection and go on serving a fresh client and an existing mount. A connection
//! whose read waits on a hung disk must not hold up the others either.

use std::fs;
use std::time::Duration;

use ferry_common::codec::encode_body;
use ferry_common::proto::{
    FileKind, Hello, HelloReply, MAX_DIR_BATCH, PROTOCOL_VERSION, RelPath, Request, Response,
    ServerFrame,
};
use ferry_tests::wire::{RawConn, assert_healthy, name, open, rel};
use ferry_tests::{RemovedOnDrop, TestMount, TestServer, require_fuse, with_deadline};

const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server with a file in its export and, where FUSE exists, a mount that has read it.
struct Victim {
    mount: Option<TestMount>,
    server: TestServer,
}

impl Victim {
    fn new() -> Victim {
        let server = TestServer::start();
        fs::write(server.export("canary"), b"still here").expect("write canary");
        let mount = if std::path::Path::new("/dev/fuse").exists() {
            let m = TestMount::new(&server);
            assert_eq!(fs::read(m.join("canary")).expect("read"), b"still here");
            Some(m)
        } else {
            None
        };
        Victim { mount, server }
    }

    /// After the abuse: a new client is served, the mount still works (a fresh lookup and
    /// a fresh write go to the server), the server process is alive.
    #[track_caller]
    fn assert_unharmed(&mut self) {
        assert!(
            self.server.is_running(),
            "ferryd died:\n{}",
            self.server.log()
        );
        assert_healthy(self.server.addr());
        if let Some(m) = &self.mount {
            fs::write(m.join("after"), b"written after").expect("write through the mount");
            assert_eq!(
                fs::read(self.server.export("after")).expect("export"),
                b"written after"
            );
            assert_eq!(fs::read(m.join("canary")).expect("read"), b"still here");
        }
    }
}

#[track_caller]
fn assert_closed(c: &mut RawConn, what: &str) -> Vec<u8> {
    c.wait_closed(CLOSE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: the server did not close the connection: {e}"))
}

#[test]
fn handshake_and_basic_requests() {
    let server = TestServer::start();
    fs::write(server.export("f"), b"0123456789").expect("write");
    let (mut c, w) = RawConn::handshake(server.addr());
    assert_eq!(w.version, PROTOCOL_VERSION);
    assert!(!w.read_only);
    assert_eq!(w.root.kind, FileKind::Dir);
    assert!(w.max_io > 0);
    assert_eq!(c.call(Request::Ping), Ok(Response::Pong));
    let attr = match c.call(Request::Lookup {
        parent: RelPath::root(),
        name: name("f"),
    }) {
        Ok(Response::Attr(a)) => a,
        other => panic!("Lookup f: {other:?}"),
    };
    assert_eq!((attr.kind, attr.size), (FileKind::File, 10));
    assert_eq!(
        c.call(Request::Lookup {
            parent: RelPath::root(),
            name: name("missing")
        }),
        Err(libc::ENOENT)
    );
    let handle = match c.call(open("f", libc::O_RDONLY)) {
        Ok(Response::Opened { handle, .. }) => handle,
        other => panic!("Open f: {other:?}"),
    };
    assert_eq!(
        c.call(Request::Read {
            handle,
            offset: 3,
            len: 4
        }),
        Ok(Response::data(b"3456".to_vec()))
    );
    assert_eq!(c.call(Request::Release { handle }), Ok(Response::Ok));
    // Unknown handles and invalid paths are errors, not crashes.
    assert!(
        c.call(Request::Read {
            handle: 987_654,
            offset: 0,
            len: 1
        })
        .is_err()
    );
    assert_eq!(
        c.call(Request::GetAttr {
            path: rel("../etc"),
            handle: None
        }),
        Err(libc::EINVAL)
    );
    assert_eq!(
        c.call(Request::Lookup {
            parent: RelPath::root(),
            name: name("a/b")
        }),
        Err(libc::EINVAL)
    );
    assert_eq!(
        c.call(Request::Lookup {
            parent: RelPath::root(),
            name: name("..")
        }),
        Err(libc::EINVAL)
    );
    assert_eq!(
        c.call(Request::GetAttr {
            path: rel("/etc"),
            handle: None
        }),
        Err(libc::EINVAL)
    );
}

/// Requests in flight at once come back matched by id.
#[test]
fn pipelined_requests_are_answered_by_id() {
    let server = TestServer::start();
    for i in 0..20 {
        fs::write(server.export(format!("f{i}")), vec![b'x'; i]).expect("write");
    }
    let (mut c, _) = RawConn::handshake(server.addr());
    let mut ids = std::collections::HashMap::new();
    for i in 0..20usize {
        let id = c
            .send_request(Request::GetAttr {
                path: rel(&format!("f{i}")),
                handle: None,
            })
            .expect("send");
        ids.insert(id, i);
        c.send_request(Request::Ping).expect("send ping");
    }
    let mut sizes = 0;
    for _ in 0..40 {
        match c.read_server_frame().expect("reply") {
            ServerFrame::Reply {
                id,
                result: Ok(Response::Attr(a)),
            } => {
                let i = ids
                    .remove(&id)
                    .unwrap_or_else(|| panic!("unexpected reply id {id}"));
                assert_eq!(
                    a.size, i as u64,
                    "reply {id} carries another file's attributes"
                );
                sizes += 1;
            }
            ServerFrame::Reply {
                result: Ok(Response::Pong),
                ..
            } => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(sizes, 20);
    // A directory listing in batches.
    let handle = match c.call(Request::OpenDir {
        path: RelPath::root(),
    }) {
        Ok(Response::Opened { handle, .. }) => handle,
        other => panic!("OpenDir: {other:?}"),
    };
    let mut names = Vec::new();
    loop {
        match c.call(Request::ReadDir {
            handle,
            max_entries: 7.min(MAX_DIR_BATCH),
        }) {
            Ok(Response::Dir { entries, eof }) => {
                assert!(entries.len() <= 7, "batch larger than asked");
                names.extend(
                    entries
                        .into_iter()
                        .map(|e| String::from_utf8_lossy(&e.name.0).into_owned()),
                );
                if eof {
                    break;
                }
            }
            other => panic!("ReadDir: {other:?}"),
        }
    }
    names.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn bad_magic_closes_the_connection() {
    let mut v = Victim::new();
    let mut c = RawConn::connect(v.server.addr());
    let mut hello = Hello::new("bad magic", 0);
    hello.magic = *b"NOTFERRY";
    c.send_hello(&hello).expect("send");
    let got = assert_closed(&mut c, "bad magic");
    if got.len() >= 4 {
        // Whatever it said, it must not be a welcome.
        let body = &got[4..];
        if let Ok(HelloReply::Welcome(_)) = ferry_common::codec::decode_body::<HelloReply>(body) {
            panic!("bad magic was welcomed");
        }
    }
    v.assert_unharmed();
}

#[test]
fn wrong_version_is_refused_with_a_reason() {
    let mut v = Victim::new();
    let mut c = RawConn::connect(v.server.addr());
    let mut hello = Hello::new("from the future", 0);
    hello.version = PROTOCOL_VERSION + 98;
    c.send_hello(&hello).expect("send");
    match c.read_hello_reply() {
        Ok(HelloReply::Refused { version, reason }) => {
            assert_eq!(
                version, PROTOCOL_VERSION,
                "Refused names the server's version"
            );
            assert!(
                reason.to_lowercase().contains("version"),
                "the reason does not mention the version: {reason:?}"
            );
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_closed(&mut c, "after Refused");
    v.assert_unharmed();
}

#[test]
fn oversized_length_closes_the_connection() {
    let mut v = Victim::new();
    // Before the handshake...
    let mut c = RawConn::connect(v.server.addr());
    c.write_raw(&u32::MAX.to_be_bytes()).expect("send header");
    assert_closed(&mut c, "0xFFFFFFFF before Hello");
    // ...and after it, followed by some bytes.
    let (mut c, _) = RawConn::handshake(v.server.addr());
    let mut bytes = u32::MAX.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0xAB; 1024]);
    c.write_raw(&bytes).expect("send header");
    assert_closed(&mut c, "0xFFFFFFFF after Hello");
    // Just over the frame limit.
    let (mut c, _) = RawConn::handshake(v.server.addr());
    c.write_raw(&((ferry_common::proto::MAX_FRAME as u32) + 1).to_be_bytes())
        .expect("send header");
    assert_closed(&mut c, "MAX_FRAME + 1");
    v.assert_unharmed();
}

#[test]
fn truncated_frame_then_close() {
    let mut v = Victim::new();
    let (mut c, _) = RawConn::handshake(v.server.addr());
    let body = encode_body(&ferry_common::proto::RequestFrame {
        id: 1,
        caller: c.caller,
        request: Request::GetAttr {
            path: rel("canary"),
            handle: None,
        },
        once: None,
    })
    .expect("encode");
    let mut bytes = (body.len() as u32 + 100).to_be_bytes().to_vec();
    bytes.extend_from_slice(&body);
    c.write_raw(&bytes)
        .expect("send a frame shorter than announced");
    c.shutdown_write();
    assert_closed(&mut c, "truncated frame then end of stream");
    // The same before the handshake completes.
    let mut c = RawConn::connect(v.server.addr());
    let hello = encode_body(&Hello::new("truncated", 0)).expect("encode");
    let mut bytes = (hello.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&hello[..hello.len() / 2]);
    c.write_raw(&bytes).expect("send half a Hello");
    c.shutdown_write();
    assert_closed(&mut c, "half a Hello then end of stream");
    v.assert_unharmed();
}

#[test]
fn garbage_closes_the_connection() {
    let mut v = Victim::new();
    let mut rng = ferry_tests::rng::Rng::new(0x6a7ba6e);
    // Unframed garbage instead of a Hello (an HTTP request, say).
    let mut c = RawConn::connect(v.server.addr());
    c.write_raw(b"GET / HTTP/1.1\r\nHost: ferry\r\n\r\n")
        .expect("send");
    assert_closed(&mut c, "HTTP request");
    // A well-framed Hello-sized body of random bytes.
    let mut c = RawConn::connect(v.server.addr());
    c.write_frame(&rng.bytes(40)).expect("send");
    assert_closed(&mut c, "random Hello body");
    // After a good handshake: a frame whose body is not a request.
    let (mut c, _) = RawConn::handshake(v.server.addr());
    c.write_frame(&[0xff; 64]).expect("send");
    assert_closed(&mut c, "garbage request body");
    // A valid request with trailing bytes inside its frame.
    let (mut c, _) = RawConn::handshake(v.server.addr());
    let mut body = encode_body(&ferry_common::proto::RequestFrame {
        id: 9,
        caller: c.caller,
        request: Request::Ping,
        once: None,
    })
    .expect("encode");
    body.extend_from_slice(b"junk");
    c.write_frame(&body).expect("send");
    let got = assert_closed(&mut c, "request with trailing bytes");
    assert!(
        got.is_empty(),
        "the malformed request was answered: {got:?}"
    );
    // An empty frame.
    let (mut c, _) = RawConn::handshake(v.server.addr());
    c.write_frame(&[]).expect("send");
    assert_closed(&mut c, "empty frame");
    v.assert_unharmed();
}

/// Many clients abusing the server at once, a mount in use meanwhile.
#[test]
fn concurrent_abuse_leaves_the_server_serving() {
    if !require_fuse() {
        return;
    }
    let mut v = Victim::new();
    let addr = v.server.addr();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = ferry_tests::rng::Rng::new(t);
                for _ in 0..10 {
                    let mut c = RawConn::connect(addr);
                    let n = rng.range(1, 200) as usize;
                    let _ = c.write_raw(&rng.bytes(n));
                    c.shutdown_write();
                    let _ = c.wait_closed(CLOSE_TIMEOUT);
                }
            })
        })
        .collect();
    let m = v.mount.as_ref().expect("mount");
    for i in 0..50 {
        let p = m.join(format!("during-{i}"));
        fs::write(&p, format!("{i}")).expect("write during the abuse");
        assert_eq!(fs::read(&p).expect("read"), format!("{i}").as_bytes());
    }
    for t in threads {
        t.join().expect("abuser thread");
    }
    v.assert_unharmed();
}

/// SIGCONT to a process when dropped: a stopped server must go on before the mounts over
/// it are taken down, also when an assertion failed.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        ferry_tests::sys::kill(self.0, libc::SIGCONT);
    }
}

/// A server under test (`--threads 1`) whose export holds a "disk" that can hang: a
/// ferry mount over a second server, which `bottom.signal(SIGSTOP)` freezes.
struct HungDisk {
    // (In drop order: the top server stops before the mount inside its export goes.)
    top: TestServer,
    disk: TestMount,
    bottom: TestServer,
    /// The mount's name in the top server's export.
    sub: String,
    /// Last: the top server's export, which it could not remove while the mount was
    /// in it.
    _export: RemovedOnDrop,
}

impl HungDisk {
    /// `None` without FUSE. `bottom` may prepare its export first.
    fn new(bottom_export: impl FnOnce(&TestServer)) -> Option<HungDisk> {
        if !require_fuse() {
            return None;
        }
        let bottom = TestServer::start();
        bottom_export(&bottom);
        let top_export = ferry_tests::temp_dir("export");
        let disk_dir = tempfile::Builder::new()
            .prefix("disk")
            .tempdir_in(top_export.path())
            .expect("mountpoint");
        let sub = disk_dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name")
            .to_string();
        // A long timeout: the hung disk stays hung for the whole test. Mounted before
        // the top server starts, which then finds it in the mount table at once (how
        // it follows later mounts: `mounts::tests`).
        let disk = TestMount::try_mount_on(disk_dir, &bottom.remote(), &["--timeout", "120"], None)
            .unwrap_or_else(|e| panic!("{e}"));
        let export = top_export.path().to_path_buf();
        let top = TestServer::start_on(top_export, &["--threads", "1"]);
        Some(HungDisk {
            top,
            disk,
            bottom,
            sub,
            _export: RemovedOnDrop(export),
        })
    }

    /// Freeze the disk until the guard drops.
    fn hang(&self) -> Resume {
        let resume = Resume(self.bottom.pid());
        self.bottom.signal(libc::SIGSTOP);
        resume
    }

    /// Another client is welcomed and its ping answered within 5 s.
    fn assert_others_served(&self, while_: &str) {
        let addr = self.top.addr();
        let other = with_deadline(std::time::Duration::from_secs(5), move || {
            let (mut c2, _) = RawConn::handshake(addr);
            c2.call(Request::Ping)
        });
        assert_eq!(
            other,
            Some(Ok(Response::Pong)),
            "another client while {while_} (None: no answer in 5 s)\n--- ferryd ---\n{}",
            self.top.log()
        );
    }
}

/// A small read of a file on a hung disk under the export waits for that disk, but
/// another client is welcomed and its ping answered meanwhile, even with one request
/// thread (`--threads 1`, where the small read runs on the connection's own task), and
/// the read gets its bytes once the disk is back.
#[test]
fn a_read_waiting_on_a_hung_disk_holds_up_only_its_connection() {
    const AT: u64 = 200 << 20;
    let Some(h) = HungDisk::new(|bottom| {
        // None of its bytes read through the mount over it: reading them needs the server.
        let f = fs::File::create(bottom.export("big")).expect("create");
        f.set_len(256 << 20).expect("set_len");
        std::os::unix::fs::FileExt::write_all_at(&f, b"hung", AT).expect("write");
    }) else {
        return;
    };
    let (mut c1, _) = RawConn::handshake(h.top.addr());
    let handle = match c1.call(open(&format!("{}/big", h.sub), libc::O_RDONLY)) {
        Ok(Response::Opened { handle, .. }) => handle,
        other => panic!("Open {}/big: {other:?}", h.sub),
    };
    let resume = h.hang();
    let id = c1
        .send_request(Request::Read {
            handle,
            offset: AT,
            len: 4096,
        })
        .expect("send Read");
    h.assert_others_served("a read waits on a hung disk");
    drop(resume);
    match c1.reply_to(id) {
        Ok(Response::Data(d)) => assert_eq!(&d[..4], b"hung", "the read's bytes"),
        other => panic!("the read once the disk is back: {other:?}"),
    }
}

/// Lookups and attributes run on the connection's task (they take microseconds on the
/// export's disk), but not those that reach into another filesystem mounted beneath
/// the export: a lookup in a hung mount waits on a request thread, and the server goes
/// on serving others (one runtime thread: `--threads 1`).
#[test]
fn a_lookup_in_a_hung_mount_holds_up_only_its_connection() {
    let Some(h) = HungDisk::new(|_| {}) else {
        return;
    };
    let (mut c1, _) = RawConn::handshake(h.top.addr());
    let resume = h.hang();
    // A name the mount over the stopped server has never seen: it must ask that server.
    let id = c1
        .send_request(Request::Lookup {
            parent: rel(&h.sub),
            name: name("never-seen"),
        })
        .expect("send Lookup");
    h.assert_others_served("a lookup waits on a hung mount");
    drop(resume);
    assert_eq!(
        c1.reply_to(id),
        Err(libc::ENOENT),
        "the lookup once the mount is back"
    );
}

/// A listing of the directory a hung mount sits in answers at once: the mount point's
/// attributes are what the kernel has cached of it, not asked of the hung filesystem.
/// (The kernel's copy of the mount's root is made stale first: a change on its
/// server's disk, whose event makes the mount drop it; then the mount's own daemon is
/// stopped, so a plain stat of its root waits.) A lookup of the mount point itself
/// does wait, on the pool: other clients are served meanwhile.
#[test]
fn a_hung_mount_point_holds_up_neither_its_parents_listing_nor_other_clients() {
    let Some(h) = HungDisk::new(|_| {}) else {
        return;
    };
    let events = || h.disk.stats().get_or_zero("events_received");
    assert!(
        ferry_tests::poll_until(Duration::from_secs(10), || h
            .disk
            .stats()
            .flag("events_live")),
        "the mount's event stream did not come up"
    );
    // The mount holds its root's listing: the server tells it of changes there.
    assert_eq!(fs::read_dir(h.disk.path()).expect("list").count(), 0);
    let before = events();
    fs::write(h.bottom.export("changed"), b"x").expect("write on the disk's server");
    assert!(
        ferry_tests::poll_until(Duration::from_secs(10), || events() > before),
        "the mount never heard of the change"
    );
    let (mut c1, _) = RawConn::handshake(h.top.addr());
    let daemons = h.disk.daemon_pids();
    assert!(!daemons.is_empty(), "the mount's daemon");
    let _resume: Vec<Resume> = daemons.iter().map(|&pid| Resume(pid)).collect();
    for &pid in &daemons {
        ferry_tests::sys::kill(pid, libc::SIGSTOP);
    }
    let addr = h.top.addr();
    let listed = with_deadline(Duration::from_secs(5), move || {
        let (mut c, _) = RawConn::handshake(addr);
        c.call(Request::ListDir {
            path: rel(""),
            max_entries: 100,
            speculative: false,
        })
    });
    let names: Vec<String> = match listed {
        Some(Ok(Response::Listing { entries, .. })) => entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name.0).into_owned())
            .collect(),
        other => panic!(
            "listing the hung mount's parent (None: no answer in 5 s): {other:?}\n\
             --- ferryd ---\n{}",
            h.top.log()
        ),
    };
    assert_eq!(
        names,
        std::slice::from_ref(&h.sub),
        "the top export's entries"
    );
    // Its own lookup waits on the pool; the connection's other requests too, but
    // other clients are served.
    let id = c1
        .send_request(Request::Lookup {
            parent: rel(""),
            name: name(&h.sub),
        })
        .expect("send Lookup");
    h.assert_others_served("a lookup of a hung mount point waits");
    drop(_resume);
    assert!(
        matches!(c1.reply_to(id), Ok(Response::Attr(_))),
        "the lookup of the mount point once its server is back"
    );
}

/// Files open in a mount beneath the export are closed off the request threads: a
/// `Release`, and the closes of a connection that ends with such files open, wait for
/// the mount's daemon (FUSE sends a FLUSH on every close) while the server goes on
/// serving other clients (one runtime thread: `--threads 1`).
#[test]
fn files_open_in_a_hung_mount_are_closed_off_the_request_threads() {
    let Some(h) = HungDisk::new(|bottom| {
        fs::write(bottom.export("f"), b"data").expect("write");
    }) else {
        return;
    };
    let path = format!("{}/f", h.sub);
    let opened = |c: &mut RawConn| match c.call(open(&path, libc::O_RDWR)) {
        Ok(Response::Opened { handle, .. }) | Ok(Response::OpenedWithData { handle, .. }) => handle,
        other => panic!("Open {path}: {other:?}"),
    };
    let (mut c1, _) = RawConn::handshake(h.top.addr());
    let (mut c2, _) = RawConn::handshake(h.top.addr());
    let released = opened(&mut c1);
    opened(&mut c2);
    // The mount's own daemon stops: closes of its files wait for it.
    let daemons = h.disk.daemon_pids();
    assert!(!daemons.is_empty(), "the mount's daemon");
    let _resume: Vec<Resume> = daemons.iter().map(|&pid| Resume(pid)).collect();
    for &pid in &daemons {
        ferry_tests::sys::kill(pid, libc::SIGSTOP);
    }
    let id = c1
        .send_request(Request::Release { handle: released })
        .expect("send Release");
    h.assert_others_served("a release waits on a hung mount");
    // A connection that ends with a file open there.
    drop(c2);
    h.assert_others_served("a connection's files in a hung mount are closed");
    drop(_resume);
    assert_eq!(c1.reply_to(id), Ok(Response::Ok), "the release");
}
