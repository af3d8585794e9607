//! Messages and exit codes as qemu-img prints and returns them.
//!
//! Every message goes to stderr prefixed with the program's name (the basename of argv[0], so a
//! symlink called `qemu-img` speaks as qemu-img). Usage errors add qemu-img's hint line.

use std::sync::OnceLock;

static PROG: OnceLock<String> = OnceLock::new();

/// Records the program name used as the message prefix.
pub fn set_prog(argv0: &str) {
    let base = argv0.rsplit('/').next().unwrap_or(argv0);
    let _ = PROG.set(if base.is_empty() { "vdisk".to_string() } else { base.to_string() });
}

/// The program name.
pub fn prog() -> &'static str {
    PROG.get().map(String::as_str).unwrap_or("vdisk")
}

/// Prints `prog: message` to stderr (qemu's error_report).
pub fn error_report(message: &str) {
    eprintln!("{}: {}", prog(), message);
}

/// The text qemu shows for a driver error reported as an errno: `strerror`, after printing the
/// driver's own message on a line of its own when it says more (qemu's drivers report such
/// details with error_report and return only the errno to the caller, which adds its prefix).
pub fn errno_report(e: &blockdev::Error) -> String {
    match e.errno() {
        Some(n) => {
            let text = blockdev::io_text(&std::io::Error::from_raw_os_error(n));
            if text != e.message() {
                error_report(e.message());
            }
            text
        }
        None => e.message().to_string(),
    }
}

/// Prints `prog: warning: message` to stderr (qemu's warn_report).
pub fn warn_report(message: &str) {
    eprintln!("{}: warning: {}", prog(), message);
}

/// A command's failure: what to print and the exit code.
#[derive(Debug)]
pub struct CliError {
    message: String,
    code: i32,
    usage: bool,
    printed: bool,
}

impl CliError {
    /// A failure with exit code 1.
    pub fn new(message: impl Into<String>) -> CliError {
        CliError { message: message.into(), code: 1, usage: false, printed: false }
    }

    /// A usage error: the message, then "Try 'prog --help' for more information", exit 1.
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError { usage: true, ..CliError::new(message) }
    }

    /// A failure whose message was already printed.
    pub fn silent(code: i32) -> CliError {
        CliError { message: String::new(), code, usage: false, printed: true }
    }

    /// Replaces the exit code.
    pub fn with_code(mut self, code: i32) -> CliError {
        self.code = code;
        self
    }

    /// The message (without the program prefix).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prints the message (unless already printed) and returns the exit code.
    pub fn emit(&self) -> i32 {
        if !self.printed {
            error_report(&self.message);
            if self.usage {
                eprintln!("Try '{} --help' for more information", prog());
            }
        }
        self.code
    }
}

impl From<blockdev::Error> for CliError {
    fn from(e: blockdev::Error) -> CliError {
        CliError::new(e.message())
    }
}

/// Result of a command: its exit code.
pub type CmdResult = Result<i32, CliError>;
