//! Waiting without guessing: poll a condition until a deadline, or run a call that may
//! block forever (a FUSE op against a dead server) on a thread and give up on it after a
//! deadline. Nothing sleeps a fixed time hoping something happened meanwhile.

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Polls `cond` until it returns true or `timeout` passes; returns whether it did.
/// The interval starts at 2 ms and doubles up to 100 ms.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(2);
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(interval.min(deadline - now));
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}

/// [`poll_until`] that panics with `what` when the deadline passes.
#[track_caller]
pub fn wait_for(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    if !poll_until(timeout, cond) {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Runs `f` on its own thread; `Some(result)` if it finished within `timeout`, `None` if
/// not (the thread is then left behind, blocked; the mount's cleanup unblocks it).
pub fn with_deadline<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("with_deadline".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawning a thread");
    match rx.recv_timeout(timeout) {
        Ok(v) => Some(v),
        Err(mpsc::RecvTimeoutError::Timeout) => None,
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the call run with a deadline panicked")
        }
    }
}
