#!/usr/bin/env bash
# Atomic saves across server restarts, by hand: a loop writes a temp file in the mount
# and renames it over the document (what editors and build tools do), N times, while
# ferryd is killed and started again K times on the same address and state folder.
# Prints how many saves failed, and whether the document ends as the last save.
#
#   sudo scripts/save-restart-check.sh [--saves N] [--kills K] [--every SECS]
#                                      [--down SECS] [--signal KILL|TERM] [--bin DIR]
#                                      [--savers S]
#
# --saves: saves in the loop (default 3000); --savers: loops at once, each on its own
# document (default 1); --kills: restarts (default 8); --every:
# seconds between them (default 0.4); --down: how long ferryd stays away (default 0.1);
# --signal: how ferryd is stopped (default KILL; TERM is a clean shutdown, a restart by
# a service manager); --bin: where ferryd and ferry are (default target/release, built if missing).
# Needs root (FUSE). Everything it makes is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
saves=3000 savers=1 kills=8 every=0.4 down=0.1 sig=KILL bin=target/release
while (($#)); do
    case $1 in
    --saves) saves=$2; shift 2 ;;
    --savers) savers=$2; shift 2 ;;
    --kills) kills=$2; shift 2 ;;
    --every) every=$2; shift 2 ;;
    --down) down=$2; shift 2 ;;
    --signal) sig=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ -x "$bin/ferryd" ] && [ -x "$bin/ferry" ] || cargo build --release --bins
bin=$(realpath "$bin")

. scripts/lib.sh
ferry_work saves
mp=$work/mnt
start_server() { ferry_start_server --state-dir "$work/state"; }
start_server
"$bin/ferry" mount --cache-dir "$work/cache" "127.0.0.1:$port" "$mp" 2>"$work/mount.log"

# A saver: each save is a create + write + close (commit) + rename; a failed step
# is counted and the loop goes on. It stops early once the kills are over and it
# has made at least half its saves.
saver() {
    local d=$1 failed=0 last=0 i
    for i in $(seq "$saves"); do
        if { printf 'save %d\n' "$i" >"$mp/$d.tmp"; } 2>>"$work/err" &&
            mv -f "$mp/$d.tmp" "$mp/$d" 2>>"$work/err"; then
            last=$i
        else
            failed=$((failed + 1))
        fi
        [ -e "$work/kills-done" ] && [ "$i" -ge $((saves / 2)) ] && break
    done
    echo "$i $failed $last" >"$work/$d.saver"
}
pids=()
for s in $(seq "$savers"); do
    saver "doc$s" &
    pids+=($!)
done
for _ in $(seq "$kills"); do
    sleep "$every"
    kill "-$sig" "$srv"; wait "$srv" 2>/dev/null || true
    sleep "$down"
    start_server
done
touch "$work/kills-done"
wait "${pids[@]}"
made=0 failed=0 docs_ok=0
for s in $(seq "$savers"); do
    read -r m f last <"$work/doc$s.saver"
    made=$((made + m)) failed=$((failed + f))
    doc=$(cat "$work/export/doc$s" 2>/dev/null || echo "(none)")
    if [ "$doc" = "save $last" ]; then
        docs_ok=$((docs_ok + 1))
    else
        echo "  DOCUMENT doc$s IS '$doc', last save $last"
    fi
done
counters=$("$bin/ferry" stats "$mp" --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(" ".join(f"{k}={s.get(k, 0)}" for k in ("reconnects", "retried")))')
doc=$(cat "$work/export/doc" 2>/dev/null || echo "(none)")
echo "$made saves by $savers saver(s), $failed failed, $kills restarts of ferryd (SIG$sig); $counters"
echo "  $docs_ok of $savers document(s) are their last save"
[ ! -s "$work/err" ] || echo "  errors: $(sort "$work/err" | uniq -c | sort -rn | head -3 | tr -s ' ' | tr '\n' ';')"
"$bin/ferry" umount "$mp"
