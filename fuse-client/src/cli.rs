//! The seed program's commands without FUSE: `ls` (the seed's `dir`), `get`, `put`, and
//! an interactive `shell`. Transfers keep several requests in flight so a high-latency
//! link is not crossed once per chunk. `put` uploads to a temporary name and renames it
//! over the target only after the server has the whole file (fsync), so a failed upload
//! never leaves a truncated target behind; `get` does the same locally.
//!
//! Nothing here may print to stdout except the command's own output.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use ferry_common::proto::{
    Attr, Caller, FileKind, MAX_DIR_BATCH, MAX_IO, Name, RelPath, Request, Response,
};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::conn::Client;
use crate::error::{FsError, errno_text};

/// Requests in flight during a transfer.
const WINDOW: usize = 8;
/// Files up to this size come back whole with the open reply.
const INLINE_MAX: u32 = 1024 * 1024;

fn caller() -> Caller {
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    unsafe {
        Caller {
            uid: libc::getuid(),
            gid: libc::getgid(),
        }
    }
}

async fn rpc(client: &Arc<Client>, req: Request) -> Result<Response, FsError> {
    match client.call(caller(), req).await? {
        Ok(r) => Ok(r),
        Err(e) => Err(FsError::Errno(e)),
    }
}

async fn rpc_ctx(client: &Arc<Client>, req: Request, what: &str) -> Result<Response> {
    rpc(client, req).await.map_err(|e| anyhow!("{what}: {e}"))
}

fn user_path(p: &str) -> Result<RelPath> {
    RelPath::parse_user(p).map_err(|e| anyhow!("invalid remote path {p:?}: {e}"))
}

/// Follow symlinks at the end of `path` the way a local `cat` would, staying inside the
/// export: a target that is absolute or climbs above the export root is refused (the
/// server never follows a final symlink itself).
async fn resolve_links(client: &Arc<Client>, path: RelPath) -> Result<(RelPath, Attr)> {
    let mut path = path;
    for _ in 0..40 {
        let attr = getattr(client, &path).await?;
        if attr.kind != FileKind::Symlink {
            return Ok((path, attr));
        }
        let target = match rpc_ctx(
            client,
            Request::ReadLink { path: path.clone() },
            &format!("{path:?}"),
        )
        .await?
        {
            Response::Data(d) => d,
            _ => bail!("unexpected reply from server"),
        };
        if target.first() == Some(&b'/') {
            bail!(
                "{path:?}: absolute symlink target {:?} is outside the export",
                String::from_utf8_lossy(&target)
            );
        }
        let mut comps: Vec<Vec<u8>> = match path.split_last() {
            Some((parent, _)) if !parent.is_root() => {
                parent.0.split(|&b| b == b'/').map(<[u8]>::to_vec).collect()
            }
            _ => Vec::new(),
        };
        for c in target.split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => {
                    if comps.pop().is_none() {
                        bail!("{path:?}: symlink target leads outside the export");
                    }
                }
                c => comps.push(c.to_vec()),
            }
        }
        path = RelPath(comps.join(&b'/'));
        ferry_common::path::check_path(&path.0).map_err(|e| anyhow!("{path:?}: {e}"))?;
    }
    bail!("{path:?}: {}", errno_text(libc::ELOOP))
}

async fn getattr(client: &Arc<Client>, path: &RelPath) -> Result<Attr> {
    match rpc_ctx(
        client,
        Request::GetAttr {
            path: path.clone(),
            handle: None,
        },
        &format!("{path:?}"),
    )
    .await?
    {
        Response::Attr(a) => Ok(a),
        _ => bail!("unexpected reply from server"),
    }
}

fn mode_string(a: &Attr) -> String {
    let t = match a.kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        FileKind::Fifo => 'p',
        FileKind::Socket => 's',
        FileKind::CharDevice => 'c',
        FileKind::BlockDevice => 'b',
        FileKind::File => '-',
    };
    let mut s = String::from(t);
    for shift in [6, 3, 0] {
        let bits = (a.perm >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// List a remote directory (or show one file), one line per entry, sorted by name.
pub async fn ls(client: &Arc<Client>, path: &str, out: &mut impl Write) -> Result<()> {
    let (path, attr) = resolve_links(client, user_path(path)?).await?;
    if attr.kind != FileKind::Dir {
        let name = path.split_last().map(|(_, n)| n.0).unwrap_or_default();
        writeln!(
            out,
            "{} {:>12} {}",
            mode_string(&attr),
            attr.size,
            String::from_utf8_lossy(&name)
        )?;
        return Ok(());
    }
    let generation = client.connect().await?;
    let req = Request::ListDir {
        path: path.clone(),
        max_entries: MAX_DIR_BATCH,
        speculative: false,
    };
    let (handle, mut entries, mut eof) =
        match client.call_on(Some(generation), caller(), req).await? {
            Ok(Response::Listing {
                handle,
                entries,
                eof,
                ..
            }) => (handle, entries, eof),
            Ok(_) => bail!("unexpected reply from server"),
            Err(e) => bail!("{path:?}: {}", errno_text(e)),
        };
    while !eof {
        let req = Request::ReadDir {
            handle,
            max_entries: MAX_DIR_BATCH,
        };
        match client.call_on(Some(generation), caller(), req).await? {
            Ok(Response::Dir {
                entries: batch,
                eof: done,
            }) => {
                eof = done || batch.is_empty();
                entries.extend(batch);
            }
            Ok(_) => bail!("unexpected reply from server"),
            Err(e) => bail!("{path:?}: {}", errno_text(e)),
        }
    }
    if handle != 0 {
        let _ = client
            .call_on(Some(generation), caller(), Request::ReleaseDir { handle })
            .await;
    }
    entries.sort_by(|a, b| a.name.0.cmp(&b.name.0));
    for e in entries {
        let suffix = if e.attr.kind == FileKind::Dir {
            "/"
        } else {
            ""
        };
        writeln!(
            out,
            "{} {:>12} {}{}",
            mode_string(&e.attr),
            e.attr.size,
            String::from_utf8_lossy(&e.name.0),
            suffix
        )?;
    }
    Ok(())
}

fn local_target(remote: &RelPath, local: Option<&Path>) -> Result<PathBuf> {
    let base = remote
        .split_last()
        .map(|(_, n)| PathBuf::from(String::from_utf8_lossy(&n.0).into_owned()))
        .ok_or_else(|| anyhow!("cannot get the export root; name a file"))?;
    Ok(match local {
        None => base,
        Some(p) if p.is_dir() => p.join(base),
        Some(p) => p.to_path_buf(),
    })
}

/// Download `remote` to `local` (default: its base name in the current directory).
/// Returns the local path and the number of bytes.
pub async fn get(
    client: &Arc<Client>,
    remote: &str,
    local: Option<&Path>,
) -> Result<(PathBuf, u64)> {
    let named = user_path(remote)?;
    let target = local_target(&named, local)?;
    let (path, _) = resolve_links(client, named).await?;
    let generation = client.connect().await?;
    let open = Request::Open {
        path: path.clone(),
        flags: libc::O_RDONLY,
        inline_max: INLINE_MAX,
        staged: false,
    };
    let (handle, attr, inline) = match client.call_on(Some(generation), caller(), open).await? {
        Ok(Response::Opened { handle, attr }) => (handle, attr, None),
        Ok(Response::OpenedWithData { handle, attr, data }) => (handle, attr, Some(data)),
        Ok(_) => bail!("unexpected reply from server"),
        Err(e) => bail!("{remote}: {}", errno_text(e)),
    };
    if attr.kind == FileKind::Dir {
        let _ = client
            .call_on(Some(generation), caller(), Request::Release { handle })
            .await;
        bail!("{remote}: {}", errno_text(libc::EISDIR));
    }
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".ferry-get-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let mut file = tokio::fs::File::from_std(tmp.reopen()?);
    // Read in MAX_IO chunks, WINDOW in flight, written in order; stop at the first short read.
    let chunk = u64::from(MAX_IO);
    let mut offsets = futures::stream::iter((0u64..).map(|i| i * chunk))
        .map(|off| {
            let client = client.clone();
            async move {
                let req = Request::Read {
                    handle,
                    offset: off,
                    len: MAX_IO,
                };
                client.call_on(Some(generation), caller(), req).await
            }
        })
        .buffered(WINDOW);
    let mut total = 0u64;
    let result: Result<()> = async {
        if let Some(data) = inline {
            // Small file: it came whole with the open (one round trip).
            file.write_all(&data).await?;
            total = data.len() as u64;
            file.flush().await?;
            file.sync_all().await?;
            return Ok(());
        }
        while let Some(r) = offsets.next().await {
            let data = match r? {
                Ok(Response::Data(d)) => d,
                Ok(_) => bail!("unexpected reply from server"),
                Err(e) => bail!("{remote}: {}", errno_text(e)),
            };
            file.write_all(&data).await?;
            total += data.len() as u64;
            if (data.len() as u64) < chunk {
                break;
            }
        }
        file.flush().await?;
        file.sync_all().await?;
        Ok(())
    }
    .await;
    drop(offsets);
    let _ = client
        .call_on(Some(generation), caller(), Request::Release { handle })
        .await;
    result?;
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(u32::from(
            attr.perm,
        )))?;
    tmp.persist(&target)
        .map_err(|e| anyhow!("cannot write {}: {}", target.display(), e.error))?;
    Ok((target, total))
}

/// Upload `local` to `remote` (default: its base name in the export root). The target is
/// replaced atomically once the whole file is on the server.
pub async fn put(
    client: &Arc<Client>,
    local: &Path,
    remote: Option<&str>,
) -> Result<(RelPath, u64)> {
    let meta =
        std::fs::metadata(local).with_context(|| format!("cannot read {}", local.display()))?;
    if meta.is_dir() {
        bail!("{}: is a directory", local.display());
    }
    let base = local
        .file_name()
        .ok_or_else(|| anyhow!("{}: no file name", local.display()))?
        .to_string_lossy()
        .into_owned();
    let mut path = match remote {
        None => user_path(&base)?,
        Some(r) => user_path(r)?,
    };
    if path.is_root() {
        path = path.join(base.as_bytes());
    } else if let Ok(a) = getattr(client, &path).await
        && a.kind == FileKind::Dir
    {
        path = path.join(base.as_bytes());
    }
    let (parent, name) = path
        .split_last()
        .ok_or_else(|| anyhow!("cannot replace the export root"))?;
    let tmp_name = Name::new(format!(
        ".{}.ferry-put-{}",
        String::from_utf8_lossy(&name.0),
        std::process::id()
    ))
    .map_err(|e| anyhow!("{e}"))?;
    let generation = client.connect().await?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
    let create = Request::Create {
        parent: parent.clone(),
        name: tmp_name.clone(),
        mode,
        umask: 0,
        flags: libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
    };
    let reply = client.call_on(Some(generation), caller(), create).await?;
    let handle = match reply.as_ref().map(Response::inner) {
        Ok(Response::Opened { handle, .. }) => *handle,
        Ok(_) => bail!("unexpected reply from server"),
        Err(e) => bail!("{:?}: {}", parent.join(&tmp_name.0), errno_text(*e)),
    };
    let upload: Result<u64> = async {
        let file = std::fs::File::open(local)?;
        let file = Arc::new(file);
        let size = meta.len();
        let chunk = u64::from(MAX_IO);
        let count = size.div_ceil(chunk);
        let mut writes = futures::stream::iter(0..count)
            .map(|i| {
                let (client, file) = (client.clone(), file.clone());
                async move {
                    let off = i * chunk;
                    let len = chunk.min(size - off) as usize;
                    let data = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len];
                        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, off)
                            .map(|_| buf)
                    })
                    .await??;
                    let req = Request::Write {
                        handle,
                        offset: off,
                        data: data.into(),
                    };
                    match client.call_on(Some(generation), caller(), req).await? {
                        Ok(Response::Written { len: n }) if n as usize == len => Ok(len as u64),
                        Ok(_) => bail!("short write on the server"),
                        Err(e) => bail!("{}", errno_text(e)),
                    }
                }
            })
            .buffer_unordered(WINDOW);
        let mut total = 0;
        while let Some(r) = writes.next().await {
            total += r?;
        }
        match client
            .call_on(
                Some(generation),
                caller(),
                Request::Fsync {
                    handle,
                    datasync: false,
                },
            )
            .await?
        {
            Ok(_) => Ok(total),
            Err(e) => bail!("fsync: {}", errno_text(e)),
        }
    }
    .await;
    let _ = client
        .call_on(Some(generation), caller(), Request::Release { handle })
        .await;
    let finish = match upload {
        Ok(total) => {
            let rename = Request::Rename {
                parent: parent.clone(),
                name: tmp_name.clone(),
                new_parent: parent.clone(),
                new_name: name.clone(),
                flags: 0,
            };
            rpc_ctx(client, rename, &format!("{path:?}"))
                .await
                .map(|_| total)
        }
        Err(e) => Err(e),
    };
    if finish.is_err() {
        let _ = rpc(
            client,
            Request::Unlink {
                parent,
                name: tmp_name,
            },
        )
        .await;
    }
    finish.map(|total| (path, total)).with_context(|| {
        format!(
            "upload of {} failed; the server copy is unchanged",
            local.display()
        )
    })
}

const SHELL_HELP: &str = "commands:
  dir [PATH]          list a remote directory (also: ls)
  get NAME [LOCAL]    download a remote file
  put LOCAL [NAME]    upload a local file
  help                this text
  close               end the session (also: quit, exit, EOF)";

/// The seed program's interactive loop. Errors are printed and the loop goes on.
pub async fn shell(client: &Arc<Client>, input: impl BufRead, out: &mut impl Write) -> Result<()> {
    let interactive = unsafe { libc::isatty(0) } == 1;
    let mut lines = input.lines();
    loop {
        if interactive {
            write!(out, "ferry> ")?;
            out.flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let result: Result<()> = match words.as_slice() {
            [] => Ok(()),
            ["help"] | ["?"] => writeln!(out, "{SHELL_HELP}").map_err(Into::into),
            ["close"] | ["quit"] | ["exit"] => break,
            ["dir"] | ["ls"] => ls(client, "", out).await,
            ["dir", p] | ["ls", p] => ls(client, p, out).await,
            ["get", name] => get(client, name, None).await.and_then(|(p, n)| {
                writeln!(out, "got {name} -> {} ({n} bytes)", p.display()).map_err(Into::into)
            }),
            ["get", name, local] => {
                get(client, name, Some(Path::new(local)))
                    .await
                    .and_then(|(p, n)| {
                        writeln!(out, "got {name} -> {} ({n} bytes)", p.display())
                            .map_err(Into::into)
                    })
            }
            ["put", local] => put(client, Path::new(local), None)
                .await
                .and_then(|(p, n)| {
                    writeln!(out, "put {local} -> {p:?} ({n} bytes)").map_err(Into::into)
                }),
            ["put", local, name] => {
                put(client, Path::new(local), Some(name))
                    .await
                    .and_then(|(p, n)| {
                        writeln!(out, "put {local} -> {p:?} ({n} bytes)").map_err(Into::into)
                    })
            }
            _ => Err(anyhow!("unknown command {line:?}; type help")),
        };
        if let Err(e) = result {
            writeln!(out, "error: {e:#}")?;
        }
        out.flush()?;
    }
    Ok(())
}
