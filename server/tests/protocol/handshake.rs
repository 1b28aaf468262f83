//! Handshake: welcome contents, refusals, malformed hellos.

use ferry_common::codec::{decode_body, encode_body};
use ferry_common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::*;

#[tokio::test]
async fn welcome_describes_the_export() {
    let server = Server::start().await;
    let c = Client::connect(server.addr, caps::CALLER_CREDS | caps::EVENTS | (1 << 40)).await;
    let w = &c.welcome;
    assert_eq!(w.version, PROTOCOL_VERSION);
    // Intersection: unknown bits are dropped.
    assert_eq!(w.capabilities, caps::CALLER_CREDS | caps::EVENTS);
    assert_eq!(w.max_io, MAX_IO);
    assert!(!w.read_only);
    assert_eq!(w.root.kind, FileKind::Dir);
    let c2 = Client::connect(server.addr, 0).await;
    assert_eq!(c2.welcome.capabilities, 0);
    server.stop().await;
}

#[tokio::test]
async fn export_id_is_stable_across_restarts_and_ports() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        // A new export and listener each time: a restart on another port.
        let export = std::sync::Arc::new(ferry_server::Export::open(dir.path(), false).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ferry_server::run(listener, export, async move {
            let _ = stopped.await;
        }));
        ids.push(Client::connect(addr, 0).await.welcome.export_id);
        let _ = stop.send(());
        task.await.unwrap();
    }
    assert_eq!(ids[0], ids[1]);
    let other = Server::start().await;
    assert_ne!(other.client().await.welcome.export_id, ids[0]);
}

#[tokio::test]
async fn read_only_is_announced() {
    let server = Server::start_with(true).await;
    let c = server.client().await;
    assert!(c.welcome.read_only);
}

#[tokio::test]
async fn bad_magic_closes_and_others_still_work() {
    let server = Server::start().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut hello = Hello::new("bad", 0);
    hello.magic = *b"NOTFERRY";
    let reply = raw_handshake(&mut s, &encode_body(&hello).unwrap()).await;
    assert!(reply.is_none(), "bad magic must get no reply");
    let mut c = server.client().await;
    assert_eq!(c.call(Request::Ping).await, Ok(Response::Pong));
}

#[tokio::test]
async fn other_version_is_refused_with_a_reason() {
    let server = Server::start().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut hello = Hello::new("future", 0);
    hello.version = PROTOCOL_VERSION + 1;
    let mut body = encode_body(&hello).unwrap();
    // A future Hello may carry more fields: the refusal must not depend on decoding them.
    body.extend_from_slice(b"extra fields of a later version");
    let reply = raw_handshake(&mut s, &body).await.expect("a refusal");
    match decode_body::<HelloReply>(&reply).unwrap() {
        HelloReply::Refused { version, reason } => {
            assert_eq!(version, PROTOCOL_VERSION);
            assert_eq!(
                reason,
                format!(
                    "protocol version mismatch: server speaks {PROTOCOL_VERSION}, client speaks {}",
                    PROTOCOL_VERSION + 1
                )
            );
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(closed_by_server(&mut s).await);
    let mut c = server.client().await;
    assert_eq!(c.call(Request::Ping).await, Ok(Response::Pong));
}

#[tokio::test]
async fn garbage_and_oversized_hellos_are_dropped() {
    let server = Server::start().await;
    for bytes in [
        &u32::MAX.to_be_bytes()[..],
        &[0, 0, 0, 3, 1, 2, 3][..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        assert!(closed_by_server(&mut s).await, "input {bytes:?}");
    }
    let mut c = server.client().await;
    assert_eq!(c.call(Request::Ping).await, Ok(Response::Pong));
}

#[tokio::test]
async fn requests_pipelined_behind_the_hello_are_served() {
    let server = Server::start().await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let hello = encode_body(&Hello::new("eager", 0)).unwrap();
    let ping = encode_body(&RequestFrame {
        id: 42,
        caller: Caller::default(),
        request: Request::Ping,
        once: None,
    })
    .unwrap();
    let mut bytes = raw_frame(&hello).to_vec();
    bytes.extend_from_slice(&raw_frame(&ping));
    s.write_all(&bytes).await.unwrap();
    let welcome = read_raw_frame(&mut s).await.unwrap();
    assert!(matches!(
        decode_body::<HelloReply>(&welcome).unwrap(),
        HelloReply::Welcome(_)
    ));
    let reply = read_raw_frame(&mut s).await.unwrap();
    assert_eq!(
        decode_body::<ServerFrame>(&reply).unwrap(),
        ServerFrame::Reply {
            id: 42,
            result: Ok(Response::Pong)
        }
    );
}
