#!/usr/bin/env bash
# Serve a folder with ferryd and mount it with ferry, on this machine.
#   scripts/demo.sh [EXPORT_DIR] [MOUNTPOINT]   start (defaults: ./demo-share, /tmp/ferry-demo)
#   scripts/demo.sh stop [MOUNTPOINT]           unmount and stop the server
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release
state=/tmp/ferry-demo.pid

if [ "${1:-}" = stop ]; then
    mp=${2:-/tmp/ferry-demo}
    "$bin/ferry" umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
    [ -f "$state" ] && kill "$(cat "$state")" 2>/dev/null || true
    rm -f "$state"
    echo "stopped"
    exit 0
fi

export_dir=$(realpath -m "${1:-demo-share}")
mp=$(realpath -m "${2:-/tmp/ferry-demo}")

if ! command -v fusermount3 >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null || true
fi
cargo build --release --bins
mkdir -p "$export_dir" "$mp"
[ -e "$export_dir/hello.txt" ] || echo "hello from $(hostname) via ferryd" > "$export_dir/hello.txt"
if mountpoint -q "$mp"; then "$bin/ferry" umount "$mp" || umount -l "$mp"; fi

log=/tmp/ferry-demo-server.log
"$bin/ferryd" --listen 127.0.0.1:0 "$export_dir" > /tmp/ferry-demo-server.out 2> "$log" &
echo $! > "$state"
for _ in $(seq 100); do
    addr=$(awk '{print $NF}' /tmp/ferry-demo-server.out 2>/dev/null | head -1)
    [ -n "$addr" ] && break
    sleep 0.1
done
[ -n "${addr:-}" ] || { echo "ferryd did not start; see $log"; exit 1; }
echo "ferryd is serving $export_dir on $addr"
"$bin/ferry" mount "$addr" "$mp"
echo "mounted at $mp:"
ls -l "$mp"
echo "written through the mount at $(date)" > "$mp/from-the-mount.txt"
echo "the export now holds:"
ls -l "$export_dir"
echo
echo "try: ls -l $mp; cp some-file $mp/; cat $mp/hello.txt"
echo "     $bin/ferry ls $addr; $bin/ferry shell $addr"
echo "stop: scripts/demo.sh stop $mp"
