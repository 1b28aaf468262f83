#!/usr/bin/env bash
# bench/abread.sh FILE... — median of 11 `dd bs=1M` reads of each FILE, interleaved
# (one read of every file per round), for quick A/B comparisons of warm reads, e.g. the
# same file on the local disk, on a ferry mount and on a ferry mount with passthrough.
set -euo pipefail
declare -A times
for _ in $(seq 11); do
    for f in "$@"; do
        s=$(date +%s%N)
        dd if="$f" of=/dev/null bs=1M status=none
        e=$(date +%s%N)
        times[$f]+="$(( (e - s) / 1000 )) "
    done
done
for f in "$@"; do
    med=$(tr ' ' '\n' <<<"${times[$f]}" | grep . | sort -n | sed -n 6p)
    printf '%s\t%d.%06d s\n' "$f" $((med / 1000000)) $((med % 1000000))
done
