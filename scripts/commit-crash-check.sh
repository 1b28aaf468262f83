#!/usr/bin/env bash
# What a `ferryd` killed while a client's commit runs leaves behind, by hand: copies a
# file over an existing one in a ferry mount, SIGKILLs ferryd AT seconds after the copy
# starts, starts it again on the same export (which rolls back an interrupted commit
# from its undo record) and says whether the export holds the old content, the new one,
# or neither (torn). Repeat over a range of times to land in the commit.
#
#   sudo scripts/commit-crash-check.sh [--size MIB] [--bin DIR] AT...
#   sudo scripts/commit-crash-check.sh --size 60 0.17 0.18 0.19 0.20
#
# --size: the file's size (default 60 MiB; commits over 64 MiB have no undo record);
# --bin: where ferryd and ferry are (default target/release). Needs root (drop_caches)
# and /dev/fuse. Everything it makes is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release size=60
while [ $# -gt 0 ]; do
    case $1 in
        --size) size=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        -*) echo "usage: $0 [--size MIB] [--bin DIR] AT..." >&2; exit 2 ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--size MIB] [--bin DIR] AT..." >&2; exit 2; }
work=$(mktemp -d /tmp/ferry-commit-crash.XXXXXX)
srv=
cleanup() {
    mountpoint -q "$work/mnt" 2>/dev/null && { "$bin/ferry" umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt"; }
    [ -n "$srv" ] && kill "$srv" 2>/dev/null && wait "$srv" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/export" "$work/mnt" "$work/cache" "$work/state"
: >"$work/ferryd.log"
head -c $((size << 20)) /dev/urandom >"$work/new"
head -c $((size << 20)) /dev/urandom >"$work/old"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Started once it printed its address: after any rollback (it listens before that).
start_server() {
    local before
    before=$(grep -c "serving" "$work/ferryd.log" || true)
    "$bin/ferryd" --listen "127.0.0.1:$port" --state-dir "$work/state" "$work/export" \
        >/dev/null 2>>"$work/ferryd.log" &
    srv=$!
    for _ in $(seq 200); do
        [ "$(grep -c "serving" "$work/ferryd.log" || true)" -gt "$before" ] && return 0
        sleep 0.05
    done
    echo "ferryd did not start; see $work/ferryd.log" >&2
    exit 1
}
for at in "$@"; do
    cp "$work/old" "$work/export/f"
    : >"$work/ferryd.log"
    start_server
    "$bin/ferry" mount --cache-dir "$work/cache" "127.0.0.1:$port" "$work/mnt" 2>/dev/null
    sync; echo 3 >/proc/sys/vm/drop_caches
    rc=0
    cp "$work/new" "$work/mnt/f" 2>/dev/null &
    copier=$!
    sleep "$at"
    kill -KILL "$srv"; wait "$srv" 2>/dev/null || true
    wait "$copier" || rc=$?
    start_server
    if cmp -s "$work/export/f" "$work/new"; then got=new
    elif cmp -s "$work/export/f" "$work/old"; then got=old
    else got="TORN ($(stat -c %s "$work/export/f") bytes)"; fi
    rolled=$(grep -c "rolled back a commit" "$work/ferryd.log" || true)
    echo "killed at $at s: cp exit $rc; export: $got; commits rolled back at restart: $rolled"
    "$bin/ferry" umount "$work/mnt"
    for _ in $(seq 200); do pgrep -f "ferry mount .*$work/mnt" >/dev/null || break; sleep 0.05; done
    kill "$srv"; wait "$srv" 2>/dev/null || true
    srv=
    rm -rf "$work/cache"; mkdir "$work/cache"
done
