#!/usr/bin/env bash
# Readers and writers across a server restart, by hand: copies a big file out of a ferry
# mount, reads a tree of small files, and untars that tree into the mount, while ferryd
# is killed and started again on the same address. Prints whether each finished with the
# right bytes, and the mount's reconnect counters. Last, copies a big file into the
# mount, with the default journal (8 MiB kept: that copy fails with EIO, the export
# keeping its old content) and with `--spool-writes` (it finishes, identical).
#
#   sudo scripts/restart-check.sh [--signal KILL|TERM] [--down SECS] [--at SECS]
#                                 [--timeout SECS] [--bin DIR]
#
# --signal: how ferryd is stopped (default KILL); --down: how long it stays away
# (default 0.5); --at: when, after the reader starts (default 0.3); --timeout: the
# mount's --timeout (default 5: a server away longer fails the readers with EIO);
# --bin: where ferryd and ferry are (default target/release, built if missing).
# Needs root (drop_caches) and /dev/fuse. Everything it makes is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
sig=KILL down=0.5 at=0.3 timeout=5 bin=target/release
while (($#)); do
    case $1 in
    --signal) sig=$2; shift 2 ;;
    --down) down=$2; shift 2 ;;
    --at) at=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ -x "$bin/ferryd" ] && [ -x "$bin/ferry" ] || cargo build --release --bins
bin=$(realpath "$bin")

. scripts/lib.sh
ferry_work restart
exp=$work/export mp=$work/mnt cache=$work/cache
mkdir "$exp/tree"
head -c $((512 << 20)) /dev/urandom >"$exp/big"
for d in $(seq -w 20); do
    mkdir "$exp/tree/d$d"
    for f in $(seq -w 100); do head -c $((RANDOM % 16384)) /dev/urandom >"$exp/tree/d$d/f$f"; done
done
tar -cf "$work/tree.tar" -C "$exp/tree" .

start_server() { ferry_start_server --state-dir "$work/state"; }

# run NAME COMMAND...: COMMAND reads through the mount (cold) while the server restarts.
# $mount_extra: more `ferry mount` arguments.
mount_extra=()
run() {
    local name=$1; shift
    start_server
    "$bin/ferry" mount --timeout "$timeout" --cache-dir "$cache" "${mount_extra[@]}" \
        "127.0.0.1:$port" "$mp" 2>/dev/null
    sync; echo 3 >/proc/sys/vm/drop_caches
    local rc=0
    "$@" >"$work/out" 2>"$work/err" &
    local reader=$!
    sleep "$at"
    kill "-$sig" "$srv"; wait "$srv" 2>/dev/null || true
    sleep "$down"
    start_server
    wait "$reader" || rc=$?
    local counters
    counters=$("$bin/ferry" stats "$mp" --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(" ".join(f"{k}={s.get(k, 0)}" for k in ("reconnects", "connect_failures", "retried", "handles_reopened", "uploads_replayed")))')
    "$bin/ferry" umount "$mp"
    # The daemon exits after the unmount returns; its cache goes once it is gone.
    for _ in $(seq 200); do pgrep -f "ferry mount .*$mp" >/dev/null || break; sleep 0.05; done
    kill "$srv"; wait "$srv" 2>/dev/null || true
    srv=
    rm -rf "$cache"; mkdir "$cache"
    echo "$name: exit $rc; $counters"
    [ ! -s "$work/err" ] || echo "  stderr: $(head -c 160 "$work/err" | tr '\n' ' ')"
}

sum_tree() { cd "$1" && find . -type f -print0 | sort -z | xargs -0 cat | md5sum; }
echo "ferryd stopped with SIG$sig $at s after each reader starts, away for $down s (mount --timeout $timeout)"
run "cp of a 512 MiB file" cp "$mp/big" "$work/copy"
cmp -s "$exp/big" "$work/copy" && echo "  copy identical" || echo "  COPY DIFFERS"
rm -f "$work/copy"
run "cat of 2,000 small files" bash -c "set -o pipefail; $(declare -f sum_tree); sum_tree '$mp/tree'"
want=$(sum_tree "$exp/tree")
[ "$want" = "$(cat "$work/out")" ] && echo "  bytes identical" || echo "  BYTES DIFFER"
mkdir "$exp/untar"
run "untar of 2,000 small files into the mount" tar --no-same-owner -xf "$work/tree.tar" -C "$mp/untar"
if diff -r "$exp/tree" "$exp/untar" >"$work/diff"; then echo "  tree identical"; else
    echo "  TREE DIFFERS: $(grep -c . "$work/diff") lines of diff -r; first: $(head -n1 "$work/diff")"
fi
# (whole seconds: a tar archive keeps no more)
times() { (cd "$1" && find . -type f -printf '%p %T@\n' | awk '{ printf "%s %d\n", $1, $2 }' | sort); }
if diff <(times "$exp/tree") <(times "$exp/untar") >"$work/diff"; then echo "  file mtimes identical"; else
    echo "  MTIMES DIFFER: $(grep -c '^>' "$work/diff") files; first: $(grep -m1 '^>' "$work/diff")"
fi
cp "$exp/big" "$work/src"
head -c $((512 << 20)) /dev/urandom >"$exp/into"
cp "$exp/into" "$work/old"
run "cp of a 512 MiB file into the mount" cp "$work/src" "$mp/into"
if cmp -s "$work/src" "$exp/into"; then echo "  copy identical"
elif cmp -s "$work/old" "$exp/into"; then echo "  old content kept"
else echo "  EXPORT CHANGED (neither old nor new)"; fi
cp "$work/old" "$exp/into"
mount_extra=(--spool-writes)
run "cp of a 512 MiB file into the mount, --spool-writes" cp "$work/src" "$mp/into"
cmp -s "$work/src" "$exp/into" && echo "  copy identical" || echo "  COPY DIFFERS"
