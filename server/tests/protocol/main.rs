//! Protocol-level tests of `ferryd`: an in-process server on 127.0.0.1:0 over a temporary
//! directory, spoken to with the raw wire protocol. One test binary, one module per area.

#![allow(clippy::unwrap_used)]

mod cli;
mod confinement;
mod connection;
mod events;
mod handshake;
mod harness;
mod io;
mod kept;
mod meta;
mod perf;
mod staged;
mod xattr;
