//! Rough throughput numbers, not run by default: `cargo test --release -p ferry-server
//! -- --ignored --nocapture perf`.

use std::time::Instant;

use ferry_common::*;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn perf_getattr_and_read() {
    let server = Server::start().await;
    std::fs::write(server.root().join("f"), vec![1u8; 64 << 20]).unwrap();
    let mut c = server.client().await;
    let n = 20_000;
    let t = Instant::now();
    for _ in 0..n {
        c.getattr("f").await.unwrap();
    }
    let e = t.elapsed();
    println!("sequential getattr: {:?} per call", e / n);
    for depth in [16u32, 128] {
        let t = Instant::now();
        let mut sent = 0;
        let mut got = 0;
        while got < n {
            while sent < n && sent - got < depth {
                c.send(Request::GetAttr {
                    path: p("f"),
                    handle: None,
                })
                .await;
                sent += 1;
            }
            c.recv().await.unwrap().1.unwrap();
            got += 1;
        }
        let e = t.elapsed();
        println!(
            "getattr, {depth} in flight: {:.0}/s",
            n as f64 / e.as_secs_f64()
        );
    }
    let (h, _) = c.open("f", libc::O_RDONLY).await.unwrap();
    let chunk = 1u32 << 20;
    let t = Instant::now();
    let mut sent = 0u64;
    let mut got = 0u64;
    let total = 64;
    while got < total {
        while sent < total && sent - got < 8 {
            c.send(Request::Read {
                handle: h,
                offset: sent * chunk as u64,
                len: chunk,
            })
            .await;
            sent += 1;
        }
        c.recv().await.unwrap().1.unwrap();
        got += 1;
    }
    let e = t.elapsed();
    println!(
        "read 1 MiB x8 in flight: {:.0} MiB/s",
        total as f64 / e.as_secs_f64()
    );
}
