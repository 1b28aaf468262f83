#!/usr/bin/env bash
# What a server past its watch limit costs a mount: ferryd with --max-watches N serves
# a tree of more directories than that; one walk of the whole tree (`ls -lR` and `cat`
# of every file) takes the server past the limit, then the walk of one subtree the
# server watches (the working set) is repeated. Prints, per walk, the requests the
# mount sent (`ferry stats`), whether its event stream stayed live, and the wall time.
#
#   sudo bench/watchlimit.sh [--bin DIR] [--max-watches N] [--dirs T S] [--rounds N]
#
# Default: 40 x 50 directories of 3 small files each (2,041 directories), 500 watches,
# 3 walks of the subtree t1 (51 directories). Run it once per build to compare (--bin).
# Needs root (FUSE). Everything it makes is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release watches=500 top=40 sub=50 rounds=3
while [ $# -gt 0 ]; do
    case $1 in
        --bin) bin=$2; shift 2 ;;
        --max-watches) watches=$2; shift 2 ;;
        --dirs) top=$2; sub=$3; shift 3 ;;
        --rounds) rounds=$2; shift 2 ;;
        *) echo "usage: $0 [--bin DIR] [--max-watches N] [--dirs T S] [--rounds N]" >&2; exit 2 ;;
    esac
done
. scripts/lib.sh
ferry_work watchlimit
for i in $(seq 1 "$top"); do
    for j in $(seq 1 "$sub"); do
        d=$work/export/t$i/s$j
        mkdir -p "$d"
        for k in 1 2 3; do echo "$i $j $k" >"$d/f$k"; done
    done
done
ferry_start_server --state-dir "$work/state" --max-watches "$watches"
"$bin/ferry" mount --cache-dir "$work/cache" "127.0.0.1:$port" "$work/mnt" 2>>"$work/mount.log"
stats() {
    "$bin/ferry" stats "$work/mnt" --json |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("requests", 0), str(d.get("events_live")).lower())'
}
walk() {
    local before after t0 t1
    read -r before _ <<<"$(stats)"
    t0=$(date +%s.%N)
    ls -lR "$1" >/dev/null
    find "$1" -type f -print0 | xargs -0 cat >/dev/null
    t1=$(date +%s.%N)
    read -r after live <<<"$(stats)"
    printf '%-22s %8d requests  events live: %-5s  %.3f s\n' "$2" $((after - before)) "$live" \
        "$(echo "$t1 - $t0" | bc)"
}
echo "ferry ($bin), $((top * sub + top + 1)) directories, --max-watches $watches"
walk "$work/mnt" "whole tree"
for r in $(seq 1 "$rounds"); do
    walk "$work/mnt/t1" "subtree t1, walk $r"
done
