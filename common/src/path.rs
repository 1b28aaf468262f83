//! Validation of names and relative paths received from the network. Pure functions: the
//! server calls them before touching the filesystem, the client before sending.

use crate::proto::{Name, RelPath};

/// Longest path the protocol carries (Linux `PATH_MAX`).
pub const MAX_PATH: usize = 4096;

/// Why a name or path was refused; mapped to errno by [`PathError::errno`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty name")]
    Empty,
    #[error("name contains '/' or NUL")]
    BadByte,
    #[error("'.' or '..' is not allowed here")]
    Dots,
    #[error("path too long")]
    TooLong,
}

impl PathError {
    pub fn errno(self) -> i32 {
        match self {
            PathError::TooLong => libc_enametoolong(),
            _ => libc_einval(),
        }
    }
}

// common/ does not depend on libc; these are the Linux values.
const fn libc_einval() -> i32 {
    22
}
const fn libc_enametoolong() -> i32 {
    36
}

/// A valid single component: non-empty, no `/` or NUL, not `.` or `..`. Length is left to
/// the server's filesystem so the caller gets the same ENAMETOOLONG a local disk gives.
pub fn check_name(name: &[u8]) -> Result<(), PathError> {
    if name.is_empty() {
        return Err(PathError::Empty);
    }
    if name == b"." || name == b".." {
        return Err(PathError::Dots);
    }
    if name.iter().any(|&b| b == b'/' || b == 0) {
        return Err(PathError::BadByte);
    }
    if name.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    Ok(())
}

/// A valid relative path: empty (the root) or components that each pass [`check_name`].
pub fn check_path(path: &[u8]) -> Result<(), PathError> {
    if path.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if path.is_empty() {
        return Ok(());
    }
    path.split(|&b| b == b'/').try_for_each(check_name)
}

impl RelPath {
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// `self/name`.
    pub fn join(&self, name: &[u8]) -> RelPath {
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        RelPath(v)
    }

    /// Split into parent path and last component; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, Name)> {
        if self.0.is_empty() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some((
                RelPath(self.0[..i].to_vec()),
                Name(self.0[i + 1..].to_vec()),
            )),
            None => Some((RelPath::root(), Name(self.0.clone()))),
        }
    }

    /// Parse a user-typed path (`/a/b`, `a//b/`, `./a`): leading, trailing and repeated
    /// slashes and `.` components are dropped; `..` is refused.
    pub fn parse_user(s: &str) -> Result<RelPath, PathError> {
        let mut out = RelPath::root();
        for comp in s.as_bytes().split(|&b| b == b'/') {
            if comp.is_empty() || comp == b"." {
                continue;
            }
            check_name(comp)?;
            out = out.join(comp);
        }
        check_path(&out.0)?;
        Ok(out)
    }
}

impl Name {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Name, PathError> {
        let v = bytes.into();
        check_name(&v)?;
        Ok(Name(v))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name(b"a").is_ok());
        assert!(check_name(b"...").is_ok());
        assert_eq!(check_name(b""), Err(PathError::Empty));
        assert_eq!(check_name(b"."), Err(PathError::Dots));
        assert_eq!(check_name(b".."), Err(PathError::Dots));
        assert_eq!(check_name(b"a/b"), Err(PathError::BadByte));
        assert_eq!(check_name(b"a\0"), Err(PathError::BadByte));
    }

    #[test]
    fn paths() {
        assert!(check_path(b"").is_ok());
        assert!(check_path(b"a/b/c").is_ok());
        assert!(check_path(b"/a").is_err());
        assert!(check_path(b"a//b").is_err());
        assert!(check_path(b"a/../b").is_err());
        assert!(check_path(b"a/").is_err());
        assert_eq!(
            check_path(&vec![b'a'; MAX_PATH + 1]),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn user_paths() {
        assert_eq!(RelPath::parse_user("/a//b/./c/").unwrap().0, b"a/b/c");
        assert!(RelPath::parse_user("/").unwrap().is_root());
        assert!(RelPath::parse_user("a/../b").is_err());
        let p = RelPath::parse_user("x/y").unwrap();
        let (parent, name) = p.split_last().unwrap();
        assert_eq!(parent.0, b"x");
        assert_eq!(name.0, b"y");
        assert_eq!(p.join(b"z").0, b"x/y/z");
    }
}
