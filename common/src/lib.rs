//! The ferry wire protocol, shared by `ferryd` and `ferry`.
//!
//! - [`proto`]: every message, the handshake, capability bits, limits.
//! - [`codec`]: bytes to frames (length prefix + size-limited bincode).
//! - [`path`]: validation of names and relative paths received from a peer.
//!
//! This crate must never do file or network I/O and never depends on fuser: it is the
//! single source of truth for what crosses the wire, testable on its own. Nothing in it
//! may panic on bytes from the network.

pub mod codec;
pub mod path;
pub mod proto;

pub use proto::*;
