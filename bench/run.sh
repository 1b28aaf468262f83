#!/usr/bin/env bash
# bench/run.sh — compare ferry with sshfs and the local disk on one export.
#
# Usage: bench/run.sh [--quick] [--delay-ms N] [--only GROUPS] [--systems LIST]
#                     [--reps N] [--big-mib N] [--files N] [--dir-entries N]
#                     [--rand-reads N] [--build] [--no-install]
#
#   --quick          small sizes for a smoke test (64 MiB, 1,000 files, 1 run each)
#   --delay-ms N     put bench/delayproxy.py in front of sshd and ferryd, adding
#                    N ms per direction (RTT = 2N); N=0 measures the proxy itself
#   --only GROUPS    comma list of: seqread,seqwrite,randread,ls,tree,mem
#   --systems LIST   comma list of: local,sshfs,ferry (default all three)
#   --reps N         timed runs per phase (median reported; default 3, quick 1)
#   --build          run `cargo build --release -p ferry-server -p ferry-client` first
#   --no-install     never apt-get install missing tools (fail instead)
#
# Environment: FERRY_BIN_DIR (default <repo>/target/release),
#              BENCH_TMPDIR (default /tmp), PHASE_TIMEOUT_S (default 1800,
#              quick 300; a phase run longer than this is killed: FAIL),
#              REP_BUDGET_S (default 60: after a run slower than this, that
#              phase is not repeated for that system), FERRY_LABEL (free text
#              naming the ferry build, shown in the results), FERRY_MOUNT_ARGS
#              (extra `ferry mount` arguments, e.g. "--passthrough on"; shown in
#              the results), RESULTS_SUFFIX (appended to the results' label, so a
#              variant run does not overwrite bench/results/full.*).
#
# Needs root (drop_caches, FUSE, its own sshd). Only 127.0.0.1 traffic. All
# mounts, daemons and temp files are removed on exit, Ctrl-C or failure.
# Results: stdout, bench/results/LATEST.md, LATEST.csv, LATEST-raw.csv,
# LATEST-mem.csv, and the same under bench/results/<label>.* .
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ORIG_ARGS="$*"
REPO=$(cd "$HERE/.." && pwd)

# ---------------------------------------------------------------- options
QUICK=0
DELAY_MS=""
ONLY="seqread,seqwrite,randread,ls,tree,mem"
SYSTEMS_ARG="local,sshfs,ferry"
REPS=""
BIG_MIB=""
TREE_FILES=""
DIR_ENTRIES=""
RAND_READS=""
DO_BUILD=0
DO_INSTALL=1

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }
need_arg() { [[ $# -ge 2 && -n "$2" ]] || { echo "run.sh: $1 needs a value" >&2; exit 2; }; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]] || { echo "run.sh: '$1' is not a number" >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --delay-ms) need_arg "$@"; is_uint "$2"; DELAY_MS=$2; shift 2 ;;
        --only) need_arg "$@"; ONLY=$2; shift 2 ;;
        --systems) need_arg "$@"; SYSTEMS_ARG=$2; shift 2 ;;
        --reps) need_arg "$@"; is_uint "$2"; REPS=$2; shift 2 ;;
        --big-mib) need_arg "$@"; is_uint "$2"; BIG_MIB=$2; shift 2 ;;
        --files) need_arg "$@"; is_uint "$2"; TREE_FILES=$2; shift 2 ;;
        --dir-entries) need_arg "$@"; is_uint "$2"; DIR_ENTRIES=$2; shift 2 ;;
        --rand-reads) need_arg "$@"; is_uint "$2"; RAND_READS=$2; shift 2 ;;
        --build) DO_BUILD=1; shift ;;
        --no-install) DO_INSTALL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

# ---------------------------------------------------------------- sizes
if [[ $QUICK == 1 ]]; then
    : "${BIG_MIB:=64}" "${TREE_FILES:=1000}" "${DIR_ENTRIES:=1000}" "${RAND_READS:=500}" "${REPS:=1}"
else
    : "${BIG_MIB:=1024}" "${TREE_FILES:=5000}" "${DIR_ENTRIES:=10000}" "${RAND_READS:=2000}" "${REPS:=3}"
fi
MAX_FILE_KIB=16          # tree files are 0..16 KiB
FILES_PER_DIR=10         # tree layout: dNN/sNN/fNNN, 10 files per leaf dir
RAND_BS=4096
RAND_SEED=42
if [[ $QUICK == 1 ]]; then PHASE_TIMEOUT_S=${PHASE_TIMEOUT_S:-300}; else PHASE_TIMEOUT_S=${PHASE_TIMEOUT_S:-1800}; fi
REP_BUDGET_S=${REP_BUDGET_S:-60}
FERRY_BIN_DIR=${FERRY_BIN_DIR:-$REPO/target/release}
FERRYD_BIN=$FERRY_BIN_DIR/ferryd
FERRY_BIN=$FERRY_BIN_DIR/ferry
[[ $REPS -ge 1 ]] || { echo "run.sh: --reps must be >= 1" >&2; exit 2; }
[[ $BIG_MIB -ge 1 && $TREE_FILES -ge 1 && $DIR_ENTRIES -ge 1 && $RAND_READS -ge 1 ]] \
    || { echo "run.sh: sizes must be >= 1" >&2; exit 2; }

IFS=, read -r -a SYSTEMS <<<"$SYSTEMS_ARG"
for s in "${SYSTEMS[@]}"; do
    case "$s" in local|sshfs|ferry) ;; *) echo "run.sh: unknown system '$s'" >&2; exit 2 ;; esac
done
IFS=, read -r -a GROUPS_SEL <<<"$ONLY"
for g in "${GROUPS_SEL[@]}"; do
    case "$g" in seqread|seqwrite|randread|ls|tree|mem) ;;
        *) echo "run.sh: unknown phase group '$g' (seqread,seqwrite,randread,ls,tree,mem)" >&2; exit 2 ;;
    esac
done
want_group() { local g; for g in "${GROUPS_SEL[@]}"; do [[ $g == "$1" ]] && return 0; done; return 1; }
want_sys() { local s; for s in "${SYSTEMS[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (drop_caches, FUSE, sshd)"

# ---------------------------------------------------------------- state + cleanup
TMP=""
SSHD_PID=""
FERRYD_PID=""
CHILD_PID=""
PROXY_PIDS=()
BG_PIDS=()
CREATED_RUN_SSHD=0
declare -A MP=()          # system -> mountpoint (sshfs, ferry)
declare -A ROOT=()        # system -> directory the phases work in
declare -A BROKEN=()      # system -> reason it is skipped from now on
FERRY_SKIP_REASON=""

# pids of processes whose command line mentions PATH (our unique temp paths)
pids_mentioning() {
    local p f
    for f in /proc/[0-9]*/cmdline; do
        p=${f#/proc/}; p=${p%/cmdline}
        [[ $p == "$$" || $p == "$BASHPID" ]] && continue
        if { tr '\0' ' ' <"$f"; } 2>/dev/null | grep -qF -- "$1"; then echo "$p"; fi
    done
}

is_mounted() { [[ -n "$1" ]] && grep -qF " $1 " /proc/self/mounts; }

force_unmount() {  # mountpoint
    local mp=$1 i
    is_mounted "$mp" || return 0
    timeout 20 fusermount3 -u "$mp" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do is_mounted "$mp" || break; sleep 0.1; done
    if is_mounted "$mp"; then
        timeout 10 fusermount3 -uz "$mp" 2>/dev/null || timeout 10 umount -l "$mp" 2>/dev/null || true
    fi
    ! is_mounted "$mp"
}

kill_pid() {  # pid — TERM, wait up to 5 s, then KILL
    local pid=$1 i
    [[ -n "$pid" ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n "$TMP" ]]; then
        log "cleaning up"
        local mp p
        kill_pid "$CHILD_PID"
        for mp in "${MP[@]}"; do
            if [[ "$mp" == "${MP[ferry]:-}" && -x "$FERRY_BIN" ]] && is_mounted "$mp"; then
                timeout 20 "$FERRY_BIN" umount "$mp" >/dev/null 2>&1
            fi
            force_unmount "$mp"
        done
        for p in "${BG_PIDS[@]}" "${PROXY_PIDS[@]}" "$FERRYD_PID" "$SSHD_PID"; do kill_pid "$p"; done
        # anything still running from our temp dir (mount daemons, ssh, sftp-server)
        for p in $(pids_mentioning "$TMP"); do kill_pid "$p"; done
        for mp in "${MP[@]}"; do is_mounted "$mp" && umount -l "$mp" 2>/dev/null; done
        local still=0
        for mp in "${MP[@]}"; do is_mounted "$mp" && still=1; done
        if [[ $still == 0 ]]; then
            rm -rf --one-file-system "$TMP"
        else
            log "WARNING: a mount under $TMP could not be removed; leaving $TMP"
        fi
    fi
    if [[ $CREATED_RUN_SSHD == 1 ]]; then rmdir /run/sshd 2>/dev/null; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ---------------------------------------------------------------- install
ensure_tools() {
    local missing=()
    command -v sshfs >/dev/null || missing+=(sshfs)
    [[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
    command -v ssh-keygen >/dev/null || missing+=(openssh-client)
    command -v fusermount3 >/dev/null || missing+=(fuse3)
    [[ -x /usr/lib/openssh/sftp-server ]] || missing+=(openssh-sftp-server)
    command -v python3 >/dev/null || missing+=(python3)
    if [[ ${#missing[@]} -gt 0 ]]; then
        [[ $DO_INSTALL == 1 ]] || die "missing: ${missing[*]} (and --no-install given)"
        log "installing: ${missing[*]}"
        timeout 600 apt-get update -qq
        DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    [[ -e /dev/fuse ]] || die "/dev/fuse missing: FUSE is not available here"
}

# ---------------------------------------------------------------- helpers
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {  # port timeout_s
    local i n=$(( $2 * 10 ))
    for ((i = 0; i < n; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

secs_since() {  # start_ns -> seconds with ms precision
    local now; now=$(date +%s%N)
    awk -v a="$1" -v b="$now" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'
}

# Run a (possibly long) command under the phase timeout as a background job and
# wait for it, so that Ctrl-C / SIGTERM run the cleanup trap at once instead of
# after the command; the trap kills CHILD_PID.
run_fg() {
    local rc=0
    timeout -k 10 "$PHASE_TIMEOUT_S" "$@" &
    CHILD_PID=$!
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=""
    return "$rc"
}

RAW=""      # raw csv: phase,system,rep,seconds|FAIL|TIMEOUT
declare -A SLOW=()   # "phase/system" -> 1 once a run exceeded REP_BUDGET_S

# run a command under a timeout; record its wall time as phase/system/rep
timed() {  # phase system rep -- cmd...
    local phase=$1 sys=$2 rep=$3 t0 rc=0 s
    shift 4
    t0=$(date +%s%N)
    run_fg "$@" || rc=$?
    s=$(secs_since "$t0")
    if [[ $rc == 0 ]]; then
        echo "$phase,$sys,$rep,$s" >>"$RAW"
        log "  $phase $sys run $rep: ${s}s"
        if awk -v s="$s" -v b="$REP_BUDGET_S" 'BEGIN { exit !(s > b) }'; then SLOW[$phase/$sys]=1; fi
        return 0
    fi
    local what=FAIL; [[ $rc == 124 || $rc == 137 ]] && what=TIMEOUT
    echo "$phase,$sys,$rep,$what" >>"$RAW"
    log "  $phase $sys run $rep: $what (exit $rc after ${s}s)"
    SLOW[$phase/$sys]=1
    return 1
}

# should run number REP of PHASE on SYS happen?
want_run() {  # phase sys rep
    [[ -z "${BROKEN[$2]:-}" ]] || return 1
    [[ $3 == 1 || -z "${SLOW[$1/$2]:-}" ]]
}

# ---------------------------------------------------------------- sshd
SSH_DIR=""
SSH_PORT=""        # sshd's own port
SSH_MOUNT_PORT=""  # what sshfs connects to (proxy port in delay mode)
SSHFS_OPTS=""

start_sshd() {
    SSH_DIR=$TMP/ssh
    mkdir -p "$SSH_DIR"
    chmod 700 "$SSH_DIR"
    ssh-keygen -q -t ed25519 -N '' -C ferry-bench-host -f "$SSH_DIR/host_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C ferry-bench-client -f "$SSH_DIR/client_ed25519"
    cp "$SSH_DIR/client_ed25519.pub" "$SSH_DIR/authorized_keys"
    chmod 600 "$SSH_DIR/authorized_keys"
    SSH_PORT=$(free_port)
    cat >"$SSH_DIR/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $SSH_DIR/host_ed25519
PidFile $SSH_DIR/sshd.pid
AuthorizedKeysFile $SSH_DIR/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
UseDNS no
LogLevel ERROR
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
    if [[ ! -d /run/sshd ]]; then mkdir -p /run/sshd; chmod 755 /run/sshd; CREATED_RUN_SSHD=1; fi
    /usr/sbin/sshd -t -f "$SSH_DIR/sshd_config" || die "sshd config test failed"
    /usr/sbin/sshd -D -e -f "$SSH_DIR/sshd_config" 2>"$SSH_DIR/sshd.log" &
    SSHD_PID=$!
    wait_port "$SSH_PORT" 10 || die "sshd did not start: $(tail -5 "$SSH_DIR/sshd.log")"
    log "sshd listening on 127.0.0.1:$SSH_PORT (pid $SSHD_PID)"
}

ssh_opts() {
    echo "IdentityFile=$SSH_DIR/client_ed25519,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes,LogLevel=ERROR"
}

# ---------------------------------------------------------------- proxies
PROXY_PORT=""
start_proxy() {  # target_port -> sets PROXY_PORT (not run in a subshell: keeps the pid)
    local out=$TMP/proxy-$1.out i line=""
    python3 -u "$HERE/delayproxy.py" 0 "127.0.0.1:$1" "$DELAY_MS" >"$out" 2>"$TMP/proxy-$1.err" &
    PROXY_PIDS+=($!)
    for ((i = 0; i < 100; i++)); do
        line=$(head -n1 "$out" 2>/dev/null || true)
        [[ -n "$line" ]] && break
        sleep 0.1
    done
    [[ "$line" == *listening* ]] || die "delay proxy for port $1 did not start: $(cat "$TMP/proxy-$1.err")"
    PROXY_PORT=${line##*:}
}

# ---------------------------------------------------------------- ferry
FERRY_ADDR=""        # what ferry mount connects to
FERRYD_ADDR=""

FERRY_BUILT=""
FERRY_MOUNT_OPTS=()
FERRY_CACHE_DIR=""
ferry_available() {
    if [[ ! -x "$FERRYD_BIN" || ! -x "$FERRY_BIN" ]]; then
        FERRY_SKIP_REASON="ferry binaries not found in $FERRY_BIN_DIR (run cargo build --release, or pass --build)"
        return 1
    fi
    # run private copies, so that a concurrent `cargo build` cannot swap them mid-run
    FERRY_BUILT=$(date -u -r "$FERRY_BIN" '+%Y-%m-%d %H:%M UTC')
    mkdir -p "$TMP/bin"
    cp "$FERRYD_BIN" "$FERRY_BIN" "$TMP/bin/"
    FERRYD_BIN=$TMP/bin/ferryd
    FERRY_BIN=$TMP/bin/ferry
    # ferry keeps file data in a disk cache (default ~/.cache/ferry): keep the
    # benchmark's in its temp dir, so that runs are isolated and "cold" can empty it
    if "$FERRY_BIN" mount --help 2>/dev/null | grep -q -- '--cache-dir'; then
        FERRY_CACHE_DIR=$TMP/ferry-cache
        FERRY_MOUNT_OPTS=(--cache-dir "$FERRY_CACHE_DIR")
        # shellcheck disable=SC2206 # word splitting of the extra arguments is wanted
        [[ -z "${FERRY_MOUNT_ARGS:-}" ]] || FERRY_MOUNT_OPTS+=(${FERRY_MOUNT_ARGS})
    fi
    return 0
}

start_ferryd() {
    local i line=""
    # Its own state folder: records and answers of a temp export go with the run.
    "$FERRYD_BIN" "$TMP/export" --listen 127.0.0.1:0 --state-dir "$TMP/state" >"$TMP/ferryd.out" 2>"$TMP/ferryd.err" &
    FERRYD_PID=$!
    for ((i = 0; i < 150; i++)); do
        line=$(head -n1 "$TMP/ferryd.out" 2>/dev/null || true)
        [[ -n "$line" ]] && break
        kill -0 "$FERRYD_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z "$line" ]]; then
        FERRY_SKIP_REASON="ferryd printed no address within 15 s (stderr: $(tail -c 400 "$TMP/ferryd.err" | tr '\n' ' '))"
        kill_pid "$FERRYD_PID"; FERRYD_PID=""
        return 1
    fi
    FERRYD_ADDR=${line##* }
    if [[ ! "$FERRYD_ADDR" =~ ^127\.0\.0\.1:[0-9]+$ ]]; then
        FERRY_SKIP_REASON="could not parse ferryd address from: $line"
        kill_pid "$FERRYD_PID"; FERRYD_PID=""
        return 1
    fi
    log "ferryd serving on $FERRYD_ADDR (pid $FERRYD_PID)"
}

# A new ferryd (and the mount on it): for phases that compare a server process with
# nothing in memory, as sshfs's sftp-server (new for each mount) always is.
restart_ferryd() {
    unmount_sys ferry || true
    kill_pid "$FERRYD_PID"; FERRYD_PID=""
    start_ferryd || return 1
    FERRY_ADDR=$FERRYD_ADDR
    if [[ -n "$DELAY_MS" ]]; then
        start_proxy "${FERRYD_ADDR##*:}"
        FERRY_ADDR=127.0.0.1:$PROXY_PORT
    fi
}

# ---------------------------------------------------------------- mounting
mount_sys() {  # system
    local sys=$1 mp=${MP[$1]} err=$TMP/mount-$1.err
    case "$sys" in
        sshfs)
            timeout 60 sshfs -p "$SSH_MOUNT_PORT" -o "$(ssh_opts)" \
                "root@127.0.0.1:$TMP/export" "$mp" 2>"$err" || true ;;
        ferry)
            # `ferry mount` should return once the mount is usable; if it stays in
            # the foreground instead, it is left running as the mount daemon.
            local pid i
            "$FERRY_BIN" mount "${FERRY_MOUNT_OPTS[@]}" "$FERRY_ADDR" "$mp" >"$TMP/mount-ferry.out" 2>"$err" &
            pid=$!
            for ((i = 0; i < 600; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                is_mounted "$mp" && break
                sleep 0.1
            done
            if kill -0 "$pid" 2>/dev/null; then
                if is_mounted "$mp"; then
                    [[ -n "${FERRY_FOREGROUND:-}" ]] || log "note: 'ferry mount' did not return after mounting; treating it as the mount daemon"
                    FERRY_FOREGROUND=1
                else
                    log "'ferry mount' neither mounted nor returned within 60 s; killing it"
                    kill_pid "$pid"
                fi
            else
                wait "$pid" || log "'ferry mount' exited with status $?"
            fi ;;
    esac
    if ! is_mounted "$mp" || ! timeout 20 stat "$mp/data/big.bin" >/dev/null 2>&1; then
        log "mounting $sys failed: $(tail -c 400 "$err" | tr '\n' ' ')"
        return 1
    fi
}

unmount_sys() {  # system
    local sys=$1 mp=${MP[$1]} p i
    if [[ $sys == ferry ]] && is_mounted "$mp"; then
        timeout 30 "$FERRY_BIN" umount "$mp" >/dev/null 2>>"$TMP/umount-ferry.err" \
            || log "ferry umount $mp failed (exit $?): $(tail -c 300 "$TMP/umount-ferry.err" | tr '\n' ' ')"
    fi
    force_unmount "$mp" || { log "could not unmount $mp"; return 1; }
    # wait (bounded) for the mount daemon to exit, then make sure it has
    for ((i = 0; i < 50; i++)); do
        [[ -z "$(pids_mentioning "$mp")" ]] && return 0
        sleep 0.1
    done
    for p in $(pids_mentioning "$mp"); do
        log "mount daemon $p for $mp still running after unmount; killing it"
        kill_pid "$p"
    done
}

remount() {  # system
    unmount_sys "$1" || true
    mount_sys "$1"
}

mark_broken() {  # system reason
    BROKEN[$1]=$2
    log "SKIPPING $1 from now on: $2"
}

# A cold ferry mount starts with an empty data cache. The old cache is moved aside, not
# removed: on an ext4 without a journal (this VM's) every create scans past the inodes
# deleted in its block group in the last 1-6 minutes (`recently_deleted` in ext4's inode
# allocator), so removing the 10,000 files of the cache a 5,000-file untar or `cat`
# left made the next cold `cat`'s own cache files slow to create: its ferry time went
# 2.35 -> 3.94 s from the first run to the second (session 26). The caches moved aside
# are removed before the tree phase (the phases before it cache few, large files) and
# at exit.
retire_ferry_cache() {
    [[ -n "$FERRY_CACHE_DIR" && -e "$FERRY_CACHE_DIR" ]] || return 0
    mkdir -p "$TMP/old-caches"
    mv "$FERRY_CACHE_DIR" "$TMP/old-caches/$(date +%s%N)"
}

# cold = fresh mount (no client-side caches of any kind: ferry's disk cache is
# emptied too) + empty kernel caches
make_cold() {  # system
    if [[ $1 != local ]]; then
        unmount_sys "$1" || true
        if [[ $1 == ferry ]]; then retire_ferry_cache; fi
        mount_sys "$1" || { mark_broken "$1" "remount failed"; return 1; }
    fi
    drop_caches
}

# after a failed phase: is the mount still alive? if not, try once to remount
check_alive() {  # system
    local sys=$1
    [[ $sys == local ]] && return 0
    if timeout 20 stat "${ROOT[$sys]}/data/big.bin" >/dev/null 2>&1; then return 0; fi
    log "$sys mount is not responding; remounting"
    remount "$sys" || mark_broken "$sys" "mount died and remount failed"
}

# ---------------------------------------------------------------- data set
make_dataset() {
    local ex=$TMP/export
    mkdir -p "$ex/data/dir" "$ex/w"
    log "creating ${BIG_MIB} MiB random file, ${DIR_ENTRIES}-entry directory, ${TREE_FILES}-file tarball"
    dd if=/dev/urandom of="$ex/data/big.bin" bs=1M count="$BIG_MIB" status=none
    python3 - "$ex/data/dir" "$DIR_ENTRIES" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    with open(os.path.join(d, f"entry{i:06d}"), "wb") as f:
        f.write(b"x" * (i % 100))
EOF
    python3 - "$TMP/tree.tar" "$TREE_FILES" "$MAX_FILE_KIB" "$FILES_PER_DIR" <<'EOF'
import io, random, sys, tarfile
out, n, max_kib, per_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(1234)
leaves = (n + per_dir - 1) // per_dir
with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
    def add_dir(name):
        ti = tarfile.TarInfo(name); ti.type = tarfile.DIRTYPE; ti.mode = 0o755; ti.mtime = 1700000000
        tar.addfile(ti)
    add_dir("tree")
    made = set()
    for i in range(n):
        leaf = i // per_dir
        top, sub = f"tree/d{leaf // 10:03d}", f"tree/d{leaf // 10:03d}/s{leaf % 10}"
        for d in (top, sub):
            if d not in made:
                add_dir(d); made.add(d)
        size = rng.randint(0, max_kib * 1024)
        ti = tarfile.TarInfo(f"{sub}/f{i:05d}.dat"); ti.size = size; ti.mode = 0o644; ti.mtime = 1700000000
        tar.addfile(ti, io.BytesIO(rng.randbytes(size)))
EOF
    TREE_MIB=$(python3 - "$TMP/tree.tar" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    print(f"{sum(m.size for m in t.getmembers()) / 1048576:.1f}")
EOF
)
    cat >"$TMP/randread.py" <<'EOF'
import os, random, sys, time
path, n, bs, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fd = os.open(path, os.O_RDONLY)
blocks = os.fstat(fd).st_size // bs
rng = random.Random(seed)
offs = [rng.randrange(blocks) * bs for _ in range(n)]
t = time.perf_counter()
for off in offs:
    if len(os.pread(fd, bs, off)) != bs:
        sys.exit(f"short read at {off}")
print(f"{time.perf_counter() - t:.4f}")
os.close(fd)
EOF
}

# ---------------------------------------------------------------- phases
wdir() { echo "${ROOT[$1]}/w/$1"; }

phase_seqread() {
    local rep sys f
    log "phase seqread (cold, after remount, warm)"
    for ((rep = 1; rep <= REPS; rep++)); do
        for sys in "${ACTIVE[@]}"; do
            want_run seqread_cold "$sys" "$rep" || continue
            f=${ROOT[$sys]}/data/big.bin
            make_cold "$sys" || continue
            timed seqread_cold "$sys" "$rep" -- dd if="$f" of=/dev/null bs=1M status=none || check_alive "$sys"
        done
    done
    # fresh mount + dropped kernel caches, but client-side persistent caches kept
    # (ferry's disk cache, filled by the cold reads above); local has no such state
    for ((rep = 1; rep <= REPS; rep++)); do
        for sys in "${ACTIVE[@]}"; do
            [[ $sys != local ]] || continue
            want_run seqread_remount "$sys" "$rep" || continue
            f=${ROOT[$sys]}/data/big.bin
            remount "$sys" || { mark_broken "$sys" "remount failed"; continue; }
            drop_caches
            timed seqread_remount "$sys" "$rep" -- dd if="$f" of=/dev/null bs=1M status=none || check_alive "$sys"
        done
    done
    for ((rep = 1; rep <= REPS; rep++)); do
        for sys in "${ACTIVE[@]}"; do
            want_run seqread_warm "$sys" "$rep" || continue
            f=${ROOT[$sys]}/data/big.bin
            if [[ $rep == 1 ]]; then
                run_fg dd if="$f" of=/dev/null bs=1M status=none || { check_alive "$sys"; continue; }
            fi
            timed seqread_warm "$sys" "$rep" -- dd if="$f" of=/dev/null bs=1M status=none || check_alive "$sys"
        done
    done
    return 0
}

phase_seqwrite() {
    local rep sys f
    log "phase seqwrite"
    for ((rep = 1; rep <= REPS; rep++)); do
        for sys in "${ACTIVE[@]}"; do
            want_run seqwrite "$sys" "$rep" || continue
            f=$(wdir "$sys")/write.bin
            timeout 120 rm -f "$f" || true
            sync
            timed seqwrite "$sys" "$rep" -- dd if=/dev/zero of="$f" bs=1M count="$BIG_MIB" conv=fsync status=none \
                || check_alive "$sys"
            local got; got=$(stat -c %s "$TMP/export/w/$sys/write.bin" 2>/dev/null || echo missing)
            [[ "$got" == $((BIG_MIB * 1048576)) ]] || log "  WARNING: $sys wrote $got bytes, expected $((BIG_MIB * 1048576))"
            timeout 120 rm -f "$f" || true
        done
    done
    # cp within one mount (coreutils cp tries copy_file_range first)
    for ((rep = 1; rep <= REPS; rep++)); do
        for sys in "${ACTIVE[@]}"; do
            want_run cp_inside "$sys" "$rep" || continue
            f=$(wdir "$sys")/cp.bin
            timeout 120 rm -f "$f" || true
            sync
            timed cp_inside "$sys" "$rep" -- sh -c 'cp "$1" "$2" && sync' cp \
                "${ROOT[$sys]}/data/big.bin" "$f" || check_alive "$sys"
            cmp -s "$TMP/export/data/big.bin" "$TMP/export/w/$sys/cp.bin" \
                || log "  WARNING: $sys: the copy differs from the original"
            timeout 120 rm -f "$f" || true
        done
    done
    return 0
}

phase_randread() {
    local rep sys out s
    log "phase randread ($RAND_READS x ${RAND_BS} B preads, cold)"
    for ((rep = 1; rep <= REPS; rep++)); do
        for sys in "${ACTIVE[@]}"; do
            want_run randread_cold "$sys" "$rep" || continue
            make_cold "$sys" || continue
            # the program times its own pread loop (excludes python start-up)
            if run_fg python3 "$TMP/randread.py" "${ROOT[$sys]}/data/big.bin" "$RAND_READS" "$RAND_BS" \
                    "$RAND_SEED" >"$TMP/randread.out" 2>"$TMP/randread.err"; then
                s=$(tail -n1 "$TMP/randread.out")
                echo "randread_cold,$sys,$rep,$s" >>"$RAW"
                log "  randread_cold $sys run $rep: ${s}s"
                if awk -v s="$s" -v b="$REP_BUDGET_S" 'BEGIN { exit !(s > b) }'; then SLOW[randread_cold/$sys]=1; fi
            else
                echo "randread_cold,$sys,$rep,FAIL" >>"$RAW"
                log "  randread_cold $sys run $rep: FAIL $(tail -c 300 "$TMP/randread.err")"
                SLOW[randread_cold/$sys]=1
                check_alive "$sys"
            fi
        done
    done
    return 0
}

ls_dir() { ls -l "$1" >/dev/null; }

phase_ls() {
    local rep sys d
    log "phase ls ($DIR_ENTRIES entries; cold, warm)"
    for ((rep = 1; rep <= REPS; rep++)); do
        for sys in "${ACTIVE[@]}"; do
            want_run ls_cold "$sys" "$rep" || continue
            d=${ROOT[$sys]}/data/dir
            make_cold "$sys" || continue
            timed ls_cold "$sys" "$rep" -- ls -l "$d" >/dev/null || check_alive "$sys"
        done
    done
    # cold as above, and ferryd restarted first: nothing of the directory in its
    # memory either (ferryd keeps listings its watches vouch for; drop_caches does
    # not empty them). local and sshfs have no such state: their runs repeat `cold`.
    for ((rep = 1; rep <= REPS; rep++)); do
        for sys in "${ACTIVE[@]}"; do
            want_run ls_cold_fresh "$sys" "$rep" || continue
            d=${ROOT[$sys]}/data/dir
            if [[ $sys == ferry ]] && ! restart_ferryd; then
                mark_broken ferry "ferryd restart failed: $FERRY_SKIP_REASON"
                continue
            fi
            make_cold "$sys" || continue
            timed ls_cold_fresh "$sys" "$rep" -- ls -l "$d" >/dev/null || check_alive "$sys"
        done
    done
    for ((rep = 1; rep <= REPS; rep++)); do
        for sys in "${ACTIVE[@]}"; do
            want_run ls_warm "$sys" "$rep" || continue
            d=${ROOT[$sys]}/data/dir
            if [[ $rep == 1 ]]; then
                run_fg ls -l "$d" >/dev/null || { check_alive "$sys"; continue; }
            fi
            timed ls_warm "$sys" "$rep" -- ls -l "$d" >/dev/null || check_alive "$sys"
        done
    done
    return 0
}

phase_tree() {
    local rep sys t n
    log "phase tree ($TREE_FILES files: untar, ls -lR cold, read all cold, rm -rf)"
    rm -rf "$TMP/old-caches"
    # Every untar first, each into its own directory, the removals last: ext4 does not
    # reuse an inode within 60 s of its deletion (5 min while its inode table block is
    # dirty) while that block is cached, and every create scans past the ones it has
    # seen so far. An untar right after the rm -rf of the run before got slower with
    # every file it made (creates on the export: 0.1 ms for the first 50 files, 1.7 ms
    # for the 500th through ferryd, 0.6 ms locally), whichever system ran; measured by
    # `strace -T` of ferryd and of a local tar, and gone after a 65 s wait.
    for ((rep = 1; rep <= REPS; rep++)); do
        for sys in "${ACTIVE[@]}"; do
            want_run untar "$sys" "$rep" || continue
            t=$(wdir "$sys")/t$rep
            timeout 300 rm -rf "$t" || true
            mkdir -p "$t"
            # The same start for every system: caches dropped, the tarball read once.
            drop_caches
            cat "$TMP/tree.tar" >/dev/null
            if ! timed untar "$sys" "$rep" -- bash -c 'tar --no-same-owner -xf "$1" -C "$2" && sync' _ "$TMP/tree.tar" "$t"; then
                check_alive "$sys"; continue
            fi
            n=$(find "$TMP/export/w/$sys/t$rep" -type f | wc -l)
            [[ $n == "$TREE_FILES" ]] || log "  WARNING: $sys untar produced $n files, expected $TREE_FILES"
        done
    done
    for ((rep = 1; rep <= REPS; rep++)); do
        for sys in "${ACTIVE[@]}"; do
            t=$(wdir "$sys")/t$rep
            [[ -d "$TMP/export/w/$sys/t$rep" ]] || continue
            want_run lsR_cold "$sys" "$rep" && make_cold "$sys" \
                && { timed lsR_cold "$sys" "$rep" -- bash -c 'ls -lR "$1" >/dev/null' _ "$t" || check_alive "$sys"; }
            want_run readall_cold "$sys" "$rep" && make_cold "$sys" \
                && { timed readall_cold "$sys" "$rep" -- bash -c 'find "$1" -type f -print0 | xargs -0 cat >/dev/null' _ "$t" \
                    || check_alive "$sys"; }
        done
    done
    for ((rep = 1; rep <= REPS; rep++)); do
        for sys in "${ACTIVE[@]}"; do
            t=$(wdir "$sys")/t$rep
            [[ -d "$TMP/export/w/$sys/t$rep" ]] || continue
            if want_run rmrf "$sys" "$rep"; then
                # Of a tree the mount has just walked, as when each removal followed
                # its own tree's `cat` (this mount may never have seen it).
                run_fg find "$t" >/dev/null || check_alive "$sys"
                timed rmrf "$sys" "$rep" -- rm -rf "$t" || check_alive "$sys"
            fi
            [[ ! -e "$TMP/export/w/$sys/t$rep" ]] || { log "  WARNING: $sys rm -rf left files behind"; rm -rf "$TMP/export/w/$sys/t$rep"; }
        done
    done
    return 0
}

MEM_CSV=""
kib_field() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
# the mount daemon = processes whose cmdline names the mountpoint, plus their children
daemon_pids() {
    local p f ppid roots r
    roots=$(pids_mentioning "$1")
    # sshfs starts its ssh before daemonizing, so that ssh is not its child:
    # find it by the benchmark's own client key in its command line
    if [[ "$1" == "${MP[sshfs]:-}" ]]; then roots="$roots $(pids_mentioning "$SSH_DIR/client_ed25519")"; fi
    {
        for p in $roots; do echo "$p"; done
        for f in /proc/[0-9]*/stat; do
            p=${f#/proc/}; p=${p%/stat}
            ppid=$({ awk '{ sub(/^.*\) /, ""); print $2 }' <"$f"; } 2>/dev/null || true)
            for r in $roots; do if [[ "$ppid" == "$r" ]]; then echo "$p"; fi; done
        done
    } | sort -un
}
sum_field() {  # field pids...
    local f=$1 total=0 p v; shift
    for p in "$@"; do v=$(kib_field "$p" "$f"); total=$((total + ${v:-0})); done
    echo "$total"
}

phase_mem() {
    local sys mp pids base hwm mx t0 cs sampler_out i
    log "phase mem (peak RSS of the mount daemon while copying ${BIG_MIB} MiB inside the mount with dd)"
    for sys in "${ACTIVE[@]}"; do
        [[ $sys == local ]] && continue
        [[ -z "${BROKEN[$sys]:-}" ]] || continue
        mp=${MP[$sys]}
        make_cold "$sys" || continue
        mapfile -t pids < <(daemon_pids "$mp")
        if [[ ${#pids[@]} == 0 ]]; then
            echo "$sys,,,,,no process found with $mp in its command line" >>"$MEM_CSV"
            continue
        fi
        base=$(sum_field VmRSS "${pids[@]}")
        sampler_out=$TMP/mem-$sys.samples
        : >"$sampler_out"
        (   # bounded sampler: at most PHASE_TIMEOUT_S*5 samples
            for ((i = 0; i < PHASE_TIMEOUT_S * 5; i++)); do
                sum_field VmRSS "${pids[@]}" >>"$sampler_out"
                sleep 0.2
            done
        ) &
        BG_PIDS+=($!)
        local spid=$!
        t0=$(date +%s%N)
        # dd, not cp: cp uses copy_file_range, which ferry hands to the server (no byte
        # would pass through the daemon whose memory is measured here)
        if run_fg dd if="${ROOT[$sys]}/data/big.bin" of="$(wdir "$sys")/copy.bin" bs=1M status=none; then
            cs=$(secs_since "$t0")
        else
            cs=FAIL
        fi
        hwm=$(sum_field VmHWM "${pids[@]}")
        kill_pid "$spid"
        mx=$(sort -n "$sampler_out" | tail -n1)
        log "  $sys: daemon pids ${pids[*]}: RSS after mount ${base} KiB, VmHWM ${hwm} KiB, max sampled ${mx:-?} KiB, copy ${cs}s"
        echo "$sys,$base,$hwm,${mx:-},$cs,pids ${pids[*]}" >>"$MEM_CSV"
        timeout 120 rm -f "$(wdir "$sys")/copy.bin" || true
        if [[ $cs == FAIL ]]; then check_alive "$sys"; fi
    done
    return 0
}

# ---------------------------------------------------------------- main
ensure_tools

if [[ $DO_BUILD == 1 ]] && want_sys ferry; then
    log "cargo build --release -p ferry-server -p ferry-client"
    (cd "$REPO" && timeout 1800 cargo build --release -p ferry-server -p ferry-client) || log "cargo build failed; ferry will be skipped if its binaries are missing"
fi

mkdir -p "${BENCH_TMPDIR:-/tmp}"
TMP=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/ferry-bench.XXXXXX")
RAW=$TMP/raw.csv
MEM_CSV=$TMP/mem.csv
: >"$RAW"
: >"$MEM_CSV"
TREE_MIB=""
log "work dir $TMP"

make_dataset
ROOT[local]=$TMP/export
ACTIVE=()
want_sys local && ACTIVE+=(local)

PROXY_CEILING=""
if [[ -n "$DELAY_MS" ]]; then
    log "measuring the delay proxy alone (delay 0 and ${DELAY_MS} ms, 512 MiB each way)"
    PROXY_CEILING=$(timeout 300 python3 "$HERE/proxyceiling.py" 0 512 | tr '\n' ' ' || true)
    if [[ $DELAY_MS != 0 ]]; then
        PROXY_CEILING="delay 0: $PROXY_CEILING; delay $DELAY_MS: $(timeout 300 python3 "$HERE/proxyceiling.py" "$DELAY_MS" 512 | tr '\n' ' ' || true)"
    fi
    log "proxy: $PROXY_CEILING"
fi

if want_sys sshfs; then
    start_sshd
    SSH_MOUNT_PORT=$SSH_PORT
    if [[ -n "$DELAY_MS" ]]; then
        start_proxy "$SSH_PORT"
        SSH_MOUNT_PORT=$PROXY_PORT
        log "sshd reached through delay proxy on port $SSH_MOUNT_PORT (+${DELAY_MS} ms each way)"
    fi
    SSHFS_OPTS="sshfs -p $SSH_MOUNT_PORT -o $(ssh_opts) root@127.0.0.1:EXPORT MP (sshfs defaults otherwise)"
    SSH_CIPHER=$(timeout 30 ssh -v -p "$SSH_PORT" -i "$SSH_DIR/client_ed25519" -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -o BatchMode=yes root@127.0.0.1 true 2>&1 \
        | sed -n 's/.*kex: client->server cipher: \([^ ]*\) MAC: \([^ ]*\).*/\1 (MAC \2)/p' | head -n1 || true)
    MP[sshfs]=$TMP/mnt-sshfs
    ROOT[sshfs]=$TMP/mnt-sshfs
    mkdir -p "${MP[sshfs]}"
    if mount_sys sshfs; then ACTIVE+=(sshfs); else die "sshfs mount failed; see above"; fi
fi

if want_sys ferry; then
    if ferry_available && start_ferryd; then
        FERRY_ADDR=$FERRYD_ADDR
        if [[ -n "$DELAY_MS" ]]; then
            start_proxy "${FERRYD_ADDR##*:}"
            FERRY_ADDR=127.0.0.1:$PROXY_PORT
            log "ferryd reached through delay proxy on $FERRY_ADDR (+${DELAY_MS} ms each way)"
        fi
        MP[ferry]=$TMP/mnt-ferry
        ROOT[ferry]=$TMP/mnt-ferry
        mkdir -p "${MP[ferry]}"
        if mount_sys ferry; then
            ACTIVE+=(ferry)
        else
            FERRY_SKIP_REASON="ferry mount failed: $(tail -c 400 "$TMP/mount-ferry.err" | tr '\n' ' ')"
        fi
    fi
    if [[ -n "$FERRY_SKIP_REASON" ]]; then log "SKIPPING ferry: $FERRY_SKIP_REASON"; fi
fi
[[ ${#ACTIVE[@]} -gt 0 ]] || die "no system to benchmark"
for sys in "${ACTIVE[@]}"; do mkdir -p "$TMP/export/w/$sys"; done
log "systems: ${ACTIVE[*]}; sizes: big ${BIG_MIB} MiB, dir ${DIR_ENTRIES}, tree ${TREE_FILES} files (${TREE_MIB} MiB), ${RAND_READS} random reads; ${REPS} run(s)"

START_NS=$(date +%s%N)
want_group seqread && phase_seqread
want_group seqwrite && phase_seqwrite
want_group randread && phase_randread
want_group ls && phase_ls
want_group tree && phase_tree
want_group mem && phase_mem
TOTAL_S=$(secs_since "$START_NS")

# ---------------------------------------------------------------- report
if [[ $QUICK == 1 ]]; then LABEL=quick; else LABEL=full; fi
[[ -z "$DELAY_MS" ]] || LABEL=$LABEL-delay${DELAY_MS}ms
LABEL=$LABEL${RESULTS_SUFFIX:-}
META=$TMP/meta.tsv
ferry_rev=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)
{
    printf 'title\tferry benchmark (%s)\n' "$LABEL"
    printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf 'command\tbench/run.sh %s\n' "${ORIG_ARGS:-}"
    printf 'machine\t%s cores (%s), %s GiB RAM, kernel %s, %s\n' "$(nproc)" \
        "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)" \
        "$(awk '/MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)" "$(uname -r)" \
        "$(. /etc/os-release && echo "$PRETTY_NAME")"
    printf 'export\tlocal directory %s on %s (%s)\n' "$TMP/export" \
        "$(df --output=source "$TMP" | tail -n1)" "$(df --output=fstype "$TMP" | tail -n1 | tr -d ' ')"
    printf 'sizes\tbig file %s MiB (random data), dir %s entries, tree %s files of 0-%s KiB (%s MiB) in %s-file dirs, %s random 4 KiB reads; %s run(s) per phase, median\n' \
        "$BIG_MIB" "$DIR_ENTRIES" "$TREE_FILES" "$MAX_FILE_KIB" "$TREE_MIB" "$FILES_PER_DIR" "$RAND_READS" "$REPS"
    if [[ -n "$DELAY_MS" ]]; then
        printf 'network\t127.0.0.1 through bench/delayproxy.py, +%s ms each way (RTT +%s ms) for sshfs and ferry\n' "$DELAY_MS" $((2 * DELAY_MS))
        printf 'proxy ceiling\t%s\n' "$PROXY_CEILING"
    else
        printf 'network\t127.0.0.1 direct (no proxy)\n'
    fi
    want_sys sshfs && printf 'sshfs\t%s; %s; ssh cipher %s\n' "$SSHFS_OPTS" "$(sshfs --version 2>&1 | grep -i '^sshfs' | head -n1)" "${SSH_CIPHER:-?}"
    if want_sys ferry; then
        if [[ -n "$FERRY_SKIP_REASON" ]]; then
            printf 'ferry\tSKIPPED: %s\n' "$FERRY_SKIP_REASON"
        else
            printf 'ferry\t%s mount %s %s MP (ferry defaults otherwise); binaries from %s built %s; %s\n' "$FERRY_BIN_DIR/ferry" \
                "${FERRY_MOUNT_OPTS[*]/#$TMP/TMP}" "$FERRY_ADDR" "$FERRY_BIN_DIR" "$FERRY_BUILT" "${FERRY_LABEL:-repo HEAD at run time $ferry_rev}"
        fi
    fi
    for f in "$TMP/ferryd.err" "$TMP/mount-ferry.err" "$TMP/umount-ferry.err"; do
        n=$(grep -ciE 'warn|error|panic' "$f" 2>/dev/null || true)
        if [[ ${n:-0} -gt 0 ]]; then
            printf '%s\t%s warning/error lines, last: %s\n' "$(basename "$f")" "$n" \
                "$(grep -iE 'warn|error|panic' "$f" | tail -n1 | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300)"
        fi
    done
    for sys in "${!BROKEN[@]}"; do printf 'problem\t%s stopped being measured: %s\n' "$sys" "${BROKEN[$sys]}"; done
    printf '_big_mib\t%s\n_tree_files\t%s\n_dir_entries\t%s\n_rand_reads\t%s\n_tree_mib\t%s\n' \
        "$BIG_MIB" "$TREE_FILES" "$DIR_ENTRIES" "$RAND_READS" "$TREE_MIB"
    printf 'cold means\tlocal: sync + drop_caches; sshfs/ferry: fresh mount (unmount + mount; ferry disk cache emptied) + sync + drop_caches. ferryd keeps running (its in-memory listings stay; ls_cold_fresh restarts it). warm: same mount, read once before the timed runs\n'
    printf 'total benchmark time\t%s s\n' "$TOTAL_S"
} >"$META"

mkdir -p "$HERE/results"
python3 "$HERE/summarize.py" "$RAW" "$META" "$MEM_CSV" "$HERE/results/$LABEL.md" "$HERE/results/$LABEL.csv"
cp "$RAW" "$HERE/results/$LABEL-raw.csv"
cp "$MEM_CSV" "$HERE/results/$LABEL-mem.csv"
for ext in md csv; do cp "$HERE/results/$LABEL.$ext" "$HERE/results/LATEST.$ext"; done
cp "$RAW" "$HERE/results/LATEST-raw.csv"
cp "$MEM_CSV" "$HERE/results/LATEST-mem.csv"
for f in "$TMP/ferryd.err" "$TMP/mount-ferry.err" "$TMP/umount-ferry.err" "$TMP/mount-sshfs.err"; do
    if grep -qiE 'warn|error|panic' "$f" 2>/dev/null; then
        log "$(basename "$f"): last warning/error lines:"
        grep -iE 'warn|error|panic' "$f" | tail -n 5 >&2
    fi
done
log "wrote bench/results/LATEST.md (also $LABEL.md, .csv, -raw.csv, -mem.csv)"
