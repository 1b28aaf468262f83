#!/usr/bin/env bash
# Where the time of one cold operation goes: wall time, and CPU of the ferry mount
# daemon and of ferryd, for a command run on a fresh mount after
# `sync; echo 3 > /proc/sys/vm/drop_caches`. With --local, the same command is then run
# on the export itself (same drop first), for reference.
#
# Usage: sudo bench/cpu-split.sh [--runs N] [--local] [--mount-args "ARGS"] EXPORT -- CMD...
#   CMD sees the mountpoint as $MP (use single quotes), e.g.
#   sudo bench/cpu-split.sh --runs 4 --local /srv/export -- 'ls -l $MP/dir >/dev/null'
#   sudo bench/cpu-split.sh --mount-args --no-cache /srv/export -- 'dd if=$MP/big of=/dev/null bs=1M'
# Binaries: FERRY_BIN_DIR (default target/release). Needs root (drop_caches, mount).
# CPU is utime+stime from /proc/PID/stat, which counts exited threads too, in ticks of
# 10 ms: compare several runs, not one.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${FERRY_BIN_DIR:-target/release}
RUNS=3
LOCAL=0
MARGS=""
while (($#)); do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --local) LOCAL=1; shift ;;
        --mount-args) MARGS=$2; shift 2 ;;
        --) shift; break ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) EXPORT=$(realpath "$1"); shift ;;
    esac
done
[[ -n "${EXPORT:-}" && $# -gt 0 ]] || { sed -n 2,13p "$0"; exit 2; }
CMD=$*

TMP=$(mktemp -d /tmp/ferry-cpu-split.XXXXXX)
MNT=$TMP/mnt
SPID=""
cleanup() {
    umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
    [[ -n "$SPID" ]] && kill "$SPID" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
mkdir -p "$MNT"

"$BIN/ferryd" --listen 127.0.0.1:0 "$EXPORT" >"$TMP/ferryd.out" 2>"$TMP/ferryd.err" &
SPID=$!
for _ in $(seq 100); do [[ -s "$TMP/ferryd.out" ]] && break; sleep 0.05; done
ADDR=$(awk '{print $NF}' "$TMP/ferryd.out")
[[ -n "$ADDR" ]] || { echo "ferryd did not start: $(cat "$TMP/ferryd.err")" >&2; exit 1; }

ticks() { awk '{print ($14 + $15) * 10}' "/proc/$1/stat"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }

header="run wall_ms client_cpu_ms server_cpu_ms"
((LOCAL)) && header+=" local_wall_ms"
echo "$header"
for r in $(seq "$RUNS"); do
    rm -rf "$TMP/cache"
    # shellcheck disable=SC2086
    "$BIN/ferry" mount --cache-dir "$TMP/cache" $MARGS "$ADDR" "$MNT" 2>>"$TMP/ferry.log"
    CPID=$(pgrep -f -- "$MNT.*--foreground" | tail -1)
    drop
    s0=$(ticks "$SPID"); c0=$(ticks "$CPID"); t0=$(date +%s%N)
    MP=$MNT bash -c "$CMD"
    wall=$(ms_since "$t0"); s1=$(ticks "$SPID"); c1=$(ticks "$CPID")
    umount "$MNT"
    # The daemon writes the cache's metadata back as it exits: let it finish before
    # the next run (or the cleanup) removes the cache directory.
    for _ in $(seq 100); do kill -0 "$CPID" 2>/dev/null || break; sleep 0.05; done
    line="$r $wall $((c1 - c0)) $((s1 - s0))"
    if ((LOCAL)); then
        drop
        t0=$(date +%s%N)
        MP=$EXPORT bash -c "$CMD"
        line="$line $(ms_since "$t0")"
    fi
    echo "$line"
done
