# Shared by the hand-run scripts of scripts/ and bench/ (sourced, from the repository
# root, after `bin` is set to where ferry and ferryd are).
#
#   ferry_work NAME          $work (export/, mnt/, cache/), a free $port; on exit the
#                            mount is unmounted, ferryd stopped and $work removed
#   ferry_start_server ARGS  ferryd ARGS on $port serving $work/export, as $srv; returns
#                            once it printed its address (after any rollback of an
#                            interrupted commit); stderr goes to $work/ferryd.log

ferry_work() {
    work=$(mktemp -d "/tmp/ferry-$1.XXXXXX")
    srv=
    trap ferry_cleanup EXIT
    mkdir -p "$work/export" "$work/mnt" "$work/cache"
    : >"$work/ferryd.log"
    : >"$work/ferryd.out"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
}

ferry_cleanup() {
    mountpoint -q "$work/mnt" 2>/dev/null && { "$bin/ferry" umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt"; }
    [ -n "$srv" ] && kill "$srv" 2>/dev/null && wait "$srv" 2>/dev/null
    rm -rf "$work"
}

ferry_start_server() {
    local before
    before=$(grep -c "serving" "$work/ferryd.out" || true)
    "$bin/ferryd" --listen "127.0.0.1:$port" "$@" "$work/export" \
        >>"$work/ferryd.out" 2>>"$work/ferryd.log" &
    srv=$!
    for _ in $(seq 200); do
        [ "$(grep -c "serving" "$work/ferryd.out" || true)" -gt "$before" ] && return 0
        sleep 0.05
    done
    echo "ferryd did not start; see $work/ferryd.log" >&2
    exit 1
}
