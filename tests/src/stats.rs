//! `ferry stats MOUNTPOINT --json`, parsed: the counters a mount's daemon keeps (requests
//! by kind, bytes from the server and from the cache, cache size and cap, events). Tests
//! use them to check *how* something was served, not only that the bytes are right.
//!
//! Every call runs the real `ferry stats` command: what is checked is what a user sees.

use std::fmt;
use std::path::Path;

use serde_json::{Map, Value};

use crate::process::run;

/// One snapshot of a mount's counters.
#[derive(Clone)]
pub struct Stats {
    map: Map<String, Value>,
}

impl Stats {
    /// Runs `ferry stats MOUNTPOINT --json`; panics unless it exits 0 with a JSON object.
    #[track_caller]
    pub fn of(mountpoint: &Path) -> Stats {
        let out = run(crate::bins::ferry()
            .arg("stats")
            .arg(mountpoint)
            .arg("--json"));
        out.assert_success();
        match serde_json::from_slice::<Value>(&out.stdout) {
            Ok(Value::Object(map)) => Stats { map },
            Ok(other) => panic!("`ferry stats --json` printed a non-object: {other}\n{out}"),
            Err(e) => panic!("`ferry stats --json` printed invalid JSON ({e}):\n{out}"),
        }
    }

    /// Whether the counter `key` is present.
    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// The counter `key`; panics if it is absent or not an unsigned integer.
    #[track_caller]
    pub fn get(&self, key: &str) -> u64 {
        match self.map.get(key) {
            Some(v) => v
                .as_u64()
                .unwrap_or_else(|| panic!("stats: {key} is not a u64: {v}\n{self}")),
            None => panic!("stats: no {key}\n{self}"),
        }
    }

    /// The counter `key`, 0 when absent (`requests.<kind>` appear with the first request
    /// of that kind); panics if present but not an unsigned integer.
    #[track_caller]
    pub fn get_or_zero(&self, key: &str) -> u64 {
        if self.has(key) { self.get(key) } else { 0 }
    }

    /// The boolean `key`; panics if it is absent or not a boolean.
    #[track_caller]
    pub fn flag(&self, key: &str) -> bool {
        match self.map.get(key) {
            Some(v) => v
                .as_bool()
                .unwrap_or_else(|| panic!("stats: {key} is not a boolean: {v}\n{self}")),
            None => panic!("stats: no {key}\n{self}"),
        }
    }

    /// All entries.
    pub fn map(&self) -> &Map<String, Value> {
        &self.map
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.map {
            writeln!(f, "  {k} = {v}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
