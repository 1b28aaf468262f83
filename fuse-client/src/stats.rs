//! `ferry stats MOUNTPOINT`: the mount daemon answers on a Unix socket named after its
//! mountpoint with a JSON object of counters (requests by kind, bytes, cache hits and
//! misses, cache size, events received). The socket lives in `$XDG_RUNTIME_DIR/ferry` or
//! `/tmp/ferry-<uid>`, readable by the mount's owner only.
//!
//! Never blocks the filesystem: counters are atomics read without locks held for long.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use tokio::io::AsyncWriteExt;

use crate::fs::Core;

fn socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("ferry"),
        // SAFETY: getuid cannot fail.
        _ => PathBuf::from(format!("/tmp/ferry-{}", unsafe { libc::getuid() })),
    }
}

/// The socket of the daemon serving `mountpoint` (an absolute, canonical path).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    mountpoint.hash(&mut h);
    socket_dir().join(format!("{:016x}.sock", h.finish()))
}

/// The socket a daemon bound: removed by it only while the file at the path is still
/// this one (the next mount at the same path binds its own there, and an old daemon
/// finishing late must not take that away).
pub struct Socket {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl Socket {
    pub fn remove(&self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Device and inode of the file at `p` itself.
fn file_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Serve counters on the socket until the runtime stops.
pub fn serve(core: Arc<Core>, mountpoint: &Path) -> Result<Socket> {
    let dir = socket_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    let path = socket_path(mountpoint);
    let _ = std::fs::remove_file(&path);
    let sweep = dir.clone();
    let _ = std::thread::Builder::new()
        .name("stats-sweep".into())
        .spawn(move || remove_dead_sockets(&sweep));
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    let socket = Socket {
        id: file_id(&path),
        path,
    };
    let mp = mountpoint.display().to_string();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut map: BTreeMap<String, serde_json::Value> = BTreeMap::new();
            map.insert("mountpoint".into(), mp.clone().into());
            map.insert("remote".into(), core.client.addr().to_string().into());
            map.insert("events_live".into(), core.client.events_live().into());
            for (k, v) in core.stats_snapshot() {
                map.insert(k, v.into());
            }
            let body = serde_json::to_vec_pretty(&map).unwrap_or_default();
            let _ = sock.write_all(&body).await;
            let _ = sock.shutdown().await;
        }
    });
    Ok(socket)
}

/// Removes the sockets in `dir` of daemons that died without removing their own (killed,
/// crashed): nobody listens there any more. A socket just bound and not yet listening
/// refuses too, for microseconds, so a refusal counts only when it holds a moment later,
/// and only for the same file (a daemon may have bound a new one there meanwhile).
fn remove_dead_sockets(dir: &Path) {
    let refused = |p: &Path| {
        std::os::unix::net::UnixStream::connect(p)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let dead: Vec<(PathBuf, (u64, u64))> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock") && refused(p))
        .filter_map(|p| file_id(&p).map(|id| (p, id)))
        .collect();
    if dead.is_empty() {
        return;
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    for (p, _) in dead
        .iter()
        .filter(|(p, id)| refused(p) && file_id(p) == Some(*id))
    {
        tracing::debug!(socket = %p.display(), "removing the stats socket of a dead daemon");
        let _ = std::fs::remove_file(p);
    }
}

/// Ask the daemon of `mountpoint` for its counters.
pub fn query(mountpoint: &Path) -> Result<BTreeMap<String, serde_json::Value>> {
    let abs =
        std::fs::canonicalize(mountpoint).map_err(|e| anyhow!("{}: {e}", mountpoint.display()))?;
    let path = socket_path(&abs);
    let mut sock = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        anyhow!(
            "{} is not a ferry mount of this user ({}: {e})",
            abs.display(),
            path.display()
        )
    })?;
    let mut body = Vec::new();
    sock.read_to_end(&mut body)?;
    serde_json::from_slice(&body).context("malformed stats from the mount daemon")
}
