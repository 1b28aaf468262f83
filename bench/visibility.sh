#!/usr/bin/env bash
# How long a change takes to show through a mount that has the old state cached: the
# server's push (inotify on the export, or a commit through another mount) and the
# mount's invalidation, end to end. Two mounts (A, B) of one ferryd on loopback; each
# round changes one thing and times, with a tight polling loop on the other side, until
# the new state is seen:
#
#   export->A  content  a cached 4 KiB file rewritten on the export (same size)
#   export->A  create   a new name in a cached directory, seen in A's listing
#   export->A  chmod    the mode of a cached file
#   A->B       content  a file rewritten and closed through A, read through B
#
#   sudo bench/visibility.sh [--rounds N] [--bin DIR] [--delay-ms N]
#
# Times run from just before the change (for A->B: A's write and close, which waits
# until B has dropped its copy) until the other side sees it. --delay-ms puts
# bench/delayproxy.py in front of ferryd (RTT + 2N ms). Prints p50, p90 and max in ms per
# kind. Each poll costs a trip through the kernel and, when the cache was dropped, one to
# the server, which is included. Needs root (FUSE). Everything it makes is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release rounds=50 delay=0
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --delay-ms) delay=$2; shift 2 ;;
        *) echo "usage: $0 [--rounds N] [--bin DIR] [--delay-ms N]" >&2; exit 2 ;;
    esac
done
. scripts/lib.sh
ferry_work visibility
proxy=
cleanup_all() {
    mountpoint -q "$work/mnt2" 2>/dev/null && { "$bin/ferry" umount "$work/mnt2" 2>/dev/null || umount -l "$work/mnt2"; }
    [ -n "$proxy" ] && kill "$proxy" 2>/dev/null
    ferry_cleanup
}
trap cleanup_all EXIT
mkdir -p "$work/mnt2" "$work/export/d"
head -c 4096 /dev/urandom >"$work/export/f"
head -c 4096 /dev/urandom >"$work/export/g"
: >"$work/export/m"
ferry_start_server --state-dir "$work/state"
remote=127.0.0.1:$port
if [ "$delay" != 0 ]; then
    python3 -u bench/delayproxy.py 0 "127.0.0.1:$port" "$delay" >"$work/proxy.out" 2>"$work/proxy.err" &
    proxy=$!
    line=
    for _ in $(seq 100); do
        line=$(head -n1 "$work/proxy.out" 2>/dev/null || true)
        [ -n "$line" ] && break
        sleep 0.1
    done
    case $line in *listening*) ;; *) echo "delay proxy did not start: $(cat "$work/proxy.err")" >&2; exit 1 ;; esac
    remote=127.0.0.1:${line##*:}
fi
"$bin/ferry" mount --cache-dir "$work/cache" "$remote" "$work/mnt" 2>>"$work/mount.log"
"$bin/ferry" mount --cache-dir "$work/cache2" "$remote" "$work/mnt2" 2>>"$work/mount.log"
echo "ferry $("$bin/ferry" --version 2>/dev/null || true) ($bin), $rounds rounds, delay ${delay} ms each way"
python3 - "$work/export" "$work/mnt" "$work/mnt2" "$rounds" "$bin/ferry" <<'PY'
import os, sys, time, json, subprocess
exp, a, b, rounds, ferry = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]

def live(mp):
    out = subprocess.run([ferry, "stats", "--json", mp], capture_output=True, text=True)
    return out.returncode == 0 and json.loads(out.stdout).get("events_live") is True

def wait(cond, limit=10.0):
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > limit:
            return None
    return time.perf_counter() - t0

def read(p):
    try:
        with open(p, "rb") as f:
            return f.read()
    except OSError:
        return None

results = {}
def note(kind, t0_fn, change, seen):
    t = []
    for i in range(rounds):
        t0_fn(i)          # make sure the old state is cached on the observing side
        start = time.perf_counter()
        change(i)
        d = wait(lambda: seen(i))
        if d is None:
            print(f"{kind}: round {i} not seen within 10 s", file=sys.stderr)
            sys.exit(1)
        t.append((time.perf_counter() - start) * 1000)
    t.sort()
    results[kind] = t

for mp in (a, b):
    if wait(lambda: live(mp), 10) is None:
        print(f"{mp}: event stream not live", file=sys.stderr); sys.exit(1)

def new_bytes(i):
    return (b"round %06d " % i) * 341 + b"x" * (4096 - 12 * 341)

note("export->A content",
     lambda i: read(os.path.join(a, "f")),
     lambda i: open(os.path.join(exp, "f"), "r+b").write(new_bytes(i)),
     lambda i: read(os.path.join(a, "f")) == new_bytes(i))
note("export->A create",
     lambda i: os.listdir(os.path.join(a, "d")),
     lambda i: open(os.path.join(exp, "d", f"n{i}"), "wb").close(),
     lambda i: f"n{i}" in os.listdir(os.path.join(a, "d")))
note("export->A chmod",
     lambda i: os.stat(os.path.join(a, "m")),
     lambda i: os.chmod(os.path.join(exp, "m"), 0o600 if i % 2 == 0 else 0o644),
     lambda i: (os.stat(os.path.join(a, "m")).st_mode & 0o777) == (0o600 if i % 2 == 0 else 0o644))
def write_a(i):
    with open(os.path.join(a, "g"), "r+b") as f:
        f.write(new_bytes(i))
note("A->B content",
     lambda i: read(os.path.join(b, "g")),
     write_a,
     lambda i: read(os.path.join(b, "g")) == new_bytes(i))

print(f"{'change':20s} {'p50 ms':>8s} {'p90 ms':>8s} {'max ms':>8s}")
for kind, t in results.items():
    p = lambda q: t[min(len(t) - 1, int(q * len(t)))]
    print(f"{kind:20s} {p(0.5):8.2f} {p(0.9):8.2f} {t[-1]:8.2f}")
PY
