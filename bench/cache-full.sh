#!/usr/bin/env bash
# Reading through a full data cache. One ferryd on loopback exports a file larger than
# the small cache; each round, alternating the caps:
#
#   read   cold `dd bs=1M` of the big file through a fresh mount (empty cache dir,
#          drop_caches) with --cache-size SMALL (the cache fills, then evicts all the
#          way) and with --cache-size BIG (it fits): seconds
#   stall  the same read with SMALL, while another process opens and reads a small
#          cached file in a loop (each open asks the mount daemon, which checks its
#          cache): p50, p99 and max milliseconds per open, and how many took over 1 ms
#
#   sudo bench/cache-full.sh [--rounds N] [--bin DIR] [--mib N] [--small SIZE] [--big SIZE]
#
# Defaults: 3 rounds, target/release, a 1024 MiB file, 128M against 10G. Needs root
# (FUSE, drop_caches). Everything it makes is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release rounds=3 mib=1024 small=128M big=10G
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --mib) mib=$2; shift 2 ;;
        --small) small=$2; shift 2 ;;
        --big) big=$2; shift 2 ;;
        *) echo "usage: $0 [--rounds N] [--bin DIR] [--mib N] [--small SIZE] [--big SIZE]" >&2; exit 2 ;;
    esac
done
. scripts/lib.sh
ferry_work cache-full
head -c $((mib << 20)) /dev/urandom >"$work/export/big"
head -c 65536 /dev/urandom >"$work/export/small"
ferry_start_server --state-dir "$work/state"

mount_fresh() {  # cap
    mountpoint -q "$work/mnt" && "$bin/ferry" umount "$work/mnt"
    rm -rf "$work/cache"
    "$bin/ferry" mount --cache-dir "$work/cache" --cache-size "$1" "127.0.0.1:$port" "$work/mnt" 2>>"$work/mount.log"
}
cold() { sync; echo 3 >/proc/sys/vm/drop_caches; }

echo "ferry ($bin), $rounds rounds, a $mib MiB file, --cache-size $small against $big"
for r in $(seq "$rounds"); do
    for cap in "$small" "$big"; do
        mount_fresh "$cap"
        cold
        t0=$(date +%s.%N)
        dd if="$work/mnt/big" of=/dev/null bs=1M status=none
        t1=$(date +%s.%N)
        echo "round $r read  --cache-size $cap: $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') s"
    done
    mount_fresh "$small"
    cat "$work/mnt/small" >/dev/null
    cold
    cat "$work/mnt/small" >/dev/null
    python3 - "$work/mnt" "$r" "$small" <<'PY'
import os, subprocess, sys, time
mnt, r, cap = sys.argv[1], sys.argv[2], sys.argv[3]
p = subprocess.Popen(["dd", f"if={mnt}/big", "of=/dev/null", "bs=1M", "status=none"])
lat = []
while p.poll() is None:
    t = time.perf_counter()
    fd = os.open(f"{mnt}/small", os.O_RDONLY)
    os.read(fd, 65536)
    os.close(fd)
    lat.append(time.perf_counter() - t)
if p.returncode != 0:
    sys.exit("dd failed")
lat.sort()
n = len(lat)
ms = lambda x: f"{x * 1e3:.2f}"
print(f"round {r} stall --cache-size {cap}: {n} opens, p50 {ms(lat[n // 2])} p99 {ms(lat[int(n * 0.99)])} "
      f"max {ms(lat[-1])} ms, {sum(1 for x in lat if x > 1e-3)} over 1 ms")
PY
done
