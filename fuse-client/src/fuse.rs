//! The thin fuser adapter: every callback spawns the matching [`Core`] operation on the
//! tokio runtime and replies once when it finishes. The session thread never waits on the
//! network, so the kernel can have many requests in flight at once (reads of one file,
//! lookups in parallel, a slow upload beside an `ls`).
//!
//! This is the only module that names `fuser::Reply*`; errno values reach the kernel
//! through [`FsError::errno`] and nowhere else.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_common::proto::{Attr, Caller, FileKind, SetAttr, TimeSet, Timespec};
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::error::FsError;
use crate::fs::{
    Core, Listed, NewFile, OpenReply, TTL_WITH_EVENTS, TTL_WITHOUT_EVENTS, XattrReply,
};
use crate::passthrough::IoModes;

/// `st_blksize` reported to programs: `cp` and friends size their buffers by it.
const BLKSIZE: u32 = 1024 * 1024;

/// Largest FUSE read/write: the kernel caps requests at 256 pages here.
const MAX_REQUEST: u32 = 1024 * 1024;

pub struct FerryFuse {
    core: Arc<Core>,
    rt: tokio::runtime::Handle,
    read_only: bool,
    /// Forward extended attributes. Off: the first xattr call answers ENOSYS and the
    /// kernel stops asking, which keeps `ls -l` (two xattr probes per file, never cached
    /// by the kernel) from costing two trips through this daemon per entry.
    xattrs: bool,
    /// The I/O mode of every open file, and passthrough (see [`crate::passthrough`]).
    modes: Arc<IoModes>,
}

impl FerryFuse {
    pub fn new(
        core: Arc<Core>,
        rt: tokio::runtime::Handle,
        read_only: bool,
        xattrs: bool,
        passthrough: bool,
    ) -> Self {
        FerryFuse {
            core,
            rt,
            read_only,
            xattrs,
            modes: Arc::new(IoModes::new(passthrough)),
        }
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn err(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn time(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::new(t.sec.unsigned_abs(), 0) + Duration::new(0, t.nsec)
    }
}

fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timespec { sec, nsec }
        }
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn fuse_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.ctime),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize.max(BLKSIZE),
        flags: 0,
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(timespec(t)),
    }
}

impl FerryFuse {
    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(fut);
    }

    fn refuse_if_read_only(&self) -> Result<(), Errno> {
        if self.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }
}

fn reply_entry(reply: ReplyEntry, ttl: Duration, r: Result<Attr, FsError>) {
    match r {
        Ok(a) => reply.entry(&ttl, &fuse_attr(&a), Generation(0)),
        Err(e) => reply.error(err(&e)),
    }
}

/// How long the kernel may keep the entry a lookup answered.
fn entry_ttl(core: &Core, r: &Result<Attr, FsError>) -> Duration {
    match r {
        Ok(a) => covered_ttl(a, core.attr_ttl(a.ino)),
        Err(_) => core.ttl(),
    }
}

/// `ttl`, but no longer than without events for a directory the server could not
/// watch (`Attr::uncovered`: nothing reports its own changes).
fn covered_ttl(a: &Attr, ttl: Duration) -> Duration {
    // (A file with several names: see `events_vouch_for`.)
    if a.uncovered || !crate::fs::events_vouch_for(a) {
        ttl.min(TTL_WITHOUT_EVENTS)
    } else {
        ttl
    }
}

/// Answer a `create`: the file's attributes and handle, with the I/O mode the
/// passthrough rules give it.
fn reply_created(
    core: &Core,
    modes: &IoModes,
    flags: i32,
    r: Result<OpenReply, FsError>,
    reply: ReplyCreate,
) {
    match r {
        Ok(o) => {
            let ttl = covered_ttl(&o.attr, core.ttl());
            modes.reply_create(core, &ttl, &fuse_attr(&o.attr), &o, flags, reply)
        }
        Err(e) => reply.error(err(&e)),
    }
}

fn reply_opendir(core: &Core, reply: ReplyOpen, r: Result<(u64, bool), FsError>) {
    match r {
        Ok((fh, from_cache)) => {
            let mut flags = FopenFlags::empty();
            if core.client.events_live() {
                // The kernel may keep listings; server events invalidate them.
                flags |= FopenFlags::FOPEN_CACHE_DIR;
                if from_cache {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
            }
            reply.opened(FileHandle(fh), flags)
        }
        Err(e) => reply.error(err(&e)),
    }
}

fn reply_readdir(core: &Core, mut reply: ReplyDirectory, r: Result<Listed, FsError>) {
    match r {
        Ok(listed) => {
            let _ = core.fill_listing(&listed, false, |e| {
                reply.add(
                    INodeNo(e.ino),
                    e.offset,
                    file_type(e.kind),
                    OsStr::from_bytes(e.name),
                )
            });
            // Before the kernel can ask for more: a batch that comes meanwhile is then
            // added to the stream's entries without copying them.
            drop(listed);
            reply.ok();
        }
        Err(e) => reply.error(err(&e)),
    }
}

fn reply_readdirplus(core: &Core, mut reply: ReplyDirectoryPlus, r: Result<Listed, FsError>) {
    let listed = match r {
        Ok(listed) => listed,
        Err(e) => return reply.error(err(&e)),
    };
    let ttl = core.ttl();
    let (mut unvouched, mut short) = (0, 0);
    // Each entry accepted with attributes takes a lookup reference (`Core::listed`).
    let changed = core.fill_listing(&listed, true, |e| {
        let (ttl, attr) = match e.attr {
            Some(a) if e.vouched => (covered_ttl(a, ttl), fuse_attr(a)),
            Some(a) => (Duration::ZERO, fuse_attr(a)),
            None => (Duration::ZERO, dot_attr(e.ino)),
        };
        let full = reply.add(
            INodeNo(e.ino),
            e.offset,
            OsStr::from_bytes(e.name),
            &ttl,
            &attr,
            Generation(0),
        );
        match e.attr {
            Some(_) if full => {}
            Some(_) if !e.vouched => unvouched += 1,
            Some(_) if ttl < TTL_WITH_EVENTS => short += 1,
            _ => {}
        }
        full
    });
    let dir = listed.dir();
    drop(listed);
    reply.ok();
    core.stats
        .entries_unvouched
        .fetch_add(unvouched, Ordering::Relaxed);
    core.stats
        .entries_short_ttl
        .fetch_add(short, Ordering::Relaxed);
    core.changed_while_listed(dir, changed);
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(err(&e)),
    }
}

impl Filesystem for FerryFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Listings carry attributes in one round trip; parallel lookups in one directory.
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ATOMIC_O_TRUNC;
        let supported = config.capabilities() & wanted;
        let _ = config.add_capabilities(supported);
        let _ = config.set_max_write(MAX_REQUEST);
        let _ = config.set_max_readahead(MAX_REQUEST);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Passthrough: the kernel reads fully cached files from the data cache itself.
        // Backing files on a stacked filesystem are refused; ferry stays stackable.
        if self.modes.enabled() {
            if config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            {
                let _ = config.set_max_stack_depth(1);
            } else {
                tracing::info!("this kernel offers no FUSE passthrough: reads go through ferry");
                self.modes.disable();
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // Answers known here go back at once: a hop to a runtime worker costs more than
        // the work on this machine's scale (tens of microseconds).
        if let Some(r) = self.core.lookup_now(parent.0, name.as_bytes()) {
            return reply_entry(reply, entry_ttl(&self.core, &r), r);
        }
        let (core, c, name) = (self.core.clone(), caller(req), name.as_bytes().to_vec());
        self.spawn(async move {
            let r = core.lookup(c, parent.0, &name).await;
            reply_entry(reply, entry_ttl(&core, &r), r)
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.core.attr_ttl(ino.0);
        if let Some(a) = self.core.getattr_now(ino.0) {
            return reply.attr(&ttl, &fuse_attr(&a));
        }
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(async move {
            let ttl = core.attr_ttl(ino.0);
            match core.getattr(c, ino.0, fh.map(|f| f.0)).await {
                // (Not past the TTL events allow once answered: the answer may have
                // made them incomplete.)
                Ok(a) => reply.attr(&covered_ttl(&a, ttl.min(core.ttl())), &fuse_attr(&a)),
                Err(e) => reply.error(err(&e)),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let Err(e) = self.refuse_if_read_only() {
            return reply.error(e);
        }
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
        };
        // A size change is a write: no passthrough begins meanwhile.
        let writer = size.map(|_| self.modes.writer_opening(ino.0));
        // Times and mode queued behind uncommitted writes need no worker either.
        if writer.is_none()
            && let Some(r) = self.core.setattr_now(caller(req), ino.0, &set)
        {
            return match r {
                Ok(a) => reply.attr(&covered_ttl(&a, self.core.ttl()), &fuse_attr(&a)),
                Err(e) => reply.error(err(&e)),
            };
        }
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(async move {
            let _writer = writer;
            match core.setattr(c, ino.0, fh.map(|f| f.0), set).await {
                Ok(a) => reply.attr(&covered_ttl(&a, core.ttl()), &fuse_attr(&a)),
                Err(e) => reply.error(err(&e)),
            }
        });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(async move {
            match core.readlink(c, ino.0).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(err(&e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (core, c, name) = (self.core.clone(), caller(req), name.as_bytes().to_vec());
        self.spawn(async move {
            // The TTL once answered: the answer may have made events incomplete.
            let r = core.mknod(c, parent.0, &name, mode, umask, rdev).await;
            reply_entry(reply, entry_ttl(&core, &r), r)
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (core, c, name) = (self.core.clone(), caller(req), name.as_bytes().to_vec());
        self.spawn(async move {
            let r = core.mkdir(c, parent.0, &name, mode, umask).await;
            reply_entry(reply, entry_ttl(&core, &r), r)
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        // An unlink answered ahead of the server (`fs/unlinks.rs`) needs no worker either.
        if let Some(r) = self.core.unlink_now(caller(req), parent.0, name.as_bytes()) {
            return reply_empty(reply, r);
        }
        let (core, c, name) = (self.core.clone(), caller(req), name.as_bytes().to_vec());
        self.spawn(async move { reply_empty(reply, core.unlink(c, parent.0, &name).await) });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (core, c, name) = (self.core.clone(), caller(req), name.as_bytes().to_vec());
        self.spawn(async move { reply_empty(reply, core.rmdir(c, parent.0, &name).await) });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (core, c) = (self.core.clone(), caller(req));
        let (name, target) = (
            link_name.as_bytes().to_vec(),
            target.as_os_str().as_bytes().to_vec(),
        );
        self.spawn(async move {
            let r = core.symlink(c, parent.0, &name, &target).await;
            reply_entry(reply, entry_ttl(&core, &r), r)
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (core, c) = (self.core.clone(), caller(req));
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        let flags = flags.bits();
        self.spawn(async move {
            reply_empty(
                reply,
                core.rename(c, parent.0, &name, newparent.0, &newname, flags)
                    .await,
            )
        });
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (core, c, name) = (self.core.clone(), caller(req), newname.as_bytes().to_vec());
        self.spawn(async move {
            let r = core.link(c, ino.0, newparent.0, &name).await;
            reply_entry(reply, entry_ttl(&core, &r), r)
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (core, c, modes) = (self.core.clone(), caller(req), self.modes.clone());
        let flags = flags.0;
        if self.read_only
            && (flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0)
        {
            return reply.error(Errno::EROFS);
        }
        let read_only = flags & libc::O_ACCMODE == libc::O_RDONLY && flags & libc::O_TRUNC == 0;
        self.spawn(async move {
            // Held until answered: no passthrough begins under a writer's open.
            let _writer = (!read_only).then(|| modes.writer_opening(ino.0));
            if read_only && modes.releases_pending(ino.0) && core.may_pass_through(ino.0) {
                // Closed caching opens of the file are about to be released: a file
                // read again right away can then pass through.
                let deadline = std::time::Instant::now() + crate::passthrough::RELEASE_WAIT;
                while modes.releases_pending(ino.0) && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                }
            }
            let mut reply = reply;
            for attempt in 0..3 {
                if read_only && modes.passing_through(ino.0) {
                    // It must share the passthrough readers' file: wait until a new
                    // version being fetched into it is complete.
                    core.complete_pinned(c, ino.0).await;
                }
                let o = match core.open(c, ino.0, flags).await {
                    Ok(o) => o,
                    Err(e) => return reply.error(err(&e)),
                };
                // The last attempt shares the readers' file as it is (never EIO).
                let share_anyway = attempt == 2;
                match modes.reply_open(&core, ino.0, &o, flags, share_anyway, reply) {
                    Ok(()) => return,
                    Err(r) => {
                        let _ = core.release(c, o.fh).await;
                        reply = r;
                    }
                }
            }
            reply.error(Errno::EIO)
        });
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if let Some(d) = self.core.read_now(fh.0, offset, size) {
            return reply.data(&d);
        }
        let (core, c) = (self.core.clone(), caller(req));
        let slow = move |reply: ReplyData| async move {
            match core.read(c, fh.0, offset, size).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(err(&e)),
            }
        };
        match self.core.read_at_once(c, fh.0, offset, size) {
            Some(sent) => {
                let (core, rt) = (self.core.clone(), self.rt.clone());
                sent.then(move |outcome| match core.read_arrived(outcome) {
                    Some(d) => reply.data(&d),
                    // An error or a lost connection: the full path reads again (with
                    // its retries, and its errors).
                    None => drop(rt.spawn(slow(reply))),
                });
            }
            None => self.spawn(slow(reply)),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if let Some(r) = self.core.write_now(caller(req), fh.0, offset, data) {
            return match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(err(&e)),
            };
        }
        let (core, c, data) = (self.core.clone(), caller(req), data.to_vec());
        self.spawn(async move {
            match core.write(c, fh.0, offset, data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(err(&e)),
            }
        });
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.modes.flushed(fh.0);
        let c = caller(req);
        if self.modes.may_map_beside_passthrough(fh.0) {
            // Its memory maps may have stored into the readers' data file.
            let core = self.core.clone();
            return self.spawn(async move {
                reply_empty(reply, core.commit_with_mapped_stores(c, fh.0, None).await)
            });
        }
        if self.core.flush_now(fh.0) {
            return reply.ok();
        }
        // close(): the data is on the server when this succeeds, or close() gets the error.
        let done = move |r| reply_empty(reply, r);
        if let Err(done) = self.core.flush_writer_now(c, fh.0, done) {
            let core = self.core.clone();
            self.spawn(async move { done(core.flush(c, fh.0).await) });
        }
    }

    fn release(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The kernel dropped the open from its I/O modes before sending this.
        self.modes.released(&self.core, fh.0);
        if self.core.release_now(caller(req), fh.0) {
            return reply.ok();
        }
        if let Some(r) = self.core.release_writer_now(caller(req), fh.0) {
            return reply_empty(reply, r);
        }
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(async move { reply_empty(reply, core.release(c, fh.0).await) });
    }

    fn fsync(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let (core, c) = (self.core.clone(), caller(req));
        // A writer beside passthrough readers: what its maps stored goes too.
        let maps = self.modes.may_map_beside_passthrough(fh.0);
        self.spawn(async move {
            let r = match maps {
                true => {
                    core.commit_with_mapped_stores(c, fh.0, Some(datasync))
                        .await
                }
                false => core.fsync(c, fh.0, datasync).await,
            };
            reply_empty(reply, r)
        });
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let (core, c) = (self.core.clone(), caller(req));
        if let Some(r) = core.opendir_now(c, ino.0) {
            return reply_opendir(&core, reply, r.map(|fh| (fh, true)));
        }
        self.spawn(async move {
            let r = core.opendir(c, ino.0).await;
            reply_opendir(&core, reply, r);
        });
    }

    fn readdir(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        if let Some(listed) = self.core.readdir_now(fh.0, offset) {
            return reply_readdir(&self.core, reply, Ok(listed));
        }
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(async move {
            let r = core.readdir(c, fh.0, offset).await;
            reply_readdir(&core, reply, r);
        });
    }

    fn readdirplus(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        if let Some(listed) = self.core.readdir_now(fh.0, offset) {
            return reply_readdirplus(&self.core, reply, Ok(listed));
        }
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(async move {
            let r = core.readdir(c, fh.0, offset).await;
            reply_readdirplus(&core, reply, r);
        });
    }

    fn releasedir(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        if self.core.releasedir_now(fh.0) {
            return reply.ok();
        }
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(async move { reply_empty(reply, core.releasedir(c, fh.0).await) });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let core = self.core.clone();
        self.spawn(async move { reply_empty(reply, core.fsyncdir(ino.0).await) });
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(async move {
            match core.statfs(c, ino.0).await {
                Ok(s) => reply.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
                ),
                Err(e) => reply.error(err(&e)),
            }
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel has already checked mode bits. Only the
        // export-wide read-only flag is ours to add.
        if self.read_only && mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (core, c, name) = (self.core.clone(), caller(req), name.as_bytes().to_vec());
        let modes = self.modes.clone();
        // An existing file met by the create is opened for writing (and maybe
        // truncated): no passthrough of it begins while the create runs.
        let writer = core
            .child_of(parent.0, &name)
            .map(|ino| modes.writer_opening(ino));
        // Answered from the connection's reader when the request can be queued at once
        // (no task to wake on the way); otherwise from a task.
        let answer = {
            let core = core.clone();
            move |r: Result<OpenReply, FsError>| {
                let _writer = writer;
                reply_created(&core, &modes, flags, r, reply)
            }
        };
        let file = NewFile {
            parent: parent.0,
            name,
            mode,
            umask,
            flags,
        };
        if let Err(answer) = core.create_now(c, &file, answer) {
            self.spawn(async move { answer(core.create(c, &file).await) });
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        if let Some(r) = self.core.xattr_get_now(ino.0, Some(name.as_bytes()), size) {
            return reply_xattr(reply, r);
        }
        let (core, c, name) = (self.core.clone(), caller(req), name.as_bytes().to_vec());
        self.spawn(
            async move { reply_xattr(reply, core.xattr_get(c, ino.0, Some(&name), size).await) },
        );
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        if let Some(r) = self.core.xattr_get_now(ino.0, None, size) {
            return reply_xattr(reply, r);
        }
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(async move { reply_xattr(reply, core.xattr_get(c, ino.0, None, size).await) });
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        if let Err(e) = self.refuse_if_read_only() {
            return reply.error(e);
        }
        let (core, c) = (self.core.clone(), caller(req));
        let (name, value) = (name.as_bytes().to_vec(), value.to_vec());
        self.spawn(async move {
            reply_empty(
                reply,
                core.xattr_set(c, ino.0, &name, Some(&value), flags).await,
            )
        });
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        if let Err(e) = self.refuse_if_read_only() {
            return reply.error(e);
        }
        let (core, c, name) = (self.core.clone(), caller(req), name.as_bytes().to_vec());
        self.spawn(
            async move { reply_empty(reply, core.xattr_set(c, ino.0, &name, None, 0).await) },
        );
    }

    fn copy_file_range(
        &self,
        req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(async move {
            match core
                .copy_range(c, fh_in.0, offset_in, fh_out.0, offset_out, len)
                .await
            {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(err(&e)),
            }
        });
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let (core, c) = (self.core.clone(), caller(req));
        self.spawn(async move {
            reply_empty(reply, core.fallocate(c, fh.0, offset, length, mode).await)
        });
    }
}

fn reply_xattr(reply: ReplyXattr, r: Result<XattrReply, FsError>) {
    match r {
        Ok(XattrReply::Data(d)) => reply.data(&d),
        Ok(XattrReply::Size(n)) => reply.size(n),
        Err(e) => reply.error(err(&e)),
    }
}

fn dot_attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_roundtrip() {
        for t in [
            Timespec { sec: 0, nsec: 0 },
            Timespec {
                sec: 1_700_000_000,
                nsec: 123_456_789,
            },
            Timespec { sec: -5, nsec: 250 },
        ] {
            assert_eq!(timespec(time(t)), t);
        }
    }
}
