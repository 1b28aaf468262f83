//! File content helpers: write and close with the close checked, and compare contents
//! with a message that says where they differ (not two megabytes of bytes).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Writes `data` to `path` (created or truncated) and closes it, reporting a failed
/// close: `fs::write` drops its `File`, which ignores what close says, and on a network
/// filesystem close is where a failed upload is reported.
pub fn write_closed(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    crate::sys::close(f)
}

/// Panics unless `got == want`, naming both lengths and the first differing offset.
#[track_caller]
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: got {} bytes, want {}; first difference at offset {at}",
            got.len(),
            want.len()
        );
    }
}
