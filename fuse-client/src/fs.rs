//! The filesystem core: every FUSE operation as an async function over plain types.
//!
//! It turns kernel inode numbers and file handles into protocol requests, keeps the inode
//! table in step with what the server did, and returns `Attr`s or an [`FsError`]. It knows
//! nothing of fuser (the adapter in `fuse.rs` does the replying), so it can be driven from
//! tests or other front ends. It must never block a thread: everything waits on the
//! network through `Client`, on the tokio runtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_common::proto::{
    Attr, Caller, DirEntry, FileKind, MAX_DIR_BATCH, MAX_IO, Name, RelPath, Request, Response,
    SetAttr, StatFs,
};

use crate::conn::Client;
use crate::error::{FsError, FsResult, TransportError};
use crate::nodes::{Nodes, ROOT};

/// An open file: the server handle and the connection it belongs to.
#[derive(Debug, Clone, Copy)]
struct OpenFile {
    ino: u64,
    handle: u64,
    generation: u64,
}

/// An open directory: the entries fetched so far, in the order the server gave them.
#[derive(Debug)]
pub struct DirStream {
    ino: u64,
    parent: u64,
    handle: u64,
    generation: u64,
    entries: Vec<DirEntry>,
    eof: bool,
}

/// One directory entry as the adapter replies it: `offset` is the cookie of the next one.
#[derive(Debug, Clone)]
pub struct ListedEntry {
    pub ino: u64,
    pub offset: u64,
    pub name: Vec<u8>,
    pub kind: FileKind,
    /// `None` for `.` and `..` (no lookup reference is taken for them).
    pub attr: Option<Attr>,
}

pub struct Core {
    pub client: Arc<Client>,
    // std Mutexes: each is held for a map operation only, never across an await.
    nodes: Mutex<Nodes>,
    files: Mutex<HashMap<u64, OpenFile>>,
    dirs: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<DirStream>>>>,
    next_fh: AtomicU64,
    /// Largest read/write payload per request, from the handshake.
    pub max_io: u32,
}

fn errno<T>(e: i32) -> FsResult<T> {
    Err(FsError::Errno(e))
}

fn name_of(name: &[u8]) -> FsResult<Name> {
    Name::new(name.to_vec()).map_err(|e| FsError::Errno(e.errno()))
}

impl Core {
    pub fn new(client: Arc<Client>, root: &Attr, max_io: u32) -> Self {
        Core {
            client,
            nodes: Mutex::new(Nodes::new(root.ino)),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            max_io: max_io.clamp(64 * 1024, MAX_IO),
        }
    }

    fn nodes(&self) -> FsResult<std::sync::MutexGuard<'_, Nodes>> {
        self.nodes.lock().map_err(|_| FsError::Errno(libc::EIO))
    }

    /// Attributes with the kernel's inode number in place of the server's.
    pub fn kernel_attr(&self, mut attr: Attr) -> Attr {
        if let Ok(n) = self.nodes.lock() {
            attr.ino = n.to_kernel(attr.ino);
        }
        attr
    }

    pub fn path(&self, ino: u64) -> FsResult<RelPath> {
        self.nodes()?.path(ino)
    }

    fn child(&self, parent: u64, name: &[u8]) -> FsResult<(RelPath, Name)> {
        let name = name_of(name)?;
        Ok((self.path(parent)?, name))
    }

    async fn rpc(&self, caller: Caller, req: Request) -> FsResult<Response> {
        match self.client.call(caller, req).await? {
            Ok(r) => Ok(r),
            Err(e) => errno(e),
        }
    }

    async fn rpc_on(&self, generation: u64, caller: Caller, req: Request) -> FsResult<Response> {
        match self.client.call_on(Some(generation), caller, req).await? {
            Ok(r) => Ok(r),
            Err(e) => errno(e),
        }
    }

    fn expect_attr(r: Response) -> FsResult<Attr> {
        match r {
            Response::Attr(a) => Ok(a),
            _ => Err(TransportError::Protocol.into()),
        }
    }

    /// Record that the kernel got an entry for `parent/name` and return kernel attrs.
    fn entry(&self, parent: u64, name: &[u8], attr: Attr) -> FsResult<Attr> {
        let attr = self.kernel_attr(attr);
        self.nodes()?.remember(parent, name, attr.ino);
        Ok(attr)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.forget(ino, n);
        }
    }

    pub async fn lookup(&self, caller: Caller, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let (parent_path, n) = self.child(parent, name)?;
        let attr = Self::expect_attr(
            self.rpc(
                caller,
                Request::Lookup {
                    parent: parent_path,
                    name: n,
                },
            )
            .await?,
        )?;
        self.entry(parent, name, attr)
    }

    fn open_file(&self, fh: u64) -> FsResult<OpenFile> {
        self.files
            .lock()
            .map_err(|_| FsError::Errno(libc::EIO))?
            .get(&fh)
            .copied()
            .ok_or(FsError::Errno(libc::EBADF))
    }

    /// Any open handle on `ino` (lets an unlinked-but-open file keep answering getattr).
    fn any_handle(&self, ino: u64) -> Option<OpenFile> {
        self.files
            .lock()
            .ok()?
            .values()
            .find(|f| f.ino == ino)
            .copied()
    }

    pub async fn getattr(&self, caller: Caller, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        let open = match fh {
            Some(fh) => self.open_file(fh).ok(),
            None => None,
        };
        let path = self.path(ino);
        let open = match (&path, open) {
            (_, Some(o)) => Some(o),
            (Err(_), None) => self.any_handle(ino),
            (Ok(_), None) => None,
        };
        let attr = match open {
            Some(o) => {
                let req = Request::GetAttr {
                    path: RelPath::root(),
                    handle: Some(o.handle),
                };
                Self::expect_attr(self.rpc_on(o.generation, caller, req).await?)?
            }
            None => {
                let req = Request::GetAttr {
                    path: path?,
                    handle: None,
                };
                Self::expect_attr(self.rpc(caller, req).await?)?
            }
        };
        let attr = self.kernel_attr(attr);
        if attr.ino != ino {
            // The name now refers to another file (replaced behind our back).
            return errno(libc::ESTALE);
        }
        Ok(attr)
    }

    pub async fn setattr(
        &self,
        caller: Caller,
        ino: u64,
        fh: Option<u64>,
        set: SetAttr,
    ) -> FsResult<Attr> {
        let open = match fh {
            Some(fh) => self.open_file(fh).ok(),
            None => None,
        };
        let path = match self.path(ino) {
            Ok(p) => p,
            // Unlinked but open: the handle is all there is (ftruncate still works).
            Err(e) if open.is_none() => return Err(e),
            Err(_) => RelPath::root(),
        };
        let attr = match open {
            Some(o) => {
                let req = Request::SetAttr {
                    path,
                    handle: Some(o.handle),
                    set,
                };
                Self::expect_attr(self.rpc_on(o.generation, caller, req).await?)?
            }
            None => Self::expect_attr(
                self.rpc(
                    caller,
                    Request::SetAttr {
                        path,
                        handle: None,
                        set,
                    },
                )
                .await?,
            )?,
        };
        Ok(self.kernel_attr(attr))
    }

    pub async fn readlink(&self, caller: Caller, ino: u64) -> FsResult<Vec<u8>> {
        match self
            .rpc(
                caller,
                Request::ReadLink {
                    path: self.path(ino)?,
                },
            )
            .await?
        {
            Response::Data(d) => Ok(d),
            _ => Err(TransportError::Protocol.into()),
        }
    }

    pub async fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<Attr> {
        let (p, n) = self.child(parent, name)?;
        let a = Self::expect_attr(
            self.rpc(
                caller,
                Request::MkNod {
                    parent: p,
                    name: n,
                    mode,
                    umask,
                    rdev,
                },
            )
            .await?,
        )?;
        self.entry(parent, name, a)
    }

    pub async fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> FsResult<Attr> {
        let (p, n) = self.child(parent, name)?;
        let a = Self::expect_attr(
            self.rpc(
                caller,
                Request::MkDir {
                    parent: p,
                    name: n,
                    mode,
                    umask,
                },
            )
            .await?,
        )?;
        self.entry(parent, name, a)
    }

    pub async fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<Attr> {
        let (p, n) = self.child(parent, name)?;
        let req = Request::Symlink {
            parent: p,
            name: n,
            target: target.to_vec(),
        };
        let a = Self::expect_attr(self.rpc(caller, req).await?)?;
        self.entry(parent, name, a)
    }

    pub async fn link(
        &self,
        caller: Caller,
        ino: u64,
        new_parent: u64,
        new_name: &[u8],
    ) -> FsResult<Attr> {
        let path = self.path(ino)?;
        let (np, nn) = self.child(new_parent, new_name)?;
        let a = Self::expect_attr(
            self.rpc(
                caller,
                Request::Link {
                    path,
                    new_parent: np,
                    new_name: nn,
                },
            )
            .await?,
        )?;
        self.entry(new_parent, new_name, a)
    }

    pub async fn unlink(&self, caller: Caller, parent: u64, name: &[u8]) -> FsResult<()> {
        let (p, n) = self.child(parent, name)?;
        self.rpc(caller, Request::Unlink { parent: p, name: n })
            .await?;
        self.nodes()?.unlinked(parent, name);
        Ok(())
    }

    pub async fn rmdir(&self, caller: Caller, parent: u64, name: &[u8]) -> FsResult<()> {
        let (p, n) = self.child(parent, name)?;
        self.rpc(caller, Request::RmDir { parent: p, name: n })
            .await?;
        self.nodes()?.unlinked(parent, name);
        Ok(())
    }

    pub async fn rename(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        let (p, n) = self.child(parent, name)?;
        let (np, nn) = self.child(new_parent, new_name)?;
        let req = Request::Rename {
            parent: p,
            name: n,
            new_parent: np,
            new_name: nn,
            flags,
        };
        self.rpc(caller, req).await?;
        let exchange = flags & ferry_common::proto::rename_flags::EXCHANGE != 0;
        self.nodes()?
            .renamed(parent, name, new_parent, new_name, exchange);
        Ok(())
    }

    fn add_file(&self, ino: u64, handle: u64, generation: u64) -> FsResult<u64> {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files
            .lock()
            .map_err(|_| FsError::Errno(libc::EIO))?
            .insert(
                fh,
                OpenFile {
                    ino,
                    handle,
                    generation,
                },
            );
        Ok(fh)
    }

    /// Open `ino`; returns the kernel file handle and fresh attributes.
    pub async fn open(&self, caller: Caller, ino: u64, flags: i32) -> FsResult<(u64, Attr)> {
        let path = self.path(ino)?;
        let generation = self.client.connect().await?;
        match self
            .rpc_on(generation, caller, Request::Open { path, flags })
            .await?
        {
            Response::Opened { handle, attr } => {
                let attr = self.kernel_attr(attr);
                Ok((self.add_file(ino, handle, generation)?, attr))
            }
            _ => Err(TransportError::Protocol.into()),
        }
    }

    pub async fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> FsResult<(u64, Attr)> {
        let (p, n) = self.child(parent, name)?;
        let generation = self.client.connect().await?;
        let req = Request::Create {
            parent: p,
            name: n,
            mode,
            umask,
            flags,
        };
        match self.rpc_on(generation, caller, req).await? {
            Response::Opened { handle, attr } => {
                let attr = self.entry(parent, name, attr)?;
                Ok((self.add_file(attr.ino, handle, generation)?, attr))
            }
            _ => Err(TransportError::Protocol.into()),
        }
    }

    pub async fn read(&self, caller: Caller, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let f = self.open_file(fh)?;
        let mut out = Vec::new();
        let mut off = offset;
        let mut left = size;
        // The kernel asks for at most max_read; split only if the server's cap is lower.
        while left > 0 {
            let len = left.min(self.max_io);
            let req = Request::Read {
                handle: f.handle,
                offset: off,
                len,
            };
            let data = match self.rpc_on(f.generation, caller, req).await? {
                Response::Data(d) => d,
                _ => return Err(TransportError::Protocol.into()),
            };
            let got = data.len() as u32;
            if out.is_empty() {
                out = data;
            } else {
                out.extend_from_slice(&data);
            }
            if got < len {
                break;
            }
            left -= got;
            off += u64::from(got);
        }
        Ok(out)
    }

    pub async fn write(
        &self,
        caller: Caller,
        fh: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> FsResult<u32> {
        let f = self.open_file(fh)?;
        if data.len() <= self.max_io as usize {
            let req = Request::Write {
                handle: f.handle,
                offset,
                data,
            };
            return match self.rpc_on(f.generation, caller, req).await? {
                Response::Written { len } => Ok(len),
                _ => Err(TransportError::Protocol.into()),
            };
        }
        let mut done = 0u32;
        for chunk in data.chunks(self.max_io as usize) {
            let req = Request::Write {
                handle: f.handle,
                offset: offset + u64::from(done),
                data: chunk.to_vec(),
            };
            match self.rpc_on(f.generation, caller, req).await? {
                Response::Written { len } => done += len,
                _ => return Err(TransportError::Protocol.into()),
            }
        }
        Ok(done)
    }

    pub async fn fsync(&self, caller: Caller, fh: u64, datasync: bool) -> FsResult<()> {
        let f = self.open_file(fh)?;
        self.rpc_on(
            f.generation,
            caller,
            Request::Fsync {
                handle: f.handle,
                datasync,
            },
        )
        .await?;
        Ok(())
    }

    pub async fn fallocate(
        &self,
        caller: Caller,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> FsResult<()> {
        let f = self.open_file(fh)?;
        self.rpc_on(
            f.generation,
            caller,
            Request::Fallocate {
                handle: f.handle,
                offset,
                len,
                mode,
            },
        )
        .await?;
        Ok(())
    }

    pub async fn release(&self, caller: Caller, fh: u64) -> FsResult<()> {
        let f = self
            .files
            .lock()
            .map_err(|_| FsError::Errno(libc::EIO))?
            .remove(&fh)
            .ok_or(FsError::Errno(libc::EBADF))?;
        match self
            .rpc_on(f.generation, caller, Request::Release { handle: f.handle })
            .await
        {
            // The connection that held the handle is gone, and the server dropped it.
            Err(FsError::Transport(TransportError::StaleHandle)) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    pub async fn statfs(&self, caller: Caller, ino: u64) -> FsResult<StatFs> {
        let path = self.path(ino).unwrap_or_default();
        match self.rpc(caller, Request::StatFs { path }).await? {
            Response::StatFs(s) => Ok(s),
            _ => Err(TransportError::Protocol.into()),
        }
    }

    pub async fn opendir(&self, caller: Caller, ino: u64) -> FsResult<u64> {
        let path = self.path(ino)?;
        // `..` only needs a plausible inode number; the kernel resolves `..` itself.
        let parent = self.nodes()?.parent_of(ino).unwrap_or(ROOT);
        let generation = self.client.connect().await?;
        let handle = match self
            .rpc_on(generation, caller, Request::OpenDir { path })
            .await?
        {
            Response::Opened { handle, .. } => handle,
            _ => return Err(TransportError::Protocol.into()),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let stream = DirStream {
            ino,
            parent,
            handle,
            generation,
            entries: Vec::new(),
            eof: false,
        };
        self.dirs
            .lock()
            .map_err(|_| FsError::Errno(libc::EIO))?
            .insert(fh, Arc::new(tokio::sync::Mutex::new(stream)));
        Ok(fh)
    }

    /// Entries from cookie `offset` on, fetching more from the server as needed. With
    /// `plus`, each returned real entry is remembered by the caller via [`Core::listed`].
    pub async fn readdir(
        &self,
        caller: Caller,
        fh: u64,
        offset: u64,
        want: usize,
    ) -> FsResult<Vec<ListedEntry>> {
        let stream = self
            .dirs
            .lock()
            .map_err(|_| FsError::Errno(libc::EIO))?
            .get(&fh)
            .cloned()
            .ok_or(FsError::Errno(libc::EBADF))?;
        let mut s = stream.lock().await;
        // Cookies: 1 is after `.`, 2 after `..`, 2 + i + 1 after entry i.
        let first_real = offset.saturating_sub(2) as usize;
        while !s.eof && s.entries.len() < first_real + want {
            let req = Request::ReadDir {
                handle: s.handle,
                max_entries: MAX_DIR_BATCH,
            };
            match self.rpc_on(s.generation, caller, req).await? {
                Response::Dir { entries, eof } => {
                    s.eof = eof || entries.is_empty();
                    s.entries.extend(entries);
                }
                _ => return Err(TransportError::Protocol.into()),
            }
        }
        let mut out = Vec::with_capacity(want);
        if offset == 0 {
            out.push(ListedEntry {
                ino: s.ino,
                offset: 1,
                name: b".".to_vec(),
                kind: FileKind::Dir,
                attr: None,
            });
        }
        if offset <= 1 {
            out.push(ListedEntry {
                ino: s.parent,
                offset: 2,
                name: b"..".to_vec(),
                kind: FileKind::Dir,
                attr: None,
            });
        }
        for (i, e) in s.entries.iter().enumerate().skip(first_real) {
            if out.len() >= want {
                break;
            }
            let attr = self.kernel_attr(e.attr);
            out.push(ListedEntry {
                ino: attr.ino,
                offset: 2 + i as u64 + 1,
                name: e.name.0.clone(),
                kind: attr.kind,
                attr: Some(attr),
            });
        }
        Ok(out)
    }

    /// The kernel accepted a readdirplus entry: it now holds a reference to it.
    pub fn listed(&self, dir: u64, name: &[u8], ino: u64) {
        if let Ok(mut n) = self.nodes.lock() {
            n.remember(dir, name, ino);
        }
    }

    pub async fn releasedir(&self, caller: Caller, fh: u64) -> FsResult<()> {
        let stream = self
            .dirs
            .lock()
            .map_err(|_| FsError::Errno(libc::EIO))?
            .remove(&fh);
        if let Some(stream) = stream {
            let s = stream.lock().await;
            let _ = self
                .rpc_on(
                    s.generation,
                    caller,
                    Request::ReleaseDir { handle: s.handle },
                )
                .await;
        }
        Ok(())
    }
}
