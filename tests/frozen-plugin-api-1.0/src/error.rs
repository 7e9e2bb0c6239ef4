//! The error a plugin returns; it crosses the boundary as its message.

/// What went wrong inside a plugin or in a backend op it called.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// Parameters that do not fit the method (wrong value, missing base, wrong model count).
    InvalidParams(String),
    /// A backend op failed (shape mismatch, unsupported dtype, out of memory).
    Backend(String),
    /// The host is older than the op or feature the plugin needs.
    Unsupported(String),
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::InvalidParams(m) => write!(f, "invalid parameters: {m}"),
            Error::Backend(m) => write!(f, "tensor op failed: {m}"),
            Error::Unsupported(m) => write!(f, "unsupported: {m}"),
            Error::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// Result of plugin code.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidParams`].
    pub fn params(msg: impl Into<String>) -> Self {
        Error::InvalidParams(msg.into())
    }
}
