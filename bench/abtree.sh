#!/usr/bin/env bash
# One untar of a tree of small files into a fresh ferry mount (+ sync), then `rm -rf` of
# it: the changes of names (creates, mkdirs, unlinks, rmdirs) and small commits. Prints
# both wall times and the CPU ferryd used. Alternate runs of two builds to compare:
#
#   sudo bench/abtree.sh [--files N] [--bin DIR] [-- FERRYD_ARGS...]
#   for i in 1 2 3 4 5 6; do sudo bench/abtree.sh --bin /tmp/old; sudo bench/abtree.sh; done
#
# The tree is bench/run.sh's (N files of 0–16 KiB, 10 per directory, fixed seed).
# Each run serves a fresh export with its own state folder. Needs root (drop_caches,
# FUSE). Everything it makes is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release files=5000
while [ $# -gt 0 ]; do
    case $1 in
        --files) files=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "usage: $0 [--files N] [--bin DIR] [-- FERRYD_ARGS...]" >&2; exit 2 ;;
    esac
done
. scripts/lib.sh
ferry_work abtree
python3 - "$work/tree.tar" "$files" <<'PY'
import io, random, sys, tarfile
out, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(1234)
with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
    def add_dir(name):
        ti = tarfile.TarInfo(name); ti.type = tarfile.DIRTYPE; ti.mode = 0o755; ti.mtime = 1700000000
        tar.addfile(ti)
    add_dir("tree")
    made = set()
    for i in range(n):
        leaf = i // 10
        top, sub = f"tree/d{leaf // 10:03d}", f"tree/d{leaf // 10:03d}/s{leaf % 10}"
        for d in (top, sub):
            if d not in made:
                add_dir(d); made.add(d)
        size = rng.randint(0, 16 * 1024)
        ti = tarfile.TarInfo(f"{sub}/f{i:05d}.dat"); ti.size = size; ti.mode = 0o644; ti.mtime = 1700000000
        tar.addfile(ti, io.BytesIO(rng.randbytes(size)))
PY
ferry_start_server --state-dir "$work/state" "$@"
"$bin/ferry" mount --cache-dir "$work/cache" "127.0.0.1:$port" "$work/mnt" 2>/dev/null
sync; echo 3 >/proc/sys/vm/drop_caches
cat "$work/tree.tar" >/dev/null
ticks() { awk '{print ($14 + $15) * 10}' "/proc/$srv/stat"; }
c0=$(ticks); t0=$(date +%s%N)
tar --no-same-owner -xf "$work/tree.tar" -C "$work/mnt"
sync
t1=$(date +%s%N); c1=$(ticks)
rm -rf "$work/mnt/tree"
t2=$(date +%s%N); c2=$(ticks)
[ -z "$(ls -A "$work/export")" ] || { echo "the export is not empty after rm -rf" >&2; exit 1; }
echo "ferryd $* ($bin): untar $files files $(( (t1 - t0) / 1000000 )) ms (ferryd CPU $((c1 - c0)) ms), rm -rf $(( (t2 - t1) / 1000000 )) ms (ferryd CPU $((c2 - c1)) ms)"
