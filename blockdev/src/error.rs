//! The one error type of the block layer.
//!
//! Every fallible operation in vdisk returns [`Error`]: a matchable [`ErrorKind`], a message written for
//! the person reading it (in qemu-img's words where qemu-img has words for the case), and optional
//! context — the path of the file, the byte offset and the operation that failed. The command line turns
//! the kind into an exit code and prints the message; library users match on the kind.
//!
//! Messages never contain the context twice: [`Error::message`] is the text qemu-img would print after
//! its own prefix, and [`Error::context`] is there for programs and for debugging (`{:#}` prints both).

use std::fmt;
use std::io;

/// What went wrong, as a caller needs to distinguish it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A file or a referenced image does not exist.
    NotFound,
    /// The operating system refused access.
    PermissionDenied,
    /// A caller-supplied argument or option is invalid (not the image's fault).
    InvalidArgument,
    /// The bytes are not a valid image of the format (bad magic, impossible header field).
    InvalidImage,
    /// Valid, but uses something vdisk or the format does not support.
    Unsupported,
    /// The image's metadata is inconsistent (found while reading or writing it).
    Corrupt,
    /// A write was attempted on something opened or marked read-only.
    ReadOnly,
    /// Another process holds a conflicting lock on the image.
    Locked,
    /// Another open of the same image in this process holds a conflicting lock (the message is
    /// qemu's, which does not tell the two cases apart; the alternate display does).
    LockedInProcess,
    /// The image is encrypted and no key was given.
    NeedsKey,
    /// The key given does not unlock the image.
    BadKey,
    /// A request reaches past the end of the image or past a format limit.
    OutOfRange,
    /// The device or file system is out of space.
    NoSpace,
    /// The operation was cancelled by its caller.
    Cancelled,
    /// Any other I/O failure reported by the operating system.
    Io,
}

/// Where an error happened: the file, the byte offset in it, and the operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The file (or image name) the operation was working on.
    pub path: Option<String>,
    /// The byte offset in that file, where one applies.
    pub offset: Option<u64>,
    /// A short name of the operation ("read", "write", "open", "fallocate", ...).
    pub operation: Option<&'static str>,
}

/// The block layer's error: a kind, a human message and context.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    context: Context,
    errno: Option<i32>,
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with the given message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), context: Context::default(), errno: None }
    }

    /// An operating-system error from `operation`, with the OS's text as the message
    /// (`strerror` wording, without Rust's "(os error N)" suffix).
    pub fn from_io(operation: &'static str, err: io::Error) -> Self {
        let errno = err.raw_os_error();
        Error {
            kind: kind_of_io(&err),
            message: io_text(&err),
            context: Context { operation: Some(operation), ..Context::default() },
            errno,
        }
    }

    /// An operating-system error for an errno value.
    pub fn from_errno(operation: &'static str, errno: i32) -> Self {
        Self::from_io(operation, io::Error::from_raw_os_error(errno))
    }

    /// Shorthand for [`ErrorKind::InvalidImage`].
    pub fn invalid_image(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidImage, message)
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for [`ErrorKind::Corrupt`].
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for [`ErrorKind::OutOfRange`].
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutOfRange, message)
    }

    /// The error for a write to something read-only.
    pub fn read_only() -> Self {
        Self::from_errno("write", libc::EACCES).with_kind(ErrorKind::ReadOnly)
    }

    /// The error for a cancelled operation.
    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "Operation cancelled")
    }

    /// The kind, for matching.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human message (qemu-img's wording where it has one).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Where the error happened.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The operating system's errno, when the error came from a system call.
    pub fn errno(&self) -> Option<i32> {
        self.errno
    }

    /// Replaces the kind.
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }

    /// Records the file the error concerns (kept if already set by a deeper layer).
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        if self.context.path.is_none() {
            self.context.path = Some(path.into());
        }
        self
    }

    /// Records the byte offset the error concerns (kept if already set).
    pub fn with_offset(mut self, offset: u64) -> Self {
        if self.context.offset.is_none() {
            self.context.offset = Some(offset);
        }
        self
    }

    /// Records the operation (kept if already set).
    pub fn with_operation(mut self, operation: &'static str) -> Self {
        if self.context.operation.is_none() {
            self.context.operation = Some(operation);
        }
        self
    }

    /// Puts `prefix: ` in front of the message, as qemu does when an error travels up a layer
    /// ("Could not open 'x': " + the lower layer's text).
    pub fn prefixed(mut self, prefix: impl fmt::Display) -> Self {
        self.message = format!("{prefix}: {}", self.message);
        self
    }

    /// Replaces the message, keeping kind, errno and context.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if f.alternate() {
            let c = &self.context;
            if let Some(op) = c.operation {
                write!(f, " [operation: {op}")?;
                if let Some(p) = &c.path {
                    write!(f, ", file: {p}")?;
                }
                if let Some(o) = c.offset {
                    write!(f, ", offset: {o}")?;
                }
                f.write_str("]")?;
            }
            if self.kind == ErrorKind::LockedInProcess {
                f.write_str(" [the conflicting lock is held by another open of the image in this process]")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error::from_io("io", err)
    }
}

fn kind_of_io(err: &io::Error) -> ErrorKind {
    match err.raw_os_error() {
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) => ErrorKind::PermissionDenied,
        Some(libc::EROFS) => ErrorKind::ReadOnly,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
        Some(libc::EINVAL) => ErrorKind::InvalidArgument,
        Some(libc::EFBIG) => ErrorKind::OutOfRange,
        Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
        Some(libc::EAGAIN) => ErrorKind::Locked,
        _ => match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
            io::ErrorKind::UnexpectedEof => ErrorKind::OutOfRange,
            _ => ErrorKind::Io,
        },
    }
}

/// The C library's text for an OS error ("No such file or directory"), without Rust's suffix.
pub fn io_text(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => {
            let text = io::Error::from_raw_os_error(code).to_string();
            match text.rfind(" (os error ") {
                Some(cut) => text[..cut].to_string(),
                None => text,
            }
        }
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_use_strerror_text_and_map_kinds() {
        let e = Error::from_errno("open", libc::ENOENT).with_path("x");
        assert_eq!(e.message(), "No such file or directory");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert_eq!(e.context().path.as_deref(), Some("x"));
        assert_eq!(Error::from_errno("w", libc::ENOSPC).kind(), ErrorKind::NoSpace);
    }

    #[test]
    fn prefix_and_context_compose_like_qemu() {
        let e = Error::from_errno("open", libc::ENOENT).prefixed("Could not open 'a'").with_offset(7).with_offset(9);
        assert_eq!(e.to_string(), "Could not open 'a': No such file or directory");
        assert_eq!(e.context().offset, Some(7), "the deepest layer's offset wins");
        assert_eq!(format!("{e:#}"), "Could not open 'a': No such file or directory [operation: open, offset: 7]");
    }
}
