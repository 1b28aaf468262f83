#!/usr/bin/env bash
# What a `ferryd` killed while a client's commit runs leaves behind, by hand: copies a
# file over an existing one in a ferry mount, SIGKILLs ferryd AT seconds after the copy
# starts, starts it again on the same export (which rolls back an interrupted commit
# from its undo record, or finishes one from its redo record) and says whether the
# export holds the old content, the new one, or neither (torn), and whether the hidden
# .ferryd folder was left behind. Repeat over a range of times to land in the commit.
#
#   sudo scripts/commit-crash-check.sh [--size MIB] [--bin DIR] AT...
#   sudo scripts/commit-crash-check.sh --size 60 0.17 0.18 0.19 0.20
#
# --size: the file's size (default 60 MiB; commits over 64 MiB keep a redo record);
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
. scripts/lib.sh
ferry_work commit-crash
mkdir "$work/state"
head -c $((size << 20)) /dev/urandom >"$work/new"
head -c $((size << 20)) /dev/urandom >"$work/old"
start_server() { ferry_start_server --state-dir "$work/state"; }
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
    finished=$(grep -c "finished a commit" "$work/ferryd.log" || true)
    left=; [ -e "$work/export/.ferryd" ] && left="; .ferryd LEFT"
    echo "killed at $at s: cp exit $rc; export: $got; at restart: $rolled rolled back, $finished finished$left"
    "$bin/ferry" umount "$work/mnt"
    for _ in $(seq 200); do pgrep -f "ferry mount .*$work/mnt" >/dev/null || break; sleep 0.05; done
    kill "$srv"; wait "$srv" 2>/dev/null || true
    srv=
    rm -rf "$work/cache"; mkdir "$work/cache"
done
