//! Harness for ferry's integration tests: real `ferryd` processes, real FUSE mounts made
//! by `ferry mount`, real commands run against them.
//!
//! - [`server::TestServer`]: a `ferryd` on `127.0.0.1:0` exporting a fresh temp dir.
//! - [`mount::TestMount`]: a `ferry mount` of a server on a fresh temp dir.
//! - [`data`]: write-and-close with the close checked; content comparison.
//! - [`process`]: run a command with a timeout (killed when it runs over).
//! - [`wait`]: poll a condition under a deadline; run a blocking call with a deadline.
//! - [`stats`]: `ferry stats --json` of a mount, parsed.
//! - [`sys`]: thin libc wrappers (renameat2, utimensat, …) and errno assertions.
//! - [`tree`]: snapshot a directory tree and compare two of them.
//! - [`wire`]: a raw protocol client over a plain `TcpStream`.
//!
//! Invariants: everything a test starts is stopped on `Drop`, also when the test panics
//! (servers get SIGTERM then SIGKILL; mounts get `ferry umount`, then a lazy unmount, and
//! their daemons are killed). Every temp dir is named `ferry-test-<pid>-<kind>-…`, so what a
//! crashed run left behind is recognised and cleaned by the next one
//! ([`mount::cleanup_stale`]) without touching the mounts of a run still alive. Nothing here
//! sleeps to wait for something: waits poll a condition under a deadline.

pub mod bins;
pub mod data;
pub mod mount;
pub mod process;
pub mod proxy;
pub mod rng;
pub mod server;
pub mod stats;
pub mod sys;
pub mod tree;
pub mod wait;
pub mod wire;

use std::path::{Path, PathBuf};

pub use bins::{ferry, ferry_bin, ferryd, ferryd_bin};
pub use data::{assert_same_bytes, write_closed};
pub use mount::TestMount;
pub use process::{Output, run, run_stdin, run_timeout, sh};
pub use server::TestServer;
pub use stats::Stats;
pub use sys::{assert_errno, assert_errno_in, errno_name};
pub use wait::{poll_until, wait_for, with_deadline};

/// Prefix of every temp dir the harness makes; followed by `<pid>-<kind>-`.
pub const TEMP_PREFIX: &str = "ferry-test-";

/// A fresh temp dir named `ferry-test-<pid>-<kind>-XXXX` (removed on drop).
pub fn temp_dir(kind: &str) -> tempfile::TempDir {
    let prefix = format!("{TEMP_PREFIX}{}-{kind}-", std::process::id());
    tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("creating a temp dir {prefix}*: {e}"))
}

/// A directory removed (with everything in it) on drop: for one a [`TempDir`] could not
/// remove at its own drop, such as an export with another mount inside until the end
/// of the test (declare it before that mount: locals drop in reverse order).
///
/// [`TempDir`]: tempfile::TempDir
pub struct RemovedOnDrop(pub PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether FUSE is available. When it is not, prints why the calling test is skipped:
/// mount tests start with `if !require_fuse() { return; }` (or use [`fixture`]).
pub fn require_fuse() -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    let name = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    eprintln!("skipping {name}: /dev/fuse is absent, no FUSE mount possible here");
    false
}

/// A server and a mount of it. Fields drop in order: the mount before the server.
pub struct Fixture {
    pub mount: TestMount,
    pub server: TestServer,
}

impl Fixture {
    /// `rel` inside the mount.
    pub fn mnt(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mount.join(rel)
    }

    /// `rel` inside the export, as the server's disk has it.
    pub fn exp(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.server.export_path().join(rel)
    }
}

/// A server on a fresh export and a mount of it; `None` (and a printed note) without FUSE.
pub fn fixture() -> Option<Fixture> {
    fixture_with(&[], &[], |_| {})
}

/// Like [`fixture`] with extra `ferryd` and `ferry mount` arguments, and `populate`
/// called on the export directory after the server started and before the mount is made
/// (so nothing the client caches predates it).
pub fn fixture_with(
    server_args: &[&str],
    mount_args: &[&str],
    populate: impl FnOnce(&Path),
) -> Option<Fixture> {
    if !require_fuse() {
        return None;
    }
    let server = TestServer::start_with(server_args);
    populate(server.export_path());
    let mount = TestMount::with_args(&server, mount_args);
    Some(Fixture { mount, server })
}
