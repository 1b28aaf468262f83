//! Message types exchanged between `ferry` and `ferryd`.
//!
//! Every request names files by a path relative to the export root ([`RelPath`]) or by a
//! server-side handle obtained from `Open`/`Create`/`OpenDir`. Paths keep the protocol
//! stateless enough that a client can reconnect and carry on; handles give open files the
//! POSIX semantics a path cannot (an open file that is unlinked stays readable).
//!
//! Evolution rule: new requests and responses are appended to the enums (bincode encodes
//! the variant index), and anything optional is negotiated through [`caps`] in the
//! handshake. Never reorder or remove a variant without bumping [`PROTOCOL_VERSION`].

use serde::{Deserialize, Serialize};

/// Serde for the protocol's byte strings (names, paths, file data): written as bytes
/// (`serde_bytes`), read through `deserialize_bytes`, so that a frame's bytes are copied
/// into the `Vec` once. bincode's `deserialize_byte_buf` (what `serde_bytes` asks for)
/// zero-fills the vector before copying into it: 7% of the client's CPU in a cold read.
/// Same encoding either way (a length, then the bytes).
mod byte_vec {
    use std::fmt;

    use serde::de::{Deserializer, SeqAccess, Visitor};

    pub use serde_bytes::serialize;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_bytes(ByteVec)
    }

    pub(super) struct ByteVec;

    impl<'de> Visitor<'de> for ByteVec {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        // Formats without a bytes type (JSON) give a sequence of numbers. The size
        // hint is capped: it comes from the peer.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}

/// Serde for file data: written as bytes, read as a view into the frame it came in
/// (`codec::share_of_frame`), so a 4 MiB read reply or write is not copied again after
/// the socket. Same encoding as [`byte_vec`].
mod shared_bytes {
    use std::fmt;

    use bytes::Bytes;
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        d.deserialize_bytes(Shared)
    }

    struct Shared;

    impl<'de> Visitor<'de> for Shared {
        type Value = Bytes;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Bytes, E> {
            Ok(crate::codec::share_of_frame(v))
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v))
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(v))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Bytes, A::Error> {
            super::byte_vec::ByteVec.visit_seq(seq).map(Bytes::from)
        }
    }
}

/// First bytes a client sends: identifies the protocol before anything is decoded further.
pub const MAGIC: [u8; 8] = *b"FERRY\r\n\x1a";

/// Bumped on any incompatible change of the messages in this module.
pub const PROTOCOL_VERSION: u32 = 4;

/// Most directories one `Request::Locate` asks about.
pub const MAX_LOCATE: usize = 1024;

/// Default TCP port of `ferryd`.
pub const DEFAULT_PORT: u16 = 7420;

/// Largest read or write payload a single request may carry. Both ends refuse more.
pub const MAX_IO: u32 = 4 * 1024 * 1024;

/// Most bytes one `CopyRange` copies: the answer fits `Response::Written`, and one
/// request keeps its handles busy for a bounded time (callers loop, as `cp` does).
pub const MAX_COPY: u64 = 256 * 1024 * 1024;

/// Most names one `ReadSmall` may ask for.
pub const MAX_SMALL_FILES: usize = 256;

/// Largest number of directory entries in one `ReadDir` reply.
pub const MAX_DIR_BATCH: u32 = 4096;

/// Largest frame either end accepts, header excluded. Bounds every allocation made on
/// behalf of the peer: data payloads are at most [`MAX_IO`], a directory batch of
/// [`MAX_DIR_BATCH`] entries with 255-byte names and attributes stays well below this.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;

/// Capability bits negotiated in the handshake (the intersection of both sides is used).
pub mod caps {
    /// Server pushes [`super::Event`]s: every change to a directory the client has looked
    /// into (made by anyone: other clients, processes on the server) is reported.
    pub const EVENTS: u64 = 1 << 0;
    /// Server may be asked to create files on behalf of the caller's uid/gid.
    pub const CALLER_CREDS: u64 = 1 << 1;
    /// Server copies between two open handles itself ([`super::Request::CopyRange`]).
    pub const COPY_RANGE: u64 = 1 << 2;
    /// Server answers [`super::Request::ReadSmall`].
    pub const READ_SMALL: u64 = 1 << 3;
    /// Server fills [`super::Attr::xattrs`] (whether a file has extended attributes) in
    /// lookups, attributes and listings: one more system call per entry listed, worth
    /// it only to a client that forwards extended attributes. Without it the field is
    /// [`super::XATTRS_UNKNOWN`].
    pub const XATTR_HINTS: u64 = 1 << 4;
    /// Server runs each `Unlink` before it reads the connection's next request, and may
    /// remove any entry the client's kernel let the caller remove (it runs as root, on a
    /// writable export): a client may answer an unlink before its reply comes.
    pub const ORDERED_UNLINK: u64 = 1 << 5;
    /// Server answers [`super::Request::Locate`] (it holds events' watches by path).
    pub const LOCATE: u64 = 1 << 6;
    /// A directory the server cannot watch (its watch limit, the kernel's) leaves the
    /// rest of the event stream live: every attribute that rests on such a directory
    /// (its own, its entries' in lookups, listings, opens and the like) goes out marked
    /// [`super::Attr::uncovered`], and the client trusts those, the directory's names and
    /// its listing no longer than without events. Without it, the first such directory
    /// makes the whole stream incomplete ([`super::Event::Incomplete`]) for the client.
    pub const PARTIAL_WATCHES: u64 = 1 << 7;
    /// Server answers [`super::Request::LookupIn`].
    pub const CHECKED_LOOKUP: u64 = 1 << 8;
}

/// The first message on a connection, client to server. `magic` and `version` stay the
/// first two fields forever: a server reads them before decoding the rest, so a client of
/// another version always gets a readable `Refused`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    pub version: u32,
    pub capabilities: u64,
    /// Free text for logs, e.g. `ferry 0.1.0 on host`.
    pub client: String,
}

impl Hello {
    pub fn new(client: impl Into<String>, capabilities: u64) -> Self {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            capabilities,
            client: client.into(),
        }
    }
}

/// The server's answer to [`Hello`]. After `Refused` the server closes the connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HelloReply {
    Welcome(Welcome),
    Refused { version: u32, reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u32,
    /// Intersection of the client's and the server's capabilities.
    pub capabilities: u64,
    pub read_only: bool,
    /// Attributes of the export root.
    pub root: Attr,
    /// Largest payload the server accepts in one read or write.
    pub max_io: u32,
    /// Free text for logs, e.g. `ferryd 0.1.0`.
    pub server: String,
    /// Identifies the export (server host, export directory) across server restarts, so a
    /// client can key its persistent cache by it.
    pub export_id: u64,
    /// Names the server's table of answers to keyed changes ([`OnceKey`]): a client
    /// repeats a keyed change only to the instance it first sent it to. Random at a
    /// server's start, unless the server took over the table a process before it kept
    /// in its state directory (a restart): then that process's.
    pub instance: u64,
}

/// A path relative to the export root as raw bytes: components separated by `/`, no
/// leading `/`, no empty, `.` or `..` components. The empty path is the root itself.
/// The server re-validates every path it receives ([`crate::path`]).
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelPath(#[serde(with = "byte_vec")] pub Vec<u8>);

impl std::fmt::Debug for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}", String::from_utf8_lossy(&self.0))
    }
}

/// One directory entry name (no `/`, not `.` or `..`, not empty).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Name(#[serde(with = "byte_vec")] pub Vec<u8>);

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// Seconds and nanoseconds since the Unix epoch, as `struct timespec`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// File attributes as the server's filesystem reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    /// Stable node id: the server's inode number (mixed with the device when the file
    /// lives on another filesystem than the export root).
    pub ino: u64,
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    /// Changes whenever content or metadata changes (derived from ctime, mtime and size):
    /// a cache holding data tagged with an older version must not serve it.
    pub version: u64,
    /// Whether the file has extended attributes: [`XATTRS_UNKNOWN`], [`XATTRS_NONE`] or
    /// [`XATTRS_SOME`]. Lets a client answer `ls -l`'s per-file xattr probes locally.
    pub xattrs: u8,
    /// Changes to these attributes may go unreported, so they are trusted no longer
    /// than without events: a directory the server could not watch (past its budget for
    /// watches, out of the kernel's, or without permission to watch it; changes inside
    /// it change its mtime and link count), and, with [`caps::PARTIAL_WATCHES`], anything
    /// whose directory it could not watch (or that a reply shows while one of its
    /// watches failed). A client trusts the names in and the listing of a directory
    /// whose own attributes are uncovered no longer either. Always false without
    /// [`caps::EVENTS`].
    pub uncovered: bool,
}

pub const XATTRS_UNKNOWN: u8 = 0;
pub const XATTRS_NONE: u8 = 1;
pub const XATTRS_SOME: u8 = 2;

/// Who asked: the uid/gid of the process on the client that made the call. A server
/// running as root gives files it creates this owner (AUTH_SYS-style trust).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// Fields of `SetAttr`; `None` leaves the field alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSet {
    Now,
    At(Timespec),
}

/// `renameat2` flags on the wire (values of Linux `RENAME_*`).
pub mod rename_flags {
    pub const NOREPLACE: u32 = 1;
    pub const EXCHANGE: u32 = 2;
}

/// Open flags on the wire: the access mode and the few flags the server must honor.
/// Values are Linux `O_*` numbers; the server masks out everything else.
pub type OpenFlags = i32;

/// A client-to-server message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame {
    /// Chosen by the client, unique among its requests in flight; echoed in the reply.
    pub id: u64,
    pub caller: Caller,
    pub request: Request,
    /// Set on a change the client may send again after its connection broke (see
    /// [`OnceKey`]); `None` on everything else.
    pub once: Option<OnceKey>,
}

/// Names one change of a client (`Create`, `MkNod`, `MkDir`, `Unlink`, `RmDir`,
/// `Symlink`, `Rename`, `Link`: any other request with a key is `EINVAL`), so that it
/// runs at most once however often it is sent. A client whose connection broke before
/// the answer cannot know whether the change ran; it sends it again with the same key
/// and `repeat`. The server remembers the answers of recent keys for a while (in
/// memory: not across its own restart) and answers a repeat of one it ran from that
/// record (a `Create`'s with the file opened again on the repeat's connection), or
/// waits for the first run if it is still running. A repeat it has no record of runs
/// only if its first send cannot have arrived: the server knows the session from a key
/// no newer than this one and has forgotten none of its answers since. Otherwise it is
/// answered [`Response::NotRemembered`] without running. A client sends a repeat only
/// to the server process ([`Welcome::instance`]) it sent the first to: another
/// process may have run it and forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OnceKey {
    /// Random, chosen by the client once (per mount).
    pub session: u64,
    /// Counts up within the session.
    pub seq: u64,
    pub repeat: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness probe; answered with `Response::Pong` ahead of slower work.
    Ping,
    Lookup {
        parent: RelPath,
        name: Name,
    },
    /// Attributes of `path`, or of the open `handle` when given (works after unlink).
    GetAttr {
        path: RelPath,
        handle: Option<u64>,
    },
    SetAttr {
        path: RelPath,
        handle: Option<u64>,
        set: SetAttr,
    },
    ReadLink {
        path: RelPath,
    },
    MkNod {
        parent: RelPath,
        name: Name,
        mode: u32,
        umask: u32,
        rdev: u32,
    },
    MkDir {
        parent: RelPath,
        name: Name,
        mode: u32,
        umask: u32,
    },
    Unlink {
        parent: RelPath,
        name: Name,
    },
    RmDir {
        parent: RelPath,
        name: Name,
    },
    Symlink {
        parent: RelPath,
        name: Name,
        #[serde(with = "byte_vec")]
        target: Vec<u8>,
    },
    Rename {
        parent: RelPath,
        name: Name,
        new_parent: RelPath,
        new_name: Name,
        flags: u32,
    },
    Link {
        path: RelPath,
        new_parent: RelPath,
        new_name: Name,
    },
    /// Open a file. With `inline_max > 0`, a regular file of at most that many bytes comes
    /// back whole in `Response::OpenedWithData` (one round trip for small files).
    ///
    /// With `staged` and write access, writes through the handle go to a hidden staging
    /// file and reach the real file only on `Commit` (or `Fsync`): if the connection dies
    /// first, the file keeps its previous content. Reads and `GetAttr` through the handle
    /// see the staged data. A file that is empty once opened is written directly.
    Open {
        path: RelPath,
        flags: OpenFlags,
        inline_max: u32,
        staged: bool,
    },
    Create {
        parent: RelPath,
        name: Name,
        mode: u32,
        umask: u32,
        flags: OpenFlags,
    },
    Read {
        handle: u64,
        offset: u64,
        len: u32,
    },
    Write {
        handle: u64,
        offset: u64,
        #[serde(with = "shared_bytes")]
        data: bytes::Bytes,
    },
    /// Commits staged writes first (see `Open`), then fsync/fdatasync.
    Fsync {
        handle: u64,
        datasync: bool,
    },
    /// Apply the staged writes and size changes of `handle` to the real file, then set its
    /// mtime to when the last write arrived. Replies `Response::Attr` of the real file.
    /// A handle without staged changes just replies its attributes.
    Commit {
        handle: u64,
    },
    Fallocate {
        handle: u64,
        offset: u64,
        len: u64,
        mode: i32,
    },
    Release {
        handle: u64,
    },
    StatFs {
        path: RelPath,
    },
    /// Replies `Response::Opened` (the attr is the directory's).
    OpenDir {
        path: RelPath,
    },
    /// Next batch of entries (with attributes) from an open directory, in order.
    ReadDir {
        handle: u64,
        max_entries: u32,
    },
    ReleaseDir {
        handle: u64,
    },
    /// Extended attributes of `path` (never following a final symlink). `size == 0` asks
    /// for the length only (`Response::XattrSize`), as getxattr(2) does.
    GetXattr {
        path: RelPath,
        #[serde(with = "byte_vec")]
        name: Vec<u8>,
        size: u32,
    },
    /// NUL-separated names, or the length when `size == 0`.
    ListXattr {
        path: RelPath,
        size: u32,
    },
    SetXattr {
        path: RelPath,
        #[serde(with = "byte_vec")]
        name: Vec<u8>,
        #[serde(with = "byte_vec")]
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        path: RelPath,
        #[serde(with = "byte_vec")]
        name: Vec<u8>,
    },
    /// `OpenDir` and the first `ReadDir` in one round trip: replies `Response::Listing`.
    /// When the whole directory fits, the server keeps no handle (`handle == 0`).
    ListDir {
        path: RelPath,
        max_entries: u32,
        /// Asked ahead of need (a prefetch): the server answers `EAGAIN` rather than
        /// use one of the watches kept for directories clients look into, when the
        /// directory is not watched yet and only those are left (the answer would not
        /// be covered by events, and a kept listing must be).
        speculative: bool,
    },
    /// The client has applied everything up to `Event::Barrier { id }` (its caches and
    /// its kernel's are invalidated). Replies `Ok`.
    BarrierAck {
        id: u64,
    },
    /// `copy_file_range(2)` done by the server: copies up to `len` bytes (at most
    /// [`MAX_COPY`] per request) from `src` at `src_offset` to `dst` at `dst_offset`,
    /// through the handles as their reads and writes would go (a staged `dst` gets the
    /// bytes in its staging file, a staged `src` gives its staged bytes). Replies
    /// `Response::Written` with the bytes copied; fewer than asked means `src` ended.
    /// Only with [`caps::COPY_RANGE`].
    CopyRange {
        src: u64,
        src_offset: u64,
        dst: u64,
        dst_offset: u64,
        len: u64,
    },
    /// The whole content of small regular files of directory `dir` (at most
    /// [`MAX_SMALL_FILES`] names; files larger than `max_size` are left out, and so is
    /// anything that is not a regular file, cannot be opened, or changed while read;
    /// at most [`MAX_IO`] bytes of data in all). Replies `Response::SmallFiles`. For a
    /// client reading its way through a directory. Only with [`caps::READ_SMALL`].
    ReadSmall {
        dir: RelPath,
        names: Vec<Name>,
        max_size: u32,
    },
    /// Where directories `nodes` (server node ids, [`Attr::ino`]; at most
    /// [`MAX_LOCATE`]) are now: replies `Response::Located` with a path for each, in
    /// order, checked to lead to it at the time of the answer, or `None` where the
    /// server does not know (not watched, moved out of its sight, removed). For a client
    /// whose path to a directory its kernel holds went stale: an event reported its
    /// name gone, and requests go by path. Only with [`caps::LOCATE`].
    Locate {
        nodes: Vec<u64>,
    },
    /// `Lookup`, answered only if `parent` still leads to directory `parent_node` (a
    /// server node id, [`Attr::ino`]), else `ESTALE`. Requests go by path, and a client's
    /// path to a directory can be stale until the event of its rename comes: a plain
    /// lookup then answers for another directory's entry, which the client would file
    /// under this one. The check is on the directory the server looked in, so the
    /// answer is this directory's. Only with [`caps::CHECKED_LOOKUP`].
    LookupIn {
        parent: RelPath,
        parent_node: u64,
        name: Name,
    },
}

impl Request {
    /// Short name for logs and statistics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Lookup { .. } => "lookup",
            Request::GetAttr { .. } => "getattr",
            Request::SetAttr { .. } => "setattr",
            Request::ReadLink { .. } => "readlink",
            Request::MkNod { .. } => "mknod",
            Request::MkDir { .. } => "mkdir",
            Request::Unlink { .. } => "unlink",
            Request::RmDir { .. } => "rmdir",
            Request::Symlink { .. } => "symlink",
            Request::Rename { .. } => "rename",
            Request::Link { .. } => "link",
            Request::Open { .. } => "open",
            Request::Create { .. } => "create",
            Request::Read { .. } => "read",
            Request::Write { .. } => "write",
            Request::Fsync { .. } => "fsync",
            Request::Commit { .. } => "commit",
            Request::Fallocate { .. } => "fallocate",
            Request::Release { .. } => "release",
            Request::StatFs { .. } => "statfs",
            Request::OpenDir { .. } => "opendir",
            Request::ReadDir { .. } => "readdir",
            Request::ReleaseDir { .. } => "releasedir",
            Request::GetXattr { .. } => "getxattr",
            Request::ListXattr { .. } => "listxattr",
            Request::SetXattr { .. } => "setxattr",
            Request::RemoveXattr { .. } => "removexattr",
            Request::BarrierAck { .. } => "barrier_ack",
            Request::ListDir { .. } => "listdir",
            Request::CopyRange { .. } => "copy_range",
            Request::ReadSmall { .. } => "read_small",
            Request::Locate { .. } => "locate",
            // (The same call, counted as one.)
            Request::LookupIn { .. } => "lookup",
        }
    }

    /// Whether the request changes the export (refused with EROFS on a read-only export).
    pub fn is_mutation(&self) -> bool {
        match self {
            Request::SetAttr { .. }
            | Request::MkNod { .. }
            | Request::MkDir { .. }
            | Request::Unlink { .. }
            | Request::RmDir { .. }
            | Request::Symlink { .. }
            | Request::Rename { .. }
            | Request::Link { .. }
            | Request::Create { .. }
            | Request::Write { .. }
            | Request::Commit { .. }
            | Request::Fallocate { .. }
            | Request::CopyRange { .. }
            | Request::SetXattr { .. }
            | Request::RemoveXattr { .. } => true,
            Request::Open { flags, .. } => {
                let acc = flags & 0o3;
                acc != 0 || flags & 0o1000 != 0 // O_WRONLY/O_RDWR or O_TRUNC
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Name,
    pub attr: Attr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Pong,
    Ok,
    Attr(Attr),
    Opened {
        handle: u64,
        attr: Attr,
    },
    Data(#[serde(with = "shared_bytes")] bytes::Bytes),
    Written {
        len: u32,
    },
    Dir {
        entries: Vec<DirEntry>,
        eof: bool,
    },
    StatFs(StatFs),
    /// `Open` of a small regular file: the handle plus the whole content, read after the
    /// attributes were taken (`data.len() == attr.size`).
    OpenedWithData {
        handle: u64,
        attr: Attr,
        #[serde(with = "byte_vec")]
        data: Vec<u8>,
    },
    /// Answer to a size query (`GetXattr`/`ListXattr` with `size == 0`).
    XattrSize(u32),
    /// Answer to `ListDir`: the first entries; continue with `ReadDir { handle }` unless
    /// `eof` (then `handle` is 0 and there is nothing to release).
    Listing {
        handle: u64,
        attr: Attr,
        entries: Vec<DirEntry>,
        eof: bool,
    },
    /// The reply to a request that changed entries of directory `dir` (create, mkdir,
    /// mknod, symlink, link, unlink, rmdir), with the directory's attributes after the
    /// change: the kernel drops its copy of them after such a call, and the client can
    /// answer the `GetAttr` that follows without a round trip.
    InDir {
        dir: Attr,
        reply: Box<Response>,
    },
    /// Answer to `ReadSmall`: the files read, each with its attributes taken after the
    /// read (data and attributes agree).
    SmallFiles(Vec<SmallFile>),
    /// Answer to a repeat ([`OnceKey::repeat`]) the server does not remember: it may
    /// have run before (on a server since restarted, say); it did not run now.
    NotRemembered,
    /// Answer to `Locate`: each directory's path now, if known.
    Located(Vec<Option<RelPath>>),
}

impl Response {
    /// File data (`Data`) from the bytes read.
    pub fn data(bytes: Vec<u8>) -> Response {
        Response::Data(bytes.into())
    }
}

/// One file of `Response::SmallFiles`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmallFile {
    pub name: Name,
    pub attr: Attr,
    #[serde(with = "byte_vec")]
    pub data: Vec<u8>,
}

impl Response {
    /// The reply without a [`Response::InDir`] wrapper.
    pub fn inner(&self) -> &Response {
        match self {
            Response::InDir { reply, .. } => reply.inner(),
            r => r,
        }
    }

    /// Mark every attribute the reply carries [`Attr::uncovered`].
    pub fn mark_uncovered(&mut self) {
        self.attrs_mut(&mut |a: &mut Attr| a.uncovered = true);
    }

    /// Apply `mark` to every attribute the reply carries.
    pub fn attrs_mut(&mut self, mark: &mut impl FnMut(&mut Attr)) {
        match self {
            Response::Attr(a)
            | Response::Opened { attr: a, .. }
            | Response::OpenedWithData { attr: a, .. } => mark(a),
            Response::Dir { entries, .. } => entries.iter_mut().for_each(|e| mark(&mut e.attr)),
            Response::Listing { attr, entries, .. } => {
                mark(attr);
                entries.iter_mut().for_each(|e| mark(&mut e.attr));
            }
            Response::InDir { dir, reply } => {
                mark(dir);
                reply.attrs_mut(mark);
            }
            Response::SmallFiles(files) => files.iter_mut().for_each(|f| mark(&mut f.attr)),
            Response::Pong
            | Response::Ok
            | Response::Data(_)
            | Response::Written { .. }
            | Response::StatFs(_)
            | Response::XattrSize(_)
            | Response::NotRemembered
            | Response::Located(_) => {}
        }
    }
}

/// A server-to-client message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The answer to request `id`; an `Err` carries a Linux errno value.
    Reply {
        id: u64,
        result: Result<Response, i32>,
    },
    /// Unsolicited notification (only sent when [`caps::EVENTS`] was negotiated).
    Event(Event),
}

impl ServerFrame {
    /// A `Data` reply of at least `min` bytes, split into the reply with its data left
    /// empty and the data: the reply's encoding then ends with that empty byte string,
    /// so the data can be sent after it from its own buffer
    /// ([`encode_frame`](crate::codec::encode_frame) with the data's length). Any other
    /// frame comes back whole.
    pub fn split_data(self, min: usize) -> (ServerFrame, Option<bytes::Bytes>) {
        match self {
            ServerFrame::Reply {
                id,
                result: Ok(Response::Data(data)),
            } if data.len() >= min && !data.is_empty() => (
                ServerFrame::Reply {
                    id,
                    result: Ok(Response::Data(bytes::Bytes::new())),
                },
                Some(data),
            ),
            frame => (frame, None),
        }
    }
}

/// Server-pushed notifications (only with [`caps::EVENTS`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Entry `name` of directory `parent` was created, removed, renamed, written or had its
    /// attributes changed; `name: None` means the directory itself. `attr` is the entry's
    /// state once the change happened (`None`: it no longer exists, or the directory
    /// moved before the server looked), so a client that made the change itself can see
    /// it already knows this version.
    Changed {
        parent: RelPath,
        /// The directory `parent` named when the change was seen, by node id (as
        /// [`Attr::ino`]): a client places the event by it, since a path it holds may
        /// name another directory by now (a rename it has not heard of yet).
        dir: u64,
        name: Option<Name>,
        attr: Option<Attr>,
    },
    /// Events may have been lost (queue overflow, a slow client): revalidate everything.
    Resync,
    /// Another client committed new content of the file with these attributes (the
    /// inode is `attr.ino`). Drop what is cached of it, then answer
    /// `Request::BarrierAck { id }`: the committing client's `close()` returns only once
    /// every other client has (or a short timeout passed), which is what makes
    /// close-to-open hold without a round trip on open. Without `attr`: apply every
    /// event sent before, then answer (another client moved a directory; its
    /// `rename()` returns once every other client dropped the old name).
    Barrier { id: u64, attr: Option<Attr> },
    /// From now on the server cannot report every change (it could not watch a
    /// directory: the kernel's watch limit, say): the stream still carries what it sees,
    /// but a client must revalidate everything it holds and stop trusting the absence
    /// of events until it reconnects (a server in this state then offers no
    /// [`caps::EVENTS`]). Sent before any reply that depends on the missing watch.
    Incomplete,
    /// The server stopped watching directories `dirs` (node ids, as [`Attr::ino`]): they
    /// moved where the server cannot follow them (a directory and the watched ones
    /// beneath it, in one event). Nothing reports changes in them any more: drop what is
    /// cached of them and of their entries. (Looked up again under a new path, a
    /// directory is watched again.)
    Unwatched { dirs: Vec<u64> },
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::codec::{decode_body, encode_body};

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Old(#[serde(with = "serde_bytes")] Vec<u8>);

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct New(#[serde(with = "byte_vec")] Vec<u8>);

    /// `byte_vec` changes how byte strings are read, not the wire format: peers built
    /// with `serde_bytes` on both sides understand it.
    #[test]
    fn byte_strings_keep_their_encoding() {
        let v: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let old = encode_body(&Old(v.clone())).unwrap();
        assert_eq!(encode_body(&New(v.clone())).unwrap(), old);
        assert_eq!(decode_body::<New>(&old).unwrap(), New(v.clone()));
        assert_eq!(decode_body::<Old>(&old).unwrap(), Old(v));
        let empty = encode_body(&Old(Vec::new())).unwrap();
        assert_eq!(decode_body::<New>(&empty).unwrap(), New(Vec::new()));
    }

    #[test]
    fn a_byte_string_longer_than_its_frame_is_refused() {
        let mut body = encode_body(&New(vec![7; 100])).unwrap();
        body.truncate(50);
        assert!(decode_body::<New>(&body).is_err());
    }
}
