//! Close-to-open between two mounts of one export, checked without any polling: once
//! `close()` returned 0 on one mount, an `open()` + read on the other right afterwards
//! returns exactly the new content (the server makes the close wait until every other
//! client dropped its copy). Contents of every size, made by writes, in-place patches
//! and truncations, also of a file the reader had fully cached.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::rng::Rng;
use ferry_tests::sys::close;
use ferry_tests::{TestMount, assert_same_bytes, fixture_with, poll_until, write_closed};

/// How long a failure message waits to say how stale a read was.
const PUSHED: Duration = Duration::from_secs(5);

/// Sizes the close-to-open rounds cycle through: empty, tiny, page and 128 KiB block
/// boundaries, around the 1 MiB inline limit of the open reply, a few MiB. Eleven of
/// them, prime to the three ways of writing, so every size meets every way (an empty
/// file made by `O_TRUNC` alone, or by `ftruncate` alone, included).
const SIZES: [usize; 11] = [
    7, 4096, 131_073, 0, 1_048_576, 300, 2_500_001, 131_072, 4097, 1_048_577, 60_000,
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
                write_closed(&path, &new).expect("write");
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
