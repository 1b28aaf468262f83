//! Where the binaries under test are: `FERRYD_BIN` / `FERRY_BIN` when set, else beside the
//! test binary's `deps/` directory (`target/debug/ferryd`). This crate does not build them:
//! `cargo test -p ferry-tests` alone would run against stale or missing binaries, which is
//! why the documented command builds the workspace first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn locate(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{env}={} does not name a file: run `cargo build --workspace` first (scripts/test.sh does)",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("the test binary's own path");
    // target/debug/deps/integration-0123abcd -> target/debug
    let mut dir = exe.parent().expect("the test binary has a parent dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps/ has a parent dir");
    }
    let candidate = dir.join(name);
    assert!(
        candidate.is_file(),
        "{} not found: run `cargo build --workspace` first (scripts/test.sh does), \
         or set {env}",
        candidate.display()
    );
    candidate
}

/// Path of `ferryd`.
pub fn ferryd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| locate("FERRYD_BIN", "ferryd"))
}

/// Path of `ferry`.
pub fn ferry_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| locate("FERRY_BIN", "ferry"))
}

/// The cache folder of every `ferry` command of this test process (see [`ferry`]).
static CACHE: OnceLock<PathBuf> = OnceLock::new();

/// Removes [`CACHE`] when the test process exits (statics are never dropped).
extern "C" fn remove_cache() {
    if let Some(dir) = CACHE.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A `Command` for `ferry`, standard input closed, with `XDG_CACHE_HOME` pointing into
/// this test process's own temp dir: tests neither read nor grow the user's persistent
/// cache in `~/.cache/ferry`. ([`crate::TestMount`] gives each mount a cache of its own.)
/// The folder is removed at the process's exit; a crashed run's is removed by the next
/// run's [`crate::mount::cleanup_stale`].
pub fn ferry() -> Command {
    let cache = CACHE.get_or_init(|| {
        let dir = crate::temp_dir("cache").keep();
        // SAFETY: registers a plain function without arguments, which only reads
        // the static (set by the time the process exits).
        unsafe { libc::atexit(remove_cache) };
        dir
    });
    let mut cmd = Command::new(ferry_bin());
    cmd.stdin(std::process::Stdio::null())
        .env("XDG_CACHE_HOME", cache);
    cmd
}

/// A `Command` for `ferryd`, standard input closed.
pub fn ferryd() -> Command {
    let mut cmd = Command::new(ferryd_bin());
    cmd.stdin(std::process::Stdio::null());
    cmd
}
