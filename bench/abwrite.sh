#!/usr/bin/env bash
# One 1 GiB write into a fresh ferry mount (dd bs=1M conv=fsync), with the wall time,
# the CPU time of the mount daemon and of ferryd, and the MiB the disk wrote meanwhile.
# Run it alternately for two builds or two option sets to compare them on a noisy
# machine:
#
#   sudo bench/abwrite.sh [--bin DIR] [--disk DEV] [-- MOUNT_ARGS...]
#   for i in 1 2 3; do sudo bench/abwrite.sh; sudo bench/abwrite.sh -- --spool-writes; done
#
# --bin: where ferry and ferryd are (default target/release); --disk: the block device
# under /tmp whose writes are counted (default: the one /tmp is on). Needs root
# (FUSE, sync). Everything it makes is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
disk=$(basename "$(df --output=source /tmp | tail -1)")
while [ $# -gt 0 ]; do
    case $1 in
        --bin) bin=$2; shift 2 ;;
        --disk) disk=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "usage: $0 [--bin DIR] [--disk DEV] [-- MOUNT_ARGS...]" >&2; exit 2 ;;
    esac
done
. scripts/lib.sh
ferry_work abwrite
ferry_start_server
"$bin/ferry" mount --cache-dir "$work/cache" "$@" "127.0.0.1:$port" "$work/mnt" 2>/dev/null
client=$(pgrep -f "ferry mount .*$work/mnt" | head -1)
sync
sectors() { awk -v d="$disk" '$3 == d { print $10 }' /proc/diskstats; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
w0=$(sectors) t0=$(date +%s%N) c0=$(ticks "$client") s0=$(ticks "$srv")
dd if=/dev/zero of="$work/mnt/out" bs=1M count=1024 conv=fsync status=none
t1=$(date +%s%N) w1=$(sectors) c1=$(ticks "$client") s1=$(ticks "$srv")
hz=$(getconf CLK_TCK)
echo "ferry mount $* : wall $(( (t1 - t0) / 1000000 )) ms," \
    "client CPU $(( (c1 - c0) * 1000 / hz )) ms, ferryd CPU $(( (s1 - s0) * 1000 / hz )) ms," \
    "disk writes $(( (w1 - w0) / 2048 )) MiB ($disk)"
