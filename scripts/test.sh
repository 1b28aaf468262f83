#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need (fuse3 for
# fusermount3, git for the git-in-the-mount test), builds the binaries the integration
# tests start (ferryd, ferry), then runs every crate's tests. Extra arguments go to
# `cargo test` (e.g. `scripts/test.sh -- --test-threads=1`).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v git >/dev/null 2>&1 || need+=(git)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    else
        echo "warning: not root; some tests may be skipped (missing ${need[*]})" >&2
    fi
fi
if [ ! -e /dev/fuse ]; then
    modprobe fuse 2>/dev/null || echo "warning: /dev/fuse missing: mount tests will be skipped" >&2
fi
# Mounts without root go through fusermount3, which opens /dev/fuse as the user: the
# distributions' udev rule makes it 0666; a container's devtmpfs leaves it 0600.
if [ -e /dev/fuse ] && [ "$(id -u)" = 0 ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
    echo "chmod 0666 /dev/fuse (as udev sets it) for the tests of mounts without root"
    chmod 0666 /dev/fuse
fi

cargo build --workspace --bins
cargo test --workspace "$@"
