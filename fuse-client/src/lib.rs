//! `ferry`: mounts a `ferryd` export through FUSE and offers the seed program's commands.
//!
//! - [`conn`]: one multiplexed, self-healing connection to the server.
//! - [`fs`]: the filesystem core (kernel inodes and handles to protocol requests).
//! - [`nodes`]: the inode table.
//! - [`fuse`]: the thin fuser adapter; the only module that talks to the kernel.
//! - [`mount`]: `ferry mount`/`umount`, the background daemon.
//! - [`cli`]: `ls`, `get`, `put`, `shell` without FUSE.
//! - [`cache`]: the persistent on-disk data cache.
//! - [`stats`]: `ferry stats` over a Unix socket.
//! - [`error`]: transport vs filesystem errors, mapped to errno in one place.
//!
//! The client must never hang a caller forever on a dead server, never report a write as
//! done before the server acknowledged it, and never panic on bytes from the network.

pub mod cache;
pub mod cli;
pub mod conn;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod mount;
pub mod nodes;
pub mod passthrough;
pub mod stats;

/// `host`, `host:port` or `[v6]:port` → `host:port`, adding the default port.
pub fn remote_addr(remote: &str) -> String {
    let has_port = match remote.rsplit_once(':') {
        Some((host, port)) => {
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    if has_port {
        remote.to_string()
    } else if remote.contains(':') && !remote.starts_with('[') {
        format!("[{remote}]:{}", ferry_common::DEFAULT_PORT)
    } else {
        format!("{remote}:{}", ferry_common::DEFAULT_PORT)
    }
}

#[cfg(test)]
mod tests {
    use super::remote_addr;

    #[test]
    fn remote_forms() {
        assert_eq!(remote_addr("host"), "host:7420");
        assert_eq!(remote_addr("host:99"), "host:99");
        assert_eq!(remote_addr("127.0.0.1:0"), "127.0.0.1:0");
        assert_eq!(remote_addr("[::1]:5"), "[::1]:5");
        assert_eq!(remote_addr("::1"), "[::1]:7420");
    }
}
