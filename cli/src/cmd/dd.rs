//! `dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks]
//! if=input of=output`
//!
//! qemu-img's dd copies a range of the input image into a newly created output image. The operands
//! are parsed into an [`Operands`] value first and the byte range into a [`Plan`], both pure, so
//! the arithmetic that decides the output can be tested on its own. Then the command acts, in
//! qemu-img's order so the same mistake gets the same message: open the input, look up the output
//! format, create the output (no "Formatting" line, as `bdrv_create` prints none), open it, copy.
//!
//! The range follows qemu-img exactly, quirks included:
//! - `count=N` cuts the input at `N * bs` bytes *from the start of the input*, and `skip=M` then
//!   starts at `M * bs`; so `count` is an end position, not a number of blocks after the skip;
//! - a skip past that end creates an empty output and reports "cannot skip to specified offset",
//!   yet the command succeeds;
//! - every byte of the range is written, zeros included, so the output comes out as allocated as
//!   qemu-img's (the copy engine runs with `min_sparse = 0`; holes of the input are not read, they
//!   are written as zero buffers).
//!
//! The data moves through [`blockdev::copy`], which reads and writes in parallel but in order.

use std::sync::atomic::AtomicBool;

use blockdev::copy::{Copy, CopyOptions, DEFAULT_BUF_SIZE};

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::create::{img_create, CreateRequest};
use crate::cmd::{cvtnum, cvtnum_full, registry};
use crate::common::{img_open, Objects, OpenRequest};
use crate::report::{error_report, CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("f", Some('f'), None),
    opt("O", Some('O'), None),
    flag("U", Some('U'), Some("force-share")),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
];

/// qemu-img's default block size.
const DEFAULT_BS: u64 = 512;

/// Parallel workers of the copy (dd has no `-m`; the engine keeps writes in order).
const WORKERS: usize = 8;

/// The operands after the options, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operands {
    /// `bs=`: block size in bytes (1 ..= `i32::MAX`).
    pub bs: u64,
    /// `count=`: blocks, when given.
    pub count: Option<u64>,
    /// `skip=`: blocks, when given.
    pub skip: Option<u64>,
    /// `if=`.
    pub input: String,
    /// `of=`.
    pub output: String,
}

/// Parses the `key=value` operands left to right, stopping at the first bad one as qemu-img does.
pub fn parse_operands(args: &[String]) -> Result<Operands, CliError> {
    let mut ops = Operands { bs: DEFAULT_BS, count: None, skip: None, input: String::new(), output: String::new() };
    let (mut have_if, mut have_of) = (false, false);
    for arg in args {
        let Some((key, value)) = arg.split_once('=') else {
            return Err(CliError::new(format!("unrecognized operand {arg}")));
        };
        match key {
            "bs" => ops.bs = cvtnum_full("bs", value, 1, i32::MAX as u64)?,
            "count" => ops.count = Some(cvtnum("count", value)?),
            "skip" => ops.skip = Some(cvtnum("skip", value)?),
            "if" => {
                ops.input = value.to_string();
                have_if = true;
            }
            "of" => {
                ops.output = value.to_string();
                have_of = true;
            }
            _ => return Err(CliError::new(format!("unrecognized operand {key}"))),
        }
    }
    if !(have_if && have_of) {
        return Err(CliError::new("Must specify both input and output files"));
    }
    Ok(ops)
}

/// The byte range dd copies, computed from the input's size as qemu-img computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Size of the output image to create.
    pub out_size: u64,
    /// First input byte to copy.
    pub start: u64,
    /// Input byte where copying stops (exclusive).
    pub end: u64,
    /// The skip reaches past `end`: warn and copy nothing.
    pub skip_too_far: bool,
}

/// Computes the range for an input of `input_size` bytes.
pub fn plan(input_size: u64, ops: &Operands) -> Plan {
    let limit = i64::MAX as u64;
    let bs = ops.bs.max(1);
    let mut end = input_size;
    if let Some(count) = ops.count {
        if count <= limit / bs && count * bs < end {
            end = count * bs;
        }
    }
    let skip_bytes = match ops.skip {
        None => Some(0),
        Some(skip) if skip <= limit / bs && skip * bs <= end => Some(skip * bs),
        Some(_) => None,
    };
    match skip_bytes {
        Some(start) => Plan { out_size: end - start, start, end, skip_too_far: false },
        None => Plan { out_size: 0, start: end, end, skip_too_far: true },
    }
}

/// Runs `dd`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    Objects::parse(p.values("object"))?;
    let ops = parse_operands(&p.positional)?;
    let out_fmt = p.value("O").unwrap_or("raw");
    let reg = registry();

    let input = img_open(&reg, &OpenRequest::read_only(&ops.input, p.value("f"), p.has("image-opts"), p.has("U")))?;
    // qemu-img dd's message names no format; one vdisk lacks is named.
    reg.format_or(out_fmt, || blockdev::Error::invalid_argument("Unknown file format"))?;
    let plan = plan(input.size(), &ops);
    let create = CreateRequest {
        filename: &ops.output,
        fmt: out_fmt,
        backing: None,
        backing_fmt: None,
        options: None,
        size: Some(plan.out_size),
        no_backing_open: false,
        quiet: true,
    };
    img_create(&reg, &create)
        .map_err(|e| CliError::new(format!("{}: error while creating output image: {e}", ops.output)))?;
    // qemu-img cannot honour --image-opts for the output: it is opened by name and format.
    let output = img_open(&reg, &OpenRequest::read_write(&ops.output, Some(out_fmt), false))?;
    if plan.skip_too_far {
        error_report(&format!("{}: cannot skip to specified offset", ops.input));
    }
    let copy = Copy {
        src: input.as_ref(),
        src_offset: plan.start,
        dst: output.as_ref(),
        dst_offset: 0,
        len: plan.end - plan.start,
        opts: CopyOptions {
            workers: WORKERS,
            in_order: true,
            min_sparse: 0,
            alignment: 512,
            offload: false,
            target_zeroed: false,
            above: None,
            buf_size: DEFAULT_BUF_SIZE,
            salvage: false,
            compress: false,
            detect_zeroes: true,
        },
    };
    if copy.len > 0 {
        copy.run(&|_| {}, &|_| {}, &AtomicBool::new(false), 0).map_err(copy_failure)?;
    }
    output.close().map_err(|e| CliError::new(format!("error while writing to output image file: {}", detail(&e))))?;
    Ok(0)
}

/// The engine reports "error while reading at byte N: ..." or "... writing ..."; qemu-img's dd
/// words them as below, with the system's error text.
fn copy_failure(e: blockdev::Error) -> CliError {
    let side = if e.message().starts_with("error while reading") {
        "reading from input"
    } else if e.message().starts_with("error while writing") {
        "writing to output"
    } else {
        return CliError::new(e.message());
    };
    CliError::new(format!("error while {side} image file: {}", detail(&e)))
}

/// The system's text for an error (strerror, as qemu prints), or its message without the
/// engine's "error while ... at byte N: " prefix.
fn detail(e: &blockdev::Error) -> String {
    if let Some(errno) = e.errno() {
        return blockdev::io_text(&std::io::Error::from_raw_os_error(errno));
    }
    if e.kind() == blockdev::ErrorKind::OutOfRange {
        return blockdev::io_text(&std::io::Error::from_raw_os_error(libc::EIO));
    }
    let msg = e.message();
    match msg.strip_prefix("error while ").and_then(|r| r.split_once(": ")) {
        Some((_, rest)) => rest.to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(v: &[&str]) -> Result<Operands, CliError> {
        parse_operands(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn with(bs: u64, count: Option<u64>, skip: Option<u64>) -> Operands {
        Operands { bs, count, skip, input: "i".into(), output: "o".into() }
    }

    #[test]
    fn operands_parse_with_defaults_and_suffixes() {
        let o = ops(&["if=a", "of=b=c", "bs=1k", "count=3", "skip=0x10"]).unwrap();
        assert_eq!(o, Operands { bs: 1024, count: Some(3), skip: Some(16), input: "a".into(), output: "b=c".into() });
        assert_eq!(ops(&["of=b", "if="]).unwrap().bs, 512);
    }

    #[test]
    fn operand_rejections_use_qemu_words() {
        assert_eq!(ops(&["foo", "if=a", "of=b"]).unwrap_err().message(), "unrecognized operand foo");
        assert_eq!(ops(&["if=a", "foo=bar"]).unwrap_err().message(), "unrecognized operand foo");
        assert_eq!(ops(&["if=a"]).unwrap_err().message(), "Must specify both input and output files");
        assert_eq!(ops(&[]).unwrap_err().message(), "Must specify both input and output files");
        assert_eq!(
            ops(&["bs=0", "if=a", "of=b"]).unwrap_err().message(),
            "Invalid bs specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            ops(&["bs=2G", "if=a", "of=b"]).unwrap_err().message(),
            "Invalid bs specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            ops(&["count=-1", "if=a", "of=b"]).unwrap_err().message(),
            "Invalid count specified. Must be between 0 and 9223372036854775807."
        );
        assert_eq!(
            ops(&["skip=9E", "if=a", "of=b"]).unwrap_err().message(),
            "Invalid skip specified. Must be between 0 and 9223372036854775807."
        );
        // The first bad operand wins, even before a missing if/of is noticed.
        assert_eq!(
            ops(&["bs=0", "x"]).unwrap_err().message(),
            "Invalid bs specified. Must be between 1 and 2147483647."
        );
    }

    #[test]
    fn io_failures_are_worded_as_qemu_dd_words_them() {
        let e = blockdev::Error::from_errno("read", libc::EIO).with_message("error while reading at byte 512: x");
        assert_eq!(copy_failure(e).message(), "error while reading from input image file: Input/output error");
        let e = blockdev::Error::from_errno("write", libc::ENOSPC).with_message("error while writing at byte 0: y");
        assert_eq!(copy_failure(e).message(), "error while writing to output image file: No space left on device");
        let e = blockdev::Error::corrupt("error while reading at byte 7: L2 table is broken");
        assert_eq!(copy_failure(e).message(), "error while reading from input image file: L2 table is broken");
        let e = blockdev::Error::cancelled();
        assert_eq!(copy_failure(e).message(), "Operation cancelled");
    }

    #[test]
    fn plan_copies_the_whole_input_by_default() {
        assert_eq!(
            plan(1 << 20, &with(512, None, None)),
            Plan { out_size: 1 << 20, start: 0, end: 1 << 20, skip_too_far: false }
        );
    }

    #[test]
    fn count_is_an_end_position_and_skip_a_start() {
        // qemu-img: bs=1000 count=3 skip=1 copies input bytes 1000..3000.
        assert_eq!(
            plan(1 << 20, &with(1000, Some(3), Some(1))),
            Plan { out_size: 2000, start: 1000, end: 3000, skip_too_far: false }
        );
        // count beyond the input is ignored; count=0 copies nothing.
        assert_eq!(plan(4096, &with(512, Some(100), None)).out_size, 4096);
        assert_eq!(plan(4096, &with(512, Some(0), None)).out_size, 0);
        // A partial last block.
        assert_eq!(
            plan(1000, &with(300, None, Some(3))),
            Plan { out_size: 100, start: 900, end: 1000, skip_too_far: false }
        );
    }

    #[test]
    fn skipping_to_the_end_is_empty_and_past_it_warns() {
        assert_eq!(
            plan(1024, &with(512, Some(2), Some(2))),
            Plan { out_size: 0, start: 1024, end: 1024, skip_too_far: false }
        );
        assert_eq!(
            plan(1024, &with(512, None, Some(3))),
            Plan { out_size: 0, start: 1024, end: 1024, skip_too_far: true }
        );
        // skip * bs overflowing i64 counts as past the end.
        assert!(plan(1024, &with(1 << 30, None, Some(1 << 40))).skip_too_far);
        assert_eq!(plan(1 << 20, &with(1 << 30, Some(1 << 40), None)).out_size, 1 << 20);
    }
}
