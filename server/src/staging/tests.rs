//! Staging against models: byte ranges against a bitmap, the staged view of a file
//! against a `Vec<u8>` that has every operation applied directly.

use std::os::fd::{AsFd, OwnedFd};

use proptest::prelude::*;

use super::*;

#[test]
fn ranges_merge_clip_and_window() {
    let mut r = Ranges::default();
    r.insert(10, 20);
    r.insert(30, 40);
    r.insert(20, 25); // adjacent: merged
    assert_eq!(r.iter().collect::<Vec<_>>(), vec![(10, 25), (30, 40)]);
    r.insert(5, 35);
    assert_eq!(r.iter().collect::<Vec<_>>(), vec![(5, 40)]);
    r.insert(50, 50); // empty: ignored
    assert_eq!(r.within(0, 8).collect::<Vec<_>>(), vec![(5, 8)]);
    assert_eq!(r.within(39, 100).collect::<Vec<_>>(), vec![(39, 40)]);
    assert_eq!(r.within(40, 100).count(), 0);
    r.clip(12);
    assert_eq!(r.iter().collect::<Vec<_>>(), vec![(5, 12)]);
    r.clip(5);
    assert!(r.is_empty());
}

proptest! {
    #[test]
    fn ranges_match_a_bitmap(
        ops in proptest::collection::vec((0u64..200, 0u64..60, any::<bool>()), 1..40),
        window in (0u64..220, 0u64..220),
    ) {
        let mut r = Ranges::default();
        let mut bits = vec![false; 300];
        for (a, len, clip) in ops {
            if clip {
                r.clip(a);
                bits[a as usize..].iter_mut().for_each(|b| *b = false);
            } else {
                r.insert(a, a + len);
                bits[a as usize..(a + len) as usize].iter_mut().for_each(|b| *b = true);
            }
        }
        let mut seen = vec![false; 300];
        let mut last_end = None;
        for (s, e) in r.iter() {
            prop_assert!(s < e);
            // Disjoint and never adjacent.
            prop_assert!(last_end.is_none_or(|l| l < s));
            last_end = Some(e);
            seen[s as usize..e as usize].iter_mut().for_each(|b| *b = true);
        }
        prop_assert_eq!(&seen, &bits);
        let (a, b) = (window.0.min(window.1), window.0.max(window.1));
        let mut in_window = vec![false; 300];
        for (s, e) in r.within(a, b) {
            prop_assert!(a <= s && e <= b);
            in_window[s as usize..e as usize].iter_mut().for_each(|x| *x = true);
        }
        let expect: Vec<bool> = (0..300).map(|i| bits[i] && (a as usize..b as usize).contains(&i)).collect();
        prop_assert_eq!(in_window, expect);
    }
}

/// A directory with a real file holding `initial`, its `O_PATH` directory descriptor,
/// and a read-write descriptor of the file.
/// Undo records (and their data) in `undo`'s folder, its lock file aside.
fn records(undo: &UndoDir) -> usize {
    std::fs::read_dir(undo.dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "lock")
        .count()
}

/// The fixture's file, as the export (its directory) names it.
fn f_path() -> RelPath {
    RelPath(b"f".to_vec())
}

fn fixture(initial: &[u8]) -> (tempfile::TempDir, OwnedFd, OwnedFd) {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, initial).unwrap();
    let dirfd: OwnedFd = std::fs::File::open(dir.path()).unwrap().into();
    let real: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap()
        .into();
    (dir, dirfd, real)
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Truncate(u64),
    Read(u64, usize),
    Commit,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..600, proptest::collection::vec(any::<u8>(), 0..120))
            .prop_map(|(o, d)| Op::Write(o, d)),
        2 => (0u64..600).prop_map(Op::Truncate),
        3 => (0u64..700, 0usize..300).prop_map(|(o, l)| Op::Read(o, l)),
        1 => Just(Op::Commit),
    ]
}

fn model_read(m: &[u8], off: u64, len: usize) -> Vec<u8> {
    let off = (off as usize).min(m.len());
    m[off..(off + len).min(m.len())].to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Random writes, truncates and reads: what the handle shows is always the model,
    /// the real file stays at the last committed state, and a commit makes them equal.
    #[test]
    fn staged_view_matches_the_model(
        initial in proptest::collection::vec(any::<u8>(), 1..400),
        ops in proptest::collection::vec(op(), 1..40),
        redo in any::<bool>(),
    ) {
        let (dir, dirfd, real) = fixture(&initial);
        let state = tempfile::TempDir::new().unwrap();
        let export = crate::export::Export::open(dir.path(), false).unwrap();
        export.set_undo(UndoDir::open(state.path(), 1).unwrap());
        let undo = export.undo().unwrap();
        if redo {
            // Every commit that changes existing bytes keeps a redo record.
            undo.set_undo_max(0);
        }
        let mut st = Staging::create(dirfd.as_fd(), &f_path()).unwrap().expect("O_TMPFILE in the test dir");
        let mut model = initial.clone();
        let mut committed = initial.clone();
        for op in ops {
            match op {
                Op::Write(off, data) => {
                    prop_assert_eq!(st.write(real.as_fd(), off, &data).unwrap(), data.len());
                    if !data.is_empty() {
                        let end = off as usize + data.len();
                        if model.len() < end {
                            model.resize(end, 0);
                        }
                        model[off as usize..end].copy_from_slice(&data);
                    }
                }
                Op::Truncate(n) => {
                    st.truncate(real.as_fd(), n).unwrap();
                    model.resize(n as usize, 0);
                }
                Op::Read(off, len) => {
                    prop_assert_eq!(st.read(real.as_fd(), off, len).unwrap(), model_read(&model, off, len));
                }
                Op::Commit => {
                    // With redo records on, a commit that changes old bytes must keep one.
                    let saves = st.pending.as_ref().is_some_and(|p| {
                        !changed_regions(p, size_of(real.as_fd()).unwrap()).is_empty()
                    });
                    let kept = undo.redo_records_kept();
                    st.commit(real.as_fd(), export.records()).unwrap();
                    prop_assert_eq!(undo.redo_records_kept(), kept + u64::from(redo && saves));
                    prop_assert!(!st.has_pending());
                    // A commit that completed leaves no record behind, nor the
                    // hidden folder.
                    prop_assert_eq!(records(undo), 0);
                    prop_assert!(!dir.path().join(".ferryd").exists());
                    committed = model.clone();
                }
            }
            prop_assert_eq!(st.stat(real.as_fd()).unwrap().st_size as usize, model.len());
            prop_assert_eq!(st.read(real.as_fd(), 0, 1000).unwrap(), model.clone());
            prop_assert_eq!(&std::fs::read(dir.path().join("f")).unwrap(), &committed);
        }
        st.commit(real.as_fd(), None).unwrap();
        prop_assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), model);
    }
}

#[test]
fn dropping_without_commit_leaves_the_file_alone() {
    let (dir, dirfd, real) = fixture(b"original content");
    let before = std::fs::metadata(dir.path().join("f")).unwrap();
    let mut st = Staging::create(dirfd.as_fd(), &f_path()).unwrap().unwrap();
    st.write(real.as_fd(), 0, b"CHANGED").unwrap();
    st.truncate(real.as_fd(), 3).unwrap();
    st.write(real.as_fd(), 100, b"far").unwrap();
    drop(st);
    assert_eq!(
        std::fs::read(dir.path().join("f")).unwrap(),
        b"original content"
    );
    let after = std::fs::metadata(dir.path().join("f")).unwrap();
    assert_eq!(before.modified().unwrap(), after.modified().unwrap());
    // The staging file was never visible in the directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn commit_sets_the_time_of_the_last_write() {
    let (_dir, dirfd, real) = fixture(b"0123456789");
    let mut st = Staging::create(dirfd.as_fd(), &f_path()).unwrap().unwrap();
    st.write(real.as_fd(), 2, b"ab").unwrap();
    let written = now();
    let seen = st.stat(real.as_fd()).unwrap();
    // Make the commit time differ measurably from the write time: without the pause
    // both fall within the same clock tick and the test could not tell them apart.
    std::thread::sleep(std::time::Duration::from_millis(30));
    st.commit(real.as_fd(), None).unwrap();
    let after = crate::sys::fstat(real.as_fd()).unwrap();
    let m = (after.st_mtime, after.st_mtime_nsec);
    assert_eq!(m, (seen.st_mtime, seen.st_mtime_nsec));
    assert!(m <= (written.tv_sec, written.tv_nsec));
    // An explicit mtime after the last write survives the commit.
    st.write(real.as_fd(), 0, b"x").unwrap();
    let explicit = libc::timespec {
        tv_sec: 1_000_000_000,
        tv_nsec: 5,
    };
    st.set_mtime(explicit);
    st.commit(real.as_fd(), None).unwrap();
    let after = crate::sys::fstat(real.as_fd()).unwrap();
    assert_eq!((after.st_mtime, after.st_mtime_nsec), (1_000_000_000, 5));
}

#[test]
fn copy_without_copy_file_range_matches() {
    let (dir, _dirfd, real) = fixture(b"");
    let src_path = dir.path().join("src");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src_path, &data).unwrap();
    let src: OwnedFd = std::fs::File::open(&src_path).unwrap().into();
    copy_plain(src.as_fd(), real.as_fd(), 10, 2_500_000).unwrap();
    let got = std::fs::read(dir.path().join("f")).unwrap();
    assert_eq!(got.len(), 2_500_000);
    assert!(got[..10].iter().all(|&b| b == 0));
    assert_eq!(&got[10..], &data[10..2_500_000]);
}

#[test]
fn a_commit_is_small_without_truncation_and_with_few_bytes() {
    let (_dir, dirfd, real) = fixture(b"0123456789");
    let mut st = Staging::create(dirfd.as_fd(), &f_path()).unwrap().unwrap();
    assert!(st.commit_is_small(0), "nothing staged");
    st.write(real.as_fd(), 0, b"ab").unwrap();
    st.write(real.as_fd(), 5, b"cd").unwrap();
    assert!(st.commit_is_small(4));
    assert!(!st.commit_is_small(3));
    st.truncate(real.as_fd(), 8).unwrap();
    assert!(
        !st.commit_is_small(u64::MAX),
        "a truncation may free a large file"
    );
    st.commit(real.as_fd(), None).unwrap();
    assert!(st.commit_is_small(0), "nothing left after the commit");
}

/// A server that dies while applying a commit leaves the undo record; the next start
/// (`UndoDir::recover`) puts the old content, size and mtime back, whether the apply had
/// only cut the file or had finished.
#[test]
fn a_commit_a_crash_interrupts_is_rolled_back() {
    let old: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for finished in [false, true] {
        let (dir, dirfd, real) = fixture(&old);
        let before = std::fs::metadata(dir.path().join("f")).unwrap();
        let state = tempfile::TempDir::new().unwrap();
        let undo = UndoDir::open(state.path(), 7).unwrap();
        let mut st = Staging::create(dirfd.as_fd(), &f_path()).unwrap().unwrap();
        // A rewrite as `cp` makes it: cut to nothing, then new bytes, shorter.
        st.truncate(real.as_fd(), 0).unwrap();
        st.write(real.as_fd(), 0, &vec![7u8; 200_000]).unwrap();
        st.write(real.as_fd(), 250_000, b"tail").unwrap();
        // What `commit` does, up to the crash.
        let p = st.pending.as_ref().unwrap();
        let regions = changed_regions(p, size_of(real.as_fd()).unwrap());
        let record = undo.save(real.as_fd(), &f_path(), &regions).unwrap();
        if finished {
            st.apply(real.as_fd()).unwrap();
        } else {
            sys::ftruncate(real.as_fd(), 0).unwrap();
        }
        std::mem::forget(record);
        drop(st);
        let export = crate::export::Export::open(dir.path(), false).unwrap();
        assert_eq!(undo.recover(&export), 1, "finished {finished}");
        assert!(
            std::fs::read(dir.path().join("f")).unwrap() == old,
            "finished {finished}"
        );
        let after = std::fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!(before.modified().unwrap(), after.modified().unwrap());
        assert_eq!(records(&undo), 0, "records left");
    }
}

/// A record whose path leads to another file by the next start is not applied to it.
#[test]
fn a_record_never_rolls_back_another_file() {
    let (dir, dirfd, real) = fixture(b"old content of f");
    let state = tempfile::TempDir::new().unwrap();
    let undo = UndoDir::open(state.path(), 8).unwrap();
    let mut st = Staging::create(dirfd.as_fd(), &f_path()).unwrap().unwrap();
    st.write(real.as_fd(), 0, b"NEW").unwrap();
    let p = st.pending.as_ref().unwrap();
    let regions = changed_regions(p, size_of(real.as_fd()).unwrap());
    std::mem::forget(undo.save(real.as_fd(), &f_path(), &regions).unwrap());
    // Replaced by another file (another inode) before the server comes back.
    std::fs::write(dir.path().join("g"), b"another file").unwrap();
    std::fs::rename(dir.path().join("g"), dir.path().join("f")).unwrap();
    let export = crate::export::Export::open(dir.path(), false).unwrap();
    assert_eq!(undo.recover(&export), 0);
    assert_eq!(
        std::fs::read(dir.path().join("f")).unwrap(),
        b"another file"
    );
    assert_eq!(records(&undo), 0, "records left");
}

/// A server that dies while applying a commit too large for an undo record leaves a
/// redo record and the staging file linked in the hidden folder; the next start
/// finishes the apply: new content and mtime, whether the apply had only cut the file,
/// had finished, or had not begun. The folder is gone afterwards.
#[test]
fn a_large_commit_a_crash_interrupts_is_finished() {
    let old: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut new = vec![7u8; 200_000];
    new.resize(250_000, 0);
    new.extend_from_slice(b"tail");
    for crash in ["cut", "finished", "not begun"] {
        let (dir, dirfd, real) = fixture(&old);
        let state = tempfile::TempDir::new().unwrap();
        let undo = UndoDir::open(state.path(), 9).unwrap();
        let export = crate::export::Export::open(dir.path(), false).unwrap();
        let mut st = Staging::create(dirfd.as_fd(), &f_path()).unwrap().unwrap();
        st.truncate(real.as_fd(), 0).unwrap();
        st.write(real.as_fd(), 0, &new[..200_000]).unwrap();
        st.write(real.as_fd(), 250_000, b"tail").unwrap();
        let plan = st.plan().unwrap();
        // What `commit` does, up to the crash.
        let redo = undo
            .save_redo(
                export.area(),
                real.as_fd(),
                &f_path(),
                st.file.as_fd(),
                &plan,
            )
            .unwrap();
        assert!(dir.path().join(".ferryd").is_dir(), "{crash}");
        match crash {
            "cut" => sys::ftruncate(real.as_fd(), 0).unwrap(),
            "finished" => apply_plan(st.file.as_fd(), real.as_fd(), &plan).unwrap(),
            _ => {}
        }
        std::mem::forget(redo);
        // The staging file lives on through its link only.
        drop(st);
        let restarted = crate::export::Export::open(dir.path(), false).unwrap();
        assert_eq!(undo.recover(&restarted), 1, "{crash}");
        assert!(
            std::fs::read(dir.path().join("f")).unwrap() == new,
            "{crash}"
        );
        let mtime = std::fs::metadata(dir.path().join("f"))
            .unwrap()
            .modified()
            .unwrap();
        let want = std::time::UNIX_EPOCH
            + std::time::Duration::new(plan.mtime.0 as u64, plan.mtime.1 as u32);
        assert_eq!(mtime, want, "{crash}");
        assert!(!dir.path().join(".ferryd").exists(), "{crash}: folder left");
        assert_eq!(records(&undo), 0, "{crash}: records left");
    }
}

/// A redo record whose path leads to another file by the next start is not applied
/// to it, and its link goes with the folder.
#[test]
fn a_redo_record_never_touches_another_file() {
    let (dir, dirfd, real) = fixture(b"old content of f");
    let state = tempfile::TempDir::new().unwrap();
    let undo = UndoDir::open(state.path(), 10).unwrap();
    let export = crate::export::Export::open(dir.path(), false).unwrap();
    let mut st = Staging::create(dirfd.as_fd(), &f_path()).unwrap().unwrap();
    st.write(real.as_fd(), 0, b"NEW").unwrap();
    let plan = st.plan().unwrap();
    std::mem::forget(
        undo.save_redo(
            export.area(),
            real.as_fd(),
            &f_path(),
            st.file.as_fd(),
            &plan,
        )
        .unwrap(),
    );
    drop(st);
    std::fs::write(dir.path().join("g"), b"another file").unwrap();
    std::fs::rename(dir.path().join("g"), dir.path().join("f")).unwrap();
    let restarted = crate::export::Export::open(dir.path(), false).unwrap();
    assert_eq!(undo.recover(&restarted), 0);
    assert_eq!(
        std::fs::read(dir.path().join("f")).unwrap(),
        b"another file"
    );
    assert!(!dir.path().join(".ferryd").exists(), "folder left");
    assert_eq!(records(&undo), 0, "records left");
}

/// While the hidden folder exists, no path reaches it: not its name, not a symlink to
/// it, not a name made, renamed or removed over it at the root.
#[test]
fn the_hidden_folder_is_out_of_reach() {
    let (dir, _dirfd, _real) = fixture(b"x");
    let export = crate::export::Export::open(dir.path(), false).unwrap();
    std::os::unix::fs::symlink(".ferryd", dir.path().join("l")).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("..", dir.path().join("sub/up")).unwrap();
    let p = |s: &str| RelPath(s.as_bytes().to_vec());
    let n = |s: &str| ferry_common::Name(s.as_bytes().to_vec());
    {
        let _held = export.area().enter().unwrap();
        assert!(dir.path().join(".ferryd").is_dir());
        for path in [".ferryd", "l", "sub/up/.ferryd"] {
            assert_eq!(
                export.resolve_dir(&p(path)).err(),
                Some(libc::EACCES),
                "{path}"
            );
        }
        assert_eq!(
            export.resolve(&p(".ferryd"), libc::O_RDONLY).err(),
            Some(libc::EACCES)
        );
        assert_eq!(
            export.resolve(&p("sub/up/.ferryd"), libc::O_PATH).err(),
            Some(libc::EACCES)
        );
        assert_eq!(
            export.entry(&p(""), &n(".ferryd")).err(),
            Some(libc::EACCES)
        );
        assert_eq!(
            export.entry(&p("sub/up"), &n(".ferryd")).err(),
            Some(libc::EACCES)
        );
        assert_eq!(export.entry(&p("l"), &n("x")).err(), Some(libc::EACCES));
        // The name elsewhere is anybody's.
        assert!(export.entry(&p("sub"), &n(".ferryd")).is_ok());
        // A symlink itself (not followed) is only a symlink.
        assert!(export.resolve(&p("l"), libc::O_PATH).is_ok());
    }
    // Gone with the last user; the names stay reserved (a client's `.ferryd` could
    // otherwise be adopted, or keep every large commit from its record).
    assert!(!dir.path().join(".ferryd").exists());
    assert_eq!(
        export.entry(&p(""), &n(".ferryd")).err(),
        Some(libc::EACCES)
    );
    assert_eq!(
        export.entry(&p(""), &n(".ferryd.0123")).err(),
        Some(libc::EACCES)
    );
    assert_eq!(
        export.resolve(&p(".ferryd/x"), libc::O_PATH).err(),
        Some(libc::EACCES)
    );
    // No folder made under its random name is left at the root.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with(".ferryd"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // A `.ferryd` that ferryd did not make (even an empty private one) is never taken.
    std::fs::create_dir(dir.path().join(".ferryd")).unwrap();
    std::fs::set_permissions(
        dir.path().join(".ferryd"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    assert_eq!(export.area().enter().err(), Some(libc::EEXIST));
    assert!(
        dir.path().join(".ferryd").is_dir(),
        "someone else's folder removed"
    );
}

/// Every large commit of a handle keeps a redo record, not only its first: the
/// linked staging file (which cannot be linked twice) is replaced after each.
#[test]
fn every_large_commit_of_a_handle_keeps_a_redo_record() {
    let (dir, dirfd, real) = fixture(&[5u8; 100_000]);
    let state = tempfile::TempDir::new().unwrap();
    let export = crate::export::Export::open(dir.path(), false).unwrap();
    export.set_undo(UndoDir::open(state.path(), 11).unwrap());
    let undo = export.undo().unwrap();
    undo.set_undo_max(0);
    let mut st = Staging::create(dirfd.as_fd(), &f_path()).unwrap().unwrap();
    for round in 1..=3u8 {
        st.write(real.as_fd(), 1000, &[round; 50_000]).unwrap();
        st.commit(real.as_fd(), export.records()).unwrap();
        assert_eq!(undo.redo_records_kept(), u64::from(round), "round {round}");
        let now = std::fs::read(dir.path().join("f")).unwrap();
        assert!(
            now[1000..51_000].iter().all(|&b| b == round),
            "round {round}"
        );
        assert_eq!(records(undo), 0, "round {round}: records left");
        assert!(!dir.path().join(".ferryd").exists(), "round {round}");
    }
    // Staged reads after the swap see the file.
    st.write(real.as_fd(), 0, b"AB").unwrap();
    assert_eq!(st.read(real.as_fd(), 0, 4).unwrap(), b"AB\x05\x05");
}
