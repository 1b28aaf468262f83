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
    #[error("server silent for longer than the timeout; connection dropped")]
    Silent,
    #[error("file handle belongs to a connection that was lost")]
    StaleHandle,
    #[error("client is shutting down")]
    Closed,
    #[error("network I/O: {0}")]
    Io(#[source] io::Error),
    #[error("unexpected reply from server")]
    Protocol,
}

impl TransportError {
    /// The same failure for another caller (I/O errors keep their kind and text).
    pub fn again(&self) -> TransportError {
        fn io_again(e: &io::Error) -> io::Error {
            io::Error::new(e.kind(), e.to_string())
        }
        match self {
            TransportError::Connect(a, e) => TransportError::Connect(a.clone(), io_again(e)),
            TransportError::ConnectTimeout(a) => TransportError::ConnectTimeout(a.clone()),
            TransportError::HandshakeTimeout => TransportError::HandshakeTimeout,
            TransportError::Refused(r) => TransportError::Refused(r.clone()),
            TransportError::Disconnected => TransportError::Disconnected,
            TransportError::Silent => TransportError::Silent,
            TransportError::StaleHandle => TransportError::StaleHandle,
            TransportError::Closed => TransportError::Closed,
            TransportError::Io(e) => TransportError::Io(io_again(e)),
            TransportError::Protocol => TransportError::Protocol,
        }
    }

    /// A failure to reach a server that may be back in a moment (restarting, or the
    /// network briefly gone): worth another attempt while the caller can still wait.
    /// Timeouts are not: they used up the wait already.
    pub fn transient(&self) -> bool {
        use io::ErrorKind as K;
        match self {
            TransportError::Connect(_, e) | TransportError::Io(e) => matches!(
                e.kind(),
                K::ConnectionRefused
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::NotConnected
                    | K::BrokenPipe
                    | K::UnexpectedEof
                    | K::NetworkUnreachable
                    | K::HostUnreachable
                    | K::NetworkDown
                    | K::AddrNotAvailable
            ),
            _ => false,
        }
    }

    /// The connection was closed or reset under a request already sent (or about to
    /// be): it may or may not have run. Not one dropped for silence: its caller has
    /// waited `--timeout` already.
    pub fn dropped(&self) -> bool {
        matches!(
            self,
            TransportError::Disconnected | TransportError::StaleHandle
        )
    }

    /// Like [`TransportError::dropped`], a dropped for silence included: for a keyed
    /// change, which is sent again with its key (the server runs it at most once, so a
    /// repeat costs only the wait).
    pub fn may_have_run(&self) -> bool {
        self.dropped() || matches!(self, TransportError::Silent)
    }
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
    /// The one server errno that does not pass: ENOTCONN (a dead mount inside the export)
    /// would say this mount's own connection is gone, and `ferry mount` unmounts a ferry
    /// mount that says so.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Errno(libc::ENOTCONN) => libc::EIO,
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
