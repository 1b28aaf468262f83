//! The `ferryd` binary itself: usage errors, the address line, signals.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

fn ferryd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferryd"));
    cmd.stdin(Stdio::null());
    cmd
}

/// Wait for the child to exit, polling until the deadline.
fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("ferryd did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [&[][..], &["--bogus", "/tmp"][..], &["a", "b"][..]] {
        let out = ferryd().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "args {args:?}");
    }
}

#[test]
fn a_missing_or_non_directory_export_exits_1_with_one_line() {
    let dir = tempfile::TempDir::new().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    for path in [dir.path().join("missing"), file] {
        let out = ferryd()
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn serves_then_exits_0_on_sigterm() {
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join("f"), b"served").unwrap();
    let mut child = ferryd()
        .args(["--listen", "127.0.0.1:0", "--read-only"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env("RUST_LOG", "debug")
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ferryd: serving /"), "{line}");
    let addr: SocketAddr = line.split_whitespace().last().unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = Client::connect(addr, 0).await;
        assert!(c.welcome.read_only);
        let (h, _) = c.open("f", libc::O_RDONLY).await.unwrap();
        assert_eq!(c.read(h, 0, 100).await.unwrap(), b"served");
        assert_eq!(c.mkdir("", "d").await, Err(libc::EROFS));
    });
    // SAFETY: plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}
