//! `vdisk`: a disk image tool that speaks qemu-img's language.
//!
//! `vdisk <command> [options]` takes the same commands, options, output and exit codes as
//! qemu-img 10.0. Messages are prefixed with the basename of argv[0], so a symlink named
//! `qemu-img` behaves as QEMU's tool. Extras go behind new subcommands, never changing what a
//! qemu-img user sees.

mod args;
mod cmd;
mod common;
mod infofmt;
mod progress;
mod report;

use report::{prog, CliError};

/// The QEMU release whose qemu-img behaviour vdisk reproduces.
pub const QEMU_COMPAT_VERSION: &str = "10.0.2";

fn main() {
    // Like qemu-img: a closed stdout (`| head`) must not kill us with SIGPIPE mid-write.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let argv: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    report::set_prog(argv.first().map(String::as_str).unwrap_or("vdisk"));
    let code = match run(&argv[1.min(argv.len())..]) {
        Ok(code) => code,
        Err(e) => e.emit(),
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

fn run(args: &[String]) -> Result<i32, CliError> {
    if args.is_empty() {
        return Err(CliError::usage("Not enough arguments"));
    }
    // Global options before the command: -h/--help, -V/--version, -T/--trace <arg>.
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-h" | "--help" => {
                print!("{}", cmd::help_text());
                return Ok(0);
            }
            "-V" | "--version" => {
                print!("{}", version_text());
                return Ok(0);
            }
            "-T" | "--trace" => {
                if i + 1 >= args.len() {
                    return Err(CliError::usage(format!("missing argument for option '{}'", args[i])));
                }
                i += 2;
            }
            a if a.starts_with("--trace=") || (a.starts_with("-T") && a.len() > 2) => i += 1,
            "--" => {
                i += 1;
                break;
            }
            a if a.starts_with('-') && a.len() > 1 => {
                return Err(CliError::usage(format!("unrecognized option '{a}'")))
            }
            _ => break,
        }
    }
    let Some(name) = args.get(i) else {
        return Ok(0);
    };
    cmd::dispatch(name, &args[i + 1..])
}

/// `--version` text: qemu-img's first line (scripts parse it) plus vdisk's own.
pub fn version_text() -> String {
    format!(
        "{} version {} (vdisk {})\nCopyright (c) 2026 the vdisk developers; command line compatible with QEMU's qemu-img\n",
        prog(),
        QEMU_COMPAT_VERSION,
        env!("CARGO_PKG_VERSION")
    )
}
