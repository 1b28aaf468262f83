//! A crash at a chosen point, for tests of what a restart finds (`ferryd --die-at
//! POINT`, a hidden option): the process kills itself with `SIGKILL` the first time it
//! gets there, as a crash would, with nothing closed or flushed.
//!
//! Points: `before-KIND` and `after-KIND`, where KIND is a keyed change's
//! [`Request::kind`](ferry_common::Request::kind) (`rename`, `create`, ...): after its
//! `Begin` is logged and before its system calls run, or after they ran and before
//! its answer is logged.

use std::sync::OnceLock;

static POINT: OnceLock<String> = OnceLock::new();

/// Die at `point` (set once, before serving); an error names the points there are.
pub fn set(point: String) -> Result<(), String> {
    const KINDS: [&str; 8] = [
        "create", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link",
    ];
    let known = ["before", "after"].iter().any(|stage| {
        point
            .strip_prefix(stage)
            .and_then(|p| p.strip_prefix('-'))
            .is_some_and(|kind| KINDS.contains(&kind))
    });
    if !known {
        return Err(format!(
            "unknown --die-at point {point:?}: before-KIND or after-KIND, KIND one of {}",
            KINDS.join(", ")
        ));
    }
    let _ = POINT.set(point);
    Ok(())
}

/// The change `kind` is at `stage` (`before` or `after`): die here if told to.
pub fn reached(stage: &str, kind: &str) {
    let Some(point) = POINT.get() else {
        return;
    };
    if point.strip_prefix(stage).and_then(|p| p.strip_prefix('-')) == Some(kind) {
        tracing::warn!("dying at {point} (--die-at)");
        crate::sys::kill_self();
    }
}
