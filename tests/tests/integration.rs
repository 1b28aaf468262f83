//! ferry's integration tests: one binary, one module per area. Every test starts its own
//! `ferryd` (and, for mount tests, its own FUSE mount), so they run in parallel; the
//! harness (`ferry_tests`, in `../src`) stops all of it on drop, also on failure.
//!
//! The binaries must be built first: `cargo build --workspace` (scripts/test.sh does),
//! or point `FERRYD_BIN` / `FERRY_BIN` at them. Mount tests are skipped, with a note, only
//! where `/dev/fuse` is absent.
//!
//! - `basic`: POSIX operations through the mount, checked against the export on disk.
//! - `processes`: everyday tools (cp, mv, tar, git, find, du, ls) on the mount.
//! - `differential`: a seeded random operation sequence on the mount and on a local dir.
//! - `protocol`: raw TCP: handshake, malformed input, the server survives it.
//! - `escape`: symlinks and `..` cannot reach outside the export.
//! - `read_only`: `ferryd --read-only`.
//! - `server_killed`: a dead or frozen server makes operations fail, not hang.
//! - `lost_answers`: changes whose answer the network lost run once and succeed.
//! - `coherence`: changes behind a mount's back (server disk, another mount) show up.
//! - `close_to_open`: a close on one mount, then an open on another sees the new content.
//! - `copy`: `copy_file_range` (what `cp` uses) done by the server, staged until close.
//! - `cache`: the persistent data cache (cap, remount reuse, ranges, concurrent I/O).
//! - `stats`: `ferry stats` in text and JSON.
//! - `cli`: `ferry ls/get/put/shell/mount/umount` and their errors.
//! - `multi_user`: `--allow-other`, ownership and permission checks for another uid.
//! - `unlinks`: unlinks answered before the server confirms them, and their failures.
//! - `xattrs`: extended attributes (`--xattrs`), and the hint that answers `ls -l`.

mod basic;
mod cache;
mod cli;
mod close_to_open;
mod coherence;
mod copy;
mod differential;
mod escape;
mod lost_answers;
mod multi_user;
mod processes;
mod protocol;
mod read_only;
mod server_killed;
mod stats;
mod unlinks;
mod xattrs;
