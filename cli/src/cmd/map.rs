//! `map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len]
//! [--output=ofmt] [-U] filename`
//!
//! Each run of the disk is described by where it is decided in the backing chain (depth), whether
//! that image allocates it (present), whether it reads as zeros or holds data, whether it is
//! compressed, and where its bytes are. Adjacent runs that agree are merged, exactly as qemu-img
//! merges them, so the output matches line for line.

use std::io::Write;
use std::sync::Arc;

use blockdev::{BlockDriver, ExtentKind, OpenOptions};

use crate::args::{flag, opt, parse, Opt};
use crate::cmd::{cvtnum, registry};
use crate::common::{img_open, output_format, Objects, OpenRequest, OutputFormat};
use crate::report::{CliError, CmdResult};

const OPTS: &[Opt] = &[
    opt("f", Some('f'), Some("format")),
    opt("output", None, Some("output")),
    opt("object", None, Some("object")),
    flag("image-opts", None, Some("image-opts")),
    flag("U", Some('U'), Some("force-share")),
    opt("s", Some('s'), Some("start-offset")),
    opt("l", Some('l'), Some("max-length")),
];

/// One run of the disk, as qemu-img's MapEntry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// First byte.
    pub start: u64,
    /// Length.
    pub length: u64,
    /// Backing-chain depth where the run is decided.
    pub depth: u64,
    /// Allocated in the image at that depth.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset, when the run maps to plain bytes.
    pub offset: Option<u64>,
    /// The file holding those bytes.
    pub filename: Option<Arc<str>>,
}

/// The status of `[offset, offset + len)` followed down the backing chain.
pub fn status(top: &Arc<dyn BlockDriver>, offset: u64, len: u64) -> blockdev::Result<Entry> {
    let mut cur = top.clone();
    let mut depth = 0;
    let mut len = len;
    loop {
        let e = cur.block_status(offset, len)?;
        len = e.len.clamp(1, len);
        match e.kind {
            ExtentKind::Data | ExtentKind::Zero | ExtentKind::ZeroData => {
                let (filename, host) = match e.host {
                    Some((f, o)) => (Some(f), Some(o)),
                    None => (None, None),
                };
                return Ok(Entry {
                    start: offset,
                    length: len,
                    depth,
                    present: true,
                    zero: matches!(e.kind, ExtentKind::Zero | ExtentKind::ZeroData),
                    data: matches!(e.kind, ExtentKind::Data | ExtentKind::ZeroData),
                    compressed: e.compressed,
                    offset: host,
                    filename,
                });
            }
            ExtentKind::Unallocated => {
                let zero_entry = |depth, host: Option<(std::sync::Arc<str>, u64)>| Entry {
                    start: offset,
                    length: len,
                    depth,
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: host.as_ref().map(|h| h.1),
                    filename: host.map(|h| h.0),
                };
                // Without a backing file, unallocated parts of an allocated cluster (extended
                // L2 entries) still show their host offset, as qemu prints it.
                let Some(b) = cur.backing() else { return Ok(zero_entry(depth, e.host)) };
                if offset >= b.size() {
                    // Past the end of a shorter backing file: zeros, decided at this level.
                    return Ok(zero_entry(depth, e.host));
                }
                depth += 1;
                len = len.min(b.size() - offset);
                cur = b;
            }
        }
    }
}

fn mergeable(cur: &Entry, next: &Entry) -> bool {
    if cur.length == 0 {
        return false;
    }
    if (cur.zero, cur.data, cur.compressed, cur.depth, cur.present)
        != (next.zero, next.data, next.compressed, next.depth, next.present)
        || cur.filename.is_some() != next.filename.is_some()
        || cur.offset.is_some() != next.offset.is_some()
    {
        return false;
    }
    if let (Some(a), Some(b)) = (&cur.filename, &next.filename) {
        if a != b {
            return false;
        }
    }
    match (cur.offset, next.offset) {
        (Some(a), Some(b)) => a + cur.length == b,
        _ => true,
    }
}

/// `%#-16x`: C's alternate hex form ("0x..." but plain "0" for zero), left-aligned in 16 columns.
fn hex16(v: u64) -> String {
    let s = if v == 0 { "0".to_string() } else { format!("{v:#x}") };
    format!("{s:<16}")
}

fn dump(out: &mut impl Write, fmt: OutputFormat, e: &Entry, next: Option<&mut Entry>) -> Result<(), CliError> {
    let io = |r: std::io::Result<()>| r.map_err(|e| CliError::new(format!("write error: {e}")));
    match fmt {
        OutputFormat::Human => {
            if e.data && e.offset.is_none() {
                return Err(CliError::new("File contains external, encrypted or compressed clusters."));
            }
            if e.data && !e.zero {
                io(writeln!(
                    out,
                    "{}{}{}{}",
                    hex16(e.start),
                    hex16(e.length),
                    hex16(e.offset.unwrap_or(0)),
                    e.filename.as_deref().unwrap_or("")
                ))?;
            }
            // The human format does not tell zero from zero-data: let such runs merge.
            if let Some(n) = next {
                if !n.data || n.zero {
                    n.data = false;
                    n.zero = true;
                }
            }
        }
        OutputFormat::Json => {
            io(write!(
                out,
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            ))?;
            if let Some(o) = e.offset {
                io(write!(out, ", \"offset\": {o}"))?;
            }
            io(write!(out, "}}"))?;
            if next.is_some() {
                io(writeln!(out, ","))?;
            }
        }
    }
    Ok(())
}

/// Runs `map`.
pub fn run(args: &[String]) -> CmdResult {
    let p = parse(args, OPTS)?;
    if p.has("help") {
        return crate::cmd::help();
    }
    let start = match p.value("s") {
        Some(v) => cvtnum("start offset", v)?,
        None => 0,
    };
    let max_length = match p.value("l") {
        Some(v) => Some(cvtnum("max length", v)?),
        None => None,
    };
    Objects::parse(p.values("object"))?;
    if p.positional.len() != 1 {
        return Err(CliError::usage("Expecting one image file name"));
    }
    let fmt = output_format(p.value("output"))?;
    let name = &p.positional[0];
    let opts = OpenOptions { force_share: p.has("U"), ..OpenOptions::default() };
    let drv = img_open(&registry(), &OpenRequest { name, fmt: p.value("f"), image_opts: p.has("image-opts"), opts })?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let io = |r: std::io::Result<()>| r.map_err(|e| CliError::new(format!("write error: {e}")));
    match fmt {
        OutputFormat::Human => io(writeln!(out, "{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to"))?,
        OutputFormat::Json => io(write!(out, "["))?,
    }
    let mut length = drv.size();
    if let Some(m) = max_length {
        length = length.min(start.saturating_add(m));
    }
    let mut cur = Entry {
        start,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
        filename: None,
    };
    let result = (|| -> Result<(), CliError> {
        while cur.start + cur.length < length {
            let offset = cur.start + cur.length;
            let mut next = status(&drv, offset, length - offset)
                .map_err(|e| CliError::new(format!("Could not read file metadata: {}", e.message())))?;
            if mergeable(&cur, &next) {
                cur.length += next.length;
                continue;
            }
            if cur.length > 0 {
                dump(&mut out, fmt, &cur, Some(&mut next))?;
            }
            cur = next;
        }
        dump(&mut out, fmt, &cur, None)?;
        if fmt == OutputFormat::Json {
            io(writeln!(out, "]"))?;
        }
        Ok(())
    })();
    io(out.flush())?;
    result.map(|()| 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_columns_like_printf() {
        assert_eq!(hex16(0), "0               ");
        assert_eq!(hex16(0x1000), "0x1000          ");
    }
}
