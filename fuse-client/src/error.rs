//! Client-side errors and the one place they become errno values.
//!
//! Two kinds never mix: [`TransportError`] (the connection failed; the request may or may
//! not have run) and a server errno (the server ran the request and its filesystem said
//! no). [`FsError`] carries either to the FUSE adapter, which calls [`FsError::errno`].

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, #[source] io::Error),
    #[error("cannot connect to {0}: timed out")]
    ConnectTimeout(String),
    #[error("server did not complete the handshake in time")]
    HandshakeTimeout,
    #[error("server refused the connection: {0}")]
    Refused(String),
    #[error("connection to the server lost")]
    Disconnected,
    #[error("file handle belongs to a connection that was lost")]
    StaleHandle,
    #[error("client is shutting down")]
    Closed,
    #[error("network I/O: {0}")]
    Io(#[source] io::Error),
    #[error("unexpected reply from server")]
    Protocol,
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{}", errno_text(*.0))]
    Errno(i32),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl FsError {
    /// The errno a local program sees. Server errnos pass through unchanged, so `open`
    /// fails with exactly what the server's filesystem said. Transport failures are EIO
    /// (the call may or may not have happened; EIO is what programs treat as "the device
    /// failed" and report rather than retry), except a timed-out connect (ETIMEDOUT) and a
    /// handle opened on a connection since lost (EBADF would blame the program; EIO does not).
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Errno(e) if *e > 0 => *e,
            FsError::Errno(_) => libc::EIO,
            FsError::Transport(TransportError::ConnectTimeout(_)) => libc::ETIMEDOUT,
            FsError::Transport(_) => libc::EIO,
        }
    }
}

pub fn errno_text(e: i32) -> String {
    io::Error::from_raw_os_error(e).to_string()
}

pub type FsResult<T> = Result<T, FsError>;
