//! Directory trees as values: [`snapshot`] walks a tree without following symlinks and
//! records, per relative path, the kind, size, content, permission bits and symlink target
//! (and optionally nlink, mtime and owner); [`assert_same`] compares two and lists the
//! differences. Also [`make_sample`], a small varied tree for copy/tar/find tests.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::rng::{Rng, fnv1a};

/// Files up to this size are kept whole (diffs show them); bigger ones as a fingerprint.
const KEEP_CONTENT: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

#[derive(Clone, PartialEq, Eq)]
pub enum Content {
    Bytes(Vec<u8>),
    Digest { len: u64, fnv: u64 },
}

impl fmt::Debug for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Bytes(b) if b.len() <= 64 => write!(f, "{:?}", String::from_utf8_lossy(b)),
            Content::Bytes(b) => write!(f, "<{} bytes, fnv {:016x}>", b.len(), fnv1a(b)),
            Content::Digest { len, fnv } => write!(f, "<{len} bytes, fnv {fnv:016x}>"),
        }
    }
}

/// What a snapshot records about one path. `None` fields were not asked for (or do not
/// apply to the kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Size of files (directory sizes are filesystem-specific).
    pub size: Option<u64>,
    pub perm: Option<u32>,
    pub content: Option<Content>,
    pub target: Option<PathBuf>,
    pub nlink: Option<u64>,
    pub mtime: Option<(i64, i64)>,
    pub owner: Option<(u32, u32)>,
}

/// Which optional attributes a snapshot records.
#[derive(Debug, Clone, Copy, Default)]
pub struct Opts {
    /// `mode & 0o7777` of everything but symlinks.
    pub perm: bool,
    /// Link count of non-directories.
    pub nlink: bool,
    /// mtime (seconds and nanoseconds) of files and directories.
    pub mtime: bool,
    /// uid and gid.
    pub owner: bool,
}

impl Opts {
    /// Kinds, names, sizes, content, symlink targets only.
    pub const CONTENT: Opts = Opts {
        perm: false,
        nlink: false,
        mtime: false,
        owner: false,
    };
    /// Plus permission bits.
    pub const PERM: Opts = Opts {
        perm: true,
        nlink: false,
        mtime: false,
        owner: false,
    };
}

pub type Tree = BTreeMap<PathBuf, Entry>;

fn kind_of(ft: fs::FileType) -> Kind {
    if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::CharDevice
    } else if ft.is_block_device() {
        Kind::BlockDevice
    } else {
        Kind::File
    }
}

/// Everything below `root` (not `root` itself), keyed by path relative to it.
pub fn snapshot(root: &Path, opts: Opts) -> io::Result<Tree> {
    let mut tree = Tree::new();
    walk(root, Path::new(""), opts, &mut tree)?;
    Ok(tree)
}

fn walk(root: &Path, rel: &Path, opts: Opts, tree: &mut Tree) -> io::Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .map_err(|e| io::Error::new(e.kind(), format!("read_dir {}: {e}", dir.display())))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let md = fs::symlink_metadata(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("lstat {}: {e}", path.display())))?;
        let kind = kind_of(md.file_type());
        let mut e = Entry {
            kind,
            size: None,
            perm: None,
            content: None,
            target: None,
            nlink: None,
            mtime: None,
            owner: None,
        };
        if opts.perm && kind != Kind::Symlink {
            e.perm = Some(md.permissions().mode() & 0o7777);
        }
        if opts.nlink && kind != Kind::Dir {
            e.nlink = Some(md.nlink());
        }
        if opts.mtime && matches!(kind, Kind::File | Kind::Dir) {
            e.mtime = Some((md.mtime(), md.mtime_nsec()));
        }
        if opts.owner {
            e.owner = Some((md.uid(), md.gid()));
        }
        match kind {
            Kind::File => {
                let data = fs::read(&path).map_err(|e| {
                    io::Error::new(e.kind(), format!("read {}: {e}", path.display()))
                })?;
                e.size = Some(md.len());
                e.content = Some(if data.len() as u64 <= KEEP_CONTENT {
                    Content::Bytes(data)
                } else {
                    Content::Digest {
                        len: data.len() as u64,
                        fnv: fnv1a(&data),
                    }
                });
            }
            Kind::Symlink => e.target = Some(fs::read_link(&path)?),
            _ => {}
        }
        tree.insert(rel.clone(), e);
        if kind == Kind::Dir {
            walk(root, &rel, opts, tree)?;
        }
    }
    Ok(())
}

/// Human-readable differences between two trees (empty when equal).
pub fn diff(a: &Tree, b: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (p, ea) in a {
        match b.get(p) {
            None => out.push(format!("only in first:  {} {ea:?}", p.display())),
            Some(eb) if eb != ea => out.push(format!(
                "differs: {}\n    first:  {ea:?}\n    second: {eb:?}",
                p.display()
            )),
            Some(_) => {}
        }
    }
    for (p, eb) in b {
        if !a.contains_key(p) {
            out.push(format!("only in second: {} {eb:?}", p.display()));
        }
    }
    out
}

/// Panics listing the differences unless the trees under `a` and `b` are the same.
#[track_caller]
pub fn assert_same(a: &Path, b: &Path, opts: Opts) {
    let ta = snapshot(a, opts).unwrap_or_else(|e| panic!("snapshot of {}: {e}", a.display()));
    let tb = snapshot(b, opts).unwrap_or_else(|e| panic!("snapshot of {}: {e}", b.display()));
    let d = diff(&ta, &tb);
    assert!(
        d.is_empty(),
        "trees differ (first: {}, second: {}), {} difference(s):\n{}",
        a.display(),
        b.display(),
        d.len(),
        d.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Fills `root` with a small varied tree: empty and binary files, nested dirs, an empty
/// dir, modes 0600/0755, a file symlink, a directory symlink and a dangling one.
pub fn make_sample(root: &Path, seed: u64) -> io::Result<()> {
    let mut rng = Rng::new(seed);
    fs::create_dir_all(root.join("sub/deeper"))?;
    fs::create_dir_all(root.join("emptydir"))?;
    fs::write(root.join("a.txt"), b"alpha\n")?;
    fs::write(root.join("empty"), b"")?;
    fs::write(root.join("bin.dat"), rng.bytes(300_000))?;
    fs::write(root.join("sub/b.txt"), b"bravo\n".repeat(1000))?;
    fs::write(root.join("sub/deeper/c.txt"), b"charlie")?;
    fs::set_permissions(
        root.join("sub/deeper/c.txt"),
        fs::Permissions::from_mode(0o600),
    )?;
    fs::write(root.join("sub/deeper/run.sh"), b"#!/bin/sh\necho ok\n")?;
    fs::set_permissions(
        root.join("sub/deeper/run.sh"),
        fs::Permissions::from_mode(0o755),
    )?;
    fs::write(
        root.join("sub/deeper/odd name with spaces"),
        rng.bytes(4097),
    )?;
    std::os::unix::fs::symlink("a.txt", root.join("link"))?;
    std::os::unix::fs::symlink("deeper", root.join("sub/dirlink"))?;
    std::os::unix::fs::symlink("nowhere", root.join("dangling"))?;
    Ok(())
}
