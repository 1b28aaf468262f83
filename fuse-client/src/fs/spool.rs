//! Where a file's uncommitted writes go once memory keeps no more of them (see
//! `files::Journal`): an unnamed file in the cache directory per file being written, so a
//! large copy into the mount can be sent again after a reconnect. The kernel keeps the
//! data in its page cache until it needs the memory; the file is emptied at each commit
//! and vanishes with its last reference (`O_TMPFILE`), also if this process dies.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The spool files of one mount: their directory and their joint budget in bytes.
#[derive(Debug)]
pub struct Spools {
    dir: PathBuf,
    max: u64,
    used: AtomicU64,
}

impl Spools {
    pub fn new(dir: PathBuf, max: u64) -> Arc<Spools> {
        Arc::new(Spools {
            dir,
            max,
            used: AtomicU64::new(0),
        })
    }

    /// Bytes held in spool files now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// One file's spool: data appended in order, read back by offset.
#[derive(Debug)]
pub struct Spool {
    /// Always `Some` until dropped.
    file: Option<Arc<File>>,
    len: u64,
    spools: Arc<Spools>,
}

impl Spool {
    pub fn create(spools: &Arc<Spools>) -> io::Result<Spool> {
        Ok(Spool {
            file: Some(Arc::new(tempfile::tempfile_in(&spools.dir)?)),
            len: 0,
            spools: spools.clone(),
        })
    }

    /// Append `data`; returns where it went. Fails past the mount's budget.
    pub fn append(&mut self, data: &[u8]) -> io::Result<u64> {
        let n = data.len() as u64;
        let used = self.spools.used.fetch_add(n, Ordering::SeqCst) + n;
        if used > self.spools.max {
            self.spools.used.fetch_sub(n, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let at = self.len;
        let written = match &self.file {
            Some(f) => f.write_all_at(data, at),
            None => Err(io::Error::from_raw_os_error(libc::EBADF)),
        };
        if let Err(e) = written {
            self.spools.used.fetch_sub(n, Ordering::SeqCst);
            return Err(e);
        }
        self.len += n;
        Ok(at)
    }

    /// A handle to read the spool with while the journal goes on changing.
    pub fn reader(&self) -> Option<SpoolReader> {
        self.file.clone().map(SpoolReader)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.spools.used.fetch_sub(self.len, Ordering::SeqCst);
        // Closing the last reference frees every page of the file (up to
        // `--cache-size`): not on the caller's thread, which may hold the journal's
        // lock or be the connection's reader.
        if let Some(file) = self.file.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn_blocking(move || drop(file));
        }
    }
}

/// Reads a spool's data back ([`Spool::reader`]).
#[derive(Debug, Clone)]
pub struct SpoolReader(Arc<File>);

impl SpoolReader {
    pub fn read(&self, at: u64, len: u64) -> io::Result<Vec<u8>> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut buf = vec![0u8; len];
        self.0.read_exact_at(&mut buf, at)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_read_back_within_the_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spools = Spools::new(dir.path().to_path_buf(), 10);
        let mut s = Spool::create(&spools).expect("create");
        assert_eq!(s.append(b"hello").expect("append"), 0);
        assert_eq!(s.append(b"abc").expect("append"), 5);
        let reader = s.reader().expect("reader");
        assert_eq!(reader.read(4, 3).expect("read"), b"oab");
        let e = s.append(b"toolong").expect_err("past the budget");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(spools.used(), 8);
        let mut t = Spool::create(&spools).expect("create");
        assert!(t.append(b"xyz").is_err(), "the budget is the mount's");
        drop(s);
        assert_eq!(spools.used(), 0);
        t.append(b"xyz").expect("room again");
        // Unnamed: nothing is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
    }
}
