//! The answers table's log in the state directory: every change of the table is
//! appended as it happens (before the change it records runs, or before its answer
//! leaves), so that a server started again after its process died rebuilds the table
//! and answers repeats of changes the dead process ran.
//!
//! File `answers` in the export's state folder: a header (magic, format, the protocol
//! version its answers are encoded in, the machine's boot id, the table's
//! `Welcome::instance`), then frames of a 4-byte little-endian length and one [`Event`]
//! (bincode, as on the wire, bounded by `MAX_FRAME`). Only the last frame can be cut
//! short (the process died in its `write`): it is dropped. Anything else unreadable
//! makes the whole log unusable (a new table, with a new instance): a log missing
//! events in the middle would take a change that ran for one that never arrived. When
//! the log has grown past [`COMPACT_BYTES`] (and twice its last compaction) it is
//! written anew with only what the table holds (`answers.new`, then renamed over it).
//!
//! Not fsynced: like the undo and redo records, it guards against the process dying,
//! not the machine. A log written before the machine's last boot is not taken over (its
//! last events may never have reached the disk).

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ferry_common::codec::{decode_body, encode_body};
use ferry_common::proto::{MAX_FRAME, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};

use super::Answer;

const MAGIC: &[u8; 16] = b"ferryd answers\n\0";
const FORMAT: u32 = 4;
/// `/proc/sys/kernel/random/boot_id`: a UUID in text.
const BOOT_ID_LEN: usize = 36;
const HEADER_LEN: usize = MAGIC.len() + 4 + 4 + BOOT_ID_LEN + 8;
const NAME: &str = "answers";
const NEW_NAME: &str = "answers.new";

/// Size past which the log is compacted (if also twice its last compaction). The
/// state folder is often in `/run`, a tmpfs: memory. One busy mount's table compacts
/// to ~150 KiB (1,024 answers of ~150 bytes), written every ~5,000 changes of names.
pub(super) const COMPACT_BYTES: u64 = 1024 * 1024;

/// One change of the table.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Event<'a> {
    /// A session's record was made (or, in a compacted log, is as given).
    Session {
        id: u64,
        first: u64,
        forgotten: Option<u64>,
    },
    /// A session's record was forgotten whole.
    Evict { id: u64 },
    /// A change is about to run, having found what `probe` says.
    Begin {
        session: u64,
        seq: u64,
        probe: Option<super::Probe>,
    },
    /// A key's answer.
    Done {
        session: u64,
        seq: u64,
        answer: Cow<'a, Answer>,
    },
    /// A change of names without a key is about to run (`begun`), or ran.
    Other { begun: bool },
}

impl Event<'_> {
    /// Whether it is a change's beginning or end (they order the probes).
    pub(super) fn is_change(&self) -> bool {
        matches!(
            self,
            Event::Begin { .. } | Event::Done { .. } | Event::Other { .. }
        )
    }
}

/// The open log of a running server.
#[derive(Debug)]
pub(super) struct Log {
    file: File,
    dir: PathBuf,
    instance: u64,
    bytes: u64,
    compact_at: u64,
}

/// What an earlier process left: its instance and its events, in order.
pub(super) struct Loaded {
    pub instance: u64,
    pub events: Vec<Event<'static>>,
    /// The last frame was cut short (the process died writing it): dropped.
    pub torn: bool,
}

/// This boot of the machine, or `None` if unknown (then no log is taken over).
fn boot_id() -> Option<[u8; BOOT_ID_LEN]> {
    let text = std::fs::read("/proc/sys/kernel/random/boot_id").ok()?;
    text.get(..BOOT_ID_LEN)?.try_into().ok()
}

/// The log left in `dir`, if any. `Ok(None)`: there is none (or only an unfinished
/// compaction, removed). An error: there is one, but it cannot be used whole (not a
/// log, another format or protocol, another boot, an unreadable event before its end).
pub(super) fn load(dir: &Path) -> io::Result<Option<Loaded>> {
    let _ = std::fs::remove_file(dir.join(NEW_NAME));
    let mut bytes = Vec::new();
    match File::open(dir.join(NAME)) {
        Ok(mut f) => f.read_to_end(&mut bytes)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let header = bytes
        .get(..HEADER_LEN)
        .ok_or_else(|| bad("not an answers log"))?;
    let (magic, rest) = header.split_at(MAGIC.len());
    let (format, rest) = rest.split_at(4);
    let (protocol, rest) = rest.split_at(4);
    let (boot, instance) = rest.split_at(BOOT_ID_LEN);
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if magic != MAGIC {
        return Err(bad("not an answers log"));
    }
    if word(format) != FORMAT || word(protocol) != PROTOCOL_VERSION {
        return Err(bad("written by another version of ferryd"));
    }
    if boot_id().is_none_or(|now| now != boot) {
        return Err(bad("written before this machine's last boot"));
    }
    let instance = u64::from_le_bytes(instance.try_into().map_err(|_| bad("header"))?);
    let mut events = Vec::new();
    let mut at = HEADER_LEN;
    let mut torn = false;
    while at < bytes.len() {
        // Cut short: the length, or the event it announces, runs past the end.
        let Some(len) = bytes.get(at..at + 4) else {
            torn = true;
            break;
        };
        let len = word(len) as usize;
        if len > MAX_FRAME {
            return Err(bad("an event too large"));
        }
        let Some(body) = bytes.get(at + 4..at + 4 + len) else {
            torn = true;
            break;
        };
        let event = decode_body::<Event<'static>>(body).map_err(|_| bad("an unreadable event"))?;
        events.push(event);
        at += 4 + len;
    }
    Ok(Some(Loaded {
        instance,
        events,
        torn,
    }))
}

fn frame(e: &Event<'_>, out: &mut Vec<u8>) -> io::Result<()> {
    let body = encode_body(e)?;
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("event too large"))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

impl Log {
    /// A new log in `dir` holding `events` under `instance`, in place of any other
    /// (written aside, then renamed over it: a crash meanwhile leaves the old one).
    pub(super) fn create(dir: &Path, instance: u64, events: &[Event<'_>]) -> io::Result<Log> {
        let mut buf = Vec::with_capacity(HEADER_LEN + 64 * events.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&FORMAT.to_le_bytes());
        buf.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        // Unknown: zeros, which no later start takes for its own boot.
        buf.extend_from_slice(&boot_id().unwrap_or([0; BOOT_ID_LEN]));
        buf.extend_from_slice(&instance.to_le_bytes());
        for e in events {
            frame(e, &mut buf)?;
        }
        let new = dir.join(NEW_NAME);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&new)?;
        file.write_all(&buf)?;
        std::fs::rename(&new, dir.join(NAME))?;
        let bytes = buf.len() as u64;
        Ok(Log {
            file,
            dir: dir.to_path_buf(),
            instance,
            bytes,
            compact_at: COMPACT_BYTES.max(2 * bytes),
        })
    }

    pub(super) fn instance(&self) -> u64 {
        self.instance
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Append `e` (one `write`: a process that dies has written it whole or cut short).
    pub(super) fn append(&mut self, e: &Event<'_>) -> io::Result<()> {
        let mut buf = Vec::with_capacity(64);
        frame(e, &mut buf)?;
        self.file.write_all(&buf)?;
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Whether the log has grown enough to be written anew.
    pub(super) fn wants_compaction(&self) -> bool {
        self.bytes > self.compact_at
    }

    #[cfg(test)]
    pub(super) fn compact_sooner(&mut self, bytes: u64) {
        self.compact_at = bytes;
    }

    /// Remove the log: what it would tell a later start is no longer all that ran.
    /// If it cannot be removed, it is emptied (no later start takes over a log without
    /// its header).
    pub(super) fn discard(self) {
        let path = self.dir.join(NAME);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
            && let Err(e) = self.file.set_len(0)
        {
            tracing::error!(
                "cannot remove or empty the answers log {}: {e}; remove it before the next \
                 start, which could otherwise run a change twice",
                path.display()
            );
        }
    }
}
