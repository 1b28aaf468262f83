//! Reading and writing: offsets, holes, O_APPEND, O_TRUNC, O_EXCL, a large file.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use ferry_tests::rng::{Rng, fnv1a};
use ferry_tests::{TestMount, assert_errno, fixture, wait_for};

#[test]
fn write_and_read_at_offsets() {
    let Some(fx) = fixture() else { return };
    let p = fx.mnt("f.txt");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .expect("create through the mount");
    f.write_all(b"hello brave new world").expect("write");
    f.seek(SeekFrom::Start(6)).expect("seek");
    f.write_all(b"BRAVE").expect("write in the middle");
    f.write_all_at(b"WORLD", 16).expect("pwrite at the end");
    let mut buf = [0u8; 5];
    f.read_exact_at(&mut buf, 6).expect("pread");
    assert_eq!(&buf, b"BRAVE");
    f.seek(SeekFrom::Start(0)).expect("seek to 0");
    let mut all = String::new();
    f.read_to_string(&mut all).expect("read all");
    assert_eq!(all, "hello BRAVE new WORLD");
    drop(f);
    assert_eq!(
        fs::read(fx.exp("f.txt")).expect("export"),
        b"hello BRAVE new WORLD"
    );

    // Ranges through a fresh read-only handle: inside, at the end (short), past the end.
    let f = File::open(&p).expect("open for reading");
    let mut three = [0u8; 3];
    f.read_exact_at(&mut three, 12).expect("pread 3 at 12");
    assert_eq!(&three, b"new");
    let mut ten = [0u8; 10];
    let n = f.read_at(&mut ten, 16).expect("pread across EOF");
    assert_eq!(&ten[..n], b"WORLD", "short read at the end of the file");
    assert_eq!(f.read_at(&mut ten, 100).expect("pread past EOF"), 0);
    drop(f);

    // A write far past the end leaves a hole of zeros.
    let f = OpenOptions::new().write(true).open(&p).expect("open rw");
    let far = 1u64 << 20;
    f.write_all_at(b"tail", far).expect("pwrite past EOF");
    drop(f);
    for (label, data) in [
        ("export", fs::read(fx.exp("f.txt")).expect("export")),
        ("mount", fs::read(&p).expect("mount")),
    ] {
        assert_eq!(
            data.len() as u64,
            far + 4,
            "{label}: size after sparse write"
        );
        assert_eq!(&data[..21], b"hello BRAVE new WORLD", "{label}: head");
        assert!(
            data[21..far as usize].iter().all(|&b| b == 0),
            "{label}: the hole is not zeros"
        );
        assert_eq!(&data[far as usize..], b"tail", "{label}: tail");
    }
    assert_eq!(fs::metadata(&p).expect("stat").len(), far + 4);
}

#[test]
fn append_mode_writes_at_the_end() {
    let Some(fx) = fixture() else { return };
    let p = fx.mnt("log");
    fs::write(&p, b"abc").expect("write");
    let mut a = OpenOptions::new()
        .append(true)
        .open(&p)
        .expect("open O_APPEND");
    a.write_all(b"def").expect("append");
    // Another handle extends the file behind the appender's back...
    let b = OpenOptions::new().write(true).open(&p).expect("open rw");
    b.write_all_at(b"0123456789", 0).expect("pwrite");
    // ...and the next append still lands at the (new) end, even one given an offset.
    a.write_all(b"XY").expect("append after extension");
    a.write_all_at(b"Z", 0)
        .expect("pwrite on an O_APPEND handle (Linux appends)");
    drop((a, b));
    assert_eq!(fs::read(fx.exp("log")).expect("export"), b"0123456789XYZ");
    assert_eq!(fs::read(&p).expect("mount"), b"0123456789XYZ");
}

#[test]
fn truncate_on_open() {
    let Some(fx) = fixture() else { return };
    let p = fx.mnt("t");
    fs::write(&p, vec![b'a'; 100]).expect("write 100 bytes");
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .expect("open O_TRUNC");
    f.write_all(b"x").expect("write");
    drop(f);
    assert_eq!(fs::read(fx.exp("t")).expect("export"), b"x");
    assert_eq!(fs::read(&p).expect("mount"), b"x");
    File::create(&p).expect("O_CREAT|O_TRUNC on an existing file");
    assert_eq!(fs::metadata(fx.exp("t")).expect("export").len(), 0);
    assert_eq!(fs::metadata(&p).expect("mount").len(), 0);
}

/// A new file is written directly on the server (it has no old content to protect), but
/// once a close or fsync committed it, a second writer must be staged like any writer of
/// an existing file: its ftruncate and writes reach the export at its fsync or close,
/// not before. The creator's descriptor is kept open: the client is then in the state of
/// a file created and closed whose RELEASE the kernel has not delivered yet (it is sent
/// after `close` returns), in which a reopen once reused the direct handle.
///
/// The steps run in a process of their own (this test binary, running only
/// [`staged_writer_steps`]): a process that another test thread spawns meanwhile gets
/// copies of every descriptor, and closing them at its `exec` sends FLUSH, which commits
/// (close-to-open, as NFS does) and would put the staged bytes on the export early.
#[test]
fn a_committed_new_file_gets_a_staged_writer() {
    let Some(fx) = fixture() else { return };
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "basic::io::staged_writer_steps",
            "--include-ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(STEPS_MOUNT, fx.mnt(""))
        .env(STEPS_EXPORT, fx.exp(""))
        .output()
        .expect("run the steps");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the steps failed:\n{text}");
    assert!(text.contains("1 passed"), "the steps did not run:\n{text}");
}

const STEPS_MOUNT: &str = "FERRY_STEPS_MOUNT";
const STEPS_EXPORT: &str = "FERRY_STEPS_EXPORT";

#[test]
#[ignore = "the body of a_committed_new_file_gets_a_staged_writer, run by it"]
fn staged_writer_steps() {
    let (Some(mnt), Some(exp)) = (
        std::env::var_os(STEPS_MOUNT),
        std::env::var_os(STEPS_EXPORT),
    ) else {
        // Run on its own (`--include-ignored`): there is no mount to work in.
        eprintln!("staged_writer_steps: run by a_committed_new_file_gets_a_staged_writer");
        return;
    };
    let p = std::path::Path::new(&mnt).join("f");
    let e = std::path::Path::new(&exp).join("f");
    let first = File::create(&p).expect("create");
    first.write_all_at(b"first", 0).expect("write");
    first.sync_all().expect("fsync");
    assert_eq!(fs::read(&e).expect("export"), b"first");
    let second = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("second open for writing");
    second.set_len(0).expect("ftruncate");
    second.write_all_at(b"second", 0).expect("write");
    // The creator's later writes go the same (staged) way.
    first.write_all_at(b"!", 6).expect("creator writes after");
    assert_eq!(
        fs::read(&e).expect("export"),
        b"first",
        "uncommitted writes of a second writer reached the export"
    );
    let mut got = Vec::new();
    (&second)
        .read_to_end(&mut got)
        .expect("read back through the second");
    assert_eq!(got, b"second!");
    second.sync_all().expect("fsync of the second");
    assert_eq!(fs::read(&e).expect("export"), b"second!");
    drop(second);
    drop(first);
    assert_eq!(fs::read(&p).expect("mount"), b"second!");
}

/// An O_TRUNC open of a file with content is staged although it starts empty: a second
/// writer arriving after its fsync, with writes made since, must not strand those
/// writes on a handle nobody commits.
#[test]
fn an_o_trunc_writer_keeps_what_it_wrote_after_its_fsync() {
    let Some(fx) = fixture() else { return };
    let p = fx.mnt("f");
    fs::write(&p, b"old content").expect("write");
    let first = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .expect("O_TRUNC open");
    first.write_all_at(b"abc", 0).expect("write");
    first.sync_all().expect("fsync");
    first
        .write_all_at(b"def", 3)
        .expect("write after the fsync");
    let second = OpenOptions::new()
        .write(true)
        .open(&p)
        .expect("second open for writing");
    second
        .write_all_at(b"g", 6)
        .expect("write through the second");
    drop(first);
    drop(second);
    assert_eq!(fs::read(fx.exp("f")).expect("export"), b"abcdefg");
    assert_eq!(fs::read(&p).expect("mount"), b"abcdefg");
}

#[test]
fn exclusive_create() {
    let Some(fx) = fixture() else { return };
    let p = fx.mnt("x");
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .expect("O_CREAT|O_EXCL on a new name");
    f.write_all(b"first").expect("write");
    drop(f);
    assert_errno(
        OpenOptions::new().write(true).create_new(true).open(&p),
        libc::EEXIST,
    );
    assert_eq!(fs::read(fx.exp("x")).expect("export"), b"first");
    fs::create_dir(fx.mnt("d")).expect("mkdir");
    assert_errno(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(fx.mnt("d")),
        libc::EEXIST,
    );
    // O_EXCL does not follow a dangling symlink: the name exists.
    std::os::unix::fs::symlink("nowhere", fx.mnt("dangling")).expect("symlink");
    assert_errno(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(fx.mnt("dangling")),
        libc::EEXIST,
    );
    assert!(!fx.exp("nowhere").exists());
}

/// Shared writable mappings reach the export (what git, databases and linkers use).
#[test]
fn mmap_shared_writes_reach_the_export() {
    let Some(fx) = fixture() else { return };
    const LEN: usize = 3 * 4096 + 100;
    let p = fx.mnt("mapped");
    fs::write(&p, vec![b'.'; LEN]).expect("write");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("open rw");
    // SAFETY: a fresh shared mapping of LEN bytes of an open file, unmapped below, and
    // written only within its bounds.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let bytes = std::slice::from_raw_parts_mut(addr.cast::<u8>(), LEN);
        assert_eq!(bytes[LEN - 1], b'.', "mapped content");
        bytes[0] = b'A';
        bytes[4096] = b'B';
        bytes[LEN - 1] = b'Z';
        assert_eq!(
            libc::msync(addr, LEN, libc::MS_SYNC),
            0,
            "msync: {}",
            std::io::Error::last_os_error()
        );
        libc::munmap(addr, LEN);
    }
    drop(f);
    let data = fs::read(fx.exp("mapped")).expect("export");
    assert_eq!(data.len(), LEN);
    assert_eq!((data[0], data[4096], data[LEN - 1]), (b'A', b'B', b'Z'));
    assert_eq!(data.iter().filter(|&&b| b == b'.').count(), LEN - 3);
}

/// Several threads doing I/O on the one mount at once (one connection, requests
/// multiplexed): every file ends up with its own content.
#[test]
fn parallel_writers_and_readers() {
    let Some(fx) = fixture() else { return };
    let root = fx.mount.path().to_path_buf();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let root = root.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(t);
                let data = rng.bytes(2 << 20);
                let dir = root.join(format!("t{t}"));
                fs::create_dir(&dir).expect("mkdir");
                for i in 0..4 {
                    let p = dir.join(format!("f{i}"));
                    fs::write(&p, &data[i * 1000..]).expect("write");
                    let back = fs::read(&p).expect("read");
                    assert!(back == data[i * 1000..], "thread {t} file {i} differs");
                }
                fnv1a(&data)
            })
        })
        .collect();
    let sums: Vec<u64> = threads
        .into_iter()
        .map(|t| t.join().expect("worker thread"))
        .collect();
    for (t, sum) in sums.iter().enumerate() {
        for i in 0..4 {
            let want = Rng::new(t as u64).bytes(2 << 20);
            assert_eq!(fnv1a(&want), *sum);
            let got = fs::read(fx.exp(format!("t{t}/f{i}"))).expect("export");
            assert!(got == want[i * 1000..], "export t{t}/f{i} differs");
        }
    }
}

/// 64 MiB of pseudo-random data written through the mount: the export has the same bytes,
/// the mount reads them back, and so does a second mount (whose caches are cold).
#[test]
fn large_file_roundtrip() {
    let Some(fx) = fixture() else { return };
    const SIZE: usize = 64 << 20;
    let mut rng = Rng::new(0x1a46e);
    let data = rng.bytes(SIZE);
    let want = fnv1a(&data);
    let p = fx.mnt("big.bin");
    let t = Instant::now();
    let mut f = File::create(&p).expect("create");
    // Uneven chunks, so writes straddle page and request boundaries.
    let mut off = 0;
    while off < SIZE {
        let n = (rng.range(1, 3 << 20) as usize).min(SIZE - off);
        f.write_all(&data[off..off + n]).expect("write chunk");
        off += n;
    }
    f.sync_all().expect("fsync");
    drop(f);
    eprintln!("wrote 64 MiB through the mount in {:?}", t.elapsed());
    assert_big_eq(
        "export",
        &fs::read(fx.exp("big.bin")).expect("export"),
        &data,
    );
    let t = Instant::now();
    assert_big_eq("mount", &fs::read(&p).expect("read back"), &data);
    eprintln!("read 64 MiB back in {:?}", t.elapsed());
    let second = TestMount::new(&fx.server);
    let t = Instant::now();
    let cold = fs::read(second.join("big.bin")).expect("read through a second mount");
    eprintln!("read 64 MiB cold in {:?}", t.elapsed());
    assert_big_eq("second mount", &cold, &data);
    // Random ranges through a handle.
    let f = File::open(&p).expect("open");
    for _ in 0..64 {
        let off = rng.below(SIZE as u64) as usize;
        let len = (rng.range(1, 300_000) as usize).min(SIZE - off);
        let mut buf = vec![0; len];
        f.read_exact_at(&mut buf, off as u64).expect("pread");
        assert!(buf == data[off..off + len], "range {off}+{len} differs");
    }
    assert_eq!(fnv1a(&data), want);
}

#[track_caller]
fn assert_big_eq(label: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    panic!(
        "{label}: {} bytes (fnv {:016x}) instead of {} (fnv {:016x}); first difference at {:?}",
        got.len(),
        fnv1a(got),
        want.len(),
        fnv1a(want),
        first
    );
}

/// The release of a closed file may wait in the client for a request to go out with (a
/// deferred request, `Outbox` in `fuse-client/src/conn.rs`); with nothing sent after
/// it, it still reaches the server, which then lets go of the file.
#[test]
fn a_release_with_nothing_sent_after_it_still_closes_the_file_on_the_server() {
    let Some(fx) = fixture() else { return };
    fs::write(fx.mnt("f"), b"written").expect("write through the mount");
    // Read on the server's disk: nothing more goes through the mount.
    assert_eq!(fs::read(fx.exp("f")).expect("export"), b"written");
    let file = fx.exp("f");
    let fds = format!("/proc/{}/fd", fx.server.pid());
    let holds_file = || {
        fs::read_dir(&fds)
            .expect("ferryd's descriptors")
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == file))
    };
    wait_for(
        Duration::from_secs(10),
        "ferryd to close the file released through the mount",
        || !holds_file(),
    );
}
