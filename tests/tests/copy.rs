//! `copy_file_range(2)` inside one mount (what `cp` uses first): the server copies between
//! the two open files, so the bytes never cross the network; into a file open for writing
//! the copy is staged like a write (the export changes at close, and a failed close keeps
//! the old content: see `server_killed`); the copy sees this client's uncommitted writes
//! to the source; cached bytes of the destination are never served after it.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::process::Command;

use ferry_tests::process::{no_spawns, run};
use ferry_tests::rng::Rng;
use ferry_tests::sys::copy_file_range;
use ferry_tests::{assert_same_bytes, fixture_with};

const MIB: usize = 1024 * 1024;

/// `cp` of a 24 MiB file inside the mount: the copy is right on the export and through
/// the mount, the server did it (`bytes_copied_on_server`), and no file data went over
/// the connection either way.
#[test]
fn cp_inside_the_mount_copies_on_the_server() {
    let data = Rng::new(0xc0b1).bytes(24 * MIB);
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("src.bin"), &data).expect("write the export");
    }) else {
        return;
    };
    let before = fx.mount.stats();
    run(Command::new("cp")
        .arg(fx.mnt("src.bin"))
        .arg(fx.mnt("dst.bin")))
    .assert_success();
    let after = fx.mount.stats();
    assert_same_bytes(
        &fs::read(fx.exp("dst.bin")).expect("read the export"),
        &data,
        "the copy on the export",
    );
    let copied = after.get("bytes_copied_on_server") - before.get("bytes_copied_on_server");
    assert_eq!(
        copied,
        data.len() as u64,
        "bytes copied by the server\nbefore: {before}\nafter: {after}"
    );
    for key in ["bytes_sent", "bytes_received", "bytes_read_from_server"] {
        let moved = after.get(key) - before.get(key);
        assert!(
            moved < MIB as u64,
            "{key} grew by {moved} bytes during a server-side copy of {} bytes\nafter: {after}",
            data.len()
        );
    }
    assert_same_bytes(
        &fs::read(fx.mnt("dst.bin")).expect("read the copy through the mount"),
        &data,
        "the copy through the mount",
    );
}

/// A copy from a file with writes not yet closed into the middle of an existing file
/// that was read (so cached) first: the copy carries the new bytes; reads through the
/// destination's descriptor see the copied bytes at once, not the cached old ones; the
/// export keeps the old content until the destination is closed, then has exactly the
/// spliced result; a copy past the source's end copies nothing.
#[test]
fn a_copy_sees_uncommitted_writes_and_is_staged_until_close() {
    let mut rng = Rng::new(0xc0b2);
    let old_dst = rng.bytes(3 * MIB);
    let old_src = rng.bytes(2 * MIB);
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("dst.bin"), &old_dst).expect("write the export");
        fs::write(e.join("src.bin"), &old_src).expect("write the export");
    }) else {
        return;
    };
    // Cache both (disk cache and kernel pages).
    assert_same_bytes(&fs::read(fx.mnt("dst.bin")).expect("read"), &old_dst, "dst");
    assert_same_bytes(&fs::read(fx.mnt("src.bin")).expect("read"), &old_src, "src");

    // Our own descriptors stay open below: no other test's child may close them early.
    let guard = no_spawns();
    let src = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.mnt("src.bin"))
        .expect("open src");
    let patch = rng.bytes(MIB / 2 + 123);
    src.write_all_at(&patch, 1000).expect("write into src");
    let mut new_src = old_src.clone();
    new_src[1000..1000 + patch.len()].copy_from_slice(&patch);

    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.mnt("dst.bin"))
        .expect("open dst");
    let (from, to, len) = (500u64, 700_000u64, MIB + 4321);
    let mut done = 0usize;
    while done < len {
        let n = copy_file_range(&src, from + done as u64, &dst, to + done as u64, len - done)
            .expect("copy_file_range inside the mount");
        assert!(n > 0, "copy_file_range copied nothing at {done} of {len}");
        done += n;
    }
    let mut want = old_dst.clone();
    want[to as usize..to as usize + len]
        .copy_from_slice(&new_src[from as usize..from as usize + len]);

    let mut through_fd = vec![0u8; want.len()];
    dst.read_exact_at(&mut through_fd, 0)
        .expect("read dst through its descriptor");
    assert_same_bytes(
        &through_fd,
        &want,
        "dst through its descriptor after the copy",
    );
    assert_same_bytes(
        &fs::read(fx.exp("dst.bin")).expect("read the export"),
        &old_dst,
        "the export's dst before the close (the copy is staged)",
    );
    assert_eq!(
        copy_file_range(&src, old_src.len() as u64 + 10, &dst, 0, 4096)
            .expect("copy from past the source's end"),
        0,
        "bytes copied from past the source's end"
    );

    ferry_tests::sys::close(dst).expect("close dst");
    ferry_tests::sys::close(src).expect("close src");
    drop(guard);
    assert_same_bytes(
        &fs::read(fx.exp("dst.bin")).expect("read the export"),
        &want,
        "the export's dst after the close",
    );
    assert_same_bytes(
        &fs::read(fx.exp("src.bin")).expect("read the export"),
        &new_src,
        "the export's src after the close",
    );
    assert_same_bytes(
        &fs::read(fx.mnt("dst.bin")).expect("read through the mount"),
        &want,
        "dst through the mount after the close",
    );
    let st = fx.mount.stats();
    assert!(
        st.get("bytes_copied_on_server") >= len as u64,
        "the copy was not done by the server\n{st}"
    );
}

/// A copy that extends the destination: its size is right at once through the open
/// descriptor and through `stat`, and a copy into a file opened read-only fails with
/// EBADF.
#[test]
fn a_copy_past_the_end_grows_the_file() {
    let data = Rng::new(0xc0b3).bytes(300_000);
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("src.bin"), &data).expect("write the export");
        fs::write(e.join("dst.bin"), b"head").expect("write the export");
    }) else {
        return;
    };
    let guard = no_spawns();
    let src = File::open(fx.mnt("src.bin")).expect("open src");
    let dst = OpenOptions::new()
        .write(true)
        .open(fx.mnt("dst.bin"))
        .expect("open dst");
    let n = copy_file_range(&src, 0, &dst, 10, data.len()).expect("copy");
    assert_eq!(n, data.len(), "bytes copied");
    let want_len = 10 + data.len() as u64;
    assert_eq!(dst.metadata().expect("fstat").len(), want_len, "fstat size");
    assert_eq!(
        fs::metadata(fx.mnt("dst.bin")).expect("stat").len(),
        want_len,
        "stat size"
    );
    let ro = File::open(fx.mnt("dst.bin")).expect("open dst read-only");
    ferry_tests::assert_errno(copy_file_range(&src, 0, &ro, 0, 10), libc::EBADF);
    drop(ro);
    ferry_tests::sys::close(dst).expect("close dst");
    drop(src);
    drop(guard);
    let mut want = b"head".to_vec();
    want.resize(10, 0);
    want.extend_from_slice(&data);
    assert_same_bytes(
        &fs::read(fx.exp("dst.bin")).expect("read the export"),
        &want,
        "the export's dst",
    );
}
