//! The subcommands, one module each, and what they share.

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod resize;
pub mod serve;
pub mod snapshot;

use blockdev::size::{parse_size, SizeError};
use formats::Registry;

use crate::report::{error_report, CliError, CmdResult};

/// Command syntax lines, as qemu-img lists them.
const SYNTAX: &[&str] = &[
    "amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename",
    "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename",
    "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap",
    "check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename",
    "commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename",
    "compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2",
    "convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [--bitmaps] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] output_filename",
    "create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]",
    "dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output",
    "info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename",
    "map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename",
    "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]",
    "snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename",
    "rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] [-c] -b backing_file [-F backing_fmt] filename",
    "resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size",
    "serve --nbd [-k socket | -p port [-b addr]] [-x name] [-D description] [-r] [-t] [-e shared] [--cache mode] [--object objectdef] [--image-opts] [-f fmt] filename",
    "serve --vhost-user socket [--num-queues N] [--serial ID] [-r] [--cache mode] [--object objectdef] [--image-opts] [-f fmt] filename",
];

/// The full `--help` text.
pub fn help_text() -> String {
    let mut s = crate::version_text();
    s.push_str(
        "usage: vdisk [standard options] command [command options]\nDisk image utility (qemu-img compatible)\n\n",
    );
    s.push_str("    '-h', '--help'       display this help and exit\n");
    s.push_str("    '-V', '--version'    output version information and exit\n");
    s.push_str("    '-T', '--trace'      accepted for compatibility; vdisk has no trace points\n\n");
    s.push_str("Command syntax:\n");
    for line in SYNTAX {
        s.push_str("  ");
        s.push_str(line);
        s.push('\n');
    }
    s.push_str(
        "\nCommand parameters:\n\
         \x20 'filename' is a disk image filename\n\
         \x20 'objectdef' defines an object; vdisk knows 'secret' objects (id=, data= or file=, format=raw|base64)\n\
         \x20 'fmt' is the disk image format; it is probed from the content when omitted\n\
         \x20 'cache' is the cache mode for writing: 'none', 'writeback' (default, except for convert),\n\
         \x20   'writethrough', 'directsync' and 'unsafe' (default for convert)\n\
         \x20 'src_cache' is the cache mode for reading input images, with the same values\n\
         \x20 'size' is a size in bytes; suffixes k, M, G, T, P and E mean powers of 1024, 'b' is ignored\n\
         \x20 'options' is a comma separated list of name=value format options; '-o help' lists them\n\
         \x20 '-p' shows progress, '-q' prints nothing but errors\n\
         \x20 '-S' is the length of zero runs that convert leaves unallocated (default 4k; 0 writes everything)\n\
         \x20 '--output' selects human or json output\n\
         \x20 '-n' makes convert write into an existing target\n\
         \x20 check '-r leaks|all' repairs leaks only, or everything repairable\n\
         \x20 convert '-m' sets the number of parallel workers (default: one per CPU, 2 to 8), '-W' allows out-of-order writes\n\
         \x20 compare '-s' fails on different sizes or allocation\n\
         \x20 dd 'bs=BYTES' (default 512), 'count=N', 'if=FILE', 'of=FILE', 'skip=N'\n",
    );
    s.push_str("\nSupported formats:");
    for name in registry().names() {
        s.push(' ');
        s.push_str(name);
    }
    s.push_str("\n\n");
    s
}

/// `-h` inside a command: the full help, exit 0 (as qemu-img does).
pub fn help() -> CmdResult {
    print!("{}", help_text());
    Ok(0)
}

/// The registry of every format.
pub fn registry() -> Registry {
    Registry::new()
}

/// Runs the command `name`.
pub fn dispatch(name: &str, args: &[String]) -> CmdResult {
    match name {
        "amend" => amend::run(args),
        "bench" => bench::run(args),
        "bitmap" => bitmap::run(args),
        "check" => check::run(args),
        "commit" => commit::run(args),
        "compare" => compare::run(args),
        "convert" => convert::run(args),
        "create" => create::run(args),
        "dd" => dd::run(args),
        "info" => info::run(args),
        "map" => map::run(args),
        "measure" => measure::run(args),
        "rebase" => rebase::run(args),
        "resize" => resize::run(args),
        "serve" => serve::run(args),
        "snapshot" => snapshot::run(args),
        _ => Err(CliError::usage(format!("Command not found: {name}"))),
    }
}

/// Joins repeated `-o` lists with `,` after checking each as qemu-img does.
pub fn accumulate_options(lists: &[String]) -> Result<Option<String>, CliError> {
    let mut out: Option<String> = None;
    for l in lists {
        let trailing = l.len() - l.trim_end_matches(',').len();
        if l.is_empty() || l.starts_with(',') || trailing % 2 == 1 {
            return Err(CliError::new(format!("Invalid option list: {l}")));
        }
        out = Some(match out {
            None => l.clone(),
            Some(o) => format!("{o},{l}"),
        });
    }
    Ok(out)
}

/// qemu-img's `cvtnum`: a size between `min` and `max`, with its two-line suffix message.
pub fn cvtnum_full(name: &str, value: &str, min: u64, max: u64) -> Result<u64, CliError> {
    match parse_size(value) {
        Ok(v) if v >= min && v <= max => Ok(v),
        Err(SizeError::Invalid) => {
            error_report(&format!("Invalid {name} specified. You may use k, M, G, T, P or E suffixes for"));
            error_report("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
            Err(CliError::silent(1))
        }
        _ => Err(CliError::new(format!("Invalid {name} specified. Must be between {min} and {max}."))),
    }
}

/// A size argument bounded like qemu-img's (0 ..= i64::MAX).
pub fn cvtnum(name: &str, value: &str) -> Result<u64, CliError> {
    cvtnum_full(name, value, 0, i64::MAX as u64)
}

/// The size argument of `create`.
pub fn parse_img_size(value: &str) -> Result<u64, CliError> {
    cvtnum("image size", value)
}
