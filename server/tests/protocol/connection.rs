//! Connection behavior: concurrency, malformed frames, isolation, shutdown.

use std::collections::HashMap;

use ferry_common::*;
use tokio::io::AsyncWriteExt;

use crate::harness::*;

/// Checks the reply a request must get.
type Check = Box<dyn Fn(&Result<Response, i32>) -> bool>;

async fn make_file(c: &mut Client, name: &str, data: &[u8]) -> u64 {
    let (h, _) = c.create("", name, 0o644, libc::O_RDWR).await.unwrap();
    assert_eq!(c.write(h, 0, data).await.unwrap() as usize, data.len());
    h
}

#[tokio::test]
async fn many_requests_in_flight_each_get_their_own_reply() {
    let server = Server::start().await;
    let mut c = server.client().await;
    let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let h = make_file(&mut c, "big", &data).await;
    // More requests than the per-connection in-flight limit, of mixed kinds.
    let mut expected = HashMap::new();
    for i in 0..600u64 {
        let (req, check): (Request, Check) = match i % 4 {
            0 => {
                let off = (i * 1000) % (data.len() as u64 - 4096);
                let want = data[off as usize..off as usize + 4096].to_vec();
                (
                    Request::Read {
                        handle: h,
                        offset: off,
                        len: 4096,
                    },
                    Box::new(move |r| r == &Ok(Response::data(want.clone()))),
                )
            }
            1 => (Request::Ping, Box::new(|r| r == &Ok(Response::Pong))),
            2 => (
                Request::Lookup {
                    parent: p(""),
                    name: n("missing"),
                },
                Box::new(|r| r == &Err(libc::ENOENT)),
            ),
            _ => (
                Request::GetAttr {
                    path: p("big"),
                    handle: None,
                },
                Box::new(|r| matches!(r, Ok(Response::Attr(a)) if a.size == 1024 * 1024)),
            ),
        };
        let id = c.send(req).await;
        expected.insert(id, check);
    }
    while !expected.is_empty() {
        let (id, result) = c.recv().await.expect("all replies");
        let check = expected
            .remove(&id)
            .expect("a reply to a request in flight, once");
        assert!(check(&result), "reply {id}: {result:?}");
    }
}

#[tokio::test]
async fn malformed_frames_close_only_that_connection() {
    let server = Server::start().await;
    let mut bystander = server.client().await;
    for bytes in [
        u32::MAX.to_be_bytes().to_vec(),        // oversized length header
        raw_frame(&[0xff; 40]).to_vec(),        // garbage body
        raw_frame(&[1, 0, 0, 200, 7]).to_vec(), // unknown request variant
        ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec(), // just over the limit
    ] {
        let mut bad = server.client().await;
        bad.framed.get_mut().write_all(&bytes).await.unwrap();
        assert!(
            bad.recv().await.is_none(),
            "connection closed after {bytes:?}"
        );
        assert_eq!(bystander.call(Request::Ping).await, Ok(Response::Pong));
    }
    let mut fresh = server.client().await;
    assert_eq!(fresh.call(Request::Ping).await, Ok(Response::Pong));
}

#[tokio::test]
async fn handles_belong_to_their_connection() {
    let server = Server::start().await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    let h = make_file(&mut a, "f", b"abc").await;
    assert_eq!(b.read(h, 0, 3).await, Err(libc::EBADF));
    assert_eq!(a.read(h, 0, 3).await.unwrap(), b"abc");
}

#[tokio::test]
async fn shutdown_answers_requests_in_flight_then_closes() {
    let mut server = Server::start().await;
    let mut c = server.client().await;
    let data = vec![7u8; MAX_IO as usize];
    let h = make_file(&mut c, "f", &data).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            c.send(Request::Read {
                handle: h,
                offset: 0,
                len: MAX_IO,
            })
            .await,
        );
    }
    server.begin_stop();
    // Every request the server had read before stopping is answered; the rest are not,
    // and then the connection closes.
    let mut answered = 0;
    while let Some((id, r)) = c.recv().await {
        assert!(ids.contains(&id));
        assert_eq!(r, Ok(Response::data(data.clone())));
        answered += 1;
    }
    assert!(answered <= ids.len());
    let task = server.task.take().unwrap();
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn an_idle_connection_does_not_block_shutdown() {
    let server = Server::start().await;
    let _idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut active = server.client().await;
    assert_eq!(active.call(Request::Ping).await, Ok(Response::Pong));
    server.stop().await;
    assert!(active.recv().await.is_none());
}

/// With tokio's clock paused, time jumps to the next timer whenever the runtime is idle:
/// the server's 10 s handshake timeout fires without the test waiting for it.
#[tokio::test(start_paused = true)]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let server = Server::start().await;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(
        ferry_server::conn::HANDSHAKE_TIMEOUT * 6,
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .expect("closed before the test deadline");
    assert!(matches!(read, Ok(0) | Err(_)));
    assert!(started.elapsed() >= ferry_server::conn::HANDSHAKE_TIMEOUT);
    let mut c = server.client().await;
    assert_eq!(c.call(Request::Ping).await, Ok(Response::Pong));
}

/// xorshift64*: a tiny deterministic generator, so a failure reproduces exactly.
#[tokio::test]
async fn mutated_requests_never_hurt_the_server() {
    let server = Server::start().await;
    std::fs::create_dir(server.root().join("d")).unwrap();
    std::fs::write(server.root().join("d/f"), b"data").unwrap();
    std::os::unix::fs::symlink("../outside", server.root().join("out")).unwrap();
    let samples = [
        Request::Lookup {
            parent: p("d"),
            name: n("f"),
        },
        Request::GetAttr {
            path: p("out/secret"),
            handle: None,
        },
        Request::Open {
            path: p("d/f"),
            flags: libc::O_RDWR,
            inline_max: 4096,
            staged: true,
        },
        Request::Read {
            handle: 1,
            offset: 0,
            len: 4096,
        },
        Request::Write {
            handle: 1,
            offset: 2,
            data: b"xyz".to_vec().into(),
        },
        Request::Rename {
            parent: p("d"),
            name: n("f"),
            new_parent: p("out"),
            new_name: n("g"),
            flags: 0,
        },
        Request::SetAttr {
            path: p("out"),
            handle: None,
            set: SetAttr {
                mode: Some(0o777),
                size: Some(0),
                ..Default::default()
            },
        },
        Request::ReadDir {
            handle: 2,
            max_entries: 100,
        },
        Request::Commit { handle: 1 },
        Request::GetXattr {
            path: p("out/secret"),
            name: b"user.x".to_vec(),
            size: 64,
        },
        Request::SetXattr {
            path: p("out/secret"),
            name: b"user.x".to_vec(),
            value: b"v".to_vec(),
            flags: 0,
        },
        Request::ListXattr {
            path: p("d/f"),
            size: 0,
        },
        Request::RemoveXattr {
            path: p("out"),
            name: b"user.x".to_vec(),
        },
    ];
    let before = std::fs::read(server.outside().join("secret")).unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut c = server.client().await;
    // Open a file and a directory so that handle numbers in mutations hit real handles.
    c.open("d/f", libc::O_RDWR).await.unwrap();
    c.call(Request::OpenDir { path: p("d") }).await.unwrap();
    for round in 0..400 {
        let req = samples[round % samples.len()].clone();
        let mut body = ferry_common::codec::encode_body(&RequestFrame {
            id: round as u64,
            caller: Caller::default(),
            request: req,
            once: None,
        })
        .unwrap();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(body.len());
            body[i] = rng.next() as u8;
        }
        if rng.below(4) == 0 {
            body.truncate(rng.below(body.len()));
        }
        c.framed
            .get_mut()
            .write_all(&raw_frame(&body))
            .await
            .unwrap();
        // Either a reply (the mutation still decoded) or the connection closes.
        if c.recv().await.is_none() {
            c = server.client().await;
            c.open("d/f", libc::O_RDWR).await.unwrap();
            c.call(Request::OpenDir { path: p("d") }).await.unwrap();
        }
    }
    assert_eq!(
        std::fs::read(server.outside().join("secret")).unwrap(),
        before
    );
    assert_eq!(std::fs::read_dir(server.outside()).unwrap().count(), 1);
    let mut fresh = server.client().await;
    assert_eq!(fresh.call(Request::Ping).await, Ok(Response::Pong));
}
