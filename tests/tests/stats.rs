//! `ferry stats MOUNTPOINT`, in text and `--json`: every counter the issue names is
//! there, both forms agree, the counters count what was done; on anything but a ferry
//! mount it fails with a message that says so.

use std::fs;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::rng::Rng;
use ferry_tests::{TestMount, assert_same_bytes, fixture, fixture_with, poll_until, run, temp_dir};

const MIB: usize = 1024 * 1024;
/// How long the event stream may take to be reported live.
const PUSHED: Duration = Duration::from_secs(5);

/// The counters `ferry stats --json` must offer, numbers all.
const COUNTERS: [&str; 23] = [
    "requests",
    "bytes_sent",
    "bytes_received",
    "bytes_read_from_server",
    "bytes_served_from_cache",
    "cache_bytes",
    "cache_cap",
    "cache_hit_bytes",
    "cache_miss_bytes",
    "cache_evicted_bytes",
    "events_received",
    "opens_without_round_trip",
    "getattrs_without_round_trip",
    "lookups_without_round_trip",
    "listings_from_cache",
    "listings_prefetched",
    "invalidations",
    "resyncs",
    "reconnects",
    "connect_failures",
    "handles_reopened",
    "retried",
    "uploads_replayed",
];

/// `ferry stats MOUNTPOINT` in text and `--json`: every counter, consistent between the
/// two, and counting what was done.
#[test]
fn stats_in_text_and_json() {
    let data = Rng::new(0x57a7).bytes(2 * MIB + 1);
    let Some(fx) = fixture_with(&[], &["--cache-size", "64M"], |e| {
        fs::write(e.join("f"), &data).expect("write");
    }) else {
        return;
    };
    assert_same_bytes(&fs::read(fx.mnt("f")).expect("read"), &data, "read");
    let mut st = fx.mount.stats();
    for key in COUNTERS {
        st.get(key);
    }
    assert!(
        poll_until(PUSHED, || {
            st = fx.mount.stats();
            st.flag("events_live")
        }),
        "events_live stays false with the server up\n{st}"
    );
    assert_eq!(
        st.get("cache_cap"),
        64 * MIB as u64,
        "--cache-size 64M\n{st}"
    );
    let requests = st.get("requests");
    let mut kinds = 0;
    for (k, v) in st.map() {
        if k.starts_with("requests.") {
            kinds += 1;
            let n = v
                .as_u64()
                .unwrap_or_else(|| panic!("{k} is not a u64\n{st}"));
            assert!(n <= requests, "{k} = {n} > requests = {requests}\n{st}");
        }
    }
    assert!(kinds > 0, "no requests.<kind> counter\n{st}");
    assert!(
        st.get("requests.read") > 0 && st.get("bytes_read_from_server") >= data.len() as u64,
        "a 2 MiB file was read for the first time\n{st}"
    );
    assert!(st.get("bytes_received") >= st.get("bytes_read_from_server"));

    let out = run(ferry_tests::ferry().arg("stats").arg(fx.mount.path()));
    out.assert_success();
    let text = out.stdout_str();
    let mut seen = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let (Some(key), Some(_)) = (words.next(), words.next()) else {
            panic!("`ferry stats` line without a value: {line:?}\n{out}");
        };
        seen.push(key.to_string());
    }
    for key in COUNTERS.iter().chain(&["events_live"]) {
        assert!(
            seen.iter().any(|k| k == key),
            "`ferry stats` text lacks {key}\n{out}"
        );
    }
    let cap_line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cache_cap"))
        .expect("cache_cap line");
    assert_eq!(
        cap_line.split_whitespace().nth(1),
        Some((64 * MIB).to_string().as_str()),
        "text and JSON disagree on cache_cap\n{out}"
    );
}

/// `ferry stats` on something that is not a ferry mount fails with a message naming it.
/// A large sequential write streams to the server while the application writes: with
/// 48 MiB written and the file still open, most of it has gone out already (at most
/// 16 MiB of writes are in flight per file), so the close does not start the upload.
/// The close then commits, and the export has every byte.
#[test]
fn a_large_write_is_sent_before_the_close() {
    use std::io::Write;
    let Some(fx) = fixture_with(&[], &[], |_| {}) else {
        return;
    };
    let data = Rng::new(0x5e_4d).bytes(48 * MIB);
    let before = fx.mount.stats();
    let mut f = fs::File::create(fx.mnt("big")).expect("create");
    for chunk in data.chunks(MIB) {
        f.write_all(chunk).expect("write");
    }
    let st = fx.mount.stats();
    let sent = st.get("bytes_sent") - before.get("bytes_sent");
    assert!(
        sent >= 24 * MIB as u64 && st.get("requests.write") > 0,
        "{sent} bytes sent while 48 MiB were written and the file is still open\n{st}"
    );
    ferry_tests::sys::close(f).expect("close");
    assert_same_bytes(
        &fs::read(fx.exp("big")).expect("read the export"),
        &data,
        "the export after the close",
    );
}

#[test]
fn stats_of_a_non_ferry_directory_fails_clearly() {
    let plain = temp_dir("plain");
    let missing = plain.path().join("missing");
    for dir in [plain.path(), Path::new("/proc"), missing.as_path()] {
        let out = run(ferry_tests::ferry().arg("stats").arg(dir).arg("--json"));
        out.assert_failure();
        let err = out.stderr_str();
        assert!(
            err.contains(&*dir.to_string_lossy()),
            "the message does not name {}\n{out}",
            dir.display()
        );
        assert!(out.stdout.is_empty(), "output on stdout too\n{out}");
        if dir != missing {
            assert!(
                err.contains("not a ferry mount"),
                "the message does not say what is wrong\n{out}"
            );
        }
    }
}

/// Where mount daemons put their stats sockets (as `ferry` finds it).
fn socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("ferry"),
        // SAFETY: getuid cannot fail.
        _ => PathBuf::from(format!("/tmp/ferry-{}", unsafe { libc::getuid() })),
    }
}

/// The stats socket of the daemon of `mountpoint`: the one in `dir` that answers with it.
fn stats_socket_of(dir: &Path, mountpoint: &Path) -> Option<PathBuf> {
    let quoted = serde_json::to_string(&mountpoint.to_string_lossy()).ok()?;
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let mut body = String::new();
            UnixStream::connect(p).is_ok_and(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5))).is_ok()
                    && s.read_to_string(&mut body).is_ok()
                    && body.contains(&format!("\"mountpoint\": {quoted}"))
            })
        })
}

/// A daemon killed with SIGKILL cannot remove its stats socket; the next mount daemon
/// to start removes it (nobody listens there), so the folder does not fill up with
/// them over a machine's life, and leaves the live daemons' sockets alone.
#[test]
fn a_killed_daemons_stats_socket_is_removed_by_the_next_mount() {
    let Some(fx) = fixture() else {
        return;
    };
    let dir = socket_dir();
    let socket = stats_socket_of(&dir, fx.mount.path()).unwrap_or_else(|| {
        panic!(
            "no socket in {} answers for {}",
            dir.display(),
            fx.mount.path().display()
        )
    });
    let pids = fx.mount.daemon_pids();
    assert!(
        !pids.is_empty(),
        "no daemon for {}",
        fx.mount.path().display()
    );
    for pid in pids {
        ferry_tests::sys::kill(pid, libc::SIGKILL);
    }
    assert!(
        poll_until(Duration::from_secs(10), || fx
            .mount
            .daemon_pids()
            .is_empty()),
        "the killed daemon is still there"
    );
    assert!(
        socket.exists(),
        "the killed daemon removed its socket (nothing tested)"
    );
    let next = TestMount::new(&fx.server);
    assert!(
        poll_until(Duration::from_secs(10), || !socket.exists()),
        "{} is still there after the next mount started",
        socket.display()
    );
    assert!(
        stats_socket_of(&dir, next.path()).is_some(),
        "the next mount's own socket"
    );
    next.stats();
}
