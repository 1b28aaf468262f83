//! POSIX operations through the mount with `std::fs` and libc, each checked against what
//! the export shows on the server's disk: content, metadata and errno.

mod attrs;
mod errors;
mod io;
mod namespace;
