//! What drivers report about images: `info`, `check` and `measure` results.
//!
//! The structs mirror QEMU's QAPI types (BlockGraphInfo, ImageCheck, BlockMeasureInfo) field for
//! field; `to_value` inserts keys in QAPI's declaration order so that [`crate::qobject`] prints them
//! in qemu-img's order.

use crate::error::Result;
use crate::qobject::{Dict, Value};
use crate::storage::Storage;

/// One internal snapshot, as `info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotInfo {
    /// Numeric id as a string.
    pub id: String,
    /// The tag.
    pub name: String,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: i64,
    /// Creation time, nanoseconds part.
    pub date_nsec: i64,
    /// Guest clock at creation, seconds.
    pub vm_clock_sec: i64,
    /// Guest clock at creation, nanoseconds part.
    pub vm_clock_nsec: i64,
    /// Instruction count, when recorded.
    pub icount: Option<u64>,
}

impl SnapshotInfo {
    /// The QAPI SnapshotInfo object.
    pub fn to_value(&self) -> Value {
        let mut d = Dict::new();
        d.insert("id", self.id.as_str().into())
            .insert("name", self.name.as_str().into())
            .insert("vm-state-size", self.vm_state_size.into())
            .insert("date-sec", self.date_sec.into())
            .insert("date-nsec", self.date_nsec.into())
            .insert("vm-clock-sec", self.vm_clock_sec.into())
            .insert("vm-clock-nsec", self.vm_clock_nsec.into())
            .insert_opt("icount", self.icount.map(Value::from));
        Value::Dict(d)
    }
}

/// A node's information, as qemu-img's `info` prints it (QAPI BlockGraphInfo).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageInfo {
    /// The file name.
    pub filename: String,
    /// The format (or protocol, for child nodes) name.
    pub format: String,
    /// Whether the image was not closed cleanly, where the format records it.
    pub dirty_flag: Option<bool>,
    /// Bytes allocated on the host.
    pub actual_size: Option<u64>,
    /// Virtual size (file length for protocol nodes).
    pub virtual_size: u64,
    /// Cluster size, where the format has one.
    pub cluster_size: Option<u64>,
    /// Whether the image is encrypted.
    pub encrypted: Option<bool>,
    /// Whether the image is compressed (QAPI field; unused by qemu's own drivers).
    pub compressed: Option<bool>,
    /// The backing file name as stored in the image.
    pub backing_filename: Option<String>,
    /// The backing file name resolved against the image's location.
    pub full_backing_filename: Option<String>,
    /// The backing file's format as stored in the image.
    pub backing_filename_format: Option<String>,
    /// Internal snapshots (None when the format has none at all).
    pub snapshots: Option<Vec<SnapshotInfo>>,
    /// The format-specific block: (type, data dictionary).
    pub format_specific: Option<(String, Dict)>,
    /// Child nodes (the protocol file, data files, extents): (child name, info).
    pub children: Vec<(String, ImageInfo)>,
}

impl ImageInfo {
    /// The fields of QAPI BlockNodeInfo (without children).
    pub fn node_dict(&self) -> Dict {
        let mut d = Dict::new();
        d.insert("filename", self.filename.as_str().into())
            .insert("format", self.format.as_str().into())
            .insert_opt("dirty-flag", self.dirty_flag.map(Value::from))
            .insert_opt("actual-size", self.actual_size.map(Value::from))
            .insert("virtual-size", self.virtual_size.into())
            .insert_opt("cluster-size", self.cluster_size.map(Value::from))
            .insert_opt("encrypted", self.encrypted.map(Value::from))
            .insert_opt("compressed", self.compressed.map(Value::from))
            .insert_opt("backing-filename", self.backing_filename.clone().map(Value::from))
            .insert_opt("full-backing-filename", self.full_backing_filename.clone().map(Value::from))
            .insert_opt("backing-filename-format", self.backing_filename_format.clone().map(Value::from))
            .insert_opt(
                "snapshots",
                self.snapshots.as_ref().map(|s| Value::List(s.iter().map(SnapshotInfo::to_value).collect())),
            )
            .insert_opt(
                "format-specific",
                self.format_specific.as_ref().map(|(kind, data)| {
                    let mut fs = Dict::new();
                    fs.insert("type", kind.as_str().into()).insert("data", Value::Dict(data.clone()));
                    Value::Dict(fs)
                }),
            );
        d
    }

    /// QAPI BlockGraphInfo: the node's fields followed by its children.
    pub fn graph_value(&self) -> Value {
        let mut d = self.node_dict();
        let children = self
            .children
            .iter()
            .map(|(name, info)| {
                let mut c = Dict::new();
                c.insert("name", name.as_str().into()).insert("info", info.graph_value());
                Value::Dict(c)
            })
            .collect();
        d.insert("children", Value::List(children));
        Value::Dict(d)
    }
}

/// Marks a `check` report line that qemu prints as an error report (with the program name in
/// front, `qemu-img: ERROR ...`) rather than as a plain line: [`Check::check`](crate::Check)
/// implementations put it first, and callers strip it with [`error_report_line`].
pub const ERROR_REPORT_MARK: char = '\u{1}';

/// A report line to be printed as an error report (see [`ERROR_REPORT_MARK`]).
pub fn error_report_line(message: &str) -> String {
    format!("{ERROR_REPORT_MARK}{message}")
}

/// The result of a consistency check (QAPI ImageCheck plus the internal error count).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckReport {
    /// Errors that prevented checking parts of the image.
    pub check_errors: u64,
    /// Corruptions found (and not fixed).
    pub corruptions: u64,
    /// Leaked clusters found (and not fixed).
    pub leaks: u64,
    /// Corruptions fixed by repair.
    pub corruptions_fixed: u64,
    /// Leaks fixed by repair.
    pub leaks_fixed: u64,
    /// The first byte past the last used byte of the image file.
    pub image_end_offset: Option<u64>,
    /// Clusters covering the virtual disk.
    pub total_clusters: Option<u64>,
    /// Allocated clusters.
    pub allocated_clusters: Option<u64>,
    /// Allocated clusters not contiguous with their predecessor.
    pub fragmented_clusters: Option<u64>,
    /// Compressed clusters.
    pub compressed_clusters: Option<u64>,
}

/// What `measure` computes (QAPI BlockMeasureInfo).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Measure {
    /// Bytes required for a new image holding the given content.
    pub required: u64,
    /// Bytes for a fully allocated image of that size.
    pub fully_allocated: u64,
    /// Bytes needed for persistent bitmaps, when the format has them.
    pub bitmaps: Option<u64>,
}

impl Measure {
    /// The QAPI object.
    pub fn to_value(&self) -> Value {
        let mut d = Dict::new();
        d.insert("required", self.required.into())
            .insert("fully-allocated", self.fully_allocated.into())
            .insert_opt("bitmaps", self.bitmaps.map(Value::from));
        Value::Dict(d)
    }
}

/// `info` of an image stored in one container (`file` child) whose backing file, if any, is the
/// reference `parent` of format `parent_format`: the fields every such driver fills the same way.
pub fn file_image_info(
    storage: &dyn Storage,
    format: &str,
    virtual_size: u64,
    cluster_size: Option<u64>,
    parent: Option<&str>,
    parent_format: &str,
) -> Result<ImageInfo> {
    let file = storage_info(storage)?;
    Ok(ImageInfo {
        filename: storage.name().to_string(),
        format: format.into(),
        dirty_flag: Some(false),
        actual_size: file.actual_size,
        virtual_size,
        cluster_size,
        backing_filename: parent.map(str::to_string),
        full_backing_filename: parent.map(|p| crate::resolve_reference(storage.name(), p)),
        backing_filename_format: parent.map(|_| parent_format.to_string()),
        children: vec![("file".to_string(), file)],
        ..ImageInfo::default()
    })
}

/// `info` for a container node (qemu's child node "file"): its length rounded up to sectors, as
/// qemu reports it, and the space it occupies.
pub fn storage_info(storage: &dyn Storage) -> Result<ImageInfo> {
    let local = !storage.is_remote();
    Ok(ImageInfo {
        filename: storage.name().to_string(),
        format: storage.protocol().to_string(),
        dirty_flag: local.then_some(false),
        actual_size: storage.allocated_size()?,
        virtual_size: storage.len()?.div_ceil(512) * 512,
        // qemu's file-posix drivers (`file` and `host_device`) both report type "file".
        format_specific: local.then(|| ("file".to_string(), Dict::new())),
        ..ImageInfo::default()
    })
}
