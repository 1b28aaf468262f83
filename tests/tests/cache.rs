//! The client's persistent data cache (`$XDG_CACHE_HOME/ferry/<export-id>/`, 128 KiB
//! blocks, validated by the server's change version, LRU under a hard cap) and what
//! `ferry stats` says about it: the cap holds on disk and in the counters, a remount of
//! an unchanged export transfers no file data, a small read of a large file fetches
//! little, concurrent readers and writers on one mount never see bytes nobody wrote.
//!
//! Counters are read with the real `ferry stats --json` ([`ferry_tests::Stats`]).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use ferry_tests::rng::Rng;
use ferry_tests::sys::{close, fadvise_dontneed};
use ferry_tests::{
    Fixture, Stats, TestMount, TestServer, assert_same_bytes, fixture_with, poll_until,
    require_fuse, temp_dir,
};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// Deadline for a change on the export to show through a mount (promised: ~100 ms).
const PUSHED: Duration = Duration::from_secs(5);
/// What the cache may hold on disk beyond its cap: its lock and session files, the
/// metadata of files with blocks past the cap's count (larger than one 4 KiB block).
const DISK_SLACK: u64 = 256 * KIB as u64;

/// Bytes allocated on disk (`st_blocks * 512`) by the regular files under `dir`; 0 when
/// `dir` does not exist.
fn allocated(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for e in entries.flatten() {
        let Ok(md) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if md.is_dir() {
            total += allocated(&e.path());
        } else if md.is_file() {
            total += md.blocks() * 512;
        }
    }
    total
}

/// The data cache of `mount` (all exports: a test mount has one).
fn cache_root(mount: &TestMount) -> std::path::PathBuf {
    mount.cache_home().join("ferry")
}

/// `cache_bytes <= cache_cap == cap` in the counters, and the cache dir's allocation
/// within the cap plus [`DISK_SLACK`].
#[track_caller]
fn assert_under_cap(mount: &TestMount, cap: u64, when: &str) -> Stats {
    let st = mount.stats();
    assert_eq!(st.get("cache_cap"), cap, "{when}: cache_cap\n{st}");
    assert!(
        st.get("cache_bytes") <= cap,
        "{when}: cache_bytes {} over the cap {cap}\n{st}",
        st.get("cache_bytes")
    );
    let disk = allocated(&cache_root(mount));
    if disk > cap + DISK_SLACK {
        // Which files took the room, and what the counters say now (a second look).
        let mut files = Vec::new();
        list_allocated(&cache_root(mount), &mut files);
        let listing: String = files
            .iter()
            .map(|(p, size, alloc)| format!("  {p}: size {size}, allocated {alloc}\n"))
            .collect();
        panic!(
            "{when}: the cache dir {} allocates {disk} bytes on disk, over the cap {cap} + \
             {DISK_SLACK}\n{listing}counters before the walk:\n{st}\ncounters after it:\n{}",
            cache_root(mount).display(),
            mount.stats()
        );
    }
    st
}

/// Every regular file under `dir`: (path, size, bytes allocated).
fn list_allocated(dir: &Path, out: &mut Vec<(String, u64, u64)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(md) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if md.is_dir() {
            list_allocated(&e.path(), out);
        } else if md.is_file() {
            out.push((e.path().display().to_string(), md.len(), md.blocks() * 512));
        }
    }
}

/// A 10 MiB file read (twice) through a mount with a 2 MiB cache: the content is right,
/// and the cap holds in the counters and on disk while reading and after.
#[test]
fn the_cache_stays_under_its_cap_while_a_larger_file_is_read() {
    let data = Rng::new(0xca9).bytes(10 * MIB);
    let Some(fx) = fixture_with(&[], &["--cache-size", "2M"], |e| {
        fs::write(e.join("big"), &data).expect("write");
    }) else {
        return;
    };
    let cap = 2 * MIB as u64;
    assert_under_cap(&fx.mount, cap, "before reading");
    for pass in 0..2 {
        let mut f = File::open(fx.mnt("big")).expect("open");
        // The second pass must not be answered by the kernel's page cache alone.
        fadvise_dontneed(&f).expect("fadvise");
        let mut got = Vec::with_capacity(data.len());
        let mut buf = vec![0; 256 * KIB];
        let mut next_check = MIB;
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() >= next_check {
                assert_under_cap(&fx.mount, cap, &format!("pass {pass}, {} read", got.len()));
                next_check += MIB;
            }
        }
        assert_same_bytes(&got, &data, &format!("pass {pass}"));
    }
    let st = assert_under_cap(&fx.mount, cap, "after reading");
    eprintln!(
        "cache_bytes {}, cache_evicted_bytes {}, bytes_read_from_server {}, on disk {}",
        st.get("cache_bytes"),
        st.get("cache_evicted_bytes"),
        st.get("bytes_read_from_server"),
        allocated(&cache_root(&fx.mount))
    );
    assert!(
        st.get("cache_bytes") > 0,
        "a file was read but nothing is cached\n{st}"
    );
    // Readahead fits the small cache: its blocks are read before they are evicted, not
    // fetched again (readahead windows of up to 16 MiB fetched 66-77 MB for these 20 MiB).
    assert!(
        st.get("bytes_read_from_server") <= 2 * 2 * data.len() as u64,
        "{} bytes fetched to read {} twice through a {cap}-byte cache\n{st}",
        st.get("bytes_read_from_server"),
        data.len()
    );
}

/// 1,000 files of 2 KB read through a mount with a 1 MiB cache: the cap holds on disk,
/// where each takes a filesystem block for its data and one for its metadata. (Counting
/// their bytes alone, 2 MB, the cache took 3.4 MB.)
#[test]
fn a_cache_of_small_files_stays_under_its_cap_on_disk() {
    let mut rng = Rng::new(0x5_3a11);
    let files: Vec<Vec<u8>> = (0..1000).map(|_| rng.bytes(2000)).collect();
    let Some(fx) = fixture_with(&[], &["--cache-size", "1M"], |e| {
        fs::create_dir(e.join("small")).expect("mkdir");
        for (i, d) in files.iter().enumerate() {
            fs::write(e.join(format!("small/{i}")), d).expect("write");
        }
    }) else {
        return;
    };
    let cap = MIB as u64;
    for (i, d) in files.iter().enumerate() {
        let got = fs::read(fx.mnt(format!("small/{i}"))).expect("read");
        assert_same_bytes(&got, d, &format!("small/{i}"));
    }
    let st = assert_under_cap(&fx.mount, cap, "after reading");
    assert!(st.get("cache_bytes") > 0, "nothing cached\n{st}");
    // The last files read are the ones kept, and read again from the cache (once the
    // store, which runs after the read's reply, has recorded them).
    let from_cache = poll_until(PUSHED, || {
        let before = fx.mount.stats().get("bytes_read_from_server");
        fadvise_dontneed(&File::open(fx.mnt("small/999")).expect("open")).expect("fadvise");
        let got = fs::read(fx.mnt("small/999")).expect("read again");
        assert_same_bytes(&got, &files[999], "small/999 again");
        fx.mount.stats().get("bytes_read_from_server") == before
    });
    let st = fx.mount.stats();
    assert!(from_cache, "the last file read was not kept\n{st}");
}

/// Files read through one mount are read through the next mount of the same export (same
/// cache dir) without transferring file data; a file changed on the export, while mounted
/// or while nothing was mounted, is read anew.
#[test]
fn a_remount_reads_unchanged_files_from_the_cache() {
    if !require_fuse() {
        return;
    }
    let mut rng = Rng::new(0x4e_40);
    let mut files: Vec<(&str, Vec<u8>)> = [
        ("tiny", 10),
        ("small", 5000),
        ("mid", 200_000),
        ("three", 3 * MIB + 123),
        ("five", 5 * MIB),
    ]
    .into_iter()
    .map(|(n, len)| (n, rng.bytes(len)))
    .collect();
    let server = TestServer::start();
    for (name, data) in &files {
        fs::write(server.export(name), data).expect("write");
    }
    let cache_home = temp_dir("cache");
    let read_all = |mount: &TestMount, files: &[(&str, Vec<u8>)], what: &str| {
        for (name, data) in files {
            let got = fs::read(mount.join(name)).expect("read");
            assert_same_bytes(&got, data, &format!("{what}: {name}"));
        }
    };

    // Without passthrough (on by default, where the kernel reads cached files itself):
    // the daemon serves every byte, and counts it.
    let no_passthrough = ["--passthrough", "off"];
    let mut first = TestMount::with_cache_home(&server, &no_passthrough, cache_home.path());
    read_all(&first, &files, "first mount");
    first.unmount().expect("unmount the first mount");

    let mut second = TestMount::with_cache_home(&server, &no_passthrough, cache_home.path());
    read_all(&second, &files, "remount");
    let st = second.stats();
    let total: usize = files.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(
        st.get("bytes_read_from_server"),
        0,
        "the remount fetched file data for files it had cached\n{st}"
    );
    assert_eq!(
        st.get_or_zero("requests.read"),
        0,
        "the remount sent reads for files it had cached\n{st}"
    );
    assert!(
        st.get("bytes_served_from_cache") >= total as u64,
        "the remount served less than the {total} bytes read from its cache\n{st}"
    );

    // Changed on the export while mounted: one 4 KiB page in the middle, same size.
    let three = &mut files[3].1;
    let patch = rng.bytes(4096);
    three[MIB + 5..MIB + 5 + 4096].copy_from_slice(&patch);
    let f = OpenOptions::new()
        .write(true)
        .open(server.export("three"))
        .expect("open on the export");
    f.write_all_at(&patch, (MIB + 5) as u64).expect("pwrite");
    drop(f);
    let want = three.clone();
    let mut last = 0;
    let fresh = poll_until(PUSHED, || {
        let got = fs::read(second.join("three")).expect("read");
        last = got.len();
        got == want
    });
    assert!(
        fresh,
        "a page changed on the export did not show within {PUSHED:?} (last read {last} bytes, stale)"
    );
    let st = second.stats();
    assert!(
        st.get("bytes_read_from_server") > 0 && st.get("requests.read") > 0,
        "new content was read, yet no file data came from the server\n{st}"
    );
    second.unmount().expect("unmount the second mount");

    // Changed on the export while nothing was mounted: same size, one byte.
    let mid = &mut files[2].1;
    mid[100_000] ^= 0xff;
    let f = OpenOptions::new()
        .write(true)
        .open(server.export("mid"))
        .expect("open on the export");
    f.write_all_at(&mid[100_000..100_001], 100_000)
        .expect("pwrite");
    drop(f);
    let third = TestMount::with_cache_home(&server, &[], cache_home.path());
    read_all(
        &third,
        &files,
        "third mount, after a change while unmounted",
    );
    let st = third.stats();
    let fetched = st.get("bytes_read_from_server");
    assert!(
        fetched >= files[2].1.len() as u64 && fetched < MIB as u64,
        "the third mount should fetch the changed 200 kB file and nothing of the unchanged \
         MiB-sized ones, fetched {fetched} bytes\n{st}"
    );
}

/// The mount daemon dies (SIGKILL) while a file it has cached whole is open with a
/// write the server has not committed. The export keeps its old bytes, and the next
/// mount given the same cache reads those: not the dead mount's uncommitted bytes,
/// which it had patched into its cached blocks of the same server version.
#[test]
fn a_killed_mount_leaves_no_uncommitted_bytes_in_its_cache() {
    if !require_fuse() {
        return;
    }
    let old = Rng::new(0x4b_11).bytes(3 * MIB + 77);
    let server = TestServer::start();
    fs::write(server.export("f"), &old).expect("write on the export");
    let cache_home = temp_dir("cache");

    let mut first = TestMount::with_cache_home(&server, &[], cache_home.path());
    assert_same_bytes(
        &fs::read(first.join("f")).expect("read"),
        &old,
        "first mount",
    );
    first.unmount().expect("unmount the first mount");

    let second = TestMount::with_cache_home(&server, &[], cache_home.path());
    assert_same_bytes(
        &fs::read(second.join("f")).expect("read"),
        &old,
        "second mount",
    );
    let st = second.stats();
    assert!(
        st.get("bytes_read_from_server") == 0 && st.get("cache_bytes") >= old.len() as u64,
        "the second mount did not have the file in its cache: the test proves nothing\n{st}"
    );
    // Read back through the same descriptor: any close of the file, even a reader's,
    // would commit the write (close-to-open). So would the close of a copy: no other
    // test forks while it is open (a child's exec closes its copies, each a FLUSH; it
    // committed the write in one CI run of this session).
    let no_spawns = ferry_tests::process::no_spawns();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(second.join("f"))
        .expect("open for writing");
    f.write_all_at(b"never committed", 1000).expect("pwrite");
    let mut seen = vec![0; 15];
    f.read_exact_at(&mut seen, 1000).expect("read back");
    assert_eq!(
        &seen, b"never committed",
        "the writing mount sees its own write"
    );
    let pids = second.daemon_pids();
    assert!(
        !pids.is_empty(),
        "no daemon found for {}",
        second.path().display()
    );
    for pid in pids {
        ferry_tests::sys::kill(pid, libc::SIGKILL);
    }
    assert!(
        poll_until(Duration::from_secs(10), || second.daemon_pids().is_empty()),
        "the killed daemon is still there"
    );
    drop(f);
    drop(no_spawns);
    drop(second);
    assert_same_bytes(
        &fs::read(server.export("f")).expect("read the export"),
        &old,
        "the export after the writer's mount died",
    );

    let third = TestMount::with_cache_home(&server, &[], cache_home.path());
    assert_same_bytes(
        &fs::read(third.join("f")).expect("read"),
        &old,
        "a remount with the dead mount's cache",
    );
}

/// A mount made right after `ferry umount` returns, while the old daemon may still be
/// saving its cache: the new one waits for that cache instead of starting an empty one
/// beside it, and reads the file from it. (Without the wait this fails whenever the old
/// daemon is still finishing, in about one run of three here.)
#[test]
fn a_remount_right_after_an_unmount_takes_over_the_cache() {
    if !require_fuse() {
        return;
    }
    let data = Rng::new(0x7a_4e).bytes(3 * MIB);
    let server = TestServer::start();
    fs::write(server.export("f"), &data).expect("write on the export");
    let cache_home = temp_dir("cache");
    let no_passthrough = ["--passthrough", "off"];
    let first = TestMount::with_cache_home(&server, &no_passthrough, cache_home.path());
    assert_same_bytes(
        &fs::read(first.join("f")).expect("read"),
        &data,
        "first mount",
    );
    ferry_tests::run(ferry_tests::ferry().arg("umount").arg(first.path())).assert_success();
    let second = TestMount::with_cache_home(&server, &no_passthrough, cache_home.path());
    assert_same_bytes(&fs::read(second.join("f")).expect("read"), &data, "remount");
    let st = second.stats();
    assert_eq!(
        st.get("bytes_read_from_server"),
        0,
        "the remount did not take over the cache\n{st}"
    );
    let dirs = fs::read_dir(cache_root(&second))
        .expect("cache root")
        .count();
    assert_eq!(dirs, 1, "a second cache dir was started");
    drop(first);
}

/// Two mounts of one export with one cache home at the same time: each uses a cache
/// dir of its own (one shared would have each evict, punch and cut the files the
/// other lists), and a later mount reuses one of them.
#[test]
fn mounts_of_one_export_at_once_keep_separate_caches() {
    if !require_fuse() {
        return;
    }
    let data = Rng::new(0x2c_0d).bytes(2 * MIB + 5);
    let server = TestServer::start();
    fs::write(server.export("f"), &data).expect("write on the export");
    let cache_home = temp_dir("cache");
    let mut a = TestMount::with_cache_home(&server, &[], cache_home.path());
    let mut b = TestMount::with_cache_home(&server, &[], cache_home.path());
    for (m, what) in [(&a, "first mount"), (&b, "second mount")] {
        assert_same_bytes(&fs::read(m.join("f")).expect("read"), &data, what);
    }
    let dirs: Vec<String> = fs::read_dir(cache_root(&a))
        .expect("the cache root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs.len(), 2, "one cache dir per mount, found {dirs:?}");
    a.unmount().expect("unmount a");
    b.unmount().expect("unmount b");

    let c = TestMount::with_cache_home(&server, &["--passthrough", "off"], cache_home.path());
    assert_same_bytes(
        &fs::read(c.join("f")).expect("read"),
        &data,
        "a later mount",
    );
    let st = c.stats();
    assert_eq!(
        st.get("bytes_read_from_server"),
        0,
        "the later mount did not reuse a cache\n{st}"
    );
}

/// While the event stream is up, re-opening and re-reading an unchanged file, and
/// re-listing a directory, send nothing to the server, and the file's bytes come from
/// the kernel's page cache, kept across opens: the daemon serves none of them again.
#[test]
fn unchanged_files_and_listings_are_reread_without_a_round_trip() {
    // Requests are counted: no other test drops the kernel's caches meanwhile.
    let _kept = ferry_tests::sys::kernel_caches_kept();
    let data = Rng::new(0x4e_c4).bytes(4 * MIB + 3);
    let Some(fx) = fixture_with(&[], &["--passthrough", "off"], |e| {
        fs::create_dir(e.join("d")).expect("mkdir");
        for i in 0..50 {
            fs::write(e.join(format!("d/f{i}")), b"x").expect("write");
        }
        fs::write(e.join("d/big"), &data).expect("write");
    }) else {
        return;
    };
    assert!(
        poll_until(PUSHED, || fx.mount.stats().flag("events_live")),
        "the event stream did not come up"
    );
    let list = || fs::read_dir(fx.mnt("d")).expect("list").count();
    assert_eq!(list(), 51);
    assert_same_bytes(
        &fs::read(fx.mnt("d/big")).expect("read"),
        &data,
        "first read",
    );
    // The first open's release reaches the daemon (and the server) after `read`
    // returned, and the small files' prefetch (sent with the listing) may be answered
    // later still: the counters settle first (none of them moves for 100 ms).
    let mut before = fx.mount.stats();
    let mut since = std::time::Instant::now();
    let settled = poll_until(PUSHED, || {
        let now = fx.mount.stats();
        if now.to_string() != before.to_string() {
            since = std::time::Instant::now();
        }
        before = now;
        since.elapsed() >= Duration::from_millis(100)
    });
    assert!(settled, "the counters never settled\n{before}");
    for round in 0..3 {
        assert_eq!(list(), 51);
        let what = format!("re-read {round}");
        assert_same_bytes(&fs::read(fx.mnt("d/big")).expect("read"), &data, &what);
    }
    let after = fx.mount.stats();
    for key in ["requests", "bytes_read_from_server"] {
        assert_eq!(
            after.get(key),
            before.get(key),
            "{key} changed while an unchanged file and listing were read again\n\
             before:\n{before}\nafter:\n{after}"
        );
    }
    // The kernel kept its pages: three re-reads of 4 MiB cost the daemon nothing, but
    // for the file's last pages, which the kernel asks for again in a few runs in a
    // hundred (8 KiB, seen at 6625ccb too; why is not pinned down: session 24's note).
    let served = after.get("bytes_served_from_cache") - before.get("bytes_served_from_cache");
    assert!(
        served <= 16 * 1024,
        "the daemon served {served} bytes while an unchanged file was read again\n\
         before:\n{before}\nafter:\n{after}"
    );
    assert!(
        after.get("opens_without_round_trip") >= before.get("opens_without_round_trip") + 3
            && after.get("listings_from_cache") >= before.get("listings_from_cache") + 3,
        "the opens and listings were not answered locally\n{after}"
    );
}

/// Bytes an unprivileged writer can still allocate on the filesystem of `dir`.
fn free_on(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path");
    // SAFETY: a NUL-terminated path and a zeroed out-struct the call fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statvfs(path.as_ptr(), &mut st) },
        0,
        "statvfs"
    );
    st.f_bavail * st.f_frsize
}

/// The cache leaves `--cache-min-free` free on its filesystem whatever `--cache-size`
/// allows: on a 48 MiB tmpfs with 16 MiB to leave, reading a 64 MiB file keeps 16 MiB
/// free (less a store in flight and the metadata), and when another program takes
/// space there, the next stores give it back.
#[test]
fn the_cache_leaves_free_space_on_its_filesystem() {
    // (Mounting the tmpfs needs root, as FUSE mounts here do.)
    if !require_fuse() || unsafe { libc::geteuid() } != 0 {
        return;
    }
    const LEAVE: u64 = 16 * MIB as u64;
    const SLACK: u64 = 2 * MIB as u64;
    let data = Rng::new(0xf4_ee).bytes(64 * MIB);
    let server = TestServer::start();
    fs::write(server.export("big"), &data).expect("write on the export");
    let cache_home = temp_dir("cache-fs");
    let _fs = ferry_tests::sys::Tmpfs::mount(cache_home.path(), "48m");
    let m = TestMount::with_cache_home(
        &server,
        &["--cache-min-free", "16M", "--passthrough", "off"],
        cache_home.path(),
    );
    let f = File::open(m.join("big")).expect("open");
    let mut buf = vec![0; MIB];
    let mut least = u64::MAX;
    let mut read_all = |least: &mut u64, what: &str| {
        for i in 0..64 {
            f.read_exact_at(&mut buf, (i * MIB) as u64).expect("read");
            assert!(
                buf[..] == data[i * MIB..(i + 1) * MIB],
                "{what}: MiB {i} differs"
            );
            *least = (*least).min(free_on(cache_home.path()));
        }
    };
    read_all(&mut least, "first read");
    assert!(
        least + SLACK >= LEAVE,
        "the cache left only {least} bytes free on its filesystem\n{}",
        m.stats()
    );
    let st = m.stats();
    assert!(
        st.get("cache_bytes") > 8 * MIB as u64,
        "the cache hardly cached anything: the test proves nothing\n{st}"
    );

    // Another program takes all but 8 MiB; the cache's next stores give space back.
    let hog = cache_home.path().join("hog");
    let take = free_on(cache_home.path()).saturating_sub(8 * MIB as u64);
    let mut w = File::create(&hog).expect("create the hog");
    w.write_all(&vec![1u8; take as usize]).expect("fill");
    drop(w);
    fadvise_dontneed(&f).expect("drop the mount's page cache of the file");
    let mut least = u64::MAX;
    read_all(&mut least, "read after the hog");
    let free = free_on(cache_home.path());
    assert!(
        free + SLACK >= LEAVE,
        "the cache did not give space back: {free} bytes free\n{}",
        m.stats()
    );
}

/// A 4 KiB read at 40 MiB of a 64 MiB file transfers (and caches) well under 2 MiB.
#[test]
fn a_small_read_of_a_large_file_fetches_only_around_it() {
    let marker = Rng::new(0x5a_a5).bytes(4096);
    let Some(fx) = fixture_with(&[], &[], |e| {
        let f = File::create(e.join("sparse")).expect("create");
        f.set_len(64 * MIB as u64).expect("set_len");
        f.write_all_at(&marker, 40 * MIB as u64).expect("pwrite");
    }) else {
        return;
    };
    let f = File::open(fx.mnt("sparse")).expect("open");
    let mut buf = vec![0; 4096];
    f.read_exact_at(&mut buf, 40 * MIB as u64)
        .expect("pread at 40 MiB");
    assert_same_bytes(&buf, &marker, "4 KiB at 40 MiB");
    let st = fx.mount.stats();
    let limit = 2 * MIB as u64;
    for key in ["bytes_read_from_server", "bytes_received", "cache_bytes"] {
        assert!(
            st.get(key) < limit,
            "{key} = {} after one 4 KiB read (limit {limit})\n{st}",
            st.get(key)
        );
    }
    assert!(
        st.get("bytes_read_from_server") >= 4096,
        "the 4 KiB read did not come from the server\n{st}"
    );
    let disk = allocated(&cache_root(&fx.mount));
    assert!(
        disk < limit + DISK_SLACK,
        "the cache allocates {disk} bytes on disk after one 4 KiB read"
    );
    // Another small read elsewhere (a hole): zeros, and again only a little transferred.
    f.read_exact_at(&mut buf, 10 * MIB as u64 + 7)
        .expect("pread at 10 MiB");
    assert!(buf.iter().all(|&b| b == 0), "a hole read as non-zero");
    let st = fx.mount.stats();
    assert!(
        st.get("bytes_read_from_server") < 2 * limit,
        "two 4 KiB reads transferred {} bytes\n{st}",
        st.get("bytes_read_from_server")
    );
}

/// Regions of the file of [`concurrent_readers_and_writers_of_one_file`]: an odd length,
/// so regions straddle pages and 128 KiB blocks.
const REGIONS: usize = 16;
const REGION_LEN: usize = 100_003;
const WRITERS: usize = 4;
const VERSIONS: u8 = 6;

fn pos_hash(pos: usize) -> u32 {
    ((pos as u32).wrapping_mul(0x9e37_79b1) >> 16) % 255
}

/// Byte `pos` of version `v` (0: the original): never 0, and different for every `v`.
fn byte_of(pos: usize, v: u8) -> u8 {
    (1 + (pos_hash(pos) + 41 * v as u32) % 255) as u8
}

/// The version byte `b` at `pos` belongs to, if any.
fn version_of(pos: usize, b: u8) -> Option<u8> {
    let d = (b as i64 - 1 - pos_hash(pos) as i64).rem_euclid(255);
    (b != 0 && d % 41 == 0 && d / 41 <= VERSIONS as i64).then_some((d / 41) as u8)
}

fn region(r: usize, v: u8) -> Vec<u8> {
    (r * REGION_LEN..(r + 1) * REGION_LEN)
        .map(|p| byte_of(p, v))
        .collect()
}

/// A file this mount is writing, opened and read by another process of the same mount
/// after the kernel dropped its pages: the reader sees the writes not yet closed, as it
/// would on a local disk (they share the writer's staged copy), for a small file (which
/// an open would otherwise bring along whole, as the server last committed it) and a
/// large one.
#[test]
fn a_reader_sees_uncommitted_writes_of_its_own_mount() {
    let mut rng = Rng::new(0x5a3e);
    let small = rng.bytes(200_000);
    let large = rng.bytes(3 << 20);
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("small"), &small).expect("write");
        fs::write(e.join("large"), &large).expect("write");
    }) else {
        return;
    };
    for (name, old) in [("small", &small), ("large", &large)] {
        let mut want = old.clone();
        let w = OpenOptions::new()
            .write(true)
            .open(fx.mnt(name))
            .expect("open to write");
        let d = rng.bytes(10_000);
        let at = old.len() / 3;
        w.write_all_at(&d, at as u64).expect("write");
        want[at..at + d.len()].copy_from_slice(&d);
        fadvise_dontneed(&w).expect("fadvise");
        let got = fs::read(fx.mnt(name)).expect("read while it is written");
        assert_same_bytes(&got, &want, &format!("{name}, read while written"));
        close(w).expect("close");
        assert_same_bytes(&fs::read(fx.exp(name)).expect("read"), &want, name);
    }
}

/// Writers (threads, each its own descriptor) rewrite disjoint regions of one file in
/// versions while readers read it whole, over and over, on the same mount. Every byte a
/// reader sees is one some writer wrote (or the original), never older than what that
/// reader saw there before; at the end the mount and the export hold the last versions.
#[test]
fn concurrent_readers_and_writers_of_one_file() {
    let size = REGIONS * REGION_LEN;
    let original: Vec<u8> = (0..size).map(|p| byte_of(p, 0)).collect();
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("shared"), &original).expect("write");
    }) else {
        return;
    };
    let path = fx.mnt("shared");
    let done = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(WRITERS + 3 + 1));
    let readers: Vec<_> = (0..3)
        .map(|id| {
            let (path, done, start) = (path.clone(), done.clone(), start.clone());
            std::thread::spawn(move || {
                let mut seen = vec![0u8; size];
                let mut passes = 0;
                start.wait();
                loop {
                    let last = done.load(Ordering::SeqCst);
                    let mut data = Vec::with_capacity(size);
                    File::open(&path)
                        .and_then(|mut f| f.read_to_end(&mut data))
                        .unwrap_or_else(|e| panic!("reader {id}: {e}"));
                    assert_eq!(data.len(), size, "reader {id}, pass {passes}: file size");
                    for (pos, &b) in data.iter().enumerate() {
                        let v = version_of(pos, b).unwrap_or_else(|| {
                            panic!(
                                "reader {id}, pass {passes}: byte {pos} (region {}) is {b:#04x}, \
                                 which nobody wrote",
                                pos / REGION_LEN
                            )
                        });
                        assert!(
                            v >= seen[pos],
                            "reader {id}, pass {passes}: byte {pos} went back from version {} to {v}",
                            seen[pos]
                        );
                        seen[pos] = v;
                    }
                    passes += 1;
                    if last {
                        return passes;
                    }
                }
            })
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (path, start) = (path.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for v in 1..=VERSIONS {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .unwrap_or_else(|e| panic!("writer {w}, version {v}: open: {e}"));
                    for r in (w..REGIONS).step_by(WRITERS) {
                        f.write_all_at(&region(r, v), (r * REGION_LEN) as u64)
                            .unwrap_or_else(|e| panic!("writer {w}, region {r}, v{v}: {e}"));
                    }
                    if v % 2 == 0 {
                        f.sync_all()
                            .unwrap_or_else(|e| panic!("writer {w}, v{v}: fsync: {e}"));
                    }
                    close(f).unwrap_or_else(|e| panic!("writer {w}, v{v}: close: {e}"));
                }
            })
        })
        .collect();
    start.wait();
    for w in writers {
        w.join().expect("a writer panicked");
    }
    done.store(true, Ordering::SeqCst);
    let passes: Vec<usize> = readers
        .into_iter()
        .map(|r| r.join().expect("a reader panicked"))
        .collect();
    eprintln!("whole-file reads per reader while writing: {passes:?}");
    let want: Vec<u8> = (0..REGIONS).flat_map(|r| region(r, VERSIONS)).collect();
    let mount = fs::read(&path).expect("read");
    let export = fs::read(fx.exp("shared")).expect("read the export");
    let (m, e) = (stale_regions(&mount, &want), stale_regions(&export, &want));
    if !m.is_empty() || !e.is_empty() {
        // Where the stale bytes live: the kernel's page cache, or the daemon's.
        let again = File::open(&path).and_then(|mut f| {
            fadvise_dontneed(&f)?;
            let mut d = Vec::new();
            f.read_to_end(&mut d)?;
            Ok(d)
        });
        let again = again.map(|d| stale_regions(&d, &want));
        panic!(
            "after all closes, regions not at the last version {VERSIONS}: on the mount {m:?}; \
             on the export {e:?}; on the mount once the kernel dropped its pages: {again:?}"
        );
    }
}

/// `(region, versions found in it)` for each region of `got` that differs from `want`.
fn stale_regions(got: &[u8], want: &[u8]) -> Vec<(usize, Vec<Option<u8>>)> {
    if got.len() != want.len() {
        return vec![(usize::MAX, vec![None])];
    }
    let mut out = Vec::new();
    for r in 0..REGIONS {
        let span = r * REGION_LEN..(r + 1) * REGION_LEN;
        if got[span.clone()] != want[span.clone()] {
            let mut versions: Vec<Option<u8>> = span.map(|p| version_of(p, got[p])).collect();
            versions.sort();
            versions.dedup();
            out.push((r, versions));
        }
    }
    out
}

/// `st_blksize` through the mount is at least 1 MiB (`cp` and friends size their buffers
/// by it), for a file from the export, a file created through the mount, and `fstat`.
#[test]
fn blksize_is_at_least_one_mib() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("there"), b"data").expect("write");
    }) else {
        return;
    };
    let mut created = File::create(fx.mnt("created")).expect("create");
    created.write_all(b"new").expect("write");
    for (what, md) in [
        (
            "stat of a file on the export",
            fs::metadata(fx.mnt("there")),
        ),
        ("stat of a created file", fs::metadata(fx.mnt("created"))),
        ("fstat of an open file", created.metadata()),
    ] {
        let md = md.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            md.blksize() >= MIB as u64,
            "{what}: st_blksize {} < 1 MiB",
            md.blksize()
        );
    }
    close(created).expect("close");
}

/// `--cache-dir DIR` puts the cache there (one folder per export), `--no-cache` writes
/// nothing; both read correctly.
#[test]
fn cache_dir_and_no_cache_options() {
    let data = Rng::new(0xd1e).bytes(MIB + 17);
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("f"), &data).expect("write");
    }) else {
        return;
    };
    let dir = temp_dir("cachedir");
    let dir_arg = dir.path().to_string_lossy().into_owned();
    let elsewhere = TestMount::with_args(
        &fx.server,
        &["--cache-dir", &dir_arg, "--cache-size", "512K"],
    );
    assert_same_bytes(
        &fs::read(elsewhere.join("f")).expect("read"),
        &data,
        "--cache-dir",
    );
    let st = elsewhere.stats();
    assert_eq!(
        st.get("cache_cap"),
        512 * KIB as u64,
        "--cache-size 512K\n{st}"
    );
    let folders: Vec<_> = fs::read_dir(dir.path())
        .expect("list the cache dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(
        folders.len(),
        1,
        "one folder per export in --cache-dir: {folders:?}"
    );
    assert!(folders[0].is_dir(), "{folders:?}");
    assert!(
        allocated(dir.path()) > 0,
        "nothing cached in --cache-dir\n{st}"
    );
    assert_eq!(
        allocated(&cache_root(&elsewhere)),
        0,
        "--cache-dir given, yet the default cache dir got data"
    );

    let uncached = TestMount::with_args(&fx.server, &["--no-cache"]);
    for _ in 0..2 {
        assert_same_bytes(
            &fs::read(uncached.join("f")).expect("read"),
            &data,
            "--no-cache",
        );
    }
    assert_eq!(
        allocated(uncached.cache_home()),
        0,
        "--no-cache, yet data landed in the cache home"
    );
    // Small reads at random go out from the session thread there too (O_DIRECT: each
    // reaches the mount as asked).
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(uncached.join("f"))
        .expect("open O_DIRECT");
    for at in [700 * KIB, 300 * KIB, 900 * KIB, 100 * KIB] {
        assert_same_bytes(
            &pread(&f, at as u64, 4096),
            &data[at..at + 4096],
            "4 KiB at random",
        );
    }
    let st = uncached.stats();
    assert_eq!(st.get_or_zero("cache_bytes"), 0, "--no-cache\n{st}");
    assert!(
        st.get("reads_at_once") >= 2,
        "--no-cache: small reads at random went the long way\n{st}"
    );
}

/// Reads `len` bytes at `off` through `f` (short only at the end of the file).
fn pread(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => panic!("pread at {}: {e}", off + done as u64),
        }
    }
    buf.truncate(done);
    buf
}

/// By default (the mount runs as root here), a read-only open of a large file whose bytes
/// are all in the cache is served by FUSE passthrough: its reads never reach the daemon,
/// memory maps read the same bytes. While it is open, another reader on the mount shares
/// it; a writer on the mount (an open for writing, a truncate, a create meeting the file)
/// works, its bytes reach the open readers at once and the server at close, those stored
/// through its shared memory maps too; changes made through another mount or on the
/// export reach the open readers.
#[test]
fn fully_cached_files_are_read_through_passthrough() {
    let mut rng = Rng::new(0x9a55);
    let mut data = rng.bytes(4 * MIB + 77);
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("big"), &data).expect("write");
    }) else {
        return;
    };
    // The first read fills the cache (the open cannot pass through yet).
    assert_same_bytes(&fs::read(fx.mnt("big")).expect("read"), &data, "first read");
    let Some(reader) = open_passing_through(&fx.mount, "big") else {
        return;
    };
    let after_open = fx.mount.stats();
    let _ = fadvise_dontneed(&reader);
    assert_same_bytes(&pread(&reader, 0, data.len()), &data, "passthrough read");
    let st = fx.mount.stats();
    for key in [
        "requests.read",
        "bytes_served_from_cache",
        "bytes_read_from_server",
    ] {
        assert_eq!(
            st.get_or_zero(key),
            after_open.get_or_zero(key),
            "{key} changed while reading through passthrough\n{st}"
        );
    }
    let mapped = map_shared(&reader, data.len(), libc::PROT_READ);
    assert!(mapped.bytes() == &data[..], "bytes through mmap");
    drop(mapped);

    let other = File::open(fx.mnt("big")).expect("second open for reading");
    assert_same_bytes(
        &pread(&other, 1000, 5000),
        &data[1000..6000],
        "second reader",
    );

    // A writer on this mount beside them: its reads and writes go through the daemon,
    // its bytes reach the readers here as it writes and the server at close.
    let patch = rng.bytes(70_000);
    {
        let writers = fx.mount.stats().get_or_zero("passthrough_writers");
        let w = open_rw(&fx.mnt("big"));
        assert_eq!(
            fx.mount.stats().get_or_zero("passthrough_writers"),
            writers + 1,
            "the writer is not a passthrough (direct I/O) open"
        );
        assert_same_bytes(
            &pread(&w, 3 * MIB as u64, 4096),
            &data[3 * MIB..3 * MIB + 4096],
            "read through the writer",
        );
        w.write_all_at(&patch, MIB as u64 + 5).expect("write");
        data[MIB + 5..MIB + 5 + patch.len()].copy_from_slice(&patch);
        for (f, which) in [(&reader, "first"), (&other, "second")] {
            assert!(
                poll_until(PUSHED, || pread(f, 0, data.len()) == data),
                "the {which} passthrough reader does not see a write made on its mount"
            );
        }
        close(w).expect("close the writer");
    }
    // Opened right after the close (its RELEASE may still be on the way): the new bytes.
    assert_same_bytes(
        &fs::read(fx.mnt("big")).expect("read after the writer's close"),
        &data,
        "a reader opened after the writer beside passthrough closed",
    );
    assert_same_bytes(
        &fs::read(fx.exp("big")).expect("export"),
        &data,
        "the export after the writer beside passthrough closed",
    );

    // Written through another mount: the open readers follow.
    let second = TestMount::new(&fx.server);
    let patch = rng.bytes(10_000);
    {
        let w = OpenOptions::new()
            .write(true)
            .open(second.join("big"))
            .expect("open for writing on another mount");
        w.write_all_at(&patch, 2 * MIB as u64).expect("write");
        close(w).expect("close the writer");
    }
    data[2 * MIB..2 * MIB + patch.len()].copy_from_slice(&patch);
    for (f, which) in [(&reader, "first"), (&other, "second")] {
        assert!(
            poll_until(PUSHED, || pread(f, 0, data.len()) == data),
            "the {which} passthrough reader does not see a write made through another mount"
        );
    }
    // Appended on the export.
    let tail = rng.bytes(300_000);
    {
        let mut f = OpenOptions::new()
            .append(true)
            .open(fx.exp("big"))
            .expect("open on the export");
        f.write_all(&tail).expect("append on the export");
    }
    data.extend_from_slice(&tail);
    assert!(
        poll_until(PUSHED, || pread(&reader, 0, data.len()) == data),
        "the passthrough reader does not follow an append on the export"
    );
    // A new reader opened now sees all of it at once (close-to-open).
    let third = File::open(fx.mnt("big")).expect("third open for reading");
    assert_same_bytes(
        &pread(&third, 0, data.len()),
        &data,
        "a reader opened after the append",
    );
    // A size change by path on this mount: the server and the readers follow.
    ferry_tests::sys::truncate(&fx.mnt("big"), 3 * MIB as u64).expect("truncate by path");
    data.truncate(3 * MIB);
    assert_eq!(
        fs::metadata(fx.exp("big")).expect("stat").len(),
        data.len() as u64
    );
    assert!(
        poll_until(PUSHED, || pread(&reader, 0, 5 * MIB) == data),
        "the passthrough reader does not follow a truncate on its mount"
    );
    // Cut on the export below the size passthrough starts at: the open readers follow,
    // and a new open still works (it shares their file).
    data.truncate(1000);
    fs::write(fx.exp("big"), &data).expect("rewrite on the export");
    assert!(
        poll_until(PUSHED, || pread(&reader, 0, 2 * MIB) == data),
        "the passthrough reader does not follow a shrink on the export"
    );
    let fourth = File::open(fx.mnt("big")).expect("open after the shrink");
    assert_same_bytes(
        &pread(&fourth, 0, 2 * MIB),
        &data,
        "a reader opened after the shrink",
    );
    // A create meeting the file (a shell's `>`): replaced whole, readers follow.
    data = rng.bytes(2 * MIB + 3);
    fs::write(fx.mnt("big"), &data).expect("rewrite through the mount");
    assert_same_bytes(
        &fs::read(fx.exp("big")).expect("export"),
        &data,
        "the export after a rewrite beside passthrough readers",
    );
    assert!(
        poll_until(PUSHED, || pread(&third, 0, 5 * MIB) == data),
        "the passthrough reader does not follow a rewrite on its mount"
    );
    // A writer's shared memory map: the kernel maps the cache's data file itself. What
    // it stored before the writer's `fsync` or close reaches the server then: also a
    // second store into a page already stored into, and a store followed by a `write`
    // (the daemon's own write to the data file must not hide it).
    drop(File::open(fx.mnt("big")).expect("open for reading"));
    {
        let w = open_rw(&fx.mnt("big"));
        let mut map = map_shared(&w, data.len(), libc::PROT_READ | libc::PROT_WRITE);
        map.bytes_mut()[MIB..MIB + 5].copy_from_slice(b"MAPP1");
        w.sync_all().expect("fsync the mapping writer");
        data[MIB..MIB + 5].copy_from_slice(b"MAPP1");
        assert_same_bytes(
            &fs::read(fx.exp("big")).expect("export"),
            &data,
            "the export after a store through a writer's map and an fsync",
        );
        map.bytes_mut()[MIB + 10..MIB + 15].copy_from_slice(b"MAPP2");
        w.write_all_at(b"WRITE", 100).expect("write beside the map");
        drop(map);
        close(w).expect("close the mapping writer");
    }
    data[MIB + 10..MIB + 15].copy_from_slice(b"MAPP2");
    data[100..105].copy_from_slice(b"WRITE");
    assert_same_bytes(
        &fs::read(fx.exp("big")).expect("export"),
        &data,
        "the export after stores through a writer's map",
    );
    assert!(fx.mount.stats().get_or_zero("mapped_stores_sent") >= 2);
    // Past the end the server knew, after an `ftruncate` that grew the file: the map
    // reaches it (no SIGBUS), the close succeeds or (where the cached copy holds only the
    // old part: the ftruncate still staged) fails with EIO, and the write and the
    // ftruncate reach the server either way. (Whether the map's store there does is not
    // checked: one right after a truncate that grew the file may be lost, ARCHITECTURE.md
    // "POSIX gaps"; here in about 1 run of 60 under load.)
    {
        let w = open_rw(&fx.mnt("big"));
        w.write_all_at(b"staged", 200).expect("write");
        w.set_len(data.len() as u64 + 10_000).expect("ftruncate");
        // A read-only open waits until the readers' copy holds the current version.
        drop(File::open(fx.mnt("big")).expect("open for reading"));
        let end = data.len() + 10_000;
        let mut map = map_shared(&w, end, libc::PROT_READ | libc::PROT_WRITE);
        map.bytes_mut()[end - 5..end].copy_from_slice(b"GROWN");
        drop(map);
        let closed = close(w);
        if closed.is_err() {
            ferry_tests::assert_errno(closed, libc::EIO);
        }
        data.resize(end, 0);
        data[200..206].copy_from_slice(b"staged");
        let mut last = Vec::new();
        assert!(
            poll_until(PUSHED, || {
                last = fs::read(fx.exp("big")).expect("export");
                last.len() == end && last[..end - 5] == data[..end - 5]
            }),
            "the export after a writer's map stored past the end it grew: {} bytes (want \
             {end}), first difference at {:?}",
            last.len(),
            last.iter().zip(&data).position(|(a, b)| a != b),
        );
        data = last;
    }
    drop((reader, other, third, fourth));

    // Nothing passes through any more: a writer is a caching open again.
    let w = OpenOptions::new()
        .write(true)
        .open(fx.mnt("big"))
        .expect("open for writing after the readers closed");
    w.write_all_at(b"end", 0).expect("write");
    close(w).expect("close");
    data[..3].copy_from_slice(b"end");
    assert_same_bytes(
        &fs::read(fx.exp("big")).expect("export"),
        &data,
        "the export",
    );
    assert_same_bytes(&fs::read(fx.mnt("big")).expect("mount"), &data, "the mount");
}

/// A process maps a file read through passthrough and closes it, as loaders do; then the
/// cache makes room for another file: the map keeps reading the file's bytes (the kernel
/// maps the cache's data file itself, so that file is unlinked, never cut or punched).
#[test]
fn a_map_of_a_passthrough_file_outlives_its_close_and_its_eviction() {
    let mut rng = Rng::new(0x3a9);
    let a = rng.bytes(3 * MIB);
    let b = rng.bytes(6 * MIB);
    let Some(fx) = fixture_with(&[], &["--cache-size", "8M"], |e| {
        fs::write(e.join("a"), &a).expect("write");
        fs::write(e.join("b"), &b).expect("write");
    }) else {
        return;
    };
    assert_same_bytes(&fs::read(fx.mnt("a")).expect("read"), &a, "first read of a");
    let Some(f) = open_passing_through(&fx.mount, "a") else {
        return;
    };
    let map = map_shared(&f, a.len(), libc::PROT_READ);
    close(f).expect("close a");
    // a's data file in the cache, while it holds all of a.
    let a_data = format!("{}.data", fs::metadata(fx.exp("a")).expect("stat").ino());
    let a_cached = || {
        fs::read_dir(cache_root(&fx.mount))
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| {
                fs::metadata(d.path().join(&a_data))
                    .is_ok_and(|m| m.blocks() * 512 >= a.len() as u64)
            })
    };
    assert!(a_cached(), "a is not in the cache after it was read");
    // Read b until a's blocks made room for it (the close's RELEASE, which unpins a,
    // comes in the background).
    let evicted = poll_until(PUSHED, || {
        let mut f = File::open(fx.mnt("b")).expect("open b");
        fadvise_dontneed(&f).expect("fadvise");
        let mut got = Vec::new();
        f.read_to_end(&mut got).expect("read b");
        assert_same_bytes(&got, &b, "b");
        !a_cached()
    });
    assert!(evicted, "reading b never evicted a from the 8 MiB cache");
    assert!(map.bytes() == &a[..], "the map of a after a left the cache");
    drop(map);
    assert_same_bytes(&fs::read(fx.mnt("a")).expect("read"), &a, "a read again");
}

/// A writer's shared map kept past the writer's close (beside a passthrough reader, the
/// kernel maps the cache's data file): what it stores then cannot reach the server, and
/// once the readers are gone the mount reads the server's bytes, never the map's, while
/// the map keeps its own.
#[test]
fn a_store_through_a_map_kept_past_its_writers_close_is_never_taken_for_the_servers() {
    let data = Rng::new(0x1a7e).bytes(2 * MIB + 9);
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("solo"), &data).expect("write");
    }) else {
        return;
    };
    assert_same_bytes(
        &fs::read(fx.mnt("solo")).expect("read"),
        &data,
        "first read",
    );
    let Some(reader) = open_passing_through(&fx.mount, "solo") else {
        return;
    };
    let w = open_rw(&fx.mnt("solo"));
    let mut map = map_shared(&w, data.len(), libc::PROT_READ | libc::PROT_WRITE);
    close(w).expect("close the mapping writer");
    map.bytes_mut()[..5].copy_from_slice(b"LATER");
    assert!(
        pread(&reader, 0, 5) == b"LATER",
        "the passthrough reader shares the map's file"
    );
    drop(reader);
    assert_same_bytes(
        &fs::read(fx.exp("solo")).expect("export"),
        &data,
        "the export",
    );
    // (The readers' RELEASE, which ends the passthrough, comes in the background.)
    assert!(
        poll_until(PUSHED, || fs::read(fx.mnt("solo")).is_ok_and(|d| d == data)),
        "the mount reads the map's store after the readers closed"
    );
    assert!(
        map.bytes().starts_with(b"LATER"),
        "the map lost its own store"
    );
}

/// `name` in `mount` opened for reading through passthrough, which any read-only open of
/// a wholly cached file of 1 MiB or more gets once the caching opens before it are
/// released (the kernel sends those releases in the background: opened again until it
/// passes through). `None` where the mount log says why there is no passthrough (the
/// kernel, not root, a cache directory on tmpfs).
fn open_passing_through(mount: &TestMount, name: &str) -> Option<File> {
    let mut opened = None;
    let through = poll_until(PUSHED, || {
        let before = mount.stats().get_or_zero("passthrough_opens");
        let f = File::open(mount.join(name)).expect("open for reading");
        let passed = mount.stats().get_or_zero("passthrough_opens") > before;
        if passed {
            opened = Some(f);
        }
        passed
    });
    if !through {
        let log = mount.log();
        assert!(
            log.contains("no FUSE passthrough") || log.contains("passthrough unavailable"),
            "a read-only open of the wholly cached {name} never passed through, and the \
             mount log does not say why:\n{log}"
        );
        eprintln!("skipping: this kernel offers no passthrough here\n{log}");
    }
    opened
}

/// `path` opened for reading and writing (beside passthrough readers, in the tests here).
fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for writing beside passthrough readers")
}

/// A shared memory map of an open file, unmapped on drop.
struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

fn map_shared(f: &File, len: usize, prot: i32) -> Mapped {
    // SAFETY: a shared mapping of an open descriptor, unmapped on drop.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(f),
            0,
        )
    };
    assert_ne!(
        ptr,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    Mapped { ptr, len }
}

impl Mapped {
    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping covers `len` readable bytes while it lives.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, mapped writable by the caller; borrowed uniquely.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmapping what `map_shared` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// A mount of an export holding `files` (path, content), directories made as needed.
fn fixture_of_files(files: &[(String, Vec<u8>)]) -> Option<Fixture> {
    fixture_with(&[], &[], |e| {
        for (name, data) in files {
            let p = e.join(name);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(p, data).expect("write");
        }
    })
}

/// Reading a tree's files in the order a walk lists them (`find` then `cat`, as
/// `bench/run.sh` does): once a program has opened a second file of a directory whose
/// small files came together, the next directories' small files are fetched ahead of
/// it, so only the first directory's first open waits for the server (one for each of
/// the six leaf directories without look-ahead), and every byte is right.
#[test]
fn reading_through_a_tree_fetches_the_next_directories_ahead() {
    let mut rng = Rng::new(0x10a4);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for p in 0..3 {
        for q in 0..2 {
            for f in 0..4 {
                let len = (rng.bytes(2)[0] as usize) * 12;
                files.push((format!("p{p}/q{q}/f{f}"), rng.bytes(len + 1)));
            }
        }
    }
    let Some(fx) = fixture_of_files(&files) else {
        return;
    };
    // A depth-first walk in the order the mount lists (the server's order, as `find`).
    fn walk(dir: &std::path::Path, rel: &str, out: &mut Vec<String>) {
        let mut dirs = Vec::new();
        for e in fs::read_dir(dir).expect("list") {
            let e = e.expect("entry");
            let name = format!("{rel}{}", e.file_name().to_string_lossy());
            match e.file_type().expect("type").is_dir() {
                true => dirs.push((e.path(), format!("{name}/"))),
                false => out.push(name),
            }
        }
        for (path, rel) in dirs {
            walk(&path, &rel, out);
        }
    }
    let mut names = Vec::new();
    walk(fx.mount.path(), "", &mut names);
    assert_eq!(
        names.len(),
        files.len(),
        "the walk finds every file: {names:?}"
    );
    let before = fx.mount.stats();
    let out = ferry_tests::run(
        std::process::Command::new("cat")
            .args(&names)
            .current_dir(fx.mount.path()),
    );
    out.assert_success();
    let want: Vec<u8> = names
        .iter()
        .flat_map(|n| files.iter().find(|(f, _)| f == n).expect("known").1.clone())
        .collect();
    assert_same_bytes(&out.stdout, &want, "cat of every file in walk order");
    let after = fx.mount.stats();
    let opens = after.get_or_zero("requests.open") - before.get_or_zero("requests.open");
    let fetched = after.get("files_prefetched") - before.get("files_prefetched");
    assert!(
        opens <= 2 && fetched >= 22,
        "24 files in 6 directories read in walk order: {opens} opens went to the server \
         and {fetched} files were fetched ahead (want at most 2 and at least 22)\n{after}"
    );
}

/// Reading the files of a directory one after another (here `cat` of each, as a build
/// or `grep -r` does): the first open of a directory fetches its other small files with
/// it, in one request, so the rest open without a round trip each; every byte is right,
/// and a file changed on the export after it was fetched that way reads new.
#[test]
fn reading_through_a_directory_fetches_its_small_files_together() {
    let mut rng = Rng::new(0x51b5);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for d in 0..3 {
        for f in 0..20 {
            let len = (rng.bytes(2)[0] as usize) * 60;
            files.push((format!("d{d}/f{f:02}"), rng.bytes(len + 1)));
        }
    }
    let Some(fx) = fixture_of_files(&files) else {
        return;
    };
    // Listed first (as `find` or a build's scan does), then read in order.
    let before = fx.mount.stats();
    let mut names: Vec<String> = Vec::new();
    for d in 0..3 {
        let mut entries: Vec<String> = fs::read_dir(fx.mnt(format!("d{d}")))
            .expect("list")
            .map(|e| format!("d{d}/{}", e.expect("entry").file_name().to_string_lossy()))
            .collect();
        entries.sort();
        names.extend(entries);
    }
    let out = ferry_tests::run(
        std::process::Command::new("cat")
            .args(&names)
            .current_dir(fx.mount.path()),
    );
    out.assert_success();
    let want: Vec<u8> = files.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_same_bytes(&out.stdout, &want, "cat of every file");
    let after = fx.mount.stats();
    let opens = after.get_or_zero("requests.open") - before.get_or_zero("requests.open");
    let fetched = after.get("files_prefetched") - before.get("files_prefetched");
    assert!(
        fetched >= 3 * 19 && opens <= 3 * 2,
        "60 files in 3 directories: {opens} opens went to the server and {fetched} files \
         came with their directories (want at most 6 and at least 57)\n{after}"
    );

    // Changed on the export after it came with its directory: read new.
    let (name, _) = &files[25];
    let new = rng.bytes(777);
    fs::write(fx.exp(name), &new).expect("change on the export");
    assert!(
        poll_until(PUSHED, || fs::read(fx.mnt(name)).is_ok_and(|d| d == new)),
        "{name} changed on the export does not read new"
    );
}
