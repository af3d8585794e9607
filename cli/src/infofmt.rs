//! `info` output: qemu-img's human layout and its JSON.

use std::fmt::Write;

use blockdev::info::{ImageInfo, SnapshotInfo};
use blockdev::qobject::{dump_human, to_json_pretty, Value};
use blockdev::size::size_to_str;

/// The human text of a list of images (a backing chain), separated by blank lines.
pub fn human_list(list: &[ImageInfo]) -> String {
    let mut out = String::new();
    for (i, info) in list.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        human_graph(&mut out, info, 0, "/");
    }
    out
}

fn human_graph(out: &mut String, info: &ImageInfo, indentation: usize, path: &str) {
    human_node(out, info, indentation, info.children.is_empty());
    for (name, child) in &info.children {
        let _ = writeln!(out, "{:w$}Child node '{path}{name}':", "", w = indentation * 4);
        human_graph(out, child, indentation + 1, &format!("{path}{name}/"));
    }
}

fn human_node(out: &mut String, info: &ImageInfo, indentation: usize, protocol: bool) {
    let protocol = protocol && indentation > 0;
    let ind = " ".repeat(indentation * 4);
    let dsize = info.actual_size.map(size_to_str).unwrap_or_else(|| "unavailable".to_string());
    let _ = writeln!(out, "{ind}{}: {}", if protocol { "filename" } else { "image" }, info.filename);
    let _ = writeln!(out, "{ind}{}: {}", if protocol { "protocol type" } else { "file format" }, info.format);
    let _ = writeln!(
        out,
        "{ind}{}: {} ({} bytes)",
        if protocol { "file length" } else { "virtual size" },
        size_to_str(info.virtual_size),
        info.virtual_size
    );
    let _ = writeln!(out, "{ind}disk size: {dsize}");
    if info.encrypted == Some(true) {
        let _ = writeln!(out, "{ind}encrypted: yes");
    }
    if let Some(cs) = info.cluster_size {
        let _ = writeln!(out, "{ind}cluster_size: {cs}");
    }
    if info.dirty_flag == Some(true) {
        let _ = writeln!(out, "{ind}cleanly shut down: no");
    }
    if let Some(b) = &info.backing_filename {
        let _ = write!(out, "{ind}backing file: {b}");
        match &info.full_backing_filename {
            None => out.push_str(" (cannot determine actual path)"),
            Some(full) if full != b => {
                let _ = write!(out, " (actual path: {full})");
            }
            Some(_) => {}
        }
        out.push('\n');
        if let Some(f) = &info.backing_filename_format {
            let _ = writeln!(out, "{ind}backing file format: {f}");
        }
    }
    if let Some(snaps) = &info.snapshots {
        let _ = writeln!(out, "{ind}Snapshot list:");
        let _ = writeln!(out, "{ind}{}", snapshot_header());
        for s in snaps {
            let _ = writeln!(out, "{ind}{}", snapshot_line(s));
        }
    }
    if let Some((_, data)) = &info.format_specific {
        if !data.is_empty() {
            let _ = writeln!(out, "{ind}Format specific information:");
            dump_human(out, indentation + 1, &Value::Dict(data.clone()));
        }
    }
}

/// The header line of a snapshot table.
pub fn snapshot_header() -> String {
    format!("{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}", "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")
}

/// One line of a snapshot table, as qemu prints it (dates in local time).
pub fn snapshot_line(s: &SnapshotInfo) -> String {
    let secs = s.vm_clock_sec + s.vm_clock_nsec / 1_000_000_000;
    let msecs = (s.vm_clock_nsec / 1_000_000) % 1000;
    let clock = format!("{:04}:{:02}:{:02}.{:03}", secs / 3600, (secs / 60) % 60, secs % 60, msecs);
    let icount = s.icount.map(|i| i.to_string()).unwrap_or_else(|| "--".to_string());
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        s.id,
        s.name,
        size_to_str(s.vm_state_size),
        local_date(s.date_sec),
        clock,
        icount
    )
}

/// `%Y-%m-%d %H:%M:%S` in local time.
fn local_date(secs: i64) -> String {
    // SAFETY: tm is plain data; localtime_r fills it from a valid time_t.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let t = secs as libc::time_t;
    // SAFETY: both pointers are valid for the call.
    unsafe { libc::localtime_r(&t, &mut tm) };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// JSON of one image (BlockGraphInfo) or a chain (a list of them).
pub fn json(list: &[ImageInfo], chain: bool) -> String {
    if chain {
        to_json_pretty(&Value::List(list.iter().map(ImageInfo::graph_value).collect()))
    } else {
        to_json_pretty(&list[0].graph_value())
    }
}
