#!/usr/bin/env bash
# One `cp` of SIZE MiB over an existing file of the same size in a fresh ferry mount,
# from dropped caches: the commit of a rewrite (staged, then applied in place, with an
# undo record up to 64 MiB). Extra arguments go to ferryd; alternate runs to compare:
#
#   sudo bench/abrewrite.sh [--size MIB] [--bin DIR] [-- FERRYD_ARGS...]
#   for i in 1 2 3; do sudo bench/abrewrite.sh --size 60; sudo bench/abrewrite.sh --size 60 -- --state-dir /proc/none; done
#
# (`--state-dir /proc/none` cannot be created: ferryd commits without undo records.)
# Needs root (drop_caches, FUSE). Everything it makes is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release size=512
while [ $# -gt 0 ]; do
    case $1 in
        --size) size=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "usage: $0 [--size MIB] [--bin DIR] [-- FERRYD_ARGS...]" >&2; exit 2 ;;
    esac
done
. scripts/lib.sh
ferry_work abrewrite
head -c $((size << 20)) /dev/urandom >"$work/src"
head -c $((size << 20)) /dev/urandom >"$work/export/f"
ferry_start_server "$@"
"$bin/ferry" mount --cache-dir "$work/cache" "127.0.0.1:$port" "$work/mnt" 2>/dev/null
sync; echo 3 >/proc/sys/vm/drop_caches
t0=$(date +%s%N)
cp "$work/src" "$work/mnt/f"
t1=$(date +%s%N)
cmp -s "$work/src" "$work/export/f" || { echo "the export differs from what was copied" >&2; exit 1; }
echo "ferryd $* : cp of $size MiB over an existing file: $(( (t1 - t0) / 1000000 )) ms"
