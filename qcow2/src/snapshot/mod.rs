//! Internal snapshots: the snapshot table, taking, reverting to and deleting snapshots, and the
//! VM state area.
//!
//! A snapshot is a copy of the active L1 table plus one more reference to every cluster that
//! table reaches; writes to shared clusters then copy them (the COPIED flag is clear), so the
//! snapshot keeps its content. See `ops.rs` for the update orders.

mod api;
mod check;
mod ops;
mod refs;
pub mod table;

pub(crate) use api::infos;
pub(crate) use ops::read_l1;
pub(crate) use table::{read_table, SnapshotEntry, V3_MIN_EXTRA_SIZE};
