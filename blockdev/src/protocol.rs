//! Protocols: where an image's container comes from (a local file, an NBD export, a file on a
//! web server, ...). A [`Protocol`] opens and creates [`Storage`]s; format drivers run on any of
//! them. The registry (`formats::Registry`) holds the protocols beside the formats and picks one
//! per file name; this crate sniffs no name prefixes.
//!
//! Names follow qemu's syntax: a name whose first `:` comes before any `/` carries a protocol
//! prefix (`nbd:`, `nbd://`, `http://`, `json:`) and is never resolved against a referring
//! image's directory ([`has_protocol_prefix`]); every other name is a local path.

use std::fmt::Debug;
use std::sync::Arc;

use crate::error::Result;
use crate::open::OpenOptions;
use crate::storage::{Prealloc, Storage};

/// A source of containers, chosen by the file name's prefix or URL scheme.
///
/// Contracts: [`Protocol::claims`] looks at the name only (no I/O); [`Protocol::open`] and
/// [`Protocol::create`] are called only for names the protocol claims; a container from a
/// network protocol takes no file locks ([`Storage::set_permissions`] does nothing) and never
/// grows.
pub trait Protocol: Send + Sync + Debug {
    /// The node driver names it answers to in `json:` names and `--image-opts` (`file`, `nbd`,
    /// `http`, `https`).
    fn drivers(&self) -> &'static [&'static str];

    /// Whether `filename` is this protocol's (by its prefix or URL scheme).
    fn claims(&self, filename: &str) -> bool;

    /// Opens the container `filename` names, read-only or not as `opts` says; the node options
    /// of `opts.protocol_options` are this protocol's.
    fn open(&self, filename: &str, opts: &OpenOptions) -> Result<Arc<dyn Storage>>;

    /// Makes a container for an image of `size` bytes with `prealloc` and returns it open
    /// read-write: a new local file, or an existing network export checked to be large enough.
    fn create(&self, filename: &str, size: u64, prealloc: Prealloc) -> Result<Arc<dyn Storage>>;

    /// Removes what a failed [`Protocol::create`] left; network protocols leave their exports.
    fn delete(&self, _filename: &str) {}

    /// Whether containers of this protocol live on another machine (no file locks, nothing
    /// to delete).
    fn is_remote(&self) -> bool {
        true
    }
}

/// Whether `name` carries a protocol prefix in qemu's syntax: its first `:` comes before any
/// `/` (`nbd:host:10809`, `nbd://host/export`, `https://host/disk.qcow2`, `json:{...}`).
///
/// ```
/// use blockdev::has_protocol_prefix;
///
/// assert!(has_protocol_prefix("nbd://localhost/disk"));
/// assert!(has_protocol_prefix("json:{\"file.filename\": \"a\"}"));
/// assert!(!has_protocol_prefix("/images/a:b.qcow2"));
/// assert!(!has_protocol_prefix("base.qcow2"));
/// ```
pub fn has_protocol_prefix(name: &str) -> bool {
    name.find([':', '/']).is_some_and(|i| name.as_bytes()[i] == b':')
}
