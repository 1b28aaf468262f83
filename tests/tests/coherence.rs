//! Changes made behind a mount's back (on the server's disk, or through a second mount of
//! the same export) become visible through it: the server pushes change events and the
//! client drops what it cached (the issue promises ~100 ms; every check here polls under
//! a generous deadline instead, and never sleeps).
//!
//! Close-to-open is stricter and is checked without any polling: once `close()` returned
//! 0 on one mount, an `open()` + read on another mount right afterwards returns the new
//! content.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::rng::Rng;
use ferry_tests::sys::close;
use ferry_tests::{TestMount, fixture_with, poll_until};

const DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of the checks of pushed invalidation (promised: ~100 ms).
const PUSHED: Duration = Duration::from_secs(5);

fn listed(dir: &Path, name: &str) -> bool {
    fs::read_dir(dir)
        .map(|d| d.flatten().any(|e| e.file_name() == name))
        .unwrap_or(false)
}

#[track_caller]
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    assert!(
        poll_until(DEADLINE, &mut cond),
        "not visible within {DEADLINE:?}: {what}"
    );
}

#[test]
fn changes_on_the_export_show_through_the_mount() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::create_dir(e.join("dir")).expect("mkdir");
        fs::write(e.join("dir/old"), b"old content").expect("write");
    }) else {
        return;
    };
    // Let the mount cache what there is.
    assert!(listed(&fx.mnt("dir"), "old"));
    assert_eq!(fs::read(fx.mnt("dir/old")).expect("read"), b"old content");

    fs::write(fx.exp("dir/new"), b"created on the server").expect("write");
    eventually("a file created on the export is listed", || {
        listed(&fx.mnt("dir"), "new")
    });
    eventually("a file created on the export is readable", || {
        fs::read(fx.mnt("dir/new")).is_ok_and(|d| d == b"created on the server")
    });
    fs::write(fx.exp("dir/old"), b"rewritten on the server, longer").expect("write");
    eventually("new content of a cached file", || {
        fs::read(fx.mnt("dir/old")).is_ok_and(|d| d == b"rewritten on the server, longer")
    });
    fs::rename(fx.exp("dir/old"), fx.exp("dir/renamed")).expect("rename");
    eventually("a rename on the export", || {
        fs::metadata(fx.mnt("dir/old")).is_err()
            && fs::read(fx.mnt("dir/renamed"))
                .is_ok_and(|d| d == b"rewritten on the server, longer")
    });
    fs::remove_file(fx.exp("dir/new")).expect("unlink");
    eventually("an unlink on the export", || {
        fs::metadata(fx.mnt("dir/new")).is_err() && !listed(&fx.mnt("dir"), "new")
    });
    fs::set_permissions(fx.exp("dir/renamed"), fs::Permissions::from_mode(0o600)).expect("chmod");
    eventually("a chmod on the export", || {
        fs::metadata(fx.mnt("dir/renamed")).is_ok_and(|m| m.permissions().mode() & 0o777 == 0o600)
    });
}

#[test]
fn two_mounts_see_each_others_changes() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("shared"), b"v1").expect("write");
    }) else {
        return;
    };
    let other = TestMount::new(&fx.server);
    let (a, b) = (fx.mount.path(), other.path());
    assert_eq!(fs::read(a.join("shared")).expect("read"), b"v1");
    assert_eq!(fs::read(b.join("shared")).expect("read"), b"v1");
    fs::write(a.join("shared"), b"version two").expect("write through A");
    eventually("A's write through B", || {
        fs::read(b.join("shared")).is_ok_and(|d| d == b"version two")
    });
    fs::create_dir(b.join("from_b")).expect("mkdir through B");
    fs::write(b.join("from_b/f"), b"bee").expect("write through B");
    eventually("B's new directory through A", || {
        fs::read(a.join("from_b/f")).is_ok_and(|d| d == b"bee")
    });
    fs::remove_file(a.join("shared")).expect("unlink through A");
    eventually("A's unlink through B", || {
        !listed(b, "shared") && fs::metadata(b.join("shared")).is_err()
    });
}

/// Writes `data` to `path` (created or truncated) and closes it, reporting a failed close:
/// `fs::write` drops its `File`, which ignores what close says.
fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    close(f)
}

/// Whether `path` is gone: `ENOENT`, not some other error.
fn absent(path: &Path) -> bool {
    matches!(fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// A place files are changed and observed from: a mount, or the export itself.
struct Side<'a> {
    name: &'static str,
    root: &'a Path,
    export: bool,
}

/// Checks that `cond` holds on `seen_from` after `actor` made a change. On the export it
/// must hold at once (a mount's call returned only after the server applied it); on a
/// mount it must hold within [`PUSHED`]. Returns how long it took.
#[track_caller]
fn observe(
    actor: &Side,
    seen_from: &Side,
    what: &str,
    mut cond: impl FnMut(&Path) -> bool,
) -> Duration {
    let start = Instant::now();
    let ok = if seen_from.export {
        cond(seen_from.root)
    } else {
        poll_until(PUSHED, || cond(seen_from.root))
    };
    assert!(
        ok,
        "{} did not see {}'s change within {:?}: {what}",
        seen_from.name,
        actor.name,
        if seen_from.export {
            Duration::ZERO
        } else {
            PUSHED
        }
    );
    start.elapsed()
}

fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// Each of two mounts and the export in turn creates, grows, shrinks, chmods, renames and
/// deletes a file and a directory; the two other sides see every step.
#[test]
fn every_side_sees_every_other_sides_changes() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::create_dir(e.join("shared")).expect("mkdir");
        fs::write(e.join("shared/resident"), b"here all along").expect("write");
    }) else {
        return;
    };
    let other = TestMount::new(&fx.server);
    let sides = [
        Side {
            name: "mount A",
            root: fx.mount.path(),
            export: false,
        },
        Side {
            name: "mount B",
            root: other.path(),
            export: false,
        },
        Side {
            name: "the export",
            root: fx.server.export_path(),
            export: true,
        },
    ];
    // Every side has the directory listed (twice: the second may come from a cache) and
    // its one file read before anything changes.
    for s in &sides {
        for _ in 0..2 {
            assert!(listed(&s.root.join("shared"), "resident"), "{}", s.name);
        }
        assert_eq!(
            fs::read(s.root.join("shared/resident")).expect("read"),
            b"here all along"
        );
    }
    let mut slowest = Duration::ZERO;
    for (i, actor) in sides.iter().enumerate() {
        let tag = ["a", "b", "e"][i];
        let here = |rel: &str| actor.root.join("shared").join(rel);
        let (f, g, d) = (format!("f_{tag}"), format!("g_{tag}"), format!("d_{tag}"));
        let observers: Vec<&Side> = sides.iter().filter(|s| s.name != actor.name).collect();
        let mut see = |what: &str, cond: &dyn Fn(&Path) -> bool| {
            for o in &observers {
                slowest = slowest.max(observe(actor, o, what, |root| cond(&root.join("shared"))));
            }
        };

        let created = format!("created by {}", actor.name).into_bytes();
        write_file(&here(&f), &created).expect("create");
        see("a new file, listed and readable", &|sh| {
            listed(sh, &f) && fs::read(sh.join(&f)).is_ok_and(|d| d == created)
        });
        let grown = created.repeat(5000);
        write_file(&here(&f), &grown).expect("grow");
        see("the file grown", &|sh| {
            fs::read(sh.join(&f)).is_ok_and(|d| d == grown)
        });
        let shrunk = b"short".to_vec();
        write_file(&here(&f), &shrunk).expect("shrink");
        see("the file shrunk", &|sh| {
            fs::read(sh.join(&f)).is_ok_and(|d| d == shrunk)
        });
        fs::set_permissions(here(&f), fs::Permissions::from_mode(0o640)).expect("chmod");
        see("mode 0640", &|sh| mode_of(&sh.join(&f)) == Some(0o640));
        fs::rename(here(&f), here(&g)).expect("rename");
        see(
            "the rename (old name gone, new name with the content)",
            &|sh| {
                absent(&sh.join(&f))
                    && !listed(sh, &f)
                    && listed(sh, &g)
                    && fs::read(sh.join(&g)).is_ok_and(|d| d == shrunk)
                    && mode_of(&sh.join(&g)) == Some(0o640)
            },
        );
        fs::create_dir(here(&d)).expect("mkdir");
        write_file(&here(&format!("{d}/inner")), b"inside").expect("create inside");
        see("a new directory with a file", &|sh| {
            listed(sh, &d) && fs::read(sh.join(&d).join("inner")).is_ok_and(|c| c == b"inside")
        });
        fs::remove_file(here(&g)).expect("unlink");
        fs::remove_file(here(&format!("{d}/inner"))).expect("unlink inside");
        fs::remove_dir(here(&d)).expect("rmdir");
        see("the file and the directory deleted", &|sh| {
            absent(&sh.join(&g)) && !listed(sh, &g) && absent(&sh.join(&d)) && !listed(sh, &d)
        });
    }
    eprintln!("slowest change to show on a mount: {slowest:?}");
    for m in [&fx.mount, &other] {
        let st = m.stats();
        assert!(
            st.get("events_received") > 0,
            "{}: changes showed but no event was received\n{st}",
            m.path().display()
        );
    }
}

/// A directory listed twice (so cached) on two mounts, then changed directly on the
/// export: both listings follow.
#[test]
fn a_cached_listing_follows_changes_on_the_export() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::create_dir_all(e.join("list/sub")).expect("mkdir");
        for n in ["keep", "gone", "old_name"] {
            fs::write(e.join("list").join(n), n).expect("write");
        }
    }) else {
        return;
    };
    let other = TestMount::new(&fx.server);
    let names = |dir: &Path| -> Option<Vec<String>> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .ok()?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()
            .ok()?;
        v.sort();
        Some(v)
    };
    let mounts = [fx.mount.path(), other.path()];
    for m in mounts {
        for _ in 0..2 {
            assert_eq!(
                names(&m.join("list")).expect("listing"),
                ["gone", "keep", "old_name", "sub"]
            );
            assert_eq!(names(&m.join("list/sub")).expect("listing"), [""; 0]);
        }
    }
    let e = fx.server.export_path().join("list");
    fs::write(e.join("added"), b"added").expect("create");
    fs::remove_file(e.join("gone")).expect("unlink");
    fs::rename(e.join("old_name"), e.join("new_name")).expect("rename");
    fs::create_dir(e.join("newdir")).expect("mkdir");
    fs::write(e.join("sub/inner"), b"inner").expect("create in sub");
    for m in mounts {
        let mut last = None;
        let ok = poll_until(PUSHED, || {
            last = names(&m.join("list"));
            last.as_deref()
                == Some(&["added", "keep", "new_name", "newdir", "sub"].map(String::from))
        });
        assert!(
            ok,
            "{}: listing after the export changed: {last:?}",
            m.display()
        );
        let ok = poll_until(PUSHED, || {
            names(&m.join("list/sub")).is_some_and(|v| v == ["inner"])
                && fs::read(m.join("list/sub/inner")).is_ok_and(|d| d == b"inner")
        });
        assert!(
            ok,
            "{}: the cached empty subdirectory did not follow",
            m.display()
        );
    }
}

/// Sizes the close-to-open rounds cycle through: empty, tiny, page and 128 KiB block
/// boundaries, around the 1 MiB inline limit of the open reply, a few MiB. Eleven of
/// them, prime to the three ways of writing, so every size meets every way. No 0: an
/// empty file is made by a truncation alone, which
/// [`close_to_open_after_truncations_without_writes`] covers.
const SIZES: [usize; 11] = [
    7, 4096, 131_073, 1, 1_048_576, 300, 2_500_001, 131_072, 4097, 1_048_577, 60_000,
];

/// New content for `path`, different from `old`, made one of three ways (`how`: 0
/// truncate and write `size` bytes; 1 overwrite in place with `size` bytes and set the
/// length; 2 patch a range in place, same size) and closed with the result checked.
/// Returns the new content.
fn next_version(path: &Path, old: &[u8], how: usize, size: usize, rng: &mut Rng) -> Vec<u8> {
    let how = if how == 2 && old.is_empty() { 0 } else { how };
    let new = match how {
        0 | 1 => {
            let mut size = size;
            if size == 0 && old.is_empty() {
                size = 1;
            }
            let mut new = rng.bytes(size);
            if new == old {
                new.push(1);
            }
            new
        }
        _ => {
            let mut new = old.to_vec();
            let start = rng.below(old.len() as u64) as usize;
            let len = (rng.range(1, 5000) as usize).min(old.len() - start);
            for b in &mut new[start..start + len] {
                *b ^= 0xa5;
            }
            new
        }
    };
    let ctx = |step: &str| {
        let path = path.display().to_string();
        let step = step.to_string();
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{step} {path}: {e}"))
    };
    let result = match how {
        0 => File::create(path)
            .map_err(ctx("open(O_CREAT|O_TRUNC)"))
            .and_then(|mut f| {
                f.write_all(&new).map_err(ctx("write"))?;
                close(f).map_err(ctx("close"))
            }),
        1 => OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(ctx("open(O_WRONLY)"))
            .and_then(|f| {
                f.write_all_at(&new, 0).map_err(ctx("pwrite"))?;
                f.set_len(new.len() as u64).map_err(ctx("ftruncate"))?;
                close(f).map_err(ctx("close"))
            }),
        _ => OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(ctx("open(O_WRONLY)"))
            .and_then(|f| {
                let first = new.iter().zip(old).position(|(a, b)| a != b).unwrap_or(0);
                let end = new.iter().zip(old).rposition(|(a, b)| a != b).unwrap_or(0) + 1;
                f.write_all_at(&new[first..end], first as u64)
                    .map_err(ctx("pwrite"))?;
                close(f).map_err(ctx("close"))
            }),
    };
    result.unwrap_or_else(|e| panic!("way {how}: {e}"));
    new
}

/// For a failure message: what the export holds, and whether (and when) `reader` catches
/// up with `want` after all.
fn staleness(reader: &Path, export: &Path, want: &[u8]) -> String {
    let on_export = match fs::read(export) {
        Ok(d) if d == want => "the export has the new content".to_string(),
        Ok(d) => format!("the export has {} other bytes", d.len()),
        Err(e) => format!("the export: {e}"),
    };
    let start = Instant::now();
    let caught_up = poll_until(PUSHED, || fs::read(reader).is_ok_and(|d| d == want));
    let later = if caught_up {
        format!("the reader saw the new content {:?} later", start.elapsed())
    } else {
        format!("the reader still did not see it {PUSHED:?} later")
    };
    format!("{on_export}; {later}")
}

/// Checks a read made right after the writer's close; on a mismatch says how stale.
#[track_caller]
fn assert_fresh(got: &[u8], want: &[u8], what: &str, reader: &Path, export: &Path) {
    if got != want {
        let why = staleness(reader, export, want);
        assert_same_bytes(got, want, &format!("{what} ({why})"));
    }
}

#[track_caller]
fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes, want {}; first difference at {:?}",
            got.len(),
            want.len(),
            at.or(Some(got.len().min(want.len())))
        );
    }
}

/// After `close()` returned 0 on one mount, `open()` + read on the other returns exactly
/// the new content at once: 50 rounds each way, sizes growing and shrinking.
#[test]
fn close_to_open_between_two_mounts() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("c2o"), b"v0").expect("write");
    }) else {
        return;
    };
    let other = TestMount::new(&fx.server);
    let (a, b) = (fx.mount.path(), other.path());
    let mut rng = Rng::new(0xc2_0c2);
    let mut current = b"v0".to_vec();
    for (writer, reader, dir) in [(a, b, "A->B"), (b, a, "B->A")] {
        for i in 0..50 {
            let size = SIZES[i % SIZES.len()];
            current = next_version(&writer.join("c2o"), &current, i % 3, size, &mut rng);
            let got = fs::read(reader.join("c2o")).expect("read right after the close");
            assert_fresh(
                &got,
                &current,
                &format!(
                    "{dir} round {i} (way {}, {size} bytes), read by the other mount",
                    i % 3
                ),
                &reader.join("c2o"),
                &fx.exp("c2o"),
            );
            if i % 5 == 0 {
                let own = fs::read(writer.join("c2o")).expect("read back");
                assert_same_bytes(
                    &own,
                    &current,
                    &format!("{dir} round {i}, writer reads back"),
                );
            }
        }
    }
    assert_same_bytes(
        &fs::read(fx.exp("c2o")).expect("export"),
        &current,
        "the export at the end",
    );
}

/// A file the reader had fully cached is rewritten on the other mount, in place and at
/// the same size: the reader's next open + read returns the new bytes at once.
#[test]
fn close_to_open_replaces_a_file_the_reader_had_cached() {
    const SIZE: usize = 3 * 1024 * 1024 + 333;
    let mut rng = Rng::new(0xcac4ed);
    let original = rng.bytes(SIZE);
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("big"), &original).expect("write");
    }) else {
        return;
    };
    let reader = TestMount::new(&fx.server);
    for _ in 0..2 {
        let got = fs::read(reader.join("big")).expect("read");
        assert_same_bytes(&got, &original, "first reads");
    }
    let mut cached = 0;
    assert!(
        poll_until(PUSHED, || {
            cached = reader.stats().get("cache_bytes");
            cached >= SIZE as u64
        }),
        "the reader did not cache the file it read twice: cache_bytes {cached} < {SIZE}"
    );
    let mut current = original;
    for (round, how) in [2, 1, 2, 2, 0, 2].into_iter().enumerate() {
        current = next_version(&fx.mnt("big"), &current, how, SIZE, &mut rng);
        let got = fs::read(reader.join("big")).expect("read right after the close");
        assert_fresh(
            &got,
            &current,
            &format!("round {round} (way {how}), read by the other mount"),
            &reader.join("big"),
            &fx.exp("big"),
        );
    }
}

/// Close-to-open for changes made by truncation alone, no data written: `open(O_TRUNC)`
/// then close, `ftruncate` (shrinking, growing, to 0, from 0) then close, each way between
/// two mounts. Every round is checked; the failures are reported together.
#[test]
fn close_to_open_after_truncations_without_writes() {
    let mut rng = Rng::new(0x7_2c);
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("t"), b"start").expect("write");
    }) else {
        return;
    };
    let other = TestMount::new(&fx.server);
    let (a, b) = (fx.mount.path(), other.path());
    let mut current = b"start".to_vec();
    let mut failures = Vec::new();
    let steps = [
        "write", "O_TRUNC", "write", "shrink", "grow", "to 0", "grow",
    ];
    for round in 0..4 * steps.len() {
        let (writer, reader, dir) = if (round / steps.len()).is_multiple_of(2) {
            (a, b, "A->B")
        } else {
            (b, a, "B->A")
        };
        let path = writer.join("t");
        let step = steps[round % steps.len()];
        let set_len = |len: usize| {
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open(O_WRONLY)");
            f.set_len(len as u64).expect("ftruncate");
            close(f).expect("close");
            let mut new = current.clone();
            new.resize(len, 0);
            new
        };
        let new = match step {
            "write" => {
                // Written data goes through the barrier: content for the truncations.
                let new = rng.bytes(200_000 + round * 1000);
                write_file(&path, &new).expect("write");
                new
            }
            "O_TRUNC" => {
                let f = OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&path)
                    .expect("open(O_TRUNC)");
                close(f).expect("close");
                Vec::new()
            }
            "shrink" => set_len(current.len() / 2),
            "grow" => set_len(current.len() + 70_000),
            _ => set_len(0),
        };
        let got = fs::read(reader.join("t")).expect("read right after the close");
        if got != new {
            failures.push(format!(
                "{dir} round {round}: {step} ({} -> {} bytes): the other mount read {} bytes ({})",
                current.len(),
                new.len(),
                got.len(),
                staleness(&reader.join("t"), &fx.exp("t"), &new)
            ));
        }
        current = new;
    }
    assert!(
        failures.is_empty(),
        "{} of {} rounds read stale content right after the close:\n{}",
        failures.len(),
        4 * steps.len(),
        failures.join("\n")
    );
}

/// Truncations alone (no data written), made on each side in turn, show on the other
/// sides: shrinking, growing, to 0, and growing an empty file.
#[test]
fn truncations_without_writes_show_on_every_side() {
    let Some(fx) = fixture_with(&[], &[], |e| {
        fs::write(e.join("t"), b"start").expect("write");
    }) else {
        return;
    };
    let other = TestMount::new(&fx.server);
    let sides = [
        Side {
            name: "mount A",
            root: fx.mount.path(),
            export: false,
        },
        Side {
            name: "mount B",
            root: other.path(),
            export: false,
        },
        Side {
            name: "the export",
            root: fx.server.export_path(),
            export: true,
        },
    ];
    let mut current = b"start".to_vec();
    let mut rng = Rng::new(0x72ce);
    for actor in &sides {
        let path = actor.root.join("t");
        for step in ["write", "shrink", "grow", "to 0", "grow from 0"] {
            let len = match step {
                "write" => {
                    current = rng.bytes(150_000);
                    write_file(&path, &current).expect("write");
                    current.len()
                }
                "shrink" => current.len() / 3,
                "to 0" => 0,
                _ => current.len() + 70_000,
            };
            if step != "write" {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open(O_WRONLY)");
                f.set_len(len as u64).expect("ftruncate");
                close(f).expect("close");
                current.resize(len, 0);
            }
            for o in sides.iter().filter(|s| s.name != actor.name) {
                let what = format!(
                    "{step} to {len} bytes (before waiting it read {:?} bytes)",
                    fs::read(o.root.join("t")).map(|d| d.len())
                );
                observe(actor, o, &what, |root| {
                    fs::read(root.join("t")).is_ok_and(|d| d == current)
                });
            }
        }
    }
}
