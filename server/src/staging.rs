//! Staged writes (`Open { staged: true }`): writes through a handle go to an unnamed
//! `O_TMPFILE` in the real file's directory and reach the real file only on `Commit`
//! (or `Fsync`). A client whose connection dies before committing leaves the real file
//! exactly as it was: closing the handle discards the staging file with it.
//!
//! Per handle we keep the staged byte ranges (merged), the size the file has as seen
//! through the handle, the smallest size it was truncated to (bytes of the real file past
//! it read as zeros), and the server time of the last change, which `Commit` gives the
//! real file as its mtime: the file looks modified when the data was written, not when
//! the client got around to committing.
//!
//! The staging file lives in the same directory (so the same filesystem) as the real one,
//! which lets `copy_file_range` share the data instead of copying it where the
//! filesystem can. Only `ferryd` itself ever links it anywhere: into its hidden folder,
//! for the redo record of a large commit (see [`crate::redo`]); the handle then goes on
//! with a new unnamed one made there (the same filesystem too).
//!
//! This module must never write to the real file except in [`Staging::commit`], and
//! never read or write the staging file anywhere but at the offsets it records.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use ferry_common::RelPath;

use crate::redo::Area;
use crate::sys::{self, Errno};
use crate::undo::UndoDir;

/// Half-open byte ranges `[start, end)`, disjoint and never adjacent (merged).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Every range touching [start, end) starts at or before `end`.
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=end)
            .rev()
            .take_while(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// Forget everything at or past `size`.
    pub fn clip(&mut self, size: u64) {
        self.0.retain(|&s, _| s < size);
        if let Some((_, e)) = self.0.range_mut(..size).next_back() {
            *e = (*e).min(size);
        }
    }

    /// The parts of the ranges that fall within `[start, end)`.
    pub fn within(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        // The last range starting at or before `start` may reach into the window.
        let first = self
            .0
            .range(..=start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        self.0
            .range(first..end)
            .map(move |(&s, &e)| (s.max(start), e.min(end)))
            .filter(|(s, e)| s < e)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(&s, &e)| (s, e))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a staged handle has not committed yet.
#[derive(Debug)]
struct Pending {
    ranges: Ranges,
    /// The file's size as seen through the handle.
    size: u64,
    /// Smallest size a staged truncate asked for: real bytes past it are gone.
    truncate_to: Option<u64>,
    /// Server time of the last write or truncate.
    changed: libc::timespec,
    /// An mtime the client set explicitly after its last write (`cp -p`, `touch -d`):
    /// commit must keep it rather than overwrite it with `changed`.
    mtime: Option<libc::timespec>,
}

/// The staging side of one handle. Callers hold it under a lock for the whole of each
/// operation: a commit must not interleave with a write or read of the same handle.
#[derive(Debug)]
pub struct Staging {
    file: OwnedFd,
    pending: Option<Pending>,
    /// The real file's path when it was opened: where an undo record finds it again
    /// (with its inode number, checked).
    path: RelPath,
}

/// Most bytes of a file's old content a commit saves in an undo record (see
/// [`crate::undo`]): saving them costs reading them (cold, often) and keeping them in
/// the state directory (RAM, by default). A larger rewrite keeps a redo record instead
/// (see [`crate::redo`]).
pub const UNDO_MAX: u64 = 64 * 1024 * 1024;

/// `O_TMPFILE` is missing on this filesystem (or kernel): warn once, not per open.
static WARNED_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// Current server time, as a `timespec` for `futimens`.
pub fn now() -> libc::timespec {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    libc::timespec {
        tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(d.subsec_nanos()),
    }
}

fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> Result<usize, Errno> {
    let mut done = 0;
    while done < buf.len() {
        let pos = i64::try_from(off + done as u64).map_err(|_| libc::EINVAL)?;
        match sys::pread(fd, &mut buf[done..], pos) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// `pread` until `len` bytes or end of file, into fresh capacity (zeroing 4 MiB first
/// cost a tenth of the server's CPU in a cold sequential read). An error after some
/// bytes is returned beside them: the caller decides whether those bytes are an answer.
pub(crate) fn pread_vec(
    fd: BorrowedFd<'_>,
    off: u64,
    len: usize,
) -> Result<(Vec<u8>, Option<Errno>), Errno> {
    let start = i64::try_from(off).map_err(|_| libc::EINVAL)?;
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let pos = start.checked_add(buf.len() as i64).ok_or(libc::EINVAL)?;
        match sys::pread_spare(fd, &mut buf, len, pos) {
            Ok(0) => break,
            Ok(_) => {}
            Err(libc::EINTR) => {}
            Err(e) => return Ok((buf, Some(e))),
        }
    }
    Ok((buf, None))
}

/// [`pread_vec`], an error after some bytes giving those bytes (the error repeats on the
/// next call).
pub(crate) fn pread_some(fd: BorrowedFd<'_>, off: u64, len: usize) -> Result<Vec<u8>, Errno> {
    match pread_vec(fd, off, len)? {
        (buf, Some(e)) if buf.is_empty() => Err(e),
        (buf, _) => Ok(buf),
    }
}

/// `pwrite` all of `buf` at `off`; a failure after a partial write reports the bytes
/// written, as `write(2)` does.
pub(crate) fn pwrite_full(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> Result<usize, Errno> {
    let mut done = 0;
    while done < buf.len() {
        let pos = i64::try_from(off + done as u64).map_err(|_| libc::EFBIG)?;
        match sys::pwrite(fd, &buf[done..], pos) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(libc::EINTR) => {}
            Err(_) if done > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// `pread` of exactly `buf.len()` bytes; `EIO` if the file is shorter.
pub(crate) fn pread_exact(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> Result<(), Errno> {
    match pread_full(fd, buf, off)? {
        n if n == buf.len() => Ok(()),
        _ => Err(libc::EIO),
    }
}

/// Like [`pwrite_full`] but every error counts, even after a partial write: a commit
/// that could not write everything must fail with the reason (ENOSPC, EDQUOT, ...).
pub(crate) fn pwrite_all(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        let pos = i64::try_from(off + done as u64).map_err(|_| libc::EFBIG)?;
        match sys::pwrite(fd, &buf[done..], pos) {
            Ok(0) => return Err(libc::EIO),
            Ok(n) => done += n,
            Err(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(crate) fn size_of(real: BorrowedFd<'_>) -> Result<u64, Errno> {
    Ok(u64::try_from(sys::fstat(real)?.st_size).unwrap_or(0))
}

impl Staging {
    /// A staging file in `dir` (the real file's directory). `Ok(None)` when the
    /// filesystem cannot make one (no `O_TMPFILE`, or no right to create in `dir`): the
    /// handle then writes directly, as an unstaged one does.
    pub fn create(dir: BorrowedFd<'_>, path: &RelPath) -> Result<Option<Staging>, Errno> {
        // Without `O_EXCL`: a commit too large for an undo record links it (see
        // [`crate::redo`]).
        let flags = libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC;
        match sys::openat(dir, c".", flags, 0o600) {
            Ok(file) => Ok(Some(Staging {
                file,
                pending: None,
                path: path.clone(),
            })),
            // EISDIR: kernels without O_TMPFILE see only O_DIRECTORY in the flags.
            Err(e @ (libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {
                if !WARNED_UNSUPPORTED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        errno = e,
                        "O_TMPFILE unsupported here: staged opens write directly"
                    );
                }
                Ok(None)
            }
            // A directory the server may not create in: still writable, just unstaged.
            Err(e @ (libc::EACCES | libc::EPERM)) => {
                tracing::debug!(
                    errno = e,
                    "cannot stage in this directory, writing directly"
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The pending state, starting from the real file as it is now.
    fn pending(&mut self, real: BorrowedFd<'_>) -> Result<&mut Pending, Errno> {
        if self.pending.is_none() {
            self.pending = Some(Pending {
                ranges: Ranges::default(),
                size: size_of(real)?,
                truncate_to: None,
                changed: now(),
                mtime: None,
            });
        }
        self.pending.as_mut().ok_or(libc::EIO)
    }

    /// Write into the staging file; returns the bytes written, like `write(2)`.
    pub fn write(&mut self, real: BorrowedFd<'_>, off: u64, data: &[u8]) -> Result<usize, Errno> {
        off.checked_add(data.len() as u64)
            .filter(|&end| i64::try_from(end).is_ok())
            .ok_or(libc::EFBIG)?;
        if data.is_empty() {
            return Ok(0); // changes nothing, as write(2) of nothing
        }
        let done = pwrite_full(self.file.as_fd(), data, off)?;
        let p = self.pending(real)?;
        let end = off + done as u64;
        p.ranges.insert(off, end);
        p.size = p.size.max(end);
        p.changed = now();
        p.mtime = None;
        Ok(done)
    }

    /// A truncate (or extension) through the handle.
    pub fn truncate(&mut self, real: BorrowedFd<'_>, size: u64) -> Result<(), Errno> {
        i64::try_from(size).map_err(|_| libc::EFBIG)?;
        let p = self.pending(real)?;
        p.size = size;
        p.truncate_to = Some(p.truncate_to.map_or(size, |t| t.min(size)));
        p.ranges.clip(size);
        p.changed = now();
        p.mtime = None;
        Ok(())
    }

    /// The client set the mtime through the handle (already applied to the real file);
    /// commit keeps it unless a later write comes.
    pub fn set_mtime(&mut self, mtime: libc::timespec) {
        if let Some(p) = &mut self.pending {
            p.mtime = Some(mtime);
        }
    }

    /// The real file's `stat` as seen through the handle: staged size and mtime.
    pub fn stat(&self, real: BorrowedFd<'_>) -> Result<libc::stat, Errno> {
        let mut st = sys::fstat(real)?;
        if let Some(p) = &self.pending {
            let mtime = p.mtime.unwrap_or(p.changed);
            st.st_size = i64::try_from(p.size).unwrap_or(i64::MAX);
            st.st_mtime = mtime.tv_sec;
            st.st_mtime_nsec = mtime.tv_nsec;
        }
        Ok(st)
    }

    /// Read through the handle: the real file up to the staged size (zeros where it is
    /// shorter or was truncated), staged ranges on top. Short only at the staged end.
    pub fn read(&self, real: BorrowedFd<'_>, off: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let Some(p) = &self.pending else {
            return match pread_vec(real, off, len)? {
                (_, Some(e)) => Err(e),
                (buf, None) => Ok(buf),
            };
        };
        let end = off.saturating_add(len as u64).min(p.size);
        if off >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - off) as usize];
        let real_end = end.min(p.truncate_to.unwrap_or(u64::MAX));
        if real_end > off {
            // Past the real file's end the buffer keeps its zeros.
            pread_full(real, &mut buf[..(real_end - off) as usize], off)?;
        }
        for (s, e) in p.ranges.within(off, end) {
            let part = &mut buf[(s - off) as usize..(e - off) as usize];
            if pread_full(self.file.as_fd(), part, s)? != part.len() {
                // Every staged range was written to the staging file: a bug if not.
                return Err(libc::EIO);
            }
        }
        Ok(buf)
    }

    /// Whether a commit of what is pending is quick: nothing, or a few small ranges and
    /// no truncation (which may free a large file's blocks).
    pub fn commit_is_small(&self, max_bytes: u64) -> bool {
        match &self.pending {
            None => true,
            Some(p) => {
                p.truncate_to.is_none()
                    && p.ranges.iter().map(|(s, e)| e - s).sum::<u64>() <= max_bytes
            }
        }
    }

    /// Drop everything pending (a write through the handle failed): the real file stays
    /// as it was, and the handle starts over from it.
    pub fn discard(&mut self) {
        self.pending = None;
        if let Err(e) = sys::ftruncate(self.file.as_fd(), 0) {
            tracing::debug!(errno = e, "emptying the staging file failed");
        }
    }

    /// What applying everything pending does to the real file.
    fn plan(&self) -> Option<Plan> {
        self.pending.as_ref().map(|p| Plan {
            truncate_to: p.truncate_to,
            ranges: p.ranges.iter().collect(),
            size: p.size,
            mtime: {
                let m = p.mtime.unwrap_or(p.changed);
                (m.tv_sec, m.tv_nsec)
            },
        })
    }

    /// Apply everything pending to the real file, give it the mtime of the last
    /// change, and start over with an empty staging file. With `records`, a crash (see
    /// [`crate::undo`], [`crate::redo`]) or a failed apply cannot leave the file torn:
    /// what the apply changes is saved first (an undo record: a failed apply is rolled
    /// back at once, a crash at the next start), or, for a rewrite too large to save,
    /// the staging file is linked where the next start finds it to finish the apply (a
    /// redo record). The record goes once the apply is done. On failure the pending
    /// state is kept: applying it again is idempotent, so a retried commit completes it.
    pub fn commit(
        &mut self,
        real: BorrowedFd<'_>,
        records: Option<Records<'_>>,
    ) -> Result<(), Errno> {
        let Some(plan) = self.plan() else {
            return Ok(());
        };
        let record = match (records, &self.pending) {
            (Some(rec), Some(p)) => self.save_record(real, rec, p, &plan),
            _ => None,
        };
        let applied = apply_plan(self.file.as_fd(), real, &plan);
        match (applied, record) {
            (Ok(()), Some(Record::Undo(r))) => r.done(),
            (Ok(()), Some(Record::Redo(r))) => {
                // The linked file cannot be linked again: the next large commit gets a
                // fresh one (without, it would go without a record).
                match r.fresh_staging() {
                    Ok(fresh) => self.file = fresh,
                    Err(e) => tracing::warn!(errno = e, "cannot make a new staging file"),
                }
                r.done();
            }
            (Err(e), Some(Record::Undo(r))) => {
                if let Err(re) = r.roll_back(real) {
                    tracing::error!(
                        errno = re,
                        "a failed commit could not be rolled back: the file may be torn"
                    );
                }
                // Never kept: a later start must not undo commits acknowledged since.
                r.done();
                return Err(e);
            }
            (Err(e), Some(Record::Redo(r))) => {
                // Nor redone: what failed now (ENOSPC, say) would fail again, and a
                // later start must not overwrite commits acknowledged since.
                r.done();
                return Err(e);
            }
            (r, None) => r?,
        }
        // Only now: a redo record's data is the staging file itself.
        self.finished();
        Ok(())
    }

    /// The record that makes this commit crash-safe, if one can be kept: a failure to
    /// keep one (a full state directory, say) must not make every close fail, so the
    /// commit then goes on without.
    fn save_record<'a>(
        &self,
        real: BorrowedFd<'_>,
        rec: Records<'a>,
        p: &Pending,
        plan: &Plan,
    ) -> Option<Record<'a>> {
        let regions = match size_of(real) {
            Ok(old_size) => changed_regions(p, old_size),
            Err(e) => {
                tracing::warn!(
                    errno = e,
                    "cannot stat the file; committing without a record"
                );
                return None;
            }
        };
        let saved: u64 = regions.iter().map(|(s, e)| e - s).sum();
        let kept = if saved <= rec.undo.undo_max() {
            rec.undo.save(real, &self.path, &regions).map(Record::Undo)
        } else {
            rec.undo
                .save_redo(rec.area, real, &self.path, self.file.as_fd(), plan)
                .map(Record::Redo)
        };
        match kept {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(
                    errno = e,
                    saved,
                    "cannot keep a commit record; committing without"
                );
                None
            }
        }
    }

    /// Apply without records (tests: a crash half way).
    #[cfg(test)]
    fn apply(&mut self, real: BorrowedFd<'_>) -> Result<(), Errno> {
        if let Some(plan) = self.plan() {
            apply_plan(self.file.as_fd(), real, &plan)?;
            self.finished();
        }
        Ok(())
    }

    /// Everything pending is in the real file: reuse the staging file for later
    /// writes, its old blocks released now.
    fn finished(&mut self) {
        self.pending = None;
        if let Err(e) = sys::ftruncate(self.file.as_fd(), 0) {
            tracing::debug!(errno = e, "emptying the staging file failed");
        }
    }
}

/// Where a commit keeps its crash record: the export's state directory and its hidden
/// folder (see [`crate::redo`]).
#[derive(Debug, Clone, Copy)]
pub struct Records<'a> {
    pub undo: &'a UndoDir,
    pub area: &'a Area,
}

enum Record<'a> {
    Undo(crate::undo::Undo),
    Redo(crate::redo::Redo<'a>),
}

/// What a commit does to the real file, in order: cut it to `truncate_to` (if shorter
/// than now), copy `ranges` from the staging file to the same offsets, set the size to
/// `size` and the mtime to `mtime`. Applying it again, whole or after a partial apply,
/// gives the same file: the recovery of a redo record relies on this.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub truncate_to: Option<u64>,
    pub ranges: Vec<(u64, u64)>,
    pub size: u64,
    /// Seconds and nanoseconds.
    pub mtime: (i64, i64),
}

/// Apply `plan` to `real` with the staged bytes of `src`.
pub(crate) fn apply_plan(
    src: BorrowedFd<'_>,
    real: BorrowedFd<'_>,
    plan: &Plan,
) -> Result<(), Errno> {
    if let Some(t) = plan.truncate_to
        && t < size_of(real)?
    {
        sys::ftruncate(real, t)?;
    }
    for &(s, e) in &plan.ranges {
        copy_range(src, real, s, e)?;
    }
    if size_of(real)? != plan.size {
        sys::ftruncate(real, plan.size)?;
    }
    let omit = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_OMIT,
    };
    let mtime = libc::timespec {
        tv_sec: plan.mtime.0,
        tv_nsec: plan.mtime.1,
    };
    sys::futimens(real, &[omit, mtime])
}

/// The byte ranges of the real file (now `old_size` long) that applying `p` changes or
/// cuts: its staged ranges, and everything past a truncation or a shrink.
fn changed_regions(p: &Pending, old_size: u64) -> Vec<(u64, u64)> {
    let mut r = p.ranges.clone();
    if let Some(t) = p.truncate_to {
        r.insert(t, old_size);
    }
    r.insert(p.size, old_size);
    r.clip(old_size);
    r.iter().collect()
}

/// Copy `[start, end)` from the staging file to the same offsets of the real file:
/// `copy_file_range` (shared blocks where the filesystem can), or plain reads and writes
/// where the kernel cannot do it between these two files.
fn copy_range(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, start: u64, end: u64) -> Result<(), Errno> {
    let mut pos = start;
    while pos < end {
        let chunk = usize::try_from(end - pos)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match sys::copy_file_range(src, pos, dst, pos, chunk) {
            Ok(0) => return Err(libc::EIO), // the staging file is shorter than recorded
            Ok(n) => pos += n as u64,
            Err(libc::EINTR) => {}
            Err(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS) => {
                return copy_plain(src, dst, pos, end);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn copy_plain(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, start: u64, end: u64) -> Result<(), Errno> {
    let mut buf = vec![0u8; (1 << 20).min((end - start) as usize)];
    let mut pos = start;
    while pos < end {
        let want = buf.len().min((end - pos) as usize);
        let n = pread_full(src, &mut buf[..want], pos)?;
        if n == 0 {
            return Err(libc::EIO);
        }
        pwrite_all(dst, &buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
